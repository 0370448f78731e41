//! Metadata that went missing or back in time is refused, never served as zeros;
//! the operator's explicit recovery makes a store usable again; damaged store
//! layouts get messages that say what is wrong.

mod common {
    pub mod volume;
}

use std::path::Path;

use blockseal_volume::meta::{self, BackendKind, Batch};
use blockseal_volume::{
    CreateError, MAX_VOLUME_BYTES, OpenError, Store, StoreOptions, VolumeError, VolumeOptions,
};
use common::volume::*;

const BS: usize = 4096;
const BLOCKS: u64 = 256;
const BACKENDS: [BackendKind; 2] = [BackendKind::Redb, BackendKind::Sled];

fn options(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .background_compaction(false)
}

/// A store with one tenant and volume, made and closed in a fresh temporary
/// directory: the directory's guard and the store's path.
fn closed_store(backend: BackendKind) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(store_with_volume(
        &dir,
        BLOCKS * BS as u64,
        options(backend),
    ));
    (tmp, dir)
}

fn replace_meta(dir: &Path, with: &Path) {
    std::fs::remove_dir_all(dir.join("meta")).unwrap();
    copy_dir(with, &dir.join("meta"));
}

fn read_block(volume: &blockseal_volume::Volume, lba: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    volume.read_at(lba * BS as u64, &mut buf).unwrap();
    buf
}

#[test]
fn metadata_restored_from_an_older_copy_is_refused_until_the_loss_is_accepted() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let old = tmp.path().join("old-meta");
        {
            let (_s, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options(backend));
            volume.write_at(0, &pattern(1, BS)).unwrap();
            volume.flush().unwrap();
        }
        copy_dir(&dir.join("meta"), &old);
        {
            let (_s, volume) = reopen(&dir, options(backend));
            volume.write_at(BS as u64, &pattern(2, BS)).unwrap();
            volume.flush().unwrap();
        }
        replace_meta(&dir, &old);

        let err = Store::open(&dir, master(1), options(backend)).unwrap_err();
        let OpenError::MetadataRolledBack {
            metadata, recorded, ..
        } = err
        else {
            panic!("{backend:?}: {err}");
        };
        assert!(metadata < recorded, "{metadata} < {recorded}");
        assert!(err.to_string().contains("went back in time"), "{err}");

        let (store, report) =
            Store::danger_accept_metadata_loss(&dir, master(1), options(backend)).unwrap();
        assert_eq!(report.commits_lost, recorded - metadata, "{report:?}");
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        assert_eq!(read_block(&volume, 0), pattern(1, BS));
        // The accepted loss: the later write is gone.
        assert_eq!(read_block(&volume, 1), vec![0u8; BS]);
        volume.write_at(2 * BS as u64, &pattern(3, BS)).unwrap();
        volume.flush().unwrap();
        drop(volume);
        drop(store);
        // From now on the store opens normally, with everything since.
        let (_s, volume) = reopen(&dir, options(backend));
        assert_eq!(read_block(&volume, 0), pattern(1, BS));
        assert_eq!(read_block(&volume, 2), pattern(3, BS));
    }
}

#[test]
fn lost_mapping_records_refuse_the_volume_and_recovery_recounts() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        {
            let (_s, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options(backend));
            for lba in (0..BLOCKS).step_by(3) {
                volume
                    .write_at(lba * BS as u64, &pattern(lba + 10, BS))
                    .unwrap();
            }
            volume.flush().unwrap();
        }
        // Some extent records vanish while the live counts stay (a damaged page).
        {
            let meta = meta::open(backend, &dir.join("meta")).unwrap();
            let mut batch = Batch::new();
            let mut n = 0;
            meta.scan_prefix(b"M", &mut |key, _| {
                n += 1;
                if n % 2 == 0 {
                    batch.delete(key.to_vec());
                }
                true
            })
            .unwrap();
            assert!(!batch.is_empty());
            meta.commit(&batch).unwrap();
        }
        let store = Store::open(&dir, master(1), options(backend)).unwrap();
        let err = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap_err();
        assert!(
            matches!(err, VolumeError::Corrupt { .. }) && err.to_string().contains("live count"),
            "{backend:?}: {err}"
        );
        drop(store);
        let (store, report) =
            Store::danger_accept_metadata_loss(&dir, master(1), options(backend)).unwrap();
        assert!(report.live_counts_fixed > 0, "{report:?}");
        let volume = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        // What survived reads back; what was lost reads as zeros, now knowingly.
        let mut intact = 0;
        for lba in (0..BLOCKS).step_by(3) {
            let block = read_block(&volume, lba);
            if block == pattern(lba + 10, BS) {
                intact += 1;
            } else {
                assert_eq!(
                    block,
                    vec![0u8; BS],
                    "block {lba} reads neither its data nor zeros"
                );
            }
        }
        assert!(intact > 0);
    }
}

