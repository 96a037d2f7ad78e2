//! Replays the fuzzers' corpus (`fuzz/corpus/`) as a regular test: every input the fuzzers kept,
//! and every crash they ever found (`fuzz/regressions/`), runs through the same entry points.

use std::path::Path;

fn replay(dir: &str, run: fn(&[u8])) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&path) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let file = entry.unwrap().path();
        let data = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", file.display());
        n += 1;
    }
    n
}

#[test]
fn the_message_corpus_replays_without_a_panic() {
    let n = replay("fuzz/corpus/parse_message", cvchain_core::fuzzing::message)
        + replay(
            "fuzz/regressions/parse_message",
            cvchain_core::fuzzing::message,
        );
    assert!(n >= 18, "only {n} inputs: the corpus is missing");
}

#[test]
fn the_envelope_corpus_replays_without_a_panic() {
    let n = replay(
        "fuzz/corpus/decode_envelope",
        cvchain_core::fuzzing::envelope,
    ) + replay(
        "fuzz/regressions/decode_envelope",
        cvchain_core::fuzzing::envelope,
    );
    assert!(n >= 9, "only {n} inputs: the corpus is missing");
}
