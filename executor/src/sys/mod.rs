//! The one place in the executor with `unsafe`: raw syscalls that neither `nix` nor the
//! standard library wrap, each behind a safe function, and the [`Sys`] trait through which
//! mount and path logic reaches the kernel (so a recording fake, `recording::RecordingSys`,
//! can stand in for it in unit tests that run without root).
//!
//! Process-level primitives (fork, clone3, pidfds, signals) are free functions: they are
//! exercised by the integration tests, not by the fake.

#[cfg(test)]
pub mod recording;

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// Result of a raw syscall wrapper.
pub type SysResult<T> = Result<T, Errno>;

fn cstring(path: &Path) -> SysResult<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

/// Takes ownership of a file descriptor a syscall just returned.
fn owned_fd(ret: libc::c_long) -> SysResult<OwnedFd> {
    let fd = RawFd::try_from(check(ret)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned `fd` as a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------
// Process control

/// Outcome of [`fork`] and [`clone_into_namespaces`].
#[derive(Debug)]
pub enum Forked {
    Parent { child: Pid, pidfd: Option<OwnedFd> },
    Child,
}

/// `fork(2)`.
///
/// # Caveats
/// Only for single-threaded callers, or when the child does nothing but
/// async-signal-safe work (or relies on glibc's fork handlers, which reset the malloc
/// locks) before exiting or exec'ing.
pub fn fork() -> SysResult<Forked> {
    // SAFETY: callers uphold the documented single-thread contract; the child either
    // continues as the only thread or restricts itself to fork-safe operations.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent { child, pidfd: None }),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// The stack a [`spawn_sharing_memory`] child runs on: its setup before `execve` (rlimits,
/// capabilities, the seccomp filter, a `PATH` search) needs little.
const SHARED_CHILD_STACK: usize = 256 * 1024;

/// Starts `child` in a new process that shares this one's memory until it executes a
/// program or exits (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does), and returns its
/// pid once it has done either. No copy of the address space is made for a child that
/// only prepares an `execve`, nor torn down by that `execve`. Descriptors, the working
/// directory, umask, rlimits, signal dispositions and credentials are the child's own
/// copies, as after `fork`.
///
/// # Caveats
/// Single-threaded callers only. The child runs on a stack of its own but shares the
/// heap and thread-locals with the (suspended) caller: what it allocates stays allocated
/// here, and it must not take values the caller still owns (borrow descriptors, do not
/// move them in). `child` ends in `execve` or `_exit` and must not panic.
pub fn spawn_sharing_memory<F>(child: F) -> SysResult<Pid>
where
    F: FnOnce() -> std::convert::Infallible,
{
    extern "C" fn start<F: FnOnce() -> std::convert::Infallible>(arg: *mut libc::c_void) -> i32 {
        // SAFETY: `arg` is the `Option<F>` of the suspended caller below, alive until this
        // child executes or exits, and taken only here.
        if let Some(child) = unsafe { &mut *arg.cast::<Option<F>>() }.take() {
            #[allow(unreachable_code)] // `child` diverges: Infallible is its proof.
            match child() {}
        }
        exit_immediately(1)
    }
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHARED_CHILD_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // An overflow faults on the lowest page instead of running into other memory.
    // SAFETY: the first page of the mapping just made.
    let guarded = unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) };
    let mut child = Some(child);
    let ret = if guarded == 0 {
        // SAFETY: the stack grows down from the mapping's end, which is 16-byte aligned;
        // CLONE_VFORK suspends this thread until the child executed or exited, so `child`
        // and the stack outlive its use of them; `start` never returns.
        unsafe {
            libc::clone(
                start::<F>,
                stack.cast::<u8>().add(SHARED_CHILD_STACK).cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw mut child).cast(),
            )
        }
    } else {
        -1
    };
    let result = if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(Pid::from_raw(ret))
    };
    // SAFETY: the child no longer runs on this stack (it executed or exited).
    unsafe { libc::munmap(stack, SHARED_CHILD_STACK) };
    result
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), which the libc crate does not export.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks into new namespaces with `clone3(2)` (fork semantics: no shared memory, the child
/// runs on a copy of the caller's stack), returning a pidfd for the child when asked. With
/// `cgroup` (a cgroup v2 directory) the child starts in that cgroup.
///
/// # Caveats
/// Same single-thread contract as [`fork`].
pub fn clone_into_namespaces(
    namespace_flags: u64,
    want_pidfd: bool,
    cgroup: Option<BorrowedFd<'_>>,
) -> SysResult<Forked> {
    let mut pidfd: RawFd = -1;
    let cgroup_fd = cgroup.map(|fd| fd.as_raw_fd());
    let mut args: libc::clone_args = libc::clone_args {
        flags: namespace_flags
            | if want_pidfd {
                libc::CLONE_PIDFD as u64
            } else {
                0
            }
            | if cgroup_fd.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        pidfd: if want_pidfd {
            (&raw mut pidfd) as u64
        } else {
            0
        },
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup_fd.and_then(|fd| u64::try_from(fd).ok()).unwrap_or(0),
    };
    // SAFETY: without CLONE_VM and with a null stack, clone3 behaves like fork: the child
    // gets a private copy of the address space and continues on its copy of this stack.
    // `args` and `pidfd` outlive the call; the size passed is that of the struct.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw mut args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match check(ret)? {
        0 => Ok(Forked::Child),
        pid => {
            let child = Pid::from_raw(i32::try_from(pid).map_err(|_| Errno::ESRCH)?);
            let pidfd = if want_pidfd {
                // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor in `pidfd`.
                Some(unsafe { OwnedFd::from_raw_fd(pidfd) })
            } else {
                None
            };
            Ok(Forked::Parent { child, pidfd })
        }
    }
}

