//! Metrics, health and readiness over HTTP, end to end: a server with a
//! `[metrics]` address, qemu-io traffic on two tenants' volumes, a held
//! python3-libnbd connection, a tampered block read back; then `/metrics`
//! parsed strictly (every sample under a declared family, histograms
//! cumulative with `_count` equal to the `+Inf` bucket) and its numbers
//! checked against what was done; `/healthz`, `/readyz`, and the answers to a
//! wrong path or method.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blockseal_test_support::{python, require_all, run, temp_dir, wait_until};
use blockseal_tests::{ServerProcess, StoreArg, cli_on_ok, configure_host, qemu_io};

/// One HTTP/1.1 request; the status and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("cannot reach the metrics address");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response has a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    // Chunked or not, the test reads small bodies: undo chunking if used.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Samples by name and sorted labels (`k="v",...`).
type Samples = BTreeMap<(String, String), f64>;

/// Parses the exposition strictly; panics on anything malformed.
fn parse(text: &str) -> Samples {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "declared twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("labels end with }")),
            None => (series, ""),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name {name}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no # TYPE before it");
        if family.ends_with("_total") || types[family] == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        }
        let mut pairs: Vec<&str> = if labels.is_empty() {
            Vec::new()
        } else {
            labels.split(',').collect()
        };
        for p in &pairs {
            let (k, v) = p.split_once('=').expect("label k=v");
            assert!(
                !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                "{line}"
            );
        }
        pairs.sort();
        assert!(
            samples
                .insert((name.to_owned(), pairs.join(",")), value)
                .is_none(),
            "duplicate series {line}"
        );
    }
    // Histograms: buckets cumulative, _count equal to the +Inf bucket.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), v) in &samples {
            if name != &bucket {
                continue;
            }
            let mut rest = Vec::new();
            let mut le = None;
            for p in labels.split(',') {
                match p.strip_prefix("le=") {
                    Some(l) => le = Some(l.trim_matches('"').to_owned()),
                    None => rest.push(p),
                }
            }
            let le = le.expect("a bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            by_series.entry(rest.join(",")).or_default().push((le, *v));
        }
        for (labels, mut buckets) in by_series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in buckets.windows(2) {
                assert!(w[0].1 <= w[1].1, "{family}{{{labels}}} not cumulative");
            }
            let count = samples[&(format!("{family}_count"), labels.clone())];
            assert_eq!(
                buckets.last().unwrap(),
                &(f64::INFINITY, count),
                "{family}{{{labels}}}"
            );
            assert!(samples.contains_key(&(format!("{family}_sum"), labels)));
        }
    }
    samples
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort();
    *samples
        .get(&(name.to_owned(), l.join(",")))
        .unwrap_or_else(|| panic!("no sample {name}{{{}}}", l.join(",")))
}

