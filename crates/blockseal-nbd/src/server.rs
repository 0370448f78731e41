//! Listeners, connections and shutdown.
//!
//! A [`Server`] accepts connections on any number of Unix and TCP listeners,
//! gives each a task and a tracing span, runs the handshake under a time
//! limit, and hands the stream to the transmission phase.
//!
//! The connection's span, `nbd` at INFO, is the root of everything the
//! connection does: `conn` (a number unique in the process), `peer`, and once
//! known `tenant` (from the client certificate, or the export name's) and
//! `export`. Each request's span (`nbd.request`, DEBUG, see `transmission`)
//! is its child, so a trace groups a connection's requests. Fields hold
//! names and numbers only, never data or key material.
//!
//! Connections in the handshake hold one of [`ServerConfig::max_handshakes`]
//! slots: past it a new connection is closed at once, unless the oldest
//! handshake has lasted [`ServerConfig::handshake_eviction_age`] (a second),
//! which is then closed instead (a silent peer
//! is cheaper to drop than a client that just arrived). Entering transmission
//! takes a slot of [`ServerConfig::max_connections`] and of
//! [`ServerConfig::max_connections_per_tenant`]. So unauthenticated peers can
//! hold at most `max_handshakes` file descriptors, whatever they do.
//!
//! [`Shutdown::trigger`] stops every accept loop, drops connections still in
//! the handshake, lets running requests finish and reply (queued ones are
//! answered `ESHUTDOWN`), and closes every connection; connections still open
//! after [`ServerConfig::shutdown_timeout`] (a client that does not read its
//! replies) are dropped, with the work they had queued. Then the `serve_*`
//! futures return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::export::{Catalog, Scope};
use crate::handshake::{Negotiation, Outcome, Session, TlsMode};
use crate::limits::{HandshakeSlot, Limits};
use crate::tls::{TlsConfig, client_tenant};
use crate::transmission;

