//! Wire constants and small encoders of the NBD protocol.
//!
//! Every value here is quoted from `doc/proto.md` of NetworkBlockDevice/nbd; the
//! comment above each group names the spec section it comes from. This module
//! owns byte layouts only: it never decides policy and never touches an export.

use bytes::BufMut;

// "Newstyle negotiation": the greeting and the option header magic.
/// `NBDMAGIC`, first 8 bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
// "Fixed newstyle negotiation": the magic of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// "Values / Handshake phase / Handshake flags".
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;

// "Values / Handshake phase / Client flags".
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// "Values / Handshake phase / Transmission flags".
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const FLAG_SEND_DF: u16 = 1 << 7;
pub(crate) const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const FLAG_SEND_CACHE: u16 = 1 << 10;
pub(crate) const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// "Values / Handshake phase / Option types".
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// "Values / Handshake phase / Option reply types".
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(crate) const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub(crate) const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// "NBD_REP_INFO": information types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// "Transmission / Request message" and "Simple reply message" and
// "Structured reply chunk message".
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header on the wire (compact headers; extended headers are not offered).
pub(crate) const REQUEST_HEADER_LEN: usize = 28;
pub(crate) const SIMPLE_REPLY_LEN: usize = 16;
pub(crate) const CHUNK_HEADER_LEN: usize = 20;

// "Values / Transmission phase / Request types".
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// "Values / Transmission phase / Command flags".
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// "Structured reply flags" and "Structured reply types".
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// "`base:allocation` metadata context": status flags.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";

/// "Values / Transmission phase / Error values": the only errors a reply may carry.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error (also: a block failed authentication).
    pub const EIO: u32 = 5;
    /// Cannot allocate memory (the spec asks servers to avoid it).
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device (also: a write past the end of the export).
    pub const ENOSPC: u32 = 28;
    /// Value too large (a don't-fragment read the server cannot send in one chunk).
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (a fast zero that would not be fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// "Strings" (Conventions): no longer than 4096 bytes.
pub(crate) const MAX_STRING_LEN: usize = 4096;

/// One request header, as read in the transmission phase ("Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) handle: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Request {
    /// Decodes a header; `None` when the magic is wrong (the stream cannot be resynchronised).
    pub(crate) fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Option<Request> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().expect("8-byte slice")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8-byte slice")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4-byte slice")),
        })
    }
}

/// Appends an option reply header and payload ("Fixed newstyle negotiation").
pub(crate) fn put_option_reply(buf: &mut impl BufMut, option: u32, reply: u32, payload: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(u32::try_from(payload.len()).expect("option replies are far below 4 GiB"));
    buf.put_slice(payload);
}

/// Appends a simple reply header ("Simple reply message"); read data, if any, follows it.
pub(crate) fn put_simple_reply(buf: &mut impl BufMut, error: u32, handle: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(handle);
}

/// Appends a structured reply chunk header ("Structured reply chunk message").
pub(crate) fn put_chunk_header(
    buf: &mut impl BufMut,
    flags: u16,
    kind: u16,
    handle: u64,
    len: u32,
) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(handle);
    buf.put_u32(len);
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub(crate) fn put_error_chunk(buf: &mut impl BufMut, handle: u64, error: u32, message: &str) {
    let message = truncate(message, MAX_STRING_LEN);
    let len = 6 + message.len();
    put_chunk_header(
        buf,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        u32::try_from(len).expect("message is at most 4096 bytes"),
    );
    buf.put_u32(error);
    buf.put_u16(u16::try_from(message.len()).expect("message is at most 4096 bytes"));
    buf.put_slice(message.as_bytes());
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::decode(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                kind: CMD_WRITE,
                handle: 7,
                offset: 4096,
                len: 512
            }
        );
        b[0] = 0;
        assert!(Request::decode(&b).is_none());
    }

    #[test]
    fn error_chunk_layout() {
        let mut buf = Vec::new();
        put_error_chunk(&mut buf, 9, errno::EIO, "bad");
        assert_eq!(buf.len(), CHUNK_HEADER_LEN + 6 + 3);
        assert_eq!(&buf[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&buf[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&buf[16..20], &9u32.to_be_bytes());
        assert_eq!(&buf[20..24], &errno::EIO.to_be_bytes());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
