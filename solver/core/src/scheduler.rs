//! The scheduler: resolves the target edge of a loaded graph on tokio, computing each
//! vertex's CacheMap and cache keys, loading a cached result or executing the op
//! (cache-keys.md §5), with BuildKit's split between the solver and [`Op`]s.
//!
//! Per edge `(vertex, output)`:
//! 1. **fast**: keys of the inputs found without running anything (root keys of sources,
//!    then keys found through stored links); a key reached from every input with a
//!    loadable result is a hit.
//! 2. **slow**: the inputs are resolved (in parallel); content-based keys are computed for
//!    inputs whose dep asks for them; links from all input keys are queried again.
//! 3. **execute**: under an exclusive `flock` on `<locks>/<hash of digest, output, input
//!    keys>` (so two solves, in this process or another, run a step once), the cache is
//!    checked again, then the op runs (at most `parallelism` at a time) and
//!    `results[output]` is saved under the key found through links or a new random ID.
//!
//! Within one solve every edge and every vertex execution is memoised, so a vertex shared
//! by several dependents runs once. The first failure cancels the job and is the error
//! the solve returns, naming the vertex. IgnoreCache (§7): the vertex skips every
//! lookup, executes and still saves; every dependent in that solve executes too (saving
//! under its existing key), and later solves load the newest result.
//!
//! Session-bound edges (a `random:` source such as `local://`, and every step reached from
//! it only through definition-based keys) can never hit in another solve: they execute
//! without a lock, are not saved, and nothing links from their keys; a content-based key
//! downstream makes the chain durable again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use futures_util::future::join_all;
use kiln_proto::{Digest, Edge, Graph, VertexId};
use tokio::sync::{OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cachemap::CacheMap;
use crate::key_lock::{KeyLock, KeySlot};
use crate::keys::{CacheKey, KeyDep, random_id, root_key};
use crate::op::{JobContext, Op, OpError, Session, Worker};
use crate::progress::{ProgressEvent, ProgressSender};
use crate::source::{CacheSource, View};
use crate::store::{CacheResult, Store};

/// Errors of a solve. Cloneable because one failure is shared by every dependent.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SolveError {
    #[error("{name} ({vertex}): {message}")]
    Vertex {
        vertex: Digest,
        name: String,
        message: String,
    },
    #[error("build cancelled")]
    Cancelled,
    #[error("locks directory {path}: {message}")]
    Locks { path: PathBuf, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SolverOptions {
    /// How many ops may execute at once.
    pub parallelism: usize,
    /// Directory for the cross-process lock files (`<root>/locks`).
    pub locks_dir: PathBuf,
}

impl SolverOptions {
    /// Defaults for a state directory: one op per CPU, locks under `<root>/locks`.
    pub fn for_root(root: &Path) -> Self {
        SolverOptions {
            parallelism: std::thread::available_parallelism().map_or(1, usize::from),
            locks_dir: root.join("locks"),
        }
    }
}

/// Per-solve inputs besides the graph.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub progress: ProgressSender,
    /// Cancel to stop the solve (Ctrl-C).
    pub cancel: CancellationToken,
    pub session: Arc<Session>,
    /// Load the result of every vertex, as a `mode=max` cache export needs; otherwise a
    /// vertex found in the cache through its inputs' keys spares loading (or running)
    /// those inputs.
    pub load_every_result: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            progress: ProgressSender::discard(),
            cancel: CancellationToken::new(),
            session: Arc::new(Session::default()),
            load_every_result: false,
        }
    }
}

/// Solves graphs against one cache store with one worker. Cheap to share (`Arc`), and
/// several solves may run at once.
pub struct Solver<W: Worker> {
    shared: Arc<Shared<W>>,
}

impl<W: Worker> std::fmt::Debug for Solver<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Solver")
            .field("store", &self.shared.store.path())
            .field("locks_dir", &self.shared.locks_dir)
            .finish_non_exhaustive()
    }
}

struct Shared<W: Worker> {
    worker: Arc<W>,
    store: Arc<Store>,
    /// Imported caches, looked up beside the store.
    sources: Vec<Arc<dyn CacheSource<W::Ref>>>,
    locks_dir: PathBuf,
    exec_slots: Semaphore,
}

