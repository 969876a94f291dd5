//! pid 1 of a step: the network namespace to join, mount tree, pivot, hostname, loopback;
//! then the workload is forked and the init only reaps and forwards signals until the
//! workload exits.

use std::io::Read as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use serde::{Deserialize, Serialize};

use super::workload;
use crate::rootfs::{self, Context};
use crate::sys::{self, LinuxSys, Sys as _};
use kiln_cgroup::CgroupView;
use kiln_seccomp::SockFilter;

/// What the init reports to the runner over its status pipe.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum InitReport {
    Exited(i32),
    Signaled(i32),
    /// Setup failed; `exec_code` is 127/126 when only the final exec did (not found / not
    /// executable), as shells report it.
    Failed {
        message: String,
        exec_code: Option<i32>,
    },
}

pub(super) struct InitArgs<'a> {
    pub spec: &'a Spec,
    /// The compiled seccomp filter (empty: none), built before the clone so the step's
    /// processes only read it.
    pub seccomp: &'a [SockFilter],
    pub host_root: BorrowedFd<'a>,
    /// A ready sandbox network to join instead of the new namespace of `none`.
    pub netns: Option<BorrowedFd<'a>>,
    pub cgroups: &'a [CgroupView],
    pub status: OwnedFd,
    pub signals: &'a SigSet,
}

pub(super) fn report(status: &OwnedFd, report: &InitReport) {
    if let Ok(json) = serde_json::to_string(report) {
        let _ = nix::unistd::write(status, json.as_bytes());
    }
}

/// Runs as the step's pid 1 once the runner sends its go on `go`; never returns.
///
/// The go is `G` when the init runs the spec and network namespace it was cloned with, or
/// `W` and a spec (JSON) with the step's stdout, stderr and, when it joins one, network
/// namespace (a warm runner's step, which arrives after the clone). Anything else, or EOF,
/// makes it exit without starting.
pub(super) fn run(args: InitArgs<'_>, go: OwnedFd) -> ! {
    // The runner holds the other end: if it dies before or after this, so do we.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Device nodes and masks are created with exact modes.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // While the step is on its way (a runner started ahead waits for it here).
    let premade = rootfs::Premade::make(&LinuxSys, args.spec);
    let mut message = vec![0u8; crate::launcher::MAX_REQUEST];
    let (len, fds) = match sys::recv_with_fds(go.as_fd(), &mut message) {
        Ok((len, fds)) if len > 0 => (len, fds),
        _ => sys::exit_immediately(1),
    };
    drop(go);
    match message[0] {
        b'G' => start(&args, premade),
        b'W' => {
            let spec: Spec = match serde_json::from_slice(&message[1..len]) {
                Ok(spec) => spec,
                Err(e) => fail(&args, format!("reading the step's spec: {e}"), None),
            };
            drop(message);
            let mut fds = fds.into_iter();
            let (Some(stdout), Some(stderr)) = (fds.next(), fds.next()) else {
                fail(&args, "the step came without its output".to_owned(), None)
            };
            if nix::unistd::dup2_stdout(&stdout).is_err()
                || nix::unistd::dup2_stderr(&stderr).is_err()
            {
                fail(&args, "taking the step's output".to_owned(), None);
            }
            drop((stdout, stderr));
            let netns = fds.next();
            start(
                &InitArgs {
                    spec: &spec,
                    netns: netns.as_ref().map(AsFd::as_fd),
                    status: args.status,
                    ..args
                },
                premade,
            )
        }
        _ => sys::exit_immediately(1),
    }
}

fn fail(args: &InitArgs<'_>, message: String, exec_code: Option<i32>) -> ! {
    report(&args.status, &InitReport::Failed { message, exec_code });
    sys::exit_immediately(1)
}

fn start(args: &InitArgs<'_>, premade: rootfs::Premade) -> ! {
    match setup_and_start(args, premade) {
        Ok(workload) => {
            let outcome = supervise(workload, args.signals);
            report(&args.status, &outcome);
            sys::exit_immediately(0)
        }
        Err((message, exec_code)) => fail(args, message, exec_code),
    }
}

