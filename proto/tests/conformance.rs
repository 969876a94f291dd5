//! Every Definition BuildKit produced in ../shared/conformance/defs decodes, digests, loads
//! and re-encodes exactly as BuildKit's own code saw it (the `.llbref.json` files).

use kiln_proto::encode::GogoEncode;
use kiln_proto::gojson::to_go_json;
use kiln_proto::{Entitlements, LoadOptions, OpKind, decode_definition, decode_ops, load, pb};
use kiln_testsupport::{conformance_defs, shared_dir};
use serde_json::Value;

fn reference(name: &str) -> Value {
    let path = shared_dir().join(format!("conformance/defs/{name}.llbref.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("read llbref")).expect("parse llbref")
}

fn amd64() -> pb::Platform {
    pb::Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    }
}

fn type_name(op: &pb::Op) -> &'static str {
    match OpKind::of(op) {
        OpKind::Unknown => "none",
        kind => kind.as_str(),
    }
}

#[test]
fn corpus_has_forty_definitions() {
    assert_eq!(conformance_defs().len(), 40);
}

#[test]
fn every_op_digest_type_and_input_matches_buildkit() {
    for (name, path) in conformance_defs() {
        let bytes = std::fs::read(&path).expect("read definition");
        let def = decode_definition(&bytes).expect("decode definition");
        let want = reference(&name);
        let ops = decode_ops(&def).expect("decode ops");
        let want_ops = want["ops"].as_array().expect("ops array");
        assert_eq!(ops.len(), want_ops.len(), "{name}: op count");
        for (position, (got, want)) in ops.iter().zip(want_ops).enumerate() {
            let ctx = format!("{name} op #{position}");
            assert_eq!(got.digest.as_str(), want["digest"], "{ctx}: digest");
            assert_eq!(type_name(&got.op), want["type"], "{ctx}: type");
            let inputs: Vec<Value> = got
                .op
                .inputs
                .iter()
                .map(|i| serde_json::json!({"digest": i.digest, "index": i.index}))
                .collect();
            assert_eq!(Value::Array(inputs), want["inputs"], "{ctx}: inputs");
            assert_eq!(
                got.encoded_len as u64, want["op_bytes_len"],
                "{ctx}: length"
            );
        }
        assert_eq!(
            ops.last().map(|o| o.digest.as_str()),
            want["terminal_digest"].as_str(),
            "{name}: terminal"
        );
    }
}

#[test]
fn gogo_encoding_reproduces_every_op_and_definition_byte_for_byte() {
    for (name, path) in conformance_defs() {
        let bytes = std::fs::read(&path).expect("read definition");
        let def = decode_definition(&bytes).expect("decode definition");
        for (raw, op) in def.def.iter().zip(decode_ops(&def).expect("decode ops")) {
            assert_eq!(
                &op.op.gogo_encode(),
                raw,
                "{name}: op {} re-encodes",
                op.digest
            );
        }
        assert_eq!(def.gogo_encode(), bytes, "{name}: definition re-encodes");
    }
}

#[test]
fn loaded_graph_matches_names_platforms_and_op_bodies() {
    let options = LoadOptions {
        entitlements: Entitlements::all(),
        default_platform: amd64(),
    };
    for (name, path) in conformance_defs() {
        let def = decode_definition(&std::fs::read(&path).expect("read")).expect("decode");
        let want = reference(&name);
        let graph = load(&def, &options).unwrap_or_else(|e| panic!("{name}: load: {e}"));
        let target = graph.target();
        assert_eq!(
            graph.vertex(target.vertex).digest.as_str(),
            want["terminal_input"]["digest"],
            "{name}: target"
        );
        assert_eq!(
            target.index, want["terminal_input"]["index"],
            "{name}: index"
        );
        for vertex in graph.vertices() {
            let ops = want["ops"].as_array().expect("ops");
            let reference_op = ops
                .iter()
                .find(|op| op["digest"] == vertex.digest.as_str())
                .unwrap_or_else(|| panic!("{name}: {} not in llbref", vertex.digest));
            let ctx = format!("{name} {}", vertex.digest);
            assert_eq!(vertex.name, reference_op["name"], "{ctx}: name");
            let platform = vertex.platform().expect("normalised platform");
            let loaded = &reference_op["loaded_platform"];
            assert_eq!(platform.os, loaded["os"], "{ctx}: os");
            assert_eq!(platform.architecture, loaded["architecture"], "{ctx}: arch");
            assert_eq!(
                platform.variant,
                loaded["variant"].as_str().unwrap_or(""),
                "{ctx}: variant"
            );
            let (key, body) = match &vertex.op.op {
                Some(pb::op::Op::Exec(e)) => ("exec", to_go_json(e)),
                Some(pb::op::Op::File(f)) => ("file", to_go_json(f)),
                Some(pb::op::Op::Source(s)) => ("source", to_go_json(s)),
                other => panic!("{ctx}: unexpected op kind {other:?}"),
            };
            let body: Value = serde_json::from_slice(&body).expect("our JSON parses");
            assert_eq!(body, reference_op[key], "{ctx}: Go JSON of the {key} body");
            let inputs: Vec<_> = vertex
                .inputs
                .iter()
                .map(|e| graph.vertex(e.vertex).digest.as_str().to_owned())
                .collect();
            let want_inputs: Vec<_> = reference_op["inputs"]
                .as_array()
                .expect("inputs")
                .iter()
                .map(|i| i["digest"].as_str().unwrap_or_default().to_owned())
                .collect();
            assert_eq!(inputs, want_inputs, "{ctx}: edges");
        }
    }
}
