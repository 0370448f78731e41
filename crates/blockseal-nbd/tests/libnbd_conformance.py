#!/usr/bin/python3
"""Protocol conformance of the blockseal NBD server, driven by libnbd.

Run by tests/libnbd.rs against an in-process server with the test catalog:
  libnbd_conformance.py unix SOCKET
  libnbd_conformance.py tls PORT ACME_CERT_DIR NO_TENANT_CERT_DIR CA_ONLY_DIR
Prints one line per check; exits non-zero on the first failure.
"""

import socket
import struct
import sys

import nbd

MiB = 1 << 20


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def expect_error(fn, errname, what):
    try:
        fn()
    except nbd.Error as e:
        check(errname is None or e.errno == errname,
              f"{what} fails with {errname} (got {e.errno}: {e.string})")
        return e
    check(False, f"{what} fails with {errname} (it succeeded)")


def unix_handle(sock, export=None, opt_mode=False):
    h = nbd.NBD()
    h.set_opt_mode(opt_mode)
    if export is not None:
        h.set_export_name(export)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    return h


def option_haggling(sock):
    h = unix_handle(sock, opt_mode=True)
    check(h.get_structured_replies_negotiated(), "structured replies negotiated")
    exports = []
    h.opt_list(lambda name, desc: exports.append((name, desc)))
    check(sorted(n for n, _ in exports) ==
          ["acme/disk", "acme/ro", "acme/tampered", "globex/disk"],
          f"NBD_OPT_LIST on the Unix socket shows every tenant: {exports}")
    check(("acme/disk", "acme main disk") in exports, "LIST carries descriptions")

    h.set_full_info(True)
    h.set_export_name("acme/disk")
    h.opt_info()
    check(h.get_size() == 64 * MiB, "INFO: size")
    check(h.get_canonical_export_name() == "acme/disk", "INFO: NBD_INFO_NAME")
    check(h.get_export_description() == "acme main disk", "INFO: NBD_INFO_DESCRIPTION")
    check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "INFO: preferred block size")
    check(h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB, "INFO: maximum block size 64 MiB")
    for name in ["flush", "fua", "trim", "zero", "fast_zero", "multi_conn", "df", "cache"]:
        check(getattr(h, "can_" + name)(), f"INFO: can_{name}")
    check(not h.is_read_only(), "INFO: writable")

    h.set_export_name("acme/nope")
    expect_error(h.opt_info, None, "INFO on an unknown export")

    contexts = []
    h.set_export_name("acme/disk")
    h.opt_list_meta_context(lambda name: contexts.append(name))
    check(contexts == ["base:allocation"], f"LIST_META_CONTEXT, no query: {contexts}")
    contexts.clear()
    h.add_meta_context("base:")
    h.opt_list_meta_context(lambda name: contexts.append(name))
    check(contexts == ["base:allocation"], f"LIST_META_CONTEXT 'base:': {contexts}")
    contexts.clear()
    h.clear_meta_contexts()
    h.add_meta_context("x-unknown:thing")
    h.opt_list_meta_context(lambda name: contexts.append(name))
    check(contexts == [], f"LIST_META_CONTEXT, unknown namespace: {contexts}")
    h.clear_meta_contexts()

    h.set_export_name("globex/none")
    expect_error(h.opt_go, None, "GO on an unknown export")
    exports.clear()
    h.opt_list(lambda name, desc: exports.append(name))
    check(len(exports) == 4, "the session continues after a failed GO")
    h.opt_abort()
    check(h.aio_is_closed() or h.aio_is_dead(), "ABORT closes the session")


def legacy_handshakes(sock):
    # No fixed newstyle: libnbd falls back to NBD_OPT_EXPORT_NAME with zero padding.
    h = nbd.NBD()
    h.set_handshake_flags(0)
    h.set_export_name("acme/disk")
    h.connect_unix(sock)
    check(h.get_size() == 64 * MiB, "NBD_OPT_EXPORT_NAME without fixed newstyle")
    check(h.pread(4, 0) == b"\0\0\0\0", "read after EXPORT_NAME with 124 zero bytes")
    h.shutdown()
    h = nbd.NBD()
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    h.set_export_name("acme/disk")
    h.connect_unix(sock)
    check(h.get_size() == 64 * MiB, "fixed newstyle without NO_ZEROES")
    h.shutdown()


