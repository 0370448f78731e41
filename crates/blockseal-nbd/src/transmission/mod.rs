//! The transmission phase: read requests, run them, write replies (spec
//! "Transmission", "Request types").
//!
//! Each connection is one task that reads whatever the client has sent into a
//! buffer, handles every complete request in it, and writes all the replies of
//! that batch with one write. Small requests (reads, writes, trims, zeroes and
//! cache requests of at most [`ServerConfig::inline_max_bytes`]) run directly
//! on the task. Larger ones and block status go to a per-connection queue
//! drained by up to `workers_per_connection` blocking threads, and flushes and
//! FUA requests, which wait for the disk, to a second queue with as many
//! threads again, so that a flush never waits behind a large read. Offloaded
//! requests run concurrently with the requests after them, and their replies
//! join a later batch ("Replies need not be sent in the same order as
//! requests").
//!
//! Queued work never outlives its connection: when the connection task ends
//! (the client left without `NBD_CMD_DISC`, the stream broke, or the task was
//! dropped at the shutdown deadline) its queued requests are dropped unrun, and
//! `NO_HOLE` write zeroes stop at the next piece. After a shutdown, requests
//! that have not started yet are answered `ESHUTDOWN` instead of run; the ones
//! running finish and reply.
//!
//! Why not a thread per request: a hand-off between threads is a futex wake-up
//! and two context switches, which cost several times more server CPU than the
//! 4 KiB request itself. Measured on the encrypted volume with fio (nbd engine,
//! QD32, 2 cores): 4 KiB random reads cost 24 to 44 µs of server CPU each when
//! every request goes through the worker queue, and 7 to 9 µs on the task. A
//! 1 MiB request costs hundreds of µs on its own, so the hand-off is noise; on a
//! worker its crypto overlaps the socket I/O of the others and a slow one never
//! holds up the small requests behind it. An export whose reads may wait on slow
//! media can set [`ServerConfig::inline_requests`] to false: every request then
//! goes through the worker queue.
//!
//! Reply buffers of offloaded requests are recycled through a server-wide pool
//! of bounded size, and a large reply is written from the worker's buffer rather
//! than copied into the batch.
//!
//! Backpressure: requests handed to blocking threads count against the
//! per-connection request and byte limits and the server-wide memory budget,
//! from the moment they are admitted (before a write's payload is read) until
//! their reply has been written to the socket, not merely computed: a client
//! that does not read its replies holds its budget and gets no more. At a limit
//! the task stops reading the socket (beyond at most [`READ_CHUNK`] of input,
//! taken so that a client that leaves is noticed), and never fails a request
//! for it. What a client holds is bounded in time too: a write's payload must
//! arrive within [`ServerConfig::payload_timeout`] of its header being
//! admitted, and each batch of replies must be accepted in full within
//! [`ServerConfig::reply_timeout`]; neither deadline moves when the client
//! makes a little progress. A client that misses one is disconnected, which
//! returns its budget.
//!
//! Block status always runs on the connection's workers (it reads the metadata
//! store), as do the structured reads that consult it to send holes, and it
//! describes at most [`MAX_STATUS_BLOCKS`](validate::MAX_STATUS_BLOCKS) blocks
//! per request: the spec lets the server describe less than was asked, and the
//! cost of the export's answer grows with the blocks it covers. Write zeroes with
//! `NO_HOLE` (which seals real zero blocks) runs in pieces of the maximum
//! request size, each under the same budget as a write of that size, and stops
//! between pieces when the server shuts down.
//!
//! Replies are encoded in full before any of their bytes is written, so a read
//! error is always known before its reply starts: a simple reply never needs the
//! hard disconnect the spec demands for a late error. Data never appears in logs.
//!
//! Each request taken in gets a DEBUG span, `nbd.request`, a child of the
//! connection's span: `op` (`read`, `write`, `flush`, `trim`, `write_zeroes`,
//! `block_status`, `cache`), `handle`, `offset`, `len`, `fua`, and when it
//! ends `outcome` (`ok`, `error`, `refused` by validation, or `dropped` unrun
//! with its connection) and for the last three but `dropped`, `error` (the
//! [`ErrorClass`](crate::ErrorClass) name such as `io` or `no_space`,
//! `shutting_down`, or the refusal's reason). It lasts from admission to
//! the end of the export call, so an offloaded request's time in its queue
//! counts; it is entered while the export runs. Nobody wanting DEBUG spans
//! of this crate, the span is never built: the hot path pays one level check.
//!
//! The code is split by what it owns: `validate` checks request headers
//! (pure functions), `workers` runs requests against the export and owns the
//! per-connection queues of blocking threads, `replies` encodes replies and
//! writes them in batches; this module reads the socket and drives a
//! connection from its first request to its close.
//!
//! [`ServerConfig::inline_requests`]: crate::ServerConfig::inline_requests
//! [`ServerConfig::inline_max_bytes`]: crate::ServerConfig::inline_max_bytes
//! [`ServerConfig::reply_timeout`]: crate::ServerConfig::reply_timeout
//! [`ServerConfig::payload_timeout`]: crate::ServerConfig::payload_timeout

