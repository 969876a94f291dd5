//! Driving kiln as users do (`kiln build` with Definitions from `kiln_proto::builder`,
//! `kiln run`) and watching the host: canary files outside every root, the host's mount
//! table, the test process's descriptors, the hashes of the binaries a step could target.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use kiln_proto::builder::{DefinitionBuilder, Exec, FileActions, default_copy};
use kiln_proto::encode::GogoEncode as _;
use kiln_proto::pb;

pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How many iterations each race runs: a short budget for `cargo test`, at least 10,000
/// with `scripts/escapes --long` (which sets `KILN_ESCAPES_RACE_ITERATIONS`).
pub fn race_iterations() -> usize {
    std::env::var("KILN_ESCAPES_RACE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// A kiln state directory and a busybox root filesystem (`local://rootfs`) owned by the
/// caller: unpacked as root, or inside a user namespace when rootless, so its files belong
/// to ids kiln's namespace maps.
pub struct Kiln {
    state: tempfile::TempDir,
    rootfs: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Kiln {
    pub fn new() -> anyhow::Result<Kiln> {
        let rootfs = tempfile::tempdir()?;
        if kiln_testsupport::is_root() {
            kiln_testsupport::unpack_test_image("busybox", rootfs.path());
        } else {
            let path = rootfs.path().to_owned();
            let code = kiln_executor::userns::run_in_user_namespace(move || {
                kiln_testsupport::unpack_test_image("busybox", &path);
                0
            })?;
            ensure!(code == 0, "unpacking the test image in a user namespace");
        }
        Ok(Kiln {
            state: tempfile::tempdir()?,
            rootfs,
            work: tempfile::tempdir()?,
        })
    }

    pub fn state(&self) -> &Path {
        self.state.path()
    }

    /// The root filesystem `local://rootfs` copies: tests plant hostile content here.
    pub fn rootfs(&self) -> &Path {
        self.rootfs.path()
    }

    /// A scratch directory of the test (outside every root kiln uses).
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.arg("--root").arg(self.state());
        command
    }

    /// `kiln build --progress plain --local rootfs=… EXTRA…` with `def` on standard input;
    /// fails the test when kiln does not finish within a few minutes (a hang).
    pub fn build(&self, def: &[u8], extra: &[&str]) -> anyhow::Result<Outcome> {
        let mut command = self.command();
        command
            .args(["build", "--progress", "plain", "--local"])
            .arg(format!("rootfs={}", self.rootfs().display()))
            .args(extra);
        run_with_input(command, def)
    }

    /// `kiln run --rootfs <rootfs> ARGS…`.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Outcome> {
        let mut command = self.command();
        command
            .arg("run")
            .arg("--rootfs")
            .arg(self.rootfs())
            .args(args);
        run_with_input(command, b"")
    }

    /// Builds one RUN step of `script` on the rootfs, adjusted by `adjust`, exporting the
    /// step's root to a fresh directory. The step's output is in [`Outcome::stderr`]
    /// (progress), the exported root in [`Outcome::export`].
    pub fn build_step(
        &self,
        script: &str,
        adjust: impl FnOnce(Exec) -> Exec,
        extra: &[&str],
    ) -> anyhow::Result<Outcome> {
        let (def, _) = one_step(script, adjust);
        self.build_exported(&def, extra)
    }

    /// Builds `def`, exporting its result to a fresh directory.
    pub fn build_exported(&self, def: &[u8], extra: &[&str]) -> anyhow::Result<Outcome> {
        let dest = tempfile::Builder::new()
            .prefix("export")
            .tempdir_in(self.work())?
            .keep();
        let output = format!("type=local,dest={}", dest.display());
        let mut args = vec!["-o", &output];
        args.extend_from_slice(extra);
        let mut outcome = self.build(def, &args)?;
        outcome.export = Some(dest);
        Ok(outcome)
    }
}

/// What a kiln command did.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub export: Option<PathBuf>,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A file of the exported result.
    pub fn exported(&self, name: &str) -> Option<String> {
        let dir = self.export.as_ref()?;
        std::fs::read_to_string(dir.join(name)).ok()
    }

    /// Succeeded, else an error with kiln's output.
    pub fn ok(self) -> anyhow::Result<Outcome> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "kiln failed ({:?}):\n{}{}",
                self.code,
                self.stdout,
                self.stderr
            )
        }
    }

    /// The last line of standard error (kiln's one-line error).
    pub fn error_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or_default()
    }
}

fn run_with_input(mut command: Command, input: &[u8]) -> anyhow::Result<Outcome> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kiln")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // kiln may refuse its flags before reading (a broken pipe here is fine).
    let _ = stdin.write_all(input);
    drop(stdin);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(output) => output?,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid)?),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("kiln hung (killed after 300 s)");
        }
    };
    Ok(Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        export: None,
    })
}

