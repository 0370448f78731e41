//! Tracing spans to an OpenTelemetry collector: OTLP over HTTP/1.1 with the
//! JSON encoding (`POST {endpoint}/v1/traces`, `Content-Type:
//! application/json`), from `[tracing] otlp_endpoint` or `serve
//! --otlp-endpoint`.
//!
//! [`OtlpLayer`] is a `tracing_subscriber` layer. For each span it is given
//! (a [`SpanFilter`] picks them: spans only, never events, by target and
//! level) it takes a span id and either its parent's trace id or, for a root,
//! a new trace id and a sampling decision that the whole trace inherits; it
//! keeps the span's fields as attributes and, when the span closes, puts it
//! in a bounded queue. A thread of its own ([`Exporter`]) sends the queue in
//! batches, each POST under a time limit.
//!
//! What it must never do: block or slow the thread that closes a span beyond
//! a short lock (a full queue drops the span and counts it, a collector that
//! is down or slow costs the exporter's thread only); hold more than
//! [`Tuning::queue_spans`] spans; log per span (export failures make at most
//! one WARN line a minute); export anything but span names, targets and the
//! fields the spans declare, each value cut to [`MAX_VALUE_BYTES`]. Spans hold
//! names and numbers, never key material or data, and this module adds
//! nothing to them.
//!
//! Only `http://` is spoken: TLS would need an HTTP client and its
//! dependencies. A collector on the same host or a private network, which
//! forwards over TLS if it must, is the expected set-up.
//!
//! The JSON follows the OTLP specification's "JSON Protobuf Encoding":
//! lowerCamelCase keys, `traceId`/`spanId` as hex strings, 64-bit integers
//! (times in Unix nanoseconds, integer attributes) as decimal strings, enums
//! as integers.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The spans exported unless `[tracing] spans` says otherwise: INFO spans
/// (connections, admin operations, long jobs) and the NBD crate's DEBUG
/// request spans.
pub(crate) const DEFAULT_SPANS: &str = "info,blockseal_nbd=debug";
/// The `service.name` resource attribute unless configured.
pub(crate) const DEFAULT_SERVICE_NAME: &str = "blockseal";
/// How long the process waits at exit for the spans still queued to be sent.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest attribute value exported, in bytes (cut on a character boundary).
pub(crate) const MAX_VALUE_BYTES: usize = 256;
/// Most attributes a span keeps; more are counted as dropped.
const MAX_ATTRIBUTES: usize = 32;
/// At most one WARN line about failed exports or a full queue per this.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Longest pause between attempts while the collector fails.
const MAX_BACKOFF: Duration = Duration::from_secs(32);
/// Most bytes of a collector's response head read.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Where spans go and which: the `[tracing]` table, or `--otlp-endpoint`
/// with the defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The collector.
    pub(crate) endpoint: Endpoint,
    /// The `service.name` resource attribute.
    pub(crate) service_name: String,
    /// The fraction of traces (root spans and everything under them)
    /// exported, 0 to 1.
    pub(crate) sample_ratio: f64,
    /// Which spans: `tracing_subscriber` target directives
    /// (`info,blockseal_nbd=debug`).
    pub(crate) spans: Targets,
}

impl Settings {
    /// The collector at `endpoint` with every other setting at its default.
    pub(crate) fn with_defaults(endpoint: Endpoint) -> Settings {
        Settings {
            endpoint,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            sample_ratio: 1.0,
            spans: DEFAULT_SPANS
                .parse()
                .expect("the default span directives parse"),
        }
    }
}

/// How the exporter batches, waits and gives up; [`Tuning::default`] in the
/// server, shorter times in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Finished spans held at most; past it new ones are dropped.
    pub(crate) queue_spans: usize,
    /// Most spans in one request; a queue this long is sent at once.
    pub(crate) batch_spans: usize,
    /// Spans queued are sent at least this often.
    pub(crate) interval: Duration,
    /// Longest time one POST may take, connecting included.
    pub(crate) timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            queue_spans: 8192,
            batch_spans: 512,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// An OTLP/HTTP collector's base URL, `http://HOST[:PORT][/PATH]`; spans go
