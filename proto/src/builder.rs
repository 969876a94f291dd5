//! A small, deterministic API for building Definitions, encoded with the gogo rules so
//! BuildKit would load what kiln emits. It mirrors what BuildKit's Go `client/llb`
//! produces (mount sorting, input de-duplication, output numbering, the terminal op)
//! closely enough for tests and examples; it is not a frontend.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::digest::Digest;
use crate::encode::GogoEncode;
use crate::pb;

/// One output of an op in the Definition being built.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Output {
    pub digest: Digest,
    pub index: i64,
}

/// Accumulates ops (deduplicated by digest) and their metadata.
#[derive(Debug, Default)]
pub struct DefinitionBuilder {
    def: Vec<Vec<u8>>,
    seen: HashSet<Digest>,
    metadata: BTreeMap<String, pb::OpMetadata>,
    platform: Option<pb::Platform>,
}

fn caps(names: &[&str]) -> BTreeMap<String, bool> {
    names.iter().map(|n| ((*n).to_owned(), true)).collect()
}

impl DefinitionBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the platform written on every op added afterwards.
    pub fn platform(mut self, os: &str, architecture: &str, variant: &str) -> Self {
        self.platform = Some(pb::Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.to_owned(),
            ..Default::default()
        });
        self
    }

    /// Adds an encoded op with its metadata; returns its digest. Identical ops collapse.
    pub fn add_op(&mut self, mut op: pb::Op, metadata: pb::OpMetadata) -> Digest {
        if op.platform.is_none() {
            op.platform.clone_from(&self.platform);
        }
        if op.constraints.is_none() {
            op.constraints = Some(pb::WorkerConstraints::default());
        }
        let bytes = op.gogo_encode();
        let digest = Digest::of(&bytes);
        if self.seen.insert(digest.clone()) {
            self.def.push(bytes);
        }
        let entry = self.metadata.entry(digest.as_str().to_owned()).or_default();
        entry.caps.extend(metadata.caps);
        entry.description.extend(metadata.description);
        entry.ignore_cache |= metadata.ignore_cache;
        digest
    }

    /// A source op (`docker-image://…`, `local://…`, …).
    pub fn source(&mut self, identifier: &str, attrs: BTreeMap<String, String>) -> Output {
        let cap = match identifier.split_once("://").map(|(scheme, _)| scheme) {
            Some("docker-image") => "source.image",
            Some("local") => "source.local",
            Some("oci-layout") => "source.ocilayout",
            Some("git") => "source.git",
            Some("http" | "https") => "source.http",
            _ => "source.image",
        };
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: identifier.to_owned(),
                attrs,
            })),
            ..Default::default()
        };
        let metadata = pb::OpMetadata {
            caps: caps(&[cap]),
            ..Default::default()
        };
        Output {
            digest: self.add_op(op, metadata),
            index: 0,
        }
    }

    /// `docker-image://<reference>`.
    pub fn image(&mut self, reference: &str) -> Output {
        self.source(&format!("docker-image://{reference}"), BTreeMap::new())
    }

    /// Adds an exec op; mounts are sorted by destination and numbered like the Go client.
    pub fn exec(&mut self, exec: &Exec) -> ExecOutputs {
        let mut mounts: Vec<&ExecMount> = exec.mounts.iter().collect();
        mounts.sort_by(|a, b| a.dest.cmp(&b.dest));
        let mut inputs: Vec<pb::Input> = Vec::new();
        let mut input_index = |source: &Output| -> i64 {
            let input = pb::Input {
                digest: source.digest.as_str().to_owned(),
                index: source.index,
            };
            let position = inputs.iter().position(|i| *i == input).unwrap_or_else(|| {
                inputs.push(input);
                inputs.len() - 1
            });
            position as i64
        };
        let mut feature_caps = BTreeSet::from(["exec.meta.base", "exec.mount.bind"]);
        let mut pb_mounts = Vec::new();
        let mut output_dests = Vec::new();
        let mut next_output = 0i64;
        for mount in mounts.iter().filter(|m| !m.kind.is_session()) {
            let input = mount.source.as_ref().map_or(-1, &mut input_index);
            let produces_output =
                !mount.no_output && !mount.readonly && matches!(mount.kind, MountKind::Bind);
            let output = if produces_output {
                next_output += 1;
                output_dests.push(mount.dest.clone());
                next_output - 1
            } else {
                -1
            };
            if !mount.selector.is_empty() {
                feature_caps.insert("exec.mount.selector");
            }
            let mut pb_mount = pb::Mount {
                input,
                selector: mount.selector.clone(),
                dest: mount.dest.clone(),
                output,
                readonly: mount.readonly,
                ..Default::default()
            };
            match &mount.kind {
                MountKind::Bind => {}
                MountKind::Cache { id, sharing } => {
                    feature_caps.insert("exec.mount.cache");
                    feature_caps.insert("exec.mount.cache.sharing");
                    pb_mount.mount_type = pb::MountType::Cache as i32;
                    pb_mount.cache_opt = Some(pb::CacheOpt {
                        id: id.clone(),
                        sharing: *sharing as i32,
                    });
                }
                MountKind::Tmpfs { size } => {
                    feature_caps.insert("exec.mount.tmpfs");
                    if *size > 0 {
                        feature_caps.insert("exec.mount.tmpfs.size");
                    }
                    pb_mount.mount_type = pb::MountType::Tmpfs as i32;
                    pb_mount.tmpfs_opt = Some(pb::TmpfsOpt { size: *size });
                }
                MountKind::Secret(_) | MountKind::Ssh(_) => {}
            }
            pb_mounts.push(pb_mount);
        }
        // Secret and SSH mounts come last and keep protobuf zero values for input/output,
        // exactly as the Go client sends them.
        for mount in exec.mounts.iter().filter(|m| m.kind.is_session()) {
            let mut pb_mount = pb::Mount {
                dest: mount.dest.clone(),
                ..Default::default()
            };
            match &mount.kind {
                MountKind::Secret(opt) => {
                    feature_caps.insert("exec.mount.secret");
                    pb_mount.mount_type = pb::MountType::Secret as i32;
                    pb_mount.secret_opt = Some(opt.clone());
                }
                MountKind::Ssh(opt) => {
                    feature_caps.insert("exec.mount.ssh");
                    pb_mount.mount_type = pb::MountType::Ssh as i32;
                    pb_mount.ssh_opt = Some(opt.clone());
                }
                _ => {}
            }
            pb_mounts.push(pb_mount);
        }
        if exec.network != pb::NetMode::Unset {
            feature_caps.insert("exec.meta.network");
        }
        if exec.security != pb::SecurityMode::Sandbox {
            feature_caps.insert("exec.meta.security");
        }
        if !exec.meta.ulimit.is_empty() {
            feature_caps.insert("exec.meta.ulimit");
        }
        if !exec.meta.cgroup_parent.is_empty() {
            feature_caps.insert("exec.meta.cgroup.parent");
        }
        if !exec.secret_env.is_empty() {
            feature_caps.insert("exec.secretenv");
        }
        let mut meta = exec.meta.clone();
        meta.remove_mount_stubs_recursive = true;
        let op = pb::Op {
            inputs,
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(meta),
                mounts: pb_mounts,
                network: exec.network as i32,
                security: exec.security as i32,
                secretenv: exec.secret_env.clone(),
            })),
            ..Default::default()
        };
        let mut metadata = pb::OpMetadata {
            caps: caps(&feature_caps.into_iter().collect::<Vec<_>>()),
            ignore_cache: exec.ignore_cache,
            ..Default::default()
        };
        if let Some(name) = &exec.custom_name {
            metadata
                .description
                .insert("llb.customname".to_owned(), name.clone());
        }
        let digest = self.add_op(op, metadata);
        ExecOutputs {
            outputs: output_dests
                .into_iter()
                .enumerate()
                .map(|(i, dest)| {
                    (
                        dest,
                        Output {
                            digest: digest.clone(),
                            index: i as i64,
                        },
                    )
                })
                .collect(),
            digest,
        }
    }

    /// Adds a file op built from `actions`; its single output is the last action's result.
    pub fn file(&mut self, actions: FileActions) -> Output {
        let FileActions { base, steps } = actions;
        let mut inputs: Vec<pb::Input> = Vec::new();
        let mut add_input = |source: &Output| -> i64 {
            let input = pb::Input {
                digest: source.digest.as_str().to_owned(),
                index: source.index,
            };
            let position = inputs.iter().position(|i| *i == input).unwrap_or_else(|| {
                inputs.push(input);
                inputs.len() - 1
            });
            position as i64
        };
        let base_index = base.as_ref().map_or(-1, &mut add_input);
        let secondary: Vec<i64> = steps
            .iter()
            .map(|step| match step {
                FileStep::Copy { source, .. } => add_input(source),
                _ => -1,
            })
            .collect();
        let input_count = inputs.len() as i64;
        let last = steps.len().saturating_sub(1);
        let mut feature_caps = vec!["file.base"];
        let actions = steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| {
                let input = if i == 0 {
                    base_index
                } else {
                    input_count + i as i64 - 1
                };
                let action = match step {
                    FileStep::Mkdir(a) => pb::file_action::Action::Mkdir(a),
                    FileStep::Mkfile(a) => pb::file_action::Action::Mkfile(a),
                    FileStep::Rm(a) => pb::file_action::Action::Rm(a),
                    FileStep::Copy { copy, .. } => {
                        if !copy.include_patterns.is_empty() || !copy.exclude_patterns.is_empty() {
                            feature_caps.push("file.copy.includeexcludepatterns");
                        }
                        pb::file_action::Action::Copy(copy)
                    }
                };
                pb::FileAction {
                    input,
                    secondary_input: secondary[i],
                    output: if i == last { 0 } else { -1 },
                    action: Some(action),
                }
            })
            .collect();
        let op = pb::Op {
            inputs,
            op: Some(pb::op::Op::File(pb::FileOp { actions })),
            ..Default::default()
        };
        let metadata = pb::OpMetadata {
            caps: caps(&feature_caps),
            ..Default::default()
        };
        Output {
            digest: self.add_op(op, metadata),
            index: 0,
        }
    }

    /// Adds a merge op of `inputs` in order (client/llb's `Merge`): scratch inputs are
    /// left out, as client/llb leaves them out.
    pub fn merge(&mut self, inputs: &[Option<Output>]) -> Output {
        let present: Vec<&Output> = inputs.iter().flatten().collect();
        let op = pb::Op {
            inputs: present
                .iter()
                .map(|o| pb::Input {
                    digest: o.digest.as_str().to_owned(),
                    index: o.index,
                })
                .collect(),
            op: Some(pb::op::Op::Merge(pb::MergeOp {
                inputs: (0..present.len() as i64)
                    .map(|input| pb::MergeInput { input })
                    .collect(),
            })),
            ..Default::default()
        };
        let metadata = pb::OpMetadata {
            caps: caps(&["mergeop"]),
            ..Default::default()
        };
        Output {
            digest: self.add_op(op, metadata),
            index: 0,
        }
    }

    /// Adds a diff op of `upper` against `lower` (client/llb's `Diff`; `None` is scratch).
    pub fn diff(&mut self, lower: Option<Output>, upper: Option<Output>) -> Output {
        let mut inputs = Vec::new();
        let mut index = |o: Option<Output>| match o {
            Some(o) => {
                inputs.push(pb::Input {
                    digest: o.digest.as_str().to_owned(),
                    index: o.index,
                });
                inputs.len() as i64 - 1
            }
            None => crate::EMPTY_INPUT,
        };
        let lower = index(lower);
        let upper = index(upper);
        let op = pb::Op {
            inputs,
            op: Some(pb::op::Op::Diff(pb::DiffOp {
                lower: Some(pb::LowerDiffInput { input: lower }),
                upper: Some(pb::UpperDiffInput { input: upper }),
            })),
            ..Default::default()
        };
        let metadata = pb::OpMetadata {
            caps: caps(&["diffop"]),
            ..Default::default()
        };
        Output {
            digest: self.add_op(op, metadata),
            index: 0,
        }
    }

    /// Finishes with the terminal op selecting `target`.
    pub fn finish(mut self, target: &Output) -> pb::Definition {
        let terminal = pb::Op {
            inputs: vec![pb::Input {
                digest: target.digest.as_str().to_owned(),
                index: target.index,
            }],
            ..Default::default()
        };
        let bytes = terminal.gogo_encode();
        let digest = Digest::of(&bytes);
        self.def.push(bytes);
        self.metadata.insert(
            digest.as_str().to_owned(),
            pb::OpMetadata {
                caps: caps(&["constraints", "platform"]),
                ..Default::default()
            },
        );
        pb::Definition {
            def: self.def,
            metadata: self.metadata,
            source: None,
        }
    }
}

