//! Content hashes against the verified example of cache-keys.md §6, and in-root path
//! resolution that attacker-made symlinks cannot escape.

// Fixture helpers outside #[test] functions panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use kiln_solver::cachemap::ContentSelector;
use kiln_testsupport::{is_root, require};
use kiln_worker::contenthash::{ContentHashError, checksum, dep_digest, open_root};

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The spec's tree: `/a.txt` 0644 "hello\n", `/d` 0755 with `b` 0600 "x", `/e` 0700,
/// `/l` -> `a.txt`, root 0755, everything owned by root.
fn spec_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    write(&root.join("a.txt"), b"hello\n", 0o644);
    mkdir(&root.join("d"), 0o755);
    write(&root.join("d/b"), b"x", 0o600);
    mkdir(&root.join("e"), 0o700);
    symlink("a.txt", root.join("l")).unwrap();
    dir
}

const A_TXT: &str = "sha256:09eefdc91e8894bc767daae7daa5a4e8cbf396610f10ae20604d9086c76d4a93";
const D: &str = "sha256:22754e6eff5ef2007edca68a81b31c6fb9bd34322f61d5a00338ea156c115d3f";
const ROOT: &str = "sha256:58bcfc80a1683f9f5db94adff125d13a71e609f56ffb971c874876046cbe1cdb";
const L: &str = "sha256:653b232d38441e60f35673ca781dca8fd169229d6500fa11cd461a7e10e02789";

#[test]
fn spec_example_checksums() {
    if !require(is_root(), "root (the example tree is owned by uid 0)") {
        return;
    }
    let tree = spec_tree();
    let root = open_root(tree.path()).unwrap();
    let fd = root.as_fd();
    assert_eq!(checksum(fd, "/a.txt", false).unwrap().as_str(), A_TXT);
    assert_eq!(checksum(fd, "/d", false).unwrap().as_str(), D);
    assert_eq!(checksum(fd, "/", false).unwrap().as_str(), ROOT);
    assert_eq!(checksum(fd, "", false).unwrap().as_str(), ROOT);
    assert_eq!(checksum(fd, "/l", false).unwrap().as_str(), L);
    assert_eq!(checksum(fd, "/l", true).unwrap().as_str(), A_TXT);
}

#[test]
fn spec_example_dep_digests() {
    if !require(is_root(), "root (the example tree is owned by uid 0)") {
        return;
    }
    let tree = spec_tree();
    let root = open_root(tree.path()).unwrap();
    assert_eq!(
        dep_digest(Some(root.as_fd()), &[]).unwrap().as_str(),
        "sha256:2a79c45f23b9efc25d89ff8352774ef46e6092f0d84dba6fee152cebce8f656d"
    );
    let selectors = [
        ContentSelector::path("/a.txt", true),
        ContentSelector::path("/d", true),
    ];
    assert_eq!(
        dep_digest(Some(root.as_fd()), &selectors).unwrap().as_str(),
        "sha256:e5b781b02a954d33b6b38b25fbdda77b2c0d94bffa415ca431b7ac032e519ddf"
    );
}

#[test]
fn scratch_input_hashes_root_as_empty() {
    let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    assert_eq!(
        dep_digest(None, &[]).unwrap(),
        kiln_proto::Digest::of(empty.as_bytes())
    );
    assert!(matches!(
        dep_digest(None, &[ContentSelector::path("/x", true)]),
        Err(ContentHashError::NotFound { .. })
    ));
}

#[test]
fn symlinks_resolve_inside_the_root() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    mkdir(&root.join("etc"), 0o755);
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0::/root:/bin/sh\n",
        0o644,
    );
    symlink("../../../../../etc/passwd", root.join("relative")).unwrap();
    symlink("/etc/passwd", root.join("absolute")).unwrap();
    symlink("etc", root.join("etclink")).unwrap();
    let fd = open_root(root).unwrap();
    let fd = fd.as_fd();
    let inside = checksum(fd, "/etc/passwd", false).unwrap();
    assert_eq!(checksum(fd, "/relative", true).unwrap(), inside);
    assert_eq!(checksum(fd, "/absolute", true).unwrap(), inside);
    // A symlink in a parent component is always followed, in-root.
    assert_eq!(checksum(fd, "/etclink/passwd", false).unwrap(), inside);
    // `..` is clamped at the root.
    assert_eq!(checksum(fd, "/../../etc/passwd", false).unwrap(), inside);
    // Not followed: the link itself.
    assert_ne!(checksum(fd, "/absolute", false).unwrap(), inside);
}

