//! Exporting a cache: the keys and results of a solve ([`CacheExport`]) become a cache
//! config as BuildKit's `CacheChains.Marshal` writes it (records with digest, inputs and
//! results; layers with parents; sorted the same way), then are written to a directory, a
//! registry, or an image config (inline).
//!
//! `mode=min` gives a result to the target's records only (and to records whose layers
//! already exist as blobs, as BuildKit's `CacheExportModeRemoteOnly`); `mode=max` to every
//! result the solve met. Records without inputs (sources, content keys) carry no result,
//! as BuildKit does by default (`ExportRoots` false). A record one of whose inputs lost
//! every link is dropped, with the records built on it (BuildKit's `validate`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use async_trait::async_trait;
use kiln_proto::Digest;
use kiln_registry::manifest::layer_media_type;
use kiln_registry::{ContentStore, ExportLayer, RegistryClient};
use kiln_solver::scheduler::CacheExport;

use crate::config::{
    ANNOTATION_CREATED, ANNOTATION_UNCOMPRESSED, CACHE_CONFIG_MEDIA_TYPE, CacheConfig, CacheIndex,
    CacheInput, CacheLayer, CacheRecord, CacheResult, ChainedResult, Descriptor, MEDIA_DOCKER_LIST,
    MEDIA_OCI_INDEX,
};
use crate::error::CacheError;

/// Which results a cache export carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Min,
    Max,
}

/// Gives the layers of a result (the worker: snapshots exported as layers, or the
/// descriptors of a lazy ref).
#[async_trait]
pub trait ResultLayers<R>: Send + Sync {
    /// The chain of `r`, base first; with `create` false, `None` unless every layer
    /// exists as a blob already.
    async fn layers(&self, r: &R, create: bool) -> Result<Option<Vec<ExportLayer>>, CacheError>;
}

/// A marshalled cache: the config and the layers its `layers` list, in order.
#[derive(Clone, Debug)]
pub struct BuiltCache {
    pub config: CacheConfig,
    pub blobs: Vec<ExportLayer>,
}

/// Key IDs reachable from the target whose every input keeps a link, in dependency order.
fn valid_keys<R>(export: &CacheExport<R>) -> Vec<String> {
    fn visit<R>(
        export: &CacheExport<R>,
        id: &str,
        state: &mut HashMap<String, Option<bool>>,
        order: &mut Vec<String>,
    ) -> bool {
        if let Some(v) = state.get(id) {
            // `None` is a key being visited: a loop, which is not valid.
            return v.unwrap_or(false);
        }
        let Some(key) = export.keys.get(id) else {
            return false;
        };
        if key.digest.starts_with("random:") {
            state.insert(id.to_owned(), Some(false));
            return false;
        }
        state.insert(id.to_owned(), None);
        let mut valid = true;
        for deps in &key.deps {
            let mut any = false;
            for d in deps {
                if visit(export, &d.key, state, order) {
                    any = true;
                }
            }
            valid &= any;
        }
        state.insert(id.to_owned(), Some(valid));
        if valid {
            order.push(id.to_owned());
        }
        valid
    }
    let mut state = HashMap::new();
    let mut order = Vec::new();
    for t in &export.target {
        visit(export, t, &mut state, &mut order);
    }
    order
}

