//! S3 settings as the AWS tools find them, and request signing. Credentials come from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else from the profile
//! (`AWS_PROFILE`, default `default`) in `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`)
//! or `~/.aws/config` (`AWS_CONFIG_FILE`); without any, requests go unsigned (public
//! buckets). The region from `AWS_REGION`, `AWS_DEFAULT_REGION` or the profile (default
//! `us-east-1`); the endpoint from the `s3_endpoint` option, `AWS_ENDPOINT_URL_S3`,
//! `AWS_ENDPOINT_URL` or the profile's `endpoint_url`, addressed path-style (what
//! S3-compatible stores expect); AWS itself is addressed virtual-host style.
//!
//! Requests are pre-signed (rusty-s3, query-string signature valid for a few minutes).
//! Secrets never leave this module except inside the signed URLs handed to the HTTP
//! client, and those are never shown: every message uses [`super::Location::shown`].

use crate::error::{Error, Result};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// How long a signed request stays valid (a request is signed anew for each attempt).
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// What signing and addressing one bucket needs.
pub struct S3Target {
    bucket: Bucket,
    credentials: Option<Credentials>,
    key: String,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket.name())
            .field("region", &self.bucket.region())
            .field("signed", &self.credentials.is_some())
            .finish()
    }
}

/// An environment variable, unless unset or blank.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn home() -> Option<PathBuf> {
    var("HOME").map(PathBuf::from)
}

/// One profile's settings from an AWS configuration file (`section` is the section
/// name: `default`, `NAME` in the credentials file, `profile NAME` in the config file).
fn profile_value(file: &PathBuf, section: &str, key: &str) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(file, "reading the AWS configuration", e)),
    };
    let opts = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    // The parser's message may quote the line, which may hold a secret: name the line only.
    let parsed = ini::Ini::load_from_str_opt(&text, opts).map_err(|e| {
        Error::invalid(format!(
            "cannot parse line {} of the AWS configuration",
            e.line
        ))
        .in_file(file)
    })?;
    Ok(parsed
        .get_from(Some(section), key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty()))
}

/// The profile's settings: the credentials file, then the config file.
struct Profile {
    name: String,
    credentials_file: Option<PathBuf>,
    config_file: Option<PathBuf>,
}

impl Profile {
    fn current() -> Profile {
        Profile {
            name: var("AWS_PROFILE").unwrap_or_else(|| "default".into()),
            credentials_file: var("AWS_SHARED_CREDENTIALS_FILE")
                .map(PathBuf::from)
                .or_else(|| home().map(|h| h.join(".aws/credentials"))),
            config_file: var("AWS_CONFIG_FILE")
                .map(PathBuf::from)
                .or_else(|| home().map(|h| h.join(".aws/config"))),
        }
    }

    fn config_section(&self) -> String {
        if self.name == "default" {
            "default".into()
        } else {
            format!("profile {}", self.name)
        }
    }

    fn config_value(&self, key: &str) -> Result<Option<String>> {
        match &self.config_file {
            Some(f) => profile_value(f, &self.config_section(), key),
            None => Ok(None),
        }
    }

    fn credential_value(&self, key: &str) -> Result<Option<String>> {
        if let Some(f) = &self.credentials_file
            && let Some(v) = profile_value(f, &self.name, key)?
        {
            return Ok(Some(v));
        }
        self.config_value(key)
    }

    fn credentials(&self) -> Result<Option<Credentials>> {
        if let Some(c) = Credentials::from_env() {
            return Ok(Some(c));
        }
        let key = self.credential_value("aws_access_key_id")?;
        let secret = self.credential_value("aws_secret_access_key")?;
        let token = self.credential_value("aws_session_token")?;
        Ok(match (key, secret, token) {
            (Some(k), Some(s), Some(t)) => Some(Credentials::new_with_token(k, s, t)),
            (Some(k), Some(s), None) => Some(Credentials::new(k, s)),
            _ => None,
        })
    }
}

impl S3Target {
    /// The settings for object `key` of `bucket`; `endpoint` is the `s3_endpoint` option.
    pub fn new(bucket: &str, key: &str, endpoint: Option<&str>) -> Result<S3Target> {
        let profile = Profile::current();
        let region = match var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")) {
            Some(r) => r,
            None => profile
                .config_value("region")?
                .unwrap_or_else(|| "us-east-1".into()),
        };
        let custom = match endpoint.map(str::to_string) {
            Some(e) => Some(e),
            None => match var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")) {
                Some(e) => Some(e),
                None => profile.config_value("endpoint_url")?,
            },
        };
        let (endpoint, style) = match &custom {
            Some(e) => (
                Url::parse(e).map_err(|err| {
                    Error::invalid(format!("S3 endpoint '{e}' is not a valid URL ({err})"))
                })?,
                UrlStyle::Path,
            ),
            None => {
                let url = Url::parse(&format!("https://s3.{region}.amazonaws.com"))
                    .map_err(|e| Error::invalid(format!("S3 region '{region}': {e}")))?;
                // Names with dots do not fit AWS's wildcard certificate as host names.
                let style = if bucket.contains('.') {
                    UrlStyle::Path
                } else {
                    UrlStyle::VirtualHost
                };
                (url, style)
            }
        };
        let bucket = Bucket::new(endpoint, style, bucket.to_string(), region).map_err(|e| {
            Error::invalid(format!(
                "S3 bucket '{bucket}' at endpoint {}: {e:?}",
                custom.as_deref().unwrap_or("(AWS)")
            ))
        })?;
        Ok(S3Target {
            bucket,
            credentials: profile.credentials()?,
            key: key.to_string(),
        })
    }

    /// A signed URL for `HEAD` of the object.
    pub fn head_url(&self) -> Url {
        self.bucket
            .head_object(self.credentials.as_ref(), &self.key)
            .sign(SIGNED_FOR)
    }

    /// A signed URL for `GET` of the object (a range is asked in a header, which the
    /// signature does not cover).
    pub fn get_url(&self) -> Url {
        self.bucket
            .get_object(self.credentials.as_ref(), &self.key)
            .sign(SIGNED_FOR)
    }

    /// Whether requests are signed (for the message of a 403).
    pub fn signed(&self) -> bool {
        self.credentials.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_profile_sections_and_keeps_secrets_out_of_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = AKIDEFAULT\n\n[work]\naws_access_key_id=AKIWORK\naws_secret_access_key = se/cr+et\n",
        )
        .unwrap();
        assert_eq!(
            profile_value(&f, "work", "aws_secret_access_key")
                .unwrap()
                .as_deref(),
            Some("se/cr+et")
        );
        assert_eq!(
            profile_value(&f, "default", "aws_access_key_id")
                .unwrap()
                .as_deref(),
            Some("AKIDEFAULT")
        );
        assert_eq!(profile_value(&f, "none", "x").unwrap(), None);
        assert_eq!(
            profile_value(&dir.path().join("missing"), "default", "x").unwrap(),
            None
        );
        std::fs::write(&f, "[default\naws_secret_access_key = TOPSECRET\n").unwrap();
        if let Err(e) = profile_value(&f, "default", "aws_secret_access_key") {
            assert!(!format!("{e:#}").contains("TOPSECRET"), "{e:#}");
        }
    }
}
