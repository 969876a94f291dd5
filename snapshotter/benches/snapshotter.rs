//! Snapshotter benchmarks against the raw kernel and GNU tar, measured in the same run and
//! printed as ratios (not timed tests: nothing here fails on speed).
//!
//! - step cycle: kiln's prepare (new mutable) + mount + write one file + unmount + commit,
//!   against the raw overlay cycle (mkdir, mount, write one file, umount) with and without
//!   `volatile`;
//! - diff export of an upper directory (uncompressed, and gzip) against `tar -c` of the
//!   same directory into a pipe.
//!
//! Needs root (it mounts, in a private mount namespace); prints `SKIPPED` otherwise. Set
//! `KILN_BENCH_ITERS` to change the number of cycles.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_snapshotter::{Compression, ImportOptions, RefOptions, Snapshotter, unmount};
use nix::mount::{MsFlags, mount};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn raw_cycle(base: &Path, lower: &Path, i: usize, volatile: bool) -> Duration {
    let dir = base.join(format!("raw{}-{i}", u8::from(volatile)));
    let (upper, work, merged) = (dir.join("u"), dir.join("w"), dir.join("m"));
    let start = Instant::now();
    for d in [&dir, &upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if volatile {
        opts.push_str(",volatile");
    }
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    std::fs::write(merged.join("file"), b"x").unwrap();
    nix::mount::umount(&merged).unwrap();
    start.elapsed()
}

fn bench(iters: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir_in("/var/tmp")?;
    let base = tmp.path();
    let store = Snapshotter::open(&base.join("root"))?;
    println!("backend: {:?}", store.backend());
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(4);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, "base", &b"base"[..])?;
        b.into_inner()?
    };
    let parent = store.import_layer(None, &layer[..], &ImportOptions::default())?;
    let lower = parent.dir();
    let target = base.join("target");
    std::fs::create_dir(&target)?;

    let mut raw = Vec::new();
    let mut raw_volatile = Vec::new();
    let mut kiln = Vec::new();
    let mut phases: [Vec<Duration>; 4] = Default::default();
    for i in 0..iters {
        raw.push(raw_cycle(base, &lower, i, false));
        raw_volatile.push(raw_cycle(base, &lower, i, true));
        let start = Instant::now();
        let m = store.new_mutable(Some(&parent), &RefOptions::default())?;
        let t1 = Instant::now();
        m.mountable().mount(&target)?;
        std::fs::write(target.join("file"), b"x")?;
        let t2 = Instant::now();
        unmount(&target)?;
        let t3 = Instant::now();
        let committed = m.commit()?;
        let t4 = Instant::now();
        kiln.push(t4 - start);
        for (v, d) in phases
            .iter_mut()
            .zip([t1 - start, t2 - t1, t3 - t2, t4 - t3])
        {
            v.push(d);
        }
        drop(committed);
    }
    let phases = phases.map(median);
    let (raw, raw_volatile, kiln) = (median(raw), median(raw_volatile), median(kiln));
    println!("step cycle, median of {iters}:");
    println!("  raw overlay cycle (default):  {}", ms(raw));
    println!("  raw overlay cycle (volatile): {}", ms(raw_volatile));
    println!(
        "  kiln prepare+mount+write+umount+commit: {} (prepare {}, mount+write {}, umount {}, commit {})",
        ms(kiln),
        ms(phases[0]),
        ms(phases[1]),
        ms(phases[2]),
        ms(phases[3])
    );
    println!(
        "  ratio kiln/raw default = {:.2}, kiln/raw volatile = {:.2}",
        kiln.as_secs_f64() / raw.as_secs_f64(),
        kiln.as_secs_f64() / raw_volatile.as_secs_f64()
    );
    let start = Instant::now();
    store.sync()?;
    println!("  one sync of all {iters} commits: {}", ms(start.elapsed()));

    // Diff export: an upper with 2000 files, 64 MiB in all.
    let m = store.new_mutable(Some(&parent), &RefOptions::default())?;
    let upper = m.dir();
    let mut seed = 1u64;
    for d in 0..20 {
        let dir = upper.join(format!("d{d:02}"));
        std::fs::create_dir(&dir)?;
        for f in 0..100 {
            let data: Vec<u8> = (0..32 * 1024)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            std::fs::write(dir.join(format!("f{f:03}")), data)?;
        }
    }
    let top = m.commit()?;
    let rounds = 5;
    let mut ours = Vec::new();
    let mut ours_gzip = Vec::new();
    let mut tar = Vec::new();
    let mut bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        let d = store.export_layer(&top, std::io::sink(), Compression::None)?;
        ours.push(start.elapsed());
        bytes = d.uncompressed_size;
        let start = Instant::now();
        let mut child = Command::new("tar")
            .args(["-cf", "-", "-C"])
            .arg(&upper)
            .arg(".")
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().expect("piped stdout");
        let mut buf = vec![0u8; 1 << 16];
        while out.read(&mut buf)? > 0 {}
        child.wait()?;
        tar.push(start.elapsed());
    }
    for _ in 0..2 {
        let start = Instant::now();
        store.export_layer(&top, std::io::sink(), Compression::Gzip)?;
        ours_gzip.push(start.elapsed());
    }
    let (ours, tar, gz) = (median(ours), median(tar), median(ours_gzip));
    println!(
        "diff export of 2000 files, {} MiB, median of {rounds}:",
        bytes >> 20
    );
    println!("  GNU tar -c to a pipe: {}", ms(tar));
    println!("  kiln export (uncompressed, both digests): {}", ms(ours));
    println!("  kiln export (gzip): {}", ms(gz));
    println!(
        "  ratio kiln/tar = {:.2}",
        ours.as_secs_f64() / tar.as_secs_f64()
    );
    Ok(())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !kiln_testsupport::is_root() {
        println!("SKIPPED: the snapshotter benchmarks need root (they mount)");
        return;
    }
    let iters = std::env::var("KILN_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let code = kiln_testsupport::run_in_private_mount_namespace(|| match bench(iters) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            1
        }
    });
    std::process::exit(code);
}
