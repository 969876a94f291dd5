//! Fetching one repository's manifests and blobs through the [`RegistryClient`], every
//! body checked against its digest and kept in the [`ContentStore`] (with the repository
//! it came from, for mounts when it is pushed), which is consulted first, so nothing
//! stored is fetched twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures_util::StreamExt as _;
use kiln_proto::Digest;
use oci_client::Reference;

use super::client::{ClientError, RegistryClient};
use super::content::{BlobOrigin, ContentError, ContentStore};
use super::manifest::ACCEPTED_MANIFESTS;

/// Errors from talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{reference}: reading {digest}: {reason}")]
    Stream {
        reference: String,
        digest: Digest,
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

/// Counts of bodies this fetcher downloaded (manifests, configs, layers).
#[derive(Debug, Default)]
pub struct FetchStats {
    pub downloads: AtomicUsize,
    pub bytes: AtomicU64,
}

/// One repository on one registry.
pub struct RegistryFetcher {
    client: Arc<RegistryClient>,
    reference: Reference,
    content: ContentStore,
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
    /// A fetcher for `reference`'s repository through `client` (its registry's).
    pub fn new(reference: &Reference, client: Arc<RegistryClient>, content: ContentStore) -> Self {
        RegistryFetcher {
            client,
            reference: reference.clone(),
            content,
            stats: FetchStats::default(),
        }
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    fn repo(&self) -> &str {
        self.reference.repository()
    }

    /// The registry client.
    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    /// What the reference's tag points to now (a `HEAD` request).
    pub async fn resolve_tag(&self) -> Result<Digest, RegistryError> {
        let tag = self.reference.tag().unwrap_or("latest");
        let (digest, _, _) = self
            .client
            .resolve(self.repo(), tag, ACCEPTED_MANIFESTS)
            .await?;
        Ok(digest)
    }

    /// Manifest or index `digest` of this repository, from the content store or fetched.
    pub async fn manifest(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        if let Some(bytes) = self.content.read(digest).await? {
            return Ok(bytes);
        }
        let (bytes, _) = self
            .client
            .get_manifest(
                self.repo(),
                digest.as_str(),
                ACCEPTED_MANIFESTS,
                MAX_SMALL_BLOB,
            )
            .await?;
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
        // A dropped connection mid-body starts the download again (the request itself is
        // retried by the client).
        let mut attempt = 0;
        loop {
            match self.fetch_once(digest, size, progress).await {
                Err(RegistryError::Stream { .. }) if attempt < 3 => attempt += 1,
                other => return other,
            }
        }
    }

    async fn fetch_once(
        &self,
        digest: &Digest,
        size: Option<u64>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), RegistryError> {
        let response = self.client.get_blob(self.repo(), digest).await?;
        let mut stream = response.bytes_stream();
        let mut writer = self.content.writer(digest, size).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| RegistryError::Stream {
                reference: self.name(),
                digest: digest.clone(),
                reason: super::client::transport_error(self.client.name(), "downloading", &e)
                    .to_string(),
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
        let origin = BlobOrigin {
            registry: self.client.name().to_owned(),
            repository: self.repo().to_owned(),
        };
        if let Err(e) = self.content.add_origin(digest, &origin) {
            tracing::warn!("recording where {digest} came from: {e}");
        }
        self.client.count_download(written);
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
