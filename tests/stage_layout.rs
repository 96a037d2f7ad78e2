//! `cvchain stage-app` produces a folder the Functions host accepts: checked against the host's
//! discovery rules, and by starting the staged handler the way the host would.

mod common;

use serde_json::Value;
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn stage_into(out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("stage-app")
        .arg(out)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn is_function_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.len() <= 128
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_binding_name(s: &str) -> bool {
    let mut c = s.chars();
    s == "$return"
        || (c.next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.len() <= 128
            && c.all(|c| c.is_ascii_alphanumeric()))
}

#[test]
fn the_staged_app_follows_the_hosts_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    let out = stage_into(&app);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("CustomVisionNotification"));

    let host = json(&app.join("host.json"));
    assert_eq!(host["version"], "2.0");
    assert_eq!(
        host["extensionBundle"]["id"],
        "Microsoft.Azure.Functions.ExtensionBundle"
    );
    assert_eq!(host["extensionBundle"]["version"], "[4.*, 5.0.0)");
    assert_eq!(host["extensions"]["queues"]["messageEncoding"], "none");
    assert_eq!(host["extensions"]["queues"]["maxDequeueCount"], 5);
    let desc = &host["customHandler"]["description"];
    let exe = desc["defaultExecutablePath"].as_str().unwrap();
    assert_eq!(
        exe, "cvchain",
        "a plain name, so zip deploy marks it executable"
    );
    assert_eq!(desc["arguments"], serde_json::json!(["serve"]));

    // The handler sits at the app root and is executable.
    let meta = fs::metadata(app.join(exe)).unwrap();
    assert!(meta.is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o111, 0o111);
    }

    // Function folders directly under the root, nothing nested under functions/.
    assert!(!app.join("functions").exists());
    let mut names = Vec::new();
    for entry in fs::read_dir(&app).unwrap() {
        let entry = entry.unwrap();
        if entry.path().join("function.json").is_file() {
            names.push(entry.file_name().into_string().unwrap());
        }
    }
    names.sort();
    assert_eq!(names, vec!["CustomVisionNotification", "History"]);
    for name in &names {
        assert!(is_function_name(name), "{name}");
    }
    let history = json(&app.join("History/function.json"));
    let hb = history["bindings"].as_array().unwrap();
    assert_eq!(hb[0]["type"], "httpTrigger");
    assert_eq!(hb[0]["route"], "history/{projectId?}");
    assert_eq!(hb[1]["type"], "http");
    assert!(
        hb.iter()
            .all(|b| is_binding_name(b["name"].as_str().unwrap()))
    );
    // Forwarding applies: exactly one httpTrigger in and one http out.
    assert_eq!(hb.len(), 2);
    assert_eq!(host["customHandler"]["enableForwardingHttpRequest"], true);
    let def = json(&app.join("CustomVisionNotification/function.json"));
    let bindings = def["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 1);
    let b = &bindings[0];
    assert!(is_binding_name(b["name"].as_str().unwrap()));
    assert_eq!(b["name"], cvchain::host::TRIGGER_BINDING);
    assert_eq!(b["type"], "queueTrigger");
    assert_eq!(b["direction"], "in");
    assert_eq!(b["queueName"], "%CVCHAIN_QUEUE%");
    assert_eq!(b["connection"], "CVCHAIN_STORAGE");
    assert_eq!(names[0], cvchain::host::FUNCTION_NAME);

    // Never deploy local settings.
    let ignore = fs::read_to_string(app.join(".funcignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "local.settings.json"));

    // The library's own check agrees.
    let layout = cvchain::stage::validate(&app).unwrap();
    assert_eq!(layout.functions, names);

    // Staging again replaces the folder.
    let again = stage_into(&app);
    assert!(again.status.success());
}

#[test]
fn the_staged_handler_starts_as_the_host_starts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    assert!(stage_into(&app).status.success());
    let host = json(&app.join("host.json"));
    let desc = &host["customHandler"]["description"];
    let exe = app.join(desc["defaultExecutablePath"].as_str().unwrap());
    let args: Vec<String> = desc["arguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let port = common::free_port();
    let mut child = Command::new(&exe)
        .args(&args)
        .current_dir(&app)
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("FUNCTIONS_APP_ROOT_PATH", &app)
        .env("FUNCTIONS_WORKER_RUNTIME", "custom")
        .env("AzureWebJobsStorage", "UseDevelopmentStorage=true")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready,
        "the staged handler did not listen on 127.0.0.1:{port}"
    );
}

#[test]
fn broken_layouts_are_refused_with_the_rule_they_break() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    assert!(stage_into(&app).status.success());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(app.join("cvchain"), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::create_dir_all(app.join("bad_binding")).unwrap();
    fs::write(
        app.join("bad_binding/function.json"),
        r#"{"bindings":[{"type":"queueTrigger","direction":"in","name":"my_item"}]}"#,
    )
    .unwrap();
    let err = cvchain::stage::validate(&app).unwrap_err().to_string();
    assert!(err.contains("cvchain: not executable"), "{err}");
    assert!(err.contains("binding name \"my_item\" is invalid"), "{err}");
    assert!(
        err.contains("queueTrigger needs queueName and connection"),
        "{err}"
    );

    // A folder that is not a staged app is never replaced.
    let other = tmp.path().join("precious");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("notes.txt"), "keep me").unwrap();
    let out = stage_into(&other);
    assert!(!out.status.success());
    assert!(other.join("notes.txt").exists());
}
