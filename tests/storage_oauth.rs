//! Production uses managed identity: the same storage code against Azurite with `--oauth basic`
//! over https (a test CA), with Microsoft Entra ID tokens instead of an account key.

use azure_core::http::RequestContent;
use cvchain::process::Processor;
use cvchain_azure::storage::{
    StorageError, blobs::ReleaseStore, clients::StorageClients, queue::send_text,
};
use cvchain_core::message::Received;
use cvchain_core::release::{
    DEFAULT_TEMPLATE, PathTemplate, ReleaseFacts, ReleaseNames, ReleasePlan, Source,
};
use cvchain_testkit::{Azurite, AzuriteTokenCredential, TestCa, unique};
use serde_json::json;
use std::sync::{Arc, atomic::Ordering};
use std::time::Duration;
use uuid::Uuid;

fn token_clients(azurite: &Azurite, ca: &TestCa) -> (StorageClients, Arc<AzuriteTokenCredential>) {
    let cred = Arc::new(AzuriteTokenCredential::default());
    let clients = StorageClients::with_credential(&azurite.identity_settings(), cred.clone())
        .with_transport(ca.transport());
    (clients, cred)
}

#[tokio::test]
async fn tables_queues_and_release_copies_work_with_tokens_over_https() {
    let ca = TestCa::generate();
    let azurite = Azurite::builder().oauth(&ca).start();
    let (clients, cred) = token_clients(&azurite, &ca);

    let table = clients.table(&unique("Oauth")).unwrap();
    table.create_if_missing().await.unwrap();
    let mut e = serde_json::Map::new();
    e.insert("PartitionKey".into(), json!("p"));
    e.insert("RowKey".into(), json!("r"));
    e.insert("V".into(), json!(1));
    table.insert(&e).await.unwrap();
    assert_eq!(table.get("p", "r").await.unwrap().unwrap().entity["V"], 1);
    assert_eq!(table.query(None, 10).await.unwrap().len(), 1);
    // The outbox's transactions carry the same bearer token.
    e.insert("RowKey".into(), json!("r2"));
    assert_eq!(
        table
            .transact(&[cvchain_azure::storage::table::BatchOp::Insert(e.clone())])
            .await
            .unwrap(),
        cvchain_azure::storage::table::BatchOutcome::Committed
    );
    assert_eq!(table.query(None, 10).await.unwrap().len(), 2);

    send_text(&clients.queue(&unique("oauth")).unwrap(), "hello")
        .await
        .unwrap();

    // A release copy from a backup blob in the same account.
    let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
    let backup = unique("backup");
    let container = clients
        .blob_service()
        .unwrap()
        .blob_container_client(&backup);
    container.create(None).await.unwrap();
    let name = format!("{p} - {i}.ONNX");
    container
        .blob_client(&name)
        .upload(RequestContent::from(b"onnx over oauth".to_vec()), None)
        .await
        .unwrap();
    let backup_url = url::Url::parse(&format!(
        "https://127.0.0.1:{}/devstoreaccount1/{backup}",
        azurite.blob_port
    ))
    .unwrap();
    let store = ReleaseStore::new(
        &clients,
        &unique("models"),
        Some(backup_url),
        PathTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
    )
    .unwrap();
    let names = ReleaseNames {
        project_id: p,
        project_name: "Widgets".into(),
        iteration_id: i,
        iteration_name: "Iteration 1".into(),
        platform: "ONNX".into(),
        flavor: None,
    };
    let plan = ReleasePlan {
        platform: "ONNX".into(),
        flavor: None,
        source: Source::Backup {
            blob_name: name.clone(),
        },
        fallback: None,
        expect_free: false,
    };
    let done = store
        .release(&plan, &names, &ReleaseFacts::default())
        .await
        .unwrap();
    assert!(done.copied);
    assert_eq!(done.size, 15);
    assert!(done.url.starts_with("https://"));
    let again = store
        .release(&plan, &names, &ReleaseFacts::default())
        .await
        .unwrap();
    assert!(!again.copied);
    assert!(cred.requests.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn an_unusable_token_is_a_clear_denial() {
    #[derive(Debug)]
    struct Garbage;
    #[async_trait::async_trait]
    impl azure_core::credentials::TokenCredential for Garbage {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            Ok(azure_core::credentials::AccessToken::new(
                azure_core::credentials::Secret::new("not-a-jwt"),
                azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            ))
        }
    }
    let ca = TestCa::generate();
    let azurite = Azurite::builder().oauth(&ca).start();
    let clients = StorageClients::with_credential(&azurite.identity_settings(), Arc::new(Garbage))
        .with_transport(ca.transport());
    let err = clients
        .table("Denied")
        .unwrap()
        .create_if_missing()
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Denied { .. }), "{err:?}");
    assert!(!err.to_string().contains("not-a-jwt"));
}

