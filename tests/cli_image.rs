//! Image outputs of `kiln build`, as buildctl spells them:
//! - `type=docker` archives that skopeo reads and copies (Docker's `manifest.json` beside
//!   the OCI layout), `dest=-` on standard output, `type=oci` beside it, `type=image`
//!   without a push (kept in the content store), and `--metadata-file`; the base image's
//!   layer is the registry's blob, not recompressed, and `compression=zstd` applies to new
//!   layers only; rootful and rootless;
//! - `type=image,push=true` to a registry with TLS and auth: skopeo reads the frontend's
//!   config (Env, Cmd, Labels, WorkingDir); a second image on top uploads only its new
//!   layer (the base ones are mounted or present); a fresh rootless state builds `FROM`
//!   the pushed image and runs it.
//!
//! Base images come from the shared test registry on 127.0.0.1:5000.

// Test helpers panic with the failing call, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail, ensure};
use kiln_testsupport::machine::{Machine, stderr, uploaded, world_dir};
use kiln_testsupport::secure_registry::{PASSWORD, USER};
use kiln_testsupport::{
    AsTestUser, SecureRegistry, is_root, require, rerun_as_test_user, test_image_layout,
    test_registry, test_user_ready, which,
};
use serde_json::{Value, json};

const DOCKERFILE: &str = r#"FROM localhost:5000/busybox
ENV GREETING=hello
LABEL org.example.team=kiln
RUN echo built > /built
WORKDIR /app
COPY greeting.txt .
CMD ["cat", "/app/greeting.txt"]
"#;

fn context(dir: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.join("greeting.txt"), "hi from kiln\n").unwrap();
    ctx
}

/// The digest of busybox's one layer blob in the shared layout (what the test registry
/// serves).
fn busybox_layer() -> String {
    let layout = test_image_layout();
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "busybox")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(manifest)).unwrap())
            .unwrap();
    manifest["layers"][0]["digest"].as_str().unwrap().to_owned()
}

