//! The NBD wire format as a pure codec: bytes in, typed messages out, typed
//! messages in, bytes out. Nothing here does I/O, so every message can be
//! unit-tested and fuzzed on its own (`fuzz/fuzz_targets/codec.rs`).
//!
//! Parsers return `Ok(Decode::Incomplete { needed })` when the buffer holds a
//! prefix of a valid message (`needed` is the total length the message needs
//! so far, so a reader can fill exactly that much), `Ok(Decode::Complete
//! { value, consumed })` when a whole message was read, and `Err` when the
//! bytes can never become a valid message (wrong magic, bad lengths, bad
//! strings). Parsers never panic on any input.
//!
//! Constants and layouts follow the protocol specification (NetworkBlockDevice
//! `doc/proto.md`); note that `NBD_REPLY_TYPE_BLOCK_STATUS` is 5.

use std::fmt;

// ---------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after `NBDMAGIC` in the greeting, and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags.

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands (it advertises both).
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export size).

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Options.

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// NBD_REP_INFO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and command flags.

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Sizes.

/// Bytes of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of the client flags.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Bytes of an option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes before the data in an OFFSET_DATA chunk: header plus offset.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
/// The longest string (name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------
// Error values that may go on the wire.

/// The error values the protocol allows in replies. Anything else a server
/// means must be mapped onto one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The wire value back to an `Errno`, for clients and tests.
    pub fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }
}

impl Errno {
    /// The symbolic name (`EIO`), as in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Decoding framework.

/// The result of feeding a buffer to a parser that did not find it invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decode<T> {
    /// The buffer is a valid prefix; at least `needed` bytes in total are
    /// required before the parser can say more.
    Incomplete { needed: usize },
    /// A whole message: `consumed` bytes from the start of the buffer.
    Complete { value: T, consumed: usize },
}

impl<T> Decode<T> {
    /// The message, if complete.
    pub fn complete(self) -> Option<(T, usize)> {
        match self {
            Decode::Complete { value, consumed } => Some((value, consumed)),
            Decode::Incomplete { .. } => None,
        }
    }
}

/// Bytes that can never become a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("malformed {what}: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("string longer than {MAX_STRING_LEN} bytes")]
    StringTooLong,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains a NUL byte")]
    ContainsNul,
}

fn malformed(what: &'static str, why: &'static str) -> ProtoError {
    ProtoError::Malformed { what, why }
}

/// A bounds-checked big-endian reader over a byte slice. Every getter returns
/// `None` past the end instead of panicking.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|s| s.try_into().ok())
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

/// Checks the protocol's string rules: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong);
    }
    if bytes.contains(&0) {
        return Err(ProtoError::ContainsNul);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProtoError::InvalidUtf8)
}

/// Reads a string of `u32` length followed by its bytes.
fn length_prefixed_string(c: &mut Cursor<'_>, what: &'static str) -> Result<String, ProtoError> {
    let len = c.u32().ok_or_else(|| malformed(what, "truncated length"))?;
    let len = usize::try_from(len).map_err(|_| malformed(what, "length overflows"))?;
    if len > c.remaining() {
        return Err(malformed(what, "length runs past the option data"));
    }
    let bytes = c.bytes(len).ok_or_else(|| malformed(what, "truncated"))?;
    parse_string(bytes)
}

// ---------------------------------------------------------------------------
// Handshake: greeting and client flags.

/// Appends the server greeting of fixed newstyle negotiation.
pub fn encode_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// Parses the server greeting, returning its handshake flags (client side).
pub fn parse_greeting(buf: &[u8]) -> Result<Decode<u16>, ProtoError> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(opt), Some(flags)) = (c.u64(), c.u64(), c.u16()) else {
        return Ok(Decode::Incomplete {
            needed: GREETING_LEN,
        });
    };
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: opt,
        });
    }
    Ok(Decode::Complete {
        value: flags,
        consumed: GREETING_LEN,
    })
}

/// What the client answered to the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client's 32-bit flags. Any bit this server did not advertise
/// is an error: the spec requires dropping the connection.
pub fn parse_client_flags(buf: &[u8]) -> Result<Decode<ClientFlags>, ProtoError> {
    let Some(flags) = Cursor::new(buf).u32() else {
        return Ok(Decode::Incomplete {
            needed: CLIENT_FLAGS_LEN,
        });
    };
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(Decode::Complete {
        value: ClientFlags {
            fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        },
        consumed: CLIENT_FLAGS_LEN,
    })
}

