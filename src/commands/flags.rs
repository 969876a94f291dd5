//! buildctl's flags of `kiln build`, parsed into what the crates take: the build's
//! session (secrets, SSH agents, local directories, OCI layouts), its outputs and its
//! entitlements. Errors name the flag and the value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_proto::Entitlements;
use kiln_snapshotter::Compression;
use kiln_worker::BuildSession;

use crate::cli::BuildArgs;

/// One `--output`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputSpec {
    Local {
        dest: PathBuf,
    },
    Tar {
        dest: PathBuf,
    },
    /// `type=oci` or `type=docker`: an image archive.
    Archive {
        docker: bool,
        dest: PathBuf,
        name: String,
        image: ImageFlags,
    },
    /// `type=image`: pushed (`push=true`) or kept in the content store.
    Image {
        name: String,
        push: bool,
        image: ImageFlags,
    },
}

/// How an image output makes its layers and manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageFlags {
    /// For layers that have no blob yet; existing blobs are reused as they are.
    pub compression: Compression,
    pub oci_types: bool,
}

impl OutputSpec {
    /// Whether the output needs the result's files (and so a lazy result's layers).
    pub fn needs_files(&self) -> bool {
        matches!(self, OutputSpec::Local { .. } | OutputSpec::Tar { .. })
    }
}

/// `compression=` and `oci-mediatypes=` of an image output (`oci_default` for the
/// latter's default: true for `type=oci`, false for `docker` and `image`, as BuildKit).
fn image_flags(
    spec: &str,
    fields: &HashMap<String, String>,
    oci_default: bool,
) -> anyhow::Result<ImageFlags> {
    let compression = match fields.get("compression").map(String::as_str) {
        None | Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        Some("uncompressed") => Compression::None,
        Some(other) => {
            bail!("--output {spec}: compression={other} is not gzip, zstd or uncompressed")
        }
    };
    let mut oci_types = parse_bool(
        spec,
        "--output",
        "oci-mediatypes",
        fields.get("oci-mediatypes"),
        oci_default,
    )?;
    if compression == Compression::Zstd && !oci_types {
        // BuildKit's words: Docker media types have no zstd layer.
        eprintln!("WARNING: forcibly turning on oci-mediatype mode for zstd");
        oci_types = true;
    }
    Ok(ImageFlags {
        compression,
        oci_types,
    })
}

fn key_values(spec: &str, flag: &str) -> anyhow::Result<HashMap<String, String>> {
    spec.split(',')
        .map(|field| {
            field
                .split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .with_context(|| format!("{flag} {spec}: {field:?} is not key=value"))
        })
        .collect()
}

/// Parses `type=local,dest=DIR`, `type=tar,dest=FILE`, `type=oci|docker,dest=FILE[,name=REF]`
/// or `type=image,name=REF[,push=true]` (the image types also take `compression=` and
/// `oci-mediatypes=`).
pub fn parse_output(spec: &str) -> anyhow::Result<OutputSpec> {
    let fields = key_values(spec, "--output")?;
    let dest = || -> anyhow::Result<PathBuf> {
        fields
            .get("dest")
            .map(PathBuf::from)
            .with_context(|| format!("--output {spec}: dest= is required"))
    };
    let name = fields.get("name").cloned().unwrap_or_default();
    match fields.get("type").map(String::as_str) {
        Some("local") => Ok(OutputSpec::Local { dest: dest()? }),
        Some("tar") => Ok(OutputSpec::Tar { dest: dest()? }),
        Some(kind @ ("oci" | "docker")) => Ok(OutputSpec::Archive {
            docker: kind == "docker",
            dest: dest()?,
            name,
            image: image_flags(spec, &fields, kind == "oci")?,
        }),
        Some("image") => {
            let push = parse_bool(spec, "--output", "push", fields.get("push"), false)?;
            if name.is_empty() {
                bail!("--output {spec}: name= is required");
            }
            Ok(OutputSpec::Image {
                name,
                push,
                image: image_flags(spec, &fields, false)?,
            })
        }
        Some(other) => {
            bail!("--output {spec}: unsupported type {other:?} (local, tar, oci, docker or image)")
        }
        None => bail!("--output {spec}: type= is required"),
    }
}

/// One `--export-cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheExportSpec {
    Local {
        dest: PathBuf,
        tag: String,
        max: bool,
        oci: bool,
    },
    Registry {
        reference: String,
        max: bool,
        oci: bool,
    },
    /// The cache in the exported image's config.
    Inline,
}

/// One `--import-cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheImportSpec {
    Local {
        src: PathBuf,
        tag: Option<String>,
        digest: Option<String>,
    },
    Registry {
        reference: String,
    },
}

