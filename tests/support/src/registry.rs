//! A local registry serving the shared test images (`busybox`, `alpine`) at
//! `localhost:5000`, as `../shared/conformance/README.md` describes: Debian's
//! `docker-registry` with a temporary config listening on 127.0.0.1:5000 only and storage in
//! a temporary directory, the images pushed unchanged from the shared OCI layout with
//! `skopeo`, and the busybox manifest digest checked.
//!
//! [`test_registry`] hands out guards on one instance per test process; the registry stops
//! when the last guard drops (after any other process borrowing it is done), and it is
//! killed with the process if that dies (`PR_SET_PDEATHSIG`, set by a thread that lives as
//! long as the process). A registry already serving the right images at 127.0.0.1:5000
//! (another test process's, or the outer process of a test re-run as the test user) is
//! borrowed, not owned. Starting one is serialised across processes with a lock file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use sha2::Digest as _;

use crate::host::{require, which};

/// The registry as test images name it.
pub const REGISTRY_HOST: &str = "localhost:5000";
/// The only address the test registry listens on.
pub const REGISTRY_ADDR: &str = "127.0.0.1:5000";
/// The manifest digest the registry must serve for `busybox:latest`.
pub const BUSYBOX_MANIFEST_DIGEST: &str =
    "sha256:d5a4030b4bfee21110558a967581d0c06d839db7c19607ab17f0a9173265f9b2";
/// The images pushed from the shared layout.
pub const TEST_IMAGES: [&str; 2] = ["busybox", "alpine"];

/// Serialises starting a registry across processes.
const LOCK_PATH: &str = "/tmp/kiln-test-registry.lock";
/// Held shared by every process borrowing a registry it did not start; the owner takes it
/// exclusively before stopping its registry, so it waits for them.
const USERS_LOCK_PATH: &str = "/tmp/kiln-test-registry.users";
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// A handle on the test registry; it keeps running while any guard in this process lives.
#[derive(Debug, Clone)]
pub struct RegistryGuard {
    instance: Arc<Instance>,
}

impl RegistryGuard {
    /// `localhost:5000`.
    pub fn host(&self) -> &'static str {
        REGISTRY_HOST
    }

    /// `localhost:5000/<name>:latest`.
    pub fn image(&self, name: &str) -> String {
        format!("{REGISTRY_HOST}/{name}:latest")
    }

    /// Whether this process started the registry (and will stop it).
    pub fn owned(&self) -> bool {
        self.instance.child.is_some()
    }
}

#[derive(Debug)]
struct Instance {
    child: Option<Mutex<Child>>,
    /// Config, storage and log of a registry this process started.
    dir: Option<tempfile::TempDir>,
    /// A borrower's shared hold on the users lock.
    _users: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // Wait until no other process borrows this registry.
            let _no_users = lock(USERS_LOCK_PATH, nix::fcntl::FlockArg::LockExclusive);
            let mut child = child.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

static CURRENT: Mutex<Weak<Instance>> = Mutex::new(Weak::new());

/// The test registry at `localhost:5000` with `busybox` and `alpine` pushed, or `None` when
/// it cannot run here outside CI (`docker-registry` or `skopeo` missing, or the port taken
/// by something else); under `CI=true` those fail the test. Call it before forking (e.g.
/// before `run_in_private_mount_namespace`) and keep the guard for as long as the registry
/// is used.
pub fn test_registry() -> Option<RegistryGuard> {
    let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(instance) = current.upgrade() {
        return Some(RegistryGuard { instance });
    }
    let mut checked_tools = false;
    // A few rounds: a registry seen serving may be stopping by the time it is borrowed.
    let mut instance = None;
    for _ in 0..5 {
        // Borrowers hold the users lock shared, taken *before* checking, so an owner that
        // is about to stop its registry either waits for them or is done before the check.
        let users = lock(USERS_LOCK_PATH, nix::fcntl::FlockArg::LockShared);
        if serves_test_images() {
            instance = Some(Instance {
                child: None,
                dir: None,
                _users: Some(users),
            });
            break;
        }
        drop(users);
        if !checked_tools {
            if !require(
                which("docker-registry") && which("skopeo"),
                "docker-registry and skopeo (for the test registry)",
            ) {
                return None;
            }
            checked_tools = true;
        }
        let _start = lock(LOCK_PATH, nix::fcntl::FlockArg::LockExclusive);
        match wait_for_port() {
            // Someone else's registry came up: borrow it in the next round.
            Port::Serving => continue,
            Port::Free => {
                instance = Some(start());
                break;
            }
            Port::Taken => {
                let _ = require(
                    false,
                    "a free 127.0.0.1:5000 for the test registry (something else listens there)",
                );
                return None;
            }
        }
    }
    let instance =
        Arc::new(instance.expect("the test registry kept stopping while being borrowed"));
    *current = Arc::downgrade(&instance);
    Some(RegistryGuard { instance })
}

enum Port {
    Serving,
    Free,
    Taken,
}

/// What is on the port, waiting a little while something listens without serving the
/// images: another process's registry may be stopping (or still being filled by a process
/// that does not take the lock).
fn wait_for_port() -> Port {
    for _ in 0..50 {
        if serves_test_images() {
            return Port::Serving;
        }
        if TcpStream::connect_timeout(&addr(), Duration::from_secs(2)).is_err() {
            return Port::Free;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Port::Taken
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

/// Takes a `flock` on `path` (created if needed, usable by every user) until dropped.
fn lock(path: &str, how: nix::fcntl::FlockArg) -> nix::fcntl::Flock<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(path)
        // Another user's lock file can still be locked through a read-only descriptor.
        .or_else(|_| std::fs::File::open(path))
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    nix::fcntl::Flock::lock(file, how).unwrap_or_else(|(_, e)| panic!("locking {path}: {e}"))
}

/// A plain HTTP/1.1 GET to the registry: `(status, body)`.
fn http_get(path: &str, accept: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr(), Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {REGISTRY_HOST}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let body = &response[split + 4..];
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, body))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// The digest of the manifest the registry serves for `<repo>:latest`.
pub fn served_manifest_digest(repo: &str) -> Option<String> {
    let (status, body) = http_get(&format!("/v2/{repo}/manifests/latest"), MANIFEST_TYPES)?;
    (status == 200).then(|| format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))))
}

