//! Image assembly, the one path every image output takes (`type=oci`, `type=docker`,
//! `type=image`): a result's layer blobs ([`ExportLayer`]s, base first) and the image
//! config make an [`Image`] — the config as BuildKit's image writer patches it (the
//! frontend's config with `rootfs` from the layers and `history` fitted to them, a minimal
//! one for a Definition built without a frontend, the inline cache under
//! `moby.buildkit.cache.v0`), the manifest with OCI or Docker media types, and the layer
//! descriptors. Archives ([`crate::archive`]) and pushes ([`crate::push`]) write that
//! image; none of them makes its own config or manifest.
//!
//! Layers are taken as given: a blob that exists (a pulled base layer, a layer of an
//! imported cache, a result exported before) keeps its digest and compression; only its
//! media type follows the manifest's flavour.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use kiln_proto::{Digest, pb};
use kiln_registry::ExportLayer;
use kiln_registry::manifest::{
    MEDIA_DOCKER_CONFIG, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST,
    layer_media_type,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::ExportError;

/// The image config key BuildKit's inline cache lives under.
pub const INLINE_CACHE_KEY: &str = "moby.buildkit.cache.v0";
/// The descriptor annotation BuildKit's archive exporters add.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// What goes into an image besides its layers.
#[derive(Clone, Debug)]
pub struct ImageOptions<'a> {
    /// The platform the image is for (normalised).
    pub platform: &'a pb::Platform,
    /// The base image's config, whose `config` (env, entrypoint, …) and, when its layers
    /// are this image's first ones, `history` are carried over (without a frontend).
    pub base_config: Option<&'a [u8]>,
    /// The image config a frontend computed for the result (a Dockerfile's): written as
    /// it is, with `rootfs` from the layers and `history` fitted to them as BuildKit's
    /// image exporter fits it. Takes precedence over `base_config`.
    pub image_config: Option<&'a [u8]>,
    /// OCI media types (`oci-mediatypes=true`), else Docker schema 2 ones. A zstd layer
    /// turns them on, as BuildKit does: Docker media types cannot describe it.
    pub oci_types: bool,
    /// The inline cache (BuildKit's records JSON), embedded in the config.
    pub inline_cache: Option<&'a [u8]>,
}

/// An OCI descriptor as Go marshals `ocispecs.Descriptor` (field order kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageDescriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An assembled image: config and manifest bytes, and the layers the manifest lists.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub config_media_type: &'static str,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub manifest_media_type: &'static str,
    /// The layers, base first, with the media types the manifest gives them.
    pub layers: Vec<ExportLayer>,
}

impl Image {
    /// The manifest's descriptor (`containerimage.descriptor`), with `annotations`.
    pub fn descriptor(&self, annotations: BTreeMap<String, String>) -> ImageDescriptor {
        ImageDescriptor {
            media_type: self.manifest_media_type.to_owned(),
            digest: self.manifest_digest.as_str().to_owned(),
            size: self.manifest.len() as u64,
            annotations,
        }
    }
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: ImageDescriptor,
    layers: Vec<ImageDescriptor>,
}

