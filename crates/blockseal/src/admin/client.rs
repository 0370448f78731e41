//! The CLI's side of the admin API: one request over the admin Unix socket,
//! answered with one JSON document ([`call`]) or with a body read as it
//! arrives ([`open_stream`]).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, TE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::api::{ApiError, ErrorBody, Op, Reply};

/// How long the CLI waits for a reply. Long: deleting a volume waits for its
/// connections to close, and rotating the master key of a large store takes a
/// while.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a call did not produce a reply.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Nothing listens on the socket: no server runs.
    NoServer,
    /// The server answered with an error.
    Api(ApiError),
    /// The exchange itself failed.
    Transport(anyhow::Error),
}

/// How long the CLI waits for the reply to an operation that reads whole
/// backup files (a verification, a drill): as long as reading them takes.
const LONG_REPLY_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long to wait for the reply to `op`.
fn reply_timeout(op: &Op) -> Duration {
    match op {
        Op::VerifyBackups { .. } | Op::DrillBackups { .. } | Op::Restore { .. } => {
            LONG_REPLY_TIMEOUT
        }
        _ => REPLY_TIMEOUT,
    }
}

/// Sends `op` to the server listening on `socket` and returns its reply.
pub(crate) fn call(socket: &Path, op: &Op) -> Result<Reply, CallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CallError::Transport(anyhow::Error::new(e).context("cannot start a runtime"))
        })?;
    runtime.block_on(async {
        let stream = match UnixStream::connect(socket).await {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(CallError::NoServer);
            }
            Err(e) => {
                return Err(CallError::Transport(anyhow::Error::new(e).context(
                    format!("cannot connect to the admin socket {}", socket.display()),
                )));
            }
        };
        let limit = reply_timeout(op);
        tokio::time::timeout(limit, exchange(stream, op))
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Transport(anyhow::anyhow!(
                    "the server did not answer within {}s",
                    limit.as_secs()
                )))
            })
    })
}

fn transport(what: &'static str) -> impl Fn(hyper::Error) -> CallError {
    move |e: hyper::Error| CallError::Transport(anyhow::Error::new(e).context(what))
}

/// Sends `op`'s request on `stream`; the response's head.
async fn send(
    stream: UnixStream,
    op: &Op,
) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(transport("admin API handshake failed"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = op.to_request();
    // Trailers are welcome: a catalogue's summary comes as one.
    let mut builder = Request::builder()
        .method(request.method)
        .uri(request.path)
        .header(HOST, "localhost")
        .header(TE, HeaderValue::from_static("trailers"));
    let body = match request.body {
        Some(body) => {
            builder = builder.header(CONTENT_TYPE, "application/json");
            Bytes::from(body.to_vec())
        }
        None => Bytes::new(),
    };
    let request = builder
        .body(Full::new(body))
        .map_err(|e| CallError::Transport(anyhow::Error::new(e).context("bad admin request")))?;
    sender
        .send_request(request)
        .await
        .map_err(transport("the admin request failed"))
}

async fn exchange(stream: UnixStream, op: &Op) -> Result<Reply, CallError> {
    let response = send(stream, op).await?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(transport("cannot read the admin API's reply"))?
        .to_bytes();
    if status.is_success() {
        return Reply::decode(op, &body).map_err(|e| {
            CallError::Transport(
                anyhow::Error::new(e).context("the server's reply does not decode"),
            )
        });
    }
    Err(CallError::Api(api_error(status, &body)))
}

/// The error an unsuccessful reply carries.
fn api_error(status: StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => ApiError {
            status,
            code: error.error.code,
            message: error.error.message,
        },
        Err(_) => ApiError::new(
            status,
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                "internal"
            } else {
                "unexpected_reply"
            },
            format!(
                "the server answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        ),
    }
}

/// A successful reply whose body is read as it arrives.
pub(crate) struct Streamed {
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: BodyReader,
}

/// What the connection thread hands over.
enum Chunk {
    Data(Bytes),
    /// The body's trailer fields; it ended as HTTP says it should.
    Trailers(hyper::HeaderMap),
    /// The body ended as HTTP says it should.
    End,
    /// The body broke off (the server failed mid-stream, or the connection
    /// dropped).
    Broken(String),
}

/// A streamed body as a blocking [`std::io::Read`]: it ends (`Ok(0)`) only
/// where the body ended cleanly, and fails where it broke off.
pub(crate) struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    current: Bytes,
    ended: bool,
    trailers: Option<hyper::HeaderMap>,
}

