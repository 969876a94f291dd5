//! `--output type=oci,dest=FILE,name=REF`: an OCI image layout as a tar archive
//! (`oci-layout`, `index.json`, `blobs/sha256/…`). Each snapshot of the ref's chain becomes
//! one gzip layer (base first, written by the snapshotter's layer export), described by a
//! config (`architecture`, `os`, `rootfs.diff_ids`, `history`, and the base image's
//! `config` when one is given) and a manifest; `index.json` lists that manifest under
//! `org.opencontainers.image.ref.name` and `io.containerd.image.name`.

use std::io::{Seek, Write};
use std::time::SystemTime;

use kiln_proto::{Digest, pb};
use kiln_snapshotter::{Compression, ImmutableRef, LayerDescriptor, Snapshotter};
use serde_json::{Value, json};

use crate::error::ExportError;
use crate::tarball::EntryHeader;

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What to write besides the layers.
#[derive(Clone, Debug)]
pub struct OciExportOptions<'a> {
    /// The image name (`name=` of the output), written as both annotations.
    pub name: &'a str,
    /// The platform the image is for (normalised).
    pub platform: &'a pb::Platform,
    /// The base image's config, whose `config` (env, entrypoint, …) and, when its layers
    /// are this image's first ones, `history` are carried over.
    pub base_config: Option<&'a [u8]>,
    /// The image config a frontend computed for the result (a Dockerfile's): written as
    /// it is, with `rootfs` from the layers and `history` fitted to them as BuildKit's
    /// image exporter fits it. Takes precedence over `base_config`.
    pub image_config: Option<&'a [u8]>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct OciExported {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    /// One per layer, base first.
    pub layers: Vec<LayerDescriptor>,
}

fn json_bytes(v: &Value) -> Vec<u8> {
    // serde_json writes maps with sorted keys: the same input gives the same bytes.
    serde_json::to_vec(v).unwrap_or_default()
}

fn config(
    options: &OciExportOptions<'_>,
    layers: &[LayerDescriptor],
) -> Result<Value, ExportError> {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    if let Some(bytes) = options.image_config {
        return frontend_config(bytes, &diff_ids, SystemTime::now());
    }
    let base: Option<Value> = options
        .base_config
        .map(|bytes| parse_object(bytes).map(Value::Object))
        .transpose()?;
    let inner = base
        .as_ref()
        .and_then(|b| b.get("config"))
        .filter(|c| c.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    // The base history belongs to its layers: keep it only when those layers are exactly
    // the first layers here (their re-exported diff IDs can differ from the base image's).
    let base_history = base.as_ref().and_then(|b| {
        let ids: Vec<&str> = b
            .pointer("/rootfs/diff_ids")?
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let history = b.get("history")?.as_array()?.clone();
        let non_empty = history
            .iter()
            .filter(|h| h.get("empty_layer").and_then(Value::as_bool) != Some(true))
            .count();
        (diff_ids.starts_with(&ids) && non_empty == ids.len()).then_some((history, ids.len()))
    });
    let (mut history, covered) = base_history.unwrap_or_default();
    for _ in covered..layers.len() {
        history.push(json!({"created_by": "kiln build", "comment": "kiln"}));
    }
    let mut cfg = json!({
        "architecture": options.platform.architecture,
        "os": options.platform.os,
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    if !options.platform.variant.is_empty() {
        cfg["variant"] = json!(options.platform.variant);
    }
    Ok(cfg)
}

fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ExportError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ExportError::BaseConfig("not an object".to_owned())),
        Err(e) => Err(ExportError::BaseConfig(e.to_string())),
    }
}

