//! Volume data keys (DEKs): random 256-bit keys that seal blocks.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::KeyVersion;
use crate::locked::KeyBytes;

/// Length of every blockseal key, in bytes.
pub const KEY_LEN: usize = 32;

/// The system random number generator failed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Fills `out` from the operating system's CSPRNG.
pub(crate) fn fill_random(out: &mut [u8]) -> Result<(), RandomError> {
    SystemRandom::new().fill(out).map_err(|_| RandomError)
}

/// A volume data key: 256 random bits and the version it was created as.
///
/// The bytes live in locked memory that only keys use, never move when the key
/// does, zeroize on drop and are reachable only through
/// [`DataKey::expose_secret`], so searching for that name lists every use.
pub struct DataKey {
    version: KeyVersion,
    key: KeyBytes,
}

impl DataKey {
    /// Generates a fresh key from the system CSPRNG.
    pub fn generate(version: KeyVersion) -> Result<DataKey, RandomError> {
        let mut key = KeyBytes::zeroed();
        fill_random(key.expose_mut())?;
        Ok(DataKey { version, key })
    }

    /// Builds a key from known bytes (unwrapping, test vectors, fuzzing). The
    /// bytes are copied to the key's own memory and `key` is wiped.
    pub fn from_bytes(version: KeyVersion, key: Zeroizing<[u8; KEY_LEN]>) -> DataKey {
        DataKey::from_key_bytes(version, KeyBytes::copy_of(&key))
    }

    pub(crate) fn from_key_bytes(version: KeyVersion, key: KeyBytes) -> DataKey {
        DataKey { version, key }
    }

    /// The key's version.
    pub fn version(&self) -> KeyVersion {
        self.version
    }

    /// The raw key bytes. Every use of key material goes through here.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.key.expose()
    }
}

impl ZeroizeOnDrop for DataKey {}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}
