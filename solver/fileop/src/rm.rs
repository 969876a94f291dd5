//! The `rm` action and a descriptor-based `RemoveAll`.
//!
//! BuildKit's `rmPath`: the parent is resolved in-root following symlinks, the final name
//! is not followed (removing a symlink removes the link, never what it points to); without
//! `allowNotFound` the path must exist; the root itself cannot be removed. With
//! `allowWildcard` the pattern is resolved first and each match removed. Directories are
//! removed depth-first through descriptors opened `O_NOFOLLOW`, so a symlink inside a
//! removed tree is unlinked, never descended.
//!
//! One deliberate difference: BuildKit checks existence with `os.Stat`, which follows a
//! final symlink *on the host*, so whether `rm /link` fails depended on the host's file
//! system. Here existence is the entry's own (`lstat`): a symlink, dangling or not, is
//! there and is removed.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use kiln_proto::pb;

use crate::sys::{self, SysError};
use crate::walk::{self, WalkError, push_component};
use crate::wildcard::{self, WildcardError};
use kiln_proto::paths::clean as clean_path;

/// Errors removing paths.
#[derive(Debug, thiserror::Error)]
pub enum RmError {
    #[error("{path}: invalid empty path")]
    Root { path: String },
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Wildcard(#[from] WildcardError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// The `rm` action on the mounted destination root.
pub fn rm(root: BorrowedFd<'_>, action: &pb::FileActionRm) -> Result<(), RmError> {
    if action.allow_wildcard {
        for path in wildcard::resolve(root, &action.path, false)? {
            rm_path(root, &path, action.allow_not_found)?;
        }
        return Ok(());
    }
    rm_path(root, &action.path, action.allow_not_found)
}

fn rm_path(root: BorrowedFd<'_>, path: &str, allow_not_found: bool) -> Result<(), RmError> {
    let cleaned = clean_path(&format!("/{path}"));
    if cleaned == "/" {
        return Err(RmError::Root { path: cleaned });
    }
    let walked = match walk::walk(root, &cleaned, false) {
        Ok(walked) => walked,
        Err(WalkError::NotDirectory { .. }) | Err(WalkError::Sys(SysError::NotFound { .. }))
            if allow_not_found =>
        {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let target = walked.path();
    let (dir, name) = match walked.rest.as_slice() {
        // The final component resolved to a directory: remove it from its parent.
        [] => {
            let parent = walk::walk(root, &walk::dir_of(&target), true)?;
            let name = OsString::from(walk::base_of(&target));
            (parent.dir, name)
        }
        [name] => (walked.dir, name.clone()),
        _ if allow_not_found => return Ok(()),
        _ => return Err(SysError::NotFound { path: cleaned }.into()),
    };
    if sys::lstat_at(dir.as_fd(), &name, &target)?.is_none() {
        if allow_not_found {
            return Ok(());
        }
        return Err(SysError::NotFound { path: cleaned }.into());
    }
    remove_all(dir.as_fd(), &name, &target)?;
    Ok(())
}

/// Removes `name` in `dir` and, for a directory, everything below it, without recursion
/// and without following any symlink.
pub fn remove_all(dir: BorrowedFd<'_>, name: &OsStr, path: &str) -> Result<(), SysError> {
    let Some(stat) = sys::lstat_at(dir, name, path)? else {
        return Ok(());
    };
    if !sys::is_dir(&stat) {
        return sys::unlink_at(dir, name, false, path);
    }
    // (directory, names left, its path); each finished directory is removed from the one
    // below it on the stack (or from `dir`).
    let top = sys::open_dir_at(dir, name, path)?;
    let names = sys::list_dir(top.as_fd(), path)?;
    let mut stack: Vec<(OwnedFd, std::vec::IntoIter<OsString>, String, OsString)> =
        vec![(top, names.into_iter(), path.to_owned(), name.to_owned())];
    while let Some((current, names, current_path, _)) = stack.last_mut() {
        match names.next() {
            Some(child) => {
                let mut child_path = current_path.clone();
                push_component(&mut child_path, &child);
                let Some(stat) = sys::lstat_at(current.as_fd(), &child, &child_path)? else {
                    continue;
                };
                if sys::is_dir(&stat) {
                    let fd = sys::open_dir_at(current.as_fd(), &child, &child_path)?;
                    let names = sys::list_dir(fd.as_fd(), &child_path)?;
                    stack.push((fd, names.into_iter(), child_path, child));
                } else {
                    sys::unlink_at(current.as_fd(), &child, false, &child_path)?;
                }
            }
            None => {
                let Some((_, _, done_path, done_name)) = stack.pop() else {
                    break;
                };
                let parent = stack.last().map_or(dir, |(fd, ..)| fd.as_fd());
                sys::unlink_at(parent, &done_name, true, &done_path)?;
            }
        }
    }
    Ok(())
}
