//! Snapshots against a model: random writes, trims, snapshots, deletions,
//! rollbacks, compaction, data key rotation with re-encryption and reopens,
//! on both metadata backends; after every step the volume and every snapshot
//! read exactly what the model says, and every reopen passes the open checks
//! (live counts, preserved records).

mod common {
    pub mod volume;
}

use std::collections::BTreeMap;
use std::path::Path;

use blockseal_volume::meta::BackendKind;
use blockseal_volume::{AdminError, AdminErrorKind, Store, StoreOptions, Volume};
use common::volume::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const BLOCKS: u64 = 48;

fn options(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .background_compaction(false)
        .segment_bytes(8 * BS)
}

/// The content of block `lba` at version `v` (0: zeros).
fn block(lba: u64, v: u64) -> Vec<u8> {
    if v == 0 {
        vec![0; BS as usize]
    } else {
        pattern(lba << 32 | v, BS as usize)
    }
}

fn check(
    volume: &Volume,
    store: &Store,
    live: &[u64],
    snaps: &BTreeMap<String, Vec<u64>>,
    at: &str,
) {
    let mut buf = vec![0u8; (BLOCKS * BS) as usize];
    volume.read_at(0, &mut buf).unwrap();
    for (lba, &v) in live.iter().enumerate() {
        let got = &buf[lba * BS as usize..(lba + 1) * BS as usize];
        assert!(
            got == block(lba as u64, v),
            "{at}: volume block {lba} (version {v})"
        );
    }
    let listed = store
        .snapshots(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    assert_eq!(
        listed.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        {
            let mut by_age: Vec<_> = snaps.keys().cloned().collect();
            by_age.sort_by_key(|n| n[1..].parse::<u32>().unwrap());
            by_age
        },
        "{at}: snapshot list"
    );
    for (name, model) in snaps {
        let reader = store
            .open_snapshot(&tenant("acme"), &volume_id("disk"), name)
            .unwrap();
        let mut buf = vec![0u8; (BLOCKS * BS) as usize];
        reader.read_at(0, &mut buf).unwrap();
        for (lba, &v) in model.iter().enumerate() {
            let got = &buf[lba * BS as usize..(lba + 1) * BS as usize];
            assert!(
                got == block(lba as u64, v),
                "{at}: snapshot {name} block {lba} (version {v})"
            );
        }
        // Block status agrees with the model's holes.
        let status = reader.block_status(0, BLOCKS * BS).unwrap();
        let mut pos = 0u64;
        for (len, allocated) in status {
            for lba in pos / BS..(pos + len) / BS {
                assert_eq!(
                    allocated,
                    model[lba as usize] != 0,
                    "{at}: snapshot {name} status of {lba}"
                );
            }
            pos += len;
        }
        // A read that is not block aligned.
        let mut odd = vec![0u8; 5000];
        reader.read_at(BS + 100, &mut odd).unwrap();
        let mut want = block(1, model[1]);
        want.extend(block(2, model[2]));
        assert!(
            odd == want[100..5100],
            "{at}: snapshot {name} unaligned read"
        );
    }
}

fn run(backend: BackendKind, seed: u64, steps: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (mut store, mut volume) = store_with_volume(&dir, BLOCKS * BS, options(backend));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live = vec![0u64; BLOCKS as usize];
    let mut snaps: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut next_version = 1u64;
    let mut next_snap = 0u32;
    for step in 0..steps {
        let at = format!("seed {seed} step {step}");
        match rng.random_range(0..100) {
            0..40 => {
                let lba = rng.random_range(0..BLOCKS);
                let n = rng.random_range(1..=(BLOCKS - lba).min(6));
                let mut data = Vec::new();
                for b in lba..lba + n {
                    live[b as usize] = next_version;
                    data.extend(block(b, next_version));
                }
                next_version += 1;
                volume.write_at(lba * BS, &data).unwrap();
            }
            40..48 => {
                let lba = rng.random_range(0..BLOCKS);
                let n = rng.random_range(1..=(BLOCKS - lba).min(8));
                volume.trim(lba * BS, n * BS).unwrap();
                for b in lba..lba + n {
                    live[b as usize] = 0;
                }
            }
            48..56 => volume.flush().unwrap(),
            56..68 => {
                let name = format!("s{next_snap}");
                next_snap += 1;
                let info = store
                    .create_snapshot(&tenant("acme"), &volume_id("disk"), &name)
                    .unwrap();
                assert_eq!(info.size, BLOCKS * BS);
                snaps.insert(name, live.clone());
            }
            68..76 if !snaps.is_empty() => {
                let k = rng.random_range(0..snaps.len());
                let name = snaps.keys().nth(k).unwrap().clone();
                store
                    .delete_snapshot(&tenant("acme"), &volume_id("disk"), &name)
                    .unwrap();
                snaps.remove(&name);
            }
            76..82 if !snaps.is_empty() => {
                let newest = snaps
                    .keys()
                    .max_by_key(|n| n[1..].parse::<u32>().unwrap())
                    .unwrap()
                    .clone();
                store
                    .rollback_snapshot(&tenant("acme"), &volume_id("disk"), &newest)
                    .unwrap();
                live = snaps[&newest].clone();
            }
            82..90 => {
                volume.flush().unwrap();
                store.compact_now().unwrap();
            }
            90..94 => {
                store
                    .rotate_data_key(&tenant("acme"), &volume_id("disk"))
                    .unwrap();
                let report = store
                    .reencrypt_now(&tenant("acme"), &volume_id("disk"))
                    .unwrap();
                assert!(report.finished, "{at}: re-encryption finished: {report:?}");
                let status = store
                    .data_key_status(&tenant("acme"), &volume_id("disk"))
                    .unwrap();
                assert_eq!(status.keys.len(), 1, "{at}: old data keys destroyed");
            }
            _ => {
                drop(volume);
                drop(store);
                (store, volume) = reopen(&dir, options(backend));
            }
        }
        check(&volume, &store, &live, &snaps, &at);
    }
    drop(volume);
    drop(store);
    let (store, volume) = reopen(&dir, options(backend));
    check(&volume, &store, &live, &snaps, "after the last reopen");
    // Deleting every snapshot lets every block only they held go: the live
    // counts then add up to the volume's own mappings (checked at reopen)
    // and compaction can free their segments.
    for name in snaps.keys() {
        store
            .delete_snapshot(&tenant("acme"), &volume_id("disk"), name)
            .unwrap();
    }
    volume.flush().unwrap();
    store.compact_now().unwrap();
    drop(volume);
    drop(store);
    let (store, volume) = reopen(&dir, options(backend));
    check(
        &volume,
        &store,
        &live,
        &BTreeMap::new(),
        "without snapshots",
    );
    let mapped = live.iter().filter(|&&v| v != 0).count() as u64;
    let usage = store
        .volume_usage(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    assert_eq!(
        usage.mapped_blocks, mapped,
        "only the volume's own blocks remain"
    );
}

#[test]
fn snapshots_follow_the_model_on_redb() {
    for seed in 0..6 {
        run(BackendKind::Redb, seed, 160);
    }
}

#[test]
fn snapshots_follow_the_model_on_sled() {
    for seed in 100..103 {
        run(BackendKind::Sled, seed, 160);
    }
}

fn fresh(dir: &Path) -> (Store, Volume) {
    store_with_volume(dir, BLOCKS * BS, options(BackendKind::Redb))
}

#[test]
fn snapshot_errors_are_specific_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, volume) = fresh(&tmp.path().join("store"));
    let (t, v) = (tenant("acme"), volume_id("disk"));
    volume.write_at(0, &block(0, 1)).unwrap();
    store.create_snapshot(&t, &v, "mon").unwrap();
    volume.write_at(0, &block(0, 2)).unwrap();
    store.create_snapshot(&t, &v, "tue").unwrap();

    let kind = |e: AdminError| e.kind();
    assert_eq!(
        kind(store.create_snapshot(&t, &v, "mon").unwrap_err()),
        AdminErrorKind::Conflict
    );
    for bad in ["", "Mon", "a/b", "a@b", "-x", &"x".repeat(65)] {
        let e = store.create_snapshot(&t, &v, bad).unwrap_err();
        assert_eq!(e.kind(), AdminErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let e = store.rollback_snapshot(&t, &v, "mon").unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::Conflict);
    assert!(e.to_string().contains("newer snapshots exist (tue)"), "{e}");
    assert_eq!(
        kind(store.delete_snapshot(&t, &v, "wed").unwrap_err()),
        AdminErrorKind::NotFound
    );
    assert_eq!(
        kind(store.snapshots(&t, &volume_id("nope")).unwrap_err()),
        AdminErrorKind::NotFound
    );
    // Nothing changed.
    let names: Vec<String> = store
        .snapshots(&t, &v)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["mon", "tue"]);
    let mut buf = vec![0u8; BS as usize];
    volume.read_at(0, &mut buf).unwrap();
    assert!(buf == block(0, 2));

    // Space held: the overwritten block belongs to "mon" alone.
    let held: Vec<u64> = store
        .snapshots(&t, &v)
        .unwrap()
        .iter()
        .map(|s| s.held_bytes)
        .collect();
    assert_eq!(held, [BS, 0]);
    // A snapshot read past its end is refused.
    let reader = store.open_snapshot(&t, &v, "mon").unwrap();
    assert!(reader.read_at(BLOCKS * BS - 10, &mut [0u8; 20]).is_err());
}

