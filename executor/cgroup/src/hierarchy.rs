//! A step's cgroups: placing it in cgroups of its own (`linux.cgroupsPath`), applying its
//! limits ([`crate::limits`]), noticing when it exceeds one, reading what it used, and
//! removing the cgroups afterwards — also those a killed kiln left behind.
//!
//! * **Where**: per controller, on the cgroup v1 hierarchy that has it (this project's
//!   hosts are hybrid: `pids`, `memory` and `cpu` on v1) or else on the v2 hierarchy. As
//!   real root the path is absolute in each hierarchy, as runc places it; rootless, it can
//!   only live below kiln's own cgroup when that is delegated (writable by the user), and
//!   a limit no cgroup can carry falls back to rlimits ([`crate::limits::fallback_rlimits`]).
//! * **Joining**: the step's init joins its v1 leaves itself by writing `0` to each
//!   leaf's `tasks` (one thread, so the kernel skips the global threadgroup lock whose
//!   RCU grace period makes a `cgroup.procs` write cost ~10 ms), and is cloned straight
//!   into its v2 leaf (`CLONE_INTO_CGROUP`). Every later process of the step is born inside.
//! * **Exceeding**: a fork at `pids.max` counts in `pids.events`, an OOM kill in
//!   `memory.oom_control` (v1) or `memory.events` (v2). On v2 a change of those files
//!   wakes the runner ([`Watch`]); cgroup v1 notifies neither (its OOM eventfd would cost
//!   more per step than all the rest), so there the runner looks every
//!   [`V1_CHECK_INTERVAL`] of a running step. Either way it kills the step so that it fails
//!   naming the limit instead of limping on (a fork bomb at its limit would spin until
//!   cancelled).
//! * **Views**: the step sees its own cgroup directories at `/sys/fs/cgroup` (bound by the
//!   runner) when [`wanted`] says so; otherwise an empty, read-only `/sys/fs/cgroup`.
//! * **Cleanup**: every leaf is listed in a registry file (`<run>/cgroups/<id>`) that
//!   the runner holds locked while the step lives; a later kiln removes the leaves of
//!   registry files nobody holds ([`clean_stale`]).

use std::fs::{self, File};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

use crate::limits::{Enforced, Exceeded, Limits};

/// A cgroup hierarchy to show at `/sys/fs/cgroup/<name>` (`name` empty: cgroup v2, shown at
/// `/sys/fs/cgroup` itself), bound from the step's cgroup directory on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupView {
    pub name: String,
    pub host_path: PathBuf,
}

