//! Building a step's mount tree inside its new mount namespace, then `pivot_root`.
//!
//! Everything is fd-based: mount targets are resolved in-root (so a rootfs symlink cannot
//! redirect a mount to the host), filesystems are created detached with `fsopen`/`fsmount`
//! and bind sources cloned with `open_tree`, attributes are set with `mount_setattr` on the
//! detached tree before `move_mount` attaches it (so `ro` is truly recursive:
//! CVE-2023-25809), masks use the host's `/dev/null` opened and verified before the step
//! existed (CVE-2025-31133), and `/dev` is populated with `*at()` calls on the step's own
//! tmpfs (CVE-2026-41579). Inside a user namespace, device nodes are bind mounts of the
//! host's, and sysfs falls back to a recursive read-only bind when the step shares the
//! host's network namespace.

use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use kiln_cgroup::CgroupView;

use crate::path::{self, PathError, TargetKind};
use crate::sys::{FileKind, MountAttrs, Resolve, Sys};

/// Errors from building the mount tree; each names the destination concerned.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("mount {destination}: preparing the mount point: {source}")]
    Target {
        destination: String,
        #[source]
        source: PathError,
    },
    #[error("mount {destination}: {op}: {source}")]
    Mount {
        destination: String,
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("mount {destination}: unsupported mount type {typ:?}")]
    UnsupportedType { destination: String, typ: String },
    #[error("spec has no root path")]
    NoRoot,
    #[error("the host's /dev/null is not the null device")]
    BadDevNull,
}

fn mount_err<'a>(destination: &'a str, op: &'static str) -> impl FnOnce(Errno) -> RootfsError + 'a {
    move |source| RootfsError::Mount {
        destination: destination.to_owned(),
        op,
        source,
    }
}

/// What [`prepare`] needs besides the spec.
#[derive(Debug)]
pub struct Context<'a> {
    /// `/` of kiln's mount namespace (bind sources are absolute host paths).
    pub host_root: BorrowedFd<'a>,
    /// The host's `/dev/null`, verified as the null device.
    pub host_devnull: BorrowedFd<'a>,
    pub cgroups: &'a [CgroupView],
    /// Filesystems made before the spec arrived, for the mounts that ask for them.
    pub premade: RefCell<Premade>,
}

/// Filesystems an init makes while it waits for its step (a runner started ahead: see
/// `process::run_warm`), from the mounts of the spec it was started with: a mount of the
/// step's spec that is the same entry takes its filesystem instead of making one. Only
/// those that depend on nothing the step brings: `proc` (of the init's pid namespace),
/// `tmpfs`, `devpts` and `mqueue` (of its IPC namespace); not `sysfs`, whose network
/// namespace may come with the step. Nothing of the rootfs is looked at before the step:
/// the mount points are resolved then, as for a filesystem made in place.
#[derive(Debug, Default)]
pub struct Premade {
    made: Vec<(Mount, OwnedFd)>,
}

impl Premade {
    /// Makes what it can of `spec`'s mounts; one that fails is left for the step to make
    /// (and report).
    pub fn make(sys: &dyn Sys, spec: &Spec) -> Premade {
        let made = spec
            .mounts()
            .iter()
            .flatten()
            .filter(|m| {
                matches!(
                    m.typ().as_deref(),
                    Some("proc" | "tmpfs" | "devpts" | "mqueue")
                )
            })
            .filter_map(|m| Some((m.clone(), new_filesystem(sys, m).ok()?)))
            .collect();
        Premade { made }
    }

    /// The filesystem made for a mount that is the same entry as `m`.
    fn take(&mut self, m: &Mount) -> Option<OwnedFd> {
        let i = self.made.iter().position(|(made, _)| made == m)?;
        Some(self.made.swap_remove(i).1)
    }
}

