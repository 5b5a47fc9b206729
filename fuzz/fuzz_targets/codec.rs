//! Feeds arbitrary bytes to every NBD parser (`gateway::nbd::proto`): none
//! may panic, "incomplete" must ask for more than it was given, "complete"
//! must stay within the buffer, and what parses as a request or option
//! header must encode back to the same bytes.
//!
//! Run: `cargo fuzz run codec` from this directory (nightly toolchain).
#![no_main]

use gateway::nbd::proto::{self, Decode};
use libfuzzer_sys::fuzz_target;

fn check<T>(buf: &[u8], r: Result<Decode<T>, proto::ProtoError>) -> Option<(T, usize)> {
    match r {
        Ok(Decode::Incomplete { needed }) => {
            assert!(needed > buf.len(), "incomplete with enough bytes");
            None
        }
        Ok(Decode::Complete { value, consumed }) => {
            assert!(consumed <= buf.len(), "consumed past the buffer");
            assert!(consumed > 0, "complete message of zero bytes");
            Some((value, consumed))
        }
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    // A client's option stream: parse messages back to back.
    let mut rest = data;
    while let Some(((opt, _payload), n)) = check(rest, proto::parse_option_message(rest)) {
        let hdr = proto::parse_option_header(rest)
            .ok()
            .and_then(Decode::complete)
            .expect("message parsed but its header did not");
        assert_eq!(hdr.0.option, opt);
        let mut again = Vec::new();
        proto::encode_option(&mut again, opt, &rest[proto::OPTION_HEADER_LEN..n]);
        assert_eq!(&again[..], &rest[..n]);
        rest = &rest[n..];
    }

    // A transmission stream: requests back to back, skipping WRITE payloads.
    let mut rest = data;
    while let Some((req, n)) = check(rest, proto::parse_request(rest)) {
        let mut again = Vec::new();
        proto::encode_request(&mut again, &req);
        assert_eq!(&again[..], &rest[..n]);
        let skip = n.saturating_add(req.payload_len() as usize);
        if skip > rest.len() {
            break;
        }
        rest = &rest[skip..];
    }

    // Every other parser, on the raw input.
    check(data, proto::parse_greeting(data));
    check(data, proto::parse_client_flags(data));
    check(data, proto::parse_option_reply_header(data));
    check(data, proto::parse_reply_header(data));
    let _ = proto::parse_info(data);
    let _ = proto::parse_string(data);
    if let Some((&sel, payload)) = data.split_first() {
        let _ = proto::parse_option(u32::from(sel % 16), payload);
        let ty = match sel % 7 {
            0 => proto::REPLY_TYPE_NONE,
            1 => proto::REPLY_TYPE_OFFSET_DATA,
            2 => proto::REPLY_TYPE_OFFSET_HOLE,
            3 => proto::REPLY_TYPE_BLOCK_STATUS,
            4 => proto::REPLY_TYPE_ERROR,
            5 => proto::REPLY_TYPE_ERROR_OFFSET,
            _ => u16::from(sel),
        };
        let _ = proto::parse_chunk(ty, payload);
    }
});
