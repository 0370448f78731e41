//! Several `blockseal serve` processes sharing one bucket (`[cluster]`) of a
//! moto S3 server the test starts on loopback: shards, leases, failover
//! after a kill -9, a host paused past its lease (SIGSTOP) that must
//! acknowledge nothing when it wakes, a planned move, and the admin API
//! routing by tenant. docs/DISTRIBUTED.md has the protocol.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockseal_test_support::Raw;
use blockseal_test_support::moto::{BUCKET, CREDENTIAL, moto, unique_prefix};
use blockseal_test_support::wire::{CMD_FLUSH, CMD_WRITE, EIO, ESHUTDOWN};
use blockseal_test_support::{require_all, run, run_ok};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, cli_on, cli_on_ok, configure_host, qemu_io,
};

/// Lease timings short enough for a test; the defaults (8 s, 2 s, 2 s) run
/// in the kill -9 test, which measures the takeover.
const SHORT: &str = "lease_ms = 3000\nrenew_ms = 500\ngrace_ms = 500\n";

struct Host {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    server: Option<ServerProcess>,
}

impl Host {
    /// A host of the cluster at `prefix`, its master key copied from `key`
    /// (or generated).
    fn new(root: &Path, name: &str, prefix: &str, key: Option<&Path>, extra: &str) -> Host {
        let dir = root.join(name);
        let config = configure_host(&dir, key);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "\n[object_store]\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\nendpoint = \"{}\"\n\
             \n[cluster]\nhost = \"{name}\"\nuri = \"nbd+unix:///?socket={}\"\nshards = 2\n{extra}",
            moto().endpoint,
            dir.join("nbd.sock").display()
        ));
        std::fs::write(&config, text).unwrap();
        Host {
            name: name.to_owned(),
            dir,
            config,
            server: None,
        }
    }

    fn start(&mut self) {
        self.server = Some(ServerProcess::with_config_and_env(
            &self.dir,
            &self.config,
            &[
                ("AWS_ACCESS_KEY_ID", CREDENTIAL),
                ("AWS_SECRET_ACCESS_KEY", CREDENTIAL),
            ],
        ));
    }

    fn server(&self) -> &ServerProcess {
        self.server.as_ref().expect("the host runs")
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn key(&self) -> PathBuf {
        self.dir.join("master.key")
    }

    fn store(&self) -> StoreArg<'_> {
        StoreArg::Config(&self.config)
    }

    /// `blockseal cluster ARGS -c CONFIG`.
    fn cluster(&self, args: &[&str]) -> std::process::Output {
        run(Command::new(binary())
            .arg("cluster")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("AWS_ACCESS_KEY_ID", CREDENTIAL)
            .env("AWS_SECRET_ACCESS_KEY", CREDENTIAL))
    }

    /// Who serves each shard, as `cluster status --json` shows (`None`:
    /// nobody, or its holder is still opening it).
    fn holders(&self) -> Vec<Option<String>> {
        let out = self.cluster(&["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                if l["serving"].as_bool() == Some(true) {
                    l["holder"].as_str().map(str::to_owned)
                } else {
                    None
                }
            })
            .collect()
    }

    /// What `cluster locate` prints for `export`, if it succeeds.
    fn locate(&self, export: &str) -> Option<String> {
        let out = self.cluster(&["locate", export]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Polls `condition` every 100 ms until it holds, for at most `limit`.
#[track_caller]
fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `a`, waits until it serves both shards, then starts `b`.
fn start_a_then_b(a: &mut Host, b: &mut Host, limit: Duration) {
    a.start();
    let name = a.name.clone();
    wait_for("host a to serve both shards", limit, || {
        a.holders()
            .iter()
            .all(|h| h.as_deref() == Some(name.as_str()))
    });
    a.server()
        .wait_for_log("serving the shard", 2, Duration::from_secs(30));
    b.start();
}

/// Every sealed block under `prefix/shards/` in the bucket: how many, and
/// how many are byte-for-byte the same as another. Blocks of zeros sealed
/// under one (key, nonce) pair would be identical (their ciphertext is the
/// key stream), so a repeated pair among zero writes shows as a duplicate.
fn sealed_blocks(prefix: &str) -> (u64, u64) {
    let python = std::env::var("BLOCKSEAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import sys, hashlib, boto3
endpoint, bucket, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
seen, blocks, dups = set(), 0, 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/shards/"):
    for obj in page.get("Contents", []):
        key = obj["Key"]
        if "/segments/" not in key or not key.rsplit("/", 1)[1].startswith("r"):
            continue
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for i in range(0, len(body), 4096):
            digest = hashlib.sha256(body[i:i + 4096]).digest()
            blocks += 1
            if digest in seen:
                dups += 1
            seen.add(digest)
print(blocks, dups)
"#;
    let out = run_ok(Command::new(python).args(["-c", script, &moto().endpoint, BUCKET, prefix]));
    let mut numbers = out.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
fn a_killed_host_s_shards_move_to_another_with_every_flushed_write() {
    require_all(&["fio", "qemu-io"]);
    let tmp = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("cluster-kill");
    let mut a = Host::new(tmp.path(), "a", &prefix, None, "");
    let mut b = Host::new(tmp.path(), "b", &prefix, Some(&a.key()), "");
    start_a_then_b(&mut a, &mut b, Duration::from_secs(60));
    cli_on_ok(a.store(), &["tenant", "create", "acme"]);
    cli_on_ok(
        a.store(),
        &["volume", "create", "acme/disk", "--size", "64M"],
    );
    assert_eq!(
        a.locate("acme/disk").as_deref(),
        Some(a.uri("acme/disk").as_str())
    );

    // fio writes 32 MiB with a checksum in every block and a flush every
    // 16 writes and at the end; then blocks of zeros, flushed.
    let fio = |uri: &str, verify_only: bool| {
        let mut args = vec![
            "--name=failover".to_owned(),
            "--ioengine=nbd".to_owned(),
            format!("--uri={uri}"),
            "--rw=write".to_owned(),
            "--bs=64k".to_owned(),
            "--size=32M".to_owned(),
            "--iodepth=4".to_owned(),
            "--verify=crc32c".to_owned(),
            "--verify_fatal=1".to_owned(),
            "--verify_state_save=0".to_owned(),
        ];
        if verify_only {
            args.push("--verify_only".to_owned());
        } else {
            args.extend(["--do_verify=0", "--fsync=16", "--end_fsync=1"].map(str::to_owned));
        }
        run_ok(Command::new("fio").current_dir(tmp.path()).args(&args))
    };
    let out = fio(&a.uri("acme/disk"), false);
    assert!(out.contains("err= 0"), "{out}");
    let out = qemu_io(&a.uri("acme/disk"), &["write -P 0 40M 4M", "flush"]);
    assert!(out.contains("wrote 4194304/4194304"), "{out}");

    a.server.as_mut().unwrap().kill();
    let killed = Instant::now();
    let b_uri = b.uri("acme/disk");
    wait_for(
        "host b to take the shard over",
        Duration::from_secs(60),
        || a.locate("acme/disk").as_deref() == Some(b_uri.as_str()) && reads(&b_uri, "read 0 4k"),
    );
    let takeover = killed.elapsed();
    eprintln!(
        "takeover: host b served the volume {:.1} s after host a was killed",
        takeover.as_secs_f64()
    );
    // Lease 8 s and grace 2 s after the last renewal (at most 2 s before
    // the kill), plus a poll and the store's open.
    assert!(takeover < Duration::from_secs(30), "took {takeover:?}");
    b.server()
        .wait_for_log("taking the shard over", 1, Duration::from_secs(5));

    // Every flushed block, through host b.
    let out = fio(&b_uri, true);
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
    let out = qemu_io(&b_uri, &["read -P 0 40M 4M"]);
    assert!(out.contains("read 4194304/4194304"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Host b seals zeros too; no block in the bucket is another's copy, so
    // no (writer key, nonce) pair was used twice across the two hosts.
    let out = qemu_io(&b_uri, &["write -P 0 44M 4M", "flush"]);
    assert!(out.contains("wrote 4194304/4194304"), "{out}");
    let (blocks, duplicates) = sealed_blocks(&prefix);
    assert!(blocks >= (32 + 8) * 256, "{blocks} sealed blocks");
    assert_eq!(
        duplicates, 0,
        "{duplicates} of {blocks} sealed blocks repeat"
    );

    b.server.as_mut().unwrap().stop();
    assert_eq!(
        a.holders(),
        vec![None, None],
        "a clean stop releases the leases"
    );
}

#[test]
fn a_paused_host_acknowledges_nothing_once_another_took_its_shard() {
    require_all(&["qemu-io"]);
    let tmp = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("cluster-pause");
    let mut a = Host::new(tmp.path(), "a", &prefix, None, SHORT);
    let mut b = Host::new(tmp.path(), "b", &prefix, Some(&a.key()), SHORT);
    start_a_then_b(&mut a, &mut b, Duration::from_secs(30));
    cli_on_ok(a.store(), &["tenant", "create", "acme"]);
    cli_on_ok(
        a.store(),
        &["volume", "create", "acme/disk", "--size", "16M"],
    );
    let out = qemu_io(&a.uri("acme/disk"), &["write -P 0x5a 0 1M", "flush"]);
    assert!(out.contains("wrote 1048576/1048576"), "{out}");

    // A client of host a sends writes and flushes, and host a is stopped
    // in the middle of them.
    let stream = UnixStream::connect(a.dir.join("nbd.sock")).unwrap();
    let reader = stream.try_clone().unwrap();
    let mut raw = Raw::over(stream);
    raw.handshake(blockseal_test_support::wire::C_FIXED_NEWSTYLE);
    raw.go("acme/disk");
    let payload = vec![0x33u8; 64 << 10];
    let mut sent = 0u64;
    for i in 0..32u64 {
        raw.request(0, CMD_WRITE, i, (2 << 20) + i * (64 << 10), 64 << 10);
        raw.send(&payload);
        sent += 1;
        if i % 8 == 7 {
            raw.request(0, CMD_FLUSH, 1000 + i, 0, 0);
            sent += 1;
        }
    }
    let paused = Paused::new(a.server().pid());
    // What host a answered before it stopped is in the socket already.
    reader
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut before = 0u64;
    while before < sent {
        match try_reply(&mut raw) {
            Some(_) => before += 1,
            None => break,
        }
    }

    // Host b takes the shard over once a's lease lapsed, and serves a read.
    let b_uri = b.uri("acme/disk");
    wait_for(
        "host b to take the shard over",
        Duration::from_secs(30),
        || {
            a.locate("acme/disk").as_deref() == Some(b_uri.as_str())
                && reads(&b_uri, "read -P 0x5a 0 1M")
        },
    );

    drop(paused);
    reader
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut refused = 0u64;
    while before + refused < sent {
        match try_reply(&mut raw) {
            Some((error, handle)) => {
                assert!(
                    error == ESHUTDOWN || error == EIO,
                    "host a acknowledged request {handle} (error {error}) after host b took \
                     its shard"
                );
                refused += 1;
            }
            // Closed: nothing more comes.
            None => break,
        }
    }
    eprintln!(
        "{sent} requests: {before} answered before the pause, {refused} refused after it, \
         {} dropped with the connection",
        sent - before - refused
    );
    // Host a saw it lost the lease (its renewal found b's, or its deadline
    // passed first) and closed the shard.
    wait_for(
        "host a to give the shard up",
        Duration::from_secs(30),
        || {
            let log = a.server().log();
            (log.contains("lease lost: another host changed it")
                || log.contains("lease not renewed in time"))
                && log.contains("shard closed")
        },
    );
    assert!(raw.closed(), "host a closed its client's connection");
    // What a flushed before the pause is on b.
    let out = qemu_io(&b_uri, &["read -P 0x5a 0 1M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    a.server.as_mut().unwrap().stop();
    b.server.as_mut().unwrap().stop();
}

/// A process stopped with SIGSTOP until this drops (also when the test
/// fails, so that nothing waits on a stopped server).
struct Paused(String);

impl Paused {
    fn new(pid: u32) -> Paused {
        let pid = pid.to_string();
        run_ok(Command::new("kill").args(["-STOP", &pid]));
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = run(Command::new("kill").args(["-CONT", &self.0]));
    }
}

/// Whether qemu-io runs `command` on `uri` without an error.
fn reads(uri: &str, command: &str) -> bool {
    // Bounded: a paused host accepts the connection and never answers.
    let out = run(Command::new("timeout").args(["10", "qemu-io", "-f", "raw", "-c", command, uri]));
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("read ") && !text.contains("verification failed")
}

/// A simple reply `(error, handle)`, or `None` when the connection closed
/// or nothing came within the read timeout.
fn try_reply(raw: &mut Raw) -> Option<(u32, u64)> {
    use std::io::Read;
    let mut header = [0u8; 16];
    match raw.stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(_) => return None,
    }
    assert_eq!(
        u32::from_be_bytes(header[..4].try_into().unwrap()),
        blockseal_test_support::wire::SIMPLE_MAGIC
    );
    Some((
        u32::from_be_bytes(header[4..8].try_into().unwrap()),
        u64::from_be_bytes(header[8..].try_into().unwrap()),
    ))
}

#[test]
fn a_planned_move_hands_a_shard_over_and_admin_commands_go_to_its_holder() {
    require_all(&["qemu-io"]);
    let tmp = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("cluster-move");
    let one = format!("{SHORT}max_shards = 1\n");
    let mut a = Host::new(tmp.path(), "a", &prefix, None, &one);
    let mut b = Host::new(tmp.path(), "b", &prefix, Some(&a.key()), &one);
    a.start();
    b.start();
    wait_for(
        "each host to serve one shard",
        Duration::from_secs(30),
        || {
            let holders = a.holders();
            holders.contains(&Some("a".into())) && holders.contains(&Some("b".into()))
        },
    );
    for host in [&a, &b] {
        host.server()
            .wait_for_log("serving the shard", 1, Duration::from_secs(30));
    }

    // A tenant is created on the host serving its shard; the other says
    // where to go.
    let mut on_a = None;
    for i in 0..16 {
        let tenant = format!("t{i}");
        let out = cli_on(a.store(), &["tenant", "create", &tenant]);
        if out.status.success() {
            on_a = Some(tenant);
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("does not serve now") && stderr.contains("cluster locate"),
            "{stderr}"
        );
    }
    let tenant = on_a.expect("some tenant lands in a's shard");
    let export = format!("{tenant}/disk");
    cli_on_ok(a.store(), &["volume", "create", &export, "--size", "16M"]);
    let listed = cli_on_ok(a.store(), &["tenant", "list"]);
    assert!(listed.contains(&tenant), "{listed}");
    let out = qemu_io(&a.uri(&export), &["write -P 0x6c 0 2M", "flush"]);
    assert!(out.contains("wrote 2097152/2097152"), "{out}");

    // A connected client is closed by the move; it reconnects to b.
    let mut raw = Raw::connect(&a.dir.join("nbd.sock"));
    raw.handshake(blockseal_test_support::wire::C_FIXED_NEWSTYLE);
    raw.go(&export);
    let shard = {
        let out = a.cluster(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["holder"] == "a")
            .unwrap()["shard"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // b may serve it only if b has room: lift its cap by moving as asked.
    let out = a.cluster(&["move", &shard, "b", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert!(raw.closed(), "the move closes the shard's connections on a");
    assert_eq!(a.locate(&export), Some(b.uri(&export)));
    let out = qemu_io(&b.uri(&export), &["read -P 0x6c 0 2M"]);
    assert!(out.contains("read 2097152/2097152"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // b serves the tenant's admin commands now; a sends them on.
    let shown = cli_on_ok(b.store(), &["volume", "show", &export]);
    assert!(shown.contains("16"), "{shown}");
    let out = cli_on(a.store(), &["volume", "show", &export]);
    assert!(!out.status.success());
    a.server.as_mut().unwrap().stop();
    b.server.as_mut().unwrap().stop();
}

/// Rounds of [`failover_rounds_lose_no_flushed_write`]: a short smoke here;
/// `scripts/failover-heavy.sh` runs many.
fn rounds() -> u64 {
    std::env::var("BLOCKSEAL_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// Three hosts; each round writes and flushes through the host serving the
/// volume, then kills it (kill -9, restarted after) or pauses it past its
/// lease (SIGSTOP, then SIGCONT), chosen by a seeded generator; another host
/// must take over and hold every block flushed in every round so far. The
/// seed is printed first; `BLOCKSEAL_FAILOVER_SEED` replays a run.
#[test]
fn failover_rounds_lose_no_flushed_write() {
    use rand::{Rng, SeedableRng};
    require_all(&["qemu-io"]);
    let seed = std::env::var("BLOCKSEAL_FAILOVER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let rounds = rounds();
    eprintln!("failover: seed={seed} rounds={rounds}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("cluster-rounds");
    let mut hosts = vec![Host::new(tmp.path(), "a", &prefix, None, SHORT)];
    let key = hosts[0].key();
    for name in ["b", "c"] {
        hosts.push(Host::new(tmp.path(), name, &prefix, Some(&key), SHORT));
    }
    for host in &mut hosts {
        host.start();
    }
    wait_for("every shard served", Duration::from_secs(30), || {
        hosts[0].holders().iter().all(Option::is_some)
    });
    let export = "acme/disk";
    let holder_of = |hosts: &[Host]| -> usize {
        let mut found = None;
        wait_for(
            "a host to serve the volume",
            Duration::from_secs(60),
            || {
                found = hosts[0].locate(export).and_then(|uri| {
                    hosts
                        .iter()
                        .position(|h| h.uri(export) == uri)
                        .filter(|_| reads(&uri, "read 0 4k"))
                });
                found.is_some()
            },
        );
        found.unwrap()
    };
    // The tenant is created on whichever host serves its shard.
    let mut first = None;
    wait_for(
        "a host to create the tenant",
        Duration::from_secs(30),
        || {
            first = hosts.iter().position(|h| {
                cli_on(h.store(), &["tenant", "create", "acme"])
                    .status
                    .success()
            });
            first.is_some()
        },
    );
    let first = first.unwrap();
    cli_on_ok(
        hosts[first].store(),
        &["volume", "create", export, "--size", "16M"],
    );

    // The pattern byte of each flushed 64 KiB chunk (0: never written).
    let mut model = vec![0u8; 256];
    let mut kills = 0;
    let mut pauses = 0;
    for round in 0..rounds {
        let at = holder_of(&hosts);
        let mut commands = Vec::new();
        for _ in 0..8 {
            let chunk = rng.random_range(0..256usize);
            let value = rng.random_range(1..=255u8);
            model[chunk] = value;
            commands.push(format!("write -P {value} {} 64k", chunk * 65536));
        }
        commands.push("flush".into());
        let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        let out = qemu_io(&hosts[at].uri(export), &refs);
        assert!(
            !out.contains("error") && !out.contains("failed"),
            "round {round} (seed {seed}): {out}"
        );
        let pause = rng.random_bool(0.5);
        if pause {
            pauses += 1;
            let paused = Paused::new(hosts[at].server().pid());
            let next = holder_of(&hosts);
            assert_ne!(next, at, "round {round} (seed {seed})");
            drop(paused);
            verify(&hosts[next], export, &model, seed, round);
        } else {
            kills += 1;
            hosts[at].server.as_mut().unwrap().kill();
            let next = holder_of(&hosts);
            assert_ne!(next, at, "round {round} (seed {seed})");
            verify(&hosts[next], export, &model, seed, round);
            hosts[at].server.as_mut().unwrap().restart();
        }
    }
    eprintln!(
        "failover summary: seed={seed} rounds={rounds} kills={kills} pauses={pauses} \
         lost_flushed_writes=0"
    );
    for host in &mut hosts {
        host.server.as_mut().unwrap().stop();
    }
}

/// Every chunk of `model` reads back through `host`.
#[track_caller]
fn verify(host: &Host, export: &str, model: &[u8], seed: u64, round: u64) {
    let commands: Vec<String> = model
        .iter()
        .enumerate()
        .map(|(chunk, value)| format!("read -P {value} {} 64k", chunk * 65536))
        .collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = qemu_io(&host.uri(export), &refs);
    assert!(
        !out.contains("verification failed") && !out.contains("error"),
        "round {round} (seed {seed}): a flushed write is missing on host {}: {out}",
        host.name
    );
}
