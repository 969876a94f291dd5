//! Progress events of a solve (vertex started / cached / done / error, and log output),
//! sent on a bounded channel for the CLI to render.
//!
//! The channel is bounded on purpose: a step printing faster than the terminal renders is
//! slowed down instead of filling memory. A receiver that went away is not an error; the
//! events are dropped.

use std::time::SystemTime;

use kiln_proto::Digest;
use tokio::sync::mpsc;

/// Which output stream a log chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
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
}

impl ProgressEvent {
    pub fn vertex(&self) -> &Digest {
        match self {
            ProgressEvent::Started { vertex, .. }
            | ProgressEvent::Cached { vertex, .. }
            | ProgressEvent::Done { vertex, .. }
            | ProgressEvent::Error { vertex, .. }
            | ProgressEvent::Log { vertex, .. } => vertex,
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
