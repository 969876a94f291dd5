//! Progress events of a solve (vertex started / cached / done / error, log output, and
//! what an op's process used), sent on a bounded channel for the CLI to render.
//!
//! The channel is bounded on purpose: a step printing faster than the terminal renders is
//! slowed down instead of filling memory. A receiver that went away is not an error; the
//! events are dropped.

use std::time::{Duration, SystemTime};

use kiln_proto::Digest;
use tokio::sync::mpsc;

/// Which output stream a log chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// What an op's process used, as the executor measured it (sent before the op's
/// `Done` or `Error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// From start to exit of the process.
    pub wall: Duration,
    pub user_cpu: Duration,
    pub system_cpu: Duration,
    /// Peak memory in bytes.
    pub peak_memory: u64,
    /// `peak_memory` is of all the op's processes at once (its memory cgroup's peak);
    /// otherwise of its largest process.
    pub peak_memory_total: bool,
    /// Bytes read from and written to storage.
    pub read_bytes: u64,
    pub written_bytes: u64,
}

impl ResourceUsage {
    /// User plus system CPU time.
    pub fn cpu(&self) -> Duration {
        self.user_cpu + self.system_cpu
    }
}

/// One progress event. `vertex` is the op digest, `name` its display name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressEvent {
    /// The op started executing.
    Started {
        vertex: Digest,
        name: String,
        at: SystemTime,
    },
    /// The vertex's result was loaded from the cache.
    Cached {
        vertex: Digest,
        name: String,
        at: SystemTime,
    },
    /// The op finished executing.
    Done {
        vertex: Digest,
        name: String,
        at: SystemTime,
    },
    /// The vertex failed (CacheMap, content hash, execution or cache store).
    Error {
        vertex: Digest,
        name: String,
        at: SystemTime,
        error: String,
    },
    /// Output of a running op.
    Log {
        vertex: Digest,
        stream: LogStream,
        data: Vec<u8>,
        at: SystemTime,
    },
    /// What the op's process used.
    Usage {
        vertex: Digest,
        usage: ResourceUsage,
        at: SystemTime,
    },
}

impl ProgressEvent {
    pub fn vertex(&self) -> &Digest {
        match self {
            ProgressEvent::Started { vertex, .. }
            | ProgressEvent::Cached { vertex, .. }
            | ProgressEvent::Done { vertex, .. }
            | ProgressEvent::Error { vertex, .. }
            | ProgressEvent::Log { vertex, .. }
            | ProgressEvent::Usage { vertex, .. } => vertex,
        }
    }
}

/// Sending side of the progress channel; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ProgressSender {
    tx: Option<mpsc::Sender<ProgressEvent>>,
}

impl ProgressSender {
    /// A channel holding at most `capacity` undelivered events.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<ProgressEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (ProgressSender { tx: Some(tx) }, rx)
    }

    /// A sender that drops every event.
    pub fn discard() -> Self {
        ProgressSender { tx: None }
    }

    /// Sends an event, waiting while the channel is full.
    pub async fn send(&self, event: ProgressEvent) {
        if let Some(tx) = &self.tx {
            // A closed receiver means nobody is watching; the solve goes on.
            let _ = tx.send(event).await;
        }
    }

    /// Sends a log chunk for `vertex`.
    pub async fn log(&self, vertex: &Digest, stream: LogStream, data: &[u8]) {
        self.send(ProgressEvent::Log {
            vertex: vertex.clone(),
            stream,
            data: data.to_vec(),
            at: SystemTime::now(),
        })
        .await;
    }
}
