//! The stand-in's storage integration against Azurite: the ConnectionTest on set-up, the
//! documented notifications, the backup blob name, and a downloadUri whose SAS Azurite accepts.

use base64::Engine as _;
use cvchain_azure::storage::clients::StorageClients;
use cvchain_core::notification::{Notification, parse};
use cvchain_standin::{COMPACT_DOMAIN, Standin, StandinConfig};
use cvchain_testkit::{Azurite, unique};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

const KEY: &str = "k";

struct Setup {
    azurite: Azurite,
    standin: Standin,
    clients: StorageClients,
    queue: String,
}

async fn setup(base64_messages: bool) -> Setup {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let standin = Standin::start(StandinConfig {
        training_key: KEY.into(),
        storage: Some(clients.clone()),
        train_delay: Duration::from_millis(20),
        export_delay: Duration::from_millis(20),
        base64_messages,
        model_size: 10_000,
        // The calls go straight over HTTP, one after another, and check their own answers:
        // the calls-per-second limit has its own test (standin_contract.rs).
        rate_limit: None,
        ..Default::default()
    })
    .await
    .unwrap();
    Setup {
        azurite,
        standin,
        clients,
        queue: unique("sq"),
    }
}

impl Setup {
    fn api(&self, path: &str) -> String {
        format!(
            "{}/customvision/v3.3/training/{path}",
            self.standin.endpoint()
        )
    }

    async fn post(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let rsp = reqwest::Client::new()
            .post(self.api(path))
            .query(query)
            .header("Training-Key", KEY)
            .send()
            .await
            .unwrap();
        assert!(rsp.status().is_success(), "{path}: {}", rsp.status());
        rsp.json().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(self.api(path))
            .header("Training-Key", KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The messages on the queue now, taken.
    async fn messages_now(&self) -> Vec<String> {
        use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
        let q = self.clients.queue(&self.queue).unwrap();
        let rsp = q
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(32),
                ..Default::default()
            }))
            .await
            .unwrap();
        rsp.into_model()
            .unwrap()
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.message_text.unwrap_or_default())
            .collect()
    }

    /// Waits for `n` messages on the queue and takes them.
    async fn messages(&self, n: usize) -> Vec<String> {
        use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
        let q = self.clients.queue(&self.queue).unwrap();
        let mut out = Vec::new();
        for _ in 0..300 {
            if let Ok(rsp) = q
                .receive_messages(Some(QueueClientReceiveMessagesOptions {
                    number_of_messages: Some(32),
                    ..Default::default()
                }))
                .await
            {
                let items = rsp.into_model().unwrap().items.unwrap_or_default();
                for m in items {
                    out.push(m.message_text.clone().unwrap_or_default());
                    q.delete_message(
                        m.message_id.as_deref().unwrap(),
                        m.pop_receipt.as_deref().unwrap(),
                        None,
                    )
                    .await
                    .unwrap();
                }
            }
            if out.len() >= n {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("only {} of {n} messages arrived", out.len());
    }

    async fn project(&self, with_container: bool) -> Uuid {
        let queue_uri = format!(
            "http://127.0.0.1:{}/devstoreaccount1/{}",
            self.azurite.queue_port, self.queue
        );
        let container_uri = format!(
            "http://127.0.0.1:{}/devstoreaccount1/backups",
            self.azurite.blob_port
        );
        let mut q = vec![
            ("name", "Widgets"),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", queue_uri.as_str()),
        ];
        if with_container {
            q.push(("exportModelContainerUri", container_uri.as_str()));
            cvchain_testkit::standin::create_container(&self.clients, "backups").await;
        }
        cvchain_testkit::standin::create_queue(&self.clients, &self.queue).await;
        let p = self.post("projects", &q).await;
        Uuid::parse_str(p["id"].as_str().unwrap()).unwrap()
    }

    /// Tags images as a training script does, then trains.
    async fn train(&self, pid: Uuid) -> Value {
        cvchain_standin::script::TrainingScript::new(&self.standin.endpoint(), KEY)
            .add_tagged_images(pid, &["widget", "gadget"], 0)
            .await
            .unwrap();
        self.post(&format!("projects/{pid}/train"), &[]).await
    }

    async fn download(&self, container: &str, name: &str) -> Vec<u8> {
        cvchain_testkit::blob_bytes(&self.clients, container, name).await
    }
}

#[tokio::test]
async fn set_up_training_and_export_write_what_the_service_writes() {
    let s = setup(false).await;
    let pid = s.project(true).await;

    let msgs = s.messages(1).await;
    assert_eq!(
        parse(&msgs[0]).unwrap().notification,
        Notification::ConnectionTest { project_id: pid }
    );

    let it = s.train(pid).await;
    let iid = Uuid::parse_str(it["id"].as_str().unwrap()).unwrap();
    let msgs = s.messages(1).await;
    assert!(matches!(
        parse(&msgs[0]).unwrap().notification,
        Notification::Training { project_id, iteration_id, .. } if project_id == pid && iteration_id == iid
    ));

    s.post(
        &format!("projects/{pid}/iterations/{iid}/export"),
        &[("platform", "ONNX")],
    )
    .await;
    let msgs = s.messages(1).await;
    let Notification::Export {
        model_uri: Some(model_uri),
        ..
    } = parse(&msgs[0]).unwrap().notification
    else {
        panic!("{msgs:?}")
    };
    // The backup blob, named as the documentation says, holds the model.
    let name = format!("{pid} - {iid}.ONNX");
    assert!(
        model_uri.ends_with(&format!("/backups/{pid}%20-%20{iid}.ONNX")),
        "{model_uri}"
    );
    // The package (tests/standin_exports.rs looks inside), padded to the configured size.
    let expected = s.download("backups", &name).await;
    assert_eq!(expected.len(), 10_000);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&expected)).unwrap();
    assert_eq!(zip.by_index(0).unwrap().name().unwrap(), "model.onnx");

    // GetExports' downloadUri carries a SAS Azurite accepts, with no other credential.
    let exports = s
        .get(&format!("projects/{pid}/iterations/{iid}/export"))
        .await;
    assert_eq!(exports[0]["status"], "Done");
    let uri = exports[0]["downloadUri"].as_str().unwrap();
    assert!(uri.contains("sig="), "{uri}");
    let rsp = reqwest::get(uri).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.bytes().await.unwrap().to_vec(), expected);
}

