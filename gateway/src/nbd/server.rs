//! The NBD server: accept loop, per-connection pipeline, shutdown.
//!
//! # Data flow of one connection
//!
//! ```text
//!   socket read half ──► reader (the connection task)
//!                          │ parse header, read/drain WRITE payload,
//!                          │ validate() — the one place requests are checked
//!                          ├─ invalid: encode error reply ───────────────┐
//!                          ├─ READ, bytes in memory: read_cached ────────┤
//!                          └─ else: spawn_blocking(execute) ──┐          │
//!                                     device call, encode     │          │
//!                                     reply, blocking_send ───┤          │
//!                                                             ▼          ▼
//!                                          mpsc<Frame> ──► writer task ──► socket write half
//! ```
//!
//! - The reader is the only code reading the socket; the writer task is the
//!   only code writing it. Replies therefore never interleave, and leave in
//!   completion order (cookies let the client match them).
//! - A READ of up to [`INLINE_READ_MAX`] bytes is first tried on the reader
//!   itself with [`Export::read_at_cached`], which serves it only if nothing
//!   needs the disk or a contended lock (`preadv2(RWF_NOWAIT)` underneath):
//!   a page-cache read costs a few microseconds, the hand-off to a blocking
//!   thread and back several times that (4 KiB random reads: about 1.5×
//!   nbdkit's rate with it, 0.55× without). Everything else, and reads it
//!   declines, goes to a blocking thread.
//! - Requests run concurrently on tokio's blocking pool because the device
//!   calls are blocking file I/O. At most [`MAX_IN_FLIGHT`] per connection:
//!   the reader takes a permit of the `in_flight` semaphore before it reads a
//!   request's payload and the permit travels inside the reply [`Frame`], so it
//!   is released only once the reply is written (or the connection is gone).
//!   READ/WRITE buffers additionally take `buffer_budget` permits (one per
//!   byte), bounding buffered payload per connection.
//! - Nothing is locked across an await or a device call. The device does its
//!   own locking; a FLUSH reply covers every write whose reply was already
//!   sent, because a write's reply is queued only after the device returned.
//! - NBD_CMD_DISC, EOF, a protocol violation or shutdown all end the reader;
//!   it drops its sender and then waits for the writer, which exits once every
//!   in-flight request has handed over its reply (each holds a sender). So
//!   outstanding requests always finish before the socket is closed. A client
//!   that vanishes makes the writer fail; running device calls still complete
//!   (a blocking call cannot be cancelled), so nothing acknowledged is lost and
//!   nothing unacknowledged is half-applied by us.
//!
//! # Shutdown
//!
//! `serve_*` stop accepting when the watch turns `true` (or its sender is
//! dropped). Connections in negotiation are closed; connections in
//! transmission stop reading requests, finish the ones in flight and close.
//! `serve_*` returns when every connection is gone, or after
//! [`DRAIN_TIMEOUT`], when the stragglers are aborted.

use super::export::{Export, ExportError, ExportSource};
use super::handshake;
use super::proto::{self, Command, Decode, Errno, Request, StatusExtent};
use super::MAX_PAYLOAD;
use crate::metrics::{Metrics, Op as MetricOp};
use std::future::Future;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