/// The filesystem source `m` shows in `/proc/mounts` (its type when it names none).
fn filesystem_source(m: &Mount, typ: &str) -> (String, Option<String>) {
    // /proc/mounts shows a mount's source (runc passes it to mount(2)); a filesystem
    // context shows "none" unless the source is set, and build tools read it there.
    let source = m
        .source()
        .as_ref()
        .map_or_else(|| typ.to_owned(), |s| s.to_string_lossy().into_owned());
    ("source".to_owned(), Some(source))
}

/// A detached filesystem for `m`, a `proc`, `sysfs`, `tmpfs`, `devpts` or `mqueue` mount:
/// `proc` and `sysfs` with their source only, the others with the options' data too.
fn new_filesystem(sys: &dyn Sys, m: &Mount) -> Result<OwnedFd, Errno> {
    let typ = m.typ().as_deref().unwrap_or("bind");
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let source = filesystem_source(m, typ);
    match typ {
        "proc" | "sysfs" => sys.new_filesystem(typ, std::slice::from_ref(&source), options.attrs),
        "tmpfs" | "devpts" | "mqueue" => {
            let mut data = vec![source];
            data.extend(options.data);
            match sys.new_filesystem(typ, &data, options.attrs) {
                // gid=5 does not exist in a single-id user namespace.
                Err(Errno::EINVAL) if typ == "devpts" => {
                    data.retain(|(k, _)| k != "gid");
                    sys.new_filesystem(typ, &data, options.attrs)
                }
                other => other,
            }
        }
        _ => Err(Errno::EINVAL),
    }
}

/// Mount options split into mount attributes, recursion and filesystem data.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    attrs: MountAttrs,
    recursive: bool,
    data: Vec<(String, Option<String>)>,
}

fn parse_options(options: &[String]) -> Options {
    let mut out = Options::default();
    for option in options {
        match option.as_str() {
            "ro" => out.attrs.readonly = true,
            "rw" | "bind" | "strictatime" | "relatime" | "noatime" | "private" | "rprivate"
            | "slave" | "rslave" => {}
            "rbind" => out.recursive = true,
            "nosuid" => out.attrs.nosuid = true,
            "nodev" => out.attrs.nodev = true,
            "noexec" => out.attrs.noexec = true,
            other => match other.split_once('=') {
                Some((k, v)) => out.data.push((k.to_owned(), Some(v.to_owned()))),
                None => out.data.push((other.to_owned(), None)),
            },
        }
    }
    out
}

/// Builds the mount tree described by `spec` and returns a descriptor of the new root
/// (before `pivot_root`).
pub fn prepare(sys: &dyn Sys, spec: &Spec, ctx: &Context<'_>) -> Result<OwnedFd, RootfsError> {
    sys.make_rslave_root()
        .map_err(mount_err("/", "make rslave"))?;
    let root_path = spec.root().as_ref().ok_or(RootfsError::NoRoot)?.path();
    // Bind the rootfs onto itself: pivot_root needs a mount point, and the step's root
    // becomes a mount of its own that nothing outside this namespace shares.
    let tree = sys
        .clone_tree(ctx.host_root, root_path, true)
        .map_err(mount_err("/", "clone rootfs"))?;
    let target = open_host_dir(sys, ctx.host_root, root_path)?;
    sys.move_mount_onto(tree.as_fd(), target.as_fd())
        .map_err(mount_err("/", "attach rootfs"))?;
    let root = open_host_dir(sys, ctx.host_root, root_path)?;

    let mut dev_is_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(sys, root.as_fd(), m, ctx).map_err(|e| match e {
            RootfsError::Path(source) => RootfsError::Target {
                destination: m.destination().to_string_lossy().into_owned(),
                source,
            },
            other => other,
        })?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        populate_dev(sys, root.as_fd(), spec, ctx)?;
    }
    if let Some(linux) = spec.linux() {
        for masked in linux.masked_paths().iter().flatten() {
            mask(sys, root.as_fd(), masked, ctx.host_devnull)?;
        }
        for readonly in linux.readonly_paths().iter().flatten() {
            make_readonly(sys, root.as_fd(), readonly)?;
        }
    }
    Ok(root)
}

