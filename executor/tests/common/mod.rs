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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let run_root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let executor = Executor::new(
        RunnerCommand {
            program: env!("CARGO_BIN_EXE_kiln-runner").into(),
            args: Vec::new(),
        },
        run_root.path(),
    )
    .map_err(|e| e.to_string())?;
    let id = format!(
        "t{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let bundle = executor.prepare_bundle(&id).map_err(|e| e.to_string())?;
    let host = Host {
        in_user_namespace: in_user_namespace(),
        run_dir: bundle,
        id: id.clone(),
    };
    let spec = spec::generate(step, &host, &LinuxSys).map_err(|e| e.to_string())?;
    let mut stub_paths = vec!["/etc/resolv.conf".to_owned(), "/etc/hosts".to_owned()];
    stub_paths.extend(step.mounts.iter().map(|m| m.destination.clone()));
    let request = StepRequest {
        id,
        config: RunnerConfig {
            spec,
            stub_paths,
            stubs_recursive: true,
            real_root: !in_user_namespace(),
        },
    };
    runtime
        .block_on(executor.run(&request, None, cancel))
        .map_err(|e| e.to_string())
}

pub fn run(step: &Step) -> StepResult {
    run_with(step, CancellationToken::new()).unwrap_or_else(|e| panic!("step failed to run: {e}"))
}

pub fn stdout(result: &StepResult) -> String {
    String::from_utf8_lossy(&result.stdout).into_owned()
}