fn setup_and_start(
    args: &InitArgs<'_>,
    premade: rootfs::Premade,
) -> Result<nix::unistd::Pid, (String, Option<i32>)> {
    setup(args, premade).map_err(|message| (message, None))?;
    start_workload(args)
}

fn setup(args: &InitArgs<'_>, premade: rootfs::Premade) -> Result<(), String> {
    let sys = LinuxSys;
    // The mount namespace is copied now, not at the clone: the step's rootfs and mounts
    // may have been mounted since (an init started ahead of its step).
    let fresh = super::namespace_flags(args.spec) & (libc::CLONE_NEWNS | libc::CLONE_NEWNET) as u64;
    nix::sched::unshare(nix::sched::CloneFlags::from_bits_truncate(
        fresh as libc::c_int,
    ))
    .map_err(|e| format!("creating the step's mount and network namespaces: {e}"))?;
    if let Some(netns) = args.netns {
        // Before anything else: every later step runs in the namespace the step keeps.
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining the sandbox network: {e}"))?;
    }
    // Opened in this mount namespace: open_tree can only clone mounts of our own namespace.
    let devnull = rootfs::open_host_devnull().map_err(|e| e.to_string())?;
    let ctx = Context {
        host_root: args.host_root,
        host_devnull: devnull.as_fd(),
        cgroups: args.cgroups,
        premade: std::cell::RefCell::new(premade),
    };
    let root = rootfs::prepare(&sys, args.spec, &ctx).map_err(|e| e.to_string())?;
    rootfs::finish_root(&sys, args.spec, root.as_fd()).map_err(|e| e.to_string())?;
    sys.pivot_to(root.as_fd())
        .map_err(|e| format!("pivot_root into the rootfs: {e}"))?;
    drop(root);
    if let Some(hostname) = args.spec.hostname() {
        nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    }
    let own_network = args
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == LinuxNamespaceType::Network));
    // A joined sandbox network was configured (loopback included) by its stack.
    if own_network && args.netns.is_none() {
        sys::set_interface_up("lo").map_err(|e| format!("bringing up lo: {e}"))?;
    }
    Ok(())
}

fn start_workload(args: &InitArgs<'_>) -> Result<nix::unistd::Pid, (String, Option<i32>)> {
    let setup_err = |message: String| (message, None);
    let devnull = rootfs::open_host_devnull().map_err(|e| setup_err(e.to_string()))?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| setup_err(format!("pipe: {e}")))?;
    // The workload shares our memory until its execve: nothing of ours is copied for it,
    // and we are suspended until it executed (or failed and exited).
    let child = sys::spawn_sharing_memory(|| {
        workload::exec(args.spec, args.seccomp, devnull.as_fd(), err_w.as_fd())
    })
    .map_err(|e| setup_err(format!("starting the workload: {e}")))?;
    drop(err_w);
    // Nothing more to do as a privileged process that containers could inspect.
    let _ = nix::sys::prctl::set_dumpable(false);
    // The pipe closes on a successful exec; anything read is why the exec did not happen.
    let mut message = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut message);
    if !message.is_empty() {
        // The workload's exit code says whether only the exec failed (126/127).
        let exec_code = match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code @ (126 | 127))) => Some(code),
            _ => None,
        };
        return Err((message, exec_code));
    }
    Ok(child)
}

/// Reaps every child (orphans reparent to pid 1) and forwards signals to the workload until
/// the workload exits.
fn supervise(workload: nix::unistd::Pid, signals: &SigSet) -> InitReport {
    loop {
        loop {
            match waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == workload => {
                    return InitReport::Exited(code);
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == workload => {
                    return InitReport::Signaled(signal as i32);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let Ok(info) = sys::wait_signal(signals) else {
            continue;
        };
        if info.signal != libc::SIGCHLD {
            if let Ok(signal) = Signal::try_from(info.signal) {
                let _ = nix::sys::signal::kill(workload, signal);
            }
        }
    }
}