mod replies;
mod validate;
mod workers;

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Span, debug, info, warn};

use crate::handshake::Session;
use crate::limits::{Held, Reservation, Reserving};
use crate::proto::*;
use crate::server::Shared;
use replies::{Replies, WRITE_BATCH, error_reply, no_data_reply};
use validate::{Op, Rules, Verdict, command_name, validate};
use workers::{Conn, Done, Job, QueuedWrite, record_outcome, status_block_size};

/// Oversized or refused writes up to this length have their payload read and
/// discarded so the stream stays in sync; a longer one closes the connection
/// (spec "Block size constraints": a payload "large enough to be deemed a denial
/// of service attack").
const MAX_DRAINED_WRITE: u32 = 256 * 1024 * 1024;
/// Structured reads at least this long that run on a blocking thread consult
/// block status and send holes as `NBD_REPLY_TYPE_OFFSET_HOLE` chunks instead
/// of zero bytes.
const SPARSE_READ_MIN: u32 = 64 * 1024;
/// Input is read in pieces of at least this much free buffer space.
const READ_CHUNK: usize = 256 * 1024;
/// At most this many writes, or this many bytes, run as one batch.
const BATCH_MAX_WRITES: usize = 64;
const BATCH_MAX_BYTES: usize = 256 * 1024;

/// Why the connection task stops taking requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Keep going.
    No,
    /// Finish in-flight requests, write their replies, then close.
    Drain,
    /// Close now: the stream cannot be trusted or written.
    Now,
}

