//! The exporter against in-process collectors: a working one, one that is
//! down (nothing listens) and one that never answers; the layer's span tree
//! and sampling under a registry of its own; the JSON against the OTLP
//! mapping.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::sync::mpsc::Receiver;

use serde_json::Value as Json;
use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// A tuning under which the exporter's thread sends nothing before the
/// shutdown (unless a batch of `batch` fills).
fn idle(batch: usize, queue: usize) -> Tuning {
    Tuning {
        queue_spans: queue,
        batch_spans: batch,
        interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(5),
    }
}

fn settings(endpoint: &str, ratio: f64, spans: &str) -> Settings {
    Settings {
        endpoint: endpoint.parse().unwrap(),
        service_name: "blockseal-test".into(),
        sample_ratio: ratio,
        spans: spans.parse().unwrap(),
    }
}

/// An address nothing listens on.
fn nobody() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

/// One request a collector received: the request line, its Content-Type
/// and its body as JSON.
struct Received {
    line: String,
    content_type: String,
    body: Json,
}

/// A collector on 127.0.0.1 answering every request with `status`.
fn collector(status: u16) -> (String, Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let Some(received) = read_request(&mut stream) else {
                continue;
            };
            let answer = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
                 Connection: close\r\n\r\n{{}}"
            );
            let _ = stream.write_all(answer.as_bytes());
            if tx.send(received).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

fn read_request(stream: &mut TcpStream) -> Option<Received> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut length = 0usize;
    let mut content_type = String::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "content-type" => content_type = value.trim().to_owned(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Received {
        line: line.trim_end().to_owned(),
        content_type,
        body: serde_json::from_slice(&body).ok()?,
    })
}

/// The spans of an OTLP JSON request, each with its scope's name.
fn spans_of(body: &Json) -> Vec<(String, Json)> {
    let mut out = Vec::new();
    for resource in body["resourceSpans"].as_array().unwrap() {
        for scope in resource["scopeSpans"].as_array().unwrap() {
            let name = scope["scope"]["name"].as_str().unwrap().to_owned();
            for span in scope["spans"].as_array().unwrap() {
                out.push((name.clone(), span.clone()));
            }
        }
    }
    out
}

/// The attribute `key` of a JSON span, as its AnyValue.
fn attribute<'a>(span: &'a Json, key: &str) -> Option<&'a Json> {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv["key"] == key)
        .map(|kv| &kv["value"])
}

/// Runs `f` with `layer` filtered by `spans`, beside a layer that takes
/// everything (as the log does in the server, so spans the exporter refuses
/// still exist).
fn with_layer(layer: OtlpLayer, spans: &str, f: impl FnOnce()) {
    let filter = SpanFilter(spans.parse().unwrap());
    let everything = tracing_subscriber::layer::Identity::new().with_filter(LevelFilter::TRACE);
    let subscriber = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .with(everything);
    tracing::subscriber::with_default(subscriber, f);
}

/// What a queued span holds, for assertions.
struct Queued {
    name: &'static str,
    trace_id: u128,
    span_id: u64,
    parent_id: Option<u64>,
    attributes: Vec<(&'static str, Value)>,
}

/// The spans waiting in `exporter`'s queue.
fn queued(exporter: &Exporter) -> Vec<Queued> {
    exporter
        .shared
        .lock()
        .spans
        .iter()
        .map(|s| Queued {
            name: s.name,
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_id: s.parent_id,
            attributes: s.attributes.values.clone(),
        })
        .collect()
}

#[test]
fn endpoints_are_plain_http_urls() {
    let e: Endpoint = "http://127.0.0.1:4318".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 4318));
    assert_eq!(e.traces_path(), "/v1/traces");
    assert_eq!(e.to_string(), "http://127.0.0.1:4318");
    let e: Endpoint = "http://collector.internal/otlp/".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("collector.internal", 80));
    assert_eq!(e.traces_path(), "/otlp/v1/traces");
    assert_eq!(e.authority, "collector.internal");
    let e: Endpoint = "http://[::1]:4318".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("::1", 4318));
    assert_eq!(e.authority, "[::1]:4318");
    for (bad, says) in [
        ("https://collector:4318", "https is not supported"),
        ("collector:4318", "expected http://"),
        ("http://", "no host"),
        ("http://:4318", "no host"),
        ("http://collector:0", "not a port"),
        ("http://collector:port", "not a port"),
        ("http://user:secret@collector:4318", "no credentials"),
        ("http://collector:4318/v1?x=1", "no credentials, query"),
        ("http://[::1", "closing ]"),
    ] {
        let error = bad.parse::<Endpoint>().unwrap_err();
        assert!(error.contains(says), "{bad}: {error}");
    }
}

