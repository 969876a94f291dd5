//! Every system call the FileOp backend makes, on directory descriptors and single
//! component names only: nothing here accepts a multi-component path inside a root, so the
//! kernel never resolves an attacker-controlled symlink or `..` on the backend's behalf.
//! Entries are addressed as `(directory fd, name)`; every `*at` call that could follow a
//! final symlink is given `AT_SYMLINK_NOFOLLOW`/`O_NOFOLLOW`, and anything opened for
//! reading is opened `O_NONBLOCK` and checked to be a regular file, so FIFOs and devices
//! are never read. Mode changes go through `/proc/self/fd/N` of an `O_PATH|O_NOFOLLOW`
//! descriptor (the exact inode, never a symlink's target). No `unsafe` is needed: `nix`
//! wraps every call.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmodat, fstat, fstatat, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, mkfifoat, symlinkat, unlinkat};

/// Errors of single file system calls, each naming the in-root path concerned.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a directory")]
    NotDirectory { path: String },
    #[error("{path}: is a directory")]
    IsDirectory { path: String },
    #[error("{path}: too many levels of symbolic links")]
    TooManyLinks { path: String },
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
    #[error(
        "chown {path} to {uid}:{gid}: the id is not mapped in this user namespace (invalid argument)"
    )]
    Unmapped { path: String, uid: u32, gid: u32 },
    #[error("{op} {path}: {}", describe(*errno))]
    Os {
        op: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Go-style lower-case text of an errno (`no such file or directory`).
pub fn describe(errno: Errno) -> String {
    let text = errno.desc();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_owned(),
    }
}

/// Maps an errno of `op` on `path` to the error kinds callers distinguish.
pub fn os(op: &'static str, path: &str, errno: Errno) -> SysError {
    let path = path.to_owned();
    match errno {
        Errno::ENOENT => SysError::NotFound { path },
        Errno::ENOTDIR => SysError::NotDirectory { path },
        Errno::EISDIR => SysError::IsDirectory { path },
        Errno::ELOOP => SysError::TooManyLinks { path },
        errno => SysError::Os { op, path, errno },
    }
}

fn io<'a>(op: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> SysError + 'a {
    move |source| SysError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The file type bits of a stat.
pub fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

pub fn is_dir(stat: &FileStat) -> bool {
    kind(stat) == SFlag::S_IFDIR
}

pub fn is_symlink(stat: &FileStat) -> bool {
    kind(stat) == SFlag::S_IFLNK
}

/// Opens a trusted host directory (a root the caller mounted).
pub fn open_root(dir: &Path) -> Result<OwnedFd, SysError> {
    let display = dir.display().to_string();
    openat(
        AT_FDCWD,
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os("open root", &display, e))
}

/// A second descriptor of the same directory.
pub fn dup(fd: BorrowedFd<'_>, path: &str) -> Result<OwnedFd, SysError> {
    fd.try_clone_to_owned().map_err(io("dup", path))
}

/// `lstat` of one entry; `None` when it does not exist.
pub fn lstat_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) -> Result<Option<FileStat>, SysError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(os("stat", path, e)),
    }
}

/// `fstat` of an open descriptor.
pub fn stat_fd(fd: BorrowedFd<'_>, path: &str) -> Result<FileStat, SysError> {
    fstat(fd).map_err(|e| os("stat", path, e))
}

/// Opens the directory `name` in `dir` for listing and as a base for further `*at` calls;
/// a symlink (or anything that is not a directory) is refused by the kernel.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr, path: &str) -> Result<OwnedFd, SysError> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        // O_NOFOLLOW on a symlink: it is not a directory we may enter.
        Errno::ELOOP => SysError::NotDirectory {
            path: path.to_owned(),
        },
        e => os("open", path, e),
    })
}

/// The names in a directory (without `.` and `..`), sorted bytewise as Go's `ReadDir`.
pub fn list_dir(dir: BorrowedFd<'_>, path: &str) -> Result<Vec<OsString>, SysError> {
    // A fresh descriptor: readdir consumes the offset of the one it is given.
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os("open", path, e))?;
    let reader = nix::dir::Dir::from_fd(fd).map_err(|e| os("opendir", path, e))?;
    let mut names = Vec::new();
    for entry in reader {
        let entry = entry.map_err(|e| os("readdir", path, e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Opens a regular file for reading. `O_NONBLOCK` keeps a FIFO swapped in from blocking
/// the open; the descriptor's own stat must then say "regular file".
pub fn open_regular(dir: BorrowedFd<'_>, name: &OsStr, path: &str) -> Result<File, SysError> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => SysError::NotRegular {
            path: path.to_owned(),
        },
        e => os("open", path, e),
    })?;
    let stat = stat_fd(fd.as_fd(), path)?;
    if kind(&stat) != SFlag::S_IFREG {
        return Err(SysError::NotRegular {
            path: path.to_owned(),
        });
    }
    Ok(File::from(fd))
}

/// Opens an existing regular file for writing (never a FIFO or device: refused by type
/// before and after the open).
pub fn open_regular_for_write(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) -> Result<File, SysError> {
    match lstat_at(dir, name, path)? {
        Some(stat) if kind(&stat) == SFlag::S_IFREG => {}
        Some(stat) if is_dir(&stat) => {
            return Err(SysError::IsDirectory {
                path: path.to_owned(),
            });
        }
        Some(_) => {
            return Err(SysError::NotRegular {
                path: path.to_owned(),
            });
        }
        None => {
            return Err(SysError::NotFound {
                path: path.to_owned(),
            });
        }
    }
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os("open", path, e))?;
    let stat = stat_fd(fd.as_fd(), path)?;
    if kind(&stat) != SFlag::S_IFREG {
        return Err(SysError::NotRegular {
            path: path.to_owned(),
        });
    }
    Ok(File::from(fd))
}

