//! Data key rotation: new writes go under the new DEK at once, background and
//! explicit re-encryption move every old block, the old DEKs go only when no
//! block needs them, jobs survive a crash, and a half-spent nonce budget
//! rotates on its own. Every test runs on both metadata backends.

mod common {
    pub mod volume;
}

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockseal_keys::KeyVersion;
use blockseal_volume::meta::BackendKind;
use blockseal_volume::{
    DataKeyStatus, FaultySegments, SegmentId, Store, StoreOptions, Volume, VolumeInfo,
};
use common::volume::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
const BACKENDS: [BackendKind; 2] = [BackendKind::Redb, BackendKind::Sled];

/// Small segments, no background work unless a test asks for it.
fn manual(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .segment_bytes(MIB)
        .background_compaction(false)
        .background_reencryption(false)
}

/// The content of version `version` of block `lba` (version 0: zeros).
fn content(lba: u64, version: u64) -> Vec<u8> {
    if version == 0 {
        return vec![0; BS as usize];
    }
    let mut block = pattern((version << 24) ^ lba, BS as usize);
    block[..8].copy_from_slice(&lba.to_be_bytes());
    block[8..16].copy_from_slice(&version.to_be_bytes());
    block
}

fn write_block(volume: &Volume, lba: u64, version: u64) {
    volume.write_at(lba * BS, &content(lba, version)).unwrap();
}

/// Reads every block and compares it with `versions`.
fn check_all(volume: &Volume, versions: &[u64]) {
    let mut all = vec![0u8; versions.len() * BS as usize];
    volume.read_at(0, &mut all).unwrap();
    for (lba, &version) in versions.iter().enumerate() {
        let got = &all[lba * BS as usize..(lba + 1) * BS as usize];
        assert!(got == content(lba as u64, version), "block {lba}");
    }
}

fn info(store: &Store) -> VolumeInfo {
    store
        .volumes(&tenant("acme"))
        .unwrap()
        .into_iter()
        .find(|v| v.id == volume_id("disk"))
        .unwrap()
}

fn status(store: &Store) -> DataKeyStatus {
    store
        .data_key_status(&tenant("acme"), &volume_id("disk"))
        .unwrap()
}

/// `(version, blocks)` per DEK the status lists.
fn blocks_per_key(status: &DataKeyStatus) -> Vec<(u32, u64)> {
    status
        .keys
        .iter()
        .map(|k| (k.version.0, k.blocks))
        .collect()
}

fn rotate(store: &Store) -> KeyVersion {
    store
        .rotate_data_key(&tenant("acme"), &volume_id("disk"))
        .unwrap()
        .active
}

