//! Hostile steps against their limits, through the `kiln` binary as users run it: a fork
//! bomb and a memory hog fail naming the limit they hit (`kiln run` and `kiln build`)
//! while a concurrent normal step succeeds; no cgroup is left behind, also after kiln is
//! killed with SIGKILL mid-step (the next kiln removes it); rlimits stand in, with a
//! one-line explanation, when rootless kiln has no delegated cgroup; BuildKit's `ulimit`
//! and `cgroupParent`; and the per-step resource report in `--progress plain`, `rawjson`
//! and `--metadata-file`. As root and as the unprivileged test user (in its delegated
//! cgroups, as `scripts/setup-test-env` prepares them).

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;

use kiln_proto::builder::DefinitionBuilder;
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb;
use kiln_testsupport::{AsTestUser, TEST_USER, is_root, require, rerun_as_test_user};
use serde_json::Value;

mod buildsupport;
mod common;

use buildsupport::{CgroupParent, Kiln, base, finish, processes_with, sh, stderr, stdout};

/// A fork bomb: every shell forks two more, down eight generations (so at most 511
/// processes even if no limit held), all sleeping; the pids limit stops it and kiln kills
/// the step, before the first shell could say it survived.
const FORK_BOMB: &str = "bomb() { if [ $1 -gt 0 ]; then bomb $(($1-1)) & bomb $(($1-1)) & fi; \
                         sleep 30; }; bomb 8; echo survived";
/// Allocates (and touches) 256 MiB in one buffer; the OOM killer stops `dd`, kiln the step.
const MEMORY_HOG: &str = "dd if=/dev/zero of=/dev/null bs=256M count=1; sleep 30; echo survived";

/// A step that keeps forking (within the limits) for a few seconds, announcing its start.
fn normal_step(marker: &str) -> String {
    format!(
        "echo started; i=0; while [ $i -lt 100 ]; do sh -c true || exit 9; \
         dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null || exit 8; \
         i=$((i+1)); sleep 0.02; done; echo ok {marker}"
    )
}

/// Runs `bad` (expected to exceed a limit) while the normal step of `normal` runs.
fn against_a_normal_step(
    normal: std::process::Child,
    bad: impl FnOnce() -> std::process::Output,
) -> (std::process::Output, std::process::Output) {
    let mut normal = normal;
    let mut lines = BufReader::new(normal.stdout.take().expect("stdout")).lines();
    // The normal step is running when the hostile one starts.
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("started"));
    assert!(started, "the normal step never started");
    let bad = bad();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut normal = finish(normal, "the normal step");
    normal.stdout = rest.join("\n").into_bytes();
    (normal, bad)
}

fn check_run_limits() {
    let k = Kiln::new();
    let rootfs = k.rootfs().to_str().expect("utf-8 path").to_owned();
    let parent = CgroupParent::new("run");
    let limited = |script: &str| {
        k.command(&[
            "run",
            "--rootfs",
            &rootfs,
            "--pids-limit",
            "64",
            "--memory",
            "64m",
            "--cgroup-parent",
            &parent.name,
            "--",
            "sh",
            "-c",
            script,
        ])
    };
    for (script, limit) in [
        (FORK_BOMB, "pids limit of 64 processes"),
        (MEMORY_HOG, "memory limit of 64 MiB"),
    ] {
        let normal = limited(&normal_step("run"))
            .spawn()
            .expect("start the normal step");
        let (normal, bad) = against_a_normal_step(normal, || {
            finish(limited(script).spawn().expect("run"), script)
        });
        // Killed for its limit (the bomb's shell may die of a failed fork first).
        let code = bad.status.code();
        assert!(
            code == Some(137) || (script == FORK_BOMB && code.is_some_and(|c| c != 0)),
            "{script}: {code:?}: {}",
            stderr(&bad)
        );
        assert!(
            stderr(&bad).contains(&format!("error: step exceeded its {limit}")),
            "{script}: {}",
            stderr(&bad)
        );
        assert!(
            !stdout(&bad).contains("survived"),
            "{script}: the step was not stopped"
        );
        assert!(
            normal.status.success() && stdout(&normal).contains("ok run"),
            "the concurrent step next to {script}: {} {}",
            stdout(&normal),
            stderr(&normal)
        );
        assert_eq!(
            parent.leaves(),
            Vec::<std::path::PathBuf>::new(),
            "cgroups left"
        );
    }
    // The limits are the step's own: visible to it through its cgroup.
    let files = if buildsupport::unified() {
        "cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/memory.max"
    } else {
        "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes"
    };
    let out = k.run(&[
        "run",
        "--rootfs",
        &rootfs,
        "--pids-limit",
        "64",
        "--memory",
        "64m",
        "--cgroup-parent",
        &parent.name,
        "--",
        "sh",
        "-c",
        files,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["64", "67108864"]
    );
}

#[test]
fn run_limits_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_run_limits();
}

