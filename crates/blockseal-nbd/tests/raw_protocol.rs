//! Byte-level conformance tests with a raw client: the cases real clients never
//! produce (legacy zero padding, unknown options, malformed payloads, oversized
//! writes, shutdown with requests in flight, backpressure).

mod common;

use std::sync::atomic::Ordering;

use blockseal_nbd::ServerConfig;
use common::mem::MemCatalog;
use common::*;

const FIXED: u32 = 1;
const NO_ZEROES: u32 = 2;

/// Enters transmission on `name` with `NBD_OPT_GO`; returns (size, flags).
fn go(raw: &mut Raw, name: &str) -> (u64, u16) {
    raw.handshake(FIXED | NO_ZEROES);
    raw.go(name)
}

#[test]
fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let server = TestServer::start();
    let mut raw = server.raw();
    assert_eq!(raw.greeting(), 0b11);
}

#[test]
fn export_name_without_no_zeroes_sends_124_zero_bytes() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED);
    raw.option(OPT_EXPORT_NAME, b"acme/disk");
    assert_eq!(raw.u64(), 64 << 20);
    let flags = raw.u16();
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert_eq!(raw.read_n(124), vec![0; 124]);
    // The next bytes are the reply to the first request.
    raw.request(0, CMD_READ, 42, 0, 512);
    assert_eq!(raw.simple_reply(), (0, 42));
    assert_eq!(raw.read_n(512), vec![0; 512]);
}

#[test]
fn export_name_with_no_zeroes_sends_no_padding() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_EXPORT_NAME, b"acme/ro");
    assert_eq!(raw.u64(), 16 << 20);
    let flags = raw.u16();
    assert_eq!(flags & 0b10, 0b10, "READ_ONLY");
    raw.request(0, CMD_READ, 7, 4096, 4);
    assert_eq!(raw.simple_reply(), (0, 7));
    assert_eq!(raw.read_n(4), vec![0x5a; 4]);
}

#[test]
fn export_name_of_unknown_or_unnamed_export_closes() {
    let server = TestServer::start();
    for name in [&b"acme/nope"[..], b"", b"acme", b"\xff\xfe"] {
        let mut raw = server.raw();
        raw.handshake(FIXED | NO_ZEROES);
        raw.option(OPT_EXPORT_NAME, name);
        assert!(raw.closed(), "{name:?}");
    }
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | 0x8);
    assert!(raw.closed());
}

#[test]
fn client_without_fixed_newstyle_may_only_export_name() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(0);
    raw.option(OPT_EXPORT_NAME, b"acme/disk");
    assert_eq!(raw.u64(), 64 << 20);
    raw.u16();
    raw.read_n(124);

    let mut raw = server.raw();
    raw.handshake(0);
    raw.option(OPT_LIST, b"");
    assert!(raw.closed());
}

#[test]
fn unknown_option_is_unsupported_and_the_stream_stays_in_sync() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    for option in [0x1234, 4, 11, 0xffff_ffff] {
        raw.option(option, &[0xab; 100]);
        let (opt, kind, _) = raw.option_reply();
        assert_eq!((opt, kind), (option, REP_ERR_UNSUP));
    }
    raw.option(OPT_LIST, b"");
    let mut names = Vec::new();
    loop {
        let (opt, kind, data) = raw.option_reply();
        assert_eq!(opt, OPT_LIST);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    // A Unix socket sees every tenant.
    assert_eq!(
        names,
        ["acme/disk", "acme/ro", "acme/tampered", "globex/disk"]
    );
}

#[test]
fn malformed_go_and_info_payloads_are_invalid() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    let good = info_payload("acme/disk", &[1, 3]);
    let mut name_too_long = good.clone();
    name_too_long[3] = 200;
    let mut count_mismatch = good.clone();
    count_mismatch.push(0);
    let mut short_count = good.clone();
    short_count.truncate(good.len() - 1);
    for option in [OPT_GO, OPT_INFO] {
        for bad in [
            &name_too_long[..],
            &count_mismatch,
            &short_count,
            &[0, 0, 0],
            &[],
        ] {
            raw.option(option, bad);
            let (opt, kind, _) = raw.option_reply();
            assert_eq!((opt, kind), (option, REP_ERR_INVALID), "{bad:?}");
        }
    }
    raw.option(OPT_GO, &info_payload("acme/missing", &[]));
    assert_eq!(raw.option_reply().1, REP_ERR_UNKNOWN);
    assert_eq!(raw.go("acme/disk").0, 64 << 20);
}

