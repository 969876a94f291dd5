//! The step's command: privileges are set up in runc's order, then `execve`. Any failure is
//! written to the init's error pipe (close-on-exec, so a successful exec says nothing).

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt as _;

use nix::sys::resource::Resource;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Spec};

use crate::{caps, sys};
use kiln_seccomp::SockFilter;

/// Sets the step's privileges and executes its command; never returns. Runs in a child
/// sharing the init's memory (see [`sys::spawn_sharing_memory`]): it borrows the init's
/// descriptors (its own copies, which it closes) and never unwinds.
pub(super) fn exec(
    spec: &Spec,
    seccomp: &[SockFilter],
    devnull: BorrowedFd<'_>,
    errors: BorrowedFd<'_>,
) -> Infallible {
    // Until execve nothing in the step may open this process's /proc entries: its image is
    // still kiln's (CVE-2019-5736, CVE-2016-9962). execve resets it for the command.
    let _ = nix::sys::prctl::set_dumpable(false);
    let errors = match isolate_descriptors(devnull, errors) {
        Ok(errors) => errors,
        Err(_) => sys::exit_immediately(1),
    };
    let Err(failure) = prepare_and_exec(spec, seccomp);
    let _ = nix::unistd::write(errors, failure.message.as_bytes());
    sys::exit_immediately(failure.code)
}

/// Leaves only stdin (`/dev/null`), stdout, stderr and the error pipe open, so no
/// descriptor of kiln's (the host's root, bundle files) is reachable through
/// `/proc/self/fd` while the step is set up (CVE-2024-21626).
fn isolate_descriptors<'a>(
    devnull: BorrowedFd<'_>,
    errors: BorrowedFd<'a>,
) -> nix::Result<BorrowedFd<'a>> {
    use std::os::fd::AsRawFd as _;
    nix::unistd::dup2_stdin(devnull)?;
    sys::close_fds_except(3, errors.as_raw_fd())?;
    Ok(errors)
}

/// Why the workload did not start; `code` 127 (not found) and 126 (not executable) mark a
/// failed exec, 1 anything before it.
struct Failure {
    message: String,
    code: i32,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, code: 1 }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::from(message.to_owned())
    }
}

fn resource(typ: PosixRlimitType) -> Option<Resource> {
    Some(match typ {
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
    })
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

fn install(filter: &[SockFilter]) -> Result<(), String> {
    if filter.is_empty() {
        return Ok(());
    }
    sys::install_seccomp(filter).map_err(|e| format!("installing the seccomp filter: {e}"))
}

/// Finds `name` like Go's `exec.LookPath` with the step's PATH.
fn look_path(name: &str, env: &[String]) -> Result<CString, String> {
    if name.contains('/') {
        return cstring(name);
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(kiln_proto::DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = std::path::Path::new(dir).join(name);
        let executable = nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
            && std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if executable {
            return CString::new(candidate.as_os_str().as_bytes())
                .map_err(|_| format!("{name:?} contains a NUL byte"));
        }
    }
    Err(format!(
        "exec: \"{name}\": executable file not found in $PATH"
    ))
}

fn prepare_and_exec(spec: &Spec, filter: &[SockFilter]) -> Result<Infallible, Failure> {
    let process = spec.process().as_ref().ok_or("spec has no process")?;
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("unblocking signals: {e}"))?;
    sys::reset_signal_dispositions();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));

    for limit in process.rlimits().iter().flatten() {
        let Some(res) = resource(limit.typ()) else {
            return Err(format!("unsupported rlimit {:?}", limit.typ()).into());
        };
        nix::sys::resource::setrlimit(res, limit.soft(), limit.hard()).map_err(|e| {
            let (_, current_hard) = nix::sys::resource::getrlimit(res).unwrap_or((0, 0));
            format!(
                "setting {:?} to {}:{}: {e} (kiln's own hard limit is {current_hard})",
                limit.typ(),
                limit.soft(),
                limit.hard()
            )
        })?;
    }

    let no_new_privs = process.no_new_privileges().unwrap_or(false);
    if !no_new_privs {
        // Without no_new_privs the filter must go in while CAP_SYS_ADMIN is still held; it
        // allows everything the remaining setup calls.
        install(filter)?;
    }

    let user = process.user();
    let setgroups_allowed =
        std::fs::read_to_string("/proc/self/setgroups").map_or(true, |s| s.trim() != "deny");
    if setgroups_allowed {
        let groups: Vec<Gid> = user
            .additional_gids()
            .iter()
            .flatten()
            .map(|g| Gid::from_raw(*g))
            .collect();
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    }
    let capabilities = process.capabilities().clone().unwrap_or_default();
    caps::apply_bounding(&capabilities).map_err(|e| e.to_string())?;
    nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))?;
    let gid = Gid::from_raw(user.gid());
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid {gid}: {e}"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid {uid}: {e}"))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| format!("keepcaps: {e}"))?;
    caps::apply_process_sets(&capabilities).map_err(|e| e.to_string())?;
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
        install(filter)?;
    }

    let cwd = process.cwd();
    nix::unistd::chdir(cwd.as_path()).map_err(|e| {
        format!(
            "chdir to cwd ({:?}) set in config.json failed: {e}",
            cwd.display()
        )
    })?;
    // A cwd reached through a leaked host descriptor shows as "(unreachable)/…" or fails
    // (CVE-2024-21626).
    let here = nix::unistd::getcwd().map_err(|e| format!("getcwd: {e}"))?;
    if !here.is_absolute() || here.as_os_str().as_bytes().starts_with(b"(unreachable)") {
        return Err(format!(
            "current working directory {} is outside of the container's root",
            here.display()
        )
        .into());
    }

    sys::cloexec_fds_from(3).map_err(|e| format!("closing descriptors: {e}"))?;

    let args = process.args().clone().unwrap_or_default();
    let name = args.first().ok_or("spec has no command")?;
    let env = process.env().clone().unwrap_or_default();
    let program = look_path(name, &env).map_err(|message| Failure { message, code: 127 })?;
    let argv = args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|e| cstring(e))
        .collect::<Result<Vec<_>, _>>()?;
    match nix::unistd::execve(&program, &argv, &envp) {
        Err(e) => Err(Failure {
            message: format!("exec {name}: {}", e.desc()),
            code: if e == nix::Error::ENOENT { 127 } else { 126 },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_path_uses_the_steps_path_and_reports_missing_commands() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_owned()];
        assert!(
            look_path("sh", &env)
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("/sh")
        );
        assert_eq!(look_path("./x", &env).unwrap().to_str().unwrap(), "./x");
        assert_eq!(
            look_path("no-such-command-kiln", &env).unwrap_err(),
            "exec: \"no-such-command-kiln\": executable file not found in $PATH"
        );
    }
}
