//! Hostile clients against `blockseal serve`: the server's memory, descriptors,
//! shutdown time and per-request work stay bounded whatever a client does, and
//! well-behaved clients are still served meanwhile.
//!
//! The peers are raw protocol clients on sockets (they do what no real client
//! would), python3-libnbd as the well-behaved real client, and `prlimit` to run
//! the server under a small open file limit. A missing tool fails these tests:
//! they guard limits that must hold everywhere.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockseal_test_support::wire::*;
use blockseal_test_support::{
    PYTHON, Raw, path_str as p, require, require_python_nbd, run, run_ok, temp_dir, wait_until,
};
use blockseal_tests::{ServerProcess, blockseal_ok};

const MIB: u64 = 1 << 20;

/// A raw protocol client that can misbehave on purpose, with the handshake
/// and the requests these tests make.
struct Client {
    raw: Raw,
    /// `base:allocation`'s context id, once selected.
    context: Option<u32>,
}

impl Deref for Client {
    type Target = Raw;

    fn deref(&self) -> &Raw {
        &self.raw
    }
}

impl DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Raw {
        &mut self.raw
    }
}

impl Client {
    fn unix(path: &Path) -> Client {
        Client {
            raw: Raw::connect_with_timeout(path, Duration::from_secs(20)),
            context: None,
        }
    }

    /// The whole handshake into transmission on `export`; with `structured`,
    /// structured replies and `base:allocation` too.
    fn enter(&mut self, export: &str, structured: bool) {
        self.handshake(C_FIXED_NEWSTYLE | C_NO_ZEROES);
        if structured {
            self.option(OPT_STRUCTURED_REPLY, b"");
            assert_eq!(self.option_reply().1, REP_ACK);
            self.option(
                OPT_SET_META_CONTEXT,
                &meta_payload(export, &["base:allocation"]),
            );
            loop {
                match self.option_reply() {
                    (_, REP_META_CONTEXT, data) => {
                        self.context = Some(u32::from_be_bytes(data[..4].try_into().unwrap()));
                    }
                    (_, REP_ACK, _) => break,
                    (_, other, _) => panic!("SET_META_CONTEXT failed: {other:#x}"),
                }
            }
        }
        self.go(export);
    }

