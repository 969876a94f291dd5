//! What a step sees, checked inside the busybox image, as root and as the unprivileged test
//! user (inside kiln's user namespace): id maps, capabilities per mode and user, hostname
//! and /etc/hosts, open descriptors, masks, cwd creation, user lookups, ulimits, exit codes
//! and signals, cancellation, network modes, stub cleanup.

mod common;

use std::time::Duration;

use common::{busybox, expect_eq, output_of, run, run_with, stdout, step};
use kiln_executor::hosts::ExtraHost;
use kiln_executor::spec::{Network, Security, StepMount, StepMountKind};
use kiln_executor::userns;
use kiln_proto::pb;
use tokio_util::sync::CancellationToken;

fn cap_line(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
        .unwrap_or_default()
        .to_owned()
}

fn id_maps() -> Result<(), String> {
    let rootfs = busybox();
    let out = output_of(&step(
        rootfs.path(),
        "cat /proc/self/uid_map /proc/self/gid_map",
    ))?;
    let rows: Vec<Vec<u64>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .collect();
    if common::in_user_namespace() {
        // Inside, the plan would see uid 0: derive it from the test user's entries.
        let user = nix::unistd::User::from_name(kiln_testsupport::TEST_USER)
            .ok()
            .flatten()
            .ok_or("no test user")?;
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        let ranges = |file: &str, own: u32| -> Vec<Vec<u64>> {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let mut rows = vec![vec![0, u64::from(own), 1]];
            let mut next = 1u64;
            for (start, count) in
                userns::parse_subordinate(&text, Some(kiln_testsupport::TEST_USER), uid)
            {
                rows.push(vec![next, start.into(), count.into()]);
                next += u64::from(count);
            }
            rows
        };
        let mut want = ranges("/etc/subuid", uid);
        want.extend(ranges("/etc/subgid", gid));
        if rows != want {
            return Err(format!("maps {rows:?}, want {want:?}"));
        }
    } else if rows != vec![vec![0, 0, 4_294_967_295]; 2] {
        return Err(format!("rootful maps {rows:?}"));
    }
    Ok(())
}

fn capabilities() -> Result<(), String> {
    let rootfs = busybox();
    let script = "cat /proc/self/status";
    let root = output_of(&step(rootfs.path(), script))?;
    for (set, want) in [
        ("CapEff", "00000000a80425fb"),
        ("CapPrm", "00000000a80425fb"),
        ("CapBnd", "00000000a80425fb"),
        ("CapInh", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        expect_eq(&format!("root {set}"), &cap_line(&root, set), want)?;
    }
    let mut user = step(rootfs.path(), script);
    user.user = "1000:1000".into();
    let user = output_of(&user)?;
    for (set, want) in [
        ("CapEff", "0000000000000000"),
        ("CapPrm", "0000000000000000"),
        ("CapBnd", "00000000a80425fb"),
        ("CapInh", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        expect_eq(&format!("uid 1000 {set}"), &cap_line(&user, set), want)?;
    }
    let mut insecure = step(rootfs.path(), script);
    insecure.security = Security::Insecure;
    let insecure = output_of(&insecure)?;
    let caller = kiln_executor::caps::caller_bounding().map_err(|e| e.to_string())?;
    let want = format!("{:016x}", kiln_executor::caps::mask(&caller));
    expect_eq("insecure CapEff", &cap_line(&insecure, "CapEff"), &want)?;
    expect_eq(
        "insecure CapInh",
        &cap_line(&insecure, "CapInh"),
        "0000000000000000",
    )
}

fn hostname_and_hosts() -> Result<(), String> {
    let rootfs = busybox();
    let default = output_of(&step(rootfs.path(), "hostname; echo $HOSTNAME"))?;
    expect_eq(
        "default hostname",
        &default,
        "buildkitsandbox\nbuildkitsandbox",
    )?;
    let mut custom = step(rootfs.path(), "hostname; cat /etc/hosts");
    custom.hostname = "testtest".into();
    custom.extra_hosts = vec![ExtraHost::parse("db.local", "10.1.2.3").map_err(|e| e.to_string())?];
    let out = output_of(&custom)?;
    expect_eq(
        "custom hosts",
        &out,
        "testtest\n127.0.0.1\tlocalhost testtest\n::1\tlocalhost ip6-localhost ip6-loopback\n10.1.2.3\tdb.local",
    )
}

fn open_descriptors() -> Result<(), String> {
    let rootfs = busybox();
    // ls itself holds 3 (the directory it reads); nothing else may be open.
    let out = output_of(&step(rootfs.path(), "ls /proc/self/fd"))?;
    expect_eq("fds", &out, "0\n1\n2\n3")
}

fn default_signal_dispositions() -> Result<(), String> {
    let rootfs = busybox();
    // kiln ignores SIGPIPE (as Rust programs do); the step must not inherit that, nor a
    // blocked signal: `yes | head -n1` ends `yes` by SIGPIPE, as under runc.
    let out = output_of(&step(
        rootfs.path(),
        "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -n1",
    ))?;
    expect_eq(
        "ignored and blocked signals",
        &out,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\ny",
    )
}

fn masked_and_readonly_paths() -> Result<(), String> {
    let rootfs = busybox();
    let script = "
        test -z \"$(cat /proc/kcore 2>/dev/null | head -c 16)\" || exit 11
        test -z \"$(ls /proc/acpi)\" || exit 12
        echo 1 > /proc/sys/kernel/domainname 2>/dev/null && exit 13
        touch /sys/kiln 2>/dev/null && exit 14
        mkdir /sys/fs/cgroup/cpuset/kiln 2>/dev/null && exit 15
        umount /proc/kcore 2>/dev/null && exit 16
        echo ok";
    let out = output_of(&step(rootfs.path(), script))?;
    expect_eq("masks", &out, "ok")
}

fn cwd_is_created_for_the_user() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "pwd; stat -c %u:%g:%a /work/a/b /work/a");
    s.cwd = "/work/a/b".into();
    s.user = "1000:1000".into();
    let out = output_of(&s)?;
    expect_eq("cwd", &out, "/work/a/b\n1000:1000:755\n1000:1000:755")
}

