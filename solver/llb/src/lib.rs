//! The client-side LLB graph and its marshaling, reproducing BuildKit v0.11.6's
//! `client/llb` byte for byte: [`State`] (env, dir, user, platform, network … carried along a
//! chain of ops), source/exec/file/merge vertices, and [`marshal`], which walks the graph
//! like `State.Marshal` (inputs first, ops deduplicated by digest, metadata merged, caps and
//! platforms as the Go client writes them, the terminal op, the source-map section).
//!
//! Everything is immutable and shared through `Arc`, so states can be cloned freely and the
//! conversion future stays `Send`. Vertex identity (pointer equality) matters: BuildKit
//! merges the metadata of distinct vertices that marshal to the same digest, in visiting
//! order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use kiln_proto::encode::GogoEncode;
use kiln_proto::{Digest, pb};

use kiln_proto::paths;

pub mod reference;

/// Errors found while marshaling (BuildKit reports them from `Marshal`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlbError {
    #[error("{0}")]
    InvalidImageReference(String),
    #[error("source identifier can't be empty")]
    EmptySourceIdentifier,
    #[error("arguments are required")]
    ArgumentsRequired,
    #[error("working directory is required")]
    WorkingDirRequired,
    #[error("tmpfs mounts must use scratch")]
    TmpfsNotScratch,
    #[error("merge must have at least 2 inputs")]
    MergeTooFewInputs,
    #[error("an output was used before it was set (build context not connected)")]
    UnsetOutput,
}

/// Capability IDs the client writes into op metadata.
pub mod caps {
    pub const SOURCE_IMAGE: &str = "source.image";
    pub const SOURCE_IMAGE_RESOLVE_MODE: &str = "source.image.resolvemode";
    pub const SOURCE_IMAGE_LAYER_LIMIT: &str = "source.image.layerlimit";
    pub const SOURCE_LOCAL: &str = "source.local";
    pub const SOURCE_LOCAL_UNIQUE: &str = "source.local.unique";
    pub const SOURCE_LOCAL_SESSION_ID: &str = "source.local.sessionid";
    pub const SOURCE_LOCAL_INCLUDE_PATTERNS: &str = "source.local.includepatterns";
    pub const SOURCE_LOCAL_FOLLOW_PATHS: &str = "source.local.followpaths";
    pub const SOURCE_LOCAL_EXCLUDE_PATTERNS: &str = "source.local.excludepatterns";
    pub const SOURCE_LOCAL_SHARED_KEY_HINT: &str = "source.local.sharedkeyhint";
    pub const SOURCE_LOCAL_DIFFER: &str = "source.local.differ";
    pub const SOURCE_GIT: &str = "source.git";
    pub const SOURCE_GIT_KEEP_DIR: &str = "source.git.keepgitdir";
    pub const SOURCE_GIT_FULL_URL: &str = "source.git.fullurl";
    pub const SOURCE_GIT_HTTP_AUTH: &str = "source.git.httpauth";
    pub const SOURCE_GIT_KNOWN_SSH_HOSTS: &str = "source.git.knownsshhosts";
    pub const SOURCE_GIT_MOUNT_SSH_SOCK: &str = "source.git.mountsshsock";
    pub const SOURCE_HTTP: &str = "source.http";
    pub const SOURCE_HTTP_CHECKSUM: &str = "source.http.checksum";
    pub const SOURCE_HTTP_PERM: &str = "source.http.perm";
    /// Misspelled in BuildKit itself.
    pub const SOURCE_HTTP_UID_GID: &str = "soruce.http.uidgid";
    pub const SOURCE_OCI_LAYOUT: &str = "source.ocilayout";
    pub const EXEC_META_BASE: &str = "exec.meta.base";
    pub const EXEC_META_CGROUP_PARENT: &str = "exec.meta.cgroup.parent";
    pub const EXEC_META_PROXY: &str = "exec.meta.proxyenv";
    pub const EXEC_META_NETWORK: &str = "exec.meta.network";
    pub const EXEC_META_SETS_DEFAULT_PATH: &str = "exec.meta.setsdefaultpath";
    pub const EXEC_META_SECURITY: &str = "exec.meta.security";
    pub const EXEC_META_ULIMIT: &str = "exec.meta.ulimit";
    pub const EXEC_MOUNT_BIND: &str = "exec.mount.bind";
    pub const EXEC_MOUNT_BIND_READWRITE_NO_OUTPUT: &str = "exec.mount.bind.readwrite-nooutput";
    pub const EXEC_MOUNT_CACHE: &str = "exec.mount.cache";
    pub const EXEC_MOUNT_CACHE_SHARING: &str = "exec.mount.cache.sharing";
    pub const EXEC_MOUNT_SELECTOR: &str = "exec.mount.selector";
    pub const EXEC_MOUNT_TMPFS: &str = "exec.mount.tmpfs";
    pub const EXEC_MOUNT_TMPFS_SIZE: &str = "exec.mount.tmpfs.size";
    pub const EXEC_MOUNT_SECRET: &str = "exec.mount.secret";
    pub const EXEC_MOUNT_SSH: &str = "exec.mount.ssh";
    pub const EXEC_SECRET_ENV: &str = "exec.secretenv";
    pub const FILE_BASE: &str = "file.base";
    pub const CONSTRAINTS: &str = "constraints";
    pub const PLATFORM: &str = "platform";
    pub const META_IGNORE_CACHE: &str = "meta.ignorecache";
    pub const META_DESCRIPTION: &str = "meta.description";
    pub const META_EXPORT_CACHE: &str = "meta.exportcache";
    pub const MERGE_OP: &str = "mergeop";
}

/// The default `PATH` for an OS (`util/system.DefaultPathEnv`).
pub fn default_path_env(os: &str) -> String {
    if os == "windows" {
        "c:\\Windows\\System32;c:\\Windows".to_owned()
    } else {
        kiln_proto::DEFAULT_PATH.to_owned()
    }
}

/// containerd's `platforms.Normalize` (the OS defaults to linux, as `runtime.GOOS` does on
/// the hosts kiln runs on).
pub fn normalize_platform(p: &pb::Platform) -> pb::Platform {
    let host = pb::Platform {
        os: "linux".into(),
        ..Default::default()
    };
    let mut out = kiln_proto::platform::normalize(Some(p), &host);
    out.os_version.clone_from(&p.os_version);
    out.os_features.clone_from(&p.os_features);
    out
}

/// containerd's `platforms.Format`.
pub fn format_platform(p: &pb::Platform) -> String {
    if p.os.is_empty() {
        return "unknown".into();
    }
    paths::join(&[&p.os, &p.architecture, &p.variant])
}

/// A source file (the Dockerfile) that ops can point into.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceMap {
    pub filename: String,
    pub data: Vec<u8>,
    /// The Definition that produced the file (BuildKit: the `dockerfile` local source).
    pub definition: Option<pb::Definition>,
}

/// A location of an op in a source map.
#[derive(Debug, Clone)]
pub struct SourceLocation {
    pub map: Arc<SourceMap>,
    pub ranges: Vec<pb::Range>,
}

/// Per-op settings (`llb.Constraints`): platform, worker filters, metadata, locations.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    pub platform: Option<pb::Platform>,
    pub worker_constraints: Vec<String>,
    pub metadata: pb::OpMetadata,
    pub local_unique_id: String,
    pub source_locations: Vec<SourceLocation>,
}

impl Constraints {
    pub fn new() -> Self {
        Self::default()
    }

    /// `llb.WithDescription`.
    pub fn description(mut self, key: &str, value: &str) -> Self {
        self.metadata
            .description
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// `llb.WithCustomName`.
    pub fn custom_name(self, name: &str) -> Self {
        self.description("llb.customname", name)
    }

    /// `llb.IgnoreCache`.
    pub fn ignore_cache(mut self) -> Self {
        self.metadata.ignore_cache = true;
        self
    }

    /// `llb.ProgressGroup`.
    pub fn progress_group(mut self, id: &str, name: &str, weak: bool) -> Self {
        self.metadata.progress_group = Some(pb::ProgressGroup {
            id: id.to_owned(),
            name: name.to_owned(),
            weak,
        });
        self
    }

    /// `llb.Platform`.
    pub fn platform(mut self, p: pb::Platform) -> Self {
        self.platform = Some(p);
        self
    }

    /// `SourceMap.Location`: one range per line, characters 0.
    pub fn location(mut self, map: Option<&Arc<SourceMap>>, lines: &[(usize, usize)]) -> Self {
        if let Some(map) = map {
            let ranges = lines
                .iter()
                .map(|(start, end)| pb::Range {
                    start: Some(pb::Position {
                        line: *start as i32,
                        character: 0,
                    }),
                    end: Some(pb::Position {
                        line: *end as i32,
                        character: 0,
                    }),
                })
                .collect();
            self.source_locations.push(SourceLocation {
                map: map.clone(),
                ranges,
            });
        }
        self
    }

    fn add_cap(&mut self, cap: &str) {
        self.metadata.caps.insert(cap.to_owned(), true);
    }
}

/// One op of the graph. Compared by identity.
#[derive(Clone)]
pub struct Vertex(Arc<Op>);

impl std::fmt::Debug for Vertex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.0 {
            Op::Source(s) => format!("source {}", s.identifier),
            Op::Exec(e) => format!("exec {:?}", e.base.args),
            Op::File(_) => "file".to_owned(),
            Op::Merge(_) => "merge".to_owned(),
        };
        write!(f, "Vertex({kind} @{:p})", Arc::as_ptr(&self.0))
    }
}

