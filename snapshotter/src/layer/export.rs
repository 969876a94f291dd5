//! Exporting a snapshot's diff as an OCI layer tar.
//!
//! For overlay snapshots only the upper directory is walked (so the cost is O(changed
//! files)): 0:0 character devices become `.wh.<name>` (when the name exists in the lower
//! view), opaque directories become the directory plus `.wh..wh..opq`, everything else is
//! written as it is. For native snapshots the tree is compared with its parent's.
//!
//! The tar follows containerd's change writer: PAX format, relative names, directories
//! ending in `/`, mtimes in whole seconds, empty uname/gname, xattrs as `SCHILY.xattr.*`
//! (minus overlay's own), hardlinks within the layer as link entries, sockets skipped.
//! Whiteout entries carry mtime 0 so that the same diff always gives the same digest.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use tar::{EntryType, Header};

use super::descriptor::{Compression, HashWriter, LayerDescriptor, LayerError};
use crate::fsutil;
use crate::sys;

const REDIRECT_KEYS: [&[u8]; 2] = [b"trusted.overlay.redirect", b"user.overlay.redirect"];

fn is_overlay_xattr(key: &[u8]) -> bool {
    key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.")
}

enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<HashWriter<W>>),
    Zstd(zstd::Encoder<'static, HashWriter<W>>),
    Plain(HashWriter<W>),
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<HashWriter<W>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Plain(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

/// Writes tar entries, hashing the tar and the compressed stream as they pass.
struct TarOut<W: Write> {
    builder: tar::Builder<HashWriter<Encoder<W>>>,
    compression: Compression,
    /// First path of each multiply-linked inode written so far.
    links: HashMap<(u64, u64), Vec<u8>>,
}

fn export_err<'a>(path: &'a [u8], op: &'static str) -> impl FnOnce(Errno) -> LayerError + 'a {
    move |source| LayerError::ExportSys {
        path: String::from_utf8_lossy(path).into_owned(),
        op,
        source,
    }
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    if !out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

impl<W: Write> TarOut<W> {
    fn new(out: W, compression: Compression) -> Result<TarOut<W>, LayerError> {
        // Uncompressed, the blob is the tar: its digest is the diff id, hashed once.
        let compressed = if compression == Compression::None {
            HashWriter::counting(out)
        } else {
            HashWriter::new(out)
        };
        let encoder = match compression {
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                compressed,
                flate2::Compression::default(),
            )),
            Compression::Zstd => {
                Encoder::Zstd(zstd::Encoder::new(compressed, 3).map_err(LayerError::Write)?)
            }
            Compression::None => Encoder::Plain(compressed),
        };
        let mut builder = tar::Builder::new(HashWriter::new(encoder));
        builder.mode(tar::HeaderMode::Complete);
        Ok(TarOut {
            builder,
            compression,
            links: HashMap::new(),
        })
    }

    fn finish(self) -> Result<LayerDescriptor, LayerError> {
        let tar = self.builder.into_inner().map_err(LayerError::Write)?;
        let (encoder, diff_id, uncompressed_size) = tar.finish().map_err(LayerError::Write)?;
        let diff_id = diff_id.unwrap_or_default();
        let compressed = encoder.finish().map_err(LayerError::Write)?;
        let (mut out, digest, size) = compressed.finish().map_err(LayerError::Write)?;
        let digest = digest.unwrap_or_else(|| diff_id.clone());
        out.flush().map_err(LayerError::Write)?;
        Ok(LayerDescriptor {
            media_type: self.compression.media_type(),
            digest,
            size,
            diff_id,
            uncompressed_size,
        })
    }

    /// Appends one header (with PAX records for what ustar cannot hold) and its data.
    fn append(
        &mut self,
        mut header: Header,
        path: &[u8],
        link: Option<&[u8]>,
        mut pax: Vec<(String, Vec<u8>)>,
        data: impl Read,
    ) -> Result<(), LayerError> {
        if !set_ustar_path(&mut header, path) {
            pax.push(("path".into(), path.to_vec()));
        }
        if let Some(link) = link {
            if link.len() <= 100 {
                header
                    .set_link_name_literal(link)
                    .map_err(LayerError::Write)?;
            } else {
                pax.push(("linkpath".into(), link.to_vec()));
            }
        }
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(LayerError::Write)?;
        }
        header.set_cksum();
        self.builder
            .append(&header, data)
            .map_err(LayerError::Write)
    }

    /// Writes the entry `name` of `dir` as `path`.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &[u8],
        st: &FileStat,
    ) -> Result<(), LayerError> {
        let kind = fsutil::kind(st);
        let mut header = Header::new_ustar();
        header.set_mode(st.st_mode & 0o7777);
        header.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        let mut pax = Vec::new();
        let (uid, gid) = (u64::from(st.st_uid), u64::from(st.st_gid));
        header.set_uid(uid);
        header.set_gid(gid);
        // ustar's octal fields hold ids below 8^7.
        if uid >= 0o7777777 {
            pax.push(("uid".into(), uid.to_string().into_bytes()));
        }
        if gid >= 0o7777777 {
            pax.push(("gid".into(), gid.to_string().into_bytes()));
        }
        let keys = match sys::list_xattrs_at(dir, name) {
            Ok(keys) => keys,
            Err(Errno::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(export_err(path, "listing xattrs")(e)),
        };
        for key in keys {
            if is_overlay_xattr(&key) {
                continue;
            }
            if let Some(value) =
                sys::get_xattr_at(dir, name, &key).map_err(export_err(path, "reading an xattr"))?
            {
                let mut k = b"SCHILY.xattr.".to_vec();
                k.extend_from_slice(&key);
                pax.push((String::from_utf8_lossy(&k).into_owned(), value));
            }
        }
        if kind != SFlag::S_IFDIR && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)) {
                let first = first.clone();
                header.set_entry_type(EntryType::Link);
                header.set_size(0);
                return self.append(header, path, Some(&first), pax, io::empty());
            }
            self.links.insert((st.st_dev, st.st_ino), path.to_vec());
        }
        match kind {
            SFlag::S_IFDIR => {
                header.set_entry_type(EntryType::Directory);
                header.set_size(0);
                let mut p = path.to_vec();
                p.push(b'/');
                self.append(header, &p, None, pax, io::empty())
            }
            SFlag::S_IFREG => {
                header.set_entry_type(EntryType::Regular);
                let size = u64::try_from(st.st_size).unwrap_or(0);
                header.set_size(size);
                let file = File::from(
                    nix::fcntl::openat(
                        dir,
                        name,
                        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(export_err(path, "opening"))?,
                );
                // A file that shrank meanwhile is padded rather than corrupting the stream.
                let data = file.take(size).chain(io::repeat(0)).take(size);
                self.append(header, path, None, pax, data)
            }
            SFlag::S_IFLNK => {
                header.set_entry_type(EntryType::Symlink);
                header.set_size(0);
                let target =
                    nix::fcntl::readlinkat(dir, name).map_err(export_err(path, "readlink"))?;
                self.append(header, path, Some(target.as_bytes()), pax, io::empty())
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO => {
                header.set_entry_type(match kind {
                    SFlag::S_IFCHR => EntryType::Char,
                    SFlag::S_IFBLK => EntryType::Block,
                    _ => EntryType::Fifo,
                });
                header.set_size(0);
                let major = u32::try_from(nix::sys::stat::major(st.st_rdev)).unwrap_or(0);
                let minor = u32::try_from(nix::sys::stat::minor(st.st_rdev)).unwrap_or(0);
                header.set_device_major(major).map_err(LayerError::Write)?;
                header.set_device_minor(minor).map_err(LayerError::Write)?;
                self.append(header, path, None, pax, io::empty())
            }
            // Sockets do not belong in a layer.
            _ => Ok(()),
        }
    }

    /// A whiteout for `path` (`dir/.wh.name`).
    fn whiteout(&mut self, parent: &[u8], name: &[u8]) -> Result<(), LayerError> {
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name);
        self.marker(&join(parent, &wh))
    }

    /// An empty regular file entry (whiteouts and opaque markers).
    fn marker(&mut self, path: &[u8]) -> Result<(), LayerError> {
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        self.append(header, path, None, Vec::new(), io::empty())
    }
}

