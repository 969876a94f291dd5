//! `--output type=tar`: the merged tree as a tar stream. POSIX/PAX: ustar headers, with PAX
//! records for what ustar cannot hold (long names and link targets, large ids and sizes);
//! names relative without a leading `/`, directories with a trailing `/`; numeric uid/gid
//! kept, user and group names empty; mtimes in whole seconds; hardlinks as link entries to
//! the first name; sockets skipped. Also used for the blobs of an OCI archive.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kiln_snapshotter::ImmutableRef;
use nix::sys::stat::FileStat;

use crate::error::ExportError;
use crate::view::View;
use crate::walk::{Entry, Kind, Visitor, walk};

/// Writes the merged tree of `r` to `out` as a tar stream.
pub fn tar(r: &ImmutableRef, out: impl Write) -> Result<(), ExportError> {
    let view = View::mount(r)?;
    let mut writer = TarWriter {
        builder: tar::Builder::new(out),
    };
    walk(view.path(), &mut writer)?;
    writer.builder.finish().map_err(ExportError::Write)
}

/// Largest value of an 8-byte octal ustar field (uid, gid).
const MAX_ID: u64 = 0o7_777_777;
/// Largest value of the 12-byte octal ustar size field.
const MAX_SIZE: u64 = 0o77_777_777_777;

/// Fills the ustar `name` and `prefix` fields with `path` when it fits; `false` otherwise.
fn set_ustar_name(header: &mut tar::Header, path: &[u8]) -> bool {
    let Some(ustar) = header.as_ustar_mut() else {
        return false;
    };
    ustar.name = [0; 100];
    ustar.prefix = [0; 155];
    if path.len() <= 100 {
        ustar.name[..path.len()].copy_from_slice(path);
        return true;
    }
    // Split at a '/' so the prefix (≤ 155) and the name (≤ 100, non-empty) both fit.
    let split = path
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            **b == b'/' && *i <= 155 && path.len() - i - 1 <= 100 && *i + 1 < path.len()
        })
        .map(|(i, _)| i)
        .next();
    match split {
        Some(i) => {
            ustar.prefix[..i].copy_from_slice(&path[..i]);
            let rest = &path[i + 1..];
            ustar.name[..rest.len()].copy_from_slice(rest);
            true
        }
        None => {
            // The PAX `path` record carries the real name; keep a truncated one here.
            ustar.name.copy_from_slice(&path[..100]);
            false
        }
    }
}

/// Fills the ustar `linkname` field when `target` fits; `false` otherwise.
fn set_ustar_link(header: &mut tar::Header, target: &[u8]) -> bool {
    let Some(ustar) = header.as_ustar_mut() else {
        return false;
    };
    ustar.linkname = [0; 100];
    let n = target.len().min(100);
    ustar.linkname[..n].copy_from_slice(&target[..n]);
    target.len() <= 100
}

/// One entry to append: a header plus the PAX records it needs.
pub(crate) struct EntryHeader {
    pub header: tar::Header,
    pub pax: Vec<(&'static str, Vec<u8>)>,
}

impl EntryHeader {
    /// A header for `path` (already with a trailing `/` for a directory).
    pub(crate) fn new(kind: tar::EntryType, path: &[u8], mode: u32, size: u64) -> EntryHeader {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        let mut pax = Vec::new();
        if size > MAX_SIZE {
            pax.push(("size", size.to_string().into_bytes()));
            header.set_size(0);
        } else {
            header.set_size(size);
        }
        if !set_ustar_name(&mut header, path) {
            pax.push(("path", path.to_vec()));
        }
        EntryHeader { header, pax }
    }

    pub(crate) fn ids(&mut self, uid: u64, gid: u64) {
        for (key, id, set) in [
            (
                "uid",
                uid,
                tar::Header::set_uid as fn(&mut tar::Header, u64),
            ),
            ("gid", gid, tar::Header::set_gid),
        ] {
            if id > MAX_ID {
                self.pax.push((key, id.to_string().into_bytes()));
                set(&mut self.header, 0);
            } else {
                set(&mut self.header, id);
            }
        }
    }

    pub(crate) fn link(&mut self, target: &[u8]) {
        if !set_ustar_link(&mut self.header, target) {
            self.pax.push(("linkpath", target.to_vec()));
        }
    }

    /// Appends the PAX records (if any), then the header and `data`.
    pub(crate) fn append<W: Write>(
        mut self,
        builder: &mut tar::Builder<W>,
        data: impl Read,
    ) -> Result<(), ExportError> {
        if !self.pax.is_empty() {
            builder
                .append_pax_extensions(self.pax.iter().map(|(k, v)| (*k, v.as_slice())))
                .map_err(ExportError::Write)?;
        }
        self.header.set_cksum();
        builder
            .append(&self.header, data)
            .map_err(ExportError::Write)
    }
}

struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
}

fn entry_header(e: &Entry<'_>, kind: tar::EntryType, size: u64) -> EntryHeader {
    let mut path = e.rel.as_os_str().as_bytes().to_vec();
    if e.kind == Kind::Dir {
        path.push(b'/');
    }
    let st: &FileStat = e.stat;
    let mut h = EntryHeader::new(kind, &path, st.st_mode & 0o7777, size);
    h.ids(u64::from(st.st_uid), u64::from(st.st_gid));
    // Whole seconds, as containerd writes layers; before 1970 is clamped to 0.
    h.header.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h
}

