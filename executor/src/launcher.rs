//! The step launcher: one small single-threaded process per [`Executor`] that forks the
//! runner of every step. Starting a runner then costs a `fork` of a process that is
//! already running, instead of a fork of kiln (many threads, a large address space) and an
//! `exec` of the kiln binary (≈1.5 ms per step on the machines here).
//!
//! kiln and its launcher talk over a `SOCK_SEQPACKET` pair:
//! * kiln sends one message per step: the bundle path, with three descriptors (`SCM_RIGHTS`):
//!   the step's stdout and stderr (write ends) and the launcher's end of a per-step
//!   status socket.
//! * On the status socket the launcher sends a pidfd of the runner (one byte `p` with
//!   the descriptor) right after the fork, then, once it reaped the runner, its wait status
//!   as text, and closes it. kiln signals a runner only through its pidfd, so a recycled
//!   pid is never hit, and end of stream means the runner was reaped.
//!
//! The launcher ends when kiln closes its end and every runner was reaped. It dies with
//! the kiln thread that started it (SIGKILL) and its runners get SIGTERM when it dies, which
//! makes them kill their steps and clean up, as when kiln started them itself.
//!
//! [`Executor`]: crate::supervisor::Executor

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd as _, OwnedFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::supervisor::RunnerCommand;
use crate::sys::{self, Forked};

/// The argument that makes a runner program serve as the launcher: `program args…
/// --launcher <fd>` (a bundle path is always absolute, so it cannot be taken for it).
pub const LAUNCHER_ARG: &str = "--launcher";

/// Longest bundle path a request may carry.
const MAX_REQUEST: usize = 4096;

