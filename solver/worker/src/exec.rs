//! The ExecOp: PrepareMounts materialised over snapshots (../shared/spec/prepare-mounts.md),
//! the step run through the executor with BuildKit's runtime settings, and its outputs
//! committed in positional order. On success outputs become results; on any failure every
//! snapshot the step created is released and every mount removed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_executor::hosts::ExtraHost;
use kiln_executor::process::RunnerConfig;
use kiln_executor::spec::{self, Host, Network, Security, Step, StepMount, StepMountKind};
use kiln_executor::supervisor::{StepRequest, Stream};
use kiln_proto::{Vertex, pb};
use kiln_snapshotter::{ImmutableRef, MutableRef, RefOptions};
use tokio::sync::mpsc;

use crate::cache_mounts::{self, CacheDir};
use crate::mounts::StepMounts;
use crate::prepare::{self, Kind, Output, Planned, Source};
use crate::state::{Inner, blocking, failed};
use kiln_solver::cachemap;
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};
use kiln_solver::progress::{LogStream, ResourceUsage};

pub(crate) struct ExecOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    exec: pb::ExecOp,
}

impl ExecOp {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, exec: pb::ExecOp) -> Self {
        ExecOp {
            inner,
            vertex,
            exec,
        }
    }
}

/// A mutable layer the step writes to, kept as an output or thrown away.
struct Layer {
    mount_index: usize,
    mutable: MutableRef,
}

/// Everything a prepared step holds until it has run.
struct Prepared {
    mounts: StepMounts,
    rootfs: PathBuf,
    readonly_rootfs: bool,
    step_mounts: Vec<StepMount>,
    layers: Vec<Layer>,
    caches: Vec<Arc<CacheDir>>,
    ssh: Vec<tokio::task::JoinHandle<()>>,
}

impl Prepared {
    /// Unmounts everything, then commits the outputs in order (`outputs` of the plan).
    fn finish(
        mut self,
        outputs: &[Output],
        inputs: &[ImmutableRef],
        keep: bool,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        for task in self.ssh.drain(..) {
            task.abort();
        }
        // The unmount overlaps the commits below; a layer is deleted only once it is done.
        self.mounts.release_later();
        self.caches.clear();
        if !keep {
            self.mounts.settle();
            for layer in self.layers.drain(..) {
                let _ = layer.mutable.release();
            }
            return Ok(Vec::new());
        }
        let mut layers: Vec<Option<Layer>> = self.layers.drain(..).map(Some).collect();
        let mut results = Vec::with_capacity(outputs.len());
        // On an error the layers not committed yet are dropped (deleted): not while mounted.
        let settled = |e: OpError| {
            self.mounts.settle();
            e
        };
        for output in outputs {
            match output {
                Output::PassThrough { input } => results.push(inputs[*input].clone()),
                Output::Layer { mount } => {
                    let layer = layers
                        .iter_mut()
                        .find(|l| l.as_ref().is_some_and(|l| l.mount_index == *mount))
                        .and_then(Option::take)
                        .ok_or_else(|| {
                            settled(failed(format!(
                                "internal error: no layer for mount {mount}"
                            )))
                        })?;
                    let id = layer.mutable.id().to_owned();
                    let committed = layer
                        .mutable
                        .commit()
                        .map_err(|e| settled(failed(format!("error committing {id}: {e}"))))?;
                    results.push(committed);
                }
            }
        }
        // Writable mounts that are not outputs: their writes are discarded.
        let discarded: Vec<Layer> = layers.into_iter().flatten().collect();
        if !discarded.is_empty() {
            self.mounts.settle();
        }
        for layer in discarded {
            let _ = layer.mutable.release();
        }
        Ok(results)
    }
}

impl ExecOp {
    fn meta(&self) -> pb::Meta {
        self.exec.meta.clone().unwrap_or_default()
    }

    fn args_text(&self) -> String {
        self.meta().args.join(" ")
    }

