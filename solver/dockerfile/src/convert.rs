//! Dockerfile to LLB conversion (BuildKit v0.11.6 `dockerfile2llb`): stages and their
//! dependencies, `ARG` scoping and the platform build arguments, base images resolved in
//! parallel and pinned by digest, every instruction dispatched onto an [`llb::State`], the
//! build-context local source with its follow-paths and exclude patterns, vertex names as
//! BuildKit prints them, and the image config with its history.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use kiln_proto::pb;

use crate::image::{self, Image};
use kiln_dockerfile_syntax::gocompat;
use kiln_dockerfile_syntax::instructions::{
    self, AddCommand, Code, Command, CopyCommand, KeyValueOptional, ParseOptions, RunCommand,
    SourceContent, SourcesAndDest, Stage,
};
use kiln_dockerfile_syntax::parser::{self, Warning};
use kiln_dockerfile_syntax::shell::{self, Env, Lex};
use kiln_llb::reference;
use kiln_llb::{
    self as llb, ChownOpt, Constraints, CopyInfo, FileAction, MountSpec, ResolveMode, Run,
    SecretInfo, SourceMap, SshInfo, State,
};

/// Errors of the conversion. Display texts are BuildKit's; [`ConvertError::location`]
/// gives the Dockerfile lines BuildKit attaches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("the Dockerfile cannot be empty")]
    Empty,
    #[error(transparent)]
    Parse(#[from] parser::ParseError),
    #[error(transparent)]
    Instruction(#[from] instructions::InstructionError),
    #[error("target stage {0} could not be found")]
    TargetNotFound(String),
    #[error("invalid stage index {0}")]
    InvalidStageIndex(i64),
    #[error("circular dependency detected on stage: {0}")]
    CircularDependency(String),
    /// An error tied to Dockerfile lines (a `FROM` or the instruction being dispatched).
    #[error("{message}")]
    At {
        message: String,
        location: Vec<(usize, usize)>,
    },
    /// The graph could not be marshaled (BuildKit's builder wraps this the same way).
    #[error("failed to marshal LLB definition: {0}")]
    Llb(#[from] llb::LlbError),
}

impl ConvertError {
    /// The Dockerfile lines the error refers to, as `(start, end)` per line.
    pub fn location(&self) -> Vec<(usize, usize)> {
        match self {
            ConvertError::Parse(e) => {
                let (s, e) = e.lines();
                parser::to_ranges(s, e)
            }
            ConvertError::Instruction(e) => e.location().to_vec(),
            ConvertError::At { location, .. } => location.clone(),
            _ => Vec::new(),
        }
    }

    fn at(message: impl Into<String>, location: &[(usize, usize)]) -> Self {
        ConvertError::At {
            message: message.into(),
            location: location.to_vec(),
        }
    }
}

/// What [`ImageMetaResolver::resolve_image_config`] is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveImageConfigOptions {
    pub platform: pb::Platform,
    pub resolve_mode: ResolveMode,
    /// The progress name BuildKit gives the lookup (`[internal] load metadata for …`).
    pub log_name: String,
}

/// A resolved base image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedImageConfig {
    /// The manifest digest the reference is pinned to (`sha256:…`), if any.
    pub digest: Option<String>,
    /// The image config blob.
    pub config: Vec<u8>,
}

/// Looks up image configs (registry, local store, test fixtures).
#[async_trait::async_trait]
pub trait ImageMetaResolver: Send + Sync {
    /// Resolves `reference` (normalized, e.g. `docker.io/library/alpine:latest`).
    async fn resolve_image_config(
        &self,
        reference: &str,
        opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String>;
}

/// The Dockerfile source as it appears in BuildKit's source maps.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceMapOptions {
    pub filename: String,
    /// The Definition that loaded the Dockerfile, if any.
    pub definition: Option<pb::Definition>,
}

/// Conversion settings (BuildKit's `ConvertOpt`, as `buildctl --opt` sets them).
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The stage to build (default: the last one).
    pub target: Option<String>,
    pub build_args: BTreeMap<String, String>,
    /// Labels added to the target's image config.
    pub labels: BTreeMap<String, String>,
    /// `None` builds for the build platform (BuildKit's implicit target platform).
    pub target_platform: Option<pb::Platform>,
    /// The worker platforms; empty means the host's.
    pub build_platforms: Vec<pb::Platform>,
    /// Session of the client holding the build context; empty for none.
    pub session_id: String,
    /// Name of the build-context local source (`context`).
    pub context_name: String,
    /// `.dockerignore` content; its patterns become the context's exclude patterns.
    pub dockerignore: Option<Vec<u8>>,
    /// `None`: use the cache. `Some([])`: ignore it for all stages; else for these stages.
    pub ignore_cache: Option<Vec<String>>,
    /// Prefix of cache-mount IDs (`BUILDKIT_CACHE_MOUNT_NS`).
    pub cache_id_namespace: String,
    pub image_resolve_mode: ResolveMode,
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// Size of `/dev/shm` in bytes; 0 for the default.
    pub shm_size: i64,
    pub ulimits: Vec<pb::Ulimit>,
    pub cgroup_parent: String,
    pub force_network: pb::NetMode,
    /// The LLB capabilities of the solver (default: all of BuildKit v0.11.6's).
    pub llb_caps: Option<BTreeSet<String>>,
    pub hostname: String,
    /// Emit source locations pointing into the Dockerfile.
    pub source_map: Option<SourceMapOptions>,
    /// `SOURCE_DATE_EPOCH` (Unix seconds) for history timestamps.
    pub source_date_epoch: Option<i64>,
    /// Prefix vertex names with the platform (multi-platform builds).
    pub prefix_platform: bool,
    /// BuildKit's labs channel: `RUN --security`, `ADD --checksum`, `ADD <git ref>`.
    pub labs: bool,
    /// The `local.unique` attribute of local sources without a session (BuildKit draws a
    /// random one per marshal; `None` does the same).
    pub local_unique_id: Option<String>,
    /// Replaces the `local://context` source (BuildKit's `BuildContext`: a git or HTTP
    /// context, or a subdirectory of one).
    pub build_context: Option<State>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            target: None,
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            target_platform: None,
            build_platforms: Vec::new(),
            session_id: String::new(),
            context_name: "context".into(),
            dockerignore: None,
            ignore_cache: None,
            cache_id_namespace: String::new(),
            image_resolve_mode: ResolveMode::Default,
            extra_hosts: Vec::new(),
            shm_size: 0,
            ulimits: Vec::new(),
            cgroup_parent: String::new(),
            force_network: pb::NetMode::Unset,
            llb_caps: Some(all_caps()),
            hostname: String::new(),
            source_map: None,
            source_date_epoch: None,
            prefix_platform: false,
            labs: true,
            local_unique_id: None,
            build_context: None,
        }
    }
}

/// Every capability BuildKit v0.11.6 registers.
pub fn all_caps() -> BTreeSet<String> {
    kiln_proto::caps::REGISTERED
        .iter()
        .map(|c| (*c).to_owned())
        .collect()
}

/// The result of a conversion.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The marshaled graph (empty when the target is `scratch` without any op).
    pub definition: pb::Definition,
    /// The target's image config.
    pub image: Image,
    /// Parser warnings and ignored `syntax` directives.
    pub warnings: Vec<Warning>,
}

impl Converted {
    /// The Definition as BuildKit's gogo encoder writes it.
    pub fn definition_bytes(&self) -> Vec<u8> {
        use kiln_proto::encode::GogoEncode;
        self.definition.gogo_encode()
    }

    /// The image config as BuildKit writes it.
    pub fn image_config_json(&self) -> Vec<u8> {
        self.image.to_json()
    }
}

/// A random 25-character base-36 ID (BuildKit's `identity.NewID`).
pub fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut value: u128 = 0;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        value = (value << 64) | u128::from(h.finish());
    }
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::with_capacity(25);
    for _ in 0..25 {
        out.push(DIGITS[(value % 36) as usize]);
        value /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// containerd's `platforms.Parse`.
pub fn parse_platform(specifier: &str) -> Result<pb::Platform, String> {
    let invalid = ": invalid argument";
    if specifier.contains('*') {
        return Err(format!(
            "{}: wildcards not yet supported{invalid}",
            gocompat::quote(specifier)
        ));
    }
    let parts: Vec<&str> = specifier.split('/').collect();
    for part in &parts {
        let valid = !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(format!(
                "{} is an invalid component of {}: platform specifier component must match \"^[A-Za-z0-9_-]+$\"{invalid}",
                gocompat::quote(part),
                gocompat::quote(specifier)
            ));
        }
    }
    let normalize_os = |os: &str| -> String {
        match os.to_lowercase().as_str() {
            "" => "linux".into(),
            "macos" => "darwin".into(),
            other => other.into(),
        }
    };
    let arch = |a: &str, v: &str| -> (String, String) {
        let n = llb::normalize_platform(&pb::Platform {
            os: "linux".into(),
            architecture: a.to_owned(),
            variant: v.to_owned(),
            ..Default::default()
        });
        (n.architecture, n.variant)
    };
    let host = kiln_proto::platform::host_platform();
    let mut p = pb::Platform::default();
    match parts.as_slice() {
        [one] => {
            let os = normalize_os(one);
            const KNOWN_OS: [&str; 17] = [
                "aix",
                "android",
                "darwin",
                "dragonfly",
                "freebsd",
                "hurd",
                "illumos",
                "ios",
                "js",
                "linux",
                "nacl",
                "netbsd",
                "openbsd",
                "plan9",
                "solaris",
                "windows",
                "zos",
            ];
            if KNOWN_OS.contains(&os.as_str()) {
                p.os = os;
                p.architecture = host.architecture.clone();
                if host.architecture == "arm" && host.variant != "v7" {
                    p.variant.clone_from(&host.variant);
                }
                return Ok(p);
            }
            let (a, mut v) = arch(one, "");
            if a == "arm" && v == "v7" {
                v.clear();
            }
            const KNOWN_ARCH: [&str; 24] = [
                "386",
                "amd64",
                "amd64p32",
                "arm",
                "armbe",
                "arm64",
                "arm64be",
                "ppc64",
                "ppc64le",
                "loong64",
                "mips",
                "mipsle",
                "mips64",
                "mips64le",
                "mips64p32",
                "mips64p32le",
                "ppc",
                "riscv",
                "riscv64",
                "s390",
                "s390x",
                "sparc",
                "sparc64",
                "wasm",
            ];
            if KNOWN_ARCH.contains(&a.as_str()) {
                p.os = host.os.clone();
                p.architecture = a;
                p.variant = v;
                return Ok(p);
            }
            Err(format!(
                "{}: unknown operating system or architecture{invalid}",
                gocompat::quote(specifier)
            ))
        }
        [os, a] => {
            p.os = normalize_os(os);
            let (a, mut v) = arch(a, "");
            if a == "arm" && v == "v7" {
                v.clear();
            }
            p.architecture = a;
            p.variant = v;
            Ok(p)
        }
        [os, a, v] => {
            p.os = normalize_os(os);
            let (a, mut v) = arch(a, v);
            if a == "arm64" && v.is_empty() {
                v = "v8".into();
            }
            p.architecture = a;
            p.variant = v;
            Ok(p)
        }
        _ => Err(format!(
            "{}: cannot parse platform specifier{invalid}",
            gocompat::quote(specifier)
        )),
    }
}

