//! `--output type=image`: an assembled image sent to a registry as BuildKit's pusher
//! sends it — every layer only when the repository lacks it (existence check, then a
//! cross-repository mount, then a chunked upload: kiln-registry's `push_layer`), a few at
//! a time, then the config, and the manifest last, under the tag — or kept in kiln's
//! content store (`push=false`), named for `image.resolvemode=local`.

use futures_util::{StreamExt as _, TryStreamExt as _};
use kiln_registry::{BlobPush, ContentStore, RegistryClient};

use crate::error::ExportError;
use crate::image::{Image, ImageName};

/// Layers sent at once.
const PARALLEL: usize = 3;

/// What a push did with each blob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Layers the repository already had.
    pub present: usize,
    /// Layers mounted from another repository of the registry.
    pub mounted: usize,
    /// Layers uploaded.
    pub uploaded: usize,
}

/// Pushes `image` to `repo` on `client`'s registry under `reference` (a tag, or the
/// manifest's digest); `content` learns where the layers went.
pub async fn push(
    image: &Image,
    client: &RegistryClient,
    repo: &str,
    reference: &str,
    content: Option<&ContentStore>,
) -> Result<PushReport, ExportError> {
    let target = format!("{}/{repo}:{reference}", client.name());
    let err = |source| ExportError::Push {
        image: target.clone(),
        source,
    };
    let pushed: Vec<BlobPush> = futures_util::stream::iter(&image.layers)
        .map(|layer| kiln_registry::push_layer(client, repo, layer, content))
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
        .map_err(err)?;
    let mut report = PushReport::default();
    for how in pushed {
        match how {
            BlobPush::Present => report.present += 1,
            BlobPush::Mounted => report.mounted += 1,
            BlobPush::Uploaded => report.uploaded += 1,
        }
    }
    kiln_registry::push_bytes(client, repo, &image.config_digest, &image.config)
        .await
        .map_err(err)?;
    client
        .put_manifest(repo, reference, image.manifest_media_type, &image.manifest)
        .await
        .map_err(|source| err(source.into()))?;
    tracing::info!(
        "pushed {target} ({}): {} layers present, {} mounted, {} uploaded",
        image.manifest_digest,
        report.present,
        report.mounted,
        report.uploaded
    );
    Ok(report)
}

/// Keeps `image` in the content store: its config and manifest, its layers (a remote one
/// is fetched, as BuildKit completes an image it stores), and `name`'s tag pointing at it.
pub async fn store(
    image: &Image,
    content: &ContentStore,
    name: Option<&ImageName>,
) -> Result<(), ExportError> {
    for layer in &image.layers {
        layer
            .local_path()
            .await
            .map_err(|source| ExportError::Fetch {
                digest: layer.digest.clone(),
                source: Box::new(source),
            })?;
    }
    for (digest, bytes) in [
        (&image.config_digest, &image.config),
        (&image.manifest_digest, &image.manifest),
    ] {
        content
            .write(digest, bytes)
            .await
            .map_err(ExportError::Content)?;
    }
    if let Some(name) = name.filter(|n| !n.full.contains('@')) {
        content
            .set_tag(&name.full, &image.manifest_digest)
            .await
            .map_err(ExportError::Content)?;
    }
    Ok(())
}
