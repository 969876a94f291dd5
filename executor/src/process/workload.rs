//! The step's command: privileges are set up in runc's order, then `execve`. Any failure is
//! written to the init's error pipe (close-on-exec, so a successful exec says nothing).

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;

use nix::sys::resource::Resource;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Spec};

use crate::{caps, seccomp, sys};

/// Sets the step's privileges and executes its command; never returns.
pub(super) fn exec(spec: &Spec, devnull: BorrowedFd<'_>, errors: OwnedFd) -> ! {
    let Err(message) = prepare_and_exec(spec, devnull);
    let _ = nix::unistd::write(&errors, message.as_bytes());
    sys::exit_immediately(127)
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

fn install(programs: &[seccompiler::BpfProgram]) -> Result<(), String> {
    for program in programs {
        sys::install_seccomp(program).map_err(|e| format!("installing the seccomp filter: {e}"))?;
    }
    Ok(())
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

fn prepare_and_exec(spec: &Spec, devnull: BorrowedFd<'_>) -> Result<Infallible, String> {
    let process = spec.process().as_ref().ok_or("spec has no process")?;
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("unblocking signals: {e}"))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));

    for limit in process.rlimits().iter().flatten() {
        let Some(res) = resource(limit.typ()) else {
            return Err(format!("unsupported rlimit {:?}", limit.typ()));
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
    let filters = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => seccomp::compile(profile).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    if !no_new_privs {
        // Without no_new_privs the filter must go in while CAP_SYS_ADMIN is still held; it
        // allows everything the remaining setup calls.
        install(&filters)?;
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
        install(&filters)?;
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
        ));
    }

    nix::unistd::dup2_stdin(devnull).map_err(|e| format!("stdin: {e}"))?;
    sys::cloexec_fds_from(3).map_err(|e| format!("closing descriptors: {e}"))?;

    let args = process.args().clone().unwrap_or_default();
    let name = args.first().ok_or("spec has no command")?;
    let env = process.env().clone().unwrap_or_default();
    let program = look_path(name, &env)?;
    let argv = args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|e| cstring(e))
        .collect::<Result<Vec<_>, _>>()?;
    match nix::unistd::execve(&program, &argv, &envp) {
        Err(e) => Err(format!("exec {}: {e}", name)),
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