/// `_exit(2)`: ends the process without running destructors or atexit handlers, as a
/// forked child must.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit takes any status and never returns.
    unsafe { libc::_exit(code) }
}

/// Makes the calling process receive `signal` when its parent dies
/// (`PR_SET_PDEATHSIG`), then checks that the parent is still `parent`: a parent that died
/// between the fork and this call would never send it. Errors with `ESRCH` then.
///
/// The kernel clears the setting when the effective or filesystem ids change: call it
/// again after `setresuid`/`setresgid`.
pub fn die_with_parent(parent: Pid, signal: nix::sys::signal::Signal) -> SysResult<()> {
    nix::sys::prctl::set_pdeathsig(signal)?;
    if nix::unistd::getppid() == parent {
        Ok(())
    } else {
        Err(Errno::ESRCH)
    }
}

/// The soft limit of open files this process had before [`raise_open_files_limit`]
/// (`u64::MAX`: never raised), which the processes it spawns get back.
static ORIGINAL_OPEN_FILES: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raises this process's soft limit of open files to its hard limit, as Go programs such
/// as BuildKit's daemon do: a build holds a lock descriptor for each snapshot it uses, and
/// a 1000-vertex graph needs more than the usual soft limit of 1024. The runners and
/// helpers started through [`spawn_tied`] (the launcher, network stacks) get the original
/// soft limit back, so steps keep the limit the user gave kiln.
pub fn raise_open_files_limit() -> SysResult<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let _ =
        ORIGINAL_OPEN_FILES.compare_exchange(u64::MAX, soft, Ordering::SeqCst, Ordering::SeqCst);
    Ok(())
}

/// Grows this process's descriptor table to `slots` entries (within the soft limit of open
/// files) while it is still single-threaded. The kernel grows a table shared by threads
/// only after an RCU grace period (`synchronize_rcu` in `expand_files`), measured at 4 to
/// 14 ms each time here, and a build that opens a lock per snapshot crosses 64, 128, 256,
/// … descriptors with its threads running; a table grown now never has to grow again
/// below `slots`, and costs 8 bytes a slot.
pub fn reserve_descriptor_slots(slots: u64) -> SysResult<()> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let highest = slots.min(soft).saturating_sub(1);
    let Ok(highest) = RawFd::try_from(highest) else {
        return Ok(());
    };
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let high = nix::fcntl::fcntl(&null, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(highest))?;
    nix::unistd::close(high)?;
    Ok(())
}

