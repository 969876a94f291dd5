//! Symlinks and `..` in every path a Definition carries (mount destinations of each
//! mount type, the cwd, the user, FileOp paths, copy sources), and sources that are
//! FIFOs, devices or magic links: each stays inside its root or fails cleanly, and never
//! hangs.

use anyhow::ensure;
use kiln_proto::builder::{ExecMount, FileActions, default_copy};
use kiln_proto::pb;

use crate::harness::{
    CANARY_SECRET, HostWatch, Kiln, graph, plant_fifo, plant_symlink, sh, unique, with_host,
};

/// Hostile spellings of a destination that names `leaf` in the host's canary directory.
fn hostile_destinations(host: &HostWatch, leaf: &str) -> Vec<String> {
    let canary = host.dir().display().to_string();
    vec![
        format!("/hostlink/{leaf}"),
        format!("/../../../../..{canary}/{leaf}"),
        format!("/./../tmp/../..{canary}/{leaf}"),
        format!("/toroot{canary}/{leaf}"),
        format!("/rel/{leaf}"),
        format!("/proc/self/root{canary}/{leaf}"),
        format!("/proc/1/cwd/../../..{canary}/{leaf}"),
    ]
}

/// The rootfs gets `hostlink -> <canary>`, `toroot -> /` and `rel -> ../../<canary>`.
fn plant_links(kiln: &Kiln, host: &HostWatch) -> anyhow::Result<()> {
    let canary = host.dir().display().to_string();
    plant_symlink(kiln.rootfs(), "hostlink", &canary)?;
    plant_symlink(kiln.rootfs(), "toroot", "/")?;
    plant_symlink(kiln.rootfs(), "rel", &format!("../../../../../..{canary}"))?;
    Ok(())
}

/// Mount destinations of every kind (bind of an input, read-only bind, cache, tmpfs,
/// secret) written through symlinks and `..` land inside the step's root.
pub fn mount_destinations() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        plant_links(kiln, host)?;
        let secret_file = kiln.work().join("secret");
        std::fs::write(&secret_file, "s3cret")?;
        let secret = format!("id=s,src={}", secret_file.display());
        for (i, dest) in hostile_destinations(host, "b").into_iter().enumerate() {
            let mounts: Vec<ExecMount> = vec![
                ExecMount::tmpfs(&dest, 0),
                ExecMount::cache(&dest, &format!("c{i}"), pb::CacheSharingOpt::Shared),
                ExecMount::secret(&format!("{dest}/s"), "s", 0o400, false),
            ];
            for mount in mounts {
                let script = format!(
                    "touch '{dest}/pwned' 2>/dev/null; echo x > '{dest}/c' 2>/dev/null; true"
                );
                let _ = kiln.build_step(&script, |e| e.mount(mount), &["--secret", &secret])?;
                host.untouched()?;
            }
            // A bind of an input (the base itself) and its read-only variant.
            for readonly in [false, true] {
                let def = graph(|b, base| {
                    let mut m = ExecMount::bind(&dest, Some(base.clone()));
                    if readonly {
                        m = m.readonly();
                    }
                    let exec = sh(
                        Some(base),
                        &format!("touch '{dest}/pwned' 2>/dev/null; true"),
                    )
                    .mount(m);
                    b.exec(&exec).root().expect("root")
                });
                let _ = kiln.build_exported(&def, &[])?;
                host.untouched()?;
            }
        }
        // kiln run's --mount targets too.
        for dest in hostile_destinations(host, "b") {
            let _ = kiln.run(&[
                "--mount",
                &format!("type=tmpfs,target={dest}"),
                "--",
                "sh",
                "-c",
                &format!("touch '{dest}/pwned' 2>/dev/null; true"),
            ])?;
        }
        Ok(())
    })
}

/// Dangling symlinks as path components of a destination: `x -> /nonexistent/dir`,
/// mount at `/x/y` — created inside the root (in-root semantics), never on the host.
pub fn dangling_symlink_destination() -> anyhow::Result<()> {
    with_host(|kiln, _| {
        let name = format!("/kiln-dangling-{}", unique());
        plant_symlink(kiln.rootfs(), "x", &format!("{name}/dir"))?;
        let out = kiln.build_step(
            "ls /x/y > /tmp/result 2>&1; true",
            |e| e.mount(ExecMount::tmpfs("/x/y", 0)),
            &[],
        )?;
        ensure!(
            !std::path::Path::new(&name).exists(),
            "{name} was created on the host"
        );
        if out.success() {
            let export = out.export.clone().unwrap_or_default();
            ensure!(
                !export
                    .join(name.trim_start_matches('/'))
                    .join("dir/y")
                    .exists()
                    || std::fs::read_dir(export.join(name.trim_start_matches('/')).join("dir/y"))?
                        .count()
                        == 0,
                "stub left with content"
            );
        }
        Ok(())
    })
}

