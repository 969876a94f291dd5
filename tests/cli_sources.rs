//! Sources end to end through `kiln build`, as root and as the unprivileged test user:
//!
//! - `http(s)://`: a server on 127.0.0.1 in this test (ETag, Last-Modified,
//!   Content-Disposition, request log) checks BuildKit's reuse by ETag (a second build
//!   asks with `If-None-Match` and downloads no body), the file's name, mode, owner and
//!   time, `http.checksum` (match, cached without a request, mismatch), errors, proxies
//!   from the environment as Go's client uses them, HTTPS with the system CAs
//!   (`SSL_CERT_FILE`), and `ADD <url>` in a Dockerfile.
//! - `local://`: include, exclude (with `!` exceptions) and follow paths, through LLB and
//!   through a Dockerfile's `.dockerignore` and COPY sources; incremental transfers (only
//!   changed files copied, deletions applied: checked with the transfer's counters and
//!   the snapshot store's layer sizes) and symlinks that must not lead the copy outside.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kiln_proto::builder::{DefinitionBuilder, FileActions, default_copy};
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb;
use kiln_testsupport::{AsTestUser, is_root, require, rerun_as_test_user, which};
use sha2::Digest as _;

const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
const LAST_MODIFIED_UNIX: u64 = 1_445_412_480;
const PROXY_ENV: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

// ---------------------------------------------------------------------------------------
// A small HTTP/1.1 server with a request log.

#[derive(Clone, Debug, Default)]
struct Resource {
    body: Vec<u8>,
    etag: Option<String>,
    last_modified: Option<String>,
    disposition: Option<String>,
    /// Answer `If-None-Match` with 304 (else always 200, as some servers do).
    conditional: bool,
}

#[derive(Clone, Debug)]
struct Request {
    method: String,
    /// The request target as sent (absolute through a proxy).
    target: String,
    path: String,
    if_none_match: Option<String>,
    status: u16,
    /// Body bytes sent.
    body: usize,
}

#[derive(Default)]
struct ServerState {
    resources: HashMap<String, Resource>,
    log: Vec<Request>,
}

struct Server {
    port: u16,
    state: Arc<Mutex<ServerState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(ServerState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || serve(stream, &state));
                }
            })
        };
        Server {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set(&self, path: &str, resource: Resource) {
        self.state
            .lock()
            .expect("state")
            .resources
            .insert(path.to_owned(), resource);
    }

    fn log(&self) -> Vec<Request> {
        self.state.lock().expect("state").log.clone()
    }

    /// Requests for `path` since `from` (an index into the log).
    fn requests(&self, path: &str, from: usize) -> Vec<Request> {
        self.log()
            .into_iter()
            .skip(from)
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, state: &Mutex<ServerState>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        // Through a proxy the target is absolute.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest
                .find('/')
                .map_or("/".to_owned(), |i| rest[i..].to_owned()),
            None => target.clone(),
        };
        let if_none_match = headers.get("if-none-match").cloned();
        let resource = state.lock().expect("state").resources.get(&path).cloned();
        let (status, extra, body) = match resource {
            None => (404, Vec::new(), b"not found\n".to_vec()),
            Some(r) => {
                let mut extra = Vec::new();
                if let Some(etag) = &r.etag {
                    extra.push(format!("ETag: {etag}"));
                }
                if let Some(lm) = &r.last_modified {
                    extra.push(format!("Last-Modified: {lm}"));
                }
                if let Some(cd) = &r.disposition {
                    extra.push(format!("Content-Disposition: {cd}"));
                }
                let not_modified = r.conditional
                    && match (&r.etag, &if_none_match) {
                        // Weak comparison, as If-None-Match asks for.
                        (Some(etag), Some(inm)) => {
                            let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
                            inm.split(',').any(|t| weak(t) == weak(etag))
                        }
                        _ => false,
                    };
                if not_modified {
                    (304, extra, Vec::new())
                } else {
                    (200, extra, r.body.clone())
                }
            }
        };
        let send_body = method != "HEAD" && status != 304;
        let mut response = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
        for h in extra {
            response.push_str(&h);
            response.push_str("\r\n");
        }
        response.push_str("\r\n");
        let mut bytes = response.into_bytes();
        if send_body {
            bytes.extend_from_slice(&body);
        }
        state.lock().expect("state").log.push(Request {
            method: method.clone(),
            target,
            path,
            if_none_match,
            status,
            body: if send_body { body.len() } else { 0 },
        });
        if stream.write_all(&bytes).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running kiln.

struct Kiln {
    state: tempfile::TempDir,
}

impl Kiln {
    fn new() -> Self {
        Kiln {
            state: tempfile::tempdir().expect("state"),
        }
    }

    fn run(&self, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.arg("--root").arg(self.state.path()).args(args);
        for var in PROXY_ENV.iter().chain(&["SSL_CERT_FILE", "SSL_CERT_DIR"]) {
            command.env_remove(var);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kiln");
        let mut input = child.stdin.take().expect("stdin");
        let _ = input.write_all(stdin);
        drop(input);
        child.wait_with_output().expect("wait for kiln")
    }

    /// Builds `def`, exporting a tar to standard output.
    fn build_tar(&self, def: &[u8], extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args = vec!["build", "--progress", "plain", "-o", "type=tar,dest=-"];
        args.extend_from_slice(extra);
        self.run(&args, def, env)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", stderr(o));
}

/// One tar entry: type, mode, ids, mtime, contents or link target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
}

fn entries(tar_bytes: &[u8]) -> BTreeMap<String, Entry> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let header = entry.header().clone();
        let path = entry
            .path()
            .expect("path")
            .to_string_lossy()
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_owned();
        if path.is_empty() || path == "." {
            continue; // the root
        }
        let kind = match header.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            _ => 'f',
        };
        let mut data = Vec::new();
        if kind == 'l' || kind == 'h' {
            data = header
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default();
        } else {
            entry.read_to_end(&mut data).expect("read");
        }
        out.insert(
            path,
            Entry {
                kind,
                mode: header.mode().expect("mode"),
                uid: header.uid().expect("uid"),
                gid: header.gid().expect("gid"),
                mtime: header.mtime().expect("mtime"),
                data,
            },
        );
    }
    out
}

