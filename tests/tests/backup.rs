//! Backups end to end, with real peers: fio (crc32c verification) writes a
//! served volume, `blockseal backup create` streams a full backup of one
//! snapshot and an incremental backup of the next from the running server,
//! `blockseal key export-tenant` seals the tenant's recovery bundle (to the
//! master key, and under a passphrase), and a second server on a fresh store
//! with the same master key restores the chain, which `qemu-img compare`
//! finds identical to the snapshot on the first server. Also: a flipped byte
//! and a spliced file are refused by `backup verify` and `restore` and leave
//! no volume; a backup stream cut off by the server's death is detected and
//! leaves nothing usable; a drill restores the newest chain; the offline
//! path (no server) backs up, verifies and restores the same way; a shredded
//! tenant's backups no longer open with the store, but do with a bundle
//! exported before (which is why bundles must be destroyed too).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use blockseal_test_support::{path_str, require_all, run_ok, temp_dir};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, cli_on, cli_on_fails, cli_on_ok, configure_host, read_file,
    same_contents, text,
};

fn cli(config: &Path, args: &[&str]) -> Output {
    cli_on(StoreArg::Config(config), args)
}

#[track_caller]
fn cli_ok(config: &Path, args: &[&str]) -> String {
    cli_on_ok(StoreArg::Config(config), args)
}

/// Fails with exit `code`; returns stderr.
#[track_caller]
fn cli_fails(config: &Path, code: i32, args: &[&str]) -> String {
    cli_on_fails(StoreArg::Config(config), code, args)
}

fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli_ok(config, &[args, &["--json"]].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// fio with crc32c verification on `uri`: the written blocks are read back
/// and checked before it exits.
fn fio(dir: &Path, uri: &str, args: &[&str]) {
    let out = run_ok(
        Command::new("fio")
            .current_dir(dir)
            .args([
                "--name=backup",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--group_reporting",
            ])
            .args(args),
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
}

/// Whether `export` exists on the store (`volume show` exits 0, or 3).
fn volume_exists(config: &Path, export: &str) -> bool {
    match cli(config, &["volume", "show", export]).status.code() {
        Some(0) => true,
        Some(3) => false,
        other => panic!("volume show {export}: {other:?}"),
    }
}

#[test]
fn backups_restore_on_another_host_and_refuse_damage() {
    require_all(&["fio", "qemu-img", "qemu-io"]);
    let tmp = temp_dir();
    let work = tmp.path();
    let host1 = work.join("host1");
    let host2 = work.join("host2");
    let files = work.join("backups");
    for d in [&host1, &host2, &files] {
        std::fs::create_dir(d).unwrap();
    }
    let f = |name: &str| path_str(&files.join(name)).to_owned();

    // Host 1: a tenant with one volume, served, written by fio.
    let c1 = configure_host(&host1, None);
    cli_ok(&c1, &["tenant", "create", "acme"]);
    cli_ok(&c1, &["volume", "create", "acme/disk", "--size", "64M"]);
    let mut server1 = ServerProcess::with_config(&host1, &c1);
    let disk = server1.uri("acme/disk");
    fio(
        &host1,
        &disk,
        &["--rw=write", "--bs=64k", "--size=32M", "--offset=0"],
    );
    cli_ok(&c1, &["snapshot", "create", "acme/disk@s1"]);

    // A full backup of s1, streamed from the server.
    let out = cli_ok(
        &c1,
        &["backup", "create", "acme/disk@s1", "--out", &f("full.bsb")],
    );
    assert!(out.contains("kind          full\n"), "{out}");
    assert!(out.contains("blocks        8192\n"), "{out}");
    let mode = std::fs::metadata(f("full.bsb")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // Never overwritten.
    let e = cli_fails(
        &c1,
        4,
        &["backup", "create", "acme/disk@s1", "--out", &f("full.bsb")],
    );
    assert!(e.contains("exists already"), "{e}");

    // The volume moves on: 4k random writes over 8 MiB (verified), and a
    // trimmed MiB; then snapshot s2 and an incremental backup from s1.
    fio(
        &host1,
        &disk,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--offset=16M",
            "--number_ios=512",
        ],
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", &disk, "-c", "discard 0 1M"]));
    cli_ok(&c1, &["snapshot", "create", "acme/disk@s2"]);
    let out = cli_ok(
        &c1,
        &[
            "backup",
            "create",
            "acme/disk@s2",
            "--incremental-from",
            "s1",
            "--out",
            &f("incr.bsb"),
            "--expires",
            "30d",
        ],
    );
    assert!(out.contains("kind          incremental from s1\n"), "{out}");
    assert!(out.contains("(and 256 unmapped)"), "{out}");
    let incr_size = std::fs::metadata(f("incr.bsb")).unwrap().len();
    let full_size = std::fs::metadata(f("full.bsb")).unwrap().len();
    assert!(incr_size < full_size / 4, "{incr_size} vs {full_size}");

    // The store lists both keys; the incremental one expires.
    let keys = json(&c1, &["backup", "keys", "acme"]);
    let keys = keys["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        keys.iter().filter(|k| k["expires"].is_string()).count(),
        1,
        "{keys:?}"
    );

    // Verified with the store's keys (every block opened), and by structure
    // alone with no store at all.
    let v = json(&c1, &["backup", "verify", &f("full.bsb"), &f("incr.bsb")]);
    assert_eq!(v["keys"], "store");
    assert!(v["blocks_authenticated"].as_u64().unwrap() > 8192, "{v}");
    let out = run_ok(Command::new(binary()).args([
        "backup",
        "verify",
        "--structure-only",
        &f("full.bsb"),
        &f("incr.bsb"),
    ]));
    assert!(out.starts_with("structure verified: 2 file(s)"), "{out}");
    // Out of order is no chain.
    let e = cli_fails(
        &c1,
        5,
        &["backup", "verify", &f("incr.bsb"), &f("full.bsb")],
    );
    assert!(e.contains("only incremental backups may follow"), "{e}");

    // The drill restores the newest chain of the directory's files.
    let drill = json(&c1, &["backup", "drill", path_str(&files)]);
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["volumes"][0]["snapshot"], "s2", "{drill}");
    assert_eq!(
        drill["volumes"][0]["files"].as_array().unwrap().len(),
        2,
        "{drill}"
    );
    let out = cli_ok(&c1, &["backup", "drill", path_str(&files)]);
    assert!(out.contains(" OK\n"), "{out}");

    // Recovery bundles: to the master key, and under a passphrase.
    let pass = work.join("pass.txt");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let wrong = work.join("wrong.txt");
    std::fs::write(&wrong, "wrong\n").unwrap();
    let out = cli_ok(
        &c1,
        &[
            "key",
            "export-tenant",
            "acme",
            "--out",
            &f("acme-master.bundle"),
            "--to-master-key",
        ],
    );
    assert!(
        out.contains("2 backup key(s), sealed to master key"),
        "{out}"
    );
    cli_ok(
        &c1,
        &[
            "key",
            "export-tenant",
            "acme",
            "--out",
            &f("acme-pass.bundle"),
            "--passphrase-file",
            path_str(&pass),
        ],
    );
    // Exporting changes nothing but is audited.
    let audit = json(&c1, &["audit"]);
    let exports = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "key.export-tenant" && e["result"] == "ok")
        .count();
    assert_eq!(exports, 2, "{audit}");
    cli_ok(&c1, &["audit", "verify"]);

    // Damaged files: one byte flipped, and a splice of two backups' halves.
    let full = read_file(&files.join("full.bsb"));
    let incr = read_file(&files.join("incr.bsb"));
    let bad = work.join("bad");
    std::fs::create_dir(&bad).unwrap();
    // In the last block's ciphertext (the last frame is a block run: frames
    // are in LBA order and the trimmed range comes first).
    let mut flipped = incr.clone();
    flipped[incr.len() - 81 - 100] ^= 0x40;
    std::fs::write(bad.join("flipped.bsb"), &flipped).unwrap();
    let mut spliced = full[..full.len() / 2].to_vec();
    spliced.extend_from_slice(&incr[incr.len() / 2..]);
    std::fs::write(bad.join("spliced.bsb"), &spliced).unwrap();
    let flipped_path = path_str(&bad.join("flipped.bsb")).to_owned();
    let spliced_path = path_str(&bad.join("spliced.bsb")).to_owned();
    // A flipped ciphertext byte fails its run's checksum, with keys or not.
    let e = cli_fails(&c1, 5, &["backup", "verify", &f("full.bsb"), &flipped_path]);
    assert!(e.contains("flipped.bsb: "), "{e}");
    assert!(e.contains("does not match its checksum"), "{e}");
    let e = cli_fails(
        &c1,
        5,
        &["backup", "verify", "--structure-only", &flipped_path],
    );
    assert!(e.contains("does not match its checksum"), "{e}");
    let e = cli_fails(&c1, 5, &["backup", "verify", &spliced_path]);
    assert!(e.contains("spliced.bsb: "), "{e}");
    cli_fails(
        &c1,
        5,
        &["backup", "verify", "--structure-only", &spliced_path],
    );

    // Host 2: a fresh store with the same master key.
    let c2 = configure_host(&host2, Some(&host1.join("master.key")));
    let mut server2 = ServerProcess::with_config(&host2, &c2);
    // Its store holds no key for host 1's backups: the bundle is needed.
    let e = cli_fails(&c2, 3, &["backup", "verify", &f("full.bsb")]);
    assert!(e.contains("recovery bundle"), "{e}");

    // Damaged files are refused by a restore too, and leave no volume.
    let master_bundle = f("acme-master.bundle");
    for chain in [
        vec![f("full.bsb"), flipped_path.clone()],
        vec![spliced_path.clone()],
    ] {
        let mut args = vec!["restore"];
        args.extend(chain.iter().map(String::as_str));
        args.extend(["--as", "acme/disk", "--bundle", &master_bundle]);
        let e = cli_fails(&c2, 5, &args);
        assert!(e.contains(".bsb: "), "{e}");
        assert!(!volume_exists(&c2, "acme/disk"), "{chain:?}");
    }
    // A wrong passphrase opens nothing.
    let e = cli_fails(
        &c2,
        5,
        &[
            "restore",
            &f("full.bsb"),
            "--as",
            "acme/disk",
            "--bundle",
            &f("acme-pass.bundle"),
            "--passphrase-file",
            path_str(&wrong),
        ],
    );
    assert!(e.contains("wrong passphrase"), "{e}");

    // The chain restores with the passphrase bundle, and reads as s2 on host 1.
    let out = cli_ok(
        &c2,
        &[
            "restore",
            &f("full.bsb"),
            &f("incr.bsb"),
            "--as",
            "acme/disk",
            "--bundle",
            &f("acme-pass.bundle"),
            "--passphrase-file",
            path_str(&pass),
        ],
    );
    assert!(
        out.starts_with("restored acme/disk from 2 file(s) to snapshot s2"),
        "{out}"
    );
    let s2 = server1.uri("acme/disk@s2");
    assert!(same_contents(server2.uri("acme/disk"), &s2));
    assert!(!same_contents(
        server2.uri("acme/disk"),
        server1.uri("acme/disk@s1")
    ));
    // And with the bundle sealed to the shared master key.
    cli_ok(
        &c2,
        &[
            "restore",
            &f("full.bsb"),
            &f("incr.bsb"),
            "--as",
            "acme/copy",
            "--bundle",
            &f("acme-master.bundle"),
        ],
    );
    assert!(same_contents(server2.uri("acme/copy"), &s2));
    // The target exists now: a conflict.
    let e = cli_fails(
        &c2,
        4,
        &[
            "restore",
            &f("full.bsb"),
            "--as",
            "acme/disk",
            "--bundle",
            &f("acme-master.bundle"),
        ],
    );
    assert!(e.contains("already exists"), "{e}");

    // Offline (no server on host 2): a backup of the restored volume, with
    // a snapshot taken for it, verified and restored with the store's keys.
    server2.stop();
    let out = cli_ok(
        &c2,
        &["backup", "create", "acme/copy", "--out", &f("copy.bsb")],
    );
    assert!(out.contains("snapshot      acme/copy@backup-"), "{out}");
    cli_ok(&c2, &["backup", "verify", &f("copy.bsb")]);
    cli_ok(
        &c2,
        &[
            "backup",
            "verify",
            &f("full.bsb"),
            &f("incr.bsb"),
            "--bundle",
            &f("acme-master.bundle"),
        ],
    );
    cli_ok(&c2, &["restore", &f("copy.bsb"), "--as", "acme/copy2"]);
    server2.restart();
    assert!(same_contents(server2.uri("acme/copy2"), &s2));

    // A backup to stdout that the server's death cuts off: the command
    // fails, and what it passed on is not a backup.
    let mut child = Command::new(binary())
        .args([
            "backup",
            "create",
            "acme/disk@s2",
            "--out",
            "-",
            "--config",
            path_str(&c1),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut received = vec![0u8; 1 << 20];
    stdout.read_exact(&mut received).unwrap();
    // The rest waits in the server (the client reads no more): kill it now.
    server1.kill();
    stdout.read_to_end(&mut received).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{:?}", out.status);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("did not arrive whole"), "{stderr}");
    assert!(
        stderr.contains("what reached stdout is not a usable backup"),
        "{stderr}"
    );
    assert!(received.len() < full.len(), "{}", received.len());
    std::fs::write(bad.join("cut.bsb"), &received).unwrap();
    let e = cli_fails(
        &c1,
        5,
        &[
            "backup",
            "verify",
            "--structure-only",
            path_str(&bad.join("cut.bsb")),
        ],
    );
    assert!(e.contains("truncated"), "{e}");

    // Shredding reaches the backups through their keys: host 1 can no
    // longer read them. A bundle exported before still opens them: it is a
    // copy of the keys, and must be destroyed too.
    server1.restart();
    cli_ok(&c1, &["tenant", "shred", "acme", "--yes-i-understand"]);
    let e = cli_fails(&c1, 3, &["backup", "verify", &f("full.bsb")]);
    assert!(e.contains("no key for backup"), "{e}");
    let keys = json(&c1, &["backup", "keys"]);
    assert_eq!(keys["keys"].as_array().unwrap().len(), 0, "{keys}");
    cli_ok(
        &c2,
        &[
            "backup",
            "verify",
            &f("full.bsb"),
            "--bundle",
            &f("acme-master.bundle"),
        ],
    );
    drop(server2);
}

/// `scripts/backup-throughput.sh --smoke` runs end to end with this build's
/// binary and writes its table.
#[test]
fn the_throughput_script_runs_at_its_smoke_size() {
    require_all(&["fio", "nbdcopy"]);
    let results = temp_dir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/backup-throughput.sh");
    run_ok(Command::new("bash").arg(script).args([
        "--smoke",
        "--bin",
        path_str(&binary()),
        "--results",
        path_str(results.path()),
    ]));
    let summary = std::fs::read_to_string(results.path().join("summary.md")).unwrap();
    assert!(summary.contains("| ratio backup / nbdcopy |"), "{summary}");
    assert!(summary.contains("% of the full backup"), "{summary}");
}
