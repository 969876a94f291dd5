//! Resolving a step's `user[:group]` against the rootfs's `/etc/passwd` and `/etc/group`
//! with BuildKit v0.11.6 / runc semantics (../shared/spec/exec-runtime.md §4.2), including
//! its quirks: a missing passwd file is an error for every non-numeric-pair spec, and an
//! explicit group yields no supplementary groups.
//!
//! The files are opened in-root by fd (a rootfs may make `etc` a symlink to anywhere) and
//! must be regular files; FIFOs and devices are refused rather than read.

use std::io::Read as _;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::sys::{Resolve, Sys};

/// Largest passwd/group file kiln reads.
const MAX_FILE: u64 = 8 << 20;

/// Errors from user resolution, worded as BuildKit/runc word them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoSuchUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoSuchGroup(String),
    #[error("unable to find user {0}: invalid argument")]
    NoPasswdFile(String),
    #[error("unable to find groups for spec {0}: invalid argument")]
    NoGroupFile(String),
    #[error("uids and gids must be in range 0-2147483647")]
    OutOfRange,
    #[error("reading {path} in the rootfs: {reason}")]
    Read { path: &'static str, reason: String },
}

/// The ids a step runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups with the primary gid first (never empty).
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd, when the uid has an entry.
    pub home: Option<String>,
}

#[derive(Clone, Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Clone, Debug)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The two database files, as read from a rootfs (`None` = file absent).
#[derive(Clone, Debug, Default)]
pub struct UserDb {
    passwd: Option<Vec<PasswdEntry>>,
    group: Option<Vec<GroupEntry>>,
}

impl UserDb {
    /// Parses file contents directly (tests and callers that already have them).
    pub fn from_contents(passwd: Option<&str>, group: Option<&str>) -> Self {
        UserDb {
            passwd: passwd.map(parse_passwd),
            group: group.map(parse_group),
        }
    }

    /// The files [`UserDb::read`] reads, relative to the rootfs.
    pub const PATHS: [&'static str; 2] = ["etc/passwd", "etc/group"];

    /// Reads `/etc/passwd` and `/etc/group` from the rootfs `root` (a directory fd).
    pub fn read(sys: &dyn Sys, root: BorrowedFd<'_>) -> Result<Self, UserError> {
        Ok(Self::read_noting_symlinks(sys, root)?.0)
    }

    /// [`UserDb::read`], and whether no symlink was met on the way to either file: then
    /// what was read depends only on the entries at [`UserDb::PATHS`] and on the way to
    /// them, and a layer above without such entries shows the same.
    pub fn read_noting_symlinks(
        sys: &dyn Sys,
        root: BorrowedFd<'_>,
    ) -> Result<(Self, bool), UserError> {
        let [passwd_path, group_path] = Self::PATHS;
        let (passwd, plain_passwd) = read_in_root(sys, root, passwd_path)?;
        let (group, plain_group) = read_in_root(sys, root, group_path)?;
        Ok((
            UserDb::from_contents(passwd.as_deref(), group.as_deref()),
            plain_passwd && plain_group,
        ))
    }

    fn passwd_by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.passwd.as_ref()?.iter().find(|e| e.uid == uid)
    }

    /// Home directory of `uid`, as runc uses it for `HOME`.
    pub fn home_of(&self, uid: u32) -> Option<String> {
        self.passwd_by_uid(uid).map(|e| e.home.clone())
    }
}

/// The file at `path` in `root` (`None`: absent), and whether no symlink was on the way.
fn read_in_root(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    path: &'static str,
) -> Result<(Option<String>, bool), UserError> {
    // O_NONBLOCK: opening a FIFO must not hang the executor; it is refused below.
    let open = |resolve| {
        sys.openat2(
            root,
            Path::new(path),
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
            resolve,
        )
    };
    let without_symlinks = Resolve {
        no_symlinks: true,
        ..Resolve::IN_ROOT
    };
    let (opened, plain) = match open(without_symlinks) {
        Err(nix::Error::ELOOP) => (open(Resolve::IN_ROOT), false),
        opened => (opened, true),
    };
    let fd = match opened {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT | nix::Error::ENOTDIR) => return Ok((None, plain)),
        Err(e) => {
            return Err(UserError::Read {
                path,
                reason: e.to_string(),
            });
        }
    };
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| UserError::Read {
        path,
        reason: e.to_string(),
    })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(UserError::Read {
            path,
            reason: "not a regular file".into(),
        });
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| UserError::Read {
            path,
            reason: e.to_string(),
        })?;
    Ok((Some(text), plain))
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: fields.first()?.to_string(),
                uid: fields.get(2)?.trim().parse().ok()?,
                gid: fields.get(3)?.trim().parse().ok()?,
                home: fields.get(5).map(|s| (*s).to_owned()).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: fields.first()?.to_string(),
                gid: fields.get(2)?.trim().parse().ok()?,
                members: fields
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn numeric_or_root(s: &str) -> Option<u32> {
    if s == "root" { Some(0) } else { s.parse().ok() }
}

