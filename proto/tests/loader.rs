//! Each loader error of ../shared/spec/definition-loading.md, in BuildKit's words, plus
//! kiln's additions (dangling inputs, unknown enums), and builder round-trips.

use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, FileActions, default_copy};
use kiln_proto::encode::GogoEncode;
use kiln_proto::{Digest, Entitlements, LoadOptions, OpKind, decode_definition, load, pb};

fn encode(op: &pb::Op) -> Vec<u8> {
    op.gogo_encode()
}

fn digest(op: &pb::Op) -> String {
    Digest::of(&encode(op)).as_str().to_owned()
}

fn image(name: &str) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: format!("docker-image://docker.io/library/{name}:latest"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn terminal(input: &pb::Op, index: i64) -> pb::Op {
    pb::Op {
        inputs: vec![pb::Input {
            digest: digest(input),
            index,
        }],
        ..Default::default()
    }
}

fn exec_on(input: &pb::Op, exec: pb::ExecOp) -> pb::Op {
    pb::Op {
        inputs: vec![pb::Input {
            digest: digest(input),
            index: 0,
        }],
        op: Some(pb::op::Op::Exec(exec)),
        ..Default::default()
    }
}

fn good_exec() -> pb::ExecOp {
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["true".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn definition(ops: &[&pb::Op]) -> pb::Definition {
    pb::Definition {
        def: ops.iter().map(|op| encode(op)).collect(),
        ..Default::default()
    }
}

fn load_err(def: &pb::Definition) -> String {
    load(def, &LoadOptions::default())
        .map(|_| ())
        .expect_err("load must fail")
        .to_string()
}

#[test]
fn empty_definition() {
    assert_eq!(
        load_err(&pb::Definition::default()),
        "invalid empty definition"
    );
}

#[test]
fn undecodable_op() {
    let def = pb::Definition {
        def: vec![vec![0xff, 0xff, 0xff]],
        ..Default::default()
    };
    assert!(load_err(&def).starts_with("failed to parse llb proto op: "));
}

#[test]
fn garbage_definition_bytes() {
    let err = decode_definition(b"\x0a\xff\xff\xff\xff\x0f").expect_err("garbage");
    assert!(
        err.to_string().starts_with("failed to parse definition: "),
        "{err}"
    );
}

#[test]
fn single_op_and_same_op_twice() {
    let src = image("busybox");
    assert_eq!(
        load_err(&definition(&[&src])),
        "invalid LLB with 1 vertexes"
    );
    assert_eq!(
        load_err(&definition(&[&src, &src])),
        "invalid LLB with 1 vertexes"
    );
}

#[test]
fn dangling_input_is_an_error_not_a_crash() {
    let src = image("busybox");
    let mut exec = exec_on(&src, good_exec());
    exec.inputs[0].digest =
        "sha256:0000000000000000000000000000000000000000000000000000000000000000".into();
    let def = definition(&[&src, &exec, &terminal(&exec, 0)]);
    assert_eq!(
        load_err(&def),
        "invalid missing input digest sha256:0000000000000000000000000000000000000000000000000000000000000000"
    );
}

#[test]
fn terminal_without_inputs() {
    let a = image("a");
    let b = image("b");
    assert_eq!(
        load_err(&definition(&[&a, &b])),
        "invalid LLB with no inputs on last vertex"
    );
}

#[test]
fn terminal_body_and_extra_inputs_are_ignored() {
    // The last element is the terminal whatever it is; only its first input counts.
    let a = image("a");
    let b = image("b");
    let exec = pb::Op {
        inputs: vec![
            pb::Input {
                digest: digest(&a),
                index: 3,
            },
            pb::Input {
                digest: digest(&b),
                index: 0,
            },
        ],
        op: Some(pb::op::Op::Exec(pb::ExecOp::default())),
        ..Default::default()
    };
    let graph = load(&definition(&[&a, &b, &exec]), &LoadOptions::default()).expect("load");
    assert_eq!(graph.vertices().len(), 1);
    assert_eq!(
        graph.vertex(graph.target().vertex).digest.as_str(),
        digest(&a)
    );
    assert_eq!(
        graph.target().index,
        3,
        "the index is not checked at load time"
    );
}

fn with_exec(exec: pb::ExecOp) -> String {
    let src = image("busybox");
    let op = exec_on(&src, exec);
    load_err(&definition(&[&src, &op, &terminal(&op, 0)]))
}

#[test]
fn exec_validation_errors_in_order() {
    let no_meta = pb::ExecOp {
        meta: None,
        ..good_exec()
    };
    assert!(with_exec(no_meta).starts_with("invalid exec op with no meta (op sha256:"));

    let mut no_args = good_exec();
    if let Some(meta) = no_args.meta.as_mut() {
        meta.args.clear();
    }
    no_args.mounts.clear(); // no args is reported before no mounts
    assert!(with_exec(no_args).starts_with("invalid exec op with no args"));

    let mut no_mounts = good_exec();
    no_mounts.mounts.clear();
    assert!(with_exec(no_mounts).starts_with("invalid exec op with no mounts"));

    let mut no_root = good_exec();
    no_root.mounts[0].dest = "/.".into();
    assert!(with_exec(no_root).starts_with("invalid exec op with no rootfs"));
}

#[test]
fn file_op_without_actions() {
    let src = image("busybox");
    let op = pb::Op {
        inputs: vec![pb::Input {
            digest: digest(&src),
            index: 0,
        }],
        op: Some(pb::op::Op::File(pb::FileOp::default())),
        ..Default::default()
    };
    assert!(
        load_err(&definition(&[&src, &op, &terminal(&op, 0)]))
            .starts_with("invalid file op with no actions")
    );
}

#[test]
fn unknown_enum_values_name_the_op_and_field() {
    type Mutation = Box<dyn Fn(&mut pb::ExecOp)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|e| e.network = 42),
            "exec.network has unknown value 42",
        ),
        (
            Box::new(|e| e.security = 99),
            "exec.security has unknown value 99",
        ),
        (
            Box::new(|e| e.mounts[0].mount_type = 7),
            "exec.mounts[0].mountType has unknown value 7",
        ),
        (
            Box::new(|e| {
                e.mounts.push(pb::Mount {
                    input: -1,
                    output: -1,
                    dest: "/c".into(),
                    mount_type: 3,
                    cache_opt: Some(pb::CacheOpt {
                        id: "x".into(),
                        sharing: 5,
                    }),
                    ..Default::default()
                })
            }),
            "exec.mounts[1].cacheOpt.sharing has unknown value 5",
        ),
    ];
    for (mutate, want) in cases {
        let mut exec = good_exec();
        mutate(&mut exec);
        let err = with_exec(exec);
        assert!(err.starts_with("op sha256:"), "{err}");
        assert!(err.ends_with(want), "{err} should end with {want}");
    }
}

