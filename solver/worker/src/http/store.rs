//! What kiln remembers of earlier downloads, for conditional requests (BuildKit keeps the
//! same in its cache metadata: `etag`, `http.checksum`, `http.modtime` per snapshot):
//! for each download identity (URL, file name, mode and owner), the `ETag`s seen with the
//! snapshot holding that body, its digest and its `Last-Modified`.
//!
//! One JSON file per identity under `<root>/http/`, replaced atomically (written aside,
//! synced, renamed, directory synced) under a per-identity lock file, so a crash leaves
//! the old or the new list, never a torn one. The snapshots are the snapshotter's: an
//! entry whose snapshot is gone (pruned) is skipped on read and dropped on the next
//! write, so a prune only turns reuse into a download.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_proto::Digest;
use kiln_proto::gojson::ObjectWriter;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::error::HttpError;

/// One remembered download.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The `ETag` without a weak `W/` prefix, as sent back in `If-None-Match`.
    pub etag: String,
    /// The snapshot holding the downloaded file.
    pub snapshot: String,
    /// sha256 of the body.
    pub checksum: String,
    /// The `Last-Modified` header of the download (part of the cache key).
    #[serde(default)]
    pub last_modified: String,
}

/// The ETag records of one worker root.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    locks: PathBuf,
    counter: AtomicU64,
}

/// The identity downloads are remembered by (BuildKit's `urlHash`, plus the URL, which
/// BuildKit leaves out so that different URLs with one file name share their ETags).
pub(crate) fn identity(url: &str, filename: &str, perm: i64, uid: i64, gid: i64) -> Digest {
    let mut json = Vec::new();
    ObjectWriter::new(&mut json)
        .string_always("URL", url)
        .string_always("Filename", filename)
        .int_always("Perm", perm)
        .int_always("UID", uid)
        .int_always("GID", gid)
        .finish();
    Digest::of(&json)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HttpError + '_ {
    move |source| HttpError::Store {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    pub fn new(root: &Path, locks: PathBuf) -> Self {
        Store {
            dir: root.join("http"),
            locks,
            counter: AtomicU64::new(0),
        }
    }

    fn path(&self, id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", id.hex()))
    }

    /// The entries recorded for `id` (none when the file is missing or unreadable: a
    /// damaged record only costs a download).
    pub fn entries(&self, id: &Digest) -> Vec<Entry> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "ignoring the damaged download record {}: {e}",
                    path.display()
                );
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Records `entry` for `id`, replacing one with the same ETag; `live` says which
    /// recorded snapshots still exist (the others are dropped).
    pub fn record(
        &self,
        id: &Digest,
        entry: Entry,
        live: impl Fn(&str) -> bool,
    ) -> Result<(), HttpError> {
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let _lock = self.lock(id)?;
        let mut entries: Vec<Entry> = self
            .entries(id)
            .into_iter()
            .filter(|e| e.etag != entry.etag && live(&e.snapshot))
            .collect();
        entries.push(entry);
        let bytes = serde_json::to_vec_pretty(&entries).map_err(|e| HttpError::Store {
            path: self.path(id),
            source: std::io::Error::other(e),
        })?;
        self.replace(&self.path(id), &bytes)
    }

    /// Writes `bytes` to `path` atomically and durably.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), HttpError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            HttpError::Store {
                path: path.to_owned(),
                source,
            }
        })
    }

    fn lock(&self, id: &Digest) -> Result<Flock<File>, HttpError> {
        let path = self.locks.join(format!("http-{}", id.hex()));
        std::fs::create_dir_all(&self.locks).map_err(io_error(&self.locks))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| HttpError::Store {
            path,
            source: std::io::Error::from(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(etag: &str, snapshot: &str) -> Entry {
        Entry {
            etag: etag.to_owned(),
            snapshot: snapshot.to_owned(),
            checksum: "sha256:00".to_owned(),
            last_modified: String::new(),
        }
    }

    #[test]
    fn records_replace_by_etag_and_drop_dead_snapshots() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path(), root.path().join("locks"));
        let id = identity("http://x/f", "f", 0, 0, 0);
        assert!(store.entries(&id).is_empty());
        store.record(&id, entry("\"a\"", "s1"), |_| true).unwrap();
        store.record(&id, entry("\"b\"", "s2"), |_| true).unwrap();
        store.record(&id, entry("\"a\"", "s3"), |_| true).unwrap();
        assert_eq!(
            store.entries(&id),
            vec![entry("\"b\"", "s2"), entry("\"a\"", "s3")]
        );
        store
            .record(&id, entry("\"c\"", "s4"), |s| s != "s2")
            .unwrap();
        assert_eq!(
            store.entries(&id),
            vec![entry("\"a\"", "s3"), entry("\"c\"", "s4")]
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.path().join("http"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            leftovers,
            [format!("{}.json", id.hex())],
            "no temporary files"
        );
        std::fs::write(store.path(&id), b"{torn").unwrap();
        assert!(store.entries(&id).is_empty(), "a damaged record is a miss");
        assert_ne!(id, identity("http://x/g", "f", 0, 0, 0));
        assert_ne!(id, identity("http://x/f", "f", 0o644, 0, 0));
    }
}