/// Errors of the launcher's kiln side.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("starting the step launcher {program}: {source}")]
    Start {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handing step {bundle} to the launcher: {source}")]
    Send {
        bundle: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("step bundle path too long for the launcher: {0}")]
    PathTooLong(PathBuf),
    #[error("reading the step runner's status: {0}")]
    Status(#[source] std::io::Error),
}

impl LauncherError {
    /// The launcher is gone (killed from outside); a new one may take the step.
    pub fn launcher_gone(&self) -> bool {
        matches!(
            self,
            LauncherError::Send {
                source: Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::ECONNREFUSED,
                ..
            }
        )
    }
}

/// kiln's end of a running launcher. Dropping it closes the socket: the launcher exits
/// once its runners are done.
#[derive(Debug)]
pub struct Launcher {
    socket: OwnedFd,
}

/// The descriptors a launched runner writes its output to.
#[derive(Debug)]
pub struct Outputs {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Launcher {
    /// Starts `runner.program runner.args… --launcher <fd>` from a thread of its own that
    /// lives as long as the launcher (its parent-death signal follows that thread) and
    /// reaps it.
    pub fn start(runner: &RunnerCommand) -> Result<Launcher, LauncherError> {
        let start_err = |source: std::io::Error| LauncherError::Start {
            program: runner.program.clone(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| start_err(e.into()))?;
        let mut command = Command::new(&runner.program);
        command
            .args(&runner.args)
            .arg(LAUNCHER_ARG)
            .arg(theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kiln-launcher".into())
            // In kiln's process group, as runners kiln started itself were: what signals the
            // group (a terminal's ^C, a supervisor killing the group) reaches the runners.
            .spawn(
                move || match sys::spawn_tied(&mut command, &[theirs.as_raw_fd()], false) {
                    Ok(mut child) => {
                        drop(theirs);
                        let _ = started_tx.send(Ok(()));
                        let _ = child.wait();
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                },
            )
            .map_err(start_err)?;
        started_rx
            .recv()
            .map_err(|_| start_err(std::io::Error::other("the launcher thread ended")))?
            .map_err(start_err)?;
        Ok(Launcher { socket: ours })
    }

    /// Has the launcher fork a runner for `bundle` writing to `outputs`.
    pub fn launch(&self, bundle: &Path, outputs: &Outputs) -> Result<Launched, LauncherError> {
        let path = bundle.as_os_str().as_bytes();
        if path.is_empty() || path.len() > MAX_REQUEST {
            return Err(LauncherError::PathTooLong(bundle.to_owned()));
        }
        let send_err = |source| LauncherError::Send {
            bundle: bundle.to_owned(),
            source,
        };
        let (status, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(send_err)?;
        sys::send_with_fds(
            self.socket.as_fd(),
            path,
            &[
                outputs.stdout.as_fd(),
                outputs.stderr.as_fd(),
                theirs.as_fd(),
            ],
        )
        .map_err(send_err)?;
        drop(theirs);
        let status = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(status))
            .map_err(LauncherError::Status)?;
        Ok(Launched {
            status,
            pidfd: None,
            text: Vec::new(),
        })
    }
}

/// A runner the launcher started: its pidfd once it arrived, and its wait status.
#[derive(Debug)]
pub struct Launched {
    status: tokio::net::UnixStream,
    pidfd: Option<OwnedFd>,
    text: Vec<u8>,
}

impl Launched {
    /// Reads what the launcher sends; `Ok(false)` when the runner was reaped (the
    /// status socket closed). Cancel-safe: a read either happened or did not.
    pub async fn next(&mut self) -> Result<bool, LauncherError> {
        let mut buf = [0u8; 256];
        loop {
            self.status
                .readable()
                .await
                .map_err(LauncherError::Status)?;
            let read = self.status.try_io(tokio::io::Interest::READABLE, || {
                sys::recv_with_fds(self.status.as_fd(), &mut buf).map_err(Into::into)
            });
            match read {
                Ok((0, _)) => return Ok(false),
                Ok((n, fds)) => {
                    let mut bytes = &buf[..n];
                    if let Some(pidfd) = fds.into_iter().next() {
                        self.pidfd = Some(pidfd);
                        bytes = bytes.strip_prefix(b"p").unwrap_or(bytes);
                    }
                    self.text.extend_from_slice(bytes);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(LauncherError::Status(e)),
            }
        }
    }

    /// Signals the runner; `false` while its pidfd has not arrived yet (or it is gone).
    pub fn signal(&self, signal: Signal) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|pidfd| sys::pidfd_send_signal(pidfd.as_fd(), signal).is_ok())
    }

    /// The runner's wait status as the launcher described it (`exit status: 1`,
    /// `signal: 9 (SIGKILL)`), once [`Launched::next`] returned `false`.
    pub fn wait_status(&self) -> String {
        let text = String::from_utf8_lossy(&self.text).trim().to_owned();
        if text.is_empty() {
            "the launcher ended before the runner".to_owned()
        } else {
            text
        }
    }
}

/// The entry point of a runner program (`kiln __runner ARG…`, `kiln-runner ARG…`) with
/// its arguments: `<bundle>` runs one step ([`crate::process::runner_main`]),
/// `--launcher <fd>` serves as the launcher. Must be the only thread.
pub fn runner_program_main(args: &[OsString]) -> i32 {
    match args {
        [flag, fd] if flag == LAUNCHER_ARG => {
            let socket = fd
                .to_str()
                .and_then(|fd| fd.parse().ok())
                .and_then(|fd| sys::take_inherited_fd(fd).ok());
            match socket {
                Some(socket) => serve(socket),
                None => {
                    eprintln!("kiln launcher: {fd:?} is not an inherited socket descriptor");
                    2
                }
            }
        }
        [bundle] => crate::process::runner_main(Path::new(bundle)),
        _ => {
            eprintln!("usage: <runner> <bundle> | <runner> {LAUNCHER_ARG} <fd>");
            2
        }
    }
}

/// The launcher process: `program args… --launcher <fd>`. Must be the only thread.
pub fn serve(socket: OwnedFd) -> i32 {
    let mut children = SigSet::empty();
    children.add(Signal::SIGCHLD);
    let mut previous = SigSet::empty();
    if nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&children), Some(&mut previous))
        .is_err()
    {
        return 1;
    }
    let Ok(reaped) =
        SignalFd::with_flags(&children, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return 1;
    };
    // Once here rather than in every runner: what the runners fork from it inherit.
    if let Err(e) = crate::cgroup::preload() {
        tracing::debug!(error = %e, "cgroup hierarchies not preloaded");
    }
    let launcher = nix::unistd::getpid();
    // Each runner's status socket, until the runner is reaped.
    let mut running: HashMap<Pid, OwnedFd> = HashMap::new();
    let mut open = true;
    loop {
        reap(&mut running);
        if !open && running.is_empty() {
            return 0;
        }
        let mut fds = vec![PollFd::new(reaped.as_fd(), PollFlags::POLLIN)];
        if open {
            fds.push(PollFd::new(socket.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return 1,
        }
        let request = fds
            .get(1)
            .and_then(PollFd::revents)
            .is_some_and(|r| !r.is_empty());
        drop(fds);
        while let Ok(Some(_)) = reaped.read_signal() {}
        if !request {
            continue;
        }
        let mut buf = vec![0u8; MAX_REQUEST];
        match sys::recv_with_fds(socket.as_fd(), &mut buf) {
            Ok((0, _)) => open = false,
            Ok((n, fds)) => {
                let Ok([stdout, stderr, status]) = <[OwnedFd; 3]>::try_from(fds) else {
                    // Not a request kiln sends: ignore it (its descriptors close).
                    continue;
                };
                buf.truncate(n);
                let bundle = PathBuf::from(OsString::from_vec(buf));
                match sys::fork() {
                    Ok(Forked::Child) => {
                        become_runner(&bundle, launcher, &previous, &stdout, &stderr)
                    }
                    Ok(Forked::Parent { child, .. }) => {
                        if let Ok(pidfd) = sys::pidfd_open(child) {
                            let _ = sys::send_with_fds(status.as_fd(), b"p", &[pidfd.as_fd()]);
                        }
                        running.insert(child, status);
                    }
                    Err(e) => {
                        let _ = nix::unistd::write(&status, format!("fork: {e}").as_bytes());
                    }
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(_) => open = false,
        }
    }
}

/// Reaps every runner that ended and tells kiln how it ended.
fn reap(running: &mut HashMap<Pid, OwnedFd>) {
    loop {
        let (pid, text) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exit status: {code}")),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (
                pid,
                format!("signal: {} ({})", signal as i32, signal.as_str()),
            ),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(status) = running.remove(&pid) {
            let _ = nix::unistd::write(&status, text.as_bytes());
        }
    }
}

/// The forked child: the step's runner, with the step's output as its stdout and stderr
/// and no other descriptor of the launcher's.
fn become_runner(
    bundle: &Path,
    launcher: Pid,
    mask: &SigSet,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
) -> ! {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
    // dup2 onto 1 and 2 leaves them open across the step's exec (no close-on-exec flag).
    if nix::unistd::dup2_stdout(stdout).is_err() || nix::unistd::dup2_stderr(stderr).is_err() {
        sys::exit_immediately(1);
    }
    // Other steps' status sockets must not stay open here (kiln waits for them to close),
    // nor the launcher's socket. The Rust owners of these descriptors in the launcher's
    // frames are never dropped: this process exits from here.
    if sys::close_fds_from(3).is_err() {
        sys::exit_immediately(1);
    }
    // If the launcher dies, the step must not outlive it.
    if sys::die_with_parent(launcher, Signal::SIGTERM).is_err() {
        sys::exit_immediately(1);
    }
    let code = crate::process::runner_main(bundle);
    std::process::exit(code)
}
