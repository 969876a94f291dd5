//! Cache mounts (../shared/spec/prepare-mounts.md §3): persistent directories found again by
//! key (`cacheOpt.ID`, plus `":" + ref id` when the mount has an input), kept with the
//! snapshotter's retain policy and indexed as `cache-dir:<key>`.
//!
//! * `SHARED`: all users in this process share one directory (and one host mount of it, so
//!   concurrent steps see each other's writes); another kiln process that finds it held
//!   uses another directory.
//! * `PRIVATE`: a directory nobody holds, else a new one.
//! * `LOCKED`: a directory nobody holds, else wait until one is released — across kiln
//!   processes too, because holding a mutable snapshot is an exclusive lock on it.
//!
//! Finding or creating a directory runs under a per-key lock file, so two processes never
//! create two directories for one key at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kiln_proto::pb::CacheSharingOpt;
use kiln_snapshotter::{ImmutableRef, MutableRef, RecordState, RefOptions, Snapshotter};
use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

use crate::mounts::{MountsDir, MountsError, StepMounts};

/// Errors from cache mounts.
#[derive(Debug, thiserror::Error)]
pub enum CacheMountError {
    #[error("cache mount {key:?}: {source}")]
    Snapshot {
        key: String,
        #[source]
        source: kiln_snapshotter::Error,
    },
    #[error("cache mount {key:?}: {source}")]
    Mount {
        key: String,
        #[source]
        source: MountsError,
    },
    #[error("cache mount {key:?}: lock {path}: {source}")]
    Lock {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled while waiting for the locked cache mount {0:?}")]
    Cancelled(String),
}

/// A mounted cache directory; unmounted and released (kept on disk) when the last handle
/// drops.
#[derive(Debug)]
pub struct CacheDir {
    mounts: Mutex<Option<StepMounts>>,
    path: PathBuf,
    mutable: Mutex<Option<MutableRef>>,
    /// The SHARED key's setup lock, held while releasing: a step acquiring the key meanwhile
    /// waits for the release instead of finding the directory still held and making a
    /// fresh one.
    setup: Option<Arc<Mutex<()>>>,
}

impl CacheDir {
    /// Where the directory is mounted on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let setup = self.setup.take();
        let _setup = setup.as_ref().map(|l| l.lock());
        // Unmount first, then release the (retained) snapshot.
        if let Ok(mut mounts) = self.mounts.lock() {
            mounts.take();
        }
        if let Ok(mut mutable) = self.mutable.lock() {
            if let Some(m) = mutable.take() {
                if let Err(e) = m.release() {
                    tracing::warn!(error = %e, "releasing a cache mount");
                }
            }
        }
    }
}

/// The process-wide cache-mount table.
#[derive(Debug, Default)]
pub struct CacheMounts {
    shared: Mutex<HashMap<String, Weak<CacheDir>>>,
    /// One lock per SHARED key, held from the table lookup to the insert: two steps
    /// acquiring a key at once would otherwise both miss the table, and the second,
    /// finding the first's directory held, would make a fresh one of its own.
    shared_setup: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    counter: std::sync::atomic::AtomicU64,
}

/// The key of a cache mount: its id, plus the base ref's id when it has one.
pub fn key(id: &str, base: Option<&ImmutableRef>) -> String {
    match base {
        Some(r) => format!("{id}:{}", r.id()),
        None => id.to_owned(),
    }
}

