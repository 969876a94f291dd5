//! PrepareMounts as a plan (../shared/spec/prepare-mounts.md §2, §5, §7): for each ExecOp
//! mount, what provides it (an input ref read-only, a new mutable layer on an input or on
//! nothing, a cache directory, a tmpfs, a secret, an SSH agent socket), where it goes, and
//! which mounts yield the op's outputs in which order — with BuildKit's quirks (a
//! read-only bind or a cache mount with an input and an output yields a pass-through
//! output that shifts later ones; secret and SSH mounts sent with `output = 0` yield none).
//!
//! Planning is pure; materialising the plan (snapshots, mounts) is the exec op's job.

use kiln_proto::pb;

/// Errors of PrepareMounts, in BuildKit's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrepareError {
    #[error("invalid mount type {0} for /")]
    RootType(String),
    #[error("missing input {0}")]
    MissingInput(i64),
    #[error("mount {0} has no input")]
    NoInput(String),
    #[error("missing cache mount options")]
    NoCacheOptions,
    #[error("invalid cache sharing option: {0}")]
    Sharing(i32),
    #[error("invalid secret mount options")]
    NoSecretOptions,
    #[error("secret ID missing from mount options")]
    NoSecretId,
    #[error("mount type {0} not implemented")]
    MountType(i32),
}

/// Where a mount's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Input `i` as it is, read-only.
    Input(usize),
    /// A new mutable layer on input `i` (or empty); kept as an output or thrown away.
    Mutable { parent: Option<usize> },
}

/// What one mount becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Bind {
        source: Source,
    },
    Cache {
        id: String,
        sharing: pb::CacheSharingOpt,
        parent: Option<usize>,
    },
    Tmpfs {
        size: i64,
    },
    Secret(pb::SecretOpt),
    Ssh(pb::SshOpt),
}

/// One planned mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Position in `ExecOp.mounts`.
    pub index: usize,
    /// Absolute, cleaned destination (`/` for the root).
    pub dest: String,
    pub kind: Kind,
    /// The mount's `readonly` flag (for the root: a read-only rootfs).
    pub readonly: bool,
    pub selector: String,
}

/// One op output, in result order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The committed mutable layer of planned mount `index` (position in `mounts`).
    Layer { mount: usize },
    /// Input `i` itself (a read-only bind or a cache mount with an output).
    PassThrough { input: usize },
}

/// The whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The root mount (always present after planning).
    pub root: Option<Planned>,
    /// Other mounts, sorted by destination (stable, so equal destinations keep mount order).
    pub mounts: Vec<Planned>,
    pub outputs: Vec<Output>,
}

/// `path.Join` for a mount destination relative to the working directory.
fn destination(dest: &str, cwd: &str) -> String {
    let cleaned = kiln_executor::path::clean(dest);
    if dest.starts_with('/') {
        cleaned
    } else {
        kiln_executor::path::clean(&format!("/{cwd}/{dest}"))
    }
}

fn type_name(mount_type: i32) -> String {
    pb::MountType::try_from(mount_type)
        .map(|t| t.as_str_name().to_owned())
        .unwrap_or_else(|_| mount_type.to_string())
}