/// Puts `path` into the ustar name (and prefix) fields; false when it does not fit.
fn set_ustar_path(header: &mut Header, path: &[u8]) -> bool {
    let Some(ustar) = header.as_ustar_mut() else {
        return false;
    };
    if path.len() <= 100 {
        ustar.name[..path.len()].copy_from_slice(path);
        return true;
    }
    // Split at a slash so that the prefix fits in 155 bytes and the rest in 100.
    let split = path
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'/' && i <= 155 && path.len() - i - 1 <= 100 && i > 0)
        .map(|(i, _)| i)
        .next();
    let Some(i) = split else {
        let cut = 100.min(path.len());
        ustar.name.copy_from_slice(&path[..cut]);
        return false;
    };
    ustar.prefix[..i].copy_from_slice(&path[..i]);
    let rest = &path[i + 1..];
    ustar.name[..rest.len()].copy_from_slice(rest);
    true
}

fn open_root(path: &Path) -> Result<OwnedFd, LayerError> {
    fsutil::open_dir(path).map_err(|source| LayerError::ExportSys {
        path: path.display().to_string(),
        op: "opening",
        source,
    })
}

/// The diff of an overlay snapshot: its upper directory `upper` over `lowers` (nearest
/// first).
pub(crate) fn export_upper(
    upper: &Path,
    lowers: &[PathBuf],
    out: impl Write,
    compression: Compression,
) -> Result<LayerDescriptor, LayerError> {
    let root = open_root(upper)?;
    let lower_fds = lowers
        .iter()
        .map(|l| open_root(l))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tar = TarOut::new(out, compression)?;
    walk_upper(&mut tar, root.as_fd(), b"", &lower_fds)?;
    tar.finish()
}

