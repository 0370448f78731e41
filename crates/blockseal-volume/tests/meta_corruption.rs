//! Corruption sweep over the metadata file of a store with data in it, for both
//! backends: at every step through the file, overwrite bytes, open the store,
//! read everything back. Each case must either refuse to open (a clear error),
//! or serve; it must never panic, and never return wrong data or zeros for a
//! written block without an error.
//!
//! The suite sweeps about 120 offsets per backend and pattern (64 bytes of 0xff,
//! of 0x00, and of pseudo-random bytes that differ per offset). The long version
//! sweeps every 512 bytes:
//!
//! ```text
//! BLOCKSEAL_CORRUPTION_STEP=512 cargo test --release -p blockseal-volume --test meta_corruption -- --nocapture
//! ```

mod common {
    pub mod volume;
}

use std::path::{Path, PathBuf};

use blockseal_volume::meta::BackendKind;
use blockseal_volume::{Store, StoreOptions};
use common::volume::*;

const BS: usize = 4096;
const BLOCKS: u64 = 512;
/// Cases per backend and pattern in the suite's sweep.
const SUITE_CASES: u64 = 120;

#[derive(Default, Debug)]
struct Tally {
    cases: u64,
    refused_open: u64,
    refused_volume: u64,
    served: u64,
    blocks_read: u64,
    blocks_failed: u64,
}

fn options(backend: BackendKind) -> StoreOptions {
    StoreOptions::new()
        .backend(backend)
        .background_compaction(false)
        .segment_bytes(256 << 10)
}

/// A store with every third block written (several writers, overwrites and a
/// trim), closed cleanly; the expected content of each block.
fn populated(dir: &Path, backend: BackendKind) -> Vec<Option<Vec<u8>>> {
    let mut expected = vec![None; BLOCKS as usize];
    {
        let (_s, volume) = store_with_volume(dir, BLOCKS * BS as u64, options(backend));
        for lba in (0..BLOCKS).step_by(3) {
            let data = pattern(lba, BS);
            volume.write_at(lba * BS as u64, &data).unwrap();
            expected[lba as usize] = Some(data);
        }
        volume.flush().unwrap();
    }
    {
        let (_s, volume) = reopen(dir, options(backend));
        for lba in (0..BLOCKS).step_by(7) {
            let data = pattern(lba + 1000, BS);
            volume.write_at(lba * BS as u64, &data).unwrap();
            expected[lba as usize] = Some(data);
        }
        volume.trim(100 * BS as u64, 10 * BS as u64).unwrap();
        for slot in &mut expected[100..110] {
            *slot = None;
        }
        volume.flush().unwrap();
    }
    expected
}

/// The file the sweep damages.
fn meta_file(dir: &Path, backend: BackendKind) -> PathBuf {
    match backend {
        BackendKind::Sled => dir.join("meta/meta.sled/db"),
        _ => dir.join("meta/meta.redb"),
    }
}

/// Opens the damaged store and reads every block; returns a failure description
/// for what must never happen.
fn check_case(
    dir: &Path,
    backend: BackendKind,
    expected: &[Option<Vec<u8>>],
    tally: &mut Tally,
) -> Result<(), String> {
    tally.cases += 1;
    let store = match Store::open(dir, master(1), options(backend)) {
        Ok(store) => store,
        Err(e) => {
            if e.to_string().trim().is_empty() {
                return Err("refused with an empty message".into());
            }
            tally.refused_open += 1;
            return Ok(());
        }
    };
    let volume = match store.open_volume(&tenant("acme"), &volume_id("disk")) {
        Ok(volume) => volume,
        Err(_) => {
            tally.refused_volume += 1;
            return Ok(());
        }
    };
    tally.served += 1;
    let mut buf = vec![0u8; BS];
    for (lba, want) in expected.iter().enumerate() {
        tally.blocks_read += 1;
        match volume.read_at(lba as u64 * BS as u64, &mut buf) {
            Err(_) => tally.blocks_failed += 1,
            Ok(()) => match want {
                Some(data) if &buf == data => {}
                Some(_) if buf.iter().all(|&b| b == 0) => {
                    return Err(format!("block {lba} read as zeros without an error"));
                }
                Some(_) => return Err(format!("block {lba} read wrong data without an error")),
                None if buf.iter().all(|&b| b == 0) => {}
                None => return Err(format!("unwritten block {lba} read as data")),
            },
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Fill {
    Byte(u8),
    Random,
}

fn sweep(backend: BackendKind, fill: Fill) -> Tally {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let expected = populated(&pristine, backend);
    let len = std::fs::metadata(meta_file(&pristine, backend))
        .unwrap()
        .len();
    let step = std::env::var("BLOCKSEAL_CORRUPTION_STEP")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| (len / SUITE_CASES).max(1));
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let mut offset = step / 2;
    let case = tmp.path().join("case");
    while offset < len {
        if case.exists() {
            std::fs::remove_dir_all(&case).unwrap();
        }
        copy_dir(&pristine, &case);
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(meta_file(&case, backend))
                .unwrap();
            let n = 64.min(len - offset) as usize;
            let bytes = match fill {
                Fill::Byte(b) => vec![b; n],
                Fill::Random => pattern(offset, n),
            };
            file.write_all_at(&bytes, offset).unwrap();
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_case(&case, backend, &expected, &mut tally)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(what)) => failures.push(format!("offset {offset}: {what}")),
            Err(_) => failures.push(format!("offset {offset}: panicked")),
        }
        offset += step;
    }
    eprintln!(
        "corruption sweep ({backend:?}, 64 bytes {fill:?}, {len}-byte file, step {step}): {tally:?}"
    );
    assert!(
        failures.is_empty(),
        "{backend:?} with {fill:?}: {} bad cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    tally
}

#[test]
fn redb_corruption_never_panics_or_serves_zeros() {
    for fill in [Fill::Byte(0xff), Fill::Byte(0x00), Fill::Random] {
        let tally = sweep(BackendKind::Redb, fill);
        assert!(tally.cases >= SUITE_CASES.min(10), "{tally:?}");
    }
}

#[test]
fn sled_corruption_never_panics_or_serves_zeros() {
    for fill in [Fill::Byte(0xff), Fill::Byte(0x00), Fill::Random] {
        let tally = sweep(BackendKind::Sled, fill);
        assert!(tally.cases >= SUITE_CASES.min(10), "{tally:?}");
    }
}
