//! Go `encoding/json` output for the LLB messages, byte for byte as BuildKit v0.11.6
//! (built with Go 1.19) marshals its gogo structs.
//!
//! BuildKit hashes this JSON for cache keys (ExecOp, FileOp actions), so a generic
//! serializer's defaults are not good enough. The rules implemented here:
//! * keys in struct declaration order, compact output;
//! * `omitempty` on every field except gogo's non-nullable ones (`Mount.input/output`,
//!   `FileAction.input/secondaryInput/output`, `*.input` index fields, `Input.digest/index`,
//!   `BuildOp.builder`), and on present sub-messages never (an empty one is `{}`);
//! * oneof members sit under the Go interface field name (`"Action"`, `"User"`), which has
//!   no `omitempty` (an unset oneof is `null`);
//! * enums are numbers, `[]byte` is standard base64, maps have sorted keys;
//! * strings: `\"` `\\` `\n` `\r` `\t`, other control bytes and `<` `>` `&` as lowercase
//!   `\u00XX`, U+2028/U+2029 escaped, each invalid UTF-8 byte as `\ufffd`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;

use crate::pb;

/// A value with a Go `encoding/json` representation.
pub trait GoJson {
    fn write_go_json(&self, out: &mut Vec<u8>);
}

/// Marshals `value` as Go would.
pub fn to_go_json<T: GoJson + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.write_go_json(&mut out);
    out
}

/// Writes `s` as a Go JSON string (with HTML escaping, as `json.Marshal` does).
pub fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for chunk in s.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\u{2028}' => out.extend_from_slice(b"\\u2028"),
                '\u{2029}' => out.extend_from_slice(b"\\u2029"),
                c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&') => {
                    let b = c as u8;
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        // Go decodes invalid input one byte at a time, each becoming U+FFFD.
        for _ in chunk.invalid() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
    out.push(b'"');
}

/// Writes a JSON object field by field, applying Go's `omitempty` per call.
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl std::fmt::Debug for ObjectWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter").finish_non_exhaustive()
    }
}

impl<'a> ObjectWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, empty: true }
    }

    pub fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        write_string(self.out, key.as_bytes());
        self.out.push(b':');
        self.out
    }

    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.string_always(key, value);
        }
        self
    }

    pub fn string_always(&mut self, key: &str, value: &str) -> &mut Self {
        let out = self.key(key);
        write_string(out, value.as_bytes());
        self
    }

    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        if value != 0 {
            self.int_always(key, value);
        }
        self
    }

    pub fn int_always(&mut self, key: &str, value: i64) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(value.to_string().as_bytes());
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        if value {
            self.key(key).extend_from_slice(b"true");
        }
        self
    }

    pub fn bytes(&mut self, key: &str, value: &[u8]) -> &mut Self {
        if !value.is_empty() {
            let encoded = base64::engine::general_purpose::STANDARD.encode(value);
            write_string(self.key(key), encoded.as_bytes());
        }
        self
    }

    pub fn message<T: GoJson>(&mut self, key: &str, value: Option<&T>) -> &mut Self {
        if let Some(value) = value {
            value.write_go_json(self.key(key));
        }
        self
    }

    pub fn list<T: GoJson>(&mut self, key: &str, values: &[T]) -> &mut Self {
        if !values.is_empty() {
            write_list(self.key(key), values);
        }
        self
    }

    pub fn strings(&mut self, key: &str, values: &[String]) -> &mut Self {
        self.list(key, values)
    }

    pub fn string_map(&mut self, key: &str, map: &BTreeMap<String, String>) -> &mut Self {
        if !map.is_empty() {
            write_map(self.key(key), map);
        }
        self
    }

    pub fn finish(&mut self) {
        self.out.push(b'}');
    }
}

fn write_list<T: GoJson>(out: &mut Vec<u8>, values: &[T]) {
    out.push(b'[');
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        value.write_go_json(out);
    }
    out.push(b']');
}

/// Go sorts map keys; a `BTreeMap<String, _>` iterates in that (byte) order already.
fn write_map<V: GoJson>(out: &mut Vec<u8>, map: &BTreeMap<String, V>) {
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key.as_bytes());
        out.push(b':');
        value.write_go_json(out);
    }
    out.push(b'}');
}

