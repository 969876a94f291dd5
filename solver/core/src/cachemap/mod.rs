//! CacheMaps: for each vertex, the digest and per-input dependency rules BuildKit v0.11.6
//! computes (`Op.CacheMap`), byte for byte (../shared/spec/exec-cachemap.md).
//!
//! One submodule per op family: [`exec`], [`file`](mod@file), [`source`] (offline-computable
//! sources only) and [`merge_diff`] (merge, diff and the experimental build op). The
//! hashed JSON is written with kiln-proto's Go `encoding/json` writer; the wrapper objects
//! BuildKit marshals around each op live here.

pub mod diff;
mod error;
pub mod exec;
pub mod file;
pub mod http;
mod map;
pub mod merge_diff;
pub mod source;
mod source_error;

use kiln_proto::{OpKind, Vertex, pb};

pub use error::CacheMapError;
pub use map::{CacheDigest, CacheMap, ContentSelector, Dep, dedupe_paths};
pub use source::SourceContext;

/// Computes what can be computed without network or session access: exec, file, merge,
/// diff and build ops, and the offline source kinds ([`source::offline_cache_map`]).
/// `Ok(None)` means the op's CacheMap needs resolution at solve time (images, git refs
/// that are not commits, http without checksum) or the op has no body.
pub fn offline_cache_map(
    vertex: &Vertex,
    sources: &SourceContext,
) -> Result<Option<CacheMap>, CacheMapError> {
    let inputs = vertex.op.inputs.len();
    let op = &vertex.digest;
    match &vertex.op.op {
        Some(pb::op::Op::Exec(e)) => exec::cache_map(op, e, vertex.platform(), inputs).map(Some),
        Some(pb::op::Op::File(f)) => file::cache_map(op, f, inputs).map(Some),
        Some(pb::op::Op::Merge(m)) => Ok(Some(merge_diff::merge_cache_map(m, inputs))),
        Some(pb::op::Op::Diff(d)) => merge_diff::diff_cache_map(op, d).map(Some),
        Some(pb::op::Op::Build(b)) => Ok(Some(merge_diff::build_cache_map(b, inputs))),
        Some(pb::op::Op::Source(s)) => source::offline_cache_map(s, vertex.platform(), sources)
            .map(|r| r.map(|(map, _done)| map))
            .map_err(|source| CacheMapError::Source {
                op: op.clone(),
                source,
            }),
        None => {
            debug_assert_eq!(vertex.kind(), OpKind::Unknown);
            Ok(None)
        }
    }
}