/// Polls `done` until it holds or a minute has passed.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rotation_under_a_writer_leaves_only_the_newest_key() {
    for backend in BACKENDS {
        const BLOCKS: u64 = 2048;
        let dir = tempfile::tempdir().unwrap();
        // Background re-encryption at full speed races the writer.
        let options = manual(backend)
            .background_reencryption(true)
            .reencrypt_rate(u64::MAX);
        let (store, volume) = store_with_volume(dir.path(), BLOCKS * BS, options);
        let mut versions = vec![0u64; BLOCKS as usize];
        for lba in 0..BLOCKS {
            write_block(&volume, lba, 1);
            versions[lba as usize] = 1;
        }
        volume.flush().unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = std::thread::spawn({
            let (volume, stop, written) = (volume.clone(), stop.clone(), written.clone());
            move || {
                let mut rng = StdRng::seed_from_u64(7);
                let mut version = 1u64;
                let mut block = vec![0u8; BS as usize];
                while !stop.load(Ordering::Relaxed) {
                    version += 1;
                    let lba = rng.random_range(0..BLOCKS);
                    write_block(&volume, lba, version);
                    versions[lba as usize] = version;
                    // Any block reads its last write, whatever was moved.
                    let probe = rng.random_range(0..BLOCKS);
                    volume.read_at(probe * BS, &mut block).unwrap();
                    assert!(
                        block == content(probe, versions[probe as usize]),
                        "block {probe}"
                    );
                    if version.is_multiple_of(64) {
                        volume.flush().unwrap();
                    }
                    written.fetch_add(1, Ordering::Relaxed);
                }
                volume.flush().unwrap();
                versions
            }
        });
        wait_for("writes", || written.load(Ordering::Relaxed) >= 500);
        assert_eq!(rotate(&store), KeyVersion(2));
        wait_for("writes", || written.load(Ordering::Relaxed) >= 1500);
        assert_eq!(rotate(&store), KeyVersion(3));
        // Re-encryption while the writer goes on.
        store
            .reencrypt_now(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        wait_for("writes", || written.load(Ordering::Relaxed) >= 2500);
        stop.store(true, Ordering::Relaxed);
        let versions = writer.join().unwrap();

        let report = store
            .reencrypt_now(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        assert!(report.finished, "{backend:?}: {report:?}");
        assert_eq!(info(&store).dek_versions, [KeyVersion(3)]);
        let status = status(&store);
        assert_eq!(status.active, KeyVersion(3));
        assert_eq!(blocks_per_key(&status), [(3, BLOCKS)]);
        assert_eq!(status.job, None);
        check_all(&volume, &versions);
        assert_eq!(volume.stats().auth_failures, 0);
        assert!(volume.stats().reencrypted_blocks > 0);

        // The record says the same after a reopen.
        drop(volume);
        drop(store);
        let (store, volume) = reopen(dir.path(), manual(backend));
        assert_eq!(info(&store).dek_versions, [KeyVersion(3)]);
        check_all(&volume, &versions);
    }
}

#[test]
fn two_rotations_before_reencryption_finish_together() {
    for backend in BACKENDS {
        const BLOCKS: u64 = 1024;
        let dir = tempfile::tempdir().unwrap();
        let (store, volume) = store_with_volume(dir.path(), BLOCKS * BS, manual(backend));
        let mut versions = vec![0u64; BLOCKS as usize];
        for lba in 0..BLOCKS {
            write_block(&volume, lba, 1);
            versions[lba as usize] = 1;
        }
        volume.flush().unwrap();
        let rotation = store
            .rotate_data_key(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        assert_eq!(
            (rotation.previous, rotation.active),
            (KeyVersion(1), KeyVersion(2))
        );
        assert!(rotation.open);
        // A quarter of the blocks under v2, then v3 for the next quarter.
        for lba in 0..BLOCKS / 4 {
            write_block(&volume, lba, 2);
            versions[lba as usize] = 2;
        }
        volume.flush().unwrap();
        assert_eq!(rotate(&store), KeyVersion(3));
        for lba in BLOCKS / 4..BLOCKS / 2 {
            write_block(&volume, lba, 3);
            versions[lba as usize] = 3;
        }
        volume.flush().unwrap();
        let before = status(&store);
        assert_eq!(before.active, KeyVersion(3));
        assert_eq!(
            blocks_per_key(&before),
            [(1, BLOCKS / 2), (2, BLOCKS / 4), (3, BLOCKS / 4)]
        );
        let job = before.job.unwrap();
        assert_eq!(
            (job.target, job.blocks_remaining),
            (KeyVersion(3), 3 * BLOCKS / 4)
        );
        check_all(&volume, &versions);

        let report = volume.reencrypt_now().unwrap();
        assert!(report.finished);
        assert_eq!(report.blocks_reencrypted, 3 * BLOCKS / 4);
        assert_eq!(report.destroyed, [KeyVersion(1), KeyVersion(2)]);
        assert_eq!(blocks_per_key(&status(&store)), [(3, BLOCKS)]);
        assert_eq!(info(&store).dek_versions, [KeyVersion(3)]);
        check_all(&volume, &versions);
        // Nothing left: another run does nothing.
        let again = volume.reencrypt_now().unwrap();
        assert!(again.finished && again.blocks_reencrypted == 0);
        // Versions are never reused.
        assert_eq!(rotate(&store), KeyVersion(4));
    }
}

#[test]
fn a_closed_volume_rotates_and_picks_the_key_up_when_opened() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let (store, volume) = store_with_volume(dir.path(), 256 * BS, manual(backend));
        for lba in 0..256 {
            write_block(&volume, lba, 1);
        }
        drop(volume);
        let rotation = store
            .rotate_data_key(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        assert!(!rotation.open);
        assert_eq!(rotation.versions, [KeyVersion(1), KeyVersion(2)]);
        // Closed: counted from the metadata store.
        let closed = status(&store);
        assert_eq!(blocks_per_key(&closed), [(1, 256), (2, 0)]);
        assert_eq!(closed.job.unwrap().blocks_remaining, 256);
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        write_block(&volume, 0, 2);
        volume.flush().unwrap();
        assert_eq!(blocks_per_key(&status(&store)), [(1, 255), (2, 1)]);
        let report = store
            .reencrypt_now(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        assert_eq!(report.blocks_reencrypted, 255);
        let mut versions = vec![1u64; 256];
        versions[0] = 2;
        check_all(&volume, &versions);
    }
}

#[test]
fn jobs_run_with_no_client_open_after_a_rotation_and_after_a_restart() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let background = || {
            StoreOptions::new()
                .backend(backend)
                .segment_bytes(MIB)
                .background_compaction(false)
                .compaction_interval(Duration::from_millis(10))
        };
        let (store, volume) = store_with_volume(dir.path(), 256 * BS, manual(backend));
        for lba in 0..256 {
            write_block(&volume, lba, 1);
        }
        drop(volume);
        // Rotated while closed, with background work off: the job waits.
        rotate(&store);
        assert_eq!(status(&store).job.unwrap().blocks_remaining, 256);
        drop(store);

        // At the next open with background work on, the store holds the
        // volume open for its job, finishes it, and lets go of the volume.
        let store = Store::open(dir.path(), master(1), background()).unwrap();
        wait_for("the resumed job to finish", || status(&store).job.is_none());
        assert_eq!(blocks_per_key(&status(&store)), [(2, 256)]);
        wait_for("the store to let go of the volume", || {
            !store.is_open(&tenant("acme"), &volume_id("disk"))
        });

        // Rotated while closed on a store with background work: the same.
        rotate(&store);
        wait_for("the job after a rotation to finish", || {
            status(&store).job.is_none()
        });
        assert_eq!(blocks_per_key(&status(&store)), [(3, 256)]);
        wait_for("the store to let go of the volume", || {
            !store.is_open(&tenant("acme"), &volume_id("disk"))
        });

        // A volume held for its job can still be deleted.
        for lba in 0..4 {
            let volume = store
                .open_volume(&tenant("acme"), &volume_id("disk"))
                .unwrap();
            write_block(&volume, lba, 2);
        }
        store
            .reencrypt_now(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        rotate(&store);
        store
            .delete_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        drop(store);
        let store = Store::open(dir.path(), master(1), background()).unwrap();
        assert!(store.volumes(&tenant("acme")).unwrap().is_empty());
    }
}

#[test]
fn reencryption_runs_while_a_slow_compaction_pass_sleeps() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        // Compaction at 4 KiB/s: after its first step (one segment's live
        // blocks, 128 KiB) the pass sleeps for half a minute before each next
        // one, and must not keep re-encryption out meanwhile.
        let options = StoreOptions::new()
            .backend(backend)
            .segment_bytes(MIB)
            .compaction_threshold(0.9)
            .compaction_rate(4 << 10)
            .compaction_interval(Duration::from_millis(10))
            .background_reencryption(false);
        let (store, volume) = store_with_volume(dir.path(), 1024 * BS, options);
        for lba in 0..1024 {
            write_block(&volume, lba, 1);
        }
        volume.flush().unwrap();
        // Overwrite most blocks so the sealed segments are mostly dead.
        let mut versions = vec![1u64; 1024];
        for lba in (0..1024).filter(|lba| lba % 8 != 0) {
            write_block(&volume, lba, 2);
            versions[lba as usize] = 2;
        }
        volume.flush().unwrap();
        wait_for("compaction's first step", || {
            volume.stats().compacted_blocks > 0
        });
        rotate(&store);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reencrypting = std::thread::spawn({
            let volume = volume.clone();
            move || {
                let report = volume.reencrypt_now();
                let _ = done_tx.send(());
                report
            }
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "{backend:?}: re-encryption waited for the sleeping compaction pass"
        );
        let report = reencrypting.join().unwrap().unwrap();
        assert!(report.finished, "{report:?}");
        assert_eq!(blocks_per_key(&status(&store)), [(2, 1024)]);
        check_all(&volume, &versions);
        drop(volume);
        drop(store);
    }
}

