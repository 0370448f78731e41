//! Volume round trips, holes, range errors, persistence and store-level refusals.

mod common {
    pub mod volume;
}

use blockseal_keys::{TenantId, VolumeId};
use blockseal_volume::{
    BlockStatus, ErrorKind, OpenError, Store, StoreOptions, VolumeError, VolumeOptions,
};
use common::volume::*;

const MIB: u64 = 1 << 20;

#[test]
fn round_trips_at_aligned_and_unaligned_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, volume) = store_with_volume(dir.path(), 4 * MIB, StoreOptions::new());
    let mut model = vec![0u8; 4 * MIB as usize];
    let cases: &[(u64, usize)] = &[
        (0, 4096),
        (4096, 8192),
        (1, 1),
        (4095, 2),
        (100, 10_000),
        (8191, 4097),
        (MIB, 65536),
        (4 * MIB - 3, 3),
        (12_288, 4096 * 3 + 17),
    ];
    for (n, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(n as u64 + 1, len);
        volume.write_at(offset, &data).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let mut back = vec![0u8; len];
        volume.read_at(offset, &mut back).unwrap();
        assert_eq!(back, data, "write {n} at {offset}+{len}");
    }
    let mut all = vec![0u8; model.len()];
    volume.read_at(0, &mut all).unwrap();
    assert!(all == model, "whole volume matches the model before flush");
    volume.flush().unwrap();
    volume.read_at(0, &mut all).unwrap();
    assert!(all == model, "whole volume matches the model after flush");
}

#[test]
fn unwritten_reads_zero_and_trim_and_zeroes_drop_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, volume) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    let mut buf = vec![0xffu8; 10_000];
    volume.read_at(5, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    volume.write_at(0, &[7u8; 65536]).unwrap();
    volume.flush().unwrap();
    volume.trim(4096, 8192).unwrap();
    volume.write_zeroes(20_000, 100).unwrap();
    let mut back = vec![0u8; 65536];
    volume.read_at(0, &mut back).unwrap();
    for (i, &b) in back.iter().enumerate() {
        let zero = (4096..12_288).contains(&i) || (20_000..20_100).contains(&i);
        assert_eq!(b, if zero { 0 } else { 7 }, "byte {i}");
    }
    assert_eq!(
        volume.block_status(0, 65536).unwrap(),
        vec![
            BlockStatus {
                len: 4096,
                allocated: true
            },
            BlockStatus {
                len: 8192,
                allocated: false
            },
            BlockStatus {
                len: 65536 - 12_288,
                allocated: true
            },
        ]
    );
    assert_eq!(
        volume.block_status(65536, 4096).unwrap(),
        vec![BlockStatus {
            len: 4096,
            allocated: false
        }]
    );
    // A large trim takes the direct path, and survives a reopen.
    volume.write_at(0, &vec![9u8; MIB as usize]).unwrap();
    volume.trim(0, MIB).unwrap();
    volume.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn out_of_range_requests_fail_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, volume) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    let mut buf = [0u8; 2];
    let e = volume.read_at(MIB - 1, &mut buf).unwrap_err();
    assert!(matches!(e, VolumeError::OutOfRange { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    let e = volume.write_at(MIB - 1, &buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    let e = volume.write_at(u64::MAX, &buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert_eq!(volume.trim(MIB, 1).unwrap_err().kind(), ErrorKind::NoSpace);
    volume.read_at(MIB, &mut []).unwrap();
    volume.write_at(MIB - 2, &buf).unwrap();
    assert!(!volume.is_poisoned());
}

#[test]
fn data_survives_reopen_and_segments_roll_over() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments so the data spans several.
    let options = || StoreOptions::new().segment_bytes(64 * 1024);
    let data = pattern(42, 300_000);
    {
        let (_store, volume) = store_with_volume(dir.path(), 4 * MIB, options());
        volume.write_at(12_345, &data).unwrap();
        volume.write_at_fua(3 * MIB, b"tail").unwrap();
        volume.write_at(MIB, b"flushed by close").unwrap();
        volume.close().unwrap();
    }
    let (_store, volume) = reopen(dir.path(), options());
    let mut back = vec![0u8; data.len()];
    volume.read_at(12_345, &mut back).unwrap();
    assert_eq!(back, data);
    let mut tail = [0u8; 4];
    volume.read_at(3 * MIB, &mut tail).unwrap();
    assert_eq!(&tail, b"tail");
    let mut closed = [0u8; 16];
    volume.read_at(MIB, &mut closed).unwrap();
    assert_eq!(&closed, b"flushed by close");
    // Overwrite after reopen lands in a fresh segment and reads back.
    volume.write_at(12_345, b"new").unwrap();
    volume.flush().unwrap();
    volume.read_at(12_345, &mut back[..3]).unwrap();
    assert_eq!(&back[..3], b"new");
}

#[test]
fn wrong_master_key_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with_volume(dir.path(), MIB, StoreOptions::new()));
    let e = Store::open(dir.path(), master(2), StoreOptions::new()).unwrap_err();
    assert!(matches!(e, OpenError::WrongMasterKey(_)), "{e:?}");
    assert!(
        e.to_string().starts_with("wrong master key for this store"),
        "{e}"
    );
    Store::open(dir.path(), master(1), StoreOptions::new()).unwrap();
}

#[test]
fn newer_format_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with_volume(dir.path(), MIB, StoreOptions::new()));
    let path = dir.path().join("FORMAT");
    let mut header = std::fs::read(&path).unwrap();
    header[8..12].copy_from_slice(&7u32.to_be_bytes());
    std::fs::write(&path, header).unwrap();
    let e = Store::open(dir.path(), master(1), StoreOptions::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "store format v7 is newer than this build supports (v4)"
    );
    let e = Store::open(
        tempfile::tempdir().unwrap().path(),
        master(1),
        StoreOptions::new(),
    )
    .unwrap_err();
    assert!(matches!(e, OpenError::NotAStore { .. }), "{e:?}");
}

