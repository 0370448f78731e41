//! The admin API's streamed replies: a backup file or the store's
//! catalogue as the response body (`application/octet-stream`), and a
//! restore's progress as JSON lines (`application/x-ndjson`). Both are produced on a blocking thread and
//! reach the connection through a bounded channel of [`DEPTH`] chunks of at
//! most [`CHUNK`] bytes: the server holds at most a few MiB per stream, a
//! slow reader holds the producer back, and a reader that goes away stops it
//! (its next write fails).
//!
//! The response head waits until the operation has begun: a backup's first
//! progress report (after the snapshot and its extents were found, with the
//! number of blocks to come in [`BLOCKS_HEADER`]) or first bytes, a
//! restore's first restored blocks. An operation refused before that gets
//! the ordinary JSON error and status. After the head:
//!
//! - a backup that fails ends its body abruptly (the chunked encoding never
//!   gets its last chunk): the client sees a broken body, and a backup file
//!   without its trailer, which the codec refuses anyway;
//! - a catalogue likewise; one that succeeds ends with the HTTP trailer
//!   [`CATALOG_TRAILER`] (its summary as JSON), sent to clients that ask for
//!   trailers (`TE: trailers`), as the CLI does;
//! - a restore always ends with one JSON line: `{"done": Restore}`, or
//!   `{"error": {...}, "status": N}`.

use std::cell::Cell;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::HeaderMap;
use hyper::body::{Body, Frame};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue, TRAILER};
use hyper::{Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

use super::api::{ApiError, ErrorBody, ErrorFields, Op, Reply};
use super::backup::OpIo;
use super::service::{Caller, Dispatch};

/// Bytes per chunk of a streamed body.
pub(crate) const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the producer and the connection.
pub(crate) const DEPTH: usize = 8;
/// The response header that gives the number of blocks a backup stream
/// holds, for a progress bar.
pub(crate) const BLOCKS_HEADER: &str = "blockseal-blocks";
/// The HTTP trailer that carries the summary of a catalogue stream
/// (`CatalogView` as JSON), once the catalogue is complete.
pub(crate) const CATALOG_TRAILER: &str = "blockseal-catalog";
/// The content type of a restore's progress lines.
pub(crate) const NDJSON: &str = "application/x-ndjson";
/// Least time between two progress lines of a restore.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Every admin reply body: a whole JSON document, or a stream.
pub(crate) type AdminBody = Either<Full<Bytes>, ChannelBody>;

/// One piece of a stream.
enum Piece {
    Data(Bytes),
    /// The stream's trailer fields (the stream is complete).
    Trailers(HeaderMap),
    /// The stream is complete.
    End,
    /// The producer failed after the head was sent.
    Fail(String),
}

/// A response body fed by a producer thread; it ends cleanly only when the
/// producer says it is complete, and with an error otherwise (also when the
/// producer vanished without a word).
pub(crate) struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    done: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let piece = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(piece) => piece,
        };
        Poll::Ready(match piece {
            Some(Piece::Data(bytes)) => Some(Ok(Frame::data(bytes))),
            Some(Piece::Trailers(fields)) => {
                // Trailers are a body's last frame.
                self.done = true;
                Some(Ok(Frame::trailers(fields)))
            }
            Some(Piece::End) => {
                self.done = true;
                None
            }
            Some(Piece::Fail(why)) => {
                self.done = true;
                Some(Err(io::Error::other(why)))
            }
            None => {
                self.done = true;
                Some(Err(io::Error::other(
                    "the operation stopped without finishing",
                )))
            }
        })
    }
}

/// What the producer tells the handler before any byte of the body.
enum Head {
    /// The stream begins; a backup knows how many blocks it holds.
    Begun { blocks: Option<u64> },
    /// The operation finished before it streamed anything.
    Finished(Box<Reply>),
    /// The operation was refused or failed before it streamed anything.
    Failed(ApiError),
}

