//! An OCI archive straight from a snapshot chain, for callers without a content store:
//! each snapshot of the ref's chain becomes one gzip layer (base first, written by the
//! snapshotter's layer export into a temporary file), then the image is assembled
//! ([`crate::image`]) and written ([`crate::archive`]) as every image output is. The `kiln`
//! binary takes its layers from the worker instead, which reuses blobs by digest.

use std::io::{Seek, Write};
use std::time::SystemTime;

use kiln_proto::{Digest, pb};
use kiln_registry::{ExportLayer, LayerBlob};
use kiln_snapshotter::{Compression, ImmutableRef, LayerDescriptor, Snapshotter};

use crate::archive::{ArchiveFormat, write_archive};
use crate::error::ExportError;
use crate::image::{ImageName, ImageOptions, assemble};

/// What to write besides the layers.
#[derive(Clone, Debug)]
pub struct OciExportOptions<'a> {
    /// The image name (`name=` of the output); empty for none.
    pub name: &'a str,
    /// The platform the image is for (normalised).
    pub platform: &'a pb::Platform,
    /// The base image's config (see [`ImageOptions::base_config`]).
    pub base_config: Option<&'a [u8]>,
    /// A frontend's image config (see [`ImageOptions::image_config`]).
    pub image_config: Option<&'a [u8]>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct OciExported {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    /// One per layer, base first.
    pub layers: Vec<LayerDescriptor>,
}

/// Writes `r` (with its parents) to `out` as an OCI image layout tar archive.
pub fn oci(
    snapshotter: &Snapshotter,
    r: &ImmutableRef,
    out: impl Write,
    options: &OciExportOptions<'_>,
) -> Result<OciExported, ExportError> {
    let mut chain: Vec<&ImmutableRef> = std::iter::once(r).chain(r.parents()).collect();
    chain.reverse();
    // Kept until the archive is written: the layers are read from these files.
    let mut files = Vec::with_capacity(chain.len());
    let mut descriptors = Vec::with_capacity(chain.len());
    let mut layers = Vec::with_capacity(chain.len());
    for layer in chain {
        let mut file = tempfile::NamedTempFile::new().map_err(|source| ExportError::Io {
            op: "creating a temporary file for",
            path: layer.id().into(),
            source,
        })?;
        let d = snapshotter
            .export_layer(layer, file.as_file_mut(), Compression::Gzip)
            .map_err(|source| ExportError::Layer {
                id: layer.id().to_owned(),
                source: Box::new(source),
            })?;
        file.as_file_mut()
            .rewind()
            .map_err(|source| ExportError::Io {
                op: "rewinding the layer of",
                path: layer.id().into(),
                source,
            })?;
        let parse = |text: &str| {
            text.parse::<Digest>().map_err(|e| ExportError::Json {
                what: "layer digest",
                reason: e.to_string(),
            })
        };
        // The snapshot's creation time dates its history entry, as BuildKit's does.
        let created_at = layer
            .record()
            .ok()
            .and_then(|r| r.created_at.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .unwrap_or(0);
        layers.push(ExportLayer {
            media_type: d.media_type.to_owned(),
            digest: parse(&d.digest)?,
            size: d.size,
            diff_id: parse(&d.diff_id)?,
            created_at,
            blob: LayerBlob::File(file.path().to_owned()),
            origins: Vec::new(),
        });
        descriptors.push(d);
        files.push(file);
    }
    let now = SystemTime::now();
    let image = assemble(
        layers,
        &ImageOptions {
            platform: options.platform,
            base_config: options.base_config,
            image_config: options.image_config,
            oci_types: true,
            inline_cache: None,
        },
        now,
    )?;
    let name = match options.name {
        "" => None,
        n => Some(ImageName::parse(n)?),
    };
    let paths: Vec<_> = files.iter().map(|f| f.path().to_owned()).collect();
    write_archive(
        &image,
        &paths,
        name.as_ref(),
        &kiln_proto::gojson::rfc3339_seconds(now),
        ArchiveFormat::Oci,
        out,
    )?;
    Ok(OciExported {
        manifest_digest: image.manifest_digest.clone(),
        manifest_size: image.manifest.len() as u64,
        config_digest: image.config_digest.clone(),
        layers: descriptors,
    })
}
