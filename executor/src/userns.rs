//! User namespaces: how an unprivileged kiln gets a root it may use.
//!
//! kiln enters one user namespace (with a new mount namespace) at startup, before any
//! thread exists: it forks, the child unshares `CLONE_NEWUSER | CLONE_NEWNS`, and the parent
//! writes the child's id maps, then only waits and forwards signals. The map is
//! `0 → caller` plus the caller's subordinate ranges from `/etc/subuid` and `/etc/subgid`,
//! written by the setuid helpers `newuidmap`/`newgidmap` (whose exit status is checked);
//! `setgroups` stays allowed so tools such as apt can drop privileges. Without a
//! subordinate range the map is the single id `0 → caller` with `setgroups` denied, as the
//! kernel requires (user_namespaces(7)), and kiln warns that files owned by other ids
//! cannot be created.
//!
//! # Caveats
//! [`enter`] and [`enter_private_mount_namespace`] must run before any thread starts:
//! the kernel refuses `unshare(CLONE_NEWUSER | CLONE_NEWNS)` in a multi-threaded process.

use std::fs;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use crate::sys::{self, Forked};

/// Errors from entering a user namespace.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("user namespaces must be entered before any thread starts ({0} threads running)")]
    Threaded(usize),
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{helper} failed ({status}): {stderr}")]
    Helper {
        helper: &'static str,
        status: String,
        stderr: String,
    },
    #[error("running {helper}: {source} (install the uidmap package)")]
    HelperMissing {
        helper: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    WriteMap {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the user namespace child exited before it was mapped")]
    ChildVanished,
    #[error(
        "cannot create a user namespace: {0} (is kernel.unprivileged_userns_clone or user.max_user_namespaces 0?)"
    )]
    Unshare(nix::Error),
}

fn sys_err(op: &'static str) -> impl FnOnce(nix::Error) -> UsernsError {
    move |source| UsernsError::Sys { op, source }
}

/// One line of a uid or gid map: `size` ids from `host_id` appear as `container_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// How the caller's ids are mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingKind {
    /// `0 → caller` plus subordinate ranges, through newuidmap/newgidmap.
    Subordinate,
    /// Only `0 → caller`; setgroups denied.
    SingleId,
}

/// The uid and gid maps of a user namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mappings {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
    pub kind: MappingKind,
}

