//! The deployment's master key: the root every tenant KEK is derived from.
//!
//! The master key never leaves this crate in the clear except through
//! [`MasterKey::expose_secret`] (used by the key file code); what the rest of the
//! product stores about it is its [`KeyId`] and [`CheckValue`], neither secret.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::audit::{AUDIT_KEK_LABEL, AuditKek};
use crate::data_key::fill_random;
use crate::hkdf::{Info, constant_time_eq, hkdf_sha256};
use crate::key_file::Protection;
use crate::locked::KeyBytes;
use crate::tenant::{DeploymentSalt, TenantKek, TenantSeed};
use crate::{KEY_LEN, KeyVersion, RandomError, TenantId};

/// HKDF label of the master key check value.
const CHECK_LABEL: &str = "blockseal/v1/check";
/// HKDF label of tenant KEKs.
const TENANT_KEK_LABEL: &str = "blockseal/v1/tenant-kek";

/// Length of a [`KeyId`], in bytes.
pub const KEY_ID_LEN: usize = 16;
/// Length of a [`CheckValue`], in bytes.
pub const CHECK_VALUE_LEN: usize = 16;

/// A master key's random identifier. Not secret: it is printed, logged and stored
/// in metadata so that a store can say which master key it expects.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// Builds an id from its bytes (metadata records, key files).
    pub fn from_bytes(bytes: [u8; KEY_ID_LEN]) -> KeyId {
        KeyId(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A key id could not be parsed from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key id is {} hexadecimal digits", 2 * KEY_ID_LEN)]
pub struct KeyIdParseError;

impl FromStr for KeyId {
    type Err = KeyIdParseError;

    /// Parses the 32 lowercase or uppercase hex digits that `Display` prints.
    fn from_str(s: &str) -> Result<KeyId, KeyIdParseError> {
        parse_hex(s).map(KeyId).ok_or(KeyIdParseError)
    }
}

/// Parses exactly `2 * N` hexadecimal digits, lowercase or uppercase, into `N`
/// bytes (the text form of key and backup ids).
pub(crate) fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(out)
}

/// A 16-byte value derived from a master key that proves, without revealing the
/// key, that a later key is the same one. Safe to store in metadata.
#[derive(Clone, Copy)]
pub struct CheckValue([u8; CHECK_VALUE_LEN]);

impl CheckValue {
    /// Builds a check value from stored bytes.
    pub fn from_bytes(bytes: [u8; CHECK_VALUE_LEN]) -> CheckValue {
        CheckValue(bytes)
    }

    /// The bytes to store.
    pub fn as_bytes(&self) -> &[u8; CHECK_VALUE_LEN] {
        &self.0
    }
}

impl fmt::Debug for CheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckValue(")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str(")")
    }
}

/// The master key offered is not the one a store was created with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WrongMasterKey {
    /// The key has another id than the one the store recorded: another key.
    #[error("wrong master key for this store: it expects key {expected}, this is key {actual}")]
    OtherKey {
        /// The key id the store recorded.
        expected: KeyId,
        /// The id of the key that was offered.
        actual: KeyId,
    },
    /// The key carries the id the store recorded, but its bytes do not give the
    /// store's check value: the key (or the file it came from) was damaged or
    /// forged under the right id, or the store's record of the check value was
    /// damaged.
    #[error(
        "master key {id} does not match this store's check value: the key file is damaged \
         or forged, or the store's record of the key is"
    )]
    CheckValueMismatch {
        /// The id the key and the store share.
        id: KeyId,
    },
}

/// The deployment's 256-bit master key.
///
/// The bytes live in locked memory that only keys use and zeroize on drop;
/// `Debug` shows the id, creation time and the protection of the file the key
/// was loaded from, never key bytes.
pub struct MasterKey {
    id: KeyId,
    created: u64,
    protection: Option<Protection>,
    key: KeyBytes,
}

impl MasterKey {
    /// Generates a fresh master key and id from the system CSPRNG, stamped with the
    /// current time.
    pub fn generate() -> Result<MasterKey, RandomError> {
        let mut key = KeyBytes::zeroed();
        fill_random(key.expose_mut())?;
        let mut id = [0u8; KEY_ID_LEN];
        fill_random(&mut id)?;
        // A clock before 1970 is a misconfigured host; 0 still makes a valid key.
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(MasterKey {
            id: KeyId(id),
            created,
            protection: None,
            key,
        })
    }

