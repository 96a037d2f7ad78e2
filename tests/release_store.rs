//! The release copy against Azurite: server-side copy, tags on both blobs, metadata, a current
//! copy left alone, a stale one replaced, a taken path never overwritten.

use azure_core::http::RequestContent;
use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
use cvchain_azure::storage::{
    blobs::ReleaseStore, clients::StorageClients, shared_key::blob_read_sas,
};
use cvchain_core::release::{
    DEFAULT_TEMPLATE, PathTemplate, ReleaseFacts, ReleaseNames, ReleasePlan, Source,
};
use cvchain_testkit::{Azurite, unique};
use std::collections::HashMap;
use url::Url;
use uuid::Uuid;

struct Setup {
    azurite: Azurite,
    clients: StorageClients,
    backup: String,
    release: String,
}

fn setup() -> Setup {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    Setup {
        clients,
        backup: unique("backup"),
        release: unique("models"),
        azurite,
    }
}

impl Setup {
    fn backup_url(&self) -> Url {
        Url::parse(&format!(
            "http://127.0.0.1:{}/devstoreaccount1/{}",
            self.azurite.blob_port, self.backup
        ))
        .unwrap()
    }

    fn store(&self) -> ReleaseStore {
        ReleaseStore::new(
            &self.clients,
            &self.release,
            Some(self.backup_url()),
            PathTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
        )
        .unwrap()
    }

    fn blob(&self, container: &str, name: &str) -> azure_storage_blob::BlobClient {
        self.clients
            .blob_service()
            .unwrap()
            .blob_container_client(container)
            .blob_client(name)
    }

    async fn put(
        &self,
        container: &str,
        name: &str,
        body: &[u8],
        meta: Option<HashMap<String, String>>,
    ) {
        let c = self
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client(container);
        let _ = c.create(None).await;
        let b = c.blob_client(name);
        b.upload(RequestContent::from(body.to_vec()), None)
            .await
            .unwrap();
        if let Some(m) = meta {
            b.set_metadata(&m, None).await.unwrap();
        }
    }

    async fn get(&self, container: &str, name: &str) -> Vec<u8> {
        self.blob(container, name)
            .download(None)
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .to_vec()
    }

    async fn tags(&self, container: &str, name: &str) -> HashMap<String, String> {
        self.blob(container, name)
            .get_tags(None)
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .into()
    }

    async fn etag(&self, container: &str, name: &str) -> String {
        self.blob(container, name)
            .get_properties(None)
            .await
            .unwrap()
            .etag()
            .unwrap()
            .unwrap()
            .to_string()
    }
}

fn names(project: Uuid, iteration: Uuid, project_name: &str) -> ReleaseNames {
    ReleaseNames {
        project_id: project,
        project_name: project_name.into(),
        iteration_id: iteration,
        iteration_name: "Iteration 2".into(),
        platform: "TensorFlow".into(),
        flavor: Some("TensorFlowLite".into()),
    }
}

fn facts() -> ReleaseFacts {
    ReleaseFacts {
        precision: Some(0.91),
        recall: Some(0.87),
        exported_at: "2026-11-26T10:00:00.0000000Z".into(),
    }
}

