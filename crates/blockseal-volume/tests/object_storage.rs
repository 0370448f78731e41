//! Segments and metadata on object storage: the `ObjectSegments` contract on a
//! local object-store directory and on a moto S3 server started by the test,
//! and whole stores whose segments and metadata both live in the bucket.

mod common {
    pub mod faulty_store;
    pub mod moto;
    pub mod volume;
}

use std::sync::Arc;

use blockseal_volume::segment::{ObjectSegments, SegmentId, SegmentStore};
use blockseal_volume::{OpenError, Store, StoreOptions, VolumeError};
use common::moto::unique_prefix;
use common::volume::*;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

const BS: usize = 4096;

fn local_store(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    Arc::new(
        LocalFileSystem::new_with_prefix(dir)
            .unwrap()
            .with_fsync(true)
            .with_automatic_cleanup(true),
    )
}

/// Everything `SegmentStore` promises, on one object store, including what a
/// second instance (another process, after a crash) sees.
fn segment_contract(store: Arc<dyn ObjectStore>, prefix: &str) {
    let segments = ObjectSegments::new(Arc::clone(&store), prefix).unwrap();
    let a = SegmentId {
        volume: 7,
        index: 0,
    };
    let b = SegmentId {
        volume: 7,
        index: 1,
    };
    assert_eq!(segments.list(7).unwrap(), Vec::<u32>::new());
    segments.create(a).unwrap();
    segments.create(b).unwrap();
    assert_eq!(
        segments.create(a).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    assert_eq!(segments.list(7).unwrap(), vec![0, 1]);
    assert_eq!(segments.size(a).unwrap(), 0);

    // Three writes, one left out of the middle until later: a sync uploads
    // two runs, and the late write becomes a run of its own.
    let first = pattern(1, 2 * BS);
    let third = pattern(3, BS);
    segments.write_at(a, 0, &first).unwrap();
    segments.write_at(a, 3 * BS as u64, &third).unwrap();
    let mut buf = vec![0; BS];
    assert!(segments.read_cached(a, BS as u64, &mut buf).unwrap());
    assert_eq!(buf, first[BS..]);
    segments.sync(a).unwrap();
    let second = pattern(2, BS);
    segments.write_at(a, 2 * BS as u64, &second).unwrap();
    let unsynced = pattern(4, BS);
    segments.write_at(a, 4 * BS as u64, &unsynced).unwrap();
    assert_eq!(segments.size(a).unwrap(), 5 * BS as u64);
    // A read across a run boundary and across synced and unsynced data.
    let mut all = vec![0; 5 * BS];
    segments.read_at(a, 0, &mut all).unwrap();
    assert_eq!(
        all,
        [&first[..], &second[..], &third[..], &unsynced[..]].concat()
    );
    segments.sync(a).unwrap();
    segments
        .write_at(a, 5 * BS as u64, &pattern(5, BS))
        .unwrap();

    // A second instance sees what was synced and nothing else.
    let other = ObjectSegments::new(Arc::clone(&store), prefix).unwrap();
    assert_eq!(other.list(7).unwrap(), vec![0, 1]);
    assert_eq!(other.size(a).unwrap(), 5 * BS as u64);
    let mut buf = vec![0; 4 * BS];
    assert!(!other.read_cached(a, BS as u64, &mut buf).unwrap());
    other.read_at(a, BS as u64, &mut buf).unwrap();
    assert_eq!(buf, all[BS..]);
    // Now cached: no request needed.
    assert!(other.read_cached(a, BS as u64, &mut buf).unwrap());
    let mut past = vec![0; BS];
    assert_eq!(
        other
            .read_at(a, 5 * BS as u64, &mut past)
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::UnexpectedEof
    );

    segments.delete(a).unwrap();
    segments.delete(a).unwrap();
    assert_eq!(segments.list(7).unwrap(), vec![1]);
    let fresh = ObjectSegments::new(Arc::clone(&store), prefix).unwrap();
    assert_eq!(fresh.list(7).unwrap(), vec![1]);
    assert!(fresh.read_at(a, 0, &mut past).is_err());
}

#[test]
fn segments_in_a_local_object_store_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    segment_contract(local_store(dir.path()), "segments");
}