#[test]
fn unknown_file_action_is_rejected() {
    let src = image("busybox");
    let op = pb::Op {
        inputs: vec![pb::Input {
            digest: digest(&src),
            index: 0,
        }],
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![pb::FileAction {
                input: 0,
                secondary_input: -1,
                output: 0,
                action: None,
            }],
        })),
        ..Default::default()
    };
    let err = load_err(&definition(&[&src, &op, &terminal(&op, 0)]));
    assert!(
        err.ends_with("file.actions[0] has an unknown action type"),
        "{err}"
    );
}

#[test]
fn entitlements_are_enforced() {
    let mut host = good_exec();
    host.network = pb::NetMode::Host as i32;
    assert_eq!(with_exec(host.clone()), "network.host is not allowed");
    let mut insecure = good_exec();
    insecure.security = pb::SecurityMode::Insecure as i32;
    assert_eq!(
        with_exec(insecure.clone()),
        "security.insecure is not allowed"
    );

    let src = image("busybox");
    let op = exec_on(&src, host);
    let allowed = LoadOptions {
        entitlements: Entitlements {
            network_host: true,
            security_insecure: false,
        },
        ..Default::default()
    };
    assert!(load(&definition(&[&src, &op, &terminal(&op, 0)]), &allowed).is_ok());
}

#[test]
fn unknown_capability() {
    let src = image("busybox");
    let op = exec_on(&src, good_exec());
    let mut def = definition(&[&src, &op, &terminal(&op, 0)]);
    let mut md = pb::OpMetadata::default();
    md.caps.insert("exec.meta.base".into(), true);
    md.caps.insert("exec.teleport".into(), false);
    def.metadata.insert(digest(&op), md);
    assert_eq!(load_err(&def), "unknown API capability exec.teleport");
}

#[test]
fn unreachable_ops_are_not_validated_and_op_without_body_is_named_unknown() {
    let src = image("busybox");
    let broken = pb::Op {
        op: Some(pb::op::Op::Exec(pb::ExecOp::default())),
        ..Default::default()
    };
    let bodyless = pb::Op {
        inputs: vec![pb::Input {
            digest: digest(&src),
            index: 0,
        }],
        ..Default::default()
    };
    let def = definition(&[&src, &broken, &bodyless, &terminal(&bodyless, 0)]);
    let graph = load(&def, &LoadOptions::default()).expect("load");
    assert_eq!(graph.vertices().len(), 2);
    let target = graph.vertex(graph.target().vertex);
    assert_eq!(target.name, "unknown");
    assert_eq!(target.kind(), OpKind::Unknown);
}