#[test]
fn run_limits_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_run_limits();
}

/// A Definition with one step running `script` on the busybox base, in `cgroup_parent`.
fn one_step(script: &str, cgroup_parent: &str) -> (Vec<u8>, String) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let mut exec = sh(Some(base), script);
    exec.meta.cgroup_parent = cgroup_parent.to_owned();
    let root = b.exec(&exec).root().expect("root");
    let digest = root.digest.as_str().to_owned();
    (b.finish(&root).gogo_encode(), digest)
}

fn check_build_limits() {
    let k = Kiln::new();
    let parent = CgroupParent::new("build");
    let config = k.state.path().join("kiln.toml");
    std::fs::write(&config, "[limits]\npids = 64\nmemory = \"64m\"\n").expect("kiln.toml");
    let config = config.to_str().expect("utf-8 path").to_owned();
    // The base first, so both builds below only run their step.
    let (warmup, _) = one_step("true", &parent.name);
    let out = k.build(&warmup, &["--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (n, (script, limit)) in [
        (FORK_BOMB, "pids limit of 64 processes"),
        (MEMORY_HOG, "memory limit of 64 MiB"),
    ]
    .into_iter()
    .enumerate()
    {
        let (normal_def, _) = one_step(&normal_step(&format!("build{n}")), &parent.name);
        let (bad_def, _) = one_step(script, &parent.name);
        let normal = k.spawn_build(&normal_def, &["--config", &config, "--progress", "plain"]);
        // The plain progress shows the step's output on standard error: wait for it there.
        let mut normal = normal;
        let mut lines = BufReader::new(normal.stderr.take().expect("stderr")).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.ends_with(" started"));
        assert!(started, "the normal build's step never started");
        let bad = k.build(&bad_def, &["--config", &config]);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let normal = finish(normal, "the normal build");
        let text = stderr(&bad);
        let last = text.lines().last().unwrap_or_default();
        assert_eq!(bad.status.code(), Some(1), "{script}: {text}");
        assert!(
            last.starts_with("error: failed to solve: ")
                && last.contains(&format!(
                    "process \"/bin/sh -c {script}\" did not complete successfully: exit code: "
                ))
                && last.ends_with(&format!(": step exceeded its {limit}")),
            "{script}: {last}"
        );
        // The step's own output lines are `#N <seconds> <text>`.
        let said = |word: &str| {
            text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() == 3 && w[2] == word && w[1].parse::<f64>().is_ok()
            })
        };
        assert!(
            !said("survived"),
            "{script}: the step was not stopped: {text}"
        );
        assert!(
            normal.status.success() && rest.join("\n").contains(&format!("ok build{n}")),
            "the concurrent build next to {script}: {}",
            rest.join("\n")
        );
        assert_eq!(
            parent.leaves(),
            Vec::<std::path::PathBuf>::new(),
            "cgroups left"
        );
    }
}

#[test]
fn build_limits_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_build_limits();
}

#[test]
fn build_limits_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_build_limits();
}