/// Runs the transmission phase until the client disconnects, the server shuts
/// down, or the stream breaks; in-flight requests finish and reply first
/// whenever the socket still works.
pub(crate) async fn serve<R, W>(mut reader: R, writer: W, session: Session, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let max_requests = config.max_in_flight_requests;
    let max_bytes = config.max_in_flight_bytes as u64;
    let max_payload = config.max_request_payload;
    let inline = config.inline_requests;
    let inline_max = u64::from(config.inline_max_bytes);
    let status_block = status_block_size(session.export.as_ref());
    let throttle = session.export.throttle();
    let rules = Rules::new(&session, max_payload);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let conn = Arc::new(Conn::new(
        &session,
        shared.clone(),
        Span::current(),
        done_tx,
    ));
    // However the task ends (returning, or dropped at the shutdown deadline),
    // its queued work goes with it.
    let _closing = CloseOnDrop(conn.clone());
    let shutdown = shared.shutdown.clone();
    let mut shutdown = std::pin::pin!(shutdown.triggered());
    // The export's own switch: it is going away, so this connection drains
    // exactly as at a server shutdown.
    let revoked = conn.revoked.clone();
    let mut revoked = std::pin::pin!(async move {
        match revoked {
            Some(switch) => switch.triggered().await,
            None => std::future::pending().await,
        }
    });

    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Replies {
        writer,
        buf: Vec::with_capacity(WRITE_BATCH),
        riding: Vec::new(),
        held_bytes: 0,
        timeout: config.reply_timeout,
    };
    // Bytes of a refused write payload still to skip, and the reply to send once
    // it is skipped: clients do not expect the reply to a write they are still
    // sending (libnbd reports "no matching cookie").
    let mut skip: u64 = 0;
    let mut after_skip: Vec<u8> = Vec::new();
    // Offloaded requests not yet back from their thread.
    let mut in_flight = 0usize;
    // The share of the memory budget taken for the request at the head of
    // `input` (a write may wait for its payload while holding it), and the wait
    // for it when the budget was short.
    let mut reserved: Option<Reservation> = None;
    let mut acquiring: Option<Reserving> = None;
    // When the payload of the write at the head of `input` must have arrived:
    // set once the write is admitted and waits for it, so a client cannot hold
    // what the write reserved by sending its header alone (or trickling).
    let mut payload_deadline: Option<Instant> = None;
    // Whether the request at the head of `input` has been charged to the
    // export's rate limits, and until when they hold it back.
    let mut charged = false;
    let mut throttled_until: Option<Instant> = None;
    // Whether the limits held that request back: the connection is at its
    // limit, and its requests then run on its own threads.
    let mut held_back = false;
    let mut eof = false;
    // The input left at the last round after end of file (see the loop's end).
    let mut input_at_eof_round = usize::MAX;
    let mut stop = Stop::No;
    // Aligned writes run on this task, held back until the requests queued
    // behind them are seen, to run as one batch; and their bytes.
    let batch_block = u64::from(session.export.block_size().max(1));
    let mut batch: Vec<QueuedWrite> = Vec::new();
    let mut batch_bytes = 0usize;

    'conn: loop {
        // Handle every complete request already received.
        let mut blocked = false;
        while stop == Stop::No {
            if skip > 0 {
                let n = skip.min(input.len() as u64);
                input.advance(n as usize);
                skip -= n;
                if skip > 0 {
                    break;
                }
                out.buf.append(&mut after_skip);
            }
            if input.len() < REQUEST_HEADER_LEN {
                break;
            }
            let header: &[u8; REQUEST_HEADER_LEN] = input[..REQUEST_HEADER_LEN]
                .try_into()
                .expect("the slice is exactly one header long");
            let Some(req) = Request::decode(header) else {
                // A bad magic means the stream is out of sync: nothing after it
                // can be parsed, so hard disconnect ("violation of a mandatory
                // condition").
                warn!("bad request magic; closing");
                stop = Stop::Drain;
                break;
            };
            let verdict = validate(&req, &rules);
            let mut op = match verdict {
                Verdict::Disconnect => {
                    // NBD_CMD_DISC: "The server MUST handle all outstanding requests
                    // ... and close the TCP session".
                    debug!("client requested disconnect");
                    input.advance(REQUEST_HEADER_LEN);
                    stop = Stop::Drain;
                    break;
                }
                Verdict::Done | Verdict::Refuse(..) => {
                    input.advance(REQUEST_HEADER_LEN);
                    log_request(&req);
                    let span = request_span(&conn.span, &req);
                    let reply_to = if req.kind == CMD_WRITE && req.len > 0 {
                        if req.len > MAX_DRAINED_WRITE {
                            warn!(
                                len = req.len,
                                "refused write payload too large to skip; closing"
                            );
                            span.record("outcome", "refused");
                            span.record("error", "payload too large to skip");
                            stop = Stop::Drain;
                            break;
                        }
                        skip = u64::from(req.len);
                        &mut after_skip
                    } else {
                        &mut out.buf
                    };
                    match verdict {
                        Verdict::Refuse(error, message) => {
                            debug!(handle = req.handle, error, message, "request refused");
                            span.record("outcome", "refused");
                            span.record("error", message);
                            error_reply(session.structured, req.handle, error, message, reply_to);
                        }
                        _ => {
                            record_outcome(&span, Ok(()));
                            no_data_reply(session.structured, req.kind, req.handle, reply_to);
                        }
                    }
                    continue;
                }
                Verdict::Run(op) => op,
            };
            let payload = if req.kind == CMD_WRITE {
                req.len as usize
            } else {
                0
            };
            // Rate limits come first: a request they hold back holds no
            // memory, and its connection stops reading meanwhile.
            if let Some(throttle) = &throttle {
                if !charged && throttle.is_limited() {
                    charged = true;
                    let now = Instant::now();
                    let at =
                        Instant::from_std(throttle.admit(now.into_std(), op.rate_bytes(payload)));
                    if at > now {
                        throttled_until = Some(at);
                        held_back = true;
                    }
                }
                if let Some(at) = throttled_until {
                    if Instant::now() < at {
                        blocked = true;
                        break;
                    }
                    throttled_until = None;
                }
            }
            // Block status reads the metadata store: never on the runtime's
            // threads; nor does a write the export says may block (one that
            // would commit a backlog of mappings before returning).
            // Nor does a request its rate limits held back: a connection at
            // its limit keeps its work on its own threads, away from the
            // runtime's threads every other connection shares.
            let offload = !inline
                || held_back
                || matches!(op, Op::Flush | Op::BlockStatus { .. })
                || op.fua()
                || op.weight(payload) > inline_max
                || (matches!(
                    op,
                    Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
                ) && session.export.write_may_block());
            if let Op::Read {
                len, df, sparse, ..
            } = &mut op
            {
                // Sending holes asks the export for block status, which may
                // wait on the metadata store: only on a blocking thread.
                *sparse = offload && session.structured && !*df && *len >= SPARSE_READ_MIN;
            }
            let cost = op.cost(payload, max_payload, status_block);
            if offload {
                // Backpressure: a request larger than the connection's byte limit
                // still runs, alone.
                let fits = out.held_bytes == 0 || out.held_bytes + cost <= max_bytes;
                if in_flight >= max_requests || !fits {
                    blocked = true;
                    break;
                }
                // The budget (the tenant's share, then the server's) is taken
                // before a write's payload is read into memory. When it is
                // short, the request waits in line (first come, first served)
                // and this connection stops reading.
                if cost > 0 && reserved.is_none() {
                    if acquiring.is_none() {
                        match shared.limits.reserve(session.slot.as_ref(), cost) {
                            Ok(reservation) => reserved = Some(reservation),
                            Err(wait) => acquiring = Some(wait),
                        }
                    }
                    if reserved.is_none() {
                        blocked = true;
                        break;
                    }
                }
            }
            if input.len() < REQUEST_HEADER_LEN + payload {
                // Wait for the rest of the write payload, not forever.
                input.reserve(REQUEST_HEADER_LEN + payload - input.len());
                payload_deadline.get_or_insert_with(|| Instant::now() + config.payload_timeout);
                break;
            }
            payload_deadline = None;
            charged = false;
            held_back = false;
            input.advance(REQUEST_HEADER_LEN);
            log_request(&req);
            let span = request_span(&conn.span, &req);
            let op = match op {
                Op::Write { offset, fua, .. } => {
                    let data = input.split_to(payload).freeze();
                    if offload {
                        // The payload's allocation must go when the request does,
                        // not live on under the bytes read after it.
                        let rest =
                            std::mem::replace(&mut input, BytesMut::with_capacity(READ_CHUNK));
                        input.extend_from_slice(&rest);
                    }
                    Op::Write { offset, data, fua }
                }
                op => op,
            };
            if !offload
                && let Op::Write {
                    offset,
                    data,
                    fua: false,
                } = &op
                && !data.is_empty()
                && offset.is_multiple_of(batch_block)
                && (data.len() as u64).is_multiple_of(batch_block)
            {
                // Held back for the writes queued behind it (see `QueuedWrite`).
                batch_bytes += data.len();
                batch.push(QueuedWrite {
                    handle: req.handle,
                    offset: *offset,
                    data: data.clone(),
                    span,
                });
                if batch.len() >= BATCH_MAX_WRITES || batch_bytes >= BATCH_MAX_BYTES {
                    batch_bytes = 0;
                    conn.execute_writes(&mut batch, &mut out.buf);
                    if out.buf.len() >= WRITE_BATCH && !out.flush(&conn).await {
                        stop = Stop::Now;
                        break;
                    }
                }
                continue;
            }
            // Whatever runs next, the writes held back run first.
            if !batch.is_empty() {
                batch_bytes = 0;
                conn.execute_writes(&mut batch, &mut out.buf);
            }
            // Handed to a blocking thread with the budget it holds, or run here.
            let mut hand_over = offload.then(|| reserved.take());
            let mut answered = false;
            if !offload && let Op::Read { offset, len, .. } = op {
                answered = conn.read_in_place(req.handle, offset, len, &span, &mut out.buf);
                // A read that would wait for the disk goes to a blocking
                // thread, not the task every connection of this runtime
                // thread shares, when there is room for it now.
                if !answered
                    && in_flight < max_requests
                    && (out.held_bytes == 0 || out.held_bytes + cost <= max_bytes)
                    && let Ok(reservation) = shared.limits.reserve(session.slot.as_ref(), cost)
                {
                    hand_over = Some(Some(reservation));
                }
            }
            if let Some(reservation) = hand_over {
                in_flight += 1;
                out.held_bytes += cost;
                conn.offload(Job {
                    handle: req.handle,
                    op,
                    held: Held {
                        bytes: cost,
                        _reservation: reservation,
                    },
                    span,
                });
            } else {
                if !answered {
                    // Not a read, or a read that would wait with no room to
                    // hand it over now: it runs here, as every read did
                    // before.
                    conn.execute(req.handle, op, &span, &mut out.buf);
                }
                drop(span);
                if out.buf.len() >= WRITE_BATCH && !out.flush(&conn).await {
                    stop = Stop::Now;
                    break;
                }
            }
        }
        // The writes held back for a batch run before anything waits.
        if !batch.is_empty() {
            batch_bytes = 0;
            conn.execute_writes(&mut batch, &mut out.buf);
        }
        if stop != Stop::No {
            // No new request will be admitted: give back what was set aside.
            reserved = None;
            acquiring = None;
            throttled_until = None;
        }
        // Collect whatever offloaded requests have finished meanwhile.
        let held_before = out.held_bytes;
        while stop != Stop::Now
            && let Ok(done) = done_rx.try_recv()
        {
            in_flight -= 1;
            if !out.absorb(done, &conn).await {
                stop = Stop::Now;
            }
        }
        // Every reply of this batch goes out before we wait for more input; only
        // then is the budget its requests held given back.
        if stop != Stop::Now && !out.buf.is_empty() && !out.flush(&conn).await {
            stop = Stop::Now;
        }
        let drained = in_flight == 0 && acquiring.is_none() && throttled_until.is_none();
        if stop == Stop::Now || (stop == Stop::Drain && drained) {
            break 'conn;
        }
        if eof && drained {
            // The client closed its side after a disconnect request: the
            // requests before it (held back by a limit until now) still run,
            // as long as each round takes some of them in; a request whose
            // payload never came ends the connection.
            if input.len() >= REQUEST_HEADER_LEN && input.len() != input_at_eof_round {
                input_at_eof_round = input.len();
                continue;
            }
            break 'conn;
        }
        if blocked && (out.held_bytes < held_before || reserved.is_some()) {
            // Room in the budget again: take the waiting requests first.
            continue;
        }
        // At a limit, stop reading: a finished request or the budget frees room.
        // (Then something is in flight or awaited, so the select below always
        // has a branch to wait on.) Up to READ_CHUNK of input is still taken
        // in meanwhile, so that a client that leaves is noticed, and its
        // queued work dropped, without waiting for that work.
        let reading = stop == Stop::No && !eof && !blocked;
        let peeking = stop == Stop::No && !eof && blocked && input.len() < READ_CHUNK;
        if (reading || peeking) && input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        let read_limit = if reading {
            u64::MAX
        } else {
            (READ_CHUNK - input.len().min(READ_CHUNK)) as u64
        };
        tokio::select! {
            biased;
            _ = &mut shutdown, if stop == Stop::No => {
                debug!("server shutting down");
                stop = Stop::Drain;
            }
            _ = &mut revoked, if stop == Stop::No => {
                info!("export revoked by its owner; closing the connection");
                stop = Stop::Drain;
            }
            done = done_rx.recv(), if in_flight > 0 => {
                let done = done.expect("the connection holds a sender, so the channel is open");
                in_flight -= 1;
                if !out.absorb(done, &conn).await {
                    stop = Stop::Now;
                }
            }
            reservation = async {
                match acquiring.as_mut() {
                    Some(wait) => wait.await,
                    None => std::future::pending().await,
                }
            }, if acquiring.is_some() => {
                acquiring = None;
                reserved = Some(reservation);
            }
            _ = async {
                match throttled_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if throttled_until.is_some() => {
                // The rate limits let the waiting request through: the loop
                // takes it in.
            }
            _ = async {
                match payload_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            }, if reading && payload_deadline.is_some() => {
                warn!(
                    timeout_secs = config.payload_timeout.as_secs_f64(),
                    "client did not send a write payload within the payload timeout; closing"
                );
                // What the write reserved is given back at once; earlier
                // requests still finish and reply.
                stop = Stop::Drain;
            }
            read = async { (&mut reader).take(read_limit).read_buf(&mut input).await },
                if reading || peeking => match read {
                Ok(0) if disconnect_pending(&input, skip) => {
                    // The requests before NBD_CMD_DISC are still handled.
                    debug!("client closed its side after a disconnect request");
                    eof = true;
                }
                Ok(0) => {
                    // Gone without NBD_CMD_DISC (a hard disconnect): no reply is
                    // owed, so what it queued is dropped rather than run.
                    debug!("client closed the connection");
                    stop = Stop::Now;
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "read failed");
                    stop = Stop::Now;
                }
            },
        }
    }
    if stop != Stop::Now {
        // An orderly close: TLS close_notify, then FIN.
        let closed = tokio::time::timeout(out.timeout, out.writer.shutdown()).await;
        if let Ok(Err(e)) = closed {
            debug!(error = %e, "closing the connection failed");
        }
    }
}

