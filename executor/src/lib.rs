//! kiln-executor runs one process spec inside new user/mount/pid/ipc/uts/net namespaces:
//! id maps, mounts, pivot_root, /proc /dev /sys, masked paths, capabilities, rlimits,
//! user lookup, environment, exit status and cancellation; a step's cgroups, limits and
//! what it used; sandbox networks (a pool of network namespaces behind a user-space
//! network stack).

pub mod caps;
pub mod hosts;
pub mod launcher;
pub mod network;
pub mod path;
pub mod process;
pub mod rootfs;
pub mod spec;
pub mod stubs;
pub mod supervisor;
pub mod sys;
pub mod user;
pub mod userns;

/// A step's cgroups and limits live in a crate of their own; the executor places steps in them.
pub use kiln_cgroup::{hierarchy as cgroup, limits};
