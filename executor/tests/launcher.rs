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
    // A rootfs each, as every step has a snapshot of its own: steps sharing one would race
    // on the mount points they make and remove there.
    let rootfs: Vec<_> = (0..8).map(|_| busybox()).collect();
    let mut requests = Vec::new();
    for (i, rootfs) in rootfs.iter().enumerate() {
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
    pids_with(marker).len()
}

fn pids_with(marker: &str) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok().map(Pid::from_raw))
        .collect()
}

/// The parent of `pid`, as seen from here.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: i32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(Pid::from_raw(ppid))
}

/// The runner (a child of `launcher`) of the step whose process has `marker` in its command
/// line, once that process runs.
fn runner_of(launcher: Pid, marker: &str) -> Result<Pid, String> {
    let mut runner = None;
    wait_for("the step's process", || {
        runner = pids_with(marker).into_iter().find_map(|mut pid| {
            // The process, its shell, the step's init, the runner.
            for _ in 0..4 {
                let parent = parent_of(pid)?;
                if parent == launcher {
                    return Some(pid);
                }
                pid = parent;
            }
            None
        });
        runner.is_some()
    })?;
    runner.ok_or_else(|| "no runner".to_owned())
}

/// The one runner `launcher` keeps started ahead between steps: its only child, with its
/// init waiting (a runner that reported its step may still be removing its cgroups, its
/// init reaped, when the launcher has not forked the next one yet).
fn warm_runner(launcher: Pid) -> Result<Pid, String> {
    let mut runners = Vec::new();
    wait_for("a runner started ahead", || {
        runners = children_of(launcher.as_raw() as u32);
        runners.len() == 1 && children_of(runners[0].0.as_raw() as u32).len() == 1
    })
    .map_err(|e| format!("{e}: the launcher's children are {runners:?}"))?;
    Ok(runners[0].0)
}

/// Runs `s` on the harness from another thread; returns what it printed once done.
fn run_in_thread(
    harness: &std::sync::Arc<Harness>,
    s: kiln_executor::spec::Step,
) -> std::thread::JoinHandle<Result<String, String>> {
    let harness = std::sync::Arc::clone(harness);
    std::thread::spawn(move || {
        let result = harness.run_step(&s).map_err(|e| e.to_string())?;
        if result.exit.exit_code != 0 {
            return Err(format!(
                "step failed: {:?} {:?}",
                result.exit, result.stderr
            ));
        }
        Ok(common::stdout(&result))
    })
}

/// Runs `s`, whose script starts with `sleep {marker}`, checks that the runner started
/// ahead (`warm`, of `launcher`) took it, and returns its output.
fn run_on_warm_runner(
    harness: &std::sync::Arc<Harness>,
    (launcher, warm): (Pid, Pid),
    s: kiln_executor::spec::Step,
    marker: &str,
) -> Result<String, String> {
    let running = run_in_thread(harness, s);
    let runner = runner_of(launcher, marker)?;
    let out = running.join().map_err(|_| "the step's thread panicked")??;
    if runner != warm {
        return Err(format!(
            "the step ran on runner {runner}, not on {warm} started ahead"
        ));
    }
    Ok(out)
}

/// The network namespace of `pid` (`net:[inode]`).
fn netns_of(pid: &str) -> Result<String, String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|l| l.to_string_lossy().into_owned())
        .map_err(|e| e.to_string())
}

