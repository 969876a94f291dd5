//! A depth-first walk of a mounted tree by descriptor, in bytewise name order: each
//! directory is opened with `O_NOFOLLOW|O_DIRECTORY` relative to its parent, regular files
//! with `O_NOFOLLOW`, symlinks are read with `readlinkat`; a path string is only ever used
//! for messages. Hardlinked non-directories are reported once as themselves and then as
//! links to the first path seen. Sockets are skipped. The walk is iterative, so depth
//! cannot overflow the stack.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::error::ExportError;

/// The type of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

impl Kind {
    fn of(st: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(st.st_mode & nix::libc::S_IFMT) {
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFLNK => Kind::Symlink,
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFCHR => Kind::Char,
            SFlag::S_IFBLK => Kind::Block,
            SFlag::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        }
    }
}

/// One entry of the tree.
pub(crate) struct Entry<'a> {
    /// Path relative to the root (empty for the root itself).
    pub rel: &'a Path,
    /// Its name in `parent` (`.` for the root).
    pub name: &'a OsStr,
    pub stat: &'a FileStat,
    pub kind: Kind,
}

/// What a walk reports.
pub(crate) trait Visitor {
    /// A directory, before its children (the root first, with an empty `rel`).
    fn enter_dir(&mut self, e: &Entry<'_>) -> Result<(), ExportError>;
    /// A directory, after its children.
    fn leave_dir(&mut self, e: &Entry<'_>) -> Result<(), ExportError>;
    /// A regular file, opened read-only.
    fn file(&mut self, e: &Entry<'_>, file: std::fs::File) -> Result<(), ExportError>;
    /// A symlink and its target (never followed).
    fn symlink(&mut self, e: &Entry<'_>, target: &OsStr) -> Result<(), ExportError>;
    /// Another name for the non-directory first seen at `first`.
    fn hardlink(&mut self, e: &Entry<'_>, first: &Path) -> Result<(), ExportError>;
    /// A fifo or device node.
    fn special(&mut self, e: &Entry<'_>) -> Result<(), ExportError>;
}

pub(crate) fn sys_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> ExportError {
    let path = path.to_owned();
    move |source| ExportError::Sys { op, path, source }
}

fn list_dir(dir: BorrowedFd<'_>, rel: &Path) -> Result<Vec<OsString>, ExportError> {
    let fd = nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err("opening", rel))?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(sys_err("listing", rel))?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(sys_err("listing", rel))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

struct Frame {
    fd: OwnedFd,
    rel: PathBuf,
    name: OsString,
    stat: FileStat,
    names: std::vec::IntoIter<OsString>,
}

/// Walks the tree at `root` (a trusted path: kiln's own mount point).
pub(crate) fn walk(root: &Path, visitor: &mut dyn Visitor) -> Result<(), ExportError> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err("opening", root))?;
    let root_stat = nix::sys::stat::fstat(&root_fd).map_err(sys_err("stat", root))?;
    let names = list_dir(root_fd.as_fd(), Path::new(""))?;
    {
        let dot = OsStr::new(".");
        let e = Entry {
            rel: Path::new(""),
            name: dot,
            stat: &root_stat,
            kind: Kind::Dir,
        };
        visitor.enter_dir(&e)?;
    }
    let mut stack = vec![Frame {
        fd: root_fd,
        rel: PathBuf::new(),
        name: OsString::from("."),
        stat: root_stat,
        names: names.into_iter(),
    }];
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            let Some(done) = stack.pop() else { break };
            let e = Entry {
                rel: &done.rel,
                name: &done.name,
                stat: &done.stat,
                kind: Kind::Dir,
            };
            visitor.leave_dir(&e)?;
            continue;
        };
        let rel = top.rel.join(&name);
        let dir = top.fd.as_fd();
        let stat = nix::sys::stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(sys_err("stat", &rel))?;
        let kind = Kind::of(&stat);
        if kind == Kind::Socket {
            // Sockets are not exported (as tar and buildctl skip them), nor linked to.
            continue;
        }
        let entry = Entry {
            rel: &rel,
            name: &name,
            stat: &stat,
            kind,
        };
        if kind != Kind::Dir && stat.st_nlink > 1 {
            let key = (stat.st_dev, stat.st_ino);
            if let Some(first) = seen.get(&key) {
                visitor.hardlink(&entry, first)?;
                continue;
            }
            seen.insert(key, rel.clone());
        }
        match kind {
            Kind::Dir => {
                let fd = nix::fcntl::openat(
                    dir,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(sys_err("opening", &rel))?;
                visitor.enter_dir(&entry)?;
                let names = list_dir(fd.as_fd(), &rel)?;
                stack.push(Frame {
                    fd,
                    rel,
                    name,
                    stat,
                    names: names.into_iter(),
                });
            }
            Kind::File => {
                let fd = nix::fcntl::openat(
                    dir,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(sys_err("opening", &rel))?;
                visitor.file(&entry, std::fs::File::from(fd))?;
            }
            Kind::Symlink => {
                let target = nix::fcntl::readlinkat(dir, name.as_os_str())
                    .map_err(sys_err("reading the link", &rel))?;
                visitor.symlink(&entry, &target)?;
            }
            Kind::Fifo | Kind::Char | Kind::Block => visitor.special(&entry)?,
            Kind::Socket => {}
        }
    }
    Ok(())
}
