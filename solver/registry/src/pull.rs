//! Pulling a resolved image into the snapshot store: one committed snapshot per layer,
//! base first, each imported with its media type and diff ID so a chain already stored
//! (from any image, or an earlier pull) is reused without fetching or reading its blob.

use kiln_proto::Digest;
use kiln_snapshotter::{ImmutableRef, ImportOptions, Snapshotter};

use super::manifest::Descriptor;
use super::resolve::{Fetcher, ResolvedImage};
use crate::error::ImageError;

/// What is happening to one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullState {
    /// Its chain is already in the snapshot store: nothing to fetch or extract.
    Cached,
    /// Being downloaded into the content store (`done` bytes of `total`).
    Downloading,
    /// Its blob in an OCI layout is being checked against its digest.
    Verifying,
    /// Being applied as a new snapshot.
    Extracting,
    /// Imported.
    Done,
}

/// One progress report: `(layer digest, bytes done, total)` and the state.
#[derive(Clone, Copy, Debug)]
pub struct PullProgress<'a> {
    pub layer: &'a Digest,
    pub done: u64,
    pub total: u64,
    pub state: PullState,
}

/// Receives pull progress (called from the pulling task; keep it cheap).
pub type ProgressFn<'a> = dyn Fn(&PullProgress<'_>) + Send + Sync + 'a;

/// The result of a pull.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// The top layer's snapshot; `None` for an image without layers (scratch).
    pub top: Option<ImmutableRef>,
    /// Layers applied as new snapshots.
    pub imported: usize,
    /// Layers whose chain was already stored.
    pub reused: usize,
}

fn report(progress: &ProgressFn<'_>, layer: &Descriptor, done: u64, state: PullState) {
    progress(&PullProgress {
        layer: &layer.digest,
        done,
        total: layer.size,
        state,
    });
}

async fn blocking<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Resolve {
            image: name.to_owned(),
            message: format!("the pull task failed: {e}"),
        })?
}

/// Imports the layers of `image` (the first `limit` of them, when given) into
/// `snapshotter` and returns the top snapshot.
pub async fn pull(
    snapshotter: &Snapshotter,
    image: &ResolvedImage,
    limit: Option<usize>,
    progress: &ProgressFn<'_>,
) -> Result<Pulled, ImageError> {
    let summary = image
        .config
        .parsed
        .as_ref()
        .map_err(|message| ImageError::BadConfig {
            image: image.name.clone(),
            digest: image.config.digest.clone(),
            message: message.clone(),
        })?;
    if summary.diff_ids.len() != image.layers.len() {
        return Err(ImageError::LayerCount {
            image: image.name.clone(),
            diff_ids: summary.diff_ids.len(),
            layers: image.layers.len(),
        });
    }
    let count = match limit {
        Some(limit) if limit > image.layers.len() => {
            return Err(ImageError::LayerLimit {
                image: image.name.clone(),
                layers: image.layers.len(),
                limit,
            });
        }
        Some(limit) => limit,
        None => image.layers.len(),
    };
    let mut layers = Vec::with_capacity(count);
    for (layer, diff_id) in image.layers[..count].iter().zip(&summary.diff_ids) {
        let diff_id = diff_id
            .parse::<Digest>()
            .map_err(|e| ImageError::BadConfig {
                image: image.name.clone(),
                digest: image.config.digest.clone(),
                message: format!("diff id {diff_id:?}: {e}"),
            })?;
        layers.push((layer.clone(), diff_id));
    }
    pull_layers(snapshotter, &image.fetcher, &image.name, &layers, progress).await
}

/// Imports `layers` (descriptor and diff ID, base first) from `fetcher` into `snapshotter`
/// and returns the top snapshot; a chain already stored is reused without fetching.
/// `name` says where the layers come from, in messages.
pub async fn pull_layers(
    snapshotter: &Snapshotter,
    fetcher: &Fetcher,
    name: &str,
    layers: &[(Descriptor, Digest)],
    progress: &ProgressFn<'_>,
) -> Result<Pulled, ImageError> {
    let mut parent: Option<ImmutableRef> = None;
    let mut chain: Option<String> = None;
    let mut pulled = Pulled {
        top: None,
        imported: 0,
        reused: 0,
    };
    for (layer, diff_id) in layers {
        let chain_id = kiln_snapshotter::layer::chain_id(chain.as_deref(), diff_id.as_str());
        let snap_err = |source| ImageError::Snapshot {
            image: name.to_owned(),
            layer: layer.digest.clone(),
            source: Box::new(source),
        };
        let existing = {
            let (store, id) = (snapshotter.clone(), chain_id.clone());
            blocking(name, move || Ok(store.get_by_chain_id(&id)))
                .await?
                .map_err(snap_err)?
        };
        if let Some(existing) = existing {
            report(progress, layer, layer.size, PullState::Cached);
            pulled.reused += 1;
            parent = Some(existing);
            chain = Some(chain_id);
            continue;
        }
        let file = {
            if let Fetcher::Layout(_) = fetcher {
                report(progress, layer, 0, PullState::Verifying);
            }
            let mut on_bytes = |done: u64| report(progress, layer, done, PullState::Downloading);
            fetcher
                .open_blob(&layer.digest, Some(layer.size), &mut on_bytes)
                .await?
        };
        report(progress, layer, 0, PullState::Extracting);
        let options = ImportOptions {
            media_type: Some(layer.media_type.clone()).filter(|m| !m.is_empty()),
            diff_id: Some(diff_id.as_str().to_owned()),
            description: format!("pulled from {name}: layer {}", layer.digest),
            ..ImportOptions::default()
        };
        let imported = {
            let (store, base) = (snapshotter.clone(), parent.clone());
            blocking(name, move || {
                Ok(store.import_layer(base.as_ref(), std::io::BufReader::new(file), &options))
            })
            .await?
            .map_err(snap_err)?
        };
        report(progress, layer, layer.size, PullState::Done);
        pulled.imported += 1;
        parent = Some(imported);
        chain = Some(chain_id);
    }
    pulled.top = parent;
    Ok(pulled)
}
