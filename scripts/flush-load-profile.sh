#!/usr/bin/env bash
# Evidence of where a blockseal server's time goes while it serves a load
# (`scripts/flush-load.sh --profile` runs this beside fio):
#
#   scripts/flush-load-profile.sh SERVER_PID OUT_DIR [DELAY_SECONDS]
#
# After DELAY_SECONDS (default 0), in this order, each step bounded in time:
#   threads.txt   10 s of 20 Hz samples of every server thread: its name, its
#                 state and the system call it is blocked in
#                 (/proc/PID/task/*/syscall), as the average number of threads
#                 in each
#   uprobes.txt   5 s of uprobes on source lines of the volume flush path:
#                 time in the segment syncs, building the batch, waiting for
#                 the store-wide commit lock, the commit under it, waiting for
#                 the marker lock (the probes are removed afterwards)
#   syncs.txt     5 s of `perf trace` of fsync-like calls and pwrite64 with the
#                 file each one touches and how long it took, per file kind
#                 (segment, redb, sled, COMMITS marker), with the largest number
#                 in flight at once, and the redb commits (one thread's writes
#                 to the redb file ending in its fdatasync); step "fsyncs"
#                 instead traces the fsync-like calls only (much lighter)
#   syscalls.txt  5 s of `perf trace -s`: every system call, all threads
#   perf.txt      5 s of `perf record -e cpu-clock --call-graph dwarf`: the
#                 server's CPU by symbol, and by what the stack is doing
#                 (perf-categories.txt)
#   sched.txt     3 s of `perf sched record`, system-wide: CPU time of the
#                 server, fio and everything else, and how long runnable
#                 threads waited for a CPU
#   stacks.txt    3 snapshots, 2 s apart, of every thread's stack with gdb,
#                 grouped by the innermost blockseal/redb/sled frames and the
#                 frame on top (gdb stops the server while it reads, so only
#                 the first snapshot shows it undisturbed)
#   strace-c.txt  5 s of `strace -c -f` (system call counts and time; strace
#                 stops every thread at every call, so the server is much
#                 slower meanwhile: use it for ratios, not rates)
#
# A step whose tool is missing is skipped; one that fails leaves a note.
# PROFILE_STEPS (default "threads uprobes syncs syscalls perf sched stacks strace")
# picks steps; each one disturbs the server a little more than the one before.
set -euo pipefail

pid=${1:?usage: flush-load-profile.sh SERVER_PID OUT_DIR [DELAY_SECONDS]}
out=${2:?usage: flush-load-profile.sh SERVER_PID OUT_DIR [DELAY_SECONDS]}
delay=${3:-0}
# Stopped by a signal, still run the EXIT trap (it deletes uprobes).
trap 'exit 143' TERM INT
steps=" ${PROFILE_STEPS:-threads uprobes syncs syscalls perf sched stacks strace} "
want() { [[ $steps == *" $1 "* ]]; }
PY=/usr/bin/python3
mkdir -p "$out"
sleep "$delay"
kill -0 "$pid" 2>/dev/null || {
	echo "flush-load-profile: process $pid is gone" >&2
	exit 1
}

# ---------------------------------------------------------- thread states --
want threads && $PY - "$pid" 10 20 >"$out/threads.txt" <<'PY'
import collections, os, sys, time
pid, seconds, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
# x86_64 numbers of the calls a storage server blocks in.
names = {0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 19: "readv",
         20: "writev", 23: "select", 24: "sched_yield", 26: "msync", 35: "nanosleep",
         44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 74: "fsync",
         75: "fdatasync", 77: "ftruncate", 202: "futex", 230: "clock_nanosleep",
         232: "epoll_wait", 257: "openat", 277: "sync_file_range", 281: "epoll_pwait",
         285: "fallocate", 295: "preadv", 296: "pwritev", 441: "epoll_pwait2"}
counts = collections.Counter()
by_state = collections.Counter()
samples = 0
end = time.time() + seconds
while time.time() < end:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        break
    samples += 1
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = open(f"{base}/comm").read().strip()
            state = open(f"{base}/stat").read().rsplit(")", 1)[1].split()[0]
            call = open(f"{base}/syscall").read().split()[0]
        except (OSError, IndexError):
            continue
        if call == "running":
            what = "running"
        elif call == "-1":
            what = "blocked outside a call"
        else:
            what = names.get(int(call), f"syscall {call}")
        counts[(comm, state, what)] += 1
        by_state[state] += 1
    time.sleep(1 / hz)
