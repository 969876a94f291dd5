//! Instructions and options the shared vectors do not cover, checked op field by op field
//! against what BuildKit v0.11.6's dockerfile2llb and client/llb emit (read from its code).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use kiln_dockerfile::{
    ConvertError, ConvertOptions, Converted, ImageMetaResolver, ResolveImageConfigOptions,
    ResolvedImageConfig, dockerfile_to_llb,
};
use kiln_proto::pb;

const ALPINE_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const ONBUILD_DIGEST: &str =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// Serves a few fixed configs; remembers what was asked.
struct FakeResolver {
    calls: std::sync::Mutex<Vec<(String, pb::Platform)>>,
}

impl FakeResolver {
    fn new() -> Self {
        FakeResolver {
            calls: std::sync::Mutex::new(Vec::new()),
        }
    }
}

#[async_trait::async_trait]
impl ImageMetaResolver for FakeResolver {
    async fn resolve_image_config(
        &self,
        reference: &str,
        opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String> {
        self.calls
            .lock()
            .unwrap()
            .push((reference.to_owned(), opts.platform.clone()));
        let (digest, config) = match reference {
            "docker.io/library/alpine:latest" => (
                ALPINE_DIGEST,
                format!(
                    r#"{{"architecture":"{}","os":"linux","config":{{"Env":["PATH=/usr/bin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/home","User":"app"}},"rootfs":{{"type":"layers","diff_ids":["sha256:aa"]}},"history":[{{"created":"2020-01-01T00:00:00Z","created_by":"base"}}]}}"#,
                    opts.platform.architecture
                ),
            ),
            "docker.io/library/onbuild:latest" => (
                ONBUILD_DIGEST,
                r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"OnBuild":["RUN echo triggered","ENV T=1"]},"rootfs":{"type":"layers","diff_ids":["sha256:bb"]}}"#.to_owned(),
            ),
            "docker.io/library/empty:latest" => (
                ONBUILD_DIGEST,
                r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#.to_owned(),
            ),
            _ => return Err(format!("{reference}: not found")),
        };
        Ok(ResolvedImageConfig {
            digest: Some(digest.to_owned()),
            config: config.into_bytes(),
        })
    }
}

fn amd64() -> pb::Platform {
    pb::Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    }
}

fn base_opts() -> ConvertOptions {
    ConvertOptions {
        build_platforms: vec![amd64()],
        local_unique_id: Some("uid".into()),
        ..Default::default()
    }
}

async fn convert_with(df: &str, opts: &ConvertOptions) -> Result<Converted, ConvertError> {
    dockerfile_to_llb(df.as_bytes(), opts, &FakeResolver::new()).await
}

async fn convert(df: &str) -> Converted {
    convert_with(df, &base_opts()).await.unwrap()
}

async fn error(df: &str) -> String {
    convert_with(df, &base_opts())
        .await
        .unwrap_err()
        .to_string()
}

/// The ops of a conversion with their metadata, terminal excluded.
struct Ops {
    ops: Vec<(String, pb::Op, pb::OpMetadata)>,
    def: pb::Definition,
}

impl Ops {
    fn of(c: &Converted) -> Ops {
        let decoded = kiln_proto::decode_ops(&c.definition).unwrap();
        let n = decoded.len();
        let ops = decoded
            .into_iter()
            .take(n - 1)
            .map(|o| {
                let md = c.definition.metadata[o.digest.as_str()].clone();
                (o.digest.to_string(), o.op, md)
            })
            .collect();
        Ops {
            ops,
            def: c.definition.clone(),
        }
    }

    fn named(&self, name: &str) -> (&pb::Op, &pb::OpMetadata) {
        self.ops
            .iter()
            .find(|(_, _, md)| {
                md.description
                    .get("llb.customname")
                    .is_some_and(|n| n == name)
            })
            .map(|(_, op, md)| (op, md))
            .unwrap_or_else(|| panic!("no op named {name:?} in {:#?}", self.names()))
    }