fn names(tar_bytes: &[u8]) -> Vec<String> {
    entries(tar_bytes).into_keys().collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// A Definition whose result is one source.
fn source_def(identifier: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let attrs = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let out = b.source(identifier, attrs);
    b.finish(&out).gogo_encode()
}

/// A Definition copying a source's `src` to `/out/` of scratch.
fn copy_def(identifier: &str, attrs: &[(&str, &str)], src: &str) -> Vec<u8> {
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let attrs = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let source = b.source(identifier, attrs);
    let out = b.file(FileActions::on(None).copy(
        source,
        src,
        "/out/",
        pb::FileActionCopy {
            create_dest_path: true,
            ..default_copy()
        },
    ));
    b.finish(&out).gogo_encode()
}

// ---------------------------------------------------------------------------------------
// HTTP.

fn check_http_etags(k: &Kiln, server: &Server) {
    let path = "/files/data.txt";
    server.set(
        path,
        Resource {
            body: b"hello v1\n".to_vec(),
            etag: Some("\"v1\"".into()),
            last_modified: Some(LAST_MODIFIED.into()),
            conditional: true,
            ..Resource::default()
        },
    );
    let def = source_def(&server.url(path), &[]);
    let first = k.build_tar(&def, &[], &[]);
    ok(&first, "first download");
    let files = entries(&first.stdout);
    let file = &files["data.txt"];
    assert_eq!(file.data, b"hello v1\n");
    assert_eq!(file.mode & 0o7777, 0o600, "BuildKit's default mode");
    assert_eq!((file.uid, file.gid), (0, 0));
    assert_eq!(file.mtime, LAST_MODIFIED_UNIX, "mtime from Last-Modified");
    let log = server.requests(path, 0);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].method.as_str(), log[0].body), ("GET", 9));
    assert_eq!(log[0].if_none_match, None);

    // Same ETag: a conditional HEAD, no body.
    let mark = server.log().len();
    let second = k.build_tar(&def, &[], &[]);
    ok(&second, "second build");
    assert_eq!(entries(&second.stdout)["data.txt"].data, b"hello v1\n");
    let log = server.requests(path, mark);
    assert_eq!(log.len(), 1, "only a HEAD: {log:?}");
    assert_eq!(log[0].method, "HEAD");
    assert_eq!(log[0].if_none_match.as_deref(), Some("\"v1\""));
    assert_eq!(log[0].status, 304);
    assert_eq!(
        log.iter().map(|r| r.body).sum::<usize>(),
        0,
        "no body downloaded"
    );

    // Changed: HEAD says 200 with another ETag, the GET downloads.
    server.set(
        path,
        Resource {
            body: b"hello v2, longer\n".to_vec(),
            etag: Some("W/\"v2\"".into()),
            conditional: true,
            ..Resource::default()
        },
    );
    let mark = server.log().len();
    let third = k.build_tar(&def, &[], &[]);
    ok(&third, "changed resource");
    let files = entries(&third.stdout);
    assert_eq!(files["data.txt"].data, b"hello v2, longer\n");
    assert_eq!(files["data.txt"].mtime, 0, "no Last-Modified: the epoch");
    let log = server.requests(path, mark);
    let methods: Vec<_> = log.iter().map(|r| (r.method.as_str(), r.status)).collect();
    assert_eq!(methods, [("HEAD", 200), ("GET", 200)], "{log:?}");
    assert_eq!(log[1].if_none_match.as_deref(), Some("\"v1\""));

    // Both ETags are offered now; the weak one is sent as the strong one.
    let mark = server.log().len();
    ok(&k.build_tar(&def, &[], &[]), "fourth build");
    let log = server.requests(path, mark);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].if_none_match.as_deref(), Some("\"v1\", \"v2\""));
    assert_eq!(log[0].body, 0);

    // A server that answers HEAD with 200 and the same ETag: compared by kiln.
    let plain = "/files/unconditional.bin";
    server.set(
        plain,
        Resource {
            body: vec![7; 4096],
            etag: Some("\"u1\"".into()),
            conditional: false,
            ..Resource::default()
        },
    );
    let def = source_def(&server.url(plain), &[]);
    ok(&k.build_tar(&def, &[], &[]), "unconditional server");
    let mark = server.log().len();
    let again = k.build_tar(&def, &[], &[]);
    ok(&again, "unconditional server again");
    assert_eq!(
        entries(&again.stdout)["unconditional.bin"].data,
        vec![7; 4096]
    );
    let log = server.requests(plain, mark);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].method.as_str(), log[0].status), ("HEAD", 200));

    // Without an ETag every build downloads (nothing to ask about).
    let untagged = "/files/untagged.txt";
    server.set(
        untagged,
        Resource {
            body: b"no etag\n".to_vec(),
            ..Resource::default()
        },
    );
    let def = source_def(&server.url(untagged), &[]);
    ok(&k.build_tar(&def, &[], &[]), "untagged");
    ok(&k.build_tar(&def, &[], &[]), "untagged again");
    let gets: Vec<_> = server
        .requests(untagged, 0)
        .into_iter()
        .map(|r| (r.method, r.body))
        .collect();
    assert_eq!(gets, [("GET".to_owned(), 8), ("GET".to_owned(), 8)]);
}

