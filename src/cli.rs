//! Command-line syntax. Flags mirror buildctl and runc where those exist.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Rootless executor for BuildKit LLB build steps"
)]
pub struct Cli {
    /// State directory (snapshots, cache, metadata).
    #[arg(long, global = true, env = "KILN_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Configuration file (registry hosts, network stack); default `<root>/kiln.toml`, if
    /// it exists.
    #[arg(long, global = true, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log what kiln decides and why.
    #[arg(long, global = true)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a BuildKit Definition (marshaled pb.Definition on standard input or FILE),
    /// as `buildctl build` does; or a Dockerfile: `--frontend dockerfile.v0 --local
    /// context=DIR --local dockerfile=DIR`, or a context directory as `docker build DIR`.
    Build(BuildArgs),
    /// Remove build results and cache directories no build is using.
    Prune(PruneArgs),
    /// Show disk usage of build results and cache directories.
    Du(DuArgs),
    /// Run one command in a rootfs directory, in fresh namespaces, as a build step would.
    /// The exit status is the command's (128+N when signal N ended it).
    Run(RunArgs),
    /// Print the OCI runtime spec (config.json) `kiln run` would use with these flags.
    Spec(SpecArgs),
    /// Inspection tools for LLB definitions.
    #[command(subcommand)]
    Debug(DebugCommand),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Definition file (standard input when absent), or a build context directory holding
    /// a Dockerfile (docker's `docker build DIR`).
    pub file: Option<PathBuf>,
    /// Frontend to run instead of reading a Definition: dockerfile.v0 (with --local
    /// context=DIR and --local dockerfile=DIR).
    #[arg(long, value_name = "NAME")]
    pub frontend: Option<String>,
    /// Frontend option `KEY=VALUE` (filename, target, build-arg:NAME, label:NAME,
    /// platform, …); repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub opt: Vec<String>,
    /// Name of the Dockerfile in the context directory (docker's `-f`).
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    pub dockerfile: Option<PathBuf>,
    /// The Dockerfile stage to build (default: the last).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// `NAME=VALUE` for a Dockerfile ARG; repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_arg: Vec<String>,
    /// `NAME=VALUE` label for the image config; repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub label: Vec<String>,
    /// `type=local,dest=DIR`, `type=tar,dest=FILE` (`-` for stdout),
    /// `type=oci|docker,dest=FILE[,name=REF]` or `type=image,name=REF[,push=true]` (image
    /// types also take `compression=gzip|zstd|uncompressed` and `oci-mediatypes=BOOL`);
    /// repeatable.
    #[arg(long, short = 'o', value_name = "SPEC")]
    pub output: Vec<String>,
    /// Write what the exports tell (`containerimage.digest`, `image.name`, …) to FILE as
    /// JSON, as buildctl does, and under `kiln.steps` what each step that ran used (CPU,
    /// peak memory, I/O, wall time), keyed by vertex digest.
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// Progress output: auto, plain, tty or rawjson.
    #[arg(long, default_value = "auto", value_parser = ["auto", "plain", "tty", "rawjson"])]
    pub progress: String,
    /// `id=ID,src=FILE` (or `env=VAR`): a secret for secret mounts and env; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub secret: Vec<String>,
    /// `ID[=SOCKET]` (e.g. `default`): an SSH agent for SSH mounts; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub ssh: Vec<String>,
    /// Grant an entitlement: network.host or security.insecure; repeatable.
    #[arg(long, value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,
    /// Ignore cached results (everything runs; results are still saved).
    #[arg(long)]
    pub no_cache: bool,
    /// `NAME=DIR`: the directory for `local://NAME` sources; repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub local: Vec<String>,
    /// `NAME=DIR`: the OCI layout for `oci-layout://` sources of store NAME; repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub oci_layout: Vec<String>,
    /// `type=local,dest=DIR[,mode=min|max][,tag=T]`, `type=registry,ref=REF[,mode=min|max]`
    /// or `type=inline` (in the exported image's config): write the build cache in
    /// BuildKit's format; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub export_cache: Vec<String>,
    /// `type=local,src=DIR[,tag=T]` or `type=registry,ref=REF` (a cache, or an image with
    /// an inline cache): use a cache BuildKit or kiln exported; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub import_cache: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove everything not in use, including downloaded image blobs.
    #[arg(long)]
    pub all: bool,
    /// Keep what was used more recently than this (e.g. 48h, 30m).
    #[arg(long, value_name = "DURATION")]
    pub keep_duration: Option<String>,
}

