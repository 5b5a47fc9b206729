//! Server tests over real sockets (127.0.0.1:0 and a Unix socket) with a
//! minimal NBD client written here on top of the codec, and an in-memory
//! device that can be slowed down or made to fail.

use super::export::{Export, ExportError, ExportSource, OpenError, BASE_ALLOCATION};
use super::proto::{self, Chunk, Command, Decode, Errno, Info, ReplyHeader, Request, StatusExtent};
use super::{Server, MAX_PAYLOAD};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DIRTY: &str = "qemu:dirty-bitmap:test";
const SIZE: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// The fake device.

struct MemExport {
    name: String,
    data: Mutex<Vec<u8>>,
    read_only: bool,
    /// Requests at this offset sleep first (to force out-of-order replies).
    slow_offset: u64,
    slow: Duration,
    fail_reads: AtomicBool,
    flushes: AtomicU64,
    /// READs served by `read_at_cached` (on the event loop).
    cached_reads: AtomicU64,
}

impl MemExport {
    fn new(name: &str, read_only: bool) -> Arc<Self> {
        Arc::new(MemExport {
            name: name.into(),
            data: Mutex::new(vec![0; SIZE as usize]),
            read_only,
            slow_offset: 3 * 4096,
            slow: Duration::from_millis(300),
            fail_reads: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            cached_reads: AtomicU64::new(0),
        })
    }

    fn maybe_slow(&self, offset: u64) {
        if offset == self.slow_offset {
            std::thread::sleep(self.slow);
        }
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> Option<String> {
        Some(format!("memory disk {}", self.name))
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        self.maybe_slow(offset);
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(ExportError::new(Errno::Io, "checksum mismatch in block 7"));
        }
        let d = self.data.lock();
        buf.copy_from_slice(&d[Self::range(offset, buf.len() as u64)]);
        Ok(())
    }
    /// Everything but the slow offset (the "disk") is in memory.
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool, ExportError> {
        if offset == self.slow_offset {
            return Ok(false);
        }
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(ExportError::new(Errno::Io, "checksum mismatch in block 7"));
        }
        let d = self.data.lock();
        buf.copy_from_slice(&d[Self::range(offset, buf.len() as u64)]);
        self.cached_reads.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), ExportError> {
        self.maybe_slow(offset);
        self.data.lock()[Self::range(offset, data.len() as u64)].copy_from_slice(data);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        self.data.lock()[Self::range(offset, len)].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, o: u64, l: u64, _nh: bool, _fua: bool) -> Result<(), ExportError> {
        self.data.lock()[Self::range(o, l)].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }
    fn fast_zero(&self, no_hole: bool) -> bool {
        // Lets the tests see both answers.
        !no_hole
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.into(), DIRTY.into()]
    }
    /// base:allocation per 4 KiB block: all-zero → HOLE|ZERO, else data.
    /// The dirty bitmap: everything dirty, in one extent running past the
    /// request (the server must clip it).
    fn block_status(
        &self,
        ctx: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, ExportError> {
        if ctx == DIRTY {
            return Ok(vec![StatusExtent {
                length: u32::MAX,
                flags: 1,
            }]);
        }
        let d = self.data.lock();
        let mut out = Vec::new();
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let next = ((pos / 4096 + 1) * 4096).min(end);
            let zero = d[pos as usize..next as usize].iter().all(|&b| b == 0);
            out.push(StatusExtent {
                length: (next - pos) as u32,
                flags: if zero {
                    proto::STATE_HOLE | proto::STATE_ZERO
                } else {
                    0
                },
            });
            pos = next;
        }
        Ok(out)
    }
}

struct MemSource {
    exports: HashMap<String, Arc<MemExport>>,
}

impl ExportSource for MemSource {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exports.keys().cloned().collect();
        v.sort();
        v
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        match self.exports.get(name) {
            Some(e) => Ok(Arc::clone(e) as Arc<dyn Export>),
            None => Err(OpenError::Unknown(format!("no export {name:?}"))),
        }
    }
}

struct TestServer {
    addr: SocketAddr,
    disk: Arc<MemExport>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn source() -> (Arc<MemSource>, Arc<MemExport>) {
    let disk = MemExport::new("disk", false);
    let mut exports = HashMap::new();
    exports.insert("disk".to_string(), Arc::clone(&disk));
    exports.insert("disk@snap".to_string(), MemExport::new("disk@snap", true));
    (Arc::new(MemSource { exports }), disk)
}

async fn start() -> TestServer {
    let (src, disk) = source();
    let metrics = Arc::new(Metrics::new());
    let server = Arc::new(Server::with_source(src, Arc::clone(&metrics)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve_tcp(listener, rx));
    TestServer {
        addr,
        disk,
        metrics,
        stop,
        task,
    }
}

// ---------------------------------------------------------------------------
// The test client.

/// One finished reply, all chunks of a structured reply gathered.
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    /// (errno, message) of a simple error or an ERROR chunk.
    error: Option<(u32, String)>,
    data: Vec<(u64, Vec<u8>)>,
    status: Vec<(u32, Vec<StatusExtent>)>,
    chunks: Vec<u16>,
    simple: bool,
}

impl Reply {
    fn errno(&self) -> Option<Errno> {
        self.error
            .as_ref()
            .map(|(e, _)| Errno::from_code(*e).unwrap())
    }
}

struct Client<S> {
    s: S,
    structured: bool,
    /// READ lengths by cookie: a simple reply's data length is not on the wire.
    reads: HashMap<u64, u32>,
    partial: HashMap<u64, Reply>,
    next_cookie: u64,
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.unwrap();
    b
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Greeting and client flags.
    async fn hello(mut s: S, no_zeroes: bool) -> Self {
        let g = read_n(&mut s, proto::GREETING_LEN).await;
        let (flags, _) = proto::parse_greeting(&g).unwrap().complete().unwrap();
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        let mut out = Vec::new();
        proto::encode_client_flags(
            &mut out,
            proto::ClientFlags {
                fixed_newstyle: true,
                no_zeroes,
            },
        );
        s.write_all(&out).await.unwrap();
        Client {
            s,
            structured: false,
            reads: HashMap::new(),
            partial: HashMap::new(),
            next_cookie: 1,
        }
    }

