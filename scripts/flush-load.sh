#!/usr/bin/env bash
# Many volumes flushing at once: N volumes on one blockseal server, each
# written at R bytes/s in 4 KiB random writes with an NBD FLUSH every W
# writes, for D seconds (the default models a PBX storage host: 600 volumes
# at 80 KiB/s, a flush every 100 writes, 30 s).
#
# Builds the release binary (--locked, honours CARGO_TARGET_DIR), creates a
# fresh store with the CLI (one tenant `pbx`, volumes pbx/v0000 ...), serves
# it on a Unix socket from a configuration file whose connection caps admit
# N clients, and drives it with fio's nbd engine, one job per volume (one
# libnbd connection each, QD1, all jobs as threads of one fio process). fio
# issues its `fsync=W` as NBD_CMD_FLUSH on the nbd engine and reports those
# as "sync" latencies; `--smoke` checks that by counting the server's
# per-request debug lines. Job starts are spread at random over one flush
# interval (W writes at the job's rate), so flushes arrive at the steady rate
# N * IOPS / W instead of in one burst every interval; `--stagger 0` gives
# the burst.
#
#   scripts/flush-load.sh                      # 600 x 80 KiB/s, 30 s, redb
#   scripts/flush-load.sh --rate 8k --duration 120
#   scripts/flush-load.sh --backend sled --volumes 300
#   scripts/flush-load.sh --profile --duration 90   # plus syscall/thread/CPU evidence
#   scripts/flush-load.sh --smoke              # 20 volumes, 5 s: no I/O errors
#
# Options (environment variable in brackets, default after it):
#   --volumes N       [VOLUMES 600]       volumes, one fio job and connection each
#   --rate R          [RATE 80k]          per-volume write rate, fio syntax (80k = 80 KiB/s)
#   --duration D      [DURATION 30]       seconds each job runs after its start delay
#   --flush-every W   [FLUSH_EVERY 100]   writes between flushes (fio fsync=W)
#   --backend B       [BACKEND redb]      metadata backend of the new store: redb|sled
#   --size S          [VOLUME_SIZE 1G]    size of each volume (sparse; writes are random over it)
#   --stagger S       [STAGGER]           spread job starts over 0..S seconds
#                                         (default: one flush interval, W / IOPS)
#   --results DIR     [RESULTS_DIR /tmp/blockseal-flush-load/<timestamp>]
#   --profile         [PROFILE 0]         while the jobs run, also record server
#                     thread states, uprobes on the flush path, a per-file
#                     trace of fsync-like calls, system call counts, a perf
#                     CPU profile, CPU contention, gdb stacks and `strace -c`
#                     (these slow the server: the latencies of such a run are
#                     not a measurement; PROFILE_STEPS picks steps, see
#                     scripts/flush-load-profile.sh)
#   --smoke           20 volumes, 5 s, a flush every 10 writes; fails unless
#                     every job ran without an I/O error, every fio fsync reached
#                     the server as an NBD FLUSH and the server stopped cleanly
#   --no-build        [NO_BUILD 0]        use the binary already built
#                     [BLOCKSEAL_BIN]     use this binary instead of building one
#   --keep            [KEEP_WORKDIR 0]    keep the store and socket directory
#
# Results: RESULTS_DIR/summary.md (the table also printed at the end),
# summary.json, fio.json, job.fio, samples.csv (server RSS, threads, CPU,
# load every second), server.log, and with --profile profile/*.
#
# The machine's other load matters: the summary records the load average at
# start and end; compare runs by ratios within one run, not across runs.
# Every process the script starts is stopped by its pid; fio runs under
# `timeout`; every wait has a deadline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY=/usr/bin/python3