impl Mappings {
    /// The highest container id that is mapped (uids), plus one.
    pub fn uid_count(&self) -> u64 {
        self.uids
            .iter()
            .map(|r| u64::from(r.container_id) + u64::from(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Whether `uid` (a container id) is mapped.
    pub fn maps_uid(&self, uid: u32) -> bool {
        contains(&self.uids, uid)
    }

    /// Whether `gid` (a container id) is mapped.
    pub fn maps_gid(&self, gid: u32) -> bool {
        contains(&self.gids, gid)
    }
}

fn contains(ranges: &[IdRange], id: u32) -> bool {
    // Half-open: [container_id, container_id + size). youki's inclusive bound is a known bug.
    ranges.iter().any(|r| {
        id >= r.container_id && u64::from(id) < u64::from(r.container_id) + u64::from(r.size)
    })
}

/// Parses `/etc/subuid`-style text: `name_or_id:start:count` lines for `user` or `id`.
pub fn parse_subordinate(text: &str, user: Option<&str>, id: u32) -> Vec<(u32, u32)> {
    let id = id.to_string();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let mut parts = line.split(':');
            let owner = parts.next()?;
            let start: u32 = parts.next()?.trim().parse().ok()?;
            let count: u32 = parts.next()?.trim().parse().ok()?;
            let matches = owner == id || user.is_some_and(|u| owner == u);
            (matches && count > 0).then_some((start, count))
        })
        .collect()
}

fn build_ranges(own: u32, subordinate: &[(u32, u32)]) -> Vec<IdRange> {
    let mut ranges = vec![IdRange {
        container_id: 0,
        host_id: own,
        size: 1,
    }];
    let mut next = 1u32;
    for &(start, count) in subordinate {
        // The kernel allows at most 340 lines; real systems have a handful.
        if ranges.len() >= 340 {
            break;
        }
        ranges.push(IdRange {
            container_id: next,
            host_id: start,
            size: count,
        });
        next = next.saturating_add(count);
    }
    ranges
}

/// The maps kiln would use for the calling user, from `/etc/subuid` and `/etc/subgid`.
pub fn plan_mappings() -> Result<Mappings, UsernsError> {
    let uid = Uid::current().as_raw();
    let gid = Gid::current().as_raw();
    let name = nix::unistd::User::from_uid(Uid::current())
        .ok()
        .flatten()
        .map(|u| u.name);
    let read = |path: &str| -> Result<String, UsernsError> {
        match fs::read_to_string(path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(UsernsError::Read {
                path: path.into(),
                source,
            }),
        }
    };
    let subuids = parse_subordinate(&read("/etc/subuid")?, name.as_deref(), uid);
    let subgids = parse_subordinate(&read("/etc/subgid")?, name.as_deref(), uid);
    Ok(plan_from(uid, gid, &subuids, &subgids))
}

fn plan_from(uid: u32, gid: u32, subuids: &[(u32, u32)], subgids: &[(u32, u32)]) -> Mappings {
    let helpers = find_helper("newuidmap").is_some() && find_helper("newgidmap").is_some();
    if subuids.is_empty() || subgids.is_empty() || !helpers {
        return Mappings {
            uids: build_ranges(uid, &[]),
            gids: build_ranges(gid, &[]),
            kind: MappingKind::SingleId,
        };
    }
    Mappings {
        uids: build_ranges(uid, subuids),
        gids: build_ranges(gid, subgids),
        kind: MappingKind::Subordinate,
    }
}

fn find_helper(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn thread_count() -> usize {
    fs::read_dir("/proc/self/task").map_or(1, |dir| dir.count())
}

fn write_maps(child: Pid, mappings: &Mappings) -> Result<(), UsernsError> {
    match mappings.kind {
        MappingKind::Subordinate => {
            // Both setuid helpers run at once: each exec costs about a millisecond.
            let uid = spawn_helper("newuidmap", child, &mappings.uids)?;
            let gid = spawn_helper("newgidmap", child, &mappings.gids);
            let uid = finish_helper("newuidmap", uid);
            finish_helper("newgidmap", gid?).and(uid)
        }
        MappingKind::SingleId => {
            let proc = format!("/proc/{}", child.as_raw());
            let write = |file: &str, content: String| {
                let path = format!("{proc}/{file}");
                fs::write(&path, content).map_err(|source| UsernsError::WriteMap { path, source })
            };
            write("uid_map", format_map(&mappings.uids))?;
            // An unprivileged writer must deny setgroups before writing gid_map.
            write("setgroups", "deny".to_owned())?;
            write("gid_map", format_map(&mappings.gids))
        }
    }
}

fn format_map(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.container_id, r.host_id, r.size))
        .collect()
}

fn spawn_helper(
    helper: &'static str,
    child: Pid,
    ranges: &[IdRange],
) -> Result<std::process::Child, UsernsError> {
    let program = find_helper(helper).unwrap_or_else(|| PathBuf::from(helper));
    let mut command = Command::new(program);
    command.arg(child.as_raw().to_string());
    for r in ranges {
        command.args([
            r.container_id.to_string(),
            r.host_id.to_string(),
            r.size.to_string(),
        ]);
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| UsernsError::HelperMissing { helper, source })
}

