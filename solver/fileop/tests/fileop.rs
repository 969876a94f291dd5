//! FileOp backend behaviour: every copy option and the combinations that matter, mkdir,
//! mkfile and rm, owners by id and by name (as root, and rootless as the test user inside
//! its user namespace), ADD-style archive unpacking, and every FileOp of the shared
//! conformance corpus run over the busybox test image.

// Fixture helpers outside #[test] functions panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_fileop::{self as fileop, Owner, resolve_owner};
use kiln_proto::pb;
use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user};

/// A source and a destination root in one temporary directory.
struct Roots {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dest: PathBuf,
}

fn roots() -> Roots {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dest = dir.path().join("dest");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dest).unwrap();
    Roots {
        _dir: dir,
        src,
        dest,
    }
}

fn write(path: &Path, data: &str, mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn set_mtime(path: &Path, secs: u64) {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::open(path).unwrap().set_modified(time).unwrap();
}

/// Every path below `root`, directories with a trailing `/`.
fn listing(root: &Path) -> BTreeSet<String> {
    fn visit(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if entry.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"));
                visit(root, &path, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    visit(root, root, &mut out);
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn cp(src: &str, dest: &str) -> pb::FileActionCopy {
    pb::FileActionCopy {
        src: src.into(),
        dest: dest.into(),
        mode: -1,
        timestamp: -1,
        create_dest_path: true,
        ..Default::default()
    }
}

fn run_copy(r: &Roots, action: &pb::FileActionCopy) -> Result<(), fileop::FileOpError> {
    fileop::copy(&r.src, &r.dest, action, None)
}

#[test]
fn file_to_file_keeps_content_mode_and_mtime() {
    let r = roots();
    write(&r.src.join("a"), "A", 0o640);
    set_mtime(&r.src.join("a"), 1_000_000);
    run_copy(&r, &cp("/a", "/b")).unwrap();
    assert_eq!(read(&r.dest.join("b")), "A");
    assert_eq!(mode(&r.dest.join("b")), 0o640);
    assert_eq!(fs::metadata(r.dest.join("b")).unwrap().mtime(), 1_000_000);
    // Copying again replaces the file.
    write(&r.src.join("a"), "AA", 0o600);
    run_copy(&r, &cp("/a", "/b")).unwrap();
    assert_eq!(read(&r.dest.join("b")), "AA");
}

#[test]
fn file_into_an_existing_directory_and_into_dir_slash() {
    let r = roots();
    write(&r.src.join("a"), "A", 0o644);
    fs::create_dir(r.dest.join("d")).unwrap();
    run_copy(&r, &cp("/a", "/d")).unwrap();
    assert_eq!(read(&r.dest.join("d/a")), "A");
    // `new/` does not exist: it is created as a directory and the file goes into it.
    let mut action = cp("/a", "/new/");
    action.create_dest_path = false;
    run_copy(&r, &action).unwrap();
    assert_eq!(read(&r.dest.join("new/a")), "A");
    assert_eq!(mode(&r.dest.join("new")), 0o755);
}

#[test]
fn directory_copies_with_and_without_dir_copy_contents() {
    let r = roots();
    write(&r.src.join("dir/f"), "F", 0o644);
    write(&r.src.join("dir/sub/g"), "G", 0o600);
    fs::set_permissions(r.src.join("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::create_dir(r.dest.join("existing")).unwrap();

    // To a new name: the directory becomes that name.
    run_copy(&r, &cp("/dir", "/fresh")).unwrap();
    assert_eq!(listing(&r.dest.join("fresh")), set(&["f", "sub/", "sub/g"]));
    assert_eq!(mode(&r.dest.join("fresh")), 0o750);
    // Onto an existing directory without dirCopyContents: nested under its base name.
    run_copy(&r, &cp("/dir", "/existing")).unwrap();
    assert_eq!(
        listing(&r.dest.join("existing")),
        set(&["dir/", "dir/f", "dir/sub/", "dir/sub/g"])
    );
    // With dirCopyContents: the entries merge into the existing directory, whose own
    // metadata is left alone.
    let mut action = cp("/dir", "/existing");
    action.dir_copy_contents = true;
    run_copy(&r, &action).unwrap();
    assert!(r.dest.join("existing/f").is_file() && r.dest.join("existing/sub/g").is_file());
    assert_eq!(mode(&r.dest.join("existing")), 0o755);
    // With dirCopyContents into a missing directory: created 0755 like any parent.
    let mut action = cp("/dir", "/made");
    action.dir_copy_contents = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest.join("made")), set(&["f", "sub/", "sub/g"]));
    assert_eq!(mode(&r.dest.join("made")), 0o755);
    assert_eq!(mode(&r.dest.join("made/sub/g")), 0o600);
}

#[test]
fn wildcards_match_files_and_directories() {
    let r = roots();
    write(&r.src.join("a.txt"), "a", 0o644);
    write(&r.src.join("b.txt"), "b", 0o644);
    write(&r.src.join("c.log"), "c", 0o644);
    write(&r.src.join("sub/x.txt"), "x", 0o644);
    let mut action = cp("/*.txt", "/out/");
    action.allow_wildcard = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest.join("out")), set(&["a.txt", "b.txt"]));

    // A directory match, copied with its contents (as Dockerfile COPY does).
    let mut action = cp("/su?", "/subs");
    action.allow_wildcard = true;
    action.dir_copy_contents = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest.join("subs")), set(&["x.txt"]));

    // Multi-component patterns.
    let mut action = cp("/*/x.*", "/deep/");
    action.allow_wildcard = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest.join("deep")), set(&["x.txt"]));
}

