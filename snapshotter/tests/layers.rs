//! Layer import and export: a chain of three layers with whiteouts and opaque directories
//! shows the right merged view, exports back to equivalent layers, and real image layers
//! import with the digests their image records. Rootful and rootless.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use anyhow::Context as _;
use common::{Layer, assert_same_tree, tree};
use kiln_snapshotter::{Compression, ImmutableRef, ImportOptions, Snapshotter};
use kiln_testsupport::{Mounted, rootful, rootless};
use sha2::Digest as _;

fn layer1() -> Layer {
    Layer::new()
        .dir("bin", 0o755)
        .file_owned("bin/sh", b"shell", 0o755, 0, 0)
        .symlink("bin/link", "sh")
        .hardlink("bin/hard", "bin/sh")
        .file_owned("bin/su", b"su", 0o4755, 0, 0)
        .dir("data", 0o755)
        .file("data/x", b"x")
        .dir("data/sub", 0o750)
        .file("data/sub/y", b"y")
        .dir("etc", 0o755)
        .file("etc/passwd", b"root")
        .dir("etc/conf", 0o755)
        .file("etc/conf/a", b"a1")
        .file("etc/conf/b", b"b1")
        .file_with_xattr("etc/xa", b"with xattr", "user.test", b"v")
        .file_owned("etc/owned", b"mine", 0o600, 1000, 1000)
        .dir("opt", 0o755)
        .file("opt/keep", b"k")
}

fn layer2() -> Layer {
    Layer::new()
        .whiteout("etc/conf/a")
        .file("etc/conf/c", b"c2")
        .dir("data", 0o755)
        .opaque("data")
        .file("data/new", b"n")
        .file("opt/keep", b"k2")
}

fn layer3() -> Layer {
    Layer::new()
        .whiteout("opt")
        .whiteout("bin/link")
        .whiteout("never-existed")
        .dir("data/sub", 0o700)
        .file("data/sub/z", b"z")
}

fn expected_paths() -> Vec<&'static str> {
    vec![
        "bin",
        "bin/hard",
        "bin/sh",
        "bin/su",
        "data",
        "data/new",
        "data/sub",
        "data/sub/z",
        "etc",
        "etc/conf",
        "etc/conf/b",
        "etc/conf/c",
        "etc/owned",
        "etc/passwd",
        "etc/xa",
    ]
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn import_chain(store: &Snapshotter) -> anyhow::Result<ImmutableRef> {
    let l1_tar = layer1().finish();
    let l1 = store.import_layer(None, &layer1().gzip()[..], &ImportOptions::default())?;
    assert_eq!(l1.layer_info()?.unwrap().diff_id, sha256(&l1_tar));
    let l2 = store.import_layer(Some(&l1), &layer2().zstd()[..], &ImportOptions::default())?;
    let l3 = store.import_layer(Some(&l2), &layer3().finish()[..], &ImportOptions::default())?;
    Ok(l3)
}

fn check_merged(view: &BTreeMap<String, common::Node>) {
    let paths: Vec<&str> = view.keys().map(String::as_str).collect();
    assert_eq!(paths, expected_paths());
    assert_eq!(view["bin/sh"].content.as_deref(), Some(&b"shell"[..]));
    assert_eq!(view["bin/sh"].links, vec!["bin/hard".to_owned()]);
    assert_eq!(view["bin/su"].mode, 0o4755);
    assert_eq!(view["data/sub"].mode, 0o700);
    assert_eq!(view["etc/conf/c"].content.as_deref(), Some(&b"c2"[..]));
    assert_eq!(
        view["etc/xa"].xattrs.get("user.test").map(Vec::as_slice),
        Some(&b"v"[..])
    );
    assert_eq!(
        (
            view["etc/owned"].uid,
            view["etc/owned"].gid,
            view["etc/owned"].mode
        ),
        (1000, 1000, 0o600)
    );
}

