//! The step launcher: one per executor, forking a runner per step; runners and the
//! launcher killed from outside.

mod common;

use std::time::{Duration, Instant};

use common::{busybox, step};
use kiln_executor::supervisor::{ExecError, Executor, StepResult};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// Processes whose parent is `parent`, with their command lines.
fn children_of(parent: u32) -> Vec<(Pid, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent pid is the second field after the parenthesized command name.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if ppid != parent {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some((Pid::from_raw(pid), cmdline))
        })
        .collect()
}

/// The launchers this process started.
fn launchers() -> Vec<Pid> {
    children_of(std::process::id())
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(kiln_executor::launcher::LAUNCHER_ARG))
        .map(|(pid, _)| pid)
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    run_root: tempfile::TempDir,
    executor: Executor,
}

impl Harness {
    fn new() -> Result<Harness, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let run_root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let executor = common::executor(run_root.path())?;
        Ok(Harness {
            runtime,
            run_root,
            executor,
        })
    }

    fn run(&self, rootfs: &std::path::Path, script: &str) -> Result<StepResult, ExecError> {
        let mut s = step(rootfs, script);
        s.network = kiln_executor::spec::Network::None;
        let request = common::request(&self.executor, self.run_root.path(), &s, None)
            .map_err(ExecError::Setup)?;
        self.runtime
            .block_on(self.executor.run(&request, None, CancellationToken::new()))
    }
}

fn steps_share_one_launcher_and_keep_their_output() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    let mut requests = Vec::new();
    for i in 0..8 {
        let mut s = step(
            rootfs.path(),
            &format!("sleep 0.{i}; echo out{i}; echo err{i} >&2"),
        );
        s.network = kiln_executor::spec::Network::None;
        requests.push(common::request(
            &harness.executor,
            harness.run_root.path(),
            &s,
            None,
        )?);
    }
    let results = harness.runtime.block_on(async {
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let executor = harness.executor.clone();
                tokio::spawn(
                    async move { executor.run(&request, None, CancellationToken::new()).await },
                )
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await);
        }
        results
    });
    for (i, result) in results.into_iter().enumerate() {
        let result = result
            .map_err(|e| format!("step {i}: {e}"))?
            .map_err(|e| format!("step {i}: {e}"))?;
        let out = String::from_utf8_lossy(&result.stdout);
        let err = String::from_utf8_lossy(&result.stderr);
        if result.exit.exit_code != 0
            || out.trim() != format!("out{i}")
            || err.trim() != format!("err{i}")
        {
            return Err(format!(
                "step {i}: exit {:?}, stdout {out:?}, stderr {err:?}",
                result.exit
            ));
        }
    }
    match launchers().len() {
        1 => Ok(()),
        n => Err(format!("{n} launchers for one executor")),
    }
}

fn a_killed_runner_fails_its_step_with_the_signal() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    let marker = format!("{}", 7_000_000 + std::process::id());
    // Start the launcher with a first step, then kill the runner of the second.
    harness
        .run(rootfs.path(), "true")
        .map_err(|e| e.to_string())?;
    let launcher = *launchers().first().ok_or("no launcher")?;
    let watched = marker.clone();
    let killer = std::thread::spawn(move || -> Result<(), String> {
        let mut runner = None;
        wait_for("the runner", || {
            runner = children_of(launcher.as_raw() as u32)
                .first()
                .map(|(pid, _)| *pid);
            runner.is_some() && common_processes_with(&watched) > 0
        })?;
        let runner = runner.ok_or("no runner")?;
        kill(runner, Signal::SIGKILL).map_err(|e| e.to_string())
    });
    let result = harness.run(rootfs.path(), &format!("sleep {marker}"));
    killer.join().map_err(|_| "killer panicked")??;
    match result {
        Err(ExecError::NoResult(status)) if status.contains("signal: 9") => {}
        other => return Err(format!("a killed runner gave {other:?}")),
    }
    // Its step dies with it (the init's parent-death signal).
    wait_for("the step's processes to die", || {
        common_processes_with(&marker) == 0
    })
}

fn a_killed_launcher_is_replaced() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    harness
        .run(rootfs.path(), "true")
        .map_err(|e| e.to_string())?;
    let first = launchers();
    let [launcher] = first.as_slice() else {
        return Err(format!("launchers after one step: {first:?}"));
    };
    kill(*launcher, Signal::SIGKILL).map_err(|e| e.to_string())?;
    // Its thread reaps it.
    wait_for("the killed launcher to be reaped", || {
        !launchers().contains(launcher)
    })?;
    let result = harness
        .run(rootfs.path(), "echo again")
        .map_err(|e| format!("a step after the launcher died: {e}"))?;
    common::expect_eq("output", &common::stdout(&result), "again")?;
    match launchers().as_slice() {
        [next] if next != launcher => Ok(()),
        other => Err(format!("launchers after the restart: {other:?}")),
    }
}

/// Processes (anywhere) whose command line contains `marker`.
fn common_processes_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .count()
}

common::both_modes! {
    one_launcher_per_executor => steps_share_one_launcher_and_keep_their_output;
    killed_runner_fails_the_step => a_killed_runner_fails_its_step_with_the_signal;
    killed_launcher_is_replaced => a_killed_launcher_is_replaced;
}