fn scrape(addr: SocketAddr) -> Samples {
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// Flips a byte in the middle of the first block of every segment file of
/// the volumes under `segments` (the store's `segments/` directory).
fn tamper_first_blocks(segments: &Path) {
    for volume in std::fs::read_dir(segments).unwrap() {
        for segment in std::fs::read_dir(volume.unwrap().path()).unwrap() {
            let path = segment.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if bytes.len() >= 4096 {
                bytes[2048] ^= 0x40;
                std::fs::write(&path, &bytes).unwrap();
            }
        }
    }
}

#[test]
fn metrics_count_what_clients_did_and_health_answers() {
    require_all(&["qemu-io"]);
    let tmp = temp_dir();
    let host = tmp.path().join("host");
    let config = configure_host(&host, None);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\n");
    std::fs::write(&config, text).unwrap();
    let store = StoreArg::Config(&config);
    for args in [
        &["tenant", "create", "acme"][..],
        &["tenant", "create", "globex"],
        &["volume", "create", "acme/rec", "--size", "8M"],
        &["volume", "create", "globex/rec", "--size", "8M"],
    ] {
        cli_on_ok(store, args);
    }
    let server = ServerProcess::with_config(&host, &config);
    let addr = server
        .metrics
        .expect("the readiness line names the metrics address");

    assert_eq!(http(addr, "GET", "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http(addr, "GET", "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(http(addr, "GET", "/nothing").0, 404);
    assert_eq!(http(addr, "POST", "/metrics").0, 405);

    // 3 writes of 64 KiB and one flush on acme; 2 reads of 4 KiB on globex.
    qemu_io(
        &server.uri("acme/rec"),
        &[
            "write -P 0x11 0 64k",
            "write -P 0x12 64k 64k",
            "write -P 0x13 1M 64k",
            "flush",
        ],
    );
    qemu_io(&server.uri("globex/rec"), &["read 0 4k", "read 4k 4k"]);
    let s = scrape(addr);
    let acme = [("tenant", "acme"), ("volume", "rec")];
    let with_op = |labels: &[(&'static str, &'static str)], op: &'static str| {
        let mut l = labels.to_vec();
        l.push(("op", op));
        l
    };
    assert_eq!(
        value(&s, "blockseal_requests_total", &with_op(&acme, "write")),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "blockseal_request_bytes_total",
            &with_op(&acme, "write")
        ),
        3.0 * 65536.0
    );
    assert!(value(&s, "blockseal_requests_total", &with_op(&acme, "flush")) >= 1.0);
    let globex = [("tenant", "globex"), ("volume", "rec")];
    assert!(value(&s, "blockseal_requests_total", &with_op(&globex, "read")) >= 2.0);
    let mut le = with_op(&acme, "write");
    le.push(("le", "+Inf"));
    assert_eq!(
        value(&s, "blockseal_request_duration_seconds_bucket", &le),
        3.0
    );
    assert!(value(&s, "blockseal_volume_commits_total", &acme) >= 1.0);
    assert!(value(&s, "blockseal_data_key_nonces_used", &acme) >= 3.0 * 16.0);
    assert!(value(&s, "blockseal_data_key_nonce_budget", &acme) > 0.0);
    assert_eq!(value(&s, "blockseal_tenants", &[]), 2.0);
    assert_eq!(value(&s, "blockseal_volumes", &[]), 2.0);
    assert!(value(&s, "blockseal_metadata_commit_duration_seconds_count", &[]) >= 1.0);
    // The writes above were flushed (commits counted), so their data was synced.
    assert!(value(&s, "blockseal_segment_sync_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&s, "process_open_fds", &[]) >= 3.0);
    assert_eq!(value(&s, "blockseal_export_connections", &acme), 0.0);

    // A held connection shows in the export's and the tenant's gauges.
    let mut held = python(&format!(
        "import nbd, sys\n\
         h = nbd.NBD()\n\
         h.connect_uri({:?})\n\
         print('connected', flush=True)\n\
         sys.stdin.readline()\n\
         h.shutdown()\n",
        server.uri("acme/rec")
    ))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("cannot start the client");
    let mut line = String::new();
    BufReader::new(held.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    let s = scrape(addr);
    assert_eq!(value(&s, "blockseal_export_connections", &acme), 1.0);
    assert_eq!(
        value(&s, "blockseal_tenant_connections", &[("tenant", "acme")]),
        1.0
    );
    drop(held.stdin.take());
    assert!(held.wait().unwrap().success());
    wait_until("the connection to close", Duration::from_secs(30), || {
        value(&scrape(addr), "blockseal_export_connections", &acme) == 0.0
    });

    // A tampered block: the read fails, and the failure is counted.
    tamper_first_blocks(&host.join("data/segments"));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &server.uri("acme/rec"),
        "-c",
        "read 0 4k",
    ]));
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Input/output error"), "{said}");
    let s = scrape(addr);
    assert!(value(&s, "blockseal_volume_authentication_failures_total", &acme) >= 1.0);
    assert!(
        value(
            &s,
            "blockseal_request_errors_total",
            &with_op(&acme, "read")
        ) >= 1.0
    );
    // Labels and help name no key material: only the names the admin API lists.
    let (_, body) = http(addr, "GET", "/metrics");
    for needle in ["master.key", "seed", "dek=", "kek="] {
        assert!(!body.contains(needle), "{needle} in the metrics");
    }
}
