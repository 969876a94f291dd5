//! Where caches are read from: a local directory (an OCI layout as BuildKit's `type=local`
//! writes it, `index.json` naming the cache index by tag) or a registry reference (a cache
//! index, or an image whose config carries an inline cache). Each yields cache configs
//! and the layers their indexes list, plus the fetcher for those layers.

use std::path::Path;
use std::sync::Arc;

use kiln_proto::Digest;
use kiln_registry::content::ContentStore;
use kiln_registry::layout::{ANNOTATION_REF_NAME, OciLayout};
use kiln_registry::manifest::{self, ACCEPTED_MANIFESTS, Parsed};
use kiln_registry::{BlobOrigin, Fetcher, RegistryClients, RegistryFetcher};
use serde::Deserialize;

use crate::config::{CACHE_CONFIG_MEDIA_TYPE, CacheConfig, CacheIndex, CacheLayer, Descriptor};
use crate::error::CacheError;
use crate::import::{LayerMap, RemoteLayer};

/// A cache as read: configs (one, or one per image of an inline cache) with their layers.
#[derive(Debug)]
pub struct LoadedCache {
    pub name: String,
    pub configs: Vec<(CacheConfig, LayerMap)>,
    pub fetcher: Arc<Fetcher>,
    pub origin: Option<BlobOrigin>,
}

/// Largest index or config read.
const MAX_SMALL: u64 = 16 << 20;

fn format_err(what: impl Into<String>, e: impl std::fmt::Display) -> CacheError {
    CacheError::Format {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn split_index(index: &CacheIndex) -> Result<(Option<Descriptor>, LayerMap), CacheError> {
    let mut config = None;
    let mut layers = LayerMap::new();
    for d in &index.manifests {
        if d.media_type == CACHE_CONFIG_MEDIA_TYPE {
            config = Some(d.clone());
            continue;
        }
        layers.insert(d.digest.clone(), RemoteLayer::from_descriptor(d)?);
    }
    Ok((config, layers))
}

/// Reads the cache BuildKit's `type=local` exporter left in `dir`: `index.json` entry
/// `tag` (default `latest`), or the index `digest` when given.
pub fn load_local(
    dir: &Path,
    tag: Option<&str>,
    digest: Option<&str>,
) -> Result<LoadedCache, CacheError> {
    let name = format!("local cache {}", dir.display());
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|source| CacheError::Io {
        path: index_path.clone(),
        source,
    })?;
    let top: CacheIndex = serde_json::from_slice(&bytes)
        .map_err(|e| format_err(index_path.display().to_string(), e))?;
    let tag = tag.unwrap_or("latest");
    let entry = match digest {
        Some(d) => top.manifests.iter().find(|m| m.digest == d),
        None => top
            .manifests
            .iter()
            .find(|m| m.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag)),
    }
    .ok_or_else(|| CacheError::Cache {
        cache: name.clone(),
        message: match digest {
            Some(d) => format!("no index {d} in index.json"),
            None => format!("no tag {tag:?} in index.json"),
        },
    })?;
    let layout = OciLayout::at(dir);
    let read = |digest: &str| -> Result<Vec<u8>, CacheError> {
        let d = digest
            .parse::<Digest>()
            .map_err(|e| format_err(format!("{name}: digest {digest:?}"), e))?;
        layout.read_blob(&d).map_err(|e| CacheError::Image {
            cache: name.clone(),
            source: Box::new(e.into()),
        })
    };
    let index: CacheIndex = serde_json::from_slice(&read(&entry.digest)?)
        .map_err(|e| format_err(format!("{name}: index {}", entry.digest), e))?;
    let (config, layers) = split_index(&index)?;
    let config = config.ok_or_else(|| CacheError::Cache {
        cache: name.clone(),
        message: format!(
            "index {} has no {CACHE_CONFIG_MEDIA_TYPE} blob",
            entry.digest
        ),
    })?;
    let config: CacheConfig = serde_json::from_slice(&read(&config.digest)?)
        .map_err(|e| format_err(format!("{name}: cache config {}", config.digest), e))?;
    Ok(LoadedCache {
        name,
        configs: vec![(config, layers)],
        fetcher: Arc::new(Fetcher::Layout(layout)),
        origin: None,
    })
}

#[derive(Deserialize)]
struct InlineImage {
    #[serde(default)]
    rootfs: Option<InlineRootfs>,
    #[serde(default, rename = "moby.buildkit.cache.v0")]
    cache: Option<String>,
    #[serde(default)]
    history: Option<Vec<InlineHistory>>,
}

#[derive(Deserialize)]
struct InlineRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct InlineHistory {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    empty_layer: bool,
}

