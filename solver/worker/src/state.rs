//! The state a worker shares with its ops (snapshot store, step runner, mount points,
//! cache directories, image resolver, sandbox networks, configuration), and the helpers every op uses to
//! run blocking work and report failures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_executor::network::Pool;
use kiln_executor::supervisor::Executor;
use kiln_registry::ImageResolver;
use kiln_snapshotter::{ImmutableRef, RefOptions, Snapshotter};
use kiln_solver::op::OpError;

use crate::cache_mounts::CacheMounts;
use crate::config::WorkerConfig;
use crate::http::downloads::Downloads;
use crate::mounts::MountsDir;
use crate::users::UserDbs;

/// Errors from setting a worker up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("opening the snapshot store: {0}")]
    Snapshots(#[from] kiln_snapshotter::Error),
    #[error("preparing the step runner: {0}")]
    Executor(#[from] kiln_executor::supervisor::ExecError),
    #[error(transparent)]
    Images(#[from] kiln_registry::ImageError),
}

/// State shared by the worker and its ops.
#[derive(Debug)]
pub(crate) struct Inner {
    pub snapshotter: Snapshotter,
    pub executor: Executor,
    pub mounts_dir: MountsDir,
    pub cache_mounts: CacheMounts,
    pub images: ImageResolver,
    /// Ready sandbox networks for ExecOps with the default network.
    pub network: Pool,
    /// `http(s)://` sources: the client and the ETag records.
    pub downloads: Downloads,
    pub config: WorkerConfig,
    /// The user databases of the layer chains steps ran on.
    pub user_dbs: UserDbs,
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

    /// Opens the snapshot store and prepares step directories under `config.root`.
    pub fn open(config: WorkerConfig) -> Result<Self, WorkerError> {
        let snapshotter = Snapshotter::open(&config.root)?;
        let executor = Executor::new(config.runner.clone(), &config.root.join("run"))?;
        let mounts_dir = MountsDir::new(&config.root);
        let images = ImageResolver::new(
            &config.root,
            config.registry_hosts.clone(),
            config.credentials.clone(),
            config.session.oci_layouts.clone(),
        )?;
        let downloads = Downloads::new(&config.root, config.root.join("locks"));
        Ok(Inner {
            snapshotter,
            executor,
            mounts_dir,
            cache_mounts: CacheMounts::default(),
            images,
            network: Pool::new(&config.network),
            downloads,
            config,
            user_dbs: UserDbs::default(),
            counter: AtomicU64::new(0),
        })
    }

    /// A committed empty tree: the result of an op that yields nothing (scratch).
    pub fn empty_snapshot(&self, description: String) -> Result<ImmutableRef, OpError> {
        self.snapshotter
            .new_mutable(
                None,
                &RefOptions {
                    description,
                    ..RefOptions::default()
                },
            )
            .and_then(|m| m.commit())
            .map_err(failed)
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.config.root.join("locks")
    }
}

pub(crate) fn failed(e: impl std::fmt::Display) -> OpError {
    OpError::Failed(e.to_string())
}

/// Runs work that may block for long (a wait for a lock, large copies, imports) on the
/// blocking pool, off the runtime's one thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Failed(format!("internal error: {e}")))?
}