#[test]
fn zero_wildcard_matches_fail_unless_allowed() {
    let r = roots();
    write(&r.src.join("a.txt"), "a", 0o644);
    let mut action = cp("/*.nope", "/out/");
    action.allow_wildcard = true;
    let err = run_copy(&r, &action).unwrap_err().to_string();
    assert_eq!(err, "copy /*.nope /out/: /*.nope not found");
    assert!(!r.dest.join("out").exists());
    action.allow_empty_wildcard = true;
    run_copy(&r, &action).unwrap();
    assert!(
        !r.dest.join("out").exists(),
        "nothing is created for no match"
    );
}

#[test]
fn missing_sources_and_parents_are_named() {
    let r = roots();
    let err = run_copy(&r, &cp("/nope", "/dst")).unwrap_err().to_string();
    assert_eq!(err, "copy /nope /dst: /nope: no such file or directory");
    write(&r.src.join("a"), "A", 0o644);
    let mut action = cp("/a", "/x/y/z");
    action.create_dest_path = false;
    let err = run_copy(&r, &action).unwrap_err().to_string();
    assert_eq!(
        err,
        "copy /a /x/y/z: failed to stat /x/y/z: /x: no such file or directory"
    );
    action.create_dest_path = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(read(&r.dest.join("x/y/z")), "A");
}

#[test]
fn follow_symlink_decides_about_a_final_source_symlink() {
    let r = roots();
    write(&r.src.join("target"), "T", 0o644);
    symlink("target", r.src.join("link")).unwrap();
    run_copy(&r, &cp("/link", "/nofollow")).unwrap();
    assert_eq!(
        fs::read_link(r.dest.join("nofollow")).unwrap(),
        Path::new("target")
    );
    let mut action = cp("/link", "/followed");
    action.follow_symlink = true;
    run_copy(&r, &action).unwrap();
    let meta = fs::symlink_metadata(r.dest.join("followed")).unwrap();
    assert!(meta.is_file());
    assert_eq!(read(&r.dest.join("followed")), "T");
    // Symlinks inside a copied directory stay symlinks either way.
    fs::create_dir(r.src.join("d")).unwrap();
    symlink("../target", r.src.join("d/l")).unwrap();
    let mut action = cp("/d", "/d2");
    action.follow_symlink = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(
        fs::read_link(r.dest.join("d2/l")).unwrap(),
        Path::new("../target")
    );
}

