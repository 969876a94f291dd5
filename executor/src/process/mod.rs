//! The processes of one step.
//!
//! * The **runner** ([`run`]) is single-threaded: kiln re-executes itself for it when it runs
//!   steps from its async scheduler (`kiln __runner <bundle>`), and `kiln run` calls it
//!   directly. It records mount stubs and creates the cwd in the rootfs, creates the
//!   step's cgroups with its limits ([`cgroup`]), forks the init into new
//!   mount/pid/ipc/uts(/net) namespaces with `clone3`, waits (killing the step when it
//!   exceeds a limit), cleans up and reports an [`ExitInfo`] with what the step used.
//! * The **init** ([`init`]) is pid 1 of the step's pid namespace: it builds the mount tree,
//!   pivots, sets the hostname, brings `lo` up, forks the workload, then only reaps and
//!   forwards signals. When it exits the kernel kills whatever the step left running.
//! * The **workload** ([`workload`]) applies rlimits, seccomp, groups, ids and
//!   capabilities, changes to the cwd and executes the command.
//!
//! The order of phases is deliberate: the init joins its cgroups before anything else (so
//! every process of the step is inside), seccomp comes last before
//! `execve` when `noNewPrivileges` is set (first otherwise, while `CAP_SYS_ADMIN` still
//! allows installing it), and descriptors are marked close-on-exec right before `execve`
//! (CVE-2024-21626).

mod init;
mod workload;

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};
use nix::sys::resource::{Usage, UsageWho};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Placement};
use crate::limits::{self, Exceeded, Limits};
use crate::path::{self, PathError};
use crate::rootfs::RootfsError;
use crate::stubs::{self, Stubs};
use crate::sys::{self, Forked, LinuxSys};
use init::InitReport;

/// Errors of the runner itself (a failing command is an [`ExitInfo`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("spec has no {0}")]
    Incomplete(&'static str),
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("creating the working directory {cwd}: {source}")]
    Cwd {
        cwd: String,
        #[source]
        source: PathError,
    },
    #[error("recording mount stubs: {0}")]
    Stubs(#[source] PathError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{message}")]
    Exec { message: String, code: i32 },
    #[error("reading the bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
}

fn sys_err(op: &'static str) -> impl FnOnce(nix::Error) -> RunError {
    move |source| RunError::Sys { op, source }
}

/// What the runner needs besides the spec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunnerConfig {
    pub spec: Spec,
    /// Destinations whose missing mount points are removed after the run; empty to skip.
    pub stub_paths: Vec<String>,
    /// Record (and remove) missing ancestors too (`Meta.removeMountStubsRecursive`).
    pub stubs_recursive: bool,
    /// kiln runs as real root (not in a user namespace).
    pub real_root: bool,
    /// Give the step cgroups of its own in every hierarchy, shown to it at
    /// `/sys/fs/cgroup` (see [`cgroup::wanted`]); the cgroups of its limits
    /// (`linux.resources`) it gets anyway.
    pub own_cgroups: bool,
    /// Where compiled seccomp programs are kept between steps (see
    /// [`kiln_seccomp::load_or_compile`]); `None` compiles for this step only.
    #[serde(default)]
    pub seccomp_cache: Option<PathBuf>,
    /// Where the step's cgroups are recorded while it runs, so that a later kiln removes
    /// them if this runner dies ([`cgroup::clean_stale`]); `None` records nothing.
    #[serde(default)]
    pub cgroup_registry: Option<PathBuf>,
}

/// How a step ended and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit code, or `128 + signal` when a signal ended the command (as runc reports).
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// The step was cancelled (and killed).
    pub cancelled: bool,
    pub oom_killed: bool,
    pub wall_micros: u64,
    pub user_cpu_micros: u64,
    pub system_cpu_micros: u64,
    /// Peak memory from the step's memory cgroup, else the largest process's max RSS.
    pub peak_memory_bytes: u64,
    /// `peak_memory_bytes` is the memory cgroup's (all the step's processes at once).
    #[serde(default)]
    pub peak_memory_from_cgroup: bool,
    /// Bytes the step's processes read from and wrote to storage (cgroup v2 `io.stat`,
    /// else the kernel's per-process I/O accounting of every reaped process).
    #[serde(default)]
    pub read_bytes: u64,
    #[serde(default)]
    pub written_bytes: u64,
    /// The limit the step exceeded; kiln killed it for that.
    #[serde(default)]
    pub exceeded: Option<Exceeded>,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.cancelled && self.exceeded.is_none()
    }
}

