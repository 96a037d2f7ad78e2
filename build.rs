//! Links release builds for Linux (glibc) as position-dependent executables. A PIE of this size
//! carries some 25,000 relative relocations that the loader applies on every start, writing
//! each page of `.data.rel.ro` it touches: about 100 page faults and a millisecond of a cold
//! start here, which a fixed load address removes (docs/benchmarks.md, "Start-up"). The
//! executable's own image then loads at a fixed address (shared libraries, heap and stack stay
//! randomized); debug builds, which tests and `cvchain dev` use, stay PIE.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CVCHAIN_PIE");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let target = std::env::var("TARGET").unwrap_or_default();
    // CVCHAIN_PIE=1 keeps the release build position-independent, for those who want its
    // executable randomized too at that cost.
    let pie = std::env::var("CVCHAIN_PIE").is_ok_and(|v| v == "1");
    if release && !pie && target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
        println!("cargo:rustc-link-arg-examples=-no-pie");
    }
}
