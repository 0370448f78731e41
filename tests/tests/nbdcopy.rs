//! nbdcopy with four connections: a random 64 MiB file into the volume and back
//! out, checksums equal.

use std::process::Command;

use blockseal_test_support::{require_all, run_ok};
use blockseal_tests::{ServerProcess, random_file, sha256};

#[test]
fn copy_in_and_out_with_four_connections() {
    require_all(&["nbdcopy", "sha256sum"]);
    let server = ServerProcess::demo("64M");
    let uri = server.uri("demo/disk");
    let input = server.dir.join("in.raw");
    let output = server.dir.join("out.raw");
    random_file(&input, 64 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&input)
            .arg(&uri),
    );
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&uri)
            .arg(&output),
    );
    assert_eq!(sha256(&input), sha256(&output));
}
