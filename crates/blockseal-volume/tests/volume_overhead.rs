//! Measures metadata bytes per data byte for sequential and random 4 KiB writes
//! and checks the budget: the records the store holds for a volume come to at
//! most 1% of the data they map (the 1.5% target for the store on disk leaves
//! room for the backends' own overhead, measured in `cargo bench --bench
//! volume`).
//!
//! Run with `-- --nocapture` to see the numbers, including the record bytes
//! commits wrote and the metadata store's size on disk.

mod common {
    pub mod volume;
}

use blockseal_volume::StoreOptions;
use blockseal_volume::meta::{self, BackendKind};
use common::volume::*;
use rand::Rng;

const BS: u64 = 4096;
/// Volume size in blocks: 64 MiB, or `BLOCKSEAL_OVERHEAD_MIB` MiB.
fn blocks() -> u64 {
    std::env::var("BLOCKSEAL_OVERHEAD_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(16_384, |mib| mib * 256)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn measure(backend: BackendKind, random: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let blocks = blocks();
    let (_store, volume) = store_with_volume(
        dir.path(),
        blocks * BS,
        StoreOptions::new().backend(backend),
    );
    let mut rng = rand::rng();
    let data = pattern(1, 32 * BS as usize);
    let mut written = 0u64;
    let mut mapped = std::collections::HashSet::new();
    for i in 0..blocks {
        if random {
            let lba = rng.random_range(0..blocks);
            volume.write_at(lba * BS, &data[..BS as usize]).unwrap();
            written += BS;
            mapped.insert(lba);
        } else if i % 32 == 0 {
            // 128 KiB sequential writes, as a recording stream does.
            volume.write_at(i * BS, &data).unwrap();
            written += 32 * BS;
            mapped.extend(i..i + 32);
        }
        if i % 1024 == 1023 {
            volume.flush().unwrap();
        }
    }
    volume.flush().unwrap();
    let stats = volume.stats();
    drop((volume, _store));
    // Every record of the store: the volume's mappings and live counts, and
    // the store's few fixed records.
    let mut held = 0u64;
    meta::open(backend, &dir.path().join("meta"))
        .unwrap()
        .scan_prefix(b"", &mut |key, value| {
            held += (key.len() + value.len()) as u64;
            true
        })
        .unwrap();
    let data = mapped.len() as u64 * BS;
    let ratio = held as f64 / data as f64;
    eprintln!(
        "{backend:?} {}: {data} data bytes mapped, {held} record bytes held ({:.3}%), {} written by commits for {written} data bytes written ({:.3}%), metadata store on disk {} bytes ({:.2}%)",
        if random {
            "random 4 KiB"
        } else {
            "sequential 128 KiB"
        },
        ratio * 100.0,
        stats.metadata_bytes,
        stats.metadata_bytes as f64 / written as f64 * 100.0,
        dir_size(&dir.path().join("meta")),
        dir_size(&dir.path().join("meta")) as f64 / data as f64 * 100.0,
    );
    ratio
}

#[test]
fn metadata_overhead_stays_within_budget() {
    for backend in [BackendKind::Redb, BackendKind::Sled] {
        let sequential = measure(backend, false);
        assert!(sequential <= 0.005, "{backend:?}: {sequential}");
        let random = measure(backend, true);
        assert!(random <= 0.010, "{backend:?}: {random}");
    }
}
