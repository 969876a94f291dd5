//! The contract between the scheduler and whatever runs ops: the [`Op`] trait (CacheMap and
//! execution of one vertex), the [`Worker`] trait (resolving ops, loading and retaining
//! results, content hashing), and the per-job [`JobContext`] ops receive.
//!
//! The scheduler is generic over `Worker::Ref`, so it knows nothing of snapshots or
//! containers; the snapshotter/executor integration implements these traits.

use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{Digest, Vertex};
use tokio_util::sync::CancellationToken;

use crate::cachemap::{CacheMap, ContentSelector};
use crate::progress::{LogStream, ProgressEvent, ProgressSender, ResourceUsage};

/// Errors from ops and workers.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The op failed; the message is shown to the user as is.
    #[error("{0}")]
    Failed(String),
    /// The op stopped because the job was cancelled.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

/// Data a job carries for ops beyond the graph: extended as sessions gain features
/// (secrets, local directories).
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// The job's first session id (`local://` sources without `local.session`).
    pub id: Option<String>,
}

/// What an op gets for one job: who it is, where to log, when to stop.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub vertex: Digest,
    pub name: String,
    pub progress: ProgressSender,
    /// Cancelled on Ctrl-C or when another vertex of the job failed. An op must return
    /// soon after (with [`OpError::Cancelled`]): the scheduler waits for it, so that it
    /// can clean up (kill its process, unmount).
    pub cancel: CancellationToken,
    pub session: Arc<Session>,
}

impl JobContext {
    /// Sends a chunk of this op's output to the progress channel.
    pub async fn log(&self, stream: LogStream, data: &[u8]) {
        self.progress.log(&self.vertex, stream, data).await;
    }

    /// Reports what this op's process used.
    pub async fn report_usage(&self, usage: ResourceUsage) {
        self.progress
            .send(ProgressEvent::Usage {
                vertex: self.vertex.clone(),
                usage,
                at: std::time::SystemTime::now(),
            })
            .await;
    }
}

/// A CacheMap and whether it is the op's last one.
#[derive(Clone, Debug)]
pub struct CacheMapResponse {
    pub map: CacheMap,
    /// `false` asks the scheduler to request index + 1 too (ops without inputs only, e.g.
    /// an image: manifest digest first, then its layers' chain ID).
    pub done: bool,
}

/// One vertex's op, resolved by the worker.
#[async_trait]
pub trait Op<R>: Send + Sync {
    /// CacheMap number `index` (always 0 for ops with inputs).
    async fn cache_map(&self, ctx: &JobContext, index: usize) -> Result<CacheMapResponse, OpError>;

    /// Runs the op on its input results (one per `Op.inputs`, in order) and returns one
    /// result per output, in output order.
    async fn exec(&self, ctx: &JobContext, inputs: Vec<R>) -> Result<Vec<R>, OpError>;
}

/// Resolves ops and manages their results.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// A result: a handle on an immutable snapshot, released when dropped.
    type Ref: Clone + Send + Sync + 'static;

    /// The op implementation for `vertex`.
    fn resolve_op(&self, vertex: &Vertex) -> Result<Arc<dyn Op<Self::Ref>>, OpError>;

    /// Loads a result saved in the cache; `Ok(None)` means it is gone (pruned), and the
    /// scheduler drops that cache record.
    async fn load_result(&self, result_id: &str) -> Result<Option<Self::Ref>, OpError>;

    /// The stable id under which `r` is saved in the cache.
    fn result_id(&self, r: &Self::Ref) -> String;

    /// Called before `r` is recorded in the cache: make it survive this process
    /// (the snapshotter marks it retained).
    async fn on_cached(&self, r: &Self::Ref) -> Result<(), OpError>;

    /// Makes sure `r` is usable (lazy layers pulled) before hashing or execution
    /// (BuildKit's PreprocessFunc).
    async fn preprocess(&self, _r: &Self::Ref) -> Result<(), OpError> {
        Ok(())
    }

    /// The content digest of `input` for `selectors`, as
    /// BuildKit's content hash computes it over the mounted ref (`None`, or a
    /// ref with no content, is scratch).
    async fn content_digest(
        &self,
        input: Option<&Self::Ref>,
        selectors: &[ContentSelector],
    ) -> Result<Digest, OpError>;
}
