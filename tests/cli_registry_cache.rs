//! Sharing work across machines through a registry, as BuildKit does: two kiln states
//! (one rootful, one rootless as the test user) and one registry with TLS (a private CA
//! named in `kiln.toml`) and auth (credentials from `DOCKER_CONFIG`):
//! - df11: machine A builds and exports its cache (`mode=max`); machine B imports it and
//!   runs no step, downloading manifests and configs only;
//! - a Dockerfile build: B runs no step; one file of the context changes and B, with the
//!   cache as A left it, re-runs only the steps below the change; A builds the change and
//!   exports again, and a third machine runs no step;
//! - an inline cache: A pushes an image with its cache in the config; B imports the image
//!   and runs no step;
//! - Bearer tokens from a real token server in front of the registry;
//! - auth and TLS failures name the registry and the reason.
//!
//! Base images come from the shared test registry on 127.0.0.1:5000.

// Test helpers panic with the failing call, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testsupport::machine::{
    Machine, downloaded, executed, give_to_test_user, layer_blobs, stderr, steps_run, uploaded,
    world_dir,
};
use kiln_testsupport::secure_registry::{PASSWORD, USER};
use kiln_testsupport::{
    RegistryAuth, SecureRegistry, is_root, require, shared_dir, test_registry, test_user_ready,
    which,
};
use serde_json::Value;

fn kiln() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kiln"))
}

fn def(name: &str) -> PathBuf {
    shared_dir().join(format!("conformance/defs/{name}.pb"))
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
    executed(output)
        .iter()
        .filter(|(d, _)| execs.contains(d))
        .count()
}

fn prerequisites() -> bool {
    require(
        is_root() && test_user_ready(),
        "root and the test user kiln-test",
    )
}

/// Two machines of `registry`: A rootful, B rootless.
fn machines(dir: &Path, registry: &SecureRegistry) -> (Machine, Machine) {
    let toml = registry.kiln_toml();
    let docker = registry.docker_config(USER, PASSWORD);
    (
        Machine::new(kiln(), dir, "a", &toml, &docker, false),
        Machine::new(kiln(), dir, "b", &toml, &docker, true),
    )
}

#[test]
fn two_machines_share_work_through_a_tls_registry_with_auth() {
    if !prerequisites() {
        return;
    }
    let Some(_base) = test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let (a, b) = machines(dir.path(), &registry);
    let name = "df11_many_runs";
    let cache_ref = format!("{}/team/cache:df11", registry.host());
    let exported = a.build(
        &[
            "--export-cache".into(),
            format!("type=registry,ref={cache_ref},mode=max"),
        ],
        Some(&def(name)),
    );
    assert!(exported.status.success(), "A: {}", stderr(&exported));
    assert_eq!(exec_count(name, &exported), 50, "A runs every step once");
    // For the note: a warm local build on A (reported, not asserted: no timed checks).
    let started = std::time::Instant::now();
    let warm = a.build(&[], Some(&def(name)));
    let warm_time = started.elapsed();
    assert!(warm.status.success(), "A warm: {}", stderr(&warm));
    assert_eq!(exec_count(name, &warm), 0);

    // Machine B: another state, rootless, same registry.
    let import = [
        "--import-cache".to_owned(),
        format!("type=registry,ref={cache_ref}"),
    ];
    let started = std::time::Instant::now();
    let imported = b.build(&import, Some(&def(name)));
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
    let mut args = import.to_vec();
    args.extend([
        "--output".to_owned(),
        format!("type=local,dest={}", out.display()),
    ]);
    let with_output = b.build(&args, Some(&def(name)));
    assert!(with_output.status.success(), "B: {}", stderr(&with_output));
    assert_eq!(exec_count(name, &with_output), 0);
    let log = std::fs::read_to_string(out.join("log")).unwrap();
    assert_eq!(log.lines().count(), 50, "{log}");
}

const DOCKERFILE: &str = "FROM localhost:5000/busybox
RUN echo one > /one
COPY a.txt /a.txt
RUN cat /one /a.txt > /a.copy
COPY b.txt /b.txt
RUN cat /a.copy /b.txt > /both
";

/// A build context with `DOCKERFILE`, `a.txt` and `b.txt`.
fn context(dir: &Path, b: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    std::fs::write(dir.join("b.txt"), b).unwrap();
    dir.to_owned()
}