/// Requests served concurrently per connection (nbdcopy keeps 64 in flight).
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest READ served on the event loop when its bytes are in memory
/// (longer ones always go to a blocking thread: copying them would hold up
/// the other connections sharing the loop's thread).
const INLINE_READ_MAX: u32 = 1 << 20;
/// READ/WRITE payload bytes buffered per connection at once: two requests
/// of the largest size, or 16 deep queues of 4 MiB ones, which is more than
/// the clients here keep in flight (nbdcopy: 64 × 256 KiB; fio 1 MiB at
/// depth 16). It bounds what a client that stops reading its replies makes
/// the gateway hold: with the buffer pool's idle buffers, under 100 MiB a
/// connection.
const BUFFER_BUDGET: usize = 64 << 20;
/// Connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// At shutdown, a connection closes once its client sent nothing for this
/// long (requests that still arrive are answered ESHUTDOWN)…
const SHUTDOWN_QUIET: Duration = Duration::from_millis(200);
/// …or this long after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A client that stalls this long in negotiation (before its flags, or
/// between options) is disconnected, so idle sockets cannot hold every
/// connection slot (qemu-nbd's default handshake limit is the same, but
/// for the whole negotiation: listing many exports takes longer).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// However steadily a client sends options, negotiation ends after this
/// long (`nbdinfo --list` of a thousand exports takes about 7 minutes with
/// libnbd's corked options; a connection slot is not held longer).
pub const NEGOTIATION_LIMIT: Duration = Duration::from_secs(600);

/// The NBD server. Cheap to share: `serve_tcp` and `serve_unix` may run at
/// the same time on one `Arc<Server>`.
pub struct Server {
    source: Arc<dyn ExportSource>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
}

impl Server {
    /// A server that finds exports through `source`.
    pub fn with_source(source: Arc<dyn ExportSource>, metrics: Arc<Metrics>) -> Self {
        Server {
            source,
            metrics,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    /// Changes how long a client may stall in negotiation.
    pub fn with_handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }

    /// Serves NBD on an already bound TCP listener until `shutdown` turns
    /// true (or its sender is dropped), then drains connections.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        self.serve(listener, shutdown).await
    }

