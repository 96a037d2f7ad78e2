//! Plays the Functions host against `cvchain serve`, exactly as the reference describes it:
//! readiness on `GET /`, POSTs with the double-encoded envelope, answers read as the host reads
//! them, and rows checked in Azurite's table.

use base64::Engine as _;
use cvchain_azure::storage::{clients::StorageClients, table::StoredEntity};
use cvchain_testkit::{Azurite, Handler, fixture, host_envelope, unique};
use serde_json::Value;
use std::time::Duration;

struct Setup {
    azurite: Azurite,
    handler: Handler,
    queue: String,
    table: String,
    http: reqwest::Client,
}

fn setup() -> Setup {
    let azurite = Azurite::start();
    let queue = unique("cvq");
    let table = unique("History");
    let handler = Handler::start(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
    ]);
    Setup {
        azurite,
        handler,
        queue,
        table,
        http: reqwest::Client::new(),
    }
}

impl Setup {
    /// POSTs as the host does and returns (status, content-type, body).
    async fn deliver(&self, text: &str, id: &str, dequeue: u32) -> (u16, String, Value) {
        self.post(host_envelope(text, id, dequeue)).await
    }

    async fn post(&self, body: String) -> (u16, String, Value) {
        let rsp = self
            .http
            .post(self.handler.url("/CustomVisionNotification"))
            .header("content-type", "application/json; charset=utf-8")
            .header(
                "x-azure-functions-invocationid",
                uuid::Uuid::new_v4().to_string(),
            )
            .header("x-azure-functions-hostversion", "4.1037.0.0")
            .header("user-agent", "Azure-Functions-Host/4.1037.0.0")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = rsp.status().as_u16();
        let ctype = rsp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = rsp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, ctype, body)
    }

    fn clients(&self) -> StorageClients {
        StorageClients::new(&self.azurite.storage_settings()).unwrap()
    }

    async fn rows(&self) -> Vec<StoredEntity> {
        let table = self.clients().table(&self.table).unwrap();
        table.query(None, 10_000).await.unwrap()
    }

    async fn poison_messages(&self) -> Vec<String> {
        let q = self
            .clients()
            .queue(&format!("{}-poison", self.queue))
            .unwrap();
        let got = match q
            .peek_messages(Some(
                azure_storage_queue::models::QueueClientPeekMessagesOptions {
                    number_of_messages: Some(32),
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(rsp) => rsp.into_model().unwrap(),
            // No poison queue yet: nothing was ever copied there.
            Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                return Vec::new();
            }
            Err(e) => panic!("peek poison queue: {e}"),
        };
        got.items
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.message_text)
            .collect()
    }
}

fn assert_handled(status: u16, ctype: &str, body: &Value) {
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert_eq!(body["Outputs"], serde_json::json!({}), "{body}");
    assert!(body["Logs"].is_array(), "{body}");
    assert_eq!(body["ReturnValue"], Value::Null, "{body}");
}

fn find<'a>(rows: &'a [StoredEntity], pk: &str, rk: &str) -> &'a StoredEntity {
    rows.iter()
        .find(|r| r.entity["PartitionKey"] == pk && r.entity["RowKey"] == rk)
        .unwrap_or_else(|| panic!("no row {pk}/{rk} in {rows:#?}"))
}

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

#[tokio::test]
async fn the_three_documented_notifications_become_rows_and_redelivery_changes_nothing() {
    let s = setup();
    let messages = [
        (
            "connection-test.json",
            "11111111-0000-0000-0000-000000000001",
        ),
        (
            "training-completed.json",
            "11111111-0000-0000-0000-000000000002",
        ),
        (
            "export-completed.json",
            "11111111-0000-0000-0000-000000000003",
        ),
    ];
    for (name, id) in messages {
        let (status, ctype, body) = s.deliver(&fixture(name), id, 1).await;
        assert_handled(status, &ctype, &body);
        let logs = body["Logs"].to_string();
        assert!(logs.contains("recorded"), "{name}: {logs}");
    }
    let rows = s.rows().await;
    assert_eq!(rows.len(), 3, "{rows:#?}");

    let ct = find(
        &rows,
        P,
        "ConnectionTest_11111111-0000-0000-0000-000000000001",
    );
    assert_eq!(ct.entity["EventType"], "ConnectionTest");
    assert_eq!(ct.entity["ProjectId"], P);
    assert_eq!(
        ct.entity["MessageId"],
        "11111111-0000-0000-0000-000000000001"
    );
    assert_eq!(ct.entity["DequeueCount"], 1);
    assert_eq!(ct.entity["Raw"], fixture("connection-test.json"));

    let tr = find(&rows, P, &format!("Training_{I}_TrainingCompleted"));
    assert_eq!(tr.entity["EventType"], "Training");
    assert_eq!(tr.entity["IterationId"], I);
    assert_eq!(tr.entity["Status"], "TrainingCompleted");
    assert!(tr.entity["ReceivedAt"].as_str().unwrap().starts_with("20"));

    let ex = find(&rows, P, &format!("Export_{I}_ONNX_ExportCompleted"));
    assert_eq!(ex.entity["Status"], "ExportCompleted");
    assert_eq!(ex.entity["ModelPlatform"], "ONNX");

    // The host redelivers each message (a crash after processing, a lost ack): nothing changes,
    // not even an ETag or Timestamp.
    for (name, id) in messages {
        let (status, ctype, body) = s.deliver(&fixture(name), id, 2).await;
        assert_handled(status, &ctype, &body);
        assert!(
            body["Logs"].to_string().contains("already recorded"),
            "{body}"
        );
    }
    assert_eq!(s.rows().await, rows);
    assert!(s.poison_messages().await.is_empty());
}

