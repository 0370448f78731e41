//! Tracing spans over OTLP/HTTP, end to end: `serve --otlp-endpoint` against
//! a tiny collector in the test (a TCP listener that answers every
//! `POST /v1/traces` with 200 and keeps its JSON body), qemu-io traffic and
//! an admin command, a graceful stop (which flushes), then the spans: the
//! connection's span with tenant and export, its requests as its children in
//! its trace, the admin operation under its request, nothing key-like in any
//! attribute. And a server whose collector is down, or never answers, serves
//! I/O, warns once, and stops on time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use blockseal_test_support::require_all;
use blockseal_tests::{ServerProcess, StoreArg, cli_on_ok, qemu_io};
use serde_json::Value as Json;

/// One request the collector received.
struct Received {
    line: String,
    content_type: String,
    body: Json,
}

/// A collector on 127.0.0.1: every request is answered `200 {}` once its
/// body has been parsed and passed on, so whatever the server sent before it
/// exited is in the channel by then.
fn collector() -> (String, Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let received = read_request(&mut stream);
            if tx.send(received).is_err() {
                return;
            }
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
                  Connection: close\r\n\r\n{}",
            );
        }
    });
    (url, rx)
}

fn read_request(stream: &mut TcpStream) -> Received {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').expect("a header");
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    let length: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Received {
        line: line.trim_end().to_owned(),
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body: serde_json::from_slice(&body).expect("the body is JSON"),
    }
}

/// A span as received, with its attributes as plain strings.
#[derive(Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    name: String,
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
}

impl Span {
    fn attribute(&self, key: &str) -> &str {
        self.attributes
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{} has no {key}: {self:?}", self.name))
    }
}

/// The spans of every request, checking the envelope on the way: the
/// resource names the service, ids are hex of the right length, times and
/// 64-bit integers are decimal strings.
fn spans_of(requests: &[Received]) -> Vec<Span> {
    let mut spans = Vec::new();
    for request in requests {
        assert_eq!(request.line, "POST /v1/traces HTTP/1.1");
        assert_eq!(request.content_type, "application/json");
        for resource in request.body["resourceSpans"].as_array().unwrap() {
            let service = attributes(&resource["resource"]);
            assert_eq!(service["service.name"], "blockseal");
            for scope in resource["scopeSpans"].as_array().unwrap() {
                assert!(
                    scope["scope"]["name"]
                        .as_str()
                        .unwrap()
                        .starts_with("blockseal")
                );
                for span in scope["spans"].as_array().unwrap() {
                    let text = |key: &str| span[key].as_str().map(str::to_owned);
                    let hex = |s: &str, len: usize| {
                        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
                    };
                    let trace_id = text("traceId").unwrap();
                    let span_id = text("spanId").unwrap();
                    assert!(hex(&trace_id, 32) && hex(&span_id, 16), "{span}");
                    let parent = text("parentSpanId");
                    assert!(parent.as_deref().is_none_or(|p| hex(p, 16)), "{span}");
                    let time = |key: &str| -> u64 { text(key).unwrap().parse().unwrap() };
                    spans.push(Span {
                        trace_id,
                        span_id,
                        parent,
                        name: text("name").unwrap(),
                        start: time("startTimeUnixNano"),
                        end: time("endTimeUnixNano"),
                        attributes: attributes(span),
                    });
                }
            }
        }
    }
    spans
}

/// `attributes` of an OTLP object as key -> value text.
fn attributes(object: &Json) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for kv in object["attributes"].as_array().unwrap() {
        let value = &kv["value"];
        let text = if let Some(s) = value["stringValue"].as_str() {
            s.to_owned()
        } else if let Some(n) = value["intValue"].as_str() {
            n.to_owned()
        } else if let Some(b) = value["boolValue"].as_bool() {
            b.to_string()
        } else {
            value["doubleValue"].to_string()
        };
        out.insert(kv["key"].as_str().unwrap().to_owned(), text);
    }
    out
}

/// Nothing in `spans` looks like key material or block data: no attribute
/// named like a secret, no long hex run, nothing long, none of the written
/// pattern (0x5c) in any form.
fn assert_nothing_key_like(spans: &[Span]) {
    for span in spans {
        for (key, value) in &span.attributes {
            let lower = key.to_lowercase();
            for word in ["key", "secret", "passphrase", "password", "token"] {
                assert!(!lower.contains(word), "{key} in {span:?}");
            }
            let mut run = 0;
            for c in value.chars() {
                run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
                assert!(run < 32, "a hex run in {key}={value} of {span:?}");
            }
            assert!(value.len() <= 256, "{key} of {span:?}");
            assert!(
                !value.contains("5c5c") && !value.contains("92, 92"),
                "{span:?}"
            );
        }
    }
}

