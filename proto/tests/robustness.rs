//! Hostile input never panics the decoder or loader (BuildKit CVE-2024-23650 class):
//! random bytes, corpus Definitions with random mutations, and very deep graphs.

use kiln_proto::encode::GogoEncode;
use kiln_proto::{Digest, Entitlements, LoadOptions, decode_definition, load, pb};
use kiln_testsupport::conformance_defs;
use proptest::prelude::*;

fn load_any(bytes: &[u8]) {
    if let Ok(def) = decode_definition(bytes) {
        let options = LoadOptions {
            entitlements: Entitlements::all(),
            ..Default::default()
        };
        let _ = load(&def, &options);
    }
}

fn corpus() -> Vec<Vec<u8>> {
    conformance_defs()
        .into_iter()
        .map(|(_, path)| std::fs::read(path).expect("read definition"))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        load_any(&bytes);
    }

    #[test]
    fn mutated_corpus_definitions_never_panic(
        which in 0usize..40,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let corpus = corpus();
        let mut bytes = corpus[which % corpus.len()].clone();
        for (index, value) in flips {
            let i = index.index(bytes.len());
            bytes[i] ^= value;
        }
        if let Some(cut) = truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        load_any(&bytes);
    }

    #[test]
    fn mutated_ops_inside_valid_definitions_never_panic(
        which in 0usize..40,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let corpus = corpus();
        let mut def = decode_definition(&corpus[which % corpus.len()]).expect("corpus decodes");
        for (op, byte, value) in flips {
            let op = op.index(def.def.len());
            if def.def[op].is_empty() {
                continue;
            }
            let i = byte.index(def.def[op].len());
            def.def[op][i] ^= value;
        }
        load_any(&def.gogo_encode());
    }
}

#[test]
fn a_very_deep_chain_loads_without_exhausting_the_stack() {
    let mut ops = vec![pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: "docker-image://docker.io/library/busybox:latest".into(),
            ..Default::default()
        })),
        ..Default::default()
    }];
    for i in 0..50_000 {
        let previous = Digest::of(&ops[ops.len() - 1].gogo_encode());
        ops.push(pb::Op {
            inputs: vec![pb::Input {
                digest: previous.as_str().to_owned(),
                index: 0,
            }],
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["true".into(), i.to_string()],
                    ..Default::default()
                }),
                mounts: vec![pb::Mount {
                    dest: "/".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    let last = Digest::of(&ops[ops.len() - 1].gogo_encode());
    ops.push(pb::Op {
        inputs: vec![pb::Input {
            digest: last.as_str().to_owned(),
            index: 0,
        }],
        ..Default::default()
    });
    let def = pb::Definition {
        def: ops.iter().map(GogoEncode::gogo_encode).collect(),
        ..Default::default()
    };
    let graph = load(&def, &LoadOptions::default()).expect("deep chain loads");
    assert_eq!(graph.vertices().len(), 50_001);
    // Dependency order: every vertex comes after its inputs.
    for (i, vertex) in graph.vertices().iter().enumerate() {
        assert!(vertex.inputs.iter().all(|e| e.vertex.0 < i));
    }
}
