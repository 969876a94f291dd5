//! Image archives as BuildKit's `oci` and `docker` exporters write them (containerd's
//! archive exporter): an OCI image layout in a tar stream — `oci-layout`, `index.json`
//! naming the manifest (`io.containerd.image.name`, `org.opencontainers.image.ref.name`,
//! `org.opencontainers.image.created`), every blob under `blobs/sha256/` — and, for
//! `type=docker`, Docker's `manifest.json` (config, `RepoTags`, layers by path) that
//! `docker load` reads. Entries are sorted by name, blobs read-only (0444), uid/gid 0.
//!
//! No `repositories` file: it names Docker's legacy v1 layer directories, which BuildKit
//! does not write either, and `docker load` reads `manifest.json` whenever there is one.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::ExportError;
use crate::image::{ANNOTATION_CREATED, Image, ImageDescriptor, ImageName};
use crate::tarball::EntryHeader;

/// `io.containerd.image.name`: the full image name.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// `org.opencontainers.image.ref.name`: the tag (or digest) part of the name.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Which archive to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// `type=oci`: the OCI image layout.
    Oci,
    /// `type=docker`: the OCI image layout plus Docker's `manifest.json`.
    Docker,
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    manifests: [&'a ImageDescriptor; 1],
}

#[derive(Serialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

enum Data<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

struct Record<'a> {
    name: String,
    kind: tar::EntryType,
    mode: u32,
    size: u64,
    data: Option<Data<'a>>,
}

fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ExportError> {
    serde_json::to_vec(value).map_err(|e| ExportError::Json {
        what,
        reason: e.to_string(),
    })
}

