//! BuildKit-layer escapes (part A.2): the stub cleaner, entitlements through every entry
//! point, malformed and unknown messages, IDs from the Definition, and selectors that
//! try to leave their snapshot.

use anyhow::ensure;
use kiln_proto::builder::{DefinitionBuilder, ExecMount};
use kiln_proto::encode::GogoEncode as _;
use kiln_proto::pb;
use prost::Message as _;

use crate::harness::{CANARY_SECRET, base, graph, one_step, plant_symlink, sh, with_host};

/// CVE-2024-23652: the mount stub cleaner must not follow a symlink the step planted in
/// place of a stub's parent (`/a` → the host directory holding `b/c`).
pub fn cve_2024_23652_stub_cleaner() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let hostdir = host.dir().display().to_string();
        for dest in ["/a/b/c", "/a/b", "/x/a/b/c"] {
            let top = format!(
                "/{}",
                dest.trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("a")
            );
            let script = format!(
                "cd /; umount -l {dest} 2>/dev/null; rm -rf {top} 2>/dev/null; \
                 mv {top} /moved 2>/dev/null; ln -sfn {hostdir} {top} 2>/dev/null; \
                 ln -sfn {hostdir} /a; true"
            );
            let _ = kiln.build_step(&script, |e| e.mount(ExecMount::tmpfs(dest, 0)), &[])?;
            // The same with the step's command itself replacing the parent while a second
            // mount keeps it busy.
            let _ = kiln.build_step(
                &format!("rm -rf /a/b 2>/dev/null; ln -sfn {hostdir}/b /a/b 2>/dev/null; true"),
                |e| {
                    e.mount(ExecMount::tmpfs("/a/b/c", 0))
                        .mount(ExecMount::tmpfs("/a/d", 0))
                },
                &[],
            )?;
            host.untouched()?;
        }
        // kiln run cleans its stubs the same way.
        let script = format!("rm -rf /q 2>/dev/null; ln -sfn {hostdir} /q; true");
        let _ = kiln.run(&[
            "--mount",
            "type=tmpfs,target=/q/b/c",
            "--",
            "sh",
            "-c",
            &script,
        ])?;
        Ok(())
    })
}

fn exec_with(network: i32, security: i32) -> Vec<u8> {
    // Through the builder, then the enum fields overwritten with raw values, as a hostile
    // client would send them.
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let base = base(&mut b);
    let mut exec = sh(Some(base), "echo ran > /result");
    exec.network = pb::NetMode::Host;
    exec.security = pb::SecurityMode::Insecure;
    let root = b.exec(&exec).root().expect("root");
    let mut def = b.finish(&root);
    // Ops come in dependency order: re-encode each, pointing inputs at the new digests.
    let mut renamed = std::collections::HashMap::new();
    for bytes in &mut def.def {
        let old = kiln_proto::Digest::of(bytes).as_str().to_owned();
        let mut op = pb::Op::decode(bytes.as_slice()).expect("builder ops decode");
        for input in &mut op.inputs {
            if let Some(new) = renamed.get(&input.digest) {
                input.digest = String::clone(new);
            }
        }
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.network = network;
            e.security = security;
        }
        *bytes = op.gogo_encode();
        renamed.insert(old, kiln_proto::Digest::of(bytes).as_str().to_owned());
    }
    let metadata = std::mem::take(&mut def.metadata);
    def.metadata = metadata
        .into_iter()
        .map(|(digest, m)| (renamed.get(&digest).cloned().unwrap_or(digest), m))
        .collect();
    def.gogo_encode()
}

