//! kill -9 crash suite for every metadata-store backend.
//!
//! For each backend a parent test re-executes this test binary as a child (the
//! ignored test [`crash_child`], told so by environment variables) that commits
//! numbered batches as fast as it can into one store directory and prints
//! `ack <i>` after each commit returns. The parent SIGKILLs the child at a random
//! moment (sometimes during startup and open, mostly in steady state), reopens the
//! store and checks it against the state the deterministic workload must have
//! after batch `last`:
//!
//! - the store opens (a failure to reopen is recorded with its error);
//! - `last` is at least every acked batch and the `last` seen at the previous
//!   reopen (no acked batch lost);
//! - every key holds exactly what the newest batch `<= last` wrote to it, and no
//!   key shows a batch `> last` (batches are whole, no later batch half applied).
//!
//! The directory is kept between kills, so state and recovery work accumulate.
//!
//! The number of kills per backend comes from `BLOCKSEAL_CRASH_KILLS` (default 25);
//! `BLOCKSEAL_CRASH_SEED` fixes the random kill points (the workload itself is
//! deterministic). Without it the seed is random; it is printed at the start,
//! in the summary and in every failure message, so a failing run can be
//! replayed (where a kill lands still depends on timing). The heavy run, which
//! `scripts/crash-heavy.sh` makes too:
//!
//! ```text
//! BLOCKSEAL_CRASH_KILLS=250 cargo test --release -p blockseal-volume --test meta_crash -- --nocapture
//! ```
//!
//! A store that fails a check is copied to the system temp directory (the path is
//! printed) so the failure can be replayed by opening it.

mod common {
    pub mod moto;
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockseal_volume::meta::{self, BackendKind, Batch, MetaStore};
use common::moto;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Set in the child's environment: the store directory.
const CHILD_DIR: &str = "BLOCKSEAL_CRASH_CHILD_DIR";
/// Set in the child's environment: `sled`, `redb`, `slatedb` or `slatedb-s3`.
const CHILD_BACKEND: &str = "BLOCKSEAL_CRASH_CHILD_BACKEND";
/// Set in the child's environment for `slatedb-s3`: the moto server's URL.
const CHILD_S3_ENDPOINT: &str = "BLOCKSEAL_CRASH_CHILD_S3_ENDPOINT";
/// The test the parent re-executes.
const CHILD_TEST: &str = "crash_child";

/// Keys overwritten in rotation: batch `i` writes `WIDTH` consecutive ones.
const SLOTS: u64 = 64;
const WIDTH: u64 = 8;
/// Batch markers older than this many batches are deleted by later batches.
const MARKER_WINDOW: u64 = 500;
/// Every `BIG_EVERY`th batch rewrites one large value.
const BIG_EVERY: u64 = 50;
const BIG_LEN: usize = 64 << 10;

#[test]
fn sled_survives_kill_9() {
    run_parent(Target::Local(BackendKind::Sled));
}

#[test]
fn redb_survives_kill_9() {
    run_parent(Target::Local(BackendKind::Redb));
}

#[test]
fn slatedb_survives_kill_9() {
    run_parent(Target::Local(BackendKind::SlateDb));
}

/// SlateDB in a bucket of a moto server: each reopen fences the killed writer.
#[test]
fn slatedb_on_s3_survives_kill_9() {
    run_parent(Target::S3);
}

/// Where the store lives: a backend in a local directory, or SlateDB in the
/// test's moto bucket under a prefix named after that directory.
#[derive(Debug, Clone, Copy)]
enum Target {
    Local(BackendKind),
    S3,
}

fn open(target: Target, dir: &Path) -> Result<Box<dyn MetaStore>, meta::MetaError> {
    match target {
        Target::Local(kind) => meta::open(kind, dir),
        Target::S3 => {
            let store = match std::env::var(CHILD_S3_ENDPOINT) {
                Ok(endpoint) => moto::store_at(&endpoint),
                Err(_) => moto::bucket(),
            };
            let prefix = format!("crash/{}", dir.file_name().unwrap().to_str().unwrap());
            meta::open_object_store(store, &prefix, &meta::OpenOptions::new())
        }
    }
}

/// The child workload; does nothing unless started by a parent.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn crash_child() {
    let (Ok(dir), Ok(backend)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_BACKEND)) else {
        return;
    };
    let kind = parse_backend(&backend);
    // The parent's own check of the previous round may still be letting go
    // of the store (sled's I/O threads hold its files a moment after the
    // handle drops): wait for it, boundedly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let store = loop {
        match open(kind, Path::new(&dir)) {
            Err(meta::MetaError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => break result.expect("child: open store"),
        }
    };
    let mut i = read_last(&*store).expect("child: read last") + 1;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {i}").unwrap();
    out.flush().unwrap();
    loop {
        store.commit(&batch(i)).expect("child: commit");
        // Written straight to stdout, not through the test harness's capture.
        writeln!(out, "ack {i}").unwrap();
        out.flush().unwrap();
        i += 1;
    }
}