    /// Sends an option, returns every reply up to the final one.
    async fn option(&mut self, opt: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        proto::encode_option(&mut out, opt, payload);
        self.s.write_all(&out).await.unwrap();
        let mut replies = Vec::new();
        loop {
            let h = read_n(&mut self.s, proto::OPTION_REPLY_HEADER_LEN).await;
            let (h, _) = proto::parse_option_reply_header(&h)
                .unwrap()
                .complete()
                .unwrap();
            assert_eq!(h.option, opt);
            let p = read_n(&mut self.s, h.length as usize).await;
            let last = h.reply_type == proto::REP_ACK || h.reply_type & (1 << 31) != 0;
            replies.push((h.reply_type, p));
            if last {
                return replies;
            }
        }
    }

    async fn structured_reply(&mut self) {
        let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r, vec![(proto::REP_ACK, vec![])]);
        self.structured = true;
    }

    async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let mut p = Vec::new();
        proto::encode_meta_request(&mut p, export, queries);
        let r = self.option(proto::OPT_SET_META_CONTEXT, &p).await;
        assert_eq!(r.last().unwrap().0, proto::REP_ACK, "{r:?}");
        r[..r.len() - 1]
            .iter()
            .map(|(t, p)| {
                assert_eq!(*t, proto::REP_META_CONTEXT);
                (
                    u32::from_be_bytes(p[..4].try_into().unwrap()),
                    String::from_utf8(p[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// NBD_OPT_GO; returns (size, flags) or the error reply type.
    async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let mut p = Vec::new();
        proto::encode_info_request(&mut p, name, &[proto::INFO_BLOCK_SIZE]);
        let r = self.option(proto::OPT_GO, &p).await;
        let (last, _) = r.last().unwrap();
        if *last != proto::REP_ACK {
            return Err(*last);
        }
        for (t, p) in &r {
            if *t == proto::REP_INFO {
                if let Info::Export { size, flags } = proto::parse_info(p).unwrap() {
                    return Ok((size, flags));
                }
            }
        }
        panic!("GO without NBD_INFO_EXPORT: {r:?}");
    }

    async fn send(
        &mut self,
        flags: u16,
        cmd: Command,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut out = Vec::with_capacity(proto::REQUEST_LEN + data.len());
        proto::encode_request(
            &mut out,
            &Request {
                flags,
                command: cmd,
                cookie,
                offset,
                length,
            },
        );
        out.extend_from_slice(data);
        self.s.write_all(&out).await.unwrap();
        if cmd == Command::Read {
            self.reads.insert(cookie, length);
        }
        cookie
    }

    /// Reads messages until some request's reply is complete.
    async fn reply(&mut self) -> Reply {
        loop {
            let mut magic = read_n(&mut self.s, 4).await;
            let rest = if magic == proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
                proto::SIMPLE_REPLY_LEN
            } else {
                proto::CHUNK_HEADER_LEN
            };
            magic.extend(read_n(&mut self.s, rest - 4).await);
            match proto::parse_reply_header(&magic).unwrap() {
                Decode::Complete {
                    value: ReplyHeader::Simple { error, cookie },
                    ..
                } => {
                    assert!(!self.partial.contains_key(&cookie));
                    let mut r = Reply {
                        cookie,
                        simple: true,
                        ..Reply::default()
                    };
                    let len = self.reads.remove(&cookie);
                    if error != 0 {
                        r.error = Some((error, String::new()));
                    } else if let Some(len) = len {
                        r.data.push((0, read_n(&mut self.s, len as usize).await));
                    }
                    return r;
                }
                Decode::Complete {
                    value:
                        ReplyHeader::Chunk {
                            flags,
                            ty,
                            cookie,
                            length,
                        },
                    ..
                } => {
                    assert!(self.structured, "chunk without structured replies");
                    let payload = read_n(&mut self.s, length as usize).await;
                    let r = self.partial.entry(cookie).or_insert_with(|| Reply {
                        cookie,
                        ..Reply::default()
                    });
                    r.chunks.push(ty);
                    match proto::parse_chunk(ty, &payload).unwrap() {
                        Chunk::None => {}
                        Chunk::OffsetData { offset, data } => r.data.push((offset, data)),
                        Chunk::BlockStatus {
                            context_id,
                            extents,
                        } => r.status.push((context_id, extents)),
                        Chunk::Error { error, message } => r.error = Some((error, message)),
                        other => panic!("unexpected chunk {other:?}"),
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        self.reads.remove(&cookie);
                        return self.partial.remove(&cookie).unwrap();
                    }
                }
                Decode::Incomplete { .. } => unreachable!(),
            }
        }
    }

    async fn call(
        &mut self,
        flags: u16,
        cmd: Command,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Reply {
        let cookie = self.send(flags, cmd, offset, length, data).await;
        let r = self.reply().await;
        assert_eq!(r.cookie, cookie);
        r
    }

    async fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(0, Command::Read, offset, len, &[]).await;
        assert_eq!(r.error, None);
        let mut out = Vec::new();
        for (o, d) in r.data {
            if self.structured {
                assert_eq!(o, offset + out.len() as u64);
            }
            out.extend(d);
        }
        out
    }

    async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b))
            .await
            .expect("server did not close")
            .unwrap_or(0);
        assert_eq!(n, 0, "server sent more data instead of closing");
    }
}

