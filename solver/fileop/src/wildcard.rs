//! fsutil's `ResolveWildcards`, for copy sources and `rm` with `allowWildcard`: the path
//! is split at its first component containing `*`, `?` or `[`; the part before is
//! resolved in-root (its final symlink followed only with `followSymlink`) and must exist;
//! the part after is matched with `filepath.Match` against paths below it, in lexical
//! order, without following symlinks and without entering a matched directory.
//!
//! One deliberate difference: the walk stops at the pattern's depth (Go walks the whole
//! subtree and tests every path). `*`, `?` and escapes never match `/`, so deeper paths
//! cannot match; only a `[…]` class written to match `/` could, which a path split on `/`
//! cannot express anyway.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use crate::glob;
use crate::sys::{self, SysError};
use crate::walk::{self, WalkError, push_component};
use kiln_proto::paths::clean as clean_path;
use kiln_proto::paths::contains_wildcards;

/// Errors resolving a wildcard path.
#[derive(Debug, thiserror::Error)]
pub enum WildcardError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Splits a path before its first component with a wildcard (`splitWildcards`).
fn split_wildcards(path: &str) -> (String, String) {
    let cleaned = clean_path(path);
    let mut base: Vec<&str> = Vec::new();
    let mut pattern: Vec<&str> = Vec::new();
    let mut found = false;
    for (i, part) in cleaned.split('/').enumerate() {
        if !found && contains_wildcards(part) {
            found = true;
        }
        let part = if part.is_empty() && i == 0 { "/" } else { part };
        if found {
            pattern.push(part);
        } else {
            base.push(part);
        }
    }
    let join = |parts: &[&str]| {
        if parts.is_empty() {
            String::new()
        } else {
            clean_path(&parts.join("/"))
        }
    };
    (join(&base), join(&pattern))
}

/// The in-root paths `path` stands for. Without wildcards that is the cleaned path itself
/// (whether or not it exists).
pub fn resolve(
    root: BorrowedFd<'_>,
    path: &str,
    follow_links: bool,
) -> Result<Vec<String>, WildcardError> {
    let (base, pattern) = split_wildcards(path);
    if pattern.is_empty() {
        return Ok(vec![clean_path(&format!("/{base}"))]);
    }
    let walked = walk::walk(root, &base, follow_links)?;
    let base_path = walked.path();
    let Some(stat) = walked.stat()? else {
        return Err(SysError::NotFound { path: base_path }.into());
    };
    if !sys::is_dir(&stat) {
        // Go's walk visits only the base itself, which never matches.
        return Ok(Vec::new());
    }
    let dir = match walked.single_name() {
        Some(name) => sys::open_dir_at(walked.dir.as_fd(), name, &base_path)?,
        None => walked.dir,
    };
    let depth = pattern.split('/').count();
    let mut out = Vec::new();
    // Iterative depth-first walk in Go's order: (directory, names left, relative path,
    // in-root path).
    let mut stack: Vec<(OwnedFd, std::vec::IntoIter<OsString>, String, String)> = Vec::new();
    let names = sys::list_dir(dir.as_fd(), &base_path)?;
    stack.push((dir, names.into_iter(), String::new(), base_path.clone()));
    while let Some((dir, names, rel, dir_path)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let child_rel = if rel.is_empty() {
            String::from_utf8_lossy(name.as_bytes()).into_owned()
        } else {
            let mut r = rel.clone();
            push_component(&mut r, &name);
            r
        };
        let mut child_path = dir_path.clone();
        push_component(&mut child_path, &name);
        let Some(stat) = sys::lstat_at(dir.as_fd(), &name, &child_path)? else {
            continue;
        };
        // A malformed pattern matches nothing, as Go ignores Match's error here.
        if glob::matches(&pattern, &child_rel).unwrap_or(false) {
            out.push(child_path);
            continue;
        }
        let level = child_rel.split('/').count();
        if sys::is_dir(&stat) && level < depth {
            let child = sys::open_dir_at(dir.as_fd(), &name, &child_path)?;
            let names = sys::list_dir(child.as_fd(), &child_path)?;
            stack.push((child, names.into_iter(), child_rel, child_path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_the_first_wildcard_component() {
        assert_eq!(
            split_wildcards("/a/b*/c"),
            ("/a".to_owned(), "b*/c".to_owned())
        );
        assert_eq!(split_wildcards("/a/b"), ("/a/b".to_owned(), String::new()));
        assert_eq!(
            split_wildcards("/*.txt"),
            ("/".to_owned(), "*.txt".to_owned())
        );
        assert_eq!(
            split_wildcards("/a/\\*"),
            ("/a/\\*".to_owned(), String::new())
        );
    }
}
