//! `kiln build`: a BuildKit Definition or a Dockerfile in, the result out, with buildctl's
//! flags, progress and exit codes. The data flow reads top-down in [`build`]: open the
//! worker (kiln-worker: ops over snapshots and the executor) → (Dockerfile → Definition
//! and image config: kiln-dockerfile) → load the graph (kiln-proto) → import caches
//! (kiln-remotecache) → solve (kiln-solver: CacheMaps, keys, cache store, scheduler) →
//! export the cache and the result (kiln-remotecache, kiln-export).

use std::collections::BTreeMap;
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
use kiln_worker::{BuildSession, KilnRef, KilnWorker, LazyLoader, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::flags::{self, CacheExportSpec, CacheImportSpec, OutputSpec};
use super::frontend::{self, DockerfileRequest};
use super::namespaces::{enter_namespaces, runtime};
use crate::cli::BuildArgs;
use crate::input::read_input;
use crate::progress::{Mode, Renderer, StepUsage, usage_json};

/// Descriptor table slots a build reserves before its threads start: enough for the locks
/// of a few thousand snapshots.
const DESCRIPTOR_SLOTS: u64 = 4096;

/// What a build starts from.
enum Input {
    /// A Definition, loaded.
    Graph(Graph),
    /// A Dockerfile the frontend turns into a Definition and an image config.
    Dockerfile(DockerfileRequest),
}

pub fn build(root: &Path, config: &Path, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    // A build holds a descriptor per snapshot it uses; its steps get the original limit back.
    if let Err(e) = kiln_executor::sys::raise_open_files_limit() {
        tracing::debug!("raising the limit of open files: {e}");
    }
    // Everything the user got wrong fails here, before any namespace or thread exists.
    let registry_hosts = RegistryHosts::load(config)?;
    let network = kiln_executor::network::Config::load(config)?;
    let limits = kiln_executor::limits::load_config(config)?;
    let credentials = Credentials::load_default()?;
    let outputs = flags::outputs(args)?;
    let cache_exports: Vec<CacheExportSpec> = args
        .export_cache
        .iter()
        .map(|s| flags::parse_export_cache(s))
        .collect::<anyhow::Result<_>>()?;
    // A `mode=max` export carries every vertex's result, so that solve loads them all.
    let load_every_result = cache_exports.iter().any(|spec| {
        matches!(
            spec,
            CacheExportSpec::Local { max: true, .. } | CacheExportSpec::Registry { max: true, .. }
        )
    });
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
    let metadata_file = args.metadata_file.clone();
    let mode = Mode::parse(&args.progress);

    let in_user_namespace = enter_namespaces()?;
    let (enforced, reason) = kiln_executor::cgroup::enforcement(!in_user_namespace, &limits);
    if let Some(line) = kiln_executor::limits::explain(&limits, enforced, &reason) {
        eprintln!("WARNING: {line}");
    }
    // Here, not before: rootless, the process that goes on is a fork, whose table is sized
    // to its open descriptors.
    if let Err(e) = kiln_executor::sys::reserve_descriptor_slots(DESCRIPTOR_SLOTS) {
        tracing::debug!("growing the descriptor table: {e}");
    }
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
            let (result, cache, usages, empty) = match graph {
                Some(graph) => {
                    let sources = import_caches(&worker, &cache_imports).await?;
                    // Steps that ignore the cache get fresh cache mounts (BuildKit's
                    // PruneCacheMounts, before the solve); a build without any makes no
                    // trip to the blocking pool.
                    let ignored = kiln_worker::cache_mounts::ignored_ids(&graph);
                    if !ignored.is_empty() {
                        let worker_for_prune = worker.clone();
                        tokio::task::spawn_blocking(move || {
                            worker_for_prune.prune_cache_mounts(&ignored)
                        })
                        .await
                        .context("cache mounts")?
                        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                    }
                    let graph = Arc::new(graph);
                    let (result, cache, usages) =
                        solve(&worker, &root, graph, mode, sources, load_every_result).await?;
                    (result, cache, usages, false)
                }
                None => {
                    let empty = worker
                        .empty_result("scratch")
                        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                    (
                        KilnRef::ready(empty),
                        CacheExport::default(),
                        Vec::new(),
                        true,
                    )
                }
            };
            // As BuildKit: the result's exporters first, then the cache exporters.
            let inline = cache_exports
                .iter()
                .any(|c| matches!(c, CacheExportSpec::Inline));
            if inline && !outputs.iter().any(|o| !o.needs_files()) {
                tracing::warn!("--export-cache type=inline: no image output to carry it");
            }
            let exports = Exports {
                worker: &worker,
                result: &result,
                empty,
                platform: &platform,
                image_config: image_config.as_deref(),
                inline: inline.then_some(&cache),
            };
            let mut metadata = BTreeMap::new();
            exports.outputs(&outputs, &mut metadata).await?;
            export_caches(&worker, &cache, &cache_exports).await?;
            if let Some(path) = &metadata_file {
                metadata.insert(
                    STEPS_KEY.to_owned(),
                    Metadata::Json(steps_metadata(&usages)),
                );
                write_metadata(path, &metadata)?;
            }
            let (bodies, bytes) = worker.images().clients().downloaded();
            let (sent, bytes_up) = worker.images().clients().uploaded();
            tracing::info!(
                "registries: {bodies} bodies downloaded, {bytes} bytes; \
                 {sent} bodies uploaded, {bytes_up} bytes"
            );
            anyhow::Ok(())
        }
        .await;
        // Whatever the outcome, results nothing cached (local copies, outputs of a failed
        // solve) go now rather than waiting for a prune. In place: nothing else runs on
        // the runtime's one thread by now, and a trip to the blocking pool started a
        // thread that a cached build needs for nothing else.
        if let Err(e) = snapshotter.remove_unretained() {
            tracing::warn!("removing temporary snapshots: {e}");
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
/// images through the registries `kiln.toml` describes, sandbox networks through the
/// stack it names.
fn open_worker(
    root: &Path,
    in_user_namespace: bool,
    session: BuildSession,
    registry_hosts: RegistryHosts,
    credentials: Credentials,
    network: kiln_executor::network::Config,
    limits: kiln_executor::limits::Limits,
) -> anyhow::Result<KilnWorker> {
    Ok(KilnWorker::open(WorkerConfig {
        root: root.to_owned(),
        runner: RunnerCommand::current_exe("__runner").context("locating kiln")?,
        in_user_namespace,
        session,
        registry_hosts,
        credentials,
        network,
        limits,
    })?)
}

/// The top-level key of `--metadata-file` that holds the steps' resource figures (other
/// keys, BuildKit's exporter response, sit beside it).
const STEPS_KEY: &str = "kiln.steps";

/// Writes `--metadata-file`: `{"kiln.steps": {"<vertex digest>": {"name": …, figures…}}}`.
/// What each step used, by vertex digest (the `kiln.steps` key of `--metadata-file`).
fn steps_metadata(usages: &[StepUsage]) -> serde_json::Value {
    let mut steps = serde_json::Map::new();
    for step in usages {
        let mut entry = usage_json(&step.usage);
        entry["name"] = serde_json::Value::String(step.name.clone());
        steps.insert(step.digest.as_str().to_owned(), entry);
    }
    serde_json::Value::Object(steps)
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
    let layers = worker.cache_layers();
    for spec in exports {
        let (max, oci) = match spec {
            CacheExportSpec::Local { max, oci, .. }
            | CacheExportSpec::Registry { max, oci, .. } => (*max, *oci),
            // Written into the image's config by the image outputs.
            CacheExportSpec::Inline => continue,
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
                let content = worker.images().content();
                remotecache::export::push_registry(
                    &client,
                    parsed.repository(),
                    tag,
                    &built,
                    oci,
                    Some(content),
                )
                .await
                .with_context(|| format!("exporting cache to {reference}"))?;
            }
            CacheExportSpec::Inline => {}
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
    load_every_result: bool,
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
        load_every_result,
    };
    let solved = solver.solve_for_export(graph, job).await;
    drop(solver);
    // The exports mount the result read-only: not while its step's mount is still there.
    worker.settle_unmounts();
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

/// What every `--output` of a build exports.
struct Exports<'a> {
    worker: &'a KilnWorker,
    result: &'a KilnRef,
    /// The target is scratch without a change: an image of no layers.
    empty: bool,
    platform: &'a kiln_proto::pb::Platform,
    /// The frontend's image config.
    image_config: Option<&'a [u8]>,
    /// The solve's cache, when `--export-cache type=inline` asks for it in the images.
    inline: Option<&'a CacheExport<KilnRef>>,
}

/// A `--metadata-file` value: text, a descriptor (buildctl decodes base64 JSON), or JSON
/// (kiln's per-step figures).
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
enum Metadata {
    Text(String),
    Descriptor(export::ImageDescriptor),
    Json(serde_json::Value),
}

impl Exports<'_> {
    /// Writes the result where each `--output` says, recording what BuildKit's exporters
    /// answer in `metadata`. Only outputs of files pull a lazy result's layers.
    async fn outputs(
        &self,
        outputs: &[OutputSpec],
        metadata: &mut BTreeMap<String, Metadata>,
    ) -> anyhow::Result<()> {
        let mut snapshot: Option<ImmutableRef> = None;
        for output in outputs {
            if !output.needs_files() {
                self.image(output, metadata)
                    .await
                    .context("failed to solve")?;
                continue;
            }
            let snap = match &snapshot {
                Some(s) => s.clone(),
                None => {
                    let s = self
                        .worker
                        .materialize(self.result)
                        .await
                        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
                    snapshot = Some(s.clone());
                    s
                }
            };
            let output = output.clone();
            tokio::task::spawn_blocking(move || export_files(&snap, &output))
                .await
                .context("export task")?
                .context("failed to solve")?;
        }
        Ok(())
    }

    /// An image output: the result's layers (blobs reused by digest, a lazy result's
    /// left on its registry), assembled once, then archived, pushed or stored.
    async fn image(
        &self,
        output: &OutputSpec,
        metadata: &mut BTreeMap<String, Metadata>,
    ) -> anyhow::Result<()> {
        let (name, flags) = match output {
            OutputSpec::Archive { name, image, .. } | OutputSpec::Image { name, image, .. } => {
                (name.as_str(), *image)
            }
            OutputSpec::Local { .. } | OutputSpec::Tar { .. } => return Ok(()),
        };
        let layers_of = self.worker.cache_layers();
        let layers = match self.empty {
            true => Vec::new(),
            false => layers_of
                .chain(self.result, Some(flags.compression))
                .await?
                .context("the result has no layers to export")?,
        };
        let inline = match self.inline {
            Some(cache) => {
                let built = remotecache::export::build(cache, remotecache::Mode::Min, &layers_of)
                    .await
                    .context("exporting inline cache")?;
                let digests: Vec<_> = layers.iter().map(|l| l.digest.clone()).collect();
                remotecache::export::inline_records(&built, &digests)
                    .context("exporting inline cache")?
            }
            None => None,
        };
        let now = std::time::SystemTime::now();
        let image = export::assemble(
            layers,
            &export::ImageOptions {
                platform: self.platform,
                base_config: None,
                image_config: self.image_config,
                oci_types: flags.oci_types,
                inline_cache: inline.as_deref(),
            },
            now,
        )?;
        let parsed = match name {
            "" => None,
            n => Some(export::ImageName::parse(n)?),
        };
        let text = |s: &str| Metadata::Text(s.to_owned());
        metadata.insert(
            "containerimage.digest".into(),
            text(image.manifest_digest.as_str()),
        );
        metadata.insert(
            "containerimage.config.digest".into(),
            text(image.config_digest.as_str()),
        );
        match output {
            OutputSpec::Archive { docker, dest, .. } => {
                let mut paths = Vec::with_capacity(image.layers.len());
                for layer in &image.layers {
                    paths.push(layer.local_path().await?);
                }
                let format = match docker {
                    true => export::ArchiveFormat::Docker,
                    false => export::ArchiveFormat::Oci,
                };
                let created = kiln_proto::gojson::rfc3339_seconds(now);
                let (dest, name) = (dest.clone(), parsed.clone());
                let descriptor = tokio::task::spawn_blocking(move || {
                    let mut out = open_output(&dest)?;
                    let d = export::write_archive(
                        &image,
                        &paths,
                        name.as_ref(),
                        &created,
                        format,
                        &mut out,
                    )?;
                    out.flush()
                        .with_context(|| format!("writing {}", dest.display()))?;
                    anyhow::Ok(d)
                })
                .await
                .context("export task")??;
                metadata.insert(
                    "containerimage.descriptor".into(),
                    Metadata::Descriptor(descriptor),
                );
                if let Some(n) = &parsed {
                    metadata.insert("image.name".into(), text(&n.full));
                }
            }
            OutputSpec::Image { push, .. } => {
                let content = self.worker.images().content();
                if *push {
                    let reference = kiln_registry::reference::parse_normalized(name)?;
                    let client = self.worker.images().clients().get(reference.registry())?;
                    let target = reference
                        .tag()
                        .unwrap_or(image.manifest_digest.as_str())
                        .to_owned();
                    export::push(
                        &image,
                        &client,
                        reference.repository(),
                        &target,
                        Some(content),
                    )
                    .await
                    .with_context(|| format!("failed to push {name}"))?;
                } else {
                    export::store(&image, content, parsed.as_ref()).await?;
                }
                metadata.insert(
                    "containerimage.descriptor".into(),
                    Metadata::Descriptor(image.descriptor(BTreeMap::new())),
                );
                metadata.insert("image.name".into(), text(name));
            }
            OutputSpec::Local { .. } | OutputSpec::Tar { .. } => {}
        }
        Ok(())
    }
}

/// Writes `--metadata-file` as buildctl does (indented JSON, sorted keys).
fn write_metadata(path: &Path, metadata: &BTreeMap<String, Metadata>) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(metadata).context("encoding the metadata")?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes the files of `result` where `output` says. Runs on a blocking thread: exports
/// mount a view and walk it synchronously.
fn export_files(result: &ImmutableRef, output: &OutputSpec) -> anyhow::Result<()> {
    match output {
        OutputSpec::Local { dest } => export::local(result, dest)
            .with_context(|| format!("exporting to {}", dest.display()))?,
        OutputSpec::Tar { dest } => {
            let mut out = open_output(dest)?;
            export::tar(result, &mut out)?;
            out.flush()
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        OutputSpec::Archive { .. } | OutputSpec::Image { .. } => {}
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