#[test]
fn a_missing_metadata_file_is_refused_and_not_recreated() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        {
            let (_s, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options(backend));
            volume.write_at(0, &pattern(1, BS)).unwrap();
        }
        let data = match backend {
            BackendKind::Sled => dir.join("meta/meta.sled"),
            _ => dir.join("meta/meta.redb"),
        };
        if data.is_dir() {
            std::fs::remove_dir_all(&data).unwrap();
        } else {
            std::fs::remove_file(&data).unwrap();
        }
        let err = Store::open(&dir, master(1), options(backend)).unwrap_err();
        assert!(
            matches!(err, OpenError::MetadataMissing { .. }),
            "{backend:?}: {err}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!err.to_string().contains("not a blockseal store"), "{err}");
        assert!(
            !data.exists(),
            "opening created a fresh, empty metadata store"
        );
    }
}

#[test]
fn a_deleted_format_file_is_a_damaged_store_for_open_and_create() {
    let (_tmp, dir) = closed_store(BackendKind::Redb);
    std::fs::remove_file(dir.join("FORMAT")).unwrap();
    for err in [
        Store::open(&dir, master(1), options(BackendKind::Redb)).unwrap_err(),
        Store::create(&dir, master(1), options(BackendKind::Redb)).unwrap_err(),
    ] {
        assert!(matches!(err, OpenError::FormatMissing { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("no FORMAT file"), "{text}");
        assert!(!text.contains("already holds a store"), "{text}");
    }
}

#[test]
fn segments_of_volumes_the_metadata_never_allocated_are_refused() {
    let backend = BackendKind::Redb;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let old = tmp.path().join("old-meta");
    drop(store_with_volume(
        &dir,
        BLOCKS * BS as u64,
        options(backend),
    ));
    copy_dir(&dir.join("meta"), &old);
    std::fs::copy(dir.join("COMMITS"), tmp.path().join("old-COMMITS")).unwrap();
    {
        let store = Store::open(&dir, master(1), options(backend)).unwrap();
        store
            .create_volume(
                &tenant("acme"),
                &volume_id("second"),
                BLOCKS * BS as u64,
                VolumeOptions::default(),
            )
            .unwrap();
        let v = store
            .open_volume(&tenant("acme"), &volume_id("second"))
            .unwrap();
        v.write_at(0, &pattern(5, BS)).unwrap();
        v.flush().unwrap();
    }
    // Both the metadata and the marker go back to a consistent older copy (the
    // marker alone would catch a metadata-only restore first).
    replace_meta(&dir, &old);
    std::fs::copy(tmp.path().join("old-COMMITS"), dir.join("COMMITS")).unwrap();
    let err = Store::open(&dir, master(1), options(backend)).unwrap_err();
    let OpenError::UnknownSegments { volumes, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(volumes, &[2]);
    let (_store, report) =
        Store::danger_accept_metadata_loss(&dir, master(1), options(backend)).unwrap();
    assert_eq!(report.orphan_volumes, 1);
    assert!(dir.join("lost/2").is_dir());
}

#[test]
fn a_damaged_commit_marker_is_refused() {
    let (_tmp, dir) = closed_store(BackendKind::Redb);
    let mut bytes = std::fs::read(dir.join("COMMITS")).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(dir.join("COMMITS"), &bytes).unwrap();
    let err = Store::open(&dir, master(1), options(BackendKind::Redb)).unwrap_err();
    assert!(matches!(err, OpenError::MarkerDamaged { .. }), "{err}");
    Store::danger_accept_metadata_loss(&dir, master(1), options(BackendKind::Redb)).unwrap();
    Store::open(&dir, master(1), options(BackendKind::Redb)).unwrap();
}

#[test]
fn volume_sizes_past_i64_max_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path(), master(1), options(BackendKind::Redb)).unwrap();
    store.create_tenant(&tenant("acme")).unwrap();
    for size in [u64::MAX - 4095, 1 << 63, MAX_VOLUME_BYTES + 65536] {
        let err = store
            .create_volume(
                &tenant("acme"),
                &volume_id("huge"),
                size,
                VolumeOptions::default(),
            )
            .unwrap_err();
        assert!(matches!(err, CreateError::TooLarge { .. }), "{size}: {err}");
        assert!(
            err.to_string().contains("larger than the largest volume"),
            "{err}"
        );
    }
    let info = store
        .create_volume(
            &tenant("acme"),
            &volume_id("huge"),
            MAX_VOLUME_BYTES,
            VolumeOptions::default(),
        )
        .unwrap();
    assert!(i64::try_from(info.size).is_ok());
}

#[test]
fn a_deleted_commit_marker_is_refused_when_the_metadata_counted_commits() {
    let (_tmp, dir) = closed_store(BackendKind::Redb);
    std::fs::remove_file(dir.join("COMMITS")).unwrap();
    let err = Store::open(&dir, master(1), options(BackendKind::Redb)).unwrap_err();
    assert!(matches!(err, OpenError::MarkerMissing { .. }), "{err}");
    Store::danger_accept_metadata_loss(&dir, master(1), options(BackendKind::Redb)).unwrap();
    Store::open(&dir, master(1), options(BackendKind::Redb)).unwrap();
}

#[test]
fn an_interrupted_create_is_started_over_not_refused() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        drop(store_with_volume(
            &dir,
            BLOCKS * BS as u64,
            options(backend),
        ));
        // What a create killed before writing FORMAT leaves: metadata and a
        // marker, no FORMAT, no segments.
        std::fs::remove_file(dir.join("FORMAT")).unwrap();
        std::fs::remove_dir_all(dir.join("segments")).unwrap();
        let err = Store::open(&dir, master(1), options(backend)).unwrap_err();
        assert!(matches!(err, OpenError::NotAStore { .. }), "{err}");
        let store = Store::create(&dir, master(1), options(backend)).unwrap();
        assert!(store.tenants().unwrap().is_empty());
        // Nothing was destroyed: it was set aside.
        assert!(dir.join("lost/unfinished-create/meta").is_dir());
    }
}

