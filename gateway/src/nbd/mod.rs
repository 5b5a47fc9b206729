//! The NBD server: serves store volumes (`vol`, read-write) and snapshots
//! (`vol@snap`, read-only) to NBD clients over TCP and Unix sockets.
//!
//! ```text
//!  socket ─► handshake (handshake.rs): greeting, options, GO/EXPORT_NAME
//!              │ ExportSource::open → Arc<dyn Export> (volume.rs wraps store::Volume)
//!              ▼
//!           transmission (server.rs), per connection:
//!             reader task ──validate()──► request work on the blocking pool
//!                  │ (error replies)            │ device call + encoded reply
//!                  └──────────────► mpsc ◄──────┘
//!                                    │
//!                               writer task ─► socket
//! ```
//!
//! - `proto.rs` is the pure codec (no I/O): parsing tells "need more bytes"
//!   from "invalid"; it is unit-tested and fuzzed (`fuzz/`).
//! - `export.rs` is the seam: the [`Export`] trait (a block device with
//!   metadata contexts) and [`ExportSource`]. Metadata contexts are names the
//!   export lists (`base:allocation` now; a `qemu:dirty-bitmap:NAME` is one
//!   more name plus a branch in `Export::block_status`).
//! - `volume.rs` adapts `store::Volume` and holds the only store-error → NBD
//!   error mapping ([`nbd_errno`]).
//!
//! Locking: the server holds no lock of its own across requests. Per
//! connection there is one reader and one writer of the socket, two
//! semaphores bound requests in flight and buffered bytes, and the device
//! (store) serialises what it must internally. See `server.rs` for details.

mod export;
mod handshake;
pub mod proto;
mod server;
mod volume;

#[cfg(test)]
mod tests;

pub use export::{Export, ExportError, ExportSource, OpenError, BASE_ALLOCATION};
pub use server::{Server, DRAIN_TIMEOUT, MAX_IN_FLIGHT};
pub use volume::{nbd_errno, ExportProvider};

use crate::metrics::Metrics;
use std::sync::Arc;

/// Largest READ/WRITE/CACHE length (and NBD_INFO_BLOCK_SIZE maximum): 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// NBD_INFO_BLOCK_SIZE minimum: any byte alignment works.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// NBD_INFO_BLOCK_SIZE preferred: the store's block, avoids read-modify-write.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;

impl Server {
    /// A server for the exports of `provider`, recording into `metrics`.
    pub fn new(provider: Arc<dyn ExportProvider>, metrics: Arc<Metrics>) -> Self {
        Server::with_source(Arc::new(volume::ProviderSource(provider)), metrics)
    }
}
