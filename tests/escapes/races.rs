//! Races: a racer swaps paths in a cache directory while kiln sets up victim steps that
//! mount it. The racer is a thread of the test working on the cache directory's host
//! side (cache directories are plain binds of a snapshot directory, so kiln sees every
//! swap at once), exchanging a directory and a symlink to the host's canary directory
//! (or to `/`) with `renameat2(RENAME_EXCHANGE)` in a tight loop, as runc's and
//! libpathrs's rename-attack tests do. Each victim start is one iteration; escapes (the
//! canary read, written or created under, a mount outside the step) must be 0; failed
//! starts are counted as spurious.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context as _, bail, ensure};
use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount};
use kiln_proto::encode::GogoEncode as _;
use kiln_proto::pb;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use crate::harness::{
    CANARY_SECRET, HostWatch, Kiln, base, graph, race_iterations, sh, unique, walk, with_host,
};

/// Victims per build: the join step mounts every victim's root.
const PER_BUILD: usize = 50;

/// Finds the host directory of cache `id` by a marker a step writes into it.
fn cache_dir(kiln: &Kiln, id: &str) -> anyhow::Result<PathBuf> {
    let marker = format!("marker-{}", unique());
    let def = graph(|b, base| {
        let exec = sh(Some(base), &format!("touch /cache/{marker}")).mount(ExecMount::cache(
            "/cache",
            id,
            pb::CacheSharingOpt::Shared,
        ));
        b.exec(&exec).root().expect("root")
    });
    kiln.build(&def, &[])?.ok()?;
    let snapshots = kiln.state().join("snapshots");
    walk(&snapshots)
        .into_iter()
        .find(|p| p.ends_with(&marker))
        .and_then(|p| snapshots.join(p).parent().map(Path::to_path_buf))
        .context("the cache directory was not found")
}

/// Exchanges `name` with each of `alternatives` in `dir`, over and over, until stopped.
struct Racer {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Racer {
    fn start(dir: &Path, name: &str, alternatives: Vec<PathBuf>) -> anyhow::Result<Racer> {
        let target = dir.join(name);
        std::fs::create_dir_all(&target)?;
        let mut others = Vec::new();
        for (i, link_target) in alternatives.iter().enumerate() {
            let other = dir.join(format!("{name}-alt{i}"));
            let _ = std::fs::remove_file(&other);
            std::os::unix::fs::symlink(link_target, &other)?;
            others.push(other);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for other in &others {
                        // Swap in the symlink, then back: `target` is a symlink half the time.
                        for _ in 0..2 {
                            if renameat2(
                                AT_FDCWD,
                                &target,
                                AT_FDCWD,
                                other,
                                RenameFlags::RENAME_EXCHANGE,
                            )
                            .is_ok()
                            {
                                swaps.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        };
        Ok(Racer {
            stop,
            swaps,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs [`race_iterations`] victims (`victim` adjusts each step, `script` runs in it and
/// prints what it saw) in builds of [`PER_BUILD`] while the racer swaps.
fn race(
    kiln: &Kiln,
    host: &HostWatch,
    racer: Racer,
    victim: &dyn Fn(Exec) -> Exec,
    script: &str,
) -> anyhow::Result<()> {
    let iterations = race_iterations();
    let (mut done, mut spurious) = (0, 0);
    while done < iterations {
        let count = PER_BUILD.min(iterations - done);
        let nonce = unique();
        let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
        let base = base(&mut b);
        let mut join = sh(
            Some(base.clone()),
            "cat /v/*/result > /results 2>/dev/null; true",
        );
        for i in 0..count {
            let exec = victim(sh(
                Some(base.clone()),
                &format!("( {script} ) > /result 2>&1; true # {nonce} {i}"),
            ));
            let step = b.exec(&exec);
            join = join.mount(ExecMount::bind(&format!("/v/{i}"), step.root()).readonly());
        }
        let joined = b.exec(&join).root().expect("root");
        let def = b.finish(&joined).gogo_encode();
        let out = kiln.build_exported(&def, &[])?;
        host.untouched()?;
        if out.success() {
            let results = out.exported("results").unwrap_or_default();
            ensure!(
                !results.contains(CANARY_SECRET) && !results.contains("ESCAPED"),
                "a victim reached the host:\n{results}"
            );
        } else {
            // A victim whose setup lost the race fails the build (a clean error); the
            // others of that build did not run.
            ensure!(
                !out.stderr.contains("internal error"),
                "kiln failed badly: {}",
                out.stderr
            );
            spurious += 1;
        }
        done += count;
    }
    let swaps = racer.finish();
    eprintln!(
        "race: {iterations} victim starts in {} builds, {spurious} builds failed cleanly, {swaps} swaps",
        iterations.div_ceil(PER_BUILD)
    );
    if spurious * PER_BUILD > iterations / 2 + PER_BUILD {
        bail!("most builds failed: {spurious}");
    }
    ensure!(swaps > 0, "the racer never swapped");
    Ok(())
}

/// CVE-2021-30465 and CVE-2024-45310: `/vol/a` (in a cache shared with the racer) is
/// swapped with symlinks to the host's canary directory and to `/` while kiln creates
/// the missing `/vol/a/x/y` and mounts a tmpfs on it. Nothing may be created, mounted or
/// written in the canary directory, and no victim may read the canary.
pub fn cve_2021_30465_mount_destination_race() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let dir = cache_dir(kiln, "race")?;
        let racer = Racer::start(&dir, "a", vec![host.dir().to_owned(), PathBuf::from("/")])?;
        let canary = host.dir().display();
        race(
            kiln,
            host,
            racer,
            &|e: Exec| {
                e.mount(ExecMount::cache(
                    "/vol",
                    "race",
                    pb::CacheSharingOpt::Shared,
                ))
                .mount(ExecMount::tmpfs("/vol/a/x/y", 0))
            },
            &format!(
                "touch /vol/a/x/y/pwned /vol/a/pwned 2>/dev/null; \
                 cat {canary}/secret /vol/a/secret 2>/dev/null | sed s/{CANARY_SECRET}/ESCAPED/"
            ),
        )
    })
}

/// CVE-2024-23651: the cache sub-directory `sub` is swapped with symlinks to the host's
/// canary directory and to `/` while victims mount the cache with the selector `sub`.
/// Victims see the real directory or fail cleanly, never the canary.
pub fn cve_2024_23651_cache_selector_race() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let dir = cache_dir(kiln, "race")?;
        let racer = Racer::start(&dir, "sub", vec![host.dir().to_owned(), PathBuf::from("/")])?;
        let canary = host.dir().display();
        race(
            kiln,
            host,
            racer,
            &|e: Exec| {
                e.mount(ExecMount::cache("/c", "race", pb::CacheSharingOpt::Shared).selector("sub"))
            },
            &format!(
                "cat /c/secret /c{canary}/secret 2>/dev/null | sed s/{CANARY_SECRET}/ESCAPED/; \
                 touch /c/pwned 2>/dev/null; true"
            ),
        )
    })
}
