//! Frontend options (`buildctl build --frontend dockerfile.v0 --opt key=value`) turned into
//! [`ConvertOptions`] the way BuildKit v0.11.6's Dockerfile builder (`builder/build.go`)
//! reads them: `target`, `build-arg:*`, `label:*`, `platform`, `image-resolve-mode`,
//! `add-hosts`, `shm-size`, `ulimit`, `force-network-mode`, `no-cache`, `hostname`,
//! `cgroup-parent`, `multi-platform` and the `BUILDKIT_*` / `SOURCE_DATE_EPOCH` build args.
//! Session, `.dockerignore` and source map come from the caller, not from options.

use std::collections::BTreeMap;

use kiln_proto::pb;

use crate::convert::{ConvertOptions, parse_platform};
use kiln_dockerfile_syntax::gocompat;
use kiln_llb::{self as llb, ResolveMode};

/// Errors in frontend options, with BuildKit's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptsError {
    #[error("failed to parse target platform {platform}: {reason}")]
    Platform { platform: String, reason: String },
    #[error("invalid image-resolve-mode: {0}")]
    ResolveMode(String),
    #[error("failed to parse additional hosts: {0}")]
    ExtraHosts(String),
    #[error("failed to parse shm size: {0}")]
    ShmSize(String),
    #[error("failed to parse ulimit: {0}")]
    Ulimit(String),
    #[error("invalid netmode {0}")]
    NetMode(String),
    #[error("invalid SOURCE_DATE_EPOCH: {value}: {reason}")]
    SourceDateEpoch { value: String, reason: String },
    #[error("invalid boolean value {0}")]
    Bool(String),
    #[error("returning multiple target platforms is not allowed")]
    MultiPlatform,
}

/// Builds one [`ConvertOptions`] per target platform from frontend options. `base` supplies
/// what options do not carry (session, `.dockerignore`, source map, caps).
pub fn from_frontend_opts(
    opts: &BTreeMap<String, String>,
    base: &ConvertOptions,
) -> Result<Vec<ConvertOptions>, OptsError> {
    let mut out = base.clone();
    let get = |k: &str| opts.get(k).map(String::as_str).unwrap_or("");
    let mut targets: Vec<Option<pb::Platform>> = vec![None];
    if !get("platform").is_empty() {
        targets = get("platform")
            .split(',')
            .map(|p| {
                parse_platform(p)
                    .map(|pl| Some(llb::normalize_platform(&pl)))
                    .map_err(|reason| OptsError::Platform {
                        platform: p.to_owned(),
                        reason,
                    })
            })
            .collect::<Result<_, _>>()?;
    }
    out.image_resolve_mode = match get("image-resolve-mode") {
        "" | "default" => ResolveMode::Default,
        "pull" => ResolveMode::ForcePull,
        "local" => ResolveMode::PreferLocal,
        other => return Err(OptsError::ResolveMode(other.to_owned())),
    };
    out.extra_hosts = parse_extra_hosts(get("add-hosts"))?;
    if !get("shm-size").is_empty() {
        out.shm_size = gocompat::parse_int(get("shm-size"), 64)
            .map_err(|e| OptsError::ShmSize(e.to_string()))?;
    }
    out.ulimits = parse_ulimits(get("ulimit"))?;
    out.force_network = match get("force-network-mode") {
        "" | "sandbox" => pb::NetMode::Unset,
        "none" => pb::NetMode::None,
        "host" => pb::NetMode::Host,
        other => return Err(OptsError::NetMode(other.to_owned())),
    };
    if let Some(v) = opts.get("no-cache") {
        out.ignore_cache = Some(if v.is_empty() {
            Vec::new()
        } else {
            v.split(',').map(str::to_owned).collect()
        });
    }
    let mut multi = targets.len() > 1;
    let multi_opt = opts
        .get("build-arg:BUILDKIT_MULTI_PLATFORM")
        .filter(|v| !v.is_empty())
        .or_else(|| opts.get("multi-platform").filter(|v| !v.is_empty()));
    if let Some(v) = multi_opt {
        let b = gocompat::parse_bool(v).ok_or_else(|| OptsError::Bool(v.clone()))?;
        if !b && multi {
            return Err(OptsError::MultiPlatform);
        }
        multi = b;
    }
    out.prefix_platform = multi;
    out.hostname = get("hostname").to_owned();
    if let Some(h) = opts
        .get("build-arg:BUILDKIT_SANDBOX_HOSTNAME")
        .filter(|h| !h.is_empty())
    {
        out.hostname.clone_from(h);
    }
    if let Some(v) = opts
        .get("build-arg:SOURCE_DATE_EPOCH")
        .filter(|v| !v.is_empty())
    {
        out.source_date_epoch =
            Some(
                gocompat::parse_int(v, 64).map_err(|e| OptsError::SourceDateEpoch {
                    value: v.clone(),
                    reason: e.to_string(),
                })?,
            );
    }
    out.target = opts.get("target").filter(|t| !t.is_empty()).cloned();
    out.cache_id_namespace = get("build-arg:BUILDKIT_CACHE_MOUNT_NS").to_owned();
    out.cgroup_parent = get("cgroup-parent").to_owned();
    out.build_args = prefixed(opts, "build-arg:");
    out.labels = prefixed(opts, "label:");
    Ok(targets
        .into_iter()
        .map(|t| ConvertOptions {
            target_platform: t,
            ..out.clone()
        })
        .collect())
}

fn prefixed(opts: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    opts.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_owned(), v.clone())))
        .collect()
}

