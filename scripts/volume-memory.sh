#!/usr/bin/env bash
# Server memory per open volume: M volumes on one blockseal server, some of
# them partly written, then all opened; reports the server's resident size
# after each phase and per volume.
#
# Builds the release binary (--locked, honours CARGO_TARGET_DIR), creates a
# fresh store with the CLI (tenant `pbx`, volumes pbx/v0000 ...), serves it on
# a Unix socket and drives it with a python3-libnbd client (Debian
# python3-libnbd; scripts/install-deps.sh installs it):
#
#   ready     the server has started; no volume is open
#   fill      K volumes get F % of their blocks written (random distinct
#             4 KiB blocks, QD 16, a FLUSH at the end), one connection at a
#             time; the server keeps every opened volume open until it stops
#   restart   the server is stopped (SIGTERM) and started again: no volume open
#             (if that start had to repair the metadata store because the
#             stop left it open, once more: "restart again")
#   open      every volume is opened by one connection at a time (connect,
#             read one block, disconnect): the filled ones first, then the rest
#   connected all M volumes connected at once (one client connection each)
#   released  those connections closed again
#
# RSS is VmRSS of /proc/PID/status (RssAnon beside it), a second after the
# phase ends; "per volume" divides the growth over a phase by the volumes it
# opened (or connections it made). Memory the allocator keeps after a phase
# still counts, as it does for an operator.
#
#   scripts/volume-memory.sh                              # 500 volumes, 1 % of 50 written
#   scripts/volume-memory.sh --volumes 5000 --fill-volumes 500 --fill-percent 1
#   scripts/volume-memory.sh --volumes 500 --fill-volumes 50 --fill-percent 10
#
# Options (environment variable in brackets, default after it):
#   --volumes M        [VOLUMES 500]       volumes in the store
#   --size S           [VOLUME_SIZE 1G]    size of each (sparse)
#   --fill-volumes K   [FILL_VOLUMES 50]   how many of them get written (0: none)
#   --fill-percent F   [FILL_PERCENT 1]    percent of each filled volume's blocks
#   --backend B        [BACKEND redb]      metadata backend: redb|sled
#   --no-connected     [NO_CONNECTED 0]    skip the all-connected phase
#   --results DIR      [RESULTS_DIR /tmp/blockseal-volume-memory/<timestamp>]
#   --no-build         [NO_BUILD 0]        use the binary already built
#   --keep             [KEEP_WORKDIR 0]    keep the store
#
# Results: RESULTS_DIR/summary.md (also printed), phases.csv, client.log,
# server.log. Every process started here is stopped by its pid; every wait
# has a deadline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY=/usr/bin/python3

VOLUMES=${VOLUMES:-500}
VOLUME_SIZE=${VOLUME_SIZE:-1G}
FILL_VOLUMES=${FILL_VOLUMES:-50}
FILL_PERCENT=${FILL_PERCENT:-1}
BACKEND=${BACKEND:-redb}
NO_CONNECTED=${NO_CONNECTED:-0}
RESULTS_DIR=${RESULTS_DIR:-}
NO_BUILD=${NO_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

die() {
	echo "volume-memory: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}
while (($#)); do
	case "$1" in
	--volumes) VOLUMES=$2; shift ;;
	--size) VOLUME_SIZE=$2; shift ;;
	--fill-volumes) FILL_VOLUMES=$2; shift ;;
	--fill-percent) FILL_PERCENT=$2; shift ;;
	--backend) BACKEND=$2; shift ;;
	--no-connected) NO_CONNECTED=1 ;;
	--results) RESULTS_DIR=$2; shift ;;
	--no-build) NO_BUILD=1 ;;
	--keep) KEEP_WORKDIR=1 ;;
	-h | --help) usage 0 ;;
	*) echo "volume-memory: unknown option $1" >&2; usage 2 >&2 ;;
	esac
	shift
done
[[ $VOLUMES =~ ^[0-9]+$ ]] && ((VOLUMES >= 1 && VOLUMES <= 99999)) || die "--volumes must be 1..99999"
[[ $FILL_VOLUMES =~ ^[0-9]+$ ]] && ((FILL_VOLUMES <= VOLUMES)) || die "--fill-volumes must be 0..--volumes"
[[ $BACKEND == redb || $BACKEND == sled ]] || die "--backend is redb or sled"
$PY -c "import sys; f = float('$FILL_PERCENT'); sys.exit(not 0 <= f <= 100)" 2>/dev/null ||
	die "--fill-percent must be a number from 0 to 100"
