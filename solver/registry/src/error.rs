//! The crate's error: what went wrong resolving, keying or pulling an image, naming the
//! image and, where there is one, the layer or config.

use kiln_proto::Digest;

use crate::{auth, client, content, hosts, layout, manifest, reference, registry};

/// Errors from resolving, keying and pulling images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Identifier(#[from] reference::IdentifierError),
    #[error(transparent)]
    Hosts(#[from] hosts::HostsError),
    #[error(transparent)]
    Credentials(#[from] auth::CredentialsError),
    #[error(transparent)]
    Content(#[from] content::ContentError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("{image}: {message}")]
    Resolve { image: String, message: String },
    #[error("{image}: no match for platform {platform} in index {index}")]
    NoPlatform {
        image: String,
        index: Digest,
        platform: String,
    },
    #[error("{image}: image config {digest}: {message}")]
    BadConfig {
        image: String,
        digest: Digest,
        message: String,
    },
    #[error("{image}: image has {layers} layers, limit is {limit}")]
    LayerLimit {
        image: String,
        layers: usize,
        limit: usize,
    },
    #[error("{image}: the config lists {diff_ids} diff ids but the manifest {layers} layers")]
    LayerCount {
        image: String,
        diff_ids: usize,
        layers: usize,
    },
    #[error("{image}: an image source has CacheMaps 0 and 1, not {index}")]
    CacheMapIndex { image: String, index: usize },
    #[error("{image}: layer {layer}: {source}")]
    Snapshot {
        image: String,
        layer: Digest,
        // Boxed: the snapshotter's error is large and this enum travels in every Result.
        #[source]
        source: Box<kiln_snapshotter::Error>,
    },
}
