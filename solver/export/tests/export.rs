//! Exports end to end, rootful and rootless: a chain of busybox (from the shared OCI layout)
//! plus two layers made here (modes, owners, mtimes, symlinks in and out of the tree,
//! hardlinks, a fifo, whiteouts) is exported as a local directory, a tar stream and an OCI
//! archive; each is compared with the mounted merged tree, the OCI archive is checked with
//! skopeo and its layers re-imported into a fresh store.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use kiln_export::{self as export, OciExportOptions};
use kiln_proto::pb;
use kiln_registry::{Credentials, ImageResolver, ImageSource, RegistryHosts, pull};
use kiln_snapshotter::{ImmutableRef, ImportOptions, Snapshotter};
use kiln_testsupport::{
    Mounted, require, rootful, rootless, rt, serial, test_image_layout as shared_layout, which,
};
use sha2::Digest as _;

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Builds a layer tar.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    fn dir(mut self, path: &str, mode: u32, mtime: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, mtime);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64, mtime: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, mtime);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0, 1_500_000_000);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o640, 0, 1_500_000_000);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn layer_a() -> Vec<u8> {
    Layer::new()
        .dir("app", 0o750, 1_600_000_000)
        .file(
            "app/run.sh",
            b"#!/bin/sh\necho hi\n",
            0o755,
            0,
            1_600_000_001,
        )
        .file("app/secret", b"s3cret", 0o600, 1000, 1_600_000_002)
        .file("app/suid", b"suid", 0o4755, 0, 1_600_000_003)
        .link(tar::EntryType::Link, "app/run-hard", "app/run.sh")
        .link(tar::EntryType::Symlink, "app/rel", "run.sh")
        .link(tar::EntryType::Symlink, "app/to-etc", "/etc")
        .link(tar::EntryType::Symlink, "app/up", "../../../../..")
        .link(tar::EntryType::Symlink, "app/dangling", "/nowhere/at/all")
        .fifo("app/pipe")
        .dir("ro", 0o555, 1_600_000_004)
        .file(
            "ro/inside",
            b"read-only dir content",
            0o444,
            0,
            1_600_000_005,
        )
        .dir("gone", 0o755, 1_600_000_006)
        .file("gone/file", b"x", 0o644, 0, 1_600_000_007)
        .file(
            &format!("deep/{}/leaf", "d".repeat(120)),
            b"leaf",
            0o644,
            0,
            1_600_000_008,
        )
        .finish()
}

fn layer_b() -> Vec<u8> {
    Layer::new()
        .file(".wh.gone", b"", 0o644, 0, 0)
        .file("app/.wh.secret", b"", 0o644, 0, 0)
        .file("app/new", b"new in b", 0o640, 1000, 1_600_000_010)
        .link(tar::EntryType::Link, "app/new-hard", "app/new")
        .file("bin/.wh.ls", b"", 0o644, 0, 0)
        .finish()
}

/// busybox from the shared layout plus the two layers above.
fn build_chain(store: &Snapshotter, root: &Path) -> anyhow::Result<ImmutableRef> {
    let layouts: HashMap<String, PathBuf> = [("shared".to_owned(), shared_layout())].into();
    let resolver = ImageResolver::new(
        root,
        RegistryHosts::default(),
        Credentials::default(),
        layouts,
    )?;
    let attrs = [("oci.store".to_owned(), "shared".to_owned())].into();
    let busybox = ImageSource::parse("oci-layout://shared:busybox", &attrs)?;
    let base = rt().block_on(async {
        let image = resolver
            .resolve(&busybox, &kiln_proto::platform::host_platform())
            .await?;
        anyhow::Ok(
            pull(store, &image, None, &|_| {})
                .await?
                .top
                .context("busybox layers")?,
        )
    })?;
    let a = store.import_layer(Some(&base), &layer_a()[..], &ImportOptions::default())?;
    Ok(store.import_layer(Some(&a), &layer_b()[..], &ImportOptions::default())?)
}