impl<W: Write> Visitor for TarWriter<W> {
    fn enter_dir(&mut self, e: &Entry<'_>) -> Result<(), ExportError> {
        if e.rel.as_os_str().is_empty() {
            return Ok(());
        }
        entry_header(e, tar::EntryType::Directory, 0).append(&mut self.builder, std::io::empty())
    }

    fn leave_dir(&mut self, _e: &Entry<'_>) -> Result<(), ExportError> {
        Ok(())
    }

    fn file(&mut self, e: &Entry<'_>, file: std::fs::File) -> Result<(), ExportError> {
        let size = u64::try_from(e.stat.st_size).unwrap_or(0);
        let h = entry_header(e, tar::EntryType::Regular, size);
        // The tar format needs the size up front: a file that shrinks while read would
        // corrupt the stream, so it is checked.
        let mut reader = ExactReader {
            inner: file.take(size),
            left: size,
            path: e.rel,
        };
        h.append(&mut self.builder, &mut reader)?;
        if reader.left != 0 {
            return Err(ExportError::Changed {
                path: e.rel.to_owned(),
                expected: size,
            });
        }
        Ok(())
    }

    fn symlink(&mut self, e: &Entry<'_>, target: &OsStr) -> Result<(), ExportError> {
        let mut h = entry_header(e, tar::EntryType::Symlink, 0);
        h.link(target.as_bytes());
        h.append(&mut self.builder, std::io::empty())
    }

    fn hardlink(&mut self, e: &Entry<'_>, first: &Path) -> Result<(), ExportError> {
        let mut h = entry_header(e, tar::EntryType::Link, 0);
        h.link(first.as_os_str().as_bytes());
        h.append(&mut self.builder, std::io::empty())
    }

    fn special(&mut self, e: &Entry<'_>) -> Result<(), ExportError> {
        let kind = match e.kind {
            Kind::Fifo => tar::EntryType::Fifo,
            Kind::Char => tar::EntryType::Char,
            Kind::Block => tar::EntryType::Block,
            _ => return Ok(()),
        };
        let mut h = entry_header(e, kind, 0);
        if kind != tar::EntryType::Fifo {
            let rdev = e.stat.st_rdev;
            let major = u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX);
            let minor = u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX);
            h.header
                .set_device_major(major)
                .map_err(ExportError::Write)?;
            h.header
                .set_device_minor(minor)
                .map_err(ExportError::Write)?;
        }
        h.append(&mut self.builder, std::io::empty())
    }
}

/// Reads at most the promised size and counts what is left, so a short file is noticed.
/// A short read pads nothing: the builder would fail on the short data.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left -= n as u64;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", self.path.display()),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_ustar_prefix_then_pax() {
        let short = b"a/b/c";
        let h = EntryHeader::new(tar::EntryType::Regular, short, 0o644, 1);
        assert!(h.pax.is_empty());
        assert_eq!(&*h.header.path_bytes(), short);

        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let h = EntryHeader::new(tar::EntryType::Regular, long.as_bytes(), 0o644, 1);
        assert!(h.pax.is_empty(), "fits prefix + name");
        assert_eq!(&*h.header.path_bytes(), long.as_bytes());

        let too_long = format!("{}/{}/", "d".repeat(200), "e".repeat(120));
        let h = EntryHeader::new(tar::EntryType::Directory, too_long.as_bytes(), 0o755, 0);
        assert_eq!(h.pax, vec![("path", too_long.clone().into_bytes())]);

        let mut h = EntryHeader::new(tar::EntryType::Symlink, b"l", 0o777, 0);
        h.link("t".repeat(101).as_bytes());
        h.ids(MAX_ID + 1, 5);
        assert_eq!(
            h.pax,
            vec![
                ("linkpath", "t".repeat(101).into_bytes()),
                ("uid", (MAX_ID + 1).to_string().into_bytes()),
            ]
        );
        assert_eq!(h.header.gid().unwrap(), 5);
    }

    #[test]
    fn written_archives_read_back() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = format!("{}/{}", "x".repeat(160), "y".repeat(120));
        let mut h = EntryHeader::new(tar::EntryType::Regular, long.as_bytes(), 0o600, 3);
        h.ids(70_000_000, 2);
        h.append(&mut builder, &b"abc"[..]).unwrap();
        let mut h = EntryHeader::new(tar::EntryType::Directory, b"dir/", 0o755, 0);
        h.ids(0, 0);
        h.append(&mut builder, std::io::empty()).unwrap();
        let bytes = builder.into_inner().unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path_bytes().into_owned();
            let uid = entry.header().uid().unwrap();
            let pax_uid = entry
                .pax_extensions()
                .unwrap()
                .and_then(|mut p| p.find(|e| e.as_ref().unwrap().key().unwrap() == "uid"))
                .map(|e| e.unwrap().value().unwrap().to_owned());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((path, uid, pax_uid, data));
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, long.as_bytes());
        assert_eq!(seen[0].2.as_deref(), Some("70000000"));
        assert_eq!(seen[0].3, b"abc");
        assert_eq!(seen[1].0, b"dir/");
    }
}
