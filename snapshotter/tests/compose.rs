//! Merge and diff (LLB's MergeOp and DiffOp): merged trees follow BuildKit's layering
//! (later inputs' layers applied in order, deletions included, a recurring layer applied
//! again), overlay merges and ancestor diffs reuse layer directories instead of copying,
//! `merge(L, diff(L, U))` rebuilds U's tree, reused layers keep their contents alive
//! against prune, and the native backend gives the same trees by copying. Rootful and
//! rootless.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::ensure;
use common::{Layer, Node, assert_same_tree, tree};
use kiln_snapshotter::{
    BackendChoice, ImmutableRef, ImportOptions, PruneOptions, RefOptions, Snapshotter, StoreOptions,
};
use kiln_testsupport::{Mounted, rootful, rootless};

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("dir", 0o755)
        .file("dir/a", b"a")
        .file("dir/b", b"b")
        .file("top", b"top")
        .gzip()
}

/// A committed layer on `parent` made by `change` on its mounted view.
fn step(
    store: &Snapshotter,
    parent: Option<&ImmutableRef>,
    change: impl FnOnce(&Path) -> std::io::Result<()>,
) -> anyhow::Result<ImmutableRef> {
    let m = store.new_mutable(parent, &RefOptions::default())?;
    {
        let mnt = Mounted::new(&m.mountable())?;
        change(&mnt.path)?;
    }
    Ok(m.commit()?)
}

fn view(r: &ImmutableRef) -> anyhow::Result<BTreeMap<String, Node>> {
    let mnt = Mounted::view(r)?;
    Ok(tree(&mnt.path))
}

fn names(t: &BTreeMap<String, Node>) -> Vec<&str> {
    t.keys().map(String::as_str).collect()
}

fn content(t: &BTreeMap<String, Node>, path: &str) -> Option<String> {
    t.get(path)
        .and_then(|n| n.content.as_ref())
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

fn chain_len(r: &ImmutableRef) -> usize {
    r.parents().count() + 1
}

fn merge(store: &Snapshotter, inputs: &[&ImmutableRef]) -> anyhow::Result<ImmutableRef> {
    let inputs: Vec<ImmutableRef> = inputs.iter().map(|r| (*r).clone()).collect();
    Ok(store
        .merge(&inputs, &RefOptions::default())?
        .expect("a merge of refs is a ref"))
}

fn merges_reuse_layers(native: bool) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let options = StoreOptions {
        backend: if native {
            BackendChoice::Native
        } else {
            BackendChoice::default()
        },
    };
    let store = Snapshotter::open_with(&tmp.path().join("root"), options)?;
    let base = store.import_layer(None, &base_layer()[..], &ImportOptions::default())?;
    let a = step(&store, Some(&base), |p| {
        std::fs::write(p.join("dir/a"), "changed by a")?;
        std::fs::write(p.join("x"), "from a")
    })?;
    // B is built on scratch (as COPY --link builds): it adds files, overrides /x, then
    // deletes it again, which must delete A's /x in the merge.
    let b0 = step(&store, None, |p| {
        std::fs::write(p.join("b"), "B")?;
        std::fs::write(p.join("x"), "from b0")
    })?;
    let b1 = step(&store, Some(&b0), |p| std::fs::remove_file(p.join("x")))?;

    let merged = merge(&store, &[&a, &b1])?;
    let t = view(&merged)?;
    assert_eq!(names(&t), ["b", "dir", "dir/a", "dir/b", "top"]);
    assert_eq!(content(&t, "dir/a").as_deref(), Some("changed by a"));
    assert_eq!(content(&t, "b").as_deref(), Some("B"));
    assert_eq!(chain_len(&merged), 4, "base, a, then b0 and b1 on top");
    if !native {
        // No copy: the merged layers are b0's and b1's own directories.
        assert_eq!(merged.dir(), b1.dir());
        assert_eq!(merged.parent().unwrap().dir(), b0.dir());
        assert_eq!(merged.parent().unwrap().parent().unwrap().id(), a.id());
        assert!(
            merged.size()? < 64 * 1024,
            "a reused layer owns next to nothing"
        );
    }
    // The inputs are untouched.
    assert_eq!(content(&view(&a)?, "x").as_deref(), Some("from a"));
    assert_eq!(names(&view(&b1)?), ["b"]);

    // A layer that recurs (base, under both inputs) is applied again where it recurs:
    // base's dir/a comes back over a's change, as in BuildKit.
    let c = step(&store, Some(&base), |p| std::fs::write(p.join("c"), "C"))?;
    let merged2 = merge(&store, &[&a, &c])?;
    let t2 = view(&merged2)?;
    assert_eq!(content(&t2, "dir/a").as_deref(), Some("a"));
    assert_eq!(content(&t2, "x").as_deref(), Some("from a"));
    assert_eq!(content(&t2, "c").as_deref(), Some("C"));
    assert_eq!(chain_len(&merged2), 4);
    if !native {
        assert_ne!(
            merged2.parent().unwrap().dir(),
            base.dir(),
            "overlay refuses a directory twice in one stack: the recurring layer is a copy"
        );
        assert_eq!(merged2.dir(), c.dir());
    }

    // Merging one ref is that ref; merging nothing is nothing.
    assert_eq!(merge(&store, &[&a])?.id(), a.id());
    assert!(store.merge(&[], &RefOptions::default())?.is_none());

    // Reused layers keep their contents alive: with only the merge held, prune leaves
    // everything it is made of.
    let expected = t;
    drop((merged2, a, b0, b1, c, base));
    store.prune(PruneOptions::default())?;
    assert_same_tree(&expected, &view(&merged)?);
    ensure!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    drop(merged);
    store.prune(PruneOptions::default())?;
    ensure!(
        store.du()?.is_empty(),
        "everything pruned: {:?}",
        store.du()?
    );
    Ok(())
}

