//! Rebuilding a host from the store's catalogue, end to end with real
//! peers: qemu-io writes two tenants' volumes on a running server, a
//! snapshot and a backup (and so a backup key) exist, `blockseal store
//! backup --segments-to` takes the catalogue through the admin socket while
//! the server serves, nbdcopy saves what each export held just before (after
//! a FLUSH), the volumes move on and one is deleted. Then `blockseal store
//! rebuild` makes a new store from the catalogue and the linked segment
//! files with the same master key file, a server serves it, and `qemu-img
//! compare` finds every export (the snapshot's too) as it was when the
//! catalogue was written; `backup verify` of the earlier backup works there
//! (its key record travelled). A catalogue opened with another master key,
//! with a byte flipped, cut short, or with a segment file missing is refused
//! with its message and a non-zero exit, and leaves nothing in the target.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockseal_test_support::{path_str, require_all, run, run_ok, temp_dir};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, blockseal_ok, cli_on, cli_on_ok, configure_host, failed,
    key_id, qemu_io, read_file, same_contents, succeeded,
};

/// `blockseal ARGS`, in `cwd`.
fn blockseal_in(cwd: &Path, args: &[&str]) -> Output {
    run(Command::new(binary()).args(args).current_dir(cwd))
}

fn cli(config: &Path, args: &[&str]) -> Output {
    cli_on(StoreArg::Config(config), args)
}

#[track_caller]
fn cli_ok(config: &Path, args: &[&str]) -> String {
    cli_on_ok(StoreArg::Config(config), args)
}

/// qemu-io `commands` on `uri`, then a FLUSH.
#[track_caller]
fn write_flushed(uri: &str, commands: &[&str]) {
    qemu_io(uri, &[commands, &["flush"]].concat());
}

