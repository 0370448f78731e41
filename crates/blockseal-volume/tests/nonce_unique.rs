//! No (key, nonce) pair ever seals two blocks: across reopens, a kill -9, lost
//! writer records, lost mappings and metadata restored from an older copy.
//!
//! Every write here seals blocks of zeros, so each sealed block in the segment
//! files is the AES-GCM keystream of its (key, nonce) pair, whatever its LBA
//! (associated data only changes the tag). Two equal sealed blocks anywhere in
//! the store would be a reused pair: `C1 xor C2 = P1 xor P2`, and GCM's
//! authentication key with it. Compaction is off, so no block is legitimately
//! copied.

mod common {
    pub mod volume;
}

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockseal_volume::meta::{self, BackendKind, Batch};
use blockseal_volume::{OpenError, Store, StoreOptions, VolumeError};
use common::volume::*;

const BS: usize = 4096;
const BLOCKS: u64 = 64;
const CHILD_ENV: &str = "BLOCKSEAL_NONCE_CHILD_DIR";

/// The tests of this binary run one at a time: one of them forks a child, and a
/// fork copies every open descriptor (store locks included) until its exec, so
/// a store another test just closed could briefly still look locked.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const BACKEND_ENV: &str = "BLOCKSEAL_NONCE_CHILD_BACKEND";

fn options(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .background_compaction(false)
        .segment_bytes(1 << 20)
}

fn write_zeros(volume: &blockseal_volume::Volume) {
    volume
        .write_at(0, &vec![0u8; BLOCKS as usize * BS])
        .unwrap();
}

/// Every non-zero 4 KiB block of every segment file under `dirs`, with where it is.
fn sealed_blocks(dirs: &[&Path]) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for dir in dirs {
        for file in segment_files(dir) {
            let bytes = std::fs::read(&file).unwrap();
            for (i, block) in bytes.chunks(BS).enumerate() {
                if block.len() == BS && block.iter().any(|&b| b != 0) {
                    out.push((block.to_vec(), format!("{}#{i}", file.display())));
                }
            }
        }
    }
    out
}

fn assert_no_keystream_reuse(dirs: &[&Path], at_least: usize) {
    let blocks = sealed_blocks(dirs);
    assert!(
        blocks.len() >= at_least,
        "expected at least {at_least} sealed blocks, found {}",
        blocks.len()
    );
    let mut seen: HashMap<&[u8], &str> = HashMap::new();
    for (block, place) in &blocks {
        if let Some(first) = seen.insert(block, place) {
            panic!("the same (key, nonce) sealed two blocks: {first} and {place}");
        }
    }
}

/// Deletes every metadata key starting with one of `prefixes` (the store closed).
fn delete_keys(dir: &Path, backend: BackendKind, prefixes: &[&[u8]]) -> usize {
    let meta = meta::open(backend, &dir.join("meta")).unwrap();
    let mut batch = Batch::new();
    for prefix in prefixes {
        meta.scan_prefix(prefix, &mut |key, _| {
            batch.delete(key.to_vec());
            true
        })
        .unwrap();
    }
    let n = batch.len();
    meta.commit(&batch).unwrap();
    n
}

/// Runs this binary as a child that writes zeros without ever flushing the last
/// writes, and kills it with SIGKILL once it has written.
fn write_and_kill(dir: &Path, backend: BackendKind) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "nonce_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(
            BACKEND_ENV,
            if backend == BackendKind::Sled {
                "sled"
            } else {
                "redb"
            },
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        if line.unwrap().ends_with("WRITTEN") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn nonce_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let backend = match std::env::var(BACKEND_ENV).as_deref() {
        Ok("sled") => BackendKind::Sled,
        _ => BackendKind::Redb,
    };
    let (_store, volume) = reopen(Path::new(&dir), options(backend));
    write_zeros(&volume);
    volume.flush().unwrap();
    // Written, never flushed: the writer's record is not committed when it dies.
    write_zeros(&volume);
    println!("WRITTEN");
    loop {
        std::thread::park();
    }
}

