//! In-root path handling: every path inside a rootfs is attacker-controlled, so it is
//! resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to the root's
//! directory descriptor, and anything created is created with `*at()` calls on the
//! descriptor of its already-resolved parent (never by joining strings, so a symlink swapped
//! in between cannot redirect the operation: CVE-2021-30465, CVE-2024-45310). Walking a
//! path to create it, each name is looked up in the directory already held with every
//! symlink refused (`RESOLVE_NO_SYMLINKS`), which cannot leave it either; a symlink met on
//! the way is followed by in-root resolution of the prefix.

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
    DirectoryWalk {
        sys,
        root,
        mode,
        owner,
    }
    .mkdir_all(path, 0)
}

/// Symlink targets created on the way (runc allows dangling symlinks in mount paths
/// because images rely on them, e.g. `/var/run -> /run` without `/run`).
const MAX_LINK_DEPTH: usize = 40;

/// One [`mkdir_all`]: where it resolves and how it creates what is missing.
struct DirectoryWalk<'a> {
    sys: &'a dyn Sys,
    root: BorrowedFd<'a>,
    mode: Mode,
    owner: Option<(u32, u32)>,
}

impl DirectoryWalk<'_> {
    fn mkdir_all(&self, path: &str, depth: usize) -> Result<OwnedFd, PathError> {
        let sys = self.sys;
        // Each component is looked up in the parent already held, refusing symlinks: one
        // component's lookup instead of every prefix's walk from the root. Only a symlink
        // sends the walk back to in-root resolution of the prefix, which follows it clamped.
        let mut current: Option<OwnedFd> = None;
        let mut prefix = String::new();
        for name in &clean_components(path) {
            prefix.push('/');
            prefix.push_str(name);
            let parent = current.as_ref().map_or(self.root, AsFd::as_fd);
            match sys.openat2(
                parent,
                Path::new(name),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                Mode::empty(),
                Resolve::PLAIN_NAME,
            ) {
                Ok(fd) => {
                    current = Some(fd);
                    continue;
                }
                // Missing (a symlink, dangling or not, would have been ELOOP): made below.
                Err(Errno::ENOENT) => {}
                Err(Errno::ENOTDIR) => return Err(PathError::NotDirectory { path: prefix }),
                Err(Errno::ELOOP) => {
                    current = Some(self.follow_symlink(parent, name, &prefix, depth)?);
                    continue;
                }
                Err(e) => return Err(err(&prefix, "open")(e)),
            }
            // Create in the parent we already hold, then open exactly what we created.
            match sys.mkdirat(parent, Path::new(name), self.mode) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(err(&prefix, "mkdir")(e)),
            }
            let created = sys
                .openat2(
                    parent,
                    Path::new(name),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                    Resolve::PLAIN_NAME,
                )
                .map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => PathError::NotDirectory {
                        path: prefix.clone(),
                    },
                    other => err(&prefix, "open")(other),
                })?;
            if let Some((uid, gid)) = self.owner {
                sys.fchownat(created.as_fd(), Path::new(""), uid, gid)
                    .map_err(err(&prefix, "chown"))?;
            }
            current = Some(created);
        }
        match current {
            Some(fd) => Ok(fd),
            None => open(sys, self.root, "/", OFlag::O_PATH | OFlag::O_DIRECTORY),
        }
    }

    /// Resolves the symlink `name` in `parent` (whose in-root path is `prefix`) in-root; a
    /// dangling one gets its target created first (in-root too).
    fn follow_symlink(
        &self,
        parent: BorrowedFd<'_>,
        name: &str,
        prefix: &str,
        depth: usize,
    ) -> Result<OwnedFd, PathError> {
        let (sys, root) = (self.sys, self.root);
        match open(sys, root, prefix, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Err(PathError::Sys {
                source: Errno::ENOENT,
                ..
            }) => {}
            Err(PathError::Sys {
                source: Errno::ENOTDIR,
                ..
            }) => {
                return Err(PathError::NotDirectory {
                    path: prefix.into(),
                });
            }
            resolved => return resolved,
        }
        let target = sys
            .readlinkat(parent, Path::new(name))
            .map_err(err(prefix, "readlink"))?;
        if depth >= MAX_LINK_DEPTH {
            return Err(PathError::Sys {
                path: prefix.into(),
                op: "resolve",
                source: Errno::ELOOP,
            });
        }
        let target = target.to_string_lossy();
        let absolute = if target.starts_with('/') {
            target.into_owned()
        } else {
            let dir = prefix.rsplit_once('/').map_or("", |(p, _)| p);
            format!("{dir}/{target}")
        };
        self.mkdir_all(&absolute, depth + 1)?;
        open(sys, root, prefix, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }
}

/// Ensures a mount target exists (creating a directory or an empty file, and missing
/// parents) and returns a descriptor of it (`O_PATH`, or the new file's own).
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
                Resolve::PLAIN_NAME,
            ) {
                // Exactly the file just made (a mount target needs no particular mode).
                Ok(created) => Ok(created),
                // An existing name may be a symlink (`/etc/resolv.conf -> ...`): in-root.
                Err(Errno::EEXIST) => open(sys, root, path, OFlag::O_PATH),
                Err(e) => Err(err(path, "create")(e)),
            }
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

    /// `mkdir_all` with mode 0755 in the fake's root.
    fn mkdir_755(
        sys: &RecordingSys,
        path: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<OwnedFd, PathError> {
        let root = sys.root().unwrap();
        mkdir_all(
            sys,
            root.as_fd(),
            path,
            Mode::from_bits_truncate(0o755),
            owner,
        )
    }

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
        mkdir_755(&sys, "/a/b/c", Some((5, 6))).unwrap();
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
    fn the_walk_looks_up_each_component_once_in_its_parent() {
        let sys = RecordingSys::new().unwrap().with("/a/b", Node::Dir);
        mkdir_755(&sys, "/a/b/c", None).unwrap();
        let opens: Vec<(String, Resolve)> = sys
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Open { path, resolve } => Some((path, resolve)),
                _ => None,
            })
            .collect();
        // /a/b/c twice: the lookup that missed, then what mkdirat made.
        let expected: Vec<(String, Resolve)> = ["/a", "/a/b", "/a/b/c", "/a/b/c"]
            .iter()
            .map(|p| ((*p).to_owned(), Resolve::PLAIN_NAME))
            .collect();
        assert_eq!(opens, expected);
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
        mkdir_755(&sys, "/var/run/lock", None).unwrap();
        assert_eq!(sys.node("/run/lock"), Some(Node::Dir));
        mkdir_755(&sys, "/x/z", None).unwrap();
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
        assert!(mkdir_755(&sys, "/a/c", None).is_err());
    }

    #[test]
    fn a_file_in_the_way_of_a_directory_is_an_error() {
        let sys = RecordingSys::new().unwrap().with("/a", Node::File);
        let err = mkdir_755(&sys, "/a/b", None).unwrap_err();
        assert!(matches!(err, PathError::NotDirectory { .. }), "{err}");
    }
}