#[test]
fn options_that_take_no_data_refuse_data() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    for option in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_STARTTLS] {
        raw.option(option, b"x");
        assert_eq!(raw.option_reply().1, REP_ERR_INVALID, "option {option}");
    }
    // Without TLS configured (a Unix socket), STARTTLS is a policy refusal.
    raw.option(OPT_STARTTLS, b"");
    assert_eq!(raw.option_reply().1, REP_ERR_POLICY);
    // Metadata contexts need structured replies first.
    raw.option(
        OPT_SET_META_CONTEXT,
        &meta_payload("acme/disk", &["base:allocation"]),
    );
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);
    assert_eq!(raw.go("acme/disk").0, 64 << 20);
}

#[test]
fn oversized_option_closes() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(0x1234, &vec![0; 64 * 1024 + 1]);
    assert!(raw.closed());
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_ABORT, b"ignored data");
    assert_eq!(raw.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(raw.closed());
}

const MIB: u32 = 1024 * 1024;
/// The largest read or write the server takes by default, as nbdkit.
const MAX_PAYLOAD: u32 = 64 * MIB;

/// Aligned writes that arrive together run as one call of the export's
/// `write_batch`, each answered on its own handle; an unaligned write among
/// them and a read run on their own, in the order they came.
#[test]
fn aligned_writes_arriving_together_run_as_one_batch() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    let block = |n: u64| -> Vec<u8> { (0..4096u64).map(|i| ((i * 7 + n) % 251) as u8).collect() };
    // 16 aligned 4 KiB writes (two to the same block, the later one wins), an
    // unaligned write over part of the first, 8 more aligned, then a read of
    // the first 64 KiB, all in one send.
    let mut bytes = Vec::new();
    let mut model = vec![0u8; 64 << 10];
    let mut handle = 0u64;
    let mut put = |bytes: &mut Vec<u8>, model: &mut Vec<u8>, offset: u64, data: &[u8]| {
        handle += 1;
        bytes.extend_from_slice(&request_header(
            0,
            CMD_WRITE,
            handle,
            offset,
            data.len() as u32,
        ));
        bytes.extend_from_slice(data);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    };
    for n in 0..16u64 {
        let lba = if n == 15 { 3 } else { n };
        put(&mut bytes, &mut model, lba * 4096, &block(n));
    }
    put(&mut bytes, &mut model, 100, b"unaligned, on its own");
    for n in 0..8u64 {
        put(&mut bytes, &mut model, (4 + n) * 4096, &block(100 + n));
    }
    let writes = handle;
    bytes.extend_from_slice(&request_header(0, CMD_READ, 1000, 0, 64 << 10));
    raw.send(&bytes);
    let mut answered: Vec<u64> = (0..writes)
        .map(|_| {
            let (error, handle) = raw.simple_reply();
            assert_eq!(error, 0, "write {handle} failed");
            handle
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        (1..=writes).collect::<Vec<_>>(),
        "every write answered once"
    );
    assert_eq!(raw.simple_reply(), (0, 1000));
    assert!(
        raw.read_n(64 << 10) == model,
        "the read sees every write, in order"
    );
    assert_eq!(
        disk.writes.load(Ordering::SeqCst),
        writes,
        "every write reached the export"
    );
    assert!(
        disk.most_batched.load(Ordering::SeqCst) > 1,
        "aligned writes that arrived together ran as a batch"
    );
}

/// A server whose `acme/big` (160 MiB, never touched, so it costs no memory
/// until written) is larger than the largest request.
fn big_server() -> TestServer {
    let mut catalog = MemCatalog::standard();
    catalog.add(
        "acme/big",
        mem::MemExport::new(160 << 20, false),
        "larger than a request",
    );
    TestServer::start_with(catalog, ServerConfig::default(), None)
}