impl BodyReader {
    /// The body's trailer fields, once it has ended cleanly with some.
    pub(crate) fn trailers(&self) -> Option<&hyper::HeaderMap> {
        self.trailers.as_ref()
    }
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current.split_to(n));
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(bytes)) => self.current = bytes,
                Some(Chunk::Trailers(fields)) => {
                    self.trailers = Some(fields);
                    self.ended = true;
                }
                Some(Chunk::End) => self.ended = true,
                Some(Chunk::Broken(why)) => {
                    return Err(std::io::Error::other(format!(
                        "the server's stream broke off: {why}"
                    )));
                }
                None => {
                    return Err(std::io::Error::other(
                        "the server's stream broke off: the connection ended",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
impl BodyReader {
    /// A body made of `chunks` that ends cleanly when `complete`, and
    /// breaks off after them otherwise.
    pub(crate) fn of(chunks: Vec<Bytes>, complete: bool) -> BodyReader {
        BodyReader::with_trailers(chunks, complete, None)
    }

    /// [`BodyReader::of`], ending with `trailers` when complete.
    pub(crate) fn with_trailers(
        chunks: Vec<Bytes>,
        complete: bool,
        trailers: Option<hyper::HeaderMap>,
    ) -> BodyReader {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len() + 1);
        for chunk in chunks {
            tx.try_send(Chunk::Data(chunk))
                .expect("the channel holds every chunk");
        }
        if complete {
            let last = match trailers {
                Some(fields) => Chunk::Trailers(fields),
                None => Chunk::End,
            };
            tx.try_send(last).expect("the channel has room");
        } else {
            tx.try_send(Chunk::Broken("connection reset".to_owned()))
                .expect("the channel has room");
        }
        BodyReader {
            rx,
            current: Bytes::new(),
            ended: false,
            trailers: None,
        }
    }
}

/// Sends `op` to the server on `socket` and returns the reply's head, with
/// a reader of its body, once the head has arrived; an unsuccessful reply
/// is returned as [`CallError::Api`]. The body is read on a thread of its
/// own, a few chunks ahead of the reader at most.
pub(crate) fn open_stream(socket: &Path, op: &Op) -> Result<Streamed, CallError> {
    let (head_tx, head_rx) = std::sync::mpsc::sync_channel(1);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let socket = socket.to_owned();
    let op = op.clone();
    std::thread::Builder::new()
        .name("blockseal-admin-stream".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = head_tx.send(Err(CallError::Transport(
                        anyhow::Error::new(e).context("cannot start a runtime"),
                    )));
                    return;
                }
            };
            runtime.block_on(receive(&socket, &op, head_tx, tx));
        })
        .map_err(|e| {
            CallError::Transport(anyhow::Error::new(e).context("cannot start a thread"))
        })?;
    let headers = head_rx.recv().map_err(|_| {
        CallError::Transport(anyhow::anyhow!("the admin request failed without a reply"))
    })??;
    Ok(Streamed {
        headers,
        body: BodyReader {
            rx,
            current: Bytes::new(),
            ended: false,
            trailers: None,
        },
    })
}

type Head = Result<hyper::HeaderMap, CallError>;

/// The connection thread of [`open_stream`].
async fn receive(
    socket: &Path,
    op: &Op,
    head: std::sync::mpsc::SyncSender<Head>,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) {
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let _ = head.send(Err(CallError::NoServer));
            return;
        }
        Err(e) => {
            let _ = head.send(Err(CallError::Transport(anyhow::Error::new(e).context(
                format!("cannot connect to the admin socket {}", socket.display()),
            ))));
            return;
        }
    };
    let response = match tokio::time::timeout(REPLY_TIMEOUT, send(stream, op)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            let _ = head.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = head.send(Err(CallError::Transport(anyhow::anyhow!(
                "the server did not answer within {}s",
                REPLY_TIMEOUT.as_secs()
            ))));
            return;
        }
    };
    let status = response.status();
    if !status.is_success() {
        let error = match response.into_body().collect().await {
            Ok(body) => CallError::Api(api_error(status, &body.to_bytes())),
            Err(e) => transport("cannot read the admin API's reply")(e),
        };
        let _ = head.send(Err(error));
        return;
    }
    if head.send(Ok(response.headers().clone())).is_err() {
        return;
    }
    let mut body = response.into_body();
    loop {
        let chunk = match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Chunk::Data(data),
                Err(frame) => match frame.into_trailers() {
                    Ok(fields) => Chunk::Trailers(fields),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => Chunk::Broken(crate::exports::error_chain(&e)),
            None => Chunk::End,
        };
        let last = !matches!(chunk, Chunk::Data(_));
        if tx.send(chunk).await.is_err() || last {
            return;
        }
    }
}
