//! Sealed blocks: AES-256-GCM over one logical block, bound to where it belongs.
//!
//! A [`BlockCipher`] seals a block in place under a volume's data key (DEK): the
//! ciphertext has the plaintext's length, so segment data stays block aligned, and
//! the 12-byte [`Nonce`] and 16-byte [`Tag`] travel separately, in the block's
//! metadata record. The associated data binds the block to its tenant, volume,
//! LBA and DEK version, so a block copied to another place, volume or tenant, or
//! relabelled with another key version, fails to open.
//!
//! This module must never log, format or return key bytes or plaintext, never
//! leave unauthenticated plaintext in a caller's buffer, and never allocate on
//! the seal/open path. The volume seals under writer keys with counter nonces
//! (see [`crate::nonce`]); this module trusts the caller never to repeat a nonce
//! under one key.
//!
//! So the caller is the crate alone: this module is private, and with it every
//! way to seal under a chosen nonce or to build a [`Nonce`] from chosen bytes.
//! The `testing` feature makes it public for this workspace's tests, benches
//! and fuzz targets.
//!
//! # Associated data (format v1)
//!
//! `docs/FORMAT.md` ("Sealed block") holds the same tables and a test vector.
//!
//! The associated data is 28 bytes, fixed width, because GCM pays for every AAD
//! byte on every block:
//!
//! | offset | size | field                                                    |
//! |-------:|-----:|----------------------------------------------------------|
//! | 0      | 16   | binding digest (below), computed once per cipher         |
//! | 16     | 8    | LBA, u64 big-endian                                      |
//! | 24     | 4    | DEK version, u32 big-endian                              |
//!
//! The binding digest is the first 16 bytes of SHA-256 over a length-prefixed,
//! domain-separated encoding, so no two (tenant, volume) pairs encode alike:
//!
//! | size      | field                                              |
//! |----------:|----------------------------------------------------|
//! | 4         | length of the label, u32 big-endian (18)           |
//! | 18        | label `blockseal/v1/block` (ASCII)                 |
//! | 4         | length of the tenant name, u32 big-endian          |
//! | 1..=63    | tenant name (ASCII)                                |
//! | 4         | length of the volume name, u32 big-endian          |
//! | 1..=63    | volume name (ASCII)                                |
//!
//! 128 bits of digest leave a 2^-64 birthday bound on finding any two colliding
//! name pairs, and a collision alone opens nothing: each volume also has its own
//! random DEK, so the binding is a second, independent line of defence.

use std::fmt;

use blockseal_keys::{DataKey, KeyVersion, TenantId, VolumeId};
use ring::aead::{self, AES_256_GCM, Aad, LessSafeKey, UnboundKey};
use ring::digest;

use crate::block::Lba;

/// Length of a block nonce, in bytes.
pub const NONCE_LEN: usize = 12;
/// Length of a block authentication tag, in bytes.
pub const TAG_LEN: usize = 16;
/// Length of the associated data of every sealed block, in bytes.
pub const AAD_LEN: usize = BINDING_LEN + 8 + 4;

/// Domain-separation label of the binding digest. Changing it is a format change.
const BINDING_LABEL: &[u8] = b"blockseal/v1/block";
/// Length of the (truncated) binding digest, in bytes.
const BINDING_LEN: usize = 16;

/// A block's 96-bit AES-GCM nonce. Public data, stored in the block's metadata record.
///
/// It must never repeat under one key (see [`crate::nonce`]), so only the crate
/// makes one, from a writer's counter.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub(crate) [u8; NONCE_LEN]);

/// A block's 128-bit AES-GCM authentication tag. Public data, stored in the block's metadata record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub [u8; TAG_LEN]);

/// Seals and opens the blocks of one volume under one data key.
///
/// Built once per (volume, DEK) and shared: sealing needs only `&self`. Its
/// `Debug` shows the tenant, volume and DEK version, never key bytes.
pub struct BlockCipher {
    key: LessSafeKey,
    binding: [u8; BINDING_LEN],
    dek_version: KeyVersion,
    tenant: TenantId,
    volume: VolumeId,
}

/// A block failed authentication: it was tampered with, moved, truncated or
/// sealed under another key. Deliberately says which block, not which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block {lba} failed authentication")]
pub struct AuthError {
    /// The block that failed to open.
    pub lba: Lba,
}