#[test]
fn mode_override_applies_to_files_and_directories_keeping_special_bits() {
    let r = roots();
    write(&r.src.join("d/f"), "F", 0o644);
    write(&r.src.join("d/s"), "S", 0o4755);
    fs::set_permissions(r.src.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut action = cp("/d", "/out");
    action.mode = 0o700;
    run_copy(&r, &action).unwrap();
    assert_eq!(mode(&r.dest.join("out")), 0o700);
    assert_eq!(mode(&r.dest.join("out/f")), 0o700);
    assert_eq!(mode(&r.dest.join("out/s")), 0o4700);
}

#[test]
fn timestamp_sets_mtimes_and_minus_one_keeps_the_sources() {
    let r = roots();
    write(&r.src.join("d/f"), "F", 0o644);
    set_mtime(&r.src.join("d/f"), 2_000_000);
    set_mtime(&r.src.join("d"), 3_000_000);
    run_copy(&r, &cp("/d", "/kept")).unwrap();
    assert_eq!(
        fs::metadata(r.dest.join("kept/f")).unwrap().mtime(),
        2_000_000
    );
    assert_eq!(
        fs::metadata(r.dest.join("kept")).unwrap().mtime(),
        3_000_000
    );

    let mut action = cp("/d", "/stamped/in");
    action.timestamp = 1_600_000_000_123_456_789;
    run_copy(&r, &action).unwrap();
    // The created parent `stamped` got the timestamp too, but creating `in` inside it
    // moved its mtime again, exactly as in BuildKit.
    for path in ["stamped/in", "stamped/in/f"] {
        let meta = fs::metadata(r.dest.join(path)).unwrap();
        assert_eq!(
            (meta.mtime(), meta.mtime_nsec()),
            (1_600_000_000, 123_456_789),
            "{path}"
        );
    }
}

#[test]
fn include_and_exclude_patterns() {
    let r = roots();
    for path in [
        "app/main.rs",
        "app/debug.log",
        "app/keep.log",
        "app/deep/x.log",
        "app/deep/y.rs",
        "docs/readme.md",
        "skip/inner/keep.rs",
    ] {
        write(&r.src.join(path), path, 0o644);
    }
    let mut action = cp("/", "/ex");
    action.dir_copy_contents = true;
    action.exclude_patterns = vec!["**/*.log".into(), "!app/keep.log".into(), "skip".into()];
    run_copy(&r, &action).unwrap();
    assert_eq!(
        listing(&r.dest.join("ex")),
        set(&[
            "app/",
            "app/main.rs",
            "app/keep.log",
            "app/deep/",
            "app/deep/y.rs",
            "docs/",
            "docs/readme.md",
        ])
    );

    // Include: only matching paths, and only the directories leading to them.
    let mut action = cp("/", "/in");
    action.dir_copy_contents = true;
    action.include_patterns = vec!["app/*/y.rs".into(), "docs".into()];
    run_copy(&r, &action).unwrap();
    assert_eq!(
        listing(&r.dest.join("in")),
        set(&[
            "app/",
            "app/deep/",
            "app/deep/y.rs",
            "docs/",
            "docs/readme.md"
        ])
    );

    // Both: an exclude removes what an include selected.
    let mut action = cp("/app", "/both");
    action.dir_copy_contents = true;
    action.include_patterns = vec!["*.log".into()];
    action.exclude_patterns = vec!["debug.log".into()];
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest.join("both")), set(&["keep.log"]));
}

