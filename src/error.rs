//! The crate's error: a matchable kind, the file it concerns, what was being done, and the
//! cause. `Display` gives the one line users see; [`Error::errno`] is the only place kinds
//! become errno values.

use crate::format::{FormatError, Problem};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host file or device failed.
    Io,
    /// The image's metadata is inconsistent or breaks the format.
    Corrupt,
    /// Valid, but uses something qcow2fs does not implement or refuses.
    Unsupported,
    /// A write to something that is read-only.
    ReadOnly,
    NoSpace,
    OutOfRange,
    InvalidInput,
    NotFound,
    /// Another process holds a conflicting lock.
    Busy,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure while doing `what` on `path`.
    pub fn io(path: &Path, what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EROFS) => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            path: Some(path.to_path_buf()),
            message: what.into(),
            source: Some(Box::new(err)),
        }
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    pub fn read_only(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::ReadOnly, message)
    }

    /// Attaches the file this error concerns, unless one is already named.
    pub fn in_file(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Unsupported => libc::EIO,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::OutOfRange | ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Busy => libc::EBUSY,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        let kind = match e.problem {
            Problem::Invalid => ErrorKind::Corrupt,
            Problem::Unsupported => ErrorKind::Unsupported,
        };
        Error::new(kind, e.to_string())
    }
}
