//! What configures a worker: where its state lives, how steps are started, how
//! registries are reached, and what a build brings besides its graph (its session).

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_executor::limits::Limits;
use kiln_executor::supervisor::RunnerCommand;
use kiln_registry::{Credentials, RegistryHosts};

/// What a build brings besides its graph (buildctl's session).
#[derive(Clone, Debug, Default)]
pub struct BuildSession {
    /// Secret id → content (`--secret id=…,src=…`).
    pub secrets: HashMap<String, Vec<u8>>,
    /// SSH agent id → socket (`--ssh default[=PATH]`).
    pub ssh: HashMap<String, PathBuf>,
    /// Local directory name → directory (`--local name=DIR`).
    pub locals: HashMap<String, PathBuf>,
    /// OCI layout store name → directory (`--oci-layout name=DIR`).
    pub oci_layouts: HashMap<String, PathBuf>,
    /// This build's session id (`local://` CacheMaps are only comparable within it).
    pub id: String,
}

/// How to build a [`KilnWorker`](crate::KilnWorker).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// kiln's state directory.
    pub root: PathBuf,
    /// How to start a step runner (`kiln __runner`).
    pub runner: RunnerCommand,
    /// kiln runs as uid 0 of its own user namespace (rootless).
    pub in_user_namespace: bool,
    pub session: BuildSession,
    /// How to reach registries (`kiln.toml`).
    pub registry_hosts: RegistryHosts,
    /// Registry credentials (Docker's `config.json`).
    pub credentials: Credentials,
    /// The sandbox network's stack and pool (`[network]` of `kiln.toml`).
    pub network: kiln_executor::network::Config,
    /// Every step's resource limits (`[limits]` of `kiln.toml`).
    pub limits: Limits,
}
