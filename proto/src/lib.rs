//! kiln-proto owns BuildKit's LLB wire format: the protobuf messages (wire-compatible with
//! BuildKit v0.11.6 `ops.proto`), op digests, gogo-exact encoding for Definitions kiln
//! produces, Go-JSON views of the messages, and Definition loading into a validated
//! vertex/edge [`Graph`].

pub mod builder;
pub mod caps;
pub mod digest;
pub mod encode;
pub mod gojson;
pub mod graph;
pub mod load;
pub mod paths;
pub mod platform;

/// The generated LLB messages (package `pb`).
#[allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb.rs"));
}

pub use digest::Digest;
pub use graph::{Edge, Graph, OpKind, Vertex, VertexId, VertexOptions};
pub use load::{Entitlements, LoadError, LoadOptions, decode_definition, decode_ops, load};

/// Mount/input sentinel: no input (scratch).
pub const EMPTY_INPUT: i64 = -1;
/// Mount/action sentinel: no output.
pub const SKIP_OUTPUT: i64 = -1;
/// Mount destination of the root filesystem.
pub const ROOT_MOUNT: &str = "/";
/// Hostname of a step unless `Meta.hostname` sets one.
pub const DEFAULT_HOSTNAME: &str = "buildkitsandbox";
/// PATH appended to a step's environment when it has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
