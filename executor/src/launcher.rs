//! The step launcher: one small single-threaded process per [`Executor`] that forks the
//! runner of every step. Starting a runner then costs a `fork` of a process that is
//! already running, instead of a fork of kiln (many threads, a large address space) and an
//! `exec` of the kiln binary (≈1.5 ms per step on the machines here).
//!
//! kiln and its launcher talk over a `SOCK_SEQPACKET` pair. kiln sends one message per
//! step: the length of the bundle path (`u32`, little-endian), the path and the runner's
//! config (JSON; empty when it is in `<bundle>/config.json`, for configs too large for one
//! message), with three descriptors (`SCM_RIGHTS`): the step's stdout and stderr (write
//! ends) and the launcher's end of a per-step status socket. On that stream socket arrive
//! frames, each a tag byte:
//! * `p` from the launcher right after the fork, with a pidfd of the runner: kiln signals
//!   the runner only through it, so a recycled pid is never hit;
//! * `t` from a warm runner (one forked ahead of its step, see [`Launcher::warm`]) once it
//!   received its step: one that ends without it never started the step;
//! * `r` from the runner once its step is over (its output closed first), then a `u32`
//!   length and the outcome ([`crate::process::outcome_json`]): kiln goes on without
//!   waiting for the runner to exit;
//! * `s` from the launcher once it reaped the runner, with a length and the wait status as
//!   text (`exit status: 1`, `signal: 9 (SIGKILL)`): what kiln reports when no `r` came.
//!
//! Nothing per step touches the disk: no config or result file, no bundle directory
//! unless the step needs a hosts file of its own.
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

use crate::process::WarmTemplate;
use crate::supervisor::RunnerCommand;
use crate::sys::{self, Forked};

/// The argument that makes a runner program serve as the launcher: `program args…
/// --launcher <fd>` (a bundle path is always absolute, so it cannot be taken for it).
pub const LAUNCHER_ARG: &str = "--launcher";

/// Largest request the launcher takes: a bundle path and a config up to [`MAX_INLINE`].
pub(crate) const MAX_REQUEST: usize = MAX_INLINE + 8192;

