//! The scheduler with fake ops: shared vertices run once, branches overlap, failures
//! cancel dependents and name the vertex, the cache makes a second solve (or a concurrent
//! one) execute nothing, Ctrl-C reaches running ops, IgnoreCache and content-based keys
//! behave as BuildKit's, and outputs are picked by index.

// Fixture helpers outside #[test] functions panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, Output};
use kiln_proto::{Digest, Entitlements, Graph, LoadOptions, Vertex, load, pb};
use kiln_solver::cachemap::{self, CacheDigest, CacheMap, ContentSelector, SourceContext};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError, Worker};
use kiln_solver::progress::{LogStream, ProgressEvent, ProgressSender};
use kiln_solver::scheduler::{JobOptions, SolveError, Solver, SolverOptions};
use kiln_solver::store::Store;
use tokio::sync::{Barrier, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, PartialEq, Eq)]
struct FakeRef {
    id: String,
    data: String,
}

/// What survives a "restart": the results (as a snapshotter would keep them on disk) and
/// what ran.
#[derive(Default)]
struct World {
    refs: Mutex<HashMap<String, String>>,
    retained: Mutex<HashSet<String>>,
    execs: Mutex<Vec<String>>,
    /// Every result id a solve loaded from the cache, in order.
    loads: Mutex<Vec<String>>,
    next_id: AtomicUsize,
    barrier: Option<Barrier>,
    started: Notify,
    saw_cancel: AtomicBool,
}

impl World {
    fn with_barrier(n: usize) -> Arc<Self> {
        Arc::new(World {
            barrier: Some(Barrier::new(n)),
            ..Default::default()
        })
    }

    fn execs(&self) -> Vec<String> {
        self.execs.lock().unwrap().clone()
    }

    fn exec_count(&self, name: &str) -> usize {
        self.execs().iter().filter(|n| *n == name).count()
    }
}

struct FakeWorker {
    world: Arc<World>,
}

struct FakeOp {
    vertex: Vertex,
    world: Arc<World>,
}

#[async_trait]
impl Op<FakeRef> for FakeOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let map = match &self.vertex.op.op {
            // Sources: keyed by identifier (as if resolved).
            // A local source is bound to its session: a new random key every solve.
            Some(pb::op::Op::Source(s)) if s.identifier.starts_with("local://") => CacheMap {
                digest: CacheDigest::new(format!(
                    "random:{}",
                    self.world.next_id.fetch_add(1, Ordering::SeqCst)
                )),
                deps: Vec::new(),
                hashed: None,
            },
            Some(pb::op::Op::Source(s)) => CacheMap {
                digest: CacheDigest::sha256_of(s.identifier.as_bytes()),
                deps: Vec::new(),
                hashed: None,
            },
            _ => cachemap::offline_cache_map(&self.vertex, &SourceContext::default())
                .map_err(|e| OpError::Failed(e.to_string()))?
                .ok_or_else(|| OpError::Failed("no cache map".into()))?,
        };
        Ok(CacheMapResponse { map, done: true })
    }

    async fn exec(&self, ctx: &JobContext, inputs: Vec<FakeRef>) -> Result<Vec<FakeRef>, OpError> {
        let world = &self.world;
        world.execs.lock().unwrap().push(self.vertex.name.clone());
        let make = |data: String| {
            let id = format!("r{}", world.next_id.fetch_add(1, Ordering::SeqCst));
            world.refs.lock().unwrap().insert(id.clone(), data.clone());
            FakeRef { id, data }
        };
        match &self.vertex.op.op {
            Some(pb::op::Op::Source(s)) => {
                let data = s
                    .attrs
                    .get("content")
                    .cloned()
                    .unwrap_or_else(|| s.identifier.clone());
                Ok(vec![make(data)])
            }
            Some(pb::op::Op::Exec(e)) => {
                let args = e.meta.as_ref().map(|m| m.args.clone()).unwrap_or_default();
                match args.first().map(String::as_str) {
                    Some("fail") => {
                        return Err(OpError::Failed("process exited with code 1".into()));
                    }
                    Some("barrier") => {
                        world.barrier.as_ref().expect("barrier").wait().await;
                    }
                    Some("log") => {
                        ctx.log(LogStream::Stdout, b"hello\n").await;
                    }
                    Some("wait-cancel") => {
                        world.started.notify_one();
                        ctx.cancel.cancelled().await;
                        world.saw_cancel.store(true, Ordering::SeqCst);
                        return Err(OpError::Cancelled);
                    }
                    _ => {}
                }
                let input_data: Vec<&str> = inputs.iter().map(|r| r.data.as_str()).collect();
                let outputs = e.mounts.iter().filter(|m| m.output != -1).count();
                Ok((0..outputs)
                    .map(|k| make(format!("{}|{k}|{}", args.join(" "), input_data.join(","))))
                    .collect())
            }
            other => Err(OpError::Failed(format!("fake worker cannot run {other:?}"))),
        }
    }
}

