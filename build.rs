//! Link options for release builds on Linux; both serve a cold start (docs/benchmarks.md,
//! "Start-up").
//!
//! - Position-dependent executables (glibc targets). A PIE of this size carries some 25,000
//!   relative relocations that the loader applies on every start, writing each page of
//!   `.data.rel.ro` it touches: about 100 page faults and a millisecond here, which a fixed load
//!   address removes. The executable's own image then loads at a fixed address (shared
//!   libraries, heap and stack stay randomized); debug builds, which tests and `cvchain dev`
//!   use, stay PIE. `CVCHAIN_PIE=1` keeps the release build a PIE.
//! - Start-up code placed together (x86_64 glibc, linked by rust-lld: the default there from
//!   Rust 1.90). The functions `cvchain serve` runs before its first answer are spread over some
//!   80 of the 250 64 KiB stretches of its code, and each first touch of one is a page fault;
//!   listed in `build/startup-order.txt`, the linker puts them first, in about 11. A symbol the
//!   list names that the build lacks (the code changed since the list was made) is skipped: the
//!   list only decays, and `scripts/bench startup-order` makes it again.
//!   `CVCHAIN_LINK_ORDER=0` leaves it out.
//!
//! `CVCHAIN_LINK_MAP=<file>` writes the linker's map (symbols as the linker names them), which
//! `scripts/bench startup-order` reads.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/startup-order.txt");
    for var in ["CVCHAIN_PIE", "CVCHAIN_LINK_ORDER", "CVCHAIN_LINK_MAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let pie = std::env::var("CVCHAIN_PIE").is_ok_and(|v| v == "1");
    if release && !pie && target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
        println!("cargo:rustc-link-arg-examples=-no-pie");
    }
    let order = !matches!(std::env::var("CVCHAIN_LINK_ORDER").as_deref(), Ok("0"));
    if release && order && links_with_rust_lld(&target) {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={dir}/build/startup-order.txt,--no-warn-symbol-ordering"
        );
    }
    if let Ok(map) = std::env::var("CVCHAIN_LINK_MAP") {
        println!("cargo:rustc-link-arg-bins=-Wl,-Map={map},--no-demangle");
    }
}

/// Whether rust-lld links this build: the default for x86_64-unknown-linux-gnu from Rust 1.90
/// on, unless a linker was chosen. Another linker may not know the ordering option.
fn links_with_rust_lld(target: &str) -> bool {
    if target != "x86_64-unknown-linux-gnu" {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker")
        || std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .and_then(|v| v.split('.').nth(1)?.parse::<u32>().ok())
        .is_some_and(|minor| minor >= 90)
}