/// One key of a solve, as a cache export describes it: the digest its record carries
/// (`rootKey(CacheMap digest, output)`, or the key itself for root and content keys) and,
/// per input, the keys it links from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportedKey {
    pub digest: String,
    pub deps: Vec<Vec<KeyDep>>,
}

/// A result a solve produced or loaded, under one of its keys.
#[derive(Clone, Debug)]
pub struct ExportedResult<R> {
    pub result: R,
    /// Unix time in nanoseconds.
    pub created_at: i64,
}

/// What a cache exporter needs of a solve: every durable key it met with its links, the
/// results it resolved, and the keys of the target.
#[derive(Clone, Debug)]
pub struct CacheExport<R> {
    pub keys: std::collections::BTreeMap<String, ExportedKey>,
    pub results: std::collections::BTreeMap<String, ExportedResult<R>>,
    pub target: Vec<String>,
}

impl<R> Default for CacheExport<R> {
    fn default() -> Self {
        CacheExport {
            keys: Default::default(),
            results: Default::default(),
            target: Vec::new(),
        }
    }
}

impl<R> CacheExport<R> {
    fn key(&mut self, id: &str, digest: &str, deps: &[Vec<KeyDep>]) {
        let entry = self.keys.entry(id.to_owned()).or_default();
        entry.digest = digest.to_owned();
        if entry.deps.len() < deps.len() {
            entry.deps.resize(deps.len(), Vec::new());
        }
        for (mine, theirs) in entry.deps.iter_mut().zip(deps) {
            for d in theirs {
                if !mine.contains(d) {
                    mine.push(d.clone());
                }
            }
        }
    }
}

/// Where a cache record was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Local,
    Source(usize),
}

impl<W: Worker> Solver<W> {
    pub fn new(worker: Arc<W>, store: Arc<Store>, options: SolverOptions) -> Self {
        Solver {
            shared: Arc::new(Shared {
                worker,
                store,
                sources: Vec::new(),
                locks_dir: options.locks_dir,
                exec_slots: Semaphore::new(options.parallelism.max(1)),
            }),
        }
    }

    /// Adds imported caches, looked up beside the store in every later solve. Call it
    /// before sharing the solver.
    pub fn with_sources(mut self, sources: Vec<Arc<dyn CacheSource<W::Ref>>>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.sources.extend(sources);
        }
        self
    }

    /// Resolves the graph's target edge to a result.
    pub async fn solve(&self, graph: Arc<Graph>, job: JobOptions) -> Result<W::Ref, SolveError> {
        self.solve_for_export(graph, job).await.map(|(r, _)| r)
    }

    /// Resolves the graph's target edge to a result, and describes the keys and results
    /// of the solve for a cache export.
    pub async fn solve_for_export(
        &self,
        graph: Arc<Graph>,
        job: JobOptions,
    ) -> Result<(W::Ref, CacheExport<W::Ref>), SolveError> {
        std::fs::create_dir_all(&self.shared.locks_dir).map_err(|e| SolveError::Locks {
            path: self.shared.locks_dir.clone(),
            message: e.to_string(),
        })?;
        let cancel = job.cancel.child_token();
        let vertices = (0..graph.vertices().len())
            .map(|_| VertexState::default())
            .collect();
        let state = Arc::new(Job {
            shared: self.shared.clone(),
            graph: graph.clone(),
            progress: job.progress,
            session: job.session,
            cancel: cancel.clone(),
            user_cancel: job.cancel,
            vertices,
            first_error: OnceLock::new(),
            tasks: TaskTracker::new(),
            export: Mutex::new(CacheExport::default()),
            load_every_result: job.load_every_result,
        });
        let outcome = state.clone().resolve_edge(graph.target()).await;
        // Nothing of this job may keep running once it returns: stop what is left and wait
        // for the ops that were told to, so they finish cleaning up first.
        cancel.cancel();
        state.tasks.close();
        state.tasks.wait().await;
        match outcome {
            Ok(outcome) => {
                let mut export = std::mem::take(
                    &mut *state
                        .export
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                export.target = if outcome.session_bound {
                    Vec::new()
                } else {
                    outcome.keys.clone()
                };
                Ok((outcome.result.clone(), export))
            }
            Err(err) => Err(state.final_error(err)),
        }
    }
}

