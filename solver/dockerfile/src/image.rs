//! The image config the frontend computes (BuildKit v0.11.6
//! `exporter/containerimage/image.Image`: the OCI image config with Docker's extra config
//! fields): parsed from a base image's config blob and written back as Go's
//! `encoding/json` does (field order, `omitempty`, `null` slices, HTML-safe escaping).

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::gojson::{ObjectWriter, write_string};
use serde::Deserialize;

/// Errors from reading a base image config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("failed to parse image config: {0}")]
    Parse(String),
}

/// `HEALTHCHECK` settings as stored in the config (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    pub test: Vec<String>,
    pub interval: i64,
    pub timeout: i64,
    pub start_period: i64,
    pub retries: i64,
}

/// The `config` object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub user: String,
    pub exposed_ports: BTreeSet<String>,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub volumes: BTreeSet<String>,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: String,
    pub healthcheck: Option<HealthConfig>,
    pub args_escaped: bool,
    /// Written as `null` when unset (the field has no `omitempty`).
    pub on_build: Option<Vec<String>>,
    pub stop_timeout: Option<i64>,
    pub shell: Vec<String>,
}

/// One `history` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// RFC 3339 as Go prints a `time.Time`.
    pub created: Option<String>,
    pub created_by: String,
    pub author: String,
    pub comment: String,
    pub empty_layer: bool,
}

/// The image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    pub created: Option<String>,
    pub author: String,
    pub architecture: String,
    pub variant: String,
    pub os: String,
    pub os_version: String,
    pub os_features: Vec<String>,
    pub rootfs_type: String,
    /// `null` when unset.
    pub diff_ids: Option<Vec<String>>,
    pub history: Vec<History>,
    pub config: ImageConfig,
}

impl Image {
    /// BuildKit's `emptyImage(platform)`: the config of a `FROM scratch` stage.
    pub fn empty(os: &str, architecture: &str, variant: &str) -> Image {
        Image {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            variant: variant.to_owned(),
            rootfs_type: "layers".into(),
            config: ImageConfig {
                working_dir: "/".into(),
                env: vec![format!("PATH={}", kiln_llb::default_path_env(os))],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Reads a config blob the way `json.Unmarshal` into BuildKit's `Image` does (unknown
    /// fields ignored, `null` as absent). `created` is dropped, as the frontend does.
    pub fn from_json(bytes: &[u8]) -> Result<Image, ImageError> {
        let raw: RawImage =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Parse(e.to_string()))?;
        let c = raw.config.unwrap_or_default();
        Ok(Image {
            created: None,
            author: raw.author.unwrap_or_default(),
            architecture: raw.architecture.unwrap_or_default(),
            variant: raw.variant.unwrap_or_default(),
            os: raw.os.unwrap_or_default(),
            os_version: raw.os_version.unwrap_or_default(),
            os_features: raw.os_features.unwrap_or_default(),
            rootfs_type: raw
                .rootfs
                .as_ref()
                .and_then(|r| r.fs_type.clone())
                .unwrap_or_default(),
            diff_ids: raw.rootfs.and_then(|r| r.diff_ids),
            history: raw
                .history
                .unwrap_or_default()
                .into_iter()
                .map(|h| History {
                    created: h.created.map(|t| normalize_time(&t)),
                    created_by: h.created_by.unwrap_or_default(),
                    author: h.author.unwrap_or_default(),
                    comment: h.comment.unwrap_or_default(),
                    empty_layer: h.empty_layer.unwrap_or_default(),
                })
                .collect(),
            config: ImageConfig {
                user: c.user.unwrap_or_default(),
                exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
                env: c.env.unwrap_or_default(),
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                volumes: c.volumes.unwrap_or_default().into_keys().collect(),
                working_dir: c.working_dir.unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
                stop_signal: c.stop_signal.unwrap_or_default(),
                healthcheck: c.healthcheck.map(|h| HealthConfig {
                    test: h.test.unwrap_or_default(),
                    interval: h.interval.unwrap_or_default(),
                    timeout: h.timeout.unwrap_or_default(),
                    start_period: h.start_period.unwrap_or_default(),
                    retries: h.retries.unwrap_or_default(),
                }),
                args_escaped: c.args_escaped.unwrap_or_default(),
                on_build: c.on_build,
                stop_timeout: c.stop_timeout,
                shell: c.shell.unwrap_or_default(),
            },
        })
    }

    /// The config as Go's `json.Marshal` writes BuildKit's `Image`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut o = ObjectWriter::new(&mut out);
        if let Some(created) = &self.created {
            o.string_always("created", created);
        }
        o.string("author", &self.author)
            .string_always("architecture", &self.architecture)
            .string("variant", &self.variant)
            .string_always("os", &self.os)
            .string("os.version", &self.os_version)
            .strings("os.features", &self.os_features);
        {
            let rootfs = o.key("rootfs");
            let mut r = ObjectWriter::new(rootfs);
            r.string_always("type", &self.rootfs_type);
            write_nullable_strings(r.key("diff_ids"), self.diff_ids.as_deref());
            r.finish();
        }
        if !self.history.is_empty() {
            let out = o.key("history");
            out.push(b'[');
            for (i, h) in self.history.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let mut w = ObjectWriter::new(out);
                if let Some(created) = &h.created {
                    w.string_always("created", created);
                }
                w.string("created_by", &h.created_by)
                    .string("author", &h.author)
                    .string("comment", &h.comment)
                    .bool("empty_layer", h.empty_layer);
                w.finish();
            }
            out.push(b']');
        }
        self.config.write(o.key("config"));
        o.finish();
        out
    }
}

