#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine:
#   installs the test peers, then format check, clippy, tests (unit, conformance,
#   crash suites at CI size, model, tamper, real-client interop), a smoke of
#   the many-volume flush load, docs with warnings denied, and a short smoke of
#   every fuzz target.
# Heavy runs (long crash loops, long fuzzing, benchmarks) are separate commands,
# listed in the README.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "many-volume flush smoke (20 volumes, 5 s; scripts/flush-load.sh for the real load)"
target_dir="${CARGO_TARGET_DIR:-target}"
[[ $target_dir == /* ]] || target_dir="$PWD/$target_dir"
# The debug binary `cargo test` built for the end-to-end suites.
BLOCKSEAL_BIN="$target_dir/debug/blockseal" scripts/flush-load.sh --smoke

step "benchmark smoke (blockseal alone, 2 s of 4 KiB random writes; scripts/bench-peers.sh for the real run)"
bench_results="$(mktemp -d /tmp/blockseal-bench-smoke.XXXXXX)"
BLOCKSEAL_BIN="$target_dir/debug/blockseal" RESULTS_DIR="$bench_results" SERVERS=project \
	WORKLOADS=randwrite DURATION=2 RAMP=0 SIZE=64M scripts/bench-peers.sh
# peers.sh marks a server that failed as FAILED and goes on: the smoke must not.
grep -q '^blockseal,randwrite,[0-9]' "$bench_results/summary.csv" || {
	echo "benchmark smoke: no blockseal result in $bench_results" >&2
	exit 1
}
[[ -s "$bench_results/compaction-cpu.md" ]] || {
	echo "benchmark smoke: no compaction CPU table in $bench_results" >&2
	exit 1
}
rm -rf "$bench_results"

step "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked

step "fuzz smoke"
scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-240}"   # total, shared by every target (~30 s each)

step "all checks passed"
