//! Definition loading: decode, digest, validate and link ops into a [`Graph`], with
//! BuildKit v0.11.6's checks, their order and their error texts
//! (../shared/spec/definition-loading.md).
//!
//! Beyond BuildKit: a dangling input digest is an error rather than a crash, a cycle is
//! an error rather than endless recursion, and enum values BuildKit does not know
//! (network, security, mount type, cache sharing, file action) are rejected here with
//! the op and field named, because prost decodes enums as plain integers.

use std::collections::{HashMap, HashSet};

use prost::Message;

use crate::digest::Digest;
use crate::graph::{Edge, Graph, OpKind, Vertex, VertexId, VertexOptions};
use crate::{caps, pb, platform};

/// Errors from decoding and loading a Definition.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to parse definition: {0}")]
    ParseDefinition(prost::DecodeError),
    #[error("invalid empty definition")]
    Empty,
    #[error("failed to parse llb proto op: {0}")]
    ParseOp(prost::DecodeError),
    #[error("invalid missing input digest {0}")]
    MissingInput(String),
    #[error("invalid LLB with {0} vertexes")]
    TooFewVertexes(usize),
    #[error("invalid LLB with no inputs on last vertex")]
    NoTerminalInputs,
    #[error("{reason} (op {digest})")]
    InvalidOp {
        digest: Digest,
        reason: &'static str,
    },
    #[error("op {digest}: {field} has unknown value {value}")]
    UnknownEnum {
        digest: Digest,
        field: String,
        value: i64,
    },
    #[error("op {digest}: file.actions[{index}] has an unknown action type")]
    UnknownFileAction { digest: Digest, index: usize },
    #[error("network.host is not allowed")]
    NetworkHostNotAllowed,
    #[error("security.insecure is not allowed")]
    SecurityInsecureNotAllowed,
    #[error("unknown API capability {0}")]
    UnknownCapability(String),
    #[error("invalid LLB: op {0} depends on itself")]
    Cycle(Digest),
}

/// Entitlements granted to a build (`--allow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entitlements {
    pub network_host: bool,
    pub security_insecure: bool,
}

impl Entitlements {
    pub fn all() -> Self {
        Entitlements {
            network_host: true,
            security_insecure: true,
        }
    }
}

/// Settings that influence loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub entitlements: Entitlements,
    /// Used for ops without a platform.
    pub default_platform: pb::Platform,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            entitlements: Entitlements::default(),
            default_platform: platform::host_platform(),
        }
    }
}

/// One `Definition.def` element, decoded, with the digest of its bytes.
#[derive(Clone, Debug)]
pub struct DecodedOp {
    pub digest: Digest,
    pub op: pb::Op,
    pub encoded_len: usize,
}

/// Decodes the outer Definition message.
pub fn decode_definition(bytes: &[u8]) -> Result<pb::Definition, LoadError> {
    pb::Definition::decode(bytes).map_err(LoadError::ParseDefinition)
}

/// Decodes every `def` element in order (duplicates kept), digesting the received bytes.
pub fn decode_ops(def: &pb::Definition) -> Result<Vec<DecodedOp>, LoadError> {
    if def.def.is_empty() {
        return Err(LoadError::Empty);
    }
    def.def
        .iter()
        .map(|bytes| {
            let op = pb::Op::decode(bytes.as_slice()).map_err(LoadError::ParseOp)?;
            Ok(DecodedOp {
                digest: Digest::of(bytes),
                op,
                encoded_len: bytes.len(),
            })
        })
        .collect()
}

/// Loads a Definition into a validated graph.
pub fn load(def: &pb::Definition, options: &LoadOptions) -> Result<Graph, LoadError> {
    let decoded = decode_ops(def)?;
    let mut ops: HashMap<String, &pb::Op> = HashMap::new();
    for d in &decoded {
        ops.entry(d.digest.as_str().to_owned()).or_insert(&d.op);
    }
    // Checked over every op in definition order (BuildKit v0.11.6 would crash here).
    for d in &decoded {
        for input in &d.op.inputs {
            if !ops.contains_key(&input.digest) {
                return Err(LoadError::MissingInput(input.digest.clone()));
            }
        }
    }
    if ops.len() < 2 {
        return Err(LoadError::TooFewVertexes(ops.len()));
    }
    let last = decoded.last().ok_or(LoadError::Empty)?;
    let terminal = ops
        .remove(last.digest.as_str())
        .ok_or(LoadError::NoTerminalInputs)?;
    let target = terminal.inputs.first().ok_or(LoadError::NoTerminalInputs)?;

    let mut loader = Loader {
        def,
        ops: &ops,
        options,
        vertices: Vec::new(),
        loaded: HashMap::new(),
    };
    let root = loader.load_from(&target.digest)?;
    Ok(Graph::new(
        loader.vertices,
        Edge {
            vertex: root,
            index: target.index,
        },
    ))
}