const EMPTY_IMAGE_NAME: &str = "scratch";
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

struct PlatformOpt {
    target: pb::Platform,
    build: Vec<pb::Platform>,
    implicit_target: bool,
}

fn build_platform_opt(opts: &ConvertOptions) -> PlatformOpt {
    let mut build = opts.build_platforms.clone();
    if let Some(t) = &opts.target_platform
        && build.is_empty()
    {
        build = vec![t.clone()];
    }
    if build.is_empty() {
        build = vec![kiln_proto::platform::host_platform()];
    }
    match &opts.target_platform {
        Some(t) => PlatformOpt {
            target: t.clone(),
            build,
            implicit_target: false,
        },
        None => PlatformOpt {
            target: build[0].clone(),
            build,
            implicit_target: true,
        },
    }
}

fn platform_args(po: &PlatformOpt) -> Vec<KeyValueOptional> {
    let bp = &po.build[0];
    let tp = &po.target;
    [
        ("BUILDPLATFORM", llb::format_platform(bp)),
        ("BUILDOS", bp.os.clone()),
        ("BUILDARCH", bp.architecture.clone()),
        ("BUILDVARIANT", bp.variant.clone()),
        ("TARGETPLATFORM", llb::format_platform(tp)),
        ("TARGETOS", tp.os.clone()),
        ("TARGETARCH", tp.architecture.clone()),
        ("TARGETVARIANT", tp.variant.clone()),
    ]
    .into_iter()
    .map(|(k, v)| KeyValueOptional {
        key: k.to_owned(),
        value: Some(v),
        comment: String::new(),
    })
    .collect()
}

fn set_kv_value(mut kv: KeyValueOptional, values: &BTreeMap<String, String>) -> KeyValueOptional {
    if let Some(v) = values.get(&kv.key) {
        kv.value = Some(v.clone());
    }
    kv
}

fn meta_args_to_map(args: &[KeyValueOptional]) -> Env {
    args.iter()
        .map(|a| (a.key.clone(), a.value_string()))
        .collect()
}

fn proxy_env_from_build_args(args: &BTreeMap<String, String>) -> Option<pb::ProxyEnv> {
    let mut pe = pb::ProxyEnv::default();
    let mut set = false;
    for (k, v) in args {
        let slot = match k.to_lowercase().as_str() {
            "http_proxy" => &mut pe.http_proxy,
            "https_proxy" => &mut pe.https_proxy,
            "ftp_proxy" => &mut pe.ftp_proxy,
            "no_proxy" => &mut pe.no_proxy,
            "all_proxy" => &mut pe.all_proxy,
            _ => continue,
        };
        v.clone_into(slot);
        set = true;
    }
    set.then_some(pe)
}

/// A command with the stages it reads from (`COPY --from`, `RUN --mount from=`).
#[derive(Debug, Clone)]
struct DispatchCommand {
    command: Command,
    sources: Vec<usize>,
}

#[derive(Debug, Clone)]
struct DispatchState {
    stage: Stage,
    state: State,
    image: Image,
    platform: Option<pb::Platform>,
    base: Option<usize>,
    deps: BTreeSet<usize>,
    build_args: Vec<KeyValueOptional>,
    commands: Vec<DispatchCommand>,
    ctx_paths: BTreeSet<String>,
    ignore_cache: bool,
    cmd_set: bool,
    unregistered: bool,
    stage_name: String,
    /// Signed as in BuildKit: `COPY --link` steps it back before naming its ops.
    cmd_index: i64,
    cmd_total: usize,
}

impl DispatchState {
    fn new(stage: Stage) -> Self {
        DispatchState {
            stage,
            state: State::scratch(),
            image: Image::default(),
            platform: None,
            base: None,
            deps: BTreeSet::new(),
            build_args: Vec::new(),
            commands: Vec::new(),
            ctx_paths: BTreeSet::new(),
            ignore_cache: false,
            cmd_set: false,
            unregistered: false,
            stage_name: String::new(),
            cmd_index: 0,
            cmd_total: 0,
        }
    }
}

#[derive(Debug, Default)]
struct DispatchStates {
    states: Vec<DispatchState>,
    by_name: BTreeMap<String, usize>,
}

impl DispatchStates {
    fn add(&mut self, mut ds: DispatchState) -> usize {
        if let Some(base) = self.by_name.get(&ds.stage.base_name) {
            ds.base = Some(*base);
        }
        let index = self.states.len();
        if !ds.stage.name.is_empty() {
            self.by_name.insert(ds.stage.name.to_lowercase(), index);
        }
        self.states.push(ds);
        index
    }

    fn find_by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(&name.to_lowercase()).copied()
    }
}

/// The stages reachable from `target` through bases and dependencies.
fn reachable_from(states: &[DispatchState], target: usize) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([target]);
    while let Some(i) = queue.pop_front() {
        if !seen.insert(i) {
            continue;
        }
        if let Some(b) = states[i].base {
            queue.push_back(b);
        }
        queue.extend(states[i].deps.iter().copied());
    }
    seen
}

fn has_circular_dependency(states: &[DispatchState]) -> Option<usize> {
    fn visit(
        states: &[DispatchState],
        i: usize,
        visited: &mut BTreeSet<usize>,
        path: &mut BTreeSet<usize>,
    ) -> bool {
        if !visited.insert(i) {
            return false;
        }
        path.insert(i);
        for dep in &states[i].deps {
            if path.contains(dep) || visit(states, *dep, visited, path) {
                return true;
            }
        }
        path.remove(&i);
        false
    }
    let mut visited = BTreeSet::new();
    let mut path = BTreeSet::new();
    (0..states.len()).find(|i| visit(states, *i, &mut visited, &mut path))
}

/// Everything settled before base images are resolved.
struct Plan {
    opts: ConvertOptions,
    platform_opt: PlatformOpt,
    meta_args: Vec<KeyValueOptional>,
    shlex: Lex,
    proxy_env: Option<pb::ProxyEnv>,
    warnings: Vec<Warning>,
    all: DispatchStates,
    target: usize,
    reachable: BTreeSet<usize>,
    stage_names: Vec<String>,
    source_map: Option<Arc<SourceMap>>,
    requests: Vec<Request>,
}

/// A base image to resolve for a stage.
#[derive(Debug, Clone)]
struct Request {
    state: usize,
    reference: reference::Reference,
    orig_name: String,
    platform: pb::Platform,
    log_name: String,
}

/// Converts a Dockerfile to LLB as BuildKit v0.11.6's `Dockerfile2LLB` does.
pub async fn dockerfile_to_llb(
    dockerfile: &[u8],
    opts: &ConvertOptions,
    resolver: &dyn ImageMetaResolver,
) -> Result<Converted, ConvertError> {
    let mut plan = prepare(dockerfile, opts)?;
    // Identical lookups (same reference, platform and mode) are made once.
    let mut unique: Vec<(String, ResolveImageConfigOptions)> = Vec::new();
    let mut which = Vec::new();
    for r in &plan.requests {
        let key = (
            r.reference.to_string(),
            ResolveImageConfigOptions {
                platform: r.platform.clone(),
                resolve_mode: opts.image_resolve_mode,
                log_name: r.log_name.clone(),
            },
        );
        let pos = unique
            .iter()
            .position(|(k, o)| *k == key.0 && o.platform == key.1.platform)
            .unwrap_or_else(|| {
                unique.push(key);
                unique.len() - 1
            });
        which.push(pos);
    }
    let results = futures_util::future::join_all(
        unique
            .iter()
            .map(|(reference, o)| resolver.resolve_image_config(reference, o)),
    )
    .await;
    let resolved: Vec<Result<ResolvedImageConfig, String>> =
        which.iter().map(|i| results[*i].clone()).collect();
    let requests = std::mem::take(&mut plan.requests);
    finish(plan, requests, resolved)
}