fn check_http_prune_is_a_miss(k: &Kiln, server: &Server) {
    let path = "/files/pruned.txt";
    server.set(
        path,
        Resource {
            body: b"kept?\n".to_vec(),
            etag: Some("\"p1\"".into()),
            conditional: true,
            ..Resource::default()
        },
    );
    let def = source_def(&server.url(path), &[]);
    ok(&k.build_tar(&def, &[], &[]), "before prune");
    ok(&k.run(&["prune", "--all"], b"", &[]), "prune");
    let mark = server.log().len();
    let after = k.build_tar(&def, &[], &[]);
    ok(&after, "after prune");
    assert_eq!(entries(&after.stdout)["pruned.txt"].data, b"kept?\n");
    let log = server.requests(path, mark);
    // The record's snapshot is gone: nothing to offer, a plain download.
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].method.as_str(), log[0].body), ("GET", 6));
    assert_eq!(log[0].if_none_match, None);
}

fn check_http_names_and_attributes(k: &Kiln, server: &Server) {
    let cd = "/cd/get";
    server.set(
        cd,
        Resource {
            body: b"#!/bin/sh\n".to_vec(),
            disposition: Some("attachment; filename=\"../../evil.sh\"".into()),
            ..Resource::default()
        },
    );
    let out = k.build_tar(&source_def(&server.url(cd), &[]), &[], &[]);
    ok(&out, "content-disposition");
    assert_eq!(names(&out.stdout), ["evil.sh"], "a base name, never a path");

    let path = "/files/attrs.bin";
    server.set(
        path,
        Resource {
            body: b"attrs".to_vec(),
            last_modified: Some(LAST_MODIFIED.into()),
            ..Resource::default()
        },
    );
    let def = source_def(
        &server.url(path),
        &[
            ("http.filename", "custom.bin"),
            ("http.perm", "0755"),
            ("http.uid", "1000"),
            ("http.gid", "1001"),
        ],
    );
    let out = k.build_tar(&def, &[], &[]);
    ok(&out, "attributes");
    let files = entries(&out.stdout);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["custom.bin"]);
    let file = &files["custom.bin"];
    assert_eq!(file.mode & 0o7777, 0o755);
    assert_eq!((file.uid, file.gid), (1000, 1001));
    assert_eq!(file.mtime, LAST_MODIFIED_UNIX);
    assert_eq!(file.data, b"attrs");

    // A name with a slash is refused before anything is fetched.
    let mark = server.log().len();
    let out = k.build_tar(
        &source_def(&server.url(path), &[("http.filename", "../x")]),
        &[],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid http.filename \"../x\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(server.log().len(), mark);

    let out = k.build_tar(&source_def(&server.url("/missing"), &[]), &[], &[]);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains(&format!(
            "{}: invalid response status 404",
            server.url("/missing")
        )),
        "{text}"
    );
}