/// A frontend's image config patched for its layers (BuildKit's `patchImageConfig` and
/// `normalizeLayersAndHistory`): `rootfs` lists the layers; history entries that claim
/// layers beyond them become empty ones, layers without an entry get one; every layer's
/// entry has a creation time (`now` where it has none); `created` is the last one's.
fn frontend_config(bytes: &[u8], diff_ids: &[&str], now: SystemTime) -> Result<Value, ExportError> {
    let mut cfg = parse_object(bytes)?;
    cfg.insert(
        "rootfs".to_owned(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history: Vec<Value> = cfg
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_empty = |h: &Value| h.get("empty_layer").and_then(Value::as_bool) == Some(true);
    let mut claimed = 0;
    for h in &mut history {
        if is_empty(h) {
            continue;
        }
        if claimed >= diff_ids.len() {
            h["empty_layer"] = json!(true);
        } else {
            claimed += 1;
        }
    }
    let time = kiln_proto::gojson::go_time(now);
    for _ in claimed..diff_ids.len() {
        history.push(json!({
            "created_by": "kiln build",
            "comment": "buildkit.exporter.image.v0",
        }));
    }
    for h in &mut history {
        if !is_empty(h) && h.get("created").is_none_or(Value::is_null) {
            h["created"] = json!(time);
        }
    }
    if cfg.get("created").is_none() {
        let last = history
            .iter()
            .filter_map(|h| h.get("created"))
            .rfind(|c| !c.is_null())
            .cloned()
            .unwrap_or(Value::Null);
        cfg.insert("created".to_owned(), last);
    }
    cfg.insert("history".to_owned(), Value::Array(history));
    Ok(Value::Object(cfg))
}

fn append_bytes<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> Result<(), ExportError> {
    let mut h = EntryHeader::new(
        tar::EntryType::Regular,
        path.as_bytes(),
        0o644,
        data.len() as u64,
    );
    h.ids(0, 0);
    h.append(builder, data)
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, path: &str) -> Result<(), ExportError> {
    let mut h = EntryHeader::new(tar::EntryType::Directory, path.as_bytes(), 0o755, 0);
    h.ids(0, 0);
    h.append(builder, std::io::empty())
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.as_str(), "size": size})
}

