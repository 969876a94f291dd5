//! The OCI runtime spec of a step, with BuildKit v0.11.6's defaults
//! (../shared/spec/exec-runtime.md §2–§5): mounts and their order, capabilities per security
//! mode, masked and read-only paths, hostname, `/etc/hosts` and `resolv.conf`, rlimits from
//! `Meta.ulimit`, the user resolved from the rootfs, the cwd, and environment
//! replace-or-append semantics.
//!
//! The spec is what kiln's runner executes, and it is valid input for runc too.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use kiln_proto::pb;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use oci_spec::runtime::{
    LinuxBuilder, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::caps::{self, CapsError};
use crate::hosts::{self, ExtraHost, HostsError, Resolver};
use crate::limits::{Limits, LimitsError};
use crate::network::Attachment;
use crate::user::{self, UserDb, UserError};
use kiln_seccomp as seccomp;

/// Errors from building a step's spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("step has no command")]
    NoArgs,
    #[error("cwd {0:?} must be an absolute path")]
    RelativeCwd(String),
    #[error("opening rootfs {path}: {source}")]
    Rootfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error("unknown ulimit {0:?}")]
    UnknownUlimit(String),
    #[error("mount destination {0:?} must be an absolute path")]
    RelativeMount(String),
    #[error("building the spec: {0}")]
    Build(String),
    #[error(transparent)]
    Limits(#[from] LimitsError),
}

fn build_err(e: oci_spec::OciSpecError) -> SpecError {
    SpecError::Build(e.to_string())
}

/// `ExecOp.network` for the runtime (see [`crate::network`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// `UNSET`: a network namespace of the step's own, joined from [`Host::network`] (a
    /// sandbox network with egress through a user-space stack); without one, a new
    /// namespace with only loopback.
    Sandbox,
    /// kiln's own network namespace.
    Host,
    /// A new network namespace with only loopback.
    None,
}

impl TryFrom<i32> for Network {
    type Error = i32;
    fn try_from(mode: i32) -> Result<Self, i32> {
        match pb::NetMode::try_from(mode) {
            Ok(pb::NetMode::Unset) => Ok(Network::Sandbox),
            Ok(pb::NetMode::Host) => Ok(Network::Host),
            Ok(pb::NetMode::None) => Ok(Network::None),
            Err(_) => Err(mode),
        }
    }
}

/// `ExecOp.security` for the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    Sandbox,
    Insecure,
}

impl TryFrom<i32> for Security {
    type Error = i32;
    fn try_from(mode: i32) -> Result<Self, i32> {
        match pb::SecurityMode::try_from(mode) {
            Ok(pb::SecurityMode::Sandbox) => Ok(Security::Sandbox),
            Ok(pb::SecurityMode::Insecure) => Ok(Security::Insecure),
            Err(_) => Err(mode),
        }
    }
}

/// A prepared mount of a step. Sources are trusted host paths; destinations are resolved
/// inside the rootfs when the step starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepMount {
    pub destination: String,
    pub kind: StepMountKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepMountKind {
    Bind {
        source: PathBuf,
        readonly: bool,
        /// Extra restrictions (secret mounts are `nodev,nosuid,noexec`).
        restricted: bool,
    },
    Tmpfs {
        size: i64,
        readonly: bool,
    },
}

/// Everything about one step the spec is built from.
#[derive(Clone, Debug)]
pub struct Step {
    pub args: Vec<String>,
    /// The environment as the exec wrapper assembled it; replace-or-append applies here.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    /// `Meta.hostname`; empty means `buildkitsandbox`.
    pub hostname: String,
    pub ulimits: Vec<pb::Ulimit>,
    pub cgroup_parent: String,
    pub extra_hosts: Vec<ExtraHost>,
    pub network: Network,
    pub security: Security,
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    pub mounts: Vec<StepMount>,
    pub no_new_privileges: bool,
    /// Resource limits (`linux.resources`: pids, memory, CPU weight).
    pub limits: Limits,
}