/// Whether the unread requests in `input` (after `skip` bytes of a refused
/// write's payload) include `NBD_CMD_DISC`.
fn disconnect_pending(input: &[u8], skip: u64) -> bool {
    let mut rest = &input[(skip.min(input.len() as u64)) as usize..];
    while let Some(header) = rest.first_chunk::<REQUEST_HEADER_LEN>() {
        let Some(req) = Request::decode(header) else {
            return false;
        };
        if req.kind == CMD_DISC {
            return true;
        }
        let payload = if req.kind == CMD_WRITE {
            req.len as usize
        } else {
            0
        };
        let Some(next) = rest.get(REQUEST_HEADER_LEN + payload..) else {
            return false;
        };
        rest = next;
    }
    false
}

/// Closes a connection's [`Conn`] when the connection task ends or is dropped.
struct CloseOnDrop(Arc<Conn>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The span of one request taken in, a child of the connection's `conn` span
/// (see the module docs). A disabled span (nobody wants DEBUG spans here)
/// costs nothing to build, carry or record into.
fn request_span(conn: &Span, req: &Request) -> Span {
    tracing::debug_span!(
        parent: conn,
        "nbd.request",
        op = command_name(req.kind),
        handle = req.handle,
        offset = req.offset,
        len = req.len,
        fua = req.flags & CMD_FLAG_FUA != 0,
        outcome = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// One debug line per request taken in (filtered out at the call site unless
/// debug is on for this module).
fn log_request(req: &Request) {
    debug!(
        handle = req.handle,
        command = command_name(req.kind),
        flags = req.flags,
        offset = req.offset,
        len = req.len,
        "request"
    );
}
