//! The registry client: the OCI distribution API over HTTP(S), as containerd's resolver
//! (which buildctl and dockerd use) speaks it.
//!
//! - **Transport** per host from `kiln.toml` ([`super::hosts`]): plain HTTP, HTTPS with the
//!   built-in roots plus the host's `ca` files, a client certificate (`keypair`), or HTTPS
//!   without verification (`insecure`). Pulls try the host's `mirrors` first.
//! - **Auth**: a request is sent anonymously (or with what the host accepted before); a
//!   `401` with a `Basic` challenge is answered with the host's credentials, a `Bearer`
//!   challenge with a token from the realm (GET with Basic credentials, or an OAuth2
//!   refresh-token POST for identity tokens), cached per scope. Credentials come from
//!   [`Credentials`] (Docker's config and credential helpers), asked once per host.
//! - **Retries** with exponential backoff on 5xx answers, timeouts and dropped connections
//!   for requests that can be repeated; uploads restart their session.
//! - **Errors** name the registry, what was being done and why (`401 unauthorized`, `not
//!   found`, a TLS failure with the certificate problem).
//!
//! Blob uploads are chunked (`POST`, `PATCH` with `Content-Range`, `PUT ?digest=`), read
//! from a file chunk by chunk; cross-repository mounts (`POST ?mount=&from=`) and blob
//! existence checks (`HEAD`) let a push skip what the registry has.
//!
//! Built on `reqwest` (the HTTP client `oci-client` itself uses): `oci-client` 0.15 has no
//! client certificates, no blob existence check, uploads only from memory and no retries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use kiln_proto::Digest;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;

use super::auth::{Auth, Credentials, CredentialsError};
use super::hosts::{RegistryHosts, Transport};

/// Errors from talking to a registry. Each names the registry and what kiln was doing.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{registry}: {what}: 401 unauthorized: {reason}")]
    Unauthorized {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: 403 forbidden: {reason}")]
    Forbidden {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: not found: {reason}")]
    NotFound {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: HTTP {status}: {reason}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        reason: String,
    },
    #[error("{registry}: {what}: TLS: {reason}")]
    Tls {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: {reason}")]
    Transport {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: the registry's answer is malformed: {reason}")]
    Protocol {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: reading {path}: {source}")]
    TlsFile {
        registry: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{registry}: {what}: {reason}")]
    Setup {
        registry: String,
        what: String,
        reason: String,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

impl ClientError {
    /// Whether the registry said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound { .. })
    }
}

/// Counts of bodies downloaded, for progress, tests and the cache figures.
#[derive(Debug, Default)]
pub struct TransferStats {
    pub downloads: AtomicUsize,
    pub bytes_down: AtomicU64,
    pub uploads: AtomicUsize,
    pub bytes_up: AtomicU64,
}

impl TransferStats {
    fn down(&self, bytes: u64) {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
    }

    fn up(&self, bytes: u64) {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `(downloads, bytes downloaded)`.
    pub fn downloaded(&self) -> (usize, u64) {
        (
            self.downloads.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
        )
    }

    /// `(uploads, bytes uploaded)`: blobs and manifests sent.
    pub fn uploaded(&self) -> (usize, u64) {
        (
            self.uploads.load(Ordering::Relaxed),
            self.bytes_up.load(Ordering::Relaxed),
        )
    }
}

/// How often and how patiently requests are repeated.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubled each time.
    pub initial: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 4,
            initial: Duration::from_millis(250),
        }
    }
}

/// Largest upload chunk (a `PATCH` body).
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;

/// One host requests go to (the registry itself or a mirror).
#[derive(Debug)]
struct Endpoint {
    /// The registry name (`localhost:5443`, `docker.io`): credentials and messages.
    name: String,
    /// The network host (`registry-1.docker.io` for Docker Hub).
    api_host: String,
    scheme: &'static str,
    http: reqwest::Client,
    /// The `Authorization` value per scope; `"*"` holds a Basic one (any scope).
    authorization: Mutex<HashMap<String, String>>,
    auth: tokio::sync::OnceCell<Auth>,
}

impl Endpoint {
    fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.api_host)
    }
}

/// Access to one registry (and its mirrors, for pulls). Cheap to share behind an `Arc`:
/// tokens are reused by every request of the build.
#[derive(Debug)]
pub struct RegistryClient {
    endpoints: Vec<Arc<Endpoint>>,
    credentials: Credentials,
    retry: RetryPolicy,
    chunk_size: usize,
    pub stats: TransferStats,
}

/// What a pull or push needs from the registry, for token scopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access<'a> {
    Pull(&'a str),
    Push(&'a str),
    /// Push to the first repository, mounting from the second.
    Mount(&'a str, &'a str),
}

impl Access<'_> {
    fn scopes(self) -> Vec<String> {
        match self {
            Access::Pull(repo) => vec![format!("repository:{repo}:pull")],
            Access::Push(repo) => vec![format!("repository:{repo}:pull,push")],
            Access::Mount(repo, from) => vec![
                format!("repository:{repo}:pull,push"),
                format!("repository:{from}:pull"),
            ],
        }
    }

    fn key(self) -> String {
        self.scopes().join(" ")
    }
}

/// The network host of a registry name.
fn api_host(name: &str) -> String {
    match name {
        "docker.io" | "index.docker.io" => "registry-1.docker.io".to_owned(),
        other => other.to_owned(),
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The reason a registry gave in its error body (`{"errors":[{"code","message"}]}`), or
/// the body's start.
fn body_reason(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code.to_lowercase(), e.message),
                (false, true) => e.code.to_lowercase(),
                _ => e.message.clone(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "no details given".to_owned()
    } else {
        text.chars().take(200).collect()
    }
}

/// Parameters of a `WWW-Authenticate` challenge: `(scheme, params)`.
fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, val);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
}

fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// A response kiln expects, or the error it means.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub response: reqwest::Response,
}