/// kiln SIGKILLed mid-step with everything it started (its process group: the runner and
/// the step's init too, so nobody can clean up): the step's cgroups stay until the next
/// kiln on the same state directory removes them.
fn check_killed_kiln_leaves_no_cgroup() {
    let k = Kiln::new();
    let rootfs = k.rootfs().to_str().expect("utf-8 path").to_owned();
    let parent = CgroupParent::new("kill");
    let marker = format!("{}", 5_000_000 + std::process::id());
    let sleep = format!("sleep {marker}");

    // kiln run.
    let child = k
        .command(&[
            "run",
            "--rootfs",
            &rootfs,
            "--cgroup-parent",
            &parent.name,
            "--",
            "sh",
            "-c",
            &sleep,
        ])
        .spawn()
        .expect("kiln run");
    let leaves = parent.wait_for_leaf();
    let (entry, holders) = registry_holders(&k, &marker);
    buildsupport::kill_group(&child);
    let _ = finish(child, "killed kiln run");
    assert_eq!(holders.len(), 1, "holders of {entry:?}: {holders:?}");
    assert!(leaves.iter().all(|l| l.exists()), "nobody removed them yet");
    let out = k.run(&["run", "--rootfs", &rootfs, "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        parent.leaves(),
        Vec::<std::path::PathBuf>::new(),
        "the next kiln run cleans"
    );

    // kiln build.
    let (def, _) = one_step(&sleep, &parent.name);
    let child = k.spawn_build(&def, &[]);
    let leaves = parent.wait_for_leaf();
    let (entry, holders) = registry_holders(&k, &marker);
    buildsupport::kill_group(&child);
    let _ = finish(child, "killed kiln build");
    assert_eq!(holders.len(), 1, "holders of {entry:?}: {holders:?}");
    assert!(leaves.iter().all(|l| l.exists()), "nobody removed them yet");
    let (quick, _) = one_step("true", "");
    let out = k.build(&quick, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        parent.leaves(),
        Vec::<std::path::PathBuf>::new(),
        "the next kiln build cleans"
    );
    assert_eq!(
        processes_with(&marker),
        Vec::<String>::new(),
        "step processes left"
    );
}

/// Once the step runs: its cgroup registry entry and the processes that have it open.
/// Only the runner may: were the step's init to hold it too, the init (which exits last
/// when everything is killed, after its namespace's processes) would keep the lock past
/// kiln's death and the next kiln would take the dead step for a live one. (Checked by
/// the caller once it killed kiln, so a failure leaves nothing running.)
fn registry_holders(k: &Kiln, marker: &str) -> (std::path::PathBuf, Vec<String>) {
    let deadline = std::time::Instant::now() + buildsupport::HANG;
    while processes_with(marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the step never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let registry = k.state.path().join("run").join(".cgroups");
    let entries: Vec<_> = std::fs::read_dir(&registry)
        .expect("cgroup registry")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(entries.len(), 1, "one registry entry: {entries:?}");
    let mut holders = Vec::new();
    for process in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == entries[0]))
        {
            holders.push(process.file_name().to_string_lossy().into_owned());
        }
    }
    (entries[0].clone(), holders)
}

#[test]
fn killed_kiln_leaves_no_cgroup_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_killed_kiln_leaves_no_cgroup();
}

#[test]
fn killed_kiln_leaves_no_cgroup_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_killed_kiln_leaves_no_cgroup();
}

