//! kiln-snapshotter owns every filesystem a build step sees and every result it leaves:
//! immutable and mutable refs stored as overlay layers, their persistent metadata, and
//! OCI layer import and export.
//!
//! # Model
//! A [`Snapshotter`] manages one store under kiln's root: `snapshots/<n>/{fs,work}` (one
//! directory per snapshot, short numeric names), `snapshots.db` (metadata, see [`meta`])
//! and `locks/snapshot-<n>.lock` (see [`lock`]). A *record* is one snapshot plus its
//! metadata; a *ref* is a counted handle on a record:
//!
//! - [`MutableRef`]: a writable layer on an optional immutable parent, held by exactly one
//!   handle in all processes (an exclusive record lock; a second open fails with
//!   "<id> is locked"). [`MutableRef::commit`] turns it into an [`ImmutableRef`] in O(1):
//!   the record changes state, no data moves.
//! - [`ImmutableRef`]: a committed layer with its parent chain, shared freely
//!   ([`Clone`] adds a handle, [`ImmutableRef::release`] or drop removes one). Each process
//!   holding a record holds a shared lock on it, so nothing it uses is pruned or removed by
//!   another process's crash recovery, and the lock dies with the process.
//!
//! Refs describe how to mount them ([`Mountable`]); kiln owns its mount namespace, so
//! callers (the solver, tests) apply those descriptions where they need them.
//!
//! # Crash safety
//! Every record change is one SQLite transaction, ordered with the directory work so that
//! a kill at any point leaves either a finished record or one that open-time recovery can
//! identify and remove: a `creating` record (its maker died), a `removing` record, an
//! unretained mutable record whose holder died, or a directory without a record. Recovery
//! only touches what it can lock exclusively, so records in use elsewhere survive.
//! Step uppers are mounted `volatile`, and commit does not sync: a committed record
//! remembers the boot it was committed in until [`Snapshotter::sync`] (or dropping the
//! last handle on the store) has flushed it. The page cache survives a crash of kiln but
//! not of the machine, so recovery after a *reboot* removes records that were never synced
//! (and their descendants), while after a mere `kill -9` they stay valid.

pub mod backend;
mod compose;
mod fsutil;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod layer;
pub mod lock;
pub mod meta;
pub mod mount;
mod refs;
mod sys;

pub use backend::{Backend, BackendChoice, XattrNamespace};
pub use layer::{Compression, ImportOptions, LayerDescriptor};
pub use meta::{LayerInfo, RecordState};
pub use mount::{Mountable, OverlayMount, unmount};
pub use refs::{
    Error, ImmutableRef, Inconsistency, MutableRef, PruneOptions, RefOptions, SharedMutableRef,
    Snapshotter, StoreOptions, UsageInfo,
};
