//! The seam between the NBD server and what it serves.
//!
//! The server talks to an [`Export`] (a block device with metadata contexts)
//! obtained from an [`ExportSource`]. The production implementation is
//! `store::Volume` (see `volume.rs`); tests plug in an in-memory device that
//! can also inject failures. Errors cross this seam already mapped to an NBD
//! error value plus a message, so the server has no knowledge of the store's
//! error type.

use super::proto::{Errno, StatusExtent};
use std::fmt;
use std::sync::Arc;

/// The metadata context every export offers (`NBD_OPT_SET_META_CONTEXT`).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A failed device operation: the NBD error value for the wire, and the full
/// reason for the log and the structured error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportError {
    pub errno: Errno,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        ExportError {
            errno,
            message: message.into(),
        }
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.errno)
    }
}

impl std::error::Error for ExportError {}

/// A block device served over NBD. Methods block (they do file I/O) and are
/// called from a blocking thread pool, concurrently, on one shared handle.
///
/// Offsets and lengths reaching these methods are already validated: in
/// range of the size advertised at negotiation, and never on a read-only
/// export for the writing methods.
pub trait Export: Send + Sync + 'static {
    /// Name for logs and metrics (the export name the client asked for).
    fn name(&self) -> &str;
    /// Free text for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> Option<String> {
        None
    }
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError>;
    /// `read_at`, but only if it needs no wait (for the disk or a lock):
    /// `Ok(false)` when it would, and then `buf` holds nothing meaningful.
    /// Called on the event loop, so reads from memory skip the hand-off to
    /// a blocking thread; `false` always is correct, only slower.
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool, ExportError> {
        let _ = (buf, offset);
        Ok(false)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), ExportError>;
    /// Makes every write completed on any handle of this device durable.
    fn flush(&self) -> Result<(), ExportError>;
    /// A hint that `[offset, offset+len)` will be read soon.
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Whether WRITE_ZEROES with `no_hole` is cheaper than a WRITE of zeroes
    /// (decides NBD_CMD_FLAG_FAST_ZERO requests: `false` → ENOTSUP).
    fn fast_zero(&self, no_hole: bool) -> bool;
    /// Every metadata context this export offers, by full name
    /// (`base:allocation`, later `qemu:dirty-bitmap:NAME`).
    fn meta_contexts(&self) -> Vec<String>;
    /// Status descriptors of `context` (one of `meta_contexts`) starting at
    /// `offset`: consecutive, non-zero lengths, at least one, covering at
    /// most `len` bytes. The server re-checks these rules before sending.
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, ExportError>;
}

/// Why an export could not be opened during negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No such export (NBD_REP_ERR_UNKNOWN).
    Unknown(String),
    /// It exists, but policy forbids it now, e.g. locked (NBD_REP_ERR_POLICY).
    Policy(String),
    /// Anything else (also NBD_REP_ERR_UNKNOWN, with the message).
    Failed(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Unknown(m) | OpenError::Policy(m) | OpenError::Failed(m) => f.write_str(m),
        }
    }
}

/// Where the server finds exports by name. Both methods may block.
pub trait ExportSource: Send + Sync + 'static {
    /// Every export name, for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
    /// Opens one export for one connection.
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError>;
}