/// Limits and policy of a server. Build with [`Default`] and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Requests one connection may have on blocking threads; past it the server
    /// stops reading that connection until a reply is written. Default 64; at most 65536.
    pub max_in_flight_requests: usize,
    /// Write payload and read data bytes one connection may hold in requests on
    /// blocking threads and in their replies until those are written to the
    /// socket; past it the server stops reading that connection. A request
    /// larger than this runs alone. Default 128 MiB: one largest request and
    /// as much again of others.
    pub max_in_flight_bytes: usize,
    /// Write payload and read data bytes all connections together may hold in
    /// requests on blocking threads and in their replies until those are written
    /// to the socket. A request that does not fit waits (its connection stops
    /// reading) until earlier replies are written; it never fails for it. Raised
    /// to at least `max_request_payload`, so every request fits when the server
    /// is otherwise idle. Default 512 MiB: eight largest requests.
    pub memory_budget: usize,
    /// The most of `memory_budget` the connections to one tenant's exports may
    /// hold together, so that one tenant's slow or hostile clients leave the
    /// rest to the others; its requests past it wait like those past the budget.
    /// `None` (the default): half of `memory_budget` (256 MiB). Clamped to
    /// `max_request_payload ..= memory_budget`; a server with one tenant may set
    /// it to `memory_budget`.
    pub memory_budget_per_tenant: Option<usize>,
    /// Connections in the transmission phase, in total. A client past it gets
    /// `NBD_REP_ERR_POLICY` for `NBD_OPT_GO` (and is closed after
    /// `NBD_OPT_EXPORT_NAME`). Default 256.
    pub max_connections: usize,
    /// Connections in the transmission phase to the exports of one tenant (the
    /// part of the export name before `/`). Default 64.
    pub max_connections_per_tenant: usize,
    /// Connections still in the handshake (not yet authenticated, or not yet
    /// past `NBD_OPT_GO`). Past it a new connection is closed at once, or the
    /// oldest handshake is if it has lasted `handshake_eviction_age`. Default 64.
    pub max_handshakes: usize,
    /// With every handshake slot taken, the oldest connection in the handshake
    /// is closed to make room for a new one once it has been there this long. A
    /// real client finishes its handshake well within it; a peer that holds a
    /// slot longer is the cheaper one to drop, so a flood of silent connections
    /// cannot keep real clients out for the whole handshake timeout. Default 1 s.
    pub handshake_eviction_age: Duration,
    /// After [`Shutdown::trigger`], how long connections may take to finish
    /// their requests and write the replies before they are dropped. Default 10 s.
    pub shutdown_timeout: Duration,
    /// A client must accept each batch of replies written to it (at most about
    /// one largest request, plus up to 256 KiB of small replies) in full within
    /// this long, or its connection is closed and its budget comes back. The
    /// deadline covers the whole batch: a client that reads a few bytes now and
    /// then does not extend it. Default 60 s (64 MiB replies then need about
    /// 1.1 MB/s).
    pub reply_timeout: Duration,
    /// A client must send a write's whole payload within this long of the
    /// server taking in its header (and reserving memory for it), or its
    /// connection is closed and the reservation comes back. Progress does not
    /// extend it. Default 60 s.
    pub payload_timeout: Duration,
    /// Run small reads, writes, trims, zeroes and cache requests directly on the
    /// connection's task (default). The export's methods must then return
    /// quickly (memory, page cache, buffered writes): they hold a runtime thread
    /// while they run. Requests larger than `inline_max_bytes`, block status,
    /// flushes and FUA requests always run on blocking threads, concurrently with
    /// the requests after them. Set to false for an export whose reads may wait
    /// on slow media: every request then runs on blocking threads, at several
    /// times the CPU cost of a small request.
    pub inline_requests: bool,
    /// With `inline_requests` on: reads, writes, trims, zeroes and cache requests
    /// of more than this many bytes run on the connection's workers instead of its
    /// task, so that their crypto overlaps the socket I/O of the others and uses
    /// more than one core. Default 64 KiB.
    pub inline_max_bytes: u32,
    /// Blocking threads that may run one connection's offloaded requests at the
    /// same time, and as many again for its flushes and FUA requests. Default 2.
    pub workers_per_connection: usize,
    /// Largest read or write one request may carry; advertised as the maximum
    /// payload in `NBD_INFO_BLOCK_SIZE`. Default 64 MiB, as nbdkit takes, twice
    /// the spec's interoperability ceiling of 32 MiB, for clients that do not
    /// split requests by the advertised maximum; clamped to 64 KiB ..= 64 MiB.
    pub max_request_payload: u32,
    /// Serve plain TCP (no TLS) on a non-loopback address. Such clients see every
    /// tenant's exports, so this is off by default and only for trusted networks.
    pub insecure_plain_tcp: bool,
    /// Time a client has from connecting to entering transmission. Default 30 s.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight_requests: 64,
            max_in_flight_bytes: 2 * MAX_PAYLOAD as usize,
            memory_budget: 8 * MAX_PAYLOAD as usize,
            memory_budget_per_tenant: None,
            max_connections: 256,
            max_connections_per_tenant: 64,
            max_handshakes: 64,
            handshake_eviction_age: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            payload_timeout: Duration::from_secs(60),
            inline_requests: true,
            inline_max_bytes: 64 * 1024,
            workers_per_connection: 2,
            max_request_payload: MAX_PAYLOAD,
            insecure_plain_tcp: false,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// A tenant's share of the memory budget, in bytes.
    pub(crate) fn tenant_budget(&self) -> usize {
        self.memory_budget_per_tenant
            .unwrap_or(self.memory_budget / 2)
            .min(self.memory_budget)
            .max(self.max_request_payload as usize)
    }
}

/// 2^26, the largest request nbdkit takes. The spec asks clients to stay within
/// 2^25 (33,554,432) bytes unless the server advertises more, and servers not
/// to treat anything up to 2^25 as a denial of service attack ("Size
/// constraints"); some clients ignore the advertised maximum and send more (the
/// reference nbd-tester-client's huge integrity test: 42 MB).
const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

/// The largest memory budget (tokio's semaphore counts at most 2^61 permits).
const MAX_BUDGET: usize = 1 << 60;

/// Why a `serve_*` future could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Plain TCP on a non-loopback address without `insecure_plain_tcp`.
    #[error(
        "refusing plain TCP on non-loopback address {0}: configure TLS or set insecure_plain_tcp"
    )]
    PlainTcpRefused(SocketAddr),
    /// The listener's local address could not be read.
    #[error("cannot read the listener address")]
    LocalAddr(#[source] std::io::Error),
}

