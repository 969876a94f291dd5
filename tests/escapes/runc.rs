//! The runc lineage (part A.1 of ../shared/research/executor-security-and-style.md), each
//! tried through `kiln build` or `kiln run` on a hostile root filesystem.

use anyhow::{bail, ensure};
use kiln_proto::pb;

use crate::harness::{HostWatch, Kiln, plant_symlink, with_host};

/// CVE-2019-5736: a `#!/proc/self/exe` entrypoint and writes through every
/// `/proc/<pid>/exe` never reach kiln's binary (the harness compares its hash).
pub fn cve_2019_5736_proc_self_exe() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        std::fs::write(kiln.rootfs().join("evil"), "#!/proc/self/exe\n")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            kiln.rootfs().join("evil"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        let script = "/evil >/dev/null 2>&1 & \
             for i in 1 2 3; do for p in /proc/[0-9]*; do \
               (echo pwned >> $p/exe) 2>/dev/null && echo wrote-$p; \
               (exec 3<>$p/exe) 2>/dev/null && echo opened-$p; \
             done; done; (echo pwned > /proc/self/exe) 2>/dev/null && echo wrote-self; \
             wait; echo done > /tmp/result";
        let out = kiln.build_step(script, |e| e, &[])?.ok()?;
        ensure!(
            out.exported("tmp/result").as_deref() == Some("done\n"),
            "the step wrote to an executable: {}",
            out.stderr
        );
        Ok(())
    })
}

/// CVE-2016-9962: the step's init (still kiln's image until it forks the command) is not
/// dumpable: its descriptors, environment and root are out of reach.
pub fn cve_2016_9962_init_not_inspectable() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        // Reading, not listing: the names under /proc/1 are visible, what they lead to
        // must not be (environment, memory, root, cwd, the targets of its descriptors, one
        // of which is the host's root).
        let script = "cat /proc/1/environ >/dev/null 2>&1 && echo environ >> /tmp/result; \
             head -c1 /proc/1/mem >/dev/null 2>&1 && echo mem >> /tmp/result; \
             for d in root cwd; do ls /proc/1/$d/ >/dev/null 2>&1 && echo $d >> /tmp/result; done; \
             for fd in /proc/1/fd/*; do \
               readlink $fd >/dev/null 2>&1 && echo link-$fd >> /tmp/result; \
               ls $fd/ >/dev/null 2>&1 && echo dir-$fd >> /tmp/result; \
             done; \
             echo checked >> /tmp/result";
        for user in ["", "1000:1000"] {
            let out = kiln
                .build_step(
                    script,
                    |e| if user.is_empty() { e } else { e.user(user) },
                    &[],
                )?
                .ok()?;
            ensure!(
                out.exported("tmp/result").as_deref() == Some("checked\n"),
                "init inspectable (user {user:?}): {:?} {}",
                out.exported("tmp/result"),
                out.stderr
            );
        }
        Ok(())
    })
}

/// CVE-2019-16884 / CVE-2025-52881: a mount over `/proc` (or over files kiln or the
/// kernel use under it) must not fool kiln: refused, or `/proc` stays the real, masked
/// procfs and the host's sysctls are not written.
pub fn cve_2019_16884_mounts_over_proc() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        for dest in [
            "/proc",
            "/proc/self/attr",
            "/proc/sys",
            "/proc/sysrq-trigger",
            "/proc/sys/kernel",
        ] {
            let script = "stat -f -c %T /proc > /tmp/result; \
                 test -z \"$(head -c 8 /proc/kcore 2>/dev/null)\" && echo kcore-masked >> /tmp/result; \
                 echo pwned > /proc/sys/kernel/core_pattern 2>/dev/null && echo wrote >> /tmp/result; \
                 true";
            let out = kiln.build_step(
                script,
                |e| e.mount(kiln_proto::builder::ExecMount::tmpfs(dest, 0)),
                &[],
            )?;
            if !out.success() {
                // Refused: that is one of the two good outcomes.
                continue;
            }
            let result = out.exported("tmp/result").unwrap_or_default();
            if dest == "/proc" {
                // A tmpfs the step asked for may shadow /proc (BuildKit allows it), but
                // then there is no procfs to misuse.
                ensure!(!result.contains("wrote"), "tmpfs on /proc: {result}");
            } else {
                ensure!(
                    result.starts_with("proc\n")
                        && result.contains("kcore-masked")
                        && !result.contains("wrote"),
                    "mount at {dest}: {result:?}"
                );
            }
        }
        Ok(())
    })
}

