//! Where a remote object lives: an `http(s)://` URL or an `s3://BUCKET/KEY` name. Parsing
//! the names users and images give, the form shown in messages (never with a query
//! string or user info, which may carry secrets), and how a name stored in a remote image
//! resolves against the image's own location.

use crate::error::{Error, Result};
use url::Url;

/// A remote object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// An `http://` or `https://` URL, read with range requests.
    Http(Url),
    /// An object in an S3-compatible store.
    S3 {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
    },
}

/// Whether `name` is a URL qcow2fs reads remotely (`http://`, `https://`, `s3://`).
pub fn is_remote(name: &[u8]) -> bool {
    let lower = |p: &[u8]| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p);
    lower(b"http://") || lower(b"https://") || lower(b"s3://")
}

/// Resolves `.` and `..` segments of a `/`-separated path (RFC 3986, 5.2.4): `..` above
/// the root stays at the root.
fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

impl Location {
    /// Parses a URL; `Ok(None)` if `name` is not one (a local path).
    pub fn parse(name: &str) -> Result<Option<Location>> {
        if !is_remote(name.as_bytes()) {
            return Ok(None);
        }
        if name[..5].eq_ignore_ascii_case("s3://") {
            let rest = &name[5..];
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(&c));
            if !valid_bucket {
                return Err(Error::invalid(format!(
                    "'s3://{bucket}/...': not a valid bucket name (3 to 63 lowercase letters, digits, '.', '-')"
                )));
            }
            if key.is_empty() || key.ends_with('/') {
                return Err(Error::invalid(format!(
                    "'s3://{bucket}/{key}': names no object (expected s3://BUCKET/KEY)"
                )));
            }
            return Ok(Some(Location::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            }));
        }
        let url = Url::parse(name)
            .map_err(|e| Error::invalid(format!("'{}': not a valid URL ({e})", shown_str(name))))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid(format!(
                "'{}': user names and passwords in URLs are refused (they would show in the process list); use a pre-signed URL or s3:// with credentials from the environment",
                Location::Http(url.clone()).shown()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid(format!(
                "'{}': the URL names no host",
                shown_str(name)
            )));
        }
        Ok(Some(Location::Http(url)))
    }

    /// The location as shown in messages, logs, the mount table and `info`: no user
    /// info, no query string, no fragment.
    pub fn shown(&self) -> String {
        match self {
            Location::Http(u) => {
                let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
                if let Some(p) = u.port() {
                    s.push_str(&format!(":{p}"));
                }
                s.push_str(u.path());
                s
            }
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The full address, with its query string: what requests use and what identifies
    /// the object in the cache. Never shown.
    pub(crate) fn identity(&self) -> String {
        match self {
            Location::Http(u) => {
                let mut u = u.clone();
                u.set_fragment(None);
                u.to_string()
            }
            Location::S3 { .. } => self.shown(),
        }
    }

    /// The last segment of the name (for messages).
    pub fn file_name(&self) -> String {
        let s = self.shown();
        s.rsplit('/').next().unwrap_or_default().to_string()
    }

    /// Whether `other` is on the same host (scheme, host and port) or in the same bucket.
    pub fn same_origin(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Http(a), Location::Http(b)) => a.origin() == b.origin(),
            (Location::S3 { bucket: a, .. }, Location::S3 { bucket: b, .. }) => a == b,
            _ => false,
        }
    }

    /// Resolves a name stored in the image at this location (a backing or data file
    /// name): a relative reference against this location, as a browser would. Names
    /// that reach another host or bucket are refused.
    pub fn join(&self, name: &str) -> Result<Location> {
        let target = match (self, Location::parse(name)?) {
            (_, Some(abs)) => abs,
            (Location::Http(base), None) => {
                let mut u = base.join(name).map_err(|e| {
                    Error::invalid(format!("'{name}' is not a valid relative URL ({e})"))
                })?;
                // A name is a path: a query string of the image does not carry over.
                if !name.contains('?') {
                    u.set_query(None);
                }
                Location::Http(u)
            }
            (Location::S3 { bucket, key }, None) => {
                let joined = if let Some(abs) = name.strip_prefix('/') {
                    abs.to_string()
                } else {
                    let dir = key.rfind('/').map_or("", |i| &key[..=i]);
                    format!("{dir}{name}")
                };
                let key = normalize(&joined).trim_start_matches('/').to_string();
                if key.is_empty() || key.ends_with('/') {
                    return Err(Error::invalid(format!(
                        "'{name}' names no object relative to {}",
                        self.shown()
                    )));
                }
                Location::S3 {
                    bucket: bucket.clone(),
                    key,
                }
            }
        };
        if !self.same_origin(&target) {
            return Err(Error::unsupported(format!(
                "'{}' is on another host or bucket than {}; qcow2fs follows names only within the same host or bucket",
                target.shown(),
                self.shown()
            )));
        }
        Ok(target)
    }
}

