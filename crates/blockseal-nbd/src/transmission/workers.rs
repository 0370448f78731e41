//! The per-connection workers: requests handed off the connection task run
//! on blocking threads drained from two queues, one for data requests and one
//! for flushes and FUA requests, each with at most `workers_per_connection`
//! threads; and the code that runs one request against the export, on
//! whichever thread.
//!
//! Queued work never outlives its connection: once the connection is closed
//! nothing it queued runs, and the budget the jobs held is given back when they
//! are dropped. A panicking export is answered `EIO`, never left unanswered.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{Span, debug, error};

use super::replies::{
    WRITE_BATCH, block_status_reply, error_reply, export_error_reply, read_reply, read_reply_cached,
};
use super::validate::Op;
use crate::error::{ErrorClass, ExportError, class_name, class_text, errno};
use crate::export::Export;
use crate::handshake::Session;
use crate::limits::Held;
use crate::proto::errno::EIO;
use crate::proto::*;
use crate::server::Shared;

/// What blocking threads need of a connection.
pub(super) struct Conn {
    pub(super) export: Arc<dyn Export>,
    pub(super) name: String,
    pub(super) structured: bool,
    pub(super) shared: Arc<Shared>,
    pub(super) span: Span,
    /// Completed offloaded requests, back to the connection task.
    done: mpsc::UnboundedSender<Done>,
    /// Offloaded requests waiting for a worker, and how many workers drain
    /// them: one lane for data requests, one for flushes and FUA requests
    /// (which wait for the disk), each with at most `max_workers` threads. So a
    /// flush never waits behind a large read, and a client's flushes cannot
    /// take more threads than its reads.
    lanes: [Mutex<Lane>; 2],
    max_workers: usize,
    /// Largest read or write, and the piece size of `NO_HOLE` write zeroes.
    max_payload: u32,
    /// Set when the connection task has ended: nothing it queued is run any
    /// more (no reply is owed to a client that is gone), and `NO_HOLE` write
    /// zeroes stop at the next piece.
    closed: AtomicBool,
    /// The export's revocation switch ([`Export::revoked`]), read once.
    pub(super) revoked: Option<crate::Shutdown>,
}

/// Index in [`Conn::lanes`] of requests that read or write data.
const DATA_LANE: usize = 0;
/// Index in [`Conn::lanes`] of flushes and FUA requests.
const SYNC_LANE: usize = 1;

#[derive(Default)]
struct Lane {
    jobs: VecDeque<Job>,
    /// Workers started and not yet finished.
    workers: usize,
    /// Workers running a job (the others are about to take one or to stop).
    busy: usize,
}

/// A request handed to a blocking thread.
pub(super) struct Job {
    pub(super) handle: u64,
    pub(super) op: Op,
    pub(super) held: Held,
    /// The request's span (disabled unless someone wants it).
    pub(super) span: Span,
}

/// A finished offloaded request: its encoded reply and the budget it holds
/// until that reply is written.
pub(super) struct Done {
    pub(super) reply: Vec<u8>,
    pub(super) held: Held,
}

const LOCK: &str = "the lane locks are never poisoned: nothing under them panics";

impl Conn {
    /// The blocking side of a connection to `session`'s export, which sends
    /// finished requests to `done`.
    pub(super) fn new(
        session: &Session,
        shared: Arc<Shared>,
        span: Span,
        done: mpsc::UnboundedSender<Done>,
    ) -> Conn {
        let config = &shared.config;
        Conn {
            export: session.export.clone(),
            name: session.name.clone(),
            structured: session.structured,
            max_workers: config.workers_per_connection,
            max_payload: config.max_request_payload,
            shared: shared.clone(),
            span,
            done,
            lanes: Default::default(),
            closed: AtomicBool::new(false),
            revoked: session.export.revoked(),
        }
    }

    /// Whether requests not started yet are answered `ESHUTDOWN` rather than
    /// run: the server is shutting down or the export was revoked.
    pub(super) fn stopping(&self) -> bool {
        self.shared.shutdown.is_triggered()
            || self.revoked.as_ref().is_some_and(|r| r.is_triggered())
    }

    /// Hands a request to a blocking thread: it joins its lane's queue, drained
    /// by at most `max_workers` workers that keep going while jobs remain (one
    /// wake-up per burst, not per request).
    pub(super) fn offload(self: &Arc<Self>, job: Job) {
        let lane = if matches!(job.op, Op::Flush) || job.op.fua() {
            SYNC_LANE
        } else {
            DATA_LANE
        };
        let start_worker = {
            let mut q = self.lanes[lane].lock().expect(LOCK);
            q.jobs.push_back(job);
            // A worker busy with an earlier job (perhaps blocked in the export)
            // will not take this one soon: start another unless an idle one will.
            let idle = q.workers - q.busy;
            let start = q.workers < self.max_workers && idle < q.jobs.len();
            if start {
                q.workers += 1;
            }
            start
        };
        if start_worker {
            let conn = self.clone();
            tokio::task::spawn_blocking(move || conn.work(lane));
        }
    }

