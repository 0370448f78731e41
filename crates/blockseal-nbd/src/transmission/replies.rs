//! Replies: encoding simple replies and structured reply chunks for each
//! request (spec "Simple reply message", "Structured reply chunk message"),
//! and writing them in batches under the reply deadline.
//!
//! A reply is encoded in full before any of its bytes is written, so a read
//! error is always known before its reply starts: a simple reply never needs
//! the hard disconnect the spec demands for a late error. Data never appears in
//! logs; an export error's message and causes go to the log, and the client
//! sees only the error value and a generic text.

use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, error, warn};

use super::validate::MAX_STATUS_BLOCKS;
use super::workers::{Conn, Done, status_block_size};
use crate::error::{ErrorClass, ExportError, chain, class_text, errno};
use crate::limits::Held;
use crate::proto::*;

/// Replies are written once this much is batched, even mid-batch.
pub(super) const WRITE_BATCH: usize = 256 * 1024;
/// Holes shorter than this are sent as data: a chunk header would cost more.
const MIN_HOLE_CHUNK: u64 = 512;
/// Most descriptors in one block status reply ("the server MAY return fewer
/// descriptors in the reply than would be required").
const MAX_DESCRIPTORS: usize = 1 << 16;

/// The reply side of a connection: the batch of encoded replies not yet
/// written, and the budget their requests hold until they are.
pub(super) struct Replies<W> {
    pub(super) writer: W,
    pub(super) buf: Vec<u8>,
    /// Budget of the offloaded requests whose replies are in `buf`.
    pub(super) riding: Vec<Held>,
    /// Bytes this connection's offloaded requests hold: running, or replied to
    /// but not yet written.
    pub(super) held_bytes: u64,
    /// Time the client has to accept a whole batch of replies.
    pub(super) timeout: Duration,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    /// Adds the reply of an offloaded request to the batch. A large reply is not
    /// copied: the batch so far is written first and the reply's buffer becomes
    /// the batch. `false` if the client is gone.
    pub(super) async fn absorb(&mut self, done: Done, conn: &Conn) -> bool {
        let Done { mut reply, held } = done;
        let mut written = true;
        if self.buf.is_empty() {
            std::mem::swap(&mut self.buf, &mut reply);
        } else if reply.len() >= WRITE_BATCH {
            written = self.flush(conn).await;
            std::mem::swap(&mut self.buf, &mut reply);
        } else {
            self.buf.extend_from_slice(&reply);
        }
        self.riding.push(held);
        conn.recycle(reply);
        written
    }

    /// Writes the batched replies, then gives back the budget their requests
    /// held; `false` if the client is gone or did not accept them all within
    /// the reply timeout.
    pub(super) async fn flush(&mut self, conn: &Conn) -> bool {
        let written = write_all(&mut self.writer, &self.buf, self.timeout).await;
        if self.buf.capacity() > 4 * WRITE_BATCH {
            // After a large reply, hand the buffer to the pool (or back to the
            // allocator) rather than keep it for the connection's lifetime.
            let large = std::mem::replace(&mut self.buf, conn.buffer());
            conn.recycle(large);
        } else {
            self.buf.clear();
        }
        for held in self.riding.drain(..) {
            self.held_bytes -= held.bytes;
        }
        match written {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                warn!(
                    timeout_secs = self.timeout.as_secs_f64(),
                    "client did not read its replies within the reply timeout; closing"
                );
                false
            }
            Err(e) => {
                debug!(error = %e, "writing replies failed");
                false
            }
        }
    }
}

/// `write_all` and `flush`, failing with `TimedOut` unless the peer has
/// accepted all of `buf` within `timeout`. Progress does not extend the
/// deadline: a client that reads a little now and then would otherwise hold
/// the budget of the reply for as long as it liked.
async fn write_all<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let written = tokio::time::timeout(timeout, async {
        writer.write_all(buf).await?;
        writer.flush().await
    })
    .await;
    written.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// `NBD_CMD_READ`: a simple reply with the data, or structured chunks (with
/// holes when `sparse`). The data is read straight into the output buffer.
/// The error class of a failed read.
pub(super) fn read_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    sparse: bool,
    out: &mut Vec<u8>,
) -> Result<(), ErrorClass> {
    read_reply_with(conn, handle, offset, len, sparse, false, out)
        .expect("a read that may wait always answers")
}