/// CVE-2024-23653 and BuildKit 64bbec89c: host networking and insecure steps only with
/// their entitlement, through every entry point (`kiln build` from a file and from
/// standard input, with `--no-cache`, with the other entitlement granted), one error
/// text; unknown enum values are refused, never taken as "not sandbox".
pub fn cve_2024_23653_entitlements() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let host = pb::NetMode::Host as i32;
        let insecure = pb::SecurityMode::Insecure as i32;
        let sandbox = pb::SecurityMode::Sandbox as i32;
        let unset = pb::NetMode::Unset as i32;
        let file = kiln.work().join("def.pb");
        let cases: Vec<(Vec<u8>, Vec<&str>, &str)> = vec![
            (
                exec_with(host, sandbox),
                vec![],
                "network.host is not allowed",
            ),
            (
                exec_with(unset, insecure),
                vec![],
                "security.insecure is not allowed",
            ),
            (
                exec_with(host, sandbox),
                vec!["--no-cache"],
                "network.host is not allowed",
            ),
            (
                exec_with(host, insecure),
                vec!["--allow", "network.host"],
                "security.insecure is not allowed",
            ),
            (
                exec_with(host, insecure),
                vec!["--allow", "security.insecure"],
                "network.host is not allowed",
            ),
            (exec_with(42, sandbox), vec![], "unknown"),
            (exec_with(unset, 99), vec![], "unknown"),
            (
                exec_with(unset, 99),
                vec!["--allow", "security.insecure", "--allow", "network.host"],
                "unknown",
            ),
            (exec_with(-1, -1), vec![], "unknown"),
        ];
        for (def, extra, want) in cases {
            std::fs::write(&file, &def)?;
            let from_stdin = kiln.build(&def, &extra)?;
            let mut args = extra.clone();
            let path = file.display().to_string();
            args.push(&path);
            let from_file = kiln.build(b"", &args)?;
            for (how, out) in [("stdin", &from_stdin), ("file", &from_file)] {
                ensure!(
                    out.code == Some(1) && out.error_line().contains(want),
                    "{how} {extra:?}: want {want:?}, got {:?}: {}",
                    out.code,
                    out.stderr
                );
                ensure!(
                    !out.stderr.contains("#2 "),
                    "{how} {extra:?}: a step started: {}",
                    out.stderr
                );
            }
            ensure!(
                from_stdin.error_line() == from_file.error_line(),
                "one error for both entry points: {:?} vs {:?}",
                from_stdin.error_line(),
                from_file.error_line()
            );
        }
        // kiln run's flags take only the known modes.
        for (flag, value) in [("--network", "bogus"), ("--security", "bogus")] {
            let out = kiln.run(&[flag, value, "--", "true"])?;
            ensure!(
                out.code == Some(1),
                "kiln run {flag} {value}: {:?}",
                out.code
            );
        }
        Ok(())
    })
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Definitions with missing, empty or dangling parts, as a hostile client sends them.
fn malformed_definitions() -> Vec<(String, Vec<u8>)> {
    let (valid, _) = one_step("true", |e| e);
    let def = pb::Definition::decode(valid.as_slice()).expect("valid definition");
    let mut out = Vec::new();
    let mut push = |name: &str, d: &pb::Definition| out.push((name.to_owned(), d.gogo_encode()));
    let mut each_exec = |name: &str, change: &dyn Fn(&mut pb::Op)| {
        let mut d = def.clone();
        for bytes in &mut d.def {
            let mut op = pb::Op::decode(bytes.as_slice()).expect("op");
            if matches!(op.op, Some(pb::op::Op::Exec(_))) {
                change(&mut op);
                *bytes = op.gogo_encode();
            }
        }
        push(name, &d);
    };
    each_exec("exec without meta", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.meta = None;
        }
    });
    each_exec("exec without args", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            if let Some(m) = &mut e.meta {
                m.args.clear();
            }
        }
    });
    each_exec("exec without mounts", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts.clear();
        }
    });
    each_exec("mount input out of range", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts[0].input = 7;
        }
    });
    each_exec("mount output out of range", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts[0].output = 1 << 40;
        }
    });
    each_exec("cache mount without options", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts.push(pb::Mount {
                dest: "/c".into(),
                input: -1,
                output: -1,
                mount_type: pb::MountType::Cache as i32,
                ..Default::default()
            });
        }
    });
    each_exec("unknown mount type", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts[0].mount_type = 77;
        }
    });
    each_exec("secret without options", &|op| {
        if let Some(pb::op::Op::Exec(e)) = &mut op.op {
            e.mounts.push(pb::Mount {
                dest: "/s".into(),
                mount_type: pb::MountType::Secret as i32,
                ..Default::default()
            });
        }
    });
    each_exec("input digest garbage", &|op| {
        for input in &mut op.inputs {
            input.digest = "sha256:zz".into();
        }
    });
    each_exec("op without body", &|op| op.op = None);
    let mut d = def.clone();
    d.def.clear();
    push("empty definition", &d);
    let mut d = def.clone();
    d.def.push(Vec::new());
    push("empty op", &d);
    let mut d = def.clone();
    d.def.insert(0, vec![0xff; 64]);
    push("garbage op", &d);
    let mut d = def.clone();
    let last = d.def.len() - 1;
    let dup = d.def[last].clone();
    d.def.push(dup);
    push("duplicate target", &d);
    // Random mutations of the valid bytes.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..150 {
        let mut bytes = valid.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => {
                    bytes.truncate(at);
                }
                _ => bytes.insert(at, rng.next() as u8),
            }
        }
        out.push((format!("mutation {i}"), bytes));
    }
    out
}

/// CVE-2024-23650: malformed messages never panic, hang or half-run kiln: every one ends
/// with a one-line error (or a clean build), through `kiln build` and `kiln debug`.
pub fn cve_2024_23650_malformed_messages() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        for (name, bytes) in malformed_definitions() {
            let out = kiln.build(&bytes, &[])?;
            ensure!(
                out.code == Some(0) || out.code == Some(1),
                "{name}: exit {:?}: {}",
                out.code,
                out.stderr
            );
            ensure!(
                !out.stderr.contains("internal error") && !out.stderr.contains("panicked"),
                "{name}: {}",
                out.stderr
            );
            if out.code == Some(1) {
                ensure!(
                    out.error_line().starts_with("error: "),
                    "{name}: {}",
                    out.stderr
                );
            }
            for args in [&["debug", "dump-llb"][..], &["debug", "cachemap"][..]] {
                let mut command = kiln.command();
                command.args(args);
                let mut child = command
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()?;
                use std::io::Write as _;
                let _ = child.stdin.take().map(|mut s| s.write_all(&bytes));
                let out = child.wait_with_output()?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    matches!(out.status.code(), Some(0 | 1)) && !stderr.contains("internal error"),
                    "{name}: kiln {args:?}: {:?}: {stderr}",
                    out.status
                );
            }
        }
        Ok(())
    })
}