    /// A worker: runs the jobs queued in `lane` until none is left.
    fn work(&self, lane: usize) {
        loop {
            let job = {
                let mut q = self.lanes[lane].lock().expect(LOCK);
                match q.jobs.pop_front() {
                    Some(job) => {
                        q.busy += 1;
                        job
                    }
                    None => {
                        q.workers -= 1;
                        return;
                    }
                }
            };
            self.run(job);
            self.lanes[lane].lock().expect(LOCK).busy -= 1;
        }
    }

    /// Runs one offloaded job and sends its reply back. Blocking thread.
    fn run(&self, job: Job) {
        if self.is_closed() {
            // Dropping the job gives back the budget it held.
            job.span.record("outcome", "dropped");
            return;
        }
        let mut reply = self.buffer();
        if self.stopping() {
            // Not started before the shutdown: answered at once rather than
            // run, so the connection drains within the shutdown deadline.
            debug!(parent: &self.span, handle = job.handle, "request not started before shutdown");
            record_outcome(&job.span, Err(ErrorClass::ShuttingDown));
            error_reply(
                self.structured,
                job.handle,
                errno(ErrorClass::ShuttingDown),
                class_text(ErrorClass::ShuttingDown),
                &mut reply,
            );
        } else {
            self.execute(job.handle, job.op, &job.span, &mut reply);
        }
        // The span ends with the export call, before the reply waits for
        // its batch.
        drop(job.span);
        // The connection task may be gone with its client; nothing to do then.
        let _ = self.done.send(Done {
            reply,
            held: job.held,
        });
    }

    /// Whether the connection task has ended.
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection closed and drops the requests still queued, which
    /// gives back the budget they held.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for lane in &self.lanes {
            let jobs = std::mem::take(&mut lane.lock().expect(LOCK).jobs);
            for job in &jobs {
                job.span.record("outcome", "dropped");
            }
            drop(jobs);
        }
    }

    /// An empty reply buffer, reused when one is spare.
    pub(super) fn buffer(&self) -> Vec<u8> {
        self.shared.limits.buffers.take(WRITE_BATCH)
    }

    /// Keeps `buf` for reuse, unless it is large or enough are spare already.
    pub(super) fn recycle(&self, buf: Vec<u8>) {
        self.shared.limits.buffers.give(buf);
    }

    /// Runs a request against the export and appends its reply to `out`,
    /// inside the request's `span`, where it records the outcome.
    pub(super) fn execute(&self, handle: u64, op: Op, span: &Span, out: &mut Vec<u8>) {
        let _entered = span.enter();
        let start = out.len();
        // A panicking export must not leave the client waiting forever.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| execute(self, handle, op, out)));
        match run {
            Ok(outcome) => record_outcome(span, outcome),
            Err(_) => self.answer_panic(handle, span, out, start),
        }
    }

    /// Answers `EIO` for a request whose export call panicked, in place of
    /// whatever it had appended to `out` after `start`.
    fn answer_panic(&self, handle: u64, span: &Span, out: &mut Vec<u8>, start: usize) {
        error!(parent: &self.span, export = %self.name, "export panicked");
        out.truncate(start);
        error_reply(self.structured, handle, EIO, "internal server error", out);
        if !span.is_disabled() {
            span.record("outcome", "error");
            span.record("error", "panic");
        }
    }

    /// Runs a read on the connection's task if the export can answer it
    /// without waiting on a device, appending its reply to `out` and
    /// recording its outcome in `span`; `false`, with nothing appended or
    /// recorded, when it would wait (the caller hands it to a blocking thread).
    pub(super) fn read_in_place(
        &self,
        handle: u64,
        offset: u64,
        len: u32,
        span: &Span,
        out: &mut Vec<u8>,
    ) -> bool {
        let _entered = span.enter();
        let start = out.len();
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            read_reply_cached(self, handle, offset, len, out)
        }));
        match run {
            Ok(None) => false,
            Ok(Some(outcome)) => {
                record_outcome(span, outcome);
                true
            }
            Err(_) => {
                self.answer_panic(handle, span, out, start);
                true
            }
        }
    }
}

/// An aligned write run on the connection's task, held back so that the
/// writes queued behind it join it in one [`Export::write_batch`].
pub(super) struct QueuedWrite {
    pub(super) handle: u64,
    pub(super) offset: u64,
    pub(super) data: bytes::Bytes,
    pub(super) span: Span,
}

