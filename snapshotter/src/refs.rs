//! The store and its refs: opening (backend choice, recovery), creating, committing,
//! releasing and looking up records, keyed lookups, disk usage, prune and verify.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::backend::{self, Backend, BackendChoice, BackendError, XattrNamespace};
use crate::fsutil;
use crate::layer::{self, Compression, ImportOptions, LayerDescriptor, LayerError};
use crate::lock::{Create, LockError, RecordLock};
use crate::meta::{Db, LayerInfo, MetaError, NewRecord, Record, RecordState};
use crate::mount::{Mountable, OverlayMount};
use crate::sys::LockKind;

/// Errors from the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Mount(#[from] crate::mount::MountError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("snapshot {0} not found")]
    NotFound(String),
    #[error("{0} is locked")]
    Locked(String),
    #[error("snapshot {id} is {state:?}, not {wanted}")]
    WrongState {
        id: String,
        state: RecordState,
        wanted: &'static str,
    },
    #[error(
        "the snapshot store at {root} was created {recorded} (overlay metadata in \
         {recorded_ns}.overlay.* xattrs) but is opened {current}; open it the same way it \
         was created, or use another --root"
    )]
    NamespaceMismatch {
        root: PathBuf,
        recorded: &'static str,
        recorded_ns: String,
        current: &'static str,
    },
    #[error("the snapshot store at {root} uses the {recorded} backend, but {wanted} was asked for")]
    BackendMismatch {
        root: PathBuf,
        recorded: String,
        wanted: &'static str,
    },
    #[error("the snapshot store at {root} uses overlayfs, which does not work here: {reason}")]
    OverlayUnavailable { root: PathBuf, reason: String },
    #[error("snapshot {id}: parent {parent} is missing")]
    MissingParent { id: String, parent: String },
    #[error(
        "the diff deletes {path}, which the native snapshot backend cannot represent (it \
         stores full trees); use a --root on a filesystem where overlayfs works"
    )]
    NativeDiffDeletion { path: String },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Record type of a layer holding the difference of two trees (LLB's DiffOp).
pub const DIFF_RECORD_TYPE: &str = "diff";

/// How to open a store.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    pub backend: BackendChoice,
}

/// Metadata for a new record.
#[derive(Clone, Debug, Default)]
pub struct RefOptions {
    /// Human-readable, e.g. `mount / from exec /bin/sh -c …`.
    pub description: String,
    /// `regular` when empty; e.g. `exec.cachemount`, `source.local`.
    pub record_type: String,
    /// Keep a mutable record when its handle is released (cache mounts).
    pub retain: bool,
    /// Keys to find the record by later, e.g. `cache-dir:<key>`.
    pub keys: Vec<String>,
}

/// What to prune.
#[derive(Clone, Copy, Debug, Default)]
pub struct PruneOptions {
    /// Keep records used more recently than this long ago.
    pub keep_duration: Option<Duration>,
}

/// Disk usage of one record.
#[derive(Clone, Debug)]
pub struct UsageInfo {
    pub id: String,
    pub parent: Option<String>,
    pub state: RecordState,
    /// Some process holds a handle on it (or it is being made or removed).
    pub in_use: bool,
    /// Bytes used by the record's own directory.
    pub size: u64,
    pub created_at: SystemTime,
    pub last_used_at: SystemTime,
    pub usage_count: u64,
    pub description: String,
    pub record_type: String,
    pub retain: bool,
    /// Prune could remove it now (not in use, no children).
    pub reclaimable: bool,
    pub keys: Vec<String>,
}

/// One problem [`Snapshotter::verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconsistency {
    /// The record concerned, if any.
    pub id: Option<String>,
    pub problem: String,
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "{id}: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

/// The snapshot store. Cheap to clone; all clones share one database connection.
#[derive(Clone, Debug)]
pub struct Snapshotter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    snapshots: PathBuf,
    /// An always-empty directory: the bottom lower of an overlay whose lowest layer is
    /// reused from another chain (its whiteouts must be applied, not shown).
    empty: PathBuf,
    locks: PathBuf,
    db: Mutex<Db>,
    backend: Backend,
    boot_id: String,
    /// Records this process holds immutable handles on.
    open: Mutex<HashMap<String, Weak<Held>>>,
}

/// One record held by this process.
#[derive(Debug)]
struct Held {
    shared: Arc<Shared>,
    id: String,
    n: u64,
    parent: Option<ImmutableRef>,
    /// The snapshot whose directory holds this one's contents (see [`Record::content`]).
    content: Option<ImmutableRef>,
    /// Its directory may hold whiteouts made against other lowers than its parents: a
    /// reused layer, or a diff of two trees ([`DIFF_RECORD_TYPE`]).
    foreign: bool,
    lock: Mutex<RecordLock>,
}

/// A committed, shareable snapshot. Clone adds a handle; drop or
/// [`release`](ImmutableRef::release) removes one.
#[derive(Clone, Debug)]
pub struct ImmutableRef {
    held: Arc<Held>,
}

/// A writable snapshot, held by this handle alone.
#[derive(Debug)]
pub struct MutableRef {
    held: Option<Arc<Held>>,
    retain: bool,
}

/// A writable snapshot several handles — in several processes — hold at once (a SHARED
/// cache mount): a directory of its own that each holder bind-mounts. Dropping a handle
/// lets go; the last holder of a record that is no longer retained deletes it.
#[derive(Debug)]
pub struct SharedMutableRef {
    held: Option<Arc<Held>>,
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..25)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Shared {
    fn db(&self) -> MutexGuard<'_, Db> {
        lock_mutex(&self.db)
    }

    fn dir(&self, n: u64) -> PathBuf {
        self.snapshots.join(n.to_string())
    }

    fn fs_dir(&self, n: u64) -> PathBuf {
        self.dir(n).join("fs")
    }

    fn work_dir(&self, n: u64) -> PathBuf {
        self.dir(n).join("work")
    }

    fn lock_path(&self, n: u64) -> PathBuf {
        self.locks.join(format!("snapshot-{n}.lock"))
    }

    /// Deletes a record whose exclusive lock `lock` holds: marks it, removes its directory,
    /// unlinks its lock file, deletes its row (in that order, so a kill at any point leaves
    /// a `removing` record for recovery, never a directory or lock without a record).
    fn delete_locked(&self, id: &str, n: u64, lock: &RecordLock) -> Result<()> {
        self.db().mark_removing(id)?;
        let dir = self.dir(n);
        fsutil::remove_tree(&dir).map_err(io_err(&dir))?;
        lock.unlink()?;
        self.db().delete(id)?;
        tracing::debug!(id, n, "removed snapshot");
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Err(e) = sync_store(self) {
            tracing::warn!("syncing the snapshot store at {}: {e}", self.root.display());
        }
    }
}

fn sync_store(shared: &Shared) -> Result<()> {
    if !shared.db().has_unsynced()? {
        return Ok(());
    }
    let dir = fsutil::open_dir(&shared.snapshots).map_err(|source| Error::Sys {
        op: "open",
        path: shared.snapshots.clone(),
        source,
    })?;
    nix::unistd::syncfs(dir.as_fd()).map_err(|source| Error::Sys {
        op: "syncfs",
        path: shared.snapshots.clone(),
        source,
    })?;
    shared.db().mark_synced(&shared.boot_id)?;
    Ok(())
}

impl Drop for Held {
    fn drop(&mut self) {
        let held = lock_mutex(&self.lock).held();
        if held == Some(LockKind::Shared) {
            let mut open = lock_mutex(&self.shared.open);
            if open.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                open.remove(&self.id);
            }
        }
        if held.is_some() {
            if let Err(e) = self.shared.db().touch(&self.id, false) {
                tracing::warn!("recording the last use of snapshot {}: {e}", self.id);
            }
        }
    }
}

/// A record of a lineage being opened: locked, not yet checked again nor held.
struct PendingHold {
    id: String,
    /// The record that mounts on this one (`None` for the one asked for).
    child: Option<String>,
    record: Record,
    lock: RecordLock,
}