impl CacheMounts {
    /// A mounted cache directory for `key` with `sharing` (blocking; LOCKED may wait).
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &self,
        snapshotter: &Snapshotter,
        mounts_dir: &MountsDir,
        locks_dir: &Path,
        key: &str,
        sharing: CacheSharingOpt,
        base: Option<&ImmutableRef>,
        description: &str,
        cancel: &CancellationToken,
    ) -> Result<Arc<CacheDir>, CacheMountError> {
        let setup = if sharing == CacheSharingOpt::Shared {
            let mut locks = self.shared_setup.lock().map_err(|_| poisoned(key))?;
            Some(Arc::clone(locks.entry(key.to_owned()).or_default()))
        } else {
            None
        };
        let _setup = match &setup {
            Some(lock) => Some(lock.lock().map_err(|_| poisoned(key))?),
            None => None,
        };
        if sharing == CacheSharingOpt::Shared {
            let table = self.shared.lock().map_err(|_| poisoned(key))?;
            if let Some(dir) = table.get(key).and_then(Weak::upgrade) {
                return Ok(dir);
            }
        }
        let mutable = loop {
            match self.find_or_create(snapshotter, locks_dir, key, sharing, base, description)? {
                Some(m) => break m,
                None => {
                    // LOCKED and every directory is held: wait for one (BuildKit polls too).
                    if cancel.is_cancelled() {
                        return Err(CacheMountError::Cancelled(key.to_owned()));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut mounts = StepMounts::new(mounts_dir, &format!("cache{n}")).map_err(|source| {
            CacheMountError::Mount {
                key: key.to_owned(),
                source,
            }
        })?;
        let path = mounts
            .mount("dir", &mutable.mountable(), false)
            .map_err(|source| CacheMountError::Mount {
                key: key.to_owned(),
                source,
            })?;
        let dir = Arc::new(CacheDir {
            mounts: Mutex::new(Some(mounts)),
            path,
            mutable: Mutex::new(Some(mutable)),
            setup: setup.clone(),
        });
        if sharing == CacheSharingOpt::Shared {
            // Under the key's setup lock nobody else can have inserted one meanwhile (and
            // dropping a second directory here would wait for that very lock).
            let mut table = self.shared.lock().map_err(|_| poisoned(key))?;
            table.insert(key.to_owned(), Arc::downgrade(&dir));
        }
        Ok(dir)
    }

    /// A free directory for `key`, a new one, or `None` (LOCKED, all held).
    fn find_or_create(
        &self,
        snapshotter: &Snapshotter,
        locks_dir: &Path,
        key: &str,
        sharing: CacheSharingOpt,
        base: Option<&ImmutableRef>,
        description: &str,
    ) -> Result<Option<MutableRef>, CacheMountError> {
        let index = format!("cache-dir:{key}");
        let _guard = key_lock(locks_dir, key)?;
        let snap_err = |source| CacheMountError::Snapshot {
            key: key.to_owned(),
            source,
        };
        let records = snapshotter.find(&index).map_err(snap_err)?;
        let mut held = 0;
        for record in records.iter().filter(|r| r.state == RecordState::Mutable) {
            match snapshotter.get_mutable(&record.id) {
                Ok(m) => return Ok(Some(m)),
                Err(kiln_snapshotter::Error::Locked(_)) => held += 1,
                Err(e) => tracing::warn!(id = record.id, error = %e, "unusable cache directory"),
            }
        }
        if sharing == CacheSharingOpt::Locked && held > 0 {
            return Ok(None);
        }
        let options = RefOptions {
            description: description.to_owned(),
            record_type: "exec.cachemount".to_owned(),
            retain: true,
            keys: vec![index],
        };
        snapshotter
            .new_mutable(base, &options)
            .map(Some)
            .map_err(snap_err)
    }
}

fn poisoned(key: &str) -> CacheMountError {
    CacheMountError::Lock {
        key: key.to_owned(),
        path: PathBuf::new(),
        source: std::io::Error::other("cache table lock poisoned"),
    }
}

/// An exclusive lock on `<locks>/cachemount-<sha256(key)>` while a directory is chosen.
fn key_lock(locks_dir: &Path, key: &str) -> Result<Flock<std::fs::File>, CacheMountError> {
    let path = locks_dir.join(format!(
        "cachemount-{}",
        kiln_proto::Digest::of(key.as_bytes()).hex()
    ));
    let err = |source| CacheMountError::Lock {
        key: key.to_owned(),
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(locks_dir).map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| err(std::io::Error::from(e)))
}
