//! The transmission phase: read requests, run them on blocking threads, write
//! replies (spec "Transmission", "Request types").
//!
//! One connection is three kinds of work:
//! - the reader (this connection's task) reads and validates request headers,
//!   reads write payloads, and applies backpressure: it takes a slot from the
//!   in-flight request and byte budgets before it reads the next request, so a
//!   client that outruns the export simply stops being read, never gets an error;
//! - each valid request runs on tokio's blocking pool (`spawn_blocking`), because
//!   an export may block on file I/O or fsync; requests of one connection run
//!   concurrently and complete in any order;
//! - one writer task owns the socket's write half and writes encoded replies in
//!   completion order ("Replies need not be sent in the same order as
//!   requests"), batching whatever is ready into one buffered write.
//!
//! Replies are encoded in full on the blocking thread before they are queued, so
//! a read error is always known before any byte of its reply is sent: a simple
//! reply never needs the hard disconnect the spec demands for a late error.
//! Data never appears in logs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Span, debug, error, warn};

use crate::export::{ErrorKind, Export, ExportError, errno, kind_text};
use crate::handshake::Session;
use crate::proto::errno::{EINVAL, EIO, ENOSPC, ENOTSUP, EPERM};
use crate::proto::*;
use crate::server::Shared;

/// Oversized or refused writes up to this length have their payload read and
/// discarded so the stream stays in sync; a longer one closes the connection
/// (spec "Block size constraints": a payload "large enough to be deemed a denial
/// of service attack").
const MAX_DRAINED_WRITE: u32 = 256 * 1024 * 1024;
/// Structured reads at least this long consult block status and send holes as
/// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks instead of zero bytes.
const SPARSE_READ_MIN: u32 = 64 * 1024;
/// Holes shorter than this are sent as data: a chunk header would cost more.
const MIN_HOLE_CHUNK: u64 = 512;
/// Most descriptors in one block status reply ("the server MAY return fewer
/// descriptors in the reply than would be required").
const MAX_DESCRIPTORS: usize = 1 << 16;
const READ_BUFFER: usize = 256 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// What the blocking side of a connection needs.
struct Conn {
    export: Arc<dyn Export>,
    name: String,
    structured: bool,
    shared: Arc<Shared>,
    span: Span,
}

/// A validated request, ready for the export.
enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

/// The outcome of validating a request header.
enum Verdict {
    Run(Op),
    /// Succeeds without touching the export (zero-length requests).
    Done,
    Refuse(u32, &'static str),
    Disconnect,
}

/// One encoded reply and the budget it holds until it is written.
struct Reply {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Runs the transmission phase until the client disconnects, the server shuts
/// down, or the stream breaks; in-flight requests always finish and reply first.
pub(crate) async fn serve<R, W>(reader: R, writer: W, session: Session, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(writer, rx));
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let slots = Arc::new(Semaphore::new(shared.config.max_in_flight_requests));
    let byte_budget = shared.config.max_in_flight_bytes;
    let bytes = Arc::new(Semaphore::new(byte_budget));
    let conn = Arc::new(Conn {
        export: session.export.clone(),
        name: session.name.clone(),
        structured: session.structured,
        shared: shared.clone(),
        span: Span::current(),
    });
    let shutdown = shared.shutdown.clone();
    let mut shutdown = std::pin::pin!(shutdown.triggered());

