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