    fn names(&self) -> Vec<String> {
        self.ops
            .iter()
            .map(|(_, _, md)| {
                md.description
                    .get("llb.customname")
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }

    fn exec(&self, name: &str) -> (&pb::Op, &pb::ExecOp, &pb::OpMetadata) {
        let (op, md) = self.named(name);
        let Some(pb::op::Op::Exec(e)) = &op.op else {
            panic!("{name} is not an exec")
        };
        (op, e, md)
    }

    fn file(&self, name: &str) -> (&pb::Op, &pb::FileOp, &pb::OpMetadata) {
        let (op, md) = self.named(name);
        let Some(pb::op::Op::File(f)) = &op.op else {
            panic!("{name} is not a file op")
        };
        (op, f, md)
    }

    fn sources(&self) -> Vec<(&pb::Op, &pb::SourceOp, &pb::OpMetadata)> {
        self.ops
            .iter()
            .filter_map(|(_, op, md)| match &op.op {
                Some(pb::op::Op::Source(s)) => Some((op, s, md)),
                _ => None,
            })
            .collect()
    }

    fn source(&self, prefix: &str) -> (&pb::Op, &pb::SourceOp, &pb::OpMetadata) {
        self.sources()
            .into_iter()
            .find(|(_, s, _)| s.identifier.starts_with(prefix))
            .unwrap_or_else(|| panic!("no source {prefix}"))
    }

    fn digest_of(&self, op: &pb::Op) -> String {
        self.ops
            .iter()
            .find(|(_, o, _)| o == op)
            .map(|(d, _, _)| d.clone())
            .unwrap()
    }

    fn terminal_caps(&self) -> Vec<String> {
        let decoded = kiln_proto::decode_ops(&self.def).unwrap();
        let last = decoded.last().unwrap();
        self.def.metadata[last.digest.as_str()]
            .caps
            .keys()
            .cloned()
            .collect()
    }
}

fn caps(md: &pb::OpMetadata) -> Vec<&str> {
    md.caps.keys().map(String::as_str).collect()
}

fn history(c: &Converted) -> Vec<String> {
    c.image
        .history
        .iter()
        .map(|h| h.created_by.clone())
        .collect()
}

fn copy_action(f: &pb::FileOp, i: usize) -> &pb::FileActionCopy {
    match &f.actions[i].action {
        Some(pb::file_action::Action::Copy(c)) => c,
        other => panic!("not a copy: {other:?}"),
    }
}

#[tokio::test]
async fn base_image_config_seeds_env_workdir_and_user() {
    let c = convert("FROM alpine\nRUN id\n").await;
    let ops = Ops::of(&c);
    let (src_op, src, md) = ops.source("docker-image://");
    assert_eq!(
        src.identifier,
        format!("docker-image://docker.io/library/alpine:latest@{ALPINE_DIGEST}")
    );
    assert_eq!(src_op.platform.as_ref().unwrap().architecture, "amd64");
    assert_eq!(
        md.description["com.docker.dockerfile.v1.command"],
        "FROM alpine"
    );
    let (_, exec, _) = ops.exec("[2/2] RUN id");
    let meta = exec.meta.as_ref().unwrap();
    assert_eq!(meta.env, vec!["PATH=/usr/bin:/bin"]);
    assert_eq!(meta.cwd, "/home");
    assert_eq!(meta.user, "app");
    // The base's history is kept (with its timestamp), the new entry has none.
    assert_eq!(
        c.image.history[0].created.as_deref(),
        Some("2020-01-01T00:00:00Z")
    );
    assert_eq!(c.image.history[1].created, None);
    assert_eq!(c.image.config.working_dir, "/home");
    assert_eq!(c.image.config.on_build, None);
}

#[tokio::test]
async fn args_env_and_history() {
    let df = "ARG VERSION=1.0\nARG BASE=alpine\nFROM ${BASE}\nARG VERSION\nARG OTHER=x\nENV E=$VERSION PATH=/opt:$PATH\nRUN echo $VERSION $NOPE\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let (_, exec, _) = ops.exec("[2/2] RUN echo 1.0 $NOPE");
    // ARG values are in the RUN environment; ENV replaces PATH at the end of the list.
    assert_eq!(
        exec.meta.as_ref().unwrap().env,
        vec!["VERSION=1.0", "OTHER=x", "E=1.0", "PATH=/opt:/usr/bin:/bin"]
    );
    // The image env keeps PATH in place and has no ARGs.
    assert_eq!(c.image.config.env, vec!["PATH=/opt:/usr/bin:/bin", "E=1.0"]);
    assert_eq!(
        &history(&c)[1..],
        [
            "ARG VERSION",
            "ARG OTHER=x",
            "ENV E=1.0 PATH=/opt:/usr/bin:/bin",
            "RUN |2 VERSION=1.0 OTHER=x /bin/sh -c echo $VERSION $NOPE # buildkit",
        ]
    );
    let mut opts = base_opts();
    opts.build_args.insert("VERSION".into(), "2.0".into());
    opts.build_args.insert("UNDECLARED".into(), "z".into());
    let c = convert_with(df, &opts).await.unwrap();
    let ops = Ops::of(&c);
    let (_, exec, _) = ops.exec("[2/2] RUN echo 2.0 $NOPE");
    assert!(
        !exec
            .meta
            .as_ref()
            .unwrap()
            .env
            .iter()
            .any(|e| e.starts_with("UNDECLARED"))
    );
}

#[tokio::test]
async fn platform_args_and_cross_builds() {
    let df = "FROM --platform=$BUILDPLATFORM alpine AS build\nARG TARGETPLATFORM\nARG BUILDARCH\nRUN echo $TARGETPLATFORM $BUILDARCH\nFROM alpine\nCOPY --from=build /x /x\n";
    let arm64 = pb::Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        ..Default::default()
    };
    let mut opts = base_opts();
    opts.target_platform = Some(arm64.clone());
    opts.prefix_platform = true;
    let resolver = FakeResolver::new();
    let c = dockerfile_to_llb(df.as_bytes(), &opts, &resolver)
        .await
        .unwrap();
    let calls = resolver.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(calls.contains(&("docker.io/library/alpine:latest".into(), amd64())));
    assert!(calls.contains(&("docker.io/library/alpine:latest".into(), arm64.clone())));
    let ops = Ops::of(&c);
    let (op, exec, _) = ops.exec("[linux/amd64->arm64 build 2/2] RUN echo linux/arm64 amd64");
    assert_eq!(op.platform.as_ref().unwrap().architecture, "amd64");
    let env = &exec.meta.as_ref().unwrap().env;
    assert!(env.contains(&"TARGETPLATFORM=linux/arm64".to_owned()));
    assert!(env.contains(&"BUILDARCH=amd64".to_owned()));
    let (copy_op, _, _) = ops.file("[linux/arm64 stage-1 2/2] COPY --from=build /x /x");
    assert_eq!(copy_op.platform.as_ref().unwrap().architecture, "arm64");
    // An explicit target platform is written into the image config.
    assert_eq!(c.image.architecture, "arm64");
}

#[tokio::test]
async fn copy_flags() {
    let df = "FROM alpine\nCOPY --chown=app:1000 --chmod=640 a /dst/\nCOPY --chmod=u+x --chown=7 b c/\nCOPY --link --chmod=755 d /e\nCOPY . .\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let (op, f, md) = ops.file("[2/5] COPY --chown=app:1000 --chmod=640 a /dst/");
    let copy = copy_action(f, 0);
    assert_eq!(copy.mode, 0o640);
    assert_eq!(copy.dest, "/dst/");
    let owner = copy.owner.as_ref().unwrap();
    assert_eq!(
        owner.user.as_ref().unwrap().user,
        Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
            name: "app".into(),
            input: 0
        }))
    );
    assert_eq!(
        owner.group.as_ref().unwrap().user,
        Some(pb::user_opt::User::ById(1000))
    );
    assert_eq!(caps(md), vec!["file.base"]);
    assert_eq!(op.inputs.len(), 2);
    // An invalid octal mode is ignored; the destination is relative to the workdir.
    let (_, f, _) = ops.file("[3/5] COPY --chmod=u+x --chown=7 b c/");
    let copy = copy_action(f, 0);
    assert_eq!(copy.mode, -1);
    assert_eq!(copy.dest, "/home/c/");
    assert_eq!(
        copy.owner.as_ref().unwrap().user.as_ref().unwrap().user,
        Some(pb::user_opt::User::ById(7))
    );
    assert!(copy.owner.as_ref().unwrap().group.is_none());
    // --link with --chmod falls back to a plain copy.
    let (_, f, _) = ops.file("[4/5] COPY --link --chmod=755 d /e");
    assert_eq!(copy_action(f, 0).mode, 0o755);
    let (_, f, _) = ops.file("[5/5] COPY . .");
    let copy = copy_action(f, 0);
    assert_eq!((copy.src.as_str(), copy.dest.as_str()), ("/", "/home/"));
    // "." as a source puts the whole context in scope: no follow paths.
    let (_, local, _) = ops.source("local://context");
    assert!(!local.attrs.contains_key("local.followpaths"));
    assert_eq!(
        &history(&c)[1..],
        [
            "COPY a /dst/ # buildkit",
            "COPY b c/ # buildkit",
            "COPY d /e # buildkit",
            "COPY . . # buildkit"
        ]
    );
}

