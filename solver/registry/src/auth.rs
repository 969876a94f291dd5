//! Registry credentials from Docker's client configuration: `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`, as the docker CLI and buildctl read it:
//! - `credHelpers.<host>` names a helper (`docker-credential-<name>` on `PATH`) for one host;
//! - `credsStore` names the helper for every other host;
//! - `auths.<host>` holds inline credentials: `auth` (base64 of `user:password`),
//!   `username`/`password`, or an `identitytoken` (an OAuth2 refresh token).
//!
//! A helper is run (`<helper> get`, the server URL on standard input, JSON
//! `{"Username","Secret"}` out) only when a registry asks for credentials, and a helper
//! that knows nothing of the host falls back to `auths`. A `Username` of `<token>` means the
//! secret is an identity token, as in Docker's protocol.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Errors from reading Docker's client configuration or running a credential helper.
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
    #[error("credential helper {helper} for {host}: {message}")]
    Helper {
        helper: String,
        host: String,
        message: String,
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

/// What kiln presents to one registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    /// User name and password: HTTP Basic, or the credentials of a token request.
    Basic(String, String),
    /// An OAuth2 refresh token (Docker's identity token) for the registry's token server.
    IdentityToken(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Basic(user, _) => write!(f, "Basic({user:?}, <secret>)"),
            Auth::IdentityToken(_) => f.write_str("IdentityToken(<secret>)"),
        }
    }
}

/// Credentials per registry host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    inline: BTreeMap<String, Auth>,
    helpers: BTreeMap<String, String>,
    store: Option<String>,
    /// `PATH` for finding helpers (tests put fakes first without touching the process).
    #[cfg(test)]
    helper_path: Option<std::ffi::OsString>,
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

/// The server URL a credential helper is asked about (Docker Hub keeps its v1 URL).
fn helper_server_url(host: &str) -> String {
    if host == "docker.io" {
        "https://index.docker.io/v1/".to_owned()
    } else {
        host.to_owned()
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(default, rename = "Username")]
    username: String,
    #[serde(default, rename = "Secret")]
    secret: String,
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
            let auth = match entry.auth.as_deref().filter(|a| !a.is_empty()) {
                Some(auth) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad("not valid base64"))?;
                    let decoded = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
                    let (user, pass) = decoded
                        .split_once(':')
                        .ok_or_else(|| bad("not of the form user:password"))?;
                    Some(Auth::Basic(user.to_owned(), pass.to_owned()))
                }
                None => match (&entry.username, &entry.password) {
                    (Some(user), Some(pass)) if !user.is_empty() => {
                        Some(Auth::Basic(user.clone(), pass.clone()))
                    }
                    _ => None,
                },
            };
            // An identity token replaces the password in token requests (docker CLI).
            let auth = match entry.identity_token.as_deref().filter(|t| !t.is_empty()) {
                Some(token) => Some(Auth::IdentityToken(token.to_owned())),
                None => auth,
            };
            if let Some(auth) = auth {
                creds.inline.insert(host, auth);
            }
        }
        for (host, helper) in &file.cred_helpers {
            if !helper.is_empty() {
                creds.helpers.insert(normalize_host(host), helper.clone());
            }
        }
        creds.store = file.creds_store.filter(|s| !s.is_empty());
        Ok(creds)
    }

    /// Credentials given inline, without helpers.
    pub fn with_inline(host: &str, auth: Auth) -> Self {
        let mut creds = Credentials::default();
        creds.inline.insert(normalize_host(host), auth);
        creds
    }

    /// What to present to `host` (a registry name such as `docker.io` or `localhost:5000`):
    /// its credential helper's answer, else the inline entry, else nothing.
    pub async fn for_host(&self, host: &str) -> Result<Auth, CredentialsError> {
        let host = normalize_host(host);
        let helper = self.helpers.get(&host).or(self.store.as_ref());
        if let Some(helper) = helper {
            #[cfg(test)]
            let path = self.helper_path.as_deref();
            #[cfg(not(test))]
            let path = None;
            if let Some(auth) = run_helper(helper, &host, path).await? {
                return Ok(auth);
            }
        }
        Ok(self.inline.get(&host).cloned().unwrap_or_default())
    }
}

