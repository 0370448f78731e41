//! kill -9 crash test of the whole write path: segments, overlay, flush, metadata.
//!
//! The test re-executes its own binary as a child (selected by an environment
//! variable). The child opens a store, then writes random block patterns (a
//! fifth of them as batches of two to four writes, `Volume::write_batch`), trims
//! now and then and flushes periodically, reporting on stdout each write's intent
//! (`W`), its acknowledgement (`A`), and each flush's start (`F`) and completion
//! (`D`). Compaction runs all the while: the store's background thread with an
//! aggressive threshold and no throttle, plus a thread calling `compact_now` in a
//! loop, which reports what each pass did (`C moved deleted`). The parent
//! SIGKILLs the child at a random moment (often in the middle of a compaction),
//! reopens the store and checks every block:
//!
//! - (a) a block whose last write was acknowledged before a completed flush began
//!   reads back exactly that write (or a version written after it);
//! - (b) every block reads as some version that was written (or zeros);
//! - (c) no block fails authentication.
//!
//! The parent then takes what it read as the new durable baseline and starts the
//! next child on the same store, so recovery is exercised repeatedly. Every
//! metadata backend runs, redb, sled, SlateDB on a local directory, and then
//! a store whose SlateDB metadata and segments are both in a bucket of a
//! moto S3 server the test starts, each on a store of its own.
//!
//! Every other child starts by rotating the volume's data key (`R`), so the
//! store's background re-encryption (unthrottled) runs beside the writes and
//! compaction, and kills land in its steps too; jobs left unfinished resume in
//! the next child. At the end the parent finishes the job with
//! `reencrypt_now`, checks that only the newest key is left, and reads every
//! block again.
//!
//! `BLOCKSEAL_CRASH_KILLS` sets the number of kills per backend (default 20).
//! `BLOCKSEAL_CRASH_SEED` sets the seed of every random choice, the parent's
//! (when to kill) and the children's (what to write); without it the seed is
//! random. The seed is printed at the start, in the summary line of each
//! backend and in every failure message, so a failing run can be replayed:
//! the same seed makes the same workloads and kill delays (where a kill lands
//! in the child's work still depends on timing). A failed check stops that
//! backend's run at the kill that showed it, and the summary counts the blocks
//! that lost a flushed write and those that failed authentication.
//! `scripts/crash-heavy.sh` runs 250 kills per backend in release mode:
//!
//! ```text
//! BLOCKSEAL_CRASH_KILLS=250 cargo test --release -p blockseal-volume --test volume_crash -- --nocapture
//! ```