print(f"{samples} samples of /proc/{pid}/task over {seconds:g} s")
print("average threads by state: " + ", ".join(
    f"{s} {n / max(samples, 1):.1f}" for s, n in by_state.most_common()))
print()
print(f"{'threads':>8}  {'name':<24} {'state':<5} in")
for (comm, state, what), n in counts.most_common():
    print(f"{n / max(samples, 1):8.2f}  {comm:<24} {state:<5} {what}")
PY

# --------------------------------------------------------------- uprobes --
# Where a volume flush spends its time, from uprobes on source lines of the
# flush path (found by their statements, so they follow edits of the code):
# the segment syncs, building the metadata batch, waiting for the store's
# commit lock, the commit under it, and waiting for the marker lock.
if want uprobes && command -v perf >/dev/null 2>&1; then
	exe=$(readlink "/proc/$pid/exe")
	src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/blockseal-volume/src"
	probes=$($PY - "$src" <<'PY'
import sys
src = sys.argv[1]
def find(path, after, text, offset=0):
    lines = open(f"{src}/{path}").read().split("\n")
    # The function or impl the statement must follow: a line that starts
    # with it (so `pub fn flush` does not stand in for `fn flush`).
    start = next((i for i, l in enumerate(lines) if l.strip().startswith(after)), None)
    if start is None:
        return None
    for i in range(start, len(lines)):
        if text in lines[i]:
            return f"crates/blockseal-volume/src/{path}:{i + 1 + offset}"
    return None
specs = [
    ("f_start", "volume.rs", "fn flush(&self) -> Result<(), VolumeError>", "let mut state = self.flush.lock()"),
    ("f_synced", "volume.rs", "fn flush(&self) -> Result<(), VolumeError>", "if !entries.is_empty() {"),
    ("f_built", "volume.rs", "fn flush(&self) -> Result<(), VolumeError>", "let writers = std::mem::take(&mut *self.lock_pending_writers());"),
    ("c_enter", "marker.rs", "impl MetaStore for Sequenced", "let mut last = self.committing.lock()"),
    ("c_locked", "marker.rs", "impl MetaStore for Sequenced", "let sequence = *last + 1;"),
    ("c_done", "marker.rs", "impl MetaStore for Sequenced", "*last = sequence;"),
    ("m_enter", "marker.rs", "impl MetaStore for Sequenced", "let mut marker = self.marker.lock()"),
    ("m_locked", "marker.rs", "impl MetaStore for Sequenced", "if marker.written >= sequence {"),
]
for name, path, after, text in specs:
    where = find(path, after, text)
    if where:
        print(f"{name}={where}")
PY
)
	added=0
	# The probes are the system's until deleted: delete them whatever happens.
	trap 'perf probe -q -d "probe_blockseal:*" >/dev/null 2>&1 || true' EXIT
	for spec in $probes; do
		perf probe -q -x "$exe" -a "$spec" >/dev/null 2>&1 && added=$((added + 1))
	done
	if ((added >= 6)); then
		timeout -s INT 10 perf record -e 'probe_blockseal:*' -p "$pid" -o "$out/uprobes.data" \
			-- sleep 5 >"$out/uprobes-record.log" 2>&1 || true
		perf script -i "$out/uprobes.data" -F tid,time,event 2>/dev/null | $PY -c '
import collections, re, sys
events = collections.defaultdict(list)
for line in sys.stdin:
    m = re.match(r"\s*(\d+)\s+([\d.]+):\s+probe_blockseal:(\w+)", line)
    if m:
        events[m.group(1)].append((float(m.group(2)) * 1000, m.group(3)))
order = ["f_start", "f_synced", "f_built", "c_enter", "c_locked", "c_done", "m_enter", "m_locked"]
flushes = []
for tid, evs in events.items():
    rec = None
    last = (None, 0.0)
    for t, name in sorted(evs):
        # A probe on a line the compiler spread over several addresses fires
        # at each of them: the first hit counts.
        if name == last[0] and t - last[1] < 0.2:
            continue
        last = (name, t)
        if name == "f_start":
            rec = {"f_start": t}
            flushes.append(rec)
        elif rec is not None and name not in rec:
            rec[name] = t
