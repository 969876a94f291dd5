//! Sharing work across machines through a registry, as BuildKit does: two kiln states
//! (one rootful, one rootless as the test user) and one registry with TLS (a private CA
//! named in `kiln.toml`) and htpasswd auth (credentials from `DOCKER_CONFIG`). Machine A
//! builds and exports its cache (`mode=max`); machine B imports it and runs no step,
//! downloading manifests and configs only. Auth and TLS fail as they should, naming the
//! registry and the reason.

// Test helpers panic with the failing call, as the tests themselves do.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testsupport::secure_registry::{PASSWORD, USER};
use kiln_testsupport::{SecureRegistry, is_root, require, shared_dir, test_user_ready};
use serde_json::Value;

const TEST_USER: &str = "kiln-test";

fn def(name: &str) -> PathBuf {
    shared_dir().join(format!("conformance/defs/{name}.pb"))
}

struct Machine<'a> {
    root: PathBuf,
    config: PathBuf,
    docker_config: PathBuf,
    as_test_user: bool,
    registry: &'a SecureRegistry,
}

impl Machine<'_> {
    fn build(&self, name: &str, args: &[String]) -> Output {
        let kiln = env!("CARGO_BIN_EXE_kiln");
        let mut command = if self.as_test_user {
            let mut c = Command::new("runuser");
            c.args(["-u", TEST_USER, "--", "env", "HOME=/home/kiln-test"]);
            c.arg(kiln);
            c
        } else {
            Command::new(kiln)
        };
        command
            .env("DOCKER_CONFIG", &self.docker_config)
            .arg("--debug")
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .args(["build", "--progress", "rawjson"])
            .args(args)
            .current_dir("/tmp")
            .stdin(Stdio::from(
                std::fs::File::open(def(name)).expect("definition"),
            ));
        let _ = self.registry;
        command.output().expect("run kiln")
    }
}