/// Saves what an export holds to a raw file (nbdcopy).
fn save(uri: &str, file: &Path) {
    run_ok(Command::new("nbdcopy").args([uri, path_str(file)]));
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_host_rebuilds_from_the_catalogue_taken_while_it_served() {
    require_all(&["qemu-io", "qemu-img", "nbdcopy"]);
    let tmp = temp_dir();
    let work = tmp.path();
    let host1 = work.join("host1");
    let saved = work.join("saved");
    let offsite = work.join("offsite");
    std::fs::create_dir_all(&saved).unwrap();
    std::fs::create_dir_all(&offsite).unwrap();
    let copy = |name: &str| saved.join(name);

    // Host 1: two tenants, three volumes, served and written by qemu-io.
    let c1 = configure_host(&host1, None);
    for args in [
        &["tenant", "create", "acme"][..],
        &["tenant", "create", "globex"],
        &["volume", "create", "acme/disk", "--size", "32M"],
        &["volume", "create", "globex/db", "--size", "16M"],
        &["volume", "create", "globex/old", "--size", "8M"],
    ] {
        cli_ok(&c1, args);
    }
    let mut server1 = ServerProcess::with_config(&host1, &c1);
    let disk = server1.uri("acme/disk");
    let db = server1.uri("globex/db");
    let old = server1.uri("globex/old");
    write_flushed(
        &disk,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 8M 2M",
            "write -P 0x33 31M 1M",
        ],
    );
    write_flushed(&db, &["write -P 0x44 0 1M", "write -P 0x55 10M 3M"]);
    write_flushed(&old, &["write -P 0x66 0 8M"]);
    // A snapshot, then the volume moves on past it; a backup of the
    // snapshot puts a backup key in the store.
    cli_ok(&c1, &["snapshot", "create", "acme/disk@s1"]);
    write_flushed(&disk, &["write -P 0x77 1M 2M", "discard 8M 1M"]);
    let full = offsite.join("full.bsb");
    cli_ok(
        &c1,
        &["backup", "create", "acme/disk@s1", "--out", path_str(&full)],
    );

    // What each export holds right before the catalogue (every write above
    // was flushed).
    let exports = [
        ("acme/disk", "disk.raw"),
        ("acme/disk@s1", "s1.raw"),
        ("globex/db", "db.raw"),
        ("globex/old", "old.raw"),
    ];
    for (export, file) in exports {
        save(&server1.uri(export), &copy(file));
    }

    // The catalogue, through the running server, with the segment files
    // linked beside the store (same file system: hard links).
    let catalogue = offsite.join("cat.bsc");
    let segs = host1.join("catalogue-segments");
    let out = cli_ok(
        &c1,
        &[
            "store",
            "backup",
            "--out",
            path_str(&catalogue),
            "--segments-to",
            path_str(&segs),
        ],
    );
    assert!(
        out.contains(&format!("catalogue     {}", catalogue.display())),
        "{out}"
    );
    assert!(out.contains(&format!("into {}\n", segs.display())), "{out}");
    let mode = std::fs::metadata(&catalogue).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let linked = files_under(&segs);
    assert!(linked.len() >= 3, "{linked:?}");
    for rel in &linked {
        let store_file = host1.join("data/segments").join(rel);
        assert_eq!(
            std::fs::metadata(segs.join(rel)).unwrap().ino(),
            std::fs::metadata(&store_file).unwrap().ino(),
            "{} is a hard link of the store's segment file",
            rel.display()
        );
    }
    // The summary as JSON, from the trailer of the stream.
    let json_cat = work.join("cat-2.bsc");
    let summary: serde_json::Value = serde_json::from_str(&cli_ok(
        &c1,
        &["store", "backup", "--out", path_str(&json_cat), "--json"],
    ))
    .unwrap();
    assert_eq!(
        summary["bytes"].as_u64(),
        Some(std::fs::metadata(&json_cat).unwrap().len())
    );
    assert_eq!(summary["master_key_id"], key_id(&host1.join("master.key")));
    assert_eq!(summary["segments_linked"], 0);
    assert!(summary["records"].as_u64().unwrap() > 10, "{summary}");
    // Never overwritten; the segments directory must be empty.
    let e = failed(
        cli(&c1, &["store", "backup", "--out", path_str(&catalogue)]),
        4,
        &["store backup over an existing file"],
    );
    assert!(e.contains("exists already"), "{e}");
    let e = failed(
        cli(
            &c1,
            &[
                "store",
                "backup",
                "--out",
                path_str(&work.join("cat-3.bsc")),
                "--segments-to",
                path_str(&segs),
            ],
        ),
        4,
        &["store backup into a full segments directory"],
    );
    assert!(e.contains("is not empty"), "{e}");
    assert!(!work.join("cat-3.bsc").exists());

    // The server keeps serving: the volumes move on, one is deleted (its
    // segment files with it; the links stay), and compaction may run.
    write_flushed(&disk, &["write -P 0x88 0 6M"]);
    write_flushed(&db, &["write -P 0x99 2M 1M"]);
    cli_ok(&c1, &["volume", "delete", "globex/old", "--force"]);
    assert!(!same_contents(copy("disk.raw"), &disk));
    let host1_after = copy("host1-after.raw");
    save(&disk, &host1_after);
    server1.stop();

    // Copied off the host: the segment files (hard links: no data moved
    // until now) and the catalogue.
    let off_segs = offsite.join("segments");
    run_ok(Command::new("cp").args(["-r", path_str(&segs), path_str(&off_segs)]));

    // Refused: another master key, a flipped byte, a cut-off catalogue, a
    // segment file missing; each leaves its target as it was.
    let other_key = work.join("other.key");
    blockseal_ok(&["key", "init", "--out", path_str(&other_key)]);
    let flipped = work.join("flipped.bsc");
    let mut bytes = read_file(&catalogue);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();
    let cut = work.join("cut.bsc");
    let whole = read_file(&catalogue);
    std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
    let holey = work.join("holey-segments");
    run_ok(Command::new("cp").args(["-r", path_str(&off_segs), path_str(&holey)]));
    let removed = files_under(&holey).remove(0);
    std::fs::remove_file(holey.join(&removed)).unwrap();
    let key1 = host1.join("master.key");
    let (id1, id_other) = (key_id(&key1), key_id(&other_key));
    let empty_target = work.join("empty-target");
    std::fs::create_dir(&empty_target).unwrap();
    let cases: [(&Path, &Path, &Path, i32, Vec<String>); 4] = [
        (
            &catalogue,
            &off_segs,
            &other_key,
            5,
            vec![
                format!("written with master key {id1}"),
                format!("holds master key {id_other}"),
            ],
        ),
        (
            &flipped,
            &off_segs,
            &key1,
            5,
            vec!["does not open: the file was damaged or edited".to_owned()],
        ),
        (
            &cut,
            &off_segs,
            &key1,
            5,
            vec!["the catalogue ends".to_owned()],
        ),
        (
            &catalogue,
            &holey,
            &key1,
            3,
            vec![
                "1 segment file(s) the catalogue references are missing".to_owned(),
                format!("(first: {})", removed.display()),
            ],
        ),
    ];
    for (i, (cat, seg_dir, key, code, messages)) in cases.iter().enumerate() {
        for target in [work.join(format!("refused-{i}")), empty_target.clone()] {
            let args = [
                "store",
                "rebuild",
                "--catalog",
                path_str(cat),
                "--segments",
                path_str(seg_dir),
                "--data-dir",
                path_str(&target),
                "--master-key",
                path_str(key),
            ];
            let e = failed(blockseal_in(work, &args), *code, &args);
            for m in messages {
                assert!(e.contains(m.as_str()), "{m:?} not in {e}");
            }
            assert!(e.contains("nothing was written"), "{e}");
            if target == empty_target {
                assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{e}");
            } else {
                assert!(!target.exists(), "{e}");
            }
        }
    }
    // A target that holds anything (but the key file) is refused.
    std::fs::write(empty_target.join("notes.txt"), b"mine").unwrap();
    let args = [
        "store",
        "rebuild",
        "--catalog",
        path_str(&catalogue),
        "--segments",
        path_str(&off_segs),
        "--data-dir",
        path_str(&empty_target),
        "--master-key",
        path_str(&key1),
    ];
    let e = failed(blockseal_in(work, &args), 4, &args);
    assert!(e.contains("is not empty (it holds notes.txt)"), "{e}");
    assert_eq!(
        std::fs::read(empty_target.join("notes.txt")).unwrap(),
        b"mine"
    );

    // Host 2: the same master key file, the store rebuilt from the
    // catalogue and the copied segments, then served.
    let host2 = work.join("host2");
    let c2 = configure_host(&host2, Some(&key1));
    let out = cli_ok(
        &c2,
        &[
            "store",
            "rebuild",
            "--catalog",
            path_str(&catalogue),
            "--segments",
            path_str(&off_segs),
        ],
    );
    assert!(out.starts_with("rebuilt the store in "), "{out}");
    for line in [
        "tenants       2\n",
        "volumes       3\n",
        "snapshots     1\n",
        "backup keys   1\n",
    ] {
        assert!(out.contains(line), "{line:?} not in {out}");
    }
    assert!(
        out.contains(&format!(
            "Serve it: blockseal serve --config {}",
            c2.display()
        )),
        "{out}"
    );
    let server2 = ServerProcess::with_config(&host2, &c2);
    for (export, file) in exports {
        assert!(
            same_contents(copy(file), server2.uri(export)),
            "{export} on the rebuilt store is not what it held when the catalogue was written"
        );
    }
    // The backup key travelled: the rebuilt store verifies the backup with
    // its own keys. The audit log travelled too, and records the rebuild.
    let verified = cli_ok(&c2, &["backup", "verify", path_str(&full), "--json"]);
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(verified["keys"], "store", "{verified}");
    assert!(verified["blocks_authenticated"].as_u64().unwrap() > 0);
    cli_ok(&c2, &["audit", "verify"]);
    let audit = cli_ok(&c2, &["audit", "--json"]);
    assert!(audit.contains("\"store.backup\""), "{audit}");
    assert!(audit.contains("\"store.rebuild\""), "{audit}");

    // The rebuilt store is a store like any other: it takes writes. Its
    // segment files share the originals' inodes here (hard links twice
    // over, on one file system), yet host 1's store is untouched by them.
    let disk2 = server2.uri("acme/disk");
    write_flushed(&disk2, &["write -P 0xaa 0 8M", "read -P 0xaa 0 8M"]);
    cli_ok(&c2, &["snapshot", "create", "acme/disk@after-rebuild"]);
    drop(server2);
    server1.restart();
    assert!(same_contents(&host1_after, server1.uri("acme/disk")));
    let e = failed(
        cli(&c1, &["volume", "show", "globex/old"]),
        3,
        &["volume show globex/old"],
    );
    assert!(e.contains("no volume globex/old"), "{e}");
}