async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client::hello(TcpStream::connect(addr).await.unwrap(), true).await
}

/// Connected to `name`, structured replies and base:allocation on.
async fn attach(addr: SocketAddr, name: &str) -> Client<TcpStream> {
    let mut c = connect(addr).await;
    c.structured_reply().await;
    c.set_meta(name, &[BASE_ALLOCATION]).await;
    c.go(name).await.unwrap();
    c
}

/// Connected to `name` with simple replies only.
async fn attach_simple(addr: SocketAddr, name: &str) -> Client<TcpStream> {
    let mut c = connect(addr).await;
    c.go(name).await.unwrap();
    c
}

// ---------------------------------------------------------------------------
// Handshake.

#[tokio::test]
async fn negotiation_options() {
    let t = start().await;
    let mut c = connect(t.addr).await;

    let list = c.option(proto::OPT_LIST, &[]).await;
    let names: Vec<&[u8]> = list[..list.len() - 1]
        .iter()
        .map(|(_, p)| &p[4..])
        .collect();
    assert_eq!(names, vec![&b"disk"[..], &b"disk@snap"[..]]);
    assert_eq!(list.last().unwrap().0, proto::REP_ACK);
    assert_eq!(
        c.option(proto::OPT_LIST, b"x").await[0].0,
        proto::REP_ERR_INVALID
    );
    // Unknown options, STARTTLS and extended headers: ERR_UNSUP, payload
    // drained, negotiation goes on.
    assert_eq!(
        c.option(0x4242, b"some data").await[0].0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.option(proto::OPT_STARTTLS, &[]).await[0].0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.option(proto::OPT_EXTENDED_HEADERS, &[]).await[0].0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.option(0x4243, &vec![7u8; 3 << 20]).await[0].0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.option(proto::OPT_GO, &[0, 0, 0, 9]).await[0].0,
        proto::REP_ERR_INVALID
    );

    // INFO on an unknown export, then on a known one with every info asked.
    let mut p = Vec::new();
    proto::encode_info_request(&mut p, "nope", &[]);
    let r = c.option(proto::OPT_INFO, &p).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].1).contains("nope"));

    let mut p = Vec::new();
    proto::encode_info_request(
        &mut p,
        "disk@snap",
        &[
            proto::INFO_NAME,
            proto::INFO_DESCRIPTION,
            proto::INFO_BLOCK_SIZE,
            77,
        ],
    );
    let r = c.option(proto::OPT_INFO, &p).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    let infos: Vec<Info> = r[..r.len() - 1]
        .iter()
        .map(|(t, p)| {
            assert_eq!(*t, proto::REP_INFO);
            proto::parse_info(p).unwrap()
        })
        .collect();
    let flags = infos
        .iter()
        .find_map(|i| match i {
            Info::Export { size, flags } => {
                assert_eq!(*size, SIZE);
                Some(*flags)
            }
            _ => None,
        })
        .unwrap();
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(flags & proto::TFLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(
        flags & proto::TFLAG_SEND_DF,
        0,
        "DF needs structured replies"
    );
    assert!(infos.contains(&Info::Name("disk@snap".into())));
    assert!(infos.contains(&Info::Description("memory disk disk@snap".into())));
    assert!(infos.contains(&Info::BlockSize {
        min: 1,
        preferred: 4096,
        max: 32 << 20
    }));

    // Meta contexts need structured replies first.
    let mut p = Vec::new();
    proto::encode_meta_request(&mut p, "disk", &[]);
    assert_eq!(
        c.option(proto::OPT_LIST_META_CONTEXT, &p).await[0].0,
        proto::REP_ERR_INVALID
    );
    c.structured_reply().await;
    let r = c.option(proto::OPT_LIST_META_CONTEXT, &p).await;
    let listed: Vec<&[u8]> = r[..r.len() - 1].iter().map(|(_, p)| &p[4..]).collect();
    assert_eq!(listed, vec![BASE_ALLOCATION.as_bytes(), DIRTY.as_bytes()]);
    let mut p = Vec::new();
    proto::encode_meta_request(&mut p, "disk", &["base:", "unknown:thing"]);
    let r = c.option(proto::OPT_LIST_META_CONTEXT, &p).await;
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
    // SET with a wildcard selects nothing; with names, selects them.
    assert!(c.set_meta("disk", &["base:"]).await.is_empty());
    let sel = c
        .set_meta("disk", &[DIRTY, BASE_ALLOCATION, "x-foo:bar"])
        .await;
    assert_eq!(sel.len(), 2);
    assert_ne!(sel[0].0, sel[1].0);

    let (size, flags) = c.go("disk").await.unwrap();
    assert_eq!(size, SIZE);
    for f in [
        proto::TFLAG_HAS_FLAGS,
        proto::TFLAG_SEND_FLUSH,
        proto::TFLAG_SEND_FUA,
        proto::TFLAG_SEND_TRIM,
        proto::TFLAG_SEND_WRITE_ZEROES,
        proto::TFLAG_SEND_FAST_ZERO,
        proto::TFLAG_SEND_DF,
        proto::TFLAG_CAN_MULTI_CONN,
        proto::TFLAG_SEND_CACHE,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);

    // Two contexts: one BLOCK_STATUS chunk each, the last one DONE.
    c.call(0, Command::Write, 4096, 4096, &[1u8; 4096]).await;
    let r = c.call(0, Command::BlockStatus, 0, 3 * 4096, &[]).await;
    assert_eq!(r.error, None);
    assert_eq!(r.status.len(), 2);
    let ids: Vec<u32> = r.status.iter().map(|(id, _)| *id).collect();
    let want: Vec<u32> = sel.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, want);
    for (id, extents) in &r.status {
        let name = &sel.iter().find(|(i, _)| i == id).unwrap().1;
        if name == DIRTY {
            assert_eq!(
                extents,
                &[StatusExtent {
                    length: 3 * 4096,
                    flags: 1
                }]
            );
        } else {
            assert_eq!(
                extents,
                &[
                    StatusExtent {
                        length: 4096,
                        flags: 3
                    },
                    StatusExtent {
                        length: 4096,
                        flags: 0
                    },
                    StatusExtent {
                        length: 4096,
                        flags: 3
                    },
                ]
            );
        }
    }
}