#[test]
fn hardlinks_within_a_copy_stay_hardlinks() {
    let r = roots();
    write(&r.src.join("d/a"), "shared", 0o644);
    fs::create_dir(r.src.join("d/sub")).unwrap();
    fs::hard_link(r.src.join("d/a"), r.src.join("d/sub/b")).unwrap();
    write(&r.src.join("d/c"), "alone", 0o644);
    run_copy(&r, &cp("/d", "/out")).unwrap();
    let a = fs::metadata(r.dest.join("out/a")).unwrap();
    let b = fs::metadata(r.dest.join("out/sub/b")).unwrap();
    let c = fs::metadata(r.dest.join("out/c")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    assert_ne!(a.ino(), c.ino());
    assert_ne!(
        a.ino(),
        fs::metadata(r.src.join("d/a")).unwrap().ino(),
        "a copy, not a link to the source"
    );
}

#[test]
fn xattrs_are_copied_where_allowed() {
    let r = roots();
    write(&r.src.join("f"), "F", 0o644);
    if xattr::set(r.src.join("f"), "user.kiln", b"v").is_err() {
        // The temp file system has no user xattrs: nothing to observe here.
        assert!(
            !kiln_testsupport::in_ci(),
            "user xattrs unsupported under CI"
        );
        return;
    }
    run_copy(&r, &cp("/f", "/g")).unwrap();
    assert_eq!(
        xattr::get(r.dest.join("g"), "user.kiln").unwrap(),
        Some(b"v".to_vec())
    );
}

#[test]
fn scratch_source_root_copies_like_buildkit() {
    // testMountStubsDirectory's last step: copy a tree into an empty (scratch) root.
    let r = roots();
    write(&r.src.join("test/baz/keep"), "", 0o644);
    fs::create_dir(r.src.join("test/qux")).unwrap();
    let mut action = cp("/test", "/");
    action.dir_copy_contents = true;
    action.create_dest_path = false;
    run_copy(&r, &action).unwrap();
    assert_eq!(listing(&r.dest), set(&["baz/", "baz/keep", "qux/"]));
}

// --- mkdir, mkfile, rm ---------------------------------------------------------------

fn mkdir_action(path: &str, mode: i32, parents: bool) -> pb::FileActionMkDir {
    pb::FileActionMkDir {
        path: path.into(),
        mode,
        make_parents: parents,
        owner: None,
        timestamp: -1,
    }
}

#[test]
fn mkdir_with_and_without_parents() {
    let r = roots();
    fileop::mkdir(&r.dest, &mkdir_action("/a/b/c", 0o700, true), None).unwrap();
    for path in ["a", "a/b", "a/b/c"] {
        assert_eq!(mode(&r.dest.join(path)), 0o700, "{path}");
    }
    // Existing directory with makeParents: fine, untouched.
    fileop::mkdir(&r.dest, &mkdir_action("/a/b", 0o755, true), None).unwrap();
    assert_eq!(mode(&r.dest.join("a/b")), 0o700);
    // Without parents: the parent must exist.
    let err = fileop::mkdir(&r.dest, &mkdir_action("/x/y", 0o755, false), None)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "mkdir /x/y: /x: no such file or directory");
    fileop::mkdir(&r.dest, &mkdir_action("/a/d", 0o751, false), None).unwrap();
    assert_eq!(mode(&r.dest.join("a/d")), 0o751);
    // An existing entry without makeParents is not an error in BuildKit (EEXIST ignored).
    fileop::mkdir(&r.dest, &mkdir_action("/a/d", 0o700, false), None).unwrap();
    assert_eq!(mode(&r.dest.join("a/d")), 0o751);
    // A file in the way with makeParents is.
    write(&r.dest.join("file"), "", 0o644);
    let err = fileop::mkdir(&r.dest, &mkdir_action("/file/sub", 0o755, true), None)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "mkdir /file/sub: /file: not a directory");
    // The timestamp lands on the created leaf.
    let mut action = mkdir_action("/t", 0o755, true);
    action.timestamp = 1_234_000_000_000;
    fileop::mkdir(&r.dest, &action, None).unwrap();
    assert_eq!(fs::metadata(r.dest.join("t")).unwrap().mtime(), 1234);
}

fn mkfile_action(path: &str, data: &str, mode: i32) -> pb::FileActionMkFile {
    pb::FileActionMkFile {
        path: path.into(),
        mode,
        data: data.as_bytes().to_vec(),
        owner: None,
        timestamp: -1,
    }
}

#[test]
fn mkfile_creates_overwrites_and_refuses_directories() {
    let r = roots();
    fileop::mkfile(&r.dest, &mkfile_action("/f", "one", 0o600), None).unwrap();
    assert_eq!(read(&r.dest.join("f")), "one");
    assert_eq!(mode(&r.dest.join("f")), 0o600);
    // Overwrite: truncated, rewritten, the existing mode kept (os.WriteFile).
    let mut action = mkfile_action("/f", "2", 0o644);
    action.timestamp = 5_000_000_000;
    fileop::mkfile(&r.dest, &action, None).unwrap();
    assert_eq!(read(&r.dest.join("f")), "2");
    assert_eq!(mode(&r.dest.join("f")), 0o600);
    assert_eq!(fs::metadata(r.dest.join("f")).unwrap().mtime(), 5);
    fs::create_dir(r.dest.join("dir")).unwrap();
    let err = fileop::mkfile(&r.dest, &mkfile_action("/dir", "x", 0o644), None)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "mkfile /dir: /dir: is a directory");
    let err = fileop::mkfile(&r.dest, &mkfile_action("/no/f", "x", 0o644), None)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "mkfile /no/f: /no: no such file or directory");
}

fn rm_action(path: &str, allow_not_found: bool, wildcard: bool) -> pb::FileActionRm {
    pb::FileActionRm {
        path: path.into(),
        allow_not_found,
        allow_wildcard: wildcard,
    }
}