    loop {
        if tx.is_closed() {
            debug!("reply writer stopped; closing");
            break;
        }
        // Backpressure: no slot, no read.
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => { debug!("server shutting down"); break; }
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
        };
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = &mut shutdown => { debug!("server shutting down"); break; }
            read = reader.read_exact(&mut header) => read,
        };
        if let Err(e) = read {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                debug!("client closed the connection");
            } else {
                debug!(error = %e, "read failed");
            }
            break;
        }
        let Some(req) = Request::decode(&header) else {
            // A bad magic means the stream is out of sync: nothing after it can be
            // parsed, so hard disconnect ("violation of a mandatory condition").
            warn!("bad request magic; closing");
            break;
        };
        debug!(
            handle = req.handle,
            command = command_name(req.kind),
            flags = req.flags,
            offset = req.offset,
            len = req.len,
            "request"
        );
        let verdict = validate(&req, &session, shared.config.max_request_payload);
        let op = match verdict {
            Verdict::Disconnect => {
                // NBD_CMD_DISC: "The server MUST handle all outstanding requests ...
                // and close the TCP session".
                debug!("client requested disconnect");
                break;
            }
            Verdict::Run(op) => op,
            Verdict::Done | Verdict::Refuse(..) => {
                if req.kind == CMD_WRITE && req.len > 0 && !drain(&mut reader, req.len).await {
                    break;
                }
                let bytes = match verdict {
                    Verdict::Refuse(error, message) => {
                        debug!(handle = req.handle, error, message, "request refused");
                        error_reply(session.structured, req.handle, error, message)
                    }
                    _ => no_data_reply(session.structured, req.kind, req.handle),
                };
                let _ = tx.send(Reply {
                    bytes,
                    _slot: slot,
                    _bytes: None,
                });
                continue;
            }
        };
        // The byte budget covers write payloads and read replies; a request larger
        // than the whole budget takes all of it.
        let cost = match &op {
            Op::Read { len, .. } => *len,
            Op::Write { .. } => req.len,
            _ => 0,
        };
        let cost = cost.min(u32::try_from(byte_budget).unwrap_or(u32::MAX));
        let byte_permit = if cost > 0 {
            Some(
                bytes
                    .clone()
                    .acquire_many_owned(cost)
                    .await
                    .expect("the byte semaphore is never closed"),
            )
        } else {
            None
        };
        let op = match op {
            Op::Write { offset, fua, .. } => {
                let mut data = vec![0u8; req.len as usize];
                if let Err(e) = reader.read_exact(&mut data).await {
                    debug!(error = %e, "client went away in a write payload");
                    break;
                }
                Op::Write { offset, data, fua }
            }
            op => op,
        };
        let conn = conn.clone();
        let tx = tx.clone();
        let handle = req.handle;
        tokio::task::spawn_blocking(move || {
            // A panicking export must not leave the client waiting forever.
            let bytes = std::panic::catch_unwind(AssertUnwindSafe(|| execute(&conn, handle, op)))
                .unwrap_or_else(|_| {
                    error!(parent: &conn.span, export = %conn.name, "export panicked");
                    error_reply(conn.structured, handle, EIO, "internal server error")
                });
            // The writer may be gone when the client is; nothing to do then.
            let _ = tx.send(Reply {
                bytes,
                _slot: slot,
                _bytes: byte_permit,
            });
        });
    }
    // The writer ends when every sender is gone: ours now, the jobs' as they finish.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
        Err(e) => error!(error = %e, "reply writer panicked"),
    }
}

/// Checks a request against the session; no export call happens here.
fn validate(req: &Request, s: &Session, max_payload: u32) -> Verdict {
    let ro = s.flags & FLAG_READ_ONLY != 0;
    let fua = if s.flags & FLAG_SEND_FUA != 0 {
        CMD_FLAG_FUA
    } else {
        0
    };
    // "Command flags": the flags each command may carry, given what was advertised.
    let (allowed, writes) = match req.kind {
        CMD_READ => (
            fua | if s.flags & FLAG_SEND_DF != 0 {
                CMD_FLAG_DF
            } else {
                0
            },
            false,
        ),
        CMD_WRITE => (fua, true),
        // NBD_CMD_DISC takes no reply; flags or not, the client is leaving.
        CMD_DISC => return Verdict::Disconnect,
        CMD_FLUSH | CMD_CACHE => (fua, false),
        CMD_TRIM => (fua, true),
        CMD_WRITE_ZEROES => (fua | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, true),
        CMD_BLOCK_STATUS => (fua | CMD_FLAG_REQ_ONE, false),
        // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        _ => return Verdict::Refuse(EINVAL, "unknown command"),
    };
    // "SHOULD return NBD_EPERM if it receives a write or trim request on a
    // read-only export" (and write zeroes).
    if writes && ro {
        return Verdict::Refuse(EPERM, "export is read-only");
    }
    // "SHOULD return NBD_EINVAL if it receives an unknown command flag ... or a
    // flag not explicitly documented as applicable to the given request."
    if req.flags & !allowed != 0 {
        return Verdict::Refuse(EINVAL, "flag not valid for this command");
    }
    if req.kind == CMD_FLUSH {
        // "For a flush request, length and offset are reserved, and MUST be set to
        // all-zero."
        if req.offset != 0 || req.len != 0 {
            return Verdict::Refuse(EINVAL, "flush with nonzero offset or length");
        }
        return Verdict::Run(Op::Flush);
    }
    let len = u64::from(req.len);
    let end = req.offset.checked_add(len);
    if end.is_none_or(|end| end > s.size) {
        // "Error values": ENOSPC for writes (and write zeroes) past the end,
        // EINVAL for reads, trims and the rest.
        return if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Verdict::Refuse(ENOSPC, "request reaches past the end of the export")
        } else {
            Verdict::Refuse(EINVAL, "request reaches past the end of the export")
        };
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > max_payload {
        // "Block size constraints": larger than the advertised maximum.
        return Verdict::Refuse(EINVAL, "request is larger than the maximum block size");
    }
    let align = u64::from(s.alignment);
    if align > 1
        && (!req.offset.is_multiple_of(align)
            || (!len.is_multiple_of(align) && end != Some(s.size)))
    {
        // "The server SHOULD report an NBD_EINVAL error if the client's request is
        // not aligned to advertised minimum block size boundaries".
        return Verdict::Refuse(EINVAL, "request is not aligned to the minimum block size");
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_BLOCK_STATUS => {
            // "Servers SHOULD reply with NBD_EINVAL to clients sending
            // NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            let Some(context) = s.base_allocation else {
                return Verdict::Refuse(EINVAL, "no metadata context was selected");
            };
            // A zero-length status query has no meaningful answer (every descriptor
            // must be nonzero); the spec leaves the behaviour open.
            if req.len == 0 {
                return Verdict::Refuse(EINVAL, "zero-length block status");
            }
            Verdict::Run(Op::BlockStatus {
                offset: req.offset,
                len: req.len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
                context,
            })
        }
        // Zero-length reads, writes, trims, zeroes and caches: "the behavior of a
        // server on such a request is unspecified although the server SHOULD NOT
        // disconnect". They succeed and do nothing.
        _ if req.len == 0 => Verdict::Done,
        CMD_READ => Verdict::Run(Op::Read {
            offset: req.offset,
            len: req.len,
            df: req.flags & CMD_FLAG_DF != 0,
        }),
        CMD_WRITE => Verdict::Run(Op::Write {
            offset: req.offset,
            data: Vec::new(),
            fua,
        }),
        CMD_TRIM => Verdict::Run(Op::Trim {
            offset: req.offset,
            len,
            fua,
        }),
        CMD_CACHE => Verdict::Run(Op::Cache {
            offset: req.offset,
            len,
        }),
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && no_hole {
                // NBD_CMD_FLAG_FAST_ZERO: "the server MUST fail quickly with an error
                // of NBD_ENOTSUP" unless faster than a write. Zeroes that must stay
                // allocated are sealed like data, so they are not faster.
                return Verdict::Refuse(ENOTSUP, "allocated zeroes are not faster than a write");
            }
            Verdict::Run(Op::WriteZeroes {
                offset: req.offset,
                len,
                fua,
                no_hole,
            })
        }
        _ => unreachable!("every known command was matched above"),
    }
}

