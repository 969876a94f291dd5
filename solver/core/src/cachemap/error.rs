//! The error of CacheMap computation, naming the op and the mount or field at fault.

use kiln_proto::Digest;

use super::source_error;

/// Errors from computing a CacheMap.
#[derive(Debug, thiserror::Error)]
pub enum CacheMapError {
    #[error(
        "invalid mountinput {mount} (op {op}: mount {index} uses input {input}, op has {inputs} inputs)"
    )]
    InvalidMountInput {
        op: Digest,
        index: usize,
        mount: String,
        input: i64,
        inputs: usize,
    },
    #[error("op {op}: {what}")]
    Invalid { op: Digest, what: String },
    #[error("op {op}: {source}")]
    Source {
        op: Digest,
        #[source]
        source: source_error::SourceError,
    },
}
