//! A [`Sys`] that records every call against a tiny in-memory tree instead of touching
//! the kernel, so mount and path logic can be unit-tested without root.
//!
//! Descriptors it returns are real (duplicates of one `/dev/null` handle) so they can be
//! owned and dropped like the real ones; the fake remembers which path each one stands for.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

use super::{FileKind, MountAttrs, Resolve, Sys, SysResult};

/// What a path in the fake tree is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File,
    Symlink(PathBuf),
}

/// One recorded call, with descriptors replaced by the paths they stand for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Open {
        path: String,
        resolve: Resolve,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    Mknod {
        path: String,
        kind: &'static str,
        mode: u32,
        dev: u64,
    },
    Symlink {
        target: String,
        path: String,
    },
    CloneTree {
        path: String,
        recursive: bool,
    },
    NewFilesystem {
        fstype: String,
        options: Vec<String>,
        attrs: MountAttrs,
    },
    MoveMount {
        tree: String,
        target: String,
    },
    SetAttr {
        path: String,
        recursive: bool,
        attrs: MountAttrs,
    },
    MakeRslave,
    Pivot {
        root: String,
    },
}

/// The recording fake. `/` of the fake tree is whatever the root descriptor stands for.
#[derive(Debug)]
pub struct RecordingSys {
    template: OwnedFd,
    nodes: RefCell<BTreeMap<String, Node>>,
    fds: RefCell<BTreeMap<RawFd, String>>,
    calls: RefCell<Vec<Call>>,
}

impl RecordingSys {
    /// A fake with an empty root directory.
    pub fn new() -> std::io::Result<Self> {
        let template = std::fs::File::open("/dev/null")?.into();
        let mut nodes = BTreeMap::new();
        nodes.insert("/".to_owned(), Node::Dir);
        Ok(RecordingSys {
            template,
            nodes: RefCell::new(nodes),
            fds: RefCell::new(BTreeMap::new()),
            calls: RefCell::new(Vec::new()),
        })
    }

    /// Adds a node (and missing parent directories) to the fake tree.
    pub fn with(self, path: &str, node: Node) -> Self {
        let mut current = PathBuf::from("/");
        for component in Path::new(path).components().skip(1) {
            current.push(component);
            self.nodes
                .borrow_mut()
                .entry(current.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
        }
        self.nodes
            .borrow_mut()
            .insert(normalize(Path::new(path)), node);
        self
    }

    /// A descriptor standing for the fake root.
    pub fn root(&self) -> std::io::Result<OwnedFd> {
        self.fd_for("/")
    }

    /// The recorded calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// The fake tree's node at `path`.
    pub fn node(&self, path: &str) -> Option<Node> {
        self.nodes.borrow().get(path).cloned()
    }

    fn fd_for(&self, path: &str) -> std::io::Result<OwnedFd> {
        let fd = self.template.try_clone()?;
        self.fds
            .borrow_mut()
            .insert(fd.as_raw_fd(), path.to_owned());
        Ok(fd)
    }

    fn path_of(&self, fd: BorrowedFd<'_>) -> SysResult<String> {
        self.fds
            .borrow()
            .get(&fd.as_raw_fd())
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call);
    }

    /// In-root resolution over the fake tree: `base` (the directory descriptor) acts as
    /// `/`, `..` clamps there and symlinks are followed relative to it, as
    /// `RESOLVE_IN_ROOT` does.
    fn resolve(
        &self,
        base: &str,
        path: &Path,
        resolve: Resolve,
        follow_last: bool,
    ) -> SysResult<String> {
        let under = |parts: &[String]| {
            let tail = parts.join("/");
            match (base, tail.is_empty()) {
                (_, true) => base.to_owned(),
                ("/", false) => format!("/{tail}"),
                (_, false) => format!("{base}/{tail}"),
            }
        };
        let mut queue: Vec<String> = Vec::new();
        for component in path.components().rev() {
            match component {
                Component::Normal(n) => queue.push(n.to_string_lossy().into_owned()),
                Component::ParentDir => queue.push("..".to_owned()),
                _ => {}
            }
        }
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(name) = queue.pop() {
            if name == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(name);
            let current = under(&resolved);
            let is_last = queue.is_empty();
            let link = match self.nodes.borrow().get(&current) {
                Some(Node::Symlink(target)) => Some(target.clone()),
                _ => None,
            };
            if let Some(target) = link {
                if is_last && !follow_last {
                    return Ok(current);
                }
                if resolve.no_symlinks {
                    return Err(Errno::ELOOP);
                }
                hops += 1;
                if hops > 40 {
                    return Err(Errno::ELOOP);
                }
                resolved.pop();
                if target.is_absolute() {
                    resolved.clear();
                }
                for component in target.components().rev() {
                    match component {
                        Component::Normal(n) => queue.push(n.to_string_lossy().into_owned()),
                        Component::ParentDir => queue.push("..".to_owned()),
                        _ => {}
                    }
                }
            }
        }
        Ok(under(&resolved))
    }
}

fn normalize(path: &Path) -> String {
    let s = path.to_string_lossy();
    if s.len() > 1 {
        s.trim_end_matches('/').to_owned()
    } else {
        s.into_owned()
    }
}

fn join(dir: &str, name: &Path) -> String {
    if name.is_absolute() {
        normalize(name)
    } else if name.as_os_str().is_empty() || name == Path::new(".") {
        dir.to_owned()
    } else if dir == "/" {
        format!("/{}", name.display())
    } else {
        format!("{dir}/{}", name.display())
    }
}

