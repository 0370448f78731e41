//! TLS on TCP with client certificates naming the tenant: tenant alpha reaches
//! its own export and lists only its own, is refused bravo's, and a client
//! without a certificate is refused. The Unix socket still sees everything.

use std::path::Path;
use std::process::Command;

use blockseal_test_support::{
    Pki, nbdsh, path_str as p, require, require_python_nbd, run, run_ok, temp_dir,
};
use blockseal_tests::{ServerProcess, blockseal_ok};

#[test]
fn tenants_see_only_their_exports() {
    require("nbdinfo");
    require_python_nbd();
    let pki = Pki::new();
    let alpha = pki.tenant_client("alpha", "alpha");
    let bravo = pki.tenant_client("bravo", "bravo");
    let anonymous = pki.ca_only("anonymous");
    let (cert, key, ca) = pki.server_files();

    let dir = temp_dir();
    let d = dir.path();
    blockseal_ok(&["key", "init", "--out", p(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"

[master_key]
file = "master.key"

[unix]
path = "nbd.sock"
mode = "0600"

[tcp]
address = "127.0.0.1:0"

[tcp.tls]
cert = "{}"
key = "{}"
client_ca = "{}"
"#,
            cert.display(),
            key.display(),
            ca.display()
        ),
    )
    .unwrap();
    let c = p(&config);
    for tenant in ["alpha", "bravo"] {
        blockseal_ok(&["tenant", "create", tenant, "--config", c]);
    }
    for (export, size) in [
        ("alpha/disk", "4M"),
        ("alpha/logs", "1M"),
        ("bravo/disk", "2M"),
    ] {
        blockseal_ok(&["volume", "create", export, "--size", size, "--config", c]);
    }

    let server = ServerProcess::with_config(d, &config);
    let port = server
        .tcp
        .expect("the readiness line names the TCP address")
        .port();
    let uri = |export: &str, certs: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            certs.display()
        )
    };

    // Alpha reads and writes its own export.
    let size = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(uri("alpha/disk", &alpha)),
    );
    assert_eq!(size.trim(), "4194304");
    let script = format!(
        "h.set_uri_allow_local_file(True)\n\
         h.connect_uri({:?})\n\
         h.pwrite(b'tenant alpha' * 100, 8192)\n\
         h.flush()\n\
         assert h.pread(1200, 8192) == b'tenant alpha' * 100\n",
        uri("alpha/disk", &alpha)
    );
    run_ok(nbdsh().args(["-c", &script]));

    // Bravo's export does not exist for alpha; bravo sees its own.
    let refused = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(uri("bravo/disk", &alpha)));
    assert!(!refused.status.success(), "alpha opened bravo/disk");
    let size = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(uri("bravo/disk", &bravo)),
    );
    assert_eq!(size.trim(), "2097152");

    // Without a client certificate there is no tenant: refused.
    let refused = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(uri("alpha/disk", &anonymous)));
    assert!(
        !refused.status.success(),
        "a client without a certificate got in"
    );
    // Plain NBD on the TLS port is refused too.
    let plain = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://127.0.0.1:{port}/alpha/disk")));
    assert!(!plain.status.success(), "plain NBD on the TLS port got in");

    // Listing shows only the client's own tenant.
    let list = run_ok(Command::new("nbdinfo").arg("--list").arg(uri("", &alpha)));
    assert!(list.contains("export=\"alpha/disk\""), "{list}");
    assert!(list.contains("export=\"alpha/logs\""), "{list}");
    assert!(!list.contains("bravo"), "{list}");

    // The Unix socket (guarded by its 0600 mode) sees every tenant.
    let socket = server.socket.as_ref().unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", socket.display())),
    );
    assert!(
        list.contains("alpha/disk") && list.contains("bravo/disk"),
        "{list}"
    );
    // libnbd sends the IP address it connects to as the server name; rustls
    // ignores it, and the server's log stays quiet about it.
    let log = server.log();
    assert!(!log.contains("Illegal SNI"), "{log}");
}
