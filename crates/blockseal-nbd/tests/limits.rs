//! Server-wide limits with a raw client: the connection caps (in total and per
//! tenant) refuse `NBD_OPT_GO` with `NBD_REP_ERR_POLICY` and free their slot
//! when a connection closes; the handshake cap closes new connections at once;
//! block status describes a bounded range; an export slow to open holds up
//! only its own clients.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockseal_nbd::ServerConfig;
use common::mem::{EmptyExport, MemCatalog, MemExport, OpenGate};
use common::*;

const FIXED_NO_ZEROES: u32 = 3;
const REQ_ONE: u16 = 1 << 3;

/// Sends simple reads of `(handle, offset, len)` in one write, so that the
/// server takes them all in before its first reply can block it.
fn pipelined_reads(raw: &mut Raw, reads: impl IntoIterator<Item = (u64, u64, u32)>) {
    let mut b = Vec::new();
    for (handle, offset, len) in reads {
        b.extend_from_slice(&request_header(0, CMD_READ, handle, offset, len));
    }
    raw.send(&b);
}

/// Sends `NBD_OPT_GO` for `name`; the final reply type.
fn try_go(raw: &mut Raw, name: &str) -> u32 {
    raw.option(OPT_GO, &info_payload(name, &[]));
    loop {
        let (_, kind, _) = raw.option_reply();
        if kind != REP_INFO {
            return kind;
        }
    }
}

fn connected(server: &TestServer) -> Raw {
    let mut raw = server.raw();
    raw.handshake(FIXED_NO_ZEROES);
    raw
}

#[test]
fn connection_caps_refuse_go_until_a_slot_frees() {
    let mut config = ServerConfig::default();
    config.max_connections = 3;
    config.max_connections_per_tenant = 2;
    let server = TestServer::start_with(MemCatalog::standard(), config, None);

    let mut a1 = connected(&server);
    assert_eq!(try_go(&mut a1, "acme/disk"), REP_ACK);
    let mut a2 = connected(&server);
    assert_eq!(try_go(&mut a2, "acme/ro"), REP_ACK);
    // The tenant is at its cap; the refused client stays in the handshake and
    // may ask for another tenant's export.
    let mut a3 = connected(&server);
    assert_eq!(try_go(&mut a3, "acme/disk"), REP_ERR_POLICY);
    assert_eq!(try_go(&mut a3, "globex/disk"), REP_ACK);
    // Now the server is at its cap.
    let mut g = connected(&server);
    assert_eq!(try_go(&mut g, "globex/disk"), REP_ERR_POLICY);
    assert_eq!(server.server.stats().connections_refused, 2);

    // A closed connection gives its slot back.
    drop(a1);
    wait_until("a free slot", WAIT, || {
        let mut c = connected(&server);
        try_go(&mut c, "acme/disk") == REP_ACK
    });
}

#[test]
fn handshake_cap_closes_new_connections_at_once() {
    let mut config = ServerConfig::default();
    config.max_handshakes = 2;
    // However slow this test runs, no handshake becomes old enough to be closed
    // to make room.
    config.handshake_eviction_age = Duration::from_secs(3600);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let mut first = server.raw();
    first.greeting();
    let mut second = server.raw();
    second.greeting();
    // Both slots are taken by young handshakes: the third is closed unanswered.
    let mut third = server.raw();
    assert!(third.closed());
    assert_eq!(server.server.stats().handshakes_refused, 1);
    // A handshake that completes frees its slot.
    second.send(&FIXED_NO_ZEROES.to_be_bytes());
    assert_eq!(try_go(&mut second, "acme/disk"), REP_ACK);
    // Logged once its slot is free.
    server.wait_for_log("export attached", 1);
    let mut fourth = server.raw();
    fourth.handshake(FIXED_NO_ZEROES);
    assert_eq!(try_go(&mut fourth, "acme/disk"), REP_ACK);
}

