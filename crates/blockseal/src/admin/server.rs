//! The admin API's HTTP/1.1 server: on the admin Unix socket, and optionally on
//! TCP with TLS and admin client certificates.
//!
//! The socket is created mode 0600 in the store directory, so only its owner
//! (and root) can connect at all; on top of that, each connection's peer
//! credentials (`SO_PEERCRED`) are checked against the server's own uid and
//! root, and the peer's uid is the caller's identity in the audit log. A
//! refused peer gets `403` and the connection is closed; the refusal is
//! audited once per connection.
//!
//! Each request is an `admin.request` span (INFO): `method`, `path` (its
//! first 200 characters), `actor`, and the response's `status`; the operation
//! it runs is that span's child (`admin`, see `service`), on whichever thread
//! it runs.
//!
//! Resource limits: at most [`MAX_CONNECTIONS`] admin connections at once (more
//! wait in the listen queue), request headers within [`HEADER_TIMEOUT`] and at
//! most 16 KiB, bodies at most [`MAX_BODY_BYTES`]. Operations run on blocking
//! threads, never on the runtime's. A backup, the store's catalogue and a
//! restore answer with a stream ([`super::stream`]) instead of one JSON
//! document.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use zeroize::Zeroizing;

use super::api::{ApiError, MAX_BODY_BYTES, Op, Reply};
use super::service::{Caller, Dispatch};
use super::stream::{self, AdminBody};
use blockseal_nbd::{Shutdown, TlsConfig};

/// Admin connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Time a client gets to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Characters of a refused request's path kept in the audit log.
const MAX_AUDITED_PATH: usize = 200;
/// Largest request head.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Who may use the admin socket.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Peers whose uid is one of these are admins.
    pub(crate) admin_uids: Vec<u32>,
}

impl Policy {
    /// The server's own uid, and root.
    pub(crate) fn owner_and_root() -> Policy {
        let own = rustix::process::geteuid().as_raw();
        let mut admin_uids = vec![own];
        if own != 0 {
            admin_uids.push(0);
        }
        Policy { admin_uids }
    }
}

/// Serves the admin API on `listener` until `shutdown` triggers.
pub(crate) async fn serve_unix(
    listener: UnixListener,
    service: Arc<dyn Dispatch>,
    policy: Policy,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some((permit, (stream, _))) =
            accept_in_slot(&slots, &shutdown, "admin socket", || listener.accept()).await?
        else {
            return Ok(());
        };
        let (caller, allowed) = match stream.peer_cred() {
            Ok(cred) => (
                Caller {
                    actor: format!("uid:{}", cred.uid()),
                },
                policy.admin_uids.contains(&cred.uid()),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: cannot read the peer's credentials; refusing");
                (
                    Caller {
                        actor: "uid:unknown".to_owned(),
                    },
                    false,
                )
            }
        };
        spawn_connection(
            stream,
            service.clone(),
            caller,
            allowed,
            shutdown.clone(),
            permit,
        );
    }
}

/// Serves the admin API over TLS on `listener` until `shutdown` triggers. The
/// client must present a certificate from the configured CA that names an
/// administrator (`blockseal:admin:<name>`); one that names a tenant, or no
/// administrator, gets `403` for every request, and the refusal is audited.
pub(crate) async fn serve_tls(
    listener: TcpListener,
    tls: TlsConfig,
    service: Arc<dyn Dispatch>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some((permit, (tcp, peer))) =
            accept_in_slot(&slots, &shutdown, "admin TCP", || listener.accept()).await?
        else {
            return Ok(());
        };
        let tls = tls.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        // The handshake runs in the connection's own task, bounded in time, so
        // a slow client holds only its slot.
        tokio::spawn(async move {
            let accepted = tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await;
            let (stream, leaf) = match accepted {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "admin TLS handshake timed out");
                    return;
                }
            };
            let (caller, allowed) = match blockseal_nbd::client_admin(leaf.as_ref()) {
                Ok(name) => (
                    Caller {
                        actor: format!("cert:{name}"),
                    },
                    true,
                ),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "admin client certificate refused");
                    (
                        Caller {
                            actor: format!("cert:refused({peer})"),
                        },
                        false,
                    )
                }
            };
            spawn_connection(stream, service, caller, allowed, shutdown, permit);
        });
    }
}

/// Waits for a free connection slot, then for a connection `accept` gives;
/// `None` once `shutdown` triggers. Transient accept errors (such as running
/// out of descriptors) are retried after a pause; others end the listener.
pub(crate) async fn accept_in_slot<T, F, Fut>(
    slots: &Arc<Semaphore>,
    shutdown: &Shutdown,
    what: &str,
    mut accept: F,
) -> std::io::Result<Option<(OwnedSemaphorePermit, T)>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let permit = tokio::select! {
        _ = shutdown.triggered() => return Ok(None),
        permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
    };
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return Ok(None),
            accepted = accept() => match accepted {
                Ok(accepted) => return Ok(Some((permit, accepted))),
                Err(e) if blockseal_volume::segment::is_transient(&e) => {
                    tracing::warn!(error = %e, "{what}: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            },
        }
    }
}

