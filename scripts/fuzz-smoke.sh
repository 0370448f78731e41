#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short while and fails on the first crash.
#
#   scripts/fuzz-smoke.sh [SECONDS]     (default: 30 seconds per target)
#
# Uses a nightly toolchain when one is installed; otherwise stable with
# RUSTC_BOOTSTRAP=1, which lets stable accept the -Z flags cargo-fuzz passes.
# Installs cargo-fuzz when it is missing (CI starts from a fresh machine).
#
# Environment:
#   FUZZ_TOOLCHAIN    force "nightly" or "stable" instead of detecting
#   CARGO_TARGET_DIR  where to build (default: fuzz/target)
# Each target's libFuzzer output goes to fuzz/artifacts/smoke-TARGET.log.
set -euo pipefail

seconds="${1:-30}"
case "$seconds" in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS]" >&2
	exit 2
	;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz-smoke: installing cargo-fuzz"
	cargo install cargo-fuzz --locked
fi

toolchain="${FUZZ_TOOLCHAIN:-}"
if [ -z "$toolchain" ]; then
	if rustup run nightly rustc --version >/dev/null 2>&1; then
		toolchain=nightly
	else
		toolchain=stable
	fi
fi
case "$toolchain" in
nightly) fuzz=(cargo +nightly fuzz) ;;
stable)
	# Stable ships the sanitizer runtimes; only the -Z flags are gated.
	export RUSTC_BOOTSTRAP=1
	if command -v rustup >/dev/null 2>&1; then
		fuzz=(cargo +stable fuzz)
	else
		fuzz=(cargo fuzz)
	fi
	;;
*)
	echo "fuzz-smoke: FUZZ_TOOLCHAIN must be nightly or stable, not $toolchain" >&2
	exit 2
	;;
esac
echo "fuzz-smoke: toolchain $toolchain, ${seconds}s per target"

# Build once up front so build time is not charged to the fuzzing budget.
"${fuzz[@]}" build

mkdir -p "$root/fuzz/artifacts"
status=0
for target in $("${fuzz[@]}" list); do
	echo "fuzz-smoke: $target"
	start=$SECONDS
	log="$root/fuzz/artifacts/smoke-$target.log"
	if ! "${fuzz[@]}" run "$target" -- -max_total_time="$seconds" -print_final_stats=1 \
		>"$log" 2>&1; then
		tail -n 60 "$log" >&2
		echo "fuzz-smoke: $target FAILED (crash input under fuzz/artifacts/$target/)" >&2
		status=1
	else
		runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1 || true)
		echo "fuzz-smoke: $target ok: ${runs:-?} runs in $((SECONDS - start))s"
	fi
done
exit "$status"