phases = [
    ("segment fdatasync(s) and the flush lock", "f_start", "f_synced"),
    ("building the batch (old mappings looked up)", "f_synced", "f_built"),
    ("to the commit lock", "f_built", "c_enter"),
    ("waiting for the store-wide commit lock", "c_enter", "c_locked"),
    ("redb commit under the lock", "c_locked", "c_done"),
    ("to the marker lock", "c_done", "m_enter"),
    ("waiting for the marker lock", "m_enter", "m_locked"),
]
whole = [f for f in flushes if all(k in f for k in order)]
span = (max(t for evs in events.values() for t, _ in evs) - min(t for evs in events.values() for t, _ in evs)) if events else 0
print(f"{len(whole)} volume flushes seen whole in {span / 1000:.1f} s (uprobes on the flush path)")
if whole:
    print("%-46s %8s %7s %7s %7s %8s %6s" % ("phase", "mean ms", "p50", "p90", "p99", "max", "share"))
    total = sum(f["m_locked"] - f["f_start"] for f in whole)
    for name, a, b in phases:
        v = sorted(f[b] - f[a] for f in whole)
        q = lambda x: v[min(len(v) - 1, int(x * len(v)))]
        print(f"{name:<46} {sum(v) / len(v):>8.2f} {q(.5):>7.2f} {q(.9):>7.2f} {q(.99):>7.2f} {v[-1]:>8.2f} {100 * sum(v) / total:>5.0f}%")
    holds = sorted(f["c_done"] - f["c_locked"] for f in whole)
    print(f"commit lock held {100 * sum(holds) / span:.0f} % of the time (by these flushes)")
' >"$out/uprobes.txt" 2>&1 || true
		rm -f "$out/uprobes.data"
	else
		echo "could not place the probes (perf probe needs the binary's line tables)" >"$out/uprobes.txt"
	fi
	perf probe -q -d 'probe_blockseal:*' >/dev/null 2>&1 || true
fi

# ------------------------------------------------------------ perf trace --
fd_map() {
	# fd -> path of the server's descriptors now (segments opened during the
	# trace may be missing, and are then counted as "unknown fd").
	for f in /proc/"$pid"/fd/*; do
		printf '%s %s\n' "${f##*/}" "$(readlink "$f" 2>/dev/null || true)"
	done
}
if { want syncs || want fsyncs; } && command -v perf >/dev/null 2>&1; then
	# "fsyncs" leaves the writes out: about 1 % of the events, so it hardly
	# disturbs the server, but a commit's writes then count as lock wait.
	events=fdatasync,fsync,sync_file_range,msync
	want syncs && events=$events,pwrite64,pwritev
	fd_map >"$out/fds-before.txt"
	timeout -s INT 5 perf trace -p "$pid" -e "$events" \
		-o "$out/perf-trace.txt" >/dev/null 2>&1 || true
	fd_map >"$out/fds-after.txt"
	$PY - "$out" >"$out/syncs.txt" <<'PY'
import collections, os, re, sys
out = sys.argv[1]
fds = {}
for name in ("fds-before.txt", "fds-after.txt"):
    for line in open(os.path.join(out, name)):
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            fds[parts[0]] = parts[1].strip()
def kind(fd):
    path = fds.get(fd, "")
    if "/segments/" in path:
        return "segment file"
    if path.endswith(".redb"):
        return "redb metadata"
    if path.endswith("COMMITS"):
        return "COMMITS marker"
    if "/meta/" in path:
        return "sled metadata"
    return "unknown fd"