/// `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request: returns the minimum,
/// preferred and maximum block sizes the server advertised.
fn go_with_block_sizes(raw: &mut Raw, name: &str) -> (u32, u32, u32) {
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_GO, &info_payload(name, &[INFO_BLOCK_SIZE]));
    let mut sizes = None;
    loop {
        let (option, kind, data) = raw.option_reply();
        assert_eq!(option, OPT_GO);
        match kind {
            REP_INFO if data[..2] == INFO_BLOCK_SIZE.to_be_bytes() => {
                assert_eq!(data.len(), 14);
                let field = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                sizes = Some((field(2), field(6), field(10)));
            }
            REP_INFO => {}
            REP_ACK => return sizes.expect("NBD_INFO_BLOCK_SIZE before ACK"),
            other => panic!("GO failed with reply {other:#x}"),
        }
    }
}

/// "Size constraints": the maximum payload "MUST be at least as large as the
/// preferred block size"; clients that ignore it (the reference
/// nbd-tester-client) send up to 64 MiB, which the server takes in one request.
#[test]
fn requests_up_to_64_mib_run_in_one_piece() {
    let server = big_server();
    let big = server.catalog.get("acme/big");
    let mut raw = server.raw();
    assert_eq!(
        go_with_block_sizes(&mut raw, "acme/big"),
        (1, 4096, MAX_PAYLOAD)
    );
    let data: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    let offset = 3 * u64::from(MIB) + 17;
    raw.request(0, CMD_WRITE, 1, offset, MAX_PAYLOAD);
    raw.send(&data);
    assert_eq!(raw.simple_reply(), (0, 1));
    assert_eq!(big.writes.load(Ordering::SeqCst), 1, "one export write");
    raw.request(0, CMD_READ, 2, offset, MAX_PAYLOAD);
    assert_eq!(raw.simple_reply(), (0, 2));
    assert!(
        raw.read_n(MAX_PAYLOAD as usize) == data,
        "read back differs"
    );
}

/// Past the maximum payload a read or write is refused with `NBD_EINVAL` (the
/// spec asks clients not to send it, and leaves the error open), a write's
/// payload is read and discarded, and the stream stays in sync: "any payload
/// not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
/// service attack", and this one is not treated as one either.
#[test]
fn requests_over_64_mib_are_einval_and_the_connection_survives() {
    let server = big_server();
    let big = server.catalog.get("acme/big");
    let mut raw = server.raw();
    go(&mut raw, "acme/big");
    let len = MAX_PAYLOAD + 4096;
    raw.request(0, CMD_READ, 1, 0, len);
    // A simple error reply carries no data.
    assert_eq!(raw.simple_reply(), (EINVAL, 1));
    raw.request(0, CMD_WRITE, 2, 0, len);
    raw.send(&vec![0xee; len as usize]);
    assert_eq!(raw.simple_reply(), (EINVAL, 2));
    // In sync: the next request is parsed as a request, and nothing was written.
    raw.request(0, CMD_READ, 3, 0, 4096);
    assert_eq!(raw.simple_reply(), (0, 3));
    assert_eq!(raw.read_n(4096), vec![0; 4096]);
    assert_eq!(big.writes.load(Ordering::SeqCst), 0);

    // With structured replies the refused read is an error chunk.
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.go("acme/big");
    raw.request(0, CMD_READ, 4, 0, len);
    let (flags, kind, handle, payload) = raw.chunk();
    assert_eq!((flags, kind, handle), (1, REPLY_TYPE_ERROR, 4));
    assert_eq!(&payload[..4], &EINVAL.to_be_bytes());
    raw.request(0, CMD_READ, 5, 0, 4096);
    let (flags, kind, handle, _) = raw.chunk();
    assert_eq!((flags, kind, handle), (1, 1, 5));
}

/// A refused write whose payload is too large to read and discard (over
/// 256 MiB) ends the connection: the spec lets either side "initiate a hard
/// disconnect if a payload length of either a request or a reply would be large
/// enough to be deemed a denial of service attack".
#[test]
fn refused_writes_too_large_to_drain_close_the_connection() {
    let server = big_server();
    let mut raw = server.raw();
    go(&mut raw, "acme/big");
    raw.request(0, CMD_WRITE, 1, 0, 256 * MIB + 4096);
    assert!(raw.closed(), "the server kept the connection");
    // Other connections are unaffected.
    let mut other = server.raw();
    go(&mut other, "acme/big");
    other.request(0, CMD_READ, 2, 0, 4096);
    assert_eq!(other.simple_reply(), (0, 2));
}

