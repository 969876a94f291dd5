//! The sandbox network end to end, through `kiln run` and `kiln build`, as root and as the
//! unprivileged test user: a step reaches a server on a network the test owns (a veth
//! pair into a namespace of the test's, see `kiln_testsupport::network`), but not a
//! server on the host's loopback; `none` reaches nothing; a step changes none of the
//! host's routes, interfaces or firewall rules, and a namespace an insecure step could
//! change is not handed to the next step; proxy variables reach the step without being
//! part of the cache key; a killed build leaves no network helper or namespace behind.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, FileActions, default_copy};
use kiln_proto::encode::GogoEncode as _;
use kiln_proto::pb;
use kiln_testsupport::network::{TestNetwork, loopback_server};
use kiln_testsupport::{AsTestUser, in_ci, is_root, require, rerun_as_test_user, which};
use serde_json::Value;

mod common;

/// This binary's test subnet (198.18.13.0/24).
const SUBNET: u8 = 13;

/// A temporary directory removed on drop, rootless from inside a user namespace of the
/// test user (snapshots and the unpacked rootfs hold files of its subordinate ids, which
/// the user cannot remove from outside).
struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        Ok(Scratch(Some(tempfile::tempdir()?)))
    }

    fn rootfs() -> Scratch {
        Scratch(Some(common::busybox_rootfs()))
    }

    fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new("/nonexistent"), tempfile::TempDir::path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        if is_root() {
            return;
        }
        let path = dir.keep();
        let _ = kiln_executor::userns::run_in_user_namespace(move || {
            i32::from(std::fs::remove_dir_all(&path).is_err())
        });
    }
}