fn finish_helper(helper: &'static str, process: std::process::Child) -> Result<(), UsernsError> {
    let output = process
        .wait_with_output()
        .map_err(|source| UsernsError::HelperMissing { helper, source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(UsernsError::Helper {
            helper,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Forks a child that unshares a user and mount namespace and waits until the parent has
/// mapped it. In the child, returns `Forked::Child` running as uid/gid 0 of the namespace.
fn fork_mapped(mappings: &Mappings) -> Result<Forked, UsernsError> {
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let parent = nix::unistd::getpid();
    match sys::fork().map_err(sys_err("fork"))? {
        Forked::Child => {
            drop(ready_r);
            drop(go_w);
            // Killing the process the user started kills kiln too (and so its steps and
            // network helpers), as it does rootful, where they are one process.
            if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
                || nix::unistd::getppid() != parent
            {
                sys::exit_immediately(125);
            }
            child_side(ready_w, go_r, mappings);
            Ok(Forked::Child)
        }
        Forked::Parent { child, .. } => {
            drop(ready_w);
            drop(go_r);
            let mut status = [0u8; 1];
            let ready = std::fs::File::from(ready_r).read(&mut status).unwrap_or(0);
            if ready != 1 || status[0] != b'R' {
                let _ = waitpid(child, None);
                return Err(if ready == 1 && status[0] == b'E' {
                    UsernsError::Unshare(nix::Error::EPERM)
                } else {
                    UsernsError::ChildVanished
                });
            }
            if let Err(err) = write_maps(child, mappings) {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(err);
            }
            nix::unistd::write(&go_w, b"G").map_err(sys_err("signal the mapped child"))?;
            Ok(Forked::Parent { child, pidfd: None })
        }
    }
}

/// Runs in the forked child: unshare, report, wait to be mapped, become root.
fn child_side(ready: OwnedFd, go: OwnedFd, mappings: &Mappings) {
    if nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).is_err() {
        let _ = nix::unistd::write(&ready, b"E");
        sys::exit_immediately(125);
    }
    if nix::unistd::write(&ready, b"R").is_err() {
        sys::exit_immediately(125);
    }
    let mut go_byte = [0u8; 1];
    if std::fs::File::from(go).read(&mut go_byte).unwrap_or(0) != 1 || go_byte[0] != b'G' {
        sys::exit_immediately(125);
    }
    drop(ready);
    // The credentials already map to 0; make that explicit and drop the host's
    // supplementary groups (which would show as the overflow gid) when setgroups is allowed.
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    if mappings.kind == MappingKind::Subordinate {
        let _ = nix::unistd::setgroups(&[root_gid]);
    }
    let _ = nix::unistd::setresgid(root_gid, root_gid, root_gid);
    let _ = nix::unistd::setresuid(root_uid, root_uid, root_uid);
}

/// What [`enter`] left the process in.
#[derive(Clone, Debug)]
pub enum Entered {
    /// kiln was started as real root: it only has a private mount namespace.
    Root,
    /// kiln runs as uid 0 of a user namespace mapped as shown.
    UserNamespace(Mappings),
}

/// Enters kiln's namespaces for the rest of the process's life. As real root: a private
/// mount namespace only. Otherwise: a mapped user namespace, with this function returning
/// in the child while the original process supervises it and exits with its status.
pub fn enter() -> Result<Entered, UsernsError> {
    if Uid::effective().is_root() {
        enter_private_mount_namespace()?;
        return Ok(Entered::Root);
    }
    let threads = thread_count();
    if threads > 1 {
        return Err(UsernsError::Threaded(threads));
    }
    let mappings = plan_mappings()?;
    warn_single_id(&mappings);
    // Signals are blocked before the fork so none is lost between fork and sigwaitinfo.
    let forwarded = supervisor_signals();
    let mut previous = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded), Some(&mut previous))
        .map_err(sys_err("block signals"))?;
    match fork_mapped(&mappings)? {
        Forked::Child => {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None)
                .map_err(sys_err("restore signal mask"))?;
            make_mounts_private()?;
            Ok(Entered::UserNamespace(mappings))
        }
        Forked::Parent { child, .. } => supervise(child, &forwarded),
    }
}

fn warn_single_id(mappings: &Mappings) {
    if mappings.kind == MappingKind::SingleId {
        tracing::warn!(
            "no subordinate id range for this user in /etc/subuid and /etc/subgid (or no \
             newuidmap/newgidmap): only uid/gid 0 exist inside kiln's user namespace, so \
             layers and steps cannot create files owned by other ids (lchown fails) and \
             setgroups is denied; add a range with `usermod --add-subuids 100000-165535 \
             --add-subgids 100000-165535 <user>`"
        );
    }
}

fn supervisor_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(signal);
    }
    set
}

/// The original process: forward signals sent with kill(2) (a terminal's ^C already reaches
/// the child, which shares the process group) and exit with the child's status.
fn supervise(child: Pid, signals: &SigSet) -> ! {
    loop {
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => sys::exit_immediately(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => sys::exit_immediately(128 + signal as i32),
            Err(nix::Error::ECHILD) => sys::exit_immediately(1),
            _ => {}
        }
        let Ok(info) = sys::wait_signal(signals) else {
            continue;
        };
        let sent_by_process = info.code == libc::SI_USER || info.code == libc::SI_QUEUE;
        if info.signal != libc::SIGCHLD && sent_by_process {
            if let Ok(signal) = Signal::try_from(info.signal) {
                let _ = nix::sys::signal::kill(child, signal);
            }
        }
    }
}

