//! Hostile trees for the FileOp backend: source and destination roots whose symlinks
//! point at `/`, at absolute host paths and `../..` out of the root, symlink loops, FIFOs
//! where files are expected, and archives that try to climb out. A canary directory next
//! to the roots proves nothing outside them is read or written, and every FIFO case
//! returns (a hang would never finish the test).

// Fixture helpers outside #[test] functions panic on a broken fixture by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use kiln_fileop as fileop;
use kiln_proto::pb;

/// A canary directory beside a source and a destination root.
struct World {
    dir: tempfile::TempDir,
    src: PathBuf,
    dest: PathBuf,
    canary: PathBuf,
    before: BTreeMap<String, String>,
}

/// Everything observable about a tree: type, mode, size, mtime, link count, content.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).unwrap();
        out.insert(
            dir.strip_prefix(root).unwrap().display().to_string(),
            format!("{:o} {} {}", meta.mode(), meta.mtime(), meta.nlink()),
        );
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let content = if meta.is_file() {
                fs::read_to_string(&path).unwrap()
            } else {
                String::new()
            };
            out.insert(
                path.strip_prefix(root).unwrap().display().to_string(),
                format!(
                    "{:o} {} {} {} {content}",
                    meta.mode(),
                    meta.len(),
                    meta.mtime(),
                    meta.nlink()
                ),
            );
        }
    }
    out
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    fs::create_dir_all(canary.join("sub")).unwrap();
    fs::write(canary.join("secret"), "secret").unwrap();
    let src = dir.path().join("src");
    let dest = dir.path().join("dest");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dest).unwrap();
    let before = snapshot(&canary);
    World {
        dir,
        src,
        dest,
        canary,
        before,
    }
}

impl World {
    /// Plants escaping symlinks in `root`: `/`, `../canary`, the canary's absolute path,
    /// and a long `../` chain to it.
    fn plant(&self, root: &Path) {
        symlink("/", root.join("root")).unwrap();
        symlink("../canary", root.join("up")).unwrap();
        symlink(&self.canary, root.join("abs")).unwrap();
        let chain = format!("{}{}", "../".repeat(20), self.canary.display());
        symlink(chain, root.join("deep")).unwrap();
    }

    fn assert_canary_untouched(&self) {
        assert_eq!(
            snapshot(&self.canary),
            self.before,
            "the canary outside the roots changed"
        );
        assert!(self.dir.path().join("canary/secret").is_file());
    }

