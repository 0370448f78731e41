#!/usr/bin/env bash
# Builds the Debian package of blockseal with cargo deb: the release binary,
# the systemd unit (packaging/blockseal.service, installed disabled), a
# starting configuration (/etc/blockseal/blockseal.toml, a conffile), the
# manual pages and the operations guide. The package's postinst creates the
# system user `blockseal`; removing the package never touches the store or
# the master key.
#
#   scripts/build-deb.sh            # target/debian/blockseal_<version>_amd64.deb
#
# Installs cargo-deb (crates.io, --locked) when it is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if ! cargo deb --version >/dev/null 2>&1; then
	echo "build-deb: installing cargo-deb"
	cargo install cargo-deb --locked
fi
cargo build --release --locked -p blockseal
target="${CARGO_TARGET_DIR:-$root/target}"
rm -rf "$root/target/man"
"$target/release/blockseal" manpages --out "$root/target/man" >/dev/null
cargo deb --no-build --locked -p blockseal "$@"
deb=$(ls -t "$target"/debian/blockseal_*.deb | head -n 1)
echo "build-deb: $deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,/Description:/p'
dpkg-deb --contents "$deb" | awk '{ print $6 }'
