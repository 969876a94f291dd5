//! The `/etc/hosts` and `/etc/resolv.conf` a step sees (../shared/spec/exec-runtime.md §5).
//!
//! Both are generated into the step's private run directory and bind-mounted read-only, so
//! a step can neither change the host's files nor another step's.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Errors from generating the files.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("failed to parse IP {0}")]
    BadIp(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An extra `/etc/hosts` line from `Meta.extraHosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraHost {
    pub host: String,
    pub ip: IpAddr,
}

impl ExtraHost {
    /// Parses BuildKit's textual IP; the error names the value (`failed to parse IP <ip>`).
    pub fn parse(host: &str, ip: &str) -> Result<Self, HostsError> {
        let ip: IpAddr = ip.parse().map_err(|_| HostsError::BadIp(ip.to_owned()))?;
        Ok(ExtraHost {
            host: host.to_owned(),
            ip,
        })
    }
}

/// The hosts file content for `hostname` plus `extra` lines.
pub fn hosts_content(hostname: &str, extra: &[ExtraHost]) -> String {
    let mut out =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for e in extra {
        // IPv4-mapped IPv6 addresses print in their IPv4 form, as Go's net.IP does.
        let ip = match e.ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
            IpAddr::V4(v4) => v4.to_string(),
        };
        out.push_str(&format!("{ip}\t{}\n", e.host));
    }
    out
}

const GOOGLE_DNS: &str = "\nnameserver 8.8.8.8\nnameserver 8.8.4.4\nnameserver 2001:4860:4860::8888\nnameserver 2001:4860:4860::8844";

/// A step's resolv.conf from the host's: loopback nameservers are unreachable from a
/// step's own network namespace and are dropped unless the step shares the host network;
/// with none left, public resolvers are added (BuildKit's behaviour).
pub fn resolv_content(host_resolv: &str, host_network: bool) -> String {
    if host_network {
        return host_resolv.to_owned();
    }
    let mut kept: Vec<&str> = Vec::new();
    for line in host_resolv.lines() {
        let mut fields = line.split_whitespace();
        let is_loopback_ns = fields.next() == Some("nameserver")
            && fields
                .next()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
        if !is_loopback_ns {
            kept.push(line);
        }
    }
    let mut out = kept.join("\n");
    if host_resolv.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    let has_nameserver = kept
        .iter()
        .any(|l| l.split_whitespace().next() == Some("nameserver"));
    if !has_nameserver {
        out.push_str(GOOGLE_DNS);
    }
    out
}

/// Which nameservers a step's resolv.conf names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// The host's file unchanged (the step shares kiln's network).
    Host,
    /// The host's file without loopback nameservers, public ones if none is left
    /// (BuildKit's rewrite for a network of the step's own).
    Filtered,
    /// Only this nameserver (a sandbox network's DNS forwarder, which reaches whatever
    /// the host's resolv.conf names, loopback resolvers included); search and options
    /// lines are kept.
    Forwarder(IpAddr),
}

/// A step's resolv.conf naming only `nameserver`, with the host's other lines.
pub fn forwarder_content(host_resolv: &str, nameserver: IpAddr) -> String {
    let mut out: Vec<String> = host_resolv
        .lines()
        .filter(|l| l.split_whitespace().next() != Some("nameserver"))
        .map(str::to_owned)
        .collect();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.push(format!("nameserver {nameserver}"));
    out.join("\n") + "\n"
}

/// The host resolv.conf BuildKit starts from: `/etc/resolv.conf`, or systemd-resolved's
/// upstream file when the host only points at the 127.0.0.53 stub.
pub fn read_host_resolv() -> String {
    let main = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let nameservers: Vec<&str> = main
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(str::trim)
        .collect();
    if nameservers == ["127.0.0.53"] {
        if let Ok(upstream) = std::fs::read_to_string("/run/systemd/resolve/resolv.conf") {
            return upstream;
        }
    }
    main
}

/// Writes `content` to `path` unless it already holds exactly that, atomically (a
/// temporary file renamed over it), so concurrent kiln processes never see a partial file.
fn write_if_changed(path: &Path, content: &str) -> Result<(), HostsError> {
    if std::fs::read(path).is_ok_and(|current| current == content.as_bytes()) {
        return Ok(());
    }
    let err = |source| HostsError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, content).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes the step's `hosts` and `resolv.conf`. As BuildKit does, the common case (default
/// hostname, no extra hosts) shares one hosts file in `shared_dir`; resolv.conf is always
/// shared (one per kind of network). Only a step with its own hostname or extra hosts gets
/// a hosts file in `step_dir`. Files are only rewritten when their content changes.
pub fn write_files(
    shared_dir: &Path,
    step_dir: &Path,
    hostname: &str,
    extra: &[ExtraHost],
    resolver: Resolver,
) -> Result<(PathBuf, PathBuf), HostsError> {
    let hosts_dir = if hostname == kiln_proto::DEFAULT_HOSTNAME && extra.is_empty() {
        shared_dir
    } else {
        // The step's private directory exists only when something goes in it.
        use std::os::unix::fs::DirBuilderExt as _;
        match std::fs::DirBuilder::new().mode(0o711).create(step_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(HostsError::Write {
                    path: step_dir.to_owned(),
                    source: e,
                });
            }
            _ => {}
        }
        step_dir
    };
    let hosts = hosts_dir.join("hosts");
    write_if_changed(&hosts, &hosts_content(hostname, extra))?;
    let host_resolv = read_host_resolv();
    let (name, content) = match resolver {
        Resolver::Host => ("resolv.host.conf".to_owned(), host_resolv),
        Resolver::Filtered => (
            "resolv.conf".to_owned(),
            resolv_content(&host_resolv, false),
        ),
        Resolver::Forwarder(ip) => (
            format!("resolv.{ip}.conf"),
            forwarder_content(&host_resolv, ip),
        ),
    };
    let resolv = shared_dir.join(name);
    write_if_changed(&resolv, &content)?;
    Ok((hosts, resolv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_in_order_with_canonical_ips() {
        let extra = [
            ExtraHost::parse("myhost", "10.0.0.1").unwrap(),
            ExtraHost::parse("mapped", "::ffff:1.2.3.4").unwrap(),
            ExtraHost::parse("six", "fe80::1").unwrap(),
        ];
        assert_eq!(
            hosts_content("buildkitsandbox", &extra),
            "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             10.0.0.1\tmyhost\n1.2.3.4\tmapped\nfe80::1\tsix\n"
        );
    }

    #[test]
    fn bad_ip_is_named() {
        assert_eq!(
            ExtraHost::parse("h", "not-an-ip").unwrap_err().to_string(),
            "failed to parse IP not-an-ip"
        );
    }

    #[test]
    fn loopback_nameservers_dropped_unless_host_network() {
        let host =
            "search example.com\nnameserver 127.0.0.1\nnameserver ::1\nnameserver 10.1.1.1\n";
        assert_eq!(
            resolv_content(host, false),
            "search example.com\nnameserver 10.1.1.1\n"
        );
        assert_eq!(resolv_content(host, true), host);
    }

    #[test]
    fn forwarder_replaces_every_nameserver_and_keeps_the_rest() {
        let host =
            "search example.com\nnameserver 127.0.0.53\nnameserver 10.1.1.1\noptions edns0\n";
        assert_eq!(
            forwarder_content(host, "10.0.2.3".parse().unwrap()),
            "search example.com\noptions edns0\nnameserver 10.0.2.3\n"
        );
        assert_eq!(
            forwarder_content("", "169.254.1.1".parse().unwrap()),
            "nameserver 169.254.1.1\n"
        );
    }

    #[test]
    fn no_nameserver_left_adds_public_ones() {
        let out = resolv_content("nameserver 127.0.0.11\noptions ndots:0\n", false);
        assert!(out.starts_with("options ndots:0\n"));
        assert!(out.contains("nameserver 8.8.8.8"));
        assert!(out.contains("nameserver 2001:4860:4860::8844"));
    }
}
