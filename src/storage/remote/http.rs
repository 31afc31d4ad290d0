//! The requests: `HEAD` for an object's size and version, ranged `GET`s checked against
//! that version, retries with bounded exponential backoff, and errors that name the
//! object by its shown location only (never a signed URL or a header).
//!
//! The HTTP client (ureq) keeps a pool of connections, which must not be shared between
//! a process and its forked child (the mount daemon forks after opening the image): the
//! client is made on first use in each process, and made anew when the process id has
//! changed.

use super::Stats;
use super::s3::S3Target;
use crate::error::{Error, ErrorKind};
use parking_lot::Mutex;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use ureq::Agent;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use url::Url;

/// First pause between two attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How requests are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSettings {
    /// Longest wait to connect, and for each read or write on the connection.
    pub timeout: Duration,
    /// Attempts after the first for timeouts, 5xx answers and dropped connections.
    pub retries: u32,
    /// Trust only the certificates in this PEM file (instead of the built-in roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            timeout: Duration::from_secs(30),
            retries: 4,
            ca_file: None,
        }
    }
}

/// What is asked for.
#[derive(Debug)]
pub enum Target {
    /// An `http://` or `https://` URL.
    Http(Url),
    /// An object in an S3-compatible store.
    S3(S3Target),
}

/// The size and version of an object, from its `HEAD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Length in bytes.
    pub size: u64,
    /// Its ETag, when the server sends one.
    pub etag: Option<String>,
    /// Its Last-Modified date as sent, when the server sends one.
    pub last_modified: Option<String>,
}

impl ObjectInfo {
    /// The version as one string (for the cache key), if the server gave any.
    pub fn version(&self) -> Option<String> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => Some(format!("etag:{e}")),
            (None, Some(m)) => Some(format!("modified:{m}:{}", self.size)),
            (None, None) => None,
        }
    }

    fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| !e.starts_with("W/"))
    }
}

/// Why a fetch failed.
#[derive(Debug)]
pub enum FetchError {
    /// The object is not the version opened any more.
    Changed(String),
    /// Retrying will not help (a server that ignores ranges, 403, 404, ...).
    Fatal(String),
    /// Timeouts, 5xx answers, dropped connections, short bodies: worth another attempt.
    Transient(String),
}

impl FetchError {
    fn message(&self) -> &str {
        match self {
            FetchError::Changed(m) | FetchError::Fatal(m) | FetchError::Transient(m) => m,
        }
    }
}

/// Requests to one object.
pub struct Client {
    target: Target,
    shown: String,
    settings: HttpSettings,
    roots: Option<Arc<Vec<Certificate<'static>>>>,
    https_only: bool,
    /// The client of the process that made it (see the module documentation).
    agent: Mutex<Option<(u32, Agent)>>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("object", &self.shown)
            .finish()
    }
}

/// The certificates of a PEM file.
fn load_roots(path: &Path) -> crate::Result<Vec<Certificate<'static>>> {
    let pem = std::fs::read(path).map_err(|e| Error::io(path, "reading the CA file", e))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(
                    Error::invalid(format!("not a PEM certificate file ({e})")).in_file(path)
                );
            }
        }
    }
    if certs.is_empty() {
        return Err(Error::invalid("the CA file holds no certificate").in_file(path));
    }
    Ok(certs)
}

/// Whether an I/O error is a failed TLS handshake (rustls errors arrive as I/O errors):
/// certificate problems, which retrying does not cure.
fn is_tls(io: &std::io::Error) -> bool {
    let s = io.to_string();
    s.contains("certificate") || s.contains("handshake")
}

