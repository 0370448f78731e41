//! Opening a store whose `FORMAT` file and header record are fuzz input.
//!
//! `Store::open` runs as in production, on a directory under `/dev/shm` (when it
//! exists) with an in-memory metadata store holding only the header record, and
//! one fixed master key. The first byte picks a mode:
//! - even: `n (1 byte) || FORMAT (n bytes) || header record`, as given;
//! - odd: the `FORMAT` file and header record of a genuine store for that key,
//!   with the byte at `position % 89` of their concatenation XORed with `xor`:
//!   `position || xor`.
//!
//! What must hold (layouts in `docs/FORMAT.md`): opening never panics, and it
//! succeeds exactly when `FORMAT` has the magic, a format version no newer than
//! this build's and a known backend byte, and the header record is 73 bytes of
//! record version 1 naming this master key's id and check value. `FORMAT` is
//! exactly 16 bytes, its version at least 1, its byte 13 zero (the store's
//! data is not in object storage, which the fuzzed open does not name) and its
//! reserved bytes 14..16 zero.
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use blockseal_keys::{KeyId, MasterKey, Zeroizing};
use blockseal_volume::meta::{BackendKind, Batch, MetaError, MetaStore};
use blockseal_volume::{FORMAT_VERSION, Store, StoreOptions};
use libfuzzer_sys::fuzz_target;

const FORMAT_LEN: usize = 16;
const HEADER_LEN: usize = 73;

fn master() -> MasterKey {
    MasterKey::from_bytes(KeyId::from_bytes([0x21; 16]), 7, Zeroizing::new([0x33; 32]))
}

static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("blockseal-fuzz-store-open-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("store")).expect("create the scratch directory");
    dir
});

/// The `FORMAT` file and header record of a genuine store for [`master`].
static GENUINE: LazyLock<(Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
    let dir = DIR.join("genuine");
    let meta = Arc::new(MemMeta::default());
    let store = Store::create(&dir, master(), options(meta.clone())).expect("create a store");
    drop(store);
    let format = fs::read(dir.join("FORMAT")).expect("read FORMAT");
    let header = meta.get(b"H").unwrap().expect("the header record");
    assert_eq!((format.len(), header.len()), (FORMAT_LEN, HEADER_LEN));
    (format, header)
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (format, header) = if mode & 1 == 0 {
        let Some((&n, rest)) = rest.split_first() else {
            return;
        };
        let n = usize::from(n).min(rest.len());
        (rest[..n].to_vec(), rest[n..].to_vec())
    } else {
        let (format, header) = &*GENUINE;
        let mut both = [format.as_slice(), header.as_slice()].concat();
        let position = usize::from(rest.first().copied().unwrap_or(0)) % both.len();
        both[position] ^= rest.get(1).copied().unwrap_or(0);
        let header = both.split_off(FORMAT_LEN);
        (both, header)
    };

    let dir = DIR.join("store");
    fs::write(dir.join("FORMAT"), &format).expect("write FORMAT");
    let meta = Arc::new(MemMeta::default());
    meta.map
        .lock()
        .unwrap()
        .insert(b"H".to_vec(), header.clone());

    let expected = format_ok(&format) && header_ok(&header);
    match Store::open(&dir, master(), options(meta)) {
        Ok(store) => {
            assert!(expected, "opened a store with a bad FORMAT file or header");
            assert!(store.tenants().expect("list tenants").is_empty());
        }
        Err(e) => {
            assert!(!expected, "refused a good store: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
});

fn format_ok(b: &[u8]) -> bool {
    b.len() == FORMAT_LEN
        && &b[..8] == b"BLKSEAL\n"
        && (1..=FORMAT_VERSION).contains(&u32::from_be_bytes(b[8..12].try_into().unwrap()))
        && matches!(b[12], 1..=3)
        // 1 would say the store is in object storage, which these options
        // do not name: a mismatch, refused.
        && b[13] == 0
        && b[14..16] == [0, 0]
}

fn header_ok(b: &[u8]) -> bool {
    let master = master();
    b.len() == HEADER_LEN
        && b[0] == 1
        && b[33..49] == master.id().as_bytes()[..]
        && b[49..65] == master.check_value().as_bytes()[..]
}

fn options(meta: Arc<MemMeta>) -> StoreOptions {
    StoreOptions::new()
        .metadata_store(meta)
        .background_compaction(false)
}

/// A metadata store in a `BTreeMap`.
#[derive(Default)]
struct MemMeta {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MetaStore for MemMeta {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        let map = self.map.lock().unwrap().clone();
        let end = end.map_or(Bound::Unbounded, Bound::Excluded);
        for (k, v) in map.range::<[u8], _>((Bound::Included(start), end)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        let mut map = self.map.lock().unwrap();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => map.insert(key.clone(), value.clone()),
                None => map.remove(key),
            };
        }
        Ok(())
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Redb
    }
}
