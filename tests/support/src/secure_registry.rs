//! A registry with TLS and auth on a free 127.0.0.1 port (never 5000, the shared test
//! registry's), for distribution tests: Debian's `docker-registry` with a certificate
//! signed by a throw-away CA (`openssl`), and either a bcrypt htpasswd file (`htpasswd -B`,
//! from apache2-utils: Basic auth) or a token server in front of it (Bearer auth:
//! [`crate::token_server`], whose signing certificate the registry trusts). Everything
//! lives in a temporary directory readable by the test user; the registry is stopped (by
//! its pid, through its `Child`) and the token server with it when the guard drops, and
//! both die with the test process.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::host::{require, which};
use crate::token_server::{ISSUER, SERVICE, TokenServer};

/// The user and password the registry accepts.
pub const USER: &str = "kiln";
pub const PASSWORD: &str = "s3cret-pass";

/// How the registry authenticates clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Basic auth against an htpasswd file.
    Htpasswd,
    /// Bearer tokens from a token server.
    Token,
}

/// A running TLS registry; stopped on drop.
#[derive(Debug)]
pub struct SecureRegistry {
    child: Child,
    // Dropped after the registry is killed (fields drop after `Drop::drop`).
    token: Option<TokenServer>,
    dir: tempfile::TempDir,
    port: u16,
}

fn run(dir: &Path, program: &str, args: &[&str]) -> Vec<u8> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

impl SecureRegistry {
    /// Starts one with htpasswd (Basic) auth, or `None` outside CI when
    /// `docker-registry`, `openssl` or `htpasswd` is missing (under `CI=true` that fails
    /// the test).
    pub fn start() -> Option<Self> {
        Self::start_with(RegistryAuth::Htpasswd)
    }

    /// Starts one with `auth`.
    pub fn start_with(auth: RegistryAuth) -> Option<Self> {
        if !require(
            which("docker-registry") && which("openssl") && which("htpasswd"),
            "docker-registry, openssl and htpasswd (for the TLS test registry)",
        ) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("kiln-tls-registry-")
            .tempdir()
            .expect("temporary directory");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let d = dir.path();
        run(
            d,
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=kiln-test-ca",
            ],
        );
        run(
            d,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write ext.cnf");
        run(
            d,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let htpasswd = run(d, "htpasswd", &["-Bbn", USER, PASSWORD]);
        std::fs::write(d.join("htpasswd"), htpasswd).expect("write htpasswd");
        // skopeo's --cert-dir takes CAs as *.crt.
        std::fs::create_dir(d.join("certs")).expect("certs directory");
        std::fs::copy(d.join("ca.pem"), d.join("certs/ca.crt")).expect("copy the CA");
        for f in [
            "ca.pem",
            "server.pem",
            "server.key",
            "htpasswd",
            "certs/ca.crt",
        ] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        let (token, auth_config) = match auth {
            RegistryAuth::Htpasswd => (
                None,
                format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: '{}'\n",
                    d.join("htpasswd").display()
                ),
            ),
            RegistryAuth::Token => {
                run(
                    d,
                    "openssl",
                    &[
                        "req",
                        "-x509",
                        "-newkey",
                        "rsa:2048",
                        "-nodes",
                        "-keyout",
                        "token.key",
                        "-out",
                        "token.pem",
                        "-days",
                        "2",
                        "-subj",
                        "/CN=kiln-test-token-signer",
                    ],
                );
                let server =
                    TokenServer::start(&d.join("token.key"), &d.join("token.pem"), USER, PASSWORD);
                let config = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    \
                     issuer: {ISSUER}\n    rootcertbundle: '{}'\n",
                    server.realm(),
                    d.join("token.pem").display()
                );
                (Some(server), config)
            }
        };
        std::fs::create_dir(d.join("storage")).expect("storage");
        // A free port: bound and released here (nothing else on this machine hands out
        // ports in this range while the test starts).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        std::fs::write(
            d.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: '{}'\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: '{}'\n    key: '{}'\n\
                 {auth_config}",
                d.join("storage").display(),
                d.join("server.pem").display(),
                d.join("server.key").display(),
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(d.join("registry.log")).expect("log");
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        crate::host::die_with_this_process(&mut command);
        let child = command.spawn().expect("start docker-registry");
        let mut registry = SecureRegistry {
            child,
            token,
            dir,
            port,
        };
        for _ in 0..300 {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    std::fs::read_to_string(registry.dir.path().join("registry.log"))
                        .unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(registry);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("docker-registry did not listen on 127.0.0.1:{port}");
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA certificate (PEM) that signed the registry's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A directory with the CA as `ca.crt` (skopeo's `--cert-dir`).
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The token server, for a registry with token auth.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// A `kiln.toml` trusting the CA for this registry.
    pub fn kiln_toml(&self) -> String {
        format!(
            "[registry.\"{}\"]\nca = [\"{}\"]\n",
            self.host(),
            self.ca().display()
        )
    }

    /// A Docker `config.json` with `user:password` for this registry.
    pub fn docker_config(&self, user: &str, password: &str) -> String {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.host())
    }
}

impl Drop for SecureRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
