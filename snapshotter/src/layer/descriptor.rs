//! What describes a layer (its options, descriptor, compression and chain ID) and the
//! hashing reader and writer that compute its digests in the same pass as the data.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::hasher::StreamHasher;

/// Errors from importing and exporting layers.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("reading the layer: {0}")]
    Read(#[source] io::Error),
    #[error("writing the layer: {0}")]
    Write(#[source] io::Error),
    #[error("layer entry {entry:?}: {problem}")]
    Entry { entry: String, problem: String },
    #[error("layer entry {entry:?}: {op}: {source}")]
    EntrySys {
        entry: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error(
        "layer entry {entry:?} is owned by {kind} {id}, which is not mapped in kiln's user \
         namespace (give the user a larger subordinate id range in /etc/sub{kind}, or build \
         as root)"
    )]
    UnmappedId {
        entry: String,
        kind: &'static str,
        id: u64,
    },
    #[error("layer {kind} header of {size} bytes is larger than the {limit}-byte limit")]
    HeaderTooLarge {
        kind: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("exporting {path}: {op}: {source}")]
    ExportSys {
        path: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("exporting {path}: overlay redirects are not supported (redirect_dir must be off)")]
    Redirect { path: String },
    #[error("layer diff id {actual} does not match the expected {expected}")]
    DiffIdMismatch { expected: String, actual: String },
    #[error("reading the user namespace id maps: {0}")]
    IdMap(#[source] io::Error),
}

/// Layer compression for export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// How to import a layer.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Media type of the blob; compression is detected from the bytes when it does not say.
    pub media_type: Option<String>,
    /// The expected diff id (`sha256:…`): an identical chain already stored is reused, and
    /// the import fails when the layer's digest differs.
    pub diff_id: Option<String>,
    pub description: String,
    /// The record type of the new snapshot (`regular` when empty).
    pub record_type: String,
}

/// What an export produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: &'static str,
    /// sha256 of the blob as written (`sha256:…`).
    pub digest: String,
    /// Size of the blob as written.
    pub size: u64,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    pub uncompressed_size: u64,
}

/// Chain id of a layer with `diff_id` on top of a chain `parent` (OCI image spec).
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(p) => digest_string(Sha256::digest(format!("{p} {diff_id}").as_bytes())),
    }
}

pub(crate) fn digest_string(hash: impl AsRef<[u8]>) -> String {
    format!("sha256:{}", hex::encode(hash))
}

/// A writer that hashes and counts what passes through it.
#[derive(Debug)]
pub(crate) struct HashWriter<W> {
    inner: W,
    /// `None`: counting only, for a stream whose digest another writer already takes.
    hash: Option<StreamHasher>,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hash: Some(StreamHasher::new()),
            count: 0,
        }
    }

    /// Counts without hashing.
    pub(crate) fn counting(inner: W) -> Self {
        HashWriter {
            inner,
            hash: None,
            count: 0,
        }
    }

    /// The inner writer, the digest (`None` when only counting) and the byte count.
    pub(crate) fn finish(self) -> io::Result<(W, Option<String>, u64)> {
        let digest = self.hash.map(StreamHasher::finish).transpose()?;
        Ok((self.inner, digest, self.count))
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(hash) = &mut self.hash {
            hash.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
#[derive(Debug)]
pub(crate) struct HashReader<R> {
    inner: R,
    hash: StreamHasher,
    count: u64,
}

impl<R: Read> HashReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashReader {
            inner,
            hash: StreamHasher::new(),
            count: 0,
        }
    }

    pub(crate) fn finish(self) -> io::Result<(String, u64)> {
        Ok((self.hash.finish()?, self.count))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_of_a_base_layer_is_its_diff_id_and_then_chains() {
        assert_eq!(chain_id(None, "sha256:a"), "sha256:a");
        let expected = digest_string(Sha256::digest(b"sha256:a sha256:b"));
        assert_eq!(chain_id(Some("sha256:a"), "sha256:b"), expected);
    }

    #[test]
    fn hash_writer_counts_and_hashes() {
        let mut w = HashWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (inner, digest, count) = w.finish().unwrap();
        assert_eq!(inner, b"abc");
        assert_eq!(count, 3);
        assert_eq!(
            digest.as_deref(),
            Some("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        let mut counting = HashWriter::counting(Vec::new());
        counting.write_all(b"abcd").unwrap();
        let (_, digest, count) = counting.finish().unwrap();
        assert_eq!((digest, count), (None, 4));
    }
}