impl AuthError {
    /// Always [`ErrorKind::Authentication`](crate::ErrorKind::Authentication).
    #[cfg(any(test, feature = "testing"))]
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Authentication
    }
}

impl BlockCipher {
    /// Prepares to seal `volume`'s blocks under `dek`, the volume's data key.
    ///
    /// Expands the AES key schedule and computes the binding digest once, so the
    /// per-block path does neither. Note that ring's key schedule does not
    /// zeroize on drop; the expanded key lives as long as this value.
    pub fn new(tenant: &TenantId, volume: &VolumeId, dek: &DataKey) -> BlockCipher {
        let unbound = UnboundKey::new(&AES_256_GCM, dek.expose_secret())
            .expect("a DataKey is 32 bytes, exactly an AES-256 key");
        BlockCipher {
            key: LessSafeKey::new(unbound),
            binding: binding_digest(tenant, volume),
            dek_version: dek.version(),
            tenant: tenant.clone(),
            volume: volume.clone(),
        }
    }

    /// The version of the data key this cipher seals with.
    #[cfg(feature = "testing")]
    pub fn dek_version(&self) -> KeyVersion {
        self.dek_version
    }

    /// Encrypts `block` in place and returns its tag.
    ///
    /// `nonce` must never have been used with this DEK before.
    ///
    /// # Panics
    ///
    /// If `block` is longer than AES-GCM allows under one nonce (about 64 GiB);
    /// a block is at most 64 KiB.
    pub fn seal_in_place(&self, lba: Lba, nonce: &Nonce, block: &mut [u8]) -> Tag {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce.0),
                Aad::from(self.aad(lba)),
                block,
            )
            .expect("AES-GCM seals up to 64 GiB under one nonce; a block is at most 64 KiB");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Tag(out)
    }

    /// Authenticates and decrypts `block` in place.
    ///
    /// On success `block` holds the plaintext. On failure it holds only zeros,
    /// never unauthenticated plaintext, and the error names `lba` alone.
    pub fn open_in_place(
        &self,
        lba: Lba,
        nonce: &Nonce,
        tag: &Tag,
        block: &mut [u8],
    ) -> Result<(), AuthError> {
        let opened = self.key.open_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce.0),
            Aad::from(self.aad(lba)),
            aead::Tag::from(tag.0),
            block,
            0..,
        );
        match opened {
            Ok(_) => Ok(()),
            Err(_) => {
                // ring already zeroes on a tag mismatch; this also covers any other
                // failure path, and the caller can observe the buffer, so it stays.
                block.fill(0);
                Err(AuthError { lba })
            }
        }
    }

    /// The associated data for one block: binding digest, LBA and DEK version.
    #[inline]
    fn aad(&self, lba: Lba) -> [u8; AAD_LEN] {
        let mut aad = [0u8; AAD_LEN];
        aad[..BINDING_LEN].copy_from_slice(&self.binding);
        aad[BINDING_LEN..BINDING_LEN + 8].copy_from_slice(&lba.0.to_be_bytes());
        aad[BINDING_LEN + 8..].copy_from_slice(&self.dek_version.0.to_be_bytes());
        aad
    }
}

#[cfg(feature = "testing")]
impl Nonce {
    /// A nonce of any bytes, for tests, benches and fuzz targets: sealing twice
    /// under one nonce and key gives away the XOR of the plaintexts and lets
    /// anyone forge tags under that key.
    pub fn from_bytes(bytes: [u8; NONCE_LEN]) -> Nonce {
        Nonce(bytes)
    }

    /// The nonce's bytes.
    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }
}

