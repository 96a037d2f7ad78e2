//! The stand-in's iteration lifecycle, over HTTP as any client calls it: GetIterations,
//! DeleteIteration (refused while published), PublishIteration (one iteration per publish name
//! and prediction resource), UnpublishIteration, and the 20-iteration cap on TrainProject, each
//! failure with the service's error code and a JSON body.

use cvchain_standin::{COMPACT_DOMAIN, MAX_ITERATIONS, Standin, StandinConfig};
use cvchain_testkit::StandinApi;
use serde_json::Value;
use std::time::Duration;

const KEY: &str = "lifecycle-key";
const PREDICTION: &str =
    "/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/p";

async fn standin() -> (Standin, StandinApi) {
    let s = Standin::start(StandinConfig {
        training_key: KEY.into(),
        train_delay: Duration::from_millis(5),
        export_delay: Duration::from_millis(5),
        // The calls go straight over HTTP, one after another, and check their own answers:
        // the calls-per-second limit has its own test (standin_contract.rs).
        rate_limit: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let api = StandinApi::new(&s.endpoint(), KEY);
    (s, api)
}

/// Sends a request and returns the status and the JSON body (`Null` for an empty one).
async fn call(api: &StandinApi, method: reqwest::Method, path: &str) -> (u16, Value) {
    let rsp = api
        .http
        .request(method, format!("{}/{path}", api.base))
        .header("Training-Key", &api.key)
        .send()
        .await
        .unwrap();
    let status = rsp.status().as_u16();
    let text = rsp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
    };
    (status, body)
}

fn code(body: &Value) -> &str {
    body["code"].as_str().unwrap_or_default()
}

async fn trained(api: &StandinApi, project: uuid::Uuid) -> uuid::Uuid {
    let it = api.train(project).await;
    api.wait_for(&format!("projects/{project}/iterations/{it}"), |v| {
        v["status"] == "Completed"
    })
    .await;
    it
}

#[tokio::test]
async fn a_published_iteration_is_deleted_only_after_it_is_unpublished() {
    let (_s, api) = standin().await;
    let pid = api
        .create_project(&[("name", "Lifecycle"), ("domainId", COMPACT_DOMAIN)])
        .await;
    let first = trained(&api, pid).await;
    let second = trained(&api, pid).await;

    let (status, list) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations"),
    )
    .await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");

    let publish = |it: uuid::Uuid, name: &str, overwrite: Option<&str>| {
        let mut path = format!(
            "projects/{pid}/iterations/{it}/publish?publishName={name}&predictionId={}",
            url::form_urlencoded::byte_serialize(PREDICTION.as_bytes()).collect::<String>()
        );
        if let Some(o) = overwrite {
            path.push_str(&format!("&overwrite={o}"));
        }
        path
    };
    let (status, body) = call(&api, reqwest::Method::POST, &publish(first, "prod", None)).await;
    assert_eq!((status, body), (200, Value::Bool(true)));

    // Published: DeleteIteration is refused with the service's code.
    let (status, body) = call(
        &api,
        reqwest::Method::DELETE,
        &format!("projects/{pid}/iterations/{first}"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(code(&body), "BadRequestIterationIsPublished", "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    // Publishing twice, and taking a name another iteration holds without overwrite, fail.
    let (status, body) = call(&api, reqwest::Method::POST, &publish(first, "prod", None)).await;
    assert_eq!(
        (status, code(&body)),
        (400, "BadRequestIterationIsPublished")
    );
    let (status, body) = call(&api, reqwest::Method::POST, &publish(second, "prod", None)).await;
    assert_eq!((status, code(&body)), (400, "BadRequestInvalidPublishName"));

    // With overwrite the name moves: the first iteration is no longer published.
    let (status, _) = call(
        &api,
        reqwest::Method::POST,
        &publish(second, "prod", Some("true")),
    )
    .await;
    assert_eq!(status, 200);
    let (_, it) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations/{first}"),
    )
    .await;
    assert_eq!(it["publishName"], "", "{it}");
    let (_, it) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations/{second}"),
    )
    .await;
    assert_eq!(it["publishName"], "prod");
    assert_eq!(it["originalPublishResourceId"], PREDICTION);

    // Unpublish: 204 with no body; a second time BadRequestIterationNotPublished.
    let unpublish = format!("projects/{pid}/iterations/{second}/publish");
    assert_eq!(
        call(&api, reqwest::Method::DELETE, &unpublish).await,
        (204, Value::Null)
    );
    let (status, body) = call(&api, reqwest::Method::DELETE, &unpublish).await;
    assert_eq!(
        (status, code(&body)),
        (400, "BadRequestIterationNotPublished")
    );

    // Now both can be deleted; a deleted iteration is gone for every operation.
    for it in [first, second] {
        let path = format!("projects/{pid}/iterations/{it}");
        assert_eq!(
            call(&api, reqwest::Method::DELETE, &path).await,
            (204, Value::Null)
        );
        let (status, body) = call(&api, reqwest::Method::GET, &path).await;
        assert_eq!((status, code(&body)), (404, "NotFoundIteration"));
        let (status, body) = call(&api, reqwest::Method::DELETE, &path).await;
        assert_eq!((status, code(&body)), (404, "NotFoundIteration"));
    }
    let (_, list) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations"),
    )
    .await;
    assert_eq!(list, Value::Array(vec![]));

    // A method the resource does not have is a JSON error, not an empty 405.
    let (status, body) = call(
        &api,
        reqwest::Method::PUT,
        &format!("projects/{pid}/iterations"),
    )
    .await;
    assert_eq!(status, 405);
    assert!(!code(&body).is_empty(), "{body}");
}