fn chain_merges_exports_and_reimports() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Snapshotter::open(&dir.path().join("root"))?;
    let top = import_chain(&store)?;
    let view = Mounted::view(&top)?;
    let merged = tree(&view.path);
    check_merged(&merged);
    let mtime = std::fs::metadata(view.path.join("etc/passwd"))?.mtime();
    assert_eq!(mtime, 1_600_000_000, "mtimes come from the layer");

    // Export every layer of the chain and import the exports into a fresh store.
    let mut chain: Vec<ImmutableRef> = top.parents().cloned().collect();
    chain.reverse();
    chain.push(top.clone());
    let other = Snapshotter::open(&dir.path().join("other"))?;
    let mut parent: Option<ImmutableRef> = None;
    for (i, layer) in chain.iter().enumerate() {
        let compression = [Compression::Gzip, Compression::Zstd, Compression::None][i];
        let mut blob = Vec::new();
        let desc = store.export_layer(layer, &mut blob, compression)?;
        assert_eq!(desc.digest, sha256(&blob));
        assert_eq!(desc.size, blob.len() as u64);
        let imported = other
            .import_layer(parent.as_ref(), &blob[..], &ImportOptions::default())
            .with_context(|| format!("re-importing layer {i}"))?;
        assert_eq!(imported.layer_info()?.unwrap().diff_id, desc.diff_id);
        parent = Some(imported);
    }
    let reimported = Mounted::view(parent.as_ref().unwrap())?;
    assert_same_tree(&merged, &tree(&reimported.path));

    // An identical chain is shared rather than imported again.
    let again = store.import_layer(
        None,
        &b"not read"[..],
        &ImportOptions {
            diff_id: Some(sha256(&layer1().finish())),
            ..Default::default()
        },
    )?;
    assert_eq!(again.id(), chain[0].id());
    assert!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    Ok(())
}

#[test]
fn three_layer_chain_rootful() {
    rootful(chain_merges_exports_and_reimports);
}

#[test]
fn three_layer_chain_rootless() {
    rootless(chain_merges_exports_and_reimports);
}

/// The image's config lists the layers' diff ids; importing the real blobs must reproduce
/// them, and the result must hold a working busybox tree.
fn image_layers_import() -> anyhow::Result<()> {
    let oci = kiln_testsupport::shared_dir().join("conformance/image/oci");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("index.json"))?)?;
    let dir = tempfile::tempdir()?;
    let store = Snapshotter::open(&dir.path().join("root"))?;
    let blob = |digest: &str| {
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    for m in index["manifests"].as_array().unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(blob(m["digest"].as_str().unwrap()))?)?;
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(
            manifest["config"]["digest"].as_str().unwrap(),
        ))?)?;
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        let mut parent: Option<ImmutableRef> = None;
        for (layer, diff_id) in manifest["layers"].as_array().unwrap().iter().zip(diff_ids) {
            let file = std::fs::File::open(blob(layer["digest"].as_str().unwrap()))?;
            let r = store.import_layer(
                parent.as_ref(),
                std::io::BufReader::new(file),
                &ImportOptions {
                    media_type: layer["mediaType"].as_str().map(str::to_owned),
                    diff_id: diff_id.as_str().map(str::to_owned),
                    description: "image layer".into(),
                    ..ImportOptions::default()
                },
            )?;
            let info = r.layer_info()?.unwrap();
            assert_eq!(Some(info.diff_id.as_str()), diff_id.as_str());
            assert_eq!(info.blob_digest.as_deref(), layer["digest"].as_str());
            parent = Some(r);
        }
        let top = parent.unwrap();
        let view = Mounted::view(&top)?;
        let sh = std::fs::symlink_metadata(view.path.join("bin/sh"))?;
        assert!(sh.len() > 0 || sh.file_type().is_symlink());
        assert!(view.path.join("etc").is_dir());
    }
    Ok(())
}

#[test]
fn image_layers_rootful() {
    rootful(image_layers_import);
}

#[test]
fn image_layers_rootless() {
    rootless(image_layers_import);
}
