//! The command line: generated usage, `--help` per command, unknown flags named.

use std::process::{Command, Output};

fn cvchain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_usage_lists_every_command() {
    let out = cvchain(&["--help"]);
    assert!(out.status.success());
    let help = text(&out);
    for c in [
        "serve",
        "worker",
        "dev",
        "history",
        "check",
        "replay",
        "invoke",
        "stage-app",
    ] {
        assert!(
            help.contains(&format!("\n  {c} ")),
            "{c} missing from:\n{help}"
        );
    }
    // Without a command: the usage, and a failure status.
    let out = cvchain(&[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("Usage: cvchain <COMMAND>"));
    let out = cvchain(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("cvchain {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn each_command_has_help_with_its_flags() {
    for (command, flags) in [
        ("history", &["--project", "--json", "--rows", "--limit"][..]),
        ("replay", &["--limit"]),
        ("invoke", &["--url", "--id", "--dequeue-count", "FILE|-"]),
        ("stage-app", &["--binary", "--zip", "[OUT]"]),
        ("dev", &["--keep"]),
    ] {
        let out = cvchain(&[command, "--help"]);
        assert!(out.status.success(), "{command}: {}", text(&out));
        let help = text(&out);
        for f in flags {
            assert!(help.contains(f), "{command} --help lacks {f}:\n{help}");
        }
    }
}

#[test]
fn an_unknown_flag_or_value_is_named() {
    let out = cvchain(&["history", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("unexpected argument '--bogus'"),
        "{}",
        text(&out)
    );
    let out = cvchain(&["replay", "--limit", "many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--limit"), "{}", text(&out));
    let out = cvchain(&["serve", "extra"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("'extra'"), "{}", text(&out));
}

/// A user's mistake (a setting missing) is one message naming the setting, with no backtrace
/// even where developers keep `RUST_BACKTRACE=1` set.
#[test]
fn a_missing_setting_is_one_message_without_a_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .args(["history"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, no trace:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains("CVCHAIN_STORAGE"), "{err}");
    assert!(!err.contains("Stack backtrace"), "{err}");
}

/// `cvchain invoke` finds the handler where `cvchain serve` listens: the port the host gives
/// (`FUNCTIONS_CUSTOMHANDLER_PORT`), 8080 when unset; one default for both.
#[test]
fn invoke_goes_where_serve_listens() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        let body = r#"{"Outputs":{},"Logs":[],"ReturnValue":null}"#;
        write!(
            &stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        first
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.json");
    std::fs::write(
        &file,
        r#"{"version":"1.0","type":"ConnectionTest","Content":{}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .args(["invoke", file.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        server
            .join()
            .unwrap()
            .starts_with("POST /CustomVisionNotification HTTP/1.1")
    );
    let help = text(&cvchain(&["invoke", "--help"]));
    assert!(help.contains("FUNCTIONS_CUSTOMHANDLER_PORT"), "{help}");
    assert!(!help.contains("7072"), "{help}");
}
