//! blockseal-keys: master key, per-tenant key derivation and wrapped data keys.
#![forbid(unsafe_code)]

mod ids;

pub use ids::{KeyVersion, MAX_NAME_LEN, NameError, TenantId, VolumeId};
