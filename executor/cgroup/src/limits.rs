//! A step's resource limits: what `kiln.toml`'s `[limits]` table and `kiln run
//! --pids-limit/--memory` ask for, their defaults (chosen to protect the host), how they
//! travel in the OCI spec (`linux.resources`, as runc reads them), the rlimits that stand
//! in when no cgroup can carry them, and the words kiln uses when a step exceeds one.
//!
//! ```toml
//! [limits]
//! pids = 4096          # processes per step (pids.max); 0: no limit
//! memory = "50%"       # per step: bytes, "512m", "2GiB", or a share of the host's RAM; 0: none
//! cpu_weight = 100     # 1–10000, cgroup v2 cpu.weight (cpu.shares = weight × 1024 / 100 on v1)
//! ```
//!
//! Where limits are enforced is [`crate::hierarchy`]'s business: a cgroup of the step's own
//! when kiln may create one (as root; rootless below a delegated cgroup), otherwise the
//! rlimits of [`fallback_rlimits`], which bound each process rather than the step.

use std::fmt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, PosixRlimit,
    PosixRlimitBuilder, PosixRlimitType, Spec,
};
use serde::{Deserialize, Serialize};

/// Errors from the `[limits]` configuration and limit flags.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "invalid memory size {0:?}: use bytes, a number with b, k, m, g or t (KiB, MiB, GiB, \
         TiB), or a percentage of the host's memory"
    )]
    Size(String),
    #[error("cpu_weight {0} is out of range 1-10000")]
    CpuWeight(u64),
    #[error("building the spec's resources: {0}")]
    Build(String),
}

/// Processes per step unless configured.
pub const DEFAULT_PIDS: u64 = 4096;
/// Share of the host's memory one step may use unless configured.
pub const DEFAULT_MEMORY_PERCENT: u64 = 50;
/// cgroup v2's default weight: steps compete with each other as equals.
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// The limits of one step (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Processes and threads at once (`pids.max`).
    pub pids: Option<u64>,
    /// Memory in bytes, swap included (`memory.max`, `memory.swap.max = 0`).
    pub memory: Option<u64>,
    /// CPU weight, 1–10000 (cgroup v2 semantics).
    pub cpu_weight: Option<u64>,
}

impl Limits {
    /// The defaults that protect the host: 4096 processes, half of the host's memory,
    /// weight 100.
    pub fn host_defaults() -> Self {
        Limits {
            pids: Some(DEFAULT_PIDS),
            memory: host_memory().map(|total| total / 100 * DEFAULT_MEMORY_PERCENT),
            cpu_weight: Some(DEFAULT_CPU_WEIGHT),
        }
    }

