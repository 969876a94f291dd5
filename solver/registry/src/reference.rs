//! Image source identifiers: the reference after `docker-image://` or `oci-layout://` and
//! the source attributes BuildKit v0.11.6 reads for them (llb-wire.md §5), parsed with the
//! error texts BuildKit gives.

use std::collections::BTreeMap;
use std::fmt;

use kiln_proto::{Digest, pb};
use oci_client::Reference;

/// Errors from parsing an image source identifier or its attributes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentifierError {
    /// BuildKit's containerd reference parser wants a tag or a digest.
    #[error("object required")]
    ObjectRequired,
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid resolvemode: {0}")]
    ResolveMode(String),
    #[error("invalid layer limit {0}")]
    LayerLimit(String),
    #[error("invalid record type {0}")]
    RecordType(String),
    #[error("{0} is not an image source")]
    NotAnImage(String),
    #[error("oci-layout source {0} has no oci.store attribute naming its store")]
    NoStore(String),
}

/// `image.resolvemode`: where the manifest of a tagged reference comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResolveMode {
    /// `default` or empty: as `pull` for a registry.
    #[default]
    Default,
    /// Always ask the registry what the tag points to.
    Pull,
    /// Prefer what kiln resolved the tag to before, asking the registry only if unknown.
    Local,
}

impl ResolveMode {
    /// Parses the attribute value.
    pub fn parse(value: &str) -> Result<Self, IdentifierError> {
        match value {
            "" | "default" => Ok(ResolveMode::Default),
            "pull" => Ok(ResolveMode::Pull),
            "local" => Ok(ResolveMode::Local),
            other => Err(IdentifierError::ResolveMode(other.to_owned())),
        }
    }
}

/// `image.recordtype`: how the pulled snapshot is labelled (not part of any key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecordType {
    #[default]
    Regular,
    Internal,
    Frontend,
}

impl RecordType {
    /// Parses the attribute value.
    pub fn parse(value: &str) -> Result<Self, IdentifierError> {
        match value {
            "" | "regular" => Ok(RecordType::Regular),
            "internal" => Ok(RecordType::Internal),
            "frontend" => Ok(RecordType::Frontend),
            other => Err(IdentifierError::RecordType(other.to_owned())),
        }
    }

    /// The snapshot record type string.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::Regular => "regular",
            RecordType::Internal => "internal",
            RecordType::Frontend => "frontend",
        }
    }
}

/// A layer limit attribute: Go `strconv.Atoi`, then `> 0`.
pub fn parse_layer_limit(value: &str) -> Result<usize, IdentifierError> {
    let bad = || IdentifierError::LayerLimit(value.to_owned());
    let n: i64 = value.parse().map_err(|_| bad())?;
    if n <= 0 {
        return Err(bad());
    }
    usize::try_from(n).map_err(|_| bad())
}

/// Whether `reference` names an object (a `:tag` in its last path element, or `@digest`),
/// as containerd's `reference.Parse` requires for BuildKit image identifiers.
fn has_object(reference: &str) -> bool {
    reference.contains('@')
        || reference
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
}

/// Parses an image reference with Docker's normalisation (`busybox` →
/// `docker.io/library/busybox:latest`); a missing tag becomes `latest`. For user input such
/// as a CLI flag; identifiers from a Definition go through [`parse_identifier_reference`].
///
/// The grammar is distribution's reference grammar, checked by hand: the `regex` the
/// reference crates use compiles Unicode classes on first use, which cost more than a
/// whole cached build (tens of milliseconds), and Go's `\w` in tags is ASCII anyway.
pub fn parse_normalized(reference: &str) -> Result<Reference, IdentifierError> {
    let invalid = |reason: &str| IdentifierError::InvalidReference {
        reference: reference.to_owned(),
        reason: reason.to_owned(),
    };
    if reference.len() == 64
        && reference
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(invalid(
            "cannot specify 64-byte hexadecimal strings as a repository name",
        ));
    }
    let grammar = ParsedReference::parse(reference).map_err(invalid)?;
    let (registry, repository) = split_docker_domain(grammar.name);
    if repository.to_ascii_lowercase() != repository {
        return Err(invalid(
            "invalid reference format: repository name must be lowercase",
        ));
    }
    Ok(match (grammar.tag, grammar.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.to_owned(), digest.to_owned())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.to_owned()),
        (tag, None) => {
            Reference::with_tag(registry, repository, tag.unwrap_or("latest").to_owned())
        }
    })
}

