//! SourceOp CacheMaps (exec-cachemap.md §7): `sha256("buildkit.source.v0:" + key)`, or a
//! `random:` digest for session-bound keys.
//!
//! Only what needs no network is computed here: `local://` (from a session id), `git://`
//! pinned to a 40-hex commit, and `http(s)://` with `http.checksum`. Images, OCI layouts,
//! git refs that are not commits and unpinned downloads get their CacheMaps from the op
//! implementation at solve time; [`offline_cache_map`] answers `Ok(None)` for them.

use kiln_proto::gojson::{ObjectWriter, write_string};
use kiln_proto::{Digest, pb};
use sha2::{Digest as _, Sha256};

use super::http::HttpIdentifier;
use super::map::{CacheDigest, CacheMap};
pub use super::source_error::SourceError;

/// Prefix of every source key before hashing.
pub const SOURCE_CACHE_PREFIX: &str = "buildkit.source.v0:";

/// Session id used by `kiln debug cachemap` for local sources when none is given. Local
/// digests are `random:` and only meaningful within one session anyway.
pub const PLACEHOLDER_SESSION: &str = "kiln-debug-session";

/// What source CacheMaps may need from the job.
#[derive(Clone, Debug, Default)]
pub struct SourceContext {
    /// The job's first session id (used by `local://` without `local.session`).
    pub session_id: Option<String>,
}

/// The digest for a source `key`: `random:` for `session:` keys.
pub fn source_digest(key: &str) -> CacheDigest {
    let hex = hex::encode(Sha256::digest(
        format!("{SOURCE_CACHE_PREFIX}{key}").as_bytes(),
    ));
    if key.starts_with("session:") {
        CacheDigest::new(format!("random:{hex}"))
    } else {
        CacheDigest::new(format!("sha256:{hex}"))
    }
}

/// Computes the offline-computable CacheMap (and BuildKit's `done` flag), or `Ok(None)`
/// when the source needs resolution at solve time.
pub fn offline_cache_map(
    source: &pb::SourceOp,
    _platform: Option<&pb::Platform>,
    ctx: &SourceContext,
) -> Result<Option<(CacheMap, bool)>, SourceError> {
    let (scheme, rest) = source
        .identifier
        .split_once("://")
        .ok_or_else(|| SourceError::NoScheme(source.identifier.clone()))?;
    let key = match scheme {
        "local" => Some(local_key(source, rest, ctx)?),
        "git" => git_key(source, rest),
        "http" | "https" => http_key(source)?,
        "docker-image" | "oci-layout" => None,
        other => return Err(SourceError::UnknownScheme(other.to_owned())),
    };
    Ok(key.map(|key| {
        (
            CacheMap {
                digest: source_digest(&key),
                deps: Vec::new(),
                hashed: Some(format!("{SOURCE_CACHE_PREFIX}{key}").into_bytes()),
            },
            true,
        )
    }))
}

fn pattern_attr(
    source: &pb::SourceOp,
    attr: &'static str,
) -> Result<Option<Vec<String>>, SourceError> {
    source
        .attrs
        .get(attr)
        .map(|value| {
            serde_json::from_str::<Vec<String>>(value).map_err(|e| SourceError::BadAttr {
                identifier: source.identifier.clone(),
                attr,
                value: value.clone(),
                reason: e.to_string(),
            })
        })
        .transpose()
}

/// `"session:" + name + ":" + sha256(J)`.
fn local_key(
    source: &pb::SourceOp,
    name: &str,
    ctx: &SourceContext,
) -> Result<String, SourceError> {
    let mut name = name.to_owned();
    let session = match source.attrs.get("local.session") {
        Some(value) => match value.split_once(':') {
            Some((prefix, session)) => {
                name = format!("{prefix}-{name}");
                session.to_owned()
            }
            None => value.clone(),
        },
        None => ctx.session_id.clone().ok_or(SourceError::NoSession)?,
    };
    let include = pattern_attr(source, "local.includepattern")?;
    let exclude = pattern_attr(source, "local.excludepatterns")?;
    let follow = pattern_attr(source, "local.followpaths")?;
    let mut json = Vec::new();
    let mut obj = ObjectWriter::new(&mut json);
    obj.string_always("SessionID", &session);
    for (key, list) in [
        ("IncludePatterns", &include),
        ("ExcludePatterns", &exclude),
        ("FollowPaths", &follow),
    ] {
        let out = obj.key(key);
        match list {
            None => out.extend_from_slice(b"null"),
            Some(list) => {
                out.push(b'[');
                for (i, item) in list.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_string(out, item.as_bytes());
                }
                out.push(b']');
            }
        }
    }
    obj.finish();
    Ok(format!("session:{name}:{}", Digest::of(&json)))
}