    /// Serves NBD on an already bound Unix socket listener; see `serve_tcp`.
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        self.serve(listener, shutdown).await
    }

    async fn serve<L: Listener>(
        self: Arc<Self>,
        listener: L,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let mut conns = JoinSet::new();
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                biased;
                _ = wait_shutdown(&mut shutdown) => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    reap(done);
                    continue;
                }
                p = Arc::clone(&limit).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = wait_shutdown(&mut shutdown) => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    reap(done);
                    continue;
                }
                a = listener.accept() => a,
            };
            match accepted {
                Ok((r, w, peer)) => {
                    let span = tracing::info_span!("nbd", peer = %peer);
                    let server = Arc::clone(&self);
                    let sd = shutdown.clone();
                    conns.spawn(
                        async move {
                            server.connection(r, w, sd).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Per-connection failures (the peer reset before we got
                    // to it) are routine; resource exhaustion (EMFILE) is
                    // not, and retrying at once would spin.
                    warn!("accept failed: {e}");
                    if !is_connection_error(&e) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        // Refuse new clients while the old ones drain.
        drop(listener);
        if !conns.is_empty() {
            info!(
                connections = conns.len(),
                "shutting down: draining NBD connections"
            );
        }
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(done) = conns.join_next().await {
                reap(done);
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                connections = conns.len(),
                "NBD connections still busy after {DRAIN_TIMEOUT:?}: aborting them"
            );
            conns.shutdown().await;
        }
        Ok(())
    }

    /// One client from greeting to close.
    pub(crate) async fn connection<R, W>(
        self: Arc<Self>,
        r: R,
        mut w: W,
        mut shutdown: watch::Receiver<bool>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.connection_opened();
        let _gauge = ConnectionGauge(&self.metrics);
        let mut r = BufReader::with_capacity(256 << 10, r);
        // At shutdown, negotiation goes on for SHUTDOWN_GRACE, refusing
        // options with NBD_REP_ERR_SHUTDOWN so the client learns why.
        let negotiation = tokio::time::timeout(
            NEGOTIATION_LIMIT,
            handshake::negotiate(
                &mut r,
                &mut w,
                &self.source,
                shutdown.clone(),
                self.handshake_timeout,
            ),
        );
        let grace = async {
            wait_shutdown(&mut shutdown).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let negotiated = tokio::select! {
            res = negotiation => match res {
                Ok(res) => res,
                Err(_) => {
                    warn!("client still negotiating after {NEGOTIATION_LIMIT:?}: disconnecting");
                    return;
                }
            },
            _ = grace => {
                debug!("closing connection in negotiation: shutting down");
                return;
            }
        };
        let session = match negotiated {
            Ok(Some(s)) => s,
            Ok(None) => {
                debug!("negotiation ended without an export");
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                warn!("negotiation failed: {e}");
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                warn!("{e}: disconnecting");
                return;
            }
            Err(e) => {
                debug!("client left during negotiation: {e}");
                return;
            }
        };
        let name = session.export.name().to_owned();
        let conn = Arc::new(Conn {
            read_only: session.flags & proto::TFLAG_READ_ONLY != 0,
            export: session.export,
            size: session.size,
            structured: session.structured,
            contexts: session.contexts,
            metrics: Arc::clone(&self.metrics),
            bufs: BufPool::default(),
        });
        transmission(conn, r, w, shutdown)
            .instrument(tracing::info_span!("export", name = %name))
            .await;
    }
}

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!("NBD connection task panicked: {e}");
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Resolves once shutdown is requested: the value is `true`, or the sender
/// is gone (nobody could ever request it otherwise).
pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

struct ConnectionGauge<'a>(&'a Metrics);

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// A listening socket of either family, yielding split streams.
trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Small replies must not wait for Nagle (spec: SHOULD disable it).
        if let Err(e) = stream.set_nodelay(true) {
            warn!("cannot set TCP_NODELAY: {e}");
        }
        let (r, w) = stream.into_split();
        Ok((r, w, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let (r, w) = stream.into_split();
        Ok((r, w, "unix".to_owned()))
    }
}

// ---------------------------------------------------------------------------
// Transmission phase.

/// What every request of one connection shares.
struct Conn {
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    metrics: Arc<Metrics>,
    /// Recycled READ reply and WRITE payload buffers.
    bufs: BufPool,
}

/// Buffers kept for reuse: a fresh multi-megabyte buffer costs a memset and
/// page faults on every request, which showed as a fifth of the CPU time of
/// 1 MiB reads. Buffers are reused only for the same length (workloads use
/// a few fixed sizes), so a reused buffer needs no clearing: its bytes are
/// overwritten by the read or the payload.
#[derive(Default)]
struct BufPool {
    free: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept per connection (one per request in flight suffices), at
/// most this many bytes of them, and none longer than `POOL_LONGEST`.
const POOL_BUFFERS: usize = MAX_IN_FLIGHT;
const POOL_BYTES: usize = 32 << 20;
const POOL_LONGEST: usize = 4 << 20;

impl BufPool {
    /// A buffer of exactly `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock();
        match free.iter().rposition(|b| b.len() == len) {
            Some(i) => free.swap_remove(i),
            None => {
                drop(free);
                vec![0u8; len]
            }
        }
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.len() < 4096 || buf.len() > POOL_LONGEST {
            return;
        }
        let mut free = self.free.lock();
        let mut held: usize = free.iter().map(Vec::len).sum::<usize>() + buf.len();
        while !free.is_empty() && (free.len() >= POOL_BUFFERS || held > POOL_BYTES) {
            held -= free.remove(0).len();
        }
        free.push(buf);
    }
}

/// One encoded reply on its way to the writer, holding the permits that
/// bound the connection's in-flight work until it is on the wire.
struct Frame {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _buffer: Option<OwnedSemaphorePermit>,
}

/// A request that passed validation, ready for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Why a request is refused before it reaches the device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rejection {
    errno: Errno,
    message: String,
}

fn reject(errno: Errno, message: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        message: message.into(),
    }
}

/// The facts about a connection that validation depends on.
#[derive(Clone, Copy, Debug)]
struct Limits {
    size: u64,
    read_only: bool,
    structured: bool,
    has_contexts: bool,
}