#[test]
fn refused_requests_get_the_spec_errors_and_keep_the_stream_in_sync() {
    let server = TestServer::start();
    let mut raw = server.raw();
    let (size, _) = go(&mut raw, "acme/disk");
    // Write past the end: ENOSPC, payload drained.
    raw.request(0, CMD_WRITE, 1, size - 512, 1024);
    raw.send(&[1; 1024]);
    assert_eq!(raw.simple_reply(), (ENOSPC, 1));
    // Read and trim past the end, offset overflow: EINVAL.
    raw.request(0, CMD_READ, 2, size - 512, 1024);
    assert_eq!(raw.simple_reply(), (EINVAL, 2));
    raw.request(0, 4, 3, size, 4096);
    assert_eq!(raw.simple_reply(), (EINVAL, 3));
    raw.request(0, CMD_READ, 4, u64::MAX - 10, 512);
    assert_eq!(raw.simple_reply(), (EINVAL, 4));
    // Unknown command and a flag not valid for the command: EINVAL.
    raw.request(0, 99, 5, 0, 0);
    assert_eq!(raw.simple_reply(), (EINVAL, 5));
    raw.request(1 << 3, CMD_READ, 6, 0, 512); // REQ_ONE on a read
    assert_eq!(raw.simple_reply(), (EINVAL, 6));
    raw.request(1 << 2, CMD_READ, 7, 0, 512); // DF without structured replies
    assert_eq!(raw.simple_reply(), (EINVAL, 7));
    raw.request(1 << 1, CMD_WRITE, 8, 0, 512); // NO_HOLE on a write, payload drained
    raw.send(&[2; 512]);
    assert_eq!(raw.simple_reply(), (EINVAL, 8));
    // Flush with an offset: EINVAL.
    raw.request(0, CMD_FLUSH, 9, 4096, 0);
    assert_eq!(raw.simple_reply(), (EINVAL, 9));
    // Block status without a metadata context: EINVAL.
    raw.request(0, CMD_BLOCK_STATUS, 10, 0, 4096);
    assert_eq!(raw.simple_reply(), (EINVAL, 10));
    // Zero-length requests succeed and do nothing.
    raw.request(0, CMD_WRITE, 11, 0, 0);
    assert_eq!(raw.simple_reply(), (0, 11));
    raw.request(0, CMD_READ, 12, size, 0);
    assert_eq!(raw.simple_reply(), (0, 12));
    // Still in sync, and nothing was written.
    raw.request(0, CMD_READ, 13, size - 512, 512);
    assert_eq!(raw.simple_reply(), (0, 13));
    assert_eq!(raw.read_n(512), vec![0; 512]);
    // A bad request magic cannot be resynchronised: the server closes.
    raw.send(&[0u8; 28]);
    assert!(raw.closed());
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let server = TestServer::start();
    let mut raw = server.raw();
    go(&mut raw, "acme/ro");
    raw.request(0, CMD_WRITE, 1, 0, 4096);
    raw.send(&[0; 4096]);
    assert_eq!(raw.simple_reply(), (EPERM, 1));
    raw.request(0, 4, 2, 0, 4096); // trim
    assert_eq!(raw.simple_reply(), (EPERM, 2));
    raw.request(0, 6, 3, 0, 4096); // write zeroes
    assert_eq!(raw.simple_reply(), (EPERM, 3));
    raw.request(1, CMD_READ, 4, 0, 4096); // FUA is not advertised on read-only exports
    assert_eq!(raw.simple_reply(), (EINVAL, 4));
    raw.request(0, CMD_FLUSH, 5, 0, 0);
    assert_eq!(raw.simple_reply(), (0, 5));
    assert_eq!(
        server.catalog.get("acme/ro").peek(0, 4096),
        vec![0x5a; 4096]
    );
}

