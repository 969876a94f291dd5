//! kiln-executor runs one process spec inside new user/mount/pid/ipc/uts/net namespaces:
//! id maps, mounts, pivot_root, /proc /dev /sys, masked paths, capabilities, rlimits,
//! user lookup, environment, exit status and cancellation.

pub mod sys;
pub mod userns;
