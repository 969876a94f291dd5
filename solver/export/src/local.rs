//! `--output type=local,dest=DIR`: the merged tree copied into DIR with its file types,
//! permission bits, symlink targets, hardlinks and timestamps, but not its ownership (the
//! files belong to whoever runs kiln, as with buildctl's local exporter). An existing
//! entry in DIR that is in the way is replaced; a directory is reused.
//!
//! Every entry is created relative to the descriptor of its parent directory in DIR, with
//! `O_EXCL|O_NOFOLLOW`, so neither the snapshot nor what was in DIR before can redirect a
//! write outside DIR.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use kiln_snapshotter::ImmutableRef;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;

use crate::error::ExportError;
use crate::view::View;
use crate::walk::{Entry, Kind, Visitor, sys_err, walk};

/// Copies the merged tree of `r` into `dest` (created if missing).
pub fn local(r: &ImmutableRef, dest: &Path) -> Result<(), ExportError> {
    std::fs::create_dir_all(dest).map_err(|source| ExportError::Io {
        op: "creating",
        path: dest.to_owned(),
        source,
    })?;
    let root = nix::fcntl::open(
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err("opening", dest))?;
    let view = View::mount(r)?;
    let mut writer = LocalWriter {
        dest: dest.to_owned(),
        root,
        dirs: Vec::new(),
    };
    walk(view.path(), &mut writer)
}

struct LocalWriter {
    dest: PathBuf,
    root: OwnedFd,
    /// Descriptors of the directories being filled in DEST (the root's is `root`).
    dirs: Vec<OwnedFd>,
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

fn perms(st: &FileStat) -> Mode {
    Mode::from_bits_truncate(st.st_mode & 0o7777)
}

/// Removes the entry `name` of `dir`, recursively for a directory, never following a
/// symlink; a missing entry is fine. Iterative: one descriptor per level being emptied.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<(), ExportError> {
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(e) => return Err(sys_err("removing", shown)(e)),
    }
    let open = |parent: BorrowedFd<'_>, name: &OsStr, shown: &Path| {
        nix::fcntl::openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err("opening", shown))
    };
    let mut stack: Vec<(OwnedFd, PathBuf, std::ffi::OsString)> =
        vec![(open(dir, name, shown)?, shown.to_owned(), name.to_owned())];
    while let Some((fd, path, _)) = stack.last() {
        match unlink_files_find_dir(fd.as_fd(), path)? {
            Some(sub) => {
                let child_path = path.join(&sub);
                let child = open(fd.as_fd(), &sub, &child_path)?;
                stack.push((child, child_path, sub));
            }
            None => {
                let Some((fd, path, own_name)) = stack.pop() else {
                    break;
                };
                drop(fd);
                let parent = stack.last().map_or(dir, |(f, _, _)| f.as_fd());
                match nix::unistd::unlinkat(parent, own_name.as_os_str(), UnlinkatFlags::RemoveDir)
                {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(sys_err("removing", &path)(e)),
                }
            }
        }
    }
    Ok(())
}

/// Unlinks every non-directory in `dir` and returns the name of a subdirectory, if any.
fn unlink_files_find_dir(
    dir: BorrowedFd<'_>,
    path: &Path,
) -> Result<Option<std::ffi::OsString>, ExportError> {
    use std::os::unix::ffi::OsStrExt as _;
    let fd = nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err("opening", path))?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(sys_err("listing", path))?;
    for entry in d.iter() {
        let entry = entry.map_err(sys_err("listing", path))?;
        let child = OsStr::from_bytes(entry.file_name().to_bytes());
        if child == "." || child == ".." {
            continue;
        }
        match nix::unistd::unlinkat(dir, child, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR | Errno::EPERM) => return Ok(Some(child.to_owned())),
            Err(e) => return Err(sys_err("removing", &path.join(child))(e)),
        }
    }
    Ok(None)
}

impl LocalWriter {
    fn shown(&self, rel: &Path) -> PathBuf {
        self.dest.join(rel)
    }