/// What is compared for one path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    content: Option<String>,
    target: Option<PathBuf>,
    mtime: (i64, i64),
    /// The first path (in walk order) sharing this inode, for later names of it.
    hardlink_of: Option<String>,
}

/// Describes a trusted tree in walk order (bytewise names, depth first).
fn describe(root: &Path) -> Vec<(String, Node)> {
    describe_subtree(root, Path::new(""), &mut HashMap::new())
}

fn describe_subtree(
    root: &Path,
    rel: &Path,
    first_seen: &mut HashMap<(u64, u64), String>,
) -> Vec<(String, Node)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort_by(|a, b| {
        use std::os::unix::ffi::OsStrExt as _;
        a.as_bytes().cmp(b.as_bytes())
    });
    for name in names {
        let path = rel.join(&name);
        let meta = std::fs::symlink_metadata(root.join(&path)).unwrap();
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        let key = path.to_str().unwrap().to_owned();
        let hardlink_of = if !ft.is_dir() && meta.nlink() > 1 {
            let id = (meta.dev(), meta.ino());
            match first_seen.get(&id) {
                Some(first) => Some(first.clone()),
                None => {
                    first_seen.insert(id, key.clone());
                    None
                }
            }
        } else {
            None
        };
        out.push((
            key.clone(),
            Node {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: if ft.is_file() { meta.size() } else { 0 },
                content: ft
                    .is_file()
                    .then(|| sha256(&std::fs::read(root.join(&path)).unwrap())),
                target: ft
                    .is_symlink()
                    .then(|| std::fs::read_link(root.join(&path)).unwrap()),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                hardlink_of,
            },
        ));
        if ft.is_dir() {
            out.extend(describe_subtree(root, &path, first_seen));
        }
    }
    out
}

/// The merged tree as tar entries would show it: hardlinks as links, whole-second mtimes.
fn as_tar_listing(tree: &[(String, Node)]) -> Vec<(String, Node)> {
    tree.iter()
        .map(|(path, n)| {
            let mut n = n.clone();
            n.mtime = (n.mtime.0, 0);
            let mut path = path.clone();
            if n.kind == "dir" {
                path.push('/');
            }
            if let Some(first) = n.hardlink_of.take() {
                n = Node {
                    kind: "hardlink",
                    size: 0,
                    content: None,
                    target: Some(PathBuf::from(first)),
                    ..n
                };
            }
            (path, n)
        })
        .collect()
}

fn read_tar(bytes: &[u8]) -> Vec<(String, Node)> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let h = entry.header().clone();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular => "file",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Fifo => "fifo",
            _ => "other",
        };
        let target = entry
            .link_name_bytes()
            .map(|t| PathBuf::from(String::from_utf8(t.into_owned()).unwrap()));
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((
            path,
            Node {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: u32::try_from(h.uid().unwrap()).unwrap(),
                gid: u32::try_from(h.gid().unwrap()).unwrap(),
                size: if kind == "file" { data.len() as u64 } else { 0 },
                content: (kind == "file").then(|| sha256(&data)),
                target,
                mtime: (i64::try_from(h.mtime().unwrap()).unwrap(), 0),
                hardlink_of: None,
            },
        ));
    }
    out
}

