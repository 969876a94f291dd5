//! Snapshotter benchmarks against the raw kernel and GNU tar, measured in the same run and
//! printed as ratios (not timed tests: nothing here fails on speed).
//!
//! - step cycle: kiln's prepare (new mutable) + mount + write one file + unmount + commit,
//!   against the raw overlay cycle (mkdir, mount, write one file, umount) with and without
//!   `volatile`;
//! - diff export of an upper directory (uncompressed, and gzip) against `tar -c` of the
//!   same directory into a pipe, and importing that layer against `tar -x` of it.
//!
//! Needs root (it mounts, in a private mount namespace); prints `SKIPPED` otherwise. Set
//! `KILN_BENCH_ITERS` to change the number of cycles, `KILN_BENCH_LAYER_FILES` and
//! `KILN_BENCH_LAYER_MIB` the upper directory's size (default 2000 files, 64 MiB;
//! `scripts/bench` uses 10000 and 1024). Lines `BENCH <what> <kiln ms> <peer ms> <ratio>`
//! are for `scripts/bench`.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_snapshotter::{
    Compression, ImportOptions, PruneOptions, RefOptions, Snapshotter, unmount,
};
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

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn machine_line(what: &str, ours: Duration, theirs: Duration) {
    println!(
        "BENCH {what} {:.3} {:.3} {:.3}",
        ours.as_secs_f64() * 1e3,
        theirs.as_secs_f64() * 1e3,
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
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
    machine_line("step_cycle", kiln, raw);
    let start = Instant::now();
    store.sync()?;
    println!("  one sync of all {iters} commits: {}", ms(start.elapsed()));

    // Diff export: an upper of FILES files (100 per directory), MIB MiB in all, of
    // incompressible data.
    let files = env_number("KILN_BENCH_LAYER_FILES", 2000).max(1);
    let mib = env_number("KILN_BENCH_LAYER_MIB", 64);
    let file_size = (mib << 20) / files;
    let m = store.new_mutable(Some(&parent), &RefOptions::default())?;
    let upper = m.dir();
    let mut seed = 1u64;
    let mut data = vec![0u8; file_size];
    for f in 0..files {
        let dir = upper.join(format!("d{:03}", f / 100));
        if f % 100 == 0 {
            std::fs::create_dir(&dir)?;
        }
        for chunk in data.chunks_mut(8) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let n = chunk.len();
            chunk.copy_from_slice(&seed.to_le_bytes()[..n]);
        }
        std::fs::write(dir.join(format!("f{f:05}")), &data)?;
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
    // gzip costs ~30 s per GiB of incompressible data: once is enough for big layers.
    for _ in 0..if mib > 256 { 1 } else { 2 } {
        let start = Instant::now();
        store.export_layer(&top, std::io::sink(), Compression::Gzip)?;
        ours_gzip.push(start.elapsed());
    }
    let (ours, tar, gz) = (median(ours), median(tar), median(ours_gzip));
    println!(
        "diff export of {files} files, {} MiB, median of {rounds}:",
        bytes >> 20
    );
    println!("  GNU tar -c to a pipe: {}", ms(tar));
    println!("  kiln export (uncompressed, both digests): {}", ms(ours));
    println!("  kiln export (gzip): {}", ms(gz));
    println!(
        "  ratio kiln/tar = {:.2}",
        ours.as_secs_f64() / tar.as_secs_f64()
    );
    machine_line("export", ours, tar);

    // Import: the same layer, as an uncompressed tar file, unpacked into a new snapshot
    // against `tar -x` of the same file into a new directory.
    let layer_file = base.join("layer.tar");
    store.export_layer(&top, std::fs::File::create(&layer_file)?, Compression::None)?;
    drop(top);
    let mut ours = Vec::new();
    let mut tar = Vec::new();
    for round in 0..rounds {
        let start = Instant::now();
        let imported = store.import_layer(
            Some(&parent),
            std::fs::File::open(&layer_file)?,
            &ImportOptions::default(),
        )?;
        ours.push(start.elapsed());
        drop(imported);
        store.prune(PruneOptions::default())?;
        let dest = base.join(format!("untar{round}"));
        std::fs::create_dir(&dest)?;
        let start = Instant::now();
        let status = Command::new("tar")
            .args(["-xf"])
            .arg(&layer_file)
            .arg("-C")
            .arg(&dest)
            .status()?;
        tar.push(start.elapsed());
        anyhow::ensure!(status.success(), "tar -x failed: {status}");
        std::fs::remove_dir_all(&dest)?;
    }
    let (ours, tar) = (median(ours), median(tar));
    println!("layer import of the same files, median of {rounds}:");
    println!("  GNU tar -x from a file: {}", ms(tar));
    println!("  kiln import (both digests): {}", ms(ours));
    println!(
        "  ratio kiln/tar = {:.2}",
        ours.as_secs_f64() / tar.as_secs_f64()
    );
    machine_line("import", ours, tar);
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
    let iters = env_number("KILN_BENCH_ITERS", 300);
    let code = kiln_testsupport::run_in_private_mount_namespace(|| match bench(iters) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            1
        }
    });
    std::process::exit(code);
}