/// Errors from cgroup handling; each names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the step's cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting {path} to {value}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("joining the step's cgroup {path}: {source}")]
    Join {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup registry {path}: {source}")]
    Registry {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The controllers limits live in.
const PIDS: &str = "pids";
const MEMORY: &str = "memory";
const CPU: &str = "cpu";

/// How often the runner checks a running step's v1 cgroups for an exceeded limit.
pub const V1_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where kiln moves itself on a delegated cgroup v2 tree (see [`prepare_delegation`]); a
/// step's cgroups then go next to it.
const SUPERVISOR: &str = "kiln-supervisor";

/// Whether `dir` (cgroup v2) gives its children one of the limit controllers.
fn delegates_controllers(dir: &Path) -> bool {
    read_small(&dir.join("cgroup.subtree_control")).is_ok_and(|s| {
        s.split_whitespace()
            .any(|c| [PIDS, MEMORY, CPU].contains(&c))
    })
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// One mounted hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hierarchy {
    mountpoint: PathBuf,
    /// Controllers (`cpu`, `name=systemd`, …); empty for cgroup v2.
    controllers: Vec<String>,
    /// kiln's own cgroup in this hierarchy, relative to the mountpoint.
    own: String,
}

impl Hierarchy {
    fn is_v2(&self) -> bool {
        self.controllers.is_empty()
    }

    /// kiln's own cgroup directory.
    fn own_dir(&self) -> PathBuf {
        join(&self.mountpoint, &self.own)
    }

    /// Below which a step's cgroups go: the mountpoint as real root (runc's absolute
    /// paths), else kiln's own, delegated cgroup. On cgroup v2 a cgroup with processes
    /// cannot give children controllers, so there it is the nearest delegated (writable)
    /// ancestor that does — such as the scope kiln moved out of into [`SUPERVISOR`].
    fn base(&self, real_root: bool) -> PathBuf {
        if real_root {
            return self.mountpoint.clone();
        }
        let own = self.own_dir();
        if self.is_v2() {
            let delegated = own
                .ancestors()
                .take_while(|d| d.starts_with(&self.mountpoint) && *d != self.mountpoint)
                .take_while(|d| writable(d))
                .find(|d| delegates_controllers(d));
            if let Some(dir) = delegated {
                return dir.to_path_buf();
            }
        }
        own
    }

    /// The name the step sees it under (`/sys/fs/cgroup/<name>`; empty for v2).
    fn view_name(&self) -> String {
        if self.is_v2() {
            String::new()
        } else {
            self.mountpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        }
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    read_small(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a small procfs or cgroupfs file. These report a size of 0, so reading them
/// into a string that grows from nothing takes a system call per doubling; one buffer
/// of a page or two takes one or two.
fn read_small(path: &Path) -> std::io::Result<String> {
    let mut text = String::with_capacity(8192);
    File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// The hierarchies [`preload`] read, which the processes forked afterwards share.
static PRELOADED: std::sync::OnceLock<Vec<Hierarchy>> = std::sync::OnceLock::new();

/// Reads the mounted hierarchies and this process's cgroups once, for every process this
/// one forks afterwards (the step launcher: its runners then skip parsing
/// `/proc/self/mountinfo` per step). Only for a process that stays in its cgroups and
/// whose cgroup mounts do not change.
pub fn preload() -> Result<(), CgroupError> {
    let found = read_hierarchies()?;
    let _ = PRELOADED.set(found);
    Ok(())
}

fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    match PRELOADED.get() {
        Some(found) => Ok(found.clone()),
        None => read_hierarchies(),
    }
}

fn read_hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let own = read(Path::new("/proc/self/cgroup"))?;
    Ok(parse_hierarchies(&mountinfo, &own))
}

fn parse_hierarchies(mountinfo: &str, own: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // <id> <parent> <maj:min> <root> <mountpoint> <options> [optional...] - <fstype> <source> <superoptions>
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(mountpoint), Some(fstype), Some(superopts)) =
            (fields.get(4), right.first(), right.get(2))
        else {
            continue;
        };
        let controllers: Vec<String> = match *fstype {
            "cgroup" => superopts
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                .map(str::to_owned)
                .collect(),
            "cgroup2" => Vec::new(),
            _ => continue,
        };
        let own_path = own
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                Some((names, path))
            })
            .find(|(names, _)| {
                if controllers.is_empty() {
                    names.is_empty()
                } else {
                    let listed: Vec<&str> = names.split(',').collect();
                    controllers.iter().all(|c| listed.contains(&c.as_str()))
                }
            })
            .map(|(_, path)| path.to_owned())
            .unwrap_or_else(|| "/".to_owned());
        out.push(Hierarchy {
            mountpoint: PathBuf::from(mountpoint),
            controllers,
            own: own_path,
        });
    }
    out
}

fn join(base: &Path, relative: &str) -> PathBuf {
    let mut path = base.to_path_buf();
    for part in relative
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
    {
        path.push(part);
    }
    path
}

/// `linux.cgroupsPath` as a path in the hierarchy. The systemd form (`slice:prefix:name`,
/// which BuildKit produces for a `cgroupParent` like `system.slice:`) becomes the path
/// systemd would give that scope (`/system.slice/prefix-name.scope`; a slice `a-b.slice`
/// nests as `/a.slice/a-b.slice`).
pub fn hierarchy_path(cgroups_path: &str) -> String {
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let [slice, prefix, name] = parts.as_slice() else {
        return cgroups_path.to_owned();
    };
    let mut path = String::new();
    if let Some(stem) = slice
        .strip_suffix(".slice")
        .filter(|s| !s.is_empty() && *s != "-")
    {
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push('/');
            path.push_str(&acc);
            path.push_str(".slice");
        }
    }
    let scope = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    format!("{path}/{scope}")
}

/// What a step asks of its cgroups.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `linux.cgroupsPath` (`/buildkit/<id>`, `/<parent>/buildkit/<id>`, or systemd form).
    pub cgroups_path: &'a str,
    /// kiln runs as real root (not in a user namespace).
    pub real_root: bool,
    pub limits: Limits,
    /// Every hierarchy, shown to the step (see [`wanted`]), not only those of its limits.
    pub all: bool,
}

impl Request<'_> {
    /// Controllers this request puts limits in (memory always: it brings the peak).
    fn limit_controllers(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.limits.pids.is_some() {
            out.push(PIDS);
        }
        out.push(MEMORY);
        if self.limits.cpu_weight.is_some() {
            out.push(CPU);
        }
        out
    }
}

/// A step's cgroup directories, created.
#[derive(Debug, Default)]
pub struct Placement {
    /// v1 leaves the step's init joins ([`join_self`]).
    v1: Vec<PathBuf>,
    /// The v2 leaf, opened for `CLONE_INTO_CGROUP`.
    v2: Option<(PathBuf, OwnedFd)>,
    /// Leaves kiln created, removed after the step.
    created: Vec<PathBuf>,
    /// What the step sees under `/sys/fs/cgroup`.
    pub views: Vec<CgroupView>,
    /// The limits cgroups enforce.
    pub enforced: Enforced,
    limits: Limits,
    /// The leaf holding the memory controller, and whether it is v2.
    memory: Option<(PathBuf, bool)>,
    /// The leaf holding the pids controller, and whether it is v2.
    pids: Option<(PathBuf, bool)>,
    /// The v2 leaf has the io controller.
    io: bool,
    registration: Option<Registration>,
}

