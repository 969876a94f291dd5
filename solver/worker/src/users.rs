//! The user databases (`/etc/passwd`, `/etc/group`) that steps resolve their
//! `user[:group]` against, read once per stretch of a layer chain that leaves those files
//! alone. A step's rootfs is an overlay of its input's chain, freshly mounted: reading the
//! two files through it looks `etc` up in every layer (each step's stubs make `etc` part of
//! its layer). A step on layers that have no entry at those paths (nor a replaced or
//! opaque `etc`) sees what the step below it saw, so the database read then is used again.

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use kiln_executor::user::UserDb;
use kiln_snapshotter::ImmutableRef;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Entries kept at most; past it the memo starts over (a worker serving many builds).
const MAX_ENTRIES: usize = 4096;

/// What the worker knows of the user databases of its layer chains.
#[derive(Debug, Default)]
pub(crate) struct UserDbs {
    memo: Mutex<Memo>,
}

#[derive(Debug, Default)]
struct Memo {
    /// The database a rootfs over a chain shows, by the chain's top layer (only those
    /// found without a symlink on the way: see [`UserDb::read_noting_symlinks`]).
    by_top: HashMap<String, Arc<UserDb>>,
    /// Whether a layer has entries that change what the files show
    /// ([`ImmutableRef::shadows_any`] of [`UserDb::PATHS`]).
    shadows: HashMap<String, bool>,
}

impl Memo {
    fn make_room(&mut self) {
        if self.by_top.len() >= MAX_ENTRIES || self.shadows.len() >= MAX_ENTRIES {
            *self = Memo::default();
        }
    }
}

impl UserDbs {
    /// The user database of the rootfs mounted at `rootfs` over `top` and its parents (with
    /// an empty upper layer or none): the one of a chain below when no layer in between
    /// has entries at its files, else read now. `None` when it cannot be read here (the
    /// spec's generation then reads it and reports why) or the rootfs has no layers.
    pub(crate) fn get(&self, top: Option<&ImmutableRef>, rootfs: &Path) -> Option<Arc<UserDb>> {
        let top = top?;
        if let Some(db) = self.known(top) {
            return Some(db);
        }
        let fd = nix::fcntl::open(
            rootfs,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let (db, plain) =
            UserDb::read_noting_symlinks(&kiln_executor::sys::LinuxSys, fd.as_fd()).ok()?;
        let db = Arc::new(db);
        if plain {
            let mut memo = self.lock();
            memo.make_room();
            memo.by_top.insert(top.id().to_owned(), db.clone());
        }
        Some(db)
    }

    /// The database recorded for `top` or for a chain below it with no shadowing layer in
    /// between (then recorded for `top` too).
    fn known(&self, top: &ImmutableRef) -> Option<Arc<UserDb>> {
        // The layers above the nearest recorded chain whose shadowing is not known yet.
        let mut unchecked = Vec::new();
        let found = {
            let memo = self.lock();
            let mut found = None;
            for layer in std::iter::once(top).chain(top.parents()) {
                if let Some(db) = memo.by_top.get(layer.id()) {
                    found = Some(db.clone());
                    break;
                }
                match memo.shadows.get(layer.id()) {
                    Some(true) => return None,
                    Some(false) => {}
                    None => unchecked.push(layer),
                }
            }
            found
        };
        // Each layer is looked at once, outside the lock (a few `fstatat`s in its
        // directory), and only up to the nearest recorded chain.
        let db = found?;
        let mut checked = Vec::with_capacity(unchecked.len());
        for layer in unchecked {
            let shadows = layer.shadows_any(&UserDb::PATHS);
            checked.push((layer.id().to_owned(), shadows));
            if shadows {
                break;
            }
        }
        let shadowing = checked.last().is_some_and(|(_, shadows)| *shadows);
        let mut memo = self.lock();
        memo.make_room();
        memo.shadows.extend(checked);
        if shadowing {
            return None;
        }
        memo.by_top.insert(top.id().to_owned(), db.clone());
        Some(db)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_executor::user::resolve;
    use kiln_snapshotter::{BackendChoice, RefOptions, Snapshotter, StoreOptions};
    use kiln_testsupport::{is_root, require};

    /// A committed layer on `parent` whose directory holds `files` (path, content).
    fn layer(
        store: &Snapshotter,
        parent: Option<&ImmutableRef>,
        files: &[(&str, &str)],
    ) -> ImmutableRef {
        let mutable = store
            .new_mutable(parent, &RefOptions::default())
            .expect("new layer");
        for (path, content) in files {
            let path = mutable.dir().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
            std::fs::write(path, content).expect("file");
        }
        mutable.commit().expect("commit")
    }

    /// A directory standing in for a mounted rootfs whose passwd names `app` with `uid`.
    fn rootfs(uid: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("rootfs");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        let passwd = format!("root:x:0:0::/root:/bin/sh\napp:x:{uid}:{uid}::/home/app:/bin/sh\n");
        std::fs::write(dir.path().join("etc/passwd"), passwd).expect("passwd");
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\n").expect("group");
        dir
    }

    fn uid_of_app(db: Option<Arc<UserDb>>) -> u32 {
        resolve("app", &db.expect("a database")).expect("app").uid
    }

    #[test]
    fn a_database_is_read_again_only_above_a_layer_with_entries_at_its_files() {
        // Overlay layers (not the native backend's full copies) need the probe mount.
        if !require(is_root(), "root (an overlay snapshot store)") {
            return;
        }
        let state = tempfile::tempdir().expect("state");
        let store = Snapshotter::open_with(
            state.path(),
            StoreOptions {
                backend: BackendChoice::Overlay,
            },
        )
        .expect("overlay store");
        let base = layer(&store, None, &[("etc/passwd", "…"), ("bin/sh", "")]);
        let quiet = layer(&store, Some(&base), &[("etc/hosts", ""), ("tmp/x", "")]);
        let empty = layer(&store, Some(&quiet), &[]);
        let edits = layer(&store, Some(&empty), &[("etc/passwd", "…")]);
        let users = UserDbs::default();

        // Each "rootfs" shows another uid: a database read from it shows which was read.
        let first = rootfs(1000);
        let second = rootfs(2000);
        assert_eq!(uid_of_app(users.get(Some(&quiet), first.path())), 1000);
        assert_eq!(
            uid_of_app(users.get(Some(&empty), second.path())),
            1000,
            "a layer without entries at the files: the database below is used"
        );
        assert_eq!(
            uid_of_app(users.get(Some(&empty), second.path())),
            1000,
            "recorded for that chain too"
        );
        assert_eq!(
            uid_of_app(users.get(Some(&edits), second.path())),
            2000,
            "a layer with an entry at etc/passwd: read again"
        );
        assert!(
            users.get(None, first.path()).is_none(),
            "no layers, nothing kept"
        );
        assert!(
            users
                .get(Some(&base), &state.path().join("missing"))
                .is_none(),
            "an unreadable rootfs is left to the spec's generation"
        );
    }
}