#[test]
fn rm_files_trees_wildcards_and_missing_paths() {
    let r = roots();
    write(&r.dest.join("tree/a/b/c"), "c", 0o644);
    symlink("/", r.dest.join("tree/a/root")).unwrap();
    write(&r.dest.join("x.tmp"), "", 0o644);
    write(&r.dest.join("y.tmp"), "", 0o644);
    write(&r.dest.join("keep"), "", 0o644);
    fileop::rm(&r.dest, &rm_action("/tree", false, false)).unwrap();
    assert!(!r.dest.join("tree").exists());
    fileop::rm(&r.dest, &rm_action("/*.tmp", false, true)).unwrap();
    assert_eq!(listing(&r.dest), set(&["keep"]));
    let err = fileop::rm(&r.dest, &rm_action("/gone", false, false))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "rm /gone: /gone: no such file or directory");
    fileop::rm(&r.dest, &rm_action("/gone", true, false)).unwrap();
    fileop::rm(&r.dest, &rm_action("/gone/deeper", true, false)).unwrap();
    // Removing a symlink removes the link, not its target.
    write(&r.dest.join("t/f"), "", 0o644);
    symlink("t", r.dest.join("l")).unwrap();
    fileop::rm(&r.dest, &rm_action("/l", false, false)).unwrap();
    assert!(r.dest.join("t/f").exists() && fs::symlink_metadata(r.dest.join("l")).is_err());
    // A dangling link exists as a link, and goes.
    symlink("nowhere", r.dest.join("dangling")).unwrap();
    fileop::rm(&r.dest, &rm_action("/dangling", false, false)).unwrap();
    assert!(fs::symlink_metadata(r.dest.join("dangling")).is_err());
    let err = fileop::rm(&r.dest, &rm_action("/", true, false))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "rm /: /: invalid empty path");
}

// --- owners --------------------------------------------------------------------------

fn by_id(id: u32) -> Option<pb::UserOpt> {
    Some(pb::UserOpt {
        user: Some(pb::user_opt::User::ById(id)),
    })
}

fn by_name(name: &str) -> Option<pb::UserOpt> {
    Some(pb::UserOpt {
        user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
            name: name.into(),
            input: 0,
        })),
    })
}

fn chown(user: Option<pb::UserOpt>, group: Option<pb::UserOpt>) -> pb::ChownOpt {
    pb::ChownOpt { user, group }
}

/// A root with `/etc` as a symlink (resolved in-root) to passwd and group files.
fn user_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("conf/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1500:1600::/home/app:/bin/sh\n",
        0o644,
    );
    write(
        &dir.path().join("conf/group"),
        "root:x:0:\nstaff:x:50:app\napp:x:1600:\n",
        0o644,
    );
    symlink("/conf", dir.path().join("etc")).unwrap();
    dir
}

#[test]
fn owners_resolve_like_buildkits_read_user() {
    let users = user_root();
    let root = Some(users.path());
    let resolve = |c: pb::ChownOpt| resolve_owner(Some(&c), root, root).unwrap();
    assert_eq!(resolve_owner(None, None, None).unwrap(), None);
    assert_eq!(
        resolve(chown(by_id(7), None)),
        Some(Owner { uid: 7, gid: 7 })
    );
    assert_eq!(
        resolve(chown(by_name("app"), None)),
        Some(Owner {
            uid: 1500,
            gid: 1600
        })
    );
    assert_eq!(
        resolve(chown(by_name("app"), by_name("staff"))),
        Some(Owner { uid: 1500, gid: 50 })
    );
    assert_eq!(
        resolve(chown(by_name("app"), by_id(9))),
        Some(Owner { uid: 1500, gid: 9 })
    );
    assert_eq!(
        resolve(chown(None, by_name("staff"))),
        Some(Owner { uid: 0, gid: 50 })
    );
    // Unknown names are root, as in BuildKit (no error there).
    assert_eq!(
        resolve(chown(by_name("ghost"), by_name("nogroup"))),
        Some(Owner { uid: 0, gid: 0 })
    );
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        resolve_owner(Some(&chown(by_name("app"), None)), Some(empty.path()), None).unwrap(),
        Some(Owner { uid: 0, gid: 0 }),
        "no passwd file: not found"
    );
    let err = resolve_owner(Some(&chown(by_name("app"), None)), None, None).unwrap_err();
    assert_eq!(err.to_string(), "invalid missing user mount");
    let err = resolve_owner(Some(&chown(None, by_name("app"))), root, None).unwrap_err();
    assert_eq!(err.to_string(), "invalid missing group mount");
}

