//! `blockseal serve` with `[object_store]`: metadata and segments in a bucket
//! of a moto S3 server the test starts on loopback. Real clients write
//! through NBD, the server stops or is killed, and what was flushed reads
//! back after a restart; the data directory keeps no metadata or segment.

use std::path::Path;
use std::process::Command;

use blockseal_test_support::moto::{BUCKET, CREDENTIAL, moto, unique_prefix};
use blockseal_test_support::{require_all, run_ok};
use blockseal_tests::{
    ServerProcess, StoreArg, cli_on_ok, configure_host, qemu_io, random_file, sha256,
};

/// A host whose store lives under a fresh prefix of the test bucket.
fn host_on_s3(dir: &Path) -> std::path::PathBuf {
    let config = configure_host(dir, None);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[object_store]\nbucket = \"{BUCKET}\"\nprefix = \"{}\"\nendpoint = \"{}\"\n",
        unique_prefix("e2e"),
        moto().endpoint
    ));
    std::fs::write(&config, text).unwrap();
    config
}

fn serve(dir: &Path, config: &Path) -> ServerProcess {
    ServerProcess::with_config_and_env(
        dir,
        config,
        &[
            ("AWS_ACCESS_KEY_ID", CREDENTIAL),
            ("AWS_SECRET_ACCESS_KEY", CREDENTIAL),
        ],
    )
}

#[test]
fn a_server_on_s3_keeps_what_clients_flushed_across_a_stop_and_a_kill() {
    require_all(&["nbdcopy", "qemu-io", "sha256sum"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = host_on_s3(dir);
    let mut server = serve(dir, &config);
    cli_on_ok(StoreArg::Config(&config), &["tenant", "create", "acme"]);
    cli_on_ok(
        StoreArg::Config(&config),
        &["volume", "create", "acme/disk", "--size", "32M"],
    );
    let uri = server.uri("acme/disk");
    let input = dir.join("in.raw");
    random_file(&input, 32 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=2")
            .arg(&input)
            .arg(&uri),
    );
    let data = dir.join("data");
    assert!(data.join("FORMAT").exists());
    for local in ["meta", "segments"] {
        assert!(
            !data.join(local).exists(),
            "{local}/ in the data directory of a store in object storage"
        );
    }

    server.stop();
    server.restart();
    let output = dir.join("out.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&output));
    assert_eq!(sha256(&input), sha256(&output), "after a clean stop");

    // A write and flush, then kill -9: the flushed write survives.
    let out = qemu_io(&uri, &["write -P 0xa5 4M 1M", "flush"]);
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    server.kill();
    server.restart();
    let out = qemu_io(&uri, &["read -P 0xa5 4M 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = qemu_io(&uri, &["read -v 0 16"]);
    let first = std::fs::read(&input).unwrap();
    let hex = format!("{:02x} {:02x}", first[0], first[1]);
    assert!(out.contains(&hex), "first bytes {hex} not in {out}");
    server.stop();
}

#[test]
fn a_server_without_the_bucket_credentials_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = host_on_s3(dir);
    let out = blockseal_test_support::run(
        Command::new(blockseal_tests::binary())
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("not set"),
        "{stderr}"
    );
}
