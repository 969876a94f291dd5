//! `kiln build`: a BuildKit Definition in, the result out, with buildctl's flags,
//! progress and exit codes. The data flow reads top-down in [`build`]: load the graph
//! (kiln-proto) → open the worker (kiln-worker: ops over snapshots and the executor) →
//! solve (kiln-solver: CacheMaps, keys, cache store, scheduler) → export (kiln-export).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kiln_executor::supervisor::RunnerCommand;
use kiln_export as export;
use kiln_proto::{Graph, LoadOptions, decode_definition, load};
use kiln_registry::{Credentials, RegistryHosts};
use kiln_snapshotter::ImmutableRef;
use kiln_solver::op::Session;
use kiln_solver::progress::ProgressSender;
use kiln_solver::scheduler::{JobOptions, Solver, SolverOptions};
use kiln_solver::store::Store;
use kiln_worker::{BuildSession, KilnWorker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::flags::{self, OutputSpec};
use super::namespaces::{enter_namespaces, runtime};
use crate::cli::BuildArgs;
use crate::input::read_input;
use crate::progress::{Mode, Renderer};

pub fn build(root: &Path, config: &Path, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    // Everything the user got wrong fails here, before any namespace or thread exists.
    let registry_hosts = RegistryHosts::load(config)?;
    let network = kiln_executor::network::Config::load(config)?;
    let credentials = Credentials::load_default()?;
    let outputs = flags::outputs(args)?;
    let session = flags::session(args)?;
    let graph = Arc::new(load_graph(args)?);
    let mode = Mode::parse(&args.progress);

    let in_user_namespace = enter_namespaces()?;
    let runtime = runtime()?;
    let root = root.to_owned();
    let result = runtime.block_on(async move {
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let worker = open_worker(
            &root,
            in_user_namespace,
            session,
            registry_hosts,
            credentials,
            network,
        )?;
        let platform = result_platform(&graph);
        let solved = solve(&worker, &root, graph, mode).await;
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
            Err(e) => Err(e),
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

/// Reads and loads the Definition (BuildKit's validation and error texts); `--no-cache`
/// marks every vertex to ignore the cache, as buildctl does.
fn load_graph(args: &BuildArgs) -> anyhow::Result<Graph> {
    let options = LoadOptions {
        entitlements: flags::entitlements(&args.allow)?,
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
    load(&def, &options).context("failed to solve: failed to load LLB")
}

/// The worker: snapshots under `root`, steps through `kiln __runner`, images through the
/// registries `kiln.toml` describes, sandbox networks through the stack it names.
fn open_worker(
    root: &Path,
    in_user_namespace: bool,
    session: BuildSession,
    registry_hosts: RegistryHosts,
    credentials: Credentials,
    network: kiln_executor::network::Config,
) -> anyhow::Result<KilnWorker> {
    Ok(KilnWorker::open(WorkerConfig {
        root: root.to_owned(),
        runner: RunnerCommand::current_exe("__runner").context("locating kiln")?,
        in_user_namespace,
        session,
        registry_hosts,
        credentials,
        network,
    })?)
}

/// Solves `graph` on `worker` with the cache store under `root`, rendering progress;
/// Ctrl-C cancels the solve (running steps are killed and cleaned up).
async fn solve(
    worker: &KilnWorker,
    root: &Path,
    graph: Arc<Graph>,
    mode: Mode,
) -> anyhow::Result<ImmutableRef> {
    let store = Arc::new(Store::open(root)?);
    let solver = Solver::new(
        Arc::new(worker.clone()),
        store,
        SolverOptions::for_root(root),
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
    let solved = solver.solve(graph, job).await;
    drop(solver);
    let _ = renderer.await;
    solved.map_err(|e| anyhow::anyhow!("failed to solve: {e}"))
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
    result: &ImmutableRef,
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
