//! `kiln run` and `kiln spec`: one command in a rootfs directory, as a build step runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use kiln_executor::limits::{self, Limits};
use kiln_executor::process::{self, RunnerConfig};
use kiln_executor::spec::{self, Host, Network, Security, Step, StepMount, StepMountKind};
use kiln_executor::sys::LinuxSys;
use kiln_executor::userns::{self, Entered};

use crate::cli::{RunArgs, SpecArgs, StepArgs};

/// Parses `type=bind,source=…,target=…[,readonly]` or `type=tmpfs,target=…[,size=…]`.
fn parse_mount(spec: &str) -> anyhow::Result<StepMount> {
    let mut typ = None;
    let mut source = None;
    let mut target = None;
    let mut readonly = false;
    let mut size = 0i64;
    for field in spec.split(',') {
        match field.split_once('=') {
            Some(("type", v)) => typ = Some(v.to_owned()),
            Some(("source" | "src", v)) => source = Some(PathBuf::from(v)),
            Some(("target" | "dst" | "destination", v)) => target = Some(v.to_owned()),
            Some(("size", v)) => {
                size = v.parse().with_context(|| {
                    format!("--mount {spec}: size {v:?} is not a number of bytes")
                })?;
            }
            Some(("readonly" | "ro", v)) => readonly = v != "false",
            None if matches!(field, "readonly" | "ro") => readonly = true,
            _ => bail!("--mount {spec}: unknown field {field:?}"),
        }
    }
    let target = target.with_context(|| format!("--mount {spec}: target= is required"))?;
    if !target.starts_with('/') {
        bail!("--mount {spec}: target {target:?} must be an absolute path");
    }
    let kind = match typ.as_deref() {
        Some("bind") => {
            let source = source.with_context(|| format!("--mount {spec}: source= is required"))?;
            let source = source
                .canonicalize()
                .with_context(|| format!("--mount {spec}: source {}", source.display()))?;
            StepMountKind::Bind {
                source,
                readonly,
                restricted: false,
            }
        }
        Some("tmpfs") => StepMountKind::Tmpfs { size, readonly },
        Some(other) => bail!("--mount {spec}: unsupported type {other:?} (bind or tmpfs)"),
        None => bail!("--mount {spec}: type= is required"),
    };
    Ok(StepMount {
        destination: target,
        kind,
    })
}

/// The step's limits: kiln.toml's `[limits]` (or the defaults), then the flags.
fn step_limits(config: &Path, args: &StepArgs) -> anyhow::Result<Limits> {
    let mut limits = limits::load_config(config)?;
    if let Some(n) = args.pids_limit {
        limits.pids = u64::try_from(n).ok().filter(|n| *n > 0);
    }
    if let Some(size) = &args.memory {
        limits.memory = limits::parse_size(size).with_context(|| format!("--memory {size}"))?;
    }
    Ok(limits)
}

fn build_step(config: &Path, args: &StepArgs) -> anyhow::Result<Step> {
    let limits = step_limits(config, args)?;
    let rootfs = args
        .rootfs
        .canonicalize()
        .with_context(|| format!("rootfs {}", args.rootfs.display()))?;
    let mut env = args.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={}", kiln_proto::DEFAULT_PATH));
    }
    Ok(Step {
        args: args.command.clone(),
        env,
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        hostname: args.hostname.clone(),
        ulimits: Vec::new(),
        cgroup_parent: args.cgroup_parent.clone(),
        extra_hosts: Vec::new(),
        network: match args.network.as_str() {
            "none" => Network::None,
            "host" => Network::Host,
            _ => Network::Sandbox,
        },
        security: if args.security == "insecure" {
            Security::Insecure
        } else {
            Security::Sandbox
        },
        rootfs,
        readonly_rootfs: args.readonly,
        mounts: args
            .mount
            .iter()
            .map(|m| parse_mount(m))
            .collect::<anyhow::Result<_>>()?,
        no_new_privileges: false,
        limits,
    })
}

