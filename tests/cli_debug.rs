//! `kiln debug dump-llb` driven as a user would: the binary, stdin or a file, exit status.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kiln_proto::encode::GogoEncode;
use kiln_proto::{Digest, pb};
use kiln_testsupport::shared_dir;
use serde_json::Value;

fn kiln(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait kiln")
}

fn assert_one_line_error(output: &Output, contains: &str) {
    assert_eq!(output.status.code(), Some(1), "exit status");
    assert!(output.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(
        stderr.contains(contains),
        "{stderr:?} should contain {contains:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr:?}");
}

#[test]
fn dump_llb_prints_one_line_per_op_with_buildkit_digests() {
    let path = shared_dir().join("conformance/defs/df11_many_runs.pb");
    let bytes = std::fs::read(&path).expect("read df11");
    let output = kiln(&["debug", "dump-llb"], &bytes);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: Value = serde_json::from_slice(
        &std::fs::read(shared_dir().join("conformance/defs/df11_many_runs.llbref.json"))
            .expect("read llbref"),
    )
    .expect("parse llbref");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let ops = reference["ops"].as_array().expect("ops");
    assert_eq!(lines.len(), ops.len());
    for (line, op) in lines.iter().zip(ops) {
        assert_eq!(line["digest"], op["digest"]);
        assert_eq!(line["inputs"], op["inputs"]);
        let want_type = if op["terminal"] == true {
            "terminal"
        } else {
            op["type"].as_str().expect("type")
        };
        assert_eq!(line["type"], want_type);
        if let Some(exec) = op.get("exec") {
            assert_eq!(&line["op"], exec);
        }
        assert_eq!(line["metadata"], op["metadata"]);
    }
    // The same through a file argument.
    let by_file = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["debug", "dump-llb"])
        .arg(&path)
        .output()
        .expect("run kiln");
    assert!(by_file.status.success());
    assert_eq!(
        by_file.stdout.iter().filter(|&&b| b == b'\n').count(),
        ops.len()
    );
}

#[test]
fn dump_llb_dot_draws_every_edge() {
    let bytes = std::fs::read(shared_dir().join("conformance/defs/df03_multistage_copy_from.pb"))
        .expect("read");
    let output = kiln(&["debug", "dump-llb", "--dot"], &bytes);
    assert!(output.status.success());
    let dot = String::from_utf8(output.stdout).expect("utf-8");
    assert!(dot.starts_with("digraph llb {"));
    assert!(dot.trim_end().ends_with('}'));
    // 6 vertices with 7 input edges, plus the edge to the target.
    assert_eq!(dot.matches(" -> ").count(), 8, "{dot}");
}

fn image() -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: "docker-image://docker.io/library/busybox:latest".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn on(input: &pb::Op, body: Option<pb::op::Op>) -> pb::Op {
    pb::Op {
        inputs: vec![pb::Input {
            digest: Digest::of(&input.gogo_encode()).as_str().to_owned(),
            index: 0,
        }],
        op: body,
        ..Default::default()
    }
}

fn def_bytes(ops: &[&pb::Op]) -> Vec<u8> {
    pb::Definition {
        def: ops.iter().map(|op| op.gogo_encode()).collect(),
        ..Default::default()
    }
    .gogo_encode()
}

#[test]
fn malformed_input_gets_a_one_line_error() {
    let src = image();
    let exec = |security: i32| {
        Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![pb::Mount {
                dest: "/".into(),
                ..Default::default()
            }],
            security,
            ..Default::default()
        }))
    };
    let good = on(&src, exec(0));
    let unknown_enum = on(&src, exec(99));
    let mut dangling = good.clone();
    dangling.inputs[0].digest = format!("sha256:{}", "ab".repeat(32));
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("empty", Vec::new(), "invalid empty definition".into()),
        (
            "garbage",
            b"\x0f\xff\xfe garbage".to_vec(),
            "failed to parse definition".into(),
        ),
        (
            "one op",
            def_bytes(&[&src]),
            "invalid LLB with 1 vertexes".into(),
        ),
        (
            "dangling input",
            def_bytes(&[&src, &dangling, &on(&dangling, None)]),
            format!("invalid missing input digest sha256:{}", "ab".repeat(32)),
        ),
        (
            "terminal without inputs",
            def_bytes(&[&src, &image_named("other")]),
            "invalid LLB with no inputs on last vertex".into(),
        ),
        (
            "unknown enum",
            def_bytes(&[&src, &unknown_enum, &on(&unknown_enum, None)]),
            "exec.security has unknown value 99".into(),
        ),
    ];
    for (what, bytes, message) in cases {
        let output = kiln(&["debug", "dump-llb"], &bytes);
        eprintln!("case: {what}");
        assert_one_line_error(&output, &message);
    }
    let ok = kiln(
        &["debug", "dump-llb"],
        &def_bytes(&[&src, &good, &on(&good, None)]),
    );
    assert!(ok.status.success());
}

fn image_named(name: &str) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: format!("docker-image://docker.io/library/{name}:latest"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn missing_file_and_bad_flags_are_errors() {
    let output = kiln(&["debug", "dump-llb", "/nonexistent/def.pb"], b"");
    assert_one_line_error(&output, "/nonexistent/def.pb");
    let output = kiln(&["debug", "dump-llb", "--no-such-flag"], b"");
    assert_ne!(output.status.code(), Some(0));
}