/// Assembles the image of `layers` (base first); `now` dates layers whose creation time
/// is unknown.
pub fn assemble(
    layers: Vec<ExportLayer>,
    options: &ImageOptions<'_>,
    now: SystemTime,
) -> Result<Image, ExportError> {
    let has_zstd = layers
        .iter()
        .any(|l| layer_media_type(&l.media_type, true) == ZSTD_LAYER);
    let oci = options.oci_types || has_zstd;
    if oci && !options.oci_types {
        tracing::warn!("forcibly turning on oci-mediatype mode for zstd layers");
    }
    let layers: Vec<ExportLayer> = layers
        .into_iter()
        .map(|mut l| {
            l.media_type = layer_media_type(&l.media_type, oci);
            l
        })
        .collect();
    let config_layers: Vec<ConfigLayer<'_>> = layers
        .iter()
        .map(|l| ConfigLayer {
            diff_id: l.diff_id.as_str(),
            created: kiln_proto::gojson::go_time(match l.created_at {
                n if n > 0 => std::time::UNIX_EPOCH + std::time::Duration::from_nanos(n as u64),
                _ => now,
            }),
        })
        .collect();
    let mut cfg = config(options, &config_layers)?;
    if let Some(records) = options.inline_cache {
        cfg[INLINE_CACHE_KEY] = json!(base64::engine::general_purpose::STANDARD.encode(records));
    }
    // serde_json writes maps with sorted keys, as Go marshals BuildKit's patched config
    // (a map): the same input gives the same bytes.
    let config = serde_json::to_vec(&cfg).map_err(|e| ExportError::Json {
        what: "config",
        reason: e.to_string(),
    })?;
    let config_digest = Digest::of(&config);
    let (manifest_media_type, config_media_type) = if oci {
        (MEDIA_OCI_MANIFEST, MEDIA_OCI_CONFIG)
    } else {
        (MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_CONFIG)
    };
    // BuildKit's manifest: Go's MarshalIndent of its struct (two-space indentation).
    let manifest = serde_json::to_vec_pretty(&Manifest {
        media_type: manifest_media_type,
        schema_version: 2,
        config: ImageDescriptor {
            media_type: config_media_type.to_owned(),
            digest: config_digest.as_str().to_owned(),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: layers
            .iter()
            .map(|l| ImageDescriptor {
                media_type: l.media_type.clone(),
                digest: l.digest.as_str().to_owned(),
                size: l.size,
                annotations: BTreeMap::new(),
            })
            .collect(),
    })
    .map_err(|e| ExportError::Json {
        what: "manifest",
        reason: e.to_string(),
    })?;
    Ok(Image {
        config_digest,
        config,
        config_media_type,
        manifest_digest: Digest::of(&manifest),
        manifest,
        manifest_media_type,
        layers,
    })
}

/// An image name as BuildKit's exporters use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    /// Normalised, with a tag when it had neither tag nor digest
    /// (`docker.io/library/app:latest`): `io.containerd.image.name`, `image.name`.
    pub full: String,
    /// What follows the repository (`latest`, `@sha256:…`): `org.opencontainers.image.ref.name`.
    pub object: String,
    /// Docker's short form (`app:latest`): a `RepoTags` entry of `manifest.json`.
    pub familiar: String,
}

impl ImageName {
    /// Parses `name` with Docker's normalisation.
    pub fn parse(name: &str) -> Result<Self, ExportError> {
        let parsed =
            kiln_registry::reference::parse_normalized(name).map_err(|e| ExportError::Name {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let full = parsed.whole();
        let after_registry = full
            .strip_prefix(parsed.registry())
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(&full);
        let object = after_registry
            .find([':', '@'])
            .map(|i| after_registry[i..].trim_start_matches(':').to_owned())
            .unwrap_or_default();
        let familiar = match parsed.registry() {
            "docker.io" => after_registry
                .strip_prefix("library/")
                .unwrap_or(after_registry)
                .to_owned(),
            _ => full.clone(),
        };
        Ok(ImageName {
            full,
            object,
            familiar,
        })
    }
}

fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ExportError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ExportError::BaseConfig("not an object".to_owned())),
        Err(e) => Err(ExportError::BaseConfig(e.to_string())),
    }
}

/// One layer as the config sees it: its diff ID and when it was made.
struct ConfigLayer<'a> {
    diff_id: &'a str,
    created: String,
}

/// The image config for `layers`: the frontend's, or a minimal one (the platform, and the
/// base image's `config` and matching history when given), patched for the layers.
fn config(options: &ImageOptions<'_>, layers: &[ConfigLayer<'_>]) -> Result<Value, ExportError> {
    let cfg = match options.image_config {
        Some(bytes) => parse_object(bytes)?,
        None => minimal_config(options, layers)?,
    };
    Ok(patch_config(cfg, layers))
}

