//! BuildKit's Dockerfile vectors (../shared/conformance/dockerfile) built with `kiln build
//! --frontend dockerfile.v0` exactly as buildctl was called to make them: every `f*` case's
//! exported tree equals the tree BuildKit exported (rootless: without owners) and its
//! exported image config carries the frontend's config and history; every `e*` case fails
//! with BuildKit's error before anything runs. Also the docker spelling (`kiln build DIR`)
//! and `kiln debug dockerfile2llb`. As root and as the unprivileged test user, against a
//! real registry on 127.0.0.1:5000.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user, shared_dir};
use serde_json::Value;
use sha2::Digest as _;

fn vectors() -> PathBuf {
    shared_dir().join("conformance/dockerfile")
}

fn cases(prefix: char) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(vectors())
        .expect("dockerfile vectors")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.join("Dockerfile").is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    out.sort();
    out
}

fn kiln(root: &Path, args: &[String], stdin: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("--root").arg(root).args(args);
    cmd.stdin(match stdin {
        Some(p) => Stdio::from(std::fs::File::open(p).expect("stdin file")),
        None => Stdio::null(),
    });
    cmd.output().expect("run kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The build context as the vectors were made with it: the shared copy is read-only, so
/// it is copied with the modes BuildKit saw (files 0644, directories 0755).
fn writable_context(work: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("context dir");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for entry in std::fs::read_dir(from).expect("read context").flatten() {
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy context file");
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
    }
    let dir = work.join("context");
    copy(&vectors().join("context"), &dir);
    dir
}

/// The frontend options of a case (`opts.json`: target, build_args, labels).
fn case_opts(case: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(case.join("opts.json")) else {
        return Vec::new();
    };
    let opts: Value = serde_json::from_slice(&bytes).expect("opts.json");
    let mut out = Vec::new();
    if let Some(t) = opts["target"].as_str() {
        out.push(format!("target={t}"));
    }
    for (key, prefix) in [("build_args", "build-arg:"), ("labels", "label:")] {
        for (k, v) in opts[key].as_object().into_iter().flatten() {
            out.push(format!("{prefix}{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    out.into_iter()
        .flat_map(|o| ["--opt".to_owned(), o])
        .collect()
}

fn build_args(case: &Path, context: &Path, out: &Path, image: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "build",
        "--progress",
        "plain",
        "--frontend",
        "dockerfile.v0",
        "--allow",
        "network.host",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend([
        "--local".to_owned(),
        format!("context={}", context.display()),
        "--local".to_owned(),
        format!("dockerfile={}", case.display()),
        "--secret".to_owned(),
        format!("id=tok,src={}", vectors().join("secret.txt").display()),
        "--output".to_owned(),
        format!("type=local,dest={}", out.display()),
        "--output".to_owned(),
        format!("type=oci,dest={},name=kiln.test/df:1", image.display()),
    ]);
    args.extend(case_opts(case));
    args
}

/// One line per path in BuildKit's manifest format: `path type mode uid:gid` plus the
/// first 16 hex digits of a file's sha256 or `-> target` of a symlink.
fn manifest(root: &Path, owners: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read export").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let rel = format!("/{}", path.strip_prefix(root).expect("below").display());
            let owner = if owners {
                format!(" {}:{}", meta.uid(), meta.gid())
            } else {
                String::new()
            };
            let mode = meta.mode() & 0o7777;
            let ft = meta.file_type();
            let line = if ft.is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                format!("{rel} l {mode:o}{owner} -> {}", target.display())
            } else if ft.is_dir() {
                stack.push(path.clone());
                format!("{rel} d {mode:o}{owner}")
            } else {
                let mut data = Vec::new();
                std::fs::File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut data))
                    .expect("read file");
                let hash = hex::encode(sha2::Sha256::digest(&data));
                format!("{rel} f {mode:o}{owner} {}", &hash[..16])
            };
            out.insert(line);
        }
    }
    out
}

/// BuildKit's manifest of a case, with owners dropped for rootless comparison and the
/// contents the vectors mark as host-dependent (`-`) left out.
fn expected_manifest(case: &Path, owners: bool) -> (BTreeSet<String>, HashSet<String>) {
    let text = std::fs::read_to_string(case.join("expect.manifest")).expect("expect.manifest");
    let mut lines = BTreeSet::new();
    let mut host_dependent = HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut fields: Vec<&str> = line.split(' ').collect();
        if !owners && fields.len() > 3 {
            fields.remove(3);
        }
        if fields.last() == Some(&"-") {
            host_dependent.insert(fields[0].to_owned());
            continue;
        }
        lines.insert(fields.join(" "));
    }
    (lines, host_dependent)
}

