//! The ref model: mutable refs on parents mount writable, commit in place, lock against a
//! second holder, retain for keyed lookups (cache mounts), release, du, prune and verify;
//! a 200-layer chain mounts; the native fallback round-trips. Rootful and rootless.
//!
//! Every test takes [`serial`]: one opens stores in the test process itself, and a body
//! forked by another test meanwhile inherited SQLite's allocator lock held and waited on
//! it forever (a CI run hung in `lifecycle_rootful`).

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Layer, assert_same_tree, tree};
use kiln_snapshotter::{
    BackendChoice, Compression, Error, ImportOptions, MutableRef, PruneOptions, RecordState,
    RefOptions, Snapshotter, StoreOptions,
};
use kiln_testsupport::{Mounted, rootful, rootless, serial};

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("dir", 0o755)
        .file("dir/a", b"a")
        .file("dir/b", b"b")
        .file("top", b"top")
        .gzip()
}

fn lifecycle() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let store = Snapshotter::open(&root)?;
    let base = store.import_layer(None, &base_layer()[..], &ImportOptions::default())?;

    // A step: mount the mutable, change things, unmount, commit.
    let m = store.new_mutable(Some(&base), &RefOptions::default())?;
    assert!(!m.mountable().is_readonly());
    for round in 0..2 {
        // Mounting twice proves the volatile marker of the first mount is cleared.
        let mnt = Mounted::new(&m.mountable())?;
        std::fs::write(mnt.path.join(format!("new{round}")), b"n")?;
        if round == 0 {
            std::fs::remove_file(mnt.path.join("top"))?;
            std::fs::rename(mnt.path.join("dir/a"), mnt.path.join("dir/c"))?;
        }
    }
    let m_id = m.id().to_owned();
    let committed = m.commit()?;
    assert_eq!(committed.id(), m_id, "commit keeps the record: no copy");
    assert_eq!(committed.parent().map(|p| p.id()), Some(base.id()));
    let view = Mounted::view(&committed)?;
    let names: Vec<String> = tree(&view.path).into_keys().collect();
    assert_eq!(names, ["dir", "dir/b", "dir/c", "new0", "new1"]);
    drop(view);
    assert!(matches!(
        store.get_mutable(committed.id()),
        Err(Error::WrongState { .. })
    ));
    let again = store.get(committed.id())?;
    assert_eq!(again.id(), committed.id());

    // A retained mutable (a cache mount) is found again by key, and is exclusive.
    let key = "cache-dir:apt";
    let options = RefOptions {
        retain: true,
        record_type: "exec.cachemount".into(),
        keys: vec![key.into()],
        ..Default::default()
    };
    let cache = store.new_mutable(None, &options)?;
    std::fs::write(cache.dir().join("pkg"), b"p")?;
    let cache_id = cache.id().to_owned();
    let err = store.get_mutable(&cache_id).expect_err("second holder");
    assert_eq!(err.to_string(), format!("{cache_id} is locked"));
    // The same holds for another handle on the store (as another process would have).
    let other = Snapshotter::open(&root)?;
    let err = other
        .get_mutable(&cache_id)
        .expect_err("second holder elsewhere");
    assert!(matches!(err, Error::Locked(_)), "{err}");
    cache.release()?;
    let found = store.find(key)?;
    assert_eq!(
        found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [cache_id.as_str()]
    );
    let cache: MutableRef = other.get_mutable(&found[0].id)?;
    assert_eq!(std::fs::read(cache.dir().join("pkg"))?, b"p");
    drop(cache);

    // An unretained mutable disappears on release.
    let scratch = store.new_mutable(Some(&base), &RefOptions::default())?;
    let scratch_id = scratch.id().to_owned();
    let scratch_dir = scratch.dir();
    scratch.release()?;
    assert!(matches!(store.record(&scratch_id), Err(Error::NotFound(_))));
    assert!(!scratch_dir.exists());

    // du: every record, what is in use and what could go.
    let du = store.du()?;
    let entry = |id: &str| du.iter().find(|u| u.id == id).unwrap();
    assert!(entry(base.id()).in_use && !entry(base.id()).reclaimable);
    assert_eq!(entry(committed.id()).parent.as_deref(), Some(base.id()));
    assert!(!entry(&cache_id).in_use && entry(&cache_id).reclaimable);
    assert_eq!(entry(&cache_id).state, RecordState::Mutable);
    assert_eq!(entry(&cache_id).keys, [key]);
    assert!(entry(&cache_id).size > 0);

    // Prune: recent records survive a keep duration; held ones survive anything.
    let kept = store.prune(PruneOptions {
        keep_duration: Some(Duration::from_secs(3600)),
    })?;
    assert!(kept.is_empty(), "{kept:?}");
    let pruned = store.prune(PruneOptions::default())?;
    assert_eq!(pruned, std::slice::from_ref(&cache_id));
    drop((base, committed, again));
    let mut pruned = store.prune(PruneOptions::default())?;
    pruned.sort();
    assert_eq!(pruned.len(), 2, "the committed layer, then its parent");
    assert!(store.du()?.is_empty());
    assert!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    Ok(())
}

