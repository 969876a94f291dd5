//! Races: a racer swaps paths in cache directories while kiln sets up victim steps that
//! mount them. The racer is a thread of the test working on the caches' host side (cache
//! directories are plain binds of a snapshot directory, so kiln sees every swap at once),
//! exchanging a directory with symlinks to the host's canary directory and to `/` with
//! `renameat2(RENAME_EXCHANGE)` in a tight loop, as runc's and libpathrs's rename-attack
//! tests do. Each victim mounts [`CACHES`] caches, so each victim start makes that many
//! in-root resolutions under attack: one iteration each. Escapes (the canary read, written
//! or created under, a mount outside the step) must be 0; builds that fail cleanly are
//! counted as spurious and must stay a minority.

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
const PER_BUILD: usize = 25;

/// Caches each victim mounts, each a racing path.
const CACHES: usize = 20;

/// The cache ids of a race.
fn cache_ids() -> Vec<String> {
    (0..CACHES).map(|i| format!("race{i}")).collect()
}

/// Finds the host directories of the caches `ids` by markers a step writes into them.
fn cache_dirs(kiln: &Kiln, ids: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let marker = format!("marker-{}", unique());
    let def = graph(|b, base| {
        let mut exec = sh(
            Some(base),
            &format!("for c in /cache/*; do touch $c/{marker}-${{c##*/}}; done"),
        );
        for id in ids {
            exec = exec.mount(ExecMount::cache(
                &format!("/cache/{id}"),
                id,
                pb::CacheSharingOpt::Shared,
            ));
        }
        b.exec(&exec).root().expect("root")
    });
    kiln.build(&def, &[])?.ok()?;
    let snapshots = kiln.state().join("snapshots");
    let files = walk(&snapshots);
    ids.iter()
        .map(|id| {
            let name = format!("/{marker}-{id}");
            files
                .iter()
                .find(|p| p.ends_with(&name))
                .and_then(|p| snapshots.join(p).parent().map(Path::to_path_buf))
                .with_context(|| format!("the directory of cache {id} was not found"))
        })
        .collect()
}

/// Makes, in each cache directory, a decoy at the canary's path: resolved in the cache,
/// a symlink to the canary then names an existing directory (so a victim fails only when
/// kiln does); resolved on the host it would reach the real canary.
fn decoys(dirs: &[PathBuf], host: &HostWatch) -> anyhow::Result<()> {
    for dir in dirs {
        let decoy = dir.join(host.dir().strip_prefix("/")?);
        std::fs::create_dir_all(&decoy)?;
        std::fs::write(decoy.join("secret"), "decoy")?;
    }
    Ok(())
}

