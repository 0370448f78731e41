#!/usr/bin/env python3
"""The product's sizing as a load test: many tenant volumes on one server,
call recordings streamed into some of them, older recordings read back from
others. Run through scripts/load-test.sh, which checks the tools and builds
the binary; `--help` lists the options.

Model (defaults): 5000 volumes (100 tenants of 50), 600 recording streams, 50
readers. A stream is one call: G.711 at 8000 bytes/s, written in 160 ms
chunks; each chunk reaches the device as the 4 KiB page(s) holding it, as a
recorder's page cache writes them back, so a stream writes one 4 KiB page
every 160 ms, and every 5 s sends a FLUSH (an ext4 journal commit), which
runs beside its writes, as the kernel's does: one at a time, a FLUSH due
while the last one is still running follows it and counts as late. A chunk
is late (a missed deadline) when its write is not acknowledged within its
period after it was due; a chunk due while the stream's previous write is
unanswered waits for it (the recorder writes in order). A reader plays an
older recording back at 256 KiB/s in 64 KiB reads. The client is libnbd
(python3-libnbd's asynchronous API), one connection per stream, an event
loop per client process driving up to 1500 streams on that schedule.

Reported per run: write latency p50/p99/p99.9/max, missed deadlines, FLUSH
latency, read latency, server CPU (share of one core and per request), the
server's RSS and open file descriptors, and connection setup time (libnbd
connect to GO, measured while the load runs). Before a run each recording
stream writes one page, as a volume in service has been written before;
--cold leaves that out, and then the streams' first chunks open their
volumes' first segment files all at once. With --ceiling, runs with more
streams follow until the first one that misses a deadline (or, when the main
run misses already, with half as many until one does not).
"""

import argparse
import http.client
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

PAGE = 4096
VOLUME_SIZE = 64 << 20
# Recording regions of 4 MiB from offset 0 (14 of them), then the readers'
# recording at 56 MiB.
REGION = 4 << 20
REGIONS = 14
PLAYBACK_OFFSET = 56 << 20
PLAYBACK_BYTES = 8 << 20
# Streams per client process (each is one Python thread driving libnbd).
STREAMS_PER_CLIENT = 1500


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=120)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(self.path)


class Admin:
    """The admin API on the store's Unix socket, one kept-alive connection."""

    def __init__(self, path):
        self.conn = UnixHTTP(path)

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        self.conn.request(method, "/v1" + path, body=data, headers=headers)
        reply = self.conn.getresponse()
        text = reply.read()
        if reply.status >= 300:
            raise RuntimeError(f"{method} {path}: {reply.status} {text.decode(errors='replace')}")
        return json.loads(text) if text else None


