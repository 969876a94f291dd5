//! Content hashes of directory trees (cache-keys.md §6): the tarsum-style digest BuildKit
//! v0.11.6 computes for content-based ("slow") cache keys, over a mounted, immutable ref.
//!
//! Everything below the root is attacker-controlled, so paths are resolved in-root by fd
//! only: one component at a time with `openat(O_NOFOLLOW)`/`fstatat`/`readlinkat` relative
//! to an already-resolved directory fd, `..` handled here (clamped at the root, never given
//! to the kernel), symlink targets re-resolved from the root or the link's directory, at
//! most 255 hops as BuildKit allows. No path string is ever joined and opened on the host.
//! The tree walk is iterative, so depth cannot overflow the stack.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_proto::Digest;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use sha2::{Digest as _, Sha256};
use xattr::FileExt as _;

use kiln_proto::paths::clean as clean_path;
use kiln_solver::cachemap::ContentSelector;

/// Symlink hops allowed while resolving one path (BuildKit's limit).
pub const MAX_SYMLINK_HOPS: usize = 255;

/// Errors from content hashing.
#[derive(Debug, thiserror::Error)]
pub enum ContentHashError {
    #[error("{path:?}: not found")]
    NotFound { path: String },
    #[error("{path:?}: too many links")]
    TooManyLinks { path: String },
    #[error("{path:?}: sockets cannot be content-hashed")]
    Socket { path: String },
    #[error(
        "content selector {path:?} uses wildcards or include/exclude patterns, which kiln cannot content-hash yet"
    )]
    Unsupported { path: String },
    #[error("content hash of {path:?}: {op}: {source}")]
    Sys {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn sys<'a>(path: &'a str, op: &'static str) -> impl FnOnce(Errno) -> ContentHashError + 'a {
    move |errno| ContentHashError::Sys {
        path: path.to_owned(),
        op,
        source: std::io::Error::from(errno),
    }
}

/// Opens a trusted host directory (a mounted ref) as the root for hashing.
pub fn open_root(dir: &Path) -> Result<OwnedFd, ContentHashError> {
    let display = dir.display().to_string();
    openat(
        nix::fcntl::AT_FDCWD,
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys(&display, "open root")(e))
}

/// The final dep digest of an exec/file input: `sha256` of the `sha256:<hex>` checksums
/// of each selector joined by NUL; no selectors means `/` without following links.
/// `root = None` is a scratch input, whose `/` hashes as `sha256("")`.
pub fn dep_digest(
    root: Option<BorrowedFd<'_>>,
    selectors: &[ContentSelector],
) -> Result<Digest, ContentHashError> {
    let default = [ContentSelector::path("/", false)];
    let selectors = if selectors.is_empty() {
        &default[..]
    } else {
        selectors
    };
    let mut sums: Vec<String> = Vec::with_capacity(selectors.len());
    for selector in selectors {
        if selector.has_wildcard_or_filters() {
            return Err(ContentHashError::Unsupported {
                path: selector.path.clone(),
            });
        }
        let sum = match root {
            Some(root) => checksum(root, &selector.path, selector.follow_links)?,
            None => {
                let path = clean_path(&format!("/{}", selector.path));
                if path != "/" {
                    return Err(ContentHashError::NotFound { path });
                }
                Digest::of(b"")
            }
        };
        sums.push(sum.as_str().to_owned());
    }
    Ok(Digest::of(sums.join("\0").as_bytes()))
}

/// The annotation under which an immutable ref keeps its dep digest for `selectors`
/// ([`dep_digest`] is a pure function of the ref's content and the selectors, and a
/// committed ref's content never changes): a cached build then hashes nothing, and
/// mounts nothing, for the COPYs it does not run. Versioned with the digest's algorithm.
pub fn annotation_key(selectors: &[ContentSelector]) -> String {
    let mut canonical = Vec::new();
    for s in selectors {
        for field in [
            s.path.as_str(),
            if s.follow_links { "1" } else { "0" },
            if s.wildcard { "1" } else { "0" },
        ] {
            canonical.extend_from_slice(field.as_bytes());
            canonical.push(0);
        }
        for patterns in [&s.include_patterns, &s.exclude_patterns] {
            canonical.extend_from_slice(patterns.len().to_string().as_bytes());
            for p in patterns {
                canonical.push(0);
                canonical.extend_from_slice(p.as_bytes());
            }
            canonical.push(0);
        }
        canonical.push(0x1e);
    }
    format!("contenthash.v1:{}", Digest::of(&canonical).hex())
}

/// Where a path resolved to: the root itself or a name inside a directory.
enum Resolved {
    Root,
    Child { parent: OwnedFd, name: OsString },
}

/// `checksum(ref, path, followLinks)`: the content digest of `path` inside `root`.
pub fn checksum(
    root: BorrowedFd<'_>,
    path: &str,
    follow_links: bool,
) -> Result<Digest, ContentHashError> {
    let cleaned = clean_path(&format!("/{path}"));
    match resolve(root, &cleaned, follow_links)? {
        Resolved::Root => {
            let dir = openat(
                root,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys(&cleaned, "open"))?;
            hash_tree(dir, &cleaned)
        }
        Resolved::Child { parent, name } => hash_entry_at(parent.as_fd(), &name, &cleaned),
    }
}

fn resolve(root: BorrowedFd<'_>, path: &str, follow: bool) -> Result<Resolved, ContentHashError> {
    let not_found = || ContentHashError::NotFound {
        path: path.to_owned(),
    };
    let mut pending: std::collections::VecDeque<Vec<u8>> = components(path.as_bytes());
    // Directory fds from the root down to the current directory (empty = at the root).
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut hops = 0usize;
    while let Some(component) = pending.pop_front() {
        if component == b".." {
            stack.pop();
            continue;
        }
        let current = stack.last().map_or(root, AsFd::as_fd);
        let name = OsStr::from_bytes(&component);
        let stat = match fstatat(current, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(not_found()),
            Err(e) => return Err(sys(path, "stat")(e)),
        };
        let is_last = pending.is_empty();
        if kind(&stat) == SFlag::S_IFLNK && (!is_last || follow) {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(ContentHashError::TooManyLinks {
                    path: path.to_owned(),
                });
            }
            let target = readlinkat(current, name).map_err(sys(path, "readlink"))?;
            let target = target.as_bytes();
            if target.starts_with(b"/") {
                stack.clear();
            }
            for part in components(target).into_iter().rev() {
                pending.push_front(part);
            }
            continue;
        }
        if is_last {
            let parent = current
                .try_clone_to_owned()
                .map_err(|e| ContentHashError::Sys {
                    path: path.to_owned(),
                    op: "dup",
                    source: e,
                })?;
            return Ok(Resolved::Child {
                parent,
                name: name.to_owned(),
            });
        }
        if kind(&stat) != SFlag::S_IFDIR {
            return Err(not_found());
        }
        let dir = openat(
            current,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys(path, "open"))?;
        stack.push(dir);
    }
    // Every component was consumed by `..` or links back to the root.
    match stack.pop() {
        None => Ok(Resolved::Root),
        Some(_) => Err(not_found()),
    }
}