fn prepare(dockerfile: &[u8], opts: &ConvertOptions) -> Result<Plan, ConvertError> {
    if dockerfile.is_empty() {
        return Err(ConvertError::Empty);
    }
    let mut opts = opts.clone();
    if opts.context_name.is_empty() {
        opts.context_name = "context".into();
    }
    let platform_opt = build_platform_opt(&opts);
    let mut meta_args: Vec<KeyValueOptional> = platform_args(&platform_opt)
        .into_iter()
        .map(|a| set_kv_value(a, &opts.build_args))
        .collect();
    let text = String::from_utf8_lossy(dockerfile).into_owned();
    let parsed = parser::parse(&text)?;
    let mut warnings = parsed.warnings.clone();
    if let Some(syntax) = parser::detect_syntax(&text)
        && !is_builtin_syntax(&syntax.reference)
    {
        warnings.push(Warning {
            short: format!(
                "syntax directive {} ignored: only the built-in Dockerfile frontend (dockerfile 1.5) is available",
                syntax.cmdline
            ),
            detail: Vec::new(),
            url: String::new(),
            line: Some(syntax.line),
        });
    }
    let proxy_env = proxy_env_from_build_args(&opts.build_args);
    let df = instructions::parse_with(&parsed, ParseOptions { labs: opts.labs })?;
    let shlex = Lex::new(parsed.escape_token);
    for (_, args) in &df.meta_args {
        for meta_arg in args {
            let mut meta_arg = meta_arg.clone();
            match opts.build_args.get(&meta_arg.key) {
                Some(v) => meta_arg.value = Some(v.clone()),
                None => {
                    if let Some(v) = &meta_arg.value {
                        let env = meta_args_to_map(&meta_args);
                        meta_arg.value = Some(
                            shlex
                                .process_word_with_matches(v, &env)
                                .map(|(w, _)| w)
                                .unwrap_or_default(),
                        );
                    }
                }
            }
            meta_args.push(meta_arg);
        }
    }
    let source_map = opts.source_map.as_ref().map(|s| {
        Arc::new(SourceMap {
            filename: s.filename.clone(),
            data: dockerfile.to_vec(),
            definition: s.definition.clone(),
        })
    });

    let mut all = DispatchStates::default();
    for (i, st) in df.stages.iter().enumerate() {
        let env = meta_args_to_map(&meta_args);
        let (name, _) = shlex
            .process_word_with_matches(&st.base_name, &env)
            .map_err(|e| ConvertError::at(e.to_string(), &st.location))?;
        if name.is_empty() {
            return Err(ConvertError::at(
                format!("base name ({}) should not be blank", st.base_name),
                &st.location,
            ));
        }
        let mut stage = st.clone();
        stage.base_name = name;
        let mut ds = DispatchState::new(stage);
        ds.stage_name = st.name.clone();
        if !st.platform.is_empty() {
            let v = shlex
                .process_word_with_matches(&st.platform, &env)
                .map(|(w, _)| w)
                .map_err(|e| {
                    ConvertError::at(
                        format!("failed to process arguments for platform : {e}"),
                        &st.location,
                    )
                })?;
            let p = parse_platform(&v).map_err(|e| {
                ConvertError::at(format!("failed to parse platform {v}: {e}"), &st.location)
            })?;
            ds.platform = Some(p);
        }
        if st.name.is_empty() {
            ds.stage_name = format!("stage-{i}");
        }
        let index = all.add(ds);
        let ds = &mut all.states[index];
        let mut total = 0;
        if ds.stage.base_name != EMPTY_IMAGE_NAME && ds.base.is_none() {
            total = 1;
        }
        total += ds
            .stage
            .commands
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Add(_) | Command::Copy(_) | Command::Run(_) | Command::Workdir { .. }
                )
            })
            .count();
        ds.cmd_total = total;
        if let Some(ignore) = &opts.ignore_cache {
            ds.ignore_cache = ignore.is_empty()
                || (!st.name.is_empty() && ignore.iter().any(|n| n.eq_ignore_ascii_case(&st.name)));
        }
    }
    if all.states.is_empty() {
        // Only ARGs: BuildKit's instruction parser reports this on the first instruction.
        return Err(ConvertError::Instruction(
            instructions::InstructionError::NoBuildStage {
                location: Vec::new(),
            },
        ));
    }
    let target = match &opts.target {
        None => all.states.len() - 1,
        Some(t) if t.is_empty() => all.states.len() - 1,
        Some(t) => all
            .find_by_name(t)
            .ok_or_else(|| ConvertError::TargetNotFound(t.clone()))?,
    };

    // Dependencies, registering stages named by `--from` that are not stages.
    let count = all.states.len();
    for d in 0..count {
        let commands = all.states[d].stage.commands.clone();
        let mut out = Vec::with_capacity(commands.len());
        for cmd in commands {
            let sources = command_sources(&cmd, &mut all)?;
            for src in &sources {
                all.states[d].deps.insert(*src);
            }
            out.push(DispatchCommand {
                command: cmd,
                sources,
            });
        }
        all.states[d].commands = out;
    }
    if let Some(i) = has_circular_dependency(&all.states) {
        return Err(ConvertError::CircularDependency(
            all.states[i].stage_name.clone(),
        ));
    }
    if all.states.len() == 1 {
        all.states[0].stage_name.clear();
    }
    let stage_names: Vec<String> = all
        .states
        .iter()
        .filter(|s| !s.stage_name.is_empty())
        .map(|s| s.stage_name.clone())
        .collect();
    let reachable = reachable_from(&all.states, target);

    let mut requests = Vec::new();
    for (i, d) in all.states.iter_mut().enumerate() {
        if d.base.is_some() {
            continue;
        }
        if d.stage.base_name == EMPTY_IMAGE_NAME {
            d.state = State::scratch();
            let t = &platform_opt.target;
            d.image = Image::empty(&t.os, &t.architecture, &t.variant);
            continue;
        }
        let orig_name = d.stage.base_name.clone();
        let r = reference::parse_normalized_named(&orig_name).map_err(|e| {
            ConvertError::at(
                format!(
                    "failed to parse stage name {}: {e}",
                    gocompat::quote(&orig_name)
                ),
                &d.stage.location,
            )
        })?;
        let platform = d
            .platform
            .clone()
            .unwrap_or_else(|| platform_opt.target.clone());
        let r = r.tag_name_only();
        d.stage.base_name = r.to_string();
        if reachable.contains(&i) {
            let mut prefix = "[".to_owned();
            if opts.prefix_platform {
                prefix.push_str(&llb::format_platform(&platform));
                prefix.push(' ');
            }
            prefix.push_str("internal]");
            requests.push(Request {
                state: i,
                log_name: format!("{prefix} load metadata for {}", d.stage.base_name),
                reference: r,
                orig_name,
                platform,
            });
        } else {
            // Never built, but other stages' ONBUILD triggers may still point at it.
            let name = format!("FROM {}", d.stage.base_name);
            let custom = prefix_command(d, &name, opts.prefix_platform, Some(&platform), &[]);
            d.state = llb::image(
                &d.stage.base_name,
                opts.image_resolve_mode,
                Constraints::new()
                    .description("com.docker.dockerfile.v1.command", &d.stage.source_code)
                    .platform(platform.clone())
                    .custom_name(&custom)
                    .location(source_map.as_ref(), &d.stage.location),
            );
            d.platform = Some(platform);
        }
    }
    Ok(Plan {
        opts,
        platform_opt,
        meta_args,
        shlex,
        proxy_env,
        warnings,
        all,
        target,
        reachable,
        stage_names,
        source_map,
        requests,
    })
}

/// Whether a `syntax` directive names the frontend built into kiln.
fn is_builtin_syntax(reference: &str) -> bool {
    let r = reference
        .trim_start_matches("docker.io/")
        .trim_start_matches("docker/dockerfile-upstream")
        .trim_start_matches("docker/dockerfile");
    reference == "dockerfile.v0"
        || (r.len() < reference.len()
            && matches!(
                r,
                "" | ":1" | ":1.0" | ":1.1" | ":1.2" | ":1.3" | ":1.4" | ":1.5" | ":1.5.2"
            ))
}

fn command_sources(cmd: &Command, all: &mut DispatchStates) -> Result<Vec<usize>, ConvertError> {
    let mut names: Vec<(String, Vec<(usize, usize)>)> = Vec::new();
    match cmd {
        Command::Copy(c) if !c.from.is_empty() => match gocompat::atoi(&c.from) {
            Some(index) => {
                if index < 0 || index as usize >= all.states.len() {
                    return Err(ConvertError::InvalidStageIndex(index));
                }
                return Ok(vec![index as usize]);
            }
            None => names.push((c.from.clone(), c.code.location.clone())),
        },
        Command::Run(r) => {
            for m in &r.mounts {
                let from = if m.from.is_empty() {
                    EMPTY_IMAGE_NAME.to_owned()
                } else {
                    m.from.clone()
                };
                names.push((from, Vec::new()));
            }
        }
        _ => {}
    }
    let mut out = Vec::new();
    for (name, location) in names {
        match all.find_by_name(&name) {
            Some(i) => out.push(i),
            None => {
                let mut ds = DispatchState::new(Stage {
                    base_name: name,
                    location,
                    ..Default::default()
                });
                ds.unregistered = true;
                out.push(all.add(ds));
            }
        }
    }
    Ok(out)
}

/// `commonImageNames` of dockerfile2llb (its `docker.io/library` entries lack a slash).
fn common_image_names() -> Vec<String> {
    let mut out = Vec::new();
    for name in [
        "alpine", "busybox", "centos", "debian", "golang", "ubuntu", "fedora",
    ] {
        out.push(name.to_owned());
        out.push(format!("docker.io/library{name}"));
        out.push(format!("{name}:latest"));
        out.push(format!("docker.io/library{name}:latest"));
    }
    out
}

struct DispatchOpt<'a> {
    meta_args: &'a [KeyValueOptional],
    build_arg_values: &'a BTreeMap<String, String>,
    shlex: Lex,
    build_context: State,
    proxy_env: Option<pb::ProxyEnv>,
    cache_id_namespace: &'a str,
    target_platform: &'a pb::Platform,
    extra_hosts: &'a [(String, IpAddr)],
    shm_size: i64,
    ulimits: &'a [pb::Ulimit],
    cgroup_parent: &'a str,
    llb_caps: Option<&'a BTreeSet<String>>,
    source_map: Option<&'a Arc<SourceMap>>,
    prefix_platform: bool,
    labs: bool,
    epoch: Option<String>,
}

impl DispatchOpt<'_> {
    fn supports(&self, cap: &str) -> bool {
        self.llb_caps.is_some_and(|c| c.contains(cap))
    }
}

