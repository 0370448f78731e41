//! The key that authenticates a store's audit log, and the key that wraps it.
//!
//! An [`AuditKey`] is 32 random bytes, made once per store, that chain the audit
//! log's records with HMAC-SHA256; the store keeps it only wrapped under an
//! [`AuditKek`] derived from the master key
//! ([`MasterKey::audit_kek`](crate::MasterKey::audit_kek)). Whoever can edit the
//! metadata but has no master key can therefore neither forge a record nor
//! re-chain the log after removing one. Both types live in locked key memory,
//! zeroize on drop and show nothing of their bytes in `Debug`. Byte layouts are
//! in `docs/FORMAT.md` ("Audit key").

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::data_key::fill_random;
use crate::hkdf::{Info, constant_time_eq};
use crate::locked::KeyBytes;
use crate::{KEY_LEN, RandomError};

/// Length of an audit MAC (HMAC-SHA256), in bytes.
pub const AUDIT_MAC_LEN: usize = 32;
/// Format version of wrapped audit keys written by this build.
pub const WRAPPED_AUDIT_KEY_FORMAT: u8 = 1;
/// Length of a wrapped audit key, in bytes: format, nonce, sealed key, tag.
pub const WRAPPED_AUDIT_KEY_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;

const TAG_LEN: usize = 16;
/// Label that starts the associated data of a wrapped audit key, so that no
/// other AES-GCM use in the product produces a blob that opens here.
const WRAP_LABEL: &str = "blockseal/v1/wrapped-audit-key";
/// HKDF label of the audit KEK.
pub(crate) const AUDIT_KEK_LABEL: &str = "blockseal/v1/audit-kek";

/// The key that chains a store's audit records (HMAC-SHA256).
pub struct AuditKey {
    key: KeyBytes,
}

impl AuditKey {
    /// Generates a fresh audit key from the system CSPRNG.
    pub fn generate() -> Result<AuditKey, RandomError> {
        let mut key = KeyBytes::zeroed();
        fill_random(key.expose_mut())?;
        Ok(AuditKey { key })
    }

    /// HMAC-SHA256 under this key of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; AUDIT_MAC_LEN] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.key.expose());
        let mut context = hmac::Context::with_key(&key);
        for part in parts {
            context.update(part);
        }
        let mut out = [0u8; AUDIT_MAC_LEN];
        out.copy_from_slice(context.sign().as_ref());
        out
    }

    /// Whether `mac` is this key's MAC of the concatenation of `parts`
    /// (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], mac: &[u8]) -> bool {
        constant_time_eq(&self.mac(parts), mac)
    }
}

impl ZeroizeOnDrop for AuditKey {}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey").finish_non_exhaustive()
    }
}

/// The key that wraps a store's [`AuditKey`]; derived from the master key with
/// [`MasterKey::audit_kek`](crate::MasterKey::audit_kek).
pub struct AuditKek {
    key: KeyBytes,
}

/// A wrapped audit key could not be unwrapped: the master key is not the one
/// that wrapped it, or the bytes are damaged. Which one is deliberately not said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit key failed to unwrap")]
pub struct AuditKeyUnwrapError;

impl AuditKek {
    pub(crate) fn from_key_bytes(key: KeyBytes) -> AuditKek {
        AuditKek { key }
    }

    /// Seals `key` under this KEK with AES-256-GCM and a fresh random nonce
    /// (layout in `docs/FORMAT.md`).
    pub fn wrap(&self, key: &AuditKey) -> Result<[u8; WRAPPED_AUDIT_KEY_LEN], RandomError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let aad = wrap_aad();
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(key.key.expose());
        let tag = self
            .aead_key()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                buf.as_mut_slice(),
            )
            .expect("AES-GCM seals 32 bytes without error");
        let mut out = [0u8; WRAPPED_AUDIT_KEY_LEN];
        out[0] = WRAPPED_AUDIT_KEY_FORMAT;
        out[1..1 + NONCE_LEN].copy_from_slice(&nonce);
        out[1 + NONCE_LEN..1 + NONCE_LEN + KEY_LEN].copy_from_slice(buf.as_slice());
        out[1 + NONCE_LEN + KEY_LEN..].copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens an audit key this KEK wrapped. A pure function of `bytes` that
    /// never panics.
    pub fn unwrap(&self, bytes: &[u8]) -> Result<AuditKey, AuditKeyUnwrapError> {
        if bytes.len() != WRAPPED_AUDIT_KEY_LEN || bytes[0] != WRAPPED_AUDIT_KEY_FORMAT {
            return Err(AuditKeyUnwrapError);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[1..1 + NONCE_LEN]);
        let mut buf = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        buf.copy_from_slice(&bytes[1 + NONCE_LEN..]);
        let aad = wrap_aad();
        let plain = self
            .aead_key()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                buf.as_mut_slice(),
            )
            .map_err(|_| AuditKeyUnwrapError)?;
        let mut key = KeyBytes::zeroed();
        key.expose_mut().copy_from_slice(plain);
        Ok(AuditKey { key })
    }

    fn aead_key(&self) -> LessSafeKey {
        let key = UnboundKey::new(&AES_256_GCM, self.key.expose())
            .expect("an audit KEK is 32 bytes, the AES-256 key length");
        LessSafeKey::new(key)
    }

    #[cfg(test)]
    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.key.expose()
    }
}