#[test]
fn an_old_key_stays_while_a_block_needs_it() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let segments = FaultySegments::new();
        let options = manual(backend).segment_store(Arc::new(segments.clone()));
        let (store, volume) = store_with_volume(dir.path(), 64 * BS, options);
        // Block 0, alone in segment 0 at offset 0, flushed under v1.
        write_block(&volume, 0, 1);
        volume.flush().unwrap();
        // Block 1 written under v1 but only in the overlay when v2 comes.
        write_block(&volume, 1, 1);
        assert_eq!(rotate(&store), KeyVersion(2));
        write_block(&volume, 2, 2);
        assert_eq!(info(&store).dek_versions, [KeyVersion(1), KeyVersion(2)]);
        volume.flush().unwrap();
        assert_eq!(blocks_per_key(&status(&store)), [(1, 2), (2, 1)]);

        // Block 0's ciphertext is damaged: it cannot be re-encrypted, so v1
        // must stay (the block still fails as it should, not as zeros).
        let segment = SegmentId {
            volume: 1,
            index: 0,
        };
        assert!(segments.corrupt(segment, 7, 0x40));
        let report = volume.reencrypt_now().unwrap();
        assert_eq!(
            (report.blocks_reencrypted, report.blocks_unreadable),
            (1, 1)
        );
        assert!(!report.finished && report.destroyed.is_empty());
        assert_eq!(info(&store).dek_versions, [KeyVersion(1), KeyVersion(2)]);
        assert_eq!(blocks_per_key(&status(&store)), [(1, 1), (2, 2)]);
        let mut block = vec![0u8; BS as usize];
        assert!(volume.read_at(0, &mut block).is_err());
        volume.read_at(BS, &mut block).unwrap();
        assert!(block == content(1, 1));

        // Once the block is overwritten nothing needs v1 any more.
        write_block(&volume, 0, 3);
        let report = volume.reencrypt_now().unwrap();
        assert!(report.finished);
        assert_eq!(report.destroyed, [KeyVersion(1)]);
        assert_eq!(info(&store).dek_versions, [KeyVersion(2)]);
        check_all(&volume, &[3, 1, 2]);
        drop(volume);
        drop(store);
        let (store, volume) = reopen(
            dir.path(),
            manual(backend).segment_store(Arc::new(segments.clone())),
        );
        assert_eq!(info(&store).dek_versions, [KeyVersion(2)]);
        check_all(&volume, &[3, 1, 2]);
    }
}