/// Caps the heaps glibc's malloc keeps at `arenas` (it makes up to eight per core, one per
/// thread that allocates while another holds the lock). kiln's threads mostly wait; their
/// separate heaps only added fragmentation: a 999-vertex cached build peaked at 30.3 MB
/// with the default and 28.2 MB with two arenas, in the same time. Call before threads
/// start; a failure leaves glibc's default.
pub fn limit_malloc_arenas(arenas: i32) {
    // SAFETY: mallopt only sets a parameter of this process's allocator; it is called
    // before any thread exists, so no allocation runs concurrently.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// In a forked child before exec: the soft limit of open files as it was before
/// [`raise_open_files_limit`]. Async-signal-safe (an atomic load and setrlimit).
fn restore_open_files_limit() -> std::io::Result<()> {
    let soft = ORIGINAL_OPEN_FILES.load(Ordering::SeqCst);
    if soft == u64::MAX {
        return Ok(());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = soft.min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts `command` as a helper tied to the calling thread: the descriptors in `inherit`
/// (close-on-exec here) stay open across its exec under the same numbers, it gets SIGKILL
/// when the calling thread ends (`PR_SET_PDEATHSIG`; it refuses to start when that
/// thread is already gone). With `own_group` it gets a process group of its own, so a
/// terminal's ^C reaches only kiln, which then stops the helper itself; without, it shares
/// kiln's group and whatever signals kiln's group.
///
/// # Caveats
/// The parent-death signal follows the *thread* that spawns: call it from a thread that
/// lives as long as the helper should.
pub fn spawn_tied(
    command: &mut std::process::Command,
    inherit: &[RawFd],
    own_group: bool,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let parent = nix::unistd::getpid();
    let inherit = inherit.to_vec();
    // SAFETY: the hook runs in the forked child before exec and makes only the
    // async-signal-safe calls fcntl, getrlimit, setrlimit, prctl, getppid and setpgid, without allocating (the
    // descriptor list was copied before the fork).
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            restore_open_files_limit()?;
            die_with_parent(parent, nix::sys::signal::Signal::SIGKILL)?;
            if own_group && libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    command.spawn()
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: Pid) -> SysResult<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the result is a new descriptor.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })
}

/// `pidfd_send_signal(2)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: nix::sys::signal::Signal) -> SysResult<()> {
    // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// Takes ownership of descriptor `fd`, inherited across exec for this process to own (the
/// launcher's socket): checked to be open, and marked close-on-exec.
///
/// # Caveats
/// Call it once per inherited descriptor, at startup, before anything else could own it.
pub fn take_inherited_fd(fd: RawFd) -> SysResult<OwnedFd> {
    if fd < 3 {
        return Err(Errno::EBADF);
    }
    // SAFETY: fcntl on an integer descriptor only reads and sets its flags.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }.into())?;
    // SAFETY: the descriptor is open (fcntl succeeded), and by this function's contract it
    // was inherited for this process to own, with no other owner in it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `bytes` with the descriptors `fds` (`SCM_RIGHTS`) on a Unix socket; never raises
/// SIGPIPE (a peer that is gone is `EPIPE`).
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> SysResult<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(bytes)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent == bytes.len() {
        Ok(())
    } else {
        Err(Errno::EMSGSIZE)
    }
}

/// Most descriptors [`recv_with_fds`] takes with one message.
pub const MAX_RECEIVED_FDS: usize = 4;

/// Receives one message into `buf` with up to [`MAX_RECEIVED_FDS`] descriptors
/// (close-on-exec) from a Unix socket: the byte count (0 at the end of a stream) and the
/// descriptors, owned. More descriptors are an `EMSGSIZE` error (the kernel drops them).
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut control = nix::cmsg_space!([RawFd; MAX_RECEIVED_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed `fd` in this process just now, owned by
                // nobody else.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if message.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(Errno::EMSGSIZE);
    }
    Ok((message.bytes, fds))
}