/// Largest config sent in the request itself; a larger one goes through the bundle's
/// `config.json`.
const MAX_INLINE: usize = 128 << 10;

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
    #[error("writing the step config into {bundle}: {source}")]
    Config {
        bundle: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// kiln's end of a running launcher. Dropping it closes the socket and waits (at most
/// [`EXIT_TIMEOUT`]) until the launcher exited, which it does once its runners are done:
/// a runner removes its step's cgroups after it reported, and they must be gone when the
/// build is.
#[derive(Debug)]
pub struct Launcher {
    socket: OwnedFd,
    exited: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long a dropped [`Launcher`] waits for its process to exit.
const EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Launcher {
    fn drop(&mut self) {
        // Our end stays open until the struct is gone: end the connection explicitly.
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let exited = self
            .exited
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = exited.recv_timeout(EXIT_TIMEOUT);
    }
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
        let (exited_tx, exited_rx) = std::sync::mpsc::channel();
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
                        let _ = exited_tx.send(());
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
        Ok(Launcher {
            socket: ours,
            exited: std::sync::Mutex::new(exited_rx),
        })
    }

    /// Has the launcher fork a runner for `bundle` with `config` (the runner's config as
    /// JSON) writing to `outputs`.
    pub fn launch(
        &self,
        bundle: &Path,
        config: &[u8],
        outputs: &Outputs,
    ) -> Result<Launched, LauncherError> {
        let inline = config.len() <= MAX_INLINE;
        let inline_config = if inline { config } else { &[] };
        let mut request = encode_request(bundle.as_os_str().as_bytes(), inline_config)
            .ok_or_else(|| LauncherError::PathTooLong(bundle.to_owned()))?;
        let path_end = request.len() - inline_config.len();
        let send_err = |source| LauncherError::Send {
            bundle: bundle.to_owned(),
            source,
        };
        let (status, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(send_err)?;
        let fds = [
            outputs.stdout.as_fd(),
            outputs.stderr.as_fd(),
            theirs.as_fd(),
        ];
        if !inline {
            write_config(bundle, config).map_err(|e| LauncherError::Config {
                bundle: bundle.to_owned(),
                source: e,
            })?;
        }
        match sys::send_with_fds(self.socket.as_fd(), &request, &fds) {
            // The socket's buffer is smaller than this request: the file takes the config.
            Err(Errno::EMSGSIZE | Errno::ENOBUFS) if inline => {
                write_config(bundle, config).map_err(|e| LauncherError::Config {
                    bundle: bundle.to_owned(),
                    source: e,
                })?;
                request.truncate(path_end);
                sys::send_with_fds(self.socket.as_fd(), &request, &fds).map_err(send_err)?;
            }
            sent => sent.map_err(send_err)?,
        }
        drop(theirs);
        Launched::new(status)
    }

    /// Has the launcher fork a warm runner from `template` (a runner's config as JSON, at
    /// most [`MAX_INLINE`] bytes): it sets up what steps of that shape share, with cgroups
    /// named after `id` (a step id: letters and digits), and waits for its step (see
    /// [`crate::process::run_warm`]). The launcher parses a template once, for as long as
    /// the same one comes (see [`crate::process::WarmTemplate`]).
    pub fn warm(&self, id: &str, template: &[u8]) -> Result<WarmRunner, LauncherError> {
        let send_err = |source| LauncherError::Send {
            bundle: PathBuf::from("(a warm runner)"),
            source,
        };
        if template.len() > MAX_INLINE {
            return Err(send_err(Errno::EMSGSIZE));
        }
        let (go, go_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(send_err)?;
        let (status, status_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(send_err)?;
        // A warm request carries the runner's id where a step's carries its bundle path
        // (its step brings that).
        let request =
            encode_request(id.as_bytes(), template).ok_or_else(|| send_err(Errno::EINVAL))?;
        sys::send_with_fds(
            self.socket.as_fd(),
            &request,
            &[go_theirs.as_fd(), status_theirs.as_fd()],
        )
        .map_err(send_err)?;
        Ok(WarmRunner { go, status })
    }
}

/// A runner the launcher started ahead of its step.
#[derive(Debug)]
pub struct WarmRunner {
    go: OwnedFd,
    status: OwnedFd,
}

impl WarmRunner {
    /// Gives the runner its step: `bundle` and `config` as for [`Launcher::launch`] (the
    /// config inline, at most [`MAX_INLINE`] bytes), writing to `outputs`. An error means
    /// the runner did not get the step (it is gone): another runner must take it. The
    /// runner comes back with the error, to be discarded, unless its status could not be
    /// watched (then it was let go).
    pub fn start(
        self,
        bundle: &Path,
        config: &[u8],
        outputs: &Outputs,
    ) -> Result<Launched, (LauncherError, Option<WarmRunner>)> {
        let send_err = |source| LauncherError::Send {
            bundle: bundle.to_owned(),
            source,
        };
        if config.is_empty() || config.len() > MAX_INLINE {
            return Err((send_err(Errno::EMSGSIZE), Some(self)));
        }
        let Some(request) = encode_request(bundle.as_os_str().as_bytes(), config) else {
            return Err((LauncherError::PathTooLong(bundle.to_owned()), Some(self)));
        };
        if let Err(e) = sys::send_with_fds(
            self.go.as_fd(),
            &request,
            &[outputs.stdout.as_fd(), outputs.stderr.as_fd()],
        ) {
            return Err((send_err(e), Some(self)));
        }
        // Sent: the step runs on it, and its outcome comes on the status socket.
        Launched::new(self.status).map_err(|e| (e, None))
    }

    /// Lets the runner go without a step and waits, at most `timeout`, until the launcher
    /// reaped it (its init killed, its cgroups removed).
    pub fn discard(self, timeout: std::time::Duration) {
        drop(self.go);
        let status = std::os::unix::net::UnixStream::from(self.status);
        if status.set_read_timeout(Some(timeout)).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 512];
        // The launcher closes its end once it reaped the runner; the runner's closes with it.
        while std::time::Instant::now() < deadline {
            match std::io::Read::read(&mut &status, &mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Writes `<bundle>/config.json` (creating the bundle directory), for a config too large
/// to send.
fn write_config(bundle: &Path, config: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o711).create(bundle) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::write(bundle.join("config.json"), config)
}

/// A runner the launcher started: its pidfd once it arrived, and what it reported.
#[derive(Debug)]
pub struct Launched {
    status: tokio::net::UnixStream,
    pidfd: Option<OwnedFd>,
    /// Bytes of frames not complete yet.
    received: Vec<u8>,
    result: Option<Vec<u8>>,
    wait_status: Option<String>,
    /// A warm runner took its step (`t`).
    taken: bool,
}

impl Launched {
    fn new(status: OwnedFd) -> Result<Launched, LauncherError> {
        let status = std::os::unix::net::UnixStream::from(status);
        status
            .set_nonblocking(true)
            .map_err(LauncherError::Status)?;
        let status = tokio::net::UnixStream::from_std(status).map_err(LauncherError::Status)?;
        Ok(Launched {
            status,
            pidfd: None,
            received: Vec::new(),
            result: None,
            wait_status: None,
            taken: false,
        })
    }

    /// Reads what arrives; `Ok(false)` once the runner's outcome is in or the status
    /// socket closed (the runner was reaped without one). Cancel-safe: a read either
    /// happened or did not.
    pub async fn next(&mut self) -> Result<bool, LauncherError> {
        if self.result.is_some() {
            return Ok(false);
        }
        let mut buf = [0u8; 4096];
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
                    if let Some(pidfd) = fds.into_iter().next() {
                        self.pidfd = Some(pidfd);
                    }
                    self.received.extend_from_slice(&buf[..n]);
                    self.parse_frames()?;
                    return Ok(self.result.is_none());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(LauncherError::Status(e)),
            }
        }
    }

    fn parse_frames(&mut self) -> Result<(), LauncherError> {
        loop {
            match self.received.first() {
                None => return Ok(()),
                Some(b'p') => {
                    self.received.drain(..1);
                }
                Some(b't') => {
                    self.taken = true;
                    self.received.drain(..1);
                }
                Some(&tag @ (b'r' | b's')) => {
                    let Some(header) = self.received.get(1..5) else {
                        return Ok(());
                    };
                    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                    let end = 5 + len as usize;
                    if self.received.len() < end {
                        return Ok(());
                    }
                    let body: Vec<u8> = self.received.drain(..end).skip(5).collect();
                    if tag == b'r' {
                        self.result = Some(body);
                    } else {
                        self.wait_status = Some(String::from_utf8_lossy(&body).into_owned());
                    }
                }
                Some(other) => {
                    return Err(LauncherError::Status(std::io::Error::other(format!(
                        "unexpected frame {other:#x} from the launcher"
                    ))));
                }
            }
        }
    }

    /// Whether a warm runner took its step: one that ended without a `t` never started
    /// it.
    pub fn taken(&self) -> bool {
        self.taken
    }

    /// The runner's outcome ([`crate::process::outcome_json`]), once it arrived.
    pub fn result(&self) -> Option<&[u8]> {
        self.result.as_deref()
    }

    /// Signals the runner; `false` while its pidfd has not arrived yet (or it is gone).
    pub fn signal(&self, signal: Signal) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|pidfd| sys::pidfd_send_signal(pidfd.as_fd(), signal).is_ok())
    }

    /// How the runner ended as the launcher saw it, once [`Launched::next`] returned
    /// `false` without a result.
    pub fn wait_status(&self) -> String {
        self.wait_status
            .clone()
            .unwrap_or_else(|| "the launcher ended before the runner".to_owned())
    }
}

/// A frame of the status socket: `tag`, a little-endian `u32` length, `body`.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body[..len as usize]);
    out
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
    // The last warm runners' template, parsed: kiln starts every warm runner of a build's
    // steps from the same one.
    let mut template: Option<WarmTemplate> = None;
    let mut open = true;
    let mut buf = vec![0u8; MAX_REQUEST];
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
        match sys::recv_with_fds(socket.as_fd(), &mut buf) {
            Ok((0, _)) => open = false,
            Ok((n, fds)) => {
                let Some((bundle, config)) = parse_request(&buf[..n]) else {
                    // Not a request kiln sends: ignore it (its descriptors close).
                    continue;
                };
                // A step's request brings its output and status socket; a warm runner's,
                // its go and status sockets (and its template inline).
                let mut fds = fds.into_iter();
                let (Some(first), Some(second), third, None) =
                    (fds.next(), fds.next(), fds.next(), fds.next())
                else {
                    continue;
                };
                let (status, request) = match third {
                    Some(status) => (
                        status,
                        Request::Step {
                            stdout: first,
                            stderr: second,
                        },
                    ),
                    None => match config {
                        Some(bytes) => {
                            if !template.as_ref().is_some_and(|t| t.is_from(bytes)) {
                                template = None;
                            }
                            let template = template.get_or_insert_with(|| WarmTemplate::new(bytes));
                            (
                                second,
                                Request::Warm {
                                    go: first,
                                    template,
                                },
                            )
                        }
                        None => continue,
                    },
                };
                match sys::fork() {
                    Ok(Forked::Child) => {
                        let runner = Runner {
                            bundle: &bundle,
                            config,
                            launcher,
                            mask: &previous,
                        };
                        match request {
                            Request::Step { stdout, stderr } => {
                                become_runner(&runner, &stdout, &stderr, status)
                            }
                            Request::Warm { go, template } => {
                                become_warm_runner(&runner, template, &go, status)
                            }
                        }
                    }
                    Ok(Forked::Parent { child, .. }) => {
                        if let Ok(pidfd) = sys::pidfd_open(child) {
                            let _ = sys::send_with_fds(status.as_fd(), b"p", &[pidfd.as_fd()]);
                        }
                        running.insert(child, status);
                    }
                    Err(e) => {
                        let text = frame(b's', format!("fork: {e}").as_bytes());
                        let _ = sys::send_with_fds(status.as_fd(), &text, &[]);
                    }
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(_) => open = false,
        }
    }
}

/// A request: a little-endian `u32` length, `path` (a bundle path, or a warm runner's id),
/// then `config` inline (empty: in `<bundle>/config.json`). `None`: `path` is empty or
/// leaves no room for an inline config.
fn encode_request(path: &[u8], config: &[u8]) -> Option<Vec<u8>> {
    let path_len = u32::try_from(path.len())
        .ok()
        .filter(|n| *n > 0 && (*n as usize) < MAX_REQUEST - MAX_INLINE)?;
    let mut request = Vec::with_capacity(4 + path.len() + config.len());
    request.extend_from_slice(&path_len.to_le_bytes());
    request.extend_from_slice(path);
    request.extend_from_slice(config);
    Some(request)
}

/// A request's bundle path and inline config (`None`: in `<bundle>/config.json`).
pub(crate) fn parse_request(request: &[u8]) -> Option<(PathBuf, Option<&[u8]>)> {
    let len = u32::from_le_bytes(request.get(..4)?.try_into().ok()?) as usize;
    let path = request.get(4..4usize.checked_add(len)?)?;
    let config = &request[4 + len..];
    let bundle = PathBuf::from(OsString::from_vec(path.to_vec()));
    Some((bundle, (!config.is_empty()).then_some(config)))
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
            // kiln may have stopped listening (the runner's outcome came first).
            let _ = sys::send_with_fds(status.as_fd(), &frame(b's', text.as_bytes()), &[]);
        }
    }
}

