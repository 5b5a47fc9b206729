//! Fixed newstyle negotiation: greeting, client flags, then options in lock
//! step (one option, its replies, the next option) until the client picks an
//! export with NBD_OPT_GO / NBD_OPT_EXPORT_NAME or leaves.
//!
//! Rules kept here (see `/work/shared/NBD-NOTES.md`):
//! - every option's payload is consumed, also when it is answered with an
//!   error, so the stream never desynchronises;
//! - unknown options (and STARTTLS, EXTENDED_HEADERS) get NBD_REP_ERR_UNSUP;
//! - each NBD_OPT_SET_META_CONTEXT replaces the selection, even when it fails,
//!   and the selection only counts if it named the export finally chosen;
//! - NBD_OPT_EXPORT_NAME cannot be answered with an error: failure is a hard
//!   disconnect.

use super::export::{Export, ExportSource, OpenError};
use super::proto::{self, ClientOption, Decode, InfoRequest, MetaContextRequest};
use super::{BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, MAX_PAYLOAD};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Longest option payload read into memory. Longer ones are drained and
/// refused with NBD_REP_ERR_TOO_BIG: no legitimate option comes near it
/// (strings are capped at 4096 bytes).
const MAX_OPTION_LEN: u32 = 1 << 20;

/// Options one connection may send before it is considered abusive.
const MAX_OPTIONS: usize = 4096;

/// What negotiation settled for the transmission phase.
pub(super) struct Session {
    pub export: Arc<dyn Export>,
    /// Size advertised to the client: requests are validated against it.
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Selected metadata contexts as (id, name), in id order; empty unless
    /// the last SET_META_CONTEXT named this export.
    pub contexts: Vec<(u32, String)>,
}

/// The transmission flags of an export: every optional command is
/// supported; DF only means something once structured replies are on.
pub(super) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_CACHE
        | proto::TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= proto::TFLAG_READ_ONLY;
    } else {
        f |= proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES | proto::TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= proto::TFLAG_SEND_DF;
    }
    f
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct MetaSelection {
    export: String,
    contexts: Vec<String>,
}

struct Negotiation<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    source: &'a Arc<dyn ExportSource>,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    out: Vec<u8>,
    /// True once the server is shutting down: options get
    /// `NBD_REP_ERR_SHUTDOWN` from then on.
    shutdown: watch::Receiver<bool>,
}

/// Runs the handshake. `Ok(Some)` enters transmission, `Ok(None)` is a
/// client that aborted; `Err` is a vanished client or a protocol violation
/// (kind `InvalidData`) that ends the connection. Once `shutdown` turns
/// true, every further option but ABORT is refused with
/// `NBD_REP_ERR_SHUTDOWN` (EXPORT_NAME, which has no error reply, closes).
///
/// `idle` bounds each step: the client flags, and each option with its
/// reply. A step that takes longer fails with `TimedOut`. A client making
/// progress may take as long as it needs (listing many exports takes a
/// while: libnbd sends some options corked, 0.2 s each), one that stalls
/// cannot hold a connection slot.
pub(super) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    source: &Arc<dyn ExportSource>,
    shutdown: watch::Receiver<bool>,
    idle: Duration,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    proto::encode_greeting(&mut out, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    w.write_all(&out).await?;
    w.flush().await?;

    let mut flags = [0u8; proto::CLIENT_FLAGS_LEN];
    within(idle, r.read_exact(&mut flags)).await?;
    let client = match proto::parse_client_flags(&flags) {
        Ok(Decode::Complete { value, .. }) => value,
        Ok(Decode::Incomplete { .. }) => return Err(protocol_error("short client flags")),
        Err(e) => return Err(protocol_error(e.to_string())),
    };
    let mut n = Negotiation {
        r,
        w,
        source,
        no_zeroes: client.no_zeroes,
        structured: false,
        meta: None,
        out,
        shutdown,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(end) = within(idle, n.option()).await? {
            return Ok(end);
        }
    }
    Err(protocol_error(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// `step`, failed with `TimedOut` when it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    step: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(limit, step).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client stalled for {limit:?} in negotiation"),
        )),
    }
}