/// The changes batch `i` makes.
fn batch(i: u64) -> Batch {
    let mut batch = Batch::new();
    for j in 0..WIDTH {
        batch.put(
            slot_key((i * WIDTH + j) % SLOTS),
            value(i, 8 + (i % 57) as usize),
        );
    }
    batch.put(marker_key(i), value(i, 8));
    if i > MARKER_WINDOW {
        batch.delete(marker_key(i - MARKER_WINDOW));
    }
    if i.is_multiple_of(BIG_EVERY) {
        batch.put(b"big".to_vec(), value(i, BIG_LEN));
    }
    batch.put(b"last".to_vec(), i.to_be_bytes().to_vec());
    batch
}

/// The whole store content the workload leaves once batches `1..=last` applied.
fn expected_state(last: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    if last == 0 {
        return state;
    }
    state.insert(b"last".to_vec(), last.to_be_bytes().to_vec());
    // Slot s was last written by the newest batch i <= last with
    // (i * WIDTH) % SLOTS == s - s % WIDTH; batches cycle every SLOTS / WIDTH.
    let cycle = SLOTS / WIDTH;
    for i in last.saturating_sub(cycle - 1).max(1)..=last {
        for j in 0..WIDTH {
            state.insert(
                slot_key((i * WIDTH + j) % SLOTS),
                value(i, 8 + (i % 57) as usize),
            );
        }
    }
    for i in last.saturating_sub(MARKER_WINDOW - 1).max(1)..=last {
        state.insert(marker_key(i), value(i, 8));
    }
    if last >= BIG_EVERY {
        let i = last - last % BIG_EVERY;
        state.insert(b"big".to_vec(), value(i, BIG_LEN));
    }
    state
}

fn slot_key(slot: u64) -> Vec<u8> {
    format!("k/{slot:03}").into_bytes()
}

fn marker_key(i: u64) -> Vec<u8> {
    let mut key = b"batch/".to_vec();
    key.extend_from_slice(&i.to_be_bytes());
    key
}

/// A value that names its batch in its first 8 bytes, padded to `len`.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; len.max(8)];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v
}

fn read_last(store: &dyn MetaStore) -> Result<u64, String> {
    match store.get(b"last").map_err(|e| format!("{e:?}"))? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| format!("last is {v:?}"))?,
        )),
    }
}

fn parse_backend(name: &str) -> Target {
    match name {
        "sled" => Target::Local(BackendKind::Sled),
        "redb" => Target::Local(BackendKind::Redb),
        "slatedb" => Target::Local(BackendKind::SlateDb),
        "slatedb-s3" => Target::S3,
        other => panic!("unknown backend {other}"),
    }
}

fn backend_name(target: Target) -> &'static str {
    match target {
        Target::Local(BackendKind::Sled) => "sled",
        Target::Local(BackendKind::Redb) => "redb",
        Target::Local(BackendKind::SlateDb) => "slatedb",
        Target::S3 => "slatedb-s3",
        other => panic!("no crash workload for {other:?}"),
    }
}

#[derive(Default)]
struct Summary {
    kills: u32,
    /// Kills that landed before the child acked its first batch.
    early_kills: u32,
    batches_acked: u64,
    /// Batches whose effects were checked whole after a reopen (the final `last`).
    batches_verified: u64,
    reopen_failures: Vec<String>,
    lost_acked: Vec<String>,
    torn: Vec<String>,
    child_errors: Vec<String>,
    reopen_times: Vec<Duration>,
}

