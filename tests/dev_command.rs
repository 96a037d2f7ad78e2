//! `cvchain dev`, the README's "run it" command: the whole chain on one machine, shown as it
//! happens, for a first model and a better one that production moves to, ending with the
//! history, the channels and the release blobs.

use cvchain_testkit::Azurite;
use std::process::Command;

#[test]
fn the_local_chain_runs_to_completion_and_shows_its_work() {
    let azurite = Azurite::start();
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("dev")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Use this test's Azurite rather than starting one in the repository.
        .env("CVCHAIN_STORAGE", azurite.connection_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "storage integration confirmed (ConnectionTest)",
        "Iteration 1 trained: precision",
        "export ONNX requested",
        "export TensorFlow:TensorFlowLite requested",
        "export DockerFile:Linux requested",
        "[##############################] 3/3 exports released",
        "chains complete in",
        "Widget Detector      Iteration 1",
        "→ Widget-Detector/Iteration-1/ONNX.zip",
        "models/Widget-Detector/Iteration-1/ONNX.zip",
        "models/Widget-Detector/Iteration-1/TensorFlow-TensorFlowLite.zip",
        "models/Widget-Detector/Iteration-1/DockerFile-Linux.zip",
        // The better second model: production moves to it.
        "Iteration 2 trained: precision 93.0%, recall 90.0%, mAP 92.0%; gate passed",
        "production now follows Iteration 2 (gate)",
        "production ONNX → Iteration 2",
        "models/Widget-Detector/channels/production/ONNX.zip",
        "models/Widget-Detector/channels/latest/DockerFile-Linux.zip",
        "production  TensorFlow:TensorFlowLite    Iteration 2",
        // The local webhook receiver checks every event's signature and prints it.
        "event training.completed (Iteration 1) — signature verified",
        "event gate.evaluated (Iteration 2) — signature verified",
        "event model.released ONNX (Iteration 2) — signature verified",
        "event chain.completed (Iteration 2) — signature verified",
        "32 event(s) received by the local webhook receiver, 32 signature(s) verified",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    cvchain_testkit::assert_no_secrets(
        "cvchain dev's output",
        &format!("{stdout}{stderr}"),
        &[cvchain_azure::storage::settings::DEV_ACCOUNT_KEY],
    );
}

/// `cvchain dev --trace`: each chain's trace as a tree, from spans kept in memory (no
/// collector): for each of the two trainings one trace holds its TrainingCompleted and every
/// ExportCompleted, their table, blob and Custom Vision calls under them, and the events'
/// deliveries; no key in any of it.
#[test]
fn trace_prints_each_chain_as_one_tree() {
    let azurite = Azurite::start();
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .args(["dev", "--trace"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CVCHAIN_STORAGE", azurite.connection_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let (_, trees) = stdout
        .split_once("Traces (one per chain")
        .unwrap_or_else(|| panic!("no traces in:\n{stdout}"));
    // One block per trace: its `trace <id>  (n spans, …)` line and the tree under it.
    let mut blocks: Vec<String> = Vec::new();
    for line in trees.lines() {
        if line.starts_with("trace ") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let chains: Vec<&String> = blocks
        .iter()
        .filter(|b| b.contains("TrainingCompleted") && b.contains("ExportCompleted"))
        .collect();
    assert_eq!(chains.len(), 2, "one trace per training's chain:\n{trees}");
    for chain in chains {
        let id = chain.split_whitespace().nth(1).unwrap();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        // Three exports, each its own invocation, all in the chain's trace.
        assert!(chain.matches("ExportCompleted").count() >= 3, "{chain}");
        for call in ["  table  ", "  blob  ", "  customvision  ", "send webhook"] {
            assert!(chain.contains(call), "no {call:?} in:\n{chain}");
        }
        // Calls are children of the invocations: indented under them.
        assert!(
            chain
                .lines()
                .any(|l| l.starts_with("│  ├─ ") || l.starts_with("   ├─ "))
        );
    }
    cvchain_testkit::assert_no_secrets(
        "cvchain dev --trace's output",
        &format!("{stdout}{stderr}"),
        &[
            cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
            "cvchain-dev-training-key",
        ],
    );
}

/// What a new user meets after the first run: a second run shows the same clean paths (the
/// previous run's data is removed, and says so), nothing warns about the stand-in's own
/// containers, and `--keep` hands over the environment so that `source .cvchain/dev.env` makes
/// `cvchain history` and `cvchain channels` in another shell read this run.
#[test]
fn a_second_run_is_as_clean_as_the_first_and_keep_hands_over_its_environment() {
    use std::io::BufRead;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        cvchain_testkit::repo_root().join("node_modules"),
        dir.path().join("node_modules"),
    )
    .unwrap();
    let dev = |keep: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cvchain"));
        c.arg("dev")
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        if keep {
            c.arg("--keep");
        }
        c
    };
    // The first run sends its events to the user's own webhook: it says how that went.
    let hook = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/hooks/ml",
                    axum::routing::post(|| async { axum::http::StatusCode::NO_CONTENT }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        format!("http://127.0.0.1:{port}/hooks/ml?code=not-for-logs")
    };
    let first = dev(false)
        .env("CVCHAIN_WEBHOOK_URL", &hook)
        .env(
            "CVCHAIN_WEBHOOK_SECRET",
            "whsec_c2VjcmV0LWZvci1jdmNoYWluLWRldi10ZXN0czE=",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("removed the previous run"), "{stdout}");
    assert!(!stderr.contains("could not write a model blob"), "{stderr}");
    assert!(
        !stdout.contains("received by the local webhook receiver"),
        "{stdout}"
    );
    let told = stdout
        .lines()
        .find(|l| l.starts_with("● events to webhook http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("where the events went, in:\n{stdout}"));
    assert!(
        told.ends_with("/hooks/ml: 32 of 32 event(s) delivered"),
        "{told}"
    );
    assert!(!stdout.contains("not-for-logs"), "{stdout}");

    let mut second = dev(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(second.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("then `cvchain history`") {
            break;
        }
    }
    let env_file = dir.path().join(".cvchain/dev.env");
    let stop = |child: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        child.wait().unwrap()
    };
    let check = std::panic::catch_unwind(|| {
        assert!(
            seen.contains("● removed the previous run's demo data (.azurite/)"),
            "{seen}"
        );
        for clean in [
            "models/Widget-Detector/Iteration-1/ONNX.zip",
            "models/Widget-Detector/Iteration-2/DockerFile-Linux.zip",
            "models/Widget-Detector/channels/production/ONNX.zip",
        ] {
            assert!(seen.contains(clean), "missing {clean} in:\n{seen}");
        }
        assert!(seen.contains("export CVCHAIN_STORAGE='"), "{seen}");
        assert!(seen.contains("export CVCHAIN_HISTORY_TABLE='"), "{seen}");
        assert!(seen.contains("export CVCHAIN_WEBHOOK_URL='"), "{seen}");
        let written = std::fs::read_to_string(&env_file).expect(".cvchain/dev.env is written");
        for line in seen.lines().filter(|l| l.starts_with("export ")) {
            assert!(written.contains(line), "{line} not in the file:\n{written}");
        }
        // Another shell: only the file, none of this test's environment.
        let shell = |command: &str| {
            let out = Command::new("bash")
                .args([
                    "-c",
                    &format!(
                        "source .cvchain/dev.env && {} {command}",
                        env!("CARGO_BIN_EXE_cvchain")
                    ),
                ])
                .current_dir(dir.path())
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "cvchain {command}:\n{text}");
            text
        };
        let history = shell("history");
        assert!(history.contains("Widget Detector"), "{history}");
        assert!(history.contains("Iteration 2"), "{history}");
        let pid = seen
            .lines()
            .find_map(|l| l.strip_prefix("● project \"Widget Detector\" "))
            .and_then(|l| l.split_whitespace().next())
            .expect("the project's id is printed");
        let channels = shell(&format!("channels --project {pid}"));
        assert!(
            channels.contains("production follows Iteration 2"),
            "{channels}"
        );
    });
    let status = stop(&mut second);
    if let Err(e) = check {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err);
        eprintln!("cvchain dev --keep's stderr:\n{err}");
        std::panic::resume_unwind(e);
    }
    assert!(status.success() || status.code().is_none(), "{status}");
    assert!(!env_file.exists(), "the environment file goes with the run");
}