#[test]
fn a_format_1_store_is_upgraded_when_opened() {
    let (_tmp, dir) = closed_store(BackendKind::Redb);
    let mut format = std::fs::read(dir.join("FORMAT")).unwrap();
    assert_eq!(
        format[8..12],
        blockseal_volume::FORMAT_VERSION.to_be_bytes()
    );
    format[8..12].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(dir.join("FORMAT"), &format).unwrap();
    drop(reopen(&dir, options(BackendKind::Redb)));
    let format = std::fs::read(dir.join("FORMAT")).unwrap();
    assert_eq!(
        format[8..12],
        blockseal_volume::FORMAT_VERSION.to_be_bytes()
    );
}

/// Turns mapping pages back into the per-extent records of store format 2:
/// every page when `every` is 1, every other page when 2 (an upgrade killed
/// half-way).
fn plant_format_2_records(dir: &Path, backend: BackendKind, every: usize) -> usize {
    let meta = meta::open(backend, &dir.join("meta")).unwrap();
    let mut pages = Vec::new();
    meta.scan_prefix(b"M", &mut |key, value| {
        pages.push((key.to_vec(), value.to_vec()));
        true
    })
    .unwrap();
    let mut batch = Batch::new();
    let mut records = 0;
    for (key, value) in pages.iter().step_by(every) {
        batch.delete(key.clone());
        for (k, v) in blockseal_volume::fuzzing::format2_records(key, value).unwrap() {
            batch.put(k, v);
            records += 1;
        }
    }
    meta.commit(&batch).unwrap();
    records
}

fn keys_with_prefix(dir: &Path, backend: BackendKind, prefix: &[u8]) -> usize {
    let meta = meta::open(backend, &dir.join("meta")).unwrap();
    let mut n = 0;
    meta.scan_prefix(prefix, &mut |_, _| {
        n += 1;
        true
    })
    .unwrap();
    n
}