impl Summary {
    fn failures(&self) -> usize {
        self.reopen_failures.len()
            + self.lost_acked.len()
            + self.torn.len()
            + self.child_errors.len()
    }

    fn report(&self, backend: &str, seed: u64) -> String {
        let mut times = self.reopen_times.clone();
        times.sort();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        let max = times.last().copied().unwrap_or_default();
        let mut text = format!(
            "crash summary {backend} (seed {seed}): kills {} ({} before the first ack), \
             batches acked {}, batches verified {}, failures {} \
             (reopen {}, lost acked {}, torn {}, child errors {}), \
             reopen median {median:?} max {max:?}",
            self.kills,
            self.early_kills,
            self.batches_acked,
            self.batches_verified,
            self.failures(),
            self.reopen_failures.len(),
            self.lost_acked.len(),
            self.torn.len(),
            self.child_errors.len(),
        );
        for line in self
            .reopen_failures
            .iter()
            .chain(&self.lost_acked)
            .chain(&self.torn)
            .chain(&self.child_errors)
            .take(20)
        {
            text.push_str("\n  ");
            text.push_str(line);
        }
        text
    }
}

fn run_parent(kind: Target) {
    let backend = backend_name(kind);
    let kills: u32 = env_or("BLOCKSEAL_CRASH_KILLS", 25);
    let seed: u64 = env_or("BLOCKSEAL_CRASH_SEED", rand::random());
    let replay = format!("seed {seed}; replay with BLOCKSEAL_CRASH_SEED={seed}");
    println!("crash test {backend}: {kills} kills, {replay}");
    let summary = match catch_unwind(AssertUnwindSafe(|| kill_and_check(kind, kills, seed))) {
        Ok(summary) => summary,
        Err(panic) => panic!(
            "crash test {backend} failed: {} ({replay})",
            panic_text(&panic)
        ),
    };
    let report = summary.report(backend, seed);
    println!("{report}");
    // One line in a fixed form, for scripts/crash-heavy.sh: a lost acked batch
    // is a lost flushed write (a commit is durable when it returns).
    println!(
        "crash summary: test=meta_crash backend={backend} seed={seed} kills={} \
         lost_flushed_writes={} torn={} reopen_failures={} child_errors={}",
        summary.kills,
        summary.lost_acked.len(),
        summary.torn.len(),
        summary.reopen_failures.len(),
        summary.child_errors.len(),
    );
    assert_eq!(summary.failures(), 0, "{report}\n({replay})");
}

/// Kills `kills` children at moments drawn from `seed`, checking the store
/// after each; stops at the first failed check.
fn kill_and_check(kind: Target, kills: u32, seed: u64) -> Summary {
    let backend = backend_name(kind);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut summary = Summary::default();
    // The `last` seen at the previous reopen: it may never go back.
    let mut floor = 0u64;

    for round in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_BACKEND, backend)
            .envs(match kind {
                Target::S3 => Some((CHILD_S3_ENDPOINT, moto::moto().endpoint.clone())),
                Target::Local(_) => None,
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let (acks, acked) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut highest = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.strip_prefix("ack ").and_then(|i| i.parse().ok()) {
                    highest = i;
                    let _ = acks.send(i);
                }
            }
            highest
        });
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });

        // One kill in five lands anywhere from exec through open and recovery;
        // the rest wait for the first ack and then land in steady state.
        let mut no_ack = None;
        if rng.random_bool(0.2) {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..40_000)));
        } else {
            match acked.recv_timeout(Duration::from_secs(60)) {
                Ok(_) => std::thread::sleep(Duration::from_micros(rng.random_range(0..100_000))),
                Err(e) => no_ack = Some(e),
            }
        }
        let already_exited = child.try_wait().unwrap();
        let _ = child.kill();
        let status = child.wait().unwrap();
        let highest_acked = reader.join().unwrap();
        let child_stderr = errors.join().unwrap();
        summary.kills += 1;
        if highest_acked == 0 {
            summary.early_kills += 1;
        }
        if let Some(e) = no_ack {
            // With what the child said: it may have failed to open the store.
            summary.child_errors.push(format!(
                "round {round}: no ack from the child ({e}); its stderr: {}",
                child_stderr.trim()
            ));
        }
        if let Some(status) = already_exited {
            summary.child_errors.push(format!(
                "round {round}: child exited by itself ({status}): {}",
                child_stderr.trim()
            ));
        }
        let _ = status;
        summary.batches_acked += highest_acked.saturating_sub(floor);

        // Reopen and check.
        let started = Instant::now();
        let opened = catch_unwind(AssertUnwindSafe(|| open(kind, dir.path())));
        let store = match opened {
            Ok(Ok(store)) => store,
            Ok(Err(e)) => {
                summary.reopen_failures.push(format!(
                    "round {round}: did not reopen: {e} ({e:?}); copy kept at {}",
                    keep_copy(dir.path(), backend, seed)
                ));
                break;
            }
            Err(panic) => {
                summary.reopen_failures.push(format!(
                    "round {round}: open panicked: {}; copy kept at {}",
                    panic_text(&panic),
                    keep_copy(dir.path(), backend, seed)
                ));
                break;
            }
        };
        summary.reopen_times.push(started.elapsed());
        let problems = check(&*store, floor.max(highest_acked));
        match problems {
            Ok(last) => {
                floor = last;
            }
            Err(Problem::LostAcked(text)) => {
                summary.lost_acked.push(format!(
                    "round {round}: {text}; copy kept at {}",
                    keep_copy(dir.path(), backend, seed)
                ));
                break;
            }
            Err(Problem::Torn(text)) => {
                summary.torn.push(format!(
                    "round {round}: {text}; copy kept at {}",
                    keep_copy(dir.path(), backend, seed)
                ));
                break;
            }
        }
    }
    summary.batches_verified = floor;
    summary
}