fn owner_of(path: &Path) -> (u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

/// Copies, mkdirs and mkfiles with and without owners; returns a description of what
/// went wrong, so it can run as root or inside the rootless namespace.
fn ownership_scenario() -> anyhow::Result<()> {
    let r = roots();
    write(&r.src.join("d/f"), "F", 0o644);
    symlink("f", r.src.join("d/l")).unwrap();
    nix::unistd::chown(
        &r.src.join("d/f"),
        Some(nix::unistd::Uid::from_raw(4321)),
        Some(nix::unistd::Gid::from_raw(4322)),
    )?;
    // Without an owner the source ids are kept.
    fileop::copy(&r.src, &r.dest, &cp("/d", "/plain"), None)?;
    anyhow::ensure!(owner_of(&r.dest.join("plain/f")) == (4321, 4322));
    // By id: everything copied, and the parents created for it.
    let owner = resolve_owner(Some(&chown(by_id(1234), None)), None, None)?;
    fileop::copy(&r.src, &r.dest, &cp("/d", "/new/parent/d"), owner)?;
    for path in [
        "new",
        "new/parent",
        "new/parent/d",
        "new/parent/d/f",
        "new/parent/d/l",
    ] {
        anyhow::ensure!(
            owner_of(&r.dest.join(path)) == (1234, 1234),
            "{path}: {:?}",
            owner_of(&r.dest.join(path))
        );
    }
    // By name, from the passwd/group of the given root.
    let users = user_root();
    let owner = resolve_owner(
        Some(&chown(by_name("app"), by_name("staff"))),
        Some(users.path()),
        Some(users.path()),
    )?;
    let mut mkdir = mkdir_action("/owned/dir", 0o755, true);
    mkdir.owner = Some(chown(by_name("app"), by_name("staff")));
    fileop::mkdir(&r.dest, &mkdir, owner)?;
    anyhow::ensure!(owner_of(&r.dest.join("owned/dir")) == (1500, 50));
    fileop::mkfile(&r.dest, &mkfile_action("/owned/f", "x", 0o644), owner)?;
    anyhow::ensure!(owner_of(&r.dest.join("owned/f")) == (1500, 50));
    Ok(())
}

#[test]
fn ownership_by_id_and_name_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    ownership_scenario().unwrap();
}

#[test]
fn ownership_rootless_within_the_mapping_and_a_clear_error_outside() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    let code = kiln_executor::userns::run_in_user_namespace(|| {
        let outside = || -> anyhow::Result<()> {
            let r = roots();
            write(&r.src.join("f"), "F", 0o644);
            let owner = Some(Owner {
                uid: 3_000_000_000,
                gid: 3_000_000_000,
            });
            let err = match fileop::copy(&r.src, &r.dest, &cp("/f", "/g"), owner) {
                Ok(()) => anyhow::bail!("chown outside the mapping succeeded"),
                Err(e) => e.to_string(),
            };
            anyhow::ensure!(
                err.contains("is not mapped in this user namespace"),
                "unclear error: {err}"
            );
            Ok(())
        };
        match ownership_scenario().and_then(|()| outside()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("rootless ownership: {e:#}");
                1
            }
        }
    })
    .expect("enter the user namespace");
    assert_eq!(code, 0, "the rootless body failed (see its output)");
}

// --- ADD archives --------------------------------------------------------------------

fn tar_bytes() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o750);
    dir.set_size(0);
    dir.set_mtime(1_000_000);
    builder.append_data(&mut dir, "pkg/", &[][..]).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o640);
    file.set_size(5);
    file.set_mtime(2_000_000);
    builder
        .append_data(&mut file, "pkg/file", &b"hello"[..])
        .unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder.append_link(&mut link, "pkg/link", "file").unwrap();
    let mut hard = tar::Header::new_gnu();
    hard.set_entry_type(tar::EntryType::Link);
    // Writers record the file's mode on a hard link entry; Docker applies it.
    hard.set_mode(0o640);
    hard.set_mtime(2_000_000);
    hard.set_size(0);
    builder
        .append_link(&mut hard, "pkg/hard", "pkg/file")
        .unwrap();
    builder.into_inner().unwrap()
}

fn check_unpacked(dir: &Path) {
    assert_eq!(read(&dir.join("pkg/file")), "hello");
    assert_eq!(mode(&dir.join("pkg/file")), 0o640);
    assert_eq!(mode(&dir.join("pkg")), 0o750);
    assert_eq!(fs::metadata(dir.join("pkg")).unwrap().mtime(), 1_000_000);
    assert_eq!(
        fs::metadata(dir.join("pkg/file")).unwrap().mtime(),
        2_000_000
    );
    assert_eq!(
        fs::read_link(dir.join("pkg/link")).unwrap(),
        Path::new("file")
    );
    assert_eq!(
        fs::metadata(dir.join("pkg/hard")).unwrap().ino(),
        fs::metadata(dir.join("pkg/file")).unwrap().ino()
    );
}

