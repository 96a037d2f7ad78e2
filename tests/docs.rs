//! The documentation keeps true: every relative link in README.md and docs/ resolves (the file,
//! and the heading an anchor names), nothing refers to what a clone does not have, the README
//! stays a front door, and every ```console example (`$ cvchain …` and what it prints) prints
//! what it shows, run against a run like `cvchain dev`'s (snapbox compares: `[..]` stands for any
//! text within a line, `...` for any lines; `[PROJECT]`, `[FIRST]` and `[SECOND]` for
//! the run's ids).

use cvchain_testkit::{DemoRun, repo_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut out = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The text outside fenced code blocks (links inside code are not links).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The `(target)` of every `[text](target)` in the prose.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation other than `-` and `_`
/// dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link} (no such file)", doc.display()));
                continue;
            }
            if let Some(a) = anchor
                && target.extension().is_some_and(|x| x == "md")
                && !anchors(&std::fs::read_to_string(&target).unwrap()).contains(&a.to_owned())
            {
                broken.push(format!("{}: {link} (no such heading)", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// A clone has no workplace folders, no issue tracker and no memory of how it was built: the
/// documents speak to users.
#[test]
fn the_documents_refer_to_nothing_a_clone_lacks() {
    let forbidden = [
        "../shared",
        "shared/reference",
        "shared/design",
        "this session",
        "final tree",
    ];
    let mut found = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let issue = lower.match_indices("issue").any(|(i, _)| {
                let after = lower[i + 5..].trim_start_matches(['s', ' ', '#']);
                after.starts_with(|c: char| c.is_ascii_digit())
            });
            if issue || forbidden.iter().any(|f| lower.contains(f)) {
                found.push(format!("{}:{}: {line}", doc.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The front door fits on a few screens, and its first screen has the two commands.
#[test]
fn the_readme_is_a_front_door() {
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() <= 200, "README.md is {} lines", lines.len());
    let first_screen = lines[..lines.len().min(70)].join("\n");
    for command in ["scripts/run-local", ".ci/run"] {
        assert!(
            first_screen.contains(command),
            "{command} is not on README.md's first screen"
        );
    }
}

/// One `$ cvchain …` of a console block and the output it shows.
struct Example {
    doc: PathBuf,
    line: usize,
    args: Vec<String>,
    expected: String,
}

/// Every command of every ```console block of every document.
fn examples() -> Vec<Example> {
    documents()
        .into_iter()
        .flat_map(|doc| {
            let text = std::fs::read_to_string(&doc).unwrap();
            examples_in(&doc, &text)
        })
        .collect()
}

fn examples_in(doc: &Path, text: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_console = false;
    let mut current: Option<Example> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            if in_console && let Some(e) = current.take() {
                out.push(e);
            }
            in_console = !in_console && trimmed == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            if let Some(e) = current.take() {
                out.push(e);
            }
            let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
            assert_eq!(
                words.first().map(String::as_str),
                Some("cvchain"),
                "{}:{}: a ```console block runs `cvchain` commands only (use ```sh for others)",
                doc.display(),
                n + 1
            );
            current = Some(Example {
                doc: doc.to_owned(),
                line: n + 1,
                args: words[1..].to_vec(),
                expected: String::new(),
            });
        } else if let Some(e) = current.as_mut() {
            e.expected.push_str(line);
            e.expected.push('\n');
        }
    }
    out
}

fn display(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[tokio::test]
async fn every_documented_command_prints_what_the_docs_show() {
    let examples = examples();
    if examples.is_empty() {
        return;
    }
    let run = DemoRun::start().await;
    let ids = [
        ("[PROJECT]", run.project.to_string()),
        ("[FIRST]", run.iterations[0].to_string()),
        ("[SECOND]", run.iterations[1].to_string()),
    ];
    let mut redactions = snapbox::Redactions::new();
    for (placeholder, value) in &ids {
        redactions.insert(placeholder, value.clone()).unwrap();
    }
    let assert = snapbox::Assert::new().redact_with(redactions);
    let mut failed = Vec::new();
    for e in &examples {
        let args: Vec<String> = e
            .args
            .iter()
            .map(|a| {
                ids.iter().fold(a.clone(), |a, (placeholder, value)| {
                    a.replace(placeholder, value)
                })
            })
            .collect();
        let out = tokio::task::spawn_blocking({
            let env = run.env.clone();
            move || {
                Command::new(env!("CARGO_BIN_EXE_cvchain"))
                    .args(&args)
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("RUST_LOG", "off")
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let actual = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = format!("{}:{}", display(&e.doc), e.line);
        if let Err(err) = assert.try_eq(
            Some(&name),
            snapbox::Data::text(actual.clone()),
            snapbox::Data::text(e.expected.clone()),
        ) {
            failed.push(format!(
                "{}:{}: `cvchain {}` printed something else:\n{err}\n--- it printed:\n{actual}",
                display(&e.doc),
                e.line,
                e.args.join(" ")
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn the_reader_finds_links_headings_and_examples() {
    let text = "x\n```console\n$ cvchain a b\none\n...\n$ cvchain c\ntwo\n```\n```sh\n$ ls\n```\n";
    let found = examples_in(Path::new("d.md"), text);
    let seen: Vec<(usize, String, String)> = found
        .iter()
        .map(|e| (e.line, e.args.join(" "), e.expected.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (3, "a b".to_owned(), "one\n...\n".to_owned()),
            (6, "c".to_owned(), "two\n".to_owned())
        ]
    );
    assert_eq!(links("see [a](b.md#c)\n```\n[z](w)\n```\n"), ["b.md#c"]);
    assert_eq!(
        anchors("# A b\n```\n# not a heading\n```\n## C, d\n"),
        ["a-b", "c-d"]
    );
    assert_eq!(
        slug("Release channels, the gate and retention"),
        "release-channels-the-gate-and-retention"
    );
}