#[test]
fn authentication_failure_is_eio_counted_and_not_fatal() {
    let server = TestServer::start();
    let mut raw = server.raw();
    go(&mut raw, "acme/tampered");
    raw.request(0, CMD_READ, 1, (1 << 20) - 4096, 3 * 4096);
    assert_eq!(raw.simple_reply(), (EIO, 1));
    assert_eq!(server.server.stats().authentication_failures, 1);
    raw.request(0, CMD_READ, 2, 0, 4096);
    assert_eq!(raw.simple_reply(), (0, 2));
    assert_eq!(raw.read_n(4096), vec![0x11; 4096]);
}

#[test]
fn structured_replies_carry_data_holes_errors_and_block_status() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.option(
        OPT_SET_META_CONTEXT,
        &meta_payload("acme/disk", &["base:", "x-other:thing", "base:allocation"]),
    );
    let (_, kind, data) = raw.option_reply();
    assert_eq!(kind, REP_META_CONTEXT);
    let context = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(raw.option_reply().1, REP_ACK);
    let (_, flags) = raw.go("acme/disk");
    assert_ne!(flags & (1 << 7), 0, "SEND_DF with structured replies");

    raw.request(0, CMD_WRITE, 1, 8192, 4096);
    raw.send(&[7; 4096]);
    assert_eq!(raw.simple_reply(), (0, 1));
    assert_eq!(disk.peek(8192, 4), vec![7; 4]);

    // A small read: one OFFSET_DATA chunk, final.
    raw.request(0, CMD_READ, 2, 8192, 4096);
    let (flags, kind, handle, payload) = raw.chunk();
    assert_eq!((flags, kind, handle), (1, 1, 2));
    assert_eq!(&payload[..8], &8192u64.to_be_bytes());
    assert_eq!(&payload[8..], &[7; 4096][..]);

    // A large read over a sparse range: holes as OFFSET_HOLE chunks.
    raw.request(0, CMD_READ, 3, 0, 1 << 20);
    let mut covered = 0u64;
    let mut holes = 0;
    loop {
        let (flags, kind, handle, payload) = raw.chunk();
        assert_eq!(handle, 3);
        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
        assert_eq!(offset, covered, "chunks arrive in order and do not overlap");
        match kind {
            1 => {
                let data = &payload[8..];
                assert_eq!(data, &disk.peek(offset, data.len() as u64)[..]);
                covered += data.len() as u64;
            }
            2 => {
                holes += 1;
                covered += u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap()));
            }
            other => panic!("unexpected chunk type {other}"),
        }
        if flags & 1 != 0 {
            break;
        }
    }
    assert_eq!(covered, 1 << 20);
    assert_eq!(holes, 2, "hole, data, hole");

    // The same with DF: a single data chunk.
    raw.request(1 << 2, CMD_READ, 4, 0, 1 << 20);
    let (flags, kind, _, payload) = raw.chunk();
    assert_eq!((flags, kind, payload.len()), (1, 1, 8 + (1 << 20)));

    // Errors of a structured read come as an error chunk.
    raw.request(0, CMD_READ, 5, 64 << 20, 4096);
    let (flags, kind, handle, payload) = raw.chunk();
    assert_eq!((flags, kind, handle), (1, 0x8001, 5));
    assert_eq!(&payload[..4], &EINVAL.to_be_bytes());

    // Block status: hole, data, hole.
    raw.request(0, CMD_BLOCK_STATUS, 6, 0, 16384);
    let (flags, kind, handle, payload) = raw.chunk();
    assert_eq!((flags, kind, handle), (1, 5, 6));
    assert_eq!(&payload[..4], &context.to_be_bytes());
    let descriptors: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(descriptors, [(8192, 3), (4096, 0), (4096, 3)]);
    // REQ_ONE: one descriptor.
    raw.request(1 << 3, CMD_BLOCK_STATUS, 7, 0, 16384);
    let (_, _, _, payload) = raw.chunk();
    assert_eq!(payload.len(), 4 + 8);
}

#[test]
fn meta_context_for_another_export_does_not_carry_over() {
    let server = TestServer::start();
    let mut raw = server.raw();
    raw.handshake(FIXED | NO_ZEROES);
    raw.option(OPT_STRUCTURED_REPLY, b"");
    raw.option_reply();
    raw.option(
        OPT_SET_META_CONTEXT,
        &meta_payload("acme/ro", &["base:allocation"]),
    );
    assert_eq!(raw.option_reply().1, REP_META_CONTEXT);
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.go("acme/disk");
    raw.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    let (_, kind, _, payload) = raw.chunk();
    assert_eq!(kind, 0x8001);
    assert_eq!(&payload[..4], &EINVAL.to_be_bytes());
}

