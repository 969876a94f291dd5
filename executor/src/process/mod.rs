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

use std::borrow::Cow;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};
use nix::sys::resource::{Usage, UsageWho};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, LinuxSeccomp, Spec};
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
    /// The step's seccomp profile is the one of the runner started ahead that it goes to
    /// (see [`run_warm`]), and is sent without it: that runner compiled it already, and
    /// the profile's ≈380 names were most of decoding the step there. Only kiln, which
    /// compared the two, sets it; a runner forked for the step refuses a config with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seccomp_of_warm_runner: bool,
}

impl RunnerConfig {
    /// What a runner started ahead of its step (see [`run_warm`]) must share with that
    /// step: what it sets up before it has the step. Everything else — rootfs, mounts,
    /// process, hostname, the network namespace to join, the step id in the cgroup path —
    /// comes with the step.
    pub fn warm_shape(&self) -> WarmShape<'_> {
        let linux = self.spec.linux().as_ref();
        WarmShape {
            clone_flags: clone_flags(&self.spec),
            resources: linux.and_then(|l| l.resources().as_ref()),
            seccomp: linux.and_then(|l| l.seccomp().as_ref()),
            cgroup_parent: self
                .cgroups_path()
                .map(|path| split_cgroup_id(&path).0.to_owned()),
            real_root: self.real_root,
            own_cgroups: self.own_cgroups,
            seccomp_cache: self.seccomp_cache.as_deref(),
            cgroup_registry: self.cgroup_registry.as_deref(),
        }
    }

    /// Names the cgroups of this config after `id` (a step id), in place of the step id
    /// that ends `linux.cgroupsPath`.
    fn rename_cgroups(&mut self, id: &str) -> Result<(), RunError> {
        if !crate::supervisor::valid_id(id) {
            return Err(RunError::Setup(format!(
                "invalid runner id {id:?}: letters and digits only"
            )));
        }
        if let Some(path) = self.cgroups_path() {
            let renamed = PathBuf::from(format!("{}{id}", split_cgroup_id(&path).0));
            if let Some(linux) = self.spec.linux_mut() {
                linux.set_cgroups_path(Some(renamed));
            }
        }
        Ok(())
    }

    /// `linux.cgroupsPath`, if any.
    fn cgroups_path(&self) -> Option<String> {
        let linux = self.spec.linux().as_ref()?;
        Some(
            linux
                .cgroups_path()
                .as_ref()?
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// `linux.cgroupsPath` split before the step id that ends it (after its last `/` or `:`):
/// the parent, separator included, and the id.
fn split_cgroup_id(path: &str) -> (&str, &str) {
    let at = path.rfind(['/', ':']).map_or(0, |end| end + 1);
    path.split_at(at)
}

/// See [`RunnerConfig::warm_shape`].
#[derive(Debug, PartialEq)]
pub struct WarmShape<'a> {
    clone_flags: u64,
    resources: Option<&'a LinuxResources>,
    seccomp: Option<&'a LinuxSeccomp>,
    /// The cgroup path without the step's id.
    cgroup_parent: Option<String>,
    real_root: bool,
    own_cgroups: bool,
    seccomp_cache: Option<&'a Path>,
    cgroup_registry: Option<&'a Path>,
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

/// Runs one step; its cgroups are gone when it returns. Must be called from a
/// single-threaded process.
pub fn run(config: &RunnerConfig) -> Result<ExitInfo, RunError> {
    run_leaving_cgroups(config).0
}

/// Runs one step and hands back its cgroups, emptied and measured, for the caller to
/// remove (when it drops them) once the outcome is reported.
fn run_leaving_cgroups(config: &RunnerConfig) -> (Result<ExitInfo, RunError>, Placement) {
    if config.seccomp_of_warm_runner {
        return (Err(without_profile()), Placement::default());
    }
    let target = match Target::prepare(config) {
        Ok(target) => target,
        Err(e) => return (Err(e), Placement::default()),
    };
    let finished = match Sandbox::prepare(config, None) {
        Ok(mut sandbox) => {
            let spec = sandbox.step_spec(&config.spec);
            let result = joined_network(&config.spec).and_then(|netns| {
                spawn_init(&sandbox, &spec, netns.as_ref())
                    .and_then(|mut init| init.start(&sandbox, &Go::Inherited))
            });
            sandbox.finish(result)
        }
        Err(e) => (Err(e), Placement::default()),
    };
    target.clean();
    finished
}

/// A warm runner: started ahead of its step from `template` (a config of the same shape,
/// see [`RunnerConfig::warm_shape`]), it makes the step's cgroups, loads its seccomp
/// program and clones the init into the step's pid, ipc and uts namespaces and cgroups,
/// where the init waits. Then it waits on `go` for its step, sent as a launcher request
/// (bundle path and config, with the step's stdout and stderr), calls `taken` and runs it
/// like [`run`]. `Ok(None)` when `go` closed first (kiln let it go) or the runner was told
/// to stop. Must be called from a single-threaded process.
pub fn run_warm(
    template: &RunnerConfig,
    go: &OwnedFd,
    taken: impl FnOnce(),
) -> Result<Option<ExitInfo>, RunError> {
    run_warm_leaving_cgroups(template, None, go, taken).map(|ran| ran.map(|(info, _cgroups)| info))
}

/// [`run_warm`], handing back the step's cgroups as [`run_leaving_cgroups`] does, with
/// `seccomp` the template's program when it was loaded already. A step that could not run
/// reports its error with them removed.
fn run_warm_leaving_cgroups(
    template: &RunnerConfig,
    seccomp: Option<Vec<kiln_seccomp::SockFilter>>,
    go: &OwnedFd,
    taken: impl FnOnce(),
) -> Result<Option<(ExitInfo, Placement)>, RunError> {
    if template.seccomp_of_warm_runner {
        return Err(without_profile());
    }
    let mut sandbox = Sandbox::prepare(template, seccomp)?;
    let mut init = spawn_init(&sandbox, &template.spec, None)?;
    let shape = template.warm_shape();
    let Some((bundle, config, outputs)) = wait_for_step(go, &init.signal_fd) else {
        return Ok(None);
    };
    taken();
    let mut config = parse_config(&config, &bundle.join("config.json"))?;
    let mut step_shape = config.warm_shape();
    if config.seccomp_of_warm_runner {
        if step_shape.seccomp.is_some() {
            return Err(RunError::Setup(
                "a step sent with the warm runner's seccomp profile brought a profile too"
                    .to_owned(),
            ));
        }
        step_shape.seccomp = shape.seccomp;
    }
    if step_shape != shape {
        return Err(RunError::Setup(
            "the step does not fit the runner started ahead for it (its namespaces, limits, \
             seccomp profile or cgroup parent differ)"
                .to_owned(),
        ));
    }
    // The init installs the program compiled from the template's profile (in its memory
    // since the clone), never the profile: the step's spec goes to it without one, at a
    // third of the size, and parsing it there (a cold process) takes less than half as long.
    // kiln sends the step without it already (`seccomp_of_warm_runner`); a config that
    // brings it (another caller of `run_warm`) has it dropped here.
    if let Some(linux) = config.spec.linux_mut() {
        linux.set_seccomp(None);
    }
    // From here on the step's output is this runner's too, as for a runner forked for it.
    let [stdout, stderr] = outputs;
    nix::unistd::dup2_stdout(&stdout).map_err(sys_err("take the step's stdout"))?;
    nix::unistd::dup2_stderr(&stderr).map_err(sys_err("take the step's stderr"))?;
    drop((stdout, stderr));
    let target = Target::prepare(&config)?;
    let spec = sandbox.step_spec(&config.spec);
    let result = joined_network(&config.spec).and_then(|netns| {
        init.start(
            &sandbox,
            &Go::Step {
                spec: &spec,
                netns: netns.as_ref(),
            },
        )
    });
    target.clean();
    let (result, cgroups) = sandbox.finish(result);
    Ok(Some((result?, cgroups)))
}

/// A config that names another runner's seccomp profile, anywhere but in the step given
/// to that runner: running it would run the step without its profile.
fn without_profile() -> RunError {
    RunError::Setup(
        "the step's config was sent without its seccomp profile, for a runner started ahead"
            .to_owned(),
    )
}

/// Waits until kiln sends the step (`Some`) or closes `go`, or a signal tells the runner to
/// stop (`None`).
fn wait_for_step(go: &OwnedFd, signals: &SignalFd) -> Option<(PathBuf, Vec<u8>, [OwnedFd; 2])> {
    loop {
        let mut fds = [
            PollFd::new(go.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return None,
        }
        let step = fds[0].revents().is_some_and(|r| !r.is_empty());
        while let Ok(Some(info)) = signals.read_signal() {
            // A dead init shows when the step is handed to it; anything else is a stop.
            if info.ssi_signo != libc::SIGCHLD as u32 {
                return None;
            }
        }
        if !step {
            continue;
        }
        let mut buf = vec![0u8; crate::launcher::MAX_REQUEST];
        return match sys::recv_with_fds(go.as_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => None,
            Ok((n, fds)) => {
                let outputs = <[OwnedFd; 2]>::try_from(fds).ok()?;
                let (bundle, config) = crate::launcher::parse_request(&buf[..n])?;
                Some((bundle, config?.to_vec(), outputs))
            }
        };
    }
}

/// What a step needs in its rootfs before it starts: mount stubs recorded (removed after
/// the run) and the working directory made, owned by the step's user (so it is part of
/// the root output even under a mount).
struct Target {
    rootfs: OwnedFd,
    stubs: Stubs,
}

impl Target {
    fn prepare(config: &RunnerConfig) -> Result<Target, RunError> {
        let sys = LinuxSys;
        let spec = &config.spec;
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
        let rootfs = open_dir(&root_path)?;
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
        Ok(Target { rootfs, stubs })
    }

    /// Removes the mount stubs recorded (none when the step asked for no stub paths).
    fn clean(&self) {
        stubs::clean(&LinuxSys, self.rootfs.as_fd(), &self.stubs);
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd, RunError> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| RunError::Open {
        path: path.to_owned(),
        source,
    })
}

/// What a runner sets up that does not depend on the step's rootfs or process: the host
/// root, the compiled seccomp program and the step's cgroups with its limits (removed when
/// dropped).
struct Sandbox {
    host_root: OwnedFd,
    seccomp: Vec<kiln_seccomp::SockFilter>,
    limits: Limits,
    placement: Placement,
}

impl Sandbox {
    /// With `seccomp`, the program already loaded from `config`'s profile (see
    /// [`WarmTemplate`]); without, it is loaded here.
    fn prepare(
        config: &RunnerConfig,
        seccomp: Option<Vec<kiln_seccomp::SockFilter>>,
    ) -> Result<Sandbox, RunError> {
        let spec = &config.spec;
        let host_root = open_dir(Path::new("/"))?;
        let seccomp = match seccomp {
            Some(program) => program,
            None => seccomp_program(config)?,
        };
        let limits = Limits::from_spec(spec);
        let placement = place(config, &limits)?;
        Ok(Sandbox {
            host_root,
            seccomp,
            limits,
            placement,
        })
    }

    /// The spec the step runs: its own, with rlimits standing in for the limits no cgroup
    /// enforces (the step's own ulimits stay as it asked).
    fn step_spec<'a>(&self, spec: &'a Spec) -> Cow<'a, Spec> {
        let existing = spec
            .process()
            .as_ref()
            .and_then(|p| p.rlimits().clone())
            .unwrap_or_default();
        let fallback = limits::fallback_rlimits(&self.limits, self.placement.enforced, &existing);
        if fallback.is_empty() {
            return Cow::Borrowed(spec);
        }
        let mut copy = spec.clone();
        if let Some(p) = copy.process_mut() {
            p.set_rlimits(Some(existing.into_iter().chain(fallback).collect()));
        }
        Cow::Owned(copy)
    }

    /// Adds what the cgroups measured to the step's outcome and hands them over: they are
    /// removed when the placement returned drops.
    fn finish(
        &mut self,
        result: Result<ExitInfo, RunError>,
    ) -> (Result<ExitInfo, RunError>, Placement) {
        let placement = std::mem::take(&mut self.placement);
        (Self::measured(&placement, result), placement)
    }

    fn measured(
        placement: &Placement,
        result: Result<ExitInfo, RunError>,
    ) -> Result<ExitInfo, RunError> {
        let exceeded = placement.exceeded();
        let usage = placement.usage();
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
}

/// The compiled program of `config`'s seccomp profile (empty: none).
fn seccomp_program(config: &RunnerConfig) -> Result<Vec<kiln_seccomp::SockFilter>, RunError> {
    match config
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
    {
        Some(profile) => kiln_seccomp::load_or_compile(profile, config.seccomp_cache.as_deref())
            .map_err(|e| RunError::Setup(e.to_string())),
        None => Ok(Vec::new()),
    }
}

/// Creates the step's cgroups at `linux.cgroupsPath` with its limits.
fn place(config: &RunnerConfig, limits: &Limits) -> Result<Placement, RunError> {
    let Some(path) = config.cgroups_path() else {
        return Ok(Placement::default());
    };
    // The registry entry is named after the step id, the path's last element.
    let id = Some(split_cgroup_id(&path).1)
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

/// The namespaces the step's init is cloned into: the mount and network namespaces it
/// makes itself once it has its step (see [`init::run`]), so that an init started ahead of
/// its step copies kiln's mount table as it is then, with the step's rootfs mounted.
fn clone_flags(spec: &Spec) -> u64 {
    namespace_flags(spec) & !((libc::CLONE_NEWNS | libc::CLONE_NEWNET) as u64)
}

/// How the init learns its step.
enum Go<'a> {
    /// The spec and network namespace it was cloned with (a runner forked for its step).
    Inherited,
    /// A warm runner's step: the spec to run and the network namespace to join, sent with
    /// the step's stdout and stderr (this process's 1 and 2).
    Step {
        spec: &'a Spec,
        netns: Option<&'a OwnedFd>,
    },
}

/// The step's init, cloned into its namespaces and cgroups and waiting for its go. When
/// dropped before it was reaped, it is killed and reaped; the signal mask comes back.
struct InitHandle {
    child: Option<nix::unistd::Pid>,
    go: Option<OwnedFd>,
    status: Option<OwnedFd>,
    signal_fd: SignalFd,
    previous: SigSet,
    before: Usage,
    watch: cgroup::Watch,
}

impl Drop for InitHandle {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            while let Err(nix::Error::EINTR) = waitpid(child, None) {}
        }
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.previous), None);
    }
}

