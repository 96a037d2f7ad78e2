//! Contract tests: the spec's own examples (x-ms-examples, in `tests/fixtures/customvision/`)
//! go through the stand-in's handlers, for v3.3 and v3.4-preview. Each example names its
//! operation in the spec; its parameters become the request (the example's project and iteration
//! ids replaced by the stand-in's, its domain by a compact one so the iteration can export), and
//! the answer must have the example's status and shape: every field the example shows, with the
//! same JSON type, and no field the version's schema does not define.

use cvchain_standin::{ApiVersion, COMPACT_DOMAIN, Standin, StandinConfig, script::TrainingScript};
use serde_json::{Value, json};
use std::time::Duration;

const KEY: &str = "contract-key";

/// The examples in the order a project lives through them.
const EXAMPLES: &[&str] = &[
    "GetDomains",
    "GetDomain",
    "CreateProject",
    "GetProject",
    "UpdateProject",
    "TrainProject",
    "GetIteration",
    "GetIterations",
    "ExportIteration",
    "GetExports",
    "PublishIteration",
    "UnpublishIteration",
];

/// Fields the stand-in answers that a version's schema lacks, on purpose: the integration's
/// URIs, which the service echoes in `settings` (v3.3's schema predates them).
const ALLOWED_EXTRA: &[(&str, &str)] = &[
    ("ProjectSettings", "exportModelContainerUri"),
    ("ProjectSettings", "notificationQueueUri"),
];

struct Operation {
    method: reqwest::Method,
    path: String,
    parameters: Vec<Value>,
    response_schema: Option<Value>,
}

/// The operation whose x-ms-examples refer to `./examples/{name}.json`.
fn operation(spec: &Value, name: &str) -> Operation {
    let target = format!("./examples/{name}.json");
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let refers = op["x-ms-examples"]
                .as_object()
                .is_some_and(|e| e.values().any(|v| v["$ref"] == target.as_str()));
            if refers {
                return Operation {
                    method: method.to_uppercase().parse().unwrap(),
                    path: path.clone(),
                    parameters: op["parameters"].as_array().cloned().unwrap_or_default(),
                    response_schema: op["responses"]["200"].get("schema").cloned(),
                };
            }
        }
    }
    panic!("no operation has the example {name}");
}

/// Differences between the example's shape and ours.
fn shape(example: &Value, ours: &Value, at: &str, out: &mut Vec<String>) {
    match (example, ours) {
        (Value::Null, _) => {}
        (Value::Object(e), Value::Object(o)) => {
            for (k, v) in e {
                match o.get(k) {
                    None => out.push(format!("{at}.{k} is missing")),
                    Some(ov) => shape(v, ov, &format!("{at}.{k}"), out),
                }
            }
        }
        (Value::Array(e), Value::Array(o)) => {
            if let Some(first) = e.first() {
                match o.first() {
                    None => out.push(format!("{at} is empty, the example's is not")),
                    Some(of) => shape(first, of, &format!("{at}[0]"), out),
                }
            }
        }
        (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => {}
        (e, o) => out.push(format!("{at}: the example has {e}, the stand-in {o}")),
    }
}

/// Fields of `ours` the schema does not define (following `$ref`s and array items).
fn undefined(spec: &Value, schema: &Value, ours: &Value, at: &str, out: &mut Vec<String>) {
    let (schema, name) = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/definitions/");
            (&spec["definitions"][name], name.to_owned())
        }
        None => (schema, String::new()),
    };
    match ours {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                undefined(spec, &schema["items"], item, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(fields) => {
            let Some(props) = schema["properties"].as_object() else {
                return;
            };
            for (k, v) in fields {
                match props.get(k) {
                    Some(p) => undefined(spec, p, v, &format!("{at}.{k}"), out),
                    None if ALLOWED_EXTRA.contains(&(name.as_str(), k.as_str())) => {}
                    None => out.push(format!("{at}.{k} is not in the schema {name}")),
                }
            }
        }
        _ => {}
    }
}

