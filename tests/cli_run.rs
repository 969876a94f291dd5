//! `kiln run` and `kiln spec` driven as users and scripts call them: flags, exit status,
//! errors; as root and as the unprivileged test user; and runc accepting `kiln spec`.

use std::path::Path;
use std::process::{Command, Output};

mod common;

use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user, which};

fn kiln(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run kiln")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn check_run_flags() {
    let state = tempfile::tempdir().expect("state");
    let rootfs = common::busybox_rootfs();
    let r = rootfs.path().to_str().expect("utf-8 path");

    let out = kiln(
        state.path(),
        &["run", "--rootfs", r, "--", "sh", "-c", "echo hi; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(stdout(&out), "hi\n");

    let out = kiln(
        state.path(),
        &["run", "--rootfs", r, "--", "sh", "-c", "kill -TERM $$"],
    );
    assert_eq!(out.status.code(), Some(128 + 15), "signal → 128+N");

    // Relative --root and --rootfs, as a user types them in their working directory.
    let cwd = rootfs.path().parent().expect("rootfs has a parent");
    let relative = |p: &Path| {
        p.strip_prefix(cwd)
            .expect("tempdirs share a parent")
            .to_owned()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(cwd)
        .arg("--root")
        .arg(relative(state.path()))
        .args(["run", "--rootfs"])
        .arg(relative(rootfs.path()))
        .args(["--", "hostname"])
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(0), "relative paths: {out:?}");
    assert_eq!(stdout(&out), "buildkitsandbox\n");

    let host_dir = tempfile::tempdir().expect("host dir");
    std::fs::write(host_dir.path().join("f"), b"from host").expect("write");
    let bind = format!(
        "type=bind,source={},target=/data,readonly",
        host_dir.path().display()
    );
    let out = kiln(
        state.path(),
        &[
            "run",
            "--rootfs",
            r,
            "--user",
            "1000:1000",
            "--cwd",
            "/work/dir",
            "--env",
            "A=1",
            "--env",
            "B=two words",
            "--hostname",
            "h1",
            "--network",
            "none",
            "--mount",
            &bind,
            "--mount",
            "type=tmpfs,target=/scratch,size=65536",
            "--",
            "sh",
            "-c",
            "id -u; pwd; echo \"$A|$B\"; hostname; ls /sys/class/net; cat /data/f; echo; \
             touch /data/x 2>/dev/null || echo ro; touch /scratch/y && echo rw",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "1000\n/work/dir\n1|two words\nh1\nlo\nfrom host\nro\nrw\n"
    );

    let out = kiln(
        state.path(),
        &["run", "--rootfs", r, "--readonly", "--", "touch", "/x"],
    );
    assert_ne!(out.status.code(), Some(0), "read-only rootfs");

    let out = kiln(
        state.path(),
        &[
            "run",
            "--rootfs",
            r,
            "--security",
            "insecure",
            "--",
            "grep",
            "CapEff",
            "/proc/self/status",
        ],
    );
    assert!(out.status.success());
    let eff =
        u64::from_str_radix(stdout(&out).split_whitespace().nth(1).unwrap_or("0"), 16).unwrap_or(0);
    assert_eq!(
        eff & 0xa804_25fb,
        0xa804_25fb,
        "insecure includes the sandbox set"
    );
    assert_ne!(
        eff, 0xa804_25fb,
        "insecure grants more than the sandbox set"
    );

    let out = kiln(
        state.path(),
        &["run", "--rootfs", r, "--", "no-such-command"],
    );
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("executable file not found"));
}

#[test]
fn run_flags_and_exit_status_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_run_flags();
}

#[test]
fn run_flags_and_exit_status_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_run_flags();
}

#[test]
fn bad_flags_and_rootfs_are_one_line_errors() {
    let state = tempfile::tempdir().expect("state");
    for (args, contains) in [
        (
            vec!["run", "--rootfs", "/nonexistent/rootfs", "--", "true"],
            "rootfs /nonexistent/rootfs",
        ),
        (
            vec![
                "run",
                "--rootfs",
                "/",
                "--mount",
                "type=foo,target=/x",
                "--",
                "true",
            ],
            "unsupported type \"foo\"",
        ),
        (
            vec![
                "run",
                "--rootfs",
                "/",
                "--mount",
                "type=tmpfs,target=rel",
                "--",
                "true",
            ],
            "must be an absolute path",
        ),
        (
            vec![
                "run",
                "--rootfs",
                "/",
                "--mount",
                "type=tmpfs,target=/t,size=big",
                "--",
                "true",
            ],
            "size \"big\"",
        ),
    ] {
        let out = kiln(state.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(contains),
            "{stderr}"
        );
    }
    // Usage errors follow the same contract.
    let out = kiln(state.path(), &["run", "--network", "bogus", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "usage error: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("bogus"),
        "{stderr}"
    );
}

#[test]
fn spec_is_accepted_by_runc() {
    if !require(is_root(), "root") || !require(which("runc"), "runc") {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let rootfs = common::busybox_rootfs();
    let bundle = tempfile::tempdir().expect("bundle");
    let out = kiln(
        state.path(),
        &[
            "spec",
            "--rootfs",
            rootfs.path().to_str().expect("utf-8"),
            "--bundle",
            bundle.path().to_str().expect("utf-8"),
            "--",
            "sh",
            "-c",
            "grep CapEff /proc/self/status; hostname",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("spec is JSON");
    assert_eq!(spec["ociVersion"], "1.0.2-dev");
    std::fs::write(bundle.path().join("config.json"), &out.stdout).expect("write config");
    let id = format!("kilnspec{}", std::process::id());
    let run = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&id)
        .output()
        .expect("runc run");
    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
    assert!(run.status.success(), "runc rejected kiln's spec: {run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "CapEff:\t00000000a80425fb\nbuildkitsandbox\n"
    );
}