fn kiln(state: &Path, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(state)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kiln")?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(bytes) = stdin {
        let _ = std::io::Write::write_all(&mut input, bytes);
    }
    drop(input);
    Ok(child.wait_with_output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kiln run` of a shell script; returns (exit code, stdout, stderr).
fn run(
    state: &Path,
    rootfs: &Path,
    flags: &[&str],
    script: &str,
) -> anyhow::Result<(i32, String, String)> {
    let rootfs = rootfs.to_str().context("utf-8 rootfs path")?;
    let mut args = vec!["run", "--rootfs", rootfs];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "/bin/sh", "-c", script]);
    let out = kiln(state, &args, None)?;
    Ok((
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    ))
}

/// What the host's network looks like from here: routes and interfaces (and, as root,
/// the firewall ruleset).
fn host_network_state() -> anyhow::Result<String> {
    let mut state = String::new();
    let mut commands: Vec<Vec<&str>> = vec![
        vec!["ip", "-4", "route", "show", "table", "all"],
        vec!["ip", "-6", "route", "show", "table", "all"],
        vec!["ip", "-o", "link", "show"],
        vec!["ip", "-o", "addr", "show"],
    ];
    if is_root() && which("nft") {
        commands.push(vec!["nft", "list", "ruleset"]);
    }
    if is_root() && which("iptables-save") {
        commands.push(vec!["iptables-save"]);
    }
    for c in commands {
        let out = Command::new(c[0])
            .args(&c[1..])
            .output()
            .with_context(|| c.join(" "))?;
        state.push_str(&format!("$ {}\n{}", c.join(" "), text(&out.stdout)));
    }
    // Counters change by themselves; compare rules, not packets.
    Ok(state
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            l.split(" [")
                .next()
                .unwrap_or(l)
                .split(" counter packets")
                .next()
                .unwrap_or(l)
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Fails naming the lines that differ between two [`host_network_state`]s.
fn ensure_same(before: &str, after: &str, what: &str) -> anyhow::Result<()> {
    if before == after {
        return Ok(());
    }
    let old: HashSet<&str> = before.lines().collect();
    let new: HashSet<&str> = after.lines().collect();
    let gone: Vec<&&str> = old.difference(&new).collect();
    let added: Vec<&&str> = new.difference(&old).collect();
    bail!("{what} changed the host's network: gone {gone:?}, added {added:?}")
}

/// Commands that would change a network: an address, a route, an interface's MTU.
const CHANGE_NETWORK: &str = "ip addr add 198.51.100.7/32 dev tap0 && ip route add 198.51.100.0/24 dev tap0 && ip link set tap0 mtu 1280 && echo changed";

fn check_run(net: &TestNetwork) -> anyhow::Result<()> {
    let state = Scratch::new()?;
    let rootfs = Scratch::rootfs();
    // A timeout: a broken stack must fail the check, not hang it.
    let reach = format!("timeout 10 nc {} </dev/null", net.nc_target());

    // The default network reaches the test's server; its resolver is the stack's
    // forwarder; /etc/hosts names the step.
    let (code, out, err) = run(
        state.path(),
        rootfs.path(),
        &["--hostname", "netstep"],
        &format!("{reach}; cat /etc/resolv.conf; grep netstep /etc/hosts; ls /sys/class/net"),
    )?;
    ensure!(code == 0, "sandbox step failed ({code}): {err}");
    ensure!(
        out.contains(&net.greeting()),
        "server not reached: {out}{err}"
    );
    let nameservers: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    ensure!(
        nameservers == ["nameserver 10.0.2.3"],
        "one nameserver, the stack's forwarder: {out}"
    );
    ensure!(out.contains("127.0.0.1\tlocalhost netstep"), "hosts: {out}");
    ensure!(out.contains("tap0"), "the stack's interface: {out}");
    let (code, _, _) = run(
        state.path(),
        rootfs.path(),
        &["--network", "sandbox"],
        &reach,
    )?;
    ensure!(code == 0, "--network sandbox is the default");

    // The host's loopback is out of reach, through the gateway and directly.
    let port = loopback_server("host-loopback-secret")?;
    let (_, out, err) = run(
        state.path(),
        rootfs.path(),
        &[],
        &format!(
            "nc -w 2 10.0.2.2 {port} </dev/null; nc -w 2 127.0.0.1 {port} </dev/null; echo end"
        ),
    )?;
    ensure!(out.ends_with("end\n"), "{out}{err}");
    ensure!(
        !out.contains("host-loopback-secret"),
        "a sandbox step reached the host's loopback: {out}"
    );

    // none: loopback only and up (kiln run makes it ahead, on another thread), nothing
    // else reachable, and a namespace of its own.
    let (code, out, err) = run(
        state.path(),
        rootfs.path(),
        &["--network", "none"],
        &format!(
            "ls /sys/class/net; cat /sys/class/net/lo/flags; readlink /proc/self/ns/net >&2; \
             nc -w 2 {} </dev/null; nc -w 2 10.0.2.2 {port} </dev/null; echo end",
            net.nc_target()
        ),
    )?;
    ensure!(code == 0, "{err}");
    // IFF_UP | IFF_LOOPBACK
    ensure!(
        out == "lo\n0x9\nend\n",
        "none reached something, or lo is down: {out}{err}"
    );
    let ours = std::fs::read_link("/proc/self/ns/net")?;
    let step_ns = err.lines().find(|l| l.starts_with("net:["));
    ensure!(
        step_ns.is_some() && step_ns != ours.to_str(),
        "a none step ran in the test's network namespace ({ours:?}): {err}"
    );

    // A step changes nothing of the host's network: a sandbox step may not even change
    // its own (no CAP_NET_ADMIN); an insecure one changes only its own namespace.
    let before = host_network_state()?;
    let (_, out, _) = run(state.path(), rootfs.path(), &[], CHANGE_NETWORK)?;
    ensure!(
        !out.contains("changed"),
        "a sandbox step changed its network"
    );
    let (code, out, err) = run(
        state.path(),
        rootfs.path(),
        &["--security", "insecure"],
        CHANGE_NETWORK,
    )?;
    ensure!(
        code == 0 && out.contains("changed"),
        "insecure step: {out}{err}"
    );
    let (code, out, err) = run(
        state.path(),
        rootfs.path(),
        &["--security", "insecure"],
        "iptables -A OUTPUT -j DROP 2>/dev/null; ip link add kilnx0 type dummy 2>/dev/null; echo tried",
    )?;
    ensure!(code == 0 && out.contains("tried"), "{out}{err}");
    ensure_same(&before, &host_network_state()?, "a step")?;

    // pasta, the fallback stack, chosen in kiln.toml: same reach, same loopback rule.
    if require(which("pasta"), "pasta (package passt)") {
        std::fs::write(
            state.path().join("kiln.toml"),
            "[network]\nstack = \"pasta\"\n",
        )?;
        // pasta of Debian 12 does not pass on the server's close of a connection the
        // client half-closed first: the greeting counts, not nc's exit status.
        let (code, out, err) = run(
            state.path(),
            rootfs.path(),
            &[],
            &format!(
                "timeout 5 nc {} </dev/null; gw=$(ip route | awk '/^default/ {{print $3}}'); timeout 5 nc -w 2 $gw {port} </dev/null; cat /etc/resolv.conf",
                net.nc_target()
            ),
        )?;
        ensure!(code == 0, "pasta step failed ({code}): {err}");
        // Debian 12's pasta may repeat or drop bytes of a stream on current kernels (why
        // slirp4netns is the default): that the server answered is what counts here.
        ensure!(
            out.contains("kiln-test-server"),
            "pasta: server not reached: {out}{err}"
        );
        ensure!(
            !out.contains("host-loopback-secret"),
            "pasta: host loopback reached: {out}"
        );
        ensure!(
            out.contains("nameserver 169.254.1.1"),
            "pasta resolv.conf: {out}"
        );
        std::fs::write(
            state.path().join("kiln.toml"),
            "[network]\nstack = \"nonsense\"\n",
        )?;
        let (code, _, err) = run(state.path(), rootfs.path(), &[], "true")?;
        ensure!(code == 1 && err.contains("nonsense"), "bad stack: {err}");
    }
    Ok(())
}

/// `local://rootfs` copied into scratch.
fn base(b: &mut DefinitionBuilder) -> kiln_proto::builder::Output {
    let local = b.source(
        "local://rootfs",
        BTreeMap::from([("local.sharedkeyhint".to_owned(), "rootfs".to_owned())]),
    );
    b.file(FileActions::on(None).copy(
        local,
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ))
}

fn sh(root: Option<kiln_proto::builder::Output>, script: &str) -> Exec {
    Exec::new(root, &["/bin/sh", "-c", script])
}

/// A build of steps chained on the base, each `(script, network, security)`.
fn chain(steps: &[(&str, pb::NetMode, pb::SecurityMode)]) -> Vec<u8> {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let mut root = base(&mut b);
    for (script, network, security) in steps {
        let mut exec = sh(Some(root.clone()), script);
        exec.network = *network;
        exec.security = *security;
        root = b.exec(&exec).root().unwrap_or(root);
    }
    b.finish(&root).gogo_encode()
}

fn build(state: &Path, local: &str, def: &[u8], extra: &[&str]) -> anyhow::Result<Output> {
    let mut args = vec!["build", "--progress", "rawjson", "--local", local];
    args.extend_from_slice(extra);
    kiln(state, &args, Some(def))
}

/// The last line of a build's standard error (its error, when it failed).
fn last_line(out: &Output) -> String {
    text(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// Vertex digests that ran (started and not cached), from `--progress rawjson`.
fn executed(stderr: &str) -> HashSet<String> {
    let mut started = HashSet::new();
    let mut cached = HashSet::new();
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for vertex in v["vertexes"].as_array().into_iter().flatten() {
            let digest = vertex["digest"].as_str().unwrap_or_default().to_owned();
            if vertex["cached"] == true {
                cached.insert(digest);
            } else if vertex.get("started").is_some() {
                started.insert(digest);
            }
        }
    }
    started.difference(&cached).cloned().collect()
}

fn check_build(net: &TestNetwork) -> anyhow::Result<()> {
    use pb::NetMode::{None as NoNet, Unset as Sandbox};
    use pb::SecurityMode::{Insecure, Sandbox as Confined};
    let state = Scratch::new()?;
    let rootfs = Scratch::rootfs();
    let local = format!("rootfs={}", rootfs.path().display());
    let port = loopback_server("host-loopback-secret")?;
    let greeting = net.greeting();
    let target = net.nc_target();

    // Several sandbox steps (they share pooled namespaces) reach the server; none does not.
    let reach = format!("test \"$(timeout 10 nc {target} </dev/null)\" = \"{greeting}\"");
    let def = chain(&[
        (&reach, Sandbox, Confined),
        (
            &format!("{reach} && grep -qx 'nameserver 10.0.2.3' /etc/resolv.conf"),
            Sandbox,
            Confined,
        ),
        (
            &format!(
                "! nc -w 2 {target} </dev/null | grep -q kiln && test \"$(ls /sys/class/net)\" = lo"
            ),
            NoNet,
            Confined,
        ),
        (
            &format!(
                "! nc -w 2 10.0.2.2 {port} </dev/null | grep -q secret && ! nc -w 2 127.0.0.1 {port} </dev/null | grep -q secret"
            ),
            Sandbox,
            Confined,
        ),
        (&reach, Sandbox, Confined),
    ]);
    let out = build(state.path(), &local, &def, &[])?;
    ensure!(out.status.success(), "network build: {}", last_line(&out));
    let ran = executed(&text(&out.stderr));
    ensure!(ran.len() >= 5, "every step ran: {ran:?}");

    // The same step in a none network fails: the check above is not vacuous.
    let def = chain(&[(&reach, NoNet, Confined)]);
    let out = build(state.path(), &local, &def, &[])?;
    ensure!(!out.status.success(), "a none step reached the server");
    ensure!(
        last_line(&out).contains("did not complete successfully: exit code: 1"),
        "{}",
        last_line(&out)
    );

    // An insecure step changes its own namespace only; the next step gets another.
    let before = host_network_state()?;
    let def = chain(&[
        (CHANGE_NETWORK, Sandbox, Insecure),
        (
            "! ip route | grep -q 198.51.100 && ! ip addr | grep -q 198.51.100",
            Sandbox,
            Confined,
        ),
        (&reach, Sandbox, Confined),
    ]);
    let out = build(
        state.path(),
        &local,
        &def,
        &["--allow", "security.insecure"],
    )?;
    ensure!(out.status.success(), "insecure build: {}", last_line(&out));
    ensure_same(&before, &host_network_state()?, "a build")?;

    // Proxy variables reach the step (upper and lower case) and are not in its cache key.
    let proxy_def = |proxy: &str| {
        let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
        let root = base(&mut b);
        let mut exec = sh(
            Some(root.clone()),
            "echo \"$HTTP_PROXY $http_proxy $NO_PROXY\" > /out/proxy",
        )
        .mount(ExecMount::bind("/out", None));
        exec.meta.proxy_env = Some(pb::ProxyEnv {
            http_proxy: proxy.to_owned(),
            no_proxy: "localhost".to_owned(),
            ..Default::default()
        });
        let outputs = b.exec(&exec);
        let out = outputs.output("/out").unwrap_or(root);
        let digest = outputs.digest.as_str().to_owned();
        (b.finish(&out).gogo_encode(), digest)
    };
    let dest = state.path().join("proxy-out");
    let output = format!("type=local,dest={}", dest.display());
    let (def, _) = proxy_def("http://proxy-a:3128");
    let out = build(state.path(), &local, &def, &["-o", &output])?;
    ensure!(out.status.success(), "proxy build: {}", last_line(&out));
    let seen = std::fs::read_to_string(dest.join("proxy"))?;
    ensure!(
        seen == "http://proxy-a:3128 http://proxy-a:3128 localhost\n",
        "proxy variables: {seen:?}"
    );
    let (def, step) = proxy_def("http://proxy-b:3128");
    let out = build(state.path(), &local, &def, &["-o", &output])?;
    ensure!(
        out.status.success(),
        "second proxy build: {}",
        last_line(&out)
    );
    let ran = executed(&text(&out.stderr));
    ensure!(
        !ran.contains(&step),
        "a proxy change made the step run again: {ran:?}"
    );
    let seen = std::fs::read_to_string(dest.join("proxy"))?;
    ensure!(
        seen.starts_with("http://proxy-a:3128 "),
        "the cached result: {seen:?}"
    );
    Ok(())
}

/// Processes below `pid` (children, grandchildren, …).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|f| f.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let current = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == current)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Whether `pid` still runs (a zombie has released its namespaces and descriptors).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Processes (that this user may inspect) in, or holding a descriptor of, `netns`.
fn holders_of(netns: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let inside = std::fs::read_link(entry.path().join("ns/net"))
            .is_ok_and(|l| l.to_string_lossy() == netns);
        let holds = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == netns));
        if (inside || holds) && running(pid) {
            found.push(pid);
        }
    }
    found
}