/// Sets every signal's disposition back to the default. `execve` keeps ignored signals
/// ignored, and kiln's processes ignore SIGPIPE (as every Rust program does): a step must
/// start as under runc, where `yes | head -1` ends `yes` with SIGPIPE rather than with
/// an EPIPE error (which `set -o pipefail` turns into a failed step).
pub fn reset_signal_dispositions() {
    /// The kernel's `struct sigaction` (x86-64 and arm64 layout), not glibc's: glibc's
    /// `sigaction` refuses signals 32 and 33, which it keeps for itself and which a parent
    /// may still have left ignored.
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::sighandler_t,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signo in 1..=64 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installs SIG_DFL (no handler code runs in this process) from a valid
        // kernel sigaction; the old action is not asked for; sigsetsize is the kernel's 8.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signo,
                &raw const default,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

/// Closes every descriptor from `first` up (`close_range(2)`).
pub fn close_fds_from(first: u32) -> SysResult<()> {
    // SAFETY: close_range only closes descriptors of this process; callers call it right
    // before exec when no Rust object still uses those descriptors.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) }).map(drop)
}

/// Closes every descriptor from `first` up except `keep`.
pub fn close_fds_except(first: u32, keep: RawFd) -> SysResult<()> {
    let keep = u32::try_from(keep).map_err(|_| Errno::EBADF)?;
    if keep < first {
        return close_fds_from(first);
    }
    if keep > first {
        // SAFETY: as close_fds_from; only descriptors below `keep` are closed here.
        check(unsafe { libc::syscall(libc::SYS_close_range, first, keep - 1, 0) })?;
    }
    close_fds_from(keep + 1)
}

/// Closes every descriptor from `first` up except those in `keep`.
pub fn close_fds_except_these(first: u32, keep: &[RawFd]) -> SysResult<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .map(|fd| u32::try_from(*fd).map_err(|_| Errno::EBADF))
        .collect::<SysResult<_>>()?;
    keep.sort_unstable();
    let mut next = first;
    for fd in keep.into_iter().filter(|fd| *fd >= first) {
        if fd > next {
            // SAFETY: as close_fds_from; only descriptors in [next, fd) are closed here.
            check(unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0) })?;
        }
        next = fd + 1;
    }
    close_fds_from(next)
}

/// Marks every descriptor from `first` up close-on-exec.
pub fn cloexec_fds_from(first: u32) -> SysResult<()> {
    // SAFETY: only changes descriptor flags.
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    })
    .map(drop)
}

/// A received signal with the fields kiln looks at.
#[derive(Clone, Copy, Debug)]
pub struct SignalInfo {
    pub signal: i32,
    /// `SI_USER` (0) when sent with kill(2); `SI_KERNEL` etc. otherwise (e.g. a tty's ^C).
    pub code: i32,
    pub pid: i32,
}

/// `sigwaitinfo(2)` on `set` (which the caller has blocked).
pub fn wait_signal(set: &nix::sys::signal::SigSet) -> SysResult<SignalInfo> {
    // SAFETY: siginfo_t is plain data, valid when zeroed; the kernel fills it in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `set` points to a valid sigset_t and `info` to writable storage.
        let ret = unsafe { libc::sigwaitinfo(set.as_ref(), &raw mut info) };
        if ret >= 0 {
            // SAFETY: si_pid is valid to read for the signals kiln waits for (all are
            // either SIGCHLD or kill/tty-generated); for others it reads as 0.
            let pid = unsafe { info.si_pid() };
            return Ok(SignalInfo {
                signal: ret,
                code: info.si_code,
                pid,
            });
        }
        let errno = Errno::last();
        if errno != Errno::EINTR {
            return Err(errno);
        }
    }
}

