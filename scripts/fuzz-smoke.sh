#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short while and fails on the first crash.
#
#   scripts/fuzz-smoke.sh [SECONDS]     (default: 120 seconds in all)
#
# SECONDS is the budget for the whole smoke, shared equally by the targets
# (at least 1 second each); building is not charged to it. Long runs are in
# fuzz/README.md.
#
# Uses a nightly toolchain when one is installed; otherwise stable with
# RUSTC_BOOTSTRAP=1, which lets stable accept the -Z flags cargo-fuzz passes.
# Installs cargo-fuzz when it is missing (CI starts from a fresh machine).
#
# Environment:
#   FUZZ_SECONDS      the budget when no argument is given
#   FUZZ_TOOLCHAIN    force "nightly" or "stable" instead of detecting
#   CARGO_TARGET_DIR  where to build (default: fuzz/target)
# Each target's libFuzzer output goes to fuzz/artifacts/smoke-TARGET.log; a
# target with a dictionary in fuzz/dict/TARGET.dict runs with it. Inputs that
# once made a target fail are kept in fuzz/regressions/TARGET/ and run first.
set -euo pipefail

budget="${1:-${FUZZ_SECONDS:-120}}"
case "$budget" in
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
# Build once up front so build time is not charged to the fuzzing budget.
"${fuzz[@]}" build

targets=$("${fuzz[@]}" list)
count=$(printf '%s\n' "$targets" | grep -c .)
seconds=$((budget / count))
if [ "$seconds" -lt 1 ]; then
	seconds=1
fi
echo "fuzz-smoke: toolchain $toolchain, $count targets, ${seconds}s each (${budget}s budget)"

mkdir -p "$root/fuzz/artifacts"
status=0
started=$SECONDS
for target in $targets; do
	start=$SECONDS
	log="$root/fuzz/artifacts/smoke-$target.log"
	args=(-max_total_time="$seconds" -timeout=30 -print_final_stats=1)
	if [ -f "$root/fuzz/dict/$target.dict" ]; then
		args+=(-dict="$root/fuzz/dict/$target.dict")
	fi
	# Inputs that once failed (fuzz/regressions/TARGET/) run first, once each.
	regressions=("$root/fuzz/regressions/$target"/*)
	if [ -e "${regressions[0]}" ] &&
		! "${fuzz[@]}" run "$target" "${regressions[@]}" >"$log" 2>&1; then
		tail -n 60 "$log" >&2
		echo "fuzz-smoke: $target FAILED on a regression input (fuzz/regressions/$target/)" >&2
		status=1
		continue
	fi
	if ! "${fuzz[@]}" run "$target" -- "${args[@]}" >"$log" 2>&1; then
		tail -n 60 "$log" >&2
		echo "fuzz-smoke: $target FAILED (crash input under fuzz/artifacts/$target/)" >&2
		status=1
	else
		runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1 || true)
		echo "fuzz-smoke: $target ok: ${runs:-?} runs in $((SECONDS - start))s"
	fi
done
echo "fuzz-smoke: done in $((SECONDS - started))s"
exit "$status"