/// Reads the cache at registry reference `reference`: a cache index (what
/// `type=registry` exports) or an image whose config carries an inline cache.
pub async fn load_registry(
    clients: &RegistryClients,
    content: &ContentStore,
    reference: &str,
) -> Result<LoadedCache, CacheError> {
    let name = format!("registry cache {reference}");
    let parsed =
        kiln_registry::reference::parse_normalized(reference).map_err(|e| CacheError::Cache {
            cache: name.clone(),
            message: e.to_string(),
        })?;
    let client_err = |source| CacheError::Client {
        cache: name.clone(),
        source,
    };
    let client = clients.get(parsed.registry()).map_err(client_err)?;
    let repo = parsed.repository().to_owned();
    let tag_or_digest = parsed
        .digest()
        .or(parsed.tag())
        .unwrap_or("latest")
        .to_owned();
    let (top, _) = client
        .get_manifest(&repo, &tag_or_digest, &accepted(), MAX_SMALL)
        .await
        .map_err(client_err)?;
    let fetcher = Arc::new(Fetcher::registry(RegistryFetcher::new(
        &parsed,
        client.clone(),
        content.clone(),
    )));
    let origin = Some(BlobOrigin {
        registry: parsed.registry().to_owned(),
        repository: repo.clone(),
    });
    let image_err = |e: kiln_registry::ImageError| CacheError::Image {
        cache: name.clone(),
        source: Box::new(e),
    };
    let index: Option<CacheIndex> = serde_json::from_slice(&top).ok();
    if let Some(index) = &index {
        let (config, layers) = split_index(index)?;
        if let Some(config) = config {
            let size = u64::try_from(config.size).unwrap_or(0);
            let digest = config
                .digest
                .parse::<Digest>()
                .map_err(|e| format_err(format!("{name}: config digest"), e))?;
            let bytes = fetcher.small_blob(&digest, size).await.map_err(image_err)?;
            let config: CacheConfig = serde_json::from_slice(&bytes)
                .map_err(|e| format_err(format!("{name}: cache config {digest}"), e))?;
            return Ok(LoadedCache {
                name,
                configs: vec![(config, layers)],
                fetcher,
                origin,
            });
        }
    }
    // An image: every manifest (of an index, or the one) may carry an inline cache.
    let mut configs = Vec::new();
    let mut pending = vec![(Digest::of(&top), top)];
    let mut depth = 0;
    while let Some((digest, bytes)) = pending.pop() {
        depth += 1;
        if depth > 64 {
            break;
        }
        match manifest::parse(&digest, "", &bytes).map_err(|e| image_err(e.into()))? {
            Parsed::Index(entries) => {
                for e in entries {
                    let b = fetcher
                        .manifest(&e.descriptor.digest)
                        .await
                        .map_err(image_err)?;
                    pending.push((e.descriptor.digest, b));
                }
            }
            Parsed::Manifest { config, layers } => {
                let cfg = fetcher
                    .small_blob(&config.digest, config.size)
                    .await
                    .map_err(image_err)?;
                if let Some(found) = inline_config(&cfg, &layers)? {
                    configs.push(found);
                }
            }
        }
    }
    if configs.is_empty() {
        return Err(CacheError::Cache {
            cache: name,
            message: "neither a cache index nor an image with an inline cache".to_owned(),
        });
    }
    Ok(LoadedCache {
        name,
        configs,
        fetcher,
        origin,
    })
}

fn accepted() -> Vec<&'static str> {
    ACCEPTED_MANIFESTS.to_vec()
}

/// The inline cache of an image config whose manifest lists `layers`.
pub fn inline_config(
    config: &[u8],
    layers: &[kiln_registry::manifest::Descriptor],
) -> Result<Option<(CacheConfig, LayerMap)>, CacheError> {
    use base64::Engine as _;
    let image: InlineImage = match serde_json::from_slice(config) {
        Ok(i) => i,
        Err(_) => return Ok(None),
    };
    let Some(cache) = image.cache else {
        return Ok(None);
    };
    let diff_ids = image.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != layers.len() {
        tracing::warn!("invalid image with mismatching manifest and config");
        return Ok(None);
    }
    let records_json = base64::engine::general_purpose::STANDARD
        .decode(cache.as_bytes())
        .map_err(|e| format_err("inline cache", e))?;
    let mut config = CacheConfig {
        records: serde_json::from_slice(&records_json)
            .map_err(|e| format_err("inline cache", e))?,
        ..Default::default()
    };
    let created: Vec<Option<String>> = image
        .history
        .unwrap_or_default()
        .into_iter()
        .filter(|h| !h.empty_layer)
        .map(|h| h.created)
        .collect();
    let mut map = LayerMap::new();
    for (i, l) in layers.iter().enumerate() {
        map.insert(
            l.digest.as_str().to_owned(),
            RemoteLayer {
                descriptor: l.clone(),
                diff_id: diff_ids[i].parse().ok(),
                created_at: created.get(i).cloned().flatten(),
            },
        );
        config.layers.push(CacheLayer {
            blob: l.digest.as_str().to_owned(),
            parent_index: i as i64 - 1,
            annotations: None,
        });
    }
    Ok(Some((config, map)))
}
