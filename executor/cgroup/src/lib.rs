//! kiln-cgroup owns a build step's resources: the limits a step may use ([`limits`]) and
//! the cgroups that enforce them and report what it used ([`hierarchy`]). It knows
//! nothing of namespaces, mounts or processes beyond the pids it places; the executor
//! decides when a step joins its cgroups and what its rootfs shows of them.

pub mod hierarchy;
pub mod limits;

pub use hierarchy::CgroupView;