class Server:
    def __init__(self, binary, workdir, metrics_port=None):
        self.dir = workdir
        self.data = os.path.join(workdir, "data")
        self.socket = os.path.join(workdir, "nbd.sock")
        key = os.path.join(workdir, "master.key")
        subprocess.run([binary, "key", "init", "--out", key], check=True,
                       stdout=subprocess.DEVNULL)
        config = os.path.join(workdir, "blockseal.toml")
        with open(config, "w") as f:
            f.write(
                'data_dir = "data"\n\n[master_key]\nfile = "master.key"\n\n'
                '[unix]\npath = "nbd.sock"\n\n'
                "[limits]\nmax_connections = 100000\nmax_connections_per_tenant = 100000\n"
                "max_handshakes = 8192\nhandshake_timeout_secs = 120\n"
            )
        self.log_path = os.path.join(workdir, "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config], cwd=workdir, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env=dict(os.environ, BLOCKSEAL_LOG="warn"))
        for line in self.proc.stdout:
            if line.startswith("ready "):
                break
        else:
            raise RuntimeError(f"the server exited before it was ready; see {self.log_path}")
        self.admin = Admin(os.path.join(self.data, "admin.sock"))

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.socket}"

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def status_kib(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")


def volume_name(i, per_tenant):
    return f"t{i // per_tenant:04d}", f"v{i % per_tenant:04d}"


def create_volumes(server, volumes, per_tenant):
    started = time.monotonic()
    tenants = math.ceil(volumes / per_tenant)
    for t in range(tenants):
        server.admin.call("POST", "/tenants", {"name": f"t{t:04d}"})
    for i in range(volumes):
        tenant, volume = volume_name(i, per_tenant)
        server.admin.call("POST", f"/tenants/{tenant}/volumes",
                          {"name": volume, "size": VOLUME_SIZE})
        if (i + 1) % 1000 == 0:
            log(f"  {i + 1} volumes created")
    return time.monotonic() - started


def reader_volumes(readers, volumes, per_tenant):
    """One volume of each of the first `readers` tenants (its second)."""
    tenants = math.ceil(volumes / per_tenant)
    if readers > tenants:
        raise SystemExit(f"{readers} readers need as many tenants; there are {tenants}")
    return [t * per_tenant + min(1, per_tenant - 1) for t in range(readers)]


def prefill(server, indexes, per_tenant, nbd):
    """Writes an older recording (random bytes) where the readers read."""
    chunk = os.urandom(1 << 20)
    for i in indexes:
        h = nbd.NBD()
        h.connect_uri(server.uri("/".join(volume_name(i, per_tenant))))
        for off in range(0, PLAYBACK_BYTES, len(chunk)):
            h.pwrite(chunk, PLAYBACK_OFFSET + off)
        h.flush()
        h.shutdown()


def hist_add(hist, seconds):
    """Latency histogram: buckets of 2 % (log scale) of microseconds."""
    b = int(math.log(max(seconds * 1e6, 1.0)) * 50)
    hist[b] = hist.get(b, 0) + 1


def hist_merge(into, hist):
    for k, v in hist.items():
        into[int(k)] = into.get(int(k), 0) + v


def percentile(hist, p):
    """The p-th percentile of a histogram, in milliseconds (bucket's top)."""
    total = sum(hist.values())
    if total == 0:
        return 0.0
    need = math.ceil(total * p / 100.0)
    seen = 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= need:
            return math.exp((k + 1) / 50) / 1000.0
    return 0.0


class Stream:
    """One connection: a recording (writes, FLUSH every few) or a reader."""

    __slots__ = ("h", "fd", "kind", "offset", "base", "span", "size", "period", "next_due",
                 "waiting", "inflight", "since_flush", "mask", "flushing", "flush_owed")

    def __init__(self, h, kind, base, span, size, period, first_due):
        self.h = h
        self.fd = h.aio_get_fd()
        self.kind = kind
        self.base = base
        self.span = span
        self.offset = 0
        self.size = size
        self.period = period
        self.next_due = first_due
        self.waiting = []      # due times of chunks not sent yet
        self.inflight = False
        self.since_flush = 0
        self.mask = 0
        self.flushing = False
        self.flush_owed = False


def worker(spec_path):
    """Runs the streams of one client process; prints its results as JSON."""
    import heapq
    import random
    import select
    import nbd

    with open(spec_path) as f:
        spec = json.load(f)
    period = spec["period"]
    bs, read_bs = spec["bs"], spec["read_bs"]
    flush_every = spec["flush_every"]
    write_buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(bs)))
    read_buf = nbd.Buffer(read_bs)
    rng = random.Random(spec["seed"])
    out = {"connect_ms": [], "write": {}, "flush": {}, "read": {}, "writes": 0, "flushes": 0,
           "reads": 0, "missed": 0, "late_reads": 0, "late_flushes": 0, "errors": 0,
           "chunks": 0, "missed_by_second": {}}
    streams = []
    start = spec["start_at"]
    for kind, items in (("rec", spec["recorders"]), ("play", spec["readers"])):
        for item in items:
            h = nbd.NBD()
            t0 = time.monotonic()
            h.connect_uri(item["uri"])
            out["connect_ms"].append((time.monotonic() - t0) * 1000.0)
            p = period if kind == "rec" else spec["read_period"]
            streams.append(Stream(h, kind, item["offset"], item["span"],
                                  bs if kind == "rec" else read_bs, p, 0.0))
    ep = select.epoll()
    by_fd = {}
    for st in streams:
        by_fd[st.fd] = st
        st.mask = select.EPOLLIN
        ep.register(st.fd, st.mask)

    def watch(st):
        want = select.EPOLLIN | (select.EPOLLOUT if st.h.aio_get_direction() & 2 else 0)
        if want != st.mask:
            st.mask = want
            ep.modify(st.fd, want)

    if spec["warm"]:
        # Volumes in service: each recording volume has been written before
        # (its segment file exists), so the run measures the steady state,
        # not 600 volumes opening their first segment file in one instant.
        warmed = []
        for st in streams:
            if st.kind == "rec":
                st.h.aio_pwrite(write_buf, st.base,
                                completion=lambda err, st=st: warmed.append(err.value) or 1)
                watch(st)
        want = sum(1 for st in streams if st.kind == "rec")
        while len(warmed) < want:
            for fd, ev in ep.poll(1.0):
                st = by_fd[fd]
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    st.h.aio_notify_read()
                if ev & select.EPOLLOUT:
                    st.h.aio_notify_write()
                watch(st)
        if any(warmed):
            raise SystemExit("a warm-up write failed")
    # Every stream starts at its own point of its first period.
    t_start = time.monotonic() + max(0.0, start - time.time())
    end = t_start + spec["duration"]
    due = []
    for i, st in enumerate(streams):
        st.next_due = t_start + rng.random() * st.period
        heapq.heappush(due, (st.next_due, i))
    # Completion callbacks run inside libnbd with the handle locked: they
    # only note what finished; the loop acts on it after the call returns.
    finished = []

    def send(st, chunk_due):
        st.inflight = True
        offset = st.base + st.offset
        st.offset = (st.offset + st.size) % st.span
        sent = time.monotonic()

        def completed(err, st=st, sent=sent, chunk_due=chunk_due):
            finished.append((st, "rec" if st.kind == "rec" else "play", sent, chunk_due,
                             time.monotonic(), err.value))
            return 1

        if st.kind == "rec":
            st.h.aio_pwrite(write_buf, offset, completion=completed)
        else:
            st.h.aio_pread(read_buf, offset, completion=completed)

    def flush(st):
        sent = time.monotonic()

        def completed(err, st=st, sent=sent):
            finished.append((st, "flush", sent, 0.0, time.monotonic(), err.value))
            return 1

        st.h.aio_flush(completion=completed)

    def settle():
        """Acts on what finished: records it, sends what follows."""
        touched = set()
        while finished:
            st, what, sent, chunk_due, now, err = finished.pop(0)
            touched.add(st)
            if err:
                out["errors"] += 1
            if what == "rec":
                hist_add(out["write"], now - sent)
                out["writes"] += 1
                out["chunks"] += 1
                if now > chunk_due + period:
                    out["missed"] += 1
                    second = str(int(chunk_due - t_start))
                    out["missed_by_second"][second] = out["missed_by_second"].get(second, 0) + 1
                st.since_flush += 1
                if st.since_flush >= flush_every:
                    # The journal commit: asynchronous to the recorder's
                    # writes, one at a time; a commit still running when the
                    # next is due is a late flush, and the next follows it.
                    st.since_flush = 0
                    if st.flushing:
                        out["late_flushes"] += 1
                        st.flush_owed = True
                    else:
                        st.flushing = True
                        flush(st)
            elif what == "flush":
                hist_add(out["flush"], now - sent)
                out["flushes"] += 1
                st.flushing = False
                if st.flush_owed:
                    st.flush_owed = False
                    st.flushing = True
                    flush(st)
                continue
            else:
                hist_add(out["read"], now - sent)
                out["reads"] += 1
                if now > chunk_due + st.period:
                    out["late_reads"] += 1
            st.inflight = False
            if st.waiting:
                send(st, st.waiting.pop(0))
        for st in touched:
            watch(st)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            t, i = heapq.heappop(due)
            st = streams[i]
            if st.inflight:
                st.waiting.append(t)
            else:
                send(st, t)
                settle()
                watch(st)
            if t + st.period < end:
                heapq.heappush(due, (t + st.period, i))
        busy = any(st.inflight or st.flushing for st in streams) if not due else True
        if not due and not busy:
            break
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
        for fd, ev in ep.poll(timeout):
            st = by_fd[fd]
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                st.h.aio_notify_read()
            if ev & select.EPOLLOUT:
                st.h.aio_notify_write()
            settle()
            watch(st)
        if not due and time.monotonic() > end + 60:
            raise SystemExit("requests still unanswered a minute after the run")
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    out["elapsed"] = time.monotonic() - t_start
    for st in streams:
        st.h.shutdown()
    json.dump(out, sys.stdout)