#[tokio::test]
async fn copy_link_from_scratch_stage_needs_no_merge() {
    let c = convert("FROM scratch\nCOPY --link a /a\n").await;
    let ops = Ops::of(&c);
    assert!(
        !ops.ops
            .iter()
            .any(|(_, o, _)| matches!(o.op, Some(pb::op::Op::Merge(_))))
    );
    let (_, f, md) = ops
        .ops
        .iter()
        .find_map(|(_, o, md)| match &o.op {
            Some(pb::op::Op::File(f)) => Some((o, f, md)),
            _ => None,
        })
        .unwrap();
    assert_eq!(f.actions[0].input, -1);
    let pg = md.progress_group.as_ref().unwrap();
    assert_eq!(pg.name, "[1/1] COPY --link a /a");
    assert!(pg.weak);
    assert!(!md.description.contains_key("llb.customname"));
}

#[tokio::test]
async fn add_urls_and_checksums() {
    let sum = format!("sha256:{}", "ab".repeat(32));
    let df = format!(
        "FROM alpine\nADD https://example.com/dl/pkg.tar.gz?x=1 /opt/\nADD --checksum={sum} https://example.com/ /f\n"
    );
    let c = convert(&df).await;
    let ops = Ops::of(&c);
    let (op, src, md) = ops.source("https://example.com/dl");
    assert!(op.platform.is_none());
    assert_eq!(src.attrs["http.filename"], "pkg.tar.gz");
    assert_eq!(md.description["com.docker.dockerfile.v1.command"], "");
    assert_eq!(caps(md), vec!["source.http"]);
    let (_, f, _) = ops.file("[2/3] ADD https://example.com/dl/pkg.tar.gz?x=1 /opt/");
    let copy = copy_action(f, 0);
    assert_eq!(copy.src, "/pkg.tar.gz");
    assert!(!copy.attempt_unpack_docker_compatibility && !copy.follow_symlink);
    assert!(copy.create_dest_path);
    let (_, src, md) = ops
        .sources()
        .into_iter()
        .find(|(_, s, _)| s.identifier == "https://example.com/")
        .unwrap();
    assert_eq!(src.attrs["http.filename"], "__unnamed__");
    assert_eq!(src.attrs["http.checksum"], sum);
    assert_eq!(caps(md), vec!["source.http", "source.http.checksum"]);
    // Remote sources do not scope the context: it is not used at all.
    assert!(
        ops.sources()
            .iter()
            .all(|(_, s, _)| !s.identifier.starts_with("local://"))
    );

    assert_eq!(
        error("FROM alpine\nCOPY https://x/y /y\n").await,
        "source can't be a URL for COPY"
    );
    assert_eq!(
        error(&format!("FROM alpine\nADD --checksum={sum} a /a\n")).await,
        "checksum can't be specified for non-HTTP sources"
    );
    assert_eq!(
        error("FROM alpine\nADD --checksum=md5:x https://x/y /y\n").await,
        "invalid checksum digest format"
    );
    assert_eq!(
        error(&format!(
            "FROM alpine\nCOPY a b\nADD --checksum={sum} https://x/a https://x/b /d/\n"
        ))
        .await,
        "checksum can't be specified for multiple sources"
    );
}