enum Problem {
    LostAcked(String),
    Torn(String),
}

/// Checks the reopened store against the workload; returns its `last`.
fn check(store: &dyn MetaStore, must_have: u64) -> Result<u64, Problem> {
    let last = read_last(store).map_err(Problem::Torn)?;
    if last < must_have {
        return Err(Problem::LostAcked(format!(
            "last is {last} but batch {must_have} was acked"
        )));
    }
    let expected = expected_state(last);
    let mut actual = BTreeMap::new();
    store
        .scan(b"", None, &mut |k, v| {
            actual.insert(k.to_vec(), v.to_vec());
            true
        })
        .map_err(|e| Problem::Torn(format!("scan failed: {e:?}")))?;
    if actual == expected {
        return Ok(last);
    }
    let mut diffs = Vec::new();
    for key in expected
        .keys()
        .chain(actual.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (want, got) = (expected.get(key), actual.get(key));
        if want != got {
            diffs.push(format!(
                "{}: want batch {:?} got batch {:?}",
                String::from_utf8_lossy(key),
                want.map(|v| batch_of(v)),
                got.map(|v| batch_of(v)),
            ));
        }
    }
    let future = actual
        .values()
        .filter(|v| v.len() >= 8 && batch_of(v) > last)
        .count();
    Err(Problem::Torn(format!(
        "last {last}: {} keys differ ({future} show a batch after last), first: {}",
        diffs.len(),
        diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    )))
}

fn batch_of(value: &[u8]) -> u64 {
    value
        .get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .unwrap_or(u64::MAX)
}

/// Copies the store's directory where it survives the test; says where.
fn keep_copy(dir: &Path, backend: &str, seed: u64) -> String {
    if backend == "slatedb-s3" {
        return "nowhere (the store was in the test's moto server)".into();
    }
    let target = std::env::temp_dir().join(format!("blockseal-crash-{backend}-{seed}"));
    let _ = copy_dir(dir, &target);
    target.display().to_string()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".to_string())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} does not parse")),
        Err(_) => default,
    }
}

#[test]
fn expected_state_matches_applying_batches() {
    // The closed-form model agrees with applying the batches one by one.
    let mut state = BTreeMap::new();
    for last in 1..=1_200u64 {
        for (key, value) in batch(last).ops() {
            match value {
                Some(value) => state.insert(key.clone(), value.clone()),
                None => state.remove(key),
            };
        }
        if last % 97 == 0 || last < 70 || last == 1_200 {
            assert_eq!(state, expected_state(last), "after batch {last}");
        }
    }
}
