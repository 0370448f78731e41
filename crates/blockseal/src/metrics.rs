//! Prometheus metrics, health and readiness over HTTP (`[metrics] address`,
//! or `serve --metrics-address`).
//!
//! - `GET /metrics`: the text exposition format (version 0.0.4): per export,
//!   requests, bytes, errors and latency histograms by operation, and
//!   connections; per open volume, the engine's counters (authentication
//!   failures, commits, metadata bytes, compaction, re-encryption) and its
//!   data key's nonce budget; per tenant, connections; for the store, tenants,
//!   volumes, segment files and their live ratio (refreshed at most every
//!   [`USAGE_EVERY`]), and the metadata commit latency; for the process,
//!   resident memory, open file descriptors and CPU time; with `[tracing]`,
//!   the OTLP exporter's spans exported and dropped and its failed requests.
//! - `GET /healthz`: `200 ok` while the process serves HTTP.
//! - `GET /readyz`: `200 ready` once every listener is up (the moment the
//!   readiness line is printed) and until shutdown begins; `503` otherwise.
//!
//! Nothing here names a key or a block's content; labels are tenant, volume
//! and export names, which the admin API lists anyway.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockseal_nbd::{Export, ExportError, Extent, Shutdown, Throttle};
use blockseal_volume::{LATENCY_BUCKETS, LatencyHistogram, LatencySnapshot, Store};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::exports::StoreCatalog;

/// How long store-wide usage (segment files, live blocks) is reused between
/// scrapes: it reads every volume's live counts and lists its segment files.
pub(crate) const USAGE_EVERY: Duration = Duration::from_secs(60);
/// Concurrent metrics connections; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The NBD operations counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Cache,
}

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::BlockStatus,
    Op::Cache,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
            Op::Cache => "cache",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One operation's counters on one export.
#[derive(Debug, Default)]
struct OpStats {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: LatencyHistogram,
}

/// The I/O counters of one export, kept for the server's lifetime (across
/// its connections coming and going).
#[derive(Debug, Default)]
pub(crate) struct IoStats {
    ops: [OpStats; 7],
}

impl IoStats {
    fn record<T>(&self, op: Op, bytes: u64, started: Instant, result: &Result<T, ExportError>) {
        let s = &self.ops[op.index()];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        if result.is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.record(started.elapsed());
    }
}

/// An export whose requests are counted and timed.
pub(crate) struct Measured<E> {
    pub(crate) inner: E,
    pub(crate) io: Arc<IoStats>,
    /// The rate limits the export's requests are charged to.
    pub(crate) throttle: Option<Throttle>,
}

impl<E: Export> Measured<E> {
    fn timed<T>(
        &self,
        op: Op,
        bytes: u64,
        run: impl FnOnce(&E) -> Result<T, ExportError>,
    ) -> Result<T, ExportError> {
        let started = Instant::now();
        let result = run(&self.inner);
        self.io.record(op, bytes, started, &result);
        result
    }
}