impl<R, W> Negotiation<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Handles one option. `Some` ends negotiation.
    async fn option(&mut self) -> io::Result<Option<Option<Session>>> {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        self.r.read_exact(&mut hdr).await?;
        let hdr = match proto::parse_option_header(&hdr) {
            Ok(Decode::Complete { value, .. }) => value,
            Ok(Decode::Incomplete { .. }) => return Err(protocol_error("short option header")),
            Err(e) => return Err(protocol_error(e.to_string())),
        };
        let opt = hdr.option;
        if opt == proto::OPT_SET_META_CONTEXT {
            // Replaced even if this request fails.
            self.meta = None;
        }
        if hdr.length > MAX_OPTION_LEN {
            drain(self.r, u64::from(hdr.length)).await?;
            if opt == proto::OPT_EXPORT_NAME {
                return Err(protocol_error("NBD_OPT_EXPORT_NAME with an oversized name"));
            }
            let known = !matches!(
                proto::parse_option(opt, &[]),
                Ok(ClientOption::Unsupported(_))
            );
            let (code, msg) = if known {
                (proto::REP_ERR_TOO_BIG, "option data too large")
            } else {
                (proto::REP_ERR_UNSUP, "option not supported")
            };
            self.reply_error(opt, code, msg).await?;
            return Ok(None);
        }
        let mut payload = vec![0u8; hdr.length as usize];
        self.r.read_exact(&mut payload).await?;
        // Shutdown: the flag set, or its sender gone (see `wait_shutdown`).
        let shutting_down = *self.shutdown.borrow() || self.shutdown.has_changed().is_err();
        if shutting_down && opt != proto::OPT_ABORT {
            if opt == proto::OPT_EXPORT_NAME {
                return Ok(Some(None));
            }
            self.reply_error(opt, proto::REP_ERR_SHUTDOWN, "the server is shutting down")
                .await?;
            return Ok(None);
        }
        let option = match proto::parse_option(opt, &payload) {
            Ok(o) => o,
            Err(e) => {
                if opt == proto::OPT_EXPORT_NAME {
                    return Err(protocol_error(format!("NBD_OPT_EXPORT_NAME: {e}")));
                }
                debug!(option = opt, "invalid option data: {e}");
                self.reply_error(opt, proto::REP_ERR_INVALID, &e.to_string())
                    .await?;
                return Ok(None);
            }
        };
        match option {
            ClientOption::ExportName(name) => self.export_name(name).await.map(|s| Some(Some(s))),
            ClientOption::Abort => {
                // The client may already have closed: that is fine too.
                self.out.clear();
                proto::encode_rep_ack(&mut self.out, opt);
                let _ = self.send().await;
                Ok(Some(None))
            }
            ClientOption::List => {
                let source = Arc::clone(self.source);
                let names = blocking(move || source.list()).await?;
                self.out.clear();
                for name in &names {
                    proto::encode_rep_server(&mut self.out, opt, name);
                }
                proto::encode_rep_ack(&mut self.out, opt);
                self.send().await?;
                Ok(None)
            }
            ClientOption::StartTls => {
                self.reply_error(opt, proto::REP_ERR_UNSUP, "TLS is not supported")
                    .await?;
                Ok(None)
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.out.clear();
                proto::encode_rep_ack(&mut self.out, opt);
                self.send().await?;
                Ok(None)
            }
            ClientOption::Info(req) => self.info(opt, req, false).await,
            ClientOption::Go(req) => self.info(opt, req, true).await,
            ClientOption::ListMetaContext(req) => {
                self.meta_context(opt, req, false).await?;
                Ok(None)
            }
            ClientOption::SetMetaContext(req) => {
                self.meta_context(opt, req, true).await?;
                Ok(None)
            }
            ClientOption::Unsupported(o) => {
                debug!(option = o, "unsupported option");
                self.reply_error(opt, proto::REP_ERR_UNSUP, "option not supported")
                    .await?;
                Ok(None)
            }
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        self.w.write_all(&self.out).await?;
        self.w.flush().await
    }

    async fn reply_error(&mut self, opt: u32, code: u32, msg: &str) -> io::Result<()> {
        self.out.clear();
        proto::encode_rep_error(&mut self.out, opt, code, msg);
        self.send().await
    }

    /// Opens an export off the async threads. The future borrows nothing
    /// from `self`, so the negotiation state need not be `Sync`.
    fn open(
        &self,
        name: &str,
    ) -> impl std::future::Future<Output = io::Result<Result<Arc<dyn Export>, OpenError>>> + 'static
    {
        let source = Arc::clone(self.source);
        let name = name.to_owned();
        blocking(move || source.open(&name))
    }

    /// Contexts chosen by the last SET_META_CONTEXT, if it named `export`.
    fn contexts_for(&self, export: &str) -> Vec<(u32, String)> {
        match &self.meta {
            Some(sel) if sel.export == export => sel
                .contexts
                .iter()
                .enumerate()
                .map(|(i, c)| (i as u32 + 1, c.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn session(&self, name: &str, export: Arc<dyn Export>) -> Session {
        let size = export.size();
        Session {
            size,
            flags: transmission_flags(export.read_only(), self.structured),
            structured: self.structured,
            contexts: self.contexts_for(name),
            export,
        }
    }

    async fn export_name(&mut self, name: String) -> io::Result<Session> {
        let export = match self.open(&name).await? {
            Ok(e) => e,
            Err(e) => {
                // No way to report an error to this client: hang up.
                return Err(protocol_error(format!(
                    "NBD_OPT_EXPORT_NAME {name:?} refused: {e}"
                )));
            }
        };
        let session = self.session(&name, export);
        self.out.clear();
        proto::encode_export_name_reply(&mut self.out, session.size, session.flags, self.no_zeroes);
        self.send().await?;
        info!(export = %name, size = session.size, "client attached (EXPORT_NAME)");
        Ok(session)
    }

    async fn info(
        &mut self,
        opt: u32,
        req: InfoRequest,
        go: bool,
    ) -> io::Result<Option<Option<Session>>> {
        let export = match self.open(&req.name).await? {
            Ok(e) => e,
            Err(e) => {
                let code = match e {
                    OpenError::Policy(_) => proto::REP_ERR_POLICY,
                    OpenError::Unknown(_) | OpenError::Failed(_) => proto::REP_ERR_UNKNOWN,
                };
                debug!(export = %req.name, "cannot open export: {e}");
                self.reply_error(opt, code, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let session = self.session(&req.name, export);
        self.out.clear();
        proto::encode_info_export(&mut self.out, opt, session.size, session.flags);
        if req.requests.contains(&proto::INFO_NAME) {
            proto::encode_info_string(&mut self.out, opt, proto::INFO_NAME, session.export.name());
        }
        if req.requests.contains(&proto::INFO_DESCRIPTION) {
            if let Some(d) = session.export.description() {
                proto::encode_info_string(&mut self.out, opt, proto::INFO_DESCRIPTION, &d);
            }
        }
        // Sent whether asked or not: clients that did not ask ignore it, and
        // requests over the maximum are refused with EINVAL anyway.
        proto::encode_info_block_size(
            &mut self.out,
            opt,
            BLOCK_SIZE_MIN,
            BLOCK_SIZE_PREFERRED,
            MAX_PAYLOAD,
        );
        proto::encode_rep_ack(&mut self.out, opt);
        self.send().await?;
        if !go {
            return Ok(None);
        }
        info!(
            export = %req.name,
            size = session.size,
            structured = session.structured,
            contexts = session.contexts.len(),
            "client attached"
        );
        Ok(Some(Some(session)))
    }

    async fn meta_context(
        &mut self,
        opt: u32,
        req: MetaContextRequest,
        set: bool,
    ) -> io::Result<()> {
        if !self.structured {
            return self
                .reply_error(
                    opt,
                    proto::REP_ERR_INVALID,
                    "negotiate NBD_OPT_STRUCTURED_REPLY first",
                )
                .await;
        }
        let export = match self.open(&req.export).await? {
            Ok(e) => e,
            Err(e) => {
                let code = match e {
                    OpenError::Policy(_) => proto::REP_ERR_POLICY,
                    OpenError::Unknown(_) | OpenError::Failed(_) => proto::REP_ERR_UNKNOWN,
                };
                return self.reply_error(opt, code, &e.to_string()).await;
            }
        };
        let available = export.meta_contexts();
        let matches = select_contexts(&available, &req.queries, set);
        self.out.clear();
        for (i, name) in matches.iter().enumerate() {
            // LIST ids are reserved (0); SET ids identify chunks later.
            let id = if set { i as u32 + 1 } else { 0 };
            proto::encode_rep_meta_context(&mut self.out, opt, id, name);
        }
        proto::encode_rep_ack(&mut self.out, opt);
        if set {
            self.meta = Some(MetaSelection {
                export: req.export,
                contexts: matches,
            });
        }
        self.send().await
    }
}

/// Matches queries against an export's contexts.
///
/// LIST: no query lists everything; a query ending in `:` (`base:`,
/// `qemu:dirty-bitmap:`) is a wildcard for every context it prefixes.
/// SET: only exact names select (wildcards select nothing, per the spec).
/// Unknown names and namespaces are ignored, never an error. The result keeps
/// the export's order and has no duplicates.
pub(super) fn select_contexts(available: &[String], queries: &[String], set: bool) -> Vec<String> {
    available
        .iter()
        .filter(|name| {
            if queries.is_empty() {
                return !set;
            }
            queries
                .iter()
                .any(|q| q == *name || (!set && q.ends_with(':') && name.starts_with(q.as_str())))
        })
        .cloned()
        .collect()
}

/// Reads and discards `len` bytes in bounded pieces.
pub(super) async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *r).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs a blocking export call off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        warn!("export lookup panicked: {e}");
        io::Error::other("export lookup failed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn context_matching() {
        let avail = s(&[
            "base:allocation",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b",
        ]);
        assert_eq!(select_contexts(&avail, &[], false), avail);
        assert!(select_contexts(&avail, &[], true).is_empty());
        assert_eq!(
            select_contexts(&avail, &s(&["base:"]), false),
            s(&["base:allocation"])
        );
        assert!(select_contexts(&avail, &s(&["base:"]), true).is_empty());
        assert_eq!(
            select_contexts(&avail, &s(&["qemu:dirty-bitmap:"]), false),
            s(&["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"])
        );
        assert_eq!(
            select_contexts(
                &avail,
                &s(&[
                    "qemu:dirty-bitmap:b",
                    "base:allocation",
                    "base:allocation",
                    "x-y:z"
                ]),
                true
            ),
            s(&["base:allocation", "qemu:dirty-bitmap:b"])
        );
        assert!(select_contexts(&avail, &s(&["nonsense"]), false).is_empty());
    }

    #[test]
    fn flags_follow_read_only_and_structured() {
        let rw = transmission_flags(false, false);
        assert_eq!(rw & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(rw & proto::TFLAG_SEND_WRITE_ZEROES, 0);
        assert_ne!(rw & proto::TFLAG_SEND_FAST_ZERO, 0);
        assert_ne!(rw & proto::TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(rw & proto::TFLAG_SEND_DF, 0);
        let ro = transmission_flags(true, true);
        assert_ne!(ro & proto::TFLAG_READ_ONLY, 0);
        assert_eq!(
            ro & (proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES),
            0
        );
        assert_eq!(ro & proto::TFLAG_SEND_FAST_ZERO, 0);
        assert_ne!(ro & proto::TFLAG_SEND_DF, 0);
    }
}