/// Signals the runner and init wait for synchronously.
fn wait_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

fn namespace_flags(spec: &Spec) -> u64 {
    let mut flags = 0u64;
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in namespaces {
        if ns.path().is_some() {
            // Joined (setns in the init), not created.
            continue;
        }
        flags |= match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            _ => 0,
        } as u64;
    }
    // A step always gets its own mount and pid namespace, whatever the spec says.
    flags | (libc::CLONE_NEWNS | libc::CLONE_NEWPID) as u64
}

/// The network namespace the spec names by path (a sandbox network to join), opened.
fn joined_network(spec: &Spec) -> Result<Option<OwnedFd>, RunError> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|n| {
            n.iter()
                .find(|ns| ns.typ() == LinuxNamespaceType::Network)
                .and_then(|ns| ns.path().clone())
        });
    let Some(path) = path else {
        return Ok(None);
    };
    nix::fcntl::open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map(Some)
        .map_err(|source| RunError::Open { path, source })
}

/// Runs one step. Must be called from a single-threaded process.
pub fn run(config: &RunnerConfig) -> Result<ExitInfo, RunError> {
    let spec = &config.spec;
    let sys = LinuxSys;
    let root_path = spec
        .root()
        .as_ref()
        .ok_or(RunError::Incomplete("root"))?
        .path()
        .clone();
    let process = spec
        .process()
        .as_ref()
        .ok_or(RunError::Incomplete("process"))?;
    let open_dir = |path: &Path| {
        nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| RunError::Open {
            path: path.to_owned(),
            source,
        })
    };
    let host_root = open_dir(Path::new("/"))?;
    let rootfs = open_dir(&root_path)?;
    let netns = joined_network(spec)?;

    let stubs = if config.stub_paths.is_empty() {
        Stubs::default()
    } else {
        stubs::record(
            &sys,
            rootfs.as_fd(),
            config.stub_paths.iter().map(String::as_str),
            config.stubs_recursive,
        )
        .map_err(RunError::Stubs)?
    };
    // The cwd is created in the rootfs layer before the step starts (so it is part of the
    // root output even under a mount), owned by the step's user.
    let cwd = process.cwd().to_string_lossy().into_owned();
    let owner = (process.user().uid(), process.user().gid());
    path::mkdir_all(
        &sys,
        rootfs.as_fd(),
        &cwd,
        Mode::from_bits_truncate(0o755),
        Some(owner),
    )
    .map_err(|source| RunError::Cwd {
        cwd: cwd.clone(),
        source,
    })?;

    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => kiln_seccomp::load_or_compile(profile, config.seccomp_cache.as_deref())
            .map_err(|e| RunError::Setup(e.to_string()))?,
        None => Vec::new(),
    };
    let result = run_limited(config, &host_root, netns.as_ref(), &seccomp);
    if !config.stub_paths.is_empty() {
        stubs::clean(&sys, rootfs.as_fd(), &stubs);
    }
    result
}

/// Runs the step in cgroups of its own with its limits (rlimits standing in for what no
/// cgroup enforces), adding what the cgroups measured to the [`ExitInfo`].
fn run_limited(
    config: &RunnerConfig,
    host_root: &OwnedFd,
    netns: Option<&OwnedFd>,
    seccomp: &[kiln_seccomp::SockFilter],
) -> Result<ExitInfo, RunError> {
    let spec = &config.spec;
    let limits = Limits::from_spec(spec);
    let mut placement = place(config, &limits)?;
    // The step's own ulimits stay as it asked.
    let existing = spec
        .process()
        .as_ref()
        .and_then(|p| p.rlimits().clone())
        .unwrap_or_default();
    let fallback = limits::fallback_rlimits(&limits, placement.enforced, &existing);
    let with_fallback;
    let spec = if fallback.is_empty() {
        spec
    } else {
        let mut copy = spec.clone();
        if let Some(p) = copy.process_mut() {
            p.set_rlimits(Some(existing.into_iter().chain(fallback).collect()));
        }
        with_fallback = copy;
        &with_fallback
    };
    let result = run_in_namespaces(config, spec, host_root, netns, &placement, seccomp);
    let exceeded = placement.exceeded();
    let usage = placement.usage();
    placement.remove();
    let mut info = result?;
    if info.exceeded.is_none() {
        info.exceeded = exceeded;
    }
    info.oom_killed |= matches!(info.exceeded, Some(Exceeded::Memory { .. }));
    if info.exceeded.is_some() && info.exit_code == 0 {
        // The step failed for its limit even if its command got past the killed process
        // (`hog || true`) before kiln stopped it.
        info.exit_code = 128 + libc::SIGKILL;
    }
    if let Some(peak) = usage.peak_memory {
        info.peak_memory_bytes = peak;
        info.peak_memory_from_cgroup = true;
    }
    if let Some((user, system)) = usage.cpu_micros {
        info.user_cpu_micros = user;
        info.system_cpu_micros = system;
    }
    if let Some((read, written)) = usage.io_bytes {
        info.read_bytes = read;
        info.written_bytes = written;
    }
    Ok(info)
}