/// A cloneable shutdown switch shared by a server's listeners and connections.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A switch that has not been triggered.
    pub fn new() -> Self {
        Shutdown {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Starts the shutdown: stop accepting, finish in-flight requests, close.
    /// Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`trigger`](Shutdown::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the shutdown has been triggered.
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Requests that failed because a block failed authentication.
    pub authentication_failures: u64,
    /// Connections closed at once, or closed in the handshake to make room,
    /// because every handshake slot was taken.
    pub handshakes_refused: u64,
    /// Clients refused entry to transmission by a connection cap.
    pub connections_refused: u64,
    /// Bytes of the memory budget not held by any request now.
    pub memory_budget_available: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    authentication_failures: AtomicU64,
}

impl Stats {
    pub(crate) fn authentication_failure(&self) {
        self.authentication_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// State shared by a server's listeners and connections.
pub(crate) struct Shared {
    pub(crate) catalog: Arc<dyn Catalog>,
    pub(crate) config: ServerConfig,
    pub(crate) shutdown: Shutdown,
    pub(crate) stats: Stats,
    pub(crate) limits: Arc<Limits>,
    next_conn: AtomicU64,
}

/// An NBD server over a [`Catalog`]. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Server {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server over `catalog` with `config` (out-of-range limits are clamped).
    pub fn new(catalog: Arc<dyn Catalog>, mut config: ServerConfig) -> Server {
        config.max_in_flight_requests = config.max_in_flight_requests.clamp(1, 65536);
        config.max_in_flight_bytes = config.max_in_flight_bytes.max(1);
        config.workers_per_connection = config.workers_per_connection.max(1);
        config.max_request_payload = config.max_request_payload.clamp(64 * 1024, MAX_PAYLOAD);
        config.memory_budget = config
            .memory_budget
            .clamp(config.max_request_payload as usize, MAX_BUDGET);
        config.max_connections = config.max_connections.max(1);
        config.max_connections_per_tenant = config.max_connections_per_tenant.max(1);
        config.max_handshakes = config.max_handshakes.max(1);
        config.reply_timeout = config.reply_timeout.max(Duration::from_millis(100));
        config.payload_timeout = config.payload_timeout.max(Duration::from_millis(100));
        Server {
            shared: Arc::new(Shared {
                limits: Arc::new(Limits::new(&config)),
                catalog,
                config,
                shutdown: Shutdown::new(),
                stats: Stats::default(),
                next_conn: AtomicU64::new(1),
            }),
        }
    }

    /// The switch that shuts this server down.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shared.shutdown.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        let s = &self.shared.stats;
        ServerStats {
            connections_accepted: s.accepted.load(Ordering::Relaxed),
            connections_active: s.active.load(Ordering::Relaxed),
            authentication_failures: s.authentication_failures.load(Ordering::Relaxed),
            handshakes_refused: self
                .shared
                .limits
                .refused_handshakes
                .load(Ordering::Relaxed),
            connections_refused: self
                .shared
                .limits
                .refused_connections
                .load(Ordering::Relaxed),
            memory_budget_available: self.shared.limits.budget_available() as u64,
        }
    }

    /// Serves a Unix socket listener until shutdown, then waits for its
    /// connections to close. Clients see every tenant ([`Scope::All`]): access is
    /// controlled by the socket file's permissions. TLS is not offered.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<(), ServeError> {
        let shared = self.shared.clone();
        accept_loop(
            &shared,
            || listener.accept(),
            |stream, _, slot| {
                let peer = match stream.peer_cred() {
                    Ok(cred) => format!(
                        "unix:uid={},pid={}",
                        cred.uid(),
                        cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string())
                    ),
                    Err(_) => "unix".to_owned(),
                };
                (peer, unix_connection(shared.clone(), stream, slot))
            },
        )
        .await;
        Ok(())
    }

    /// Serves a TCP listener until shutdown, then waits for its connections to
    /// close.
    ///
    /// With `tls`, TLS is mandatory (spec FORCEDTLS mode): a client must upgrade
    /// with `NBD_OPT_STARTTLS` and present a certificate that names its tenant,
    /// and then sees only that tenant's exports. Without `tls`, clients see every
    /// tenant, so plain TCP is refused unless the listener is on a loopback address
    /// or [`ServerConfig::insecure_plain_tcp`] is set.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        tls: Option<TlsConfig>,
    ) -> Result<(), ServeError> {
        let local = listener.local_addr().map_err(ServeError::LocalAddr)?;
        if tls.is_none() && !local.ip().is_loopback() && !self.shared.config.insecure_plain_tcp {
            return Err(ServeError::PlainTcpRefused(local));
        }
        let shared = self.shared.clone();
        accept_loop(
            &shared,
            || listener.accept(),
            |stream: TcpStream, peer, slot| {
                // "both the client and server SHOULD disable Nagle's algorithm".
                let _ = stream.set_nodelay(true);
                (
                    peer.to_string(),
                    tcp_connection(shared.clone(), stream, tls.clone(), slot),
                )
            },
        )
        .await;
        Ok(())
    }
}