    /// The step's environment as BuildKit's exec wrapper assembles it: `Meta.env`, proxy
    /// variables (upper-case first), the default PATH if none, then secret variables.
    fn environment(&self) -> Result<Vec<String>, OpError> {
        let meta = self.meta();
        let mut env = meta.env.clone();
        if let Some(proxy) = &meta.proxy_env {
            for (upper, lower, value) in [
                ("HTTP_PROXY", "http_proxy", &proxy.http_proxy),
                ("HTTPS_PROXY", "https_proxy", &proxy.https_proxy),
                ("FTP_PROXY", "ftp_proxy", &proxy.ftp_proxy),
                ("NO_PROXY", "no_proxy", &proxy.no_proxy),
                ("ALL_PROXY", "all_proxy", &proxy.all_proxy),
            ] {
                if !value.is_empty() {
                    env.push(format!("{upper}={value}"));
                    env.push(format!("{lower}={value}"));
                }
            }
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={}", kiln_proto::DEFAULT_PATH));
        }
        let secrets = &self.inner.config.session.secrets;
        for secret in &self.exec.secretenv {
            if secret.id.is_empty() {
                return Err(failed(format!(
                    "secret ID missing for {:?} environment variable",
                    secret.name
                )));
            }
            let value = match secrets.get(&secret.id) {
                Some(value) => String::from_utf8_lossy(value).into_owned(),
                None if secret.optional => String::new(),
                None => return Err(failed(format!("secret {}: not found", secret.id))),
            };
            env.push(format!("{}={value}", secret.name));
        }
        Ok(env)
    }

