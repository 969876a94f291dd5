//! The ExecOp CacheMap (exec-cachemap.md §2–§4): the normalised op inside the
//! `buildkit.exec.v0` wrapper with the loader's platform, and per-input deps from the
//! original mounts.

use kiln_proto::gojson::{GoJson, ObjectWriter};
use kiln_proto::{Digest, EMPTY_INPUT, ROOT_MOUNT, SKIP_OUTPUT, pb};

use super::error::CacheMapError;
use super::map::{CacheDigest, CacheMap, ContentSelector, Dep, dedupe_paths};

/// Type string of the exec wrapper object.
pub const EXEC_CACHE_TYPE: &str = "buildkit.exec.v0";

/// Computes the CacheMap of `exec` with `num_inputs` op inputs. `platform` is the
/// vertex's normalised platform; `None` uses the host default (not normalised, as
/// BuildKit does for ops without a platform).
pub fn cache_map(
    op: &Digest,
    exec: &pb::ExecOp,
    platform: Option<&pb::Platform>,
    num_inputs: usize,
) -> Result<CacheMap, CacheMapError> {
    let platform = platform
        .cloned()
        .unwrap_or_else(kiln_proto::platform::host_platform);
    let hashed = hashed_json(exec, &platform);
    let deps = deps(op, exec, num_inputs)?;
    Ok(CacheMap {
        digest: CacheDigest::sha256_of(&hashed),
        deps,
        hashed: Some(hashed),
    })
}

/// The normalised op (§2): extra-host IPs, mount selectors and proxy env cleared, and the
/// legacy single-root mount list dropped.
pub fn normalise(exec: &pb::ExecOp) -> pb::ExecOp {
    let mut exec = exec.clone();
    if let Some(meta) = exec.meta.as_mut() {
        for host in &mut meta.extra_hosts {
            host.ip.clear();
        }
        meta.proxy_env = None;
    }
    for mount in &mut exec.mounts {
        mount.selector.clear();
    }
    if let [only] = exec.mounts.as_slice() {
        let legacy_root = only.dest == ROOT_MOUNT
            && !only.readonly
            && only.mount_type == pb::MountType::Bind as i32
            && only.cache_opt.is_none()
            && only.ssh_opt.is_none()
            && only.secret_opt.is_none()
            && only.result_id.is_empty();
        if legacy_root {
            exec.mounts.clear();
        }
    }
    exec
}

/// Whether the legacy single-root rule drops the mount list of `exec`.
pub fn root_mount_elided(exec: &pb::ExecOp) -> bool {
    !exec.mounts.is_empty() && normalise(exec).mounts.is_empty()
}

/// The exact JSON BuildKit hashes (§3.2 wrapper around the normalised op).
pub fn hashed_json(exec: &pb::ExecOp, platform: &pb::Platform) -> Vec<u8> {
    let normalised = normalise(exec);
    let mut out = Vec::new();
    let mut obj = ObjectWriter::new(&mut out);
    obj.string_always("Type", EXEC_CACHE_TYPE);
    normalised.write_go_json(obj.key("Exec"));
    obj.string_always("OS", &platform.os)
        .string_always("Arch", &platform.architecture)
        .string("Variant", &platform.variant)
        .finish();
    out
}

