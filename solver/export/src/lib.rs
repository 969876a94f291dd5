//! Results out of kiln: the merged tree of an [`ImmutableRef`](kiln_snapshotter::ImmutableRef) copied into a directory
//! ([`local`]), written as a tar stream ([`tar()`]), or packed as an OCI image layout in a
//! tar archive ([`oci`], what `buildctl --output type=oci` writes).
//!
//! The tree is read from a read-only view of the ref mounted on a private temporary mount
//! point (kiln owns its mount namespace, docs/DESIGN.md), walked by descriptor: every entry
//! is opened relative to its parent's descriptor with `O_NOFOLLOW`, symlinks are read and
//! written as symlinks, never followed, so nothing in the snapshot can point the export
//! outside the tree. A local export writes only below DEST, through descriptors of the
//! directories it created there.

mod error;
mod local;
mod oci;
mod tarball;
mod view;
mod walk;

pub use error::ExportError;
pub use local::local;
pub use oci::{OciExportOptions, OciExported, oci};
pub use tarball::tar;
