//! The load test's short version (`scripts/load-test.sh --smoke`): 300
//! volumes, 60 recording streams and 5 readers through libnbd for a few
//! seconds. It checks that the whole harness works on this machine (the
//! server, the volumes, every stream and reader, the measurements) and that
//! the streams got what they asked for; the latency goals are measured by the
//! full run, a benchmark (docs/PERFORMANCE.md, "Load"), never asserted here.

use std::process::Command;

use blockseal_test_support::{require, require_python_nbd, run_ok, temp_dir};
use blockseal_tests::binary;

#[test]
fn load_test_smoke() {
    require("python3");
    require_python_nbd();
    let tmp = temp_dir();
    let json = tmp.path().join("load.json");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let table = run_ok(
        Command::new(format!("{root}/scripts/load-test.sh"))
            .arg("--smoke")
            .arg("--bin")
            .arg(binary())
            .arg("--json")
            .arg(&json),
    );
    eprintln!("{table}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the load test writes its JSON"))
            .expect("the load test's JSON");
    let run = &report["runs"][0];
    let number = |path: &[&str]| -> f64 {
        let mut v = run;
        for key in path {
            v = &v[*key];
        }
        v.as_f64()
            .unwrap_or_else(|| panic!("no number at {path:?}: {run}"))
    };
    assert_eq!(number(&["streams"]), 60.0);
    assert_eq!(number(&["errors"]), 0.0);
    // 60 streams of a page every 160 ms for 8 s, a FLUSH every 31 writes
    // (5 s); 5 readers at 256 KiB/s in 64 KiB reads.
    let seconds = number(&["seconds"]);
    assert!(seconds >= 8.0, "{run}");
    let writes = number(&["writes"]);
    assert!(writes >= 60.0 * 6.25 * 8.0 * 0.9, "{writes} writes: {run}");
    assert!(number(&["flushes"]) >= 60.0, "{run}");
    assert!(number(&["reads"]) >= 5.0 * 4.0 * 8.0 * 0.9, "{run}");
    assert!(number(&["connect_ms", "samples"]) > 0.0, "{run}");
    for path in [
        &["write_ms", "p99"][..],
        &["flush_ms", "p99"],
        &["read_ms", "p99"],
        &["server_cpu_cores"],
        &["server_peak_rss_mib"],
        &["server_fds_peak"],
    ] {
        assert!(number(path) > 0.0, "{path:?}: {run}");
    }
    assert!(table.contains("| 60 |"), "{table}");
}
