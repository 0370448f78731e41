//! Compaction: segment space stays bounded under overwrites, trims give space
//! back, the report says what happened, and concurrent writers, readers and
//! compaction never read wrong data.
//!
//! Run with `-- --nocapture` to see the disk-use figures.

mod common {
    pub mod volume;
}

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockseal_volume::meta::BackendKind;
use blockseal_volume::{CompactionReport, StoreOptions, Volume};
use common::volume::*;
use rand::Rng;
use rand::seq::SliceRandom;

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Bytes of segment files on disk.
fn segment_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum()
}

fn manual(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .segment_bytes(MIB)
        .background_compaction(false)
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

#[test]
fn ten_overwrites_keep_segment_space_bounded() {
    const SIZE: u64 = 16 * MIB;
    const BLOCKS: u64 = SIZE / BS;
    // Sealed segments are at least half live, plus the open one.
    const BOUND: u64 = 2 * SIZE + MIB;
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::new()
        .segment_bytes(MIB)
        .compaction_rate(u64::MAX)
        .compaction_interval(Duration::from_millis(50));
    let (_store, volume) = store_with_volume(dir.path(), SIZE, options);
    let mut rng = rand::rng();
    let mut versions = vec![0u64; BLOCKS as usize];
    let mut peak = 0u64;
    let mut written = 0u64;
    for pass in 1..=10u64 {
        // The whole volume in 64 KiB writes, in random order.
        let mut order: Vec<u64> = (0..BLOCKS / 16).collect();
        order.shuffle(&mut rng);
        for (n, chunk) in order.into_iter().enumerate() {
            let mut data = Vec::with_capacity(16 * BS as usize);
            for lba in chunk * 16..chunk * 16 + 16 {
                versions[lba as usize] = pass;
                data.extend_from_slice(&content(lba, pass));
            }
            volume.write_at(chunk * 16 * BS, &data).unwrap();
            written += data.len() as u64;
            if n % 32 == 31 {
                volume.flush().unwrap();
                peak = peak.max(segment_bytes(dir.path()));
            }
        }
        volume.flush().unwrap();
        // The background thread catches up within a bounded time.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut on_disk = segment_bytes(dir.path());
        while on_disk > BOUND && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            on_disk = segment_bytes(dir.path());
        }
        eprintln!(
            "pass {pass}: {} MiB written so far, segments on disk {:.1} MiB (bound {} MiB)",
            written / MIB,
            on_disk as f64 / MIB as f64,
            BOUND / MIB
        );
        assert!(on_disk <= BOUND, "pass {pass}: {on_disk} bytes on disk");
    }
    let stats = volume.stats();
    eprintln!(
        "peak segment bytes {:.1} MiB; {} blocks moved, {} segments deleted",
        peak as f64 / MIB as f64,
        stats.compacted_blocks,
        stats.deleted_segments
    );
    assert!(stats.deleted_segments > 0);
    let mut all = vec![0u8; SIZE as usize];
    volume.read_at(0, &mut all).unwrap();
    for lba in 0..BLOCKS {
        let got = &all[(lba * BS) as usize..((lba + 1) * BS) as usize];
        assert!(got == content(lba, versions[lba as usize]), "block {lba}");
    }
    assert_eq!(volume.stats().auth_failures, 0);
}

