//! Importing a cache: a cache config and the layers its index lists become an
//! [`ImportedCache`], a [`CacheSource`] the scheduler queries beside the local store
//! (BuildKit's `NewCacheKeyStorage`/`cacheResultStorage`). Nothing is downloaded here but
//! the index and the config; a result is handed to the [`ChainLoader`] as a
//! [`RemoteChain`] (descriptors and where to fetch them), which makes it a lazy ref.
//!
//! Key IDs: a record without inputs is known by its digest (the root key every state
//! computes alike); any other by a digest of its record digest and its inputs' IDs, so the
//! same chain gets the same IDs in every import (links saved below it stay useful).
//! Links match when `rootKey(link digest, output)` equals the record digest, as BuildKit's
//! `outputKey`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kiln_proto::Digest;
use kiln_registry::manifest::Descriptor;
use kiln_registry::{BlobOrigin, Fetcher};
use kiln_solver::cachemap::CacheDigest;
use kiln_solver::keys::root_key;
use kiln_solver::op::OpError;
use kiln_solver::source::CacheSource;
use kiln_solver::store::{CacheResult, Link};

use crate::config::{ANNOTATION_CREATED, ANNOTATION_UNCOMPRESSED, CacheConfig};
use crate::error::CacheError;

/// One layer of a remote result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteLayer {
    pub descriptor: Descriptor,
    /// The digest of the uncompressed tar, when the cache says.
    pub diff_id: Option<Digest>,
    /// `buildkit/createdat`, as written.
    pub created_at: Option<String>,
}

/// A result of an imported cache: its layers, base first, and where to fetch them.
#[derive(Clone, Debug)]
pub struct RemoteChain {
    pub layers: Vec<RemoteLayer>,
    pub fetcher: Arc<Fetcher>,
    pub origin: Option<BlobOrigin>,
    /// The cache it came from, for messages.
    pub source: String,
}

/// Turns a remote chain into a result (a lazy ref in the worker).
#[async_trait]
pub trait ChainLoader<R>: Send + Sync + 'static {
    async fn load(&self, chain: &RemoteChain) -> Result<R, OpError>;
}

/// The layers an index lists, by blob digest.
pub type LayerMap = HashMap<String, RemoteLayer>;

impl RemoteLayer {
    /// A layer from an index descriptor, reading its annotations.
    pub fn from_descriptor(d: &crate::config::Descriptor) -> Result<Self, CacheError> {
        let digest = d.digest.parse::<Digest>().map_err(|e| CacheError::Format {
            what: format!("layer descriptor {:?}", d.digest),
            reason: e.to_string(),
        })?;
        Ok(RemoteLayer {
            descriptor: Descriptor {
                media_type: d.media_type.clone(),
                digest,
                size: u64::try_from(d.size).unwrap_or(0),
            },
            diff_id: d
                .annotations
                .get(ANNOTATION_UNCOMPRESSED)
                .and_then(|v| v.parse().ok()),
            created_at: d.annotations.get(ANNOTATION_CREATED).cloned(),
        })
    }
}

#[derive(Debug, Default)]
struct Item {
    record_digest: String,
    /// `(input, record digest of the target, selector)` → targets.
    links_out: HashMap<(i64, String, String), Vec<String>>,
    /// `(source, input, selector)` of links pointing here.
    links_in: Vec<(String, i64, String)>,
    result: Option<usize>,
}

/// An imported cache, queried by the scheduler.
pub struct ImportedCache<R> {
    name: String,
    items: HashMap<String, Item>,
    results: Vec<(RemoteChain, i64)>,
    /// Record digests seen in lookups → the CacheMap digest and output they hash, so links
    /// can be copied into the local store in the store's terms.
    seen: Mutex<HashMap<String, (String, i64)>>,
    loader: Arc<dyn ChainLoader<R>>,
}