/// The parts of `name[:tag][@digest]` after checking the grammar.
struct ParsedReference<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

/// Longest name (domain and path) distribution accepts.
const NAME_TOTAL_LENGTH_MAX: usize = 255;

impl<'a> ParsedReference<'a> {
    fn parse(text: &'a str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err("repository name must have at least one component");
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/'; an earlier ':' is a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if !valid_name(name) || !tag.is_none_or(valid_tag) {
            return Err("invalid reference format");
        }
        if let Some(digest) = digest {
            check_digest(digest)?;
        }
        if name.len() > NAME_TOTAL_LENGTH_MAX {
            return Err("repository name must not be more than 255 characters");
        }
        Ok(ParsedReference { name, tag, digest })
    }
}

/// `[domain '/'] path-component ('/' path-component)*`.
fn valid_name(name: &str) -> bool {
    let components: Vec<&str> = name.split('/').collect();
    let paths_from = |start: usize| components[start..].iter().all(|c| valid_path_component(c));
    paths_from(0) || (components.len() > 1 && valid_domain(components[0]) && paths_from(1))
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*` with separator `[._]|__|[-]*`.
fn valid_path_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Between alphanumeric runs: one '.', one '_', "__", or any number of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `domain-component ('.' domain-component)* [':' [0-9]+]`.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
    };
    host.split('.').all(component)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[\w][\w.-]{0,127}` with Go's ASCII `\w`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `algorithm ':' hex{32,}`, algorithm components `[A-Za-z][A-Za-z0-9]*` joined by one of
/// `+.-_`; then the lengths distribution checks for the algorithms it knows.
fn check_digest(digest: &str) -> Result<(), &'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err("invalid reference format");
    };
    let algorithm_ok = algorithm.split(['+', '.', '-', '_']).all(|c| {
        let b = c.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("invalid reference format");
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length");
    }
    Ok(())
}

/// Docker's `splitDockerDomain`: the first component is a registry when it has a '.' or
/// ':', is `localhost`, or has upper case; Docker Hub names get `library/`.
fn split_docker_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.to_ascii_lowercase() != first =>
        {
            (first.to_owned(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".to_owned();
    }
    if domain == "docker.io" && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

/// Parses the reference of a `docker-image://` identifier: a tag or digest is required
/// (`object required`), the name is normalised as [`parse_normalized`] does.
pub fn parse_identifier_reference(reference: &str) -> Result<Reference, IdentifierError> {
    if reference.is_empty() || reference.contains("://") {
        return Err(IdentifierError::InvalidReference {
            reference: reference.to_owned(),
            reason: "invalid reference".to_owned(),
        });
    }
    if !has_object(reference) {
        return Err(IdentifierError::ObjectRequired);
    }
    parse_normalized(reference)
}

/// A `docker-image://` source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageIdentifier {
    pub reference: Reference,
    pub resolve_mode: ResolveMode,
    /// `image.layerlimit`: only the first n layers.
    pub layer_limit: Option<usize>,
    pub record_type: RecordType,
}

impl ImageIdentifier {
    /// Parses the part after `docker-image://` and the op's attributes.
    pub fn parse(rest: &str, attrs: &BTreeMap<String, String>) -> Result<Self, IdentifierError> {
        let reference = parse_identifier_reference(rest)?;
        let resolve_mode = attrs
            .get("image.resolvemode")
            .map(|v| ResolveMode::parse(v))
            .transpose()?
            .unwrap_or_default();
        let layer_limit = attrs
            .get("image.layerlimit")
            .map(|v| parse_layer_limit(v))
            .transpose()?;
        let record_type = attrs
            .get("image.recordtype")
            .map(|v| RecordType::parse(v))
            .transpose()?
            .unwrap_or_default();
        Ok(ImageIdentifier {
            reference,
            resolve_mode,
            layer_limit,
            record_type,
        })
    }
}

/// An `oci-layout://` source: an image in a local OCI layout directory the user mapped to
/// a store name (`oci.store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciLayoutIdentifier {
    /// The reference as written (for messages).
    pub reference: String,
    /// The name part (before `:tag` / `@digest`).
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
    /// `oci.store`: the store name the user maps to a directory.
    pub store: String,
    /// `oci.layerlimit`.
    pub layer_limit: Option<usize>,
}

