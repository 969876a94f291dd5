//! The shared BuildKit v0.11.6 vectors: every `conformance/dockerfile/*` case and every
//! `conformance/dockerfiles/df*.Dockerfile` converted by kiln must give BuildKit's ops
//! (compared as a set keyed by digest), op metadata, image config and error texts.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_dockerfile::{
    ConvertOptions, ImageMetaResolver, ResolveImageConfigOptions, ResolvedImageConfig,
    dockerfile_to_llb,
};
use kiln_proto::pb;

/// Resolves `…/<name>:<tag>` from the shared OCI layout by its `ref.name` annotation.
struct LayoutResolver {
    root: PathBuf,
}

impl LayoutResolver {
    fn new() -> Self {
        LayoutResolver {
            root: kiln_testsupport::shared_dir().join("conformance/image/oci"),
        }
    }

    fn blob(&self, digest: &str) -> std::io::Result<Vec<u8>> {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read(self.root.join("blobs/sha256").join(hex))
    }
}

#[async_trait::async_trait]
impl ImageMetaResolver for LayoutResolver {
    async fn resolve_image_config(
        &self,
        reference: &str,
        opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String> {
        assert_eq!(opts.platform.os, "linux");
        assert!(opts.log_name.starts_with("[internal] load metadata for "));
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let name = name.split([':', '@']).next().unwrap_or(name);
        if !reference.starts_with("localhost:5000/") {
            return Err(format!(
                "failed to resolve source metadata for {reference}: not found"
            ));
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.root.join("index.json")).unwrap()).unwrap();
        let manifest_digest = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| format!("{reference}: not found"))?
            .to_owned();
        let manifest: serde_json::Value =
            serde_json::from_slice(&self.blob(&manifest_digest).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let config_digest = manifest["config"]["digest"].as_str().unwrap();
        Ok(ResolvedImageConfig {
            digest: Some(manifest_digest),
            config: self.blob(config_digest).map_err(|e| e.to_string())?,
        })
    }
}

fn shared() -> PathBuf {
    kiln_testsupport::shared_dir().join("conformance")
}

fn decode(bytes: &[u8]) -> (pb::Definition, BTreeMap<String, pb::Op>) {
    let def = kiln_proto::decode_definition(bytes).unwrap();
    let ops = kiln_proto::decode_ops(&def)
        .unwrap()
        .into_iter()
        .map(|o| (o.digest.to_string(), o.op))
        .collect();
    (def, ops)
}

/// The `local.unique` BuildKit drew for the reference (random per marshal).
fn local_unique(ops: &BTreeMap<String, pb::Op>) -> Option<String> {
    ops.values().find_map(|op| match &op.op {
        Some(pb::op::Op::Source(s)) => s.attrs.get("local.unique").cloned(),
        _ => None,
    })
}

/// Metadata with progress-group IDs blanked (BuildKit draws them at random).
fn comparable(md: &pb::OpMetadata) -> pb::OpMetadata {
    let mut md = md.clone();
    if let Some(pg) = &mut md.progress_group {
        pg.id = String::new();
    }
    md
}

/// Compares two Definitions: ops as a set by digest, metadata per digest and the source
/// section's keys; returns a readable report of every difference.
fn compare_definitions(want_bytes: &[u8], got: &pb::Definition) -> Vec<String> {
    let (want_def, want_ops) = decode(want_bytes);
    let got_ops: BTreeMap<String, pb::Op> = kiln_proto::decode_ops(got)
        .unwrap()
        .into_iter()
        .map(|o| (o.digest.to_string(), o.op))
        .collect();
    let mut problems = Vec::new();
    let want_keys: BTreeSet<&String> = want_ops.keys().collect();
    let got_keys: BTreeSet<&String> = got_ops.keys().collect();
    for missing in want_keys.difference(&got_keys) {
        problems.push(format!(
            "missing op {missing}:\n  want {:?}\n  meta {:?}",
            want_ops[*missing],
            want_def.metadata.get(*missing)
        ));
    }
    for extra in got_keys.difference(&want_keys) {
        problems.push(format!(
            "unexpected op {extra}:\n  got  {:?}\n  meta {:?}",
            got_ops[*extra],
            got.metadata.get(*extra)
        ));
    }
    for digest in want_keys.intersection(&got_keys) {
        let want = want_def.metadata.get(*digest).map(comparable);
        let have = got.metadata.get(*digest).map(comparable);
        if want != have {
            problems.push(format!(
                "metadata of {digest} differs:\n  want {want:?}\n  got  {have:?}"
            ));
        }
    }
    if want_def.metadata.len() != got.metadata.len() {
        problems.push(format!(
            "metadata entries: want {}, got {}",
            want_def.metadata.len(),
            got.metadata.len()
        ));
    }
    let want_locs: Option<Vec<&String>> = want_def
        .source
        .as_ref()
        .map(|s| s.locations.keys().collect());
    let got_locs: Option<Vec<&String>> = got.source.as_ref().map(|s| s.locations.keys().collect());
    if want_locs != got_locs {
        problems.push(format!(
            "source locations differ:\n  want {want_locs:?}\n  got  {got_locs:?}"
        ));
    }
    // Progress groups pair a link's copy with its merge: the same ID within a Definition.
    let ids: BTreeSet<&str> = got
        .metadata
        .values()
        .filter_map(|m| m.progress_group.as_ref().map(|p| p.id.as_str()))
        .collect();
    let groups = got
        .metadata
        .values()
        .filter(|m| m.progress_group.is_some())
        .count();
    if groups != ids.len() * 2 {
        problems.push(format!(
            "progress groups should come in pairs: {groups} entries, {} ids",
            ids.len()
        ));
    }
    problems
}