/// CVE-2019-19921 / CVE-2023-27561 / CVE-2023-28642: `/proc` or `/sys` as a symlink
/// (absolute or relative, to a directory or to the host) is refused.
pub fn cve_2019_19921_proc_sys_symlinks() -> anyhow::Result<()> {
    for (dir, target) in [
        ("proc", "/bad"),
        ("sys", "/bad"),
        ("proc", "../../../../tmp"),
        ("sys", "/proc"),
    ] {
        with_host(|kiln, host| {
            std::fs::create_dir_all(kiln.rootfs().join("bad"))?;
            let target = if target == "../../../../tmp" {
                format!("../../../..{}", host.dir().display())
            } else {
                target.to_owned()
            };
            plant_symlink(kiln.rootfs(), dir, &target)?;
            let out = kiln.build_step("echo ran > /tmp/result", |e| e, &[])?;
            ensure!(
                !out.success(),
                "/{dir} -> {target}: the step ran:\n{}",
                out.stderr
            );
            ensure!(
                out.error_line().contains("symlink"),
                "/{dir} -> {target}: {}",
                out.error_line()
            );
            Ok(())
        })?;
    }
    Ok(())
}

/// CVE-2023-25809: every sysfs and cgroup mount a step sees is read-only (with and
/// without the host network, where rootless sysfs is a bind of the host's).
pub fn cve_2023_25809_readonly_sys() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let script = "grep -E ' /sys' /proc/self/mounts | grep -v ' ro,' > /tmp/result; \
             mkdir /sys/fs/cgroup/kiln-escape 2>/dev/null && echo mkdir >> /tmp/result; \
             echo 1 > /sys/kernel/uevent_helper 2>/dev/null && echo uevent >> /tmp/result; true";
        for network in [pb::NetMode::Unset, pb::NetMode::Host, pb::NetMode::None] {
            let out = kiln
                .build_step(
                    script,
                    |mut e| {
                        e.network = network;
                        e
                    },
                    &["--allow", "network.host"],
                )?
                .ok()?;
            let result = out.exported("tmp/result").unwrap_or_default();
            ensure!(
                result.is_empty(),
                "writable /sys with {network:?}: {result}"
            );
        }
        Ok(())
    })
}

/// CVE-2024-21626: a cwd of `/proc/self/fd/N` never starts the step outside its root,
/// and the step sees no descriptor but 0, 1 and 2 (runc's "detect fd leak" test: every
/// descriptor of every process of the step, with allowed targets only).
pub fn cve_2024_21626_leaked_descriptors() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        for fd in 3..12 {
            let cwd = format!("/proc/self/fd/{fd}");
            let out = kiln.build_step(
                "pwd > /tmp/result; ls /proc/self/cwd/ >> /tmp/result 2>&1; cat ../../../../..$CANARY >> /tmp/result 2>&1; true",
                |e| e.cwd(&cwd).env(&format!("CANARY={}/secret", host.dir().display())),
                &[],
            )?;
            if out.success() {
                let result = out.exported("tmp/result").unwrap_or_default();
                ensure!(
                    !result.contains(crate::harness::CANARY_SECRET)
                        && !result.contains("(unreachable)"),
                    "cwd {cwd} reached the host: {result}"
                );
            }
        }
        let script = "for p in /proc/[0-9]*; do for f in $p/fd/*; do \
               t=$(readlink $f) || continue; echo \"${f#/proc/} $t\"; done; done > /fds 2>/dev/null; \
             grep -v -E ' (/dev/null|pipe:\\[[0-9]+\\]|/fds|/proc/[0-9]+/fd)$' /fds > /tmp/result; true";
        let out = kiln.build_step(script, |e| e, &[])?.ok()?;
        let leaked = out.exported("tmp/result").unwrap_or_default();
        ensure!(
            leaked.is_empty(),
            "descriptors the step should not have:\n{leaked}"
        );
        // And kiln run, which starts the step from the user's own process.
        let out = kiln.run(&["--", "sh", "-c", "ls /proc/self/fd"])?.ok()?;
        let fds: Vec<&str> = out.stdout.split_whitespace().collect();
        ensure!(
            fds.iter().all(|f| ["0", "1", "2", "3"].contains(f)),
            "kiln run leaked descriptors: {fds:?}"
        );
        Ok(())
    })
}