fn parse_bool(
    spec: &str,
    flag: &str,
    key: &str,
    value: Option<&String>,
    default: bool,
) -> anyhow::Result<bool> {
    match value.map(String::as_str) {
        None => Ok(default),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => bail!("{flag} {spec}: {key}={other} is not true or false"),
    }
}

/// Parses `--export-cache type=local,dest=DIR[,mode=][,tag=][,oci-mediatypes=]`,
/// `type=registry,ref=REF[,mode=][,oci-mediatypes=]` or `type=inline`.
pub fn parse_export_cache(spec: &str) -> anyhow::Result<CacheExportSpec> {
    let flag = "--export-cache";
    let fields = key_values(spec, flag)?;
    let max = match fields.get("mode").map(String::as_str) {
        None | Some("min") => false,
        Some("max") => true,
        Some(other) => bail!("{flag} {spec}: mode={other} is not min or max"),
    };
    let oci = parse_bool(
        spec,
        flag,
        "oci-mediatypes",
        fields.get("oci-mediatypes"),
        true,
    )?;
    match fields.get("type").map(String::as_str) {
        Some("local") => Ok(CacheExportSpec::Local {
            dest: fields
                .get("dest")
                .map(PathBuf::from)
                .with_context(|| format!("{flag} {spec}: dest= is required"))?,
            tag: fields
                .get("tag")
                .cloned()
                .unwrap_or_else(|| "latest".to_owned()),
            max,
            oci,
        }),
        Some("registry") => Ok(CacheExportSpec::Registry {
            reference: fields
                .get("ref")
                .cloned()
                .with_context(|| format!("{flag} {spec}: ref= is required"))?,
            max,
            oci,
        }),
        Some("inline") => Ok(CacheExportSpec::Inline),
        Some(other) => {
            bail!("{flag} {spec}: unsupported type {other:?} (local, registry or inline)")
        }
        None => bail!("{flag} {spec}: type= is required"),
    }
}

/// Parses `--import-cache type=local,src=DIR[,tag=T][,digest=D]` or `type=registry,ref=REF`.
pub fn parse_import_cache(spec: &str) -> anyhow::Result<CacheImportSpec> {
    let flag = "--import-cache";
    let fields = key_values(spec, flag)?;
    match fields.get("type").map(String::as_str) {
        Some("local") => Ok(CacheImportSpec::Local {
            src: fields
                .get("src")
                .map(PathBuf::from)
                .with_context(|| format!("{flag} {spec}: src= is required"))?,
            tag: fields.get("tag").cloned(),
            digest: fields.get("digest").cloned(),
        }),
        Some("registry") => Ok(CacheImportSpec::Registry {
            reference: fields
                .get("ref")
                .cloned()
                .with_context(|| format!("{flag} {spec}: ref= is required"))?,
        }),
        Some(other) => bail!("{flag} {spec}: unsupported type {other:?} (local or registry)"),
        None => bail!("{flag} {spec}: type= is required"),
    }
}

