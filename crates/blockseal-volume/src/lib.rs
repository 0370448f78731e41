//! blockseal-volume: encrypted, copy-on-write per-tenant volumes.
//!
//! A [`Store`] is one directory holding a deployment's tenants and their volumes.
//! Every volume has its own random data key, stored only wrapped under its
//! tenant's key (derived from the master key), and every block is sealed with
//! AES-256-GCM bound to its tenant, volume, LBA and key version. Writes go
//! copy-on-write into append-only segments; block mappings (with each block's
//! nonce and tag) live in a metadata store (redb or sled). A [`Volume`] offers
//! `read_at`, `write_at`, `flush`, `trim` and `write_zeroes` at any offset and
//! length, with no async runtime in its API: embed it directly, or serve it over
//! NBD with `blockseal-nbd`.
//!
//! Durability: a write is durable once a later [`Volume::flush`] (or a
//! [`Volume::write_at_fua`]) returns. After a crash every block reads as a version
//! that was written, every flushed write survives, and no block fails
//! authentication. Logs never contain key material or plaintext.
//!
//! Long jobs are `tracing` spans at INFO, named `compaction`, `reencryption`,
//! `backup`, `restore` and `store.rebuild`, with the tenant and volume (or the
//! directories) and, when they end, their counts or their error: as in log
//! lines, names and numbers only.
//!
//! Space comes back by compaction: a [`Store`] runs a background thread that moves
//! the live blocks of mostly dead segments forward and deletes segments nothing
//! references ([`StoreOptions::compaction_threshold`], [`Volume::compact_now`]).
//!
//! # What is public, and what is not
//!
//! A caller reads and writes plaintext through a [`Volume`]; it never seals or
//! opens a block itself, and it cannot choose a nonce. The block cipher, its
//! nonces and tags stay inside the crate, because a nonce used twice under one
//! key gives away the XOR of the two plaintexts and lets anyone forge tags under
//! that key: every nonce comes
//! from a writer's counter under a writer key of its own ([`nonce`]), and no
//! public function takes one. Nor is there a public way to open a sealed block
//! outside a volume: nobody outside the crate holds the key and the nonce of a
//! block without the volume that wrote it, so [`Volume::read_at`] is the read
//! path. What stays public besides [`Store`] and [`Volume`]: [`block`] (block
//! sizes and LBAs), [`meta`] (the metadata-store trait and backends, for their
//! conformance tests and for new backends), [`segment`] (the segment-store trait
//! and the file backend, for new places to keep segments; it sees only sealed
//! data) and [`nonce`]'s limits (how much one writer key seals, which
//! [`StoreOptions`] lets a caller lower), none of which can make a nonce.
//!
//! The `testing` cargo feature adds what this workspace's tests, benches and
//! fuzz targets need and a store must never use: `seal` (the cipher, sealing
//! under any nonce, `Nonce::from_bytes`), `nonce::nonce_for`, the
//! fault-injecting `FaultySegments` and the `fuzzing` entry points. Only
//! `dev-dependencies` and the fuzz crate enable it.
//!
//! ```
//! use blockseal_keys::{MasterKey, TenantId, VolumeId};
//! use blockseal_volume::{Store, StoreOptions, VolumeOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::create(dir.path(), MasterKey::generate()?, StoreOptions::new())?;
//!
//! let tenant = TenantId::new("acme")?;
//! let name = VolumeId::new("voicemail")?;
//! store.create_tenant(&tenant)?;
//! store.create_volume(&tenant, &name, 16 << 20, VolumeOptions::default())?;
//!
//! let volume = store.open_volume(&tenant, &name)?;
//! volume.write_at(1000, b"hello, sealed world")?;
//! volume.flush()?;
//!
//! let mut buf = [0u8; 19];
//! volume.read_at(1000, &mut buf)?;
//! assert_eq!(&buf, b"hello, sealed world");
//! # Ok(())
//! # }
//! ```
// One function may use `unsafe`: `segment::start_writeback_range`, a system
// call rustix does not wrap. Everything else is safe code.
#![deny(unsafe_code)]

pub mod backup_format;
pub mod block;
mod bridge;
mod compactor;
mod error;
mod flusher;
#[cfg(feature = "testing")]
pub mod fuzzing;
mod mapping;
mod marker;
pub mod meta;
pub mod nonce;
pub mod object;
mod record;
mod rekeyer;
#[cfg(feature = "testing")]
pub mod seal;
// Without `testing` nothing outside the crate reaches the cipher: its items are
// public for that feature's sake only.
#[cfg(not(feature = "testing"))]
#[allow(unreachable_pub)]
mod seal;
pub mod segment;
mod stats;
mod store;
mod volume;

pub use block::{BlockSize, Lba};
pub use error::{
    AdminError, AdminErrorKind, CreateError, ErrorKind, OpenError, QueryError, VolumeError,
};
#[cfg(feature = "testing")]
pub use seal::{AuthError, BlockCipher, Nonce, Tag};
#[cfg(feature = "testing")]
pub use segment::{FaultOp, FaultySegments};
pub use segment::{FileSegments, SegmentId, SegmentStore};
pub use stats::{LATENCY_BUCKETS, LatencyHistogram, LatencySnapshot};
pub use store::{
    AuditEntry, AuditRecord, AuditVerification, BackupCheck, BackupError, BackupKeyInfo,
    BackupKeys, BackupReport, CATALOG_HEADER_LEN, CatalogError, CatalogFramed, CatalogFraming,
    CatalogHeader, CatalogReport, DataKeyRotation, DrillReport, DrillVolume, FORMAT_VERSION,
    MAX_AUDIT_ENTRY_BYTES, MAX_SNAPSHOT_NAME, MAX_VOLUME_BYTES, MasterRotation, RecoveryReport,
    RotateError, ShredReport, SnapshotReader, Store, StoreOptions, TenantInfo, TenantState,
    VolumeInfo, VolumeOptions, VolumeUsage, check_snapshot_name, rebuild_store,
};
pub use volume::{
    BlockStatus, CompactionReport, DataKeyStatus, DataKeyUsage, ReencryptionProgress,
    ReencryptionReport, SMALL_WRITE_BYTES, SnapshotInfo, Volume, VolumeStats,
};
