//! Hostile and malformed input, table-driven: each input with the error it must produce. No
//! panic, and nothing grows beyond the input: the parser refuses over 64 KiB and serde_json's
//! recursion limit stops deep nesting.

use base64::Engine as _;
use cvchain_core::envelope::{EnvelopeError, TRIGGER_BINDING, decode_queue_invocation};
use cvchain_core::notification::{MAX_MESSAGE_BYTES, parse};

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn training(content: &str) -> String {
    format!(r#"{{"version":"1.0","type":"Training","Content":{content}}}"#)
}

fn training_with(project: &str, iteration: &str, status: &str) -> String {
    training(&format!(
        r#"{{"projectId":{project},"iterationId":{iteration},"trainingStatus":{status}}}"#
    ))
}

fn export_with(model_uri: &str) -> String {
    format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":{model_uri}}}}}"#
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// (name, message text, expected error text)
fn cases() -> Vec<(&'static str, String, String)> {
    let q = |s: &str| format!("\"{s}\"");
    let (p, i) = (q(P), q(I));
    let done = q("TrainingCompleted");
    vec![
        ("empty", String::new(), "message is empty".into()),
        ("blank", " \t\r\n ".into(), "message is empty".into()),
        ("bom only", "\u{feff}".into(), "message is empty".into()),
        ("truncated object", "{".into(), "invalid JSON at line 1, column 1: EOF while parsing an object".into()),
        ("truncated value", r#"{"type":"#.into(), "invalid JSON at line 1, column 8: EOF while parsing a value".into()),
        ("truncated string", r#"{"type":"Train"#.into(), "invalid JSON at line 1, column 14: EOF while parsing a string".into()),
        ("trailing comma", r#"{"type":"Training",}"#.into(), "invalid JSON at line 1, column 20: trailing comma".into()),
        ("NaN", r#"{"type":NaN}"#.into(), "invalid JSON at line 1, column 9: expected value".into()),
        ("single quotes", "{'type':'Training'}".into(), "invalid JSON at line 1, column 2: key must be a string".into()),
        ("array", "[]".into(), "message JSON must be an object, found an array".into()),
        ("array of messages", format!("[{}]", training_with(&p, &i, &done)), "message JSON must be an object, found an array".into()),
        ("no type", "{}".into(), "missing field `type`".into()),
        ("type null", r#"{"type":null}"#.into(), "field `type` must be a string, found null".into()),
        ("type array", r#"{"type":["Training"]}"#.into(), "field `type` must be a string, found an array".into()),
        ("type object", r#"{"type":{}}"#.into(), "field `type` must be a string, found an object".into()),
        ("type bool", r#"{"type":true}"#.into(), "field `type` must be a string, found a boolean".into()),
        ("version object", r#"{"type":"Training","version":{}}"#.into(), "field `version` must be a string, found an object".into()),
        ("no content", r#"{"version":"1.0","type":"Training"}"#.into(), "missing field `Content`".into()),
        ("content array", training("[]"), "field `Content` must be an object, found an array".into()),
        ("content null", training("null"), "field `Content` must be an object, found null".into()),
        ("project number", training_with("123", &i, &done), "field `Content.projectId` must be a string, found a number".into()),
        ("huge number", training_with("123456789012345678901234567890", &i, &done), "field `Content.projectId` must be a string, found a number".into()),
        ("number out of range", training_with("1e400", &i, &done), "invalid JSON at line 1, column 63: number out of range".into()),
        ("project empty", training_with(&q(""), &i, &done), "field `Content.projectId` must be a UUID, found \"\"".into()),
        ("path traversal id", training_with(&q("../../etc/passwd"), &i, &done), "field `Content.projectId` must be a UUID, found \"../../etc/passwd\"".into()),
        ("odata injection id", training_with(&q("x' or PartitionKey ne '"), &i, &done), "field `Content.projectId` must be a UUID, found \"x' or PartitionKey ne '\"".into()),
        ("uuid then traversal", training_with(&q(&format!("{P}/../x")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"{P}/../x\"")),
        ("uuid without hyphens", training_with(&q(&P.replace('-', "")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"{}\"", P.replace('-', ""))),
        ("urn uuid", training_with(&q(&format!("urn:uuid:{P}")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"urn:uuid:{P}\"")),
        ("control characters in id", training_with(&q("\\u0000\\u001b[31m"), &i, &done), "field `Content.projectId` must be a UUID, found \"??[31m\"".into()),
        ("no iteration", training(&format!(r#"{{"projectId":{p},"trainingStatus":{done}}}"#)), "missing field `Content.iterationId`".into()),
        ("iteration null", training_with(&p, "null", &done), "field `Content.iterationId` must be a string, found null".into()),
        ("status empty", training_with(&p, &i, &q("")), "field `Content.trainingStatus` has unknown value \"\"; expected one of TrainingCompleted, TrainingFailed".into()),
        ("status injection", training_with(&p, &i, &q("TrainingCompleted; DROP TABLE")), "field `Content.trainingStatus` has unknown value \"TrainingCompleted; DROP TABLE\"; expected one of TrainingCompleted, TrainingFailed".into()),
        ("status number", training_with(&p, &i, "1"), "field `Content.trainingStatus` must be a string, found a number".into()),
        ("no export status", format!(r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}"}}}}"#), "missing field `Content.exportStatus`".into()),
        ("javascript uri", export_with(&q("javascript:alert(1)")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("file uri", export_with(&q("file:///etc/passwd")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("hostless uri", export_with(&q("http://")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("uri object", export_with("{}"), "field `Content.modelUri` must be a string, found an object".into()),
        ("content twice", r#"{"version":"1.0","type":"Training","Content":{},"content":{}}"#.into(), "field `content` appears more than once (keys are matched case-insensitively)".into()),
        ("project id twice", training(&format!(r#"{{"projectId":{p},"ProjectId":{p}}}"#)), "field `Content.projectId` appears more than once (keys are matched case-insensitively)".into()),
        ("deep nesting", format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)), "invalid JSON at line 1, column 128: recursion limit exceeded".into()),
        ("deep object", format!("{}{}", "{\"a\":".repeat(5_000), "}".repeat(5_000)), "invalid JSON at line 1, column 636: recursion limit exceeded".into()),
        ("over 64 KiB", format!("{}{}", training_with(&p, &i, &done), " ".repeat(MAX_MESSAGE_BYTES)), format!("message is {} bytes; a queue message holds at most 65536 bytes", training_with(&p, &i, &done).len() + MAX_MESSAGE_BYTES)),
        ("base64 of garbage", b64(&[0x00, 0x9f, 0x92, 0x96, 0xff, 0x10]), "message is base64 but the decoded bytes are not UTF-8 (at byte 1)".into()),
        ("base64 of invalid UTF-8 JSON", b64(b"{\"type\":\"\xff\"}"), "message is base64 but the decoded bytes are not UTF-8 (at byte 9)".into()),
        ("base64 of text", b64(b"hello world"), "message is neither JSON nor base64-encoded JSON".into()),
        ("base64 of base64", b64(b64(training_with(&p, &i, &done).as_bytes()).as_bytes()), "message is neither JSON nor base64-encoded JSON".into()),
        ("not base64", "not base64 !!!".into(), "message is neither JSON nor base64-encoded JSON".into()),
        ("NUL", "\u{0}".into(), "message is neither JSON nor base64-encoded JSON".into()),
        ("xml", "<QueueMessage><MessageText>x</MessageText></QueueMessage>".into(), "message is neither JSON nor base64-encoded JSON".into()),
    ]
}

#[test]
fn each_malformed_message_gets_its_precise_error() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (name, input, expected) in cases {
        match parse(&input) {
            Ok(parsed) => panic!("{name}: parsed as {:?}", parsed.notification),
            Err(e) => assert_eq!(e.to_string(), expected, "{name}"),
        }
    }
}

#[test]
fn malformed_envelopes_are_refused_with_the_reason() {
    let cases: Vec<(&str, Vec<u8>, EnvelopeError)> = vec![
        (
            "empty body",
            b"".to_vec(),
            EnvelopeError::NotJson("EOF while parsing a value at line 1 column 0".into()),
        ),
        (
            "invalid UTF-8",
            b"\xff\xfe{}".to_vec(),
            EnvelopeError::NotJson("invalid UTF-8 at byte 0".into()),
        ),
        ("null", b"null".to_vec(), EnvelopeError::NotAnObject),
        (
            "string",
            br#""{\"Data\":{}}""#.to_vec(),
            EnvelopeError::NotAnObject,
        ),
        (
            "data array",
            br#"{"Data":[]}"#.to_vec(),
            EnvelopeError::MissingData,
        ),
        (
            "no binding",
            br#"{"Data":{}}"#.to_vec(),
            EnvelopeError::MissingBinding("notification".into()),
        ),
        (
            "binding null",
            br#"{"Data":{"notification":null}}"#.to_vec(),
            EnvelopeError::MissingBinding("notification".into()),
        ),
        (
            "deep envelope",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            EnvelopeError::NotJson("recursion limit exceeded at line 1 column 128".into()),
        ),
    ];
    for (name, body, expected) in cases {
        assert_eq!(
            decode_queue_invocation(&body, TRIGGER_BINDING).unwrap_err(),
            expected,
            "{name}"
        );
    }
}

#[test]
fn odd_metadata_is_tolerated_not_trusted() {
    for (count, expected) in [
        (r#""-1""#, 1),
        (r#""0""#, 1),
        ("1e30", u32::MAX),
        (r#""18446744073709551616""#, 1),
        (r#""3""#, 3),
        ("7", 7),
        (r#""\"4\"""#, 4),
        ("[]", 1),
    ] {
        let body = format!(
            r#"{{"Data":{{"notification":"\"x\""}},"Metadata":{{"DequeueCount":{count},"Id":{{"evil":1}}}}}}"#
        );
        let inv = decode_queue_invocation(body.as_bytes(), TRIGGER_BINDING).unwrap();
        assert_eq!(inv.dequeue_count, expected, "{count}");
        assert_eq!(inv.message_id, None);
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile messages through `cvchain serve`, Azurite and the Custom Vision stand-in, as an
// attacker with write access to the queue (and, for the forged exports, to the backup
// container) would send them. Every one is answered 200 on every delivery, recorded, and
// leaves no secret in any spelling in the rows, the answers or the logs.

use cvchain_azure::storage::{clients::StorageClients, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Standin};
use cvchain_testkit::{Azurite, Handler, HostEmulator, StandinApi, host_envelope, unique};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

const KEY: &str = "hostile-training-key-77c1";

struct World {
    azurite: Azurite,
    standin: Standin,
    handler: Handler,
    host: HostEmulator,
    clients: StorageClients,
    table: String,
    queue: String,
    backup: String,
    http: reqwest::Client,
    /// Every answer body, for the secret scan.
    answers: std::sync::Mutex<Vec<String>>,
}

async fn world(export_delay_ms: u64, chain: &str) -> World {
    world_with(export_delay_ms, chain, &[]).await
}

async fn world_with(export_delay_ms: u64, chain: &str, extra: &[(&str, String)]) -> World {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let queue = unique("hq");
    let table = unique("History");
    let backup = azurite.container_url("cvbackups");
    let standin = Standin::start(cvchain_standin::StandinConfig {
        export_delay: Duration::from_millis(export_delay_ms),
        model_size: 2048,
        ..cvchain_testkit::standin_config(&clients, KEY, 50)
    })
    .await
    .unwrap();
    let mut settings = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", chain.into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
        ("CVCHAIN_CV_MAX_RPS", "1000".into()),
    ];
    settings.extend(extra.iter().cloned());
    let handler = Handler::start(&settings);
    let host = HostEmulator::new(&clients, &queue, handler.url(""));
    World {
        azurite,
        standin,
        handler,
        host,
        clients,
        table,
        queue,
        backup,
        http: reqwest::Client::new(),
        answers: Default::default(),
    }
}

impl World {
    async fn post_body(&self, body: String) -> u16 {
        let rsp = self
            .http
            .post(self.handler.url("/CustomVisionNotification"))
            .header("content-type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = rsp.status().as_u16();
        let answer = rsp.text().await.unwrap();
        self.answers.lock().unwrap().push(answer);
        status
    }

    async fn deliver(&self, text: &str, id: &str, dequeue: u32) -> u16 {
        self.post_body(host_envelope(text, id, dequeue)).await
    }

    async fn rows(&self) -> Vec<StoredEntity> {
        self.clients
            .table(&self.table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    }

    async fn rows_with(&self, prop: &str, value: &str) -> Vec<StoredEntity> {
        self.rows()
            .await
            .into_iter()
            .filter(|r| r.entity.get(prop).and_then(Value::as_str) == Some(value))
            .collect()
    }

    async fn blob(&self, container: &str, name: &str) -> Option<Vec<u8>> {
        let blob = self
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client(container)
            .blob_client(name);
        match blob.download(None).await {
            Ok(rsp) => Some(rsp.body.collect().await.unwrap().to_vec()),
            Err(_) => None,
        }
    }

    async fn put_blob(&self, container: &str, name: &str, body: &[u8]) {
        let c = self
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client(container);
        let _ = c.create(None).await;
        c.blob_client(name)
            .upload(azure_core::http::RequestContent::from(body.to_vec()), None)
            .await
            .unwrap();
    }

    /// No secret in any spelling in the rows, the answers or the handler's logs.
    async fn assert_no_secrets(&self, extra: &[&str]) {
        let mut secrets = vec![KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
        secrets.extend_from_slice(extra);
        let rows = self.rows().await;
        for r in &rows {
            let text = serde_json::to_string(&r.entity).unwrap();
            cvchain_testkit::assert_no_secrets(
                &format!(
                    "row {}/{}",
                    r.entity["PartitionKey"].as_str().unwrap_or_default(),
                    r.entity["RowKey"].as_str().unwrap_or_default()
                ),
                &text,
                &secrets,
            );
        }
        for a in self.answers.lock().unwrap().iter() {
            cvchain_testkit::assert_no_secrets("an invocation answer", a, &secrets);
        }
        cvchain_testkit::assert_no_secrets("the handler's logs", &self.handler.stderr(), &secrets);
    }

    /// Trains a new project wired to the queue and the backup container.
    async fn trained_project(&self, name: &str) -> (Uuid, Uuid) {
        let api = StandinApi::with_storage(&self.standin.endpoint(), KEY, &self.clients);
        let queue_uri = self.azurite.queue_url(&self.queue);
        let project = api
            .create_project(&[
                ("name", name),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", &queue_uri),
                ("exportModelContainerUri", &self.backup),
            ])
            .await;
        let iteration = api.train(project).await;
        (project, iteration)
    }

    async fn step(&self, project: Uuid, iteration: Uuid, platform: &str) -> Option<StoredEntity> {
        self.rows().await.into_iter().find(|r| {
            r.entity["PartitionKey"] == project.to_string()
                && r.entity["RowKey"] == format!("ExportStep_{iteration}_{platform}")
        })
    }
}

fn export_message(project: &str, iteration: &str, model_uri: &str) -> String {
    serde_json::json!({
        "version": "1.0", "type": "Export",
        "Content": {"projectId": project, "iterationId": iteration,
                    "exportStatus": "ExportCompleted", "modelUri": model_uri}
    })
    .to_string()
}

fn connection_test(extra: &str) -> String {
    format!(r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{P}"}}{extra}}}"#)
}

/// Findings 1 and 2 of issue 17, and messages with unsafe ids: signatures in escaped JSON,
/// unknown types that echo a secret, messages whose text cannot be stored as it is, and
/// rejected messages and envelopes too large for the poison queue.
#[tokio::test]
async fn hostile_messages_are_answered_200_recorded_and_leak_no_secret() {
    let w = world(50, "ONNX").await;
    let uri = |q: &str| format!("https://acct.blob.core.windows.net/x/model.zip?sv=1{q}");
    // (id, message text) that must be recorded as a notification.
    let mut notifications: Vec<(String, String)> = Vec::new();
    // Signatures in every spelling System.Text.Json and URLs allow, as the JSON text spells them.
    for (n, q) in [
        r"\u0026sig=LEAK1SIG\u0026se=2",
        r"&sig\u003dLEAK2SIG",
        r"&\u0073ig=LEAK3SIG",
        "&%73ig=LEAK4SIG",
        r"\u0026sig=LEAK5%2BSIG",
    ]
    .iter()
    .enumerate()
    {
        let text = format!(
            r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":"{}"}}}}"#,
            uri(q)
        );
        notifications.push((format!("sig-{n}"), text.clone()));
        notifications.push((format!("sig-b64-{n}"), b64(text.as_bytes())));
    }
    // An unknown type that echoes a secret (it reaches `UnknownType` and the answer's Logs).
    notifications.push((
        "unknown-1".into(),
        r#"{"version":"1.0","type":"x sig=LEAK6SIG y\u0026sig=LEAK7SIG","Content":{}}"#.into(),
    ));
    // A password in a URL.
    notifications.push((
        "userinfo-1".into(),
        export_message(
            P,
            I,
            "https://user:LEAK8PASS@acct.blob.core.windows.net/x/m.zip",
        ),
    ));
    // 60 KB padded with U+0085: each one is six units once escaped.
    notifications.push((
        "nel-padding".into(),
        connection_test(&format!(r#","pad":"{}""#, "\u{85}".repeat(30_000))),
    ));
    // A modelUri of 60,000 characters.
    notifications.push((
        "long-model-uri".into(),
        export_message(
            P,
            I,
            &format!(
                "https://acct.blob.core.windows.net/x/{}",
                "a".repeat(60_000)
            ),
        ),
    ));
    // The same text under two unsafe ids: two deliveries, two rows.
    let twice = connection_test(r#","n":"twice""#);
    notifications.push(("unsafe/id#1".into(), twice.clone()));
    notifications.push(("unsafe/id#2".into(), twice.clone()));

    for (id, text) in &notifications {
        for dequeue in [1, 5] {
            assert_eq!(
                w.deliver(text, id, dequeue).await,
                200,
                "{id} (delivery {dequeue})"
            );
        }
        assert_eq!(
            w.rows_with("MessageId", id).await.len(),
            1,
            "{id}: one row for the message"
        );
    }
    // Rejected messages the poison queue cannot hold: a message over 64 KiB, and one under
    // it whose copy must be base64 (XML cannot carry U+0001) and so is over it.
    let rejected = [
        ("too-large", connection_test(&" ".repeat(70_000))),
        ("xml-unsafe", format!("{{oops{}", "\u{1}".repeat(50_000))),
        (
            "sig-rejected",
            r#"{"modelUri":"https://x/y?a=1\u0026sig=LEAK9SIG"#.to_owned(),
        ),
    ];
    for (id, text) in &rejected {
        for dequeue in [1, 5] {
            assert_eq!(
                w.deliver(text, id, dequeue).await,
                200,
                "{id} (delivery {dequeue})"
            );
        }
        let rows = w.rows_with("MessageId", id).await;
        assert_eq!(rows.len(), 1, "{id}");
        let row = &rows[0].entity;
        assert_eq!(row["PartitionKey"], "_rejected", "{id}");
        // Nothing is lost: the whole text is in the poison queue or, when it cannot go there,
        // in a blob the row points to.
        match row["PoisonCopy"].as_str() {
            Some("sent") => {}
            Some("stored") => {
                let name = row["PoisonBlob"].as_str().expect("PoisonBlob");
                let container = format!("{}-poison", w.queue);
                let stored = w.blob(&container, name).await.expect("the stored copy");
                assert_eq!(stored, text.as_bytes(), "{id}");
            }
            other => panic!("{id}: PoisonCopy {other:?}"),
        }
    }
    // An unreadable envelope of a megabyte.
    let body = "x".repeat(1_000_000);
    assert_eq!(w.post_body(body.clone()).await, 200);
    let unreadable: Vec<StoredEntity> = w
        .rows_with("PartitionKey", "_rejected")
        .await
        .into_iter()
        .filter(|r| {
            r.entity["Reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("invocation body is not JSON"))
        })
        .collect();
    assert_eq!(unreadable.len(), 1);
    assert_eq!(unreadable[0].entity["PoisonCopy"], "stored");
    let name = unreadable[0].entity["PoisonBlob"].as_str().unwrap();
    assert_eq!(
        w.blob(&format!("{}-poison", w.queue), name).await.unwrap(),
        body.as_bytes()
    );

    let leaks: Vec<String> = (1..=9).map(|n| format!("LEAK{n}")).collect();
    let leaks: Vec<&str> = leaks.iter().map(String::as_str).collect();
    w.assert_no_secrets(&leaks).await;
}

/// Findings 3, 4 and 5 of issue 17, and the release metadata's `source`: a forged
/// ExportCompleted recorded before the genuine one, backup blobs whose names differ from the
/// genuine one only by case, and a release whose plain and id-qualified paths both hold blobs
/// cvchain did not write.
#[tokio::test]
async fn forged_exports_neither_replace_nor_displace_the_genuine_ones() {
    let w = world(1500, "ONNX").await;
    let (p, i) = w.trained_project("Widgets").await;
    let backup_name = format!("{p} - {i}.ONNX");
    let genuine_uri = format!("{}/{p}%20-%20{i}.ONNX", w.backup);
    // The chain requests ONNX; its ExportCompleted comes 1.5 s later.
    w.host
        .pump_until(Duration::from_secs(30), || async {
            w.step(p, i, "ONNX").await.is_some()
        })
        .await;
    // A forged ExportCompleted, exactly as the genuine one will read, recorded first.
    let forged = export_message(&p.to_string(), &i.to_string(), &genuine_uri);
    assert_eq!(w.deliver(&forged, "forged-first", 1).await, 200);
    let stats = w
        .host
        .pump_until(Duration::from_secs(30), || async {
            w.step(p, i, "ONNX")
                .await
                .is_some_and(|s| s.entity.contains_key("ReleaseUrl"))
        })
        .await;
    assert_eq!(stats.failures, 0, "{stats:?}");
    // Both messages have a row of their own; the later one records the disagreement.
    let exports: Vec<StoredEntity> = w
        .rows_with("EventType", "Export")
        .await
        .into_iter()
        .filter(|r| r.entity["IterationId"] == i.to_string())
        .collect();
    assert_eq!(exports.len(), 2, "{exports:#?}");
    let genuine = exports
        .iter()
        .find(|r| r.entity["MessageId"] != "forged-first")
        .expect("the genuine message's row");
    assert!(
        genuine.entity["Disagreement"]
            .as_str()
            .is_some_and(|d| d.contains("forged-first")),
        "{genuine:#?}"
    );
    // Each message's redelivery is told as one (the first's row, and the second's row apart
    // beside it, read in one range) and writes nothing.
    let genuine_id = genuine.entity["MessageId"].as_str().unwrap().to_owned();
    for id in ["forged-first", genuine_id.as_str()] {
        assert_eq!(w.deliver(&forged, id, 2).await, 200);
        let answer = w.answers.lock().unwrap().last().cloned().unwrap();
        assert!(
            answer.contains("already recorded: a redelivery, left unchanged"),
            "{id}: {answer}"
        );
    }
    let again = w.rows_with("EventType", "Export").await;
    assert_eq!(
        again
            .iter()
            .filter(|r| r.entity["IterationId"] == i.to_string())
            .count(),
        2
    );

    // Blobs whose names differ from the genuine backup's only by case: never released.
    let step = w.step(p, i, "ONNX").await.unwrap();
    let release_path = step.entity["ReleasePath"].as_str().unwrap().to_owned();
    let genuine_bytes = w.blob("cvbackups", &backup_name).await.unwrap();
    let upper = format!(
        "{} - {}.ONNX",
        p.to_string().to_uppercase(),
        i.to_string().to_uppercase()
    );
    for (n, name) in [format!("{p} - {i}.onnx"), upper].iter().enumerate() {
        w.put_blob("cvbackups", name, format!("attacker {n}").as_bytes())
            .await;
        let uri = format!("{}/{}", w.backup, name.replace(' ', "%20"));
        let forged = export_message(&p.to_string(), &i.to_string(), &uri);
        assert_eq!(w.deliver(&forged, &format!("case-{n}"), 1).await, 200);
        assert_eq!(
            w.blob("models", &release_path).await.unwrap(),
            genuine_bytes,
            "the release copy was replaced by {name}"
        );
    }
    // The release copy's `source` is the backup's URL, percent-encoded once.
    use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
    let meta = w
        .clients
        .blob_service()
        .unwrap()
        .blob_container_client("models")
        .blob_client(&release_path)
        .get_properties(None)
        .await
        .unwrap()
        .metadata()
        .unwrap();
    assert_eq!(meta["source"], genuine_uri);

    // The plain and the id-qualified path both hold someone else's blobs: neither is
    // overwritten; the refusal is recorded and the message answered 200.
    let (p2, i2) = w.trained_project("Gadgets").await;
    let plain = "Gadgets/Iteration-1/ONNX.zip".to_owned();
    let qualified = format!("Gadgets-{p2}/Iteration-1-{i2}/ONNX.zip");
    for path in [&plain, &qualified] {
        w.put_blob("models", path, b"not cvchain's").await;
    }
    let stats = w
        .host
        .pump_until(Duration::from_secs(30), || async {
            w.rows_with("EventType", "Export")
                .await
                .iter()
                .any(|r| r.entity["IterationId"] == i2.to_string())
        })
        .await;
    assert_eq!(stats.failures, 0, "{stats:?}");
    for path in [&plain, &qualified] {
        assert_eq!(
            w.blob("models", path).await.unwrap(),
            b"not cvchain's",
            "{path}"
        );
    }
    let step = w.step(p2, i2, "ONNX").await.expect("the ONNX step row");
    assert!(
        step.entity["ReleaseStatus"]
            .as_str()
            .is_some_and(|s| s.starts_with("refused")),
        "{step:#?}"
    );
    w.assert_no_secrets(&[]).await;
}

/// A training key with a newline and an endpoint with a password: the setting is named, and
/// the password is printed nowhere (not by `check`, not by `serve`'s start-up line).
/// Forged training notifications: an event says only what cvchain verified. Twenty
/// `TrainingFailed` for made-up ids, and a `TrainingCompleted` and a `TrainingFailed` that
/// contradict what Custom Vision reports, are each recorded (with why they were not confirmed)
/// and announced by no event, although Custom Vision was asked about each; a genuine failed
/// training is confirmed and announced once, with its names.
#[tokio::test]
async fn forged_trainings_are_recorded_and_never_announced() {
    let events = unique("ev");
    let w = world_with(50, "ONNX", &[("CVCHAIN_EVENTS_QUEUE", events.clone())]).await;
    let outbox = |rows: &[StoredEntity]| -> Vec<(String, String)> {
        rows.iter()
            .filter(|r| {
                r.entity["RowKey"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("Outbox_"))
            })
            .map(|r| {
                (
                    r.entity["PartitionKey"].as_str().unwrap().to_owned(),
                    r.entity["CloudEventType"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    };
    let training = |p: &Uuid, i: &Uuid, status: &str| {
        serde_json::json!({"version": "1.0", "type": "Training",
            "Content": {"projectId": p, "iterationId": i, "trainingStatus": status}})
        .to_string()
    };

    // Twenty made-up projects and iterations.
    let before = w.standin.calls();
    let asked_before = before.counts.get("GetIteration").copied().unwrap_or(0);
    let mut forged = Vec::new();
    for n in 0..20 {
        let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
        let text = training(&p, &i, "TrainingFailed");
        assert_eq!(w.deliver(&text, &format!("forged-{n}"), 1).await, 200);
        forged.push((p, i));
    }
    let asked = w
        .standin
        .calls()
        .counts
        .get("GetIteration")
        .copied()
        .unwrap_or(0);
    assert!(
        asked - asked_before >= 20,
        "each forged training was checked with Custom Vision ({} GetIteration calls)",
        asked - asked_before
    );
    let rows = w.rows().await;
    for (p, i) in &forged {
        let row = rows
            .iter()
            .find(|r| {
                r.entity["PartitionKey"] == p.to_string()
                    && r.entity["RowKey"] == format!("Training_{i}_TrainingFailed")
            })
            .unwrap_or_else(|| panic!("the forged training of {p} is recorded"));
        assert_eq!(row.entity.get("Confirmed"), None);
        let why = row.entity["Confirmation"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("unconfirmed: Custom Vision answered"),
            "{why}"
        );
    }
    assert_eq!(outbox(&rows), Vec::<(String, String)>::new());

    // A real project: its completed training is confirmed and announced; a TrainingFailed for
    // it contradicts the service and is not.
    let (p, i) = w.trained_project("Forgery Target").await;
    w.host
        .pump_until(Duration::from_secs(30), || async {
            w.step(p, i, "ONNX")
                .await
                .is_some_and(|s| s.entity.contains_key("ReleaseUrl"))
        })
        .await;
    let contradicting = training(&p, &i, "TrainingFailed");
    assert_eq!(w.deliver(&contradicting, "contradicting", 1).await, 200);
    let rows = w.rows().await;
    let row = rows
        .iter()
        .find(|r| r.entity["RowKey"] == format!("Training_{i}_TrainingFailed"))
        .expect("the contradicting notification is recorded");
    assert_eq!(
        row.entity["Confirmation"],
        "contradicted: Custom Vision reports the iteration Completed, not Failed"
    );
    let told: Vec<String> = outbox(&rows).into_iter().map(|(_, t)| t).collect();
    assert!(
        told.contains(&"io.cvchain.training.completed".to_owned()),
        "{told:?}"
    );
    assert!(
        !told.contains(&"io.cvchain.training.failed".to_owned()),
        "{told:?}"
    );

    // A training that really failed: confirmed, announced once, with its names.
    w.standin.set_faults(cvchain_standin::Faults {
        fail_training: true,
        ..Default::default()
    });
    let (p, i) = w.trained_project("Failing Project").await;
    w.host
        .pump_until(Duration::from_secs(30), || async {
            w.rows()
                .await
                .iter()
                .any(|r| r.entity["RowKey"] == format!("Training_{i}_TrainingFailed"))
        })
        .await;
    let rows = w.rows().await;
    let failed: Vec<&StoredEntity> = rows
        .iter()
        .filter(|r| {
            r.entity["PartitionKey"] == p.to_string()
                && r.entity["RowKey"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("Outbox_"))
        })
        .collect();
    assert_eq!(failed.len(), 1, "one event for the failed training");
    assert_eq!(
        failed[0].entity["CloudEventType"],
        "io.cvchain.training.failed"
    );
    let event: Value =
        serde_json::from_str(failed[0].entity["CloudEvent"].as_str().expect("the event")).unwrap();
    assert_eq!(event["data"]["projectName"], "Failing Project");
    assert!(event["data"]["iterationName"].is_string(), "{event}");
    w.assert_no_secrets(&[]).await;
}

#[test]
fn hostile_settings_are_named_and_never_quoted() {
    use std::process::Command;
    let bin = cvchain_testkit::handler::cvchain_bin();
    let run = |command: &str, endpoint: &str, key: &str| {
        let out = Command::new(&bin)
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CVCHAIN_STORAGE", "UseDevelopmentStorage=true")
            .env("CUSTOM_VISION_ENDPOINT", endpoint)
            .env("CUSTOM_VISION_TRAINING_KEY", key)
            .env(
                "FUNCTIONS_CUSTOMHANDLER_PORT",
                cvchain_testkit::free_port().to_string(),
            )
            .output()
            .unwrap();
        assert!(!out.status.success(), "{command} accepted it");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for command in ["check", "serve"] {
        let out = run(command, "http://user:HUNTER2PASS@127.0.0.1:9/", "plain-key");
        assert!(out.contains("CUSTOM_VISION_ENDPOINT"), "{command}: {out}");
        cvchain_testkit::assert_no_secrets(command, &out, &["HUNTER2PASS"]);
        let out = run(command, "http://127.0.0.1:9/", "abc\ndef-KEYTAIL");
        assert!(
            out.contains("CUSTOM_VISION_TRAINING_KEY"),
            "{command}: {out}"
        );
        assert!(!out.contains("failed to build request"), "{command}: {out}");
        cvchain_testkit::assert_no_secrets(command, &out, &["KEYTAIL"]);
    }
}

/// Platform names no Custom Vision should report, but one could: claims and step rows keyed by
/// them are still valid table keys, taken and given back.
#[tokio::test]
async fn hostile_platform_names_make_valid_claim_and_step_keys() {
    use cvchain_azure::history::{claims::Claims, store::HistoryStore};
    use cvchain_core::chain::{EntryState, ExportTarget};
    use cvchain_core::claims::ClaimKey;
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table = unique("History");
    let store = HistoryStore::new(clients.table(&table).unwrap());
    let claims = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(60));
    let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
    for platform in [
        "ON/NX",
        "a\\b",
        "q?x#y",
        "it's 100%",
        "tab\there",
        "\u{7f}\u{85}",
        "ünïcödé",
        &"x".repeat(2_000),
    ] {
        let target = ExportTarget {
            platform: platform.to_owned(),
            flavor: Some("f/l".into()),
        };
        for key in [
            ClaimKey::copy(p, i, &target),
            ClaimKey::export_request(p, i, &target),
        ] {
            let claim = claims
                .acquire(&key)
                .await
                .unwrap_or_else(|e| panic!("{platform:?}: {e}"))
                .unwrap_or_else(|| panic!("{platform:?}: not taken"));
            assert!(
                claims.acquire(&key).await.unwrap().is_none(),
                "{platform:?}"
            );
            claims.release(&claim).await.unwrap();
        }
        let row = cvchain_core::history::step_row(p, i, 0, &target, EntryState::Done);
        store
            .record(&row)
            .await
            .unwrap_or_else(|e| panic!("{platform:?}: {e}"));
        assert_eq!(
            store
                .steps(p, i)
                .await
                .unwrap()
                .iter()
                .filter(|s| s.target == target)
                .count(),
            1,
            "{platform:?}"
        );
    }
}

/// The handler's resident memory, from `/proc`.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Slow clients: 300 connections trickling their headers and 100 bodies stalled at 800 KB of
/// 900 KB, spread over every route. The trickling connections are closed once the header timeout
/// passes, the stalled bodies are answered 408 once the body timeout passes, memory stays
/// bounded meanwhile, and `GET /`, the host's readiness probe, is answered at once throughout.
#[tokio::test]
async fn slow_clients_are_cut_off_and_readiness_is_answered_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let handler = Handler::start(&[("CVCHAIN_STORAGE", "UseDevelopmentStorage=true".into())]);
    let addr = format!("127.0.0.1:{}", handler.port);
    let ready = |http: reqwest::Client, url: String| async move {
        let asked = std::time::Instant::now();
        let rsp = http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .expect("GET / answered");
        assert_eq!(rsp.status(), 200);
        asked.elapsed()
    };
    let http = reqwest::Client::new();
    let idle_rss = rss_mib(handler.pid());

    // 300 connections that send a header line a second and never finish.
    let mut trickling = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/history HTTP/1.1\r\n").await.unwrap();
        trickling.push(tokio::spawn(async move {
            let opened = std::time::Instant::now();
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => {
                        // Closed by the server (EOF or reset), or answered with an error.
                        let _ = r;
                        return opened.elapsed();
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            return opened.elapsed();
                        }
                    }
                }
                if opened.elapsed() > Duration::from_secs(40) {
                    return opened.elapsed();
                }
            }
        }));
    }
    // 100 requests whose bodies stall at 800 KB of 900 KB, on every route that takes a POST
    // (the invocation, the timer function) and on one that does not exist: each is bounded.
    let routes = ["/CustomVisionNotification", "/DeliverEvents", "/nowhere"];
    let mut stalled = Vec::new();
    for n in 0..100 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let route = routes[n % routes.len()];
        stalled.push(tokio::spawn(async move {
            let opened = std::time::Instant::now();
            let head = format!("POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return (opened.elapsed(), String::new());
            }
            let chunk = vec![b' '; 16 * 1024];
            for _ in 0..50 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut answer)).await;
            let line = String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            (opened.elapsed(), line)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The readiness probe is answered at once although every slot could be taken.
    for _ in 0..5 {
        let took = ready(http.clone(), handler.url("/")).await;
        assert!(took < Duration::from_millis(1500), "GET / took {took:?}");
    }
    let peak = rss_mib(handler.pid());
    assert!(
        peak - idle_rss < 48.0,
        "resident memory grew from {idle_rss:.1} MiB to {peak:.1} MiB"
    );
    for t in trickling {
        let lived = t.await.unwrap();
        assert!(
            lived < Duration::from_secs(15),
            "a trickling connection lived {lived:?}"
        );
    }
    for t in stalled {
        let (lived, status) = t.await.unwrap();
        assert!(
            lived < Duration::from_secs(30),
            "a stalled body was held {lived:?} ({status})"
        );
        assert!(
            status.is_empty()
                || status.starts_with("HTTP/1.1 408")
                || status.starts_with("HTTP/1.1 503"),
            "{status}"
        );
    }
    let took = ready(http.clone(), handler.url("/")).await;
    assert!(took < Duration::from_millis(1500), "GET / took {took:?}");
}

/// The history page (issue 17, finding 6): locked down (a Content-Security-Policy that allows
/// nothing but its own inline style, `nosniff`), and read a page at a time: a request reads at
/// most one page of trained iterations, and the next page is linked.
#[tokio::test]
async fn the_history_page_is_locked_down_and_paged() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table_name = unique("History");
    let table = clients.table(&table_name).unwrap();
    table.create_if_missing().await.unwrap();
    for n in 1..=7 {
        let iteration = format!("00000000-0000-0000-0000-00000000000{n}");
        for entity in [
            serde_json::json!({"PartitionKey": P, "RowKey": format!("Training_{iteration}_TrainingCompleted"),
                "EventType": "Training", "ProjectId": P, "ProjectName": "<script>alert(1)</script>",
                "IterationId": iteration, "IterationName": format!("Iteration {n}"),
                "Status": "TrainingCompleted", "TrainedAt": format!("2026-11-2{n}T10:00:00.0000000Z"),
                "Precision": 0.5, "Recall": 0.5, "AveragePrecision": 0.5}),
            serde_json::json!({"PartitionKey": P, "RowKey": format!("ExportStep_{iteration}_ONNX"),
                "EventType": "ExportStep", "IterationId": iteration, "Platform": "ONNX",
                "Flavor": "", "ChainPosition": 1, "Status": "Done",
                "ReleasePath": format!("W/Iteration-{n}/ONNX.zip"),
                "ReleaseUrl": "javascript:alert(1)"}),
        ] {
            table.insert(entity.as_object().unwrap()).await.unwrap();
        }
    }
    let handler = Handler::start(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_HISTORY_TABLE", table_name),
    ]);
    let http = reqwest::Client::new();
    // Headers, for HTML and JSON alike.
    for accept in ["text/html", "application/json"] {
        let rsp = http
            .get(handler.url(&format!("/api/history/{P}")))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(
            rsp.headers()["x-content-type-options"],
            "nosniff",
            "{accept}"
        );
        let csp = rsp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        let body = rsp.text().await.unwrap();
        if accept == "text/html" {
            assert!(!body.contains("<script>"), "{body}");
            assert!(!body.contains("href=\"javascript:"), "{body}");
        }
    }
    // Pages of three, linked until the last.
    let mut url = handler.url(&format!("/api/history/{P}?limit=3"));
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let rsp = http
            .get(&url)
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        let next = rsp
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let page: Value = rsp.json().await.unwrap();
        let page = page["iterations"].as_array().unwrap().clone();
        assert!(page.len() <= 3, "{page:?}");
        for it in &page {
            assert_eq!(it["exports"][0]["platform"], "ONNX");
            seen.push(it["iterationName"].as_str().unwrap().to_owned());
        }
        pages += 1;
        let Some(link) = next else { break };
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .map(|(u, _)| u.to_owned())
            .unwrap_or_else(|| panic!("{link}"));
        url = handler.url(&target);
        assert!(pages < 10);
    }
    seen.sort();
    assert_eq!(seen.len(), 7, "{seen:?}");
    seen.dedup();
    assert_eq!(seen.len(), 7, "an iteration on two pages");
    assert!(pages >= 3);
    // The HTML page links the next page too.
    let html = http
        .get(handler.url(&format!("/api/history/{P}?limit=3&format=html")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("rel=\"next\""), "{html}");
}