/// `--secret id=ID,src=FILE` or `id=ID,env=VAR`: the secret's content, read now.
fn parse_secret(spec: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let fields = key_values(spec, "--secret")?;
    let src = fields.get("src").or_else(|| fields.get("source"));
    let id = fields
        .get("id")
        .cloned()
        .or_else(|| {
            src.and_then(|s| Path::new(s).file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .with_context(|| format!("--secret {spec}: id= is required"))?;
    let data = match (src, fields.get("env")) {
        (Some(src), _) => {
            std::fs::read(src).with_context(|| format!("--secret {spec}: reading {src}"))?
        }
        (None, Some(var)) => std::env::var(var)
            .with_context(|| format!("--secret {spec}: environment variable {var}"))?
            .into_bytes(),
        (None, None) => bail!("--secret {spec}: src= or env= is required"),
    };
    Ok((id, data))
}

/// `--ssh ID[=SOCKET]` (the socket defaults to `$SSH_AUTH_SOCK`).
fn parse_ssh(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let (id, path) = match spec.split_once('=') {
        Some((id, path)) => (id.to_owned(), PathBuf::from(path)),
        None => (
            spec.to_owned(),
            std::env::var_os("SSH_AUTH_SOCK")
                .map(PathBuf::from)
                .with_context(|| {
                    format!("--ssh {spec}: no socket given and SSH_AUTH_SOCK is unset")
                })?,
        ),
    };
    if id.is_empty() {
        bail!("--ssh {spec}: the id is empty");
    }
    Ok((id, path))
}

/// `NAME=DIR` for `--local` and `--oci-layout`.
fn parse_named_dir(spec: &str, flag: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, dir) = spec
        .split_once('=')
        .with_context(|| format!("{flag} {spec}: expected NAME=DIR"))?;
    let dir = Path::new(dir)
        .canonicalize()
        .with_context(|| format!("{flag} {spec}: {dir}"))?;
    Ok((name.to_owned(), dir))
}

pub fn entitlements(allow: &[String]) -> anyhow::Result<Entitlements> {
    let mut e = Entitlements::default();
    for a in allow {
        match a.as_str() {
            "network.host" => e.network_host = true,
            "security.insecure" => e.security_insecure = true,
            other => {
                bail!("--allow {other}: unknown entitlement (network.host or security.insecure)")
            }
        }
    }
    Ok(e)
}

/// The build's session from its flags, with a fresh session id.
pub fn session(args: &BuildArgs) -> anyhow::Result<BuildSession> {
    let mut session = BuildSession {
        id: format!(
            "kiln{}x{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        ..BuildSession::default()
    };
    for s in &args.secret {
        let (id, data) = parse_secret(s)?;
        session.secrets.insert(id, data);
    }
    for s in &args.ssh {
        let (id, path) = parse_ssh(s)?;
        session.ssh.insert(id, path);
    }
    for l in &args.local {
        let (name, dir) = parse_named_dir(l, "--local")?;
        session.locals.insert(name, dir);
    }
    for l in &args.oci_layout {
        let (name, dir) = parse_named_dir(l, "--oci-layout")?;
        session.oci_layouts.insert(name, dir);
    }
    Ok(session)
}

/// Every `--output`, in order.
pub fn outputs(args: &BuildArgs) -> anyhow::Result<Vec<OutputSpec>> {
    args.output.iter().map(|o| parse_output(o)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs() {
        assert_eq!(
            parse_output("type=local,dest=out").unwrap(),
            OutputSpec::Local { dest: "out".into() }
        );
        let gzip_oci = ImageFlags {
            compression: Compression::Gzip,
            oci_types: true,
        };
        assert_eq!(
            parse_output("type=oci,dest=img.tar,name=example.com/a:b").unwrap(),
            OutputSpec::Archive {
                docker: false,
                dest: "img.tar".into(),
                name: "example.com/a:b".into(),
                image: gzip_oci,
            }
        );
        assert_eq!(
            parse_output("type=docker,dest=-,name=a").unwrap(),
            OutputSpec::Archive {
                docker: true,
                dest: "-".into(),
                name: "a".into(),
                image: ImageFlags {
                    oci_types: false,
                    ..gzip_oci
                },
            }
        );
        assert_eq!(
            parse_output("type=image,name=r/a:1,push=true,compression=zstd").unwrap(),
            OutputSpec::Image {
                name: "r/a:1".into(),
                push: true,
                image: ImageFlags {
                    compression: Compression::Zstd,
                    oci_types: true
                },
            }
        );
        assert_eq!(
            parse_output("type=image,name=a,compression=uncompressed,oci-mediatypes=true").unwrap(),
            OutputSpec::Image {
                name: "a".into(),
                push: false,
                image: ImageFlags {
                    compression: Compression::None,
                    oci_types: true
                },
            }
        );
        assert!(parse_output("type=image,push=true").is_err());
        assert!(parse_output("type=image,name=a,compression=lz4").is_err());
        assert!(parse_output("type=image,name=a,push=maybe").is_err());
        assert!(parse_output("type=docker,name=a").is_err());
        assert!(parse_output("type=nonsense,name=x").is_err());
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("dest=out").is_err());
    }

    #[test]
    fn cache_specs() {
        assert_eq!(
            parse_export_cache("type=local,dest=c,mode=max").unwrap(),
            CacheExportSpec::Local {
                dest: "c".into(),
                tag: "latest".into(),
                max: true,
                oci: true
            }
        );
        assert_eq!(
            parse_export_cache("type=registry,ref=r/c:t,oci-mediatypes=false").unwrap(),
            CacheExportSpec::Registry {
                reference: "r/c:t".into(),
                max: false,
                oci: false
            }
        );
        assert_eq!(
            parse_export_cache("type=inline").unwrap(),
            CacheExportSpec::Inline
        );
        assert!(parse_export_cache("type=registry,ref=x,mode=all").is_err());
        assert!(parse_export_cache("type=local").is_err());
        assert_eq!(
            parse_import_cache("type=local,src=c,tag=t").unwrap(),
            CacheImportSpec::Local {
                src: "c".into(),
                tag: Some("t".into()),
                digest: None
            }
        );
        assert!(parse_import_cache("type=gha").is_err());
    }
}
