//! fio's nbd engine: four jobs, each on its own connection and offset range,
//! random reads and writes with crc32c verification, for a few seconds.

use std::process::Command;

use blockseal_test_support::{require, run_ok};
use blockseal_tests::ServerProcess;

#[test]
fn random_read_write_with_verification() {
    require("fio");
    let server = ServerProcess::demo("64M");
    let uri = server.uri("demo/disk");
    // Run in the server's temporary directory: fio leaves verify state files in
    // its working directory.
    let out = run_ok(Command::new("fio").current_dir(&server.dir).args([
        "--name=blockseal",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=4",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_backlog=256",
        "--verify_state_save=0",
        "--time_based",
        "--runtime=3",
        "--group_reporting",
    ]));
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
}
