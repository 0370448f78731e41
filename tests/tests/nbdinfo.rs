//! nbdinfo against `blockseal serve`: export size and flags, `--list`, and
//! `--map` after writes and a trim.

use std::process::Command;

use blockseal_test_support::{nbdsh, require, require_python_nbd, run_ok};
use blockseal_tests::ServerProcess;

/// The value of `key:` in nbdinfo's text output.
fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in:\n{info}"))
        .trim()
}

#[test]
fn size_flags_and_list() {
    require("nbdinfo");
    let server = ServerProcess::demo("64M");
    let uri = server.uri("demo/disk");
    let info = run_ok(Command::new("nbdinfo").arg(&uri));
    assert_eq!(field(&info, "export-size"), "67108864 (64M)");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(field(&info, flag), "true", "{flag} in:\n{info}");
    }
    assert_eq!(field(&info, "is_read_only"), "false");
    assert_eq!(field(&info, "block_size_minimum"), "1");
    assert_eq!(field(&info, "block_size_preferred"), "4096");
    // The largest read or write, as nbdkit takes.
    assert_eq!(field(&info, "block_size_maximum"), "67108864");
    assert!(field(&info, "description").contains("4096-byte blocks"));

    let socket = server.socket.as_ref().unwrap();
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", socket.display())),
    );
    assert!(list.contains("export=\"demo/disk\""), "{list}");
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(size.trim(), "67108864");
}

#[test]
fn map_follows_writes_and_trims() {
    require("nbdinfo");
    require_python_nbd();
    let server = ServerProcess::demo("16M");
    let uri = server.uri("demo/disk");
    // 1 MiB of data at 1 MiB and at 4 MiB, then the second half of the first
    // trimmed: data at [1M, 1.5M) and [4M, 5M), holes elsewhere.
    run_ok(nbdsh().args([
        "-u",
        &uri,
        "-c",
        "h.pwrite(b'\\xa5' * 1048576, 1048576)",
        "-c",
        "h.pwrite(b'\\x5a' * 1048576, 4194304)",
        "-c",
        "h.trim(524288, 1572864)",
        "-c",
        "h.flush()",
    ]));
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    let extents: Vec<(u64, u64, String)> = map
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect();
    let m = 1u64 << 20;
    let expected = [
        (0, m, "hole,zero"),
        (m, m / 2, "data"),
        (m + m / 2, 2 * m + m / 2, "hole,zero"),
        (4 * m, m, "data"),
        (5 * m, 11 * m, "hole,zero"),
    ];
    let got: Vec<(u64, u64, &str)> = extents
        .iter()
        .map(|(a, b, c)| (*a, *b, c.as_str()))
        .collect();
    assert_eq!(got, expected, "nbdinfo --map:\n{map}");
}
