//! Running out of file descriptors fails the write that needed one, and only
//! that write: the volume is not poisoned, and once descriptors are free again
//! writes and flushes succeed. (One test per binary: it lowers the process's
//! descriptor limit.)

mod common {
    pub mod volume;
}

use std::fs::File;

use blockseal_volume::StoreOptions;
use common::volume::*;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

const BS: usize = 4096;

#[test]
fn running_out_of_descriptors_fails_a_write_without_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::new()
        .segment_bytes(16 * BS as u64)
        .background_compaction(false);
    let (_store, volume) = store_with_volume(dir.path(), 1 << 20, options);
    volume.write_at(0, &pattern(0, 16 * BS)).unwrap();

    let old = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let mut hoard = Vec::new();
    while let Ok(file) = File::open("/dev/null") {
        hoard.push(file);
    }
    // The next block needs a new segment file, and there is no descriptor.
    let err = volume
        .write_at(16 * BS as u64, &pattern(1, BS))
        .unwrap_err();
    drop(hoard);
    setrlimit(Resource::Nofile, old).unwrap();
    assert!(err.to_string().contains("resource"), "{err}");
    assert!(!volume.is_poisoned(), "{err}");

    volume.write_at(16 * BS as u64, &pattern(1, BS)).unwrap();
    volume.flush().unwrap();
    let mut buf = vec![0u8; BS];
    volume.read_at(16 * BS as u64, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, BS));
}