/// Reads exactly `remaining` bytes of `inner`: a shorter file is an error, not a corrupt
/// archive.
struct Exact<R> {
    inner: R,
    remaining: u64,
    path: PathBuf,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended {} bytes early",
                    self.path.display(),
                    self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes `image` to `out` as `format`; `layers` are the local paths of its layer blobs
/// (in manifest order), `name` the image's name when it has one, `created` the time the
/// index entry carries. Returns the manifest's descriptor as the index lists it.
pub fn write_archive(
    image: &Image,
    layers: &[PathBuf],
    name: Option<&ImageName>,
    created: &str,
    format: ArchiveFormat,
    out: impl Write,
) -> Result<ImageDescriptor, ExportError> {
    let mut annotations = BTreeMap::from([(ANNOTATION_CREATED.to_owned(), created.to_owned())]);
    if let Some(name) = name {
        annotations.insert(ANNOTATION_IMAGE_NAME.to_owned(), name.full.clone());
        annotations.insert(ANNOTATION_REF_NAME.to_owned(), name.object.clone());
    }
    let descriptor = image.descriptor(annotations);
    let index = json(
        "index",
        &Index {
            schema_version: 2,
            manifests: [&descriptor],
        },
    )?;
    let docker_manifest = match format {
        ArchiveFormat::Oci => None,
        ArchiveFormat::Docker => Some(json(
            "manifest.json",
            &[DockerManifest {
                config: blob_name(image.config_digest.as_str()),
                repo_tags: name.map(|n| vec![n.familiar.clone()]),
                layers: image
                    .layers
                    .iter()
                    .map(|l| blob_name(l.digest.as_str()))
                    .collect(),
            }],
        )?),
    };
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let dir = |name: &str| Record {
        name: name.to_owned(),
        kind: tar::EntryType::Directory,
        mode: 0o755,
        size: 0,
        data: None,
    };
    fn file(name: String, mode: u32, data: Data<'_>, size: u64) -> Record<'_> {
        Record {
            name,
            kind: tar::EntryType::Regular,
            mode,
            size,
            data: Some(data),
        }
    }
    let mut records = vec![
        dir("blobs/"),
        dir("blobs/sha256/"),
        file(
            "oci-layout".into(),
            0o444,
            Data::Bytes(layout),
            layout.len() as u64,
        ),
        file(
            "index.json".into(),
            0o644,
            Data::Bytes(&index),
            index.len() as u64,
        ),
        file(
            blob_name(image.manifest_digest.as_str()),
            0o444,
            Data::Bytes(&image.manifest),
            image.manifest.len() as u64,
        ),
        file(
            blob_name(image.config_digest.as_str()),
            0o444,
            Data::Bytes(&image.config),
            image.config.len() as u64,
        ),
    ];
    if layers.len() != image.layers.len() {
        return Err(ExportError::LayerFiles {
            files: layers.len(),
            layers: image.layers.len(),
        });
    }
    for (layer, path) in image.layers.iter().zip(layers) {
        records.push(file(
            blob_name(layer.digest.as_str()),
            0o444,
            Data::File(path),
            layer.size,
        ));
    }
    if let Some(m) = &docker_manifest {
        records.push(file(
            "manifest.json".into(),
            0o644,
            Data::Bytes(m),
            m.len() as u64,
        ));
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    records.dedup_by(|a, b| a.name == b.name);

    let mut builder = tar::Builder::new(out);
    for record in records {
        let mut h = EntryHeader::new(
            record.kind,
            record.name.as_bytes(),
            record.mode,
            record.size,
        );
        h.ids(0, 0);
        match record.data {
            None => h.append(&mut builder, std::io::empty())?,
            Some(Data::Bytes(bytes)) => h.append(&mut builder, bytes)?,
            Some(Data::File(path)) => {
                let f = std::fs::File::open(path).map_err(|source| ExportError::Io {
                    op: "opening the layer blob",
                    path: path.to_owned(),
                    source,
                })?;
                let exact = Exact {
                    inner: std::io::BufReader::new(f),
                    remaining: record.size,
                    path: path.to_owned(),
                };
                h.append(&mut builder, exact)?;
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(ExportError::Write)?;
    Ok(descriptor)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use kiln_proto::{Digest, pb};
    use kiln_registry::{ExportLayer, LayerBlob};
    use serde_json::Value;

    use super::*;
    use crate::image::{ImageOptions, assemble};

    fn layer_file(dir: &Path, data: &[u8]) -> ExportLayer {
        let digest = Digest::of(data);
        let path = dir.join(digest.hex());
        std::fs::write(&path, data).unwrap();
        ExportLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest,
            size: data.len() as u64,
            diff_id: Digest::of(b"uncompressed"),
            created_at: 1,
            blob: LayerBlob::File(path),
            origins: Vec::new(),
        }
    }

    fn read(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut tar = tar::Archive::new(archive);
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_str().unwrap().to_owned();
                let mode = e.header().mode().unwrap();
                assert_eq!(e.header().uid().unwrap(), 0);
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, mode, data)
            })
            .collect()
    }

    #[test]
    fn docker_archives_are_buildkits_layout_with_manifest_json() {
        let dir = tempfile::tempdir().unwrap();
        // The same blob twice (two snapshots with identical diffs) is written once.
        let layers = vec![
            layer_file(dir.path(), b"layer one"),
            layer_file(dir.path(), b"layer two"),
            layer_file(dir.path(), b"layer one"),
        ];
        let platform = pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        };
        let options = ImageOptions {
            platform: &platform,
            base_config: None,
            image_config: None,
            oci_types: false,
            inline_cache: None,
        };
        let image = assemble(layers, &options, std::time::SystemTime::UNIX_EPOCH).unwrap();
        let paths: Vec<PathBuf> = image
            .layers
            .iter()
            .map(|l| dir.path().join(l.digest.hex()))
            .collect();
        let name = ImageName::parse("app:1").unwrap();
        let mut out = Vec::new();
        let created = "2024-01-02T03:04:05Z";
        let d = write_archive(
            &image,
            &paths,
            Some(&name),
            created,
            ArchiveFormat::Docker,
            &mut out,
        )
        .unwrap();
        let entries = read(&out);
        let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted, "sorted, each once");
        assert_eq!(&names[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(
            &names[names.len() - 3..],
            ["index.json", "manifest.json", "oci-layout"]
        );
        // Manifest, config and two distinct layers.
        assert_eq!(names.len(), 2 + 4 + 3);
        let get = |n: &str| entries.iter().find(|(name, _, _)| name == n).unwrap();
        for (n, mode, data) in &entries {
            if let Some(hex) = n.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(*mode, 0o444, "{n}");
                assert_eq!(Digest::of(data).hex(), hex, "{n} holds its digest's bytes");
            }
        }
        assert_eq!(get("oci-layout").2, br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: Value = serde_json::from_slice(&get("index.json").2).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(entry["digest"], image.manifest_digest.as_str());
        assert_eq!(entry["mediaType"], image.manifest_media_type);
        assert_eq!(
            entry["annotations"],
            serde_json::json!({
                "io.containerd.image.name": "docker.io/library/app:1",
                "org.opencontainers.image.created": created,
                "org.opencontainers.image.ref.name": "1",
            })
        );
        assert_eq!(serde_json::to_value(&d).unwrap(), *entry);
        let docker: Value = serde_json::from_slice(&get("manifest.json").2).unwrap();
        let config_path = format!("blobs/sha256/{}", image.config_digest.hex());
        assert_eq!(docker[0]["Config"], config_path);
        assert_eq!(docker[0]["RepoTags"], serde_json::json!(["app:1"]));
        let layer_paths: Vec<String> = image
            .layers
            .iter()
            .map(|l| format!("blobs/sha256/{}", l.digest.hex()))
            .collect();
        assert_eq!(docker[0]["Layers"], serde_json::json!(layer_paths));

        // The OCI flavour has no manifest.json; without a name, no name annotations.
        let mut oci = Vec::new();
        write_archive(&image, &paths, None, created, ArchiveFormat::Oci, &mut oci).unwrap();
        let entries = read(&oci);
        assert!(entries.iter().all(|(n, _, _)| n != "manifest.json"));
        let index: Value = serde_json::from_slice(
            &entries
                .iter()
                .find(|(n, _, _)| n == "index.json")
                .unwrap()
                .2,
        )
        .unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"],
            serde_json::json!({"org.opencontainers.image.created": created})
        );

        // A blob file shorter than its descriptor fails the export instead of writing a
        // corrupt archive.
        std::fs::write(&paths[1], b"short").unwrap();
        let err = write_archive(
            &image,
            &paths,
            None,
            created,
            ArchiveFormat::Oci,
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ended 4 bytes early"), "{err}");
        let err = write_archive(&image, &[], None, created, ArchiveFormat::Oci, Vec::new())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "0 layer files were given for an image of 3 layers");
    }
}