/// Every check a request goes through, in one place, before the device is
/// touched. Arithmetic cannot overflow. `Command::Disc` never gets here.
fn validate(req: &Request, l: &Limits) -> Result<Op, Rejection> {
    use proto::{
        CMD_FLAG_DF as DF, CMD_FLAG_FAST_ZERO as FAST_ZERO, CMD_FLAG_FUA as FUA,
        CMD_FLAG_NO_HOLE as NO_HOLE, CMD_FLAG_REQ_ONE as REQ_ONE,
    };
    let name = match req.command {
        Command::Read => "READ",
        Command::Write => "WRITE",
        Command::Flush => "FLUSH",
        Command::Trim => "TRIM",
        Command::Cache => "CACHE",
        Command::WriteZeroes => "WRITE_ZEROES",
        Command::BlockStatus => "BLOCK_STATUS",
        Command::Disc => "DISC",
        Command::Other(t) => return Err(reject(Errno::Inval, format!("unknown command {t}"))),
    };
    // FUA is accepted on every command (clients set it on reads too).
    let allowed = match req.command {
        Command::Read if l.structured => FUA | DF,
        Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
        Command::BlockStatus => FUA | REQ_ONE,
        _ => FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(reject(
            Errno::Inval,
            format!("flags {:#x} not valid on {name}", req.flags & !allowed),
        ));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && l.read_only {
        return Err(reject(Errno::Perm, format!("{name} on a read-only export")));
    }
    let (offset, len) = (req.offset, req.length);
    // Commands whose length is a payload (or buffer) are capped; the others
    // may exceed the maximum block size.
    let capped = matches!(req.command, Command::Read | Command::Write | Command::Cache);
    if capped && len > MAX_PAYLOAD {
        let errno = if req.command == Command::Read && req.flags & DF != 0 {
            Errno::Overflow
        } else {
            Errno::Inval
        };
        return Err(reject(
            errno,
            format!("{name} of {len} bytes exceeds the maximum of {MAX_PAYLOAD}"),
        ));
    }
    if req.command == Command::Flush {
        if offset != 0 || len != 0 {
            return Err(reject(Errno::Inval, "FLUSH with non-zero offset or length"));
        }
        return Ok(Op::Flush);
    }
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= l.size);
    if !in_range {
        let errno = if matches!(req.command, Command::Write | Command::WriteZeroes) {
            Errno::NoSpc
        } else {
            Errno::Inval
        };
        return Err(reject(
            errno,
            format!(
                "{name} of {len} bytes at offset {offset} is beyond the end of the export ({} bytes)",
                l.size
            ),
        ));
    }
    let fua = req.flags & FUA != 0;
    Ok(match req.command {
        Command::Read => Op::Read { offset, len },
        Command::Write => Op::Write { offset, len, fua },
        Command::Trim => Op::Trim { offset, len, fua },
        Command::WriteZeroes => Op::WriteZeroes {
            offset,
            len,
            no_hole: req.flags & NO_HOLE != 0,
            fua,
            fast: req.flags & FAST_ZERO != 0,
        },
        Command::Cache => Op::Cache { offset, len },
        Command::BlockStatus => {
            if !l.structured {
                return Err(reject(
                    Errno::Inval,
                    "BLOCK_STATUS needs structured replies",
                ));
            }
            if !l.has_contexts {
                return Err(reject(
                    Errno::Inval,
                    "BLOCK_STATUS without a metadata context selected for this export",
                ));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & REQ_ONE != 0,
            }
        }
        Command::Flush | Command::Disc | Command::Other(_) => {
            unreachable!("handled above")
        }
    })
}

/// Why the reader stopped.
enum End {
    Disc,
    Eof,
    Shutdown,
    WriterGone,
    Io(io::Error),
    Protocol(String),
}