#[test]
fn lifecycle_rootful() {
    let _serial = serial();
    rootful(lifecycle);
}

#[test]
fn lifecycle_rootless() {
    let _serial = serial();
    rootless(lifecycle);
}

/// `remove_unretained`: temporary results (committed, not retained) go once nobody holds
/// them and nothing is built on them; retained ones, held ones and parents stay.
/// Cache directories as kiln's cache mounts hold them: copies of an input that mount as a
/// plain directory, held shared by several handles (as several processes would), detached
/// (out of the index, no longer retained) and then deleted by their last holder.
fn shared_cache_directories() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let store = Snapshotter::open(&root)?;
    let other = Snapshotter::open(&root)?;
    let base = store.import_layer(None, &base_layer()[..], &ImportOptions::default())?;
    let key = "cache-dir:shared:x";
    let options = RefOptions {
        retain: true,
        record_type: "exec.cachemount".into(),
        keys: vec![key.into()],
        ..Default::default()
    };
    // A copy of the input's tree, without a parent: a plain directory.
    let copy = store.new_mutable_copy(&base, &options)?;
    let names: Vec<String> = tree(&copy.dir()).into_keys().collect();
    assert_eq!(names, ["dir", "dir/a", "dir/b", "top"]);
    let id = copy.id().to_owned();
    let first = copy.into_shared()?;
    let second = other.get_mutable_shared(&id)?;
    assert_eq!(first.dir(), second.dir(), "one directory for every holder");
    assert!(
        matches!(
            first.mountable(),
            kiln_snapshotter::Mountable::Bind {
                readonly: false,
                ..
            }
        ),
        "mounts as a plain writable bind"
    );
    std::fs::write(second.dir().join("written"), b"w")?;
    assert!(first.dir().join("written").exists());
    // Shared holders exclude an exclusive one, and the other way round.
    assert!(matches!(store.get_mutable(&id), Err(Error::Locked(_))));
    // A mutable on a parent cannot be shared (overlay refuses a second mount of its upper).
    let layered = store.new_mutable(Some(&base), &options)?;
    let layered_id = layered.id().to_owned();
    let refused = layered.into_shared().expect_err("layered");
    assert!(matches!(refused, Error::WrongState { .. }), "{refused}");
    assert!(matches!(
        other.get_mutable_shared(&layered_id),
        Err(Error::WrongState { .. })
    ));
    // Detached while held: found no more, deleted when the last holder lets go.
    store.detach(&id, key)?;
    assert!(store.find(key)?.iter().all(|r| r.id != id));
    drop(first);
    assert!(second.dir().exists(), "still held");
    let dir = second.dir();
    drop(second);
    assert!(!dir.exists(), "the last holder deleted it");
    assert!(matches!(store.record(&id), Err(Error::NotFound(_))));
    // A retained exclusive holder detached meanwhile deletes it on release too.
    let held = store.get_mutable(&layered_id)?;
    other.detach(&layered_id, key)?;
    held.release()?;
    assert!(matches!(store.record(&layered_id), Err(Error::NotFound(_))));
    Ok(())
}