#[test]
fn two_machines_share_a_dockerfile_build_and_rerun_only_what_changed() {
    if !prerequisites() {
        return;
    }
    let Some(_base) = test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let (a, b) = machines(dir.path(), &registry);
    // Each machine has its own checkout, owned by its build user (file owners are part of
    // the context's content hash, as in BuildKit).
    let ctx_a = context(&dir.path().join("ctx-a"), "b one\n");
    let ctx_b = context(&dir.path().join("ctx-b"), "b one\n");
    give_to_test_user(&ctx_b);
    let cache = format!("{}/team/cache:dockerfile", registry.host());
    let export = |ctx: &Path| {
        vec![
            ctx.display().to_string(),
            "--export-cache".to_owned(),
            format!("type=registry,ref={cache},mode=max"),
        ]
    };
    let import = |ctx: &Path| {
        vec![
            ctx.display().to_string(),
            "--import-cache".to_owned(),
            format!("type=registry,ref={cache}"),
        ]
    };
    // Sorted, as `steps_run` gives them.
    let every_step = [
        "COPY a.txt /a.txt",
        "COPY b.txt /b.txt",
        "RUN cat /a.copy /b.txt > /both",
        "RUN cat /one /a.txt > /a.copy",
        "RUN echo one > /one",
    ];

    let first = a.build(&export(&ctx_a), None);
    assert!(first.status.success(), "A: {}", stderr(&first));
    assert_eq!(steps_run(&first), every_step);
    let shared = b.build(&import(&ctx_b), None);
    assert!(shared.status.success(), "B: {}", stderr(&shared));
    assert_eq!(steps_run(&shared), Vec::<String>::new(), "B runs no step");
    assert_eq!(layer_blobs(&b.root), 0, "B downloaded a layer");

    // b.txt changes (both checkouts get the change). B builds it with the cache as A
    // left it: only the steps below the change run.
    for ctx in [&ctx_a, &ctx_b] {
        std::fs::write(ctx.join("b.txt"), "b two\n").unwrap();
    }
    let below = ["COPY b.txt /b.txt", "RUN cat /a.copy /b.txt > /both"];
    let out = dir.path().join("out");
    let with_output = |ctx: &Path, out: &Path| {
        let mut args = import(ctx);
        args.extend([
            "--output".to_owned(),
            format!("type=local,dest={}", out.display()),
        ]);
        args
    };
    let rerun = b.build(&with_output(&ctx_b, &out), None);
    assert!(rerun.status.success(), "B: {}", stderr(&rerun));
    assert_eq!(steps_run(&rerun), below, "B re-runs only below the change");
    assert_eq!(
        std::fs::read_to_string(out.join("both")).unwrap(),
        "one\na\nb two\n"
    );

    // A builds the change too (the same two steps, from its own state) and exports
    // again: a third machine, fresh and rootless, then runs nothing.
    let second = a.build(&export(&ctx_a), None);
    assert!(second.status.success(), "A: {}", stderr(&second));
    assert_eq!(steps_run(&second), below);
    let c = Machine::new(
        kiln(),
        dir.path(),
        "c",
        &registry.kiln_toml(),
        &registry.docker_config(USER, PASSWORD),
        true,
    );
    let out_c = dir.path().join("out-c");
    let fresh = c.build(&with_output(&ctx_b, &out_c), None);
    assert!(fresh.status.success(), "C: {}", stderr(&fresh));
    assert_eq!(steps_run(&fresh), Vec::<String>::new(), "C runs no step");
    assert_eq!(
        std::fs::read_to_string(out_c.join("both")).unwrap(),
        "one\na\nb two\n"
    );
}

