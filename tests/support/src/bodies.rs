//! Running a test body rootful (as root, in a private mount namespace) or rootless (as
//! uid 0 of a user namespace of the unprivileged test user), plus what such bodies share:
//! a tokio runtime built inside the fork, a serialising lock, and read-only views of
//! snapshots that are unmounted on drop.

use std::path::PathBuf;

use kiln_snapshotter::{ImmutableRef, Mountable, unmount};

use crate::host::{
    AsTestUser, is_root, require, rerun_as_test_user, run_in_private_mount_namespace,
};

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
    let code = run_in_private_mount_namespace(|| report(body));
    assert_eq!(code, 0, "the rootful test body failed (see its output)");
}

/// Runs `body` as uid 0 of a user namespace of the unprivileged test user (the test
/// binary re-runs itself as that user; see [`rerun_as_test_user`]).
pub fn rootless(body: impl FnOnce() -> anyhow::Result<()>) {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    let code = kiln_executor::userns::run_in_user_namespace(|| report(body))
        .expect("enter the user namespace");
    assert_eq!(code, 0, "the rootless test body failed (see its output)");
}

/// Runs a forked test body and turns its outcome into an exit code, writing an error or a
/// panic's message straight to fd 2: libtest captures `eprintln!` and panic messages into
/// an in-process buffer, which a forked child takes with it when it exits.
fn report(body: impl FnOnce() -> anyhow::Result<()>) -> i32 {
    use std::io::Write as _;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let (code, message) = match outcome {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => (1, format!("test body failed: {e:#}")),
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a non-string payload)".to_owned());
            (101, format!("test body panicked: {text}"))
        }
    };
    let _ = writeln!(std::io::stderr().lock(), "{message}");
    code
}

/// A current-thread tokio runtime (built inside the forked test body).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// A mount on a private temporary mount point, undone on drop.
#[derive(Debug)]
pub struct Mounted {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(m: &Mountable) -> anyhow::Result<Mounted> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m");
        std::fs::create_dir(&path)?;
        m.mount(&path)?;
        Ok(Mounted { path, _dir: dir })
    }

    /// A read-only view of a committed ref.
    pub fn view(r: &ImmutableRef) -> anyhow::Result<Mounted> {
        Mounted::new(&r.mountable())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            eprintln!("unmounting {}: {e}", self.path.display());
        }
    }
}
