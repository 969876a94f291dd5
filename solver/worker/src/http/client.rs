//! The HTTP client of `http(s)://` sources, set up as BuildKit's (Go's default transport):
//! proxies from `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` (or their lower-case spellings) with
//! Go's rules (`golang.org/x/net/http/httpproxy`: loopback and `localhost` never go
//! through a proxy, `NO_PROXY` entries are `*`, IPs, CIDRs, domains matching their
//! subdomains, each with an optional port; `HTTP_PROXY` is ignored under CGI), and the
//! system's trusted CAs as Go's `crypto/x509` finds them (`SSL_CERT_FILE`, else the
//! first bundle of the usual distribution paths; `SSL_CERT_DIR` adds directories).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::error::HttpError;

/// Go's `certFiles` for Linux, in its order.
const CERT_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Go's `certDirectories` for Linux.
const CERT_DIRS: &[&str] = &["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// The client for downloads, configured from the process environment.
pub(crate) fn build() -> Result<reqwest::Client, HttpError> {
    let setup = |what: String, e: &dyn std::fmt::Display| HttpError::Setup {
        what,
        reason: e.to_string(),
    };
    let proxies = ProxyConfig::from_env();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(30))
        // A stalled transfer fails instead of hanging the build.
        .read_timeout(Duration::from_secs(300))
        .no_proxy()
        .proxy(reqwest::Proxy::custom(move |url| proxies.proxy_for(url)));
    let roots = system_roots().map_err(|(path, e)| setup(format!("reading {path}"), &e))?;
    if !roots.is_empty() {
        builder = builder.tls_built_in_root_certs(false);
        for pem in roots {
            // A bundle may hold entries rustls cannot use; Go skips those too.
            for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                builder = builder.add_root_certificate(cert);
            }
        }
    }
    builder
        .build()
        .map_err(|e| setup("setting up the HTTP client".to_owned(), &e))
}

/// The PEM files Go would trust: `SSL_CERT_FILE` or the first bundle found, plus every
/// file of `SSL_CERT_DIR`'s directories (the default directories only when no bundle was
/// found: on the distributions that have them they repeat the bundle).
fn system_roots() -> Result<Vec<Vec<u8>>, (String, std::io::Error)> {
    let mut pems = Vec::new();
    let file_env = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty());
    let files: Vec<std::path::PathBuf> = match &file_env {
        Some(f) => vec![f.into()],
        None => CERT_FILES.iter().map(Into::into).collect(),
    };
    for file in &files {
        match std::fs::read(file) {
            Ok(pem) => {
                pems.push(pem);
                break;
            }
            Err(e) if file_env.is_some() => return Err((file.display().to_string(), e)),
            Err(_) => {}
        }
    }
    let dirs: Vec<std::path::PathBuf> = match std::env::var_os("SSL_CERT_DIR") {
        Some(d) if !d.is_empty() => std::env::split_paths(&d).collect(),
        _ if pems.is_empty() => CERT_DIRS.iter().map(Into::into).collect(),
        _ => Vec::new(),
    };
    for dir in dirs {
        pems.extend(read_dir_pems(&dir));
    }
    Ok(pems)
}

fn read_dir_pems(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}

/// Go's proxy configuration from the environment.
#[derive(Clone, Debug, Default)]
struct ProxyConfig {
    http: Option<reqwest::Url>,
    https: Option<reqwest::Url>,
    cgi: bool,
    no_proxy: NoProxy,
}

#[derive(Clone, Debug, Default)]
struct NoProxy {
    all: bool,
    ips: Vec<(IpAddr, String)>,
    cidrs: Vec<(IpAddr, u8)>,
    /// `(".domain", port, also the bare domain)`.
    domains: Vec<(String, String, bool)>,
}

fn env_any(names: &[&str]) -> String {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        .unwrap_or_default()
}

/// Go's `parseProxy`: a URL with scheme http, https or socks5, else `http://` + value.
fn parse_proxy(value: &str) -> Option<reqwest::Url> {
    if value.is_empty() {
        return None;
    }
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https" | "socks5") => Some(url),
        _ => reqwest::Url::parse(&format!("http://{value}")).ok(),
    }
}