impl ImageConfig {
    fn write(&self, out: &mut Vec<u8>) {
        let mut o = ObjectWriter::new(out);
        o.string("User", &self.user);
        write_set(&mut o, "ExposedPorts", &self.exposed_ports);
        o.strings("Env", &self.env)
            .strings("Entrypoint", &self.entrypoint)
            .strings("Cmd", &self.cmd);
        write_set(&mut o, "Volumes", &self.volumes);
        o.string("WorkingDir", &self.working_dir)
            .string_map("Labels", &self.labels)
            .string("StopSignal", &self.stop_signal);
        if let Some(h) = &self.healthcheck {
            let mut w = ObjectWriter::new(o.key("Healthcheck"));
            w.strings("Test", &h.test)
                .int("Interval", h.interval)
                .int("Timeout", h.timeout)
                .int("StartPeriod", h.start_period)
                .int("Retries", h.retries);
            w.finish();
        }
        o.bool("ArgsEscaped", self.args_escaped);
        write_nullable_strings(o.key("OnBuild"), self.on_build.as_deref());
        if let Some(t) = self.stop_timeout {
            o.int_always("StopTimeout", t);
        }
        o.strings("Shell", &self.shell);
        o.finish();
    }
}

fn write_set(o: &mut ObjectWriter, key: &str, set: &BTreeSet<String>) {
    if set.is_empty() {
        return;
    }
    let out = o.key(key);
    out.push(b'{');
    for (i, k) in set.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, k.as_bytes());
        out.extend_from_slice(b":{}");
    }
    out.push(b'}');
}

fn write_nullable_strings(out: &mut Vec<u8>, items: Option<&[String]>) {
    match items {
        None => out.extend_from_slice(b"null"),
        Some(items) => {
            out.push(b'[');
            for (i, s) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, s.as_bytes());
            }
            out.push(b']');
        }
    }
}

/// Re-prints an RFC 3339 timestamp as Go's `time.Time` JSON does (trailing zeros of the
/// fraction dropped, a zero offset as `Z`); anything unparseable is kept as is.
pub fn normalize_time(t: &str) -> String {
    let bytes = t.as_bytes();
    if bytes.len() < 20 || bytes[10] != b'T' || !bytes[..19].is_ascii() {
        return t.to_owned();
    }
    let (main, rest) = t.split_at(19);
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (&r[..end], &r[end..])
        }
        None => ("", rest),
    };
    let zone = match zone {
        "Z" | "+00:00" | "-00:00" => "Z",
        z if z.len() == 6 && (z.starts_with('+') || z.starts_with('-')) => z,
        _ => return t.to_owned(),
    };
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{main}{zone}")
    } else {
        format!("{main}.{frac}{zone}")
    }
}

