//! TCP listeners: plain TCP only on loopback (or when explicitly allowed),
//! FORCEDTLS behaviour before the upgrade, and the tenant rule on real
//! certificates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockseal_nbd::{ServeError, Server, ServerConfig, client_tenant};
use common::mem::MemCatalog;
use common::*;

const FIXED_NO_ZEROES: u32 = 3;

#[test]
fn plain_tcp_on_a_public_address_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let server = Server::new(Arc::new(MemCatalog::standard()), ServerConfig::default());
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let r = server.serve_tcp(listener, None).await;
        assert!(matches!(r, Err(ServeError::PlainTcpRefused(_))), "{r:?}");
    });
}

#[test]
fn plain_tcp_on_loopback_or_when_allowed_serves_every_tenant() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (bind, insecure) in [("127.0.0.1:0", false), ("0.0.0.0:0", true)] {
        let mut config = ServerConfig::default();
        config.insecure_plain_tcp = insecure;
        let server = Server::new(Arc::new(MemCatalog::standard()), config);
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let serving = rt.spawn({
            let server = server.clone();
            async move { server.serve_tcp(listener, None).await }
        });
        let mut raw = Raw::connect_tcp(([127, 0, 0, 1], port).into());
        raw.handshake(FIXED_NO_ZEROES);
        raw.option(OPT_STARTTLS, b"");
        assert_eq!(raw.option_reply().1, REP_ERR_POLICY, "no TLS offered here");
        let (size, _) = raw.go("globex/disk");
        assert_eq!(size, 64 << 20);
        raw.request(0, CMD_READ, 1, 0, 512);
        assert_eq!(raw.simple_reply(), (0, 1));
        raw.read_n(512);
        server.shutdown_handle().trigger();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), serving)
                .await
                .unwrap()
                .unwrap()
                .unwrap()
        });
    }
}

#[test]
fn tls_listener_requires_starttls_first() {
    let pki = Pki::new();
    let server = TestServer::start_with(
        MemCatalog::standard(),
        ServerConfig::default(),
        Some(tls_config(&pki)),
    );
    let addr = server.tcp.unwrap();
    let mut raw = Raw::connect_tcp(addr);
    raw.handshake(FIXED_NO_ZEROES);
    // FORCEDTLS: every option but STARTTLS and ABORT, unknown ones included,
    // gets NBD_REP_ERR_TLS_REQD, and their payloads are skipped.
    for option in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, 0x4242] {
        raw.option(option, &info_payload("acme/disk", &[]));
        assert_eq!(raw.option_reply().1, REP_ERR_TLS_REQD, "option {option}");
    }
    raw.option(OPT_STARTTLS, b"data");
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);
    raw.option(OPT_ABORT, b"");
    assert_eq!(raw.option_reply().1, REP_ACK);
    assert!(raw.closed());

    // EXPORT_NAME cannot be refused with an error before TLS: the server closes.
    let mut raw = Raw::connect_tcp(addr);
    raw.handshake(FIXED_NO_ZEROES);
    raw.option(OPT_EXPORT_NAME, b"acme/disk");
    assert!(raw.closed());

    // A client without fixed newstyle cannot start TLS at all.
    let mut raw = Raw::connect_tcp(addr);
    raw.handshake(0);
    raw.option(OPT_EXPORT_NAME, b"acme/disk");
    assert!(raw.closed());
}

#[test]
fn tenant_comes_from_the_uri_san_of_real_certificates() {
    let pki = Pki::new();
    let read = |dir: &std::path::Path| {
        let pem = std::fs::read(dir.join("client-cert.pem")).unwrap();
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
    };
    let acme = pki.client("acme", Some("URI:blockseal:tenant:acme,DNS:host.example"));
    assert_eq!(client_tenant(&read(&acme)).unwrap(), "acme");
    let none = pki.client("plain", None);
    assert!(client_tenant(&read(&none)).is_err());
    let two = pki.client(
        "two",
        Some("URI:blockseal:tenant:acme,URI:blockseal:tenant:globex"),
    );
    assert!(client_tenant(&read(&two)).is_err());
}