#[tokio::test]
async fn without_a_backup_container_model_uri_is_the_sas_url_and_base64_works() {
    let s = setup(true).await;
    let pid = s.project(false).await;
    let msgs = s.messages(1).await;
    // Base64 text, which cvchain's parser unwraps.
    assert!(!msgs[0].starts_with('{'));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&msgs[0])
        .unwrap();
    assert!(String::from_utf8(raw).unwrap().contains("ConnectionTest"));
    assert_eq!(
        parse(&msgs[0]).unwrap().encoding,
        cvchain_core::notification::Encoding::Base64
    );

    let it = s.train(pid).await;
    let iid = it["id"].as_str().unwrap().to_owned();
    s.messages(1).await;
    s.post(
        &format!("projects/{pid}/iterations/{iid}/export"),
        &[("platform", "DockerFile"), ("flavor", "ARM")],
    )
    .await;
    let msgs = s.messages(1).await;
    let Notification::Export {
        model_uri: Some(model_uri),
        ..
    } = parse(&msgs[0]).unwrap().notification
    else {
        panic!("{msgs:?}")
    };
    let exports = s
        .get(&format!("projects/{pid}/iterations/{iid}/export"))
        .await;
    assert_eq!(exports[0]["flavor"], "ARM");
    assert_eq!(exports[0]["downloadUri"].as_str().unwrap(), model_uri);
    assert!(model_uri.contains("sig="));
}