#[test]
fn segments_in_s3_keep_the_contract() {
    segment_contract(common::moto::bucket(), &unique_prefix("contract"));
}

/// Store options that keep both segments and metadata under `prefix` of the
/// test's bucket (a new client, as after a restart).
fn s3_options(prefix: &str) -> StoreOptions {
    StoreOptions::new()
        .object_storage(common::moto::bucket(), prefix)
        .background_compaction(false)
}

#[test]
fn a_store_opens_only_with_the_object_storage_it_was_created_with() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("mismatch");
    drop(store_with_volume(dir.path(), 1 << 20, s3_options(&prefix)));
    assert!(!dir.path().join("meta").exists());
    assert!(!dir.path().join("segments").exists());
    match Store::open(dir.path(), master(1), StoreOptions::new()) {
        Err(e @ OpenError::ObjectStorageMismatch { .. }) => {
            assert!(e.to_string().contains("in object storage"), "{e}");
        }
        other => panic!("opening without object storage gave {:?}", other.err()),
    }
    // A second store cannot be created over the first one's objects.
    let other = tempfile::tempdir().unwrap();
    match Store::create(other.path(), master(1), s3_options(&prefix)) {
        Err(OpenError::AlreadyExists { path }) => {
            assert!(path.to_string_lossy().contains(&prefix), "{path:?}")
        }
        other => panic!(
            "creating a second store at one prefix gave {:?}",
            other.err()
        ),
    }
    // And a local store does not open as one in object storage.
    let local = tempfile::tempdir().unwrap();
    drop(store_with_volume(
        local.path(),
        1 << 20,
        StoreOptions::new(),
    ));
    assert!(matches!(
        Store::open(local.path(), master(1), s3_options(&unique_prefix("none"))),
        Err(OpenError::ObjectStorageMismatch { .. })
    ));
    // The store itself still opens.
    drop(reopen(dir.path(), s3_options(&prefix)));
}

#[test]
fn a_store_on_s3_keeps_flushed_writes_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("store");
    let blocks = 64u64;
    {
        let (store, volume) = store_with_volume(dir.path(), 1 << 20, s3_options(&prefix));
        for lba in 0..blocks {
            volume.write_at(lba * BS as u64, &pattern(lba, BS)).unwrap();
        }
        volume.flush().unwrap();
        // Overwrites, flushed again: the new mappings must win.
        for lba in (0..blocks).step_by(3) {
            volume
                .write_at(lba * BS as u64, &pattern(1000 + lba, BS))
                .unwrap();
        }
        volume.flush().unwrap();
        // Never flushed: may be lost, must never read as garbage.
        volume.write_at(0, &pattern(9999, BS)).unwrap();
        drop(volume);
        drop(store);
    }
    let (_store, volume) = reopen(dir.path(), s3_options(&prefix));
    let mut buf = vec![0; BS];
    for lba in 1..blocks {
        volume.read_at(lba * BS as u64, &mut buf).unwrap();
        let want = if lba % 3 == 0 { 1000 + lba } else { lba };
        assert_eq!(buf, pattern(want, BS), "block {lba}");
    }
    volume.read_at(0, &mut buf).unwrap();
    assert!(
        buf == pattern(1000, BS) || buf == pattern(9999, BS),
        "block 0 holds neither its flushed nor its later content"
    );
}

#[test]
fn a_segment_missing_from_the_bucket_is_an_error_for_that_read() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("missing");
    {
        let (_store, volume) = store_with_volume(dir.path(), 1 << 20, s3_options(&prefix));
        volume.write_at(0, &pattern(1, BS)).unwrap();
        volume.flush().unwrap();
    }
    // Someone deletes the data objects behind the store's back.
    let bucket = common::moto::bucket();
    let doomed: Vec<_> = common::moto::list_paths(&bucket, &format!("{prefix}/segments"))
        .into_iter()
        .filter(|path| path.filename().is_some_and(|name| name.starts_with('r')))
        .collect();
    assert!(!doomed.is_empty(), "no data object under {prefix}/segments");
    common::moto::delete_paths(&bucket, &doomed);
    let (_store, volume) = reopen(dir.path(), s3_options(&prefix));
    let mut buf = vec![0; BS];
    match volume.read_at(0, &mut buf) {
        Err(VolumeError::Io(_)) => {}
        other => panic!("a read of a block whose object is gone returned {other:?}"),
    }
}

