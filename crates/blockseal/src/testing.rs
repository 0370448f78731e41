//! Fixtures the unit tests share.

use blockseal_keys::{MasterKey, TenantId, VolumeId};
use blockseal_volume::{Store, StoreOptions, VolumeOptions};

/// A store in a temporary directory with tenant `acme` and its 4 MiB volume
/// `disk`, 64 blocks of which are written (block `10·i` holds byte `i + 1`)
/// and flushed.
pub(crate) fn small_store() -> (tempfile::TempDir, Store, TenantId, VolumeId) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(
        dir.path().join("store"),
        MasterKey::generate().unwrap(),
        StoreOptions::new().background_compaction(false),
    )
    .unwrap();
    let (t, v) = (
        TenantId::new("acme").unwrap(),
        VolumeId::new("disk").unwrap(),
    );
    store.create_tenant(&t).unwrap();
    store
        .create_volume(&t, &v, 4 << 20, VolumeOptions::default())
        .unwrap();
    let volume = store.open_volume(&t, &v).unwrap();
    for i in 0..64u64 {
        volume.write_at(i * 40_960, &[i as u8 + 1; 4096]).unwrap();
    }
    volume.flush().unwrap();
    drop(volume);
    (dir, store, t, v)
}