fn parse_extra_hosts(v: &str) -> Result<Vec<(String, std::net::IpAddr)>, OptsError> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let fields = gocompat::csv_record(v).map_err(|e| OptsError::ExtraHosts(e.to_string()))?;
    let mut out = Vec::new();
    for field in fields {
        let Some((host, ip)) = field.split_once('=') else {
            return Err(OptsError::ExtraHosts(format!(
                "invalid key-value pair {field}"
            )));
        };
        let ip = ip.to_lowercase();
        let addr = ip
            .parse()
            .map_err(|_| OptsError::ExtraHosts(format!("failed to parse IP {ip}")))?;
        out.push((host.to_lowercase(), addr));
    }
    Ok(out)
}

/// `go-units.ParseUlimit` for each comma-separated `name=soft[:hard]`.
fn parse_ulimits(v: &str) -> Result<Vec<pb::Ulimit>, OptsError> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    const NAMES: [&str; 15] = [
        "core",
        "cpu",
        "data",
        "fsize",
        "locks",
        "memlock",
        "msgqueue",
        "nice",
        "nofile",
        "nproc",
        "rss",
        "rtprio",
        "rttime",
        "sigpending",
        "stack",
    ];
    let fields = gocompat::csv_record(v).map_err(|e| OptsError::Ulimit(e.to_string()))?;
    let mut out = Vec::new();
    for field in fields {
        let err = OptsError::Ulimit;
        let Some((name, limits)) = field.split_once('=') else {
            return Err(err(format!("invalid ulimit argument: {field}")));
        };
        if !NAMES.contains(&name) {
            return Err(err(format!("invalid ulimit type: {name}")));
        }
        let parts: Vec<&str> = limits.split(':').collect();
        let int = |s: &str| gocompat::parse_int(s, 64).map_err(|e| err(e.to_string()));
        let (soft, hard) = match parts.as_slice() {
            [soft] => {
                let s = int(soft)?;
                (s, s)
            }
            [soft, hard] => {
                let h = int(hard)?;
                (int(soft)?, h)
            }
            _ => {
                return Err(err(format!(
                    "too many limit value arguments - {limits}, can only have up to two, `soft[:hard]`"
                )));
            }
        };
        if hard != -1 {
            if soft == -1 {
                return Err(err(format!(
                    "ulimit soft limit must be less than or equal to hard limit: soft: -1 (unlimited), hard: {hard}"
                )));
            }
            if soft > hard {
                return Err(err(format!(
                    "ulimit soft limit must be less than or equal to hard limit: {soft} > {hard}"
                )));
            }
        }
        out.push(pb::Ulimit {
            name: name.to_owned(),
            soft,
            hard,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn reads_buildctl_options() {
        let all = from_frontend_opts(
            &opts(&[
                ("target", "final"),
                ("build-arg:A", "1"),
                ("build-arg:BUILDKIT_SANDBOX_HOSTNAME", "box"),
                ("build-arg:BUILDKIT_CACHE_MOUNT_NS", "ns"),
                ("build-arg:SOURCE_DATE_EPOCH", "10"),
                ("label:l", "v"),
                ("platform", "linux/arm64,linux/amd64"),
                ("image-resolve-mode", "pull"),
                ("add-hosts", "DB=10.0.0.1,h=::1"),
                ("shm-size", "1024"),
                ("ulimit", "nofile=1024:2048,core=0"),
                ("force-network-mode", "none"),
                ("no-cache", "a,b"),
            ]),
            &ConvertOptions::default(),
        )
        .unwrap();
        assert_eq!(all.len(), 2);
        let o = &all[0];
        assert_eq!(o.target.as_deref(), Some("final"));
        assert_eq!(o.target_platform.as_ref().unwrap().architecture, "arm64");
        assert!(o.prefix_platform);
        assert_eq!(o.build_args["A"], "1");
        assert_eq!(o.labels["l"], "v");
        assert_eq!(o.hostname, "box");
        assert_eq!(o.cache_id_namespace, "ns");
        assert_eq!(o.source_date_epoch, Some(10));
        assert_eq!(o.image_resolve_mode, ResolveMode::ForcePull);
        assert_eq!(o.extra_hosts[0].0, "db");
        assert_eq!(o.shm_size, 1024);
        assert_eq!(o.ulimits[1].soft, 0);
        assert_eq!(o.ulimits[0].hard, 2048);
        assert_eq!(o.force_network, pb::NetMode::None);
        assert_eq!(o.ignore_cache, Some(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn rejects_bad_options() {
        let base = ConvertOptions::default();
        let err = |pairs: &[(&str, &str)]| {
            from_frontend_opts(&opts(pairs), &base)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[("image-resolve-mode", "x")]),
            "invalid image-resolve-mode: x"
        );
        assert_eq!(err(&[("force-network-mode", "x")]), "invalid netmode x");
        assert_eq!(
            err(&[("ulimit", "nofile=2:1")]),
            "failed to parse ulimit: ulimit soft limit must be less than or equal to hard limit: 2 > 1"
        );
        assert_eq!(
            err(&[
                ("platform", "linux/amd64,linux/arm64"),
                ("multi-platform", "false")
            ]),
            "returning multiple target platforms is not allowed"
        );
        assert!(err(&[("platform", "x!")]).starts_with("failed to parse target platform x!"));
        let o = from_frontend_opts(&opts(&[("no-cache", "")]), &base).unwrap();
        assert_eq!(o[0].ignore_cache, Some(vec![]));
        assert!(!o[0].prefix_platform);
    }
}