struct Loader<'a> {
    def: &'a pb::Definition,
    ops: &'a HashMap<String, &'a pb::Op>,
    options: &'a LoadOptions,
    vertices: Vec<Vertex>,
    loaded: HashMap<String, VertexId>,
}

enum Visit<'a> {
    Enter(&'a str),
    Exit(&'a str, Box<PendingVertex>),
}

struct PendingVertex {
    digest: Digest,
    op: pb::Op,
    options: VertexOptions,
}

impl<'a> Loader<'a> {
    /// Depth-first load in `inputs` order. Checks run when a vertex is first reached
    /// (as BuildKit's recursion does); vertices are appended after their inputs.
    /// Iterative so that a very deep graph cannot overflow the stack.
    fn load_from(&mut self, start: &'a str) -> Result<VertexId, LoadError> {
        let mut stack = vec![Visit::Enter(start)];
        let mut entered: HashSet<&str> = HashSet::new();
        while let Some(visit) = stack.pop() {
            match visit {
                Visit::Enter(digest) => {
                    if self.loaded.contains_key(digest) {
                        continue;
                    }
                    let op = *self
                        .ops
                        .get(digest)
                        .ok_or_else(|| LoadError::MissingInput(digest.to_owned()))?;
                    let parsed: Digest = digest
                        .parse()
                        .map_err(|_| LoadError::MissingInput(digest.to_owned()))?;
                    if !entered.insert(digest) {
                        return Err(LoadError::Cycle(parsed));
                    }
                    let pending = self.check_vertex(parsed, op)?;
                    stack.push(Visit::Exit(digest, Box::new(pending)));
                    // Reverse so that inputs are entered in order. A vertex entered but not
                    // yet finished is an ancestor, so meeting it again means a cycle.
                    for input in op.inputs.iter().rev() {
                        stack.push(Visit::Enter(input.digest.as_str()));
                    }
                }
                Visit::Exit(digest, pending) => {
                    let inputs = pending
                        .op
                        .inputs
                        .iter()
                        .map(|input| {
                            let vertex = *self
                                .loaded
                                .get(input.digest.as_str())
                                .ok_or_else(|| LoadError::MissingInput(input.digest.clone()))?;
                            Ok(Edge {
                                vertex,
                                index: input.index,
                            })
                        })
                        .collect::<Result<Vec<_>, LoadError>>()?;
                    let name = self.vertex_name(&pending.op, &pending.options, &inputs);
                    let id = VertexId(self.vertices.len());
                    self.vertices.push(Vertex {
                        digest: pending.digest,
                        op: pending.op,
                        options: pending.options,
                        name,
                        inputs,
                    });
                    self.loaded.insert(digest.to_owned(), id);
                }
            }
        }
        self.loaded
            .get(start)
            .copied()
            .ok_or_else(|| LoadError::MissingInput(start.to_owned()))
    }

    /// Validation, options, entitlements, platform and capabilities, in BuildKit's order.
    fn check_vertex(&self, digest: Digest, op: &pb::Op) -> Result<PendingVertex, LoadError> {
        validate(&digest, op)?;
        validate_enums(&digest, op)?;
        let metadata = self
            .def
            .metadata
            .get(digest.as_str())
            .cloned()
            .unwrap_or_default();
        let options = VertexOptions {
            ignore_cache: metadata.ignore_cache,
            description: metadata.description.clone(),
            export_cache: metadata.export_cache.map(|e| e.value),
            progress_group: metadata.progress_group.clone(),
            caps: metadata.caps.clone(),
        };
        if let Some(pb::op::Op::Exec(exec)) = &op.op {
            if exec.network == pb::NetMode::Host as i32 && !self.options.entitlements.network_host {
                return Err(LoadError::NetworkHostNotAllowed);
            }
            if exec.security == pb::SecurityMode::Insecure as i32
                && !self.options.entitlements.security_insecure
            {
                return Err(LoadError::SecurityInsecureNotAllowed);
            }
        }
        let mut op = op.clone();
        op.platform = Some(platform::normalize(
            op.platform.as_ref(),
            &self.options.default_platform,
        ));
        if let Some(unknown) = metadata.caps.keys().find(|cap| !caps::is_registered(cap)) {
            return Err(LoadError::UnknownCapability(unknown.clone()));
        }
        Ok(PendingVertex {
            digest,
            op,
            options,
        })
    }

    fn vertex_name(&self, op: &pb::Op, options: &VertexOptions, inputs: &[Edge]) -> String {
        if let Some(name) = options.description.get("llb.customname") {
            return name.clone();
        }
        let input_name = |index: i64| -> String {
            usize::try_from(index)
                .ok()
                .and_then(|i| inputs.get(i))
                .map(|edge| self.vertices[edge.vertex.0].name.clone())
                .unwrap_or_default()
        };
        match &op.op {
            Some(pb::op::Op::Source(source)) => source_name(source),
            Some(pb::op::Op::Exec(exec)) => exec
                .meta
                .as_ref()
                .map(|m| m.args.join(" "))
                .unwrap_or_default(),
            Some(pb::op::Op::File(file)) => file_op_name(file),
            Some(pb::op::Op::Build(_)) => "build".to_owned(),
            Some(pb::op::Op::Merge(merge)) => {
                let names: Vec<String> = merge.inputs.iter().map(|i| input_name(i.input)).collect();
                format!("merge ({})", names.join(", "))
            }
            Some(pb::op::Op::Diff(diff)) => {
                let side = |input: Option<i64>| match input {
                    Some(index) if index >= 0 => format!("({})", input_name(index)),
                    _ => "scratch".to_owned(),
                };
                format!(
                    "diff {} -> {}",
                    side(diff.lower.as_ref().map(|l| l.input)),
                    side(diff.upper.as_ref().map(|u| u.input))
                )
            }
            None => OpKind::Unknown.as_str().to_owned(),
        }
    }
}

fn source_name(source: &pb::SourceOp) -> String {
    if source.identifier.starts_with("local://") {
        if let Some(patterns) = source.attrs.get("local.includepattern") {
            if let Ok(patterns) = serde_json::from_str::<Vec<String>>(patterns) {
                if let [pattern] = patterns.as_slice() {
                    return format!("{} ({})", source.identifier, pattern);
                }
            }
        }
    }
    source.identifier.clone()
}

fn file_op_name(file: &pb::FileOp) -> String {
    let names: Vec<String> = file
        .actions
        .iter()
        .filter_map(|action| match &action.action {
            Some(pb::file_action::Action::Mkdir(a)) => Some(format!("mkdir {}", a.path)),
            Some(pb::file_action::Action::Mkfile(a)) => Some(format!("mkfile {}", a.path)),
            Some(pb::file_action::Action::Rm(a)) => Some(format!("rm {}", a.path)),
            Some(pb::file_action::Action::Copy(a)) => Some(format!("copy {} {}", a.src, a.dest)),
            None => None,
        })
        .collect();
    names.join(", ")
}

/// BuildKit's `opsutils.Validate`. The "nil op/body" cases cannot arise from prost
/// decoding (a present oneof member always has a value), so only the content checks remain.
fn validate(digest: &Digest, op: &pb::Op) -> Result<(), LoadError> {
    let invalid = |reason| LoadError::InvalidOp {
        digest: digest.clone(),
        reason,
    };
    match &op.op {
        Some(pb::op::Op::Exec(exec)) => {
            let meta = exec
                .meta
                .as_ref()
                .ok_or_else(|| invalid("invalid exec op with no meta"))?;
            if meta.args.is_empty() {
                return Err(invalid("invalid exec op with no args"));
            }
            if exec.mounts.is_empty() {
                return Err(invalid("invalid exec op with no mounts"));
            }
            if !exec.mounts.iter().any(|m| m.dest == "/") {
                return Err(invalid("invalid exec op with no rootfs"));
            }
        }
        Some(pb::op::Op::File(file)) if file.actions.is_empty() => {
            return Err(invalid("invalid file op with no actions"));
        }
        _ => {}
    }
    Ok(())
}

fn validate_enums(digest: &Digest, op: &pb::Op) -> Result<(), LoadError> {
    let unknown = |field: String, value: i64| LoadError::UnknownEnum {
        digest: digest.clone(),
        field,
        value,
    };
    match &op.op {
        Some(pb::op::Op::Exec(exec)) => {
            if pb::NetMode::try_from(exec.network).is_err() {
                return Err(unknown("exec.network".into(), exec.network.into()));
            }
            if pb::SecurityMode::try_from(exec.security).is_err() {
                return Err(unknown("exec.security".into(), exec.security.into()));
            }
            for (i, mount) in exec.mounts.iter().enumerate() {
                if pb::MountType::try_from(mount.mount_type).is_err() {
                    return Err(unknown(
                        format!("exec.mounts[{i}].mountType"),
                        mount.mount_type.into(),
                    ));
                }
                if let Some(cache) = &mount.cache_opt {
                    if pb::CacheSharingOpt::try_from(cache.sharing).is_err() {
                        return Err(unknown(
                            format!("exec.mounts[{i}].cacheOpt.sharing"),
                            cache.sharing.into(),
                        ));
                    }
                }
            }
        }
        Some(pb::op::Op::File(file)) => {
            // An action whose oneof used a field number kiln does not know decodes as unset.
            if let Some(index) = file.actions.iter().position(|a| a.action.is_none()) {
                return Err(LoadError::UnknownFileAction {
                    digest: digest.clone(),
                    index,
                });
            }
        }
        _ => {}
    }
    Ok(())
}