impl<R> std::fmt::Debug for ImportedCache<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedCache")
            .field("name", &self.name)
            .field("keys", &self.items.len())
            .field("results", &self.results.len())
            .finish_non_exhaustive()
    }
}

/// A record's ID: its digest when it has no inputs, else a digest of its structure.
fn record_id(
    config: &CacheConfig,
    index: usize,
    ids: &mut BTreeMap<usize, Option<String>>,
) -> Result<String, CacheError> {
    match ids.get(&index) {
        Some(Some(id)) => return Ok(id.clone()),
        Some(None) => {
            return Err(CacheError::Format {
                what: "cache config".into(),
                reason: "invalid looping record".into(),
            });
        }
        None => {}
    }
    let record = config
        .records
        .get(index)
        .ok_or_else(|| CacheError::Format {
            what: "cache config".into(),
            reason: format!("invalid record ID: {index}"),
        })?;
    ids.insert(index, None);
    let id = if record.inputs.is_empty() {
        record.digest.clone()
    } else {
        let mut material = format!("kiln-remotecache\0{}", record.digest);
        for (i, inputs) in record.inputs.iter().enumerate() {
            let mut parts = Vec::new();
            for input in inputs {
                let link = usize::try_from(input.link_index).unwrap_or(usize::MAX);
                parts.push(format!(
                    "{}\0{}",
                    record_id(config, link, ids)?,
                    input.selector
                ));
            }
            parts.sort();
            material.push_str(&format!("\0{i}\0{}", parts.join("\0")));
        }
        Digest::of(material.as_bytes()).as_str().to_owned()
    };
    ids.insert(index, Some(id.clone()));
    Ok(id)
}

/// The layers of result `index` (base first), or `None` when a blob is not in `layers`.
fn chain_of(
    config: &CacheConfig,
    mut index: i64,
    layers: &LayerMap,
) -> Result<Option<Vec<RemoteLayer>>, CacheError> {
    let mut out = Vec::new();
    let mut visited = std::collections::HashSet::new();
    while index != -1 {
        if !visited.insert(index) {
            return Err(CacheError::Format {
                what: "cache config".into(),
                reason: "invalid looping layer".into(),
            });
        }
        let layer = usize::try_from(index)
            .ok()
            .and_then(|i| config.layers.get(i))
            .ok_or_else(|| CacheError::Format {
                what: "cache config".into(),
                reason: format!("invalid layer index {index}"),
            })?;
        let Some(remote) = layers.get(&layer.blob) else {
            return Ok(None);
        };
        out.push(remote.clone());
        index = layer.parent_index;
    }
    out.reverse();
    Ok(Some(out))
}

