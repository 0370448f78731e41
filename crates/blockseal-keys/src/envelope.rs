//! Envelope encryption of volume data keys under a tenant KEK.
//!
//! A [`WrappedKey`] is what metadata stores in place of a DEK. Its byte layout is
//! documented in `docs/FORMAT.md` ("Wrapped data key"). Unwrapping failures are
//! deliberately vague: they name the tenant, volume and versions, never which
//! check failed.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::data_key::fill_random;
use crate::hkdf::Info;
use crate::locked::KeyBytes;
use crate::tenant::TenantKek;
use crate::{DataKey, KEY_LEN, KeyVersion, RandomError, TenantId, VolumeId};

/// Format version of [`WrappedKey`] encodings written by this build.
pub const WRAPPED_KEY_FORMAT: u8 = 1;
/// Length of an encoded [`WrappedKey`], in bytes.
pub const WRAPPED_KEY_LEN: usize = 1 + 4 + 4 + NONCE_LEN + KEY_LEN + TAG_LEN;

const TAG_LEN: usize = 16;
/// Label that starts the associated data, so that no other AES-GCM use in the
/// product can produce a blob that opens here.
const WRAP_LABEL: &str = "blockseal/v1/wrapped-dek";

/// A volume data key sealed under a tenant KEK: safe to store anywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    kek_version: KeyVersion,
    dek_version: KeyVersion,
    nonce: [u8; NONCE_LEN],
    /// Ciphertext of the key followed by the GCM tag.
    sealed: [u8; KEY_LEN + TAG_LEN],
}

/// Why bytes could not be decoded as a [`WrappedKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WrappedKeyDecodeError {
    /// The input is not exactly [`WRAPPED_KEY_LEN`] bytes.
    #[error("wrapped data key is {actual} bytes long; expected {WRAPPED_KEY_LEN}")]
    WrongLength {
        /// Length of the input.
        actual: usize,
    },
    /// The format version byte is not one this build reads.
    #[error(
        "wrapped data key has format version {version}; this build reads version {WRAPPED_KEY_FORMAT}"
    )]
    UnknownFormat {
        /// The format version found.
        version: u8,
    },
}

/// A wrapped data key could not be unwrapped.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum UnwrapError {
    /// The KEK is wrong, the blob is bound to another tenant or volume, or it is
    /// damaged. Which one is deliberately not said.
    #[error(
        "data key failed to unwrap (tenant {tenant}, volume {volume}, KEK {kek_version}, DEK {dek_version})"
    )]
    Failed {
        /// Tenant of the KEK used.
        tenant: TenantId,
        /// Volume the caller asked for.
        volume: VolumeId,
        /// KEK version recorded in the wrapped key.
        kek_version: KeyVersion,
        /// DEK version recorded in the wrapped key.
        dek_version: KeyVersion,
    },
}

impl TenantKek {
    /// Seals `dek` for `volume` under this KEK with AES-256-GCM and a fresh random
    /// nonce. The associated data binds the format version, tenant, volume, KEK
    /// version and DEK version.
    pub fn wrap(&self, volume: &VolumeId, dek: &DataKey) -> Result<WrappedKey, RandomError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let aad = wrap_aad(self.tenant(), volume, self.version(), dek.version());
        // Sealed in a wiped buffer, so that the plaintext key is never in a plain
        // array, even for a moment; only the ciphertext is copied out.
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(dek.expose_secret());
        let tag = self
            .aead_key()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                buf.as_mut_slice(),
            )
            .expect("AES-GCM seals 32 bytes without error");
        let mut sealed = [0u8; KEY_LEN + TAG_LEN];
        sealed[..KEY_LEN].copy_from_slice(buf.as_slice());
        sealed[KEY_LEN..].copy_from_slice(tag.as_ref());
        Ok(WrappedKey {
            kek_version: self.version(),
            dek_version: dek.version(),
            nonce,
            sealed,
        })
    }

    /// Opens a key wrapped for `volume` under this KEK.
    pub fn unwrap(&self, volume: &VolumeId, wrapped: &WrappedKey) -> Result<DataKey, UnwrapError> {
        let failed = || UnwrapError::Failed {
            tenant: self.tenant().clone(),
            volume: volume.clone(),
            kek_version: wrapped.kek_version,
            dek_version: wrapped.dek_version,
        };
        if wrapped.kek_version != self.version() {
            return Err(failed());
        }
        let aad = wrap_aad(
            self.tenant(),
            volume,
            wrapped.kek_version,
            wrapped.dek_version,
        );
        let mut buf = Zeroizing::new(wrapped.sealed);
        let plain = self
            .aead_key()
            .open_in_place(
                Nonce::assume_unique_for_key(wrapped.nonce),
                Aad::from(aad.as_bytes()),
                buf.as_mut_slice(),
            )
            .map_err(|_| failed())?;
        let mut key = KeyBytes::zeroed();
        key.expose_mut().copy_from_slice(plain);
        Ok(DataKey::from_key_bytes(wrapped.dek_version, key))
    }

    /// The KEK as an AES-256-GCM key (also what wraps backup keys).
    pub(crate) fn aead_key(&self) -> LessSafeKey {
        let key = UnboundKey::new(&AES_256_GCM, self.expose_secret())
            .expect("a KEK is 32 bytes, the AES-256 key length");
        LessSafeKey::new(key)
    }
}