/// What kiln asks the launcher for.
enum Request<'a> {
    /// A runner for a step, writing to the step's output.
    Step { stdout: OwnedFd, stderr: OwnedFd },
    /// A runner started ahead from `template` that waits on `go` for its step.
    Warm {
        go: OwnedFd,
        template: &'a WarmTemplate,
    },
}

/// What a forked runner is to run.
struct Runner<'a> {
    bundle: &'a Path,
    config: Option<&'a [u8]>,
    launcher: Pid,
    mask: &'a SigSet,
}

/// The forked child: the step's runner, with the step's output as its stdout and stderr,
/// its status socket, and no other descriptor of the launcher's.
fn become_runner(runner: &Runner<'_>, stdout: &OwnedFd, stderr: &OwnedFd, status: OwnedFd) -> ! {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(runner.mask), None);
    // dup2 onto 1 and 2 leaves them open across the step's exec (no close-on-exec flag).
    if nix::unistd::dup2_stdout(stdout).is_err() || nix::unistd::dup2_stderr(stderr).is_err() {
        sys::exit_immediately(1);
    }
    detach(runner, &[status.as_raw_fd()]);
    let (outcome, cgroups) = crate::process::run_config(runner.config, runner.bundle);
    report_and_exit(&outcome, &status, cgroups)
}

