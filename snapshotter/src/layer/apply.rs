//! Applying an OCI layer tar into a snapshot directory.
//!
//! In overlay mode the layer is written straight into the new snapshot's upper directory:
//! `.wh.name` becomes a 0:0 character device (the overlay whiteout) and `.wh..wh..opq` the
//! opaque xattr of the directory, in the namespace the store mounts with (`trusted.` as
//! root, `user.` with `userxattr`). In merged mode (the native backend, whose snapshot is a
//! full copy of its parent) whiteouts delete and opaque markers clear what the layer did
//! not itself create.
//!
//! The archive is read with the tar crate's raw iterator so that extension headers (PAX,
//! GNU long names) are read here with a size bound, instead of into unbounded buffers.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use super::descriptor::{HashReader, ImportOptions, LayerError};
use crate::backend::{self, XattrNamespace};
use crate::fsutil;
use crate::sys;

/// Extension headers (PAX records, GNU long names) above this size are rejected.
const MAX_EXTENSION: u64 = 1 << 20;

/// How whiteouts and opaque directories are represented in the target directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApplyMode {
    /// The target is an overlay upper directory using this xattr namespace.
    Overlay(XattrNamespace),
    /// The target is a full tree (native backend): whiteouts delete.
    Merged,
}

/// What an applied layer turned out to be.
#[derive(Debug)]
pub(crate) struct Applied {
    pub diff_id: String,
    pub blob_digest: Option<String>,
    pub blob_size: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decompress {
    Gzip,
    Zstd,
    Plain,
}

fn detect(media_type: Option<&str>, head: &[u8]) -> Decompress {
    match media_type {
        Some(m) if m.ends_with("gzip") => return Decompress::Gzip,
        Some(m) if m.ends_with("zstd") => return Decompress::Zstd,
        Some(m) if m.ends_with(".tar") || m.ends_with("tar") => return Decompress::Plain,
        _ => {}
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        Decompress::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Decompress::Zstd
    } else {
        Decompress::Plain
    }
}

/// Applies the layer read from `layer` into the directory `dir`.
pub(crate) fn apply(
    dir: &Path,
    layer: impl Read,
    mode: ApplyMode,
    options: &ImportOptions,
) -> Result<Applied, LayerError> {
    let root = fsutil::open_dir(dir).map_err(|source| LayerError::EntrySys {
        entry: String::new(),
        op: "opening the snapshot directory",
        source,
    })?;
    let rootless = backend::in_user_namespace()
        .map_err(|e| LayerError::IdMap(io::Error::other(e.to_string())))?;
    let maps = if rootless {
        Some(IdMaps::current()?)
    } else {
        None
    };
    let mut compressed = HashReader::new(layer);
    let (diff_id, kind) = {
        let mut buffered = BufReader::with_capacity(128 * 1024, &mut compressed);
        let head = buffered.fill_buf().map_err(LayerError::Read)?;
        let kind = detect(options.media_type.as_deref(), head);
        let decoder: Box<dyn Read + '_> = match kind {
            Decompress::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Decompress::Zstd => {
                Box::new(zstd::Decoder::with_buffer(buffered).map_err(LayerError::Read)?)
            }
            Decompress::Plain => Box::new(buffered),
        };
        let mut plain = HashReader::new(decoder);
        {
            let mut applier = Applier {
                root,
                mode,
                rootless,
                maps,
                created: HashSet::new(),
                dir_times: Vec::new(),
                cache: None,
                warned_trusted: false,
            };
            let mut archive = tar::Archive::new(&mut plain);
            applier.run(&mut archive)?;
            applier.finish()?;
        }
        // The digest covers the whole stream, including the end-of-archive padding.
        io::copy(&mut plain, &mut io::sink()).map_err(LayerError::Read)?;
        (plain.finish().map_err(LayerError::Read)?.0, kind)
    };
    io::copy(&mut compressed, &mut io::sink()).map_err(LayerError::Read)?;
    let (blob_digest, blob_size) = compressed.finish().map_err(LayerError::Read)?;
    Ok(Applied {
        diff_id,
        blob_digest: (kind != Decompress::Plain).then_some(blob_digest),
        blob_size: (kind != Decompress::Plain).then_some(blob_size),
    })
}