/// One leaf to create.
#[derive(Debug)]
struct Planned {
    hierarchy: Hierarchy,
    base: PathBuf,
    leaf: PathBuf,
    /// Limit controllers it carries.
    limits: Vec<&'static str>,
    /// v2 controllers to enable down to the leaf.
    enable: Vec<String>,
}

fn v2_available(base: &Path) -> Vec<String> {
    read_small(&base.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn plan(req: &Request<'_>, hierarchies: &[Hierarchy]) -> Vec<Planned> {
    let relative = hierarchy_path(req.cgroups_path);
    let wanted = req.limit_controllers();
    let mut planned = Vec::new();
    let mut covered: Vec<&str> = Vec::new();
    for h in hierarchies.iter().filter(|h| !h.is_v2()) {
        let limits: Vec<&'static str> = wanted
            .iter()
            .copied()
            .filter(|c| h.controllers.iter().any(|hc| hc == c))
            .collect();
        covered.extend(&limits);
        if limits.is_empty() && !req.all {
            continue;
        }
        let base = h.base(req.real_root);
        planned.push(Planned {
            hierarchy: h.clone(),
            leaf: join(&base, &relative),
            base,
            limits,
            enable: Vec::new(),
        });
    }
    if let Some(h) = hierarchies.iter().find(|h| h.is_v2()) {
        let base = h.base(req.real_root);
        let available = v2_available(&base);
        let limits: Vec<&'static str> = wanted
            .iter()
            .copied()
            .filter(|c| !covered.contains(c) && available.iter().any(|a| a == c))
            .collect();
        if !limits.is_empty() || req.all {
            let mut enable: Vec<String> = limits.iter().map(|c| (*c).to_owned()).collect();
            if available.iter().any(|a| a == "io") {
                enable.push("io".to_owned());
            }
            planned.push(Planned {
                hierarchy: h.clone(),
                leaf: join(&base, &relative),
                base,
                limits,
                enable,
            });
        }
    }
    planned
}

/// Whether a step gets cgroups of its own in every hierarchy (and sees them at
/// `/sys/fs/cgroup`), not only in those of its limits: on cgroup v2 always (one hierarchy),
/// on v1 when it is observable — a `Meta.cgroupParent` (BuildKit places the step at
/// `/<parent>/buildkit/<id>`) or an insecure step (which may create child cgroups,
/// removed with its own).
pub fn wanted(cgroup_parent: &str, insecure: bool) -> bool {
    !cgroup_parent.is_empty() || insecure || unified()
}

fn unified() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Creates the step's cgroups and applies its limits. As real root a limit that cannot be
/// applied in a writable hierarchy fails the step; otherwise it is left to the rlimit
/// fallback (see [`Placement::enforced`]). With `registry` (a directory), the leaves are recorded there
/// before they exist, under `id`, for [`clean_stale`].
pub fn create(
    req: &Request<'_>,
    registry: Option<&Path>,
    id: &str,
) -> Result<Placement, CgroupError> {
    let planned = plan(req, &hierarchies()?);
    let mut placement = Placement::default();
    placement.limits = req.limits;
    if planned.is_empty() {
        return Ok(placement);
    }
    if let Some(dir) = registry {
        let leaves: Vec<&Path> = planned.iter().map(|p| p.leaf.as_path()).collect();
        placement.registration = Some(register(dir, id, &leaves)?);
    }
    for p in &planned {
        // A hierarchy kiln may not write at all (rootless without delegation, a read-only
        // cgroup filesystem in a container) is left to the rlimit fallback; any other
        // failure to apply a limit as root fails the step.
        let available = writable(&p.base);
        let created = if available {
            create_one(p, &req.limits)
        } else {
            Err(CgroupError::Create {
                path: p.base.clone(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            })
        };
        match created {
            Ok(fd) => {
                placement.created.push(p.leaf.clone());
                for c in &p.limits {
                    match *c {
                        PIDS => {
                            placement.enforced.pids = req.limits.pids.is_some();
                            placement.pids = Some((p.leaf.clone(), p.hierarchy.is_v2()));
                        }
                        MEMORY => {
                            placement.enforced.memory = req.limits.memory.is_some();
                            placement.memory = Some((p.leaf.clone(), p.hierarchy.is_v2()));
                        }
                        _ => placement.enforced.cpu = req.limits.cpu_weight.is_some(),
                    }
                }
                match fd {
                    Some(fd) => {
                        placement.io = p.enable.iter().any(|c| c == "io");
                        placement.v2 = Some((p.leaf.clone(), fd));
                    }
                    None => placement.v1.push(p.leaf.clone()),
                }
                if req.all {
                    placement.views.push(CgroupView {
                        name: p.hierarchy.view_name(),
                        host_path: p.leaf.clone(),
                    });
                }
            }
            Err(e) if req.real_root && available && !p.limits.is_empty() => {
                placement.remove();
                return Err(e);
            }
            Err(e) => {
                tracing::debug!(error = %e, "step placed without this cgroup");
                if req.all {
                    placement.views.push(CgroupView {
                        name: p.hierarchy.view_name(),
                        host_path: p.hierarchy.own_dir(),
                    });
                }
            }
        }
    }
    // A unified-only host shows exactly one view at /sys/fs/cgroup itself.
    if placement.views.iter().any(|v| v.name.is_empty()) && placement.views.len() > 1 {
        placement.views.retain(|v| !v.name.is_empty());
    }
    Ok(placement)
}

/// Creates one leaf with its limits; for v2, enables its controllers on the way and
/// returns the leaf opened for `CLONE_INTO_CGROUP`.
fn create_one(p: &Planned, limits: &Limits) -> Result<Option<OwnedFd>, CgroupError> {
    let v2 = p.hierarchy.is_v2();
    let cpuset = p.hierarchy.controllers.iter().any(|c| c == "cpuset");
    let relative = p.leaf.strip_prefix(&p.base).unwrap_or(&p.leaf);
    let create_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CgroupError::Create { path, source }
    };
    // The common case first: the parent levels exist (`/buildkit`), one mkdir does.
    let direct = if v2 || cpuset {
        None
    } else {
        match fs::create_dir(&p.leaf) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
            Err(e) => return Err(create_err(&p.leaf)(e)),
        }
    };
    let mut current = p.base.clone();
    let levels: Vec<_> = if direct.is_some() {
        Vec::new()
    } else {
        relative.components().collect()
    };
    for (n, part) in levels.iter().enumerate() {
        if v2 && !p.enable.is_empty() {
            enable_controllers(&current, &p.enable)?;
        }
        let parent = current.clone();
        current.push(part);
        let last = n + 1 == levels.len();
        match fs::create_dir(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !last => continue,
            // A leftover leaf of the same name (a dead kiln whose pid this one reuses):
            // taken over only if empty.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                remove_leaf(&current);
                fs::create_dir(&current).map_err(create_err(&current))?;
            }
            Err(e) => return Err(create_err(&current)(e)),
        }
        if cpuset {
            // A new v1 cpuset has no cpus or mems, and then refuses every task.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = read(&parent.join(file))?;
                let target = current.join(file);
                if read(&target)?.trim().is_empty() {
                    write(&target, value.trim())?;
                }
            }
        }
    }
    for c in &p.limits {
        apply(&p.leaf, c, limits, v2)?;
    }
    if !v2 {
        return Ok(None);
    }
    nix::fcntl::open(
        &p.leaf,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(Some)
    .map_err(|e| create_err(&p.leaf)(e.into()))
}