impl Vertex {
    fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

#[derive(Debug)]
enum Op {
    Source(SourceOp),
    Exec(ExecOp),
    File(FileOp),
    Merge(MergeOp),
}

/// Dropping a long chain of ops would recurse once per op through `State` → `Output` →
/// `Arc<Op>`; children whose last reference goes away here are unlinked on a heap stack
/// instead.
impl Drop for Op {
    fn drop(&mut self) {
        let mut pending: Vec<Arc<Op>> = Vec::new();
        self.take_children(&mut pending);
        while let Some(op) = pending.pop() {
            if let Ok(mut op) = Arc::try_unwrap(op) {
                op.take_children(&mut pending);
            }
        }
    }
}

impl Op {
    fn take_children(&mut self, into: &mut Vec<Arc<Op>>) {
        let mut outputs: Vec<Output> = Vec::new();
        match self {
            Op::Source(_) => {}
            Op::Exec(e) => {
                outputs.extend(e.base.output.take());
                for m in &mut e.mounts {
                    outputs.extend(m.source.take());
                }
            }
            Op::File(f) => {
                outputs.extend(f.base.output.take());
                for action in &mut f.actions {
                    if let FileAction::Copy { source, .. } = action {
                        outputs.extend(source.output.take());
                    }
                }
            }
            Op::Merge(m) => outputs.append(&mut m.inputs),
        }
        while let Some(Output(kind)) = outputs.pop() {
            match kind {
                OutputKind::Vertex { vertex, .. } => into.push(vertex.0),
                OutputKind::Deferred(cell) => {
                    if let Ok(cell) = Arc::try_unwrap(cell) {
                        outputs.extend(cell.into_inner());
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct SourceOp {
    identifier: String,
    attrs: BTreeMap<String, String>,
    constraints: Constraints,
    error: Option<String>,
}

#[derive(Debug)]
struct ExecOp {
    /// The state the exec was built on (args, env, dir, user, … are read from it).
    base: State,
    mounts: Vec<ExecMount>,
    secrets: Vec<SecretInfo>,
    ssh: Vec<SshInfo>,
    proxy_env: Option<pb::ProxyEnv>,
    constraints: Constraints,
}

#[derive(Debug, Clone)]
struct ExecMount {
    target: String,
    source: Option<Output>,
    readonly: bool,
    selector: String,
    cache: Option<(String, pb::CacheSharingOpt)>,
    tmpfs: Option<i64>,
    no_output: bool,
}

impl ExecMount {
    fn has_output(&self) -> bool {
        !self.no_output && !self.readonly && self.tmpfs.is_none() && self.cache.is_none()
    }
}

#[derive(Debug)]
struct FileOp {
    /// The state the actions are bound to (their base and working directory).
    base: State,
    actions: Vec<FileAction>,
    constraints: Constraints,
}

#[derive(Debug)]
struct MergeOp {
    inputs: Vec<Output>,
    constraints: Constraints,
}

/// An output of a vertex, or a placeholder set later (BuildKit's `mutableOutput`, used for
/// the build context, whose follow-paths are known only after every stage is dispatched).
#[derive(Debug, Clone)]
pub struct Output(OutputKind);

#[derive(Debug, Clone)]
enum OutputKind {
    Vertex {
        vertex: Vertex,
        index: i64,
        platform: Option<pb::Platform>,
    },
    Deferred(Arc<OnceLock<Output>>),
}

impl Output {
    /// A placeholder to be [`DeferredOutput::set`] before marshaling.
    pub fn deferred() -> (Output, DeferredOutput) {
        let cell = Arc::new(OnceLock::new());
        (
            Output(OutputKind::Deferred(cell.clone())),
            DeferredOutput(cell),
        )
    }

    fn platform(&self) -> Option<&pb::Platform> {
        match &self.0 {
            OutputKind::Vertex { platform, .. } => platform.as_ref(),
            OutputKind::Deferred(_) => None,
        }
    }

    fn resolve(&self) -> Result<(Vertex, i64), LlbError> {
        match &self.0 {
            OutputKind::Vertex { vertex, index, .. } => Ok((vertex.clone(), *index)),
            OutputKind::Deferred(cell) => cell.get().ok_or(LlbError::UnsetOutput)?.resolve(),
        }
    }
}

/// The setter of a deferred output.
#[derive(Debug, Clone)]
pub struct DeferredOutput(Arc<OnceLock<Output>>);

impl DeferredOutput {
    /// Connects the placeholder; later calls are ignored.
    pub fn set(&self, output: Option<Output>) {
        if let Some(o) = output {
            let _ = self.0.set(o);
        }
    }
}

/// The values a chain of ops carries (`llb.State` with its key/value chain flattened).
#[derive(Debug, Clone)]
pub struct State {
    output: Option<Output>,
    env: Vec<(String, String)>,
    dir: String,
    args: Vec<String>,
    user: String,
    hostname: String,
    platform: Option<pb::Platform>,
    network: pb::NetMode,
    security: pb::SecurityMode,
    extra_hosts: Vec<pb::HostIp>,
    ulimits: Vec<pb::Ulimit>,
    cgroup_parent: String,
}

impl State {
    /// `llb.NewState`: working directory `/`, platform from the output.
    pub fn new(output: Option<Output>) -> State {
        let s = State {
            output: None,
            env: Vec::new(),
            dir: String::new(),
            args: Vec::new(),
            user: String::new(),
            hostname: String::new(),
            platform: None,
            network: pb::NetMode::Unset,
            security: pb::SecurityMode::Sandbox,
            extra_hosts: Vec::new(),
            ulimits: Vec::new(),
            cgroup_parent: String::new(),
        }
        .dir("/");
        s.with_output(output)
    }

    /// `llb.Scratch`.
    pub fn scratch() -> State {
        State::new(None)
    }

    pub fn output(&self) -> Option<&Output> {
        self.output.as_ref()
    }

    /// `State.WithOutput`: same values, new output (and its platform if it has one).
    pub fn with_output(&self, output: Option<Output>) -> State {
        let mut s = self.clone();
        s.output = output;
        if let Some(p) = s.output.as_ref().and_then(Output::platform).cloned() {
            s.platform = Some(normalize_platform(&p));
        }
        s
    }

    /// `State.AddEnv`: replaces an existing key by removing it and appending.
    pub fn add_env(&self, key: &str, value: &str) -> State {
        let mut s = self.clone();
        s.env.retain(|(k, _)| k != key);
        s.env.push((key.to_owned(), value.to_owned()));
        s
    }

    /// `State.Dir`: relative paths are joined to the current directory.
    pub fn dir(&self, path: &str) -> State {
        let mut s = self.clone();
        s.dir = if paths::is_abs(path) {
            path.to_owned()
        } else {
            let prev = if self.dir.is_empty() { "/" } else { &self.dir };
            paths::join(&[prev, path])
        };
        s
    }

    pub fn user(&self, user: &str) -> State {
        let mut s = self.clone();
        user.clone_into(&mut s.user);
        s
    }

    pub fn hostname(&self, hostname: &str) -> State {
        let mut s = self.clone();
        hostname.clone_into(&mut s.hostname);
        s
    }

    /// `State.Platform` (normalized).
    pub fn platform(&self, p: &pb::Platform) -> State {
        let mut s = self.clone();
        s.platform = Some(normalize_platform(p));
        s
    }

    pub fn network(&self, mode: pb::NetMode) -> State {
        let mut s = self.clone();
        s.network = mode;
        s
    }

    pub fn security(&self, mode: pb::SecurityMode) -> State {
        let mut s = self.clone();
        s.security = mode;
        s
    }

    pub fn args(&self, args: Vec<String>) -> State {
        let mut s = self.clone();
        s.args = args;
        s
    }

    pub fn add_extra_host(&self, host: &str, ip: std::net::IpAddr) -> State {
        let mut s = self.clone();
        let ip = match ip {
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            },
            std::net::IpAddr::V4(v4) => v4.to_string(),
        };
        s.extra_hosts.push(pb::HostIp {
            host: host.to_owned(),
            ip,
        });
        s
    }

    pub fn add_ulimit(&self, name: &str, soft: i64, hard: i64) -> State {
        let mut s = self.clone();
        s.ulimits.push(pb::Ulimit {
            name: name.to_owned(),
            soft,
            hard,
        });
        s
    }

    pub fn cgroup_parent(&self, parent: &str) -> State {
        let mut s = self.clone();
        parent.clone_into(&mut s.cgroup_parent);
        s
    }

    /// `KEY=VALUE` entries in order.
    pub fn env(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    pub fn get_env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn get_dir(&self) -> &str {
        &self.dir
    }

    pub fn get_platform(&self) -> Option<&pb::Platform> {
        self.platform.as_ref()
    }

    pub fn get_args(&self) -> &[String] {
        &self.args
    }

    /// `State.Run(...).Root()`: an exec on `run.base`; the result keeps `self`'s values.
    pub fn run(&self, run: Run) -> State {
        let root_source = run.base.output.clone();
        let mut mounts = vec![ExecMount {
            target: "/".into(),
            source: root_source.clone(),
            readonly: run.readonly_rootfs,
            selector: String::new(),
            cache: None,
            tmpfs: None,
            no_output: false,
        }];
        for m in run.mounts {
            mounts.push(ExecMount {
                target: m.target,
                source: m.source,
                readonly: m.readonly,
                selector: m.selector,
                cache: m.cache,
                tmpfs: m.tmpfs,
                no_output: m.no_output,
            });
        }
        // The root output's index among the output-producing mounts, in target order.
        let mut sorted: Vec<&ExecMount> = mounts.iter().collect();
        sorted.sort_by(|a, b| a.target.cmp(&b.target));
        let root_index = sorted
            .iter()
            .filter(|m| m.has_output())
            .position(|m| std::ptr::eq(*m, &mounts[0]))
            .unwrap_or(0) as i64;
        let readonly_root = run.readonly_rootfs;
        let root_platform = run.constraints.platform.clone();
        let vertex = Vertex(Arc::new(Op::Exec(ExecOp {
            base: run.base,
            mounts,
            secrets: run.secrets,
            ssh: run.ssh,
            proxy_env: run.proxy_env,
            constraints: run.constraints,
        })));
        let root = if readonly_root {
            root_source
        } else {
            Some(Output(OutputKind::Vertex {
                vertex,
                index: root_index,
                platform: root_platform,
            }))
        };
        self.with_output(root)
    }

    /// `State.File`: a file op whose actions are bound to this state.
    pub fn file(&self, actions: Vec<FileAction>, constraints: Constraints) -> State {
        let vertex = Vertex(Arc::new(Op::File(FileOp {
            base: self.clone(),
            actions,
            constraints,
        })));
        self.with_output(Some(Output(OutputKind::Vertex {
            vertex,
            index: 0,
            platform: None,
        })))
    }
}

/// The mounts, secrets and settings of an exec (`llb.ExecInfo`).
#[derive(Debug)]
pub struct Run {
    /// The state with the run options applied (args, network, security, …).
    pub base: State,
    pub mounts: Vec<MountSpec>,
    pub secrets: Vec<SecretInfo>,
    pub ssh: Vec<SshInfo>,
    pub proxy_env: Option<pb::ProxyEnv>,
    pub readonly_rootfs: bool,
    pub constraints: Constraints,
}

impl Run {
    pub fn new(base: State) -> Self {
        Run {
            base,
            mounts: Vec::new(),
            secrets: Vec::new(),
            ssh: Vec::new(),
            proxy_env: None,
            readonly_rootfs: false,
            constraints: Constraints::default(),
        }
    }
}

/// `llb.AddMount` with its options.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub target: String,
    pub source: Option<Output>,
    pub readonly: bool,
    pub selector: String,
    pub no_output: bool,
    pub cache: Option<(String, pb::CacheSharingOpt)>,
    pub tmpfs: Option<i64>,
}

impl MountSpec {
    pub fn new(target: &str, source: &State) -> Self {
        MountSpec {
            target: target.to_owned(),
            source: source.output.clone(),
            readonly: false,
            selector: String::new(),
            no_output: false,
            cache: None,
            tmpfs: None,
        }
    }
}

/// `llb.AddSecret` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub id: String,
    pub target: String,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub optional: bool,
    pub is_env: bool,
}

impl SecretInfo {
    /// BuildKit's defaults: the id is the target, mode 0400.
    pub fn new(target: &str) -> Self {
        SecretInfo {
            id: target.to_owned(),
            target: target.to_owned(),
            mode: 0o400,
            uid: 0,
            gid: 0,
            optional: false,
            is_env: false,
        }
    }
}

/// `llb.AddSSHSocket` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshInfo {
    pub id: String,
    pub target: String,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub optional: bool,
}

impl Default for SshInfo {
    fn default() -> Self {
        SshInfo {
            id: String::new(),
            target: String::new(),
            mode: 0o600,
            uid: 0,
            gid: 0,
            optional: false,
        }
    }
}

/// A user or group for a file action: by name (looked up in the base) or by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserOpt {
    pub uid: i64,
    pub name: String,
}

/// `llb.ChownOpt`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChownOpt {
    pub user: Option<UserOpt>,
    pub group: Option<UserOpt>,
}

impl ChownOpt {
    /// `llb.WithUser("user[:group]")`: numbers (and `root`) by id, other names by name.
    pub fn with_user(spec: &str) -> ChownOpt {
        let parse = |v: &str| -> UserOpt {
            if v == "root" {
                return UserOpt {
                    uid: 0,
                    name: String::new(),
                };
            }
            // strconv.ParseInt(v, 10, 32).
            match v.parse::<i32>().map(i64::from) {
                Ok(uid) => UserOpt {
                    uid,
                    name: String::new(),
                },
                Err(_) => UserOpt {
                    uid: 0,
                    name: v.to_owned(),
                },
            }
        };
        let mut parts = spec.splitn(2, ':');
        ChownOpt {
            user: parts.next().map(parse),
            group: parts.next().map(parse),
        }
    }