/// Per-input deps (§4), from the original mounts.
fn deps(op: &Digest, exec: &pb::ExecOp, num_inputs: usize) -> Result<Vec<Dep>, CacheMapError> {
    struct Acc {
        selectors: Vec<String>,
        no_content_hash: bool,
    }
    let mut acc: Vec<Acc> = (0..num_inputs)
        .map(|_| Acc {
            selectors: Vec::new(),
            no_content_hash: false,
        })
        .collect();
    for (index, mount) in exec.mounts.iter().enumerate() {
        if mount.input == EMPTY_INPUT {
            continue;
        }
        // v0.11.6 only checks the upper bound and would crash below -1.
        let slot = usize::try_from(mount.input)
            .ok()
            .and_then(|i| acc.get_mut(i))
            .ok_or_else(|| CacheMapError::InvalidMountInput {
                op: op.clone(),
                index,
                mount: describe_mount(mount),
                input: mount.input,
                inputs: num_inputs,
            })?;
        if !mount.selector.is_empty() {
            slot.selectors
                .push(kiln_proto::paths::clean(&format!("/{}", mount.selector)));
        }
        if (!mount.readonly || mount.dest == ROOT_MOUNT) && mount.output != SKIP_OUTPUT {
            slot.no_content_hash = true;
        }
    }
    Ok(acc
        .into_iter()
        .map(|a| {
            let selector =
                (!a.selectors.is_empty()).then(|| Digest::of(a.selectors.join("\0").as_bytes()));
            let content = (!a.no_content_hash).then(|| {
                dedupe_paths(&a.selectors)
                    .into_iter()
                    .map(|p| ContentSelector::path(p, true))
                    .collect()
            });
            Dep {
                selector,
                content,
                preprocess: true,
            }
        })
        .collect())
}