impl GoJson for String {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        write_string(out, self.as_bytes());
    }
}

impl GoJson for str {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        write_string(out, self.as_bytes());
    }
}

impl GoJson for bool {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

impl GoJson for i64 {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
    }
}

impl GoJson for pb::ExecOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .message("meta", self.meta.as_ref())
            .list("mounts", &self.mounts)
            .int("network", i64::from(self.network))
            .int("security", i64::from(self.security))
            .list("secretenv", &self.secretenv)
            .finish();
    }
}

impl GoJson for pb::Meta {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .strings("args", &self.args)
            .strings("env", &self.env)
            .string("cwd", &self.cwd)
            .string("user", &self.user)
            .message("proxy_env", self.proxy_env.as_ref())
            .list("extraHosts", &self.extra_hosts)
            .string("hostname", &self.hostname)
            .list("ulimit", &self.ulimit)
            .string("cgroupParent", &self.cgroup_parent)
            .bool(
                "removeMountStubsRecursive",
                self.remove_mount_stubs_recursive,
            )
            .finish();
    }
}

impl GoJson for pb::ProxyEnv {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("http_proxy", &self.http_proxy)
            .string("https_proxy", &self.https_proxy)
            .string("ftp_proxy", &self.ftp_proxy)
            .string("no_proxy", &self.no_proxy)
            .string("all_proxy", &self.all_proxy)
            .finish();
    }
}

impl GoJson for pb::HostIp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("Host", &self.host)
            .string("IP", &self.ip)
            .finish();
    }
}

impl GoJson for pb::Ulimit {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("Name", &self.name)
            .int("Soft", self.soft)
            .int("Hard", self.hard)
            .finish();
    }
}

impl GoJson for pb::SecretEnv {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("ID", &self.id)
            .string("name", &self.name)
            .bool("optional", self.optional)
            .finish();
    }
}

impl GoJson for pb::Mount {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .int_always("input", self.input)
            .string("selector", &self.selector)
            .string("dest", &self.dest)
            .int_always("output", self.output)
            .bool("readonly", self.readonly)
            .int("mountType", i64::from(self.mount_type))
            .message("TmpfsOpt", self.tmpfs_opt.as_ref())
            .message("cacheOpt", self.cache_opt.as_ref())
            .message("secretOpt", self.secret_opt.as_ref())
            .message("SSHOpt", self.ssh_opt.as_ref())
            .string("resultID", &self.result_id)
            .finish();
    }
}

impl GoJson for pb::TmpfsOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out).int("size", self.size).finish();
    }
}

impl GoJson for pb::CacheOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("ID", &self.id)
            .int("sharing", i64::from(self.sharing))
            .finish();
    }
}

impl GoJson for pb::SecretOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("ID", &self.id)
            .int("uid", i64::from(self.uid))
            .int("gid", i64::from(self.gid))
            .int("mode", i64::from(self.mode))
            .bool("optional", self.optional)
            .finish();
    }
}

impl GoJson for pb::SshOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("ID", &self.id)
            .int("uid", i64::from(self.uid))
            .int("gid", i64::from(self.gid))
            .int("mode", i64::from(self.mode))
            .bool("optional", self.optional)
            .finish();
    }
}

impl GoJson for pb::SourceOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("identifier", &self.identifier)
            .string_map("attrs", &self.attrs)
            .finish();
    }
}

impl GoJson for pb::FileOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .list("actions", &self.actions)
            .finish();
    }
}

impl GoJson for pb::FileAction {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        let mut obj = ObjectWriter::new(out);
        obj.int_always("input", self.input)
            .int_always("secondaryInput", self.secondary_input)
            .int_always("output", self.output);
        let action = obj.key("Action");
        match &self.action {
            None => action.extend_from_slice(b"null"),
            Some(pb::file_action::Action::Copy(copy)) => {
                ObjectWriter::new(action)
                    .message("copy", Some(copy))
                    .finish();
            }
            Some(pb::file_action::Action::Mkfile(mkfile)) => {
                ObjectWriter::new(action)
                    .message("mkfile", Some(mkfile))
                    .finish();
            }
            Some(pb::file_action::Action::Mkdir(mkdir)) => {
                ObjectWriter::new(action)
                    .message("mkdir", Some(mkdir))
                    .finish();
            }
            Some(pb::file_action::Action::Rm(rm)) => {
                ObjectWriter::new(action).message("rm", Some(rm)).finish();
            }
        }
        obj.finish();
    }
}