/// Non-empty, non-`.` components.
fn components(path: &[u8]) -> std::collections::VecDeque<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// The tarsum header string (no name, no mtime) of one entry.
fn header(stat: &FileStat, linkname: &[u8], xattrs: &[(OsString, Vec<u8>)]) -> Vec<u8> {
    let kind = kind(stat);
    let (typeflag, perm) = match kind {
        SFlag::S_IFREG => (b'0', stat.st_mode & 0o7777),
        SFlag::S_IFDIR => (b'5', stat.st_mode & 0o7777),
        SFlag::S_IFLNK => (b'2', 0o777),
        SFlag::S_IFCHR => (b'3', stat.st_mode & 0o7777),
        SFlag::S_IFBLK => (b'4', stat.st_mode & 0o7777),
        _ => (b'6', stat.st_mode & 0o7777),
    };
    let size = if kind == SFlag::S_IFREG {
        stat.st_size
    } else {
        0
    };
    let (major, minor) = if matches!(kind, SFlag::S_IFCHR | SFlag::S_IFBLK) {
        (
            nix::sys::stat::major(stat.st_rdev),
            nix::sys::stat::minor(stat.st_rdev),
        )
    } else {
        (0, 0)
    };
    let mut h = Vec::with_capacity(96);
    h.extend_from_slice(b"name");
    h.extend_from_slice(format!("mode{perm}").as_bytes());
    h.extend_from_slice(format!("uid{}", stat.st_uid).as_bytes());
    h.extend_from_slice(format!("gid{}", stat.st_gid).as_bytes());
    h.extend_from_slice(format!("size{size}").as_bytes());
    h.extend_from_slice(b"typeflag");
    h.push(typeflag);
    h.extend_from_slice(b"linkname");
    h.extend_from_slice(linkname);
    h.extend_from_slice(b"uname");
    h.extend_from_slice(b"gname");
    h.extend_from_slice(format!("devmajor{major}devminor{minor}").as_bytes());
    for (name, value) in xattrs {
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(value);
    }
    h
}