/// Facts about where the step runs.
#[derive(Clone, Debug)]
pub struct Host {
    /// kiln runs as uid 0 of its own user namespace (rootless).
    pub in_user_namespace: bool,
    /// Directory for files all steps share (the default hosts file, resolv.conf).
    pub shared_dir: PathBuf,
    /// The step's private directory (its own hosts file, when it needs one).
    pub run_dir: PathBuf,
    /// The step id (cgroup names).
    pub id: String,
    /// The ready sandbox network a `Sandbox` step joins ([`crate::network::Lease`]).
    pub network: Option<Attachment>,
    /// A loopback-only namespace made ahead that a `None` step joins instead of making its
    /// own ([`crate::network::LoopbackNamespace`]); used once.
    pub loopback_network: Option<PathBuf>,
}

/// containerd's masked paths (BuildKit's list plus powercap, which newer runtimes mask).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

/// containerd's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Applies replace-or-append: `K=V` replaces an earlier `K` in place, a bare `K` deletes it.
pub fn apply_env(entries: &[String]) -> Vec<String> {
    let key = |entry: &str| entry.split_once('=').map(|(k, _)| k.to_owned());
    let mut out: Vec<String> = Vec::new();
    for entry in entries {
        match key(entry) {
            Some(k) => match out.iter().position(|e| key(e).as_deref() == Some(&k)) {
                Some(i) => out[i].clone_from(entry),
                None => out.push(entry.clone()),
            },
            None => out.retain(|e| key(e).as_deref() != Some(entry.as_str())),
        }
    }
    out
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest))
        .set_typ(Some(typ.to_owned()))
        .set_source(Some(PathBuf::from(source)))
        .set_options(Some(options.iter().map(|o| (*o).to_owned()).collect()));
    m
}

/// The default mounts in BuildKit's order (§3), before the step's own.
fn default_mounts(security: Security, hosts: &Path, resolv: &Path) -> Vec<Mount> {
    let sys_mode = if security == Security::Insecure {
        "rw"
    } else {
        "ro"
    };
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        ),
        mount(
            "/etc/resolv.conf",
            "bind",
            &resolv.to_string_lossy(),
            &["nosuid", "noexec", "nodev", "rbind", "ro"],
        ),
        mount(
            "/etc/hosts",
            "bind",
            &hosts.to_string_lossy(),
            &["nosuid", "noexec", "nodev", "rbind", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &[sys_mode, "nosuid", "noexec", "nodev"],
        ),
    ]
}

fn step_mount(m: &StepMount) -> Result<Mount, SpecError> {
    if !m.destination.starts_with('/') {
        return Err(SpecError::RelativeMount(m.destination.clone()));
    }
    Ok(match &m.kind {
        StepMountKind::Bind {
            source,
            readonly,
            restricted,
        } => {
            let mut options = vec!["rbind"];
            if *readonly {
                options.push("ro");
            }
            if *restricted {
                options.extend(["nodev", "nosuid", "noexec"]);
            }
            mount(&m.destination, "bind", &source.to_string_lossy(), &options)
        }
        StepMountKind::Tmpfs { size, readonly } => {
            let size_option = format!("size={size}");
            let mut options = vec!["nosuid"];
            if *readonly {
                options.push("ro");
            }
            if *size > 0 {
                options.push(&size_option);
            }
            mount(&m.destination, "tmpfs", "tmpfs", &options)
        }
    })
}

/// Later mounts with an earlier mount's destination replace it in that earlier position.
fn dedup_mounts(mounts: Vec<Mount>) -> Vec<Mount> {
    let mut out: Vec<Mount> = Vec::new();
    for m in mounts {
        match out.iter().position(|o| o.destination() == m.destination()) {
            Some(i) => out[i] = m,
            None => out.push(m),
        }
    }
    out
}

fn rlimit_type(name: &str) -> Result<PosixRlimitType, SpecError> {
    let upper = format!("RLIMIT_{}", name.to_uppercase());
    serde_json::from_value(serde_json::Value::String(upper))
        .map_err(|_| SpecError::UnknownUlimit(name.to_owned()))
}