/// A short, Go-`%v`-like rendering of a mount for error texts.
fn describe_mount(mount: &pb::Mount) -> String {
    format!(
        "{{input:{} selector:{:?} dest:{:?} output:{} readonly:{} mountType:{}}}",
        mount.input, mount.selector, mount.dest, mount.output, mount.readonly, mount.mount_type
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(os: &str, arch: &str, variant: &str) -> pb::Platform {
        pb::Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.into(),
            ..Default::default()
        }
    }

    fn op() -> Digest {
        Digest::of(b"op")
    }

    fn mount(input: i64, selector: &str, dest: &str, output: i64, readonly: bool) -> pb::Mount {
        pb::Mount {
            input,
            selector: selector.into(),
            dest: dest.into(),
            output,
            readonly,
            ..Default::default()
        }
    }

    #[test]
    fn example_a_plain_run_drops_the_single_root_mount() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["/bin/sh".into(), "-c".into(), "echo hello > /out".into()],
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                cwd: "/".into(),
                remove_mount_stubs_recursive: true,
                ..Default::default()
            }),
            mounts: vec![mount(0, "", "/", 0, false)],
            ..Default::default()
        };
        let cm = cache_map(&op(), &exec, Some(&platform("linux", "amd64", "")), 1).unwrap();
        assert_eq!(
            String::from_utf8(cm.hashed.clone().unwrap()).unwrap(),
            r#"{"Type":"buildkit.exec.v0","Exec":{"meta":{"args":["/bin/sh","-c","echo hello \u003e /out"],"env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"cwd":"/","removeMountStubsRecursive":true}},"OS":"linux","Arch":"amd64"}"#
        );
        assert_eq!(
            cm.digest.as_str(),
            "sha256:d8a17310c81e3890a075ce77349ddb3798c46464a127342121d6a991850cd24e"
        );
        assert_eq!(cm.deps.len(), 1);
        assert_eq!(cm.deps[0].selector, None);
        assert!(!cm.deps[0].content_based());
        assert!(cm.deps[0].preprocess);
    }

    #[test]
    fn example_b_every_field_family() {
        let proxy = pb::ProxyEnv {
            http_proxy: "http://proxy:3128".into(),
            ..Default::default()
        };
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["make".into(), "build".into()],
                env: vec!["PATH=/usr/bin:/bin".into(), "A=<&>".into()],
                cwd: "/work".into(),
                user: "1000:1000".into(),
                hostname: "builder".into(),
                proxy_env: Some(proxy),
                extra_hosts: vec![pb::HostIp {
                    host: "myhost".into(),
                    ip: "10.0.0.1".into(),
                }],
                ulimit: vec![
                    pb::Ulimit {
                        name: "nofile".into(),
                        soft: 1024,
                        hard: 2048,
                    },
                    pb::Ulimit {
                        name: "core".into(),
                        soft: 0,
                        hard: 0,
                    },
                ],
                remove_mount_stubs_recursive: true,
                ..Default::default()
            }),
            network: pb::NetMode::None as i32,
            secretenv: vec![pb::SecretEnv {
                id: "npmtok".into(),
                name: "NPM_TOKEN".into(),
                optional: true,
            }],
            mounts: vec![
                mount(0, "", "/", 0, false),
                pb::Mount {
                    mount_type: pb::MountType::Cache as i32,
                    cache_opt: Some(pb::CacheOpt {
                        id: "gocache".into(),
                        sharing: pb::CacheSharingOpt::Locked as i32,
                    }),
                    ..mount(-1, "", "/root/.cache", -1, false)
                },
                pb::Mount {
                    mount_type: pb::MountType::Tmpfs as i32,
                    tmpfs_opt: Some(pb::TmpfsOpt { size: 1_048_576 }),
                    ..mount(-1, "", "/tmp", -1, false)
                },
                mount(1, "/src", "/work", -1, true),
                mount(2, "", "/work/out", 1, false),
                pb::Mount {
                    mount_type: pb::MountType::Secret as i32,
                    secret_opt: Some(pb::SecretOpt {
                        id: "token".into(),
                        mode: 0o400,
                        ..Default::default()
                    }),
                    ..mount(0, "", "/run/secrets/token", 0, false)
                },
            ],
            ..Default::default()
        };
        let cm = cache_map(&op(), &exec, Some(&platform("linux", "arm", "v7")), 3).unwrap();
        assert_eq!(
            String::from_utf8(cm.hashed.clone().unwrap()).unwrap(),
            r#"{"Type":"buildkit.exec.v0","Exec":{"meta":{"args":["make","build"],"env":["PATH=/usr/bin:/bin","A=\u003c\u0026\u003e"],"cwd":"/work","user":"1000:1000","extraHosts":[{"Host":"myhost"}],"hostname":"builder","ulimit":[{"Name":"nofile","Soft":1024,"Hard":2048},{"Name":"core"}],"removeMountStubsRecursive":true},"mounts":[{"input":0,"dest":"/","output":0},{"input":-1,"dest":"/root/.cache","output":-1,"mountType":3,"cacheOpt":{"ID":"gocache","sharing":2}},{"input":-1,"dest":"/tmp","output":-1,"mountType":4,"TmpfsOpt":{"size":1048576}},{"input":1,"dest":"/work","output":-1,"readonly":true},{"input":2,"dest":"/work/out","output":1},{"input":0,"dest":"/run/secrets/token","output":0,"mountType":1,"secretOpt":{"ID":"token","mode":256}}],"network":2,"secretenv":[{"ID":"npmtok","name":"NPM_TOKEN","optional":true}]},"OS":"linux","Arch":"arm","Variant":"v7"}"#
        );
        assert_eq!(
            cm.digest.as_str(),
            "sha256:b219728b6880a075a75c8dd13dbdd01f4b18e514b7b67f587072c948720402d1"
        );
        assert_eq!(
            cm.deps[0],
            Dep {
                selector: None,
                content: None,
                preprocess: true
            }
        );
        assert_eq!(
            cm.deps[1].selector_str(),
            "sha256:56c9e1c4b5360a5b089004396ed37fe3a20f7c4f5954072098039789ba3ab68a"
        );
        assert_eq!(
            cm.deps[1].content,
            Some(vec![ContentSelector::path("/src", true)])
        );
        assert!(!cm.deps[2].content_based());
    }

    #[test]
    fn example_c_read_only_root_and_two_selectors() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                cwd: "/".into(),
                ..Default::default()
            }),
            mounts: vec![
                mount(0, "", "/", -1, true),
                mount(1, "a/b", "/x", -1, true),
                mount(1, "a", "/y", -1, true),
            ],
            ..Default::default()
        };
        let cm = cache_map(&op(), &exec, Some(&platform("linux", "amd64", "")), 2).unwrap();
        assert_eq!(
            cm.digest.as_str(),
            "sha256:b15e9dcb259431f081557efdc22f460b4a0e3e4905fecd7353f9d0640f0f6f63"
        );
        // The whole rootfs, links not followed.
        assert_eq!(cm.deps[0].content, Some(vec![]));
        assert_eq!(
            cm.deps[1].selector_str(),
            "sha256:0a0b8df9a3f1e45f655920c56cfa848962b153105bffc54eaa5bc9aa56990846"
        );
        assert_eq!(
            cm.deps[1].content,
            Some(vec![ContentSelector::path("/a", true)])
        );
    }

    #[test]
    fn json_rules_apply_inside_the_wrapper() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["a\u{1b}\u{2028}<".to_owned()],
                ..Default::default()
            }),
            mounts: vec![
                mount(0, "", "/", 0, false),
                pb::Mount {
                    mount_type: pb::MountType::Cache as i32,
                    // Present but empty: written as `{}`.
                    cache_opt: Some(pb::CacheOpt::default()),
                    ..mount(-1, "", "/c", -1, false)
                },
            ],
            ..Default::default()
        };
        let json = hashed_json(&exec, &platform("linux", "arm64", ""));
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"Type":"buildkit.exec.v0","Exec":{"meta":{"args":["a\u001b\u2028\u003c"]},"mounts":[{"input":0,"dest":"/","output":0},{"input":-1,"dest":"/c","output":-1,"mountType":3,"cacheOpt":{}}]},"OS":"linux","Arch":"arm64"}"#
        );
        // Invalid UTF-8 cannot sit in a Rust String; the byte-level rule is tested in
        // kiln-proto's gojson. An empty OS is still written.
        let json = hashed_json(&exec, &platform("", "amd64", "v2"));
        let text = String::from_utf8(json).unwrap();
        assert!(
            text.ends_with(r#""OS":"","Arch":"amd64","Variant":"v2"}"#),
            "{text}"
        );
    }

    #[test]
    fn secret_mount_with_input_zero_disables_content_hash() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![
                mount(0, "", "/", -1, true),
                pb::Mount {
                    mount_type: pb::MountType::Secret as i32,
                    secret_opt: Some(pb::SecretOpt::default()),
                    ..mount(0, "", "/run/secrets/x", 0, true)
                },
            ],
            ..Default::default()
        };
        let cm = cache_map(&op(), &exec, None, 1).unwrap();
        // Read-only, but not the root: only `output != -1` with `readonly` false or dest
        // "/" counts, so this one keeps the content hash.
        assert!(cm.deps[0].content_based());
        let mut rw = exec.clone();
        rw.mounts[1].readonly = false;
        let cm = cache_map(&op(), &rw, None, 1).unwrap();
        assert!(!cm.deps[0].content_based());
    }

    #[test]
    fn legacy_rule_needs_exactly_one_plain_writable_bind_root() {
        let base = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![mount(0, "sel", "/", 3, false)],
            ..Default::default()
        };
        // Input/output values and the selector do not matter.
        assert!(root_mount_elided(&base));
        let mut readonly = base.clone();
        readonly.mounts[0].readonly = true;
        assert!(!root_mount_elided(&readonly));
        let mut cache = base.clone();
        cache.mounts[0].cache_opt = Some(pb::CacheOpt::default());
        assert!(!root_mount_elided(&cache));
        let mut two = base.clone();
        two.mounts.push(mount(-1, "", "/tmp", -1, false));
        assert!(!root_mount_elided(&two));
    }

    #[test]
    fn out_of_range_mount_input_is_an_error() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![mount(0, "", "/", 0, false), mount(2, "", "/x", -1, true)],
            ..Default::default()
        };
        let err = cache_map(&op(), &exec, None, 1).unwrap_err();
        assert!(err.to_string().starts_with("invalid mountinput "), "{err}");
        let mut negative = exec.clone();
        negative.mounts[1].input = -2;
        assert!(cache_map(&op(), &negative, None, 1).is_err());
    }

    #[test]
    fn missing_platform_uses_the_host() {
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: vec!["true".into()],
                ..Default::default()
            }),
            mounts: vec![mount(0, "", "/", 0, false)],
            ..Default::default()
        };
        let host = kiln_proto::platform::host_platform();
        assert_eq!(
            cache_map(&op(), &exec, None, 1).unwrap(),
            cache_map(&op(), &exec, Some(&host), 1).unwrap()
        );
    }
}
