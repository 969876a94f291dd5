//! The content store: registry blobs (manifests, configs, layers) by digest under
//! `<root>/content/blobs/sha256/<hex>`, what tags last resolved to under
//! `<root>/content/tags/` (for `image.resolvemode=local`), and which registry repositories
//! a blob is known to be in under `<root>/content/sources/<hex>` (containerd's
//! `distribution.source` labels: a push to another repository of the same registry mounts
//! the blob from there instead of uploading it).
//!
//! A blob is written to a temporary file in the same directory, its digest and size are
//! checked, it is synced and then renamed into place, so a blob that exists is complete
//! and correct; several processes may write the same blob at once (the last rename wins,
//! with identical bytes). Reads of small blobs re-check the digest, and a corrupt one is
//! treated as missing (and removed) so it is fetched again.

use std::path::{Path, PathBuf};

use kiln_proto::Digest;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

/// Errors from the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {expected} has digest {actual} ({size} bytes received)")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest} is {actual} bytes, the descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ContentError + 'a {
    move |source| ContentError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A repository on a registry known to hold a blob.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobOrigin {
    /// The registry name (`host[:port]`, `docker.io`).
    pub registry: String,
    pub repository: String,
}

/// Blobs by digest under one root.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    tags: PathBuf,
    sources: PathBuf,
}

impl ContentStore {
    /// Opens (creating) the store under `<root>/content`.
    pub fn open(root: &Path) -> Result<Self, ContentError> {
        let content = root.join("content");
        let blobs = content.join("blobs").join("sha256");
        let tags = content.join("tags");
        let sources = content.join("sources");
        for dir in [&blobs, &tags, &sources] {
            std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        Ok(ContentStore {
            blobs,
            tags,
            sources,
        })
    }

    /// Where blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        // A Digest is validated lowercase hex, so this cannot leave the directory.
        self.blobs.join(digest.hex())
    }

