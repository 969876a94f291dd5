//! Extra sources of cache keys and results besides the local store: what an imported
//! remote cache provides (BuildKit's second cache manager, queried beside the local one).
//!
//! A source is read-only and knows keys by its own IDs, except root keys (`rootKey(d, o)`
//! of sources and content keys), which are the same strings everywhere. The scheduler
//! looks links up in the store and every source at once, loads a source's results through
//! the source (lazily, as the source sees fit), and before it saves a link from a key a
//! source gave, it copies the links that lead to that key into the local store, so the
//! chain is found again without the source (BuildKit's `ensurePersistentKey`).

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::keys::Links;
use crate::op::OpError;
use crate::store::{CacheResult, Link, Store, StoreError};

/// A read-only cache of keys, links and results.
#[async_trait]
pub trait CacheSource<R>: Send + Sync + 'static {
    /// Targets of `link` from key `source`.
    fn targets(&self, source: &str, link: &Link) -> Vec<String>;

    /// Results saved under `key`.
    fn results(&self, key: &str) -> Vec<CacheResult>;

    /// Every `(source key, link)` pointing at `key`.
    fn backlinks(&self, key: &str) -> Vec<(String, Link)>;

    /// Loads result `result_id` (one [`CacheSource::results`] gave); `Ok(None)` when the
    /// source cannot provide it after all.
    async fn load(&self, result_id: &str) -> Result<Option<R>, OpError>;
}

/// The local store and the sources, looked up together.
pub(crate) struct View<'a, R> {
    pub store: &'a Store,
    pub sources: &'a [Arc<dyn CacheSource<R>>],
}

impl<R: 'static> Links for View<'_, R> {
    fn targets_and_local(
        &self,
        source: &str,
        link: &Link,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let local = self.store.targets(source, link)?;
        let mut all: BTreeSet<String> = local.iter().cloned().collect();
        for s in self.sources {
            all.extend(s.targets(source, link));
        }
        Ok((all.into_iter().collect(), local))
    }
}

impl<R: 'static> View<'_, R> {
    /// Copies into the store every link the sources know that leads to `keys`,
    /// recursively (the keys' ancestors first), so those keys stay reachable.
    pub fn persist(&self, keys: &[String]) -> Result<(), StoreError> {
        if self.sources.is_empty() {
            return Ok(());
        }
        let mut done = BTreeSet::new();
        for key in keys {
            self.persist_one(key, &mut done)?;
        }
        Ok(())
    }

    fn persist_one(&self, key: &str, done: &mut BTreeSet<String>) -> Result<(), StoreError> {
        if !done.insert(key.to_owned()) {
            return Ok(());
        }
        let mut links: Vec<(String, Link)> = Vec::new();
        for s in self.sources {
            links.extend(s.backlinks(key));
        }
        if links.is_empty() {
            return Ok(());
        }
        for (source, _) in &links {
            self.persist_one(source, done)?;
        }
        self.store.save(key, &links, None)
    }
}