impl OciLayoutIdentifier {
    /// Parses the part after `oci-layout://` and the op's attributes.
    pub fn parse(rest: &str, attrs: &BTreeMap<String, String>) -> Result<Self, IdentifierError> {
        let invalid = |reason: &str| IdentifierError::InvalidReference {
            reference: rest.to_owned(),
            reason: reason.to_owned(),
        };
        if rest.is_empty() || rest.contains("://") {
            return Err(invalid("invalid reference"));
        }
        if !has_object(rest) {
            return Err(IdentifierError::ObjectRequired);
        }
        let (without_digest, digest) = match rest.split_once('@') {
            Some((name, digest)) => (
                name,
                Some(
                    digest
                        .parse::<Digest>()
                        .map_err(|e| invalid(&e.to_string()))?,
                ),
            ),
            None => (rest, None),
        };
        let (name, tag) = match without_digest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag.to_owned())),
            _ => (without_digest, None),
        };
        if name.is_empty() || tag.as_deref() == Some("") {
            return Err(invalid("empty name or tag"));
        }
        let store = attrs
            .get("oci.store")
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| IdentifierError::NoStore(format!("oci-layout://{rest}")))?;
        let layer_limit = attrs
            .get("oci.layerlimit")
            .map(|v| parse_layer_limit(v))
            .transpose()?;
        Ok(OciLayoutIdentifier {
            reference: rest.to_owned(),
            name: name.to_owned(),
            tag,
            digest,
            store,
            layer_limit,
        })
    }
}

/// An image source of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    DockerImage(ImageIdentifier),
    OciLayout(OciLayoutIdentifier),
}

impl ImageSource {
    /// Parses a SourceOp that is a `docker-image://` or `oci-layout://` source.
    pub fn from_op(op: &pb::SourceOp) -> Result<Self, IdentifierError> {
        Self::parse(&op.identifier, &op.attrs)
    }