def transmission(sock):
    h = unix_handle(sock, "acme/disk")
    size = h.get_size()
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated")

    h.pwrite(b"\xaa" * 8192, 0)
    check(h.pread(8192, 0) == b"\xaa" * 8192, "write then read")
    h.pwrite(b"\xbb" * 4096, 4096, nbd.CMD_FLAG_FUA)
    check(h.pread(4096, 4096) == b"\xbb" * 4096, "FUA write")
    h.zero(4096, 0)
    check(h.pread(4096, 0) == bytes(4096), "write zeroes")
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    expect_error(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
                 "ENOTSUP", "fast zero that must stay allocated")
    h.trim(4096, 4096)
    check(h.pread(8192, 0) == bytes(8192), "trim reads back as zeroes")
    h.flush()
    h.cache(65536, 0)

    h.pwrite(b"\x01" * 4096, 1 * MiB)
    entries = []
    h.block_status(2 * MiB, 0, lambda ctx, off, e, err: entries.append((ctx, off, list(e))))
    ctx, off, e = entries[0]
    pairs = list(zip(e[0::2], e[1::2]))
    check(ctx == "base:allocation" and off == 0, "block status context and offset")
    check(pairs[0] == (MiB, 3) and pairs[1] == (4096, 0) and pairs[2][1] == 3,
          f"block status: hole, data, hole: {pairs[:3]}")
    entries.clear()
    h.block_status(2 * MiB, 0, lambda ctx, off, e, err: entries.append(list(e)),
                   nbd.CMD_FLAG_REQ_ONE)
    check(len(entries[0]) == 2, "REQ_ONE: one extent")

    chunks = []
    def chunk(buf, offset, status, err):
        chunks.append((status, offset, len(buf)))
        return 0
    data = h.pread_structured(2 * MiB, 0, chunk)
    check(data[MiB:MiB + 4096] == b"\x01" * 4096 and data.count(0) == 2 * MiB - 4096,
          "structured read returns the right bytes")
    check(any(s == nbd.READ_HOLE for s, _, _ in chunks), f"structured read has hole chunks: {chunks}")
    chunks.clear()
    h.pread_structured(65536, MiB, chunk, nbd.CMD_FLAG_DF)
    check(len(chunks) == 1 and chunks[0][0] == nbd.READ_DATA, "DF: one data chunk")

    # Concurrency: many requests in flight, replies in any order.
    cookies = []
    for i in range(64):
        cookies.append(h.aio_pwrite(bytes([i]) * 4096, 8 * MiB + i * 4096))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    check(all(h.aio_command_completed(c) for c in cookies), "64 concurrent writes completed")
    bufs = [nbd.Buffer(4096) for _ in range(64)]
    cookies = [h.aio_pread(b, 8 * MiB + i * 4096) for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)
    check(all(b.to_bytearray() == bytes([i]) * 4096 for i, b in enumerate(bufs)),
          "64 concurrent writes and reads")

    # Requests the server must refuse: strict mode off so libnbd sends them.
    h.set_strict_mode(0)
    expect_error(lambda: h.pread(1024, size - 512), "EINVAL", "read past the end")
    expect_error(lambda: h.pwrite(b"x" * 1024, size - 512), "ENOSPC", "write past the end")
    expect_error(lambda: h.trim(1024, size - 512), "EINVAL", "trim past the end")
    expect_error(lambda: h.zero(1024, size - 512), "ENOSPC", "write zeroes past the end")
    expect_error(lambda: h.cache(1024, size - 512), "EINVAL", "cache past the end")
    expect_error(lambda: h.block_status(1024, size - 512, lambda *a: 0), "EINVAL",
                 "block status past the end")
    expect_error(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), "EINVAL",
                 "read with a flag not valid for reads")
    expect_error(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF), "EINVAL",
                 "write with a flag not valid for writes")
    # A write over the maximum payload (64 MiB) is more than libnbd sends at
    # all; raw_protocol.rs checks the server's answer to one.
    check(h.pread(4096, 1 * MiB) == b"\x01" * 4096, "the stream is in sync after refusals")
    check(h.pread(0, 0) == b"", "zero-length read succeeds")
    h.pwrite(b"", 0)
    h.shutdown()

    ro = unix_handle(sock, "acme/ro")
    check(ro.is_read_only(), "read-only export is flagged")
    ro.set_strict_mode(0)
    expect_error(lambda: ro.pwrite(b"x" * 4096, 0), "EPERM", "write to a read-only export")
    expect_error(lambda: ro.trim(4096, 0), "EPERM", "trim on a read-only export")
    expect_error(lambda: ro.zero(4096, 0), "EPERM", "write zeroes on a read-only export")
    check(ro.pread(4096, 0) == b"\x5a" * 4096, "read from a read-only export")
    ro.shutdown()

    t = unix_handle(sock, "acme/tampered")
    expect_error(lambda: t.pread(8192, MiB - 4096), "EIO", "read of a block failing authentication")
    check(t.pread(4096, 0) == b"\x11" * 4096, "other blocks still read")
    t.shutdown()


