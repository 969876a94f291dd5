//! The owner a FileOp action's `ChownOpt` names, resolved as BuildKit v0.11.6's
//! `readUser` does: a user by id is `id:id`; a user by name takes uid and primary gid from
//! the first matching `/etc/passwd` line of the root given for its input; a group (by id,
//! or by name from that root's `/etc/group`) then replaces the gid. A name that is not
//! found, or a missing passwd/group file, leaves root (`0`) in its place without an error,
//! exactly as BuildKit does (WORKDIR after `USER somebody` relies on it). Without a
//! `ChownOpt` there is no owner: created entries belong to kiln and copies keep the
//! source's ids.
//!
//! The files are attacker-controlled: they are resolved in-root by fd and must be regular
//! files (a FIFO or device is refused, never opened for reading).

use std::ffi::OsStr;
use std::io::Read as _;
use std::os::fd::AsFd;
use std::path::Path;

use kiln_proto::pb;

use crate::sys::{self, SysError};
use crate::walk::{self, WalkError};

/// Largest passwd/group file read.
const MAX_FILE: u64 = 8 << 20;

/// The ids given to created or copied entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Errors resolving a `ChownOpt`.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("invalid missing user mount")]
    MissingUserRoot,
    #[error("invalid missing group mount")]
    MissingGroupRoot,
    #[error("reading {file}: {source}")]
    Read {
        file: &'static str,
        #[source]
        source: WalkError,
    },
}

/// Resolves `chown`. `user_root` / `group_root` are the mounted roots of the inputs the
/// `byName` options name (`NamedUserOpt.input`); they are only needed, and only read,
/// for names.
pub fn resolve_owner(
    chown: Option<&pb::ChownOpt>,
    user_root: Option<&Path>,
    group_root: Option<&Path>,
) -> Result<Option<Owner>, OwnerError> {
    let Some(chown) = chown else {
        return Ok(None);
    };
    let mut owner = Owner { uid: 0, gid: 0 };
    if let Some(user) = chown.user.as_ref().and_then(|u| u.user.as_ref()) {
        match user {
            pb::user_opt::User::ById(id) => {
                owner.uid = *id;
                owner.gid = *id;
            }
            pb::user_opt::User::ByName(named) => {
                let root = user_root.ok_or(OwnerError::MissingUserRoot)?;
                if let Some(text) = read_in_root(root, "/etc/passwd")? {
                    if let Some((uid, gid)) = lookup(&text, &named.name, &[2, 3]) {
                        owner.uid = uid;
                        owner.gid = gid;
                    }
                }
            }
        }
    }
    if let Some(group) = chown.group.as_ref().and_then(|g| g.user.as_ref()) {
        match group {
            pb::user_opt::User::ById(id) => owner.gid = *id,
            pb::user_opt::User::ByName(named) => {
                let root = group_root.ok_or(OwnerError::MissingGroupRoot)?;
                if let Some(text) = read_in_root(root, "/etc/group")? {
                    if let Some((gid, _)) = lookup(&text, &named.name, &[2, 2]) {
                        owner.gid = gid;
                    }
                }
            }
        }
    }
    Ok(Some(owner))
}

/// The numeric fields `fields` of the first line whose first field is `name`, parsed as
/// runc's `parseLine` does (surrounding blanks trimmed, a malformed number is 0).
fn lookup(text: &str, name: &str, fields: &[usize; 2]) -> Option<(u32, u32)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .find_map(|line| {
            let parts: Vec<&str> = line.split(':').collect();
            if parts.first() != Some(&name) {
                return None;
            }
            let number = |i: usize| {
                parts
                    .get(i)
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            Some((number(fields[0]), number(fields[1])))
        })
}

/// Reads a database file in-root; `None` when it (or a parent) does not exist, which
/// BuildKit treats as "name not found".
fn read_in_root(root: &Path, file: &'static str) -> Result<Option<String>, OwnerError> {
    let read_err = |source: WalkError| OwnerError::Read { file, source };
    let root = sys::open_root(root).map_err(|e| read_err(e.into()))?;
    let walked = match walk::walk(root.as_fd(), file, true) {
        Ok(walked) => walked,
        Err(WalkError::NotDirectory { .. }) => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let Some(name) = walked.single_name() else {
        // The path is a directory or below a missing one.
        if walked.rest.is_empty() {
            return Err(read_err(
                SysError::IsDirectory {
                    path: file.to_owned(),
                }
                .into(),
            ));
        }
        return Ok(None);
    };
    let name: &OsStr = name;
    let mut opened = match sys::open_regular(walked.dir.as_fd(), name, file) {
        Ok(f) => f,
        Err(SysError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(read_err(e.into())),
    };
    let mut bytes = Vec::new();
    (&mut opened)
        .take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(|source| {
            read_err(
                SysError::Io {
                    op: "read",
                    path: file.to_owned(),
                    source,
                }
                .into(),
            )
        })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_first_matching_line_and_zero_for_junk() {
        let text = "root:x:0:0::/root:/bin/sh\n  alice:x:1000:1001::/home/alice:/bin/sh  \nalice:x:5:5\nbad:x:nan:7\n";
        assert_eq!(lookup(text, "alice", &[2, 3]), Some((1000, 1001)));
        assert_eq!(lookup(text, "bad", &[2, 3]), Some((0, 7)));
        assert_eq!(lookup(text, "nobody", &[2, 3]), None);
        assert_eq!(
            lookup("wheel:x:10:root\n", "wheel", &[2, 2]),
            Some((10, 10))
        );
    }
}
