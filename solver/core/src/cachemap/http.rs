//! `http(s)://` sources as BuildKit v0.11.6 names and keys them (`source/identifier.go`,
//! `source/http/httpsource.go`): the identifier's attributes, the downloaded file's name
//! (`getFileName`: `http.filename`, else the response's `Content-Disposition`, else the
//! URL's last path element, else `download`) and the cache key (`formatCacheKey`: a
//! digest of the name, mode, owner, content checksum and `Last-Modified`).
//!
//! Names come from the build definition or from a server, so a name is only ever used as
//! one path component: a name that is not one (empty, `.`, `..`, containing `/` or NUL)
//! from a response or URL falls through to the next candidate, as if absent.

use kiln_proto::gojson::ObjectWriter;
use kiln_proto::{Digest, pb};

use super::source_error::SourceError;

/// An `http(s)://` source (BuildKit's `HTTPIdentifier`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpIdentifier {
    /// The URL, as the identifier spells it.
    pub url: String,
    /// `http.checksum`: the expected digest of the body.
    pub checksum: Option<Digest>,
    /// `http.filename`: the file's name in the result (empty: derived).
    pub filename: String,
    /// `http.perm` (0: the default, 0600).
    pub perm: i64,
    /// `http.uid` and `http.gid`.
    pub uid: i64,
    pub gid: i64,
}

impl HttpIdentifier {
    /// Parses the source's identifier and `http.*` attributes as BuildKit's `FromLLB`.
    pub fn from_op(source: &pb::SourceOp) -> Result<Self, SourceError> {
        let bad = |attr: &'static str, value: &str, reason: String| SourceError::BadAttr {
            identifier: source.identifier.clone(),
            attr,
            value: value.to_owned(),
            reason,
        };
        let int_attr = |attr: &'static str| -> Result<i64, SourceError> {
            source
                .attrs
                .get(attr)
                .map(|v| parse_go_int(v).ok_or_else(|| bad(attr, v, "not an integer".to_owned())))
                .transpose()
                .map(|v| v.unwrap_or(0))
        };
        let checksum = source
            .attrs
            .get("http.checksum")
            .map(|value| {
                value
                    .parse::<Digest>()
                    .map_err(|e| bad("http.checksum", value, e.to_string()))
            })
            .transpose()?;
        Ok(HttpIdentifier {
            url: source.identifier.clone(),
            checksum,
            filename: source
                .attrs
                .get("http.filename")
                .cloned()
                .unwrap_or_default(),
            perm: int_attr("http.perm")?,
            uid: int_attr("http.uid")?,
            gid: int_attr("http.gid")?,
        })
    }

    /// `getFileName`: the name of the downloaded file, given the response's
    /// `Content-Disposition` (`None` before a response, as for the checksum key).
    pub fn file_name(&self, content_disposition: Option<&str>) -> String {
        if !self.filename.is_empty() {
            return self.filename.clone();
        }
        content_disposition
            .and_then(disposition_file_name)
            .or_else(|| url_base_name(&self.url))
            .unwrap_or_else(|| "download".to_owned())
    }

    /// `formatCacheKey`: the digest of `{"Filename","Perm","UID","GID","Checksum",
    /// "LastModTime"}` (the last omitted when empty), the source's cache key.
    pub fn cache_key(&self, filename: &str, checksum: &Digest, last_modified: &str) -> Digest {
        let mut json = Vec::new();
        ObjectWriter::new(&mut json)
            .string_always("Filename", filename)
            .int_always("Perm", self.perm)
            .int_always("UID", self.uid)
            .int_always("GID", self.gid)
            .string_always("Checksum", checksum.as_str())
            .string("LastModTime", last_modified)
            .finish();
        Digest::of(&json)
    }
}