/// Accepts until shutdown, one task per connection; then waits for them, at
/// most [`ServerConfig::shutdown_timeout`], and drops those still open.
async fn accept_loop<S, A, AF, P, C>(shared: &Arc<Shared>, mut accept: A, mut start: C)
where
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<(S, P)>>,
    C: FnMut(S, P, HandshakeSlot) -> (String, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
{
    let mut connections = JoinSet::new();
    // Accept errors since the last accepted connection.
    let mut failures = 0u32;
    let shutdown = shared.shutdown.clone();
    let mut triggered = std::pin::pin!(shutdown.triggered());
    loop {
        tokio::select! {
            biased;
            _ = &mut triggered => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    error!(error = %e, "connection task failed");
                }
            }
            accepted = accept() => match accepted {
                Ok((stream, peer)) => {
                    failures = 0;
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = shared.limits.enter_handshake(id) else {
                        // Closed at once: an unauthenticated peer holds no
                        // descriptor past the handshake cap.
                        refused_handshake(shared, "the new one");
                        drop(stream);
                        continue;
                    };
                    let (peer, connection) = start(stream, peer, slot);
                    let span = info_span!(
                        "nbd",
                        conn = id,
                        peer = %peer,
                        tenant = tracing::field::Empty,
                        export = tracing::field::Empty,
                    );
                    let active = ActiveConnection::enter(shared.clone());
                    connections.spawn(
                        async move {
                            debug!("connection accepted");
                            connection.await;
                            drop(active);
                            debug!("connection closed");
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Retrying at once could spin on an error that lasts:
                    // wait a little (but not past a shutdown).
                    failures = failures.saturating_add(1);
                    let wait = accept_failed(shared, &e, failures);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.triggered() => {}
                    }
                }
            },
        }
    }
    debug!(
        connections = connections.len(),
        "listener stopped; waiting for connections"
    );
    let deadline = shared.config.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while let Some(done) = connections.join_next().await {
            if let Err(e) = done {
                error!(error = %e, "connection task failed");
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            timeout_secs = deadline.as_secs_f64(),
            "connections still open at the shutdown deadline; dropping them"
        );
        connections.abort_all();
        while let Some(done) = connections.join_next().await {
            if let Err(e) = done
                && !e.is_cancelled()
            {
                error!(error = %e, "connection task failed");
            }
        }
    }
}

/// Wait after an accept error that means a shortage of descriptors or memory,
/// and the longest wait after any other.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Wait after a first accept error of another kind (most often one peer's
/// connection reset before it was accepted); it doubles while errors repeat.
const ACCEPT_RETRY: Duration = Duration::from_millis(1);

/// Logs an accept error (rate-limited) and says how long to wait before the
/// next accept, the `failures`th error in a row.
fn accept_failed(shared: &Shared, e: &std::io::Error, failures: u32) -> Duration {
    use std::io::ErrorKind::*;
    // EMFILE, ENFILE, ENOBUFS and ENOMEM last until something is released.
    let shortage = matches!(e.kind(), OutOfMemory | QuotaExceeded)
        || matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12));
    if let Some(held_back) = shared.limits.accept_log.allow() {
        if shortage {
            warn!(
                error = %e,
                similar_errors_not_logged = held_back,
                "accept failed; retrying shortly (raise the open file limit, or lower \
                 limits.max_connections and limits.max_handshakes)"
            );
        } else {
            warn!(
                error = %e,
                similar_errors_not_logged = held_back,
                "accept failed; retrying shortly"
            );
        }
    }
    accept_backoff(failures, shortage)
}

/// The wait before the next accept after `failures` errors in a row: a
/// shortage waits [`ACCEPT_BACKOFF`]; any other error [`ACCEPT_RETRY`], doubled
/// for each error in a row up to [`ACCEPT_BACKOFF`], so that one peer's reset
/// costs the others next to nothing and an error that lasts cannot spin.
fn accept_backoff(failures: u32, shortage: bool) -> Duration {
    if shortage {
        return ACCEPT_BACKOFF;
    }
    let doublings = failures.saturating_sub(1).min(16);
    (ACCEPT_RETRY * (1 << doublings)).min(ACCEPT_BACKOFF)
}

