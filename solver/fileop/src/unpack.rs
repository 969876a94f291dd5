//! Dockerfile `ADD` of a local archive (`attemptUnpackDockerCompatibility`), as BuildKit
//! v0.11.6's `unpack`: a source (final symlink followed in-root) that is a regular file
//! whose decompressed stream (gzip, bzip2, xz, zstd or none, detected by magic bytes like
//! Docker's `DecompressStream`) starts with a valid tar header is extracted into the
//! destination directory (created `0755` with the owner and timestamp), like Docker's
//! `chrootarchive.Untar`; anything else is copied as usual.
//!
//! Extraction follows Docker's `Unpack` inside a chroot at the destination: entry names
//! are cleaned with `..` stopping at the destination, symlinks (from the archive or
//! already there) resolve inside the destination, missing parents are created `0755`, an
//! existing entry is replaced unless both are directories, hard links must point inside,
//! entries keep the archive's ids (BuildKit applies the owner only to the created
//! destination directories), mode and times (directory times last), and PAX xattrs where
//! allowed. Device nodes the kernel refuses (in a user namespace) are skipped, as Docker
//! skips them there. All of it goes through descriptors of the destination directory.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::sys::stat::SFlag;
use nix::sys::time::TimeSpec;

use crate::mkdir::{MkdirError, mkdir_all};
use crate::owner::Owner;
use crate::rm::remove_all;
use crate::sys::{self, SysError};
use crate::walk::{self, WalkError, push_component};

/// Errors unpacking an archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unpacking {archive}: reading the archive: {source}")]
    Read {
        archive: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unpacking {archive}: {entry}: unhandled tar header type {kind}")]
    UnhandledType {
        archive: String,
        entry: String,
        kind: u8,
    },
    #[error("unpacking {archive}: {entry}: invalid hardlink target {target}")]
    BadHardlink {
        archive: String,
        entry: String,
        target: String,
    },
    #[error("unpacking {archive}: {entry}: uid/gid out of range")]
    IdRange { archive: String, entry: String },
    #[error(transparent)]
    Mkdir(#[from] MkdirError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Compression formats Docker's `DecompressStream` recognises.
enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Compression::Gzip
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// The decompressed stream of `file` (read from its start).
fn decompressed(file: &File) -> std::io::Result<Box<dyn Read + '_>> {
    let mut reader = BufReader::new(file);
    let mut head = [0u8; 6];
    let mut filled = 0;
    while filled < head.len() {
        let n = reader.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let stream = std::io::Cursor::new(head[..filled].to_vec()).chain(reader);
    Ok(match detect(&head[..filled]) {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(stream)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(stream)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(stream)?),
    })
}

/// `isArchivePath` on an opened regular file: the first tar header must read cleanly.
fn is_archive(file: &File) -> bool {
    let Ok(stream) = decompressed(file) else {
        return false;
    };
    let mut archive = tar::Archive::new(stream);
    let Ok(mut entries) = archive.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(_)))
}