#[test]
fn shared_cache_directories_rootful() {
    let _serial = serial();
    rootful(shared_cache_directories);
}

#[test]
fn shared_cache_directories_rootless() {
    let _serial = serial();
    rootless(shared_cache_directories);
}

fn temporary_results() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = Snapshotter::open(&tmp.path().join("root"))?;
    let commit = |parent: Option<&kiln_snapshotter::ImmutableRef>| {
        store
            .new_mutable(parent, &RefOptions::default())
            .and_then(MutableRef::commit)
    };
    let base = commit(None)?;
    let child = commit(Some(&base))?;
    let retained = commit(None)?;
    retained.set_retain(true)?;
    let held = commit(None)?;
    let (base_id, child_id, retained_id) = (
        base.id().to_owned(),
        child.id().to_owned(),
        retained.id().to_owned(),
    );
    drop((base, child, retained));

    // Held by this handle (as by a running build): kept; the chain goes child first.
    let mut removed = store.remove_unretained()?;
    removed.sort();
    let mut want = vec![base_id, child_id];
    want.sort();
    assert_eq!(removed, want);
    let left: Vec<String> = store.du()?.into_iter().map(|u| u.id).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&retained_id) && left.contains(&held.id().to_owned()));
    drop(held);
    assert_eq!(store.remove_unretained()?.len(), 1);
    assert_eq!(store.du()?.len(), 1, "only the retained result is left");
    assert!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    Ok(())
}

#[test]
fn temporary_results_rootful() {
    let _serial = serial();
    rootful(temporary_results);
}

#[test]
fn temporary_results_rootless() {
    let _serial = serial();
    rootless(temporary_results);
}

fn long_chain() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = Snapshotter::open(&tmp.path().join("root"))?;
    let mut top = None;
    for i in 0..200 {
        let m = store.new_mutable(top.as_ref(), &RefOptions::default())?;
        std::fs::write(m.dir().join(format!("f{i:03}")), i.to_string())?;
        top = Some(m.commit()?);
    }
    let top = top.unwrap();
    let kiln_snapshotter::Mountable::Overlay(o) = top.mountable() else {
        anyhow::bail!("a chain mounts as an overlay");
    };
    assert_eq!(o.lowers.len(), 200);
    let option_len: usize = o.lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(
        option_len > 4096,
        "the chain would not fit a classic option string"
    );
    let view = Mounted::view(&top)?;
    assert_eq!(std::fs::read_dir(&view.path)?.count(), 200);
    assert_eq!(std::fs::read_to_string(view.path.join("f000"))?, "0");
    // And a writable step on top of it.
    let step = store.new_mutable(Some(&top), &RefOptions::default())?;
    let mnt = Mounted::new(&step.mountable())?;
    std::fs::write(mnt.path.join("f199"), b"changed")?;
    assert_eq!(std::fs::read_dir(&mnt.path)?.count(), 200);
    Ok(())
}

/// Another handle (as another process) opens a chain whole: every ancestor held, one
/// already open reused, a missing ancestor named with the record that mounts on it.
#[test]
fn a_chain_is_opened_with_its_ancestors() -> anyhow::Result<()> {
    let _serial = serial();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let ids: Vec<String> = {
        let store = Snapshotter::open(&root)?;
        let mut top = None;
        let mut ids = Vec::new();
        for i in 0..5 {
            let m = store.new_mutable(top.as_ref(), &RefOptions::default())?;
            std::fs::write(m.dir().join(format!("f{i}")), b"x")?;
            let committed = m.commit()?;
            ids.push(committed.id().to_owned());
            top = Some(committed);
        }
        ids
    };
    let other = Snapshotter::open(&root)?;
    let middle = other.get(&ids[2])?;
    let top = other.get(&ids[4])?;
    let mut chain = Vec::new();
    let mut at = Some(top.clone());
    while let Some(r) = at {
        chain.push(r.id().to_owned());
        at = r.parent().cloned();
    }
    assert_eq!(chain, ids.iter().rev().cloned().collect::<Vec<_>>());
    let kiln_snapshotter::Mountable::Overlay(o) = top.mountable() else {
        anyhow::bail!("a chain mounts as an overlay");
    };
    assert_eq!(o.lowers.len(), 5);
    // Held from here: a prune through a third handle removes none of them.
    let third = Snapshotter::open(&root)?;
    assert!(third.prune(PruneOptions::default())?.is_empty());
    drop(middle);

    assert!(matches!(third.get("no-such-id"), Err(Error::NotFound(_))));
    // The base's lock file gone (its record deleted meanwhile): the error names the
    // record that mounts on it.
    let base = third.record(&ids[0])?;
    std::fs::remove_file(root.join(format!("locks/snapshot-{}.lock", base.n)))?;
    match third.get(&ids[4]) {
        Err(Error::MissingParent { id, parent }) => {
            assert_eq!(
                (id.as_str(), parent.as_str()),
                (ids[1].as_str(), ids[0].as_str())
            );
        }
        other => panic!("expected a missing parent, got {other:?}"),
    }
    Ok(())
}

