#!/usr/bin/env bash
# Side-by-side NBD benchmark: blockseal against nbdkit and qemu-nbd.
#
# Builds the release binary (--locked) and runs the shared peers benchmark
# (shared/bench/peers.sh beside the repository) with blockseal's embedded
# default as the "project" server: a fresh store in peers.sh's scratch dir,
# the demo volume demo/disk of the benchmark's size, served on a Unix socket.
#
#   scripts/bench-peers.sh
#   DURATION=5 SERVERS="nbdkit-luks project" scripts/bench-peers.sh
#   WORKLOADS="randread randwrite" SERVERS=project scripts/bench-peers.sh
#
# Every peers.sh setting passes through (DURATION, RAMP, SIZE, SERVERS,
# WORKLOADS, RESULTS_DIR, FIO_EXTRA, ...; see the header of peers.sh). Put
# "project" in SERVERS to include blockseal when SERVERS is set.
#
# Environment:
#   PEERS_SH          the benchmark script (default ../../shared/bench/peers.sh
#                     relative to this script, i.e. beside the repository)
#   CARGO_TARGET_DIR  where to build (default: target in the repository)
#   BLOCKSEAL_LOG     log filter of the server (default: info; nothing is
#                     logged per request at info)
#   BLOCKSEAL_SERVE_ARGS  extra arguments for `blockseal serve`
#   NO_BUILD=1        use the binary already built
#   BLOCKSEAL_BIN     use this binary (no build)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
peers="${PEERS_SH:-$here/../../shared/bench/peers.sh}"
[[ -f "$peers" ]] || {
	echo "bench-peers: $peers not found (set PEERS_SH)" >&2
	exit 1
}
peers="$(cd "$(dirname "$peers")" && pwd)/$(basename "$peers")"

target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
if [[ -n "${BLOCKSEAL_BIN:-}" ]]; then
	# A binary built elsewhere (the test suite's smoke passes its debug build).
	bin="$BLOCKSEAL_BIN"
else
	if [[ "${NO_BUILD:-0}" != 1 ]]; then
		(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p blockseal)
	fi
	bin="$target/release/blockseal"
fi
[[ -x "$bin" ]] || {
	echo "bench-peers: $bin is missing (build it or unset NO_BUILD)" >&2
	exit 1
}

# The embedded default: the store, its (passphrase-less) master key and the
# demo volume are created in {dir} on first start.
# (peers.sh runs it with `bash -c`; BLOCKSEAL_LOG, if set, reaches it through the
# environment.)
export PROJECT_SERVER_CMD="$bin serve --data-dir {dir} --unix {socket} --demo-size {size}${BLOCKSEAL_SERVE_ARGS:+ $BLOCKSEAL_SERVE_ARGS}"
export PROJECT_EXPORT=demo/disk
export PROJECT_NAME="${PROJECT_NAME:-blockseal}"

# Compaction runs on its own thread inside the server and is charged to the
# server's CPU in peers.sh's table. To show it separately, sample the CPU ticks
# of blockseal's threads named blockseal-compact (and of the whole process)
# twice a second while the benchmark runs, then split them by each fio run's
# time window.
export RESULTS_DIR="${RESULTS_DIR:-/tmp/nbd-peers-results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS_DIR"
samples="$RESULTS_DIR/blockseal-threads.tsv"
: >"$samples"
sample_threads() {
	while :; do
		local now pid compact=0 total=0
		now=$(date +%s%3N)
		for pid in $(pgrep -f -x "$bin serve .*" || true); do
			for stat in /proc/"$pid"/task/*/stat; do
				local line rest name ticks
				line=$(cat "$stat" 2>/dev/null) || continue
				name=${line#*(}
				name=${name%%)*}
				rest=${line##*) }
				# Fields 14 and 15 of stat (utime, stime) are 12 and 13 after ") ".
				ticks=$(awk '{print $12 + $13}' <<<"$rest")
				total=$((total + ticks))
				[[ $name == blockseal-compa* ]] && compact=$((compact + ticks))
			done
		done
		printf '%s\t%s\t%s\n' "$now" "$compact" "$total" >>"$samples"
		sleep 0.5
	done
}
sample_threads &
sampler=$!
status=0
bash "$peers" "$@" || status=$?
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true

python3 - "$RESULTS_DIR" "$samples" "$PROJECT_NAME" "$(getconf CLK_TCK)" <<'PY'
import glob, json, os, sys
rdir, samples, name, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = []
for line in open(samples):
    t, c, a = line.split()
    rows.append((int(t), int(c), int(a)))
def ticks_at(ms, col):
    # The last sample at or before `ms` (ticks are cumulative per process;
    # the server runs once for all workloads).
    best = None
    for r in rows:
        if r[0] <= ms:
            best = r
    return best[col] if best else 0
out = ["| workload | compaction CPU % | compaction share of server CPU |", "|---|---:|---:|"]
for f in sorted(glob.glob(os.path.join(rdir, f"{name}.*.json"))):
    wl = os.path.basename(f)[len(name) + 1:-5]
    if wl.startswith("prefill"):
        continue
    j = json.load(open(f))
    end = j["timestamp_ms"]
    start = end - int(j["jobs"][0]["elapsed"]) * 1000
    seconds = max((end - start) / 1000, 1e-3)
    compact = (ticks_at(end, 1) - ticks_at(start, 1)) / hz
    total = (ticks_at(end, 2) - ticks_at(start, 2)) / hz
    share = f"{compact / total * 100:.0f} %" if total > 0 else ""
    out.append(f"| {wl} | {compact / seconds * 100:.0f} | {share} |")
text = "\n".join(out) + "\n"
open(os.path.join(rdir, "compaction-cpu.md"), "w").write(text)
print("\nblockseal compaction thread CPU per workload (sampled every 0.5 s):\n" + text)
PY
exit "$status"