#[tokio::test]
async fn unknown_client_flags_drop_the_connection() {
    let t = start().await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    read_n(&mut s, proto::GREETING_LEN).await;
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | 1 << 5).to_be_bytes())
        .await
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let t = start().await;
    for no_zeroes in [true, false] {
        let s = TcpStream::connect(t.addr).await.unwrap();
        let mut c = Client::hello(s, no_zeroes).await;
        let mut out = Vec::new();
        proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, b"disk");
        c.s.write_all(&out).await.unwrap();
        let n = if no_zeroes { 10 } else { 134 };
        let b = read_n(&mut c.s, n).await;
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
        assert!(b[10..].iter().all(|&x| x == 0));
        c.call(0, Command::Write, 0, 3, b"abc").await;
        assert_eq!(c.read(0, 3).await, b"abc");
    }
    // EXPORT_NAME cannot fail politely: unknown export → hang up.
    let mut c = connect(t.addr).await;
    let mut out = Vec::new();
    proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, b"missing");
    c.s.write_all(&out).await.unwrap();
    c.expect_closed().await;
}

#[tokio::test]
async fn abort_gets_an_ack() {
    let t = start().await;
    let mut c = connect(t.addr).await;
    assert_eq!(c.option(proto::OPT_ABORT, &[]).await[0].0, proto::REP_ACK);
    c.expect_closed().await;
}

#[tokio::test]
async fn meta_context_for_another_export_does_not_carry_over() {
    let t = start().await;
    let mut c = connect(t.addr).await;
    c.structured_reply().await;
    assert_eq!(c.set_meta("disk@snap", &[BASE_ALLOCATION]).await.len(), 1);
    c.go("disk").await.unwrap();
    let r = c.call(0, Command::BlockStatus, 0, 4096, &[]).await;
    assert_eq!(r.errno(), Some(Errno::Inval));
    assert!(r.error.unwrap().1.contains("metadata context"));
}

// ---------------------------------------------------------------------------
// Transmission.

#[tokio::test]
async fn simple_replies_round_trip() {
    let t = start().await;
    let mut c = attach_simple(t.addr, "disk").await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let r = c
        .call(proto::CMD_FLAG_FUA, Command::Write, 512, 8192, &data)
        .await;
    assert!(r.simple && r.error.is_none());
    assert_eq!(c.read(512, 8192).await, data);
    assert!(c.call(0, Command::Flush, 0, 0, &[]).await.error.is_none());
    assert_eq!(t.disk.flushes.load(Ordering::SeqCst), 1);
    assert!(c
        .call(0, Command::Trim, 512, 100, &[])
        .await
        .error
        .is_none());
    assert!(c
        .call(proto::CMD_FLAG_NO_HOLE, Command::WriteZeroes, 612, 100, &[])
        .await
        .error
        .is_none());
    assert!(c
        .call(0, Command::Cache, 0, 4096, &[])
        .await
        .error
        .is_none());
    let back = c.read(512, 8192).await;
    assert!(back[..200].iter().all(|&b| b == 0));
    assert_eq!(back[200..], data[200..]);
    // Length 0: success, no data, connection stays.
    let r = c.call(0, Command::Read, 0, 0, &[]).await;
    assert!(r.error.is_none() && r.data[0].1.is_empty());
    assert!(c.call(0, Command::Write, 0, 0, &[]).await.error.is_none());
    // FUA on a read is accepted.
    assert!(c
        .call(proto::CMD_FLAG_FUA, Command::Read, 0, 1, &[])
        .await
        .error
        .is_none());
    // Metrics saw the requests.
    let mut text = String::new();
    t.metrics.render(&mut text);
    assert!(
        text.contains("snapgate_nbd_bytes_total{volume=\"disk\",op=\"write\"} 8192"),
        "{text}"
    );
}

