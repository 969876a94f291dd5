//! MergeOp, DiffOp and (experimental) BuildOp CacheMaps. Merge and diff use their raw
//! JSON text as the "digest" (v0.11.6 converts the marshaled bytes to a digest string
//! without hashing); build hashes it. None of them has selectors or content hashes.

use kiln_proto::gojson::{GoJson, ObjectWriter};
use kiln_proto::{Digest, EMPTY_INPUT, pb};

use super::error::CacheMapError;
use super::map::{CacheDigest, CacheMap, Dep};

pub const MERGE_CACHE_TYPE: &str = "buildkit.merge.v0";
pub const DIFF_CACHE_TYPE: &str = "buildkit.diff.v0";
pub const BUILD_CACHE_TYPE: &str = "buildkit.build.v0";

fn wrapper<T: GoJson>(type_name: &str, key: &str, body: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut obj = ObjectWriter::new(&mut out);
    obj.string_always("Type", type_name);
    body.write_go_json(obj.key(key));
    obj.finish();
    out
}

fn plain_deps(n: usize) -> Vec<Dep> {
    vec![Dep::default(); n]
}

/// `{"Type":"buildkit.merge.v0","Merge":{…}}`, used verbatim as the digest.
pub fn merge_cache_map(merge: &pb::MergeOp, num_inputs: usize) -> CacheMap {
    let json = wrapper(MERGE_CACHE_TYPE, "Merge", merge);
    CacheMap {
        digest: CacheDigest::new(String::from_utf8_lossy(&json).into_owned()),
        deps: plain_deps(num_inputs),
        hashed: Some(json),
    }
}

/// `{"Type":"buildkit.diff.v0","Diff":{…}}`, used verbatim as the digest; one dep per
/// side that is not scratch.
pub fn diff_cache_map(op: &Digest, diff: &pb::DiffOp) -> Result<CacheMap, CacheMapError> {
    // v0.11.6 dereferences both sides unconditionally.
    let (Some(lower), Some(upper)) = (&diff.lower, &diff.upper) else {
        return Err(CacheMapError::Invalid {
            op: op.clone(),
            what: "diff op without lower or upper".to_owned(),
        });
    };
    let json = wrapper(DIFF_CACHE_TYPE, "Diff", diff);
    let count = usize::from(lower.input != EMPTY_INPUT) + usize::from(upper.input != EMPTY_INPUT);
    Ok(CacheMap {
        digest: CacheDigest::new(String::from_utf8_lossy(&json).into_owned()),
        deps: plain_deps(count),
        hashed: Some(json),
    })
}

/// `sha256({"Type":"buildkit.build.v0","Exec":{…}})` (the field really is named `Exec`).
pub fn build_cache_map(build: &pb::BuildOp, num_inputs: usize) -> CacheMap {
    let json = wrapper(BUILD_CACHE_TYPE, "Exec", build);
    CacheMap {
        digest: CacheDigest::sha256_of(&json),
        deps: plain_deps(num_inputs),
        hashed: Some(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_digest_is_the_raw_json() {
        let merge = pb::MergeOp {
            inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
        };
        let cm = merge_cache_map(&merge, 2);
        assert_eq!(
            cm.digest.as_str(),
            r#"{"Type":"buildkit.merge.v0","Merge":{"inputs":[{"input":0},{"input":1}]}}"#
        );
        assert_eq!(cm.deps.len(), 2);
    }

    #[test]
    fn diff_counts_non_scratch_sides() {
        let diff = pb::DiffOp {
            lower: Some(pb::LowerDiffInput { input: -1 }),
            upper: Some(pb::UpperDiffInput { input: 0 }),
        };
        let cm = diff_cache_map(&Digest::of(b"d"), &diff).unwrap();
        assert_eq!(
            cm.digest.as_str(),
            r#"{"Type":"buildkit.diff.v0","Diff":{"lower":{"input":-1},"upper":{"input":0}}}"#
        );
        assert_eq!(cm.deps.len(), 1);
        let missing = pb::DiffOp {
            lower: None,
            upper: Some(pb::UpperDiffInput { input: 0 }),
        };
        assert!(diff_cache_map(&Digest::of(b"d"), &missing).is_err());
    }
}
