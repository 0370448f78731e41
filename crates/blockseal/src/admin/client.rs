//! The CLI's side of the admin API: one request over the admin Unix socket.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
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
        tokio::time::timeout(REPLY_TIMEOUT, exchange(stream, op))
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Transport(anyhow::anyhow!(
                    "the server did not answer within {}s",
                    REPLY_TIMEOUT.as_secs()
                )))
            })
    })
}

async fn exchange(stream: UnixStream, op: &Op) -> Result<Reply, CallError> {
    let transport = |what: &'static str| {
        move |e: hyper::Error| CallError::Transport(anyhow::Error::new(e).context(what))
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(transport("admin API handshake failed"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = op.to_request();
    let mut builder = Request::builder()
        .method(request.method)
        .uri(request.path)
        .header(HOST, "localhost");
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
    let response = sender
        .send_request(request)
        .await
        .map_err(transport("the admin request failed"))?;
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
    Err(CallError::Api(
        match serde_json::from_slice::<ErrorBody>(&body) {
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
        },
    ))
}