fn walk_upper<W: Write>(
    tar: &mut TarOut<W>,
    dir: BorrowedFd<'_>,
    prefix: &[u8],
    lowers: &[OwnedFd],
) -> Result<(), LayerError> {
    for name in fsutil::list_dir(dir).map_err(export_err(prefix, "listing"))? {
        let path = join(prefix, name.as_bytes());
        let st = fsutil::lstat_at(dir, &name).map_err(export_err(&path, "lstat"))?;
        let kind = fsutil::kind(&st);
        if kind == SFlag::S_IFCHR && st.st_rdev == 0 {
            if exists_in_lowers(lowers, &path)? {
                tar.whiteout(prefix, name.as_bytes())?;
            }
            continue;
        }
        if kind == SFlag::S_IFDIR {
            for key in REDIRECT_KEYS {
                if sys::get_xattr_at(dir, &name, key)
                    .map_err(export_err(&path, "reading xattrs"))?
                    .is_some()
                {
                    return Err(LayerError::Redirect {
                        path: String::from_utf8_lossy(&path).into_owned(),
                    });
                }
            }
            tar.entry(dir, &name, &path, &st)?;
            let mut opaque = false;
            for key in fsutil::OPAQUE_KEYS {
                if sys::get_xattr_at(dir, &name, key)
                    .map_err(export_err(&path, "reading xattrs"))?
                    .as_deref()
                    == Some(b"y")
                {
                    opaque = true;
                }
            }
            if opaque {
                tar.marker(&join(&path, b".wh..wh..opq"))?;
            }
            let sub = fsutil::open_dir_at(dir, &name).map_err(export_err(&path, "opening"))?;
            walk_upper(tar, sub.as_fd(), &path, lowers)?;
            continue;
        }
        tar.entry(dir, &name, &path, &st)?;
    }
    Ok(())
}

