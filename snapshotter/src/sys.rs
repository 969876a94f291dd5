//! The one place in the snapshotter with `unsafe`: raw syscalls that neither `nix` nor the
//! standard library wrap (the new mount API, extended attributes relative to a directory
//! descriptor, `FICLONE`), each behind a safe function taking descriptors and byte strings.
//!
//! Everything else in the crate reaches the kernel through `nix` or `std`.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

/// Result of a raw syscall wrapper.
pub(crate) type SysResult<T> = Result<T, Errno>;

// Constants of the new mount API (linux/mount.h); the libc crate does not carry them.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
/// `MOUNT_ATTR_RDONLY`, for `fsmount` and `mount_setattr`.
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn owned_fd(ret: libc::c_long) -> SysResult<OwnedFd> {
    let fd = RawFd::try_from(check(ret)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstr(bytes: &[u8]) -> SysResult<CString> {
    CString::new(bytes).map_err(|_| Errno::EINVAL)
}

/// `fsopen(fstype, FSOPEN_CLOEXEC)`: a filesystem context to configure.
pub(crate) fn fsopen(fstype: &CStr) -> SysResult<OwnedFd> {
    // SAFETY: `fstype` is a valid NUL-terminated string that outlives the call.
    owned_fd(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })
}

/// `fsconfig(FSCONFIG_SET_STRING, key, value)`.
pub(crate) fn fsconfig_string(fs: BorrowedFd<'_>, key: &CStr, value: &[u8]) -> SysResult<()> {
    let value = cstr(value)?;
    // SAFETY: `fs` is an fs context descriptor; key and value are NUL-terminated strings
    // that outlive the call; aux must be 0 for this command.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `fsconfig(FSCONFIG_SET_FLAG, key)`.
pub(crate) fn fsconfig_flag(fs: BorrowedFd<'_>, key: &CStr) -> SysResult<()> {
    // SAFETY: `fs` is an fs context descriptor; key is NUL-terminated; value must be NULL.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })
    .map(drop)
}

/// `fsconfig(FSCONFIG_CMD_CREATE)`: creates the superblock.
pub(crate) fn fsconfig_create(fs: BorrowedFd<'_>) -> SysResult<()> {
    // SAFETY: `fs` is an fs context descriptor; key and value must be NULL for commands.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })
    .map(drop)
}

/// `fsmount(fs, FSMOUNT_CLOEXEC, attrs)`: a detached mount of the created superblock.
pub(crate) fn fsmount(fs: BorrowedFd<'_>, attrs: u64) -> SysResult<OwnedFd> {
    let attrs = libc::c_uint::try_from(attrs).map_err(|_| Errno::EINVAL)?;
    // SAFETY: plain integer arguments; the result is a new descriptor.
    owned_fd(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC [| AT_RECURSIVE])`: a
/// detached copy of the mount tree at `path` (a bind mount not yet attached).
pub(crate) fn open_tree_clone(path: &Path, recursive: bool) -> SysResult<OwnedFd> {
    let path = cstr(path.as_os_str().as_bytes())?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: `path` is NUL-terminated and outlives the call; the result is a new fd.
    owned_fd(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })
}

/// `mount_setattr(mnt, "", AT_EMPTY_PATH [| AT_RECURSIVE], {attr_set})`.
pub(crate) fn mount_setattr(mnt: BorrowedFd<'_>, attr_set: u64, recursive: bool) -> SysResult<()> {
    let mut attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: `attr` is a valid mount_attr that outlives the call, and its size is passed;
    // the empty path with AT_EMPTY_PATH refers to `mnt` itself.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &raw mut attr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// `move_mount(mnt, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: attaches a detached
/// mount at `target`.
pub(crate) fn move_mount(mnt: BorrowedFd<'_>, target: &Path) -> SysResult<()> {
    let target = cstr(target.as_os_str().as_bytes())?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// The path through which the entry `name` of the directory `dir` is reached without
/// following a symlink at `name` itself: `/proc/self/fd/<dir>/<name>`. `name` must be one
/// path component.
fn at_path(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<CString> {
    let name = name.as_bytes();
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    cstr(&path)
}

/// `lsetxattr` on the entry `name` of `dir` (not following a symlink there).
pub(crate) fn set_xattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    key: &[u8],
    value: &[u8],
) -> SysResult<()> {
    let path = at_path(dir, name)?;
    let key = cstr(key)?;
    // SAFETY: path and key are NUL-terminated; value points to value.len() readable bytes.
    let ret = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(libc::c_long::from(ret)).map(drop)
}

/// `fsetxattr` on an open file or directory.
pub(crate) fn fset_xattr(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> SysResult<()> {
    let key = cstr(key)?;
    // SAFETY: key is NUL-terminated; value points to value.len() readable bytes.
    let ret = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(libc::c_long::from(ret)).map(drop)
}

/// Reads a variable-size xattr result: asks for the size, then fills a buffer, retrying
/// when the value grew in between.
fn read_sized(
    mut call: impl FnMut(*mut libc::c_void, usize) -> libc::ssize_t,
) -> SysResult<Vec<u8>> {
    loop {
        let size = check(call(std::ptr::null_mut(), 0) as libc::c_long)?;
        let size = usize::try_from(size).map_err(|_| Errno::EOVERFLOW)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match check(call(buf.as_mut_ptr().cast(), buf.len()) as libc::c_long) {
            Ok(n) => {
                buf.truncate(usize::try_from(n).map_err(|_| Errno::EOVERFLOW)?);
                return Ok(buf);
            }
            Err(Errno::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `llistxattr` on the entry `name` of `dir`: the attribute names.
pub(crate) fn list_xattrs_at(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<Vec<Vec<u8>>> {
    let path = at_path(dir, name)?;
    let raw = read_sized(|buf, len| {
        // SAFETY: path is NUL-terminated; buf is null with len 0 or points to len
        // writable bytes.
        unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }
    })?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|k| !k.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// `lgetxattr` on the entry `name` of `dir`; `None` when the attribute is absent.
pub(crate) fn get_xattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    key: &[u8],
) -> SysResult<Option<Vec<u8>>> {
    let path = at_path(dir, name)?;
    let key = cstr(key)?;
    let result = read_sized(|buf, len| {
        // SAFETY: path and key are NUL-terminated; buf is null with len 0 or points to len
        // writable bytes.
        unsafe { libc::lgetxattr(path.as_ptr(), key.as_ptr(), buf, len) }
    });
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fgetxattr` on an open file or directory; `None` when the attribute is absent.
pub(crate) fn fget_xattr(fd: BorrowedFd<'_>, key: &[u8]) -> SysResult<Option<Vec<u8>>> {
    let key = cstr(key)?;
    let result = read_sized(|buf, len| {
        // SAFETY: key is NUL-terminated; buf is null with len 0 or points to len writable
        // bytes.
        unsafe { libc::fgetxattr(fd.as_raw_fd(), key.as_ptr(), buf, len) }
    });
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `ioctl(dst, FICLONE, src)`: shares the extents of `src` with `dst` (btrfs, XFS).
pub(crate) fn ficlone(dst: &File, src: &File) -> SysResult<()> {
    // SAFETY: both are open descriptors; FICLONE takes the source descriptor by value.
    let ret = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    check(libc::c_long::from(ret)).map(drop)
}

/// Kind of an open file description lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

/// Takes, converts (atomically, unlike `flock(2)`) or waits for an open file description
/// lock (`F_OFD_SETLK[W]`) on the whole of `fd`. Returns `false` when `wait` is false and
/// another description holds a conflicting lock.
pub(crate) fn ofd_lock(fd: BorrowedFd<'_>, kind: LockKind, wait: bool) -> SysResult<bool> {
    let lock = libc::flock {
        l_type: match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // OFD locks require l_pid to be 0.
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            nix::fcntl::FcntlArg::F_OFD_SETLKW(&lock)
        } else {
            nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)
        };
        match nix::fcntl::fcntl(fd.as_fd(), arg) {
            Ok(_) => return Ok(true),
            Err(Errno::EAGAIN | Errno::EACCES) if !wait => return Ok(false),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}