/// `host[:port]` with `[v6]` brackets, as `net.SplitHostPort` (`None` without a port).
fn split_host_port(s: &str) -> Option<(String, String)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host.to_owned(), port.to_owned()));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host.to_owned(), port.to_owned()))
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn in_cidr(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl NoProxy {
    fn parse(value: &str) -> Self {
        let mut no = NoProxy::default();
        for entry in value.split(',') {
            let p = entry.trim().to_lowercase();
            if p.is_empty() {
                continue;
            }
            if p == "*" {
                return NoProxy {
                    all: true,
                    ..NoProxy::default()
                };
            }
            if let Some(cidr) = parse_cidr(&p) {
                no.cidrs.push(cidr);
                continue;
            }
            let (mut host, port) = match split_host_port(&p) {
                Some((h, port)) => {
                    if h.is_empty() {
                        continue;
                    }
                    (h, port)
                }
                None => (p.clone(), String::new()),
            };
            if let Ok(ip) = host.parse::<IpAddr>() {
                no.ips.push((ip, port));
                continue;
            }
            if let Some(rest) = host.strip_prefix("*.") {
                host = format!(".{rest}");
            }
            let bare = !host.starts_with('.');
            if bare {
                host = format!(".{host}");
            }
            no.domains.push((host, port, bare));
        }
        no
    }

    /// Whether a request to `host:port` bypasses the proxy.
    fn bypass(&self, host: &str, port: &str) -> bool {
        if self.all {
            return true;
        }
        let ip = host.parse::<IpAddr>().ok();
        if let Some(ip) = ip {
            if self.cidrs.iter().any(|c| in_cidr(ip, *c))
                || self
                    .ips
                    .iter()
                    .any(|(m, p)| *m == ip && (p.is_empty() || p == port))
            {
                return true;
            }
        }
        self.domains.iter().any(|(suffix, p, bare)| {
            (host.ends_with(suffix.as_str()) || (*bare && host == &suffix[1..]))
                && (p.is_empty() || p == port)
        })
    }
}

impl ProxyConfig {
    fn from_env() -> Self {
        ProxyConfig {
            http: parse_proxy(&env_any(&["HTTP_PROXY", "http_proxy"])),
            https: parse_proxy(&env_any(&["HTTPS_PROXY", "https_proxy"])),
            cgi: std::env::var_os("REQUEST_METHOD").is_some_and(|v| !v.is_empty()),
            no_proxy: NoProxy::parse(&env_any(&["NO_PROXY", "no_proxy"])),
        }
    }

    /// Go's `proxyForURL`.
    fn proxy_for(&self, url: &reqwest::Url) -> Option<reqwest::Url> {
        let proxy = match url.scheme() {
            "https" => self.https.as_ref()?,
            "http" if self.cgi => return None,
            "http" => self.http.as_ref()?,
            _ => return None,
        };
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let host = host.to_lowercase();
        if host == "localhost" {
            return None;
        }
        if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return None;
        }
        let port = url
            .port_or_known_default()
            .map(|p| p.to_string())
            .unwrap_or_default();
        if self.no_proxy.bypass(&host, &port) {
            return None;
        }
        Some(proxy.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(http: &str, https: &str, no_proxy: &str) -> ProxyConfig {
        ProxyConfig {
            http: parse_proxy(http),
            https: parse_proxy(https),
            cgi: false,
            no_proxy: NoProxy::parse(no_proxy),
        }
    }

    fn via(c: &ProxyConfig, url: &str) -> Option<String> {
        c.proxy_for(&reqwest::Url::parse(url).unwrap())
            .map(|u| u.to_string())
    }

    #[test]
    fn proxies_follow_go_rules() {
        let c = config("proxy.internal:3128", "https://secure-proxy:8443", "");
        assert_eq!(
            via(&c, "http://example.com/x").as_deref(),
            Some("http://proxy.internal:3128/"),
            "a bare host:port gets http://"
        );
        assert_eq!(
            via(&c, "https://example.com/x").as_deref(),
            Some("https://secure-proxy:8443/")
        );
        assert_eq!(via(&c, "http://localhost:8080/x"), None);
        assert_eq!(via(&c, "http://127.0.0.1/x"), None);
        assert_eq!(via(&c, "http://[::1]:80/x"), None);
        let only_http = config("proxy:1", "", "");
        assert_eq!(via(&only_http, "https://example.com/"), None);
    }

    #[test]
    fn no_proxy_entries() {
        let c = config(
            "proxy:1",
            "proxy:1",
            " Example.com, .suffix.org, *.star.net, 10.0.0.0/8, 192.168.1.1, host.io:8080",
        );
        assert_eq!(via(&c, "http://example.com/"), None);
        assert_eq!(
            via(&c, "http://sub.example.com/"),
            None,
            "domains match subdomains"
        );
        assert!(via(&c, "http://notexample.com/").is_some());
        assert_eq!(via(&c, "http://a.suffix.org/"), None);
        assert!(
            via(&c, "http://suffix.org/").is_some(),
            ".domain: only below it"
        );
        assert_eq!(via(&c, "http://x.star.net/"), None);
        assert_eq!(via(&c, "http://10.1.2.3/"), None);
        assert_eq!(via(&c, "http://192.168.1.1/"), None);
        assert!(via(&c, "http://192.168.1.2/").is_some());
        assert_eq!(via(&c, "http://host.io:8080/"), None);
        assert!(via(&c, "http://host.io/").is_some(), "the port must match");
        let all = config("proxy:1", "proxy:1", "*");
        assert_eq!(via(&all, "http://example.com/"), None);
    }

    #[test]
    fn cgi_ignores_http_proxy() {
        let mut c = config("proxy:1", "proxy:2", "");
        c.cgi = true;
        assert_eq!(via(&c, "http://example.com/"), None);
        assert!(via(&c, "https://example.com/").is_some());
    }
}