/// An exec op to add with [`DefinitionBuilder::exec`].
#[derive(Clone, Debug, Default)]
pub struct Exec {
    pub meta: pb::Meta,
    pub network: pb::NetMode,
    pub security: pb::SecurityMode,
    pub mounts: Vec<ExecMount>,
    pub secret_env: Vec<pb::SecretEnv>,
    pub custom_name: Option<String>,
    pub ignore_cache: bool,
}

impl Exec {
    /// `args` run in `root` with cwd `/` and the default PATH.
    pub fn new<S: AsRef<str>>(root: Option<Output>, args: &[S]) -> Self {
        Exec {
            meta: pb::Meta {
                args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
                env: vec![format!("PATH={}", crate::DEFAULT_PATH)],
                cwd: "/".to_owned(),
                ..Default::default()
            },
            mounts: vec![ExecMount::bind("/", root)],
            ..Default::default()
        }
    }

    pub fn mount(mut self, mount: ExecMount) -> Self {
        self.mounts.push(mount);
        self
    }

    pub fn cwd(mut self, cwd: &str) -> Self {
        cwd.clone_into(&mut self.meta.cwd);
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        user.clone_into(&mut self.meta.user);
        self
    }

    pub fn env(mut self, entry: &str) -> Self {
        self.meta.env.push(entry.to_owned());
        self
    }
}