/// A transport failure in words, without anything that could hold the URL.
fn describe(e: &ureq::Error) -> String {
    use ureq::Error as E;
    match e {
        E::Timeout(t) => format!("timed out ({t})"),
        E::Io(io) if is_tls(io) => format!("TLS: {io}"),
        E::Io(io) => io.to_string(),
        E::HostNotFound => "host not found".into(),
        E::ConnectionFailed => "connection failed".into(),
        E::TooManyRedirects => "too many redirects".into(),
        E::RedirectFailed => "a redirect could not be followed".into(),
        E::Tls(m) => format!("TLS: {m}"),
        E::Rustls(r) => format!("TLS: {r}"),
        E::StatusCode(c) => format!("HTTP {c}"),
        E::BadUri(_) | E::Http(_) => "invalid request address".into(),
        E::Protocol(p) => format!("HTTP protocol error ({p})"),
        other => {
            let s = other.to_string();
            if s.contains('?') || s.contains("://") {
                "HTTP client error".into()
            } else {
                s
            }
        }
    }
}

/// Whether a transport failure is worth another attempt.
fn transient(e: &ureq::Error) -> bool {
    use ureq::Error as E;
    match e {
        E::Io(io) => !is_tls(io),
        E::Timeout(_) | E::ConnectionFailed | E::Protocol(_) | E::HostNotFound => true,
        _ => false,
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((s.trim().parse().ok()?, e.trim().parse().ok()?, total))
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// ETags compared weakly (RFC 9110, 8.8.3.2): the same opaque tag, `W/` or not.
fn same_etag(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

impl Client {
    /// A client of `target`, named `shown` in messages. Fails when the CA file of
    /// `settings` cannot be read.
    pub fn new(
        target: Target,
        shown: String,
        settings: HttpSettings,
        stats: Arc<Stats>,
    ) -> crate::Result<Client> {
        let roots = match &settings.ca_file {
            Some(p) => Some(Arc::new(load_roots(p)?)),
            None => None,
        };
        let https_only = match &target {
            Target::Http(u) => u.scheme() == "https",
            Target::S3(_) => false,
        };
        Ok(Client {
            target,
            shown,
            settings,
            roots,
            https_only,
            agent: Mutex::new(None),
            stats,
        })
    }

    /// The object's name as messages show it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn agent(&self) -> Agent {
        let pid = std::process::id();
        let mut slot = self.agent.lock();
        if let Some((p, a)) = &*slot
            && *p == pid
        {
            return a.clone();
        }
        let t = Some(self.settings.timeout);
        let mut tls = TlsConfig::builder();
        if let Some(r) = &self.roots {
            tls = tls.root_certs(RootCerts::Specific(r.clone()));
        }
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .https_only(self.https_only)
            .timeout_connect(t)
            .timeout_per_read(t)
            .timeout_per_write(t)
            .user_agent(concat!("qcow2fs/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build();
        let agent = Agent::new_with_config(config);
        *slot = Some((pid, agent.clone()));
        agent
    }

    fn url(&self, head: bool) -> Url {
        match &self.target {
            Target::Http(u) => u.clone(),
            Target::S3(s) if head => s.head_url(),
            Target::S3(s) => s.get_url(),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are used up.
    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<T, FetchError>,
    ) -> Result<T, FetchError> {
        let mut pause = FIRST_BACKOFF;
        let mut n = 0;
        loop {
            n += 1;
            match attempt() {
                Err(FetchError::Transient(m)) if n <= self.settings.retries => {
                    log::debug!("{}: {what}: {m}; retrying in {pause:?}", self.shown);
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
                Err(FetchError::Transient(m)) => {
                    return Err(FetchError::Transient(format!("{m} (after {n} attempts)")));
                }
                r => return r,
            }
        }
    }

    /// What a status that is not a success means.
    fn status_error(&self, code: u16, region: Option<String>) -> FetchError {
        match code {
            403 => FetchError::Fatal(match &self.target {
                Target::S3(s) if s.signed() => "access denied (HTTP 403): check the credentials (AWS_ACCESS_KEY_ID or AWS_PROFILE) and the bucket's policy".into(),
                Target::S3(_) => "access denied (HTTP 403): no AWS credentials were found (AWS_ACCESS_KEY_ID, ~/.aws/credentials) and the object is not public".into(),
                Target::Http(_) => "access denied (HTTP 403)".into(),
            }),
            404 => FetchError::Fatal("no such object (HTTP 404)".into()),
            401 => FetchError::Fatal("the server asks for authentication (HTTP 401)".into()),
            301 | 307 | 400 if region.is_some() => FetchError::Fatal(format!(
                "HTTP {code}: the bucket is in region {} (set AWS_REGION)",
                region.unwrap_or_default()
            )),
            408 | 429 | 500..=599 => FetchError::Transient(format!("HTTP {code}")),
            c => FetchError::Fatal(format!("HTTP {c}")),
        }
    }

    /// The object's size and version, asked once at open. 403 and 404 become errors of
    /// their own kinds, with one line that says what to check.
    pub fn head(&self) -> crate::Result<ObjectInfo> {
        let r = self.with_retries("HEAD", || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match self.agent().head(self.url(true).as_str()).call() {
                Ok(r) => r,
                Err(e) if transient(&e) => return Err(FetchError::Transient(describe(&e))),
                Err(e) => return Err(FetchError::Fatal(describe(&e))),
            };
            let code = resp.status().as_u16();
            if code == 405 || code == 501 {
                // No HEAD: learn the size from a one-byte range.
                return self.probe_with_get();
            }
            if !(200..300).contains(&code) {
                return Err(self.status_error(code, header(&resp, "x-amz-bucket-region")));
            }
            let size = header(&resp, "content-length").and_then(|v| v.parse().ok());
            let info = |size| ObjectInfo {
                size,
                etag: header(&resp, "etag"),
                last_modified: header(&resp, "last-modified"),
            };
            match size {
                Some(s) => Ok(info(s)),
                None => self.probe_with_get(),
            }
        });
        r.map_err(|e| {
            let kind = match &e {
                FetchError::Fatal(m) if m.contains("HTTP 404") => ErrorKind::NotFound,
                FetchError::Fatal(m) if m.contains("HTTP 403") || m.contains("HTTP 401") => {
                    ErrorKind::PermissionDenied
                }
                _ => ErrorKind::Io,
            };
            Error::new(kind, e.message().to_string())
                .during("asking for the object's size")
                .in_file(Path::new(&self.shown))
        })
    }

    /// Size and version from `GET` of the first byte (servers without `HEAD`).
    fn probe_with_get(&self) -> Result<ObjectInfo, FetchError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = match self
            .agent()
            .get(self.url(false).as_str())
            .header("Range", "bytes=0-0")
            .call()
        {
            Ok(r) => r,
            Err(e) if transient(&e) => return Err(FetchError::Transient(describe(&e))),
            Err(e) => return Err(FetchError::Fatal(describe(&e))),
        };
        let code = resp.status().as_u16();
        if code != 206 {
            return Err(if code == 200 {
                FetchError::Fatal(ignored_range())
            } else {
                self.status_error(code, None)
            });
        }
        let total = header(&resp, "content-range")
            .and_then(|v| parse_content_range(&v))
            .and_then(|(_, _, t)| t)
            .ok_or_else(|| {
                FetchError::Fatal(
                    "the server tells neither the size nor a Content-Range total".into(),
                )
            })?;
        Ok(ObjectInfo {
            size: total,
            etag: header(&resp, "etag"),
            last_modified: header(&resp, "last-modified"),
        })
    }

    /// Bytes `[start, start + len)` of the version `info` describes (the range lies
    /// within the object). Every answer is checked: 206, the range asked, the size and
    /// version opened, the whole body.
    pub fn get_range(
        &self,
        start: u64,
        len: usize,
        info: &ObjectInfo,
    ) -> Result<Vec<u8>, FetchError> {
        let end = start + len as u64 - 1;
        let what = format!("GET bytes={start}-{end}");
        self.with_retries(&what, || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .agent()
                .get(self.url(false).as_str())
                .header("Range", &format!("bytes={start}-{end}"));
            if let Some(e) = info.strong_etag() {
                req = req.header("If-Match", e);
            } else if let Some(m) = &info.last_modified {
                req = req.header("If-Unmodified-Since", m);
            }
            let mut resp = match req.call() {
                Ok(r) => r,
                Err(e) if transient(&e) => return Err(FetchError::Transient(describe(&e))),
                Err(e) => return Err(FetchError::Fatal(describe(&e))),
            };
            let code = resp.status().as_u16();
            let whole = start == 0 && len as u64 == info.size;
            match code {
                206 => {}
                200 if whole => {}
                200 => return Err(FetchError::Fatal(ignored_range())),
                412 => {
                    return Err(FetchError::Changed(
                        "the object changed (HTTP 412 to If-Match)".into(),
                    ));
                }
                416 => return Err(FetchError::Changed("the object shrank (HTTP 416)".into())),
                c => return Err(self.status_error(c, None)),
            }
            if let (Some(ours), Some(theirs)) = (&info.etag, header(&resp, "etag"))
                && !same_etag(ours, &theirs)
            {
                return Err(FetchError::Changed(format!(
                    "the object changed (ETag {theirs}, opened as {ours})"
                )));
            }
            if info.etag.is_none()
                && let (Some(ours), Some(theirs)) =
                    (&info.last_modified, header(&resp, "last-modified"))
                && *ours != theirs
            {
                return Err(FetchError::Changed(format!(
                    "the object changed (Last-Modified {theirs}, opened as {ours})"
                )));
            }
            if code == 206 {
                match header(&resp, "content-range").and_then(|v| parse_content_range(&v)) {
                    Some((s, e, total)) => {
                        if total.is_some_and(|t| t != info.size) {
                            return Err(FetchError::Changed(format!(
                                "the object changed (size {}, opened as {})",
                                total.unwrap_or_default(),
                                info.size
                            )));
                        }
                        if (s, e) != (start, end) {
                            return Err(FetchError::Fatal(format!(
                                "the server answered bytes {s}-{e} instead of the range asked"
                            )));
                        }
                    }
                    None => {
                        return Err(FetchError::Fatal(
                            "the server's partial answer has no valid Content-Range".into(),
                        ));
                    }
                }
            }
            let mut buf = vec![0u8; len];
            let mut reader = resp.body_mut().as_reader();
            let mut got = 0;
            while got < len {
                match reader.read(&mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.stats
                            .bytes_fetched
                            .fetch_add(got as u64, Ordering::Relaxed);
                        return Err(FetchError::Transient(format!(
                            "the connection failed after {got} of {len} bytes ({e})"
                        )));
                    }
                }
            }
            self.stats
                .bytes_fetched
                .fetch_add(got as u64, Ordering::Relaxed);
            if got < len {
                return Err(FetchError::Transient(format!(
                    "short answer: {got} of {len} bytes"
                )));
            }
            let mut extra = [0u8; 1];
            if matches!(reader.read(&mut extra), Ok(n) if n > 0) {
                return Err(FetchError::Fatal(
                    "the server sent more bytes than the range asked".into(),
                ));
            }
            Ok(buf)
        })
    }
}

fn ignored_range() -> String {
    "the server ignored the Range request (HTTP 200 with the whole object); qcow2fs reads remote images only from servers that support range requests".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_etags() {
        assert_eq!(
            parse_content_range("bytes 0-1023/4096"),
            Some((0, 1023, Some(4096)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */4096"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert!(same_etag("\"abc\"", "W/\"abc\""));
        assert!(!same_etag("\"abc\"", "\"abd\""));
        let info = ObjectInfo {
            size: 9,
            etag: Some("W/\"x\"".into()),
            last_modified: None,
        };
        assert_eq!(info.strong_etag(), None);
        assert_eq!(info.version().as_deref(), Some("etag:W/\"x\""));
    }
}
