//! Mount descriptions ([`Mountable`]) and how to apply them.
//!
//! Overlays are built with the new mount API: `fsopen("overlay")`, one
//! `fsconfig("lowerdir+", dir)` per layer (kernel ≥ 6.8), so a chain of hundreds of layers
//! never meets the one-page limit of a classic mount option string; `fsmount` and
//! `move_mount` attach the result. On older kernels the classic `lowerdir=a:b:…` option is
//! used, which fails clearly when the chain is too long. Binds are `open_tree` clones,
//! made read-only with `mount_setattr` before they are attached, so a read-only view is
//! never writable, not even for an instant.
//!
//! The caller must own the mount namespace it mounts in (kiln does, see docs/DESIGN.md).

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::sys;

/// Errors from mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{op} for the mount at {target}: {source}")]
    Sys {
        op: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("unmounting {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("making a directory for a read-only view at {path}: {source}")]
    ViewDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("an overlay needs at least one lower layer (mount at {0})")]
    NoLowers(PathBuf),
    #[error("overlay upperdir {upper} given without a workdir")]
    NoWork { upper: PathBuf },
    #[error(
        "the lower layer chain for {target} is {len} bytes as a lowerdir option, over the \
         {limit}-byte limit of this kernel (no lowerdir+ support)"
    )]
    ChainTooLong {
        target: PathBuf,
        len: usize,
        limit: usize,
    },
}

/// How to mount a snapshot: what the snapshotter hands to whoever mounts a step's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mountable {
    /// A bind mount of one directory.
    Bind { source: PathBuf, readonly: bool },
    /// An overlay filesystem.
    Overlay(OverlayMount),
}

/// The parts of an overlay mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayMount {
    /// Lower layers, nearest (topmost) first.
    pub lowers: Vec<PathBuf>,
    /// Writable upper layer; `None` for a read-only overlay.
    pub upper: Option<PathBuf>,
    /// Overlay work directory (same filesystem as `upper`).
    pub work: Option<PathBuf>,
    /// Overlay metadata in `user.overlay.*` (mounting inside a user namespace).
    pub userxattr: bool,
    /// Skip syncs (`volatile`): for step uppers that are committed, and synced, later.
    pub volatile: bool,
    /// Rootful only: `index=off`, `redirect_dir=off` and `metacopy=off`, so renaming a lower
    /// directory falls back to a copy (EXDEV) and the upper stays exportable as an OCI diff
    /// (`userxattr` implies the same).
    pub plain_upper: bool,
}

impl Mountable {
    /// The same snapshot, read-only: an overlay's upper becomes its top lower layer.
    pub fn readonly(&self) -> Mountable {
        match self {
            Mountable::Bind { source, .. } => Mountable::Bind {
                source: source.clone(),
                readonly: true,
            },
            Mountable::Overlay(o) => {
                let mut lowers = Vec::with_capacity(o.lowers.len() + 1);
                if let Some(upper) = &o.upper {
                    lowers.push(upper.clone());
                }
                lowers.extend(o.lowers.iter().cloned());
                if lowers.len() == 1 {
                    return Mountable::Bind {
                        source: lowers.remove(0),
                        readonly: true,
                    };
                }
                Mountable::Overlay(OverlayMount {
                    lowers,
                    upper: None,
                    work: None,
                    userxattr: o.userxattr,
                    volatile: false,
                    plain_upper: o.plain_upper,
                })
            }
        }
    }

    /// Whether mounting gives a read-only filesystem.
    pub fn is_readonly(&self) -> bool {
        match self {
            Mountable::Bind { readonly, .. } => *readonly,
            Mountable::Overlay(o) => o.upper.is_none(),
        }
    }

    /// Mounts at `target` (an existing directory).
    pub fn mount(&self, target: &Path) -> Result<(), MountError> {
        match self {
            Mountable::Bind { source, readonly } => mount_bind(source, *readonly, target),
            Mountable::Overlay(o) => mount_overlay(o, target),
        }
    }

    /// Mounts a read-only form of this snapshot at `target`.
    pub fn mount_readonly(&self, target: &Path) -> Result<(), MountError> {
        self.readonly().mount(target)
    }
}

fn sys_err(op: impl Into<String>, target: &Path) -> impl FnOnce(Errno) -> MountError {
    let op = op.into();
    let target = target.to_owned();
    move |source| MountError::Sys { op, target, source }
}

