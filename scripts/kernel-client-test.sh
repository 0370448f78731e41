#!/usr/bin/env bash
# The real Linux kernel NBD client against a running blockseal server.
#
# Boots Debian's own kernel under QEMU software emulation (TCG), through its
# PVH entry (the uncompressed vmlinux, extracted from the package's vmlinuz)
# with qboot as firmware, and an initramfs holding the nbd module (with the
# modules it and ext4 depend on, from modules.dep), nbd-client, e2fsprogs,
# socat and busybox: all taken from Debian packages with `apt-get download`
# and `dpkg-deb -x` (libraries the packages do not hold come from the host's
# /lib, same architecture). Nothing is installed on the host for the guest,
# and there is no disk image. Kernel and initramfs are cached, keyed by the
# package versions and this script, so only the first run downloads.
#
# The guest has no network. Each NBD connection is one virtio-serial port
# whose qemu chardev connects to the server's Unix socket when qemu starts;
# in the guest, socat listens on a Unix socket per export and bridges each
# connection nbd-client makes to the next unused port of that export (a port
# is one byte stream, so it carries exactly one connection).
#
# For each export, in order, the guest runs: nbd-client -unix (with -C N for
# N connections), mkfs.ext4, mount, files written (one per connection and at
# least two, each from its own CPU where there are enough, so that every
# connection with a queue carries requests; see CPUs below), sync, unmount,
# caches dropped, mount again, checksums verified,
# a file removed, fstrim, unmount, e2fsck -fn, nbd-client -d. Its console
# (a file; see --work) shows
#   kernel-client: PASS export=NAME ...   or   kernel-client: FAIL export=NAME step=...
# and, last, `kernel-client: ALL PASS` (or `kernel-client: FAILED`) before
# the guest powers off. Then, from the host (unless --no-host-check), each
# export that passed: nbdinfo --size equals the size the guest saw, nbdcopy
# copies it to a file, e2fsck -fn finds that filesystem clean, and the files
# the guest kept, read with debugfs, have the checksums the guest printed:
#   kernel-client: host PASS export=NAME ...
# Exit status 0 when every export passed both, 1 otherwise.
#
#   scripts/kernel-client-test.sh --socket /tmp/bs/nbd.sock --export demo/disk
#   scripts/kernel-client-test.sh --socket S --export acme/disk --export acme/multi:4
#   scripts/kernel-client-test.sh --prepare          # fill the cache only
#
# The guest formats every export it is given: what they held is lost. Every
# connection is opened when qemu starts, so the server's
# handshake_timeout_secs must cover the boot and the exports tested before
# (tests/tests/kernel_client.rs sets 600).
#
# Options (environment variable in brackets, default after it):
#   --socket PATH      [KERNEL_CLIENT_SOCKET]        the server's Unix socket
#   --export NAME[:N]                                an export, over N connections
#                                                    (default 1); repeatable
#   --file-mib M       [KERNEL_CLIENT_FILE_MIB 8]    MiB in each file written
#   --cpus N           [KERNEL_CLIENT_CPUS 1]        guest CPUs (see below)
#   --memory M         [KERNEL_CLIENT_MEMORY 512]    guest RAM in MiB
#   --timeout S        [KERNEL_CLIENT_TIMEOUT 300]   deadline from qemu's start to
#                                                    its exit (killed then)
#   --cache DIR        [KERNEL_CLIENT_CACHE <target dir>/kernel-client-cache]
#                                                    packages, kernel, initramfs
#   --work DIR         [KERNEL_CLIENT_WORK a new temporary directory] console.log,
#                                                    qemu.log, host copies
#   --no-host-check                                  skip the checks from the host
#   --prepare                                        build kernel and initramfs
#                                                    into the cache, then exit
#   --keep             [KEEP_WORKDIR 0]              keep the temporary work directory
#
# <target dir> is CARGO_TARGET_DIR, or target/ in the repository.
#
# CPUs: the kernel gives an nbd device one hardware queue per connection, at
# most one per CPU, so with one CPU only the first of an export's N
# connections carries requests (the others are negotiated, handed to the
# kernel and disconnected, and must have carried their handshake). With more
# CPUs every queue's connection must carry at least 1 MiB; but under TCG with
# 4 CPUs, data qemu has taken from the server's socket now and then never
# reaches the guest's reader on its virtio-serial port (a request then waits
# for the kernel's 30 s timeout, and the run fails), so the default is 1.
#
# Needs qemu-system-x86_64 10.x and qboot (qemu-system-x86 from
# bookworm-backports), apt-get, apt-cache, dpkg-deb, /usr/bin/python3 and
# ldd; for the host checks nbdinfo, nbdcopy, e2fsck and debugfs
# (scripts/install-deps.sh installs them all). qemu is stopped by its pid
# when the script ends; every wait has a deadline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"