#[test]
fn add_unpacks_plain_and_compressed_archives_and_copies_anything_else() {
    let r = roots();
    let plain = tar_bytes();
    fs::write(r.src.join("plain.tar"), &plain).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    fs::write(r.src.join("a.tar.gz"), gz.finish().unwrap()).unwrap();
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    bz.write_all(&plain).unwrap();
    fs::write(r.src.join("a.tar.bz2"), bz.finish().unwrap()).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&plain).unwrap();
    fs::write(r.src.join("a.tar.xz"), xz.finish().unwrap()).unwrap();
    // Not archives: text, and gzip of text.
    fs::write(r.src.join("notes.txt"), "just text").unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"not a tar").unwrap();
    fs::write(r.src.join("text.gz"), gz.finish().unwrap()).unwrap();

    for (name, dest) in [
        ("plain.tar", "/x/plain"),
        ("a.tar.gz", "/x/gz/"),
        ("a.tar.bz2", "/x/bz2"),
        ("a.tar.xz", "/x/xz"),
    ] {
        let mut action = cp(&format!("/{name}"), dest);
        action.attempt_unpack_docker_compatibility = true;
        run_copy(&r, &action).unwrap();
        check_unpacked(&r.dest.join(dest.trim_start_matches('/')));
    }
    let mut action = cp("/notes.txt", "/x/notes.txt");
    action.attempt_unpack_docker_compatibility = true;
    run_copy(&r, &action).unwrap();
    assert_eq!(read(&r.dest.join("x/notes.txt")), "just text");
    let mut action = cp("/text.gz", "/x/");
    action.attempt_unpack_docker_compatibility = true;
    run_copy(&r, &action).unwrap();
    assert!(
        r.dest.join("x/text.gz").is_file(),
        "a non-tar gzip is copied as is"
    );
    // Without the flag an archive is just a file.
    run_copy(&r, &cp("/plain.tar", "/y/plain.tar")).unwrap();
    assert_eq!(fs::read(r.dest.join("y/plain.tar")).unwrap(), plain);
}

// --- the conformance corpus ----------------------------------------------------------