#[test]
fn the_oldest_handshake_is_closed_to_make_room_once_old_enough() {
    let mut config = ServerConfig::default();
    config.max_handshakes = 2;
    config.handshake_eviction_age = Duration::from_millis(100);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let mut first = server.raw();
    first.greeting();
    let mut second = server.raw();
    second.greeting();
    // Once the first has waited the eviction age, a new connection takes its
    // slot (until then new ones may be closed at once).
    let mut third = None;
    wait_until("a new connection to be greeted", WAIT, || {
        let mut raw = server.raw();
        let mut magic = [0u8; 8];
        if std::io::Read::read_exact(&mut raw.stream, &mut magic).is_ok() {
            third = Some(raw);
        }
        third.is_some()
    });
    assert!(first.closed(), "the oldest handshake was closed");
    assert!(server.server.stats().handshakes_refused >= 1);
    // The newer handshakes go on.
    second.send(&FIXED_NO_ZEROES.to_be_bytes());
    assert_eq!(try_go(&mut second, "acme/disk"), REP_ACK);
}

#[test]
fn block_status_describes_a_bounded_range() {
    // 2 GiB of 4 KiB blocks: the server describes at most 65536 blocks (256 MiB).
    let mut catalog = MemCatalog::default();
    catalog.add_other("acme/big", EmptyExport::new(2 << 30));
    let server = TestServer::start_with(catalog, ServerConfig::default(), None);
    let mut raw = structured(&server, "acme/big");
    for (flags, offset) in [(0, 0), (REQ_ONE, 0), (0, 100)] {
        raw.request(flags, CMD_BLOCK_STATUS, 1, offset, (1 << 30) + 4096);
        let (_, kind, handle, payload) = raw.chunk();
        assert_eq!((kind, handle), (5, 1));
        let lengths: Vec<u64> = payload[4..]
            .chunks(8)
            .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())))
            .collect();
        assert_eq!(lengths.len(), 1);
        // Ends on the block boundary 65536 blocks past the offset's block.
        assert_eq!(offset + lengths[0], 256 << 20);
    }
}

/// A client on `server` with structured replies and `base:allocation` in
/// transmission on `export`.
fn structured(server: &TestServer, export: &str) -> Raw {
    let mut raw = connected(server);
    raw.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(raw.option_reply().1, REP_ACK);
    let mut meta = Vec::new();
    meta.extend_from_slice(&(export.len() as u32).to_be_bytes());
    meta.extend_from_slice(export.as_bytes());
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    raw.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(raw.option_reply().1, REP_META_CONTEXT);
    assert_eq!(raw.option_reply().1, REP_ACK);
    assert_eq!(try_go(&mut raw, export), REP_ACK);
    raw
}

/// A client on `server` with simple replies in transmission on `acme/disk`,
/// and a handle on its socket to change the read timeout.
fn transmitting(server: &TestServer) -> (Raw, std::os::unix::net::UnixStream) {
    transmitting_on(server, "acme/disk")
}

fn transmitting_on(server: &TestServer, export: &str) -> (Raw, std::os::unix::net::UnixStream) {
    let s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let handle = s.try_clone().unwrap();
    let mut raw = Raw::over(s);
    raw.handshake(FIXED_NO_ZEROES);
    assert_eq!(try_go(&mut raw, export), REP_ACK);
    (raw, handle)
}

/// 1 MiB requests, a 4 MiB budget that one tenant may hold all of.
fn small_budget() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.max_request_payload = 1 << 20;
    config.memory_budget = 4 << 20;
    config.memory_budget_per_tenant = Some(4 << 20);
    config
}