#[tokio::test]
async fn add_git_sources() {
    let df = "FROM alpine\nADD --keep-git-dir https://github.com/moby/buildkit.git#v0.11.6:frontend /src\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let (op, src, md) = ops.source("git://");
    assert!(op.platform.is_none());
    assert_eq!(
        src.identifier,
        "git://github.com/moby/buildkit.git#v0.11.6:frontend"
    );
    let attrs: BTreeMap<&str, &str> = src
        .attrs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        attrs,
        BTreeMap::from([
            ("git.authheadersecret", "GIT_AUTH_HEADER"),
            ("git.authtokensecret", "GIT_AUTH_TOKEN"),
            ("git.fullurl", "https://github.com/moby/buildkit.git"),
            ("git.keepgitdir", "true"),
        ])
    );
    assert_eq!(
        caps(md),
        vec!["source.git", "source.git.fullurl", "source.git.keepgitdir"]
    );
    assert!(md.description.is_empty());
    let (_, f, _) = ops.file(
        "[2/2] ADD --keep-git-dir https://github.com/moby/buildkit.git#v0.11.6:frontend /src",
    );
    let copy = copy_action(f, 0);
    assert_eq!((copy.src.as_str(), copy.dest.as_str()), ("/", "/src"));

    let mut stable = base_opts();
    stable.labs = false;
    assert_eq!(
        convert_with(df, &stable).await.unwrap_err().to_string(),
        "instruction ADD <git ref> requires the labs channel"
    );
    assert_eq!(
        error("FROM alpine\nCOPY git@github.com:a/b.git /b\n").await,
        "source can't be a git ref for COPY"
    );
}

#[tokio::test]
async fn run_mounts() {
    let df = "FROM alpine AS build\nRUN touch /x\nFROM alpine\nWORKDIR /w\nRUN --mount=type=bind,from=build,source=/x,target=/mnt/x --mount=type=bind,target=src,rw --mount=type=cache,target=/c,uid=1,gid=2,mode=0750 --mount=type=secret,id=s,target=/s,required --mount=type=ssh,target=/agent,mode=0644 true\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let name = "[stage-1 3/3] RUN --mount=type=bind,from=build,source=/x,target=/mnt/x --mount=type=bind,target=src,rw --mount=type=cache,target=/c,uid=1,gid=2,mode=0750 --mount=type=secret,id=s,target=/s,required --mount=type=ssh,target=/agent,mode=0644 true";
    let (op, exec, md) = ops.exec(name);
    let m: Vec<(&str, i64, i64, &str, bool, i32)> = exec
        .mounts
        .iter()
        .map(|m| {
            (
                m.dest.as_str(),
                m.input,
                m.output,
                m.selector.as_str(),
                m.readonly,
                m.mount_type,
            )
        })
        .collect();
    assert_eq!(
        m,
        vec![
            ("/", 0, 0, "", false, 0),
            ("/c", 1, -1, "/cache", false, 3),
            ("/mnt/x", 2, -1, "/x", true, 0),
            ("/w/src", 3, -1, "", false, 0),
            ("/s", 0, 0, "", false, 1),
            ("/agent", 0, 0, "", false, 2),
        ]
    );
    assert_eq!(exec.mounts[1].cache_opt.as_ref().unwrap().id, "//c");
    assert_eq!(
        exec.mounts[4].secret_opt,
        Some(pb::SecretOpt {
            id: "s".into(),
            mode: 0o400,
            ..Default::default()
        })
    );
    assert_eq!(
        exec.mounts[5].ssh_opt,
        Some(pb::SshOpt {
            mode: 0o644,
            optional: true,
            ..Default::default()
        })
    );
    assert!(
        exec.meta
            .as_ref()
            .unwrap()
            .env
            .contains(&"SSH_AUTH_SOCK=/agent".to_owned())
    );
    assert_eq!(
        caps(md),
        vec![
            "exec.meta.base",
            "exec.meta.setsdefaultpath",
            "exec.mount.bind",
            "exec.mount.cache",
            "exec.mount.cache.sharing",
            "exec.mount.secret",
            "exec.mount.selector",
            "exec.mount.ssh",
        ]
    );
    // The cache mount's permissions come from a mkdir on scratch.
    let (perm_op, f, _) = ops.file("[internal] settings cache mount permissions");
    assert_eq!(op.inputs[1].digest, ops.digest_of(perm_op));
    let Some(pb::file_action::Action::Mkdir(mkdir)) = &f.actions[0].action else {
        panic!()
    };
    assert_eq!((mkdir.path.as_str(), mkdir.mode), ("/cache", 0o750));
    let owner = mkdir.owner.as_ref().unwrap();
    assert_eq!(
        owner.group.as_ref().unwrap().user,
        Some(pb::user_opt::User::ById(2))
    );
    // A context bind mount without a source puts the whole context in scope.
    let (_, local, _) = ops.source("local://context");
    assert!(!local.attrs.contains_key("local.followpaths"));
}

