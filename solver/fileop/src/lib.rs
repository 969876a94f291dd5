//! The FileOp backend: BuildKit v0.11.6's file actions (`mkdir`, `mkfile`, `rm`, `copy`)
//! applied to directories the caller has mounted (a read-write destination root, read-only
//! source roots), with BuildKit's (`solver/llbsolver/file/backend.go`) and fsutil's
//! (`copy/copy.go`) semantics, done safely.
//!
//! Everything below a root is attacker-controlled (an image or an earlier step made it),
//! so every path is resolved in-root by descriptor ([`walk`]), every entry is created
//! with `*at()` calls in an already-resolved directory, symlinks are never followed out of
//! a root, FIFOs and devices are never opened for reading, and nothing is written outside
//! the destination root. All system calls live in [`sys`].
//!
//! Owners: resolve a `ChownOpt` with [`resolve_owner`], passing the mounted roots of the
//! inputs its `byName` options name; hand the result to the action. kiln runs inside its
//! user namespace, so ids are used as they are (BuildKit's identity mapping is the
//! identity here); an id outside the namespace's mapping fails with a clear error.

pub mod copy;
pub mod glob;
pub mod localsync;
pub mod mkdir;
pub mod mkfile;
pub mod owner;
pub mod patterns;
pub mod rm;
pub mod sys;
pub mod unpack;
pub mod walk;
pub mod wildcard;

use std::os::fd::AsFd;
use std::path::Path;

use kiln_proto::pb;

pub use owner::{Owner, OwnerError, resolve_owner};

/// A failed file action, naming the action and its path(s).
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    #[error("mkdir {path}: {source}")]
    Mkdir {
        path: String,
        #[source]
        source: mkdir::MkdirError,
    },
    #[error("mkfile {path}: {source}")]
    Mkfile {
        path: String,
        #[source]
        source: mkfile::MkfileError,
    },
    #[error("rm {path}: {source}")]
    Rm {
        path: String,
        #[source]
        source: rm::RmError,
    },
    #[error("copy {src} {dest}: {source}")]
    Copy {
        src: String,
        dest: String,
        #[source]
        source: copy::CopyError,
    },
    #[error("opening the {which} root {path}: {source}")]
    Root {
        which: &'static str,
        path: String,
        #[source]
        source: sys::SysError,
    },
}

fn open_root(which: &'static str, dir: &Path) -> Result<std::os::fd::OwnedFd, FileOpError> {
    sys::open_root(dir).map_err(|source| FileOpError::Root {
        which,
        path: dir.display().to_string(),
        source,
    })
}

/// `FileActionMkDir` in the destination root `dest_root`.
pub fn mkdir(
    dest_root: &Path,
    action: &pb::FileActionMkDir,
    owner: Option<Owner>,
) -> Result<(), FileOpError> {
    let root = open_root("destination", dest_root)?;
    mkdir::mkdir(root.as_fd(), action, owner).map_err(|source| FileOpError::Mkdir {
        path: action.path.clone(),
        source,
    })
}

/// `FileActionMkFile` in the destination root `dest_root`.
pub fn mkfile(
    dest_root: &Path,
    action: &pb::FileActionMkFile,
    owner: Option<Owner>,
) -> Result<(), FileOpError> {
    let root = open_root("destination", dest_root)?;
    mkfile::mkfile(root.as_fd(), action, owner).map_err(|source| FileOpError::Mkfile {
        path: action.path.clone(),
        source,
    })
}

/// `FileActionRm` in the destination root `dest_root`.
pub fn rm(dest_root: &Path, action: &pb::FileActionRm) -> Result<(), FileOpError> {
    let root = open_root("destination", dest_root)?;
    rm::rm(root.as_fd(), action).map_err(|source| FileOpError::Rm {
        path: action.path.clone(),
        source,
    })
}

/// `FileActionCopy` from the source root `src_root` (the secondary input; pass an empty
/// directory for scratch) into the destination root `dest_root`.
pub fn copy(
    src_root: &Path,
    dest_root: &Path,
    action: &pb::FileActionCopy,
    owner: Option<Owner>,
) -> Result<(), FileOpError> {
    let src = open_root("source", src_root)?;
    let dest = open_root("destination", dest_root)?;
    copy::copy(src.as_fd(), dest.as_fd(), action, owner).map_err(|source| FileOpError::Copy {
        src: action.src.clone(),
        dest: action.dest.clone(),
        source,
    })
}
