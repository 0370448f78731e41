# Sourced by scripts/flush-load.sh and scripts/volume-memory.sh: a fresh store
# of PBX-style volumes made with the CLI, served from a configuration file.
#
#   make_pbx_store BIN WORK BACKEND VOLUMES SIZE MAX_HANDSHAKES
#
# writes WORK/blockseal.toml (store in WORK/store, master key WORK/master.key,
# Unix socket WORK/nbd.sock, connection caps admitting one client per volume),
# creates the key, tenant `pbx` and volumes pbx/v0000 ... of SIZE each, and
# prints the seconds the volumes took to create.

make_pbx_store() {
	local bin=$1 work=$2 backend=$3 volumes=$4 size=$5 handshakes=$6
	local cfg="$work/blockseal.toml"
	cat >"$cfg" <<CONFIG
data_dir = "store"
metadata_backend = "$backend"

[master_key]
file = "master.key"

[unix]
path = "nbd.sock"

[metrics]
# Loopback, port picked at start (the ready line names it).
address = "127.0.0.1:0"

[limits]
# Every volume's client may be connected at once.
max_connections = $((volumes + 16))
max_connections_per_tenant = $((volumes + 16))
max_handshakes = $handshakes
CONFIG
	"$bin" key init --out "$work/master.key" >/dev/null
	"$bin" tenant create pbx --config "$cfg" >/dev/null
	local t0 i name
	t0=$(date +%s.%N)
	for ((i = 0; i < volumes; i++)); do
		printf -v name 'v%04d' "$i"
		"$bin" volume create "pbx/$name" --size "$size" --config "$cfg" >/dev/null
	done
	python3 -c "print(round($(date +%s.%N) - $t0, 1))"
}
