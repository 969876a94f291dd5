//! The default seccomp profile of a sandbox step and its compilation to BPF.
//!
//! The profile follows Docker/containerd's default (moby `profiles/seccomp`): an allowlist
//! for the native ABI and its 32-bit siblings (x86_64, x86, x32) with everything else
//! failing with `EPERM`, `clone` refused when it asks for new namespaces, `clone3` failing
//! with `ENOSYS` (its flags live in memory a filter cannot read, and `ENOSYS` makes libc
//! fall back to `clone`), `personality` limited to the usual personas, and `chroot` only
//! when the step holds `CAP_SYS_CHROOT`. It is carried in the OCI spec (so runc accepts the
//! same spec) and compiled with libseccomp, as runc and crun compile it — and then again
//! by [`compact`], whose program (a fifth as long) is installed when it decides every probe
//! as libseccomp's does: the kernel converts and JIT-compiles a filter at every step.
//!
//! libseccomp takes milliseconds to build the filter (a balanced tree over three ABIs),
//! more than a whole step start: [`load_or_compile`] keeps each compiled program in a
//! cache directory keyed by the profile and the library version, so only the first step
//! of a profile pays for it.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use caps::Capability;
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};
use sha2::{Digest as _, Sha256};

mod bpf;
mod compact;

pub use bpf::SockFilter;
use bpf::{MAX_INSNS, decode, encode};

/// Errors from building or compiling a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("invalid seccomp rule for {syscall}: {reason}")]
    Rule { syscall: String, reason: String },
    #[error("unsupported seccomp action {0}")]
    Action(String),
    #[error("unsupported seccomp architecture {0:?}")]
    Arch(Arch),
    #[error("compiling the seccomp filter: {0}")]
    Compile(#[from] libseccomp::error::SeccompError),
    #[error("seccomp program has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
    #[error("seccomp filter cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Syscalls every sandbox step may use.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_setup",
    "io_submit",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socket",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// Personas `personality(2)` may select (Linux, UNAME26, PER_LINUX32, both, query).
const PERSONAS: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// `CLONE_NEWNS | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWCGROUP`.
const NAMESPACE_FLAGS: u64 = 0x7E02_0000;

fn syscall(names: &[&str], action: LinuxSeccompAction, args: Vec<LinuxSeccompArg>) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names.iter().map(|n| (*n).to_owned()).collect())
        .set_action(action);
    if !args.is_empty() {
        s.set_args(Some(args));
    }
    s
}

fn arg(
    index: usize,
    value: u64,
    value_two: Option<u64>,
    op: LinuxSeccompOperator,
) -> LinuxSeccompArg {
    let builder = LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op);
    let builder = match value_two {
        Some(two) => builder.value_two(two),
        None => builder,
    };
    // Every field has a default, so building cannot fail.
    builder.build().unwrap_or_default()
}

/// The default profile for a step holding `caps`.
pub fn default_profile(caps: &[Capability]) -> LinuxSeccomp {
    let allow = LinuxSeccompAction::ScmpActAllow;
    let mut syscalls = vec![syscall(ALLOWED, allow, Vec::new())];
    for persona in PERSONAS {
        syscalls.push(syscall(
            &["personality"],
            allow,
            vec![arg(0, persona, None, LinuxSeccompOperator::ScmpCmpEq)],
        ));
    }
    if caps.contains(&Capability::CAP_SYS_ADMIN) {
        syscalls.push(syscall(
            &["clone", "unshare", "setns", "mount", "umount2"],
            allow,
            Vec::new(),
        ));
    } else {
        let masked = arg(
            0,
            NAMESPACE_FLAGS,
            Some(0),
            LinuxSeccompOperator::ScmpCmpMaskedEq,
        );
        syscalls.push(syscall(&["clone"], allow, vec![masked]));
    }
    if caps.contains(&Capability::CAP_SYS_CHROOT) {
        syscalls.push(syscall(&["chroot"], allow, Vec::new()));
    }
    let mut clone3 = syscall(&["clone3"], LinuxSeccompAction::ScmpActErrno, Vec::new());
    clone3.set_errno_ret(Some(libc::ENOSYS as u32));
    syscalls.push(clone3);

    let mut profile = LinuxSeccomp::default();
    profile
        .set_default_action(LinuxSeccompAction::ScmpActErrno)
        .set_default_errno_ret(Some(libc::EPERM as u32))
        .set_architectures(Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ]))
        .set_syscalls(Some(syscalls));
    profile
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let errno = |default: i32| errno.map_or(default, |e| i32::try_from(e).unwrap_or(default));
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno(libc::EPERM)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(u16::try_from(errno(0)).unwrap_or(0)),
        other => return Err(SeccompError::Action(other.to_string())),
    })
}

