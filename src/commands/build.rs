//! `kiln build`, `kiln prune` and `kiln du`: a BuildKit Definition in, the result out, with
//! buildctl's flags, progress and exit codes; and the state they leave behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use std::io::Write;

use anyhow::{Context, bail};
use kiln_executor::supervisor::RunnerCommand;
use kiln_executor::userns::{self, Entered};
use kiln_proto::{Entitlements, LoadOptions, decode_definition, load};
use kiln_solver::export;
use kiln_solver::image::{Credentials, RegistryHosts};
use kiln_solver::op::Session;
use kiln_solver::progress::ProgressSender;
use kiln_solver::scheduler::{JobOptions, Solver, SolverOptions};
use kiln_solver::store::Store;
use kiln_solver::worker::{BuildSession, KilnWorker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::read_input;
use crate::cli::{BuildArgs, DuArgs, PruneArgs};
use crate::progress::{Mode, Renderer};

/// One `--output`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputSpec {
    Local { dest: PathBuf },
    Tar { dest: PathBuf },
    Oci { dest: PathBuf, name: String },
}

fn key_values(spec: &str, flag: &str) -> anyhow::Result<HashMap<String, String>> {
    spec.split(',')
        .map(|field| {
            field
                .split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .with_context(|| format!("{flag} {spec}: {field:?} is not key=value"))
        })
        .collect()
}

/// Parses `type=local,dest=DIR`, `type=tar,dest=FILE` or `type=oci,dest=FILE,name=REF`.
pub fn parse_output(spec: &str) -> anyhow::Result<OutputSpec> {
    let fields = key_values(spec, "--output")?;
    let dest = || -> anyhow::Result<PathBuf> {
        fields
            .get("dest")
            .map(PathBuf::from)
            .with_context(|| format!("--output {spec}: dest= is required"))
    };
    match fields.get("type").map(String::as_str) {
        Some("local") => Ok(OutputSpec::Local { dest: dest()? }),
        Some("tar") => Ok(OutputSpec::Tar { dest: dest()? }),
        Some("oci") => Ok(OutputSpec::Oci {
            dest: dest()?,
            name: fields.get("name").cloned().unwrap_or_default(),
        }),
        Some(other) => bail!("--output {spec}: unsupported type {other:?} (local, tar or oci)"),
        None => bail!("--output {spec}: type= is required"),
    }
}

