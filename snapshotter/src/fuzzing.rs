//! A seam for the fuzz targets in `fuzz/` (feature `fuzzing`): the layer importer applied
//! to a plain directory, without a store, so each input costs only its own work.

use std::path::Path;

use crate::backend::XattrNamespace;
use crate::layer::{ApplyMode, ImportOptions, LayerError, apply};

/// Applies `layer` (a tar, plain or compressed) into `dir` as an overlay upper
/// directory with `user.` xattrs (the rootless representation).
pub fn apply_layer(dir: &Path, layer: &[u8]) -> Result<(), LayerError> {
    apply(
        dir,
        layer,
        ApplyMode::Overlay(XattrNamespace::User),
        &ImportOptions::default(),
    )
    .map(drop)
}

/// Applies `layer` into `dir` as a full tree (whiteouts delete).
pub fn apply_layer_merged(dir: &Path, layer: &[u8]) -> Result<(), LayerError> {
    apply(dir, layer, ApplyMode::Merged, &ImportOptions::default()).map(drop)
}