/// What an edge resolved to.
struct EdgeOutcome<R> {
    result: R,
    /// Every key ID this result is known under (dependents link from these).
    keys: Vec<String>,
    /// Executed in this solve because of IgnoreCache (itself or an input).
    forced: bool,
    /// Its keys can never be reached from another solve (a session-bound source, such as
    /// `local://`, upstream with no content-based key in between): it is neither locked
    /// nor saved, nothing links from its keys, and its result stays temporary.
    session_bound: bool,
}

type Shared1<T> = Arc<OnceCell<Result<T, SolveError>>>;

struct VertexState<R> {
    op: OnceCell<Result<Arc<dyn Op<R>>, SolveError>>,
    cache_maps: tokio::sync::Mutex<(Vec<CacheMap>, bool)>,
    exec: OnceCell<Result<Arc<Vec<R>>, SolveError>>,
    edges: Mutex<HashMap<i64, Shared1<Arc<EdgeOutcome<R>>>>>,
    fast_keys: Mutex<HashMap<i64, Shared1<Vec<String>>>>,
    reported_cached: std::sync::atomic::AtomicBool,
}

impl<R> Default for VertexState<R> {
    fn default() -> Self {
        VertexState {
            op: OnceCell::new(),
            cache_maps: tokio::sync::Mutex::new((Vec::new(), false)),
            exec: OnceCell::new(),
            edges: Mutex::new(HashMap::new()),
            fast_keys: Mutex::new(HashMap::new()),
            reported_cached: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

struct Job<W: Worker> {
    shared: Arc<Shared<W>>,
    graph: Arc<Graph>,
    progress: ProgressSender,
    session: Arc<Session>,
    /// The job's own token: cancelled by the user's token, by the first failure, or when
    /// the solve returns.
    cancel: CancellationToken,
    user_cancel: CancellationToken,
    vertices: Vec<VertexState<W::Ref>>,
    first_error: OnceLock<SolveError>,
    /// Every task the job spawned, waited for before the solve returns.
    tasks: TaskTracker,
    /// Keys and results met, for a cache export.
    export: Mutex<CacheExport<W::Ref>>,
    /// [`JobOptions::load_every_result`]: no fast path, every edge is resolved.
    load_every_result: bool,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

fn cell<T>(map: &Mutex<HashMap<i64, Shared1<T>>>, output: i64) -> Shared1<T> {
    // A poisoned map only means another task panicked while inserting; the map is intact.
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.entry(output).or_default().clone()
}

impl<W: Worker> Job<W> {
    fn state(&self, id: VertexId) -> &VertexState<W::Ref> {
        &self.vertices[id.0]
    }

    fn vertex_error(&self, id: VertexId, message: impl Into<String>) -> SolveError {
        let vertex = self.graph.vertex(id);
        SolveError::Vertex {
            vertex: vertex.digest.clone(),
            name: vertex.name.clone(),
            message: message.into(),
        }
    }

    /// Records a vertex's own failure: the first one cancels the rest of the job.
    async fn fail(&self, id: VertexId, message: impl Into<String>) -> SolveError {
        let err = self.vertex_error(id, message);
        let vertex = self.graph.vertex(id);
        self.progress
            .send(ProgressEvent::Error {
                vertex: vertex.digest.clone(),
                name: vertex.name.clone(),
                at: SystemTime::now(),
                error: err.to_string(),
            })
            .await;
        if self.first_error.set(err.clone()).is_ok() {
            self.cancel.cancel();
        }
        err
    }

    /// The error a failed solve reports: the first vertex failure rather than the
    /// cancellations it caused, unless the user cancelled first.
    fn final_error(&self, err: SolveError) -> SolveError {
        match (&err, self.first_error.get()) {
            (SolveError::Cancelled, Some(first)) if !self.user_cancel.is_cancelled() => {
                first.clone()
            }
            _ => err,
        }
    }

    fn op_error(&self, id: VertexId, err: OpError) -> Result<(), SolveError> {
        match err {
            OpError::Cancelled => Err(SolveError::Cancelled),
            other => Err(self.vertex_error(id, other.to_string())),
        }
    }

    fn ctx(&self, id: VertexId) -> JobContext {
        let vertex = self.graph.vertex(id);
        JobContext {
            vertex: vertex.digest.clone(),
            name: vertex.name.clone(),
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
            session: self.session.clone(),
        }
    }

    fn check_cancelled(&self) -> Result<(), SolveError> {
        if self.cancel.is_cancelled() {
            Err(SolveError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs a store call. In place: a call is a statement or two on a local SQLite
    /// database in WAL mode (tens of microseconds; readers never wait), and handing each
    /// to the blocking pool cost two thread switches, which were most of the time of a
    /// fully cached build.
    async fn store<T: Send + 'static>(
        &self,
        id: VertexId,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, SolveError> {
        match f(&self.shared.store) {
            Ok(value) => Ok(value),
            Err(e) => Err(self.fail(id, e.to_string()).await),
        }
    }

    /// Runs a blocking lookup over the store and the imported caches.
    async fn lookup<T: Send + 'static>(
        &self,
        id: VertexId,
        f: impl FnOnce(&View<'_, W::Ref>) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, SolveError> {
        let sources = self.shared.sources.clone();
        self.store(id, move |store| {
            f(&View {
                store,
                sources: &sources,
            })
        })
        .await
    }

    fn record_key(&self, id: &str, digest: &str, deps: &[Vec<KeyDep>]) {
        self.export
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .key(id, digest, deps);
    }

    fn record_result(&self, key: &str, result: &W::Ref, created_at: i64) {
        self.export
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .results
            .insert(
                key.to_owned(),
                ExportedResult {
                    result: result.clone(),
                    created_at,
                },
            );
    }

    async fn op(&self, id: VertexId) -> Result<Arc<dyn Op<W::Ref>>, SolveError> {
        let resolved = self
            .state(id)
            .op
            .get_or_init(|| async {
                self.shared
                    .worker
                    .resolve_op(self.graph.vertex(id))
                    .map_err(|e| self.vertex_error(id, e.to_string()))
            })
            .await
            .clone();
        match resolved {
            Ok(op) => Ok(op),
            Err(err) => {
                if let SolveError::Vertex { message, .. } = &err {
                    return Err(self.fail(id, message.clone()).await);
                }
                Err(err)
            }
        }
    }

    /// CacheMap `index` of a vertex (`None` past the last one), fetched once per solve.
    async fn cache_map(&self, id: VertexId, index: usize) -> Result<Option<CacheMap>, SolveError> {
        let mut maps = self.state(id).cache_maps.lock().await;
        while maps.0.len() <= index {
            if maps.1 {
                return Ok(None);
            }
            let op = self.op(id).await?;
            let next = maps.0.len();
            match op.cache_map(&self.ctx(id), next).await {
                Ok(response) => {
                    maps.0.push(response.map);
                    // Ops with inputs have exactly one CacheMap.
                    maps.1 = response.done || !self.graph.vertex(id).inputs.is_empty();
                }
                Err(OpError::Cancelled) => return Err(SolveError::Cancelled),
                Err(e) => return Err(self.fail(id, format!("cache map: {e}")).await),
            }
        }
        Ok(maps.0.get(index).cloned())
    }

    async fn all_cache_maps(&self, id: VertexId) -> Result<Vec<CacheMap>, SolveError> {
        let mut out = Vec::new();
        while let Some(map) = self.cache_map(id, out.len()).await? {
            out.push(map);
        }
        Ok(out)
    }

    /// Resolves an edge once per solve; concurrent callers share the work.
    fn resolve_edge(
        self: Arc<Self>,
        edge: Edge,
    ) -> BoxFuture<Result<Arc<EdgeOutcome<W::Ref>>, SolveError>> {
        Box::pin(async move {
            let slot = cell(&self.state(edge.vertex).edges, edge.index);
            let job = self.clone();
            slot.get_or_init(|| async move { job.compute_edge(edge).await.map(Arc::new) })
                .await
                .clone()
        })
    }

    /// Keys of an edge known without executing it (empty when none): from its inputs'
    /// keys, found by looking up links; an input with none is resolved first.
    fn fast_keys(self: Arc<Self>, edge: Edge) -> BoxFuture<Result<Vec<String>, SolveError>> {
        Box::pin(async move {
            let slot = cell(&self.state(edge.vertex).fast_keys, edge.index);
            let job = self.clone();
            slot.get_or_init(|| async move { job.compute_fast_keys(edge).await })
                .await
                .clone()
        })
    }

    async fn compute_fast_keys(self: Arc<Self>, edge: Edge) -> Result<Vec<String>, SolveError> {
        let id = edge.vertex;
        let vertex = self.graph.vertex(id);
        // An IgnoreCache vertex publishes no keys before it completes.
        if vertex.options.ignore_cache {
            return Ok(Vec::new());
        }
        if vertex.inputs.is_empty() {
            let maps = self.all_cache_maps(id).await?;
            let keys: Vec<String> = maps
                .iter()
                .filter(|m| !m.digest.is_random())
                .map(|m| root_key(&m.digest, edge.index))
                .collect();
            for k in &keys {
                self.record_key(k, k, &[]);
            }
            return Ok(keys);
        }
        let Some(map) = self.cache_map(id, 0).await? else {
            return Ok(Vec::new());
        };
        // The inputs' keys are worked out together: an input without fast keys is
        // resolved for them, and that must not wait for another input's keys (independent
        // steps would run one after the other). In this task, not on tasks of their own:
        // a hand-off per vertex of a long chain costs more than its lookups.
        let results = join_all(
            vertex
                .inputs
                .iter()
                .map(|input| self.clone().input_keys(*input)),
        )
        .await;
        let mut deps = Vec::with_capacity(results.len());
        for (i, keys) in results.into_iter().enumerate() {
            let Some(keys) = keys? else {
                return Ok(Vec::new());
            };
            let selector = dep_selector(&map, i);
            deps.push(
                keys.into_iter()
                    .map(|key| KeyDep {
                        key,
                        selector: selector.clone(),
                    })
                    .collect(),
            );
        }
        let key = CacheKey {
            digest: map.digest.clone(),
            output: edge.index,
            deps,
        };
        let record_digest = root_key(&map.digest, edge.index);
        let deps = key.deps.clone();
        let found = self.lookup(id, move |v| key.candidates(v)).await?.keys;
        for k in &found {
            self.record_key(k, &record_digest, &deps);
        }
        Ok(found)
    }

    /// The keys an input gives its dependents' fast keys: its own fast keys, or else
    /// (a session-bound source upstream, e.g. a local context) those of its result once
    /// resolved — otherwise every vertex downstream of a context would take the slow path
    /// and load its result (and content-hash its inputs) when only the final result is
    /// needed. `None` when it has none another solve could have linked from: forced by
    /// IgnoreCache, or session-bound.
    async fn input_keys(self: Arc<Self>, input: Edge) -> Result<Option<Vec<String>>, SolveError> {
        let keys = self.clone().fast_keys(input).await?;
        if !keys.is_empty() {
            return Ok(Some(keys));
        }
        let outcome = self.resolve_edge(input).await?;
        Ok((!outcome.forced && !outcome.session_bound).then(|| outcome.keys.clone()))
    }

    /// Loads the newest loadable result among `keys`; records whose ref is gone are
    /// dropped. Returns the result and the key it was found under.
    /// Local results come first (they cost nothing to load), newest first, then the
    /// imported caches' results, newest first.
    async fn try_load(
        &self,
        id: VertexId,
        keys: &[String],
    ) -> Result<Option<Loaded<W::Ref>>, SolveError> {
        let mut records: Vec<(Origin, String, CacheResult)> = Vec::new();
        for key in keys {
            let k = key.clone();
            for record in self.store(id, move |s| s.results(&k)).await? {
                records.push((Origin::Local, key.clone(), record));
            }
            for (i, source) in self.shared.sources.iter().enumerate() {
                for record in source.results(key) {
                    records.push((Origin::Source(i), key.clone(), record));
                }
            }
        }
        records.sort_by_key(|r| (r.0 != Origin::Local, std::cmp::Reverse(r.2.created_at)));
        for (origin, key, record) in records {
            self.check_cancelled()?;
            let loaded = match origin {
                Origin::Local => self.shared.worker.load_result(&record.id).await,
                Origin::Source(i) => self.shared.sources[i].load(&record.id).await,
            };
            match loaded {
                Ok(Some(r)) => {
                    self.report_cached(id).await;
                    self.record_result(&key, &r, record.created_at);
                    return Ok(Some(Loaded {
                        result: r,
                        key,
                        origin,
                    }));
                }
                Ok(None) if origin == Origin::Local => {
                    let (k, rid) = (key.clone(), record.id.clone());
                    self.store(id, move |s| s.remove_result(&k, &rid)).await?;
                }
                Err(OpError::Cancelled) => return Err(SolveError::Cancelled),
                // BuildKit discards a record that fails to load and goes on.
                Ok(None) | Err(_) => {}
            }
        }
        Ok(None)
    }

    async fn report_cached(&self, id: VertexId) {
        let state = self.state(id);
        if !state
            .reported_cached
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let vertex = self.graph.vertex(id);
            self.progress
                .send(ProgressEvent::Cached {
                    vertex: vertex.digest.clone(),
                    name: vertex.name.clone(),
                    at: SystemTime::now(),
                })
                .await;
        }
    }

    async fn compute_edge(self: Arc<Self>, edge: Edge) -> Result<EdgeOutcome<W::Ref>, SolveError> {
        self.check_cancelled()?;
        let id = edge.vertex;
        let vertex = self.graph.vertex(id);
        let ignore = vertex.options.ignore_cache;
        if vertex.inputs.is_empty() {
            return self.compute_root_edge(edge, ignore).await;
        }
        let Some(map) = self.cache_map(id, 0).await? else {
            return Err(self.fail(id, "op returned no cache map").await);
        };
        if map.deps.len() != vertex.inputs.len() {
            let message = format!(
                "cache map has {} deps for {} inputs",
                map.deps.len(),
                vertex.inputs.len()
            );
            return Err(self.fail(id, message).await);
        }

        // Fast path: keys from the inputs' keys, without loading the inputs that have
        // keys of their own.
        if !ignore && !self.load_every_result {
            let key_ids = self.clone().fast_keys(edge).await?;
            if let Some(Loaded { result, .. }) = self.try_load(id, &key_ids).await? {
                return Ok(EdgeOutcome {
                    result,
                    keys: key_ids,
                    forced: false,
                    session_bound: false,
                });
            }
        }

        // Slow path: resolve the inputs (in parallel), then content-based keys.
        let mut tasks = Vec::with_capacity(vertex.inputs.len());
        for input in &vertex.inputs {
            tasks.push(self.tasks.spawn(self.clone().resolve_edge(*input)));
        }
        let mut inputs = Vec::with_capacity(tasks.len());
        for task in tasks {
            let outcome = task
                .await
                .map_err(|e| SolveError::Internal(format!("input task: {e}")))??;
            inputs.push(outcome);
        }
        self.check_cancelled()?;
        let forced = ignore || inputs.iter().any(|i| i.forced);
        let mut deps: Vec<Vec<KeyDep>> = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let dep = &map.deps[i];
            let mut list: Vec<KeyDep> = input
                .keys
                .iter()
                .map(|k| KeyDep {
                    key: k.clone(),
                    selector: dep.selector_str().to_owned(),
                })
                .collect();
            if dep.preprocess {
                if let Err(e) = self.shared.worker.preprocess(&input.result).await {
                    self.op_error(id, e)?;
                }
            }
            // Wildcard/pattern selectors (COPY with globs) are not content-hashed yet: such
            // an input keeps its definition-based keys only, rather than failing the build.
            let hashable = dep
                .content
                .as_ref()
                .filter(|sels| !sels.iter().any(|s| s.has_wildcard_or_filters()));
            if let Some(selectors) = hashable {
                match self
                    .shared
                    .worker
                    .content_digest(Some(&input.result), selectors)
                    .await
                {
                    Ok(digest) => {
                        let slow = root_key(&digest.into(), -1);
                        self.record_key(&slow, &slow, &[]);
                        list.push(KeyDep {
                            key: slow,
                            selector: String::new(),
                        })
                    }
                    Err(OpError::Cancelled) => return Err(SolveError::Cancelled),
                    Err(e) => {
                        let message = format!("failed to calculate checksum of input {i}: {e}");
                        return Err(self.fail(id, message).await);
                    }
                }
            }
            deps.push(list);
        }
        // Keys of session-bound inputs are never looked up again: link, look up and lock
        // through the durable (content-based) keys only, so the store does not grow by a
        // dead link per build.
        for (input, list) in inputs.iter().zip(deps.iter_mut()) {
            if input.session_bound {
                list.retain(|d| !input.keys.contains(&d.key));
            }
        }
        let refs: Vec<W::Ref> = inputs.iter().map(|i| i.result.clone()).collect();
        // An input left without a durable key makes this edge session-bound too.
        if deps.iter().any(Vec::is_empty) {
            let result = self.execute(id, refs, edge.index).await?;
            return Ok(EdgeOutcome {
                result,
                keys: vec![random_id()],
                forced,
                session_bound: true,
            });
        }
        let key = CacheKey {
            digest: map.digest.clone(),
            output: edge.index,
            deps,
        };
        if !forced {
            if let Some(outcome) = self.load_by_links(id, &key).await? {
                return Ok(outcome);
            }
        }

        // Execute, once across solves and processes.
        let mut lock_material: Vec<String> =
            key.deps.iter().flatten().map(|d| d.key.clone()).collect();
        lock_material.sort();
        let _lock = self.lock(id, &map, edge.index, &lock_material).await?;
        if !forced {
            if let Some(outcome) = self.load_by_links(id, &key).await? {
                return Ok(outcome);
            }
        }
        let result = self.execute(id, refs, edge.index).await?;
        let k = key.clone();
        let existing = self.lookup(id, move |v| k.existing_ids(v)).await?;
        let key_id = existing.into_iter().next().unwrap_or_else(random_id);
        self.save(id, &key_id, key.links(), &result).await?;
        self.record_key(&key_id, &root_key(&map.digest, edge.index), &key.deps);
        self.record_result(&key_id, &result, CacheResult::now("").created_at);
        Ok(EdgeOutcome {
            result,
            keys: vec![key_id],
            forced,
            session_bound: false,
        })
    }

    /// A hit through links from every input; the matched key also learns links from
    /// every dep key that did not point at it yet.
    async fn load_by_links(
        &self,
        id: VertexId,
        key: &CacheKey,
    ) -> Result<Option<EdgeOutcome<W::Ref>>, SolveError> {
        let k = key.clone();
        let candidates = self.lookup(id, move |v| k.candidates(v)).await?;
        let Some(Loaded {
            result,
            key: hit,
            origin,
        }) = self.try_load(id, &candidates.keys).await?
        else {
            return Ok(None);
        };
        self.record_key(&hit, &root_key(&key.digest, key.output), &key.deps);
        // A local key learns links from the dep keys that did not point at it yet (no
        // write at all when every link is there, as in a build that is fully cached); an
        // imported one is copied into the store only when something is saved below it.
        let missing = candidates.missing_links(key, &hit);
        if origin == Origin::Local && !missing.is_empty() {
            let target = hit.clone();
            self.store(id, move |s| s.save(&target, &missing, None))
                .await?;
        }
        Ok(Some(EdgeOutcome {
            result,
            keys: vec![hit],
            forced: false,
            session_bound: false,
        }))
    }

    async fn compute_root_edge(
        self: Arc<Self>,
        edge: Edge,
        ignore: bool,
    ) -> Result<EdgeOutcome<W::Ref>, SolveError> {
        let id = edge.vertex;
        let mut keys: Vec<String> = Vec::new();
        let mut first: Option<CacheMap> = None;
        // CacheMaps one at a time: a hit on an early one spares computing the next.
        let mut index = 0;
        while let Some(map) = self.cache_map(id, index).await? {
            index += 1;
            keys.push(root_key(&map.digest, edge.index));
            let random = map.digest.is_random();
            first.get_or_insert(map);
            if !ignore && !random {
                let k = &keys[keys.len() - 1];
                self.record_key(k, k, &[]);
                if let Some(Loaded { result, .. }) =
                    self.try_load(id, &keys[keys.len() - 1..]).await?
                {
                    return Ok(EdgeOutcome {
                        result,
                        keys,
                        forced: false,
                        session_bound: false,
                    });
                }
            }
        }
        let Some(map) = first else {
            return Err(self.fail(id, "op returned no cache map").await);
        };
        // A session-bound key (`random:`, a `local://` source) can never match in another
        // solve: nothing to wait for or to save, and its result stays temporary.
        let shareable = !map.digest.is_random();
        let _lock = if shareable {
            Some(self.lock(id, &map, edge.index, &[]).await?)
        } else {
            None
        };
        if !ignore && shareable {
            if let Some(Loaded { result, .. }) = self.try_load(id, &keys).await? {
                return Ok(EdgeOutcome {
                    result,
                    keys,
                    forced: false,
                    session_bound: false,
                });
            }
        }
        let result = self.execute(id, Vec::new(), edge.index).await?;
        if shareable {
            let now = CacheResult::now("").created_at;
            for key in &keys {
                self.save(id, key, Vec::new(), &result).await?;
                self.record_key(key, key, &[]);
                self.record_result(key, &result, now);
            }
        }
        Ok(EdgeOutcome {
            result,
            keys,
            forced: ignore,
            session_bound: !shareable,
        })
    }

    async fn save(
        &self,
        id: VertexId,
        key: &str,
        links: Vec<(String, crate::store::Link)>,
        result: &W::Ref,
    ) -> Result<(), SolveError> {
        // Retain first, so that a record never names a result that can vanish.
        if let Err(e) = self.shared.worker.on_cached(result).await {
            self.op_error(id, e)?;
        }
        let record = CacheResult::now(self.shared.worker.result_id(result));
        let key = key.to_owned();
        // Keys an imported cache gave are copied into the store first, so that what is
        // saved below them is found again without that cache.
        self.lookup(id, move |v| {
            let sources: Vec<String> = links.iter().map(|(s, _)| s.clone()).collect();
            v.persist(&sources)?;
            v.store.save(&key, &links, Some(&record))
        })
        .await
    }

    /// Exclusive lock for executing `(digest, output, input keys)`, held until dropped.
    async fn lock(
        &self,
        id: VertexId,
        map: &CacheMap,
        output: i64,
        input_keys: &[String],
    ) -> Result<KeyLock, SolveError> {
        let material = format!("{}\0{output}\0{}", map.digest, input_keys.join("\0"));
        let slot = KeySlot::new(&self.shared.locks_dir, &Digest::of(material.as_bytes()));
        // Uncontended (the usual case), the lock is taken here, without a thread hop.
        match slot.try_lock() {
            Ok(Some(lock)) => return Ok(lock),
            Ok(None) => {}
            Err(message) => return Err(self.fail(id, message).await),
        }
        let wait = tokio::task::spawn_blocking(move || slot.wait());
        tokio::select! {
            joined = wait => match joined {
                Ok(Ok(lock)) => Ok(lock),
                Ok(Err(message)) => Err(self.fail(id, message).await),
                Err(e) => Err(SolveError::Internal(format!("lock task: {e}"))),
            },
            // The blocked thread gets the lock later and drops it at once.
            () = self.cancel.cancelled() => Err(SolveError::Cancelled),
        }
    }

    /// Runs the vertex's op once per solve and picks `results[output]`.
    async fn execute(
        &self,
        id: VertexId,
        inputs: Vec<W::Ref>,
        output: i64,
    ) -> Result<W::Ref, SolveError> {
        let results = self
            .state(id)
            .exec
            .get_or_init(|| self.run_op(id, inputs))
            .await
            .clone()?;
        let picked = usize::try_from(output).ok().and_then(|o| results.get(o));
        match picked {
            Some(r) => Ok(r.clone()),
            None => {
                let message = format!(
                    "invalid response from exec need {output} index but {} results received",
                    results.len()
                );
                Err(self.fail(id, message).await)
            }
        }
    }

    async fn run_op(
        &self,
        id: VertexId,
        inputs: Vec<W::Ref>,
    ) -> Result<Arc<Vec<W::Ref>>, SolveError> {
        let op = self.op(id).await?;
        let _slot = tokio::select! {
            permit = self.shared.exec_slots.acquire() => permit
                .map_err(|_| SolveError::Internal("execution slots closed".to_owned()))?,
            () = self.cancel.cancelled() => return Err(SolveError::Cancelled),
        };
        self.check_cancelled()?;
        let vertex = self.graph.vertex(id);
        self.progress
            .send(ProgressEvent::Started {
                vertex: vertex.digest.clone(),
                name: vertex.name.clone(),
                at: SystemTime::now(),
            })
            .await;
        // The op sees the job's token and must return soon after it fires.
        match op.exec(&self.ctx(id), inputs).await {
            Ok(results) => {
                self.progress
                    .send(ProgressEvent::Done {
                        vertex: vertex.digest.clone(),
                        name: vertex.name.clone(),
                        at: SystemTime::now(),
                    })
                    .await;
                Ok(Arc::new(results))
            }
            Err(OpError::Cancelled) => Err(SolveError::Cancelled),
            Err(e) => Err(self.fail(id, e.to_string()).await),
        }
    }
}

/// A result loaded from the cache: under which key and from where.
struct Loaded<R> {
    result: R,
    key: String,
    origin: Origin,
}

fn dep_selector(map: &CacheMap, input: usize) -> String {
    map.deps
        .get(input)
        .map(|d| d.selector_str().to_owned())
        .unwrap_or_default()
}
