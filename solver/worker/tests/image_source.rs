//! Image sources end to end: pulling the shared test images from the test registry (by tag
//! and by digest) into fresh snapshot stores, rootful and rootless; content store and chain
//! sharing on a second pull; CacheMaps against an independent computation of the spec
//! formula; `oci-layout://` sources from the shared layout and from an index built here.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, ensure};
use kiln_proto::pb;
use kiln_registry::{
    Credentials, ImageResolver, ImageSource, PullState, RegistryHosts, ResolvedImage, pull,
};
use kiln_snapshotter::Snapshotter;
use kiln_testsupport::registry::BUSYBOX_MANIFEST_DIGEST;
use kiln_testsupport::{
    Mounted, rootful, rootless, rt, serial, test_image_layout as shared_layout,
    test_registry as registry,
};
use kiln_worker::image::cache_map;
use sha2::Digest as _;

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn amd64() -> pb::Platform {
    pb::Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    }
}

fn source(identifier: &str, attrs: &[(&str, &str)]) -> ImageSource {
    let attrs: BTreeMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ImageSource::parse(identifier, &attrs).unwrap()
}

fn resolver(root: &Path, layouts: HashMap<String, PathBuf>) -> anyhow::Result<ImageResolver> {
    Ok(ImageResolver::new(
        root,
        RegistryHosts::default(),
        Credentials::default(),
        layouts,
    )?)
}

/// The chain IDs of `diff_ids`, computed here from the OCI image spec.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The image config's diff IDs, read independently of kiln's parser.
fn config_diff_ids(image: &ResolvedImage) -> Vec<String> {
    let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect()
}

fn snapshot_ids(store: &Snapshotter) -> anyhow::Result<BTreeSet<String>> {
    Ok(store.du()?.into_iter().map(|u| u.id).collect())
}

/// Checks a pulled top ref against the image config: every layer's diff ID and chain ID.
fn check_chain(top: &kiln_snapshotter::ImmutableRef, image: &ResolvedImage) -> anyhow::Result<()> {
    let diff_ids = config_diff_ids(image);
    let chains = chain_ids(&diff_ids);
    let mut refs: Vec<_> = std::iter::once(top).chain(top.parents()).collect();
    refs.reverse();
    ensure!(
        refs.len() == diff_ids.len(),
        "{} snapshots for {} layers",
        refs.len(),
        diff_ids.len()
    );
    for ((r, diff), chain) in refs.iter().zip(&diff_ids).zip(&chains) {
        let info = r.layer_info()?.context("pulled layer without layer info")?;
        ensure!(
            &info.diff_id == diff,
            "diff id {} != config {diff}",
            info.diff_id
        );
        ensure!(
            &info.chain_id == chain,
            "chain id {} != {chain}",
            info.chain_id
        );
    }
    Ok(())
}