/// Unpacks `src` into the directory `dest` when it is an archive; `false` means "not an
/// archive, copy it instead".
pub fn try_unpack(
    src_root: BorrowedFd<'_>,
    src: &str,
    dest_root: BorrowedFd<'_>,
    dest: &str,
    owner: Option<Owner>,
    time: Option<&TimeSpec>,
) -> Result<bool, UnpackError> {
    let walked = match walk::walk(src_root, src, true) {
        Ok(walked) => walked,
        Err(WalkError::NotDirectory { .. }) | Err(WalkError::Sys(SysError::NotFound { .. })) => {
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    let archive_path = walked.path();
    let Some(name) = walked.single_name() else {
        return Ok(false);
    };
    // Not a regular file (or unreadable): not an archive, as BuildKit decides.
    let Ok(mut file) = sys::open_regular(walked.dir.as_fd(), name, &archive_path) else {
        return Ok(false);
    };
    if !is_archive(&file) {
        return Ok(false);
    }
    let read_err = |source| UnpackError::Read {
        archive: archive_path.clone(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let (dir, dir_path) = mkdir_all(dest_root, dest, 0o755, owner, time)?;
    let stream = decompressed(&file).map_err(read_err)?;
    Extractor {
        root: dir,
        root_path: dir_path,
        archive: archive_path.clone(),
    }
    .extract(stream)?;
    Ok(true)
}

/// Clean components of an archive path, `..` stopping at the top.
fn clean_components(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            other => out.push(other.to_vec()),
        }
    }
    out
}

/// A numeric header field; an empty one (all NUL or blanks) is 0, as Go's reader has it.
fn numeric(value: std::io::Result<u64>, raw: &[u8]) -> std::io::Result<u64> {
    match value {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        Err(e) => Err(e),
    }
}

/// The PAX records of an entry that Docker applies.
#[derive(Default)]
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<TimeSpec>,
    atime: Option<TimeSpec>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// A PAX time (`seconds[.fraction]`).
fn pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        if !digit.is_ascii_digit() {
            return None;
        }
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    let nanos = if secs < 0 { -nanos } else { nanos };
    Some(sys::timespec(secs, nanos))
}

struct Extractor {
    root: OwnedFd,
    root_path: String,
    archive: String,
}

impl Extractor {
    fn extract(&self, stream: Box<dyn Read + '_>) -> Result<(), UnpackError> {
        let read_err = |source| UnpackError::Read {
            archive: self.archive.clone(),
            source,
        };
        let mut archive = tar::Archive::new(stream);
        let mut dirs: Vec<(Vec<Vec<u8>>, TimeSpec, TimeSpec)> = Vec::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let components = clean_components(&entry.path_bytes());
            let mut display = self.root_path.clone();
            for c in &components {
                push_component(&mut display, OsStr::from_bytes(c));
            }
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                continue;
            }
            let Some((name, parents)) = components.split_last() else {
                // The destination itself ("./"): Docker leaves it alone.
                continue;
            };
            let name = OsStr::from_bytes(name).to_owned();
            let mut pax = Pax::default();
            if let Ok(Some(extensions)) = entry.pax_extensions() {
                for ext in extensions.flatten() {
                    let value = ext.value_bytes();
                    match ext.key_bytes() {
                        b"uid" => {
                            pax.uid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok())
                        }
                        b"gid" => {
                            pax.gid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok())
                        }
                        b"mtime" => pax.mtime = pax_time(value),
                        b"atime" => pax.atime = pax_time(value),
                        key => {
                            if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                                pax.xattrs
                                    .push((OsStr::from_bytes(attr).to_owned(), value.to_vec()));
                            }
                        }
                    }
                }
            }
            let parent = self.ensure_parent(parents, &display)?;
            let parent = parent.as_fd();
            if let Some(existing) = sys::lstat_at(parent, &name, &display)? {
                if !(sys::is_dir(&existing) && kind.is_dir()) {
                    remove_all(parent, &name, &display)?;
                }
            }
            let header = entry.header();
            let old = header.as_old();
            let mode = numeric(header.mode().map(u64::from), &old.mode).map_err(read_err)?;
            let mode = (mode & 0o7777) as u32;
            let uid = match pax.uid {
                Some(uid) => uid,
                None => numeric(header.uid(), &old.uid).map_err(read_err)?,
            };
            let gid = match pax.gid {
                Some(gid) => gid,
                None => numeric(header.gid(), &old.gid).map_err(read_err)?,
            };
            let mtime = match pax.mtime {
                Some(t) => t,
                None => {
                    let secs = numeric(header.mtime(), &old.mtime).map_err(read_err)?;
                    sys::timespec(i64::try_from(secs).unwrap_or(i64::MAX), 0)
                }
            };
            let atime = match pax.atime {
                Some(t) if t >= mtime => t,
                _ => mtime,
            };
            let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
                return Err(UnpackError::IdRange {
                    archive: self.archive.clone(),
                    entry: display,
                });
            };
            match kind {
                tar::EntryType::Directory => {
                    sys::mkdir_at(parent, &name, mode, &display)?;
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    let mut file = sys::create_file(parent, &name, 0o600, &display)?;
                    std::io::copy(&mut entry, &mut file).map_err(read_err)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    sys::symlink_at(OsStr::from_bytes(&target), parent, &name, &display)?;
                }
                tar::EntryType::Link => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    let target_components = clean_components(&target);
                    let bad = || UnpackError::BadHardlink {
                        archive: self.archive.clone(),
                        entry: display.clone(),
                        target: String::from_utf8_lossy(&target).into_owned(),
                    };
                    let linked =
                        walk::walk_components(self.root.as_fd(), target_components, false)?;
                    let Some(target_name) = linked.single_name() else {
                        return Err(bad());
                    };
                    if sys::lstat_at(linked.dir.as_fd(), target_name, &display)?.is_none() {
                        return Err(bad());
                    }
                    sys::link_at(linked.dir.as_fd(), target_name, parent, &name, &display)?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    let node = match kind {
                        tar::EntryType::Char => SFlag::S_IFCHR,
                        tar::EntryType::Block => SFlag::S_IFBLK,
                        _ => SFlag::S_IFIFO,
                    };
                    let major = header.device_major().ok().flatten().unwrap_or(0);
                    let minor = header.device_minor().ok().flatten().unwrap_or(0);
                    let rdev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
                    match sys::mknod_at(parent, &name, node, mode, rdev, &display) {
                        Ok(()) => {}
                        // No devices in a user namespace: Docker skips them there.
                        Err(SysError::Os {
                            errno: Errno::EPERM,
                            ..
                        }) if node != SFlag::S_IFIFO => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                other => {
                    return Err(UnpackError::UnhandledType {
                        archive: self.archive.clone(),
                        entry: display,
                        kind: other.as_byte(),
                    });
                }
            }
            sys::chown_at(parent, &name, uid, gid, &display)?;
            sys::write_xattrs(parent, &name, &pax.xattrs);
            // chmod_at leaves symlinks alone.
            sys::chmod_at(parent, &name, mode, &display)?;
            if kind.is_dir() {
                dirs.push((components, atime, mtime));
            } else {
                sys::set_times_at(parent, &name, &atime, &mtime, &display)?;
            }
        }
        // Directory times last: creating their entries moved them.
        for (components, atime, mtime) in dirs {
            let Some((name, parents)) = components.split_last() else {
                continue;
            };
            let walked = walk::walk_components(self.root.as_fd(), parents.to_vec(), true)?;
            if !walked.rest.is_empty() {
                continue;
            }
            let name = OsStr::from_bytes(name);
            let mut display = walked.dir_path.clone();
            push_component(&mut display, name);
            if sys::lstat_at(walked.dir.as_fd(), name, &display)?.is_some_and(|s| sys::is_dir(&s)) {
                sys::set_times_at(walked.dir.as_fd(), name, &atime, &mtime, &display)?;
            }
        }
        Ok(())
    }

    /// The parent directory of an entry, resolved inside the destination (symlinks
    /// followed there, as under Docker's chroot); missing directories are created `0755`.
    fn ensure_parent(&self, parents: &[Vec<u8>], display: &str) -> Result<OwnedFd, UnpackError> {
        let walked = walk::walk_components(self.root.as_fd(), parents.to_vec(), true)?;
        let mut dir = walked.dir;
        let mut path = walked.dir_path;
        for name in &walked.rest {
            push_component(&mut path, name);
            if sys::mkdir_at(dir.as_fd(), name, 0o755, &path)? {
                sys::chmod_at(dir.as_fd(), name, 0o755, &path)?;
            } else if !sys::lstat_at(dir.as_fd(), name, &path)?.is_some_and(|s| sys::is_dir(&s)) {
                return Err(SysError::NotDirectory {
                    path: display.to_owned(),
                }
                .into());
            }
            dir = sys::open_dir_at(dir.as_fd(), name, &path)?;
        }
        Ok(dir)
    }
}
