//! Retention end to end, against the real server on a test clock
//! (`BLOCKSEAL_TEST_CLOCK=1`, passes run by `blockseal retention run --now`,
//! never by waiting): scheduled snapshots appear weekly and expire after two
//! weeks while an operator's stays; backup files appear in the backup
//! directory, full then incremental, and the files of expired chains go
//! with their keys; data retention discards an opted-in tenant's old blocks
//! (qemu-io reads zeros) and nobody else's; a restart redoes nothing. And on
//! the system clock: the server's own first pass, and a pass at a given time
//! refused without the test clock, online and offline.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockseal_test_support::{path_str, require, run, run_ok, wait_until};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, blockseal_ok, cli_on, cli_on_ok, qemu_io, qemu_io_with, text,
};

const DAY: u64 = 86_400;
/// 2020-09-13T12:26:40Z: the test clock runs in the past, where the store's
/// own clock never meets it.
const T0: u64 = 1_600_000_000;
const TEST_CLOCK: (&str, &str) = ("BLOCKSEAL_TEST_CLOCK", "1");

fn cli(dir: &Path, args: &[&str]) -> Output {
    cli_on(StoreArg::DataDir(dir), args)
}

#[track_caller]
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    cli_on_ok(StoreArg::DataDir(dir), args)
}

