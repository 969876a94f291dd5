//! The `mkdir` action and fsutil's `MkdirAll`, which copy and unpack use for destination
//! parents.
//!
//! BuildKit semantics: the path is resolved in-root following symlinks (a dangling one
//! gets its target created). With `makeParents` every missing component is created with
//! the action's mode, chowned to the owner and given the timestamp (each right after its
//! creation, so a parent's mtime moves again when its child appears, as in BuildKit); an
//! existing directory is left untouched and an existing non-directory is an error.
//! Without `makeParents` the parent must exist, and an existing entry at the path is not
//! an error (BuildKit ignores `EEXIST`). Created directories get exactly the requested
//! permission bits, whatever kiln's umask.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use kiln_proto::pb;

use crate::owner::Owner;
use crate::sys::{self, SysError};
use crate::walk::{self, WalkError, push_component};

/// Errors creating directories.
#[derive(Debug, thiserror::Error)]
pub enum MkdirError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// A unix timestamp in nanoseconds as the proto carries it (`-1` = not set).
pub fn timestamp(nanos: i64) -> Option<nix::sys::time::TimeSpec> {
    (nanos != -1).then(|| {
        sys::timespec(
            nanos.div_euclid(1_000_000_000),
            nanos.rem_euclid(1_000_000_000),
        )
    })
}

/// Owner and timestamp applied to a newly created entry (BuildKit's `Chown` + `Utimes`).
pub fn apply_new_metadata(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    owner: Option<Owner>,
    time: Option<&nix::sys::time::TimeSpec>,
    path: &str,
) -> Result<(), SysError> {
    if let Some(owner) = owner {
        sys::chown_at(dir, name, owner.uid, owner.gid, path)?;
    }
    if let Some(time) = time {
        sys::set_times_at(dir, name, time, time, path)?;
    }
    Ok(())
}

/// Creates one directory in `dir` with exactly `mode`; `false` if something exists.
fn create_dir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, path: &str) -> Result<bool, SysError> {
    if !sys::mkdir_at(dir, name, mode, path)? {
        return Ok(false);
    }
    // mkdir applies the process umask; BuildKit's modes are meant as given.
    sys::chmod_at(dir, name, mode, path)?;
    Ok(true)
}

/// fsutil's `MkdirAll` in-root: ensures `path` is a directory and returns it with its
/// resolved in-root path.
pub fn mkdir_all(
    root: BorrowedFd<'_>,
    path: &str,
    mode: u32,
    owner: Option<Owner>,
    time: Option<&nix::sys::time::TimeSpec>,
) -> Result<(OwnedFd, String), MkdirError> {
    let walked = walk::walk(root, path, true)?;
    let mut dir = walked.dir;
    let mut current = walked.dir_path;
    for name in &walked.rest {
        push_component(&mut current, name);
        if create_dir(dir.as_fd(), name, mode, &current)? {
            apply_new_metadata(dir.as_fd(), name, owner, time, &current)?;
        } else if !sys::lstat_at(dir.as_fd(), name, &current)?.is_some_and(|s| sys::is_dir(&s)) {
            return Err(SysError::NotDirectory { path: current }.into());
        }
        dir = sys::open_dir_at(dir.as_fd(), name, &current)?;
    }
    Ok((dir, current))
}

/// The `mkdir` action on the mounted destination root.
pub fn mkdir(
    root: BorrowedFd<'_>,
    action: &pb::FileActionMkDir,
    owner: Option<Owner>,
) -> Result<(), MkdirError> {
    let mode = (action.mode as u32) & 0o777;
    let time = timestamp(action.timestamp);
    if action.make_parents {
        mkdir_all(root, &action.path, mode, owner, time.as_ref())?;
        return Ok(());
    }
    let walked = walk::walk(root, &action.path, true)?;
    let path = walked.path();
    match walked.rest.as_slice() {
        // The path exists as a directory: EEXIST, which BuildKit ignores.
        [] => Ok(()),
        [name] => {
            if create_dir(walked.dir.as_fd(), name, mode, &path)? {
                apply_new_metadata(walked.dir.as_fd(), name, owner, time.as_ref(), &path)?;
            }
            Ok(())
        }
        // A parent is missing.
        [first, ..] => {
            let mut missing = walked.dir_path.clone();
            push_component(&mut missing, first);
            Err(SysError::NotFound { path: missing }.into())
        }
    }
}
