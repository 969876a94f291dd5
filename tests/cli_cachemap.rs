//! `kiln debug cachemap` driven as a user would: every exec and file CacheMap of the
//! shared corpus as BuildKit computed it, `--explain`, `--diff`, and errors.

use std::process::{Command, Output};

use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount};
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb;
use kiln_testsupport::{conformance_defs, shared_dir};
use serde_json::Value;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn lines(output: &Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn cachemap_matches_every_exec_and_file_op_of_the_corpus() {
    let (mut execs, mut files, mut deps) = (0, 0, 0);
    for (name, path) in conformance_defs() {
        let reference: Value = serde_json::from_slice(
            &std::fs::read(shared_dir().join(format!("conformance/defs/{name}.llbref.json")))
                .expect("read llbref"),
        )
        .expect("parse llbref");
        let ops = reference["ops"].as_array().expect("ops");
        let out = lines(&kiln(&[
            "debug",
            "cachemap",
            "--explain",
            path.to_str().expect("utf-8 path"),
        ]));
        assert_eq!(out.len(), ops.len(), "{name}: one line per op");
        for (line, op) in out.iter().zip(ops) {
            let ctx = format!("{name} {}", op["digest"]);
            assert_eq!(line["digest"], op["digest"], "{ctx}");
            if let Some(want) = op.get("exec_cache_map") {
                let cm = &line["cache_map"];
                assert_eq!(cm["digest"], want["digest"], "{ctx}: digest");
                assert_eq!(cm["json"], want["json"], "{ctx}: hashed JSON");
                let got_deps = cm["deps"].as_array().expect("deps");
                let want_deps = want["deps"].as_array().expect("deps");
                assert_eq!(got_deps.len(), want_deps.len(), "{ctx}");
                for (got, want) in got_deps.iter().zip(want_deps) {
                    assert_eq!(got["selector"], want["selector_digest"], "{ctx}");
                    assert_eq!(
                        got["content_based"], want["has_compute_digest_func"],
                        "{ctx}"
                    );
                    deps += 1;
                }
                execs += 1;
            } else if let Some(want) = op.get("file_cache_map_digest") {
                assert_eq!(line["cache_map"]["digest"], *want, "{ctx}: file digest");
                files += 1;
            } else {
                // Registry images and the terminal op have no offline CacheMap.
                assert_eq!(line["cache_map"], Value::Null, "{ctx}");
            }
        }
    }
    assert_eq!((execs, files), (138, 7));
    assert!(deps >= execs);
}

#[test]
fn without_explain_there_is_no_json_and_stdin_works() {
    let path = shared_dir().join("conformance/defs/df01_run_plain.pb");
    let bytes = std::fs::read(&path).expect("read");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["debug", "cachemap"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &bytes).expect("write");
    let out = lines(&child.wait_with_output().expect("wait"));
    let exec = out
        .iter()
        .find(|l| l["type"] == "exec")
        .expect("an exec line");
    assert!(exec["cache_map"].get("json").is_none());
    assert!(
        exec["cache_map"]["digest"]
            .as_str()
            .expect("digest")
            .starts_with("sha256:")
    );
    assert_eq!(out.last().expect("lines")["type"], "terminal");
}

fn write_def(dir: &std::path::Path, name: &str, env: &str, sharing: pb::CacheSharingOpt) -> String {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = b.image("docker.io/library/busybox:latest");
    let run = b.exec(
        &Exec::new(Some(base), &["/bin/sh", "-c", "make"])
            .env("A=1")
            .env(env)
            .mount(ExecMount::cache("/cache", "c", sharing)),
    );
    let def = b.finish(&run.root().expect("root output"));
    let path = dir.join(name);
    std::fs::write(&path, def.gogo_encode()).expect("write def");
    path.to_str().expect("utf-8").to_owned()
}

#[test]
fn diff_names_the_changed_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = write_def(dir.path(), "old.pb", "B=1", pb::CacheSharingOpt::Shared);
    let new = write_def(dir.path(), "new.pb", "B=2", pb::CacheSharingOpt::Locked);
    let out = lines(&kiln(&["debug", "cachemap", "--diff", &old, &new]));
    assert_eq!(out.len(), 1, "only the exec changed: {out:?}");
    assert_eq!(out[0]["change"], "changed");
    assert_eq!(out[0]["new"]["type"], "exec");
    let fields: Vec<&str> = out[0]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| f.as_str().expect("string"))
        .collect();
    assert_eq!(fields, ["meta.env[2]", "mounts[1].cacheOpt.sharing"]);
    // Identical definitions: nothing to report.
    assert!(lines(&kiln(&["debug", "cachemap", "--diff", &old, &old])).is_empty());
}

#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.pb");
    std::fs::write(&garbage, b"\xff\xff\xff").expect("write");
    for args in [
        vec!["debug", "cachemap", "/nonexistent/def.pb"],
        vec!["debug", "cachemap", garbage.to_str().expect("utf-8")],
    ] {
        let output = kiln(&args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(output.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert!(stderr.starts_with("error: "), "{stderr:?}");
    }
}
