//! Runtime escapes from ../shared/research/executor-security-and-style.md part A, each
//! tried for real against the executor, as root and as the unprivileged test user.
//! Every test fails on an implementation that acts on attacker-controlled paths by name.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{busybox, expect_eq, output_of, run, run_with, step};
use kiln_executor::spec::{StepMount, StepMountKind};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

/// A directory outside the rootfs with a canary file, standing for "the host".
struct HostCanary {
    dir: tempfile::TempDir,
}

impl HostCanary {
    fn new() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.path().join("b")).map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("b/c"), b"").map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("ptmx"), b"canary").map_err(|e| e.to_string())?;
        Ok(HostCanary { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The canary files are intact and nothing else appeared.
    fn intact(&self) -> Result<(), String> {
        let mut names: Vec<String> = walk(self.path());
        names.sort();
        if names != ["b", "b/c", "ptmx"] {
            return Err(format!("host directory changed: {names:?}"));
        }
        let ptmx = std::fs::read(self.path().join("ptmx")).map_err(|e| e.to_string())?;
        if ptmx != b"canary" {
            return Err("host canary overwritten".into());
        }
        Ok(())
    }
}

fn walk(dir: &Path) -> Vec<String> {
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

fn replace_with_symlink(rootfs: &Path, name: &str, target: &Path) -> Result<(), String> {
    let path = rootfs.join(name);
    if path.is_dir() {
        std::fs::remove_dir_all(&path).map_err(|e| e.to_string())?;
    } else {
        let _ = std::fs::remove_file(&path);
    }
    symlink(target, &path).map_err(|e| e.to_string())
}

/// CVE-2019-19921 / CVE-2023-27561: /proc (or /sys) as a symlink must be refused.
fn proc_and_sys_symlinks_are_refused() -> Result<(), String> {
    for dir in ["proc", "sys"] {
        let rootfs = busybox();
        std::fs::create_dir_all(rootfs.path().join("bad")).map_err(|e| e.to_string())?;
        replace_with_symlink(rootfs.path(), dir, Path::new("/bad"))?;
        match run_with(&step(rootfs.path(), "true"), CancellationToken::new()) {
            Err(e) if e.contains("not a symlink") => {}
            other => return Err(format!("/{dir} symlink: {other:?}")),
        }
    }
    Ok(())
}

/// CVE-2024-21626: a cwd of /proc/self/fd/N must never land outside the rootfs.
fn cwd_through_leaked_descriptors() -> Result<(), String> {
    let rootfs = busybox();
    for fd in 3..16 {
        let mut s = step(
            rootfs.path(),
            "pwd; ls /proc/self/cwd/ >/dev/null; ls .. | head -3",
        );
        s.cwd = format!("/proc/self/fd/{fd}");
        match run_with(&s, CancellationToken::new()) {
            // Refused at start: fine.
            Err(_) => {}
            Ok(r) if r.exit.exit_code != 0 => {}
            Ok(r) => {
                let out = String::from_utf8_lossy(&r.stdout).into_owned();
                return Err(format!("cwd /proc/self/fd/{fd} started in {out:?}"));
            }
        }
    }
    Ok(())
}

/// CVE-2025-31133: masks must come from the real null device, whatever /dev/null is in
/// the image.
fn devnull_symlink_does_not_unmask() -> Result<(), String> {
    let rootfs = busybox();
    std::fs::create_dir_all(rootfs.path().join("dev")).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(rootfs.path().join("dev/null"));
    symlink(
        "/proc/sys/kernel/core_pattern",
        rootfs.path().join("dev/null"),
    )
    .map_err(|e| e.to_string())?;
    let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let out = output_of(&step(
        rootfs.path(),
        "test -z \"$(head -c 8 /proc/kcore 2>/dev/null)\" && echo masked; \
         echo '|/bin/sh -c pwned' > /proc/sys/kernel/core_pattern 2>/dev/null && echo wrote || echo refused",
    ))?;
    let after = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    if before != after {
        return Err("host core_pattern changed".into());
    }
    expect_eq("masks", &out, "masked\nrefused")
}

/// CVE-2026-41579: /dev as a symlink to a host directory must not let /dev setup touch it.
fn dev_symlink_stays_in_root() -> Result<(), String> {
    let host = HostCanary::new()?;
    let rootfs = busybox();
    replace_with_symlink(rootfs.path(), "dev", host.path())?;
    let _ = run_with(
        &step(rootfs.path(), "ls /dev >/dev/null"),
        CancellationToken::new(),
    );
    host.intact()
}

/// Path traversal and symlinks in mount destinations land inside the rootfs.
fn mount_destinations_stay_in_root() -> Result<(), String> {
    let host = HostCanary::new()?;
    let rootfs = busybox();
    symlink(host.path(), rootfs.path().join("hostlink")).map_err(|e| e.to_string())?;
    symlink("/", rootfs.path().join("toroot")).map_err(|e| e.to_string())?;
    let tmpfs = |dest: &str| StepMount {
        destination: dest.into(),
        kind: StepMountKind::Tmpfs {
            size: 0,
            readonly: false,
        },
    };
    let mut s = step(
        rootfs.path(),
        "touch /hostlink/b/pwned /toroot/rootlevel/x && echo ok",
    );
    s.mounts = vec![tmpfs("/../../../../hostlink/b"), tmpfs("/toroot/rootlevel")];
    output_of(&s)?;
    host.intact()?;
    // The second mount went to /rootlevel of the rootfs (in-root), not the host's /.
    if Path::new("/rootlevel").exists() {
        return Err("a mount point was created at the host's /rootlevel".into());
    }
    Ok(())
}

/// CVE-2024-23652: the stub cleaner must not follow a symlink the step planted.
fn stub_cleaner_does_not_follow_symlinks() -> Result<(), String> {
    let host = HostCanary::new()?;
    let rootfs = busybox();
    let mut s = step(
        rootfs.path(),
        &format!("rm -rf /a; ln -s {} /a", host.path().display()),
    );
    s.mounts = vec![StepMount {
        destination: "/a/b/c".into(),
        kind: StepMountKind::Tmpfs {
            size: 0,
            readonly: false,
        },
    }];
    // The rm fails on the busy mount point; the symlink is planted anyway by the next run.
    let _ = run(&s);
    let mut again = step(
        rootfs.path(),
        &format!(
            "rm -rf /a 2>/dev/null; ln -sfn {} /a; true",
            host.path().display()
        ),
    );
    again.mounts = Vec::new();
    let _ = run(&again);
    let mut third = step(rootfs.path(), "true");
    third.mounts = vec![StepMount {
        destination: "/a/b/c".into(),
        kind: StepMountKind::Tmpfs {
            size: 0,
            readonly: false,
        },
    }];
    let _ = run(&third);
    host.intact()
}

fn sha256_of(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// CVE-2019-5736: the step must not be able to overwrite the runtime binary through
/// /proc/self/exe or /proc/<pid>/exe.
fn runtime_binary_cannot_be_overwritten() -> Result<(), String> {
    let runner = PathBuf::from(env!("CARGO_BIN_EXE_kiln-runner"));
    let before = sha256_of(&runner)?;
    let rootfs = busybox();
    std::fs::write(rootfs.path().join("evil"), "#!/proc/self/exe\n").map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        rootfs.path().join("evil"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    let script = "
        /evil & 
        for p in /proc/[0-9]*; do
          (echo pwned >> $p/exe) 2>/dev/null && echo wrote-$p
          (echo pwned > /proc/self/exe) 2>/dev/null && echo wrote-self
        done
        wait
        echo done";
    let out = output_of(&step(rootfs.path(), script))?;
    if out.contains("wrote") {
        return Err(format!("wrote to an executable: {out}"));
    }
    let after = sha256_of(&runner)?;
    expect_eq("runner binary hash", &after, &before)
}

/// CVE-2023-25809: every cgroup and sysfs mount of a sandbox step is read-only, also
/// when sysfs falls back to a bind (host network from a user namespace).
fn sys_and_cgroup_mounts_are_readonly() -> Result<(), String> {
    for network in [
        kiln_executor::spec::Network::Sandbox,
        kiln_executor::spec::Network::Host,
    ] {
        let rootfs = busybox();
        let mut s = step(
            rootfs.path(),
            "grep -E ' /sys' /proc/self/mounts | grep -v ' ro,' ; echo end",
        );
        s.network = network;
        let out = output_of(&s)?;
        expect_eq(&format!("writable /sys mounts ({network:?})"), &out, "end")?;
    }
    Ok(())
}

/// Device nodes cannot be created (rootless) or opened (rootful devices denied by the
/// capability-less user) by a non-root step.
fn mknod_of_a_disk_fails() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(
        rootfs.path(),
        "mknod /tmp/sda b 8 0 2>/dev/null && head -c1 /tmp/sda >/dev/null 2>&1 && echo read || echo denied",
    );
    s.user = "1000:1000".into();
    expect_eq("mknod as uid 1000", &output_of(&s)?, "denied")
}

common::both_modes! {
    cve_2019_19921_proc_symlink => proc_and_sys_symlinks_are_refused;
    cve_2024_21626_cwd_via_fd => cwd_through_leaked_descriptors;
    cve_2025_31133_devnull_symlink => devnull_symlink_does_not_unmask;
    cve_2026_41579_dev_symlink => dev_symlink_stays_in_root;
    mount_destination_traversal => mount_destinations_stay_in_root;
    cve_2024_23652_stub_cleaner => stub_cleaner_does_not_follow_symlinks;
    cve_2019_5736_proc_self_exe => runtime_binary_cannot_be_overwritten;
    cve_2023_25809_readonly_sys => sys_and_cgroup_mounts_are_readonly;
    device_nodes => mknod_of_a_disk_fails;
}