/// Counts and logs (rate-limited) a connection closed for want of a handshake
/// slot: `closed` says which, the new one or the oldest.
fn refused_handshake(shared: &Shared, closed: &'static str) {
    shared
        .limits
        .refused_handshakes
        .fetch_add(1, Ordering::Relaxed);
    if let Some(held_back) = shared.limits.handshake_log.allow() {
        warn!(
            max_handshakes = shared.config.max_handshakes,
            closed,
            similar_not_logged = held_back,
            "too many connections in the handshake; closing one"
        );
    }
}

/// Counts a connection as active for as long as it lives, even when its task
/// panics or is cancelled.
struct ActiveConnection(Arc<Shared>);

impl ActiveConnection {
    fn enter(shared: Arc<Shared>) -> ActiveConnection {
        shared.stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection(shared)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a handshake ended.
enum HandshakeEnd {
    /// The negotiation returned.
    Done(std::io::Result<Outcome>),
    TimedOut,
    /// Closed to make room for a newer connection.
    Evicted,
    ShuttingDown,
}

/// Runs a handshake under the time limit; a shutdown or the loss of its
/// handshake slot ends it at once. (The spec lets a server answer further
/// options with `NBD_REP_ERR_SHUTDOWN` during a shutdown; closing at once gives
/// an unauthenticated peer nothing to hold the shutdown with.)
async fn bounded_handshake<F>(shared: &Shared, slot: &HandshakeSlot, handshake: F) -> HandshakeEnd
where
    F: Future<Output = std::io::Result<Outcome>>,
{
    tokio::select! {
        biased;
        _ = shared.shutdown.triggered() => HandshakeEnd::ShuttingDown,
        _ = slot.evicted() => HandshakeEnd::Evicted,
        outcome = tokio::time::timeout(shared.config.handshake_timeout, handshake) => match outcome {
            Ok(outcome) => HandshakeEnd::Done(outcome),
            Err(_) => HandshakeEnd::TimedOut,
        },
    }
}

fn unix_connection(
    shared: Arc<Shared>,
    mut stream: UnixStream,
    slot: HandshakeSlot,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut negotiation = Negotiation::new(shared.clone(), Some(Scope::All), TlsMode::Off);
        let outcome = bounded_handshake(&shared, &slot, async {
            if !negotiation.greet(&mut stream).await? {
                return Ok(Outcome::Close);
            }
            negotiation.negotiate(&mut stream).await
        })
        .await;
        drop(slot);
        let session = finish_handshake(&shared, outcome);
        match session {
            Some(session) => {
                let (r, w) = stream.into_split();
                transmission::serve(r, w, session, shared).await;
            }
            None => close(&mut stream).await,
        }
    })
}

/// Longest wait to close a connection that did not enter transmission: a TLS
/// close_notify waits for room in the socket, which a peer that reads nothing
/// never makes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `stream` in an orderly way (TLS close_notify, then FIN), giving up
/// after [`CLOSE_TIMEOUT`]; dropping it then closes the socket.
async fn close<S: AsyncWrite + Unpin>(stream: &mut S) {
    match tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "closing the connection failed"),
        Err(_) => debug!("the peer took no bytes for the close; dropping the connection"),
    }
}