    /// `llb.WithUIDGID`.
    pub fn with_uid_gid(uid: i64, gid: i64) -> ChownOpt {
        ChownOpt {
            user: Some(UserOpt {
                uid,
                name: String::new(),
            }),
            group: Some(UserOpt {
                uid: gid,
                name: String::new(),
            }),
        }
    }

    fn marshal(&self, base: i64) -> pb::ChownOpt {
        let user = |u: &UserOpt| pb::UserOpt {
            user: Some(if u.name.is_empty() {
                pb::user_opt::User::ById(u.uid as u32)
            } else {
                pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: u.name.clone(),
                    input: base,
                })
            }),
        };
        pb::ChownOpt {
            user: self.user.as_ref().map(user),
            group: self.group.as_ref().map(user),
        }
    }
}

/// `llb.CopyInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyInfo {
    pub mode: Option<u32>,
    pub follow_symlinks: bool,
    pub copy_dir_contents_only: bool,
    pub include_patterns: Vec<String>,
    pub exclude_patterns: Vec<String>,
    pub attempt_unpack: bool,
    pub create_dest_path: bool,
    pub allow_wildcard: bool,
    pub allow_empty_wildcard: bool,
    pub chown: Option<ChownOpt>,
    /// Unix nanoseconds.
    pub created_time: Option<i64>,
}

/// One action of a file op.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful per op; boxing would only burden callers
pub enum FileAction {
    Mkdir {
        path: String,
        mode: u32,
        make_parents: bool,
        chown: Option<ChownOpt>,
        created_time: Option<i64>,
    },
    Mkfile {
        path: String,
        mode: u32,
        data: Vec<u8>,
        chown: Option<ChownOpt>,
        created_time: Option<i64>,
    },
    Rm {
        path: String,
        allow_not_found: bool,
        allow_wildcard: bool,
    },
    Copy {
        source: State,
        src: String,
        dest: String,
        info: CopyInfo,
    },
}

/// `llb.Image` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResolveMode {
    #[default]
    Default,
    ForcePull,
    PreferLocal,
}

impl ResolveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolveMode::Default => "default",
            ResolveMode::ForcePull => "pull",
            ResolveMode::PreferLocal => "local",
        }
    }
}

