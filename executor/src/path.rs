//! In-root path handling: every path inside a rootfs is attacker-controlled, so it is
//! resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to the root's
//! directory descriptor, and anything created is created with `*at()` calls on the
//! descriptor of its already-resolved parent (never by joining strings, so a symlink swapped
//! in between cannot redirect the operation: CVE-2021-30465, CVE-2024-45310).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::sys::{FileKind, Resolve, Sys};

/// Errors from in-root path operations; each names the path inside the root.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{path}: {op}: {source}")]
    Sys {
        path: String,
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("{path}: a component is not a directory")]
    NotDirectory { path: String },
    #[error("{path}: must be an ordinary directory, not a symlink")]
    Symlink { path: String },
}

/// The normal components of `path` after lexical cleaning (`..` clamps at the root).
pub fn clean_components(path: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) => parts.push(name.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts
}

/// `path` cleaned to an absolute path (`/` for the root).
pub fn clean(path: &str) -> String {
    format!("/{}", clean_components(path).join("/"))
}

fn err<'a>(path: &'a str, op: &'static str) -> impl FnOnce(Errno) -> PathError + 'a {
    move |source| PathError::Sys {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Opens `path` inside `root` (symlinks followed, clamped to the root).
pub fn open(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &str,
    flags: OFlag,
) -> Result<OwnedFd, PathError> {
    let relative = clean_components(path).join("/");
    let relative = if relative.is_empty() { "." } else { &relative };
    sys.openat2(
        root,
        Path::new(relative),
        flags,
        Mode::empty(),
        Resolve::IN_ROOT,
    )
    .map_err(err(path, "open"))
}

/// Whether `path` exists inside `root` (a dangling final symlink counts as missing).
pub fn exists(sys: &dyn Sys, root: BorrowedFd<'_>, path: &str) -> Result<bool, PathError> {
    match open(sys, root, path, OFlag::O_PATH) {
        Ok(_) => Ok(true),
        Err(PathError::Sys {
            source: Errno::ENOENT | Errno::ENOTDIR,
            ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How a missing mount target is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Directory,
    File,
}

/// Ensures the directory `path` exists inside `root`, creating missing components with
/// `mode` (owned by `owner` when given), and returns an `O_PATH` descriptor of it.
pub fn mkdir_all(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &str,
    mode: Mode,
    owner: Option<(u32, u32)>,
) -> Result<OwnedFd, PathError> {
    mkdir_all_depth(sys, root, path, mode, owner, 0)
}

/// Symlink targets created on the way (runc allows dangling symlinks in mount paths
/// because images rely on them, e.g. `/var/run -> /run` without `/run`).
const MAX_LINK_DEPTH: usize = 40;

fn mkdir_all_depth(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &str,
    mode: Mode,
    owner: Option<(u32, u32)>,
    depth: usize,
) -> Result<OwnedFd, PathError> {
    let components = clean_components(path);
    let mut current = sys
        .openat2(
            root,
            Path::new("."),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
            Resolve::IN_ROOT,
        )
        .map_err(err("/", "open"))?;
    let mut prefix = String::new();
    for name in &components {
        prefix.push('/');
        prefix.push_str(name);
        match open(sys, root, &prefix, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => {
                current = fd;
                continue;
            }
            Err(PathError::Sys {
                source: Errno::ENOENT,
                ..
            }) => {}
            Err(PathError::Sys {
                source: Errno::ENOTDIR,
                ..
            }) => return Err(PathError::NotDirectory { path: prefix }),
            Err(e) => return Err(e),
        }
        // A dangling symlink: create its target (in-root), then resolve through it.
        if let Ok(target) = sys.readlinkat(current.as_fd(), Path::new(name)) {
            if depth >= MAX_LINK_DEPTH {
                return Err(PathError::Sys {
                    path: prefix,
                    op: "resolve",
                    source: Errno::ELOOP,
                });
            }
            let target = target.to_string_lossy();
            let absolute = if target.starts_with('/') {
                target.into_owned()
            } else {
                let parent = prefix.rsplit_once('/').map_or("", |(p, _)| p);
                format!("{parent}/{target}")
            };
            mkdir_all_depth(sys, root, &absolute, mode, owner, depth + 1)?;
            current = open(sys, root, &prefix, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
            continue;
        }
        // Create in the parent we already hold, then open exactly what we created.
        match sys.mkdirat(current.as_fd(), Path::new(name), mode) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(err(&prefix, "mkdir")(e)),
        }
        let created = sys
            .openat2(
                current.as_fd(),
                Path::new(name),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
                Resolve {
                    no_symlinks: true,
                    no_magiclinks: true,
                    ..Resolve::default()
                },
            )
            .map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => PathError::NotDirectory {
                    path: prefix.clone(),
                },
                other => err(&prefix, "open")(other),
            })?;
        if let Some((uid, gid)) = owner {
            sys.fchownat(created.as_fd(), Path::new(""), uid, gid)
                .map_err(err(&prefix, "chown"))?;
        }
        current = created;
    }
    Ok(current)
}

/// Ensures a mount target exists (creating a directory or an empty file, and missing
/// parents) and returns an `O_PATH` descriptor of it.
pub fn ensure_target(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &str,
    kind: TargetKind,
) -> Result<OwnedFd, PathError> {
    match kind {
        TargetKind::Directory => mkdir_all(sys, root, path, Mode::from_bits_truncate(0o755), None),
        TargetKind::File => {
            let mut components = clean_components(path);
            let Some(name) = components.pop() else {
                return Err(PathError::NotDirectory { path: path.into() });
            };
            let parent = mkdir_all(
                sys,
                root,
                &components.join("/"),
                Mode::from_bits_truncate(0o755),
                None,
            )?;
            match sys.openat2(
                parent.as_fd(),
                Path::new(&name),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o644),
                Resolve {
                    no_symlinks: true,
                    ..Resolve::default()
                },
            ) {
                Ok(_) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(err(path, "create")(e)),
            }
            open(sys, root, path, OFlag::O_PATH)
        }
    }
}

/// Opens `path` inside `root` without following a final symlink and requires a directory
/// (how `/proc` and `/sys` targets are checked: CVE-2019-19921).
pub fn open_plain_directory(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &str,
) -> Result<OwnedFd, PathError> {
    let fd = open(sys, root, path, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
    match sys.file_kind(fd.as_fd()).map_err(err(path, "stat"))? {
        FileKind::Directory => Ok(fd),
        FileKind::Symlink => Err(PathError::Symlink { path: path.into() }),
        _ => Err(PathError::NotDirectory { path: path.into() }),
    }
}

/// Splits a cleaned absolute path into its parent and final name.
pub fn split(path: &str) -> Option<(String, String)> {
    let mut components = clean_components(path);
    let name = components.pop()?;
    Some((format!("/{}", components.join("/")), name))
}

/// `Path` of a single component name (for `*at` calls).
pub fn name(name: &str) -> PathBuf {
    PathBuf::from(OsStr::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::recording::{Call, Node, RecordingSys};

    #[test]
    fn cleaning_clamps_dotdot_at_the_root() {
        assert_eq!(clean("../../../tmp/pwn"), "/tmp/pwn");
        assert_eq!(clean("/./../tmp/pwn"), "/tmp/pwn");
        assert_eq!(clean("tmp//pwn/"), "/tmp/pwn");
        assert_eq!(clean("/"), "/");
        assert_eq!(split("/a/b/c"), Some(("/a/b".into(), "c".into())));
    }

    #[test]
    fn mkdir_all_creates_missing_components_in_their_resolved_parents() {
        let sys = RecordingSys::new().unwrap().with("/a", Node::Dir);
        let root = sys.root().unwrap();
        mkdir_all(
            &sys,
            root.as_fd(),
            "/a/b/c",
            Mode::from_bits_truncate(0o755),
            Some((5, 6)),
        )
        .unwrap();
        let calls = sys.calls();
        assert!(calls.contains(&Call::Mkdir {
            path: "/a/b".into(),
            mode: 0o755
        }));
        assert!(calls.contains(&Call::Mkdir {
            path: "/a/b/c".into(),
            mode: 0o755
        }));
        assert!(calls.contains(&Call::Chown {
            path: "/a/b/c".into(),
            uid: 5,
            gid: 6
        }));
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Mkdir { path, .. } if path == "/a"))
        );
    }

    #[test]
    fn symlinks_in_targets_resolve_inside_the_root() {
        // /etc -> / (absolute): /etc/foo must land at /foo of the root, never the host's.
        let sys = RecordingSys::new()
            .unwrap()
            .with("/etc", Node::Symlink("/".into()));
        let root = sys.root().unwrap();
        ensure_target(&sys, root.as_fd(), "/etc/foo", TargetKind::Directory).unwrap();
        assert!(sys.calls().contains(&Call::Mkdir {
            path: "/foo".into(),
            mode: 0o755
        }));
        assert_eq!(sys.node("/foo"), Some(Node::Dir));
    }

    #[test]
    fn proc_target_that_is_a_symlink_is_refused() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/proc", Node::Symlink("/bad-proc".into()))
            .with("/bad-proc", Node::Dir);
        let root = sys.root().unwrap();
        assert!(matches!(
            open_plain_directory(&sys, root.as_fd(), "/proc"),
            Err(PathError::Symlink { .. })
        ));
    }

    #[test]
    fn dangling_symlinks_get_their_target_created_in_root() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/var/run", Node::Symlink("/run".into()))
            .with("/x", Node::Symlink("../../y".into()));
        let root = sys.root().unwrap();
        mkdir_all(
            &sys,
            root.as_fd(),
            "/var/run/lock",
            Mode::from_bits_truncate(0o755),
            None,
        )
        .unwrap();
        assert_eq!(sys.node("/run/lock"), Some(Node::Dir));
        mkdir_all(
            &sys,
            root.as_fd(),
            "/x/z",
            Mode::from_bits_truncate(0o755),
            None,
        )
        .unwrap();
        assert_eq!(
            sys.node("/y/z"),
            Some(Node::Dir),
            "relative target clamped at the root"
        );
    }

    #[test]
    fn symlink_loops_end_in_an_error() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/a", Node::Symlink("/b".into()))
            .with("/b", Node::Symlink("/a".into()));
        let root = sys.root().unwrap();
        assert!(
            mkdir_all(
                &sys,
                root.as_fd(),
                "/a/c",
                Mode::from_bits_truncate(0o755),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn a_file_in_the_way_of_a_directory_is_an_error() {
        let sys = RecordingSys::new().unwrap().with("/a", Node::File);
        let root = sys.root().unwrap();
        let err = mkdir_all(
            &sys,
            root.as_fd(),
            "/a/b",
            Mode::from_bits_truncate(0o755),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, PathError::NotDirectory { .. }), "{err}");
    }
}
