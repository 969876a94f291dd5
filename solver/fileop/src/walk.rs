//! In-root path resolution with the semantics of continuity's `fs.RootPath`, which
//! BuildKit's FileOp uses for every path: the path is cleaned lexically first, then walked
//! one component at a time from the root's descriptor; symlinks are followed inside the
//! root (an absolute target restarts at the root, `..` in a target climbs the directories
//! actually walked and stops at the root), components that do not exist are kept
//! lexically, and a final symlink is followed only when asked. Each directory is opened
//! `O_NOFOLLOW` relative to its already-open parent, so nothing outside the root is ever
//! reached, whatever the tree contains; at most 255 symlinks are followed per path.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::FileStat;

use crate::sys::{self, SysError};
use kiln_proto::paths::clean as clean_path;

/// Symlinks followed while resolving one path (continuity's limit).
const MAX_SYMLINKS: usize = 255;

/// Errors resolving a path inside a root.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("{path}: too many levels of symbolic links")]
    TooManyLinks { path: String },
    #[error("{path}: not a directory")]
    NotDirectory { path: String },
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Where a path led: the deepest existing directory and what is left below it.
#[derive(Debug)]
pub struct Walked {
    /// The deepest directory reached (opened `O_RDONLY|O_DIRECTORY`).
    pub dir: OwnedFd,
    /// Its in-root path after resolution (`/` for the root).
    pub dir_path: String,
    /// Components below `dir`: empty when the path is that directory; otherwise the
    /// first one either does not exist, or is the (only, final) non-directory entry
    /// (or an unfollowed final symlink).
    pub rest: Vec<OsString>,
}

impl Walked {
    /// The resolved in-root path.
    pub fn path(&self) -> String {
        let mut path = self.dir_path.clone();
        for name in &self.rest {
            push_component(&mut path, name);
        }
        path
    }

    /// The final entry when it exists below an existing directory: `Some(name)` if the
    /// path names an entry of `dir` (which may or may not exist), `None` if it is `dir`.
    pub fn single_name(&self) -> Option<&OsStr> {
        match self.rest.as_slice() {
            [name] => Some(name),
            _ => None,
        }
    }

    /// Whether the resolved path exists, with its `lstat` (a directory when `rest` is
    /// empty).
    pub fn stat(&self) -> Result<Option<FileStat>, SysError> {
        match self.rest.as_slice() {
            [] => sys::stat_fd(self.dir.as_fd(), &self.dir_path).map(Some),
            [name] => sys::lstat_at(self.dir.as_fd(), name, &self.path()),
            _ => Ok(None),
        }
    }
}

/// Appends one component to an in-root path.
pub fn push_component(path: &mut String, name: &OsStr) {
    if !path.ends_with('/') {
        path.push('/');
    }
    path.push_str(&String::from_utf8_lossy(name.as_bytes()));
}

/// Non-empty, non-`.` components of a path.
pub fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// Resolves `path` (absolute or relative, both taken from the root) inside `root`.
pub fn walk(root: BorrowedFd<'_>, path: &str, follow_final: bool) -> Result<Walked, WalkError> {
    let cleaned = clean_path(&format!("/{path}"));
    walk_components(root, components(cleaned.as_bytes()), follow_final)
}

/// [`walk`] for a path already split into components (which may be any bytes, as in a
/// tar archive); `..` climbs what was walked and stops at the root.
pub fn walk_components(
    root: BorrowedFd<'_>,
    components_in: Vec<Vec<u8>>,
    follow_final: bool,
) -> Result<Walked, WalkError> {
    let cleaned = {
        let mut p = String::from("/");
        for c in &components_in {
            push_component(&mut p, OsStr::from_bytes(c));
        }
        p
    };
    let mut pending: VecDeque<Vec<u8>> = components_in.into();
    // Directories opened below the root, with their names.
    let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
    // Components that do not exist: kept lexically.
    let mut missing: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(component) = pending.pop_front() {
        if component == b".." {
            // Only symlink targets bring `..` here (the path was cleaned): climb what was
            // actually walked, never above the root.
            if missing.pop().is_none() {
                stack.pop();
            }
            continue;
        }
        let name = OsStr::from_bytes(&component).to_owned();
        if !missing.is_empty() {
            missing.push(name);
            continue;
        }
        let current = stack.last().map_or(root, |(fd, _)| fd.as_fd());
        let display = display_path(&stack, &name);
        let Some(stat) = sys::lstat_at(current, &name, &display)? else {
            missing.push(name);
            continue;
        };
        let last = pending.is_empty();
        if sys::is_symlink(&stat) && (!last || follow_final) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(WalkError::TooManyLinks { path: cleaned });
            }
            let target = sys::read_link_at(current, &name, &display)?;
            let target = target.as_bytes();
            if target.starts_with(b"/") {
                stack.clear();
            }
            for part in components(target).into_iter().rev() {
                pending.push_front(part);
            }
            continue;
        }
        if sys::is_dir(&stat) {
            let fd = sys::open_dir_at(current, &name, &display)?;
            stack.push((fd, name));
            continue;
        }
        if !last {
            return Err(WalkError::NotDirectory { path: display });
        }
        missing.push(name);
    }
    let dir_path = display_stack(&stack);
    let dir = match stack.pop() {
        Some((fd, _)) => fd,
        None => sys::dup(root, "/")?,
    };
    Ok(Walked {
        dir,
        dir_path,
        rest: missing,
    })
}

fn display_stack(stack: &[(OwnedFd, OsString)]) -> String {
    let mut path = String::from("/");
    for (_, name) in stack {
        push_component(&mut path, name);
    }
    path
}

fn display_path(stack: &[(OwnedFd, OsString)], name: &OsStr) -> String {
    let mut path = display_stack(stack);
    push_component(&mut path, name);
    path
}

/// Go's `filepath.Split` on an in-root path: everything up to and including the last
/// `/`, and the rest.
pub fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Go's `filepath.Dir` of a cleaned absolute path.
pub fn dir_of(path: &str) -> String {
    let (dir, _) = split(path);
    clean_path(if dir.is_empty() { "." } else { dir })
}

/// Go's `filepath.Base`.
pub fn base_of(path: &str) -> String {
    kiln_proto::paths::base(path)
}

/// Go's `filepath.Join(a, b)` for an absolute `a`.
pub fn join(a: &str, b: &str) -> String {
    clean_path(&format!("{a}/{b}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_path_helpers() {
        assert_eq!(split("/a/b"), ("/a/", "b"));
        assert_eq!(split("/a/b/"), ("/a/b/", ""));
        assert_eq!(dir_of("/a/b"), "/a");
        assert_eq!(dir_of("/a"), "/");
        assert_eq!(base_of("/a/b/"), "b");
        assert_eq!(base_of("/"), "/");
        assert_eq!(base_of("/a/."), ".");
        assert_eq!(join("/a", "."), "/a");
        assert_eq!(join("/", "/"), "/");
    }
}