/// Plans `mounts` of an exec op with `inputs` inputs and working directory `cwd`.
/// `secret_present(id)` says whether the build has that secret (missing optional secrets
/// are skipped), `ssh_present(id)` the same for SSH agents.
pub fn plan(
    mounts: &[pb::Mount],
    inputs: usize,
    cwd: &str,
    secret_present: &dyn Fn(&str) -> bool,
    ssh_present: &dyn Fn(&str) -> bool,
) -> Result<Plan, PrepareError> {
    let mut plan = Plan::default();
    for (index, m) in mounts.iter().enumerate() {
        let is_root = m.dest == "/";
        let mount_type = pb::MountType::try_from(m.mount_type)
            .map_err(|_| PrepareError::MountType(m.mount_type))?;
        if is_root && mount_type != pb::MountType::Bind {
            return Err(PrepareError::RootType(type_name(m.mount_type)));
        }
        let input = match m.input {
            -1 => None,
            i if i < -1 => return Err(PrepareError::MissingInput(i)),
            i => {
                let i = usize::try_from(i).map_err(|_| PrepareError::MissingInput(i))?;
                if i >= inputs {
                    return Err(PrepareError::MissingInput(m.input));
                }
                Some(i)
            }
        };
        let has_output = m.output != -1;
        let kind = match mount_type {
            pb::MountType::Bind => {
                let source = match (is_root, has_output, m.readonly, input) {
                    // A read-only bind with an output passes its input through.
                    (false, true, true, Some(i)) => {
                        plan.outputs.push(Output::PassThrough { input: i });
                        Source::Input(i)
                    }
                    (_, true, _, parent) => {
                        plan.outputs.push(Output::Layer { mount: index });
                        Source::Mutable { parent }
                    }
                    (false, false, true, Some(i)) => Source::Input(i),
                    (false, false, _, parent) => Source::Mutable { parent },
                    // Read-only root without output: a throw-away layer so the runtime
                    // can create mount points.
                    (true, false, true, parent) => Source::Mutable { parent },
                    // Writable root without output: the input itself, mounted read-only.
                    (true, false, false, Some(i)) => Source::Input(i),
                    (true, false, false, None) => {
                        return Err(PrepareError::NoInput(m.dest.clone()));
                    }
                };
                Kind::Bind { source }
            }
            pb::MountType::Cache => {
                let opt = m.cache_opt.as_ref().ok_or(PrepareError::NoCacheOptions)?;
                let sharing = pb::CacheSharingOpt::try_from(opt.sharing)
                    .map_err(|_| PrepareError::Sharing(opt.sharing))?;
                if has_output {
                    if let Some(i) = input {
                        plan.outputs.push(Output::PassThrough { input: i });
                    }
                }
                Kind::Cache {
                    id: opt.id.clone(),
                    sharing,
                    parent: input,
                }
            }
            pb::MountType::Tmpfs => Kind::Tmpfs {
                size: m.tmpfs_opt.as_ref().map_or(0, |t| t.size),
            },
            pb::MountType::Secret => {
                let opt = m.secret_opt.as_ref().ok_or(PrepareError::NoSecretOptions)?;
                if opt.id.is_empty() {
                    return Err(PrepareError::NoSecretId);
                }
                if !secret_present(&opt.id) && opt.optional {
                    continue;
                }
                Kind::Secret(opt.clone())
            }
            pb::MountType::Ssh => {
                let opt = m.ssh_opt.clone().unwrap_or_default();
                let id = if opt.id.is_empty() {
                    "default"
                } else {
                    opt.id.as_str()
                };
                if !ssh_present(id) && opt.optional {
                    continue;
                }
                Kind::Ssh(opt)
            }
        };
        let planned = Planned {
            index,
            dest: if is_root {
                "/".to_owned()
            } else {
                destination(&m.dest, cwd)
            },
            kind,
            readonly: m.readonly,
            selector: m.selector.clone(),
        };
        if is_root {
            plan.root = Some(planned);
        } else {
            plan.mounts.push(planned);
        }
    }
    if plan.root.is_none() {
        return Err(PrepareError::NoInput("/".to_owned()));
    }
    // Parents before children; a stable sort keeps equal destinations in mount order.
    plan.mounts.sort_by(|a, b| a.dest.cmp(&b.dest));
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(input: i64, dest: &str, output: i64, readonly: bool) -> pb::Mount {
        pb::Mount {
            input,
            dest: dest.into(),
            output,
            readonly,
            ..Default::default()
        }
    }

    fn all(_: &str) -> bool {
        true
    }

    fn none(_: &str) -> bool {
        false
    }

    #[test]
    fn plain_run_root_is_a_layer_output() {
        let p = plan(&[bind(0, "/", 0, false)], 1, "/", &all, &all).unwrap();
        assert_eq!(p.outputs, vec![Output::Layer { mount: 0 }]);
        assert_eq!(
            p.root.unwrap().kind,
            Kind::Bind {
                source: Source::Mutable { parent: Some(0) }
            }
        );
    }

    #[test]
    fn readonly_bind_and_cache_with_outputs_pass_inputs_through_and_shift_indexes() {
        let mut cache = bind(1, "/c", 2, false);
        cache.mount_type = pb::MountType::Cache as i32;
        cache.cache_opt = Some(pb::CacheOpt {
            id: "x".into(),
            sharing: 0,
        });
        let mounts = [
            bind(0, "/", 0, false),
            bind(1, "/ro", 1, true),
            cache,
            bind(-1, "/out", 3, false),
        ];
        let p = plan(&mounts, 2, "/", &all, &all).unwrap();
        assert_eq!(
            p.outputs,
            vec![
                Output::Layer { mount: 0 },
                Output::PassThrough { input: 1 },
                Output::PassThrough { input: 1 },
                Output::Layer { mount: 3 },
            ]
        );
    }

    #[test]
    fn secret_and_ssh_mounts_with_output_zero_yield_no_output() {
        let mut secret = bind(0, "/run/secrets/s", 0, false);
        secret.mount_type = pb::MountType::Secret as i32;
        secret.secret_opt = Some(pb::SecretOpt {
            id: "s".into(),
            ..Default::default()
        });
        let mut ssh = bind(0, "/run/ssh", 0, false);
        ssh.mount_type = pb::MountType::Ssh as i32;
        let p = plan(&[bind(0, "/", 0, false), secret, ssh], 1, "/", &all, &all).unwrap();
        assert_eq!(p.outputs, vec![Output::Layer { mount: 0 }]);
        assert_eq!(p.mounts.len(), 2);
    }

    #[test]
    fn missing_optional_secret_is_skipped_required_one_kept() {
        let mut optional = bind(0, "/run/secrets/a", 0, false);
        optional.mount_type = pb::MountType::Secret as i32;
        optional.secret_opt = Some(pb::SecretOpt {
            id: "a".into(),
            optional: true,
            ..Default::default()
        });
        let mut required = optional.clone();
        required.secret_opt = Some(pb::SecretOpt {
            id: "b".into(),
            ..Default::default()
        });
        let p = plan(&[bind(0, "/", 0, false), optional], 1, "/", &none, &none).unwrap();
        assert!(p.mounts.is_empty());
        let p = plan(&[bind(0, "/", 0, false), required], 1, "/", &none, &none).unwrap();
        assert_eq!(
            p.mounts.len(),
            1,
            "required secrets fail later with a clear error"
        );
    }

    #[test]
    fn root_variants() {
        // Read-only root without output: a scratch layer on the input.
        let p = plan(&[bind(0, "/", -1, true)], 1, "/", &all, &all).unwrap();
        let root = p.root.unwrap();
        assert!(root.readonly);
        assert_eq!(
            root.kind,
            Kind::Bind {
                source: Source::Mutable { parent: Some(0) }
            }
        );
        // Writable root without output: the input itself.
        let p = plan(&[bind(0, "/", -1, false)], 1, "/", &all, &all).unwrap();
        assert_eq!(
            p.root.unwrap().kind,
            Kind::Bind {
                source: Source::Input(0)
            }
        );
        assert_eq!(
            plan(&[bind(-1, "/", -1, false)], 0, "/", &all, &all),
            Err(PrepareError::NoInput("/".into()))
        );
    }

    #[test]
    fn errors_in_buildkit_words() {
        let mut cache_root = bind(0, "/", 0, false);
        cache_root.mount_type = pb::MountType::Cache as i32;
        assert_eq!(
            plan(&[cache_root], 1, "/", &all, &all)
                .unwrap_err()
                .to_string(),
            "invalid mount type CACHE for /"
        );
        assert_eq!(
            plan(
                &[bind(0, "/", 0, false), bind(3, "/x", -1, true)],
                1,
                "/",
                &all,
                &all
            )
            .unwrap_err()
            .to_string(),
            "missing input 3"
        );
        assert_eq!(
            plan(&[bind(-5, "/", 0, false)], 1, "/", &all, &all)
                .unwrap_err()
                .to_string(),
            "missing input -5"
        );
        let mut cache = bind(-1, "/c", -1, false);
        cache.mount_type = pb::MountType::Cache as i32;
        assert_eq!(
            plan(&[bind(0, "/", 0, false), cache.clone()], 1, "/", &all, &all)
                .unwrap_err()
                .to_string(),
            "missing cache mount options"
        );
        cache.cache_opt = Some(pb::CacheOpt {
            id: "c".into(),
            sharing: 9,
        });
        assert_eq!(
            plan(&[bind(0, "/", 0, false), cache], 1, "/", &all, &all)
                .unwrap_err()
                .to_string(),
            "invalid cache sharing option: 9"
        );
        let mut secret = bind(0, "/s", 0, false);
        secret.mount_type = pb::MountType::Secret as i32;
        assert_eq!(
            plan(
                &[bind(0, "/", 0, false), secret.clone()],
                1,
                "/",
                &all,
                &all
            )
            .unwrap_err()
            .to_string(),
            "invalid secret mount options"
        );
        secret.secret_opt = Some(pb::SecretOpt::default());
        assert_eq!(
            plan(&[bind(0, "/", 0, false), secret], 1, "/", &all, &all)
                .unwrap_err()
                .to_string(),
            "secret ID missing from mount options"
        );
    }

    #[test]
    fn relative_destinations_and_sorting() {
        let mounts = [
            bind(0, "/", 0, false),
            bind(-1, "out", 1, false),
            bind(-1, "/a/b", 2, false),
            bind(-1, "/a", 3, false),
        ];
        let p = plan(&mounts, 1, "/work/dir", &all, &all).unwrap();
        let dests: Vec<&str> = p.mounts.iter().map(|m| m.dest.as_str()).collect();
        assert_eq!(dests, vec!["/a", "/a/b", "/work/dir/out"]);
        // Outputs stay in mount order, not destination order.
        assert_eq!(
            p.outputs,
            vec![
                Output::Layer { mount: 0 },
                Output::Layer { mount: 1 },
                Output::Layer { mount: 2 },
                Output::Layer { mount: 3 },
            ]
        );
    }
}