/// A TCP stream before or after the TLS upgrade.
enum Upgraded {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

fn tcp_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    tls: Option<TlsConfig>,
    handshake: HandshakeSlot,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let (scope, mode) = match tls {
            // The scope is unknown until the client certificate is seen.
            Some(_) => (None, TlsMode::Required { active: false }),
            None => (Some(Scope::All), TlsMode::Off),
        };
        let mut negotiation = Negotiation::new(shared.clone(), scope, mode);
        let mut slot = Some(Upgraded::Plain(stream));
        let outcome = bounded_handshake(&shared, &handshake, async {
            let Some(Upgraded::Plain(mut tcp)) = slot.take() else {
                unreachable!("the connection starts as plain TCP");
            };
            if !negotiation.greet(&mut tcp).await? {
                slot = Some(Upgraded::Plain(tcp));
                return Ok(Outcome::Close);
            }
            let outcome = negotiation.negotiate(&mut tcp).await;
            let Ok(Outcome::StartTls) = outcome else {
                slot = Some(Upgraded::Plain(tcp));
                return outcome;
            };
            let acceptor = &tls
                .as_ref()
                .expect("STARTTLS is acknowledged only with TLS")
                .acceptor;
            // "If the handshake is unsuccessful ... the server MUST terminate the
            // session" (FORCEDTLS mode): returning the error drops the socket.
            let mut stream = acceptor.accept(tcp).await.inspect_err(|e| {
                // Every port scan or plain client on the TLS port ends here.
                debug!(error = %e, "TLS handshake failed");
            })?;
            let tenant = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .ok_or(ClientIdentity::Missing)
                .and_then(|cert| client_tenant(cert.as_ref()).map_err(ClientIdentity::Refused));
            let tenant = match tenant {
                Ok(tenant) => tenant,
                Err(e) => {
                    warn!(error = %e, "client certificate refused");
                    close(&mut stream).await;
                    return Ok(Outcome::Close);
                }
            };
            tracing::Span::current().record("tenant", tenant.as_str());
            info!(tenant = %tenant, "TLS established");
            negotiation.tls_started(Scope::Tenant(tenant));
            let outcome = negotiation.negotiate(&mut stream).await;
            slot = Some(Upgraded::Tls(Box::new(stream)));
            outcome
        })
        .await;
        // The slot is free before the outcome is logged, so a log reader never
        // sees a finished handshake that still holds one.
        drop(handshake);
        let session = finish_handshake(&shared, outcome);
        match (slot, session) {
            (Some(Upgraded::Plain(tcp)), Some(session)) => {
                let (r, w) = tcp.into_split();
                transmission::serve(r, w, session, shared).await;
            }
            (Some(Upgraded::Tls(tls)), Some(session)) => {
                let (r, w) = tokio::io::split(*tls);
                transmission::serve(r, w, session, shared).await;
            }
            (Some(Upgraded::Plain(mut tcp)), None) => close(&mut tcp).await,
            (Some(Upgraded::Tls(mut tls)), None) => close(&mut *tls).await,
            (None, _) => {}
        }
    })
}

#[derive(Debug, thiserror::Error)]
enum ClientIdentity {
    #[error("no client certificate")]
    Missing,
    #[error(transparent)]
    Refused(crate::tls::ClientIdentityError),
}

/// Logs how a handshake ended; the session if it entered transmission.
fn finish_handshake(shared: &Shared, outcome: HandshakeEnd) -> Option<Session> {
    match outcome {
        HandshakeEnd::TimedOut => {
            // Any peer can make this line: rate-limited like the other refusals.
            if let Some(held_back) = shared.limits.handshake_log.allow() {
                warn!(similar_not_logged = held_back, "handshake timed out");
            }
            None
        }
        HandshakeEnd::Evicted => {
            debug!("handshake closed to make room for a new connection");
            refused_handshake(shared, "the oldest");
            None
        }
        HandshakeEnd::ShuttingDown => {
            debug!("shutting down during the handshake");
            None
        }
        HandshakeEnd::Done(Err(e)) => {
            debug!(error = %e, "handshake ended");
            None
        }
        HandshakeEnd::Done(Ok(Outcome::Close)) => None,
        HandshakeEnd::Done(Ok(Outcome::StartTls)) => {
            // Handled inside the handshake; a second upgrade is refused there.
            error!("unexpected TLS upgrade request; closing");
            None
        }
        HandshakeEnd::Done(Ok(Outcome::Go(session))) => {
            let span = tracing::Span::current();
            // The export name's tenant: the one whose exports the client may
            // see (for a TLS client, its certificate's, recorded already).
            let tenant = session.name.split_once('/').map_or("", |(t, _)| t);
            span.record("tenant", tenant);
            span.record("export", session.name.as_str());
            info!(
                export = %session.name,
                size = session.size,
                structured = session.structured,
                "export attached"
            );
            Some(session)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_always_wait_and_repeated_ones_longer() {
        let waits: Vec<Duration> = (1..=10).map(|n| accept_backoff(n, false)).collect();
        assert_eq!(waits[0], ACCEPT_RETRY);
        assert!(
            waits
                .windows(2)
                .all(|w| w[0] < w[1] || w[1] == ACCEPT_BACKOFF)
        );
        assert_eq!(waits[9], ACCEPT_BACKOFF);
        assert_eq!(accept_backoff(u32::MAX, false), ACCEPT_BACKOFF);
        assert_eq!(accept_backoff(1, true), ACCEPT_BACKOFF);
    }
}
