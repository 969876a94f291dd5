//! Helpers shared by kiln's tests.
//!
//! Tests that need root, user namespaces, the unprivileged test user or a local registry
//! call [`require`]: outside CI a missing prerequisite skips the test with a printed reason;
//! under `CI=true` it fails the test, so CI never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the unprivileged user rootless tests run as (created by `scripts/setup-test-env`).
pub const TEST_USER: &str = "kiln-test";

/// Whether we run under CI (`CI=true`), where skipping is not allowed.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns `true` when the test may proceed. When `available` is false: under CI this
/// panics naming `what`; elsewhere it prints why the test is skipped and returns `false`.
#[must_use]
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !in_ci(),
        "prerequisite missing under CI=true: {what} (scripts/setup-test-env installs it)"
    );
    eprintln!("SKIPPED: {what} is not available here (set up with scripts/setup-test-env)");
    false
}

/// The workspace root (where the top-level Cargo.toml is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `../shared` next to the repository (or `$KILN_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"));
    assert!(
        dir.join("conformance/defs").is_dir(),
        "shared test vectors not found at {} (set KILN_SHARED_DIR)",
        dir.display()
    );
    dir
}

/// The conformance Definitions, as `(name, path to .pb)`, sorted by name.
pub fn conformance_defs() -> Vec<(String, PathBuf)> {
    let defs = shared_dir().join("conformance/defs");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&defs)
        .unwrap_or_else(|e| panic!("reading {}: {e}", defs.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pb")?.to_owned();
            Some((name, path))
        })
        .collect();
    out.sort();
    out
}

/// Whether this process runs as real root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Whether the unprivileged test user exists and has a subordinate id range.
pub fn test_user_ready() -> bool {
    let has_user = Command::new("id")
        .arg(TEST_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    let has_subuid = std::fs::read_to_string("/etc/subuid")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with(&format!("{TEST_USER}:"))));
    has_user && has_subuid && is_root() && which("runuser")
}

/// Whether `program` is on PATH.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