#[test]
fn spans_form_a_tree_in_one_trace() {
    let (layer, exporter) =
        start_with(settings(&nobody(), 1.0, DEFAULT_SPANS), idle(1000, 1000)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || {
        let conn = tracing::info_span!(
            target: "blockseal_nbd::server",
            "nbd",
            conn = 7u64,
            tenant = tracing::field::Empty
        );
        conn.record("tenant", "acme");
        let request = tracing::debug_span!(
            target: "blockseal_nbd::transmission",
            parent: &conn,
            "nbd.request",
            op = "read",
            outcome = tracing::field::Empty
        );
        // Entered on another thread, as a worker does: the parent is explicit.
        std::thread::scope(|s| {
            s.spawn(|| {
                let _entered = request.enter();
                request.record("outcome", "ok");
            });
        });
        drop(request);
        // A span of another root is another trace.
        drop(tracing::info_span!(target: "blockseal::admin", "admin"));
        drop(conn);
    });
    let spans = queued(&exporter);
    let names: Vec<&str> = spans.iter().map(|s| s.name).collect();
    assert_eq!(names, ["nbd.request", "admin", "nbd"]);
    let (request, admin, conn) = (&spans[0], &spans[1], &spans[2]);
    assert_eq!(conn.parent_id, None, "the connection is a root");
    assert_eq!(request.trace_id, conn.trace_id, "one trace");
    assert_eq!(
        request.parent_id,
        Some(conn.span_id),
        "the request's parent"
    );
    assert_ne!(admin.trace_id, conn.trace_id, "another trace");
    assert_ne!(request.span_id, conn.span_id);
    assert_eq!(
        conn.attributes,
        [
            ("conn", Value::Int(7)),
            ("tenant", Value::Text("acme".into()))
        ]
    );
    assert_eq!(
        request.attributes,
        [
            ("op", Value::Text("read".into())),
            ("outcome", Value::Text("ok".into()))
        ]
    );
    exporter.shutdown(Duration::from_secs(5));
}

#[test]
fn the_filter_takes_spans_by_target_and_level_never_events() {
    let (layer, exporter) =
        start_with(settings(&nobody(), 1.0, DEFAULT_SPANS), idle(1000, 1000)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || {
        let kept = tracing::debug_span!(target: "blockseal_nbd::transmission", "kept");
        let _in = kept.enter();
        tracing::info!(target: "blockseal_nbd::transmission", "an event is not a span");
        drop(tracing::debug_span!(target: "blockseal::admin", "debug elsewhere"));
        drop(tracing::trace_span!(target: "blockseal_nbd::transmission", "trace"));
        // Under a span the filter refuses, the parent is the nearest it took.
        let refused = tracing::debug_span!(target: "blockseal::admin", "refused");
        let child = tracing::info_span!(target: "blockseal::admin", parent: &refused, "child");
        drop(child);
    });
    let spans = queued(&exporter);
    let names: Vec<&str> = spans.iter().map(|s| s.name).collect();
    assert_eq!(names, ["child", "kept"]);
    assert_eq!(
        spans[0].parent_id,
        Some(spans[1].span_id),
        "child's nearest exported ancestor"
    );
    exporter.shutdown(Duration::from_secs(5));
}

#[test]
fn a_trace_is_sampled_whole_or_not_at_all() {
    let (layer, exporter) =
        start_with(settings(&nobody(), 0.0, DEFAULT_SPANS), idle(1000, 1000)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || {
        let root = tracing::info_span!("root");
        drop(tracing::info_span!(parent: &root, "child", op = "read"));
    });
    assert!(queued(&exporter).is_empty());
    exporter.shutdown(Duration::from_secs(5));

    // The decision is the trace id's: about the ratio of traces.
    let ids = Ids::new();
    let half = Sampler::new(0.5);
    let kept = (0..10_000).filter(|_| half.samples(ids.trace_id())).count();
    assert!((4_500..5_500).contains(&kept), "{kept}");
    assert!((0..1000).all(|_| Sampler::new(1.0).samples(ids.trace_id())));
    assert!((0..1000).all(|_| !Sampler::new(0.0).samples(ids.trace_id())));
    assert!(!Sampler::new(f64::NAN).samples(u128::MAX));
}

