//! qemu-io and qemu-img against the real encrypted volume: patterned writes and
//! reads, zeroing (with and without unmap), FUA, discard, flush, asynchronous
//! I/O; `qemu-img convert` in and out, `qemu-img compare`, and `qemu-img map`.

use std::process::Command;

use blockseal_test_support::{require, run_ok};
use blockseal_tests::{ServerProcess, qemu_io, random_file, read_file};

#[test]
fn qemu_io_commands() {
    require("qemu-io");
    let server = ServerProcess::demo("16M");
    let uri = server.uri("demo/disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // Unaligned I/O goes through read-modify-write of sealed blocks.
            "write -P 0xcd 1000 3000",
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 4000 96",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -z -u 128k 128k",
            "read -P 0 128k 128k",
            "read -P 0xab 256k 64k",
            "write -f -P 0x11 2M 4k",
            "read -P 0x11 2M 4k",
            "write -P 0x22 3M 256k",
            "discard 3M 128k",
            "read -P 0 3M 128k",
            "read -P 0x22 3200k 128k",
            "flush",
            "aio_write -P 0x33 4M 64k",
            "aio_write -P 0x44 5M 64k",
            "aio_flush",
            "aio_read -P 0x33 4M 64k",
            "aio_read -P 0x44 5M 64k",
            "aio_flush",
        ],
    );
    // A second connection sees what the first one wrote.
    qemu_io(
        &uri,
        &[
            "read -P 0x11 2M 4k",
            "read -P 0x44 5M 64k",
            "read -P 0 8M 1M",
        ],
    );
}

#[test]
fn qemu_img_convert_compare_and_map() {
    require("qemu-img");
    let server = ServerProcess::demo("8M");
    let uri = server.uri("demo/disk");
    let input = server.dir.join("in.raw");
    let output = server.dir.join("out.raw");
    random_file(&input, 8 << 20);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&input)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&output),
    );
    assert!(
        read_file(&input) == read_file(&output),
        "the image read back differs"
    );
    let compare = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&input)
            .arg(&uri),
    );
    assert!(compare.contains("Images are identical"), "{compare}");

    // Trim the second MiB and zero the fourth: map shows them as zero, unallocated.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "discard 1M 1M",
        "-c",
        "write -z -u 3M 1M",
    ]));
    let map = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let m = 1u64 << 20;
    let expected = [
        (0, m, true),
        (m, m, false),
        (2 * m, m, true),
        (3 * m, m, false),
        (4 * m, 4 * m, true),
    ];
    assert_eq!(map_entries(&map), expected, "qemu-img map:\n{map}");
}

/// `(start, length, data)` of each entry of `qemu-img map --output=json`,
/// with neighbours of the same kind merged.
fn map_entries(json: &str) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for entry in json.split('{').skip(1) {
        let number = |key: &str| -> u64 {
            let at = entry.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
            entry[at..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let data = entry.contains("\"data\": true");
        let zero = entry.contains("\"zero\": true");
        assert_ne!(data, zero, "an extent is either data or zero: {entry}");
        let (start, length) = (number("start"), number("length"));
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += length,
            _ => out.push((start, length, data)),
        }
    }
    out
}