fn minimal_config(
    options: &ImageOptions<'_>,
    layers: &[ConfigLayer<'_>],
) -> Result<serde_json::Map<String, Value>, ExportError> {
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
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id).collect();
    let history = base
        .as_ref()
        .and_then(|b| {
            let ids: Vec<&str> = b
                .pointer("/rootfs/diff_ids")?
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let history = b.get("history")?.as_array()?.clone();
            let non_empty = history.iter().filter(|h| !is_empty_layer(h)).count();
            (diff_ids.starts_with(&ids) && non_empty == ids.len()).then_some(history)
        })
        .unwrap_or_default();
    let mut cfg = serde_json::Map::new();
    cfg.insert("architecture".into(), json!(options.platform.architecture));
    cfg.insert("os".into(), json!(options.platform.os));
    if !options.platform.variant.is_empty() {
        cfg.insert("variant".into(), json!(options.platform.variant));
    }
    cfg.insert("config".into(), inner);
    cfg.insert("history".into(), Value::Array(history));
    Ok(cfg)
}

fn is_empty_layer(h: &Value) -> bool {
    h.get("empty_layer").and_then(Value::as_bool) == Some(true)
}

fn has_time(h: &Value) -> bool {
    h.get("created").is_some_and(|c| !c.is_null())
}

