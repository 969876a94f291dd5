//! One ready sandbox network: an anonymous network namespace (held only by descriptors,
//! never bound to a path) and the user-space stack process that connects it to kiln's
//! network namespace.
//!
//! The stack runs in kiln's network namespace (and, rootless, in kiln's user namespace,
//! which owns the new namespace): it opens `/dev/net/tun` inside the target namespace,
//! creates the tap device there and configures it, then relays the namespace's traffic
//! through ordinary sockets. It gets the namespace as `/proc/self/fd/N` (an inherited
//! descriptor), reports readiness on a pipe, and dies with the thread that started it.

use std::io::{Read as _, Seek as _};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::config::{Attachment, NetworkError, Stack, find_program};
use crate::sys::{self, Forked};

/// The device a stack creates its tap interface with.
const TUN: &str = "/dev/net/tun";

/// How long a stack may take to configure its namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

fn ns_err(op: &'static str) -> impl FnOnce(nix::Error) -> NetworkError {
    move |source| NetworkError::Namespace { op, source }
}

/// A configured namespace and its stack process. Dropping it stops the stack; the
/// namespace goes away with the last descriptor (and process) in it.
#[derive(Debug)]
pub(crate) struct Namespace {
    netns: OwnedFd,
    /// Always `Some` until dropped.
    helper: Option<Child>,
    /// slirp4netns exits when this (the write end of its `--exit-fd`) closes.
    exit_pipe: Option<OwnedFd>,
    stack: Stack,
}

impl Namespace {
    /// Creates a namespace and starts `stack` on it; returns once the tap device is up.
    pub fn create(stack: Stack) -> Result<Namespace, NetworkError> {
        let program = find_program(stack.program()).ok_or(NetworkError::NoStack)?;
        // The stack opens it inside the namespace; say so plainly rather than relay its
        // terse failure.
        nix::unistd::access(
            TUN,
            nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
        )
        .map_err(|source| NetworkError::Tun { path: TUN, source })?;
        let netns = new_netns()?;
        let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ns_err("pipe"))?;
        let (exit_r, exit_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ns_err("pipe"))?;
        // The stack's messages go to an unlinked file: read when it fails, never a pipe
        // nobody drains (a full pipe would stall the stack).
        let spawn_err = |source| NetworkError::Spawn { stack, source };
        let mut log = tempfile::tempfile().map_err(spawn_err)?;
        let ns_path = format!("/proc/self/fd/{}", netns.as_raw_fd());
        let mut command = Command::new(&program);
        let mut inherit = vec![netns.as_raw_fd(), ready_w.as_raw_fd()];
        match stack {
            Stack::Slirp4netns => {
                inherit.push(exit_r.as_raw_fd());
                command.args([
                    "--configure",
                    "--mtu=65520",
                    "--disable-host-loopback",
                    "--enable-sandbox",
                    "--enable-seccomp",
                    &format!("--ready-fd={}", ready_w.as_raw_fd()),
                    &format!("--exit-fd={}", exit_r.as_raw_fd()),
                    "--netns-type=path",
                    &ns_path,
                    "tap0",
                ]);
            }
            Stack::Pasta => {
                command.args([
                    // kiln is uid 0 (of its user namespace, rootless): pasta would switch
                    // to nobody, who may not enter the namespace.
                    "--runas",
                    "0",
                    "--foreground",
                    "--quiet",
                    "--config-net",
                    "--no-map-gw",
                    "--tcp-ports",
                    "none",
                    "--udp-ports",
                    "none",
                    "--tcp-ns",
                    "none",
                    "--udp-ns",
                    "none",
                    "--dns-forward",
                    &stack.nameserver().to_string(),
                    "--ns-ifname",
                    "tap0",
                    "--netns",
                    &ns_path,
                    // Written once the namespace is configured: the readiness signal.
                    "--pid",
                    &format!("/proc/self/fd/{}", ready_w.as_raw_fd()),
                ]);
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log.try_clone().map_err(spawn_err)?));
        let mut helper = sys::spawn_tied(&mut command, &inherit, true).map_err(spawn_err)?;
        drop(ready_w);
        drop(exit_r);
        let exit_pipe = (stack == Stack::Slirp4netns).then_some(exit_w);
        match wait_ready(&ready_r, &mut helper) {
            Ok(()) => Ok(Namespace {
                netns,
                helper: Some(helper),
                exit_pipe,
                stack,
            }),
            Err(reason) => {
                let _ = helper.kill();
                let _ = helper.wait();
                let mut output = String::new();
                let _ = log.rewind();
                let _ = log.read_to_string(&mut output);
                let output = output.trim().replace('\n', "; ");
                Err(NetworkError::Helper {
                    stack,
                    message: if output.is_empty() {
                        reason
                    } else {
                        format!("{reason}: {output}")
                    },
                })
            }
        }
    }

    /// How a step joins this namespace.
    pub fn attachment(&self) -> Attachment {
        Attachment {
            path: PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.netns.as_raw_fd()
            )),
            nameserver: self.stack.nameserver(),
        }
    }

    /// Whether the stack still runs (a namespace whose stack died has no way out).
    pub fn alive(&mut self) -> bool {
        self.helper
            .as_mut()
            .is_some_and(|h| matches!(h.try_wait(), Ok(None)))
    }

    /// The stack's process id.
    pub fn helper_pid(&self) -> u32 {
        self.helper.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.exit_pipe.take();
        let Some(mut helper) = self.helper.take() else {
            return;
        };
        let _ = helper.kill();
        if matches!(helper.try_wait(), Ok(None)) {
            // Its exit tears the tap device down, which waits for an RCU grace period
            // (≈25 ms): reap it off the caller's path. If kiln ends first, the killed
            // stack is reaped by whoever inherits it.
            let (tx, rx) = std::sync::mpsc::channel::<Child>();
            let reaper = std::thread::Builder::new()
                .name("kiln-network-reap".to_owned())
                .spawn(move || {
                    if let Ok(mut helper) = rx.recv() {
                        let _ = helper.wait();
                    }
                });
            match reaper {
                Ok(_) => {
                    let _ = tx.send(helper);
                }
                Err(_) => {
                    let _ = helper.wait();
                }
            }
        }
    }
}