#[tokio::test]
async fn training_beyond_twenty_iterations_is_refused_until_one_is_deleted() {
    let (_s, api) = standin().await;
    let pid = api
        .create_project(&[("name", "Cap"), ("domainId", COMPACT_DOMAIN)])
        .await;
    let mut ids = Vec::new();
    for _ in 0..MAX_ITERATIONS {
        ids.push(trained(&api, pid).await);
    }
    let (status, body) = call(
        &api,
        reqwest::Method::POST,
        &format!("projects/{pid}/train?forceTrain=true"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        code(&body),
        "BadRequestExceedIterationPerProjectLimit",
        "{body}"
    );

    // Deleting the oldest frees a slot; the new iteration's name does not reuse a number.
    let (status, _) = call(
        &api,
        reqwest::Method::DELETE,
        &format!("projects/{pid}/iterations/{}", ids[0]),
    )
    .await;
    assert_eq!(status, 204);
    let newest = trained(&api, pid).await;
    let (_, it) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations/{newest}"),
    )
    .await;
    assert_eq!(it["name"], format!("Iteration {}", MAX_ITERATIONS + 1));
    let (_, list) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations"),
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), MAX_ITERATIONS);
}

#[tokio::test]
async fn a_test_can_choose_the_metrics_of_the_next_trainings() {
    let (s, api) = standin().await;
    let metrics = |p: f64| cvchain_standin::Metrics {
        precision: p,
        recall: p - 0.1,
        average_precision: p - 0.05,
    };
    s.set_faults(cvchain_standin::Faults {
        next_metrics: vec![metrics(0.7), metrics(0.95)],
        ..Default::default()
    });
    let pid = api
        .create_project(&[("name", "Metrics"), ("domainId", COMPACT_DOMAIN)])
        .await;
    for want in [0.7, 0.95] {
        let it = trained(&api, pid).await;
        let (status, perf) = call(
            &api,
            reqwest::Method::GET,
            &format!("projects/{pid}/iterations/{it}/performance"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(perf["precision"], want);
        assert_eq!(perf["averagePrecision"], want - 0.05);
        assert_eq!(perf["perTagPerformance"][0]["precision"], want);
    }
    // Then drawn from the seed again, within the usual range.
    let it = trained(&api, pid).await;
    let (_, perf) = call(
        &api,
        reqwest::Method::GET,
        &format!("projects/{pid}/iterations/{it}/performance"),
    )
    .await;
    assert!(perf["precision"].as_f64().unwrap() >= 0.8, "{perf}");
}