/// The image config inside an OCI archive kiln wrote.
fn archive_config(archive: &Path) -> Value {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).expect("open archive"));
    for entry in tar.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read entry");
        blobs.insert(name, data);
    }
    let blob = |digest: &str| -> Value {
        let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        serde_json::from_slice(blobs.get(&name).expect("blob in archive")).expect("json blob")
    };
    let index: Value = serde_json::from_slice(&blobs["index.json"]).expect("index.json");
    let manifest = blob(index["manifests"][0]["digest"].as_str().expect("manifest"));
    blob(manifest["config"]["digest"].as_str().expect("config"))
}

fn check_case(
    case: &Path,
    state: &Path,
    work: &Path,
    context: &Path,
    rootless: bool,
) -> Result<(), String> {
    let name = case
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let out = work.join(format!("{name}-out"));
    let image = work.join(format!("{name}.tar"));
    let built = kiln(state, &build_args(case, context, &out, &image), None);
    if !built.status.success() {
        return Err(format!("build failed: {}", stderr(&built)));
    }
    let (want, host_dependent) = expected_manifest(case, !rootless);
    let got: BTreeSet<String> = manifest(&out, !rootless)
        .into_iter()
        .filter(|l| !host_dependent.contains(l.split(' ').next().unwrap_or_default()))
        .collect();
    if got != want {
        let missing: Vec<_> = want.difference(&got).take(10).collect();
        let extra: Vec<_> = got.difference(&want).take(10).collect();
        return Err(format!(
            "tree differs: missing {missing:#?}, unexpected {extra:#?}"
        ));
    }
    let reference: Value = serde_json::from_slice(
        &std::fs::read(case.join("ref.image.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let config = archive_config(&image);
    if config["config"] != reference["config"] {
        return Err(format!(
            "image config differs: {} vs {}",
            config["config"], reference["config"]
        ));
    }
    let created_by = |v: &Value| -> Vec<String> {
        v["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| h["created_by"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    if created_by(&config) != created_by(&reference) {
        return Err(format!(
            "history differs: {:?} vs {:?}",
            created_by(&config),
            created_by(&reference)
        ));
    }
    let layers = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
    let claimed = config["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["empty_layer"] != true)
        .count();
    if layers != claimed {
        return Err(format!(
            "{layers} layers but {claimed} history entries claim one"
        ));
    }
    Ok(())
}

fn check_error_case(case: &Path, state: &Path, work: &Path, context: &Path) -> Result<(), String> {
    let name = case
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let out = work.join(format!("{name}-out"));
    let image = work.join(format!("{name}.tar"));
    let built = kiln(state, &build_args(case, context, &out, &image), None);
    let want = std::fs::read_to_string(case.join("expect.error")).expect("expect.error");
    let err = stderr(&built);
    if built.status.success() {
        return Err("built, but BuildKit failed".to_owned());
    }
    if !err.contains(want.trim()) {
        return Err(format!("error {err:?} does not contain {:?}", want.trim()));
    }
    if err.lines().count() != 1 || !err.starts_with("error: failed to solve: ") {
        return Err(format!("not one `error: failed to solve: …` line: {err:?}"));
    }
    if out.exists() {
        return Err("an output was written".to_owned());
    }
    Ok(())
}

fn run_vectors(rootless: bool) {
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let state = work.path().join("state");
    let context = writable_context(work.path());
    let mut failures = BTreeMap::new();
    let (mut passed, mut total) = (0, 0);
    for case in cases('f') {
        total += 1;
        match check_case(&case, &state, work.path(), &context, rootless) {
            Ok(()) => passed += 1,
            Err(e) => {
                failures.insert(case.display().to_string(), e);
            }
        }
    }
    for case in cases('e') {
        total += 1;
        match check_error_case(&case, &state, work.path(), &context) {
            Ok(()) => passed += 1,
            Err(e) => {
                failures.insert(case.display().to_string(), e);
            }
        }
    }
    let mode = if rootless { "rootless" } else { "rootful" };
    eprintln!("dockerfile vectors {mode}: {passed}/{total} pass");
    assert!(total >= 22, "vectors missing: {total}");
    assert!(failures.is_empty(), "{mode} failures: {failures:#?}");
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn dockerfile_vectors_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root(), "root") {
        return;
    }
    run_vectors(false);
}

#[test]
fn dockerfile_vectors_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    run_vectors(true);
}

/// The op digests of a marshaled Definition, and whether it has a `local://` source (whose
/// random `local.unique` makes every digest below it differ between conversions).
fn digests(def: &[u8]) -> (BTreeSet<String>, bool) {
    let def = kiln_proto::decode_definition(def).expect("decode");
    let ops = kiln_proto::decode_ops(&def).expect("ops");
    let local = ops.iter().any(|o| {
        matches!(&o.op.op, Some(kiln_proto::pb::op::Op::Source(s)) if s.identifier.starts_with("local://"))
    });
    (
        ops.iter().map(|o| o.digest.as_str().to_owned()).collect(),
        local,
    )
}

/// `kiln debug dockerfile2llb` writes BuildKit's Definition (same op digests) and image
/// config for every case whose graph does not hang off the build context, and a
/// Definition `kiln debug dump-llb` reads for every case.
#[test]
fn dockerfile2llb_matches_buildkit() {
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    let state = tempfile::tempdir().expect("state");
    let mut exact = 0;
    for case in cases('f') {
        let mut args: Vec<String> = ["debug", "dockerfile2llb"].map(str::to_owned).to_vec();
        let image_config = state.path().join("image.json");
        args.extend([
            "--image-config".to_owned(),
            image_config.display().to_string(),
        ]);
        let opts = case_opts(&case);
        for pair in opts.chunks(2) {
            let (k, v) = pair[1].split_once('=').expect("opt");
            match k {
                "target" => args.extend(["--target".to_owned(), v.to_owned()]),
                _ => {
                    let (kind, name) = k.split_once(':').expect("prefixed opt");
                    args.extend([format!("--{kind}"), format!("{name}={v}")]);
                }
            }
        }
        let out = kiln(state.path(), &args, Some(&case.join("Dockerfile")));
        assert!(out.status.success(), "{}: {}", case.display(), stderr(&out));
        let (ours, local) = digests(&out.stdout);
        let (theirs, _) = digests(&std::fs::read(case.join("ref.pb")).expect("ref.pb"));
        if !local {
            assert_eq!(ours, theirs, "{}: op digests differ", case.display());
            exact += 1;
        } else {
            assert_eq!(ours.len(), theirs.len(), "{}: op count", case.display());
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(&image_config).expect("image config"))
                .expect("image config json");
        let reference: Value =
            serde_json::from_slice(&std::fs::read(case.join("ref.image.json")).expect("ref"))
                .expect("ref json");
        assert_eq!(config, reference, "{}: image config", case.display());
        let def = state.path().join("def.pb");
        std::fs::write(&def, &out.stdout).expect("write def");
        let dump = kiln(
            state.path(),
            &["debug".into(), "dump-llb".into()],
            Some(&def),
        );
        assert!(dump.status.success(), "dump-llb: {}", stderr(&dump));
    }
    assert!(exact >= 8, "only {exact} cases compared exactly");
}

/// docker's spelling: `kiln build DIR -f NAME --target T --build-arg K=V --label K=V` is the
/// buildctl build with context = dockerfile = DIR; the image config carries the label.
fn docker_habit(rootless: bool) {
    let _ = rootless;
    let work = tempfile::tempdir().expect("work");
    let dir = work.path().join("app");
    std::fs::create_dir_all(dir.join("src")).expect("context");
    std::fs::write(dir.join("src/main.txt"), "main\n").expect("file");
    std::fs::write(dir.join("notes.tmp"), "ignored\n").expect("file");
    std::fs::write(dir.join(".dockerignore"), "*.tmp\n").expect("ignore");
    std::fs::write(
        dir.join("Build.dockerfile"),
        "ARG BASE=localhost:5000/busybox:latest\n\
         FROM ${BASE} AS build\n\
         ARG GREETING=hello\n\
         WORKDIR /work\n\
         COPY . .\n\
         RUN ls -A > /listing && echo \"$GREETING from $(cat src/main.txt)\" > out.txt\n\
         \n\
         FROM scratch AS final\n\
         COPY --from=build /work/out.txt /listing /\n\
         \n\
         FROM build AS debug\n\
         RUN touch /debug-only\n",
    )
    .expect("dockerfile");
    let out = work.path().join("out");
    let image = work.path().join("image.tar");
    let args: Vec<String> = [
        "build",
        &dir.display().to_string(),
        "-f",
        "Build.dockerfile",
        "--target",
        "final",
        "--build-arg",
        "GREETING=hi",
        "--label",
        "org.example.team=build",
        "--progress",
        "plain",
        "-o",
        &format!("type=local,dest={}", out.display()),
        "-o",
        &format!("type=oci,dest={},name=kiln.test/app:1", image.display()),
    ]
    .map(str::to_owned)
    .to_vec();
    let built = kiln(&work.path().join("state"), &args, None);
    assert!(
        built.status.success(),
        "docker habit build: {}",
        stderr(&built)
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["listing", "out.txt"],
        "only the final stage's files"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("out.txt")).expect("out.txt"),
        "hi from main\n"
    );
    // .dockerignore kept notes.tmp out of the context; the Dockerfile itself is in it.
    assert_eq!(
        std::fs::read_to_string(out.join("listing")).expect("listing"),
        ".dockerignore\nBuild.dockerfile\nsrc\n"
    );
    let config = archive_config(&image);
    assert_eq!(config["config"]["Labels"]["org.example.team"], "build");
    // Vertex names read like BuildKit's progress.
    let err = stderr(&built);
    assert!(err.contains("[build 4/4] RUN ls -A"), "progress: {err}");
    assert!(
        err.contains("[final 1/1] COPY --from=build"),
        "progress: {err}"
    );
    assert!(
        !err.contains("touch /debug-only"),
        "an unused stage was built: {err}"
    );
}

#[test]
fn docker_habit_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root(), "root") {
        return;
    }
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    docker_habit(false);
}

