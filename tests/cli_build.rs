//! `kiln build` end to end as users call it: a local root filesystem copied into scratch,
//! RUN steps with a cache mount and a bind-mounted output, every exporter, the cache on a
//! second build and `--no-cache`, a failing step and Ctrl-C (no mounts, processes or
//! half-made snapshots left behind), and one-line errors for bad flags and inputs; as root
//! and as the unprivileged test user.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, FileActions, default_copy};
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb;
mod common;

use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user, which};
use serde_json::Value;

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn kiln(state: &Path, args: &[&str], def: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(state)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    // kiln may reject its flags before reading the Definition (a broken pipe here).
    let _ = std::io::Write::write_all(&mut stdin, def);
    drop(stdin);
    child.wait_with_output().expect("wait for kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `local://rootfs` copied into scratch (content-hashed, so later builds hit the cache).
fn base(b: &mut DefinitionBuilder) -> kiln_proto::builder::Output {
    let local = b.source(
        "local://rootfs",
        BTreeMap::from([("local.sharedkeyhint".to_owned(), "rootfs".to_owned())]),
    );
    b.file(FileActions::on(None).copy(
        local,
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ))
}

fn sh(root: Option<kiln_proto::builder::Output>, script: &str) -> Exec {
    Exec::new(root, &["/bin/sh", "-c", script]).env(PATH_ENV)
}

/// The main graph: two RUN steps (a cache mount, an output mount) and the output copied
/// into scratch. Returns the Definition and the digests of its exec ops.
fn main_graph() -> (Vec<u8>, HashSet<String>) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let first = b.exec(&sh(Some(base), "echo hello > /hello && id -u > /uid"));
    let second = b.exec(
        &sh(
            first.root(),
            "cp /hello /uid /out/ && echo run >> /cache/runs && wc -l < /cache/runs > /out/runs",
        )
        .mount(ExecMount::bind("/out", None))
        .mount(ExecMount::cache(
            "/cache",
            "cli-build-test",
            pb::CacheSharingOpt::Shared,
        )),
    );
    let out = second.output("/out").expect("/out is an output");
    let execs = HashSet::from([
        first.root().expect("root").digest.as_str().to_owned(),
        out.digest.as_str().to_owned(),
    ]);
    let result = b.file(FileActions::on(None).copy(
        out,
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ));
    (b.finish(&result).gogo_encode(), execs)
}

/// A graph whose one RUN step on the base runs `script`.
fn one_step(script: &str) -> (Vec<u8>, String) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let step = b.exec(&sh(Some(base), script));
    let root = step.root().expect("root");
    let digest = root.digest.as_str().to_owned();
    (b.finish(&root).gogo_encode(), digest)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn snapshot_count(state: &Path) -> usize {
    std::fs::read_dir(state.join("snapshots")).map_or(0, |d| d.count())
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) && !text.contains("cli_build") {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Nothing of a build may outlive it: no step process, no mount under the state
/// directory (in this namespace), no per-process mount directory, no new snapshot.
fn assert_nothing_left(state: &Path, marker: &str, snapshots_before: usize) {
    // The step's processes die with its pid namespace; give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !processes_with(marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_with(marker),
        Vec::<String>::new(),
        "processes left"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let state_text = state.to_string_lossy();
    assert!(
        !mountinfo.contains(state_text.as_ref()),
        "mounts left under {state_text}:\n{mountinfo}"
    );
    let mnt: Vec<_> = std::fs::read_dir(state.join("mnt"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(mnt.is_empty(), "mount directories left: {mnt:?}");
    assert_eq!(
        snapshot_count(state),
        snapshots_before,
        "a failed or cancelled step left snapshots"
    );
}

struct Setup {
    state: tempfile::TempDir,
    _rootfs: tempfile::TempDir,
    local: String,
    work: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let rootfs = common::busybox_rootfs();
        let local = format!("rootfs={}", rootfs.path().display());
        Setup {
            state: tempfile::tempdir().expect("state"),
            _rootfs: rootfs,
            local,
            work: tempfile::tempdir().expect("work"),
        }
    }

    fn state(&self) -> &Path {
        self.state.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn build(&self, def: &[u8], extra: &[&str]) -> Output {
        let mut args = vec!["build", "--progress", "rawjson", "--local", &self.local];
        args.extend_from_slice(extra);
        kiln(self.state(), &args, def)
    }
}

fn check_outputs_and_cache(s: &Setup) {
    let (def, execs) = main_graph();

    let out1 = s.path("out1");
    let dest = format!("type=local,dest={}", out1.display());
    let cold = s.build(&def, &["-o", &dest]);
    assert!(cold.status.success(), "cold build: {}", stderr(&cold));
    assert_eq!(read(&out1.join("hello")), "hello\n");
    assert_eq!(
        read(&out1.join("uid")).trim(),
        "0",
        "steps run as root by default"
    );
    assert_eq!(read(&out1.join("runs")).trim(), "1");
    assert_eq!(
        common::executed(stderr(&cold)).intersection(&execs).count(),
        2,
        "both steps run cold"
    );

    let out2 = s.path("out2");
    let dest = format!("type=local,dest={}", out2.display());
    let warm = s.build(&def, &["-o", &dest]);
    assert!(warm.status.success(), "warm build: {}", stderr(&warm));
    let rerun: Vec<_> = common::executed(stderr(&warm))
        .intersection(&execs)
        .cloned()
        .collect();
    assert!(rerun.is_empty(), "a warm build ran {rerun:?}");
    assert_eq!(
        read(&out2.join("runs")).trim(),
        "1",
        "result from the cache"
    );

    // --no-cache runs everything again, and its steps get fresh cache mounts (BuildKit
    // prunes the cache directories of steps that ignore the cache).
    let out3 = s.path("out3");
    let dest = format!("type=local,dest={}", out3.display());
    let forced = s.build(&def, &["--no-cache", "-o", &dest]);
    assert!(forced.status.success(), "--no-cache: {}", stderr(&forced));
    assert_eq!(
        common::executed(stderr(&forced))
            .intersection(&execs)
            .count(),
        2
    );
    assert_eq!(read(&out3.join("runs")).trim(), "1", "a fresh cache mount");

    // tar to standard output.
    let tar = s.build(&def, &["-o", "type=tar,dest=-"]);
    assert!(tar.status.success(), "tar: {}", stderr(&tar));
    let mut archive = tar::Archive::new(tar.stdout.as_slice());
    let mut names: Vec<String> = archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            e.expect("tar entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["hello", "runs", "uid"]);

    // An OCI archive skopeo reads.
    let oci = s.path("image.tar");
    let dest = format!("type=oci,dest={},name=kiln.test/cli:1", oci.display());
    let built = s.build(&def, &["-o", &dest]);
    assert!(built.status.success(), "oci: {}", stderr(&built));
    if require(which("skopeo"), "skopeo (to read the OCI archive)") {
        let inspect = Command::new("skopeo")
            .args(["inspect", &format!("oci-archive:{}", oci.display())])
            .output()
            .expect("skopeo");
        assert!(inspect.status.success(), "{}", stderr(&inspect));
        let info: Value = serde_json::from_slice(&inspect.stdout).expect("skopeo json");
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(1), "{info}");
        assert_eq!(info["Os"], "linux");
    }
}

fn check_failure_cleans_up(s: &Setup) {
    // Build the base first so only the failing step is new.
    let (warmup, _) = one_step("true");
    assert!(s.build(&warmup, &[]).status.success());
    let before = snapshot_count(s.state());
    let marker = format!("{}", 3_000_000 + std::process::id());
    let script = format!("echo partial > /partial; sleep {marker} & exit 3");
    let (def, step) = one_step(&script);
    let out = s.build(&def, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    let last = text.lines().last().unwrap_or_default();
    // BuildKit's words, after the name and digest of the failed vertex.
    assert!(last.starts_with("error: failed to solve: "), "{last}");
    assert!(last.contains(&step), "names the vertex: {last}");
    assert!(
        last.ends_with(&format!(
            "process \"/bin/sh -c {script}\" did not complete successfully: exit code: 3"
        )),
        "{last}"
    );
    assert_nothing_left(s.state(), &marker, before);
}

fn check_cancel_cleans_up(s: &Setup) {
    let before = snapshot_count(s.state());
    let marker = format!("{}", 4_000_000 + std::process::id());
    let (def, step) = one_step(&format!("sleep {marker}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(s.state())
        .args(["build", "--progress", "rawjson", "--local", &s.local])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, &def).expect("write definition");
    drop(stdin);
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // Wait until the step runs (its vertex started and its process exists).
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains(&step) && l.contains("\"started\""));
    assert!(started, "the step never started");
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the step process never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        sent.elapsed()
    );
    assert!(!status.success(), "a cancelled build must fail");
    let last = rest.last().cloned().unwrap_or_default();
    assert!(last.starts_with("error: "), "one-line error, got {last:?}");
    assert!(last.contains("cancel"), "{last}");
    assert_nothing_left(s.state(), &marker, before);
}

fn check_input_errors(s: &Setup) {
    let (def, _) = main_graph();
    // The local directory was not given.
    let out = kiln(s.state(), &["build", "--progress", "plain"], &def);
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("error: ") && l.contains("--local rootfs=DIR")),
        "{text}"
    );
    // Host networking without the entitlement: BuildKit's error.
    let mut b = DefinitionBuilder::new();
    let base = base(&mut b);
    let mut exec = sh(Some(base), "true");
    exec.network = pb::NetMode::Host;
    let root = b.exec(&exec).root().expect("root");
    let def = b.finish(&root).gogo_encode();
    let out = s.build(&def, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "error: failed to solve: failed to load LLB: network.host is not allowed"
    );
}

/// A step straight on the `local://` context (a writable root: no content-based key) is
/// bound to its session: it runs in every build, as in BuildKit, and leaves no snapshot
/// and no cache record behind.
fn check_session_bound_steps_leave_nothing(s: &Setup) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let local = b.source(
        "local://rootfs",
        BTreeMap::from([("local.sharedkeyhint".to_owned(), "rootfs".to_owned())]),
    );
    let step = b.exec(&sh(Some(local), "echo in-context > /ctx-step"));
    let root = step.root().expect("root");
    let digest = root.digest.as_str().to_owned();
    let def = b.finish(&root).gogo_encode();
    let snapshots_before = snapshot_count(s.state());
    let links_before = kiln_solver::store::Store::open(s.state())
        .and_then(|store| store.check())
        .expect("cache store")
        .links;
    for round in 0..2 {
        let out_dir = s.path(&format!("session-{round}"));
        let dest = format!("type=local,dest={}", out_dir.display());
        let out = s.build(&def, &["-o", &dest]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            common::executed(stderr(&out)).contains(&digest),
            "round {round} runs the step"
        );
        assert_eq!(read(&out_dir.join("ctx-step")), "in-context\n");
        assert_eq!(
            snapshot_count(s.state()),
            snapshots_before,
            "round {round}: snapshots"
        );
    }
    let links_after = kiln_solver::store::Store::open(s.state())
        .and_then(|store| store.check())
        .expect("cache store")
        .links;
    assert_eq!(links_after, links_before, "no links from session keys");
}

/// MergeOp and DiffOp (what `COPY --link` produces): merged and diffed trees as BuildKit
/// makes them, cached like any op, exported as layers.
fn check_merge_and_diff(s: &Setup) {
    let graph = |target: &str| -> Vec<u8> {
        let mut b = DefinitionBuilder::new();
        let rootfs = base(&mut b);
        let run = sh(Some(rootfs.clone()), "echo run > /run.txt && rm /etc/group");
        let run = b.exec(&run).root().expect("root output");
        let linked = b.file(FileActions::on(None).mkfile("/linked", 0o644, b"L"));
        let out = match target {
            "merge" => b.merge(&[Some(run), Some(linked)]),
            "diff" => b.diff(Some(rootfs), Some(run)),
            _ => {
                let d = b.diff(Some(rootfs), Some(run));
                b.merge(&[Some(linked), None, Some(d)])
            }
        };
        b.finish(&out).gogo_encode()
    };
    let list = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("export")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let merged = s.path("merged");
    let dest = format!("type=local,dest={}", merged.display());
    let built = s.build(&graph("merge"), &["-o", &dest]);
    assert!(built.status.success(), "merge: {}", stderr(&built));
    assert_eq!(read(&merged.join("run.txt")), "run\n");
    assert_eq!(read(&merged.join("linked")), "L");
    assert!(
        merged.join("bin/sh").exists(),
        "the base is under the merge"
    );
    assert!(
        !merged.join("etc/group").exists(),
        "the step's deletion holds"
    );
    let cold = common::executed(stderr(&built));
    let again = s.build(&graph("merge"), &["-o", &dest]);
    assert!(again.status.success(), "warm merge: {}", stderr(&again));
    // Only the local source (bound to its session) runs again; the step and the merge
    // come from the cache.
    let warm = common::executed(stderr(&again));
    assert!(
        cold.len() >= 4,
        "source, copy, step, file, merge ran cold: {cold:?}"
    );
    assert_eq!(warm.len(), 1, "a warm merge ran {warm:?}");

    let diffed = s.path("diffed");
    let dest = format!("type=local,dest={}", diffed.display());
    let built = s.build(&graph("diff"), &["-o", &dest]);
    assert!(built.status.success(), "diff: {}", stderr(&built));
    // What the step added, and the directory of what it deleted (as in the layer tar:
    // `etc/` and `etc/.wh.group`), with the deletion applied to nothing.
    assert_eq!(list(&diffed), ["etc", "run.txt"]);
    assert!(list(&diffed.join("etc")).is_empty(), "no whiteout shows");

    let rebased = s.path("rebased");
    let dest = format!("type=local,dest={}", rebased.display());
    let built = s.build(&graph("rebase"), &["-o", &dest]);
    assert!(built.status.success(), "rebase: {}", stderr(&built));
    assert_eq!(list(&rebased), ["etc", "linked", "run.txt"]);

    // Layers of a merge are the layers of its inputs.
    let oci = s.path("merged.tar");
    let dest = format!("type=oci,dest={},name=kiln.test/merge:1", oci.display());
    let built = s.build(&graph("merge"), &["-o", &dest]);
    assert!(built.status.success(), "oci: {}", stderr(&built));
    if require(which("skopeo"), "skopeo (to read the OCI archive)") {
        let inspect = Command::new("skopeo")
            .args(["inspect", &format!("oci-archive:{}", oci.display())])
            .output()
            .expect("skopeo");
        assert!(inspect.status.success(), "{}", stderr(&inspect));
        let info: Value = serde_json::from_slice(&inspect.stdout).expect("skopeo json");
        assert_eq!(
            info["Layers"].as_array().map(Vec::len),
            Some(3),
            "base copy, the step, the linked file: {info}"
        );
    }
}

/// A graph of more snapshots than the soft limit of open files kiln is started with (a
/// build holds a lock descriptor per snapshot): kiln raises its own limit, and its step
/// still gets the limit kiln was given.
fn check_more_snapshots_than_open_files(s: &Setup) {
    const SOFT: usize = 128;
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let mut chain = base(&mut b);
    for i in 0..(SOFT * 2) {
        chain = b.file(FileActions::on(Some(chain)).mkfile(&format!("/f{i}"), 0o644, b"x"));
    }
    let step = b.exec(&sh(
        Some(chain),
        "ulimit -n > /nofile; ls / | grep -c '^f[0-9]' > /files",
    ));
    let root = step.root().expect("root");
    let def = b.finish(&root).gogo_encode();
    let out = s.path("many");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={SOFT}:8192"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(s.state())
        .args(["build", "--progress", "plain", "--local", &s.local, "-o"])
        .arg(format!("type=local,dest={}", out.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln under prlimit");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &def).expect("definition");
    let done = child.wait_with_output().expect("wait for kiln");
    assert!(
        done.status.success(),
        "{} snapshots: {}",
        SOFT * 2,
        stderr(&done)
    );
    assert_eq!(read(&out.join("files")).trim(), (SOFT * 2).to_string());
    assert_eq!(
        read(&out.join("nofile")).trim(),
        SOFT.to_string(),
        "the step keeps the limit of open files kiln was started with"
    );
}

/// Steps as a user that earlier steps add and change: each sees `/etc/passwd` as the
/// layers below it left it, whether the database was read again for it or kept from the
/// step below (a layer that did not touch it).
fn check_users_follow_the_layers(s: &Setup) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let adds = b.exec(&sh(
        Some(base),
        "echo app:x:1000:1000::/:/bin/sh >> /etc/passwd && echo app:x:1000: >> /etc/group \
         && touch /ids && chmod 666 /ids",
    ));
    let as_app = b.exec(&sh(adds.root(), "id -u >> /ids").user("app"));
    let unrelated = b.exec(&sh(as_app.root(), "touch /unrelated && id -u >> /ids"));
    let app_again = b.exec(&sh(unrelated.root(), "id -u >> /ids").user("app"));
    let changes = b.exec(&sh(
        app_again.root(),
        "sed -i s/app:x:1000:1000/app:x:1001:1001/ /etc/passwd",
    ));
    let after_change = b.exec(&sh(changes.root(), "id -u >> /ids").user("app"));
    let result = after_change.root().expect("root");
    let def = b.finish(&result).gogo_encode();

    let out = s.path("users-out");
    let dest = format!("type=local,dest={}", out.display());
    let built = s.build(&def, &["-o", &dest]);
    assert!(built.status.success(), "users build: {}", stderr(&built));
    assert_eq!(
        read(&out.join("ids")),
        "1000\n0\n1000\n1001\n",
        "each step's user as the layers below define it"
    );
}

fn check_build() {
    let s = Setup::new();
    check_outputs_and_cache(&s);
    check_users_follow_the_layers(&s);
    check_more_snapshots_than_open_files(&s);
    check_merge_and_diff(&s);
    check_session_bound_steps_leave_nothing(&s);
    check_failure_cleans_up(&s);
    check_cancel_cleans_up(&s);
    check_input_errors(&s);
}

#[test]
fn build_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_build();
}

#[test]
fn build_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_build();
}

#[test]
fn bad_build_flags_are_one_line_errors() {
    let state = tempfile::tempdir().expect("state");
    let (def, _) = main_graph();
    let cases: [(&[&str], &str); 7] = [
        (
            &["build", "-o", "type=bogus,dest=x"],
            "unsupported type \"bogus\"",
        ),
        (&["build", "-o", "type=local"], "dest= is required"),
        (&["build", "-o", "dest=x"], "type= is required"),
        (&["build", "--allow", "nope"], "unknown entitlement"),
        (&["build", "--secret", "id=x"], "--secret"),
        (&["build", "--local", "nodir"], "--local"),
        (&["build", "--progress", "fancy"], "invalid value 'fancy'"),
    ];
    for (args, want) in cases {
        let out = kiln(state.path(), args, &def);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
        assert_eq!(text.lines().count(), 1, "{args:?}: one line: {text}");
        assert!(text.starts_with("error: "), "{args:?}: {text}");
    }
    // Garbage instead of a Definition.
    let out = kiln(state.path(), &["build"], b"\xff\xffnot a definition");
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.starts_with("error: failed to solve: failed to load LLB"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
}
