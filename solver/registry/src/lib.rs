//! kiln-registry: image distribution. References and source identifiers
//! (`docker-image://`, `oci-layout://`), registry transports from `kiln.toml`, Docker
//! credentials, the registry client, OCI layouts, the content store of blobs, manifest
//! parsing and platform choice, pulls into the snapshot store, pushes of layer blobs
//! (existence checks, mounts, uploads), and the keys an image source is cached by.
//!
//! How an image source is served:
//! 1. [`ImageSource::from_op`] parses the identifier and attributes (BuildKit's texts);
//! 2. [`ImageResolver::resolve`] finds the platform's manifest and config (content store
//!    first, registry or layout otherwise) → [`ResolvedImage`];
//! 3. [`cache_key()`] gives the keys of CacheMap 0 (manifest digest + platform) and 1
//!    (ChainID of the layers) — exec-cachemap.md §7;
//! 4. [`pull()`] imports the layers into the snapshot store and returns the top snapshot.
//!
//! It knows nothing of the solver, its CacheMaps or ops.

pub mod auth;
pub mod cache_key;
pub mod client;
pub mod content;
mod error;
pub mod hosts;
pub mod layout;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod resolve;

pub use auth::{Auth, Credentials};
pub use cache_key::{ImageCacheKey, cache_key, chain_id, config_key, manifest_key_json};
pub use client::{ClientError, RegistryClient, RegistryClients};
pub use content::{BlobOrigin, ContentStore};
pub use error::ImageError;
pub use hosts::{RegistryHosts, Transport};
pub use pull::{ProgressFn, PullProgress, PullState, Pulled, pull, pull_layers};
pub use push::{BlobPush, ExportLayer, LayerBlob, PushError, push_bytes, push_layer};
pub use reference::{ImageIdentifier, ImageSource, OciLayoutIdentifier, RecordType, ResolveMode};
pub use registry::RegistryFetcher;
pub use resolve::{Fetcher, ImageConfig, ImageResolver, ResolvedImage};