fn finish(
    plan: Plan,
    requests: Vec<Request>,
    resolved: Vec<Result<ResolvedImageConfig, String>>,
) -> Result<Converted, ConvertError> {
    let Plan {
        opts,
        platform_opt,
        meta_args,
        shlex,
        proxy_env,
        warnings,
        mut all,
        target,
        reachable,
        stage_names,
        source_map,
        ..
    } = plan;

    for (req, result) in requests.into_iter().zip(resolved) {
        let d = &mut all.states[req.state];
        let location = d.stage.location.clone();
        let cfg = result.map_err(|e| {
            let mut options: Vec<String> = stage_names.clone();
            options.extend(common_image_names());
            ConvertError::at(
                gocompat::with_suggestion(
                    format!("{}: {e}", req.orig_name),
                    &req.orig_name,
                    options.iter().map(String::as_str),
                    true,
                ),
                &location,
            )
        })?;
        let img = Image::from_json(&cfg.config)
            .map_err(|e| ConvertError::at(e.to_string(), &location))?;
        let mut platform = req.platform.clone();
        if d.platform.is_none() && platform_opt.implicit_target {
            platform = auto_detect_platform(&img, &platform, &platform_opt.build);
        }
        let mut r = req.reference.clone();
        if let Some(dgst) = cfg.digest.as_deref().filter(|d| !d.is_empty()) {
            r = r
                .with_digest(dgst)
                .map_err(|e| ConvertError::at(e.to_string(), &location))?;
        }
        d.stage.base_name = r.to_string();
        let is_scratch = img.diff_ids.as_ref().is_none_or(Vec::is_empty)
            && img.history.iter().all(|h| h.empty_layer);
        d.image = img;
        if is_scratch {
            d.state = State::scratch();
        } else {
            let name = format!("FROM {}", d.stage.base_name);
            let custom = prefix_command(d, &name, opts.prefix_platform, Some(&platform), &[]);
            d.state = llb::image(
                &d.stage.base_name,
                opts.image_resolve_mode,
                Constraints::new()
                    .description("com.docker.dockerfile.v1.command", &d.stage.source_code)
                    .platform(platform.clone())
                    .custom_name(&custom)
                    .location(source_map.as_ref(), &d.stage.location),
            );
        }
        d.platform = Some(platform);
    }

    let (context_output, context_setter) = llb::Output::deferred();
    let excludes = opts
        .dockerignore
        .as_deref()
        .map(crate::dockerignore::read_all)
        .unwrap_or_default();
    let epoch = opts.source_date_epoch.map(image::format_unix_time);
    let dopt = DispatchOpt {
        meta_args: &meta_args,
        build_arg_values: &opts.build_args,
        shlex,
        build_context: State::new(Some(context_output)),
        proxy_env,
        cache_id_namespace: &opts.cache_id_namespace,
        target_platform: &platform_opt.target,
        extra_hosts: &opts.extra_hosts,
        shm_size: opts.shm_size,
        ulimits: &opts.ulimits,
        cgroup_parent: &opts.cgroup_parent,
        llb_caps: opts.llb_caps.as_ref(),
        source_map: source_map.as_ref(),
        prefix_platform: opts.prefix_platform,
        labs: opts.labs,
        epoch,
    };
    let mut ctx_paths: BTreeSet<String> = BTreeSet::new();
    for i in 0..all.states.len() {
        if !reachable.contains(&i) {
            continue;
        }
        if let Some(b) = all.states[i].base {
            let (state, platform, image) = {
                let base = &all.states[b];
                (
                    base.state.clone(),
                    base.platform.clone(),
                    base.image.clone(),
                )
            };
            let d = &mut all.states[i];
            d.state = state;
            d.platform = platform;
            d.image = image;
        }
        let d = &mut all.states[i];
        if !shell::build_envs(&d.image.config.env).contains_key("PATH") {
            let os = d
                .platform
                .as_ref()
                .map(|p| p.os.clone())
                .unwrap_or_default();
            d.image
                .config
                .env
                .push(format!("PATH={}", llb::default_path_env(&os)));
        }
        for env in d.image.config.env.clone() {
            let (k, v) = parse_key_value(&env);
            d.state = d.state.add_env(&k, &v);
        }
        if !opts.hostname.is_empty() {
            d.state = d.state.hostname(&opts.hostname);
        }
        let location = d.stage.location.clone();
        if !d.image.config.working_dir.is_empty() {
            let wd = d.image.config.working_dir.clone();
            dispatch_workdir(d, &wd, None, &dopt).map_err(|e| ConvertError::at(e, &location))?;
        }
        if !d.image.config.user.is_empty() {
            let user = d.image.config.user.clone();
            dispatch_user(d, &user, false, &dopt);
        }
        d.state = d.state.network(opts.force_network);

        let triggers = d.image.config.on_build.clone().unwrap_or_default();
        for trigger in triggers {
            dispatch_onbuild_trigger(&mut all, i, &trigger, &dopt, opts.labs)
                .map_err(|e| ConvertError::at(e, &location))?;
        }
        all.states[i].image.config.on_build = None;

        let commands = all.states[i].commands.clone();
        for cmd in commands {
            dispatch(&mut all, i, cmd.command.clone(), &cmd.sources, &dopt)
                .map_err(|e| ConvertError::at(e, cmd.command.location()))?;
        }
        ctx_paths.extend(all.states[i].ctx_paths.iter().cloned());
    }

    let t = &mut all.states[target];
    for (k, v) in &opts.labels {
        t.image.config.labels.insert(k.clone(), v.clone());
    }
    let mut local_opts = llb::LocalOptions {
        session_id: opts.session_id.clone(),
        exclude_patterns: excludes,
        shared_key_hint: opts.context_name.clone(),
        ..Default::default()
    };
    if let Some(paths) = normalize_context_paths(&ctx_paths) {
        local_opts.follow_paths = paths;
    }
    let context = match &opts.build_context {
        Some(state) => state.clone(),
        None => llb::local(
            &opts.context_name,
            &local_opts,
            Constraints::new().custom_name("[internal] load build context"),
        ),
    };
    context_setter.set(context.output().cloned());

    if !platform_opt.implicit_target {
        t.image.os.clone_from(&platform_opt.target.os);
        t.image
            .architecture
            .clone_from(&platform_opt.target.architecture);
        t.image.variant.clone_from(&platform_opt.target.variant);
    }
    let marshal_opts = llb::MarshalOptions {
        platform: platform_opt.target.clone(),
        caps: opts.llb_caps.clone(),
        local_unique_id: opts.local_unique_id.clone().unwrap_or_else(new_id),
    };
    let definition = llb::marshal(&t.state, &marshal_opts)?;
    Ok(Converted {
        definition,
        image: t.image.clone(),
        warnings,
    })
}

fn auto_detect_platform(
    img: &Image,
    target: &pb::Platform,
    build: &[pb::Platform],
) -> pb::Platform {
    if target.os == img.os && target.architecture == img.architecture {
        return target.clone();
    }
    build
        .iter()
        .find(|p| p.os == img.os && p.architecture == img.architecture)
        .cloned()
        .unwrap_or_else(|| target.clone())
}

fn normalize_context_paths(paths: &BTreeSet<String>) -> Option<Vec<String>> {
    if paths.contains("/") {
        return None;
    }
    let mut out: Vec<String> = paths
        .iter()
        .map(|p| kiln_proto::paths::join(&[".", p]))
        .collect();
    out.sort();
    Some(out)
}

fn parse_key_value(env: &str) -> (String, String) {
    match env.split_once('=') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None => (env.to_owned(), String::new()),
    }
}

/// The image env: an existing key is replaced in place.
fn add_env(env: &mut Vec<String>, k: &str, v: &str) {
    let entry = format!("{k}={v}");
    match env.iter_mut().find(|e| parse_key_value(e).0 == k) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

fn uppercase_cmd(s: &str) -> String {
    match s.split_once(' ') {
        Some((first, rest)) => format!("{} {rest}", first.to_uppercase()),
        None => s.to_uppercase(),
    }
}

fn process_cmd_env(lex: &Lex, cmd: &str, env: &[String]) -> String {
    lex.process_word(cmd, &shell::build_envs(env))
        .unwrap_or_else(|_| cmd.to_owned())
}

fn prefix_command(
    d: &mut DispatchState,
    s: &str,
    prefix_platform: bool,
    platform: Option<&pb::Platform>,
    env: &[String],
) -> String {
    if d.cmd_total == 0 {
        return s.to_owned();
    }
    let mut out = "[".to_owned();
    if prefix_platform && let Some(p) = platform {
        out.push_str(&llb::format_platform(p));
        out.push_str(&format_target_platform(p, platform_from_env(env)));
        out.push(' ');
    }
    if !d.stage_name.is_empty() {
        out.push_str(&d.stage_name);
        out.push(' ');
    }
    d.cmd_index += 1;
    let width = (1.0 + gocompat::go_log10(d.cmd_total as f64)) as usize;
    out.push_str(&format!(
        "{:>width$}/{}] ",
        d.cmd_index,
        d.cmd_total,
        width = width
    ));
    out + s
}

fn format_target_platform(base: &pb::Platform, target: Option<pb::Platform>) -> String {
    let Some(mut target) = target else {
        return String::new();
    };
    if target.os.is_empty() {
        target.os.clone_from(&base.os);
    }
    if target.architecture.is_empty() {
        target.architecture.clone_from(&base.architecture);
    }
    let p = llb::normalize_platform(&target);
    if p.os == base.os && p.architecture != base.architecture {
        let mut arch = p.architecture.clone();
        if !p.variant.is_empty() {
            arch.push('/');
            arch.push_str(&p.variant);
        }
        return format!("->{arch}");
    }
    if p.os != base.os {
        return format!("->{}", llb::format_platform(&p));
    }
    String::new()
}

fn platform_from_env(env: &[String]) -> Option<pb::Platform> {
    let mut p = pb::Platform::default();
    let mut set = false;
    for e in env {
        let (k, v) = parse_key_value(e);
        match k.as_str() {
            "TARGETPLATFORM" => {
                if let Ok(p) = parse_platform(&v) {
                    return Some(p);
                }
            }
            "TARGETOS" => {
                p.os = v;
                set = true;
            }
            "TARGETARCH" => {
                p.architecture = v;
                set = true;
            }
            "TARGETVARIANT" => {
                p.variant = v;
                set = true;
            }
            _ => {}
        }
    }
    set.then_some(p)
}

fn commit_to_history(
    img: &mut Image,
    msg: &str,
    with_layer: bool,
    has_state: bool,
    epoch: &Option<String>,
) {
    let mut msg = msg.to_owned();
    if has_state {
        msg.push_str(" # buildkit");
    }
    img.history.push(image::History {
        created: epoch.clone(),
        created_by: msg,
        author: String::new(),
        comment: HISTORY_COMMENT.into(),
        empty_layer: !with_layer,
    });
}

fn default_shell(os: &str) -> Vec<String> {
    if os == "windows" {
        vec!["cmd".into(), "/S".into(), "/C".into()]
    } else {
        vec!["/bin/sh".into(), "-c".into()]
    }
}

fn with_shell(img: &Image, args: &[String]) -> Vec<String> {
    let mut shell = if img.config.shell.is_empty() {
        default_shell(&img.os)
    } else {
        img.config.shell.clone()
    };
    shell.push(args.join(" "));
    shell
}

fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim();
    let doc = doc.replace("\r\n", "\n");
    let mut lines = doc.split('\n');
    let mut summary = lines.next().unwrap_or("").to_owned();
    if lines.next().is_some() {
        summary.push_str("...");
    }
    summary
}