fn kiln(root: &Path, args: &[String]) -> anyhow::Result<Output> {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .arg("build")
        .args(["--progress", "plain"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run kiln")?;
    if !output.status.success() {
        bail!(
            "kiln build {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// The entries of a tar archive: name → bytes.
fn entries(archive: &[u8]) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        out.insert(name, data);
    }
    Ok(out)
}

fn json_of(files: &BTreeMap<String, Vec<u8>>, name: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(
        files.get(name).with_context(|| format!("no {name}"))?,
    )?)
}

fn skopeo_local(args: &[&str], transport: &str, work: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .arg(transport)
        .env("TMPDIR", work)
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo {args:?} {transport}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn check_frontend_config(env: &Value, labels: &Value) -> anyhow::Result<()> {
    ensure!(
        env.as_array()
            .is_some_and(|e| e.iter().any(|v| v == "GREETING=hello")),
        "Env {env}"
    );
    ensure!(labels["org.example.team"] == "kiln", "Labels {labels}");
    Ok(())
}

fn archives_body() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let ctx = context(work);
    let root = work.join("root");
    let archive = work.join("app.tar");
    let meta = work.join("meta.json");
    kiln(
        &root,
        &[
            ctx.display().to_string(),
            "--output".into(),
            format!(
                "type=docker,name=kiln.test/app:1,dest={}",
                archive.display()
            ),
            "--metadata-file".into(),
            meta.display().to_string(),
        ],
    )?;
    let bytes = std::fs::read(&archive)?;
    let files = entries(&bytes)?;
    // BuildKit's docker exporter: the OCI layout, and Docker's manifest.json.
    ensure!(
        files.get("oci-layout").map(Vec::as_slice) == Some(br#"{"imageLayoutVersion":"1.0.0"}"#),
        "oci-layout"
    );
    let docker = json_of(&files, "manifest.json")?;
    ensure!(
        docker[0]["RepoTags"] == json!(["kiln.test/app:1"]),
        "{docker}"
    );
    let busybox = busybox_layer();
    ensure!(
        docker[0]["Layers"][0] == format!("blobs/sha256/{}", busybox.trim_start_matches("sha256:")),
        "the base layer is busybox's blob, not recompressed: {docker}"
    );
    ensure!(
        files.contains_key(docker[0]["Config"].as_str().context("Config")?),
        "no config blob"
    );
    let index = json_of(&files, "index.json")?;
    let entry = &index["manifests"][0];
    ensure!(
        entry["annotations"]["io.containerd.image.name"] == "kiln.test/app:1"
            && entry["annotations"]["org.opencontainers.image.ref.name"] == "1",
        "{entry}"
    );

    // --metadata-file: BuildKit's keys, the descriptor as an object.
    let meta: Value = serde_json::from_slice(&std::fs::read(&meta)?)?;
    ensure!(meta["containerimage.digest"] == entry["digest"], "{meta}");
    ensure!(meta["image.name"] == "kiln.test/app:1", "{meta}");
    ensure!(meta["containerimage.descriptor"] == *entry, "{meta}");
    let manifest = json_of(
        &files,
        &format!(
            "blobs/sha256/{}",
            entry["digest"]
                .as_str()
                .context("digest")?
                .trim_start_matches("sha256:")
        ),
    )?;
    ensure!(
        meta["containerimage.config.digest"] == manifest["config"]["digest"],
        "{meta}"
    );
    ensure!(
        manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json",
        "docker media types by default: {manifest}"
    );

    // skopeo reads the archive, with the frontend's config, and copies every blob out.
    let transport = format!("docker-archive:{}", archive.display());
    let info: Value = serde_json::from_slice(&skopeo_local(&["inspect"], &transport, work)?)?;
    check_frontend_config(&info["Env"], &info["Labels"])?;
    let copied = work.join("copied");
    skopeo_local(
        &["copy", "--quiet", &transport],
        &format!("oci:{}:app", copied.display()),
        work,
    )?;
    ensure!(copied.join("index.json").is_file(), "skopeo copied nothing");

    // Again from the cache, to standard output, beside an OCI archive with zstd asked
    // for: the same manifest (layer times come from the cached layers), and the OCI
    // flavour reuses the same blobs (existing blobs are never recompressed).
    let oci = work.join("app-oci.tar");
    let again = kiln(
        &root,
        &[
            ctx.display().to_string(),
            "--output".into(),
            "type=docker,name=kiln.test/app:1,dest=-".into(),
            "--output".into(),
            format!(
                "type=oci,name=kiln.test/app:1,dest={},compression=zstd",
                oci.display()
            ),
            "--output".into(),
            "type=image,name=kiln.test/app:stored".into(),
        ],
    )?;
    // type=image without push: kept in the content store, the same manifest.
    let stored = root.join("content/blobs/sha256").join(
        entry["digest"]
            .as_str()
            .context("digest")?
            .trim_start_matches("sha256:"),
    );
    ensure!(stored.is_file(), "the image is not in the content store");
    let streamed = entries(&again.stdout)?;
    ensure!(
        json_of(&streamed, "index.json")?["manifests"][0]["digest"] == entry["digest"],
        "a build from cache gives the same image"
    );
    let oci_files = entries(&std::fs::read(&oci)?)?;
    ensure!(
        !oci_files.contains_key("manifest.json"),
        "OCI has no manifest.json"
    );
    let oci_index = json_of(&oci_files, "index.json")?;
    let oci_manifest = json_of(
        &oci_files,
        &format!(
            "blobs/sha256/{}",
            oci_index["manifests"][0]["digest"]
                .as_str()
                .context("digest")?
                .trim_start_matches("sha256:")
        ),
    )?;
    ensure!(
        oci_manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json",
        "{oci_manifest}"
    );
    let digests = |m: &Value| -> Vec<Value> {
        m["layers"]
            .as_array()
            .map(|l| l.iter().map(|l| l["digest"].clone()).collect())
            .unwrap_or_default()
    };
    ensure!(
        digests(&oci_manifest) == digests(&manifest),
        "same blobs in both flavours"
    );
    ensure!(
        oci_manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip",
        "{oci_manifest}"
    );
    let info: Value = serde_json::from_slice(&skopeo_local(
        &["inspect"],
        &format!("oci-archive:{}", oci.display()),
        work,
    )?)?;
    check_frontend_config(&info["Env"], &info["Labels"])?;

    // In a fresh state, zstd applies to the layers made for the export; the base layer
    // stays the registry's gzip blob. skopeo copies (and so checks) every blob.
    let zstd = work.join("zstd.tar");
    kiln(
        &work.join("root-zstd"),
        &[
            ctx.display().to_string(),
            "--output".into(),
            format!("type=oci,dest={},compression=zstd", zstd.display()),
        ],
    )?;
    let zstd_files = entries(&std::fs::read(&zstd)?)?;
    let zstd_index = json_of(&zstd_files, "index.json")?;
    let zstd_manifest = json_of(
        &zstd_files,
        &format!(
            "blobs/sha256/{}",
            zstd_index["manifests"][0]["digest"]
                .as_str()
                .context("digest")?
                .trim_start_matches("sha256:")
        ),
    )?;
    let media_types: Vec<&str> = zstd_manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["mediaType"].as_str())
        .collect();
    ensure!(
        media_types[0] == "application/vnd.oci.image.layer.v1.tar+gzip"
            && media_types.len() > 1
            && media_types[1..]
                .iter()
                .all(|m| *m == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "{media_types:?}"
    );
    ensure!(zstd_manifest["layers"][0]["digest"] == busybox.as_str());
    skopeo_local(
        &[
            "copy",
            "--quiet",
            &format!("oci-archive:{}", zstd.display()),
        ],
        &format!("dir:{}", work.join("zstd-copy").display()),
        work,
    )?;
    Ok(())
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn docker_and_oci_archives_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root() && which("skopeo"), "root and skopeo") {
        return;
    }
    let Some(_registry) = test_registry() else {
        return;
    };
    archives_body().unwrap();
}

#[test]
fn docker_and_oci_archives_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(_registry) = test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    if !require(which("skopeo"), "skopeo") {
        return;
    }
    archives_body().unwrap();
}

/// `skopeo ARGS docker://REFERENCE` against `registry` (its CA and credentials), as JSON.
fn skopeo(registry: &SecureRegistry, args: &[&str], reference: &str) -> Value {
    let out = Command::new("skopeo")
        .args(args)
        .arg("--cert-dir")
        .arg(registry.cert_dir())
        .arg("--creds")
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `(present, mounted, uploaded)` layers of the push kiln logged (`--debug`).
fn push_report(o: &Output) -> (usize, usize, usize) {
    let text = stderr(o);
    let line = text
        .lines()
        .find(|l| l.contains("layers present"))
        .unwrap_or_else(|| panic!("no push report in:\n{text}"));
    let numbers: Vec<usize> = line
        .split(['(', ')', ':', ',', ' '])
        .filter_map(|w| w.parse().ok())
        .collect();
    let n = numbers.len();
    assert!(n >= 3, "{line}");
    (numbers[n - 3], numbers[n - 2], numbers[n - 1])
}

#[test]
fn pushed_images_are_read_by_skopeo_and_built_from() {
    if !require(
        is_root() && test_user_ready() && which("skopeo"),
        "root, the test user kiln-test and skopeo",
    ) {
        return;
    }
    let Some(_base) = test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let toml = registry.kiln_toml();
    let docker = registry.docker_config(USER, PASSWORD);
    let a = Machine::new(kiln, dir.path(), "a", &toml, &docker, false);
    let b = Machine::new(kiln, dir.path(), "b", &toml, &docker, true);
    let ctx = context(dir.path());
    let image = format!("{}/team/app:1", registry.host());
    let meta = dir.path().join("meta.json");
    let pushed = a.build(
        &[
            ctx.display().to_string(),
            "--output".into(),
            format!("type=image,name={image},push=true"),
            "--metadata-file".into(),
            meta.display().to_string(),
        ],
        None,
    );
    assert!(pushed.status.success(), "A: {}", stderr(&pushed));
    let (present, mounted, sent) = push_report(&pushed);
    assert_eq!(
        (present, mounted),
        (0, 0),
        "a new repository on another registry"
    );
    let info = skopeo(&registry, &["inspect"], &image);
    let layers = info["Layers"].as_array().unwrap().len();
    assert_eq!(sent, layers, "every layer uploaded once");
    assert_eq!(info["Layers"][0], busybox_layer().as_str(), "blob reused");
    check_frontend_config(&info["Env"], &info["Labels"]).unwrap();
    let config = skopeo(&registry, &["inspect", "--config", "--raw"], &image);
    assert_eq!(config["config"]["Cmd"], json!(["cat", "/app/greeting.txt"]));
    assert_eq!(config["config"]["WorkingDir"], "/app");
    let meta: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], info["Digest"]);
    assert_eq!(meta["image.name"], image.as_str());
    assert_eq!(
        meta["containerimage.descriptor"]["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        meta["containerimage.descriptor"]["digest"], info["Digest"],
        "{meta}"
    );
    let raw = skopeo(&registry, &["inspect", "--raw"], &image);
    assert_eq!(
        meta["containerimage.config.digest"],
        raw["config"]["digest"]
    );

    // An image on top of it, pushed to another repository: only the new layer goes up,
    // the base ones are mounted from where they are.
    let more = dir.path().join("more");
    std::fs::create_dir_all(&more).unwrap();
    std::fs::write(
        more.join("Dockerfile"),
        format!("FROM {image}\nRUN echo more > /more\n"),
    )
    .unwrap();
    let more_image = format!("{}/team/more:1", registry.host());
    let second = a.build(
        &[
            more.display().to_string(),
            "--output".into(),
            format!("type=image,name={more_image},push=true"),
        ],
        None,
    );
    assert!(second.status.success(), "A: {}", stderr(&second));
    let (present, mounted, sent) = push_report(&second);
    assert_eq!(
        (present + mounted, sent),
        (layers, 1),
        "base layers mounted, one layer uploaded"
    );
    let (_, bytes) = uploaded(&second);
    assert!(bytes < 64 << 10, "{bytes} bytes uploaded");

    // A fresh rootless state builds FROM the pushed image and runs it.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("Dockerfile"),
        format!("FROM {image}\nRUN cat greeting.txt /built > /out && echo \"$GREETING\" >> /out\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let built = b.build(
        &[
            run.display().to_string(),
            "--output".into(),
            format!("type=local,dest={}", out.display()),
        ],
        None,
    );
    assert!(built.status.success(), "B: {}", stderr(&built));
    assert_eq!(
        std::fs::read_to_string(out.join("out")).unwrap(),
        "hi from kiln\nbuilt\nhello\n"
    );
}
