//! The `nbd` crate's client (0.3: only `NBD_OPT_EXPORT_NAME`, no
//! `NBD_FLAG_NO_ZEROES`) reads and writes an export.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;

use blockseal_tests::ServerProcess;

#[test]
fn old_client_reads_and_writes() {
    let server = ServerProcess::demo("4M");
    let mut stream = UnixStream::connect(server.socket.as_ref().unwrap()).unwrap();
    let export = nbd::client::handshake(&mut stream, b"demo/disk").unwrap();
    assert_eq!(export.size, 4 << 20);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);

    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    client.seek(SeekFrom::Start(1 << 20)).unwrap();
    client.write_all(&data).unwrap();
    client.flush().unwrap();

    let mut back = vec![0u8; data.len()];
    client.seek(SeekFrom::Start(1 << 20)).unwrap();
    client.read_exact(&mut back).unwrap();
    assert!(back == data, "read back differs");

    let mut zeros = vec![1u8; 4096];
    client.seek(SeekFrom::Start(0)).unwrap();
    client.read_exact(&mut zeros).unwrap();
    assert!(
        zeros.iter().all(|&b| b == 0),
        "an unwritten block reads as zeros"
    );
}

#[test]
fn unknown_export_is_refused() {
    let server = ServerProcess::demo("4M");
    let mut stream = UnixStream::connect(server.socket.as_ref().unwrap()).unwrap();
    assert!(nbd::client::handshake(&mut stream, b"demo/missing").is_err());
}
