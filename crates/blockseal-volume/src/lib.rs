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
//! Space comes back by compaction: a [`Store`] runs a background thread that moves
//! the live blocks of mostly dead segments forward and deletes segments nothing
//! references ([`StoreOptions::compaction_threshold`], [`Volume::compact_now`]).
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
#![forbid(unsafe_code)]

pub mod block;
mod compactor;
mod error;
mod flusher;
#[doc(hidden)]
pub mod fuzzing;
mod marker;
pub mod meta;
pub mod nonce;
mod record;
pub mod seal;
pub mod segment;
mod store;
mod volume;

pub use block::{BlockSize, Lba};
pub use error::{CreateError, ErrorKind, OpenError, QueryError, VolumeError};
pub use seal::{AuthError, BlockCipher, Nonce, Tag};
pub use segment::{FaultOp, FaultySegments, FileSegments, SegmentId, SegmentStore};
pub use store::{
    FORMAT_VERSION, MAX_VOLUME_BYTES, RecoveryReport, Store, StoreOptions, TenantInfo, TenantState,
    VolumeInfo, VolumeOptions,
};
pub use volume::{BlockStatus, CompactionReport, Volume, VolumeStats};
