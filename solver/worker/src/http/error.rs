//! The error of `http(s)://` sources, naming the URL or file concerned.

use kiln_fileop::sys::SysError;
use kiln_proto::Digest;

/// Errors of `http(s)://` sources, each naming the URL or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("download records {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: invalid http.filename {name:?}: must be a file name, not a path")]
    Filename { url: String, name: String },
    #[error("{url}: invalid {attr} {value}: not an id")]
    Owner {
        url: String,
        attr: &'static str,
        value: i64,
    },
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: invalid response status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: invalid not-modified ETag: {etag}")]
    NotModified { url: String, etag: String },
    #[error("{url}: digest mismatch {got}: {expected}")]
    Mismatch {
        url: String,
        got: Digest,
        expected: Digest,
    },
    #[error("{url}: writing {name}: {source}")]
    Write {
        url: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    File {
        url: String,
        #[source]
        source: SysError,
    },
    #[error("{url}: {source}")]
    Snapshot {
        url: String,
        #[source]
        source: kiln_snapshotter::Error,
    },
}