/// Appends client flags (client side).
pub fn encode_client_flags(out: &mut Vec<u8>, flags: ClientFlags) {
    let mut v = 0u32;
    if flags.fixed_newstyle {
        v |= FLAG_C_FIXED_NEWSTYLE;
    }
    if flags.no_zeroes {
        v |= FLAG_C_NO_ZEROES;
    }
    out.extend_from_slice(&v.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Handshake: client options.

/// The fixed part of every client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    /// Bytes of option data that follow the header.
    pub length: u32,
}

/// Parses an option header. The payload is not included: a server decides
/// from `length` whether to read it or drain it.
pub fn parse_option_header(buf: &[u8]) -> Result<Decode<OptionHeader>, ProtoError> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(option), Some(length)) = (c.u64(), c.u32(), c.u32()) else {
        return Ok(Decode::Incomplete {
            needed: OPTION_HEADER_LEN,
        });
    };
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(Decode::Complete {
        value: OptionHeader { option, length },
        consumed: OPTION_HEADER_LEN,
    })
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, unknown ones included (to be ignored).
    pub requests: Vec<u16>,
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A client option with its payload decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any option this server does not implement (answered ERR_UNSUP).
    Unsupported(u32),
}

/// Decodes the payload of option `option`. An `Err` means the option is known
/// but its data is malformed (answered with `NBD_REP_ERR_INVALID`).
pub fn parse_option(option: u32, payload: &[u8]) -> Result<ClientOption, ProtoError> {
    match option {
        OPT_EXPORT_NAME => parse_string(payload).map(ClientOption::ExportName),
        // The spec asks servers to ignore data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_payload(payload, "NBD_OPT_LIST").map(|()| ClientOption::List),
        OPT_STARTTLS => no_payload(payload, "NBD_OPT_STARTTLS").map(|()| ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => {
            no_payload(payload, "NBD_OPT_STRUCTURED_REPLY").map(|()| ClientOption::StructuredReply)
        }
        OPT_INFO => parse_info_request(payload).map(ClientOption::Info),
        OPT_GO => parse_info_request(payload).map(ClientOption::Go),
        OPT_LIST_META_CONTEXT => parse_meta_request(payload).map(ClientOption::ListMetaContext),
        OPT_SET_META_CONTEXT => parse_meta_request(payload).map(ClientOption::SetMetaContext),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn no_payload(payload: &[u8], what: &'static str) -> Result<(), ProtoError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(malformed(what, "option takes no data"))
    }
}

fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, ProtoError> {
    const WHAT: &str = "NBD_OPT_INFO/GO";
    let mut c = Cursor::new(payload);
    let name = length_prefixed_string(&mut c, WHAT)?;
    let n = c
        .u16()
        .ok_or_else(|| malformed(WHAT, "missing number of information requests"))?;
    if c.remaining() != usize::from(n) * 2 {
        return Err(malformed(
            WHAT,
            "number of information requests does not match the option length",
        ));
    }
    let mut requests = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        requests.push(c.u16().ok_or_else(|| malformed(WHAT, "truncated"))?);
    }
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(payload: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    const WHAT: &str = "NBD_OPT_*_META_CONTEXT";
    let mut c = Cursor::new(payload);
    let export = length_prefixed_string(&mut c, WHAT)?;
    let n = c
        .u32()
        .ok_or_else(|| malformed(WHAT, "missing number of queries"))?;
    // Each query takes at least its 4-byte length: a count that cannot fit is
    // rejected before anything is allocated for it.
    if u64::from(n) * 4 > c.remaining() as u64 {
        return Err(malformed(WHAT, "more queries than the option data holds"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(length_prefixed_string(&mut c, WHAT)?);
    }
    if c.remaining() != 0 {
        return Err(malformed(WHAT, "trailing bytes after the last query"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Parses a whole option (header and payload) from `buf`: what a client sent,
/// as one call. The inner `Result` is the payload's verdict, so a malformed
/// payload of a well-framed option still reports how many bytes it used.
#[allow(clippy::type_complexity)]
pub fn parse_option_message(
    buf: &[u8],
) -> Result<Decode<(u32, Result<ClientOption, ProtoError>)>, ProtoError> {
    let (hdr, _) = match parse_option_header(buf)? {
        Decode::Complete { value, consumed } => (value, consumed),
        Decode::Incomplete { needed } => return Ok(Decode::Incomplete { needed }),
    };
    let total = OPTION_HEADER_LEN as u64 + u64::from(hdr.length);
    let Ok(total) = usize::try_from(total) else {
        return Err(malformed("option", "length does not fit in memory"));
    };
    let Some(payload) = buf.get(OPTION_HEADER_LEN..total) else {
        return Ok(Decode::Incomplete { needed: total });
    };
    Ok(Decode::Complete {
        value: (hdr.option, parse_option(hdr.option, payload)),
        consumed: total,
    })
}

/// Appends an option with its raw payload (client side).
pub fn encode_option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO (client side).
pub fn encode_info_request(out: &mut Vec<u8>, name: &str, requests: &[u16]) {
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for r in requests.iter().take(u16::MAX as usize) {
        out.extend_from_slice(&r.to_be_bytes());
    }
}

/// Payload of NBD_OPT_{LIST,SET}_META_CONTEXT (client side).
pub fn encode_meta_request(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    out.extend_from_slice(&len_u32(export.len()).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&len_u32(queries.len()).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&len_u32(q.len()).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Handshake: option replies.

/// Appends an option reply with an arbitrary payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// NBD_REP_ACK.
pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// An error reply (`NBD_REP_ERR_*`) with a human-readable message.
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error, truncate_str(message).as_bytes());
}

/// NBD_REP_SERVER: one export name for NBD_OPT_LIST.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_SERVER, &p);
}

/// NBD_REP_INFO with NBD_INFO_EXPORT.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
}

/// NBD_REP_INFO with NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let text = truncate_str(text);
    let mut p = Vec::with_capacity(2 + text.len());
    p.extend_from_slice(&info.to_be_bytes());
    p.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
}

/// NBD_REP_INFO with NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut p = Vec::with_capacity(14);
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p.extend_from_slice(&min.to_be_bytes());
    p.extend_from_slice(&preferred.to_be_bytes());
    p.extend_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
}

/// NBD_REP_META_CONTEXT.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &p);
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless
/// the client negotiated NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// The fixed part of an option reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

/// Parses an option reply header (client side).
pub fn parse_option_reply_header(buf: &[u8]) -> Result<Decode<OptionReplyHeader>, ProtoError> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(option), Some(reply_type), Some(length)) =
        (c.u64(), c.u32(), c.u32(), c.u32())
    else {
        return Ok(Decode::Incomplete {
            needed: OPTION_REPLY_HEADER_LEN,
        });
    };
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(Decode::Complete {
        value: OptionReplyHeader {
            option,
            reply_type,
            length,
        },
        consumed: OPTION_REPLY_HEADER_LEN,
    })
}

/// A decoded NBD_REP_INFO payload (client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown(u16),
}

/// Decodes an NBD_REP_INFO payload (client side).
pub fn parse_info(payload: &[u8]) -> Result<Info, ProtoError> {
    const WHAT: &str = "NBD_REP_INFO";
    let mut c = Cursor::new(payload);
    let ty = c.u16().ok_or_else(|| malformed(WHAT, "missing type"))?;
    let info = match ty {
        INFO_EXPORT => {
            let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
                return Err(malformed(WHAT, "NBD_INFO_EXPORT too short"));
            };
            Info::Export { size, flags }
        }
        INFO_NAME => return parse_string(c.rest()).map(Info::Name),
        INFO_DESCRIPTION => return parse_string(c.rest()).map(Info::Description),
        INFO_BLOCK_SIZE => {
            let (Some(min), Some(preferred), Some(max)) = (c.u32(), c.u32(), c.u32()) else {
                return Err(malformed(WHAT, "NBD_INFO_BLOCK_SIZE too short"));
            };
            Info::BlockSize {
                min,
                preferred,
                max,
            }
        }
        other => return Ok(Info::Unknown(other)),
    };
    if c.remaining() != 0 {
        return Err(malformed(WHAT, "trailing bytes"));
    }
    Ok(info)
}