#[test]
fn budget_is_held_until_replies_are_written_and_others_wait() {
    let server = TestServer::start_with(MemCatalog::standard(), small_budget(), None);
    let stats = || server.server.stats();
    // A client that pipelines eight 1 MiB reads and reads nothing: four fit in
    // the budget, run, and their replies wait on the socket holding it all.
    let (mut slow, _) = transmitting(&server);
    pipelined_reads(&mut slow, (0..8).map(|k| (k, k << 20, 1 << 20)));
    // Held: too little is left for another 1 MiB request.
    wait_until("the budget to be held", WAIT, || {
        stats().memory_budget_available < 1 << 20
    });
    // Another client's large read waits for the budget (it does not fail)...
    let (mut other, socket) = transmitting(&server);
    other.request(0, CMD_READ, 100, 0, 1 << 20);
    // The server has looked at the read once it reads the end of file behind
    // a disconnect request, and it writes the replies it has before it reads
    // on: nothing has come back.
    other.disconnect_and_close_write();
    server.wait_for_log(DISCONNECT_READ, 1);
    socket.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let waiting = std::io::Read::read(&mut other.stream, &mut byte);
    assert!(
        waiting
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "answered while the budget was held: {waiting:?}"
    );
    socket.set_nonblocking(false).unwrap();
    // ...while small requests of other connections are answered at once (on
    // its own connection a request waits behind the one that waits).
    let (mut third, _) = transmitting(&server);
    third.request(0, CMD_READ, 101, 0, 4096);
    assert_eq!(third.simple_reply(), (0, 101));
    third.read_n(4096);
    // Once the slow client reads its replies, the budget comes back and the
    // waiting read is answered.
    for _ in 0..8 {
        let (error, _) = slow.simple_reply();
        assert_eq!(error, 0);
        slow.read_n(1 << 20);
    }
    assert_eq!(other.simple_reply(), (0, 100));
    other.read_n(1 << 20);
    assert!(other.closed());
    wait_until("the whole budget back", WAIT, || {
        stats().memory_budget_available == 4 << 20
    });
}

#[test]
fn a_client_that_reads_no_reply_is_dropped_after_the_reply_timeout() {
    let mut config = small_budget();
    config.reply_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let (mut slow, _) = transmitting(&server);
    pipelined_reads(&mut slow, (0..8).map(|k| (k, k << 20, 1 << 20)));
    wait_until("the budget to be held", WAIT, || {
        server.server.stats().memory_budget_available < 1 << 20
    });
    wait_until("the slow client dropped and the budget back", WAIT, || {
        let stats = server.server.stats();
        stats.connections_active == 0 && stats.memory_budget_available == 4 << 20
    });
}

#[test]
fn writes_whose_payload_never_arrives_are_dropped_and_give_the_budget_back() {
    let mut config = small_budget();
    config.payload_timeout = Duration::from_secs(2);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let stats = || server.server.stats();
    // Eight clients send a 1 MiB write header (one of them a little of the
    // payload too) and nothing more: the first four reserve the whole budget.
    let mut writers: Vec<Raw> = (0..8u64)
        .map(|k| {
            let (mut raw, _) = transmitting(&server);
            raw.request(0, CMD_WRITE, k, k << 20, 1 << 20);
            if k == 0 {
                raw.send(&[7; 4096]);
            }
            raw
        })
        .collect();
    wait_until("the budget to be reserved", WAIT, || {
        stats().memory_budget_available < 1 << 20
    });
    // A well-behaved large read waits behind them, and is answered once the
    // server has dropped them.
    let (mut reader, _) = transmitting(&server);
    reader.request(0, CMD_READ, 100, 0, 1 << 20);
    assert_eq!(reader.simple_reply(), (0, 100));
    reader.read_n(1 << 20);
    for (k, writer) in writers.iter_mut().enumerate() {
        assert!(writer.closed(), "writer {k} was not disconnected");
    }
    wait_until("the whole budget back", WAIT, || {
        let stats = stats();
        stats.connections_active == 1 && stats.memory_budget_available == 4 << 20
    });
    assert_eq!(server.catalog.get("acme/disk").peek(0, 1), [0]);
}

