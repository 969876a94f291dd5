//! Entering kiln's namespaces (before any thread exists) and starting the async runtime
//! afterwards: every command that mounts goes through here first.

use anyhow::Context;
use kiln_executor::userns::{self, Entered};

/// Enters kiln's namespaces (before any thread exists); true when rootless.
pub fn enter_namespaces() -> anyhow::Result<bool> {
    Ok(matches!(
        userns::enter().context("entering kiln's namespaces")?,
        Entered::UserNamespace(_)
    ))
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