async fn transmission<R, W>(
    conn: Arc<Conn>,
    mut r: BufReader<R>,
    w: W,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
    let writer = AbortOnDrop(tokio::spawn(
        write_loop(w, rx, Arc::clone(&conn)).in_current_span(),
    ));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(BUFFER_BUDGET));
    let limits = Limits {
        size: conn.size,
        read_only: conn.read_only,
        structured: conn.structured,
        has_contexts: !conn.contexts.is_empty(),
    };

    // After shutdown is requested, requests already on their way are still
    // read and answered ESHUTDOWN until the client has been quiet for
    // SHUTDOWN_QUIET (or SHUTDOWN_GRACE passed), so no request is left
    // without an answer on a healthy connection.
    let mut closing: Option<Instant> = None;
    // The header is read piecewise with the cancel-safe `read`, so a branch
    // below that wins while a header is half-received loses no bytes.
    let mut hdr = [0u8; proto::REQUEST_LEN];
    let mut have = 0;
    let end = loop {
        let quiet = match closing {
            None => Duration::from_secs(86400),
            Some(t) => SHUTDOWN_QUIET.min(SHUTDOWN_GRACE.saturating_sub(t.elapsed())),
        };
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown), if closing.is_none() => {
                closing = Some(Instant::now());
                continue;
            }
            _ = tx.closed() => break End::WriterGone,
            _ = tokio::time::sleep(quiet), if closing.is_some() => break End::Shutdown,
            res = r.read(&mut hdr[have..]) => match res {
                Ok(0) if have == 0 => break End::Eof,
                Ok(0) => break End::Io(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    have += n;
                    if have < hdr.len() {
                        continue;
                    }
                    have = 0;
                }
                Err(e) => break End::Io(e),
            },
        }
        let req = match proto::parse_request(&hdr) {
            Ok(Decode::Complete { value, .. }) => value,
            Ok(Decode::Incomplete { .. }) => break End::Protocol("short request".into()),
            Err(e) => break End::Protocol(e.to_string()),
        };
        if req.command == Command::Disc {
            break End::Disc;
        }
        let received = Instant::now();
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            break End::WriterGone;
        };

        // A WRITE's payload is on the wire whatever we think of the request:
        // take it off first, so an error reply keeps the stream in sync.
        let mut payload = None;
        if req.command == Command::Write {
            if req.length > MAX_PAYLOAD {
                // Validation refuses it; drain in bounded pieces.
                if let Err(e) = handshake::drain(&mut r, u64::from(req.length)).await {
                    break End::Io(e);
                }
            } else {
                let Ok(permit) = Arc::clone(&budget).acquire_many_owned(req.length).await else {
                    break End::WriterGone;
                };
                let mut data = conn.bufs.take(req.length as usize);
                if let Err(e) = r.read_exact(&mut data).await {
                    break End::Io(e);
                }
                payload = Some((data, permit));
            }
        }

        let checked = if closing.is_some() {
            Err(Rejection {
                errno: Errno::Shutdown,
                message: "the server is shutting down".into(),
            })
        } else {
            validate(&req, &limits)
        };
        let op = match checked {
            Ok(op) => op,
            Err(rej) => {
                debug!(
                    cookie = req.cookie,
                    command = ?req.command,
                    offset = req.offset,
                    length = req.length,
                    "request refused: {} ({})",
                    rej.message,
                    rej.errno
                );
                let mut bytes = Vec::with_capacity(64);
                conn.error_reply(
                    &mut bytes,
                    conn.structured,
                    req.cookie,
                    rej.errno,
                    &rej.message,
                );
                let frame = Frame {
                    bytes,
                    _slot: slot,
                    _buffer: None,
                };
                if tx.send(frame).await.is_err() {
                    break End::WriterGone;
                }
                continue;
            }
        };
        // A READ's reply buffer counts against the budget until written.
        let read_buffer = match op {
            Op::Read { len, .. } => match Arc::clone(&budget).acquire_many_owned(len).await {
                Ok(p) => Some(p),
                Err(_) => break End::WriterGone,
            },
            _ => None,
        };
        // A READ whose bytes are all in memory is served right here: the
        // hand-off to a blocking thread and back costs more than the read.
        if let Op::Read { offset, len } = op {
            if len <= INLINE_READ_MAX {
                let served = guarded(&conn, &req, op, received, |c| {
                    c.read_cached(req.cookie, offset, len)
                });
                if let Some(bytes) = served {
                    let frame = Frame {
                        bytes,
                        _slot: slot,
                        _buffer: read_buffer,
                    };
                    if tx.send(frame).await.is_err() {
                        break End::WriterGone;
                    }
                    continue;
                }
            }
        }
        let conn = Arc::clone(&conn);
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let data = payload.as_ref().map(|(d, _)| d.as_slice());
            let bytes = guarded(&conn, &req, op, received, |c| {
                Some(c.execute(&req, op, data))
            })
            .unwrap_or_else(|| unreachable!("execute always answers"));
            // The written data's buffer is free as soon as the device has it.
            if let Some((data, permit)) = payload {
                conn.bufs.give(data);
                drop(permit);
            }
            let frame = Frame {
                bytes,
                _slot: slot,
                _buffer: read_buffer,
            };
            // Fails only if the writer is gone (client vanished): the
            // request was still carried out, just never acknowledged.
            let _ = tx.blocking_send(frame);
        });
    };

    match &end {
        End::Disc => debug!("client disconnected (NBD_CMD_DISC)"),
        End::Eof => debug!("client closed the connection"),
        End::Shutdown => info!("closing connection: server shutting down"),
        End::WriterGone => debug!("connection lost while writing replies"),
        End::Io(e) => debug!("connection read error: {e}"),
        End::Protocol(e) => warn!("protocol violation, disconnecting: {e}"),
    }
    // In-flight requests hold sender clones: the writer finishes once the
    // last of them has replied.
    drop(tx);
    match writer.join().await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("writer stopped: {e}"),
        Err(e) => error!("writer task failed: {e}"),
    }
}

