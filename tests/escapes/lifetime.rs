//! Killing kiln kills what it started (issue 15 part 7): `kiln build` is SIGKILLed at
//! random points of a build (before, during and after its steps start; rootless that is
//! the outer process, which cannot forward a SIGKILL to the one inside the user
//! namespace). Afterwards no kiln process, step process, mount or lock of the build may
//! be left, and the next build, which needs the same locked cache mount, succeeds.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use kiln_proto::builder::ExecMount;
use kiln_proto::pb;

use crate::harness::{locks_below, mount_points, one_step, processes_with, wait_gone, with_host};

fn rounds() -> usize {
    std::env::var("KILN_ESCAPES_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

pub fn sigkill_at_random_points() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let marker = format!("{}", 6_000_000 + std::process::id());
        let state = kiln.state().display().to_string();
        let with_cache = |script: &str| {
            one_step(script, |e| {
                e.mount(ExecMount::cache(
                    "/cache",
                    "held",
                    pb::CacheSharingOpt::Locked,
                ))
            })
            .0
        };
        let hanging = with_cache(&format!(
            "echo $$ >> /cache/starts; sleep 0.2; (sleep {marker} &); sleep {marker}"
        ));
        // xorshift: reproducible kill points.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut killed_in_step = 0;
        for round in 0..rounds() {
            let mut child = kiln
                .command()
                .args(["build", "--progress", "plain", "--no-cache", "--local"])
                .arg(format!("rootfs={}", kiln.rootfs().display()))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, &hanging)?;
            // Kill points from 0 to 1.5 s: entering the namespace, copying the context,
            // preparing mounts, inside the step.
            let delay = Duration::from_millis(next() % 1500);
            std::thread::sleep(delay);
            if !processes_with(&marker).is_empty() {
                killed_in_step += 1;
            }
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
            child.wait()?;
            let left: Vec<String> = [marker.as_str(), state.as_str()]
                .iter()
                .flat_map(|m| wait_gone(m, Duration::from_secs(10)))
                .collect();
            ensure!(
                left.is_empty(),
                "round {round} (killed after {delay:?}): processes left: {left:?}"
            );
            let locks = locks_below(kiln.state());
            ensure!(locks.is_empty(), "round {round}: locks left: {locks:?}");
            let mounts: Vec<String> = mount_points()?
                .into_iter()
                .filter(|m| m.contains(&state))
                .collect();
            ensure!(mounts.is_empty(), "round {round}: mounts left: {mounts:?}");
        }
        eprintln!(
            "killed kiln {} times, {killed_in_step} of them while the step ran",
            rounds()
        );
        // The next build takes the same locked cache mount, writes to it and finishes.
        // (What the killed builds wrote there may be gone: each ran with --no-cache, which
        // starts the cache mount afresh, as BuildKit prunes the cache ids of such steps.)
        let out = kiln
            .build_step(
                "echo usable > /cache/after && cat /cache/after > /result",
                |e| {
                    e.mount(ExecMount::cache(
                        "/cache",
                        "held",
                        pb::CacheSharingOpt::Locked,
                    ))
                },
                &[],
            )?
            .ok()?;
        ensure!(
            out.exported("result").as_deref() == Some("usable\n"),
            "{}",
            out.stderr
        );
        let mnt: Vec<_> = std::fs::read_dir(kiln.state().join("mnt"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(
            mnt.is_empty(),
            "mount directories of dead kilns left: {mnt:?}"
        );
        // The next kiln recovered what the killed ones left half-made.
        let problems = crate::harness::store_problems(kiln)?;
        ensure!(
            problems.is_empty(),
            "the snapshot store after the kills: {problems:?}"
        );
        Ok(())
    })
}