/// Makes the root mount read-only when the spec asks (after all mount points exist).
pub fn finish_root(sys: &dyn Sys, spec: &Spec, root: BorrowedFd<'_>) -> Result<(), RootfsError> {
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    if readonly {
        let attrs = MountAttrs {
            readonly: true,
            ..MountAttrs::default()
        };
        sys.mount_setattr(root, false, attrs)
            .map_err(mount_err("/", "make rootfs read-only"))?;
    }
    Ok(())
}

fn open_host_dir(
    sys: &dyn Sys,
    host_root: BorrowedFd<'_>,
    path: &Path,
) -> Result<OwnedFd, RootfsError> {
    sys.openat2(
        host_root,
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
        Resolve::default(),
    )
    .map_err(mount_err("/", "open rootfs"))
}

fn mount_one(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    m: &Mount,
    ctx: &Context<'_>,
) -> Result<(), RootfsError> {
    let destination = m.destination().to_string_lossy().into_owned();
    let dest = destination.as_str();
    let typ = m.typ().clone().unwrap_or_else(|| "bind".to_owned());
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let premade = || ctx.premade.borrow_mut().take(m);
    match typ.as_str() {
        "proc" | "sysfs" => {
            // The target is almost always there: check it first, create it only if missing.
            let target = match path::open_plain_directory(sys, root, dest) {
                Err(PathError::Sys {
                    source: Errno::ENOENT,
                    ..
                }) => {
                    path::ensure_target(sys, root, dest, TargetKind::Directory)?;
                    path::open_plain_directory(sys, root, dest)?
                }
                opened => opened?,
            };
            let fs = match premade().map_or_else(|| new_filesystem(sys, m), Ok) {
                Ok(fs) => fs,
                // sysfs needs a network namespace kiln owns; sharing the host's network from
                // a user namespace, show the host's /sys read-only instead.
                Err(Errno::EPERM) if typ == "sysfs" => {
                    let tree = sys
                        .clone_tree(ctx.host_root, Path::new("/sys"), true)
                        .map_err(mount_err(dest, "clone /sys"))?;
                    let attrs = MountAttrs {
                        readonly: true,
                        ..options.attrs
                    };
                    sys.mount_setattr(tree.as_fd(), true, attrs)
                        .map_err(mount_err(dest, "set attributes"))?;
                    tree
                }
                Err(e) => return Err(mount_err(dest, "create filesystem")(e)),
            };
            sys.move_mount_onto(fs.as_fd(), target.as_fd())
                .map_err(mount_err(dest, "attach"))
        }
        "cgroup" | "cgroup2" => mount_cgroups(sys, root, dest, &options, ctx),
        "tmpfs" | "devpts" | "mqueue" => {
            let target = path::ensure_target(sys, root, dest, TargetKind::Directory)?;
            let fs = premade()
                .map_or_else(|| new_filesystem(sys, m), Ok)
                .map_err(mount_err(dest, "create filesystem"))?;
            sys.move_mount_onto(fs.as_fd(), target.as_fd())
                .map_err(mount_err(dest, "attach"))
        }
        "bind" | "rbind" => {
            let source = m
                .source()
                .clone()
                .ok_or_else(|| RootfsError::UnsupportedType {
                    destination: destination.clone(),
                    typ: "bind without source".into(),
                })?;
            let recursive = options.recursive || typ == "rbind";
            let tree = sys
                .clone_tree(ctx.host_root, &source, recursive)
                .map_err(mount_err(dest, "clone source"))?;
            let kind = match sys.file_kind(tree.as_fd()) {
                Ok(FileKind::Directory) => TargetKind::Directory,
                _ => TargetKind::File,
            };
            let target = path::ensure_target(sys, root, dest, kind)?;
            if !options.attrs.is_empty() {
                sys.mount_setattr(tree.as_fd(), recursive, options.attrs)
                    .map_err(mount_err(dest, "set attributes"))?;
            }
            sys.move_mount_onto(tree.as_fd(), target.as_fd())
                .map_err(mount_err(dest, "attach"))
        }
        other => Err(RootfsError::UnsupportedType {
            destination,
            typ: other.to_owned(),
        }),
    }
}

