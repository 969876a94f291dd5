//! `docker-image://` and `oci-layout://` sources in the worker: the image is resolved once
//! per op (CacheMap 0 needs the manifest digest, CacheMap 1 the layers' ChainID), and its
//! layers are pulled into the snapshot store only when the result is not cached.

use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{Vertex, pb};
use kiln_snapshotter::ImmutableRef;
use tokio::sync::OnceCell;

use crate::state::{Inner, blocking, failed};
use kiln_registry::{
    ImageError, ImageSource, PullProgress, PullState, ResolvedImage, cache_key, pull,
};
use kiln_solver::cachemap::CacheMap;
use kiln_solver::cachemap::source::{SOURCE_CACHE_PREFIX, source_digest};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};
use kiln_solver::progress::LogStream;

pub(crate) struct ImageSourceOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    source: ImageSource,
    resolved: OnceCell<ResolvedImage>,
}

impl ImageSourceOp {
    /// Parses the op's identifier and attributes; errors use BuildKit's texts.
    pub fn new(inner: Arc<Inner>, vertex: Vertex, op: &pb::SourceOp) -> Result<Self, OpError> {
        let source = ImageSource::from_op(op).map_err(failed)?;
        Ok(ImageSourceOp {
            inner,
            vertex,
            source,
            resolved: OnceCell::new(),
        })
    }

    async fn resolved(&self) -> Result<&ResolvedImage, OpError> {
        self.resolved
            .get_or_try_init(|| async {
                let platform = self.vertex.platform().cloned().unwrap_or_default();
                self.inner
                    .images
                    .resolve(&self.source, &platform)
                    .await
                    .map_err(failed)
            })
            .await
    }
}

/// One line per layer state change, as buildctl's plain progress shows pulls.
fn progress_line(p: &PullProgress<'_>) -> Option<String> {
    let short = p.layer.hex().get(..12).unwrap_or_default().to_owned();
    let state = match p.state {
        PullState::Cached => "already present",
        PullState::Verifying => "verifying",
        PullState::Extracting => "extracting",
        PullState::Done => "done",
        // Byte counts would flood the log; the states above frame each download.
        PullState::Downloading if p.done == 0 => "downloading",
        PullState::Downloading => return None,
    };
    Some(format!("sha256:{short} {} {state}\n", human_size(p.total)))
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.2}MB", bytes as f64 / 1e6)
    } else {
        format!("{:.2}kB", bytes as f64 / 1e3)
    }
}

/// CacheMap `index` of a resolved image for `platform` (normalised, the op's or the host
/// default) with the source's layer limit (exec-cachemap.md §7).
pub fn cache_map(
    image: &ResolvedImage,
    platform: &pb::Platform,
    index: usize,
    limit: Option<usize>,
) -> Result<CacheMapResponse, ImageError> {
    let key = cache_key(image, platform, index, limit)?;
    Ok(CacheMapResponse {
        map: CacheMap {
            digest: source_digest(&key.key),
            deps: Vec::new(),
            hashed: Some(format!("{SOURCE_CACHE_PREFIX}{}", key.key).into_bytes()),
        },
        done: key.done,
    })
}

#[async_trait]
impl Op<ImmutableRef> for ImageSourceOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let image = self.resolved().await?;
        cache_map(image, &image.platform, index, self.source.layer_limit()).map_err(failed)
    }

    async fn exec(
        &self,
        ctx: &JobContext,
        _inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let image = self.resolved().await?.clone();
        let (lines, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
        let forward = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                while let Some(line) = received.recv().await {
                    ctx.log(LogStream::Stderr, line.as_bytes()).await;
                }
            })
        };
        let on_progress = move |p: &PullProgress<'_>| {
            if let Some(line) = progress_line(p) {
                let _ = lines.send(line);
            }
        };
        let pulled = tokio::select! {
            pulled = pull(&self.inner.snapshotter, &image, self.source.layer_limit(), &on_progress) => pulled,
            () = ctx.cancel.cancelled() => return Err(OpError::Cancelled),
        };
        drop(on_progress);
        let _ = forward.await;
        let pulled = pulled.map_err(failed)?;
        let top = match pulled.top {
            Some(top) => top,
            // An image without layers is an empty tree.
            None => {
                let inner = self.inner.clone();
                let description = format!("empty image {}", image.name);
                blocking(move || inner.empty_snapshot(description)).await?
            }
        };
        Ok(vec![top])
    }
}
