#!/usr/bin/env bash
# The long randomized failover run: three `blockseal serve` hosts sharing a
# bucket of a moto server the test starts on loopback; ROUNDS rounds, each
# writing and flushing through the host serving a volume, then killing it
# (kill -9) or pausing it past its lease (SIGSTOP), chosen at random; another
# host must take over holding every block flushed so far. Prints the seed
# first and a summary line last.
#
#   scripts/failover-heavy.sh [ROUNDS]      (default 50; the suite runs 2)
#
# Environment:
#   BLOCKSEAL_FAILOVER_SEED  replay a run: the seed it printed
set -euo pipefail

rounds="${1:-50}"
case "$rounds" in
'' | *[!0-9]*)
	echo "usage: $0 [ROUNDS]" >&2
	exit 2
	;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BLOCKSEAL_FAILOVER_ROUNDS="$rounds" cargo test --locked -p blockseal-tests --test cluster \
	-- --nocapture --exact failover_rounds_lose_no_flushed_write 2>&1 |
	grep -E -A4 '^failover|^test |panicked'
