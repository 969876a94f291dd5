//! Helpers shared by the solver's image and export tests: running a body rootful (in a
//! private mount namespace) or rootless (as the test user in a user namespace), a tokio
//! runtime for inside those, and mounts undone on drop.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::path::PathBuf;

use kiln_snapshotter::{ImmutableRef, unmount};
use kiln_testsupport::{AsTestUser, RegistryGuard, is_root, require, rerun_as_test_user};

/// Serialises the tests of one binary. The bodies fork (private mount namespace, user
/// namespace); a fork while another test thread is inside a lazy initialisation (a
/// `OnceLock` in a crate, a lock in a library) would leave the child waiting forever.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `body` as root in a private mount namespace (skips without root outside CI).
pub fn rootful(body: impl FnOnce() -> anyhow::Result<()>) {
    if !require(is_root(), "root") {
        return;
    }
    let code = kiln_testsupport::run_in_private_mount_namespace(|| report(body()));
    assert_eq!(code, 0, "the rootful test body failed (see its output)");
}

/// Runs `body` as uid 0 of a user namespace of the unprivileged test user.
pub fn rootless(body: impl FnOnce() -> anyhow::Result<()>) {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    let code = kiln_executor::userns::run_in_user_namespace(|| report(body()))
        .expect("enter the user namespace");
    assert_eq!(code, 0, "the rootless test body failed (see its output)");
}

/// The test registry, started before any fork; `None` means skipped.
pub fn registry() -> Option<RegistryGuard> {
    kiln_testsupport::test_registry()
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("test body failed: {e:#}");
            1
        }
    }
}

/// A current-thread tokio runtime (built inside the forked test body).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The shared OCI layout with the test images.
pub fn shared_layout() -> PathBuf {
    kiln_testsupport::shared_dir().join("conformance/image/oci")
}

/// A read-only view of a ref, unmounted on drop.
pub struct Mounted {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    pub fn view(r: &ImmutableRef) -> anyhow::Result<Mounted> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m");
        std::fs::create_dir(&path)?;
        r.mountable().mount_readonly(&path)?;
        Ok(Mounted { path, _dir: dir })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            eprintln!("unmounting {}: {e}", self.path.display());
        }
    }
}
