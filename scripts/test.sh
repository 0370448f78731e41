#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine:
#   installs the test peers, then format check, clippy, tests (unit, conformance,
#   crash suites at CI size, model, tamper, real-client interop), docs with
#   warnings denied, and a short smoke of every fuzz target.
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

step "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked

step "fuzz smoke"
scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-240}"   # total, shared by every target (~30 s each)

step "all checks passed"
