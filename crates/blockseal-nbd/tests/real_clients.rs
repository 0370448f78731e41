//! Interoperability with real clients: nbdinfo, qemu-io, qemu-img and fio.

mod common;

use std::process::Command;

use common::*;

fn nbdinfo_json(server: &TestServer, export: &str) -> String {
    run_ok(Command::new("nbdinfo").args(["--json", &server.uri(export)]))
}

fn field(json: &str, name: &str) -> String {
    let key = format!("\"{name}\": ");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} missing in {json}"))
        + key.len();
    json[at..]
        .split([',', '\n'])
        .next()
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    require("nbdinfo");
    let server = TestServer::start();
    let json = nbdinfo_json(&server, "acme/disk");
    assert_eq!(field(&json, "export-size"), "67108864");
    assert_eq!(field(&json, "structured"), "true");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_df",
        "can_cache",
    ] {
        assert_eq!(field(&json, flag), "true", "{flag}");
    }
    assert_eq!(field(&json, "is_read_only"), "false");
    // Minimum 1: exports handle partial blocks, so unaligned clients work.
    assert_eq!(field(&json, "block_size_minimum"), "1");
    assert_eq!(field(&json, "block_size_preferred"), "4096");
    assert_eq!(field(&json, "block_size_maximum"), "67108864");
    assert_eq!(field(&json, "description"), "\"acme main disk\"");

    let json = nbdinfo_json(&server, "acme/ro");
    assert_eq!(field(&json, "is_read_only"), "true");
    for flag in ["can_fua", "can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(field(&json, flag), "false", "{flag} on a read-only export");
    }
    assert_eq!(field(&json, "can_flush"), "true");

    // An unknown export fails cleanly.
    let out = run(Command::new("nbdinfo").arg(server.uri("acme/nope")));
    assert!(!out.status.success());
}

#[test]
fn nbdinfo_list_shows_every_tenant_on_the_unix_socket() {
    require("nbdinfo");
    let server = TestServer::start();
    let uri = format!("nbd+unix://?socket={}", server.socket.display());
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    for name in ["acme/disk", "acme/ro", "acme/tampered", "globex/disk"] {
        assert!(
            out.contains(&format!("\"export-name\": \"{name}\"")),
            "{name} in {out}"
        );
    }
}

#[test]
fn qemu_io_patterns_zeroes_discard_flush_and_aio() {
    require_all(&["qemu-io", "qemu-img", "nbdinfo"]);
    let server = TestServer::start();
    let uri = server.uri("acme/disk");
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -z 128k 64k",
        "-c",
        "write -P 0x77 256k 64k",
        "-c",
        "write -z -u 256k 64k",
        "-c",
        "write -f -P 0xcd 1M 4k",
        "-c",
        "write -P 0x99 2M 1M",
        "-c",
        "discard 2M 1M",
        "-c",
        "flush",
        "-c",
        "aio_write -P 0x11 3M 4k",
        "-c",
        "aio_write -P 0x22 3076k 4k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0 128k 64k",
        "-c",
        "read -P 0 256k 64k",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "read -P 0 2M 1M",
        "-c",
        "read -P 0x11 3M 4k",
        "-c",
        "read -P 0x22 3076k 4k",
        "-c",
        "read -P 0 4M 512",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    let disk = server.catalog.get("acme/disk");
    assert_eq!(disk.peek(0, 4), vec![0xab; 4]);
    // qemu-io defaults to writethrough: every write carries FUA.
    assert!(disk.fua_writes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(disk.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    // Block status as qemu-img sees it: data where written, holes elsewhere.
    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let data_ranges: Vec<(u64, u64)> = map
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| (num(l, "start"), num(l, "length")))
        .collect();
    assert_eq!(
        data_ranges,
        [
            (0, 64 << 10),
            // write -z without -u keeps the range allocated (NO_HOLE).
            (128 << 10, 64 << 10),
            (1 << 20, 4096),
            (3 << 20, 8192),
        ],
        "{map}"
    );
    // nbdinfo --map agrees.
    let nbd_map = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let first = nbd_map.lines().next().unwrap();
    assert!(
        first.split_whitespace().collect::<Vec<_>>() == ["0", "65536", "0", "data"],
        "{nbd_map}"
    );
    assert!(nbd_map.contains("hole,zero"), "{nbd_map}");
}

#[test]
fn qemu_io_sees_eperm_on_read_only_and_eio_on_a_tampered_block() {
    require("qemu-io");
    let server = TestServer::start();
    run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 64k",
        &server.uri("acme/ro"),
    ]));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 1M 4k",
        &server.uri("acme/tampered"),
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Input/output error"), "{text}");
    assert_eq!(server.server.stats().authentication_failures, 1);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x11 0 64k",
        &server.uri("acme/tampered"),
    ]));
}

#[test]
fn qemu_img_convert_round_trips_a_sparse_image() {
    require("qemu-img");
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut image = vec![0u8; 8 << 20];
    for (i, b) in image[1 << 20..(1 << 20) + 300_000].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&src, &image).unwrap();
    let uri = server.uri("globex/disk");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    let back = std::fs::read(&back).unwrap();
    assert_eq!(&back[..8 << 20], &image[..]);
    assert!(back[8 << 20..].iter().all(|&b| b == 0));
}

fn num(line: &str, key: &str) -> u64 {
    let key = format!("\"{key}\": ");
    let at = line.find(&key).unwrap() + key.len();
    line[at..]
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