impl Conn {
    /// Runs the queued writes (emptying `batch`) and appends their replies to
    /// `out`: one alone as any request, several as one batch.
    pub(super) fn execute_writes(&self, batch: &mut Vec<QueuedWrite>, out: &mut Vec<u8>) {
        if batch.len() <= 1 {
            if let Some(w) = batch.pop() {
                let op = Op::Write {
                    offset: w.offset,
                    data: w.data,
                    fua: false,
                };
                self.execute(w.handle, op, &w.span, out);
            }
            return;
        }
        let writes: Vec<(u64, &[u8])> = batch.iter().map(|w| (w.offset, &w.data[..])).collect();
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| self.export.write_batch(&writes)));
        match run {
            Ok(results) if results.len() == batch.len() => {
                for (w, result) in batch.iter().zip(results) {
                    let outcome = match result {
                        Ok(()) => {
                            put_simple_reply(out, 0, w.handle);
                            Ok(())
                        }
                        Err(e) => Err(export_error_reply(
                            self,
                            w.handle,
                            w.offset,
                            w.data.len() as u64,
                            &e,
                            out,
                        )),
                    };
                    record_outcome(&w.span, outcome);
                }
            }
            outcome => {
                match &outcome {
                    Ok(results) => error!(
                        parent: &self.span,
                        export = %self.name,
                        writes = batch.len(),
                        results = results.len(),
                        "export answered a write batch with the wrong number of results"
                    ),
                    Err(_) => error!(parent: &self.span, export = %self.name, "export panicked"),
                }
                let panicked = outcome.is_err();
                for w in batch.iter() {
                    error_reply(self.structured, w.handle, EIO, "internal server error", out);
                    if !w.span.is_disabled() {
                        w.span.record("outcome", "error");
                        w.span
                            .record("error", if panicked { "panic" } else { "internal" });
                    }
                }
            }
        }
        batch.clear();
    }
}

/// Records how a request ended in its span: `outcome` `ok`, or `error` with
/// the error class's name in `error`. Nothing to do for a disabled span.
pub(super) fn record_outcome(span: &Span, outcome: Result<(), ErrorClass>) {
    if span.is_disabled() {
        return;
    }
    match outcome {
        Ok(()) => {
            span.record("outcome", "ok");
        }
        Err(class) => {
            span.record("outcome", "error");
            span.record("error", class_name(class));
        }
    }
}

/// Runs one request against the export and appends its reply to `out`; the
/// error class of a failure, whose reply is then an error.
fn execute(conn: &Conn, handle: u64, op: Op, out: &mut Vec<u8>) -> Result<(), ErrorClass> {
    let export = conn.export.as_ref();
    let (offset, len, result) = match op {
        Op::Read {
            offset,
            len,
            sparse,
            ..
        } => return read_reply(conn, handle, offset, len, sparse, out),
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => return block_status_reply(conn, handle, offset, len, req_one, context, out),
        Op::Write { offset, data, fua } => {
            (offset, data.len() as u64, export.write(offset, &data, fua))
        }
        Op::Flush => (0, 0, export.flush()),
        Op::Trim { offset, len, fua } => (offset, len, export.trim(offset, len, fua)),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: true,
        } => (offset, len, allocated_zeroes(conn, offset, len, fua)),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: false,
        } => (offset, len, export.write_zeroes(offset, len, fua, false)),
        Op::Cache { offset, len } => (offset, len, export.cache(offset, len)),
    };
    match result {
        Ok(()) => {
            put_simple_reply(out, 0, handle);
            Ok(())
        }
        Err(e) => Err(export_error_reply(conn, handle, offset, len, &e, out)),
    }
}

/// `NBD_CMD_WRITE_ZEROES` with `NBD_CMD_FLAG_NO_HOLE`: the export seals real
/// zero blocks, as much work as a write of the same length, so it runs in pieces
/// of at most the maximum request size (the budget the request holds), with
/// boundaries on the export's blocks, and stops with `ESHUTDOWN` between pieces
/// when the server shuts down. FUA is one flush at the end.
fn allocated_zeroes(conn: &Conn, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
    let export = conn.export.as_ref();
    let piece = u64::from(conn.max_payload);
    let block = status_block_size(export);
    let end = offset + len;
    let mut at = offset;
    while at < end {
        if at > offset && conn.is_closed() {
            // Nobody is left to answer.
            return Err(ExportError::new(
                ErrorClass::ShuttingDown,
                "write zeroes stopped: the connection closed",
            ));
        }
        if at > offset && conn.stopping() {
            return Err(ExportError::new(
                ErrorClass::ShuttingDown,
                "write zeroes stopped by shutdown",
            ));
        }
        let mut next = (at + piece).min(end);
        // Pieces end on a block boundary where they can, so only the request's
        // own edges are partial blocks.
        if next < end && next / block * block > at {
            next = next / block * block;
        }
        export.write_zeroes(at, next - at, false, true)?;
        at = next;
    }
    if fua { export.flush() } else { Ok(()) }
}

/// The export's block size as block status and zeroes use it: a power of two
/// from 512 to 65536, or 4096 if the export reports something else.
pub(super) fn status_block_size(export: &dyn Export) -> u64 {
    let bs = export.block_size();
    if bs.is_power_of_two() && (512..=65536).contains(&bs) {
        u64::from(bs)
    } else {
        4096
    }
}