/// A Unix time (seconds) as Go prints a UTC `time.Time` in JSON.
pub fn format_unix_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[derive(Deserialize, Default)]
struct RawImage {
    author: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
    os: Option<String>,
    #[serde(rename = "os.version")]
    os_version: Option<String>,
    #[serde(rename = "os.features")]
    os_features: Option<Vec<String>>,
    config: Option<RawConfig>,
    rootfs: Option<RawRootFs>,
    history: Option<Vec<RawHistory>>,
}

#[derive(Deserialize, Default)]
struct RawRootFs {
    #[serde(rename = "type")]
    fs_type: Option<String>,
    diff_ids: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct RawHistory {
    created: Option<String>,
    created_by: Option<String>,
    author: Option<String>,
    comment: Option<String>,
    empty_layer: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    working_dir: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
    healthcheck: Option<RawHealth>,
    args_escaped: Option<bool>,
    on_build: Option<Vec<String>>,
    stop_timeout: Option<i64>,
    shell: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawHealth {
    test: Option<Vec<String>>,
    interval: Option<i64>,
    timeout: Option<i64>,
    start_period: Option<i64>,
    retries: Option<i64>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_keeps_go_field_order_and_nulls() {
        let src = br#"{"created":"2026-11-23T16:52:04.121644119Z","architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"Unknown":1},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created":"2026-11-23T16:52:04.1500+00:00","created_by":"x"}],"container_config":{}}"#;
        let img = Image::from_json(src).unwrap();
        assert_eq!(img.created, None);
        assert_eq!(
            String::from_utf8(img.to_json()).unwrap(),
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created":"2026-11-23T16:52:04.15Z","created_by":"x"}],"config":{"Env":["PATH=/bin"],"Cmd":["sh"],"OnBuild":null}}"#
        );
    }

    #[test]
    fn full_config_is_written_in_struct_order() {
        let mut img = Image::empty("linux", "arm64", "v8");
        img.author = "me".into();
        img.config.user = "u".into();
        img.config.exposed_ports.insert("80/tcp".into());
        img.config.volumes.insert("/v".into());
        img.config.labels.insert("a".into(), "<b>".into());
        img.config.healthcheck = Some(HealthConfig {
            test: vec!["NONE".into()],
            ..Default::default()
        });
        img.config.args_escaped = true;
        img.config.on_build = Some(vec![]);
        img.config.stop_timeout = Some(0);
        img.config.shell = vec!["/bin/bash".into()];
        img.history.push(History {
            created_by: "RUN x".into(),
            comment: "buildkit.dockerfile.v0".into(),
            empty_layer: true,
            ..Default::default()
        });
        assert_eq!(
            String::from_utf8(img.to_json()).unwrap(),
            concat!(
                r#"{"author":"me","architecture":"arm64","variant":"v8","os":"linux","#,
                r#""rootfs":{"type":"layers","diff_ids":null},"#,
                r#""history":[{"created_by":"RUN x","comment":"buildkit.dockerfile.v0","empty_layer":true}],"#,
                r#""config":{"User":"u","ExposedPorts":{"80/tcp":{}},"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"#,
                r#""Volumes":{"/v":{}},"WorkingDir":"/","Labels":{"a":"\u003cb\u003e"},"#,
                r#""Healthcheck":{"Test":["NONE"]},"ArgsEscaped":true,"OnBuild":[],"StopTimeout":0,"Shell":["/bin/bash"]}}"#
            )
        );
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(Image::from_json(b"{").is_err());
        assert!(Image::from_json(br#"{"config":{"Env":"x"}}"#).is_err());
        assert!(Image::from_json(br#"{"config":null}"#).is_ok());
    }

    #[test]
    fn times() {
        assert_eq!(format_unix_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            normalize_time("2020-01-01T00:00:00.000Z"),
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(
            normalize_time("2020-01-01T00:00:00.5+02:00"),
            "2020-01-01T00:00:00.5+02:00"
        );
        assert_eq!(normalize_time("garbage"), "garbage");
        assert_eq!(
            normalize_time("2020-01-01Téééééééééé"),
            "2020-01-01Téééééééééé"
        );
    }
}
