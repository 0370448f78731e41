//! Restart after `kill -9`: what was flushed before the crash reads back.

use blockseal_tests::{ServerProcess, have, run_ok};
use std::process::Command;

#[test]
fn flushed_writes_survive_kill_9() {
    if !have("qemu-io") {
        return;
    }
    let mut server = ServerProcess::demo("16M");
    let uri = server.uri("demo/disk");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0xa5 3M 64k",
        "-c",
        "flush",
        "-c",
        "write -f -P 0x77 8M 4k",
    ]));
    server.kill();
    server.restart();
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0xa5 3M 64k",
        "-c",
        "read -P 0x77 8M 4k",
        "-c",
        "read -P 0 1M 2M",
    ]));
    assert!(!out.to_lowercase().contains("fail"), "{out}");
    // The store is healthy: a graceful stop after the crash recovery works too.
    server.stop();
}