fn check_local(top: &ImmutableRef, merged: &[(String, Node)]) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dest = work.path().join("dest");
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    // What was in DEST before: a symlink where the image has a directory, a file where
    // it has a directory, a directory where it has a file, and an unrelated file.
    std::fs::create_dir_all(dest.join("app/new/sub"))?;
    std::fs::write(dest.join("app/new/sub/x"), b"old")?;
    std::os::unix::fs::symlink(&outside, dest.join("etc"))?;
    std::fs::write(dest.join("ro"), b"old file")?;
    std::fs::write(dest.join("unrelated"), b"stays")?;
    export::local(top, &dest)?;
    ensure!(
        std::fs::read_dir(&outside)?.next().is_none(),
        "the export wrote through the symlink in DEST"
    );
    ensure!(
        std::fs::read(dest.join("unrelated"))? == b"stays",
        "unrelated file lost"
    );
    std::fs::remove_file(dest.join("unrelated"))?;
    let exported = describe(&dest);
    let me = nix::unistd::geteuid().as_raw();
    let mut want = merged.to_vec();
    for (path, node) in &mut want {
        // Not chowned: everything belongs to the exporter.
        node.uid = me;
        node.gid = nix::unistd::getegid().as_raw();
        if node.kind == "symlink" {
            // Symlink modes are not settable; their times are.
            node.mode = exported
                .iter()
                .find(|(p, _)| p == path)
                .map_or(node.mode, |(_, n)| n.mode);
        }
    }
    ensure!(
        exported.len() == want.len(),
        "{} entries exported, {} in the tree",
        exported.len(),
        want.len()
    );
    for ((path, got), (want_path, want)) in exported.iter().zip(&want) {
        ensure!(
            path == want_path,
            "entry {path} where {want_path} was expected"
        );
        ensure!(got == want, "{path}: exported {got:?}, tree has {want:?}");
    }
    let to_etc = std::fs::read_link(dest.join("app/to-etc"))?;
    ensure!(
        to_etc == Path::new("/etc"),
        "app/to-etc -> {}",
        to_etc.display()
    );
    ensure!(
        dest.join("etc").symlink_metadata()?.is_dir(),
        "DEST/etc is not a directory"
    );
    Ok(())
}

fn export_body() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let store = Snapshotter::open(&root.path().join("snap"))?;
    let top = build_chain(&store, root.path())?;
    let view = Mounted::view(&top)?;
    let merged = describe(&view.path);
    // The chain is what the layers say: whiteouts applied, the fifo and links present.
    let get = |p: &str| merged.iter().find(|(k, _)| k == p).map(|(_, n)| n.clone());
    ensure!(get("gone").is_none() && get("app/secret").is_none() && get("bin/ls").is_none());
    ensure!(get("app/pipe").map(|n| n.kind) == Some("fifo"), "no fifo");
    // "run-hard" sorts before "run.sh" ('-' < '.'), so it is the first name.
    ensure!(
        get("app/run.sh").and_then(|n| n.hardlink_of).as_deref() == Some("app/run-hard"),
        "hardlink lost in the chain"
    );
    ensure!(
        get("app/suid").map(|n| n.mode) == Some(0o4755),
        "suid bit lost in the chain"
    );
    ensure!(
        get("app/new").map(|n| n.uid) == Some(1000),
        "owner lost in the chain"
    );
    drop(view);

    check_local(&top, &merged)?;

    // tar: the same entries, with numeric owners, in walk order.
    let mut tar_bytes = Vec::new();
    export::tar(&top, &mut tar_bytes)?;
    let listed = read_tar(&tar_bytes);
    let want = as_tar_listing(&merged);
    ensure!(
        listed.len() == want.len(),
        "{} tar entries for {} paths",
        listed.len(),
        want.len()
    );
    for ((path, got), (want_path, want)) in listed.iter().zip(&want) {
        ensure!(
            path == want_path,
            "tar entry {path} where {want_path} was expected"
        );
        ensure!(got == want, "{path}: tar has {got:?}, tree has {want:?}");
    }

    // oci: skopeo accepts it; its layers re-import to the same chain and tree.
    let archive = root.path().join("image.tar");
    let platform = kiln_proto::platform::host_platform();
    let exported = export::oci(
        &store,
        &top,
        std::fs::File::create(&archive)?,
        &OciExportOptions {
            name: "localhost/kiln-test:latest",
            platform: &platform,
            base_config: None,
            image_config: None,
        },
    )?;
    ensure!(
        exported.layers.len() == 3,
        "{} layers",
        exported.layers.len()
    );
    check_with_skopeo(&archive, root.path(), &platform)?;
    let reimported = reimport(&archive, &root.path().join("snap2"))?;
    let view = Mounted::view(&reimported)?;
    let again = describe(&view.path);
    ensure!(
        again.len() == merged.len(),
        "{} entries after re-import",
        again.len()
    );
    for ((path, got), (want_path, want)) in again.iter().zip(&merged) {
        ensure!(
            path == want_path,
            "re-imported {path} where {want_path} was expected"
        );
        ensure!(
            Node {
                mtime: (got.mtime.0, 0),
                ..got.clone()
            } == Node {
                mtime: (want.mtime.0, 0),
                ..want.clone()
            },
            "{path}: re-imported {got:?}, tree has {want:?}"
        );
    }
    Ok(())
}