#[test]
fn a_client_that_reads_its_replies_a_little_at_a_time_is_dropped_at_the_deadline() {
    // Replies much larger than a socket buffer, so most of each must wait for
    // the client.
    let mut config = ServerConfig::default();
    config.max_request_payload = 4 << 20;
    config.memory_budget = 8 << 20;
    config.memory_budget_per_tenant = Some(8 << 20);
    config.reply_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let (mut slow, _) = transmitting(&server);
    pipelined_reads(&mut slow, (0..2).map(|k| (k, k << 22, 4 << 20)));
    wait_until("the budget to be held", WAIT, || {
        server.server.stats().memory_budget_available == 0
    });
    // 16 KiB every 50 ms (320 KiB/s) is steady progress, but a 4 MiB reply
    // then takes 13 s: far past the 1 s deadline.
    let total = 2 * ((4 << 20) + 16);
    let mut received = 0;
    let mut piece = vec![0u8; 16 << 10];
    let started = Instant::now();
    loop {
        match std::io::Read::read(&mut slow.stream, &mut piece) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the trickling client was never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        received < total,
        "the client received all {received} bytes at 320 KiB/s"
    );
    wait_until("the slow client dropped and the budget back", WAIT, || {
        let stats = server.server.stats();
        stats.connections_active == 0 && stats.memory_budget_available == 8 << 20
    });
}

#[test]
fn one_tenant_holds_at_most_its_share_of_the_budget() {
    let mut config = small_budget();
    config.memory_budget_per_tenant = None;
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let stats = || server.server.stats();
    // Two acme clients pipeline 1 MiB reads and read nothing: together they
    // hold acme's share, half of the budget, and no more.
    let mut slow: Vec<Raw> = (0..2)
        .map(|c| {
            let (mut raw, _) = transmitting(&server);
            pipelined_reads(&mut raw, (0..4).map(|k| (k, (c * 4 + k) << 20, 1 << 20)));
            raw
        })
        .collect();
    wait_until("acme's share to be held", WAIT, || {
        stats().memory_budget_available == 2 << 20
    });
    // Another tenant's large reads are answered meanwhile.
    let (mut other, _) = transmitting_on(&server, "globex/disk");
    for k in 0..4 {
        other.request(0, CMD_READ, 100 + k, k << 20, 1 << 20);
    }
    for _ in 0..4 {
        assert_eq!(other.simple_reply().0, 0);
        other.read_n(1 << 20);
    }
    wait_until("globex's reads to give their budget back", WAIT, || {
        stats().memory_budget_available == 2 << 20
    });
    // acme's clients get every reply once they read them (both at once: which
    // of them the share goes to next is first come, first served).
    std::thread::scope(|scope| {
        for raw in &mut slow {
            scope.spawn(move || {
                for _ in 0..4 {
                    assert_eq!(raw.simple_reply().0, 0);
                    raw.read_n(1 << 20);
                }
            });
        }
    });
    wait_until("the whole budget back", WAIT, || {
        stats().memory_budget_available == 4 << 20
    });
}

const FUA: u16 = 1;
const WRITE: usize = 128 << 10;

#[test]
fn a_client_that_leaves_takes_its_queued_work_with_it() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    let full = server.server.stats().memory_budget_available;
    disk.close_gate();
    // 128 KiB writes run on the connection's data workers, FUA writes on its
    // sync workers: two of each reach the export, the rest wait in line.
    let (mut raw, _) = transmitting(&server);
    for k in 0..16u64 {
        raw.request(0, CMD_WRITE, k, k * WRITE as u64, WRITE as u32);
        raw.send(&[1; WRITE]);
        raw.request(FUA, CMD_WRITE, 100 + k, (4 << 20) + k * 4096, 4096);
        raw.send(&[2; 4096]);
        raw.request(0, CMD_FLUSH, 200 + k, 0, 0);
    }
    wait_until("four writes at the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) >= 4
    });
    // Gone without NBD_CMD_DISC: the connection ends at once, though four of
    // its requests are still running.
    drop(raw);
    wait_until("the connection to end", WAIT, || {
        server.server.stats().connections_active == 0
    });
    disk.open_gate();
    wait_until(
        "the running writes to finish and the budget to come back",
        WAIT,
        || server.server.stats().memory_budget_available == full,
    );
    assert_eq!(
        disk.writes.load(Ordering::SeqCst),
        4,
        "only the writes already running were run"
    );
    assert_eq!(
        disk.most_waiting.load(Ordering::SeqCst),
        4,
        "two threads for data and two for syncs, not a thread per FUA write"
    );
}

