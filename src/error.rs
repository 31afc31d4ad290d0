//! The crate's error: a matchable kind, the file it concerns, what was being done there
//! and at which offset (or which field of the format), what is wrong, and the cause
//! (`source()`). `{}` shows this error alone; `{:#}` (and [`Error::report`]) the one line
//! users see, followed by its causes. [`Error::errno`] is the only place kinds become
//! errno values.

use crate::format::{FormatError, Problem};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of failure an error is.
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
    /// The host file system or the image has no room left (ENOSPC, EDQUOT).
    NoSpace,
    /// An offset or length outside the disk or a table.
    OutOfRange,
    /// A bad argument, option or request from the user.
    InvalidInput,
    /// A file, snapshot or bitmap that does not exist.
    NotFound,
    /// The caller may not do this (file permissions, another user's mount).
    PermissionDenied,
    /// Another process holds a conflicting lock, or the thing is in use.
    Busy,
}

/// An error with its context; see the module documentation.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    /// What was being done ("reading the L2 table"), or the field of the format.
    context: Option<String>,
    offset: Option<u64>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn kind_of(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EROFS) => ErrorKind::ReadOnly,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        _ => match err.kind() {
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        },
    }
}

impl Error {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            context: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure while doing `operation` on `path`; the failure is the source.
    pub fn io(path: &Path, operation: impl Into<String>, err: io::Error) -> Self {
        Error {
            kind: kind_of(&err),
            path: Some(path.to_path_buf()),
            context: Some(operation.into()),
            offset: None,
            message: String::new(),
            source: Some(Box::new(err)),
        }
    }

    /// A `Corrupt` error with `message`.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// An `Unsupported` error with `message`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// An `InvalidInput` error with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// A `ReadOnly` error with `message`.
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

    /// Attaches the byte offset in the file this error concerns.
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Attaches what was being done, unless that is already said.
    pub fn during(mut self, context: impl Into<String>) -> Self {
        if self.context.is_none() {
            self.context = Some(context.into());
        }
        self
    }

    /// Attaches the cause.
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(cause));
        self
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file it concerns, when known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What was being done, or the field of the format that is wrong.
    pub fn context(&self) -> Option<&str> {
        self.context.as_deref()
    }

    /// The byte offset in the file it concerns, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// What is wrong, without the file, context or cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The one line users see: this error and its causes.
    pub fn report(&self) -> String {
        format!("{self:#}")
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Unsupported => libc::EIO,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::OutOfRange | ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::PermissionDenied => libc::EACCES,
            ErrorKind::Busy => libc::EBUSY,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(p) = &self.path {
            parts.push(p.display().to_string());
        }
        match (&self.context, self.offset) {
            (Some(c), Some(o)) => parts.push(format!("{c} at offset {o:#x}")),
            (Some(c), None) => parts.push(c.clone()),
            (None, Some(o)) => parts.push(format!("at offset {o:#x}")),
            (None, None) => {}
        }
        if !self.message.is_empty() {
            parts.push(self.message.clone());
        }
        f.write_str(&parts.join(": "))?;
        if f.alternate() {
            let mut cause = self.source.as_deref().map(|s| s as &dyn std::error::Error);
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
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

/// A format error keeps its structure: the field is the context, its offset the offset.
impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        let kind = match e.problem {
            Problem::Invalid => ErrorKind::Corrupt,
            Problem::Unsupported => ErrorKind::Unsupported,
        };
        Error {
            kind,
            path: None,
            context: Some(e.field),
            offset: Some(e.offset),
            message: e.message,
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_fields_and_cause() {
        let io_err = io::Error::from_raw_os_error(libc::ENOSPC);
        let e = Error::io(Path::new("/i.qcow2"), "writing an L2 table", io_err).at(0x50000);
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(e.offset(), Some(0x50000));
        assert_eq!(
            e.to_string(),
            "/i.qcow2: writing an L2 table at offset 0x50000"
        );
        assert!(std::error::Error::source(&e).is_some());
        let line = e.report();
        assert!(line.starts_with("/i.qcow2: writing an L2 table at offset 0x50000: "));
        assert!(line.contains("No space left"), "{line}");
        assert_eq!(line.lines().count(), 1);

        let f = FormatError::invalid("l1_size", 0x24, "too large");
        let e = Error::from(f).in_file(Path::new("x"));
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!((e.context(), e.offset()), (Some("l1_size"), Some(0x24)));
        assert_eq!(e.report(), "x: l1_size at offset 0x24: too large");
    }
}
