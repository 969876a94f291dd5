//! The `mkfile` action: BuildKit's `os.WriteFile` on the in-root path (a final symlink is
//! followed inside the root). A new file gets exactly the action's permission bits; an
//! existing regular file is truncated and rewritten and keeps its mode, as `WriteFile`
//! does. Then the owner (if any) and the timestamp (if set) are applied. Unlike BuildKit,
//! an existing FIFO or device at the path is refused instead of written to: writing into
//! a device node an earlier step created would reach the host's device.

use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd};

use kiln_proto::pb;

use crate::mkdir::{apply_new_metadata, timestamp};
use crate::owner::Owner;
use crate::sys::{self, SysError};
use crate::walk::{self, WalkError, push_component};

/// Errors writing a file.
#[derive(Debug, thiserror::Error)]
pub enum MkfileError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// The `mkfile` action on the mounted destination root.
pub fn mkfile(
    root: BorrowedFd<'_>,
    action: &pb::FileActionMkFile,
    owner: Option<Owner>,
) -> Result<(), MkfileError> {
    let walked = walk::walk(root, &action.path, true)?;
    let path = walked.path();
    let name = match walked.rest.as_slice() {
        [] => return Err(SysError::IsDirectory { path }.into()),
        [name] => name,
        [first, ..] => {
            let mut missing = walked.dir_path.clone();
            push_component(&mut missing, first);
            return Err(SysError::NotFound { path: missing }.into());
        }
    };
    let dir = walked.dir.as_fd();
    let mode = (action.mode as u32) & 0o777;
    let mut file = match sys::create_file(dir, name, mode, &path) {
        Ok(file) => {
            // O_CREAT applies the umask; the mode is meant as given.
            sys::chmod_at(dir, name, mode, &path)?;
            file
        }
        Err(SysError::Os {
            errno: nix::errno::Errno::EEXIST,
            ..
        }) => {
            let file = sys::open_regular_for_write(dir, name, &path)?;
            sys::truncate(&file, &path)?;
            file
        }
        Err(e) => return Err(e.into()),
    };
    file.write_all(&action.data)
        .map_err(|source| SysError::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
    drop(file);
    apply_new_metadata(
        dir,
        name,
        owner,
        timestamp(action.timestamp).as_ref(),
        &path,
    )?;
    Ok(())
}