    /// The directory blobs live in (temporary files made there can be renamed into place).
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    /// Whether blob `digest` is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Every stored blob, sorted.
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let entries = std::fs::read_dir(&self.blobs).map_err(io_err("listing", &self.blobs))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.blobs))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|name| format!("sha256:{name}").parse::<Digest>().ok())
            {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads a stored blob, checking its digest; `None` when it is absent (or was corrupt,
    /// in which case it is removed so it is fetched again).
    pub async fn read(&self, digest: &Digest) -> Result<Option<Vec<u8>>, ContentError> {
        let path = self.path(digest);
        // Read in place: what is read whole is small (manifests, configs, a few KB), and a
        // trip to the blocking pool cost more than the read (two per cached build).
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        if Digest::of(&bytes) != *digest {
            tracing::warn!("content store blob {digest} is corrupt; removing it");
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores `bytes` as blob `digest` (checked).
    pub async fn write(&self, digest: &Digest, bytes: &[u8]) -> Result<(), ContentError> {
        let mut w = self.writer(digest, Some(bytes.len() as u64)).await?;
        w.write(bytes).await?;
        w.commit().await
    }

    /// A writer for blob `digest` of `size` bytes (when known).
    pub async fn writer(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobWriter, ContentError> {
        let suffix: u64 = rand::rng().random();
        let temp = self
            .blobs
            .join(format!(".tmp-{}-{suffix:016x}", &digest.hex()[..12]));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(io_err("creating", &temp))?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            dest: self.path(digest),
            digest: digest.clone(),
            size,
            hash: Sha256::new(),
            written: 0,
        })
    }

    /// What `tag_key` (a normalised `registry/repository:tag`) last resolved to.
    pub async fn tag(&self, tag_key: &str) -> Result<Option<Digest>, ContentError> {
        let path = self.tags.join(Digest::of(tag_key.as_bytes()).hex());
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text.trim().parse::<Digest>().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// The repositories blob `digest` is known to be in (fetched from or pushed to).
    pub fn origins(&self, digest: &Digest) -> Vec<BlobOrigin> {
        let path = self.sources.join(digest.hex());
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.split_once('\t'))
            .map(|(registry, repository)| BlobOrigin {
                registry: registry.to_owned(),
                repository: repository.to_owned(),
            })
            .collect()
    }

    /// Records that blob `digest` is in `origin` (kept to the last few repositories: they
    /// are hints for mounts, checked by the registry).
    pub fn add_origin(&self, digest: &Digest, origin: &BlobOrigin) -> Result<(), ContentError> {
        const KEEP: usize = 8;
        let mut origins = self.origins(digest);
        if origins.first() == Some(origin) {
            return Ok(());
        }
        origins.retain(|o| o != origin);
        origins.insert(0, origin.clone());
        origins.truncate(KEEP);
        let text: String = origins
            .iter()
            .filter(|o| !o.registry.contains(['\t', '\n']) && !o.repository.contains(['\t', '\n']))
            .map(|o| format!("{}\t{}\n", o.registry, o.repository))
            .collect();
        let path = self.sources.join(digest.hex());
        let suffix: u64 = rand::rng().random();
        let temp = self.sources.join(format!(".tmp-{suffix:016x}"));
        std::fs::write(&temp, text).map_err(io_err("writing", &temp))?;
        std::fs::rename(&temp, &path).map_err(io_err("renaming", &temp))
    }

    /// Records that `tag_key` resolved to `digest`.
    pub async fn set_tag(&self, tag_key: &str, digest: &Digest) -> Result<(), ContentError> {
        let name = Digest::of(tag_key.as_bytes());
        let path = self.tags.join(name.hex());
        let suffix: u64 = rand::rng().random();
        let temp = self.tags.join(format!(".tmp-{suffix:016x}"));
        tokio::fs::write(&temp, format!("{digest}\n"))
            .await
            .map_err(io_err("writing", &temp))?;
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(io_err("renaming", &temp))
    }
}

/// A blob being written; [`BlobWriter::commit`] checks and publishes it, dropping it
/// uncommitted removes the temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    dest: PathBuf,
    digest: Digest,
    size: Option<u64>,
    hash: Sha256,
    written: u64,
}

impl BlobWriter {
    /// Appends `chunk`.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(chunk)
            .await
            .map_err(io_err("writing", &self.temp))?;
        self.hash.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, syncs, and renames the blob into place.
    pub async fn commit(mut self) -> Result<(), ContentError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let actual = Digest::from_sha256(std::mem::take(&mut self.hash).finalize().into());
        if let Some(expected) = self.size.filter(|s| *s != self.written) {
            return Err(ContentError::SizeMismatch {
                digest: self.digest.clone(),
                expected,
                actual: self.written,
            });
        }
        if actual != self.digest {
            return Err(ContentError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
                size: self.written,
            });
        }
        file.flush().await.map_err(io_err("writing", &self.temp))?;
        file.sync_all()
            .await
            .map_err(io_err("syncing", &self.temp))?;
        drop(file);
        tokio::fs::rename(&self.temp, &self.dest)
            .await
            .map_err(io_err("renaming", &self.temp))?;
        // The rename is durable once the directory is synced; a lost rename after a
        // machine crash only means the blob is fetched again.
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn writes_verified_blobs_and_rejects_wrong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        rt().block_on(async {
            let data = b"hello blob";
            let digest = Digest::of(data);
            assert!(!store.contains(&digest));
            assert_eq!(store.read(&digest).await.unwrap(), None);
            store.write(&digest, data).await.unwrap();
            assert!(store.contains(&digest));
            assert_eq!(
                store.path(&digest),
                dir.path().join("content/blobs/sha256").join(digest.hex())
            );
            assert_eq!(store.read(&digest).await.unwrap().unwrap(), data);
            assert_eq!(store.list().unwrap(), vec![digest.clone()]);

            let other = Digest::of(b"other");
            let err = store.write(&other, data).await.unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("blob {other} has digest {digest}")),
                "{err}"
            );
            let mut w = store.writer(&other, Some(99)).await.unwrap();
            w.write(b"other").await.unwrap();
            let err = w.commit().await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("blob {other} is 5 bytes, the descriptor says 99")
            );
            // Nothing half-written is left behind, and the bad blob is not stored.
            let names: Vec<_> = std::fs::read_dir(dir.path().join("content/blobs/sha256"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 1, "{names:?}");

            // A corrupted blob is dropped on read.
            std::fs::write(store.path(&digest), b"tampered").unwrap();
            assert_eq!(store.read(&digest).await.unwrap(), None);
            assert!(!store.contains(&digest));

            assert_eq!(store.tag("localhost:5000/x:latest").await.unwrap(), None);
            store
                .set_tag("localhost:5000/x:latest", &digest)
                .await
                .unwrap();
            assert_eq!(
                store.tag("localhost:5000/x:latest").await.unwrap(),
                Some(digest.clone())
            );

            assert_eq!(store.origins(&digest), []);
            let origin = |repo: &str| BlobOrigin {
                registry: "r.test:5000".into(),
                repository: repo.into(),
            };
            store.add_origin(&digest, &origin("a/b")).unwrap();
            store.add_origin(&digest, &origin("c")).unwrap();
            store.add_origin(&digest, &origin("a/b")).unwrap();
            assert_eq!(store.origins(&digest), [origin("a/b"), origin("c")]);
        });
    }
}