impl<E: Export> Export for Measured<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let len = buf.len() as u64;
        self.timed(Op::Read, len, |e| e.read(offset, buf))
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        // Counted once, when it answers: a read that would wait is counted
        // by the `read` that then runs it.
        let started = Instant::now();
        let answered = self.inner.read_cached(offset, buf);
        if !matches!(answered, Ok(false)) {
            self.io
                .record(Op::Read, buf.len() as u64, started, &answered);
        }
        answered
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.timed(Op::Write, data.len() as u64, |e| e.write(offset, data, fua))
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        // Each write waited for the whole batch.
        let started = Instant::now();
        let results = self.inner.write_batch(writes);
        for ((_, data), result) in writes.iter().zip(&results) {
            self.io
                .record(Op::Write, data.len() as u64, started, result);
        }
        results
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.timed(Op::Flush, 0, |e| e.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.timed(Op::Trim, len, |e| e.trim(offset, len, fua))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.timed(Op::WriteZeroes, len, |e| {
            e.write_zeroes(offset, len, fua, no_hole)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.timed(Op::BlockStatus, len, |e| e.block_status(offset, len))
    }

    fn write_may_block(&self) -> bool {
        self.inner.write_may_block()
    }

    fn revoked(&self) -> Option<Shutdown> {
        self.inner.revoked()
    }

    fn throttle(&self) -> Option<Throttle> {
        self.throttle.clone()
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.timed(Op::Cache, len, |e| e.cache(offset, len))
    }
}

/// Every export's I/O counters, by export name.
#[derive(Debug, Default)]
pub(crate) struct IoRegistry {
    exports: Mutex<BTreeMap<String, Arc<IoStats>>>,
}

impl IoRegistry {
    /// The counters of `export`, made on first use.
    pub(crate) fn of(&self, export: &str) -> Arc<IoStats> {
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        exports.entry(export.to_owned()).or_default().clone()
    }

    /// Forgets `export` and, with `with_snapshots`, its snapshots' exports
    /// (deleted).
    pub(crate) fn forget(&self, export: &str, with_snapshots: bool) {
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        exports.retain(|name, _| {
            name != export
                && !(with_snapshots
                    && name
                        .strip_prefix(export)
                        .is_some_and(|rest| rest.starts_with('@')))
        });
    }

    fn snapshot(&self) -> Vec<(String, Arc<IoStats>)> {
        let exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What the server shares with the metrics endpoint.
pub(crate) struct Metrics {
    catalog: Arc<StoreCatalog>,
    store: Arc<Store>,
    ready: AtomicBool,
    started: Instant,
    usage: Mutex<Option<(Instant, StoreUsage)>>,
}

/// Store-wide usage, summed over every volume.
#[derive(Debug, Clone, Copy, Default)]
struct StoreUsage {
    tenants: u64,
    volumes: u64,
    segments: u64,
    segment_bytes: u64,
    live_bytes: u64,
}

impl Metrics {
    pub(crate) fn new(catalog: Arc<StoreCatalog>, store: Arc<Store>) -> Metrics {
        Metrics {
            catalog,
            store,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            usage: Mutex::new(None),
        }
    }

    /// Every listener is up (or, with `false`, shutdown has begun).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Store-wide usage, reused for [`USAGE_EVERY`].
    fn usage(&self) -> StoreUsage {
        let mut cached = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, usage)) = *cached
            && at.elapsed() < USAGE_EVERY
        {
            return usage;
        }
        let mut usage = StoreUsage::default();
        match self.store.tenants() {
            Ok(tenants) => {
                for tenant in tenants {
                    usage.tenants += 1;
                    let Ok(volumes) = self.store.volumes(&tenant.id) else {
                        continue;
                    };
                    for info in volumes {
                        usage.volumes += 1;
                        if let Ok(u) = self.store.volume_usage(&tenant.id, &info.id) {
                            usage.segments += u.segments;
                            usage.segment_bytes += u.segment_bytes;
                            usage.live_bytes += u.mapped_blocks * u64::from(info.block_size.get());
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::exports::error_chain(&e), "metrics: cannot list tenants");
            }
        }
        *cached = Some((Instant::now(), usage));
        usage
    }

    /// The exposition text. Blocking: it may read the store.
    pub(crate) fn render(&self) -> String {
        let mut x = Exposition::default();
        x.family(
            "blockseal_build_info",
            "gauge",
            "The running version (always 1).",
        );
        x.sample(
            "blockseal_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        x.family(
            "blockseal_ready",
            "gauge",
            "1 while the server is ready (as /readyz).",
        );
        x.sample("blockseal_ready", &[], f64::from(u8::from(self.is_ready())));
        x.family(
            "blockseal_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
        );
        x.sample(
            "blockseal_uptime_seconds",
            &[],
            self.started.elapsed().as_secs_f64(),
        );

        // Per export: requests by operation.
        let exports = self.catalog.io().snapshot();
        let labels = |export: &str| -> Vec<(&'static str, String)> {
            let (volume, snapshot) = match export.split_once('@') {
                Some((v, s)) => (v, s),
                None => (export, ""),
            };
            let (tenant, volume) = volume.split_once('/').unwrap_or(("", volume));
            let mut l = vec![("tenant", tenant.to_owned()), ("volume", volume.to_owned())];
            if !snapshot.is_empty() {
                l.push(("snapshot", snapshot.to_owned()));
            }
            l
        };
        for (name, help, pick) in [
            (
                "blockseal_requests_total",
                "NBD requests answered, by export and operation.",
                (|s: &OpStats| s.requests.load(Ordering::Relaxed)) as fn(&OpStats) -> u64,
            ),
            (
                "blockseal_request_errors_total",
                "NBD requests answered with an error, by export and operation.",
                |s: &OpStats| s.errors.load(Ordering::Relaxed),
            ),
            (
                "blockseal_request_bytes_total",
                "Bytes of NBD requests (read, written, trimmed, zeroed, described), by export and operation.",
                |s: &OpStats| s.bytes.load(Ordering::Relaxed),
            ),
        ] {
            x.family(name, "counter", help);
            for (export, stats) in &exports {
                let base = labels(export);
                for op in OPS {
                    let value = pick(&stats.ops[op.index()]);
                    if value == 0 && !matches!(op, Op::Read | Op::Write | Op::Flush) {
                        continue;
                    }
                    let mut l = base.clone();
                    l.push(("op", op.name().to_owned()));
                    x.sample_owned(name, &l, value as f64);
                }
            }
        }
        let name = "blockseal_request_duration_seconds";
        x.family(
            name,
            "histogram",
            "Time to answer NBD requests, by export and operation (read, write, flush, trim).",
        );
        for (export, stats) in &exports {
            let base = labels(export);
            for op in [Op::Read, Op::Write, Op::Flush, Op::Trim] {
                let mut l = base.clone();
                l.push(("op", op.name().to_owned()));
                x.histogram(name, &l, &stats.ops[op.index()].latency.snapshot());
            }
        }

        // Per export in service: connections; per open volume: the engine.
        let served = self.catalog.served();
        x.family(
            "blockseal_export_connections",
            "gauge",
            "Open NBD connections, by export.",
        );
        let mut by_tenant: BTreeMap<String, usize> = BTreeMap::new();
        for s in &served {
            x.sample_owned(
                "blockseal_export_connections",
                &labels(&s.name),
                s.connections as f64,
            );
            let tenant = s.name.split('/').next().unwrap_or("").to_owned();
            *by_tenant.entry(tenant).or_default() += s.connections;
        }
        x.family(
            "blockseal_tenant_connections",
            "gauge",
            "Open NBD connections, by tenant.",
        );
        for (tenant, n) in &by_tenant {
            x.sample(
                "blockseal_tenant_connections",
                &[("tenant", tenant)],
                *n as f64,
            );
        }
        // Rate limits: how often and how long they held requests back (for
        // the limiters that limit, or did).
        let limiters = self
            .catalog
            .io_limits()
            .map(|l| l.limiters())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, _, l)| !l.limit().is_unlimited() || l.throttled_requests() > 0)
            .collect::<Vec<_>>();
        for (name, help, value) in [
            (
                "blockseal_throttled_requests_total",
                "Requests held back by an I/O rate limit, by tenant (tenant limits) or tenant and volume (volume limits).",
                (|l: &blockseal_nbd::RateLimiter| l.throttled_requests() as f64)
                    as fn(&blockseal_nbd::RateLimiter) -> f64,
            ),
            (
                "blockseal_throttle_delay_seconds_total",
                "Time requests were held back by an I/O rate limit, in all.",
                |l: &blockseal_nbd::RateLimiter| l.delayed().as_secs_f64(),
            ),
        ] {
            x.family(name, "counter", help);
            for (target, tenant_wide, limiter) in &limiters {
                let l = match target.split_once('/') {
                    Some((t, v)) if !tenant_wide => {
                        vec![("tenant", t.to_owned()), ("volume", v.to_owned())]
                    }
                    _ => vec![("tenant", target.clone())],
                };
                x.sample_owned(name, &l, value(limiter));
            }
        }
        let volumes: Vec<_> = served
            .iter()
            .filter_map(|s| s.volume.map(|v| (labels(&s.name), v)))
            .collect();
        for (name, kind, help, pick) in [
            (
                "blockseal_volume_authentication_failures_total",
                "counter",
                "Blocks that failed authentication (tampered, moved or damaged) since the volume was opened.",
                (|v: &blockseal_volume::VolumeStats| v.auth_failures as f64)
                    as fn(&blockseal_volume::VolumeStats) -> f64,
            ),
            (
                "blockseal_volume_commits_total",
                "counter",
                "Flushes that synced data and committed mappings, since the volume was opened.",
                |v| v.commits as f64,
            ),
            (
                "blockseal_volume_metadata_written_bytes_total",
                "counter",
                "Metadata bytes written by mapping commits (compaction's and re-encryption's apart).",
                |v| v.metadata_bytes as f64,
            ),
            (
                "blockseal_volume_overlay_blocks",
                "gauge",
                "Block mappings written but not yet committed.",
                |v| v.overlay_blocks as f64,
            ),
            (
                "blockseal_compaction_moved_blocks_total",
                "counter",
                "Blocks compaction moved since the volume was opened.",
                |v| v.compacted_blocks as f64,
            ),
            (
                "blockseal_compaction_deleted_segments_total",
                "counter",
                "Segment files compaction deleted since the volume was opened.",
                |v| v.deleted_segments as f64,
            ),
            (
                "blockseal_compaction_metadata_written_bytes_total",
                "counter",
                "Metadata bytes written by compaction and re-encryption.",
                |v| v.compaction_metadata_bytes as f64,
            ),
            (
                "blockseal_reencrypted_blocks_total",
                "counter",
                "Blocks re-encrypted under a newer data key since the volume was opened.",
                |v| v.reencrypted_blocks as f64,
            ),
            (
                "blockseal_data_key_automatic_rotations_total",
                "counter",
                "Data key rotations the nonce budget triggered since the volume was opened.",
                |v| v.automatic_rotations as f64,
            ),
            (
                "blockseal_data_key_nonces_used",
                "gauge",
                "Nonces spent under the volume's active data key.",
                |v| v.nonces_used as f64,
            ),
            (
                "blockseal_data_key_nonce_budget",
                "gauge",
                "Nonces one data key may spend; it is rotated at half.",
                |v| v.nonce_budget as f64,
            ),
        ] {
            x.family(name, kind, help);
            for (l, v) in &volumes {
                x.sample_owned(name, l, pick(v));
            }
        }

        // The store.
        let usage = self.usage();
        for (name, help, value) in [
            (
                "blockseal_tenants",
                "Tenants in the store.",
                usage.tenants as f64,
            ),
            (
                "blockseal_volumes",
                "Volumes in the store.",
                usage.volumes as f64,
            ),
            (
                "blockseal_segments",
                "Segment files in the store.",
                usage.segments as f64,
            ),
            (
                "blockseal_segment_bytes",
                "Bytes of the store's segment files (live and dead blocks).",
                usage.segment_bytes as f64,
            ),
            (
                "blockseal_live_bytes",
                "Bytes of blocks with a committed mapping (live).",
                usage.live_bytes as f64,
            ),
            (
                "blockseal_live_ratio",
                "Live bytes over segment bytes: what compaction keeps near 1.",
                if usage.segment_bytes == 0 {
                    1.0
                } else {
                    usage.live_bytes as f64 / usage.segment_bytes as f64
                },
            ),
        ] {
            x.family(name, "gauge", help);
            x.sample(name, &[], value);
        }
        let name = "blockseal_metadata_commit_duration_seconds";
        x.family(
            name,
            "histogram",
            "Time of the store's metadata commits (a group commit serves many flushes).",
        );
        x.histogram(name, &[], &self.store.metadata_commit_latency());
        let name = "blockseal_segment_sync_duration_seconds";
        x.family(
            name,
            "histogram",
            "Time of flushes' segment syncs (one sample per flush that had data to sync).",
        );
        x.histogram(name, &[], &self.store.segment_sync_latency());

        if let Some(otlp) = crate::otlp::installed_stats() {
            tracing_exporter(&mut x, &otlp);
        }
        process(&mut x);
        x.out
    }
}

/// The OTLP exporter's counters (only when `[tracing]` is configured).
fn tracing_exporter(x: &mut Exposition, stats: &crate::otlp::Stats) {
    for (name, help, value) in [
        (
            "blockseal_otlp_exported_spans_total",
            "Tracing spans the OpenTelemetry collector accepted.",
            &stats.exported,
        ),
        (
            "blockseal_otlp_dropped_spans_total",
            "Tracing spans dropped: queue full, collector down or refusing, or left at exit.",
            &stats.dropped,
        ),
        (
            "blockseal_otlp_failed_requests_total",
            "Requests to the OpenTelemetry collector that failed.",
            &stats.failed_requests,
        ),
    ] {
        x.family(name, "counter", help);
        x.sample(name, &[], value.load(Ordering::Relaxed) as f64);
    }
}

/// The process's resident memory, open descriptors and CPU time, read from
/// `/proc/self` (standard names, as client libraries export them).
fn process(x: &mut Exposition) {
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u64>().ok())
    {
        x.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        x.sample(
            "process_resident_memory_bytes",
            &[],
            (pages * rustix::param::page_size() as u64) as f64,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        x.family("process_open_fds", "gauge", "Open file descriptors.");
        x.sample("process_open_fds", &[], fds.count() as f64);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest)
    {
        // Fields after the command: state is field 3; utime 14, stime 15.
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
            let hz = rustix::param::clock_ticks_per_second() as f64;
            x.family(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, in seconds.",
            );
            x.sample(
                "process_cpu_seconds_total",
                &[],
                (user + system) as f64 / hz,
            );
        }
    }
}