/// Two hosts on one prefix (the second started from a copy of the first's
/// data directory): the second's open fences the first, which can then make
/// nothing durable, and whatever the first flushed before stays.
#[test]
fn a_second_host_on_one_prefix_fences_the_first_and_loses_nothing_flushed() {
    let prefix = unique_prefix("two-hosts");
    let first_dir = tempfile::tempdir().unwrap();
    let (first_store, first) = store_with_volume(first_dir.path(), 1 << 20, s3_options(&prefix));
    for lba in 0..16u64 {
        first.write_at(lba * BS as u64, &pattern(lba, BS)).unwrap();
    }
    first.flush().unwrap();

    let second_dir = tempfile::tempdir().unwrap();
    for name in ["FORMAT", "COMMITS"] {
        std::fs::copy(first_dir.path().join(name), second_dir.path().join(name)).unwrap();
    }
    let (second_store, second) = reopen(second_dir.path(), s3_options(&prefix));

    // The first host, fenced, writes on: its FLUSH fails, so nothing it
    // writes from now on was ever acknowledged as durable.
    first.write_at(0, &pattern(777, BS)).unwrap();
    assert!(first.flush().is_err(), "a fenced host's FLUSH succeeded");

    let mut buf = vec![0; BS];
    for lba in 0..16u64 {
        second.read_at(lba * BS as u64, &mut buf).unwrap();
        assert_eq!(buf, pattern(lba, BS), "block {lba} on the second host");
    }
    second.write_at(BS as u64, &pattern(888, BS)).unwrap();
    second.flush().unwrap();
    drop((first, first_store, second, second_store));

    let (_store, volume) = reopen(second_dir.path(), s3_options(&prefix));
    for lba in 0..16u64 {
        volume.read_at(lba * BS as u64, &mut buf).unwrap();
        let want = if lba == 1 { 888 } else { lba };
        assert_eq!(buf, pattern(want, BS), "block {lba} after both hosts");
    }
}

/// What a cluster's leases rest on: a record changes only from the version
/// the writer read, is created only when absent, and a LIST shows every
/// record's current version; on moto.
#[test]
fn records_change_only_by_compare_and_swap() {
    use blockseal_volume::object::{Expect, PutError, Records};
    let records = Records::new(common::moto::bucket(), &unique_prefix("records")).unwrap();
    assert!(records.get("leases/s000").unwrap().is_none());
    assert!(records.list("leases").unwrap().is_empty());

    let first = records
        .put("leases/s000", b"one".to_vec(), &Expect::Absent)
        .unwrap();
    // A second create loses.
    assert!(matches!(
        records.put("leases/s000", b"two".to_vec(), &Expect::Absent),
        Err(PutError::Conflict)
    ));
    let second = records
        .put(
            "leases/s000",
            b"two".to_vec(),
            &Expect::Version(first.clone()),
        )
        .unwrap();
    assert_ne!(first, second);
    // A writer that read the first version cannot replace the second.
    assert!(matches!(
        records.put("leases/s000", b"stale".to_vec(), &Expect::Version(first)),
        Err(PutError::Conflict)
    ));
    let read = records.get("leases/s000").unwrap().unwrap();
    assert_eq!(read.body, b"two");
    assert_eq!(read.version, second);

    records
        .put("leases/s001", b"x".to_vec(), &Expect::Absent)
        .unwrap();
    let listed = records.list("leases").unwrap();
    let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["s000", "s001"]);
    assert_eq!(listed[0].version, second);
    assert!(listed[0].modified_ms > 0);
    records.delete("leases/s001").unwrap();
    records.delete("leases/s001").unwrap();
    assert_eq!(records.list("leases").unwrap().len(), 1);
}

