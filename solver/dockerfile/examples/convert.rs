//! Converts a Dockerfile with base images taken from an OCI image layout (tags by their
//! `org.opencontainers.image.ref.name` annotation), writing the Definition and the image
//! config: `convert DOCKERFILE OCI_LAYOUT OUT.pb OUT.json [KEY=VALUE frontend opts…]`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_dockerfile::{
    ConvertOptions, ImageMetaResolver, ResolveImageConfigOptions, ResolvedImageConfig,
};

struct Layout(PathBuf);

#[async_trait::async_trait]
impl ImageMetaResolver for Layout {
    async fn resolve_image_config(
        &self,
        reference: &str,
        _opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        let blob = |d: &str| {
            self.0
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let name = name.split([':', '@']).next().unwrap_or(name);
        let index: serde_json::Value =
            serde_json::from_slice(&read(self.0.join("index.json"))?).map_err(|e| e.to_string())?;
        let digest = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| format!("{reference}: not in the layout"))?
            .to_owned();
        let manifest: serde_json::Value =
            serde_json::from_slice(&read(blob(&digest))?).map_err(|e| e.to_string())?;
        let config = manifest["config"]["digest"]
            .as_str()
            .ok_or("manifest without config")?;
        Ok(ResolvedImageConfig {
            digest: Some(digest),
            config: read(blob(config))?,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dockerfile, layout, out_pb, out_json, rest @ ..] = args.as_slice() else {
        eprintln!("usage: convert DOCKERFILE OCI_LAYOUT OUT.pb OUT.json [KEY=VALUE …]");
        std::process::exit(2);
    };
    let frontend_opts: BTreeMap<String, String> = rest
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let opts =
        kiln_dockerfile::opts::from_frontend_opts(&frontend_opts, &ConvertOptions::default())
            .unwrap()
            .remove(0);
    let df = std::fs::read(dockerfile).unwrap();
    match kiln_dockerfile::dockerfile_to_llb(&df, &opts, &Layout(layout.into())).await {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {}", w.short);
            }
            std::fs::write(out_pb, c.definition_bytes()).unwrap();
            std::fs::write(out_json, c.image_config_json()).unwrap();
        }
        Err(e) => {
            eprintln!("error: {e} (lines {:?})", e.location());
            std::process::exit(1);
        }
    }
}
