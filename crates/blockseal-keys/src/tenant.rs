//! Per-tenant key material: the deployment salt, the tenant seed and the tenant KEK
//! derived from them (see [`MasterKey::tenant_kek`](crate::MasterKey::tenant_kek)).

use std::fmt;

use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::data_key::fill_random;
use crate::locked::KeyBytes;
use crate::{KEY_LEN, KeyVersion, RandomError, TenantId};

/// Length of a [`DeploymentSalt`] and of a [`TenantSeed`], in bytes.
pub const SEED_LEN: usize = 32;

// A seed is kept in a key slot.
const _: () = assert!(SEED_LEN == KEY_LEN);

/// A deployment's HKDF salt: 32 random bytes chosen once per deployment and stored
/// in its metadata. Not secret; it separates the KEKs of two deployments that
/// happen to share a master key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeploymentSalt([u8; SEED_LEN]);

impl DeploymentSalt {
    /// Generates a fresh salt from the system CSPRNG.
    pub fn generate() -> Result<DeploymentSalt, RandomError> {
        let mut salt = [0u8; SEED_LEN];
        fill_random(&mut salt)?;
        Ok(DeploymentSalt(salt))
    }

    /// Builds a salt from stored bytes.
    pub fn from_bytes(bytes: [u8; SEED_LEN]) -> DeploymentSalt {
        DeploymentSalt(bytes)
    }

    /// The bytes to store.
    pub fn as_bytes(&self) -> &[u8; SEED_LEN] {
        &self.0
    }
}

impl fmt::Debug for DeploymentSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeploymentSalt(")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str(")")
    }
}

/// A tenant's secret seed: 32 random bytes, stored in metadata, that the tenant's
/// KEK derivation depends on.
///
/// Crypto-shredding a tenant destroys its seed, after which its KEK can never be
/// derived again, not even with the master key. Kept in locked memory like a key;
/// zeroizes on drop; `Debug` shows nothing.
pub struct TenantSeed(KeyBytes);

impl TenantSeed {
    /// Generates a fresh seed from the system CSPRNG.
    pub fn generate() -> Result<TenantSeed, RandomError> {
        let mut seed = KeyBytes::zeroed();
        fill_random(seed.expose_mut())?;
        Ok(TenantSeed(seed))
    }

    /// Builds a seed from stored bytes. The bytes are copied to the seed's own
    /// memory and `bytes` is wiped.
    pub fn from_bytes(bytes: Zeroizing<[u8; SEED_LEN]>) -> TenantSeed {
        TenantSeed(KeyBytes::copy_of(&bytes))
    }

    /// The seed's bytes, to store. Every use of seed material goes through here.
    pub fn expose_secret(&self) -> &[u8; SEED_LEN] {
        self.0.expose()
    }
}

impl ZeroizeOnDrop for TenantSeed {}

impl fmt::Debug for TenantSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantSeed").finish_non_exhaustive()
    }
}

/// A tenant's key-encryption key: wraps and unwraps the tenant's volume data keys
/// (see [`TenantKek::wrap`]).
///
/// Only ever derived with [`MasterKey::tenant_kek`](crate::MasterKey::tenant_kek).
/// Kept in locked memory; zeroizes on drop; `Debug` shows the tenant and version
/// only.
pub struct TenantKek {
    tenant: TenantId,
    version: KeyVersion,
    key: KeyBytes,
}

impl TenantKek {
    #[cfg(test)]
    pub(crate) fn new(
        tenant: TenantId,
        version: KeyVersion,
        key: Zeroizing<[u8; KEY_LEN]>,
    ) -> Self {
        TenantKek::from_key_bytes(tenant, version, KeyBytes::copy_of(&key))
    }

    pub(crate) fn from_key_bytes(tenant: TenantId, version: KeyVersion, key: KeyBytes) -> Self {
        TenantKek {
            tenant,
            version,
            key,
        }
    }

    /// The tenant this KEK belongs to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The KEK's version.
    pub fn version(&self) -> KeyVersion {
        self.version
    }

    /// The raw key bytes; crate private, every use goes through here.
    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.key.expose()
    }
}

impl ZeroizeOnDrop for TenantKek {}

impl fmt::Debug for TenantKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKek")
            .field("tenant", &self.tenant)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_seeds_and_salts_differ() {
        assert_ne!(
            TenantSeed::generate().unwrap().expose_secret(),
            TenantSeed::generate().unwrap().expose_secret()
        );
        assert_ne!(
            DeploymentSalt::generate().unwrap(),
            DeploymentSalt::generate().unwrap()
        );
        let salt = DeploymentSalt::from_bytes([4; 32]);
        assert_eq!(salt.as_bytes(), &[4; 32]);
    }
}
