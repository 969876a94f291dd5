//! kiln's worker: the [`Worker`] the scheduler drives. Results are committed snapshots
//! ([`ImmutableRef`]s of the snapshotter); exec ops run as steps through the executor. The
//! worker also holds what a build brings besides its graph (secrets, SSH agents, local
//! directories, OCI layouts) and resolves each vertex to its op.
//!
//! It must run where kiln may mount: as real root in kiln's private mount namespace, or
//! as uid 0 of kiln's user namespace (docs/DESIGN.md).

pub mod cache_mounts;
mod config;
pub mod contenthash;
mod exec;
mod file;
mod http;
pub mod image;
mod local;
mod merge_diff;
pub mod mounts;
pub mod prepare;
mod refs;
mod remote;
mod state;
mod users;

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{Digest, OpKind, Vertex, pb};
use kiln_snapshotter::{ImmutableRef, Snapshotter};
use kiln_solver::cachemap::ContentSelector;
use kiln_solver::op::{Op, OpError, Worker};

pub use config::{BuildSession, WorkerConfig};
use mounts::StepMounts;
pub use refs::KilnRef;
pub use remote::{CacheLayers, LazyLoader};
pub use state::WorkerError;
use state::{Inner, blocking, failed};

/// The worker.
#[derive(Clone, Debug)]
pub struct KilnWorker {
    inner: Arc<Inner>,
}

impl KilnWorker {
    /// Opens the snapshot store and prepares step directories under `config.root`.
    pub fn open(config: WorkerConfig) -> Result<Self, WorkerError> {
        Ok(KilnWorker {
            inner: Arc::new(Inner::open(config)?),
        })
    }

    pub fn snapshotter(&self) -> &Snapshotter {
        &self.inner.snapshotter
    }

    /// How this worker resolves images (its content store, `kiln.toml` hosts and
    /// credentials): frontends look up base images through it.
    pub fn images(&self) -> &kiln_registry::ImageResolver {
        &self.inner.images
    }

    /// A committed empty tree (the result of a build whose target is `scratch`).
    pub fn empty_result(&self, description: &str) -> Result<ImmutableRef, OpError> {
        self.inner.empty_snapshot(description.to_owned())
    }

    /// Describes this worker's results as layer blobs, for cache and image exports.
    pub fn cache_layers(&self) -> CacheLayers {
        CacheLayers::new(self.inner.clone())
    }

    /// The snapshot of `r`, pulling a lazy ref's layers first.
    pub async fn materialize(&self, r: &KilnRef) -> Result<ImmutableRef, OpError> {
        remote::materialize(&self.inner, r).await
    }

    /// Gives the cache mounts `ids` (those of steps that ignore the cache,
    /// [`cache_mounts::ignored_ids`]) fresh, empty directories (BuildKit's
    /// `PruneCacheMounts`, run before a build): see [`cache_mounts::CacheMounts::prune`].
    /// Blocking.
    pub fn prune_cache_mounts(&self, ids: &[String]) -> Result<(), cache_mounts::CacheMountError> {
        if ids.is_empty() {
            return Ok(());
        }
        let locks_dir = self.inner.locks_dir();
        let store = cache_mounts::Store {
            snapshotter: &self.inner.snapshotter,
            mounts_dir: &self.inner.mounts_dir,
            locks_dir: &locks_dir,
        };
        self.inner.cache_mounts.prune(&store, ids)
    }

    /// Waits until the steps' mounts released in the background are gone (see
    /// [`mounts::StepMounts::release_later`]): before anything outside the worker mounts
    /// its results (an export's read-only view).
    pub fn settle_unmounts(&self) {
        self.inner.mounts_dir.settle();
    }

    /// Mounts `r` read-only for the duration of `f` (exports, inspection).
    pub fn with_mounted<T>(
        &self,
        r: &ImmutableRef,
        f: impl FnOnce(&Path) -> T,
    ) -> Result<T, mounts::MountsError> {
        let mut mounts = StepMounts::new(&self.inner.mounts_dir, &self.inner.next_id())?;
        let path = mounts.mount("root", &r.mountable(), true)?;
        Ok(f(&path))
    }
}

/// An op of the worker, seen by the scheduler with [`KilnRef`] results: inputs are
/// materialised (lazy layers pulled) before the op runs.
struct Materializing {
    inner: Arc<Inner>,
    op: Arc<dyn Op<ImmutableRef>>,
}

#[async_trait]
impl Op<KilnRef> for Materializing {
    async fn cache_map(
        &self,
        ctx: &kiln_solver::op::JobContext,
        index: usize,
    ) -> Result<kiln_solver::op::CacheMapResponse, OpError> {
        self.op.cache_map(ctx, index).await
    }

    async fn exec(
        &self,
        ctx: &kiln_solver::op::JobContext,
        inputs: Vec<KilnRef>,
    ) -> Result<Vec<KilnRef>, OpError> {
        let mut ready = Vec::with_capacity(inputs.len());
        for input in &inputs {
            ready.push(remote::materialize(&self.inner, input).await?);
        }
        let outputs = self.op.exec(ctx, ready).await?;
        Ok(outputs.into_iter().map(KilnRef::ready).collect())
    }
}