VOLUMES=${VOLUMES:-600}
RATE=${RATE:-80k}
DURATION=${DURATION:-30}
FLUSH_EVERY=${FLUSH_EVERY:-100}
BACKEND=${BACKEND:-redb}
VOLUME_SIZE=${VOLUME_SIZE:-1G}
STAGGER=${STAGGER:-}
RESULTS_DIR=${RESULTS_DIR:-}
PROFILE=${PROFILE:-0}
NO_BUILD=${NO_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
SMOKE=0

die() {
	echo "flush-load: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}

while (($#)); do
	case "$1" in
	--volumes) VOLUMES=$2; shift ;;
	--rate) RATE=$2; shift ;;
	--duration) DURATION=$2; shift ;;
	--flush-every) FLUSH_EVERY=$2; shift ;;
	--backend) BACKEND=$2; shift ;;
	--size) VOLUME_SIZE=$2; shift ;;
	--stagger) STAGGER=$2; shift ;;
	--results) RESULTS_DIR=$2; shift ;;
	--profile) PROFILE=1 ;;
	--smoke) SMOKE=1 ;;
	--no-build) NO_BUILD=1 ;;
	--keep) KEEP_WORKDIR=1 ;;
	-h | --help) usage 0 ;;
	*) echo "flush-load: unknown option $1" >&2; usage 2 >&2 ;;
	esac
	shift
done
if ((SMOKE)); then
	# Small enough for a test suite; flushes often enough that every job
	# issues several.
	VOLUMES=20 DURATION=5 FLUSH_EVERY=10 STAGGER=${STAGGER:-0.5} PROFILE=0
fi

[[ $VOLUMES =~ ^[0-9]+$ ]] && ((VOLUMES >= 1 && VOLUMES <= 9999)) || die "--volumes must be 1..9999"
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 1)) || die "--duration must be a whole number of seconds"
[[ $FLUSH_EVERY =~ ^[0-9]+$ ]] && ((FLUSH_EVERY >= 1)) || die "--flush-every must be at least 1"
[[ $BACKEND == redb || $BACKEND == sled ]] || die "--backend is redb or sled"
# Bytes per second from fio's syntax (k, m, g are powers of 1024 in fio).
rate_bytes=$($PY - "$RATE" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)(?:i?[bB])?", sys.argv[1])
if not m:
    sys.exit(1)
scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
print(int(float(m.group(1)) * scale))
PY
) || die "--rate $RATE is not a rate such as 80k"
((rate_bytes >= 4096)) || die "--rate must be at least 4k (one 4 KiB write per second)"
iops=$($PY -c "print($rate_bytes / 4096)")
if [[ -z $STAGGER ]]; then
	STAGGER=$($PY -c "print(round($FLUSH_EVERY / $iops, 3))")
fi
stagger_ms=$($PY -c "print(int(float('$STAGGER') * 1000))") || die "--stagger $STAGGER is not a number of seconds"

need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing (scripts/install-deps.sh installs the test peers)"; }
need fio
need timeout
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"
if ((PROFILE)); then
	need strace
	need gdb
fi

target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
if [[ -n ${BLOCKSEAL_BIN:-} ]]; then
	# A binary built elsewhere (the test suite passes its own debug build).
	bin="$BLOCKSEAL_BIN"
else
	if [[ $NO_BUILD != 1 ]]; then
		(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p blockseal)
	fi
	bin="$target/release/blockseal"
fi
[[ -x $bin ]] || die "$bin is missing (build it or drop --no-build)"