#[derive(Debug, Args)]
pub struct DuArgs {
    /// Show every field of every record.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// The step `kiln run` and `kiln spec` describe.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Root filesystem directory of the step.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub rootfs: PathBuf,
    /// Mount the rootfs read-only.
    #[arg(long)]
    pub readonly: bool,
    /// User to run as: name, uid, uid:gid or name:group, resolved in the rootfs.
    #[arg(long, value_name = "U", default_value = "")]
    pub user: String,
    /// Working directory (created if missing, owned by the user).
    #[arg(long, value_name = "D", default_value = "/")]
    pub cwd: String,
    /// Environment entry; repeatable. PATH defaults to the usual system path.
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// Hostname (default buildkitsandbox).
    #[arg(long, value_name = "H", default_value = "")]
    pub hostname: String,
    /// Network: sandbox (a namespace of the step's own with egress through a user-space
    /// stack, host loopback out of reach), none (only loopback) or host (kiln's own).
    #[arg(long, value_parser = ["sandbox", "none", "host"], default_value = "sandbox")]
    pub network: String,
    /// Security mode: sandbox (default capabilities, masks, seccomp) or insecure.
    #[arg(long, value_parser = ["sandbox", "insecure"], default_value = "sandbox")]
    pub security: String,
    /// `type=bind,source=HOSTPATH,target=PATH[,readonly]` or
    /// `type=tmpfs,target=PATH[,size=BYTES]`; repeatable.
    #[arg(long, value_name = "SPEC")]
    pub mount: Vec<String>,
    /// Most processes the step may have at once (pids.max); 0 or -1: no limit. Default:
    /// `[limits] pids` of kiln.toml, else 4096.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub pids_limit: Option<i64>,
    /// Memory the step may use (`512m`, `2g`, `50%` of the host's; 0: no limit). Default:
    /// `[limits] memory` of kiln.toml, else half the host's memory.
    #[arg(long, short = 'm', value_name = "SIZE")]
    pub memory: Option<String>,
    /// Parent cgroup of the step's cgroup (`/<parent>/buildkit/<id>`, as BuildKit's
    /// `cgroupParent`; `slice:` for the systemd form).
    #[arg(long, value_name = "PATH", default_value = "")]
    pub cgroup_parent: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub step: StepArgs,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Directory for the generated hosts and resolv.conf the spec refers to (created).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    #[command(flatten)]
    pub step: StepArgs,
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Print each op of a Definition, one JSON object per line (or a Graphviz graph).
    DumpLlb(DumpLlbArgs),
    /// Print each op's CacheMap as BuildKit v0.11.6 computes it, one JSON object per line,
    /// or (with --diff) which CacheMap fields changed between two Definitions.
    Cachemap(CachemapArgs),
    /// Convert a Dockerfile (standard input) into the Definition BuildKit's frontend makes
    /// of it (standard output), as BuildKit's dockerfile2llb example does.
    Dockerfile2llb(Dockerfile2llbArgs),
}

#[derive(Debug, Args)]
pub struct Dockerfile2llbArgs {
    /// The stage to build (default: the last).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// `NAME=VALUE` for a Dockerfile ARG; repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_arg: Vec<String>,
    /// `NAME=VALUE` label for the image config; repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub label: Vec<String>,
    /// Also write the image config (JSON) the frontend computes to FILE.
    #[arg(long, value_name = "FILE")]
    pub image_config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DumpLlbArgs {
    /// Definition file (marshaled pb.Definition); standard input when absent.
    pub file: Option<PathBuf>,
    /// Print a Graphviz graph instead of JSON lines.
    #[arg(long)]
    pub dot: bool,
}

#[derive(Debug, Args)]
pub struct CachemapArgs {
    /// Definition file (marshaled pb.Definition); standard input when absent.
    #[arg(conflicts_with = "diff")]
    pub file: Option<PathBuf>,
    /// Add the exact bytes that were hashed (`json`) to each CacheMap.
    #[arg(long)]
    pub explain: bool,
    /// Compare two Definitions: for each changed vertex, the CacheMap fields that differ.
    #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
    pub diff: Option<Vec<PathBuf>>,
    /// Session id for `local://` sources without `local.session` (their digests are
    /// `random:` and only comparable within one session).
    #[arg(long, value_name = "ID", default_value = kiln_solver::cachemap::source::PLACEHOLDER_SESSION)]
    pub session: String,
}

/// Parses the command line. Usage errors follow kiln's error contract (one line
/// `error: …`, exit status 1); `--help` and `--version` print as usual.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", message.join(" "));
            std::process::exit(1);
        }
    }
}

impl Cli {
    /// `--root`, else `/var/lib/kiln` as root, else `$XDG_DATA_HOME/kiln` or
    /// `~/.local/share/kiln`; always absolute, because the step's mount namespace and the
    /// runner resolve it from a different working directory than the caller's.
    pub fn root_dir(&self) -> PathBuf {
        let root = self.root_dir_as_given();
        std::path::absolute(&root).unwrap_or(root)
    }

    fn root_dir_as_given(&self) -> PathBuf {
        if let Some(root) = &self.root {
            return root.clone();
        }
        if nix::unistd::Uid::effective().is_root() {
            return PathBuf::from("/var/lib/kiln");
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(data).join("kiln");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        home.join(".local/share/kiln")
    }
}
