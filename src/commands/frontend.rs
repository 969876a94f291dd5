//! The Dockerfile frontend in `kiln build`, as buildctl and docker call it: which flags make
//! a Dockerfile build (`--frontend dockerfile.v0` with `--local context=DIR --local
//! dockerfile=DIR` and `--opt`s, or a context directory with docker's `-f`, `--target`,
//! `--build-arg`, `--label`), reading the Dockerfile and `.dockerignore` as BuildKit's
//! builder does, and base images resolved through the registry code for the conversion.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use async_trait::async_trait;
use kiln_dockerfile::{
    ConvertOptions, Converted, ImageMetaResolver, ResolveImageConfigOptions, ResolvedImageConfig,
};
use kiln_proto::pb;
use kiln_registry::{ImageResolver, ImageSource};

use crate::cli::BuildArgs;

/// The name buildctl gives the built-in Dockerfile frontend.
pub const DOCKERFILE_FRONTEND: &str = "dockerfile.v0";
/// The `--local` names the Dockerfile frontend reads.
pub const CONTEXT: &str = "context";
pub const DOCKERFILE_DIR: &str = "dockerfile";

/// A Dockerfile build: the file, its ignore patterns and the frontend's options.
#[derive(Debug)]
pub struct DockerfileRequest {
    pub dockerfile: Vec<u8>,
    pub dockerignore: Option<Vec<u8>>,
    /// buildctl's `--opt`s (`filename`, `target`, `build-arg:K`, `label:K`, `platform`, …).
    pub opts: BTreeMap<String, String>,
}

fn key_value<'a>(flag: &str, spec: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    spec.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .with_context(|| format!("{flag} {spec}: expected KEY=VALUE"))
}

/// Whether `args` ask for a Dockerfile build, and where its directories are: `(context,
/// dockerfile dir)`. A directory as the positional argument is docker's habit
/// (`kiln build DIR`): it is both.
pub fn dockerfile_dirs(
    args: &BuildArgs,
    locals: &HashMap<String, PathBuf>,
) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    let docker_habit = args.file.as_deref().filter(|p| p.is_dir());
    match (args.frontend.as_deref(), docker_habit) {
        (Some(DOCKERFILE_FRONTEND), Some(dir)) => {
            bail!(
                "--frontend {DOCKERFILE_FRONTEND} reads --local context=DIR and --local \
                 dockerfile=DIR, not a directory argument ({})",
                dir.display()
            )
        }
        (Some(DOCKERFILE_FRONTEND), None) => {
            if args.file.is_some() {
                bail!("--frontend {DOCKERFILE_FRONTEND} builds no Definition file");
            }
            let dir = |name: &str| {
                locals.get(name).cloned().with_context(|| {
                    format!("--frontend {DOCKERFILE_FRONTEND} needs --local {name}=DIR")
                })
            };
            Ok(Some((dir(CONTEXT)?, dir(DOCKERFILE_DIR)?)))
        }
        (Some(other), _) => {
            bail!("--frontend {other}: unsupported frontend (kiln has {DOCKERFILE_FRONTEND})")
        }
        (None, Some(dir)) => {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("build context {}", dir.display()))?;
            Ok(Some((dir.clone(), dir)))
        }
        (None, None) => {
            let docker_flags = [
                (!args.opt.is_empty(), "--opt"),
                (args.dockerfile.is_some(), "--file"),
                (args.target.is_some(), "--target"),
                (!args.build_arg.is_empty(), "--build-arg"),
                (!args.label.is_empty(), "--label"),
            ];
            if let Some((_, flag)) = docker_flags.iter().find(|(given, _)| *given) {
                bail!(
                    "{flag} is for Dockerfile builds: give a context directory or \
                     --frontend {DOCKERFILE_FRONTEND}"
                );
            }
            Ok(None)
        }
    }
}

/// The frontend options of `args`: `--opt`s, then docker's spellings of the same.
pub fn frontend_opts(args: &BuildArgs) -> anyhow::Result<BTreeMap<String, String>> {
    let mut opts = BTreeMap::new();
    for spec in &args.opt {
        let (k, v) = key_value("--opt", spec)?;
        opts.insert(k.to_owned(), v.to_owned());
    }
    if let Some(file) = &args.dockerfile {
        opts.insert("filename".to_owned(), file.to_string_lossy().into_owned());
    }
    add_docker_opts(
        &mut opts,
        args.target.as_deref(),
        &args.build_arg,
        &args.label,
    )?;
    Ok(opts)
}