/// A small write the export says may block runs off the connection's task:
/// a read sent after it is answered while the write waits.
#[test]
fn a_write_that_may_block_does_not_hold_up_the_connection() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    disk.may_block.store(true, Ordering::SeqCst);
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    raw.request(0, CMD_WRITE, 1, 0, 4096);
    raw.send(&[5; 4096]);
    wait_until("the write to reach the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 1
    });
    raw.request(0, CMD_READ, 2, 8192, 4096);
    assert_eq!(raw.simple_reply(), (0, 2), "the read is answered first");
    assert_eq!(raw.read_n(4096), vec![0; 4096]);
    disk.open_gate();
    assert_eq!(raw.simple_reply(), (0, 1));
    assert_eq!(disk.peek(0, 4), vec![5; 4]);
}

/// A small read the export cannot answer without waiting on its device
/// runs off the connection's task: a read sent after it, which the export
/// answers from memory, is answered while the first one waits.
#[test]
fn a_read_that_would_wait_does_not_hold_up_the_connection() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    disk.fill(0, 4096, 7);
    disk.fill(8192, 4096, 9);
    disk.reads_wait.store(true, Ordering::SeqCst);
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    raw.request(0, CMD_READ, 1, 0, 4096);
    wait_until("the read to reach the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 1
    });
    disk.reads_wait.store(false, Ordering::SeqCst);
    raw.request(0, CMD_READ, 2, 8192, 4096);
    assert_eq!(
        raw.simple_reply(),
        (0, 2),
        "the cached read is answered first"
    );
    assert_eq!(raw.read_n(4096), vec![9; 4096]);
    disk.open_gate();
    assert_eq!(raw.simple_reply(), (0, 1));
    assert_eq!(raw.read_n(4096), vec![7; 4096]);
}

#[test]
fn disconnect_finishes_in_flight_requests_first() {
    let server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    // FUA: the write runs off the connection's task, which goes on reading.
    raw.request(FLAG_FUA, CMD_WRITE, 1, 0, 4096);
    raw.send(&[3; 4096]);
    wait_until("the write to reach the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 1
    });
    // The server takes in the disconnect request while the write still waits
    // at the export.
    raw.request(0, CMD_DISC, 2, 0, 0);
    server.wait_for_log("client requested disconnect", 1);
    assert_eq!(disk.writes.load(Ordering::SeqCst), 0);
    disk.open_gate();
    assert_eq!(raw.simple_reply(), (0, 1));
    assert!(raw.closed());
    assert_eq!(disk.peek(0, 4), vec![3; 4]);
}

#[test]
fn shutdown_lets_in_flight_requests_reply_then_closes() {
    let mut server = TestServer::start();
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    raw.request(1, CMD_WRITE, 1, 4096, 4096);
    raw.send(&[4; 4096]);
    wait_until("the write to reach the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == 1
    });
    // A connection still haggling options is closed by the shutdown too.
    let mut idle = server.raw();
    idle.handshake(FIXED | NO_ZEROES);

    server.server.shutdown_handle().trigger();
    assert!(idle.closed(), "handshaking connection closes at shutdown");
    // The connection in transmission has seen the shutdown while its write
    // still waits at the export.
    server.wait_for_log("server shutting down", 1);
    disk.open_gate();
    // The in-flight write completes and replies (never ESHUTDOWN), then close.
    assert_eq!(raw.simple_reply(), (0, 1));
    assert!(raw.closed());
    assert_eq!(disk.fua_writes.load(Ordering::SeqCst), 1);
    server.stop();
    assert!(
        std::os::unix::net::UnixStream::connect(&server.socket).is_err() || {
            // The socket file may linger; a connection to it must not be served.
            let mut raw = server.raw();
            raw.closed()
        }
    );
}

