//! Cross-process record locks: one lock file per snapshot under `<root>/locks/<n>.lock`,
//! locked with open file description locks (`F_OFD_SETLK`).
//!
//! A shared lock means "a process holds a handle on this record"; an exclusive lock means
//! "a process owns this record outright" (a mutable handle, a creation in progress, a
//! deletion). The kernel drops the locks of a process that dies, so a crashed kiln never
//! pins a record. OFD locks rather than `flock(2)` because a finished creation converts
//! its exclusive lock to a shared one, and only OFD (and POSIX) locks convert atomically:
//! with `flock` another process could take the record in the gap.
//!
//! Lock files are unlinked only by a holder of the exclusive lock, after the record's
//! directory and metadata are gone; anyone who then obtains a lock on the unlinked file sees
//! `st_nlink == 0` and treats the record as gone.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::{self, LockKind};

/// Errors from record locks.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("removing lock file {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open lock file and the lock this process holds on it (if any).
#[derive(Debug)]
pub(crate) struct RecordLock {
    file: File,
    path: PathBuf,
    held: Option<LockKind>,
}

/// How to open a lock file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Create {
    /// The file must not exist yet (a new record).
    New,
    /// The file must exist (an existing record).
    Existing,
}

impl RecordLock {
    /// Opens the lock file at `path`. `Ok(None)` when an existing one is missing.
    pub(crate) fn open(path: &Path, create: Create) -> Result<Option<RecordLock>, LockError> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        if create == Create::New {
            options.create_new(true).mode(0o600);
        }
        match options.open(path) {
            Ok(file) => Ok(Some(RecordLock {
                file,
                path: path.to_owned(),
                held: None,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create == Create::Existing => {
                Ok(None)
            }
            Err(source) => Err(LockError::Open {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Takes (or converts to) `kind`. Returns `false` when `wait` is false and another
    /// holder conflicts, or when the lock file was unlinked (the record is gone).
    pub(crate) fn lock(&mut self, kind: LockKind, wait: bool) -> Result<bool, LockError> {
        let got =
            sys::ofd_lock(self.file.as_fd(), kind, wait).map_err(|source| LockError::Lock {
                path: self.path.clone(),
                source,
            })?;
        if !got {
            return Ok(false);
        }
        self.held = Some(kind);
        Ok(self.still_linked())
    }

    /// Whether the lock file still has a name (the record was not deleted meanwhile).
    pub(crate) fn still_linked(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.nlink() > 0)
    }

    pub(crate) fn held(&self) -> Option<LockKind> {
        self.held
    }

    /// Unlinks the lock file; the caller holds the exclusive lock and has removed the
    /// record. The lock itself is released when `self` is dropped.
    pub(crate) fn unlink(&self) -> Result<(), LockError> {
        debug_assert_eq!(self.held, Some(LockKind::Exclusive));
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LockError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }
}
