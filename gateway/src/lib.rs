//! The snapgate gateway: everything between the store and the outside world.
//!
//! ```text
//!  NBD clients (qemu, nbd-client, nbdcopy, fio)     snapgate CLI, scripts, Prometheus
//!        │ TCP :10809 / Unix socket                        │ HTTP+JSON :10810
//!        ▼                                                 ▼
//!   nbd::Server ──records──► metrics::Metrics ◄──renders── admin (axum router)
//!        │ ExportProvider: "vol" → head,                   │ spawn_blocking
//!        │ "vol@snap" → read-only point                    │
//!        ▼                                                 ▼
//!                       store::Pool (one per data directory)
//!                                   ▲
//!        fuse: read-only view DIR/<site>/<volume>/<point>.img (`snapgate mount`)
//! ```
//!
//! `serve` wires the NBD server, the admin endpoint and the pool together and owns the lifecycle (start, graceful
//! drain, final flush). Errors of this crate are one enum, [`Error`]; the
//! admin endpoint maps it to HTTP statuses in [`admin::http_status`], the
//! NBD server maps store errors to NBD error codes in its own single place.

pub mod admin;
pub mod error;
pub mod fuse;
pub mod metrics;
pub mod nbd;
pub mod serve;

pub use error::{Error, Result};
