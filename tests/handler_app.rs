//! Handler tests without a socket: `app()` driven with `tower::ServiceExt::oneshot`.

use axum::{body::Body, http::Request};
use cvchain::{
    process::Processor,
    server::{AppState, app},
    settings::Settings,
};
use cvchain_azure::storage::clients::{RetryPolicy, StorageClients};
use http_body_util::BodyExt;
use std::{sync::Arc, time::Duration};
use tower::ServiceExt;

/// Storage on a port nothing listens on: any storage call fails as unreachable.
fn state_without_storage() -> AppState {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conn = format!(
        "AccountName=devstoreaccount1;AccountKey={};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1;TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1",
        cvchain_azure::storage::settings::DEV_ACCOUNT_KEY
    );
    let settings =
        Settings::from_lookup(&move |k| (k == "CVCHAIN_STORAGE").then(|| conn.clone())).unwrap();
    let clients = StorageClients::new(&settings.storage)
        .unwrap()
        .with_retry(RetryPolicy {
            max_retries: 0,
            max_total: Duration::from_secs(1),
        });
    let processor = Arc::new(Processor::new(&settings, &clients, None).unwrap());
    let console = cvchain::console::Console::new(&settings, &clients, processor.history());
    AppState::new(processor, console)
}

async fn call(req: Request<Body>) -> (u16, String, serde_json::Value) {
    let rsp = app(state_without_storage()).oneshot(req).await.unwrap();
    let status = rsp.status().as_u16();
    let ctype = rsp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn readiness_answers_without_touching_storage() {
    let (status, ctype, _) = call(Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/json"));
}

#[tokio::test]
async fn unknown_functions_get_a_json_404() {
    let (status, ctype, body) = call(Request::post("/Nope").body(Body::from("{}")).unwrap()).await;
    assert_eq!(status, 404);
    assert!(ctype.starts_with("application/json"));
    assert!(
        body["Logs"][0]
            .as_str()
            .unwrap()
            .contains("CustomVisionNotification")
    );
}

#[tokio::test]
async fn unreachable_storage_is_a_retryable_failure_with_a_json_body() {
    let envelope = r#"{"Data":{"notification":"\"{\\\"type\\\":\\\"ConnectionTest\\\"}\""},"Metadata":{"DequeueCount":"1","Id":"\"m\""}}"#;
    let (status, ctype, body) = call(
        Request::post("/CustomVisionNotification")
            .header("content-type", "application/json")
            .body(Body::from(envelope))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert!(ctype.starts_with("application/json"));
    assert!(
        body["Logs"][0].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_processing() {
    let big = "x".repeat(2 * 1024 * 1024);
    let rsp = app(state_without_storage())
        .oneshot(
            Request::post("/CustomVisionNotification")
                .body(Body::from(big))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status().as_u16(), 413);
}

/// A console form posted without a valid anti-forgery token is refused before anything is read
/// or moved (storage is unreachable here: a move would fail differently).
#[tokio::test]
async fn a_console_form_without_a_valid_token_is_refused() {
    let p = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
    for (path, body, cookie) in [
        (
            "promote",
            "channel=production&iteration=3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d",
            None,
        ),
        (
            "rollback",
            "channel=production&token=123.AAAA",
            Some("cvchain_session=c2Vzc2lvbi1vZi10aGUtYnJvd3Nlcg"),
        ),
        ("rollback", "channel=production&token=", None),
    ] {
        let mut req = Request::post(format!("/api/history/{p}/{path}"))
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let rsp = app(state_without_storage())
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        assert_eq!(rsp.status().as_u16(), 403, "{path} {body}");
        let csp = rsp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("form-action 'self'"), "{csp}");
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .ends_with("nothing was changed"),
            "{v}"
        );
    }
}
