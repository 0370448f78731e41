//! Tracing spans: each request taken in is an `nbd.request` span under its
//! connection's `nbd` span, with its operation, range and outcome; the
//! connection's span names the tenant and the export.

mod common;

use common::*;

const FIXED: u32 = 1;
const NO_ZEROES: u32 = 2;

/// The closed spans once the connection span with `export` has closed: that
/// connection's span and its request spans, in the order they closed.
fn connection_spans(server: &TestServer, export: &str) -> (ClosedSpan, Vec<ClosedSpan>) {
    let is_conn = |s: &ClosedSpan| {
        s.name == "nbd" && s.fields.get("export").map(String::as_str) == Some(export)
    };
    wait_until(
        &format!("the connection to {export} to close"),
        WAIT,
        || server.closed_spans().iter().any(is_conn),
    );
    let spans = server.closed_spans();
    let conn = spans.iter().find(|s| is_conn(s)).unwrap().clone();
    let requests = spans
        .into_iter()
        .filter(|s| s.name == "nbd.request" && s.parent.map(|p| p.0) == Some(conn.id))
        .collect();
    (conn, requests)
}

/// The value of `field` in `span`.
#[track_caller]
fn field<'a>(span: &'a ClosedSpan, field: &str) -> &'a str {
    span.fields
        .get(field)
        .unwrap_or_else(|| panic!("{} has no {field}: {span:?}", span.name))
}

#[test]
fn requests_are_spans_under_their_connection_with_their_outcome() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.go("acme/disk");
    // A small write (run on the connection's task), a large read (on a
    // worker thread), a flush, and a read past the end (refused).
    raw.request(0, CMD_WRITE, 1, 4096, 4096);
    raw.send(&[0x33; 4096]);
    assert_eq!(raw.simple_reply(), (0, 1));
    raw.request(0, CMD_READ, 2, 0, 1 << 20);
    assert_eq!(raw.simple_reply(), (0, 2));
    raw.read_n(1 << 20);
    raw.request(0, CMD_FLUSH, 3, 0, 0);
    assert_eq!(raw.simple_reply(), (0, 3));
    raw.request(0, CMD_READ, 4, 64 << 20, 512);
    assert_eq!(raw.simple_reply(), (EINVAL, 4));
    raw.disconnect_and_close_write();

    let (conn, requests) = connection_spans(&server, "acme/disk");
    assert_eq!(field(&conn, "tenant"), "acme");
    assert!(field(&conn, "peer").starts_with("unix"), "{conn:?}");
    assert!(
        conn.parent.is_none(),
        "the connection span is a root: {conn:?}"
    );
    let by_handle = |handle: &str| {
        requests
            .iter()
            .find(|s| field(s, "handle") == handle)
            .unwrap_or_else(|| panic!("no span of request {handle}: {requests:?}"))
    };
    let write = by_handle("1");
    assert_eq!(field(write, "op"), "write");
    assert_eq!(field(write, "offset"), "4096");
    assert_eq!(field(write, "len"), "4096");
    assert_eq!(field(write, "fua"), "false");
    assert_eq!(field(write, "outcome"), "ok");
    assert!(!write.fields.contains_key("error"), "{write:?}");
    let read = by_handle("2");
    assert_eq!(field(read, "op"), "read");
    assert_eq!(field(read, "len"), (1u32 << 20).to_string());
    assert_eq!(field(read, "outcome"), "ok");
    assert_eq!(field(by_handle("3"), "op"), "flush");
    assert_eq!(field(by_handle("3"), "outcome"), "ok");
    let refused = by_handle("4");
    assert_eq!(field(refused, "outcome"), "refused");
    assert_eq!(
        field(refused, "error"),
        "request reaches past the end of the export"
    );
    // The disconnect request is not a request span.
    assert_eq!(requests.len(), 4, "{requests:?}");
    // No field holds data: the write's bytes appear nowhere.
    for span in requests.iter().chain([&conn]) {
        for value in span.fields.values() {
            assert!(!value.contains("51, 51, 51"), "{span:?}");
            assert!(value.len() < 100, "{span:?}");
        }
    }
}

#[test]
fn a_failed_request_names_its_error_class() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.go("acme/tampered");
    // The block at 1 MiB fails authentication.
    raw.request(0, CMD_READ, 9, 1 << 20, 4096);
    assert_eq!(raw.simple_reply(), (EIO, 9));
    raw.disconnect_and_close_write();

    let (conn, requests) = connection_spans(&server, "acme/tampered");
    assert_eq!(field(&conn, "tenant"), "acme");
    let [read] = requests.as_slice() else {
        panic!("one request span: {requests:?}");
    };
    assert_eq!(field(read, "op"), "read");
    assert_eq!(field(read, "outcome"), "error");
    assert_eq!(field(read, "error"), "authentication");
}
