//! Servers for the remote-image tests, on 127.0.0.1 at ports the OS picks, stopped when
//! dropped (also during a panic):
//!
//! - [`FileServer`]: a small HTTP/1.1 server in this process that serves files under a
//!   root directory at their absolute paths, with range requests, ETags and `If-Match`;
//!   it counts what it was asked, and misbehaves on command ([`Faults`]: delays, resets,
//!   500s, short bodies, ignoring Range or If-Match).
//! - [`Moto`]: moto's S3 server (Python), with helpers to make buckets and upload trees;
//! - [`TlsProxy`]: a TLS front with a self-signed certificate, for `https://`.

use super::bytes::unescape;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the [`FileServer`] misbehaves. Counters apply to the next GETs with a range and
/// count down.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Wait this long before answering each request.
    pub delay: Duration,
    /// Close the connection without an answer.
    pub reset: u32,
    /// Answer 500.
    pub error_500: u32,
    /// Send the headers of the full answer and half the body, then close.
    pub short: u32,
    /// Answer 200 with the whole file to every range request.
    pub ignore_range: bool,
    /// Serve whatever the file now is, whatever If-Match says.
    pub ignore_if_match: bool,
    /// Answer 403 to everything.
    pub forbid: bool,
}

/// What the [`FileServer`] was asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub heads: u64,
    pub gets: u64,
    /// Body bytes sent.
    pub bytes: u64,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    heads: AtomicU64,
    gets: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
    /// Each GET's path and range, for messages.
    log: Mutex<Vec<String>>,
}

/// A range-serving HTTP server for files under `root` (see the module documentation).
pub struct FileServer {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// The ETag of a file: changes when the file is replaced or rewritten.
pub fn etag_of(md: &std::fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}\"",
        md.ino(),
        md.size(),
        md.mtime_nsec() ^ (md.mtime() << 20)
    )
}

impl FileServer {
    pub fn start(root: &Path) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let root = root.canonicalize().unwrap();
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, root) = (s.clone(), root.clone());
                std::thread::spawn(move || serve_connection(conn, &root, &s));
            }
        });
        FileServer {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the file at `path` (absolute, under the root).
    pub fn url(&self, path: &Path) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path.display())
    }

    pub fn set_faults(&self, f: Faults) {
        *self.shared.faults.lock().unwrap() = f;
    }

    pub fn counts(&self) -> Counts {
        Counts {
            heads: self.shared.heads.load(Ordering::Relaxed),
            gets: self.shared.gets.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    pub fn reset_counts(&self) {
        self.shared.heads.store(0, Ordering::Relaxed);
        self.shared.gets.store(0, Ordering::Relaxed);
        self.shared.bytes.store(0, Ordering::Relaxed);
        self.shared.log.lock().unwrap().clear();
    }

    /// The GETs served since the last reset, as "path range" lines.
    pub fn log(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    w: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head: bool,
) -> std::io::Result<()> {
    let mut h = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        h.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    h.push_str("\r\n");
    w.write_all(h.as_bytes())?;
    if !head {
        w.write_all(body)?;
    }
    w.flush()
}

fn serve_connection(conn: TcpStream, root: &Path, s: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let faults = s.faults.lock().unwrap().clone();
        if !faults.delay.is_zero() {
            std::thread::sleep(faults.delay);
        }
        let head = method == "HEAD";
        if head {
            s.heads.fetch_add(1, Ordering::Relaxed);
        } else {
            s.gets.fetch_add(1, Ordering::Relaxed);
        }
        if faults.forbid {
            let _ = respond(&mut w, "403 Forbidden", &[], b"", head);
            continue;
        }
        let path_part = target.split('?').next().unwrap_or("");
        let path = PathBuf::from(percent_decode(path_part));
        let file = path
            .canonicalize()
            .ok()
            .filter(|p| p.starts_with(root))
            .and_then(|p| std::fs::read(&p).ok().map(|b| (p, b)));
        let Some((p, bytes)) = file else {
            let _ = respond(&mut w, "404 Not Found", &[], b"no such file", head);
            continue;
        };
        let md = std::fs::metadata(&p).unwrap();
        let etag = etag_of(&md);
        let range = get("range");
        if !head && range.is_some() {
            s.log.lock().unwrap().push(format!(
                "{} {}",
                p.display(),
                range.clone().unwrap_or_default()
            ));
            let mut f = s.faults.lock().unwrap();
            if f.reset > 0 {
                f.reset -= 1;
                drop(f);
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            if f.error_500 > 0 {
                f.error_500 -= 1;
                drop(f);
                let _ = respond(&mut w, "500 Internal Server Error", &[], b"oops", false);
                continue;
            }
        }
        if let Some(m) = get("if-match")
            && !faults.ignore_if_match
            && m != etag
            && m != "*"
        {
            let _ = respond(&mut w, "412 Precondition Failed", &[], b"", head);
            continue;
        }
        let mut hs = vec![
            ("ETag".to_string(), etag.clone()),
            ("Accept-Ranges".to_string(), "bytes".to_string()),
        ];
        let parsed = range.as_deref().and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() {
                bytes.len() as u64 - 1
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(bytes.len() as u64 - 1)))
        });
        let (status, body) = match parsed {
            Some((a, b)) if !faults.ignore_range => {
                if a >= bytes.len() as u64 || a > b {
                    hs.push(("Content-Range".into(), format!("bytes */{}", bytes.len())));
                    let _ = respond(&mut w, "416 Range Not Satisfiable", &hs, b"", head);
                    continue;
                }
                hs.push((
                    "Content-Range".into(),
                    format!("bytes {a}-{b}/{}", bytes.len()),
                ));
                ("206 Partial Content", &bytes[a as usize..=b as usize])
            }
            _ => ("200 OK", &bytes[..]),
        };
        if !head {
            let mut f = s.faults.lock().unwrap();
            if f.short > 0 && range.is_some() {
                f.short -= 1;
                drop(f);
                hs.push(("Content-Length".into(), body.len().to_string()));
                let half = &body[..body.len() / 2];
                let _ = respond(&mut w, status, &hs, half, false);
                s.bytes.fetch_add(half.len() as u64, Ordering::Relaxed);
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            s.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        if respond(&mut w, status, &hs, body, head).is_err() {
            return;
        }
    }
}

fn percent_decode(s: &str) -> String {
    unescape(s, b'%', 2, 16)
}

/// Runs `python3 -c SCRIPT ARGS` (`what` in messages), which prints the port it listens
/// on as its first line and runs until its standard input closes.
fn start_python(script: &str, args: &[&OsStr], what: &str) -> (Child, u16) {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting python3 for {what}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading the port of {what}: {e}"));
    let port = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("{what} did not start: {line:?}")
    });
    (child, port)
}