#[test]
fn metadata_options_custom_name_and_platform_normalisation() {
    let mut src = image("busybox");
    src.platform = Some(pb::Platform {
        os: "Linux".into(),
        architecture: "aarch64".into(),
        variant: "8".into(),
        os_version: "1".into(),
        ..Default::default()
    });
    let op = exec_on(&src, good_exec());
    let mut def = definition(&[&src, &op, &terminal(&op, 0)]);
    let mut md = pb::OpMetadata {
        ignore_cache: true,
        export_cache: Some(pb::ExportCache { value: false }),
        ..Default::default()
    };
    md.description
        .insert("llb.customname".into(), "[1/2] RUN true".into());
    def.metadata.insert(digest(&op), md);
    let graph = load(&def, &LoadOptions::default()).expect("load");
    let exec = graph.vertex(graph.target().vertex);
    assert_eq!(exec.name, "[1/2] RUN true");
    assert!(exec.options.ignore_cache);
    assert_eq!(exec.options.export_cache, Some(false));
    let source = graph.vertex(exec.inputs[0].vertex);
    let platform = source.platform().expect("platform");
    assert_eq!(
        (
            platform.os.as_str(),
            platform.architecture.as_str(),
            platform.variant.as_str()
        ),
        ("linux", "arm64", "")
    );
    assert!(platform.os_version.is_empty());
    assert_eq!(
        source.name,
        "docker-image://docker.io/library/busybox:latest"
    );
}

#[test]
fn builder_output_loads_and_round_trips() {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = b.image("localhost:5000/busybox:latest");
    let files = b.file(
        FileActions::on(None)
            .mkdir("/out", 0o755, false)
            .mkfile("/out/a", 0o644, b"a\n"),
    );
    let exec = b.exec(
        &Exec::new(Some(base.clone()), &["sh", "-c", "cp /in/out/a /out/b"])
            .mount(ExecMount::bind("/out", None))
            .mount(ExecMount::bind("/in", Some(files.clone())).readonly())
            .mount(ExecMount::cache(
                "/cache",
                "c1",
                pb::CacheSharingOpt::Locked,
            ))
            .mount(ExecMount::tmpfs("/tmp", 1 << 20))
            .mount(ExecMount::secret("/run/secrets/s", "s", 0o400, true)),
    );
    let out = exec.output("/out").expect("/out output");
    assert_eq!(out.index, 1, "root is output 0, /out output 1");
    let copy = b.file(FileActions::on(Some(base)).copy(out, "/b", "/b", default_copy()));
    let def = b.finish(&copy);

    let bytes = def.gogo_encode();
    let decoded = decode_definition(&bytes).expect("decode");
    assert_eq!(decoded, def);
    assert_eq!(decoded.gogo_encode(), bytes);
    let graph = load(&decoded, &LoadOptions::default()).expect("load");
    assert_eq!(graph.vertices().len(), 4);
    let exec_vertex = graph.vertex(graph.find(&exec.digest).expect("exec vertex"));
    let Some(pb::op::Op::Exec(e)) = &exec_vertex.op.op else {
        panic!("not an exec")
    };
    let dests: Vec<_> = e
        .mounts
        .iter()
        .map(|m| (m.dest.as_str(), m.input, m.output))
        .collect();
    assert_eq!(
        dests,
        vec![
            ("/", 0, 0),
            ("/cache", -1, -1),
            ("/in", 1, -1),
            ("/out", -1, 1),
            ("/tmp", -1, -1),
            ("/run/secrets/s", 0, 0),
        ]
    );
    // Same input twice is one input; building again gives identical bytes.
    let mut b2 = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base2 = b2.image("localhost:5000/busybox:latest");
    let e2 = b2.exec(
        &Exec::new(Some(base2.clone()), &["true"])
            .mount(ExecMount::bind("/a", Some(base2.clone())).readonly())
            .mount(ExecMount::bind("/b", Some(base2)).readonly()),
    );
    let def2 = b2.finish(&e2.root().expect("root"));
    let graph2 = load(&def2, &LoadOptions::default()).expect("load");
    assert_eq!(graph2.vertex(graph2.target().vertex).inputs.len(), 1);
}
