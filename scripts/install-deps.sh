#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the NBD peers the
# interop tests drive (libnbd tools, python3-libnbd, qemu-utils, fio, nbdkit,
# nbdfuse), qemu-system-x86 for the kernel client test, filesystem tools,
# openssl for test certificates, systemd-analyze for the service unit, man-db
# to render the manual pages, moto's S3 server (PyPI), rustfmt/clippy and
# cargo-fuzz. Safe to run
# again: it installs only what is missing.
#
# On Debian 12 (bookworm), qemu-system-x86 and qemu-utils come from
# bookworm-backports (10.x; bookworm's own qemu-system-x86 7.2 would replace a
# qemu-utils 10.x): the suite is added to apt's sources, on the mirror the
# machine's sources already use, when it is not there yet.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo || need_apt+=(libnbd-bin)
have nbdfuse || need_apt+=(nbdfuse)
have nbdkit || need_apt+=(nbdkit)
have fio || need_apt+=(fio)
have mkfs.ext4 || need_apt+=(e2fsprogs)
have fusermount3 || need_apt+=(fuse3)
have openssl || need_apt+=(openssl)
have systemd-analyze || need_apt+=(systemd)
have man || need_apt+=(man-db)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_apt+=(python3-libnbd)

# qemu: qemu-utils (qemu-img, qemu-io, qemu-nbd) and qemu-system-x86 of one
# version, with qboot (the kernel client test boots through it).
qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n 1; }
need_qemu=0
if ! have qemu-io || ! have qemu-system-x86_64 || [[ ! -f /usr/share/qemu/qboot.rom ]] ||
  [[ $(qemu_major qemu-img) != "$(qemu_major qemu-system-x86_64)" ]]; then
  need_qemu=1
fi
codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"')

if [[ $(id -u) != 0 ]]; then SUDO=sudo; else SUDO=; fi
apt_install() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }

if ((need_qemu)) && [[ $codename == bookworm ]] &&
  ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The mirror of the machine's own bookworm sources (deb822 or one-line).
  mirror=$(awk -v RS= '/(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ && match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/) {
      u = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", u); print u; exit }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $mirror ]] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "install-deps: adding bookworm-backports ($mirror) to apt's sources"
  echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
fi

if ((${#need_apt[@]} || need_qemu)); then
  $SUDO apt-get update -qq
fi
if ((${#need_apt[@]})); then
  echo "install-deps: apt-get install ${need_apt[*]}"
  apt_install "${need_apt[@]}"
fi
if ((need_qemu)); then
  if [[ $codename == bookworm ]]; then
    echo "install-deps: apt-get install -t bookworm-backports qemu-utils qemu-system-x86"
    apt_install -t bookworm-backports qemu-utils qemu-system-x86
  else
    echo "install-deps: apt-get install qemu-utils qemu-system-x86"
    apt_install qemu-utils qemu-system-x86
  fi
  [[ $(qemu_major qemu-img) == "$(qemu_major qemu-system-x86_64)" && -f /usr/share/qemu/qboot.rom ]] || {
    echo "install-deps: qemu-utils $(qemu_major qemu-img) and qemu-system-x86 $(qemu_major qemu-system-x86_64) differ, or qboot is missing" >&2
    exit 1
  }
fi

# The fio nbd engine is what the benchmarks and interop tests use.
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "install-deps: this fio has no nbd engine" >&2; exit 1; }

# moto's S3 server, which the object-storage tests start on loopback.
if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  echo "install-deps: pip install moto[server]"
  python3 -m pip install -q 'moto[server]>=5.2,<6' ||
    python3 -m pip install -q --user --break-system-packages 'moto[server]>=5.2,<6'
  python3 -c 'import moto.server, flask' || { echo "install-deps: moto's server does not import" >&2; exit 1; }
fi

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
have cargo-fuzz || cargo install cargo-fuzz --locked --version 0.13.2
echo "install-deps: ok"