/// What [`Snapshotter::get`] collects while it locks a lineage.
#[derive(Default)]
struct LineageWalk {
    visited: std::collections::HashSet<String>,
    /// Locked here, each after the records it mounts on.
    locked: Vec<PendingHold>,
    /// Already open in this process.
    reused: HashMap<String, Arc<Held>>,
}

/// The error for record `id` gone (or never there): reached from `child`, a missing parent.
fn missing(id: &str, child: Option<&str>) -> Error {
    match child {
        None => Error::NotFound(id.to_owned()),
        Some(child) => Error::MissingParent {
            id: child.to_owned(),
            parent: id.to_owned(),
        },
    }
}

impl Snapshotter {
    /// Opens (creating if needed) the store under `root` with the default options.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        Snapshotter::open_with(root, StoreOptions::default())
    }

    /// Opens (creating if needed) the store under `root`: probes the backend, checks it
    /// against the one the store was created with, and removes half-made snapshots.
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Snapshotter> {
        let snapshots = root.join("snapshots");
        let locks = root.join("locks");
        let empty = snapshots.join("empty");
        for dir in [root, &snapshots, &locks] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&empty) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io_err(&empty)(e));
            }
            _ => {}
        }
        let db = Db::open(&root.join("snapshots.db"))?;
        let rootless = backend::in_user_namespace()?;
        let xattrs = if rootless {
            XattrNamespace::User
        } else {
            XattrNamespace::Trusted
        };
        let recorded = db.setting_or_insert("xattrs", xattrs.as_str())?;
        if recorded != xattrs.as_str() {
            let how = |ns: Option<XattrNamespace>| match ns {
                Some(XattrNamespace::User) => "rootless",
                _ => "as root",
            };
            return Err(Error::NamespaceMismatch {
                root: root.to_owned(),
                recorded: how(XattrNamespace::parse(&recorded)),
                recorded_ns: recorded,
                current: how(Some(xattrs)),
            });
        }
        let backend = choose_backend(root, &db, options.backend, xattrs)?;
        let shared = Arc::new(Shared {
            root: root.to_owned(),
            snapshots,
            empty,
            locks,
            db: Mutex::new(db),
            backend,
            boot_id: read_boot_id(),
            open: Mutex::new(HashMap::new()),
        });
        let store = Snapshotter { shared };
        store.recover()?;
        Ok(store)
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Makes every committed snapshot durable (one `syncfs`), so it survives a reboot.
    pub fn sync(&self) -> Result<()> {
        sync_store(&self.shared)
    }

    /// A new writable snapshot on `parent` (or empty).
    pub fn new_mutable(
        &self,
        parent: Option<&ImmutableRef>,
        options: &RefOptions,
    ) -> Result<MutableRef> {
        // Only the native backend fills a layer after making it (a copy of its parent).
        let copies = matches!(self.shared.backend, Backend::Native { .. }) && parent.is_some();
        let (held, fs) = self.create(parent, None, options, !copies)?;
        let fill = || -> Result<()> {
            if let Some(p) = parent {
                self.shared.db().touch(p.id(), true)?;
            }
            if !copies {
                return Ok(());
            }
            let work = self.shared.work_dir(held.n);
            std::fs::DirBuilder::new()
                .mode(0o711)
                .create(&work)
                .map_err(io_err(&work))?;
            if let Some(p) = parent {
                copy_parent(&p.held, &fs)?;
            }
            if !self.shared.db().transition(
                &held.id,
                RecordState::Creating,
                RecordState::Mutable,
                None,
            )? {
                return Err(Error::NotFound(held.id.clone()));
            }
            Ok(())
        };
        if let Err(e) = fill() {
            let lock = lock_mutex(&held.lock);
            if let Err(cleanup) = self.shared.delete_locked(&held.id, held.n, &lock) {
                tracing::warn!("removing the failed snapshot {}: {cleanup}", held.id);
            }
            return Err(e);
        }
        tracing::debug!(id = held.id, n = held.n, "new mutable snapshot");
        Ok(MutableRef {
            held: Some(Arc::new(held)),
            retain: options.retain,
        })
    }

    /// Makes a record with its directories, holding its exclusive lock: `creating`, for
    /// the caller to fill and move on, or — `whole` — `mutable`, its work directory made
    /// too, all in the transaction that inserts it (one write transaction a step instead
    /// of two).
    fn create(
        &self,
        parent: Option<&ImmutableRef>,
        content: Option<&ImmutableRef>,
        options: &RefOptions,
        whole: bool,
    ) -> Result<(Held, PathBuf)> {
        let shared = &self.shared;
        let id = new_id();
        let record_type = if options.record_type.is_empty() {
            "regular"
        } else {
            &options.record_type
        };
        let new = NewRecord {
            id: &id,
            parent: parent.map(ImmutableRef::id),
            content: content.map(ImmutableRef::id),
            retain: options.retain,
            description: &options.description,
            record_type,
        };
        let make = |n| -> Result<RecordLock> {
            // The lock exists and is held before the row becomes visible, and the directory
            // appears only after the lock: recovery never sees an unlocked half-made record.
            let lock_path = shared.lock_path(n);
            let _ = std::fs::remove_file(&lock_path);
            let mut lock = RecordLock::open(&lock_path, Create::New)?
                .ok_or_else(|| Error::NotFound(id.clone()))?;
            if !lock.lock(LockKind::Exclusive, false)? {
                return Err(Error::Locked(id.clone()));
            }
            let dir = shared.dir(n);
            fsutil::remove_tree(&dir).map_err(io_err(&dir))?;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
            if whole {
                make_fs_dir(shared, n, parent)?;
                let work = shared.work_dir(n);
                std::fs::DirBuilder::new()
                    .mode(0o711)
                    .create(&work)
                    .map_err(io_err(&work))?;
            }
            Ok(lock)
        };
        let state = if whole {
            RecordState::Mutable
        } else {
            RecordState::Creating
        };
        let (n, lock) = shared.db().insert(&new, state, make)?;
        let held = Held {
            shared: shared.clone(),
            id: id.clone(),
            n,
            parent: parent.cloned(),
            content: content.cloned(),
            foreign: content.is_some() || record_type == DIFF_RECORD_TYPE,
            lock: Mutex::new(lock),
        };
        let fs = if whole {
            shared.fs_dir(n)
        } else {
            make_fs_dir(shared, n, parent)?
        };
        {
            let db = shared.db();
            for key in &options.keys {
                db.add_key(&id, key)?;
            }
        }
        Ok((held, fs))
    }

    /// The committed record `id`, and with it the records it mounts on.
    ///
    /// A snapshot holds its ancestors (parent and content records), and a cached build's
    /// result is a chain of one snapshot per step: the whole lineage is read in one
    /// statement, each record not yet open here is locked (shared; waiting only for a
    /// short exclusive holder: a deletion or the end of a creation), and all are checked
    /// again under their locks in one more statement — not two statements per layer.
    pub fn get(&self, id: &str) -> Result<ImmutableRef> {
        if let Some(held) = self.open_held(id) {
            self.shared.db().touch(id, true)?;
            return Ok(ImmutableRef { held });
        }
        let before = self.shared.db().lineage(id)?;
        let mut walk = LineageWalk::default();
        self.lock_lineage(id, None, &before, &mut walk)?;
        let after = self.shared.db().lineage(id)?;
        for pending in &mut walk.locked {
            match after.get(&pending.id) {
                Some(record) if record.state == RecordState::Committed => {
                    pending.record = record.clone();
                }
                _ => return Err(missing(&pending.id, pending.child.as_deref())),
            }
        }
        // Ancestors come first in `locked` (the walk adds a record after those it mounts on).
        let mut held_by_id = walk.reused;
        for pending in walk.locked {
            let resolve = |other: &Option<String>| -> Result<Option<ImmutableRef>> {
                other
                    .as_ref()
                    .map(|o| {
                        held_by_id
                            .get(o)
                            .map(|held| ImmutableRef { held: held.clone() })
                            .ok_or_else(|| missing(o, Some(&pending.id)))
                    })
                    .transpose()
            };
            let parent = resolve(&pending.record.parent)?;
            let content = resolve(&pending.record.content)?;
            let held = Arc::new(Held {
                shared: self.shared.clone(),
                id: pending.id.clone(),
                n: pending.record.n,
                parent,
                foreign: content.is_some() || pending.record.record_type == DIFF_RECORD_TYPE,
                content,
                lock: Mutex::new(pending.lock),
            });
            self.shared.db().touch(&pending.id, true)?;
            let held = {
                let mut open = lock_mutex(&self.shared.open);
                match open.get(&pending.id).and_then(Weak::upgrade) {
                    // Another thread opened it meanwhile: ours goes (with its lock).
                    Some(existing) => existing,
                    None => {
                        open.insert(pending.id.clone(), Arc::downgrade(&held));
                        held
                    }
                }
            };
            held_by_id.insert(pending.id, held);
        }
        held_by_id
            .remove(id)
            .map(|held| ImmutableRef { held })
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    fn open_held(&self, id: &str) -> Option<Arc<Held>> {
        lock_mutex(&self.shared.open)
            .get(id)
            .and_then(Weak::upgrade)
    }

    /// Locks `id` (reached from `child`, or asked for when `None`) and, depth first, the
    /// records it mounts on; adds each after its ancestors to `walk.locked`. Records open
    /// in this process are taken as they are.
    fn lock_lineage(
        &self,
        id: &str,
        child: Option<&str>,
        before: &HashMap<String, Record>,
        walk: &mut LineageWalk,
    ) -> Result<()> {
        if !walk.visited.insert(id.to_owned()) {
            return Ok(());
        }
        if let Some(held) = self.open_held(id) {
            self.shared.db().touch(id, true)?;
            walk.reused.insert(id.to_owned(), held);
            return Ok(());
        }
        let record = before.get(id).ok_or_else(|| missing(id, child))?;
        match record.state {
            RecordState::Committed => {}
            RecordState::Mutable => {
                return Err(Error::WrongState {
                    id: id.to_owned(),
                    state: record.state,
                    wanted: "committed",
                });
            }
            _ => return Err(missing(id, child)),
        }
        let mut lock = RecordLock::open(&self.shared.lock_path(record.n), Create::Existing)?
            .ok_or_else(|| missing(id, child))?;
        if !lock.lock(LockKind::Shared, true)? {
            return Err(missing(id, child));
        }
        for ancestor in [&record.parent, &record.content].into_iter().flatten() {
            self.lock_lineage(ancestor, Some(id), before, walk)?;
        }
        walk.locked.push(PendingHold {
            id: id.to_owned(),
            child: child.map(str::to_owned),
            record: record.clone(),
            lock,
        });
        Ok(())
    }

    /// The mutable record `id` (a retained one without an open handle, e.g. a cache-mount
    /// directory found with [`find`](Snapshotter::find)).
    pub fn get_mutable(&self, id: &str) -> Result<MutableRef> {
        let (held, retain) = self.hold_mutable(id, LockKind::Exclusive)?;
        Ok(MutableRef {
            held: Some(held),
            retain,
        })
    }

    /// The mutable record `id`, held shared with other holders (see [`SharedMutableRef`]).
    /// Only a record that mounts as a plain directory can be shared: one without parent
    /// (or any on the native backend, whose snapshots are full trees).
    pub fn get_mutable_shared(&self, id: &str) -> Result<SharedMutableRef> {
        let (held, _) = self.hold_mutable(id, LockKind::Shared)?;
        Ok(SharedMutableRef { held: Some(held) })
    }

    /// Locks the mutable record `id` (`Shared`: only one that mounts as a plain
    /// directory), checks it again under the lock and opens its parent; returns the
    /// handle and whether the record is retained.
    fn hold_mutable(&self, id: &str, kind: LockKind) -> Result<(Arc<Held>, bool)> {
        let record = self
            .shared
            .db()
            .get(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if record.state != RecordState::Mutable {
            return Err(Error::WrongState {
                id: id.to_owned(),
                state: record.state,
                wanted: "mutable",
            });
        }
        let native = matches!(self.shared.backend, Backend::Native { .. });
        if kind == LockKind::Shared && record.parent.is_some() && !native {
            return Err(Error::WrongState {
                id: id.to_owned(),
                state: record.state,
                wanted: "mutable without parent",
            });
        }
        let mut lock = RecordLock::open(&self.shared.lock_path(record.n), Create::Existing)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if !lock.lock(kind, false)? {
            if !lock.still_linked() {
                return Err(Error::NotFound(id.to_owned()));
            }
            return Err(Error::Locked(id.to_owned()));
        }
        let record = self
            .shared
            .db()
            .get(id)?
            .filter(|r| r.state == RecordState::Mutable)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let parent = match &record.parent {
            Some(p) => Some(self.get(p)?),
            None => None,
        };
        self.shared.db().touch(id, true)?;
        let held = Arc::new(Held {
            shared: self.shared.clone(),
            id: id.to_owned(),
            n: record.n,
            parent,
            content: None,
            foreign: false,
            lock: Mutex::new(lock),
        });
        Ok((held, record.retain))
    }

    /// Takes record `id` out of `key`'s index and stops retaining it: whoever holds it
    /// deletes it on letting go, and nobody finds it again (a cache directory a step that
    /// ignores the cache replaces).
    pub fn detach(&self, id: &str, key: &str) -> Result<()> {
        let db = self.shared.db();
        db.remove_key(id, key)?;
        db.set_retain(id, false)?;
        Ok(())
    }

    /// A new writable snapshot holding a copy of `parent`'s tree, without a parent of its
    /// own: it mounts as a plain directory, so several processes can share it.
    pub fn new_mutable_copy(
        &self,
        parent: &ImmutableRef,
        options: &RefOptions,
    ) -> Result<MutableRef> {
        let (held, fs) = self.create(None, None, options, false)?;
        let fill = || -> Result<()> {
            let work = self.shared.work_dir(held.n);
            std::fs::DirBuilder::new()
                .mode(0o711)
                .create(&work)
                .map_err(io_err(&work))?;
            self.shared.db().touch(parent.id(), true)?;
            let view = crate::mount::View::mount(self.root(), &parent.mountable())?;
            let meta = std::fs::metadata(&view.path).map_err(io_err(&view.path))?;
            std::os::unix::fs::chown(&fs, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err(&fs))?;
            std::fs::set_permissions(
                &fs,
                std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
            )
            .map_err(io_err(&fs))?;
            let sys_err = |op, path: &Path| {
                let path = path.to_owned();
                move |source| Error::Sys { op, path, source }
            };
            let s = fsutil::open_dir(&view.path).map_err(sys_err("open", &view.path))?;
            let d = fsutil::open_dir(&fs).map_err(sys_err("open", &fs))?;
            fsutil::copy_tree(s.as_fd(), d.as_fd(), &|_| false)
                .map_err(sys_err("copying into", &fs))?;
            drop(view);
            if !self.shared.db().transition(
                &held.id,
                RecordState::Creating,
                RecordState::Mutable,
                None,
            )? {
                return Err(Error::NotFound(held.id.clone()));
            }
            Ok(())
        };
        if let Err(e) = fill() {
            let lock = lock_mutex(&held.lock);
            if let Err(cleanup) = self.shared.delete_locked(&held.id, held.n, &lock) {
                tracing::warn!("removing the failed snapshot {}: {cleanup}", held.id);
            }
            return Err(e);
        }
        tracing::debug!(id = held.id, n = held.n, "new mutable snapshot (copy)");
        Ok(MutableRef {
            held: Some(Arc::new(held)),
            retain: options.retain,
        })
    }

    /// Records indexed under `key` (e.g. `cache-dir:<key>`), oldest first.
    pub fn find(&self, key: &str) -> Result<Vec<Record>> {
        Ok(self.shared.db().by_key(key)?)
    }

    /// The metadata of record `id`.
    pub fn record(&self, id: &str) -> Result<Record> {
        self.shared
            .db()
            .get(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// A committed layer with this chain id, if the store has one.
    pub fn get_by_chain_id(&self, chain_id: &str) -> Result<Option<ImmutableRef>> {
        let candidates = self.shared.db().by_chain_id(chain_id)?;
        for record in candidates {
            match self.get(&record.id) {
                Ok(r) => return Ok(Some(r)),
                Err(Error::NotFound(_) | Error::MissingParent { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Applies an OCI layer (tar, gzip or zstd) on `parent` as a new committed snapshot.
    /// With `options.diff_id` set and a layer of that chain already stored, returns it
    /// without reading `layer`. On a parent that was never exported or imported as a
    /// layer (a step's result) the new layer's chain id is unknown until it is exported.
    pub fn import_layer(
        &self,
        parent: Option<&ImmutableRef>,
        layer: impl Read,
        options: &ImportOptions,
    ) -> Result<ImmutableRef> {
        // Outer None: the parent's chain is unknown; inner None: there is no parent.
        let parent_chain: Option<Option<String>> = match parent {
            Some(p) => p.layer_info()?.map(|l| Some(l.chain_id)),
            None => Some(None),
        };
        if let (Some(diff_id), Some(parent_chain)) = (&options.diff_id, &parent_chain) {
            let chain_id = layer::chain_id(parent_chain.as_deref(), diff_id);
            if let Some(existing) = self.get_by_chain_id(&chain_id)? {
                return Ok(existing);
            }
        }
        let ref_options = RefOptions {
            description: options.description.clone(),
            record_type: options.record_type.clone(),
            retain: false,
            keys: Vec::new(),
        };
        let (held, fs) = self.create(parent, None, &ref_options, false)?;
        let held = Arc::new(held);
        let fill = || -> Result<()> {
            if let (Backend::Native { .. }, Some(p)) = (self.shared.backend, parent) {
                copy_parent(&p.held, &fs)?;
            }
            let mode = match self.shared.backend {
                Backend::Overlay { xattrs } => layer::ApplyMode::Overlay(xattrs),
                Backend::Native { .. } => layer::ApplyMode::Merged,
            };
            let applied = layer::apply(&fs, layer, mode, options)?;
            if let Some(expected) = &options.diff_id {
                if expected != &applied.diff_id {
                    return Err(LayerError::DiffIdMismatch {
                        expected: expected.clone(),
                        actual: applied.diff_id,
                    }
                    .into());
                }
            }
            let info = parent_chain.as_ref().map(|parent_chain| LayerInfo {
                chain_id: layer::chain_id(parent_chain.as_deref(), &applied.diff_id),
                diff_id: applied.diff_id,
                blob_digest: applied.blob_digest,
                blob_size: applied.blob_size,
                media_type: options.media_type.clone(),
            });
            let commit = || -> Result<()> {
                let db = self.shared.db();
                if let Some(info) = &info {
                    db.set_layer(&held.id, info)?;
                }
                if !db.transition(
                    &held.id,
                    RecordState::Creating,
                    RecordState::Committed,
                    Some(&self.shared.boot_id),
                )? {
                    return Err(Error::NotFound(held.id.clone()));
                }
                Ok(())
            };
            commit()
        };
        if let Err(e) = fill() {
            // Nothing half-made stays behind: the record is ours (exclusive lock) to remove.
            let lock = lock_mutex(&held.lock);
            if let Err(cleanup) = self.shared.delete_locked(&held.id, held.n, &lock) {
                tracing::warn!("removing the failed import {}: {cleanup}", held.id);
            }
            return Err(e);
        }
        self.publish(held)
    }

    /// A committed layer on `parent` whose contents are `layer`'s directory, reused
    /// without copying (overlay only: a native snapshot is a full tree, not a layer).
    pub(crate) fn reuse_layer(
        &self,
        parent: Option<&ImmutableRef>,
        layer: &ImmutableRef,
        options: &RefOptions,
    ) -> Result<ImmutableRef> {
        let content = layer.content().unwrap_or(layer);
        let (held, _fs) = self.create(parent, Some(content), options, false)?;
        let held = Arc::new(held);
        let committed = self.shared.db().transition(
            &held.id,
            RecordState::Creating,
            RecordState::Committed,
            // Nothing of its own to sync: its data is the committed `content`'s.
            None,
        );
        match committed {
            Ok(true) => self.publish(held),
            other => {
                let lock = lock_mutex(&held.lock);
                if let Err(cleanup) = self.shared.delete_locked(&held.id, held.n, &lock) {
                    tracing::warn!("removing the failed snapshot {}: {cleanup}", held.id);
                }
                Err(match other {
                    Err(e) => e.into(),
                    _ => Error::NotFound(held.id.clone()),
                })
            }
        }
    }

    /// Converts a freshly committed record's exclusive lock to a shared one and registers
    /// it as an open immutable record.
    fn publish(&self, held: Arc<Held>) -> Result<ImmutableRef> {
        lock_mutex(&held.lock).lock(LockKind::Shared, false)?;
        lock_mutex(&self.shared.open).insert(held.id.clone(), Arc::downgrade(&held));
        Ok(ImmutableRef { held })
    }

    /// Writes the diff of `layer` against its parent as an OCI layer tar to `out`.
    pub fn export_layer(
        &self,
        layer: &ImmutableRef,
        out: impl Write,
        compression: Compression,
    ) -> Result<LayerDescriptor> {
        let own = layer.dir();
        let chain: Vec<PathBuf> = layer.parents().map(ImmutableRef::dir).collect();
        let descriptor = match self.shared.backend {
            Backend::Overlay { .. } => layer::export_upper(&own, &chain, out, compression)?,
            Backend::Native { .. } => {
                layer::export_compare(&own, chain.first().map(PathBuf::as_path), out, compression)?
            }
        };
        if layer.layer_info()?.is_none() {
            let parent_chain = match layer.parent() {
                Some(p) => p.layer_info()?.map(|l| l.chain_id),
                None => None,
            };
            if layer.parent().is_none() || parent_chain.is_some() {
                let info = LayerInfo {
                    chain_id: layer::chain_id(parent_chain.as_deref(), &descriptor.diff_id),
                    diff_id: descriptor.diff_id.clone(),
                    blob_digest: Some(descriptor.digest.clone()),
                    blob_size: Some(descriptor.size),
                    media_type: Some(descriptor.media_type.to_owned()),
                };
                self.shared.db().set_layer(layer.id(), &info)?;
            }
        }
        Ok(descriptor)
    }

    /// Disk usage, one entry per record.
    pub fn du(&self) -> Result<Vec<UsageInfo>> {
        let records = self.shared.db().all()?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let in_use = r.state != RecordState::Committed && r.state != RecordState::Mutable
                || self.in_use(&r)?;
            let children = !self.shared.db().children(&r.id)?.is_empty();
            let size = match r.size {
                Some(s) if r.state == RecordState::Committed => s,
                _ => {
                    let s = fsutil::disk_usage(&self.shared.dir(r.n)).unwrap_or(0);
                    if r.state == RecordState::Committed {
                        self.shared.db().set_size(&r.id, Some(s))?;
                    }
                    s
                }
            };
            let keys = self.shared.db().keys(&r.id)?;
            out.push(UsageInfo {
                reclaimable: !in_use && !children,
                id: r.id,
                parent: r.parent,
                state: r.state,
                in_use,
                size,
                created_at: r.created_at,
                last_used_at: r.last_used_at,
                usage_count: r.usage_count,
                description: r.description,
                record_type: r.record_type,
                retain: r.retain,
                keys,
            });
        }
        Ok(out)
    }

    /// Whether any process holds a lock on the record.
    fn in_use(&self, r: &Record) -> Result<bool> {
        let Some(mut lock) = RecordLock::open(&self.shared.lock_path(r.n), Create::Existing)?
        else {
            return Ok(false);
        };
        Ok(!lock.lock(LockKind::Exclusive, false)?)
    }

    /// Removes records without handles and without children (repeatedly, as removing a
    /// child frees its parent); with `keep_duration`, only those unused for that long.
    /// Returns the removed records' ids.
    pub fn prune(&self, options: PruneOptions) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        loop {
            let cutoff = options
                .keep_duration
                .and_then(|d| SystemTime::now().checked_sub(d));
            let records = self.shared.db().all()?;
            let mut progress = false;
            for r in records {
                if !matches!(r.state, RecordState::Committed | RecordState::Mutable) {
                    continue;
                }
                if cutoff.is_some_and(|c| r.last_used_at > c) {
                    continue;
                }
                if self.try_remove(&r.id)? {
                    removed.push(r.id);
                    progress = true;
                }
            }
            if !progress {
                return Ok(removed);
            }
        }
    }

    /// Removes committed snapshots that are not retained (no cache record keeps them),
    /// that nobody holds and nothing is built on: the temporary results of a build, such as
    /// a `local://` copy whose key can never match again or an output nobody cached.
    /// Returns the removed ids.
    pub fn remove_unretained(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        loop {
            let mut progress = false;
            // Collected first: the store's lock must not be held while removing.
            let records = self.shared.db().unretained()?;
            for r in records {
                if self.try_remove(&r.id)? {
                    removed.push(r.id);
                    progress = true;
                }
            }
            // Removing a child can free its parent.
            if !progress {
                return Ok(removed);
            }
        }
    }

    /// Removes record `id` if nobody holds it and it has no children.
    fn try_remove(&self, id: &str) -> Result<bool> {
        let Some(record) = self.shared.db().get(id)? else {
            return Ok(false);
        };
        let Some(mut lock) = RecordLock::open(&self.shared.lock_path(record.n), Create::Existing)?
        else {
            return Ok(false);
        };
        if !lock.lock(LockKind::Exclusive, false)? {
            return Ok(false);
        }
        // Re-read under the lock: the record may have changed or gained a child.
        let Some(record) = self.shared.db().get(id)? else {
            return Ok(false);
        };
        if !self.shared.db().children(id)?.is_empty() {
            return Ok(false);
        }
        self.shared.delete_locked(&record.id, record.n, &lock)?;
        Ok(true)
    }

    /// Removes what a crash left behind (see the crate docs); run on open.
    fn recover(&self) -> Result<()> {
        let records = self.shared.db().needing_recovery(&self.shared.boot_id)?;
        let mut lost_boot: Vec<String> = Vec::new();
        for r in records {
            let abandoned = match r.state {
                RecordState::Creating | RecordState::Removing => true,
                RecordState::Mutable => !r.retain,
                RecordState::Committed => false,
            };
            if r.unsynced_boot
                .as_deref()
                .is_some_and(|b| b != self.shared.boot_id)
            {
                lost_boot.push(r.id.clone());
            }
            if abandoned {
                self.recover_one(&r)?;
            }
        }
        // Committed before a reboot and never synced: the data may be incomplete, and so
        // may every layer built on it.
        for id in lost_boot {
            self.remove_with_descendants(&id)?;
        }
        self.remove_orphans()?;
        Ok(())
    }

    fn recover_one(&self, r: &Record) -> Result<()> {
        let lock_path = self.shared.lock_path(r.n);
        let (lock, recreated) = match RecordLock::open(&lock_path, Create::Existing)? {
            Some(mut lock) => {
                if !lock.lock(LockKind::Exclusive, false)? {
                    return Ok(());
                }
                (lock, false)
            }
            None => {
                // A deletion unlinks the lock file before it drops the row; without it
                // nobody can hold the record. Recreate it to delete under the usual
                // protocol — unless another process just did (a deletion finishing, or
                // another opener recovering the same record): it is at it.
                let mut lock = match RecordLock::open(&lock_path, Create::New) {
                    Ok(Some(lock)) => lock,
                    Ok(None) => return Ok(()),
                    Err(LockError::Open { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                };
                if !lock.lock(LockKind::Exclusive, false)? {
                    return Ok(());
                }
                (lock, true)
            }
        };
        let Some(current) = self.shared.db().get(&r.id)? else {
            // The deletion finished meanwhile. A number that had a record is never taken
            // again, so the lock file recreated above would stay forever.
            if recreated {
                lock.unlink()?;
            }
            return Ok(());
        };
        let abandoned = match current.state {
            RecordState::Creating | RecordState::Removing => true,
            RecordState::Mutable => !current.retain,
            RecordState::Committed => false,
        };
        if abandoned && self.shared.db().children(&r.id)?.is_empty() {
            tracing::info!(
                id = r.id,
                state = ?current.state,
                "removing a snapshot left behind by an interrupted kiln"
            );
            self.shared.delete_locked(&current.id, current.n, &lock)?;
        }
        Ok(())
    }

    fn remove_with_descendants(&self, id: &str) -> Result<()> {
        for child in self.shared.db().children(id)? {
            self.remove_with_descendants(&child.id)?;
        }
        if self.try_remove(id)? {
            tracing::warn!(
                id,
                "removed a snapshot committed before a reboot that was never synced"
            );
        }
        Ok(())
    }

    /// Directories and lock files without a record. Only a creation killed before its
    /// transaction committed leaves them now, at the number the next creation takes (the
    /// rolled-back `next_n`), so one look there suffices and a store's opening costs the
    /// same whatever its size. Stores older than that rule (where a killed deletion could
    /// leave a lock file anywhere) are listed in full once.
    fn remove_orphans(&self) -> Result<()> {
        let db = self.shared.db();
        let tracked = db.setting(ORPHANS_SETTING)?.as_deref() == Some(ORPHANS_AT_NEXT);
        let exists = |p: &Path| p.symlink_metadata().is_ok();
        let at_next = |db: &Db| -> Result<Vec<u64>> {
            let n = db.next_number()?;
            Ok(
                if exists(&self.shared.dir(n)) || exists(&self.shared.lock_path(n)) {
                    vec![n]
                } else {
                    Vec::new()
                },
            )
        };
        // Nothing at the next number (the common case) needs no write lock. Something
        // there may be a creation in progress in another process: looked at again under
        // the write lock, which waits for that creation to commit.
        if tracked && at_next(&db)?.is_empty() {
            return Ok(());
        }
        db.excluding_creations(|db| {
            let numbers = if tracked {
                at_next(db)?
            } else {
                self.orphan_numbers(db)?
            };
            for n in numbers {
                let lock_path = self.shared.lock_path(n);
                let mut lock = match RecordLock::open(&lock_path, Create::Existing)? {
                    Some(lock) => lock,
                    None => match RecordLock::open(&lock_path, Create::New) {
                        Ok(Some(lock)) => lock,
                        // Someone else is at it.
                        _ => continue,
                    },
                };
                if !lock.lock(LockKind::Exclusive, false)? || db.get_by_n(n)?.is_some() {
                    continue;
                }
                let dir = self.shared.dir(n);
                fsutil::remove_tree(&dir).map_err(io_err(&dir))?;
                lock.unlink()?;
            }
            if !tracked {
                db.set_setting(ORPHANS_SETTING, ORPHANS_AT_NEXT)?;
            }
            Ok(())
        })
    }

    /// Numbers that have a directory or a lock file but no record; `db` must be held
    /// with [`Db::excluding_creations`], or a creation in progress would be listed.
    fn orphan_numbers(&self, db: &Db) -> Result<Vec<u64>> {
        let mut numbers = std::collections::BTreeSet::new();
        for (dir, prefix, suffix) in [
            (&self.shared.snapshots, "", ""),
            (&self.shared.locks, "snapshot-", ".lock"),
        ] {
            let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
            for entry in entries {
                let entry = entry.map_err(io_err(dir))?;
                let name = entry.file_name();
                let Some(n) = name
                    .to_str()
                    .and_then(|s| s.strip_prefix(prefix))
                    .and_then(|s| s.strip_suffix(suffix))
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                numbers.insert(n);
            }
        }
        // One query, not one per directory: a store can hold thousands of snapshots.
        let known = db.numbers()?;
        Ok(numbers.into_iter().filter(|n| !known.contains(n)).collect())
    }

    /// Checks the store for inconsistencies; an empty list means it is sound. Records being
    /// made or removed by a live process are not problems.
    pub fn verify(&self) -> Result<Vec<Inconsistency>> {
        let mut problems = Vec::new();
        let mut report = |id: Option<&str>, problem: String| {
            problems.push(Inconsistency {
                id: id.map(str::to_owned),
                problem,
            });
        };
        if let Some(result) = self.shared.db().integrity()? {
            report(None, format!("database check failed: {result}"));
        }
        let records = self.shared.db().all()?;
        let ids: HashMap<&str, &Record> = records.iter().map(|r| (r.id.as_str(), r)).collect();
        for r in &records {
            let id = Some(r.id.as_str());
            let busy = self.in_use(r)?;
            match r.state {
                RecordState::Creating | RecordState::Removing if !busy => {
                    report(id, format!("left {:?} by a process that is gone", r.state));
                }
                RecordState::Mutable if !r.retain && !busy => {
                    report(id, "an unretained mutable snapshot nobody holds".into());
                }
                _ => {}
            }
            if RecordLock::open(&self.shared.lock_path(r.n), Create::Existing)?.is_none() {
                report(id, "its lock file is missing".into());
            }
            let settled = matches!(r.state, RecordState::Committed | RecordState::Mutable);
            if settled && !self.shared.fs_dir(r.n).is_dir() {
                report(
                    id,
                    format!("directory {} is missing", self.shared.fs_dir(r.n).display()),
                );
            }
            if r.state == RecordState::Mutable
                && r.parent.is_some()
                && !self.shared.work_dir(r.n).is_dir()
            {
                report(
                    id,
                    "the work directory of a mutable snapshot is missing".into(),
                );
            }
            if let Some(p) = &r.parent {
                match ids.get(p.as_str()) {
                    None => report(id, format!("parent {p} does not exist")),
                    Some(parent) if parent.state != RecordState::Committed => {
                        report(
                            id,
                            format!("parent {p} is {:?}, not committed", parent.state),
                        );
                    }
                    Some(_) => {}
                }
            }
            if let Some(c) = &r.content {
                match ids.get(c.as_str()) {
                    None => report(id, format!("the snapshot {c} it reuses does not exist")),
                    Some(content) if content.state != RecordState::Committed => {
                        report(
                            id,
                            format!("the snapshot {c} it reuses is {:?}", content.state),
                        );
                    }
                    Some(content) if content.content.is_some() => {
                        report(id, format!("the snapshot {c} it reuses reuses another"));
                    }
                    Some(_) => {}
                }
                if r.state != RecordState::Committed && !busy {
                    report(id, "a reused layer that is not committed".into());
                }
            }
            if let (Some(layer), Some(p)) = (&r.layer, &r.parent) {
                let parent_chain = ids.get(p.as_str()).and_then(|p| p.layer.as_ref());
                if let Some(pl) = parent_chain {
                    let expected = layer::chain_id(Some(&pl.chain_id), &layer.diff_id);
                    if expected != layer.chain_id {
                        report(
                            id,
                            format!("chain id {} should be {expected}", layer.chain_id),
                        );
                    }
                }
            }
        }
        let orphans = self.shared.db().excluding_creations(|db| {
            let mut orphans = Vec::new();
            for n in self.orphan_numbers(db)? {
                let busy = match RecordLock::open(&self.shared.lock_path(n), Create::Existing)? {
                    Some(mut lock) => !lock.lock(LockKind::Exclusive, false)?,
                    None => false,
                };
                if !busy {
                    orphans.push(n);
                }
            }
            Ok::<_, Error>(orphans)
        })?;
        for n in orphans {
            report(
                None,
                format!("snapshot directory or lock {n} has no record"),
            );
        }
        Ok(problems)
    }
}

/// The setting that says where directories and locks without a record can be: `at-next` once
/// a full listing ran under the rule that only a killed creation leaves them.
const ORPHANS_SETTING: &str = "orphans";
const ORPHANS_AT_NEXT: &str = "at-next";

fn choose_backend(
    root: &Path,
    db: &Db,
    choice: BackendChoice,
    xattrs: XattrNamespace,
) -> Result<Backend> {
    let recorded = db.setting("backend")?;
    let wanted = match choice {
        BackendChoice::Auto => None,
        BackendChoice::Overlay => Some("overlay"),
        BackendChoice::Native => Some("native"),
    };
    if let (Some(recorded), Some(wanted)) = (&recorded, wanted) {
        if recorded != wanted {
            return Err(Error::BackendMismatch {
                root: root.to_owned(),
                recorded: recorded.clone(),
                wanted,
            });
        }
    }
    let native = Backend::Native { xattrs };
    let use_native = recorded.as_deref() == Some("native") || wanted == Some("native");
    if use_native {
        tracing::warn!(
            "snapshot store {}: using the NATIVE backend (every snapshot is a full copy of \
             its parent; slow and disk-hungry){}",
            root.display(),
            if wanted == Some("native") {
                " because it was asked for"
            } else {
                " as recorded when the store was created"
            }
        );
        db.setting_or_insert("backend", "native")?;
        return Ok(native);
    }
    // One probe per boot: a store whose overlay worked since this boot (same xattr
    // namespace) skips the probe mount, which cost more than a whole cached build.
    let stamp = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|boot| format!("{}:{xattrs:?}", boot.trim()));
    if recorded.as_deref() == Some("overlay")
        && stamp.is_some()
        && db.setting("overlay_probed")? == stamp
    {
        tracing::info!(
            "snapshot store {}: using kernel overlayfs, probed earlier since this boot",
            root.display()
        );
        return Ok(Backend::Overlay { xattrs });
    }
    // A directory of this process's own: kiln processes opening one store at once would
    // otherwise remove each other's probe mid-way (and fall back to, or fail on, native).
    let probe =
        backend::probe_overlay(&root.join(format!("probe-{}", std::process::id())), xattrs)?;
    if probe.overlay_works {
        tracing::info!(
            "snapshot store {}: using kernel overlayfs ({}), probe mount succeeded",
            root.display(),
            match xattrs {
                XattrNamespace::Trusted => "rootful, trusted.overlay.* xattrs",
                XattrNamespace::User => "rootless, userxattr and user.overlay.* xattrs",
            }
        );
        db.setting_or_insert("backend", "overlay")?;
        if let Some(stamp) = &stamp {
            db.set_setting("overlay_probed", stamp)?;
        }
        return Ok(Backend::Overlay { xattrs });
    }
    let reason = probe.reason.unwrap_or_default();
    if recorded.as_deref() == Some("overlay") || wanted == Some("overlay") {
        return Err(Error::OverlayUnavailable {
            root: root.to_owned(),
            reason,
        });
    }
    tracing::warn!(
        "snapshot store {}: kernel overlayfs does not work here ({reason}); FALLING BACK TO \
         THE NATIVE BACKEND: every snapshot is a full copy of its parent (reflinked where the \
         filesystem allows), which is slow and disk-hungry",
        root.display()
    );
    db.setting_or_insert("backend", "native")?;
    Ok(native)
}

/// Makes the directory with a record's own contents; the root of a layer starts with its
/// parent's root ownership and mode (the merged root of an overlay is its upper's root).
fn make_fs_dir(shared: &Shared, n: u64, parent: Option<&ImmutableRef>) -> Result<PathBuf> {
    let fs = shared.fs_dir(n);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&fs)
        .map_err(io_err(&fs))?;
    if let Some(p) = parent {
        let pfs = p.dir();
        let meta = std::fs::metadata(&pfs).map_err(io_err(&pfs))?;
        std::os::unix::fs::chown(&fs, Some(meta.uid()), Some(meta.gid())).map_err(io_err(&fs))?;
        std::fs::set_permissions(
            &fs,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
        )
        .map_err(io_err(&fs))?;
    }
    Ok(fs)
}

fn copy_parent(parent: &Held, fs: &Path) -> Result<()> {
    let src = parent.shared.fs_dir(parent.n);
    let sys_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Sys { op, path, source }
    };
    let s = fsutil::open_dir(&src).map_err(sys_err("open", &src))?;
    let d = fsutil::open_dir(fs).map_err(sys_err("open", fs))?;
    fsutil::copy_tree(s.as_fd(), d.as_fd(), &|_| false).map_err(sys_err("copying into", fs))
}

impl ImmutableRef {
    /// The record id.
    pub fn id(&self) -> &str {
        &self.held.id
    }

    /// The parent, if any.
    pub fn parent(&self) -> Option<&ImmutableRef> {
        self.held.parent.as_ref()
    }

    /// The parents, nearest first.
    pub fn parents(&self) -> impl Iterator<Item = &ImmutableRef> {
        std::iter::successors(self.parent(), |p| p.parent())
    }

    /// The directory with this layer's contents (read-only by contract): its own, or
    /// that of the snapshot it reuses.
    pub fn dir(&self) -> PathBuf {
        match &self.held.content {
            Some(content) => content.dir(),
            None => self.held.shared.fs_dir(self.held.n),
        }
    }

    /// Whether this layer can change what any of `paths` (relative to the root, plain
    /// names, no symlinks on the way in the layers below) shows over its parents: it has
    /// an entry there or on the way (a file, a whiteout, an opaque or replaced directory).
    /// A full copy (the native backend) has them all. `true` when in doubt.
    pub fn shadows_any(&self, paths: &[&str]) -> bool {
        fsutil::layer_shadows_any(&self.dir(), paths)
    }

    /// The record whose directory this layer reuses, if it reuses one.
    pub fn content(&self) -> Option<&ImmutableRef> {
        self.held.content.as_ref()
    }

    /// The overlay lower directories of this layer and its parents, nearest first. A
    /// bottom layer that may hold whiteouts made against other lowers (a reused layer, a
    /// diff) gets the store's empty directory below it, so overlay applies them to nothing
    /// instead of showing them.
    fn lower_dirs(&self) -> Vec<PathBuf> {
        let mut lowers = vec![self.dir()];
        lowers.extend(self.parents().map(ImmutableRef::dir));
        let bottom = self.parents().last().unwrap_or(self);
        if bottom.held.foreign {
            lowers.push(self.held.shared.empty.clone());
        }
        lowers
    }

    /// A read-only view: a bind of a single layer, or an overlay of the chain.
    pub fn mountable(&self) -> Mountable {
        let shared = &self.held.shared;
        if let Backend::Native { .. } = shared.backend {
            return Mountable::Bind {
                source: self.dir(),
                readonly: true,
            };
        }
        let mut lowers = self.lower_dirs();
        if lowers.len() == 1 {
            return Mountable::Bind {
                source: lowers.remove(0),
                readonly: true,
            };
        }
        Mountable::Overlay(OverlayMount {
            lowers,
            upper: None,
            work: None,
            userxattr: shared.backend.xattrs() == XattrNamespace::User,
            volatile: false,
            plain_upper: true,
        })
    }

    /// The stored metadata.
    pub fn record(&self) -> Result<Record> {
        self.held
            .shared
            .db()
            .get(&self.held.id)?
            .ok_or_else(|| Error::NotFound(self.held.id.clone()))
    }

    /// Layer digests, when known (imported or exported layers).
    pub fn layer_info(&self) -> Result<Option<LayerInfo>> {
        Ok(self.record()?.layer)
    }

    /// Size of this layer's own directory (computed once, then cached); a reused layer
    /// owns next to nothing.
    pub fn size(&self) -> Result<u64> {
        let record = self.record()?;
        if let Some(size) = record.size {
            return Ok(size);
        }
        let dir = self.held.shared.fs_dir(self.held.n);
        let size = fsutil::disk_usage(&dir).map_err(|source| Error::Sys {
            op: "measuring",
            path: dir,
            source,
        })?;
        self.held.shared.db().set_size(self.id(), Some(size))?;
        Ok(size)
    }

    /// When the record was last used.
    pub fn last_used(&self) -> Result<SystemTime> {
        Ok(self.record()?.last_used_at)
    }

    /// A value stored with the record under `key` (facts about its immutable content,
    /// such as content hashes, that are costly to compute again); removed with it.
    pub fn annotation(&self, key: &str) -> Result<Option<String>> {
        Ok(self.held.shared.db().annotation(self.id(), key)?)
    }

    /// Stores `value` under `key` with the record (see [`ImmutableRef::annotation`]).
    pub fn set_annotation(&self, key: &str, value: &str) -> Result<()> {
        Ok(self
            .held
            .shared
            .db()
            .set_annotation(self.id(), key, value)?)
    }

    /// Keeps (or stops keeping) the record when unused; prune still removes it.
    pub fn set_retain(&self, retain: bool) -> Result<()> {
        Ok(self.held.shared.db().set_retain(self.id(), retain)?)
    }

    /// Indexes the record under `key`.
    pub fn add_key(&self, key: &str) -> Result<()> {
        Ok(self.held.shared.db().add_key(self.id(), key)?)
    }

    /// Removes the record from `key`'s index.
    pub fn remove_key(&self, key: &str) -> Result<()> {
        Ok(self.held.shared.db().remove_key(self.id(), key)?)
    }

    /// Drops this handle (the same as dropping it).
    pub fn release(self) {}
}

impl MutableRef {
    fn held(&self) -> &Arc<Held> {
        // `held` is only taken by commit and release, which consume `self`.
        self.held
            .as_ref()
            .unwrap_or_else(|| unreachable!("mutable ref used after commit or release"))
    }

    /// The record id.
    pub fn id(&self) -> &str {
        &self.held().id
    }

    /// The parent, if any.
    pub fn parent(&self) -> Option<&ImmutableRef> {
        self.held().parent.as_ref()
    }

    /// The writable upper directory.
    pub fn dir(&self) -> PathBuf {
        self.held().shared.fs_dir(self.held().n)
    }

    /// How to mount it writable: an overlay of the parent chain with this upper (mounted
    /// `volatile`), or a bind of its own directory without parent (and for the native
    /// backend). One mount at a time: overlay refuses to share an upper.
    pub fn mountable(&self) -> Mountable {
        let held = self.held();
        let shared = &held.shared;
        let dir = self.dir();
        match (shared.backend, &held.parent) {
            (Backend::Native { .. }, _) | (_, None) => Mountable::Bind {
                source: dir,
                readonly: false,
            },
            (Backend::Overlay { xattrs }, Some(parent)) => {
                let lowers = parent.lower_dirs();
                Mountable::Overlay(OverlayMount {
                    lowers,
                    upper: Some(dir),
                    work: Some(shared.work_dir(held.n)),
                    userxattr: xattrs == XattrNamespace::User,
                    volatile: true,
                    plain_upper: true,
                })
            }
        }
    }

    /// Indexes the record under `key`.
    pub fn add_key(&self, key: &str) -> Result<()> {
        Ok(self.held().shared.db().add_key(self.id(), key)?)
    }

    /// Removes the record from `key`'s index.
    pub fn remove_key(&self, key: &str) -> Result<()> {
        Ok(self.held().shared.db().remove_key(self.id(), key)?)
    }

    /// Current size of the writable directory.
    pub fn size(&self) -> Result<u64> {
        let dir = self.dir();
        fsutil::disk_usage(&dir).map_err(|source| Error::Sys {
            op: "measuring",
            path: dir,
            source,
        })
    }

    /// Makes the snapshot immutable, in O(1): no data is copied. Nothing may write to it
    /// any more: its mounts are gone or going (a commit writes only metadata, so a lazy
    /// unmount may still be under way), and the caller mounts a child of it only once they
    /// are gone. The data is durable after [`Snapshotter::sync`] (see the crate docs).
    pub fn commit(mut self) -> Result<ImmutableRef> {
        let held = self
            .held
            .take()
            .unwrap_or_else(|| unreachable!("commit after release"));
        let shared = held.shared.clone();
        if !shared.db().transition(
            &held.id,
            RecordState::Mutable,
            RecordState::Committed,
            Some(&shared.boot_id),
        )? {
            return Err(Error::NotFound(held.id.clone()));
        }
        // The work directory stays (a few empty directories) until the snapshot is deleted:
        // removing it here would cost more than the rest of the commit.
        Snapshotter { shared }.publish(held)
    }

    /// Gives the snapshot up: deleted now unless it is retained (then only its last use is
    /// recorded).
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    /// Holds the snapshot shared from now on (see [`SharedMutableRef`]); it must mount as
    /// a plain directory.
    pub fn into_shared(mut self) -> Result<SharedMutableRef> {
        let held = self
            .held
            .take()
            .unwrap_or_else(|| unreachable!("mutable ref used after commit or release"));
        let native = matches!(held.shared.backend, Backend::Native { .. });
        if held.parent.is_some() && !native {
            let id = held.id.clone();
            // Back to this handle, which releases it as usual.
            self.held = Some(held);
            return Err(Error::WrongState {
                id,
                state: RecordState::Mutable,
                wanted: "mutable without parent",
            });
        }
        // OFD locks convert atomically: nobody can take the record in between.
        lock_mutex(&held.lock).lock(LockKind::Shared, false)?;
        Ok(SharedMutableRef { held: Some(held) })
    }

    fn release_inner(&mut self) -> Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        // Retained when opened, but maybe detached since (see [`Snapshotter::detach`]).
        if self.retain && held.shared.db().get(&held.id)?.is_some_and(|r| r.retain) {
            return Ok(());
        }
        let lock = lock_mutex(&held.lock);
        held.shared.delete_locked(&held.id, held.n, &lock)
    }
}

impl SharedMutableRef {
    /// The record id.
    pub fn id(&self) -> &str {
        &self.held().id
    }

    fn held(&self) -> &Arc<Held> {
        // `held` is only taken by drop.
        self.held
            .as_ref()
            .unwrap_or_else(|| unreachable!("shared mutable ref used after drop"))
    }

    /// The snapshot's directory, written by every holder.
    pub fn dir(&self) -> PathBuf {
        self.held().shared.fs_dir(self.held().n)
    }

    /// A writable bind of [`dir`](SharedMutableRef::dir).
    pub fn mountable(&self) -> Mountable {
        Mountable::Bind {
            source: self.dir(),
            readonly: false,
        }
    }
}

impl Drop for SharedMutableRef {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let retained = held
            .shared
            .db()
            .get(&held.id)
            .map(|r| r.is_some_and(|r| r.retain));
        if !matches!(retained, Ok(false)) {
            return;
        }
        // Detached: the last holder deletes it (when two let go at once and neither sees
        // itself last, the next kiln to open the store removes it).
        let mut lock = lock_mutex(&held.lock);
        if matches!(lock.lock(LockKind::Exclusive, false), Ok(true)) {
            if let Err(e) = held.shared.delete_locked(&held.id, held.n, &lock) {
                tracing::warn!("removing the detached snapshot {}: {e}", held.id);
            }
        }
    }
}

impl Drop for MutableRef {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!("releasing a mutable snapshot: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_cross_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Snapshotter>();
        shareable::<ImmutableRef>();
        shareable::<MutableRef>();
    }

    fn native_store(root: &Path) -> Snapshotter {
        Snapshotter::open_with(
            root,
            StoreOptions {
                backend: BackendChoice::Native,
            },
        )
        .unwrap()
    }

    fn exists(path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn committed(store: &Snapshotter) -> ImmutableRef {
        store
            .new_mutable(None, &RefOptions::default())
            .unwrap()
            .commit()
            .unwrap()
    }

    #[test]
    fn a_creation_killed_before_its_commit_leaves_nothing_after_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let store = native_store(tmp.path());
        let kept = committed(&store);
        let n = store.shared.db().next_number().unwrap();
        let (dir, lock) = (store.shared.dir(n), store.shared.lock_path(n));
        drop(kept);
        drop(store);
        // What a creation killed inside its transaction leaves: a directory and a lock at
        // the number its rolled-back transaction had taken, and no row.
        std::fs::create_dir_all(dir.join("fs")).unwrap();
        std::fs::write(&lock, "").unwrap();
        let store = native_store(tmp.path());
        assert!(!exists(&dir) && !exists(&lock), "the orphan at {n} stays");
        assert!(store.verify().unwrap().is_empty());
        assert_eq!(store.du().unwrap().len(), 1, "the committed record stays");
    }

    #[test]
    fn an_opening_leaves_a_creation_in_progress_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = native_store(tmp.path());
        // Another process's store, opened before the creation began: what it does at
        // opening, looking for orphans, it does while the creation runs.
        let other = native_store(tmp.path());
        let id = new_id();
        let new = NewRecord {
            id: &id,
            parent: None,
            content: None,
            retain: false,
            description: "",
            record_type: "regular",
        };
        let (n, (lock, looked_after)) = store
            .shared
            .db()
            .insert(&new, RecordState::Creating, |n| -> Result<_> {
                // Where another process's opening used to probe the lock (it found a lock
                // file at the next number and no row): made, not locked yet.
                let mut lock = RecordLock::open(&store.shared.lock_path(n), Create::New)?
                    .expect("a fresh lock file");
                let start = std::time::Instant::now();
                let opener = std::thread::spawn(move || {
                    other.remove_orphans().unwrap();
                    start.elapsed()
                });
                std::thread::sleep(std::time::Duration::from_millis(300));
                assert!(
                    lock.lock(LockKind::Exclusive, false)?,
                    "the opening took the lock of a record being made"
                );
                std::fs::create_dir(store.shared.dir(n)).unwrap();
                Ok((lock, opener))
            })
            .unwrap();
        let looked_after = looked_after.join().unwrap();
        assert!(
            looked_after >= std::time::Duration::from_millis(300),
            "the look for orphans did not wait for the creation ({looked_after:?})"
        );
        assert!(
            exists(&store.shared.lock_path(n)),
            "the opening unlinked the new lock"
        );
        assert!(exists(&store.shared.dir(n)));
        assert!(store.verify().unwrap().is_empty());
        drop(lock);
    }

    #[test]
    fn a_deletion_killed_after_unlinking_the_lock_is_finished_by_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        let store = native_store(tmp.path());
        let id = committed(&store).id().to_owned();
        let n = store.shared.db().get(&id).unwrap().unwrap().n;
        // The steps of a deletion up to the kill: marked, directory gone, lock unlinked.
        store.shared.db().mark_removing(&id).unwrap();
        fsutil::remove_tree(&store.shared.dir(n)).unwrap();
        std::fs::remove_file(store.shared.lock_path(n)).unwrap();
        drop(store);
        let store = native_store(tmp.path());
        assert!(store.shared.db().get(&id).unwrap().is_none());
        assert!(!exists(&store.shared.lock_path(n)));
        assert!(store.verify().unwrap().is_empty());
    }

    #[test]
    fn recovery_racing_a_deletion_leaves_no_lock_file() {
        // Another process's deletion ends between this opener's listing of the records to
        // recover and its look at one: lock file unlinked, row gone. Recovery recreates
        // the lock file to take the record, finds no row, and must not leave the file
        // (its number is never taken again).
        let tmp = tempfile::tempdir().unwrap();
        let store = native_store(tmp.path());
        let id = committed(&store).id().to_owned();
        store.shared.db().mark_removing(&id).unwrap();
        let listed = store.shared.db().get(&id).unwrap().unwrap();
        fsutil::remove_tree(&store.shared.dir(listed.n)).unwrap();
        std::fs::remove_file(store.shared.lock_path(listed.n)).unwrap();
        store.shared.db().delete(&id).unwrap();
        store.recover_one(&listed).unwrap();
        assert!(!exists(&store.shared.lock_path(listed.n)));
        assert!(store.verify().unwrap().is_empty());
    }

    #[test]
    fn a_store_from_before_orphans_were_tracked_is_listed_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = native_store(tmp.path());
        let released = store.new_mutable(None, &RefOptions::default()).unwrap();
        let n = store.shared.db().get(released.id()).unwrap().unwrap().n;
        released.release().unwrap();
        // An older kiln, killed between deleting a row and unlinking its lock, left the lock
        // of a number below the next one; it did not record the setting.
        let lock = store.shared.lock_path(n);
        std::fs::write(&lock, "").unwrap();
        assert!(n < store.shared.db().next_number().unwrap());
        drop(store);
        rusqlite::Connection::open(tmp.path().join("snapshots.db"))
            .unwrap()
            .execute("DELETE FROM settings WHERE key = ?1", [ORPHANS_SETTING])
            .unwrap();
        let store = native_store(tmp.path());
        assert!(!exists(&lock), "the old orphan stays");
        assert!(store.verify().unwrap().is_empty());
        assert_eq!(
            store
                .shared
                .db()
                .setting(ORPHANS_SETTING)
                .unwrap()
                .as_deref(),
            Some(ORPHANS_AT_NEXT)
        );
    }

    #[test]
    fn record_ids_are_25_lowercase_alphanumerics() {
        let id = new_id();
        assert_eq!(id.len(), 25);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_ne!(id, new_id());
    }
}