impl GoJson for pb::FileActionCopy {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("src", &self.src)
            .string("dest", &self.dest)
            .message("owner", self.owner.as_ref())
            .int("mode", i64::from(self.mode))
            .bool("followSymlink", self.follow_symlink)
            .bool("dirCopyContents", self.dir_copy_contents)
            .bool(
                "attemptUnpackDockerCompatibility",
                self.attempt_unpack_docker_compatibility,
            )
            .bool("createDestPath", self.create_dest_path)
            .bool("allowWildcard", self.allow_wildcard)
            .bool("allowEmptyWildcard", self.allow_empty_wildcard)
            .int("timestamp", self.timestamp)
            .strings("include_patterns", &self.include_patterns)
            .strings("exclude_patterns", &self.exclude_patterns)
            .finish();
    }
}

impl GoJson for pb::FileActionMkFile {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("path", &self.path)
            .int("mode", i64::from(self.mode))
            .bytes("data", &self.data)
            .message("owner", self.owner.as_ref())
            .int("timestamp", self.timestamp)
            .finish();
    }
}

impl GoJson for pb::FileActionMkDir {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("path", &self.path)
            .int("mode", i64::from(self.mode))
            .bool("makeParents", self.make_parents)
            .message("owner", self.owner.as_ref())
            .int("timestamp", self.timestamp)
            .finish();
    }
}

impl GoJson for pb::FileActionRm {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("path", &self.path)
            .bool("allowNotFound", self.allow_not_found)
            .bool("allowWildcard", self.allow_wildcard)
            .finish();
    }
}

impl GoJson for pb::ChownOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .message("user", self.user.as_ref())
            .message("group", self.group.as_ref())
            .finish();
    }
}

impl GoJson for pb::UserOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        let mut obj = ObjectWriter::new(out);
        let user = obj.key("User");
        match &self.user {
            None => user.extend_from_slice(b"null"),
            Some(pb::user_opt::User::ByName(named)) => {
                ObjectWriter::new(user)
                    .message("byName", Some(named))
                    .finish();
            }
            Some(pb::user_opt::User::ById(id)) => {
                ObjectWriter::new(user).int("byID", i64::from(*id)).finish();
            }
        }
        obj.finish();
    }
}

impl GoJson for pb::NamedUserOpt {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("name", &self.name)
            .int_always("input", self.input)
            .finish();
    }
}

impl GoJson for pb::MergeOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out).list("inputs", &self.inputs).finish();
    }
}

impl GoJson for pb::MergeInput {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .int_always("input", self.input)
            .finish();
    }
}

impl GoJson for pb::DiffOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .message("lower", self.lower.as_ref())
            .message("upper", self.upper.as_ref())
            .finish();
    }
}

impl GoJson for pb::LowerDiffInput {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .int_always("input", self.input)
            .finish();
    }
}

impl GoJson for pb::UpperDiffInput {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .int_always("input", self.input)
            .finish();
    }
}

impl GoJson for pb::BuildOp {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        let mut obj = ObjectWriter::new(out);
        obj.int_always("builder", self.builder);
        if !self.inputs.is_empty() {
            write_map(obj.key("inputs"), &self.inputs);
        }
        obj.message("def", self.def.as_ref())
            .string_map("attrs", &self.attrs)
            .finish();
    }
}

impl GoJson for pb::BuildInput {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .int_always("input", self.input)
            .finish();
    }
}

impl GoJson for pb::Definition {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        let mut obj = ObjectWriter::new(out);
        if !self.def.is_empty() {
            let list = obj.key("def");
            list.push(b'[');
            for (i, op) in self.def.iter().enumerate() {
                if i > 0 {
                    list.push(b',');
                }
                let encoded = base64::engine::general_purpose::STANDARD.encode(op);
                write_string(list, encoded.as_bytes());
            }
            list.push(b']');
        }
        // Non-nullable in gogo: always present (`null` when empty, as Go writes a nil map).
        let metadata = obj.key("metadata");
        if self.metadata.is_empty() {
            metadata.extend_from_slice(b"null");
        } else {
            write_map(metadata, &self.metadata);
        }
        // Source maps are for error reporting only and are left out of this view.
        obj.finish();
    }
}