/// Reads and discards a refused write's payload; `false` if the connection must
/// close instead.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> bool {
    if len > MAX_DRAINED_WRITE {
        warn!(len, "refused write payload too large to skip; closing");
        return false;
    }
    let mut limited = reader.take(u64::from(len));
    match tokio::io::copy(&mut limited, &mut tokio::io::sink()).await {
        Ok(n) if n == u64::from(len) => true,
        _ => {
            debug!("client went away in a refused write payload");
            false
        }
    }
}

/// Runs one request against the export and encodes its reply. Blocking thread.
fn execute(conn: &Conn, handle: u64, op: Op) -> Vec<u8> {
    let export = conn.export.as_ref();
    match op {
        Op::Read { offset, len, df } => read_reply(conn, handle, offset, len, df),
        Op::Write { offset, data, fua } => {
            let len = data.len() as u64;
            status_reply(conn, handle, offset, len, export.write(offset, &data, fua))
        }
        Op::Flush => status_reply(conn, handle, 0, 0, export.flush()),
        Op::Trim { offset, len, fua } => {
            status_reply(conn, handle, offset, len, export.trim(offset, len, fua))
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => status_reply(
            conn,
            handle,
            offset,
            len,
            export.write_zeroes(offset, len, fua, no_hole),
        ),
        Op::Cache { offset, len } => {
            status_reply(conn, handle, offset, len, export.cache(offset, len))
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => block_status_reply(conn, handle, offset, len, req_one, context),
    }
}

/// The reply to a request that returns no data.
fn status_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u64,
    r: Result<(), ExportError>,
) -> Vec<u8> {
    match r {
        Ok(()) => {
            let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN);
            put_simple_reply(&mut out, 0, handle);
            out
        }
        Err(e) => export_error_reply(conn, handle, offset, len, &e),
    }
}

/// `NBD_CMD_READ`: a simple reply with the data, or structured chunks.
fn read_reply(conn: &Conn, handle: u64, offset: u64, len: u32, df: bool) -> Vec<u8> {
    let n = len as usize;
    if !conn.structured {
        // "Simple replies": header, then exactly len bytes; an error sends no data.
        let mut out = vec![0u8; SIMPLE_REPLY_LEN + n];
        return match conn.export.read(offset, &mut out[SIMPLE_REPLY_LEN..]) {
            Ok(()) => {
                put_simple_reply(&mut &mut out[..SIMPLE_REPLY_LEN], 0, handle);
                out
            }
            Err(e) => export_error_reply(conn, handle, offset, u64::from(len), &e),
        };
    }
    // With NBD_CMD_FLAG_DF "the server MUST send at most one content chunk";
    // every read up to the maximum payload fits in one, so EOVERFLOW never arises.
    if !df
        && len >= SPARSE_READ_MIN
        && let Some(out) = sparse_read_reply(conn, handle, offset, len)
    {
        return out;
    }
    // One NBD_REPLY_TYPE_OFFSET_DATA chunk, final: the data is complete before the
    // chunk is sent, so no error can follow it.
    const HEAD: usize = CHUNK_HEADER_LEN + 8;
    let mut out = vec![0u8; HEAD + n];
    match conn.export.read(offset, &mut out[HEAD..]) {
        Ok(()) => {
            let mut head = &mut out[..HEAD];
            put_chunk_header(
                &mut head,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + len,
            );
            head.put_u64(offset);
            out
        }
        Err(e) => export_error_reply(conn, handle, offset, u64::from(len), &e),
    }
}