/// `local://rootfs` copied into scratch (content-hashed, so later builds hit the cache).
pub fn base(b: &mut DefinitionBuilder) -> kiln_proto::builder::Output {
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

/// `/bin/sh -c script` on `root`.
pub fn sh(root: Option<kiln_proto::builder::Output>, script: &str) -> Exec {
    Exec::new(root, &["/bin/sh", "-c", script]).env(PATH_ENV)
}

/// A Definition with one RUN step of `script` (adjusted by `adjust`) on the rootfs; its
/// root is the result. Returns the Definition and the step's digest.
pub fn one_step(script: &str, adjust: impl FnOnce(Exec) -> Exec) -> (Vec<u8>, String) {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let step = b.exec(&adjust(sh(Some(base), script)));
    let root = step.root().expect("a RUN step has a root output");
    (
        b.finish(&root).gogo_encode(),
        step.digest.as_str().to_owned(),
    )
}

/// A Definition whose result is `build(builder, base)`.
pub fn graph(
    build: impl FnOnce(
        &mut DefinitionBuilder,
        kiln_proto::builder::Output,
    ) -> kiln_proto::builder::Output,
) -> Vec<u8> {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let result = build(&mut b, base);
    b.finish(&result).gogo_encode()
}

/// A unique number for names in shared places (the host's `/`, `/tmp`).
pub fn unique() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}x{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A directory standing for "the host" with canary files, and a snapshot of what a step
/// must never change: the canaries, the host's mount table, this process's descriptors,
/// the kiln binary and the host's shell.
pub struct HostWatch {
    pub canary: tempfile::TempDir,
    mounts: BTreeSet<String>,
    fds: BTreeSet<String>,
    hashes: Vec<(PathBuf, String)>,
    core_pattern: String,
    hostname: String,
}

pub const CANARY_FILES: [&str; 4] = ["b", "b/c", "ptmx", "secret"];
pub const CANARY_SECRET: &str = "host-secret-canary-7f3a";

impl HostWatch {
    pub fn new() -> anyhow::Result<HostWatch> {
        // Under /tmp and readable by everyone, so a step that reached the host would see it.
        let canary = tempfile::Builder::new()
            .prefix("kiln-host")
            .tempdir_in("/tmp")?;
        std::fs::create_dir(canary.path().join("b"))?;
        std::fs::write(canary.path().join("b/c"), b"")?;
        std::fs::write(canary.path().join("ptmx"), b"canary")?;
        std::fs::write(canary.path().join("secret"), CANARY_SECRET)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(canary.path(), std::fs::Permissions::from_mode(0o755))?;
        let hashes = [
            PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
            std::fs::canonicalize("/bin/sh")?,
        ]
        .into_iter()
        .map(|p| sha256_of(&p).map(|h| (p, h)))
        .collect::<anyhow::Result<_>>()?;
        Ok(HostWatch {
            canary,
            mounts: mount_points()?,
            fds: own_fds(),
            hashes,
            core_pattern: std::fs::read_to_string("/proc/sys/kernel/core_pattern")?,
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")?,
        })
    }

    pub fn dir(&self) -> &Path {
        self.canary.path()
    }

    /// The host is as it was: canaries intact and alone, no new mount outside scratch
    /// places, no new descriptor in this process, binaries unchanged, core_pattern and
    /// hostname unchanged.
    pub fn untouched(&self) -> anyhow::Result<()> {
        let mut names = walk(self.dir());
        names.sort();
        ensure!(
            names == CANARY_FILES,
            "the host directory {} changed: {names:?}",
            self.dir().display()
        );
        ensure!(
            std::fs::read(self.dir().join("ptmx"))? == b"canary",
            "host canary overwritten"
        );
        ensure!(
            std::fs::metadata(self.dir().join("b/c"))?.len() == 0,
            "host canary b/c written"
        );
        let now = mount_points()?;
        let new: Vec<&String> = now
            .difference(&self.mounts)
            .filter(|m| {
                // Other engineers' tests mount below scratch places of their own.
                let scratch = ["/tmp/", "/var/tmp/", "/run/", "/proc/", "/sys/", "/dev/"];
                m.starts_with(&self.dir().display().to_string())
                    || !scratch.iter().any(|s| m.starts_with(s))
            })
            .collect();
        ensure!(new.is_empty(), "new mounts on the host: {new:?}");
        let fds = own_fds();
        let leaked: Vec<&String> = fds.difference(&self.fds).collect();
        ensure!(
            leaked.is_empty(),
            "new descriptors in the test process: {leaked:?}"
        );
        for (path, hash) in &self.hashes {
            ensure!(&sha256_of(path)? == hash, "{} was modified", path.display());
        }
        ensure!(
            std::fs::read_to_string("/proc/sys/kernel/core_pattern")? == self.core_pattern,
            "the host's core_pattern changed"
        );
        ensure!(
            std::fs::read_to_string("/proc/sys/kernel/hostname")? == self.hostname,
            "the host's hostname changed"
        );
        Ok(())
    }
}

/// sha256 of a file, by coreutils' `sha256sum`: kiln's debug binary is large, and sha2
/// without optimisation takes seconds for it.
fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Mount points of this process's mount namespace (the host's: the test runs there).
pub fn mount_points() -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect())
}