/// Whether `name` can name a file in a directory: one component, not `.` or `..`.
pub fn is_single_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Go `strconv.ParseInt(v, 0, 64)`: optional sign, `0x`/`0o`/`0b`/leading-`0` prefixes,
/// underscores only with a prefix.
pub fn parse_go_int(value: &str) -> Option<i64> {
    let (negative, digits) = match value.as_bytes().first()? {
        b'-' => (true, &value[1..]),
        b'+' => (false, &value[1..]),
        _ => (false, value),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body, prefixed) = if let Some(b) = lower.strip_prefix("0x") {
        (16, b.to_owned(), true)
    } else if let Some(b) = lower.strip_prefix("0o") {
        (8, b.to_owned(), true)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (2, b.to_owned(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_owned(), true)
    } else {
        (10, lower.clone(), false)
    };
    if body.is_empty() || (!prefixed && body.contains('_')) {
        return None;
    }
    let body = body.replace('_', "");
    let magnitude = i128::from_str_radix(&body, radix).ok()?;
    let signed = if negative { -magnitude } else { magnitude };
    i64::try_from(signed).ok()
}

/// `path.Base` of the path Go's `url.Parse` finds in `url` (percent-decoded); `None` when
/// Go could not parse it or the base is not a file name.
pub fn url_base_name(url: &str) -> Option<String> {
    if url.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return None;
    }
    let (url, fragment) = url.split_once('#').unwrap_or((url, ""));
    percent_decode(fragment)?;
    let (_, rest) = url.split_once("://")?;
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !valid_authority(authority) {
        return None;
    }
    let decoded = percent_decode(path)?;
    let decoded = String::from_utf8_lossy(&decoded);
    let base = kiln_proto::paths::base(&decoded);
    is_single_component(&base).then_some(base)
}

/// The parts of Go's `parseAuthority` that reject common malformed hosts: a port must be
/// digits, brackets must close.
fn valid_authority(authority: &str) -> bool {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((_, after)) => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return false,
            },
            None => return false,
        }
    } else {
        host.rsplit_once(':').map(|(_, p)| p)
    };
    port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// `%XX` decoding; `None` on a malformed escape (Go's "invalid URL escape").
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The `filename` parameter of a `Content-Disposition` value as BuildKit takes it: parsed
/// with Go's `mime.ParseMediaType` (RFC 2231 extended and continued values included),
/// ignored when it ends in `/`, else its `path.Base`.
pub fn disposition_file_name(value: &str) -> Option<String> {
    let params = parse_media_params(value)?;
    let name = params.get("filename").filter(|n| !n.is_empty())?;
    if name.ends_with('/') {
        return None;
    }
    let base = kiln_proto::paths::base(name);
    is_single_component(&base).then_some(base)
}

fn is_tspecial(c: u8) -> bool {
    b"()<>@,;:\\\"/[]?=".contains(&c)
}

fn is_token_char(c: u8) -> bool {
    c > 0x20 && c < 0x7f && !is_tspecial(c)
}

/// Go's `consumeToken` on bytes: the leading token characters and the rest.
fn consume_token(v: &str) -> (&str, &str) {
    let end = v.bytes().position(|c| !is_token_char(c)).unwrap_or(v.len());
    v.split_at(end)
}

fn trim_left_space(v: &str) -> &str {
    v.trim_start_matches(char::is_whitespace)
}

/// Go's `consumeValue`: a token or a quoted string (with MSIE-tolerant backslashes).
fn consume_value(v: &str) -> (String, &str) {
    let bytes = v.as_bytes();
    if bytes.is_empty() {
        return (String::new(), v);
    }
    if bytes[0] != b'"' {
        let (token, rest) = consume_token(v);
        return (token.to_owned(), rest);
    }
    let mut buffer = Vec::new();
    let mut i = 1;
    while i < bytes.len() {
        let r = bytes[i];
        if r == b'"' {
            return (String::from_utf8_lossy(&buffer).into_owned(), &v[i + 1..]);
        }
        if r == b'\\' && i + 1 < bytes.len() && is_tspecial(bytes[i + 1]) {
            buffer.push(bytes[i + 1]);
            i += 2;
            continue;
        }
        if r == b'\r' || r == b'\n' {
            return (String::new(), v);
        }
        buffer.push(r);
        i += 1;
    }
    (String::new(), v)
}

