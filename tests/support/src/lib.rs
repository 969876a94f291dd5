//! Helpers shared by kiln's tests.
//!
//! Tests that need root, user namespaces, the unprivileged test user or a local registry
//! call [`require`]: outside CI a missing prerequisite skips the test with a printed reason;
//! under `CI=true` it fails the test, so CI never passes by skipping.

pub mod bodies;
mod host;
pub mod machine;
pub mod network;
pub mod registry;
pub mod secure_registry;
pub mod token_server;

pub use bodies::{Mounted, rootful, rootless, rt, serial};
pub use host::*;
pub use registry::{RegistryGuard, test_registry};
pub use secure_registry::{RegistryAuth, SecureRegistry};
