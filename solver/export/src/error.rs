//! The crate's error: what failed while exporting, naming the path, snapshot, archive,
//! image or registry.

use std::path::PathBuf;

use kiln_snapshotter::mount::MountError;

/// Errors from exporting a result.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("exporting {path}: {op}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("exporting {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exporting {path}: the file changed size while being read ({expected} bytes expected)")]
    Changed { path: PathBuf, expected: u64 },
    #[error("mounting snapshot {id} for export: {source}")]
    Mount {
        id: String,
        #[source]
        source: MountError,
    },
    #[error("creating a mount point for the export: {0}")]
    MountPoint(#[source] std::io::Error),
    #[error("exporting the layers of snapshot {id}: {source}")]
    Layer {
        id: String,
        // Boxed: the snapshotter's error is large.
        #[source]
        source: Box<kiln_snapshotter::Error>,
    },
    #[error("writing the archive: {0}")]
    Write(#[source] std::io::Error),
    #[error("the base image config is not a JSON object: {0}")]
    BaseConfig(String),
    #[error("encoding the image {what}: {reason}")]
    Json { what: &'static str, reason: String },
    #[error("{files} layer files were given for an image of {layers} layers")]
    LayerFiles { files: usize, layers: usize },
    #[error("image name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("pushing {image}: {source}")]
    Push {
        image: String,
        #[source]
        source: kiln_registry::PushError,
    },
    #[error("fetching layer {digest}: {source}")]
    Fetch {
        digest: kiln_proto::Digest,
        // Boxed: the registry's error is large.
        #[source]
        source: Box<kiln_registry::ImageError>,
    },
    #[error("storing the image: {0}")]
    Content(#[source] kiln_registry::content::ContentError),
}
