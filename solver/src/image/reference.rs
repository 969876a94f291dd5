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
pub fn parse_normalized(reference: &str) -> Result<Reference, IdentifierError> {
    reference
        .parse::<Reference>()
        .map_err(|e| IdentifierError::InvalidReference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
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
