//! Local OCI image layouts (`oci-layout://` sources): a directory with `oci-layout`,
//! `index.json` and `blobs/sha256/<hex>`, which the user maps to a store name. Images are
//! found in `index.json` by digest, or by tag through the
//! `org.opencontainers.image.ref.name` annotation (the tag, or `name:tag`). Blobs are read
//! from the layout in place and their digests checked.

use std::path::{Path, PathBuf};

use kiln_proto::Digest;
use serde::Deserialize;

use super::reference::OciLayoutIdentifier;

/// Annotation naming an image in a layout's index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest manifest, index or config read into memory.
pub const MAX_SMALL_BLOB: u64 = 16 << 20;

/// Errors from reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "oci-layout store {0:?} is not known (map it to a directory with --oci-layout NAME=DIR)"
    )]
    UnknownStore(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} is not an OCI image layout version 1.0.0 ({found})")]
    Version { path: PathBuf, found: String },
    #[error("no image {reference} in the OCI layout {dir}")]
    NotFound { reference: String, dir: PathBuf },
    #[error("blob {digest} in the OCI layout {dir} is missing")]
    MissingBlob { digest: Digest, dir: PathBuf },
    #[error("blob {digest} in the OCI layout {dir} is corrupt (its content hashes to {actual})")]
    Corrupt {
        digest: Digest,
        dir: PathBuf,
        actual: Digest,
    },
    #[error("blob {digest} in the OCI layout {dir} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        digest: Digest,
        dir: PathBuf,
        size: u64,
        limit: u64,
    },
}

#[derive(Deserialize)]
struct LayoutFile {
    #[serde(default, rename = "imageLayoutVersion")]
    version: Option<String>,
}