mod common {
    pub mod moto;
    pub mod volume;
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockseal_volume::meta::{self, BackendKind, MetaStore};
use blockseal_volume::segment::ObjectSegments;
use blockseal_volume::{ErrorKind, Store, StoreOptions, Volume};
use common::volume::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "BLOCKSEAL_CRASH_CHILD_DIR";
const BACKEND_ENV: &str = "BLOCKSEAL_CRASH_CHILD_BACKEND";
/// The first write id the child uses (each child gets a range of its own).
const FIRST_ID_ENV: &str = "BLOCKSEAL_CRASH_CHILD_FIRST_ID";
/// The seed of the child's workload, drawn by the parent.
const CHILD_SEED_ENV: &str = "BLOCKSEAL_CRASH_CHILD_SEED";
/// Kills per backend.
const KILLS_ENV: &str = "BLOCKSEAL_CRASH_KILLS";
/// The seed of the whole run.
const SEED_ENV: &str = "BLOCKSEAL_CRASH_SEED";
const BLOCKS: u64 = 2048;
const BS: usize = 4096;

/// Set in the child's environment for `s3`: the moto server's URL.
const S3_ENDPOINT_ENV: &str = "BLOCKSEAL_CRASH_CHILD_S3_ENDPOINT";

/// Where a store keeps its metadata and segments: a metadata backend in the
/// store directory beside segment files, or both in the test's moto bucket
/// under a prefix named after the store directory.
#[derive(Debug, Clone, Copy)]
enum Target {
    Local(BackendKind),
    S3,
}

fn s3_bucket() -> Arc<dyn object_store::ObjectStore> {
    match std::env::var(S3_ENDPOINT_ENV) {
        Ok(endpoint) => common::moto::store_at(&endpoint),
        Err(_) => common::moto::bucket(),
    }
}

fn s3_prefix(dir: &Path) -> String {
    format!("crash/{}", dir.file_name().unwrap().to_str().unwrap())
}

/// Opens the store's metadata alone.
fn open_meta(target: Target, dir: &Path) -> Box<dyn MetaStore> {
    match target {
        Target::Local(backend) => meta::open(backend, &dir.join("meta")).unwrap(),
        Target::S3 => meta::open_object_store(
            s3_bucket(),
            &format!("{}/meta", s3_prefix(dir)),
            &meta::OpenOptions::new(),
        )
        .unwrap(),
    }
}

fn options(target: Target, dir: &Path) -> StoreOptions {
    let options = match target {
        Target::Local(backend) => StoreOptions::new().backend(backend),
        Target::S3 => StoreOptions::new()
            .metadata_store(Arc::from(open_meta(target, dir)))
            .segment_store(Arc::new(
                ObjectSegments::new(s3_bucket(), &format!("{}/segments", s3_prefix(dir))).unwrap(),
            )),
    };
    // Small segments and overlay so rollover and overlay-triggered commits happen,
    // and a threshold that makes most sealed segments worth compacting.
    options
        .segment_bytes(1 << 20)
        .overlay_blocks(512)
        .compaction_threshold(0.75)
        .compaction_rate(u64::MAX)
        .compaction_interval(Duration::from_millis(20))
        .reencrypt_rate(u64::MAX)
}

/// The content of version `id` of block `lba` (id 0: zeros).
fn content(id: u64, lba: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0; BS];
    }
    pattern((id << 20) ^ lba, BS)
}

