//! Image manifests, indexes and configs as kiln reads them: OCI and Docker schema 2 media
//! types, parsed leniently (as Go's `encoding/json` would fill BuildKit's structs), and the
//! choice of a platform's manifest from an index (containerd's matcher: exact
//! os/architecture/variant, then older ARM variants a newer one can run).

use kiln_proto::platform::normalize;
use kiln_proto::{Digest, pb};
use serde::Deserialize;

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer media types with their Docker schema 2 equivalents (zstd has none: Docker media
/// types cannot describe it, so it keeps the OCI one).
const LAYER_MEDIA_TYPES: [(&str, &str); 3] = [
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ),
    (
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ),
];

/// The media type a layer of `media_type` gets in a manifest or index with OCI media
/// types (`oci`) or Docker's, as BuildKit converts them; unknown types are kept.
pub fn layer_media_type(media_type: &str, oci: bool) -> String {
    for (o, d) in LAYER_MEDIA_TYPES {
        if media_type == o || media_type == d {
            return if oci { o } else { d }.to_owned();
        }
    }
    media_type.to_owned()
}

/// Media types kiln asks registries for, in preference order.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
];

/// Errors from parsing manifests.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {digest}: {message}")]
    Parse { digest: Digest, message: String },
    #[error("manifest {digest} has media type {media_type}, which kiln does not support")]
    Unsupported { digest: Digest, media_type: String },
    #[error("manifest {digest}: descriptor digest {value:?}: {reason}")]
    BadDigest {
        digest: Digest,
        value: String,
        reason: String,
    },
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// An entry of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub descriptor: Descriptor,
    /// The entry's platform, normalised; `None` when the index gives none.
    pub platform: Option<pb::Platform>,
}

/// A parsed manifest or index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Index(Vec<IndexEntry>),
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default, rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

fn descriptor(owner: &Digest, raw: RawDescriptor) -> Result<Descriptor, ManifestError> {
    let value = raw.digest.unwrap_or_default();
    let digest = value
        .parse::<Digest>()
        .map_err(|e| ManifestError::BadDigest {
            digest: owner.clone(),
            value: value.clone(),
            reason: e.to_string(),
        })?;
    let size = u64::try_from(raw.size.unwrap_or(0)).map_err(|_| ManifestError::Parse {
        digest: owner.clone(),
        message: format!("descriptor {digest} has a negative size"),
    })?;
    Ok(Descriptor {
        media_type: raw.media_type.unwrap_or_default(),
        digest,
        size,
    })
}

