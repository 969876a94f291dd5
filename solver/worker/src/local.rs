//! `local://NAME` sources: the build's directory for NAME (`--local NAME=DIR`) transferred
//! into a snapshot with `local.includepattern`, `local.excludepatterns`,
//! `local.followpaths` and `local.differ` as BuildKit's filesync selects and compares
//! files ([`kiln_fileop::localsync`]).
//! Their CacheMap is a session-bound `random:` digest, as in BuildKit: dependents are
//! cached by the content of what was transferred (content-based keys), not by the
//! directory's name.
//!
//! Only what changed since the last transfer of the same context is copied. BuildKit
//! keeps, per shared key (`name:local.sharedkeyhint:client`), the mutable snapshot of the
//! last transfer and syncs into it; kiln's snapshots are overlay layers, so it keeps the
//! last transfer's committed snapshot instead (retained, indexed under the shared key,
//! with the client being the directory's canonical path) and syncs into a new layer on
//! top of it: the layer receives only the files that differ (by type, size, mtime, mode,
//! owner, link target) and whiteouts for deletions. An unchanged context reuses the last
//! snapshot as it is. Past [`MAX_LAYERS`] layers the chain is started again with a full
//! copy (and the old chain is left to be removed when nothing uses it). A pruned last
//! snapshot is simply a full copy. With the native snapshot backend (no overlay), every
//! transfer is a full copy into a fresh snapshot, as before.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_fileop::localsync::{self, Differ, Selection, SyncStats};
use kiln_proto::{Vertex, pb};
use kiln_snapshotter::{Backend, ImmutableRef, RecordState, RefOptions};
use nix::fcntl::{Flock, FlockArg};

use crate::mounts::StepMounts;
use crate::state::{Inner, blocking, failed};
use kiln_solver::cachemap::source::{SourceContext, offline_cache_map};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};
use kiln_solver::progress::LogStream;

/// Layers a context's snapshot chain may grow to before a transfer starts it again with
/// a full copy (each changed build adds one; overlay mounts stay short).
pub const MAX_LAYERS: usize = 16;

/// The record type of local transfers (BuildKit's `source.local` usage record type).
const RECORD_TYPE: &str = "source.local";

/// Errors of local sources.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("local directory {name:?} not given (--local {name}=DIR)")]
    NotGiven { name: String },
    #[error("local directory {name:?} ({dir}): {source}")]
    Dir {
        name: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {attr} of local://{name}: {reason}")]
    Attr {
        name: String,
        attr: &'static str,
        reason: String,
    },
    #[error("transferring local directory {name:?} ({dir}): {source}")]
    Transfer {
        name: String,
        dir: PathBuf,
        #[source]
        source: localsync::LocalSyncError,
    },
    #[error("local directory {name:?}: lock {path}: {source}")]
    Lock {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local directory {name:?}: {source}")]
    Snapshot {
        name: String,
        #[source]
        source: kiln_snapshotter::Error,
    },
    #[error("local directory {name:?}: {source}")]
    Mount {
        name: String,
        #[source]
        source: crate::mounts::MountsError,
    },
}

pub(crate) struct LocalSource {
    inner: Arc<Inner>,
    vertex: Vertex,
    source: pb::SourceOp,
}

/// What one transfer is: which directory, selected how, shared under which key.
struct Transfer {
    name: String,
    dir: PathBuf,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    follow: Option<Vec<String>>,
    differ: Differ,
    /// Index key of the last transfer's snapshot (BuildKit's `local.sharedKey`).
    shared_key: String,
}

impl LocalSource {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, source: pb::SourceOp) -> Self {
        LocalSource {
            inner,
            vertex,
            source,
        }
    }

    fn name(&self) -> &str {
        self.source
            .identifier
            .strip_prefix("local://")
            .unwrap_or_default()
    }

    /// A JSON list attribute; absent (or empty text) is `None`, as BuildKit's nil list.
    fn list(&self, attr: &'static str) -> Result<Option<Vec<String>>, LocalError> {
        match self.source.attrs.get(attr) {
            Some(json) if !json.is_empty() => {
                serde_json::from_str(json)
                    .map(Some)
                    .map_err(|e| LocalError::Attr {
                        name: self.name().to_owned(),
                        attr,
                        reason: e.to_string(),
                    })
            }
            _ => Ok(None),
        }
    }

    fn transfer(&self) -> Result<Transfer, LocalError> {
        let name = self.name().to_owned();
        let given = self
            .inner
            .config
            .session
            .locals
            .get(&name)
            .ok_or_else(|| LocalError::NotGiven { name: name.clone() })?;
        // The user's own path: its symlinks are followed, as BuildKit's EvalSymlinks.
        let dir = std::fs::canonicalize(given).map_err(|source| LocalError::Dir {
            name: name.clone(),
            dir: given.clone(),
            source,
        })?;
        let hint = self
            .source
            .attrs
            .get("local.sharedkeyhint")
            .map_or("", String::as_str);
        let shared_key = format!("local.sharedKey:{name}:{hint}:{}", dir.display());
        Ok(Transfer {
            include: self.list("local.includepattern")?,
            exclude: self.list("local.excludepatterns")?,
            follow: self.list("local.followpaths")?,
            // BuildKit ignores values it does not know.
            differ: Differ::from_attr(self.source.attrs.get("local.differ").map(String::as_str))
                .unwrap_or_default(),
            name,
            dir,
            shared_key,
        })
    }
}