/// Whether `path` exists in the merged view of `lowers` (nearest first), following
/// overlay's rules: the topmost layer with the name decides; a whiteout hides it; a
/// directory merges with the same directory below unless it is opaque.
fn exists_in_lowers(lowers: &[OwnedFd], path: &[u8]) -> Result<bool, LayerError> {
    let comps: Vec<&[u8]> = path
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let Some((last, dirs)) = comps.split_last() else {
        return Ok(true);
    };
    // The directories that make up the current merged directory, topmost first.
    let mut layers: Vec<OwnedFd> = lowers
        .iter()
        .map(|fd| fd.try_clone())
        .collect::<Result<_, _>>()
        .map_err(|e| LayerError::Write(io::Error::other(e)))?;
    for comp in dirs {
        let name = OsStr::from_bytes(comp);
        let mut next = Vec::new();
        for layer in &layers {
            match fsutil::lstat_at(layer.as_fd(), name) {
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(e) => return Err(export_err(path, "lstat in a lower layer")(e)),
                Ok(st) if fsutil::kind(&st) != SFlag::S_IFDIR => break,
                Ok(_) => {
                    let sub = fsutil::open_dir_at(layer.as_fd(), name)
                        .map_err(export_err(path, "opening a lower directory"))?;
                    let opaque = fsutil::is_opaque(sub.as_fd()).unwrap_or(false);
                    next.push(sub);
                    if opaque {
                        break;
                    }
                }
            }
        }
        if next.is_empty() {
            return Ok(false);
        }
        layers = next;
    }
    let name = OsStr::from_bytes(last);
    for layer in &layers {
        match fsutil::lstat_at(layer.as_fd(), name) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Err(e) => return Err(export_err(path, "lstat in a lower layer")(e)),
            Ok(st) => {
                let whiteout = fsutil::kind(&st) == SFlag::S_IFCHR && st.st_rdev == 0;
                return Ok(!whiteout);
            }
        }
    }
    Ok(false)
}

/// The diff of a native snapshot `own` (a full tree) against its parent's tree.
pub(crate) fn export_compare(
    own: &Path,
    parent: Option<&Path>,
    out: impl Write,
    compression: Compression,
) -> Result<LayerDescriptor, LayerError> {
    let root = open_root(own)?;
    let parent = parent.map(open_root).transpose()?;
    let mut tar = TarOut::new(out, compression)?;
    let mut pending = Vec::new();
    compare_dir(
        &mut tar,
        root.as_fd(),
        parent.as_ref().map(AsFd::as_fd),
        b"",
        &mut pending,
    )?;
    tar.finish()
}

/// A directory that is unchanged itself but must be written before a changed child.
struct PendingDir {
    parent: OwnedFd,
    name: OsString,
    path: Vec<u8>,
    st: FileStat,
}

fn flush_pending<W: Write>(
    tar: &mut TarOut<W>,
    pending: &mut Vec<PendingDir>,
) -> Result<(), LayerError> {
    for d in pending.drain(..) {
        tar.entry(d.parent.as_fd(), &d.name, &d.path, &d.st)?;
    }
    Ok(())
}

fn compare_dir<W: Write>(
    tar: &mut TarOut<W>,
    own: BorrowedFd<'_>,
    parent: Option<BorrowedFd<'_>>,
    prefix: &[u8],
    pending: &mut Vec<PendingDir>,
) -> Result<(), LayerError> {
    let mut names = fsutil::list_dir(own).map_err(export_err(prefix, "listing"))?;
    if let Some(p) = parent {
        names.extend(fsutil::list_dir(p).map_err(export_err(prefix, "listing the parent"))?);
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        names.dedup();
    }
    for name in names {
        let path = join(prefix, name.as_bytes());
        let mine = match fsutil::lstat_at(own, &name) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(export_err(&path, "lstat")(e)),
        };
        let theirs = match parent.map(|p| fsutil::lstat_at(p, &name)) {
            Some(Ok(st)) => Some(st),
            Some(Err(Errno::ENOENT)) | None => None,
            Some(Err(e)) => return Err(export_err(&path, "lstat in the parent")(e)),
        };
        let Some(st) = mine else {
            flush_pending(tar, pending)?;
            tar.whiteout(prefix, name.as_bytes())?;
            continue;
        };
        let is_dir = fsutil::kind(&st) == SFlag::S_IFDIR;
        let same_kind_dir = theirs
            .as_ref()
            .is_some_and(|t| fsutil::kind(t) == SFlag::S_IFDIR)
            && is_dir;
        let changed = match (&theirs, parent) {
            (Some(t), Some(p)) => differs(own, p, &name, &st, t, &path)?,
            _ => true,
        };
        if is_dir {
            let before;
            if changed {
                flush_pending(tar, pending)?;
                tar.entry(own, &name, &path, &st)?;
                before = pending.len();
            } else {
                before = pending.len();
                pending.push(PendingDir {
                    parent: own
                        .try_clone_to_owned()
                        .map_err(|e| LayerError::Write(io::Error::other(e)))?,
                    name: name.clone(),
                    path: path.clone(),
                    st,
                });
            }
            let sub = fsutil::open_dir_at(own, &name).map_err(export_err(&path, "opening"))?;
            let psub = match (same_kind_dir, parent) {
                (true, Some(p)) => Some(
                    fsutil::open_dir_at(p, &name)
                        .map_err(export_err(&path, "opening in the parent"))?,
                ),
                _ => None,
            };
            compare_dir(
                tar,
                sub.as_fd(),
                psub.as_ref().map(AsFd::as_fd),
                &path,
                pending,
            )?;
            // When nothing below changed, the unchanged directory need not be written.
            pending.truncate(before);
            continue;
        }
        if changed {
            flush_pending(tar, pending)?;
            tar.entry(own, &name, &path, &st)?;
        }
    }
    Ok(())
}