#[test]
fn store_is_exclusive_and_create_refuses_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _volume) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    let e = Store::open(dir.path(), master(1), StoreOptions::new()).unwrap_err();
    assert!(matches!(e, OpenError::Locked { .. }), "{e:?}");
    drop(_volume);
    drop(store);
    let e = Store::create(dir.path(), master(1), StoreOptions::new()).unwrap_err();
    assert!(matches!(e, OpenError::AlreadyExists { .. }), "{e:?}");
}

#[test]
fn names_sizes_and_lookups() {
    assert!(TenantId::new("Bad/Name").is_err());
    assert!(VolumeId::new("").is_err());
    let dir = tempfile::tempdir().unwrap();
    let (store, _volume) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    let acme = tenant("acme");
    assert_eq!(
        store.create_tenant(&acme).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let e = store
        .create_volume(&acme, &volume_id("odd"), 1000, VolumeOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("not a positive multiple"), "{e}");
    let e = store
        .create_volume(
            &tenant("nobody"),
            &volume_id("x"),
            MIB,
            VolumeOptions::default(),
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "no tenant nobody");
    let e = store.open_volume(&acme, &volume_id("missing")).unwrap_err();
    assert_eq!(e.to_string(), "no volume acme/missing");
    store.create_tenant(&tenant("beta")).unwrap();
    store
        .create_volume(
            &acme,
            &volume_id("small-blocks"),
            MIB,
            VolumeOptions {
                block_size: blockseal_volume::BlockSize::new(512).unwrap(),
            },
        )
        .unwrap();
    let names: Vec<String> = store
        .tenants()
        .unwrap()
        .iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    let vols: Vec<String> = store
        .volumes(&acme)
        .unwrap()
        .iter()
        .map(|v| v.id.to_string())
        .collect();
    assert_eq!(vols, ["disk", "small-blocks"]);
    assert!(store.volumes(&tenant("beta")).unwrap().is_empty());
    assert!(store.tenant(&tenant("zeta")).unwrap().is_none());

    let small = store
        .open_volume(&acme, &volume_id("small-blocks"))
        .unwrap();
    assert_eq!(small.block_size().get(), 512);
    small.write_at(511, &[1, 2, 3]).unwrap();
    let mut b = [0u8; 3];
    small.read_at(511, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3]);
}

#[test]
fn opening_a_volume_twice_shares_one_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (store, first) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    let second = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    first.write_at(0, b"from first").unwrap();
    let mut b = [0u8; 10];
    second.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"from first");
    // A flush through the second handle covers the first handle's write.
    second.flush().unwrap();
    assert_eq!(first.stats().overlay_blocks, 0);
    assert_eq!(first.stats().commits, 1);
}

#[test]
fn concurrent_unaligned_writes_to_one_block_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, volume) = store_with_volume(dir.path(), MIB, StoreOptions::new());
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let volume = volume.clone();
            s.spawn(move || {
                for round in 0..50u64 {
                    // Each thread owns byte t*16..t*16+16 of block 0.
                    volume.write_at(u64::from(t) * 16, &[t + 1; 16]).unwrap();
                    if round % 10 == 0 {
                        volume.flush().unwrap();
                    }
                }
            });
        }
    });
    let mut b = [0u8; 128];
    volume.read_at(0, &mut b).unwrap();
    for t in 0..8u8 {
        assert!(
            b[t as usize * 16..t as usize * 16 + 16]
                .iter()
                .all(|&x| x == t + 1)
        );
    }
}

#[test]
fn a_full_overlay_is_committed_without_an_explicit_flush_and_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64;
    let (store, volume) =
        store_with_volume(dir.path(), MIB, StoreOptions::new().overlay_blocks(limit));
    // Scattered single-block writes: each is its own overlay entry.
    for n in 0..256u64 {
        let lba = (n * 37) % 256;
        volume
            .write_at(lba * 4096, &[(n % 255) as u8 + 1; 4096])
            .unwrap();
        // Past the bound the flush thread commits; past twice the bound the
        // writer itself flushes, so the overlay never holds more than that.
        assert!(volume.stats().overlay_blocks <= 2 * limit as u64 + 1);
    }
    // Every write reads back, wherever its mapping is (overlay or store).
    for n in 0..256u64 {
        let lba = (n * 37) % 256;
        let mut b = [0u8; 4096];
        volume.read_at(lba * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == (n % 255) as u8 + 1), "block {lba}");
    }
    assert!(volume.stats().commits >= 1);
    // Dropping the store stops its flush thread; the store reopens at once.
    drop(volume);
    drop(store);
    let reopened =
        blockseal_volume::Store::open(dir.path(), master(1), StoreOptions::new()).unwrap();
    drop(reopened);
}