/// docker's `--target`, `--build-arg` and `--label` as frontend options.
pub fn add_docker_opts(
    opts: &mut BTreeMap<String, String>,
    target: Option<&str>,
    build_args: &[String],
    labels: &[String],
) -> anyhow::Result<()> {
    if let Some(target) = target {
        opts.insert("target".to_owned(), target.to_owned());
    }
    for spec in build_args {
        // docker takes `--build-arg K` (the value from the environment) as well.
        let (k, v) = match spec.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match std::env::var(spec) {
                Ok(v) => (spec.clone(), v),
                Err(_) => continue,
            },
        };
        opts.insert(format!("build-arg:{k}"), v);
    }
    for spec in labels {
        let (k, v) = key_value("--label", spec)?;
        opts.insert(format!("label:{k}"), v.to_owned());
    }
    Ok(())
}

/// Reads the Dockerfile (`filename`, default `Dockerfile`, in the dockerfile directory)
/// and the ignore file BuildKit's builder reads: `<filename>.dockerignore` beside it, else
/// the context's `.dockerignore`.
pub fn read_dockerfile(
    context: &Path,
    dockerfile_dir: &Path,
    opts: BTreeMap<String, String>,
) -> anyhow::Result<DockerfileRequest> {
    let name = opts
        .get("filename")
        .filter(|f| !f.is_empty())
        .cloned()
        .unwrap_or_else(|| "Dockerfile".to_owned());
    // A relative name is below the dockerfile directory; docker also takes a path there.
    let path = dockerfile_dir.join(&name);
    let dockerfile = std::fs::read(&path)
        .with_context(|| format!("failed to read dockerfile {}", path.display()))?;
    let beside = dockerfile_dir.join(format!("{name}.dockerignore"));
    let dockerignore = match std::fs::read(&beside) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::read(context.join(".dockerignore")) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).context("reading .dockerignore"),
            }
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", beside.display())),
    };
    Ok(DockerfileRequest {
        dockerfile,
        dockerignore,
        opts,
    })
}

/// Converts a Dockerfile with the options buildctl would send: one target platform, the
/// build's session for the context, base images through `resolver`. Warnings go to
/// standard error as buildctl prints them.
pub async fn convert(
    request: &DockerfileRequest,
    session_id: &str,
    resolver: &dyn ImageMetaResolver,
) -> anyhow::Result<Converted> {
    let base = ConvertOptions {
        session_id: session_id.to_owned(),
        dockerignore: request.dockerignore.clone(),
        ..ConvertOptions::default()
    };
    let mut options = kiln_dockerfile::opts::from_frontend_opts(&request.opts, &base)
        .context("failed to solve")?;
    if options.len() != 1 {
        bail!("failed to solve: building several platforms at once is not supported");
    }
    let options = options.remove(0);
    let converted = kiln_dockerfile::dockerfile_to_llb(&request.dockerfile, &options, resolver)
        .await
        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
    for w in &converted.warnings {
        match w.line {
            Some(line) => eprintln!("WARNING: {} (line {line})", w.short),
            None => eprintln!("WARNING: {}", w.short),
        }
    }
    Ok(converted)
}

/// Base-image lookups of the frontend through kiln's registry code (the same content
/// store, `kiln.toml` hosts and credentials as the build's image sources).
#[derive(Debug)]
pub struct RegistryMetaResolver<'a> {
    pub images: &'a ImageResolver,
}

#[async_trait]
impl ImageMetaResolver for RegistryMetaResolver<'_> {
    async fn resolve_image_config(
        &self,
        reference: &str,
        opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String> {
        let op = pb::SourceOp {
            identifier: format!("docker-image://{reference}"),
            attrs: [(
                "image.resolvemode".to_owned(),
                opts.resolve_mode.as_str().to_owned(),
            )]
            .into(),
        };
        let source = ImageSource::from_op(&op).map_err(|e| e.to_string())?;
        let image = self
            .images
            .resolve(&source, &opts.platform)
            .await
            .map_err(|e| {
                // The frontend names the image itself (`<image>: <reason>`, as BuildKit).
                let message = e.to_string();
                [format!("{source}: "), format!("{reference}: ")]
                    .iter()
                    .find_map(|named| message.strip_prefix(named.as_str()))
                    .map_or_else(|| message.clone(), str::to_owned)
            })?;
        Ok(ResolvedImageConfig {
            digest: Some(image.digest.as_str().to_owned()),
            config: image.config.bytes.clone(),
        })
    }
}