#[test]
fn ids_never_repeat_and_are_never_zero() {
    let ids = Ids::new();
    let mut seen = HashSet::new();
    for _ in 0..100_000 {
        let id = ids.span_id();
        assert_ne!(id, 0);
        assert!(seen.insert(id));
    }
    assert_ne!(Ids::new().span_id(), Ids::new().span_id());
}

#[test]
fn values_are_cut_and_attributes_bounded() {
    let mut fields = Fields::default();
    let long = "é".repeat(200);
    fields.set("long", Value::Text(cut(&long).to_owned()));
    let Some(Value::Text(kept)) = fields.get("long") else {
        panic!("text");
    };
    assert!(kept.len() <= MAX_VALUE_BYTES && kept.len() > MAX_VALUE_BYTES - 2);
    assert!(kept.chars().all(|c| c == 'é'));
    for i in 0..40 {
        let key: &'static str = Box::leak(format!("k{i}").into_boxed_str());
        fields.set(key, Value::Int(i));
    }
    assert_eq!(fields.values.len(), MAX_ATTRIBUTES);
    assert_eq!(fields.dropped, 41 - MAX_ATTRIBUTES as u32);
    fields.set("long", Value::Bool(true));
    assert_eq!(fields.get("long"), Some(&Value::Bool(true)));
}

#[test]
fn the_request_is_otlp_json() {
    let sender = Sender::new(&settings("http://127.0.0.1:4318", 1.0, DEFAULT_SPANS));
    let mut fields = Fields::default();
    fields.set("op", Value::Text("read".into()));
    fields.set("offset", Value::Int(4096));
    fields.set("fua", Value::Bool(false));
    fields.set("ratio", Value::Double(0.5));
    fields.set("error", Value::Text("authentication".into()));
    let failed = Finished {
        trace_id: 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10,
        span_id: 0xab,
        parent_id: Some(0xcd),
        name: "nbd.request",
        target: "blockseal_nbd::transmission",
        start_unix_nanos: 1_700_000_000_000_000_000,
        end_unix_nanos: 1_700_000_000_000_001_000,
        attributes: fields,
    };
    let root = Finished {
        trace_id: 1,
        span_id: 2,
        parent_id: None,
        name: "admin",
        target: "blockseal::admin::service",
        start_unix_nanos: 5,
        end_unix_nanos: 6,
        attributes: Fields::default(),
    };
    let body: Json = serde_json::from_slice(&sender.encode(&[failed, root])).unwrap();
    let resource = &body["resourceSpans"][0]["resource"];
    assert_eq!(
        attribute(resource, "service.name"),
        Some(&serde_json::json!({"stringValue": "blockseal-test"}))
    );
    assert!(attribute(resource, "service.version").is_some());
    let spans = spans_of(&body);
    let scopes: Vec<&str> = spans.iter().map(|(scope, _)| scope.as_str()).collect();
    assert_eq!(scopes, ["blockseal", "blockseal_nbd"]);
    let admin = &spans[0].1;
    assert!(admin.get("parentSpanId").is_none(), "{admin}");
    assert!(admin.get("status").is_none(), "{admin}");
    assert_eq!(admin["traceId"], "00000000000000000000000000000001");
    let span = &spans[1].1;
    assert_eq!(span["traceId"], "0102030405060708090a0b0c0d0e0f10");
    assert_eq!(span["spanId"], "00000000000000ab");
    assert_eq!(span["parentSpanId"], "00000000000000cd");
    assert_eq!(span["name"], "nbd.request");
    assert_eq!(span["kind"], 1);
    assert_eq!(span["startTimeUnixNano"], "1700000000000000000");
    assert_eq!(span["endTimeUnixNano"], "1700000000000001000");
    assert_eq!(
        attribute(span, "op"),
        Some(&serde_json::json!({"stringValue": "read"}))
    );
    assert_eq!(
        attribute(span, "offset"),
        Some(&serde_json::json!({"intValue": "4096"}))
    );
    assert_eq!(
        attribute(span, "fua"),
        Some(&serde_json::json!({"boolValue": false}))
    );
    assert_eq!(
        attribute(span, "ratio"),
        Some(&serde_json::json!({"doubleValue": 0.5}))
    );
    assert_eq!(
        attribute(span, "code.namespace"),
        Some(&serde_json::json!({"stringValue": "blockseal_nbd::transmission"}))
    );
    assert_eq!(
        span["status"],
        serde_json::json!({"code": 2, "message": "authentication"})
    );
}