    /// No file under the destination holds the canary's secret.
    fn assert_secret_not_copied(&self) {
        for (path, entry) in snapshot(&self.dest) {
            assert!(!entry.ends_with(" secret"), "{path} holds the secret");
        }
    }
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

#[test]
fn escaping_source_symlinks_read_nothing_outside_the_source_root() {
    let w = world();
    w.plant(&w.src);
    for link in ["up", "abs", "deep", "root/..", "root"] {
        for follow in [false, true] {
            let mut action = cp(&format!("/{link}/secret"), "/out");
            action.follow_symlink = follow;
            let err = fileop::copy(&w.src, &w.dest, &action, None).unwrap_err();
            assert!(
                err.to_string().ends_with("no such file or directory"),
                "{link}: {err}"
            );
        }
    }
    // The host's /etc/passwd through `root -> /` is the source root's (missing) one.
    let err = fileop::copy(&w.src, &w.dest, &cp("/root/etc/passwd", "/p"), None).unwrap_err();
    assert!(
        err.to_string().contains("no such file or directory"),
        "{err}"
    );
    // A wildcard below an escaping link: unfollowed, the link is no directory to match
    // in (no matches, as in BuildKit); followed, its in-root target does not exist.
    let mut action = cp("/up/*", "/w/");
    action.allow_wildcard = true;
    action.allow_empty_wildcard = true;
    fileop::copy(&w.src, &w.dest, &action, None).unwrap();
    assert!(!w.dest.join("w").exists());
    action.follow_symlink = true;
    assert!(fileop::copy(&w.src, &w.dest, &action, None).is_err());
    // Following a final escaping link to a directory finds nothing in-root either.
    let mut action = cp("/abs", "/followed");
    action.follow_symlink = true;
    assert!(fileop::copy(&w.src, &w.dest, &action, None).is_err());
    // Without following, the link itself is copied (as a link, never its target).
    fileop::copy(&w.src, &w.dest, &cp("/abs", "/asis"), None).unwrap();
    assert_eq!(fs::read_link(w.dest.join("asis")).unwrap(), w.canary);
    // Copying the whole source root copies the links as links.
    let mut action = cp("/", "/all");
    action.dir_copy_contents = true;
    fileop::copy(&w.src, &w.dest, &action, None).unwrap();
    assert!(
        fs::symlink_metadata(w.dest.join("all/up"))
            .unwrap()
            .is_symlink()
    );
    w.assert_secret_not_copied();
    w.assert_canary_untouched();
}

#[test]
fn escaping_destination_symlinks_keep_every_write_inside_the_destination() {
    let w = world();
    w.plant(&w.dest);
    fs::write(w.src.join("f"), "payload").unwrap();
    fs::create_dir(w.src.join("tree")).unwrap();
    fs::write(w.src.join("tree/g"), "payload").unwrap();
    let canary_in_dest = w.dest.join(w.canary.strip_prefix("/").unwrap());
    for (dest, landed) in [
        ("/up/x", w.dest.join("canary/x")),
        ("/abs/x", canary_in_dest.join("x")),
        ("/deep/x", canary_in_dest.join("x")),
        ("/root/x", w.dest.join("x")),
        ("/up/secret", w.dest.join("canary/secret")),
    ] {
        fileop::copy(&w.src, &w.dest, &cp("/f", dest), None).unwrap();
        assert_eq!(fs::read_to_string(&landed).unwrap(), "payload", "{dest}");
    }
    let mut action = cp("/tree", "/abs/");
    action.dir_copy_contents = true;
    fileop::copy(&w.src, &w.dest, &action, None).unwrap();
    assert!(canary_in_dest.join("g").is_file());

    let mkdir = pb::FileActionMkDir {
        path: "/up/made/deeper".into(),
        mode: 0o755,
        make_parents: true,
        owner: None,
        timestamp: -1,
    };
    fileop::mkdir(&w.dest, &mkdir, None).unwrap();
    assert!(w.dest.join("canary/made/deeper").is_dir());
    let mkfile = pb::FileActionMkFile {
        path: "/abs/secret".into(),
        mode: 0o644,
        data: b"overwritten".to_vec(),
        owner: None,
        timestamp: -1,
    };
    fileop::mkfile(&w.dest, &mkfile, None).unwrap();
    assert_eq!(
        fs::read_to_string(canary_in_dest.join("secret")).unwrap(),
        "overwritten"
    );
    // A dangling link in the destination gets its target created in-root.
    symlink("/var/run-target", w.dest.join("dangling")).unwrap();
    fileop::copy(&w.src, &w.dest, &cp("/f", "/dangling/f"), None).unwrap();
    assert!(w.dest.join("var/run-target/f").is_file());
    w.assert_canary_untouched();
}

#[test]
fn rm_never_follows_a_symlink_out_of_the_root() {
    let w = world();
    w.plant(&w.dest);
    let rm = |path: &str, allow_not_found: bool, wildcard: bool| {
        fileop::rm(
            &w.dest,
            &pb::FileActionRm {
                path: path.into(),
                allow_not_found,
                allow_wildcard: wildcard,
            },
        )
    };
    // Paths through escaping links name nothing in-root.
    for path in [
        "/up/secret",
        "/abs/secret",
        "/deep/sub",
        "/root/../up/secret",
    ] {
        assert!(rm(path, false, false).is_err(), "{path}");
        rm(path, true, false).unwrap();
    }
    // rm resolves wildcards without following the base's final link: nothing matches.
    rm("/abs/*", false, true).unwrap();
    assert!(
        fs::symlink_metadata(w.dest.join("abs"))
            .unwrap()
            .is_symlink()
    );
    assert!(
        rm("/up/sub/*", false, true).is_err(),
        "no in-root base for the pattern"
    );
    // Removing the links removes the links.
    rm("/abs", false, false).unwrap();
    rm("/up", false, false).unwrap();
    rm("/root", false, false).unwrap();
    assert!(fs::symlink_metadata(w.dest.join("abs")).is_err());
    // A tree holding links to the canary is removed without descending them.
    fs::create_dir_all(w.dest.join("t/inner")).unwrap();
    symlink(&w.canary, w.dest.join("t/inner/abs")).unwrap();
    symlink("../../../canary", w.dest.join("t/inner/rel")).unwrap();
    rm("/t", false, false).unwrap();
    assert!(!w.dest.join("t").exists());
    // Wildcards match links themselves and remove them, not their targets.
    symlink(&w.canary, w.dest.join("l1")).unwrap();
    symlink(&w.canary, w.dest.join("l2")).unwrap();
    rm("/l*", false, true).unwrap();
    assert!(fs::symlink_metadata(w.dest.join("l1")).is_err());
    w.assert_canary_untouched();
}

#[test]
fn symlink_loops_end_in_errors() {
    let w = world();
    symlink("b", w.src.join("a")).unwrap();
    symlink("a", w.src.join("b")).unwrap();
    symlink("self", w.dest.join("self")).unwrap();
    let err = fileop::copy(&w.src, &w.dest, &cp("/a/x", "/out"), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("too many levels of symbolic links"),
        "{err}"
    );
    let mut action = cp("/a", "/out");
    action.follow_symlink = true;
    assert!(fileop::copy(&w.src, &w.dest, &action, None).is_err());
    let mkdir = pb::FileActionMkDir {
        path: "/self/x".into(),
        mode: 0o755,
        make_parents: true,
        owner: None,
        timestamp: -1,
    };
    let err = fileop::mkdir(&w.dest, &mkdir, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("too many levels of symbolic links"),
        "{err}"
    );
    w.assert_canary_untouched();
}

#[test]
fn fifos_are_refused_and_never_opened_for_reading() {
    let w = world();
    let mkfifo = |path: &Path| {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    };
    mkfifo(&w.src.join("fifo"));
    fs::create_dir(w.src.join("dir")).unwrap();
    mkfifo(&w.src.join("dir/pipe"));
    symlink("fifo", w.src.join("to-fifo")).unwrap();

    let err = fileop::copy(&w.src, &w.dest, &cp("/fifo", "/x"), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "copy /fifo /x: /fifo: unsupported file type (fifo)"
    );
    let mut action = cp("/to-fifo", "/y");
    action.follow_symlink = true;
    action.attempt_unpack_docker_compatibility = true;
    assert!(fileop::copy(&w.src, &w.dest, &action, None).is_err());
    let err = fileop::copy(&w.src, &w.dest, &cp("/dir", "/z"), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("/dir/pipe: unsupported file type (fifo)"),
        "{err}"
    );

    // mkfile onto a FIFO (directly or through a link) is refused, never opened to write.
    mkfifo(&w.dest.join("fifo"));
    symlink("fifo", w.dest.join("to-fifo")).unwrap();
    for path in ["/fifo", "/to-fifo"] {
        let mkfile = pb::FileActionMkFile {
            path: path.into(),
            mode: 0o644,
            data: b"x".to_vec(),
            owner: None,
            timestamp: -1,
        };
        let err = fileop::mkfile(&w.dest, &mkfile, None).unwrap_err();
        assert!(
            err.to_string().ends_with("/fifo: not a regular file"),
            "{err}"
        );
    }

    // A FIFO as the passwd file of the root a name is looked up in.
    let users = tempfile::tempdir().unwrap();
    fs::create_dir(users.path().join("etc")).unwrap();
    mkfifo(&users.path().join("etc/passwd"));
    let chown = pb::ChownOpt {
        user: Some(pb::UserOpt {
            user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: "root".into(),
                input: 0,
            })),
        }),
        group: None,
    };
    let err = fileop::resolve_owner(Some(&chown), Some(users.path()), None).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    w.assert_canary_untouched();
}