fn registry_pull_body() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let store = Snapshotter::open(&root.path().join("snap"))?;
    let resolver = resolver(root.path(), HashMap::new())?;
    let events = Mutex::new(Vec::new());
    let record = |p: &kiln_registry::PullProgress<'_>| {
        events
            .lock()
            .unwrap()
            .push((p.layer.as_str().to_owned(), p.done, p.total, p.state));
    };
    rt().block_on(async {
        // By tag.
        let busybox = resolver
            .resolve(
                &source("docker-image://localhost:5000/busybox:latest", &[]),
                &amd64(),
            )
            .await?;
        ensure!(
            busybox.digest.as_str() == BUSYBOX_MANIFEST_DIGEST,
            "{}",
            busybox.digest
        );
        ensure!(
            busybox.manifest_digest == busybox.digest,
            "a plain manifest is its own digest"
        );
        let pulled = pull(&store, &busybox, None, &record).await?;
        let top = pulled.top.clone().context("busybox has layers")?;
        check_chain(&top, &busybox)?;
        ensure!(pulled.imported == 1 && pulled.reused == 0, "{pulled:?}");
        {
            let events = events.lock().unwrap();
            let layer = &busybox.layers[0];
            ensure!(
                events
                    .iter()
                    .any(|e| e.3 == PullState::Downloading && e.1 == layer.size),
                "no complete download reported: {events:?}"
            );
            ensure!(
                events.last().map(|e| (e.0.as_str(), e.2, e.3))
                    == Some((layer.digest.as_str(), layer.size, PullState::Done)),
                "{events:?}"
            );
        }
        let (downloads, bytes) = busybox.downloads();
        // Manifest, config and the one layer.
        ensure!(downloads == 3, "{downloads} downloads");
        ensure!(bytes >= busybox.layers[0].size, "{bytes} bytes");
        let view = Mounted::view(&top)?;
        ensure!(
            view.path.join("bin/busybox").is_file(),
            "no /bin/busybox in the pull"
        );
        drop(view);

        let blobs = resolver.content().list()?;
        let snapshots = snapshot_ids(&store)?;
        ensure!(blobs.len() == 3, "{blobs:?}");

        // By digest, then by tag again: nothing new fetched or stored.
        events.lock().unwrap().clear();
        let pinned = resolver
            .resolve(
                &source(
                    &format!("docker-image://localhost:5000/busybox@{BUSYBOX_MANIFEST_DIGEST}"),
                    &[],
                ),
                &amd64(),
            )
            .await?;
        let again = pull(&store, &pinned, None, &record).await?;
        ensure!(again.imported == 0 && again.reused == 1, "{again:?}");
        ensure!(
            again.top.as_ref().map(|r| r.id()) == Some(top.id()),
            "another snapshot"
        );
        ensure!(
            pinned.downloads() == (0, 0),
            "pinned pull downloaded {:?}",
            pinned.downloads()
        );
        ensure!(
            events
                .lock()
                .unwrap()
                .iter()
                .all(|e| e.3 == PullState::Cached),
            "{:?}",
            events.lock().unwrap()
        );
        let tagged = resolver
            .resolve(
                &source("docker-image://localhost:5000/busybox:latest", &[]),
                &amd64(),
            )
            .await?;
        let third = pull(&store, &tagged, None, &record).await?;
        ensure!(third.imported == 0, "{third:?}");
        ensure!(
            tagged.downloads() == (0, 0),
            "tag pull downloaded {:?}",
            tagged.downloads()
        );
        ensure!(
            resolver.content().list()? == blobs,
            "new blobs after a second pull"
        );
        ensure!(
            snapshot_ids(&store)? == snapshots,
            "new snapshots after a second pull"
        );

        // A pinned reference whose content is stored needs no registry at all (nothing
        // listens on port 9).
        let offline = resolver
            .resolve(
                &source(
                    &format!("docker-image://127.0.0.1:9/busybox@{BUSYBOX_MANIFEST_DIGEST}"),
                    &[],
                ),
                &amd64(),
            )
            .await?;
        ensure!(
            offline.config.digest == busybox.config.digest,
            "different config"
        );
        // resolvemode=local reuses what the tag resolved to before.
        let local = resolver
            .resolve(
                &source(
                    "docker-image://localhost:5000/busybox:latest",
                    &[("image.resolvemode", "local")],
                ),
                &amd64(),
            )
            .await?;
        ensure!(
            local.digest == busybox.digest,
            "local resolve gave {}",
            local.digest
        );

        // Alpine: its own blobs and snapshot, sharing nothing with busybox.
        let alpine = resolver
            .resolve(
                &source("docker-image://localhost:5000/alpine:latest", &[]),
                &amd64(),
            )
            .await?;
        let alpine_pull = pull(&store, &alpine, None, &record).await?;
        let alpine_top = alpine_pull.top.clone().context("alpine has layers")?;
        check_chain(&alpine_top, &alpine)?;
        ensure!(
            alpine_top.id() != top.id(),
            "alpine reused busybox's snapshot"
        );
        ensure!(alpine_pull.imported == 1, "{alpine_pull:?}");
        let new_blobs: BTreeSet<_> = resolver.content().list()?.into_iter().collect();
        let old_blobs: BTreeSet<_> = blobs.into_iter().collect();
        let added: BTreeSet<String> = new_blobs
            .difference(&old_blobs)
            .map(|d| d.as_str().to_owned())
            .collect();
        let expected: BTreeSet<String> = [
            alpine.manifest_digest.as_str().to_owned(),
            alpine.config.digest.as_str().to_owned(),
            alpine.layers[0].digest.as_str().to_owned(),
        ]
        .into();
        ensure!(
            added == expected,
            "alpine added {added:?}, expected {expected:?}"
        );
        let after = snapshot_ids(&store)?;
        ensure!(
            after.len() == snapshots.len() + 1 && after.is_superset(&snapshots),
            "{snapshots:?} -> {after:?}"
        );
        let view = Mounted::view(&alpine_top)?;
        ensure!(
            view.path.join("sbin/apk").exists(),
            "no /sbin/apk in alpine"
        );
        Ok(())
    })
}

#[test]
fn registry_pull_rootful() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    rootful(registry_pull_body);
}

#[test]
fn registry_pull_rootless() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    rootless(registry_pull_body);
}