#[test]
fn docker_habit_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    docker_habit(true);
}

/// The README's main job: examples/Dockerfile on the context `scripts/example-rootfs`
/// makes, cold then warm (all cached), then with `--no-cache` (a fresh cache mount, as
/// BuildKit prunes the cache mounts of steps that ignore the cache).
fn example_job() {
    let work = tempfile::tempdir().expect("work");
    let repo = kiln_testsupport::workspace_root();
    let context = work.path().join("context");
    let made = Command::new(repo.join("scripts/example-rootfs"))
        .arg(work.path().join("rootfs"))
        .arg(&context)
        .output()
        .expect("scripts/example-rootfs");
    assert!(made.status.success(), "example-rootfs: {}", stderr(&made));
    let state = work.path().join("state");
    let out = work.path().join("out");
    let build = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "build".into(),
            "--frontend".into(),
            "dockerfile.v0".into(),
            "--local".into(),
            format!("context={}", context.display()),
            "--local".into(),
            format!("dockerfile={}", repo.join("examples").display()),
            "--progress".into(),
            "plain".into(),
            "--output".into(),
            format!("type=local,dest={}", out.display()),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let o = kiln(&state, &args, None);
        assert!(o.status.success(), "example build: {}", stderr(&o));
        stderr(&o)
    };
    let cold = build(&[]);
    assert!(cold.contains("[build 1/2] RUN echo"), "{cold}");
    assert_eq!(
        std::fs::read_to_string(out.join("hello")).expect("hello"),
        "hello from kiln, running as root on buildkitsandbox\n"
    );
    let warm = build(&[]);
    // Only the build context is read again (it is bound to the build's session).
    let mut names = BTreeMap::new();
    for line in warm.lines() {
        if let Some((number, rest)) = line.split_once(' ') {
            if rest.starts_with('[') {
                names.insert(number.to_owned(), rest.to_owned());
            } else if rest.starts_with("DONE") {
                let name = names.get(number).cloned().unwrap_or_default();
                assert!(
                    name.starts_with("[internal]"),
                    "a warm build ran {name}: {warm}"
                );
            }
        }
    }
    build(&["--no-cache"]);
    assert_eq!(
        std::fs::read_to_string(out.join("runs-seen-by-cache")).expect("runs"),
        "1\n"
    );
}

#[test]
fn example_job_rootful() {
    if !require(is_root(), "root") {
        return;
    }
    example_job();
}

#[test]
fn example_job_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    example_job();
}