/// This process's descriptors as `fd -> target` (threads of the harness come and go, so
/// only descriptors that stay open matter; the comparison ignores the read's own fd).
fn own_fds() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy().into_owned();
                if !target.starts_with("/proc/") && !target.starts_with("pipe:") {
                    out.insert(format!(
                        "{} -> {target}",
                        entry.file_name().to_string_lossy()
                    ));
                }
            }
        }
    }
    out
}

/// Relative paths of everything below `dir`.
pub fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = rel.join(entry.file_name());
            out.push(path.to_string_lossy().into_owned());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    out
}

/// Replaces `name` in `root` (a file, a directory or nothing) with a symlink to `target`.
pub fn plant_symlink(root: &Path, name: &str, target: &str) -> anyhow::Result<()> {
    let path = root.join(name.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path)?,
        Ok(_) => std::fs::remove_file(&path)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, &path)
        .with_context(|| format!("symlink {} -> {target}", path.display()))
}

/// Makes a FIFO at `name` in `root`.
pub fn plant_fifo(root: &Path, name: &str) -> anyhow::Result<()> {
    let path = root.join(name.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&path);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644))
        .with_context(|| format!("mkfifo {}", path.display()))
}

/// Processes whose command line contains `marker` (the test's own excluded).
pub fn processes_with(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) && !text.contains("--exact") {
                found.push(format!("{name}: {text}"));
            }
        }
    }
    found
}

/// Waits (bounded) until no process with `marker` is left; the survivors otherwise.
pub fn wait_gone(marker: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = processes_with(marker);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Locks (`/proc/locks`: flock, POSIX and OFD) held on any file below `dir`.
pub fn locks_below(dir: &Path) -> Vec<String> {
    let mut inodes = BTreeMap::new();
    for rel in walk(dir) {
        if let Ok(m) = std::fs::symlink_metadata(dir.join(&rel)) {
            inodes.insert(m.ino(), rel);
        }
    }
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // "1: OFDLCK ADVISORY READ -1 fd:01:1234 0 EOF" (the id is maj:min:inode)
            let id = line
                .split_whitespace()
                .find(|f| f.matches(':').count() == 2)?;
            let inode: u64 = id.rsplit(':').next()?.parse().ok()?;
            inodes.get(&inode).map(|rel| format!("{rel}: {line}"))
        })
        .collect()
}

/// Declares `rootful` and `rootless` tests running `check` as root and as the unprivileged
/// test user (kiln then enters its own user namespace, as for any user).
#[macro_export]
macro_rules! both_modes {
    ($($name:ident => $module:ident :: $check:ident;)*) => {$(
        mod $name {
            #[test]
            fn rootful() {
                let _serial = kiln_testsupport::serial();
                if !kiln_testsupport::require(kiln_testsupport::is_root(), "root") {
                    return;
                }
                $crate::harness::report($crate::$module::$check());
            }
            #[test]
            fn rootless() {
                let _serial = kiln_testsupport::serial();
                if kiln_testsupport::rerun_as_test_user() != kiln_testsupport::AsTestUser::Inner {
                    return;
                }
                $crate::harness::report($crate::$module::$check());
            }
        }
    )*};
}

pub fn report(result: anyhow::Result<()>) {
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// A fresh kiln and host watch; the check, then the host must be untouched.
pub fn with_host(
    check: impl FnOnce(&Kiln, &HostWatch) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let host = HostWatch::new()?;
    let kiln = Kiln::new()?;
    check(&kiln, &host)?;
    host.untouched()
}

/// Inconsistencies of kiln's snapshot store (`Snapshotter::verify`), opened as kiln would
/// open it: as root, or inside a user namespace of the caller.
pub fn store_problems(kiln: &Kiln) -> anyhow::Result<Vec<String>> {
    let root = kiln.state().to_owned();
    let report = kiln.work().join("verify.txt");
    let out = report.clone();
    let check = move || -> i32 {
        let text = match kiln_snapshotter::Snapshotter::open(&root).and_then(|s| s.verify()) {
            Ok(problems) => problems
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>(),
            Err(e) => format!("opening the store: {e}\n"),
        };
        i32::from(std::fs::write(&out, text).is_err())
    };
    let code = if kiln_testsupport::is_root() {
        kiln_testsupport::run_in_private_mount_namespace(check)
    } else {
        kiln_executor::userns::run_in_user_namespace(check)?
    };
    ensure!(code == 0, "verifying the store failed ({code})");
    Ok(std::fs::read_to_string(report)?
        .lines()
        .map(str::to_owned)
        .collect())
}