/// CacheMaps of busybox against the spec formula, computed here with plain string
/// formatting and sha256.
#[test]
fn cache_maps_match_the_spec_formula() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let resolver = resolver(root.path(), HashMap::new()).unwrap();
    rt().block_on(async {
        let image = resolver
            .resolve(&source("docker-image://localhost:5000/busybox:latest", &[]), &amd64())
            .await
            .unwrap();
        let diff_ids = config_diff_ids(&image);
        assert_eq!(diff_ids.len(), 1);
        let source_digest = |key: &str| sha256(format!("buildkit.source.v0:{key}").as_bytes());
        for (limit, json) in [
            (
                None,
                format!(r#"{{"Digest":"{BUSYBOX_MANIFEST_DIGEST}","OS":"linux","Arch":"amd64"}}"#),
            ),
            (
                Some(1),
                format!(
                    r#"{{"Digest":"{BUSYBOX_MANIFEST_DIGEST}","OS":"linux","Arch":"amd64","Limit":1}}"#
                ),
            ),
        ] {
            let m0 = cache_map(&image, &amd64(), 0, limit).unwrap();
            assert!(!m0.done);
            assert_eq!(m0.map.digest.as_str(), source_digest(&sha256(json.as_bytes())));
            assert!(m0.map.deps.is_empty());
            let m1 = cache_map(&image, &amd64(), 1, limit).unwrap();
            assert!(m1.done);
            // One layer: the chain ID is the diff ID.
            assert_eq!(m1.map.digest.as_str(), source_digest(&diff_ids[0]));
        }
        let arm = pb::Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: "v7".into(),
            ..Default::default()
        };
        let json = format!(
            r#"{{"Digest":"{BUSYBOX_MANIFEST_DIGEST}","OS":"linux","Arch":"arm","Variant":"v7"}}"#
        );
        assert_eq!(
            cache_map(&image, &arm, 0, None).unwrap().map.digest.as_str(),
            source_digest(&sha256(json.as_bytes()))
        );
        let err = cache_map(&image, &amd64(), 1, Some(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "docker-image://localhost:5000/busybox:latest: image has 1 layers, limit is 2"
        );
    });
}

fn layout_body() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let store = Snapshotter::open(&root.path().join("snap"))?;
    let layouts: HashMap<String, PathBuf> = [("shared".to_owned(), shared_layout())].into();
    let resolver = resolver(root.path(), layouts)?;
    rt().block_on(async {
        let by_tag = resolver
            .resolve(
                &source("oci-layout://shared:busybox", &[("oci.store", "shared")]),
                &amd64(),
            )
            .await?;
        ensure!(by_tag.digest.as_str() == BUSYBOX_MANIFEST_DIGEST, "{}", by_tag.digest);
        let pulled = pull(&store, &by_tag, None, &|_| {}).await?;
        let top = pulled.top.context("busybox has layers")?;
        check_chain(&top, &by_tag)?;
        ensure!(resolver.content().list()?.is_empty(), "layout blobs went to the content store");

        let by_digest = resolver
            .resolve(
                &source(
                    &format!("oci-layout://shared@{BUSYBOX_MANIFEST_DIGEST}"),
                    &[("oci.store", "shared"), ("oci.layerlimit", "1")],
                ),
                &amd64(),
            )
            .await?;
        ensure!(by_digest.config.digest == by_tag.config.digest, "different config");
        // The layout source keys the image exactly as the registry source does.
        for index in [0, 1] {
            ensure!(
                cache_map(&by_digest, &amd64(), index, None)?.map.digest
                    == cache_map(&by_tag, &amd64(), index, None)?.map.digest,
                "CacheMap {index} differs"
            );
        }

        // The registry pull of the same image lands on the same chain.
        let from_registry = resolver
            .resolve(&source("docker-image://localhost:5000/busybox:latest", &[]), &amd64())
            .await?;
        ensure!(from_registry.config.digest == by_tag.config.digest, "different config");
        let again = pull(&store, &from_registry, None, &|_| {}).await?;
        ensure!(again.reused == 1 && again.imported == 0, "{again:?}");
        ensure!(again.top.map(|r| r.id().to_owned()) == Some(top.id().to_owned()), "new chain");

        let err = resolver
            .resolve(&source("oci-layout://x:busybox", &[("oci.store", "other")]), &amd64())
            .await
            .unwrap_err();
        ensure!(
            err.to_string()
                == "oci-layout store \"other\" is not known (map it to a directory with --oci-layout NAME=DIR)",
            "{err}"
        );
        Ok(())
    })
}

#[test]
fn oci_layout_source_rootful() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    rootful(layout_body);
}

#[test]
fn oci_layout_source_rootless() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    rootless(layout_body);
}

