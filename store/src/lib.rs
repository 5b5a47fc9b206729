//! # snapgate store: thin volumes with redirect-on-write snapshots
//!
//! PLACEHOLDER-DOC
#![deny(unsafe_op_in_unsafe_fn)]

mod alloc;
mod error;
pub mod format;
pub mod medium;
mod pool;

pub use error::{Error, ErrorKind, Result};
pub use medium::{DirMedium, MemMedium, Medium, MediumFile};
pub use pool::{validate_name, Pool, PoolStats, Volume, MAX_VOLUME_SIZE};

/// Size of a stored block: the unit of allocation, checksumming and
/// redirect-on-write.
pub const BLOCK: usize = 4096;

/// Where the content of one block of one volume state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Deallocated: reads as zeros, takes no space.
    Hole,
    /// Allocated known zeros (a zero write): reads as zeros, takes no space.
    Zero,
    /// Stored in data slot `slot` with checksum `crc`.
    Data { slot: u64, crc: u32 },
}

/// Tunables of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The journal is folded into a new checkpoint once it grows past this
    /// many bytes (checked at flush).
    pub journal_limit: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            journal_limit: 64 << 20,
        }
    }
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Data space referenced by the head and all snapshots.
    pub allocated_bytes: u64,
    pub snapshots: usize,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub volume: String,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// Kind of an allocation extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data.
    Data,
    /// Allocated, reads as zeros.
    Zero,
    /// Not allocated, reads as zeros.
    Hole,
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

/// Result of [`Pool::verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub damaged: Vec<Damage>,
}

/// One damaged block found by [`Pool::verify`].
#[derive(Debug, Clone)]
pub struct Damage {
    pub volume: String,
    /// `None` when the head sees the damaged block.
    pub snapshot: Option<String>,
    pub offset: u64,
    pub what: String,
}