def connect_times(server, indexes, per_tenant, nbd):
    times = []
    for i in indexes:
        h = nbd.NBD()
        t0 = time.monotonic()
        h.connect_uri(server.uri("/".join(volume_name(i, per_tenant))))
        times.append((time.monotonic() - t0) * 1000.0)
        h.shutdown()
    times.sort()
    return times


def run(server, args, streams, duration, per_tenant, readers, workdir, nbd):
    period = args.chunk_ms / 1000.0
    chunk_bytes = args.codec_rate * period
    bs = max(PAGE, math.ceil(chunk_bytes / PAGE) * PAGE)
    flush_every = max(1, round(args.flush_secs / period))
    read_bs = 64 << 10
    recorders = []
    for s in range(streams):
        volume = s % args.volumes
        region = s // args.volumes
        if region >= REGIONS:
            raise SystemExit(f"{streams} streams need more than {REGIONS} per volume")
        recorders.append({"uri": server.uri("/".join(volume_name(volume, per_tenant))),
                          "offset": region * REGION, "span": REGION})
    players = [{"uri": server.uri("/".join(volume_name(v, per_tenant))),
                "offset": PLAYBACK_OFFSET, "span": PLAYBACK_BYTES} for v in readers]
    workers = max(1, math.ceil(streams / STREAMS_PER_CLIENT))
    log(f"run: {streams} streams, {len(readers)} readers, {duration} s, {workers} client "
        f"process(es) ({bs}-byte write every {period * 1000:.0f} ms, "
        f"FLUSH every {flush_every} writes)")
    # Connections first (each client connects its streams), then everyone
    # starts together.
    start_at = time.time() + 5 + streams / 400
    procs = []
    for w in range(workers):
        spec = {"period": period, "bs": bs, "read_bs": read_bs, "flush_every": flush_every,
                "read_period": read_bs / args.read_rate, "duration": duration,
                "start_at": start_at, "seed": w, "warm": not args.cold,
                "recorders": recorders[w::workers], "readers": players if w == 0 else []}
        path = os.path.join(workdir, f"client-{streams}-{w}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", path],
                                      stdout=subprocess.PIPE, text=True))
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    peak_fds = [server.fds()]
    setup = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            try:
                peak_fds[0] = max(peak_fds[0], server.fds())
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Connection setup while the load runs.
    if duration >= 6:
        stop.wait(min(5.0, duration / 3))
        setup = connect_times(server, range(min(args.volumes, 200)), per_tenant, nbd)
    results = []
    for proc in procs:
        text, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a client process failed ({proc.returncode})")
        results.append(json.loads(text))
    elapsed = time.monotonic() - t0
    stop.set()
    cpu = server.cpu_seconds() - cpu0

    merged = {"write": {}, "flush": {}, "read": {}}
    total = {k: sum(r[k] for r in results)
             for k in ("writes", "flushes", "reads", "missed", "late_reads", "late_flushes",
                       "errors", "chunks", "cpu")}
    for r in results:
        for k in merged:
            hist_merge(merged[k], r[k])
    client_connect = sorted(t for r in results for t in r["connect_ms"])
    by_second = {}
    for r in results:
        for k, v in r["missed_by_second"].items():
            by_second[int(k)] = by_second.get(int(k), 0) + v
    requests = total["writes"] + total["flushes"] + total["reads"]

    def pick(times, q):
        return round(times[min(len(times) - 1, int(len(times) * q))], 2) if times else None

    return {
        "streams": streams,
        "readers": len(readers),
        "volumes": args.volumes,
        "seconds": round(elapsed, 1),
        "chunk_ms": args.chunk_ms,
        "codec_rate": args.codec_rate,
        "writes": total["writes"],
        "flushes": total["flushes"],
        "reads": total["reads"],
        "errors": total["errors"],
        "chunks": total["chunks"],
        "write_ms": {"p50": percentile(merged["write"], 50),
                     "p99": percentile(merged["write"], 99),
                     "p999": percentile(merged["write"], 99.9),
                     "max": percentile(merged["write"], 100)},
        "flush_ms": {"p50": percentile(merged["flush"], 50),
                     "p99": percentile(merged["flush"], 99),
                     "max": percentile(merged["flush"], 100)},
        "read_ms": {"p50": percentile(merged["read"], 50), "p99": percentile(merged["read"], 99)},
        "missed_deadlines": total["missed"],
        # Seconds into the run (when the chunk was due): missed chunks.
        "missed_by_second": dict(sorted(by_second.items())),
        "late_reads": total["late_reads"],
        "late_flushes": total["late_flushes"],
        "server_cpu_cores": round(cpu / elapsed, 3),
        "server_cpu_us_per_request": round(cpu * 1e6 / requests, 1) if requests else None,
        "client_cpu_cores": round(total["cpu"] / elapsed, 3),
        "server_rss_mib": round(server.status_kib("VmRSS") / 1024, 1),
        "server_peak_rss_mib": round(server.status_kib("VmHWM") / 1024, 1),
        "server_fds_peak": peak_fds[0],
        "connect_ms": {"samples": len(setup), "p50": pick(setup, 0.5), "p99": pick(setup, 0.99),
                       "max": pick(setup, 1.0)},
        "connect_all_ms": {"samples": len(client_connect), "p50": pick(client_connect, 0.5),
                           "p99": pick(client_connect, 0.99)},
    }