/// Go's `consumeMediaParam`: `None` when `v` does not start with a parameter.
fn consume_media_param(v: &str) -> Option<(String, String, &str)> {
    let rest = trim_left_space(v).strip_prefix(';')?;
    let rest = trim_left_space(rest);
    let (param, rest) = consume_token(rest);
    if param.is_empty() {
        return None;
    }
    let rest = trim_left_space(rest).strip_prefix('=')?;
    let rest = trim_left_space(rest);
    let (value, rest2) = consume_value(rest);
    if value.is_empty() && rest2.len() == rest.len() {
        return None;
    }
    Some((param.to_ascii_lowercase(), value, rest2))
}

/// Go's `checkMediaTypeDisposition`.
fn valid_media_type(s: &str) -> bool {
    let (typ, rest) = consume_token(s);
    if typ.is_empty() {
        return false;
    }
    if rest.is_empty() {
        return true;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return false;
    };
    let (subtype, rest) = consume_token(rest);
    !subtype.is_empty() && rest.is_empty()
}

/// Go's `decode2231Enc`: `charset'language'percent-encoded`, UTF-8 or US-ASCII only.
fn decode_2231(v: &str) -> Option<String> {
    let mut parts = v.splitn(3, '\'');
    let charset = parts.next()?.to_ascii_lowercase();
    let _language = parts.next()?;
    let encoded = parts.next()?;
    if charset != "us-ascii" && charset != "utf-8" {
        return None;
    }
    Some(String::from_utf8_lossy(&percent_decode(encoded)?).into_owned())
}