#[tokio::test]
async fn a_set_up_fails_as_in_azure_when_the_queue_or_container_is_missing_or_elsewhere() {
    use cvchain_azure::storage::{StorageError, queue::send_to_existing};
    let s = setup(false).await;
    let script = cvchain_standin::script::TrainingScript::new(&s.standin.endpoint(), KEY);
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{}",
        s.azurite.queue_port, s.queue
    );
    let container_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/backups",
        s.azurite.blob_port
    );
    // Neither exists yet: each set-up fails, with v3.4-preview's code for a bad URI.
    for (q, c) in [(Some(&queue_uri), None), (None, Some(&container_uri))] {
        let e = script
            .create_project(
                "Widgets",
                COMPACT_DOMAIN,
                q.map(String::as_str),
                c.map(String::as_str),
            )
            .await
            .unwrap_err();
        assert_eq!(
            (e.status, e.code.as_str()),
            (400, "BadRequestInvalidUri"),
            "{e}"
        );
        assert!(e.message.contains("does not exist"), "{e}");
    }
    // v3.3 has no BadRequestInvalidUri: its BadRequestInvalid, with the URIs in the query.
    let rsp = reqwest::Client::new()
        .post(s.api("projects"))
        .query(&[
            ("name", "Widgets"),
            ("notificationQueueUri", queue_uri.as_str()),
        ])
        .header("Training-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 400);
    assert_eq!(
        rsp.json::<Value>().await.unwrap()["code"],
        "BadRequestInvalid"
    );
    // Nothing was created on the user's behalf, and no project either.
    let missing = send_to_existing(&s.clients.queue(&s.queue).unwrap(), "probe").await;
    assert!(
        matches!(missing, Err(StorageError::Service { status: 404, .. })),
        "{missing:?}"
    );
    assert_eq!(s.get("projects").await, Value::Array(vec![]));

    // A queue of the same name in another account (or on another port) is not this account's.
    cvchain_testkit::standin::create_queue(&s.clients, &s.queue).await;
    cvchain_testkit::standin::create_container(&s.clients, "backups").await;
    for elsewhere in [
        format!(
            "http://127.0.0.1:{}/otheraccount/{}",
            s.azurite.queue_port, s.queue
        ),
        format!(
            "http://127.0.0.1:{}/devstoreaccount1/{}",
            s.azurite.blob_port, s.queue
        ),
    ] {
        let e = script
            .create_project("Widgets", COMPACT_DOMAIN, Some(&elsewhere), None)
            .await
            .unwrap_err();
        assert_eq!(e.code, "BadRequestInvalidUri", "{e}");
    }

    // Created first, as a user does in Azure: the set-up works and the settings echo both URIs,
    // whether they came in the body (v3.4-preview, as the SDKs send them) or the query (v3.3).
    let pid = script
        .create_project(
            "Widgets",
            COMPACT_DOMAIN,
            Some(&queue_uri),
            Some(&container_uri),
        )
        .await
        .unwrap();
    let p = s.get(&format!("projects/{pid}")).await;
    assert_eq!(p["settings"]["notificationQueueUri"], queue_uri.as_str());
    assert_eq!(
        p["settings"]["exportModelContainerUri"],
        container_uri.as_str()
    );
    let msgs = s.messages(1).await;
    assert_eq!(
        parse(&msgs[0]).unwrap().notification,
        Notification::ConnectionTest { project_id: pid }
    );
    // An update that keeps the URIs sets nothing up again; one naming a missing container fails
    // and leaves the project as it was.
    let rsp = reqwest::Client::new()
        .patch(s.api(&format!("projects/{pid}")))
        .header("Training-Key", KEY)
        .json(&serde_json::json!({
            "name": "Renamed", "description": "", "settings": p["settings"].clone()
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let mut settings = p["settings"].clone();
    settings["exportModelContainerUri"] = Value::from(format!(
        "http://127.0.0.1:{}/devstoreaccount1/gone",
        s.azurite.blob_port
    ));
    let rsp = reqwest::Client::new()
        .patch(s.api(&format!("projects/{pid}")))
        .header("Training-Key", KEY)
        .json(&serde_json::json!({"name": "Again", "description": "", "settings": settings}))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 400);
    assert_eq!(
        rsp.json::<Value>().await.unwrap()["code"],
        "BadRequestInvalid"
    );
    let p = s.get(&format!("projects/{pid}")).await;
    assert_eq!(p["name"], "Renamed");
    assert_eq!(
        p["settings"]["exportModelContainerUri"],
        container_uri.as_str()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        s.messages_now().await.is_empty(),
        "no second ConnectionTest"
    );
}