fn the_next_step_runs_on_a_runner_started_ahead_with_its_own_spec() -> Result<(), String> {
    let harness = std::sync::Arc::new(Harness::new()?);
    let rootfs = busybox();
    let marker = format!("0.5{}", std::process::id());
    // A step on the host's network first: the runner started after it comes from its spec.
    let mut first = offline_step(rootfs.path(), "readlink /proc/self/ns/net");
    first.network = kiln_executor::spec::Network::Host;
    let out = harness.run_step(&first).map_err(|e| e.to_string())?;
    common::expect_eq(
        "network of a host step",
        &common::stdout(&out),
        &netns_of("self")?,
    )?;
    let launcher = *launchers().first().ok_or("no launcher")?;
    let warm = warm_runner(launcher)?;
    // The next step differs in everything a step brings along: process, environment,
    // working directory, hostname, and its network (none: a namespace of its own).
    let mut next = offline_step(
        rootfs.path(),
        &format!("sleep {marker}; echo $WHO $(pwd) $(hostname) $(readlink /proc/self/ns/net)"),
    );
    next.env.push("WHO=second".into());
    next.cwd = "/made/for/it".into();
    next.hostname = "second-host".into();
    let out = run_on_warm_runner(&harness, (launcher, warm), next, &marker)?;
    let fields: Vec<&str> = out.split_whitespace().collect();
    let host_net = netns_of("self")?;
    match fields.as_slice() {
        ["second", "/made/for/it", "second-host", net] if *net != host_net => Ok(()),
        _ => Err(format!(
            "the step on the warm runner printed {out:?} (host network {host_net})"
        )),
    }
}

/// A step goes to a warm runner without its seccomp profile (the runner compiled the
/// template's, the same), and that runner's init gets no profile either (it installs the
/// program): the step must still run under it — on the runner started from the first
/// step's config, and on the next, started from the same template after a warm step.
/// Its `/proc` was made by the init before the step arrived: it must show the step's
/// own pid namespace: two processes, the init and the shell (which counts them itself).
fn a_step_on_a_runner_started_ahead_runs_under_its_seccomp_profile() -> Result<(), String> {
    let (harness, rootfs, launcher, mut warm) = after_one_step()?;
    let harness = std::sync::Arc::new(harness);
    for round in 1..=2 {
        let marker = format!("0.5{round}{}", std::process::id());
        let next = offline_step(
            rootfs.path(),
            &format!(
                "sleep {marker}; grep -E '^Seccomp(_filters)?:' /proc/self/status; \
                 unshare -U true 2>/dev/null && echo unshared || echo refused; \
                 set -- /proc/[0-9]*; echo $#"
            ),
        );
        let out = run_on_warm_runner(&harness, (launcher, warm), next, &marker)?;
        let fields: Vec<&str> = out.split_whitespace().collect();
        if fields != ["Seccomp:", "2", "Seccomp_filters:", "1", "refused", "2"] {
            return Err(format!("step {round} on a warm runner printed {out:?}"));
        }
        let previous = warm;
        wait_for("the warm step's runner to end", || {
            !std::path::Path::new(&format!("/proc/{previous}")).exists()
        })?;
        warm = warm_runner(launcher)?;
    }
    Ok(())
}

fn a_step_of_another_shape_gets_a_runner_of_its_own() -> Result<(), String> {
    let (harness, rootfs, launcher, warm) = after_one_step()?;
    let harness = std::sync::Arc::new(harness);
    // Other limits: the cgroups the runner started ahead made do not fit.
    let marker = format!("0.3{}", std::process::id());
    let mut other = offline_step(rootfs.path(), &format!("sleep {marker}; echo limited"));
    other.limits.pids = Some(64);
    let running = run_in_thread(&harness, other);
    let runner = runner_of(launcher, &marker)?;
    let out = running.join().map_err(|_| "the step's thread panicked")??;
    common::expect_eq("output", &out, "limited")?;
    if runner == warm {
        return Err("a step with other limits ran on the runner started ahead".into());
    }
    // The unused one ended by itself, its cgroups removed.
    wait_for("the unused runner to end", || {
        !std::path::Path::new(&format!("/proc/{warm}")).exists()
    })?;
    // The next runner is started from the limited step's config: the launcher parses that
    // template anew (not the one it kept) and a step of that shape runs on it.
    let warm = warm_runner(launcher)?;
    let marker = format!("0.31{}", std::process::id());
    let mut again = offline_step(
        rootfs.path(),
        &format!("sleep {marker}; echo limited again"),
    );
    again.limits.pids = Some(64);
    let out = run_on_warm_runner(&harness, (launcher, warm), again, &marker)?;
    common::expect_eq("output", &out, "limited again")
}