impl RegistryClient {
    /// A client for registry `name` (`host[:port]`) with `hosts`' settings for it and its
    /// mirrors. Reading a CA or key file fails here, naming the file.
    pub fn new(
        name: &str,
        hosts: &RegistryHosts,
        credentials: Credentials,
    ) -> Result<Self, ClientError> {
        let mut endpoints = Vec::new();
        for mirror in hosts.mirrors(name) {
            endpoints.push(Arc::new(endpoint(mirror, hosts)?));
        }
        endpoints.push(Arc::new(endpoint(name, hosts)?));
        Ok(RegistryClient {
            endpoints,
            credentials,
            retry: RetryPolicy::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            stats: TransferStats::default(),
        })
    }

    /// Changes the upload chunk size (tests use small chunks to exercise the protocol).
    pub fn with_chunk_size(mut self, size: usize) -> Self {
        self.chunk_size = size.max(1);
        self
    }

    /// Changes the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The registry's name.
    pub fn name(&self) -> &str {
        self.endpoints.last().map_or("", |e| e.name.as_str())
    }

    fn host(&self) -> &Arc<Endpoint> {
        // `new` always pushes the host itself last.
        &self.endpoints[self.endpoints.len() - 1]
    }

    async fn credentials_for(&self, ep: &Endpoint) -> Result<Auth, ClientError> {
        let auth = ep
            .auth
            .get_or_try_init(|| self.credentials.for_host(&ep.name))
            .await?;
        Ok(auth.clone())
    }

