//! `http://` and `https://` sources, as BuildKit v0.11.6's `source/http`: the URL's body
//! as one file in a fresh snapshot, named as `getFileName` names it, with `http.perm`
//! (default `0600`), `http.uid`/`http.gid` (ids of kiln's user namespace when rootless)
//! and the `Last-Modified` time (else the epoch).
//!
//! CacheMap: with `http.checksum` it is computed offline and the body is downloaded only
//! when the result is not cached, then checked against the checksum. Without one, the key
//! is the body's digest: earlier downloads of the same URL (and name, mode, owner) are
//! offered to the server by `ETag` (`If-None-Match`, first on a `HEAD`, then on the
//! `GET`); a `304` or a matching `ETag` reuses the remembered snapshot without a body,
//! anything else downloads into a new snapshot, remembered when it has an `ETag`
//! ([`store`]).

mod client;
pub(crate) mod downloads;
mod error;
mod store;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use kiln_fileop::sys as fsys;
use kiln_proto::{Digest, Vertex, pb};
use kiln_snapshotter::{ImmutableRef, RefOptions};
use kiln_solver::cachemap::CacheMap;
use kiln_solver::cachemap::http::{HttpIdentifier, is_single_component};
use kiln_solver::cachemap::source::{SOURCE_CACHE_PREFIX, source_digest};
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};
use reqwest::header::{CONTENT_DISPOSITION, ETAG, HeaderMap, IF_NONE_MATCH, LAST_MODIFIED};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::state::{Inner, blocking, failed};
pub use error::HttpError;
use store::{Entry, identity};

/// BuildKit's `etagValue`: a weak validator compares as the strong one.
fn etag_value(v: &str) -> &str {
    v.strip_prefix("W/").unwrap_or(v)
}

fn header(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// What the CacheMap learned, for `exec`.
struct Found {
    /// The digest the key was made with (`http.checksum`, or the body's).
    checksum: Digest,
    /// The snapshot with that body, when the CacheMap already has it (downloaded, or
    /// reused by ETag).
    snapshot: Option<ImmutableRef>,
}

/// A body written into a new snapshot.
struct Saved {
    snapshot: ImmutableRef,
    checksum: Digest,
    last_modified: String,
    etag: Option<String>,
    filename: String,
}

pub(crate) struct HttpSourceOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    source: pb::SourceOp,
    id: HttpIdentifier,
    found: tokio::sync::Mutex<Option<Found>>,
}