/// `--secret id=ID,src=FILE` or `id=ID,env=VAR`: the secret's content, read now.
fn parse_secret(spec: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let fields = key_values(spec, "--secret")?;
    let src = fields.get("src").or_else(|| fields.get("source"));
    let id = fields
        .get("id")
        .cloned()
        .or_else(|| {
            src.and_then(|s| Path::new(s).file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .with_context(|| format!("--secret {spec}: id= is required"))?;
    let data = match (src, fields.get("env")) {
        (Some(src), _) => {
            std::fs::read(src).with_context(|| format!("--secret {spec}: reading {src}"))?
        }
        (None, Some(var)) => std::env::var(var)
            .with_context(|| format!("--secret {spec}: environment variable {var}"))?
            .into_bytes(),
        (None, None) => bail!("--secret {spec}: src= or env= is required"),
    };
    Ok((id, data))
}

/// `--ssh ID[=SOCKET]` (the socket defaults to `$SSH_AUTH_SOCK`).
fn parse_ssh(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let (id, path) = match spec.split_once('=') {
        Some((id, path)) => (id.to_owned(), PathBuf::from(path)),
        None => (
            spec.to_owned(),
            std::env::var_os("SSH_AUTH_SOCK")
                .map(PathBuf::from)
                .with_context(|| {
                    format!("--ssh {spec}: no socket given and SSH_AUTH_SOCK is unset")
                })?,
        ),
    };
    if id.is_empty() {
        bail!("--ssh {spec}: the id is empty");
    }
    Ok((id, path))
}

/// `NAME=DIR` for `--local` and `--oci-layout`.
fn parse_named_dir(spec: &str, flag: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, dir) = spec
        .split_once('=')
        .with_context(|| format!("{flag} {spec}: expected NAME=DIR"))?;
    let dir = Path::new(dir)
        .canonicalize()
        .with_context(|| format!("{flag} {spec}: {dir}"))?;
    Ok((name.to_owned(), dir))
}

fn entitlements(allow: &[String]) -> anyhow::Result<Entitlements> {
    let mut e = Entitlements::default();
    for a in allow {
        match a.as_str() {
            "network.host" => e.network_host = true,
            "security.insecure" => e.security_insecure = true,
            other => {
                bail!("--allow {other}: unknown entitlement (network.host or security.insecure)")
            }
        }
    }
    Ok(e)
}

/// Enters kiln's namespaces (before any thread exists); true when rootless.
fn enter_namespaces() -> anyhow::Result<bool> {
    Ok(matches!(
        userns::enter().context("entering kiln's namespaces")?,
        Entered::UserNamespace(_)
    ))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn build(root: &Path, config: &Path, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let registry_hosts = RegistryHosts::load(config)?;
    let credentials = Credentials::load_default()?;
    let outputs = args
        .output
        .iter()
        .map(|o| parse_output(o))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut session = BuildSession {
        id: format!(
            "kiln{}x{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        ..BuildSession::default()
    };
    for s in &args.secret {
        let (id, data) = parse_secret(s)?;
        session.secrets.insert(id, data);
    }
    for s in &args.ssh {
        let (id, path) = parse_ssh(s)?;
        session.ssh.insert(id, path);
    }
    for l in &args.local {
        let (name, dir) = parse_named_dir(l, "--local")?;
        session.locals.insert(name, dir);
    }
    for l in &args.oci_layout {
        let (name, dir) = parse_named_dir(l, "--oci-layout")?;
        session.oci_layouts.insert(name, dir);
    }
    let options = LoadOptions {
        entitlements: entitlements(&args.allow)?,
        ..Default::default()
    };
    let bytes = read_input(args.file.as_deref())?;
    let mut def = decode_definition(&bytes).context("failed to solve: failed to load LLB")?;
    if args.no_cache {
        for op in kiln_proto::decode_ops(&def).context("failed to solve: failed to load LLB")? {
            def.metadata
                .entry(op.digest.as_str().to_owned())
                .or_default()
                .ignore_cache = true;
        }
    }
    let graph = Arc::new(load(&def, &options).context("failed to solve: failed to load LLB")?);
    let mode = Mode::parse(&args.progress);

    let in_user_namespace = enter_namespaces()?;
    let runtime = runtime()?;
    let root = root.to_owned();
    let result = runtime.block_on(async move {
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let worker = KilnWorker::open(WorkerConfig {
            root: root.clone(),
            runner: RunnerCommand::current_exe("__runner").context("locating kiln")?,
            in_user_namespace,
            session,
            registry_hosts,
            credentials,
        })?;
        let store = Arc::new(Store::open(&root)?);
        let solver = Solver::new(
            Arc::new(worker.clone()),
            store,
            SolverOptions::for_root(&root),
        );
        let (progress, events) = ProgressSender::channel(1024);
        let renderer = tokio::spawn(Renderer::new(mode).run(events));
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        let job = JobOptions {
            progress,
            cancel,
            session: Arc::new(Session::default()),
        };
        let platform = result_platform(&graph);
        let solved = solver.solve(graph, job).await;
        drop(solver);
        let _ = renderer.await;
        let snapshotter = worker.snapshotter().clone();
        let outcome = match solved {
            Ok(result) => tokio::task::spawn_blocking(move || {
                outputs
                    .iter()
                    .try_for_each(|output| export(&worker, &result, output, &platform))
            })
            .await
            .context("export task")
            .and_then(|exported| exported.context("failed to solve")),
            Err(e) => Err(anyhow::anyhow!("failed to solve: {e}")),
        };
        // Whatever the outcome, results nothing cached (local copies, outputs of a failed
        // solve) go now rather than waiting for a prune.
        match tokio::task::spawn_blocking(move || snapshotter.remove_unretained()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("removing temporary snapshots: {e}"),
            Err(e) => tracing::warn!("removing temporary snapshots: {e}"),
        }
        outcome
    });
    // A solve cancelled while waiting on another process's lock leaves a blocking thread.
    runtime.shutdown_background();
    result.map(|()| ExitCode::SUCCESS)
}

/// The platform of the op producing the result (the host's when it has none).
fn result_platform(graph: &kiln_proto::Graph) -> kiln_proto::pb::Platform {
    let host = kiln_proto::platform::host_platform();
    let target = graph.vertex(graph.target().vertex);
    kiln_proto::platform::normalize(target.platform(), &host)
}

/// Writes `result` where `output` says. Runs on a blocking thread: exports mount a view
/// and walk it synchronously.
fn export(
    worker: &KilnWorker,
    result: &kiln_snapshotter::ImmutableRef,
    output: &OutputSpec,
    platform: &kiln_proto::pb::Platform,
) -> anyhow::Result<()> {
    match output {
        OutputSpec::Local { dest } => export::local(result, dest)
            .with_context(|| format!("exporting to {}", dest.display()))?,
        OutputSpec::Tar { dest } => {
            let mut out = open_output(dest)?;
            export::tar(result, &mut out)?;
            out.flush()
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        OutputSpec::Oci { dest, name } => {
            let mut out = open_output(dest)?;
            let options = export::OciExportOptions {
                name,
                platform,
                base_config: None,
            };
            export::oci(worker.snapshotter(), result, &mut out, &options)?;
            out.flush()
                .with_context(|| format!("writing {}", dest.display()))?;
        }
    }
    Ok(())
}

/// `-` is standard output (buildctl's `dest=-`); anything else a file created or truncated.
fn open_output(dest: &Path) -> anyhow::Result<Box<dyn Write>> {
    if dest == Path::new("-") {
        return Ok(Box::new(std::io::BufWriter::new(std::io::stdout().lock())));
    }
    let file =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    Ok(Box::new(std::io::BufWriter::new(file)))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

fn ago(at: std::time::SystemTime) -> String {
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86_399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

pub fn prune(root: &Path, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    enter_namespaces()?;
    let snapshotter = kiln_snapshotter::Snapshotter::open(root)
        .with_context(|| format!("opening the snapshot store at {}", root.display()))?;
    let before: HashMap<String, u64> = snapshotter
        .du()?
        .into_iter()
        .map(|u| (u.id.clone(), u.size))
        .collect();
    let keep_duration = args
        .keep_duration
        .as_deref()
        .map(parse_duration)
        .transpose()?;
    let removed = snapshotter.prune(kiln_snapshotter::PruneOptions { keep_duration })?;
    if args.all {
        let content = root.join("content");
        if content.exists() {
            std::fs::remove_dir_all(&content)
                .with_context(|| format!("removing {}", content.display()))?;
        }
    }
    let mut total = 0;
    println!("{:<28}\t{:>10}", "ID", "RECLAIMED");
    for id in &removed {
        let size = before.get(id).copied().unwrap_or(0);
        total += size;
        println!("{id:<28}\t{:>10}", human(size));
    }
    println!("Total:\t{}", human(total));
    Ok(ExitCode::SUCCESS)
}

/// `30s`, `15m`, `2h`, `7d` (or plain seconds).
fn parse_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .with_context(|| format!("--keep-duration {text}: not a duration (e.g. 48h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("--keep-duration {text}: unknown unit {other:?} (s, m, h or d)"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

pub fn du(root: &Path, args: &DuArgs) -> anyhow::Result<ExitCode> {
    enter_namespaces()?;
    let snapshotter = kiln_snapshotter::Snapshotter::open(root)
        .with_context(|| format!("opening the snapshot store at {}", root.display()))?;
    let mut usage = snapshotter.du()?;
    usage.sort_by_key(|u| std::cmp::Reverse(u.size));
    let (mut total, mut reclaimable) = (0, 0);
    if args.verbose {
        for u in &usage {
            println!("ID:\t\t{}", u.id);
            if let Some(parent) = &u.parent {
                println!("Parent:\t\t{parent}");
            }
            println!("Created at:\t{}", ago(u.created_at));
            println!(
                "Mutable:\t{}",
                u.state == kiln_snapshotter::RecordState::Mutable
            );
            println!("Reclaimable:\t{}", u.reclaimable);
            println!("In use:\t\t{}", u.in_use);
            println!("Size:\t\t{}", human(u.size));
            println!("Description:\t{}", u.description);
            println!("Usage count:\t{}", u.usage_count);
            println!("Last used:\t{}", ago(u.last_used_at));
            println!("Type:\t\t{}\n", u.record_type);
        }
    } else {
        println!(
            "{:<28}\t{:<11}\t{:>10}\t{:<16}",
            "ID", "RECLAIMABLE", "SIZE", "LAST ACCESSED"
        );
    }
    for u in &usage {
        total += u.size;
        if u.reclaimable {
            reclaimable += u.size;
        }
        if !args.verbose {
            println!(
                "{:<28}\t{:<11}\t{:>10}\t{:<16}",
                u.id,
                u.reclaimable,
                human(u.size),
                ago(u.last_used_at)
            );
        }
    }
    println!("Reclaimable:\t{}", human(reclaimable));
    println!("Total:\t\t{}", human(total));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs() {
        assert_eq!(
            parse_output("type=local,dest=out").unwrap(),
            OutputSpec::Local { dest: "out".into() }
        );
        assert_eq!(
            parse_output("type=oci,dest=img.tar,name=example.com/a:b").unwrap(),
            OutputSpec::Oci {
                dest: "img.tar".into(),
                name: "example.com/a:b".into()
            }
        );
        assert!(parse_output("type=image,name=x").is_err());
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("dest=out").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("48h").unwrap().as_secs(), 48 * 3600);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert!(parse_duration("3w").is_err());
    }
}
