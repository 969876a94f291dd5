//! `local://NAME` sources: the build's directory for NAME (`--local NAME=DIR`) copied into a
//! snapshot, honouring `local.includepattern` and `local.excludepatterns`. Their CacheMap
//! is a session-bound `random:` digest, as in BuildKit: dependents are cached by the
//! content of what was copied (content-based keys), not by the directory's name.

use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{Vertex, pb};
use kiln_snapshotter::ImmutableRef;

use crate::state::{Inner, blocking, failed};
use kiln_solver::cachemap::source::{SourceContext, offline_cache_map};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};

pub(crate) struct LocalSource {
    inner: Arc<Inner>,
    vertex: Vertex,
    source: pb::SourceOp,
}

impl LocalSource {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, source: pb::SourceOp) -> Self {
        LocalSource {
            inner,
            vertex,
            source,
        }
    }

    fn name(&self) -> &str {
        self.source
            .identifier
            .strip_prefix("local://")
            .unwrap_or_default()
    }

    fn patterns(&self, attr: &str) -> Result<Vec<String>, OpError> {
        match self.source.attrs.get(attr) {
            Some(json) if !json.is_empty() => serde_json::from_str(json)
                .map_err(|e| failed(format!("{attr} of {}: {e}", self.source.identifier))),
            _ => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl Op<ImmutableRef> for LocalSource {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let ctx = SourceContext {
            session_id: Some(self.inner.config.session.id.clone()),
        };
        let (map, done) = offline_cache_map(&self.source, self.vertex.platform(), &ctx)
            .map_err(failed)?
            .ok_or_else(|| failed(format!("no cache map for {}", self.source.identifier)))?;
        Ok(CacheMapResponse { map, done })
    }

    async fn exec(
        &self,
        _ctx: &JobContext,
        _inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let name = self.name().to_owned();
        let dir = self
            .inner
            .config
            .session
            .locals
            .get(&name)
            .cloned()
            .ok_or_else(|| {
                failed(format!(
                    "local directory {name:?} not given (--local {name}=DIR)"
                ))
            })?;
        let copy = pb::FileActionCopy {
            src: "/".to_owned(),
            dest: "/".to_owned(),
            mode: -1,
            timestamp: -1,
            dir_copy_contents: true,
            include_patterns: self.patterns("local.includepattern")?,
            exclude_patterns: self.patterns("local.excludepatterns")?,
            ..Default::default()
        };
        let inner = self.inner.clone();
        let description = format!("local source for {name}");
        let r =
            blocking(move || crate::file::snapshot_directory(&inner, &dir, &copy, &description))
                .await?;
        Ok(vec![r])
    }
}