impl Sys for RecordingSys {
    fn openat2(
        &self,
        dir: BorrowedFd<'_>,
        path: &Path,
        flags: OFlag,
        _mode: Mode,
        resolve: Resolve,
    ) -> SysResult<OwnedFd> {
        let base = self.path_of(dir)?;
        let follow_last = !flags.contains(OFlag::O_NOFOLLOW);
        // Refusing symlinks needs the walk too (RESOLVE_NO_SYMLINKS: ELOOP on any).
        let target = if resolve.in_root || resolve.no_symlinks {
            self.resolve(&base, path, resolve, follow_last)?
        } else {
            normalize(Path::new(&join(&base, path)))
        };
        self.record(Call::Open {
            path: target.clone(),
            resolve,
        });
        let exists = self.nodes.borrow().contains_key(&target);
        if !exists {
            if flags.contains(OFlag::O_CREAT) {
                self.nodes.borrow_mut().insert(target.clone(), Node::File);
            } else {
                return Err(Errno::ENOENT);
            }
        } else if flags.contains(OFlag::O_CREAT) && flags.contains(OFlag::O_EXCL) {
            return Err(Errno::EEXIST);
        }
        if flags.contains(OFlag::O_DIRECTORY)
            && self.nodes.borrow().get(&target) != Some(&Node::Dir)
        {
            return Err(Errno::ENOTDIR);
        }
        self.fd_for(&target).map_err(|_| Errno::EMFILE)
    }

    fn file_kind(&self, fd: BorrowedFd<'_>) -> SysResult<FileKind> {
        let path = self.path_of(fd)?;
        Ok(match self.nodes.borrow().get(&path) {
            Some(Node::Dir) => FileKind::Directory,
            Some(Node::File) => FileKind::Regular,
            Some(Node::Symlink(_)) => FileKind::Symlink,
            None => FileKind::Other,
        })
    }

    fn mkdirat(&self, dir: BorrowedFd<'_>, name: &Path, mode: Mode) -> SysResult<()> {
        let path = join(&self.path_of(dir)?, name);
        self.record(Call::Mkdir {
            path: path.clone(),
            mode: mode.bits(),
        });
        if self.nodes.borrow().contains_key(&path) {
            return Err(Errno::EEXIST);
        }
        self.nodes.borrow_mut().insert(path, Node::Dir);
        Ok(())
    }

    fn readlinkat(&self, dir: BorrowedFd<'_>, name: &Path) -> SysResult<PathBuf> {
        let path = join(&self.path_of(dir)?, name);
        match self.nodes.borrow().get(&path) {
            Some(Node::Symlink(target)) => Ok(target.clone()),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    fn fchownat(&self, dir: BorrowedFd<'_>, name: &Path, uid: u32, gid: u32) -> SysResult<()> {
        let base = self.path_of(dir)?;
        let path = if name.as_os_str().is_empty() {
            base
        } else {
            join(&base, name)
        };
        self.record(Call::Chown { path, uid, gid });
        Ok(())
    }

    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &Path,
        kind: SFlag,
        mode: Mode,
        dev: u64,
    ) -> SysResult<()> {
        let path = join(&self.path_of(dir)?, name);
        let kind = if kind == SFlag::S_IFCHR {
            "char"
        } else if kind == SFlag::S_IFBLK {
            "block"
        } else {
            "other"
        };
        self.record(Call::Mknod {
            path: path.clone(),
            kind,
            mode: mode.bits(),
            dev,
        });
        self.nodes.borrow_mut().insert(path, Node::File);
        Ok(())
    }

    fn symlinkat(&self, target: &Path, dir: BorrowedFd<'_>, name: &Path) -> SysResult<()> {
        let path = join(&self.path_of(dir)?, name);
        self.record(Call::Symlink {
            target: target.display().to_string(),
            path: path.clone(),
        });
        self.nodes
            .borrow_mut()
            .insert(path, Node::Symlink(target.to_path_buf()));
        Ok(())
    }

    fn clone_tree(&self, dir: BorrowedFd<'_>, path: &Path, recursive: bool) -> SysResult<OwnedFd> {
        let base = self.path_of(dir)?;
        let source = if path.as_os_str().is_empty() {
            base
        } else if path.is_absolute() {
            normalize(path)
        } else {
            join(&base, path)
        };
        self.record(Call::CloneTree {
            path: source.clone(),
            recursive,
        });
        self.fd_for(&format!("tree:{source}"))
            .map_err(|_| Errno::EMFILE)
    }

    fn move_mount_onto(&self, tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> SysResult<()> {
        let tree = self.path_of(tree)?;
        let target = self.path_of(target)?;
        self.record(Call::MoveMount { tree, target });
        Ok(())
    }

    fn new_filesystem(
        &self,
        fstype: &str,
        options: &[(String, Option<String>)],
        attrs: MountAttrs,
    ) -> SysResult<OwnedFd> {
        let options = options
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        self.record(Call::NewFilesystem {
            fstype: fstype.to_owned(),
            options,
            attrs,
        });
        self.fd_for(&format!("fs:{fstype}"))
            .map_err(|_| Errno::EMFILE)
    }

    fn mount_setattr(
        &self,
        target: BorrowedFd<'_>,
        recursive: bool,
        set: MountAttrs,
    ) -> SysResult<()> {
        let path = self.path_of(target)?;
        self.record(Call::SetAttr {
            path,
            recursive,
            attrs: set,
        });
        Ok(())
    }

    fn make_rslave_root(&self) -> SysResult<()> {
        self.record(Call::MakeRslave);
        Ok(())
    }

    fn pivot_to(&self, new_root: BorrowedFd<'_>) -> SysResult<()> {
        let root = self.path_of(new_root)?;
        self.record(Call::Pivot { root });
        Ok(())
    }
}

impl AsFd for RecordingSys {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.template.as_fd()
    }
}
