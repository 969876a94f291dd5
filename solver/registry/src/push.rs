//! Sending blobs to a registry, as containerd's pusher does for buildctl: a layer is
//! described by an [`ExportLayer`] (a checked file, or a blob still on a registry or in a
//! layout) and sent only when the target repository lacks it — an existence check
//! (`HEAD`), then a cross-repository mount from a repository of the same registry known
//! to hold it (where it was pulled from or pushed to before), then a chunked upload (the
//! bytes of a remote blob are fetched first). Where a blob went is recorded in the content
//! store, so the next push to another repository mounts it. Manifests go last, through
//! [`RegistryClient::put_manifest`].

use std::path::PathBuf;
use std::sync::Arc;

use kiln_proto::Digest;

use crate::client::{ClientError, RegistryClient};
use crate::content::{BlobOrigin, ContentStore};
use crate::error::ImageError;
use crate::resolve::Fetcher;

/// Errors from pushing blobs.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{registry}/{repo}: pushing blob {digest}: fetching its bytes: {source}")]
    Fetch {
        registry: String,
        repo: String,
        digest: Digest,
        #[source]
        source: Box<ImageError>,
    },
}

/// Where a layer's bytes are.
#[derive(Clone, Debug)]
pub enum LayerBlob {
    /// A complete, checked file (the content store, an OCI layout, a temporary export).
    File(PathBuf),
    /// Not downloaded: fetched on first need (or mounted when it goes back to a
    /// repository of its registry).
    Remote(Arc<Fetcher>),
}

/// One layer of a result's chain, as exports see it.
#[derive(Clone, Debug)]
pub struct ExportLayer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Unix nanoseconds (BuildKit's `buildkit/createdat`).
    pub created_at: i64,
    pub blob: LayerBlob,
    /// Repositories known to hold the blob (mount sources), most recent first.
    pub origins: Vec<BlobOrigin>,
}

impl ExportLayer {
    /// A readable path of the complete blob: the file, or the blob fetched into the
    /// content store (or checked in its layout) first.
    pub async fn local_path(&self) -> Result<PathBuf, ImageError> {
        match &self.blob {
            LayerBlob::File(path) => Ok(path.clone()),
            LayerBlob::Remote(fetcher) => fetcher.local_path(&self.digest, Some(self.size)).await,
        }
    }
}

/// How a blob got to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository had it.
    Present,
    /// Mounted from another repository of the registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// Makes sure `repo` on `client`'s registry has `layer`; `content` (when given) learns
/// that it is there.
pub async fn push_layer(
    client: &RegistryClient,
    repo: &str,
    layer: &ExportLayer,
    content: Option<&ContentStore>,
) -> Result<BlobPush, PushError> {
    let how = push_layer_inner(client, repo, layer).await?;
    if let Some(content) = content {
        let origin = BlobOrigin {
            registry: client.name().to_owned(),
            repository: repo.to_owned(),
        };
        if let Err(e) = content.add_origin(&layer.digest, &origin) {
            tracing::warn!("recording where {} went: {e}", layer.digest);
        }
    }
    tracing::debug!("{}/{repo}: blob {}: {how:?}", client.name(), layer.digest);
    Ok(how)
}

async fn push_layer_inner(
    client: &RegistryClient,
    repo: &str,
    layer: &ExportLayer,
) -> Result<BlobPush, PushError> {
    if client.blob_exists(repo, &layer.digest).await?.is_some() {
        return Ok(BlobPush::Present);
    }
    for origin in &layer.origins {
        if origin.registry == client.name()
            && origin.repository != repo
            && client
                .mount_blob(repo, &origin.repository, &layer.digest)
                .await?
        {
            return Ok(BlobPush::Mounted);
        }
    }
    let path = layer
        .local_path()
        .await
        .map_err(|source| PushError::Fetch {
            registry: client.name().to_owned(),
            repo: repo.to_owned(),
            digest: layer.digest.clone(),
            source: Box::new(source),
        })?;
    client
        .push_blob_file(repo, &layer.digest, layer.size, &path)
        .await?;
    Ok(BlobPush::Uploaded)
}

/// Makes sure `repo` has the small blob `bytes` (a config): checked, then uploaded.
pub async fn push_bytes(
    client: &RegistryClient,
    repo: &str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<BlobPush, PushError> {
    if client.blob_exists(repo, digest).await?.is_some() {
        return Ok(BlobPush::Present);
    }
    client.push_blob_bytes(repo, digest, bytes).await?;
    Ok(BlobPush::Uploaded)
}
