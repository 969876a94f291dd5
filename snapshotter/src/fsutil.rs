//! Descriptor-based filesystem helpers: opening directories without following symlinks,
//! resolving attacker-controlled paths inside a root (`openat2(RESOLVE_IN_ROOT)`), sorted
//! listings, recursive removal, disk usage, and the reflink-or-copy tree copy of the native
//! backend.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::sys;

pub(crate) type NixResult<T> = Result<T, Errno>;

/// Opens the directory at a trusted path.
pub(crate) fn open_dir(path: &Path) -> NixResult<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the subdirectory `name` of `dir`, refusing a symlink.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> NixResult<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The attributes overlay marks an opaque directory with (`trusted.` as root, `user.`
/// with `userxattr`), set to `y`.
pub(crate) const OPAQUE_KEYS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];

/// Whether the open directory `dir` is marked opaque under either key; an error reading
/// a key (but `ENOTSUP`) only when neither says so.
pub(crate) fn is_opaque(dir: BorrowedFd<'_>) -> NixResult<bool> {
    let mut failed = None;
    for key in OPAQUE_KEYS {
        match sys::fget_xattr(dir, key) {
            Ok(value) if value.as_deref() == Some(b"y") => return Ok(true),
            Ok(_) | Err(Errno::ENOTSUP) => {}
            Err(e) => failed = Some(e),
        }
    }
    failed.map_or(Ok(false), Err)
}

/// Whether the layer directory `layer`, as an overlay layer over others, can make any of
/// `paths` (relative, `/`-separated plain names) show something else than the layers
/// below show: an entry at one of them (a file, a whiteout, anything), an entry on the
/// way that is not a directory (a symlink, a whiteout), or an opaque directory on the way
/// or at the top. Only entries are looked at, none is followed. `true` when in doubt (an
/// error).
pub(crate) fn layer_shadows_any(layer: &Path, paths: &[&str]) -> bool {
    let shadows = || -> NixResult<bool> {
        let top = open_dir(layer)?;
        if is_opaque(top.as_fd())? {
            return Ok(true);
        }
        for path in paths {
            let mut dir = top.try_clone().map_err(|_| Errno::EBADF)?;
            let mut names = path.split('/').filter(|n| !n.is_empty()).peekable();
            while let Some(name) = names.next() {
                let name = OsStr::new(name);
                match lstat_at(dir.as_fd(), name) {
                    Err(Errno::ENOENT) => break,
                    Err(e) => return Err(e),
                    Ok(_) if names.peek().is_none() => return Ok(true),
                    Ok(st) if kind(&st) != SFlag::S_IFDIR => return Ok(true),
                    Ok(_) => {
                        dir = open_dir_at(dir.as_fd(), name)?;
                        if is_opaque(dir.as_fd())? {
                            return Ok(true);
                        }
                    }
                }
            }
        }
        Ok(false)
    };
    shadows().unwrap_or(true)
}

/// Opens `rel` inside `root` as if `root` were `/`: `..` and absolute symlinks cannot leave
/// it, magic links and other mounts are refused.
pub(crate) fn open_in_root(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> NixResult<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    loop {
        match nix::fcntl::openat2(root, rel, how) {
            // openat2 asks for a retry when a rename raced with an in-root lookup.
            Err(Errno::EAGAIN) => continue,
            other => return other,
        }
    }
}

/// `lstat` of the entry `name` in `dir`.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> NixResult<FileStat> {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// The file type bits of a stat.
pub(crate) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT)
}

/// The names in `dir` (without `.` and `..`), sorted bytewise.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> NixResult<Vec<OsString>> {
    let fd = nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Removes the entry `name` of `dir`, recursively for a directory, never following a
