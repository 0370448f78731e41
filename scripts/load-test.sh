#!/usr/bin/env bash
# The product's sizing as a load test: 5000 tenant volumes on one server, 600
# of them recording calls (a steady stream each: G.711 at 8000 bytes/s in
# 160 ms chunks, FLUSH every 5 s) while 50 tenants read back older
# recordings; real clients (libnbd, one connection per stream).
# scripts/load_test.py has the model and what each number means.
#
#   scripts/load-test.sh                      # 600 streams for 60 s
#   scripts/load-test.sh --ceiling            # then 2x, 4x, ... until a deadline is missed
#   scripts/load-test.sh --streams 1200 --chunk-ms 20 --codec-rate 16000
#   scripts/load-test.sh --smoke              # 60 streams, 300 volumes, 5 readers, 8 s
#
# Options:
#   --streams N         recording streams (600)
#   --volumes N         volumes on the server (5000), 50 to a tenant
#   --readers N         tenants reading an older recording back (50)
#   --duration S        seconds of the main run (60)
#   --codec-rate B      bytes per second of each stream (8000: G.711)
#   --chunk-ms MS       milliseconds per chunk, the deadline of each (160)
#   --flush-secs S      seconds between a stream's FLUSHes (5)
#   --ceiling           more streams after the main run, until one run misses a deadline
#                       (fewer, halving, when the main run misses already)
#   --ceiling-duration S, --ceiling-steps LIST   (30; 2,4,6,8,10,12,14 times --streams)
#   --cold              no warm-up write per stream (fresh volumes open their first segment in the run)
#   --smoke             a short run for the test suite (sizes above)
#   --json FILE         the results as JSON too
#   --bin PATH          this blockseal binary (no build); default: build the release one
#
# Prints a Markdown table, one row per run. Needs python3-libnbd
# (scripts/install-deps.sh installs it). Raises the open file
# limit for the server and the clients (each stream is a socket at both ends).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

die() {
	echo "load-test: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}

bin=
args=()
while (($#)); do
	case "$1" in
	--bin) bin=$2; shift ;;
	--smoke) args+=(--streams 60 --volumes 300 --readers 5 --duration 8) ;;
	--ceiling | --cold) args+=("$1") ;;
	--streams | --volumes | --readers | --duration | --codec-rate | --chunk-ms | --flush-secs | \
		--ceiling-duration | --ceiling-steps | --json)
		(($# >= 2)) || die "$1 needs a value"
		args+=("$1" "$2")
		shift
		;;
	-h | --help) usage 0 ;;
	*) echo "load-test: unknown option $1" >&2; usage 2 >&2 ;;
	esac
	shift
done

/usr/bin/python3 -c 'import nbd' 2>/dev/null || die "python3-libnbd is missing (scripts/install-deps.sh installs it)"

if [[ -z $bin ]]; then
	(cd "$root" && cargo build --release --locked -p blockseal >&2)
	bin="${CARGO_TARGET_DIR:-$root/target}/release/blockseal"
fi
[[ -x $bin ]] || die "no blockseal binary at $bin"

# Each stream holds a socket in the server and one in its client.
hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ((hard < 1048576)) && [[ $(id -u) == 0 ]]; then
	ulimit -Hn 1048576 2>/dev/null && hard=1048576
fi
ulimit -Sn "$hard"

exec /usr/bin/python3 "$here/load_test.py" --binary "$bin" "${args[@]}"
