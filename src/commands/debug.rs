//! `kiln debug …`: views of a Definition for people and scripts.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use kiln_proto::gojson::{GoJson, ObjectWriter, to_go_json};
use kiln_proto::{Entitlements, LoadOptions, OpKind, decode_definition, decode_ops, load, pb};

use super::read_input;
use crate::cli::{DebugCommand, DumpLlbArgs};

pub fn run(command: DebugCommand) -> anyhow::Result<ExitCode> {
    match command {
        DebugCommand::DumpLlb(args) => dump_llb(&args),
    }
}

fn dump_llb(args: &DumpLlbArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_input(args.file.as_deref())?;
    let def = decode_definition(&bytes).context("failed to load LLB")?;
    // Validate like a build would (entitlements are not this view's concern).
    let options = LoadOptions {
        entitlements: Entitlements::all(),
        ..Default::default()
    };
    let graph = load(&def, &options).context("failed to load LLB")?;
    let ops = decode_ops(&def).context("failed to load LLB")?;
    let mut out = std::io::stdout().lock();
    if args.dot {
        writeln!(out, "digraph llb {{")?;
        writeln!(out, "  rankdir=BT;")?;
        for vertex in graph.vertices() {
            let label = format!(
                "{}\\n{}",
                dot_escape(&vertex.name),
                &vertex.digest.hex()[..12]
            );
            writeln!(
                out,
                "  \"{}\" [label=\"{label}\" shape={}];",
                vertex.digest,
                if vertex.kind() == OpKind::Exec {
                    "box"
                } else {
                    "ellipse"
                }
            )?;
            for edge in &vertex.inputs {
                writeln!(
                    out,
                    "  \"{}\" -> \"{}\" [label=\"{}\"];",
                    graph.vertex(edge.vertex).digest,
                    vertex.digest,
                    edge.index
                )?;
            }
        }
        let target = graph.target();
        writeln!(out, "  \"target\" [shape=doublecircle];")?;
        writeln!(
            out,
            "  \"{}\" -> \"target\" [label=\"{}\"];",
            graph.vertex(target.vertex).digest,
            target.index
        )?;
        writeln!(out, "}}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let last = ops.len().saturating_sub(1);
    for (position, op) in ops.iter().enumerate() {
        let kind = if position == last {
            "terminal"
        } else {
            OpKind::of(&op.op).as_str()
        };
        let mut line = Vec::new();
        let mut obj = ObjectWriter::new(&mut line);
        obj.string_always("digest", op.digest.as_str())
            .string_always("type", kind);
        write_list(obj.key("inputs"), &op.op.inputs);
        let body = obj.key("op");
        match (&op.op.op, position == last) {
            (Some(body_op), false) => write_body(body, body_op),
            _ => body.extend_from_slice(b"null"),
        }
        let platform = obj.key("platform");
        match &op.op.platform {
            Some(p) => p.write_go_json(platform),
            None => platform.extend_from_slice(b"null"),
        }
        let metadata = def
            .metadata
            .get(op.digest.as_str())
            .cloned()
            .unwrap_or_default();
        metadata.write_go_json(obj.key("metadata"));
        obj.finish();
        line.push(b'\n');
        out.write_all(&line)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_list(out: &mut Vec<u8>, inputs: &[pb::Input]) {
    out.push(b'[');
    for (i, input) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        input.write_go_json(out);
    }
    out.push(b']');
}

fn write_body(out: &mut Vec<u8>, op: &pb::op::Op) {
    let json = match op {
        pb::op::Op::Exec(e) => to_go_json(e),
        pb::op::Op::Source(s) => to_go_json(s),
        pb::op::Op::File(f) => to_go_json(f),
        pb::op::Op::Build(b) => to_go_json(b),
        pb::op::Op::Merge(m) => to_go_json(m),
        pb::op::Op::Diff(d) => to_go_json(d),
    };
    out.extend_from_slice(&json);
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