# perf trace writes a call either whole,
#     12.345 ( 1.234 ms): blockseal/4321 fdatasync(fd: 12)    = 0
# or, when another thread's call comes in between, in two lines:
#     12.345 (         ): blockseal/4321 fdatasync(fd: 12)    ...
#     12.345 ( 1.234 ms): blockseal/4321  ... [continued]: fdatasync())  = 0
line_re = re.compile(r"^\s*([\d.]+|\?) \(\s*([\d.]*)(?: ms)?\s*\): (\S+)\s+(.*)$")
call_re = re.compile(r"^(\w+)\(fd: (\d+)")
cont_re = re.compile(r"^\.\.\. \[continued\]: (\w+)\(")
pending = {}
calls = []  # (start ms, duration ms, thread, call, file kind)
for line in open(os.path.join(out, "perf-trace.txt"), errors="replace"):
    m = line_re.match(line)
    if not m:
        continue
    start, dur, thread, rest = m.groups()
    c = cont_re.match(rest)
    if c:
        opened = pending.pop(thread, None)
        if opened and dur and opened[1] == c.group(1):
            calls.append((opened[0], float(dur), thread, opened[1], kind(opened[2])))
        continue
    c = call_re.match(rest)
    # A call that began before the trace shows a start of "?" or a wrapped
    # negative number: skip it.
    if not c or start == "?" or float(start) > 1e9:
        continue
    if dur:
        calls.append((float(start), float(dur), thread, c.group(1), kind(c.group(2))))
    else:
        pending[thread] = (float(start), c.group(1), c.group(2))
if not calls:
    print("no calls traced (perf trace missing or not permitted)")
    sys.exit()
t0 = min(c[0] for c in calls)
span = max(c[0] + c[1] for c in calls) - t0
print(f"{len(calls)} calls in {span / 1000:.2f} s traced")
print()
print(f"{'file kind':<16} {'call':<10} {'count':>6} {'per s':>7} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'busy %':>7} {'max in flight':>13}")
groups = collections.defaultdict(list)
for c in calls:
    groups[(c[4], c[3])].append(c)
def overlap(cs):
    events = sorted([(c[0], 1) for c in cs] + [(c[0] + c[1], -1) for c in cs])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak
def q(durs, f):
    return durs[min(len(durs) - 1, int(f * len(durs)))]
for (k, call), cs in sorted(groups.items(), key=lambda kv: (kv[0][1] == "pwrite64", -len(kv[1]))):
    durs = sorted(c[1] for c in cs)
    busy = 100 * sum(durs) / span if span else 0
    print(f"{k:<16} {call:<10} {len(cs):>6} {len(cs) / (span / 1000):>7.1f} {sum(durs) / len(durs):>8.3f} "
          f"{q(durs, .5):>7.3f} {q(durs, .99):>7.3f} {durs[-1]:>7.2f} {busy:>7.1f} {overlap(cs):>13}")
print()
print("busy % = summed call time / traced time (above 100 means calls overlap)")

# A metadata commit as the disk sees it: one thread's run of writes to the
# redb file ending in its fdatasync (redb writes the pages, then syncs once).
commits = []
open_runs = {}
for start, dur, thread, call, k in sorted(calls):
    if k != "redb metadata":
        continue
    first = open_runs.setdefault(thread, start)
    if call in ("fdatasync", "fsync"):
        commits.append((first, start + dur))
        del open_runs[thread]
if commits:
    spans = sorted(e - s for s, e in commits)
    print()
    print(f"redb commits (writes + fdatasync of one thread): {len(commits)}, "
          f"{len(commits) / (span / 1000):.1f}/s; span mean {sum(spans) / len(spans):.2f} ms, "
          f"p50 {q(spans, .5):.2f}, p99 {q(spans, .99):.2f}, max {spans[-1]:.2f}; "
          f"in flight at once at most {overlap([(s, e - s) for s, e in commits])}; "
          f"summed {100 * sum(spans) / span:.0f} % of the traced time")
    # Between one commit's fdatasync and the next commit's first write the
    # commit lock is handed over and redb updates its tree in memory; while
    # flushes queue for the lock, these gaps are lock time too.
    ordered = sorted(commits)
    gaps = sorted(b[0] - a[1] for a, b in zip(ordered, ordered[1:]))
    if gaps:
        print(f"gap from one commit's fdatasync to the next commit's first write: "
              f"p50 {q(gaps, .5):.2f} ms, p90 {q(gaps, .9):.2f} ms "
              f"(lock hand-over and in-memory tree work when commits queue; idle time otherwise)")

