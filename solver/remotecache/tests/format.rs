//! BuildKit's own exported caches (`../shared/conformance/remote-cache/`) read back: the
//! config re-marshals to the same bytes, its records become keys with links a lookup in
//! BuildKit's terms finds, and results come out as remote chains.

// Fixture helpers panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use kiln_remotecache::config::{CacheConfig, CacheIndex};
use kiln_remotecache::{ChainLoader, ImportedCache, RemoteChain, load_local};
use kiln_solver::op::OpError;
use kiln_solver::source::CacheSource;
use kiln_testsupport::shared_dir;

struct Layers;

#[async_trait]
impl ChainLoader<Vec<String>> for Layers {
    async fn load(&self, chain: &RemoteChain) -> Result<Vec<String>, OpError> {
        Ok(chain
            .layers
            .iter()
            .map(|l| l.descriptor.digest.as_str().to_owned())
            .collect())
    }
}

#[test]
fn buildkit_configs_round_trip_and_import() {
    for name in [
        "df01_run_plain",
        "df03_multistage_copy_from",
        "df11_many_runs",
    ] {
        let dir = shared_dir().join("conformance/remote-cache").join(name);
        let top: CacheIndex =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let index_hex = top.manifests[0].digest.trim_start_matches("sha256:");
        let index: CacheIndex = serde_json::from_slice(
            &std::fs::read(dir.join("blobs/sha256").join(index_hex)).unwrap(),
        )
        .unwrap();
        let config_desc = index.manifests.last().unwrap();
        let bytes = std::fs::read(
            dir.join("blobs/sha256")
                .join(config_desc.digest.trim_start_matches("sha256:")),
        )
        .unwrap();
        let config: CacheConfig = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            serde_json::to_vec(&config).unwrap(),
            bytes,
            "{name}: kiln marshals BuildKit's config to the same bytes"
        );
        // The index too (layer descriptors with annotations, then the config).
        let index_bytes = std::fs::read(dir.join("blobs/sha256").join(index_hex)).unwrap();
        assert_eq!(
            serde_json::to_vec(&index).unwrap(),
            index_bytes,
            "{name}: index"
        );

        let loaded = load_local(&dir, None, None).unwrap();
        let (config, layers) = &loaded.configs[0];
        let cache: ImportedCache<Vec<String>> = ImportedCache::new(
            name,
            config,
            layers,
            loaded.fetcher.clone(),
            None,
            Arc::new(Layers),
        )
        .unwrap();
        let (keys, results) = cache.counts();
        assert_eq!(keys, config.records.len(), "{name}");
        let with_results = config
            .records
            .iter()
            .filter(|r| !r.results.is_empty())
            .count();
        assert_eq!(results, with_results, "{name}");
        // Every record without inputs is known by its digest (a root key).
        let roots: Vec<&str> = config
            .records
            .iter()
            .filter(|r| r.inputs.is_empty())
            .map(|r| r.digest.as_str())
            .collect();
        assert!(!roots.is_empty());
        for root in roots {
            assert!(
                cache.results(root).is_empty(),
                "{name}: roots carry no result"
            );
        }
    }
}