impl HttpSourceOp {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, source: pb::SourceOp) -> Result<Self, OpError> {
        let id = HttpIdentifier::from_op(&source).map_err(failed)?;
        if !id.filename.is_empty() && !is_single_component(&id.filename) {
            return Err(failed(HttpError::Filename {
                url: id.url.clone(),
                name: id.filename.clone(),
            }));
        }
        for (attr, value) in [("http.uid", id.uid), ("http.gid", id.gid)] {
            if u32::try_from(value).is_err() {
                return Err(failed(HttpError::Owner {
                    url: id.url.clone(),
                    attr,
                    value,
                }));
            }
        }
        Ok(HttpSourceOp {
            inner,
            vertex,
            source,
            id,
            found: tokio::sync::Mutex::new(None),
        })
    }

    fn url(&self) -> &str {
        &self.id.url
    }

    fn request_error(&self, e: &reqwest::Error) -> HttpError {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        HttpError::Request {
            url: self.url().to_owned(),
            reason,
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        ctx: &JobContext,
    ) -> Result<reqwest::Response, OpError> {
        tokio::select! {
            sent = request.send() => sent.map_err(|e| failed(self.request_error(&e))),
            () = ctx.cancel.cancelled() => Err(OpError::Cancelled),
        }
    }

    /// The key for a download without a checksum (BuildKit's `CacheKey`), reusing or
    /// downloading the body as the server's answers allow.
    async fn resolve(&self, ctx: &JobContext) -> Result<(Digest, Found), OpError> {
        let downloads = &self.inner.downloads;
        let client = downloads.client().map_err(failed)?;
        let ident = identity(
            self.url(),
            &self.id.file_name(None),
            self.id.perm,
            self.id.uid,
            self.id.gid,
        );
        // Remembered downloads whose snapshot still exists (held from here on, so a
        // concurrent prune cannot take it away).
        let entries = downloads.store.entries(&ident);
        let inner = self.inner.clone();
        let known: HashMap<String, (Entry, Digest, ImmutableRef)> = blocking(move || {
            Ok(entries
                .into_iter()
                .filter(|e| !e.etag.is_empty())
                .filter_map(|e| {
                    let checksum = e.checksum.parse::<Digest>().ok()?;
                    let snapshot = inner.snapshotter.get(&e.snapshot).ok()?;
                    Some((e.etag.clone(), (e, checksum, snapshot)))
                })
                .collect())
        })
        .await?;
        let only_etag = match known.keys().collect::<Vec<_>>().as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        };
        let mut etags: Vec<&str> = known.keys().map(String::as_str).collect();
        etags.sort_unstable();
        let if_none_match = etags.join(", ");
        let reuse = |headers: &HeaderMap, etag: &str| -> Option<(Digest, Found)> {
            let (entry, checksum, snapshot) = known.get(etag)?;
            let filename = self
                .id
                .file_name(header(headers, CONTENT_DISPOSITION).as_deref());
            let key = self.id.cache_key(&filename, checksum, &entry.last_modified);
            Some((
                key,
                Found {
                    checksum: checksum.clone(),
                    snapshot: Some(snapshot.clone()),
                },
            ))
        };
        if !known.is_empty() {
            // Some servers send ETags but mishandle If-None-Match: ask with HEAD first and
            // compare the ETag ourselves (BuildKit does the same).
            let head = client
                .head(self.url())
                .header(IF_NONE_MATCH, &if_none_match);
            if let Ok(resp) = self.send(head, ctx).await {
                let status = resp.status().as_u16();
                if status == 200 || status == 304 {
                    let mut etag = header(resp.headers(), ETAG)
                        .map(|e| etag_value(&e).to_owned())
                        .unwrap_or_default();
                    if etag.is_empty() && status == 304 {
                        etag = only_etag.clone().unwrap_or_default();
                    }
                    if let Some(found) = reuse(resp.headers(), &etag) {
                        return Ok(found);
                    }
                }
            } else if ctx.cancel.is_cancelled() {
                return Err(OpError::Cancelled);
            }
        }
        let mut get = client.get(self.url());
        if !known.is_empty() {
            get = get.header(IF_NONE_MATCH, &if_none_match);
        }
        let resp = self.send(get, ctx).await?;
        let status = resp.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(failed(HttpError::Status {
                url: self.url().to_owned(),
                status,
            }));
        }
        if status == 304 {
            let mut etag = header(resp.headers(), ETAG)
                .map(|e| etag_value(&e).to_owned())
                .unwrap_or_default();
            if etag.is_empty() {
                etag = only_etag.clone().unwrap_or_default();
            }
            return reuse(resp.headers(), &etag).ok_or_else(|| {
                failed(HttpError::NotModified {
                    url: self.url().to_owned(),
                    etag,
                })
            });
        }
        drop(known);
        let saved = self.save(ctx, resp).await?;
        self.remember(&ident, &saved).await?;
        let key = self
            .id
            .cache_key(&saved.filename, &saved.checksum, &saved.last_modified);
        Ok((
            key,
            Found {
                checksum: saved.checksum,
                snapshot: Some(saved.snapshot),
            },
        ))
    }

    /// Records a download that came with an ETag, so later builds can ask the server
    /// whether it changed; the snapshot is then kept (retained) for them.
    async fn remember(&self, ident: &Digest, saved: &Saved) -> Result<(), OpError> {
        let Some(etag) = &saved.etag else {
            return Ok(());
        };
        let entry = Entry {
            etag: etag_value(etag).to_owned(),
            snapshot: saved.snapshot.id().to_owned(),
            checksum: saved.checksum.as_str().to_owned(),
            last_modified: saved.last_modified.clone(),
        };
        let inner = self.inner.clone();
        let ident = ident.clone();
        let snapshot = saved.snapshot.clone();
        let url = self.url().to_owned();
        blocking(move || {
            let snapshotter = &inner.snapshotter;
            inner
                .downloads
                .store
                .record(&ident, entry, |id| snapshotter.record(id).is_ok())
                .map_err(failed)?;
            snapshot
                .set_retain(true)
                .map_err(|source| failed(HttpError::Snapshot { url, source }))
        })
        .await
    }

    /// Writes the response body into a new snapshot as BuildKit's `save` does.
    async fn save(&self, ctx: &JobContext, mut resp: reqwest::Response) -> Result<Saved, OpError> {
        let url = self.url().to_owned();
        let headers = resp.headers().clone();
        let filename = self
            .id
            .file_name(header(&headers, CONTENT_DISPOSITION).as_deref());
        let last_modified = header(&headers, LAST_MODIFIED).unwrap_or_default();
        let etag = header(&headers, ETAG).filter(|e| !e.is_empty());
        let snap_err = {
            let url = url.clone();
            move |source| failed(HttpError::Snapshot { url, source })
        };
        let file_err = {
            let url = url.clone();
            move |source| failed(HttpError::File { url, source })
        };

        let inner = self.inner.clone();
        let description = format!("http url {url}");
        let name = filename.clone();
        let (layer, root, file) = blocking(move || {
            let layer = inner
                .snapshotter
                .new_mutable(
                    None,
                    &RefOptions {
                        description,
                        ..RefOptions::default()
                    },
                )
                .map_err(snap_err.clone())?;
            // A snapshot without parent is its own directory: no mount needed.
            let root = fsys::open_root(&layer.dir()).map_err(file_err.clone())?;
            let file = fsys::create_file(root.as_fd(), name.as_ref(), 0o600, &name)
                .map_err(file_err.clone())?;
            Ok((layer, root, file))
        })
        .await?;

        let write_err = |source| {
            failed(HttpError::Write {
                url: url.clone(),
                name: filename.clone(),
                source,
            })
        };
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        loop {
            let chunk = tokio::select! {
                chunk = resp.chunk() => chunk.map_err(|e| failed(self.request_error(&e)))?,
                () = ctx.cancel.cancelled() => return Err(OpError::Cancelled),
            };
            let Some(chunk) = chunk else { break };
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        file.flush().await.map_err(write_err)?;
        drop(file.into_std().await);
        let checksum: Digest = format!("sha256:{}", hex::encode(hasher.finalize()))
            .parse()
            .map_err(failed)?;

        let mtime = httpdate::parse_http_date(&last_modified)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let perm = if self.id.perm == 0 {
            0o600
        } else {
            (self.id.perm as u32) & 0o777
        };
        let (uid, gid) = (self.id.uid as u32, self.id.gid as u32);
        let name = filename.clone();
        let file_err = {
            let url = url.clone();
            move |source| failed(HttpError::File { url, source })
        };
        let snapshot = blocking(move || {
            let root: OwnedFd = root;
            let dir = root.as_fd();
            let entry: &std::ffi::OsStr = name.as_ref();
            fsys::chmod_at(dir, entry, perm, &name).map_err(file_err.clone())?;
            if uid != 0 || gid != 0 {
                fsys::chown_at(dir, entry, uid, gid, &name).map_err(file_err.clone())?;
            }
            let secs = i64::try_from(mtime.as_secs()).unwrap_or(0);
            let time = fsys::timespec(secs, i64::from(mtime.subsec_nanos()));
            fsys::set_times_at(dir, entry, &time, &time, &name).map_err(file_err)?;
            drop(root);
            layer.commit().map_err(failed)
        })
        .await?;
        Ok(Saved {
            snapshot,
            checksum,
            last_modified,
            etag,
            filename,
        })
    }
}

