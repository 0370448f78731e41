#!/usr/bin/env bash
# Object-store requests and FLUSH latency of a store in an S3 bucket: starts a
# moto S3 server on loopback (its request log is the count), serves a fresh
# store whose [object_store] is that bucket, writes SIZE with fio's nbd engine
# (4 KiB random writes, an NBD FLUSH every FLUSH_EVERY writes, QD1), then
# leaves the server idle for IDLE seconds. Prints PUT/GET/other requests per
# GiB written and per idle hour, and fio's write and FLUSH latencies.
#
#   scripts/object-costs.sh [--size 256M] [--flush-every 64] [--idle 120] [--no-build]
#
# moto is a Python server on the same two cores: latencies here show the
# request pattern's shape, not S3's (tens of ms per PUT). Counts do not
# depend on the machine. Results go to RESULTS_DIR (default
# /tmp/blockseal-object-costs/<timestamp>).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size=256M flush_every=64 idle=120 build=1
while (($#)); do
	case "$1" in
	--size) size="$2"; shift 2 ;;
	--flush-every) flush_every="$2"; shift 2 ;;
	--idle) idle="$2"; shift 2 ;;
	--no-build) build=0; shift ;;
	*) echo "usage: $0 [--size S] [--flush-every N] [--idle SECONDS] [--no-build]" >&2; exit 2 ;;
	esac
done
for tool in fio curl python3; do
	command -v "$tool" >/dev/null || { echo "object-costs: $tool is missing (scripts/install-deps.sh)" >&2; exit 1; }
done
python3 -c 'import moto.server, flask' 2>/dev/null || { echo "object-costs: moto is missing (scripts/install-deps.sh)" >&2; exit 1; }
if ((build)); then
	cargo build --release --locked -p blockseal --manifest-path "$root/Cargo.toml"
fi
bin="${BLOCKSEAL_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/blockseal}"
results="${RESULTS_DIR:-/tmp/blockseal-object-costs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$results"
work="$(mktemp -d)"
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m moto.server -H 127.0.0.1 -p "$port" 2>"$results/moto.log" >/dev/null &
pids+=($!)
for _ in $(seq 600); do curl -s "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
curl -sf -X PUT "http://127.0.0.1:$port/costs" >/dev/null

"$bin" key init --out "$work/master.key" >/dev/null
cat >"$work/blockseal.toml" <<EOF
data_dir = "data"
[master_key]
file = "master.key"
[unix]
path = "nbd.sock"
[object_store]
bucket = "costs"
prefix = "store"
endpoint = "http://127.0.0.1:$port"
EOF
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
(cd "$work" && exec "$bin" serve --config blockseal.toml >"$work/ready" 2>"$results/server.log") &
pids+=($!)
for _ in $(seq 600); do grep -q '^ready' "$work/ready" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$work/ready" || { echo "object-costs: the server did not start; see $results/server.log" >&2; exit 1; }
"$bin" tenant create pbx --config "$work/blockseal.toml" >/dev/null
"$bin" volume create pbx/disk --size 1G --config "$work/blockseal.toml" >/dev/null

count() { grep -cE "\"$1 " "$results/moto.log" || true; }
mark() { echo "$(count PUT) $(count GET) $(count HEAD) $(count DELETE) $(count POST)"; }
before=($(mark))
timeout 1800 fio --name=costs --ioengine=nbd --uri="nbd+unix:///pbx/disk?socket=$work/nbd.sock" \
	--rw=randwrite --bs=4k --size="$size" --iodepth=1 --fsync="$flush_every" \
	--output-format=json --output="$results/fio.json"
after=($(mark))
sleep "$idle"
idle_after=($(mark))

python3 - "$results" "$size" "$idle" "${before[@]}" "${after[@]}" "${idle_after[@]}" <<'EOF'
import json, sys
results, size, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
n = [int(x) for x in sys.argv[4:]]
b, a, i = n[0:5], n[5:10], n[10:15]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
nbytes = int(size[:-1]) * units[size[-1].upper()] if size[-1].upper() in units else int(size)
gib = nbytes / (1 << 30)
job = json.load(open(f"{results}/fio.json"))["jobs"][0]
w, s = job["write"], job["sync"]
names = ["PUT", "GET", "HEAD", "DELETE", "POST"]
lines = [f"written {size} in 4 KiB random writes, a FLUSH every {job['job options'].get('fsync')} writes",
         f"write IOPS {w['iops']:.0f}, write p50/p99 {w['clat_ns']['percentile']['50.000000']/1e6:.2f}/{w['clat_ns']['percentile']['99.000000']/1e6:.2f} ms",
         f"FLUSH p50/p99 {s['lat_ns']['percentile']['50.000000']/1e6:.2f}/{s['lat_ns']['percentile']['99.000000']/1e6:.2f} ms ({s['total_ios']} flushes)"]
for k, name in enumerate(names):
    lines.append(f"{name:6} per GiB written {(a[k]-b[k])/gib:10.0f}   per idle hour {(i[k]-a[k])*3600/idle:8.0f}")
open(f"{results}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results: $results"