/// Where an exec mount's content comes from.
#[derive(Clone, Debug, Default)]
pub enum MountKind {
    #[default]
    Bind,
    Cache {
        id: String,
        sharing: pb::CacheSharingOpt,
    },
    Tmpfs {
        size: i64,
    },
    Secret(pb::SecretOpt),
    Ssh(pb::SshOpt),
}

impl MountKind {
    fn is_session(&self) -> bool {
        matches!(self, MountKind::Secret(_) | MountKind::Ssh(_))
    }
}

/// One mount of an [`Exec`].
#[derive(Clone, Debug, Default)]
pub struct ExecMount {
    pub dest: String,
    pub source: Option<Output>,
    pub selector: String,
    pub readonly: bool,
    pub no_output: bool,
    pub kind: MountKind,
}

impl ExecMount {
    pub fn bind(dest: &str, source: Option<Output>) -> Self {
        ExecMount {
            dest: dest.to_owned(),
            source,
            ..Default::default()
        }
    }

    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn selector(mut self, selector: &str) -> Self {
        selector.clone_into(&mut self.selector);
        self
    }

    pub fn cache(dest: &str, id: &str, sharing: pb::CacheSharingOpt) -> Self {
        ExecMount {
            dest: dest.to_owned(),
            kind: MountKind::Cache {
                id: id.to_owned(),
                sharing,
            },
            ..Default::default()
        }
    }

