//! The registry console end to end: Azurite, the stand-in, `cvchain worker` running the chain and
//! `cvchain serve` serving the console, after a run like `cvchain dev`'s (two trainings, the
//! second promoted by the gate). Headless Chromium (Debian's package) driven by Playwright's
//! driver (`tests/browser/console.mjs`) opens the project list and the project's page, finds
//! the holders and the gate's verdicts, follows a release link to the backup's bytes, sees a
//! form post without its token refused, and promotes the first iteration with the page's form;
//! then the manifest and the channel copy are checked in storage, and each view's JSON against
//! the CLI's.

use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
use cvchain_testkit::{DemoRun, Handler, repo_root};
use serde_json::Value;
use sha2::Digest;
use std::process::Command;

struct World {
    run: DemoRun,
    console: Handler,
}

fn chromium() -> String {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|c| {
            let out = Command::new("which").arg(c).output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .expect("Chromium is not installed: .ci/run installs Debian's chromium package")
}

/// A run like `cvchain dev`'s, and `cvchain serve` serving its console.
async fn world(console_env: &[(&'static str, String)]) -> World {
    let run = DemoRun::start().await;
    let mut env = run.env.clone();
    env.extend(console_env.iter().cloned());
    let console = Handler::start(&env);
    World { run, console }
}

impl World {
    /// A cvchain command with this world's settings.
    fn cvchain(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.run.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cvchain {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn get_json(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(self.console.url(path))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn blob(&self, container: &str, name: &str) -> Vec<u8> {
        cvchain_testkit::blob_bytes(&self.run.clients, container, name).await
    }
}

/// Runs the browser script; returns what it saw.
async fn browse(args: Value) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(repo_root().join("tests/browser/console.mjs"))
            .arg(args.to_string())
            .current_dir(repo_root())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the browser script printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        seen.get("error").is_none(),
        "in the browser: {}",
        seen["error"]
    );
    seen
}

#[tokio::test]
async fn a_person_sees_fetches_and_moves_models_in_the_console() {
    let w = world(&[]).await;
    let (p, first) = (w.run.project, w.run.iterations[0]);
    let release = "Widgets/Iteration-1/ONNX.zip";
    let shots = tempfile::tempdir().unwrap();
    let chart_shot = shots.path().join("chart.png");
    let seen = browse(serde_json::json!({
        "chartShot": chart_shot,
        "base": w.console.url("").trim_end_matches('/'),
        "chromium": chromium(),
        "project": p.to_string(),
        "projectName": "Widgets",
        "first": first.to_string(),
        "releasePath": release,
        "screenshot": std::env::var("CVCHAIN_CONSOLE_SCREENSHOT").ok(),
    }))
    .await;

    // The list and the page.
    assert_eq!(seen["listHeading"], "Models");
    let list = seen["listText"].as_str().unwrap();
    assert!(
        list.contains("Widgets") && list.contains("Iteration 2"),
        "{list}"
    );
    assert_eq!(seen["title"], "Widgets");
    assert!(
        seen["pointer"].as_str().unwrap().starts_with("Iteration 2"),
        "{seen}"
    );
    let production = seen["productionOnnx"].as_str().unwrap();
    assert!(
        production.starts_with("Iteration 2")
            && production.contains("gate")
            && production.contains("before: Iteration 1"),
        "{production}"
    );
    assert!(
        seen["latestOnnx"]
            .as_str()
            .unwrap()
            .starts_with("Iteration 2")
    );
    assert_eq!(seen["gates"], serde_json::json!(["passed", "passed"]));
    assert_eq!(seen["chartSeries"], 3);
    assert_eq!(seen["chartThresholds"], 1);
    // Drawn under the page's policy: each series' line and points in its colour.
    for (name, colour) in cvchain_core::console::page::SERIES {
        let n = pixels_of(&chart_shot, colour);
        assert!(
            n > 300,
            "the {name} series has only {n} pixels in the chart"
        );
    }
    assert!(seen["events"].as_u64().unwrap() > 10, "{seen}");

    // The download link: a SAS for that one blob, read only; the bytes are the backup's.
    let href = seen["releaseHref"].as_str().unwrap();
    assert!(
        href.contains("sr=b") && href.contains("sp=r") && !href.contains("AccountKey"),
        "{href}"
    );
    let backup = w.blob("cvbackups", &format!("{p} - {first}.ONNX")).await;
    assert_eq!(seen["downloaded"]["size"], backup.len());
    assert_eq!(
        seen["downloaded"]["sha256"],
        hex(&sha2::Sha256::digest(&backup))
    );

    // Forged and misused posts are refused and change nothing.
    assert_eq!(seen["forged"]["status"], 403, "{seen}");
    assert!(
        seen["forged"]["body"]
            .as_str()
            .unwrap()
            .contains("no anti-forgery token")
    );
    assert_eq!(seen["misused"]["status"], 403);

    // The form's promotion: the page says what moved, and the channels follow.
    let notice = seen["notice"].as_str().unwrap();
    assert!(
        notice.contains("production pointer: Iteration 2 → Iteration 1 (manual)"),
        "{notice}"
    );
    assert!(
        seen["pointerAfter"]
            .as_str()
            .unwrap()
            .starts_with("Iteration 1")
    );
    assert!(
        seen["productionOnnxAfter"]
            .as_str()
            .unwrap()
            .starts_with("Iteration 1")
    );
    let manifest: Value =
        serde_json::from_slice(&w.blob("models", "Widgets/channels.json").await).unwrap();
    assert_eq!(
        manifest["productionPointer"]["iteration"]["id"],
        first.to_string()
    );
    assert_eq!(manifest["productionPointer"]["reason"], "manual");
    let copy = w
        .run
        .clients
        .blob_service()
        .unwrap()
        .blob_container_client("models")
        .blob_client("Widgets/channels/production/ONNX.zip");
    let props = copy.get_properties(None).await.unwrap();
    assert_eq!(
        props.metadata().unwrap().get("iterationid"),
        Some(&first.to_string())
    );
    assert_eq!(
        w.blob("models", "Widgets/channels/production/ONNX.zip")
            .await,
        backup
    );
    let moves = w.cvchain(&["history", "--rows", "--json", "--project", &p.to_string()]);
    assert!(
        moves.contains("back to the first model"),
        "the reason is recorded"
    );
}

/// How many pixels of the PNG are within a small distance of `colour` (`#rrggbb`).
fn pixels_of(png_path: &std::path::Path, colour: &str) -> usize {
    let rgb: Vec<i32> = (0..3)
        .map(|i| i32::from_str_radix(&colour[1 + 2 * i..3 + 2 * i], 16).unwrap())
        .collect();
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf[..info.buffer_size()]
        .chunks(info.color_type.samples())
        .filter(|p| {
            p[..3]
                .iter()
                .zip(&rgb)
                .all(|(a, b)| (*a as i32 - b).abs() <= 24)
        })
        .count()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every view's JSON says what the CLI says: the iterations as `cvchain history --json`, the
/// events as `cvchain events --json`; `cvchain channels` lists every project without
/// `--project`. A read-only console offers no form and refuses posts.
#[tokio::test]
async fn each_view_has_the_clis_json_and_a_read_only_console_moves_nothing() {
    let w = world(&[("CVCHAIN_CONSOLE_ACTIONS", "off".into())]).await;
    let p = w.run.project.to_string();

    let list = w.get_json("/api/history").await;
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["projectId"] == p)
        .expect("the project is listed");
    assert_eq!(entry["projectName"], "Widgets");
    assert_eq!(entry["newest"]["iterationName"], "Iteration 2");
    assert_eq!(entry["production"]["iterationName"], "Iteration 2");
    assert_eq!(entry["latest"]["iterationName"], "Iteration 2");

    let page = w.get_json(&format!("/api/history/{p}")).await;
    let cli: Value =
        serde_json::from_str(&w.cvchain(&["history", "--project", &p, "--json"])).unwrap();
    assert_eq!(page["iterations"], cli);
    let events: Vec<Value> = w
        .cvchain(&["events", "--project", &p, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let shown = page["events"].as_array().unwrap();
    assert!(!shown.is_empty());
    assert_eq!(shown[..], events[events.len() - shown.len()..]);
    assert_eq!(page["channels"][0]["pointer"], true);
    assert_eq!(page["manifest"], "Widgets/channels.json");
    assert!(
        page["downloads"]["Widgets/Iteration-2/ONNX.zip"]
            .as_str()
            .unwrap()
            .contains("sig=")
    );

    let channels = w.cvchain(&["channels"]);
    assert!(
        channels.contains("Widgets") && channels.contains(&p),
        "{channels}"
    );

    // Read-only: no form on the page, a post refused whatever it carries.
    let http = reqwest::Client::new();
    let html = http
        .get(w.console.url(&format!("/api/history/{p}")))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("Iteration 2") && !html.contains("<form"),
        "{html}"
    );
    let rsp = http
        .post(w.console.url(&format!("/api/history/{p}/rollback")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("channel=production&token=1.AAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 403);
    assert!(rsp.text().await.unwrap().contains("read-only"));
    let manifest: Value =
        serde_json::from_slice(&w.blob("models", "Widgets/channels.json").await).unwrap();
    assert_eq!(
        manifest["productionPointer"]["iteration"]["id"],
        w.run.iterations[1].to_string()
    );
}