/// `GET path` on `addr`; the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn a_connection_and_its_requests_are_one_trace_at_the_collector() {
    require_all(&["qemu-io"]);
    let (url, received) = collector();
    let mut server = ServerProcess::demo_with_args(
        "64M",
        &["--otlp-endpoint", &url, "--metrics-address", "127.0.0.1:0"],
        "info",
    );
    assert!(
        server
            .log()
            .contains("sending tracing spans over OTLP/HTTP"),
        "{}",
        server.log()
    );
    qemu_io(
        &server.uri("demo/disk"),
        &["write -P 0x5c 0 64k", "read -P 0x5c 0 64k", "flush"],
    );
    cli_on_ok(StoreArg::DataDir(&server.data_dir()), &["volume", "list"]);
    let metrics = http_get(server.metrics.unwrap(), "/metrics");
    assert!(
        metrics.contains("\nblockseal_otlp_dropped_spans_total 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nblockseal_otlp_exported_spans_total "));
    // A graceful stop sends what is queued before the process exits.
    server.stop();
    let requests: Vec<Received> = received.try_iter().collect();
    assert!(!requests.is_empty(), "nothing reached the collector");
    let spans = spans_of(&requests);

    let conns: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "nbd" && s.attributes.contains_key("export"))
        .collect();
    let [conn] = conns.as_slice() else {
        panic!("one connection that attached an export: {conns:?}");
    };
    assert!(conn.parent.is_none(), "the connection's span is a root");
    assert_eq!(conn.attribute("tenant"), "demo");
    assert_eq!(conn.attribute("export"), "demo/disk");
    assert!(conn.attribute("peer").starts_with("unix"));
    assert_eq!(conn.attribute("code.namespace"), "blockseal_nbd::server");

    let requests: Vec<&Span> = spans.iter().filter(|s| s.name == "nbd.request").collect();
    for request in &requests {
        assert_eq!(
            request.parent.as_deref(),
            Some(conn.span_id.as_str()),
            "every request is the connection's child: {request:?}"
        );
        assert_eq!(request.trace_id, conn.trace_id, "{request:?}");
        assert!(conn.start <= request.start && request.end <= conn.end);
        assert!(request.start <= request.end);
    }
    let op = |name: &str| -> Vec<&&Span> {
        requests
            .iter()
            .filter(|r| r.attribute("op") == name)
            .collect()
    };
    let writes = op("write");
    let [write] = writes.as_slice() else {
        panic!("one write: {requests:?}");
    };
    assert_eq!(write.attribute("offset"), "0");
    assert_eq!(write.attribute("len"), "65536");
    assert_eq!(write.attribute("outcome"), "ok");
    assert!(op("read").iter().any(|r| r.attribute("len") == "65536"));
    assert!(!op("flush").is_empty());
    assert!(requests.iter().all(|r| r.attribute("outcome") == "ok"));

    // The admin command: its operation under its API request, one trace.
    let admin = spans
        .iter()
        .find(|s| s.name == "admin" && s.attribute("action") == "volume.list")
        .expect("the admin operation's span");
    assert_eq!(admin.attribute("outcome"), "ok");
    let request = spans
        .iter()
        .find(|s| Some(&s.span_id) == admin.parent.as_ref())
        .expect("the admin operation's parent");
    assert_eq!(request.name, "admin.request");
    assert_eq!(request.trace_id, admin.trace_id);
    assert_eq!(request.attribute("method"), "GET");
    assert_eq!(request.attribute("status"), "200");

    assert_nothing_key_like(&spans);
    // Span ids are unique.
    let mut ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), spans.len());
}

#[test]
fn the_server_serves_while_the_collector_is_down() {
    require_all(&["qemu-io"]);
    // An address nothing listens on: every connection is refused.
    let nobody = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", nobody.local_addr().unwrap());
    drop(nobody);
    let mut server = ServerProcess::demo_with_args("64M", &["--otlp-endpoint", &url], "info");
    let uri = server.uri("demo/disk");
    qemu_io(&uri, &["write -P 0x21 0 1M", "flush"]);
    server.wait_for_log("OTLP export failed", 1, Duration::from_secs(60));
    // Still serving after the failure, and after more spans are dropped.
    for _ in 0..3 {
        qemu_io(&uri, &["read -P 0x21 0 1M", "write -P 0x22 1M 64k"]);
    }
    let started = Instant::now();
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let log = server.log();
    // At most one line a minute, not one per span or per attempt.
    assert_eq!(log.matches("OTLP export failed").count(), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_collector_that_never_answers_does_not_hold_the_exit() {
    require_all(&["qemu-io"]);
    // Connections complete in the listen queue; nobody reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut server = ServerProcess::demo_with_args("64M", &["--otlp-endpoint", &url], "info");
    qemu_io(&server.uri("demo/disk"), &["write -P 0x31 0 64k", "flush"]);
    let started = Instant::now();
    server.stop();
    // The server's own shutdown, then at most 5 s for the exporter.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}