/// to `PATH/v1/traces` on it. The port defaults to 80, as in any `http` URL
/// (a collector's usual OTLP/HTTP port is 4318: name it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `HOST[:PORT]` as written: the `Host` header.
    authority: String,
    /// The host name or address, without IPv6 brackets: looked up.
    host: String,
    port: u16,
    /// The path prefix without a trailing `/` (often empty).
    base: String,
}

impl Endpoint {
    /// The request path spans are posted to.
    fn traces_path(&self) -> String {
        format!("{}/v1/traces", self.base)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base)
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(url: &str) -> Result<Endpoint, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            if url.starts_with("https://") {
                return Err(format!(
                    "{url}: https is not supported: spans are sent over plain HTTP (use a \
                     collector on this host or a private network)"
                ));
            }
            return Err(format!("{url}: expected http://HOST[:PORT][/PATH]"));
        };
        let (authority, base) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        if base.contains(['?', '#']) || authority.contains(['@', '?', '#']) {
            return Err(format!(
                "{url}: no credentials, query or fragment, only http://HOST[:PORT][/PATH]"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url}: an IPv6 address needs its closing ]"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("{url}: expected :PORT after ]")),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let port = match port {
            None => 80,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url}: {port:?} is not a port"))?,
        };
        Ok(Endpoint {
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            base: base.trim_end_matches('/').to_owned(),
        })
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Endpoint, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Counters of the exporter, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Spans the collector accepted.
    pub(crate) exported: AtomicU64,
    /// Spans dropped: the queue was full, the collector failed them, or they
    /// were still queued when the process stopped waiting at exit.
    pub(crate) dropped: AtomicU64,
    /// Requests to the collector that failed.
    pub(crate) failed_requests: AtomicU64,
}

/// The counters of the exporter this process installed, if any.
pub(crate) fn installed_stats() -> Option<Arc<Stats>> {
    INSTALLED.get().cloned()
}

static INSTALLED: OnceLock<Arc<Stats>> = OnceLock::new();

/// Starts the exporter's thread; returns the layer (to install with its
/// filter) and the handle that flushes at exit. Its counters become
/// [`installed_stats`].
pub(crate) fn start(settings: Settings) -> std::io::Result<(OtlpLayer, SpanFilter, Exporter)> {
    let filter = SpanFilter(settings.spans.clone());
    let (layer, exporter) = start_with(settings, Tuning::default())?;
    let _ = INSTALLED.set(exporter.shared.stats.clone());
    Ok((layer, filter, exporter))
}

/// [`start`] with `tuning`, and no global counters.
pub(crate) fn start_with(
    settings: Settings,
    tuning: Tuning,
) -> std::io::Result<(OtlpLayer, Exporter)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        stats: Arc::new(Stats::default()),
        tuning,
    });
    let (done_tx, done_rx) = mpsc::channel();
    let thread = {
        let shared = shared.clone();
        let sender = Sender::new(&settings);
        std::thread::Builder::new()
            .name("blockseal-otlp".into())
            .spawn(move || {
                run(&shared, &sender);
                let _ = done_tx.send(());
            })?
    };
    let layer = OtlpLayer {
        shared: shared.clone(),
        ids: Ids::new(),
        sampler: Sampler::new(settings.sample_ratio),
    };
    let exporter = Exporter {
        shared,
        thread: Some(thread),
        done: done_rx,
    };
    Ok((layer, exporter))
}

/// Which spans go to the collector: spans (never events) that the target
/// directives enable. Decided per callsite, so a span it refuses costs
/// nothing once its callsite is registered.
#[derive(Debug, Clone)]
pub(crate) struct SpanFilter(Targets);

impl<S> Filter<S> for SpanFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        <Targets as Filter<S>>::max_level_hint(&self.0)
    }
}

impl SpanFilter {
    fn wants(&self, meta: &Metadata<'_>) -> bool {
        meta.is_span() && self.0.would_enable(meta.target(), meta.level())
    }
}

