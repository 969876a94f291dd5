//! Resolving an image source for a platform: what the reference points to, the platform's
//! manifest (chosen from an index), and its config, from a registry (through the content
//! store) or from a local OCI layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kiln_proto::platform::{host_platform, normalize};
use kiln_proto::{Digest, pb};

use super::auth::Credentials;
use super::client::RegistryClients;
use super::content::ContentStore;
use super::hosts::RegistryHosts;
use super::layout::{LayoutError, OciLayout};
use super::manifest::{self, ConfigSummary, Descriptor, IndexEntry, Parsed};
use super::reference::{ImageSource, ResolveMode};
use super::registry::RegistryFetcher;
use crate::error::ImageError;

/// Indexes nested deeper than this are refused (containerd allows nesting; real images
/// use one level).
const MAX_INDEX_DEPTH: usize = 4;

/// Where an image's (or an imported cache's) blobs come from.
#[derive(Debug)]
pub enum Fetcher {
    Registry(Box<RegistryFetcher>),
    Layout(OciLayout),
}

impl Fetcher {
    /// A fetcher reading the OCI layout at `dir`.
    pub fn layout(dir: &Path) -> Result<Self, ImageError> {
        Ok(Fetcher::Layout(OciLayout::open(dir)?))
    }

    /// A fetcher for a repository on a registry.
    pub fn registry(fetcher: RegistryFetcher) -> Self {
        Fetcher::Registry(Box::new(fetcher))
    }