    /// Builds a master key from known parts (test vectors, a future KMS). The
    /// bytes are copied to the key's own memory and `key` is wiped.
    pub fn from_bytes(id: KeyId, created: u64, key: Zeroizing<[u8; KEY_LEN]>) -> MasterKey {
        MasterKey::from_key_bytes(id, created, KeyBytes::copy_of(&key))
    }

    /// A second copy of this key in its own locked memory, for a process that
    /// opens several stores under one master key (a cluster host opening the
    /// shards it takes over). Both copies zeroize on drop.
    pub fn duplicate(&self) -> MasterKey {
        MasterKey {
            id: self.id,
            created: self.created,
            protection: self.protection,
            key: KeyBytes::copy_of(self.key.expose()),
        }
    }

    pub(crate) fn from_key_bytes(id: KeyId, created: u64, key: KeyBytes) -> MasterKey {
        MasterKey {
            id,
            created,
            protection: None,
            key,
        }
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// When the key was generated, in seconds since the Unix epoch.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// How the key file this key was loaded from protects it; `None` when the key
    /// was not loaded from a file.
    pub fn file_protection(&self) -> Option<&Protection> {
        self.protection.as_ref()
    }

    /// The value a store keeps to recognise this key later: HKDF-SHA256 of the key
    /// with the label `blockseal/v1/check`.
    pub fn check_value(&self) -> CheckValue {
        let mut out = [0u8; CHECK_VALUE_LEN];
        hkdf_sha256(
            &[],
            self.expose_secret(),
            Info::new(CHECK_LABEL).as_bytes(),
            &mut out,
        );
        CheckValue(out)
    }

    /// Checks that this is the key a store recorded as `id` with `check`.
    ///
    /// Another id is [`WrongMasterKey::OtherKey`]; the right id with key bytes
    /// that do not give `check` is [`WrongMasterKey::CheckValueMismatch`]. The
    /// check value is always computed and compared in constant time.
    pub fn verify(&self, id: KeyId, check: &CheckValue) -> Result<(), WrongMasterKey> {
        let ours = self.check_value();
        let same_check = constant_time_eq(ours.as_bytes(), check.as_bytes());
        if id != self.id {
            Err(WrongMasterKey::OtherKey {
                expected: id,
                actual: self.id,
            })
        } else if !same_check {
            Err(WrongMasterKey::CheckValueMismatch { id })
        } else {
            Ok(())
        }
    }

    /// Derives a tenant's key-encryption key.
    ///
    /// `KEK = HKDF-SHA256(ikm = master, salt = deployment salt, info)`, where `info`
    /// is the label `blockseal/v1/tenant-kek`, the tenant id and the tenant seed
    /// (each length prefixed) and the KEK version as a big-endian u32. Destroying the
    /// seed makes the KEK underivable, even with the master key.
    pub fn tenant_kek(
        &self,
        salt: &DeploymentSalt,
        tenant: &TenantId,
        seed: &TenantSeed,
        version: KeyVersion,
    ) -> TenantKek {
        let info = tenant_kek_info(tenant, seed, version);
        // Derived straight into the KEK's own memory.
        let mut key = KeyBytes::zeroed();
        hkdf_sha256(
            salt.as_bytes(),
            self.expose_secret(),
            info.as_bytes(),
            key.expose_mut(),
        );
        TenantKek::from_key_bytes(tenant.clone(), version, key)
    }

    /// Derives the key that wraps a store's audit key.
    ///
    /// `KEK = HKDF-SHA256(ikm = master, salt = deployment salt, info)`, where
    /// `info` is the length-prefixed label `blockseal/v1/audit-kek`: a label no
    /// tenant KEK derivation uses, so the two never collide.
    pub fn audit_kek(&self, salt: &DeploymentSalt) -> AuditKek {
        let info = Info::new(AUDIT_KEK_LABEL);
        let mut key = KeyBytes::zeroed();
        hkdf_sha256(
            salt.as_bytes(),
            self.expose_secret(),
            info.as_bytes(),
            key.expose_mut(),
        );
        AuditKek::from_key_bytes(key)
    }

    /// The raw key bytes. Every use of master key material goes through here.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.key.expose()
    }