fn mount_bind(source: &Path, readonly: bool, target: &Path) -> Result<(), MountError> {
    let tree = sys::open_tree_clone(source, true)
        .map_err(sys_err(format!("open_tree {}", source.display()), target))?;
    if readonly {
        sys::mount_setattr(tree.as_fd(), sys::MOUNT_ATTR_RDONLY, true)
            .map_err(sys_err("mount_setattr ro", target))?;
    }
    sys::move_mount(tree.as_fd(), target).map_err(sys_err("move_mount", target))
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn mount_overlay(o: &OverlayMount, target: &Path) -> Result<(), MountError> {
    if o.lowers.is_empty() {
        return Err(MountError::NoLowers(target.to_owned()));
    }
    if let (Some(upper), None) = (&o.upper, &o.work) {
        return Err(MountError::NoWork {
            upper: upper.clone(),
        });
    }
    if let (Some(work), true) = (&o.work, o.volatile) {
        // A volatile mount leaves work/work/incompat/volatile behind, and the kernel refuses
        // to mount that workdir again until it is removed. Only this handle's owner mounts
        // this workdir, so the marker is ours to clear.
        let marker = work.join("work").join("incompat");
        match std::fs::remove_dir_all(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(MountError::Sys {
                    op: format!("clearing {}", marker.display()),
                    target: target.to_owned(),
                    source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                });
            }
        }
    }
    let fs = sys::fsopen(c"overlay").map_err(sys_err("fsopen overlay", target))?;
    let fs = fs.as_fd();
    let set = |key: &std::ffi::CStr, value: &[u8]| {
        sys::fsconfig_string(fs, key, value).map_err(sys_err(
            format!(
                "fsconfig {}={}",
                key.to_string_lossy(),
                String::from_utf8_lossy(value)
            ),
            target,
        ))
    };
    let flag = |key: &std::ffi::CStr| {
        sys::fsconfig_flag(fs, key).map_err(sys_err(
            format!("fsconfig {}", key.to_string_lossy()),
            target,
        ))
    };
    if o.userxattr {
        flag(c"userxattr")?;
    }
    if o.plain_upper && !o.userxattr {
        set(c"index", b"off")?;
        set(c"redirect_dir", b"off")?;
        // A metadata-only copy-up would leave an upper file without its data, and the
        // diff export reads file data from the upper.
        set(c"metacopy", b"off")?;
    }
    match sys::fsconfig_string(fs, c"lowerdir+", path_bytes(&o.lowers[0])) {
        Ok(()) => {
            for lower in &o.lowers[1..] {
                set(c"lowerdir+", path_bytes(lower))?;
            }
        }
        Err(Errno::EINVAL) => set_classic_lowerdir(fs, &o.lowers, target)?,
        Err(e) => return Err(sys_err("fsconfig lowerdir+", target)(e)),
    }
    if let (Some(upper), Some(work)) = (&o.upper, &o.work) {
        set(c"upperdir", path_bytes(upper))?;
        set(c"workdir", path_bytes(work))?;
        if o.volatile {
            flag(c"volatile")?;
        }
    }
    sys::fsconfig_create(fs).map_err(sys_err("fsconfig create overlay", target))?;
    let attrs = if o.upper.is_none() {
        sys::MOUNT_ATTR_RDONLY
    } else {
        0
    };
    let mnt = sys::fsmount(fs, attrs).map_err(sys_err("fsmount overlay", target))?;
    sys::move_mount(mnt.as_fd(), target).map_err(sys_err("move_mount overlay", target))
}

/// Kernels before 6.8 only take the whole chain as one `lowerdir=a:b:…` string, limited to
/// a page.
fn set_classic_lowerdir(
    fs: std::os::fd::BorrowedFd<'_>,
    lowers: &[PathBuf],
    target: &Path,
) -> Result<(), MountError> {
    let mut value = Vec::new();
    for (i, lower) in lowers.iter().enumerate() {
        if i > 0 {
            value.push(b':');
        }
        for &b in path_bytes(lower) {
            // Colons and backslashes in a classic lowerdir list must be escaped.
            if b == b':' || b == b'\\' {
                value.push(b'\\');
            }
            value.push(b);
        }
    }
    let limit = 4095;
    if value.len() > limit {
        return Err(MountError::ChainTooLong {
            target: target.to_owned(),
            len: value.len(),
            limit,
        });
    }
    sys::fsconfig_string(fs, c"lowerdir", &value).map_err(sys_err("fsconfig lowerdir", target))
}

/// Unmounts `target` (it must not be busy).
pub fn unmount(target: &Path) -> Result<(), MountError> {
    nix::mount::umount2(target, nix::mount::MntFlags::UMOUNT_NOFOLLOW).map_err(|source| {
        MountError::Unmount {
            target: target.to_owned(),
            source,
        }
    })
}

/// A read-only view mounted on a private temporary directory, unmounted on drop.
pub(crate) struct View {
    pub(crate) path: PathBuf,
    _dir: tempfile::TempDir,
}

impl View {
    pub(crate) fn mount(root: &Path, mountable: &Mountable) -> Result<View, MountError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-view-")
            .tempdir_in(root)
            .map_err(|source| MountError::ViewDir {
                path: root.to_owned(),
                source,
            })?;
        let path = dir.path().join("m");
        std::fs::create_dir(&path).map_err(|source| MountError::ViewDir {
            path: path.clone(),
            source,
        })?;
        mountable.mount_readonly(&path)?;
        Ok(View { path, _dir: dir })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            tracing::warn!("unmounting {}: {e}", self.path.display());
        }
    }
}
