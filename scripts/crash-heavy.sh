#!/usr/bin/env bash
# The heavy kill -9 crash runs, in release mode: the metadata-store suite
# (meta_crash) and the whole write path (volume_crash), each with KILLS kills
# per backend (redb, sled and SlateDB on a local directory, and SlateDB in a
# bucket of a moto server the suite starts on loopback: for volume_crash the
# segments are in that bucket too). Ends with one line per backend and suite:
# kills, flushed writes lost, authentication failures.
#
#   scripts/crash-heavy.sh [KILLS]      (default: 250 per backend and suite)
#
# Environment:
#   BLOCKSEAL_CRASH_SEED  replay a run: the seed printed at its start and in
#                         its summary and failure messages
#   CARGO_TARGET_DIR      where to build (cargo's default otherwise)
# The full output of each suite goes to target/crash-heavy/SUITE.log (or under
# CARGO_TARGET_DIR). A lost flushed write in meta_crash is a batch whose commit
# returned and that a reopened store does not have; its store has no sealed
# blocks, so authentication failures apply to volume_crash alone.
set -euo pipefail

kills="${1:-250}"
case "$kills" in
'' | *[!0-9]*)
	echo "usage: $0 [KILLS]" >&2
	exit 2
	;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
logs="${CARGO_TARGET_DIR:-$root/target}/crash-heavy"
mkdir -p "$logs"

cargo test --release --locked -p blockseal-volume --test meta_crash --test volume_crash --no-run

status=0
for suite in meta_crash volume_crash; do
	printf '\n==> %s: %s kills per backend\n' "$suite" "$kills"
	if ! BLOCKSEAL_CRASH_KILLS="$kills" cargo test --release --locked -q \
		-p blockseal-volume --test "$suite" -- --nocapture 2>&1 | tee "$logs/$suite.log"; then
		status=1
	fi
done

printf '\n%-13s %-8s %-20s %8s %20s %14s\n' suite backend seed kills "lost flushed writes" "auth failures"
for suite in meta_crash volume_crash; do
	grep -ho 'crash summary: test=.*' "$logs/$suite.log" | while read -r line; do
		field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
		auth="$(field auth_failures)"
		printf '%-13s %-8s %-20s %8s %20s %14s\n' "$(field test)" "$(field backend)" \
			"$(field seed)" "$(field kills)" "$(field lost_flushed_writes)" "${auth:--}"
	done
done
summaries="$(cat "$logs"/meta_crash.log "$logs"/volume_crash.log | grep -c 'crash summary: test=' || true)"
if [ "$summaries" -ne 8 ]; then
	echo "expected 8 summary lines (meta_crash and volume_crash x 4 backends each), found $summaries: see $logs" >&2
	status=1
fi
if [ "$status" -ne 0 ]; then
	echo "crash runs FAILED: see $logs" >&2
fi
exit "$status"