async fn run_examples(standin: &Standin, version: ApiVersion) {
    let spec: Value = serde_json::from_str(version.document()).unwrap();
    let base = format!(
        "{}/customvision/{}/training",
        standin.endpoint(),
        version.path()
    );
    let http = reqwest::Client::new();
    let script = TrainingScript::new(&standin.endpoint(), KEY);
    let mut project = String::new();
    let mut iteration = String::new();
    let mut problems = Vec::new();
    for name in EXAMPLES {
        let file =
            cvchain_testkit::repo_root().join(format!("tests/fixtures/customvision/{name}.json"));
        let example: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let op = operation(&spec, name);
        let params = &example["parameters"];
        let value = |p: &str| -> Option<Value> {
            match p {
                "projectId" => Some(json!(project)),
                "iterationId" => Some(json!(iteration)),
                _ => params.get(p).cloned(),
            }
        };
        let mut path = op.path.clone();
        let mut query: Vec<(String, String)> = Vec::new();
        let mut body: Option<Value> = None;
        for p in &op.parameters {
            let Some(pname) = p["name"].as_str() else {
                continue;
            };
            let Some(mut v) = value(pname) else {
                continue;
            };
            // The example's domain cannot export; the stand-in's world needs one that can.
            if pname == "domainId" && *name != "GetDomain" {
                v = json!(COMPACT_DOMAIN);
            }
            if pname == "updatedProject" {
                v["settings"]["domainId"] = json!(COMPACT_DOMAIN);
            }
            let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or(v.to_string());
            match p["in"].as_str() {
                Some("path") => path = path.replace(&format!("{{{pname}}}"), &text(&v)),
                Some("query") => query.push((pname.to_owned(), text(&v))),
                Some("body") => body = Some(v),
                _ => {}
            }
        }
        if *name == "TrainProject" {
            script
                .add_tagged_images(project.parse().unwrap(), &["a", "b"], 3)
                .await
                .unwrap();
        }
        let mut req = http
            .request(op.method.clone(), format!("{base}{path}"))
            .query(&query)
            .header("Training-Key", KEY);
        if let Some(b) = &body {
            req = req.json(b);
        }
        let rsp = req.send().await.unwrap();
        let status = rsp.status().as_u16();
        let text = rsp.text().await.unwrap();
        let (expected_status, expected) = example["responses"]
            .as_object()
            .unwrap()
            .iter()
            .next()
            .map(|(s, r)| (s.parse::<u16>().unwrap(), r["body"].clone()))
            .unwrap();
        assert_eq!(status, expected_status, "{} {name}: {text}", version.path());
        let ours: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        let at = format!("{} {name}", version.path());
        shape(&expected, &ours, &at, &mut problems);
        if let Some(schema) = &op.response_schema {
            undefined(&spec, schema, &ours, &at, &mut problems);
        }
        match *name {
            "CreateProject" => project = ours["id"].as_str().unwrap().to_owned(),
            "TrainProject" => {
                iteration = ours["id"].as_str().unwrap().to_owned();
                for _ in 0..200 {
                    let it: Value = http
                        .get(format!("{base}/projects/{project}/iterations/{iteration}"))
                        .header("Training-Key", KEY)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    if it["status"] == "Completed" {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            "ExportIteration" => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn the_specs_examples_go_through_the_stand_in_with_their_status_and_shape() {
    let standin = Standin::start(StandinConfig {
        training_key: KEY.into(),
        train_delay: Duration::from_millis(5),
        export_delay: Duration::from_millis(5),
        // The examples go one after another as fast as they answer, and are checked for their
        // own status: the calls-per-second limit has a test of its own.
        rate_limit: None,
        ..Default::default()
    })
    .await
    .unwrap();
    for version in ApiVersion::ALL {
        run_examples(&standin, version).await;
    }
}

#[test]
fn every_error_code_the_stand_in_answers_is_in_the_spec() {
    // The codes in the stand-in's sources: each must be one of the spec's CustomVisionErrorCodes
    // (v3.3's, but for the one chosen per version through `code_or`).
    let dir = cvchain_testkit::repo_root().join("crates/cvchain-standin/src");
    let mut files = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let v33 = ApiVersion::V3_3.spec();
    let v34 = ApiVersion::V3_4Preview.spec();
    let prefixes = ["BadRequest", "NotFound", "Forbidden", "Conflict", "Error"];
    let mut found = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for lit in text.split('"').skip(1).step_by(2) {
            let is_code = prefixes.iter().any(|p| lit.starts_with(p))
                && lit.chars().all(|c| c.is_ascii_alphanumeric());
            if !is_code || lit.starts_with("Error") && !lit.starts_with("ErrorUnknown") {
                // Image statuses (ErrorImageFormat, …) are another enum, checked per use.
                continue;
            }
            found += 1;
            assert!(
                v33.has_code(lit) || (lit == "BadRequestInvalidUri" && v34.has_code(lit)),
                "{}: {lit} is not a CustomVisionErrorCode",
                f.display()
            );
        }
    }
    assert!(found > 40, "only {found} codes found: the scan is broken");
}

#[tokio::test]
async fn both_versions_answer_in_any_casing_and_every_miss_is_a_json_error() {
    let standin = Standin::start(StandinConfig {
        training_key: KEY.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let get = |path: String| {
        http.get(format!("{}{path}", standin.endpoint()))
            .header("Training-Key", KEY)
            .send()
    };
    for base in [
        "/customvision/v3.3/training",
        "/customvision/v3.3/Training",
        "/customvision/v3.4-preview/training",
        "/customvision/v3.4-preview/TRAINING",
    ] {
        let rsp = get(format!("{base}/domains")).await.unwrap();
        assert_eq!(rsp.status(), 200, "{base}");
    }
    for path in [
        "/customvision/v9.9/training/domains",
        "/customvision/v3.4-preview/training/nothing-here",
        "/somewhere/else",
    ] {
        let rsp = get(path.into()).await.unwrap();
        assert_eq!(rsp.status(), 404, "{path}");
        let body: Value = rsp.json().await.unwrap();
        assert_eq!(body["code"], "NotFound", "{path}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// The resource serves 10 calls a second for all callers together, and refuses the rest as the
/// service does: 429, `Retry-After`, the rate-limit message. Refusals are logged apart.
#[tokio::test]
async fn over_ten_calls_a_second_are_refused_with_retry_after() {
    let standin = Standin::start(StandinConfig {
        training_key: KEY.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/customvision/v3.3/training/domains", standin.endpoint());
    let mut refused = None;
    // Rounds of 40 calls at once until one is refused (the first round is, on any machine that
    // answers 40 local calls within a second).
    for _ in 0..20 {
        let answers = futures::future::join_all(
            (0..40).map(|_| http.get(&url).header("Training-Key", KEY).send()),
        )
        .await;
        if let Some(r) = answers
            .into_iter()
            .map(Result::unwrap)
            .find(|r| r.status() == 429)
        {
            refused = Some(r);
            break;
        }
    }
    let rsp = refused.expect("no call was refused");
    assert_eq!(rsp.headers()["retry-after"], "1");
    let body: Value = rsp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeded rate limit")
    );
    let calls = standin.calls();
    assert!(calls.throttled["GetDomains"] >= 1);
    assert_eq!(
        calls.throttled_ms.len() as u64,
        calls.throttled["GetDomains"]
    );
    assert_eq!(
        calls.counts["GetDomains"] + calls.throttled["GetDomains"],
        calls.timeline_ms.len() as u64
    );
    // A wrong key is the gateway's 401, never a refusal for rate.
    let rsp = http
        .get(&url)
        .header("Training-Key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401);

    // Off, every call is served.
    standin.set_rate_limit(None);
    let answers = futures::future::join_all(
        (0..40).map(|_| http.get(&url).header("Training-Key", KEY).send()),
    )
    .await;
    assert!(answers.into_iter().all(|r| r.unwrap().status() == 200));
}