#[async_trait]
impl Op<ImmutableRef> for LocalSource {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let ctx = SourceContext {
            session_id: Some(self.inner.config.session.id.clone()),
        };
        let (map, done) = offline_cache_map(&self.source, self.vertex.platform(), &ctx)
            .map_err(failed)?
            .ok_or_else(|| failed(format!("no cache map for {}", self.source.identifier)))?;
        Ok(CacheMapResponse { map, done })
    }

    async fn exec(
        &self,
        ctx: &JobContext,
        _inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let transfer = self.transfer().map_err(failed)?;
        let name = transfer.name.clone();
        let inner = self.inner.clone();
        let (r, stats) = blocking(move || run(&inner, &transfer).map_err(failed)).await?;
        let line = format!(
            "transferring {name}: {} files ({} bytes) copied, {} entries created, {} \
             directories updated, {} removed, {} unchanged\n",
            stats.files_copied,
            stats.bytes_copied,
            stats.entries_created,
            stats.dirs_updated,
            stats.removed,
            stats.unchanged
        );
        ctx.log(LogStream::Stderr, line.as_bytes()).await;
        Ok(vec![r])
    }
}

/// An exclusive lock on `<locks>/local-<sha256(shared key)>`: one transfer per context
/// at a time, across processes.
fn lock(inner: &Inner, t: &Transfer) -> Result<Flock<std::fs::File>, LocalError> {
    let dir = inner.locks_dir();
    let path = dir.join(format!(
        "local-{}",
        kiln_proto::Digest::of(t.shared_key.as_bytes()).hex()
    ));
    let err = |source| LocalError::Lock {
        name: t.name.clone(),
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| err(std::io::Error::from(e)))
}

/// The last transfer of this context, if it still exists and its chain may grow.
fn last_transfer(inner: &Inner, t: &Transfer) -> Result<Option<ImmutableRef>, LocalError> {
    let records = inner
        .snapshotter
        .find(&t.shared_key)
        .map_err(|source| LocalError::Snapshot {
            name: t.name.clone(),
            source,
        })?;
    // Newest first: a crash between publishing a new one and retiring the old leaves two.
    for record in records.iter().rev() {
        if record.state != RecordState::Committed {
            continue;
        }
        match inner.snapshotter.get(&record.id) {
            Ok(r) if r.parents().count() + 1 < MAX_LAYERS => return Ok(Some(r)),
            Ok(_) => return Ok(None),
            Err(e) => tracing::debug!(id = record.id, error = %e, "last local transfer unusable"),
        }
    }
    Ok(None)
}

