//! Replays every checked-in fuzz input (the corpora under `fuzz/corpus/`
//! and any crash or timeout input kept under `fuzz/regressions/`) through
//! the same target bodies the fuzzers run (`cleanroom_tests::fuzz`), on
//! stable Rust, as part of `cargo test`.

use std::path::Path;

use cleanroom_tests::fuzz::TARGETS;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_checked_in_input_still_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in TARGETS {
        if *name == "node_requests" {
            continue;
        }
        let corpus = inputs(&root.join("corpus").join(name));
        // The corpora are part of the repository: an empty one means they were lost.
        assert!(corpus.len() >= 3, "fuzz/corpus/{name} has {} inputs", corpus.len());
        for file in corpus.iter().chain(&inputs(&root.join("regressions").join(name))) {
            let data = std::fs::read(file).unwrap();
            target(&data);
        }
    }
}

/// The `node_requests` inputs, replayed against both nodes running in this
/// process; and they get through: the nodes answered the analyst and the
/// hostile peer, queries were answered (and checked against the plaintext
/// truth) and the bank accepted joins from the hostile matcher. The inputs
/// are dealt to `LANES` pairs of nodes replayed side by side (most of a
/// script's time is spent waiting for a node's timeout, not computing).
#[test]
fn every_checked_in_node_script_still_passes_and_reaches_the_nodes() {
    use cleanroom_tests::node_fuzz::{LANES, node_requests_on};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = inputs(&root.join("corpus/node_requests"));
    assert!(
        corpus.len() >= 3,
        "fuzz/corpus/node_requests has {} inputs",
        corpus.len()
    );
    let all: Vec<_> = corpus
        .iter()
        .chain(&inputs(&root.join("regressions/node_requests")))
        .cloned()
        .collect();
    std::thread::scope(|s| {
        let lanes: Vec<_> = (0..LANES)
            .map(|lane| {
                let files: Vec<_> = all.iter().skip(lane).step_by(LANES).collect();
                s.spawn(move || {
                    for file in files {
                        node_requests_on(lane, &std::fs::read(file).unwrap());
                    }
                })
            })
            .collect();
        for lane in lanes {
            if let Err(panic) = lane.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let r = cleanroom_tests::node_fuzz::reached_so_far();
    println!("{} scripts reached: {r:?}", corpus.len());
    assert!(
        r.analyst_frames > 0 && r.peer_frames > 0 && r.answered > 0 && r.joins_accepted > 0,
        "{r:?}"
    );
}

/// Writes the seed corpus (run once by hand; the fuzzers grow it):
/// `cargo test -p cleanroom-tests --test fuzz_regressions -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files under fuzz/corpus"]
fn write_seed_corpus() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    cleanroom_tests::fuzz::write_seed_corpus(&repo.join("fuzz/corpus"), &repo);
}