#[async_trait]
impl Worker for FakeWorker {
    type Ref = FakeRef;

    fn resolve_op(&self, vertex: &Vertex) -> Result<Arc<dyn Op<FakeRef>>, OpError> {
        Ok(Arc::new(FakeOp {
            vertex: vertex.clone(),
            world: self.world.clone(),
        }))
    }

    async fn load_result(&self, result_id: &str) -> Result<Option<FakeRef>, OpError> {
        self.world.loads.lock().unwrap().push(result_id.to_owned());
        Ok(self
            .world
            .refs
            .lock()
            .unwrap()
            .get(result_id)
            .map(|data| FakeRef {
                id: result_id.to_owned(),
                data: data.clone(),
            }))
    }

    fn result_id(&self, r: &FakeRef) -> String {
        r.id.clone()
    }

    async fn on_cached(&self, r: &FakeRef) -> Result<(), OpError> {
        self.world.retained.lock().unwrap().insert(r.id.clone());
        Ok(())
    }

    async fn content_digest(
        &self,
        input: Option<&FakeRef>,
        _selectors: &[ContentSelector],
    ) -> Result<Digest, OpError> {
        Ok(Digest::of(input.map_or("", |r| r.data.as_str()).as_bytes()))
    }
}

fn solver(world: &Arc<World>, root: &std::path::Path, parallelism: usize) -> Solver<FakeWorker> {
    let store = Arc::new(Store::open(root).unwrap());
    let mut options = SolverOptions::for_root(root);
    options.parallelism = parallelism;
    Solver::new(
        Arc::new(FakeWorker {
            world: world.clone(),
        }),
        store,
        options,
    )
}

fn graph(def: &pb::Definition) -> Arc<Graph> {
    let options = LoadOptions {
        entitlements: Entitlements::all(),
        ..Default::default()
    };
    Arc::new(load(def, &options).unwrap())
}

fn run(b: &mut DefinitionBuilder, base: Option<Output>, args: &[&str]) -> Output {
    b.exec(&Exec::new(base, args)).root().unwrap()
}

/// S -> A -> {B, C} -> D (D reads C read-only at /c).
fn diamond(b_args: &[&str], c_args: &[&str], d_args: &[&str]) -> pb::Definition {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let a = run(&mut b, Some(s), &["a"]);
    let left = run(&mut b, Some(a.clone()), b_args);
    let right = run(&mut b, Some(a), c_args);
    let d = b
        .exec(&Exec::new(Some(left), d_args).mount(ExecMount::bind("/c", Some(right)).readonly()))
        .root()
        .unwrap();
    b.finish(&d)
}