impl fmt::Debug for BlockCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockCipher")
            .field("tenant", &self.tenant)
            .field("volume", &self.volume)
            .field("dek_version", &self.dek_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce(")?;
        write_hex(f, &self.0)?;
        write!(f, ")")
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag(")?;
        write_hex(f, &self.0)?;
        write!(f, ")")
    }
}

/// SHA-256 over the length-prefixed label, tenant and volume, truncated to 16 bytes.
fn binding_digest(tenant: &TenantId, volume: &VolumeId) -> [u8; BINDING_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for field in [
        BINDING_LABEL,
        tenant.as_str().as_bytes(),
        volume.as_str().as_bytes(),
    ] {
        let len = u32::try_from(field.len()).expect("label and names are at most 63 bytes");
        ctx.update(&len.to_be_bytes());
        ctx.update(field);
    }
    let mut out = [0u8; BINDING_LEN];
    out.copy_from_slice(&ctx.finish().as_ref()[..BINDING_LEN]);
    out
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key(version: u32, byte: u8) -> DataKey {
        DataKey::from_bytes(KeyVersion(version), Zeroizing::new([byte; 32]))
    }

    fn cipher(tenant: &str, volume: &str, dek: &DataKey) -> BlockCipher {
        BlockCipher::new(
            &TenantId::new(tenant).unwrap(),
            &VolumeId::new(volume).unwrap(),
            dek,
        )
    }

    /// Our own format vector: pins the AAD layout, binding digest and cipher.
    /// If this changes, the on-disk format changed. The expected values were
    /// computed outside this crate (Python `hashlib` and `cryptography`'s AESGCM)
    /// from the byte tables in the module docs.
    #[test]
    fn known_answer_sealed_block() {
        let dek = DataKey::from_bytes(
            KeyVersion(1),
            Zeroizing::new(core::array::from_fn(|i| i as u8)),
        );
        let c = cipher("acme", "voicemail", &dek);
        assert_eq!(
            to_hex(&binding_digest(&c.tenant, &c.volume)),
            "33474eef0dbe13935f4d9b9a78705059"
        );
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&7u64.to_be_bytes());
        let mut block: Vec<u8> = (0..64u8).collect();
        let tag = c.seal_in_place(Lba(42), &Nonce(nonce), &mut block);
        assert_eq!(
            to_hex(&block),
            concat!(
                "e06c111c131258fdcc56e5243f59bf6b6b11d2957f7033f1ddf39ffa8a42a182",
                "ec9631985cfefc028f7ab0fb6d2fff69de8080ac02aec2237a355164e2dd2c32"
            )
        );
        assert_eq!(to_hex(&tag.0), "ed13a3510fd6f6f35b7311150f4358c2");
        c.open_in_place(Lba(42), &Nonce(nonce), &tag, &mut block)
            .unwrap();
        assert_eq!(block, (0..64u8).collect::<Vec<_>>());
    }

    /// The primitive itself, through raw ring: AES-256-GCM test case 16 of the
    /// GCM specification (McGrew and Viega), as used in NIST's validation.
    #[test]
    fn known_answer_raw_aes_256_gcm() {
        let key = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let nonce = hex("cafebabefacedbaddecaf888");
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plaintext = hex(concat!(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72",
            "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
        ));
        let ciphertext = concat!(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa",
            "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        );
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
        let mut buf = plaintext.clone();
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::try_assume_unique_for_key(&nonce).unwrap(),
                Aad::from(&aad),
                &mut buf,
            )
            .unwrap();
        assert_eq!(to_hex(&buf), ciphertext);
        assert_eq!(to_hex(tag.as_ref()), "76fc6ece0f4e1768cddf8853bb2d551b");
    }

    #[test]
    fn failure_names_the_block_only_and_zeroes_the_buffer() {
        let c = cipher("acme", "calls", &key(1, 9));
        let nonce = Nonce([1; NONCE_LEN]);
        let mut block = vec![0xAB; 4096];
        let tag = c.seal_in_place(Lba(5), &nonce, &mut block);
        block[100] ^= 1;
        let e = c
            .open_in_place(Lba(5), &nonce, &tag, &mut block)
            .unwrap_err();
        assert_eq!(e.to_string(), "block 5 failed authentication");
        assert_eq!(e.kind(), ErrorKind::Authentication);
        assert!(block.iter().all(|&b| b == 0));
    }

    #[test]
    fn debug_shows_ids_and_version_never_key_bytes() {
        let c = cipher("acme", "calls", &key(3, 0x5A));
        let shown = format!("{c:?}");
        assert!(shown.contains("acme") && shown.contains("calls") && shown.contains('3'));
        assert!(!shown.contains("5a") && !shown.contains("5A") && !shown.contains("90"));
        assert!(!shown.contains(&to_hex(&c.binding)));
        assert_eq!(
            format!("{:?}", Tag([0xA5; 16])),
            format!("Tag({})", "a5".repeat(16))
        );
    }

    #[test]
    fn empty_and_largest_blocks_round_trip() {
        let c = cipher("t", "v", &key(1, 1));
        for len in [0, 1, 512, 65536] {
            let mut block = vec![0x11; len];
            let tag = c.seal_in_place(Lba(0), &Nonce([0; 12]), &mut block);
            c.open_in_place(Lba(0), &Nonce([0; 12]), &tag, &mut block)
                .unwrap();
            assert_eq!(block, vec![0x11; len]);
        }
    }

    /// One way of tampering with a sealed block or the context it is opened in.
    #[derive(Debug, Clone)]
    enum Tamper {
        Ciphertext(prop::sample::Index, u8),
        Tag(prop::sample::Index, u8),
        Nonce(prop::sample::Index, u8),
        Lba(u64),
        Tenant,
        Volume,
        DekVersion(u32),
        Truncate(prop::sample::Index),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        let bit = 0u8..8;
        prop_oneof![
            (any::<prop::sample::Index>(), bit.clone()).prop_map(|(i, b)| Tamper::Ciphertext(i, b)),
            (any::<prop::sample::Index>(), bit.clone()).prop_map(|(i, b)| Tamper::Tag(i, b)),
            (any::<prop::sample::Index>(), bit).prop_map(|(i, b)| Tamper::Nonce(i, b)),
            (1u64..).prop_map(Tamper::Lba),
            Just(Tamper::Tenant),
            Just(Tamper::Volume),
            (1u32..).prop_map(Tamper::DekVersion),
            any::<prop::sample::Index>().prop_map(Tamper::Truncate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip(
            plaintext in prop::collection::vec(any::<u8>(), 0..=8192),
            lba: u64,
            nonce: [u8; NONCE_LEN],
            version in 1u32..,
        ) {
            let c = cipher("acme", "calls", &key(version, 7));
            let mut block = plaintext.clone();
            let tag = c.seal_in_place(Lba(lba), &Nonce(nonce), &mut block);
            if plaintext.len() >= 16 {
                prop_assert_ne!(&block, &plaintext);
            }
            c.open_in_place(Lba(lba), &Nonce(nonce), &tag, &mut block).unwrap();
            prop_assert_eq!(block, plaintext);
        }

        #[test]
        fn any_change_fails_to_open(
            plaintext in prop::collection::vec(any::<u8>(), 1..=4096),
            lba in 0u64..u64::MAX / 2,
            nonce: [u8; NONCE_LEN],
            how in tamper(),
        ) {
            let dek_bytes = [0x42; 32];
            let sealer = cipher("acme", "calls", &DataKey::from_bytes(KeyVersion(1), Zeroizing::new(dek_bytes)));
            let mut block = plaintext.clone();
            let mut tag = sealer.seal_in_place(Lba(lba), &Nonce(nonce), &mut block);
            let mut nonce = Nonce(nonce);
            let mut at = Lba(lba);
            // The same key bytes throughout: only the binding may make opening fail.
            let mut opener = cipher("acme", "calls", &DataKey::from_bytes(KeyVersion(1), Zeroizing::new(dek_bytes)));
            match how {
                Tamper::Ciphertext(i, b) => { let i = i.index(block.len()); block[i] ^= 1 << b }
                Tamper::Tag(i, b) => tag.0[i.index(TAG_LEN)] ^= 1 << b,
                Tamper::Nonce(i, b) => nonce.0[i.index(NONCE_LEN)] ^= 1 << b,
                Tamper::Lba(d) => at = Lba(lba.wrapping_add(d)),
                Tamper::Tenant => opener = cipher("acme2", "calls", &DataKey::from_bytes(KeyVersion(1), Zeroizing::new(dek_bytes))),
                Tamper::Volume => opener = cipher("acme", "calls2", &DataKey::from_bytes(KeyVersion(1), Zeroizing::new(dek_bytes))),
                Tamper::DekVersion(d) => opener = cipher("acme", "calls", &DataKey::from_bytes(KeyVersion(1u32.wrapping_add(d)), Zeroizing::new(dek_bytes))),
                Tamper::Truncate(i) => { let keep = i.index(block.len()); block.truncate(keep) }
            }
            prop_assert_eq!(opener.open_in_place(at, &nonce, &tag, &mut block), Err(AuthError { lba: at }));
            prop_assert!(block.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn binding_separates_name_boundaries() {
        // Without length prefixes "ab"+"c" and "a"+"bc" would hash alike.
        let a = binding_digest(&TenantId::new("ab").unwrap(), &VolumeId::new("c").unwrap());
        let b = binding_digest(&TenantId::new("a").unwrap(), &VolumeId::new("bc").unwrap());
        assert_ne!(a, b);
    }
}
