//! The immutable vertex/edge graph a loaded Definition becomes.

use std::collections::BTreeMap;

use crate::digest::Digest;
use crate::pb;

/// Index of a vertex in [`Graph::vertices`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VertexId(pub usize);

/// One output of one vertex: what an op input or the build target refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub vertex: VertexId,
    /// Output index of the producing op (`Input.index`); range-checked at execution.
    pub index: i64,
}

/// Per-vertex options taken from `Definition.metadata`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VertexOptions {
    pub ignore_cache: bool,
    pub description: BTreeMap<String, String>,
    /// `Some` only when the metadata carried an `export_cache` message.
    pub export_cache: Option<bool>,
    pub progress_group: Option<pb::ProgressGroup>,
    pub caps: BTreeMap<String, bool>,
}

/// The kind of an op body, as printed by `kiln debug` commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Source,
    Exec,
    File,
    Build,
    Merge,
    Diff,
    /// An op without a body; only valid as the terminal op.
    Unknown,
}

impl OpKind {
    pub fn of(op: &pb::Op) -> Self {
        match &op.op {
            Some(pb::op::Op::Source(_)) => OpKind::Source,
            Some(pb::op::Op::Exec(_)) => OpKind::Exec,
            Some(pb::op::Op::File(_)) => OpKind::File,
            Some(pb::op::Op::Build(_)) => OpKind::Build,
            Some(pb::op::Op::Merge(_)) => OpKind::Merge,
            Some(pb::op::Op::Diff(_)) => OpKind::Diff,
            None => OpKind::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Source => "source",
            OpKind::Exec => "exec",
            OpKind::File => "file",
            OpKind::Build => "build",
            OpKind::Merge => "merge",
            OpKind::Diff => "diff",
            OpKind::Unknown => "unknown",
        }
    }
}

/// A loaded, validated op.
#[derive(Clone, Debug)]
pub struct Vertex {
    pub digest: Digest,
    /// The decoded op, with its platform replaced by the normalised one.
    pub op: pb::Op,
    pub options: VertexOptions,
    /// Display name (progress and errors only).
    pub name: String,
    /// One edge per `Op.inputs` element, in order.
    pub inputs: Vec<Edge>,
}

impl Vertex {
    pub fn kind(&self) -> OpKind {
        OpKind::of(&self.op)
    }

    /// The normalised platform (always present after loading).
    pub fn platform(&self) -> Option<&pb::Platform> {
        self.op.platform.as_ref()
    }
}

/// A loaded Definition: vertices in dependency order (every vertex after its inputs)
/// and the edge the terminal op selects.
#[derive(Clone, Debug)]
pub struct Graph {
    vertices: Vec<Vertex>,
    target: Edge,
}

impl Graph {
    pub(crate) fn new(vertices: Vec<Vertex>, target: Edge) -> Self {
        Graph { vertices, target }
    }

    pub fn vertices(&self) -> &[Vertex] {
        &self.vertices
    }

    pub fn vertex(&self, id: VertexId) -> &Vertex {
        &self.vertices[id.0]
    }

    pub fn target(&self) -> Edge {
        self.target
    }

    /// Looks a vertex up by its op digest.
    pub fn find(&self, digest: &Digest) -> Option<VertexId> {
        self.vertices
            .iter()
            .position(|v| &v.digest == digest)
            .map(VertexId)
    }

    /// Vertex ids that consume `id`, in dependency order.
    pub fn dependents(&self, id: VertexId) -> impl Iterator<Item = VertexId> + '_ {
        self.vertices
            .iter()
            .enumerate()
            .filter(move |(_, v)| v.inputs.iter().any(|e| e.vertex == id))
            .map(|(i, _)| VertexId(i))
    }
}
