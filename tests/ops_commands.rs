//! The operator commands against Azurite and the stand-in: `history`, `check`, `replay`.

use cvchain_azure::storage::{clients::StorageClients, queue::send_text};
use cvchain_standin::{Standin, StandinConfig};
use cvchain_testkit::{Azurite, unique};
use serde_json::{Value, json};
use std::process::{Command, Output};

fn cvchain(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cvchain"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn history_shows_iterations_with_their_exports() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table_name = unique("History");
    let table = clients.table(&table_name).unwrap();
    table.create_if_missing().await.unwrap();
    for e in [
        json!({"PartitionKey": "p1", "RowKey": "Training_i1_TrainingCompleted", "EventType": "Training",
            "ProjectId": "p1", "ProjectName": "Widgets", "IterationId": "i1", "IterationName": "Iteration 4",
            "Status": "TrainingCompleted", "TrainedAt": "2026-11-26T10:00:00.0000000Z",
            "Precision": 0.912, "Recall": 0.871, "AveragePrecision": 0.9}),
        json!({"PartitionKey": "p1", "RowKey": "ExportStep_i1_ONNX", "EventType": "ExportStep",
            "IterationId": "i1", "Platform": "ONNX", "Flavor": "", "ChainPosition": 1, "Status": "Done",
            "ReleasePath": "Widgets/Iteration-4/ONNX.zip"}),
    ] {
        table.insert(e.as_object().unwrap()).await.unwrap();
    }
    let env = [
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_HISTORY_TABLE", table_name.clone()),
    ];
    let out = cvchain(&["history"], &env);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("Widgets") && t.contains("Iteration 4") && t.contains("91.2%"),
        "{t}"
    );
    assert!(t.contains("→ Widgets/Iteration-4/ONNX.zip"), "{t}");

    let out = cvchain(&["history", "--project", "p1", "--json"], &env);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["iterationName"], "Iteration 4");
    assert_eq!(
        v[0]["exports"][0]["releasePath"],
        "Widgets/Iteration-4/ONNX.zip"
    );

    let out = cvchain(&["history", "--rows"], &env);
    assert!(text(&out).contains("(2 rows)"), "{}", text(&out));
    let out = cvchain(&["history", "--project", "nobody"], &env);
    assert!(text(&out).contains("no trained iterations recorded yet"));
}

#[tokio::test]
async fn check_reaches_everything_and_names_what_to_fix() {
    let azurite = Azurite::start();
    let standin = Standin::start(StandinConfig {
        training_key: "right-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let base = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", "right-key".to_owned()),
        (
            "CVCHAIN_BACKUP_CONTAINER",
            format!(
                "http://127.0.0.1:{}/devstoreaccount1/cvbackups",
                azurite.blob_port
            ),
        ),
    ];
    // The binary runs its own runtime: run it off this test's runtime thread.
    let run = |env: Vec<(&'static str, String)>| {
        tokio::task::spawn_blocking(move || cvchain(&["check"], &env))
    };
    let out = run(base.clone()).await.unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for line in [
        "✓ settings valid",
        "✓ queue customvision-notifications",
        "✓ queue customvision-notifications-poison",
        "✓ table CustomVisionHistory",
        "✓ release container models",
        "✓ backup container cvbackups",
        "credentials accepted",
        "✓ telemetry: off",
    ] {
        assert!(t.contains(line), "missing {line:?}:\n{t}");
    }

    // Telemetry: where it goes, never the connection string; a setting it cannot use fails.
    let mut telemetry = base.clone();
    telemetry.push((
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "InstrumentationKey=0f3c1a2b-1111-2222-3333-444455556666;IngestionEndpoint=https://swedencentral-0.in.applicationinsights.azure.com/".into(),
    ));
    telemetry.push((
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        "Authorization=AAD".into(),
    ));
    let out = run(telemetry.clone()).await.unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("✓ telemetry: Application Insights (Microsoft Entra ID)"),
        "{t}"
    );
    assert!(
        !t.contains("0f3c1a2b") && !t.contains("swedencentral-0"),
        "{t}"
    );
    telemetry.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318".into()));
    let out = run(telemetry).await.unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("✗ telemetry: OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{t}"
    );

    let mut wrong_key = base.clone();
    wrong_key[0].1 = azurite.connection_string().replace(
        cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
        "d3JvbmdrZXl3cm9uZ2tleXdyb25na2V5d3JvbmdrZXk=",
    );
    let out = run(wrong_key).await.unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("✗ queue customvision-notifications"), "{t}");
    assert!(t.contains("fix the key or SAS in CVCHAIN_STORAGE"), "{t}");
    assert!(!t.contains("d3JvbmdrZXl3"), "{t}");

    let mut wrong_cv = base.clone();
    wrong_cv[2].1 = "wrong-key".into();
    let out = run(wrong_cv).await.unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("fix CUSTOM_VISION_TRAINING_KEY"), "{t}");
    assert!(!t.contains("wrong-key"), "{t}");

    let mut bad_setting = base;
    bad_setting.push(("CVCHAIN_EXPORTS", "Caffe".into()));
    let out = run(bad_setting).await.unwrap();
    assert!(
        text(&out).contains("setting CVCHAIN_EXPORTS"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn replay_moves_poison_messages_back_and_records_each() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let queue = unique("rq");
    let poison = clients.queue(&format!("{queue}-poison")).unwrap();
    for i in 0..3 {
        send_text(&poison, &format!("{{\"n\":{i}}}")).await.unwrap();
    }
    let env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
    ];
    let out = tokio::task::spawn_blocking(move || cvchain(&["replay", "--limit", "2"], &env))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!(
        "moved 2 message(s) from {queue}-poison back to {queue}"
    )));
    assert_eq!(count(&clients.queue(&queue).unwrap()).await, 2);
    assert_eq!(count(&poison).await, 1);
    let rows = clients
        .table("CustomVisionHistory")
        .unwrap()
        .query(None, 100)
        .await
        .unwrap();
    let replayed: Vec<_> = rows
        .iter()
        .filter(|r| r.entity["PartitionKey"] == "_replayed")
        .collect();
    assert_eq!(replayed.len(), 2);
    assert!(replayed.iter().all(|r| r.entity["Status"] == "Replayed"));
}

async fn count(q: &azure_storage_queue::QueueClient) -> usize {
    q.peek_messages(Some(
        azure_storage_queue::models::QueueClientPeekMessagesOptions {
            number_of_messages: Some(32),
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_model()
    .unwrap()
    .items
    .unwrap_or_default()
    .len()
}

#[tokio::test]
async fn invoke_delivers_a_file_as_the_host_would() {
    let azurite = Azurite::start();
    let handler =
        cvchain_testkit::Handler::start(&[("CVCHAIN_STORAGE", azurite.connection_string())]);
    let fixture = format!(
        "{}/tests/fixtures/notifications/connection-test.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let url = handler.url("/");
    let out = tokio::task::spawn_blocking(move || {
        cvchain(&["invoke", "--url", &url, "--id", "inv-1", &fixture], &[])
    })
    .await
    .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.starts_with("HTTP 200 "), "{t}");
    assert!(
        t.contains(
            "recorded CustomVisionHistory/b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f/ConnectionTest_inv-1"
        ),
        "{t}"
    );
    // A handler that answers non-2xx makes invoke fail.
    let out = tokio::task::spawn_blocking(|| {
        cvchain(&["invoke", "--url", "http://127.0.0.1:9/", "-"], &[])
    })
    .await
    .unwrap();
    assert!(!out.status.success());
}