fn check_http_checksums(k: &Kiln, server: &Server) {
    let path = "/files/pinned.tar";
    let body = b"pinned content\n".to_vec();
    server.set(
        path,
        Resource {
            body: body.clone(),
            etag: Some("\"pin\"".into()),
            conditional: true,
            ..Resource::default()
        },
    );
    // Copied into scratch: the copy is cached by the checksum key.
    let def = copy_def(
        &server.url(path),
        &[("http.checksum", &sha256(&body))],
        "/pinned.tar",
    );
    let out = k.build_tar(&def, &[], &[]);
    ok(&out, "checksum match");
    assert_eq!(entries(&out.stdout)["out/pinned.tar"].data, body);
    let mark = server.log().len();
    let out = k.build_tar(&def, &[], &[]);
    ok(&out, "checksum match, cached");
    assert_eq!(entries(&out.stdout)["out/pinned.tar"].data, body);
    assert!(
        server.requests(path, mark).is_empty(),
        "a pinned, cached download asks nothing"
    );

    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = k.build_tar(
        &source_def(&server.url(path), &[("http.checksum", &wrong)]),
        &[],
        &[],
    );
    assert!(!out.status.success(), "a mismatch fails");
    let text = stderr(&out);
    let line = text.lines().last().unwrap_or_default();
    assert!(line.contains(&server.url(path)), "names the URL: {line}");
    assert!(line.contains("digest mismatch"), "{line}");
    assert!(
        line.contains(&sha256(&body)),
        "names the actual digest: {line}"
    );
    assert!(line.contains(&wrong), "names the expected digest: {line}");
}

