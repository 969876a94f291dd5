//! A network the test owns, for the sandbox-network tests: a network namespace held by a
//! thread of the test process, joined to the host's namespace by a veth pair with the
//! addresses `198.18.<n>.1` (host side) and `198.18.<n>.2` (test side, RFC 2544's
//! benchmarking range, routed nowhere else), and a TCP server on `198.18.<n>.2:8080` that
//! greets every connection with [`TestNetwork::greeting`] and closes it.
//!
//! Needs root (a veth pair). Nothing outlives the test process: the namespace belongs to
//! the thread (never bound to a path), and the veth pair goes with it.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

use anyhow::{Context, bail};

/// The port of the test server.
pub const PORT: u16 = 8080;

/// A test-owned network (see the module docs).
#[derive(Debug, Clone)]
pub struct TestNetwork {
    /// The server's address, reachable from the host's namespace through the veth pair.
    pub server: SocketAddrV4,
    /// The host side's interface name.
    pub host_interface: String,
}

impl TestNetwork {
    /// What the server writes to each connection.
    pub fn greeting(&self) -> String {
        format!("kiln-test-server {}", self.server.ip())
    }

    /// The network with subnet number `n`, started once per process. Each test binary
    /// uses its own `n`, so binaries running at once do not collide.
    pub fn get(n: u8) -> anyhow::Result<TestNetwork> {
        static NETWORKS: OnceLock<Mutex<Vec<(u8, TestNetwork)>>> = OnceLock::new();
        let mut started = NETWORKS
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, net)) = started.iter().find(|(k, _)| *k == n) {
            return Ok(net.clone());
        }
        let net = start(n)?;
        started.push((n, net.clone()));
        Ok(net)
    }

    /// The network [`TestNetwork::get`] starts for `n`, without starting it: for a test's
    /// run as the test user, whose root parent started it.
    pub fn describe(n: u8) -> TestNetwork {
        TestNetwork {
            server: SocketAddrV4::new(Ipv4Addr::new(198, 18, n, 2), PORT),
            host_interface: String::new(),
        }
    }

    /// The test server's address as `ip port` (for `nc`).
    pub fn nc_target(&self) -> String {
        format!("{} {}", self.server.ip(), self.server.port())
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn start(n: u8) -> anyhow::Result<TestNetwork> {
    let host_if = format!("kilnt{n}h{}", std::process::id() % 10000);
    let test_if = "eth1";
    let host_ip = Ipv4Addr::new(198, 18, n, 1);
    let server_ip = Ipv4Addr::new(198, 18, n, 2);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (listener_tx, listener_rx) = std::sync::mpsc::channel::<TcpListener>();
    // The thread moves into a new network namespace (unshare affects only the calling
    // thread), which it holds for the rest of the process, and serves there.
    std::thread::Builder::new()
        .name(format!("kiln-test-net{n}"))
        .spawn(move || {
            let unshared = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| nix::unistd::gettid())
                .map_err(|e| anyhow::anyhow!("unshare(CLONE_NEWNET): {e}"));
            let failed = unshared.is_err();
            let _ = tid_tx.send(unshared);
            if failed {
                return;
            }
            if let Ok(listener) = listener_rx.recv() {
                serve(&listener, server_ip);
            }
        })
        .context("starting the test network thread")?;
    let tid = tid_rx.recv().context("the test network thread")??;
    let ns = format!("/proc/{}/task/{}/ns/net", std::process::id(), tid);
    let net_arg = format!("--net={ns}");
    let inside = |args: &[&str]| {
        let mut all = vec!["nsenter", net_arg.as_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    let tid_text = tid.to_string();
    run(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", test_if, "netns", &tid_text,
    ])?;
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{host_ip}/24"),
        "dev",
        &host_if,
    ])?;
    run(&["ip", "link", "set", &host_if, "up"])?;
    inside(&[
        "ip",
        "addr",
        "add",
        &format!("{server_ip}/24"),
        "dev",
        test_if,
    ])?;
    inside(&["ip", "link", "set", test_if, "up"])?;
    inside(&["ip", "link", "set", "lo", "up"])?;
    let listener = bind_in(&ns, SocketAddrV4::new(server_ip, PORT))?;
    listener_tx
        .send(listener)
        .map_err(|_| anyhow::anyhow!("the test network thread ended"))?;
    Ok(TestNetwork {
        server: SocketAddrV4::new(server_ip, PORT),
        host_interface: host_if,
    })
}

/// A listener in the namespace at `ns`: a short-lived thread joins it, binds, and hands
/// the socket back (a socket stays in the namespace it was made in).
fn bind_in(ns: &str, addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<TcpListener> {
        let fd = std::fs::File::open(&ns).with_context(|| format!("opening {ns}"))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("joining {ns}"))?;
        TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the bind thread panicked"))?
}

fn serve(listener: &TcpListener, ip: Ipv4Addr) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = writeln!(stream, "kiln-test-server {ip}");
    }
}

/// A listener on the host's loopback (`127.0.0.1`, a free port) that greets with `text`;
/// a sandbox step must not reach it. Serves on a thread until the process ends.
pub fn loopback_server(text: &str) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    let text = text.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = writeln!(stream, "{text}");
        }
    });
    Ok(port)
}