# One volume flush as one thread performs it: the segment fdatasync(s), then
# (after waiting for the store's commit lock) the redb commit's writes and
# fdatasync, then the COMMITS marker's fdatasync (skipped when a later commit
# already advanced the marker). The request's wait for a thread is not seen.
flushes = []
by_thread = collections.defaultdict(list)
for c in sorted(calls):
    by_thread[c[2]].append(c)
for thread, cs in by_thread.items():
    rec = None
    def done():
        if rec and rec.get("redb_end") is not None:
            flushes.append(rec)
    for start, dur, _, call, k in cs:
        sync = call in ("fdatasync", "fsync")
        if k == "segment file" and sync:
            if rec is None or rec.get("redb_first") is not None:
                done()
                rec = {"seg_start": start, "seg_end": start + dur}
            else:
                rec["seg_end"] = start + dur
        elif rec is None:
            continue
        elif k in ("redb metadata", "sled metadata"):
            if rec.get("redb_first") is None:
                rec["redb_first"] = start
            if sync:
                rec["redb_end"] = start + dur
        elif k == "COMMITS marker" and sync and rec.get("redb_end") is not None:
            rec["marker_end"] = start + dur
            done()
            rec = None
    done()
if flushes:
    def row(name, values):
        v = sorted(values)
        print(f"{name:<44} {sum(v) / len(v):>8.2f} {q(v, .5):>7.2f} {q(v, .9):>7.2f} {q(v, .99):>7.2f} {v[-1]:>8.2f}")
    print()
    print(f"{len(flushes)} volume flushes seen whole (segment sync -> metadata commit -> marker):")
    print(f"{'phase':<44} {'mean ms':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}")
    row("segment fdatasync(s)", [f["seg_end"] - f["seg_start"] for f in flushes])
    writes = any(c[3] == "pwrite64" for c in calls)
    row("wait for the commit lock (+ building it)" if writes else "wait for the lock + commit's writes (untraced)",
        [f["redb_first"] - f["seg_end"] for f in flushes])
    row("metadata commit (writes + fdatasync)" if writes else "metadata commit's fdatasync",
        [f["redb_end"] - f["redb_first"] for f in flushes])
    with_marker = [f for f in flushes if "marker_end" in f]
    if with_marker:
        row(f"COMMITS marker fdatasync ({len(with_marker)} of them)", [f["marker_end"] - f["redb_end"] for f in with_marker])
    row("whole flush from its segment sync", [f.get("marker_end", f["redb_end"]) - f["seg_start"] for f in flushes])
segment_syncs = len(groups.get(("segment file", "fdatasync"), []))
marker_syncs = len(groups.get(("COMMITS marker", "fdatasync"), []))
if commits and segment_syncs:
    print(f"per redb commit: {segment_syncs / len(commits):.2f} segment fdatasyncs, "
          f"{marker_syncs / len(commits):.2f} COMMITS fdatasyncs, "
          f"{len(groups.get(('redb metadata', 'pwrite64'), [])) / len(commits):.1f} redb pwrites")
PY
fi
if want syscalls && command -v perf >/dev/null 2>&1; then
	timeout -s INT 5 perf trace -s -p "$pid" -o "$out/perf-trace-summary.txt" >/dev/null 2>&1 || true
	$PY - "$out/perf-trace-summary.txt" >"$out/syscalls.txt" <<'PY'
import collections, re, sys
# perf trace -s prints a table per thread; add them up per system call.
total = collections.defaultdict(lambda: [0, 0.0])
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^\s+(\w+)\s+(\d+)\s+\d+\s+([\d.]+)\s", line)
    if m:
        t = total[m.group(1)]
        t[0] += int(m.group(2))
        t[1] += float(m.group(3))
print("all server threads, 5 s of perf trace -s")
print(f"{'syscall':<18} {'calls':>8} {'per s':>8} {'total ms':>11}")
for name, (n, ms) in sorted(total.items(), key=lambda kv: -kv[1][0]):
    print(f"{name:<18} {n:>8} {n / 5:>8.0f} {ms:>11.1f}")
PY
fi