#[tokio::test]
async fn the_whole_release_path_runs_with_tokens() {
    use cvchain_standin::{COMPACT_DOMAIN, Standin};
    let ca = TestCa::generate();
    let azurite = Azurite::builder().oauth(&ca).start();
    let (clients, _) = token_clients(&azurite, &ca);
    let standin = Standin::start(cvchain_testkit::standin_config(&clients, "k", 20))
        .await
        .unwrap();
    let queue = unique("q");
    let backup = format!(
        "https://127.0.0.1:{}/devstoreaccount1/cvbackups",
        azurite.blob_port
    );
    let vars: std::collections::HashMap<String, String> = [
        ("CVCHAIN_STORAGE__accountName", "unused".to_owned()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", "k".into()),
        ("CVCHAIN_EXPORTS", "ONNX".into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings =
        cvchain::settings::Settings::from_lookup(&move |k| vars.get(k).cloned()).unwrap();
    let cv = cvchain_azure::customvision::training_client(settings.custom_vision.as_ref().unwrap())
        .unwrap();
    let processor = Processor::new(&settings, &clients, Some(Arc::new(cv))).unwrap();

    let api = cvchain_testkit::StandinApi::with_storage(&standin.endpoint(), "k", &clients);
    let queue_uri = format!(
        "https://127.0.0.1:{}/devstoreaccount1/{queue}",
        azurite.queue_port
    );
    let pid = api
        .create_project(&[
            ("name", "Widgets"),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", queue_uri.as_str()),
            ("exportModelContainerUri", backup.as_str()),
        ])
        .await;
    api.train(pid).await;

    // Take messages off the queue and process them in-process, until the export is released.
    let q = clients.queue(&queue).unwrap();
    let mut exports_seen = 0;
    for _ in 0..300 {
        let got = q
            .receive_messages(None)
            .await
            .ok()
            .and_then(|r| r.into_model().ok())
            .and_then(|m| m.items)
            .unwrap_or_default();
        for m in got {
            let text = m.message_text.clone().unwrap_or_default();
            let received = Received {
                text: text.clone(),
                message_id: m.message_id.clone(),
                dequeue_count: 1,
                received_at: time::OffsetDateTime::now_utc(),
            };
            processor
                .process(&cvchain_core::message::Incoming::decode(received.clone()))
                .await
                .unwrap();
            q.delete_message(
                m.message_id.as_deref().unwrap(),
                m.pop_receipt.as_deref().unwrap(),
                None,
            )
            .await
            .unwrap();
            if text.contains("ExportCompleted") {
                exports_seen += 1;
            }
        }
        if exports_seen == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(exports_seen, 1);
    let bytes =
        cvchain_testkit::blob_bytes(&clients, "models", "Widgets/Iteration-1/ONNX.zip").await;
    assert_eq!(bytes.len(), 64 * 1024);
}

/// Under Microsoft Entra ID a download link is a user delegation SAS: the key comes from Get
/// User Delegation Key (asked once, then reused), and the link reads its one blob with no other
/// credential.
#[tokio::test]
async fn a_download_link_under_a_token_is_a_user_delegation_sas() {
    use cvchain_azure::storage::links::Links;
    let ca = TestCa::generate();
    let azurite = Azurite::builder().oauth(&ca).start();
    let (clients, cred) = token_clients(&azurite, &ca);
    let name = unique("models");
    let container = clients.blob_service().unwrap().blob_container_client(&name);
    container.create(None).await.unwrap();
    for blob in [
        "Widgets/Iteration-1/ONNX.zip",
        "Widgets/Iteration-2/ONNX.zip",
    ] {
        container
            .blob_client(blob)
            .upload(RequestContent::from(blob.as_bytes().to_vec()), None)
            .await
            .unwrap();
    }
    let links = Links::new(&clients);
    let now = time::OffsetDateTime::now_utc();
    let url = links
        .read_url(&name, "Widgets/Iteration-1/ONNX.zip", now)
        .await
        .unwrap()
        .expect("a link under a token");
    let q = url.query().unwrap().to_owned();
    assert!(
        q.contains("skoid=") && q.contains("sr=b") && q.contains("sp=r"),
        "{q}"
    );
    assert!(q.contains("spr=https"), "{q}");
    assert!(cred.requests.load(Ordering::Relaxed) >= 1);
    // No token, no key: the link alone.
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.ca_cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let got = http.get(url.as_str()).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.bytes().await.unwrap().as_ref(),
        b"Widgets/Iteration-1/ONNX.zip"
    );
    let other = url.as_str().replace("Iteration-1", "Iteration-2");
    assert_eq!(http.get(other).send().await.unwrap().status(), 403);
    // A link made a minute later reuses the delegation key (the same key start).
    let second = links
        .read_url(
            &name,
            "Widgets/Iteration-2/ONNX.zip",
            now + time::Duration::minutes(1),
        )
        .await
        .unwrap()
        .unwrap();
    let skt = |u: &url::Url| {
        u.query_pairs()
            .find(|(k, _)| k == "skt")
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(skt(&url), skt(&second));
    assert_eq!(
        http.get(second.as_str()).send().await.unwrap().status(),
        200
    );
}
