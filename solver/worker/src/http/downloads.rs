//! The worker's download state: the HTTP client (built from the environment on first
//! use) and the ETag records under `--root`.

use std::sync::OnceLock;

use super::client;
use super::error::HttpError;
use super::store::Store;

/// The worker's download state: one client (built on first use, from the environment)
/// and the ETag records.
#[derive(Debug)]
pub(crate) struct Downloads {
    client: OnceLock<reqwest::Client>,
    pub(super) store: Store,
}

impl Downloads {
    pub fn new(root: &std::path::Path, locks: std::path::PathBuf) -> Self {
        Downloads {
            client: OnceLock::new(),
            store: Store::new(root, locks),
        }
    }

    pub(super) fn client(&self) -> Result<&reqwest::Client, HttpError> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let client = client::build()?;
        Ok(self.client.get_or_init(|| client))
    }
}
