#!/usr/bin/env bash
# Backup and restore throughput, beside nbdcopy reading the same data.
#
# Builds the release binary (--locked, honours CARGO_TARGET_DIR), creates a
# fresh store with the CLI (tenant `bench`, volume bench/disk of --size),
# serves it on a Unix socket, fills the volume with random data (nbdcopy of a
# file read from /dev/urandom), takes snapshot s1, then measures, in one run:
#
#   backup      blockseal backup create bench/disk@s1 --out FILE, through the
#               running server (streamed over the admin socket, checked by
#               the CLI, written to a file and fsynced)
#   nbdcopy     nbdcopy of the snapshot's export bench/disk@s1 to a file: the
#               same blocks, opened and sent over NBD
#   restore     blockseal restore FILE --as bench/restored (every block opened,
#               resealed under the new volume's key, flushed)
#   verify      blockseal backup verify FILE (every block and the MAC checked)
#
# backup and nbdcopy run --rounds times each, alternating, and the best of
# each counts (the machine may be shared); their ratio is backup/nbdcopy.
# Then --changed percent of the volume's 4 KiB blocks are overwritten at
# random (distinct) places with fio, snapshot s2 is taken, and an
# incremental backup from s1 is made: its size is reported as a percentage
# of the full backup's.
#
#   scripts/backup-throughput.sh                    # 1 GiB
#   scripts/backup-throughput.sh --size 4G
#   scripts/backup-throughput.sh --smoke            # 64 MiB, one round
#
# Options (environment variable in brackets, default after it):
#   --size S          [SIZE 1G]           volume size (filled completely)
#   --changed P       [CHANGED_PERCENT 1] percent of blocks changed for the incremental backup
#   --rounds N        [ROUNDS 2]          backup and nbdcopy runs each
#   --smoke                               --size 64M --rounds 1
#   --results DIR     [RESULTS_DIR /tmp/blockseal-backup-throughput/<timestamp>]
#   --bin PATH        [BLOCKSEAL_BIN]     use this blockseal binary (no build)
#   --no-build        [NO_BUILD 0]        use the release binary already built
#   --keep            [KEEP_WORKDIR 0]    keep the store and files
#
# Results: RESULTS_DIR/summary.md (also printed), results.csv, server.log.
# Needs fio and nbdcopy (scripts/install-deps.sh installs them). Every
# process started here is stopped by its pid; every wait has a deadline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

SIZE=${SIZE:-1G}
CHANGED_PERCENT=${CHANGED_PERCENT:-1}
ROUNDS=${ROUNDS:-2}
RESULTS_DIR=${RESULTS_DIR:-}
BLOCKSEAL_BIN=${BLOCKSEAL_BIN:-}
NO_BUILD=${NO_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

die() {
	echo "backup-throughput: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}
while (($#)); do
	case "$1" in
	--size) SIZE=$2; shift ;;
	--changed) CHANGED_PERCENT=$2; shift ;;
	--rounds) ROUNDS=$2; shift ;;
	--smoke) SIZE=64M; ROUNDS=1 ;;
	--results) RESULTS_DIR=$2; shift ;;
	--bin) BLOCKSEAL_BIN=$2; shift ;;
	--no-build) NO_BUILD=1 ;;
	--keep) KEEP_WORKDIR=1 ;;
	-h | --help) usage 0 ;;
	*) echo "backup-throughput: unknown option $1" >&2; usage 2 >&2 ;;
	esac
	shift
done
for tool in fio nbdcopy awk; do
	command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
done
[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1)) || die "--rounds must be a positive number"
awk -v p="$CHANGED_PERCENT" 'BEGIN { exit !(p + 0 > 0 && p + 0 <= 100) }' ||
	die "--changed must be a percentage above 0"
bytes=$(numfmt --from=iec "${SIZE%iB}") || die "--size $SIZE is not a size (e.g. 1G, 512M)"
((bytes >= 4 << 20 && bytes % 4096 == 0)) || die "--size must be at least 4M and a multiple of 4K"

if [[ -n $BLOCKSEAL_BIN ]]; then
	bin=$BLOCKSEAL_BIN
else
	target="${CARGO_TARGET_DIR:-$root/target}"
	mkdir -p "$target"
	target="$(cd "$target" && pwd)"
	if [[ $NO_BUILD != 1 ]]; then
		(cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p blockseal)
	fi
	bin="$target/release/blockseal"
fi
[[ -x $bin ]] || die "$bin is missing (build it, or drop --no-build)"