#[test]
fn requests_not_started_before_a_shutdown_are_answered_eshutdown() {
    let mut server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let (mut raw, _) = transmitting(&server);
    for k in 0..6u64 {
        raw.request(0, CMD_WRITE, k, k * WRITE as u64, WRITE as u32);
        raw.send(&[k as u8 + 1; WRITE]);
    }
    // A small read answered on the connection's task: the six writes before
    // it have been read in full (a request still unread at the shutdown is
    // never read).
    raw.request(0, CMD_READ, 99, 0, 4096);
    assert_eq!(raw.simple_reply(), (0, 99));
    raw.read_n(4096);
    wait_until("two writes at the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 2
    });
    server.server.shutdown_handle().trigger();
    disk.open_gate();
    // The two running writes finish and succeed; the four queued ones are not
    // run.
    let mut replies: Vec<(u32, u64)> = (0..6).map(|_| raw.simple_reply()).collect();
    replies.sort_by_key(|r| r.1);
    assert_eq!(
        replies,
        [
            (0, 0),
            (0, 1),
            (ESHUTDOWN, 2),
            (ESHUTDOWN, 3),
            (ESHUTDOWN, 4),
            (ESHUTDOWN, 5)
        ]
    );
    assert!(raw.closed());
    assert_eq!(disk.writes.load(Ordering::SeqCst), 2);
    assert_eq!(disk.peek(WRITE as u64, 1), [2]);
    assert_eq!(disk.peek(2 * WRITE as u64, 1), [0]);
    server.stop();
}

#[test]
fn a_revoked_export_drains_and_closes_its_connections_only() {
    let mut server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    let (mut other, _) = transmitting_on(&server, "globex/disk");
    disk.close_gate();
    let (mut raw, _) = transmitting(&server);
    for k in 0..6u64 {
        raw.request(0, CMD_WRITE, k, k * WRITE as u64, WRITE as u32);
        raw.send(&[k as u8 + 1; WRITE]);
    }
    raw.request(0, CMD_READ, 99, 0, 4096);
    assert_eq!(raw.simple_reply(), (0, 99));
    raw.read_n(4096);
    wait_until("two writes at the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 2
    });
    // The export's owner revokes it (it is being deleted): exactly as at a
    // shutdown, the running writes finish, the queued ones are not run, and
    // the connection closes.
    disk.revoke.trigger();
    disk.open_gate();
    let mut replies: Vec<(u32, u64)> = (0..6).map(|_| raw.simple_reply()).collect();
    replies.sort_by_key(|r| r.1);
    assert_eq!(
        replies,
        [
            (0, 0),
            (0, 1),
            (ESHUTDOWN, 2),
            (ESHUTDOWN, 3),
            (ESHUTDOWN, 4),
            (ESHUTDOWN, 5)
        ]
    );
    assert!(raw.closed());
    assert_eq!(disk.writes.load(Ordering::SeqCst), 2);
    // Another export's connection is untouched.
    other.request(0, CMD_READ, 7, 0, 4096);
    assert_eq!(other.simple_reply(), (0, 7));
    other.read_n(4096);
    server.stop();
}