/// `llb.Image(ref, opts...)`: a `docker-image://` source with the reference normalized
/// (`docker.io/library/…:latest`).
pub fn image(reference: &str, resolve_mode: ResolveMode, mut constraints: Constraints) -> State {
    let (identifier_ref, error) = match reference::parse_normalized_named(reference) {
        Ok(r) => (r.tag_name_only().to_string(), None),
        Err(e) => (reference.to_owned(), Some(e.to_string())),
    };
    constraints.add_cap(caps::SOURCE_IMAGE);
    let mut attrs = BTreeMap::new();
    if resolve_mode != ResolveMode::Default {
        attrs.insert("image.resolvemode".to_owned(), resolve_mode.as_str().into());
        if resolve_mode == ResolveMode::ForcePull {
            constraints.add_cap(caps::SOURCE_IMAGE_RESOLVE_MODE);
        }
    }
    source(
        &format!("docker-image://{identifier_ref}"),
        attrs,
        constraints,
        error,
    )
}

/// `llb.Local` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalOptions {
    pub session_id: String,
    pub include_patterns: Vec<String>,
    pub exclude_patterns: Vec<String>,
    pub follow_paths: Vec<String>,
    pub shared_key_hint: String,
    /// `(type, required)`: `none` or `metadata`.
    pub differ: Option<(String, bool)>,
}

/// A JSON array of strings as Go's `json.Marshal` writes it.
pub fn go_json_strings(items: &[String]) -> String {
    let mut out = Vec::new();
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        kiln_proto::gojson::write_string(&mut out, item.as_bytes());
    }
    out.push(b']');
    String::from_utf8_lossy(&out).into_owned()
}

/// `llb.Local(name, opts...)`.
pub fn local(name: &str, opts: &LocalOptions, mut constraints: Constraints) -> State {
    let mut attrs = BTreeMap::new();
    if !opts.session_id.is_empty() {
        attrs.insert("local.session".to_owned(), opts.session_id.clone());
        constraints.add_cap(caps::SOURCE_LOCAL_SESSION_ID);
    }
    if !opts.include_patterns.is_empty() {
        attrs.insert(
            "local.includepattern".to_owned(),
            go_json_strings(&opts.include_patterns),
        );
        constraints.add_cap(caps::SOURCE_LOCAL_INCLUDE_PATTERNS);
    }
    if !opts.follow_paths.is_empty() {
        attrs.insert(
            "local.followpaths".to_owned(),
            go_json_strings(&opts.follow_paths),
        );
        constraints.add_cap(caps::SOURCE_LOCAL_FOLLOW_PATHS);
    }
    if !opts.exclude_patterns.is_empty() {
        attrs.insert(
            "local.excludepatterns".to_owned(),
            go_json_strings(&opts.exclude_patterns),
        );
        constraints.add_cap(caps::SOURCE_LOCAL_EXCLUDE_PATTERNS);
    }
    if !opts.shared_key_hint.is_empty() {
        attrs.insert(
            "local.sharedkeyhint".to_owned(),
            opts.shared_key_hint.clone(),
        );
        constraints.add_cap(caps::SOURCE_LOCAL_SHARED_KEY_HINT);
    }
    if let Some((differ, required)) = &opts.differ
        && !differ.is_empty()
    {
        attrs.insert("local.differ".to_owned(), differ.clone());
        if *required {
            constraints.add_cap(caps::SOURCE_LOCAL_DIFFER);
        }
    }
    constraints.add_cap(caps::SOURCE_LOCAL);
    source(&format!("local://{name}"), attrs, constraints, None)
}

/// `llb.HTTP` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpOptions {
    pub checksum: String,
    pub filename: String,
    pub perm: u32,
    pub uid: i64,
    pub gid: i64,
}

/// `llb.HTTP(url, opts...)`.
pub fn http(url: &str, opts: &HttpOptions, mut constraints: Constraints) -> State {
    let mut attrs = BTreeMap::new();
    if !opts.checksum.is_empty() {
        attrs.insert("http.checksum".to_owned(), opts.checksum.clone());
        constraints.add_cap(caps::SOURCE_HTTP_CHECKSUM);
    }
    if !opts.filename.is_empty() {
        attrs.insert("http.filename".to_owned(), opts.filename.clone());
    }
    if opts.perm != 0 {
        attrs.insert("http.perm".to_owned(), format!("0{:o}", opts.perm));
        constraints.add_cap(caps::SOURCE_HTTP_PERM);
    }
    if opts.uid != 0 {
        attrs.insert("http.uid".to_owned(), opts.uid.to_string());
        constraints.add_cap(caps::SOURCE_HTTP_UID_GID);
    }
    if opts.gid != 0 {
        attrs.insert("http.gid".to_owned(), opts.gid.to_string());
        constraints.add_cap(caps::SOURCE_HTTP_UID_GID);
    }
    constraints.add_cap(caps::SOURCE_HTTP);
    source(url, attrs, constraints, None)
}

/// `llb.Git` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitOptions {
    pub keep_git_dir: bool,
    pub auth_token_secret: String,
    pub auth_header_secret: String,
    /// Set when a secret name was given explicitly (adds the http auth capability).
    pub add_auth_cap: bool,
    pub known_ssh_hosts: String,
    pub mount_ssh_sock: String,
}

impl Default for GitOptions {
    fn default() -> Self {
        GitOptions {
            keep_git_dir: false,
            auth_token_secret: "GIT_AUTH_TOKEN".into(),
            auth_header_secret: "GIT_AUTH_HEADER".into(),
            add_auth_cap: false,
            known_ssh_hosts: String::new(),
            mount_ssh_sock: String::new(),
        }
    }
}

/// Git remote protocols as `util/gitutil.ParseProtocol` classifies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitProtocol {
    Http,
    Https,
    Ssh,
    Git,
    Unknown,
}

fn is_implicit_ssh(s: &str) -> bool {
    // ^[a-zA-Z0-9-_]+@[a-zA-Z0-9-.]+:.*$
    let Some((user, rest)) = s.split_once('@') else {
        return false;
    };
    let Some((host, _)) = rest.split_once(':') else {
        return false;
    };
    !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !rest[..host.len()].contains('\n')
}

/// `gitutil.ParseProtocol`: the remote without its scheme (and user for SSH).
pub fn parse_git_protocol(remote: &str) -> (String, GitProtocol) {
    let mut remote = remote.to_owned();
    let mut proto = GitProtocol::Unknown;
    for (prefix, p) in [
        ("http://", GitProtocol::Http),
        ("https://", GitProtocol::Https),
        ("git://", GitProtocol::Git),
        ("ssh://", GitProtocol::Ssh),
    ] {
        if let Some(rest) = remote.strip_prefix(prefix) {
            remote = rest.to_owned();
            proto = p;
        }
    }
    if proto == GitProtocol::Unknown && is_implicit_ssh(&remote) {
        proto = GitProtocol::Ssh;
    }
    if proto == GitProtocol::Ssh
        && let Some((_, host)) = remote.split_once('@')
    {
        remote = host.to_owned();
    }
    (remote, proto)
}

/// `llb.Git(remote, ref, opts...)`. SSH host keys are not scanned (BuildKit does that
/// best-effort over the network); give `known_ssh_hosts` to pin them.
pub fn git(remote: &str, git_ref: &str, opts: &GitOptions, mut constraints: Constraints) -> State {
    let mut url = remote.split('#').next().unwrap_or("").to_owned();
    let (mut remote, proto) = parse_git_protocol(remote);
    if proto == GitProtocol::Ssh
        && let Some((host, path)) = remote.split_once(':')
    {
        remote = format!("{host}/{path}");
    }
    if proto == GitProtocol::Unknown {
        url = format!("https://{url}");
    }
    let mut id = remote;
    if !git_ref.is_empty() {
        id.push('#');
        id.push_str(git_ref);
    }
    let mut attrs = BTreeMap::new();
    if opts.keep_git_dir {
        attrs.insert("git.keepgitdir".to_owned(), "true".to_owned());
        constraints.add_cap(caps::SOURCE_GIT_KEEP_DIR);
    }
    if !url.is_empty() {
        attrs.insert("git.fullurl".to_owned(), url);
        constraints.add_cap(caps::SOURCE_GIT_FULL_URL);
    }
    if !opts.auth_token_secret.is_empty() {
        attrs.insert(
            "git.authtokensecret".to_owned(),
            opts.auth_token_secret.clone(),
        );
        if opts.add_auth_cap {
            constraints.add_cap(caps::SOURCE_GIT_HTTP_AUTH);
        }
    }
    if !opts.auth_header_secret.is_empty() {
        attrs.insert(
            "git.authheadersecret".to_owned(),
            opts.auth_header_secret.clone(),
        );
        if opts.add_auth_cap {
            constraints.add_cap(caps::SOURCE_GIT_HTTP_AUTH);
        }
    }
    if proto == GitProtocol::Ssh {
        if !opts.known_ssh_hosts.is_empty() {
            attrs.insert("git.knownsshhosts".to_owned(), opts.known_ssh_hosts.clone());
        }
        constraints.add_cap(caps::SOURCE_GIT_KNOWN_SSH_HOSTS);
        let sock = if opts.mount_ssh_sock.is_empty() {
            "default".to_owned()
        } else {
            opts.mount_ssh_sock.clone()
        };
        attrs.insert("git.mountsshsock".to_owned(), sock);
        constraints.add_cap(caps::SOURCE_GIT_MOUNT_SSH_SOCK);
    }
    constraints.add_cap(caps::SOURCE_GIT);
    source(&format!("git://{id}"), attrs, constraints, None)
}