fn scenario(backend: BackendKind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let old_meta: PathBuf = tmp.path().join("old-meta");
    let mut writes = 0;

    // 1. A first writer; keep a copy of the metadata as it is now.
    {
        let (_store, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options(backend));
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }
    copy_dir(&dir.join("meta"), &old_meta);
    std::fs::copy(dir.join("COMMITS"), tmp.path().join("old-COMMITS")).unwrap();

    // 2. Reopen twice, writing each time.
    for _ in 0..2 {
        let (_store, volume) = reopen(&dir, options(backend));
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }

    // 3. kill -9 after a flush and more unflushed writes, then write again.
    write_and_kill(&dir, backend);
    writes += 2;
    {
        let (_store, volume) = reopen(&dir, options(backend));
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }

    // 4. The writer records go missing: the volume refuses to open (its blocks
    //    could not be opened, and nothing may seal where they left off)...
    assert!(delete_keys(&dir, backend, &[b"w"]) > 0);
    {
        let store = Store::open(&dir, master(1), options(backend))
            .unwrap_or_else(|e| panic!("{backend:?}: {e:?}"));
        let err = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap_err();
        assert!(
            matches!(err, VolumeError::Corrupt { .. }) && err.to_string().contains("writer"),
            "{err}"
        );
    }
    // ...and with every mapping gone too (nothing left to contradict), it opens
    // empty and new writes still never reuse a pair.
    delete_keys(&dir, backend, &[b"M", b"s"]);
    {
        let (_store, volume) = reopen(&dir, options(backend));
        let mut buf = vec![1u8; BS];
        volume.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }

    // 5. The metadata is put back to the copy from step 1: refused, then the
    //    operator accepts the loss and writing goes on.
    std::fs::remove_dir_all(dir.join("meta")).unwrap();
    copy_dir(&old_meta, &dir.join("meta"));
    let err = Store::open(&dir, master(1), options(backend)).unwrap_err();
    assert!(matches!(err, OpenError::MetadataRolledBack { .. }), "{err}");
    {
        let (store, report) =
            Store::danger_accept_metadata_loss(&dir, master(1), options(backend)).unwrap();
        assert!(report.commits_lost > 0, "{report:?}");
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }
    // 6. The whole store directory, marker included, put back to step 1 (a
    //    restore no check can see): still no reuse.
    std::fs::remove_dir_all(dir.join("meta")).unwrap();
    copy_dir(&old_meta, &dir.join("meta"));
    std::fs::copy(tmp.path().join("old-COMMITS"), dir.join("COMMITS")).unwrap();
    {
        let (_store, volume) = reopen(&dir, options(backend));
        write_zeros(&volume);
        volume.flush().unwrap();
        writes += 1;
    }

    assert_no_keystream_reuse(&[&dir], writes * BLOCKS as usize);
}

#[test]
fn no_nonce_repeats_under_any_key_redb() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    scenario(BackendKind::Redb);
}

#[test]
fn no_nonce_repeats_under_any_key_sled() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    scenario(BackendKind::Sled);
}

/// The attack as first found: write P1, lose the nonce record, reopen, write P2
/// at the same block. The two ciphertexts must not differ by P1 xor P2.
#[test]
fn lost_records_never_give_away_plaintext_xor() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (p1, p2) = (pattern(1, BS), pattern(2, BS));
    {
        let (_store, volume) =
            store_with_volume(&dir, BLOCKS * BS as u64, options(BackendKind::Redb));
        volume.write_at(0, &p1).unwrap();
        volume.flush().unwrap();
    }
    let c1 = std::fs::read(&segment_files(&dir)[0]).unwrap()[..BS].to_vec();
    delete_keys(&dir, BackendKind::Redb, &[b"w", b"M", b"s"]);
    {
        let (_store, volume) = reopen(&dir, options(BackendKind::Redb));
        volume.write_at(0, &p2).unwrap();
        volume.flush().unwrap();
    }
    let files = segment_files(&dir);
    let c2 = std::fs::read(files.last().unwrap()).unwrap()[..BS].to_vec();
    assert_ne!(c1, c2);
    let xor = |a: &[u8], b: &[u8]| -> Vec<u8> { a.iter().zip(b).map(|(x, y)| x ^ y).collect() };
    assert_ne!(
        xor(&c1, &c2),
        xor(&p1, &p2),
        "a nonce was reused under one key"
    );
}