impl ZeroizeOnDrop for AuditKek {}

impl fmt::Debug for AuditKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKek").finish_non_exhaustive()
    }
}

/// Associated data of a wrapped audit key: label and format version.
fn wrap_aad() -> Info {
    let mut aad = Info::new(WRAP_LABEL);
    aad.u8(WRAPPED_AUDIT_KEY_FORMAT);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeploymentSalt, KeyId, MasterKey};

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_bytes(
            KeyId::from_bytes([byte; 16]),
            0,
            Zeroizing::new([byte; KEY_LEN]),
        )
    }

    #[test]
    fn wrap_round_trips_and_another_master_or_salt_opens_nothing() {
        let salt = DeploymentSalt::from_bytes([3; 32]);
        let kek = master(1).audit_kek(&salt);
        let key = AuditKey::generate().unwrap();
        let wrapped = kek.wrap(&key).unwrap();
        assert_eq!(wrapped.len(), 61);
        assert_ne!(kek.wrap(&key).unwrap(), wrapped, "fresh nonce per wrap");
        let back = kek.unwrap(&wrapped).unwrap();
        assert_eq!(back.mac(&[b"x"]), key.mac(&[b"x"]));
        assert!(master(2).audit_kek(&salt).unwrap(&wrapped).is_err());
        let other_salt = DeploymentSalt::from_bytes([4; 32]);
        assert!(master(1).audit_kek(&other_salt).unwrap(&wrapped).is_err());
        for i in 0..wrapped.len() {
            let mut bad = wrapped;
            bad[i] ^= 1;
            assert!(kek.unwrap(&bad).is_err(), "byte {i}");
        }
        assert!(kek.unwrap(&wrapped[..60]).is_err());
    }

    #[test]
    fn audit_kek_is_separate_from_tenant_keks_and_the_check_value() {
        let m = master(5);
        let salt = DeploymentSalt::from_bytes([0; 32]);
        let kek = m.audit_kek(&salt);
        assert_ne!(kek.expose_secret(), m.expose_secret());
        assert_ne!(&kek.expose_secret()[..16], m.check_value().as_bytes());
        // Known answer: HKDF-SHA256(salt, master, info = len-prefixed label).
        let mut info = Vec::new();
        info.extend_from_slice(&22u32.to_be_bytes());
        info.extend_from_slice(b"blockseal/v1/audit-kek");
        let mut expected = [0u8; 32];
        crate::hkdf::hkdf_sha256(&[0; 32], &[5; 32], &info, &mut expected);
        assert_eq!(kek.expose_secret(), &expected);
    }

    #[test]
    fn mac_covers_the_concatenation_and_verify_is_exact() {
        let key = AuditKey::generate().unwrap();
        let mac = key.mac(&[b"ab", b"c"]);
        assert_eq!(mac, key.mac(&[b"abc"]));
        assert!(key.verify(&[b"abc"], &mac));
        assert!(!key.verify(&[b"abd"], &mac));
        assert!(!key.verify(&[b"abc"], &mac[..31]));
        let other = AuditKey::generate().unwrap();
        assert!(!other.verify(&[b"abc"], &mac));
    }

    #[test]
    fn debug_shows_nothing() {
        let key = AuditKey::generate().unwrap();
        let kek = master(0xA5).audit_kek(&DeploymentSalt::from_bytes([0xA5; 32]));
        for text in [format!("{key:?}{key:#?}"), format!("{kek:?}{kek:#?}")] {
            assert!(!text.contains("a5") && !text.contains("165"), "{text}");
        }
    }
}