/// Runs `f` (a request's device call, `None`: declined), records the
/// request's latency when it succeeded, and turns a panic into an EIO reply
/// so the connection goes on.
fn guarded(
    conn: &Conn,
    req: &Request,
    op: Op,
    received: Instant,
    f: impl FnOnce(&Conn) -> Option<(Vec<u8>, bool)>,
) -> Option<Vec<u8>> {
    match catch_unwind(AssertUnwindSafe(|| f(conn))) {
        Ok(Some((bytes, ok))) => {
            if ok {
                conn.record(op, received.elapsed());
            }
            Some(bytes)
        }
        Ok(None) => None,
        Err(_) => {
            error!(
                export = conn.export.name(),
                cookie = req.cookie,
                "request handler panicked"
            );
            let mut b = Vec::new();
            conn.error_reply(
                &mut b,
                conn.structured,
                req.cookie,
                Errno::Io,
                "internal server error",
            );
            Some(b)
        }
    }
}

/// The only code writing the socket in transmission: writes frames as they
/// come, batching whatever is ready into one flush.
async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Frame>,
    conn: Arc<Conn>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(frame) = rx.recv().await {
        w.write_all(&frame.bytes).await?;
        conn.bufs.give(frame.bytes);
        while let Ok(frame) = rx.try_recv() {
            w.write_all(&frame.bytes).await?;
            conn.bufs.give(frame.bytes);
        }
        w.flush().await?;
    }
    // Every sender is gone: all replies are out. Close our side.
    w.shutdown().await
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An error reply: an ERROR chunk with the message when structured replies
/// are on (mandatory for READ, preferred for all), else a simple reply.
fn error_reply(out: &mut Vec<u8>, structured: bool, cookie: u64, errno: Errno, message: &str) {
    if structured {
        proto::encode_error_chunk(out, proto::REPLY_FLAG_DONE, cookie, errno, message);
    } else {
        proto::encode_simple_reply(out, cookie, errno.code());
    }
}

