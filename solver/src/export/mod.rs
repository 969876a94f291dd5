//! Results out of kiln: the merged tree of an [`ImmutableRef`] copied into a directory
//! ([`local`]), written as a tar stream ([`tar`]), or packed as an OCI image layout in a
//! tar archive ([`oci`], what `buildctl --output type=oci` writes).
//!
//! The tree is read from a read-only view of the ref mounted on a private temporary mount
//! point (kiln owns its mount namespace, docs/DESIGN.md), walked by descriptor: every entry
//! is opened relative to its parent's descriptor with `O_NOFOLLOW`, symlinks are read and
//! written as symlinks, never followed, so nothing in the snapshot can point the export
//! outside the tree. A local export writes only below DEST, through descriptors of the
//! directories it created there.

mod local;
mod oci;
mod tarball;
mod walk;

use std::path::{Path, PathBuf};

use kiln_snapshotter::mount::MountError;
use kiln_snapshotter::{ImmutableRef, unmount};

pub use local::local;
pub use oci::{OciExportOptions, OciExported, oci};
pub use tarball::tar;

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
}

/// A read-only view of a ref on a private temporary mount point, unmounted on drop.
#[derive(Debug)]
pub(crate) struct View {
    path: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl View {
    pub(crate) fn mount(r: &ImmutableRef) -> Result<View, ExportError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-export-")
            .tempdir()
            .map_err(ExportError::MountPoint)?;
        let path = dir.path().join("root");
        std::fs::create_dir(&path).map_err(ExportError::MountPoint)?;
        r.mountable()
            .mount_readonly(&path)
            .map_err(|source| ExportError::Mount {
                id: r.id().to_owned(),
                source,
            })?;
        Ok(View {
            path,
            mounted: true,
            _dir: dir,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.path) {
                tracing::warn!("{e}");
            }
        }
    }
}
