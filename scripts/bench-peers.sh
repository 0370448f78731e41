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
if [[ "${NO_BUILD:-0}" != 1 ]]; then
	(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p blockseal)
fi
bin="$target/release/blockseal"
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
exec bash "$peers" "$@"
