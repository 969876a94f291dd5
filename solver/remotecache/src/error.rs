//! The crate's error: what went wrong reading, importing or exporting a cache, naming the
//! cache and the blob or reference concerned.

/// Errors from importing and exporting caches.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{what}: {reason}")]
    Format { what: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{cache}: {source}")]
    Image {
        cache: String,
        #[source]
        source: Box<kiln_registry::ImageError>,
    },
    #[error("{cache}: {source}")]
    Client {
        cache: String,
        #[source]
        source: kiln_registry::ClientError,
    },
    #[error("{cache}: {source}")]
    Push {
        cache: String,
        #[source]
        source: kiln_registry::PushError,
    },
    #[error("{cache}: {message}")]
    Cache { cache: String, message: String },
}
