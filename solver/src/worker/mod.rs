//! kiln's worker: the [`Worker`] the scheduler drives. Results are committed snapshots
//! ([`ImmutableRef`]s of the snapshotter); exec ops run as steps through the executor. The
//! worker also holds what a build brings besides its graph (secrets, SSH agents, local
//! directories, OCI layouts) and resolves each vertex to its op.
//!
//! It must run where kiln may mount: as real root in kiln's private mount namespace, or
//! as uid 0 of kiln's user namespace (docs/DESIGN.md).

pub mod cache_mounts;
mod exec;
mod file;
mod image;
mod local;
pub mod mounts;
pub mod prepare;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use kiln_executor::supervisor::{Executor, RunnerCommand};
use kiln_proto::{Digest, OpKind, Vertex, pb};
use kiln_snapshotter::{ImmutableRef, Snapshotter};

use crate::cachemap::ContentSelector;
use crate::contenthash;
use crate::image::{Credentials, ImageResolver, RegistryHosts};
use crate::op::{Op, OpError, Worker};
use cache_mounts::CacheMounts;
use mounts::{MountsDir, StepMounts};

/// Errors from setting a worker up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("opening the snapshot store: {0}")]
    Snapshots(#[from] kiln_snapshotter::Error),
    #[error(transparent)]
    Mounts(#[from] mounts::MountsError),
    #[error("preparing the step runner: {0}")]
    Executor(#[from] kiln_executor::supervisor::ExecError),
    #[error(transparent)]
    Images(#[from] crate::image::ImageError),
}

/// What a build brings besides its graph (buildctl's session).
#[derive(Clone, Debug, Default)]
pub struct BuildSession {
    /// Secret id → content (`--secret id=…,src=…`).
    pub secrets: HashMap<String, Vec<u8>>,
    /// SSH agent id → socket (`--ssh default[=PATH]`).
    pub ssh: HashMap<String, PathBuf>,
    /// Local directory name → directory (`--local name=DIR`).
    pub locals: HashMap<String, PathBuf>,
    /// OCI layout store name → directory (`--oci-layout name=DIR`).
    pub oci_layouts: HashMap<String, PathBuf>,
    /// This build's session id (`local://` CacheMaps are only comparable within it).
    pub id: String,
}

/// How to build a [`KilnWorker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// kiln's state directory.
    pub root: PathBuf,
    /// How to start a step runner (`kiln __runner`).
    pub runner: RunnerCommand,
    /// kiln runs as uid 0 of its own user namespace (rootless).
    pub in_user_namespace: bool,
    pub session: BuildSession,
    /// How to reach registries (`kiln.toml`).
    pub registry_hosts: RegistryHosts,
    /// Registry credentials (Docker's `config.json`).
    pub credentials: Credentials,
}

/// State shared by the worker and its ops.
#[derive(Debug)]
pub(crate) struct Inner {
    pub snapshotter: Snapshotter,
    pub executor: Executor,
    pub mounts_dir: MountsDir,
    pub cache_mounts: CacheMounts,
    pub images: ImageResolver,
    pub config: WorkerConfig,
    counter: AtomicU64,
}

impl Inner {
    /// A unique, alphanumeric name for a step's directories.
    pub fn next_id(&self) -> String {
        format!(
            "s{}x{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.config.root.join("locks")
    }
}

/// The worker.
#[derive(Clone, Debug)]
pub struct KilnWorker {
    inner: Arc<Inner>,
}

impl KilnWorker {
    /// Opens the snapshot store and prepares step directories under `config.root`.
    pub fn open(config: WorkerConfig) -> Result<Self, WorkerError> {
        let snapshotter = Snapshotter::open(&config.root)?;
        let executor = Executor::new(config.runner.clone(), &config.root.join("run"))?;
        let mounts_dir = MountsDir::open(&config.root)?;
        let images = ImageResolver::new(
            &config.root,
            config.registry_hosts.clone(),
            config.credentials.clone(),
            config.session.oci_layouts.clone(),
        )?;
        Ok(KilnWorker {
            inner: Arc::new(Inner {
                snapshotter,
                executor,
                mounts_dir,
                cache_mounts: CacheMounts::default(),
                images,
                config,
                counter: AtomicU64::new(0),
            }),
        })
    }

    pub fn snapshotter(&self) -> &Snapshotter {
        &self.inner.snapshotter
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

fn failed(e: impl std::fmt::Display) -> OpError {
    OpError::Failed(e.to_string())
}

/// Runs blocking work (snapshots, mounts, file copies) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Failed(format!("internal error: {e}")))?
}

#[async_trait]
impl Worker for KilnWorker {
    type Ref = ImmutableRef;

    fn resolve_op(&self, vertex: &Vertex) -> Result<Arc<dyn Op<ImmutableRef>>, OpError> {
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
            Some(pb::op::Op::Source(source)) if source.identifier.starts_with("local://") => {
                Ok(Arc::new(local::LocalSource::new(
                    self.inner.clone(),
                    vertex.clone(),
                    source.clone(),
                )))
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

    async fn load_result(&self, result_id: &str) -> Result<Option<ImmutableRef>, OpError> {
        let inner = self.inner.clone();
        let id = result_id.to_owned();
        blocking(move || match inner.snapshotter.get(&id) {
            Ok(r) => Ok(Some(r)),
            Err(kiln_snapshotter::Error::NotFound(_)) => Ok(None),
            Err(e) => Err(failed(e)),
        })
        .await
    }

    fn result_id(&self, r: &ImmutableRef) -> String {
        r.id().to_owned()
    }

    async fn on_cached(&self, r: &ImmutableRef) -> Result<(), OpError> {
        let r = r.clone();
        blocking(move || r.set_retain(true).map_err(failed)).await
    }

    async fn content_digest(
        &self,
        input: Option<&ImmutableRef>,
        selectors: &[ContentSelector],
    ) -> Result<Digest, OpError> {
        let Some(input) = input.cloned() else {
            return contenthash::dep_digest(None, selectors).map_err(failed);
        };
        let worker = self.clone();
        let selectors = selectors.to_vec();
        blocking(move || {
            worker
                .with_mounted(&input, |path| {
                    let root = contenthash::open_root(path).map_err(failed)?;
                    contenthash::dep_digest(Some(root.as_fd()), &selectors).map_err(failed)
                })
                .map_err(failed)?
        })
        .await
    }
}
