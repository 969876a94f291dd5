//! The cache config (`application/vnd.buildkit.cacheconfig.v0`) and the OCI index that
//! carries it, field for field as BuildKit v0.11.6 marshals them (Go `encoding/json`:
//! struct field order, `omitempty` where BuildKit has it, so `parent: 0` is omitted and
//! `link: 0` is not).

use serde::{Deserialize, Serialize};

/// Media type of the cache config blob.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Layer annotation: the layer's creation time.
pub const ANNOTATION_CREATED: &str = "buildkit/createdat";
/// Layer annotation: the diff ID.
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// The image config key of an inline cache.
pub const INLINE_CACHE_KEY: &str = "moby.buildkit.cache.v0";

/// Unix nanoseconds as Go writes a `time.Time` (before 1970: the epoch).
pub fn go_time_nanos(nanos: i64) -> String {
    let since = std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
    kiln_proto::gojson::go_time(std::time::UNIX_EPOCH + since)
}

/// A Go time's text as Unix nanoseconds; `None` when malformed or before 1970.
pub fn nanos_of_go_time(text: &str) -> Option<i64> {
    let since = kiln_proto::gojson::parse_go_time(text)?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    i64::try_from(since.as_nanos()).ok()
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blob: String,
    /// Index of the parent layer, `-1` for none (Go omits `0`).
    #[serde(default, rename = "parent", skip_serializing_if = "is_zero")]
    pub parent_index: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    #[serde(default, rename = "diffID", skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(
        default,
        rename = "createdAt",
        skip_serializing_if = "String::is_empty"
    )]
    pub created_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    #[serde(default, rename = "chains", skip_serializing_if = "Vec::is_empty")]
    pub chained_results: Vec<ChainedResult>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

/// Go never omits a `time.Time`: an unset one is its zero time.
fn created_at_text<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() {
        kiln_proto::gojson::GO_ZERO_TIME
    } else {
        v
    })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheResult {
    #[serde(rename = "layer")]
    pub layer_index: i64,
    #[serde(default, rename = "createdAt", serialize_with = "created_at_text")]
    pub created_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainedResult {
    #[serde(rename = "layers")]
    pub layer_indexes: Vec<i64>,
    #[serde(default, rename = "createdAt", serialize_with = "created_at_text")]
    pub created_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInput {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(rename = "link")]
    pub link_index: i64,
}

/// An OCI descriptor as Go marshals `ocispecs.Descriptor`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The index a cache is published as (BuildKit's own `manifestList` type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: i64,
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marshals_like_go() {
        let config = CacheConfig {
            layers: vec![
                CacheLayer {
                    blob: "sha256:a".into(),
                    parent_index: -1,
                    annotations: None,
                },
                CacheLayer {
                    blob: "sha256:b".into(),
                    parent_index: 0,
                    annotations: None,
                },
            ],
            records: vec![CacheRecord {
                results: vec![CacheResult {
                    layer_index: 0,
                    created_at: String::new(),
                }],
                digest: "sha256:r".into(),
                inputs: vec![vec![CacheInput {
                    selector: String::new(),
                    link_index: 0,
                }]],
                ..Default::default()
            }],
        };
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"layers":[{"blob":"sha256:a","parent":-1},{"blob":"sha256:b"}],"records":[{"layers":[{"layer":0,"createdAt":"0001-01-01T00:00:00Z"}],"digest":"sha256:r","inputs":[[{"link":0}]]}]}"#
        );
        assert_eq!(
            go_time_nanos(1_700_000_000_120_000_000),
            "2023-11-14T22:13:20.12Z"
        );
        assert_eq!(
            nanos_of_go_time("2023-11-14T22:13:20.12Z"),
            Some(1_700_000_000_120_000_000)
        );
        assert_eq!(nanos_of_go_time(kiln_proto::gojson::GO_ZERO_TIME), None);
        let back: CacheConfig =
            serde_json::from_str(r#"{"layers":[{"blob":"sha256:b"}]}"#).unwrap();
        assert_eq!(
            back.layers[0].parent_index, 0,
            "a missing parent is 0, as in Go"
        );
    }
}