# ---------------------------------------------------------- CPU profile --
if want perf && command -v perf >/dev/null 2>&1; then
	if timeout -s INT 8 perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$pid" \
		-o "$out/perf.data" -- sleep 5 >"$out/perf-record.log" 2>&1; then
		perf report -i "$out/perf.data" --no-children --stdio --percent-limit 0.7 \
			--sort comm,dso,symbol -g none >"$out/perf.txt" 2>/dev/null || true
		perf script -i "$out/perf.data" -F comm,tid,ip,sym 2>/dev/null | $PY -c '
import collections, sys
# Each sample is a stack, innermost frame first; it goes to the first
# category (in this order) that one of its frames names.
categories = [
    ("flush: metadata commit (redb/sled, marker)", ("Sequenced", "RedbStore", "SledStore", "redb::", "sled::")),
    ("flush: segment sync", ("segment::FileSegments", "fdatasync")),
    ("flush: other", ("VolumeInner::flush",)),
    ("write: seal (AES-GCM)", ("aes_gcm", "ring::aead", "blockseal_volume::seal::")),
    ("write: segment pwrite", ("__x64_sys_pwrite64", "__libc_pwrite")),
    ("write: other volume work", ("VolumeInner::write_range", "VolumeInner::seal_and_install")),
    ("compaction", ("compactor::", "volume::compact")),
    ("socket receive", ("__x64_sys_recvfrom", "unix_stream_recvmsg", "recvfrom")),
    ("socket send", ("__x64_sys_sendto", "unix_stream_sendmsg", "__libc_send")),
    ("futex wake/wait", ("__x64_sys_futex",)),
    ("scheduler, context switch", ("schedule", "finish_task_switch")),
    ("epoll", ("epoll",)),
]
counts = collections.Counter()
total = 0
stack = []
def done():
    global total
    if not stack:
        return
    total += 1
    for name, needles in categories:
        if any(n in f for f in stack for n in needles):
            counts[name] += 1
            return
    counts["other: " + stack[0][:60]] += 1
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        done(); stack = []
    elif line.startswith((" ", "\t")):
        parts = line.split(None, 1)
        if len(parts) == 2:
            stack.append(parts[1])
    else:
        done(); stack = []
done()
print(f"{total} CPU samples of the server, by what the stack is doing")
other = sum(n for k, n in counts.items() if k.startswith("other: "))
for name, n in counts.most_common():
    if not name.startswith("other: "):
        print(f"{100 * n / max(total, 1):6.1f} %  {name}")
print(f"{100 * other / max(total, 1):6.1f} %  other (top frames below)")
for name, n in counts.most_common(12):
    if name.startswith("other: "):
        print(f"         {100 * n / max(total, 1):5.1f} %  {name[7:]}")
' >"$out/perf-categories.txt" || true
		rm -f "$out/perf.data"
	else
		echo "perf record failed: $(tail -3 "$out/perf-record.log")" >"$out/perf.txt"
	fi
fi

# ------------------------------------------------------ CPU contention --
# Who had the two cores, and how long runnable server threads waited for one
# (scheduling delay), system-wide for 3 s.
if want sched && command -v perf >/dev/null 2>&1; then
	if timeout -s INT 10 perf sched record -o "$out/sched.data" -- sleep 3 >"$out/sched-record.log" 2>&1; then
		perf sched timehist -i "$out/sched.data" 2>/dev/null >"$out/sched-timehist.txt" || true
		$PY - "$pid" "$out/sched-timehist.txt" >"$out/sched.txt" <<'PY'
import collections, re, sys
pid, path = sys.argv[1], sys.argv[2]
# time cpu task[tid/pid] wait sch_delay run
line_re = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
run = collections.Counter()
delays = collections.defaultdict(list)
t_first = t_last = None
for line in open(path, errors="replace"):
    m = line_re.match(line)
    if not m:
        continue
    t, cpu, comm, tid, tgid, wait, delay, ran = m.groups()
    t = float(t)
    t_first = t if t_first is None else t_first
    t_last = t
    if comm.strip() == "<idle>":
        who = "idle"
    elif (tgid or tid) == pid:
        who = "blockseal server"
    elif comm.startswith("fio"):
        who = "fio"
    else:
        who = "other processes"
    run[who] += float(ran)
    delays[who].append(float(delay))
