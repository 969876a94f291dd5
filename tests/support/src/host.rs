//! What tests find on this machine: CI or not and the prerequisites a test requires, root
//! and the unprivileged test user (and re-running a test as that user), the shared
//! vectors, the test images, private mount namespaces, child processes that die with the
//! test, and killing a process group for good.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the unprivileged user rootless tests run as (created by `scripts/setup-test-env`).
pub const TEST_USER: &str = "kiln-test";

/// Whether we run under CI (`CI=true`), where skipping is not allowed.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns `true` when the test may proceed. When `available` is false: under CI this
/// panics naming `what`; elsewhere it prints why the test is skipped and returns `false`.
#[must_use]
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !in_ci(),
        "prerequisite missing under CI=true: {what} (scripts/setup-test-env installs it)"
    );
    eprintln!("SKIPPED: {what} is not available here (set up with scripts/setup-test-env)");
    false
}

/// The workspace root (where the top-level Cargo.toml is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `../shared` next to the repository (or `$KILN_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"));
    assert!(
        dir.join("conformance/defs").is_dir(),
        "shared test vectors not found at {} (set KILN_SHARED_DIR)",
        dir.display()
    );
    dir
}

/// The conformance Definitions, as `(name, path to .pb)`, sorted by name.
pub fn conformance_defs() -> Vec<(String, PathBuf)> {
    let defs = shared_dir().join("conformance/defs");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&defs)
        .unwrap_or_else(|e| panic!("reading {}: {e}", defs.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pb")?.to_owned();
            Some((name, path))
        })
        .collect();
    out.sort();
    out
}

/// Whether this process runs as real root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Whether the unprivileged test user exists and has a subordinate id range.
pub fn test_user_ready() -> bool {
    let has_user = Command::new("id")
        .arg(TEST_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    let has_subuid = std::fs::read_to_string("/etc/subuid")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with(&format!("{TEST_USER}:"))));
    has_user && has_subuid && is_root() && which("runuser")
}

/// Whether `program` is on PATH.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Where a test runs after [`rerun_as_test_user`].
#[derive(Debug, PartialEq, Eq)]
pub enum AsTestUser {
    /// This process *is* the re-run as the test user: run the test body.
    Inner,
    /// The re-run as the test user passed; the outer (root) test is done.
    Passed,
    /// Prerequisites missing outside CI (a reason was printed).
    Skipped,
}

