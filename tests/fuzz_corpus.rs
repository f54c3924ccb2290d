//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same entry functions the libFuzzer targets call (`dlq_bridge::fuzzing`),
//! on the stable toolchain, so CI checks every input the fuzzers kept
//! (including the crashes fixed since) without nightly or cargo-fuzz.
//! An entry that panics on a file fails its test, naming the file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use dlq_bridge::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-text panic)".into())
}

fn replay(target: &str) {
    // Debug frames are several times larger than the release ones libFuzzer
    // runs (8 MiB main thread): deeply nested corpus inputs (config YAML, and
    // filters at the nesting limit) need more than a test thread's 2 MiB.
    let target = target.to_string();
    std::thread::Builder::new()
        .name(format!("replay-{target}"))
        .stack_size(256 << 20)
        .spawn(move || replay_here(&target))
        .expect("spawn the replay thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
}

fn replay_here(target: &str) {
    let (_, entry) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz entry `{target}` in dlq_bridge::fuzzing::TARGETS"));
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| entry(&data))) {
            failures.push(format!("{}: {}", file.display(), panic_text(&*p)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} `{target}` corpus files panicked:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{target}: {} corpus files replayed", files.len());
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn filter_corpus() {
    replay("filter");
}

#[test]
fn servicebus_atom_corpus() {
    replay("servicebus_atom");
}

#[test]
fn attributes_corpus() {
    replay("attributes");
}

/// Every libFuzzer target has an entry, a corpus and a replay above, and
/// every entry has a target.
#[test]
fn every_target_is_replayed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut entries: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    entries.sort();
    assert_eq!(on_disk, entries, "fuzz/fuzz_targets/*.rs and fuzzing::TARGETS differ");
    let replayed = ["config", "filter", "servicebus_atom", "attributes"];
    for name in &entries {
        assert!(replayed.contains(&name.as_str()), "`{name}` has no replay test here");
    }
}

/// The fuzz crate needs nightly and cargo-fuzz, so CI does not build it. What
/// it holds is checked here instead: each target is the one line that hands
/// libFuzzer's input to its entry (compiled, and replayed above, in the
/// library), and each has its `[[bin]]` in fuzz/Cargo.toml, so the crate
/// cannot drift from the library unseen.
#[test]
fn every_target_only_calls_its_entry_and_is_a_bin_of_the_fuzz_crate() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let path = fuzz_dir().join(format!("fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&path).expect("the target's source");
        let code: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        assert_eq!(
            code,
            [
                "#![no_main]".to_string(),
                format!("libfuzzer_sys::fuzz_target!(|data: &[u8]| dlq_bridge::fuzzing::{name}(data));"),
            ],
            "{}",
            path.display()
        );
        let bin = format!("[[bin]]\nname = \"{name}\"\npath = \"fuzz_targets/{name}.rs\"\n");
        assert!(manifest.contains(&bin), "fuzz/Cargo.toml has no [[bin]] for `{name}`");
    }
    assert_eq!(
        manifest.matches("[[bin]]").count(),
        TARGETS.len(),
        "fuzz/Cargo.toml has a [[bin]] without an entry"
    );
}
