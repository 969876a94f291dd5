//! Cache mounts as BuildKit's mount manager keeps them, through `kiln build`: one cache id
//! mounted twice in one step is one directory (every sharing mode; LOCKED used to hang);
//! a step that ignores the cache (`--no-cache`, or IgnoreCache on its vertex) gets fresh,
//! empty cache directories that replace the old ones; and 32 concurrent `kiln build`
//! processes on one `--root` sharing SHARED, LOCKED and PRIVATE cache mounts lose no
//! write and never deadlock. As root and as the unprivileged test user.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_proto::builder::{DefinitionBuilder, ExecMount};
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb::CacheSharingOpt;
use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user};

mod buildsupport;
mod common;

use buildsupport::{Kiln, base, finish, sh, stderr};

const MODES: [(CacheSharingOpt, &str); 3] = [
    (CacheSharingOpt::Shared, "shared"),
    (CacheSharingOpt::Locked, "locked"),
    (CacheSharingOpt::Private, "private"),
];

/// A step running `script` with `mounts` and `/out` as its output; the Definition.
fn step_with(script: &str, mounts: Vec<ExecMount>, ignore_cache: bool) -> Vec<u8> {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let mut exec = sh(Some(base), script).mount(ExecMount::bind("/out", None));
    for m in mounts {
        exec = exec.mount(m);
    }
    exec.ignore_cache = ignore_cache;
    let out = b.exec(&exec).output("/out").expect("/out");
    b.finish(&out).gogo_encode()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_same_id_twice_in_one_step() {
    let k = Kiln::new();
    for (sharing, name) in MODES {
        let id = format!("twice-{name}");
        let def = step_with(
            &format!(
                "echo {name} > /a/f; cat /b/f > /out/seen; [ /a -ef /b ] && echo same >> /out/seen"
            ),
            vec![
                ExecMount::cache("/a", &id, sharing),
                ExecMount::cache("/b", &id, sharing),
            ],
            false,
        );
        let dest = k.state.path().join(format!("out-{name}"));
        let out = k.build(
            &def,
            &["-o", &format!("type=local,dest={}", dest.display())],
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(
            read(&dest.join("seen")),
            format!("{name}\nsame\n"),
            "{name}"
        );
    }
}

#[test]
fn same_id_twice_in_one_step_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_same_id_twice_in_one_step();
}

#[test]
fn same_id_twice_in_one_step_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_same_id_twice_in_one_step();
}

/// Files named `name` in any snapshot directory of the store, with their contents.
fn in_store(state: &Path, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(state.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("fs").join(name)) {
            found.push(text);
        }
    }
    found
}

fn check_ignoring_the_cache_gives_fresh_directories() {
    let k = Kiln::new();
    let build = |token: &str, flags: &[&str], ignore_cache: bool| {
        let def = step_with(
            &format!(
                "{{ cat /c/fresh.log 2>/dev/null || true; }} > /out/seen; echo {token} >> /c/fresh.log"
            ),
            vec![ExecMount::cache("/c", "fresh", CacheSharingOpt::Shared)],
            ignore_cache,
        );
        let dest = k.state.path().join(format!("out-{token}"));
        let mut args = vec![format!("type=local,dest={}", dest.display())];
        args.insert(0, "-o".to_owned());
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = k.build(&def, &args);
        assert!(out.status.success(), "{token}: {}", stderr(&out));
        read(&dest.join("seen"))
    };
    assert_eq!(build("one", &[], false), "");
    assert_eq!(
        build("two", &[], false),
        "one\n",
        "the cache mount persists"
    );
    assert_eq!(
        build("three", &["--no-cache"], false),
        "",
        "--no-cache: a fresh directory"
    );
    assert_eq!(
        build("four", &[], false),
        "three\n",
        "that replaced the old one"
    );
    assert_eq!(
        build("five", &[], true),
        "",
        "IgnoreCache on the vertex: fresh too"
    );
    assert_eq!(build("six", &[], false), "five\n");
    assert_eq!(
        in_store(k.state.path(), "fresh.log"),
        ["five\nsix\n"],
        "the replaced directories are gone"
    );
}

#[test]
fn ignoring_the_cache_gives_fresh_directories_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_ignoring_the_cache_gives_fresh_directories();
}

#[test]
fn ignoring_the_cache_gives_fresh_directories_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_ignoring_the_cache_gives_fresh_directories();
}

const BUILDS: usize = 32;

fn check_concurrent_builds_share_cache_mounts() {
    let k = Kiln::new();
    // The base first, so the builds below contend only for their cache mounts.
    let warm = step_with("true", Vec::new(), false);
    let out = k.build(&warm, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mounts = || {
        vec![
            ExecMount::cache("/s", "concurrent-shared", CacheSharingOpt::Shared),
            ExecMount::cache("/l", "concurrent-locked", CacheSharingOpt::Locked),
            ExecMount::cache("/p", "concurrent-private", CacheSharingOpt::Private),
        ]
    };
    let children: Vec<_> = (0..BUILDS)
        .map(|i| {
            // Every build runs its own step (the token makes it a new one). LOCKED: nobody
            // else may be inside while the step is; SHARED: all at once in one directory.
            let script = format!(
                "echo t{i} >> /s/shared.log; \
                 if [ -e /l/busy ]; then echo t{i} >> /l/overlaps; fi; \
                 touch /l/busy; echo t{i} >> /l/locked.log; sleep 0.05; rm /l/busy; \
                 echo t{i} >> /p/private.log; sleep 0.2"
            );
            k.spawn_build(&step_with(&script, mounts(), false), &[])
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = finish(child, &format!("build {i}"));
        assert!(out.status.success(), "build {i}: {}", stderr(&out));
    }
    let tokens = |text: &str| -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            *counts.entry(line.to_owned()).or_insert(0) += 1;
        }
        counts
    };
    let all: BTreeMap<String, usize> = (0..BUILDS).map(|i| (format!("t{i}"), 1)).collect();
    for name in ["shared.log", "locked.log"] {
        let dirs = in_store(k.state.path(), name);
        assert_eq!(
            dirs.len(),
            1,
            "{name}: one directory for everyone, got {dirs:?}"
        );
        assert_eq!(tokens(&dirs[0]), all, "{name}: every write, once");
    }
    assert_eq!(
        in_store(k.state.path(), "overlaps"),
        Vec::<String>::new(),
        "a LOCKED directory was used by two steps at once"
    );
    let private = in_store(k.state.path(), "private.log").concat();
    assert_eq!(
        tokens(&private),
        all,
        "PRIVATE: every write, once, across its directories"
    );
}

#[test]
fn concurrent_builds_share_cache_mounts_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_concurrent_builds_share_cache_mounts();
}

#[test]
fn concurrent_builds_share_cache_mounts_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_concurrent_builds_share_cache_mounts();
}