    pub fn tmpfs(dest: &str, size: i64) -> Self {
        ExecMount {
            dest: dest.to_owned(),
            kind: MountKind::Tmpfs { size },
            ..Default::default()
        }
    }

    pub fn secret(dest: &str, id: &str, mode: u32, optional: bool) -> Self {
        ExecMount {
            dest: dest.to_owned(),
            kind: MountKind::Secret(pb::SecretOpt {
                id: id.to_owned(),
                mode,
                optional,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The outputs of an added exec op, by mount destination.
#[derive(Clone, Debug)]
pub struct ExecOutputs {
    pub digest: Digest,
    pub outputs: BTreeMap<String, Output>,
}

impl ExecOutputs {
    pub fn root(&self) -> Option<Output> {
        self.output("/")
    }

    pub fn output(&self, dest: &str) -> Option<Output> {
        self.outputs.get(dest).cloned()
    }
}

#[derive(Clone, Debug)]
enum FileStep {
    Mkdir(pb::FileActionMkDir),
    Mkfile(pb::FileActionMkFile),
    Rm(pb::FileActionRm),
    Copy {
        source: Output,
        copy: pb::FileActionCopy,
    },
}

/// A chain of file actions on a base (or scratch), as `llb.State.File` builds it.
#[derive(Clone, Debug)]
pub struct FileActions {
    base: Option<Output>,
    steps: Vec<FileStep>,
}

impl FileActions {
    pub fn on(base: Option<Output>) -> Self {
        FileActions {
            base,
            steps: Vec::new(),
        }
    }

    pub fn mkdir(mut self, path: &str, mode: i32, make_parents: bool) -> Self {
        self.steps.push(FileStep::Mkdir(pb::FileActionMkDir {
            path: path.to_owned(),
            mode,
            make_parents,
            timestamp: -1,
            ..Default::default()
        }));
        self
    }

    pub fn mkfile(mut self, path: &str, mode: i32, data: &[u8]) -> Self {
        self.steps.push(FileStep::Mkfile(pb::FileActionMkFile {
            path: path.to_owned(),
            mode,
            data: data.to_vec(),
            timestamp: -1,
            ..Default::default()
        }));
        self
    }

    pub fn rm(mut self, path: &str, allow_not_found: bool) -> Self {
        self.steps.push(FileStep::Rm(pb::FileActionRm {
            path: path.to_owned(),
            allow_not_found,
            ..Default::default()
        }));
        self
    }

    /// Copies `src` of `source` to `dest`; `copy` carries the options (src/dest are set here).
    pub fn copy(mut self, source: Output, src: &str, dest: &str, copy: pb::FileActionCopy) -> Self {
        self.steps.push(FileStep::Copy {
            source,
            copy: pb::FileActionCopy {
                src: src.to_owned(),
                dest: dest.to_owned(),
                ..copy
            },
        });
        self
    }
}

/// Default copy options as the Go client sends them (`mode` and `timestamp` unset).
pub fn default_copy() -> pb::FileActionCopy {
    pb::FileActionCopy {
        mode: -1,
        timestamp: -1,
        ..Default::default()
    }
}
