//! Cache mounts (../shared/spec/prepare-mounts.md §3), as BuildKit v0.11.6's mount manager
//! keeps them, across every kiln process on one `--root`: persistent directories found
//! again by key (`cacheOpt.ID`, plus `":" + ref id` when the mount has an input), kept with
//! the snapshotter's retain policy and indexed as `cache-dir:<key>`. A cache directory is
//! always a directory of its own (an input is copied in when it is made), so it mounts as a
//! plain bind that several processes can share.
//!
//! * `SHARED`: everyone uses one directory at once — steps of this process through one
//!   mount of it, other kiln processes through a shared hold on the same record (as one
//!   BuildKit daemon shares it between its builds). A new directory is made only when
//!   every existing one is held exclusively.
//! * `PRIVATE`: a directory nobody holds, else a new one.
//! * `LOCKED`: a directory nobody holds, else wait until one is released (polling every
//!   100 ms, as BuildKit does) — across kiln processes too.
//!
//! Within one step a key is acquired once, whatever the number of mounts naming it (both
//! targets see one directory, as BuildKit's per-op share), and a step acquires its keys in
//! key order, so two steps can never each hold a `LOCKED` directory the other waits for.
//! Finding or creating a directory runs under a per-key lock file, so two processes never
//! create two directories for one key at once. [`CacheMounts::prune`] is BuildKit's
//! `PruneCacheMounts`: the directories of ids a step ignoring the cache mounts are taken out
//! of the index and deleted once unused, so that step gets a fresh, empty one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kiln_proto::pb::CacheSharingOpt;
use kiln_snapshotter::{
    ImmutableRef, Mountable, MutableRef, RecordState, RefOptions, SharedMutableRef, Snapshotter,
};
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

/// How a directory is held.
#[derive(Debug)]
enum Hold {
    /// By this handle alone (`LOCKED`, `PRIVATE`).
    Exclusive(MutableRef),
    /// With other holders, in this process or others (`SHARED`).
    Shared(SharedMutableRef),
}

impl Hold {
    fn mountable(&self) -> Mountable {
        match self {
            Hold::Exclusive(m) => m.mountable(),
            Hold::Shared(s) => s.mountable(),
        }
    }
}

/// A mounted cache directory; unmounted and released (kept on disk) when the last handle
/// drops.
#[derive(Debug)]
pub struct CacheDir {
    mounts: Mutex<Option<StepMounts>>,
    path: PathBuf,
    hold: Mutex<Option<Hold>>,
    /// The SHARED key's setup lock, held while releasing: a step acquiring the key
    /// meanwhile waits for the release instead of finding a directory half let go.
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
        if let Ok(mut hold) = self.hold.lock() {
            match hold.take() {
                Some(Hold::Exclusive(m)) => {
                    if let Err(e) = m.release() {
                        tracing::warn!(error = %e, "releasing a cache mount");
                    }
                }
                Some(Hold::Shared(s)) => drop(s),
                None => {}
            }
        }
    }
}

/// The process-wide cache-mount table.
#[derive(Debug, Default)]
pub struct CacheMounts {
    /// SHARED directories this process has mounted, by key.
    shared: Mutex<HashMap<String, Weak<CacheDir>>>,
    /// One lock per SHARED key, held from the table lookup to the insert: two steps
    /// acquiring a key at once would otherwise mount it twice.
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

/// The index a cache directory of `key` is found under.
fn index(key: &str) -> String {
    format!("cache-dir:{key}")
}

/// Where a cache directory comes from and how it is described.
#[derive(Debug)]
pub struct Store<'a> {
    pub snapshotter: &'a Snapshotter,
    pub mounts_dir: &'a MountsDir,
    pub locks_dir: &'a Path,
}