/// `name` up to its query string, for messages about names that did not parse.
fn shown_str(name: &str) -> &str {
    let end = name.find(['?', '#']).unwrap_or(name.len());
    let name = &name[..end];
    // Drop user info ("scheme://user:pass@host").
    match (name.find("://"), name.find('@')) {
        (Some(s), Some(_)) => &name[..s + 3],
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Location {
        Location::parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_and_shows_without_secrets() {
        assert!(Location::parse("/tmp/x.qcow2").unwrap().is_none());
        assert!(Location::parse("http:x").unwrap().is_none());
        assert_eq!(
            loc("https://h.example:8443/a/b.qcow2?X-Amz-Signature=s3cr3t#f").shown(),
            "https://h.example:8443/a/b.qcow2"
        );
        assert_eq!(
            loc("HTTPS://h.example/a?sig=1").identity(),
            "https://h.example/a?sig=1"
        );
        assert_eq!(
            loc("s3://my-bucket/dir/k.qcow2").shown(),
            "s3://my-bucket/dir/k.qcow2"
        );
        let e = Location::parse("https://user:pw@h.example/x").unwrap_err();
        assert!(!format!("{e:#}").contains("pw"), "{e:#}");
        assert!(Location::parse("s3://Bad_Bucket!/k").is_err());
        assert!(Location::parse("s3://bucket").is_err());
        assert!(Location::parse("s3://bucket/dir/").is_err());
        let e = Location::parse("http://[::1/x?tok=abc").unwrap_err();
        assert!(!format!("{e:#}").contains("tok"), "{e:#}");
    }

    #[test]
    fn joins_relative_names() {
        let h = loc("http://h.example/imgs/a/top.qcow2?sig=1");
        assert_eq!(
            h.join("base.qcow2").unwrap().shown(),
            "http://h.example/imgs/a/base.qcow2"
        );
        assert_eq!(
            h.join("base.qcow2").unwrap().identity(),
            "http://h.example/imgs/a/base.qcow2"
        );
        assert_eq!(
            h.join("../b/x.qcow2").unwrap().shown(),
            "http://h.example/imgs/b/x.qcow2"
        );
        assert_eq!(
            h.join("/abs/y.qcow2").unwrap().shown(),
            "http://h.example/abs/y.qcow2"
        );
        assert_eq!(
            h.join("http://h.example/z.qcow2").unwrap().shown(),
            "http://h.example/z.qcow2"
        );
        assert!(h.join("http://other.example/z.qcow2").is_err());
        assert!(h.join("https://h.example/z.qcow2").is_err());
        assert!(h.join("s3://bucket/z").is_err());

        let s = loc("s3://bkt/imgs/a/top.qcow2");
        assert_eq!(
            s.join("base.qcow2").unwrap().shown(),
            "s3://bkt/imgs/a/base.qcow2"
        );
        assert_eq!(s.join("../../x.qcow2").unwrap().shown(), "s3://bkt/x.qcow2");
        assert_eq!(
            s.join("../../../../x.qcow2").unwrap().shown(),
            "s3://bkt/x.qcow2"
        );
        assert_eq!(
            s.join("./b/./c.qcow2").unwrap().shown(),
            "s3://bkt/imgs/a/b/c.qcow2"
        );
        assert_eq!(
            s.join("/tmp/abs.qcow2").unwrap().shown(),
            "s3://bkt/tmp/abs.qcow2"
        );
        assert!(s.join("s3://other/x").is_err());
        assert!(s.join("..").is_err());
        assert_eq!(s.join("s3://bkt/k2").unwrap().shown(), "s3://bkt/k2");
    }
}
