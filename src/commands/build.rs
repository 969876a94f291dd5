//! `kiln build`: a BuildKit Definition or a Dockerfile in, the result out, with buildctl's
//! flags, progress and exit codes. The data flow reads top-down in [`build`]: open the
//! worker (kiln-worker: ops over snapshots and the executor) → (Dockerfile → Definition
//! and image config: kiln-dockerfile) → load the graph (kiln-proto) → import caches
//! (kiln-remotecache) → solve (kiln-solver: CacheMaps, keys, cache store, scheduler) →
//! export the cache and the result (kiln-remotecache, kiln-export).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kiln_executor::supervisor::RunnerCommand;
use kiln_export as export;
use kiln_proto::{Graph, LoadOptions, decode_definition, load};
use kiln_registry::{Credentials, RegistryHosts};
use kiln_remotecache::{self as remotecache, ImportedCache};
use kiln_snapshotter::ImmutableRef;
use kiln_solver::op::Session;
use kiln_solver::progress::ProgressSender;
use kiln_solver::scheduler::{CacheExport, JobOptions, Solver, SolverOptions};
use kiln_solver::source::CacheSource;
use kiln_solver::store::Store;
use kiln_worker::{BuildSession, CacheLayers, KilnRef, KilnWorker, LazyLoader, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::flags::{self, CacheExportSpec, CacheImportSpec, OutputSpec};
use super::frontend::{self, DockerfileRequest};
use super::namespaces::{enter_namespaces, runtime};
use crate::cli::BuildArgs;
use crate::input::read_input;
use crate::progress::{Mode, Renderer, StepUsage, usage_json};

/// What a build starts from.
enum Input {
    /// A Definition, loaded.
    Graph(Graph),
    /// A Dockerfile the frontend turns into a Definition and an image config.
    Dockerfile(DockerfileRequest),
}

pub fn build(root: &Path, config: &Path, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    // Everything the user got wrong fails here, before any namespace or thread exists.
    let registry_hosts = RegistryHosts::load(config)?;
    let limits = kiln_executor::limits::load_config(config)?;
    let credentials = Credentials::load_default()?;
    let outputs = flags::outputs(args)?;
    let cache_exports: Vec<CacheExportSpec> = args
        .export_cache
        .iter()
        .map(|s| flags::parse_export_cache(s))
        .collect::<anyhow::Result<_>>()?;
    let cache_imports: Vec<CacheImportSpec> = args
        .import_cache
        .iter()
        .map(|s| flags::parse_import_cache(s))
        .collect::<anyhow::Result<_>>()?;
    let mut session = flags::session(args)?;
    let load_options = LoadOptions {
        entitlements: flags::entitlements(&args.allow)?,
        ..Default::default()
    };
    let input = match frontend::dockerfile_dirs(args, &session.locals)? {
        Some((context, dockerfile_dir)) => {
            let request = frontend::read_dockerfile(
                &context,
                &dockerfile_dir,
                frontend::frontend_opts(args)?,
            )?;
            session.locals.insert(frontend::CONTEXT.to_owned(), context);
            session
                .locals
                .insert(frontend::DOCKERFILE_DIR.to_owned(), dockerfile_dir);
            Input::Dockerfile(request)
        }
        None => Input::Graph(load_graph(
            &read_input(args.file.as_deref())?,
            &load_options,
            args.no_cache,
        )?),
    };
    let session_id = session.id.clone();
    let no_cache = args.no_cache;
    let mode = Mode::parse(&args.progress);

    let in_user_namespace = enter_namespaces()?;
    let (enforced, reason) = kiln_executor::cgroup::enforcement(!in_user_namespace, &limits);
    if let Some(line) = kiln_executor::limits::explain(&limits, enforced, &reason) {
        eprintln!("WARNING: {line}");
    }
    let metadata_file = args.metadata_file.clone();
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
            limits,
        )?;
        let snapshotter = worker.snapshotter().clone();
        let outcome = async {
            let (graph, image_config) = match input {
                Input::Graph(graph) => (Some(graph), None),
                Input::Dockerfile(request) => {
                    let resolver = frontend::RegistryMetaResolver {
                        images: worker.images(),
                    };
                    let converted = frontend::convert(&request, &session_id, &resolver).await?;
                    // No ops: the target is scratch without a change.
                    let graph = match converted.definition.def.is_empty() {
                        true => None,
                        false => Some(load_graph(
                            &converted.definition_bytes(),
                            &load_options,
                            no_cache,
                        )?),
                    };
                    (graph, Some(converted.image_config_json()))
                }
            };
            let platform = graph
                .as_ref()
                .map_or_else(kiln_proto::platform::host_platform, result_platform);
            let (result, cache, usages) = match graph {
                Some(graph) => {
                    let sources = import_caches(&worker, &cache_imports).await?;
                    // Steps that ignore the cache get fresh cache mounts (BuildKit's
                    // PruneCacheMounts, before the solve).
                    let worker_for_prune = worker.clone();
                    let graph = Arc::new(graph);
                    let for_prune = graph.clone();
                    tokio::task::spawn_blocking(move || {
                        worker_for_prune.prune_cache_mounts(&for_prune)
                    })
                    .await
                    .context("cache mounts")?
                    .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                    solve(&worker, &root, graph, mode, sources).await?
                }
                None => {
                    let empty = worker
                        .empty_result("scratch")
                        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                    (KilnRef::ready(empty), CacheExport::default(), Vec::new())
                }
            };
            export_caches(&worker, &cache, &cache_exports).await?;
            if !outputs.is_empty() {
                let snapshot = worker
                    .materialize(&result)
                    .await
                    .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                let worker = worker.clone();
                tokio::task::spawn_blocking(move || {
                    outputs.iter().try_for_each(|output| {
                        export(
                            &worker,
                            &snapshot,
                            output,
                            &platform,
                            image_config.as_deref(),
                        )
                    })
                })
                .await
                .context("export task")?
                .context("failed to solve")?;
            }
            if let Some(path) = &metadata_file {
                write_metadata(path, &usages)?;
            }
            let (bodies, bytes) = worker.images().clients().downloaded();
            tracing::info!("registries: {bodies} bodies downloaded, {bytes} bytes");
            anyhow::Ok(())
        }
        .await;
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

/// Loads the Definition (BuildKit's validation and error texts); `--no-cache` marks every
/// vertex to ignore the cache, as buildctl does.
fn load_graph(bytes: &[u8], options: &LoadOptions, no_cache: bool) -> anyhow::Result<Graph> {
    let mut def = decode_definition(bytes).context("failed to solve: failed to load LLB")?;
    if no_cache {
        for op in kiln_proto::decode_ops(&def).context("failed to solve: failed to load LLB")? {
            def.metadata
                .entry(op.digest.as_str().to_owned())
                .or_default()
                .ignore_cache = true;
        }
    }
    load(&def, options).context("failed to solve: failed to load LLB")
}

/// The worker: snapshots under `root`, steps through `kiln __runner` with `limits`,
/// images through the registries `kiln.toml` describes.
fn open_worker(
    root: &Path,
    in_user_namespace: bool,
    session: BuildSession,
    registry_hosts: RegistryHosts,
    credentials: Credentials,
    limits: kiln_executor::limits::Limits,
) -> anyhow::Result<KilnWorker> {
    Ok(KilnWorker::open(WorkerConfig {
        root: root.to_owned(),
        runner: RunnerCommand::current_exe("__runner").context("locating kiln")?,
        in_user_namespace,
        session,
        registry_hosts,
        credentials,
        limits,
    })?)
}

/// The top-level key of `--metadata-file` that holds the steps' resource figures (other
/// keys, BuildKit's exporter response, sit beside it).
const STEPS_KEY: &str = "kiln.steps";

/// Writes `--metadata-file`: `{"kiln.steps": {"<vertex digest>": {"name": …, figures…}}}`.
fn write_metadata(path: &Path, usages: &[StepUsage]) -> anyhow::Result<()> {
    let mut steps = serde_json::Map::new();
    for step in usages {
        let mut entry = usage_json(&step.usage);
        entry["name"] = serde_json::Value::String(step.name.clone());
        steps.insert(step.digest.as_str().to_owned(), entry);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert(STEPS_KEY.to_owned(), serde_json::Value::Object(steps));
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(metadata))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Reads every `--import-cache` (indexes and configs only) as a source of cache keys.
async fn import_caches(
    worker: &KilnWorker,
    imports: &[CacheImportSpec],
) -> anyhow::Result<Vec<Arc<dyn CacheSource<KilnRef>>>> {
    let mut sources: Vec<Arc<dyn CacheSource<KilnRef>>> = Vec::new();
    for (n, spec) in imports.iter().enumerate() {
        let loaded = match spec {
            CacheImportSpec::Local { src, tag, digest } => {
                remotecache::load_local(src, tag.as_deref(), digest.as_deref())
            }
            CacheImportSpec::Registry { reference } => {
                let images = worker.images();
                remotecache::load_registry(images.clients(), images.content(), reference).await
            }
        }
        .context("importing cache")?;
        for (i, (config, layers)) in loaded.configs.iter().enumerate() {
            let cache = ImportedCache::new(
                &format!("{}#{n}.{i}", loaded.name),
                config,
                layers,
                loaded.fetcher.clone(),
                loaded.origin.clone(),
                Arc::new(LazyLoader),
            )
            .context("importing cache")?;
            tracing::debug!("imported {cache:?}");
            sources.push(Arc::new(cache));
        }
    }
    Ok(sources)
}

/// Writes the build cache where each `--export-cache` says.
async fn export_caches(
    worker: &KilnWorker,
    cache: &CacheExport<KilnRef>,
    exports: &[CacheExportSpec],
) -> anyhow::Result<()> {
    let layers = CacheLayers::new(worker);
    for spec in exports {
        let (max, oci) = match spec {
            CacheExportSpec::Local { max, oci, .. }
            | CacheExportSpec::Registry { max, oci, .. } => (*max, *oci),
        };
        let mode = if max {
            remotecache::Mode::Max
        } else {
            remotecache::Mode::Min
        };
        let built = remotecache::export::build(cache, mode, &layers)
            .await
            .context("exporting cache")?;
        match spec {
            CacheExportSpec::Local { dest, tag, .. } => {
                remotecache::export::write_local(dest, tag, &built, oci)
                    .await
                    .with_context(|| format!("exporting cache to {}", dest.display()))?;
            }
            CacheExportSpec::Registry { reference, .. } => {
                let parsed = kiln_registry::reference::parse_normalized(reference)
                    .with_context(|| format!("exporting cache to {reference}"))?;
                let client = worker.images().clients().get(parsed.registry())?;
                let tag = parsed.tag().unwrap_or("latest");
                remotecache::export::push_registry(&client, parsed.repository(), tag, &built, oci)
                    .await
                    .with_context(|| format!("exporting cache to {reference}"))?;
            }
        }
    }
    Ok(())
}

/// Solves `graph` on `worker` with the cache store under `root` and the imported caches,
/// rendering progress; Ctrl-C cancels the solve (running steps are killed and cleaned up).
async fn solve(
    worker: &KilnWorker,
    root: &Path,
    graph: Arc<Graph>,
    mode: Mode,
    sources: Vec<Arc<dyn CacheSource<KilnRef>>>,
) -> anyhow::Result<(KilnRef, CacheExport<KilnRef>, Vec<StepUsage>)> {
    let store = Arc::new(Store::open(root)?);
    let solver = Solver::new(
        Arc::new(worker.clone()),
        store,
        SolverOptions::for_root(root),
    )
    .with_sources(sources);
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
    let solved = solver.solve_for_export(graph, job).await;
    drop(solver);
    let usages = renderer.await.unwrap_or_default();
    let (result, cache) = solved.map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
    Ok((result, cache, usages))
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
    image_config: Option<&[u8]>,
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
                image_config,
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