#[tokio::test]
async fn a_backup_is_copied_tagged_and_left_alone_once_current() {
    let s = setup();
    let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
    let backup_name = format!("{p} - {i}.TensorFlow");
    s.put(&s.backup, &backup_name, b"model v1", None).await;
    let plan = ReleasePlan {
        platform: "TensorFlow".into(),
        flavor: Some("TensorFlowLite".into()),
        source: Source::Backup {
            blob_name: backup_name.clone(),
        },
        fallback: None,
        expect_free: false,
    };
    let store = s.store();
    let done = store
        .release(&plan, &names(p, i, "Détecteur de widgets"), &facts())
        .await
        .unwrap();
    assert!(done.copied);
    assert_eq!(
        done.path,
        "D-tecteur-de-widgets/Iteration-2/TensorFlow-TensorFlowLite.zip"
    );
    assert_eq!(done.size, 8);
    assert!(done.url.ends_with(&format!(
        "/{}/D-tecteur-de-widgets/Iteration-2/TensorFlow-TensorFlowLite.zip",
        s.release
    )));
    assert_eq!(s.get(&s.release, &done.path).await, b"model v1");

    let want: HashMap<String, String> = [
        ("projectId", p.to_string()),
        ("iterationId", i.to_string()),
        ("platform", "TensorFlow".into()),
        ("flavor", "TensorFlowLite".into()),
        ("source", "customvision".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(s.tags(&s.release, &done.path).await, want);
    assert_eq!(s.tags(&s.backup, &backup_name).await, want);

    let meta = s
        .blob(&s.release, &done.path)
        .get_properties(None)
        .await
        .unwrap()
        .metadata()
        .unwrap();
    assert_eq!(meta["projectname"], "D%C3%A9tecteur de widgets");
    assert_eq!(meta["iterationname"], "Iteration 2");
    assert_eq!(meta["precision"], "0.9100");
    assert_eq!(meta["recall"], "0.8700");
    assert_eq!(meta["exportedat"], "2026-11-26T10:00:00.0000000Z");
    assert_eq!(meta["sourcelength"], "8");
    assert!(meta["source"].contains(&format!("/{}/", s.backup)));

    // The same export again: nothing is written.
    let etag = s.etag(&s.release, &done.path).await;
    let again = store
        .release(&plan, &names(p, i, "Détecteur de widgets"), &facts())
        .await
        .unwrap();
    assert!(!again.copied);
    assert_eq!(s.etag(&s.release, &done.path).await, etag);

    // A new backup (a re-export): the stale copy is replaced.
    s.put(&s.backup, &backup_name, b"model version 2", None)
        .await;
    let third = store
        .release(&plan, &names(p, i, "Détecteur de widgets"), &facts())
        .await
        .unwrap();
    assert!(third.copied);
    assert_eq!(s.get(&s.release, &done.path).await, b"model version 2");
}

#[tokio::test]
async fn a_path_taken_by_another_project_or_a_stranger_is_never_overwritten() {
    let s = setup();
    let store = s.store();
    let (p1, p2, i) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for p in [p1, p2] {
        s.put(
            &s.backup,
            &format!("{p} - {i}.TensorFlow"),
            p.to_string().as_bytes(),
            None,
        )
        .await;
    }
    let plan = |p: Uuid| ReleasePlan {
        platform: "TensorFlow".into(),
        flavor: Some("TensorFlowLite".into()),
        source: Source::Backup {
            blob_name: format!("{p} - {i}.TensorFlow"),
        },
        fallback: None,
        expect_free: false,
    };
    let first = store
        .release(&plan(p1), &names(p1, i, "Widgets"), &facts())
        .await
        .unwrap();
    assert_eq!(
        first.path,
        "Widgets/Iteration-2/TensorFlow-TensorFlowLite.zip"
    );
    // Another project with the same name: its ids make its path unique.
    let second = store
        .release(&plan(p2), &names(p2, i, "Widgets"), &facts())
        .await
        .unwrap();
    assert_eq!(
        second.path,
        format!("Widgets-{p2}/Iteration-2-{i}/TensorFlow-TensorFlowLite.zip")
    );
    assert_eq!(
        s.get(&s.release, &first.path).await,
        p1.to_string().as_bytes()
    );
    assert_eq!(
        s.get(&s.release, &second.path).await,
        p2.to_string().as_bytes()
    );

    // A file someone put there by hand (no cvchain metadata) is left alone too.
    let p3 = Uuid::new_v4();
    s.put(
        &s.release,
        "Gadgets/Iteration-2/TensorFlow-TensorFlowLite.zip",
        b"hand-made",
        None,
    )
    .await;
    s.put(
        &s.backup,
        &format!("{p3} - {i}.TensorFlow"),
        b"gadget",
        None,
    )
    .await;
    let third = store
        .release(&plan(p3), &names(p3, i, "Gadgets"), &facts())
        .await
        .unwrap();
    assert_ne!(
        third.path,
        "Gadgets/Iteration-2/TensorFlow-TensorFlowLite.zip"
    );
    assert_eq!(
        s.get(
            &s.release,
            "Gadgets/Iteration-2/TensorFlow-TensorFlowLite.zip"
        )
        .await,
        b"hand-made"
    );
}

#[tokio::test]
async fn a_download_uri_with_a_sas_is_copied_server_side() {
    let s = setup();
    let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
    let internal = unique("cvinternal");
    let name = format!("{p}/{i}/ONNX.zip");
    s.put(&internal, &name, b"onnx bytes", None).await;
    let sas = blob_read_sas(
        cvchain_azure::storage::settings::DEV_ACCOUNT,
        &azure_core::credentials::Secret::new(cvchain_azure::storage::settings::DEV_ACCOUNT_KEY),
        &internal,
        &name,
        "2099-01-01T00:00:00Z",
    )
    .unwrap();
    let url = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{internal}/{name}?{sas}",
        s.azurite.blob_port
    );
    let plan = ReleasePlan {
        platform: "ONNX".into(),
        flavor: None,
        source: Source::Download { url: url.clone() },
        fallback: None,
        expect_free: false,
    };
    let mut n = names(p, i, "Widgets");
    n.platform = "ONNX".into();
    n.flavor = None;
    let done = s.store().release(&plan, &n, &facts()).await.unwrap();
    assert_eq!(done.path, "Widgets/Iteration-2/ONNX.zip");
    assert_eq!(s.get(&s.release, &done.path).await, b"onnx bytes");
    let meta = s
        .blob(&s.release, &done.path)
        .get_properties(None)
        .await
        .unwrap()
        .metadata()
        .unwrap();
    assert!(!meta["source"].contains("sig"), "{meta:?}");
    assert_eq!(s.tags(&s.release, &done.path).await.len(), 4);
}

#[tokio::test]
async fn a_missing_backup_falls_back_to_the_download_uri() {
    let s = setup();
    let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
    let internal = unique("cvinternal");
    let name = format!("{p}/{i}/ONNX.zip");
    s.put(&internal, &name, b"from the service", None).await;
    let sas = blob_read_sas(
        cvchain_azure::storage::settings::DEV_ACCOUNT,
        &azure_core::credentials::Secret::new(cvchain_azure::storage::settings::DEV_ACCOUNT_KEY),
        &internal,
        &name,
        "2099-01-01T00:00:00Z",
    )
    .unwrap();
    let url = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{internal}/{name}?{sas}",
        s.azurite.blob_port
    );
    // The backup container exists, the backup blob does not.
    s.put(&s.backup, "unrelated", b"x", None).await;
    let plan = ReleasePlan {
        platform: "ONNX".into(),
        flavor: None,
        source: Source::Backup {
            blob_name: format!("{p} - {i}.ONNX"),
        },
        fallback: Some(url),
        expect_free: false,
    };
    let mut n = names(p, i, "Widgets");
    n.platform = "ONNX".into();
    n.flavor = None;
    let done = s.store().release(&plan, &n, &facts()).await.unwrap();
    assert_eq!(s.get(&s.release, &done.path).await, b"from the service");
    // Without a fallback, the missing backup is an error the message is retried for.
    let plan = ReleasePlan {
        fallback: None,
        expect_free: false,
        ..plan
    };
    let mut n2 = n.clone();
    n2.iteration_id = Uuid::new_v4();
    assert!(s.store().release(&plan, &n2, &facts()).await.is_err());
}
