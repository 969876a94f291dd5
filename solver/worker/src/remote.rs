//! The worker's side of remote caches: imported results become lazy refs
//! ([`LazyLoader`]), a lazy ref is pulled into the snapshot store on first use
//! ([`materialize`]), and results are described as layer blobs for cache and image
//! exports ([`CacheLayers`]): a lazy ref by its remote descriptors (nothing downloaded),
//! a snapshot by the blob it was imported from or, failing that, by exporting it into the
//! content store once (its digests are recorded, so a later export reuses the blob).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use kiln_proto::Digest;
use kiln_registry::manifest::Descriptor;
use kiln_registry::{ExportLayer, LayerBlob};
use kiln_remotecache::{CacheError, ChainLoader, RemoteChain, ResultLayers};
use kiln_snapshotter::{Compression, ImmutableRef};
use kiln_solver::op::OpError;

use crate::refs::KilnRef;
use crate::state::{Inner, blocking, failed};

/// The snapshot of `r`, pulling its layers when it is lazy (once, shared by every user).
pub(crate) async fn materialize(inner: &Arc<Inner>, r: &KilnRef) -> Result<ImmutableRef, OpError> {
    let snapshot = r
        .cell()
        .get_or_try_init(|| async {
            let Some(chain) = r.remote() else {
                return Err(failed(
                    "internal error: a ref with neither snapshot nor layers",
                ));
            };
            pull_chain(inner, chain).await
        })
        .await?;
    Ok(snapshot.clone())
}

async fn pull_chain(inner: &Arc<Inner>, chain: &RemoteChain) -> Result<ImmutableRef, OpError> {
    let mut layers: Vec<(Descriptor, Digest)> = Vec::with_capacity(chain.layers.len());
    for l in &chain.layers {
        let diff_id = l.diff_id.clone().ok_or_else(|| {
            failed(format!(
                "{}: layer {} has no {} annotation",
                chain.source,
                l.descriptor.digest,
                kiln_remotecache::config::ANNOTATION_UNCOMPRESSED
            ))
        })?;
        layers.push((l.descriptor.clone(), diff_id));
    }
    let pulled = kiln_registry::pull_layers(
        &inner.snapshotter,
        &chain.fetcher,
        &chain.source,
        &layers,
        &|_| {},
    )
    .await
    .map_err(failed)?;
    match pulled.top {
        Some(top) => Ok(top),
        None => {
            let inner = inner.clone();
            let description = format!("empty result of {}", chain.source);
            blocking(move || inner.empty_snapshot(description)).await
        }
    }
}

/// Makes imported results lazy refs.
#[derive(Debug, Default)]
pub struct LazyLoader;

#[async_trait]
impl ChainLoader<KilnRef> for LazyLoader {
    async fn load(&self, chain: &RemoteChain) -> Result<KilnRef, OpError> {
        Ok(KilnRef::lazy(chain.clone()))
    }
}

/// Describes results as layer blobs for exports.
#[derive(Debug, Clone)]
pub struct CacheLayers {
    inner: Arc<Inner>,
}

impl CacheLayers {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        CacheLayers { inner }
    }
}