#[test]
fn in_flight_limit_applies_backpressure_not_errors() {
    // FUA writes run on blocking threads in the default mode; with inline
    // requests off, every write does.
    for (inline, flags) in [(true, FLAG_FUA), (false, 0)] {
        let mut config = ServerConfig::default();
        config.max_in_flight_requests = 2;
        config.inline_requests = inline;
        let held = held_back(config.clone(), flags, 6, 4096, 2);
        assert_eq!(held, 2, "only two requests in flight (inline {inline})");
        all_complete(config, flags, 6, 4096, 2);
    }
}

#[test]
fn byte_limit_applies_backpressure_not_errors() {
    let mut config = ServerConfig::default();
    config.max_in_flight_bytes = 8192;
    config.inline_requests = false;
    let held = held_back(config.clone(), 0, 4, 65536, 1);
    assert_eq!(held, 1, "a request larger than the budget takes all of it");
    all_complete(config, 0, 4, 65536, 1);
}

/// Writes held back by the byte limit, then a disconnect request and the end
/// of the client's side: every write before the disconnect still runs and is
/// answered, then the server closes.
#[test]
fn writes_held_back_before_a_disconnect_and_half_close_all_run() {
    let mut config = ServerConfig::default();
    config.max_in_flight_bytes = 8192;
    config.inline_requests = false;
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    for handle in 0..4u64 {
        raw.request(0, CMD_WRITE, handle, handle * 65536, 65536);
        raw.send(&vec![handle as u8 + 1; 65536]);
    }
    raw.disconnect_and_close_write();
    server.wait_for_log(DISCONNECT_READ, 1);
    disk.open_gate();
    let mut handles: Vec<u64> = (0..4)
        .map(|_| raw.simple_reply())
        .map(|(error, handle)| {
            assert_eq!(error, 0);
            handle
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, vec![0, 1, 2, 3]);
    assert!(raw.closed());
    for handle in 0..4u64 {
        assert_eq!(disk.peek(handle * 65536, 4), vec![handle as u8 + 1; 4]);
    }
}

/// Sends `count` writes of `len` bytes with `flags` while the export holds
/// every write at its gate, and returns how many the server let through to
/// the export by the time it has looked at them all.
///
/// The writes are followed by a disconnect request and the end of the
/// client's side: the server notes that end of file only after it has looked
/// at every request before it. (What the server does with the held-back
/// writes afterwards, once the gate opens, is [`all_complete`]'s part.)
fn held_back(config: ServerConfig, flags: u16, count: u64, len: usize, expected: usize) -> usize {
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    for handle in 0..count {
        raw.request(flags, CMD_WRITE, handle, handle * len as u64, len as u32);
        raw.send(&vec![handle as u8 + 1; len]);
    }
    raw.disconnect_and_close_write();
    server.wait_for_log(DISCONNECT_READ, 1);
    // The admitted writes reach the export from worker threads, possibly a
    // little after the server read the disconnect; no more can be admitted
    // while they wait.
    wait_until("the admitted writes at the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) >= expected
    });
    let held = disk.waiting.load(Ordering::SeqCst);
    assert_eq!(disk.writes.load(Ordering::SeqCst), 0);
    disk.open_gate();
    held
}

/// Sends `count` writes of `len` bytes with `flags` while the export holds
/// every write at its gate; once `held` have reached it, opens the gate: every
/// write succeeds and lands.
fn all_complete(config: ServerConfig, flags: u16, count: u64, len: usize, held: usize) {
    let server = TestServer::start_with(MemCatalog::standard(), config, None);
    let disk = server.catalog.get("acme/disk");
    disk.close_gate();
    let mut raw = server.raw();
    go(&mut raw, "acme/disk");
    for handle in 0..count {
        raw.request(flags, CMD_WRITE, handle, handle * len as u64, len as u32);
        raw.send(&vec![handle as u8 + 1; len]);
    }
    wait_until("writes at the export", WAIT, || {
        disk.waiting.load(Ordering::SeqCst) == held
    });
    disk.open_gate();
    let mut handles: Vec<u64> = (0..count)
        .map(|_| {
            let (error, handle) = raw.simple_reply();
            assert_eq!(error, 0);
            handle
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (0..count).collect::<Vec<_>>());
    for handle in 0..count {
        assert_eq!(disk.peek(handle * len as u64, 1), vec![handle as u8 + 1]);
    }
    assert_eq!(disk.most_waiting.load(Ordering::SeqCst), held);
}