/// The working directory through symlinks and `..`: created and entered inside the root.
pub fn cwd_paths() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        plant_links(kiln, host)?;
        for cwd in hostile_destinations(host, "work") {
            let out = kiln.build_step(
                "pwd > /result; ls >> /result 2>&1; cat secret >> /result 2>&1; touch here; true",
                |e| e.cwd(&cwd),
                &[],
            )?;
            if out.success() {
                let result = out.exported("result").unwrap_or_default();
                ensure!(!result.contains(CANARY_SECRET), "cwd {cwd}: {result}");
            }
            host.untouched()?;
        }
        Ok(())
    })
}

/// The user name is looked up in the image's /etc/passwd and /etc/group: symlinks out of
/// the root read the image's own (missing) files, and FIFOs never hang the lookup.
pub fn user_lookup_files() -> anyhow::Result<()> {
    for plant in ["symlink", "fifo", "dir"] {
        with_host(|kiln, host| {
            let fake = host.dir().join("passwd");
            std::fs::write(&fake, "evil:x:0:0::/:/bin/sh\n")?;
            for file in ["etc/passwd", "etc/group"] {
                match plant {
                    "symlink" => plant_symlink(kiln.rootfs(), file, &fake.display().to_string())?,
                    "fifo" => plant_fifo(kiln.rootfs(), file)?,
                    _ => {
                        let _ = std::fs::remove_file(kiln.rootfs().join(file));
                        std::fs::create_dir(kiln.rootfs().join(file))?;
                    }
                }
            }
            let out = kiln.build_step("id > /tmp/result", |e| e.user("evil"), &[])?;
            ensure!(
                !out.success(),
                "user 'evil' resolved through a planted /etc/passwd ({plant}): {:?}",
                out.exported("tmp/result")
            );
            let out = kiln.run(&["--user", "evil", "--", "id"])?;
            ensure!(
                out.code != Some(0),
                "kiln run --user evil ({plant}): {}",
                out.stdout
            );
            std::fs::remove_file(&fake)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// /etc/hosts and /etc/resolv.conf of the image as FIFOs or symlinks to host files: kiln
/// binds its own files over them without opening theirs, and never writes the targets.
pub fn hosts_and_resolv_conf() -> anyhow::Result<()> {
    for plant in ["symlink", "fifo"] {
        with_host(|kiln, host| {
            for file in ["etc/hosts", "etc/resolv.conf", "etc/hostname"] {
                match plant {
                    "symlink" => plant_symlink(
                        kiln.rootfs(),
                        file,
                        &host.dir().join("ptmx").display().to_string(),
                    )?,
                    _ => plant_fifo(kiln.rootfs(), file)?,
                }
            }
            let out = kiln.build_step(
                "cat /etc/hosts /etc/resolv.conf > /result 2>&1; echo x >> /etc/hosts 2>/dev/null; true",
                |e| e,
                &[],
            )?;
            if out.success() {
                let result = out.exported("result").unwrap_or_default();
                ensure!(!result.contains("canary"), "{plant}: {result}");
            }
            let _ = kiln.run(&["--hostname", "h", "--", "cat", "/etc/hosts"])?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Makes one FileOp on a base.
type FileAction = Box<dyn Fn(kiln_proto::builder::Output) -> FileActions>;

/// FileOp paths (mkdir, mkfile, rm, copy destination and source) through symlinks and
/// `..` stay inside the snapshot they act on.
pub fn file_op_paths() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        plant_links(kiln, host)?;
        for path in hostile_destinations(host, "b") {
            let actions: Vec<(&str, FileAction)> = vec![
                (
                    "mkdir",
                    Box::new({
                        let p = format!("{path}/newdir");
                        move |base| FileActions::on(Some(base)).mkdir(&p, 0o755, true)
                    }),
                ),
                (
                    "mkfile",
                    Box::new({
                        let p = format!("{path}/c");
                        move |base| FileActions::on(Some(base)).mkfile(&p, 0o644, b"pwned")
                    }),
                ),
                (
                    "rm",
                    Box::new({
                        let p = format!("{path}/c");
                        move |base| FileActions::on(Some(base)).rm(&p, true)
                    }),
                ),
                (
                    "rm dir",
                    Box::new({
                        let p = path.clone();
                        move |base| FileActions::on(Some(base)).rm(&p, true)
                    }),
                ),
                (
                    "copy to",
                    Box::new({
                        let p = format!("{path}/");
                        move |base| {
                            FileActions::on(Some(base.clone())).copy(
                                base,
                                "/bin/busybox",
                                &p,
                                default_copy(),
                            )
                        }
                    }),
                ),
                (
                    "copy from",
                    Box::new({
                        let p = path.trim_end_matches("/b").to_owned() + "/secret";
                        move |base| {
                            FileActions::on(Some(base.clone())).copy(
                                base,
                                &p,
                                "/stolen",
                                default_copy(),
                            )
                        }
                    }),
                ),
            ];
            for (name, action) in actions {
                let def = graph(|b, base| b.file(action(base)));
                let out = kiln.build_exported(&def, &[])?;
                if out.success() {
                    let stolen = out.exported("stolen").unwrap_or_default();
                    ensure!(
                        !stolen.contains(CANARY_SECRET),
                        "{name} {path}: copied the host's file"
                    );
                }
                host.untouched()
                    .map_err(|e| e.context(format!("{name} {path}")))?;
            }
        }
        Ok(())
    })
}

/// The `local://` context is the user's own directory, but what it holds is not trusted:
/// symlinks out of it are copied as symlinks (never followed), FIFOs are copied without
/// being opened (no hang), and copies through a context symlink stay in the context.
pub fn local_context_links_and_fifos() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        let canary = host.dir().display().to_string();
        plant_symlink(kiln.rootfs(), "ctx/abs", &canary)?;
        plant_symlink(kiln.rootfs(), "ctx/rel", "../../../../../../../../etc")?;
        let out = kiln
            .build_step(
                "ls -l /ctx > /result; cat /ctx/abs/secret >> /result 2>&1; true",
                |e| e,
                &[],
            )?
            .ok()?;
        let result = out.exported("result").unwrap_or_default();
        ensure!(
            !result.contains(CANARY_SECRET),
            "context symlink followed: {result}"
        );
        // A FIFO in the context is never opened (that would hang): copied as a FIFO, or
        // refused with an error naming it.
        plant_fifo(kiln.rootfs(), "ctx/fifo")?;
        let out = kiln.build_step(
            "test -p /ctx/fifo && echo fifo > /result",
            |e| e,
            &["--no-cache"],
        )?;
        ensure!(
            out.exported("result").as_deref() == Some("fifo\n")
                || (out.code == Some(1) && out.error_line().contains("/ctx/fifo")),
            "FIFO in the context: {}",
            out.stderr
        );
        std::fs::remove_file(kiln.rootfs().join("ctx/fifo"))?;
        // Copies from the context through its symlinks.
        for src in ["/ctx/abs/secret", "/ctx/abs", "/ctx/rel/passwd"] {
            let def = graph(|b, base| {
                let local = b.source(
                    "local://rootfs",
                    std::collections::BTreeMap::from([(
                        "local.sharedkeyhint".to_owned(),
                        "rootfs".to_owned(),
                    )]),
                );
                b.file(FileActions::on(Some(base)).copy(
                    local,
                    src,
                    "/stolen",
                    pb::FileActionCopy {
                        follow_symlink: true,
                        dir_copy_contents: true,
                        ..default_copy()
                    },
                ))
            });
            let out = kiln.build_exported(&def, &[])?;
            if out.success() {
                let export = out.export.clone().unwrap_or_default();
                let found = crate::harness::walk(&export.join("stolen"))
                    .iter()
                    .any(|f| {
                        std::fs::read_to_string(export.join("stolen").join(f))
                            .is_ok_and(|t| t.contains(CANARY_SECRET))
                    })
                    || std::fs::read_to_string(export.join("stolen"))
                        .is_ok_and(|t| t.contains(CANARY_SECRET));
                ensure!(!found, "copy of {src} reached the host");
            }
        }
        Ok(())
    })
}

/// Sources that are FIFOs, devices or magic links: a FIFO in a snapshot used as a
/// selector or copied never blocks kiln; `kiln run --mount` binds a FIFO without opening
/// it and refuses magic links.
pub fn fifo_device_and_magic_link_sources() -> anyhow::Result<()> {
    with_host(|kiln, host| {
        plant_fifo(kiln.rootfs(), "srv/fifo")?;
        // A selector naming a FIFO.
        let def = graph(|b, base| {
            let exec = sh(
                Some(base.clone()),
                "test -p /sel && echo fifo > /result; true",
            )
            .mount(
                ExecMount::bind("/sel", Some(base))
                    .selector("srv/fifo")
                    .readonly(),
            );
            b.exec(&exec).root().expect("root")
        });
        let _ = kiln.build_exported(&def, &[])?;
        // A FileOp copying a FIFO.
        let def = graph(|b, base| {
            b.file(FileActions::on(Some(base.clone())).copy(
                base,
                "/srv/fifo",
                "/copied",
                default_copy(),
            ))
        });
        let _ = kiln.build_exported(&def, &[])?;
        // kiln run: a FIFO source.
        let fifo = kiln.work().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))?;
        let out = kiln.run(&[
            "--mount",
            &format!("type=bind,source={},target=/f", fifo.display()),
            "--",
            "sh",
            "-c",
            "test -p /f && echo fifo",
        ])?;
        ensure!(
            out.code == Some(1) || out.stdout == "fifo\n",
            "FIFO source: {:?} {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        // Magic links as sources: /proc/self/fd/N resolves in kiln, to kiln's own
        // descriptors; they must not hand the step a host directory. (A plain host path
        // is the user's own choice, as with `docker run -v`.)
        for source in [
            "/proc/self/fd/0",
            "/proc/self/fd/1",
            "/proc/self/fd/2",
            "/proc/self/fd/3",
        ] {
            let out = kiln.run(&[
                "--mount",
                &format!("type=bind,source={source},target=/m,readonly"),
                "--",
                "sh",
                "-c",
                &format!("cat /m{}/secret 2>/dev/null; true", host.dir().display()),
            ])?;
            ensure!(
                !out.stdout.contains(CANARY_SECRET),
                "source {source} exposed the host"
            );
        }
        Ok(())
    })
}