fn arch(arch: Arch) -> Result<ScmpArch, SeccompError> {
    Ok(match arch {
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        other => return Err(SeccompError::Arch(other)),
    })
}

fn condition(name: &str, a: &LinuxSeccompArg) -> Result<ScmpArgCompare, SeccompError> {
    let index = u32::try_from(a.index())
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| SeccompError::Rule {
            syscall: name.to_owned(),
            reason: format!("argument index {} out of range", a.index()),
        })?;
    let (op, datum) = match a.op() {
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, a.value()),
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, a.value()),
        // OCI's MASKED_EQ compares (arg & value) with valueTwo, as libseccomp does.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            ScmpCompareOp::MaskedEqual(a.value()),
            a.value_two().unwrap_or(0),
        ),
    };
    Ok(ScmpArgCompare::new(index, op, datum))
}

/// Compiles an OCI profile into one BPF filter: libseccomp's, or the compact program of
/// [`compact`] when that decides every probe as libseccomp's does.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<SockFilter>, SeccompError> {
    let reference = compile_with_libseccomp(profile)?;
    match compact::compile(profile) {
        Some((program, probes))
            if program.len() < reference.len()
                && probes
                    .iter()
                    .all(|p| bpf::evaluate(&program, p) == bpf::evaluate(&reference, p)) =>
        {
            Ok(program)
        }
        _ => Ok(reference),
    }
}

/// Compiles an OCI profile with libseccomp, with runc's rules: syscalls unknown to the
/// library are skipped, and so are rules whose action is the default action (libseccomp
/// refuses them; they change nothing).
fn compile_with_libseccomp(profile: &LinuxSeccomp) -> Result<Vec<SockFilter>, SeccompError> {
    let default_action = action(profile.default_action(), profile.default_errno_ret())?;
    let mut filter = ScmpFilterContext::new(default_action)?;
    // The filter is exported, not loaded: the step installs it itself, without
    // no_new_privs (Docker's semantics; kiln holds CAP_SYS_ADMIN in the step's namespace).
    filter.set_ctl_nnp(false)?;
    // A balanced tree over syscall numbers instead of a linear chain.
    filter.set_ctl_optimize(2)?;
    for a in profile.architectures().iter().flatten() {
        let a = arch(*a)?;
        if a != ScmpArch::native() {
            filter.add_arch(a)?;
        }
    }
    for entry in profile.syscalls().iter().flatten() {
        let act = action(entry.action(), entry.errno_ret())?;
        if act == default_action {
            continue;
        }
        for name in entry.names() {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let conditions = entry
                .args()
                .iter()
                .flatten()
                .map(|a| condition(name, a))
                .collect::<Result<Vec<_>, _>>()?;
            if conditions.is_empty() {
                filter.add_rule(act, syscall)?;
            } else {
                filter.add_rule_conditional(act, syscall, &conditions)?;
            }
        }
    }
    let program = decode(&export(&filter)?);
    if program.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(program)
}

/// The filter's BPF as bytes (libseccomp 2.5 exports only to a file descriptor).
fn export(filter: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let cache_err = |source| SeccompError::Cache {
        path: "(memory)".to_owned(),
        source,
    };
    let mut file = tempfile::tempfile().map_err(cache_err)?;
    filter.export_bpf(&mut file)?;
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(cache_err)?;
    file.read_to_end(&mut bytes).map_err(cache_err)?;
    Ok(bytes)
}