fn check_killed_build() -> anyhow::Result<()> {
    let state = Scratch::new()?;
    let rootfs = Scratch::rootfs();
    let local = format!("rootfs={}", rootfs.path().display());
    let marker = 5_000_000 + std::process::id();
    let def = chain(&[(
        &format!("sleep {marker}"),
        pb::NetMode::Unset,
        pb::SecurityMode::Sandbox,
    )]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(state.path())
        .args(["build", "--progress", "rawjson", "--local", &local])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    std::io::Write::write_all(&mut stdin, &def)?;
    drop(stdin);
    let stderr = child.stderr.take().context("stderr")?;
    // Keep reading so kiln never blocks on a full pipe.
    let reader = std::thread::spawn(move || BufReader::new(stderr).lines().count());
    let deadline = Instant::now() + Duration::from_secs(20);
    let (step, helpers) = loop {
        let below = descendants(child.id());
        let step = below.iter().copied().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker.to_string()))
        });
        let helpers: Vec<u32> = below
            .iter()
            .copied()
            .filter(|p| {
                matches!(
                    comm(*p).as_str(),
                    "slirp4netns" | "pasta" | "passt.avx2" | "passt"
                )
            })
            .collect();
        if let Some(step) = step.filter(|_| !helpers.is_empty()) {
            break (step, helpers);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the step or its network helper never appeared");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let netns = std::fs::read_link(format!("/proc/{step}/ns/net"))
        .context("the step's network namespace")?
        .to_string_lossy()
        .into_owned();
    let own = std::fs::read_link("/proc/self/ns/net")?
        .to_string_lossy()
        .into_owned();
    ensure!(netns != own, "the step shares the test's network namespace");
    ensure!(
        !holders_of(&netns).is_empty(),
        "the namespace check sees nothing"
    );
    child.kill()?;
    let _ = child.wait();
    let _ = reader.join();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = helpers.iter().copied().filter(|p| running(*p)).collect();
        let holders = holders_of(&netns);
        let step_alive = running(step);
        if alive.is_empty() && holders.is_empty() && !step_alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "left behind after kiln was killed: helpers {alive:?}, holders of {netns}: {holders:?}, step running: {step_alive}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn checks(net: &TestNetwork) {
    for (name, result) in [
        ("kiln run", check_run(net)),
        ("kiln build", check_build(net)),
        ("killed build", check_killed_build()),
    ] {
        if let Err(e) = result {
            panic!("{name}: {e:#}");
        }
    }
}

/// The prerequisites: root (for the test network), the stacks and iproute2.
fn ready() -> bool {
    require(is_root(), "root (the test network is a veth pair)")
        && require(which("slirp4netns"), "slirp4netns (scripts/install-deps)")
        && require(which("ip") && which("nsenter"), "iproute2 and nsenter")
}

#[test]
fn sandbox_network_as_root() {
    if !ready() {
        return;
    }
    let net = TestNetwork::get(SUBNET).expect("the test network");
    checks(&net);
}

#[test]
fn sandbox_network_rootless() {
    if std::env::var_os("KILN_TEST_INNER").is_none() {
        // The outer (root) process owns the test network; the test user's run uses it.
        if !ready() {
            return;
        }
        let tun = std::fs::metadata("/dev/net/tun")
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
            .unwrap_or(false);
        if !require(
            tun,
            "/dev/net/tun readable and writable by every user (mode 0666, as udev sets it; scripts/setup-test-env)",
        ) {
            return;
        }
        TestNetwork::get(SUBNET).expect("the test network");
    }
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    assert!(!is_root() || !in_ci(), "the inner run is the test user");
    checks(&TestNetwork::describe(SUBNET));
}
