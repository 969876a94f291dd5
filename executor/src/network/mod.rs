//! The network a step runs in (`ExecOp.network`, `kiln run --network`).
//!
//! * **sandbox** (the default): a network namespace of the step's own whose only way out is
//!   a user-space network stack, [`Stack::Slirp4netns`] (default) or [`Stack::Pasta`],
//!   running in kiln's network namespace. The stack relays the step's connections through
//!   ordinary sockets of kiln's, so a step reaches what kiln reaches, but not the host's
//!   loopback (`--disable-host-loopback`, pasta's `--no-map-gw`) and not the host's
//!   abstract sockets; it has no capability over the host's network namespace, so it can
//!   change none of the host's routes, interfaces or firewall rules. The same stack serves
//!   rootful kiln: it needs no veth, no NAT rule and no sysctl on the host, so the host's
//!   firewall stays as it was whatever happens to kiln. The stack's DNS forwarder is the
//!   step's nameserver.
//! * **none**: a new network namespace with only loopback (`kiln run` makes it on another
//!   thread while it prepares the step: [`LoopbackNamespace`]).
//! * **host**: kiln's own network namespace (entitlement `network.host`).
//!
//! Ready sandbox namespaces come from a [`Pool`]: a step takes one and gives it back, so a
//! step with the default network costs about what `none` costs. A namespace's helper
//! process dies with kiln (a parent-death signal, and slirp4netns' exit descriptor), and
//! the namespaces are never bound to a path, so nothing is left behind after a crash.
//!
//! kiln.toml:
//! ```toml
//! [network]
//! stack = "slirp4netns"   # or "pasta"; default: slirp4netns, pasta when it is missing
//! pool_size = 4           # ready namespaces kept per kiln process
//! ```

mod config;
mod loopback;
mod namespace;
mod pool;

pub use config::{Attachment, Config, NetworkError, Stack};
pub use loopback::LoopbackNamespace;
pub use pool::{Lease, Pool, PoolStats};
