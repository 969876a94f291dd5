//! Fetching from a registry through `oci-client`: one client per registry host with that
//! host's transport ([`super::hosts`]) and credentials ([`super::auth`]), every body checked
//! against its digest and kept in the [`ContentStore`], which is consulted first, so nothing
//! stored is fetched twice.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use kiln_proto::Digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::auth::Credentials;
use super::content::{ContentError, ContentStore};
use super::hosts::{RegistryHosts, Transport};
use super::manifest::ACCEPTED_MANIFESTS;

/// Errors from talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference}: {source}")]
    Distribution {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{reference}: reading {digest}: {source}")]
    Stream {
        reference: String,
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("{reference}: the registry answered digest {value:?}: {reason}")]
    BadDigest {
        reference: String,
        value: String,
        reason: String,
    },
    #[error("{reference}: {what} {digest} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        reference: String,
        what: &'static str,
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error(transparent)]
    Content(#[from] ContentError),
}

/// Largest manifest or config fetched into memory.
pub const MAX_SMALL_BLOB: u64 = 16 << 20;

/// Counts of bodies downloaded (manifests, configs, layers), for progress and tests.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub downloads: AtomicUsize,
    pub bytes: AtomicU64,
}

/// One repository on one registry.
pub struct RegistryFetcher {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    content: ContentStore,
    authed: tokio::sync::OnceCell<()>,
    pub(crate) stats: FetchStats,
}

impl std::fmt::Debug for RegistryFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryFetcher")
            .field("reference", &self.reference.whole())
            .finish_non_exhaustive()
    }
}

impl RegistryFetcher {
    /// A fetcher for `reference`'s repository.
    pub fn new(
        reference: &Reference,
        hosts: &RegistryHosts,
        credentials: &Credentials,
        content: ContentStore,
    ) -> Self {
        let host = reference.registry();
        let transport = hosts.transport(host);
        let config = ClientConfig {
            protocol: match transport {
                Transport::Http => ClientProtocol::Http,
                Transport::Https | Transport::HttpsInsecure => ClientProtocol::Https,
            },
            accept_invalid_certificates: transport == Transport::HttpsInsecure,
            // kiln picks the platform itself (manifest::select_platform).
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            // A stalled transfer fails instead of hanging the build.
            read_timeout: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        RegistryFetcher {
            client: Client::new(config),
            reference: reference.clone(),
            auth: credentials.for_host(host),
            content,
            authed: tokio::sync::OnceCell::new(),
            stats: FetchStats::default(),
        }
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    fn distribution(&self) -> impl FnOnce(OciDistributionError) -> RegistryError + '_ {
        move |source| RegistryError::Distribution {
            reference: self.name(),
            source,
        }
    }

    /// Makes sure the client has the credentials before a direct blob request (manifest
    /// requests set them up themselves).
    async fn ensure_auth(&self) {
        self.authed
            .get_or_init(|| async {
                self.client
                    .store_auth_if_needed(self.reference.resolve_registry(), &self.auth)
                    .await;
            })
            .await;
    }

    fn parse_digest(&self, value: &str) -> Result<Digest, RegistryError> {
        value
            .parse::<Digest>()
            .map_err(|e| RegistryError::BadDigest {
                reference: self.name(),
                value: value.to_owned(),
                reason: e.to_string(),
            })
    }

    /// What the reference's tag points to now (a `HEAD` request).
    pub async fn resolve_tag(&self) -> Result<Digest, RegistryError> {
        let digest = self
            .client
            .fetch_manifest_digest(&self.reference, &self.auth)
            .await
            .map_err(self.distribution())?;
        self.parse_digest(&digest)
    }

    /// Manifest or index `digest` of this repository, from the content store or fetched.
    pub async fn manifest(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        if let Some(bytes) = self.content.read(digest).await? {
            return Ok(bytes);
        }
        let by_digest = self.reference.clone_with_digest(digest.as_str().to_owned());
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&by_digest, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(self.distribution())?;
        self.count(bytes.len() as u64);
        // The content store checks the digest before keeping anything.
        self.content.write(digest, &bytes).await?;
        Ok(bytes)
    }

    /// A small blob (a config), from the content store or fetched.
    pub async fn small_blob(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, RegistryError> {
        if let Some(bytes) = self.content.read(digest).await? {
            return Ok(bytes);
        }
        if size > MAX_SMALL_BLOB {
            return Err(RegistryError::TooLarge {
                reference: self.name(),
                what: "config",
                digest: digest.clone(),
                size,
                limit: MAX_SMALL_BLOB,
            });
        }
        self.fetch_to_store(digest, Some(size), &mut |_| {}).await?;
        match self.content.read(digest).await? {
            Some(bytes) => Ok(bytes),
            None => Err(ContentError::Io {
                op: "reading",
                path: self.content.path(digest),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into()),
        }
    }

    /// Makes sure blob `digest` is in the content store, downloading it if needed;
    /// `progress` gets the bytes received so far. Returns whether it was downloaded.
    pub async fn ensure_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<bool, RegistryError> {
        if self.content.contains(digest) {
            return Ok(false);
        }
        self.fetch_to_store(digest, size, progress).await?;
        Ok(true)
    }

    async fn fetch_to_store(
        &self,
        digest: &Digest,
        size: Option<u64>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), RegistryError> {
        self.ensure_auth().await;
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, digest.as_str())
            .await
            .map_err(self.distribution())?;
        let mut writer = self.content.writer(digest, size).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Stream {
                reference: self.name(),
                digest: digest.clone(),
                source,
            })?;
            writer.write(&chunk).await?;
            if let Some(limit) = size.filter(|s| writer.written() > *s) {
                // More than the descriptor promised: stop reading now.
                return Err(ContentError::SizeMismatch {
                    digest: digest.clone(),
                    expected: limit,
                    actual: writer.written(),
                }
                .into());
            }
            progress(writer.written());
        }
        let written = writer.written();
        writer.commit().await?;
        self.count(written);
        Ok(())
    }

    fn count(&self, bytes: u64) {
        self.stats.downloads.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The content store blobs land in.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }
}