/// The id ranges mapped into the current user namespace (`inside`, `count`).
#[derive(Debug)]
struct IdMaps {
    uids: Vec<(u64, u64)>,
    gids: Vec<(u64, u64)>,
}

impl IdMaps {
    fn current() -> Result<IdMaps, LayerError> {
        let read = |path: &str| -> Result<Vec<(u64, u64)>, LayerError> {
            let text = std::fs::read_to_string(path).map_err(LayerError::IdMap)?;
            Ok(text
                .lines()
                .filter_map(|l| {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    (f.len() == 3).then(|| (f[0], f[2]))
                })
                .collect())
        };
        Ok(IdMaps {
            uids: read("/proc/self/uid_map")?,
            gids: read("/proc/self/gid_map")?,
        })
    }

    fn contains(ranges: &[(u64, u64)], id: u64) -> bool {
        ranges
            .iter()
            .any(|&(start, count)| id >= start && id < start + count)
    }
}

/// Extension data that applies to the next entry.
#[derive(Debug, Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// One entry's effective attributes after extension headers.
#[derive(Debug)]
struct Attrs {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: TimeSpec,
    rdev: libc::dev_t,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The components of an entry path, without `.`, empty and leading `/` components (an
/// absolute path is taken relative to the layer root, as docker does); `..` is rejected.
fn clean(path: &[u8]) -> Result<Vec<&[u8]>, LayerError> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(LayerError::Entry {
                    entry: lossy(path),
                    problem: "path contains `..`".into(),
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The records of a PAX extended header, `"<length> <key>=<value>\n"` each, split by their
/// length prefix: values (binary xattrs such as `security.capability`) may hold newlines,
/// which the tar crate's own line-based parser cannot take.
fn pax_records(mut data: &[u8]) -> impl Iterator<Item = Result<(&[u8], &[u8]), String>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let record = split_pax_record(data);
        // One malformed record makes the rest unreadable: report it once and stop.
        data = record.as_ref().map_or(&[][..], |(_, _, rest)| rest);
        Some(
            record
                .map(|(key, value, _)| (key, value))
                .map_err(str::to_owned),
        )
    })
}

/// One PAX record's key and value, and the bytes after it.
type PaxSplit<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The first record of `data` as `(key, value, rest)`.
fn split_pax_record(data: &[u8]) -> Result<PaxSplit<'_>, &'static str> {
    let space = data
        .iter()
        .position(|b| *b == b' ')
        .ok_or("no length prefix")?;
    let length: usize = std::str::from_utf8(&data[..space])
        .ok()
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .ok_or("bad length prefix")?;
    if length <= space + 1 || length > data.len() || data[length - 1] != b'\n' {
        return Err("length does not end a record");
    }
    let body = &data[space + 1..length - 1];
    let equals = body
        .iter()
        .position(|b| *b == b'=')
        .ok_or("no '=' in record")?;
    Ok((&body[..equals], &body[equals + 1..], &data[length..]))
}

fn parse_mtime(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        if !d.is_ascii_digit() {
            return None;
        }
        nanos += i64::from(d - b'0') * 10i64.pow(8 - u32::try_from(i).ok()?);
    }
    if secs < 0 && nanos > 0 {
        return Some(TimeSpec::new(secs - 1, 1_000_000_000 - nanos));
    }
    Some(TimeSpec::new(secs, nanos))
}

struct Applier {
    root: OwnedFd,
    mode: ApplyMode,
    rootless: bool,
    maps: Option<IdMaps>,
    /// Paths this layer created (merged mode: what an opaque marker keeps).
    created: HashSet<Vec<u8>>,
    /// Directory times, set last because creating children changes them.
    dir_times: Vec<(Vec<u8>, TimeSpec)>,
    /// The last parent directory resolved, by path.
    cache: Option<(Vec<u8>, OwnedFd)>,
    warned_trusted: bool,
}

