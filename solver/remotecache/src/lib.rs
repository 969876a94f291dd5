//! kiln-remotecache: BuildKit v0.11.6's remote cache (`application/vnd.buildkit.cacheconfig.v0`)
//! for kiln, both ways.
//!
//! - [`config`]: the cache config and the index that carries it, byte-compatible;
//! - [`sources`]: reading a cache from a directory (`type=local`) or a registry reference
//!   (`type=registry`: a cache index, or an image with an inline cache);
//! - [`import`]: a read cache as a [`kiln_solver::source::CacheSource`] the scheduler
//!   queries beside the local store; results come out as [`import::RemoteChain`]s that the
//!   worker turns into lazy refs, so importing downloads nothing but indexes and configs;
//! - [`export`]: a solve's keys and results ([`kiln_solver::scheduler::CacheExport`]) as a
//!   cache config, written to a directory, pushed to a registry, or embedded in an image
//!   config (inline).
//!
//! It knows the solver only through its export description and the `CacheSource` trait,
//! and results only through the [`import::ChainLoader`] and [`export::ResultLayers`] traits
//! the worker implements.

pub mod config;
mod error;
pub mod export;
pub mod import;
pub mod sources;

pub use error::CacheError;
pub use export::{BuiltCache, Mode, ResultLayers};
pub use import::{ChainLoader, ImportedCache, RemoteChain, RemoteLayer};
pub use sources::{LoadedCache, load_local, load_registry};