/// `linux.cgroupsPath` as BuildKit computes it.
pub fn cgroups_path(parent: &str, id: &str) -> String {
    if parent.contains(".slice") && parent.ends_with(':') {
        return format!("{parent}{id}");
    }
    let parent = parent.trim_matches('/');
    if parent.is_empty() {
        format!("/buildkit/{id}")
    } else {
        format!("/{parent}/buildkit/{id}")
    }
}

/// Whether the step gets a network namespace of its own (every mode but `host`, rootful
/// and rootless alike).
pub fn wants_network_namespace(network: Network) -> bool {
    network != Network::Host
}

/// Builds the spec of `step`, resolving its user against the rootfs and writing its hosts
/// and resolv.conf (see [`hosts::write_files`]).
pub fn generate(step: &Step, host: &Host, sys: &dyn crate::sys::Sys) -> Result<Spec, SpecError> {
    generate_with_users(step, host, sys, None)
}

/// The user database of the step's rootfs.
fn read_users(step: &Step, sys: &dyn crate::sys::Sys) -> Result<UserDb, SpecError> {
    let rootfs: OwnedFd = nix::fcntl::open(
        &step.rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| SpecError::Rootfs {
        path: step.rootfs.clone(),
        source,
    })?;
    Ok(UserDb::read(sys, rootfs.as_fd())?)
}

