//! Image references as `docker/distribution/reference` (the version BuildKit v0.11.6
//! vendors) parses and prints them: `ParseNormalizedNamed` (adds `docker.io/library/`),
//! `TagNameOnly` (adds `:latest`), `WithDigest`, and OCI digest validation (`go-digest`).

use std::sync::LazyLock;

use regex::Regex;

/// Errors with the texts of the Go packages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid reference format")]
    InvalidFormat,
    #[error("invalid reference format: repository name must be lowercase")]
    ContainsUppercase,
    #[error("repository name must have at least one component")]
    NameEmpty,
    #[error("repository name must not be more than 255 characters")]
    NameTooLong,
    #[error("invalid repository name ({0}), cannot specify 64-byte hexadecimal strings")]
    HexIdentifier(String),
    #[error("invalid checksum digest format")]
    DigestFormat,
    #[error("invalid checksum digest length")]
    DigestLength,
    #[error("unsupported digest algorithm")]
    DigestUnsupported,
}

const ALNUM: &str = "[a-z0-9]+";
const SEPARATOR: &str = "(?:[._]|__|[-]*)";
const DOMAIN_COMPONENT: &str = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const TAG: &str = "[0-9A-Za-z_][0-9A-Za-z_.-]{0,127}";
const DIGEST: &str = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}";

fn name_component() -> String {
    format!("{ALNUM}(?:{SEPARATOR}{ALNUM})*")
}

fn domain() -> String {
    format!("{DOMAIN_COMPONENT}(?:\\.{DOMAIN_COMPONENT})*(?::[0-9]+)?")
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|_| {
        #[allow(clippy::unwrap_used)] // a constant, valid pattern
        Regex::new(r"[^\s\S]").unwrap()
    })
}

static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    let nc = name_component();
    compile(&format!(
        "^((?:{d}/)?{nc}(?:/{nc})*)(?::({TAG}))?(?:@({DIGEST}))?$",
        d = domain()
    ))
});

static ANCHORED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    let nc = name_component();
    compile(&format!("^(?:({d})/)?({nc}(?:/{nc})*)$", d = domain()))
});

static ANCHORED_TAG: LazyLock<Regex> = LazyLock::new(|| compile(&format!("^{TAG}$")));
static ANCHORED_DIGEST: LazyLock<Regex> = LazyLock::new(|| compile(&format!("^{DIGEST}$")));
static IDENTIFIER: LazyLock<Regex> = LazyLock::new(|| compile("^[a-f0-9]{64}$"));

/// A parsed reference (`domain/path[:tag][@digest]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub domain: String,
    pub path: String,
    pub tag: String,
    pub digest: String,
}

impl Reference {
    /// `domain/path`.
    pub fn name(&self) -> String {
        if self.domain.is_empty() {
            self.path.clone()
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }

    /// `reference.TagNameOnly`: adds `:latest` when there is neither tag nor digest.
    pub fn tag_name_only(mut self) -> Self {
        if self.tag.is_empty() && self.digest.is_empty() {
            self.tag = "latest".into();
        }
        self
    }

    /// `reference.WithDigest`.
    pub fn with_digest(mut self, digest: &str) -> Result<Self, ReferenceError> {
        if !ANCHORED_DIGEST.is_match(digest) {
            return Err(ReferenceError::DigestFormat);
        }
        self.digest = digest.to_owned();
        Ok(self)
    }

    /// `reference.WithTag`.
    pub fn with_tag(mut self, tag: &str) -> Result<Self, ReferenceError> {
        if !ANCHORED_TAG.is_match(tag) {
            return Err(ReferenceError::InvalidFormat);
        }
        self.tag = tag.to_owned();
        Ok(self)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())?;
        if !self.tag.is_empty() {
            write!(f, ":{}", self.tag)?;
        }
        if !self.digest.is_empty() {
            write!(f, "@{}", self.digest)?;
        }
        Ok(())
    }
}

