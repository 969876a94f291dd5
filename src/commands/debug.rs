//! `kiln debug …`: views of a Definition for people and scripts.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use kiln_proto::gojson::{GoJson, ObjectWriter, to_go_json, write_string};
use kiln_proto::{Entitlements, LoadOptions, OpKind, decode_definition, decode_ops, load, pb};
use kiln_solver::cachemap::{self, SourceContext, diff};

use crate::cli::{CachemapArgs, DebugCommand, Dockerfile2llbArgs, DumpLlbArgs};
use crate::commands::frontend::{self, DockerfileRequest};
use crate::input::read_input;

pub fn run(
    root: &std::path::Path,
    config: &std::path::Path,
    command: DebugCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        DebugCommand::DumpLlb(args) => dump_llb(&args),
        DebugCommand::Cachemap(args) => cachemap(&args),
        DebugCommand::Dockerfile2llb(args) => dockerfile2llb(root, config, &args),
    }
}

/// A Dockerfile on standard input to its Definition on standard output (and the image
/// config to `--image-config`), with base images resolved as `kiln build` resolves them.
fn dockerfile2llb(
    root: &std::path::Path,
    config: &std::path::Path,
    args: &Dockerfile2llbArgs,
) -> anyhow::Result<ExitCode> {
    let dockerfile = read_input(None)?;
    let mut opts = std::collections::BTreeMap::new();
    frontend::add_docker_opts(
        &mut opts,
        args.target.as_deref(),
        &args.build_arg,
        &args.label,
    )?;
    let request = DockerfileRequest {
        dockerfile,
        dockerignore: None,
        opts,
    };
    let images = kiln_registry::ImageResolver::new(
        root,
        kiln_registry::RegistryHosts::load(config)?,
        kiln_registry::Credentials::load_default()?,
        std::collections::HashMap::new(),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let resolver = frontend::RegistryMetaResolver { images: &images };
    // No session: the context source gets a random `local.unique`, as in BuildKit's example.
    let converted = runtime.block_on(frontend::convert(&request, "", &resolver))?;
    if let Some(path) = &args.image_config {
        std::fs::write(path, converted.image_config_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&converted.definition_bytes())
        .and_then(|()| out.flush())
        .context("writing the definition")?;
    Ok(ExitCode::SUCCESS)
}

/// Loads a Definition as a build would, but with every entitlement (not this view's
/// concern); also returns the decoded ops in definition order.
fn load_for_view(
    file: Option<&std::path::Path>,
) -> anyhow::Result<(Vec<kiln_proto::load::DecodedOp>, kiln_proto::Graph)> {
    let bytes = read_input(file)?;
    let def = decode_definition(&bytes).context("failed to load LLB")?;
    let options = LoadOptions {
        entitlements: Entitlements::all(),
        ..Default::default()
    };
    let graph = load(&def, &options).context("failed to load LLB")?;
    let ops = decode_ops(&def).context("failed to load LLB")?;
    Ok((ops, graph))
}

fn cachemap(args: &CachemapArgs) -> anyhow::Result<ExitCode> {
    let sources = SourceContext {
        session_id: Some(args.session.clone()),
    };
    if let Some(files) = &args.diff {
        let [old, new] = files.as_slice() else {
            anyhow::bail!("--diff takes two files: OLD.pb NEW.pb");
        };
        return cachemap_diff(old, new, &sources);
    }
    let (ops, graph) = load_for_view(args.file.as_deref())?;
    let mut out = std::io::stdout().lock();
    let last = ops.len().saturating_sub(1);
    for (position, op) in ops.iter().enumerate() {
        let terminal = position == last;
        let kind = if terminal {
            "terminal"
        } else {
            OpKind::of(&op.op).as_str()
        };
        // The terminal and ops the target does not reach are not vertices.
        let vertex = graph
            .find(&op.digest)
            .filter(|_| !terminal)
            .map(|id| graph.vertex(id));
        let cm = match vertex {
            Some(vertex) => cachemap::offline_cache_map(vertex, &sources)
                .with_context(|| format!("cache map of op {} ({})", op.digest, vertex.name))?,
            None => None,
        };
        let mut line = Vec::new();
        let mut obj = ObjectWriter::new(&mut line);
        obj.string_always("digest", op.digest.as_str())
            .string_always("type", kind);
        let out_cm = obj.key("cache_map");
        match &cm {
            None => out_cm.extend_from_slice(b"null"),
            Some(cm) => {
                let mut cm_obj = ObjectWriter::new(out_cm);
                cm_obj.string_always("digest", cm.digest.as_str());
                let deps = cm_obj.key("deps");
                deps.push(b'[');
                for (i, dep) in cm.deps.iter().enumerate() {
                    if i > 0 {
                        deps.push(b',');
                    }
                    let mut dep_obj = ObjectWriter::new(deps);
                    dep_obj.string_always("selector", dep.selector_str());
                    dep_obj
                        .key("content_based")
                        .extend_from_slice(if dep.content_based() {
                            b"true"
                        } else {
                            b"false"
                        });
                    dep_obj.finish();
                }
                deps.push(b']');
                if args.explain {
                    let hashed = cm.hashed.as_deref().unwrap_or_default();
                    write_string(cm_obj.key("json"), hashed);
                }
                cm_obj.finish();
            }
        }
        obj.finish();
        line.push(b'\n');
        out.write_all(&line)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cachemap_diff(
    old: &std::path::Path,
    new: &std::path::Path,
    sources: &SourceContext,
) -> anyhow::Result<ExitCode> {
    let (_, old_graph) = load_for_view(Some(old))?;
    let (_, new_graph) = load_for_view(Some(new))?;
    let view =
        |vertex: &kiln_proto::Vertex| -> anyhow::Result<(Option<String>, serde_json::Value)> {
            let cm = cachemap::offline_cache_map(vertex, sources)
                .with_context(|| format!("cache map of op {} ({})", vertex.digest, vertex.name))?;
            let value = diff::normalized(vertex, cm.as_ref())?;
            Ok((cm.map(|c| c.digest.as_str().to_owned()), value))
        };
    let describe = |vertex: &kiln_proto::Vertex| serde_json::json!({"digest": vertex.digest.as_str(), "name": vertex.name, "type": vertex.kind().as_str()});
    let pairing = diff::pair_vertices(&old_graph, &new_graph);
    let mut out = std::io::stdout().lock();
    for id in &pairing.removed {
        let line = serde_json::json!({"change": "removed", "old": describe(old_graph.vertex(*id))});
        writeln!(out, "{line}")?;
    }
    for (old_id, new_id) in &pairing.pairs {
        let (old_vertex, new_vertex) = (old_graph.vertex(*old_id), new_graph.vertex(*new_id));
        let (old_digest, old_view) = view(old_vertex)?;
        let (new_digest, new_view) = view(new_vertex)?;
        if old_digest.is_some() && old_digest == new_digest && old_view == new_view {
            continue;
        }
        let fields = diff::changed_fields(&old_view, &new_view);
        if fields.is_empty() {
            continue;
        }
        let line = serde_json::json!({
            "change": "changed",
            "old": describe(old_vertex),
            "new": describe(new_vertex),
            "fields": fields,
        });
        writeln!(out, "{line}")?;
    }
    for id in &pairing.added {
        let line = serde_json::json!({"change": "added", "new": describe(new_graph.vertex(*id))});
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
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
