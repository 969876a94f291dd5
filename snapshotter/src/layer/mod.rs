//! OCI layers: applying a layer tar (plain, gzip or zstd) into a new snapshot
//! ([`apply`](self::apply)) and exporting a snapshot's diff against its parent as a layer
//! tar ([`export_upper`] for overlay uppers, [`export_compare`] for native snapshots),
//! with the digests computed in the same pass.
//!
//! Paths in a layer are attacker-controlled. Import resolves each one inside the snapshot
//! directory by descriptor (`openat2(RESOLVE_IN_ROOT)`), rejects `..`, creates files with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, bounds extension headers, and never follows a symlink the
//! layer planted out of the snapshot.

mod apply;
mod descriptor;
mod export;
mod hasher;
#[cfg(test)]
mod hostile_tests;

pub(crate) use apply::{ApplyMode, apply};
pub use descriptor::{Compression, ImportOptions, LayerDescriptor, LayerError, chain_id};
pub(crate) use export::{export_compare, export_upper};