/// The RUN steps of the corpus whose results later FileOps copy, done by hand.
fn simulate_exec(args: &[String], root: &Path) {
    let script = args.join(" ");
    if script.contains("echo -n built > /out/a") {
        write(&root.join("out/a"), "built", 0o644);
        write(&root.join("out/b"), "second", 0o644);
    } else if script.contains("echo -n other > /data/c") {
        write(&root.join("data/c"), "other", 0o644);
    } else if script == "touch /test/baz/keep" {
        write(&root.join("test/baz/keep"), "", 0o644);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

struct Corpus {
    work: tempfile::TempDir,
    ops: HashMap<String, pb::Op>,
    results: HashMap<String, PathBuf>,
    counter: usize,
    file_ops_run: usize,
}

impl Corpus {
    fn fresh_dir(&mut self) -> PathBuf {
        self.counter += 1;
        let dir = self.work.path().join(self.counter.to_string());
        fs::create_dir(&dir).unwrap();
        dir
    }

    /// The result of op `digest` as a directory (built once).
    fn result(&mut self, digest: &str) -> PathBuf {
        if let Some(done) = self.results.get(digest) {
            return done.clone();
        }
        let op = self.ops[digest].clone();
        let inputs: Vec<PathBuf> = op.inputs.iter().map(|i| self.result(&i.digest)).collect();
        let out = self.fresh_dir();
        match op.op {
            Some(pb::op::Op::Source(_)) => kiln_testsupport::unpack_test_image("busybox", &out),
            Some(pb::op::Op::Exec(exec)) => {
                copy_tree(&inputs[0], &out);
                let args = exec.meta.map(|m| m.args).unwrap_or_default();
                simulate_exec(&args, &out);
            }
            Some(pb::op::Op::File(file)) => {
                self.run_file_op(&file, &inputs, &out);
                self.file_ops_run += 1;
            }
            _ => copy_tree(&inputs[0], &out),
        }
        self.results.insert(digest.to_owned(), out.clone());
        out
    }

    /// Runs the actions in order; `out` receives the action with output 0.
    fn run_file_op(&mut self, file: &pb::FileOp, inputs: &[PathBuf], out: &Path) {
        let mut actions: Vec<PathBuf> = Vec::new();
        let resolve = |index: i64, actions: &[PathBuf], scratch: &Path| -> PathBuf {
            match usize::try_from(index) {
                Err(_) => scratch.to_owned(),
                Ok(i) if i < inputs.len() => inputs[i].clone(),
                Ok(i) => actions[i - inputs.len()].clone(),
            }
        };
        for action in &file.actions {
            let scratch = self.fresh_dir();
            let dest = self.fresh_dir();
            copy_tree(&resolve(action.input, &actions, &scratch), &dest);
            let owner_of = |c: Option<&pb::ChownOpt>| {
                let root_for =
                    |u: &Option<pb::UserOpt>| match u.as_ref().and_then(|u| u.user.as_ref()) {
                        Some(pb::user_opt::User::ByName(n)) => {
                            Some(resolve(n.input, &actions, &scratch))
                        }
                        _ => None,
                    };
                let (user_root, group_root) = match c {
                    Some(c) => (root_for(&c.user), root_for(&c.group)),
                    None => (None, None),
                };
                resolve_owner(c, user_root.as_deref(), group_root.as_deref()).unwrap()
            };
            match action.action.as_ref().unwrap() {
                pb::file_action::Action::Mkdir(a) => {
                    fileop::mkdir(&dest, a, owner_of(a.owner.as_ref())).unwrap()
                }
                pb::file_action::Action::Mkfile(a) => {
                    fileop::mkfile(&dest, a, owner_of(a.owner.as_ref())).unwrap()
                }
                pb::file_action::Action::Rm(a) => fileop::rm(&dest, a).unwrap(),
                pb::file_action::Action::Copy(a) => {
                    let src = resolve(action.secondary_input, &actions, &scratch);
                    fileop::copy(&src, &dest, a, owner_of(a.owner.as_ref())).unwrap()
                }
            }
            if action.output == 0 {
                copy_tree(&dest, out);
            }
            actions.push(dest);
        }
    }
}

#[test]
fn every_corpus_file_op_runs_over_busybox_with_the_expected_shape() {
    if !require(is_root(), "root (busybox ownership)") {
        return;
    }
    let mut checked = 0;
    for (name, path) in kiln_testsupport::conformance_defs() {
        let def = kiln_proto::decode_definition(&fs::read(&path).unwrap()).unwrap();
        let decoded = kiln_proto::decode_ops(&def).unwrap();
        if !decoded
            .iter()
            .any(|d| matches!(d.op.op, Some(pb::op::Op::File(_))))
        {
            continue;
        }
        let mut corpus = Corpus {
            work: tempfile::tempdir().unwrap(),
            ops: decoded
                .iter()
                .map(|d| (d.digest.as_str().to_owned(), d.op.clone()))
                .collect(),
            results: HashMap::new(),
            counter: 0,
            file_ops_run: 0,
        };
        let terminal = decoded.last().unwrap().op.inputs[0].digest.clone();
        let result = corpus.result(&terminal);
        assert!(corpus.file_ops_run > 0, "{name}: no FileOp ran");
        let expect: serde_json::Value = serde_json::from_slice(
            &fs::read(path.with_file_name(format!("{name}.expect.json"))).unwrap(),
        )
        .unwrap();
        match name.as_str() {
            "df02_env_workdir_user" => {
                // WORKDIR /work, then WORKDIR sub: mkdir -p with mode 0755.
                let file_ops = corpus
                    .ops
                    .values()
                    .filter(|op| matches!(op.op, Some(pb::op::Op::File(_))));
                assert_eq!(file_ops.count(), 2);
                let work = result.join("work/sub");
                assert!(work.is_dir(), "{name}: /work/sub");
                assert_eq!(mode(&work), 0o755);
                assert_eq!(mode(&result.join("work")), 0o755);
            }
            "df03_multistage_copy_from" => {
                // The last RUN is not simulated: check the files the COPYs put in place.
                let files = expect["expect"]["files"].as_object().unwrap();
                for key in ["from-build/a", "from-build/b", "c"] {
                    assert_eq!(
                        read(&result.join(key)),
                        files[key].as_str().unwrap(),
                        "{name}: {key}"
                    );
                }
                assert_eq!(mode(&result.join("from-build")), 0o755);
                assert!(
                    result.join("bin/busybox").is_file(),
                    "the base image is still there"
                );
            }
            "testMountStubsDirectory" => {
                let want: BTreeSet<String> = expect["expect"]["file_list_exact"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(listing(&result), want, "{name}");
                assert_eq!(mode(&result.join("qux")), 0o700, "mkdir mode 448");
            }
            other => panic!("{other}: a FileOp definition without a shape check"),
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "the corpus has three definitions with FileOps");
}