/// Enables `controllers` for the children of `dir` (cgroup v2), writing only what is not
/// enabled yet.
fn enable_controllers(dir: &Path, controllers: &[String]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = read(&path)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == c.as_str()))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&path, &missing.join(" "))
}

/// Writes `controller`'s limit into `leaf`.
fn apply(leaf: &Path, controller: &str, limits: &Limits, v2: bool) -> Result<(), CgroupError> {
    match (controller, v2) {
        (PIDS, _) => {
            if let Some(pids) = limits.pids {
                write(&leaf.join("pids.max"), &pids.to_string())?;
            }
        }
        (MEMORY, false) => {
            if let Some(memory) = limits.memory {
                write(&leaf.join("memory.limit_in_bytes"), &memory.to_string())?;
                // No swap on top (memsw exists only with swap accounting).
                match fs::write(leaf.join("memory.memsw.limit_in_bytes"), memory.to_string()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CgroupError::Write {
                            path: leaf.join("memory.memsw.limit_in_bytes"),
                            value: memory.to_string(),
                            source: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        (MEMORY, true) => {
            if let Some(memory) = limits.memory {
                write(&leaf.join("memory.max"), &memory.to_string())?;
                match fs::write(leaf.join("memory.swap.max"), "0") {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CgroupError::Write {
                            path: leaf.join("memory.swap.max"),
                            value: "0".into(),
                            source: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        (_, false) => {
            if let Some(weight) = limits.cpu_weight {
                write(
                    &leaf.join("cpu.shares"),
                    &crate::limits::shares_from_weight(weight).to_string(),
                )?;
            }
        }
        (_, true) => {
            if let Some(weight) = limits.cpu_weight {
                write(
                    &leaf.join("cpu.weight"),
                    &weight.clamp(1, 10_000).to_string(),
                )?;
            }
        }
    }
    Ok(())
}

/// Moves the calling process into its v1 leaves. Must be called by the step's init while
/// it is single-threaded: writing `0` to `tasks` migrates the calling thread only, which
/// the kernel does without the global threadgroup lock.
pub fn join_self(placement: &Placement) -> Result<(), CgroupError> {
    for leaf in &placement.v1 {
        let tasks = leaf.join("tasks");
        fs::write(&tasks, "0").map_err(|source| CgroupError::Join {
            path: tasks.clone(),
            source,
        })?;
    }
    Ok(())
}

impl Placement {
    /// The v2 leaf to clone the step's init into.
    pub fn clone_into(&self) -> Option<BorrowedFd<'_>> {
        self.v2.as_ref().map(|(_, fd)| fd.as_fd())
    }

    /// In the step's init, forked from the runner (which keeps the entry): closes the
    /// init's copy of the registry lock. The init outlives the runner while its namespace's
    /// processes are killed, and a lock it still held would make the next kiln's
    /// [`clean_stale`] take a dead step for a live one. Only for a forked copy that is
    /// never dropped (the init exits or execs).
    pub fn close_registry_in_fork(&self) {
        if let Some(registration) = &self.registration {
            let _ = nix::unistd::close(registration.lock.as_raw_fd());
        }
    }

    /// Whether the step has any cgroup of its own.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty()
    }

    /// Descriptors that become ready when the step may have exceeded a limit.
    pub fn watch(&self) -> Watch {
        let mut watch = Watch::default();
        let open = |path: PathBuf| {
            nix::fcntl::open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).ok()
        };
        let watched = [
            (self.enforced.pids, &self.pids, "pids.events"),
            (self.enforced.memory, &self.memory, "memory.events"),
        ];
        for (enforced, leaf, events) in watched {
            match (enforced, leaf) {
                (true, Some((leaf, true))) => watch.files.extend(open(leaf.join(events))),
                (true, Some((_, false))) => watch.interval = Some(V1_CHECK_INTERVAL),
                _ => {}
            }
        }
        // A kernfs file polls ready until it has been read once.
        watch.rearm();
        watch
    }

    /// The limit the step exceeded, if it did.
    pub fn exceeded(&self) -> Option<Exceeded> {
        if let (true, Some((leaf, v2)), Some(limit)) =
            (self.enforced.memory, &self.memory, self.limits.memory)
        {
            let file = if *v2 {
                "memory.events"
            } else {
                "memory.oom_control"
            };
            if counter(&leaf.join(file), "oom_kill").is_some_and(|n| n > 0) {
                return Some(Exceeded::Memory { limit });
            }
        }
        if let (true, Some((leaf, _)), Some(limit)) =
            (self.enforced.pids, &self.pids, self.limits.pids)
        {
            if counter(&leaf.join("pids.events"), "max").is_some_and(|n| n > 0) {
                return Some(Exceeded::Pids { limit });
            }
        }
        None
    }

    /// What the step used, as far as its cgroups know (read before [`Placement::remove`]).
    pub fn usage(&self) -> CgroupUsage {
        let mut usage = CgroupUsage::default();
        let number = |path: PathBuf| -> Option<u64> { read_small(&path).ok()?.trim().parse().ok() };
        usage.peak_memory = match &self.memory {
            Some((leaf, false)) => number(leaf.join("memory.max_usage_in_bytes")),
            Some((leaf, true)) => number(leaf.join("memory.peak")),
            None => None,
        };
        if let Some((leaf, _)) = &self.v2 {
            if let Ok(stat) = read_small(&leaf.join("cpu.stat")) {
                let field = |name: &str| keyed(&stat, name);
                if let (Some(user), Some(system)) = (field("user_usec"), field("system_usec")) {
                    usage.cpu_micros = Some((user, system));
                }
            }
            if self.io {
                if let Ok(stat) = read_small(&leaf.join("io.stat")) {
                    usage.io_bytes = Some(io_bytes(&stat));
                }
            }
        }
        usage
    }

    /// Removes the step's cgroups and their registry entry.
    pub fn remove(&mut self) {
        for leaf in self.created.drain(..) {
            remove_leaf(&leaf);
        }
        self.v2 = None;
        self.registration = None;
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.remove();
    }
}

/// What a step's cgroups measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// Peak memory of all the step's processes together.
    pub peak_memory: Option<u64>,
    /// User and system CPU time (cgroup v2 `cpu.stat`).
    pub cpu_micros: Option<(u64, u64)>,
    /// Bytes read and written (cgroup v2 `io.stat`).
    pub io_bytes: Option<(u64, u64)>,
}

/// `name N` in a flat keyed file (`memory.events`, `pids.events`, `cpu.stat`, …).
fn keyed(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some(name))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}

fn counter(path: &Path, name: &str) -> Option<u64> {
    keyed(&read_small(path).ok()?, name)
}

/// Sums `rbytes=`/`wbytes=` over the devices of an `io.stat`.
fn io_bytes(stat: &str) -> (u64, u64) {
    let mut read = 0u64;
    let mut written = 0u64;
    for field in stat.split_whitespace() {
        if let Some(n) = field.strip_prefix("rbytes=") {
            read = read.saturating_add(n.parse().unwrap_or(0));
        } else if let Some(n) = field.strip_prefix("wbytes=") {
            written = written.saturating_add(n.parse().unwrap_or(0));
        }
    }
    (read, written)
}

/// What wakes the runner when a limit may have been exceeded.
#[derive(Debug, Default)]
pub struct Watch {
    /// `pids.events`, `memory.events` (cgroup v2): ready (`POLLPRI`) when they change.
    files: Vec<OwnedFd>,
    /// Look this often (cgroup v1, which notifies nothing).
    interval: Option<std::time::Duration>,
}

impl Watch {
    /// How long to wait for an event before looking anyway.
    pub fn timeout(&self) -> nix::poll::PollTimeout {
        self.interval
            .and_then(|i| nix::poll::PollTimeout::try_from(i).ok())
            .unwrap_or(nix::poll::PollTimeout::NONE)
    }

    /// `(fd, events)` pairs to poll.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, nix::poll::PollFlags)> {
        self.files
            .iter()
            .map(|f| (f.as_fd(), nix::poll::PollFlags::POLLPRI))
            .collect()
    }

    /// Consumes what made the descriptors ready, so the next poll waits again (kernfs
    /// files report a change until read from the start).
    pub fn rearm(&self) {
        let mut buf = [0u8; 256];
        for f in &self.files {
            let _ = nix::unistd::lseek(f, 0, nix::unistd::Whence::SeekSet);
            while matches!(nix::unistd::read(f, &mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// Removes a leaf, and child cgroups the step made in it; kills what still runs there.
fn remove_leaf(dir: &Path) {
    match fs::remove_dir(dir) {
        Ok(()) => return,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(_) => {}
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_leaf(&entry.path());
            }
        }
    }
    for attempt in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                kill_members(dir);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cgroup left behind");
                return;
            }
        }
    }
}

/// SIGKILLs every process still in cgroup `dir`.
fn kill_members(dir: &Path) {
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A step's entry in the cgroup registry: locked while the step lives, removed with its
/// cgroups.
#[derive(Debug)]
struct Registration {
    path: PathBuf,
    lock: Flock<File>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Unlinked while still locked, so no cleaner can mistake it for a dead owner's.
        let _ = fs::remove_file(&self.path);
    }
}

fn registry_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Registry {
        path: path.to_owned(),
        source,
    }
}

/// Records `leaves` under `<dir>/<id>`, locked. The file is written under a temporary
/// name and renamed, so a cleaner never sees it unlocked.
fn register(dir: &Path, id: &str, leaves: &[&Path]) -> Result<Registration, CgroupError> {
    fs::create_dir_all(dir).map_err(registry_err(dir))?;
    let path = dir.join(id);
    let tmp = dir.join(format!(".{id}.new"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(registry_err(&tmp))?;
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| registry_err(&tmp)(e.into()))?;
    let mut text = String::new();
    for leaf in leaves {
        text.push_str(&leaf.to_string_lossy());
        text.push('\n');
    }
    lock.write_all(text.as_bytes())
        .map_err(registry_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(registry_err(&path))?;
    Ok(Registration { path, lock })
}

/// Removes the cgroups of steps whose runner died (registry files nobody holds under
/// `dir`): kills what still runs in them, removes them, and the entry. Returns how many
/// entries it cleared.
pub fn clean_stale(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut cleared = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().as_encoded_bytes().starts_with(b".") && !left_behind(&entry) {
            // A registry entry being written (`.<id>.new`, locked only after it was
            // created): another kiln's, not a dead step's. Its cgroups are made only once
            // it has its name.
            continue;
        }
        let Ok(file) = fs::OpenOptions::new().read(true).open(&path) else {
            continue;
        };
        let Ok(mut lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        let mut text = String::new();
        let _ = lock.rewind();
        let _ = lock.read_to_string(&mut text);
        for leaf in text.lines().map(Path::new) {
            if is_cgroup_dir(leaf) {
                remove_leaf(leaf);
            }
        }
        if fs::remove_file(&path).is_ok() {
            cleared += 1;
            tracing::info!(entry = %path.display(), "removed the cgroups of a dead step");
        }
    }
    cleared
}

/// How long a registry entry may stay unnamed (`.<id>.new`) before it counts as left
/// behind by a kiln that died while writing it.
const UNNAMED_ENTRY_AGE: std::time::Duration = std::time::Duration::from_secs(60);

fn left_behind(entry: &fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age > UNNAMED_ENTRY_AGE))
}

/// Only paths on a cgroup filesystem are ever removed from a registry entry.
fn is_cgroup_dir(path: &Path) -> bool {
    path.is_absolute()
        && nix::sys::statfs::statfs(path).is_ok_and(|s| {
            s.filesystem_type() == nix::sys::statfs::CGROUP_SUPER_MAGIC
                || s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC
        })
}

/// Where the limits would be enforced for a step of kiln running here (`real_root`), and
/// why some would not — what [`crate::limits::explain`] tells the user once.
pub fn enforcement(real_root: bool, limits: &Limits) -> (Enforced, String) {
    let Ok(hierarchies) = hierarchies() else {
        return (Enforced::default(), "cgroups are not readable here".into());
    };
    let mut enforced = Enforced::default();
    let mut reasons = Vec::new();
    let v2 = hierarchies.iter().find(|h| h.is_v2());
    let v2_controllers = v2.map(|h| v2_available(&h.base(real_root)));
    for controller in [PIDS, MEMORY, CPU] {
        let v1 = hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller));
        let v2 = v2.filter(|_| v2_controllers.iter().flatten().any(|c| c == controller));
        let ok = match v1.or(v2) {
            Some(h) => {
                let base = h.base(real_root);
                let ok = writable(&base);
                if !ok {
                    tracing::debug!(path = %base.display(), "cgroup not writable");
                    reasons.push(if real_root {
                        format!("{} is not writable", base.display())
                    } else {
                        "rootless without a delegated cgroup".to_owned()
                    });
                }
                ok
            }
            None => {
                reasons.push(format!("no {controller} controller"));
                false
            }
        };
        match controller {
            PIDS => enforced.pids = ok && limits.pids.is_some(),
            MEMORY => enforced.memory = ok && limits.memory.is_some(),
            _ => enforced.cpu = ok && limits.cpu_weight.is_some(),
        }
    }
    reasons.dedup();
    (enforced, reasons.join(", "))
}

