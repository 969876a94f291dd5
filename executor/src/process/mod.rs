//! The processes of one step.
//!
//! * The **runner** ([`run`]) is single-threaded: kiln re-executes itself for it when it runs
//!   steps from its async scheduler (`kiln __runner <bundle>`), and `kiln run` calls it
//!   directly. It records mount stubs and creates the cwd in the rootfs, places the step in
//!   its cgroups, forks the init into new mount/pid/ipc/uts(/net) namespaces with `clone3`,
//!   waits, cleans up and reports an [`ExitInfo`].
//! * The **init** ([`init`]) is pid 1 of the step's pid namespace: it builds the mount tree,
//!   pivots, sets the hostname, brings `lo` up, forks the workload, then only reaps and
//!   forwards signals. When it exits the kernel kills whatever the step left running.
//! * The **workload** ([`workload`]) applies rlimits, seccomp, groups, ids and
//!   capabilities, changes to the cwd and executes the command.
//!
//! The order of phases is deliberate: the parent writes cgroup placement before the init
//! continues (so every process of the step is inside), seccomp comes last before
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
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Placement};
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
    /// Give the step cgroups of its own at `linux.cgroupsPath` (see [`cgroup::wanted`]).
    pub own_cgroups: bool,
    /// Where compiled seccomp programs are kept between steps (see
    /// [`kiln_seccomp::load_or_compile`]); `None` compiles for this step only.
    #[serde(default)]
    pub seccomp_cache: Option<PathBuf>,
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
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.cancelled
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
    let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
    let placement = match cgroups_path {
        Some(cgroups_path) if config.own_cgroups => {
            cgroup::create(&cgroups_path.to_string_lossy(), config.real_root).unwrap_or_default()
        }
        _ => Placement::default(),
    };
    let result = run_in_namespaces(config, &host_root, netns.as_ref(), &placement, &seccomp);
    let (peak_cgroup, oom) = cgroup::memory_stats(&placement);
    cgroup::remove(&placement);
    if !config.stub_paths.is_empty() {
        stubs::clean(&sys, rootfs.as_fd(), &stubs);
    }
    let mut info = result?;
    info.oom_killed = oom;
    if let Some(peak) = peak_cgroup {
        info.peak_memory_bytes = peak;
    }
    Ok(info)
}

fn run_in_namespaces(
    config: &RunnerConfig,
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
    let started = Instant::now();
    let forked = sys::clone_into_namespaces(namespace_flags(&config.spec), false)
        .map_err(sys_err("create the step's namespaces"));
    let child = match forked {
        Ok(Forked::Child) => {
            drop(go_w);
            drop(status_r);
            init::run(
                init::InitArgs {
                    spec: &config.spec,
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
    let entered = cgroup::enter(placement, child.as_raw());
    if let Err(e) = &entered {
        tracing::warn!(error = %e, "step runs outside its cgroups");
    }
    // Anything but this byte (EOF if we died) makes the init exit without starting.
    let _ = nix::unistd::write(&go_w, b"G");
    drop(go_w);

    let mut cancelled = false;
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
        let Ok(info) = sys::wait_signal(&signals) else {
            continue;
        };
        if info.signal != libc::SIGCHLD {
            // Cancellation: killing pid 1 kills the whole pid namespace.
            cancelled = true;
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        }
    };
    let wall = started.elapsed();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);

    let mut report = String::new();
    let _ = std::fs::File::from(status_r).read_to_string(&mut report);
    let report: Option<InitReport> = serde_json::from_str(report.trim()).ok();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(sys_err("getrusage"))?;
    let micros = |tv: nix::sys::time::TimeVal| {
        u64::try_from(tv.tv_sec()).unwrap_or(0) * 1_000_000
            + u64::try_from(tv.tv_usec()).unwrap_or(0)
    };
    let mut info = ExitInfo {
        cancelled,
        wall_micros: u64::try_from(wall.as_micros()).unwrap_or(u64::MAX),
        user_cpu_micros: micros(usage.user_time()),
        system_cpu_micros: micros(usage.system_time()),
        peak_memory_bytes: u64::try_from(usage.max_rss()).unwrap_or(0) * 1024,
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

/// Entry point of `kiln __runner <bundle>`: reads `<bundle>/config.json`, runs the step,
/// writes `<bundle>/result.json` (`{"ok": ExitInfo}` or `{"error": "…"}`). Exit status 0
/// when a result was written.
pub fn runner_main(bundle: &Path) -> i32 {
    // If kiln dies, the step must not outlive it: SIGTERM takes the cancellation path.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    let outcome = read_config(bundle).and_then(|config| run(&config));
    let result = match &outcome {
        Ok(info) => serde_json::json!({ "ok": info }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let path = bundle.join("result.json");
    match std::fs::File::create(&path).and_then(|mut f| f.write_all(result.to_string().as_bytes()))
    {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn read_config(bundle: &Path) -> Result<RunnerConfig, RunError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| RunError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| RunError::Bundle {
        path,
        reason: e.to_string(),
    })
}