/// As real root: a mount namespace of kiln's own whose mounts never propagate to the host.
pub fn enter_private_mount_namespace() -> Result<(), UsernsError> {
    let threads = thread_count();
    if threads > 1 {
        return Err(UsernsError::Threaded(threads));
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys_err("unshare mount namespace"))?;
    make_mounts_private()
}

fn make_mounts_private() -> Result<(), UsernsError> {
    use crate::sys::Sys as _;
    crate::sys::LinuxSys
        .make_rslave_root()
        .map_err(sys_err("make / rslave"))
}

/// Runs `body` in a forked child inside a fresh, mapped user and mount namespace (as uid 0
/// there) and returns its exit code; a panic in `body` becomes exit code 101. For tests and
/// tools that need the rootless view from an already running (possibly threaded) process.
///
/// # Caveats
/// The child is forked from a possibly multi-threaded process: `body` must not depend on
/// locks other threads might hold (glibc resets malloc's across fork).
pub fn run_in_user_namespace<F: FnOnce() -> i32>(body: F) -> Result<i32, UsernsError> {
    let mappings = plan_mappings()?;
    warn_single_id(&mappings);
    match fork_mapped(&mappings)? {
        Forked::Child => {
            if make_mounts_private().is_err() {
                sys::exit_immediately(125);
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
            sys::exit_immediately(code)
        }
        Forked::Parent { child, .. } => match waitpid(child, None).map_err(sys_err("wait"))? {
            WaitStatus::Exited(_, code) => Ok(code),
            WaitStatus::Signaled(_, signal, _) => Ok(128 + signal as i32),
            _ => Ok(1),
        },
    }
}

/// Reads the uid map of the current process (inside a user namespace).
pub fn current_uid_map() -> Result<Vec<IdRange>, UsernsError> {
    read_map(Path::new("/proc/self/uid_map"))
}

fn read_map(path: &Path) -> Result<Vec<IdRange>, UsernsError> {
    let text = fs::read_to_string(path).map_err(|source| UsernsError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u32>());
            Some(IdRange {
                container_id: fields.next()?.ok()?,
                host_id: fields.next()?.ok()?,
                size: fields.next()?.ok()?,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_lines_match_by_name_or_id_and_skip_junk() {
        let text = "# comment\nalice:100000:65536\n1000:300000:10\nbob:200000:65536\nalice:x:1\nalice:5:0\n";
        assert_eq!(
            parse_subordinate(text, Some("alice"), 1000),
            vec![(100000, 65536), (300000, 10)]
        );
        assert_eq!(
            parse_subordinate(text, Some("carol"), 7),
            Vec::<(u32, u32)>::new()
        );
    }

    #[test]
    fn ranges_start_with_self_then_follow_consecutively() {
        assert_eq!(
            build_ranges(1000, &[(100000, 65536), (300000, 10)]),
            vec![
                IdRange {
                    container_id: 0,
                    host_id: 1000,
                    size: 1
                },
                IdRange {
                    container_id: 1,
                    host_id: 100000,
                    size: 65536
                },
                IdRange {
                    container_id: 65537,
                    host_id: 300000,
                    size: 10
                },
            ]
        );
    }

    #[test]
    fn mapping_bounds_are_half_open() {
        let mappings = Mappings {
            uids: build_ranges(1000, &[(100000, 65536)]),
            gids: build_ranges(1000, &[(100000, 65536)]),
            kind: MappingKind::Subordinate,
        };
        assert!(mappings.maps_uid(0));
        assert!(mappings.maps_uid(65536));
        assert!(!mappings.maps_uid(65537));
        assert_eq!(mappings.uid_count(), 65537);
    }

    #[test]
    fn no_subordinate_range_means_single_id() {
        let mappings = plan_from(1000, 1000, &[], &[(1, 2)]);
        assert_eq!(mappings.kind, MappingKind::SingleId);
        assert_eq!(
            mappings.uids,
            vec![IdRange {
                container_id: 0,
                host_id: 1000,
                size: 1
            }]
        );
    }

    #[test]
    fn single_map_format() {
        assert_eq!(format_map(&build_ranges(5, &[(10, 2)])), "0 5 1\n1 10 2\n");
    }
}