#[tokio::test]
async fn structured_replies() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    c.call(0, Command::Write, 8192, 4, b"wxyz").await;
    let r = c
        .call(proto::CMD_FLAG_DF, Command::Read, 8190, 8, &[])
        .await;
    assert_eq!(r.chunks, vec![proto::REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(r.data, vec![(8190, b"\0\0wxyz\0\0".to_vec())]);
    // Zero-length read: a NONE chunk, never a simple reply.
    let r = c.call(0, Command::Read, 0, 0, &[]).await;
    assert!(!r.simple && r.error.is_none());
    assert_eq!(r.chunks, vec![proto::REPLY_TYPE_NONE]);
    // Block status, whole and REQ_ONE.
    let r = c.call(0, Command::BlockStatus, 4096, 3 * 4096, &[]).await;
    assert_eq!(r.status.len(), 1);
    assert_eq!(
        r.status[0].1,
        vec![
            StatusExtent {
                length: 4096,
                flags: 3
            },
            StatusExtent {
                length: 4096,
                flags: 0
            },
            StatusExtent {
                length: 4096,
                flags: 3
            },
        ]
    );
    let r = c
        .call(
            proto::CMD_FLAG_REQ_ONE,
            Command::BlockStatus,
            4096,
            100,
            &[],
        )
        .await;
    assert_eq!(
        r.status[0].1,
        vec![StatusExtent {
            length: 100,
            flags: 3
        }]
    );
    // A failing device: ERROR chunk with the message, for READ too.
    t.disk.fail_reads.store(true, Ordering::SeqCst);
    let r = c.call(0, Command::Read, 0, 512, &[]).await;
    assert_eq!(r.chunks, vec![proto::REPLY_TYPE_ERROR]);
    assert_eq!(r.errno(), Some(Errno::Io));
    assert!(r.error.unwrap().1.contains("checksum mismatch"));
    t.disk.fail_reads.store(false, Ordering::SeqCst);
    // Simple errors become ERROR chunks too.
    let r = c.call(0, Command::Trim, SIZE, 1, &[]).await;
    assert_eq!(r.chunks, vec![proto::REPLY_TYPE_ERROR]);
    assert_eq!(r.errno(), Some(Errno::Inval));
}

#[tokio::test]
async fn every_error_code() {
    use proto::{CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE};
    let t = start().await;
    let mut s = attach_simple(t.addr, "disk").await;
    let mut c = attach(t.addr, "disk").await;
    let mut ro = attach(t.addr, "disk@snap").await;
    let big = MAX_PAYLOAD + 1;

    type Case = (&'static str, u16, Command, u64, u32, Option<Errno>);
    let cases: Vec<Case> = vec![
        (
            "unknown command",
            0,
            Command::Other(42),
            0,
            0,
            Some(Errno::Inval),
        ),
        (
            "unknown flag",
            1 << 9,
            Command::Read,
            0,
            1,
            Some(Errno::Inval),
        ),
        (
            "NO_HOLE on write",
            CMD_FLAG_NO_HOLE,
            Command::Write,
            0,
            1,
            Some(Errno::Inval),
        ),
        (
            "REQ_ONE on read",
            CMD_FLAG_REQ_ONE,
            Command::Read,
            0,
            1,
            Some(Errno::Inval),
        ),
        (
            "read past end",
            0,
            Command::Read,
            SIZE - 1,
            2,
            Some(Errno::Inval),
        ),
        ("read at end", 0, Command::Read, SIZE, 1, Some(Errno::Inval)),
        (
            "read wrapping",
            0,
            Command::Read,
            u64::MAX,
            2,
            Some(Errno::Inval),
        ),
        (
            "write past end",
            0,
            Command::Write,
            SIZE - 1,
            2,
            Some(Errno::NoSpc),
        ),
        (
            "write wrapping",
            0,
            Command::Write,
            u64::MAX - 1,
            4,
            Some(Errno::NoSpc),
        ),
        (
            "zeroes past end",
            0,
            Command::WriteZeroes,
            SIZE,
            1,
            Some(Errno::NoSpc),
        ),
        (
            "trim past end",
            0,
            Command::Trim,
            SIZE,
            4096,
            Some(Errno::Inval),
        ),
        (
            "cache past end",
            0,
            Command::Cache,
            SIZE,
            1,
            Some(Errno::Inval),
        ),
        (
            "status past end",
            0,
            Command::BlockStatus,
            SIZE - 1,
            2,
            Some(Errno::Inval),
        ),
        (
            "read too long",
            0,
            Command::Read,
            0,
            big,
            Some(Errno::Inval),
        ),
        (
            "DF read too long",
            CMD_FLAG_DF,
            Command::Read,
            0,
            big,
            Some(Errno::Overflow),
        ),
        (
            "write too long",
            0,
            Command::Write,
            0,
            big,
            Some(Errno::Inval),
        ),
        (
            "flush with offset",
            0,
            Command::Flush,
            4096,
            0,
            Some(Errno::Inval),
        ),
        (
            "fast zero",
            CMD_FLAG_FAST_ZERO,
            Command::WriteZeroes,
            0,
            4096,
            None,
        ),
        (
            "fast zero no hole",
            CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
            Command::WriteZeroes,
            0,
            4096,
            Some(Errno::NotSup),
        ),
        ("big trim", 0, Command::Trim, 0, SIZE as u32, None),
        ("zero length past end ok", 0, Command::Read, SIZE, 0, None),
    ];
    let mut counted: std::collections::BTreeMap<&str, u64> = Default::default();
    for (what, flags, cmd, off, len, want) in cases {
        let payload = if cmd == Command::Write {
            vec![0xee; len as usize]
        } else {
            vec![]
        };
        let r = c.call(flags, cmd, off, len, &payload).await;
        assert_eq!(r.errno(), want, "structured: {what}");
        if let Some(e) = want {
            assert!(!r.error.unwrap().1.is_empty(), "{what}: no message");
            *counted.entry(e.name()).or_default() += 1;
        }
    }
    // Every error reply is counted, by export and error.
    let mut text = String::new();
    t.metrics.render(&mut text);
    for (errno, n) in counted {
        let line = format!("snapgate_nbd_errors_total{{volume=\"disk\",errno=\"{errno}\"}} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    // Without structured replies: DF is not advertised hence invalid, and
    // BLOCK_STATUS needs structured replies.
    let r = s.call(CMD_FLAG_DF, Command::Read, 0, 1, &[]).await;
    assert_eq!(r.errno(), Some(Errno::Inval));
    assert!(r.simple);
    let r = s.call(0, Command::BlockStatus, 0, 1, &[]).await;
    assert_eq!(r.errno(), Some(Errno::Inval));
    let r = s.call(0, Command::Write, SIZE, 4, b"abcd").await;
    assert_eq!(r.errno(), Some(Errno::NoSpc));
    // Read-only export.
    for cmd in [Command::Write, Command::Trim, Command::WriteZeroes] {
        let payload = if cmd == Command::Write {
            vec![1; 16]
        } else {
            vec![]
        };
        let r = ro.call(0, cmd, 0, 16, &payload).await;
        assert_eq!(r.errno(), Some(Errno::Perm), "{cmd:?}");
    }
    assert!(ro.call(0, Command::Flush, 0, 0, &[]).await.error.is_none());
    assert_eq!(ro.read(0, 4).await, vec![0; 4]);
    // After all that (including 32 MiB + 1 drained), both streams are in sync.
    c.call(0, Command::Write, 100, 3, b"end").await;
    assert_eq!(c.read(100, 3).await, b"end");
    assert_eq!(s.read(100, 3).await, b"end");
}

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    // The request at the slow offset goes first and comes back last.
    let slow = c
        .send(0, Command::Read, t.disk.slow_offset, 4096, &[])
        .await;
    let mut fast = Vec::new();
    for i in 0..100u64 {
        let off = 64 * 4096 + i * 4096;
        fast.push(c.send(0, Command::Write, off, 4096, &[i as u8; 4096]).await);
    }
    let mut order = Vec::new();
    for _ in 0..101 {
        let r = c.reply().await;
        assert_eq!(r.error, None);
        order.push(r.cookie);
    }
    assert_eq!(
        *order.last().unwrap(),
        slow,
        "slow request did not finish last"
    );
    order.pop();
    order.sort();
    assert_eq!(order, fast);
    for i in [0u64, 50, 99] {
        assert_eq!(
            c.read(64 * 4096 + i * 4096, 4096).await,
            vec![i as u8; 4096]
        );
    }
}

#[tokio::test]
async fn reads_from_memory_do_not_wait_behind_one_from_disk() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    c.call(0, Command::Write, 64 * 4096, 4, b"data").await;
    // The read at the slow offset is declined from memory and goes to a
    // blocking thread; the reads behind it are answered first, from memory
    // (the largest one served there too: the whole disk).
    let slow = c
        .send(0, Command::Read, t.disk.slow_offset, 4096, &[])
        .await;
    let mut fast = Vec::new();
    for i in 0..50u64 {
        fast.push(c.send(0, Command::Read, 64 * 4096 + i, 4, &[]).await);
    }
    fast.push(c.send(0, Command::Read, 0, 1 << 20, &[]).await);
    let mut order = Vec::new();
    for _ in 0..52 {
        let r = c.reply().await;
        assert_eq!(r.error, None);
        if r.cookie == fast[0] {
            let bytes: Vec<u8> = r.data.iter().flat_map(|(_, d)| d.clone()).collect();
            assert_eq!(bytes, b"data");
        }
        order.push(r.cookie);
    }
    assert_eq!(
        *order.last().unwrap(),
        slow,
        "the read from disk was not last"
    );
    assert_eq!(t.disk.cached_reads.load(Ordering::SeqCst), 51);
    // The one from disk reads right too.
    t.disk.data.lock()[t.disk.slow_offset as usize] = 7;
    assert_eq!(c.read(t.disk.slow_offset, 1).await, vec![7]);
    assert_eq!(t.disk.cached_reads.load(Ordering::SeqCst), 51);
}

#[tokio::test]
async fn requests_run_concurrently() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    // Ten requests that each sleep 300 ms: far less than 3 s in total if
    // they run side by side.
    let started = std::time::Instant::now();
    for _ in 0..10 {
        c.send(0, Command::Read, t.disk.slow_offset, 512, &[]).await;
    }
    for _ in 0..10 {
        assert_eq!(c.reply().await.error, None);
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn disc_finishes_outstanding_requests() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    let w = c
        .send(0, Command::Write, t.disk.slow_offset, 4, b"last")
        .await;
    c.send(0, Command::Disc, 0, 0, &[]).await;
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error), (w, None));
    c.expect_closed().await;
    assert_eq!(
        &t.disk.data.lock()[t.disk.slow_offset as usize..][..4],
        b"last"
    );
}