/// The layer that records spans for the collector (see the module docs).
pub(crate) struct OtlpLayer {
    shared: Arc<Shared>,
    ids: Ids,
    sampler: Sampler,
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        // The nearest ancestor this layer sees: its trace, and its decision.
        let parent = span.parent().and_then(|parent| {
            let extensions = parent.extensions();
            let recording = extensions.get::<Recording>()?;
            Some((recording.trace_id, recording.span_id, recording.sampled))
        });
        let (trace_id, parent_id, sampled) = match parent {
            Some((trace_id, span_id, sampled)) => (trace_id, Some(span_id), sampled),
            None => {
                let trace_id = self.ids.trace_id();
                (trace_id, None, self.sampler.samples(trace_id))
            }
        };
        let mut recording = Recording {
            trace_id,
            span_id: self.ids.span_id(),
            parent_id,
            sampled,
            start_unix_nanos: 0,
            started: None,
            attributes: Fields::default(),
        };
        if sampled {
            recording.start_unix_nanos = unix_nanos(SystemTime::now());
            recording.started = Some(Instant::now());
            // Room for every field the span declares: one allocation.
            let declared = attrs.metadata().fields().len().min(MAX_ATTRIBUTES);
            recording.attributes.values.reserve_exact(declared);
            attrs.record(&mut recording.attributes);
        }
        span.extensions_mut().insert(recording);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(recording) = extensions.get_mut::<Recording>()
            && recording.sampled
        {
            values.record(&mut recording.attributes);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(recording) = span.extensions_mut().remove::<Recording>() else {
            return;
        };
        if !recording.sampled {
            return;
        }
        let elapsed = recording.started.map_or(0, |t| {
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        });
        let meta = span.metadata();
        self.shared.push(Finished {
            trace_id: recording.trace_id,
            span_id: recording.span_id,
            parent_id: recording.parent_id,
            name: meta.name(),
            target: meta.target(),
            start_unix_nanos: recording.start_unix_nanos,
            end_unix_nanos: recording.start_unix_nanos.saturating_add(elapsed),
            attributes: recording.attributes,
        });
    }
}

/// The handle of the exporter's thread: [`Exporter::shutdown`] sends what is
/// queued and stops it.
pub(crate) struct Exporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Closed (or sent on) when the thread ends.
    done: mpsc::Receiver<()>,
}

impl Exporter {
    /// Stops taking spans, sends those queued, and waits at most `timeout`
    /// for that; what is still queued then is lost (and counted), and the
    /// thread is left to end with the process.
    pub(crate) fn shutdown(mut self, timeout: Duration) {
        self.shared.close(Instant::now() + timeout);
        match self.done.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take()
                    && thread.join().is_err()
                {
                    tracing::error!("the OTLP exporter's thread panicked");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let queued = self.shared.lock().spans.len();
                tracing::warn!(
                    timeout_secs = timeout.as_secs_f64(),
                    spans_not_exported = queued,
                    "the OTLP collector did not take the last spans in time; exiting without them"
                );
                self.thread = None;
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Not shut down (an early exit): stop taking spans, do not wait.
        if self.thread.is_some() {
            self.shared.close(Instant::now());
        }
    }
}

/// What the layer and the exporter's thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// The queue reached a batch, or it closed.
    wake: Condvar,
    stats: Arc<Stats>,
    tuning: Tuning,
}

