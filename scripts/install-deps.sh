#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the NBD peers the
# interop tests drive (libnbd tools, python3-libnbd, qemu-utils, fio, nbdkit,
# nbdfuse), filesystem tools, openssl for test certificates, systemd-analyze for
# the service unit, man-db to render the manual pages, rustfmt/clippy and
# cargo-fuzz. Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo || need_apt+=(libnbd-bin)
have nbdfuse || need_apt+=(nbdfuse)
have nbdkit || need_apt+=(nbdkit)
have fio || need_apt+=(fio)
have qemu-io || need_apt+=(qemu-utils)
have mkfs.ext4 || need_apt+=(e2fsprogs)
have fusermount3 || need_apt+=(fuse3)
have openssl || need_apt+=(openssl)
have systemd-analyze || need_apt+=(systemd)
have man || need_apt+=(man-db)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_apt+=(python3-libnbd)

if ((${#need_apt[@]})); then
  echo "install-deps: apt-get install ${need_apt[*]}"
  if [[ $(id -u) != 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The fio nbd engine is what the benchmarks and interop tests use.
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "install-deps: this fio has no nbd engine" >&2; exit 1; }

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
have cargo-fuzz || cargo install cargo-fuzz --locked --version 0.13.2
echo "install-deps: ok"
