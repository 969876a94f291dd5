//! Generic isolation checks (part A.3): no_new_privs and setuid binaries, seccomp,
//! mount propagation, kill-all on exit and on cancel, id-mapping boundaries, devices,
//! rlimits.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use kiln_proto::pb;

use crate::harness::{mount_points, one_step, processes_with, unique, wait_gone, with_host};

/// no_new_privs: BuildKit leaves it unset for RUN steps (a setuid binary may raise a
/// user's privileges inside the step, as in Docker), but that privilege stays inside: the
/// bounding set caps it at the step's set, and an unset `noNewPrivileges` is reported
/// as such. The setuid root copy gains exactly the container's root, never more.
pub fn no_new_privs_and_setuid() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let script = "cp /bin/busybox /tmp/suid && chmod 4755 /tmp/suid && \
             su -s /bin/sh nobody -c 'grep -E \"^(NoNewPrivs|CapBnd|CapAmb)\" /proc/self/status; /tmp/suid id -u; \
               /tmp/suid grep ^CapEff /proc/self/status' > /tmp/result 2>&1; true";
        let out = kiln.build_step(script, |e| e, &[])?.ok()?;
        let result = out.exported("tmp/result").unwrap_or_default();
        ensure!(
            result.contains("CapAmb:\t0000000000000000"),
            "ambient set: {result}"
        );
        ensure!(
            result.contains("CapBnd:\t00000000a80425fb"),
            "bounding set: {result}"
        );
        ensure!(
            !result.contains("CapEff:\t0000003fffffffff")
                && !result.contains("CapEff:\t000001ffffffffff"),
            "a setuid binary gained more than the step's capabilities: {result}"
        );
        Ok(())
    })
}

/// Seccomp: Docker's default profile is in force in sandbox steps (creating user
/// namespaces, keyrings, mounting, loading modules are refused), not in insecure ones.
pub fn seccomp_filter() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let script = "grep ^Seccomp: /proc/self/status > /result; \
             unshare -U true 2>/dev/null && echo userns >> /result; \
             unshare -m true 2>/dev/null && echo mountns >> /result; \
             mount -t tmpfs t /mnt 2>/dev/null && echo mounted >> /result; \
             swapoff -a 2>/dev/null; true";
        let out = kiln.build_step(script, |e| e, &[])?.ok()?;
        let result = out.exported("result").unwrap_or_default();
        ensure!(result == "Seccomp:\t2\n", "sandbox step: {result:?}");
        let out = kiln
            .build_step(
                "grep ^Seccomp: /proc/self/status > /result",
                |mut e| {
                    e.security = pb::SecurityMode::Insecure;
                    e
                },
                &["--allow", "security.insecure"],
            )?
            .ok()?;
        let result = out.exported("result").unwrap_or_default();
        ensure!(result == "Seccomp:\t0\n", "insecure step: {result:?}");
        Ok(())
    })
}

/// Mount propagation: mounts an (insecure) step makes never reach the host, and the
/// step's root is not a shared peer of any host mount.
pub fn mount_propagation() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let before = mount_points()?;
        let script = "mount -t tmpfs kiln-escape /mnt && mount --make-shared /mnt; \
             mount --make-rshared / 2>/dev/null; mkdir -p /mnt/x && mount -t tmpfs kiln-escape2 /mnt/x; \
             grep -c shared: /proc/self/mountinfo > /result; true";
        let _ = kiln.build_step(
            script,
            |mut e| {
                e.security = pb::SecurityMode::Insecure;
                e
            },
            &["--allow", "security.insecure"],
        )?;
        let _ = kiln.run(&["--security", "insecure", "--", "sh", "-c", script])?;
        let host_mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !host_mounts.contains("kiln-escape"),
            "a step's mount reached the host"
        );
        let after = mount_points()?;
        ensure!(
            after
                .difference(&before)
                .all(|m| m.starts_with("/tmp/") || m.starts_with("/run/")),
            "new host mounts: {:?}",
            after.difference(&before).collect::<Vec<_>>()
        );
        Ok(())
    })
}