/// The compiled program of `profile`, from `cache_dir` when an earlier step compiled it,
/// else compiled now and stored there (written to a temporary file and renamed, so
/// concurrent steps never read half a program). Without a cache directory it compiles.
pub fn load_or_compile(
    profile: &LinuxSeccomp,
    cache_dir: Option<&Path>,
) -> Result<Vec<SockFilter>, SeccompError> {
    let Some(dir) = cache_dir else {
        return compile(profile);
    };
    let path = dir.join(format!("{}.bpf", cache_key(profile)));
    if let Ok(bytes) = std::fs::read(&path) {
        // Anything else than whole instructions within the kernel's limit is not ours.
        if !bytes.is_empty() && bytes.len() % 8 == 0 && bytes.len() / 8 <= MAX_INSNS {
            return Ok(decode(&bytes));
        }
    }
    let program = compile(profile)?;
    let cache_err = |source| SeccompError::Cache {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(cache_err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(cache_err)?;
    tmp.write_all(&encode(&program)).map_err(cache_err)?;
    tmp.persist(&path).map_err(|e| cache_err(e.error))?;
    Ok(program)
}

/// What a compiled program depends on: the profile and the library that compiled it.
fn cache_key(profile: &LinuxSeccomp) -> String {
    let mut hash = Sha256::new();
    // The compiler's own version: a new one recompiles instead of reusing old programs.
    hash.update("kiln compact 1\n");
    if let Ok(v) = libseccomp::ScmpVersion::current() {
        hash.update(format!("libseccomp {}.{}.{}\n", v.major, v.minor, v.micro));
    }
    hash.update(serde_json::to_vec(profile).unwrap_or_default());
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the profile depends on of a sandbox step's capabilities (BuildKit's default
    /// set): CAP_SYS_CHROOT held, CAP_SYS_ADMIN not.
    const SANDBOX_CAPS: [Capability; 3] = [
        Capability::CAP_CHOWN,
        Capability::CAP_SYS_CHROOT,
        Capability::CAP_KILL,
    ];

    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const RET_ALLOW: u32 = 0x7fff_0000;

    fn ret_errno(errno: i32) -> u32 {
        0x0005_0000 | (errno as u32 & 0xffff)
    }

    fn evaluate(filter: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        bpf::evaluate(filter, &bpf::SeccompData { nr, arch, args })
    }

    fn nr(name: &str) -> u32 {
        u32::try_from(ScmpSyscall::from_name(name).unwrap().as_raw_syscall()).unwrap()
    }

    fn nr_on(name: &str, arch: ScmpArch) -> u32 {
        u32::try_from(
            ScmpSyscall::from_name_by_arch(name, arch)
                .unwrap()
                .as_raw_syscall(),
        )
        .unwrap()
    }

    #[test]
    fn default_profile_behaves_like_dockers() {
        let profile = default_profile(&SANDBOX_CAPS);
        let filter = compile(&profile).unwrap();
        let eval =
            |name: &str, args: [u64; 6]| evaluate(&filter, AUDIT_ARCH_X86_64, nr(name), args);
        let eperm = ret_errno(libc::EPERM);
        assert_eq!(eval("read", [0; 6]), RET_ALLOW);
        assert_eq!(eval("chroot", [0; 6]), RET_ALLOW);
        assert_eq!(eval("unshare", [0; 6]), eperm);
        assert_eq!(eval("keyctl", [0; 6]), eperm);
        assert_eq!(eval("clone3", [0; 6]), ret_errno(libc::ENOSYS));
        // clone: plain fork-like flags pass, namespace flags do not.
        assert_eq!(eval("clone", [0x0120_0011, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            eval("clone", [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(eval("personality", [0x8, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval("personality", [0x1234, 0, 0, 0, 0, 0]), eperm);
        // The 32-bit ABIs get the same allowlist, as under Docker: i386 entry points and
        // x32 numbers are filtered by their own names.
        let i386 =
            |name: &str| evaluate(&filter, AUDIT_ARCH_I386, nr_on(name, ScmpArch::X86), [0; 6]);
        assert_eq!(i386("read"), RET_ALLOW);
        assert_eq!(i386("unshare"), eperm);
        let x32 = |name: &str| {
            evaluate(
                &filter,
                AUDIT_ARCH_X86_64,
                nr_on(name, ScmpArch::X32),
                [0; 6],
            )
        };
        assert_eq!(x32("read"), RET_ALLOW);
        assert_eq!(x32("unshare"), eperm);
        // Another architecture's calls never reach the allowlist.
        assert_ne!(
            evaluate(&filter, 0xc000_00b7, nr("read"), [0; 6]),
            RET_ALLOW
        );
        assert!(filter.len() < MAX_INSNS);
    }

    #[test]
    fn namespace_syscalls_are_not_allowed_without_sys_admin() {
        let profile = default_profile(&SANDBOX_CAPS);
        let names: Vec<&String> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|s| s.names())
            .collect();
        for denied in [
            "unshare", "setns", "mount", "keyctl", "add_key", "bpf", "clone3",
        ] {
            assert!(
                !names.iter().any(|n| *n == denied),
                "{denied} must not be allowed"
            );
        }
        assert!(names.iter().any(|n| *n == "chroot"));
    }

    #[test]
    fn every_allowed_name_is_known_to_libseccomp() {
        for name in ALLOWED {
            assert!(ScmpSyscall::from_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn the_cache_returns_what_was_compiled_and_ignores_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let profile = default_profile(&SANDBOX_CAPS);
        let fresh = compile(&profile).unwrap();
        assert_eq!(load_or_compile(&profile, Some(dir.path())).unwrap(), fresh);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1);
        let path = files[0].as_ref().unwrap().path();
        assert_eq!(load_or_compile(&profile, Some(dir.path())).unwrap(), fresh);
        // A truncated file is recompiled and replaced.
        std::fs::write(&path, [0u8; 5]).unwrap();
        assert_eq!(load_or_compile(&profile, Some(dir.path())).unwrap(), fresh);
        assert_eq!(std::fs::read(&path).unwrap().len(), fresh.len() * 8);
        // Another profile has another file.
        let admin = default_profile(&[Capability::CAP_SYS_ADMIN]);
        assert_ne!(load_or_compile(&admin, Some(dir.path())).unwrap(), fresh);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn the_default_profiles_compile_compact_and_decide_as_libseccomp() {
        for caps in [&SANDBOX_CAPS[..], &[Capability::CAP_SYS_ADMIN], &[]] {
            let profile = default_profile(caps);
            let (compact, reference) = compact_and_reference(&profile, &format!("{caps:?}"));
            assert_eq!(compile(&profile).unwrap(), compact);
            // What the kernel converts and compiles at every step: under a third.
            assert!(
                compact.len() * 3 < reference.len(),
                "{} instructions, libseccomp's {}",
                compact.len(),
                reference.len()
            );
        }
    }

    /// The compact program of `profile` (which it must model) and libseccomp's, after
    /// what `compile` checks before it keeps the compact one, as an assertion: every probe
    /// decided alike.
    fn compact_and_reference(
        profile: &LinuxSeccomp,
        context: &str,
    ) -> (Vec<SockFilter>, Vec<SockFilter>) {
        let reference = compile_with_libseccomp(profile).unwrap();
        let (compact, probes) = compact::compile(profile).expect("a profile it models");
        for p in &probes {
            let (ours, theirs) = (bpf::evaluate(&compact, p), bpf::evaluate(&reference, p));
            assert_eq!(ours, theirs, "{context}: {p:x?}");
        }
        (compact, reference)
    }

    /// Beyond the probes `compile` checks: every number of every ABI (and past them) with
    /// arguments drawn at random, the two programs decide alike.
    fn assert_same_decisions(compact: &[SockFilter], reference: &[SockFilter]) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, 0xc000_00b7] {
            for base in [0, 0x4000_0000, 0x8000_0000] {
                for nr in base..base + 1200 {
                    for _ in 0..4 {
                        // Small, 32-bit and 64-bit values alike.
                        let mut args = [0u64; 6];
                        for a in &mut args {
                            *a = random() >> (random() % 64);
                        }
                        let (ours, theirs) = (
                            evaluate(compact, arch, nr, args),
                            evaluate(reference, arch, nr, args),
                        );
                        assert_eq!(ours, theirs, "arch {arch:#x} nr {nr:#x} args {args:x?}");
                    }
                }
            }
        }
    }

    #[test]
    fn compact_programs_decide_as_libseccomp_on_random_arguments() {
        for caps in [&SANDBOX_CAPS[..], &[Capability::CAP_SYS_ADMIN]] {
            let profile = default_profile(caps);
            let compact = compile(&profile).unwrap();
            assert_same_decisions(&compact, &compile_with_libseccomp(&profile).unwrap());
        }
    }

    #[test]
    fn every_comparison_and_action_of_a_custom_profile_compiles_compact() {
        let allow = LinuxSeccompAction::ScmpActAllow;
        let mut trace = syscall(&["ptrace"], LinuxSeccompAction::ScmpActTrace, Vec::new());
        trace.set_errno_ret(Some(7));
        let syscalls = vec![
            syscall(
                &["read", "write", "exit_group", "socket", "msgget"],
                allow,
                Vec::new(),
            ),
            syscall(
                &["openat"],
                allow,
                vec![arg(
                    2,
                    0o100,
                    Some(0),
                    LinuxSeccompOperator::ScmpCmpMaskedEq,
                )],
            ),
            syscall(
                &["mmap"],
                allow,
                vec![arg(1, 1 << 33, None, LinuxSeccompOperator::ScmpCmpLt)],
            ),
            syscall(
                &["mmap"],
                allow,
                vec![arg(3, 0x22, None, LinuxSeccompOperator::ScmpCmpEq)],
            ),
            syscall(
                &["kill"],
                allow,
                vec![
                    arg(0, 1, None, LinuxSeccompOperator::ScmpCmpGt),
                    arg(1, 9, None, LinuxSeccompOperator::ScmpCmpNe),
                ],
            ),
            syscall(
                &["lseek"],
                allow,
                vec![arg(2, 2, None, LinuxSeccompOperator::ScmpCmpLe)],
            ),
            syscall(
                &["fcntl"],
                allow,
                vec![arg(1, 0x4_0000_0000, None, LinuxSeccompOperator::ScmpCmpGe)],
            ),
            syscall(&["uname"], LinuxSeccompAction::ScmpActLog, Vec::new()),
            syscall(
                &["reboot"],
                LinuxSeccompAction::ScmpActKillProcess,
                Vec::new(),
            ),
            syscall(&["getpid"], LinuxSeccompAction::ScmpActTrap, Vec::new()),
            trace,
        ];
        // The default profile's ABIs and default action, with another errno and rules.
        let mut profile = default_profile(&[]);
        profile
            .set_default_errno_ret(Some(libc::EACCES as u32))
            .set_syscalls(Some(syscalls));
        let (compact, reference) = compact_and_reference(&profile, "custom profile");
        assert_same_decisions(&compact, &reference);
        // x86's socket() is allowed directly and through socketcall(SYS_SOCKET, ...) only.
        let socketcall = |call| evaluate(&compact, AUDIT_ARCH_I386, 102, [call, 0, 0, 0, 0, 0]);
        assert_eq!(socketcall(1), RET_ALLOW);
        assert_eq!(socketcall(2), ret_errno(libc::EACCES));
    }

    /// Without x32 (or x86) in the profile, their calls are a foreign architecture's.
    #[test]
    fn profiles_of_fewer_abis_compile_compact() {
        for arches in [
            vec![Arch::ScmpArchX86_64],
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86],
        ] {
            let mut profile = default_profile(&SANDBOX_CAPS);
            profile.set_architectures(Some(arches.clone()));
            let (compact, reference) = compact_and_reference(&profile, &format!("{arches:?}"));
            assert_same_decisions(&compact, &reference);
            assert_eq!(compile(&profile).unwrap(), compact);
        }
    }

    #[test]
    fn profiles_outside_the_compact_model_keep_libseccomps_program() {
        let personality = |action, persona| {
            syscall(
                &["personality"],
                action,
                vec![arg(0, persona, None, LinuxSeccompOperator::ScmpCmpEq)],
            )
        };
        // Two actions on one syscall: libseccomp's precedence decides.
        let mut two_actions = default_profile(&SANDBOX_CAPS);
        let mut syscalls = two_actions.syscalls().clone().unwrap_or_default();
        syscalls.push(personality(LinuxSeccompAction::ScmpActKillProcess, 0x1234));
        two_actions.set_syscalls(Some(syscalls));
        // An architecture the compact compiler does not lay out.
        let mut arm = default_profile(&SANDBOX_CAPS);
        arm.set_architectures(Some(vec![Arch::ScmpArchX86_64, Arch::ScmpArchAarch64]));
        for profile in [two_actions, arm] {
            assert!(compact::compile(&profile).is_none());
            assert_eq!(
                compile(&profile).unwrap(),
                compile_with_libseccomp(&profile).unwrap()
            );
        }
    }
}