fn check_http_proxies(k: &Kiln, server: &Server) {
    let path = "/proxied.txt";
    server.set(
        path,
        Resource {
            body: b"via proxy\n".to_vec(),
            ..Resource::default()
        },
    );
    let proxy = format!("127.0.0.1:{}", server.port);
    // A name that does not resolve: only the proxy can answer.
    let url = format!("http://kiln-proxy-test.invalid{path}");
    let def = source_def(&url, &[]);
    let mark = server.log().len();
    let out = k.build_tar(&def, &[], &[("http_proxy", &proxy)]);
    ok(&out, "through the proxy");
    assert_eq!(entries(&out.stdout)["proxied.txt"].data, b"via proxy\n");
    let log = server.requests(path, mark);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(
        log[0].target, url,
        "an absolute request target: a proxy request"
    );

    // 0.0.0.0 is not loopback, so it is proxied (an absolute target), unless NO_PROXY
    // names it (then kiln connects itself: Linux takes 0.0.0.0 as this host).
    let any = format!("http://0.0.0.0:{}{path}", server.port);
    let def = source_def(&any, &[]);
    for (no_proxy, proxied) in [("", true), ("example.com, 0.0.0.0", false)] {
        let mark = server.log().len();
        let out = k.build_tar(&def, &[], &[("HTTP_PROXY", &proxy), ("NO_PROXY", no_proxy)]);
        ok(&out, &format!("NO_PROXY={no_proxy:?}"));
        let log = server.requests(path, mark);
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(
            log[0].target == any,
            proxied,
            "NO_PROXY={no_proxy:?}: {log:?}"
        );
    }

    // Loopback never goes through a proxy (Go's rule): a dead proxy does not matter.
    let local = "/files/local.txt";
    server.set(
        local,
        Resource {
            body: b"direct\n".to_vec(),
            ..Resource::default()
        },
    );
    let out = k.build_tar(
        &source_def(&server.url(local), &[]),
        &[],
        &[("HTTP_PROXY", "http://127.0.0.1:9")],
    );
    ok(&out, "loopback bypasses the proxy");
    assert_eq!(entries(&out.stdout)["local.txt"].data, b"direct\n");
}

/// HTTPS against `openssl s_server -WWW` with a throw-away CA trusted through
/// `SSL_CERT_FILE`, as Go's client would trust it.
fn check_https(k: &Kiln) {
    if !require(which("openssl"), "openssl (HTTPS test server)") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    openssl(&[
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
    ]);
    openssl(&[
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
    ]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(&[
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
    ]);
    std::fs::write(d.join("secure.txt"), "over tls\n").expect("file");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-WWW",
            "-cert",
            "server.pem",
            "-key",
            "server.key",
            "-accept",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let def = source_def(&format!("https://127.0.0.1:{port}/secure.txt"), &[]);
    let ca = d.join("ca.pem");
    let untrusted = k.build_tar(&def, &[], &[]);
    let trusted = k.build_tar(&def, &[], &[("SSL_CERT_FILE", &ca.display().to_string())]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(!untrusted.status.success(), "an unknown CA is refused");
    ok(&trusted, "https with SSL_CERT_FILE");
    assert_eq!(entries(&trusted.stdout)["secure.txt"].data, b"over tls\n");
}

fn check_http_dockerfile(k: &Kiln, server: &Server) {
    let path = "/files/tool.sh";
    let body = b"echo tool\n".to_vec();
    server.set(
        path,
        Resource {
            body: body.clone(),
            etag: Some("\"t1\"".into()),
            last_modified: Some(LAST_MODIFIED.into()),
            conditional: true,
            ..Resource::default()
        },
    );
    let ctx = tempfile::tempdir().expect("context");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nADD {url} /bin/\nADD --chmod=755 --checksum={sum} {url} /tool\n",
            url = server.url(path),
            sum = sha256(&body)
        ),
    )
    .expect("Dockerfile");
    let dir = ctx.path().display().to_string();
    let out = k.build_tar(b"", &[&dir], &[]);
    ok(&out, "ADD <url>");
    let files = entries(&out.stdout);
    assert_eq!(files["bin/tool.sh"].data, body);
    assert_eq!(files["bin/tool.sh"].mode & 0o777, 0o600);
    assert_eq!(files["bin/tool.sh"].mtime, LAST_MODIFIED_UNIX);
    assert_eq!(files["tool"].mode & 0o777, 0o755);
    // Again: the unpinned ADD asks with its ETag, the pinned one asks nothing.
    let mark = server.log().len();
    let again = k.build_tar(b"", &[&dir], &[]);
    ok(&again, "ADD <url> again");
    assert!(stderr(&again).contains("CACHED"), "{}", stderr(&again));
    let log = server.requests(path, mark);
    assert_eq!(log.iter().map(|r| r.body).sum::<usize>(), 0, "{log:?}");
    assert_eq!(log.len(), 1, "{log:?}");
}

// ---------------------------------------------------------------------------------------
// Local sources.

/// The counters of the transfer line a local source logs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Transfer {
    files: u64,
    bytes: u64,
    removed: u64,
    unchanged: u64,
}