/// Whether the entry changed from the parent's: type, mode, owner, device, size, mtime,
/// symlink target, xattrs; file contents too when the mtime has no sub-second part (and
/// so may hide a same-second rewrite).
fn differs(
    own: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    a: &FileStat,
    b: &FileStat,
    path: &[u8],
) -> Result<bool, LayerError> {
    if a.st_mode != b.st_mode
        || a.st_uid != b.st_uid
        || a.st_gid != b.st_gid
        || a.st_rdev != b.st_rdev
    {
        return Ok(true);
    }
    let kind = fsutil::kind(a);
    // A changed link count means a hardlink was added or removed: the entry must be
    // written so that its new links can refer to it.
    if kind != SFlag::S_IFDIR
        && (a.st_size != b.st_size
            || a.st_nlink != b.st_nlink
            || a.st_mtime != b.st_mtime
            || a.st_mtime_nsec != b.st_mtime_nsec)
    {
        return Ok(true);
    }
    if kind == SFlag::S_IFDIR && a.st_mtime != b.st_mtime {
        return Ok(true);
    }
    let xattrs = |dir| -> Result<Vec<XattrPair>, LayerError> {
        let mut keys = match sys::list_xattrs_at(dir, name) {
            Ok(k) => k,
            Err(Errno::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(export_err(path, "listing xattrs")(e)),
        };
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let v = sys::get_xattr_at(dir, name, &k)
                    .map_err(export_err(path, "reading an xattr"))?;
                Ok((k, v))
            })
            .collect()
    };
    if xattrs(own)? != xattrs(parent)? {
        return Ok(true);
    }
    match kind {
        SFlag::S_IFLNK => {
            let x = nix::fcntl::readlinkat(own, name).map_err(export_err(path, "readlink"))?;
            let y = nix::fcntl::readlinkat(parent, name).map_err(export_err(path, "readlink"))?;
            Ok(x != y)
        }
        SFlag::S_IFREG if a.st_mtime_nsec == 0 => {
            let open = |dir| -> Result<File, LayerError> {
                Ok(File::from(
                    nix::fcntl::openat(
                        dir,
                        name,
                        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(export_err(path, "opening"))?,
                ))
            };
            let (mut x, mut y) = (open(own)?, open(parent)?);
            let (mut bx, mut by) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
            loop {
                let n = read_full(&mut x, &mut bx).map_err(LayerError::Read)?;
                let m = read_full(&mut y, &mut by).map_err(LayerError::Read)?;
                if n != m || bx[..n] != by[..m] {
                    return Ok(true);
                }
                if n == 0 {
                    return Ok(false);
                }
            }
        }
        _ => Ok(false),
    }
}

type XattrPair = (Vec<u8>, Option<Vec<u8>>);

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
