//! The key that seals a store catalogue (`blockseal store backup`): the whole
//! metadata of a store, for rebuilding a host with its segment files.
//!
//! `key = HKDF-SHA256(ikm = master key, salt = catalogue salt (32 random bytes,
//! in the file's header), info = lp("blockseal/v1/catalog"))`. Each chunk of the
//! catalogue is sealed with AES-256-GCM under a random nonce, with associated
//! data the caller builds (the file header, the chunk's index and kind), so
//! chunks cannot be reordered, dropped or moved to another catalogue. Only the
//! master key opens a catalogue; a failure to open says nothing about why.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::ZeroizeOnDrop;

use crate::data_key::fill_random;
use crate::hkdf::{Info, hkdf_sha256};
use crate::locked::KeyBytes;
use crate::{MasterKey, RandomError};

const CATALOG_LABEL: &str = "blockseal/v1/catalog";

/// Length of the catalogue salt.
pub const CATALOG_SALT_LEN: usize = 32;
/// Length of a chunk's nonce.
pub const CATALOG_NONCE_LEN: usize = NONCE_LEN;
/// Length of a chunk's tag.
pub const CATALOG_TAG_LEN: usize = 16;

/// Seals and opens the chunks of one store catalogue.
pub struct CatalogKey {
    key: KeyBytes,
}

/// A catalogue chunk did not open: wrong master key, or the file was damaged
/// or edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the catalogue does not open with this master key, or it was damaged")]
pub struct CatalogOpenError;

impl MasterKey {
    /// Derives the key of a store catalogue with salt `salt`.
    pub fn catalog_key(&self, salt: &[u8; CATALOG_SALT_LEN]) -> CatalogKey {
        let info = Info::new(CATALOG_LABEL);
        let mut key = KeyBytes::zeroed();
        hkdf_sha256(
            salt,
            self.expose_secret(),
            info.as_bytes(),
            key.expose_mut(),
        );
        CatalogKey { key }
    }
}

impl CatalogKey {
    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, self.key.expose())
                .expect("a catalogue key is 32 bytes, the AES-256 key length"),
        )
    }

    /// Seals `data` in place under a fresh random nonce; returns the nonce
    /// and the tag.
    pub fn seal(
        &self,
        aad: &[u8],
        data: &mut [u8],
    ) -> Result<([u8; CATALOG_NONCE_LEN], [u8; CATALOG_TAG_LEN]), RandomError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let tag = self
            .aead()
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data)
            .expect("AES-GCM seals a chunk of at most a few MiB");
        let mut out = [0u8; CATALOG_TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok((nonce, out))
    }

    /// Opens `data` (ciphertext followed by its tag) in place; returns the
    /// plaintext's length.
    pub fn open(
        &self,
        aad: &[u8],
        nonce: &[u8; CATALOG_NONCE_LEN],
        data: &mut [u8],
    ) -> Result<usize, CatalogOpenError> {
        let nonce = Nonce::assume_unique_for_key(*nonce);
        self.aead()
            .open_in_place(nonce, Aad::from(aad), data)
            .map(|plain| plain.len())
            .map_err(|_| CatalogOpenError)
    }
}

impl ZeroizeOnDrop for CatalogKey {}

impl fmt::Debug for CatalogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CatalogKey").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyId;
    use zeroize::Zeroizing;

    fn master(b: u8) -> MasterKey {
        MasterKey::from_bytes(KeyId::from_bytes([b; 16]), 0, Zeroizing::new([b; 32]))
    }

    #[test]
    fn chunks_open_only_with_the_same_key_salt_and_associated_data() {
        let key = master(1).catalog_key(&[7; 32]);
        let mut data = b"records".to_vec();
        let (nonce, tag) = key.seal(b"aad", &mut data).unwrap();
        assert_ne!(&data, b"records");
        data.extend_from_slice(&tag);
        let opened = |k: &CatalogKey, aad: &[u8]| {
            let mut d = data.clone();
            k.open(aad, &nonce, &mut d).map(|n| d[..n].to_vec())
        };
        assert_eq!(opened(&key, b"aad").unwrap(), b"records");
        assert!(opened(&key, b"other").is_err());
        assert!(opened(&master(2).catalog_key(&[7; 32]), b"aad").is_err());
        assert!(opened(&master(1).catalog_key(&[8; 32]), b"aad").is_err());
        assert!(!format!("{key:?}").contains("07"));
    }
}