SOCKET=${KERNEL_CLIENT_SOCKET:-}
FILE_MIB=${KERNEL_CLIENT_FILE_MIB:-8}
CPUS=${KERNEL_CLIENT_CPUS:-1}
MEMORY=${KERNEL_CLIENT_MEMORY:-512}
TIMEOUT=${KERNEL_CLIENT_TIMEOUT:-300}
CACHE=${KERNEL_CLIENT_CACHE:-}
WORK=${KERNEL_CLIENT_WORK:-}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
HOST_CHECK=1
PREPARE=0
EXPORTS=()

say() { echo "kernel-client: $*"; }
note() { echo "kernel-client: $*" >&2; }
die() {
	note "$*"
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}
while (($#)); do
	case "$1" in
	--socket) SOCKET=$2; shift ;;
	--export) EXPORTS+=("$2"); shift ;;
	--file-mib) FILE_MIB=$2; shift ;;
	--cpus) CPUS=$2; shift ;;
	--memory) MEMORY=$2; shift ;;
	--timeout) TIMEOUT=$2; shift ;;
	--cache) CACHE=$2; shift ;;
	--work) WORK=$2; shift ;;
	--no-host-check) HOST_CHECK=0 ;;
	--prepare) PREPARE=1 ;;
	--keep) KEEP_WORKDIR=1 ;;
	-h | --help) usage 0 ;;
	*) echo "kernel-client: unknown option $1" >&2; usage 2 >&2 ;;
	esac
	shift
done