#[derive(Default)]
struct Queue {
    spans: Vec<Finished>,
    /// Set at shutdown: spans are no longer taken, and the thread sends
    /// what is left until this deadline.
    closed: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Pushing and taking spans cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a finished span, or drops and counts it when the queue is full
    /// or closed. Never waits but for the lock.
    fn push(&self, span: Finished) {
        let mut queue = self.lock();
        if queue.closed.is_some() || queue.spans.len() >= self.tuning.queue_spans {
            drop(queue);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.spans.push(span);
        let full_batch = queue.spans.len() == self.tuning.batch_spans;
        drop(queue);
        if full_batch {
            self.wake.notify_one();
        }
    }

    fn close(&self, deadline: Instant) {
        self.lock().closed.get_or_insert(deadline);
        self.wake.notify_all();
    }
}

/// The exporter's thread: sends a batch when one is full or the interval
/// has passed, backing off while the collector fails; at shutdown sends
/// what is left until the deadline.
fn run(shared: &Shared, sender: &Sender) {
    let tuning = shared.tuning;
    // A batch that failed once and is tried once more.
    let mut retry: Option<Vec<Finished>> = None;
    // Failed requests in a row, and when the next attempt may go.
    let mut failures = 0u32;
    let mut next_attempt = Instant::now();
    let mut last_export = Instant::now();
    let mut warnings = Warnings::new();
    loop {
        let (batch, deadline) = {
            let mut queue = shared.lock();
            loop {
                if queue.closed.is_some() {
                    break;
                }
                let now = Instant::now();
                let waiting = queue.spans.len() + retry.as_ref().map_or(0, Vec::len);
                let due = (queue.spans.len() >= tuning.batch_spans
                    || (waiting > 0 && now >= last_export + tuning.interval))
                    && now >= next_attempt;
                if due {
                    break;
                }
                let until = if waiting == 0 {
                    now + tuning.interval
                } else {
                    (last_export + tuning.interval).max(next_attempt)
                };
                let wait = until
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                queue = shared
                    .wake
                    .wait_timeout(queue, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let batch = match retry.take() {
                Some(batch) => batch,
                None => {
                    let n = queue.spans.len().min(tuning.batch_spans);
                    queue.spans.drain(..n).collect()
                }
            };
            (batch, queue.closed)
        };
        if let Some(deadline) = deadline {
            flush_at_exit(shared, sender, batch, deadline);
            return;
        }
        last_export = Instant::now();
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        match sender.post(&batch, tuning.timeout) {
            Ok(()) => {
                shared.stats.exported.fetch_add(n, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(endpoint = %sender.endpoint, "OTLP export works again");
                }
                failures = 0;
                next_attempt = Instant::now();
            }
            Err(error) => {
                shared.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                let doublings = (failures - 1).min(16);
                let pause = tuning.interval.saturating_mul(1 << doublings);
                next_attempt = Instant::now() + pause.min(MAX_BACKOFF);
                // Tried once more, unless the collector refused it for good
                // or it was its second try.
                if error.retryable() && failures == 1 {
                    retry = Some(batch);
                } else {
                    shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
                }
                warnings.failed(&error);
            }
        }
        warnings.report(&shared.stats, &sender.endpoint);
    }
}

/// Sends `first` and then everything queued, in batches, until `deadline`,
/// stopping at the first failure; counts what is left as dropped.
fn flush_at_exit(shared: &Shared, sender: &Sender, first: Vec<Finished>, deadline: Instant) {
    let tuning = shared.tuning;
    let mut batch = first;
    let mut lost = 0u64;
    let mut failure: Option<PostError> = None;
    loop {
        if !batch.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = batch.len() as u64;
            if failure.is_some() || left.is_zero() {
                lost += n;
            } else {
                match sender.post(&batch, left.min(tuning.timeout)) {
                    Ok(()) => {
                        shared.stats.exported.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                        failure = Some(e);
                        lost += n;
                    }
                }
            }
        }
        let mut queue = shared.lock();
        if queue.spans.is_empty() {
            break;
        }
        let n = queue.spans.len().min(tuning.batch_spans);
        batch = queue.spans.drain(..n).collect();
    }
    if lost > 0 {
        shared.stats.dropped.fetch_add(lost, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %sender.endpoint,
            spans_not_exported = lost,
            error = failure.map(|e| e.to_string()).unwrap_or_else(|| "out of time".into()),
            "the last spans could not be sent to the OTLP collector at exit"
        );
    }
}

/// At most one WARN line per [`WARN_EVERY`] about failed requests and
/// dropped spans.
struct Warnings {
    last: Option<Instant>,
    /// The first failure since the last line.
    failure: Option<String>,
    /// `Stats::dropped` when the last line was written.
    dropped_reported: u64,
}

impl Warnings {
    fn new() -> Warnings {
        Warnings {
            last: None,
            failure: None,
            dropped_reported: 0,
        }
    }

    fn failed(&mut self, error: &PostError) {
        self.failure.get_or_insert_with(|| error.to_string());
    }

    /// Writes the line if something is to be said and the last one is old
    /// enough; whether it did.
    fn report(&mut self, stats: &Stats, endpoint: &Endpoint) -> bool {
        let dropped = stats.dropped.load(Ordering::Relaxed);
        let new_drops = dropped - self.dropped_reported;
        if self.failure.is_none() && new_drops == 0 {
            return false;
        }
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return false;
        }
        self.last = Some(Instant::now());
        self.dropped_reported = dropped;
        match self.failure.take() {
            Some(error) => tracing::warn!(
                endpoint = %endpoint,
                error,
                spans_dropped = new_drops,
                "OTLP export failed; spans are dropped while the collector fails (at most \
                 one such line a minute)"
            ),
            None => tracing::warn!(
                endpoint = %endpoint,
                spans_dropped = new_drops,
                "OTLP span queue full; spans were dropped (at most one such line a minute)"
            ),
        }
        true
    }
}

/// A span that has closed, waiting to be sent.
struct Finished {
    trace_id: u128,
    span_id: u64,
    parent_id: Option<u64>,
    name: &'static str,
    target: &'static str,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    attributes: Fields,
}

/// What the layer keeps of an open span (a span extension).
struct Recording {
    trace_id: u128,
    span_id: u64,
    parent_id: Option<u64>,
    /// Whether its trace is exported; an unsampled span records nothing.
    sampled: bool,
    start_unix_nanos: u64,
    started: Option<Instant>,
    attributes: Fields,
}

/// A span's fields, its attributes, in the order first recorded; a field
/// recorded again replaces its value.
#[derive(Debug, Default)]
struct Fields {
    values: Vec<(&'static str, Value)>,
    dropped: u32,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl Fields {
    fn set(&mut self, key: &'static str, value: Value) {
        if let Some(slot) = self.values.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else if self.values.len() < MAX_ATTRIBUTES {
            self.values.push((key, value));
        } else {
            self.dropped += 1;
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), Value::Text(cut(value).to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), Value::Int(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        let value = match i64::try_from(value) {
            Ok(v) => Value::Int(v),
            Err(_) => Value::Text(value.to_string()),
        };
        self.set(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), Value::Double(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = format!("{value:?}");
        let kept = cut(&text).len();
        text.truncate(kept);
        self.set(field.name(), Value::Text(text));
    }
}

/// `text` cut to at most [`MAX_VALUE_BYTES`], on a character boundary.
fn cut(text: &str) -> &str {
    if text.len() <= MAX_VALUE_BYTES {
        return text;
    }
    let mut end = MAX_VALUE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Trace and span ids: a counter from a random start through SplitMix64's
/// finaliser, a bijection, so ids never repeat within the process (short
/// of 2^64 of them) and differ between processes; never zero (invalid in
/// OTLP). Not secret: ids only need to be unique.
struct Ids {
    state: AtomicU64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Ids {
    fn new() -> Ids {
        let clock = unix_nanos(SystemTime::now());
        let seed = RandomState::new().hash_one((std::process::id(), clock));
        Ids {
            state: AtomicU64::new(seed),
        }
    }

    fn next(&self) -> u64 {
        loop {
            let z = mix(self.state.fetch_add(GOLDEN_GAMMA, Ordering::Relaxed));
            if z != 0 {
                return z;
            }
        }
    }

    fn span_id(&self) -> u64 {
        self.next()
    }

    fn trace_id(&self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps a trace when the low 64 bits of its id fall below the ratio's
/// share of the range (as OpenTelemetry's trace-id ratio sampler does), so
/// the decision is a function of the trace id.
#[derive(Debug, Clone, Copy)]
struct Sampler {
    /// `None`: every trace.
    below: Option<u64>,
}

impl Sampler {
    fn new(ratio: f64) -> Sampler {
        if ratio >= 1.0 {
            return Sampler { below: None };
        }
        let ratio = if ratio.is_finite() {
            ratio.max(0.0)
        } else {
            0.0
        };
        // Exact enough: the ratio is a configured fraction, not a count.
        let below = (ratio * 18_446_744_073_709_551_616.0) as u64;
        Sampler { below: Some(below) }
    }

    fn samples(&self, trace_id: u128) -> bool {
        match self.below {
            None => true,
            Some(below) => (trace_id as u64) < below,
        }
    }
}

/// Posts batches to the collector.
struct Sender {
    endpoint: Endpoint,
    path: String,
    /// The resource's attributes, the same in every request.
    resource: Vec<KeyValue>,
}

/// Why a POST failed.
#[derive(Debug)]
enum PostError {
    /// Connecting, sending or reading failed (or took too long).
    Io(std::io::Error),
    /// The collector answered with this status.
    Status(u16),
    /// The response was not HTTP.
    Malformed,
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::Io(e) => write!(f, "{e}"),
            PostError::Status(code) => write!(f, "the collector answered HTTP {code}"),
            PostError::Malformed => write!(f, "the collector's answer is not HTTP"),
        }
    }
}

impl PostError {
    /// Whether trying again may work (OTLP/HTTP: 429, 502, 503, 504, and a
    /// connection that failed); other answers refuse the batch for good.
    fn retryable(&self) -> bool {
        match self {
            PostError::Io(_) | PostError::Malformed => true,
            PostError::Status(code) => matches!(code, 429 | 502 | 503 | 504),
        }
    }
}

impl From<std::io::Error> for PostError {
    fn from(e: std::io::Error) -> PostError {
        PostError::Io(e)
    }
}

impl Sender {
    fn new(settings: &Settings) -> Sender {
        Sender {
            endpoint: settings.endpoint.clone(),
            path: settings.endpoint.traces_path(),
            resource: vec![
                KeyValue::text("service.name", &settings.service_name),
                KeyValue::text("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue {
                    key: "process.pid",
                    value: AnyValue::Int(std::process::id().to_string()),
                },
            ],
        }
    }

    /// One POST of `spans` with everything done within `timeout`.
    fn post(&self, spans: &[Finished], timeout: Duration) -> Result<(), PostError> {
        let body = self.encode(spans);
        let deadline = Instant::now() + timeout;
        let mut stream = self.connect(deadline)?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nUser-Agent: blockseal/{}\r\nConnection: close\r\n\r\n",
            self.path,
            self.endpoint.authority,
            body.len(),
            env!("CARGO_PKG_VERSION"),
        );
        write_all(&mut stream, head.as_bytes(), deadline)?;
        write_all(&mut stream, &body, deadline)?;
        let status = read_status(&mut stream, deadline)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(PostError::Status(status))
        }
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream, PostError> {
        let addresses: Vec<SocketAddr> = (self.endpoint.host.as_str(), self.endpoint.port)
            .to_socket_addrs()?
            .collect();
        let mut last = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, left(deadline)?) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(PostError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the collector's host name has no address",
            )
        })))
    }