fn append_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    header.set_size(data.len() as u64);
    header.set_entry_type(tar::EntryType::Regular);
    // Raw names: the tar crate's `append_data` refuses `..`, an attacker's writer does not.
    let bytes = name.as_bytes();
    header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn append_link(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    target: &str,
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(0o777);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    header.set_size(0);
    let bytes = name.as_bytes();
    header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    let target = target.as_bytes();
    header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    header.set_cksum();
    builder.append(&header, &[][..]).unwrap();
}

#[test]
fn hostile_archives_unpack_inside_the_destination_directory() {
    let w = world();
    let climb = format!("{}canary/evil", "../".repeat(8));
    let mut builder = tar::Builder::new(Vec::new());
    append_file(&mut builder, &climb, b"evil");
    append_file(&mut builder, "/abs", b"abs");
    append_link(&mut builder, tar::EntryType::Symlink, "l", "/");
    append_file(&mut builder, "l/through", b"through");
    append_link(
        &mut builder,
        tar::EntryType::Symlink,
        "up",
        "../../../canary",
    );
    append_file(&mut builder, "up/evil2", b"evil2");
    append_link(
        &mut builder,
        tar::EntryType::Symlink,
        "abs-link",
        w.canary.to_str().unwrap(),
    );
    append_file(&mut builder, "abs-link/evil3", b"evil3");
    fs::write(w.src.join("bad.tar"), builder.into_inner().unwrap()).unwrap();
    // The destination already holds a link out of the root, too.
    fs::create_dir(w.dest.join("x")).unwrap();
    symlink(&w.canary, w.dest.join("x/pre")).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    append_file(&mut builder, "pre/evil4", b"evil4");
    fs::write(w.src.join("pre.tar"), builder.into_inner().unwrap()).unwrap();

    for archive in ["/bad.tar", "/pre.tar"] {
        let mut action = cp(archive, "/x");
        action.attempt_unpack_docker_compatibility = true;
        fileop::copy(&w.src, &w.dest, &action, None).unwrap();
    }
    let x = w.dest.join("x");
    let canary_in_x = x.join(w.canary.strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(x.join("canary/evil")).unwrap(), "evil");
    assert_eq!(fs::read_to_string(x.join("abs")).unwrap(), "abs");
    assert_eq!(fs::read_to_string(x.join("through")).unwrap(), "through");
    assert_eq!(fs::read_to_string(x.join("canary/evil2")).unwrap(), "evil2");
    assert_eq!(
        fs::read_to_string(canary_in_x.join("evil3")).unwrap(),
        "evil3"
    );
    assert_eq!(
        fs::read_to_string(canary_in_x.join("evil4")).unwrap(),
        "evil4"
    );

    // A hard link to a file outside: its target is looked up inside, and is missing.
    let mut builder = tar::Builder::new(Vec::new());
    append_link(
        &mut builder,
        tar::EntryType::Link,
        "h",
        &format!("{}canary/secret", "../".repeat(8)),
    );
    append_link(
        &mut builder,
        tar::EntryType::Link,
        "h2",
        w.canary.join("secret").to_str().unwrap(),
    );
    fs::write(w.src.join("link.tar"), builder.into_inner().unwrap()).unwrap();
    let mut action = cp("/link.tar", "/hl");
    action.attempt_unpack_docker_compatibility = true;
    let err = fileop::copy(&w.src, &w.dest, &action, None).unwrap_err();
    assert!(err.to_string().contains("invalid hardlink target"), "{err}");
    w.assert_secret_not_copied();
    w.assert_canary_untouched();
}