/// Rootless on a delegated cgroup v2 tree (a `systemd --user` scope or service with
/// `Delegate=yes`): controllers can only be enabled for children of a cgroup no process
/// lives in, so kiln moves itself and `parent` (the process the user started, outside the
/// user namespace) into `<own>/kiln-supervisor`; steps then go next to it. Nothing is done
/// when the tree is not delegated, offers no limit controller, or already enables them.
pub fn prepare_delegation(parent: Option<nix::unistd::Pid>) -> Result<(), CgroupError> {
    let hierarchies = hierarchies()?;
    let Some(h) = hierarchies.iter().find(|h| h.is_v2()) else {
        return Ok(());
    };
    let own = h.own_dir();
    if h.base(false) != own || !writable(&own) {
        // Steps already have a delegated cgroup with controllers, or none is delegated.
        return Ok(());
    }
    let available = v2_available(&own);
    let needed: Vec<String> = [PIDS, MEMORY, CPU]
        .iter()
        .filter(|c| available.iter().any(|a| a == *c))
        .map(|c| (*c).to_owned())
        .collect();
    if needed.is_empty() || enable_controllers(&own, &needed).is_ok() {
        return Ok(());
    }
    let supervisor = own.join(SUPERVISOR);
    match fs::create_dir(&supervisor) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(CgroupError::Create {
                path: supervisor,
                source,
            });
        }
    }
    let procs = supervisor.join("cgroup.procs");
    for pid in std::iter::once(nix::unistd::getpid()).chain(parent) {
        write(&procs, &pid.to_string())?;
    }
    enable_controllers(&own, &needed)
}