    /// The request body: one resource, one scope per crate, the spans.
    fn encode(&self, spans: &[Finished]) -> Vec<u8> {
        let mut scopes: BTreeMap<&str, Vec<JsonSpan<'_>>> = BTreeMap::new();
        for span in spans {
            let scope = span.target.split("::").next().unwrap_or(span.target);
            scopes.entry(scope).or_default().push(JsonSpan::new(span));
        }
        let request = ExportRequest {
            resource_spans: [ResourceSpans {
                resource: Resource {
                    attributes: &self.resource,
                },
                scope_spans: scopes
                    .into_iter()
                    .map(|(name, spans)| ScopeSpans {
                        scope: Scope {
                            name,
                            version: env!("CARGO_PKG_VERSION"),
                        },
                        spans,
                    })
                    .collect(),
            }],
        };
        serde_json::to_vec(&request).expect("the OTLP request serialises: no maps, no NaN keys")
    }
}

/// Time left until `deadline`, or a timeout error when none is.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(std::io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

/// Writes all of `bytes` by `deadline`, however slowly the peer reads.
fn write_all(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the response's status line by `deadline` and returns its code.
fn read_status(stream: &mut TcpStream, deadline: Instant) -> Result<u16, PostError> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let line = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break &head[..end];
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(PostError::Malformed);
        }
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(PostError::Malformed),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    };
    // "HTTP/1.1 200 OK"
    let line = std::str::from_utf8(line).map_err(|_| PostError::Malformed)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => {
            code.parse().map_err(|_| PostError::Malformed)
        }
        _ => Err(PostError::Malformed),
    }
}

