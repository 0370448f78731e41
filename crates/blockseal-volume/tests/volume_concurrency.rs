//! A large write in progress must not hold up small writes and reads of other
//! blocks of the same volume: whole blocks take no block lock, so a 4 KiB write
//! never waits for a 8 MiB write's sealing and segment I/O.

mod common {
    pub mod gated_meta;
    pub mod volume;
}

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockseal_volume::meta::{self, BackendKind};
use blockseal_volume::{FileSegments, SMALL_WRITE_BYTES, SegmentId, SegmentStore, StoreOptions};
use common::gated_meta::GatedMeta;
use common::volume::*;

const BS: usize = 4096;
const BIG: usize = 8 << 20;

/// Segment files whose writes of at least `BIG` bytes wait, once they have
/// started, until released.
struct GatedSegments {
    inner: FileSegments,
    /// (a big write is waiting, it may go on)
    gate: Mutex<(bool, bool)>,
    signal: Condvar,
}

impl GatedSegments {
    fn wait_entered(&self) {
        let mut gate = self.gate.lock().unwrap();
        while !gate.0 {
            gate = self.signal.wait(gate).unwrap();
        }
    }

    fn release(&self) {
        self.gate.lock().unwrap().1 = true;
        self.signal.notify_all();
    }
}

impl SegmentStore for GatedSegments {
    fn create(&self, id: SegmentId) -> io::Result<()> {
        self.inner.create(id)
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.len() >= BIG {
            let mut gate = self.gate.lock().unwrap();
            gate.0 = true;
            self.signal.notify_all();
            while !gate.1 {
                gate = self.signal.wait(gate).unwrap();
            }
        }
        self.inner.write_at(id, offset, data)
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(id, offset, buf)
    }

    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.read_cached(id, offset, buf)
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        self.inner.sync(id)
    }

    fn delete(&self, id: SegmentId) -> io::Result<()> {
        self.inner.delete(id)
    }

    fn list(&self, volume: u32) -> io::Result<Vec<u32>> {
        self.inner.list(volume)
    }
}

#[test]
fn small_writes_and_reads_go_on_while_a_large_write_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let segments = Arc::new(GatedSegments {
        inner: FileSegments::new(dir.path().join("segments")).unwrap(),
        gate: Mutex::new((false, false)),
        signal: Condvar::new(),
    });
    let options = StoreOptions::new()
        .background_compaction(false)
        .segment_store(segments.clone());
    let (_store, volume) = store_with_volume(&dir.path().join("store"), 64 << 20, options);
    volume.write_at(40 << 20, &pattern(1, BS)).unwrap();

    // An 8 MiB write covering the first 2048 blocks, held inside its segment
    // write (its blocks are sealed and its space allocated).
    let big = std::thread::spawn({
        let volume = volume.clone();
        move || volume.write_at(0, &pattern(2, BIG))
    });
    segments.wait_entered();

    // Meanwhile: 4 KiB writes to blocks the big write covers and to others,
    // a partial write, and reads; all complete while it is still held.
    let (done, finished) = mpsc::channel();
    let small = std::thread::spawn({
        let volume = volume.clone();
        move || {
            for k in 0..64u64 {
                volume
                    .write_at(k * 37 * BS as u64, &pattern(100 + k, BS))
                    .unwrap();
            }
            volume.write_at((50 << 20) + 100, b"partial").unwrap();
            let mut buf = vec![0u8; BS];
            volume.read_at(40 << 20, &mut buf).unwrap();
            assert_eq!(buf, pattern(1, BS));
            done.send(()).unwrap();
        }
    });
    let waited = finished.recv_timeout(Duration::from_secs(60));
    // Released whatever happened, so a failure does not hang the test.
    segments.release();
    small.join().unwrap();
    waited.expect("small writes waited for the large write in flight");
    big.join().unwrap().unwrap();

    // Blocks only the big write touched hold its data; blocks both wrote hold
    // one of the two versions (they were in flight together).
    let mut buf = vec![0u8; BS];
    volume.read_at(BS as u64, &mut buf).unwrap();
    assert_eq!(buf, pattern(2, BIG)[BS..2 * BS]);
    volume.read_at(37 * BS as u64, &mut buf).unwrap();
    assert!(buf == pattern(101, BS) || buf == pattern(2, BIG)[37 * BS..38 * BS]);
    let mut partial = [0u8; 7];
    volume.read_at((50 << 20) + 100, &mut partial).unwrap();
    assert_eq!(&partial, b"partial");
}

/// While the store's flush thread cannot commit, the overlay grows; past twice
/// its bound the volume says its next write will flush in the writer (so an
/// async caller can run it off its event loop).
#[test]
fn a_backlogged_volume_says_its_writes_may_block() {
    let dir = tempfile::tempdir().unwrap();
    let gated = Arc::new(GatedMeta::new(
        meta::open(BackendKind::Redb, &dir.path().join("meta")).unwrap(),
    ));
    let options = StoreOptions::new()
        .background_compaction(false)
        .overlay_blocks(16)
        .metadata_store(gated.clone());
    let (_store, volume) = store_with_volume(&dir.path().join("store"), 4 << 20, options);
    // The first write opens the volume's segment file: the volume says so.
    assert!(
        volume.write_may_block(),
        "a fresh volume's first write makes a segment"
    );
    volume.write_at(0, &pattern(0, BS)).unwrap();
    assert!(!volume.write_may_block());
    gated.arm();
    let mut k = 1u64;
    // The 17th write queues a background flush, whose commit then waits.
    while !volume.write_may_block() {
        assert!(k < 64, "the overlay never reached twice its bound");
        volume.write_at(k * BS as u64, &pattern(k, BS)).unwrap();
        if k == 16 {
            gated.wait_entered();
        }
        k += 1;
    }
    assert_eq!(k, 32, "twice the bound of 16 blocks");
    gated.release();
    volume.flush().unwrap();
    assert!(!volume.write_may_block());
}

/// A write that would open a new segment file (create it, sync its
/// directory) may block: the volume says so before the segment fills, by
/// the largest write a caller runs on its event loop.
#[test]
fn a_write_that_opens_a_segment_may_block() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of 32 blocks: 16 blocks is the 64 KiB margin.
    let options = StoreOptions::new()
        .background_compaction(false)
        .segment_bytes(32 * BS as u64);
    let (_store, volume) = store_with_volume(&dir.path().join("store"), 4 << 20, options);
    assert!(volume.write_may_block());
    let mut said = Vec::new();
    for k in 0..40u64 {
        volume.write_at(k * BS as u64, &pattern(k, BS)).unwrap();
        said.push(volume.write_may_block());
    }
    // After k + 1 blocks of a segment, 32 - (k + 1) are left: fewer than 16
    // from the 17th write on, and a new segment opens at the 33rd.
    let expected: Vec<bool> = (0..40u64).map(|k| k % 32 >= 16).collect();
    assert_eq!(said, expected);
    assert_eq!(SMALL_WRITE_BYTES, 16 * BS as u64);
}