    /// Materialises the plan: snapshots, cache directories, secrets and agent sockets,
    /// all mounted under a private step directory.
    fn prepare(
        &self,
        plan: &prepare::Plan,
        inputs: &[ImmutableRef],
        ctx_cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Prepared, OpError> {
        let inner = &self.inner;
        let args = self.args_text();
        let mut prepared = Prepared {
            mounts: StepMounts::new(&inner.mounts_dir, &inner.next_id()).map_err(failed)?,
            rootfs: PathBuf::new(),
            readonly_rootfs: false,
            step_mounts: Vec::new(),
            layers: Vec::new(),
            caches: Vec::new(),
            ssh: Vec::new(),
        };
        let root = plan
            .root
            .as_ref()
            .ok_or_else(|| failed("mount / has no input"))?;
        let caches = self.acquire_caches(plan, inputs, ctx_cancel)?;
        prepared.caches.extend(caches.values().cloned());
        let all = std::iter::once(root).chain(plan.mounts.iter());
        for (n, planned) in all.enumerate() {
            let is_root = planned.dest == "/";
            let name = format!("m{n}");
            let description = format!("mount {} from exec {args}", planned.dest);
            match &planned.kind {
                Kind::Bind { source } => {
                    let (path, immutable) = match source {
                        Source::Input(i) => {
                            let path = prepared
                                .mounts
                                .mount(&name, &inputs[*i].mountable(), true)
                                .map_err(failed)?;
                            (path, true)
                        }
                        Source::Mutable { parent } => {
                            let mutable = inner
                                .snapshotter
                                .new_mutable(
                                    parent.map(|i| &inputs[i]),
                                    &RefOptions {
                                        description,
                                        ..RefOptions::default()
                                    },
                                )
                                .map_err(failed)?;
                            let mounted = prepared.mounts.mount(&name, &mutable.mountable(), false);
                            prepared.layers.push(Layer {
                                mount_index: planned.index,
                                mutable,
                            });
                            (mounted.map_err(failed)?, false)
                        }
                    };
                    if is_root {
                        prepared.rootfs = path;
                        prepared.readonly_rootfs = immutable || planned.readonly;
                    } else {
                        self.bind(&mut prepared, planned, &path, &format!("{name}s"))?;
                    }
                }
                Kind::Cache { id, parent, .. } => {
                    let key = cache_mounts::key(id, parent.map(|i| &inputs[i]));
                    let path = caches
                        .get(&key)
                        .ok_or_else(|| failed(format!("internal error: cache mount {key:?}")))?
                        .path()
                        .to_owned();
                    self.bind(&mut prepared, planned, &path, &format!("{name}s"))?;
                }
                Kind::Tmpfs { size } => prepared.step_mounts.push(StepMount {
                    destination: planned.dest.clone(),
                    kind: StepMountKind::Tmpfs {
                        size: *size,
                        readonly: planned.readonly,
                    },
                }),
                Kind::Secret(opt) => {
                    let data = inner
                        .config
                        .session
                        .secrets
                        .get(&opt.id)
                        .ok_or_else(|| failed(format!("secret {}: not found", opt.id)))?;
                    let file = self.secret_file(&mut prepared, &name, opt, data)?;
                    prepared.step_mounts.push(StepMount {
                        destination: planned.dest.clone(),
                        kind: StepMountKind::Bind {
                            source: file,
                            readonly: true,
                            restricted: true,
                        },
                    });
                }
                Kind::Ssh(opt) => {
                    let socket = self.ssh_socket(&mut prepared, &name, opt)?;
                    prepared.step_mounts.push(StepMount {
                        destination: planned.dest.clone(),
                        kind: StepMountKind::Bind {
                            source: socket,
                            readonly: false,
                            restricted: false,
                        },
                    });
                }
            }
        }
        Ok(prepared)
    }

    /// The step's cache directories by key: each key acquired once, however many mounts
    /// name it (BuildKit's per-op share: both targets see one directory), with the
    /// sharing mode of its first mount, and in key order, so that no two steps can each
    /// hold a LOCKED directory the other waits for.
    fn acquire_caches(
        &self,
        plan: &prepare::Plan,
        inputs: &[ImmutableRef],
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<BTreeMap<String, Arc<CacheDir>>, OpError> {
        let mut wanted: BTreeMap<String, &Planned> = BTreeMap::new();
        for planned in &plan.mounts {
            if let Kind::Cache { id, parent, .. } = &planned.kind {
                let key = cache_mounts::key(id, parent.map(|i| &inputs[i]));
                let first = wanted.entry(key).or_insert(planned);
                if planned.index < first.index {
                    *first = planned;
                }
            }
        }
        let inner = &self.inner;
        let locks_dir = inner.locks_dir();
        let store = cache_mounts::Store {
            snapshotter: &inner.snapshotter,
            mounts_dir: &inner.mounts_dir,
            locks_dir: &locks_dir,
        };
        let args = self.args_text();
        let mut acquired = BTreeMap::new();
        for (key, planned) in wanted {
            let Kind::Cache {
                sharing, parent, ..
            } = &planned.kind
            else {
                continue;
            };
            let dir = inner
                .cache_mounts
                .acquire(
                    &store,
                    &key,
                    *sharing,
                    parent.map(|i| &inputs[i]),
                    &format!("cached mount {} from exec {args}", planned.dest),
                    cancel,
                )
                .map_err(failed)?;
            acquired.insert(key, dir);
        }
        Ok(acquired)
    }

    /// A bind of `path` (or the planned selector inside it) at the planned destination.
    fn bind(
        &self,
        prepared: &mut Prepared,
        planned: &Planned,
        path: &std::path::Path,
        name: &str,
    ) -> Result<(), OpError> {
        let source = prepared
            .mounts
            .select(name, path, &planned.selector)
            .map_err(|e| failed(format!("mount {}: {e}", planned.dest)))?;
        prepared.step_mounts.push(StepMount {
            destination: planned.dest.clone(),
            kind: StepMountKind::Bind {
                source,
                readonly: planned.readonly,
                restricted: false,
            },
        });
        Ok(())
    }

    /// The secret as a file on a private tmpfs, owned and moded as the mount asks.
    fn secret_file(
        &self,
        prepared: &mut Prepared,
        name: &str,
        opt: &pb::SecretOpt,
        data: &[u8],
    ) -> Result<PathBuf, OpError> {
        let dir = prepared
            .mounts
            .tmpfs(&format!("{name}secret"), "mode=0711,size=16m")
            .map_err(failed)?;
        let file = dir.join("secret");
        let write = || -> std::io::Result<()> {
            std::fs::write(&file, data)?;
            std::os::unix::fs::chown(&file, Some(opt.uid), Some(opt.gid))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(opt.mode & 0o777))
        };
        write().map_err(|e| failed(format!("secret {}: {e}", opt.id)))?;
        Ok(file)
    }

    /// A socket in a private directory that forwards to the build's SSH agent.
    fn ssh_socket(
        &self,
        prepared: &mut Prepared,
        name: &str,
        opt: &pb::SshOpt,
    ) -> Result<PathBuf, OpError> {
        let id = if opt.id.is_empty() {
            "default"
        } else {
            opt.id.as_str()
        };
        let agent = self
            .inner
            .config
            .session
            .ssh
            .get(id)
            .cloned()
            .ok_or_else(|| failed(format!("no SSH key {id:?} forwarded from the client")))?;
        let dir = prepared.mounts.dir().join(format!("{name}ssh"));
        std::fs::create_dir(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let socket = dir.join("ssh_auth_sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        let mode = if opt.mode == 0 {
            0o600
        } else {
            opt.mode & 0o777
        };
        std::os::unix::fs::chown(&socket, Some(opt.uid), Some(opt.gid))
            .and_then(|()| std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        prepared.ssh.push(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::UnixStream::connect(&agent).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        }));
        Ok(socket)
    }
}

#[async_trait]
impl Op<ImmutableRef> for ExecOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let map = cachemap::exec::cache_map(
            &self.vertex.digest,
            &self.exec,
            self.vertex.platform(),
            self.vertex.op.inputs.len(),
        )
        .map_err(failed)?;
        Ok(CacheMapResponse { map, done: true })
    }

    async fn exec(
        &self,
        ctx: &JobContext,
        inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let meta = self.meta();
        let args = self.args_text();
        let session = &self.inner.config.session;
        let plan = prepare::plan(
            &self.exec.mounts,
            inputs.len(),
            &meta.cwd,
            &|id| session.secrets.contains_key(id),
            &|id| session.ssh.contains_key(id),
        )
        .map_err(failed)?;
        let extra_hosts = meta
            .extra_hosts
            .iter()
            .map(|h| ExtraHost::parse(&h.host, &h.ip))
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let network = Network::try_from(self.exec.network)
            .map_err(|mode| failed(format!("unknown network mode {mode}")))?;
        let security = Security::try_from(self.exec.security)
            .map_err(|mode| failed(format!("unknown security mode {mode}")))?;
        let env = self.environment()?;
        if network == Network::Sandbox {
            // Set up while the mounts are prepared, when no network is idle yet.
            self.inner.network.prewarm();
        }

        // Snapshots and mounts are synchronous work. It runs in place unless a cache mount
        // may have to wait for another step (a locked one: that step must be able to go
        // on, and a signal to cancel the wait must get through): a trip to the blocking
        // pool wakes an idle CPU and then this thread's, which on these VMs cost more than
        // the work (≈0.25 ms a trip; a RUN step made three).
        let waits = may_wait(&plan);
        let this = ExecOp::new(self.inner.clone(), self.vertex.clone(), self.exec.clone());
        let prepared = if waits {
            let plan_for_prepare = plan.clone();
            let inputs_for_prepare = inputs.clone();
            let cancel = ctx.cancel.clone();
            blocking(move || this.prepare(&plan_for_prepare, &inputs_for_prepare, &cancel)).await?
        } else {
            this.prepare(&plan, &inputs, &ctx.cancel)?
        };

        // The input the rootfs is (a new layer on, or a read-only view of).
        let root_input = match plan.root.as_ref().map(|root| &root.kind) {
            Some(Kind::Bind {
                source: Source::Input(i) | Source::Mutable { parent: Some(i) },
            }) => inputs.get(*i),
            _ => None,
        };
        let users = self.inner.user_dbs.get(root_input, &prepared.rootfs);
        let inner = self.inner.clone();
        let step = Step {
            args: meta.args.clone(),
            env,
            cwd: meta.cwd.clone(),
            user: meta.user.clone(),
            hostname: meta.hostname.clone(),
            ulimits: meta.ulimit.clone(),
            cgroup_parent: meta.cgroup_parent.clone(),
            extra_hosts,
            network,
            security,
            rootfs: prepared.rootfs.clone(),
            readonly_rootfs: prepared.readonly_rootfs,
            mounts: prepared.step_mounts.clone(),
            no_new_privileges: false,
            limits: self.inner.config.limits,
        };
        let mut stub_paths = vec!["/etc/resolv.conf".to_owned(), "/etc/hosts".to_owned()];
        stub_paths.extend(plan.mounts.iter().map(|m| m.dest.clone()));
        let outcome = run_step(
            &inner,
            ctx,
            step,
            users,
            stub_paths,
            meta.remove_mount_stubs_recursive,
        )
        .await;

        let keep = matches!(&outcome, Ok(exit) if exit.success());
        let results = if waits {
            let outputs = plan.outputs.clone();
            blocking(move || prepared.finish(&outputs, &inputs, keep)).await
        } else {
            prepared.finish(&plan.outputs, &inputs, keep)
        };
        if let Ok(exit) = &outcome {
            ctx.report_usage(usage(exit)).await;
        }
        match outcome {
            Err(OpError::Cancelled) => Err(OpError::Cancelled),
            Err(e) => Err(failed(format!(
                "process {args:?} did not complete successfully: {e}"
            ))),
            // A step killed for a limit failed for that, whatever else it reported.
            Ok(exit) if exit.exceeded.is_some() => Err(failed(format!(
                "process {args:?} did not complete successfully: {}",
                kiln_executor::supervisor::exit_error_text(&exit)
            ))),
            Ok(exit) if exit.cancelled => Err(OpError::Cancelled),
            Ok(exit) if !exit.success() => Err(failed(format!(
                "process {args:?} did not complete successfully: {}",
                kiln_executor::supervisor::exit_error_text(&exit)
            ))),
            Ok(_) => results,
        }
    }
}

