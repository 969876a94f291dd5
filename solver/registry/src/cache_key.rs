//! The cache keys of `docker-image://` and `oci-layout://` sources (exec-cachemap.md §7):
//! index 0 keys the image by what its reference resolved to and the platform (more to
//! come, `done = false`); index 1 by the ChainID of its layers (`done = true`), so two
//! references to the same layers share cache records.

use kiln_proto::gojson::ObjectWriter;
use kiln_proto::{Digest, pb};

use super::resolve::ResolvedImage;
use crate::error::ImageError;

/// The JSON BuildKit hashes for index 0: Go `encoding/json` of
/// `{Digest, OS, Arch, Variant omitempty, Limit *int omitempty}`.
pub fn manifest_key_json(
    digest: &Digest,
    platform: &pb::Platform,
    limit: Option<usize>,
) -> Vec<u8> {
    let mut json = Vec::new();
    let mut obj = ObjectWriter::new(&mut json);
    obj.string_always("Digest", digest.as_str())
        .string_always("OS", &platform.os)
        .string_always("Arch", &platform.architecture)
        .string("Variant", &platform.variant);
    if let Some(limit) = limit {
        // A present *int is written even when zero (limits are > 0 anyway).
        obj.int_always("Limit", i64::try_from(limit).unwrap_or(i64::MAX));
    }
    obj.finish();
    json
}

/// The ChainID of `diff_ids` (OCI image spec): `ChainID(L0) = DiffID(L0)`,
/// `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(first.clone(), |chain, diff| {
        Digest::of(format!("{chain} {diff}").as_bytes())
            .as_str()
            .to_owned()
    }))
}

/// The key of index 1 (BuildKit's `cacheKeyFromConfig`): the ChainID of the config's
/// diff IDs (the first `limit` of them); the config digest when the config is not JSON
/// (an error with a limit); `None` when there is no layer chain to key by.
pub fn config_key(
    image: &ResolvedImage,
    limit: Option<usize>,
) -> Result<Option<String>, ImageError> {
    let summary = match &image.config.parsed {
        Ok(summary) => summary,
        Err(message) => {
            return match limit {
                Some(_) => Err(ImageError::BadConfig {
                    image: image.name.clone(),
                    digest: image.config.digest.clone(),
                    message: message.clone(),
                }),
                None => Ok(Some(Digest::of(&image.config.bytes).as_str().to_owned())),
            };
        }
    };
    let mut diff_ids = summary.diff_ids.as_slice();
    if let Some(limit) = limit {
        if diff_ids.len() < limit {
            return Err(ImageError::LayerLimit {
                image: image.name.clone(),
                layers: diff_ids.len(),
                limit,
            });
        }
        diff_ids = &diff_ids[..limit];
    }
    if summary.rootfs_type != "layers" || diff_ids.is_empty() {
        return Ok(None);
    }
    Ok(chain_id(diff_ids))
}

/// An image source's cache key for one CacheMap index: the string BuildKit prefixes with
/// `buildkit.source.v0:` and hashes, and whether it is the last index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageCacheKey {
    pub key: String,
    pub done: bool,
}

/// The key of CacheMap `index` of a resolved image for `platform` (normalised, the op's or
/// the host default) with the source's layer limit.
pub fn cache_key(
    image: &ResolvedImage,
    platform: &pb::Platform,
    index: usize,
    limit: Option<usize>,
) -> Result<ImageCacheKey, ImageError> {
    let main_key = || Digest::of(&manifest_key_json(&image.digest, platform, limit));
    match index {
        0 => Ok(ImageCacheKey {
            key: main_key().as_str().to_owned(),
            done: false,
        }),
        1 => {
            let key = match config_key(image, limit)? {
                Some(key) => key,
                None => main_key().as_str().to_owned(),
            };
            Ok(ImageCacheKey { key, done: true })
        }
        other => Err(ImageError::CacheMapIndex {
            image: image.name.clone(),
            index: other,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::layout::OciLayout;
    use crate::manifest::ConfigSummary;
    use crate::resolve::{Fetcher, ImageConfig};

    fn platform(variant: &str) -> pb::Platform {
        pb::Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: variant.into(),
            ..Default::default()
        }
    }

    fn image(config: &[u8]) -> ResolvedImage {
        ResolvedImage {
            name: "test".into(),
            digest: Digest::of(b"index"),
            manifest_digest: Digest::of(b"manifest"),
            manifest: Vec::new(),
            config: ImageConfig {
                digest: Digest::of(config),
                bytes: config.to_vec(),
                parsed: ConfigSummary::parse(config),
            },
            layers: Vec::new(),
            platform: platform("v7"),
            // CacheMaps never fetch anything.
            fetcher: Arc::new(Fetcher::Layout(OciLayout::unchecked(
                std::path::PathBuf::new(),
            ))),
        }
    }

    #[test]
    fn index0_json_follows_go_field_rules() {
        let d = Digest::of(b"index");
        assert_eq!(
            String::from_utf8(manifest_key_json(&d, &platform(""), None)).unwrap(),
            format!(r#"{{"Digest":"{d}","OS":"linux","Arch":"arm"}}"#)
        );
        assert_eq!(
            String::from_utf8(manifest_key_json(&d, &platform("v7"), Some(2))).unwrap(),
            format!(r#"{{"Digest":"{d}","OS":"linux","Arch":"arm","Variant":"v7","Limit":2}}"#)
        );
    }

    #[test]
    fn index1_is_the_chain_id_or_falls_back() {
        let a = Digest::of(b"a").as_str().to_owned();
        let b = Digest::of(b"b").as_str().to_owned();
        let config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [a, b]}
        }))
        .unwrap();
        let img = image(&config);
        let p = platform("v7");
        let m0 = cache_key(&img, &p, 0, None).unwrap();
        assert!(!m0.done);
        let key0 = Digest::of(&manifest_key_json(&img.digest, &p, None));
        assert_eq!(m0.key, key0.as_str());
        let m1 = cache_key(&img, &p, 1, None).unwrap();
        assert!(m1.done);
        let chain = Digest::of(format!("{a} {b}").as_bytes());
        assert_eq!(m1.key, chain.as_str());
        let limited = cache_key(&img, &p, 1, Some(1)).unwrap();
        assert_eq!(limited.key, a.as_str());
        let err = cache_key(&img, &p, 1, Some(3)).unwrap_err().to_string();
        assert_eq!(err, "test: image has 2 layers, limit is 3");
        assert!(cache_key(&img, &p, 2, None).is_err());

        // Not JSON: the config digest, unless a limit needs the layers.
        let raw = image(b"not json");
        let m1 = cache_key(&raw, &p, 1, None).unwrap();
        let config_digest = Digest::of(b"not json");
        assert_eq!(m1.key, config_digest.as_str());
        assert!(cache_key(&raw, &p, 1, Some(1)).is_err());

        // No layers, or not a layer rootfs: index 0's key again.
        for config in [
            br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#.as_slice(),
            br#"{"rootfs":{"type":"other","diff_ids":["sha256:x"]}}"#.as_slice(),
        ] {
            let img = image(config);
            assert_eq!(
                cache_key(&img, &p, 1, None).unwrap().key,
                cache_key(&img, &p, 0, None).unwrap().key
            );
        }
    }
}