fn diffs(native: bool) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let options = StoreOptions {
        backend: if native {
            BackendChoice::Native
        } else {
            BackendChoice::default()
        },
    };
    let store = Snapshotter::open_with(&tmp.path().join("root"), options)?;
    let opts = RefOptions::default();
    let base = store.import_layer(None, &base_layer()[..], &ImportOptions::default())?;

    // diff of an ancestor: the layers above it, with their deletions hidden when the
    // diff is viewed alone and applied when it is merged elsewhere.
    let u1 = step(&store, Some(&base), |p| std::fs::write(p.join("n1"), "n1"))?;
    let u2 = step(&store, Some(&u1), |p| std::fs::remove_file(p.join("top")))?;
    let d = store.diff(Some(&base), Some(&u2), &opts)?.unwrap();
    assert_eq!(chain_len(&d), 2);
    if !native {
        assert_eq!(
            d.dir(),
            u2.dir(),
            "an ancestor diff reuses the layers above"
        );
        assert_eq!(d.parent().unwrap().dir(), u1.dir());
    }
    assert_eq!(
        names(&view(&d)?),
        ["n1"],
        "no whiteout shows in the diff alone"
    );
    let other = step(&store, Some(&base), |p| std::fs::write(p.join("o"), "o"))?;
    let rebased = merge(&store, &[&other, &d])?;
    assert_eq!(
        names(&view(&rebased)?),
        ["dir", "dir/a", "dir/b", "n1", "o"]
    );

    // diff of unrelated trees: compared, one new layer; merge(L, diff(L, U)) is U.
    let lower = store.import_layer(
        None,
        &Layer::new()
            .file("same", b"same")
            .file("changed", b"old")
            .file("removed", b"gone")
            .dir("d", 0o755)
            .file("d/inner", b"inner")
            .gzip()[..],
        &ImportOptions::default(),
    )?;
    let upper = store.import_layer(
        None,
        &Layer::new()
            .file("same", b"same")
            .file("changed", b"new")
            .file("added", b"added")
            .gzip()[..],
        &ImportOptions::default(),
    )?;
    let d2 = store.diff(Some(&lower), Some(&upper), &opts)?.unwrap();
    assert_eq!(chain_len(&d2), 1);
    let alone = view(&d2)?;
    assert_eq!(names(&alone), ["added", "changed"]);
    assert_eq!(content(&alone, "changed").as_deref(), Some("new"));
    let rebuilt = merge(&store, &[&lower, &d2])?;
    assert_same_tree(&view(&upper)?, &view(&rebuilt)?);

    // Scratch and identity cases, as BuildKit's DiffOp.
    assert_eq!(store.diff(None, Some(&u2), &opts)?.unwrap().id(), u2.id());
    assert!(store.diff(Some(&u2), Some(&u2), &opts)?.is_none());
    assert!(store.diff(None, None, &opts)?.is_none());
    let everything_gone = store.diff(Some(&lower), None, &opts)?.unwrap();
    assert!(names(&view(&everything_gone)?).is_empty());
    let emptied = merge(&store, &[&lower, &everything_gone])?;
    assert!(
        names(&view(&emptied)?).is_empty(),
        "diff(L, scratch) deletes all of L"
    );
    ensure!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    Ok(())
}

#[test]
fn merges_reuse_layers_rootful() {
    rootful(|| merges_reuse_layers(false));
}

#[test]
fn merges_reuse_layers_rootless() {
    rootless(|| merges_reuse_layers(false));
}

#[test]
fn merges_native_rootful() {
    rootful(|| merges_reuse_layers(true));
}

#[test]
fn diffs_rootful() {
    rootful(|| diffs(false));
}

#[test]
fn diffs_rootless() {
    rootless(|| diffs(false));
}

/// The native backend (full trees) diffs by comparing trees and refuses a diff whose
/// deletions it could not represent.
fn native_diffs() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let options = StoreOptions {
        backend: BackendChoice::Native,
    };
    let store = Snapshotter::open_with(&tmp.path().join("root"), options)?;
    let opts = RefOptions::default();
    let base = store.import_layer(None, &base_layer()[..], &ImportOptions::default())?;
    let added = step(&store, Some(&base), |p| std::fs::write(p.join("n1"), "n1"))?;
    let d = store.diff(Some(&base), Some(&added), &opts)?.unwrap();
    assert_eq!(names(&view(&d)?), ["n1"]);
    let other = step(&store, Some(&base), |p| std::fs::write(p.join("o"), "o"))?;
    let rebased = merge(&store, &[&other, &d])?;
    assert_eq!(
        names(&view(&rebased)?),
        ["dir", "dir/a", "dir/b", "n1", "o", "top"]
    );
    let removed = step(&store, Some(&base), |p| std::fs::remove_file(p.join("top")))?;
    let err = store.diff(Some(&base), Some(&removed), &opts).unwrap_err();
    assert!(err.to_string().contains("deletes top"), "{err}");
    Ok(())
}

#[test]
fn diffs_native_rootless() {
    rootless(native_diffs);
}
