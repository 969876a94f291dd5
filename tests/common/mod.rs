//! Helpers shared by the `kiln` binary's integration tests.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::collections::HashSet;

use kiln_testsupport::{is_root, shared_dir, unpack_test_image};
use serde_json::Value;

/// The busybox root filesystem as a directory whose files the caller owns: unpacked as
/// root, or (rootless) inside a user namespace so its files belong to ids kiln's
/// namespace maps.
pub fn busybox_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    if is_root() {
        unpack_test_image("busybox", dir.path());
    } else {
        let path = dir.path().to_owned();
        let code = kiln_executor::userns::run_in_user_namespace(move || {
            unpack_test_image("busybox", &path);
            0
        })
        .expect("user namespace");
        assert_eq!(code, 0, "unpacking in the user namespace");
    }
    dir
}

/// Vertex digests that executed (started, not cached) according to `--progress rawjson`.
pub fn executed(stderr: impl AsRef<[u8]>) -> HashSet<String> {
    let mut started = HashSet::new();
    let mut cached = HashSet::new();
    for line in String::from_utf8_lossy(stderr.as_ref()).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for vertex in v["vertexes"].as_array().into_iter().flatten() {
            let digest = vertex["digest"].as_str().unwrap_or_default().to_owned();
            if vertex["cached"] == true {
                cached.insert(digest);
            } else if vertex.get("started").is_some() {
                started.insert(digest);
            }
        }
    }
    started.difference(&cached).cloned().collect()
}

/// The ExecOp digests of corpus Definition `name` (from its `.llbref.json`).
pub fn corpus_exec_digests(name: &str) -> HashSet<String> {
    let path = shared_dir().join(format!("conformance/defs/{name}.llbref.json"));
    let llbref: Value =
        serde_json::from_slice(&std::fs::read(path).expect("read llbref")).expect("parse llbref");
    llbref["ops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|op| op["type"] == "exec")
        .filter_map(|op| op["digest"].as_str().map(str::to_owned))
        .collect()
}