const MAX_ID: u32 = 2_147_483_647;

/// Resolves `spec` (`Meta.user`) as BuildKit v0.11.6 does.
pub fn resolve(spec: &str, db: &UserDb) -> Result<ResolvedUser, UserError> {
    if spec.is_empty() {
        // An empty user is "0"; if even that cannot be looked up, root with no groups.
        return Ok(resolve("0", db).unwrap_or(ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![0],
            home: None,
        }));
    }
    if let Some((user, group)) = spec.split_once(':') {
        if let (Some(uid), Some(gid)) = (numeric_or_root(user), numeric_or_root(group)) {
            if uid > MAX_ID || gid > MAX_ID {
                return Err(UserError::OutOfRange);
            }
            return Ok(ResolvedUser {
                uid,
                gid,
                additional_gids: vec![gid],
                home: db.home_of(uid),
            });
        }
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = db
        .passwd
        .as_ref()
        .ok_or_else(|| UserError::NoPasswdFile(user.to_owned()))?;
    let numeric_user = user.parse::<u32>().ok();
    let entry = match numeric_user {
        Some(uid) => passwd.iter().find(|e| e.uid == uid),
        None => passwd.iter().find(|e| e.name == user),
    };
    let (uid, mut gid, name, home) = match (entry, numeric_user) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name.clone()), Some(e.home.clone())),
        (None, Some(uid)) => (uid, 0, None, None),
        (None, None) => return Err(UserError::NoSuchUser(user.to_owned())),
    };
    let mut supplementary = Vec::new();
    match group {
        Some(group) => {
            let groups = db.group.as_deref();
            gid = match group.parse::<u32>() {
                Ok(number) => groups
                    .and_then(|g| g.iter().find(|e| e.gid == number))
                    .map_or(number, |e| e.gid),
                Err(_) => {
                    let groups = groups.ok_or_else(|| {
                        UserError::NoGroupFile(name.clone().unwrap_or_else(|| user.to_owned()))
                    })?;
                    groups
                        .iter()
                        .find(|e| e.name == group)
                        .map(|e| e.gid)
                        .ok_or_else(|| UserError::NoSuchGroup(group.to_owned()))?
                }
            };
        }
        None => {
            if let Some(name) = &name {
                let groups = db
                    .group
                    .as_ref()
                    .ok_or_else(|| UserError::NoGroupFile(name.clone()))?;
                supplementary = groups
                    .iter()
                    .filter(|g| g.members.iter().any(|m| m == name))
                    .map(|g| g.gid)
                    .collect();
            }
        }
    }
    if uid > MAX_ID || gid > MAX_ID || supplementary.iter().any(|&g| g > MAX_ID) {
        return Err(UserError::OutOfRange);
    }
    let mut additional_gids = supplementary;
    if !additional_gids.contains(&gid) {
        additional_gids.insert(0, gid);
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:alice,bob\ndocker:x:999:alice\nalice:x:1000:\nbob:x:1001:\n";

    fn db() -> UserDb {
        UserDb::from_contents(Some(PASSWD), Some(GROUP))
    }

    fn ids(spec: &str) -> (u32, u32, Vec<u32>) {
        let u = resolve(spec, &db()).unwrap();
        (u.uid, u.gid, u.additional_gids)
    }

    #[test]
    fn reading_notes_a_symlink_on_the_way() {
        let read = |root: &Path| {
            let fd = nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
                .expect("rootfs");
            let (db, plain) =
                UserDb::read_noting_symlinks(&crate::sys::LinuxSys, fd.as_fd()).expect("read");
            (resolve("alice", &db).map(|u| u.uid), plain)
        };
        let root = tempfile::tempdir().expect("rootfs");
        assert_eq!(
            read(root.path()),
            (Err(UserError::NoPasswdFile("alice".into())), true),
            "no files, nothing followed"
        );
        std::fs::create_dir(root.path().join("etc")).expect("etc");
        std::fs::write(root.path().join("etc/passwd"), PASSWD).expect("passwd");
        std::fs::write(root.path().join("etc/group"), GROUP).expect("group");
        assert_eq!(read(root.path()), (Ok(1000), true), "plain files");

        // `etc` a symlink (resolved in the rootfs), or the file itself one: still read.
        let linked = tempfile::tempdir().expect("rootfs");
        std::fs::create_dir(linked.path().join("real")).expect("real");
        std::fs::write(linked.path().join("real/passwd"), PASSWD).expect("passwd");
        std::fs::write(linked.path().join("real/group"), GROUP).expect("group");
        std::os::unix::fs::symlink("/real", linked.path().join("etc")).expect("symlink");
        assert_eq!(read(linked.path()), (Ok(1000), false), "etc a symlink");
        std::fs::remove_file(linked.path().join("etc")).expect("unlink");
        std::fs::create_dir(linked.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("../real/passwd", linked.path().join("etc/passwd"))
            .expect("symlink");
        std::fs::write(linked.path().join("etc/group"), GROUP).expect("group");
        assert_eq!(read(linked.path()), (Ok(1000), false), "passwd a symlink");
    }

    #[test]
    fn spec_examples() {
        assert_eq!(ids("alice"), (1000, 1000, vec![1000, 10, 999]));
        assert_eq!(ids("alice:wheel"), (1000, 10, vec![10]));
        assert_eq!(ids("bob"), (1001, 1001, vec![1001, 10]));
        assert_eq!(ids("2000"), (2000, 0, vec![0]));
        assert_eq!(
            resolve("nobody", &db()),
            Err(UserError::NoSuchUser("nobody".into()))
        );
    }

    #[test]
    fn numeric_pairs_and_root_take_the_fast_path() {
        assert_eq!(ids("1:1"), (1, 1, vec![1]));
        assert_eq!(ids("root:root"), (0, 0, vec![0]));
        assert_eq!(ids("5:root"), (5, 0, vec![0]));
        let none = UserDb::default();
        assert_eq!(resolve("7:8", &none).unwrap().uid, 7);
    }

    #[test]
    fn empty_user_is_root_with_its_groups_or_bare_root() {
        let with_wheel = UserDb::from_contents(Some(PASSWD), Some("wheel:x:10:root\n"));
        assert_eq!(
            resolve("", &with_wheel).unwrap().additional_gids,
            vec![0, 10]
        );
        let bare = resolve("", &UserDb::default()).unwrap();
        assert_eq!((bare.uid, bare.gid, bare.additional_gids), (0, 0, vec![0]));
    }

    #[test]
    fn missing_files_quirks() {
        let none = UserDb::default();
        for spec in ["0", "root", "1000", "alice"] {
            assert_eq!(
                resolve(spec, &none),
                Err(UserError::NoPasswdFile(spec.into())),
                "{spec}"
            );
        }
        let no_group = UserDb::from_contents(Some(PASSWD), None);
        assert_eq!(
            resolve("alice", &no_group),
            Err(UserError::NoGroupFile("alice".into()))
        );
        assert_eq!(resolve("4242", &no_group).unwrap().gid, 0);
    }

    #[test]
    fn explicit_groups_numeric_and_named() {
        assert_eq!(ids("alice:4321"), (1000, 4321, vec![4321]));
        assert_eq!(ids("alice:999"), (1000, 999, vec![999]));
        assert_eq!(
            resolve("alice:nogroup", &db()),
            Err(UserError::NoSuchGroup("nogroup".into()))
        );
    }

    #[test]
    fn out_of_range_ids() {
        assert_eq!(resolve("3000000000:1", &db()), Err(UserError::OutOfRange));
        assert_eq!(resolve("3000000000", &db()), Err(UserError::OutOfRange));
    }

    #[test]
    fn home_comes_from_passwd() {
        assert_eq!(
            resolve("alice", &db()).unwrap().home.as_deref(),
            Some("/home/alice")
        );
        assert_eq!(
            resolve("1000:1000", &db()).unwrap().home.as_deref(),
            Some("/home/alice")
        );
        assert_eq!(resolve("4242", &db()).unwrap().home, None);
    }
}