/// [`read_reply`] without sparse chunks, only if the export can read without
/// waiting on a device ([`Export::read_cached`]); `None`, with `out` as it was,
/// where it would wait.
pub(super) fn read_reply_cached(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    out: &mut Vec<u8>,
) -> Option<Result<(), ErrorClass>> {
    read_reply_with(conn, handle, offset, len, false, true, out)
}

/// The export's read into `buf`: `None` only when `cached` and it would wait.
fn fill(conn: &Conn, offset: u64, buf: &mut [u8], cached: bool) -> Option<Result<(), ExportError>> {
    if !cached {
        return Some(conn.export.read(offset, buf));
    }
    match conn.export.read_cached(offset, buf) {
        Ok(true) => Some(Ok(())),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}

fn read_reply_with(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    sparse: bool,
    cached: bool,
    out: &mut Vec<u8>,
) -> Option<Result<(), ErrorClass>> {
    let start = out.len();
    let n = len as usize;
    if !conn.structured {
        // "Simple replies": header, then exactly len bytes; an error sends no data.
        out.resize(start + SIMPLE_REPLY_LEN + n, 0);
        let Some(read) = fill(conn, offset, &mut out[start + SIMPLE_REPLY_LEN..], cached) else {
            out.truncate(start);
            return None;
        };
        return Some(match read {
            Ok(()) => {
                put_simple_reply(&mut &mut out[start..start + SIMPLE_REPLY_LEN], 0, handle);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(export_error_reply(
                    conn,
                    handle,
                    offset,
                    u64::from(len),
                    &e,
                    out,
                ))
            }
        });
    }
    // With NBD_CMD_FLAG_DF "the server MUST send at most one content chunk"
    // (such reads are never sparse); every read up to the maximum payload fits
    // in one, so EOVERFLOW never arises.
    if sparse && let Some(outcome) = sparse_read_reply(conn, handle, offset, len, out) {
        return Some(outcome);
    }
    // One NBD_REPLY_TYPE_OFFSET_DATA chunk, final: the data is complete before the
    // chunk is sent, so no error can follow it.
    const HEAD: usize = CHUNK_HEADER_LEN + 8;
    out.resize(start + HEAD + n, 0);
    let Some(read) = fill(conn, offset, &mut out[start + HEAD..], cached) else {
        out.truncate(start);
        return None;
    };
    Some(match read {
        Ok(()) => {
            let mut head = &mut out[start..start + HEAD];
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + len,
            );
            head.put_u64(offset);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(export_error_reply(
                conn,
                handle,
                offset,
                u64::from(len),
                &e,
                out,
            ))
        }
    })
}

/// A structured read that sends zero ranges as `NBD_REPLY_TYPE_OFFSET_HOLE`
/// chunks; how it ended. `None` when block status finds nothing worth
/// skipping (or fails): the caller then sends plain data.
fn sparse_read_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    out: &mut Vec<u8>,
) -> Option<Result<(), ErrorClass>> {
    let end = offset + u64::from(len);
    let Ok(extents) = conn.export.block_status(offset, u64::from(len)) else {
        return None;
    };
    // Runs of (start, length, reads-as-zero), merged and clipped to the request.
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    let push = |runs: &mut Vec<(u64, u64, bool)>, start: u64, length: u64, zero: bool| match runs
        .last_mut()
    {
        Some(last) if last.2 == zero => last.1 += length,
        _ => runs.push((start, length, zero)),
    };
    for e in extents {
        if pos >= end {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let length = e.length.min(end - pos);
        push(&mut runs, pos, length, e.zero && length >= MIN_HOLE_CHUNK);
        pos += length;
    }
    if pos < end {
        push(&mut runs, pos, end - pos, false);
    }
    if !runs.iter().any(|r| r.2) {
        return None;
    }
    let start_of_reply = out.len();
    let data: u64 = runs.iter().filter(|r| !r.2).map(|r| r.1).sum();
    out.reserve(runs.len() * (CHUNK_HEADER_LEN + 12) + data as usize);
    let last = runs.len() - 1;
    for (i, (start, length, zero)) in runs.into_iter().enumerate() {
        // The whole reply is assembled before any of it is sent, so marking the
        // last chunk final is safe: no error can come after it.
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        // Runs are clipped to a u32 request, so each length fits in u32.
        let length32 = length as u32;
        if zero {
            put_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
            out.put_u64(start);
            out.put_u32(length32);
        } else {
            put_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + length32);
            out.put_u64(start);
            let at = out.len();
            out.resize(at + length as usize, 0);
            if let Err(e) = conn.export.read(start, &mut out[at..]) {
                out.truncate(start_of_reply);
                return Some(Err(export_error_reply(
                    conn, handle, start, length, &e, out,
                )));
            }
        }
    }
    Some(Ok(()))
}

/// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: one `NBD_REPLY_TYPE_BLOCK_STATUS`
/// chunk describing at most [`MAX_STATUS_BLOCKS`] blocks from `offset`: "the sum
/// of the *length* fields of each descriptor MUST not be greater than the overall
/// *length* of the request. This means that the server MAY return less data than
/// required. However the server MUST return at least one status descriptor."
pub(super) fn block_status_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    context: u32,
    out: &mut Vec<u8>,
) -> Result<(), ErrorClass> {
    let block = status_block_size(conn.export.as_ref());
    // Ends on a block boundary past `offset`, so it describes at least a byte.
    let limit = (offset / block + MAX_STATUS_BLOCKS) * block;
    let end = (offset + u64::from(len)).min(limit);
    let len = (end - offset) as u32;
    let extents = match conn.export.block_status(offset, u64::from(len)) {
        Ok(extents) => extents,
        Err(e) => {
            return Err(export_error_reply(
                conn,
                handle,
                offset,
                u64::from(len),
                &e,
                out,
            ));
        }
    };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    for e in extents {
        if pos >= end {
            break;
        }
        if e.length == 0 {
            continue;
        }
        // Clipped to the request: every length fits in u32 and their sum never
        // exceeds the requested length.
        let length = e.length.min(end - pos) as u32;
        let status = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        pos += u64::from(length);
        // "The server SHOULD use different status values between consecutive
        // descriptors".
        let full = descriptors.len() == MAX_DESCRIPTORS;
        match descriptors.last_mut() {
            Some(last) if last.1 == status => last.0 += length,
            _ if full => break,
            _ => descriptors.push((length, status)),
        }
    }
    if descriptors.is_empty() {
        // "the server MUST return at least one status descriptor"; status 0 is
        // always safe.
        descriptors.push((len, 0));
    }
    if req_one {
        // NBD_CMD_FLAG_REQ_ONE: "exactly one descriptor".
        descriptors.truncate(1);
    }
    let payload = 4 + 8 * descriptors.len();
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload as u32,
    );
    out.put_u32(context);
    for (length, status) in descriptors {
        out.put_u32(length);
        out.put_u32(status);
    }
    Ok(())
}

/// Logs an export error at the level its kind deserves and appends its reply;
/// returns the error's class.
pub(super) fn export_error_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u64,
    e: &ExportError,
    out: &mut Vec<u8>,
) -> ErrorClass {
    let span = &conn.span;
    // The message and every cause: the client sees none of it.
    let detail = chain(e);
    match e.class() {
        ErrorClass::Authentication => {
            conn.shared.stats.authentication_failure();
            warn!(parent: span, export = %conn.name, offset, len, detail,
                "block failed authentication");
        }
        ErrorClass::Io | ErrorClass::Poisoned => {
            error!(parent: span, export = %conn.name, offset, len, detail,
                "export I/O failed");
        }
        ErrorClass::NoSpace => {
            warn!(parent: span, export = %conn.name, offset, len, detail,
                "export is out of space");
        }
        _ => {
            debug!(parent: span, export = %conn.name, offset, len, class = ?e.class(),
                detail, "export refused request");
        }
    }
    error_reply(
        conn.structured,
        handle,
        errno(e.class()),
        class_text(e.class()),
        out,
    );
    e.class()
}

/// Appends an error reply: a structured error chunk when negotiated ("The server
/// SHOULD prefer sending errors via a structured reply"; for `NBD_CMD_READ` it
/// MUST), otherwise a simple reply with no payload.
pub(super) fn error_reply(
    structured: bool,
    handle: u64,
    error: u32,
    message: &str,
    out: &mut Vec<u8>,
) {
    if structured {
        put_error_chunk(out, handle, error, message);
    } else {
        put_simple_reply(out, error, handle);
    }
}

/// Appends a successful reply without data: for a structured read that is a lone
/// `NBD_REPLY_TYPE_NONE` chunk (a read MUST NOT get a simple reply then).
pub(super) fn no_data_reply(structured: bool, kind: u16, handle: u64, out: &mut Vec<u8>) {
    if structured && kind == CMD_READ {
        put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
    } else {
        put_simple_reply(out, 0, handle);
    }
}
