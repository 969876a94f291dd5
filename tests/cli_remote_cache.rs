//! Remote caches through `kiln build`, as buildctl uses them: BuildKit v0.11.6's own
//! exported caches (`../shared/conformance/remote-cache/`) imported into an empty state
//! run no ExecOp and give BuildKit's tree; caches kiln exports (local directory, mode
//! min and max) imported into a fresh state run no step either. Rootful and rootless.
//! The base image is served by the shared test registry on 127.0.0.1:5000.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail, ensure};
use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user, shared_dir};
use serde_json::Value;

const FIXTURES: [&str; 3] = [
    "df01_run_plain",
    "df03_multistage_copy_from",
    "df11_many_runs",
];

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn def(name: &str) -> PathBuf {
    shared_dir().join(format!("conformance/defs/{name}.pb"))
}

fn kiln(root: &Path, def: &Path, args: &[String]) -> anyhow::Result<Output> {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .arg("build")
        .args(["--progress", "rawjson"])
        .args(args)
        .stdin(Stdio::from(
            std::fs::File::open(def).context("open definition")?,
        ))
        .output()
        .context("run kiln")?;
    if !output.status.success() {
        bail!(
            "kiln build {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(output)
}

/// The files BuildKit's build of `name` produced, checked in `out`.
fn check_files(name: &str, out: &Path) -> anyhow::Result<()> {
    let path = shared_dir().join(format!("conformance/defs/{name}.expect.json"));
    let expect: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let files = expect["expect"]["files"]
        .as_object()
        .context("expect.files")?;
    ensure!(!files.is_empty(), "{name}: no files to compare");
    for (file, want) in files {
        let got = std::fs::read_to_string(out.join(file))
            .with_context(|| format!("{name}: reading {file}"))?;
        ensure!(
            Some(got.as_str()) == want.as_str(),
            "{name}: {file} is {got:?}, BuildKit wrote {want}"
        );
    }
    Ok(())
}

fn ran_execs(name: &str, output: &Output) -> Vec<String> {
    let execs = common::corpus_exec_digests(name);
    common::executed(&output.stderr)
        .into_iter()
        .filter(|d| execs.contains(d))
        .collect()
}

/// BuildKit's caches, imported into empty states: no ExecOp runs, the tree is BuildKit's.
fn buildkit_caches_body() -> anyhow::Result<()> {
    for name in FIXTURES {
        let state = tempfile::tempdir()?;
        let out = state.path().join("out");
        let cache = shared_dir().join("conformance/remote-cache").join(name);
        let output = kiln(
            &state.path().join("root"),
            &def(name),
            &[
                "--import-cache".into(),
                format!("type=local,src={}", cache.display()),
                "--output".into(),
                format!("type=local,dest={}", out.display()),
            ],
        )?;
        let ran = ran_execs(name, &output);
        ensure!(
            ran.is_empty(),
            "{name}: steps ran despite the imported cache: {ran:?}"
        );
        check_files(name, &out)?;
    }
    Ok(())
}

/// A cache kiln exports (min and max), imported into a fresh state: no step runs.
fn local_round_trip_body() -> anyhow::Result<()> {
    for (name, mode) in [
        ("df11_many_runs", "max"),
        ("df03_multistage_copy_from", "min"),
    ] {
        let dir = tempfile::tempdir()?;
        let cache = dir.path().join("cache");
        let first = kiln(
            &dir.path().join("a"),
            &def(name),
            &[
                "--export-cache".into(),
                format!("type=local,dest={},mode={mode}", cache.display()),
            ],
        )?;
        ensure!(
            !ran_execs(name, &first).is_empty(),
            "{name}: the first build ran nothing"
        );
        let index: Value = serde_json::from_slice(&std::fs::read(cache.join("index.json"))?)?;
        ensure!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest",
            "{name}: index.json {index}"
        );
        let out = dir.path().join("out");
        let second = kiln(
            &dir.path().join("b"),
            &def(name),
            &[
                "--import-cache".into(),
                format!("type=local,src={}", cache.display()),
                "--output".into(),
                format!("type=local,dest={}", out.display()),
            ],
        )?;
        let ran = ran_execs(name, &second);
        ensure!(
            ran.is_empty(),
            "{name} mode={mode}: steps ran again: {ran:?}"
        );
        check_files(name, &out)?;
        if mode == "max" {
            // The same build, now fully cached, exported again: a cache hit spares loading
            // intermediate results, but a mode=max export still carries every one.
            let again = dir.path().join("again");
            kiln(
                &dir.path().join("a"),
                &def(name),
                &[
                    "--export-cache".into(),
                    format!("type=local,dest={},mode=max", again.display()),
                ],
            )?;
            let (cold, cached) = (records_with_results(&cache)?, records_with_results(&again)?);
            ensure!(
                cached == cold && cold > 1,
                "{name}: the cached build exported {cached} records with results, the cold one {cold}"
            );
        }
    }
    Ok(())
}

/// How many records of the cache exported to the local directory `cache` carry a result.
fn records_with_results(cache: &Path) -> anyhow::Result<usize> {
    let blob = |digest: &Value| -> anyhow::Result<Value> {
        let digest = digest.as_str().context("digest")?;
        let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
        Ok(serde_json::from_slice(&std::fs::read(
            cache.join("blobs/sha256").join(hex),
        )?)?)
    };
    let index: Value = serde_json::from_slice(&std::fs::read(cache.join("index.json"))?)?;
    // BuildKit's layout: an index of the layers whose last entry is the cache config.
    let manifest = blob(&index["manifests"][0]["digest"])?;
    let config = manifest["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|d| d["mediaType"] == "application/vnd.buildkit.cacheconfig.v0")
        })
        .context("no cache config in the cache's index")?;
    let config = blob(&config["digest"])?;
    let records = config["records"].as_array().context("records")?;
    Ok(records
        .iter()
        .filter(|r| {
            let has = |field: &str| r[field].as_array().is_some_and(|a| !a.is_empty());
            has("layers") || has("chains")
        })
        .count())
}

#[test]
fn buildkit_caches_import_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root(), "root") {
        return;
    }
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    buildkit_caches_body().unwrap();
}

#[test]
fn buildkit_caches_import_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    buildkit_caches_body().unwrap();
}

#[test]
fn local_cache_round_trip_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root(), "root") {
        return;
    }
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    local_round_trip_body().unwrap();
}

#[test]
fn local_cache_round_trip_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    local_round_trip_body().unwrap();
}