/// Keeps `security.capability` and every name outside `security.` and `system.`, sorted.
fn filter_xattrs(mut list: Vec<(OsString, Vec<u8>)>) -> Vec<(OsString, Vec<u8>)> {
    list.retain(|(name, _)| {
        let n = name.as_bytes();
        n == b"security.capability" || !(n.starts_with(b"security.") || n.starts_with(b"system."))
    });
    list.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    list
}

fn xattrs_of_file(
    file: &std::fs::File,
    path: &str,
) -> Result<Vec<(OsString, Vec<u8>)>, ContentHashError> {
    let err = |op| {
        move |source| ContentHashError::Sys {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let mut out = Vec::new();
    let names = match file.list_xattr() {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc_enotsup()) => return Ok(out),
        Err(e) => return Err(err("listxattr")(e)),
    };
    for name in names {
        if let Some(value) = file.get_xattr(&name).map_err(err("getxattr"))? {
            out.push((name, value));
        }
    }
    Ok(filter_xattrs(out))
}

/// Entries that cannot be opened safely (links, devices, fifos): through the parent's fd
/// magic link plus one readdir name, with the `l*` calls that do not follow the last
/// component.
fn xattrs_of_name(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) -> Result<Vec<(OsString, Vec<u8>)>, ContentHashError> {
    let err = |op| {
        move |source| ContentHashError::Sys {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let mut proc_path = PathBuf::from(format!("/proc/self/fd/{}", parent.as_raw_fd()));
    proc_path.push(name);
    let mut out = Vec::new();
    let names = match xattr::list(&proc_path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc_enotsup()) => return Ok(out),
        Err(e) => return Err(err("listxattr")(e)),
    };
    for attr in names {
        if let Some(value) = xattr::get(&proc_path, &attr).map_err(err("getxattr"))? {
            out.push((attr, value));
        }
    }
    Ok(filter_xattrs(out))
}

fn libc_enotsup() -> i32 {
    Errno::ENOTSUP as i32
}

fn digest_string(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Hashes a non-directory entry, or a whole tree when `name` is a directory.
fn hash_entry_at(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) -> Result<Digest, ContentHashError> {
    let stat = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(sys(path, "stat"))?;
    if kind(&stat) == SFlag::S_IFDIR {
        let dir = openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys(path, "open"))?;
        return hash_tree(dir, path);
    }
    let text = leaf_digest(parent, name, &stat, path)?;
    text.parse().map_err(|_| ContentHashError::Sys {
        path: path.to_owned(),
        op: "digest",
        source: std::io::Error::other("malformed digest"),
    })
}

/// Digest of a file, symlink, device or fifo: `sha256(header + content)`.
fn leaf_digest(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    stat: &FileStat,
    path: &str,
) -> Result<String, ContentHashError> {
    let mut hasher = Sha256::new();
    match kind(stat) {
        SFlag::S_IFREG => {
            let fd = openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys(path, "open"))?;
            // The stat of what was actually opened.
            let stat = fstat(&fd).map_err(sys(path, "stat"))?;
            let mut file = std::fs::File::from(fd);
            let xattrs = xattrs_of_file(&file, path)?;
            hasher.update(header(&stat, b"", &xattrs));
            if stat.st_size > 0 {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = file
                        .read(&mut buf)
                        .map_err(|source| ContentHashError::Sys {
                            path: path.to_owned(),
                            op: "read",
                            source,
                        })?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
            }
        }
        SFlag::S_IFLNK => {
            let target = readlinkat(parent, name).map_err(sys(path, "readlink"))?;
            let xattrs = xattrs_of_name(parent, name, path)?;
            hasher.update(header(stat, target.as_bytes(), &xattrs));
        }
        SFlag::S_IFSOCK => {
            return Err(ContentHashError::Socket {
                path: path.to_owned(),
            });
        }
        _ => {
            let xattrs = xattrs_of_name(parent, name, path)?;
            hasher.update(header(stat, b"", &xattrs));
        }
    }
    Ok(digest_string(hasher))
}

/// One directory being hashed: its running hash and the sorted child names left.
struct Frame {
    dir: OwnedFd,
    hasher: Sha256,
    children: std::vec::IntoIter<OsString>,
    /// Child name this frame waits on (a subdirectory being hashed above it).
    waiting: Option<OsString>,
    path: String,
}

fn open_frame(dir: OwnedFd, path: String) -> Result<Frame, ContentHashError> {
    let stat = fstat(&dir).map_err(sys(&path, "stat"))?;
    let file = std::fs::File::from(dir.try_clone().map_err(|source| ContentHashError::Sys {
        path: path.clone(),
        op: "dup",
        source,
    })?);
    let xattrs = xattrs_of_file(&file, &path)?;
    let header_digest = {
        let mut h = Sha256::new();
        h.update(header(&stat, b"", &xattrs));
        digest_string(h)
    };
    let reader =
        nix::dir::Dir::from_fd(dir.try_clone().map_err(|source| ContentHashError::Sys {
            path: path.clone(),
            op: "dup",
            source,
        })?)
        .map_err(sys(&path, "opendir"))?;
    let mut names: Vec<OsString> = Vec::new();
    for entry in reader {
        let entry = entry.map_err(sys(&path, "readdir"))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut hasher = Sha256::new();
    hasher.update(b"\0");
    hasher.update(header_digest.as_bytes());
    Ok(Frame {
        dir,
        hasher,
        children: names.into_iter(),
        waiting: None,
        path,
    })
}

fn child_path(parent: &str, name: &OsStr) -> String {
    let name = String::from_utf8_lossy(name.as_bytes());
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Hashes the directory `dir` and everything below it, without recursion.
fn hash_tree(dir: OwnedFd, path: &str) -> Result<Digest, ContentHashError> {
    let mut stack = vec![open_frame(dir, path.to_owned())?];
    loop {
        let Some(top) = stack.last_mut() else {
            unreachable!("the loop returns when the root frame finishes");
        };
        match top.children.next() {
            Some(name) => {
                let child = child_path(&top.path, &name);
                let stat = fstatat(&top.dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(sys(&child, "stat"))?;
                if kind(&stat) == SFlag::S_IFDIR {
                    let fd = openat(
                        &top.dir,
                        name.as_os_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(sys(&child, "open"))?;
                    top.waiting = Some(name);
                    let frame = open_frame(fd, child)?;
                    stack.push(frame);
                } else {
                    let sum = leaf_digest(top.dir.as_fd(), &name, &stat, &child)?;
                    top.hasher.update(b"\0");
                    top.hasher.update(name.as_bytes());
                    top.hasher.update(sum.as_bytes());
                }
            }
            None => {
                let Some(done) = stack.pop() else {
                    unreachable!("a frame was just inspected");
                };
                let sum = digest_string(done.hasher);
                match stack.last_mut() {
                    None => {
                        return sum.parse().map_err(|_| ContentHashError::Sys {
                            path: path.to_owned(),
                            op: "digest",
                            source: std::io::Error::other("malformed digest"),
                        });
                    }
                    Some(parent) => {
                        let name = parent.waiting.take().unwrap_or_default();
                        parent.hasher.update(b"\0");
                        parent.hasher.update(name.as_bytes());
                        parent.hasher.update(sum.as_bytes());
                    }
                }
            }
        }
    }
}