fn split_docker_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.find('/') {
        Some(i) if name[..i].contains(['.', ':']) || &name[..i] == "localhost" => {
            (name[..i].to_owned(), name[i + 1..].to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

/// `reference.ParseNormalizedNamed`.
pub fn parse_normalized_named(s: &str) -> Result<Reference, ReferenceError> {
    if IDENTIFIER.is_match(s) {
        return Err(ReferenceError::HexIdentifier(s.to_owned()));
    }
    let (domain, remainder) = split_docker_domain(s);
    let remote_name = match remainder.find(':') {
        Some(i) => &remainder[..i],
        None => &remainder,
    };
    if remote_name.to_lowercase() != remote_name {
        return Err(ReferenceError::ContainsUppercase);
    }
    parse(&format!("{domain}/{remainder}"))
}

/// `reference.Parse`.
pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
    let Some(caps) = REFERENCE.captures(s) else {
        if s.is_empty() {
            return Err(ReferenceError::NameEmpty);
        }
        if REFERENCE.is_match(&s.to_lowercase()) {
            return Err(ReferenceError::ContainsUppercase);
        }
        return Err(ReferenceError::InvalidFormat);
    };
    let get = |i: usize| caps.get(i).map(|m| m.as_str()).unwrap_or("");
    let name = get(1);
    if name.len() > 255 {
        return Err(ReferenceError::NameTooLong);
    }
    let (domain, path) = match ANCHORED_NAME.captures(name) {
        Some(n) => (
            n.get(1).map(|m| m.as_str()).unwrap_or("").to_owned(),
            n.get(2).map(|m| m.as_str()).unwrap_or("").to_owned(),
        ),
        None => (String::new(), name.to_owned()),
    };
    let digest = get(3);
    if !digest.is_empty() {
        validate_digest(digest)?;
    }
    if domain.is_empty() && path.is_empty() {
        return Err(ReferenceError::NameEmpty);
    }
    Ok(Reference {
        domain,
        path,
        tag: get(2).to_owned(),
        digest: digest.to_owned(),
    })
}

/// `digest.Parse` of go-digest with sha256, sha384 and sha512 available.
pub fn validate_digest(s: &str) -> Result<(), ReferenceError> {
    let Some(i) = s.find(':').filter(|i| *i > 0 && i + 1 < s.len()) else {
        return Err(ReferenceError::DigestFormat);
    };
    let (algorithm, encoded) = (&s[..i], &s[i + 1..]);
    let size = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => {
            return Err(if ANCHORED_DIGEST.is_match(s) {
                ReferenceError::DigestUnsupported
            } else {
                ReferenceError::DigestFormat
            });
        }
    };
    if encoded.len() != size {
        return Err(ReferenceError::DigestLength);
    }
    if !encoded
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ReferenceError::DigestFormat);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn norm(s: &str) -> String {
        parse_normalized_named(s)
            .unwrap()
            .tag_name_only()
            .to_string()
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("user/app:1"), "docker.io/user/app:1");
        assert_eq!(
            norm("localhost:5000/busybox:latest"),
            "localhost:5000/busybox:latest"
        );
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(norm("index.docker.io/a/b"), "docker.io/a/b:latest");
        let d = "sha256:d5a4030b4bfee21110558a967581d0c06d839db7c19607ab17f0a9173265f9b2";
        let pinned = parse_normalized_named("localhost:5000/busybox:latest")
            .unwrap()
            .with_digest(d)
            .unwrap();
        assert_eq!(
            pinned.to_string(),
            format!("localhost:5000/busybox:latest@{d}")
        );
        assert_eq!(
            norm(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
    }

    #[test]
    fn rejects_like_docker() {
        assert_eq!(
            parse_normalized_named("Alpine").unwrap_err().to_string(),
            "invalid reference format: repository name must be lowercase"
        );
        assert_eq!(
            parse_normalized_named("a b").unwrap_err(),
            ReferenceError::InvalidFormat
        );
        assert_eq!(
            parse_normalized_named("busybox@sha256:abc").unwrap_err(),
            ReferenceError::InvalidFormat
        );
        assert_eq!(
            parse_normalized_named(&"a".repeat(64)).unwrap_err(),
            ReferenceError::HexIdentifier("a".repeat(64))
        );
        assert_eq!(
            validate_digest(&format!("sha256:{}", "0".repeat(63))).unwrap_err(),
            ReferenceError::DigestLength
        );
        assert_eq!(
            validate_digest("md5:abc").unwrap_err(),
            ReferenceError::DigestFormat
        );
        assert_eq!(
            validate_digest(&format!("md5:{}", "0".repeat(32))).unwrap_err(),
            ReferenceError::DigestUnsupported
        );
    }
}