fn serves_test_images() -> bool {
    served_manifest_digest("busybox").as_deref() == Some(BUSYBOX_MANIFEST_DIGEST)
        && served_manifest_digest("alpine").is_some()
}

/// Spawns commands from a thread that lives as long as the process, so a parent-death
/// signal (which the kernel ties to the spawning *thread*) fires only when the process
/// ends, not when the test thread that asked for the registry finishes.
fn spawn_long_lived(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kiln-test-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn start() -> Instance {
    let dir = tempfile::Builder::new()
        .prefix("kiln-test-registry-")
        .tempdir()
        .expect("temporary directory for the registry");
    let storage = dir.path().join("storage");
    std::fs::create_dir(&storage).expect("registry storage directory");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: '{}'\nhttp:\n  addr: {REGISTRY_ADDR}\n",
            storage.display()
        ),
    )
    .expect("write the registry config");
    let log_path = dir.path().join("registry.log");
    let log = std::fs::File::create(&log_path).expect("registry log");
    let mut command = Command::new("docker-registry");
    command
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("registry log"))
        .stderr(log);
    crate::host::die_with_this_process(&mut command);
    let child = spawn_long_lived(command).expect("start docker-registry");
    let instance = Instance {
        child: Some(Mutex::new(child)),
        dir: Some(dir),
        _users: None,
    };
    wait_until_ready(&instance, &log_path);
    let layout = crate::host::test_image_layout();
    for name in TEST_IMAGES {
        push(&layout, name);
    }
    let served = served_manifest_digest("busybox");
    assert_eq!(
        served.as_deref(),
        Some(BUSYBOX_MANIFEST_DIGEST),
        "the test registry serves busybox with another manifest digest; the push changed it"
    );
    instance
}

fn wait_until_ready(instance: &Instance, log: &Path) {
    // Bounded: a registry that does not answer within a minute is broken, not slow.
    for _ in 0..600 {
        if let Some(child) = &instance.child {
            let mut child = child.lock().unwrap_or_else(PoisonError::into_inner);
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "docker-registry exited ({status}) before answering:\n{}",
                    read_log(log)
                );
            }
        }
        if http_get("/v2/", "application/json").is_some_and(|(status, _)| status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "docker-registry did not answer on {REGISTRY_ADDR}:\n{}",
        read_log(log)
    );
}

fn push(layout: &Path, name: &str) {
    let source: PathBuf = layout.to_owned();
    let output = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{name}", source.display()))
        .arg(format!("docker://{REGISTRY_HOST}/{name}:latest"))
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy of {name} into the test registry failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_chunked_bodies() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert_eq!(dechunk(b"5\r\nab"), None);
    }

    #[test]
    fn serves_the_shared_images_and_stops_with_the_last_guard() {
        let Some(first) = test_registry() else {
            return;
        };
        let second = test_registry().expect("a second guard while the first lives");
        assert!(Arc::ptr_eq(&first.instance, &second.instance));
        assert_eq!(
            served_manifest_digest("busybox").as_deref(),
            Some(BUSYBOX_MANIFEST_DIGEST)
        );
        assert!(served_manifest_digest("alpine").is_some());
        assert_eq!(first.image("alpine"), "localhost:5000/alpine:latest");
        let owned = first.owned();
        drop(first);
        assert!(serves_test_images(), "one guard is still alive");
        drop(second);
        if owned {
            // Dropping the last guard killed and reaped the registry.
            assert!(
                TcpStream::connect_timeout(&addr(), Duration::from_secs(2)).is_err(),
                "the registry still listens after its last guard dropped"
            );
        }
    }
}