/// A structured read that sends zero ranges as `NBD_REPLY_TYPE_OFFSET_HOLE`
/// chunks. `None` when block status finds nothing worth skipping (or fails): the
/// caller then sends plain data.
fn sparse_read_reply(conn: &Conn, handle: u64, offset: u64, len: u32) -> Option<Vec<u8>> {
    let end = offset + u64::from(len);
    let extents = conn.export.block_status(offset, u64::from(len)).ok()?;
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
    let data: u64 = runs.iter().filter(|r| !r.2).map(|r| r.1).sum();
    let mut out = Vec::with_capacity(runs.len() * (CHUNK_HEADER_LEN + 12) + data as usize);
    let last = runs.len() - 1;
    for (i, (start, length, zero)) in runs.into_iter().enumerate() {
        // The whole reply is assembled before any of it is sent, so marking the
        // last chunk final is safe: no error can come after it.
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        // Runs are clipped to a u32 request, so each length fits in u32.
        let length32 = length as u32;
        if zero {
            put_chunk_header(&mut out, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
            out.put_u64(start);
            out.put_u32(length32);
        } else {
            put_chunk_header(
                &mut out,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + length32,
            );
            out.put_u64(start);
            let at = out.len();
            out.resize(at + length as usize, 0);
            if let Err(e) = conn.export.read(start, &mut out[at..]) {
                return Some(export_error_reply(conn, handle, start, length, &e));
            }
        }
    }
    Some(out)
}

/// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: one `NBD_REPLY_TYPE_BLOCK_STATUS`
/// chunk.
fn block_status_reply(
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    context: u32,
) -> Vec<u8> {
    let extents = match conn.export.block_status(offset, u64::from(len)) {
        Ok(extents) => extents,
        Err(e) => return export_error_reply(conn, handle, offset, u64::from(len), &e),
    };
    let end = offset + u64::from(len);
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
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload);
    put_chunk_header(
        &mut out,
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
    out
}

/// Logs an export error at the level its kind deserves and encodes its reply.
fn export_error_reply(conn: &Conn, handle: u64, offset: u64, len: u64, e: &ExportError) -> Vec<u8> {
    let span = &conn.span;
    match e.kind() {
        ErrorKind::Authentication => {
            conn.shared.stats.authentication_failure();
            warn!(parent: span, export = %conn.name, offset, len, message = e.message(),
                "block failed authentication");
        }
        ErrorKind::Io | ErrorKind::Poisoned => {
            error!(parent: span, export = %conn.name, offset, len, message = e.message(),
                "export I/O failed");
        }
        ErrorKind::NoSpace => {
            warn!(parent: span, export = %conn.name, offset, len, message = e.message(),
                "export is out of space");
        }
        _ => {
            debug!(parent: span, export = %conn.name, offset, len, kind = ?e.kind(),
                message = e.message(), "export refused request");
        }
    }
    error_reply(
        conn.structured,
        handle,
        errno(e.kind()),
        kind_text(e.kind()),
    )
}

/// An error reply: a structured error chunk when negotiated ("The server SHOULD
/// prefer sending errors via a structured reply"; for `NBD_CMD_READ` it MUST),
/// otherwise a simple reply with no payload.
fn error_reply(structured: bool, handle: u64, error: u32, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + message.len());
    if structured {
        put_error_chunk(&mut out, handle, error, message);
    } else {
        put_simple_reply(&mut out, error, handle);
    }
    out
}

/// A successful reply without data: for a structured read that is a lone
/// `NBD_REPLY_TYPE_NONE` chunk (a read MUST NOT get a simple reply then).
fn no_data_reply(structured: bool, kind: u16, handle: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN);
    if structured && kind == CMD_READ {
        put_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
    } else {
        put_simple_reply(&mut out, 0, handle);
    }
    out
}

/// The writer task: replies in completion order, batched into buffered writes,
/// then an orderly close (TLS close_notify, then FIN).
async fn write_replies<W>(writer: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(reply) = rx.recv().await {
        w.write_all(&reply.bytes).await?;
        drop(reply);
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply.bytes).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}