    /// Reads `len` bytes at `offset` (simple replies).
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, 7, offset, len);
        assert_eq!(self.simple_reply(), (0, 7), "read at {offset}");
        self.read_n(len as usize)
    }

    /// Writes `data` at `offset` (simple replies), without a flush.
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, 1, offset, data.len() as u32);
        self.send(data);
        assert_eq!(self.simple_reply(), (0, 1));
    }

    /// Writes `data` at `offset` and flushes (simple replies).
    fn write_and_flush(&mut self, offset: u64, data: &[u8]) {
        self.write(offset, data);
        self.request(0, CMD_FLUSH, 2, 0, 0);
        assert_eq!(self.simple_reply(), (0, 2));
    }

    /// Block status (structured replies): the descriptors (length, flags).
    fn block_status(&mut self, flags: u16, offset: u64, len: u32) -> Vec<(u32, u32)> {
        self.request(flags, CMD_BLOCK_STATUS, 9, offset, len);
        let (chunk_flags, kind, handle, data) = self.chunk();
        assert_eq!(handle, 9);
        assert_eq!(
            kind, REPLY_TYPE_BLOCK_STATUS,
            "block status failed: {data:?}"
        );
        assert_eq!(chunk_flags, REPLY_FLAG_DONE);
        let context = u32::from_be_bytes(data[..4].try_into().unwrap());
        assert_eq!(Some(context), self.context);
        data[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect()
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The server's log filter for tests that wait on what the NBD server logs per
/// request.
const NBD_DEBUG: &str = "info,blockseal_nbd=debug";

/// What the server logs when a client's allocated zeroes stop because the
/// client left.
const ZEROES_STOPPED: &str = "write zeroes stopped: the connection closed";

/// What the server logs when it reads the end of file behind a client's
/// disconnect request: it has then taken in, and looked at, every request the
/// client sent.
const DISCONNECT_READ: &str = "client closed its side after a disconnect request";

/// A store in a temporary directory with export `acme/disk` of `size` and
/// `block_size`, and a config file with a Unix socket, TCP on loopback and
/// `limits` (TOML lines of the `[limits]` table).
fn configured(size: &str, block_size: &str, limits: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir();
    let d = dir.path();
    blockseal_ok(&["key", "init", "--out", p(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n\n[master_key]\nfile = \"master.key\"\n\n[unix]\n\
             path = \"nbd.sock\"\n\n[tcp]\naddress = \"127.0.0.1:0\"\n\n[limits]\n{limits}\n"
        ),
    )
    .unwrap();
    let c = p(&config);
    blockseal_ok(&["tenant", "create", "acme", "--config", c]);
    blockseal_ok(&[
        "volume",
        "create",
        "acme/disk",
        "--size",
        size,
        "--block-size",
        block_size,
        "--config",
        c,
    ]);
    (dir, config)
}

/// Runs the server under an open file limit of `n` (soft and hard).
fn limit_descriptors(server: &ServerProcess, n: u32) {
    run_ok(Command::new("prlimit").args([
        "--pid",
        &server.pid().to_string(),
        &format!("--nofile={n}:{n}"),
    ]));
}

/// python3-libnbd over TCP: writes 1 MiB, flushes, reads it back. `Ok` if all
/// of that worked within 10 s.
fn libnbd_round_trip(address: SocketAddr) -> Result<(), String> {
    let script = format!(
        r#"
import nbd, os
h = nbd.NBD()
h.connect_uri("nbd://{address}/acme/disk")
data = os.urandom(1 << 20)
h.pwrite(data, 3 << 20)
h.flush()
assert h.pread(1 << 20, 3 << 20) == data
h.shutdown()
"#
    );
    let out = run(Command::new("timeout").args(["10", PYTHON, "-c", &script]));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`libnbd_round_trip`] until it works, for at most 20 s.
fn retry_round_trip(address: SocketAddr, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tries = 0;
    loop {
        tries += 1;
        match libnbd_round_trip(address) {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => {}
            Err(e) => panic!("{failure} ({tries} tries): {e}"),
        }
    }
    eprintln!("libnbd round trip worked after {tries} tries");
}

/// Bytes of the files under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// The connection a server log line belongs to (its `conn=` span field).
fn connection_of(line: &str) -> Option<String> {
    let at = line.find("conn=")? + "conn=".len();
    let id: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Finding: a client that pipelines 32 MiB reads and never reads the replies
/// pinned about 96 MiB per connection (32 connections: 3 GB). Now the replies
/// waiting to be written count against the per-connection limit, the
/// tenant's share (256 MiB by default) and a server-wide budget (512 MiB by
/// default), and a well-behaved client is still served.
#[test]
fn slow_readers_cannot_exhaust_memory() {
    const BOUND_KIB: u64 = 512 * 1024;
    const READ: u32 = 32 << 20;
    let server = ServerProcess::demo_with_log("256M", NBD_DEBUG);
    let pid = server.pid();
    let socket = server.socket.clone().unwrap();
    let before = status_kib(pid, "VmRSS");
    // Simple replies: every read's reply carries all its bytes, holes or not.
    // Each attacker then disconnects without reading, which the server notes
    // once it has looked at all four reads.
    let mut attackers = Vec::new();
    for _ in 0..32 {
        let mut c = Client::unix(&socket);
        c.enter("demo/disk", false);
        for k in 0..4u64 {
            c.request(0, CMD_READ, k, (k % 8) * 32 * MIB, READ);
        }
        c.disconnect_and_close_write();
        attackers.push(c);
    }
    // Every read has been taken in: those the budget admits run and hold it
    // (their connections then wait to write replies nobody reads), the others
    // wait for it, and their connections note the disconnect and end of file
    // (today's server ran all of them and reached 3 GB).
    let admitted_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("request handle=") && l.contains(&format!("len={READ}")))
            .map(str::to_owned)
            .collect()
    };
    blockseal_test_support::wait_until(
        "every attacker to have its reads admitted or its end of file noted",
        Duration::from_secs(30),
        || {
            let log = server.log();
            let mut seen: BTreeSet<String> = admitted_lines(&log)
                .iter()
                .filter_map(|l| connection_of(l))
                .collect();
            seen.extend(
                log.lines()
                    .filter(|l| l.contains(DISCONNECT_READ))
                    .filter_map(connection_of),
            );
            seen.len() >= 32
        },
    );
    let admitted = admitted_lines(&server.log()).len() as u64;
    eprintln!("slow readers: {admitted} of 128 reads of 32 MiB admitted");
    assert!(
        (1..=8).contains(&admitted),
        "{admitted} reads of 32 MiB admitted: the tenant's share (256 MiB) holds at most 8"
    );
    // A well-behaved client is answered meanwhile.
    let mut good = Client::unix(&socket);
    good.enter("demo/disk", false);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let rss = status_kib(pid, "VmRSS");
        assert!(
            rss < BOUND_KIB,
            "server RSS {rss} KiB under 32 slow readers (bound {BOUND_KIB} KiB)"
        );
        let asked = Instant::now();
        assert_eq!(good.read(4096, 4096), vec![0; 4096]);
        slowest = slowest.max(asked.elapsed());
        assert!(
            slowest < Duration::from_secs(2),
            "a 4 KiB read took {slowest:?} under the attack"
        );
    }
    let peak = status_kib(pid, "VmHWM");
    eprintln!(
        "slow readers: RSS before {before} KiB, peak {peak} KiB; slowest 4 KiB read {slowest:?}"
    );
    assert!(
        peak < BOUND_KIB,
        "peak RSS {peak} KiB (bound {BOUND_KIB} KiB)"
    );
    drop(attackers);
}

/// Finding: connections were accepted without a cap and could sit silent for
/// the 30 s handshake timeout; under `ulimit -n 128`, 150 silent connections
/// left the server without descriptors. Now connections beyond the handshake
/// cap are closed at once and a real client still gets in.
#[test]
fn silent_connections_cannot_exhaust_descriptors() {
    require("prlimit");
    require_python_nbd();
    const CAP: usize = 16;
    const SILENT: usize = 150;
    let (dir, config) = configured("64M", "4096", &format!("max_handshakes = {CAP}"));
    let mut server = ServerProcess::with_config(dir.path(), &config);
    let address = server.tcp.unwrap();
    limit_descriptors(&server, 128);

    let silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(address).expect("connect"))
        .collect();
    // Connections past the cap are closed at once (the server sends them
    // nothing, or only its greeting if it closed an older one instead).
    for s in &silent {
        s.set_nonblocking(true).unwrap();
    }
    let mut open: Vec<&TcpStream> = silent.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while open.len() > CAP {
        open.retain(|s| {
            let mut buf = [0u8; 64];
            match (&mut &**s).read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            }
        });
        assert!(
            Instant::now() < deadline,
            "{} of {SILENT} silent connections still open after 10 s (cap {CAP})",
            open.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A real client gets in while the silent ones keep trying: it writes (a new
    // segment needs a descriptor), flushes and reads back.
    retry_round_trip(address, "a real client could not get in");
    let log = server.log();
    let lines = log.matches("too many connections in the handshake").count();
    assert!(
        (1..=3).contains(&lines),
        "refusals must be logged, rate-limited: {lines} lines in\n{log}"
    );
    drop(silent);
    server.stop();
}

/// The accept loop outlives EMFILE: it backs off, logs rate-limited, and
/// accepts again once descriptors are free.
#[test]
fn accept_survives_running_out_of_descriptors() {
    require("prlimit");
    require_python_nbd();
    let (dir, config) = configured("64M", "4096", "max_handshakes = 1000");
    let mut server = ServerProcess::with_config(dir.path(), &config);
    let address = server.tcp.unwrap();
    limit_descriptors(&server, 64);
    let silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(address).expect("connect"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("accept failed") {
        assert!(
            Instant::now() < deadline,
            "the server never ran out of descriptors"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(silent);
    retry_round_trip(address, "the server did not accept again");
    let log = server.log();
    let lines = log.matches("accept failed").count();
    assert!(
        lines <= 3,
        "accept errors must be rate-limited: {lines} lines in\n{log}"
    );
    server.stop();
}

/// Finding: SIGTERM waited as long as a client did not read its replies, and a
/// client that never sent its flags delayed exit by the handshake timeout. Now
/// shutdown has a deadline, after which connections are dropped, volumes
/// flushed, exit 0; data written before SIGTERM survives, flushed by the client
/// or not.
#[test]
fn sigterm_has_a_deadline() {
    let (dir, config) = configured("512M", "4096", "shutdown_timeout_secs = 2");
    let mut server = ServerProcess::with_config(dir.path(), &config);
    let socket = server.socket.clone().unwrap();

    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut good = Client::unix(&socket);
    good.enter("acme/disk", false);
    good.write_and_flush(MIB, &pattern);
    // Acknowledged but never flushed by the client: the server's final flush
    // must make it durable.
    let unflushed: Vec<u8> = pattern.iter().rev().copied().collect();
    good.write(2 * MIB, &unflushed);

    // Replies in flight that the client never reads: it takes the first reply
    // header, so the server is known to be writing, and stops there.
    let mut slow = Client::unix(&socket);
    slow.enter("acme/disk", false);
    for k in 0..8u64 {
        slow.request(0, CMD_READ, k, k * 32 * MIB, 32 << 20);
    }
    assert_eq!(slow.simple_reply().0, 0);
    // A client that took the greeting and never sends its flags.
    let mut stuck = Client::unix(&socket);
    stuck.greeting();

    let signalled = Instant::now();
    server.stop();
    let took = signalled.elapsed();
    eprintln!("shutdown took {took:?} (deadline 2 s)");
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 2 s deadline"
    );
    assert!(
        server.log().contains("shutdown deadline"),
        "{}",
        server.log()
    );
    drop((slow, stuck, good));

    server.restart();
    let mut check = Client::unix(server.socket.as_ref().unwrap());
    check.enter("acme/disk", false);
    assert!(check.read(MIB, pattern.len() as u32) == pattern);
    assert!(
        check.read(2 * MIB, unflushed.len() as u32) == unflushed,
        "a write acknowledged before SIGTERM was lost"
    );
}

/// Finding: a 4 GiB BLOCK_STATUS had the volume look up every block of the
/// range (512-byte blocks: 390 MiB and 220 ms a request), even with REQ_ONE.
/// Now the server describes a bounded range (65536 blocks) per request.
#[test]
fn block_status_is_bounded() {
    let (dir, config) = configured("8G", "512", "");
    let server = ServerProcess::with_config(dir.path(), &config);
    let pid = server.pid();
    let mut c = Client::unix(server.socket.as_ref().unwrap());
    c.enter("acme/disk", true);
    let asked = u32::MAX - 511;
    let mut slowest = Duration::ZERO;
    for offset in [0, 512, 3 << 30] {
        for flags in [0, FLAG_REQ_ONE] {
            let started = Instant::now();
            let descriptors = c.block_status(flags, offset, asked);
            slowest = slowest.max(started.elapsed());
            let described: u64 = descriptors.iter().map(|d| u64::from(d.0)).sum();
            assert!(!descriptors.is_empty());
            assert!(
                (512..=32 * MIB).contains(&described),
                "described {described} bytes of {asked} at {offset}"
            );
            // A sparse volume: one hole that reads as zeroes (HOLE | ZERO).
            assert_eq!(descriptors[0].1, 3);
            if flags == FLAG_REQ_ONE {
                assert_eq!(descriptors.len(), 1);
            }
        }
    }
    let peak = status_kib(pid, "VmHWM");
    eprintln!("block status: slowest reply {slowest:?}, server peak RSS {peak} KiB");
    assert!(
        slowest < Duration::from_secs(1),
        "a block status took {slowest:?}"
    );
    assert!(peak < 160 * 1024, "server peak RSS {peak} KiB");
}

/// Finding: one WRITE_ZEROES with NO_HOLE had the server seal gigabytes of
/// zeroes in one uninterruptible call. Now it runs in pieces under the memory
/// budget, reads back as zeroes, and a shutdown stops it between pieces.
#[test]
fn allocated_zeroes_run_in_pieces() {
    let (dir, config) = configured("8G", "4096", "shutdown_timeout_secs = 60");
    let mut server = ServerProcess::with_config(dir.path(), &config);
    let pid = server.pid();
    let mut c = Client::unix(server.socket.as_ref().unwrap());
    c.enter("acme/disk", false);
    let pattern = vec![0xa5u8; 4096];
    for offset in [0, 100 * MIB, 256 * MIB - 4096] {
        c.write_and_flush(offset, &pattern);
    }
    c.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 256 << 20);
    assert_eq!(c.simple_reply(), (0, 3));
    for offset in [0, 100 * MIB, 256 * MIB - 4096] {
        assert_eq!(c.read(offset, 4096), vec![0; 4096], "at {offset}");
    }
    let peak = status_kib(pid, "VmHWM");
    eprintln!("256 MiB of allocated zeroes: server peak RSS {peak} KiB");
    assert!(peak < 192 * 1024, "server peak RSS {peak} KiB");

    // Nearly 4 GiB of allocated zeroes; SIGTERM once the server is under way.
    let data = dir.path().join("data");
    let base = disk_usage(&data);
    c.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 1 << 30, u32::MAX - 4095);
    wait_until("the zeroes to start", Duration::from_secs(20), || {
        disk_usage(&data) >= base + 64 * MIB
    });
    let signalled = Instant::now();
    server.stop();
    let took = signalled.elapsed();
    let written = disk_usage(&data) - base;
    eprintln!("shutdown during 4 GiB of zeroes took {took:?}; {written} bytes written");
    assert!(
        took < Duration::from_secs(5),
        "shutdown waited {took:?} for the zeroes"
    );
    assert!(written < 2 << 30, "{written} bytes of zeroes written");
}

/// Requests a client had queued used to run on after it left (and after the
/// shutdown deadline), flushes and FUA requests each took a blocking thread of
/// their own, and the final flush at SIGTERM queued behind them. Now a client
/// that leaves without NBD_CMD_DISC takes its queued work with it, allocated
/// zeroes stop at the next piece, and SIGTERM keeps its deadline.
#[test]
fn the_work_of_a_client_that_left_stops() {
    let (dir, config) = configured("8G", "4096", "shutdown_timeout_secs = 2");
    let mut server = ServerProcess::with_config_and_log(dir.path(), &config, NBD_DEBUG);
    let socket = server.socket.clone().unwrap();
    let data = dir.path().join("data");
    let base = disk_usage(&data);
    // Four GiB of allocated zeroes and many flushes, then the client leaves
    // once the zeroes are under way.
    let mut gone = Client::unix(&socket);
    gone.enter("acme/disk", false);
    for k in 0..4u64 {
        gone.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, k, k << 30, 1 << 30);
        for f in 0..8 {
            gone.request(0, CMD_FLUSH, 100 + k * 8 + f, 0, 0);
        }
    }
    wait_until("the zeroes to start", Duration::from_secs(20), || {
        disk_usage(&data) >= base + 64 * MIB
    });
    drop(gone);
    // The zeroes under way stop at their next piece, and say so; the work
    // still queued is dropped unstarted.
    server.wait_for_log(ZEROES_STOPPED, 1, Duration::from_secs(30));
    let written = disk_usage(&data) - base;
    eprintln!("a client that left: {written} bytes of its 4 GiB of zeroes written");
    assert!(
        written < 1 << 30,
        "{written} bytes of zeroes written for a client that left"
    );

    // The same from a client still connected at SIGTERM: the server exits
    // within the shutdown deadline (2 s) and some slack.
    let mut staying = Client::unix(&socket);
    staying.enter("acme/disk", false);
    let base = disk_usage(&data);
    for k in 4..8u64 {
        staying.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, k, k << 30, 1 << 30);
        for f in 0..8 {
            staying.request(0, CMD_FLUSH, 100 + k * 8 + f, 0, 0);
        }
    }
    wait_until("the zeroes to start", Duration::from_secs(20), || {
        disk_usage(&data) >= base + 64 * MIB
    });
    let signalled = Instant::now();
    server.stop();
    let took = signalled.elapsed();
    eprintln!("shutdown with zeroes and flushes queued took {took:?} (deadline 2 s)");
    assert!(
        took < Duration::from_secs(8),
        "shutdown took {took:?} with a 2 s deadline"
    );
    drop(staying);
}
