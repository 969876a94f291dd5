//! Choosing how snapshots are stored: kernel overlayfs (rootful with `trusted.overlay.*`
//! metadata, or inside a user namespace with `userxattr` and `user.overlay.*`), or the
//! native fallback that copies the parent into each new snapshot.
//!
//! The choice is made by a real test mount under the store root (two lowers and an
//! upper, a write through the mount that must land in the upper), because whether overlay
//! works depends on the kernel, the namespace and the filesystem under the root (overlay on
//! overlay, for one, fails).

use std::path::{Path, PathBuf};

use crate::mount::{Mountable, OverlayMount, unmount};

/// Errors from probing the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("preparing the overlay probe in {path}: {source}")]
    ProbeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    UidMap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which xattr namespace overlay metadata (opaque dirs, …) uses in this store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrNamespace {
    /// `trusted.overlay.*` (real root).
    Trusted,
    /// `user.overlay.*` (overlay mounted with `userxattr` inside a user namespace).
    User,
}

impl XattrNamespace {
    /// The opaque-directory attribute name.
    pub fn opaque_key(self) -> &'static [u8] {
        match self {
            XattrNamespace::Trusted => b"trusted.overlay.opaque",
            XattrNamespace::User => b"user.overlay.opaque",
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted",
            XattrNamespace::User => "user",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<XattrNamespace> {
        match s {
            "trusted" => Some(XattrNamespace::Trusted),
            "user" => Some(XattrNamespace::User),
            _ => None,
        }
    }
}

/// How this store keeps snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Kernel overlayfs.
    Overlay { xattrs: XattrNamespace },
    /// Full copies (reflinked where possible) mounted as binds.
    Native { xattrs: XattrNamespace },
}

impl Backend {
    /// The xattr namespace layer imports write opaque markers in.
    pub fn xattrs(self) -> XattrNamespace {
        match self {
            Backend::Overlay { xattrs } | Backend::Native { xattrs } => xattrs,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Overlay { .. } => "overlay",
            Backend::Native { .. } => "native",
        }
    }
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Overlay when the probe mount works, else native (with a warning).
    #[default]
    Auto,
    /// Overlay or fail.
    Overlay,
    /// Native, even where overlay would work (tests, odd filesystems).
    Native,
}

/// Whether this process runs in a user namespace other than the initial one (then overlay
/// needs `userxattr` and only `user.*` xattrs can be written).
pub fn in_user_namespace() -> Result<bool, BackendError> {
    let path = Path::new("/proc/self/uid_map");
    let map = std::fs::read_to_string(path).map_err(|source| BackendError::UidMap {
        path: path.to_owned(),
        source,
    })?;
    let full = map.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields == ["0", "0", "4294967295"]
    });
    Ok(!full)
}

/// The outcome of the probe mount.
#[derive(Debug)]
pub struct Probe {
    pub overlay_works: bool,
    /// Why overlay does not work, when it does not.
    pub reason: Option<String>,
}

/// Mounts a two-lower overlay with an upper under `dir` and writes through it.
pub fn probe_overlay(dir: &Path, xattrs: XattrNamespace) -> Result<Probe, BackendError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BackendError::ProbeDir { path, source }
    };
    let _ = crate::fsutil::remove_tree(dir);
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let [l1, l2, upper, work, merged] =
        ["l1", "l2", "upper", "work", "merged"].map(|n| dir.join(n));
    for d in [&l1, &l2, &upper, &work, &merged] {
        std::fs::create_dir(d).map_err(io(d))?;
    }
    std::fs::write(l2.join("base"), b"2").map_err(io(&l2))?;
    std::fs::write(l1.join("top"), b"1").map_err(io(&l1))?;
    let m = Mountable::Overlay(OverlayMount {
        lowers: vec![l1, l2],
        upper: Some(upper.clone()),
        work: Some(work),
        userxattr: xattrs == XattrNamespace::User,
        volatile: true,
        plain_upper: true,
    });
    let result = match m.mount(&merged) {
        Err(e) => Probe {
            overlay_works: false,
            reason: Some(e.to_string()),
        },
        Ok(()) => {
            let write = std::fs::write(merged.join("new"), b"n");
            let seen = std::fs::read(merged.join("base")).ok();
            let umount = unmount(&merged);
            let landed = std::fs::read(upper.join("new")).ok();
            let reason = match (write, umount) {
                (Err(e), _) => Some(format!("writing through the probe overlay: {e}")),
                (_, Err(e)) => Some(e.to_string()),
                _ if seen.as_deref() != Some(b"2") => {
                    Some("the probe overlay did not show its lower layers".into())
                }
                _ if landed.as_deref() != Some(b"n") => {
                    Some("a write through the probe overlay did not reach its upper".into())
                }
                _ => None,
            };
            Probe {
                overlay_works: reason.is_none(),
                reason,
            }
        }
    };
    let _ = crate::fsutil::remove_tree(dir);
    Ok(result)
}