impl CacheMounts {
    /// A mounted cache directory for `key` with `sharing` (blocking; LOCKED may wait).
    pub fn acquire(
        &self,
        store: &Store<'_>,
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
        let hold = loop {
            match find_or_create(store, key, sharing, base, description)? {
                Some(h) => break h,
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
        let mount_err = |source| CacheMountError::Mount {
            key: key.to_owned(),
            source,
        };
        let mut mounts =
            StepMounts::new(store.mounts_dir, &format!("cache{n}")).map_err(mount_err)?;
        let path = mounts
            .mount("dir", &hold.mountable(), false)
            .map_err(mount_err)?;
        let dir = Arc::new(CacheDir {
            mounts: Mutex::new(Some(mounts)),
            path,
            hold: Mutex::new(Some(hold)),
            setup: setup.clone(),
        });
        if sharing == CacheSharingOpt::Shared {
            // Under the key's setup lock nobody else can have inserted one meanwhile.
            let mut table = self.shared.lock().map_err(|_| poisoned(key))?;
            table.insert(key.to_owned(), Arc::downgrade(&dir));
        }
        Ok(dir)
    }

    /// BuildKit's `PruneCacheMounts` for the cache ids of steps that ignore the cache:
    /// every directory indexed exactly `cache-dir:<id>` leaves the index and stops being
    /// retained; those nobody holds are deleted now, the others by their last holder.
    /// Directories keyed `<id>:<ref>` (mounts with an input) are not matched, as in
    /// BuildKit.
    pub fn prune(&self, store: &Store<'_>, ids: &[String]) -> Result<(), CacheMountError> {
        for id in ids {
            let _guard = key_lock(store.locks_dir, id)?;
            let snap_err = |source| CacheMountError::Snapshot {
                key: id.clone(),
                source,
            };
            let index = index(id);
            for record in store.snapshotter.find(&index).map_err(snap_err)? {
                store
                    .snapshotter
                    .detach(&record.id, &index)
                    .map_err(snap_err)?;
                if record.state != RecordState::Mutable {
                    continue;
                }
                match store.snapshotter.get_mutable(&record.id) {
                    Ok(m) => m.release().map_err(snap_err)?,
                    Err(kiln_snapshotter::Error::Locked(_)) => {}
                    Err(e) => tracing::debug!(id = record.id, error = %e, "detached cache dir"),
                }
            }
            tracing::debug!(id, "cache mounts pruned (the step ignores the cache)");
        }
        if !ids.is_empty() {
            // BuildKit's ClearActiveCacheMounts: later steps of this process start anew.
            self.shared.lock().map_err(|_| poisoned("*"))?.clear();
        }
        Ok(())
    }
}

/// A directory for `key` nobody holds in a conflicting way, a new one, or `None`
/// (LOCKED, all held).
fn find_or_create(
    store: &Store<'_>,
    key: &str,
    sharing: CacheSharingOpt,
    base: Option<&ImmutableRef>,
    description: &str,
) -> Result<Option<Hold>, CacheMountError> {
    let index = index(key);
    let _guard = key_lock(store.locks_dir, key)?;
    let snapshotter = store.snapshotter;
    let snap_err = |source| CacheMountError::Snapshot {
        key: key.to_owned(),
        source,
    };
    let records = snapshotter.find(&index).map_err(snap_err)?;
    let mut held = 0;
    for record in records.iter().filter(|r| r.state == RecordState::Mutable) {
        let found = match sharing {
            CacheSharingOpt::Shared => snapshotter.get_mutable_shared(&record.id).map(Hold::Shared),
            _ => snapshotter.get_mutable(&record.id).map(Hold::Exclusive),
        };
        match found {
            Ok(h) => return Ok(Some(h)),
            Err(kiln_snapshotter::Error::Locked(_)) => held += 1,
            Err(e) => {
                tracing::debug!(id = record.id, error = %e, "cache directory not usable here")
            }
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
    let created = match base {
        Some(base) => snapshotter.new_mutable_copy(base, &options),
        None => snapshotter.new_mutable(None, &options),
    }
    .map_err(snap_err)?;
    let hold = match sharing {
        CacheSharingOpt::Shared => Hold::Shared(created.into_shared().map_err(snap_err)?),
        _ => Hold::Exclusive(created),
    };
    Ok(Some(hold))
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

/// The cache ids BuildKit prunes before a build (`detectPrunedCacheID`): those of cache
/// mounts of exec ops that ignore the cache (`cacheOpt.ID`, or the mount's destination
/// when the id is empty).
pub fn ignored_ids(graph: &kiln_proto::Graph) -> Vec<String> {
    let mut ids: Vec<String> = graph
        .vertices()
        .iter()
        .filter(|v| v.options.ignore_cache)
        .filter_map(|v| match &v.op.op {
            Some(kiln_proto::pb::op::Op::Exec(exec)) => Some(exec),
            _ => None,
        })
        .flat_map(|exec| exec.mounts.iter())
        .filter(|m| m.mount_type == kiln_proto::pb::MountType::Cache as i32)
        .filter_map(|m| {
            let opt = m.cache_opt.as_ref()?;
            Some(if opt.id.is_empty() {
                m.dest.clone()
            } else {
                opt.id.clone()
            })
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}