#[test]
fn the_report_counts_deleted_and_compacted_segments() {
    // 1024 blocks in 1 MiB (256-block) segments.
    let dir = tempfile::tempdir().unwrap();
    let (_store, volume) = store_with_volume(dir.path(), 4 * MIB, manual(BackendKind::Redb));
    volume.write_at(0, &pattern(1, 4 * MIB as usize)).unwrap();
    volume.flush().unwrap();
    assert_eq!(volume.compact_now().unwrap(), CompactionReport::default());
    // Segments 0..=2 die entirely; segment 3 stays whole.
    volume.write_at(0, &pattern(2, 3 * MIB as usize)).unwrap();
    let report = volume.compact_now().unwrap();
    assert_eq!(
        (
            report.segments_deleted,
            report.segments_compacted,
            report.blocks_moved
        ),
        (3, 0, 0)
    );
    assert_eq!(report.bytes_reclaimed, 3 * MIB);
    // Half of segment 3 dead is not below the threshold; one block more is.
    volume
        .write_at(3 * MIB, &pattern(3, (MIB / 2) as usize))
        .unwrap();
    assert_eq!(volume.compact_now().unwrap().segments_deleted, 0);
    volume
        .write_at(3 * MIB + MIB / 2, &pattern(4, BS as usize))
        .unwrap();
    let report = volume.compact_now().unwrap();
    assert_eq!(
        (
            report.segments_deleted,
            report.segments_compacted,
            report.blocks_moved
        ),
        (1, 1, 127)
    );
    assert_eq!(report.bytes_reclaimed, MIB - 127 * BS);
    let mut expect = pattern(2, 3 * MIB as usize);
    expect.extend_from_slice(&pattern(3, (MIB / 2) as usize));
    expect.extend_from_slice(&pattern(4, BS as usize));
    expect.extend_from_slice(&pattern(1, 4 * MIB as usize)[(3 * MIB + MIB / 2 + BS) as usize..]);
    let mut all = vec![0u8; 4 * MIB as usize];
    volume.read_at(0, &mut all).unwrap();
    assert!(all == expect, "compaction keeps every byte");
    drop(volume);
    drop(_store);
    let (_store, volume) = reopen(dir.path(), manual(BackendKind::Redb));
    volume.read_at(0, &mut all).unwrap();
    assert!(all == expect, "and so does a reopen");
}