fn nanos(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn cache_err(what: String, e: impl std::fmt::Display) -> CacheError {
    CacheError::Cache {
        cache: what,
        message: e.to_string(),
    }
}

/// The layer blobs of a snapshot chain, base first: each layer's blob when the content
/// store has it (a pulled layer keeps its registry blob, whatever its compression), else
/// the layer exported with `create`'s compression; `None` without `create` when a layer
/// has no blob yet.
fn snapshot_layers(
    inner: &Inner,
    top: &ImmutableRef,
    create: Option<Compression>,
) -> Result<Option<Vec<ExportLayer>>, CacheError> {
    let content = inner.images.content().clone();
    let snapshotter = &inner.snapshotter;
    let mut chain: Vec<&ImmutableRef> = std::iter::once(top).chain(top.parents()).collect();
    chain.reverse();
    let mut out = Vec::with_capacity(chain.len());
    for layer in chain {
        let what = format!("snapshot {}", layer.id());
        let record = layer.record().map_err(|e| cache_err(what.clone(), e))?;
        let created_at = nanos(record.created_at);
        if let Some(info) = &record.layer {
            if let (Some(blob), Some(size)) = (&info.blob_digest, info.blob_size) {
                if let (Ok(digest), Ok(diff_id)) =
                    (blob.parse::<Digest>(), info.diff_id.parse::<Digest>())
                {
                    if content.contains(&digest) {
                        out.push(ExportLayer {
                            media_type: info
                                .media_type
                                .clone()
                                .unwrap_or_else(|| Compression::Gzip.media_type().to_owned()),
                            blob: LayerBlob::File(content.path(&digest)),
                            origins: content.origins(&digest),
                            digest,
                            size,
                            diff_id,
                            created_at,
                        });
                        continue;
                    }
                }
            }
        }
        let Some(compression) = create else {
            return Ok(None);
        };
        // Exported once into the content store, named by its digest afterwards.
        let dir = content.blobs_dir();
        let mut temp =
            tempfile::NamedTempFile::new_in(dir).map_err(|e| cache_err(what.clone(), e))?;
        let desc = snapshotter
            .export_layer(layer, temp.as_file_mut(), compression)
            .map_err(|e| cache_err(what.clone(), e))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| cache_err(what.clone(), e))?;
        let digest: Digest = desc
            .digest
            .parse()
            .map_err(|e| cache_err(what.clone(), e))?;
        let diff_id: Digest = desc
            .diff_id
            .parse()
            .map_err(|e| cache_err(what.clone(), e))?;
        let path = content.path(&digest);
        temp.persist(&path)
            .map_err(|e| cache_err(what.clone(), e.error))?;
        out.push(ExportLayer {
            media_type: desc.media_type.to_owned(),
            digest,
            size: desc.size,
            diff_id,
            created_at,
            blob: LayerBlob::File(path),
            origins: Vec::new(),
        });
    }
    Ok(Some(out))
}

impl CacheLayers {
    /// The layers of `r`, base first: a lazy ref's remote descriptors (nothing is
    /// downloaded), or each snapshot's blob, a layer without one exported with
    /// `create`'s compression first; `None` without `create` when a layer has no blob.
    pub async fn chain(
        &self,
        r: &KilnRef,
        create: Option<Compression>,
    ) -> Result<Option<Vec<ExportLayer>>, CacheError> {
        if let (None, Some(chain)) = (r.snapshot(), r.remote()) {
            let mut out = Vec::with_capacity(chain.layers.len());
            for l in &chain.layers {
                let Some(diff_id) = l.diff_id.clone() else {
                    return Ok(None);
                };
                out.push(ExportLayer {
                    media_type: l.descriptor.media_type.clone(),
                    digest: l.descriptor.digest.clone(),
                    size: l.descriptor.size,
                    diff_id,
                    created_at: l
                        .created_at
                        .as_deref()
                        .and_then(kiln_remotecache::config::nanos_of_go_time)
                        .unwrap_or(0),
                    blob: LayerBlob::Remote(chain.fetcher.clone()),
                    origins: chain.origin.iter().cloned().collect(),
                });
            }
            return Ok(Some(out));
        }
        let Some(top) = r.snapshot().cloned() else {
            return Ok(None);
        };
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || snapshot_layers(&inner, &top, create))
            .await
            .map_err(|e| cache_err("layer export".into(), e))?
    }
}

/// Cache exports take gzip layers, as BuildKit's cache exporters do by default.
#[async_trait]
impl ResultLayers<KilnRef> for CacheLayers {
    async fn layers(
        &self,
        r: &KilnRef,
        create: bool,
    ) -> Result<Option<Vec<ExportLayer>>, CacheError> {
        self.chain(r, create.then_some(Compression::Gzip)).await
    }
}