/// Brings a network interface up (`SIOCSIFFLAGS` with `IFF_UP`), used for `lo` in a new
/// network namespace.
pub fn set_interface_up(name: &str) -> SysResult<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data, valid when zeroed.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(Errno::EINVAL);
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; SIOCGIFFLAGS fills in the
    // flags union member.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) }.into())?;
    // SAFETY: reading and writing the flags member SIOCGIFFLAGS just filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS reads the flags member.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) }.into())
        .map(drop)
}

/// Installs a compiled seccomp filter on the calling thread without setting
/// `no_new_privs` (the caller holds `CAP_SYS_ADMIN` in its user namespace), so a step's
/// `noNewPrivileges: false` is honoured.
pub fn install_seccomp(program: &[kiln_seccomp::SockFilter]) -> SysResult<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| Errno::E2BIG)?,
        // SockFilter is the kernel's struct sock_filter (repr(C), same fields and order).
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `prog` points to `program`, which outlives the call; the kernel copies it.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const prog,
        )
    })
    .map(drop)
}

// ---------------------------------------------------------------------------------------
// Paths and mounts

/// How [`Sys::openat2`] resolves a path (`RESOLVE_*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolve {
    /// Treat the directory fd as `/`: `..` and absolute symlinks cannot leave it.
    pub in_root: bool,
    /// Refuse `/proc/<pid>/fd`-style magic links.
    pub no_magiclinks: bool,
    /// Refuse every symlink.
    pub no_symlinks: bool,
    /// Refuse crossing into another mount.
    pub no_xdev: bool,
}

impl Resolve {
    /// In-root resolution without magic links: how kiln resolves attacker-controlled paths.
    pub const IN_ROOT: Resolve = Resolve {
        in_root: true,
        no_magiclinks: true,
        no_symlinks: false,
        no_xdev: false,
    };

    /// A single name looked up in a directory already held: no symlink of any kind.
    pub const PLAIN_NAME: Resolve = Resolve {
        in_root: false,
        no_magiclinks: true,
        no_symlinks: true,
        no_xdev: false,
    };

    fn bits(self) -> u64 {
        let mut bits = 0;
        if self.in_root {
            bits |= libc::RESOLVE_IN_ROOT;
        }
        if self.no_magiclinks {
            bits |= libc::RESOLVE_NO_MAGICLINKS;
        }
        if self.no_symlinks {
            bits |= libc::RESOLVE_NO_SYMLINKS;
        }
        if self.no_xdev {
            bits |= libc::RESOLVE_NO_XDEV;
        }
        bits
    }
}

/// Mount attributes for [`Sys::mount_setattr`] and [`Sys::fsmount`] (`MOUNT_ATTR_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountAttrs {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl MountAttrs {
    fn bits(self) -> u64 {
        let mut bits = 0;
        if self.readonly {
            bits |= libc::MOUNT_ATTR_RDONLY;
        }
        if self.nosuid {
            bits |= libc::MOUNT_ATTR_NOSUID;
        }
        if self.nodev {
            bits |= libc::MOUNT_ATTR_NODEV;
        }
        if self.noexec {
            bits |= libc::MOUNT_ATTR_NOEXEC;
        }
        bits
    }

    pub fn is_empty(self) -> bool {
        self.bits() == 0
    }
}

/// The type of file a descriptor refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Regular,
    Symlink,
    CharDevice,
    Other,
}

