//! The Training API client against the Custom Vision stand-in, over HTTP: operations, both error
//! shapes, retries that honour Retry-After, timeouts, the rate limit, and no key in any error.

use cvchain_azure::customvision::{
    TrainingApi,
    client::{CvAuth, CvRetry, FREE_REFUSALS, TrainingClient},
};
use cvchain_core::customvision::{CvError, Iteration, codes};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Standin, StandinConfig};
use std::time::Duration;
use url::Url;
use uuid::Uuid;

const KEY: &str = "standin-key-0123456789";

async fn standin() -> Standin {
    Standin::start(StandinConfig {
        training_key: KEY.into(),
        train_delay: Duration::from_millis(20),
        export_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn client(s: &Standin, retry: CvRetry, rps: u32) -> TrainingClient {
    TrainingClient::new(
        &Url::parse(&s.endpoint()).unwrap(),
        CvAuth::Key(azure_core::credentials::Secret::new(KEY)),
        rps,
        retry,
    )
}

fn quick() -> CvRetry {
    CvRetry {
        max_attempts: 6,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
    }
}

/// Creates a project on a compact domain and trains it, through the stand-in's REST API.
async fn trained(s: &Standin, c: &TrainingClient, domain: &str) -> (Uuid, Iteration) {
    let http = reqwest::Client::new();
    let base = format!("{}/customvision/v3.3/Training", s.endpoint());
    let project: serde_json::Value = http
        .post(format!("{base}/projects?name=Widgets&domainId={domain}"))
        .header("Training-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = Uuid::parse_str(project["id"].as_str().unwrap()).unwrap();
    cvchain_standin::script::TrainingScript::new(&s.endpoint(), KEY)
        .add_tagged_images(pid, &["widget", "gadget"], 0)
        .await
        .unwrap();
    let it: serde_json::Value = http
        .post(format!("{base}/projects/{pid}/train"))
        .header("Training-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let iid = Uuid::parse_str(it["id"].as_str().unwrap()).unwrap();
    for _ in 0..200 {
        let it = c.get_iteration(pid, iid).await.unwrap();
        if it.status == "Completed" {
            return (pid, it);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("training never completed");
}

#[tokio::test]
async fn operations_follow_the_spec() {
    let s = standin().await;
    let c = client(&s, quick(), 100);
    let (pid, it) = trained(&s, &c, COMPACT_DOMAIN).await;
    assert!(it.exportable);
    assert!(it.can_export_to("onnx"));
    assert!(it.trained_at.is_some());

    let project = c.get_project(pid).await.unwrap();
    assert_eq!(project.name, "Widgets");
    let perf = c.get_iteration_performance(pid, it.id).await.unwrap();
    assert!(perf.precision.unwrap() > 0.0);
    assert!(c.get_exports(pid, it.id).await.unwrap().is_empty());

    let e = c
        .export_iteration(pid, it.id, "tensorflow", Some("tensorflowlite"))
        .await
        .unwrap();
    assert_eq!(e.status, "Exporting");
    assert_eq!(e.platform, "TensorFlow");
    assert_eq!(e.flavor.as_deref(), Some("TensorFlowLite"));
    // The same export again: the service's documented refusal.
    let err = c
        .export_iteration(pid, it.id, "TensorFlow", Some("TensorFlowLite"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::EXPORT_ALREADY_IN_PROGRESS));
    assert!(!err.is_transient());

    // It finishes on its own.
    let mut done = false;
    for _ in 0..200 {
        let exports = c.get_exports(pid, it.id).await.unwrap();
        if exports.iter().any(|e| e.is_done()) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done);

    assert!(
        c.publish_iteration(
            pid,
            it.id,
            "prod",
            "/subscriptions/x/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/p"
        )
        .await
        .unwrap()
    );
    let err = c
        .publish_iteration(pid, it.id, "prod", "/subscriptions/x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::ITERATION_IS_PUBLISHED));
    assert_eq!(
        c.get_iteration(pid, it.id)
            .await
            .unwrap()
            .publish_name
            .as_deref(),
        Some("prod")
    );
}

#[tokio::test]
async fn requests_the_spec_forbids_get_the_services_errors() {
    let s = standin().await;
    let c = client(&s, quick(), 100);
    let (pid, it) = trained(&s, &c, COMPACT_DOMAIN).await;
    for (platform, flavor, code) in [
        ("Caffe", None, "BadRequestExportValidationFailed"),
        ("ONNX", Some("ONNX99"), "BadRequestExportValidationFailed"),
        // In cvchain's own list of flavors, but in neither the spec's enum nor the SDKs'.
        (
            "TensorFlow",
            Some("TensorFlowSavedModel"),
            "BadRequestExportValidationFailed",
        ),
        // A flavor of another platform.
        ("ONNX", Some("Linux"), "BadRequestExportValidationFailed"),
        // v3.4-preview's platform, which this client's v3.3 does not have.
        ("OpenVino", None, "BadRequestExportValidationFailed"),
    ] {
        let err = c
            .export_iteration(pid, it.id, platform, flavor)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(code), "{platform} {flavor:?}: {err}");
    }
    // A compact domain exports VAIDK too.
    assert_eq!(
        c.export_iteration(pid, it.id, "VAIDK", None)
            .await
            .unwrap()
            .status,
        "Exporting"
    );
    let missing = Uuid::new_v4();
    let err = c.get_iteration(pid, missing).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::NOT_FOUND_ITERATION));
    assert!(err.is_not_found() && !err.is_transient());
    let err = c.get_project(missing).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::NOT_FOUND_PROJECT));

    // A non-compact domain exports nothing.
    let (pid, it) = trained(&s, &c, "ee85a74c-405e-4adc-bb47-ffa8ca0c9f31").await;
    assert!(!it.exportable);
    let err = c
        .export_iteration(pid, it.id, "ONNX", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::UNSUPPORTED_EXPORT_PLATFORM));

    // A missing required parameter, straight over HTTP (waiting out a refusal for rate, as the
    // calls above may have filled the resource's second).
    let mut rsp = None;
    for _ in 0..5 {
        let r = reqwest::Client::new()
            .post(format!(
                "{}/customvision/v3.3/training/projects/{pid}/iterations/{}/export",
                s.endpoint(),
                it.id
            ))
            .header("Training-Key", KEY)
            .send()
            .await
            .unwrap();
        if r.status() != 429 {
            rsp = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rsp = rsp.expect("refused for rate five times");
    assert_eq!(rsp.status(), 400);
    let body: serde_json::Value = rsp.json().await.unwrap();
    assert_eq!(body["code"], "BadRequestRequiredParamIsNull");
}

#[tokio::test]
async fn a_wrong_key_gets_the_gateway_error_without_echoing_the_key() {
    let s = standin().await;
    let c = TrainingClient::new(
        &Url::parse(&s.endpoint()).unwrap(),
        CvAuth::Key(azure_core::credentials::Secret::new("wrong-key-abcdef")),
        10,
        quick(),
    );
    let err = c.get_project(Uuid::new_v4()).await.unwrap_err();
    assert!(
        matches!(&err, CvError::Service { status: 401, code, .. } if code == "401"),
        "{err:?}"
    );
    assert!(err.to_string().contains("Access denied"));
    assert!(!err.to_string().contains("wrong-key-abcdef"));
    assert!(!format!("{err:?}").contains("wrong-key-abcdef"));
    assert!(!format!("{c:?}").contains("wrong-key-abcdef"));
}

#[tokio::test]
async fn failures_are_retried_and_retry_after_is_honoured() {
    let s = standin().await;
    // Only the injected faults: the resource's own limit would add 429s of its own.
    s.set_rate_limit(None);
    let c = client(&s, quick(), 100);
    let (pid, it) = trained(&s, &c, COMPACT_DOMAIN).await;
    s.set_faults(Faults {
        failure_rate: 0.5,
        retry_after_seconds: 0,
        ..Default::default()
    });
    for _ in 0..20 {
        c.get_iteration(pid, it.id).await.unwrap();
    }
    let calls = s.calls();
    assert!(calls.faults["GetIteration"] > 0, "{:?}", calls.faults);

    // Every answer a 429 with Retry-After: 1 → the client waits a second between attempts.
    s.set_faults(Faults {
        failure_rate: 1.0,
        throttle_share: Some(1.0),
        retry_after_seconds: 1,
        ..Default::default()
    });
    let before = s.calls().timeline_ms.len();
    let retry = CvRetry {
        max_attempts: 2,
        ..quick()
    };
    let err = client(&s, retry, 100)
        .get_exports(pid, it.id)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let timeline = s.calls().timeline_ms;
    let attempts = &timeline[before..];
    // The first refusals for rate are free; then each takes an attempt.
    assert_eq!(attempts.len() as u32, FREE_REFUSALS + 2);
    // The client's own backoff would be 10-20 ms; the header says one second.
    for pair in attempts.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "Retry-After not honoured: {attempts:?}"
        );
    }
}

#[tokio::test]
async fn slow_answers_time_out() {
    let s = standin().await;
    let c = client(&s, quick(), 100);
    let (pid, it) = trained(&s, &c, COMPACT_DOMAIN).await;
    s.set_faults(Faults {
        slow_rate: 1.0,
        slow_ms: 3_000,
        ..Default::default()
    });
    let retry = CvRetry {
        max_attempts: 1,
        timeout: Duration::from_millis(300),
        ..quick()
    };
    let err = client(&s, retry, 100)
        .get_iteration(pid, it.id)
        .await
        .unwrap_err();
    assert!(matches!(err, CvError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn concurrent_calls_share_one_rate_limit() {
    let s = standin().await;
    let setup = client(&s, quick(), 100);
    let (pid, it) = trained(&s, &setup, COMPACT_DOMAIN).await;
    // The client's own limit is under test: the set-up's calls must not leave the resource's
    // second full.
    s.set_rate_limit(None);
    let c = client(&s, quick(), 5);
    let before = s.calls().timeline_ms.len();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.get_iteration(pid, it.id).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let timeline = s.calls().timeline_ms[before..].to_vec();
    assert_eq!(timeline.len(), 12);
    let mut sorted = timeline.clone();
    sorted.sort();
    // At 5 per second, any 6 consecutive calls span at least a second (less scheduling jitter).
    for w in sorted.windows(6) {
        assert!(w[5] - w[0] >= 950, "{sorted:?}");
    }
}

/// Two instances at the full ceiling share one resource: the stand-in refuses what goes over its
/// 10 calls a second, and both clients slow down and finish every call.
#[tokio::test]
async fn instances_sharing_a_resource_slow_down_on_its_refusals() {
    let s = standin().await;
    let setup = client(&s, quick(), 10);
    let (pid, it) = trained(&s, &setup, COMPACT_DOMAIN).await;
    let retry = CvRetry {
        max_attempts: 10,
        ..quick()
    };
    let instances = [client(&s, retry, 10), client(&s, retry, 10)];
    let mut tasks = Vec::new();
    for c in &instances {
        for _ in 0..25 {
            let c = c.clone();
            tasks.push(tokio::spawn(
                async move { c.get_iteration(pid, it.id).await },
            ));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let calls = s.calls();
    let refused = calls.throttled.get("GetIteration").copied().unwrap_or(0);
    assert!(
        refused == 0 || instances.iter().any(|c| c.adaptive_rate().is_some()),
        "{refused} refused, yet no instance slowed down"
    );
}

#[tokio::test]
async fn microsoft_entra_id_tokens_are_sent_over_https_for_the_cognitive_services_scope() {
    let ca = cvchain_testkit::TestCa::generate();
    let s = Standin::start(StandinConfig {
        training_key: KEY.into(),
        tls: Some((ca.cert.clone(), ca.key.clone())),
        accept_bearer: Some("token-for:https://cognitiveservices.azure.com/.default".into()),
        train_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(s.endpoint().starts_with("https://"));
    let cred = std::sync::Arc::new(cvchain_testkit::RecordingCredential::default());
    let c = TrainingClient::with_transport(
        &Url::parse(&s.endpoint()).unwrap(),
        CvAuth::Token(cred.clone()),
        10,
        quick(),
        Some(ca.transport()),
    );
    // The key client sets up a project; the token client reads it.
    let key_client = TrainingClient::with_transport(
        &Url::parse(&s.endpoint()).unwrap(),
        CvAuth::Key(azure_core::credentials::Secret::new(KEY)),
        10,
        quick(),
        Some(ca.transport()),
    );
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.ca_cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let project: serde_json::Value = http
        .post(format!(
            "{}/customvision/v3.3/training/projects?name=Tokens&domainId={COMPACT_DOMAIN}",
            s.endpoint()
        ))
        .header("Training-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = Uuid::parse_str(project["id"].as_str().unwrap()).unwrap();
    assert_eq!(c.get_project(pid).await.unwrap().name, "Tokens");
    assert_eq!(key_client.get_project(pid).await.unwrap().name, "Tokens");
    assert_eq!(
        cred.scopes.lock().unwrap().first().map(String::as_str),
        Some("https://cognitiveservices.azure.com/.default")
    );
}

/// A server answering GetIteration with `body`, as a real service might.
async fn answering(body: &'static str) -> String {
    let app = axum::Router::new()
        .fallback(move || async move { ([("content-type", "application/json")], body) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn optional_fields_the_client_cannot_read_are_absent_and_noted_and_an_unusable_answer_is_retried()
 {
    let pid = Uuid::new_v4();
    let odd = answering(
        r#"{"id": "0b7d5d1e-5c3e-4f39-9a83-2a3f1d1c0c01", "name": "Iteration 1", "status": "Completed",
            "domainId": "General (compact)", "trainedAt": 20261130, "exportable": true,
            "exportableTo": ["ONNX"], "someNewField": [1, 2]}"#,
    )
    .await;
    let c = TrainingClient::new(
        &Url::parse(&odd).unwrap(),
        CvAuth::Key(azure_core::credentials::Secret::new(KEY)),
        100,
        quick(),
    );
    let it = c.get_iteration(pid, Uuid::new_v4()).await.unwrap();
    assert_eq!(it.status, "Completed");
    assert!(it.can_export_to("ONNX"));
    assert_eq!((it.domain_id, it.trained_at.as_deref()), (None, None));
    assert_eq!(it.decode_notes.len(), 2, "{:?}", it.decode_notes);

    // Without a usable status the answer cannot be used: a Decode error, which is transient (the
    // message is retried, then poisoned with this reason), never the end of the chain.
    let broken =
        answering(r#"{"id": "0b7d5d1e-5c3e-4f39-9a83-2a3f1d1c0c01", "status": {"x": 1}}"#).await;
    let c = TrainingClient::new(
        &Url::parse(&broken).unwrap(),
        CvAuth::Key(azure_core::credentials::Secret::new(KEY)),
        100,
        quick(),
    );
    let err = c.get_iteration(pid, Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, CvError::Decode { .. }), "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("status"), "{err}");
}
