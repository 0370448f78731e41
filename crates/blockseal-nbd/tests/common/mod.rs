//! What the server's integration tests share: an in-process server on a temp
//! Unix socket (and optionally a TLS TCP port) whose log the test can read,
//! and the in-memory catalog it serves. Peer tools, the raw protocol client
//! and the test PKI come from `blockseal-test-support`.

#![allow(dead_code, unreachable_pub)] // shared by test binaries that each use a part

pub mod mem;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unused_imports)] // not every test binary speaks the protocol itself
pub use blockseal_test_support::wire::*;
pub use blockseal_test_support::*;

use blockseal_nbd::{Server, ServerConfig, TlsConfig};
use mem::MemCatalog;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// How long a test waits for something that must happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the server logs when it reads the end of file behind a client's
/// disconnect request: it has then taken in, and looked at, every request the
/// client sent ([`Raw::disconnect_and_close_write`]).
pub const DISCONNECT_READ: &str = "client closed its side after a disconnect request";

/// A server running on its own runtime until dropped; the drop shuts it down and
/// checks that it stops.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub catalog: Arc<MemCatalog>,
    pub server: Server,
    log: Log,
    spans: SpanLog,
    runtime: Option<tokio::runtime::Runtime>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), blockseal_nbd::ServeError>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(MemCatalog::standard(), ServerConfig::default(), None)
    }

    /// Binds the Unix socket (and with `tls` a TCP port on 127.0.0.1) before
    /// returning, so clients can connect at once: no readiness waits.
    pub fn start_with(
        catalog: MemCatalog,
        config: ServerConfig,
        tls: Option<TlsConfig>,
    ) -> TestServer {
        let dir = temp_dir();
        let socket = dir.path().join("nbd.sock");
        let log = Log::default();
        let spans = SpanLog::default();
        let dispatch = log.dispatch(&spans);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            // Every thread of this runtime, blocking ones included, logs to
            // this server's own log, whatever other tests run beside it.
            .on_thread_start(move || {
                let guard = tracing::dispatcher::set_default(&dispatch);
                LOG_GUARD.with(|g| *g.borrow_mut() = Some(guard));
            })
            .on_thread_stop(|| LOG_GUARD.with(|g| drop(g.borrow_mut().take())))
            .build()
            .unwrap();
        let catalog = Arc::new(catalog);
        let server = Server::new(catalog.clone(), config);
        let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        unix.set_nonblocking(true).unwrap();
        let mut tasks = Vec::new();
        let mut tcp = None;
        {
            let _guard = runtime.enter();
            let listener = tokio::net::UnixListener::from_std(unix).unwrap();
            let s = server.clone();
            tasks.push(runtime.spawn(async move { s.serve_unix(listener).await }));
            if let Some(tls) = tls {
                let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                std_listener.set_nonblocking(true).unwrap();
                tcp = Some(std_listener.local_addr().unwrap());
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let s = server.clone();
                tasks.push(runtime.spawn(async move { s.serve_tcp(listener, Some(tls)).await }));
            }
        }
        TestServer {
            dir,
            socket,
            tcp,
            catalog,
            server,
            log,
            spans,
            runtime: Some(runtime),
            tasks,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(&self.socket)
    }

    /// Everything the server logged so far, debug level included.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The spans (DEBUG and above) that have closed so far, in the order
    /// they closed.
    pub fn closed_spans(&self) -> Vec<ClosedSpan> {
        self.spans.0.lock().unwrap().clone()
    }

    /// Waits until the server has logged `message` `times` times in all.
    #[track_caller]
    pub fn wait_for_log(&self, message: &str, times: usize) {
        wait_until(
            &format!("the server to log {message:?} {times} time(s)"),
            WAIT,
            || self.log().matches(message).count() >= times,
        );
    }

    /// Triggers shutdown and waits (bounded) for every listener to return.
    pub fn stop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.server.shutdown_handle().trigger();
        let tasks = std::mem::take(&mut self.tasks);
        runtime.block_on(async {
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .expect("server did not stop within 20 s of shutdown")
                    .unwrap()
                    .unwrap();
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
            if let Some(rt) = self.runtime.take() {
                self.server.shutdown_handle().trigger();
                rt.shutdown_timeout(Duration::from_secs(1));
            }
            return;
        }
        self.stop();
    }
}

thread_local! {
    /// Keeps a runtime thread's log dispatcher in place until the thread stops.
    static LOG_GUARD: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// One server's log: every event at debug level and above, as text. With
/// `RUST_LOG` set (e.g. `blockseal_nbd=debug`), the events it selects are also
/// printed.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn dispatch(&self, spans: &SpanLog) -> tracing::Dispatch {
        let log = self.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || log.clone())
                    .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
            )
            .with(
                spans
                    .clone()
                    .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
            );
        tracing::Dispatch::new(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A span that has closed, as the test server's dispatcher saw it.
#[derive(Debug, Clone)]
pub struct ClosedSpan {
    pub name: &'static str,
    /// The dispatcher's id; unique among the spans open at the same time.
    pub id: u64,
    /// The parent's id and name.
    pub parent: Option<(u64, &'static str)>,
    /// Every field recorded, as text (`Debug` of the value; strings bare).
    pub fields: BTreeMap<&'static str, String>,
}

/// Records every span's fields and parent, and keeps each span once it closes.
#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<Vec<ClosedSpan>>>);

/// The fields of a span still open (a span extension).
struct OpenFields(BTreeMap<&'static str, String>);

struct FieldText<'a>(&'a mut BTreeMap<&'static str, String>);

impl tracing::field::Visit for FieldText<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

impl<S> Layer<S> for SpanLog
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut FieldText(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(OpenFields(fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<OpenFields>()
        {
            values.record(&mut FieldText(&mut open.0));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let fields = span
            .extensions_mut()
            .remove::<OpenFields>()
            .map(|f| f.0)
            .unwrap_or_default();
        let closed = ClosedSpan {
            name: span.name(),
            id: id.into_u64(),
            parent: span.parent().map(|p| (p.id().into_u64(), p.name())),
            fields,
        };
        self.0.lock().unwrap().push(closed);
    }
}

/// The server side of `pki`: its certificate and key, client certificates
/// checked against its CA.
pub fn tls_config(pki: &Pki) -> TlsConfig {
    let (cert, key, ca) = pki.server_files();
    TlsConfig::from_pem_files(cert, key, ca).unwrap()
}
