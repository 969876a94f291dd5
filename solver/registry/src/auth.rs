//! Registry credentials from Docker's client configuration: `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`. An `auths.<host>` entry gives Basic credentials, either as
//! `auth` (base64 of `user:password`) or as `username`/`password`. Hosts without an entry
//! are accessed anonymously. Credential helpers (`credsStore`, `credHelpers`) and identity
//! tokens are not run; a host that only has those is accessed anonymously, with a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Errors from reading Docker's client configuration.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: the auth entry for {host} is {problem}")]
    BadAuth {
        path: PathBuf,
        host: String,
        problem: &'static str,
    },
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Credentials per registry host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    basic: BTreeMap<String, (String, String)>,
    /// Hosts that have credentials kiln cannot use (helpers, identity tokens).
    unusable: BTreeMap<String, &'static str>,
}

/// The key Docker's configuration uses for a host: scheme and path dropped, Docker Hub's
/// aliases folded into `docker.io`.
fn normalize_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme
        .split_once('/')
        .map_or(without_scheme, |(h, _)| h);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        other => other.to_owned(),
    }
}

impl Credentials {
    /// Where Docker's client configuration is: `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json`; `None` when neither variable is set.
    pub fn default_path() -> Option<PathBuf> {
        Self::path_from(std::env::var_os("DOCKER_CONFIG"), std::env::var_os("HOME"))
    }

    /// [`Credentials::default_path`] for given values of `DOCKER_CONFIG` and `HOME`.
    pub fn path_from(
        docker_config: Option<std::ffi::OsString>,
        home: Option<std::ffi::OsString>,
    ) -> Option<PathBuf> {
        if let Some(dir) = docker_config.filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        home.filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".docker/config.json"))
    }

    /// Reads the default configuration ([`Credentials::default_path`]); none there means
    /// no credentials.
    pub fn load_default() -> Result<Self, CredentialsError> {
        match Self::default_path() {
            Some(path) => Self::load(&path),
            None => Ok(Self::default()),
        }
    }

    /// Reads `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(CredentialsError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the bytes of a `config.json` read from `path` (named in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, CredentialsError> {
        let file: ConfigFile =
            serde_json::from_slice(bytes).map_err(|e| CredentialsError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let mut creds = Credentials::default();
        for (key, entry) in &file.auths {
            let host = normalize_host(key);
            let bad = |problem| CredentialsError::BadAuth {
                path: path.to_owned(),
                host: key.clone(),
                problem,
            };
            let pair = match entry.auth.as_deref().filter(|a| !a.is_empty()) {
                Some(auth) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad("not valid base64"))?;
                    let decoded = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
                    let (user, pass) = decoded
                        .split_once(':')
                        .ok_or_else(|| bad("not of the form user:password"))?;
                    Some((user.to_owned(), pass.to_owned()))
                }
                None => match (&entry.username, &entry.password) {
                    (Some(user), Some(pass)) if !user.is_empty() => {
                        Some((user.clone(), pass.clone()))
                    }
                    _ => None,
                },
            };
            match pair {
                Some(pair) => {
                    creds.basic.insert(host, pair);
                }
                None if entry
                    .identity_token
                    .as_deref()
                    .is_some_and(|t| !t.is_empty()) =>
                {
                    creds.unusable.insert(host, "an identity token");
                }
                None => {}
            }
        }
        for host in file.cred_helpers.keys() {
            creds
                .unusable
                .entry(normalize_host(host))
                .or_insert("a credential helper");
        }
        if let Some(store) = file.creds_store.filter(|s| !s.is_empty()) {
            tracing::debug!(
                "{}: credsStore {store:?} is not used by kiln; only inline auths are",
                path.display()
            );
        }
        Ok(creds)
    }

    /// What to present to `host` (a registry name such as `docker.io` or `localhost:5000`).
    pub fn for_host(&self, host: &str) -> RegistryAuth {
        let host = normalize_host(host);
        if let Some((user, pass)) = self.basic.get(&host) {
            return RegistryAuth::Basic(user.clone(), pass.clone());
        }
        if let Some(kind) = self.unusable.get(&host) {
            tracing::warn!(
                "the Docker configuration has {kind} for {host}, which kiln does not use; \
                 accessing {host} anonymously"
            );
        }
        RegistryAuth::Anonymous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parses_auth_and_username_password_entries() {
        let json = format!(
            r#"{{
                "auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{hub}"}},
                    "localhost:5000": {{"auth": "{local}"}},
                    "http://registry.internal:5000/v2/": {{"username": "u2", "password": "p2"}},
                    "ghcr.io": {{}},
                    "quay.io": {{"identitytoken": "tok"}}
                }},
                "credHelpers": {{"gcr.io": "gcloud"}},
                "credsStore": "desktop"
            }}"#,
            hub = b64("hubuser:hub:pass"),
            local = b64("me:secret"),
        );
        let creds = Credentials::parse(json.as_bytes(), Path::new("config.json")).unwrap();
        assert_eq!(
            creds.for_host("docker.io"),
            RegistryAuth::Basic("hubuser".into(), "hub:pass".into())
        );
        assert_eq!(
            creds.for_host("index.docker.io"),
            RegistryAuth::Basic("hubuser".into(), "hub:pass".into())
        );
        assert_eq!(
            creds.for_host("localhost:5000"),
            RegistryAuth::Basic("me".into(), "secret".into())
        );
        assert_eq!(
            creds.for_host("registry.internal:5000"),
            RegistryAuth::Basic("u2".into(), "p2".into())
        );
        for anonymous in ["ghcr.io", "quay.io", "gcr.io", "localhost:5001"] {
            assert_eq!(
                creds.for_host(anonymous),
                RegistryAuth::Anonymous,
                "{anonymous}"
            );
        }
    }

    #[test]
    fn bad_entries_name_the_file_and_host() {
        let bad = format!(
            r#"{{"auths": {{"h:1": {{"auth": "{}"}}}}}}"#,
            b64("nocolon")
        );
        let err = Credentials::parse(bad.as_bytes(), Path::new("/c/config.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c/config.json: the auth entry for h:1 is not of the form user:password"
        );
        let err = Credentials::parse(br#"{"auths": {"h": {"auth": "!!"}}}"#, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "c: the auth entry for h is not valid base64");
        let err = Credentials::parse(b"{", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c: "), "{err}");
    }

    #[test]
    fn docker_config_overrides_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(
                r#"{{"auths": {{"localhost:5000": {{"auth": "{}"}}}}}}"#,
                b64("a:b")
            ),
        )
        .unwrap();
        let path = Credentials::path_from(
            Some(dir.path().as_os_str().to_owned()),
            Some("/home/someone".into()),
        )
        .unwrap();
        assert_eq!(path, dir.path().join("config.json"));
        assert_eq!(
            Credentials::path_from(Some("".into()), Some("/home/someone".into())).unwrap(),
            Path::new("/home/someone/.docker/config.json")
        );
        assert_eq!(Credentials::path_from(None, None), None);
        let creds = Credentials::load(&path).unwrap();
        assert_eq!(
            creds.for_host("localhost:5000"),
            RegistryAuth::Basic("a".into(), "b".into())
        );
        let missing = Credentials::load(&dir.path().join("absent.json")).unwrap();
        assert_eq!(missing, Credentials::default());
    }
}
