//! Crash safety: a subprocess imports, commits, releases and prunes in a loop and is
//! killed with SIGKILL at random points, several times; afterwards the store opens (which
//! recovers), verifies clean, and every committed layer still holds what it was given.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Layer;
use kiln_snapshotter::{ImportOptions, PruneOptions, RefOptions, Snapshotter};
use kiln_testsupport::{Mounted, rootful};
use rand::Rng as _;

const CHILD_ENV: &str = "KILN_CRASH_CHILD_ROOT";

/// The child: works on the store until it is killed.
fn churn(root: &Path) -> anyhow::Result<()> {
    let store = Snapshotter::open(root)?;
    let mut i = 0u64;
    loop {
        i += 1;
        let layer = Layer::new()
            .dir("d", 0o755)
            .file("d/content", format!("layer {i}").as_bytes())
            .opaque("d")
            .finish();
        let base = store.import_layer(None, &layer[..], &ImportOptions::default())?;
        let m = store.new_mutable(Some(&base), &RefOptions::default())?;
        for f in 0..20 {
            std::fs::write(m.dir().join(format!("f{f}")), format!("step {i}"))?;
        }
        std::fs::write(m.dir().join("id"), m.id())?;
        let committed = m.commit()?;
        let scratch = store.new_mutable(Some(&committed), &RefOptions::default())?;
        scratch.release()?;
        if i % 7 == 0 {
            // Prune some of what earlier iterations left (their handles are gone).
            store.prune(PruneOptions {
                keep_duration: Some(Duration::from_millis(30)),
            })?;
        }
    }
}

/// The parent: kill the child repeatedly, then check the store.
fn crash_and_verify(run_child: impl Fn() -> std::process::Child) -> anyhow::Result<()> {
    let mut rng = rand::rng();
    for round in 0..10 {
        let mut child = run_child();
        // The last round runs longer so that some work surely completes even on a slow
        // machine; the others stop it anywhere, from startup to mid-commit.
        let millis = if round == 9 {
            1500
        } else {
            rng.random_range(100..600)
        };
        std::thread::sleep(Duration::from_millis(millis));
        // The child forks into a namespace: kill the whole process group, and wait until
        // all of it is dead. The churn runs in a grandchild, which init reaps: on a loaded
        // machine it can still be exiting, holding its snapshot locks, when the check opens
        // the store, whose recovery then leaves its records to it.
        kiln_testsupport::kill_process_group(child.id());
        let status = child.wait()?;
        assert!(
            status.code().is_none(),
            "the churn loop stopped by itself: {status}"
        );
    }
    Ok(())
}

fn check_store(root: &Path) -> anyhow::Result<()> {
    let store = Snapshotter::open(root)?;
    let problems = store.verify()?;
    assert!(
        problems.is_empty(),
        "store inconsistent after kill -9: {problems:?}"
    );
    let records = store.du()?;
    assert!(!records.is_empty(), "the child made progress");
    let mut committed_steps = 0;
    for r in records {
        let layer = store.get(&r.id)?;
        let view = Mounted::view(&layer)?;
        if let Some(parent) = layer.parent() {
            // A committed step: its marker names itself, all its files are there.
            assert_eq!(std::fs::read_to_string(view.path.join("id"))?, layer.id());
            for f in 0..20 {
                assert!(view.path.join(format!("f{f}")).is_file());
            }
            assert!(parent.layer_info()?.is_some());
            committed_steps += 1;
        } else {
            let content = std::fs::read_to_string(view.path.join("d/content"))?;
            assert!(content.starts_with("layer "), "{content}");
        }
    }
    eprintln!("checked {committed_steps} committed steps after the kills");
    Ok(())
}

fn child_command(test: &str, root: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the churn child")
}

fn child_mode(in_namespace: impl FnOnce(Box<dyn FnOnce() -> i32>) -> i32) -> bool {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return false;
    };
    let root = std::path::PathBuf::from(root);
    let code = in_namespace(Box::new(move || match churn(&root) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("churn failed: {e:#}");
            1
        }
    }));
    panic!("the churn child ended with {code}");
}

#[test]
fn kill_during_commit_rootful() {
    if child_mode(kiln_testsupport::run_in_private_mount_namespace) {
        return;
    }
    if !kiln_testsupport::require(kiln_testsupport::is_root(), "root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    crash_and_verify(|| child_command("kill_during_commit_rootful", &root)).unwrap();
    rootful(|| check_store(&root));
}

#[test]
fn kill_during_commit_rootless() {
    if child_mode(|body| kiln_executor::userns::run_in_user_namespace(body).unwrap_or(125)) {
        return;
    }
    if kiln_testsupport::rerun_as_test_user() != kiln_testsupport::AsTestUser::Inner {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    crash_and_verify(|| child_command("kill_during_commit_rootless", &root)).unwrap();
    let code = kiln_executor::userns::run_in_user_namespace(|| match check_store(&root) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    })
    .unwrap();
    assert_eq!(code, 0);
}