def row(r):
    w, f, rd, c = r["write_ms"], r["flush_ms"], r["read_ms"], r["connect_ms"]
    conn = f"{c['p50']:.1f}/{c['p99']:.1f}" if c["p50"] is not None else "-"
    return (f"| {r['streams']} | {w['p50']:.2f} | {w['p99']:.2f} | {w['p999']:.2f} | {w['max']:.1f} "
            f"| {r['missed_deadlines']} of {r['chunks']} "
            f"| {f['p50']:.1f} / {f['p99']:.1f} ({r['late_flushes']} late) | {rd['p99']:.2f} "
            f"| {r['server_cpu_cores']:.2f} ({r['server_cpu_us_per_request']} µs) "
            f"| {r['client_cpu_cores']:.2f} | {r['server_peak_rss_mib']:.0f} "
            f"| {r['server_fds_peak']} | {conn} |")


HEADER = ("| streams | write p50 ms | p99 | p99.9 | max | missed deadlines | FLUSH p50 / p99 ms "
          "| read p99 ms | server CPU cores (per request) | client CPU cores | server peak RSS MiB "
          "| server fds | connect p50/p99 ms |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--streams", type=int, default=600)
    p.add_argument("--volumes", type=int, default=5000)
    p.add_argument("--volumes-per-tenant", type=int, default=50)
    p.add_argument("--readers", type=int, default=50)
    p.add_argument("--duration", type=int, default=60, help="seconds of the main run")
    p.add_argument("--codec-rate", type=int, default=8000, help="bytes per second per stream")
    p.add_argument("--chunk-ms", type=int, default=160, help="milliseconds per chunk (20-160)")
    p.add_argument("--flush-secs", type=float, default=5.0)
    p.add_argument("--read-rate", type=int, default=256 << 10,
                   help="bytes per second of each reader")
    p.add_argument("--ceiling", action="store_true",
                   help="after the main run, more streams until one misses a deadline")
    p.add_argument("--ceiling-duration", type=int, default=30)
    p.add_argument("--ceiling-steps", default="2,4,6,8,10,12,14",
                   help="multiples of --streams tried in turn")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--cold", action="store_true",
                   help="no warm-up write: each stream's first chunk opens its volume's "
                   "first segment file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1])
        return
    args = p.parse_args()
    if not 1 <= args.chunk_ms <= 1000:
        p.error("--chunk-ms must be 1 to 1000")
    import nbd

    with tempfile.TemporaryDirectory(prefix="blockseal-load-") as workdir:
        server = Server(os.path.abspath(args.binary), workdir)
        try:
            log(f"creating {args.volumes} volumes")
            took = create_volumes(server, args.volumes, args.volumes_per_tenant)
            log(f"  {took:.1f} s ({took * 1000 / max(args.volumes, 1):.1f} ms a volume)")
            readers = reader_volumes(args.readers, args.volumes, args.volumes_per_tenant)
            prefill(server, readers, args.volumes_per_tenant, nbd)
            results = [run(server, args, args.streams, args.duration,
                           args.volumes_per_tenant, readers, workdir, nbd)]
            if args.ceiling and results[0]["missed_deadlines"] == 0:
                for k in [int(x) for x in args.ceiling_steps.split(",")]:
                    if results[-1]["missed_deadlines"] > 0:
                        break
                    results.append(run(server, args, args.streams * k, args.ceiling_duration,
                                       args.volumes_per_tenant, readers, workdir, nbd))
            elif args.ceiling:
                # Missed at the main size already: halve until a run does not.
                streams = args.streams // 2
                while streams >= 10 and results[-1]["missed_deadlines"] > 0:
                    results.append(run(server, args, streams, args.ceiling_duration,
                                       args.volumes_per_tenant, readers, workdir, nbd))
                    streams //= 2
        finally:
            server.stop()
    print(HEADER)
    for r in results:
        print(row(r))
    passing = [r["streams"] for r in results if r["missed_deadlines"] == 0]
    if args.ceiling:
        failing = [r["streams"] for r in results if r["missed_deadlines"] > 0]
        print(f"\nceiling: {max(passing) if passing else 0} streams without a missed deadline"
              + (f"; {min(failing)} missed" if failing else
                 " (the last step tried; raise --ceiling-steps for more)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "volume_create_seconds": took}, f, indent=1)
    if any(r["errors"] for r in results):
        sys.exit("requests failed")


if __name__ == "__main__":
    main()