/// Exchanges `name` with symlinks to each of `alternatives`, in every one of `dirs`, over
/// and over, until stopped.
struct Racer {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Racer {
    fn start(dirs: &[PathBuf], name: &str, alternatives: &[PathBuf]) -> anyhow::Result<Racer> {
        let mut pairs = Vec::new();
        for dir in dirs {
            let target = dir.join(name);
            std::fs::create_dir_all(&target)?;
            for (i, link_target) in alternatives.iter().enumerate() {
                let other = dir.join(format!("{name}-alt{i}"));
                let _ = std::fs::remove_file(&other);
                std::os::unix::fs::symlink(link_target, &other)?;
                pairs.push((target.clone(), other));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (target, other) in &pairs {
                        // In, then back: `target` is a symlink half the time.
                        for _ in 0..2 {
                            let swapped = renameat2(
                                AT_FDCWD,
                                target,
                                AT_FDCWD,
                                other,
                                RenameFlags::RENAME_EXCHANGE,
                            );
                            if swapped.is_ok() {
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

/// Runs victims until [`race_iterations`] racing resolutions were made ([`CACHES`] per
/// victim; `victim` adjusts each step, `script` runs in it and prints what it saw), in
/// builds of [`PER_BUILD`] victims, while the racer swaps.
fn race(
    kiln: &Kiln,
    host: &HostWatch,
    racer: Racer,
    victim: &dyn Fn(Exec) -> Exec,
    script: &str,
) -> anyhow::Result<()> {
    let victims = race_iterations().div_ceil(CACHES);
    let planned = victims.div_ceil(PER_BUILD);
    // A build whose victim loses the race fails cleanly and tests nothing of the others:
    // with a short budget, keep going (a few builds at most) until one has completed.
    let most = planned.max(6);
    let (mut done, mut spurious, mut builds) = (0, 0, 0);
    let mut last_error = String::new();
    while done < victims || (builds == spurious && builds < most) {
        let count = PER_BUILD.min(victims.saturating_sub(done)).max(1);
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
            // A victim whose setup lost the race fails its build (cleanly); the others of
            // that build did not run.
            ensure!(
                !out.stderr.contains("internal error"),
                "kiln failed badly: {}",
                out.stderr
            );
            spurious += 1;
            out.error_line().clone_into(&mut last_error);
        }
        done += count;
        builds += 1;
    }
    let swaps = racer.finish();
    eprintln!(
        "race: {} racing resolutions ({victims} victim starts x {CACHES} caches) in {builds} \
         builds, {spurious} builds failed cleanly, {swaps} swaps{}",
        victims * CACHES,
        if last_error.is_empty() {
            String::new()
        } else {
            format!(" (last failure: {last_error})")
        }
    );
    if builds == spurious || (builds >= 4 && spurious * 2 > builds) {
        bail!("{spurious} of {builds} builds failed, the race did not test kiln: {last_error}");
    }
    ensure!(swaps > 0, "the racer never swapped");
    Ok(())
}

/// CVE-2021-30465 and CVE-2024-45310: `/vol/<cache>/a` is swapped with symlinks to the
/// host's canary directory and to `/` while kiln creates the missing `/vol/<cache>/a/x/y`
/// and mounts a tmpfs on it. Nothing may be created, mounted or written in the canary
/// directory, and no victim may read the canary.
pub fn cve_2021_30465_mount_destination_race() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let ids = cache_ids();
        let dirs = cache_dirs(kiln, &ids)?;
        let racer = Racer::start(&dirs, "a", &[host.dir().to_owned(), PathBuf::from("/")])?;
        let canary = host.dir().display();
        race(
            kiln,
            host,
            racer,
            &|mut e: Exec| {
                for id in &ids {
                    e = e
                        .mount(ExecMount::cache(
                            &format!("/vol/{id}"),
                            id,
                            pb::CacheSharingOpt::Shared,
                        ))
                        .mount(ExecMount::tmpfs(&format!("/vol/{id}/a/x/y"), 0));
                }
                e
            },
            &format!(
                "for v in /vol/*; do touch $v/a/x/y/pwned $v/a/pwned 2>/dev/null; \
                   cat $v/a/secret 2>/dev/null; done; cat {canary}/secret 2>/dev/null | \
                 sed s/{CANARY_SECRET}/ESCAPED/"
            ),
        )
    })
}

/// CVE-2024-23651: the cache sub-directory `sub` is swapped with symlinks to the host's
/// canary directory and to `/` while victims mount the caches with the selector `sub`.
/// Victims see the real directory or a decoy inside the cache, never the canary.
pub fn cve_2024_23651_cache_selector_race() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let ids = cache_ids();
        let dirs = cache_dirs(kiln, &ids)?;
        decoys(&dirs, host)?;
        let racer = Racer::start(&dirs, "sub", &[host.dir().to_owned(), PathBuf::from("/")])?;
        let canary = host.dir().display();
        race(
            kiln,
            host,
            racer,
            &|mut e: Exec| {
                for id in &ids {
                    e = e.mount(
                        ExecMount::cache(&format!("/c/{id}"), id, pb::CacheSharingOpt::Shared)
                            .selector("sub"),
                    );
                }
                e
            },
            &format!(
                "for c in /c/*; do cat $c/secret $c{canary}/secret 2>/dev/null; \
                   touch $c/pwned 2>/dev/null; done | sed s/{CANARY_SECRET}/ESCAPED/; true"
            ),
        )
    })
}