impl GoJson for pb::OpMetadata {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        let mut obj = ObjectWriter::new(out);
        obj.bool("ignore_cache", self.ignore_cache)
            .string_map("description", &self.description)
            .message("export_cache", self.export_cache.as_ref());
        // Non-nullable map in gogo: no omitempty.
        let caps = obj.key("caps");
        if self.caps.is_empty() {
            caps.extend_from_slice(b"null");
        } else {
            write_map(caps, &self.caps);
        }
        obj.message("progress_group", self.progress_group.as_ref())
            .finish();
    }
}

impl GoJson for pb::ExportCache {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out).bool("Value", self.value).finish();
    }
}

impl GoJson for pb::ProgressGroup {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("id", &self.id)
            .string("name", &self.name)
            .bool("weak", self.weak)
            .finish();
    }
}

impl GoJson for pb::Platform {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string("Architecture", &self.architecture)
            .string("OS", &self.os)
            .string("Variant", &self.variant)
            .string("OSVersion", &self.os_version)
            .strings("OSFeatures", &self.os_features)
            .finish();
    }
}

impl GoJson for pb::Input {
    fn write_go_json(&self, out: &mut Vec<u8>) {
        ObjectWriter::new(out)
            .string_always("digest", &self.digest)
            .int_always("index", self.index)
            .finish();
    }
}