/// Whether steps will get cgroups of their own here; a reason when not.
pub fn availability(real_root: bool) -> Result<(), String> {
    let hierarchies = hierarchies().map_err(|e| e.to_string())?;
    if hierarchies.is_empty() {
        return Err("no cgroup filesystem is mounted".into());
    }
    let writable = hierarchies
        .iter()
        .any(|h| nix::unistd::access(&h.base(real_root), nix::unistd::AccessFlags::W_OK).is_ok());
    if writable {
        Ok(())
    } else {
        Err(
            "kiln's cgroup is not writable (no delegated subtree): steps run without cgroup \
             limits or placement, in kiln's own cgroup"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_drops_dotdot() {
        assert_eq!(
            join(Path::new("/sys/fs/cgroup/cpu"), "/../../etc/buildkit/x"),
            PathBuf::from("/sys/fs/cgroup/cpu/etc/buildkit/x")
        );
    }

    #[test]
    fn this_hosts_hierarchies_are_found() {
        let found = hierarchies().unwrap();
        assert!(
            found
                .iter()
                .all(|h| h.mountpoint.is_absolute() && h.own.starts_with('/')),
            "{found:?}"
        );
    }

    #[test]
    fn systemd_cgroup_paths_map_to_their_directories() {
        assert_eq!(hierarchy_path("/buildkit/abc"), "/buildkit/abc");
        assert_eq!(
            hierarchy_path("system.slice:kiln:abc"),
            "/system.slice/kiln-abc.scope"
        );
        assert_eq!(
            hierarchy_path("user-1000.slice:buildkit:abc"),
            "/user.slice/user-1000.slice/buildkit-abc.scope"
        );
        assert_eq!(hierarchy_path("-.slice::abc"), "/abc.scope");
    }

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "8:pids:/u\n4:memory:/u/m\n3:cpuset:/\n1:cpu:/\n0::/u\n";

    #[test]
    fn hybrid_hosts_place_limits_on_v1_only() {
        let hs = parse_hierarchies(HYBRID_MOUNTINFO, OWN);
        assert_eq!(hs.len(), 5);
        let req = Request {
            cgroups_path: "/p/buildkit/s1",
            real_root: true,
            limits: Limits {
                pids: Some(10),
                memory: Some(1 << 20),
                cpu_weight: Some(100),
            },
            all: false,
        };
        let planned = plan(&req, &hs);
        let leaves: Vec<_> = planned.iter().map(|p| p.leaf.clone()).collect();
        assert_eq!(
            leaves,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/memory/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/pids/p/buildkit/s1"),
            ]
        );
        // Rootless: below kiln's own cgroup of each hierarchy.
        let rootless = plan(
            &Request {
                real_root: false,
                all: true,
                ..req
            },
            &hs,
        );
        let leaves: Vec<_> = rootless.iter().map(|p| p.leaf.clone()).collect();
        assert_eq!(
            leaves,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/memory/u/m/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/cpuset/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/pids/u/p/buildkit/s1"),
                PathBuf::from("/sys/fs/cgroup/unified/u/p/buildkit/s1"),
            ]
        );
        assert!(
            rootless[4].limits.is_empty(),
            "v2 has no limit controller here"
        );
    }

    #[test]
    fn v2_steps_go_below_the_nearest_delegated_cgroup_that_gives_controllers() {
        // A fake v2 tree: mount/user.slice/app.scope (delegated, controllers enabled for
        // its children) holding kiln in app.scope/kiln-supervisor.
        let mount = tempfile::tempdir().unwrap();
        let scope = mount.path().join("user.slice/app.scope");
        let supervisor = scope.join(SUPERVISOR);
        fs::create_dir_all(&supervisor).unwrap();
        fs::write(
            scope.join("cgroup.subtree_control"),
            "cpu memory pids
",
        )
        .unwrap();
        fs::write(supervisor.join("cgroup.subtree_control"), "").unwrap();
        let h = Hierarchy {
            mountpoint: mount.path().to_owned(),
            controllers: Vec::new(),
            own: format!("/user.slice/app.scope/{SUPERVISOR}"),
        };
        assert_eq!(h.base(false), scope);
        assert_eq!(h.base(true), mount.path());
        // Without controllers given anywhere: kiln's own cgroup.
        fs::write(scope.join("cgroup.subtree_control"), "").unwrap();
        assert_eq!(h.base(false), supervisor);
    }

    #[test]
    fn keyed_files_and_io_stat_parse() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n";
        assert_eq!(keyed(events, "oom_kill"), Some(2));
        assert_eq!(keyed(events, "max"), Some(3));
        assert_eq!(keyed(events, "missing"), None);
        let io = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n\
                  259:0 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(io_bytes(io), (4106, 8212));
    }

    #[test]
    fn registry_entries_being_written_stay_until_clearly_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        // Another kiln between creating its entry and locking it.
        let fresh = dir.path().join(".s3.new");
        fs::write(&fresh, "").unwrap();
        assert_eq!(clean_stale(dir.path()), 0);
        assert!(fresh.exists(), "an entry being written stays");
        // One a kiln died writing, long ago.
        let old = fs::File::options().write(true).open(&fresh).unwrap();
        old.set_modified(std::time::SystemTime::now() - 2 * UNNAMED_ENTRY_AGE)
            .unwrap();
        assert_eq!(clean_stale(dir.path()), 1);
        assert!(!fresh.exists());
    }

    #[test]
    fn registry_entries_of_live_owners_stay_and_dead_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = Path::new("/nonexistent/cgroup/leaf");
        let held = register(dir.path(), "s1", &[leaf]).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("s1")).unwrap(),
            "/nonexistent/cgroup/leaf\n"
        );
        assert_eq!(clean_stale(dir.path()), 0, "a held entry stays");
        // An entry whose owner died: present, unlocked.
        fs::write(dir.path().join("s2"), "/etc\n").unwrap();
        assert_eq!(clean_stale(dir.path()), 1);
        assert!(
            Path::new("/etc").is_dir(),
            "only cgroup directories are removed"
        );
        assert!(!dir.path().join("s2").exists());
        drop(held);
        assert!(!dir.path().join("s1").exists(), "removed with its step");
    }
}