/// Guards a test against a hang (a deadlock would otherwise block CI); not a speed check.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("solve did not finish (deadlock?)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_runs_its_shared_vertex_once() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let g = graph(&diamond(&["b"], &["c"], &["d"]));
    let result = bounded(solver(&world, root.path(), 4).solve(g, JobOptions::default()))
        .await
        .unwrap();
    let mut execs = world.execs();
    execs.sort();
    assert_eq!(
        execs,
        ["a", "b", "c", "d", "docker-image://example.com/base:1"]
    );
    let base = "docker-image://example.com/base:1";
    assert_eq!(result.data, format!("d|0|b|0|a|0|{base},c|0|a|0|{base}"));
    assert!(
        world.retained.lock().unwrap().contains(&result.id),
        "saved results are retained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_branches_overlap() {
    let root = tempfile::tempdir().unwrap();
    // Each branch waits until the other has started too: sequential execution would hang.
    let world = World::with_barrier(2);
    let g = graph(&diamond(
        &["barrier", "left"],
        &["barrier", "right"],
        &["d"],
    ));
    bounded(solver(&world, root.path(), 2).solve(g, JobOptions::default()))
        .await
        .unwrap();
    assert_eq!(world.exec_count("barrier left"), 1);
    assert_eq!(world.exec_count("barrier right"), 1);
}

