//! What limits and the resource report cost per step, measured in one run (run by
//! `scripts/bench-run` as root, release build):
//!
//! * **limits**: `/bin/true` run as a step (`kiln run`'s path, in-process) with the
//!   default limits — cgroups of its own in pids, memory and cpu, joined, watched, read and
//!   removed, and the cleanup registry — against the same step without cgroups, the two
//!   alternating so machine noise hits both alike.
//! * **report**: the work the report adds to a step, repeated on a live step cgroup: the
//!   two `getrusage` calls, reading the cgroup's figures, the report fields of the runner's
//!   result, and rendering the `DONE` line and the JSON object.
//!
//! Usage: `bench_limits ROOTFS [STEPS]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_executor::cgroup;
use kiln_executor::limits::{Limits, format_bytes};
use kiln_executor::process::{self, ExitInfo, RunnerConfig};
use kiln_executor::spec::{self, Host, Network, Security, Step};

fn step(rootfs: &Path, limits: Limits) -> Step {
    Step {
        args: vec!["/bin/true".into()],
        env: vec![format!("PATH={}", kiln_proto::DEFAULT_PATH)],
        cwd: "/".into(),
        user: String::new(),
        hostname: String::new(),
        ulimits: Vec::new(),
        cgroup_parent: String::new(),
        extra_hosts: Vec::new(),
        network: Network::None,
        security: Security::Sandbox,
        rootfs: rootfs.to_owned(),
        readonly_rootfs: false,
        mounts: Vec::new(),
        no_new_privileges: false,
        limits,
    }
}

fn config(run: &Path, rootfs: &Path, n: usize, with_cgroups: bool) -> anyhow::Result<RunnerConfig> {
    let id = format!("bench{}x{n}", std::process::id());
    let limits = if with_cgroups {
        Limits::host_defaults()
    } else {
        Limits::default()
    };
    let host = Host {
        in_user_namespace: false,
        shared_dir: run.to_owned(),
        run_dir: run.to_owned(),
        id,
        // The step below has no network: this measures cgroups, not the sandbox stack.
        network: None,
        loopback_network: None,
    };
    let mut spec = spec::generate(&step(rootfs, limits), &host, &kiln_executor::sys::LinuxSys)?;
    if !with_cgroups {
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(None);
        }
    }
    Ok(RunnerConfig {
        spec,
        stub_paths: Vec::new(),
        stubs_recursive: false,
        real_root: true,
        own_cgroups: false,
        seccomp_cache: Some(run.join(".seccomp")),
        cgroup_registry: with_cgroups.then(|| run.join(".cgroups")),
        seccomp_of_warm_runner: false,
    })
}

fn stats(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    (samples[samples.len() / 2], mean)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rootfs = PathBuf::from(args.next().context("usage: bench_limits ROOTFS [STEPS]")?);
    let steps: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root");
    }
    let run = tempfile::tempdir()?;
    // Warm-up: seccomp program cache, page cache.
    for n in 0..10 {
        process::run(&config(run.path(), &rootfs, n, n % 2 == 0)?)?;
    }
    let mut with = Vec::new();
    let mut without = Vec::new();
    for n in 0..steps * 2 {
        let limited = n % 2 == 0;
        let cfg = config(run.path(), &rootfs, 1000 + n, limited)?;
        let start = Instant::now();
        let info = process::run(&cfg)?;
        let took = start.elapsed().as_secs_f64() * 1e3;
        if info.exit_code != 0 {
            bail!("step failed: {info:?}");
        }
        if limited {
            with.push(took);
        } else {
            without.push(took);
        }
    }
    let (with_median, with_mean) = stats(with);
    let (without_median, without_mean) = stats(without);
    println!("limits: /bin/true as a step, {steps} runs each, alternating");
    println!(
        "  with cgroups (pids, memory, cpu)  median {with_median:7.3} ms   mean {with_mean:7.3} ms"
    );
    println!(
        "  without cgroups                   median {without_median:7.3} ms   mean {without_mean:7.3} ms"
    );
    println!(
        "  cost of limits per step           median {:7.3} ms   mean {:7.3} ms",
        with_median - without_median,
        with_mean - without_mean
    );

    // The report's own work, on a live step cgroup.
    let request = cgroup::Request {
        cgroups_path: &format!("/buildkit/benchreport{}", std::process::id()),
        real_root: true,
        limits: Limits::host_defaults(),
        all: false,
    };
    let mut placement = cgroup::create(&request, None, "benchreport")?;
    let iterations = 20_000;
    let start = Instant::now();
    let mut sink = 0usize;
    for _ in 0..iterations {
        let before = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
        let after = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
        let usage = placement.usage();
        let info = ExitInfo {
            user_cpu_micros: u64::try_from(
                after.user_time().tv_usec() - before.user_time().tv_usec(),
            )
            .unwrap_or(0),
            peak_memory_bytes: usage.peak_memory.unwrap_or(0),
            peak_memory_from_cgroup: usage.peak_memory.is_some(),
            read_bytes: u64::try_from(after.block_reads() - before.block_reads()).unwrap_or(0)
                * 512,
            written_bytes: u64::try_from(after.block_writes() - before.block_writes()).unwrap_or(0)
                * 512,
            ..ExitInfo::default()
        };
        let encoded = serde_json::to_vec(&info)?;
        let line = format!(
            "#3 DONE 0.1s (cpu {:.1}s, peak {})",
            Duration::from_micros(info.user_cpu_micros + info.system_cpu_micros).as_secs_f64(),
            format_bytes(info.peak_memory_bytes)
        );
        let json = serde_json::json!({
            "wallSeconds": 0.1,
            "userCpuSeconds": info.user_cpu_micros as f64 / 1e6,
            "systemCpuSeconds": info.system_cpu_micros as f64 / 1e6,
            "peakMemoryBytes": info.peak_memory_bytes,
            "peakMemoryScope": "cgroup",
            "readBytes": info.read_bytes,
            "writtenBytes": info.written_bytes,
        })
        .to_string();
        sink += encoded.len() + line.len() + json.len();
    }
    let per_step = start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
    placement.remove();
    println!("report: its work per step, {iterations} repetitions on a live step cgroup");
    println!(
        "  {per_step:7.1} µs per step ({:.3} ms; target < 0.2 ms)  [{sink}]",
        per_step / 1e3
    );
    Ok(())
}