#[derive(Deserialize)]
struct IndexFile {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// One OCI layout directory.
#[derive(Clone, Debug)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens the layout at `dir`, checking its `oci-layout` file.
    pub fn open(dir: &Path) -> Result<Self, LayoutError> {
        let path = dir.join("oci-layout");
        let bytes = std::fs::read(&path).map_err(|source| LayoutError::Read {
            path: path.clone(),
            source,
        })?;
        let file: LayoutFile = serde_json::from_slice(&bytes).map_err(|e| LayoutError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        match file.version.as_deref() {
            Some("1.0.0") => Ok(OciLayout {
                dir: dir.to_owned(),
            }),
            other => Err(LayoutError::Version {
                path,
                found: other.unwrap_or("no imageLayoutVersion").to_owned(),
            }),
        }
    }

    /// A layout at `dir` without checking it (for tests that never read it).
    #[cfg(test)]
    pub(crate) fn unchecked(dir: PathBuf) -> Self {
        OciLayout { dir }
    }

    /// A directory of blobs and `index.json` without an `oci-layout` file: what BuildKit's
    /// local cache exporter writes.
    pub fn at(dir: &Path) -> Self {
        OciLayout {
            dir: dir.to_owned(),
        }
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The digest and media type (possibly empty) of the image `id` names.
    pub fn lookup(&self, id: &OciLayoutIdentifier) -> Result<(Digest, String), LayoutError> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).map_err(|source| LayoutError::Read {
            path: path.clone(),
            source,
        })?;
        let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| LayoutError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let parse_digest = |value: &str| {
            value.parse::<Digest>().map_err(|e| LayoutError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })
        };
        if let Some(digest) = &id.digest {
            // A digest names content, listed in the index or not: take the index entry's
            // media type when it is there.
            let media_type = index
                .manifests
                .iter()
                .find(|m| m.digest == digest.as_str())
                .and_then(|m| m.media_type.clone())
                .unwrap_or_default();
            return Ok((digest.clone(), media_type));
        }
        let tag = id.tag.as_deref().unwrap_or("latest");
        let candidates = [tag.to_owned(), format!("{}:{tag}", id.name)];
        for want in &candidates {
            let found = index.manifests.iter().find(|m| {
                m.annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_REF_NAME))
                    .is_some_and(|name| name == want)
            });
            if let Some(m) = found {
                return Ok((
                    parse_digest(&m.digest)?,
                    m.media_type.clone().unwrap_or_default(),
                ));
            }
        }
        Err(LayoutError::NotFound {
            reference: id.reference.clone(),
            dir: self.dir.clone(),
        })
    }

    /// Where blob `digest` is (validated hex: it cannot leave the layout).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Reads a small blob (manifest, index, config) and checks its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
        use std::io::Read as _;
        let path = self.blob_path(digest);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob {
                    digest: digest.clone(),
                    dir: self.dir.clone(),
                });
            }
            Err(source) => return Err(LayoutError::Read { path, source }),
        };
        let mut bytes = Vec::new();
        file.take(MAX_SMALL_BLOB + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Read {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_SMALL_BLOB {
            return Err(LayoutError::TooLarge {
                digest: digest.clone(),
                dir: self.dir.clone(),
                size: bytes.len() as u64,
                limit: MAX_SMALL_BLOB,
            });
        }
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(LayoutError::Corrupt {
                digest: digest.clone(),
                dir: self.dir.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Opens a (large) blob after checking its digest in one streaming pass, so the file
    /// handed out has the content its name promises. Returns the file, rewound.
    pub fn open_verified(
        &self,
        digest: &Digest,
        mut progress: impl FnMut(u64),
    ) -> Result<std::fs::File, LayoutError> {
        use sha2::Digest as _;
        use std::io::{Read as _, Seek as _};
        let path = self.blob_path(digest);
        let read_err = |source| LayoutError::Read {
            path: path.clone(),
            source,
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob {
                    digest: digest.clone(),
                    dir: self.dir.clone(),
                });
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            done += n as u64;
            progress(done);
        }
        let actual = Digest::from_sha256(hash.finalize().into());
        if actual != *digest {
            return Err(LayoutError::Corrupt {
                digest: digest.clone(),
                dir: self.dir.clone(),
                actual,
            });
        }
        file.rewind().map_err(read_err)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn id(reference: &str) -> OciLayoutIdentifier {
        let attrs: BTreeMap<String, String> = [("oci.store".to_owned(), "s".to_owned())].into();
        OciLayoutIdentifier::parse(reference, &attrs).unwrap()
    }

    #[test]
    fn finds_images_by_tag_annotation_or_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        std::fs::write(blobs.join(a.hex()), b"a").unwrap();
        std::fs::write(blobs.join(b.hex()), b"wrong").unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "m/a", "digest": a.as_str(), "size": 1,
             "annotations": {ANNOTATION_REF_NAME: "busybox"}},
            {"mediaType": "m/b", "digest": b.as_str(), "size": 1,
             "annotations": {ANNOTATION_REF_NAME: "app:v1"}},
        ]});
        std::fs::write(
            dir.path().join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let layout = OciLayout::open(dir.path()).unwrap();
        assert_eq!(
            layout.lookup(&id("x:busybox")).unwrap(),
            (a.clone(), "m/a".into())
        );
        assert_eq!(
            layout.lookup(&id("app:v1")).unwrap(),
            (b.clone(), "m/b".into())
        );
        let pinned = id(&format!("whatever@{b}"));
        assert_eq!(layout.lookup(&pinned).unwrap(), (b.clone(), "m/b".into()));
        let err = layout.lookup(&id("app:v2")).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("no image app:v2 in the OCI layout {}", dir.path().display())
        );
        assert_eq!(layout.read_blob(&a).unwrap(), b"a");
        let err = layout.read_blob(&b).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        assert!(layout.open_verified(&b, |_| {}).is_err());
        let missing = Digest::of(b"c");
        let err = layout.read_blob(&missing).unwrap_err().to_string();
        assert!(err.ends_with("is missing"), "{err}");

        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2"}"#,
        )
        .unwrap();
        let err = OciLayout::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("not an OCI image layout version 1.0.0 (2)"),
            "{err}"
        );
    }
}