#[test]
fn trims_give_space_back() {
    for backend in [BackendKind::Redb, BackendKind::Sled] {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * MIB;
        let (_store, volume) = store_with_volume(dir.path(), size, manual(backend));
        for round in 0..3u64 {
            volume
                .write_at(0, &pattern(round + 1, size as usize))
                .unwrap();
            volume.flush().unwrap();
            let full = segment_bytes(dir.path());
            assert!(full >= size, "{backend:?}: {full}");
            if round == 0 {
                // One large trim (a direct commit).
                volume.trim(0, size).unwrap();
            } else {
                // Many small ones (through the overlay), every other 64 KiB.
                for chunk in (0..size / (64 << 10)).filter(|c| c % 2 == round % 2) {
                    volume.trim(chunk * (64 << 10), 64 << 10).unwrap();
                }
                for chunk in (0..size / (64 << 10)).filter(|c| c % 2 != round % 2) {
                    volume.trim(chunk * (64 << 10), 64 << 10).unwrap();
                }
            }
            let report = volume.compact_now().unwrap();
            let left = segment_bytes(dir.path());
            eprintln!(
                "{backend:?} round {round}: {:.1} MiB before trim, {:.1} MiB after compaction ({report:?})",
                full as f64 / MIB as f64,
                left as f64 / MIB as f64
            );
            // Only the newest segment (the index watermark) may stay.
            assert!(left <= MIB, "{backend:?} round {round}: {left} bytes left");
            let mut all = vec![1u8; size as usize];
            volume.read_at(0, &mut all).unwrap();
            assert!(all.iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn concurrent_writers_readers_and_compaction_read_only_written_data() {
    for backend in [BackendKind::Redb, BackendKind::Sled] {
        run_concurrent(backend, Duration::from_secs(3));
    }
}

/// Per block: the newest version a writer started, and the newest it finished.
struct Versions {
    started: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
}

/// Versions that are trims (the block reads as zeros).
fn is_trim(version: u64) -> bool {
    version.is_multiple_of(7)
}

fn run_concurrent(backend: BackendKind, duration: Duration) {
    const BLOCKS: u64 = 2048;
    const WRITERS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    // Small segments, aggressive threshold, frequent background passes.
    let options = StoreOptions::new()
        .backend(backend)
        .segment_bytes(64 * BS)
        .overlay_blocks(256)
        .compaction_threshold(0.9)
        .compaction_rate(u64::MAX)
        .compaction_interval(Duration::from_millis(5));
    let (store, volume) = store_with_volume(dir.path(), BLOCKS * BS, options);
    let store = Arc::new(store);
    let versions = Arc::new(Versions {
        started: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        acked: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (volume, versions, stop) = (volume.clone(), versions.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            // Each writer owns a contiguous range of blocks.
            let own = w * BLOCKS / WRITERS..(w + 1) * BLOCKS / WRITERS;
            let mut rng = rand::rng();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let lba = rng.random_range(own.clone());
                let count = rng.random_range(1..=8).min(own.end - lba);
                let next: Vec<u64> = (lba..lba + count)
                    .map(|b| versions.started[b as usize].load(Ordering::SeqCst) + 1)
                    .collect();
                for (k, &v) in next.iter().enumerate() {
                    versions.started[(lba + k as u64) as usize].store(v, Ordering::SeqCst);
                }
                // A single block whose version is a trim is trimmed; in a longer
                // run such a version is written as zeros.
                let mut data = Vec::with_capacity((count * BS) as usize);
                for (k, &v) in next.iter().enumerate() {
                    let b = lba + k as u64;
                    data.extend_from_slice(&if is_trim(v) {
                        vec![0; BS as usize]
                    } else {
                        content(b, v)
                    });
                }
                if count == 1 && is_trim(next[0]) {
                    volume.trim(lba * BS, BS).unwrap();
                } else {
                    volume.write_at(lba * BS, &data).unwrap();
                }
                for (k, &v) in next.iter().enumerate() {
                    versions.acked[(lba + k as u64) as usize].store(v, Ordering::SeqCst);
                }
                n += 1;
                if n.is_multiple_of(64) {
                    volume.flush().unwrap();
                }
            }
        }));
    }
    for _ in 0..2 {
        let (volume, versions, stop, reads) = (
            volume.clone(),
            versions.clone(),
            stop.clone(),
            reads.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = rand::rng();
            while !stop.load(Ordering::Relaxed) {
                let lba = rng.random_range(0..BLOCKS);
                let count = rng.random_range(1..=16).min(BLOCKS - lba);
                let low: Vec<u64> = (lba..lba + count)
                    .map(|b| versions.acked[b as usize].load(Ordering::SeqCst))
                    .collect();
                let mut buf = vec![0u8; (count * BS) as usize];
                volume.read_at(lba * BS, &mut buf).unwrap();
                for k in 0..count {
                    let b = lba + k;
                    let high = versions.started[b as usize].load(Ordering::SeqCst);
                    let got = &buf[(k * BS) as usize..((k + 1) * BS) as usize];
                    check_block(b, got, low[k as usize], high);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (store, stop) = (store.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                store.compact_now().unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    volume.flush().unwrap();
    let stats = volume.stats();
    let before = segment_bytes(dir.path());
    let report = volume.compact_now().unwrap();
    eprintln!(
        "{backend:?}: {} reads checked, {} blocks moved, {} segments deleted, \
         {before} segment bytes on disk, {} after a last compaction ({report:?})",
        reads.load(Ordering::Relaxed),
        stats.compacted_blocks,
        stats.deleted_segments,
        segment_bytes(dir.path())
    );
    assert!(stats.compacted_blocks > 0 && stats.deleted_segments > 0);
    assert_eq!(stats.auth_failures, 0);
    final_check(&volume, &versions, BLOCKS);
    drop(volume);
    drop(Arc::into_inner(store).unwrap());
    let (_store, volume) = reopen(dir.path(), manual(backend));
    final_check(&volume, &versions, BLOCKS);
}

/// A block read while its versions `low..=high` may be current.
fn check_block(lba: u64, got: &[u8], low: u64, high: u64) {
    if got.iter().all(|&b| b == 0) {
        assert!(
            (low..=high).any(|v| v == 0 || is_trim(v)),
            "block {lba} reads zeros, versions {low}..={high}"
        );
        return;
    }
    let version = u64::from_be_bytes(got[8..16].try_into().unwrap());
    assert!(
        (low..=high).contains(&version) && !is_trim(version),
        "block {lba} reads version {version}, expected {low}..={high}"
    );
    assert!(
        got == content(lba, version),
        "block {lba} version {version} is damaged"
    );
}

fn final_check(volume: &Volume, versions: &Versions, blocks: u64) {
    let mut buf = vec![0u8; BS as usize];
    for lba in 0..blocks {
        volume.read_at(lba * BS, &mut buf).unwrap();
        let v = versions.acked[lba as usize].load(Ordering::SeqCst);
        check_block(lba, &buf, v, v);
    }
}