#[tokio::test]
async fn run_mount_errors() {
    assert_eq!(
        error("FROM alpine\nRUN --mount=type=cache,target=/ true\n").await,
        "invalid mount target \"/\""
    );
    assert_eq!(
        error("FROM alpine\nRUN --mount=type=ssh,src=/x true\n").await,
        "ssh does not support source"
    );
    assert_eq!(
        error("FROM alpine\nARG T=tmpfs\nRUN --mount=type=$T,target=/t,size=1x true\n").await,
        "invalid value for size: 1x"
    );
    // Values are expanded at dispatch.
    let c =
        convert("FROM alpine\nARG T=/tgt\nRUN --mount=type=tmpfs,target=$T,size=1k true\n").await;
    let ops = Ops::of(&c);
    let (_, exec, _) = ops.exec("[stage-0 2/2] RUN --mount=type=tmpfs,target=/tgt,size=1k true");
    assert_eq!(exec.mounts[1].tmpfs_opt, Some(pb::TmpfsOpt { size: 1024 }));
}

#[tokio::test]
async fn run_heredocs() {
    let df = "FROM alpine\nRUN <<EOF\n#!/bin/sh\necho hi\nEOF\nRUN <<-EOF\n\techo $HOME\nEOF\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let (op, exec, _) = ops.exec("[2/3] RUN <<EOF (#!/bin/sh...)");
    assert_eq!(
        exec.meta.as_ref().unwrap().args,
        vec!["/bin/sh", "-c", "/dev/pipes/EOF"]
    );
    let pipes = &exec.mounts[1];
    assert_eq!(
        (
            pipes.dest.as_str(),
            pipes.selector.as_str(),
            pipes.readonly,
            pipes.output
        ),
        ("/dev/pipes/", "/", true, -1)
    );
    let (doc_op, f, _) = ops.file("[internal] preparing inline document");
    assert_eq!(op.inputs[1].digest, ops.digest_of(doc_op));
    let Some(pb::file_action::Action::Mkfile(mkfile)) = &f.actions[0].action else {
        panic!()
    };
    assert_eq!(
        (mkfile.path.as_str(), mkfile.mode, mkfile.data.as_slice()),
        ("/EOF", 0o755, &b"#!/bin/sh\necho hi\n"[..])
    );
    let (_, exec, _) = ops.exec("[3/3] RUN <<-EOF (echo $HOME)");
    assert_eq!(exec.meta.as_ref().unwrap().args[2], "echo $HOME\n");
}

#[tokio::test]
async fn copy_heredocs_expand_unless_quoted() {
    let df = "FROM alpine\nENV WHO=world\nCOPY <<A <<\"B\" /d/\nhello $WHO \"q\"\nA\nraw $WHO\nB\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let data: Vec<Vec<u8>> = ops
        .ops
        .iter()
        .filter_map(|(_, o, _)| match &o.op {
            Some(pb::op::Op::File(f)) => match &f.actions[0].action {
                Some(pb::file_action::Action::Mkfile(m)) => Some(m.data.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert!(data.contains(&b"hello world \"q\"\n".to_vec()));
    assert!(data.contains(&b"raw $WHO\n".to_vec()));
}

#[tokio::test]
async fn workdir_creates_directories_owned_by_the_user() {
    let c = convert("FROM alpine\nUSER 1000:1000\nWORKDIR rel\nWORKDIR /\n").await;
    let ops = Ops::of(&c);
    let (_, f, _) = ops.file("[2/3] WORKDIR rel");
    let Some(pb::file_action::Action::Mkdir(mkdir)) = &f.actions[0].action else {
        panic!()
    };
    assert_eq!(mkdir.path, "/home/rel");
    assert!(mkdir.make_parents);
    assert_eq!(
        mkdir.owner.as_ref().unwrap().user.as_ref().unwrap().user,
        Some(pb::user_opt::User::ById(1000))
    );
    // WORKDIR / makes no op but still a (layer-less) history entry.
    assert_eq!(ops.ops.len(), 2);
    assert_eq!(
        &history(&c)[1..],
        ["USER 1000:1000", "WORKDIR /home/rel", "WORKDIR /"]
    );
    assert!(!c.image.history[2].empty_layer && c.image.history[3].empty_layer);
}

#[tokio::test]
async fn metadata_instructions() {
    let df = "FROM alpine\nSHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nRUN echo hi\nCMD echo cmd\nENTRYPOINT [\"/e\"]\nHEALTHCHECK NONE\nARG P=8080\nEXPOSE $P 9000-9001/udp\nVOLUME /v\nUSER nobody\nSTOPSIGNAL 9\nLABEL a=$P\nONBUILD COPY . /app\n";
    let c = convert(df).await;
    let ops = Ops::of(&c);
    let (_, exec, _) = ops.exec("[2/2] RUN echo hi");
    assert_eq!(
        exec.meta.as_ref().unwrap().args,
        vec!["/bin/bash", "-eu", "-c", "echo hi"]
    );
    let cfg = &c.image.config;
    assert_eq!(cfg.shell, vec!["/bin/bash", "-eu", "-c"]);
    // ENTRYPOINT after CMD in the same stage keeps CMD.
    assert_eq!(cfg.cmd, vec!["/bin/bash", "-eu", "-c", "echo cmd"]);
    assert_eq!(cfg.entrypoint, vec!["/e"]);
    assert!(cfg.args_escaped);
    assert_eq!(cfg.healthcheck.as_ref().unwrap().test, vec!["NONE"]);
    assert_eq!(
        cfg.exposed_ports.iter().collect::<Vec<_>>(),
        vec!["8080/tcp", "9000/udp", "9001/udp"]
    );
    assert_eq!(cfg.user, "nobody");
    assert_eq!(cfg.stop_signal, "9");
    assert_eq!(cfg.labels["a"], "8080");
    assert_eq!(cfg.on_build, Some(vec!["COPY . /app".to_owned()]));
    assert_eq!(
        &history(&c)[1..],
        [
            "SHELL [/bin/bash -eu -c]",
            "RUN /bin/bash -eu -c echo hi # buildkit",
            "CMD [\"/bin/bash\" \"-eu\" \"-c\" \"echo cmd\"]",
            "ENTRYPOINT [\"/e\"]",
            "HEALTHCHECK &{[\"NONE\"] \"0s\" \"0s\" \"0s\" '\\x00'}",
            "ARG P=8080",
            "EXPOSE map[8080/tcp:{} 9000/udp:{} 9001/udp:{}]",
            "VOLUME [/v]",
            "USER nobody",
            "STOPSIGNAL 9",
            "LABEL a=8080",
        ]
    );
    // ENTRYPOINT before any CMD clears an inherited CMD.
    let c = convert("FROM alpine\nENTRYPOINT /e\n").await;
    assert!(c.image.config.cmd.is_empty());
    assert_eq!(c.image.config.entrypoint, vec!["/bin/sh", "-c", "/e"]);
    assert_eq!(
        error("FROM alpine\nSTOPSIGNAL SIGNOPE\n").await,
        "invalid signal: SIGNOPE"
    );
}

#[tokio::test]
async fn onbuild_triggers_run_in_dependent_builds() {
    let c = convert("FROM onbuild\nRUN echo own\n").await;
    let ops = Ops::of(&c);
    let (_, exec, _) = ops.exec("[2/2] RUN echo triggered");
    assert_eq!(
        exec.meta.as_ref().unwrap().args,
        vec!["/bin/sh", "-c", "echo triggered"]
    );
    let (_, exec, _) = ops.exec("[3/2] RUN echo own");
    assert!(exec.meta.as_ref().unwrap().env.contains(&"T=1".to_owned()));
    assert_eq!(c.image.config.on_build, None);
    // Triggers of a stage fire in stages built on it (a stage with nothing to count gets
    // no "[i/n]" prefix).
    let c = convert("FROM alpine AS base\nONBUILD RUN echo from-base\nFROM base\n").await;
    Ops::of(&c).exec("RUN echo from-base");
}

#[tokio::test]
async fn image_without_layers_is_scratch() {
    let c = convert("FROM empty\nRUN true\n").await;
    let ops = Ops::of(&c);
    assert!(ops.sources().is_empty());
    // No FROM op, but FROM still counts: the RUN is 1 of 2.
    let (op, exec, _) = ops.exec("[1/2] RUN true");
    assert!(op.inputs.is_empty());
    assert_eq!(exec.mounts[0].input, -1);
}

#[tokio::test]
async fn scratch_target_without_ops() {
    let c = convert("FROM scratch\nENV A=b\nCMD [\"/app\"]\n").await;
    assert!(c.definition.def.is_empty());
    assert_eq!(c.image.config.working_dir, "/");
    assert_eq!(c.image.config.env[1], "A=b");
    assert_eq!(c.image.os, "linux");
    assert_eq!(c.image.diff_ids, None);
}

#[tokio::test]
async fn stage_errors() {
    assert_eq!(
        error("FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n")
            .await,
        "circular dependency detected on stage: a"
    );
    assert_eq!(
        error("FROM alpine\nCOPY --from=5 /x /x\n").await,
        "invalid stage index 5"
    );
    assert_eq!(
        error("ARG X\nFROM $X\n").await,
        "base name ($X) should not be blank"
    );
    assert_eq!(
        error("FROM Alpine\n").await,
        "failed to parse stage name \"Alpine\": invalid reference format: repository name must be lowercase"
    );
    assert_eq!(
        error("FROM --platform=linux/x! alpine\n").await,
        "failed to parse platform linux/x!: \"x!\" is an invalid component of \"linux/x!\": platform specifier component must match \"^[A-Za-z0-9_-]+$\": invalid argument"
    );
    assert_eq!(
        error("FROM alpine\nRUN <<EOF\nno end\n").await,
        "unterminated heredoc"
    );
    assert_eq!(
        error("FROM nosuch\n").await,
        "nosuch: docker.io/library/nosuch:latest: not found"
    );
    assert_eq!(
        error("FROM alpine AS build\nFROM buidl\n").await,
        "buidl: docker.io/library/buidl:latest: not found (did you mean build?)"
    );
    let mut opts = base_opts();
    opts.target = Some("nope".into());
    assert_eq!(
        convert_with("FROM alpine\n", &opts)
            .await
            .unwrap_err()
            .to_string(),
        "target stage nope could not be found"
    );
    let err = convert_with("FROM alpine\nRUN --mount=type=nope x\n", &base_opts())
        .await
        .unwrap_err();
    assert_eq!(err.location(), vec![(2, 2)]);
    assert_eq!(
        dockerfile_to_llb(b"", &base_opts(), &FakeResolver::new())
            .await
            .unwrap_err()
            .to_string(),
        "the Dockerfile cannot be empty"
    );
}

#[tokio::test]
async fn unused_stages_are_not_resolved_or_built() {
    let resolver = FakeResolver::new();
    let mut opts = base_opts();
    opts.target = Some("a".into());
    let c = dockerfile_to_llb(
        b"FROM alpine AS a\nRUN a\nFROM nosuch AS b\nRUN b\n",
        &opts,
        &resolver,
    )
    .await
    .unwrap();
    assert_eq!(resolver.calls.lock().unwrap().len(), 1);
    Ops::of(&c).exec("[a 2/2] RUN a");
}

#[tokio::test]
async fn context_source_options() {
    let mut opts = base_opts();
    opts.dockerignore = Some(b"# c\n*.md\n!README.md\n/tmp/\n".to_vec());
    opts.session_id = "sess".into();
    opts.context_name = "ctx".into();
    let c = convert_with("FROM alpine\nCOPY b a/ /x/\nADD c.tar /\n", &opts)
        .await
        .unwrap();
    let ops = Ops::of(&c);
    let (_, src, md) = ops.source("local://ctx");
    let attrs: BTreeMap<&str, &str> = src
        .attrs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        attrs,
        BTreeMap::from([
            ("local.excludepatterns", r#"["*.md","!README.md","tmp"]"#),
            ("local.followpaths", r#"["a","b","c.tar"]"#),
            ("local.session", "sess"),
            ("local.sharedkeyhint", "ctx"),
        ])
    );
    assert_eq!(
        caps(md),
        vec![
            "source.local",
            "source.local.excludepatterns",
            "source.local.followpaths",
            "source.local.sessionid",
            "source.local.sharedkeyhint",
        ]
    );
    assert_eq!(
        md.description["llb.customname"],
        "[internal] load build context"
    );
}

#[tokio::test]
async fn exec_options() {
    let mut opts = base_opts();
    opts.ignore_cache = Some(vec![]);
    opts.hostname = "box".into();
    opts.force_network = pb::NetMode::None;
    opts.extra_hosts = vec![("db".into(), "10.0.0.2".parse().unwrap())];
    opts.shm_size = 1 << 20;
    opts.ulimits = vec![pb::Ulimit {
        name: "nofile".into(),
        soft: 1024,
        hard: 2048,
    }];
    opts.cgroup_parent = "kiln".into();
    opts.cache_id_namespace = "ns".into();
    opts.build_args
        .insert("HTTP_PROXY".into(), "http://p:3128".into());
    let c = convert_with(
        "FROM alpine\nRUN --mount=type=cache,target=/c --network=host x\nCOPY a /a\n",
        &opts,
    )
    .await
    .unwrap();
    let ops = Ops::of(&c);
    // The cache mount's implicit `scratch` source counts as a stage, hence the prefix.
    let (_, exec, md) = ops.exec("[stage-0 2/3] RUN --mount=type=cache,target=/c --network=host x");
    let meta = exec.meta.as_ref().unwrap();
    assert_eq!(meta.hostname, "box");
    assert_eq!(meta.cgroup_parent, "kiln");
    assert_eq!(
        meta.extra_hosts,
        vec![pb::HostIp {
            host: "db".into(),
            ip: "10.0.0.2".into()
        }]
    );
    assert_eq!(meta.ulimit.len(), 1);
    assert_eq!(meta.proxy_env.as_ref().unwrap().http_proxy, "http://p:3128");
    assert_eq!(exec.network, pb::NetMode::Host as i32);
    assert_eq!(exec.mounts[1].cache_opt.as_ref().unwrap().id, "ns//c");
    assert_eq!(exec.mounts[2].dest, "/dev/shm");
    assert_eq!(
        exec.mounts[2].tmpfs_opt,
        Some(pb::TmpfsOpt { size: 1 << 20 })
    );
    assert!(md.ignore_cache);
    for cap in [
        "exec.meta.network",
        "exec.meta.proxyenv",
        "exec.meta.ulimit",
        "exec.mount.tmpfs",
        "exec.mount.tmpfs.size",
    ] {
        assert!(md.caps.contains_key(cap), "{cap}");
    }
    let (_, _, md) = ops.file("[stage-0 3/3] COPY a /a");
    assert!(md.ignore_cache);
    assert!(ops.terminal_caps().contains(&"meta.ignorecache".to_owned()));
    // A RUN without --network gets the forced mode.
    let c = convert_with("FROM alpine\nRUN x\n", &opts).await.unwrap();
    let ops = Ops::of(&c);
    assert_eq!(ops.exec("[2/2] RUN x").1.network, pb::NetMode::None as i32);
}

#[tokio::test]
async fn source_map_locations() {
    let mut opts = base_opts();
    opts.source_map = Some(kiln_dockerfile::SourceMapOptions {
        filename: "Dockerfile".into(),
        definition: None,
    });
    let df = "FROM alpine\nRUN a \\\n  b\nCOPY x /x\n";
    let c = convert_with(df, &opts).await.unwrap();
    let source = c.definition.source.as_ref().unwrap();
    assert_eq!(source.infos.len(), 1);
    assert_eq!(source.infos[0].filename, "Dockerfile");
    assert_eq!(source.infos[0].data, df.as_bytes());
    let ops = Ops::of(&c);
    let (exec_op, _, _) = ops.exec("[2/3] RUN a   b");
    let locs = &source.locations[&ops.digest_of(exec_op)].locations;
    let lines: Vec<i32> = locs[0]
        .ranges
        .iter()
        .map(|r| r.start.unwrap().line)
        .collect();
    assert_eq!(lines, vec![2, 3]);
    let (_, src, _) = ops.source("local://");
    let _ = src;
    // The context source has no location.
    let local_digest = ops
        .ops
        .iter()
        .find(|(_, o, _)| matches!(&o.op, Some(pb::op::Op::Source(s)) if s.identifier.starts_with("local://")))
        .unwrap()
        .0
        .clone();
    assert!(source.locations[&local_digest].locations.is_empty());
}

#[tokio::test]
async fn source_date_epoch_stamps_history() {
    let mut opts = base_opts();
    opts.source_date_epoch = Some(0);
    let c = convert_with("FROM alpine\nENV A=1\n", &opts).await.unwrap();
    assert_eq!(
        c.image.history.last().unwrap().created.as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
}

#[tokio::test]
async fn warnings() {
    let c = convert("# syntax=example.com/my/frontend\nFROM alpine\nRUN a \\\n\n b\n").await;
    assert_eq!(c.warnings.len(), 2);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.short.contains("example.com/my/frontend"))
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.short.starts_with("Empty continuation line"))
    );
    let c = convert("# syntax=docker/dockerfile:1.5\nFROM alpine\n").await;
    assert!(c.warnings.is_empty());
}

#[tokio::test]
async fn name_width_follows_the_command_count() {
    let mut df = "FROM alpine\n".to_owned();
    for i in 0..9 {
        df.push_str(&format!("RUN echo {i}\n"));
    }
    let c = convert(&df).await;
    let ops = Ops::of(&c);
    ops.exec("[ 2/10] RUN echo 0");
    ops.exec("[10/10] RUN echo 8");
}

#[tokio::test]
async fn build_context_can_be_replaced() {
    let mut opts = base_opts();
    opts.build_context = Some(kiln_llb::git(
        "https://github.com/moby/buildkit.git",
        "v0.11.6",
        &Default::default(),
        kiln_llb::Constraints::new(),
    ));
    let c = convert_with("FROM alpine\nCOPY README.md /\n", &opts)
        .await
        .unwrap();
    let ops = Ops::of(&c);
    assert!(
        ops.sources()
            .iter()
            .all(|(_, s, _)| !s.identifier.starts_with("local://"))
    );
    let (_, src, _) = ops.source("git://");
    assert_eq!(src.identifier, "git://github.com/moby/buildkit.git#v0.11.6");
    let (_, f, _) = ops.file("[2/2] COPY README.md /");
    assert_eq!(copy_action(f, 0).src, "/README.md");
}

#[tokio::test]
async fn link_copy_from_a_trigger_in_a_stage_without_counted_commands() {
    let c = convert("FROM alpine AS base\nONBUILD COPY --link a /a\nFROM base\n").await;
    let ops = Ops::of(&c);
    let (merge, md) = ops.named("LINK COPY --link a /a");
    assert!(matches!(merge.op, Some(pb::op::Op::Merge(_))));
    assert_eq!(md.progress_group.as_ref().unwrap().name, "COPY --link a /a");
}

#[tokio::test]
async fn empty_exec_form_fails_at_marshal() {
    assert_eq!(
        error("FROM alpine\nRUN []\n").await,
        "failed to marshal LLB definition: arguments are required"
    );
}

#[tokio::test]
async fn bad_trigger_in_a_base_image_reports_the_bare_message() {
    struct Bad;
    #[async_trait::async_trait]
    impl ImageMetaResolver for Bad {
        async fn resolve_image_config(
            &self,
            _: &str,
            _: &ResolveImageConfigOptions,
        ) -> Result<ResolvedImageConfig, String> {
            Ok(ResolvedImageConfig {
                digest: None,
                config: br#"{"os":"linux","architecture":"amd64","rootfs":{"diff_ids":["sha256:aa"]},"config":{"OnBuild":["FROBNICATE x"]}}"#.to_vec(),
            })
        }
    }
    let err = dockerfile_to_llb(b"FROM img\n", &base_opts(), &Bad)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown instruction: FROBNICATE");
    assert_eq!(err.location(), vec![(1, 1)]);
}