/// Parses manifest or index `bytes` whose digest is `digest`; `media_type` is what the
/// registry or the referring descriptor said (the document's own field wins).
pub fn parse(digest: &Digest, media_type: &str, bytes: &[u8]) -> Result<Parsed, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse {
        digest: digest.clone(),
        message: e.to_string(),
    })?;
    let media_type = raw
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| media_type.to_owned());
    let is_index = match media_type.as_str() {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => true,
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => false,
        // Without a usable media type the document's shape tells (as containerd does).
        "" | "application/json" | "application/octet-stream"
            if raw.schema_version == Some(2) || raw.schema_version.is_none() =>
        {
            if raw.manifests.is_some() {
                true
            } else if raw.config.is_some() {
                false
            } else {
                return Err(ManifestError::Parse {
                    digest: digest.clone(),
                    message: "neither an image manifest nor an index".to_owned(),
                });
            }
        }
        other => {
            return Err(ManifestError::Unsupported {
                digest: digest.clone(),
                media_type: if other.is_empty() {
                    format!("schema version {}", raw.schema_version.unwrap_or(0))
                } else {
                    other.to_owned()
                },
            });
        }
    };
    if is_index {
        let host = kiln_proto::platform::host_platform();
        let entries = raw
            .manifests
            .unwrap_or_default()
            .into_iter()
            .map(|mut d| {
                let platform = d.platform.take().map(|p| {
                    let p = pb::Platform {
                        architecture: p.architecture.unwrap_or_default(),
                        os: p.os.unwrap_or_default(),
                        variant: p.variant.unwrap_or_default(),
                        ..Default::default()
                    };
                    normalize(Some(&p), &host)
                });
                Ok(IndexEntry {
                    descriptor: descriptor(digest, d)?,
                    platform,
                })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        return Ok(Parsed::Index(entries));
    }
    let config = raw.config.ok_or_else(|| ManifestError::Parse {
        digest: digest.clone(),
        message: "no config descriptor".to_owned(),
    })?;
    let config = descriptor(digest, config)?;
    let layers = raw
        .layers
        .unwrap_or_default()
        .into_iter()
        .map(|l| descriptor(digest, l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed::Manifest { config, layers })
}

/// The platforms a `want` platform runs, best first (containerd `platforms.Only`): itself,
/// then older ARM variants.
pub fn compatible_platforms(want: &pb::Platform) -> Vec<pb::Platform> {
    let mut out = vec![want.clone()];
    let older: &[&str] = match (want.architecture.as_str(), want.variant.as_str()) {
        ("arm", "v8") => &["v7", "v6", "v5"],
        ("arm", "v7") => &["v6", "v5"],
        ("arm", "v6") => &["v5"],
        // arm64/v8 normalises to arm64 without a variant, so it needs no entry here.
        _ => &[],
    };
    out.extend(older.iter().map(|v| pb::Platform {
        variant: (*v).to_owned(),
        ..want.clone()
    }));
    out
}

fn same_platform(a: &pb::Platform, b: &pb::Platform) -> bool {
    a.os == b.os && a.architecture == b.architecture && a.variant == b.variant
}

/// Whether an image made for `have` runs on `want` (both normalised).
pub fn platform_matches(want: &pb::Platform, have: &pb::Platform) -> bool {
    compatible_platforms(want)
        .iter()
        .any(|p| same_platform(p, have))
}

/// The index entry for `want` (normalised): the best compatible platform, the first such
/// entry in index order. Entries without a platform are not chosen here.
pub fn select_platform<'a>(
    entries: &'a [IndexEntry],
    want: &pb::Platform,
) -> Option<&'a IndexEntry> {
    compatible_platforms(want).iter().find_map(|p| {
        entries.iter().find(|e| {
            e.platform
                .as_ref()
                .is_some_and(|have| same_platform(p, have))
        })
    })
}

/// What kiln reads from an image config. Parsed as Go fills `ocispecs.Image` (missing or
/// `null` fields are empty), so a config BuildKit accepts is accepted here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSummary {
    pub os: String,
    pub architecture: String,
    pub variant: String,
    /// `rootfs.type`, normally `layers`.
    pub rootfs_type: String,
    /// `rootfs.diff_ids`, as written.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    diff_ids: Option<Vec<String>>,
}

