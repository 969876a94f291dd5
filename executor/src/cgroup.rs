//! Placing a step in cgroups of its own (`linux.cgroupsPath`) and showing them to it.
//!
//! cgroup v1 (this project's hosts are hybrid v1): one directory per hierarchy, created at
//! `<mountpoint><cgroupsPath>` as real root (as runc does), or below kiln's own cgroup when
//! that is writable (a delegated subtree) in a user namespace; cpuset levels inherit
//! `cpus`/`mems`. cgroup v2: the same below the unified mount. Hierarchies kiln may not
//! write are skipped: the step then runs without limits in kiln's cgroup, which
//! [`availability`] reports once at startup rather than failing steps.
//!
//! The step sees its own cgroup directories at `/sys/fs/cgroup` (bound by the runner), so
//! `mkdir /sys/fs/cgroup/cpuset/x` creates a child of the step's cgroup, and fails on the
//! read-only view sandbox steps get.

use std::fs;
use std::path::{Path, PathBuf};

use crate::rootfs::CgroupView;

/// Errors from cgroup handling (only reading the host's layout can fail hard).
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adding pid {pid} to {path}: {source}")]
    Enter {
        pid: i32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let own = read(Path::new("/proc/self/cgroup"))?;
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
    Ok(out)
}

/// A step's cgroup directories.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Leaf directories kiln created (removed after the step).
    pub leaves: Vec<PathBuf>,
    /// What the step sees under `/sys/fs/cgroup`.
    pub views: Vec<CgroupView>,
    /// The memory controller's leaf, for peak usage and OOM events.
    pub memory: Option<PathBuf>,
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

/// Creates the step's cgroup directories for `cgroups_path` (`/buildkit/<id>` or
/// `/<parent>/buildkit/<id>`). Hierarchies kiln cannot write are skipped.
pub fn create(cgroups_path: &str, real_root: bool) -> Result<Placement, CgroupError> {
    let mut placement = Placement::default();
    let relative = cgroups_path.rsplit(':').next().unwrap_or(cgroups_path);
    for h in hierarchies()? {
        let name = if h.controllers.is_empty() {
            String::new()
        } else {
            h.mountpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let own_dir = join(&h.mountpoint, &h.own);
        // As real root the path is absolute in the hierarchy (runc); otherwise it can only
        // live below kiln's own, delegated cgroup.
        let base = if real_root {
            h.mountpoint.clone()
        } else {
            own_dir.clone()
        };
        let leaf = join(&base, relative);
        let created = create_levels(&base, &leaf, h.controllers.iter().any(|c| c == "cpuset"));
        let view = if created.is_ok() {
            placement.leaves.push(leaf.clone());
            if h.controllers.iter().any(|c| c == "memory") || h.controllers.is_empty() {
                placement.memory = Some(leaf.clone());
            }
            leaf
        } else {
            own_dir
        };
        placement.views.push(CgroupView {
            name,
            host_path: view,
        });
    }
    // A unified-only host shows exactly one view at /sys/fs/cgroup itself.
    if placement.views.iter().any(|v| v.name.is_empty()) && placement.views.len() > 1 {
        placement.views.retain(|v| !v.name.is_empty());
    }
    Ok(placement)
}

fn create_levels(base: &Path, leaf: &Path, cpuset: bool) -> std::io::Result<()> {
    let relative = leaf.strip_prefix(base).unwrap_or(leaf);
    let mut current = base.to_path_buf();
    for part in relative.components() {
        let parent = current.clone();
        current.push(part);
        match fs::create_dir(&current) {
            Ok(()) => {
                if cpuset {
                    // A new v1 cpuset has no cpus or mems, and then refuses every task.
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let value = fs::read_to_string(parent.join(file))?;
                        fs::write(current.join(file), value.trim())?;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    // Writable is what matters: a delegated tree may exist already.
    nix::unistd::access(&leaf.join("cgroup.procs"), nix::unistd::AccessFlags::W_OK)
        .map_err(std::io::Error::from)
}

/// Moves `pid` into every leaf of `placement`.
pub fn enter(placement: &Placement, pid: i32) -> Result<(), CgroupError> {
    for leaf in &placement.leaves {
        let procs = leaf.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Enter {
            pid,
            path: procs.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Peak memory in bytes and whether the OOM killer fired, read before removal.
pub fn memory_stats(placement: &Placement) -> (Option<u64>, bool) {
    let Some(dir) = &placement.memory else {
        return (None, false);
    };
    let number = |file: &str| -> Option<u64> {
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    };
    let peak = number("memory.max_usage_in_bytes").or_else(|| number("memory.peak"));
    let events = fs::read_to_string(dir.join("memory.oom_control"))
        .or_else(|_| fs::read_to_string(dir.join("memory.events")))
        .unwrap_or_default();
    let oom = events.lines().any(|l| {
        let mut parts = l.split_whitespace();
        parts.next() == Some("oom_kill") && parts.next().is_some_and(|n| n != "0")
    });
    (peak, oom)
}

/// Removes the step's cgroups, children the step created first.
pub fn remove(placement: &Placement) {
    for leaf in &placement.leaves {
        remove_tree(leaf);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::debug!(path = %dir.display(), error = %e, "cgroup left behind");
    }
}

/// Whether a step gets cgroups of its own. On cgroup v2 always (cheap, and it brings
/// memory figures). On cgroup v1 only when it is observable: a `Meta.cgroupParent`
/// (BuildKit places the step at `/<parent>/buildkit/<id>`) or an insecure step (which may
/// create child cgroups, removed with its own). Attaching a process to nine v1 hierarchies
/// costs about a millisecond each, more than the rest of a step's setup; without them the
/// step runs in kiln's cgroup and sees an empty, read-only `/sys/fs/cgroup`.
pub fn wanted(cgroup_parent: &str, insecure: bool) -> bool {
    !cgroup_parent.is_empty() || insecure || unified()
}

fn unified() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Whether steps will get cgroups of their own here; a reason when not.
pub fn availability(real_root: bool) -> Result<(), String> {
    let hierarchies = hierarchies().map_err(|e| e.to_string())?;
    if hierarchies.is_empty() {
        return Err("no cgroup filesystem is mounted".into());
    }
    let writable = hierarchies.iter().any(|h| {
        let dir = if real_root {
            h.mountpoint.clone()
        } else {
            join(&h.mountpoint, &h.own)
        };
        nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
    });
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
}
