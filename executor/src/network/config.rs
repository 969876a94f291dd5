//! The sandbox network's configuration (kiln.toml's `[network]`), its stacks, how a step
//! attaches to a ready namespace, and the errors of preparing one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors from the network configuration and from preparing a sandbox network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no user-space network stack for the sandbox network: install slirp4netns (or passt \
         for pasta), or run the step with --network none"
    )]
    NoStack,
    #[error(
        "{path} is not readable and writable here ({source}): the sandbox network's stack \
         needs it (mode 0666, as udev sets it), or run the step with --network none"
    )]
    Tun {
        path: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("creating a network namespace: {op}: {source}")]
    Namespace {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("starting {stack}: {source}")]
    Spawn {
        stack: Stack,
        #[source]
        source: std::io::Error,
    },
    #[error("{stack} did not set up the sandbox network: {message}")]
    Helper { stack: Stack, message: String },
    #[error("the network pool is shut down")]
    Closed,
}

/// The user-space network stack that connects a sandbox namespace to kiln's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// slirp4netns: starts in a few milliseconds, a complete TCP/IP stack (libslirp).
    Slirp4netns,
    /// pasta (Debian's `passt`): maps the step's connections to host sockets.
    Pasta,
}

impl Stack {
    /// The program that runs this stack.
    pub fn program(self) -> &'static str {
        match self {
            Stack::Slirp4netns => "slirp4netns",
            Stack::Pasta => "pasta",
        }
    }

    /// The address of the stack's DNS forwarder inside the namespace.
    pub fn nameserver(self) -> IpAddr {
        match self {
            // libslirp's built-in forwarder.
            Stack::Slirp4netns => IpAddr::from([10, 0, 2, 3]),
            // Mapped with --dns-forward (the address podman uses with pasta).
            Stack::Pasta => IpAddr::from([169, 254, 1, 1]),
        }
    }
}

impl std::fmt::Display for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

/// The `[network]` table of kiln.toml.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The stack to use; `None` picks slirp4netns, or pasta when slirp4netns is missing.
    #[serde(default)]
    pub stack: Option<Stack>,
    /// Ready namespaces kept for later steps.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    4
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stack: None,
            pool_size: default_pool_size(),
        }
    }
}

impl Config {
    /// Reads the `[network]` table of `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, NetworkError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(NetworkError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the text of a kiln.toml read from `path` (named in errors). Other tables
    /// belong to other parts of kiln and are ignored; unknown keys in `[network]` are
    /// errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, NetworkError> {
        // Only the [network] table is looked at: a typo elsewhere is another part's error.
        let table: toml::Table = toml::from_str(text).map_err(|e| NetworkError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let Some(network) = table.get("network") else {
            return Ok(Self::default());
        };
        network
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| NetworkError::Parse {
                path: path.to_owned(),
                message: format!("[network]: {}", e.to_string().trim_end().replace('\n', " ")),
            })
    }

    /// The stack this configuration selects on this machine.
    pub fn resolve_stack(&self) -> Result<Stack, NetworkError> {
        match self.stack {
            Some(stack) => Ok(stack),
            None => [Stack::Slirp4netns, Stack::Pasta]
                .into_iter()
                .find(|s| find_program(s.program()).is_some())
                .ok_or(NetworkError::NoStack),
        }
    }
}

/// Finds `name` on PATH or in the usual system directories.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// How a step joins a ready sandbox network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The namespace, as a path the runner opens (a descriptor of kiln's in `/proc`).
    pub path: PathBuf,
    /// The DNS forwarder the step's resolv.conf names.
    pub nameserver: IpAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_keys() {
        let path = Path::new("kiln.toml");
        assert_eq!(Config::parse("", path).unwrap(), Config::default());
        let text =
            "[registry.\"r:5000\"]\nhttp = true\n[network]\nstack = \"pasta\"\npool_size = 0\n";
        assert_eq!(
            Config::parse(text, path).unwrap(),
            Config {
                stack: Some(Stack::Pasta),
                pool_size: 0
            }
        );
        assert_eq!(
            Config::parse("[network]\nstack = \"slirp4netns\"\n", path)
                .unwrap()
                .stack,
            Some(Stack::Slirp4netns)
        );
    }

    #[test]
    fn config_errors_name_the_file_and_key() {
        let err = Config::parse("[network]\nstack = \"cni\"\n", Path::new("/etc/kiln.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/kiln.toml: [network]"), "{err}");
        assert!(err.contains("cni"), "{err}");
        let err = Config::parse("[network]\nstak = \"pasta\"\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stak"), "{err}");
    }

    #[test]
    fn nameservers_are_the_forwarders() {
        assert_eq!(Stack::Slirp4netns.nameserver().to_string(), "10.0.2.3");
        assert_eq!(Stack::Pasta.nameserver().to_string(), "169.254.1.1");
    }
}
