//! Commit latency and on-disk size of each metadata-store backend.
//!
//! Not a benchmark with assertions: it prints medians so backends can be compared
//! on the machine at hand. Run it with
//!
//! ```text
//! cargo test --release -p blockseal-volume --test meta_measure -- --ignored --nocapture
//! ```

mod common {
    pub mod moto;
}

use std::path::Path;
use std::time::{Duration, Instant};

use blockseal_volume::meta::{self, BackendKind, Batch, MetaStore};

/// A mapping-record-sized value.
const VALUE_LEN: usize = 48;

#[test]
#[ignore = "measurement; prints numbers, run by hand"]
fn measure_backends() {
    for kind in [BackendKind::Sled, BackendKind::Redb, BackendKind::SlateDb] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = meta::open(kind, dir.path()).unwrap();
        // Fill some state first so commits do not run on an empty tree.
        fill(&*store, 0, 10_000, 1_000);

        let single = time_commits(&*store, 500, 1);
        let batch32 = time_commits(&*store, 300, 32);
        drop(store);
        println!(
            "{kind:?}: durable commit of 1 key median {:?} p90 {:?}; of 32 keys median {:?} p90 {:?}",
            single.0, single.1, batch32.0, batch32.1
        );

        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = meta::open(kind, dir.path()).unwrap();
        let started = Instant::now();
        fill(&*store, 0, 100_000, 32);
        let fill_time = started.elapsed();
        drop(store);
        let (apparent, allocated) = disk_usage(dir.path());
        let store = meta::open(kind, dir.path()).unwrap();
        fill(&*store, 0, 100_000, 32);
        drop(store);
        let (apparent2, allocated2) = disk_usage(dir.path());
        println!(
            "{kind:?}: 100k keys ({VALUE_LEN}-byte values, 16-byte keys) in 32-key commits took \
             {fill_time:?}; on disk {} KiB apparent / {} KiB allocated; \
             after rewriting every key once {} KiB / {} KiB",
            apparent >> 10,
            allocated >> 10,
            apparent2 >> 10,
            allocated2 >> 10,
        );
    }
}

/// Durable commits of SlateDB in a bucket of a local moto server: the
/// metadata part of a FLUSH on object storage, one writer at a time and eight
/// at once.
#[test]
#[ignore = "measurement; prints numbers, run by hand"]
fn measure_s3_commits() {
    let prefix = common::moto::unique_prefix("measure");
    let store = meta::open_object_store(common::moto::bucket(), &prefix, &meta::OpenOptions::new())
        .unwrap();
    fill(&*store, 0, 10_000, 1_000);
    let single = time_commits(&*store, 300, 1);
    let batch32 = time_commits(&*store, 300, 32);
    println!(
        "SlateDb on moto: durable commit of 1 key median {:?} p90 {:?}; of 32 keys median {:?} p90 {:?}",
        single.0, single.1, batch32.0, batch32.1
    );
    let started = Instant::now();
    let times: Vec<Duration> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| s.spawn(|| time_commits(&*store, 100, 32)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap().0).collect()
    });
    println!(
        "SlateDb on moto: 8 writers x 100 commits of 32 keys in {:?}; per-writer medians {:?}",
        started.elapsed(),
        times
    );
}

fn key(i: u64) -> Vec<u8> {
    let mut key = b"map/v001".to_vec();
    key.extend_from_slice(&i.to_be_bytes());
    key
}

fn fill(store: &dyn MetaStore, from: u64, to: u64, per_batch: u64) {
    let mut i = from;
    while i < to {
        let mut batch = Batch::new();
        for j in i..(i + per_batch).min(to) {
            batch.put(key(j), vec![(j % 251) as u8; VALUE_LEN]);
        }
        store.commit(&batch).unwrap();
        i += per_batch;
    }
}

/// Median and 90th percentile of `count` durable commits of `keys` keys each.
fn time_commits(store: &dyn MetaStore, count: usize, keys: u64) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(count);
    for n in 0..count as u64 {
        let mut batch = Batch::new();
        for j in 0..keys {
            // Scattered keys, as block mappings of random writes would be.
            let lba = (n * 7919 + j * 104_729) % 1_000_000;
            batch.put(key(lba), vec![(n % 251) as u8; VALUE_LEN]);
        }
        let started = Instant::now();
        store.commit(&batch).unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    (times[count / 2], times[count * 9 / 10])
}

/// Apparent and allocated bytes of every file under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path());
            apparent += a;
            allocated += b;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    (apparent, allocated)
}

/// FLUSH latency of a volume after one 4 KiB write, per backend: segment sync,
/// the metadata commit and the commit marker's write and fdatasync together;
/// and the marker's part alone (an in-place 24-byte write and fdatasync).
#[test]
#[ignore = "measurement; prints numbers, run by hand"]
fn measure_flush() {
    use blockseal_keys::{KeyId, MasterKey, TenantId, VolumeId, Zeroizing};
    use blockseal_volume::{Store, StoreOptions, VolumeOptions};
    use std::os::unix::fs::FileExt;

    for kind in [BackendKind::Redb, BackendKind::Sled, BackendKind::SlateDb] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let master = MasterKey::from_bytes(KeyId::from_bytes([1; 16]), 0, Zeroizing::new([2; 32]));
        let options = StoreOptions::new()
            .backend(kind)
            .background_compaction(false);
        let store = Store::create(dir.path(), master, options).unwrap();
        let (tenant, name) = (
            TenantId::new("acme").unwrap(),
            VolumeId::new("disk").unwrap(),
        );
        store.create_tenant(&tenant).unwrap();
        store
            .create_volume(&tenant, &name, 64 << 20, VolumeOptions::default())
            .unwrap();
        let volume = store.open_volume(&tenant, &name).unwrap();
        let mut times = Vec::new();
        for k in 0..400u64 {
            volume
                .write_at((k % 1024) * 4096, &[k as u8; 4096])
                .unwrap();
            let started = Instant::now();
            volume.flush().unwrap();
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "{kind:?}: write + FLUSH of one 4 KiB block: flush median {:?} p90 {:?}",
            times[times.len() / 2],
            times[times.len() * 9 / 10]
        );
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = std::fs::File::create(dir.path().join("COMMITS")).unwrap();
    file.write_all_at(&[0u8; 24], 0).unwrap();
    file.sync_all().unwrap();
    let mut times = Vec::new();
    for k in 0..400u64 {
        let started = Instant::now();
        file.write_all_at(&k.to_be_bytes(), 8).unwrap();
        file.sync_data().unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "commit marker alone (24-byte in-place write + fdatasync): median {:?} p90 {:?}",
        times[times.len() / 2],
        times[times.len() * 9 / 10]
    );
}
