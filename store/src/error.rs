//! The store's one error type. Callers match on [`Error::kind`]; the message
//! names the object (volume, snapshot, offset, file) that the error is about.

use std::fmt;

/// What went wrong, for callers that map errors to NBD codes, errnos or HTTP
/// statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named volume or snapshot does not exist.
    NotFound,
    /// A volume or snapshot of that name exists already.
    AlreadyExists,
    /// A name breaks the naming rules.
    InvalidName,
    /// A size or other argument is unusable.
    InvalidArgument,
    /// An offset/length falls outside the volume.
    OutOfRange,
    /// A write to a read-only snapshot view.
    ReadOnly,
    /// The medium is full.
    NoSpace,
    /// A checksum did not match: stored data or metadata is damaged.
    Corruption,
    /// The operating system reported an I/O error.
    Io,
    /// Another process holds the pool.
    Locked,
    /// The volume or snapshot behind an open handle was deleted.
    Deleted,
}

/// An error of the store: a kind plus a message naming what it is about.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    #[source]
    source: Option<std::io::Error>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if let Some(e) = &self.source {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            msg: context.into(),
            source: Some(e),
        }
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corruption, msg)
    }

    /// The same error with `what` said first.
    pub(crate) fn prefixed(mut self, what: impl std::fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// The kind of failure, for mapping to wire codes.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// Result with the store's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