#[async_trait]
impl Op<ImmutableRef> for HttpSourceOp {
    async fn cache_map(
        &self,
        ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        if let Some(checksum) = &self.id.checksum {
            let (map, done) = kiln_solver::cachemap::source::offline_cache_map(
                &self.source,
                self.vertex.platform(),
                &Default::default(),
            )
            .map_err(failed)?
            .ok_or_else(|| failed(format!("no cache map for {}", self.url())))?;
            *self.found.lock().await = Some(Found {
                checksum: checksum.clone(),
                snapshot: None,
            });
            return Ok(CacheMapResponse { map, done });
        }
        let (key, found) = self.resolve(ctx).await?;
        *self.found.lock().await = Some(found);
        let key = key.as_str();
        Ok(CacheMapResponse {
            map: CacheMap {
                digest: source_digest(key),
                deps: Vec::new(),
                hashed: Some(format!("{SOURCE_CACHE_PREFIX}{key}").into_bytes()),
            },
            done: true,
        })
    }

    async fn exec(
        &self,
        ctx: &JobContext,
        _inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let found = self.found.lock().await.take();
        let expected = match found {
            Some(Found {
                snapshot: Some(snapshot),
                ..
            }) => return Ok(vec![snapshot]),
            Some(Found { checksum, .. }) => Some(checksum),
            None => self.id.checksum.clone(),
        };
        let client = self.inner.downloads.client().map_err(failed)?;
        let resp = self.send(client.get(self.url()), ctx).await?;
        let status = resp.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(failed(HttpError::Status {
                url: self.url().to_owned(),
                status,
            }));
        }
        let saved = self.save(ctx, resp).await?;
        if let Some(expected) = expected {
            if saved.checksum != expected {
                return Err(failed(HttpError::Mismatch {
                    url: self.url().to_owned(),
                    got: saved.checksum,
                    expected,
                }));
            }
        }
        let ident = identity(
            self.url(),
            &self.id.file_name(None),
            self.id.perm,
            self.id.uid,
            self.id.gid,
        );
        self.remember(&ident, &saved).await?;
        Ok(vec![saved.snapshot])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_etags_compare_as_strong() {
        assert_eq!(etag_value("W/\"abc\""), "\"abc\"");
        assert_eq!(etag_value("\"abc\""), "\"abc\"");
    }

    #[test]
    fn last_modified_parses_go_formats() {
        for date in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
        ] {
            let t = httpdate::parse_http_date(date).unwrap();
            assert_eq!(
                t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                1_445_412_480,
                "{date}"
            );
        }
    }
}