    /// Parses an identifier with its attributes.
    pub fn parse(
        identifier: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Self, IdentifierError> {
        match identifier.split_once("://") {
            Some(("docker-image", rest)) => {
                ImageIdentifier::parse(rest, attrs).map(ImageSource::DockerImage)
            }
            Some(("oci-layout", rest)) => {
                OciLayoutIdentifier::parse(rest, attrs).map(ImageSource::OciLayout)
            }
            _ => Err(IdentifierError::NotAnImage(identifier.to_owned())),
        }
    }

    /// The layer limit attribute of either kind.
    pub fn layer_limit(&self) -> Option<usize> {
        match self {
            ImageSource::DockerImage(i) => i.layer_limit,
            ImageSource::OciLayout(o) => o.layer_limit,
        }
    }

    /// The snapshot record type (`regular` for OCI layouts).
    pub fn record_type(&self) -> RecordType {
        match self {
            ImageSource::DockerImage(i) => i.record_type,
            ImageSource::OciLayout(_) => RecordType::Regular,
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::DockerImage(i) => write!(f, "docker-image://{}", i.reference),
            ImageSource::OciLayout(o) => write!(f, "oci-layout://{}", o.reference),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The regex parser of the reference crate, the grammar's reference implementation.
    fn by_regex(text: &str) -> Option<String> {
        text.parse::<Reference>().ok().map(|r| r.whole())
    }

    fn by_hand(text: &str) -> Option<String> {
        parse_normalized(text).ok().map(|r| r.whole())
    }

    #[test]
    fn hand_parser_agrees_with_the_grammar_on_known_references() {
        let hex = "a".repeat(64);
        let cases = [
            "busybox".to_owned(),
            "busybox:latest".to_owned(),
            "library/busybox:1.36".to_owned(),
            "docker.io/library/busybox".to_owned(),
            "index.docker.io/busybox".to_owned(),
            "localhost:5000/busybox:latest".to_owned(),
            "localhost/busybox".to_owned(),
            "127.0.0.1:5000/a/b/c:v1.2-rc_3".to_owned(),
            format!("busybox@sha256:{hex}"),
            format!("busybox:tag@sha256:{hex}"),
            format!("localhost:5000/busybox@sha256:{hex}"),
            "a__b/c.d/e---f".to_owned(),
            "ghcr.io/o-r-g/repo".to_owned(),
            "my-registry.example.com:443/x".to_owned(),
            format!("x:{}", "t".repeat(128)),
        ];
        for case in &cases {
            assert_eq!(by_hand(case), by_regex(case), "{case}");
            assert!(by_hand(case).is_some(), "{case}");
        }
        let bad = [
            "".to_owned(),
            "Busybox".to_owned(),
            "busybox:".to_owned(),
            "busybox::tag".to_owned(),
            "busy box".to_owned(),
            "busybox:-tag".to_owned(),
            "a/-b".to_owned(),
            "a/b-".to_owned(),
            "a/b..c".to_owned(),
            "a/b___c".to_owned(),
            "-host/x".to_owned(),
            "host:/x".to_owned(),
            "host:5x/x".to_owned(),
            "busybox@sha256:abc".to_owned(),
            format!("busybox@sha256:{}", "a".repeat(63)),
            format!("busybox@md5:{}", "a".repeat(32)),
            format!("busybox@sha256:{hex}@sha256:{hex}"),
            format!("x:{}", "t".repeat(129)),
            format!("{}/x", "a".repeat(255)),
            hex.clone(),
            "busybox:tägg".to_owned(),
        ];
        for case in &bad {
            assert_eq!(by_hand(case), None, "{case:?} must be rejected");
        }
        // Docker's domain rule: an upper-case first component is a registry.
        let upper = parse_normalized("Registry/x:1").unwrap();
        assert_eq!(upper.registry(), "Registry");
        assert_eq!(upper.repository(), "x");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Over references built from the grammar's own alphabet, the hand parser accepts
        /// and normalises exactly what the regex does (upper case excluded: Docker and
        /// the crate disagree on whose domain that is, and kiln follows Docker).
        #[test]
        fn hand_parser_matches_the_regex(text in "[a-z0-9._:/@-]{1,40}(:[a-zA-Z0-9_.-]{0,6})?(@sha256:[0-9a-f]{64})?") {
            prop_assert_eq!(by_hand(&text), by_regex(&text), "{}", text);
        }
    }

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn normalises_names_and_requires_an_object() {
        let r = parse_normalized("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let r = parse_identifier_reference("localhost:5000/busybox:latest").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "busybox");
        assert_eq!(r.tag(), Some("latest"));
        let r = parse_identifier_reference("busybox:1.35").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:1.35");
        let pinned = "localhost:5000/busybox@sha256:d5a4030b4bfee21110558a967581d0c06d839db7c19607ab17f0a9173265f9b2";
        let r = parse_identifier_reference(pinned).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(
            r.digest(),
            Some("sha256:d5a4030b4bfee21110558a967581d0c06d839db7c19607ab17f0a9173265f9b2")
        );
        for no_object in [
            "busybox",
            "localhost:5000/busybox",
            "docker.io/library/busybox",
        ] {
            assert_eq!(
                parse_identifier_reference(no_object).unwrap_err(),
                IdentifierError::ObjectRequired,
                "{no_object}"
            );
            assert_eq!(
                parse_identifier_reference(no_object)
                    .unwrap_err()
                    .to_string(),
                "object required"
            );
        }
        let err = parse_identifier_reference("Busybox:latest").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid reference \"Busybox:latest\""),
            "{err}"
        );
    }

    #[test]
    fn attribute_errors_have_buildkit_texts() {
        let id = "docker-image://localhost:5000/busybox:latest";
        let parse = |pairs: &[(&str, &str)]| ImageSource::parse(id, &attrs(pairs));
        for (key, value, text) in [
            (
                "image.resolvemode",
                "sometimes",
                "invalid resolvemode: sometimes",
            ),
            ("image.layerlimit", "0", "invalid layer limit 0"),
            ("image.layerlimit", "-1", "invalid layer limit -1"),
            ("image.layerlimit", "two", "invalid layer limit two"),
            ("image.layerlimit", "", "invalid layer limit "),
            ("image.recordtype", "odd", "invalid record type odd"),
        ] {
            assert_eq!(
                parse(&[(key, value)]).unwrap_err().to_string(),
                text,
                "{key}={value}"
            );
        }
        let ok = parse(&[
            ("image.resolvemode", "local"),
            ("image.layerlimit", "+2"),
            ("image.recordtype", "internal"),
        ])
        .unwrap();
        let ImageSource::DockerImage(ok) = ok else {
            panic!("not a docker image: {ok:?}")
        };
        assert_eq!(ok.resolve_mode, ResolveMode::Local);
        assert_eq!(ok.layer_limit, Some(2));
        assert_eq!(ok.record_type, RecordType::Internal);
        for (mode, want) in [
            ("", ResolveMode::Default),
            ("default", ResolveMode::Default),
            ("pull", ResolveMode::Pull),
        ] {
            assert_eq!(ResolveMode::parse(mode).unwrap(), want);
        }
        assert_eq!(
            ImageSource::parse("local://context", &attrs(&[]))
                .unwrap_err()
                .to_string(),
            "local://context is not an image source"
        );
    }

    #[test]
    fn oci_layout_identifiers() {
        let digest = "sha256:d5a4030b4bfee21110558a967581d0c06d839db7c19607ab17f0a9173265f9b2";
        let src = ImageSource::parse(
            &format!("oci-layout://busybox:latest@{digest}"),
            &attrs(&[("oci.store", "shared"), ("oci.layerlimit", "1")]),
        )
        .unwrap();
        let ImageSource::OciLayout(o) = src else {
            panic!("not an oci layout: {src:?}")
        };
        assert_eq!(o.name, "busybox");
        assert_eq!(o.tag.as_deref(), Some("latest"));
        assert_eq!(o.digest.as_ref().map(Digest::as_str), Some(digest));
        assert_eq!(o.store, "shared");
        assert_eq!(o.layer_limit, Some(1));
        let err = ImageSource::parse("oci-layout://busybox:latest", &attrs(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "oci-layout source oci-layout://busybox:latest has no oci.store attribute naming its store"
        );
        let err =
            ImageSource::parse("oci-layout://busybox", &attrs(&[("oci.store", "s")])).unwrap_err();
        assert_eq!(err, IdentifierError::ObjectRequired);
        let err = ImageSource::parse(
            "oci-layout://busybox:x",
            &attrs(&[("oci.store", "s"), ("oci.layerlimit", "0")]),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "invalid layer limit 0");
        let err = ImageSource::parse("oci-layout://b@sha256:12", &attrs(&[("oci.store", "s")]))
            .unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{err}");
    }
}