impl<R: Send + Sync + 'static> ImportedCache<R> {
    /// Builds the key storage of `config`, whose layer blobs `layers` describes and
    /// `fetcher` provides.
    pub fn new(
        name: &str,
        config: &CacheConfig,
        layers: &LayerMap,
        fetcher: Arc<Fetcher>,
        origin: Option<BlobOrigin>,
        loader: Arc<dyn ChainLoader<R>>,
    ) -> Result<Self, CacheError> {
        let mut ids = BTreeMap::new();
        let mut cache = ImportedCache {
            name: name.to_owned(),
            items: HashMap::new(),
            results: Vec::new(),
            seen: Mutex::new(HashMap::new()),
            loader,
        };
        for index in 0..config.records.len() {
            let id = record_id(config, index, &mut ids)?;
            let record = &config.records[index];
            if record.digest.starts_with("random:") {
                continue;
            }
            cache.items.entry(id.clone()).or_default().record_digest = record.digest.clone();
            for (i, inputs) in record.inputs.iter().enumerate() {
                for input in inputs {
                    let link = usize::try_from(input.link_index).unwrap_or(usize::MAX);
                    let source = record_id(config, link, &mut ids)?;
                    let key = (i as i64, record.digest.clone(), input.selector.clone());
                    let out = cache
                        .items
                        .entry(source.clone())
                        .or_default()
                        .links_out
                        .entry(key)
                        .or_default();
                    if !out.contains(&id) {
                        out.push(id.clone());
                    }
                    let item = cache.items.entry(id.clone()).or_default();
                    let back = (source, i as i64, input.selector.clone());
                    if !item.links_in.contains(&back) {
                        item.links_in.push(back);
                    }
                }
            }
            let mut chains: Vec<(Vec<RemoteLayer>, String)> = Vec::new();
            for result in &record.results {
                if let Some(chain) = chain_of(config, result.layer_index, layers)? {
                    chains.push((chain, result.created_at.clone()));
                }
            }
            for result in &record.chained_results {
                let mut chain = Vec::new();
                for index in &result.layer_indexes {
                    let layer = usize::try_from(*index)
                        .ok()
                        .and_then(|i| config.layers.get(i))
                        .ok_or_else(|| CacheError::Format {
                            what: "cache config".into(),
                            reason: format!("invalid layer index {index}"),
                        })?;
                    match layers.get(&layer.blob) {
                        Some(l) => chain.push(l.clone()),
                        None => {
                            chain.clear();
                            break;
                        }
                    }
                }
                if !chain.is_empty() {
                    chains.push((chain, result.created_at.clone()));
                }
            }
            // The newest result of a record wins, as BuildKit keeps one per item.
            if let Some((chain, created)) = chains
                .into_iter()
                .max_by_key(|(_, c)| crate::config::nanos_of_go_time(c).unwrap_or(0))
            {
                let created = crate::config::nanos_of_go_time(&created).unwrap_or(0);
                cache.results.push((
                    RemoteChain {
                        layers: chain,
                        fetcher: fetcher.clone(),
                        origin: origin.clone(),
                        source: name.to_owned(),
                    },
                    created,
                ));
                if let Some(item) = cache.items.get_mut(&id) {
                    item.result = Some(cache.results.len() - 1);
                }
            }
        }
        Ok(cache)
    }

    /// How many keys and results the cache holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.items.len(), self.results.len())
    }
}

#[async_trait]
impl<R: Send + Sync + 'static> CacheSource<R> for ImportedCache<R> {
    fn targets(&self, source: &str, link: &Link) -> Vec<String> {
        let Some(item) = self.items.get(source) else {
            return Vec::new();
        };
        let output_key = root_key(&CacheDigest::new(link.digest.clone()), link.output);
        let found = item
            .links_out
            .get(&(link.input, output_key.clone(), link.selector.clone()))
            .cloned()
            .unwrap_or_default();
        if !found.is_empty() {
            self.seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(output_key, (link.digest.clone(), link.output));
        }
        found
    }

    fn results(&self, key: &str) -> Vec<CacheResult> {
        self.items
            .get(key)
            .and_then(|i| i.result)
            .map(|index| {
                vec![CacheResult {
                    id: format!("{}#{index}", self.name),
                    created_at: self.results[index].1,
                }]
            })
            .unwrap_or_default()
    }

    fn backlinks(&self, key: &str) -> Vec<(String, Link)> {
        let Some(item) = self.items.get(key) else {
            return Vec::new();
        };
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((digest, output)) = seen.get(&item.record_digest) else {
            return Vec::new();
        };
        item.links_in
            .iter()
            .map(|(source, input, selector)| {
                (
                    source.clone(),
                    Link {
                        input: *input,
                        output: *output,
                        digest: digest.clone(),
                        selector: selector.clone(),
                    },
                )
            })
            .collect()
    }

    async fn load(&self, result_id: &str) -> Result<Option<R>, OpError> {
        let Some(index) = result_id
            .strip_prefix(&self.name)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        let Some((chain, _)) = self.results.get(index) else {
            return Ok(None);
        };
        self.loader.load(chain).await.map(Some)
    }
}