fn mount_cgroups(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    dest: &str,
    options: &Options,
    ctx: &Context<'_>,
) -> Result<(), RootfsError> {
    let target = path::ensure_target(sys, root, dest, TargetKind::Directory)?;
    let bind = |source: &Path, target: BorrowedFd<'_>| -> Result<(), RootfsError> {
        let tree = sys
            .clone_tree(ctx.host_root, source, false)
            .map_err(mount_err(dest, "clone cgroup"))?;
        if !options.attrs.is_empty() {
            sys.mount_setattr(tree.as_fd(), false, options.attrs)
                .map_err(mount_err(dest, "set attributes"))?;
        }
        sys.move_mount_onto(tree.as_fd(), target)
            .map_err(mount_err(dest, "attach cgroup"))
    };
    if let [unified] = ctx.cgroups {
        if unified.name.is_empty() {
            return bind(&unified.host_path, target.as_fd());
        }
    }
    // cgroup v1: a tmpfs holding one directory per hierarchy, each the step's own cgroup.
    let tmpfs_attrs = MountAttrs {
        readonly: false,
        ..options.attrs
    };
    let fs = sys
        .new_filesystem(
            "tmpfs",
            &[
                ("source".into(), Some("tmpfs".into())),
                ("mode".into(), Some("755".into())),
            ],
            tmpfs_attrs,
        )
        .map_err(mount_err(dest, "create filesystem"))?;
    for view in ctx.cgroups {
        sys.mkdirat(
            fs.as_fd(),
            &path::name(&view.name),
            Mode::from_bits_truncate(0o755),
        )
        .map_err(mount_err(dest, "mkdir"))?;
        let sub = sys
            .openat2(
                fs.as_fd(),
                &path::name(&view.name),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
                Resolve::PLAIN_NAME,
            )
            .map_err(mount_err(dest, "open"))?;
        bind(&view.host_path, sub.as_fd())?;
    }
    if options.attrs.readonly {
        sys.mount_setattr(
            fs.as_fd(),
            false,
            MountAttrs {
                readonly: true,
                ..MountAttrs::default()
            },
        )
        .map_err(mount_err(dest, "set attributes"))?;
    }
    sys.move_mount_onto(fs.as_fd(), target.as_fd())
        .map_err(mount_err(dest, "attach"))
}

/// The device nodes every step has (runc's defaults), as (name, major, minor).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn populate_dev(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    spec: &Spec,
    ctx: &Context<'_>,
) -> Result<(), RootfsError> {
    let dev = path::open_plain_directory(sys, root, "/dev")?;
    let mut devices: Vec<(String, SFlag, u64, u64)> = DEFAULT_DEVICES
        .iter()
        .map(|(n, ma, mi)| ((*n).to_owned(), SFlag::S_IFCHR, *ma, *mi))
        .collect();
    for d in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let Some(name) = d
            .path()
            .strip_prefix("/dev")
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
        else {
            continue;
        };
        let kind = match d.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            _ => SFlag::S_IFCHR,
        };
        devices.push((name, kind, d.major() as u64, d.minor() as u64));
    }
    for (name, kind, major, minor) in devices {
        let dest = format!("/dev/{name}");
        // Nested names (net/tun) get their directory first.
        let (parent, file) = match path::split(&dest) {
            Some(split) => split,
            None => continue,
        };
        let nested;
        let parent_fd = if parent == "/dev" {
            dev.as_fd()
        } else {
            nested = path::mkdir_all(sys, root, &parent, Mode::from_bits_truncate(0o755), None)?;
            nested.as_fd()
        };
        let created = sys.mknodat(
            parent_fd,
            &path::name(&file),
            kind,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        );
        match created {
            Ok(()) | Err(Errno::EEXIST) => {}
            // No mknod in a user namespace: bind the host's node onto an empty file.
            Err(Errno::EPERM) => {
                let host = format!("/dev/{name}");
                let tree = match sys.clone_tree(ctx.host_root, Path::new(&host), false) {
                    Ok(tree) => tree,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(mount_err(&dest, "clone device")(e)),
                };
                let target = path::ensure_target(sys, root, &dest, TargetKind::File)?;
                sys.move_mount_onto(tree.as_fd(), target.as_fd())
                    .map_err(mount_err(&dest, "bind device"))?;
            }
            Err(e) => return Err(mount_err(&dest, "mknod")(e)),
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        match sys.symlinkat(Path::new(target), dev.as_fd(), &path::name(link)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(mount_err("/dev", "symlink")(e)),
        }
    }
    Ok(())
}