/// Transfers the directory into a snapshot: a new layer on the last transfer (or a full
/// copy), published as the context's last transfer; the last one itself when nothing
/// changed.
fn run(inner: &Inner, t: &Transfer) -> Result<(ImmutableRef, SyncStats), LocalError> {
    let snap_err = |source| LocalError::Snapshot {
        name: t.name.clone(),
        source,
    };
    let transfer_err = |source| LocalError::Transfer {
        name: t.name.clone(),
        dir: t.dir.clone(),
        source,
    };
    let incremental = matches!(inner.snapshotter.backend(), Backend::Overlay { .. });
    let src = kiln_fileop::sys::open_root(&t.dir)
        .map_err(|e| transfer_err(localsync::LocalSyncError::Sys(e)))?;
    let selection = Selection::new(
        src.as_fd(),
        t.include.as_deref(),
        t.exclude.as_deref(),
        t.follow.as_deref(),
    )
    .map_err(transfer_err)?;
    let _guard = if incremental {
        Some(lock(inner, t)?)
    } else {
        None
    };
    // `local.differ=none` transfers everything anyway: into a fresh chain.
    let previous = if incremental && t.differ == Differ::Metadata {
        last_transfer(inner, t)?
    } else {
        None
    };
    let layer = inner
        .snapshotter
        .new_mutable(
            previous.as_ref(),
            &RefOptions {
                description: format!("local source for {}", t.name),
                record_type: RECORD_TYPE.to_owned(),
                ..RefOptions::default()
            },
        )
        .map_err(snap_err)?;
    let mut mounts = StepMounts::new(&inner.mounts_dir, &inner.next_id()).map_err(|source| {
        LocalError::Mount {
            name: t.name.clone(),
            source,
        }
    })?;
    let synced = mounts
        .mount("dest", &layer.mountable(), false)
        .map_err(|source| LocalError::Mount {
            name: t.name.clone(),
            source,
        })
        .and_then(|dest| {
            let dest = kiln_fileop::sys::open_root(&dest)
                .map_err(|e| transfer_err(localsync::LocalSyncError::Sys(e)))?;
            localsync::sync(src.as_fd(), dest.as_fd(), &selection, t.differ).map_err(transfer_err)
        });
    mounts.release();
    let stats = match synced {
        Ok(stats) => stats,
        Err(e) => {
            let _ = layer.release();
            return Err(e);
        }
    };
    if let (Some(previous), false) = (&previous, stats.changed()) {
        layer.release().map_err(snap_err)?;
        return Ok((previous.clone(), stats));
    }
    let id = layer.id().to_owned();
    let r = layer.commit().map_err(snap_err)?;
    if incremental {
        publish(inner, t, &r, &id)?;
    }
    Ok((r, stats))
}

/// Makes `r` the context's last transfer (kept across builds) and retires the one it
/// replaces (kept only as long as something is built on it). In this order, a crash
/// leaves at worst two candidates, and the newer one is taken.
fn publish(inner: &Inner, t: &Transfer, r: &ImmutableRef, id: &str) -> Result<(), LocalError> {
    let snap_err = |source| LocalError::Snapshot {
        name: t.name.clone(),
        source,
    };
    r.add_key(&t.shared_key).map_err(snap_err)?;
    r.set_retain(true).map_err(snap_err)?;
    // Every older record of this context, including a chain that was started again.
    for record in inner.snapshotter.find(&t.shared_key).map_err(snap_err)? {
        if record.id == id {
            continue;
        }
        let old = match inner.snapshotter.get(&record.id) {
            Ok(old) => old,
            Err(_) => continue,
        };
        old.remove_key(&t.shared_key).map_err(snap_err)?;
        old.set_retain(false).map_err(snap_err)?;
    }
    tracing::debug!(id, key = t.shared_key, "local transfer published");
    Ok(())
}