/// Builds the cache config of `export` in `mode`.
pub async fn build<R: Send + Sync>(
    export: &CacheExport<R>,
    mode: Mode,
    layers_of: &dyn ResultLayers<R>,
) -> Result<BuiltCache, CacheError> {
    let order = valid_keys(export);
    let index_of: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let targets: BTreeSet<&str> = export.target.iter().map(String::as_str).collect();
    let mut records = Vec::with_capacity(order.len());
    let mut layers: Vec<CacheLayer> = Vec::new();
    let mut blobs: Vec<ExportLayer> = Vec::new();
    let mut chains: HashMap<String, usize> = HashMap::new();
    for id in &order {
        let key = &export.keys[id];
        let mut record = CacheRecord {
            digest: key.digest.clone(),
            inputs: key
                .deps
                .iter()
                .map(|deps| {
                    let mut inputs: Vec<CacheInput> = deps
                        .iter()
                        .filter_map(|d| {
                            index_of.get(d.key.as_str()).map(|i| CacheInput {
                                selector: d.selector.clone(),
                                link_index: *i as i64,
                            })
                        })
                        .collect();
                    inputs.sort_by(|a, b| {
                        (a.link_index, &a.selector).cmp(&(b.link_index, &b.selector))
                    });
                    inputs.dedup();
                    inputs
                })
                .collect(),
            ..Default::default()
        };
        if !key.deps.is_empty() {
            if let Some(result) = export.results.get(id) {
                let create = mode == Mode::Max || targets.contains(id.as_str());
                if let Some(chain) = layers_of.layers(&result.result, create).await? {
                    if !chain.is_empty() {
                        let mut parent: Option<(String, usize)> = None;
                        for layer in chain {
                            let chain_id = match &parent {
                                Some((p, _)) => format!("{}{p}", layer.digest),
                                None => layer.digest.as_str().to_owned(),
                            };
                            let index = match chains.get(&chain_id) {
                                Some(i) => *i,
                                None => {
                                    layers.push(CacheLayer {
                                        blob: layer.digest.as_str().to_owned(),
                                        parent_index: parent
                                            .as_ref()
                                            .map_or(-1, |(_, i)| *i as i64),
                                        annotations: None,
                                    });
                                    if !blobs.iter().any(|b| b.digest == layer.digest) {
                                        blobs.push(layer.clone());
                                    }
                                    chains.insert(chain_id.clone(), layers.len() - 1);
                                    layers.len() - 1
                                }
                            };
                            parent = Some((chain_id, index));
                        }
                        if let Some((_, top)) = parent {
                            record.results.push(CacheResult {
                                layer_index: top as i64,
                                created_at: crate::config::go_time_nanos(result.created_at),
                            });
                        }
                    }
                }
            }
        }
        records.push(record);
    }
    let mut config = CacheConfig { layers, records };
    sort_config(&mut config);
    // Blobs in the order of the sorted layers, once each.
    let by_digest: HashMap<String, ExportLayer> = blobs
        .into_iter()
        .map(|b| (b.digest.as_str().to_owned(), b))
        .collect();
    let mut ordered = Vec::new();
    let mut seen = BTreeSet::new();
    for l in &config.layers {
        if seen.insert(l.blob.clone()) {
            if let Some(b) = by_digest.get(&l.blob) {
                ordered.push(b.clone());
            }
        }
    }
    Ok(BuiltCache {
        config,
        blobs: ordered,
    })
}

/// BuildKit's `sortConfig`: layers by blob then parent, records by digest then inputs, so
/// the same cache gives the same bytes.
pub fn sort_config(cc: &mut CacheConfig) {
    let mut layer_order: Vec<usize> = (0..cc.layers.len()).collect();
    layer_order.sort_by(|&a, &b| {
        let (la, lb) = (&cc.layers[a], &cc.layers[b]);
        (la.blob.as_str(), la.parent_index).cmp(&(lb.blob.as_str(), lb.parent_index))
    });
    let mut new_layer = vec![0i64; cc.layers.len()];
    for (new, &old) in layer_order.iter().enumerate() {
        new_layer[old] = new as i64;
    }
    let remap_layer = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| new_layer.get(i).copied())
            .unwrap_or(-1)
    };
    let layers: Vec<CacheLayer> = layer_order
        .iter()
        .map(|&old| {
            let mut l = cc.layers[old].clone();
            if l.parent_index != -1 {
                l.parent_index = remap_layer(l.parent_index);
            }
            l
        })
        .collect();

    let records = &cc.records;
    let digest_of = |i: i64| -> &str {
        usize::try_from(i)
            .ok()
            .and_then(|i| records.get(i))
            .map_or("", |r| r.digest.as_str())
    };
    let mut record_order: Vec<usize> = (0..records.len()).collect();
    record_order.sort_by(|&a, &b| {
        let (ra, rb) = (&records[a], &records[b]);
        if ra.digest != rb.digest {
            return ra.digest.cmp(&rb.digest);
        }
        if ra.inputs.len() != rb.inputs.len() {
            return ra.inputs.len().cmp(&rb.inputs.len());
        }
        for (ia, ib) in ra.inputs.iter().zip(&rb.inputs) {
            if ia.len() != ib.len() {
                return ia.len().cmp(&ib.len());
            }
            for (a, b) in ia.iter().zip(ib) {
                if a.selector != b.selector {
                    return a.selector.cmp(&b.selector);
                }
                let (da, db) = (digest_of(a.link_index), digest_of(b.link_index));
                if da != db {
                    return da.cmp(db);
                }
            }
        }
        std::cmp::Ordering::Equal
    });
    let mut new_record = vec![0i64; records.len()];
    for (new, &old) in record_order.iter().enumerate() {
        new_record[old] = new as i64;
    }
    let sorted: Vec<CacheRecord> = record_order
        .iter()
        .map(|&old| {
            let mut r = records[old].clone();
            for res in &mut r.results {
                res.layer_index = remap_layer(res.layer_index);
            }
            for chained in &mut r.chained_results {
                for l in &mut chained.layer_indexes {
                    *l = remap_layer(*l);
                }
            }
            for inputs in &mut r.inputs {
                for input in inputs.iter_mut() {
                    input.link_index = usize::try_from(input.link_index)
                        .ok()
                        .and_then(|i| new_record.get(i).copied())
                        .unwrap_or(-1);
                }
                inputs.sort_by_key(|i| i.link_index);
            }
            r
        })
        .collect();
    cc.layers = layers;
    cc.records = sorted;
}