/// CVE-2025-31133: masks come from the real null device whatever `/dev/null` is in the
/// image (a symlink to `core_pattern`, a regular file, a directory).
pub fn cve_2025_31133_devnull() -> anyhow::Result<()> {
    for plant in ["symlink", "file", "dir"] {
        with_host(|kiln, _| {
            let null = kiln.rootfs().join("dev/null");
            std::fs::create_dir_all(kiln.rootfs().join("dev"))?;
            let _ = std::fs::remove_file(&null);
            match plant {
                "symlink" => {
                    plant_symlink(kiln.rootfs(), "dev/null", "/proc/sys/kernel/core_pattern")?
                }
                "file" => std::fs::write(&null, "not a device")?,
                _ => std::fs::create_dir(&null)?,
            }
            let script = "test -z \"$(head -c 8 /proc/kcore 2>/dev/null)\" && echo masked > /tmp/result; \
                 echo '|/bin/sh -c pwned' > /proc/sys/kernel/core_pattern 2>/dev/null && echo wrote >> /tmp/result; \
                 stat -c %t:%T /dev/null >> /tmp/result; true";
            let out = kiln.build_step(script, |e| e, &[])?;
            if out.success() {
                let result = out.exported("tmp/result").unwrap_or_default();
                ensure!(
                    result == "masked\n1:3\n",
                    "/dev/null as a {plant}: {result:?}"
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// CVE-2025-52565: kiln allocates no terminal; a `/dev/console` or `/dev/pts/0` planted
/// as a symlink to a procfs file is never bound or written.
pub fn cve_2025_52565_console() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        plant_symlink(
            kiln.rootfs(),
            "dev/console",
            "/proc/sys/kernel/core_pattern",
        )?;
        plant_symlink(kiln.rootfs(), "dev/pts/0", "/proc/sys/kernel/core_pattern")?;
        plant_symlink(kiln.rootfs(), "dev/ptmx", "/proc/sysrq-trigger")?;
        let out = kiln.build_step(
            "echo x > /dev/console 2>/dev/null; echo '|/pwn' > /dev/pts/0 2>/dev/null; echo ok > /tmp/result",
            |e| e,
            &[],
        )?;
        if out.success() {
            ensure!(
                out.exported("tmp/result").as_deref() == Some("ok\n"),
                "{}",
                out.stderr
            );
        }
        Ok(())
    })
}

/// CVE-2026-41579: `/dev` as a symlink to a host directory holding a `ptmx` canary; the
/// `/dev` setup must neither remove it nor create anything there.
pub fn cve_2026_41579_dev_symlink() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        plant_symlink(kiln.rootfs(), "dev", &host.dir().display().to_string())?;
        let _ = kiln.build_step("ls /dev > /tmp/result", |e| e, &[])?;
        let _ = kiln.run(&["--", "ls", "/dev"])?;
        Ok(())
    })
}

/// CVE-2022-29162 and the capability sets: inheritable and ambient are empty, the
/// bounding set is BuildKit's default (containerd's set), a non-root user has no
/// effective or permitted capabilities, and only an allowed insecure step gets more.
pub fn cve_2022_29162_capabilities() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        const DEFAULT: u64 = 0xa804_25fb;
        let script = "grep ^Cap /proc/self/status > /tmp/result";
        let caps = |user: &str, insecure: bool| -> anyhow::Result<[u64; 5]> {
            let extra: &[&str] = if insecure {
                &["--allow", "security.insecure"]
            } else {
                &[]
            };
            let out = kiln
                .build_step(
                    script,
                    |mut e| {
                        if insecure {
                            e.security = pb::SecurityMode::Insecure;
                        }
                        if user.is_empty() { e } else { e.user(user) }
                    },
                    extra,
                )?
                .ok()?;
            let text = out.exported("tmp/result").unwrap_or_default();
            let mut values = [0u64; 5];
            for (i, name) in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
                .iter()
                .enumerate()
            {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(name))
                    .ok_or_else(|| anyhow::anyhow!("no {name} in {text}"))?;
                values[i] = u64::from_str_radix(line.split_whitespace().nth(1).unwrap_or(""), 16)?;
            }
            Ok(values)
        };
        let [inh, prm, eff, bnd, amb] = caps("", false)?;
        ensure!(
            inh == 0 && amb == 0 && bnd == DEFAULT && eff == DEFAULT && prm == DEFAULT,
            "root in a sandbox step: inh {inh:x} prm {prm:x} eff {eff:x} bnd {bnd:x} amb {amb:x}"
        );
        let [inh, prm, eff, bnd, amb] = caps("1000:1000", false)?;
        ensure!(
            inh == 0 && amb == 0 && prm == 0 && eff == 0 && bnd == DEFAULT,
            "uid 1000 in a sandbox step: inh {inh:x} prm {prm:x} eff {eff:x} bnd {bnd:x} amb {amb:x}"
        );
        let [inh, _, eff, bnd, amb] = caps("", true)?;
        ensure!(
            inh == 0 && amb == 0 && eff & DEFAULT == DEFAULT && eff != DEFAULT && bnd == eff,
            "root in an insecure step: inh {inh:x} eff {eff:x} bnd {bnd:x} amb {amb:x}"
        );
        let [inh, prm, eff, _, amb] = caps("1000:1000", true)?;
        ensure!(
            inh == 0 && amb == 0 && prm == 0 && eff == 0,
            "uid 1000 in an insecure step: inh {inh:x} prm {prm:x} eff {eff:x} amb {amb:x}"
        );
        Ok(())
    })
}

