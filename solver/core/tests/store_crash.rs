//! A writer killed with SIGKILL at random points leaves a store that opens cleanly, passes
//! its checks, and still holds every save the writer reported as committed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kiln_solver::store::{CacheResult, Link, Store};
use rand::Rng;

const WRITER_ENV: &str = "KILN_TEST_STORE_WRITER";

fn link(i: u64) -> Link {
    Link {
        input: 0,
        output: 0,
        digest: format!("sha256:{i:064x}"),
        selector: String::new(),
    }
}

/// The child's loop: each iteration saves one key with three links and a result in one
/// transaction, then reports its number. Run only as a subprocess of the test below.
#[test]
#[ignore = "helper: runs as the subprocess of killed_writer_leaves_a_consistent_store"]
fn store_writer_subprocess() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let store = Store::open(std::path::Path::new(&dir)).expect("open store");
    let start: u64 = std::env::var("KILN_TEST_STORE_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for i in start.. {
        let key = format!("key-{i}");
        let links: Vec<(String, Link)> = (0..3)
            .map(|j| (format!("root-{}", (i + j) % 7), link(i)))
            .collect();
        store
            .save(&key, &links, Some(&CacheResult::now(format!("result-{i}"))))
            .expect("save");
        println!("committed {i}");
    }
}

#[test]
fn killed_writer_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test executable");
    let mut rng = rand::rng();
    let mut committed: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args([
                "store_writer_subprocess",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, dir.path())
            .env("KILN_TEST_STORE_START", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let kill_after = rng.random_range(1..150);
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read writer output");
            if let Some(n) = line.strip_prefix("committed ") {
                committed.push(n.parse().expect("number"));
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        // The writer is in the middle of its next transaction (or between two).
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill writer");
        let status = child.wait().expect("wait writer");
        assert!(!status.success(), "round {round}: the writer was killed");

        let store = Store::open(dir.path()).expect("store opens after kill -9");
        let stats = store.check().expect("store is consistent");
        for i in &committed {
            let key = format!("key-{i}");
            let results = store.results(&key).expect("results");
            assert_eq!(results.len(), 1, "round {round}: {key} was committed");
            assert_eq!(results[0].id, format!("result-{i}"));
            // A committed save has all of its links, never some.
            for j in 0..3 {
                let source = format!("root-{}", (i + j) % 7);
                assert!(
                    store
                        .targets(&source, &link(*i))
                        .expect("targets")
                        .contains(&key)
                );
            }
        }
        // Anything beyond the committed ones is whole too (checked through the counts:
        // every key-N has exactly one result and its three links).
        assert_eq!(
            stats.results,
            stats.links / 3,
            "round {round}: no torn save"
        );
        next = committed.iter().max().map_or(0, |m| m + 1) + 1_000;
    }
    assert!(committed.len() >= 6);
}
