//! I/O rate limits end to end: `blockseal limits` offline and through a
//! running server, a limit set online holding fio (nbd engine) to its rate
//! while another tenant runs unlimited, the overrides kept across a restart
//! and dropped with their volume, bad arguments refused, and a damaged limits
//! file stopping the server with its name.

use std::process::Command;

use blockseal_test_support::{require, run, temp_dir};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, cli_on, cli_on_fails, cli_on_ok, configure_host, fio_iops,
    fio_json, tenants_with_disks, text,
};

/// fio reading 4 KiB blocks at queue depth 8 for `secs` seconds on `export`;
/// its read IOPS.
fn read_iops(server: &ServerProcess, export: &str, secs: u32) -> f64 {
    let report = fio_json(
        &server.dir,
        &server.uri(export),
        &[
            "--name=reader",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=8",
            "--size=16M",
            "--time_based",
            &format!("--runtime={secs}"),
        ],
    );
    fio_iops(&report, "read")
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn limits_are_set_online_enforced_kept_and_forgotten() {
    require("fio");
    let tmp = temp_dir();
    let host = tmp.path().join("host");
    let config = configure_host(&host, None);
    let mut text_config = std::fs::read_to_string(&config).unwrap();
    text_config.push_str("\n[limits]\nvolume_bytes_per_sec = \"512M\"\n");
    std::fs::write(&config, text_config).unwrap();
    let store = StoreArg::Config(&config);
    tenants_with_disks(store, &["acme", "other"], "64M");

    // Offline: the configuration's defaults, no overrides yet.
    let shown = cli_on_ok(store, &["limits", "show"]);
    assert!(
        shown.contains("each volume") && shown.contains("512M"),
        "{shown}"
    );
    assert!(
        shown.contains("no tenant or volume has limits of its own"),
        "{shown}"
    );

    // Careless arguments: refused, nothing written.
    let err = cli_on_fails(store, 2, &["limits", "set", "acme", "--iops", "0"]);
    assert!(err.contains("unlimited"), "{err}");
    let err = cli_on_fails(store, 2, &["limits", "set", "acme", "--bandwidth", "1.5G"]);
    assert!(err.contains("1.5G"), "{err}");
    let err = cli_on_fails(store, 1, &["limits", "set", "acme"]);
    assert!(err.contains("nothing to change"), "{err}");
    let err = cli_on_fails(store, 3, &["limits", "set", "nosuch", "--iops", "5"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = cli_on_fails(store, 3, &["limits", "set", "acme/nosuch", "--iops", "5"]);
    assert!(err.contains("nosuch"), "{err}");
    assert!(!host.join("data/io-limits.json").exists());

    let mut server = ServerProcess::with_config(&host, &config);
    let unlimited = read_iops(&server, "other/disk", 3);

    // Online: the tenant's limit reaches the server's connections at once.
    let set = cli_on_ok(store, &["limits", "set", "acme", "--iops", "200", "--json"]);
    let view = json(&set);
    assert_eq!(view["tenants"][0]["target"], "acme");
    assert_eq!(view["tenants"][0]["iops"], 200);
    assert_eq!(view["tenants"][0]["bytes_per_sec"], serde_json::Value::Null);
    let limited = read_iops(&server, "acme/disk", 4);
    eprintln!(
        "4 KiB random reads, QD8: unlimited {unlimited:.0} IOPS, limited to 200: {limited:.0}"
    );
    // The bucket lets through its burst (a tenth of a second) on top of the
    // rate, and fio's run time excludes its ramp: a little slack above.
    assert!(
        limited <= 200.0 * 1.1,
        "{limited:.0} IOPS under a 200 IOPS limit"
    );
    assert!(
        limited >= 200.0 * 0.5,
        "{limited:.0} IOPS under a 200 IOPS limit"
    );
    assert!(
        unlimited >= 5.0 * 200.0,
        "the unlimited tenant ran {unlimited:.0} IOPS: too slow to show the limit"
    );

    // Kept across a restart, and audited.
    server.stop();
    server.restart();
    let view = json(&cli_on_ok(store, &["limits", "show", "--json"]));
    assert_eq!(view["tenants"][0]["iops"], 200);
    assert_eq!(view["default_volume"]["bytes_per_sec"], 512 << 20);
    let audit = cli_on_ok(store, &["audit"]);
    assert!(audit.contains("limits.set"), "{audit}");

    // A volume's own limit goes with the volume; `default` drops an override.
    cli_on_ok(store, &["limits", "set", "acme/disk", "--bandwidth", "1M"]);
    let shown = cli_on_ok(store, &["limits", "show"]);
    assert!(
        shown.contains("acme/disk") && shown.contains("1M (set)"),
        "{shown}"
    );
    cli_on_ok(store, &["volume", "delete", "acme/disk"]);
    let view = json(&cli_on_ok(store, &["limits", "show", "--json"]));
    assert_eq!(view["volumes"], serde_json::json!([]), "{view}");
    let view = json(&cli_on_ok(
        store,
        &["limits", "set", "acme", "--iops", "default", "--json"],
    ));
    assert_eq!(view["tenants"], serde_json::json!([]), "{view}");

    // A damaged limits file stops the server from starting, by name, rather
    // than running without the limits it set.
    cli_on_ok(store, &["limits", "set", "other", "--iops", "unlimited"]);
    server.stop();
    std::fs::write(
        host.join("data/io-limits.json"),
        b"{\"version\": 1, \"tenants\": ",
    )
    .unwrap();
    let out = run(Command::new(binary())
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(&host));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("io-limits.json") && err.contains("damaged"),
        "{err}"
    );
    let out = cli_on(store, &["limits", "show"]);
    assert!(!out.status.success() && text(&out.stderr).contains("io-limits.json"));
}