#[test]
fn crash_child() {
    // Only does something when the parent runs this binary as a child.
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let backend = match std::env::var(BACKEND_ENV).as_deref() {
        Ok("sled") => Target::Local(BackendKind::Sled),
        Ok("slatedb") => Target::Local(BackendKind::SlateDb),
        Ok("s3") => Target::S3,
        _ => Target::Local(BackendKind::Redb),
    };
    let mut id: u64 = std::env::var(FIRST_ID_ENV).unwrap().parse().unwrap();
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    // Two children in three journal every change of this small volume (51
    // mapping pages); the others keep the default, under which most of its
    // commits rewrite their pages.
    let options = if seed.is_multiple_of(3) {
        options(backend, Path::new(&dir))
    } else {
        options(backend, Path::new(&dir)).danger_journal_min_runs(1)
    };
    let (store, volume) = reopen(Path::new(&dir), options);
    let rotated = seed.is_multiple_of(2);
    if rotated {
        store
            .rotate_data_key(&tenant("acme"), &volume_id("disk"))
            .unwrap();
    }
    {
        let volume = volume.clone();
        std::thread::spawn(move || {
            loop {
                match volume.compact_now() {
                    Ok(report) => {
                        println!("C {} {}", report.blocks_moved, report.segments_deleted)
                    }
                    Err(e) => println!("CE {e}"),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    println!("READY");
    // After READY: libtest prefixes the first line with the test's name.
    if rotated {
        println!("R");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut flushes = 0u64;
    loop {
        let lba = rng.random_range(0..BLOCKS);
        let count = rng.random_range(1..=16).min(BLOCKS - lba);
        id += 1;
        match rng.random_range(0..100) {
            0..5 => {
                println!("W {id} {lba} {count} trim");
                volume.trim(lba * BS as u64, count * BS as u64).unwrap();
            }
            5..25 => {
                // Two to four writes in one batch, as the NBD server runs the
                // writes a connection finds queued together: they land in
                // order, and each is acknowledged once the batch returns (the
                // last one below, with the single writes).
                let mut batch = vec![(id, lba, count)];
                for _ in 1..rng.random_range(2..=4) {
                    id += 1;
                    let lba = rng.random_range(0..BLOCKS);
                    let count = rng.random_range(1..=16).min(BLOCKS - lba);
                    batch.push((id, lba, count));
                }
                let datas: Vec<Vec<u8>> = batch
                    .iter()
                    .map(|&(id, lba, count)| {
                        println!("W {id} {lba} {count}");
                        (lba..lba + count).flat_map(|b| content(id, b)).collect()
                    })
                    .collect();
                let writes: Vec<(u64, &[u8])> = batch
                    .iter()
                    .zip(&datas)
                    .map(|(&(_, lba, _), data)| (lba * BS as u64, &data[..]))
                    .collect();
                for result in volume.write_batch(&writes) {
                    result.unwrap();
                }
                for &(id, _, _) in &batch[..batch.len() - 1] {
                    println!("A {id}");
                }
            }
            _ => {
                println!("W {id} {lba} {count}");
                let mut data = Vec::with_capacity(count as usize * BS);
                for b in lba..lba + count {
                    data.extend_from_slice(&content(id, b));
                }
                volume.write_at(lba * BS as u64, &data).unwrap();
            }
        }
        println!("A {id}");
        if rng.random_range(0..20) == 0 {
            flushes += 1;
            println!("F {flushes}");
            volume.flush().unwrap();
            println!("D {flushes}");
        }
    }
}

/// What a block may read as.
#[derive(Clone, Default)]
struct BlockState {
    /// The version made durable by the last completed flush (0: zeros).
    stable: u64,
    /// Versions written (or intended) since.
    later: Vec<u64>,
}

#[derive(Default)]
struct Totals {
    kills: u64,
    /// Blocks that read as no version the workload allows: a flushed write lost
    /// (or data that was never written).
    lost_flushed_writes: u64,
    /// The first few of those, and of the authentication failures.
    failures: Vec<String>,
    acked_writes: u64,
    flushes: u64,
    verified_durable_blocks: u64,
    blocks_checked: u64,
    auth_failures: u64,
    compactions: u64,
    moved_blocks: u64,
    deleted_segments: u64,
    rotations: u64,
    /// Mapping journal records a kill left for the next open to fold.
    journal_records: u64,
    /// Kills after which there were some.
    kills_with_journal: u64,
}

#[test]
fn kill_nine_at_random_moments_loses_no_flushed_write() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let kills: u64 = env_or(KILLS_ENV, 20);
    let seed: u64 = env_or(SEED_ENV, rand::random());
    let replay = format!("seed {seed}; replay with {SEED_ENV}={seed}");
    eprintln!("crash test: {kills} kills per backend, {replay}");
    let started = Instant::now();
    let mut failed = Vec::new();
    let backends = [
        Target::Local(BackendKind::Redb),
        Target::Local(BackendKind::Sled),
        Target::Local(BackendKind::SlateDb),
        Target::S3,
    ];
    for (n, backend) in backends.into_iter().enumerate() {
        // Each backend draws from a stream of its own, so one replays alone.
        let backend_seed = seed.wrapping_add(n as u64);
        let mut totals = Totals::default();
        let run = catch_unwind(AssertUnwindSafe(|| {
            run_backend(backend, kills, backend_seed, &mut totals)
        }));
        if let Err(panic) = run {
            panic!(
                "crash test ({backend:?}) failed after {} kills: {} ({replay})",
                totals.kills,
                panic_text(&*panic)
            );
        }
        eprintln!(
            "crash test ({backend:?}): {} kills, {} acknowledged writes, {} completed flushes, \
             {} blocks verified as flushed, {} block reads checked, {} lost flushed writes, \
             {} auth failures; in the children {} compaction passes moved {} blocks and \
             deleted {} segments, {} data key rotations; {} kills left {} mapping journal \
             records to fold",
            totals.kills,
            totals.acked_writes,
            totals.flushes,
            totals.verified_durable_blocks,
            totals.blocks_checked,
            totals.lost_flushed_writes,
            totals.auth_failures,
            totals.compactions,
            totals.moved_blocks,
            totals.deleted_segments,
            totals.rotations,
            totals.kills_with_journal,
            totals.journal_records,
        );
        // The recovery of a journal a kill left must have been exercised.
        if totals.kills >= 5 && totals.kills_with_journal == 0 {
            failed.push(format!(
                "{backend:?}: no kill in {} left a mapping journal to fold",
                totals.kills
            ));
        }
        // One line per backend in a fixed form, for scripts/crash-heavy.sh.
        eprintln!(
            "crash summary: test=volume_crash backend={} seed={seed} kills={} \
             lost_flushed_writes={} auth_failures={}",
            backend_name(backend),
            totals.kills,
            totals.lost_flushed_writes,
            totals.auth_failures,
        );
        if totals.lost_flushed_writes + totals.auth_failures > 0 {
            failed.push(format!(
                "{backend:?}: {} lost flushed writes, {} auth failures by kill {}: {}",
                totals.lost_flushed_writes,
                totals.auth_failures,
                totals.kills,
                totals.failures.join("; ")
            ));
        }
    }
    eprintln!(
        "crash test: {} kills in {:?}",
        backends.len() as u64 * kills,
        started.elapsed()
    );
    assert!(failed.is_empty(), "{} ({replay})", failed.join("\n"));
}

/// Runs `kills` kills on a store of `backend`'s, stopping at the first kill
/// whose check finds a lost write or an authentication failure.
fn run_backend(backend: Target, kills: u64, seed: u64, totals: &mut Totals) {
    if kills == 0 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    drop(store_with_volume(
        dir.path(),
        BLOCKS * BS as u64,
        options(backend, dir.path()),
    ));
    let mut blocks = vec![BlockState::default(); BLOCKS as usize];
    let mut next_id = 1u64;
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..kills {
        let lines = run_child(
            dir.path(),
            backend,
            next_id,
            rng.random(),
            rng.random_range(5..250),
        );
        totals.kills += 1;
        next_id += 10_000_000;
        apply_log(&lines, &mut blocks, totals);
        // What the kill left in the mapping journal (the open folds it).
        let journal = {
            let meta = open_meta(backend, dir.path());
            let mut n = 0u64;
            meta.scan_prefix(b"J", &mut |_, _| {
                n += 1;
                true
            })
            .unwrap();
            n
        };
        totals.journal_records += journal;
        totals.kills_with_journal += u64::from(journal > 0);
        let store = Store::open(dir.path(), master(1), options(backend, dir.path())).unwrap();
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        check(&volume, &mut blocks, totals);
        if totals.lost_flushed_writes + totals.auth_failures > 0 {
            return;
        }
    }
    // Whatever the kills left of the re-encryption jobs finishes now.
    let store = Store::open(dir.path(), master(1), options(backend, dir.path())).unwrap();
    let volume = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    let report = volume.reencrypt_now().unwrap();
    assert!(report.finished, "re-encryption did not finish: {report:?}");
    let status = volume.data_key_status().unwrap();
    assert_eq!(status.keys.len(), 1, "{status:?}");
    assert_eq!(status.job, None);
    check(&volume, &mut blocks, totals);
}

fn run_child(dir: &Path, backend: Target, first_id: u64, seed: u64, delay_ms: u64) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(BACKEND_ENV, backend_name(backend))
        .envs(match backend {
            Target::S3 => Some((S3_ENDPOINT_ENV, common::moto::moto().endpoint.clone())),
            Target::Local(_) => None,
        })
        .env(FIRST_ID_ENV, first_id.to_string())
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test crash_child ... " before the output, unterminated.
            if line.ends_with("READY") {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child opens the store");
    // The kill lands at a random moment of the child's work.
    std::thread::sleep(Duration::from_millis(delay_ms));
    // Child::kill sends SIGKILL on Unix.
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

fn apply_log(lines: &[String], blocks: &mut [BlockState], totals: &mut Totals) {
    // Writes by id: (lba, count, is_trim).
    let mut writes: BTreeMap<u64, (u64, u64, bool)> = BTreeMap::new();
    // Per block, the newest acknowledged version not yet covered by a flush.
    let mut acked_since_flush: BTreeMap<u64, u64> = BTreeMap::new();
    // Acknowledged versions at the moment the current flush began.
    let mut at_flush_start: Option<BTreeMap<u64, u64>> = None;
    for line in lines {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["W", id, lba, count, rest @ ..] => {
                let (id, lba, count): (u64, u64, u64) = (
                    id.parse().unwrap(),
                    lba.parse().unwrap(),
                    count.parse().unwrap(),
                );
                let trim = rest.first() == Some(&"trim");
                writes.insert(id, (lba, count, trim));
                for b in lba..lba + count {
                    blocks[b as usize].later.push(if trim { 0 } else { id });
                }
            }
            ["A", id] => {
                let id: u64 = id.parse().unwrap();
                totals.acked_writes += 1;
                let (lba, count, trim) = writes[&id];
                for b in lba..lba + count {
                    acked_since_flush.insert(b, if trim { 0 } else { id });
                }
            }
            ["F", _] => at_flush_start = Some(acked_since_flush.clone()),
            ["R"] => totals.rotations += 1,
            ["CE", ..] => panic!("compaction failed in the child: {line}"),
            ["C", moved, deleted] => {
                totals.compactions += 1;
                totals.moved_blocks += moved.parse::<u64>().unwrap();
                totals.deleted_segments += deleted.parse::<u64>().unwrap();
            }
            ["D", _] => {
                totals.flushes += 1;
                // Everything acknowledged before the flush began is now durable;
                // versions intended before it can no longer come back.
                for (b, v) in at_flush_start.take().unwrap_or_default() {
                    let state = &mut blocks[b as usize];
                    state.stable = v;
                    if let Some(pos) = state.later.iter().position(|&x| x == v) {
                        state.later.drain(..=pos);
                    }
                    if acked_since_flush.get(&b) == Some(&v) {
                        acked_since_flush.remove(&b);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reads every block back: counts (and notes the first few of) the blocks that
/// fail authentication or read as no version the workload allows, and takes
/// what the others read as the new durable baseline.
fn check(volume: &Volume, blocks: &mut [BlockState], totals: &mut Totals) {
    let mut buf = vec![0u8; BS];
    for (lba, state) in blocks.iter_mut().enumerate() {
        let lba = lba as u64;
        totals.blocks_checked += 1;
        match volume.read_at(lba * BS as u64, &mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Authentication => {
                totals.auth_failures += 1;
                note(
                    totals,
                    format!(
                        "kill {}: block {lba} failed authentication: {e}",
                        totals.kills
                    ),
                );
                continue;
            }
            Err(e) => panic!("block {lba}: {e}"),
        }
        let candidates = std::iter::once(state.stable).chain(state.later.iter().copied());
        let Some(found) = candidates.clone().find(|&v| buf == content(v, lba)) else {
            totals.lost_flushed_writes += 1;
            note(
                totals,
                format!(
                    "kill {}: block {lba} reads as no version written: stable {}, later {:?}",
                    totals.kills, state.stable, state.later
                ),
            );
            continue;
        };
        if found == state.stable && state.stable != 0 {
            totals.verified_durable_blocks += 1;
        }
        // What a reopened store reads is durable: the next run starts from it.
        state.stable = found;
        state.later.clear();
    }
}

fn note(totals: &mut Totals, failure: String) {
    if totals.failures.len() < 5 {
        totals.failures.push(failure);
    }
}

fn backend_name(backend: Target) -> &'static str {
    match backend {
        Target::Local(BackendKind::Sled) => "sled",
        Target::Local(BackendKind::Redb) => "redb",
        Target::Local(BackendKind::SlateDb) => "slatedb",
        Target::S3 => "s3",
        other => panic!("no crash workload for {other:?}"),
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} does not parse")),
        Err(_) => default,
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".to_string())
}
