//! kiln-executor runs one process spec inside new user/mount/pid/ipc/uts/net namespaces:
//! id maps, mounts, pivot_root, /proc /dev /sys, masked paths, capabilities, rlimits,
//! user lookup, environment, exit status and cancellation; a step's cgroups, limits and
//! what it used; sandbox networks (a pool of network namespaces behind a user-space
//! network stack).

pub mod caps;
pub mod cgroup;
pub mod hosts;
pub mod limits;
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