/// Kill-all: processes a step leaves behind (backgrounded, `setsid`, double-forked
/// daemons) die with it, whether the step ends by itself or kiln is cancelled.
pub fn kill_all_on_exit_and_cancel() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let marker = format!("{}", 5_000_000 + std::process::id());
        let script = format!(
            "sleep {marker} & setsid sleep {marker} & (setsid sh -c 'sleep {marker} &' &) ; \
             nohup sleep {marker} >/dev/null 2>&1 & echo started > /result"
        );
        kiln.build_step(&script, |e| e, &[])?.ok()?;
        let left = wait_gone(&marker, Duration::from_secs(5));
        ensure!(left.is_empty(), "processes left after the step: {left:?}");
        // The same through kiln run.
        let out = kiln.run(&["--", "sh", "-c", &script.replace("> /result", "")])?;
        ensure!(out.success(), "kiln run: {}", out.stderr);
        let left = wait_gone(&marker, Duration::from_secs(5));
        ensure!(left.is_empty(), "processes left after kiln run: {left:?}");
        // Cancel (Ctrl-C / SIGINT) while the step and its daemons run.
        let (def, _) = one_step(&format!("{script}; sleep {marker}"), |e| e);
        for signal in [
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ] {
            let mut child = kiln
                .command()
                .args(["build", "--progress", "plain", "--no-cache", "--local"])
                .arg(format!("rootfs={}", kiln.rootfs().display()))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, &def)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while processes_with(&marker).len() < 4 {
                ensure!(Instant::now() < deadline, "the step never started");
                std::thread::sleep(Duration::from_millis(20));
            }
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            nix::sys::signal::kill(pid, signal)?;
            let stderr: Vec<String> = BufReader::new(child.stderr.take().context("stderr")?)
                .lines()
                .map_while(Result::ok)
                .collect();
            let status = child.wait()?;
            ensure!(!status.success(), "a cancelled build succeeded: {stderr:?}");
            let left = wait_gone(&marker, Duration::from_secs(5));
            ensure!(left.is_empty(), "processes left after {signal}: {left:?}");
        }
        Ok(())
    })
}

/// Id-mapping boundaries: rootless, kiln's namespace maps container ids 0..=65536 (the
/// caller plus its 65536 subordinate ids); the last mapped id works, the first unmapped
/// one is refused with a clear error, and ownership of the step's files never lands on an
/// unmapped (overflow) id. As root every id is mapped.
pub fn id_mapping_boundaries() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let rootless = !kiln_testsupport::is_root();
        let last = if rootless { 65536 } else { 4_000_000 };
        let out = kiln
            .build_step(
                "id -u > /tmp/result; touch /tmp/mine; stat -c %u /tmp/mine >> /tmp/result",
                |e| e.user(&format!("{last}:{last}")),
                &[],
            )?
            .ok()?;
        ensure!(
            out.exported("tmp/result") == Some(format!("{last}\n{last}\n")),
            "uid {last}: {:?}",
            out.exported("tmp/result")
        );
        if rootless {
            for (user, what) in [
                ("65537:0", "uid"),
                ("0:65537", "gid"),
                ("4294967295:0", "uid"),
            ] {
                let out = kiln.build_step("id > /tmp/result", |e| e.user(user), &[])?;
                ensure!(
                    !out.success(),
                    "{what} of {user} ran: {:?}",
                    out.exported("tmp/result")
                );
            }
            // chown to an unmapped id inside the step fails instead of writing overflow ids.
            let out = kiln
                .build_step(
                    "touch /x; chown 70000:70000 /x 2>/dev/null && echo chowned > /result; stat -c %u:%g /x >> /result",
                    |e| e,
                    &[],
                )?
                .ok()?;
            ensure!(
                out.exported("result").as_deref() == Some("0:0\n"),
                "{:?}",
                out.exported("result")
            );
        }
        Ok(())
    })
}