/// The kernel operations the rootfs and mount logic needs. [`LinuxSys`] is the real one;
/// [`recording::RecordingSys`] records calls for unit tests.
pub trait Sys: std::fmt::Debug {
    /// `openat2(2)`.
    fn openat2(
        &self,
        dir: BorrowedFd<'_>,
        path: &Path,
        flags: OFlag,
        mode: Mode,
        resolve: Resolve,
    ) -> SysResult<OwnedFd>;
    /// `fstat(2)`, reduced to the file type.
    fn file_kind(&self, fd: BorrowedFd<'_>) -> SysResult<FileKind>;
    /// `mkdirat(2)`.
    fn mkdirat(&self, dir: BorrowedFd<'_>, name: &Path, mode: Mode) -> SysResult<()>;
    /// `readlinkat(2)`.
    fn readlinkat(&self, dir: BorrowedFd<'_>, name: &Path) -> SysResult<std::path::PathBuf>;
    /// `fchownat(2)` of `name` in `dir` without following a final symlink (or of `dir`
    /// itself when `name` is empty).
    fn fchownat(&self, dir: BorrowedFd<'_>, name: &Path, uid: u32, gid: u32) -> SysResult<()>;
    /// `mknodat(2)`.
    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &Path,
        kind: nix::sys::stat::SFlag,
        mode: Mode,
        dev: u64,
    ) -> SysResult<()>;
    /// `symlinkat(2)`.
    fn symlinkat(&self, target: &Path, dir: BorrowedFd<'_>, name: &Path) -> SysResult<()>;
    /// `open_tree(2)` with `OPEN_TREE_CLONE` (+ `AT_RECURSIVE` when `recursive`), of `path`
    /// relative to `dir`, or of `dir` itself when `path` is empty.
    fn clone_tree(&self, dir: BorrowedFd<'_>, path: &Path, recursive: bool) -> SysResult<OwnedFd>;
    /// `move_mount(2)` of a detached tree onto the directory or file `target` refers to.
    fn move_mount_onto(&self, tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> SysResult<()>;
    /// `fsopen(2)` + one `fsconfig(FSCONFIG_SET_STRING|SET_FLAG)` per option + create +
    /// `fsmount(2)` with `attrs`: a new, detached filesystem instance.
    fn new_filesystem(
        &self,
        fstype: &str,
        options: &[(String, Option<String>)],
        attrs: MountAttrs,
    ) -> SysResult<OwnedFd>;
    /// `mount_setattr(2)` on the mount `target` refers to.
    fn mount_setattr(
        &self,
        target: BorrowedFd<'_>,
        recursive: bool,
        set: MountAttrs,
    ) -> SysResult<()>;
    /// Changes propagation of the whole mount tree at `/` to slave.
    fn make_rslave_root(&self) -> SysResult<()>;
    /// `fchdir(2)`, `pivot_root(".", ".")`, `umount2(".", MNT_DETACH)`, `chdir("/")`.
    fn pivot_to(&self, new_root: BorrowedFd<'_>) -> SysResult<()>;
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSys;

impl Sys for LinuxSys {
    fn openat2(
        &self,
        dir: BorrowedFd<'_>,
        path: &Path,
        flags: OFlag,
        mode: Mode,
        resolve: Resolve,
    ) -> SysResult<OwnedFd> {
        let path = cstring(path)?;
        // SAFETY: open_how is plain data, valid when zeroed (it is non-exhaustive in libc).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | OFlag::O_CLOEXEC).bits() as u64;
        how.mode = u64::from(mode.bits());
        how.resolve = resolve.bits();
        loop {
            // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the size given.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir.as_raw_fd(),
                    path.as_ptr(),
                    &raw const how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            match owned_fd(ret) {
                // EAGAIN: a concurrent rename raced the in-root lookup; retry (runc does too).
                Err(Errno::EAGAIN) => continue,
                other => return other,
            }
        }
    }

    fn file_kind(&self, fd: BorrowedFd<'_>) -> SysResult<FileKind> {
        let stat = nix::sys::stat::fstat(fd)?;
        Ok(match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFCHR => FileKind::CharDevice,
            _ => FileKind::Other,
        })
    }

    fn mkdirat(&self, dir: BorrowedFd<'_>, name: &Path, mode: Mode) -> SysResult<()> {
        nix::sys::stat::mkdirat(dir, name, mode)
    }

    fn readlinkat(&self, dir: BorrowedFd<'_>, name: &Path) -> SysResult<std::path::PathBuf> {
        nix::fcntl::readlinkat(dir, name).map(std::path::PathBuf::from)
    }

    fn fchownat(&self, dir: BorrowedFd<'_>, name: &Path, uid: u32, gid: u32) -> SysResult<()> {
        let flag = if name.as_os_str().is_empty() {
            nix::fcntl::AtFlags::AT_EMPTY_PATH | nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW
        } else {
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW
        };
        nix::unistd::fchownat(
            dir,
            name,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            flag,
        )
    }

    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &Path,
        kind: nix::sys::stat::SFlag,
        mode: Mode,
        dev: u64,
    ) -> SysResult<()> {
        nix::sys::stat::mknodat(dir, name, kind, mode, dev)
    }

    fn symlinkat(&self, target: &Path, dir: BorrowedFd<'_>, name: &Path) -> SysResult<()> {
        nix::unistd::symlinkat(target, dir, name)
    }

    fn clone_tree(&self, dir: BorrowedFd<'_>, path: &Path, recursive: bool) -> SysResult<OwnedFd> {
        let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
        if recursive {
            flags |= libc::AT_RECURSIVE as libc::c_uint;
        }
        if path.as_os_str().is_empty() {
            flags |= libc::AT_EMPTY_PATH as libc::c_uint;
        }
        let path = cstring(path)?;
        // SAFETY: valid dirfd, NUL-terminated path, flags only; returns a new descriptor.
        owned_fd(unsafe {
            libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), path.as_ptr(), flags)
        })
    }

    fn move_mount_onto(&self, tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> SysResult<()> {
        let empty = c"";
        // SAFETY: both descriptors are valid; empty paths with the *_EMPTY_PATH flags make
        // the kernel use the descriptors themselves.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                target.as_raw_fd(),
                empty.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
        .map(drop)
    }

    fn new_filesystem(
        &self,
        fstype: &str,
        options: &[(String, Option<String>)],
        attrs: MountAttrs,
    ) -> SysResult<OwnedFd> {
        let fstype = CString::new(fstype).map_err(|_| Errno::EINVAL)?;
        // SAFETY: NUL-terminated filesystem name; returns a new fs-context descriptor.
        let fs = owned_fd(unsafe {
            libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC)
        })?;
        for (key, value) in options {
            let key = CString::new(key.as_str()).map_err(|_| Errno::EINVAL)?;
            match value {
                Some(value) => {
                    let value = CString::new(value.as_str()).map_err(|_| Errno::EINVAL)?;
                    fsconfig(
                        fs.as_raw_fd(),
                        libc::FSCONFIG_SET_STRING,
                        Some(&key),
                        Some(&value),
                    )?;
                }
                None => fsconfig(fs.as_raw_fd(), libc::FSCONFIG_SET_FLAG, Some(&key), None)?,
            }
        }
        fsconfig(fs.as_raw_fd(), libc::FSCONFIG_CMD_CREATE, None, None)?;
        // SAFETY: valid fs-context descriptor, flags and attribute bits only.
        owned_fd(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                libc::FSMOUNT_CLOEXEC,
                attrs.bits(),
            )
        })
    }

    fn mount_setattr(
        &self,
        target: BorrowedFd<'_>,
        recursive: bool,
        set: MountAttrs,
    ) -> SysResult<()> {
        let attr = libc::mount_attr {
            attr_set: set.bits(),
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let mut flags = libc::AT_EMPTY_PATH;
        if recursive {
            flags |= libc::AT_RECURSIVE;
        }
        // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, `attr` of the size given.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                target.as_raw_fd(),
                c"".as_ptr(),
                flags,
                &raw const attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        })
        .map(drop)
    }

    fn make_rslave_root(&self) -> SysResult<()> {
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
            None::<&str>,
        )
    }