/// Branches on a step on a local context, gathered by a chain of steps that each mount one
/// (a Dockerfile's `COPY --from=` of parallel stages): they run at once, cold, although
/// the chain's keys need each branch resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_after_a_session_source_overlap() {
    let root = tempfile::tempdir().unwrap();
    // Each branch waits until all three have started: one at a time would hang.
    let world = World::with_barrier(3);
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = content_step(&mut b, "local://ctx", "ctx", "base");
    let mut gathered = b.image("example.com/base:1");
    for i in 0..3 {
        let name = i.to_string();
        let branch = run(&mut b, Some(base.clone()), &["barrier", &name]);
        gathered = b
            .exec(
                &Exec::new(Some(gathered), &["gather", &name])
                    .mount(ExecMount::bind("/in", Some(branch)).readonly()),
            )
            .root()
            .unwrap();
    }
    let solver = solver(&world, root.path(), 4);
    let solve = solver.solve(graph(&b.finish(&gathered)), JobOptions::default());
    tokio::time::timeout(Duration::from_secs(30), solve)
        .await
        .expect("the branches ran one at a time")
        .unwrap();
    for i in 0..3 {
        assert_eq!(world.exec_count(&format!("barrier {i}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_stops_dependents_cancels_siblings_and_names_the_vertex() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let def = diamond(&["fail"], &["wait-cancel"], &["d"]);
    let g = graph(&def);
    let failing = g
        .vertices()
        .iter()
        .find(|v| v.name == "fail")
        .unwrap()
        .digest
        .clone();
    let (progress, mut events) = ProgressSender::channel(1024);
    let job = JobOptions {
        progress,
        ..Default::default()
    };
    let err = bounded(solver(&world, root.path(), 4).solve(g, job))
        .await
        .unwrap_err();
    match &err {
        SolveError::Vertex {
            vertex,
            name,
            message,
        } => {
            assert_eq!(vertex, &failing);
            assert_eq!(name, "fail");
            assert_eq!(message, "process exited with code 1");
        }
        other => panic!("expected the failing vertex, got {other:?}"),
    }
    assert!(err.to_string().contains(failing.as_str()));
    assert_eq!(world.exec_count("d"), 0, "the dependent never runs");
    let mut errors = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let ProgressEvent::Error { vertex, .. } = event {
            errors.push(vertex);
        }
    }
    assert_eq!(
        errors,
        [failing],
        "only the failing vertex reports an error"
    );
    // The sibling either saw the cancellation or was never started.
    if world.exec_count("wait-cancel") == 1 {
        assert!(world.saw_cancel.load(Ordering::SeqCst));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_solve_over_the_same_store_executes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let def = diamond(&["b"], &["c"], &["d"]);
    let first = bounded(solver(&world, root.path(), 4).solve(graph(&def), JobOptions::default()))
        .await
        .unwrap();
    let ran = world.execs().len();
    // A new solver and store handle, as after a restart.
    let (progress, mut events) = ProgressSender::channel(1024);
    let job = JobOptions {
        progress,
        ..Default::default()
    };
    let second = bounded(solver(&world, root.path(), 4).solve(graph(&def), job))
        .await
        .unwrap();
    assert_eq!(world.execs().len(), ran, "nothing executed");
    assert_eq!(second, first);
    let mut cached = 0;
    while let Ok(event) = events.try_recv() {
        match event {
            ProgressEvent::Cached { .. } => cached += 1,
            ProgressEvent::Started { name, .. } => panic!("{name} started"),
            _ => {}
        }
    }
    assert!(cached >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_solves_on_one_store_run_each_vertex_once() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let def = diamond(&["b"], &["c"], &["d"]);
    let one = solver(&world, root.path(), 4);
    let two = solver(&world, root.path(), 4);
    let (a, b) = bounded(async {
        tokio::join!(
            one.solve(graph(&def), JobOptions::default()),
            two.solve(graph(&def), JobOptions::default())
        )
    })
    .await;
    assert_eq!(a.unwrap(), b.unwrap());
    let execs = world.execs();
    let unique: HashSet<&String> = execs.iter().collect();
    assert_eq!(execs.len(), unique.len(), "each vertex ran once: {execs:?}");
    assert_eq!(execs.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_job_reaches_the_running_op() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let w = run(&mut b, Some(s), &["wait-cancel"]);
    let g = graph(&b.finish(&w));
    let cancel = CancellationToken::new();
    let job = JobOptions {
        cancel: cancel.clone(),
        ..Default::default()
    };
    let solver = Arc::new(solver(&world, root.path(), 4));
    let task = tokio::spawn({
        let solver = solver.clone();
        async move { solver.solve(g, job).await }
    });
    world.started.notified().await;
    cancel.cancel();
    let err = bounded(task).await.unwrap().unwrap_err();
    assert!(matches!(err, SolveError::Cancelled), "{err:?}");
    assert!(world.saw_cancel.load(Ordering::SeqCst));
}

fn chain(ignore_a: bool) -> pb::Definition {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let mut a = Exec::new(Some(s), &["a"]);
    a.ignore_cache = ignore_a;
    let a = b.exec(&a).root().unwrap();
    let last = run(&mut b, Some(a), &["b"]);
    b.finish(&last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_cache_reruns_the_vertex_and_its_dependents_and_later_solves_use_the_newest() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let first =
        bounded(solver(&world, root.path(), 4).solve(graph(&chain(false)), JobOptions::default()))
            .await
            .unwrap();
    assert_eq!(world.execs().len(), 3);
    let second =
        bounded(solver(&world, root.path(), 4).solve(graph(&chain(true)), JobOptions::default()))
            .await
            .unwrap();
    assert_eq!(
        world.exec_count("a"),
        2,
        "the ignore-cache vertex ran again"
    );
    assert_eq!(world.exec_count("b"), 2, "its dependent ran again");
    assert_eq!(
        world.exec_count("docker-image://example.com/base:1"),
        1,
        "its input did not"
    );
    assert_ne!(second.id, first.id);
    let third =
        bounded(solver(&world, root.path(), 4).solve(graph(&chain(false)), JobOptions::default()))
            .await
            .unwrap();
    assert_eq!(world.execs().len(), 5, "nothing ran");
    assert_eq!(third, second, "the newest result is used");
}

/// A step `name` with `source` (holding `content`) read-only at `/` and its `/out` as the
/// output: its key goes through the source's content.
fn content_step(b: &mut DefinitionBuilder, source: &str, content: &str, name: &str) -> Output {
    let attrs = [("content".to_owned(), content.to_owned())]
        .into_iter()
        .collect();
    let s = b.source(source, attrs);
    let mut e = Exec::new(None, &[name]).mount(ExecMount::bind("/out", None));
    e.mounts[0] = ExecMount::bind("/", Some(s)).readonly();
    b.exec(&e).output("/out").unwrap()
}

fn content_def(source: &str) -> pb::Definition {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let out = content_step(&mut b, source, "same bytes", "build");
    b.finish(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_content_from_another_source_hits_through_the_content_key() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let first = bounded(solver(&world, root.path(), 4).solve(
        graph(&content_def("docker-image://one.example/x:1")),
        JobOptions::default(),
    ))
    .await
    .unwrap();
    let second = bounded(solver(&world, root.path(), 4).solve(
        graph(&content_def("docker-image://two.example/x:1")),
        JobOptions::default(),
    ))
    .await
    .unwrap();
    assert_eq!(
        world.exec_count("docker-image://two.example/x:1"),
        1,
        "the new source ran"
    );
    assert_eq!(
        world.exec_count("build"),
        1,
        "the step was loaded by content"
    );
    assert_eq!(second, first);
    // The link learnt from the new source's key makes the next solve a fast hit.
    let third = bounded(solver(&world, root.path(), 4).solve(
        graph(&content_def("docker-image://two.example/x:1")),
        JobOptions::default(),
    ))
    .await
    .unwrap();
    assert_eq!(third, first);
    assert_eq!(world.execs().len(), 3);
}

/// `local://ctx` → a step on it as a writable root (definition-based key) → a step on that.
fn session_chain() -> pb::Definition {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let attrs = [("content".to_owned(), "ctx".to_owned())]
        .into_iter()
        .collect();
    let local = b.source("local://ctx", attrs);
    let first = run(&mut b, Some(local), &["first"]);
    let second = run(&mut b, Some(first), &["second"]);
    b.finish(&second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bound_steps_are_neither_saved_nor_retained() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    for _ in 0..3 {
        bounded(
            solver(&world, root.path(), 4).solve(graph(&session_chain()), JobOptions::default()),
        )
        .await
        .unwrap();
    }
    // As in BuildKit, steps keyed only through a session's source run every time...
    assert_eq!(world.exec_count("first"), 3);
    assert_eq!(world.exec_count("second"), 3);
    // ...but nothing is kept for them: no retained result, no record, no link.
    assert!(world.retained.lock().unwrap().is_empty(), "retained");
    let stats = Store::open(root.path()).unwrap().check().unwrap();
    assert_eq!((stats.keys, stats.links, stats.results), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_key_after_a_session_source_hits_without_growing_the_store() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let solve = || async {
        bounded(
            solver(&world, root.path(), 4)
                .solve(graph(&content_def("local://ctx")), JobOptions::default()),
        )
        .await
        .unwrap()
    };
    let first = solve().await;
    let after_first = Store::open(root.path()).unwrap().check().unwrap();
    for _ in 0..3 {
        assert_eq!(solve().await, first);
    }
    assert_eq!(world.exec_count("build"), 1, "hits through the content key");
    let after = Store::open(root.path()).unwrap().check().unwrap();
    assert_eq!(
        (after.keys, after.links, after.results),
        (after_first.keys, after_first.links, after_first.results),
        "no dead links from session keys"
    );
    assert_eq!(after.results, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_chain_after_a_session_source_loads_only_what_it_needs() {
    // local://ctx → a step keyed by the context's content → three steps on its output.
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let mut last = content_step(&mut b, "local://ctx", "ctx", "build");
    for step in ["x1", "x2", "x3"] {
        last = run(&mut b, Some(last), &[step]);
    }
    let def = b.finish(&last);

    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let first = bounded(solver(&world, root.path(), 4).solve(graph(&def), JobOptions::default()))
        .await
        .unwrap();
    world.loads.lock().unwrap().clear();
    let second = bounded(solver(&world, root.path(), 4).solve(graph(&def), JobOptions::default()))
        .await
        .unwrap();
    assert_eq!(second, first);
    assert_eq!(
        world.execs().len(),
        5 + 1,
        "only the session's source ran again"
    );
    // The step on the context is resolved (its key needs the context's content); the
    // steps after it are found through their keys, so only the final result is loaded.
    let loads = world.loads.lock().unwrap().clone();
    assert_eq!(loads.len(), 2, "loaded {loads:?}");
    assert_eq!(loads.last(), Some(&first.id));

    // A solve for a `mode=max` cache export loads (and reports) every step's result.
    world.loads.lock().unwrap().clear();
    let job = JobOptions {
        load_every_result: true,
        ..JobOptions::default()
    };
    let (third, export) =
        bounded(solver(&world, root.path(), 4).solve_for_export(graph(&def), job))
            .await
            .unwrap();
    assert_eq!(third, first);
    assert_eq!(world.execs().len(), 5 + 2, "nothing but the source ran");
    assert_eq!(world.loads.lock().unwrap().len(), 4);
    assert_eq!(
        export.results.len(),
        4,
        "every step's result is in the export"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_picked_by_index_and_a_missing_one_is_buildkits_error() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let outs = b.exec(&Exec::new(Some(s), &["two"]).mount(ExecMount::bind("/out", None)));
    let out = outs.output("/out").unwrap();
    assert_eq!(out.index, 1);
    let result = bounded(
        solver(&world, root.path(), 4).solve(graph(&b.finish(&out)), JobOptions::default()),
    )
    .await
    .unwrap();
    assert!(result.data.starts_with("two|1|"), "{}", result.data);

    // Only the requested output was cached: output 0 of the same step runs it again.
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let outs = b.exec(&Exec::new(Some(s), &["two"]).mount(ExecMount::bind("/out", None)));
    let root_out = outs.root().unwrap();
    let result = bounded(
        solver(&world, root.path(), 4).solve(graph(&b.finish(&root_out)), JobOptions::default()),
    )
    .await
    .unwrap();
    assert!(result.data.starts_with("two|0|"), "{}", result.data);
    assert_eq!(world.exec_count("two"), 2);

    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let outs = b.exec(&Exec::new(Some(s), &["two"]).mount(ExecMount::bind("/out", None)));
    let missing = Output {
        digest: outs.digest.clone(),
        index: 5,
    };
    let err = bounded(
        solver(&world, root.path(), 4).solve(graph(&b.finish(&missing)), JobOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("invalid response from exec need 5 index but 2 results received"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_is_gone_is_dropped_from_the_cache_and_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let def = chain(false);
    let first = bounded(solver(&world, root.path(), 4).solve(graph(&def), JobOptions::default()))
        .await
        .unwrap();
    // The snapshot behind the final result was pruned.
    world.refs.lock().unwrap().remove(&first.id);
    let second = bounded(solver(&world, root.path(), 4).solve(graph(&def), JobOptions::default()))
        .await
        .unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(second.data, first.data);
    assert_eq!(world.exec_count("b"), 2);
    assert_eq!(
        world.exec_count("a"),
        1,
        "its input still loads from the cache"
    );
    let store = Store::open(root.path()).unwrap();
    store.check().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_start_log_and_done_in_order() {
    let root = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let s = b.image("example.com/base:1");
    let l = run(&mut b, Some(s), &["log"]);
    let g = graph(&b.finish(&l));
    let step = g
        .vertices()
        .iter()
        .find(|v| v.name == "log")
        .unwrap()
        .digest
        .clone();
    let (progress, mut events) = ProgressSender::channel(1024);
    let job = JobOptions {
        progress,
        ..Default::default()
    };
    bounded(solver(&world, root.path(), 4).solve(g, job))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.vertex() == &step {
            seen.push(event);
        }
    }
    let kinds: Vec<&str> = seen
        .iter()
        .map(|e| match e {
            ProgressEvent::Started { .. } => "started",
            ProgressEvent::Log { .. } => "log",
            ProgressEvent::Done { .. } => "done",
            ProgressEvent::Cached { .. } => "cached",
            ProgressEvent::Error { .. } => "error",
            ProgressEvent::Usage { .. } => "usage",
        })
        .collect();
    assert_eq!(kinds, ["started", "log", "done"]);
    match (&seen[0], &seen[1], &seen[2]) {
        (
            ProgressEvent::Started { at: started, .. },
            ProgressEvent::Log { data, stream, .. },
            ProgressEvent::Done { at: done, .. },
        ) => {
            assert_eq!(data, b"hello\n");
            assert_eq!(*stream, LogStream::Stdout);
            assert!(done >= started, "timestamps are ordered");
        }
        other => panic!("{other:?}"),
    }
}
