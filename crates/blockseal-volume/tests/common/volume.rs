//! Helpers shared by the volume integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use blockseal_keys::{KeyId, MasterKey, TenantId, VolumeId};
use blockseal_volume::{Store, StoreOptions, Volume, VolumeOptions};
use zeroize::Zeroizing;

/// A deterministic master key (test only).
pub fn master(seed: u8) -> MasterKey {
    MasterKey::from_bytes(
        KeyId::from_bytes([seed; 16]),
        0,
        Zeroizing::new([seed.wrapping_add(1); 32]),
    )
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

pub fn volume_id(name: &str) -> VolumeId {
    VolumeId::new(name).unwrap()
}

/// Creates a store with one tenant `acme` and one volume `disk` of `size` bytes.
pub fn store_with_volume(dir: &Path, size: u64, options: StoreOptions) -> (Store, Volume) {
    let store = Store::create(dir, master(1), options).unwrap();
    store.create_tenant(&tenant("acme")).unwrap();
    store
        .create_volume(
            &tenant("acme"),
            &volume_id("disk"),
            size,
            VolumeOptions::default(),
        )
        .unwrap();
    let volume = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    (store, volume)
}

pub fn reopen(dir: &Path, options: StoreOptions) -> (Store, Volume) {
    let store = Store::open(dir, master(1), options).unwrap();
    let volume = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    (store, volume)
}

/// A byte pattern that differs per (seed, position).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every file under `dir/segments`, sorted.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let root = dir.join("segments");
    for vol in std::fs::read_dir(root).unwrap() {
        for seg in std::fs::read_dir(vol.unwrap().path()).unwrap() {
            out.push(seg.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Copies the directory tree `from` to `to` (made if missing), leaving out the
/// metadata store's lock file, as a backup of a closed store would.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "meta.lock" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