// The OTLP JSON request (ExportTraceServiceRequest), as much of it as is
// sent.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportRequest<'a> {
    resource_spans: [ResourceSpans<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans<'a> {
    resource: Resource<'a>,
    scope_spans: Vec<ScopeSpans<'a>>,
}

#[derive(Serialize)]
struct Resource<'a> {
    attributes: &'a [KeyValue],
}

#[derive(Serialize)]
struct ScopeSpans<'a> {
    scope: Scope<'a>,
    spans: Vec<JsonSpan<'a>>,
}

#[derive(Serialize)]
struct Scope<'a> {
    name: &'a str,
    version: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonSpan<'a> {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    name: &'a str,
    /// SPAN_KIND_INTERNAL.
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue>,
    #[serde(skip_serializing_if = "is_zero")]
    dropped_attributes_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl<'a> JsonSpan<'a> {
    fn new(span: &'a Finished) -> JsonSpan<'a> {
        let mut attributes: Vec<KeyValue> = span
            .attributes
            .values
            .iter()
            .map(|&(key, ref value)| KeyValue {
                key,
                value: AnyValue::from(value),
            })
            .collect();
        attributes.push(KeyValue::text("code.namespace", span.target));
        // A span that recorded an `error` failed; its value says how.
        let status = span.attributes.get("error").map(|error| Status {
            code: STATUS_CODE_ERROR,
            message: match error {
                Value::Text(text) => text.clone(),
                other => AnyValue::from(other).to_string(),
            },
        });
        JsonSpan {
            trace_id: format!("{:032x}", span.trace_id),
            span_id: format!("{:016x}", span.span_id),
            parent_span_id: span.parent_id.map(|id| format!("{id:016x}")),
            name: span.name,
            kind: 1,
            start_time_unix_nano: span.start_unix_nanos.to_string(),
            end_time_unix_nano: span.end_unix_nanos.to_string(),
            attributes,
            dropped_attributes_count: span.attributes.dropped,
            status,
        }
    }
}

/// STATUS_CODE_ERROR.
const STATUS_CODE_ERROR: u8 = 2;

#[derive(Serialize)]
struct Status {
    code: u8,
    message: String,
}

#[derive(Serialize)]
struct KeyValue {
    key: &'static str,
    value: AnyValue,
}

impl KeyValue {
    fn text(key: &'static str, value: &str) -> KeyValue {
        KeyValue {
            key,
            value: AnyValue::Text(value.to_owned()),
        }
    }
}

/// OTLP's AnyValue: one of its fields. 64-bit integers go as decimal
/// strings, as the protobuf JSON mapping writes them.
#[derive(Serialize)]
enum AnyValue {
    #[serde(rename = "stringValue")]
    Text(String),
    #[serde(rename = "intValue")]
    Int(String),
    #[serde(rename = "boolValue")]
    Bool(bool),
    #[serde(rename = "doubleValue")]
    Double(f64),
}

impl From<&Value> for AnyValue {
    fn from(value: &Value) -> AnyValue {
        match value {
            Value::Text(text) => AnyValue::Text(text.clone()),
            Value::Int(n) => AnyValue::Int(n.to_string()),
            Value::Bool(b) => AnyValue::Bool(*b),
            // JSON has no NaN or infinity: those go as text.
            Value::Double(x) if x.is_finite() => AnyValue::Double(*x),
            Value::Double(x) => AnyValue::Text(x.to_string()),
        }
    }
}

impl fmt::Display for AnyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnyValue::Text(text) | AnyValue::Int(text) => f.write_str(text),
            AnyValue::Bool(b) => write!(f, "{b}"),
            AnyValue::Double(x) => write!(f, "{x}"),
        }
    }
}

#[cfg(test)]
mod tests;