fn step_id() -> String {
    format!("run{}", std::process::id())
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

pub fn run(root: &Path, config: &Path, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let step = build_step(config, &args.step)?;
    let network_config = kiln_executor::network::Config::load(config)?;
    // Rootless: a user namespace, entered before any thread exists. As root `kiln run`
    // mounts nothing outside the step's own mount namespace, so it needs no private one.
    let in_user_namespace = if nix::unistd::Uid::effective().is_root() {
        false
    } else {
        let rootless = matches!(
            userns::enter().context("entering kiln's user namespace")?,
            Entered::UserNamespace(_)
        );
        if rootless {
            super::namespaces::prepare_delegated_cgroups();
        }
        rootless
    };
    // none: the step's namespace is made on another thread while this one prepares the
    // step, then joined by path (joined before the runner forks, below).
    let mut loopback = match step.network {
        Network::None => Some(
            kiln_executor::network::LoopbackNamespace::start()
                .context("preparing the network namespace of --network none")?,
        ),
        Network::Host | Network::Sandbox => None,
    };
    let id = step_id();
    let shared = root.join("run");
    let bundle = shared.join(&id);
    prepare_dir(&shared)?;
    // Read once for the checks below and the step's own cgroups (kiln stays where it is
    // from here on).
    if let Err(e) = kiln_executor::cgroup::preload() {
        tracing::debug!(error = %e, "cgroup hierarchies not preloaded");
    }
    // Cgroups of steps a killed kiln left behind go first.
    let registry = kiln_executor::supervisor::cgroup_registry(&shared);
    kiln_executor::cgroup::clean_stale(&registry);
    let (enforced, reason) = kiln_executor::cgroup::enforcement(!in_user_namespace, &step.limits);
    if let Some(line) = limits::explain(&step.limits, enforced, &reason) {
        eprintln!("WARNING: {line}");
    }
    let own_hosts = !args.step.hostname.is_empty();
    if own_hosts {
        prepare_dir(&bundle)?;
    }
    // Made on this thread: the step runner forks, so this process stays single-threaded.
    let lease = match step.network {
        Network::Sandbox => Some(
            kiln_executor::network::Pool::standalone(&network_config)
                .context("preparing the sandbox network")?,
        ),
        Network::Host | Network::None => None,
    };
    let host = Host {
        in_user_namespace,
        shared_dir: shared.clone(),
        run_dir: bundle.clone(),
        id,
        network: lease.as_ref().map(|l| l.attachment().clone()),
        loopback_network: loopback.as_ref().map(|l| l.path()),
    };
    let outcome = spec::generate(&step, &host, &LinuxSys)
        .map_err(anyhow::Error::from)
        .and_then(|spec| {
            if let Some(loopback) = loopback.as_mut() {
                loopback
                    .finish()
                    .context("preparing the network namespace of --network none")?;
            }
            let mut stub_paths = vec!["/etc/resolv.conf".to_owned(), "/etc/hosts".to_owned()];
            stub_paths.extend(step.mounts.iter().map(|m| m.destination.clone()));
            let config = RunnerConfig {
                spec,
                stub_paths,
                stubs_recursive: true,
                real_root: !in_user_namespace,
                own_cgroups: kiln_executor::cgroup::wanted(
                    &step.cgroup_parent,
                    step.security == Security::Insecure,
                ),
                seccomp_cache: Some(kiln_executor::supervisor::seccomp_cache(&shared)),
                cgroup_registry: Some(registry),
                seccomp_of_warm_runner: false,
            };
            process::run(&config).map_err(anyhow::Error::from)
        });
    drop(lease);
    drop(loopback);
    if own_hosts {
        let _ = std::fs::remove_dir_all(&bundle);
    }
    match outcome {
        Ok(info) => {
            if let Some(exceeded) = info.exceeded {
                eprintln!("error: {exceeded}");
            }
            Ok(ExitCode::from(u8::try_from(info.exit_code).unwrap_or(255)))
        }
        // Like a shell: the message, then 127 (not found) or 126 (not executable).
        Err(e) => match e.downcast_ref::<process::RunError>() {
            Some(process::RunError::Exec { message, code }) => {
                eprintln!("error: {message}");
                Ok(ExitCode::from(u8::try_from(*code).unwrap_or(127)))
            }
            _ => Err(e),
        },
    }
}

pub fn spec(root: &Path, config: &Path, args: &SpecArgs) -> anyhow::Result<ExitCode> {
    let step = build_step(config, &args.step)?;
    let in_user_namespace = !nix::unistd::Uid::effective().is_root();
    let id = step_id();
    let bundle = args
        .bundle
        .clone()
        .unwrap_or_else(|| root.join("run").join(format!("spec-{id}")));
    prepare_dir(&bundle)?;
    // No sandbox network to join here: a sandbox step's spec names a new namespace.
    let host = Host {
        in_user_namespace,
        shared_dir: bundle.clone(),
        run_dir: bundle,
        id,
        network: None,
        loopback_network: None,
    };
    let spec = spec::generate(&step, &host, &LinuxSys)?;
    println!("{}", serde_json::to_string_pretty(&spec)?);
    Ok(ExitCode::SUCCESS)
}