/// [`generate`], resolving the user against `users` when given: the rootfs's user
/// database as the caller already knows it (read from the same files, see
/// [`UserDb::read_noting_symlinks`]).
pub fn generate_with_users(
    step: &Step,
    host: &Host,
    sys: &dyn crate::sys::Sys,
    users: Option<&UserDb>,
) -> Result<Spec, SpecError> {
    if step.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    if !step.cwd.starts_with('/') {
        return Err(SpecError::RelativeCwd(step.cwd.clone()));
    }
    let read;
    let db = match users {
        Some(db) => db,
        None => {
            read = read_users(step, sys)?;
            &read
        }
    };
    let resolved = user::resolve(&step.user, db)?;

    let mut env = apply_env(&step.env);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        // runc sets HOME from passwd (or "/") when the environment has none.
        env.push(format!(
            "HOME={}",
            resolved.home.clone().unwrap_or_else(|| "/".into())
        ));
    }
    let hostname = if step.hostname.is_empty() {
        kiln_proto::DEFAULT_HOSTNAME.to_owned()
    } else {
        step.hostname.clone()
    };
    let host_network = !wants_network_namespace(step.network);
    let joined = match step.network {
        Network::Sandbox => host.network.as_ref(),
        Network::Host | Network::None => None,
    };
    let resolver = match (host_network, joined) {
        (true, _) => Resolver::Host,
        (false, Some(attachment)) => Resolver::Forwarder(attachment.nameserver),
        (false, None) => Resolver::Filtered,
    };
    // The namespace a step joins by path, as runc joins a CNI namespace.
    let netns_path = match step.network {
        Network::Sandbox => joined.map(|attachment| &attachment.path),
        Network::None => host.loopback_network.as_ref(),
        Network::Host => None,
    };
    let (hosts_file, resolv_file) = hosts::write_files(
        &host.shared_dir,
        &host.run_dir,
        &hostname,
        &step.extra_hosts,
        resolver,
    )?;

    let capabilities = match step.security {
        Security::Sandbox => caps::DEFAULT.to_vec(),
        Security::Insecure => caps::caller_bounding()?,
    };

    let mut mounts = default_mounts(step.security, &hosts_file, &resolv_file);
    for m in &step.mounts {
        mounts.push(step_mount(m)?);
    }
    let mounts = dedup_mounts(mounts);

    let rlimits = step
        .ulimits
        .iter()
        .map(|u| {
            PosixRlimitBuilder::default()
                .typ(rlimit_type(&u.name)?)
                // int64 → uint64 as Go casts it: -1 is unlimited.
                .soft(u.soft as u64)
                .hard(u.hard as u64)
                .build()
                .map_err(build_err)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let user = UserBuilder::default()
        .uid(resolved.uid)
        .gid(resolved.gid)
        .additional_gids(resolved.additional_gids.clone())
        .build()
        .map_err(build_err)?;
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(step.args.clone())
        .env(env)
        .cwd(PathBuf::from(&step.cwd))
        .capabilities(caps::oci_capabilities(&capabilities)?)
        .no_new_privileges(step.no_new_privileges)
        .build()
        .map_err(build_err)?;
    // Without ulimits the step inherits kiln's limits, as BuildKit's steps inherit the
    // daemon's (it clears the runtime default of RLIMIT_NOFILE 1024, which oci-spec's
    // builder adds too).
    process.set_rlimits((!rlimits.is_empty()).then_some(rlimits));

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if !host_network {
        namespaces.push(LinuxNamespaceType::Network);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| {
            let mut builder = LinuxNamespaceBuilder::default().typ(typ);
            if let (LinuxNamespaceType::Network, Some(path)) = (typ, netns_path) {
                builder = builder.path(path.clone());
            }
            builder.build().map_err(build_err)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(cgroups_path(&step.cgroup_parent, &host.id)))
        .build()
        .map_err(build_err)?;
    match step.security {
        Security::Sandbox => {
            linux
                .set_masked_paths(Some(MASKED_PATHS.iter().map(|p| (*p).to_owned()).collect()))
                .set_readonly_paths(Some(
                    READONLY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
                ))
                .set_seccomp(Some(seccomp::default_profile(&capabilities)));
            if !host.in_user_namespace {
                let deny_all = LinuxDeviceCgroupBuilder::default()
                    .allow(false)
                    .access("rwm")
                    .build()
                    .map_err(build_err)?;
                linux.set_resources(Some(
                    LinuxResourcesBuilder::default()
                        .devices(vec![deny_all])
                        .build()
                        .map_err(build_err)?,
                ));
            }
        }
        Security::Insecure => {
            linux
                .set_masked_paths(Some(Vec::new()))
                .set_readonly_paths(Some(Vec::new()));
            if !host.in_user_namespace {
                linux.set_devices(Some(insecure_devices()?));
            }
        }
    }

    if !step.limits.is_empty() {
        // Rootless too (BuildKit drops resources there): kiln's runner enforces them in a
        // delegated cgroup or with rlimits.
        let mut resources = linux.resources().clone().unwrap_or_default();
        step.limits.apply_to(&mut resources)?;
        linux.set_resources(Some(resources));
    }

    let root = RootBuilder::default()
        .path(step.rootfs.clone())
        .readonly(step.readonly_rootfs)
        .build()
        .map_err(build_err)?;
    let mut spec = Spec::default();
    spec.set_version("1.0.2-dev".to_owned())
        .set_process(Some(process))
        .set_root(Some(root))
        .set_hostname(Some(hostname))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux))
        .set_annotations(Some(HashMap::new()));
    Ok(spec)
}

/// Devices BuildKit adds to insecure steps outside a user namespace.
fn insecure_devices() -> Result<Vec<oci_spec::runtime::LinuxDevice>, SpecError> {
    let mut devices = vec![
        ("/dev/kmsg", LinuxDeviceType::C, 1, 11),
        ("/dev/cuse", LinuxDeviceType::C, 10, 203),
        ("/dev/fuse", LinuxDeviceType::C, 10, 229),
        ("/dev/kvm", LinuxDeviceType::C, 10, 232),
        ("/dev/net/tun", LinuxDeviceType::C, 10, 200),
        ("/dev/loop-control", LinuxDeviceType::C, 10, 237),
    ];
    let first_free = std::fs::read_to_string("/sys/module/loop/parameters/max_loop")
        .ok()
        .and_then(|_| first_free_loop())
        .unwrap_or(0);
    let loops: Vec<String> = (0..first_free + 8)
        .map(|i| format!("/dev/loop{i}"))
        .collect();
    for (i, path) in loops.iter().enumerate() {
        devices.push((path.as_str(), LinuxDeviceType::B, 7, i as i64));
    }
    devices
        .into_iter()
        .map(|(path, typ, major, minor)| {
            LinuxDeviceBuilder::default()
                .path(PathBuf::from(path))
                .typ(typ)
                .major(major)
                .minor(minor)
                .file_mode(0o660u32)
                .build()
                .map_err(build_err)
        })
        .collect()
}