fn source(
    identifier: &str,
    attrs: BTreeMap<String, String>,
    constraints: Constraints,
    error: Option<String>,
) -> State {
    let platform = constraints.platform.clone();
    let vertex = Vertex(Arc::new(Op::Source(SourceOp {
        identifier: identifier.to_owned(),
        attrs,
        constraints,
        error,
    })));
    State::new(Some(Output(OutputKind::Vertex {
        vertex,
        index: 0,
        platform,
    })))
}

/// `llb.Merge`: scratch inputs are dropped; one input is returned as is.
pub fn merge(inputs: Vec<State>, mut constraints: Constraints) -> State {
    let mut filtered: Vec<State> = inputs.into_iter().filter(|s| s.output.is_some()).collect();
    match filtered.len() {
        0 => State::scratch(),
        1 => filtered.remove(0),
        _ => {
            constraints.add_cap(caps::MERGE_OP);
            let vertex = Vertex(Arc::new(Op::Merge(MergeOp {
                inputs: filtered.iter().filter_map(|s| s.output.clone()).collect(),
                constraints,
            })));
            State::new(Some(Output(OutputKind::Vertex {
                vertex,
                index: 0,
                platform: None,
            })))
        }
    }
}

/// Marshal-wide settings (`llb.Constraints` given to `Marshal`).
#[derive(Debug, Clone)]
pub struct MarshalOptions {
    /// Platform of ops that set none.
    pub platform: pb::Platform,
    /// The LLB capabilities of the target; `None` when unknown.
    pub caps: Option<BTreeSet<String>>,
    /// Written as `local.unique` on local sources without a session.
    pub local_unique_id: String,
}

impl MarshalOptions {
    fn supports(&self, cap: &str) -> bool {
        self.caps.as_ref().is_some_and(|c| c.contains(cap))
    }
}

#[derive(Debug, Clone)]
struct Marshaled {
    digest: Digest,
    bytes: Vec<u8>,
    metadata: pb::OpMetadata,
    locations: Vec<SourceLocation>,
}

/// `mergeMetadata` of `client/llb`.
fn merge_metadata(mut m1: pb::OpMetadata, m2: &pb::OpMetadata) -> pb::OpMetadata {
    if m2.ignore_cache {
        m1.ignore_cache = true;
    }
    for (k, v) in &m2.description {
        m1.description.insert(k.clone(), v.clone());
    }
    if m2.export_cache.is_some() {
        m1.export_cache = m2.export_cache;
    }
    for k in m2.caps.keys() {
        m1.caps.insert(k.clone(), true);
    }
    if m2.progress_group.is_some() {
        m1.progress_group.clone_from(&m2.progress_group);
    }
    m1
}

struct Marshaler<'a> {
    opts: &'a MarshalOptions,
    cache: HashMap<usize, Marshaled>,
}