impl Applier {
    fn run<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), LayerError> {
        let entries = archive.entries().map_err(LayerError::Read)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(LayerError::Read)?;
            let kind = entry.header().entry_type();
            let slot = match kind {
                EntryType::XHeader => Some((&mut pending.pax, "pax")),
                EntryType::GNULongName => Some((&mut pending.long_name, "gnu long name")),
                EntryType::GNULongLink => Some((&mut pending.long_link, "gnu long link")),
                _ => None,
            };
            if let Some((slot, what)) = slot {
                *slot = Some(read_extension(&mut entry, what)?);
                continue;
            }
            if kind == EntryType::XGlobalHeader {
                // Global PAX defaults are not used by image layers; read past them.
                read_extension(&mut entry, "pax global")?;
                continue;
            }
            let attrs = attrs(&entry, std::mem::take(&mut pending))?;
            self.entry(kind, attrs, &mut entry)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), LayerError> {
        self.cache = None;
        for (path, mtime) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            let rel = Path::new(OsStr::from_bytes(&path));
            let fd = fsutil::open_in_root(
                self.root.as_fd(),
                rel,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
            );
            // A later entry may have replaced the directory; its times are its own.
            if let Ok(fd) = fd {
                nix::sys::stat::futimens(&fd, &mtime, &mtime).map_err(|source| {
                    LayerError::EntrySys {
                        entry: lossy(&path),
                        op: "setting times",
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }

    /// The directory `comps` inside the root, following symlinks only inside it, creating
    /// missing directories (0755, owned by the namespace's root).
    fn dir(&mut self, comps: &[&[u8]], entry: &str) -> Result<OwnedFd, LayerError> {
        let joined = comps.join(&b'/');
        if let Some((path, fd)) = &self.cache {
            if *path == joined {
                return dup(fd.as_fd(), entry);
            }
        }
        let rel = Path::new(OsStr::from_bytes(&joined));
        let fd = match fsutil::open_in_root(
            self.root.as_fd(),
            rel,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if !comps.is_empty() => {
                let (last, parent) = (comps[comps.len() - 1], &comps[..comps.len() - 1]);
                let parent = self.dir(parent, entry)?;
                let name = OsStr::from_bytes(last);
                nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755))
                    .map_err(sys_err(entry, "creating a parent directory"))?;
                fsutil::open_dir_at(parent.as_fd(), name)
                    .map_err(sys_err(entry, "opening a parent directory"))?
            }
            Err(source) => {
                return Err(LayerError::EntrySys {
                    entry: entry.to_owned(),
                    op: "resolving the parent directory",
                    source,
                });
            }
        };
        self.cache = Some((joined, dup(fd.as_fd(), entry)?));
        Ok(fd)
    }

    fn check_ids(&self, entry: &str, uid: u64, gid: u64) -> Result<(), LayerError> {
        let unmapped = |kind, id| LayerError::UnmappedId {
            entry: entry.to_owned(),
            kind,
            id,
        };
        if let Some(maps) = &self.maps {
            if !IdMaps::contains(&maps.uids, uid) {
                return Err(unmapped("uid", uid));
            }
            if !IdMaps::contains(&maps.gids, gid) {
                return Err(unmapped("gid", gid));
            }
        }
        if u32::try_from(uid).is_err() {
            return Err(unmapped("uid", uid));
        }
        if u32::try_from(gid).is_err() {
            return Err(unmapped("gid", gid));
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        kind: EntryType,
        attrs: Attrs,
        data: &mut R,
    ) -> Result<(), LayerError> {
        let entry = lossy(&attrs.path);
        let comps = clean(&attrs.path)?;
        let Some((name, parent_comps)) = comps.split_last() else {
            // The layer root itself ("./"): only its metadata matters.
            if kind == EntryType::Directory {
                let root = dup(self.root.as_fd(), &entry)?;
                self.metadata_fd(&root, &attrs, &entry)?;
                self.dir_times.push((Vec::new(), attrs.mtime));
            }
            return Ok(());
        };
        let rel_path = comps.join(&b'/');
        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(parent_comps, target, &attrs, &entry);
        }
        let parent = self.dir(parent_comps, &entry)?;
        let parent = parent.as_fd();
        let name = OsStr::from_bytes(name);
        let is_dir = kind == EntryType::Directory;
        let kept_dir = self.replace_existing(parent, name, is_dir, &entry)?;
        if self.mode == ApplyMode::Merged {
            self.created.insert(rel_path.clone());
        }
        let perm = Mode::from_bits_truncate(attrs.mode & 0o7777);
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let fd = nix::fcntl::openat(
                    parent,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(sys_err(&entry, "creating the file"))?;
                let mut file = File::from(fd);
                io::copy(data, &mut file).map_err(LayerError::Read)?;
                let fd = OwnedFd::from(file);
                self.metadata_fd(&fd, &attrs, &entry)?;
                nix::sys::stat::futimens(&fd, &attrs.mtime, &attrs.mtime)
                    .map_err(sys_err(&entry, "setting times"))?;
            }
            EntryType::Directory => {
                self.cache = None;
                if !kept_dir {
                    nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700))
                        .map_err(sys_err(&entry, "creating the directory"))?;
                }
                let fd = fsutil::open_dir_at(parent, name)
                    .map_err(sys_err(&entry, "opening the directory"))?;
                self.metadata_fd(&fd, &attrs, &entry)?;
                self.dir_times.push((rel_path, attrs.mtime));
            }
            EntryType::Symlink => {
                self.cache = None;
                let target = attrs.link.clone().unwrap_or_default();
                nix::unistd::symlinkat(OsStr::from_bytes(&target), parent, name)
                    .map_err(sys_err(&entry, "creating the symlink"))?;
                self.metadata_at(parent, name, &attrs, &entry, false)?;
            }
            EntryType::Link => {
                let target = attrs.link.clone().unwrap_or_default();
                self.hardlink(parent, name, &target, &entry)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                if self.rootless && sflag != SFlag::S_IFIFO {
                    tracing::warn!(
                        entry,
                        "skipping a device node: it cannot be created in a user namespace"
                    );
                    return Ok(());
                }
                nix::sys::stat::mknodat(parent, name, sflag, perm, attrs.rdev)
                    .map_err(sys_err(&entry, "creating the device node"))?;
                self.metadata_at(parent, name, &attrs, &entry, true)?;
            }
            other => {
                tracing::warn!(entry, kind = ?other, "skipping a layer entry of unsupported type");
            }
        }
        Ok(())
    }
}

fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    what: &'static str,
) -> Result<Vec<u8>, LayerError> {
    let size = entry.header().entry_size().map_err(LayerError::Read)?;
    if size > MAX_EXTENSION {
        return Err(LayerError::HeaderTooLarge {
            kind: what,
            size,
            limit: MAX_EXTENSION,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(MAX_EXTENSION)
        .read_to_end(&mut buf)
        .map_err(LayerError::Read)?;
    Ok(buf)
}

fn sys_err<'a>(entry: &'a str, op: &'static str) -> impl FnOnce(Errno) -> LayerError + 'a {
    move |source| LayerError::EntrySys {
        entry: entry.to_owned(),
        op,
        source,
    }
}

fn dup(fd: BorrowedFd<'_>, entry: &str) -> Result<OwnedFd, LayerError> {
    fd.try_clone_to_owned()
        .map_err(|e| sys_err(entry, "dup")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))
}

/// The effective attributes of an entry: its header overridden by PAX records and GNU
/// long names.
fn attrs<R: Read>(entry: &tar::Entry<'_, R>, pending: Pending) -> Result<Attrs, LayerError> {
    let header = entry.header();
    let mut path = pending
        .long_name
        .map(strip_nul)
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let mut link = pending
        .long_link
        .map(strip_nul)
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let entry_name = lossy(&path);
    let bad = |problem: String| LayerError::Entry {
        entry: entry_name.clone(),
        problem,
    };
    let mut uid = header.uid().map_err(|e| bad(format!("bad uid: {e}")))?;
    let mut gid = header.gid().map_err(|e| bad(format!("bad gid: {e}")))?;
    let mode = header.mode().map_err(|e| bad(format!("bad mode: {e}")))?;
    let mtime_secs = header.mtime().map_err(|e| bad(format!("bad mtime: {e}")))?;
    let mut mtime = TimeSpec::new(i64::try_from(mtime_secs).unwrap_or(i64::MAX), 0);
    let major = header.device_major().ok().flatten().unwrap_or(0);
    let minor = header.device_minor().ok().flatten().unwrap_or(0);
    let rdev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
    let mut xattrs = Vec::new();
    if let Some(pax) = &pending.pax {
        for record in pax_records(pax) {
            let (key, value) = record.map_err(|e| bad(format!("bad pax record: {e}")))?;
            let number = || -> Result<u64, LayerError> {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad(format!("bad pax {} {:?}", lossy(key), lossy(value))))
            };
            match key {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = Some(value.to_vec()),
                b"uid" => uid = number()?,
                b"gid" => gid = number()?,
                b"mtime" => {
                    mtime = parse_mtime(value)
                        .ok_or_else(|| bad(format!("bad pax mtime {:?}", lossy(value))))?;
                }
                b"size" => {
                    // The tar crate's raw iterator sizes entries by the header; a PAX size
                    // that disagrees would desynchronise the stream, so refuse it.
                    let size = header.entry_size().map_err(|e| bad(e.to_string()))?;
                    if number()? != size {
                        return Err(bad("pax size overrides the header size".into()));
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(Attrs {
        path,
        link,
        uid,
        gid,
        mode,
        mtime,
        rdev,
        xattrs,
    })
}

impl Applier {
    fn whiteout(
        &mut self,
        parent_comps: &[&[u8]],
        target: &[u8],
        attrs: &Attrs,
        entry: &str,
    ) -> Result<(), LayerError> {
        if target == b".wh..opq" {
            let dir = self.dir(parent_comps, entry)?;
            match self.mode {
                ApplyMode::Overlay(ns) => sys::fset_xattr(dir.as_fd(), ns.opaque_key(), b"y")
                    .map_err(sys_err(entry, "marking the directory opaque"))?,
                ApplyMode::Merged => {
                    let prefix = parent_comps.join(&b'/');
                    for child in fsutil::list_dir(dir.as_fd())
                        .map_err(sys_err(entry, "listing the opaque directory"))?
                    {
                        let mut rel = prefix.clone();
                        if !rel.is_empty() {
                            rel.push(b'/');
                        }
                        rel.extend_from_slice(child.as_bytes());
                        if !self.created.contains(&rel) {
                            fsutil::remove_at(dir.as_fd(), &child)
                                .map_err(sys_err(entry, "clearing the opaque directory"))?;
                        }
                    }
                    self.cache = None;
                }
            }
            return Ok(());
        }
        if target.starts_with(b".wh.") || target.is_empty() {
            // Other `.wh..wh.` names are overlay-internal in some tools; OCI ignores them.
            return Ok(());
        }
        if target == b"." || target == b".." {
            // `.wh..` and `.wh...` would whiteout the directory itself or its parent: at
            // the layer root, removing `..` emptied the directory above the one being
            // imported into (in kiln's store: the snapshot's own record directory).
            return Err(LayerError::Entry {
                entry: entry.to_owned(),
                problem: "whiteout of `.` or `..`".into(),
            });
        }
        let dir = self.dir(parent_comps, entry)?;
        let name = OsStr::from_bytes(target);
        self.cache = None;
        fsutil::remove_at(dir.as_fd(), name)
            .map_err(sys_err(entry, "removing the whited-out entry"))?;
        if let ApplyMode::Overlay(_) = self.mode {
            nix::sys::stat::mknodat(&dir, name, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(sys_err(entry, "creating the whiteout"))?;
            self.check_ids(entry, attrs.uid, attrs.gid)?;
            chown_at(dir.as_fd(), name, attrs.uid, attrs.gid, entry)?;
        }
        Ok(())
    }

    /// Clears the way for a new entry `name`: an existing directory stays when the new
    /// entry is a directory too (returns true), anything else is removed.
    fn replace_existing(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        new_is_dir: bool,
        entry: &str,
    ) -> Result<bool, LayerError> {
        match fsutil::lstat_at(parent, name) {
            Err(Errno::ENOENT) => Ok(false),
            Err(source) => Err(sys_err(entry, "inspecting the existing entry")(source)),
            Ok(st) if new_is_dir && fsutil::kind(&st) == SFlag::S_IFDIR => Ok(true),
            Ok(_) => {
                self.cache = None;
                fsutil::remove_at(parent, name)
                    .map_err(sys_err(entry, "replacing the existing entry"))?;
                Ok(false)
            }
        }
    }

    fn hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        target: &[u8],
        entry: &str,
    ) -> Result<(), LayerError> {
        let comps = clean(target)?;
        let Some((tname, tparent)) = comps.split_last() else {
            return Err(LayerError::Entry {
                entry: entry.to_owned(),
                problem: "hardlink to the layer root".into(),
            });
        };
        let joined = tparent.join(&b'/');
        let tdir = fsutil::open_in_root(
            self.root.as_fd(),
            Path::new(OsStr::from_bytes(&joined)),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(sys_err(entry, "resolving the hardlink target's directory"))?;
        // linkat without AT_SYMLINK_FOLLOW links the target entry itself, never what a
        // symlink there points to.
        nix::unistd::linkat(
            &tdir,
            OsStr::from_bytes(tname),
            parent,
            name,
            AtFlags::empty(),
        )
        .map_err(sys_err(
            entry,
            "creating the hardlink (the target must be in the same layer)",
        ))
    }

    fn apply_xattr(
        &mut self,
        entry: &str,
        key: &[u8],
        set: impl FnOnce() -> Result<(), Errno>,
    ) -> Result<(), LayerError> {
        // Overlay metadata in a layer would forge opaque directories or redirects.
        if key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.") {
            tracing::warn!(
                entry,
                key = lossy(key),
                "skipping an overlay xattr in a layer"
            );
            return Ok(());
        }
        if self.rootless && key.starts_with(b"trusted.") {
            if !self.warned_trusted {
                tracing::warn!(entry, "skipping trusted.* xattrs: not settable rootless");
                self.warned_trusted = true;
            }
            return Ok(());
        }
        match set() {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::EPERM) if !key.starts_with(b"security.capability") => {
                tracing::warn!(
                    entry,
                    key = lossy(key),
                    "skipping an xattr the filesystem refuses"
                );
                Ok(())
            }
            Err(source) => Err(LayerError::EntrySys {
                entry: entry.to_owned(),
                op: "setting an xattr",
                source,
            }),
        }
    }

    /// Ownership, mode and xattrs through an open descriptor (files and directories).
    fn metadata_fd(&mut self, fd: &OwnedFd, attrs: &Attrs, entry: &str) -> Result<(), LayerError> {
        self.check_ids(entry, attrs.uid, attrs.gid)?;
        nix::unistd::fchown(
            fd,
            Some(Uid::from_raw(u32::try_from(attrs.uid).unwrap_or(0))),
            Some(Gid::from_raw(u32::try_from(attrs.gid).unwrap_or(0))),
        )
        .map_err(sys_err(entry, "chown"))?;
        // After chown, which clears set-id bits.
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(attrs.mode & 0o7777))
            .map_err(sys_err(entry, "chmod"))?;
        for (key, value) in &attrs.xattrs {
            self.apply_xattr(entry, key, || sys::fset_xattr(fd.as_fd(), key, value))?;
        }
        Ok(())
    }

    /// Ownership, mode (not for symlinks), xattrs and times of the entry `name` of `parent`.
    fn metadata_at(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        attrs: &Attrs,
        entry: &str,
        chmod: bool,
    ) -> Result<(), LayerError> {
        self.check_ids(entry, attrs.uid, attrs.gid)?;
        chown_at(parent, name, attrs.uid, attrs.gid, entry)?;
        if chmod {
            // The entry was just created by this layer as a non-symlink, so following is
            // moot; fchmodat cannot refuse to follow on Linux.
            nix::sys::stat::fchmodat(
                parent,
                name,
                Mode::from_bits_truncate(attrs.mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(sys_err(entry, "chmod"))?;
        }
        for (key, value) in &attrs.xattrs {
            self.apply_xattr(entry, key, || sys::set_xattr_at(parent, name, key, value))?;
        }
        nix::sys::stat::utimensat(
            parent,
            name,
            &attrs.mtime,
            &attrs.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(sys_err(entry, "setting times"))
    }
}

fn chown_at(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    uid: u64,
    gid: u64,
    entry: &str,
) -> Result<(), LayerError> {
    nix::unistd::fchownat(
        parent,
        name,
        Some(Uid::from_raw(u32::try_from(uid).unwrap_or(0))),
        Some(Gid::from_raw(u32::try_from(gid).unwrap_or(0))),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys_err(entry, "chown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_rejects_dotdot_and_strips_roots() {
        assert!(clean(b"../x").is_err());
        assert!(clean(b"a/../../x").is_err());
        assert_eq!(clean(b"/abs/./x/").unwrap(), vec![&b"abs"[..], &b"x"[..]]);
        assert_eq!(clean(b"./").unwrap(), Vec::<&[u8]>::new());
    }

    #[test]
    fn pax_records_are_split_by_length_so_values_may_hold_newlines() {
        let data = b"28 SCHILY.xattr.user.k=a\nb\n\n12 uid=1000\n";
        let records: Vec<_> = pax_records(data).collect();
        assert_eq!(
            records,
            vec![
                Ok((&b"SCHILY.xattr.user.k"[..], &b"a\nb\n"[..])),
                Ok((&b"uid"[..], &b"1000"[..]))
            ]
        );
        assert_eq!(pax_records(b"").count(), 0);
    }

    #[test]
    fn malformed_pax_records_are_errors_not_panics() {
        for bad in [
            &b"x"[..],
            b"12",
            b"abc k=v\n",
            b"-5 k=v\n",
            b"99 k=v\n",
            b"2 k=v\n",
            b"8 k=vv\n",
            b"7 kvv\n\n",
            b"18446744073709551616 k=v\n",
        ] {
            let records: Vec<_> = pax_records(bad).collect();
            assert_eq!(records.len(), 1, "{bad:?}");
            assert!(records[0].is_err(), "{bad:?}: {records:?}");
        }
    }

    #[test]
    fn pax_mtimes_parse_with_fractions() {
        assert_eq!(parse_mtime(b"12.5"), Some(TimeSpec::new(12, 500_000_000)));
        assert_eq!(parse_mtime(b"7"), Some(TimeSpec::new(7, 0)));
        assert_eq!(parse_mtime(b"x"), None);
    }

    #[test]
    fn compression_is_detected_by_media_type_then_magic() {
        assert_eq!(
            detect(Some("application/vnd.oci.image.layer.v1.tar+zstd"), b""),
            Decompress::Zstd
        );
        assert_eq!(detect(None, &[0x1f, 0x8b, 8]), Decompress::Gzip);
        assert_eq!(detect(None, &[0x28, 0xb5, 0x2f, 0xfd]), Decompress::Zstd);
        assert_eq!(detect(None, b"ustar"), Decompress::Plain);
    }
}
