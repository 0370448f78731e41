//! Tampering with segment data at rest: every affected block fails authentication
//! naming its LBA, every other block keeps reading, nothing panics.

mod common {
    pub mod volume;
}

use std::os::unix::fs::FileExt;

use blockseal_volume::{ErrorKind, StoreOptions, VolumeError, VolumeOptions};
use common::volume::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

/// Writes blocks 0..BLOCKS sequentially (block i lands at segment offset i*BS),
/// flushes and closes; returns each block's plaintext.
fn populated(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let (_store, volume) = store_with_volume(dir, BLOCKS * BS, StoreOptions::new());
    let data: Vec<Vec<u8>> = (0..BLOCKS).map(|i| pattern(i + 1, BS as usize)).collect();
    volume.write_at(0, &data.concat()).unwrap();
    volume.close().unwrap();
    data
}

/// Reads every block; returns the LBAs that failed authentication.
fn failing_blocks(volume: &blockseal_volume::Volume, data: &[Vec<u8>]) -> Vec<u64> {
    let mut failed = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for lba in 0..BLOCKS {
        match volume.read_at(lba * BS, &mut buf) {
            Ok(()) => assert_eq!(buf, data[lba as usize], "block {lba} reads intact"),
            Err(VolumeError::Authentication { lba: bad }) => {
                assert_eq!(bad.0, lba);
                failed.push(lba);
            }
            Err(e) => panic!("block {lba}: unexpected {e}"),
        }
    }
    failed
}

#[test]
fn flipped_bytes_fail_only_their_block() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path());
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&files[0])
        .unwrap();
    for (lba, within) in [(3u64, 0u64), (17, 4095), (40, 1234)] {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, lba * BS + within).unwrap();
        b[0] ^= 0x01;
        file.write_all_at(&b, lba * BS + within).unwrap();
    }
    let (_store, volume) = reopen(dir.path(), StoreOptions::new());
    assert_eq!(failing_blocks(&volume, &data), vec![3, 17, 40]);
    assert_eq!(volume.stats().auth_failures, 3);
    // A multi-block read over a bad block fails, naming it.
    let mut big = vec![0u8; 8 * BS as usize];
    let e = volume.read_at(0, &mut big).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert_eq!(e.to_string(), "block 3 failed authentication");
    // Overwriting a damaged block heals it.
    volume.write_at(3 * BS, &data[3]).unwrap();
    assert_eq!(failing_blocks(&volume, &data), vec![17, 40]);
}

#[test]
fn a_block_copied_over_another_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path());
    let files = segment_files(dir.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&files[0])
        .unwrap();
    let mut block = vec![0u8; BS as usize];
    file.read_exact_at(&mut block, 5 * BS).unwrap();
    file.write_all_at(&block, 9 * BS).unwrap();
    let (_store, volume) = reopen(dir.path(), StoreOptions::new());
    assert_eq!(failing_blocks(&volume, &data), vec![9]);
}

#[test]
fn swapping_two_tenants_segments_fails_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path());
    {
        let (store, _) = reopen(dir.path(), StoreOptions::new());
        store.create_tenant(&tenant("other")).unwrap();
        store
            .create_volume(
                &tenant("other"),
                &volume_id("disk"),
                BLOCKS * BS,
                VolumeOptions::default(),
            )
            .unwrap();
        let other = store
            .open_volume(&tenant("other"), &volume_id("disk"))
            .unwrap();
        // Same plaintext, same layout: only the keys and bindings differ.
        other.write_at(0, &data.concat()).unwrap();
        other.close().unwrap();
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let a = std::fs::read(&files[0]).unwrap();
    let b = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[0], &b).unwrap();
    std::fs::write(&files[1], &a).unwrap();
    let (store, volume) = reopen(dir.path(), StoreOptions::new());
    assert_eq!(
        failing_blocks(&volume, &data),
        (0..BLOCKS).collect::<Vec<_>>()
    );
    let other = store
        .open_volume(&tenant("other"), &volume_id("disk"))
        .unwrap();
    assert_eq!(
        failing_blocks(&other, &data),
        (0..BLOCKS).collect::<Vec<_>>()
    );
}

#[test]
fn truncated_segment_is_an_io_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let _data = populated(dir.path());
    let files = segment_files(dir.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    file.set_len(10 * BS).unwrap();
    let (_store, volume) = reopen(dir.path(), StoreOptions::new());
    let mut buf = vec![0u8; BS as usize];
    volume.read_at(2 * BS, &mut buf).unwrap();
    let e = volume.read_at(20 * BS, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}