impl Marshaler<'_> {
    /// `MarshalConstraints(base, override)`.
    fn constraints(&self, c: &Constraints) -> (pb::Op, pb::OpMetadata) {
        let p = c.platform.as_ref().unwrap_or(&self.opts.platform);
        let op = pb::Op {
            platform: Some(pb::Platform {
                os: p.os.clone(),
                architecture: p.architecture.clone(),
                variant: p.variant.clone(),
                os_version: p.os_version.clone(),
                os_features: p.os_features.clone(),
            }),
            constraints: Some(pb::WorkerConstraints {
                filter: c.worker_constraints.clone(),
            }),
            ..Default::default()
        };
        (op, merge_metadata(pb::OpMetadata::default(), &c.metadata))
    }

    fn input(&mut self, output: &Output) -> Result<pb::Input, LlbError> {
        let (vertex, index) = output.resolve()?;
        let m = self.marshal(&vertex)?;
        Ok(pb::Input {
            digest: m.digest.as_str().to_owned(),
            index,
        })
    }

    fn marshal(&mut self, vertex: &Vertex) -> Result<Marshaled, LlbError> {
        if let Some(m) = self.cache.get(&vertex.id()) {
            return Ok(m.clone());
        }
        let (op, metadata, locations) = match &*vertex.0 {
            Op::Source(s) => self.marshal_source(s)?,
            Op::Exec(e) => self.marshal_exec(e)?,
            Op::File(f) => self.marshal_file(f)?,
            Op::Merge(m) => self.marshal_merge(m)?,
        };
        let bytes = op.gogo_encode();
        let m = Marshaled {
            digest: Digest::of(&bytes),
            bytes,
            metadata,
            locations,
        };
        self.cache.insert(vertex.id(), m.clone());
        Ok(m)
    }

    fn marshal_source(&mut self, s: &SourceOp) -> MarshalResult {
        if let Some(e) = &s.error {
            return Err(LlbError::InvalidImageReference(e.clone()));
        }
        if s.identifier.is_empty() {
            return Err(LlbError::EmptySourceIdentifier);
        }
        let mut c = s.constraints.clone();
        let mut attrs = s.attrs.clone();
        if s.identifier.starts_with("local://") && !attrs.contains_key("local.session") {
            let uid = if c.local_unique_id.is_empty() {
                self.opts.local_unique_id.clone()
            } else {
                c.local_unique_id.clone()
            };
            attrs.insert("local.unique".to_owned(), uid);
            c.add_cap(caps::SOURCE_LOCAL_UNIQUE);
        }
        let (mut op, md) = self.constraints(&c);
        op.op = Some(pb::op::Op::Source(pb::SourceOp {
            identifier: s.identifier.clone(),
            attrs,
        }));
        if !(s.identifier.starts_with("docker-image://")
            || s.identifier.starts_with("oci-layout://"))
        {
            op.platform = None;
        }
        Ok((op, md, c.source_locations))
    }

    fn validate(&mut self, output: &Output) -> Result<(), LlbError> {
        let (vertex, _) = output.resolve()?;
        self.marshal(&vertex).map(|_| ())
    }

    fn marshal_exec(&mut self, e: &ExecOp) -> MarshalResult {
        let base = &e.base;
        if base.args.is_empty() {
            return Err(LlbError::ArgumentsRequired);
        }
        if base.dir.is_empty() {
            return Err(LlbError::WorkingDirRequired);
        }
        for m in &e.mounts {
            if let Some(src) = &m.source {
                self.validate(src)?;
            }
        }
        let mut mounts = e.mounts.clone();
        mounts.sort_by(|a, b| a.target.cmp(&b.target));
        let mut env = base.env.clone();
        let mut ssh = e.ssh.clone();
        for (i, s) in ssh.iter_mut().enumerate() {
            if s.target.is_empty() {
                s.target = format!("/run/buildkit/ssh_agent.{i}");
            }
        }
        if let Some(first) = ssh.first()
            && !env.iter().any(|(k, _)| k == "SSH_AUTH_SOCK")
        {
            env.push(("SSH_AUTH_SOCK".into(), first.target.clone()));
        }
        let mut c = e.constraints.clone();
        if self.opts.caps.is_some() {
            if self.opts.supports(caps::EXEC_META_SETS_DEFAULT_PATH) {
                c.add_cap(caps::EXEC_META_SETS_DEFAULT_PATH);
            } else if !env.iter().any(|(k, _)| k == "PATH") {
                let os = c
                    .platform
                    .as_ref()
                    .unwrap_or(&self.opts.platform)
                    .os
                    .clone();
                env.push(("PATH".into(), default_path_env(&os)));
            }
        }
        let mut meta = pb::Meta {
            args: base.args.clone(),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: base.dir.clone(),
            user: base.user.clone(),
            hostname: base.hostname.clone(),
            cgroup_parent: base.cgroup_parent.clone(),
            remove_mount_stubs_recursive: true,
            extra_hosts: base.extra_hosts.clone(),
            ..Default::default()
        };
        if !base.ulimits.is_empty() {
            c.add_cap(caps::EXEC_META_ULIMIT);
            meta.ulimit = base.ulimits.clone();
        }
        if base.network != pb::NetMode::Unset {
            c.add_cap(caps::EXEC_META_NETWORK);
        }
        if base.security != pb::SecurityMode::Sandbox {
            c.add_cap(caps::EXEC_META_SECURITY);
        }
        if let Some(p) = &e.proxy_env {
            meta.proxy_env = Some(p.clone());
            c.add_cap(caps::EXEC_META_PROXY);
        }
        c.add_cap(caps::EXEC_META_BASE);
        for m in &mounts {
            if !m.selector.is_empty() {
                c.add_cap(caps::EXEC_MOUNT_SELECTOR);
            }
            if m.cache.is_some() {
                c.add_cap(caps::EXEC_MOUNT_CACHE);
                c.add_cap(caps::EXEC_MOUNT_CACHE_SHARING);
            } else if let Some(size) = m.tmpfs {
                c.add_cap(caps::EXEC_MOUNT_TMPFS);
                if size > 0 {
                    c.add_cap(caps::EXEC_MOUNT_TMPFS_SIZE);
                }
            } else if m.source.is_some() {
                c.add_cap(caps::EXEC_MOUNT_BIND);
            }
        }
        if !e.secrets.is_empty() {
            c.add_cap(caps::EXEC_MOUNT_SECRET);
            if e.secrets.iter().any(|s| s.is_env) {
                c.add_cap(caps::EXEC_SECRET_ENV);
            }
        }
        if !ssh.is_empty() {
            c.add_cap(caps::EXEC_MOUNT_SSH);
        }
        if c.platform.is_none() {
            c.platform.clone_from(&base.platform);
        }
        let (mut op, md) = self.constraints(&c);
        let mut exec = pb::ExecOp {
            meta: Some(meta),
            network: base.network as i32,
            security: base.security as i32,
            ..Default::default()
        };
        let mut out_index = 0i64;
        for m in &mounts {
            let input = match &m.source {
                Some(src) => {
                    if m.tmpfs.is_some() {
                        return Err(LlbError::TmpfsNotScratch);
                    }
                    let inp = self.input(src)?;
                    match op.inputs.iter().position(|i| *i == inp) {
                        Some(i) => i as i64,
                        None => {
                            op.inputs.push(inp);
                            op.inputs.len() as i64 - 1
                        }
                    }
                }
                None => -1,
            };
            let output = if m.has_output() {
                out_index += 1;
                out_index - 1
            } else {
                -1
            };
            let mut pm = pb::Mount {
                input,
                dest: m.target.clone(),
                readonly: m.readonly,
                output,
                selector: m.selector.clone(),
                ..Default::default()
            };
            if let Some((id, sharing)) = &m.cache {
                pm.mount_type = pb::MountType::Cache as i32;
                pm.cache_opt = Some(pb::CacheOpt {
                    id: id.clone(),
                    sharing: *sharing as i32,
                });
            }
            if let Some(size) = m.tmpfs {
                pm.mount_type = pb::MountType::Tmpfs as i32;
                pm.tmpfs_opt = Some(pb::TmpfsOpt { size });
            }
            exec.mounts.push(pm);
        }
        for s in &e.secrets {
            if s.is_env {
                exec.secretenv.push(pb::SecretEnv {
                    id: s.id.clone(),
                    name: s.target.clone(),
                    optional: s.optional,
                });
            } else {
                // Secret and SSH mounts keep input and output at their zero values.
                exec.mounts.push(pb::Mount {
                    dest: s.target.clone(),
                    mount_type: pb::MountType::Secret as i32,
                    secret_opt: Some(pb::SecretOpt {
                        id: s.id.clone(),
                        uid: s.uid as u32,
                        gid: s.gid as u32,
                        optional: s.optional,
                        mode: s.mode as u32,
                    }),
                    ..Default::default()
                });
            }
        }
        for s in &ssh {
            exec.mounts.push(pb::Mount {
                dest: s.target.clone(),
                mount_type: pb::MountType::Ssh as i32,
                ssh_opt: Some(pb::SshOpt {
                    id: s.id.clone(),
                    uid: s.uid as u32,
                    gid: s.gid as u32,
                    mode: s.mode as u32,
                    optional: s.optional,
                }),
                ..Default::default()
            });
        }
        op.op = Some(pb::op::Op::Exec(exec));
        Ok((op, md, c.source_locations))
    }

    fn marshal_file(&mut self, f: &FileOp) -> MarshalResult {
        let mut c = f.constraints.clone();
        c.add_cap(caps::FILE_BASE);
        if c.platform.is_none() {
            c.platform.clone_from(&f.base.platform);
        }
        let (mut op, md) = self.constraints(&c);
        // Inputs: the base, then copy sources, deduplicated by value.
        let add_input = |this: &mut Self, inputs: &mut Vec<pb::Input>, out: &Output| {
            let inp = this.input(out)?;
            Ok::<i64, LlbError>(match inputs.iter().position(|i| *i == inp) {
                Some(i) => i as i64,
                None => {
                    inputs.push(inp);
                    inputs.len() as i64 - 1
                }
            })
        };
        let mut inputs: Vec<pb::Input> = Vec::new();
        let mut states = Vec::new();
        for action in &f.actions {
            let base = match &f.base.output {
                Some(out) => add_input(self, &mut inputs, out)?,
                None => -1,
            };
            let secondary = match action {
                FileAction::Copy { source, .. } => match &source.output {
                    Some(out) => add_input(self, &mut inputs, out)?,
                    None => -1,
                },
                _ => -1,
            };
            states.push((base, secondary));
        }
        let n_inputs = inputs.len() as i64;
        let parent = f.base.dir.clone();
        let last = f.actions.len().saturating_sub(1);
        let mut actions = Vec::new();
        for (i, (action, (base, secondary))) in f.actions.iter().zip(states).enumerate() {
            let input = if i == 0 {
                base
            } else {
                n_inputs + i as i64 - 1
            };
            let proto = match action {
                FileAction::Mkdir {
                    path,
                    mode,
                    make_parents,
                    chown,
                    created_time,
                } => pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                    path: normalize_path(&parent, path, false),
                    mode: (mode & 0o777) as i32,
                    make_parents: *make_parents,
                    owner: chown.as_ref().map(|c| c.marshal(base)),
                    timestamp: created_time.unwrap_or(-1),
                }),
                FileAction::Mkfile {
                    path,
                    mode,
                    data,
                    chown,
                    created_time,
                } => pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path: normalize_path(&parent, path, false),
                    mode: (mode & 0o777) as i32,
                    data: data.clone(),
                    owner: chown.as_ref().map(|c| c.marshal(base)),
                    timestamp: created_time.unwrap_or(-1),
                }),
                FileAction::Rm {
                    path,
                    allow_not_found,
                    allow_wildcard,
                } => pb::file_action::Action::Rm(pb::FileActionRm {
                    path: normalize_path(&parent, path, false),
                    allow_not_found: *allow_not_found,
                    allow_wildcard: *allow_wildcard,
                }),
                FileAction::Copy {
                    source,
                    src,
                    dest,
                    info,
                } => {
                    let mut src_path = paths::clean(src);
                    if !paths::is_abs(&src_path) {
                        src_path = paths::join(&["/", &source.dir, &src_path]);
                    }
                    pb::file_action::Action::Copy(pb::FileActionCopy {
                        src: src_path,
                        dest: normalize_path(&parent, dest, true),
                        owner: info.chown.as_ref().map(|c| c.marshal(base)),
                        mode: info.mode.map_or(-1, |m| m as i32),
                        follow_symlink: info.follow_symlinks,
                        dir_copy_contents: info.copy_dir_contents_only,
                        attempt_unpack_docker_compatibility: info.attempt_unpack,
                        create_dest_path: info.create_dest_path,
                        allow_wildcard: info.allow_wildcard,
                        allow_empty_wildcard: info.allow_empty_wildcard,
                        timestamp: info.created_time.unwrap_or(-1),
                        include_patterns: info.include_patterns.clone(),
                        exclude_patterns: info.exclude_patterns.clone(),
                    })
                }
            };
            actions.push(pb::FileAction {
                input,
                secondary_input: secondary,
                output: if i == last { 0 } else { -1 },
                action: Some(proto),
            });
        }
        op.inputs = inputs;
        op.op = Some(pb::op::Op::File(pb::FileOp { actions }));
        Ok((op, md, c.source_locations))
    }

    fn marshal_merge(&mut self, m: &MergeOp) -> MarshalResult {
        if m.inputs.len() < 2 {
            return Err(LlbError::MergeTooFewInputs);
        }
        let (mut op, md) = self.constraints(&m.constraints);
        op.platform = None;
        let mut merge = pb::MergeOp::default();
        for input in &m.inputs {
            merge.inputs.push(pb::MergeInput {
                input: op.inputs.len() as i64,
            });
            op.inputs.push(self.input(input)?);
        }
        op.op = Some(pb::op::Op::Merge(merge));
        Ok((op, md, m.constraints.source_locations.clone()))
    }
}