#[test]
fn a_small_block_status_costs_little_of_the_budget() {
    // A budget of four 1 MiB reads and 64 KiB.
    let mut config = small_budget();
    config.memory_budget = (4 << 20) + (64 << 10);
    config.memory_budget_per_tenant = Some(config.memory_budget);
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let (mut slow, _) = transmitting(&server);
    pipelined_reads(&mut slow, (0..4).map(|k| (k, k << 20, 1 << 20)));
    wait_until("four reads to hold the budget", WAIT, || {
        server.server.stats().memory_budget_available == 64 << 10
    });
    // A block status of a few blocks fits in what is left (it is costed by
    // the blocks it covers, not by the most it could ever cover).
    let mut raw = structured(&server, "acme/disk");
    raw.request(0, CMD_BLOCK_STATUS, 1, 4096, 3 * 4096);
    let (_, kind, handle, payload) = raw.chunk();
    assert_eq!((kind, handle), (5, 1));
    assert_eq!(&payload[4..8], &(3 * 4096u32).to_be_bytes());
    drop(slow);
}

#[test]
fn reads_on_the_connection_task_never_ask_for_block_status() {
    let empty = EmptyExport::new(1 << 20);
    let mut catalog = MemCatalog::default();
    catalog.add_other("acme/empty", empty.clone());
    let server = TestServer::start_with(catalog, ServerConfig::default(), None);
    let mut raw = structured(&server, "acme/empty");
    // 64 KiB is the most a read may be and still run on the connection's task:
    // plain data, no block status.
    raw.request(0, CMD_READ, 1, 0, 64 << 10);
    let (_, kind, handle, payload) = raw.chunk();
    assert_eq!((kind, handle, payload.len()), (1, 1, 8 + (64 << 10)));
    assert_eq!(empty.status_calls.load(Ordering::SeqCst), 0);
    // A longer one runs on a worker, which asks and sends a hole.
    raw.request(0, CMD_READ, 2, 0, 128 << 10);
    let (_, kind, handle, payload) = raw.chunk();
    assert_eq!((kind, handle, payload.len()), (2, 2, 12));
    assert_eq!(empty.status_calls.load(Ordering::SeqCst), 1);
}

/// Opening an export may take a while (the binary's catalog opens a volume,
/// which scans its metadata). The server asks the catalog on blocking threads,
/// so more slow opens than the runtime has threads (the test server has two)
/// leave other connections free to list, enter transmission and do I/O.
#[test]
fn a_slow_export_open_holds_up_only_its_own_clients() {
    const SLOW: u64 = 3;
    let mut catalog = MemCatalog::standard();
    let gate = OpenGate::closed();
    catalog.add("acme/slow", MemExport::new(1 << 20, false), "slow to open");
    catalog.open_gates.insert("acme/slow".into(), gate.clone());
    let server = TestServer::start_with(catalog, ServerConfig::default(), None);
    let slow: Vec<_> = (0..SLOW)
        .map(|handle| {
            let socket = server.socket.clone();
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                raw.handshake(FIXED_NO_ZEROES);
                raw.go("acme/slow");
                raw.request(0, CMD_READ, handle, 0, 512);
                assert_eq!(raw.simple_reply(), (0, handle));
                raw.read_n(512)
            })
        })
        .collect();
    assert!(
        gate.wait_for_waiting(SLOW as usize),
        "the slow opens did not all reach the catalog: the server stalled"
    );

    // Every slow open is still waiting: another client lists the exports,
    // enters transmission on an export that opens at once, writes and reads.
    let mut raw = connected(&server);
    raw.option(OPT_LIST, b"");
    let mut listed = 0;
    while raw.option_reply().1 == REP_SERVER {
        listed += 1;
    }
    assert_eq!(listed, 5);
    raw.go("acme/disk");
    raw.request(0, CMD_WRITE, 1, 8192, 4096);
    raw.send(&[0x3c; 4096]);
    assert_eq!(raw.simple_reply(), (0, 1));
    raw.request(0, CMD_READ, 2, 8192, 4096);
    assert_eq!(raw.simple_reply(), (0, 2));
    assert_eq!(raw.read_n(4096), vec![0x3c; 4096]);

    gate.open();
    for client in slow {
        assert_eq!(client.join().unwrap(), vec![0; 512]);
    }
}