/// `<commit>[.git][:subdir]`, only for a ref that is already a 40-hex commit.
fn git_key(source: &pb::SourceOp, rest: &str) -> Option<String> {
    let fragment = rest.split_once('#').map_or("", |(_, f)| f);
    let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
    let is_commit = reference.len() == 40
        && reference
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_commit {
        return None;
    }
    let mut key = reference.to_owned();
    if source
        .attrs
        .get("git.keepgitdir")
        .is_some_and(|v| v == "true")
    {
        key.push_str(".git");
    }
    let subdir = if matches!(subdir, "/" | ".") {
        ""
    } else {
        subdir
    };
    if !subdir.is_empty() {
        key.push(':');
        key.push_str(subdir);
    }
    Some(key)
}

/// `formatCacheKey` for a download with a checksum (named without a response).
fn http_key(source: &pb::SourceOp) -> Result<Option<String>, SourceError> {
    let id = HttpIdentifier::from_op(source)?;
    let Some(checksum) = &id.checksum else {
        return Ok(None);
    };
    let filename = id.file_name(None);
    Ok(Some(
        id.cache_key(&filename, checksum, "").as_str().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(identifier: &str, attrs: &[(&str, &str)]) -> pb::SourceOp {
        pb::SourceOp {
            identifier: identifier.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn digest(op: &pb::SourceOp) -> String {
        offline_cache_map(op, None, &SourceContext::default())
            .unwrap()
            .unwrap()
            .0
            .digest
            .as_str()
            .to_owned()
    }

    #[test]
    fn local_with_session_is_random() {
        let op = source(
            "local://context",
            &[
                ("local.session", "abc123"),
                ("local.sharedkeyhint", "context"),
            ],
        );
        assert_eq!(
            digest(&op),
            "random:878144757be3560755df0dc450e4e23e13a1ccf952986ca8e6f1f874d767be4a"
        );
        let op = source(
            "local://context",
            &[
                ("local.session", "abc123"),
                ("local.sharedkeyhint", "context"),
                ("local.includepattern", r#"["*.go"]"#),
            ],
        );
        assert_eq!(
            digest(&op),
            "random:ac06710322287f685c7c4775dfe66ecddf8f3a51a6a0a6a76437909a98613f8d"
        );
    }

    #[test]
    fn local_without_any_session_is_an_error() {
        let op = source("local://context", &[]);
        let err = offline_cache_map(&op, None, &SourceContext::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "could not access local files without session"
        );
        let ctx = SourceContext {
            session_id: Some("abc123".into()),
        };
        let (from_ctx, done) = offline_cache_map(&op, None, &ctx).unwrap().unwrap();
        assert!(done);
        assert!(from_ctx.digest.is_random());
    }

    #[test]
    fn git_commit_keys() {
        let op = source(
            "git://github.com/moby/buildkit#0123456789abcdef0123456789abcdef01234567",
            &[],
        );
        assert_eq!(
            digest(&op),
            "sha256:d7ebc2f96f789f7f2538c2ab515b91c26abd16c96b361badd17cec4b4418306f"
        );
        let op = source(
            "git://github.com/moby/buildkit#0123456789abcdef0123456789abcdef01234567:docs",
            &[("git.keepgitdir", "true")],
        );
        assert_eq!(
            digest(&op),
            "sha256:535de891521bd4cf4f5532444885b40b9718b5fd5a6fdcb7c6d1d6f5f8f2f963"
        );
        let branch = source("git://github.com/moby/buildkit#master", &[]);
        assert!(
            offline_cache_map(&branch, None, &SourceContext::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn http_with_checksum() {
        let op = source(
            "https://example.com/file.tar.gz",
            &[(
                "http.checksum",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            )],
        );
        assert_eq!(
            digest(&op),
            "sha256:6cd681e5bac18813c466e3792a3f1d52f1f93d9982d3a1765c8c94eaf1152fff"
        );
        let unpinned = source("https://example.com/file.tar.gz", &[]);
        assert!(
            offline_cache_map(&unpinned, None, &SourceContext::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn images_need_resolution_and_bad_identifiers_fail() {
        let image = source("docker-image://docker.io/library/alpine:latest", &[]);
        assert!(
            offline_cache_map(&image, None, &SourceContext::default())
                .unwrap()
                .is_none()
        );
        let bad = source("nothing", &[]);
        assert_eq!(
            offline_cache_map(&bad, None, &SourceContext::default())
                .unwrap_err()
                .to_string(),
            "failed to parse nothing: invalid"
        );
        let unknown = source("ftp://x", &[]);
        assert_eq!(
            offline_cache_map(&unknown, None, &SourceContext::default())
                .unwrap_err()
                .to_string(),
            "unknown schema ftp: not found"
        );
    }
}
