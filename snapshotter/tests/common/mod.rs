//! Helpers shared by the snapshotter's integration tests: building layer tars and
//! describing trees for comparison (rootful/rootless bodies and mounts come from
//! `kiln-testsupport`).

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Builds layer tars in memory.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(self, path: &str, content: &[u8]) -> Self {
        self.file_owned(path, content, 0o644, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, content).unwrap();
        self
    }

    pub fn file_with_xattr(mut self, path: &str, content: &[u8], key: &str, value: &[u8]) -> Self {
        let k = format!("SCHILY.xattr.{key}");
        self.b.append_pax_extensions([(k.as_str(), value)]).unwrap();
        self.file(path, content)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn whiteout(self, path: &str) -> Self {
        let p = Path::new(path);
        let name = format!(".wh.{}", p.file_name().unwrap().to_str().unwrap());
        let wh = match p.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => format!("{}/{name}", d.display()),
            None => name,
        };
        self.file(&wh, b"")
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    /// Appends a raw header and data without the tar crate's path checks.
    pub fn raw(mut self, mut header: tar::Header, name: &[u8], data: &[u8]) -> Self {
        let ustar = header.as_ustar_mut().unwrap();
        ustar.name = [0; 100];
        ustar.name[..name.len()].copy_from_slice(name);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.b.append(&header, data).unwrap();
        self
    }

    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }

    pub fn gzip(self) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.finish()).unwrap();
        e.finish().unwrap()
    }

    pub fn zstd(self) -> Vec<u8> {
        zstd::encode_all(&self.finish()[..], 3).unwrap()
    }
}

/// What a tree comparison looks at for one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub content: Option<Vec<u8>>,
    pub target: Option<PathBuf>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Other paths in the tree sharing this inode.
    pub links: Vec<String>,
}

/// Describes every entry under `root` (not `root` itself), by relative path.
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    for paths in inodes.values().filter(|p| p.len() > 1) {
        for p in paths {
            out.get_mut(p).unwrap().links = paths.iter().filter(|q| *q != p).cloned().collect();
        }
    }
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, Node>,
    inodes: &mut BTreeMap<(u64, u64), Vec<String>>,
) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let mut xattrs = BTreeMap::new();
        if !ft.is_symlink() {
            for key in xattr::list(&path).unwrap_or_else(|_| xattr::XAttrs::default()) {
                let k = key.to_string_lossy().into_owned();
                if k.starts_with("security.") || k.contains(".overlay.") {
                    continue;
                }
                if let Ok(Some(v)) = xattr::get(&path, &key) {
                    xattrs.insert(k, v);
                }
            }
        }
        if !ft.is_dir() && meta.nlink() > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel.clone(),
            Node {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: if ft.is_file() { meta.len() } else { 0 },
                content: ft.is_file().then(|| std::fs::read(&path).unwrap()),
                target: ft.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
                xattrs,
                links: Vec::new(),
            },
        );
        if ft.is_dir() {
            walk(root, &path, out, inodes);
        }
    }
}

/// Asserts two trees are equal, naming the first differences.
pub fn assert_same_tree(expected: &BTreeMap<String, Node>, actual: &BTreeMap<String, Node>) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => diffs.push(format!("missing {k}")),
            Some(a) if a != v => diffs.push(format!("{k}: expected {v:?}, got {a:?}")),
            _ => {}
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            diffs.push(format!("unexpected {k}"));
        }
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}
