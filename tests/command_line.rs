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