/// The parameters of Go's `mime.ParseMediaType`; `None` where Go returns an error.
fn parse_media_params(v: &str) -> Option<std::collections::BTreeMap<String, String>> {
    use std::collections::BTreeMap;
    let base = v.split_once(';').map_or(v, |(b, _)| b);
    let media_type = base.to_lowercase();
    if !valid_media_type(media_type.trim()) {
        return None;
    }
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let mut continuation: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut v = &v[base.len()..];
    loop {
        v = trim_left_space(v);
        if v.is_empty() {
            break;
        }
        let Some((key, value, rest)) = consume_media_param(v) else {
            if v.trim() == ";" {
                break;
            }
            return None;
        };
        let map = match key.split_once('*') {
            Some((base_name, _)) => continuation.entry(base_name.to_owned()).or_default(),
            None => &mut params,
        };
        if map.get(&key).is_some_and(|existing| *existing != value) {
            return None;
        }
        map.insert(key, value);
        v = rest;
    }
    for (key, pieces) in continuation {
        if let Some(single) = pieces.get(&format!("{key}*")) {
            if let Some(decoded) = decode_2231(single) {
                params.insert(key, decoded);
            }
            continue;
        }
        let mut value = String::new();
        let mut valid = false;
        for n in 0.. {
            let simple = format!("{key}*{n}");
            if let Some(part) = pieces.get(&simple) {
                valid = true;
                value.push_str(part);
                continue;
            }
            let Some(part) = pieces.get(&format!("{simple}*")) else {
                break;
            };
            valid = true;
            if n == 0 {
                if let Some(decoded) = decode_2231(part) {
                    value.push_str(&decoded);
                }
            } else if let Some(decoded) = percent_decode(part) {
                value.push_str(&String::from_utf8_lossy(&decoded));
            }
        }
        if valid {
            params.insert(key, value);
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(url: &str, filename: &str) -> HttpIdentifier {
        HttpIdentifier {
            url: url.to_owned(),
            checksum: None,
            filename: filename.to_owned(),
            perm: 0,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn file_names_follow_get_file_name() {
        let plain = id("https://example.com/a/file.tar.gz?x=1#frag", "");
        assert_eq!(plain.file_name(None), "file.tar.gz");
        assert_eq!(
            plain.file_name(Some("attachment; filename=\"other.zip\"")),
            "other.zip"
        );
        assert_eq!(
            id("https://example.com/a/file", "manual").file_name(Some("attachment; filename=x")),
            "manual"
        );
        assert_eq!(id("https://example.com/", "").file_name(None), "download");
        assert_eq!(id("https://example.com", "").file_name(None), "download");
        assert_eq!(
            id("https://example.com/dir/", "").file_name(None),
            "dir",
            "path.Base strips trailing slashes"
        );
        assert_eq!(
            id("https://example.com/a%20b.txt", "").file_name(None),
            "a b.txt",
            "the path is percent-decoded"
        );
        assert_eq!(
            id("https://example.com/a%2Fb", "").file_name(None),
            "b",
            "a decoded slash separates"
        );
        assert_eq!(
            id("https://example.com/bad%zz", "").file_name(None),
            "download"
        );
        assert_eq!(
            id("https://example.com:x/f", "").file_name(None),
            "download"
        );
        assert_eq!(
            id("https://example.com/a/..", "").file_name(None),
            "download"
        );
    }

    #[test]
    fn server_names_are_never_paths() {
        let u = id("https://example.com/file", "");
        for hostile in [
            "attachment; filename=\"../../etc/passwd\"",
            "attachment; filename=\"/etc/passwd\"",
            "attachment; filename=\"sub/dir/passwd\"",
        ] {
            assert_eq!(u.file_name(Some(hostile)), "passwd", "{hostile}");
        }
        for unusable in [
            "attachment; filename=\"..\"",
            "attachment; filename=\".\"",
            "attachment; filename=\"dir/\"",
            "attachment; filename=\"\"",
            "attachment; filename=a; filename=b",
            "attachment; filename",
            "/bad; filename=x",
        ] {
            assert_eq!(u.file_name(Some(unusable)), "file", "{unusable}");
        }
        assert!(!is_single_component("a/b"));
        assert!(!is_single_component(".."));
        assert!(!is_single_component("a\0b"));
        assert!(is_single_component("..a"));
    }

    #[test]
    fn content_disposition_is_go_mime() {
        assert_eq!(
            disposition_file_name("attachment; filename*=UTF-8''na%C3%AFve.txt"),
            Some("naïve.txt".to_owned())
        );
        assert_eq!(
            disposition_file_name("attachment; filename*0=\"a\"; filename*1=\"b.txt\""),
            Some("ab.txt".to_owned())
        );
        assert_eq!(
            disposition_file_name("ATTACHMENT;FILENAME = plain.bin ;"),
            Some("plain.bin".to_owned())
        );
        assert_eq!(
            disposition_file_name("inline; filename=\"q\\\"uote\""),
            Some("q\"uote".to_owned())
        );
        assert_eq!(disposition_file_name("attachment"), None);
        assert_eq!(
            disposition_file_name("attachment; filename*=latin-1''x"),
            None
        );
    }

    #[test]
    fn cache_keys_are_format_cache_key() {
        let mut u = id("https://example.com/file.tar.gz", "");
        let checksum: Digest =
            "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .parse()
                .unwrap();
        // The same key source.rs's checksum test expects BuildKit to compute.
        assert_eq!(
            Digest::of(
                format!(
                    "buildkit.source.v0:{}",
                    u.cache_key("file.tar.gz", &checksum, "")
                )
                .as_bytes()
            )
            .as_str(),
            "sha256:6cd681e5bac18813c466e3792a3f1d52f1f93d9982d3a1765c8c94eaf1152fff"
        );
        let with_time = u.cache_key("file.tar.gz", &checksum, "Wed, 21 Oct 2015 07:28:00 GMT");
        assert_ne!(with_time, u.cache_key("file.tar.gz", &checksum, ""));
        u.perm = 0o644;
        assert_ne!(
            with_time,
            u.cache_key("file.tar.gz", &checksum, "Wed, 21 Oct 2015 07:28:00 GMT")
        );
    }

    #[test]
    fn go_int_parsing() {
        assert_eq!(parse_go_int("0644"), Some(0o644));
        assert_eq!(parse_go_int("0x1f"), Some(31));
        assert_eq!(parse_go_int("-12"), Some(-12));
        assert_eq!(parse_go_int("1_000"), None);
        assert_eq!(parse_go_int("0x1_0"), Some(16));
        assert_eq!(parse_go_int(""), None);
    }
}