def raw_options(sock):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock)

    def recv(n):
        buf = b""
        while len(buf) < n:
            part = s.recv(n - len(buf))
            if not part:
                raise EOFError("server closed")
            buf += part
        return buf

    magic, opt, hflags = struct.unpack(">QQH", recv(18))
    check(magic == 0x4E42444D41474943 and opt == 0x49484156454F5054 and hflags == 3,
          "raw greeting")
    s.sendall(struct.pack(">I", 3))

    def option(o, data):
        s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
        m, ro, rtype, rlen = struct.unpack(">QIII", recv(20))
        check(m == 0x3E889045565A9 and ro == o, f"reply header for option {o}")
        return rtype, recv(rlen)

    rtype, _ = option(0x7777, b"\x01" * 300)
    check(rtype == 0x80000001, "unknown option: NBD_REP_ERR_UNSUP")
    bad_go = struct.pack(">I", 200) + b"acme/disk" + struct.pack(">H", 0)
    rtype, _ = option(7, bad_go)
    check(rtype == 0x80000003, "GO with a name longer than the data: NBD_REP_ERR_INVALID")
    rtype, _ = option(7, struct.pack(">I", 9) + b"acme/disk" + struct.pack(">HH", 2, 3))
    check(rtype == 0x80000003, "GO with the wrong number of info requests: NBD_REP_ERR_INVALID")
    rtype, _ = option(3, b"x")
    check(rtype == 0x80000003, "LIST with data: NBD_REP_ERR_INVALID")
    rtype, data = option(3, b"")
    check(rtype == 2, "LIST still works afterwards")
    s.close()


def tls(port, acme_dir, no_tenant_dir, ca_only_dir):
    def handle(certs):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(certs)
        h.set_opt_mode(True)
        return h

    h = handle(acme_dir)
    h.connect_tcp("localhost", port)
    check(h.get_tls_negotiated(), "TLS negotiated with a tenant certificate")
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    check(sorted(names) == ["acme/disk", "acme/ro", "acme/tampered"],
          f"LIST over TLS shows only the certificate's tenant: {names}")
    h.set_export_name("globex/disk")
    other = expect_error(h.opt_info, None, "INFO on another tenant's export")
    h.set_export_name("acme/none")
    missing = expect_error(h.opt_info, None, "INFO on a missing export")
    check(other.errno == missing.errno and other.string.replace("globex/disk", "X")
          == missing.string.replace("acme/none", "X"),
          "another tenant's export looks exactly like a missing one")
    h.set_export_name("globex/disk")
    expect_error(h.opt_go, None, "GO on another tenant's export")
    h.set_export_name("acme/disk")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    h.pwrite(b"\x42" * 4096, 0)
    check(h.pread(4096, 0) == b"\x42" * 4096, "I/O over TLS")
    h.shutdown()

    h = handle(no_tenant_dir)
    expect_error(lambda: (h.connect_tcp("localhost", port), h.opt_list(lambda *a: 0)), None,
                 "a certificate naming no tenant is refused")
    h = handle(ca_only_dir)
    expect_error(lambda: (h.connect_tcp("localhost", port), h.opt_list(lambda *a: 0)), None,
                 "a client without a certificate is refused")

    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_opt_mode(True)
    h.connect_tcp("localhost", port)
    e = expect_error(lambda: h.opt_list(lambda *a: 0), None, "LIST without TLS on a TLS listener")
    print(f"   (refusal without TLS: {e.string})")
    h.set_export_name("acme/disk")
    expect_error(h.opt_go, None, "GO without TLS on a TLS listener")


def main():
    mode = sys.argv[1]
    if mode == "unix":
        sock = sys.argv[2]
        option_haggling(sock)
        legacy_handshakes(sock)
        transmission(sock)
        raw_options(sock)
    elif mode == "tls":
        port, acme_dir, no_tenant_dir, ca_only_dir = sys.argv[2:6]
        tls(port, acme_dir, no_tenant_dir, ca_only_dir)
    else:
        sys.exit(f"unknown mode {mode}")
    print("all checks passed")


if __name__ == "__main__":
    main()