/// Rootless without a delegated cgroup (the test user started outside its delegated
/// cgroups): rlimits stand in, and kiln says once what is and is not enforced.
#[test]
fn rlimits_stand_in_without_a_delegated_cgroup() {
    if !require(
        kiln_testsupport::test_user_ready(),
        "root, runuser and the test user kiln-test with /etc/subuid",
    ) {
        return;
    }
    let work = tempfile::tempdir().expect("work");
    let state = work.path().join("state");
    std::fs::create_dir(&state).expect("state");
    let rootfs = work.path().join("rootfs");
    kiln_testsupport::unpack_test_image("busybox", &rootfs);
    // Owned by the test user: root of its user namespace, as a rootless unpack makes it.
    let owner = format!("{TEST_USER}:{TEST_USER}");
    let chown = std::process::Command::new("chown")
        .args(["-R", &owner])
        .arg(work.path())
        .status()
        .expect("chown");
    assert!(chown.success());
    let kiln_as_test_user = |args: &[&str]| {
        use std::os::unix::process::CommandExt as _;
        let child = std::process::Command::new("runuser")
            .args(["-u", TEST_USER, "--", env!("CARGO_BIN_EXE_kiln"), "--root"])
            .arg(&state)
            .args(["run", "--rootfs"])
            .arg(&rootfs)
            .args(args)
            .current_dir("/tmp")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("runuser");
        finish(child, "kiln run as the test user")
    };
    // The limits as rlimits, and the one line saying so.
    let out = kiln_as_test_user(&[
        "--pids-limit",
        "20",
        "--memory",
        "64m",
        "--",
        "sh",
        "-c",
        "ulimit -u; ulimit -v; ulimit -d",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["20", "65536", "65536"]
    );
    let warning = stderr(&out);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(
        warning.starts_with(
            "WARNING: limits: rootless without a delegated cgroup: steps get rlimits instead: \
             20 processes per user in kiln's user namespace (RLIMIT_NPROC"
        ) && warning.contains("64 MiB of memory per process (RLIMIT_AS, RLIMIT_DATA)")
            && warning.contains("not enforced: a step's total memory, its CPU weight"),
        "{warning}"
    );
    // A bounded fork bomb stops at the limit (kiln's own process and the step's init count
    // too: they run as the same user of kiln's user namespace).
    let out = kiln_as_test_user(&[
        "--pids-limit",
        "20",
        "--",
        "sh",
        "-c",
        // A subshell forks until it cannot (and dies of it); what runs is counted without
        // forking: at the limit nothing more can start.
        "(i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done); set -- /proc/[0-9]*; echo $#",
    ]);
    let count: usize = stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", stderr(&out)));
    assert!(
        (5..=20).contains(&count),
        "{count} processes: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("can't fork"), "{}", stderr(&out));
    // A memory hog is refused its allocation instead of being OOM-killed.
    let hog = "dd if=/dev/zero of=/dev/null bs=256M count=1";
    let out = kiln_as_test_user(&["--memory", "64m", "--", "sh", "-c", hog]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("exceeded"), "{}", stderr(&out));
}

/// BuildKit's `Meta.ulimit` (rlimits as given) and `Meta.cgroupParent` (the step's cgroup
/// at `/<parent>/buildkit/<id>`, shown to it at /sys/fs/cgroup).
fn check_ulimit_and_cgroup_parent() {
    let k = Kiln::new();
    let parent = CgroupParent::new("meta");
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    // cgroup v1: one line per limit hierarchy; v2: the one unified line.
    let (lines_wanted, script) = if buildsupport::unified() {
        (
            1,
            "{ ulimit -Sn; ulimit -Hn; grep '^0::' /proc/self/cgroup; \
               cat /sys/fs/cgroup/pids.max; } > /out/report",
        )
    } else {
        (
            3,
            "{ ulimit -Sn; ulimit -Hn; grep -E ':(pids|memory|cpu):' /proc/self/cgroup; \
               cat /sys/fs/cgroup/pids/pids.max; } > /out/report",
        )
    };
    let mut exec = sh(Some(base), script).mount(kiln_proto::builder::ExecMount::bind("/out", None));
    exec.meta.cgroup_parent = parent.name.clone();
    exec.meta.ulimit = vec![pb::Ulimit {
        name: "nofile".into(),
        soft: 1000,
        hard: 1024,
    }];
    let out = b.exec(&exec).output("/out").expect("/out");
    let def = b.finish(&out).gogo_encode();
    let dest = k.state.path().join("out");
    let result = k.build(
        &def,
        &["-o", &format!("type=local,dest={}", dest.display())],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let report = std::fs::read_to_string(dest.join("report")).expect("report");
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(&lines[..2], ["1000", "1024"], "{report}");
    let cgroups = &lines[2..lines.len() - 1];
    assert_eq!(cgroups.len(), lines_wanted, "{report}");
    let own = if is_root() {
        String::new()
    } else {
        format!("/{TEST_USER}")
    };
    for line in cgroups {
        assert!(
            line.contains(&format!(":{own}/{}/buildkit/", parent.name)),
            "{line} in {report}"
        );
    }
    assert_eq!(
        lines.last().copied(),
        Some("4096"),
        "the default pids limit: {report}"
    );
}

#[test]
fn ulimit_and_cgroup_parent_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_ulimit_and_cgroup_parent();
}

#[test]
fn ulimit_and_cgroup_parent_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_ulimit_and_cgroup_parent();
}

/// `#3 DONE 1.2s (cpu 0.9s, peak 84 MiB)` in plain progress, a `resources` object on the
/// completed vertex in rawjson, and `kiln.steps` in `--metadata-file`.
fn check_resource_report() {
    let k = Kiln::new();
    let script = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
                  dd if=/dev/zero of=/data bs=1M count=8 2>/dev/null";
    let (def, digest) = one_step(script, "");
    let metadata = k.state.path().join("metadata.json");
    let out = k.build(
        &def,
        &[
            "--progress",
            "plain",
            "--metadata-file",
            metadata.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    let done = text
        .lines()
        .find(|l| l.contains(" DONE ") && l.contains("(cpu "))
        .unwrap_or_else(|| panic!("no report line in {text}"));
    let re = regex_lite(done);
    assert!(re, "{done}");

    let meta: Value =
        serde_json::from_slice(&std::fs::read(&metadata).expect("metadata file")).expect("json");
    let step = &meta["kiln.steps"][&digest];
    assert!(
        step["name"]
            .as_str()
            .is_some_and(|n| n.contains("RUN") || n.contains("/bin/sh")),
        "{meta}"
    );
    check_figures(step);

    let out = k.build(&def, &["--progress", "rawjson", "--no-cache"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let completed: Vec<Value> = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|v| v["vertexes"].as_array().cloned().unwrap_or_default())
        .filter(|v| v["digest"] == digest.as_str() && v.get("resources").is_some())
        .collect();
    assert_eq!(completed.len(), 1, "{}", stderr(&out));
    assert!(completed[0].get("completed").is_some());
    check_figures(&completed[0]["resources"]);
}

/// Plausible figures for the report's step: it burned CPU, wrote 8 MiB, used memory.
fn check_figures(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert!(f("userCpuSeconds") + f("systemCpuSeconds") > 0.0, "{r}");
    assert!(f("wallSeconds") > 0.0, "{r}");
    assert!(f("writtenBytes") >= 8.0 * 1024.0 * 1024.0, "{r}");
    assert!(f("readBytes") >= 0.0, "{r}");
    assert!(f("peakMemoryBytes") >= 1024.0 * 1024.0, "{r}");
    assert_eq!(r["peakMemoryScope"], "cgroup", "{r}");
}

/// `#N DONE 0.4s (cpu 0.2s, peak 12 MiB)`.
fn regex_lite(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('#') else {
        return false;
    };
    let mut words = rest.split(' ');
    let number = words.next().is_some_and(|n| n.parse::<u32>().is_ok());
    let done = words.next() == Some("DONE");
    let secs = |w: Option<&str>, prefix: &str| {
        w.and_then(|w| w.strip_prefix(prefix))
            .and_then(|w| w.trim_end_matches(',').strip_suffix('s'))
            .is_some_and(|n| n.parse::<f64>().is_ok())
    };
    let took = secs(words.next(), "");
    let cpu = words.next() == Some("(cpu") && secs(words.next(), "");
    let peak = words.next() == Some("peak")
        && words.next().is_some_and(|n| n.parse::<f64>().is_ok())
        && words
            .next()
            .is_some_and(|u| ["B)", "KiB)", "MiB)", "GiB)"].contains(&u));
    number && done && took && cpu && peak && words.next().is_none()
}

#[test]
fn resource_report_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_resource_report();
}

#[test]
fn resource_report_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_resource_report();
}
