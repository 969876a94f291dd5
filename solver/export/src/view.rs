//! Read-only views of refs on private temporary mount points: what every export walks.

use std::path::{Path, PathBuf};

use kiln_snapshotter::{ImmutableRef, unmount};

use crate::error::ExportError;

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