/// Devices: a step cannot use a device node it makes (the host's disk), as root in the
/// step or as another user; rootless it cannot even make one.
pub fn devices() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let disk = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .and_then(|l| l.split(' ').nth(2).map(str::to_owned))
            .unwrap_or_else(|| "8:0".to_owned());
        let (major, minor) = disk.split_once(':').unwrap_or(("8", "0"));
        let script = format!(
            "mknod /tmp/disk b {major} {minor} 2>/dev/null || mknod /dev/disk b {major} {minor} 2>/dev/null; \
             for d in /tmp/disk /dev/disk; do [ -b $d ] && head -c 512 $d > /dev/null 2>&1 && echo read-$d; done; \
             mknod /dev/mem0 c 1 1 2>/dev/null && head -c 1 /dev/mem0 >/dev/null 2>&1 && echo mem; \
             mknod /tmp/kmsg c 1 11 2>/dev/null && head -c 1 /tmp/kmsg >/dev/null 2>&1 && echo kmsg; \
             true"
        );
        for user in ["", "1000:1000"] {
            let out = kiln
                .build_step(
                    &format!("({script}) > /tmp/result"),
                    |e| if user.is_empty() { e } else { e.user(user) },
                    &[],
                )?
                .ok()?;
            let result = out.exported("tmp/result").unwrap_or_default();
            ensure!(result.is_empty(), "user {user:?} used a device: {result}");
        }
        let out = kiln.run(&["--", "sh", "-c", &script])?;
        ensure!(
            out.stdout.is_empty(),
            "kiln run used a device: {}",
            out.stdout
        );
        Ok(())
    })
}

/// rlimits from `Meta.ulimit`; a rootless request above kiln's own hard limit fails with
/// a clear error instead of silently running with less.
pub fn rlimits() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let out = kiln
            .build_step(
                "echo $(ulimit -Sn) $(ulimit -Hn) > /result",
                |mut e| {
                    e.meta.ulimit = vec![pb::Ulimit {
                        name: "nofile".into(),
                        soft: 1024,
                        hard: 4096,
                    }];
                    e
                },
                &[],
            )?
            .ok()?;
        ensure!(
            out.exported("result").as_deref() == Some("1024 4096\n"),
            "{:?}",
            out.exported("result")
        );
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
        if !kiln_testsupport::is_root() && hard < u64::MAX / 2 {
            let out = kiln.build_step(
                "true",
                |mut e| {
                    e.meta.ulimit = vec![pb::Ulimit {
                        name: "nofile".into(),
                        soft: 1024,
                        hard: i64::try_from(hard).unwrap_or(i64::MAX / 4) * 2,
                    }];
                    e
                },
                &[],
            )?;
            ensure!(
                !out.success() && out.error_line().contains("nofile")
                    || out.error_line().to_lowercase().contains("rlimit"),
                "{}",
                out.stderr
            );
        }
        Ok(())
    })
}

/// A step without network sees only `lo`; its hostname and its processes are its own.
pub fn namespaces_are_private() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let marker = unique();
        let script = "ls /sys/class/net > /result; hostname >> /result; \
             ps -o pid,comm 2>/dev/null | wc -l >> /result; \
             hostname pwned-host 2>/dev/null; true";
        let out = kiln
            .build_step(
                script,
                |mut e| {
                    e.network = pb::NetMode::None;
                    e.meta.hostname = marker.clone();
                    e
                },
                &[],
            )?
            .ok()?;
        let result = out.exported("result").unwrap_or_default();
        let mut lines = result.lines();
        ensure!(
            lines.next() == Some("lo") && lines.next() == Some(marker.as_str()),
            "{result}"
        );
        let processes: usize = lines.next().unwrap_or("99").trim().parse().unwrap_or(99);
        ensure!(processes <= 6, "the step sees {processes} processes");
        Ok(())
    })
}