impl WrappedKey {
    /// Encodes the wrapped key (layout in `docs/FORMAT.md`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
        out.push(WRAPPED_KEY_FORMAT);
        out.extend_from_slice(&self.kek_version.0.to_be_bytes());
        out.extend_from_slice(&self.dek_version.0.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.sealed);
        out
    }

    /// Decodes a wrapped key. A pure function of `bytes` that never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<WrappedKey, WrappedKeyDecodeError> {
        let Some((&format, rest)) = bytes.split_first() else {
            return Err(WrappedKeyDecodeError::WrongLength { actual: 0 });
        };
        if format != WRAPPED_KEY_FORMAT {
            return Err(WrappedKeyDecodeError::UnknownFormat { version: format });
        }
        let Ok(rest) = <&[u8; WRAPPED_KEY_LEN - 1]>::try_from(rest) else {
            return Err(WrappedKeyDecodeError::WrongLength {
                actual: bytes.len(),
            });
        };
        let (kek, rest) = rest.split_at(4);
        let (dek, rest) = rest.split_at(4);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut out = WrappedKey {
            kek_version: KeyVersion(be(kek)),
            dek_version: KeyVersion(be(dek)),
            nonce: [0; NONCE_LEN],
            sealed: [0; KEY_LEN + TAG_LEN],
        };
        out.nonce.copy_from_slice(nonce);
        out.sealed.copy_from_slice(sealed);
        Ok(out)
    }

    /// Version of the KEK that wrapped the key.
    pub fn kek_version(&self) -> KeyVersion {
        self.kek_version
    }

    /// Version of the wrapped data key.
    pub fn dek_version(&self) -> KeyVersion {
        self.dek_version
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kek_version", &self.kek_version)
            .field("dek_version", &self.dek_version)
            .finish_non_exhaustive()
    }
}

