//! Helpers for tests that drive `kiln build` and `kiln run` processes: Definitions over a
//! `local://` busybox root filesystem, processes waited for with a hang guard, and the
//! cgroup directories a test's steps are placed in (found independently of kiln's code).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::builder::{
    DefinitionBuilder, Exec, FileActions, Output as LlbOutput, default_copy,
};
use kiln_proto::pb;

pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A hang guard, not a timing assertion: far beyond what any of these builds needs.
pub const HANG: Duration = Duration::from_secs(600);

/// A state directory and a busybox root filesystem for `--local rootfs=…`.
pub struct Kiln {
    pub state: tempfile::TempDir,
    rootfs: tempfile::TempDir,
    pub local: String,
}

impl Kiln {
    pub fn new() -> Self {
        let rootfs = crate::common::busybox_rootfs();
        let local = format!("rootfs={}", rootfs.path().display());
        Kiln {
            state: tempfile::tempdir().expect("state"),
            rootfs,
            local,
        }
    }

    pub fn rootfs(&self) -> &Path {
        self.rootfs.path()
    }

    /// `kiln --root <state> args…` in a process group of its own (so a hang guard or a
    /// test can kill it with everything it started).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("--root")
            .arg(self.state.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd
    }

    /// Starts `kiln build --local rootfs=… extra…` reading `def` on standard input.
    pub fn spawn_build(&self, def: &[u8], extra: &[&str]) -> Child {
        let mut args = vec!["build", "--local", &self.local];
        args.extend_from_slice(extra);
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("run kiln build");
        let mut stdin = child.stdin.take().expect("stdin");
        // kiln may reject its flags before reading the Definition (a broken pipe here).
        let _ = std::io::Write::write_all(&mut stdin, def);
        drop(stdin);
        child
    }

    pub fn build(&self, def: &[u8], extra: &[&str]) -> Output {
        finish(self.spawn_build(def, extra), "kiln build")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("run kiln run");
        finish(child, "kiln run")
    }
}

/// Waits for `child`, reading its output; after [`HANG`] it kills the child's process
/// group and fails the test (a hang is a defect).
pub fn finish(mut child: Child, what: &str) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let t = std::thread::spawn(move || {
            if let Some(err) = err.as_mut() {
                let _ = err.read_to_end(&mut e);
            }
            e
        });
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut o);
        }
        (o, t.join().unwrap_or_default())
    });
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            kill_group(&child);
            let _ = child.wait();
            panic!("{what} hung (killed after {HANG:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = reader.join().expect("output reader");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// SIGKILLs `child`'s process group (it was started with a group of its own) and waits
/// until every process of it is dead.
pub fn kill_group(child: &Child) {
    kiln_testsupport::kill_process_group(child.id());
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `local://rootfs` copied into scratch (content-hashed, so later builds hit the cache).
pub fn base(b: &mut DefinitionBuilder) -> LlbOutput {
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

pub fn sh(root: Option<LlbOutput>, script: &str) -> Exec {
    Exec::new(root, &["/bin/sh", "-c", script]).env(PATH_ENV)
}

/// Processes whose command line contains `marker` (this test binary excepted).
pub fn processes_with(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if entry.file_name().to_string_lossy() == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// A cgroup parent (`--cgroup-parent`, `Meta.cgroupParent`) unique to one test, and the
/// directories its steps' cgroups go in (`<base>/<parent>/buildkit` in every hierarchy;
/// `<base>` is the hierarchy's root as root, the test user's delegated cgroup otherwise).
/// Its directories are removed when dropped.
pub struct CgroupParent {
    pub name: String,
    bases: Vec<PathBuf>,
}

impl CgroupParent {
    pub fn new(tag: &str) -> Self {
        let name = format!("kilntest{tag}{}", std::process::id());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let root = kiln_testsupport::is_root();
        let mut bases = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mountpoint = Path::new(left.split(' ').nth(4).unwrap_or_default());
            let mut right = right.split(' ');
            let (fstype, options) = (right.next(), right.nth(1).unwrap_or_default());
            match fstype {
                Some("cgroup2") => bases.push(v2_base(mountpoint, &own, root)),
                Some("cgroup") => {
                    let Some(controller) = options
                        .split(',')
                        .find(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                    else {
                        continue;
                    };
                    let own_path = own
                        .lines()
                        .find_map(|l| {
                            let mut parts = l.splitn(3, ':');
                            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                            names.split(',').any(|n| n == controller).then_some(path)
                        })
                        .unwrap_or("/");
                    bases.push(if root {
                        mountpoint.to_owned()
                    } else {
                        mountpoint.join(own_path.trim_start_matches('/'))
                    });
                }
                _ => {}
            }
        }
        CgroupParent { name, bases }
    }

    /// `<base>/<parent>/buildkit` of every hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.bases
            .iter()
            .map(|b| b.join(&self.name).join("buildkit"))
            .collect()
    }

    /// The steps' cgroups that exist now.
    pub fn leaves(&self) -> Vec<PathBuf> {
        self.dirs()
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// Waits until a step's cgroup exists (hang guard only).
    pub fn wait_for_leaf(&self) -> Vec<PathBuf> {
        let deadline = Instant::now() + HANG;
        loop {
            let leaves = self.leaves();
            if !leaves.is_empty() {
                return leaves;
            }
            assert!(Instant::now() < deadline, "no step cgroup appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether this host has only cgroup v2 (`/sys/fs/cgroup` is the unified hierarchy).
pub fn unified() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Where steps' cgroups go on a cgroup v2 hierarchy: its root as root; rootless, the
/// nearest delegated cgroup above the test that gives its children limit controllers (as
/// `scripts/setup-test-env` makes `/sys/fs/cgroup/kiln-test` on a unified host), else the
/// test's own.
fn v2_base(mountpoint: &Path, own: &str, root: bool) -> PathBuf {
    if root {
        return mountpoint.to_owned();
    }
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    let own_dir = mountpoint.join(path.trim_start_matches('/'));
    let gives_limits = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.subtree_control")).is_ok_and(|s| {
            s.split_whitespace()
                .any(|c| ["pids", "memory", "cpu"].contains(&c))
        })
    };
    own_dir
        .ancestors()
        .take_while(|d| d.starts_with(mountpoint) && *d != mountpoint)
        .find(|d| gives_limits(d))
        .map_or(own_dir.clone(), Path::to_path_buf)
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for base in &self.bases {
            let _ = std::fs::remove_dir(base.join(&self.name).join("buildkit"));
            let _ = std::fs::remove_dir(base.join(&self.name));
        }
    }
}