fn options_for(case: &Path, ref_ops: Option<&BTreeMap<String, pb::Op>>) -> ConvertOptions {
    let mut opts = ConvertOptions {
        target_platform: None,
        build_platforms: vec![pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }],
        local_unique_id: ref_ops.and_then(local_unique),
        ..Default::default()
    };
    if let Ok(text) = std::fs::read(case.join("opts.json")) {
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        if let Some(t) = v["target"].as_str() {
            opts.target = Some(t.to_owned());
        }
        for (key, field) in [
            ("build_args", &mut opts.build_args),
            ("labels", &mut opts.labels),
        ] {
            if let Some(map) = v[key].as_object() {
                for (k, val) in map {
                    field.insert(k.clone(), val.as_str().unwrap().to_owned());
                }
            }
        }
    }
    opts
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(shared().join("dockerfile"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[tokio::test]
async fn dockerfile_cases_match_buildkit() {
    let resolver = LayoutResolver::new();
    let cases = case_dirs();
    assert_eq!(cases.len(), 22, "the shared set has 22 cases");
    let mut failures = Vec::new();
    let (mut digests, mut configs, mut errors, mut identical) = (0, 0, 0, 0);
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let dockerfile = std::fs::read(case.join("Dockerfile")).unwrap();
        if let Ok(expected) = std::fs::read_to_string(case.join("expect.error")) {
            let expected = expected.trim();
            let opts = options_for(case, None);
            match dockerfile_to_llb(&dockerfile, &opts, &resolver).await {
                Ok(_) => failures.push(format!("{name}: converted, want error {expected:?}")),
                Err(e) => {
                    let got = e.to_string();
                    let ok = if name.starts_with("e02") {
                        got.contains(expected)
                    } else {
                        got == expected
                    };
                    if ok {
                        errors += 1;
                    } else {
                        failures.push(format!("{name}: error {got:?}, want {expected:?}"));
                    }
                }
            }
            continue;
        }
        let want = std::fs::read(case.join("ref.pb")).unwrap();
        let (_, ref_ops) = decode(&want);
        let opts = options_for(case, Some(&ref_ops));
        let converted = match dockerfile_to_llb(&dockerfile, &opts, &resolver).await {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let problems = compare_definitions(&want, &converted.definition);
        if problems.is_empty() {
            digests += 1;
        } else {
            failures.push(format!("{name}:\n{}", problems.join("\n")));
        }
        // The marshaled bytes decode to the same Definition.
        let (round, _) = decode(&converted.definition_bytes());
        assert_eq!(round, converted.definition, "{name}: encoding round trip");
        // Compared as JSON values, and byte for byte (Go's field order and escaping).
        let want_json = std::fs::read(case.join("ref.image.json")).unwrap();
        let got_json = converted.image_config_json();
        let want_image: serde_json::Value = serde_json::from_slice(&want_json).unwrap();
        let got_image: serde_json::Value = serde_json::from_slice(&got_json).unwrap();
        if want_image != got_image {
            failures.push(format!(
                "{name}: image config differs:\n  want {want_image}\n  got  {got_image}"
            ));
        } else if want_json != got_json {
            failures.push(format!(
                "{name}: image config bytes differ:\n  want {}\n  got  {}",
                String::from_utf8_lossy(&want_json),
                String::from_utf8_lossy(&got_json)
            ));
        } else {
            configs += 1;
        }
        // Without parallel branches the op order is fixed too: the whole Definition is
        // BuildKit's, byte for byte.
        if converted.definition_bytes() == want {
            identical += 1;
        }
    }
    eprintln!(
        "digests {digests}/17, image configs {configs}/17, errors {errors}/5, \
         byte-identical Definitions {identical}/17"
    );
    // The others differ only in op order (BuildKit walks parallel inputs in map order) or
    // in random progress-group IDs; this guards against regressions in the rest.
    assert!(
        identical >= 12,
        "only {identical} Definitions are byte-identical"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn dockerfile_corpus_regenerates_defs() {
    let resolver = LayoutResolver::new();
    let dir = shared().join("dockerfiles");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 9);
    let mut failures = Vec::new();
    for file in &files {
        let stem = file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".Dockerfile")
            .to_owned();
        let want = std::fs::read(shared().join("defs").join(format!("{stem}.pb"))).unwrap();
        let (_, ref_ops) = decode(&want);
        let opts = options_for(&dir, Some(&ref_ops));
        let dockerfile = std::fs::read(file).unwrap();
        match dockerfile_to_llb(&dockerfile, &opts, &resolver).await {
            Ok(c) => {
                let problems = compare_definitions(&want, &c.definition);
                if !problems.is_empty() {
                    failures.push(format!("{stem}:\n{}", problems.join("\n")));
                }
            }
            Err(e) => failures.push(format!("{stem}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
