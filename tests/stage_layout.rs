//! `cvchain stage-app` produces a folder the Functions host accepts: checked against the host's
//! discovery rules, and by starting the staged handler the way the host would.

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
    assert_eq!(
        names,
        vec!["CustomVisionNotification", "DeliverEvents", "History"]
    );
    for name in &names {
        assert!(is_function_name(name), "{name}");
    }
    let history = json(&app.join("History/function.json"));
    let hb = history["bindings"].as_array().unwrap();
    assert_eq!(hb[0]["type"], "httpTrigger");
    // The console: its pages and its forms' posts, under the function's key.
    assert_eq!(hb[0]["route"], "history/{*rest}");
    assert_eq!(hb[0]["methods"], serde_json::json!(["get", "post"]));
    assert_eq!(hb[0]["authLevel"], "function");
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
    assert_eq!(b["name"], cvchain_core::envelope::TRIGGER_BINDING);
    assert_eq!(b["type"], "queueTrigger");
    assert_eq!(b["direction"], "in");
    assert_eq!(b["queueName"], "%CVCHAIN_QUEUE%");
    assert_eq!(b["connection"], "CVCHAIN_STORAGE");
    assert_eq!(names[0], cvchain_core::envelope::FUNCTION_NAME);
    // The timer that delivers pending events: every minute, the binding named as the handler
    // reads it.
    let timer = json(&app.join("DeliverEvents/function.json"));
    let tb = timer["bindings"].as_array().unwrap();
    assert_eq!(tb.len(), 1);
    assert_eq!(tb[0]["type"], "timerTrigger");
    assert_eq!(tb[0]["direction"], "in");
    assert_eq!(tb[0]["name"], cvchain_core::envelope::TIMER_BINDING);
    assert_eq!(tb[0]["schedule"], "0 */1 * * * *");
    assert_eq!(names[1], cvchain_core::envelope::DELIVER_EVENTS_FUNCTION);

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
    let port = cvchain_testkit::free_port();
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
    fs::create_dir_all(app.join("bad_timer")).unwrap();
    fs::write(
        app.join("bad_timer/function.json"),
        r#"{"bindings":[{"type":"timerTrigger","direction":"in","name":"timer","schedule":"*/5 * * * *"}]}"#,
    )
    .unwrap();
    let err = cvchain::stage::validate(&app).unwrap_err().to_string();
    assert!(err.contains("timerTrigger needs a schedule"), "{err}");
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

/// A copy of the repository's app sources, with a `local.settings.json` holding a secret that
/// must never reach the zip.
fn source_with_local_settings(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(repo().join("host.json"), dir.join("host.json")).unwrap();
    for entry in fs::read_dir(repo().join("functions")).unwrap() {
        let from = entry.unwrap().path();
        let to = dir.join("functions").join(from.file_name().unwrap());
        fs::create_dir_all(&to).unwrap();
        fs::copy(from.join("function.json"), to.join("function.json")).unwrap();
    }
    fs::write(
        dir.join("local.settings.json"),
        r#"{"IsEncrypted":false,"Values":{"CUSTOM_VISION_TRAINING_KEY":"local-secret"}}"#,
    )
    .unwrap();
}

#[test]
fn the_package_zip_holds_the_app_with_an_executable_handler_and_no_local_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    source_with_local_settings(&src);
    let zip_path = tmp.path().join("dist/app.zip");
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .args(["stage-app", "dist/app", "--zip"])
        .arg(&zip_path)
        .current_dir(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The staged folder keeps local.settings.json for `func start`; the zip must not.
    assert!(src.join("dist/app/local.settings.json").is_file());

    let mut archive = zip::ZipArchive::new(fs::File::open(&zip_path).unwrap()).unwrap();
    let mut entries = Vec::new();
    for i in 0..archive.len() {
        let f = archive.by_index(i).unwrap();
        entries.push((
            f.name().unwrap().into_owned(),
            f.unix_mode().unwrap() & 0o777,
            f.size(),
        ));
    }
    let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            ".funcignore",
            "CustomVisionNotification/",
            "CustomVisionNotification/function.json",
            "DeliverEvents/",
            "DeliverEvents/function.json",
            "History/",
            "History/function.json",
            "cvchain",
            "host.json",
        ],
        "nothing else, and never local.settings.json"
    );
    let mode = |name: &str| entries.iter().find(|(n, _, _)| n == name).unwrap().1;
    assert_eq!(
        mode("cvchain"),
        0o755,
        "the handler must keep its execute bits"
    );
    assert_eq!(mode("host.json"), 0o644);
    let handler_size = entries.iter().find(|(n, _, _)| n == "cvchain").unwrap().2;
    assert_eq!(
        handler_size,
        fs::metadata(env!("CARGO_BIN_EXE_cvchain")).unwrap().len()
    );

    // The zip's host.json is the repository's, and names the handler the zip holds.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut archive.by_name("host.json").unwrap(), &mut text).unwrap();
    let host: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(host, json(&repo().join("host.json")));
    assert_eq!(
        host["customHandler"]["description"]["defaultExecutablePath"],
        "cvchain"
    );
    let mut ignore = String::new();
    std::io::Read::read_to_string(&mut archive.by_name(".funcignore").unwrap(), &mut ignore)
        .unwrap();
    assert!(ignore.lines().any(|l| l == "local.settings.json"));

    // The library's reader agrees, and so does Info-ZIP where it is installed.
    let (layout, _) = cvchain::stage::inspect_zip(&zip_path).unwrap();
    assert_eq!(
        layout.functions,
        vec!["CustomVisionNotification", "DeliverEvents", "History"]
    );
    if let Ok(listing) = Command::new("zipinfo").arg(&zip_path).output() {
        let listing = String::from_utf8_lossy(&listing.stdout);
        let line = listing.lines().find(|l| l.ends_with(" cvchain")).unwrap();
        assert!(line.starts_with("-rwxr-xr-x"), "{line}");
    }
}

#[test]
fn a_zip_without_execute_bits_or_with_local_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.zip");
    let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("host.json", opts).unwrap();
    std::io::Write::write_all(&mut zip, &fs::read(repo().join("host.json")).unwrap()).unwrap();
    zip.start_file("cvchain", opts.unix_permissions(0o644))
        .unwrap();
    zip.start_file("local.settings.json", opts).unwrap();
    zip.finish().unwrap();
    let err = cvchain::stage::inspect_zip(&path).unwrap_err().to_string();
    assert!(err.contains("cvchain: stored with mode 644"), "{err}");
    assert!(err.contains("no <Name>/function.json"), "{err}");
    assert!(err.contains(".funcignore: missing"), "{err}");
    assert!(
        err.contains("local.settings.json: must never be deployed"),
        "{err}"
    );
}