/// Writes `r` (with its parents) to `out` as an OCI image layout tar archive.
pub fn oci(
    snapshotter: &Snapshotter,
    r: &ImmutableRef,
    out: impl Write,
    options: &OciExportOptions<'_>,
) -> Result<OciExported, ExportError> {
    let mut chain: Vec<&ImmutableRef> = std::iter::once(r).chain(r.parents()).collect();
    chain.reverse();
    let mut blobs = Vec::with_capacity(chain.len());
    for layer in chain {
        // Spooled to an unnamed temporary file: the archive needs each blob's size before
        // its bytes.
        let mut file = tempfile::tempfile().map_err(|source| ExportError::Io {
            op: "creating a temporary file for",
            path: layer.id().into(),
            source,
        })?;
        let descriptor = snapshotter
            .export_layer(layer, &mut file, Compression::Gzip)
            .map_err(|source| ExportError::Layer {
                id: layer.id().to_owned(),
                source: Box::new(source),
            })?;
        file.rewind().map_err(|source| ExportError::Io {
            op: "rewinding the layer of",
            path: layer.id().into(),
            source,
        })?;
        blobs.push((descriptor, file));
    }
    let layers: Vec<LayerDescriptor> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let config = json_bytes(&config(options, &layers)?);
    let config_digest = Digest::of(&config);
    let layer_descriptors: Vec<Value> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size}))
        .collect();
    let manifest = json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config_digest, config.len() as u64),
        "layers": layer_descriptors,
    }));
    let manifest_digest = Digest::of(&manifest);
    let mut entry = descriptor(MEDIA_MANIFEST, &manifest_digest, manifest.len() as u64);
    entry["annotations"] = json!({
        "io.containerd.image.name": options.name,
        "org.opencontainers.image.ref.name": options.name,
    });
    let index = json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [entry],
    }));

    let mut builder = tar::Builder::new(out);
    append_dir(&mut builder, "blobs/")?;
    append_dir(&mut builder, "blobs/sha256/")?;
    let mut written = std::collections::BTreeSet::new();
    for (d, file) in &mut blobs {
        // Two snapshots with identical diffs give one blob.
        if !written.insert(d.digest.clone()) {
            continue;
        }
        let hex = d.digest.trim_start_matches("sha256:");
        let mut h = EntryHeader::new(
            tar::EntryType::Regular,
            format!("blobs/sha256/{hex}").as_bytes(),
            0o644,
            d.size,
        );
        h.ids(0, 0);
        h.append(&mut builder, file)?;
    }
    for (digest, bytes) in [(&config_digest, &config), (&manifest_digest, &manifest)] {
        append_bytes(
            &mut builder,
            &format!("blobs/sha256/{}", digest.hex()),
            bytes,
        )?;
    }
    append_bytes(
        &mut builder,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_bytes(&mut builder, "index.json", &index)?;
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(ExportError::Write)?;
    Ok(OciExported {
        manifest_digest,
        manifest_size: manifest.len() as u64,
        config_digest,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(diff: &str) -> LayerDescriptor {
        LayerDescriptor {
            media_type: Compression::Gzip.media_type(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            diff_id: diff.to_owned(),
            uncompressed_size: 1,
        }
    }

    #[test]
    fn config_carries_over_the_base_config_and_matching_history() {
        let platform = pb::Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: "v7".into(),
            ..Default::default()
        };
        let base = serde_json::to_vec(&json!({
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]},
            "history": [{"created_by": "base"}, {"created_by": "env", "empty_layer": true}],
        }))
        .unwrap();
        let options = OciExportOptions {
            name: "x",
            platform: &platform,
            base_config: Some(&base),
            image_config: None,
        };
        let cfg = config(&options, &[layer("sha256:a"), layer("sha256:b")]).unwrap();
        assert_eq!(cfg["config"]["Env"][0], "PATH=/bin");
        assert_eq!(cfg["variant"], "v7");
        assert_eq!(cfg["rootfs"]["diff_ids"], json!(["sha256:a", "sha256:b"]));
        let history = cfg["history"].as_array().unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[0]["created_by"], "base");
        assert_eq!(history[2]["created_by"], "kiln build");

        // Different first layer: the base history does not describe these layers.
        let cfg = config(&options, &[layer("sha256:c")]).unwrap();
        assert_eq!(cfg["history"].as_array().unwrap().len(), 1);
        assert_eq!(cfg["config"]["Env"][0], "PATH=/bin");

        let plain = OciExportOptions {
            base_config: None,
            ..options.clone()
        };
        let cfg = config(&plain, &[layer("sha256:c")]).unwrap();
        assert_eq!(cfg["config"], json!({}));
        let bad = OciExportOptions {
            base_config: Some(b"[1]"),
            ..options
        };
        assert!(config(&bad, &[]).is_err());
    }

    #[test]
    fn frontend_configs_fit_their_history_to_the_layers() {
        let frontend = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "WorkingDir": "/c"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:base"]},
            "history": [
                {"created": "2026-01-01T00:00:00Z", "created_by": "base layer"},
                {"created_by": "WORKDIR /c", "comment": "buildkit.dockerfile.v0"},
                {"created_by": "USER x", "empty_layer": true},
                {"created_by": "RUN a", "comment": "buildkit.dockerfile.v0"},
            ],
        }))
        .unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        // As many layers as the history claims: kept, times filled in.
        let cfg = frontend_config(&frontend, &["sha256:1", "sha256:2", "sha256:3"], now).unwrap();
        assert_eq!(cfg["config"]["WorkingDir"], "/c");
        assert_eq!(
            cfg["rootfs"]["diff_ids"],
            json!(["sha256:1", "sha256:2", "sha256:3"])
        );
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h[0]["created"], "2026-01-01T00:00:00Z");
        assert_eq!(h[1]["created"], "2023-11-14T22:13:20Z");
        assert!(h[2].get("created").is_none(), "empty layers get no time");
        assert_eq!(cfg["created"], "2023-11-14T22:13:20Z");
        // Fewer layers: the extra claims become empty; more: entries are added.
        let cfg = frontend_config(&frontend, &["sha256:1"], now).unwrap();
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h[1]["empty_layer"], true);
        assert_eq!(h[3]["empty_layer"], true);
        let cfg = frontend_config(&frontend, &["a", "b", "c", "d"], now).unwrap();
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h[4]["comment"], "buildkit.exporter.image.v0");
    }
}
