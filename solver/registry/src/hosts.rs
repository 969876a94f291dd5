//! How kiln talks to each registry host: plain HTTP, HTTPS, or HTTPS without certificate
//! verification, which CAs it trusts, which client certificate it shows, and which mirrors
//! it pulls through. Loopback registries (`localhost`, `127.0.0.1`, `::1`) use plain HTTP,
//! as containerd does; every other host uses HTTPS unless `kiln.toml` says otherwise, with
//! `buildkitd.toml`'s `[registry."host"]` keys:
//!
//! ```toml
//! [registry."registry.internal:5000"]
//! http = true        # plain HTTP
//! [registry."mirror.internal"]
//! insecure = true    # HTTPS without verifying the certificate
//! [registry."secure.internal:5443"]
//! ca = ["/etc/kiln/ca.pem"]                                     # extra trusted CAs (PEM)
//! [[registry."secure.internal:5443".keypair]]
//! key = "/etc/kiln/client.key"                                  # client certificate
//! cert = "/etc/kiln/client.pem"
//! [registry."docker.io"]
//! mirrors = ["mirror.internal"]                                 # pulls try these first
//! ```
//!
//! Other top-level tables in the file belong to other parts of kiln and are ignored here;
//! unknown keys inside a `registry` entry are errors, so a typo does not go unnoticed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors from reading `kiln.toml`.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// How to reach one registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Http,
    Https,
    /// HTTPS that accepts any certificate.
    HttpsInsecure,
}

/// One `[registry."host"]` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryHostConfig {
    /// Plain HTTP.
    #[serde(default)]
    pub http: bool,
    /// HTTPS without certificate verification.
    #[serde(default)]
    pub insecure: bool,
    /// PEM files of CAs trusted for this host besides the built-in roots.
    #[serde(default)]
    pub ca: Vec<PathBuf>,
    /// Client certificates (PEM) presented to this host.
    #[serde(default)]
    pub keypair: Vec<KeyPair>,
    /// Hosts pulls try before this one (pushes always go to the host itself).
    #[serde(default)]
    pub mirrors: Vec<String>,
}

/// A client certificate and its key (`[[registry."host".keypair]]`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyPair {
    pub key: PathBuf,
    pub cert: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    registry: BTreeMap<String, RegistryHostConfig>,
}

/// The registry settings of `kiln.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryHosts {
    hosts: BTreeMap<String, RegistryHostConfig>,
}

/// Whether `host` (with or without a port) is a loopback name containerd serves over HTTP.
pub fn is_loopback(host: &str) -> bool {
    let name = split_port(host);
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

/// The host name without a `:port`, and without IPv6 brackets.
fn split_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(name, _)| name);
    }
    // A bare IPv6 address has several colons and no port.
    if host.matches(':').count() > 1 {
        return host;
    }
    host.split_once(':').map_or(host, |(name, _)| name)
}

impl RegistryHosts {
    /// Reads `path`. A file that does not exist gives the defaults.
    pub fn load(path: &Path) -> Result<Self, HostsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(HostsError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the text of a `kiln.toml` read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, HostsError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| HostsError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Ok(RegistryHosts {
            hosts: file.registry,
        })
    }

    /// The settings for `host` (`name` or `name:port`): an entry for exactly that host,
    /// else one for the name without its port.
    pub fn config(&self, host: &str) -> Option<&RegistryHostConfig> {
        self.hosts
            .get(host)
            .or_else(|| self.hosts.get(split_port(host)))
    }

    /// The mirrors `kiln.toml` lists for `host`, in order.
    pub fn mirrors(&self, host: &str) -> &[String] {
        self.config(host).map_or(&[], |c| c.mirrors.as_slice())
    }

    /// How to reach `host`.
    pub fn transport(&self, host: &str) -> Transport {
        match self.config(host) {
            Some(c) if c.http => Transport::Http,
            Some(c) if c.insecure => Transport::HttpsInsecure,
            Some(_) => Transport::Https,
            None if is_loopback(host) => Transport::Http,
            None => Transport::Https,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_http_and_others_https() {
        let hosts = RegistryHosts::default();
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.0.0.1",
            "[::1]:5000",
            "::1",
        ] {
            assert_eq!(hosts.transport(host), Transport::Http, "{host}");
        }
        for host in [
            "docker.io",
            "ghcr.io",
            "localhost.example.com:5000",
            "127.0.0.2:5000",
            "[::2]:5000",
        ] {
            assert_eq!(hosts.transport(host), Transport::Https, "{host}");
        }
    }

    #[test]
    fn kiln_toml_selects_http_or_insecure_tls_per_host() {
        let text = r#"
            [worker]
            something = "for another part of kiln"

            [registry."registry.internal:5000"]
            http = true

            [registry."mirror.internal"]
            insecure = true

            [registry."localhost:5000"]
            http = false
        "#;
        let hosts = RegistryHosts::parse(text, Path::new("kiln.toml")).unwrap();
        assert_eq!(hosts.transport("registry.internal:5000"), Transport::Http);
        // Only the port given is plain HTTP.
        assert_eq!(hosts.transport("registry.internal:5001"), Transport::Https);
        // A name without a port covers every port.
        assert_eq!(
            hosts.transport("mirror.internal:8443"),
            Transport::HttpsInsecure
        );
        assert_eq!(hosts.transport("mirror.internal"), Transport::HttpsInsecure);
        // An explicit entry wins over the loopback default.
        assert_eq!(hosts.transport("localhost:5000"), Transport::Https);
        assert_eq!(hosts.transport("localhost:5001"), Transport::Http);
        assert_eq!(hosts.transport("docker.io"), Transport::Https);
    }

    #[test]
    fn kiln_toml_takes_buildkitd_tls_keys_and_mirrors() {
        let text = r#"
            [registry."secure.internal:5443"]
            ca = ["/etc/kiln/ca.pem"]
            [[registry."secure.internal:5443".keypair]]
            key = "/k.pem"
            cert = "/c.pem"
            [registry."docker.io"]
            mirrors = ["mirror.internal:5000"]
        "#;
        let hosts = RegistryHosts::parse(text, Path::new("kiln.toml")).unwrap();
        let secure = hosts.config("secure.internal:5443").unwrap();
        assert_eq!(secure.ca, [PathBuf::from("/etc/kiln/ca.pem")]);
        assert_eq!(secure.keypair[0].cert, PathBuf::from("/c.pem"));
        assert_eq!(hosts.transport("secure.internal:5443"), Transport::Https);
        assert_eq!(hosts.mirrors("docker.io"), ["mirror.internal:5000"]);
        assert!(hosts.mirrors("ghcr.io").is_empty());
    }

    #[test]
    fn kiln_toml_errors_name_the_file() {
        let err = RegistryHosts::parse(
            "[registry.\"a\"]\nhtpp = true\n",
            Path::new("/etc/kiln.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("/etc/kiln.toml: "), "{err}");
        assert!(err.contains("htpp"), "{err}");
        let err = RegistryHosts::parse("[registry.\"a\"]\nhttp = \"yes\"\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("k.toml: "), "{err}");
        let missing = RegistryHosts::load(Path::new("/nonexistent/kiln.toml")).unwrap();
        assert_eq!(missing, RegistryHosts::default());
    }
}