    /// The limits a spec's `linux.resources` carries.
    pub fn from_spec(spec: &Spec) -> Self {
        let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
            return Limits::default();
        };
        Limits {
            pids: resources
                .pids()
                .as_ref()
                .and_then(|p| u64::try_from(p.limit()).ok())
                .filter(|n| *n > 0),
            memory: resources
                .memory()
                .as_ref()
                .and_then(|m| m.limit())
                .and_then(|n| u64::try_from(n).ok())
                .filter(|n| *n > 0),
            cpu_weight: resources
                .cpu()
                .as_ref()
                .and_then(|c| c.shares())
                .filter(|s| *s > 0)
                .map(weight_from_shares),
        }
    }

    /// Adds these limits to `resources` (runc's fields: `pids.limit`, `memory.limit` and
    /// `memory.swap` equal, so no swap on top, and `cpu.shares`).
    pub fn apply_to(&self, resources: &mut LinuxResources) -> Result<(), LimitsError> {
        let build = |e: oci_spec::OciSpecError| LimitsError::Build(e.to_string());
        if let Some(pids) = self.pids {
            resources.set_pids(Some(
                LinuxPidsBuilder::default()
                    .limit(i64::try_from(pids).unwrap_or(i64::MAX))
                    .build()
                    .map_err(build)?,
            ));
        }
        if let Some(memory) = self.memory {
            let bytes = i64::try_from(memory).unwrap_or(i64::MAX);
            resources.set_memory(Some(
                LinuxMemoryBuilder::default()
                    .limit(bytes)
                    .swap(bytes)
                    .build()
                    .map_err(build)?,
            ));
        }
        if let Some(weight) = self.cpu_weight {
            resources.set_cpu(Some(
                LinuxCpuBuilder::default()
                    .shares(shares_from_weight(weight))
                    .build()
                    .map_err(build)?,
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_none() && self.memory.is_none() && self.cpu_weight.is_none()
    }
}

/// cgroup v1 `cpu.shares` for a v2 weight: proportional, so the default weight 100 is the
/// kernel's default 1024 shares.
pub fn shares_from_weight(weight: u64) -> u64 {
    (weight.clamp(1, 10_000) * 1024 / 100).clamp(2, 262_144)
}

/// The v2 weight for `cpu.shares` (the inverse of [`shares_from_weight`]).
pub fn weight_from_shares(shares: u64) -> u64 {
    (shares * 100 / 1024).clamp(1, 10_000)
}

/// The host's physical memory (`MemTotal`), if readable.
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses a memory size as docker does (`512m`, `2g`, `1GiB`, `1048576`; units are
/// binary), or a percentage of the host's memory (`50%`). `0`, `max` and `unlimited` mean
/// no limit (`None`).
pub fn parse_size(text: &str) -> Result<Option<u64>, LimitsError> {
    let bad = || LimitsError::Size(text.to_owned());
    let t = text.trim();
    if matches!(
        t.to_ascii_lowercase().as_str(),
        "max" | "unlimited" | "none"
    ) {
        return Ok(None);
    }
    if let Some(percent) = t.strip_suffix('%') {
        let percent: f64 = percent.trim().parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(bad());
        }
        let total = host_memory().ok_or_else(bad)?;
        let bytes = (total as f64 * percent / 100.0) as u64;
        return Ok((bytes > 0).then_some(bytes));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    let bytes = bytes as u64;
    Ok((bytes > 0).then_some(bytes))
}

/// Bytes as people read them: `512 MiB`, `1.5 GiB`, `900 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 10.0 || value.fract() == 0.0 {
        format!("{} {}", value.round() as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The limit a step exceeded; kiln killed it for that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exceeded {
    /// The kernel's OOM killer fired inside the step's memory cgroup.
    Memory { limit: u64 },
    /// A fork or clone failed at the step's pids limit.
    Pids { limit: u64 },
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Memory { limit } => write!(
                f,
                "step exceeded its memory limit of {}",
                format_bytes(*limit)
            ),
            Exceeded::Pids { limit } => {
                write!(f, "step exceeded its pids limit of {limit} processes")
            }
        }
    }
}

/// The `[limits]` table of kiln.toml, as written (sizes still text).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    pids: Option<u64>,
    memory: Option<SizeValue>,
    cpu_weight: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Reads the `[limits]` table of the kiln.toml at `path` (a missing file or table gives
/// [`Limits::host_defaults`]; keys left out keep their defaults). Other tables belong to
/// other parts of kiln and are not looked at.
pub fn load_config(path: &Path) -> Result<Limits, LimitsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_config(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Limits::host_defaults()),
        Err(source) => Err(LimitsError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Parses the text of a kiln.toml read from `path` (named in errors).
pub fn parse_config(text: &str, path: &Path) -> Result<Limits, LimitsError> {
    let parse_err = |message: String| LimitsError::Parse {
        path: path.to_owned(),
        message,
    };
    let table: toml::Table =
        toml::from_str(text).map_err(|e| parse_err(e.to_string().trim_end().replace('\n', " ")))?;
    let mut limits = Limits::host_defaults();
    let Some(value) = table.get("limits") else {
        return Ok(limits);
    };
    let raw: Table = value.clone().try_into().map_err(|e: toml::de::Error| {
        parse_err(format!(
            "[limits]: {}",
            e.to_string().trim_end().replace('\n', " ")
        ))
    })?;
    if let Some(pids) = raw.pids {
        limits.pids = (pids > 0).then_some(pids);
    }
    match raw.memory {
        Some(SizeValue::Bytes(bytes)) => limits.memory = (bytes > 0).then_some(bytes),
        Some(SizeValue::Text(text)) => {
            limits.memory =
                parse_size(&text).map_err(|e| parse_err(format!("[limits] memory: {e}")))?;
        }
        None => {}
    }
    if let Some(weight) = raw.cpu_weight {
        if !(1..=10_000).contains(&weight) {
            return Err(parse_err(format!(
                "[limits] {}",
                LimitsError::CpuWeight(weight)
            )));
        }
        limits.cpu_weight = Some(weight);
    }
    Ok(limits)
}

/// Which limits a cgroup enforces for a step; the others fall back to rlimits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforced {
    pub pids: bool,
    pub memory: bool,
    pub cpu: bool,
}

fn rlimit(typ: PosixRlimitType, value: u64) -> Option<PosixRlimit> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .soft(value)
        .hard(value)
        .build()
        .ok()
}

/// The rlimits that stand in for limits no cgroup enforces: `RLIMIT_NPROC` for pids
/// (counted per user in kiln's user namespace) and `RLIMIT_AS` plus `RLIMIT_DATA` for
/// memory (per process). A limit the step's own `ulimit` already sets is left as the step
/// asked (BuildKit honours `Meta.ulimit` as given).
pub fn fallback_rlimits(
    limits: &Limits,
    enforced: Enforced,
    existing: &[PosixRlimit],
) -> Vec<PosixRlimit> {
    let has = |typ: PosixRlimitType| existing.iter().any(|r| r.typ() == typ);
    let mut out = Vec::new();
    if let (Some(pids), false) = (limits.pids, enforced.pids) {
        if !has(PosixRlimitType::RlimitNproc) {
            out.extend(rlimit(PosixRlimitType::RlimitNproc, pids));
        }
    }
    if let (Some(memory), false) = (limits.memory, enforced.memory) {
        for typ in [PosixRlimitType::RlimitAs, PosixRlimitType::RlimitData] {
            if !has(typ) {
                out.extend(rlimit(typ, memory));
            }
        }
    }
    out
}

/// One line saying what is and is not enforced when cgroups do not carry every limit
/// (`None` when they do).
pub fn explain(limits: &Limits, enforced: Enforced, reason: &str) -> Option<String> {
    let mut rlimits = Vec::new();
    let mut missing = Vec::new();
    if let (Some(pids), false) = (limits.pids, enforced.pids) {
        rlimits.push(format!(
            "{pids} processes per user in kiln's user namespace (RLIMIT_NPROC, shared by \
             the steps running as that user)"
        ));
    }
    if let (Some(memory), false) = (limits.memory, enforced.memory) {
        rlimits.push(format!(
            "{} of memory per process (RLIMIT_AS, RLIMIT_DATA)",
            format_bytes(memory)
        ));
        missing.push("a step's total memory");
    }
    if let (Some(_), false) = (limits.cpu_weight, enforced.cpu) {
        missing.push("its CPU weight");
    }
    if rlimits.is_empty() && missing.is_empty() {
        return None;
    }
    let mut line = format!("limits: {reason}: ");
    if rlimits.is_empty() {
        line.push_str("rlimits cannot stand in");
    } else {
        line.push_str(&format!(
            "steps get rlimits instead: {}",
            rlimits.join(" and ")
        ));
    }
    if !missing.is_empty() {
        line.push_str(&format!("; not enforced: {}", missing.join(", ")));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_docker_does() {
        assert_eq!(parse_size("512m").unwrap(), Some(512 << 20));
        assert_eq!(parse_size("512MiB").unwrap(), Some(512 << 20));
        assert_eq!(parse_size("1.5g").unwrap(), Some(3 << 29));
        assert_eq!(parse_size("1048576").unwrap(), Some(1 << 20));
        assert_eq!(parse_size("2 GiB").unwrap(), Some(2 << 30));
        assert_eq!(parse_size("0").unwrap(), None);
        assert_eq!(parse_size("unlimited").unwrap(), None);
        for bad in ["", "m", "-1m", "12 parsecs", "1e999", "150%"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let half = parse_size("50%").unwrap().unwrap();
        let total = host_memory().unwrap();
        assert!(
            half <= total / 2 + 1 && half >= total / 2 - 1024,
            "{half} of {total}"
        );
    }

    #[test]
    fn bytes_format_for_people() {
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(88_080_384), "84 MiB");
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn exceeded_limits_are_named() {
        assert_eq!(
            Exceeded::Memory { limit: 512 << 20 }.to_string(),
            "step exceeded its memory limit of 512 MiB"
        );
        assert_eq!(
            Exceeded::Pids { limit: 64 }.to_string(),
            "step exceeded its pids limit of 64 processes"
        );
    }

    #[test]
    fn config_table_keeps_defaults_for_missing_keys_and_rejects_unknown_ones() {
        let path = Path::new("/etc/kiln.toml");
        let defaults = Limits::host_defaults();
        assert_eq!(parse_config("", path).unwrap(), defaults);
        assert_eq!(
            parse_config("[registry.\"x\"]\nhttp = true\n", path).unwrap(),
            defaults
        );
        let limits = parse_config("[limits]\npids = 100\nmemory = \"64m\"\n", path).unwrap();
        assert_eq!(limits.pids, Some(100));
        assert_eq!(limits.memory, Some(64 << 20));
        assert_eq!(limits.cpu_weight, Some(DEFAULT_CPU_WEIGHT));
        let off = parse_config("[limits]\npids = 0\nmemory = 0\n", path).unwrap();
        assert_eq!((off.pids, off.memory), (None, None));
        let err = parse_config("[limits]\npid = 1\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/kiln.toml: [limits]: "), "{err}");
        let err = parse_config("[limits]\ncpu_weight = 0\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpu_weight 0 is out of range"), "{err}");
        let err = parse_config("[limits]\nmemory = \"lots\"\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid memory size \"lots\""), "{err}");
    }

    #[test]
    fn limits_round_trip_through_the_spec() {
        let limits = Limits {
            pids: Some(64),
            memory: Some(256 << 20),
            cpu_weight: Some(250),
        };
        let mut resources = LinuxResources::default();
        limits.apply_to(&mut resources).unwrap();
        let json = serde_json::to_value(&resources).unwrap();
        assert_eq!(json["pids"]["limit"], 64);
        assert_eq!(json["memory"]["limit"], 256 << 20);
        assert_eq!(json["memory"]["swap"], 256 << 20);
        assert_eq!(json["cpu"]["shares"], 2560);
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_resources(Some(resources));
        spec.set_linux(Some(linux));
        assert_eq!(Limits::from_spec(&spec), limits);
        assert_eq!(weight_from_shares(shares_from_weight(100)), 100);
        assert_eq!(shares_from_weight(100), 1024);
    }

    #[test]
    fn fallback_rlimits_cover_what_cgroups_do_not_and_keep_the_steps_own() {
        let limits = Limits {
            pids: Some(64),
            memory: Some(1 << 30),
            cpu_weight: Some(100),
        };
        let all = fallback_rlimits(&limits, Enforced::default(), &[]);
        let types: Vec<_> = all.iter().map(PosixRlimit::typ).collect();
        assert_eq!(
            types,
            vec![
                PosixRlimitType::RlimitNproc,
                PosixRlimitType::RlimitAs,
                PosixRlimitType::RlimitData
            ]
        );
        let own = rlimit(PosixRlimitType::RlimitNproc, 10).unwrap();
        let some = fallback_rlimits(
            &limits,
            Enforced {
                memory: true,
                ..Enforced::default()
            },
            &[own],
        );
        assert!(some.is_empty(), "{some:?}");
        let enforced = Enforced {
            pids: true,
            memory: true,
            cpu: true,
        };
        assert!(fallback_rlimits(&limits, enforced, &[]).is_empty());
        assert_eq!(explain(&limits, enforced, "x"), None);
        let line = explain(&limits, Enforced::default(), "no delegated cgroup").unwrap();
        assert_eq!(
            line,
            "limits: no delegated cgroup: steps get rlimits instead: 64 processes per user in \
             kiln's user namespace (RLIMIT_NPROC, shared by the steps running as that user) \
             and 1 GiB of memory per process (RLIMIT_AS, RLIMIT_DATA); not enforced: a step's \
             total memory, its CPU weight"
        );
    }
}