#[tokio::test]
async fn vanishing_client_does_not_disturb_others() {
    let t = start().await;
    let mut a = attach(t.addr, "disk").await;
    let mut b = attach(t.addr, "disk").await;
    // A gets one write acknowledged, then dies in the middle of another
    // write's payload and with a slow write in flight.
    assert!(a
        .call(0, Command::Write, 0, 5, b"acked")
        .await
        .error
        .is_none());
    a.send(0, Command::Write, t.disk.slow_offset, 4, b"slow")
        .await;
    let mut partial = Vec::new();
    proto::encode_request(
        &mut partial,
        &Request {
            flags: 0,
            command: Command::Write,
            cookie: 999,
            offset: 4096,
            length: 8192,
        },
    );
    partial.extend_from_slice(&[9u8; 1000]);
    a.s.write_all(&partial).await.unwrap();
    drop(a);
    // B carries on.
    for i in 0..20u8 {
        b.call(
            0,
            Command::Write,
            64 * 4096 + u64::from(i) * 512,
            512,
            &[i; 512],
        )
        .await;
    }
    assert!(b.call(0, Command::Flush, 0, 0, &[]).await.error.is_none());
    assert_eq!(b.read(0, 5).await, b"acked");
    // The half-sent write was never applied.
    assert_eq!(b.read(4096, 1000).await, vec![0u8; 1000]);
    // The in-flight write of the vanished client still completed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.read(t.disk.slow_offset, 4).await, b"slow");
    // And a protocol violation on another connection only ends that one.
    let mut bad = attach(t.addr, "disk").await;
    bad.s.write_all(&[0u8; proto::REQUEST_LEN]).await.unwrap();
    bad.expect_closed().await;
    assert_eq!(b.read(0, 5).await, b"acked");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    let mut idle = connect(t.addr).await;
    let w = c
        .send(0, Command::Write, t.disk.slow_offset, 4, b"kept")
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.stop.send(true).unwrap();
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error), (w, None));
    c.expect_closed().await;
    idle.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(5), t.task)
        .await
        .expect("serve_tcp did not return")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(t.addr).await.is_err());
    assert_eq!(
        &t.disk.data.lock()[t.disk.slow_offset as usize..][..4],
        b"kept"
    );
}