#[test]
fn a_snapshot_survives_a_resize_and_rollback_asks_for_the_old_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, volume) = fresh(&tmp.path().join("store"));
    let (t, v) = (tenant("acme"), volume_id("disk"));
    volume.write_at(0, &block(0, 1)).unwrap();
    store.create_snapshot(&t, &v, "before").unwrap();
    store.resize_volume(&t, &v, 2 * BLOCKS * BS, false).unwrap();
    volume.write_at(BLOCKS * BS, &block(BLOCKS, 2)).unwrap();
    let reader = store.open_snapshot(&t, &v, "before").unwrap();
    assert_eq!(reader.len(), BLOCKS * BS);
    let mut buf = vec![0u8; BS as usize];
    reader.read_at(0, &mut buf).unwrap();
    assert!(buf == block(0, 1));
    let e = store.rollback_snapshot(&t, &v, "before").unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::Conflict, "{e}");
    store.resize_volume(&t, &v, BLOCKS * BS, true).unwrap();
    store.rollback_snapshot(&t, &v, "before").unwrap();
    volume.read_at(0, &mut buf).unwrap();
    assert!(buf == block(0, 1));
}

#[test]
fn data_retention_discards_what_is_older_than_the_cutoff_and_snapshots_keep_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (store, volume) = fresh(&dir);
    let (t, v) = (tenant("acme"), volume_id("disk"));
    let day = 86_400u64;
    // Age marks in the past, then a snapshot (which begins an epoch at the
    // real time), then a mark after it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = now - 3 * day;
    // Day 0: blocks 0..4. Day 1: blocks 4..8, and block 1 rewritten.
    for lba in 0..4 {
        volume.write_at(lba * BS, &block(lba, 1)).unwrap();
    }
    store.mark_age(&t, &v, t0 + day).unwrap();
    assert_eq!(store.epoch_started(&t, &v).unwrap(), t0 + day);
    for lba in 4..8 {
        volume.write_at(lba * BS, &block(lba, 2)).unwrap();
    }
    volume.write_at(BS, &block(1, 2)).unwrap();
    store.create_snapshot(&t, &v, "kept").unwrap();
    store.mark_age(&t, &v, now + 10).unwrap();
    // Nothing ended before day 1 began: nothing to discard.
    assert_eq!(store.discard_older_than(&t, &v, t0 + day - 1).unwrap(), 0);
    // Day 0's epoch ended at day 1: its blocks go, but block 1 was rewritten
    // on day 1 and stays.
    assert_eq!(store.discard_older_than(&t, &v, t0 + day + 10).unwrap(), 3);
    let mut buf = vec![0u8; BS as usize];
    for lba in 0..8 {
        volume.read_at(lba * BS, &mut buf).unwrap();
        let want = match lba {
            1 => block(1, 2),
            0 | 2 | 3 => vec![0; BS as usize],
            _ => block(lba, 2),
        };
        assert!(buf == want, "block {lba}");
    }
    // The snapshot still sees day 0's data until it is deleted.
    let reader = store.open_snapshot(&t, &v, "kept").unwrap();
    reader.read_at(0, &mut buf).unwrap();
    assert!(buf == block(0, 1));
    drop(reader);
    store.delete_snapshot(&t, &v, "kept").unwrap();
    drop(volume);
    drop(store);
    let (store, volume) = reopen(&dir, options(BackendKind::Redb));
    volume.read_at(0, &mut buf).unwrap();
    assert!(buf == vec![0; BS as usize]);
    let usage = store.volume_usage(&t, &v).unwrap();
    assert_eq!(usage.mapped_blocks, 5, "the discarded blocks are let go of");
}