/// The executor's figures as the progress report carries them.
fn usage(exit: &kiln_executor::process::ExitInfo) -> ResourceUsage {
    let micros = std::time::Duration::from_micros;
    ResourceUsage {
        wall: micros(exit.wall_micros),
        user_cpu: micros(exit.user_cpu_micros),
        system_cpu: micros(exit.system_cpu_micros),
        peak_memory: exit.peak_memory_bytes,
        peak_memory_total: exit.peak_memory_from_cgroup,
        read_bytes: exit.read_bytes,
        written_bytes: exit.written_bytes,
    }
}

/// Whether preparing the step (or finishing it) may wait for another step: a cache mount,
/// whose sharing mode can make it wait for another holder. Everything else a step's
/// preparation does — snapshots, overlay mounts, the spec — is short and runs in place.
fn may_wait(plan: &prepare::Plan) -> bool {
    plan.mounts
        .iter()
        .any(|m| matches!(m.kind, Kind::Cache { .. }))
}

/// Generates the step's spec and runs it, streaming its output to the job's progress.
async fn run_step(
    inner: &Arc<Inner>,
    ctx: &JobContext,
    step: Step,
    users: Option<Arc<kiln_executor::user::UserDb>>,
    stub_paths: Vec<String>,
    stubs_recursive: bool,
) -> Result<kiln_executor::process::ExitInfo, OpError> {
    let id = inner.next_id();
    let bundle = inner.executor.prepare_bundle(&id).map_err(failed)?;
    let mut host = Host {
        in_user_namespace: inner.config.in_user_namespace,
        shared_dir: inner.config.root.join("run"),
        run_dir: bundle.clone(),
        id: id.clone(),
        network: None,
        loopback_network: None,
    };
    let prepared = async {
        // The sandbox network is held (its lease) until the step has run: an idle one
        // taken in place, or one waited for on the blocking pool while it is made.
        let mut lease = match step.network {
            Network::Sandbox => Some(match inner.network.try_acquire() {
                Some(lease) => lease,
                None => {
                    let pool_owner = inner.clone();
                    blocking(move || pool_owner.network.acquire().map_err(failed)).await?
                }
            }),
            Network::Host | Network::None => None,
        };
        if let Some(lease) = &mut lease {
            if step.security == Security::Insecure {
                // CAP_NET_ADMIN in the namespace: no other step may get it after.
                lease.discard();
            }
            host.network = Some(lease.attachment().clone());
        }
        let spec = spec::generate_with_users(
            &step,
            &host,
            &kiln_executor::sys::LinuxSys,
            users.as_deref(),
        )
        .map_err(failed)?;
        Ok::<_, OpError>((spec, lease))
    }
    .await;
    let (spec, lease) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(e);
        }
    };
    let request = StepRequest {
        id,
        config: RunnerConfig {
            spec,
            stub_paths,
            stubs_recursive,
            real_root: !inner.config.in_user_namespace,
            own_cgroups: kiln_executor::cgroup::wanted(
                &step.cgroup_parent,
                step.security == Security::Insecure,
            ),
            seccomp_cache: None,
            cgroup_registry: None,
            seccomp_of_warm_runner: false,
        },
    };
    let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(64);
    let log_ctx = ctx.clone();
    let forward = tokio::spawn(async move {
        while let Some((stream, data)) = rx.recv().await {
            let stream = match stream {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
            };
            log_ctx.log(stream, &data).await;
        }
    });
    let result = inner
        .executor
        .run(&request, Some(tx), ctx.cancel.clone())
        .await;
    let _ = forward.await;
    // Back to the pool, or stopped (its stack reaped on a thread of its own).
    drop(lease);
    let result = result.map_err(failed)?;
    Ok(result.exit)
}