fn first_free_loop() -> Option<i64> {
    // The first /dev/loopN that is not bound to a file.
    (0..256)
        .find(|i| std::fs::read_to_string(format!("/sys/block/loop{i}/loop/backing_file")).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_replace_in_place_append_and_delete() {
        let env: Vec<String> = ["A=1", "B=2", "A=3", "C=4", "B", "D=x=y"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(apply_env(&env), vec!["A=3", "C=4", "D=x=y"]);
    }

    #[test]
    fn cgroups_path_forms() {
        assert_eq!(cgroups_path("", "abc"), "/buildkit/abc");
        assert_eq!(cgroups_path("foocgroup", "abc"), "/foocgroup/buildkit/abc");
        assert_eq!(cgroups_path("/a/b/", "abc"), "/a/b/buildkit/abc");
        assert_eq!(
            cgroups_path("system.slice:kiln:", "abc"),
            "system.slice:kiln:abc"
        );
    }

    #[test]
    fn user_mounts_replace_defaults_in_place() {
        let mut mounts = default_mounts(Security::Sandbox, Path::new("/h"), Path::new("/r"));
        mounts.push(
            step_mount(&StepMount {
                destination: "/dev/shm".into(),
                kind: StepMountKind::Tmpfs {
                    size: 134_217_728,
                    readonly: false,
                },
            })
            .unwrap(),
        );
        let mounts = dedup_mounts(mounts);
        assert_eq!(mounts.len(), 9);
        assert_eq!(mounts[3].destination(), Path::new("/dev/shm"));
        assert_eq!(
            mounts[3].options().as_ref().unwrap(),
            &vec!["nosuid".to_owned(), "size=134217728".to_owned()]
        );
    }

    #[test]
    fn ulimit_names_map_to_rlimits() {
        assert_eq!(
            rlimit_type("nofile").unwrap(),
            PosixRlimitType::RlimitNofile
        );
        assert_eq!(rlimit_type("core").unwrap(), PosixRlimitType::RlimitCore);
        assert!(matches!(
            rlimit_type("bogus"),
            Err(SpecError::UnknownUlimit(_))
        ));
    }

    #[test]
    fn network_namespace_policy() {
        assert!(wants_network_namespace(Network::None));
        assert!(!wants_network_namespace(Network::Host));
        assert!(wants_network_namespace(Network::Sandbox));
    }

    #[test]
    fn sandbox_steps_join_their_network_and_use_its_forwarder() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(rootfs.path().join("etc/group"), "root:x:0:\n").unwrap();
        let run = tempfile::tempdir().unwrap();
        let mut step = Step {
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            hostname: String::new(),
            ulimits: vec![],
            cgroup_parent: String::new(),
            extra_hosts: vec![],
            network: Network::Sandbox,
            security: Security::Sandbox,
            rootfs: rootfs.path().to_owned(),
            readonly_rootfs: false,
            mounts: vec![],
            no_new_privileges: false,
            limits: Limits::default(),
        };
        let mut host = Host {
            in_user_namespace: false,
            shared_dir: run.path().to_owned(),
            run_dir: run.path().to_owned(),
            id: "n1".into(),
            network: Some(Attachment {
                path: "/proc/1/fd/9".into(),
                nameserver: "10.0.2.3".parse().unwrap(),
            }),
            loopback_network: None,
        };
        let network_ns = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .cloned()
        };
        let resolv_of = |spec: &Spec| {
            let m = spec
                .mounts()
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
                .unwrap()
                .clone();
            std::fs::read_to_string(m.source().as_ref().unwrap()).unwrap()
        };
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        let ns = network_ns(&spec).unwrap();
        assert_eq!(ns.path().as_deref(), Some(Path::new("/proc/1/fd/9")));
        let resolv = resolv_of(&spec);
        assert!(resolv.ends_with("nameserver 10.0.2.3\n"), "{resolv}");
        assert_eq!(resolv.matches("nameserver").count(), 1, "{resolv}");

        // none never joins, even with a sandbox network at hand; host has no namespace.
        step.network = Network::None;
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        assert_eq!(network_ns(&spec).unwrap().path(), &None);
        // ... but joins a loopback-only namespace made ahead for it, and keeps none's
        // resolv.conf (no forwarder to name).
        host.loopback_network = Some("/proc/1/fd/7".into());
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        let ns = network_ns(&spec).unwrap();
        assert_eq!(ns.path().as_deref(), Some(Path::new("/proc/1/fd/7")));
        assert!(!resolv_of(&spec).contains("10.0.2.3"));
        step.network = Network::Host;
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        assert!(network_ns(&spec).is_none());
        // A sandbox step without a ready network gets a new, loopback-only namespace (not
        // one made ahead for a none step).
        step.network = Network::Sandbox;
        host.network = None;
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        assert_eq!(network_ns(&spec).unwrap().path(), &None);
    }

    #[test]
    fn generated_spec_for_a_busybox_like_rootfs() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.path().join("etc/group"),
            "root:x:0:\nwheel:x:10:root\n",
        )
        .unwrap();
        let run = tempfile::tempdir().unwrap();
        let step = Step {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into(), "A=1".into(), "A=2".into()],
            cwd: "/work".into(),
            user: "root".into(),
            hostname: String::new(),
            ulimits: vec![pb::Ulimit {
                name: "nofile".into(),
                soft: 1024,
                hard: 4096,
            }],
            cgroup_parent: String::new(),
            extra_hosts: vec![ExtraHost::parse("db", "10.0.0.2").unwrap()],
            network: Network::None,
            security: Security::Sandbox,
            rootfs: rootfs.path().to_owned(),
            readonly_rootfs: false,
            mounts: vec![],
            no_new_privileges: false,
            limits: Limits {
                pids: Some(100),
                memory: None,
                cpu_weight: None,
            },
        };
        let host = Host {
            in_user_namespace: false,
            shared_dir: run.path().to_owned(),
            run_dir: run.path().to_owned(),
            id: "abc".into(),
            network: None,
            loopback_network: None,
        };
        let spec = generate(&step, &host, &crate::sys::LinuxSys).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.user().additional_gids().as_ref().unwrap(),
            &vec![0, 10]
        );
        assert_eq!(
            process.env().as_ref().unwrap(),
            &vec!["PATH=/bin".to_owned(), "A=2".into(), "HOME=/root".into()]
        );
        assert_eq!(spec.hostname().as_deref(), Some("buildkitsandbox"));
        assert_eq!(process.no_new_privileges(), Some(false));
        let hosts = std::fs::read_to_string(run.path().join("hosts")).unwrap();
        assert!(hosts.ends_with("10.0.0.2\tdb\n"));
        let linux = spec.linux().as_ref().unwrap();
        assert!(
            linux
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network)
        );
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/buildkit/abc"))
        );
        assert!(linux.seccomp().is_some());
        assert_eq!(Limits::from_spec(&spec).pids, Some(100));
        // Serializes as a runc config.json.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ociVersion"], "1.0.2-dev");
        assert_eq!(json["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(json["process"]["rlimits"][0]["hard"], 4096);

        // Without ulimits the step inherits kiln's limits (BuildKit clears the runtime's
        // default RLIMIT_NOFILE 1024).
        let plain = Step {
            ulimits: vec![],
            ..step
        };
        let spec = generate(&plain, &host, &crate::sys::LinuxSys).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().rlimits(), &None);
    }
}