/// Clones the init into the step's namespaces and cgroups (see [`clone_flags`]), where it
/// waits for [`InitHandle::start`].
fn spawn_init(
    sandbox: &Sandbox,
    spec: &Spec,
    netns: Option<&OwnedFd>,
) -> Result<InitHandle, RunError> {
    let (go, go_init) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys_err("socketpair"))?;
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let before = children_usage()?;
    let signals = wait_set();
    let mut previous = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut previous))
        .map_err(sys_err("block signals"))?;
    let restore = |e: RunError| {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
        e
    };
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| restore(sys_err("signalfd")(e)))?;
    let placement = &sandbox.placement;
    let forked = sys::clone_into_namespaces(clone_flags(spec), false, placement.clone_into())
        .map_err(|e| restore(sys_err("create the step's namespaces")(e)))?;
    let child = match forked {
        Forked::Child => {
            drop(go);
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
                    seccomp: &sandbox.seccomp,
                    host_root: sandbox.host_root.as_fd(),
                    netns: netns.map(AsFd::as_fd),
                    cgroups: &placement.views,
                    status: status_w,
                    signals: &signals,
                },
                go_init,
            )
        }
        Forked::Parent { child, .. } => child,
    };
    drop(go_init);
    drop(status_w);
    Ok(InitHandle {
        child: Some(child),
        go: Some(go),
        status: Some(status_r),
        signal_fd,
        previous,
        before,
        // Opened before the step starts, so no limit event is missed.
        watch: placement.watch(),
    })
}