RESULTS_DIR=${RESULTS_DIR:-/tmp/blockseal-flush-load/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
work="$(mktemp -d /tmp/blockseal-flush-load.XXXXXX)"
server_pid=
sampler_pid=
profile_pid=
cleanup() {
	local rc=$?
	for pid in $profile_pid $sampler_pid $server_pid; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in $profile_pid $sampler_pid $server_pid; do
		wait "$pid" 2>/dev/null || true
	done
	if [[ $KEEP_WORKDIR == 1 ]]; then
		echo "flush-load: kept $work" >&2
	else
		rm -rf "$work"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ the store --
cfg="$work/blockseal.toml"
sock="$work/nbd.sock"
# shellcheck source=scripts/lib/pbx-store.sh
. "$root/scripts/lib/pbx-store.sh"
create_secs=$(make_pbx_store "$bin" "$work" "$BACKEND" "$VOLUMES" "$VOLUME_SIZE" $((VOLUMES + 16)))
echo "flush-load: created $VOLUMES volumes of $VOLUME_SIZE ($BACKEND) in ${create_secs}s"

# ------------------------------------------------------------ the server --
# Per-request debug lines of the transmission module let the smoke run count
# the FLUSH requests the server received; the measured runs log at info
# (nothing per request).
log_filter=${BLOCKSEAL_LOG:-info}
((SMOKE)) && log_filter="info,blockseal_nbd::transmission=debug"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BLOCKSEAL_LOG=$log_filter "$bin" serve --config "$cfg" >"$work/serve.out" 2>"$RESULTS_DIR/server.log" &
server_pid=$!
for ((i = 0; i < 300; i++)); do
	grep -q '^ready ' "$work/serve.out" 2>/dev/null && break
	kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(tail -5 "$RESULTS_DIR/server.log")"
	sleep 0.1
done
grep -q '^ready ' "$work/serve.out" || die "the server did not get ready within 30 s"

clk_tck=$(getconf CLK_TCK)
# One line a second: time, RSS KiB, threads, utime+stime ticks, load1..15.
$PY - "$server_pid" "$RESULTS_DIR/samples.csv" <<'PY' &
import sys, time
pid, out = sys.argv[1], sys.argv[2]
with open(out, "w") as f:
    f.write("t,rss_kib,threads,cpu_ticks,load1,load5,load15\n")
    start = time.time()
    while True:
        try:
            status = open(f"/proc/{pid}/status").read()
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            break
        fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        rss = fields["VmRSS"].split()[0]
        threads = fields["Threads"].strip()
        rest = stat.rsplit(")", 1)[1].split()
        ticks = int(rest[11]) + int(rest[12])
        load = open("/proc/loadavg").read().split()[:3]
        f.write(f"{time.time() - start:.1f},{rss},{threads},{ticks},{','.join(load)}\n")
        f.flush()
        time.sleep(1)
PY
sampler_pid=$!

# ------------------------------------------------------------ the load --
{
	cat <<EOF
[global]
ioengine=nbd
thread
rw=randwrite
bs=4k
iodepth=1
rate=$rate_bytes
fsync=$FLUSH_EVERY
time_based
runtime=$DURATION
startdelay=0-${stagger_ms}ms
randrepeat=0
norandommap
group_reporting
lat_percentiles=1
percentile_list=50:90:99:99.9
EOF
	for ((i = 0; i < VOLUMES; i++)); do
		printf -v name 'v%04d' "$i"
		printf '\n[%s]\nuri=nbd+unix:///pbx/%s?socket=%s\n' "$name" "$name" "$sock"
	done
} >"$RESULTS_DIR/job.fio"

read -r load_start _ </proc/loadavg
uname_line="$(uname -srm), $(nproc) cpus"
fio_version=$(fio --version)
read -r -a s0 < <(sed 's/.*) //' "/proc/$server_pid/stat")
cpu0=$((s0[11] + s0[12]))
rss_ready=$(awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status")
fio_t0=$(date +%s.%N)

if ((PROFILE)); then
	# Starts once every job is running and the flush rate is steady.
	PROFILE_DELAY=$($PY -c "print(int(float('$STAGGER')) + 5)")
	"$here/flush-load-profile.sh" "$server_pid" "$RESULTS_DIR/profile" "$PROFILE_DELAY" &
	profile_pid=$!
fi

fio_limit=$($PY -c "print(int(float('$STAGGER') + $DURATION + 120))")
set +e
timeout -s INT -k 30 "$fio_limit" fio "$RESULTS_DIR/job.fio" --output-format=json \
	--output="$RESULTS_DIR/fio.out" >"$RESULTS_DIR/fio.stderr" 2>&1
fio_rc=$?
set -e
fio_t1=$(date +%s.%N)
kill -0 "$server_pid" 2>/dev/null ||
	die "the server died during the run: $(tail -5 "$RESULTS_DIR/server.log")"
read -r -a s1 < <(sed 's/.*) //' "/proc/$server_pid/stat")
cpu1=$((s1[11] + s1[12]))
rss_end=$(awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status")
rss_peak=$(awk '/^VmHWM/ {print $2}' "/proc/$server_pid/status")
threads_end=$(awk '/^Threads/ {print $2}' "/proc/$server_pid/status")
read -r load_end _ </proc/loadavg
if ((PROFILE)); then
	wait "$profile_pid" || echo "flush-load: the profile step failed" >&2
	profile_pid=
fi
# The server's own view of the run: its metrics after the load (the
# metadata group commits' count and time among them).
metrics_addr=$(sed -n 's/^ready .*metrics=\([^ ]*\).*/\1/p' "$work/serve.out")
if [[ -n $metrics_addr ]]; then
	$PY - "$metrics_addr" "$RESULTS_DIR/metrics.txt" <<'PY' || echo "flush-load: could not read the server's metrics" >&2
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10) as r:
    open(sys.argv[2], "wb").write(r.read())
PY
fi
# fio writes a line per connection before the JSON document.
sed -n '/^{/,$p' "$RESULTS_DIR/fio.out" >"$RESULTS_DIR/fio.json"

# Stop the server as an operator would; it must flush every volume and exit 0.
kill -TERM "$server_pid"
server_rc=
for ((i = 0; i < 600; i++)); do
	if ! kill -0 "$server_pid" 2>/dev/null; then
		set +e
		wait "$server_pid"
		server_rc=$?
		set -e
		break
	fi
	sleep 0.1
done
if [[ -z $server_rc ]]; then
	kill -KILL "$server_pid" 2>/dev/null || true
	server_rc=killed
fi
server_pid=
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=

flush_requests=-1
write_requests=-1
if ((SMOKE)); then
	flush_requests=$(grep -c 'command="flush"' "$RESULTS_DIR/server.log" || true)
	write_requests=$(grep -c 'command="write"' "$RESULTS_DIR/server.log" || true)
fi
server_errors=$(grep -c ' ERROR ' "$RESULTS_DIR/server.log" || true)

# ------------------------------------------------------------ the report --
$PY - "$RESULTS_DIR" <<PY
import json, os, sys
rdir = sys.argv[1]
settings = {
    "volumes": $VOLUMES, "rate_bytes": $rate_bytes, "rate": "$RATE",
    "duration_s": $DURATION, "flush_every": $FLUSH_EVERY, "backend": "$BACKEND",
    "volume_size": "$VOLUME_SIZE", "stagger_s": float("$STAGGER"), "profile": bool($PROFILE),
    "smoke": bool($SMOKE),
}
run = {
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "host": "$uname_line", "fio": "$fio_version",
    "fio_rc": $fio_rc, "server_rc": "$server_rc", "server_error_lines": $server_errors,
    "wall_s": $fio_t1 - $fio_t0, "cpu_ticks": $cpu1 - $cpu0, "clk_tck": $clk_tck,
    "rss_ready_kib": $rss_ready, "rss_end_kib": $rss_end, "rss_peak_kib": $rss_peak,
    "threads_end": $threads_end, "load_start": $load_start, "load_end": $load_end,
    "flush_requests_logged": $flush_requests, "write_requests_logged": $write_requests,
    "volume_create_s": $create_secs,
}
try:
    job = json.load(open(os.path.join(rdir, "fio.json")))["jobs"][0]
except Exception as e:
    job = None
    run["fio_parse_error"] = str(e)
samples = []
with open(os.path.join(rdir, "samples.csv")) as f:
    next(f)
    for line in f:
        samples.append([float(x) for x in line.split(",")])
threads_max = max((int(s[2]) for s in samples), default=0)
rss_max_sampled = max((int(s[1]) for s in samples), default=0)

def ms(ns):
    return ns / 1e6

summary = {"settings": settings, "run": run}
if job:
    w, s = job["write"], job["sync"]
    wl, sl = w["lat_ns"], s["lat_ns"]
    p = lambda d, q: d.get("percentile", {}).get(q, 0)
    runtime_s = job["job_runtime"] / 1000 / settings["volumes"]
    summary["fio"] = {
        "error": job["error"],
        "writes": w["total_ios"], "write_iops": w["iops"],
        "write_lat_ms": {"p50": ms(p(wl, "50.000000")), "p90": ms(p(wl, "90.000000")),
                          "p99": ms(p(wl, "99.000000")), "p999": ms(p(wl, "99.900000")),
                          "max": ms(wl["max"]), "mean": ms(wl["mean"])},
        "flushes": s["total_ios"],
        "flushes_per_s": s["total_ios"] / runtime_s if runtime_s else 0,
        "flush_lat_ms": {"p50": ms(p(sl, "50.000000")), "p90": ms(p(sl, "90.000000")),
                          "p99": ms(p(sl, "99.000000")), "p999": ms(p(sl, "99.900000")),
                          "max": ms(sl["max"]), "mean": ms(sl["mean"])},
        "job_runtime_s": runtime_s,
    }
cpu_pct = 100 * run["cpu_ticks"] / run["clk_tck"] / run["wall_s"]
summary["server"] = {"cpu_pct": cpu_pct, "rss_ready_mib": run["rss_ready_kib"] / 1024,
                     "rss_end_mib": run["rss_end_kib"] / 1024,
                     "rss_peak_mib": max(run["rss_peak_kib"], rss_max_sampled) / 1024,
                     "threads_max": threads_max}
json.dump(summary, open(os.path.join(rdir, "summary.json"), "w"), indent=2)

iops = settings["rate_bytes"] / 4096
lines = [
    f"# flush-load {run['date']}",
    "",
    f"- host: {run['host']}; {run['fio']}; load average {run['load_start']} at start, {run['load_end']} at end",
    f"- {settings['volumes']} volumes x {settings['rate']}/s ({iops:g} x 4 KiB random writes/s each), "
    f"FLUSH every {settings['flush_every']} writes, {settings['duration_s']} s per job, "
    f"starts spread over {settings['stagger_s']:g} s, {settings['backend']}, volumes {settings['volume_size']}"
    + (" -- PROFILED (latencies are not a measurement)" if settings["profile"] else ""),
    f"- offered: {settings['volumes'] * iops:g} writes/s, "
    f"{settings['volumes'] * iops / settings['flush_every']:g} flushes/s",
    "",
]
if job:
    f = summary["fio"]
    wl, sl = f["write_lat_ms"], f["flush_lat_ms"]
    lines += [
        "| | count | per s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| write 4 KiB | {f['writes']} | {f['write_iops']:.0f} | {wl['p50']:.2f} | {wl['p90']:.2f} | {wl['p99']:.2f} | {wl['p999']:.2f} | {wl['max']:.1f} |",
        f"| FLUSH | {f['flushes']} | {f['flushes_per_s']:.1f} | {sl['p50']:.2f} | {sl['p90']:.2f} | {sl['p99']:.2f} | {sl['p999']:.2f} | {sl['max']:.1f} |",
        "",
    ]
sv = summary["server"]
lines += [
    f"- server: CPU {sv['cpu_pct']:.0f} % of one core over the fio run ({run['wall_s']:.1f} s); "
    f"RSS {sv['rss_ready_mib']:.0f} MiB when ready, {sv['rss_peak_mib']:.0f} MiB peak, {sv['rss_end_mib']:.0f} MiB at end; "
    f"up to {sv['threads_max']} threads",
    f"- fio exit {run['fio_rc']}, job error {job['error'] if job else 'n/a'}; server exit {run['server_rc']} after SIGTERM, "
    f"{run['server_error_lines']} ERROR log lines",
]
if settings["smoke"]:
    lines.append(f"- server saw {run['flush_requests_logged']} FLUSH and {run['write_requests_logged']} WRITE requests")
open(os.path.join(rdir, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY

echo "flush-load: results in $RESULTS_DIR"

# ------------------------------------------------------------ assertions --
failed=0
check() {
	if ! eval "$1"; then
		echo "flush-load: FAILED: $2" >&2
		failed=1
	fi
}
check '[[ $fio_rc == 0 ]]' "fio exited $fio_rc (see $RESULTS_DIR/fio.stderr)"
check '[[ $server_rc == 0 ]]' "the server exited $server_rc after SIGTERM"
check '[[ $server_errors == 0 ]]' "the server logged $server_errors ERROR lines"
check '$PY -c "import json,sys; j=json.load(open(sys.argv[1]))[\"fio\"]; sys.exit(j[\"error\"] != 0 or j[\"writes\"] == 0)" "$RESULTS_DIR/summary.json"' \
	"fio reported an I/O error or no writes"
if ((SMOKE)); then
	check '$PY -c "import json,sys; s=json.load(open(sys.argv[1])); f=s[\"fio\"]; r=s[\"run\"]; sys.exit(not (f[\"flushes\"] > 0 and f[\"flushes\"] == r[\"flush_requests_logged\"] and f[\"writes\"] == r[\"write_requests_logged\"]))" "$RESULTS_DIR/summary.json"' \
		"fio's fsyncs and writes do not match the server's FLUSH and WRITE requests"
	if ((failed == 0)); then
		echo "flush-load: smoke ok"
	fi
fi
exit "$failed"