/// The text exposition being written.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    fn sample_owned(&mut self, name: &str, labels: &[(&'static str, String)], value: f64) {
        let borrowed: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.sample(name, &borrowed, value);
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples.
    fn histogram(&mut self, name: &str, labels: &[(&'static str, String)], h: &LatencySnapshot) {
        let bucket = format!("{name}_bucket");
        for (i, le) in LATENCY_BUCKETS
            .iter()
            .map(|b| number(*b))
            .chain(["+Inf".to_owned()])
            .enumerate()
        {
            let mut l = labels.to_vec();
            l.push(("le", le));
            self.sample_owned(&bucket, &l, h.cumulative[i] as f64);
        }
        self.sample_owned(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample_owned(&format!("{name}_count"), labels, h.count() as f64);
    }
}

/// A sample value as Prometheus reads it (integers without a fraction).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value, escaped: backslash, double quote and newline.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Serves metrics, health and readiness on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some((permit, (stream, _))) =
            crate::admin::server::accept_in_slot(&slots, &shutdown, "metrics", || {
                listener.accept()
            })
            .await?
        else {
            return Ok(());
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handler = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(request, metrics).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024);
            let connection = builder.serve_connection(TokioIo::new(stream), handler);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = shutdown.triggered() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn answer<B>(request: Request<B>, metrics: Arc<Metrics>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_owned(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match request.uri().path() {
        "/metrics" => {
            let body = match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(body) => body,
                Err(_) => {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the metrics could not be gathered\n".to_owned(),
                    );
                }
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if metrics.is_ready() => text(StatusCode::OK, "ready\n".to_owned()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready (starting or shutting down)\n".to_owned(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "no such path: /metrics, /healthz and /readyz are served\n".to_owned(),
        ),
    }
}