/// BuildKit's `normalizeLayersAndHistory` and `patchImageConfig`: `rootfs` lists the
/// layers; history entries that claim layers beyond them become empty ones, layers without
/// an entry get one; a layer's entry without a time gets the layer's creation time (stable
/// for a cached layer, so a build from cache gives the same config), every other entry
/// without one the time of the next layer made (or the one before); `created` is the last
/// entry's time unless the config has one.
fn patch_config(mut cfg: serde_json::Map<String, Value>, layers: &[ConfigLayer<'_>]) -> Value {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id).collect();
    cfg.insert(
        "rootfs".to_owned(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history: Vec<Value> = cfg
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut claimed = 0;
    for h in &mut history {
        if is_empty_layer(h) {
            continue;
        }
        if claimed >= layers.len() {
            h["empty_layer"] = json!(true);
        } else {
            claimed += 1;
        }
    }
    for layer in &layers[claimed.min(layers.len())..] {
        history.push(json!({
            "created": layer.created,
            "created_by": "kiln build",
            "comment": "buildkit.exporter.image.v0",
        }));
    }
    let mut index = 0;
    for h in &mut history {
        if is_empty_layer(h) {
            continue;
        }
        if !has_time(h) {
            if let Some(layer) = layers.get(index) {
                h["created"] = json!(layer.created);
            }
        }
        index += 1;
    }
    // The first time after an entry without one, else the last time.
    let mut time: Option<Value> = None;
    let mut gap = false;
    for h in &history {
        if has_time(h) {
            time = h.get("created").cloned();
            if gap {
                break;
            }
        } else {
            gap = true;
        }
    }
    gap = false;
    for h in &mut history {
        if has_time(h) {
            if gap {
                time = h.get("created").cloned();
            }
        } else {
            gap = true;
            if let Some(t) = &time {
                h["created"] = t.clone();
            }
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
    Value::Object(cfg)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kiln_registry::LayerBlob;

    use super::*;

    fn layer(diff: &str, media_type: &str) -> ExportLayer {
        let diff_id = Digest::of(diff.as_bytes());
        ExportLayer {
            media_type: media_type.to_owned(),
            digest: Digest::of(format!("blob of {diff}").as_bytes()),
            size: 10,
            diff_id,
            created_at: 0,
            blob: LayerBlob::File(PathBuf::from("/nonexistent")),
            origins: Vec::new(),
        }
    }

    fn platform() -> pb::Platform {
        pb::Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: "v7".into(),
            ..Default::default()
        }
    }

    const GZIP_OCI: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const GZIP_DOCKER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    fn config_layers<'a>(ids: &[&'a str], times: &[&str]) -> Vec<ConfigLayer<'a>> {
        ids.iter()
            .zip(times)
            .map(|(diff_id, t)| ConfigLayer {
                diff_id,
                created: (*t).to_owned(),
            })
            .collect()
    }

    #[test]
    fn config_carries_over_the_base_config_and_matching_history() {
        let platform = platform();
        let (a, b) = ("sha256:a", "sha256:b");
        let base = serde_json::to_vec(&json!({
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [a]},
            "history": [
                {"created": "2020-01-01T00:00:00Z", "created_by": "base"},
                {"created_by": "env", "empty_layer": true},
            ],
        }))
        .unwrap();
        let options = ImageOptions {
            platform: &platform,
            base_config: Some(&base),
            image_config: None,
            oci_types: true,
            inline_cache: None,
        };
        let times = ["2021-01-01T00:00:00Z", "2022-01-01T00:00:00Z"];
        let cfg = config(&options, &config_layers(&[a, b], &times)).unwrap();
        assert_eq!(cfg["config"]["Env"][0], "PATH=/bin");
        assert_eq!(cfg["variant"], "v7");
        assert_eq!(cfg["rootfs"]["diff_ids"], json!([a, b]));
        let history = cfg["history"].as_array().unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[0]["created_by"], "base");
        assert_eq!(history[0]["created"], "2020-01-01T00:00:00Z");
        // The metadata entry takes the time of the next layer made.
        assert_eq!(history[1]["created"], times[1]);
        assert_eq!(history[2]["created_by"], "kiln build");
        assert_eq!(history[2]["created"], times[1]);
        assert_eq!(cfg["created"], times[1]);

        // Different first layer: the base history does not describe these layers.
        let cfg = config(&options, &config_layers(&["sha256:c"], &times)).unwrap();
        assert_eq!(cfg["history"].as_array().unwrap().len(), 1);
        assert_eq!(cfg["config"]["Env"][0], "PATH=/bin");

        let plain = ImageOptions {
            base_config: None,
            ..options.clone()
        };
        let cfg = config(&plain, &config_layers(&["sha256:c"], &times)).unwrap();
        assert_eq!(cfg["config"], json!({}));
        assert_eq!(cfg["os"], "linux");
        let bad = ImageOptions {
            base_config: Some(b"[1]"),
            ..options
        };
        assert!(config(&bad, &[]).is_err());
    }

    #[test]
    fn frontend_configs_fit_their_history_to_the_layers() {
        let platform = platform();
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
        let options = ImageOptions {
            platform: &platform,
            base_config: None,
            image_config: Some(&frontend),
            oci_types: true,
            inline_cache: None,
        };
        let times = [
            "2026-01-01T00:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            "2026-04-01T00:00:00Z",
        ];
        let ids = ["sha256:1", "sha256:2", "sha256:3", "sha256:4"];
        // As many layers as the history claims: kept, each layer's time filled in, the
        // metadata entry dated by the next layer.
        let cfg = config(&options, &config_layers(&ids[..3], &times)).unwrap();
        assert_eq!(cfg["config"]["WorkingDir"], "/c");
        assert_eq!(cfg["architecture"], "amd64", "the frontend's platform");
        assert_eq!(cfg["rootfs"]["diff_ids"], json!(ids[..3]));
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h[0]["created"], times[0]);
        assert_eq!(h[1]["created"], times[1]);
        assert_eq!(h[2]["created"], times[2]);
        assert_eq!(h[3]["created"], times[2]);
        assert_eq!(cfg["created"], times[2]);
        // Fewer layers: the extra claims become empty; more: entries are added.
        let cfg = config(&options, &config_layers(&ids[..1], &times)).unwrap();
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h[1]["empty_layer"], true);
        assert_eq!(h[3]["empty_layer"], true);
        assert_eq!(h[3]["created"], times[0], "the last time before");
        let cfg = config(&options, &config_layers(&ids, &times)).unwrap();
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h[4]["comment"], "buildkit.exporter.image.v0");
        assert_eq!(h[4]["created"], times[3]);
        assert_eq!(cfg["created"], times[3]);
    }

    #[test]
    fn manifests_keep_blobs_and_follow_the_media_type_flavour() {
        let platform = platform();
        let layers = vec![layer("base", GZIP_DOCKER), layer("step", GZIP_OCI)];
        let options = ImageOptions {
            platform: &platform,
            base_config: None,
            image_config: None,
            oci_types: false,
            inline_cache: Some(br#"[{"digest":"sha256:x"}]"#),
        };
        let image = assemble(layers.clone(), &options, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(image.manifest_media_type, MEDIA_DOCKER_MANIFEST);
        let m: Value = serde_json::from_slice(&image.manifest).unwrap();
        let text = String::from_utf8(image.manifest.clone()).unwrap();
        assert!(
            text.starts_with("{\n  \"mediaType\": \"application/vnd.docker.distribution.manifest.v2+json\",\n  \"schemaVersion\": 2,"),
            "{text}"
        );
        assert_eq!(m["config"]["mediaType"], MEDIA_DOCKER_CONFIG);
        assert_eq!(m["config"]["digest"], image.config_digest.as_str());
        assert_eq!(m["config"]["size"], image.config.len());
        for (i, l) in layers.iter().enumerate() {
            assert_eq!(m["layers"][i]["digest"], l.digest.as_str(), "blob reused");
            assert_eq!(m["layers"][i]["mediaType"], GZIP_DOCKER);
        }
        assert_eq!(image.manifest_digest, Digest::of(&image.manifest));
        let cfg: Value = serde_json::from_slice(&image.config).unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"],
            json!([layers[0].diff_id.as_str(), layers[1].diff_id.as_str()])
        );
        // The inline cache is the records JSON, base64 as Go marshals a []byte.
        assert_eq!(
            cfg[INLINE_CACHE_KEY],
            base64::engine::general_purpose::STANDARD.encode(br#"[{"digest":"sha256:x"}]"#)
        );
        let d = image.descriptor(BTreeMap::new());
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            format!(
                r#"{{"mediaType":"{MEDIA_DOCKER_MANIFEST}","digest":"{}","size":{}}}"#,
                image.manifest_digest,
                image.manifest.len()
            )
        );

        // OCI flavour; a zstd layer forces it.
        let oci = assemble(
            layers.clone(),
            &ImageOptions {
                oci_types: true,
                ..options.clone()
            },
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(oci.manifest_media_type, MEDIA_OCI_MANIFEST);
        assert_eq!(oci.config_media_type, MEDIA_OCI_CONFIG);
        assert!(oci.layers.iter().all(|l| l.media_type == GZIP_OCI));
        let zstd = assemble(
            vec![layer("z", ZSTD_LAYER), layer("g", GZIP_DOCKER)],
            &options,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(zstd.manifest_media_type, MEDIA_OCI_MANIFEST);
        assert_eq!(zstd.layers[1].media_type, GZIP_OCI);
    }

    #[test]
    fn names_normalise_as_docker_does() {
        let n = ImageName::parse("app").unwrap();
        assert_eq!(n.full, "docker.io/library/app:latest");
        assert_eq!(n.object, "latest");
        assert_eq!(n.familiar, "app:latest");
        let n = ImageName::parse("localhost:5000/team/app:1").unwrap();
        assert_eq!(n.full, "localhost:5000/team/app:1");
        assert_eq!(n.object, "1");
        assert_eq!(n.familiar, "localhost:5000/team/app:1");
        let n = ImageName::parse("user/app").unwrap();
        assert_eq!(n.familiar, "user/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let n = ImageName::parse(&format!("r.test/x@{d}")).unwrap();
        assert_eq!(n.object, format!("@{d}"));
        assert!(ImageName::parse("Bad Name").is_err());
    }
}