/// symlink. Missing entries are not an error.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> NixResult<()> {
    // `..` would clear the parent of `dir` (then fail to unlink it), `.` `dir` itself.
    if name == "." || name == ".." || name.is_empty() {
        return Err(Errno::EINVAL);
    }
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(e) => return Err(e),
    }
    let sub = match open_dir_at(dir, name) {
        Ok(sub) => sub,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    clear_dir(sub.as_fd())?;
    drop(sub);
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything inside `dir`.
pub(crate) fn clear_dir(dir: BorrowedFd<'_>) -> NixResult<()> {
    for name in list_dir(dir)? {
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Removes a trusted directory tree (a snapshot's own directory); missing is fine.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Disk usage of the tree at `path`: allocated blocks of each inode, counted once.
pub(crate) fn disk_usage(path: &Path) -> NixResult<u64> {
    let dir = open_dir(path)?;
    let mut seen = HashMap::new();
    let st = nix::sys::stat::fstat(&dir)?;
    let mut total = u64::try_from(st.st_blocks).unwrap_or(0) * 512;
    usage_walk(dir.as_fd(), &mut seen, &mut total)?;
    Ok(total)
}

fn usage_walk(
    dir: BorrowedFd<'_>,
    seen: &mut HashMap<(u64, u64), ()>,
    total: &mut u64,
) -> NixResult<()> {
    for name in list_dir(dir)? {
        let st = lstat_at(dir, &name)?;
        if st.st_nlink > 1 && seen.insert((st.st_dev, st.st_ino), ()).is_some() {
            continue;
        }
        *total += u64::try_from(st.st_blocks).unwrap_or(0) * 512;
        if kind(&st) == SFlag::S_IFDIR {
            let sub = open_dir_at(dir, &name)?;
            usage_walk(sub.as_fd(), seen, total)?;
        }
    }
    Ok(())
}

/// Copies the xattrs of `name` in `src` to `name` in `dst` (both entries exist), except
/// those `skip` rejects.
pub(crate) fn copy_xattrs_at(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &OsStr,
    skip: &dyn Fn(&[u8]) -> bool,
) -> NixResult<()> {
    let keys = match sys::list_xattrs_at(src, name) {
        Ok(keys) => keys,
        Err(Errno::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for key in keys {
        if skip(&key) {
            continue;
        }
        if let Some(value) = sys::get_xattr_at(src, name, &key)? {
            sys::set_xattr_at(dst, name, &key, &value)?;
        }
    }
    Ok(())
}

/// Copies the contents of `src` into the (empty) directory `dst`, preserving types, modes,
/// owners, times, xattrs (except `skip`ped ones) and hardlinks. File data is shared with
/// `FICLONE` where the filesystem supports it, else copied with `copy_file_range` (which
/// `std::io::copy` uses between files).
pub(crate) fn copy_tree(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    skip: &dyn Fn(&[u8]) -> bool,
) -> NixResult<()> {
    let mut links = HashMap::new();
    let mut reflink = true;
    copy_dir_contents(src, dst, skip, &mut links, &mut reflink)
}

type LinkMap = HashMap<(u64, u64), (OwnedFd, OsString)>;

fn copy_dir_contents(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    skip: &dyn Fn(&[u8]) -> bool,
    links: &mut LinkMap,
    reflink: &mut bool,
) -> NixResult<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    for name in list_dir(src)? {
        let st = lstat_at(src, &name)?;
        let kind = kind(&st);
        if kind != SFlag::S_IFDIR && st.st_nlink > 1 {
            if let Some((dir, first)) = links.get(&(st.st_dev, st.st_ino)) {
                nix::unistd::linkat(
                    dir.as_fd(),
                    first.as_os_str(),
                    dst,
                    name.as_os_str(),
                    nix::fcntl::AtFlags::empty(),
                )?;
                continue;
            }
        }
        let perm = Mode::from_bits_truncate(st.st_mode & 0o7777);
        match kind {
            SFlag::S_IFDIR => {
                nix::sys::stat::mkdirat(dst, name.as_os_str(), Mode::from_bits_truncate(0o700))?;
                let s = open_dir_at(src, &name)?;
                let d = open_dir_at(dst, &name)?;
                copy_dir_contents(s.as_fd(), d.as_fd(), skip, links, reflink)?;
            }
            SFlag::S_IFREG => {
                let s = File::from(nix::fcntl::openat(
                    src,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?);
                let mut d = File::from(nix::fcntl::openat(
                    dst,
                    name.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?);
                let cloned = *reflink && sys::ficlone(&d, &s).is_ok();
                if !cloned {
                    *reflink = false;
                    let mut s = &s;
                    std::io::copy(&mut s, &mut d)
                        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
                }
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(src, name.as_os_str())?;
                nix::unistd::symlinkat(target.as_os_str(), dst, name.as_os_str())?;
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO => {
                nix::sys::stat::mknodat(dst, name.as_os_str(), kind, perm, st.st_rdev)?;
            }
            // Sockets are not part of a filesystem image.
            _ => continue,
        }
        nix::unistd::fchownat(
            dst,
            name.as_os_str(),
            Some(nix::unistd::Uid::from_raw(st.st_uid)),
            Some(nix::unistd::Gid::from_raw(st.st_gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        if kind != SFlag::S_IFLNK {
            nix::sys::stat::fchmodat(
                dst,
                name.as_os_str(),
                perm,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
        }
        copy_xattrs_at(src, dst, &name, skip)?;
        utimensat(
            dst,
            name.as_os_str(),
            &TimeSpec::new(st.st_atime, st.st_atime_nsec),
            &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
            UtimensatFlags::NoFollowSymlink,
        )?;
        if kind != SFlag::S_IFDIR && st.st_nlink > 1 {
            let dup = nix::unistd::dup(dst)?;
            links.insert((st.st_dev, st.st_ino), (dup, name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_DB: &[&str] = &["etc/passwd", "etc/group"];

    fn layer() -> tempfile::TempDir {
        tempfile::tempdir().expect("layer dir")
    }

    fn mark_opaque(dir: &Path) {
        let fd = open_dir(dir).expect("open");
        sys::fset_xattr(fd.as_fd(), b"user.overlay.opaque", b"y").expect("set user xattr");
    }

    #[test]
    fn a_layer_without_those_entries_shadows_nothing() {
        let l = layer();
        assert!(!layer_shadows_any(l.path(), USER_DB), "empty layer");
        std::fs::create_dir(l.path().join("etc")).expect("etc");
        std::fs::write(l.path().join("etc/hosts"), "").expect("hosts");
        std::fs::write(l.path().join("passwd"), "").expect("passwd elsewhere");
        assert!(
            !layer_shadows_any(l.path(), USER_DB),
            "a merged etc without them"
        );
    }

    #[test]
    fn an_entry_at_a_path_shadows_it() {
        for name in ["passwd", "group"] {
            let l = layer();
            std::fs::create_dir(l.path().join("etc")).expect("etc");
            // A whiteout is an entry like any other here.
            std::fs::write(l.path().join("etc").join(name), "").expect("entry");
            assert!(layer_shadows_any(l.path(), USER_DB), "etc/{name}");
            assert!(!layer_shadows_any(l.path(), &["etc/shadow"]), "etc/{name}");
        }
    }

    #[test]
    fn anything_but_a_plain_directory_on_the_way_shadows() {
        let l = layer();
        std::os::unix::fs::symlink("/elsewhere", l.path().join("etc")).expect("symlink");
        assert!(layer_shadows_any(l.path(), USER_DB), "etc a symlink");

        let l = layer();
        std::fs::write(l.path().join("etc"), "").expect("file");
        assert!(
            layer_shadows_any(l.path(), USER_DB),
            "etc a file (or a whiteout)"
        );

        let l = layer();
        std::fs::create_dir(l.path().join("etc")).expect("etc");
        mark_opaque(&l.path().join("etc"));
        assert!(layer_shadows_any(l.path(), USER_DB), "etc opaque");

        let l = layer();
        mark_opaque(l.path());
        assert!(
            layer_shadows_any(l.path(), USER_DB),
            "the whole layer opaque"
        );
    }

    #[test]
    fn a_layer_that_cannot_be_read_counts_as_shadowing() {
        let l = layer();
        assert!(layer_shadows_any(&l.path().join("missing"), USER_DB));
    }
}
