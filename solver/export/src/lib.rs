//! Results out of kiln: the merged tree of an [`ImmutableRef`](kiln_snapshotter::ImmutableRef) copied into a directory
//! ([`local`]), written as a tar stream ([`tar()`]), or as an image — an OCI archive
//! (`type=oci`), a Docker archive (`type=docker`) or a registry push (`type=image`).
//!
//! Every image output goes one way: the result's layer blobs
//! ([`ExportLayer`](kiln_registry::ExportLayer)s: reused by digest when they exist, a lazy
//! result's still on its registry) are assembled into config, manifest and descriptors
//! ([`image`]), which an archive writer ([`archive`]) or the pusher ([`push`]) takes as
//! they are. [`oci()`] makes the layers of a snapshot chain itself, for callers without a
//! content store.
//!
//! The tree is read from a read-only view of the ref mounted on a private temporary mount
//! point (kiln owns its mount namespace, docs/DESIGN.md), walked by descriptor: every entry
//! is opened relative to its parent's descriptor with `O_NOFOLLOW`, symlinks are read and
//! written as symlinks, never followed, so nothing in the snapshot can point the export
//! outside the tree. A local export writes only below DEST, through descriptors of the
//! directories it created there.

pub mod archive;
mod error;
pub mod image;
mod local;
mod oci;
pub mod push;
mod tarball;
mod view;
mod walk;

pub use archive::{ArchiveFormat, write_archive};
pub use error::ExportError;
pub use image::{Image, ImageDescriptor, ImageName, ImageOptions, assemble};
pub use local::local;
pub use oci::{OciExportOptions, OciExported, oci};
pub use push::{PushReport, push, store};
pub use tarball::tar;