fn transfer(stderr: &str, name: &str) -> Transfer {
    let prefix = format!("transferring {name}: ");
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("no transfer line for {name}:\n{stderr}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("number"))
        .collect();
    // "F files (B bytes) copied, C entries created, D directories updated, R removed, U unchanged"
    Transfer {
        files: numbers[0],
        bytes: numbers[1],
        removed: numbers[4],
        unchanged: numbers[5],
    }
}

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

fn check_local_selection(k: &Kiln) {
    let ctx = tempfile::tempdir().expect("context");
    let c = ctx.path();
    write(&c.join("a.txt"), b"a");
    write(&c.join("b.log"), b"b");
    write(&c.join("docs/x.md"), b"x");
    write(&c.join("docs/keep.md"), b"keep");
    write(&c.join("real/f"), b"f");
    write(&c.join("real/g"), b"g");
    symlink("real", c.join("link")).expect("symlink");
    symlink("/etc/passwd", c.join("passwd")).expect("symlink");
    let local = format!("ctx={}", c.display());
    let build = |attrs: &[(&str, &str)]| -> Vec<String> {
        let out = k.build_tar(&source_def("local://ctx", attrs), &["--local", &local], &[]);
        ok(&out, &format!("{attrs:?}"));
        names(&out.stdout)
    };
    assert_eq!(
        build(&[("local.includepattern", r#"["*.txt","docs"]"#)]),
        ["a.txt", "docs", "docs/keep.md", "docs/x.md"]
    );
    assert_eq!(
        build(&[(
            "local.excludepatterns",
            r#"["docs","!docs/keep.md","*.log","real","link"]"#
        )]),
        ["a.txt", "docs", "docs/keep.md", "passwd"]
    );
    assert_eq!(
        build(&[("local.followpaths", r#"["link/f","a.txt"]"#)]),
        ["a.txt", "link", "real", "real/f"]
    );
    assert_eq!(
        build(&[
            ("local.includepattern", r#"["docs"]"#),
            ("local.excludepatterns", r#"["**/x.md"]"#),
            ("local.followpaths", r#"["passwd"]"#),
        ]),
        ["docs", "docs/keep.md", "passwd"]
    );
    // The symlink to /etc/passwd is a link in the result: the host file is never read.
    let out = k.build_tar(&source_def("local://ctx", &[]), &["--local", &local], &[]);
    ok(&out, "whole context");
    let files = entries(&out.stdout);
    assert_eq!(files["passwd"].kind, 'l');
    assert_eq!(files["passwd"].data, b"/etc/passwd");
    let bad = k.build_tar(
        &source_def("local://ctx", &[("local.excludepatterns", r#"["!"]"#)]),
        &["--local", &local],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("illegal exclusion pattern"),
        "{}",
        stderr(&bad)
    );
}

fn check_local_dockerfile(k: &Kiln) {
    let ctx = tempfile::tempdir().expect("context");
    let c = ctx.path();
    write(&c.join("a.txt"), b"a");
    write(&c.join("b.txt"), b"not used");
    write(&c.join("docs/x.md"), b"x");
    write(&c.join("docs/keep.md"), b"keep");
    write(&c.join("real/f"), b"f");
    symlink("real", c.join("link")).expect("symlink");
    write(&c.join(".dockerignore"), b"docs\n!docs/keep.md\n");
    write(
        &c.join("Dockerfile"),
        b"FROM scratch\nCOPY a.txt link/f docs /out/\n",
    );
    let out = k.build_tar(b"", &[&c.display().to_string()], &[]);
    ok(&out, "Dockerfile context");
    assert_eq!(
        names(&out.stdout),
        ["out", "out/a.txt", "out/f", "out/keep.md"]
    );
    // Only what the Dockerfile names (its follow paths) minus .dockerignore was sent:
    // a.txt, real/f and docs/keep.md.
    let t = transfer(&stderr(&out), "context");
    assert_eq!((t.files, t.bytes), (3, 1 + 1 + 4), "{t:?}");
}

/// `kiln du -v` records of transfers of the local directory `name`: (id, parent, size in
/// bytes).
fn local_records(k: &Kiln, name: &str) -> Vec<(String, Option<String>, f64)> {
    let out = k.run(&["du", "-v"], b"", &[]);
    ok(&out, "du");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut records = Vec::new();
    for block in text.split("\n\n") {
        if !block.contains("Type:\t\tsource.local")
            || !block.contains(&format!("Description:\tlocal source for {name}\n"))
        {
            continue;
        }
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let size = field("Size:").expect("size");
        let (number, unit) =
            size.split_at(size.find(|c: char| c.is_ascii_alphabetic()).expect("unit"));
        let factor = match unit {
            "B" => 1.0,
            "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            other => panic!("unit {other}"),
        };
        records.push((
            field("ID:").expect("id"),
            field("Parent:"),
            number.parse::<f64>().expect("size") * factor,
        ));
    }
    records
}

fn check_local_incremental(k: &Kiln) {
    let ctx = tempfile::tempdir().expect("context");
    let c = ctx.path();
    const FILES: usize = 200;
    const SIZE: usize = 16 * 1024;
    for i in 0..FILES {
        let content: Vec<u8> = (0..SIZE).map(|j| ((i * 31 + j) % 251) as u8).collect();
        write(&c.join(format!("dir{}/file{i}", i % 10)), &content);
    }
    write(&c.join("sub/inner"), b"inner");
    let local = format!("inc={}", c.display());
    let def = source_def("local://inc", &[("local.sharedkeyhint", "inc")]);
    let first = k.build_tar(&def, &["--local", &local], &[]);
    ok(&first, "first transfer");
    let t = transfer(&stderr(&first), "inc");
    assert_eq!(
        (t.files, t.bytes),
        (FILES as u64 + 1, (FILES * SIZE + 5) as u64)
    );
    let before = local_records(k, "inc");
    assert_eq!(before.len(), 1, "{before:?}");

    // Nothing changed: nothing copied, no new snapshot.
    let same = k.build_tar(&def, &["--local", &local], &[]);
    ok(&same, "unchanged");
    let t = transfer(&stderr(&same), "inc");
    assert_eq!((t.files, t.removed), (0, 0), "{t:?}");
    assert_eq!(local_records(k, "inc").len(), 1);

    // One changed, one added, one deleted; `sub` becomes a symlink to a host directory.
    let outside = tempfile::tempdir().expect("outside");
    write(&outside.path().join("inner"), b"host file");
    write(&c.join("dir3/file3"), b"changed");
    write(&c.join("dir0/added"), b"added!");
    std::fs::remove_file(c.join("dir5/file5")).expect("rm");
    std::fs::remove_dir_all(c.join("sub")).expect("rm sub");
    symlink(outside.path(), c.join("sub")).expect("symlink");
    let second = k.build_tar(&def, &["--local", &local], &[]);
    ok(&second, "incremental");
    let t = transfer(&stderr(&second), "inc");
    assert_eq!(
        (t.files, t.bytes),
        (2, 7 + 6),
        "only the changed and the added file: {t:?}"
    );
    // file3 replaced, file5 deleted, the `sub` tree replaced by the link.
    assert_eq!(t.removed, 3, "{t:?}");
    assert!(t.unchanged >= FILES as u64 - 2, "{t:?}");
    let files = entries(&second.stdout);
    assert_eq!(files["dir3/file3"].data, b"changed");
    assert_eq!(files["dir0/added"].data, b"added!");
    assert!(!files.contains_key("dir5/file5"), "the deletion propagates");
    assert_eq!(files["sub"].kind, 'l');
    assert!(!files.contains_key("sub/inner"));
    assert_eq!(
        std::fs::read(outside.path().join("inner")).expect("host file"),
        b"host file",
        "nothing written through the link"
    );
    let unchanged = &files["dir7/file7"];
    assert_eq!(unchanged.data.len(), SIZE);
    // The snapshot store agrees: a new layer on the first transfer, a small one.
    let after = local_records(k, "inc");
    assert_eq!(after.len(), 2, "{after:?}");
    let base = after
        .iter()
        .find(|r| r.0 == before[0].0)
        .expect("first transfer kept");
    let layer = after
        .iter()
        .find(|r| r.0 != before[0].0)
        .expect("new layer");
    assert_eq!(
        layer.1.as_deref(),
        Some(base.0.as_str()),
        "a layer on the last transfer"
    );
    assert!(
        layer.2 * 20.0 < base.2,
        "the layer holds the changes only: {} vs {} bytes",
        layer.2,
        base.2
    );

    // Back to the first state with a full copy elsewhere: the same tree either way.
    let fresh = Kiln::new();
    let full = fresh.build_tar(&def, &["--local", &local], &[]);
    ok(&full, "full copy");
    assert_eq!(entries(&full.stdout), files, "incremental == full transfer");

    // Metadata alone is a change: a mode, and (as root, who may chown) an owner.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(c.join("dir1/file1"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    if is_root() {
        std::os::unix::fs::chown(c.join("dir2/file2"), Some(1234), Some(1235)).expect("chown");
    }
    let third = k.build_tar(&def, &["--local", &local], &[]);
    ok(&third, "metadata changes");
    let t = transfer(&stderr(&third), "inc");
    assert_eq!(t.files, if is_root() { 2 } else { 1 }, "{t:?}");
    let files = entries(&third.stdout);
    assert_eq!(files["dir1/file1"].mode & 0o7777, 0o640);
    if is_root() {
        let owner = &files["dir2/file2"];
        assert_eq!((owner.uid, owner.gid), (1234, 1235));
    }
}

/// Each changed build adds a layer; past the limit the chain starts again with a full copy
/// and the old chain goes; a prune costs a full copy and nothing else.
fn check_local_chain_restarts(k: &Kiln) {
    let ctx = tempfile::tempdir().expect("context");
    let c = ctx.path();
    write(&c.join("a"), b"a");
    write(&c.join("b"), b"b");
    let local = format!("chain={}", c.display());
    let def = source_def("local://chain", &[("local.sharedkeyhint", "chain")]);
    let build = |round: usize| -> Transfer {
        write(&c.join("counter"), round.to_string().as_bytes());
        let out = k.build_tar(&def, &["--local", &local], &[]);
        ok(&out, &format!("round {round}"));
        assert_eq!(
            entries(&out.stdout)["counter"].data,
            round.to_string().as_bytes()
        );
        transfer(&stderr(&out), "chain")
    };
    for round in 0..16 {
        let t = build(round);
        let expected = if round == 0 { 3 } else { 1 };
        assert_eq!(t.files, expected, "round {round}: {t:?}");
    }
    let records = local_records(k, "chain");
    assert_eq!(
        records.len(),
        16,
        "one layer per changed build: {records:?}"
    );
    let t = build(16);
    assert_eq!(t.files, 3, "a full copy starts the chain again: {t:?}");
    let records = local_records(k, "chain");
    assert_eq!(records.len(), 1, "the old chain is gone: {records:?}");
    assert_eq!(records[0].1, None);

    ok(&k.run(&["prune", "--all"], b"", &[]), "prune");
    assert!(local_records(k, "chain").is_empty());
    let t = build(17);
    assert_eq!(t.files, 3, "after a prune: a full copy: {t:?}");

    // `local.differ=none`: nothing is taken as unchanged.
    let none = source_def(
        "local://chain",
        &[("local.sharedkeyhint", "chain"), ("local.differ", "none")],
    );
    let out = k.build_tar(&none, &["--local", &local], &[]);
    ok(&out, "differ none");
    let t = transfer(&stderr(&out), "chain");
    assert_eq!((t.files, t.unchanged), (3, 0), "{t:?}");
}

// ---------------------------------------------------------------------------------------

fn check_sources() {
    let k = Kiln::new();
    let server = Server::start();
    check_http_etags(&k, &server);
    check_http_names_and_attributes(&k, &server);
    check_http_checksums(&k, &server);
    check_http_proxies(&k, &server);
    check_http_dockerfile(&k, &server);
    check_http_prune_is_a_miss(&k, &server);
    check_https(&k);
    check_local_selection(&k);
    check_local_dockerfile(&k);
    check_local_incremental(&k);
    check_local_chain_restarts(&k);
}

#[test]
fn sources_as_root() {
    if !require(is_root(), "root") {
        return;
    }
    check_sources();
}

#[test]
fn sources_rootless() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    check_sources();
}