/// Re-runs the calling test (by its libtest name) as the unprivileged [`TEST_USER`] via
/// `runuser`, so rootless behaviour is tested for real. Panics with the inner output when
/// the re-run fails. Call it first thing in the test and `return` unless it gives `Inner`.
pub fn rerun_as_test_user() -> AsTestUser {
    if std::env::var_os("KILN_TEST_INNER").is_some() {
        return AsTestUser::Inner;
    }
    if !require(
        test_user_ready(),
        "root, runuser and the test user kiln-test with /etc/subuid",
    ) {
        return AsTestUser::Skipped;
    }
    let name = std::thread::current()
        .name()
        .expect("libtest names test threads after the test")
        .to_owned();
    let exe = std::env::current_exe().expect("current test executable");
    // Enter the test user's delegated cgroups (scripts/setup-test-env) before dropping
    // privileges, as a systemd user session would be placed (on a unified host, its leaf
    // `tests`: the delegated cgroup itself gives controllers to the steps' cgroups).
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for d in /sys/fs/cgroup/*/{TEST_USER}; do \
               [ -w \"$d/cgroup.procs\" ] && echo $$ > \"$d/cgroup.procs\"; done; \
             u=/sys/fs/cgroup/{TEST_USER}; \
             if [ -d $u/tests ]; then echo $$ > $u/tests/cgroup.procs; \
             elif [ -w $u/cgroup.procs ]; then echo $$ > $u/cgroup.procs; fi; exec \"$@\""
        ))
        .arg("sh")
        .args(["runuser", "-u", TEST_USER, "--", "env", "KILN_TEST_INNER=1"])
        .arg(format!("CI={}", std::env::var("CI").unwrap_or_default()))
        .arg(format!(
            "KILN_SHARED_DIR={}",
            shared_dir_lenient().display()
        ))
        .arg(format!("HOME=/home/{TEST_USER}"))
        .args(passed_env())
        .arg(&exe)
        .args(["--exact", &name, "--nocapture", "--test-threads=1"])
        .current_dir("/tmp")
        .output()
        .expect("run runuser");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- as {TEST_USER}: {name} ---\n{stdout}{stderr}--- end ---");
    assert!(
        output.status.success(),
        "test {name} failed as {TEST_USER} ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "test {name} did not run as {TEST_USER}:\n{stdout}"
    );
    AsTestUser::Passed
}

/// `NAME=value` for each variable named in `KILN_TEST_PASS_ENV` (space-separated) that is
/// set: how scripts hand settings (such as the escape suite's race budget) to the re-run.
fn passed_env() -> Vec<String> {
    let names = std::env::var("KILN_TEST_PASS_ENV").unwrap_or_default();
    names
        .split_whitespace()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
        .collect()
}

fn shared_dir_lenient() -> PathBuf {
    std::env::var_os("KILN_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"))
        .canonicalize()
        .unwrap_or_default()
}

/// The shared OCI layout holding the test images (`busybox`, `alpine`).
pub fn test_image_layout() -> PathBuf {
    shared_dir().join("conformance/image/oci")
}

/// Unpacks the shared test image `busybox` or `alpine` (one gzip layer each) into `dest`,
/// keeping ownership when allowed (as root, or inside kiln's user namespace).
pub fn unpack_test_image(name: &str, dest: &Path) {
    let layout = test_image_layout();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("read index.json"))
            .expect("parse index.json");
    let manifest_digest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no image {name} in the test layout"))
        .to_owned();
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest_digest)).expect("read manifest"))
            .expect("parse manifest");
    for layer in manifest["layers"].as_array().expect("layers") {
        let digest = layer["digest"].as_str().expect("layer digest");
        let file = std::fs::File::open(blob(digest)).expect("open layer");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        archive.set_preserve_ownerships(true);
        archive.set_preserve_permissions(true);
        archive.set_unpack_xattrs(false);
        archive.unpack(dest).expect("unpack layer");
    }
}

/// Runs `body` in a forked child inside a new private mount namespace (as the caller, so
/// normally as root) and returns its exit code; a panic in `body` becomes exit code 101.
/// Mounts made by `body` never reach the caller's namespace and vanish with the child.
///
/// # Caveats
/// The child is forked from a possibly multi-threaded test process: `body` must not rely
/// on locks other threads might hold (glibc resets its malloc locks across fork).
pub fn run_in_private_mount_namespace<F: FnOnce() -> i32>(body: F) -> i32 {
    use nix::mount::{MsFlags, mount};
    use nix::sys::wait::{WaitStatus, waitpid};
    // SAFETY: the child only runs `body` (fork-safe under glibc, see Caveats) and then
    // leaves with _exit, never returning into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let setup = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).and_then(|()| {
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
            });
            let code = match setup {
                Ok(()) => {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101)
                }
                Err(e) => {
                    eprintln!("entering a private mount namespace: {e}");
                    125
                }
            };
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { nix::libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => match waitpid(child, None).expect("wait") {
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
            _ => 1,
        },
    }
}

/// Makes the child `command` starts get SIGKILL when the thread that spawns it ends (see
/// `registry::spawn_long_lived` for a thread that lives as long as the process), and refuse
/// to start when that parent is already gone.
pub(crate) fn die_with_this_process(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = nix::unistd::getpid();
    // SAFETY: the hook runs in the forked child before exec and only makes the
    // async-signal-safe calls prctl and getppid, without allocating.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// SIGKILLs the process group `pgid` (a child started with a group of its own) and waits
/// until none of its processes is alive: a forked grandchild is reaped by init, not by
/// the test, and can still be exiting, holding its files and locks, after its parent was
/// waited for. Zombies have let go of everything, so they count as dead.
pub fn kill_process_group(pgid: u32) {
    let pgid = i32::try_from(pgid).expect("a process group id");
    // ESRCH: the whole group is gone already.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let alive = live_members(pgid);
        if alive.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes {alive:?} of the killed group {pgid} still run after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The processes of group `pgid` that are neither zombies nor gone.
fn live_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let group = pgid.to_string();
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // Gone between the listing and the read: not alive.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            !matches!(fields.first(), Some(&("Z" | "X"))) && fields.get(2) == Some(&group.as_str())
        })
        .collect()
}