/// What every forked runner does first: closes the launcher's descriptors but `keep`
/// (other steps' status sockets must not stay open here: kiln waits for them to close;
/// nor the launcher's socket — their Rust owners in the launcher's frames are never
/// dropped, this process exits from its caller) and dies with the launcher, so its step
/// does not outlive it. Exits on failure.
fn detach(runner: &Runner<'_>, keep: &[std::os::fd::RawFd]) {
    if sys::close_fds_except_these(3, keep).is_err()
        || sys::die_with_parent(runner.launcher, Signal::SIGTERM).is_err()
    {
        sys::exit_immediately(1);
    }
}

/// The forked child of a warm request (its id where a step's request has the bundle path):
/// sets itself up as [`become_runner`] does, but without the step's output (its step
/// brings it), then runs [`crate::process::run_warm_config`] with the template the
/// launcher parsed. Exits without a report when it was let go.
fn become_warm_runner(
    runner: &Runner<'_>,
    template: &WarmTemplate,
    go: &OwnedFd,
    status: OwnedFd,
) -> ! {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(runner.mask), None);
    detach(runner, &[go.as_raw_fd(), status.as_raw_fd()]);
    let taken = || {
        let _ = sys::send_with_fds(status.as_fd(), b"t", &[]);
    };
    let id = runner.bundle.to_string_lossy();
    match crate::process::run_warm_config(template, &id, go, taken) {
        Some((outcome, cgroups)) => report_and_exit(&outcome, &status, cgroups),
        None => std::process::exit(0),
    }
}

