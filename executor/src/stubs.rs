//! Mount-point stubs (../shared/spec/exec-runtime.md §9): before a step runs, kiln notes
//! which mount destinations do not exist in the rootfs (and, with
//! `Meta.removeMountStubsRecursive`, which of their ancestors); after it ran, those that are
//! still empty are removed so they do not end up in the step's output layer.
//!
//! The step may have replaced a parent with a symlink meanwhile (CVE-2024-23652), so removal
//! resolves each parent in-root with no symlinks allowed at all, and removes with
//! `unlinkat` on that descriptor: nothing outside the rootfs can be touched, and a path that
//! now leads through a symlink is left alone.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;

use crate::path::{self, PathError};
use crate::sys::{Resolve, Sys};

/// Paths recorded before a step, in record order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stubs(pub Vec<String>);

/// Records the destinations in `paths` that do not exist in `root` (and their missing
/// ancestors when `recursive`).
pub fn record<'a>(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    paths: impl IntoIterator<Item = &'a str>,
    recursive: bool,
) -> Result<Stubs, PathError> {
    let mut stubs = Vec::new();
    for raw in paths {
        let mut current = path::clean(raw);
        if current == "/" || path::exists(sys, root, &current)? {
            continue;
        }
        stubs.push(current.clone());
        if !recursive {
            continue;
        }
        while let Some((parent, _)) = path::split(&current) {
            if parent == "/" || path::exists(sys, root, &parent)? {
                break;
            }
            stubs.push(parent.clone());
            current = parent;
        }
    }
    Ok(Stubs(stubs))
}

/// Removes the recorded stubs that are still empty. Failures are logged, not returned:
/// a stub left behind is cosmetic, a failed step would not be.
pub fn clean(sys: &dyn Sys, root: BorrowedFd<'_>, stubs: &Stubs) {
    for stub in &stubs.0 {
        if let Err(e) = remove_one(sys, root, stub) {
            tracing::debug!(stub, error = %e, "mount stub left in place");
        }
    }
}

fn remove_one(sys: &dyn Sys, root: BorrowedFd<'_>, stub: &str) -> Result<(), Errno> {
    let Some((parent, name)) = path::split(stub) else {
        return Ok(());
    };
    let relative = path::clean_components(&parent).join("/");
    let relative = if relative.is_empty() { "." } else { &relative };
    // No symlinks anywhere on the way: if the step swapped one in, skip this stub.
    let parent_fd = match sys.openat2(
        root,
        Path::new(relative),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
        Resolve {
            in_root: true,
            no_symlinks: true,
            no_magiclinks: true,
            no_xdev: false,
        },
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => return Ok(()),
        Err(e) => return Err(e),
    };
    let stat = match nix::sys::stat::fstatat(
        parent_fd.as_fd(),
        Path::new(&name),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(stat) => stat,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let parent_stat = nix::sys::stat::fstat(parent_fd.as_fd())?;
    let flag = match stat.st_mode & libc::S_IFMT {
        // A non-empty directory fails with ENOTEMPTY and stays.
        libc::S_IFDIR => UnlinkatFlags::RemoveDir,
        libc::S_IFREG if stat.st_size == 0 => UnlinkatFlags::NoRemoveDir,
        _ => return Ok(()),
    };
    match nix::unistd::unlinkat(parent_fd.as_fd(), Path::new(&name), flag) {
        Ok(()) => {}
        Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    }
    // Removing an entry changed the parent's times; put them back.
    let atime = TimeSpec::new(parent_stat.st_atime, parent_stat.st_atime_nsec);
    let mtime = TimeSpec::new(parent_stat.st_mtime, parent_stat.st_mtime_nsec);
    nix::sys::stat::futimens(parent_fd.as_fd(), &atime, &mtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::recording::{Node, RecordingSys};

    #[test]
    fn records_missing_destinations_and_ancestors_when_recursive() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/test", Node::Dir)
            .with("/etc/hosts", Node::File);
        let root = sys.root().unwrap();
        let paths = [
            "/etc/hosts",
            "/etc/resolv.conf",
            "/test/bar/x/y",
            "/",
            "/test",
        ];
        let flat = record(&sys, root.as_fd(), paths, false).unwrap();
        assert_eq!(flat.0, vec!["/etc/resolv.conf", "/test/bar/x/y"]);
        let deep = record(&sys, root.as_fd(), paths, true).unwrap();
        assert_eq!(
            deep.0,
            vec![
                "/etc/resolv.conf",
                "/test/bar/x/y",
                "/test/bar/x",
                "/test/bar"
            ]
        );
    }
}
