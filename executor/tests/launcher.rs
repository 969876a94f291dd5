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
        self.run_step(&offline_step(rootfs, script))
    }

    fn run_step(&self, s: &kiln_executor::spec::Step) -> Result<StepResult, ExecError> {
        let request = common::request(&self.executor, self.run_root.path(), s, None)
            .map_err(ExecError::Setup)?;
        self.runtime
            .block_on(self.executor.run(&request, None, CancellationToken::new()))
    }
}

/// A step running `script` without a network (no sandbox network pool in these tests).
fn offline_step(rootfs: &std::path::Path, script: &str) -> kiln_executor::spec::Step {
    let mut s = step(rootfs, script);
    s.network = kiln_executor::spec::Network::None;
    s
}

fn steps_share_one_launcher_and_keep_their_output() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    let mut requests = Vec::new();
    for i in 0..8 {
        let s = offline_step(
            rootfs.path(),
            &format!("sleep 0.{i}; echo out{i}; echo err{i} >&2"),
        );
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

fn a_config_too_large_for_one_message_goes_through_a_file() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    let mut s = offline_step(rootfs.path(), "echo $((${#BIG1} + ${#BIG2} + ${#BIG3}))");
    // Far beyond what one request may carry inline (each below exec's limit of 128 KiB
    // per string).
    for i in 1..=3 {
        s.env.push(format!("BIG{i}={}", "x".repeat(100_000)));
    }
    let result = harness.run_step(&s).map_err(|e| e.to_string())?;
    common::expect_eq("length of BIG", &common::stdout(&result), "300000")?;
    step_directories_left(&harness)
}

fn steps_leave_no_directory_behind() -> Result<(), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    // One step sharing the default hosts file, one with a hosts file of its own.
    harness
        .run(rootfs.path(), "true")
        .map_err(|e| e.to_string())?;
    let mut s = offline_step(rootfs.path(), "cat /etc/hosts");
    s.hostname = "own".into();
    let result = harness.run_step(&s).map_err(|e| e.to_string())?;
    if !common::stdout(&result).contains("localhost own") {
        return Err(format!("hosts of the step: {:?}", common::stdout(&result)));
    }
    step_directories_left(&harness)
}

/// Fails when a step's directory (named by its id: letters and digits) is left in the
/// run root.
fn step_directories_left(harness: &Harness) -> Result<(), String> {
    let left: Vec<String> = std::fs::read_dir(harness.run_root.path())
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| kiln_executor::supervisor::valid_id(name))
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("step directories left: {left:?}"))
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
    large_config_through_a_file => a_config_too_large_for_one_message_goes_through_a_file;
    no_step_directory_left => steps_leave_no_directory_behind;
}
