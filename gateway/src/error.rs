//! The gateway library's one error type. Each edge turns it into its own
//! vocabulary in exactly one place: HTTP statuses in `admin::http_status`.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A store operation failed; its `kind()` decides how callers react.
    #[error(transparent)]
    Store(#[from] store::Error),

    /// The data directory could not be opened (locked by another process,
    /// unreadable, damaged beyond opening).
    #[error("cannot open the data directory {}: {source}", dir.display())]
    OpenPool {
        dir: PathBuf,
        #[source]
        source: store::Error,
    },

    /// A request or an argument that can never succeed as given.
    #[error("{0}")]
    Invalid(String),

    /// An admin request body of the wrong type or size.
    #[error("{0}")]
    BadBody(String, BodyProblem),

    /// A listening socket could not be set up.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: io::Error,
    },

    /// Any other I/O failure of the gateway itself (not of the store).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The FUSE view could not be mounted or unmounted.
    #[error(transparent)]
    Mount(#[from] crate::fuse::MountError),

    /// No FUSE view of this gateway is mounted there.
    #[error("no snapgate FUSE view is mounted on {0}")]
    NotMounted(String),

    /// Asked for a part of the product that does not exist yet.
    #[error("{0} is not available yet")]
    Unavailable(&'static str),

    /// A bug or a panic inside the gateway; the message says where.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What is wrong with a request body besides its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyProblem {
    /// Not sent as `application/json`.
    ContentType,
    /// Larger than the endpoint takes.
    TooLarge,
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The store's error kind, when the failure came from the store.
    pub fn store_kind(&self) -> Option<store::ErrorKind> {
        match self {
            Error::Store(e) | Error::OpenPool { source: e, .. } => Some(e.kind()),
            _ => None,
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("a blocking store task failed: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