/// `at` in UTC as RFC 3339 with nine fractional digits (`2023-11-14T22:13:20.000000005Z`).
pub fn rfc3339_nanos(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (i64, u32, u32) {
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `at` in UTC as Go's `time.RFC3339` layout formats it (whole seconds).
pub fn rfc3339_seconds(at: SystemTime) -> String {
    let full = rfc3339_nanos(at);
    format!("{}Z", &full[..19])
}

/// `at` as Go's `encoding/json` writes a `time.Time` in UTC (RFC 3339 with trailing
/// zeros of the fraction trimmed, and no fraction when it is zero).
pub fn go_time(at: SystemTime) -> String {
    let full = rfc3339_nanos(at);
    let (date, fraction) = full.trim_end_matches('Z').split_at(19);
    let fraction = fraction.trim_end_matches('0').trim_end_matches('.');
    format!("{date}{fraction}Z")
}

/// Go's zero `time.Time` as `encoding/json` writes it (an unset time is never omitted).
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses RFC 3339 text with any offset and up to nine fractional digits, as Go's
/// `time.Time` unmarshals it; `None` when malformed. Times before 1970 (Go's zero time
/// among them) are `None`: nothing kiln reads predates the epoch.
pub fn parse_go_time(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(r)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = text.get(19..)?;
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let end = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        if end == 0 || end > 9 {
            return None;
        }
        nanos = format!("{:0<9}", &f[..end]).parse().ok()?;
        rest = &f[end..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_writes() {
        for text in [
            "2026-12-05T16:26:53.427964837Z",
            "2026-12-05T16:25:19.8286792Z",
            "2000-02-29T00:00:00.12Z",
            "1970-01-01T00:00:00Z",
        ] {
            assert_eq!(go_time(parse_go_time(text).unwrap()), text);
        }
        assert_eq!(
            parse_go_time("1970-01-01T01:00:00+01:00"),
            Some(SystemTime::UNIX_EPOCH)
        );
        // Go's zero time predates the epoch: unknown.
        assert_eq!(parse_go_time(GO_ZERO_TIME), None);
        for bad in [
            "yesterday",
            "2026-13-05T16:26:53Z",
            "2026-12-05T16:26:53",
            "2026-12-05T16:26:53.Z",
            "2026-12-05T16:26:53+0100",
            "2026-12-05 16:26:53Z",
        ] {
            assert_eq!(parse_go_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_as_go_writes_them() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339_nanos(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(go_time(t), "2023-11-14T22:13:20.000000005Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(951_782_400, 120_000_000);
        assert_eq!(go_time(t), "2000-02-29T00:00:00.12Z");
        assert_eq!(go_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(t), "2000-02-29T00:00:00Z");
    }

    fn s(input: &[u8]) -> String {
        let mut out = Vec::new();
        write_string(&mut out, input);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn quote_and_backslash_are_escaped() {
        assert_eq!(s(br#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn newline_return_tab_use_short_escapes() {
        assert_eq!(s(b"\n\r\t"), r#""\n\r\t""#);
    }

    #[test]
    fn other_control_bytes_use_lowercase_u00xx() {
        // Go 1.19 writes \b and \f as \u0008 and \u000c.
        assert_eq!(
            s(b"\x00\x08\x0c\x1b\x1f"),
            r#""\u0000\u0008\u000c\u001b\u001f""#
        );
    }

    #[test]
    fn html_characters_are_escaped() {
        assert_eq!(s(b"<a & b>"), r#""\u003ca \u0026 b\u003e""#);
    }

    #[test]
    fn line_and_paragraph_separators_are_escaped() {
        assert_eq!(s("x\u{2028}y\u{2029}".as_bytes()), r#""x\u2028y\u2029""#);
    }

    #[test]
    fn invalid_utf8_bytes_each_become_replacement_escapes() {
        assert_eq!(s(b"a\xffb"), r#""a\ufffdb""#);
        // A truncated 3-byte sequence is two invalid bytes for Go.
        assert_eq!(s(b"\xe2\x82a"), r#""\ufffd\ufffda""#);
        // Encoded surrogates are invalid byte by byte.
        assert_eq!(s(b"\xed\xa0\x80"), r#""\ufffd\ufffd\ufffd""#);
    }

    #[test]
    fn non_ascii_slash_and_del_are_raw() {
        assert_eq!(s("é/ü\u{7f}".as_bytes()), "\"é/ü\u{7f}\"");
    }

    #[test]
    fn mount_keeps_input_and_output_and_omits_empty_fields() {
        let mount = pb::Mount {
            input: 0,
            output: 0,
            dest: "/".into(),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(to_go_json(&mount)).unwrap(),
            r#"{"input":0,"dest":"/","output":0}"#
        );
    }

    #[test]
    fn present_empty_submessage_is_an_empty_object() {
        let mount = pb::Mount {
            input: -1,
            output: -1,
            dest: "/c".into(),
            mount_type: pb::MountType::Cache as i32,
            cache_opt: Some(pb::CacheOpt::default()),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(to_go_json(&mount)).unwrap(),
            r#"{"input":-1,"dest":"/c","output":-1,"mountType":3,"cacheOpt":{}}"#
        );
    }

    #[test]
    fn oneof_fields_use_the_interface_name() {
        let action = pb::FileAction {
            input: 0,
            secondary_input: -1,
            output: 0,
            action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                path: "/a".into(),
                mode: 0o755,
                ..Default::default()
            })),
        };
        assert_eq!(
            String::from_utf8(to_go_json(&action)).unwrap(),
            r#"{"input":0,"secondaryInput":-1,"output":0,"Action":{"mkdir":{"path":"/a","mode":493}}}"#
        );
        let by_id = pb::UserOpt {
            user: Some(pb::user_opt::User::ById(0)),
        };
        assert_eq!(
            String::from_utf8(to_go_json(&by_id)).unwrap(),
            r#"{"User":{}}"#
        );
    }

    #[test]
    fn bytes_are_base64_and_maps_sorted() {
        let mkfile = pb::FileActionMkFile {
            path: "/f".into(),
            data: b"hi\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(to_go_json(&mkfile)).unwrap(),
            r#"{"path":"/f","data":"aGkK"}"#
        );
        let mut source = pb::SourceOp {
            identifier: "local://x".into(),
            ..Default::default()
        };
        source.attrs.insert("b".into(), "2".into());
        source.attrs.insert("a".into(), "<1>".into());
        assert_eq!(
            String::from_utf8(to_go_json(&source)).unwrap(),
            r#"{"identifier":"local://x","attrs":{"a":"\u003c1\u003e","b":"2"}}"#
        );
    }
}