/// Ends the step's output (so kiln's readers see its end without waiting for this process
/// to exit), sends the outcome, removes the step's cgroups (emptied and measured: kiln
/// goes on meanwhile, their `rmdir`s are off its path) and exits.
fn report_and_exit(outcome: &str, status: &OwnedFd, cgroups: crate::cgroup::Placement) -> ! {
    if let Ok(devnull) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        let _ = nix::unistd::dup2_stdout(&devnull);
        let _ = nix::unistd::dup2_stderr(&devnull);
    }
    let reported = sys::send_with_fds(status.as_fd(), &frame(b'r', outcome.as_bytes()), &[]);
    // The launcher's death (kiln's end) must not cut the removal short: it is brief, the
    // step's processes are gone.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None);
    drop(cgroups);
    std::process::exit(i32::from(reported.is_err()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_decodes_to_what_was_encoded() {
        let request = encode_request(b"/state/bundles/s1", b"{\"a\":1}").expect("encodes");
        let (bundle, config) = parse_request(&request).expect("decodes");
        assert_eq!(bundle, Path::new("/state/bundles/s1"));
        assert_eq!(config, Some(&b"{\"a\":1}"[..]));

        let request = encode_request(b"/state/bundles/s2", b"").expect("encodes");
        let (bundle, config) = parse_request(&request).expect("decodes");
        assert_eq!(bundle, Path::new("/state/bundles/s2"));
        assert_eq!(config, None);
    }

    #[test]
    fn a_path_without_room_for_its_config_is_refused() {
        assert!(encode_request(b"", b"{}").is_none());
        assert!(encode_request(&vec![b'a'; MAX_REQUEST - MAX_INLINE], b"{}").is_none());
        assert!(parse_request(&[9, 0, 0, 0, b'a']).is_none());
    }
}
