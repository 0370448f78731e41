//! Restart after `kill -9`: what was flushed before the crash reads back.

use blockseal_test_support::{require, run_ok};
use blockseal_tests::ServerProcess;
use std::process::Command;

#[test]
fn flushed_writes_survive_kill_9() {
    require("qemu-io");
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

#[test]
fn graceful_stop_flushes_what_the_client_did_not() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::net::UnixStream;

    let mut server = ServerProcess::demo("4M");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    {
        let mut stream = UnixStream::connect(server.socket.as_ref().unwrap()).unwrap();
        let export = nbd::client::handshake(&mut stream, b"demo/disk").unwrap();
        let mut client = nbd::client::NbdClient::new(&mut stream, &export);
        client.seek(SeekFrom::Start(12288)).unwrap();
        client.write_all(&data).unwrap();
        // No flush: the client stays connected while the server is stopped.
        server.stop();
    }
    server.restart();
    let mut stream = UnixStream::connect(server.socket.as_ref().unwrap()).unwrap();
    let export = nbd::client::handshake(&mut stream, b"demo/disk").unwrap();
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut back = vec![0u8; data.len()];
    client.seek(SeekFrom::Start(12288)).unwrap();
    client.read_exact(&mut back).unwrap();
    assert!(back == data, "a write acknowledged before SIGTERM was lost");
}