#[test]
fn spans_reach_the_collector_in_batches_and_the_rest_at_exit() {
    let (url, received) = collector(200);
    let (layer, exporter) = start_with(settings(&url, 1.0, DEFAULT_SPANS), idle(4, 100)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || {
        for i in 0..10u64 {
            drop(tracing::info_span!("job", i));
        }
    });
    // A full batch goes at once, without waiting for the interval.
    let first = received.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first.line, "POST /v1/traces HTTP/1.1");
    assert_eq!(first.content_type, "application/json");
    assert_eq!(spans_of(&first.body).len(), 4);
    exporter.shutdown(Duration::from_secs(10));
    let mut spans = spans_of(&first.body);
    spans.extend(received.try_iter().flat_map(|r| spans_of(&r.body)));
    let mut seen: Vec<i64> = spans
        .iter()
        .map(|(_, s)| {
            attribute(s, "i").unwrap()["intValue"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[test]
fn a_collector_that_is_down_costs_dropped_spans_not_time() {
    let (layer, exporter) =
        start_with(settings(&nobody(), 1.0, DEFAULT_SPANS), idle(1000, 8)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || {
        for _ in 0..20 {
            drop(tracing::info_span!("job"));
        }
    });
    // Past the queue's bound, spans are dropped at once.
    assert_eq!(exporter.shared.stats.dropped.load(Ordering::Relaxed), 12);
    let stats = exporter.shared.stats.clone();
    let started = Instant::now();
    exporter.shutdown(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 20);
    assert_eq!(stats.exported.load(Ordering::Relaxed), 0);
    assert_eq!(stats.failed_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn a_collector_that_never_answers_does_not_hold_the_exit() {
    // Connections complete in the listen queue; nothing reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (layer, exporter) =
        start_with(settings(&url, 1.0, DEFAULT_SPANS), idle(1000, 100)).unwrap();
    with_layer(layer, DEFAULT_SPANS, || drop(tracing::info_span!("job")));
    let stats = exporter.shared.stats.clone();
    let started = Instant::now();
    exporter.shutdown(Duration::from_millis(500));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The thread gives up by the same deadline, so the span is counted.
    wait_for(|| stats.dropped.load(Ordering::Relaxed) == 1);
    drop(listener);
}

#[test]
fn refusals_and_retries_follow_otlp_http() {
    for code in [429, 502, 503, 504] {
        assert!(PostError::Status(code).retryable(), "{code}");
    }
    for code in [400, 401, 404, 413, 500] {
        assert!(!PostError::Status(code).retryable(), "{code}");
    }
    assert!(PostError::Io(std::io::ErrorKind::ConnectionRefused.into()).retryable());

    // A collector that refuses a batch for good: dropped without a retry.
    let (url, received) = collector(400);
    let tuning = Tuning {
        interval: Duration::from_millis(10),
        ..idle(1000, 100)
    };
    let (layer, exporter) = start_with(settings(&url, 1.0, DEFAULT_SPANS), tuning).unwrap();
    with_layer(layer, DEFAULT_SPANS, || drop(tracing::info_span!("job")));
    received.recv_timeout(Duration::from_secs(30)).unwrap();
    let stats = exporter.shared.stats.clone();
    wait_for(|| stats.dropped.load(Ordering::Relaxed) == 1);
    exporter.shutdown(Duration::from_secs(5));
    assert_eq!(stats.failed_requests.load(Ordering::Relaxed), 1);
    assert!(received.try_recv().is_err(), "no second request");
}

#[test]
fn warnings_come_at_most_once_a_minute() {
    let endpoint: Endpoint = "http://127.0.0.1:9".parse().unwrap();
    let stats = Stats::default();
    let mut warnings = Warnings::new();
    assert!(!warnings.report(&stats, &endpoint), "nothing to say");
    warnings.failed(&PostError::Status(503));
    stats.dropped.fetch_add(3, Ordering::Relaxed);
    assert!(warnings.report(&stats, &endpoint));
    warnings.failed(&PostError::Status(503));
    stats.dropped.fetch_add(3, Ordering::Relaxed);
    assert!(!warnings.report(&stats, &endpoint), "within the minute");
    // A minute later, one line for everything since.
    warnings.last = Some(Instant::now() - WARN_EVERY);
    assert!(warnings.report(&stats, &endpoint));
    assert_eq!(warnings.dropped_reported, 6);
}

/// Waits (bounded) until `condition` holds.
fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}