span = (t_last - t_first) * 1000 if t_first is not None else 0
print(f"perf sched timehist, {span / 1000:.1f} s, 2 CPUs = {2 * span:.0f} ms of CPU")
print(f"{'who':<18} {'CPU ms':>8} {'% of 2 CPUs':>11} {'switch-ins':>10} {'sch delay mean ms':>18} {'p99 ms':>7} {'max ms':>7}")
for who in ("blockseal server", "fio", "other processes", "idle"):
    d = sorted(delays.get(who, []))
    if not d:
        continue
    print(f"{who:<18} {run[who]:>8.0f} {100 * run[who] / (2 * span) if span else 0:>11.0f} {len(d):>10} "
          f"{sum(d) / len(d):>18.3f} {d[min(len(d) - 1, int(.99 * len(d)))]:>7.2f} {d[-1]:>7.2f}")
PY
		rm -f "$out/sched.data" "$out/sched-timehist.txt"
	else
		echo "perf sched record failed: $(tail -3 "$out/sched-record.log")" >"$out/sched.txt"
	fi
fi

# ------------------------------------------------------------ gdb stacks --
if want stacks && command -v gdb >/dev/null 2>&1; then
	: >"$out/stacks.raw"
	for _ in 1 2 3; do
		echo "=== snapshot $(date +%s.%N)" >>"$out/stacks.raw"
		timeout 60 gdb -p "$pid" -batch -nx -ex 'set pagination off' \
			-ex 'thread apply all bt 40' >>"$out/stacks.raw" 2>/dev/null || true
		echo "=== end $(date +%s.%N)" >>"$out/stacks.raw"
		sleep 2
	done
	$PY - "$out/stacks.raw" >"$out/stacks.txt" <<'PY'
import collections, re, sys
# A frame is "function () at file:line"; inlined frames have no address. The
# project's own frames (crates/...) and redb's and sled's say what a thread
# is doing; the top frame says whether it waits (futex `syscall`, fdatasync).
snapshots = []  # (seconds gdb held the server, Counter)
groups = None
thread = None
frames = []
started = None
def own(frame):
    fn, where = frame
    return where.startswith("crates/") or "/redb-" in where or "/sled-" in where
def short(frame):
    fn, where = frame
    fn = re.sub(r"<.*", "", fn)
    where = re.sub(r".*/(redb|sled)-[^/]*/src/", r"\1/", where)
    where = re.sub(r"^crates/blockseal-?", "", where).replace("/src/", ":")
    return f"{fn}@{where}"
def flush():
    if thread is None or groups is None:
        return
    top = frames[0][0] if frames else "?"
    mine = [short(f) for f in frames if own(f)][:4]
    groups[(thread, top, " <- ".join(mine) or "-")] += 1
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("=== snapshot"):
        groups = collections.Counter()
        started = float(line.split()[2])
        thread, frames = None, []
        continue
    if line.startswith("=== end"):
        flush()
        snapshots.append((float(line.split()[2]) - started, groups))
        thread, frames, groups = None, [], None
        continue
    m = re.match(r'^Thread \d+ \(Thread 0x[0-9a-f]+ \(LWP \d+\) "([^"]*)"\)', line)
    if m:
        flush()
        thread, frames = m.group(1), []
        continue
    m = re.match(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(.*?\)(?: at (\S+))?", line)
    if m and thread is not None:
        frames.append((m.group(1), m.group(2) or ""))
print("threads grouped by name, top frame and innermost project/redb/sled frames "
      "(innermost first); only the first snapshot shows the server undisturbed: "
      "each one stops it for as long as gdb reads")
for i, (held, groups) in enumerate(snapshots, 1):
    print()
    print(f"snapshot {i}: {sum(groups.values())} threads, server stopped {held:.1f} s")
    for (name, top, mine), n in groups.most_common():
        print(f"{n:5d}  {name:<16} top: {top}")
        print(f"       {mine}")
PY
	gzip -f "$out/stacks.raw"
fi
# ----------------------------------------------------------- strace -c --
if want strace && command -v strace >/dev/null 2>&1; then
	timeout -s INT 5 strace -c -f -p "$pid" -o "$out/strace-c.txt" >/dev/null 2>&1 || true
fi

echo "flush-load-profile: done ($out)"
