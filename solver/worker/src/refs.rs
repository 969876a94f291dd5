//! The worker's results: a committed snapshot, or a lazy ref made from an imported
//! cache's layer descriptors whose layers are pulled only when something needs the
//! content (a step that runs on it, content hashing, an export of its files). A lazy ref
//! that only goes back to a cache or image exporter is never pulled: its layers are
//! exported by descriptor.

use std::sync::Arc;

use kiln_remotecache::RemoteChain;
use kiln_snapshotter::ImmutableRef;
use tokio::sync::OnceCell;

/// A result of the worker.
#[derive(Clone)]
pub struct KilnRef {
    inner: Arc<RefInner>,
}

struct RefInner {
    ready: OnceCell<ImmutableRef>,
    lazy: Option<RemoteChain>,
}

impl std::fmt::Debug for KilnRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.inner.ready.get(), &self.inner.lazy) {
            (Some(r), _) => write!(f, "KilnRef({})", r.id()),
            (None, Some(chain)) => write!(
                f,
                "KilnRef(lazy, {} layers from {})",
                chain.layers.len(),
                chain.source
            ),
            (None, None) => f.write_str("KilnRef(empty)"),
        }
    }
}

impl KilnRef {
    /// A result that is a committed snapshot.
    pub fn ready(r: ImmutableRef) -> Self {
        KilnRef {
            inner: Arc::new(RefInner {
                ready: OnceCell::new_with(Some(r)),
                lazy: None,
            }),
        }
    }

    /// A result whose layers are still in a remote cache.
    pub fn lazy(chain: RemoteChain) -> Self {
        KilnRef {
            inner: Arc::new(RefInner {
                ready: OnceCell::new(),
                lazy: Some(chain),
            }),
        }
    }

    /// The snapshot, if the ref was made from one or has been pulled.
    pub fn snapshot(&self) -> Option<&ImmutableRef> {
        self.inner.ready.get()
    }

    /// The remote layers of a lazy ref.
    pub fn remote(&self) -> Option<&RemoteChain> {
        self.inner.lazy.as_ref()
    }

    pub(crate) fn cell(&self) -> &OnceCell<ImmutableRef> {
        &self.inner.ready
    }
}