#[test]
fn a_job_cut_off_by_a_crash_resumes_and_finishes() {
    for backend in BACKENDS {
        const BLOCKS: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let segments = FaultySegments::new();
        let with = |options: StoreOptions| options.segment_store(Arc::new(segments.clone()));
        let versions: Vec<u64> = (0..BLOCKS).map(|lba| 1 + lba % 3).collect();
        {
            let (store, volume) = store_with_volume(dir.path(), BLOCKS * BS, with(manual(backend)));
            for lba in 0..BLOCKS {
                write_block(&volume, lba, versions[lba as usize]);
            }
            volume.flush().unwrap();
            drop(volume);
            rotate(&store);
        }
        // Slow background steps (1 MiB a second, a step each); the crash
        // lands mid-job.
        let slow = manual(backend)
            .background_reencryption(true)
            .reencrypt_rate(MIB);
        let (store, volume) = reopen(dir.path(), with(slow));
        wait_for("some progress", || {
            status(&store).job.is_some_and(|job| job.blocks_done >= 512)
        });
        // Everything unsynced is lost and nothing more is written, as at a
        // kill -9; then the process goes.
        segments.crash();
        drop(volume);
        drop(store);
        segments.revive();

        let (store, volume) = reopen(dir.path(), with(manual(backend)));
        let resumed = status(&store);
        let job = resumed.job.expect("the job survives");
        assert_eq!(job.target, KeyVersion(2));
        assert!(job.blocks_done > 0 && job.blocks_remaining > 0, "{job:?}");
        assert_eq!(job.blocks_done + job.blocks_remaining, BLOCKS);
        // Every block reads as written, moved or not.
        check_all(&volume, &versions);
        let report = volume.reencrypt_now().unwrap();
        assert!(report.finished);
        assert_eq!(report.blocks_reencrypted, job.blocks_remaining);
        assert_eq!(blocks_per_key(&status(&store)), [(2, BLOCKS)]);
        check_all(&volume, &versions);
        assert_eq!(volume.stats().auth_failures, 0);
    }
}