/// The head, sent at most once.
struct HeadSlot(Cell<Option<oneshot::Sender<Head>>>);

impl HeadSlot {
    /// Sends `head` if no head was sent yet; whether it did.
    fn send(&self, head: Head) -> bool {
        match self.0.take() {
            Some(tx) => {
                let _ = tx.send(head);
                true
            }
            None => false,
        }
    }

    fn sent(&self) -> bool {
        let tx = self.0.take();
        let sent = tx.is_none();
        self.0.set(tx);
        sent
    }
}

/// The producer's end of a stream: buffers up to [`CHUNK`] bytes, then
/// hands them over (blocking while the channel is full). Sends the head
/// before its first bytes.
struct ChannelWriter<'a> {
    tx: mpsc::Sender<Piece>,
    head: &'a HeadSlot,
    buf: Vec<u8>,
}

impl ChannelWriter<'_> {
    fn send(&mut self, piece: Piece) -> io::Result<()> {
        self.head.send(Head::Begun { blocks: None });
        self.tx.blocking_send(piece).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client stopped reading the stream",
            )
        })
    }

    /// Sends what is buffered, then `trailers` if any, and ends the stream.
    fn finish(mut self, trailers: Option<HeaderMap>) -> io::Result<()> {
        self.flush()?;
        match trailers {
            Some(fields) => self.send(Piece::Trailers(fields)),
            None => self.send(Piece::End),
        }
    }
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.send(Piece::Data(Bytes::from(chunk)))
    }
}

/// Answers [`Op::CreateBackup`]: the backup file as the response body.
pub(crate) async fn backup(
    service: Arc<dyn Dispatch>,
    caller: Caller,
    op: Op,
    error_response: fn(&ApiError) -> Response<AdminBody>,
) -> Response<AdminBody> {
    octet_stream(service, caller, op, error_response, None).await
}

/// Answers [`Op::BackupStore`]: the catalogue as the response body, its
/// summary in the trailer [`CATALOG_TRAILER`].
pub(crate) async fn catalog(
    service: Arc<dyn Dispatch>,
    caller: Caller,
    op: Op,
    error_response: fn(&ApiError) -> Response<AdminBody>,
) -> Response<AdminBody> {
    octet_stream(
        service,
        caller,
        op,
        error_response,
        Some(Trailer {
            name: HeaderName::from_static(CATALOG_TRAILER),
            value: |reply| match reply {
                Reply::StoreBackedUp(view) => serde_json::to_string(view).ok(),
                _ => None,
            },
        }),
    )
    .await
}

/// A trailer field a stream ends with: its name, and its value made from
/// the operation's reply.
struct Trailer {
    name: HeaderName,
    value: fn(&Reply) -> Option<String>,
}