fn user_lookups() -> Result<(), String> {
    let rootfs = busybox();
    let cases = [
        ("daemon", "id -nu", "daemon"),
        ("daemon:daemon", "id -ng", "daemon"),
        ("daemon:nobody", "id -ng", "nobody"),
        ("1:1", "id -g", "1"),
        ("root", "id -Gn", "root wheel"),
        ("", "id -Gn", "root wheel"),
        ("4242", "id -u; id -g", "4242\n0"),
    ];
    for (user, script, want) in cases {
        let mut s = step(rootfs.path(), script);
        s.user = user.into();
        expect_eq(&format!("user {user:?}"), &output_of(&s)?, want)?;
    }
    let mut missing = step(rootfs.path(), "true");
    missing.user = "nobody-here".into();
    match run_with(&missing, CancellationToken::new()) {
        Err(e) if e.contains("unable to find user nobody-here") => {}
        other => return Err(format!("missing user: {other:?}")),
    }
    // Without /etc/passwd the default user is still root.
    let bare = busybox();
    std::fs::remove_file(bare.path().join("etc/passwd")).map_err(|e| e.to_string())?;
    std::fs::remove_file(bare.path().join("etc/group")).map_err(|e| e.to_string())?;
    expect_eq("no passwd", &output_of(&step(bare.path(), "id -u"))?, "0")
}

fn ulimits() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "ulimit -Sn; ulimit -Hn");
    s.ulimits = vec![pb::Ulimit {
        name: "nofile".into(),
        soft: 1024,
        hard: 4096,
    }];
    expect_eq("nofile", &output_of(&s)?, "1024\n4096")
}

fn exit_codes_and_signals() -> Result<(), String> {
    let rootfs = busybox();
    let r = run(&step(rootfs.path(), "echo failing; exit 3"));
    if r.exit.exit_code != 3 || r.exit.signal.is_some() || stdout(&r).trim() != "failing" {
        return Err(format!("exit 3 gave {:?}", r.exit));
    }
    let r = run(&step(rootfs.path(), "kill -9 $$"));
    if r.exit.exit_code != 137 || r.exit.signal != Some(9) {
        return Err(format!("kill -9 gave {:?}", r.exit));
    }
    let r = run(&step(rootfs.path(), "exec /no/such/program"));
    if r.exit.exit_code != 127 {
        return Err(format!("missing program gave {:?}", r.exit));
    }
    let mut missing = step(rootfs.path(), "true");
    missing.args = vec!["no-such-command".into()];
    match run_with(&missing, CancellationToken::new()) {
        Err(e) if e.contains("executable file not found in $PATH") => Ok(()),
        other => Err(format!("unknown command: {other:?}")),
    }
}

fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
                })
                .count()
        })
        .unwrap_or(0)
}

fn cancellation_kills_every_process() -> Result<(), String> {
    let rootfs = busybox();
    let marker = format!("{}", 9_000_000 + std::process::id());
    let s = step(
        rootfs.path(),
        &format!("sleep {marker} & setsid sleep {marker} & sleep {marker}"),
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        trigger.cancel();
    });
    let started = std::time::Instant::now();
    let result = run_with(&s, cancel)?;
    let elapsed = started.elapsed();
    watcher.join().map_err(|_| "watcher panicked".to_owned())?;
    if !result.exit.cancelled {
        return Err(format!("not reported as cancelled: {:?}", result.exit));
    }
    // Correctness, not speed: the step would otherwise sleep for months.
    if elapsed > Duration::from_secs(30) {
        return Err("cancellation did not end the step".into());
    }
    match processes_with(&marker) {
        0 => Ok(()),
        n => Err(format!("{n} processes of the step survived cancellation")),
    }
}

fn leftover_background_processes_are_killed() -> Result<(), String> {
    let rootfs = busybox();
    let marker = format!("{}", 8_000_000 + std::process::id());
    output_of(&step(
        rootfs.path(),
        &format!("sleep {marker} & echo started"),
    ))?;
    match processes_with(&marker) {
        0 => Ok(()),
        n => Err(format!("{n} background processes outlived the step")),
    }
}

fn network_none_has_only_lo() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "ls /sys/class/net");
    s.network = Network::None;
    expect_eq("interfaces", &output_of(&s)?, "lo")?;
    let mut ping = step(
        rootfs.path(),
        "ping -c1 -W2 $(hostname) >/dev/null && echo ok",
    );
    ping.network = Network::None;
    expect_eq("ping own hostname", &output_of(&ping)?, "ok")
}

fn network_host_shows_host_interfaces() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "ls /sys/class/net");
    s.network = Network::Host;
    let mut host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    expect_eq("host interfaces", &output_of(&s)?, &host.join("\n"))
}

fn readonly_rootfs() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "touch /foo");
    s.readonly_rootfs = true;
    s.mounts = vec![StepMount {
        destination: "/mnt".into(),
        kind: StepMountKind::Tmpfs {
            size: 0,
            readonly: false,
        },
    }];
    let r = run(&s);
    if r.exit.exit_code == 0 || rootfs.path().join("foo").exists() {
        return Err("wrote to a read-only rootfs".into());
    }
    let mut ok = step(rootfs.path(), "touch /mnt/x && echo ok");
    ok.readonly_rootfs = true;
    ok.mounts = s.mounts.clone();
    expect_eq("tmpfs on read-only root", &output_of(&ok)?, "ok")
}

fn mount_stubs_are_removed() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "touch /keep/file");
    s.mounts = vec![
        StepMount {
            destination: "/a/b/c".into(),
            kind: StepMountKind::Tmpfs {
                size: 0,
                readonly: false,
            },
        },
        StepMount {
            destination: "/keep/m".into(),
            kind: StepMountKind::Tmpfs {
                size: 0,
                readonly: false,
            },
        },
    ];
    output_of(&s)?;
    if rootfs.path().join("a").exists() {
        return Err("stub /a left behind".into());
    }
    if !rootfs.path().join("keep/file").exists() || rootfs.path().join("keep/m").exists() {
        return Err("a non-empty parent was removed or /keep/m stayed".into());
    }
    Ok(())
}

