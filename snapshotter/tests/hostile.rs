//! Hostile layers: path traversal, absolute paths, writing through a planted symlink,
//! hardlinks out of the layer, oversized extension headers, device nodes rootless and ids
//! outside the user namespace's mapping. Each is rejected or contained: nothing lands
//! outside the snapshot, and the store stays consistent.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::Layer;
use kiln_snapshotter::{ImportOptions, Snapshotter};
use kiln_testsupport::{Mounted, rootful, rootless};

fn header(kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_mtime(1);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Every file under `dir`, for checking that nothing appeared.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.display().to_string());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn hostile_layers_are_contained(rootless: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let canary = dir.path().join("canary");
    std::fs::create_dir(&canary)?;
    let store = Snapshotter::open(&dir.path().join("root"))?;
    let before = listing(&canary);
    let outside_before: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name())
        .collect();
    let import = |layer: Vec<u8>| store.import_layer(None, &layer[..], &ImportOptions::default());

    // `..` is rejected outright.
    let err = import(
        Layer::new()
            .raw(header(tar::EntryType::Regular), b"../escape", b"x")
            .finish(),
    )
    .expect_err("`..` must be rejected");
    assert!(err.to_string().contains(".."), "{err}");
    let err = import(
        Layer::new()
            .raw(header(tar::EntryType::Regular), b"a/../../../escape2", b"x")
            .finish(),
    )
    .expect_err("nested `..` must be rejected");
    assert!(err.to_string().contains("escape2"), "{err}");

    // An absolute path lands inside the snapshot.
    let abs_name = format!("{}/abs-file", canary.display());
    let r = import(
        Layer::new()
            .raw(header(tar::EntryType::Regular), abs_name.as_bytes(), b"abs")
            .finish(),
    )?;
    assert!(r.dir().join(abs_name.trim_start_matches('/')).is_file());

    // A symlink to a directory outside, then a write through it.
    let through = Layer::new()
        .symlink("link", canary.to_str().unwrap())
        .file("link/planted", b"evil")
        .finish();
    match import(through) {
        Ok(r) => assert!(!r.dir().join("link").is_dir() || r.dir().join("link").is_symlink()),
        Err(e) => assert!(e.to_string().contains("link/planted"), "{e}"),
    }
    // A relative symlink climbing out, then a write through it: resolution stays in root.
    let climb = Layer::new()
        .symlink("up", "../../../../../../..")
        .file("up/climbed", b"evil")
        .finish();
    if let Ok(r) = import(climb) {
        assert!(
            r.dir().join("climbed").is_file(),
            "contained at the snapshot root"
        );
    }
    // A hardlink to a host file.
    let err = import(Layer::new().hardlink("pw", "/etc/passwd").finish())
        .expect_err("a hardlink out of the layer must fail");
    assert!(err.to_string().contains("pw"), "{err}");

    // Oversized extension headers are refused before they are read.
    for kind in [tar::EntryType::XHeader, tar::EntryType::GNULongName] {
        let mut h = header(kind);
        h.set_size(1 << 31);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 1024]);
        let err = import(bytes).expect_err("a huge header must be refused");
        assert!(err.to_string().contains("larger than"), "{err}");
    }
    // A PAX path with `..` is rejected like a plain one.
    let err = import(
        Layer::new()
            .pax(&[("path", b"../../pax-escape")])
            .file("innocent", b"x")
            .finish(),
    )
    .expect_err("pax `..`");
    assert!(err.to_string().contains("pax-escape"), "{err}");
    // Overlay metadata inside a layer is dropped (it would forge opaque dirs).
    let forged = import(
        Layer::new()
            .dir("d", 0o755)
            .pax(&[("SCHILY.xattr.user.overlay.opaque", b"y")])
            .file("d/f", b"x")
            .finish(),
    )?;
    assert_eq!(
        xattr::get(forged.dir().join("d/f"), "user.overlay.opaque")?,
        None
    );

    // Device nodes: created as root, skipped (with a warning) rootless.
    let mut dev = header(tar::EntryType::Char);
    dev.set_device_major(1)?;
    dev.set_device_minor(3)?;
    let r = import(
        Layer::new()
            .raw(dev, b"null", b"")
            .file("after", b"ok")
            .finish(),
    )?;
    assert_eq!(r.dir().join("null").exists(), !rootless);
    assert!(r.dir().join("after").is_file());

    if rootless {
        // An owner outside the mapping fails naming the entry and the id.
        let err = import(
            Layer::new()
                .file_owned("far", b"x", 0o644, 4_000_000, 0)
                .finish(),
        )
        .expect_err("unmapped uid");
        let msg = err.to_string();
        assert!(msg.contains("far") && msg.contains("4000000"), "{msg}");
    }

    assert_eq!(
        listing(&canary),
        before,
        "nothing may land in the canary directory"
    );
    let outside_after: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside_before, outside_after);
    assert!(!Path::new("/escape").exists() && !Path::new("/climbed").exists());
    let problems = store.verify()?;
    assert!(problems.is_empty(), "{problems:?}");
    // The contained layers still mount.
    let _view = Mounted::view(&r)?;
    Ok(())
}

#[test]
fn hostile_layers_rootful() {
    rootful(|| hostile_layers_are_contained(false));
}

#[test]
fn hostile_layers_rootless() {
    rootless(|| hostile_layers_are_contained(true));
}
