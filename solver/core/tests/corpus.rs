//! Every exec and file CacheMap of the 40 shared Definitions equals what BuildKit v0.11.6
//! computed (`.llbref.json`): digest, hashed JSON, the legacy root rule and every dep.

use kiln_proto::{Entitlements, LoadOptions, OpKind, decode_definition, load, pb};
use kiln_solver::cachemap::{self, SourceContext, exec};
use kiln_testsupport::{conformance_defs, shared_dir};
use serde_json::Value;

fn reference(name: &str) -> Value {
    let path = shared_dir().join(format!("conformance/defs/{name}.llbref.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("read llbref")).expect("parse llbref")
}

#[test]
fn every_exec_and_file_cache_map_matches_buildkit() {
    let options = LoadOptions {
        entitlements: Entitlements::all(),
        default_platform: pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        },
    };
    let (mut exec_digests, mut deps_checked, mut file_digests) = (0, 0, 0);
    for (name, path) in conformance_defs() {
        let def = decode_definition(&std::fs::read(&path).expect("read")).expect("decode");
        let graph = load(&def, &options).unwrap_or_else(|e| panic!("{name}: load: {e}"));
        let want = reference(&name);
        let ops = want["ops"].as_array().expect("ops");
        for vertex in graph.vertices() {
            let reference_op = ops
                .iter()
                .find(|op| op["digest"] == vertex.digest.as_str())
                .unwrap_or_else(|| panic!("{name}: {} not in llbref", vertex.digest));
            let ctx = format!("{name} {} ({})", vertex.digest, vertex.name);
            let cm = cachemap::offline_cache_map(vertex, &SourceContext::default())
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            match vertex.kind() {
                OpKind::Exec => {
                    let cm = cm.expect("exec ops always have a CacheMap");
                    let want = &reference_op["exec_cache_map"];
                    assert_eq!(
                        String::from_utf8(cm.hashed.clone().expect("hashed")).expect("utf-8"),
                        want["json"].as_str().expect("json"),
                        "{ctx}: hashed JSON"
                    );
                    assert_eq!(cm.digest.as_str(), want["digest"], "{ctx}: digest");
                    exec_digests += 1;
                    let Some(pb::op::Op::Exec(e)) = &vertex.op.op else {
                        unreachable!()
                    };
                    assert_eq!(
                        exec::root_mount_elided(e),
                        want["root_mount_elided"] == true,
                        "{ctx}: root_mount_elided"
                    );
                    let want_deps = want["deps"].as_array().expect("deps");
                    assert_eq!(cm.deps.len(), want_deps.len(), "{ctx}: dep count");
                    for (i, (dep, want_dep)) in cm.deps.iter().zip(want_deps).enumerate() {
                        assert_eq!(
                            dep.selector_str(),
                            want_dep["selector_digest"],
                            "{ctx}: deps[{i}] selector"
                        );
                        assert_eq!(
                            dep.content_based(),
                            want_dep["has_compute_digest_func"] == true,
                            "{ctx}: deps[{i}] content-based"
                        );
                        assert_eq!(
                            dep.content_based(),
                            want_dep["no_content_based_hash"] == false,
                            "{ctx}: deps[{i}] no_content_based_hash"
                        );
                        let paths: Vec<Value> = dep
                            .content
                            .iter()
                            .flatten()
                            .map(|s| Value::String(s.path.clone()))
                            .collect();
                        assert_eq!(
                            Value::Array(paths),
                            want_dep["content_hash_selectors"],
                            "{ctx}: deps[{i}] content selectors"
                        );
                        assert_eq!(dep.preprocess, want_dep["has_preprocess_func"] == true);
                        deps_checked += 1;
                    }
                }
                OpKind::File => {
                    let cm = cm.expect("file ops always have a CacheMap");
                    assert_eq!(
                        cm.digest.as_str(),
                        reference_op["file_cache_map_digest"],
                        "{ctx}: file digest"
                    );
                    file_digests += 1;
                }
                OpKind::Source => {
                    // Corpus sources are registry images: resolved at solve time.
                    assert!(cm.is_none(), "{ctx}: images need resolution");
                }
                other => panic!("{ctx}: unexpected op kind {other:?}"),
            }
        }
    }
    eprintln!(
        "matched {exec_digests} exec digests, {deps_checked} deps, {file_digests} file digests"
    );
    assert_eq!(exec_digests, 138, "every exec op of the corpus was checked");
    assert_eq!(file_digests, 7, "every file op of the corpus was checked");
    assert!(deps_checked >= exec_digests);
}