impl ConfigSummary {
    /// Parses config bytes; `Err` carries the JSON error text.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let rootfs = raw.rootfs.unwrap_or(RawRootfs {
            kind: None,
            diff_ids: None,
        });
        Ok(ConfigSummary {
            os: raw.os.unwrap_or_default(),
            architecture: raw.architecture.unwrap_or_default(),
            variant: raw.variant.unwrap_or_default(),
            rootfs_type: rootfs.kind.unwrap_or_default(),
            diff_ids: rootfs.diff_ids.unwrap_or_default(),
        })
    }

    /// The config's platform, normalised.
    pub fn platform(&self) -> pb::Platform {
        let p = pb::Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
            ..Default::default()
        };
        normalize(Some(&p), &kiln_proto::platform::host_platform())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types_convert_both_ways() {
        let gzip_oci = "application/vnd.oci.image.layer.v1.tar+gzip";
        let gzip_docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(layer_media_type(gzip_docker, true), gzip_oci);
        assert_eq!(layer_media_type(gzip_oci, false), gzip_docker);
        assert_eq!(layer_media_type(gzip_oci, true), gzip_oci);
        let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
        assert_eq!(layer_media_type(zstd, false), zstd);
        assert_eq!(layer_media_type("x/unknown", false), "x/unknown");
    }

    fn p(os: &str, arch: &str, variant: &str) -> pb::Platform {
        pb::Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.into(),
            ..Default::default()
        }
    }

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    /// `(os, architecture, variant)`.
    type Triple<'a> = (&'a str, &'a str, &'a str);

    fn index(entries: &[(Option<Triple<'_>>, u8)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(platform, n)| {
                let mut m = serde_json::json!({
                    "mediaType": MEDIA_OCI_MANIFEST, "digest": d(*n), "size": 100
                });
                if let Some((os, arch, variant)) = platform {
                    m["platform"] =
                        serde_json::json!({"os": os, "architecture": arch, "variant": variant});
                }
                m
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests
        }))
        .unwrap()
    }

    fn select(bytes: &[u8], want: pb::Platform) -> Option<String> {
        let Parsed::Index(entries) = parse(&Digest::of(bytes), "", bytes).unwrap() else {
            panic!("not an index")
        };
        select_platform(&entries, &want).map(|e| e.descriptor.digest.as_str().to_owned())
    }

    #[test]
    fn selects_the_platform_manifest_from_an_index() {
        let bytes = index(&[
            (None, 9),
            (Some(("unknown", "unknown", "")), 8),
            (Some(("linux", "arm", "v6")), 1),
            (Some(("linux", "x86_64", "")), 2),
            (Some(("linux", "aarch64", "v8")), 3),
            (Some(("linux", "arm", "v7")), 4),
            (Some(("linux", "amd64", "")), 5),
            (Some(("windows", "amd64", "")), 6),
            (Some(("linux", "s390x", "")), 7),
        ]);
        // Exact (normalised) match, first in index order: x86_64 is amd64.
        assert_eq!(select(&bytes, p("linux", "amd64", "")), Some(d(2)));
        assert_eq!(select(&bytes, p("windows", "amd64", "")), Some(d(6)));
        // arm64 takes a v8 entry (normalised to no variant).
        assert_eq!(select(&bytes, p("linux", "arm64", "")), Some(d(3)));
        assert_eq!(select(&bytes, p("linux", "arm", "v7")), Some(d(4)));
        // v8 32-bit ARM runs v7 before v6; v6 does not run v7.
        assert_eq!(select(&bytes, p("linux", "arm", "v8")), Some(d(4)));
        assert_eq!(select(&bytes, p("linux", "arm", "v6")), Some(d(1)));
        assert_eq!(select(&bytes, p("linux", "arm", "v5")), None);
        assert_eq!(select(&bytes, p("linux", "riscv64", "")), None);
        assert_eq!(select(&bytes, p("darwin", "amd64", "")), None);
    }

    #[test]
    fn parses_manifests_by_media_type_or_shape() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": d(1), "size": 10},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(2), "size": 20}]
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let parsed = parse(&Digest::of(&bytes), "", &bytes).unwrap();
        let Parsed::Manifest { config, layers } = parsed else {
            panic!("not a manifest")
        };
        assert_eq!(config.digest.as_str(), d(1));
        assert_eq!(config.size, 10);
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].size, 20);

        let v1 = br#"{"schemaVersion": 1, "name": "x", "fsLayers": []}"#;
        let err = parse(&Digest::of(v1), "", v1).unwrap_err().to_string();
        assert!(err.contains("schema version 1"), "{err}");
        let bad = br#"{"schemaVersion": 2, "config": {"digest": "md5:xyz"}}"#;
        let err = parse(&Digest::of(bad), "", bad).unwrap_err().to_string();
        assert!(err.contains("descriptor digest \"md5:xyz\""), "{err}");
        let err = parse(&Digest::of(b"nope"), "", b"nope")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("manifest {}: ", Digest::of(b"nope"))),
            "{err}"
        );
    }

    #[test]
    fn config_summary_is_lenient_like_go() {
        let c = ConfigSummary::parse(
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:a","sha256:b"]},"config":null}"#,
        )
        .unwrap();
        assert_eq!(c.diff_ids, ["sha256:a", "sha256:b"]);
        assert_eq!(c.rootfs_type, "layers");
        assert_eq!(c.platform(), p("linux", "amd64", ""));
        let empty = ConfigSummary::parse(br#"{"rootfs":null,"os":null}"#).unwrap();
        assert_eq!(empty, ConfigSummary::default());
        assert!(ConfigSummary::parse(b"not json").is_err());
        assert!(ConfigSummary::parse(br#"{"rootfs":{"diff_ids":"x"}}"#).is_err());
    }
}