/// Creates the step's cgroups at `linux.cgroupsPath` with its limits.
fn place(config: &RunnerConfig, limits: &Limits) -> Result<Placement, RunError> {
    let Some(path) = config
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
    else {
        return Ok(Placement::default());
    };
    let path = path.to_string_lossy();
    // The registry entry is named after the step id, the path's last element.
    let id = path
        .rsplit(['/', ':'])
        .next()
        .filter(|id| crate::supervisor::valid_id(id))
        .unwrap_or("step");
    let request = cgroup::Request {
        cgroups_path: &path,
        real_root: config.real_root,
        limits: *limits,
        all: config.own_cgroups,
    };
    cgroup::create(&request, config.cgroup_registry.as_deref(), id)
        .map_err(|e| RunError::Setup(e.to_string()))
}

fn run_in_namespaces(
    config: &RunnerConfig,
    spec: &Spec,
    host_root: &OwnedFd,
    netns: Option<&OwnedFd>,
    placement: &Placement,
    seccomp: &[kiln_seccomp::SockFilter],
) -> Result<ExitInfo, RunError> {
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let signals = wait_set();
    let mut previous = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut previous))
        .map_err(sys_err("block signals"))?;
    let signal_fd =
        match SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                let _ =
                    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
                return Err(sys_err("signalfd")(e));
            }
        };
    let before = children_usage()?;
    let started = Instant::now();
    let forked =
        sys::clone_into_namespaces(namespace_flags(&config.spec), false, placement.clone_into())
            .map_err(sys_err("create the step's namespaces"));
    let child = match forked {
        Ok(Forked::Child) => {
            drop(go_w);
            drop(status_r);
            placement.close_registry_in_fork();
            if let Err(e) = cgroup::join_self(placement) {
                init::report(
                    &status_w,
                    &InitReport::Failed {
                        message: e.to_string(),
                        exec_code: None,
                    },
                );
                sys::exit_immediately(1);
            }
            init::run(
                init::InitArgs {
                    spec,
                    seccomp,
                    host_root: host_root.as_fd(),
                    netns: netns.map(AsFd::as_fd),
                    cgroups: &placement.views,
                    status: status_w,
                    signals: &signals,
                },
                go_r,
            )
        }
        Ok(Forked::Parent { child, .. }) => child,
        Err(e) => {
            let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
            return Err(e);
        }
    };
    drop(go_r);
    drop(status_w);
    // Opened before the step starts, so no limit event is missed.
    let watch = placement.watch();
    // Anything but this byte (EOF if we died) makes the init exit without starting.
    let _ = nix::unistd::write(&go_w, b"G");
    drop(go_w);

    let mut cancelled = false;
    let mut exceeded = None;
    let status = loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => break status,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                let _ =
                    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
                return Err(sys_err("wait for the step")(e));
            }
        }
        let mut fds = vec![PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            watch
                .poll_fds()
                .into_iter()
                .map(|(fd, events)| PollFd::new(fd, events)),
        );
        let Ok(ready) = nix::poll::poll(&mut fds, watch.timeout()) else {
            continue;
        };
        // A limit file changed, or it is time to look (cgroup v1).
        let limit_event = ready == 0
            || fds[1..]
                .iter()
                .any(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
        drop(fds);
        if limit_event {
            watch.rearm();
            if exceeded.is_none() {
                // The step would fail anyway: stop it now (a fork bomb at its limit
                // would otherwise spin until cancelled).
                exceeded = placement.exceeded();
                if exceeded.is_some() {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                }
            }
        }
        while let Ok(Some(info)) = signal_fd.read_signal() {
            if info.ssi_signo != libc::SIGCHLD as u32 {
                // Cancellation: killing pid 1 kills the whole pid namespace.
                cancelled = true;
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            }
        }
    };
    let wall = started.elapsed();
    drop(signal_fd);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);

    let mut report = String::new();
    let _ = std::fs::File::from(status_r).read_to_string(&mut report);
    let report: Option<InitReport> = serde_json::from_str(report.trim()).ok();
    let after = children_usage()?;
    let micros = |tv: nix::sys::time::TimeVal| {
        u64::try_from(tv.tv_sec()).unwrap_or(0) * 1_000_000
            + u64::try_from(tv.tv_usec()).unwrap_or(0)
    };
    let spent = |f: fn(&Usage) -> nix::sys::time::TimeVal| {
        micros(f(&after)).saturating_sub(micros(f(&before)))
    };
    // Block I/O in 512-byte units, from the same accounting as /proc/<pid>/io.
    let blocks = |f: fn(&Usage) -> libc::c_long| {
        u64::try_from(f(&after).saturating_sub(f(&before))).unwrap_or(0) * 512
    };
    let mut info = ExitInfo {
        cancelled,
        wall_micros: u64::try_from(wall.as_micros()).unwrap_or(u64::MAX),
        user_cpu_micros: spent(Usage::user_time),
        system_cpu_micros: spent(Usage::system_time),
        peak_memory_bytes: u64::try_from(after.max_rss()).unwrap_or(0) * 1024,
        read_bytes: blocks(Usage::block_reads),
        written_bytes: blocks(Usage::block_writes),
        exceeded,
        ..ExitInfo::default()
    };
    match (report, status) {
        (Some(InitReport::Exited(code)), _) => info.exit_code = code,
        (Some(InitReport::Signaled(signal)), _) => {
            info.signal = Some(signal);
            info.exit_code = 128 + signal;
        }
        (Some(InitReport::Failed { message, exec_code }), _) => {
            return Err(match exec_code {
                Some(code) => RunError::Exec { message, code },
                None => RunError::Setup(message),
            });
        }
        (None, WaitStatus::Signaled(_, signal, _)) => {
            info.signal = Some(signal as i32);
            info.exit_code = 128 + signal as i32;
        }
        (None, WaitStatus::Exited(_, code)) => {
            if !cancelled {
                return Err(RunError::Setup(format!(
                    "the step's init exited with {code} without a report"
                )));
            }
            info.exit_code = 128 + libc::SIGKILL;
        }
        (None, _) => info.exit_code = 255,
    }
    Ok(info)
}