type MarshalResult = Result<(pb::Op, pb::OpMetadata, Vec<SourceLocation>), LlbError>;

/// `normalizePath` of `client/llb/fileop.go`.
fn normalize_path(parent: &str, p: &str, keep_slash: bool) -> String {
    let orig = p;
    let mut p = paths::clean(p);
    if !paths::is_abs(&p) {
        p = paths::join(&["/", parent, &p]);
    }
    if keep_slash {
        if orig.ends_with('/') && !p.ends_with('/') {
            p.push('/');
        } else if orig.ends_with("/.") {
            if p != "/" {
                p.push('/');
            }
            p.push('.');
        }
    }
    p
}

/// The inputs a vertex is visited through, in the order of its wire inputs.
fn vertex_inputs(vertex: &Vertex) -> Vec<Output> {
    match &*vertex.0 {
        Op::Source(_) => Vec::new(),
        Op::Exec(e) => {
            let mut mounts: Vec<&ExecMount> = e.mounts.iter().collect();
            mounts.sort_by(|a, b| a.target.cmp(&b.target));
            mounts.iter().filter_map(|m| m.source.clone()).collect()
        }
        Op::File(f) => {
            let mut out = Vec::new();
            for action in &f.actions {
                out.extend(f.base.output.clone());
                if let FileAction::Copy { source, .. } = action {
                    out.extend(source.output.clone());
                }
            }
            out
        }
        Op::Merge(m) => m.inputs.clone(),
    }
}

/// `State.Marshal`: the Definition for `state`'s output.
pub fn marshal(state: &State, opts: &MarshalOptions) -> Result<pb::Definition, LlbError> {
    let mut def = pb::Definition::default();
    let Some(target) = &state.output else {
        return Ok(def);
    };
    let mut m = Marshaler {
        opts,
        cache: HashMap::new(),
    };
    let mut visited: HashSet<usize> = HashSet::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut locations: BTreeMap<String, Vec<SourceLocation>> = BTreeMap::new();
    let (target_vertex, _) = target.resolve()?;
    // Depth-first, inputs before the vertex, iteratively so deep graphs cannot overflow
    // the stack.
    let mut stack: Vec<(Vertex, bool)> = vec![(target_vertex, false)];
    while let Some((vertex, expanded)) = stack.pop() {
        if visited.contains(&vertex.id()) {
            continue;
        }
        if !expanded {
            stack.push((vertex.clone(), true));
            let mut seen_inputs = HashSet::new();
            let inputs: Vec<Vertex> = vertex_inputs(&vertex)
                .iter()
                .map(Output::resolve)
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|(v, i)| seen_inputs.insert((v.id(), *i)))
                .map(|(v, _)| v)
                .collect();
            for input in inputs.into_iter().rev() {
                if !visited.contains(&input.id()) {
                    stack.push((input, false));
                }
            }
            continue;
        }
        let marshaled = m.marshal(&vertex)?;
        visited.insert(vertex.id());
        let key = marshaled.digest.as_str().to_owned();
        let merged = merge_metadata(
            def.metadata.get(&key).cloned().unwrap_or_default(),
            &marshaled.metadata,
        );
        def.metadata.insert(key.clone(), merged);
        locations
            .entry(key)
            .or_default()
            .extend(marshaled.locations.iter().cloned());
        if seen.insert(marshaled.digest.clone()) {
            def.def.push(marshaled.bytes.clone());
        }
    }
    let terminal = pb::Op {
        inputs: vec![m.input(target)?],
        ..Default::default()
    };
    let bytes = terminal.gogo_encode();
    let digest = Digest::of(&bytes);
    def.def.push(bytes);
    let mut md = def
        .metadata
        .get(digest.as_str())
        .cloned()
        .unwrap_or_default();
    md.caps = BTreeMap::from([
        (caps::CONSTRAINTS.to_owned(), true),
        (caps::PLATFORM.to_owned(), true),
    ]);
    for other in def.metadata.values() {
        if other.ignore_cache {
            md.caps.insert(caps::META_IGNORE_CACHE.to_owned(), true);
        }
        if !other.description.is_empty() {
            md.caps.insert(caps::META_DESCRIPTION.to_owned(), true);
        }
        if other.export_cache.is_some() {
            md.caps.insert(caps::META_EXPORT_CACHE.to_owned(), true);
        }
    }
    def.metadata.insert(digest.as_str().to_owned(), md);
    def.source = Some(source_section(locations));
    Ok(def)
}