/// Runs `docker-credential-<helper> get` for `host`; `None` when it knows no credentials.
async fn run_helper(
    helper: &str,
    host: &str,
    path: Option<&std::ffi::OsStr>,
) -> Result<Option<Auth>, CredentialsError> {
    use tokio::io::AsyncWriteExt as _;
    let program = format!("docker-credential-{helper}");
    let fail = |message: String| CredentialsError::Helper {
        helper: program.clone(),
        host: host.to_owned(),
        message,
    };
    let mut command = tokio::process::Command::new(&program);
    if let Some(path) = path {
        // A PATH set on the command is also where the program is looked up.
        command.env("PATH", path);
    }
    let mut child = command
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(helper_server_url(host).as_bytes())
            .await
            .map_err(|e| fail(format!("writing its input: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        // The helpers' protocol: "credentials not found" is not an error.
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("{}: {}", output.status, text.trim())));
    }
    let answer: HelperAnswer = serde_json::from_slice(&output.stdout)
        .map_err(|e| fail(format!("its answer is not JSON: {e}")))?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, secret) if secret.is_empty() => None,
        ("<token>", secret) => Some(Auth::IdentityToken(secret)),
        (user, secret) => Some(Auth::Basic(user.to_owned(), secret)),
    })
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
        let mut creds = Credentials::parse(json.as_bytes(), Path::new("config.json")).unwrap();
        // The helpers named here are not installed: checked separately below.
        creds.helpers.clear();
        creds.store = None;
        let rt = rt();
        let get = |host: &str| rt.block_on(creds.for_host(host)).unwrap();
        assert_eq!(
            get("docker.io"),
            Auth::Basic("hubuser".into(), "hub:pass".into())
        );
        assert_eq!(
            get("index.docker.io"),
            Auth::Basic("hubuser".into(), "hub:pass".into())
        );
        assert_eq!(
            get("localhost:5000"),
            Auth::Basic("me".into(), "secret".into())
        );
        assert_eq!(
            get("registry.internal:5000"),
            Auth::Basic("u2".into(), "p2".into())
        );
        assert_eq!(get("quay.io"), Auth::IdentityToken("tok".into()));
        for anonymous in ["ghcr.io", "gcr.io", "localhost:5001"] {
            assert_eq!(get(anonymous), Auth::Anonymous, "{anonymous}");
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A fake `docker-credential-<name>` in a directory put first on PATH: it answers
    /// for `helper.test`, prints "credentials not found" for anything else, and records
    /// what it was asked.
    #[test]
    fn credential_helpers_are_run_for_their_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("asked");
        for (name, user) in [("kilntest", "helper-user"), ("kilnstore", "<token>")] {
            let script = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\nread host\necho \"{name} $1 $host\" >> '{}'\ncase \"$host\" in\n  *.test) echo '{{\"ServerURL\":\"x\",\"Username\":\"{user}\",\"Secret\":\"s3cret\"}}' ;;\n  *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n",
                    log.display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let json = format!(
            r#"{{"credHelpers": {{"helper.test": "kilntest"}}, "credsStore": "kilnstore",
                "auths": {{"inline.example": {{"auth": "{}"}}}}}}"#,
            b64("in:line")
        );
        let mut creds = Credentials::parse(json.as_bytes(), Path::new("c.json")).unwrap();
        let mut path = std::ffi::OsString::from(dir.path());
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        creds.helper_path = Some(path.clone());
        let rt = rt();
        assert_eq!(
            rt.block_on(creds.for_host("helper.test")).unwrap(),
            Auth::Basic("helper-user".into(), "s3cret".into())
        );
        // credsStore for the rest: a token user is an identity token...
        assert_eq!(
            rt.block_on(creds.for_host("store.test")).unwrap(),
            Auth::IdentityToken("s3cret".into())
        );
        // ...and a host the store does not know falls back to the inline entry.
        assert_eq!(
            rt.block_on(creds.for_host("inline.example")).unwrap(),
            Auth::Basic("in".into(), "line".into())
        );
        assert_eq!(
            rt.block_on(creds.for_host("docker.io")).unwrap(),
            Auth::Anonymous
        );
        let asked = std::fs::read_to_string(&log).unwrap();
        assert!(asked.contains("kilntest get helper.test"), "{asked}");
        assert!(
            asked.contains("kilnstore get https://index.docker.io/v1/"),
            "{asked}"
        );
        let mut broken =
            Credentials::parse(br#"{"credsStore": "kiln-absent-helper"}"#, Path::new("c")).unwrap();
        broken.helper_path = Some(path);
        let err = rt
            .block_on(broken.for_host("x.test"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "credential helper docker-credential-kiln-absent-helper for x.test: cannot run it"
            ),
            "{err}"
        );
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
            rt().block_on(creds.for_host("localhost:5000")).unwrap(),
            Auth::Basic("a".into(), "b".into())
        );
        let missing = Credentials::load(&dir.path().join("absent.json")).unwrap();
        assert_eq!(missing, Credentials::default());
    }
}
