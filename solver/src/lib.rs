//! kiln-solver loads a Definition, computes each vertex's CacheMap exactly as BuildKit
//! v0.11.6 does, turns CacheMaps into cache keys, and drives ops on tokio.

pub mod cachemap;
pub mod contenthash;
pub mod export;
pub mod fileop;
pub mod image;
pub mod keys;
pub mod op;
pub mod progress;
pub mod scheduler;
pub mod store;
pub mod worker;