/// CPU time, peak RSS and block I/O of every reaped child so far.
fn children_usage() -> Result<Usage, RunError> {
    nix::sys::resource::getrusage(UsageWho::RUSAGE_CHILDREN).map_err(sys_err("getrusage"))
}

/// Entry point of `kiln __runner <bundle>`: reads `<bundle>/config.json`, runs the step,
/// writes `<bundle>/result.json` (see [`outcome_json`]). Exit status 0 when a result was
/// written.
pub fn runner_main(bundle: &Path) -> i32 {
    // If kiln dies, the step must not outlive it: SIGTERM takes the cancellation path.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    let result = outcome_json(read_config(bundle).and_then(|config| run(&config)));
    let path = bundle.join("result.json");
    match std::fs::File::create(&path).and_then(|mut f| f.write_all(result.as_bytes())) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Runs the step whose config is `config` (JSON), or when it is `None`
/// `<bundle>/config.json`, and returns [`outcome_json`] of it.
pub fn run_config(config: Option<&[u8]>, bundle: &Path) -> String {
    let config = match config {
        Some(bytes) => parse_config(bytes, &bundle.join("config.json")),
        None => read_config(bundle),
    };
    outcome_json(config.and_then(|config| run(&config)))
}

/// How a runner reports: `{"ok": ExitInfo}`, or `{"error": "…"}` when the step could not
/// run.
pub fn outcome_json(outcome: Result<ExitInfo, RunError>) -> String {
    match outcome {
        Ok(info) => serde_json::json!({ "ok": info }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
    .to_string()
}

fn read_config(bundle: &Path) -> Result<RunnerConfig, RunError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| RunError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    parse_config(&bytes, &path)
}

fn parse_config(bytes: &[u8], path: &Path) -> Result<RunnerConfig, RunError> {
    serde_json::from_slice(bytes).map_err(|e| RunError::Bundle {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
