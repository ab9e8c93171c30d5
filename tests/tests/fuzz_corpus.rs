//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through the same target bodies
//! the fuzzers run, so CI keeps every input that ever found a bug (or new coverage) green on stable.

use std::path::Path;

use grinta_tests::fuzz::TARGETS;

#[test]
fn every_corpus_input_replays_without_failure() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut total = 0;
    for (target, run) in TARGETS {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("missing corpus directory {}", dir.display());
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus for {target}");
        for file in &files {
            let data = std::fs::read(file).expect("readable corpus file");
            run(&data);
        }
        println!("{target}: {} inputs replayed", files.len());
        total += files.len();
    }
    assert!(total > 0);
}