$PY -c 'import nbd' 2>/dev/null || die "python3-libnbd is missing (scripts/install-deps.sh installs it)"

target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
if [[ $NO_BUILD != 1 ]]; then
	(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p blockseal)
fi
bin="$target/release/blockseal"
[[ -x $bin ]] || die "$bin is missing (build it or drop --no-build)"

RESULTS_DIR=${RESULTS_DIR:-/tmp/blockseal-volume-memory/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
work="$(mktemp -d /tmp/blockseal-volume-memory.XXXXXX)"
server_pid=
cleanup() {
	local rc=$?
	if [[ -n $server_pid ]]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	if [[ $KEEP_WORKDIR == 1 ]]; then
		echo "volume-memory: kept $work" >&2
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
create_secs=$(make_pbx_store "$bin" "$work" "$BACKEND" "$VOLUMES" "$VOLUME_SIZE" 64)
echo "volume-memory: created $VOLUMES volumes of $VOLUME_SIZE ($BACKEND) in ${create_secs} s"

# ------------------------------------------------------------ the server --
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
((VOLUMES + 1024 <= $(ulimit -n))) || die "the open file limit $(ulimit -n) is too low for $VOLUMES connections"
start_server() {
	: >"$work/serve.out"
	BLOCKSEAL_LOG=${BLOCKSEAL_LOG:-info} "$bin" serve --config "$cfg" >"$work/serve.out" 2>>"$RESULTS_DIR/server.log" &
	server_pid=$!
	for ((i = 0; i < 600; i++)); do
		grep -q '^ready ' "$work/serve.out" 2>/dev/null && return 0
		kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(tail -5 "$RESULTS_DIR/server.log")"
		sleep 0.1
	done
	die "the server did not get ready within 60 s"
}
stop_server() {
	kill -TERM "$server_pid"
	for ((i = 0; i < 1200; i++)); do
		if ! kill -0 "$server_pid" 2>/dev/null; then
			local rc=0
			wait "$server_pid" || rc=$?
			server_pid=
			((rc == 0)) || die "the server exited $rc after SIGTERM"
			return 0
		fi
		sleep 0.1
	done
	die "the server did not stop within 120 s of SIGTERM"
}
echo "phase,seconds,volumes,connections,rss_kib,rss_anon_kib,threads,fds,metadata_kib" >"$RESULTS_DIR/phases.csv"
# record PHASE SECONDS VOLUMES_OPENED CONNECTIONS: one line of phases.csv, a
# second after the phase, so the server has settled.
record() {
	sleep 1
	local rss anon threads fds meta
	rss=$(awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status")
	anon=$(awk '/^RssAnon/ {print $2}' "/proc/$server_pid/status")
	threads=$(awk '/^Threads/ {print $2}' "/proc/$server_pid/status")
	fds=$(find "/proc/$server_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
	meta=$(du -sk "$work/store/meta" | cut -f1)
	echo "$1,$2,$3,$4,$rss,$anon,$threads,$fds,$meta" >>"$RESULTS_DIR/phases.csv"
	echo "volume-memory: $1: RSS $((rss / 1024)) MiB after $2 s"
}

# The client: one of `fill FIRST COUNT PERCENT`, `open FIRST COUNT`,
# `connect COUNT` (holds every connection until stdin closes). Prints the
# seconds it took; `connect` prints "connected" once all are up.
cat >"$work/client.py" <<'PY'
import os, random, sys, time
import nbd

sock = os.environ["SOCK"]
def uri(i):
    return f"nbd+unix:///pbx/v{i:04d}?socket={sock}"
def connect(i):
    h = nbd.NBD()
    h.connect_uri(uri(i))
    return h

mode = sys.argv[1]
start = time.time()
if mode == "fill":
    first, count, percent = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    payload = os.urandom(4096)
    rng = random.Random(1)
    for i in range(first, first + count):
        h = connect(i)
        blocks = h.get_size() // 4096
        todo = rng.sample(range(blocks), int(blocks * percent / 100))
        in_flight = 0
        for lba in todo:
            while in_flight >= 16:
                h.poll(-1)
                in_flight = h.aio_in_flight()
            h.aio_pwrite(payload, lba * 4096)
            in_flight += 1
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        h.shutdown()
        del h
        if (i - first + 1) % 50 == 0:
            print(f"filled {i - first + 1}/{count}", file=sys.stderr, flush=True)
    print(f"{time.time() - start:.1f}")
elif mode == "open":
    first, count = int(sys.argv[2]), int(sys.argv[3])
    for i in range(first, first + count):
        h = connect(i)
        h.pread(4096, 0)
        h.shutdown()
        del h
    print(f"{time.time() - start:.1f}")
elif mode == "connect":
    count = int(sys.argv[2])
    handles = [connect(i) for i in range(count)]
    for h in handles:
        h.pread(4096, 0)
    print(f"{time.time() - start:.1f}", flush=True)
    print("connected", flush=True)
    sys.stdin.read()
    for h in handles:
        h.shutdown()
        del h
PY
client() {
	SOCK="$sock" $PY "$work/client.py" "$@" 2>>"$RESULTS_DIR/client.log" ||
		die "the client failed in $1 (see $RESULTS_DIR/client.log)"
}

read -r load_start _ </proc/loadavg
start_server
record ready 0 0 0
if ((FILL_VOLUMES > 0)); then
	secs=$(client fill 0 "$FILL_VOLUMES" "$FILL_PERCENT")
	record fill "$secs" "$FILL_VOLUMES" 0
fi
stop_server
log_lines=$(wc -l <"$RESULTS_DIR/server.log")
start_server
record restart 0 0 0
# A store the last server did not close cleanly is repaired at open (redb
# reads its whole file then), which shows in the resident size.
repaired=no
if tail -n +"$((log_lines + 1))" "$RESULTS_DIR/server.log" | grep -q 'repaired redb metadata store'; then
	repaired=yes
	# A server that opened no volume closes the store cleanly: one more
	# restart gives the open phases a baseline without the repair's memory.
	stop_server
	start_server
	record "restart again" 0 0 0
fi
if ((FILL_VOLUMES > 0)); then
	secs=$(client open 0 "$FILL_VOLUMES")
	record "open filled" "$secs" "$FILL_VOLUMES" 0
fi
if ((VOLUMES > FILL_VOLUMES)); then
	secs=$(client open "$FILL_VOLUMES" $((VOLUMES - FILL_VOLUMES)))
	record "open empty" "$secs" $((VOLUMES - FILL_VOLUMES)) 0
fi
if [[ $NO_CONNECTED != 1 ]]; then
	# The client holds its connections until its stdin closes.
	coproc CONNECTED { SOCK="$sock" exec $PY "$work/client.py" connect "$VOLUMES" 2>>"$RESULTS_DIR/client.log"; }
	client_pid=$CONNECTED_PID
	read -r -t 600 secs <&"${CONNECTED[0]}" || die "the connecting client did not report"
	read -r -t 60 line <&"${CONNECTED[0]}" || true
	[[ $line == connected ]] || die "the connecting client failed (see $RESULTS_DIR/client.log)"
	record connected "$secs" 0 "$VOLUMES"
	eval "exec ${CONNECTED[1]}>&-"
	wait "$client_pid" || die "the connecting client failed (see $RESULTS_DIR/client.log)"
	record released 0 0 0
fi
read -r load_end _ </proc/loadavg
stop_server

$PY - "$RESULTS_DIR" <<PY
import csv, os, sys
rdir = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(rdir, "phases.csv"))))
lines = [
    f"# volume-memory $(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "",
    f"- host: $(uname -srm), $(nproc) cpus; load average $load_start at start, $load_end at end",
    f"- $VOLUMES volumes of $VOLUME_SIZE ($BACKEND); $FILL_VOLUMES of them with $FILL_PERCENT % of their 4 KiB blocks written at random",
    "",
    "| phase | took s | RSS MiB | RssAnon MiB | threads | fds | metadata MiB | growth MiB | opened / connected | KiB each |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
prev = None
for r in rows:
    rss, anon = int(r["rss_kib"]), int(r["rss_anon_kib"])
    n = int(r["volumes"]) + int(r["connections"])
    growth = (rss - int(prev["rss_kib"])) if prev and not r["phase"].startswith("restart") else None
    each = f"{growth / n:.1f}" if growth is not None and n else ""
    lines.append(
        f"| {r['phase']} | {r['seconds']} | {rss / 1024:.1f} | {anon / 1024:.1f} | {r['threads']} | {r['fds']} | "
        f"{int(r['metadata_kib']) / 1024:.1f} | "
        + (f"{growth / 1024:+.1f}" if growth is not None else "") + f" | {n or ''} | {each} |")
    prev = r
lines += ["", "- the restarted server repaired the metadata store at open (the previous one had not closed it cleanly): $repaired"
          + ("; the open phases run on a server started once more" if "$repaired" == "yes" else "")]
open(os.path.join(rdir, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "volume-memory: results in $RESULTS_DIR"
