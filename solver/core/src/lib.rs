//! kiln-solver, the slim solver: a loaded graph → each vertex's CacheMap exactly as
//! BuildKit v0.11.6 computes it → cache keys → the cache store → the scheduler that drives
//! ops on tokio, in parallel where the graph allows.
//!
//! It knows ops only through the [`op::Worker`] and [`op::Op`] traits: it never touches
//! snapshots, containers, registries or files, so another backend (or a test's fake) can
//! drive it.

pub mod cachemap;
mod key_lock;
pub mod keys;
pub mod op;
pub mod progress;
pub mod scheduler;
pub mod source;
pub mod store;