#[tokio::test]
async fn a_request_header_split_around_shutdown_is_answered() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    let mut hdr = Vec::new();
    let req = |cookie| Request {
        flags: 0,
        command: Command::Read,
        cookie,
        offset: 4096,
        length: 512,
    };
    proto::encode_request(&mut hdr, &req(7));
    proto::encode_request(&mut hdr, &req(8));
    c.reads.insert(7, 512);
    c.reads.insert(8, 512);
    // Ten bytes of the first header, shutdown, then the rest.
    assert_eq!(split_around_shutdown(&t, &mut c, &hdr, 10).await, [7, 8]);
}

/// Sends `bytes[..at]`, shuts the server down, sends the rest; expects two
/// ESHUTDOWN replies and the close. Returns their cookies, sorted.
async fn split_around_shutdown(
    t: &TestServer,
    c: &mut Client<TcpStream>,
    bytes: &[u8],
    at: usize,
) -> Vec<u64> {
    c.s.write_all(&bytes[..at]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.s.write_all(&bytes[at..]).await.unwrap();
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let r = c.reply().await;
        assert_eq!(r.errno(), Some(Errno::Shutdown), "{r:?}");
        cookies.push(r.cookie);
    }
    cookies.sort();
    c.expect_closed().await;
    cookies
}

#[tokio::test]
async fn options_during_shutdown_get_err_shutdown() {
    let t = start().await;
    let mut c = connect(t.addr).await;
    assert_eq!(
        c.option(proto::OPT_LIST, &[]).await.last().unwrap().0,
        proto::REP_ACK
    );
    t.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        c.option(proto::OPT_LIST, &[]).await,
        vec![(
            proto::REP_ERR_SHUTDOWN,
            b"the server is shutting down".to_vec()
        )]
    );
    assert_eq!(c.go("disk").await, Err(proto::REP_ERR_SHUTDOWN));
    c.expect_closed().await;
}

#[tokio::test]
async fn a_dropped_shutdown_sender_refuses_options_too() {
    let TestServer { addr, stop, .. } = start().await;
    let mut c = connect(addr).await;
    drop(stop);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.go("disk").await, Err(proto::REP_ERR_SHUTDOWN));
}

#[tokio::test]
async fn a_client_that_never_negotiates_is_disconnected() {
    let (src, _) = source();
    let server = Server::with_source(src, Arc::new(Metrics::new()))
        .with_handshake_timeout(Duration::from_millis(300));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, rx) = watch::channel(false);
    tokio::spawn(Arc::new(server).serve_tcp(listener, rx));
    // Silent after the greeting, and silent after the client flags.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    read_n(&mut silent, proto::GREETING_LEN).await;
    let mut idle = connect(addr).await;
    let started = std::time::Instant::now();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b))
        .await
        .expect("silent client not disconnected")
        .unwrap_or(0);
    assert_eq!(n, 0);
    idle.expect_closed().await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    // A client that gets on with it is served, however long it takes in
    // all: the limit is per step (libnbd's `nbdinfo --list` of many exports
    // spends 0.4 s on each).
    let s = TcpStream::connect(addr).await.unwrap();
    let mut c = Client::hello(s, true).await;
    let slow = std::time::Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let replies = c.option(proto::OPT_LIST, &[]).await;
        assert_eq!(replies.last().map(|r| r.0), Some(proto::REP_ACK));
    }
    assert!(slow.elapsed() >= Duration::from_millis(900));
    c.structured_reply().await;
    c.go("disk").await.unwrap();
    assert_eq!(c.read(0, 4).await.len(), 4);
}

