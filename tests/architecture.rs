//! The design, checked: the core crate stays pure, the deployed handler carries no stand-in,
//! and no crate's modules import each other in a cycle.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The platform the tests run on, as rustc names it.
fn host() -> String {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host")
        .to_owned()
}

/// `cargo metadata` for the workspace on this platform, with the given feature flags.
fn metadata(flags: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &host()])
        .args(flags)
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The resolved dependency graph: normal and build dependencies only (what a build links), by
/// package name.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn of(meta: &Value) -> Self {
        let names: HashMap<&str, &str> = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
            .collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for node in meta["resolve"]["nodes"].as_array().unwrap() {
            let from = names[node["id"].as_str().unwrap()].to_owned();
            let to = edges.entry(from).or_default();
            for dep in node["deps"].as_array().unwrap() {
                let linked = dep["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build");
                if linked {
                    to.insert(names[dep["pkg"].as_str().unwrap()].to_owned());
                }
            }
        }
        Self { edges }
    }

    /// Every package `name` depends on.
    fn closure(&self, name: &str) -> BTreeSet<String> {
        assert!(self.edges.contains_key(name), "no package {name}");
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(n) = todo.pop() {
            for d in self.edges.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    }

    /// The packages in `within` that depend on `name` directly.
    fn dependents(&self, name: &str, within: &BTreeSet<String>) -> BTreeSet<String> {
        self.edges
            .iter()
            .filter(|(from, to)| within.contains(*from) && to.contains(name))
            .map(|(from, _)| from.clone())
            .collect()
    }
}

#[test]
fn the_core_depends_on_no_azure_runtime_or_http_crate() {
    let deps = Graph::of(&metadata(&[])).closure("cvchain-core");
    let forbidden: Vec<&String> = deps
        .iter()
        .filter(|d| {
            d.starts_with("azure_")
                || [
                    "tokio",
                    "axum",
                    "hyper",
                    "hyper-util",
                    "reqwest",
                    "tower",
                    "cvchain-azure",
                    "cvchain-standin",
                ]
                .contains(&d.as_str())
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "cvchain-core must stay pure, but depends on {forbidden:?}"
    );
    assert!(deps.contains("serde_json"), "{deps:?}");
}

#[test]
fn the_deployed_handler_carries_no_stand_in() {
    let graph = Graph::of(&metadata(&["--no-default-features"]));
    let package = graph.closure("cvchain");
    assert!(
        !package.contains("cvchain-standin"),
        "the package build (--no-default-features) must not contain the stand-in"
    );
    // The stand-in's TLS server (rustls' acceptor through tokio-rustls) goes with it: what TLS
    // the package still holds is the HTTPS client's (reqwest through hyper-rustls).
    let tls_users = graph.dependents("tokio-rustls", &package);
    assert!(
        tls_users.is_subset(&BTreeSet::from(["hyper-rustls".into(), "reqwest".into()])),
        "in the package, tokio-rustls is used by {tls_users:?}"
    );
    // A development build has it (for `cvchain dev`).
    assert!(
        Graph::of(&metadata(&[]))
            .closure("cvchain")
            .contains("cvchain-standin")
    );
}

/// A module's path from a source file: `src/history/row.rs` → `history::row`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The modules a line refers to through `crate::…` and `super::…`, as full paths.
fn references(line: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            // `crate::{a::x, b}`: each group member's first segment.
            let paths: Vec<Vec<String>> = if let Some(group) = after.strip_prefix('{') {
                group
                    .split(',')
                    .map(|m| ident(m.trim()))
                    .filter(|p| !p.is_empty())
                    .collect()
            } else {
                vec![ident(after)]
            };
            for p in paths {
                let mut full = base.clone();
                full.extend(p);
                out.push(full);
            }
            rest = after;
        }
    }
    out
}

/// Cycles among sibling modules, at any depth, of the crate whose sources are in `src`.
fn module_cycles(src: &Path) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(src, f);
        let text = std::fs::read_to_string(f).unwrap();
        let mut in_block_comment = false;
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("/*") {
                in_block_comment = true;
            }
            if in_block_comment {
                in_block_comment = !t.contains("*/");
                continue;
            }
            if t.starts_with("//") {
                continue;
            }
            for r in references(line, &from) {
                // The longest module path the reference names.
                let Some(to) = (1..=r.len())
                    .rev()
                    .map(|n| r[..n].to_vec())
                    .find(|p| modules.contains(p))
                else {
                    continue;
                };
                let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
                if common < from.len() && common < to.len() {
                    edges
                        .entry(from[..=common].join("::"))
                        .or_default()
                        .insert(to[..=common].join("::"));
                }
            }
        }
    }
    // Depth-first search for back edges.
    let mut cycles = Vec::new();
    let mut state: HashMap<String, u8> = HashMap::new();
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut HashMap<String, u8>,
        stack: &mut Vec<String>,
        cycles: &mut Vec<Vec<String>>,
    ) {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    cycles.push(c);
                }
                Some(_) => {}
                None => visit(m, edges, state, stack, cycles),
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
    }
    for n in edges.keys() {
        if !state.contains_key(n) {
            visit(n, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    cycles
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let mut crates = vec![root().join("src")];
    for e in std::fs::read_dir(root().join("crates")).unwrap() {
        crates.push(e.unwrap().path().join("src"));
    }
    for src in crates {
        let cycles = module_cycles(&src);
        assert!(
            cycles.is_empty(),
            "{}: modules import each other in a cycle: {}",
            src.display(),
            cycles
                .iter()
                .map(|c| c.join(" → "))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    // The check itself: two modules that import each other are reported.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::B;\n").unwrap();
    std::fs::write(src.join("b.rs"), "use crate::{c::C, a};\n").unwrap();
    std::fs::create_dir(src.join("c")).unwrap();
    std::fs::write(src.join("c/mod.rs"), "mod x;\nmod y;\n").unwrap();
    std::fs::write(src.join("c/x.rs"), "use super::y::Y;\n").unwrap();
    std::fs::write(
        src.join("c/y.rs"),
        "// use super::x;\nuse crate::c::x::X;\n",
    )
    .unwrap();
    let cycles = module_cycles(src);
    let shown: Vec<String> = cycles.iter().map(|c| c.join(" → ")).collect();
    assert!(shown.contains(&"a → b → a".to_owned()), "{shown:?}");
    assert!(
        shown.contains(&"c::x → c::y → c::x".to_owned()),
        "{shown:?}"
    );
    assert_eq!(shown.len(), 2, "{shown:?}");
}