/// The `/proc` and `/sys` masks (runc's mask.bats): masked files read empty, masked
/// directories are empty, read-only paths refuse writes, and the step cannot unmount
/// any of them.
pub fn masked_and_readonly_paths() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let script = r#"
            for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats /proc/timer_stats; do
              [ -e $f ] || continue
              [ -z "$(head -c 16 $f 2>/dev/null)" ] || echo "readable $f"
            done
            for d in /proc/acpi /proc/scsi /proc/asound /sys/firmware /sys/devices/virtual/powercap; do
              [ -e $d ] || continue
              [ -z "$(ls -A $d 2>/dev/null)" ] || echo "listable $d"
              touch $d/x 2>/dev/null && echo "writable $d"
            done
            for p in /proc/sys/kernel/hostname /proc/sysrq-trigger /proc/irq /proc/bus /proc/fs; do
              [ -e $p ] || continue
              if [ -d $p ]; then touch $p/x 2>/dev/null && echo "writable $p"
              else (echo x > $p) 2>/dev/null && echo "writable $p"; fi
            done
            for m in /proc/kcore /proc/sys /sys/firmware /proc/acpi; do
              umount $m 2>/dev/null && echo "unmounted $m"
              umount -l $m 2>/dev/null && echo "detached $m"
            done
            true"#;
        for user in ["", "1000:1000"] {
            let out = kiln
                .build_step(
                    &format!("({script}) > /tmp/result"),
                    |e| if user.is_empty() { e } else { e.user(user) },
                    &[],
                )?
                .ok()?;
            let result = out.exported("tmp/result").unwrap_or_default();
            ensure!(result.is_empty(), "user {user:?}:\n{result}");
        }
        Ok(())
    })
}

/// pivot_root, not chroot: the step sees only its own mounts, never the host's or kiln's
/// state directory, and `chroot /proc/1/root` stays inside.
pub fn pivot_root_hides_the_host() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let state = kiln.state().display().to_string();
        let script = format!(
            "cat /proc/1/mountinfo /proc/self/mountinfo 2>/dev/null | cut -d' ' -f5 > /mounts; \
             grep -c -e '{state}' -e '{canary}' -e '^/work' /mounts > /tmp/result; \
             chroot /proc/1/root ls {canary} >> /tmp/result 2>&1; \
             ls / > /root-listing; true",
            canary = host.dir().display()
        );
        let out = kiln.build_step(&script, |e| e, &[])?.ok()?;
        let result = out.exported("tmp/result").unwrap_or_default();
        let mut lines = result.lines();
        ensure!(
            lines.next() == Some("0"),
            "host paths in the step's mount table: {result}"
        );
        ensure!(
            !result.contains("secret") && !result.contains("ptmx"),
            "chroot /proc/1/root reached the host: {result}"
        );
        let listing = out.exported("root-listing").unwrap_or_default();
        if listing.contains("kiln-host") {
            bail!("the host's /tmp is visible at /: {listing}");
        }
        Ok(())
    })
}

pub fn host_untouched_by_plain_build() -> anyhow::Result<()> {
    let host = HostWatch::new()?;
    let kiln = Kiln::new()?;
    kiln.build_step("echo hi > /tmp/result", |e| e, &[])?.ok()?;
    host.untouched()
}