/// With no server running, `store backup` opens the store itself; a
/// catalogue without `--segments-to` rebuilds from the store's own
/// `segments/` directory as long as no segment was deleted since.
#[test]
fn an_offline_catalogue_rebuilds_from_the_stores_own_segments() {
    require_all(&["qemu-io", "qemu-img", "nbdcopy"]);
    let tmp = temp_dir();
    let work = tmp.path();
    let host1 = work.join("host1");
    let c1 = configure_host(&host1, None);
    cli_ok(&c1, &["tenant", "create", "acme"]);
    cli_ok(&c1, &["volume", "create", "acme/disk", "--size", "8M"]);
    let mut server = ServerProcess::with_config(&host1, &c1);
    write_flushed(&server.uri("acme/disk"), &["write -P 0x5a 1M 3M"]);
    let saved = work.join("disk.raw");
    save(&server.uri("acme/disk"), &saved);
    server.stop();

    let catalogue = work.join("cat.bsc");
    let out = cli_ok(&c1, &["store", "backup", "--out", path_str(&catalogue)]);
    assert!(out.contains("linked        none"), "{out}");
    // Offline, the local user is the actor.
    let audit = cli_ok(&c1, &["audit", "--json"]);
    assert!(audit.contains("\"local:uid:"), "{audit}");
    assert!(audit.contains("\"store.backup\""), "{audit}");

    // The new store's directory may hold its master key file already.
    let new = work.join("new");
    std::fs::create_dir(&new).unwrap();
    std::fs::copy(host1.join("master.key"), new.join("master.key")).unwrap();
    let segments = host1.join("data/segments");
    let args = [
        "store",
        "rebuild",
        "--catalog",
        path_str(&catalogue),
        "--segments",
        path_str(&segments),
        "--data-dir",
        path_str(&new),
        "--json",
    ];
    let out = succeeded(blockseal_in(work, &args), &args);
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["volumes"], 1, "{summary}");
    assert_eq!(summary["master_key_id"], key_id(&host1.join("master.key")));

    let config = new.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n\n[master_key]\nfile = \"master.key\"\n\n[unix]\npath = \"nbd.sock\"\n",
            new.display()
        ),
    )
    .unwrap();
    let server = ServerProcess::with_config(&new, &config);
    assert!(same_contents(&saved, server.uri("acme/disk")));
}