impl KilnWorker {
    fn resolve_snapshot_op(&self, vertex: &Vertex) -> Result<Arc<dyn Op<ImmutableRef>>, OpError> {
        match &vertex.op.op {
            Some(pb::op::Op::Exec(exec)) => Ok(Arc::new(exec::ExecOp::new(
                self.inner.clone(),
                vertex.clone(),
                exec.clone(),
            ))),
            Some(pb::op::Op::File(file)) => Ok(Arc::new(file::FileOp::new(
                self.inner.clone(),
                vertex.clone(),
                file.clone(),
            ))),
            Some(pb::op::Op::Merge(merge)) => Ok(Arc::new(merge_diff::MergeOp::new(
                self.inner.clone(),
                vertex.clone(),
                merge.clone(),
            ))),
            Some(pb::op::Op::Diff(diff)) => Ok(Arc::new(merge_diff::DiffOp::new(
                self.inner.clone(),
                vertex.clone(),
                *diff,
            ))),
            Some(pb::op::Op::Source(source)) if source.identifier.starts_with("local://") => {
                Ok(Arc::new(local::LocalSource::new(
                    self.inner.clone(),
                    vertex.clone(),
                    source.clone(),
                )))
            }
            Some(pb::op::Op::Source(source))
                if source.identifier.starts_with("http://")
                    || source.identifier.starts_with("https://") =>
            {
                Ok(Arc::new(http::HttpSourceOp::new(
                    self.inner.clone(),
                    vertex.clone(),
                    source.clone(),
                )?))
            }
            Some(pb::op::Op::Source(source))
                if source.identifier.starts_with("docker-image://")
                    || source.identifier.starts_with("oci-layout://") =>
            {
                Ok(Arc::new(image::ImageSourceOp::new(
                    self.inner.clone(),
                    vertex.clone(),
                    source,
                )?))
            }
            Some(pb::op::Op::Source(source)) => Err(OpError::Failed(format!(
                "source {} is not supported by kiln",
                source.identifier
            ))),
            _ => Err(OpError::Failed(format!(
                "no support for {} ops",
                match vertex.kind() {
                    OpKind::Unknown => "<nil>",
                    kind => kind.as_str(),
                }
            ))),
        }
    }
}

#[async_trait]
impl Worker for KilnWorker {
    type Ref = KilnRef;

    fn resolve_op(&self, vertex: &Vertex) -> Result<Arc<dyn Op<KilnRef>>, OpError> {
        Ok(Arc::new(Materializing {
            inner: self.inner.clone(),
            op: self.resolve_snapshot_op(vertex)?,
        }))
    }

    async fn load_result(&self, result_id: &str) -> Result<Option<KilnRef>, OpError> {
        // In place, as the other metadata calls below: a lock file and a SQLite row
        // (see the scheduler's `store`).
        match self.inner.snapshotter.get(result_id) {
            Ok(r) => Ok(Some(KilnRef::ready(r))),
            Err(kiln_snapshotter::Error::NotFound(_)) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    fn result_id(&self, r: &KilnRef) -> String {
        r.snapshot().map(|s| s.id().to_owned()).unwrap_or_default()
    }

    async fn on_cached(&self, r: &KilnRef) -> Result<(), OpError> {
        let r = self.materialize(r).await?;
        r.set_retain(true).map_err(failed)
    }

    /// Nothing: BuildKit unlazies an input here (its `unlazyResultFunc`) before the
    /// slow keys are computed, but a lazy input is pulled anyway when an op runs on it
    /// (`Materializing`) or its content is hashed (`content_digest`); pulling it here
    /// would download the layers of a step that then turns out to be cached (a COPY from
    /// the context on top of an imported result).
    async fn preprocess(&self, _r: &KilnRef) -> Result<(), OpError> {
        Ok(())
    }

    async fn content_digest(
        &self,
        input: Option<&KilnRef>,
        selectors: &[ContentSelector],
    ) -> Result<Digest, OpError> {
        let Some(input) = input else {
            return contenthash::dep_digest(None, selectors).map_err(failed);
        };
        let input = self.materialize(input).await?;
        let key = contenthash::annotation_key(selectors);
        if let Some(known) = input.annotation(&key).map_err(failed)? {
            if let Ok(digest) = known.parse::<Digest>() {
                return Ok(digest);
            }
        }
        let worker = self.clone();
        let selectors = selectors.to_vec();
        blocking(move || {
            let digest = worker
                .with_mounted(&input, |path| {
                    let root = contenthash::open_root(path).map_err(failed)?;
                    contenthash::dep_digest(Some(root.as_fd()), &selectors).map_err(failed)
                })
                .map_err(failed)??;
            input
                .set_annotation(&key, digest.as_str())
                .map_err(failed)?;
            Ok(digest)
        })
        .await
    }
}
