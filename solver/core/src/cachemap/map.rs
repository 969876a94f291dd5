//! The CacheMap value: its digest (a [`CacheDigest`], not always a sha256), and per input
//! the dependency rules (selector digests, content-hash selectors) the scheduler applies.

use std::fmt;

use kiln_proto::Digest;

/// A CacheMap digest as BuildKit stores it. Usually `sha256:<hex>`, but local sources
/// produce `random:<hex>` and merge/diff ops use their raw JSON text as the "digest", so
/// this is not a [`Digest`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheDigest(String);

impl CacheDigest {
    /// Wraps an already-formed digest string.
    pub fn new(text: impl Into<String>) -> Self {
        CacheDigest(text.into())
    }

    /// `sha256:<hex>` of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        CacheDigest(Digest::of(bytes).as_str().to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this digest only identifies something within one session (`random:`),
    /// so keys derived from it are not expected to match across builds.
    pub fn is_random(&self) -> bool {
        self.0.starts_with("random:")
    }
}

impl fmt::Display for CacheDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CacheDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheDigest({})", self.0)
    }
}

impl From<Digest> for CacheDigest {
    fn from(d: Digest) -> Self {
        CacheDigest(d.as_str().to_owned())
    }
}

/// One path whose content feeds a content-based ("slow") cache key
/// (`opsutils.Selector` in BuildKit).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ContentSelector {
    pub path: String,
    pub follow_links: bool,
    pub wildcard: bool,
    pub include_patterns: Vec<String>,
    pub exclude_patterns: Vec<String>,
}

impl ContentSelector {
    /// A plain path selector.
    pub fn path(path: impl Into<String>, follow_links: bool) -> Self {
        ContentSelector {
            path: path.into(),
            follow_links,
            ..Default::default()
        }
    }

    /// `HasWildcardOrFilters` in BuildKit.
    pub fn has_wildcard_or_filters(&self) -> bool {
        self.wildcard || !self.include_patterns.is_empty() || !self.exclude_patterns.is_empty()
    }
}

/// The per-input part of a CacheMap.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Dep {
    /// Digest of the input's selectors; `None` is BuildKit's empty selector.
    pub selector: Option<Digest>,
    /// `Some` when the input has a ComputeDigestFunc: the selectors to content-hash
    /// (an empty list means the whole input at `/`, links not followed).
    pub content: Option<Vec<ContentSelector>>,
    /// Whether the input must be materialised before hashing or execution
    /// (BuildKit's PreprocessFunc, set by exec and file ops).
    pub preprocess: bool,
}

impl Dep {
    pub fn content_based(&self) -> bool {
        self.content.is_some()
    }

    /// The selector as stored in links: the digest text, or `""`.
    pub fn selector_str(&self) -> &str {
        self.selector.as_ref().map_or("", Digest::as_str)
    }
}

/// One CacheMap of a vertex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheMap {
    pub digest: CacheDigest,
    /// One entry per op input.
    pub deps: Vec<Dep>,
    /// The exact bytes hashed into `digest` (for `--explain` and diffs), when known.
    pub hashed: Option<Vec<u8>>,
}

/// BuildKit's `dedupePaths`: drop duplicates and every path below another listed path
/// (`p1` starts with `p2 + "/"`), sorted bytewise.
pub fn dedupe_paths(paths: &[String]) -> Vec<String> {
    let unique: std::collections::BTreeSet<&String> = paths.iter().collect();
    unique
        .iter()
        .filter(|p1| {
            !unique
                .iter()
                .any(|p2| p1 != &p2 && p1.starts_with(&format!("{p2}/")))
        })
        .map(|p| (*p).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_paths_drops_duplicates_and_children_but_root_keeps_children() {
        let paths: Vec<String> = ["/a/b", "/a", "/a", "/ab", "/c"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(dedupe_paths(&paths), ["/a", "/ab", "/c"]);
        // "/" + "/" is "//", so the root swallows nothing.
        let paths = vec!["/".to_owned(), "/x".to_owned()];
        assert_eq!(dedupe_paths(&paths), ["/", "/x"]);
    }
}
