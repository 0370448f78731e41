//! Volume data keys (DEKs): random 256-bit keys that seal blocks.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::KeyVersion;
use crate::hkdf::{Info, hkdf_sha256};
use crate::locked::KeyBytes;

/// Length of a writer salt, in bytes.
pub const WRITER_SALT_LEN: usize = 32;

/// HKDF label of a writer key. Changing it is a format change.
const WRITER_KEY_LABEL: &str = "blockseal/v1/writer-key";

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

    /// Derives the key one writer seals with: HKDF-SHA256 over this key with a
    /// fresh random `salt` of the writer's (info: label, this key's version,
    /// `writer`). The result carries this key's version.
    ///
    /// A writer (one open of a volume, one host holding a shard) picks its salt at
    /// random and starts its nonce counter at zero: two writers never share a key
    /// unless their 256-bit salts collide, so nonces stay unique under every key
    /// even when the counters of an earlier writer were lost with the metadata or
    /// rolled back with a restored copy of it.
    pub fn derive_writer_key(&self, writer: u32, salt: &[u8; WRITER_SALT_LEN]) -> DataKey {
        let mut info = Info::new(WRITER_KEY_LABEL);
        info.u32(self.version.0).u32(writer);
        let mut key = KeyBytes::zeroed();
        hkdf_sha256(
            salt,
            self.expose_secret(),
            info.as_bytes(),
            key.expose_mut(),
        );
        DataKey {
            version: self.version,
            key,
        }
    }

    /// A fresh random writer salt for [`derive_writer_key`](Self::derive_writer_key).
    pub fn generate_writer_salt() -> Result<[u8; WRITER_SALT_LEN], RandomError> {
        let mut salt = [0u8; WRITER_SALT_LEN];
        fill_random(&mut salt)?;
        Ok(salt)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_keys_differ_by_salt_writer_and_version_and_are_deterministic() {
        let dek = DataKey::from_bytes(KeyVersion(3), Zeroizing::new([7; KEY_LEN]));
        let a = dek.derive_writer_key(1, &[1; WRITER_SALT_LEN]);
        let again = dek.derive_writer_key(1, &[1; WRITER_SALT_LEN]);
        assert_eq!(a.expose_secret(), again.expose_secret());
        assert_eq!(a.version(), KeyVersion(3));
        let others = [
            dek.derive_writer_key(1, &[2; WRITER_SALT_LEN]),
            dek.derive_writer_key(2, &[1; WRITER_SALT_LEN]),
            DataKey::from_bytes(KeyVersion(4), Zeroizing::new([7; KEY_LEN]))
                .derive_writer_key(1, &[1; WRITER_SALT_LEN]),
        ];
        for other in &others {
            assert_ne!(a.expose_secret(), other.expose_secret());
        }
        assert_ne!(a.expose_secret(), dek.expose_secret());
    }

    #[test]
    fn writer_key_known_answer() {
        // HKDF-SHA256(salt = 32 x 0x01, ikm = 32 x 0x07,
        //   info = u32 len 23 | "blockseal/v1/writer-key" | u32 3 | u32 1), 32 bytes;
        // computed independently with Python's hmac/hashlib.
        let dek = DataKey::from_bytes(KeyVersion(3), Zeroizing::new([7; KEY_LEN]));
        let key = dek.derive_writer_key(1, &[1; WRITER_SALT_LEN]);
        let hex: String = key
            .expose_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, WRITER_KEY_VECTOR);
    }

    const WRITER_KEY_VECTOR: &str =
        "f8a9cc59041521d7fb472c6e0b2711aad537a49d8a337875844a44d51a54f1d4";
}
