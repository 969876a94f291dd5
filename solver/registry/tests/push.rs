//! Pushing blobs against a real registry (TLS with a private CA, htpasswd auth), with a
//! chunk size small enough that every upload takes several `PATCH`es: a new blob is
//! uploaded and reads back byte for byte, a blob the repository has is left alone, one
//! another repository holds is mounted from there (the content store remembers where
//! blobs went), a blob only on the registry is fetched and uploaded to a repository with
//! no mount source, and manifests go last.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt as _;
use kiln_proto::Digest;
use kiln_registry::manifest::MEDIA_OCI_MANIFEST;
use kiln_registry::{
    Auth, BlobOrigin, BlobPush, ContentStore, Credentials, ExportLayer, Fetcher, LayerBlob,
    RegistryClient, RegistryFetcher, RegistryHosts, push_bytes, push_layer,
};
use kiln_testsupport::SecureRegistry;
use kiln_testsupport::secure_registry::{PASSWORD, USER};

fn layer(path: &Path, data: &[u8]) -> ExportLayer {
    std::fs::write(path, data).unwrap();
    ExportLayer {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: Digest::of(data),
        size: data.len() as u64,
        diff_id: Digest::of(b"not checked here"),
        created_at: 0,
        blob: LayerBlob::File(path.to_owned()),
        origins: Vec::new(),
    }
}

async fn read_blob(client: &RegistryClient, repo: &str, digest: &Digest) -> Vec<u8> {
    let mut body = client.get_blob(repo, digest).await.unwrap().bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[test]
fn pushes_check_mount_and_upload_in_chunks() {
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hosts = RegistryHosts::parse(&registry.kiln_toml(), Path::new("kiln.toml")).unwrap();
    let host = registry.host();
    let credentials = Credentials::with_inline(&host, Auth::Basic(USER.into(), PASSWORD.into()));
    let client = Arc::new(
        RegistryClient::new(&host, &hosts, credentials)
            .unwrap()
            .with_chunk_size(1000),
    );
    let content = ContentStore::open(&dir.path().join("state")).unwrap();
    // Not compressible, not a multiple of the chunk size.
    let data: Vec<u8> = (0..4321u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut blob = layer(&dir.path().join("blob"), &data);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let push = |repo: &'static str, l: ExportLayer| {
                let (client, content) = (client.clone(), content.clone());
                async move { push_layer(&client, repo, &l, Some(&content)).await.unwrap() }
            };
            assert_eq!(push("team/a", blob.clone()).await, BlobPush::Uploaded);
            assert_eq!(read_blob(&client, "team/a", &blob.digest).await, data);
            assert_eq!(
                client.blob_exists("team/a", &blob.digest).await.unwrap(),
                Some(data.len() as u64)
            );
            assert_eq!(push("team/a", blob.clone()).await, BlobPush::Present);
            let (uploads, bytes) = client.stats.uploaded();
            assert_eq!((uploads, bytes), (1, data.len() as u64), "one upload so far");

            // The content store learned where the blob went: a push to another
            // repository mounts it from there.
            let origin = BlobOrigin {
                registry: host.clone(),
                repository: "team/a".into(),
            };
            assert_eq!(content.origins(&blob.digest), [origin]);
            blob.origins = content.origins(&blob.digest);
            assert_eq!(push("team/b", blob.clone()).await, BlobPush::Mounted);
            assert_eq!(read_blob(&client, "team/b", &blob.digest).await, data);
            assert_eq!(client.stats.uploaded().0, 1, "a mount uploads nothing");

            // A blob known only on the registry, with no mount source: fetched, then
            // uploaded.
            let fetcher = RegistryFetcher::new(
                &kiln_registry::reference::parse_normalized(&format!("{host}/team/a:x"))
                    .unwrap(),
                client.clone(),
                content.clone(),
            );
            let remote = ExportLayer {
                blob: LayerBlob::Remote(Arc::new(Fetcher::registry(fetcher))),
                origins: Vec::new(),
                ..blob.clone()
            };
            assert_eq!(push("team/c", remote).await, BlobPush::Uploaded);
            assert!(content.contains(&blob.digest), "fetched into the content store");
            assert_eq!(read_blob(&client, "team/c", &blob.digest).await, data);

            // Config and manifest.
            let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
            let config_digest = Digest::of(config);
            assert_eq!(
                push_bytes(&client, "team/c", &config_digest, config)
                    .await
                    .unwrap(),
                BlobPush::Uploaded
            );
            assert_eq!(
                push_bytes(&client, "team/c", &config_digest, config)
                    .await
                    .unwrap(),
                BlobPush::Present
            );
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
                config.len(),
                blob.digest,
                data.len()
            );
            client
                .put_manifest("team/c", "1", MEDIA_OCI_MANIFEST, manifest.as_bytes())
                .await
                .unwrap();
            let (got, media_type) = client
                .get_manifest("team/c", "1", &[MEDIA_OCI_MANIFEST], 1 << 20)
                .await
                .unwrap();
            assert_eq!(got, manifest.as_bytes());
            assert_eq!(media_type, MEDIA_OCI_MANIFEST);
        });
}