impl Conn {
    /// Encodes an error reply (see [`error_reply`]) and counts it.
    fn error_reply(
        &self,
        out: &mut Vec<u8>,
        structured: bool,
        cookie: u64,
        errno: Errno,
        message: &str,
    ) {
        self.metrics.record_error(self.export.name(), errno.name());
        error_reply(out, structured, cookie, errno, message);
    }

    /// Runs a validated request on the device and encodes its reply.
    /// Called on a blocking thread.
    /// Returns the reply and whether the request succeeded.
    fn execute(&self, req: &Request, op: Op, payload: Option<&[u8]>) -> (Vec<u8>, bool) {
        let cookie = req.cookie;
        let dev = &*self.export;
        let result = match op {
            Op::Read { offset, len } => return self.read(cookie, offset, len),
            Op::BlockStatus {
                offset,
                len,
                req_one,
            } => return self.block_status(cookie, offset, len, req_one),
            Op::Write { offset, fua, .. } => match payload {
                Some([]) => Ok(()),
                Some(data) => dev.write_at(data, offset, fua),
                None => Err(ExportError::new(Errno::Io, "WRITE without payload")),
            },
            Op::Flush => dev.flush(),
            Op::Trim { len: 0, .. } | Op::WriteZeroes { len: 0, .. } | Op::Cache { len: 0, .. } => {
                Ok(())
            }
            Op::Trim { offset, len, fua } => dev.trim(offset, u64::from(len), fua),
            Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fua,
                fast,
            } => {
                if fast && !dev.fast_zero(no_hole) {
                    Err(ExportError::new(
                        Errno::NotSup,
                        "fast zeroing is not possible here",
                    ))
                } else {
                    dev.write_zeroes(offset, u64::from(len), no_hole, fua)
                }
            }
            Op::Cache { offset, len } => dev.cache(offset, u64::from(len)),
        };
        let mut out = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        match result {
            // Payload-less success: a simple reply is allowed (and shortest)
            // even with structured replies on.
            Ok(()) => {
                proto::encode_simple_reply(&mut out, cookie, 0);
                (out, true)
            }
            Err(e) => {
                self.log_failure(req, &e);
                self.error_reply(&mut out, self.structured, cookie, e.errno, &e.message);
                (out, false)
            }
        }
    }

    fn log_failure(&self, req: &Request, e: &ExportError) {
        // ENOTSUP for FAST_ZERO is an answer, not a failure.
        if e.errno == Errno::NotSup {
            debug!(export = self.export.name(), cookie = req.cookie, "{e}");
        } else {
            warn!(
                export = self.export.name(),
                cookie = req.cookie,
                command = ?req.command,
                offset = req.offset,
                length = req.length,
                "request failed: {e}"
            );
        }
    }

    fn read(&self, cookie: u64, offset: u64, len: u32) -> (Vec<u8>, bool) {
        self.read_with(cookie, offset, len, |buf| {
            self.export.read_at(buf, offset).map(|()| true)
        })
        .unwrap_or_else(|| unreachable!("read_at never declines"))
    }

    /// `read` if the export can serve it from memory; `None` otherwise.
    fn read_cached(&self, cookie: u64, offset: u64, len: u32) -> Option<(Vec<u8>, bool)> {
        self.read_with(cookie, offset, len, |buf| {
            self.export.read_at_cached(buf, offset)
        })
    }

    /// A READ's reply, the data read by `f` (`Ok(false)`: declined, `None`).
    fn read_with(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        f: impl FnOnce(&mut [u8]) -> Result<bool, ExportError>,
    ) -> Option<(Vec<u8>, bool)> {
        let len = len as usize;
        if len == 0 {
            let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN);
            if self.structured {
                proto::encode_none(&mut out, cookie);
            } else {
                proto::encode_simple_reply(&mut out, cookie, 0);
            }
            return Some((out, true));
        }
        // The data is read straight behind the reply header in one buffer.
        let hdr = if self.structured {
            proto::OFFSET_DATA_HEADER_LEN
        } else {
            proto::SIMPLE_REPLY_LEN
        };
        let mut buf = self.bufs.take(hdr + len);
        match f(&mut buf[hdr..]) {
            Ok(false) => {
                self.bufs.give(buf);
                None
            }
            Ok(true) => {
                if self.structured {
                    // Cannot fail: len <= MAX_PAYLOAD and the slice is exact.
                    let _ = proto::put_offset_data_header(
                        &mut buf[..hdr],
                        proto::REPLY_FLAG_DONE,
                        cookie,
                        offset,
                        len,
                    );
                } else {
                    let mut h = Vec::with_capacity(hdr);
                    proto::encode_simple_reply(&mut h, cookie, 0);
                    buf[..hdr].copy_from_slice(&h);
                }
                Some((buf, true))
            }
            Err(e) => {
                warn!(
                    export = self.export.name(),
                    cookie, offset, len, "READ failed: {e}"
                );
                let mut out = Vec::with_capacity(64);
                self.error_reply(&mut out, self.structured, cookie, e.errno, &e.message);
                Some((out, false))
            }
        }
    }

    fn block_status(&self, cookie: u64, offset: u64, len: u32, req_one: bool) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        if len == 0 {
            proto::encode_none(&mut out, cookie);
            return (out, true);
        }
        let n = self.contexts.len();
        for (i, (id, name)) in self.contexts.iter().enumerate() {
            let extents = self
                .export
                .block_status(name, offset, len)
                .and_then(|e| sanitize_extents(e, len, req_one));
            match extents {
                Ok(extents) => {
                    let flags = if i + 1 == n {
                        proto::REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    proto::encode_block_status(&mut out, flags, cookie, *id, &extents);
                }
                Err(e) => {
                    warn!(
                        export = self.export.name(),
                        cookie, offset, len, context = %name, "BLOCK_STATUS failed: {e}"
                    );
                    // One error chunk instead of a partial answer.
                    out.clear();
                    self.error_reply(&mut out, true, cookie, e.errno, &e.message);
                    return (out, false);
                }
            }
        }
        (out, true)
    }

    fn record(&self, op: Op, latency: Duration) {
        let (m, bytes) = match op {
            Op::Read { len, .. } => (MetricOp::Read, u64::from(len)),
            Op::Write { len, .. } => (MetricOp::Write, u64::from(len)),
            Op::Flush => (MetricOp::Flush, 0),
            Op::Trim { len, .. } => (MetricOp::Trim, u64::from(len)),
            Op::WriteZeroes { len, .. } => (MetricOp::WriteZeroes, u64::from(len)),
            Op::Cache { len, .. } => (MetricOp::Cache, u64::from(len)),
            Op::BlockStatus { len, .. } => (MetricOp::BlockStatus, u64::from(len)),
        };
        self.metrics.record(self.export.name(), m, bytes, latency);
    }
}

/// Enforces the BLOCK_STATUS reply rules on what the device returned:
/// non-zero lengths, at least one extent, nothing past the request
/// (harmless to clip, and REQ_ONE demands it), exactly one with REQ_ONE;
/// adjacent extents with equal flags are merged.
fn sanitize_extents(
    extents: Vec<StatusExtent>,
    len: u32,
    req_one: bool,
) -> Result<Vec<StatusExtent>, ExportError> {
    let mut out: Vec<StatusExtent> = Vec::with_capacity(extents.len().min(1024));
    let mut covered: u64 = 0;
    for e in extents {
        if e.length == 0 {
            return Err(ExportError::new(
                Errno::Io,
                "device reported a zero-length extent",
            ));
        }
        let room = u64::from(len) - covered;
        let length = u64::from(e.length).min(room) as u32;
        covered += u64::from(length);
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += length,
            _ => out.push(StatusExtent {
                length,
                flags: e.flags,
            }),
        }
        if covered == u64::from(len) {
            break;
        }
    }
    if out.is_empty() {
        return Err(ExportError::new(Errno::Io, "device reported no extents"));
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}