/// CVE-2026-33747: IDs and names from the Definition (cache ids, secret ids, custom
/// names) never name files: `..`, `/` and NUL in them create nothing outside kiln's state.
pub fn cve_2026_33747_ids_never_name_files() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let escape = format!("../../../../../../../..{}/pwn", host.dir().display());
        let secret_file = kiln.work().join("secret");
        std::fs::write(&secret_file, "s3cret")?;
        let def = graph(|b, base| {
            let mut exec = sh(
                Some(base),
                "ls /c /d >/dev/null; cat /run/secrets/x >/dev/null; echo ok > /result",
            )
            .mount(ExecMount::cache("/c", &escape, pb::CacheSharingOpt::Shared))
            .mount(ExecMount::cache("/d", "/", pb::CacheSharingOpt::Locked))
            .mount(ExecMount::secret("/run/secrets/x", &escape, 0o400, true));
            exec.custom_name = Some(escape.clone());
            b.exec(&exec).root().expect("root")
        });
        let secret = format!("id={escape},src={}", secret_file.display());
        let _ = kiln.build_exported(&def, &["--secret", &secret])?;
        let out = kiln.build_exported(&def, &[])?;
        ensure!(out.success() || out.code == Some(1), "{}", out.stderr);
        Ok(())
    })
}

/// CVE-2026-33748 / CVE-2024-23651 without the race: selectors that are (or pass through)
/// symlinks out of their snapshot, `..` chains, and magic links stay inside it, or fail.
pub fn cve_2026_33748_selectors_stay_in_their_snapshot() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let canary = host.dir().display().to_string();
        plant_symlink(kiln.rootfs(), "links/abs", &canary)?;
        plant_symlink(
            kiln.rootfs(),
            "links/rel",
            &format!("../../../../../../..{canary}"),
        )?;
        plant_symlink(kiln.rootfs(), "links/root", "/")?;
        plant_symlink(kiln.rootfs(), "links/magic", "/proc/self/root")?;
        plant_symlink(kiln.rootfs(), "links/fd", "/proc/self/fd/3")?;
        let selectors = [
            "links/abs".to_owned(),
            "links/abs/secret".to_owned(),
            "links/rel".to_owned(),
            "links/rel/secret".to_owned(),
            format!("links/root{canary}"),
            format!("../../../../..{canary}"),
            format!("/a/../../../..{canary}/secret"),
            "links/magic/etc".to_owned(),
            "links/fd".to_owned(),
            "/proc/self/root/etc".to_owned(),
        ];
        for selector in selectors {
            for readonly in [true, false] {
                let def = graph(|b, base| {
                    let mut mount = ExecMount::bind("/sel", Some(base.clone())).selector(&selector);
                    if readonly {
                        mount = mount.readonly();
                    }
                    let exec = sh(
                        Some(base),
                        "cat /sel/secret /sel 2>/dev/null > /result; ls /sel >> /result 2>/dev/null; true",
                    )
                    .mount(mount);
                    b.exec(&exec).root().expect("root")
                });
                let out = kiln.build_exported(&def, &[])?;
                if out.success() {
                    let result = out.exported("result").unwrap_or_default();
                    ensure!(
                        !result.contains(CANARY_SECRET) && !result.contains("ptmx"),
                        "selector {selector:?} reached the host: {result}"
                    );
                }
            }
        }
        Ok(())
    })
}

/// A cache id used twice in one build, with a selector through a symlink planted by the
/// first step: the second step's mount stays inside the cache directory.
pub fn cache_selector_symlink_planted_by_a_step() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let canary = host.dir().display().to_string();
        let def = graph(|b, base| {
            let plant = b.exec(
                &sh(
                    Some(base.clone()),
                    &format!("rm -rf /c/sub; ln -s {canary} /c/sub; ln -s / /c/root"),
                )
                .mount(ExecMount::cache(
                    "/c",
                    "plant",
                    pb::CacheSharingOpt::Shared,
                )),
            );
            let mut read = sh(
                plant.root(),
                "cat /s/secret > /result 2>&1; ls /r >> /result 2>&1; true",
            )
            .mount(ExecMount::cache("/s", "plant", pb::CacheSharingOpt::Shared).selector("sub"))
            .mount(
                ExecMount::cache("/r", "plant", pb::CacheSharingOpt::Locked).selector("root/tmp"),
            );
            read.custom_name = Some("read".into());
            b.exec(&read).root().expect("root")
        });
        let out = kiln.build_exported(&def, &[])?;
        if out.success() {
            let result = out.exported("result").unwrap_or_default();
            ensure!(
                !result.contains(CANARY_SECRET) && !result.contains("kiln-host"),
                "a cache selector reached the host: {result}"
            );
        }
        Ok(())
    })
}