#[tokio::test]
async fn serves_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let (src, _disk) = source();
    let server = Arc::new(Server::with_source(src, Arc::new(Metrics::new())));
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve_unix(listener, rx));
    let s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut c = Client::hello(s, true).await;
    c.structured_reply().await;
    c.go("disk").await.unwrap();
    c.call(0, Command::Write, 10, 4, b"unix").await;
    assert_eq!(c.read(10, 4).await, b"unix");
    drop(stop);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once() {
    let t = start().await;
    let mut tasks = Vec::new();
    for n in 0..8u64 {
        let addr = t.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = attach(addr, "disk").await;
            let base = 128 * 4096 + n * 16 * 4096;
            for i in 0..16u64 {
                c.send(
                    0,
                    Command::Write,
                    base + i * 4096,
                    4096,
                    &[(n * 16 + i) as u8; 4096],
                )
                .await;
            }
            for _ in 0..16 {
                assert_eq!(c.reply().await.error, None);
            }
            assert!(c.call(0, Command::Flush, 0, 0, &[]).await.error.is_none());
            for i in 0..16u64 {
                assert_eq!(
                    c.read(base + i * 4096, 4096).await,
                    vec![(n * 16 + i) as u8; 4096]
                );
            }
            c.send(0, Command::Disc, 0, 0, &[]).await;
            c.expect_closed().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// The real store behind `Server::new`.

struct PoolProvider(Arc<store::Pool>);

impl super::ExportProvider for PoolProvider {
    fn list(&self) -> Vec<String> {
        vec!["v".into(), "v@s".into()]
    }
    fn open(&self, name: &str) -> Result<store::Volume, store::Error> {
        match name.split_once('@') {
            Some((v, s)) => self.0.open_snapshot(v, s),
            None => self.0.open_head(name),
        }
    }
}

#[tokio::test]
async fn serves_store_volumes() {
    let medium: Arc<dyn store::Medium> = Arc::new(store::MemMedium::new());
    let pool = store::Pool::open_medium(medium, store::PoolOptions::default()).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    let provider: Arc<dyn super::ExportProvider> = Arc::new(PoolProvider(Arc::clone(&pool)));
    let server = Arc::new(Server::new(provider, Arc::new(Metrics::new())));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, rx) = watch::channel(false);
    tokio::spawn(server.serve_tcp(listener, rx));

    let mut c = attach(addr, "v").await;
    let data = vec![0x5a; 3 * 4096];
    c.call(proto::CMD_FLAG_FUA, Command::Write, 4096, 3 * 4096, &data)
        .await;
    assert_eq!(c.read(4096, 3 * 4096).await, data);
    // Zeroing data with NO_HOLE leaves allocated zeroes.
    c.call(
        proto::CMD_FLAG_NO_HOLE,
        Command::WriteZeroes,
        3 * 4096,
        4096,
        &[],
    )
    .await;
    let r = c.call(0, Command::BlockStatus, 0, 8 * 4096, &[]).await;
    assert_eq!(
        r.status[0].1,
        vec![
            StatusExtent {
                length: 4096,
                flags: 3
            },
            StatusExtent {
                length: 2 * 4096,
                flags: 0
            },
            StatusExtent {
                length: 4096,
                flags: 2
            },
            StatusExtent {
                length: 4 * 4096,
                flags: 3
            },
        ]
    );
    assert!(c.call(0, Command::Flush, 0, 0, &[]).await.error.is_none());
    pool.create_snapshot("v", "s").unwrap();
    c.call(0, Command::Write, 4096, 4, b"new!").await;

    let mut snap = attach(addr, "v@s").await;
    assert_eq!(snap.read(4096, 4).await, vec![0x5a; 4]);
    let r = snap.call(0, Command::Write, 0, 4, b"nope").await;
    assert_eq!(r.errno(), Some(Errno::Perm));
    let mut missing = connect(addr).await;
    assert_eq!(missing.go("v@nope").await, Err(proto::REP_ERR_UNKNOWN));
    // Shrunk under the connection: past the new end, writes and zeroes get
    // ENOSPC and reads EINVAL, as past the end of any export.
    pool.resize_volume("v", 4 << 20, true).unwrap();
    let past = 6 << 20;
    let r = c.call(0, Command::Write, past, 4, b"gone").await;
    assert_eq!(r.errno(), Some(Errno::NoSpc));
    let r = c.call(0, Command::WriteZeroes, past, 4096, &[]).await;
    assert_eq!(r.errno(), Some(Errno::NoSpc));
    let r = c.call(0, Command::Read, past, 4, &[]).await;
    assert_eq!(r.errno(), Some(Errno::Inval));
}

#[tokio::test]
async fn abort_and_export_name_during_shutdown() {
    let t = start().await;
    let mut a = connect(t.addr).await;
    let mut e = connect(t.addr).await;
    t.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        a.option(proto::OPT_ABORT, &[]).await,
        vec![(proto::REP_ACK, vec![])]
    );
    a.expect_closed().await;
    // EXPORT_NAME has no error reply: the server closes.
    let mut out = Vec::new();
    proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, b"disk");
    e.s.write_all(&out).await.unwrap();
    e.expect_closed().await;
}

/// A WRITE header split around shutdown, its payload and another request
/// after it: both answered ESHUTDOWN, the payload taken off the wire, the
/// stream in sync, nothing written.
#[tokio::test]
async fn a_write_header_split_around_shutdown_keeps_the_stream_in_sync() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    let mut buf = Vec::new();
    let req = |command, cookie, length| Request {
        flags: 0,
        command,
        cookie,
        offset: 0,
        length,
    };
    proto::encode_request(&mut buf, &req(Command::Write, 1, 4096));
    buf.extend_from_slice(&[0x6a; 4096]);
    proto::encode_request(&mut buf, &req(Command::Read, 2, 512));
    c.reads.insert(2, 512);
    assert_eq!(split_around_shutdown(&t, &mut c, &buf, 5).await, [1, 2]);
    assert!(t.disk.data.lock()[..4096].iter().all(|&x| x == 0));
}

#[tokio::test]
async fn half_a_header_then_eof_leaves_the_server_up() {
    let t = start().await;
    let mut c = attach(t.addr, "disk").await;
    c.s.write_all(&proto::REQUEST_MAGIC.to_be_bytes())
        .await
        .unwrap();
    c.s.shutdown().await.unwrap();
    c.expect_closed().await;
    let mut d = attach(t.addr, "disk").await;
    assert_eq!(d.read(0, 4).await.len(), 4);
}