for n in FILE_MIB CPUS MEMORY TIMEOUT; do
	[[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "${n,,} must be a positive number, not '${!n}'"
done
names=()
conns=()
if ((!PREPARE)); then
	[[ -n $SOCKET ]] || die "--socket is required (--help for the options)"
	[[ -S $SOCKET ]] || die "$SOCKET is not a socket"
	((${#EXPORTS[@]})) || die "at least one --export is required"
	((${#EXPORTS[@]} <= 16)) || die "at most 16 exports (the nbd module's default device count)"
	for e in "${EXPORTS[@]}"; do
		name=${e%%:*}
		n=1
		[[ $e == *:* ]] && n=${e##*:}
		[[ $name =~ ^[A-Za-z0-9._@/-]+$ ]] || die "export name '$name' has characters the kernel command line cannot carry"
		if ! [[ $n =~ ^[1-9][0-9]*$ ]] || ((n > 16)); then
			die "--export $e: connections must be 1 to 16"
		fi
		names+=("$name")
		conns+=("$n")
	done
fi

need=(qemu-system-x86_64 apt-get apt-cache dpkg-deb ldd sha256sum timeout)
((HOST_CHECK && !PREPARE)) && need+=(nbdinfo nbdcopy e2fsck debugfs)
for tool in "${need[@]}"; do
	command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
done
[[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 is missing"
QBOOT=/usr/share/qemu/qboot.rom
[[ -f $QBOOT ]] || die "$QBOOT is missing (qemu-system-x86 from bookworm-backports; scripts/install-deps.sh)"

if [[ -z $CACHE ]]; then
	target="${CARGO_TARGET_DIR:-$root/target}"
	[[ $target == /* ]] || target="$root/$target"
	CACHE="$target/kernel-client-cache"
fi
mkdir -p "$CACHE/debs"
CACHE="$(cd "$CACHE" && pwd)"

# ------------------------------------------------------------ packages --
# From apt's lists (no network; each apt-cache run reads them all, so they
# are asked once): the kernel the metapackage depends on, the library
# packages the tools depend on directly (first alternatives, libc6 left to
# the host), and every package's candidate version.
tools=(busybox-static nbd-client socat e2fsprogs)
records=$(apt-cache show --no-all-versions linux-image-amd64 "${tools[@]}" 2>/dev/null) ||
	die "apt has no record of linux-image-amd64 or ${tools[*]} (run apt-get update first)"
# depends PACKAGE: the first alternative of each of its (Pre-)Depends.
depends() {
	awk -v RS= -v p="$1" '$0 ~ "(^|\n)Package: " p "(\n|$)"' <<<"$records" |
		sed -n 's/^\(Pre-\)\{0,1\}Depends: //p' | tr ',' '\n' | sed 's/^ *//; s/[ |].*//'
}
kernel_pkg=$(depends linux-image-amd64 | grep '^linux-image-' | head -n 1)
[[ -n $kernel_pkg ]] || die "cannot tell which kernel linux-image-amd64 depends on (run apt-get update first)"
packages=("$kernel_pkg" "${tools[@]}")
for p in nbd-client socat e2fsprogs; do
	mapfile -t -O "${#packages[@]}" packages < <(depends "$p" | grep '^lib' | grep -vx 'libc6')
done
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | awk '!seen[$0]++')
declare -A version
while read -r p v; do
	version[$p]=$v
done < <(apt-cache policy "${packages[@]}" 2>/dev/null |
	awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } /^  Candidate:/ { print p, $2 }')
for p in "${packages[@]}"; do
	[[ -n ${version[$p]:-} && ${version[$p]} != "(none)" ]] ||
		die "apt has no candidate for $p (run apt-get update first)"
done
deb_file() { echo "$CACHE/debs/${1}_${version[$1]//:/%3a}.deb"; }

fetch_debs() {
	local missing=() p dl f
	for p in "${packages[@]}"; do
		[[ -f $(deb_file "$p") ]] || missing+=("$p=${version[$p]}")
	done
	((${#missing[@]})) || return 0
	note "downloading ${missing[*]}"
	dl=$(mktemp -d "$CACHE/download.XXXXXX")
	local sandbox=()
	[[ $(id -u) == 0 ]] && sandbox=(-o APT::Sandbox::User=root)
	(cd "$dl" && apt-get download -qq "${sandbox[@]}" "${missing[@]}") || {
		rm -rf "$dl"
		die "apt-get download ${missing[*]} failed"
	}
	for p in "${packages[@]}"; do
		[[ -f $(deb_file "$p") ]] && continue
		f=$(compgen -G "$dl/${p}_*.deb" | head -n 1) || true
		[[ -n $f ]] || {
			rm -rf "$dl"
			die "apt-get download left no package file for $p"
		}
		mv -f "$f" "$(deb_file "$p")"
	done
	rm -rf "$dl"
}

# ---------------------------------------------------------- the kernel --
# vmlinux from a bzImage: the first xz, gzip or zstd stream in it that
# decompresses to an ELF file (what the kernel's scripts/extract-vmlinux does).
extract_vmlinux() {
	/usr/bin/python3 - "$1" "$2" <<'PY'
import gzip, lzma, sys, zlib
data = open(sys.argv[1], "rb").read()

def xz(b):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b)

def gz(b):
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)

def zst(b):
    import subprocess
    return subprocess.run(["zstd", "-dc"], input=b, capture_output=True).stdout

for magic, inflate in ((b"\xfd7zXZ\x00", xz), (b"\x1f\x8b\x08", gz), (b"\x28\xb5\x2f\xfd", zst)):
    pos = data.find(magic)
    while pos >= 0:
        try:
            out = inflate(data[pos:])
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
        pos = data.find(magic, pos + 1)
sys.exit("no compressed ELF kernel found in " + sys.argv[1])
PY
}

# ------------------------------------------------------- the guest init --
# PID 1 of the guest. Reads kc.exports=NAME:N,... and kc.mib=M from the
# kernel command line; ports are named e<export>c<connection>.
write_init() {
	cat >"$1" <<'INIT'
#!/bin/busybox sh
# PID 1 of the guest booted by scripts/kernel-client-test.sh.
# Busybox runs its own applet for a name it knows (mke2fs, say) even where
# PATH has the real program: those are called by their full paths.
PATH=/sbin:/usr/sbin:/usr/bin:/bin
export PATH
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /run/kc

STEP_SECS=180
say() { echo "kernel-client: $*"; }
now() { cut -d ' ' -f 1 /proc/uptime; }
finish() {
	say "uptime $(now) s"
	if [ "$1" = 0 ]; then say "ALL PASS"; else say "FAILED"; fi
	sync
	poweroff -f
	sleep 60
}
# Runs a step with a deadline; its output is in $out. On failure, says so
# (with the output and the kernel's last messages) and returns 1.
step() {
	name=$1
	shift
	if out=$(timeout "$STEP_SECS" "$@" 2>&1); then
		return 0
	fi
	say "FAIL export=$export step=$name"
	echo "$out" | tail -n 30
	dmesg | tail -n 30
	return 1
}
# Waits (boundedly) until the shell condition $2 holds.
wait_for() {
	local tries=0
	until eval "$2"; do
		tries=$((tries + 1))
		if [ "$tries" -gt 600 ]; then
			say "FAIL export=$export step=$1 (not within 60 s)"
			return 1
		fi
		sleep 0.1
	done
}

exports=
mib=8
for word in $(cat /proc/cmdline); do
	case $word in
	kc.exports=*) exports=${word#kc.exports=} ;;
	kc.mib=*) mib=${word#kc.mib=} ;;
	esac
done
export=-
say "booted in $(now) s, $(nproc) CPUs, kernel $(uname -r)"

while read -r module; do
	step "insmod $module" insmod "/lib/modules/$module" || finish 1
done </etc/kc-modules

total=0
for e in $(echo "$exports" | tr ',' ' '); do
	total=$((total + ${e##*:}))
done
wait_for virtio-ports '[ "$(ls /sys/class/virtio-ports 2>/dev/null | wc -l)" -ge "$total" ]' || finish 1
for p in /sys/class/virtio-ports/*; do
	echo "/dev/${p##*/}" >"/run/kc/port-$(cat "$p/name")"
done

# One export: index, name, connections. Returns 1 on the first failure.
check_export() {
	i=$1
	export=$2
	n=$3
	dev=/dev/nbd$i
	sock=/run/kc/e$i.sock
	mnt=/mnt/e$i
	mkdir -p "$mnt"
	: >"/run/kc/e$i.ports"
	c=0
	while [ "$c" -lt "$n" ]; do
		[ -f "/run/kc/port-e${i}c$c" ] || {
			say "FAIL export=$export step=ports (no port e${i}c$c)"
			return 1
		}
		cat "/run/kc/port-e${i}c$c" >>"/run/kc/e$i.ports"
		c=$((c + 1))
	done
	/usr/bin/socat UNIX-LISTEN:"$sock",fork,unlink-early EXEC:"/bin/kc-port /run/kc/e$i.ports",nofork &
	wait_for bridge "[ -S $sock ]" || return 1
	multi=
	[ "$n" -gt 1 ] && multi="-C $n"
	step connect /sbin/nbd-client -unix "$sock" "$dev" -N "$export" $multi || return 1
	wait_for size "[ \"\$(cat /sys/block/nbd$i/size)\" -gt 0 ]" || return 1
	bytes=$(($(cat "/sys/block/nbd$i/size") * 512))
	queues=$(ls -d /sys/kernel/debug/block/nbd$i/hctx* | wc -l)
	say "connected export=$export device=$dev bytes=$bytes connections=$n queues=$queues at=$(now)s"
	# blk-mq gives the device one hardware queue per connection, at most
	# one per CPU; each queue sends its requests on its own connection.
	want=$n
	[ "$(nproc)" -lt "$want" ] && want=$(nproc)
	[ "$queues" = "$want" ] || {
		say "FAIL export=$export step=queues ($queues hardware queues for $n connections)"
		return 1
	}
	step mkfs /sbin/mke2fs -t ext4 -q -F "$dev" || return 1
	step mount mount -t ext4 "$dev" "$mnt" || return 1

	files=$n
	[ "$files" -lt 2 ] && files=2
	cpus=$(nproc)
	# Each file written and synced from its own CPU: its requests go out on
	# that CPU's hardware queue, which is one connection.
	f=0
	pids=
	while [ "$f" -lt "$files" ]; do
		timeout "$STEP_SECS" taskset -c $((f % cpus)) \
			dd if=/dev/urandom of="$mnt/f$f" bs=1M count="$mib" iflag=fullblock conv=fsync 2>"/run/kc/e$i.dd$f" &
		pids="$pids $!"
		f=$((f + 1))
	done
	f=0
	for pid in $pids; do
		wait "$pid" || {
			say "FAIL export=$export step=write f$f"
			cat "/run/kc/e$i.dd$f"
			return 1
		}
		f=$((f + 1))
	done
	step checksum sha256sum "$mnt"/f* || return 1
	echo "$out" | sed "s| $mnt/| |" >"/run/kc/e$i.sums"
	step sync sync || return 1
	step umount umount "$mnt" || return 1
	echo 3 >/proc/sys/vm/drop_caches
	step remount mount -t ext4 "$dev" "$mnt" || return 1
	f=0
	pids=
	while [ "$f" -lt "$files" ]; do
		(timeout "$STEP_SECS" taskset -c $((f % cpus)) sha256sum "$mnt/f$f" |
			sed "s| $mnt/| |" >"/run/kc/e$i.read$f") &
		pids="$pids $!"
		f=$((f + 1))
	done
	for pid in $pids; do wait "$pid"; done
	if ! cat /run/kc/e"$i".read* | cmp -s - "/run/kc/e$i.sums"; then
		say "FAIL export=$export step=verify (checksums after remount differ)"
		cat "/run/kc/e$i.sums" /run/kc/e"$i".read*
		return 1
	fi
	say "verified export=$export files=$files mib=$mib at=$(now)s"
	step rm rm "$mnt/f0" || return 1
	step sync sync || return 1
	step fstrim fstrim -v "$mnt" || return 1
	trimmed=$(echo "$out" | sed -n 's/.*: \([0-9]*\) bytes trimmed.*/\1/p')
	say "fstrim export=$export trimmed=${trimmed:-?}"
	[ "${trimmed:-0}" -gt 0 ] || {
		say "FAIL export=$export step=fstrim (nothing trimmed: $out)"
		return 1
	}
	step umount umount "$mnt" || return 1
	step e2fsck /sbin/e2fsck -fn "$dev" || return 1
	# A request without a reply for 30 s is retried by the kernel (on
	# another connection, the first one shut): it must not happen here.
	if dmesg | grep -iE "nbd$i\b.*(timed out|stuck|dead)"; then
		say "FAIL export=$export step=timeouts (the kernel timed a request out)"
		return 1
	fi
	# Bytes each connection carried, both ways: what its two relays wrote.
	carried=
	for port in $(cat "/run/kc/e$i.ports"); do
		bytes=0
		for p in $(cat "/run/kc/pids-${port##*/}" 2>/dev/null); do
			bytes=$((bytes + $(sed -n 's/^wchar: //p' "/proc/$p/io" 2>/dev/null || echo 0)))
		done
		carried="$carried $bytes"
	done
	say "carried export=$export bytes-per-connection=$(echo $carried | tr ' ' ',')"
	# Connections come in the order of the ports claimed, which is the
	# order of the kernel's queues: each connection with a queue carried
	# requests (MiB of them), each without one at least its handshake.
	c=0
	for b in $carried; do
		least=1
		[ "$c" -lt "$want" ] && least=1048576
		[ "$b" -ge "$least" ] || {
			say "FAIL export=$export step=multi-conn (connection $c carried $b bytes)"
			return 1
		}
		c=$((c + 1))
	done
	[ "$c" = "$n" ] || {
		say "FAIL export=$export step=multi-conn ($c connections counted, not $n)"
		return 1
	}
	while read -r sum file; do
		[ "$file" = f0 ] || say "file export=$export path=/$file sha256=$sum"
	done <"/run/kc/e$i.sums"
	step disconnect /sbin/nbd-client -d "$dev" || return 1
	wait_for disconnect "[ \"\$(cat /sys/block/nbd$i/size)\" = 0 ]" || return 1
	say "PASS export=$export connections=$n at=$(now)s"
}

failed=0
i=0
for e in $(echo "$exports" | tr ',' ' '); do
	if ! check_export "$i" "${e%:*}" "${e##*:}"; then
		failed=1
		break
	fi
	i=$((i + 1))
done
finish "$failed"
INIT
}

# One connection made to an export's Unix socket in the guest (socat's
# stdin and stdout): claims the next port of the export nobody has claimed
# (mkdir is atomic) and bridges the connection to it, one socat for each
# direction. A single relay for both would deadlock: blocked writing a
# request to the port while the host waits for it to read replies.
write_port_bridge() {
	cat >"$1" <<'PORT'
#!/bin/sh
for port in $(cat "$1"); do
	if mkdir "/run/kc/claimed-${port##*/}" 2>/dev/null; then
		# A command started with & reads /dev/null unless told otherwise:
		# the connection is passed as fd 4 (and 5), the port as fd 3.
		exec 3<>"$port" 4<&0 5>&1 0</dev/null 1>/dev/null
		/usr/bin/socat -u -b 131072 FD:4 FD:3 &
		up=$!
		/usr/bin/socat -u -b 131072 FD:3 FD:5 &
		echo "$up $!" >"/run/kc/pids-${port##*/}"
		exec 3>&- 4<&- 5>&-
		wait
		exit 0
	fi
done
echo "kc-port: every port of $1 is taken" >&2
exit 1
PORT
}

# ----------------------------------------------------- build and cache --
key=$({
	for p in "${packages[@]}"; do echo "$p=${version[$p]}"; done
	sha256sum "$self"
} | sha256sum | cut -c 1-16)
kernel_dir="$CACHE/kernel-${version[$kernel_pkg]//:/%3a}"
guest_dir="$CACHE/guest-$key"

build_guest() {
	local build x kver rootfs m dep
	fetch_debs
	build=$(mktemp -d "$CACHE/build.XXXXXX")
	x=$build/x
	rootfs=$build/root
	note "building the kernel and initramfs in $build"
	for p in "${packages[@]}"; do dpkg-deb -x "$(deb_file "$p")" "$x"; done
	kver=$(ls "$x/lib/modules")
	[[ $(wc -w <<<"$kver") == 1 ]] || die "expected one kernel in $kernel_pkg, found: $kver"

	if [[ ! -f $kernel_dir/vmlinux ]]; then
		mkdir -p "$build/kernel"
		extract_vmlinux "$x/boot/vmlinuz-$kver" "$build/kernel/vmlinux"
		mv -T "$build/kernel" "$kernel_dir" 2>/dev/null || true
	fi

	# Modules and, from modules.dep, everything they depend on, in load order.
	"$x/bin/busybox" depmod -b "$x" "$kver"
	declare -A deps=() loaded=()
	while IFS=: read -r m dep; do
		deps[${m##*/}]="$m:$dep"
	done <"$x/lib/modules/$kver/modules.dep"
	order=()
	add_module() { # NAME.ko
		local entry=${deps[$1]:-} path d
		[[ -n $entry ]] || die "module $1 is not in $kernel_pkg's modules.dep"
		[[ -n ${loaded[$1]:-} ]] && return 0
		loaded[$1]=1
		path=${entry%%:*}
		for d in ${entry#*:}; do add_module "${d##*/}"; done
		order+=("$path")
	}
	# crc32c for ext4's metadata checksums (asked for by name at mount time;
	# the guest has no modprobe to load it then).
	for m in crc32c_generic.ko ext4.ko virtio_pci.ko virtio_console.ko nbd.ko; do
		add_module "$m"
	done
	mkdir -p "$rootfs"/{bin,sbin,usr/bin,etc,proc,sys,dev,run,mnt,lib/modules,lib64,lib/x86_64-linux-gnu}
	: >"$rootfs/etc/kc-modules"
	for m in "${order[@]}"; do
		local src=$x/lib/modules/$kver/$m base
		base=$(basename "$m")
		case $m in
		*.ko.xz) xz -dc "$src" >"$rootfs/lib/modules/${base%.xz}"; base=${base%.xz} ;;
		*.ko.zst) zstd -qdc "$src" >"$rootfs/lib/modules/${base%.zst}"; base=${base%.zst} ;;
		*) cp "$src" "$rootfs/lib/modules/$base" ;;
		esac
		echo "$base" >>"$rootfs/etc/kc-modules"
	done

	cp "$x/bin/busybox" "$rootfs/bin/busybox"
	cp "$x/sbin/nbd-client" "$x/sbin/mke2fs" "$x/sbin/e2fsck" "$rootfs/sbin/"
	cp "$x/usr/bin/socat" "$rootfs/usr/bin/"
	cp "$x/etc/mke2fs.conf" "$rootfs/etc/"
	# Shared libraries: from the extracted packages first, else the host's.
	local libpath=$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu lib
	for b in sbin/nbd-client sbin/mke2fs sbin/e2fsck usr/bin/socat; do
		if LD_LIBRARY_PATH=$libpath ldd "$x/$b" | grep -q 'not found'; then
			die "$b needs libraries found neither in the packages nor on the host: $(LD_LIBRARY_PATH=$libpath ldd "$x/$b" | grep 'not found')"
		fi
		while read -r lib; do
			case $lib in
			/lib64/*) cp -L "$lib" "$rootfs/lib64/" ;;
			/*) cp -L "$lib" "$rootfs/lib/x86_64-linux-gnu/" ;;
			esac
		done < <(LD_LIBRARY_PATH=$libpath ldd "$x/$b" | awk '$2 == "=>" { print $3; next } $1 ~ /^\// { print $1 }')
	done
	write_init "$rootfs/init"
	write_port_bridge "$rootfs/bin/kc-port"
	chmod +x "$rootfs/init" "$rootfs/bin/kc-port"
	{
		for p in "${packages[@]}"; do echo "$p ${version[$p]}"; done
		echo "modules ${order[*]}"
	} >"$rootfs/etc/kc-manifest"

	mkdir -p "$build/guest"
	(cd "$rootfs" && find . | LC_ALL=C sort | "$x/bin/busybox" cpio -o -H newc 2>/dev/null) >"$build/guest/initramfs.cpio"
	cp "$rootfs/etc/kc-manifest" "$build/guest/manifest"
	ln -s "$kernel_dir/vmlinux" "$build/guest/vmlinux"
	# Another run may have built the same meanwhile: the first one stays.
	mv -T "$build/guest" "$guest_dir" 2>/dev/null || true
	rm -rf "$build"
	[[ -f $guest_dir/initramfs.cpio && -f $kernel_dir/vmlinux ]] || die "building the guest failed"
	note "cached in $guest_dir ($(du -h "$guest_dir/initramfs.cpio" | cut -f 1) initramfs, $(du -h "$kernel_dir/vmlinux" | cut -f 1) vmlinux)"
	# What older package versions or an older script left goes.
	local keep=() f
	for p in "${packages[@]}"; do keep+=("$(deb_file "$p")"); done
	for f in "$CACHE"/debs/*.deb "$CACHE"/guest-* "$CACHE"/kernel-*; do
		[[ -e $f && $f != "$guest_dir" && $f != "$kernel_dir" ]] || continue
		[[ " ${keep[*]} " == *" $f "* ]] && continue
		rm -rf "$f"
	done
}

if [[ ! -f $guest_dir/initramfs.cpio || ! -f $kernel_dir/vmlinux ]]; then
	rm -rf "$guest_dir"
	build_guest
fi
if ((PREPARE)); then
	say "prepared $guest_dir"
	exit 0
fi

# --------------------------------------------------------------- boot --
if [[ -n $WORK ]]; then
	mkdir -p "$WORK"
	WORK="$(cd "$WORK" && pwd)"
	own_work=0
else
	WORK=$(mktemp -d /tmp/kernel-client.XXXXXX)
	own_work=1
fi
qemu_pid=
cleanup() {
	local rc=$?
	if [[ -n $qemu_pid ]]; then
		kill "$qemu_pid" 2>/dev/null || true
		wait "$qemu_pid" 2>/dev/null || true
	fi
	rm -f "$WORK"/*.raw
	if ((own_work)); then
		if [[ $KEEP_WORKDIR == 1 || $rc != 0 ]]; then
			note "kept $WORK"
		else
			rm -rf "$WORK"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

console_raw=$WORK/console.raw
console=$WORK/console.log
: >"$console_raw"
# qemu option values: a comma is written twice.
q() { echo "${1//,/,,}"; }
spec=()
args=(
	qemu-system-x86_64
	-machine pc -accel tcg -cpu max -smp "$CPUS" -m "$MEMORY"
	-bios "$QBOOT" -kernel "$guest_dir/vmlinux" -initrd "$guest_dir/initramfs.cpio"
	-nodefaults -no-user-config -display none -monitor none -no-reboot
	-chardev "file,id=console,path=$(q "$console_raw")" -serial chardev:console
	-device "virtio-serial-pci,id=vs"
)
for i in "${!names[@]}"; do
	spec+=("${names[$i]}:${conns[$i]}")
	for ((c = 0; c < conns[i]; c++)); do
		args+=(
			-chardev "socket,id=e${i}c$c,path=$(q "$SOCKET")"
			-device "virtserialport,bus=vs.0,chardev=e${i}c$c,name=e${i}c$c"
		)
	done
done
exports_arg=$(IFS=,; echo "${spec[*]}")
args+=(-append "console=ttyS0 quiet panic=-1 kc.exports=$exports_arg kc.mib=$FILE_MIB")
shown=
for a in "${args[@]}"; do
	[[ $a == *' '* ]] && a="'$a'"
	shown+="$a "
done
note "qemu: timeout -k 10 $TIMEOUT $shown"

start=$(date +%s.%N)
timeout -k 10 "$TIMEOUT" "${args[@]}" </dev/null >"$WORK/qemu.log" 2>&1 &
qemu_pid=$!
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
tr -d '\r' <"$console_raw" >"$console"
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
grep -a '^kernel-client: ' "$console" || true
if ((rc == 124)); then
	note "the guest did not power off within $TIMEOUT s; console tail:"
	tail -n 40 "$console" >&2
	exit 1
fi
((rc == 0)) || {
	note "qemu exited with $rc: $(tail -n 20 "$WORK/qemu.log")"
	tail -n 40 "$console" >&2
	exit 1
}
say "guest ran $secs s, from qemu's start to its power-off"

failed=0
for name in "${names[@]}"; do
	grep -aq "^kernel-client: PASS export=$name " "$console" || failed=1
done
grep -aq '^kernel-client: ALL PASS' "$console" || failed=1
if ((failed)); then
	note "the guest did not pass every export; console tail:"
	tail -n 60 "$console" >&2
	exit 1
fi

# --------------------------------------------------- checks from the host --
((HOST_CHECK)) || exit 0
for i in "${!names[@]}"; do
	name=${names[$i]}
	uri="nbd+unix:///$name?socket=$SOCKET"
	guest_bytes=$(sed -n "s|^kernel-client: connected export=$name .*bytes=\([0-9]*\).*|\1|p" "$console")
	host_bytes=$(nbdinfo --size "$uri")
	[[ $guest_bytes == "$host_bytes" ]] || die "host FAIL export=$name: the guest saw $guest_bytes bytes, nbdinfo $host_bytes"
	raw=$WORK/e$i.raw
	nbdcopy "$uri" "$raw"
	e2fsck -fn "$raw" >"$WORK/e$i.e2fsck" 2>&1 || die "host FAIL export=$name: e2fsck -fn: $(cat "$WORK/e$i.e2fsck")"
	files=0
	while read -r path sum; do
		got=$(debugfs -R "cat $path" "$raw" 2>/dev/null | sha256sum | cut -d ' ' -f 1)
		[[ $got == "$sum" ]] || die "host FAIL export=$name: $path reads back as $got, the guest wrote $sum"
		files=$((files + 1))
	done < <(sed -n "s|^kernel-client: file export=$name path=\([^ ]*\) sha256=\([0-9a-f]*\)\$|\1 \2|p" "$console" | tr -d '\r')
	((files > 0)) || die "host FAIL export=$name: the guest listed no file"
	rm -f "$raw"
	say "host PASS export=$name bytes=$host_bytes files=$files (nbdcopy, e2fsck -fn, debugfs)"
done
