//! Running steps in the unpacked busybox image through the real runner binary.

#![allow(dead_code)]

use std::path::Path;

use kiln_executor::hosts::ExtraHost;
use kiln_executor::process::RunnerConfig;
use kiln_executor::spec::{self, Host, Network, Security, Step, StepMount};
use kiln_executor::supervisor::{Executor, RunnerCommand, StepRequest, StepResult};
use kiln_executor::sys::LinuxSys;
use tokio_util::sync::CancellationToken;

pub fn step(rootfs: &Path, script: &str) -> Step {
    Step {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![format!("PATH={}", kiln_proto::DEFAULT_PATH)],
        cwd: "/".into(),
        user: String::new(),
        hostname: String::new(),
        ulimits: Vec::new(),
        cgroup_parent: String::new(),
        extra_hosts: Vec::<ExtraHost>::new(),
        network: Network::Sandbox,
        security: Security::Sandbox,
        rootfs: rootfs.to_owned(),
        readonly_rootfs: false,
        mounts: Vec::<StepMount>::new(),
        no_new_privileges: false,
        limits: kiln_executor::limits::Limits::default(),
    }
}

/// A fresh busybox rootfs in a temporary directory.
pub fn busybox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    kiln_testsupport::unpack_test_image("busybox", dir.path());
    dir
}

pub fn in_user_namespace() -> bool {
    !nix::unistd::Uid::current().is_root()
        || std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !m.contains("4294967295"))
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `step` to completion (or until `cancel` fires) and returns its result.
pub fn run_with(step: &Step, cancel: CancellationToken) -> Result<StepResult, String> {
    run_in_network(step, cancel, None)
}

/// As [`run_with`], joining `network` (a leased sandbox network) for a sandbox step.
pub fn run_in_network(
    step: &Step,
    cancel: CancellationToken,
    network: Option<kiln_executor::network::Attachment>,
) -> Result<StepResult, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let run_root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let executor = executor(run_root.path())?;
    let request = request(&executor, run_root.path(), step, network)?;
    runtime
        .block_on(executor.run(&request, None, cancel))
        .map_err(|e| e.to_string())
}

/// An executor running steps through the `kiln-runner` binary, with its steps' directories
/// in `run_root`.
pub fn executor(run_root: &Path) -> Result<Executor, String> {
    Executor::new(
        RunnerCommand {
            program: env!("CARGO_BIN_EXE_kiln-runner").into(),
            args: Vec::new(),
        },
        run_root,
    )
    .map_err(|e| e.to_string())
}

/// A prepared request to run `step` with `executor` (whose run root is `run_root`).
pub fn request(
    executor: &Executor,
    run_root: &Path,
    step: &Step,
    network: Option<kiln_executor::network::Attachment>,
) -> Result<StepRequest, String> {
    let id = format!(
        "t{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let bundle = executor.prepare_bundle(&id).map_err(|e| e.to_string())?;
    let host = Host {
        in_user_namespace: in_user_namespace(),
        shared_dir: run_root.to_owned(),
        run_dir: bundle,
        id: id.clone(),
        network,
        loopback_network: None,
    };
    let spec = spec::generate(step, &host, &LinuxSys).map_err(|e| e.to_string())?;
    let mut stub_paths = vec!["/etc/resolv.conf".to_owned(), "/etc/hosts".to_owned()];
    stub_paths.extend(step.mounts.iter().map(|m| m.destination.clone()));
    Ok(StepRequest {
        id,
        config: RunnerConfig {
            spec,
            stub_paths,
            stubs_recursive: true,
            real_root: !in_user_namespace(),
            own_cgroups: kiln_executor::cgroup::wanted(
                &step.cgroup_parent,
                step.security == kiln_executor::spec::Security::Insecure,
            ),
            seccomp_cache: None,
            cgroup_registry: None,
            seccomp_of_warm_runner: false,
        },
    })
}

pub type Check = fn() -> Result<(), String>;

/// Writes a check's failure straight to fd 2: libtest captures `eprintln!` in memory,
/// which a forked check process takes with it when it exits.
fn report_failure(e: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "check failed: {e}");
}

pub fn rootful(check: Check) {
    if !kiln_testsupport::require(kiln_testsupport::is_root(), "root") {
        return;
    }
    // Rootful kiln runs in a private mount namespace of its own: do the same.
    let code = match kiln_executor::sys::fork().expect("fork") {
        kiln_executor::sys::Forked::Child => {
            let ok = kiln_executor::userns::enter_private_mount_namespace().is_ok()
                && std::panic::catch_unwind(check)
                    .is_ok_and(|r| r.map_err(|e| report_failure(&e)).is_ok());
            kiln_executor::sys::exit_immediately(i32::from(!ok))
        }
        kiln_executor::sys::Forked::Parent { child, .. } => {
            match nix::sys::wait::waitpid(child, None).expect("wait") {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("check process ended with {other:?}"),
            }
        }
    };
    assert_eq!(code, 0, "check failed as root (see output above)");
}

pub fn rootless(check: Check) {
    if kiln_testsupport::rerun_as_test_user() != kiln_testsupport::AsTestUser::Inner {
        return;
    }
    let code = kiln_executor::userns::run_in_user_namespace(|| match check() {
        Ok(()) => 0,
        Err(e) => {
            report_failure(&e);
            1
        }
    })
    .expect("enter user namespace");
    assert_eq!(code, 0, "check failed rootless (see output above)");
}

#[macro_export]
macro_rules! both_modes {
    ($($name:ident => $check:ident;)*) => {$(
        mod $name {
            #[test]
            fn rootful() {
                $crate::common::rootful(super::$check)
            }
            #[test]
            fn rootless() {
                $crate::common::rootless(super::$check)
            }
        }
    )*};
}

pub fn expect_eq(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got.trim() == want.trim() {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

pub fn output_of(s: &Step) -> Result<String, String> {
    let result = run_with(s, CancellationToken::new())?;
    if result.exit.exit_code != 0 {
        return Err(format!(
            "step exited {}: {}{}",
            result.exit.exit_code,
            stdout(&result),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    Ok(stdout(&result))
}

/// The standard output of `step` run in `network`; an error unless it exits 0.
pub fn output_with_network(
    s: &Step,
    network: Option<kiln_executor::network::Attachment>,
) -> Result<String, String> {
    let result = run_in_network(s, CancellationToken::new(), network)?;
    if result.exit.exit_code != 0 {
        return Err(format!(
            "step exited {}: {}{}",
            result.exit.exit_code,
            stdout(&result),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    Ok(stdout(&result))
}

pub use crate::both_modes;

pub fn run(step: &Step) -> StepResult {
    run_with(step, CancellationToken::new()).unwrap_or_else(|e| panic!("step failed to run: {e}"))
}

pub fn stdout(result: &StepResult) -> String {
    String::from_utf8_lossy(&result.stdout).into_owned()
}
