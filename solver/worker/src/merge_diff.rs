//! MergeOp and DiffOp (LLB `merge`/`diff`, which `COPY --link` produces) over snapshots:
//! the snapshotter composes the inputs' layers (a merge is a longer lowerdir stack, a diff
//! against an ancestor the layers in between), so neither copies files where overlay
//! allows. An op that yields nothing (every input scratch) yields an empty tree.

use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{EMPTY_INPUT, Vertex, pb};
use kiln_snapshotter::{ImmutableRef, RefOptions};
use kiln_solver::cachemap::merge_diff::{diff_cache_map, merge_cache_map};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};

use crate::state::{Inner, blocking, failed};

pub(crate) struct MergeOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    merge: pb::MergeOp,
}

impl MergeOp {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, merge: pb::MergeOp) -> Self {
        MergeOp {
            inner,
            vertex,
            merge,
        }
    }
}

/// The op input `index` names, or scratch for `-1`.
fn input(inputs: &[ImmutableRef], index: i64, what: &str) -> Result<Option<ImmutableRef>, OpError> {
    if index == EMPTY_INPUT {
        return Ok(None);
    }
    usize::try_from(index)
        .ok()
        .and_then(|i| inputs.get(i))
        .cloned()
        .map(Some)
        .ok_or_else(|| {
            failed(format!(
                "invalid {what} input {index}: the op has {} inputs",
                inputs.len()
            ))
        })
}

fn options(vertex: &Vertex) -> RefOptions {
    RefOptions {
        description: vertex.name.clone(),
        ..RefOptions::default()
    }
}

#[async_trait]
impl Op<ImmutableRef> for MergeOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        Ok(CacheMapResponse {
            map: merge_cache_map(&self.merge, self.vertex.op.inputs.len()),
            done: true,
        })
    }

    async fn exec(
        &self,
        _ctx: &JobContext,
        inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let refs = self
            .merge
            .inputs
            .iter()
            .map(|m| input(&inputs, m.input, "merge"))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        let inner = self.inner.clone();
        let options = options(&self.vertex);
        blocking(
            move || match inner.snapshotter.merge(&refs, &options).map_err(failed)? {
                Some(merged) => Ok(vec![merged]),
                None => Ok(vec![inner.empty_snapshot(options.description)?]),
            },
        )
        .await
    }
}

pub(crate) struct DiffOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    diff: pb::DiffOp,
}

impl DiffOp {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, diff: pb::DiffOp) -> Self {
        DiffOp {
            inner,
            vertex,
            diff,
        }
    }
}

#[async_trait]
impl Op<ImmutableRef> for DiffOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let map = diff_cache_map(&self.vertex.digest, &self.diff).map_err(failed)?;
        Ok(CacheMapResponse { map, done: true })
    }

    async fn exec(
        &self,
        _ctx: &JobContext,
        inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let lower = match &self.diff.lower {
            Some(pb::LowerDiffInput { input: i }) => input(&inputs, *i, "lower")?,
            None => return Err(failed("diff op without lower input")),
        };
        let upper = match &self.diff.upper {
            Some(pb::UpperDiffInput { input: i }) => input(&inputs, *i, "upper")?,
            None => return Err(failed("diff op without upper input")),
        };
        let inner = self.inner.clone();
        let options = options(&self.vertex);
        blocking(move || {
            match inner
                .snapshotter
                .diff(lower.as_ref(), upper.as_ref(), &options)
                .map_err(failed)?
            {
                Some(diff) => Ok(vec![diff]),
                None => Ok(vec![inner.empty_snapshot(options.description)?]),
            }
        })
        .await
    }
}