RESULTS_DIR=${RESULTS_DIR:-/tmp/blockseal-backup-throughput/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
work="$(mktemp -d /tmp/blockseal-backup-throughput.XXXXXX)"
server_pid=
cleanup() {
	local rc=$?
	if [[ -n $server_pid ]]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	if [[ $KEEP_WORKDIR == 1 ]]; then
		echo "backup-throughput: kept $work" >&2
	else
		rm -rf "$work"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ the store --
cfg="$work/blockseal.toml"
sock="$work/nbd.sock"
cat >"$cfg" <<CONFIG
data_dir = "store"

[master_key]
file = "master.key"

[unix]
path = "nbd.sock"
CONFIG
bs() { "$bin" "$@" --config "$cfg"; }
"$bin" key init --out "$work/master.key" >/dev/null
bs tenant create bench >/dev/null
bs volume create bench/disk --size "$bytes" >/dev/null

BLOCKSEAL_LOG=${BLOCKSEAL_LOG:-info} "$bin" serve --config "$cfg" >"$work/serve.out" 2>>"$RESULTS_DIR/server.log" &
server_pid=$!
for ((i = 0; i < 600; i++)); do
	grep -q '^ready ' "$work/serve.out" 2>/dev/null && break
	kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(tail -5 "$RESULTS_DIR/server.log")"
	sleep 0.1
done
grep -q '^ready ' "$work/serve.out" || die "the server did not get ready within 60 s"
uri() { echo "nbd+unix:///$1?socket=$sock"; }

now() { date +%s.%N; }
# mibs BYTES SECONDS: MiB/s, one decimal.
mibs() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1048576 / s }'; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

echo "step,bytes,seconds,mib_per_s" >"$RESULTS_DIR/results.csv"
record() { # STEP BYTES SECONDS
	echo "$1,$2,$3,$(mibs "$2" "$3")" >>"$RESULTS_DIR/results.csv"
	echo "backup-throughput: $1: $(numfmt --to=iec-i --suffix=B "$2") in $3 s, $(mibs "$2" "$3") MiB/s"
}

# ------------------------------------------------------------ fill, s1 --
echo "backup-throughput: filling bench/disk ($(numfmt --to=iec-i --suffix=B "$bytes") of random data)"
head -c "$bytes" /dev/urandom >"$work/fill.raw"
t=$(now)
nbdcopy "$work/fill.raw" "$(uri bench/disk)"
record fill "$bytes" "$(since "$t")"
rm -f "$work/fill.raw"
bs snapshot create bench/disk@s1 >/dev/null

# ------------------------------------------- backup beside nbdcopy, s1 --
best_backup=0
best_copy=0
for ((r = 1; r <= ROUNDS; r++)); do
	out="$work/full-$r.bsb"
	t=$(now)
	bs backup create bench/disk@s1 --out "$out" >"$work/backup-$r.txt"
	secs=$(since "$t")
	record "backup round $r" "$bytes" "$secs"
	full_bytes=$(stat -c %s "$out")
	best_backup=$(awk -v a="$best_backup" -v b="$(mibs "$bytes" "$secs")" 'BEGIN { print (b > a ? b : a) }')
	if ((r == 1)); then
		mv "$out" "$work/full.bsb"
	else
		rm -f "$out"
	fi

	t=$(now)
	nbdcopy "$(uri bench/disk@s1)" "$work/copy.raw"
	sync "$work/copy.raw"
	secs=$(since "$t")
	record "nbdcopy round $r" "$bytes" "$secs"
	best_copy=$(awk -v a="$best_copy" -v b="$(mibs "$bytes" "$secs")" 'BEGIN { print (b > a ? b : a) }')
	rm -f "$work/copy.raw"
done
ratio=$(awk -v a="$best_backup" -v b="$best_copy" 'BEGIN { printf "%.2f", a / b }')

# ------------------------------------------------------ restore, verify --
t=$(now)
bs restore "$work/full.bsb" --as bench/restored >/dev/null
restore_secs=$(since "$t")
record restore "$bytes" "$restore_secs"
t=$(now)
bs backup verify "$work/full.bsb" >/dev/null
verify_secs=$(since "$t")
record verify "$bytes" "$verify_secs"

# ------------------------------------------------- incremental from s1 --
blocks=$((bytes / 4096))
changed=$(awk -v n="$blocks" -v p="$CHANGED_PERCENT" 'BEGIN { c = int(n * p / 100); print (c < 1 ? 1 : c) }')
echo "backup-throughput: overwriting $changed random 4 KiB blocks ($CHANGED_PERCENT %)"
(cd "$work" && fio --name=changes --ioengine=nbd --uri="$(uri bench/disk)" --rw=randwrite \
	--bs=4k --size="$bytes" --number_ios="$changed" --iodepth=16 --randrepeat=0 \
	--refill_buffers --end_fsync=1 >"$work/fio.txt") || die "fio failed: $(tail -5 "$work/fio.txt")"
bs snapshot create bench/disk@s2 >/dev/null
t=$(now)
bs backup create bench/disk@s2 --incremental-from s1 --out "$work/incr.bsb" >"$work/incr.txt"
incr_secs=$(since "$t")
incr_bytes=$(stat -c %s "$work/incr.bsb")
incr_blocks=$(awk '/^blocks/ { print $2 }' "$work/incr.txt")
record "incremental backup" "$incr_bytes" "$incr_secs"
percent=$(awk -v a="$incr_bytes" -v b="$full_bytes" 'BEGIN { printf "%.2f", 100 * a / b }')
bs backup verify "$work/full.bsb" "$work/incr.bsb" >/dev/null

# -------------------------------------------------------------- summary --
{
	echo "# Backup throughput, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo
	echo "$(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), volume $(numfmt --to=iec-i --suffix=B "$bytes") of random data, $ROUNDS round(s), best of each"
	echo
	echo "| step | MiB/s |"
	echo "|---|---:|"
	echo "| backup create --out FILE (through the server) | $best_backup |"
	echo "| nbdcopy of the snapshot export to a file | $best_copy |"
	echo "| ratio backup / nbdcopy | $ratio |"
	echo "| restore into a new volume | $(mibs "$bytes" "$restore_secs") |"
	echo "| backup verify (every block and the MAC) | $(mibs "$bytes" "$verify_secs") |"
	echo
	echo "Full backup: $(numfmt --to=iec-i --suffix=B "$full_bytes"). Incremental after overwriting $changed of $blocks blocks ($CHANGED_PERCENT %): $incr_blocks blocks, $(numfmt --to=iec-i --suffix=B "$incr_bytes"), $percent % of the full backup, made in $incr_secs s."
} >"$RESULTS_DIR/summary.md"
cat "$RESULTS_DIR/summary.md"
echo "backup-throughput: results in $RESULTS_DIR"