// ---------------------------------------------------------------------------
// Transmission: requests.

/// A transmission command, decoded from the 16-bit type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type this server does not implement (answered EINVAL).
    Other(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Other(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Other(v) => v,
        }
    }
}

/// A request header. For WRITE, `length` bytes of payload follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes of data that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Parses a request header. A wrong magic means the stream is out of sync
/// and the connection cannot continue.
pub fn parse_request(buf: &[u8]) -> Result<Decode<Request>, ProtoError> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(flags), Some(ty), Some(cookie), Some(offset), Some(length)) =
        (c.u32(), c.u16(), c.u16(), c.u64(), c.u64(), c.u32())
    else {
        return Ok(Decode::Incomplete {
            needed: REQUEST_LEN,
        });
    };
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Decode::Complete {
        value: Request {
            flags,
            command: Command::from_u16(ty),
            cookie,
            offset,
            length,
        },
        consumed: REQUEST_LEN,
    })
}

/// Appends a request header (client side); a WRITE's payload goes after it.
pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_u16().to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    out.extend_from_slice(&req.length.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Transmission: replies.

/// Appends a simple reply header; a successful READ's data goes after it.
/// `error` is 0 for success.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header announcing `length` payload bytes.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Writes the header of an OFFSET_DATA chunk carrying `data_len` bytes into
/// exactly `OFFSET_DATA_HEADER_LEN` bytes of `out`, so a server can read the
/// data straight into the same buffer behind it. Returns `None` if
/// `data_len` does not fit a chunk or `out` has the wrong length.
pub fn put_offset_data_header(
    out: &mut [u8],
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: usize,
) -> Option<()> {
    let length = u32::try_from(data_len.checked_add(8)?).ok()?;
    let dst: &mut [u8; OFFSET_DATA_HEADER_LEN] = out.try_into().ok()?;
    let mut v = Vec::with_capacity(OFFSET_DATA_HEADER_LEN);
    encode_chunk_header(&mut v, flags, REPLY_TYPE_OFFSET_DATA, cookie, length);
    v.extend_from_slice(&offset.to_be_bytes());
    dst.copy_from_slice(&v);
    Some(())
}

/// Appends a whole OFFSET_DATA chunk. `data` must be non-empty and shorter
/// than 4 GiB - 8; returns `None` (appending nothing) otherwise.
pub fn encode_offset_data(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> Option<()> {
    if data.is_empty() {
        return None;
    }
    let start = out.len();
    out.resize(start + OFFSET_DATA_HEADER_LEN, 0);
    if put_offset_data_header(&mut out[start..], flags, cookie, offset, data.len()).is_none() {
        out.truncate(start);
        return None;
    }
    out.extend_from_slice(data);
    Some(())
}

/// Appends an OFFSET_HOLE chunk: `hole_len` (non-zero) bytes of zeroes.
pub fn encode_offset_hole(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, hole_len: u32) {
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    pub flags: u32,
}

/// Appends a BLOCK_STATUS chunk for one metadata context.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context_id: u32,
    extents: &[StatusExtent],
) {
    let length = 4u64 + 8 * extents.len() as u64;
    encode_chunk_header(
        out,
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        u32::try_from(length).unwrap_or(u32::MAX),
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

/// Appends the NONE chunk that ends a structured reply successfully.
pub fn encode_none(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Appends an ERROR chunk with a message (cut to the 4096-byte limit).
pub fn encode_error_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, error: Errno, msg: &str) {
    let msg = truncate_str(msg);
    encode_chunk_header(out, flags, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an ERROR_OFFSET chunk: an error at `offset` within the request.
pub fn encode_error_offset_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    error: Errno,
    msg: &str,
    offset: u64,
) {
    let msg = truncate_str(msg);
    encode_chunk_header(
        out,
        flags,
        REPLY_TYPE_ERROR_OFFSET,
        cookie,
        14 + msg.len() as u32,
    );
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Cuts a string to the protocol's limit without splitting a character.
fn truncate_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The header of any transmission reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// 16 bytes; a successful READ's data follows, length known only to the
    /// requester.
    Simple { error: u32, cookie: u64 },
    /// 20 bytes; `length` payload bytes follow.
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        length: u32,
    },
}

/// Parses a simple reply or structured chunk header (client side).
pub fn parse_reply_header(buf: &[u8]) -> Result<Decode<ReplyHeader>, ProtoError> {
    let mut c = Cursor::new(buf);
    let Some(magic) = c.u32() else {
        return Ok(Decode::Incomplete { needed: 4 });
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let (Some(error), Some(cookie)) = (c.u32(), c.u64()) else {
                return Ok(Decode::Incomplete {
                    needed: SIMPLE_REPLY_LEN,
                });
            };
            Ok(Decode::Complete {
                value: ReplyHeader::Simple { error, cookie },
                consumed: SIMPLE_REPLY_LEN,
            })
        }
        STRUCTURED_REPLY_MAGIC => {
            let (Some(flags), Some(ty), Some(cookie), Some(length)) =
                (c.u16(), c.u16(), c.u64(), c.u32())
            else {
                return Ok(Decode::Incomplete {
                    needed: CHUNK_HEADER_LEN,
                });
            };
            Ok(Decode::Complete {
                value: ReplyHeader::Chunk {
                    flags,
                    ty,
                    cookie,
                    length,
                },
                consumed: CHUNK_HEADER_LEN,
            })
        }
        other => Err(ProtoError::BadMagic {
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            found: u64::from(other),
        }),
    }
}

/// A decoded structured chunk payload (client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<StatusExtent>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// A type this codec does not know; the raw payload.
    Unknown {
        ty: u16,
        payload: Vec<u8>,
    },
}

/// Decodes a chunk payload of type `ty` (client side), checking the length
/// rules of each type.
pub fn parse_chunk(ty: u16, payload: &[u8]) -> Result<Chunk, ProtoError> {
    const WHAT: &str = "structured reply chunk";
    let mut c = Cursor::new(payload);
    let chunk = match ty {
        REPLY_TYPE_NONE => Chunk::None,
        REPLY_TYPE_OFFSET_DATA => {
            let offset = c
                .u64()
                .ok_or_else(|| malformed(WHAT, "OFFSET_DATA too short"))?;
            let data = c.rest();
            if data.is_empty() {
                return Err(malformed(WHAT, "OFFSET_DATA without data"));
            }
            Chunk::OffsetData {
                offset,
                data: data.to_vec(),
            }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let (Some(offset), Some(length)) = (c.u64(), c.u32()) else {
                return Err(malformed(WHAT, "OFFSET_HOLE too short"));
            };
            if length == 0 {
                return Err(malformed(WHAT, "empty OFFSET_HOLE"));
            }
            Chunk::OffsetHole { offset, length }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let context_id = c
                .u32()
                .ok_or_else(|| malformed(WHAT, "BLOCK_STATUS too short"))?;
            if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                return Err(malformed(WHAT, "BLOCK_STATUS length not 4 + 8n, n > 0"));
            }
            let mut extents = Vec::with_capacity(c.remaining() / 8);
            while let (Some(length), Some(flags)) = (c.u32(), c.u32()) {
                extents.push(StatusExtent { length, flags });
            }
            Chunk::BlockStatus {
                context_id,
                extents,
            }
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let (Some(error), Some(len)) = (c.u32(), c.u16()) else {
                return Err(malformed(WHAT, "error chunk too short"));
            };
            let msg = c
                .bytes(usize::from(len))
                .ok_or_else(|| malformed(WHAT, "error message runs past the chunk"))?;
            let message = parse_string(msg)?;
            if ty == REPLY_TYPE_ERROR {
                Chunk::Error { error, message }
            } else {
                let offset = c
                    .u64()
                    .ok_or_else(|| malformed(WHAT, "ERROR_OFFSET without offset"))?;
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }
        }
        other => {
            return Ok(Chunk::Unknown {
                ty: other,
                payload: payload.to_vec(),
            })
        }
    };
    if c.remaining() != 0 {
        return Err(malformed(WHAT, "trailing bytes"));
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every strict prefix of a message must be Incomplete, never an error.
    fn check_prefixes<T: fmt::Debug>(
        bytes: &[u8],
        parse: impl Fn(&[u8]) -> Result<Decode<T>, ProtoError>,
    ) {
        for n in 0..bytes.len() {
            match parse(&bytes[..n]) {
                Ok(Decode::Incomplete { needed }) => assert!(needed > n, "needed {needed} at {n}"),
                other => panic!("prefix of {n} bytes gave {other:?}"),
            }
        }
    }

    #[test]
    fn greeting_round_trip_and_bad_magic() {
        let mut out = Vec::new();
        encode_greeting(&mut out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(out.len(), GREETING_LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        check_prefixes(&out, parse_greeting);
        assert_eq!(
            parse_greeting(&out).unwrap(),
            Decode::Complete {
                value: 3,
                consumed: 18
            }
        );
        out[0] ^= 1;
        assert!(matches!(
            parse_greeting(&out),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn client_flags_known_and_unknown() {
        let mut out = Vec::new();
        encode_client_flags(
            &mut out,
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true,
            },
        );
        check_prefixes(&out, parse_client_flags);
        let (f, n) = parse_client_flags(&out).unwrap().complete().unwrap();
        assert_eq!(n, 4);
        assert!(f.fixed_newstyle && f.no_zeroes);
        let (f, _) = parse_client_flags(&0u32.to_be_bytes())
            .unwrap()
            .complete()
            .unwrap();
        assert!(!f.fixed_newstyle && !f.no_zeroes);
        assert_eq!(
            parse_client_flags(&4u32.to_be_bytes()),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert!(parse_client_flags(&0x8000_0001u32.to_be_bytes()).is_err());
    }

    fn option_bytes(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_option(&mut out, option, payload);
        out
    }

    fn parse_whole(bytes: &[u8]) -> Result<ClientOption, ProtoError> {
        check_prefixes(bytes, parse_option_message);
        let ((_, opt), consumed) = parse_option_message(bytes).unwrap().complete().unwrap();
        assert_eq!(consumed, bytes.len());
        opt
    }

    #[test]
    fn option_header_and_bad_magic() {
        let bytes = option_bytes(OPT_GO, &[1, 2, 3]);
        check_prefixes(&bytes[..16], parse_option_header);
        assert_eq!(
            parse_option_header(&bytes).unwrap(),
            Decode::Complete {
                value: OptionHeader {
                    option: OPT_GO,
                    length: 3
                },
                consumed: 16
            }
        );
        let mut bad = bytes.clone();
        bad[7] = 0;
        assert!(parse_option_header(&bad).is_err());
        assert!(parse_option_message(&bad).is_err());
        // A huge announced length is just "incomplete", not a panic.
        let mut huge = Vec::new();
        huge.extend_from_slice(&IHAVEOPT.to_be_bytes());
        huge.extend_from_slice(&OPT_LIST.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option_message(&huge).unwrap(),
            Decode::Incomplete {
                needed: 16 + u32::MAX as usize
            }
        );
    }

    #[test]
    fn export_name_option() {
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXPORT_NAME, b"vol@snap")),
            Ok(ClientOption::ExportName("vol@snap".into()))
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXPORT_NAME, b"")),
            Ok(ClientOption::ExportName(String::new()))
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXPORT_NAME, b"a\0b")),
            Err(ProtoError::ContainsNul)
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXPORT_NAME, &[0xff, 0xfe])),
            Err(ProtoError::InvalidUtf8)
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXPORT_NAME, &[b'a'; 4097])),
            Err(ProtoError::StringTooLong)
        );
    }

    #[test]
    fn payloadless_options() {
        assert_eq!(
            parse_whole(&option_bytes(OPT_ABORT, b"")),
            Ok(ClientOption::Abort)
        );
        // Data sent with ABORT is ignored, per the spec.
        assert_eq!(
            parse_whole(&option_bytes(OPT_ABORT, b"xx")),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_LIST, b"")),
            Ok(ClientOption::List)
        );
        assert!(parse_whole(&option_bytes(OPT_LIST, b"x")).is_err());
        assert_eq!(
            parse_whole(&option_bytes(OPT_STRUCTURED_REPLY, b"")),
            Ok(ClientOption::StructuredReply)
        );
        assert!(parse_whole(&option_bytes(OPT_STRUCTURED_REPLY, b"x")).is_err());
        assert_eq!(
            parse_whole(&option_bytes(OPT_STARTTLS, b"")),
            Ok(ClientOption::StartTls)
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_EXTENDED_HEADERS, b"")),
            Ok(ClientOption::Unsupported(OPT_EXTENDED_HEADERS))
        );
        assert_eq!(
            parse_whole(&option_bytes(0xdead, b"anything")),
            Ok(ClientOption::Unsupported(0xdead))
        );
    }

    #[test]
    fn info_and_go_options() {
        let mut p = Vec::new();
        encode_info_request(&mut p, "disk", &[INFO_NAME, INFO_BLOCK_SIZE, 999]);
        let want = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_NAME, INFO_BLOCK_SIZE, 999],
        };
        assert_eq!(
            parse_whole(&option_bytes(OPT_GO, &p)),
            Ok(ClientOption::Go(want.clone()))
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_INFO, &p)),
            Ok(ClientOption::Info(want))
        );
        // Count disagreeing with the length, name running past the end,
        // missing count: all invalid.
        assert!(parse_option(OPT_GO, &p[..p.len() - 1]).is_err());
        let mut extra = p.clone();
        extra.push(0);
        assert!(parse_option(OPT_GO, &extra).is_err());
        assert!(parse_option(OPT_GO, &[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_option(OPT_GO, &[0, 0, 0, 0]).is_err());
        assert!(parse_option(OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        let mut empty = Vec::new();
        encode_info_request(&mut empty, "", &[]);
        assert_eq!(
            parse_option(OPT_GO, &empty),
            Ok(ClientOption::Go(InfoRequest {
                name: String::new(),
                requests: vec![]
            }))
        );
    }

    #[test]
    fn meta_context_options() {
        let mut p = Vec::new();
        encode_meta_request(&mut p, "vol", &["base:allocation", "qemu:dirty-bitmap:b0"]);
        let want = MetaContextRequest {
            export: "vol".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
        };
        assert_eq!(
            parse_whole(&option_bytes(OPT_SET_META_CONTEXT, &p)),
            Ok(ClientOption::SetMetaContext(want.clone()))
        );
        assert_eq!(
            parse_whole(&option_bytes(OPT_LIST_META_CONTEXT, &p)),
            Ok(ClientOption::ListMetaContext(want))
        );
        let mut none = Vec::new();
        encode_meta_request(&mut none, "vol", &[]);
        assert_eq!(
            parse_option(OPT_LIST_META_CONTEXT, &none),
            Ok(ClientOption::ListMetaContext(MetaContextRequest {
                export: "vol".into(),
                queries: vec![]
            }))
        );
        assert!(parse_option(OPT_SET_META_CONTEXT, &p[..p.len() - 1]).is_err());
        let mut trailing = p.clone();
        trailing.push(7);
        assert!(parse_option(OPT_SET_META_CONTEXT, &trailing).is_err());
        // An absurd query count is rejected without allocating for it.
        let mut absurd = Vec::new();
        absurd.extend_from_slice(&0u32.to_be_bytes());
        absurd.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_SET_META_CONTEXT, &absurd).is_err());
    }

    fn reply_parts(bytes: &[u8]) -> (OptionReplyHeader, &[u8]) {
        check_prefixes(&bytes[..OPTION_REPLY_HEADER_LEN], parse_option_reply_header);
        let (h, n) = parse_option_reply_header(bytes)
            .unwrap()
            .complete()
            .unwrap();
        assert_eq!(bytes.len(), n + h.length as usize);
        (h, &bytes[n..])
    }

    #[test]
    fn option_replies_round_trip() {
        let mut out = Vec::new();
        encode_rep_ack(&mut out, OPT_STRUCTURED_REPLY);
        let (h, p) = reply_parts(&out);
        assert_eq!(
            (h.option, h.reply_type, p.len()),
            (OPT_STRUCTURED_REPLY, REP_ACK, 0)
        );
        assert_eq!(&out[..8], &OPTION_REPLY_MAGIC.to_be_bytes());

        out.clear();
        encode_rep_error(&mut out, 42, REP_ERR_UNSUP, "no");
        let (h, p) = reply_parts(&out);
        assert_eq!((h.option, h.reply_type, p), (42, REP_ERR_UNSUP, &b"no"[..]));
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);

        out.clear();
        encode_rep_server(&mut out, OPT_LIST, "vol");
        let (h, p) = reply_parts(&out);
        assert_eq!(h.reply_type, REP_SERVER);
        assert_eq!(p, &[0, 0, 0, 3, b'v', b'o', b'l']);

        out.clear();
        encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 7, "base:allocation");
        let (h, p) = reply_parts(&out);
        assert_eq!(h.reply_type, REP_META_CONTEXT);
        assert_eq!(&p[..4], &7u32.to_be_bytes());
        assert_eq!(&p[4..], b"base:allocation");
    }

    #[test]
    fn info_replies_round_trip() {
        let mut out = Vec::new();
        encode_info_export(&mut out, OPT_GO, 1 << 40, 0x1234);
        let (h, p) = reply_parts(&out);
        assert_eq!((h.reply_type, h.length), (REP_INFO, 12));
        assert_eq!(
            parse_info(p),
            Ok(Info::Export {
                size: 1 << 40,
                flags: 0x1234
            })
        );

        out.clear();
        encode_info_block_size(&mut out, OPT_GO, 1, 4096, 32 << 20);
        let (h, p) = reply_parts(&out);
        assert_eq!(h.length, 14);
        assert_eq!(
            parse_info(p),
            Ok(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            })
        );

        out.clear();
        encode_info_string(&mut out, OPT_INFO, INFO_NAME, "vol@s1");
        assert_eq!(
            parse_info(reply_parts(&out).1),
            Ok(Info::Name("vol@s1".into()))
        );
        out.clear();
        encode_info_string(&mut out, OPT_INFO, INFO_DESCRIPTION, "a volume");
        assert_eq!(
            parse_info(reply_parts(&out).1),
            Ok(Info::Description("a volume".into()))
        );
        assert_eq!(parse_info(&[0, 77, 1]), Ok(Info::Unknown(77)));
        assert!(parse_info(&[0, 0, 1]).is_err());
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 4096, TFLAG_HAS_FLAGS, false);
        assert_eq!(out.len(), 8 + 2 + 124);
        assert!(out[10..].iter().all(|&b| b == 0));
        out.clear();
        encode_export_name_reply(&mut out, 4096, TFLAG_HAS_FLAGS, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]);
    }

    #[test]
    fn request_round_trip_every_command() {
        for ty in 0..=9u16 {
            let req = Request {
                flags: CMD_FLAG_FUA | CMD_FLAG_DF,
                command: Command::from_u16(ty),
                cookie: 0x0102_0304_0506_0708,
                offset: u64::MAX - 1,
                length: 0xdead_beef,
            };
            let mut out = Vec::new();
            encode_request(&mut out, &req);
            assert_eq!(out.len(), REQUEST_LEN);
            assert_eq!(&out[..4], &[0x25, 0x60, 0x95, 0x13]);
            check_prefixes(&out, parse_request);
            assert_eq!(
                parse_request(&out).unwrap(),
                Decode::Complete {
                    value: req,
                    consumed: REQUEST_LEN
                }
            );
            assert_eq!(req.command.to_u16(), ty);
            let want_payload = if ty == CMD_WRITE { 0xdead_beef } else { 0 };
            assert_eq!(req.payload_len(), want_payload);
        }
        assert_eq!(Command::from_u16(8), Command::Other(8));
        let mut bad = vec![0u8; REQUEST_LEN];
        bad[0] = 0x25;
        assert!(matches!(
            parse_request(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        // Trailing bytes belong to the next message.
        let mut two = Vec::new();
        let r = Request {
            flags: 0,
            command: Command::Flush,
            cookie: 1,
            offset: 0,
            length: 0,
        };
        encode_request(&mut two, &r);
        encode_request(&mut two, &r);
        assert_eq!(parse_request(&two).unwrap().complete().unwrap().1, 28);
    }

    fn chunk(bytes: &[u8]) -> (u16, u16, u64, Chunk) {
        check_prefixes(&bytes[..CHUNK_HEADER_LEN], parse_reply_header);
        let (h, n) = parse_reply_header(bytes).unwrap().complete().unwrap();
        let ReplyHeader::Chunk {
            flags,
            ty,
            cookie,
            length,
        } = h
        else {
            panic!("not a chunk: {h:?}")
        };
        assert_eq!(bytes.len(), n + length as usize);
        (flags, ty, cookie, parse_chunk(ty, &bytes[n..]).unwrap())
    }

    #[test]
    fn simple_reply_round_trip() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 99, Errno::NoSpc.code());
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        check_prefixes(&out, parse_reply_header);
        assert_eq!(
            parse_reply_header(&out).unwrap(),
            Decode::Complete {
                value: ReplyHeader::Simple {
                    error: 28,
                    cookie: 99
                },
                consumed: 16
            }
        );
        assert!(parse_reply_header(&[1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn structured_chunks_round_trip() {
        let mut out = Vec::new();
        encode_none(&mut out, 5);
        assert_eq!(chunk(&out), (REPLY_FLAG_DONE, 0, 5, Chunk::None));

        out.clear();
        encode_offset_data(&mut out, REPLY_FLAG_DONE, 6, 4096, b"hello").unwrap();
        assert_eq!(
            chunk(&out),
            (
                REPLY_FLAG_DONE,
                1,
                6,
                Chunk::OffsetData {
                    offset: 4096,
                    data: b"hello".to_vec()
                }
            )
        );
        assert!(encode_offset_data(&mut Vec::new(), 0, 6, 0, b"").is_none());

        // The in-place header matches the appending encoder.
        let mut inplace = vec![0u8; OFFSET_DATA_HEADER_LEN + 5];
        put_offset_data_header(
            &mut inplace[..OFFSET_DATA_HEADER_LEN],
            REPLY_FLAG_DONE,
            6,
            4096,
            5,
        )
        .unwrap();
        inplace[OFFSET_DATA_HEADER_LEN..].copy_from_slice(b"hello");
        assert_eq!(inplace, out);
        assert!(put_offset_data_header(&mut [0u8; 27], 0, 0, 0, 1).is_none());
        assert!(put_offset_data_header(&mut [0u8; 28], 0, 0, 0, usize::MAX).is_none());

        out.clear();
        encode_offset_hole(&mut out, 0, 7, 512, 1024);
        assert_eq!(
            chunk(&out),
            (
                0,
                2,
                7,
                Chunk::OffsetHole {
                    offset: 512,
                    length: 1024
                }
            )
        );

        out.clear();
        let extents = [
            StatusExtent {
                length: 4096,
                flags: 0,
            },
            StatusExtent {
                length: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        encode_block_status(&mut out, REPLY_FLAG_DONE, 8, 1, &extents);
        assert_eq!(out[6..8], [0, 5], "BLOCK_STATUS is type 5");
        assert_eq!(
            chunk(&out),
            (
                REPLY_FLAG_DONE,
                5,
                8,
                Chunk::BlockStatus {
                    context_id: 1,
                    extents: extents.to_vec()
                }
            )
        );

        out.clear();
        encode_error_chunk(&mut out, REPLY_FLAG_DONE, 9, Errno::Inval, "bad");
        assert_eq!(out[6..8], [0x80, 0x01]);
        assert_eq!(
            chunk(&out),
            (
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                9,
                Chunk::Error {
                    error: 22,
                    message: "bad".into()
                }
            )
        );

        out.clear();
        encode_error_offset_chunk(&mut out, 0, 10, Errno::Io, "oops", 1 << 33);
        assert_eq!(out[6..8], [0x80, 0x02]);
        assert_eq!(
            chunk(&out),
            (
                0,
                REPLY_TYPE_ERROR_OFFSET,
                10,
                Chunk::ErrorOffset {
                    error: 5,
                    message: "oops".into(),
                    offset: 1 << 33
                }
            )
        );
    }

    #[test]
    fn long_error_messages_are_cut_at_a_char_boundary() {
        let msg = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        encode_error_chunk(&mut out, REPLY_FLAG_DONE, 1, Errno::Io, &msg);
        let (_, _, _, c) = chunk(&out);
        let Chunk::Error { message, .. } = c else {
            panic!()
        };
        assert_eq!(message.len(), 4096);
        assert!(message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        assert!(parse_chunk(REPLY_TYPE_NONE, &[1]).is_err());
        assert!(parse_chunk(REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        assert!(parse_chunk(REPLY_TYPE_OFFSET_HOLE, &[0; 12]).is_err());
        assert!(parse_chunk(REPLY_TYPE_BLOCK_STATUS, &[0; 4]).is_err());
        assert!(parse_chunk(REPLY_TYPE_BLOCK_STATUS, &[0; 13]).is_err());
        assert!(parse_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        assert!(parse_chunk(REPLY_TYPE_ERROR_OFFSET, &[0, 0, 0, 5, 0, 0]).is_err());
        assert!(matches!(
            parse_chunk(77, &[1, 2]),
            Ok(Chunk::Unknown { ty: 77, .. })
        ));
    }

    #[test]
    fn errno_values_are_the_wire_values() {
        let all = [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ];
        for (e, v) in all {
            assert_eq!(e.code(), v);
            assert_eq!(Errno::from_code(v), Some(e));
        }
        assert_eq!(Errno::from_code(2), None);
    }

    /// A cheap deterministic fuzz pass: the parsers never panic, and what
    /// they accept they account for within the buffer.
    #[test]
    fn parsers_survive_random_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often start with a valid magic so the parsers get past it.
            match next() % 4 {
                0 if buf.len() >= 8 => buf[..8].copy_from_slice(&IHAVEOPT.to_be_bytes()),
                1 if buf.len() >= 4 => buf[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes()),
                2 if buf.len() >= 4 => {
                    buf[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes())
                }
                _ => {}
            }
            if let Ok(Decode::Complete { consumed, .. }) = parse_option_message(&buf) {
                assert!(consumed <= buf.len());
            }
            let _ = parse_request(&buf);
            let _ = parse_reply_header(&buf);
            let _ = parse_client_flags(&buf);
            let _ = parse_greeting(&buf);
            let _ = parse_option_reply_header(&buf);
            let _ = parse_info(&buf);
            for opt in 0..=12 {
                let _ = parse_option(opt, &buf);
            }
            for ty in [0, 1, 2, 5, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET] {
                let _ = parse_chunk(ty, &buf);
            }
        }
    }
}