/// Writes a layout with one index: busybox's manifest as linux/amd64, alpine's as
/// linux/arm64/v8, plus the blobs they need, copied from the shared layout.
fn multi_platform_layout(dir: &Path) -> (String, String, String) {
    let shared = shared_layout();
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for entry in std::fs::read_dir(shared.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), blobs.join(entry.file_name())).unwrap();
    }
    let shared_index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("index.json")).unwrap()).unwrap();
    let manifest = |name: &str| {
        shared_index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .unwrap()
            .clone()
    };
    let mut amd = manifest("busybox");
    amd["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    amd.as_object_mut().unwrap().remove("annotations");
    let mut arm = manifest("alpine");
    arm["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    arm.as_object_mut().unwrap().remove("annotations");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm.clone(), amd.clone()],
    }))
    .unwrap();
    let index_digest = sha256(&index);
    std::fs::write(blobs.join(&index_digest[7..]), &index).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    (
        index_digest,
        amd["digest"].as_str().unwrap().to_owned(),
        arm["digest"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn platform_selection_from_an_index_in_a_layout() {
    let _serial = serial();
    let root = tempfile::tempdir().unwrap();
    let layout = tempfile::tempdir().unwrap();
    let (index, amd, arm) = multi_platform_layout(layout.path());
    let layouts: HashMap<String, PathBuf> = [("m".to_owned(), layout.path().to_owned())].into();
    let resolver = resolver(root.path(), layouts).unwrap();
    let src = source("oci-layout://app:multi", &[("oci.store", "m")]);
    let platform = |arch: &str, variant: &str| pb::Platform {
        os: "linux".into(),
        architecture: arch.into(),
        variant: variant.into(),
        ..Default::default()
    };
    rt().block_on(async {
        let a = resolver
            .resolve(&src, &platform("amd64", ""))
            .await
            .unwrap();
        assert_eq!(a.digest.as_str(), index);
        assert_eq!(a.manifest_digest.as_str(), amd);
        // aarch64 normalises to arm64, and the index's arm64/v8 to arm64.
        let b = resolver
            .resolve(&src, &platform("aarch64", ""))
            .await
            .unwrap();
        assert_eq!(b.digest.as_str(), index);
        assert_eq!(b.manifest_digest.as_str(), arm);
        assert_ne!(a.config.digest, b.config.digest);
        // CacheMap 0 keys by the index digest and the platform; 1 by the chosen layers.
        let source_digest = |key: &str| sha256(format!("buildkit.source.v0:{key}").as_bytes());
        let json = format!(r#"{{"Digest":"{index}","OS":"linux","Arch":"arm64"}}"#);
        assert_eq!(
            cache_map(&b, &platform("arm64", ""), 0, None)
                .unwrap()
                .map
                .digest
                .as_str(),
            source_digest(&sha256(json.as_bytes()))
        );
        assert_eq!(
            cache_map(&b, &platform("arm64", ""), 1, None)
                .unwrap()
                .map
                .digest
                .as_str(),
            source_digest(&config_diff_ids(&b)[0])
        );
        let err = resolver
            .resolve(&src, &platform("riscv64", ""))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("oci-layout://app:multi: no match for platform linux/riscv64 in index {index}")
        );
    });
}

/// `kiln.toml` reaches the registry client: forcing HTTPS on the plain-HTTP test registry
/// makes the request fail, the loopback default (plain HTTP) succeeds.
#[test]
fn kiln_toml_transport_reaches_the_client() {
    let _serial = serial();
    let Some(_registry) = registry() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let https = RegistryHosts::parse(
        "[registry.\"localhost:5000\"]\nhttp = false\n",
        Path::new("kiln.toml"),
    )
    .unwrap();
    let forced =
        ImageResolver::new(root.path(), https, Credentials::default(), HashMap::new()).unwrap();
    let plain = resolver(root.path(), HashMap::new()).unwrap();
    let src = source("docker-image://localhost:5000/busybox:latest", &[]);
    rt().block_on(async {
        let err = forced
            .resolve(&src, &amd64())
            .await
            .unwrap_err()
            .to_string();
        // The registry client names the registry and what it was doing.
        assert!(
            err.starts_with("localhost:5000: resolving busybox:latest: ")
                && err.contains("https://localhost:5000/v2/busybox/manifests/latest"),
            "unexpected error: {err}"
        );
        assert!(forced.content().list().unwrap().is_empty());
        let ok = plain.resolve(&src, &amd64()).await.unwrap();
        assert_eq!(ok.digest.as_str(), BUSYBOX_MANIFEST_DIGEST);
    });
}