    fn cached_authorization(&self, ep: &Endpoint, access: Access<'_>) -> Option<String> {
        let map = ep
            .authorization
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&access.key()).or_else(|| map.get("*")).cloned()
    }

    /// Answers a `401`: works out the `Authorization` for `access` from the challenge.
    async fn authorize(
        &self,
        ep: &Endpoint,
        access: Access<'_>,
        challenge: Option<&str>,
        what: &str,
        body: &[u8],
    ) -> Result<(), ClientError> {
        let unauthorized = |reason: String| ClientError::Unauthorized {
            registry: ep.name.clone(),
            what: what.to_owned(),
            reason,
        };
        let Some(challenge) = challenge else {
            return Err(unauthorized(body_reason(body)));
        };
        let (scheme, params) = parse_challenge(challenge);
        let auth = self.credentials_for(ep).await?;
        let value = match scheme.as_str() {
            "basic" => match &auth {
                Auth::Basic(user, pass) => {
                    let encoded =
                        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                    let value = format!("Basic {encoded}");
                    ep.authorization
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert("*".to_owned(), value);
                    return Ok(());
                }
                _ => {
                    return Err(unauthorized(format!(
                        "the registry asks for a user name and password, and none is \
                         configured for {} (docker login, or ~/.docker/config.json)",
                        ep.name
                    )));
                }
            },
            "bearer" => {
                let token = self.fetch_token(ep, access, &params, &auth, what).await?;
                format!("Bearer {token}")
            }
            other => {
                return Err(unauthorized(format!(
                    "unsupported authentication scheme {other:?}"
                )));
            }
        };
        ep.authorization
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(access.key(), value);
        Ok(())
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        access: Access<'_>,
        params: &HashMap<String, String>,
        auth: &Auth,
        what: &str,
    ) -> Result<String, ClientError> {
        let realm = params.get("realm").ok_or_else(|| ClientError::Protocol {
            registry: ep.name.clone(),
            what: what.to_owned(),
            reason: "a Bearer challenge without a realm".to_owned(),
        })?;
        let url = Url::parse(realm).map_err(|e| ClientError::Protocol {
            registry: ep.name.clone(),
            what: what.to_owned(),
            reason: format!("token realm {realm:?}: {e}"),
        })?;
        let service = params.get("service").cloned().unwrap_or_default();
        let mut scopes = access.scopes();
        if let Some(asked) = params.get("scope") {
            if !scopes.contains(asked) {
                scopes.push(asked.clone());
            }
        }
        let request = match auth {
            Auth::IdentityToken(token) => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", token.clone()),
                    ("service", service.clone()),
                    ("client_id", "kiln".to_owned()),
                ];
                form.extend(scopes.iter().map(|s| ("scope", s.clone())));
                ep.http.post(url).form(&form)
            }
            other => {
                let mut query: Vec<(&str, String)> = Vec::new();
                if !service.is_empty() {
                    query.push(("service", service.clone()));
                }
                query.extend(scopes.iter().map(|s| ("scope", s.clone())));
                let request = ep.http.get(url).query(&query);
                match other {
                    Auth::Basic(user, pass) => request.basic_auth(user, Some(pass)),
                    _ => request,
                }
            }
        };
        let token_what = format!("{what} (token from {realm})");
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&ep.name, &token_what, &e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(&ep.name, &token_what, &e))?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ClientError::Unauthorized {
                registry: ep.name.clone(),
                what: what.to_owned(),
                reason: format!(
                    "the token server refused the credentials{}: {}",
                    match auth {
                        Auth::Anonymous => " (none are configured)",
                        _ => "",
                    },
                    body_reason(&body)
                ),
            });
        }
        if !status.is_success() {
            return Err(ClientError::Status {
                registry: ep.name.clone(),
                what: token_what,
                status: status.as_u16(),
                reason: body_reason(&body),
            });
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
                registry: ep.name.clone(),
                what: token_what.clone(),
                reason: e.to_string(),
            })?;
        let token = if answer.token.is_empty() {
            answer.access_token
        } else {
            answer.token
        };
        if token.is_empty() {
            return Err(ClientError::Protocol {
                registry: ep.name.clone(),
                what: token_what,
                reason: "no token in the answer".to_owned(),
            });
        }
        Ok(token)
    }

    /// Sends a request built by `build` (called again for every attempt), answering auth
    /// challenges and retrying what can be retried.
    async fn send(
        &self,
        ep: &Endpoint,
        access: Access<'_>,
        what: &str,
        repeatable: bool,
        build: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<Answer, ClientError> {
        let mut attempt = 0;
        let mut authorized = false;
        loop {
            let mut request = build(&ep.http);
            if let Some(value) = self.cached_authorization(ep, access) {
                request = request.header(AUTHORIZATION, value);
            }
            match request.send().await {
                Err(e) => {
                    let retry = repeatable
                        && attempt < self.retry.retries
                        && (e.is_timeout() || e.is_connect() || e.is_request() || e.is_body())
                        && !is_tls(&e);
                    if !retry {
                        return Err(transport_error(&ep.name, what, &e));
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED && !authorized {
                        authorized = true;
                        let challenge = response
                            .headers()
                            .get_all(reqwest::header::WWW_AUTHENTICATE)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            // Prefer Bearer when a registry offers both.
                            .max_by_key(|v| v.to_ascii_lowercase().starts_with("bearer"))
                            .map(str::to_owned);
                        let body = response.bytes().await.unwrap_or_default();
                        self.authorize(ep, access, challenge.as_deref(), what, &body)
                            .await?;
                        continue;
                    }
                    if !(repeatable && is_retryable_status(status) && attempt < self.retry.retries)
                    {
                        return Ok(Answer {
                            status,
                            headers: response.headers().clone(),
                            response,
                        });
                    }
                }
            }
            let wait = self.retry.initial * 2u32.saturating_pow(attempt);
            tracing::debug!("{}: {what}: retrying in {wait:?}", ep.name);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Turns an unexpected answer into the error it means.
    async fn unexpected(&self, ep: &Endpoint, what: &str, answer: Answer) -> ClientError {
        let status = answer.status;
        let body = answer.response.bytes().await.unwrap_or_default();
        let reason = body_reason(&body);
        let (registry, what) = (ep.name.clone(), what.to_owned());
        match status {
            StatusCode::UNAUTHORIZED => ClientError::Unauthorized {
                registry,
                what,
                reason,
            },
            StatusCode::FORBIDDEN => ClientError::Forbidden {
                registry,
                what,
                reason,
            },
            StatusCode::NOT_FOUND => ClientError::NotFound {
                registry,
                what,
                reason,
            },
            other => ClientError::Status {
                registry,
                what,
                status: other.as_u16(),
                reason,
            },
        }
    }

    /// Runs `op` against each endpoint a pull may use (mirrors first), returning the first
    /// success or the host's own error.
    async fn pull_from<'a, T, F, Fut>(&'a self, op: F) -> Result<T, ClientError>
    where
        F: Fn(&'a Arc<Endpoint>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let last = self.endpoints.len() - 1;
        for (i, ep) in self.endpoints.iter().enumerate() {
            match op(ep).await {
                Ok(v) => return Ok(v),
                Err(e) if i < last => {
                    tracing::debug!("mirror {}: {e}; trying the next host", ep.name);
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("a client always has its own host as last endpoint")
    }

    /// `HEAD` of a manifest by tag or digest: its digest, media type and size.
    pub async fn resolve(
        &self,
        repo: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<(Digest, String, u64), ClientError> {
        let accept = accept.join(", ");
        self.pull_from(|ep| {
            let accept = accept.clone();
            async move {
                let what = format!("resolving {repo}:{reference}");
                let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base());
                let answer = self
                    .send(ep, Access::Pull(repo), &what, true, &|c| {
                        c.head(&url).header(ACCEPT, &accept)
                    })
                    .await?;
                if !answer.status.is_success() {
                    return Err(self.unexpected(ep, &what, answer).await);
                }
                let media_type = header(&answer.headers, "content-type");
                let size = header(&answer.headers, "content-length")
                    .parse()
                    .unwrap_or(0);
                let digest = header(&answer.headers, "docker-content-digest");
                if let Ok(digest) = digest.parse::<Digest>() {
                    return Ok((digest, media_type, size));
                }
                // No digest header: fetch the manifest and hash it.
                let (bytes, media_type) = self
                    .get_manifest_from(ep, repo, reference, &accept, u64::MAX)
                    .await?;
                Ok((Digest::of(&bytes), media_type, bytes.len() as u64))
            }
        })
        .await
    }

    /// A manifest or index by tag or digest, at most `limit` bytes: `(bytes, media type)`.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[&str],
        limit: u64,
    ) -> Result<(Vec<u8>, String), ClientError> {
        let accept = accept.join(", ");
        self.pull_from(|ep| {
            let accept = accept.clone();
            async move {
                self.get_manifest_from(ep, repo, reference, &accept, limit)
                    .await
            }
        })
        .await
    }

    async fn get_manifest_from(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        accept: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, String), ClientError> {
        let what = format!("fetching manifest {repo}:{reference}");
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base());
        let answer = self
            .send(ep, Access::Pull(repo), &what, true, &|c| {
                c.get(&url).header(ACCEPT, accept)
            })
            .await?;
        if !answer.status.is_success() {
            return Err(self.unexpected(ep, &what, answer).await);
        }
        let media_type = header(&answer.headers, "content-type");
        let bytes = read_limited(answer.response, limit, &ep.name, &what).await?;
        self.stats.down(bytes.len() as u64);
        Ok((bytes, media_type))
    }

    /// Starts downloading blob `digest`; the caller reads (and checks) the body.
    pub async fn get_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<reqwest::Response, ClientError> {
        self.pull_from(|ep| async move {
            let what = format!("fetching blob {digest} of {repo}");
            let url = format!("{}/v2/{repo}/blobs/{digest}", ep.base());
            let answer = self
                .send(ep, Access::Pull(repo), &what, true, &|c| c.get(&url))
                .await?;
            if !answer.status.is_success() {
                return Err(self.unexpected(ep, &what, answer).await);
            }
            Ok(answer.response)
        })
        .await
    }

    /// Records a completed blob download in the statistics.
    pub(crate) fn count_download(&self, bytes: u64) {
        self.stats.down(bytes);
    }

    /// Whether the registry has blob `digest` in `repo` (a `HEAD`); its size when it has.
    pub async fn blob_exists(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, ClientError> {
        let ep = self.host();
        let what = format!("checking blob {digest} in {repo}");
        let url = format!("{}/v2/{repo}/blobs/{digest}", ep.base());
        let answer = self
            .send(ep, Access::Push(repo), &what, true, &|c| c.head(&url))
            .await?;
        match answer.status {
            s if s.is_success() => Ok(Some(
                header(&answer.headers, "content-length")
                    .parse()
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.unexpected(ep, &what, answer).await),
        }
    }

    /// Asks the registry to mount blob `digest` from repository `from` into `repo`;
    /// `false` when it would not (the blob then has to be uploaded).
    pub async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &Digest,
    ) -> Result<bool, ClientError> {
        let ep = self.host();
        let what = format!("mounting blob {digest} from {from} into {repo}");
        let url = format!(
            "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
            ep.base()
        );
        let answer = self
            .send(ep, Access::Mount(repo, from), &what, false, &|c| {
                c.post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        match answer.status {
            StatusCode::CREATED => Ok(true),
            // An upload session was opened instead: leave it, the registry expires it.
            StatusCode::ACCEPTED => Ok(false),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.unexpected(ep, &what, answer).await),
        }
    }

    /// Uploads blob `digest` of `size` bytes from `path` in chunks; the whole upload is
    /// started again when a chunk fails with something a retry may cure.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<(), ClientError> {
        let mut attempt = 0;
        loop {
            match self.push_blob_once(repo, digest, size, path).await {
                Ok(()) => {
                    self.stats.up(size);
                    return Ok(());
                }
                Err(e) if attempt < self.retry.retries && retryable(&e) => {
                    let wait = self.retry.initial * 2u32.saturating_pow(attempt);
                    tracing::debug!("{e}; restarting the upload in {wait:?}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn push_blob_once(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<(), ClientError> {
        let ep = self.host();
        let what = format!("uploading blob {digest} to {repo}");
        let url = format!("{}/v2/{repo}/blobs/uploads/", ep.base());
        let answer = self
            .send(ep, Access::Push(repo), &what, false, &|c| {
                c.post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(self.unexpected(ep, &what, answer).await);
        }
        let mut location = location(ep, &answer.headers, &what)?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::Transport {
                registry: ep.name.clone(),
                what: what.clone(),
                reason: format!("opening {}: {e}", path.display()),
            })?;
        let mut offset: u64 = 0;
        while offset < size {
            let len = (size - offset).min(self.chunk_size as u64) as usize;
            let mut chunk = vec![0u8; len];
            file.read_exact(&mut chunk)
                .await
                .map_err(|e| ClientError::Transport {
                    registry: ep.name.clone(),
                    what: what.clone(),
                    reason: format!("reading {}: {e}", path.display()),
                })?;
            let range = format!("{}-{}", offset, offset + len as u64 - 1);
            let target = location.clone();
            let answer = self
                .send(ep, Access::Push(repo), &what, false, &|c| {
                    c.patch(target.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header("Content-Range", range.as_str())
                        .header(CONTENT_LENGTH, len)
                        .body(chunk.clone())
                })
                .await?;
            if answer.status != StatusCode::ACCEPTED {
                return Err(self.unexpected(ep, &what, answer).await);
            }
            location = self::location(ep, &answer.headers, &what)?;
            offset += len as u64;
        }
        let mut done = location.clone();
        done.query_pairs_mut()
            .append_pair("digest", digest.as_str());
        let answer = self
            .send(ep, Access::Push(repo), &what, false, &|c| {
                c.put(done.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        if answer.status != StatusCode::CREATED {
            return Err(self.unexpected(ep, &what, answer).await);
        }
        Ok(())
    }

    /// Uploads a small blob held in memory (configs, cache configs).
    pub async fn push_blob_bytes(
        &self,
        repo: &str,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        let file = tempfile::NamedTempFile::new().map_err(|e| ClientError::Transport {
            registry: self.name().to_owned(),
            what: format!("uploading blob {digest} to {repo}"),
            reason: format!("temporary file: {e}"),
        })?;
        std::fs::write(file.path(), bytes).map_err(|e| ClientError::Transport {
            registry: self.name().to_owned(),
            what: format!("uploading blob {digest} to {repo}"),
            reason: format!("temporary file: {e}"),
        })?;
        self.push_blob_file(repo, digest, bytes.len() as u64, file.path())
            .await
    }

    /// Stores a manifest or index under `reference` (a tag or its digest).
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        let ep = self.host();
        let what = format!("pushing manifest {repo}:{reference}");
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base());
        let body = bytes.to_vec();
        let answer = self
            .send(ep, Access::Push(repo), &what, true, &|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if !answer.status.is_success() {
            return Err(self.unexpected(ep, &what, answer).await);
        }
        self.stats.up(bytes.len() as u64);
        Ok(())
    }
}

fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Status { status, .. } => {
            is_retryable_status(StatusCode::from_u16(*status).unwrap_or(StatusCode::OK))
        }
        ClientError::Transport { .. } => true,
        _ => false,
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn location(ep: &Endpoint, headers: &HeaderMap, what: &str) -> Result<Url, ClientError> {
    let value = header(headers, "location");
    let base = Url::parse(&format!("{}/", ep.base())).map_err(|e| ClientError::Protocol {
        registry: ep.name.clone(),
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    if value.is_empty() {
        return Err(ClientError::Protocol {
            registry: ep.name.clone(),
            what: what.to_owned(),
            reason: "no Location in the answer".to_owned(),
        });
    }
    base.join(&value).map_err(|e| ClientError::Protocol {
        registry: ep.name.clone(),
        what: what.to_owned(),
        reason: format!("Location {value:?}: {e}"),
    })
}

async fn read_limited(
    mut response: reqwest::Response,
    limit: u64,
    registry: &str,
    what: &str,
) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(registry, what, &e))?
    {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > limit {
            return Err(ClientError::Protocol {
                registry: registry.to_owned(),
                what: what.to_owned(),
                reason: format!("the body is over the {limit}-byte limit"),
            });
        }
    }
    Ok(out)
}

fn is_tls(e: &reqwest::Error) -> bool {
    let text = error_chain(e).to_ascii_lowercase();
    text.contains("certificate") || text.contains("tls") || text.contains("handshake")
}

pub(crate) fn transport_error(registry: &str, what: &str, e: &reqwest::Error) -> ClientError {
    let chain = error_chain(e);
    if is_tls(e) {
        return ClientError::Tls {
            registry: registry.to_owned(),
            what: what.to_owned(),
            reason: chain,
        };
    }
    ClientError::Transport {
        registry: registry.to_owned(),
        what: what.to_owned(),
        reason: chain,
    }
}

fn endpoint(name: &str, hosts: &RegistryHosts) -> Result<Endpoint, ClientError> {
    let transport = hosts.transport(name);
    let setup = |what: &str, reason: String| ClientError::Setup {
        registry: name.to_owned(),
        what: what.to_owned(),
        reason,
    };
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(30))
        // A stalled transfer fails instead of hanging the build.
        .read_timeout(Duration::from_secs(300))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if transport == Transport::HttpsInsecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(config) = hosts.config(name) {
        for ca in &config.ca {
            let pem = std::fs::read(ca).map_err(|source| ClientError::TlsFile {
                registry: name.to_owned(),
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| setup(&format!("CA file {}", ca.display()), e.to_string()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(pair) = config.keypair.first() {
            let mut pem = std::fs::read(&pair.cert).map_err(|source| ClientError::TlsFile {
                registry: name.to_owned(),
                path: pair.cert.clone(),
                source,
            })?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(&pair.key).map_err(|source| ClientError::TlsFile {
                    registry: name.to_owned(),
                    path: pair.key.clone(),
                    source,
                })?,
            );
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                setup(
                    &format!(
                        "client certificate {} with key {}",
                        pair.cert.display(),
                        pair.key.display()
                    ),
                    e.to_string(),
                )
            })?;
            builder = builder.identity(identity);
        }
    }
    let http = builder
        .build()
        .map_err(|e| setup("setting up the HTTP client", error_chain(&e)))?;
    Ok(Endpoint {
        name: name.to_owned(),
        api_host: api_host(name),
        scheme: match transport {
            Transport::Http => "http",
            Transport::Https | Transport::HttpsInsecure => "https",
        },
        http,
        authorization: Mutex::new(HashMap::new()),
        auth: tokio::sync::OnceCell::new(),
    })
}

/// One client per registry for a build, so tokens and connections are shared.
#[derive(Debug, Clone)]
pub struct RegistryClients {
    hosts: RegistryHosts,
    credentials: Credentials,
    clients: Arc<Mutex<HashMap<String, Arc<RegistryClient>>>>,
}

impl RegistryClients {
    pub fn new(hosts: RegistryHosts, credentials: Credentials) -> Self {
        RegistryClients {
            hosts,
            credentials,
            clients: Arc::default(),
        }
    }

    /// The client for registry `name`, made on first use.
    pub fn get(&self, name: &str) -> Result<Arc<RegistryClient>, ClientError> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let client = Arc::new(RegistryClient::new(
            name,
            &self.hosts,
            self.credentials.clone(),
        )?);
        clients.insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// Bytes and bodies downloaded from every registry so far: `(downloads, bytes)`.
    pub fn downloaded(&self) -> (usize, u64) {
        self.sum(TransferStats::downloaded)
    }

    /// Bytes and bodies uploaded to every registry so far: `(uploads, bytes)`.
    pub fn uploaded(&self) -> (usize, u64) {
        self.sum(TransferStats::uploaded)
    }

    fn sum(&self, of: fn(&TransferStats) -> (usize, u64)) -> (usize, u64) {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.values().fold((0, 0), |(n, b), c| {
            let (n2, b2) = of(&c.stats);
            (n + n2, b + b2)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["service"], "registry.example");
        assert_eq!(params["scope"], "repository:a/b:pull");
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "basic");
        assert_eq!(params["realm"], "Registry Realm");
        let (_, params) = parse_challenge(r#"Bearer realm=plain, service="q\"x""#);
        assert_eq!(params["realm"], "plain");
        assert_eq!(params["service"], "q\"x");
    }

    #[test]
    fn registry_error_bodies_become_reasons() {
        assert_eq!(
            body_reason(
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            "manifest_unknown: manifest unknown"
        );
        assert_eq!(body_reason(b""), "no details given");
        assert_eq!(body_reason(b"plain text"), "plain text");
    }

    #[test]
    fn scopes_for_pull_push_and_mount() {
        assert_eq!(Access::Pull("a/b").key(), "repository:a/b:pull");
        assert_eq!(
            Access::Mount("x", "y").scopes(),
            ["repository:x:pull,push", "repository:y:pull"]
        );
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("localhost:5443"), "localhost:5443");
    }

    #[test]
    fn missing_tls_files_are_named() {
        let hosts = RegistryHosts::parse(
            "[registry.\"r.test\"]\nca = [\"/nonexistent/ca.pem\"]\n",
            Path::new("kiln.toml"),
        )
        .unwrap();
        let err = RegistryClient::new("r.test", &hosts, Credentials::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("r.test: reading /nonexistent/ca.pem: "),
            "{err}"
        );
    }
}