fn run_command_string(
    args: &[String],
    build_args: &[KeyValueOptional],
    env: &BTreeMap<String, String>,
) -> String {
    let mut parts: Vec<String> = build_args
        .iter()
        .map(|a| {
            let v = env.get(&a.key).cloned().unwrap_or_else(|| a.value_string());
            format!("{}={v}", a.key)
        })
        .collect();
    if !parts.is_empty() {
        parts.insert(0, format!("|{}", parts.len()));
    }
    parts.extend(args.iter().cloned());
    parts.join(" ")
}

/// `dfCmd`: the `com.docker.dockerfile.v1.command` description.
fn df_cmd(code: &str) -> Constraints {
    Constraints::new().description("com.docker.dockerfile.v1.command", code)
}

fn dispatch_onbuild_trigger(
    all: &mut DispatchStates,
    d: usize,
    trigger: &str,
    dopt: &DispatchOpt,
    labs: bool,
) -> Result<(), String> {
    let parsed = parser::parse(trigger).map_err(|e| e.to_string())?;
    if parsed.children.len() != 1 {
        return Err("onbuild trigger should be a single expression".into());
    }
    let cmd = instructions::parse_command(&parsed.children[0], ParseOptions { labs })
        .map_err(|e| e.to_string())?;
    // Stages a trigger names are not registered for this build (as in BuildKit).
    let mut scratch = DispatchStates {
        states: all.states.clone(),
        by_name: all.by_name.clone(),
    };
    let sources = command_sources(&cmd, &mut scratch).map_err(|e| e.to_string())?;
    let extra: Vec<DispatchState> = scratch.states.drain(all.states.len()..).collect();
    let base_len = all.states.len();
    all.states.extend(extra);
    let result = dispatch(all, d, cmd, &sources, dopt);
    all.states.truncate(base_len);
    result
}

fn expander<'a>(lex: &'a Lex, env: &'a Env) -> impl Fn(&str) -> Result<String, String> + 'a {
    move |word: &str| lex.process_word(word, env).map_err(|e| e.to_string())
}