    /// A small blob (a manifest, a config), checked against its digest.
    pub async fn small_blob(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, ImageError> {
        match self {
            Fetcher::Registry(r) => Ok(r.small_blob(digest, size).await?),
            Fetcher::Layout(l) => Ok(l.read_blob(digest)?),
        }
    }

    /// A manifest or index by digest.
    pub async fn manifest(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        self.manifest_inner(digest).await
    }

    /// The path of blob `digest`, complete and checked: downloaded into the content store
    /// first, or verified in place in a layout.
    pub async fn local_path(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<PathBuf, ImageError> {
        match self {
            Fetcher::Registry(registry) => {
                registry.ensure_blob(digest, size, &mut |_| {}).await?;
                Ok(registry.content().path(digest))
            }
            Fetcher::Layout(layout) => {
                self.open_blob(digest, size, &mut |_| {}).await?;
                Ok(layout.blob_path(digest))
            }
        }
    }

    /// Opens blob `digest` (downloaded into the content store first, or verified in the
    /// layout), rewound.
    pub async fn open_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<std::fs::File, ImageError> {
        match self {
            Fetcher::Registry(registry) => {
                registry.ensure_blob(digest, size, progress).await?;
                let path = registry.content().path(digest);
                std::fs::File::open(&path).map_err(|source| {
                    ImageError::Content(super::content::ContentError::Io {
                        op: "opening",
                        path,
                        source,
                    })
                })
            }
            Fetcher::Layout(layout) => {
                let (layout, digest) = (layout.clone(), digest.clone());
                tokio::task::spawn_blocking(move || layout.open_verified(&digest, |_| {}))
                    .await
                    .map_err(|e| ImageError::Resolve {
                        image: "oci layout".to_owned(),
                        message: format!("the read task failed: {e}"),
                    })?
                    .map_err(ImageError::from)
            }
        }
    }

    async fn manifest_inner(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        match self {
            Fetcher::Registry(r) => Ok(r.manifest(digest).await?),
            Fetcher::Layout(l) => Ok(l.read_blob(digest)?),
        }
    }

    async fn config(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        match self {
            Fetcher::Registry(r) => Ok(r.small_blob(&desc.digest, desc.size).await?),
            Fetcher::Layout(l) => Ok(l.read_blob(&desc.digest)?),
        }
    }
}

/// An image config: its bytes, and what kiln reads from it when they parse.
#[derive(Clone, Debug)]
pub struct ImageConfig {
    pub digest: Digest,
    pub bytes: Vec<u8>,
    /// `Err` holds the JSON error when the config does not parse (BuildKit then keys the
    /// image by the config digest and fails only when pulling).
    pub parsed: Result<ConfigSummary, String>,
}

/// An image resolved for one platform.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The source as the user named it, for messages.
    pub name: String,
    /// What the reference resolved to (an index or a manifest): the digest BuildKit keys
    /// the image by (CacheMap index 0) and its pin.
    pub digest: Digest,
    /// The platform's manifest.
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
    pub config: ImageConfig,
    /// Layer descriptors, base first.
    pub layers: Vec<Descriptor>,
    /// The platform resolved for (normalised).
    pub platform: pb::Platform,
    pub(crate) fetcher: Arc<Fetcher>,
}

impl ResolvedImage {
    /// Bodies downloaded from a registry so far for this image (resolution and pulls),
    /// and their total size; always zero for OCI layouts.
    pub fn downloads(&self) -> (usize, u64) {
        match &*self.fetcher {
            Fetcher::Registry(r) => (
                r.stats.downloads.load(Ordering::Relaxed),
                r.stats.bytes.load(Ordering::Relaxed),
            ),
            Fetcher::Layout(_) => (0, 0),
        }
    }
}

/// Resolves image sources: owns the content store and the registry settings.
#[derive(Clone, Debug)]
pub struct ImageResolver {
    content: ContentStore,
    clients: RegistryClients,
    layouts: HashMap<String, PathBuf>,
}

impl ImageResolver {
    /// A resolver keeping blobs under `<root>/content`, reaching registries per `hosts`
    /// with `credentials`, and reading `oci-layout://` stores from `layouts` (store name →
    /// layout directory).
    pub fn new(
        root: &Path,
        hosts: RegistryHosts,
        credentials: Credentials,
        layouts: HashMap<String, PathBuf>,
    ) -> Result<Self, ImageError> {
        Ok(ImageResolver {
            content: ContentStore::open(root)?,
            clients: RegistryClients::new(hosts, credentials),
            layouts,
        })
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The registry clients of this resolver (shared tokens and statistics).
    pub fn clients(&self) -> &RegistryClients {
        &self.clients
    }

    /// Resolves `source` for `platform` (normalised again here, so a raw op platform is
    /// fine). A digest-pinned reference whose manifest and config are stored needs no
    /// network; a tag asks the registry (a `HEAD`) unless `image.resolvemode=local` and
    /// kiln resolved the tag before.
    pub async fn resolve(
        &self,
        source: &ImageSource,
        platform: &pb::Platform,
    ) -> Result<ResolvedImage, ImageError> {
        let platform = normalize(Some(platform), &host_platform());
        let name = source.to_string();
        let (fetcher, digest, media_type) = match source {
            ImageSource::DockerImage(id) => {
                let client = self.clients.get(id.reference.registry())?;
                let fetcher = RegistryFetcher::new(&id.reference, client, self.content.clone());
                let digest = match id.reference.digest() {
                    Some(d) => d.parse::<Digest>().map_err(|e| ImageError::Resolve {
                        image: name.clone(),
                        message: e.to_string(),
                    })?,
                    None => {
                        let tag_key = id.reference.whole();
                        let known = match id.resolve_mode {
                            ResolveMode::Local => self
                                .content
                                .tag(&tag_key)
                                .await?
                                .filter(|d| self.content.contains(d)),
                            ResolveMode::Default | ResolveMode::Pull => None,
                        };
                        match known {
                            Some(d) => d,
                            None => {
                                let d = fetcher.resolve_tag().await?;
                                self.content.set_tag(&tag_key, &d).await?;
                                d
                            }
                        }
                    }
                };
                (Fetcher::Registry(Box::new(fetcher)), digest, String::new())
            }
            ImageSource::OciLayout(id) => {
                let dir = self
                    .layouts
                    .get(&id.store)
                    .ok_or_else(|| LayoutError::UnknownStore(id.store.clone()))?;
                let layout = OciLayout::open(dir)?;
                let (digest, media_type) = layout.lookup(id)?;
                (Fetcher::Layout(layout), digest, media_type)
            }
        };
        let fetcher = Arc::new(fetcher);
        resolve_from(name, fetcher, digest, media_type, platform).await
    }
}

async fn resolve_from(
    name: String,
    fetcher: Arc<Fetcher>,
    top: Digest,
    top_media_type: String,
    platform: pb::Platform,
) -> Result<ResolvedImage, ImageError> {
    let mut digest = top.clone();
    let mut media_type = top_media_type;
    for _ in 0..MAX_INDEX_DEPTH {
        let bytes = fetcher.manifest(&digest).await?;
        match manifest::parse(&digest, &media_type, &bytes)? {
            Parsed::Manifest { config, layers } => {
                let config_bytes = fetcher.config(&config).await?;
                let parsed = ConfigSummary::parse(&config_bytes);
                return Ok(ResolvedImage {
                    name,
                    digest: top,
                    manifest_digest: digest,
                    manifest: bytes,
                    config: ImageConfig {
                        digest: config.digest,
                        bytes: config_bytes,
                        parsed,
                    },
                    layers,
                    platform,
                    fetcher,
                });
            }
            Parsed::Index(entries) => {
                let chosen = match manifest::select_platform(&entries, &platform) {
                    Some(e) => e.descriptor.clone(),
                    None => untagged_match(&fetcher, &entries, &platform)
                        .await?
                        .ok_or_else(|| ImageError::NoPlatform {
                            image: name.clone(),
                            index: digest.clone(),
                            platform: kiln_proto::platform::format(&platform),
                        })?,
                };
                digest = chosen.digest;
                media_type = chosen.media_type;
            }
        }
    }
    Err(ImageError::Resolve {
        image: name,
        message: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
    })
}

/// containerd also takes an index entry without a platform when its config says the
/// platform matches.
async fn untagged_match(
    fetcher: &Fetcher,
    entries: &[IndexEntry],
    platform: &pb::Platform,
) -> Result<Option<Descriptor>, ImageError> {
    for entry in entries.iter().filter(|e| e.platform.is_none()) {
        let d = &entry.descriptor;
        let bytes = fetcher.manifest(&d.digest).await?;
        if let Parsed::Manifest { config, .. } = manifest::parse(&d.digest, &d.media_type, &bytes)?
        {
            let config = fetcher.config(&config).await?;
            if let Ok(summary) = ConfigSummary::parse(&config) {
                if manifest::platform_matches(platform, &summary.platform()) {
                    return Ok(Some(d.clone()));
                }
            }
        }
    }
    Ok(None)
}