/// A harness after one step: the busybox rootfs, the launcher and the runner it keeps
/// started ahead for the next step.
fn after_one_step() -> Result<(Harness, tempfile::TempDir, Pid, Pid), String> {
    let harness = Harness::new()?;
    let rootfs = busybox();
    harness
        .run(rootfs.path(), "true")
        .map_err(|e| e.to_string())?;
    let launcher = *launchers().first().ok_or("no launcher")?;
    let warm = warm_runner(launcher)?;
    Ok((harness, rootfs, launcher, warm))
}

fn a_warm_runner_killed_before_its_step_is_replaced() -> Result<(), String> {
    let (harness, rootfs, _, warm) = after_one_step()?;
    kill(warm, Signal::SIGKILL).map_err(|e| e.to_string())?;
    let result = harness
        .run(rootfs.path(), "echo still")
        .map_err(|e| format!("a step after its warm runner was killed: {e}"))?;
    common::expect_eq("output", &common::stdout(&result), "still")?;
    // What the killed runner registered was removed; the next warm runner's is live.
    let next = warm_runner(launchers().first().copied().ok_or("no launcher")?)?;
    if next == warm {
        return Err("the killed runner is still the launcher's".into());
    }
    let registered = registered_cgroups(harness.run_root.path());
    if registered.len() > 1 {
        return Err(format!(
            "cgroups registered besides the next warm runner's: {registered:?}"
        ));
    }
    Ok(())
}

fn the_last_executor_lets_its_warm_runner_go() -> Result<(), String> {
    let (harness, _rootfs, _, warm) = after_one_step()?;
    let Harness {
        runtime,
        run_root,
        executor,
    } = harness;
    let clone = executor.clone();
    drop(executor);
    if !std::path::Path::new(&format!("/proc/{warm}")).exists() {
        return Err("the warm runner ended while a clone of its executor was alive".into());
    }
    drop(clone);
    // Gone (reaped) by the time the drop returns, with whatever it registered.
    if std::path::Path::new(&format!("/proc/{warm}")).exists() {
        return Err(format!("warm runner {warm} still there after its executor"));
    }
    drop(runtime);
    registered_cgroups_left(run_root.path())
}

/// The entries of the run root's cgroup registry (one per step or warm runner whose
/// cgroups exist).
fn registered_cgroups(run_root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(kiln_executor::supervisor::cgroup_registry(run_root))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Fails when the run root's cgroup registry still names a step's or a warm runner's
/// cgroups.
fn registered_cgroups_left(run_root: &std::path::Path) -> Result<(), String> {
    let left = registered_cgroups(run_root);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("cgroups still registered: {left:?}"))
    }
}

common::both_modes! {
    one_launcher_per_executor => steps_share_one_launcher_and_keep_their_output;
    killed_runner_fails_the_step => a_killed_runner_fails_its_step_with_the_signal;
    killed_launcher_is_replaced => a_killed_launcher_is_replaced;
    large_config_through_a_file => a_config_too_large_for_one_message_goes_through_a_file;
    no_step_directory_left => steps_leave_no_directory_behind;
    warm_runner_takes_the_next_step => the_next_step_runs_on_a_runner_started_ahead_with_its_own_spec;
    warm_runner_step_under_seccomp => a_step_on_a_runner_started_ahead_runs_under_its_seccomp_profile;
    warm_runner_of_another_shape_unused => a_step_of_another_shape_gets_a_runner_of_its_own;
    killed_warm_runner_replaced => a_warm_runner_killed_before_its_step_is_replaced;
    warm_runner_gone_with_its_executor => the_last_executor_lets_its_warm_runner_go;
}
