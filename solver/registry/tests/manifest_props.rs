//! Property tests of the registry's manifest, index and image-config parsers (what pulls
//! and image cache keys are computed from; `fuzz/` has the coverage-guided target): JSON
//! shaped like manifests with hostile values, and arbitrary bytes, under every media
//! type. Parsing fails or succeeds cleanly, never panics, and what it accepts is sound.

use kiln_proto::{Digest, pb};
use kiln_registry::chain_id;
use kiln_registry::manifest::{self, ConfigSummary, Parsed};
use proptest::prelude::*;
use serde_json::{Value, json};

const MEDIA_TYPES: [&str; 7] = [
    manifest::MEDIA_OCI_MANIFEST,
    manifest::MEDIA_OCI_INDEX,
    manifest::MEDIA_DOCKER_MANIFEST,
    manifest::MEDIA_DOCKER_LIST,
    manifest::MEDIA_OCI_CONFIG,
    "",
    "application/json",
];

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("")),
        Just(json!("../../etc/passwd")),
        Just(json!("linux")),
        Just(json!("amd64")),
        Just(json!("arm64")),
        Just(json!("v8")),
        Just(json!(null)),
        Just(json!(7)),
        Just(json!(["x"])),
        ".{0,20}".prop_map(Value::String),
    ]
}

fn digest() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(format!("sha256:{}", "a".repeat(64)))),
        Just(json!(format!("sha256:{}", "A".repeat(64)))),
        Just(json!("sha256:")),
        Just(json!("sha512:abc")),
        Just(json!(format!("sha256:{}/../x", "a".repeat(64)))),
        Just(json!(null)),
        Just(json!(12)),
        "[a-z0-9:]{0,80}".prop_map(Value::String),
    ]
}

fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!("10")),
        Just(json!(null)),
        any::<i64>().prop_map(|n| json!(n)),
    ]
}

fn descriptor() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(MEDIA_TYPES.to_vec()),
        digest(),
        size(),
        proptest::option::of((text(), text(), text())),
    )
        .prop_map(|(media_type, digest, size, platform)| {
            let mut d = json!({"mediaType": media_type, "digest": digest, "size": size});
            if let Some((os, architecture, variant)) = platform {
                d["platform"] = json!({"os": os, "architecture": architecture, "variant": variant});
            }
            d
        })
}

fn document() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!(2)),
            Just(json!(1)),
            Just(json!(null)),
            any::<i64>().prop_map(|n| json!(n))
        ],
        prop::sample::select(MEDIA_TYPES.to_vec()),
        proptest::option::of(proptest::collection::vec(descriptor(), 0..6)),
        proptest::option::of(descriptor()),
        proptest::option::of(proptest::collection::vec(descriptor(), 0..6)),
    )
        .prop_map(|(schema, media_type, manifests, config, layers)| {
            let mut doc = json!({"schemaVersion": schema, "mediaType": media_type});
            if let Some(m) = manifests {
                doc["manifests"] = Value::Array(m);
            }
            if let Some(c) = config {
                doc["config"] = c;
            }
            if let Some(l) = layers {
                doc["layers"] = Value::Array(l);
            }
            doc
        })
}

fn config() -> impl Strategy<Value = Value> {
    (
        text(),
        text(),
        text(),
        text(),
        proptest::option::of(proptest::collection::vec(digest(), 0..5)),
    )
        .prop_map(|(os, architecture, variant, kind, diff_ids)| {
            json!({"os": os, "architecture": architecture, "variant": variant,
                   "rootfs": {"type": kind, "diff_ids": diff_ids}})
        })
}

fn check_parsed(bytes: &[u8]) {
    let digest = Digest::of(bytes);
    for media_type in MEDIA_TYPES {
        match manifest::parse(&digest, media_type, bytes) {
            Ok(Parsed::Index(entries)) => {
                for e in &entries {
                    // Accepted digests are well-formed (they name blob files).
                    let text = e.descriptor.digest.as_str();
                    assert!(text.parse::<Digest>().is_ok(), "{text}");
                    assert!(!text.contains('/'), "{text}");
                }
                let want = pb::Platform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    ..Default::default()
                };
                if let Some(chosen) = manifest::select_platform(&entries, &want) {
                    let have = chosen
                        .platform
                        .as_ref()
                        .expect("chosen entries have a platform");
                    assert!(manifest::platform_matches(&want, have), "{have:?}");
                }
            }
            Ok(Parsed::Manifest { config, layers }) => {
                for d in std::iter::once(&config).chain(&layers) {
                    assert!(!d.digest.as_str().contains('/'), "{:?}", d.digest);
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    if let Ok(summary) = ConfigSummary::parse(bytes) {
        let _ = summary.platform();
        let _ = chain_id(&summary.diff_ids);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn manifest_shaped_documents(doc in document()) {
        check_parsed(doc.to_string().as_bytes());
    }

    #[test]
    fn config_shaped_documents(doc in config()) {
        check_parsed(doc.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_parsed(&bytes);
    }
}

/// Deeply nested JSON is an error (serde_json's recursion limit), not a stack overflow.
#[test]
fn deeply_nested_documents_are_errors() {
    for doc in [
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!(
            "{{\"manifests\":{}{}}}",
            "[".repeat(50_000),
            "]".repeat(50_000)
        ),
        format!(
            "{{\"rootfs\":{{\"diff_ids\":{}{}}}}}",
            "[".repeat(50_000),
            "]".repeat(50_000)
        ),
    ] {
        check_parsed(doc.as_bytes());
    }
}
