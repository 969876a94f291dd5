//! The errors of source identifiers and their attributes, with BuildKit's texts.

/// Errors from parsing a source identifier or its attributes.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to parse {0}: invalid")]
    NoScheme(String),
    #[error("unknown schema {0}: not found")]
    UnknownScheme(String),
    #[error("could not access local files without session")]
    NoSession,
    #[error("invalid {attr} {value:?} on source {identifier}: {reason}")]
    BadAttr {
        identifier: String,
        attr: &'static str,
        value: String,
        reason: String,
    },
}
