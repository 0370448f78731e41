#!/usr/bin/env bash
# Data key rotation under load: what online re-encryption costs the clients of
# a busy volume, and how fast it goes.
#
# Creates a fresh store (release binary, --locked), one volume of SIZE filled
# sequentially (every block under data key version 1), then runs the same fio
# job twice for DURATION seconds each (4 KiB random reads and writes, QD 16, one
# connection, the nbd engine): once unloaded, once right after `blockseal key
# rotate-data`, while the server re-encrypts at its default rate (32 MiB/s, a
# quarter of it while the volume serves 1,000 requests a second or more). It
# samples `key status` before and after the loaded run for the re-encryption
# rate, waits for the job to finish (`key status --wait`), checks that only the
# new key remains and that fio's crc32c data verifies, and prints a table.
#
#   scripts/rotation-load.sh                  # 1 GiB, 20 s per run
#   scripts/rotation-load.sh --size 4G --duration 30
#
# Options (environment variable in brackets, default after it):
#   --size S        [SIZE 1G]          the volume
#   --duration D    [DURATION 20]      seconds per fio run
#   --rate R        [REENCRYPT_RATE]   reencrypt_rate in the config (default: the server's)
#   --no-build      [NO_BUILD 0]       use the binary already built
#                   [BLOCKSEAL_BIN]    use this binary
#   --results DIR   [RESULTS_DIR /tmp/blockseal-rotation-load/<timestamp>]
#
# Compare the two runs of one invocation (ratios), not numbers across machines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
SIZE=${SIZE:-1G}
DURATION=${DURATION:-20}
REENCRYPT_RATE=${REENCRYPT_RATE:-}
NO_BUILD=${NO_BUILD:-0}
die() { echo "rotation-load: $*" >&2; exit 1; }
while (($#)); do
	case $1 in
	--size) SIZE=$2; shift 2 ;;
	--duration) DURATION=$2; shift 2 ;;
	--rate) REENCRYPT_RATE=$2; shift 2 ;;
	--no-build) NO_BUILD=1; shift ;;
	--results) RESULTS_DIR=$2; shift 2 ;;
	*) die "unknown option $1 (see the comment at the top)" ;;
	esac
done
for tool in fio jq; do
	command -v "$tool" >/dev/null || die "$tool is required (scripts/install-deps.sh installs it)"
done

if [[ -n ${BLOCKSEAL_BIN:-} ]]; then
	bin=$BLOCKSEAL_BIN
else
	target=${CARGO_TARGET_DIR:-$root/target}
	if [[ $NO_BUILD != 1 ]]; then
		(cd "$root" && cargo build --release --locked -p blockseal) >&2
	fi
	bin="$target/release/blockseal"
fi
[[ -x $bin ]] || die "$bin is missing"