#[tokio::test]
async fn variants_unknown_kinds_and_base64_are_recorded() {
    let s = setup();
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(fixture("export-completed-sas-reordered.json"));
    let cases = [
        (fixture("training-failed.json"), "m-1"),
        (fixture("training-completed-pascal.json"), "m-2"),
        (fixture("unknown-type.json"), "m-3"),
        (fixture("unknown-version.json"), "m-4"),
        (b64, "m-5"),
        (format!("\u{feff}{}", fixture("export-failed.json")), "m-6"),
    ];
    for (text, id) in &cases {
        let (status, ctype, body) = s.deliver(text, id, 1).await;
        assert_handled(status, &ctype, &body);
    }
    let rows = s.rows().await;
    assert_eq!(rows.len(), cases.len(), "{rows:#?}");
    find(&rows, P, &format!("Training_{I}_TrainingFailed"));
    find(&rows, P, &format!("Training_{I}_TrainingCompleted"));
    let unknown = find(&rows, P, "Unknown_m-3");
    assert_eq!(unknown.entity["UnknownType"], "Publish");
    let unknown = find(&rows, P, "Unknown_m-4");
    assert_eq!(unknown.entity["Version"], "2.0");
    let sas = find(&rows, P, &format!("Export_{I}_msg-m-5_ExportCompleted"));
    assert_eq!(sas.entity["Encoding"], "base64");
    assert_eq!(
        sas.entity["ModelUri"],
        "https://cvstore.blob.core.windows.net/exports/model.zip"
    );
    find(&rows, P, &format!("Export_{I}_msg-m-6_ExportFailed"));
    // No SAS signature anywhere in the table, nor in the logs.
    let all = serde_json::to_string(&rows.iter().map(|r| &r.entity).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains("SECRETsignatureVALUE"), "{all}");
    let secrets = [cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
    cvchain_testkit::assert_no_secrets("the history rows", &all, &secrets);
    cvchain_testkit::assert_no_secrets("the handler's logs", &s.handler.stderr(), &secrets);
}

#[tokio::test]
async fn a_malformed_message_is_answered_200_recorded_and_copied_to_poison() {
    let s = setup();
    let bad = r#"{"version":"1.0","type":"Training","Content":{"projectId":"not-a-uuid","iterationId":"x","trainingStatus":"TrainingCompleted"}}"#;
    let (status, ctype, body) = s.deliver(bad, "bad-1", 1).await;
    assert_handled(status, &ctype, &body);
    assert!(
        body["Logs"].to_string().contains("Content.projectId"),
        "{body}"
    );

    let rows = s.rows().await;
    let row = find(&rows, "_rejected", "bad-1");
    assert_eq!(row.entity["EventType"], "Rejected");
    assert_eq!(row.entity["Field"], "Content.projectId");
    assert_eq!(row.entity["PoisonCopy"], "sent");
    assert_eq!(row.entity["Raw"], bad);
    assert_eq!(s.poison_messages().await, vec![bad.to_owned()]);

    // Redelivered: still one row, still one poison copy.
    let (status, _, _) = s.deliver(bad, "bad-1", 2).await;
    assert_eq!(status, 200);
    assert_eq!(s.rows().await, rows);
    assert_eq!(s.poison_messages().await.len(), 1);

    // Not even an envelope: recorded with the body as it came.
    let (status, ctype, body) = s.post("this is not an envelope".into()).await;
    assert_handled(status, &ctype, &body);
    let rows = s.rows().await;
    let unreadable = rows
        .iter()
        .find(|r| r.entity["Raw"] == "this is not an envelope")
        .expect("a row for the unreadable body");
    assert_eq!(unreadable.entity["PartitionKey"], "_rejected");
    assert!(
        unreadable.entity["Reason"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
    assert_eq!(s.poison_messages().await.len(), 2);
}

#[tokio::test]
async fn storage_outage_answers_non_2xx_after_logging_to_stderr_then_recovers() {
    let mut s = setup();
    s.azurite.stop();
    let (status, _, _) = s
        .deliver(&fixture("training-completed.json"), "m-1", 1)
        .await;
    assert_eq!(status, 500);
    let stderr = s.handler.stderr();
    assert!(stderr.contains("invocation failed"), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");

    s.azurite.restart();
    let (status, ctype, body) = s
        .deliver(&fixture("training-completed.json"), "m-1", 2)
        .await;
    assert_handled(status, &ctype, &body);
    assert_eq!(s.rows().await.len(), 1);
}

#[tokio::test]
async fn readiness_and_graceful_shutdown_follow_the_host_protocol() {
    let mut s = setup();
    let rsp = s.http.get(s.handler.url("/")).send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    let rsp = s
        .http
        .post(s.handler.url("/Other"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 404);
    assert!(
        rsp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let status = s
        .handler
        .signal_and_wait("TERM", Duration::from_secs(25))
        .expect("cvchain serve should exit after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(s.handler.stderr().contains("shutdown requested"));
}

/// `GET /` answers as soon as the port is bound, before the clients and the processor are built
/// (start-up builds them after the first answer): an invocation that comes before any probe
/// waits for them and is handled as any other.
#[tokio::test]
async fn an_invocation_sent_before_readiness_waits_for_the_start_and_is_handled() {
    let azurite = Azurite::start();
    let table = unique("History");
    let port = cvchain_testkit::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("serve")
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("CVCHAIN_STORAGE", azurite.connection_string())
        .env("CVCHAIN_HISTORY_TABLE", &table)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/CustomVisionNotification");
    let started = std::time::Instant::now();
    // Sent again only while nothing listens yet (refused before the port is bound).
    let rsp = loop {
        match http
            .post(&url)
            .body(host_envelope(
                &fixture("connection-test.json"),
                "22222222-0000-0000-0000-000000000001",
                1,
            ))
            .send()
            .await
        {
            Ok(rsp) => break rsp,
            Err(e) if e.is_connect() && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let status = rsp.status().as_u16();
    let body: Value = rsp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["Logs"].to_string().contains("recorded"), "{body}");
    let rows = StorageClients::new(&azurite.storage_settings())
        .unwrap()
        .table(&table)
        .unwrap()
        .query(None, 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn invalid_settings_stop_the_handler_with_the_setting_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("serve")
        .env_clear()
        .env("CVCHAIN_STORAGE", "UseDevelopmentStorage=true")
        .env("CVCHAIN_QUEUE", "Not_A_Queue")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("setting CVCHAIN_QUEUE"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("serve")
        .env_clear()
        .env(
            "CVCHAIN_STORAGE",
            "AccountName=a;AccountKey=not*base64*secret",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("setting CVCHAIN_STORAGE"), "{stderr}");
    assert!(!stderr.contains("not*base64*secret"), "{stderr}");
}

#[tokio::test]
async fn logs_are_json_on_request_and_follow_rust_log() {
    let azurite = Azurite::start();
    let mut handler = Handler::start(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_LOG_FORMAT", "json".into()),
    ]);
    let http = reqwest::Client::new();
    http.post(handler.url("/CustomVisionNotification"))
        .body(host_envelope(&fixture("connection-test.json"), "j-1", 1))
        .send()
        .await
        .unwrap();
    handler
        .signal_and_wait("TERM", Duration::from_secs(25))
        .unwrap();
    let stderr = handler.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{stderr}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(stderr.contains("notification recorded"));
    // No account key in any line, even though the settings were logged.
    assert!(!stderr.contains(cvchain_azure::storage::settings::DEV_ACCOUNT_KEY));

    let mut quiet = Handler::start(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("RUST_LOG", "warn".into()),
    ]);
    http.post(quiet.url("/CustomVisionNotification"))
        .body(host_envelope(&fixture("connection-test.json"), "j-2", 1))
        .send()
        .await
        .unwrap();
    quiet
        .signal_and_wait("TERM", Duration::from_secs(25))
        .unwrap();
    assert!(
        !quiet.stderr().contains("notification recorded"),
        "{}",
        quiet.stderr()
    );
}

#[test]
#[should_panic(expected = "contains a SAS signature")]
fn the_secret_scan_catches_a_signature() {
    cvchain_testkit::assert_no_secrets("a log line", "GET https://a/b?sv=1&sig=abc123", &[]);
}

#[test]
#[should_panic(expected = "contains a secret")]
fn the_secret_scan_catches_a_key() {
    cvchain_testkit::assert_no_secrets("a row", "key is hunter2", &["hunter2"]);
}

#[test]
fn the_secret_scan_passes_redacted_text() {
    cvchain_testkit::assert_no_secrets(
        "a row",
        "https://a/b?sv=1&sig=REDACTED and design=x",
        &["k"],
    );
}