fn exec_count(name: &str, output: &Output) -> usize {
    let path = shared_dir().join(format!("conformance/defs/{name}.llbref.json"));
    let llbref: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let execs: HashSet<String> = llbref["ops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|op| op["type"] == "exec")
        .filter_map(|op| op["digest"].as_str().map(str::to_owned))
        .collect();
    common::executed(&output.stderr)
        .iter()
        .filter(|d| execs.contains(*d))
        .count()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `(bodies, bytes)` kiln says it downloaded from registries (`--debug`).
fn downloaded(o: &Output) -> (u64, u64) {
    let text = stderr(o);
    let line = text
        .lines()
        .find(|l| l.contains("bodies downloaded"))
        .unwrap_or_else(|| panic!("no download figure in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "bodies").unwrap();
    let bodies = words[at - 1].parse().unwrap();
    let bytes = words[at + 2].parse().unwrap();
    (bodies, bytes)
}

/// Blobs in a state's content store that are gzip data (layers).
fn layer_blobs(root: &Path) -> usize {
    let dir = root.join("content/blobs/sha256");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read(e.path())
                        .map(|b| b.starts_with(&[0x1f, 0x8b]))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn world_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn files(dir: &Path, kiln_toml: &str, docker_config: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let config = dir.join("kiln.toml");
    std::fs::write(&config, kiln_toml).unwrap();
    let dc = dir.join("docker");
    std::fs::create_dir_all(&dc).unwrap();
    std::fs::write(dc.join("config.json"), docker_config).unwrap();
    for p in [&config, &dc.join("config.json")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&dc, std::fs::Permissions::from_mode(0o755)).unwrap();
    (config, dc)
}

#[test]
fn two_machines_share_work_through_a_tls_registry_with_auth() {
    if !require(
        is_root() && test_user_ready(),
        "root and the test user kiln-test",
    ) {
        return;
    }
    let Some(_base) = kiln_testsupport::test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let (config, docker) = files(
        dir.path(),
        &registry.kiln_toml(),
        &registry.docker_config(USER, PASSWORD),
    );
    let name = "df11_many_runs";
    let cache_ref = format!("{}/team/cache:df11", registry.host());
    let a = Machine {
        root: dir.path().join("a"),
        config: config.clone(),
        docker_config: docker.clone(),
        as_test_user: false,
        registry: &registry,
    };
    let exported = a.build(
        name,
        &[
            "--export-cache".into(),
            format!("type=registry,ref={cache_ref},mode=max"),
        ],
    );
    assert!(exported.status.success(), "A: {}", stderr(&exported));
    assert_eq!(exec_count(name, &exported), 50, "A runs every step once");
    // For the note: a warm local build on A (reported, not asserted: no timed checks).
    let started = std::time::Instant::now();
    let warm = a.build(name, &[]);
    let warm_time = started.elapsed();
    assert!(warm.status.success(), "A warm: {}", stderr(&warm));
    assert_eq!(exec_count(name, &warm), 0);

    // Machine B: another state, rootless, same registry.
    let b = Machine {
        root: dir.path().join("b"),
        config,
        docker_config: docker,
        as_test_user: true,
        registry: &registry,
    };
    let started = std::time::Instant::now();
    let imported = b.build(
        name,
        &[
            "--import-cache".into(),
            format!("type=registry,ref={cache_ref}"),
        ],
    );
    let import_time = started.elapsed();
    assert!(imported.status.success(), "B: {}", stderr(&imported));
    assert_eq!(
        exec_count(name, &imported),
        0,
        "B runs no step: {}",
        stderr(&imported)
    );
    let (bodies, bytes) = downloaded(&imported);
    eprintln!(
        "fully cached df11 from the registry cache: {bodies} bodies, {bytes} bytes downloaded, \
         {import_time:?} (warm local build: {warm_time:?})"
    );
    assert_eq!(layer_blobs(&b.root), 0, "B downloaded a layer");
    assert!(
        bodies <= 4,
        "B downloaded {bodies} bodies (manifests and configs only)"
    );

    // B exports its files now: the layers come down, and the tree is A's.
    let out = dir.path().join("out");
    let with_output = b.build(
        name,
        &[
            "--import-cache".into(),
            format!("type=registry,ref={cache_ref}"),
            "--output".into(),
            format!("type=local,dest={}", out.display()),
        ],
    );
    assert!(with_output.status.success(), "B: {}", stderr(&with_output));
    assert_eq!(exec_count(name, &with_output), 0);
    let log = std::fs::read_to_string(out.join("log")).unwrap();
    assert_eq!(log.lines().count(), 50, "{log}");
}

#[test]
fn registry_auth_and_tls_fail_naming_the_registry_and_the_reason() {
    if !require(is_root(), "root") {
        return;
    }
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let cache_ref = format!("{}/team/cache:none", registry.host());
    let host = registry.host();
    let import = [
        "--import-cache".to_owned(),
        format!("type=registry,ref={cache_ref}"),
    ];
    let cases: [(&str, String, String, &str); 4] = [
        // Right CA, wrong password: the registry says 401.
        (
            "wrong password",
            registry.kiln_toml(),
            registry.docker_config(USER, "nope"),
            "401 unauthorized",
        ),
        // No credentials at all.
        (
            "no credentials",
            registry.kiln_toml(),
            "{}".to_owned(),
            "401 unauthorized",
        ),
        // The CA is not trusted: a TLS error.
        (
            "unknown CA",
            format!("[registry.\"{host}\"]\nhttp = false\n"),
            registry.docker_config(USER, PASSWORD),
            "TLS",
        ),
        // Right CA and credentials: the reference does not exist.
        (
            "missing cache",
            registry.kiln_toml(),
            registry.docker_config(USER, PASSWORD),
            "not found",
        ),
    ];
    for (i, (what, toml, docker, want)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let (config, dc) = files(&sub, &toml, &docker);
        let m = Machine {
            root: sub.join("root"),
            config,
            docker_config: dc,
            as_test_user: false,
            registry: &registry,
        };
        let out = m.build("df01_run_plain", &import);
        let err = stderr(&out);
        assert!(!out.status.success(), "{what}: succeeded");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains(&host),
            "{what}: error does not name {host}: {last}"
        );
        assert!(
            last.contains(want),
            "{what}: error does not say {want:?}: {last}"
        );
    }
}