/// moto's S3 server, running until dropped (or until this process ends: it stops when
/// its standard input closes).
pub struct Moto {
    child: Child,
    port: u16,
}

const MOTO_SCRIPT: &str = r#"
import sys
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"#;

impl Moto {
    /// Starts the server (`.ci/run` installs moto).
    pub fn start() -> Moto {
        let (child, port) = start_python(
            MOTO_SCRIPT,
            &[],
            "moto's S3 server (is `moto[server]` installed?)",
        );
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn bucket(&self, name: &str) -> rusty_s3::Bucket {
        rusty_s3::Bucket::new(
            self.endpoint().parse().unwrap(),
            rusty_s3::UrlStyle::Path,
            name.to_string(),
            "us-east-1",
        )
        .unwrap()
    }

    pub fn credentials() -> rusty_s3::Credentials {
        rusty_s3::Credentials::new("testing-key", "testing-secret")
    }

    /// Makes a private bucket (only signed requests may read it).
    pub fn create_bucket(&self, name: &str) {
        self.create_bucket_with_acl(name, "private");
    }

    /// Makes a bucket anyone may read (unsigned requests, as for a public data set).
    pub fn create_public_bucket(&self, name: &str) {
        self.create_bucket_with_acl(name, "public-read");
    }

    fn create_bucket_with_acl(&self, name: &str, acl: &str) {
        use rusty_s3::S3Action;
        let c = Moto::credentials();
        let url = self
            .bucket(name)
            .create_bucket(&c)
            .sign(Duration::from_secs(600));
        let r = ureq::put(url.as_str())
            .header("x-amz-acl", acl)
            .send_empty()
            .expect("creating a bucket");
        assert!(
            r.status().is_success(),
            "creating bucket {name}: {}",
            r.status()
        );
    }

    /// The object `key`, read with a signed request.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        use rusty_s3::S3Action;
        let c = Moto::credentials();
        let url = self
            .bucket(bucket)
            .get_object(Some(&c), key)
            .sign(Duration::from_secs(600));
        ureq::get(url.as_str())
            .call()
            .expect("reading an object")
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .expect("reading an object")
    }

    /// Uploads `bytes` as `key`.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        use rusty_s3::S3Action;
        let c = Moto::credentials();
        let b = self.bucket(bucket);
        let url = b.put_object(Some(&c), key).sign(Duration::from_secs(600));
        let r = ureq::put(url.as_str())
            .send(bytes)
            .expect("uploading an object");
        assert!(r.status().is_success(), "uploading {key}: {}", r.status());
    }

    /// Uploads every file under `dir`, each under its absolute path (without the first
    /// `/`) as key; returns how many.
    pub fn put_tree(&self, bucket: &str, dir: &Path) -> usize {
        let mut n = 0;
        let mut stack = vec![dir.canonicalize().unwrap()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    self.put(bucket, &key_of(&p), &std::fs::read(&p).unwrap());
                    n += 1;
                }
            }
        }
        n
    }
}

/// The key a file uploaded by [`Moto::put_tree`] has.
pub fn key_of(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_string()
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS front for a server on 127.0.0.1 (Python's ssl module), with a self-signed
/// certificate for 127.0.0.1 made by openssl: `cert` is the PEM file to trust.
pub struct TlsProxy {
    child: Child,
    pub port: u16,
    pub cert: PathBuf,
}

const TLS_SCRIPT: &str = r#"
import socket, ssl, sys, threading
cert, key, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(64)
print(ls.getsockname()[1], flush=True)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except Exception:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
def handle(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
    except Exception:
        c.close()
        return
    u = socket.create_connection(("127.0.0.1", upstream))
    threading.Thread(target=pump, args=(t, u), daemon=True).start()
    pump(u, t)
threading.Thread(target=lambda: sys.stdin.read() or __import__("os")._exit(0), daemon=True).start()
while True:
    c, _ = ls.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

impl TlsProxy {
    /// Starts a TLS front for `upstream_port`, with its certificate made in `dir`.
    pub fn start(dir: &Path, upstream_port: u16) -> TlsProxy {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let st = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running openssl");
        assert!(st.success(), "openssl req failed");
        let upstream = upstream_port.to_string();
        let (child, port) = start_python(
            TLS_SCRIPT,
            &[cert.as_os_str(), key.as_os_str(), OsStr::new(&upstream)],
            "the TLS front",
        );
        TlsProxy { child, port, cert }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