    fn pivot_to(&self, new_root: BorrowedFd<'_>) -> SysResult<()> {
        nix::unistd::fchdir(new_root)?;
        // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
        // leaves only the new root (runc's trick: no temporary directory in the rootfs).
        nix::unistd::pivot_root(".", ".")?;
        nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")
    }
}

fn fsconfig(
    fs: RawFd,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> SysResult<()> {
    let key = key.map_or(std::ptr::null(), CStr::as_ptr);
    let value = value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: valid fs-context descriptor; key/value are NUL-terminated or null as the
    // command requires; aux is unused (0).
    check(unsafe { libc::syscall(libc::SYS_fsconfig, fs, cmd, key, value, 0) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (The test harness has other threads; this child only stores and closes, which is
    /// safe there too.)
    #[test]
    fn a_memory_sharing_child_has_run_in_our_memory_when_spawning_returns() {
        let written = std::sync::atomic::AtomicU32::new(0);
        let (ours, theirs) = nix::unistd::pipe().unwrap();
        let child = spawn_sharing_memory(|| {
            written.store(42, Ordering::SeqCst);
            // Its descriptor table is a copy: this closes only its own.
            let _ = nix::unistd::close(theirs.as_raw_fd());
            exit_immediately(7)
        })
        .unwrap();
        // Written in this process's memory, before the call returned (CLONE_VFORK).
        assert_eq!(written.load(Ordering::SeqCst), 42);
        assert_eq!(
            nix::sys::wait::waitpid(child, None).unwrap(),
            nix::sys::wait::WaitStatus::Exited(child, 7)
        );
        nix::unistd::write(&theirs, b"x").expect("our end is still open");
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&ours, &mut buf).unwrap(), 1);
    }

    /// The compact program kiln-seccomp builds for a sandbox step is loaded by the kernel
    /// and decides as Docker's profile does. (No privilege needed: `no_new_privs` first.)
    #[test]
    fn the_kernel_enforces_the_compiled_default_profile() {
        use caps::Capability;
        let profile = kiln_seccomp::default_profile(&[
            Capability::CAP_CHOWN,
            Capability::CAP_SYS_CHROOT,
            Capability::CAP_KILL,
        ]);
        let program = kiln_seccomp::compile(&profile).unwrap();
        // Each probe's return (or -errno), written by the filtered child in our memory.
        let results: [std::sync::atomic::AtomicI64; 7] = Default::default();
        let child = spawn_sharing_memory(|| {
            let install = nix::sys::prctl::set_no_new_privs()
                .map_err(|e| e as i64)
                .and_then(|()| install_seccomp(&program).map_err(|e| e as i64));
            results[0].store(install.err().unwrap_or(0), Ordering::SeqCst);
            let call = |nr: libc::c_long, arg: libc::c_long| {
                // SAFETY: plain syscalls on integer arguments (clone3 with a null
                // argument, refused by the filter or the kernel); nothing is written.
                let ret = unsafe { libc::syscall(nr, arg, 0) };
                if ret < 0 {
                    -(Errno::last_raw() as i64)
                } else {
                    ret
                }
            };
            let probes = [
                (libc::SYS_getppid, 0),
                (libc::SYS_unshare, libc::CLONE_NEWUSER as libc::c_long),
                (libc::SYS_clone3, 0),
                (libc::SYS_personality, 0x1234),
                (libc::SYS_personality, 0xffff_ffff),
                (libc::SYS_keyctl, 0),
            ];
            for (slot, (nr, arg)) in results[1..].iter().zip(probes) {
                slot.store(call(nr, arg), Ordering::SeqCst);
            }
            exit_immediately(0)
        })
        .unwrap();
        nix::sys::wait::waitpid(child, None).unwrap();
        let got: Vec<i64> = results.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        let (eperm, enosys) = (-(libc::EPERM as i64), -(libc::ENOSYS as i64));
        assert_eq!(got[0], 0, "installing the filter");
        assert!(got[1] > 0, "getppid: {}", got[1]);
        assert_eq!(got[2..], [eperm, enosys, eperm, got[5], eperm], "{got:?}");
        assert!(got[5] >= 0, "querying the persona: {}", got[5]);
    }

    fn descriptor_table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn descriptor_slots_are_reserved_within_the_soft_limit() {
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let wanted = 2048u64.min(soft);
        reserve_descriptor_slots(2048).unwrap();
        assert!(
            descriptor_table_size() >= wanted,
            "FDSize {} below {wanted}",
            descriptor_table_size()
        );
        // Beyond the soft limit is no error: the table grows to the limit.
        reserve_descriptor_slots(u64::MAX).unwrap();
    }
}
