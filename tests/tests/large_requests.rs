//! Requests as large as the server takes, through `blockseal serve` and an
//! encrypted volume: the reference nbd-tester-client's huge integrity test
//! sends 42 MB reads and writes whatever the advertised maximum, which the
//! server refused with EINVAL while it took at most 32 MiB.

use std::process::Command;

use blockseal_test_support::{PYTHON, require_python_nbd, run_ok};
use blockseal_tests::ServerProcess;

/// Writes (`write`) or checks (`check`) 42,000,000 pseudo-random bytes at a
/// byte offset that is not block aligned, in one request each, with libnbd's
/// strict mode relaxed so that it never refuses a request by the advertised
/// maximum (newer libnbd does in strict mode).
const SCRIPT: &str = r#"
import random, sys, nbd
mode, uri = sys.argv[1], sys.argv[2]
N = 42_000_000
OFFSET = 5_000_001
data = random.Random(42).randbytes(N)
h = nbd.NBD()
h.set_strict_mode(h.get_strict_mode() & ~getattr(nbd, "STRICT_PAYLOAD", 0))
h.connect_uri(uri)
maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
assert maximum == 64 * 1024 * 1024, maximum
if mode == "write":
    h.pwrite(data, OFFSET)
    h.flush()
assert h.pread(N, OFFSET) == data, "read back differs"
h.shutdown()
print(mode, "ok")
"#;

#[test]
fn a_42_mb_write_and_read_in_one_request_each_survive_a_restart() {
    require_python_nbd();
    let mut server = ServerProcess::demo("64M");
    let uri = server.uri("demo/disk");
    let out = run_ok(Command::new(PYTHON).args(["-c", SCRIPT, "write", &uri]));
    assert!(out.contains("write ok"), "{out}");
    server.stop();
    server.restart();
    let out = run_ok(Command::new(PYTHON).args(["-c", SCRIPT, "check", &uri]));
    assert!(out.contains("check ok"), "{out}");
}
