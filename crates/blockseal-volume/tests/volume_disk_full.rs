//! A full file system: writes fail with ENOSPC (`ErrorKind::NoSpace`, which NBD
//! clients such as qemu's `werror=enospc` act on), nothing flushed is lost, and
//! once space returns the next write and flush succeed without reopening.
//!
//! Runs on a real tmpfs mounted for the test, so it needs root (as CI has).

mod common {
    pub mod volume;
}

use std::path::{Path, PathBuf};
use std::process::Command;

use blockseal_volume::{ErrorKind, StoreOptions, Volume};
use common::volume::*;

const CHUNK: usize = 256 << 10;

/// A tmpfs of `mib` MiB mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {mib} MiB tmpfs on {} failed: this test needs root",
            path.display()
        );
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn fill(path: &Path, bytes: usize) {
    std::fs::write(path, pattern(99, bytes)).unwrap();
}

/// Writes chunks from `next` on, flushing every fourth, until a write fails;
/// returns the failure's kind and how many chunks were written.
fn write_until_full(volume: &Volume, next: &mut u64, flushed: &mut u64) -> ErrorKind {
    loop {
        let offset = *next * CHUNK as u64;
        match volume.write_at(offset, &pattern(*next, CHUNK)) {
            Ok(()) => *next += 1,
            Err(e) => return e.kind(),
        }
        if next.is_multiple_of(4) {
            volume.flush().unwrap();
            *flushed = *next;
        }
    }
}

fn verify(volume: &Volume, chunks: u64) {
    let mut buf = vec![0u8; CHUNK];
    for k in 0..chunks {
        volume.read_at(k * CHUNK as u64, &mut buf).unwrap();
        assert!(buf == pattern(k, CHUNK), "chunk {k} does not read back");
    }
}

#[test]
fn a_full_disk_says_enospc_loses_nothing_and_recovers_when_space_returns() {
    let fs = Tmpfs::mount(40);
    let filler = fs.path.join("filler");
    fill(&filler, 12 << 20);
    let dir = fs.path.join("store");
    let options = || {
        StoreOptions::new()
            .segment_bytes(1 << 20)
            .space_reserve(4 << 20)
            .background_compaction(false)
    };
    let (mut next, mut flushed) = (0u64, 0u64);
    {
        let (_store, volume) = store_with_volume(&dir, 64 << 20, options());
        // Writes stop at the reserve, with ENOSPC, and the volume stays usable.
        assert_eq!(
            write_until_full(&volume, &mut next, &mut flushed),
            ErrorKind::NoSpace
        );
        assert!(next > 8, "only {next} chunks fit");
        assert!(!volume.is_poisoned());
        // The reserve keeps room for the metadata: everything written commits.
        volume.flush().unwrap();
        verify(&volume, next);
        // Again, still full: the same answer, nothing changes.
        let before = segment_files(&dir).len();
        for _ in 0..50 {
            let err = volume
                .write_at(next * CHUNK as u64, &pattern(next, CHUNK))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
        }
        assert_eq!(
            segment_files(&dir).len(),
            before,
            "refused writes made segments"
        );
        // Space comes back: writing and flushing go on without a reopen.
        std::fs::remove_file(&filler).unwrap();
        for _ in 0..8 {
            volume
                .write_at(next * CHUNK as u64, &pattern(next, CHUNK))
                .unwrap();
            next += 1;
        }
        volume.flush().unwrap();
        flushed = next;
    }
    let (_store, volume) = reopen(&dir, options());
    verify(&volume, flushed);
}

#[test]
fn enospc_from_the_file_system_itself_does_not_poison() {
    // No reserve: the write meets the file system's own ENOSPC.
    let fs = Tmpfs::mount(24);
    let filler = fs.path.join("filler");
    fill(&filler, 8 << 20);
    let dir = fs.path.join("store");
    let options = || {
        StoreOptions::new()
            .segment_bytes(1 << 20)
            .space_reserve(0)
            .background_compaction(false)
    };
    let (mut next, mut flushed) = (0u64, 0u64);
    {
        let (_store, volume) = store_with_volume(&dir, 64 << 20, options());
        assert_eq!(
            write_until_full(&volume, &mut next, &mut flushed),
            ErrorKind::NoSpace
        );
        assert!(!volume.is_poisoned());
        std::fs::remove_file(&filler).unwrap();
        volume.flush().unwrap();
        for _ in 0..4 {
            volume
                .write_at(next * CHUNK as u64, &pattern(next, CHUNK))
                .unwrap();
            next += 1;
        }
        volume.flush().unwrap();
        flushed = next;
        verify(&volume, next);
    }
    let (_store, volume) = reopen(&dir, options());
    verify(&volume, flushed);
}

#[test]
fn compaction_on_a_full_disk_stops_without_poisoning_and_leaves_the_reserve() {
    let fs = Tmpfs::mount(40);
    let dir = fs.path.join("store");
    let options = || {
        StoreOptions::new()
            .segment_bytes(1 << 20)
            .space_reserve(8 << 20)
            .background_compaction(false)
    };
    let (_store, volume) = store_with_volume(&dir, 64 << 20, options());
    // 8 MiB, then three of every four blocks again: the first eight segments
    // are a quarter live, so compacting them copies.
    for k in 0..32u64 {
        volume
            .write_at(k * CHUNK as u64, &pattern(k, CHUNK))
            .unwrap();
    }
    for block in 0..2048u64 {
        if block % 4 != 0 {
            volume
                .write_at(block * 4096, &pattern(block + 7, 4096))
                .unwrap();
        }
    }
    volume.flush().unwrap();
    // Fill the file system to just above the reserve, then write until the
    // volume says ENOSPC (what it may still write unseen is used up).
    let free = || {
        let stat = rustix::fs::statvfs(&fs.path).unwrap();
        stat.f_bavail * stat.f_frsize
    };
    let mut fillers = 0;
    while free() > (8 << 20) + (128 << 10) {
        let piece = (free() - (8 << 20) - (64 << 10)).clamp(4096, 1 << 20);
        std::fs::write(
            fs.path.join(format!("filler{fillers}")),
            vec![1u8; piece as usize],
        )
        .unwrap();
        fillers += 1;
    }
    let mut k = 0u64;
    while volume
        .write_at(40 * CHUNK as u64 + k * 4096, &pattern(k, 4096))
        .is_ok()
    {
        k += 1;
    }
    volume.flush().unwrap();
    let before = free();
    let err = volume.compact_now().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(!volume.is_poisoned());
    assert!(free() >= before, "a refused compaction took space");
    // Flushes still commit; data still reads.
    volume.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    for block in [1u64, 2, 3, 4, 2047] {
        volume.read_at(block * 4096, &mut buf).unwrap();
        let want = if block % 4 == 0 {
            pattern(block / 64, CHUNK)[(block % 64) as usize * 4096..][..4096].to_vec()
        } else {
            pattern(block + 7, 4096)
        };
        assert_eq!(buf, want, "block {block}");
    }
    // Space back: compaction does its work.
    for n in 0..fillers {
        std::fs::remove_file(fs.path.join(format!("filler{n}"))).unwrap();
    }
    let report = volume.compact_now().unwrap();
    assert!(report.blocks_moved > 0, "{report:?}");
}