fn tmpfs_size_and_shm_override() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "mount | grep -E ' /dev/shm | /t '");
    s.mounts = vec![
        StepMount {
            destination: "/dev/shm".into(),
            kind: StepMountKind::Tmpfs {
                size: 134_217_728,
                readonly: false,
            },
        },
        StepMount {
            destination: "/t".into(),
            kind: StepMountKind::Tmpfs {
                size: 65536,
                readonly: false,
            },
        },
    ];
    let out = output_of(&s)?;
    if !out.contains("size=131072k") || !out.contains("size=64k") {
        return Err(format!("tmpfs sizes: {out}"));
    }
    Ok(())
}

/// `/proc/mounts` names each filesystem's source as under runc/BuildKit (`tmpfs` for a
/// tmpfs mount, `proc`, `devpts`, `shm`, `mqueue`), never `none`: build tools read it.
fn mount_sources_are_named() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(rootfs.path(), "cat /proc/mounts");
    s.mounts = vec![StepMount {
        destination: "/t".into(),
        kind: StepMountKind::Tmpfs {
            size: 0,
            readonly: false,
        },
    }];
    let out = output_of(&s)?;
    let source_of = |target: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(target))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    };
    for (target, want) in [
        ("/t", "tmpfs"),
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "shm"),
        ("/dev/mqueue", "mqueue"),
    ] {
        if source_of(target).as_deref() != Some(want) {
            return Err(format!("source of {target} is not {want}:\n{out}"));
        }
    }
    if out.lines().any(|l| l.starts_with("none ")) {
        return Err(format!("a mount without a source:\n{out}"));
    }
    Ok(())
}

fn seccomp_blocks_namespace_syscalls() -> Result<(), String> {
    let rootfs = busybox();
    let out = output_of(&step(
        rootfs.path(),
        "unshare -U true 2>&1 && echo allowed || echo denied",
    ))?;
    if !out.contains("denied") {
        return Err(format!("unshare was allowed: {out}"));
    }
    Ok(())
}

fn insecure_mode_has_writable_sysfs_and_cgroups() -> Result<(), String> {
    let rootfs = busybox();
    let mut s = step(
        rootfs.path(),
        "mkdir /sys/fs/cgroup/cpuset/kilntest && rmdir /sys/fs/cgroup/cpuset/kilntest && echo ok",
    );
    s.security = Security::Insecure;
    // Needs a cgroup kiln may write: real root here, a delegated subtree rootless.
    let writable = kiln_executor::cgroup::availability(!common::in_user_namespace()).is_ok();
    if !kiln_testsupport::require(writable, "a writable (delegated) cgroup for this user") {
        return Ok(());
    }
    expect_eq("insecure cgroup mkdir", &output_of(&s)?, "ok")?;
    let mut sandbox = step(rootfs.path(), "mkdir /sys/fs/cgroup/cpuset/kilntest");
    sandbox.security = Security::Sandbox;
    if run(&sandbox).exit.exit_code == 0 {
        return Err("sandbox step could create a cgroup".into());
    }
    Ok(())
}

common::both_modes! {
    uid_and_gid_maps => id_maps;
    capability_sets_per_mode_and_user => capabilities;
    hostname_and_etc_hosts => hostname_and_hosts;
    only_standard_descriptors_are_open => open_descriptors;
    signals_start_with_default_dispositions => default_signal_dispositions;
    masked_paths_and_readonly_proc_sys => masked_and_readonly_paths;
    cwd_created_and_owned_by_the_user => cwd_is_created_for_the_user;
    buildkit_user_lookups => user_lookups;
    ulimits_apply => ulimits;
    exit_codes_signals_and_missing_commands => exit_codes_and_signals;
    cancellation_leaves_no_process => cancellation_kills_every_process;
    background_processes_die_with_the_step => leftover_background_processes_are_killed;
    network_none_only_loopback => network_none_has_only_lo;
    network_host_sees_host_interfaces => network_host_shows_host_interfaces;
    readonly_rootfs_refuses_writes => readonly_rootfs;
    empty_mount_stubs_are_removed => mount_stubs_are_removed;
    tmpfs_sizes_and_dev_shm_override => tmpfs_size_and_shm_override;
    mounts_show_their_sources => mount_sources_are_named;
    seccomp_denies_unshare => seccomp_blocks_namespace_syscalls;
    insecure_cgroups_writable_sandbox_not => insecure_mode_has_writable_sysfs_and_cgroups;
}
