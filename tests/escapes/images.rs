//! Hostile images: a layer whose entries try to leave the snapshot they are imported into
//! (`..` and absolute names, a whiteout of `..`, symlinks and hard links out of the tree
//! followed by writes through them), pulled from an OCI layout as `kiln build` users do.
//! The import fails or stays inside; the host and kiln's other snapshots are untouched.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::ensure;
use kiln_proto::Digest;
use kiln_proto::builder::DefinitionBuilder;
use kiln_proto::encode::GogoEncode as _;

use crate::harness::{CANARY_SECRET, graph, sh, with_host};

fn entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    // Raw name bytes: the tar crate's setters refuse `..`, a hostile writer does not.
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    let link = link.as_bytes();
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(1);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The hostile layer (plain tar): `canary` is the host directory's absolute path.
fn hostile_layer(canary: &str) -> Vec<u8> {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let mut t = Vec::new();
    // First, so an importer that stops at the first bad entry still meets it: a whiteout
    // of `..` at the layer root once emptied the snapshot's own directory.
    entry(&mut t, ".wh...", Regular, "", b"");
    entry(&mut t, "etc/", Directory, "", b"");
    entry(&mut t, "etc/ok", Regular, "", b"ok\n");
    entry(&mut t, "../escaped", Regular, "", b"pwned");
    entry(&mut t, "/../../../escaped-abs", Regular, "", b"pwned");
    entry(&mut t, "up", Symlink, "../../../../../../..", b"");
    entry(&mut t, "up/tmp/pwned-through-up", Regular, "", b"pwned");
    entry(&mut t, "hostdir", Symlink, canary, b"");
    entry(&mut t, "hostdir/pwned", Regular, "", b"pwned");
    entry(&mut t, "hostdir/b/c", Regular, "", b"pwned");
    entry(&mut t, "secret", Link, &format!("{canary}/secret"), b"");
    entry(&mut t, "secret2", Link, "../../../../../../../..", b"");
    entry(&mut t, "etc/.wh...", Regular, "", b"");
    t.extend_from_slice(&[0u8; 1024]);
    t
}

fn blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<Digest> {
    let digest = Digest::of(bytes);
    std::fs::write(layout.join("blobs/sha256").join(digest.hex()), bytes)?;
    Ok(digest)
}

/// An OCI layout with the image `evil:latest` made of `layer`; returns its manifest digest.
fn layout_with(layout: &Path, layer: &[u8]) -> anyhow::Result<Digest> {
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let layer_digest = blob(layout, layer)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.as_str()]},
        "config": {}
    })
    .to_string();
    let config_digest = blob(layout, config.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.as_str(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest.as_str(), "size": layer.len()}]
    })
    .to_string();
    let manifest_digest = blob(layout, manifest.as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest.as_str(), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}]
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    Ok(manifest_digest)
}

/// A hostile image layer leaves the host, kiln's state and the earlier results alone.
pub fn hostile_image_layer() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        // An earlier result in the store, which the import must not disturb.
        let keep = graph(|b, base| {
            b.exec(&sh(Some(base), "echo kept > /kept"))
                .root()
                .expect("root")
        });
        kiln.build_exported(&keep, &[])?.ok()?;
        let layout = kiln.work().join("layout");
        let digest = layout_with(&layout, &hostile_layer(&host.dir().display().to_string()))?;
        let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
        let image = b.source(
            &format!("oci-layout://evil@{digest}"),
            BTreeMap::from([("oci.store".to_owned(), "evil".to_owned())]),
        );
        let def = b.finish(&image).gogo_encode();
        let store = format!("evil={}", layout.display());
        let out = kiln.build_exported(&def, &["--oci-layout", &store])?;
        if out.success() {
            let export = out.export.clone().unwrap_or_default();
            let secret = std::fs::read_to_string(export.join("secret")).unwrap_or_default();
            ensure!(
                !secret.contains(CANARY_SECRET),
                "a hard link reached the host's file"
            );
        }
        for name in ["escaped", "escaped-abs", "tmp/pwned-through-up"] {
            ensure!(
                !Path::new("/").join(name).exists(),
                "/{name} was created on the host"
            );
            ensure!(
                !kiln.state().join(name).exists()
                    && !kiln.state().join("snapshots").join(name).exists(),
                "{name} was created in kiln's state"
            );
        }
        // The earlier result is still in the store: a warm build of it runs nothing.
        let again = kiln.build_exported(&keep, &[])?.ok()?;
        ensure!(
            again.exported("kept").as_deref() == Some("kept\n"),
            "{}",
            again.stderr
        );
        ensure!(
            kiln.state().join("snapshots").is_dir(),
            "the snapshot store was removed"
        );
        let problems = crate::harness::store_problems(kiln)?;
        ensure!(
            problems.is_empty(),
            "the snapshot store after the import: {problems:?}"
        );
        Ok(())
    })
}