#[test]
fn two_hundred_layers_rootful() {
    let _serial = serial();
    rootful(long_chain);
}

#[test]
fn two_hundred_layers_rootless() {
    let _serial = serial();
    rootless(long_chain);
}

/// The native backend: copies instead of overlays, same results.
fn native_round_trip() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let native = Snapshotter::open_with(
        &tmp.path().join("native"),
        StoreOptions {
            backend: BackendChoice::Native,
        },
    )?;
    assert_eq!(native.backend().name(), "native");
    let base = native.import_layer(None, &base_layer()[..], &ImportOptions::default())?;
    let l2 = Layer::new()
        .whiteout("dir/a")
        .dir("dir", 0o755)
        .opaque("dir")
        .file("dir/z", b"z")
        .file("added", b"x")
        .finish();
    let second = native.import_layer(Some(&base), &l2[..], &ImportOptions::default())?;
    let m = native.new_mutable(Some(&second), &RefOptions::default())?;
    let mnt = Mounted::new(&m.mountable())?;
    std::fs::remove_file(mnt.path.join("top"))?;
    std::fs::write(mnt.path.join("dir/z"), b"zz")?;
    std::fs::hard_link(mnt.path.join("added"), mnt.path.join("added2"))?;
    let expected = tree(&mnt.path);
    drop(mnt);
    let top = m.commit()?;
    assert_eq!(
        tree(&top.dir()).into_keys().collect::<Vec<_>>(),
        ["added", "added2", "dir", "dir/z"]
    );
    // Export the native chain and import it into an overlay store.
    let overlay = Snapshotter::open(&tmp.path().join("overlay"))?;
    let mut parent = None;
    for layer in [&base, &second, &top] {
        let mut blob = Vec::new();
        native.export_layer(layer, &mut blob, Compression::Gzip)?;
        parent =
            Some(overlay.import_layer(parent.as_ref(), &blob[..], &ImportOptions::default())?);
    }
    let view = Mounted::view(parent.as_ref().unwrap())?;
    assert_same_tree(&expected, &tree(&view.path));
    Ok(())
}

#[test]
fn native_backend_rootful() {
    let _serial = serial();
    rootful(native_round_trip);
}

#[test]
fn native_backend_rootless() {
    let _serial = serial();
    rootless(native_round_trip);
}

/// A store made as root refuses to open rootless, with a clear error.
#[test]
fn store_kind_is_recorded() {
    let _serial = serial();
    if !kiln_testsupport::require(kiln_testsupport::is_root(), "root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let code = kiln_testsupport::run_in_private_mount_namespace(|| {
        Snapshotter::open(&root).map(|_| 0).unwrap_or(1)
    });
    assert_eq!(code, 0);
    // Hand the store to nobody in particular: a user namespace of root's own making.
    let code = kiln_executor::userns::run_in_user_namespace(|| match Snapshotter::open(&root) {
        Err(e) if e.to_string().contains("was created as root") => 0,
        Err(e) => {
            eprintln!("unexpected error: {e}");
            1
        }
        Ok(_) => 2,
    });
    // Root without a subordinate range cannot enter such a namespace everywhere; when it
    // can, the store must refuse.
    if let Ok(code) = code {
        assert_eq!(code, 0);
    }
}