/// Waits until the stack writes to its readiness pipe, exits, or times out.
fn wait_ready(ready: &OwnedFd, helper: &mut Child) -> Result<(), String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not ready after {}s", READY_TIMEOUT.as_secs()));
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
    let mut byte = [0u8; 32];
    match nix::unistd::read(ready, &mut byte) {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(match helper.wait() {
            Ok(status) => format!("it exited ({status})"),
            Err(e) => format!("it ended: {e}"),
        }),
    }
}

/// A new network namespace, held by a descriptor only. A forked child unshares it and
/// waits while the parent opens it through `/proc`, then exits; the descriptor keeps the
/// namespace alive.
fn new_netns() -> Result<OwnedFd, NetworkError> {
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ns_err("pipe"))?;
    let (hold_r, hold_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ns_err("pipe"))?;
    let forked = sys::clone_into_namespaces(libc::CLONE_NEWNET as u64, false, None)
        .map_err(ns_err("clone a process into a new network namespace"))?;
    let child = match forked {
        Forked::Child => {
            // Only async-signal-safe calls: the parent may be multi-threaded.
            drop(ready_r);
            drop(hold_w);
            let _ = nix::unistd::write(&ready_w, b"R");
            let mut byte = [0u8; 1];
            let _ = nix::unistd::read(&hold_r, &mut byte);
            sys::exit_immediately(0)
        }
        Forked::Parent { child, .. } => child,
    };
    drop(ready_w);
    drop(hold_r);
    let mut byte = [0u8; 1];
    let opened = match std::fs::File::from(ready_r).read(&mut byte) {
        Ok(1) => nix::fcntl::open(
            format!("/proc/{}/ns/net", child.as_raw()).as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(ns_err("open the new namespace")),
        _ => Err(NetworkError::Namespace {
            op: "unshare",
            source: nix::Error::EPERM,
        }),
    };
    drop(hold_w);
    let _ = nix::sys::wait::waitpid(child, None);
    opened
}