/// Associated data of a wrapped key: label, format version, tenant, volume (both
/// length prefixed), KEK version and DEK version (big-endian u32).
fn wrap_aad(tenant: &TenantId, volume: &VolumeId, kek: KeyVersion, dek: KeyVersion) -> Info {
    let mut aad = Info::new(WRAP_LABEL);
    aad.u8(WRAPPED_KEY_FORMAT)
        .bytes(tenant.as_str().as_bytes())
        .bytes(volume.as_str().as_bytes())
        .u32(kek.0)
        .u32(dek.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeploymentSalt, MasterKey, TenantSeed};
    use proptest::prelude::*;

    fn kek(tenant: &str, version: u32, seed: u8) -> TenantKek {
        let master = MasterKey::from_bytes(
            crate::KeyId::from_bytes([1; 16]),
            0,
            Zeroizing::new([0x42; KEY_LEN]),
        );
        master.tenant_kek(
            &DeploymentSalt::from_bytes([3; 32]),
            &TenantId::new(tenant).unwrap(),
            &TenantSeed::from_bytes(Zeroizing::new([seed; 32])),
            KeyVersion(version),
        )
    }

    fn vol(name: &str) -> VolumeId {
        VolumeId::new(name).unwrap()
    }

    fn dek(version: u32, byte: u8) -> DataKey {
        DataKey::from_bytes(KeyVersion(version), Zeroizing::new([byte; KEY_LEN]))
    }

    #[test]
    fn round_trip() {
        let k = kek("acme", 1, 0);
        let d = DataKey::generate(KeyVersion(3)).unwrap();
        let w = k.wrap(&vol("vm"), &d).unwrap();
        assert_eq!(w.kek_version(), KeyVersion(1));
        assert_eq!(w.dek_version(), KeyVersion(3));
        let bytes = w.to_bytes();
        assert_eq!(bytes.len(), WRAPPED_KEY_LEN);
        assert_eq!(bytes.len(), 69);
        let back = WrappedKey::from_bytes(&bytes).unwrap();
        assert_eq!(back, w);
        let out = k.unwrap(&vol("vm"), &back).unwrap();
        assert_eq!(out.expose_secret(), d.expose_secret());
        assert_eq!(out.version(), KeyVersion(3));
    }

    #[test]
    fn wraps_use_fresh_nonces() {
        let k = kek("acme", 1, 0);
        let d = dek(1, 9);
        assert_ne!(
            k.wrap(&vol("v"), &d).unwrap().to_bytes(),
            k.wrap(&vol("v"), &d).unwrap().to_bytes()
        );
    }

    #[test]
    fn layout_matches_format_doc() {
        let k = kek("acme", 0x0102_0304, 0);
        let w = k.wrap(&vol("v"), &dek(0x0a0b_0c0d, 1)).unwrap();
        let b = w.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..5], &[1, 2, 3, 4]);
        assert_eq!(&b[5..9], &[0x0a, 0x0b, 0x0c, 0x0d]);
    }

    #[test]
    fn every_wrong_binding_fails_with_the_same_vague_error() {
        let k = kek("acme", 1, 0);
        let w = k.wrap(&vol("vm"), &dek(2, 7)).unwrap();
        let expected = "data key failed to unwrap (tenant acme, volume vm, KEK v1, DEK v2)";

        // Wrong seed (same tenant and version).
        let e = kek("acme", 1, 1).unwrap(&vol("vm"), &w).unwrap_err();
        assert_eq!(e.to_string(), expected);
        // Wrong volume.
        let e = k.unwrap(&vol("other"), &w).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data key failed to unwrap (tenant acme, volume other, KEK v1, DEK v2)"
        );
        // Wrong tenant.
        let e = kek("evil", 1, 0).unwrap(&vol("vm"), &w).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("data key failed to unwrap (tenant evil")
        );
        // Wrong KEK version.
        let e = kek("acme", 2, 0).unwrap(&vol("vm"), &w).unwrap_err();
        assert_eq!(e.to_string(), expected);
        // Recorded versions edited.
        let mut b = w.to_bytes();
        b[8] ^= 1;
        let e = k
            .unwrap(&vol("vm"), &WrappedKey::from_bytes(&b).unwrap())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "data key failed to unwrap (tenant acme, volume vm, KEK v1, DEK v3)"
        );
    }

    #[test]
    fn decode_errors() {
        let w = kek("a", 1, 0)
            .wrap(&vol("v"), &dek(1, 1))
            .unwrap()
            .to_bytes();
        assert_eq!(
            WrappedKey::from_bytes(&[]).unwrap_err().to_string(),
            "wrapped data key is 0 bytes long; expected 69"
        );
        assert_eq!(
            WrappedKey::from_bytes(&w[..68]).unwrap_err(),
            WrappedKeyDecodeError::WrongLength { actual: 68 }
        );
        let mut long = w.clone();
        long.push(0);
        assert_eq!(
            WrappedKey::from_bytes(&long).unwrap_err(),
            WrappedKeyDecodeError::WrongLength { actual: 70 }
        );
        let mut future = w;
        future[0] = 2;
        assert_eq!(
            WrappedKey::from_bytes(&future).unwrap_err().to_string(),
            "wrapped data key has format version 2; this build reads version 1"
        );
    }

    proptest! {
        #[test]
        fn any_flipped_bit_fails_to_unwrap(bit in 0usize..WRAPPED_KEY_LEN * 8) {
            let k = kek("acme", 1, 0);
            let mut b = k.wrap(&vol("vm"), &dek(1, 5)).unwrap().to_bytes();
            b[bit / 8] ^= 1 << (bit % 8);
            match WrappedKey::from_bytes(&b) {
                Ok(w) => prop_assert!(k.unwrap(&vol("vm"), &w).is_err()),
                Err(e) => {
                    let unknown = matches!(e, WrappedKeyDecodeError::UnknownFormat { .. });
                    prop_assert!(unknown);
                }
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(w) = WrappedKey::from_bytes(&bytes) {
                prop_assert_eq!(w.to_bytes(), bytes);
                prop_assert!(kek("acme", w.kek_version().0, 0).unwrap(&vol("vm"), &w).is_err());
            }
        }

        #[test]
        fn round_trips_for_any_key(key in any::<[u8; 32]>(), kv in any::<u32>(), dv in any::<u32>()) {
            let k = kek("t", kv, 0);
            let d = DataKey::from_bytes(KeyVersion(dv), Zeroizing::new(key));
            let w = WrappedKey::from_bytes(&k.wrap(&vol("v"), &d).unwrap().to_bytes()).unwrap();
            let out = k.unwrap(&vol("v"), &w).unwrap();
            prop_assert_eq!(out.expose_secret(), &key);
        }
    }
}