/// Serves one admin connection on a task of its own.
fn spawn_connection<IO>(
    stream: IO,
    service: Arc<dyn Dispatch>,
    caller: Caller,
    allowed: bool,
    shutdown: Shutdown,
    permit: OwnedSemaphorePermit,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        // A refused caller is audited once per connection, not per request.
        let audited = Arc::new(AtomicBool::new(false));
        let handler = hyper::service::service_fn(move |request| {
            let service = service.clone();
            let caller = caller.clone();
            let audited = audited.clone();
            async move {
                // A path is the caller's text: only its start goes to the span.
                let path: String = request
                    .uri()
                    .path()
                    .chars()
                    .take(MAX_AUDITED_PATH)
                    .collect();
                let span = tracing::info_span!(
                    "admin.request",
                    method = %request.method(),
                    path,
                    actor = %caller.actor,
                    status = tracing::field::Empty,
                );
                let response = handle(request, &service, caller, allowed, &audited)
                    .instrument(span.clone())
                    .await;
                span.record("status", response.status().as_u16());
                Ok::<_, Infallible>(response)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES.max(8192));
        let connection = builder.serve_connection(TokioIo::new(stream), handler);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            // At shutdown a request being answered still gets its answer (the
            // server waits for running operations before it stops); an idle
            // connection closes at once.
            _ = shutdown.triggered() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, "admin connection ended with an error");
        }
    });
}

/// Answers one request.
async fn handle(
    request: Request<Incoming>,
    service: &Arc<dyn Dispatch>,
    caller: Caller,
    allowed: bool,
    audited: &AtomicBool,
) -> Response<AdminBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    if !allowed {
        if !audited.swap(true, Ordering::Relaxed) {
            let service = service.clone();
            // A path is the caller's text: only its start goes to the log.
            let target: String = path.chars().take(MAX_AUDITED_PATH).collect();
            let actor = caller.clone();
            let _ = tokio::task::spawn_blocking(move || {
                service.audit_denied(
                    &actor,
                    &format!("{method} {target}"),
                    &target,
                    "not an admin",
                );
            })
            .await;
            tracing::warn!(actor = %caller.actor, "admin connection refused: the caller is not an admin");
        }
        let mut response = error_response(&ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} may not use the admin API (on the socket only the server's owner and \
                 root may; over TLS only certificates naming an administrator)",
                caller.actor
            ),
        ));
        // And the connection ends with this answer.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(e) => return error_response(&e),
    };
    let op = match Op::parse(&method, &path, query.as_deref(), &body) {
        Ok(op) => op,
        Err(e) => return error_response(&e),
    };
    drop(body);
    let service = service.clone();
    // Replies that are streamed as the operation produces them.
    match op {
        Op::CreateBackup { .. } => {
            return stream::backup(service, caller, op, error_response).await;
        }
        Op::BackupStore { .. } => {
            return stream::catalog(service, caller, op, error_response).await;
        }
        Op::Restore { .. } => {
            return stream::restore(service, caller, op, json_response, error_response).await;
        }
        _ => {}
    }
    // The operation's span is a child of the request's.
    let span = tracing::Span::current();
    let outcome = tokio::task::spawn_blocking(move || {
        let result = span.in_scope(|| service.run(&caller, &op));
        (op, result)
    })
    .await;
    match outcome {
        Ok((op, Ok(reply))) => json_response(Reply::status(&op), reply.to_json()),
        Ok((_, Err(e))) => error_response(&e),
        Err(e) => error_response(&ApiError::internal(format!("the operation failed: {e}"))),
    }
}

/// The request body, at most [`MAX_BODY_BYTES`], which must be JSON if present.
/// Zeroized when dropped: the master key rotation's body holds a passphrase.
async fn read_body(request: Request<Incoming>) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
    };
    let headers = request.headers();
    if let Some(length) = headers.get(CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    "bad Content-Length",
                )
            })?;
        if length > MAX_BODY_BYTES as u64 {
            return Err(too_large());
        }
    }
    let json_type = headers.get(CONTENT_TYPE).map(|t| {
        t.to_str()
            .is_ok_and(|t| t.split(';').next().unwrap_or("").trim() == "application/json")
    });
    let collected = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("cannot read the request body: {e}"),
                )
            }
        })?;
    let body = Zeroizing::new(collected.to_bytes().to_vec());
    if !body.is_empty() && json_type == Some(false) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies are JSON: Content-Type: application/json",
        ));
    }
    Ok(body)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<AdminBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> Response<AdminBody> {
    json_response(error.status, error.to_json())
}
