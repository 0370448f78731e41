//! Protocol conformance through libnbd (python3-libnbd): option haggling,
//! legacy handshakes, every command, the errors the spec asks for, concurrency,
//! raw-socket options, and tenant scoping over TLS.

mod common;

use std::path::Path;
use std::process::Command;

use blockseal_nbd::ServerConfig;
use common::mem::MemCatalog;
use common::*;

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/libnbd_conformance.py"
    ))
}

#[test]
fn libnbd_conformance_on_a_unix_socket() {
    require_python_nbd();
    let server = TestServer::start();
    let out = run_ok(
        Command::new(PYTHON)
            .arg(script())
            .arg("unix")
            .arg(&server.socket),
    );
    assert!(out.contains("all checks passed"), "{out}");
    assert_eq!(server.server.stats().authentication_failures, 1);
}

#[test]
fn libnbd_over_tls_sees_only_its_tenant() {
    require_python_nbd();
    let pki = Pki::new();
    let acme = pki.client("acme", Some("URI:blockseal:tenant:acme"));
    let no_tenant = pki.client("nobody", Some("URI:https://example.org/nobody"));
    let ca_only = pki.ca_only("ca-only");
    let server = TestServer::start_with(
        MemCatalog::standard(),
        ServerConfig::default(),
        Some(tls_config(&pki)),
    );
    let port = server.tcp.unwrap().port().to_string();
    let out = run_ok(
        Command::new(PYTHON)
            .arg(script())
            .args(["tls", &port])
            .arg(&acme)
            .arg(&no_tenant)
            .arg(&ca_only),
    );
    assert!(out.contains("all checks passed"), "{out}");
    // The TLS client wrote to acme/disk; globex/disk is untouched.
    assert_eq!(server.catalog.get("acme/disk").peek(0, 1), [0x42]);
    assert_eq!(server.catalog.get("globex/disk").peek(0, 1), [0]);
}