#[test]
fn missing_paths_loops_and_sockets_are_errors() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    symlink("l2", root.join("l1")).unwrap();
    symlink("l1", root.join("l2")).unwrap();
    write(&root.join("file"), b"x", 0o644);
    let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let fd = open_root(root).unwrap();
    let fd = fd.as_fd();
    assert!(matches!(
        checksum(fd, "/nope", false),
        Err(ContentHashError::NotFound { .. })
    ));
    assert!(matches!(
        checksum(fd, "/file/below", false),
        Err(ContentHashError::NotFound { .. })
    ));
    assert!(matches!(
        checksum(fd, "/l1", true),
        Err(ContentHashError::TooManyLinks { .. })
    ));
    // Not following the loop is fine: it is just a link.
    assert!(checksum(fd, "/l1", false).is_ok());
    assert!(matches!(
        checksum(fd, "/", false),
        Err(ContentHashError::Socket { .. })
    ));
    let wildcard = ContentSelector {
        path: "/*.go".into(),
        wildcard: true,
        ..Default::default()
    };
    assert!(matches!(
        dep_digest(Some(fd), &[wildcard]),
        Err(ContentHashError::Unsupported { .. })
    ));
}

#[test]
fn content_and_metadata_changes_change_the_hash_but_mtime_does_not() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    write(&root.join("f"), b"one", 0o644);
    let fd = open_root(root).unwrap();
    let before = checksum(fd.as_fd(), "/", false).unwrap();
    let file = fs::File::options()
        .write(true)
        .open(root.join("f"))
        .unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(
        checksum(fd.as_fd(), "/", false).unwrap(),
        before,
        "mtime is not hashed"
    );
    write(&root.join("f"), b"two", 0o644);
    let changed = checksum(fd.as_fd(), "/", false).unwrap();
    assert_ne!(changed, before);
    fs::set_permissions(root.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(checksum(fd.as_fd(), "/", false).unwrap(), changed);
}

#[test]
fn deep_trees_hash_without_recursion() {
    let tree = tempfile::tempdir().unwrap();
    let mut dir = fs::File::open(tree.path()).unwrap();
    // Built by fd, as the path would exceed PATH_MAX.
    for _ in 0..400 {
        nix::sys::stat::mkdirat(&dir, "d", nix::sys::stat::Mode::from_bits_truncate(0o755))
            .unwrap();
        let next = nix::fcntl::openat(
            &dir,
            "d",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        dir = fs::File::from(next);
    }
    let fd = open_root(tree.path()).unwrap();
    let a = checksum(fd.as_fd(), "/", false).unwrap();
    assert_eq!(checksum(fd.as_fd(), "/", false).unwrap(), a);
    assert_ne!(checksum(fd.as_fd(), "/d", false).unwrap(), a);
}

#[test]
fn stored_digests_are_keyed_by_every_selector_field() {
    use kiln_worker::contenthash::annotation_key;
    let plain = ContentSelector::path("/a", false);
    let key = annotation_key(std::slice::from_ref(&plain));
    assert!(key.starts_with("contenthash.v1:"), "{key}");
    assert_eq!(key, annotation_key(&[ContentSelector::path("/a", false)]));
    let variants = [
        vec![],
        vec![ContentSelector::path("/a", true)],
        vec![ContentSelector::path("/b", false)],
        vec![ContentSelector {
            wildcard: true,
            ..plain.clone()
        }],
        vec![ContentSelector {
            include_patterns: vec!["x".into()],
            ..plain.clone()
        }],
        vec![ContentSelector {
            exclude_patterns: vec!["x".into()],
            ..plain.clone()
        }],
        vec![plain.clone(), plain.clone()],
    ];
    let mut keys: Vec<String> = variants.iter().map(|v| annotation_key(v)).collect();
    keys.push(key);
    let count = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), count, "every selector set has its own key");
}