#[test]
fn half_a_spent_nonce_budget_rotates_on_its_own() {
    for backend in BACKENDS {
        // Writer keys of 4 nonces: a DEK's budget is 4096 seals, rotated at 2048.
        let limit = |options: StoreOptions| {
            options
                .danger_writer_nonce_limit(4)
                .background_reencryption(true)
                .reencrypt_rate(u64::MAX)
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, volume) = store_with_volume(dir.path(), 256 * BS, limit(manual(backend)));
        let mut versions = vec![0u64; 256];
        let mut write = |volume: &Volume, n: u64| {
            for k in 0..n {
                let lba = k % 256;
                versions[lba as usize] += 1;
                write_block(volume, lba, versions[lba as usize]);
                if k % 100 == 99 {
                    volume.flush().unwrap();
                }
            }
            volume.flush().unwrap();
        };
        // 1500 seals, committed; the count survives a reopen.
        write(&volume, 1500);
        drop(volume);
        drop(store);
        let (store, volume) = reopen(dir.path(), limit(manual(backend)));
        assert_eq!(volume.stats().automatic_rotations, 0);
        write(&volume, 600);
        wait_for("the automatic rotation", || {
            volume.stats().automatic_rotations == 1
        });
        assert_eq!(status(&store).active, KeyVersion(2));
        // The background thread re-encrypts and destroys v1.
        wait_for("re-encryption", || {
            info(&store).dek_versions == [KeyVersion(2)]
        });
        assert_eq!(blocks_per_key(&status(&store)), [(2, 256)]);
        check_all(&volume, &versions);
        assert_eq!(volume.stats().automatic_rotations, 1);
    }
}

/// Measures re-encryption throughput (release build):
/// `cargo test --release -p blockseal-volume --test volume_rotation -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_reencryption_rate() {
    const SIZE: u64 = 512 * MIB;
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let options = manual(backend).segment_bytes(64 * MIB);
        let (store, volume) = store_with_volume(dir.path(), SIZE, options);
        let chunk = pattern(1, 4 * MIB as usize);
        for off in (0..SIZE).step_by(chunk.len()) {
            volume.write_at(off, &chunk).unwrap();
        }
        volume.flush().unwrap();
        rotate(&store);
        let started = Instant::now();
        let report = volume.reencrypt_now().unwrap();
        let seconds = started.elapsed().as_secs_f64();
        assert!(report.finished);
        assert_eq!(report.blocks_reencrypted, SIZE / BS);
        eprintln!(
            "{backend:?}: re-encrypted {} MiB in {seconds:.2} s: {:.0} MiB/s",
            SIZE / MIB,
            (SIZE / MIB) as f64 / seconds
        );
    }
}
