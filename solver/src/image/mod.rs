//! Image sources: `docker-image://` (a registry, through `oci-client`) and `oci-layout://`
//! (a local OCI layout the user maps to a store name).
//!
//! The worker wires these pieces into its `Op` for SourceOps:
//! 1. [`ImageSource::from_op`] parses the identifier and attributes (BuildKit's texts);
//! 2. [`ImageResolver::resolve`] finds the platform's manifest and config (content store
//!    first, registry or layout otherwise) → [`ResolvedImage`];
//! 3. [`cache_map`] gives CacheMap 0 (manifest digest + platform, `done = false`) and 1
//!    (ChainID of the layers, `done = true`) — exec-cachemap.md §7;
//! 4. [`pull`] imports the layers into the snapshot store and returns the top snapshot.
//!
//! Submodules: [`reference`] (identifiers), [`hosts`] (`kiln.toml` transports),
//! [`auth`] (Docker credentials), [`content`] (the blob store), [`manifest`] (manifest
//! parsing, platform choice), [`registry`] and [`layout`] (where blobs come from),
//! [`resolve`], [`cachemap`], [`pull`].

pub mod auth;
pub mod cachemap;
pub mod content;
pub mod hosts;
pub mod layout;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod resolve;

use kiln_proto::Digest;

pub use auth::Credentials;
pub use cachemap::cache_map;
pub use content::ContentStore;
pub use hosts::{RegistryHosts, Transport};
pub use pull::{ProgressFn, PullProgress, PullState, Pulled, pull};
pub use reference::{ImageIdentifier, ImageSource, OciLayoutIdentifier, RecordType, ResolveMode};
pub use resolve::{ImageConfig, ImageResolver, ResolvedImage};

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