#[test]
fn an_inline_cache_travels_in_the_pushed_image() {
    if !prerequisites() || !require(which("skopeo"), "skopeo") {
        return;
    }
    let Some(_base) = test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start() else {
        return;
    };
    let dir = world_dir();
    let (a, b) = machines(dir.path(), &registry);
    let ctx_a = context(&dir.path().join("ctx-a"), "b\n");
    let ctx_b = context(&dir.path().join("ctx-b"), "b\n");
    give_to_test_user(&ctx_b);
    let image = format!("{}/team/app:inline", registry.host());
    let pushed = a.build(
        &[
            ctx_a.display().to_string(),
            "--output".into(),
            format!("type=image,name={image},push=true"),
            "--export-cache".into(),
            "type=inline".into(),
        ],
        None,
    );
    assert!(pushed.status.success(), "A: {}", stderr(&pushed));
    let config = skopeo(&registry, &["inspect", "--config", "--raw"], &image);
    assert!(
        config["moby.buildkit.cache.v0"].is_string(),
        "no inline cache in {config}"
    );

    // B imports the image as a cache: no step runs, no layer comes down; pushing the
    // result to another repository of the registry mounts every layer from the image's.
    let again = format!("{}/team/copy:1", registry.host());
    let imported = b.build(
        &[
            ctx_b.display().to_string(),
            "--import-cache".into(),
            format!("type=registry,ref={image}"),
            "--output".into(),
            format!("type=image,name={again},push=true"),
        ],
        None,
    );
    assert!(imported.status.success(), "B: {}", stderr(&imported));
    assert_eq!(steps_run(&imported), Vec::<String>::new(), "B runs no step");
    assert_eq!(layer_blobs(&b.root), 0, "B downloaded a layer");
    let (_, bytes_up) = uploaded(&imported);
    let (_, bytes_down) = downloaded(&imported);
    assert!(
        bytes_up < 16 << 10 && bytes_down < 16 << 10,
        "config and manifest only: {bytes_down} bytes down, {bytes_up} up"
    );
    let first = skopeo(&registry, &["inspect"], &image);
    let second = skopeo(&registry, &["inspect"], &again);
    assert_eq!(first["Layers"], second["Layers"], "the same layer blobs");
    let layers = first["Layers"].as_array().map_or(0, Vec::len);
    let report = stderr(&imported);
    assert!(
        report.contains(&format!("0 layers present, {layers} mounted, 0 uploaded")),
        "every layer mounted: {report}"
    );
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

#[test]
fn bearer_tokens_from_a_token_server() {
    if !prerequisites() || !require(which("skopeo"), "skopeo") {
        return;
    }
    let Some(_base) = test_registry() else {
        return;
    };
    let Some(registry) = SecureRegistry::start_with(RegistryAuth::Token) else {
        return;
    };
    let tokens = registry.token_server().unwrap();
    let dir = world_dir();
    let (a, b) = machines(dir.path(), &registry);
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM localhost:5000/busybox\nRUN echo token > /token\n",
    )
    .unwrap();
    let image = format!("{}/team/tokens:1", registry.host());
    let pushed = a.build(
        &[
            ctx.display().to_string(),
            "--output".into(),
            format!("type=image,name={image},push=true"),
        ],
        None,
    );
    assert!(pushed.status.success(), "A: {}", stderr(&pushed));
    let issued = tokens.issued();
    assert!(issued > 0, "no token was asked for");
    // The reference client reads what kiln pushed through the same token flow.
    let info = skopeo(&registry, &["inspect"], &image);
    assert_eq!(info["Layers"].as_array().map(Vec::len), Some(2), "{info}");

    // B (rootless, fresh) pulls it as a base image through tokens.
    let ctx_b = dir.path().join("ctx-b");
    std::fs::create_dir_all(&ctx_b).unwrap();
    std::fs::write(
        ctx_b.join("Dockerfile"),
        format!("FROM {image}\nRUN cat /token > /again\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let pulled = b.build(
        &[
            ctx_b.display().to_string(),
            "--output".into(),
            format!("type=local,dest={}", out.display()),
        ],
        None,
    );
    assert!(pulled.status.success(), "B: {}", stderr(&pulled));
    assert_eq!(
        std::fs::read_to_string(out.join("again")).unwrap(),
        "token\n"
    );
    assert!(tokens.issued() > issued, "B asked for no token");

    // Wrong or missing credentials: the token server refuses, kiln says so.
    let refused = tokens.refused();
    for (what, docker) in [
        ("wrong password", registry.docker_config(USER, "nope")),
        ("no credentials", "{}".to_owned()),
    ] {
        let m = Machine::new(
            kiln(),
            dir.path(),
            &format!("bad-{}", what.replace(' ', "-")),
            &registry.kiln_toml(),
            &docker,
            false,
        );
        let failed = m.build(
            &[
                ctx_b.display().to_string(),
                "--output".into(),
                format!("type=local,dest={}", dir.path().join("nope").display()),
            ],
            None,
        );
        assert!(!failed.status.success(), "{what}: succeeded");
        let err = stderr(&failed);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains(&registry.host())
                && last.contains("401 unauthorized")
                && last.contains("token server refused"),
            "{what}: {last}"
        );
    }
    assert!(tokens.refused() >= refused + 2);
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
        let m = Machine::new(
            kiln(),
            dir.path(),
            &format!("case{i}"),
            &toml,
            &docker,
            false,
        );
        let out = m.build(&import, Some(&def("df01_run_plain")));
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