    /// Records how the file this key came from is protected.
    pub(crate) fn with_protection(mut self, protection: Protection) -> MasterKey {
        self.protection = Some(protection);
        self
    }
}

impl ZeroizeOnDrop for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("created", &self.created)
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

/// The HKDF `info` of a tenant KEK.
pub(crate) fn tenant_kek_info(tenant: &TenantId, seed: &TenantSeed, version: KeyVersion) -> Info {
    let mut info = Info::new(TENANT_KEK_LABEL);
    info.bytes(tenant.as_str().as_bytes())
        .bytes(seed.expose_secret())
        .u32(version.0);
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_bytes(KeyId([7; 16]), 1, Zeroizing::new([byte; KEY_LEN]))
    }

    #[test]
    fn key_id_displays_and_parses_as_hex() {
        let id =
            KeyId::from_bytes(*b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\xff");
        assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0eff");
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert_eq!(
            "000102030405060708090A0B0C0D0EFF".parse::<KeyId>().unwrap(),
            id
        );
        for bad in [
            "",
            "00",
            "zz0102030405060708090a0b0c0d0eff",
            "+00102030405060708090a0b0c0d0eff",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        assert_ne!(a.id(), b.id());
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(a.created() > 1_600_000_000);
    }

    #[test]
    fn verify_accepts_the_same_key_only() {
        let a = master(1);
        a.verify(a.id(), &a.check_value()).unwrap();
        // Another key under another id.
        let c = MasterKey::from_bytes(KeyId([8; 16]), 1, Zeroizing::new([2; KEY_LEN]));
        let err = c.verify(a.id(), &a.check_value()).unwrap_err();
        assert!(matches!(err, WrongMasterKey::OtherKey { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "wrong master key for this store: it expects key 07070707070707070707070707070707, \
             this is key 08080808080808080808080808080808"
        );
        // The same bytes under another id: still the other key the store names.
        let d = MasterKey::from_bytes(KeyId([8; 16]), 1, Zeroizing::new([1; KEY_LEN]));
        let err = d.verify(a.id(), &a.check_value()).unwrap_err();
        assert!(matches!(err, WrongMasterKey::OtherKey { .. }), "{err:?}");
    }

    /// A forged key file: the store's key id with other key bytes. The message
    /// used to name the same id twice ("expects key X, this is key X").
    #[test]
    fn verify_names_a_forged_key_with_the_right_id() {
        let a = master(1);
        let forged = master(2);
        assert_eq!(forged.id(), a.id());
        let err = forged.verify(a.id(), &a.check_value()).unwrap_err();
        assert!(
            matches!(err, WrongMasterKey::CheckValueMismatch { id } if id == a.id()),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "master key 07070707070707070707070707070707 does not match this store's check \
             value: the key file is damaged or forged, or the store's record of the key is"
        );
        // A damaged stored check value reads the same way.
        let mut check = *a.check_value().as_bytes();
        check[0] ^= 1;
        let err = a
            .verify(a.id(), &CheckValue::from_bytes(check))
            .unwrap_err();
        assert!(matches!(err, WrongMasterKey::CheckValueMismatch { .. }));
    }

    #[test]
    fn check_value_is_not_a_kek_or_the_key() {
        let m = master(3);
        let check = m.check_value();
        assert_ne!(&check.as_bytes()[..], &m.expose_secret()[..16]);
        let kek = m.tenant_kek(
            &DeploymentSalt::from_bytes([0; 32]),
            &TenantId::new("t").unwrap(),
            &TenantSeed::from_bytes(Zeroizing::new([0; 32])),
            KeyVersion::FIRST,
        );
        assert_ne!(&check.as_bytes()[..], &kek.expose_secret()[..16]);
    }

    /// A fixed vector so that the derivation can never change silently.
    #[test]
    fn tenant_kek_known_answer() {
        let m = master(0x11);
        let salt = DeploymentSalt::from_bytes([0x22; 32]);
        let seed = TenantSeed::from_bytes(Zeroizing::new([0x33; 32]));
        let tenant = TenantId::new("acme").unwrap();
        let kek = m.tenant_kek(&salt, &tenant, &seed, KeyVersion(2));

        // The same computation spelled out from the documented encoding.
        let mut info = Vec::new();
        info.extend_from_slice(&23u32.to_be_bytes());
        info.extend_from_slice(b"blockseal/v1/tenant-kek");
        info.extend_from_slice(&4u32.to_be_bytes());
        info.extend_from_slice(b"acme");
        info.extend_from_slice(&32u32.to_be_bytes());
        info.extend_from_slice(&[0x33; 32]);
        info.extend_from_slice(&2u32.to_be_bytes());
        let mut expected = [0u8; 32];
        hkdf_sha256(&[0x22; 32], &[0x11; 32], &info, &mut expected);
        assert_eq!(kek.expose_secret(), &expected);
        assert_eq!(kek.tenant(), &tenant);
        assert_eq!(kek.version(), KeyVersion(2));
    }

    // Small alphabets and value sets, so that equal and prefix-related inputs,
    // the cases an ambiguous encoding would confuse, come up often.
    fn tenant_name() -> impl Strategy<Value = TenantId> {
        prop_oneof![
            "[ab][ab.]{0,3}".prop_map(|s| TenantId::new(&s).unwrap()),
            "[a-z0-9][a-z0-9._-]{0,62}".prop_map(|s| TenantId::new(&s).unwrap()),
        ]
    }

    fn version() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..3, any::<u32>()]
    }

    fn seed() -> impl Strategy<Value = [u8; 32]> {
        prop_oneof![Just([0u8; 32]), Just([1u8; 32]), any::<[u8; 32]>()]
    }

    proptest! {
        #[test]
        fn distinct_inputs_give_distinct_keks(
            t1 in tenant_name(), t2 in tenant_name(),
            v1 in version(), v2 in version(),
            s1 in seed(), s2 in seed(),
        ) {
            prop_assume!((&t1, v1, s1) != (&t2, v2, s2));
            let m = master(9);
            let salt = DeploymentSalt::from_bytes([5; 32]);
            let a = m.tenant_kek(&salt, &t1, &TenantSeed::from_bytes(Zeroizing::new(s1)), KeyVersion(v1));
            let b = m.tenant_kek(&salt, &t2, &TenantSeed::from_bytes(Zeroizing::new(s2)), KeyVersion(v2));
            prop_assert_ne!(a.expose_secret(), b.expose_secret());
        }

        #[test]
        fn same_tenant_different_seed_or_version_differs(
            t in tenant_name(), v in 1u32..1000, s1 in any::<[u8; 32]>(), s2 in any::<[u8; 32]>(),
        ) {
            prop_assume!(s1 != s2);
            let m = master(9);
            let salt = DeploymentSalt::from_bytes([5; 32]);
            let seed1 = TenantSeed::from_bytes(Zeroizing::new(s1));
            let base = m.tenant_kek(&salt, &t, &seed1, KeyVersion(v));
            let next = m.tenant_kek(&salt, &t, &seed1, KeyVersion(v + 1));
            let reseeded = m.tenant_kek(&salt, &t, &TenantSeed::from_bytes(Zeroizing::new(s2)), KeyVersion(v));
            prop_assert_ne!(base.expose_secret(), next.expose_secret());
            prop_assert_ne!(base.expose_secret(), reseeded.expose_secret());
        }

        #[test]
        fn info_encoding_never_collides(
            t1 in tenant_name(), t2 in tenant_name(),
            v1 in version(), v2 in version(),
            s1 in seed(), s2 in seed(),
        ) {
            prop_assume!((&t1, v1, s1) != (&t2, v2, s2));
            let a = tenant_kek_info(&t1, &TenantSeed::from_bytes(Zeroizing::new(s1)), KeyVersion(v1));
            let b = tenant_kek_info(&t2, &TenantSeed::from_bytes(Zeroizing::new(s2)), KeyVersion(v2));
            prop_assert_ne!(a.as_bytes(), b.as_bytes());
        }
    }
}