RESULTS_DIR=${RESULTS_DIR:-/tmp/blockseal-rotation-load/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS_DIR"
work="$(mktemp -d /tmp/blockseal-rotation-load.XXXXXX)"
server_pid=
cleanup() {
	local rc=$?
	[[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
	rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cfg="$work/blockseal.toml"
"$bin" key init --out "$work/master.key" >/dev/null
{
	echo 'data_dir = "data"'
	[[ -n $REENCRYPT_RATE ]] && echo "reencrypt_rate = \"$REENCRYPT_RATE\""
	echo '[master_key]'
	echo 'file = "master.key"'
	echo '[unix]'
	echo 'path = "nbd.sock"'
} >"$cfg"
"$bin" tenant create acme --config "$cfg" >/dev/null
"$bin" volume create acme/rec --size "$SIZE" --config "$cfg" >/dev/null
"$bin" serve --config "$cfg" >"$work/serve.out" 2>"$RESULTS_DIR/server.log" &
server_pid=$!
for ((i = 0; i < 300; i++)); do
	grep -q '^ready ' "$work/serve.out" 2>/dev/null && break
	kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(tail -5 "$RESULTS_DIR/server.log")"
	sleep 0.1
done
grep -q '^ready ' "$work/serve.out" || die "the server did not get ready within 30 s"
uri="nbd+unix:///acme/rec?socket=$work/nbd.sock"

fio_run() { # name, extra args...
	local name=$1
	shift
	(cd "$work" && timeout $((DURATION + 600)) fio --name="$name" --ioengine=nbd --uri="$uri" \
		--verify=crc32c --verify_fatal=1 --verify_state_save=0 \
		--output-format=json --output="$RESULTS_DIR/$name${suffix:-}.json" "$@") ||
		die "fio $name failed (see $RESULTS_DIR/$name.json)"
}
iops() { jq '[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor' "$RESULTS_DIR/$1.json"; }
status() { "$bin" key status acme/rec --config "$cfg" --json; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$server_pid/stat"; }

# The load runs on the first half; the second half is written once and
# verified at the end (fio's crc32c headers of 1 MiB blocks, which 4 KiB
# writes of the load would break).
half=$(($(numfmt --from=iec "$SIZE") / 2))
echo "rotation-load: filling $SIZE under data key version 1" >&2
fio_run prefill --rw=write --bs=1M --iodepth=4 --size="$half" --do_verify=0
fill=(--rw=write --bs=1M --iodepth=4 --offset="$half" --size="$half")
fio_run fill "${fill[@]}" --do_verify=0
load=(--rw=randrw --rwmixread=50 --bs=4k --iodepth=16 --size="$half" --time_based --runtime="$DURATION" --verify_backlog=1024)

# A first random run, not counted: it warms the extent index and the page
# cache and gets the compaction its random overwrites start going, so the two
# counted runs start from the same state.
echo "rotation-load: warm-up run, ${DURATION}s" >&2
fio_run warmup "${load[@]}"
echo "rotation-load: unloaded run, ${DURATION}s" >&2
t0=$(cpu_ticks)
fio_run unloaded "${load[@]}"
t1=$(cpu_ticks)
"$bin" key rotate-data acme/rec --config "$cfg" >/dev/null
before=$(status)
start=$(date +%s.%N)
echo "rotation-load: run during re-encryption, ${DURATION}s" >&2
fio_run rotating "${load[@]}"
end=$(date +%s.%N)
t2=$(cpu_ticks)
after=$(status)
echo "$before" >"$RESULTS_DIR/status-before.json"
echo "$after" >"$RESULTS_DIR/status-after.json"
done_before=$(jq '.job.blocks_done // 0' <<<"$before")
done_after=$(jq 'if .job then .job.blocks_done else ([.keys[].blocks] | add) end' <<<"$after")
echo "rotation-load: waiting for the job to finish" >&2
wait_start=$(date +%s.%N)
final=$("$bin" key status acme/rec --wait --json --config "$cfg")
wait_end=$(date +%s.%N)
echo "$final" >"$RESULTS_DIR/status-final.json"
[[ $(jq '[.keys[].version] == [2] and .job == null' <<<"$final") == true ]] ||
	die "more than the newest data key remains: $final"
remaining_after=$(jq '.job.blocks_remaining // 0' <<<"$after")
suffix=-verify fio_run fill "${fill[@]}" --verify_only

base=$(iops unloaded)
during=$(iops rotating)
hz=$(getconf CLK_TCK)
python3 - "$base" "$during" "$done_before" "$done_after" "$start" "$end" \
	"$remaining_after" "$wait_start" "$wait_end" "$t0" "$t1" "$t2" "$hz" "$DURATION" <<'PY' | tee "$RESULTS_DIR/summary.md"
import sys
(base, during, d0, d1, s, e, rem, ws, we, t0, t1, t2, hz, dur) = sys.argv[1:]
base, during = int(base), int(during)
moved = (int(d1) - int(d0)) * 4096 / 2**20
secs = float(e) - float(s)
idle = int(rem) * 4096 / 2**20 / max(float(we) - float(ws), 1e-3)
cpu_u = (int(t1) - int(t0)) / int(hz)
cpu_r = (int(t2) - int(t1)) / int(hz)
print("| run | IOPS (4K randrw QD16) | server CPU s | CPU us per I/O |")
print("|---|---:|---:|---:|")
print(f"| unloaded | {base:,} | {cpu_u:.1f} | {cpu_u / max(base * int(dur), 1) * 1e6:.1f} |")
print(f"| during re-encryption | {during:,} | {cpu_r:.1f} | {cpu_r / max(during * int(dur), 1) * 1e6:.1f} |")
print()
print(f"IOPS during re-encryption: {during / max(base, 1):.2f} of unloaded (goal: at least 0.70)")
print(f"re-encrypted under load: {moved:.0f} MiB in {secs:.1f} s = {moved / secs:.1f} MiB/s")
print(f"re-encrypted after the load (idle volume): {idle:.1f} MiB/s")
PY