fn check_with_skopeo(archive: &Path, work: &Path, platform: &pb::Platform) -> anyhow::Result<()> {
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "inspect"])
        .arg(format!("oci-archive:{}", archive.display()))
        .env("TMPDIR", work)
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        info["Architecture"] == platform.architecture.as_str(),
        "{info}"
    );
    ensure!(info["Os"] == platform.os.as_str(), "{info}");
    ensure!(info["Layers"].as_array().map(Vec::len) == Some(3), "{info}");
    let copy = work.join("copied");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("dir:{}", copy.display()))
        .env("TMPDIR", work)
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        copy.join("manifest.json").is_file(),
        "skopeo copied no manifest"
    );
    Ok(())
}

/// Imports the archive's layers into a fresh store with the config's diff IDs, checking
/// the chain IDs against the config.
fn reimport(archive: &Path, store_root: &Path) -> anyhow::Result<ImmutableRef> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_str().context("path")?.to_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(path, data);
    }
    let blob = |digest: &str| {
        files
            .get(&format!(
                "blobs/sha256/{}",
                digest.trim_start_matches("sha256:")
            ))
            .with_context(|| format!("blob {digest} missing"))
    };
    ensure!(files.contains_key("oci-layout"), "no oci-layout");
    let index: serde_json::Value =
        serde_json::from_slice(files.get("index.json").context("index")?)?;
    let entry = &index["manifests"][0];
    ensure!(
        entry["annotations"]["org.opencontainers.image.ref.name"] == "latest"
            && entry["annotations"]["io.containerd.image.name"] == "localhost/kiln-test:latest",
        "{entry}"
    );
    let manifest_bytes = blob(entry["digest"].as_str().context("digest")?)?;
    ensure!(sha256(manifest_bytes) == entry["digest"], "manifest digest");
    let manifest: serde_json::Value = serde_json::from_slice(manifest_bytes)?;
    let config_bytes = blob(manifest["config"]["digest"].as_str().context("config")?)?;
    let config: serde_json::Value = serde_json::from_slice(config_bytes)?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("diff_ids")?
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    ensure!(
        config["history"].as_array().map(Vec::len) == Some(diff_ids.len()),
        "{config}"
    );
    let store = Snapshotter::open(store_root)?;
    let mut parent: Option<ImmutableRef> = None;
    let mut chain: Option<String> = None;
    for (layer, diff) in manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .zip(&diff_ids)
    {
        let digest = layer["digest"].as_str().context("layer digest")?;
        let bytes = blob(digest)?;
        ensure!(sha256(bytes) == digest, "layer blob digest");
        let imported = store.import_layer(
            parent.as_ref(),
            &bytes[..],
            &ImportOptions {
                media_type: layer["mediaType"].as_str().map(str::to_owned),
                diff_id: Some(diff.clone()),
                description: "re-import".into(),
                ..ImportOptions::default()
            },
        )?;
        let want_chain = match &chain {
            None => diff.clone(),
            Some(prev) => sha256(format!("{prev} {diff}").as_bytes()),
        };
        let info = imported.layer_info()?.context("layer info")?;
        ensure!(
            info.chain_id == want_chain,
            "chain {} != {want_chain}",
            info.chain_id
        );
        chain = Some(want_chain);
        parent = Some(imported);
    }
    parent.context("no layers")
}

#[test]
fn exports_rootful() {
    let _serial = serial();
    if !require(which("skopeo"), "skopeo") {
        return;
    }
    rootful(export_body);
}

#[test]
fn exports_rootless() {
    let _serial = serial();
    if !require(which("skopeo"), "skopeo") {
        return;
    }
    rootless(export_body);
}