/// The `Source` section: every op's locations and the source maps they point into.
fn source_section(locations: BTreeMap<String, Vec<SourceLocation>>) -> pb::Source {
    let mut maps: Vec<Arc<SourceMap>> = Vec::new();
    let mut source = pb::Source::default();
    for (digest, locs) in locations {
        let mut out = pb::Locations::default();
        for loc in locs {
            let index = match maps.iter().position(|m| Arc::ptr_eq(m, &loc.map)) {
                Some(i) => i,
                None => {
                    maps.push(loc.map.clone());
                    maps.len() - 1
                }
            };
            out.locations.push(pb::Location {
                source_index: index as i32,
                ranges: loc.ranges,
            });
        }
        source.locations.insert(digest, out);
    }
    source.infos = maps
        .iter()
        .map(|m| pb::SourceInfo {
            filename: m.filename.clone(),
            data: m.data.clone(),
            definition: m.definition.clone(),
        })
        .collect();
    source
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn amd64() -> pb::Platform {
        pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }
    }

    fn opts() -> MarshalOptions {
        MarshalOptions {
            platform: amd64(),
            caps: Some(
                kiln_proto::caps::REGISTERED
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            ),
            local_unique_id: "uid".into(),
        }
    }

    fn ops(def: &pb::Definition) -> Vec<(Digest, pb::Op)> {
        kiln_proto::decode_ops(def)
            .unwrap()
            .into_iter()
            .map(|o| (o.digest, o.op))
            .collect()
    }

    #[test]
    fn scratch_marshals_to_an_empty_definition() {
        let def = marshal(&State::scratch(), &opts()).unwrap();
        assert!(def.def.is_empty());
        assert!(def.source.is_none());
    }

    #[test]
    fn image_run_matches_the_go_client_encoding() {
        let img = image(
            "busybox",
            ResolveMode::Default,
            Constraints::new().platform(amd64()),
        );
        assert_eq!(img.get_platform(), Some(&amd64()));
        let run = img.run(Run::new(img.args(vec![
            "/bin/sh".into(),
            "-c".into(),
            "true".into(),
        ])));
        let def = marshal(&run, &opts()).unwrap();
        let ops = ops(&def);
        assert_eq!(ops.len(), 3);
        let pb::op::Op::Source(src) = ops[0].1.op.as_ref().unwrap() else {
            panic!()
        };
        assert_eq!(
            src.identifier,
            "docker-image://docker.io/library/busybox:latest"
        );
        let pb::op::Op::Exec(exec) = ops[1].1.op.as_ref().unwrap() else {
            panic!()
        };
        assert_eq!(exec.mounts[0].input, 0);
        assert_eq!(exec.mounts[0].output, 0);
        assert!(exec.meta.as_ref().unwrap().remove_mount_stubs_recursive);
        let md = &def.metadata[ops[1].0.as_str()];
        assert!(md.caps.contains_key("exec.meta.setsdefaultpath"));
        let terminal = &def.metadata[ops[2].0.as_str()];
        assert_eq!(
            terminal.caps.keys().collect::<Vec<_>>(),
            vec!["constraints", "platform"]
        );
        // Every visited op has an (empty) location entry.
        assert_eq!(def.source.as_ref().unwrap().locations.len(), 2);
    }

    #[test]
    fn without_caps_path_defaults_into_env() {
        let s = State::scratch().args(vec!["x".into()]);
        let run = s.run(Run::new(s.clone()));
        let mut o = opts();
        o.caps = Some(BTreeSet::new());
        let def = marshal(&run, &o).unwrap();
        let pb::op::Op::Exec(exec) = ops(&def)[0].1.op.clone().unwrap() else {
            panic!()
        };
        assert_eq!(
            exec.meta.unwrap().env,
            vec![format!("PATH={}", kiln_proto::DEFAULT_PATH)]
        );
    }

    #[test]
    fn file_op_inputs_and_relative_actions() {
        let ctx = local("context", &LocalOptions::default(), Constraints::new());
        let base = image("a", ResolveMode::Default, Constraints::new()).dir("/w");
        let copy = |src: &str, dest: &str| FileAction::Copy {
            source: ctx.clone(),
            src: src.into(),
            dest: dest.into(),
            info: CopyInfo::default(),
        };
        let st = base.file(
            vec![
                copy("a", "rel/"),
                FileAction::Mkdir {
                    path: "d".into(),
                    mode: 0o40755,
                    make_parents: true,
                    chown: Some(ChownOpt::with_user("app:0")),
                    created_time: None,
                },
            ],
            Constraints::new(),
        );
        let def = marshal(&st, &opts()).unwrap();
        let ops = ops(&def);
        let (_, file) = ops
            .iter()
            .find(|(_, o)| matches!(o.op, Some(pb::op::Op::File(_))))
            .unwrap();
        let pb::op::Op::File(f) = file.op.as_ref().unwrap() else {
            panic!()
        };
        assert_eq!(file.inputs.len(), 2);
        assert_eq!((f.actions[0].input, f.actions[0].secondary_input), (0, 1));
        assert_eq!(f.actions[0].output, -1);
        assert_eq!((f.actions[1].input, f.actions[1].output), (2, 0));
        let Some(pb::file_action::Action::Copy(c)) = &f.actions[0].action else {
            panic!()
        };
        assert_eq!((c.src.as_str(), c.dest.as_str()), ("/a", "/w/rel/"));
        assert_eq!(c.mode, -1);
        let Some(pb::file_action::Action::Mkdir(m)) = &f.actions[1].action else {
            panic!()
        };
        assert_eq!((m.path.as_str(), m.mode), ("/w/d", 0o755));
        let owner = m.owner.as_ref().unwrap();
        assert_eq!(
            owner.user.as_ref().unwrap().user,
            Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: "app".into(),
                input: 0
            }))
        );
        assert_eq!(
            owner.group.as_ref().unwrap().user,
            Some(pb::user_opt::User::ById(0))
        );
        // The local source gets the marshal-wide unique id and no platform.
        let (_, local) = ops
            .iter()
            .find(|(_, o)| {
                matches!(&o.op, Some(pb::op::Op::Source(s)) if s.identifier == "local://context")
            })
            .unwrap();
        assert!(local.platform.is_none());
        let Some(pb::op::Op::Source(s)) = &local.op else {
            panic!()
        };
        assert_eq!(s.attrs["local.unique"], "uid");
    }

    #[test]
    fn exec_mounts_sort_and_number_outputs() {
        let base = image("a", ResolveMode::Default, Constraints::new());
        let other = image("b", ResolveMode::Default, Constraints::new());
        let mut run = Run::new(base.args(vec!["x".into()]));
        run.mounts.push(MountSpec {
            readonly: true,
            selector: "/sub".into(),
            ..MountSpec::new("/z", &other)
        });
        run.mounts.push(MountSpec {
            cache: Some(("/c".into(), pb::CacheSharingOpt::Locked)),
            ..MountSpec::new("/c", &State::scratch())
        });
        run.mounts.push(MountSpec {
            tmpfs: Some(0),
            ..MountSpec::new("/t", &State::scratch())
        });
        run.mounts.push(MountSpec::new("/a", &other));
        run.secrets.push(SecretInfo::new("/run/secrets/s"));
        run.ssh.push(SshInfo::default());
        let st = base.run(run);
        let def = marshal(&st, &opts()).unwrap();
        let ops = ops(&def);
        let (digest, exec_op) = ops
            .iter()
            .find(|(_, o)| matches!(o.op, Some(pb::op::Op::Exec(_))))
            .unwrap();
        let pb::op::Op::Exec(e) = exec_op.op.as_ref().unwrap() else {
            panic!()
        };
        let dests: Vec<&str> = e.mounts.iter().map(|m| m.dest.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/",
                "/a",
                "/c",
                "/t",
                "/z",
                "/run/secrets/s",
                "/run/buildkit/ssh_agent.0"
            ]
        );
        let outputs: Vec<i64> = e.mounts.iter().map(|m| m.output).collect();
        assert_eq!(outputs, vec![0, 1, -1, -1, -1, 0, 0]);
        let inputs: Vec<i64> = e.mounts.iter().map(|m| m.input).collect();
        assert_eq!(inputs, vec![0, 1, -1, -1, 1, 0, 0]);
        assert_eq!(exec_op.inputs.len(), 2, "the same source is one input");
        assert!(
            e.meta
                .as_ref()
                .unwrap()
                .env
                .contains(&"SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0".to_owned())
        );
        let caps: Vec<&String> = def.metadata[digest.as_str()].caps.keys().collect();
        for cap in [
            "exec.mount.bind",
            "exec.mount.cache",
            "exec.mount.cache.sharing",
            "exec.mount.selector",
            "exec.mount.secret",
            "exec.mount.ssh",
            "exec.mount.tmpfs",
        ] {
            assert!(caps.iter().any(|c| *c == cap), "{cap} in {caps:?}");
        }
        assert!(!caps.iter().any(|c| *c == "exec.mount.tmpfs.size"));
    }

    #[test]
    fn merge_drops_scratch_and_has_no_platform() {
        let a = image("a", ResolveMode::Default, Constraints::new());
        assert!(
            merge(vec![State::scratch()], Constraints::new())
                .output()
                .is_none()
        );
        let single = merge(vec![a.clone(), State::scratch()], Constraints::new());
        assert!(single.output().is_some());
        let copy = State::scratch().file(
            vec![FileAction::Mkfile {
                path: "f".into(),
                mode: 0o644,
                data: b"x".to_vec(),
                chown: None,
                created_time: None,
            }],
            Constraints::new(),
        );
        let m = merge(vec![a, copy], Constraints::new().custom_name("m"));
        let def = marshal(&m, &opts()).unwrap();
        let ops = ops(&def);
        let (d, merge_op) = ops
            .iter()
            .find(|(_, o)| matches!(o.op, Some(pb::op::Op::Merge(_))))
            .unwrap();
        assert!(merge_op.platform.is_none());
        assert!(def.metadata[d.as_str()].caps.contains_key("mergeop"));
    }

    #[test]
    fn deferred_outputs_resolve_at_marshal() {
        let (out, setter) = Output::deferred();
        let ctx = State::new(Some(out));
        let st = State::scratch().file(
            vec![FileAction::Copy {
                source: ctx,
                src: "/x".into(),
                dest: "/x".into(),
                info: CopyInfo::default(),
            }],
            Constraints::new(),
        );
        assert_eq!(marshal(&st, &opts()).unwrap_err(), LlbError::UnsetOutput);
        setter.set(
            local("context", &LocalOptions::default(), Constraints::new())
                .output()
                .cloned(),
        );
        assert_eq!(marshal(&st, &opts()).unwrap().def.len(), 3);
    }

    #[test]
    fn paths_normalize_like_fileop() {
        assert_eq!(normalize_path("/w", "a/", true), "/w/a/");
        assert_eq!(normalize_path("/w", "a/.", true), "/w/a/.");
        assert_eq!(normalize_path("/", "/.", true), "/.");
        assert_eq!(normalize_path("/w", "../x", false), "/x");
    }

    #[test]
    fn git_sources() {
        let g = git(
            "git@github.com:moby/buildkit.git",
            "v0.11.6",
            &GitOptions::default(),
            Constraints::new(),
        );
        let def = marshal(&g, &opts()).unwrap();
        let ops = ops(&def);
        let Some(pb::op::Op::Source(s)) = &ops[0].1.op else {
            panic!()
        };
        assert_eq!(s.identifier, "git://github.com/moby/buildkit.git#v0.11.6");
        assert_eq!(s.attrs["git.fullurl"], "git@github.com:moby/buildkit.git");
        assert_eq!(s.attrs["git.mountsshsock"], "default");
        let g = git(
            "github.com/a/b",
            "",
            &GitOptions::default(),
            Constraints::new(),
        );
        let def = marshal(&g, &opts()).unwrap();
        let Some(pb::op::Op::Source(s)) = &ops_of(&def)[0].op else {
            panic!()
        };
        assert_eq!(s.identifier, "git://github.com/a/b");
        assert_eq!(s.attrs["git.fullurl"], "https://github.com/a/b");
    }

    fn ops_of(def: &pb::Definition) -> Vec<pb::Op> {
        ops(def).into_iter().map(|(_, o)| o).collect()
    }
}