#[track_caller]
fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli_ok(dir, &[args, &["--json"]].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The names a scheduled snapshot and its backup files get at `t`.
fn auto(t: u64) -> String {
    format!("auto-{}", stamp(t).to_lowercase())
}

fn stamp(t: u64) -> String {
    let out = run_ok(Command::new("date").args(["-u", "-d", &format!("@{t}"), "+%Y%m%dT%H%M%SZ"]));
    out.trim().to_owned()
}

fn full(t: u64) -> String {
    format!("{}-full-{}.bsbackup", stamp(t), auto(t))
}

fn incr(t: u64) -> String {
    format!("{}-incr-{}.bsbackup", stamp(t), auto(t))
}

/// A store with a master key, tenants `acme` (opted in to data retention)
/// and `globex`, each with a 4 MiB volume `disk`, and `[retention]` with
/// two-week chains and ten days of data.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        blockseal_ok(&["key", "init", "--out", path_str(&dir.join("master.key"))]);
        let config = dir.join("blockseal.toml");
        std::fs::write(
            &config,
            "data_dir = \"data\"\n[master_key]\nfile = \"master.key\"\n[unix]\npath = \"nbd.sock\"\n\
             [retention]\nbackup_dir = \"backups\"\nbackup_keep = \"14d\"\nfull_every = \"14d\"\n\
             data_max_age = \"10d\"\ndata_tenants = [\"acme\"]\n",
        )
        .unwrap();
        Setup {
            _tmp: tmp,
            dir,
            config,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `blockseal ARGS --config CONFIG`, with `env`.
    #[track_caller]
    fn with_config(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).args(["--config", path_str(&self.config)]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    }

    /// The tenants and volumes (creating the store when no server runs).
    fn volumes(&self) {
        for tenant in ["acme", "globex"] {
            let volume = format!("{tenant}/disk");
            for args in [
                vec!["tenant", "create", tenant],
                vec!["volume", "create", &volume, "--size", "4M"],
            ] {
                let out = self.with_config(&args, &[]);
                assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
            }
        }
    }

    /// One pass at `now`; returns its actions as (action, target, detail).
    #[track_caller]
    fn pass(&self, now: u64) -> Vec<(String, String, String)> {
        let reply = json(
            &self.data(),
            &["retention", "run", "--now", &now.to_string()],
        );
        assert_eq!(reply["failed"], 0, "{reply:#}");
        reply["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert_eq!(a["result"], "ok", "{a:#}");
                (
                    a["action"].as_str().unwrap().to_owned(),
                    a["target"].as_str().unwrap().to_owned(),
                    a["detail"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn snapshots(&self, volume: &str) -> Vec<String> {
        let list = json(&self.data(), &["snapshot", "list", volume]);
        list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn files(&self, tenant: &str) -> Vec<String> {
        let dir = self.dir.join("backups").join(tenant).join("disk");
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// The audit entries of `action` by retention: (target, result, detail).
    fn audit(&self, action: &str) -> Vec<(String, String, String)> {
        json(&self.data(), &["audit"])["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action && e["actor"] == "retention")
            .map(|e| {
                (
                    e["target"].as_str().unwrap().to_owned(),
                    e["result"].as_str().unwrap().to_owned(),
                    e["detail"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

fn names(actions: &[(String, String, String)]) -> Vec<(&str, &str)> {
    actions
        .iter()
        .map(|(a, t, _)| (a.as_str(), t.as_str()))
        .collect()
}

#[test]
fn weeks_of_retention_on_a_test_clock() {
    require("qemu-io");
    let s = Setup::new();
    let mut server = ServerProcess::with_config_and_env(&s.dir, &s.config, &[TEST_CLOCK]);
    s.volumes();
    let acme = server.uri("acme/disk");
    let globex = server.uri("globex/disk");
    cli_ok(&s.data(), &["snapshot", "create", "acme/disk@mine"]);
    qemu_io(&acme, &["write -P 0xa1 0 4k"]);
    qemu_io(&globex, &["write -P 0xb1 0 4k"]);

    // The first pass: a snapshot and a full backup of every volume.
    let first = s.pass(T0);
    let snap = |t: &str, at: u64| format!("{t}/disk@{}", auto(at));
    assert_eq!(
        names(&first),
        vec![
            ("snapshot.create", &*snap("acme", T0)),
            ("retention.backup", &*snap("acme", T0)),
            ("retention.data", "acme/disk"),
            ("snapshot.create", &*snap("globex", T0)),
            ("retention.backup", &*snap("globex", T0)),
        ]
    );
    assert!(first[1].2.contains("kind=full base=-"), "{first:?}");
    assert_eq!(s.snapshots("acme/disk"), vec!["mine".to_owned(), auto(T0)]);
    assert_eq!(s.files("acme"), vec![full(T0)]);
    assert_eq!(s.files("globex"), vec![full(T0)]);
    let file = s.dir.join("backups/acme/disk").join(full(T0));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());

    // What is due next, and when.
    let status = json(&s.data(), &["retention", "status"]);
    assert_eq!(status["clock"], "test");
    let volumes = status["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    let v = &volumes[0];
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["next_snapshot"], "2020-09-20T12:26:40Z");
    assert_eq!(v["snapshots"][0]["expires"], "2020-09-27T12:26:40Z");
    assert_eq!(v["next_backup"]["at"], "2020-09-20T12:26:40Z");
    assert_eq!(v["next_backup"]["kind"], "incremental");
    assert_eq!(v["next_backup"]["base"], auto(T0).as_str());
    assert_eq!(v["data"]["next_age_mark"], "2020-09-14T12:26:40Z");
    assert_eq!(v["data"]["discards_written_before"], "2020-09-04T12:26:40Z");
    assert!(volumes[1]["data"].is_null());
    let shown = cli_ok(&s.data(), &["retention", "status"]);
    assert!(
        shown.contains("next backup     2020-09-20T12:26:40Z, incremental from"),
        "{shown}"
    );

    // Written after the first pass, dated by the next mark.
    qemu_io(&acme, &["write -P 0xa2 4k 4k"]);
    qemu_io(&globex, &["write -P 0xb2 4k 4k"]);
    assert_eq!(
        names(&s.pass(T0 + DAY)),
        vec![("retention.data", "acme/disk")]
    );

    // A week: a new snapshot of each, backed up incrementally.
    let week = T0 + 7 * DAY;
    qemu_io(&acme, &["write -P 0xa3 8k 4k"]);
    let actions = s.pass(week);
    assert!(
        actions[1]
            .2
            .contains(&format!("kind=incremental base={}", auto(T0))),
        "{actions:?}"
    );
    assert_eq!(s.files("acme"), vec![full(T0), incr(week)]);
    assert_eq!(s.files("globex"), vec![full(T0), incr(week)]);

    // A restart redoes nothing and skips nothing.
    server.stop();
    server.restart();
    assert_eq!(s.pass(week), vec![]);
    assert_eq!(
        names(&s.pass(week + DAY)),
        vec![("retention.data", "acme/disk")]
    );
    qemu_io(&acme, &["write -P 0xa4 12k 4k"]);

    // Twelve days: what acme wrote before its first marks is older than ten
    // days and reads as zeros now; what it wrote since, and everything of
    // globex, is still there.
    let actions = s.pass(T0 + 12 * DAY);
    assert_eq!(names(&actions), vec![("retention.data", "acme/disk")]);
    assert!(actions[0].2.contains("blocks_discarded=2"), "{actions:?}");
    qemu_io(
        &acme,
        &[
            "read -P 0 0 4k",
            "read -P 0 4k 4k",
            "read -P 0xa3 8k 4k",
            "read -P 0xa4 12k 4k",
        ],
    );
    qemu_io(&globex, &["read -P 0xb1 0 4k", "read -P 0xb2 4k 4k"]);
    // The snapshots still hold it until they expire.
    qemu_io_with(
        &["-r"],
        &server.uri(&format!("acme/disk@{}", auto(week))),
        &["read -P 0xa1 0 4k", "read -P 0xa2 4k 4k"],
    );

    // Two weeks: the first scheduled snapshot expires (not the operator's),
    // and the chain is full_every old: a new full backup.
    let two = T0 + 14 * DAY;
    s.pass(two);
    assert_eq!(
        s.snapshots("acme/disk"),
        vec!["mine".to_owned(), auto(week), auto(two)]
    );
    assert_eq!(s.files("acme"), vec![full(T0), incr(week), full(two)]);
    let three = T0 + 21 * DAY;
    s.pass(three);
    assert_eq!(s.snapshots("globex/disk"), vec![auto(two), auto(three)]);
    assert_eq!(
        s.files("globex"),
        vec![full(T0), incr(week), full(two), incr(three)]
    );

    // Four weeks: the first chain's keys expire, and its files go with them.
    let four = T0 + 28 * DAY;
    s.pass(four);
    assert_eq!(s.files("acme"), vec![full(two), incr(three), full(four)]);
    assert_eq!(s.files("globex"), vec![full(two), incr(three), full(four)]);
    let expired: Vec<String> = s
        .audit("retention.backup-key-expire")
        .into_iter()
        .map(|(target, result, _)| {
            assert_eq!(result, "ok");
            target
        })
        .collect();
    let mut wanted = vec![
        snap("acme", T0),
        snap("acme", week),
        snap("globex", T0),
        snap("globex", week),
    ];
    wanted.sort();
    let mut got = expired.clone();
    got.sort();
    assert_eq!(got, wanted);
    assert_eq!(s.audit("retention.backup-file-delete").len(), 4);
    // Snapshot actions are audited as an administrator's, by `retention`.
    let deleted = s.audit("snapshot.delete");
    assert!(
        deleted
            .iter()
            .any(|(t, r, _)| t == &snap("acme", T0) && r == "ok"),
        "{deleted:?}"
    );
    assert!(s.snapshots("acme/disk").contains(&"mine".to_owned()));
    server.stop();
}

#[test]
fn the_server_runs_its_own_passes_and_refuses_a_given_time_without_the_test_clock() {
    let s = Setup::new();
    // The store first (offline), so that the server's first pass finds the
    // volumes.
    s.volumes();
    let mut server = ServerProcess::with_config(&s.dir, &s.config);
    // The first pass runs at start, on the system clock.
    wait_until(
        "the server's first retention pass",
        std::time::Duration::from_secs(60),
        || {
            s.snapshots("globex/disk")
                .iter()
                .any(|n| n.starts_with("auto-"))
                && s.files("globex").len() == 1
        },
    );
    let status = json(&s.data(), &["retention", "status"]);
    assert_eq!(status["clock"], "system");
    // A pass at a given time: only on the test clock.
    let out = cli(&s.data(), &["retention", "run", "--now", &T0.to_string()]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("BLOCKSEAL_TEST_CLOCK"),
        "{}",
        text(&out.stderr)
    );
    // A pass now: the server did what was due.
    let reply = json(&s.data(), &["retention", "run"]);
    assert_eq!(reply["actions"].as_array().unwrap().len(), 0, "{reply:#}");
    server.stop();

    // Offline, with the configuration: the same answers.
    let out = s.with_config(&["retention", "status", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["configured"], true);
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2);
    // Ten days on (the store's own clock is now): only on the test clock.
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let later = (real + 10 * DAY).to_string();
    let out = s.with_config(&["retention", "run", "--now", &later], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let out = s.with_config(
        &["retention", "run", "--now", &later, "--json"],
        &[TEST_CLOCK],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let created: Vec<&str> = reply["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "snapshot.create")
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert_eq!(created.len(), 2, "{reply:#}");
    assert!(created[0].ends_with(&auto(real + 10 * DAY)), "{created:?}");
    // Without the configuration the settings are unknown, and it says so.
    let key = s.dir.join("master.key");
    let shown = cli_ok(
        &s.data(),
        &["retention", "status", "--master-key", path_str(&key)],
    );
    assert!(shown.contains("--config"), "{shown}");
}