fn expand_contents(contents: &mut [SourceContent], env: &Env) -> Result<(), String> {
    let mut lex = Lex::new('\\');
    lex.skip_process_quotes = true;
    for c in contents.iter_mut() {
        if c.expand {
            c.data = lex.process_word(&c.data, env).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn expand_sources(
    sd: &mut SourcesAndDest,
    expand: &impl Fn(&str) -> Result<String, String>,
) -> Result<(), String> {
    for p in sd.source_paths.iter_mut() {
        *p = expand(p)?;
    }
    sd.dest_path = expand(&sd.dest_path)?;
    Ok(())
}

/// Expands variables in a command, as BuildKit's `Expand`/`ExpandRaw` do before dispatch.
fn expand_command(cmd: &mut Command, env: &Env, lex: &Lex) -> Result<(), String> {
    let expand = expander(lex, env);
    match cmd {
        Command::Env { env: kvs, .. } | Command::Label { labels: kvs, .. } => {
            for kv in kvs.iter_mut() {
                kv.key = expand(&kv.key)?;
                kv.value = expand(&kv.value)?;
            }
        }
        Command::Add(a) => {
            a.chown = expand(&a.chown)?;
            a.checksum = expand(&a.checksum)?;
            expand_sources(&mut a.sources, &expand)?;
            expand_contents(&mut a.sources.source_contents, env)?;
        }
        Command::Copy(c) => {
            c.chown = expand(&c.chown)?;
            expand_sources(&mut c.sources, &expand)?;
            expand_contents(&mut c.sources.source_contents, env)?;
        }
        Command::Workdir { path, .. } => *path = expand(path)?,
        Command::User { user, .. } => *user = expand(user)?,
        Command::StopSignal { signal, .. } => *signal = expand(signal)?,
        Command::Volume { volumes, .. } => {
            for v in volumes.iter_mut() {
                *v = expand(v)?;
            }
        }
        Command::Arg { args, .. } => {
            for a in args.iter_mut() {
                a.key = expand(&a.key)?;
                if let Some(v) = &a.value {
                    a.value = Some(expand(v)?);
                }
            }
        }
        Command::Run(r) => {
            let mut mounts = Vec::new();
            for spec in &r.mount_specs {
                mounts.push(instructions::parse_mount(spec, Some(&expand))?);
            }
            r.mounts = mounts;
        }
        _ => {}
    }
    Ok(())
}

fn dispatch(
    all: &mut DispatchStates,
    di: usize,
    mut cmd: Command,
    sources: &[usize],
    dopt: &DispatchOpt,
) -> Result<(), String> {
    let env = shell::build_envs(&all.states[di].state.env());
    expand_command(&mut cmd, &env, &dopt.shlex)?;
    match cmd {
        Command::Maintainer { maintainer, .. } => {
            let d = &mut all.states[di];
            d.image.author.clone_from(&maintainer);
            commit_to_history(
                &mut d.image,
                &format!("MAINTAINER {maintainer}"),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::Env { env: kvs, .. } => {
            let d = &mut all.states[di];
            let mut msg = "ENV".to_owned();
            for kv in &kvs {
                msg.push(' ');
                msg.push_str(&kv.display());
                d.state = d.state.add_env(&kv.key, &kv.value);
                add_env(&mut d.image.config.env, &kv.key, &kv.value);
            }
            commit_to_history(&mut d.image, &msg, false, false, &dopt.epoch);
        }
        Command::Run(run) => {
            let source_states: Vec<State> = sources
                .iter()
                .map(|s| all.states[*s].state.clone())
                .collect();
            dispatch_run(&mut all.states[di], &run, &source_states, dopt)?;
        }
        Command::Workdir { code, path } => {
            dispatch_workdir(&mut all.states[di], &path, Some(&code), dopt)?;
        }
        Command::Add(add) => {
            if !add.checksum.is_empty() {
                reference::validate_digest(&add.checksum).map_err(|e| e.to_string())?;
            }
            let d = &mut all.states[di];
            dispatch_copy(
                d,
                CopyConfig::from_add(&add, dopt.build_context.clone()),
                dopt,
            )?;
            for src in &add.sources.source_paths {
                if !is_http_source(src) {
                    d.ctx_paths.insert(kiln_proto::paths::join(&["/", src]));
                }
            }
        }
        Command::Copy(copy) => {
            let source = match sources.first() {
                Some(s) => all.states[*s].state.clone(),
                None => dopt.build_context.clone(),
            };
            let d = &mut all.states[di];
            dispatch_copy(d, CopyConfig::from_copy(&copy, source), dopt)?;
            if sources.is_empty() {
                for src in &copy.sources.source_paths {
                    d.ctx_paths.insert(kiln_proto::paths::join(&["/", src]));
                }
            }
        }
        Command::Label { labels, .. } => {
            let d = &mut all.states[di];
            let mut msg = "LABEL".to_owned();
            for kv in &labels {
                d.image
                    .config
                    .labels
                    .insert(kv.key.clone(), kv.value.clone());
                msg.push(' ');
                msg.push_str(&kv.display());
            }
            commit_to_history(&mut d.image, &msg, false, false, &dopt.epoch);
        }
        Command::Onbuild { expression, .. } => {
            let d = &mut all.states[di];
            d.image
                .config
                .on_build
                .get_or_insert_with(Vec::new)
                .push(expression);
        }
        Command::Cmd { cmd, .. } => {
            let d = &mut all.states[di];
            let mut args = cmd.args();
            if cmd.prepend_shell {
                args = with_shell(&d.image, &args);
            }
            d.image.config.cmd.clone_from(&args);
            d.image.config.args_escaped = true;
            d.cmd_set = true;
            commit_to_history(
                &mut d.image,
                &format!("CMD {}", gocompat::quote_list(&args)),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::Entrypoint { cmd, .. } => {
            let d = &mut all.states[di];
            let mut args = cmd.args();
            if cmd.prepend_shell {
                args = with_shell(&d.image, &args);
            }
            d.image.config.entrypoint.clone_from(&args);
            if !d.cmd_set {
                d.image.config.cmd = Vec::new();
            }
            commit_to_history(
                &mut d.image,
                &format!("ENTRYPOINT {}", gocompat::quote_list(&args)),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::Healthcheck { health, .. } => {
            let d = &mut all.states[di];
            let h = image::HealthConfig {
                test: health.test.clone(),
                interval: health.interval,
                timeout: health.timeout,
                start_period: health.start_period,
                retries: health.retries,
            };
            let msg = format!(
                "HEALTHCHECK &{{{} {} {} {} {}}}",
                gocompat::quote_list(&h.test),
                gocompat::quote(&gocompat::format_duration(h.interval)),
                gocompat::quote(&gocompat::format_duration(h.timeout)),
                gocompat::quote(&gocompat::format_duration(h.start_period)),
                gocompat::quote_rune(h.retries)
            );
            d.image.config.healthcheck = Some(h);
            commit_to_history(&mut d.image, &msg, false, false, &dopt.epoch);
        }
        Command::Expose { ports, .. } => {
            let d = &mut all.states[di];
            let mut expanded = Vec::new();
            for p in &ports {
                expanded.extend(
                    dopt.shlex
                        .process_words(p, &env)
                        .map_err(|e| e.to_string())?,
                );
            }
            let set = parse_port_specs(&expanded)?;
            d.image.config.exposed_ports.extend(set.iter().cloned());
            let shown: Vec<String> = set.iter().map(|p| format!("{p}:{{}}")).collect();
            commit_to_history(
                &mut d.image,
                &format!("EXPOSE map[{}]", shown.join(" ")),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::User { user, .. } => dispatch_user(&mut all.states[di], &user, true, dopt),
        Command::Volume { volumes, .. } => {
            let d = &mut all.states[di];
            for v in &volumes {
                if v.is_empty() {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                d.image.config.volumes.insert(v.clone());
            }
            commit_to_history(
                &mut d.image,
                &format!("VOLUME {}", gocompat::plain_list(&volumes)),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::StopSignal { signal, .. } => {
            parse_signal(&signal)?;
            let d = &mut all.states[di];
            d.image.config.stop_signal.clone_from(&signal);
            commit_to_history(
                &mut d.image,
                &format!("STOPSIGNAL {signal}"),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::Shell { shell, .. } => {
            let d = &mut all.states[di];
            d.image.config.shell.clone_from(&shell);
            commit_to_history(
                &mut d.image,
                &format!("SHELL {}", gocompat::plain_list(&shell)),
                false,
                false,
                &dopt.epoch,
            );
        }
        Command::Arg { args, .. } => {
            dispatch_arg(&mut all.states[di], &args, dopt);
        }
    }
    Ok(())
}

fn dispatch_arg(d: &mut DispatchState, args: &[KeyValueOptional], dopt: &DispatchOpt) {
    let mut commit = Vec::new();
    for arg in args {
        let mut build_arg = set_kv_value(arg.clone(), dopt.build_arg_values);
        let mut s = arg.key.clone();
        if let Some(v) = &arg.value {
            s.push('=');
            s.push_str(v);
        }
        commit.push(s);
        if build_arg.value.is_none() {
            for ma in dopt.meta_args {
                if ma.key == build_arg.key {
                    build_arg.value.clone_from(&ma.value);
                }
            }
        }
        if let Some(v) = &build_arg.value
            && !NON_ENV_ARGS.contains(&build_arg.key.as_str())
        {
            d.state = d.state.add_env(&build_arg.key, v);
        }
        d.build_args.push(build_arg);
    }
    commit_to_history(
        &mut d.image,
        &format!("ARG {}", commit.join(" ")),
        false,
        false,
        &dopt.epoch,
    );
}

fn dispatch_user(d: &mut DispatchState, user: &str, commit: bool, dopt: &DispatchOpt) {
    d.state = d.state.user(user);
    user.clone_into(&mut d.image.config.user);
    if commit {
        commit_to_history(
            &mut d.image,
            &format!("USER {user}"),
            false,
            false,
            &dopt.epoch,
        );
    }
}

fn dispatch_workdir(
    d: &mut DispatchState,
    path: &str,
    commit: Option<&Code>,
    dopt: &DispatchOpt,
) -> Result<(), String> {
    d.state = d.state.dir(path);
    let mut wd = path.to_owned();
    if !kiln_proto::paths::is_abs(path) {
        wd = kiln_proto::paths::join(&["/", &d.image.config.working_dir, &wd]);
    }
    d.image.config.working_dir.clone_from(&wd);
    let Some(code) = commit else {
        return Ok(());
    };
    let mut with_layer = false;
    if wd != "/" {
        let chown =
            (!d.image.config.user.is_empty()).then(|| ChownOpt::with_user(&d.image.config.user));
        let platform = d
            .platform
            .clone()
            .unwrap_or_else(|| dopt.target_platform.clone());
        let env = d.state.env();
        let name = uppercase_cmd(&process_cmd_env(&dopt.shlex, &code.code, &env));
        let custom = prefix_command(d, &name, dopt.prefix_platform, Some(&platform), &env);
        d.state = d.state.file(
            vec![FileAction::Mkdir {
                path: wd.clone(),
                mode: 0o755,
                make_parents: true,
                chown,
                created_time: None,
            }],
            Constraints::new()
                .custom_name(&custom)
                .location(dopt.source_map, &code.location),
        );
        with_layer = true;
    }
    commit_to_history(
        &mut d.image,
        &format!("WORKDIR {wd}"),
        with_layer,
        false,
        &dopt.epoch,
    );
    Ok(())
}

fn dispatch_run(
    d: &mut DispatchState,
    c: &RunCommand,
    sources: &[State],
    dopt: &DispatchOpt,
) -> Result<(), String> {
    let mut customname = c.code.code.clone();
    let mut args = c.cmd.args();
    let mut extra_mounts: Vec<MountSpec> = Vec::new();
    if !c.cmd.files.is_empty() {
        if args.len() != 1 || !c.cmd.prepend_shell {
            return Err(format!(
                "parsing produced an invalid run command: {}",
                gocompat::plain_list(&args)
            ));
        }
        if parser::must_parse_heredoc(&args[0]).is_some() {
            let file = &c.cmd.files[0];
            let mut data = file.data.clone();
            if file.chomp {
                data = parser::chomp_heredoc_content(&data);
            }
            if d.image.os != "windows" && file.data.starts_with("#!") {
                // A single heredoc with a shebang runs as a file of its own.
                let st = State::scratch().dir("/").file(
                    vec![FileAction::Mkfile {
                        path: file.name.clone(),
                        mode: 0o755,
                        data: data.into_bytes(),
                        chown: None,
                        created_time: None,
                    }],
                    Constraints::new().custom_name("[internal] preparing inline document"),
                );
                extra_mounts.push(MountSpec {
                    readonly: true,
                    selector: "/".into(),
                    ..MountSpec::new("/dev/pipes/", &st)
                });
                args = vec![kiln_proto::paths::join(&["/dev/pipes/", &file.name])];
            } else {
                args = vec![data];
            }
            customname.push_str(&format!(" ({})", summarize_heredoc(&file.data)));
        } else {
            let mut full = args[0].clone();
            for file in &c.cmd.files {
                full.push('\n');
                full.push_str(&file.data);
                full.push_str(&file.name);
            }
            args = vec![full];
        }
    }
    if c.cmd.prepend_shell {
        args = with_shell(&d.image, &args);
    }
    let env = d.state.env();
    let mut constraints = df_cmd(&c.code.code).location(dopt.source_map, &c.code.location);
    if d.ignore_cache {
        constraints = constraints.ignore_cache();
    }
    let mut run = Run::new(d.state.args(args.clone()));
    run.mounts = extra_mounts;
    run.proxy_env.clone_from(&dopt.proxy_env);
    dispatch_run_mounts(d, c, sources, dopt, &mut run)?;
    if dopt.labs {
        let mode = match c.security.as_str() {
            "insecure" => pb::SecurityMode::Insecure,
            "sandbox" => pb::SecurityMode::Sandbox,
            other => {
                return Err(format!(
                    "unsupported security mode {}",
                    gocompat::quote(other)
                ));
            }
        };
        run.base = run.base.security(mode);
    }
    match c.network.as_str() {
        "default" => {}
        "none" => run.base = run.base.network(pb::NetMode::None),
        "host" => run.base = run.base.network(pb::NetMode::Host),
        other => {
            return Err(format!(
                "unsupported network mode {}",
                gocompat::quote(other)
            ));
        }
    }
    if dopt.supports(llb::caps::EXEC_META_ULIMIT) {
        for u in dopt.ulimits {
            run.base = run.base.add_ulimit(&u.name, u.soft, u.hard);
        }
    }
    let mut raw = dopt.shlex;
    raw.raw_quotes = true;
    raw.skip_unset_env = true;
    let platform = d.state.get_platform().cloned();
    let name = uppercase_cmd(&process_cmd_env(&raw, &customname, &env));
    let custom = prefix_command(d, &name, dopt.prefix_platform, platform.as_ref(), &env);
    constraints = constraints.custom_name(&custom);
    for (host, ip) in dopt.extra_hosts {
        run.base = run.base.add_extra_host(host, *ip);
    }
    if dopt.supports(llb::caps::EXEC_MOUNT_TMPFS_SIZE) && dopt.shm_size > 0 {
        run.mounts.push(MountSpec {
            tmpfs: Some(dopt.shm_size),
            ..MountSpec::new("/dev/shm", &State::scratch())
        });
    }
    if dopt.supports(llb::caps::EXEC_META_CGROUP_PARENT) && !dopt.cgroup_parent.is_empty() {
        run.base = run.base.cgroup_parent(dopt.cgroup_parent);
    }
    run.constraints = constraints;
    d.state = d.state.run(run);
    let msg = format!(
        "RUN {}",
        run_command_string(&args, &d.build_args, &shell::build_envs(&env))
    );
    commit_to_history(&mut d.image, &msg, true, true, &dopt.epoch);
    Ok(())
}

fn dispatch_run_mounts(
    d: &mut DispatchState,
    c: &RunCommand,
    sources: &[State],
    dopt: &DispatchOpt,
    run: &mut Run,
) -> Result<(), String> {
    for (i, mount) in c.mounts.iter().enumerate() {
        let mut mount = mount.clone();
        if mount.from.is_empty() && mount.mount_type == "cache" {
            mount.from = EMPTY_IMAGE_NAME.into();
        }
        let mut st = dopt.build_context.clone();
        if !mount.from.is_empty() {
            st = sources.get(i).cloned().unwrap_or_else(State::scratch);
        }
        let mut spec_tmpfs = None;
        if mount.mount_type == "tmpfs" {
            st = State::scratch();
            spec_tmpfs = Some(mount.size_limit);
        }
        if mount.mount_type == "secret" {
            run.secrets.push(dispatch_secret(&mount)?);
            continue;
        }
        if mount.mount_type == "ssh" {
            run.ssh.push(dispatch_ssh(&mount)?);
            continue;
        }
        let mut readonly = false;
        let mut no_output = false;
        if mount.read_only {
            readonly = true;
        } else if mount.mount_type == "bind"
            && dopt.supports(llb::caps::EXEC_MOUNT_BIND_READWRITE_NO_OUTPUT)
        {
            no_output = true;
        }
        let mut cache = None;
        if mount.mount_type == "cache" {
            let sharing = match mount.cache_sharing.as_str() {
                "private" => pb::CacheSharingOpt::Private,
                "locked" => pb::CacheSharingOpt::Locked,
                _ => pb::CacheSharingOpt::Shared,
            };
            if mount.cache_id.is_empty() {
                mount.cache_id = kiln_proto::paths::clean(&mount.target);
            }
            cache = Some((
                format!("{}/{}", dopt.cache_id_namespace, mount.cache_id),
                sharing,
            ));
        }
        let mut target = mount.target.clone();
        if !kiln_proto::paths::is_abs(&kiln_proto::paths::clean(&mount.target)) {
            target = kiln_proto::paths::join(&["/", d.state.get_dir(), &mount.target]);
        }
        if target == "/" {
            return Err(format!("invalid mount target {}", gocompat::quote(&target)));
        }
        let mut selector = String::new();
        let src = kiln_proto::paths::join(&["/", &mount.source]);
        if src != "/" {
            selector = src;
        } else if mount.uid.is_some() || mount.gid.is_some() || mount.mode.is_some() {
            st = st.file(
                vec![FileAction::Mkdir {
                    path: "/cache".into(),
                    mode: mount.mode.map_or(0o755, |m| m as u32),
                    make_parents: false,
                    chown: Some(ChownOpt::with_uid_gid(
                        mount.uid.unwrap_or(0) as i64,
                        mount.gid.unwrap_or(0) as i64,
                    )),
                    created_time: None,
                }],
                Constraints::new().custom_name("[internal] settings cache mount permissions"),
            );
            selector = "/cache".into();
        }
        run.mounts.push(MountSpec {
            readonly,
            no_output,
            cache,
            tmpfs: spec_tmpfs,
            selector,
            ..MountSpec::new(&target, &st)
        });
        if mount.from.is_empty() {
            d.ctx_paths
                .insert(kiln_proto::paths::join(&["/", &mount.source]));
        }
    }
    Ok(())
}

fn dispatch_secret(m: &instructions::Mount) -> Result<SecretInfo, String> {
    let mut id = m.cache_id.clone();
    if !m.source.is_empty() {
        id.clone_from(&m.source);
    }
    if id.is_empty() {
        if m.target.is_empty() {
            return Err("one of source, target required".into());
        }
        id = kiln_proto::paths::base(&m.target);
    }
    let target = if m.target.is_empty() {
        format!("/run/secrets/{}", kiln_proto::paths::base(&id))
    } else {
        m.target.clone()
    };
    let mut s = SecretInfo::new(&target);
    s.id = id;
    if !m.required {
        s.optional = true;
    }
    if m.uid.is_some() || m.gid.is_some() || m.mode.is_some() {
        s.uid = m.uid.unwrap_or(0) as i64;
        s.gid = m.gid.unwrap_or(0) as i64;
        s.mode = m.mode.map_or(0o400, |v| v as i64);
    }
    Ok(s)
}

fn dispatch_ssh(m: &instructions::Mount) -> Result<SshInfo, String> {
    if !m.source.is_empty() {
        return Err("ssh does not support source".into());
    }
    let mut s = SshInfo {
        id: m.cache_id.clone(),
        ..Default::default()
    };
    if !m.target.is_empty() {
        s.target.clone_from(&m.target);
    }
    if !m.required {
        s.optional = true;
    }
    if m.uid.is_some() || m.gid.is_some() || m.mode.is_some() {
        s.target.clone_from(&m.target);
        s.uid = m.uid.unwrap_or(0) as i64;
        s.gid = m.gid.unwrap_or(0) as i64;
        s.mode = m.mode.map_or(0o600, |v| v as i64);
    }
    Ok(s)
}

struct CopyConfig {
    params: SourcesAndDest,
    source: State,
    is_add: bool,
    code: Code,
    chown: String,
    chmod: String,
    link: bool,
    keep_git_dir: bool,
    checksum: String,
}

impl CopyConfig {
    fn from_add(c: &AddCommand, source: State) -> Self {
        CopyConfig {
            params: c.sources.clone(),
            source,
            is_add: true,
            code: c.code.clone(),
            chown: c.chown.clone(),
            chmod: c.chmod.clone(),
            link: c.link,
            keep_git_dir: c.keep_git_dir,
            checksum: c.checksum.clone(),
        }
    }

    fn from_copy(c: &CopyCommand, source: State) -> Self {
        CopyConfig {
            params: c.sources.clone(),
            source,
            is_add: false,
            code: c.code.clone(),
            chown: c.chown.clone(),
            chmod: c.chmod.clone(),
            link: c.link,
            keep_git_dir: false,
            checksum: String::new(),
        }
    }
}

fn is_http_source(src: &str) -> bool {
    src.starts_with("http://") || src.starts_with("https://")
}

/// A parsed git reference (`gitutil.ParseGitRef`).
struct GitRef {
    remote: String,
    commit: String,
    sub_dir: String,
}

fn parse_git_ref(r: &str) -> Option<GitRef> {
    if r.starts_with("github.com/") {
        // Deprecated form that cannot be told apart from a local path.
        return None;
    }
    let (_, proto) = llb::parse_git_protocol(r);
    match proto {
        llb::GitProtocol::Unknown => return None,
        llb::GitProtocol::Http | llb::GitProtocol::Https => {
            // `\.git(?:#.+)?$`
            let (path, fragment) = match r.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (r, None),
            };
            let ok = match fragment {
                None => path.ends_with(".git"),
                Some(f) => path.ends_with(".git") && !f.is_empty() && !f.contains('\n'),
            };
            if !ok {
                return None;
            }
        }
        _ => {}
    }
    let (remote, fragment) = r.split_once('#').unwrap_or((r, ""));
    if remote.is_empty() {
        return None;
    }
    let (commit, sub_dir) = fragment.split_once(':').unwrap_or((fragment, ""));
    Some(GitRef {
        remote: remote.to_owned(),
        commit: commit.to_owned(),
        sub_dir: sub_dir.to_owned(),
    })
}

/// The last path element of an http(s) URL (`__unnamed__` if it has none).
fn http_filename(src: &str) -> String {
    let unnamed = || "__unnamed__".to_owned();
    let Some((_, rest)) = src.split_once("://") else {
        return unnamed();
    };
    let rest = rest.split('#').next().unwrap_or("");
    let rest = rest.split('?').next().unwrap_or("");
    let path = match rest.find('/') {
        Some(i) => &rest[i..],
        None => "",
    };
    let Some(decoded) = percent_decode(path) else {
        return unnamed();
    };
    let base = kiln_proto::paths::base(&decoded);
    if base == "." || base == "/" {
        unnamed()
    } else {
        base
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn dispatch_copy(d: &mut DispatchState, cfg: CopyConfig, dopt: &DispatchOpt) -> Result<(), String> {
    let dest_path = &cfg.params.dest_path;
    let pp = if kiln_proto::paths::is_abs(dest_path) {
        dest_path.clone()
    } else {
        kiln_proto::paths::join(&[d.state.get_dir(), dest_path])
    };
    let mut dest = kiln_proto::paths::join(&["/", &pp]);
    if dest_path == "." || dest_path.is_empty() || dest_path.ends_with('/') {
        dest.push('/');
    }
    let chown = (!cfg.chown.is_empty()).then(|| ChownOpt::with_user(&cfg.chown));
    let mode = if cfg.chmod.is_empty() {
        None
    } else {
        gocompat::parse_uint(&cfg.chmod, 8, 32)
            .ok()
            .map(|m| m as u32)
    };
    if !cfg.checksum.is_empty() {
        if !cfg.is_add {
            return Err("checksum can't be specified for COPY".into());
        }
        if !dopt.labs {
            return Err("instruction 'ADD --checksum=<CHECKSUM>' requires the labs channel".into());
        }
        if cfg.params.source_paths.len() != 1 {
            return Err("checksum can't be specified for multiple sources".into());
        }
        if !is_http_source(&cfg.params.source_paths[0]) {
            return Err("checksum can't be specified for non-HTTP sources".into());
        }
    }
    let mut msg = if cfg.is_add { "ADD" } else { "COPY" }.to_owned();
    let mut actions = Vec::new();
    let plain = |mode: Option<u32>| CopyInfo {
        mode,
        create_dest_path: true,
        chown: chown.clone(),
        ..Default::default()
    };
    for src in &cfg.params.source_paths {
        msg.push(' ');
        msg.push_str(src);
        if let Some(git_ref) = parse_git_ref(src) {
            if !cfg.is_add {
                return Err("source can't be a git ref for COPY".into());
            }
            if !dopt.labs {
                return Err("instruction ADD <git ref> requires the labs channel".into());
            }
            let mut commit = git_ref.commit.clone();
            if !git_ref.sub_dir.is_empty() {
                commit.push(':');
                commit.push_str(&git_ref.sub_dir);
            }
            let st = llb::git(
                &git_ref.remote,
                &commit,
                &llb::GitOptions {
                    keep_git_dir: cfg.keep_git_dir,
                    ..Default::default()
                },
                Constraints::new(),
            );
            actions.push(FileAction::Copy {
                source: st,
                src: "/".into(),
                dest: dest.clone(),
                info: plain(mode),
            });
        } else if is_http_source(src) {
            if !cfg.is_add {
                return Err("source can't be a URL for COPY".into());
            }
            let f = http_filename(src);
            let st = llb::http(
                src,
                &llb::HttpOptions {
                    checksum: cfg.checksum.clone(),
                    filename: f.clone(),
                    ..Default::default()
                },
                df_cmd(""),
            );
            actions.push(FileAction::Copy {
                source: st,
                src: f,
                dest: dest.clone(),
                info: plain(mode),
            });
        } else {
            actions.push(FileAction::Copy {
                source: cfg.source.clone(),
                src: kiln_proto::paths::join(&["/", src]),
                dest: dest.clone(),
                info: CopyInfo {
                    mode,
                    follow_symlinks: true,
                    copy_dir_contents_only: true,
                    attempt_unpack: cfg.is_add,
                    create_dest_path: true,
                    allow_wildcard: true,
                    allow_empty_wildcard: true,
                    chown: chown.clone(),
                    ..Default::default()
                },
            });
        }
    }
    for content in &cfg.params.source_contents {
        msg.push_str(" <<");
        msg.push_str(&content.path);
        let st = State::scratch().file(
            vec![FileAction::Mkfile {
                path: content.path.clone(),
                mode: 0o664,
                data: content.data.clone().into_bytes(),
                chown: None,
                created_time: None,
            }],
            Constraints::new().custom_name("[internal] preparing inline document"),
        );
        actions.push(FileAction::Copy {
            source: st,
            src: content.path.clone(),
            dest: dest.clone(),
            info: plain(mode),
        });
    }
    msg.push(' ');
    msg.push_str(dest_path);

    let platform = d
        .platform
        .clone()
        .unwrap_or_else(|| dopt.target_platform.clone());
    let env = d.state.env();
    let name = uppercase_cmd(&process_cmd_env(&dopt.shlex, &cfg.code.code, &env));
    let custom = prefix_command(d, &name, dopt.prefix_platform, Some(&platform), &env);
    if dopt.supports(llb::caps::MERGE_OP) && cfg.link && cfg.chmod.is_empty() {
        // BuildKit builds the copy's option list from an empty copy of the file-op options,
        // so the copy carries only the weak progress group and the merge the name.
        let pg_id = new_id();
        d.cmd_index -= 1;
        let pg_name = prefix_command(d, &name, dopt.prefix_platform, Some(&platform), &env);
        let copy = State::scratch().file(
            actions,
            Constraints::new().progress_group(&pg_id, &pg_name, true),
        );
        d.cmd_index -= 1;
        let link_name = prefix_command(
            d,
            &format!("LINK {name}"),
            dopt.prefix_platform,
            Some(&platform),
            &env,
        );
        let merged = llb::merge(
            vec![d.state.clone(), copy],
            Constraints::new()
                .progress_group(&pg_id, &pg_name, false)
                .custom_name(&link_name),
        );
        d.state = d.state.with_output(merged.output().cloned());
    } else {
        let mut c = Constraints::new()
            .custom_name(&custom)
            .location(dopt.source_map, &cfg.code.location);
        if d.ignore_cache {
            c = c.ignore_cache();
        }
        d.state = d.state.file(actions, c);
    }
    commit_to_history(&mut d.image, &msg, true, true, &dopt.epoch);
    Ok(())
}

/// `moby/sys/signal.ParseSignal` (Linux names and numbers).
fn parse_signal(raw: &str) -> Result<i64, String> {
    if let Some(n) = gocompat::atoi(raw) {
        if n == 0 {
            return Err(format!("invalid signal: {raw}"));
        }
        return Ok(n);
    }
    let upper = raw.to_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "ABRT" | "IOT" => 6,
        "ALRM" => 14,
        "BUS" => 7,
        "CHLD" | "CLD" => 17,
        "CONT" => 18,
        "FPE" => 8,
        "HUP" => 1,
        "ILL" => 4,
        "INT" => 2,
        "IO" | "POLL" => 29,
        "KILL" => 9,
        "PIPE" => 13,
        "PROF" => 27,
        "PWR" => 30,
        "QUIT" => 3,
        "SEGV" => 11,
        "STKFLT" => 16,
        "STOP" => 19,
        "SYS" => 31,
        "TERM" => 15,
        "TRAP" => 5,
        "TSTP" => 20,
        "TTIN" => 21,
        "TTOU" => 22,
        "URG" => 23,
        "USR1" => 10,
        "USR2" => 12,
        "VTALRM" => 26,
        "WINCH" => 28,
        "XCPU" => 24,
        "XFSZ" => 25,
        "RTMIN" => 34,
        "RTMAX" => 64,
        other => {
            let rt = other
                .strip_prefix("RTMIN+")
                .and_then(|n| n.parse::<i64>().ok())
                .filter(|n| (1..=15).contains(n))
                .map(|n| 34 + n)
                .or_else(|| {
                    other
                        .strip_prefix("RTMAX-")
                        .and_then(|n| n.parse::<i64>().ok())
                        .filter(|n| (1..=14).contains(n))
                        .map(|n| 64 - n)
                });
            match rt {
                Some(n) if !other.contains("+0") && !other.contains("-0") => n,
                _ => return Err(format!("invalid signal: {raw}")),
            }
        }
    };
    Ok(n)
}

/// `nat.ParsePortSpecs`: the exposed ports (`80/tcp`, `8000-8001/udp` expanded).
fn parse_port_specs(ports: &[String]) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for raw in ports {
        let parts: Vec<&str> = raw.split(':').collect();
        let n = parts.len();
        let container_port = parts[n - 1];
        let (raw_ip, host_port) = match n {
            1 => (String::new(), ""),
            2 => (String::new(), parts[0]),
            3 => (parts[0].to_owned(), parts[1]),
            _ => (parts[..n - 2].join(":"), parts[n - 2]),
        };
        let (proto, container_port) = split_proto_port(container_port);
        let ip = raw_ip.trim_start_matches('[').trim_end_matches(']');
        if !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return Err(format!("Invalid ip address: {ip}"));
        }
        if container_port.is_empty() {
            return Err(format!("No port specified: {raw}<empty>"));
        }
        let (start, end) = parse_port_range(&container_port)
            .map_err(|_| format!("Invalid containerPort: {container_port}"))?;
        let (hstart, hend) = if host_port.is_empty() {
            (0, 0)
        } else {
            parse_port_range(host_port).map_err(|_| format!("Invalid hostPort: {host_port}"))?
        };
        if !host_port.is_empty() && (end - start) != (hend - hstart) && end != start {
            return Err(format!(
                "Invalid ranges specified for container and host Ports: {container_port} and {host_port}"
            ));
        }
        let proto = proto.to_lowercase();
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
            return Err(format!("Invalid proto: {proto}"));
        }
        for port in start..=end {
            out.insert(format!("{port}/{proto}"));
        }
    }
    Ok(out)
}

fn split_proto_port(raw: &str) -> (String, String) {
    let parts: Vec<&str> = raw.split('/').collect();
    if raw.is_empty() || parts[0].is_empty() {
        return (String::new(), String::new());
    }
    if parts.len() == 1 || parts[1].is_empty() {
        return ("tcp".into(), parts[0].into());
    }
    (parts[1].into(), parts[0].into())
}

fn parse_port_range(ports: &str) -> Result<(u64, u64), String> {
    if ports.is_empty() {
        return Err("Empty string specified for ports.".into());
    }
    let parse = |s: &str| gocompat::parse_uint(s, 10, 16).map_err(|e| e.to_string());
    match ports.split_once('-') {
        None => {
            let p = parse(ports)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let b = b.split('-').next().unwrap_or(b);
            let (start, end) = (parse(a)?, parse(b)?);
            if end < start {
                return Err(format!("Invalid range specified for the Port: {ports}"));
            }
            Ok((start, end))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn platforms_parse_like_containerd() {
        let p = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!(
            (p.architecture.as_str(), p.variant.as_str()),
            ("arm64", "v8")
        );
        let p = parse_platform("linux/arm").unwrap();
        assert_eq!((p.architecture.as_str(), p.variant.as_str()), ("arm", ""));
        let p = parse_platform("Linux/x86_64").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));
        let p = parse_platform("arm64").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm64"));
        assert_eq!(parse_platform("linux").unwrap().os, "linux");
        assert_eq!(
            parse_platform("foo").unwrap_err(),
            "\"foo\": unknown operating system or architecture: invalid argument"
        );
        assert!(
            parse_platform("linux/a!")
                .unwrap_err()
                .contains("invalid component")
        );
        assert!(
            parse_platform("a/b/c/d")
                .unwrap_err()
                .contains("cannot parse")
        );
    }

    #[test]
    fn ports_and_signals() {
        let ports = parse_port_specs(&["80".into(), "53/udp".into(), "8000-8001/tcp".into()]);
        assert_eq!(
            ports.unwrap().into_iter().collect::<Vec<_>>(),
            vec!["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]
        );
        assert_eq!(
            parse_port_specs(&["80/xyz".into()]).unwrap_err(),
            "Invalid proto: xyz"
        );
        assert_eq!(
            parse_port_specs(&["abc".into()]).unwrap_err(),
            "Invalid containerPort: abc"
        );
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("kill").unwrap(), 9);
        assert_eq!(parse_signal("RTMIN+3").unwrap(), 37);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("0").unwrap_err(), "invalid signal: 0");
        assert_eq!(
            parse_signal("SIGFOO").unwrap_err(),
            "invalid signal: SIGFOO"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(uppercase_cmd("run echo hi"), "RUN echo hi");
        assert_eq!(summarize_heredoc("\n a\nb\n"), "a...");
        assert_eq!(summarize_heredoc("one\n"), "one");
        assert_eq!(http_filename("https://x.org/a/b.tar.gz?x=1"), "b.tar.gz");
        assert_eq!(http_filename("https://x.org"), "__unnamed__");
        assert_eq!(http_filename("https://x.org/a%20b"), "a b");
        assert_eq!(http_filename("https://x.org/%zz"), "__unnamed__");
        assert!(parse_git_ref("https://github.com/a/b.git#main:dir").is_some());
        assert!(parse_git_ref("https://example.com/file.tar").is_none());
        assert!(parse_git_ref("git@github.com:a/b.git").is_some());
        assert!(parse_git_ref("github.com/a/b").is_none());
        assert!(parse_git_ref("a.txt").is_none());
        let g = parse_git_ref("git://h/r.git#v1:sub").unwrap();
        assert_eq!(
            (g.remote.as_str(), g.commit.as_str(), g.sub_dir.as_str()),
            ("git://h/r.git", "v1", "sub")
        );
        assert_eq!(
            run_command_string(
                &["/bin/sh".into(), "-c".into(), "x".into()],
                &[KeyValueOptional {
                    key: "A".into(),
                    value: None,
                    comment: String::new()
                }],
                &BTreeMap::new()
            ),
            "|1 A= /bin/sh -c x"
        );
        assert_eq!(new_id().len(), 25);
        assert!(is_builtin_syntax("docker/dockerfile:1.5"));
        assert!(is_builtin_syntax("docker.io/docker/dockerfile:1"));
        assert!(!is_builtin_syntax("docker/dockerfile:1.6-labs"));
        assert!(!is_builtin_syntax("example.com/frontend"));
    }
}
