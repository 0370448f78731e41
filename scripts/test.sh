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

step "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked

step "fuzz smoke"
scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-240}"   # total, shared by every target (24 s each)

step "all checks passed"