fn mask(
    sys: &dyn Sys,
    root: BorrowedFd<'_>,
    masked: &str,
    devnull: BorrowedFd<'_>,
) -> Result<(), RootfsError> {
    let target = match path::open(sys, root, masked, OFlag::O_PATH | OFlag::O_NOFOLLOW) {
        Ok(fd) => fd,
        Err(PathError::Sys {
            source: Errno::ENOENT | Errno::ENOTDIR,
            ..
        }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let readonly = MountAttrs {
        readonly: true,
        ..MountAttrs::default()
    };
    let cover = match sys
        .file_kind(target.as_fd())
        .map_err(mount_err(masked, "stat"))?
    {
        FileKind::Directory => sys
            .new_filesystem(
                "tmpfs",
                &[
                    ("source".into(), Some("tmpfs".into())),
                    ("size".into(), Some("0".into())),
                ],
                readonly,
            )
            .map_err(mount_err(masked, "create mask"))?,
        FileKind::Symlink => return Ok(()),
        _ => sys
            .clone_tree(devnull, Path::new(""), false)
            .map_err(mount_err(masked, "clone /dev/null"))?,
    };
    sys.move_mount_onto(cover.as_fd(), target.as_fd())
        .map_err(mount_err(masked, "mask"))
}

fn make_readonly(sys: &dyn Sys, root: BorrowedFd<'_>, readonly: &str) -> Result<(), RootfsError> {
    let target = match path::open(sys, root, readonly, OFlag::O_PATH | OFlag::O_NOFOLLOW) {
        Ok(fd) => fd,
        Err(PathError::Sys {
            source: Errno::ENOENT | Errno::ENOTDIR,
            ..
        }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let tree = sys
        .clone_tree(target.as_fd(), Path::new(""), true)
        .map_err(mount_err(readonly, "clone"))?;
    let attrs = MountAttrs {
        readonly: true,
        nosuid: true,
        nodev: true,
        noexec: true,
    };
    sys.mount_setattr(tree.as_fd(), true, attrs)
        .map_err(mount_err(readonly, "set read-only"))?;
    sys.move_mount_onto(tree.as_fd(), target.as_fd())
        .map_err(mount_err(readonly, "attach"))
}

/// Opens the host's `/dev/null` and checks it is the null device (1:3), so masks can
/// never expose something else (CVE-2025-31133).
pub fn open_host_devnull() -> Result<OwnedFd, RootfsError> {
    let fd = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(mount_err("/dev/null", "open"))?;
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(mount_err("/dev/null", "stat"))?;
    let is_char = stat.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_char
        || nix::sys::stat::major(stat.st_rdev) != 1
        || nix::sys::stat::minor(stat.st_rdev) != 3
    {
        return Err(RootfsError::BadDevNull);
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::recording::{Call, Node, RecordingSys};
    use oci_spec::runtime::{LinuxBuilder, RootBuilder, SpecBuilder};

    fn spec(mounts: Vec<Mount>, readonly_paths: Vec<String>, masked: Vec<String>) -> Spec {
        SpecBuilder::default()
            .root(RootBuilder::default().path("/rootfs").build().unwrap())
            .mounts(mounts)
            .linux(
                LinuxBuilder::default()
                    .masked_paths(masked)
                    .readonly_paths(readonly_paths)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    fn m(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
        let mut mount = Mount::default();
        mount
            .set_destination(dest.into())
            .set_typ(Some(typ.into()))
            .set_source(Some(source.into()))
            .set_options(Some(options.iter().map(|s| (*s).to_owned()).collect()));
        mount
    }

    fn run(sys: &RecordingSys, spec: &Spec) -> Result<Vec<Call>, RootfsError> {
        run_with(sys, spec, Premade::default())
    }

    fn run_with(
        sys: &RecordingSys,
        spec: &Spec,
        premade: Premade,
    ) -> Result<Vec<Call>, RootfsError> {
        let host = sys.root().unwrap();
        let devnull = sys.root().unwrap();
        let ctx = Context {
            host_root: host.as_fd(),
            host_devnull: devnull.as_fd(),
            cgroups: &[],
            premade: RefCell::new(premade),
        };
        prepare(sys, spec, &ctx)?;
        Ok(sys.calls())
    }

    #[test]
    fn filesystems_made_ahead_are_taken_by_the_same_mounts_only() {
        let sys = RecordingSys::new().unwrap().with("/rootfs", Node::Dir);
        let proc = m("/proc", "proc", "proc", &["nosuid", "nodev", "noexec"]);
        let shm = m("/dev/shm", "tmpfs", "shm", &["nosuid", "mode=1777"]);
        let ahead = spec(
            vec![
                proc.clone(),
                shm.clone(),
                m("/sys", "sysfs", "sysfs", &["ro"]),
                m("/run", "tmpfs", "tmpfs", &["size=1k"]),
                m("/data", "bind", "/host/data", &["rbind"]),
            ],
            vec![],
            vec![],
        );
        let premade = Premade::make(&sys, &ahead);
        let made = |calls: &[Call]| -> Vec<String> {
            calls
                .iter()
                .filter_map(|c| match c {
                    Call::NewFilesystem {
                        fstype, options, ..
                    } => Some(format!("{fstype} {}", options.join(","))),
                    _ => None,
                })
                .collect()
        };
        // Not sysfs (its network namespace may come with the step), not a bind; nothing
        // of the rootfs looked at.
        let before = sys.calls();
        assert_eq!(
            made(&before),
            [
                "proc source=proc",
                "tmpfs source=shm,mode=1777",
                "tmpfs source=tmpfs,size=1k"
            ]
        );
        assert_eq!(before.len(), 3, "{before:?}");
        // The step: the same /proc and /dev/shm entries, /run with another size.
        let step = spec(
            vec![proc, shm, m("/run", "tmpfs", "tmpfs", &["size=2k"])],
            vec![],
            vec![],
        );
        let calls = run_with(&sys, &step, premade).unwrap();
        assert_eq!(made(&calls[before.len()..]), ["tmpfs source=tmpfs,size=2k"]);
        for (tree, target) in [
            ("fs:proc", "/rootfs/proc"),
            ("fs:tmpfs", "/rootfs/dev/shm"),
            ("fs:tmpfs", "/rootfs/run"),
        ] {
            let attach = Call::MoveMount {
                tree: tree.into(),
                target: target.into(),
            };
            assert!(calls.contains(&attach), "{attach:?} in {calls:?}");
        }
    }

    #[test]
    fn proc_on_a_symlink_is_refused() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/rootfs/proc", Node::Symlink("/bad-proc".into()))
            .with("/rootfs/bad-proc", Node::Dir);
        let spec = spec(
            vec![m("/proc", "proc", "proc", &["nosuid"])],
            vec![],
            vec![],
        );
        let err = run(&sys, &spec).unwrap_err();
        assert!(err.to_string().contains("not a symlink"), "{err}");
    }

    #[test]
    fn filesystems_are_created_detached_with_attributes_then_attached() {
        let sys = RecordingSys::new().unwrap().with("/rootfs", Node::Dir);
        let spec = spec(
            vec![m(
                "/dev/shm",
                "tmpfs",
                "shm",
                &["nosuid", "nodev", "mode=1777", "size=65536k"],
            )],
            vec![],
            vec![],
        );
        let calls = run(&sys, &spec).unwrap();
        let create = calls
            .iter()
            .position(|c| matches!(c, Call::NewFilesystem { fstype, .. } if fstype == "tmpfs"))
            .unwrap();
        assert_eq!(
            calls[create],
            Call::NewFilesystem {
                fstype: "tmpfs".into(),
                options: vec![
                    "source=shm".into(),
                    "mode=1777".into(),
                    "size=65536k".into()
                ],
                attrs: MountAttrs {
                    nosuid: true,
                    nodev: true,
                    ..MountAttrs::default()
                }
            }
        );
        assert!(calls[create..].contains(&Call::MoveMount {
            tree: "fs:tmpfs".into(),
            target: "/rootfs/dev/shm".into()
        }));
        assert!(calls.contains(&Call::MakeRslave));
    }

    #[test]
    fn bind_destinations_escaping_with_dotdot_or_symlinks_stay_in_the_root() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/rootfs/etc", Node::Symlink("/".into()))
            .with("/src", Node::Dir);
        let spec = spec(
            vec![
                m("/../../../tmp/pwn", "bind", "/src", &["rbind", "ro"]),
                m("/etc/foo", "bind", "/src", &["rbind"]),
            ],
            vec![],
            vec![],
        );
        let calls = run(&sys, &spec).unwrap();
        let targets: Vec<&str> = calls
            .iter()
            .filter_map(|c| match c {
                Call::MoveMount { target, .. } => Some(target.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(targets, vec!["/rootfs", "/rootfs/tmp/pwn", "/rootfs/foo"]);
        // Read-only is applied to the whole detached tree before it is attached.
        assert!(calls.contains(&Call::SetAttr {
            path: "tree:/src".into(),
            recursive: true,
            attrs: MountAttrs {
                readonly: true,
                ..MountAttrs::default()
            }
        }));
    }

    #[test]
    fn masks_and_readonly_paths() {
        let sys = RecordingSys::new()
            .unwrap()
            .with("/rootfs/proc/kcore", Node::File)
            .with("/rootfs/proc/acpi", Node::Dir)
            .with("/rootfs/proc/sys", Node::Dir);
        let spec = spec(
            vec![],
            vec!["/proc/sys".into(), "/proc/missing".into()],
            vec![
                "/proc/kcore".into(),
                "/proc/acpi".into(),
                "/proc/nope".into(),
            ],
        );
        let calls = run(&sys, &spec).unwrap();
        assert!(calls.contains(&Call::MoveMount {
            tree: "tree:/".into(),
            target: "/rootfs/proc/kcore".into()
        }));
        assert!(calls.contains(&Call::MoveMount {
            tree: "fs:tmpfs".into(),
            target: "/rootfs/proc/acpi".into()
        }));
        assert!(calls.contains(&Call::SetAttr {
            path: "tree:/rootfs/proc/sys".into(),
            recursive: true,
            attrs: MountAttrs {
                readonly: true,
                nosuid: true,
                nodev: true,
                noexec: true
            }
        }));
    }

    #[test]
    fn option_parsing() {
        let o = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "size=1k".into(),
            "newinstance".into(),
        ]);
        assert!(o.recursive);
        assert!(o.attrs.readonly && o.attrs.nosuid && !o.attrs.nodev);
        assert_eq!(
            o.data,
            vec![
                ("size".into(), Some("1k".into())),
                ("newinstance".into(), None)
            ]
        );
    }
}