/// Creates a new regular file (`O_CREAT|O_EXCL`: never an existing entry or a symlink).
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: u32,
    path: &str,
) -> Result<File, SysError> {
    openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map(File::from)
    .map_err(|e| os("create", path, e))
}

pub fn truncate(file: &File, path: &str) -> Result<(), SysError> {
    nix::unistd::ftruncate(file, 0).map_err(|e| os("truncate", path, e))
}

/// Creates a directory; `false` when something already exists there.
pub fn mkdir_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: u32,
    path: &str,
) -> Result<bool, SysError> {
    match mkdirat(dir, name, Mode::from_bits_truncate(mode)) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(os("mkdir", path, e)),
    }
}

pub fn symlink_at(
    target: &OsStr,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) -> Result<(), SysError> {
    symlinkat(target, dir, name).map_err(|e| os("symlink", path, e))
}

pub fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr, path: &str) -> Result<OsString, SysError> {
    readlinkat(dir, name).map_err(|e| os("readlink", path, e))
}

/// A hard link to an existing entry (never following a symlink: the link itself is linked).
pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old_name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
    path: &str,
) -> Result<(), SysError> {
    linkat(old_dir, old_name, new_dir, new_name, AtFlags::empty()).map_err(|e| os("link", path, e))
}

/// Creates a device node, FIFO or socket placeholder of type `kind`.
pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: SFlag,
    mode: u32,
    rdev: u64,
    path: &str,
) -> Result<(), SysError> {
    let result = if kind == SFlag::S_IFIFO {
        mkfifoat(dir, name, Mode::from_bits_truncate(mode))
    } else {
        mknodat(dir, name, kind, Mode::from_bits_truncate(mode), rdev)
    };
    result.map_err(|e| os("mknod", path, e))
}

/// Removes one entry (a directory must be empty).
pub fn unlink_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    is_dir: bool,
    path: &str,
) -> Result<(), SysError> {
    let flag = if is_dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    unlinkat(dir, name, flag).map_err(|e| os("remove", path, e))
}

/// `lchown` of one entry. `EINVAL` means the id has no mapping in kiln's user namespace.
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: u32,
    gid: u32,
    path: &str,
) -> Result<(), SysError> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| match e {
        Errno::EINVAL => SysError::Unmapped {
            path: path.to_owned(),
            uid,
            gid,
        },
        e => os("chown", path, e),
    })
}

/// The `/proc/self/fd` path of a descriptor: names exactly the inode it holds.
fn proc_fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `chmod` of one entry that is not a symlink (a symlink is left alone, as `lchmod` does
/// not exist on Linux). The entry is pinned with `O_PATH|O_NOFOLLOW` first and changed
/// through its `/proc/self/fd` link, so a symlink can never redirect the change.
pub fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, path: &str) -> Result<(), SysError> {
    let fd = openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os("open", path, e))?;
    if is_symlink(&stat_fd(fd.as_fd(), path)?) {
        return Ok(());
    }
    fchmodat(
        AT_FDCWD,
        &proc_fd_path(fd.as_fd()),
        Mode::from_bits_truncate(mode & 0o7777),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| os("chmod", path, e))
}

/// A point in time as `utimensat` takes it.
pub fn timespec(secs: i64, nanos: i64) -> TimeSpec {
    TimeSpec::new(secs, nanos)
}

/// Sets access and modification times of one entry without following a symlink.
pub fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: &TimeSpec,
    mtime: &TimeSpec,
    path: &str,
) -> Result<(), SysError> {
    utimensat(dir, name, atime, mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| os("utimes", path, e))
}

/// The access and modification times recorded in a stat.
pub fn stat_times(stat: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(stat.st_atime, stat.st_atime_nsec),
        TimeSpec::new(stat.st_mtime, stat.st_mtime_nsec),
    )
}

/// The `/proc/self/fd/N/name` path of an entry, for the `l*xattr` calls: the kernel
/// follows the descriptor's magic link (the directory itself) and not the final name.
fn entry_proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut path = proc_fd_path(dir);
    path.push(name);
    path
}

/// Extended attributes of an entry (`None` name = the directory `dir` itself). Listing
/// failures (no xattr support) give an empty list: copying them is best effort.
pub fn read_xattrs(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> Vec<(OsString, Vec<u8>)> {
    // For an entry the `l*` calls stop at the final name; for the directory itself the
    // final component is the magic link, which must be followed to reach the inode.
    let (path, deref) = match name {
        Some(name) => (entry_proc_path(dir, name), false),
        None => (proc_fd_path(dir), true),
    };
    let names = if deref {
        xattr::list_deref(&path)
    } else {
        xattr::list(&path)
    };
    let Ok(names) = names else {
        return Vec::new();
    };
    names
        .filter_map(|attr| {
            let value = if deref {
                xattr::get_deref(&path, &attr)
            } else {
                xattr::get(&path, &attr)
            };
            match value {
                Ok(Some(value)) => Some((attr, value)),
                _ => None,
            }
        })
        .collect()
}

/// Sets extended attributes on an entry, ignoring each failure: BuildKit logs and skips
/// xattrs the destination refuses (`trusted.*` without privilege, `user.*` on symlinks,
/// file systems without support).
pub fn write_xattrs(dir: BorrowedFd<'_>, name: &OsStr, attrs: &[(OsString, Vec<u8>)]) {
    let path = entry_proc_path(dir, name);
    for (attr, value) in attrs {
        // Deliberately ignored, see above.
        let _ = xattr::set(&path, attr, value);
    }
}