/// Faults of the bucket under the segment store: failed PUTs, slow ones, a
/// PUT stuck until long after its call gave up (then landing), a stuck GET.
/// Every call fails or succeeds in bounded time, nothing written is lost,
/// and the late upload is adopted instead of failing every later sync.
#[test]
fn segment_uploads_survive_failures_delays_and_a_stuck_request() {
    use common::faulty_store::{Fault, FaultyStore};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let faulty = FaultyStore::new(common::moto::bucket());
    let prefix = unique_prefix("faults");
    // The run objects only (`.../<index>/r<start>`), not `created`.
    faulty.only("/r0");
    let timeout = Duration::from_millis(500);
    let segments = ObjectSegments::new(faulty.clone(), &prefix)
        .unwrap()
        .request_timeout(timeout);
    let id = SegmentId {
        volume: 1,
        index: 0,
    };
    segments.create(id).unwrap();
    let block = |n: u8| vec![n; BS];

    faulty.puts(Fault::Fail);
    segments.write_at(id, 0, &block(1)).unwrap();
    segments.sync(id).unwrap_err();
    let mut buf = vec![0; BS];
    segments.read_at(id, 0, &mut buf).unwrap();
    assert_eq!(buf, block(1), "unsynced data reads from memory");
    faulty.puts(Fault::None);
    segments.sync(id).unwrap();

    faulty.puts(Fault::Delay(Duration::from_millis(100)));
    segments.write_at(id, BS as u64, &block(2)).unwrap();
    segments.sync(id).unwrap();

    faulty.puts(Fault::Stuck);
    segments.write_at(id, 2 * BS as u64, &block(3)).unwrap();
    let stuck = segments.sync(id).unwrap_err();
    assert_eq!(stuck.kind(), std::io::ErrorKind::TimedOut, "{stuck}");
    segments.write_at(id, 3 * BS as u64, &block(4)).unwrap();
    faulty.puts(Fault::None);
    faulty.release();
    // The late PUT lands: a fresh reader sees its block.
    let fresh = || ObjectSegments::new(common::moto::bucket(), &prefix).unwrap();
    blockseal_test_support::wait_until("the stuck upload to land", Duration::from_secs(10), || {
        faulty.landed.load(Ordering::SeqCst) == 1
            && fresh().read_at(id, 2 * BS as u64, &mut vec![0; BS]).is_ok()
    });
    segments.sync(id).unwrap();
    let reader = fresh();
    for (n, value) in [1u8, 2, 3, 4].into_iter().enumerate() {
        reader.read_at(id, (n * BS) as u64, &mut buf).unwrap();
        assert_eq!(buf, block(value), "block {n}");
    }

    faulty.gets(Fault::Stuck);
    let slow_reader = ObjectSegments::new(faulty.clone(), &prefix)
        .unwrap()
        .request_timeout(timeout);
    let err = slow_reader.read_at(id, 0, &mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    faulty.gets(Fault::None);
    faulty.release();
    slow_reader.read_at(id, 0, &mut buf).unwrap();
    assert_eq!(buf, block(1));
}

/// A whole store on a bucket that fails its segment uploads for a while: the
/// FLUSH that meets the failure is an error, the writes stay, and the FLUSH
/// after the bucket recovers makes them durable.
#[test]
fn a_store_whose_bucket_fails_a_while_loses_no_write_it_flushed_after() {
    use common::faulty_store::{Fault, FaultyStore};
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("faulty-store");
    let faulty = FaultyStore::new(common::moto::bucket());
    faulty.only("/segments/");
    let options = StoreOptions::new()
        .object_storage(faulty.clone(), &prefix)
        .background_compaction(false);
    {
        let (_store, volume) = store_with_volume(dir.path(), 1 << 20, options);
        volume.write_at(0, &pattern(1, BS)).unwrap();
        volume.flush().unwrap();
        faulty.puts(Fault::Fail);
        volume.write_at(BS as u64, &pattern(2, BS)).unwrap();
        match volume.flush() {
            Err(VolumeError::Io(e)) => assert!(e.to_string().contains("injected"), "{e}"),
            other => panic!("a flush over a failing bucket gave {other:?}"),
        }
        let mut buf = vec![0; BS];
        volume.read_at(BS as u64, &mut buf).unwrap();
        assert_eq!(buf, pattern(2, BS));
        faulty.puts(Fault::None);
        volume.flush().unwrap();
    }
    let (_store, volume) = reopen(dir.path(), s3_options(&prefix));
    let mut buf = vec![0; BS];
    for lba in 0..2u64 {
        volume.read_at(lba * BS as u64, &mut buf).unwrap();
        assert_eq!(buf, pattern(lba + 1, BS), "block {lba}");
    }
}