impl InitHandle {
    /// Starts the step and waits for it (killing it when it exceeds a limit or the runner
    /// is told to stop).
    fn start(&mut self, sandbox: &Sandbox, go: &Go<'_>) -> Result<ExitInfo, RunError> {
        let child = self
            .child
            .ok_or_else(|| RunError::Setup("the step's init is gone".to_owned()))?;
        let go_fd = self
            .go
            .take()
            .ok_or_else(|| RunError::Setup("the step's init was started already".to_owned()))?;
        // Anything else (EOF if we died) makes the init exit without starting.
        let sent = match go {
            Go::Inherited => sys::send_with_fds(go_fd.as_fd(), b"G", &[]),
            Go::Step { spec, netns } => {
                let mut message = vec![b'W'];
                serde_json::to_writer(&mut message, spec).map_err(|e| {
                    RunError::Setup(format!("encoding the step's spec for its init: {e}"))
                })?;
                let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
                let mut fds = vec![stdout.as_fd(), stderr.as_fd()];
                fds.extend(netns.map(AsFd::as_fd));
                sys::send_with_fds(go_fd.as_fd(), &message, &fds)
            }
        };
        drop(go_fd);
        sent.map_err(sys_err("hand the step to its init"))?;
        let started = Instant::now();
        let placement = &sandbox.placement;
        let mut cancelled = false;
        let mut exceeded = None;
        let status = loop {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => break status,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(sys_err("wait for the step")(e)),
            }
            let mut fds = vec![PollFd::new(self.signal_fd.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                self.watch
                    .poll_fds()
                    .into_iter()
                    .map(|(fd, events)| PollFd::new(fd, events)),
            );
            let Ok(ready) = nix::poll::poll(&mut fds, self.watch.timeout()) else {
                continue;
            };
            // A limit file changed, or it is time to look (cgroup v1).
            let limit_event = ready == 0
                || fds[1..]
                    .iter()
                    .any(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
            drop(fds);
            if limit_event {
                self.watch.rearm();
                if exceeded.is_none() {
                    // The step would fail anyway: stop it now (a fork bomb at its limit
                    // would otherwise spin until cancelled).
                    exceeded = placement.exceeded();
                    if exceeded.is_some() {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    }
                }
            }
            while let Ok(Some(info)) = self.signal_fd.read_signal() {
                if info.ssi_signo != libc::SIGCHLD as u32 {
                    // Cancellation: killing pid 1 kills the whole pid namespace.
                    cancelled = true;
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                }
            }
        };
        self.child = None;
        let wall = started.elapsed();

        let mut report = String::new();
        if let Some(status_r) = self.status.take() {
            let _ = std::fs::File::from(status_r).read_to_string(&mut report);
        }
        let report: Option<InitReport> = serde_json::from_str(report.trim()).ok();
        let after = children_usage()?;
        let before = &self.before;
        let micros = |tv: nix::sys::time::TimeVal| {
            u64::try_from(tv.tv_sec()).unwrap_or(0) * 1_000_000
                + u64::try_from(tv.tv_usec()).unwrap_or(0)
        };
        let spent = |f: fn(&Usage) -> nix::sys::time::TimeVal| {
            micros(f(&after)).saturating_sub(micros(f(before)))
        };
        // Block I/O in 512-byte units, from the same accounting as /proc/<pid>/io.
        let blocks = |f: fn(&Usage) -> libc::c_long| {
            u64::try_from(f(&after).saturating_sub(f(before))).unwrap_or(0) * 512
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
/// `<bundle>/config.json`: [`outcome_json`] of it, and its cgroups, to be removed (dropped)
/// once that is reported.
pub fn run_config(config: Option<&[u8]>, bundle: &Path) -> (String, Placement) {
    let config = match config {
        Some(bytes) => parse_config(bytes, &bundle.join("config.json")),
        None => read_config(bundle),
    };
    match config {
        Ok(config) => {
            let (result, cgroups) = run_leaving_cgroups(&config);
            (outcome_json(result), cgroups)
        }
        Err(e) => (outcome_json(Err(e)), Placement::default()),
    }
}

/// A warm runner's template (the config of a step of the shape it waits for, JSON) parsed
/// and its seccomp program loaded, or why that failed. The launcher keeps the last one and
/// forks every warm runner of the same template from it: a runner then neither parses the
/// template (most of it the profile's ≈380 names) nor loads the program again, work the
/// two cores here would otherwise do once per step.
#[derive(Debug)]
pub struct WarmTemplate {
    bytes: Vec<u8>,
    prepared: Result<(RunnerConfig, Vec<kiln_seccomp::SockFilter>), String>,
}

impl WarmTemplate {
    pub fn new(bytes: &[u8]) -> WarmTemplate {
        // A template sent without its profile is refused by each runner, before it makes
        // anything (`run_warm_leaving_cgroups`).
        let prepared = parse_config(bytes, Path::new("(the warm runner's template)"))
            .and_then(|config| seccomp_program(&config).map(|program| (config, program)))
            .map_err(|e| e.to_string());
        WarmTemplate {
            bytes: bytes.to_vec(),
            prepared,
        }
    }

    /// Whether this is the template `bytes` encode.
    pub fn is_from(&self, bytes: &[u8]) -> bool {
        self.bytes == bytes
    }
}

/// Runs the step a warm runner is given (see [`run_warm`]) from `template` with cgroups
/// named after `id`: [`outcome_json`] of it and its cgroups as for [`run_config`], `None`
/// when it was let go without one.
pub fn run_warm_config(
    template: &WarmTemplate,
    id: &str,
    go: &OwnedFd,
    taken: impl FnOnce(),
) -> Option<(String, Placement)> {
    let ready = match &template.prepared {
        Ok((config, program)) => {
            let mut config = config.clone();
            config
                .rename_cgroups(id)
                .map(|()| (config, program.clone()))
        }
        // The same text as the error it stands for (a setup error shows its message).
        Err(message) => Err(RunError::Setup(message.clone())),
    };
    let (template, program) = match ready {
        Ok(ready) => ready,
        Err(e) => return Some((outcome_json(Err(e)), Placement::default())),
    };
    match run_warm_leaving_cgroups(&template, Some(program), go, taken) {
        Ok(None) => None,
        Ok(Some((info, cgroups))) => Some((outcome_json(Ok(info)), cgroups)),
        Err(e) => Some((outcome_json(Err(e)), Placement::default())),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, ProcessBuilder,
    };

    fn config(cgroups_path: &str, args: &[&str], pids: Option<i64>) -> RunnerConfig {
        let mut spec = Spec::default();
        let mut linux = LinuxBuilder::default()
            .cgroups_path(PathBuf::from(cgroups_path))
            .build()
            .expect("linux");
        if let Some(limit) = pids {
            let resources = LinuxResourcesBuilder::default()
                .pids(
                    LinuxPidsBuilder::default()
                        .limit(limit)
                        .build()
                        .expect("pids"),
                )
                .build()
                .expect("resources");
            linux.set_resources(Some(resources));
        }
        spec.set_linux(Some(linux));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        spec.set_process(Some(
            ProcessBuilder::default()
                .args(args)
                .build()
                .expect("process"),
        ));
        RunnerConfig {
            spec,
            stub_paths: Vec::new(),
            stubs_recursive: false,
            real_root: true,
            own_cgroups: true,
            seccomp_cache: None,
            cgroup_registry: None,
            seccomp_of_warm_runner: false,
        }
    }

    /// A warm runner's go socket and kiln's end of it.
    fn go_socket() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn a_config_sent_without_its_profile_runs_only_on_the_warm_runner_it_was_sent_to() {
        let mut flagged = config("/buildkit/s1x2", &["true"], None);
        flagged.seccomp_of_warm_runner = true;
        let refused = |e: RunError| e.to_string().contains("without its seccomp profile");
        // Refused before anything is made: no rootfs, cgroup or process here.
        assert!(run(&flagged).is_err_and(refused));
        let (go, _kiln) = go_socket();
        assert!(run_warm(&flagged, &go, || {}).is_err_and(refused));
        // Sent whole, the flag is not there at all (older runners read the same JSON).
        let whole =
            serde_json::to_string(&config("/buildkit/s1x2", &["true"], None)).expect("encodes");
        assert!(!whole.contains("seccomp_of_warm_runner"), "{whole}");
    }

    #[test]
    fn a_warm_template_is_parsed_once_with_its_program_or_its_error() {
        let mut template = config("/buildkit/s1x2", &["true"], None);
        let profile = kiln_seccomp::default_profile(&[caps::Capability::CAP_CHOWN]);
        if let Some(linux) = template.spec.linux_mut() {
            linux.set_seccomp(Some(profile.clone()));
        }
        let bytes = serde_json::to_vec(&template).expect("encodes");
        let parsed = WarmTemplate::new(&bytes);
        assert!(parsed.is_from(&bytes));
        assert!(!parsed.is_from(&bytes[1..]));
        let (config, program) = parsed.prepared.as_ref().expect("a sound template");
        assert_eq!(config.spec, template.spec);
        let expected = kiln_seccomp::load_or_compile(&profile, None).expect("compiles");
        assert!(!program.is_empty());
        assert_eq!(program, &expected);

        let (go, _kiln) = go_socket();
        // A template that cannot be used fails every runner started from it, with the
        // error it would have had parsing the template itself; nothing is made.
        let mut flagged = template.clone();
        flagged.seccomp_of_warm_runner = true;
        let flagged = WarmTemplate::new(&serde_json::to_vec(&flagged).expect("encodes"));
        let broken = WarmTemplate::new(b"{\"spec\": 1}");
        for (bad, text) in [
            (&flagged, "sent without its seccomp profile"),
            (&broken, "(the warm runner's template)"),
        ] {
            let (outcome, _cgroups) =
                run_warm_config(bad, "s1x2", &go, || panic!("taken")).expect("reported");
            let outcome: serde_json::Value = serde_json::from_str(&outcome).expect("json");
            let error = outcome["error"].as_str().expect("an error");
            assert!(error.contains(text), "{error}");
        }
    }

    #[test]
    fn a_warm_runner_names_its_cgroups_in_the_steps_parent() {
        for (path, renamed) in [
            ("/buildkit/s1x2", "/buildkit/w9x0"),
            ("/parent/buildkit/s1x2", "/parent/buildkit/w9x0"),
            ("system.slice:kiln:s1x2", "system.slice:kiln:w9x0"),
        ] {
            let mut c = config(path, &["true"], None);
            c.rename_cgroups("w9x0").expect("rename");
            assert_eq!(c.cgroups_path().as_deref(), Some(renamed), "{path}");
        }
        let mut c = config("/buildkit/s1x2", &["true"], None);
        assert!(c.rename_cgroups("../escape").is_err());
        assert_eq!(c.cgroups_path().as_deref(), Some("/buildkit/s1x2"));
    }

    #[test]
    fn steps_of_one_shape_differ_in_what_they_bring_along() {
        let template = config("/buildkit/s1x1", &["true"], Some(64));
        // Another process and step id: same shape.
        let next = config("/buildkit/s1x2", &["sh", "-c", "make"], Some(64));
        assert_eq!(template.warm_shape(), next.warm_shape());
        // Other limits, another cgroup parent, another mode: another shape.
        let limited = config("/buildkit/s1x2", &["true"], Some(32));
        assert_ne!(template.warm_shape(), limited.warm_shape());
        let elsewhere = config("/other/buildkit/s1x2", &["true"], Some(64));
        assert_ne!(template.warm_shape(), elsewhere.warm_shape());
        let mut rootless = next;
        rootless.real_root = false;
        assert_ne!(template.warm_shape(), rootless.warm_shape());
    }
}