#[test]
fn a_format_2_store_moves_its_extent_records_into_pages_even_when_interrupted() {
    for backend in BACKENDS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        // Scattered single blocks (more records than one migration batch
        // holds), and a long sequential run, across many pages.
        let blocks = 16_384u64;
        let expected: Vec<(u64, Vec<u8>)> = (0..blocks)
            .step_by(3)
            .map(|lba| (lba, pattern(lba, BS)))
            .chain((0..600).map(|k| (9_000 + k, pattern(100_000 + k, BS))))
            .collect();
        {
            let (_s, volume) = store_with_volume(&dir, blocks * BS as u64, options(backend));
            for (lba, data) in &expected {
                volume.write_at(lba * BS as u64, data).unwrap();
            }
            volume.flush().unwrap();
        }
        let check = |dir: &Path| {
            let (_s, volume) = reopen(dir, options(backend));
            let mut want: std::collections::BTreeMap<u64, &Vec<u8>> = Default::default();
            for (lba, data) in &expected {
                want.insert(*lba, data);
            }
            for lba in 0..blocks {
                let got = read_block(&volume, lba);
                match want.get(&lba) {
                    Some(data) => assert_eq!(&got, *data, "{backend:?} block {lba}"),
                    None => assert!(got.iter().all(|&b| b == 0), "{backend:?} block {lba}"),
                }
            }
        };
        // A format 2 store: every mapping in `m` records.
        let records = plant_format_2_records(&dir, backend, 1);
        assert!(records > 4096, "{records}");
        let mut format = std::fs::read(dir.join("FORMAT")).unwrap();
        format[8..12].copy_from_slice(&2u32.to_be_bytes());
        std::fs::write(dir.join("FORMAT"), &format).unwrap();
        check(&dir);
        assert_eq!(keys_with_prefix(&dir, backend, b"m"), 0, "{backend:?}");
        let format = std::fs::read(dir.join("FORMAT")).unwrap();
        assert_eq!(
            format[8..12],
            blockseal_volume::FORMAT_VERSION.to_be_bytes()
        );
        // Killed half-way: some pages moved, the others still records. The
        // next open finishes the move.
        plant_format_2_records(&dir, backend, 2);
        assert!(keys_with_prefix(&dir, backend, b"m") > 0);
        check(&dir);
        assert_eq!(keys_with_prefix(&dir, backend, b"m"), 0, "{backend:?}");
    }
}

#[test]
fn recovery_repairs_damaged_writer_records_and_overlapping_mappings() {
    let backend = BackendKind::Redb;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    {
        let (_s, volume) = store_with_volume(&dir, BLOCKS * BS as u64, options(backend));
        volume.write_at(0, &pattern(1, 4 * BS)).unwrap();
        volume.flush().unwrap();
    }
    {
        let (_s, volume) = reopen(&dir, options(backend));
        for lba in [8, 60, 90] {
            volume.write_at(lba * BS as u64, &pattern(lba, BS)).unwrap();
        }
        volume.flush().unwrap();
    }
    // Damage: the first writer's record garbled, and the extent of block 90
    // (alone in its page, blocks 80..120) stretched to 31 blocks, 60..=90,
    // over block 60's extent in the page before.
    {
        let meta = meta::open(backend, &dir.join("meta")).unwrap();
        let mut keys = Vec::new();
        meta.scan_prefix(b"w", &mut |key, _| {
            keys.push(key.to_vec());
            true
        })
        .unwrap();
        let mut pages = Vec::new();
        meta.scan_prefix(b"M", &mut |key, value| {
            pages.push((key.to_vec(), value.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(pages.len(), 3);
        let mut batch = Batch::new();
        batch.put(keys[0].clone(), vec![9u8; 5]);
        // Version, one context (16 bytes), one extent: position 10 (block 90),
        // count - 1 at byte 20.
        let (key, mut value) = pages[2].clone();
        assert_eq!((value[1], value[18], value[19], value[20]), (1, 1, 10, 0));
        value[20] = 30;
        value.extend_from_slice(&[0u8; 30 * 16]);
        batch.put(key, value);
        meta.commit(&batch).unwrap();
    }
    let store = Store::open(&dir, master(1), options(backend)).unwrap();
    assert!(
        store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .is_err()
    );
    drop(store);
    let (store, report) =
        Store::danger_accept_metadata_loss(&dir, master(1), options(backend)).unwrap();
    assert_eq!(report.extents_dropped, 2, "{report:?}");
    let volume = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    // The second writer's blocks survived but the stretched one; what the
    // garbled record sealed is lost, and reads as zeros now that the loss is
    // accepted.
    assert_eq!(read_block(&volume, 8), pattern(8, BS));
    assert_eq!(read_block(&volume, 60), pattern(60, BS));
    assert_eq!(read_block(&volume, 90), vec![0u8; BS]);
    assert_eq!(read_block(&volume, 0), vec![0u8; BS]);
}