/// A writer key that reaches its nonce limit is replaced by a new one: writes
/// never fail for it, never reuse a pair, and every block reads back after a
/// reopen (each writer's record was committed with its blocks).
#[test]
fn writer_keys_turn_over_at_their_nonce_limit() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let options = || options(BackendKind::Redb).danger_writer_nonce_limit(5);
    {
        let (_store, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options());
        for lba in 0..BLOCKS {
            volume.write_at(lba * BS as u64, &[0u8; BS]).unwrap();
        }
        volume.flush().unwrap();
        // And once more, in one request that spans several writers.
        write_zeros(&volume);
        volume.flush().unwrap();
    }
    assert_no_keystream_reuse(&[&dir], 2 * BLOCKS as usize);
    {
        let (_store, volume) = reopen(&dir, options());
        let data: Vec<u8> = (0..BLOCKS).flat_map(|lba| pattern(lba, BS)).collect();
        volume.write_at(0, &data).unwrap();
        volume.flush().unwrap();
    }
    let (_store, volume) = reopen(&dir, options());
    let mut buf = vec![0u8; BS];
    for lba in 0..BLOCKS {
        volume.read_at(lba * BS as u64, &mut buf).unwrap();
        assert_eq!(buf, pattern(lba, BS), "block {lba}");
    }
}

/// Opening and closing a volume spends nothing of its key: far more cycles than
/// a 64 KiB-block key once allowed (4,096) all write.
#[test]
fn open_close_cycles_spend_nothing() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path(), master(1), options(BackendKind::Redb)).unwrap();
    store.create_tenant(&tenant("acme")).unwrap();
    let block_size = blockseal_volume::BlockSize::new(65536).unwrap();
    store
        .create_volume(
            &tenant("acme"),
            &volume_id("disk"),
            1 << 20,
            blockseal_volume::VolumeOptions { block_size },
        )
        .unwrap();
    for cycle in 0..4200u64 {
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        volume
            .write_at((cycle % 16) * 65536, &cycle.to_be_bytes())
            .unwrap();
        volume.close().unwrap();
    }
}

/// Writer records that no mapping names any more are pruned when the volume
/// opens, so reopening does not grow the metadata for good.
#[test]
fn unnamed_writer_records_are_pruned_at_open() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(store_with_volume(
        &dir,
        BLOCKS * BS as u64,
        options(BackendKind::Redb),
    ));
    for round in 0..10u64 {
        let (_store, volume) = reopen(&dir, options(BackendKind::Redb));
        // Every block overwritten: the previous writers' blocks are all gone.
        let data: Vec<u8> = (0..BLOCKS)
            .flat_map(|lba| pattern(lba + round, BS))
            .collect();
        volume.write_at(0, &data).unwrap();
        volume.flush().unwrap();
    }
    drop(reopen(&dir, options(BackendKind::Redb)));
    let meta = meta::open(BackendKind::Redb, &dir.join("meta")).unwrap();
    let mut writers = 0;
    meta.scan_prefix(b"w", &mut |_, _| {
        writers += 1;
        true
    })
    .unwrap();
    assert_eq!(writers, 1, "only the last writer's blocks are mapped");
    drop(meta);
    let (_store, volume) = reopen(&dir, options(BackendKind::Redb));
    let mut buf = vec![0u8; BS];
    for lba in 0..BLOCKS {
        volume.read_at(lba * BS as u64, &mut buf).unwrap();
        assert_eq!(buf, pattern(lba + 9, BS));
    }
}