/// The bytes of a cache: config, index, and the descriptors of both.
#[derive(Clone, Debug)]
pub struct CacheBlobs {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub index: Vec<u8>,
    pub index_digest: Digest,
    pub index_media_type: &'static str,
}

/// Marshals the config and the index BuildKit publishes (`oci` picks OCI media types).
pub fn marshal(built: &BuiltCache, oci: bool) -> Result<CacheBlobs, CacheError> {
    let config = serde_json::to_vec(&built.config).map_err(|e| CacheError::Format {
        what: "cache config".into(),
        reason: e.to_string(),
    })?;
    let config_digest = Digest::of(&config);
    let mut manifests: Vec<Descriptor> = built
        .blobs
        .iter()
        .map(|b| Descriptor {
            media_type: layer_media_type(&b.media_type, oci),
            digest: b.digest.as_str().to_owned(),
            size: i64::try_from(b.size).unwrap_or(i64::MAX),
            annotations: BTreeMap::from([
                (
                    ANNOTATION_CREATED.to_owned(),
                    crate::config::go_time_nanos(b.created_at),
                ),
                (
                    ANNOTATION_UNCOMPRESSED.to_owned(),
                    b.diff_id.as_str().to_owned(),
                ),
            ]),
        })
        .collect();
    manifests.push(Descriptor {
        media_type: CACHE_CONFIG_MEDIA_TYPE.to_owned(),
        digest: config_digest.as_str().to_owned(),
        size: config.len() as i64,
        annotations: BTreeMap::new(),
    });
    let index_media_type = if oci {
        MEDIA_OCI_INDEX
    } else {
        MEDIA_DOCKER_LIST
    };
    let index = serde_json::to_vec(&CacheIndex {
        schema_version: 2,
        media_type: index_media_type.to_owned(),
        manifests,
    })
    .map_err(|e| CacheError::Format {
        what: "cache index".into(),
        reason: e.to_string(),
    })?;
    Ok(CacheBlobs {
        config_digest,
        config,
        index_digest: Digest::of(&index),
        index,
        index_media_type,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes the cache into `dir` as BuildKit's `type=local` does: blobs under
/// `blobs/sha256/`, and `index.json` naming the index by `tag`.
pub async fn write_local(
    dir: &Path,
    tag: &str,
    built: &BuiltCache,
    oci: bool,
) -> Result<Digest, CacheError> {
    let blobs = marshal(built, oci)?;
    let blob_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blob_dir).map_err(io_err(&blob_dir))?;
    for layer in &built.blobs {
        let dest = blob_dir.join(layer.digest.hex());
        if dest.is_file() {
            continue;
        }
        let src = layer.local_path().await.map_err(|e| CacheError::Image {
            cache: "cache export".into(),
            source: Box::new(e),
        })?;
        let temp = blob_dir.join(format!(".tmp-{}", layer.digest.hex()));
        std::fs::copy(&src, &temp).map_err(io_err(&src))?;
        std::fs::rename(&temp, &dest).map_err(io_err(&dest))?;
    }
    for (digest, bytes) in [
        (&blobs.config_digest, &blobs.config),
        (&blobs.index_digest, &blobs.index),
    ] {
        let dest = blob_dir.join(digest.hex());
        std::fs::write(&dest, bytes).map_err(io_err(&dest))?;
    }
    let index_path = dir.join("index.json");
    let mut top: CacheIndex = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CacheError::Format {
            what: index_path.display().to_string(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheIndex::default(),
        Err(e) => return Err(io_err(&index_path)(e)),
    };
    top.schema_version = 2;
    let ref_name = kiln_registry::layout::ANNOTATION_REF_NAME;
    top.manifests
        .retain(|m| m.annotations.get(ref_name).map(String::as_str) != Some(tag));
    top.manifests.push(Descriptor {
        media_type: blobs.index_media_type.to_owned(),
        digest: blobs.index_digest.as_str().to_owned(),
        size: blobs.index.len() as i64,
        annotations: BTreeMap::from([(ref_name.to_owned(), tag.to_owned())]),
    });
    let bytes = serde_json::to_vec(&top).map_err(|e| CacheError::Format {
        what: index_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let temp = dir.join(".index.json.tmp");
    std::fs::write(&temp, bytes).map_err(io_err(&temp))?;
    std::fs::rename(&temp, &index_path).map_err(io_err(&index_path))?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&layout))?;
    }
    Ok(blobs.index_digest)
}

/// Pushes the cache to `repo:tag` as BuildKit's `type=registry` does: layers, config,
/// then the index as the tag's manifest.
pub async fn push_registry(
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    built: &BuiltCache,
    oci: bool,
    content: Option<&ContentStore>,
) -> Result<Digest, CacheError> {
    let blobs = marshal(built, oci)?;
    let push_err = |source| CacheError::Push {
        cache: format!("{}/{repo}:{tag}", client.name()),
        source,
    };
    for layer in &built.blobs {
        kiln_registry::push_layer(client, repo, layer, content)
            .await
            .map_err(push_err)?;
    }
    kiln_registry::push_bytes(client, repo, &blobs.config_digest, &blobs.config)
        .await
        .map_err(push_err)?;
    let err = |source| CacheError::Client {
        cache: format!("{}/{repo}:{tag}", client.name()),
        source,
    };
    client
        .put_manifest(repo, tag, blobs.index_media_type, &blobs.index)
        .await
        .map_err(err)?;
    Ok(blobs.index_digest)
}

/// The inline cache of an image whose layers are `image_layers` (blob digests, base
/// first): BuildKit's `ExportForLayers`, the records JSON (empty when no result of the
/// cache is made of the image's layers).
pub fn inline_records(
    built: &BuiltCache,
    image_layers: &[Digest],
) -> Result<Option<Vec<u8>>, CacheError> {
    let image: Vec<&str> = image_layers.iter().map(Digest::as_str).collect();
    let position: HashMap<&str, usize> = image.iter().enumerate().map(|(i, d)| (*d, i)).collect();
    let blobs_of = |mut idx: i64| -> Vec<&str> {
        let mut out = Vec::new();
        let mut guard = 0;
        while idx != -1 && guard <= built.config.layers.len() {
            let Some(l) = usize::try_from(idx)
                .ok()
                .and_then(|i| built.config.layers.get(i))
            else {
                break;
            };
            out.push(l.blob.as_str());
            idx = l.parent_index;
            guard += 1;
        }
        out.reverse();
        out
    };
    let mut any = false;
    let mut records = built.config.records.clone();
    for r in &mut records {
        let mut kept = Vec::new();
        for res in &r.results {
            let chain = blobs_of(res.layer_index);
            if chain.iter().any(|b| !position.contains_key(b)) {
                continue;
            }
            any = true;
            if chain.len() <= image.len() && chain.iter().zip(&image).all(|(a, b)| a == b) {
                kept.push(CacheResult {
                    layer_index: chain.len() as i64 - 1,
                    created_at: res.created_at.clone(),
                });
            } else {
                r.chained_results.push(ChainedResult {
                    layer_indexes: chain.iter().map(|b| position[b] as i64).collect(),
                    created_at: res.created_at.clone(),
                });
            }
        }
        r.results = kept;
    }
    if !any {
        tracing::warn!("failed to match any cache with layers");
        return Ok(None);
    }
    serde_json::to_vec(&records)
        .map(Some)
        .map_err(|e| CacheError::Format {
            what: "inline cache".into(),
            reason: e.to_string(),
        })
}
