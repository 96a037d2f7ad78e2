//! Microsoft's Custom Vision SDK for Python (pinned, installed by `scripts/python-sdk` into
//! `.venv-customvision`), unchanged, runs a training script against `cvchain standin` started as
//! a user starts it, while `cvchain worker` consumes the notifications the stand-in writes to
//! Azurite: the chain ends with the release copies of every export in the release container.
//! Every mistake the script makes on purpose must raise the SDK's CustomVisionErrorException
//! with the service's code (the script asserts each; this test checks the list).

use cvchain_azure::storage::clients::StorageClients;
use cvchain_testkit::{Azurite, Handler, free_port, repo_root, unique};
use futures::TryStreamExt;
use std::{collections::BTreeSet, process::Stdio, time::Duration};
use tokio::io::{AsyncBufReadExt, BufReader};

const KEY: &str = "python-sdk-test-key";

/// The venv's python, installed (once) by the same script a developer runs.
fn python() -> String {
    let out = std::process::Command::new(repo_root().join("scripts/python-sdk"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/python-sdk runs");
    assert!(out.status.success(), "scripts/python-sdk failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn microsofts_python_sdk_trains_against_the_stand_in_and_the_chain_releases_the_models() {
    let python = python();
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let queue = unique("sdkq");
    let (backup, release, table) = ("sdkbackups", "sdkmodels", unique("SdkHistory"));
    // The user's storage, made before the project names it.
    cvchain_testkit::standin::create_queue(&clients, &queue).await;
    cvchain_testkit::standin::create_container(&clients, backup).await;
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{queue}",
        azurite.queue_port
    );
    let container_uri = azurite.container_url(backup);

    // `cvchain standin`, as the README starts it; its first lines say the endpoint.
    let port = free_port();
    let mut standin = tokio::process::Command::new(cvchain_testkit::handler::cvchain_bin())
        .args([
            "standin",
            "--port",
            &port.to_string(),
            "--key",
            KEY,
            "--storage",
            &azurite.connection_string(),
            "--train-seconds",
            "0.3",
            "--export-seconds",
            "0.3",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(standin.stdout.take().unwrap()).lines();
    let mut endpoint = None;
    let mut banner = String::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
    {
        banner.push_str(&line);
        banner.push('\n');
        if let Some(e) = line.trim().strip_prefix("endpoint:") {
            endpoint = Some(e.trim().to_owned());
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let endpoint = endpoint.unwrap_or_else(|| panic!("no endpoint in:\n{banner}"));
    assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
    assert!(banner.contains(KEY), "{banner}");

    let worker = Handler::start_worker(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", endpoint.clone()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", "ONNX, TensorFlow:TensorFlowLite".into()),
        ("CVCHAIN_BACKUP_CONTAINER", container_uri.clone()),
        ("CVCHAIN_RELEASE_CONTAINER", release.into()),
        ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
        ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
        ("RUST_LOG", "warn".into()),
    ]);

    let script = repo_root().join("tests/python/train_with_sdk.py");
    let run = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(&script)
            .env("CV_ENDPOINT", &endpoint)
            .env("CV_KEY", KEY)
            .env("QUEUE_URI", &queue_uri)
            .env("CONTAINER_URI", &container_uri)
            .env(
                "MISSING_QUEUE_URI",
                format!(
                    "http://127.0.0.1:{}/devstoreaccount1/no-such-queue",
                    azurite.queue_port
                ),
            )
            .env(
                "PREDICTION_ID",
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/prediction",
            )
            .output(),
    )
    .await
    .expect("the script finished within two minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the SDK script failed:\n{stderr}\n{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let codes: BTreeSet<&str> = summary["errorCodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for code in [
        "BadRequestInvalidUri",
        "BadRequestTrainingValidationFailed",
        "BadRequestTagNameNotUnique",
        "BadRequestTrainingNotNeeded",
        "BadRequestExportAlreadyInProgress",
        "BadRequestExportValidationFailed",
        "NotFoundIteration",
        "BadRequestIterationIsPublished",
        "BadRequestIterationNotPublished",
        "BadRequestProjectUnsupportedExportPlatform",
        "NotFoundProject",
    ] {
        assert!(codes.contains(code), "{code} not met: {codes:?}");
    }
    let project = summary["projectId"].as_str().unwrap().to_owned();
    let iteration = summary["iterationId"].as_str().unwrap().to_owned();

    // The notifications drove the worker through the chain: ONNX and TensorFlow requested by
    // cvchain, VAIDK and OpenVino by the script, each copied to the release container, found
    // by the project's index tags.
    let service = clients.blob_service().unwrap();
    let filter = format!(
        "\"projectId\"='{project}' AND \"iterationId\"='{iteration}' AND \"source\"='customvision'"
    );
    let want: BTreeSet<&str> = ["ONNX", "TensorFlow", "VAIDK", "OpenVino"].into();
    let mut released = BTreeSet::new();
    // Two minutes: the script and the worker share the resource's 10 calls a second.
    for _ in 0..480 {
        released.clear();
        let mut pages = service
            .find_blobs_by_tags(&filter, None)
            .unwrap()
            .into_pages();
        while let Some(page) = pages.try_next().await.unwrap() {
            for b in page.into_model().unwrap().blob_items {
                if b.container_name.as_deref() != Some(release) {
                    continue;
                }
                let tags: std::collections::HashMap<String, String> = service
                    .blob_container_client(release)
                    .blob_client(b.name.as_deref().unwrap_or_default())
                    .get_tags(None)
                    .await
                    .unwrap()
                    .into_model()
                    .unwrap()
                    .into();
                if let Some(p) = tags.get("platform") {
                    released.insert(p.clone());
                }
            }
        }
        if want.iter().all(|p| released.contains(*p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let released: BTreeSet<&str> = released.iter().map(String::as_str).collect();
    assert_eq!(
        released,
        want,
        "release copies; worker log:\n{}",
        worker.stderr()
    );
    cvchain_testkit::assert_no_secrets(
        "the worker's logs",
        &worker.stderr(),
        &[KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY],
    );
    drop(worker);
    let _ = standin.kill().await;
}
