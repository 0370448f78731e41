//! blockseal-keys: master key, per-tenant key derivation and wrapped data keys.
#![forbid(unsafe_code)]

mod data_key;
mod ids;

pub use data_key::{DataKey, KEY_LEN, RandomError};
pub use ids::{KeyVersion, MAX_NAME_LEN, NameError, TenantId, VolumeId};