    fn current(&self) -> BorrowedFd<'_> {
        self.dirs.last().map_or(self.root.as_fd(), |d| d.as_fd())
    }

    /// Runs `create` for `name` in the current directory; if something is in the way,
    /// removes it and tries once more.
    fn create<T>(
        &self,
        e: &Entry<'_>,
        op: &'static str,
        create: impl Fn(BorrowedFd<'_>) -> nix::Result<T>,
    ) -> Result<T, ExportError> {
        let dir = self.current();
        match create(dir) {
            Err(Errno::EEXIST) => {
                remove_at(dir, e.name, &self.shown(e.rel))?;
                create(dir).map_err(sys_err(op, &self.shown(e.rel)))
            }
            other => other.map_err(sys_err(op, &self.shown(e.rel))),
        }
    }

    fn set_times_at(&self, e: &Entry<'_>) -> Result<(), ExportError> {
        let (atime, mtime) = times(e.stat);
        nix::sys::stat::utimensat(
            self.current(),
            e.name,
            &atime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(sys_err("setting times", &self.shown(e.rel)))
    }
}

impl Visitor for LocalWriter {
    fn enter_dir(&mut self, e: &Entry<'_>) -> Result<(), ExportError> {
        if e.rel.as_os_str().is_empty() {
            // DEST itself keeps its own mode and times.
            return Ok(());
        }
        let parent = self.current();
        let shown = self.shown(e.rel);
        // Owner-writable while it is filled; the real mode is set on the way out.
        match nix::sys::stat::mkdirat(parent, e.name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let existing =
                    nix::sys::stat::fstatat(parent, e.name, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(sys_err("stat", &shown))?;
                if SFlag::from_bits_truncate(existing.st_mode & nix::libc::S_IFMT) != SFlag::S_IFDIR
                {
                    remove_at(parent, e.name, &shown)?;
                    nix::sys::stat::mkdirat(parent, e.name, Mode::from_bits_truncate(0o700))
                        .map_err(sys_err("creating", &shown))?;
                }
            }
            Err(err) => return Err(sys_err("creating", &shown)(err)),
        }
        let fd = nix::fcntl::openat(
            parent,
            e.name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err("opening", &shown))?;
        // An existing directory may be read-only for us.
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o700))
            .map_err(sys_err("chmod", &shown))?;
        self.dirs.push(fd);
        Ok(())
    }

    fn leave_dir(&mut self, e: &Entry<'_>) -> Result<(), ExportError> {
        if e.rel.as_os_str().is_empty() {
            return Ok(());
        }
        let Some(fd) = self.dirs.pop() else {
            return Ok(());
        };
        let shown = self.shown(e.rel);
        nix::sys::stat::fchmod(&fd, perms(e.stat)).map_err(sys_err("chmod", &shown))?;
        let (atime, mtime) = times(e.stat);
        nix::sys::stat::futimens(&fd, &atime, &mtime).map_err(sys_err("setting times", &shown))
    }

    fn file(&mut self, e: &Entry<'_>, mut src: std::fs::File) -> Result<(), ExportError> {
        let shown = self.shown(e.rel);
        let fd = self.create(e, "creating", |dir| {
            nix::fcntl::openat(
                dir,
                e.name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
        })?;
        let mut dst = std::fs::File::from(fd);
        let copied = std::io::copy(&mut src, &mut dst).map_err(|source| ExportError::Io {
            op: "copying",
            path: shown.clone(),
            source,
        })?;
        let expected = u64::try_from(e.stat.st_size).unwrap_or(0);
        if copied != expected {
            return Err(ExportError::Changed {
                path: shown,
                expected,
            });
        }
        nix::sys::stat::fchmod(&dst, perms(e.stat)).map_err(sys_err("chmod", &shown))?;
        let (atime, mtime) = times(e.stat);
        nix::sys::stat::futimens(&dst, &atime, &mtime).map_err(sys_err("setting times", &shown))
    }

    fn symlink(&mut self, e: &Entry<'_>, target: &OsStr) -> Result<(), ExportError> {
        self.create(e, "creating the symlink", |dir| {
            nix::unistd::symlinkat(target, dir, e.name)
        })?;
        self.set_times_at(e)
    }

    fn hardlink(&mut self, e: &Entry<'_>, first: &Path) -> Result<(), ExportError> {
        let shown = self.shown(e.rel);
        let (old_dir, old_name) = match (first.parent(), first.file_name()) {
            (Some(dir), Some(name)) => (dir, name),
            _ => return Err(sys_err("linking", &shown)(Errno::EINVAL)),
        };
        // The first name was written by this export: resolve its directory beneath DEST
        // without following any symlink.
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let old_dir_path: &Path = if old_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            old_dir
        };
        let old = nix::fcntl::openat2(&self.root, old_dir_path, how).map_err(sys_err(
            "opening the link target's directory",
            &self.shown(first),
        ))?;
        self.create(e, "linking", |dir| {
            nix::unistd::linkat(&old, old_name, dir, e.name, AtFlags::empty())
        })
    }

    fn special(&mut self, e: &Entry<'_>) -> Result<(), ExportError> {
        let kind = match e.kind {
            Kind::Fifo => SFlag::S_IFIFO,
            Kind::Char => SFlag::S_IFCHR,
            Kind::Block => SFlag::S_IFBLK,
            // Sockets are not copied (as tar and buildctl's exporter skip them).
            _ => return Ok(()),
        };
        let rdev = e.stat.st_rdev;
        self.create(e, "creating the node", |dir| {
            nix::sys::stat::mknodat(dir, e.name, kind, perms(e.stat), rdev)
        })?;
        // mknod applies the umask; the node was just created in a directory only this export
        // writes to, so setting its mode by name reaches that node.
        nix::sys::stat::fchmodat(
            self.current(),
            e.name,
            perms(e.stat),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(sys_err("chmod", &self.shown(e.rel)))?;
        self.set_times_at(e)
    }
}