/// An operation's output as the response body, and `trailer` after it if
/// the operation succeeds.
async fn octet_stream(
    service: Arc<dyn Dispatch>,
    caller: Caller,
    op: Op,
    error_response: fn(&ApiError) -> Response<AdminBody>,
    trailer: Option<Trailer>,
) -> Response<AdminBody> {
    let trailer_name = trailer.as_ref().map(|t| t.name.clone());
    let op_action = op.action();
    let (tx, rx) = mpsc::channel(DEPTH);
    let (head_tx, head_rx) = oneshot::channel();
    // The operation's span is a child of the request's.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let head = HeadSlot(Cell::new(Some(head_tx)));
        let mut writer = ChannelWriter {
            tx: tx.clone(),
            head: &head,
            buf: Vec::with_capacity(CHUNK),
        };
        let mut progress = |_done, total: Option<u64>| {
            head.send(Head::Begun { blocks: total });
        };
        let result = service.run_with(
            &caller,
            &op,
            &mut OpIo {
                out: Some(&mut writer),
                progress: Some(&mut progress),
            },
        );
        let result = result.and_then(|reply| {
            let fields = match &trailer {
                Some(t) => {
                    let value = (t.value)(&reply)
                        .and_then(|v| HeaderValue::from_str(&v).ok())
                        .ok_or_else(|| {
                            ApiError::internal("the stream's summary does not encode")
                        })?;
                    let mut fields = HeaderMap::new();
                    fields.insert(t.name.clone(), value);
                    Some(fields)
                }
                None => None,
            };
            writer
                .finish(fields)
                .map_err(|e| ApiError::internal(format!("the stream failed: {e}")))
        });
        if let Err(e) = result
            && !head.send(Head::Failed(e.clone()))
        {
            let _ = tx.blocking_send(Piece::Fail(e.message));
        }
    });
    match head_rx.await {
        Ok(Head::Begun { blocks }) => {
            let mut response = Response::new(Either::Right(ChannelBody { rx, done: false }));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Some(blocks) = blocks {
                headers.insert(BLOCKS_HEADER, HeaderValue::from(blocks));
            }
            if let Some(name) = trailer_name {
                // Announced, or the connection leaves the trailer out.
                headers.insert(TRAILER, HeaderValue::from(name));
            }
            response
        }
        Ok(Head::Failed(e)) => error_response(&e),
        Ok(Head::Finished(_)) | Err(_) => error_response(&ApiError::internal(format!(
            "{} ended before it wrote anything",
            op_action
        ))),
    }
}

/// Answers [`Op::Restore`]: its progress as JSON lines, then its outcome;
/// or, when it is over before it restored a block, the ordinary reply.
pub(crate) async fn restore(
    service: Arc<dyn Dispatch>,
    caller: Caller,
    op: Op,
    json_response: fn(StatusCode, Vec<u8>) -> Response<AdminBody>,
    error_response: fn(&ApiError) -> Response<AdminBody>,
) -> Response<AdminBody> {
    let (tx, rx) = mpsc::channel(DEPTH);
    let (head_tx, head_rx) = oneshot::channel();
    let status = Reply::status(&op);
    // The operation's span is a child of the request's.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let head = HeadSlot(Cell::new(Some(head_tx)));
        let mut last: Option<Instant> = None;
        // A client that went away does not stop the restore: it finishes
        // (or fails and leaves nothing) as it would offline.
        let line = |value: serde_json::Value| {
            let mut text = value.to_string();
            text.push('\n');
            let _ = tx.blocking_send(Piece::Data(Bytes::from(text)));
        };
        let mut progress = |done: u64, _total: Option<u64>| {
            if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                return;
            }
            last = Some(Instant::now());
            head.send(Head::Begun { blocks: None });
            line(serde_json::json!({ "progress": { "blocks": done } }));
        };
        let result = service.run_with(
            &caller,
            &op,
            &mut OpIo {
                out: None,
                progress: Some(&mut progress),
            },
        );
        if !head.sent() {
            head.send(match result {
                Ok(reply) => Head::Finished(Box::new(reply)),
                Err(e) => Head::Failed(e),
            });
            return;
        }
        match result {
            Ok(reply) => {
                let json: serde_json::Value =
                    serde_json::from_slice(&reply.to_json()).unwrap_or_default();
                line(serde_json::json!({ "done": json }));
            }
            Err(e) => {
                let body = ErrorBody {
                    error: ErrorFields {
                        code: e.code.clone(),
                        message: e.message.clone(),
                    },
                };
                let mut json = serde_json::to_value(&body).unwrap_or_default();
                json["status"] = e.status.as_u16().into();
                line(json);
            }
        }
        let _ = tx.blocking_send(Piece::End);
    });
    match head_rx.await {
        Ok(Head::Begun { .. }) => {
            let mut response = Response::new(Either::Right(ChannelBody { rx, done: false }));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
            response
        }
        Ok(Head::Finished(reply)) => json_response(status, reply.to_json()),
        Ok(Head::Failed(e)) => error_response(&e),
        Err(_) => error_response(&ApiError::internal("the restore failed")),
    }
}
