//! The inline cache as BuildKit v0.11.6's `ExportForLayers` writes it and its importer
//! reads it: records only, each result given by the image's layers (`layer`: the index of
//! the result's top layer when its chain is a prefix of the image, else a chained result
//! of layer positions), results whose layers the image lacks dropped; read back from an
//! image config into an importable cache.

// Fixture helpers panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use kiln_proto::Digest;
use kiln_registry::layout::OciLayout;
use kiln_registry::manifest::Descriptor;
use kiln_registry::{ExportLayer, Fetcher, LayerBlob};
use kiln_remotecache::config::{
    CacheConfig, CacheInput, CacheLayer, CacheRecord, CacheResult, ChainedResult,
};
use kiln_remotecache::export::inline_records;
use kiln_remotecache::sources::inline_config;
use kiln_remotecache::{BuiltCache, ChainLoader, ImportedCache, RemoteChain};
use kiln_solver::op::OpError;

fn blob(name: &str) -> Digest {
    Digest::of(name.as_bytes())
}

fn layer(name: &str, parent: i64) -> CacheLayer {
    CacheLayer {
        blob: blob(name).as_str().to_owned(),
        parent_index: parent,
        annotations: None,
    }
}

fn record(digest: &str, links: &[i64], results: &[i64]) -> CacheRecord {
    CacheRecord {
        digest: digest.to_owned(),
        inputs: match links {
            [] => Vec::new(),
            links => vec![
                links
                    .iter()
                    .map(|l| CacheInput {
                        selector: String::new(),
                        link_index: *l,
                    })
                    .collect(),
            ],
        },
        results: results
            .iter()
            .map(|l| CacheResult {
                layer_index: *l,
                created_at: "2026-01-01T00:00:00Z".into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn export_layer(name: &str) -> ExportLayer {
    ExportLayer {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: blob(name),
        size: 1,
        diff_id: Digest::of(format!("diff {name}").as_bytes()),
        created_at: 0,
        blob: LayerBlob::File(PathBuf::from("/nonexistent")),
        origins: Vec::new(),
    }
}

/// A min-mode cache of: a source, `RUN 1` (layer a), `RUN 2` on it (a, b), `RUN 3` on
/// the source (layer c, not in the image) and a record whose result is b alone.
fn cache() -> BuiltCache {
    BuiltCache {
        config: CacheConfig {
            layers: vec![
                layer("a", -1),
                layer("b", 0),
                layer("c", -1),
                layer("b", -1),
            ],
            records: vec![
                record("sha256:src", &[], &[]),
                record("sha256:run1", &[0], &[0]),
                record("sha256:run2", &[1], &[1]),
                record("sha256:run3", &[0], &[2]),
                record("sha256:alone", &[0], &[3]),
            ],
        },
        blobs: ["a", "b", "c"].iter().map(|n| export_layer(n)).collect(),
    }
}

struct Chains;

#[async_trait]
impl ChainLoader<Vec<Digest>> for Chains {
    async fn load(&self, chain: &RemoteChain) -> Result<Vec<Digest>, OpError> {
        Ok(chain
            .layers
            .iter()
            .map(|l| l.descriptor.digest.clone())
            .collect())
    }
}

#[test]
fn inline_records_point_into_the_image_layers() {
    let image = [blob("a"), blob("b")];
    let records = inline_records(&cache(), &image).unwrap().unwrap();
    let records: Vec<CacheRecord> = serde_json::from_slice(&records).unwrap();
    let by = |d: &str| records.iter().find(|r| r.digest == d).unwrap();
    assert_eq!(records.len(), 5, "every record stays, with its links");
    assert_eq!(by("sha256:run1").results[0].layer_index, 0);
    assert_eq!(by("sha256:run2").results[0].layer_index, 1);
    assert_eq!(by("sha256:run2").inputs[0][0].link_index, 1);
    assert!(
        by("sha256:run3").results.is_empty(),
        "c is not in the image"
    );
    assert!(by("sha256:alone").results.is_empty());
    assert_eq!(
        by("sha256:alone").chained_results,
        [ChainedResult {
            layer_indexes: vec![1],
            created_at: "2026-01-01T00:00:00Z".into()
        }]
    );
    // An image none of whose results' layers match gets no inline cache.
    assert_eq!(inline_records(&cache(), &[blob("z")]).unwrap(), None);
}

#[test]
fn inline_caches_read_back_from_an_image_config() {
    let image = [blob("a"), blob("b")];
    let records = inline_records(&cache(), &image).unwrap().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [
            export_layer("a").diff_id.as_str(),
            export_layer("b").diff_id.as_str(),
        ]},
        "history": [
            {"created": "2026-01-01T00:00:00Z", "created_by": "RUN 1"},
            {"created_by": "ENV x", "empty_layer": true},
            {"created": "2026-01-02T00:00:00Z", "created_by": "RUN 2"},
        ],
        "moby.buildkit.cache.v0": base64::engine::general_purpose::STANDARD.encode(&records),
    }))
    .unwrap();
    let descriptors: Vec<Descriptor> = image
        .iter()
        .map(|d| Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d.clone(),
            size: 1,
        })
        .collect();
    let (read, layers) = inline_config(&config, &descriptors).unwrap().unwrap();
    assert_eq!(read.layers.len(), 2, "the image's layers, as a chain");
    assert_eq!(read.layers[1].parent_index, 0);
    let b = &layers[blob("b").as_str()];
    assert_eq!(b.diff_id.as_ref(), Some(&export_layer("b").diff_id));
    assert_eq!(
        b.created_at.as_deref(),
        Some("2026-01-02T00:00:00Z"),
        "layer times from the history, empty entries skipped"
    );
    let dir = tempfile::tempdir().unwrap();
    let imported: ImportedCache<Vec<Digest>> = ImportedCache::new(
        "inline",
        &read,
        &layers,
        Arc::new(Fetcher::Layout(OciLayout::at(dir.path()))),
        None,
        Arc::new(Chains),
    )
    .unwrap();
    // run1, run2 and the chained result of "alone".
    assert_eq!(imported.counts(), (5, 3));

    // A config without the key, or whose layers do not match the manifest, has none.
    let plain = br#"{"rootfs":{"diff_ids":[]}}"#;
    assert!(inline_config(plain, &[]).unwrap().is_none());
    assert!(inline_config(&config, &descriptors[..1]).unwrap().is_none());
}
