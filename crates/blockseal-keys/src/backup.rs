//! Keys of volume backups, and the tenant recovery bundle that carries them to
//! another host.
//!
//! - A [`BackupKey`] is 32 random bytes made for one backup, named by a random
//!   [`BackupId`]. It seals the backed-up volume's data keys into the backup file
//!   ([`BackupKey::wrap_dek`]) and authenticates the file's trailer
//!   ([`BackupKey::mac`], under a MAC key derived from it with HKDF-SHA256).
//! - The store keeps each backup key only wrapped under the tenant's KEK
//!   ([`TenantKek::wrap_backup_key`]); a backup file never holds it. Crypto-shredding
//!   the tenant therefore makes its backups unreadable too.
//! - A [`TenantBundle`] carries a tenant's backup keys to another host
//!   (`blockseal key export-tenant`), sealed under a passphrase (Argon2id, as key
//!   files are) or to a recipient's master key.
//!
//! Every secret lives in locked key memory, zeroizes on drop and shows nothing of
//! its bytes in `Debug`. Unwrapping failures are deliberately vague: they name the
//! backup, tenant and versions, never which check failed. Byte layouts are in
//! `docs/FORMAT.md` ("Backup keys", "Tenant recovery bundle").

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::data_key::fill_random;
use crate::hkdf::{Info, constant_time_eq, hkdf_sha256};
use crate::key_file::{KeyDerivationFailed, argon2id_sealing_key};
use crate::locked::KeyBytes;
use crate::master::{KEY_ID_LEN, parse_hex};
use crate::tenant::TenantKek;
use crate::{
    Argon2Params, Argon2ParamsError, DataKey, KEY_LEN, KeyId, KeyVersion, MAX_NAME_LEN, MasterKey,
    Passphrase, RandomError, TenantId,
};

/// Length of a [`BackupId`], in bytes.
pub const BACKUP_ID_LEN: usize = 16;
/// Length of a backup MAC (HMAC-SHA256), in bytes.
pub const BACKUP_MAC_LEN: usize = 32;
/// Length of a data key wrapped under a backup key: nonce, sealed key, tag.
pub const WRAPPED_BACKUP_DEK_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// Format version of wrapped backup keys written by this build.
pub const WRAPPED_BACKUP_KEY_FORMAT: u8 = 1;
/// Length of a backup key wrapped under a tenant KEK: format, KEK version, nonce,
/// sealed key, tag.
pub const WRAPPED_BACKUP_KEY_LEN: usize = 1 + 4 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// First 8 bytes of every tenant recovery bundle.
pub const BUNDLE_MAGIC: [u8; 8] = *b"BSBUNDLE";
/// Tenant bundle format version written by this build.
pub const BUNDLE_VERSION: u16 = 1;
/// Most backup keys one tenant bundle holds.
pub const MAX_BUNDLE_KEYS: u32 = 1_000_000;

const TAG_LEN: usize = 16;
/// Associated data label of a data key wrapped under a backup key.
const BACKUP_DEK_LABEL: &str = "blockseal/v1/backup-dek";
/// HKDF label of a backup's MAC key.
const BACKUP_MAC_LABEL: &str = "blockseal/v1/backup-mac";
/// Associated data label of a backup key wrapped under a tenant KEK.
const WRAPPED_BACKUP_KEY_LABEL: &str = "blockseal/v1/wrapped-backup-key";
/// HKDF label of the key a bundle sealed to a master key is sealed under.
const BUNDLE_RECIPIENT_LABEL: &str = "blockseal/v1/bundle-recipient";

const PROTECTION_PASSPHRASE: u8 = 1;
const PROTECTION_RECIPIENT: u8 = 2;
/// Magic, format version, protection, reserved.
const BUNDLE_PREFIX_LEN: usize = 8 + 2 + 1 + 1;
const PASSPHRASE_SALT_LEN: usize = 16;
const RECIPIENT_SALT_LEN: usize = 32;
/// Argon2 memory, passes and lanes (u32 each), then the salt.
const PASSPHRASE_PARAMS_LEN: usize = 12 + PASSPHRASE_SALT_LEN;
/// Recipient key id, then the salt.
const RECIPIENT_PARAMS_LEN: usize = KEY_ID_LEN + RECIPIENT_SALT_LEN;
/// One backup key in a bundle's content: its id, then its bytes.
const BUNDLE_ENTRY_LEN: usize = BACKUP_ID_LEN + KEY_LEN;
/// Shortest sealed content: a one-byte tenant name, no keys, the tag.
const MIN_SEALED_LEN: usize = 4 + 1 + 8 + 4 + TAG_LEN;
/// Longest sealed content: the longest tenant name, the most keys, the tag.
const MAX_SEALED_LEN: usize =
    4 + MAX_NAME_LEN + 8 + 4 + MAX_BUNDLE_KEYS as usize * BUNDLE_ENTRY_LEN + TAG_LEN;

/// A backup's random identifier. Not secret: it names the backup in its file,
/// in the store's records and in messages.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupId([u8; BACKUP_ID_LEN]);

impl BackupId {
    /// Draws a fresh id from the system CSPRNG.
    pub fn generate() -> Result<BackupId, RandomError> {
        let mut id = [0u8; BACKUP_ID_LEN];
        fill_random(&mut id)?;
        Ok(BackupId(id))
    }

    /// Builds an id from its bytes (a backup file, a store record).
    pub fn from_bytes(bytes: [u8; BACKUP_ID_LEN]) -> BackupId {
        BackupId(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; BACKUP_ID_LEN] {
        &self.0
    }
}

/// 32 lowercase hexadecimal digits.
impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupId({self})")
    }
}

/// A backup id could not be parsed from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a backup id is {} hexadecimal digits", 2 * BACKUP_ID_LEN)]
pub struct BackupIdParseError;

impl FromStr for BackupId {
    type Err = BackupIdParseError;

    /// Parses the 32 lowercase or uppercase hex digits that `Display` prints.
    fn from_str(s: &str) -> Result<BackupId, BackupIdParseError> {
        parse_hex(s).map(BackupId).ok_or(BackupIdParseError)
    }
}

/// A backup key could not be used to unwrap, or could not be unwrapped.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackupKeyError {
    /// The wrapped bytes are not the length their format has.
    #[error("wrapped {what} of backup {backup} is {actual} bytes long; expected {expected}")]
    WrongLength {
        /// "data key" or "backup key".
        what: &'static str,
        /// The backup the caller asked for.
        backup: BackupId,
        /// Length of the input.
        actual: usize,
        /// Length of the format.
        expected: usize,
    },
    /// A wrapped backup key has a format version this build does not read.
    #[error(
        "wrapped backup key of backup {backup} has format version {version}; this build reads \
         version {WRAPPED_BACKUP_KEY_FORMAT}"
    )]
    UnknownFormat {
        /// The backup the caller asked for.
        backup: BackupId,
        /// The format version found.
        version: u8,
    },
    /// The backup key is wrong, the blob belongs to another backup or DEK version,
    /// or it is damaged. Which one is deliberately not said.
    #[error("data key failed to unwrap (backup {backup}, DEK {version})")]
    DataKeyFailed {
        /// The backup the caller asked for.
        backup: BackupId,
        /// The DEK version the caller asked for.
        version: KeyVersion,
    },
    /// The KEK is wrong, the blob belongs to another tenant or backup, or it is
    /// damaged. Which one is deliberately not said.
    #[error("backup key failed to unwrap (tenant {tenant}, backup {backup}, KEK {kek_version})")]
    BackupKeyFailed {
        /// Tenant of the KEK used.
        tenant: TenantId,
        /// The backup the caller asked for.
        backup: BackupId,
        /// KEK version recorded in the wrapped key.
        kek_version: KeyVersion,
    },
}

/// The key of one backup: 256 random bits that seal the backed-up data keys and
/// authenticate the backup file.
///
/// The bytes live in locked memory that only keys use, zeroize on drop and never
/// show in `Debug`. The store keeps the key only wrapped under the tenant KEK
/// ([`TenantKek::wrap_backup_key`]); a [`TenantBundle`] carries it to another host.
pub struct BackupKey {
    key: KeyBytes,
}

impl BackupKey {
    /// Generates a fresh key from the system CSPRNG.
    pub fn generate() -> Result<BackupKey, RandomError> {
        let mut key = KeyBytes::zeroed();
        fill_random(key.expose_mut())?;
        Ok(BackupKey { key })
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8; KEY_LEN]) -> BackupKey {
        BackupKey {
            key: KeyBytes::copy_of(bytes),
        }
    }

    /// Seals `dek` for backup `id` with AES-256-GCM under this key and a fresh
    /// random nonce: `nonce || sealed key || tag`. The associated data binds the
    /// backup id and the DEK's version; the version itself is not in the output,
    /// the backup file records it beside.
    pub fn wrap_dek(
        &self,
        id: &BackupId,
        dek: &DataKey,
    ) -> Result<[u8; WRAPPED_BACKUP_DEK_LEN], RandomError> {
        let aad = backup_dek_aad(id, dek.version());
        let (nonce, sealed) = seal_key(&self.aead_key(), &aad, dek.expose_secret())?;
        let mut out = [0u8; WRAPPED_BACKUP_DEK_LEN];
        out[..NONCE_LEN].copy_from_slice(&nonce);
        out[NONCE_LEN..].copy_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a data key of version `version` wrapped for backup `id` under this
    /// key. A pure function of its inputs that never panics.
    pub fn unwrap_dek(
        &self,
        id: &BackupId,
        version: KeyVersion,
        bytes: &[u8],
    ) -> Result<DataKey, BackupKeyError> {
        let Ok(bytes) = <&[u8; WRAPPED_BACKUP_DEK_LEN]>::try_from(bytes) else {
            return Err(BackupKeyError::WrongLength {
                what: "data key",
                backup: *id,
                actual: bytes.len(),
                expected: WRAPPED_BACKUP_DEK_LEN,
            });
        };
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let aad = backup_dek_aad(id, version);
        let key = open_key(&self.aead_key(), &aad, nonce, sealed).ok_or(
            BackupKeyError::DataKeyFailed {
                backup: *id,
                version,
            },
        )?;
        Ok(DataKey::from_key_bytes(version, key))
    }

    /// HMAC-SHA256 of `data` under backup `id`'s MAC key:
    /// `HKDF-SHA256(ikm = this key, salt = empty, info = lp("blockseal/v1/backup-mac")
    /// || backup id)`. What a backup file's trailer holds.
    pub fn mac(&self, id: &BackupId, data: &[u8]) -> [u8; BACKUP_MAC_LEN] {
        let tag = hmac::sign(&self.mac_key(id), data);
        let mut out = [0u8; BACKUP_MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `mac` is the MAC of `data` for backup `id` under this key
    /// (compared in constant time).
    pub fn verify_mac(&self, id: &BackupId, data: &[u8], mac: &[u8]) -> bool {
        constant_time_eq(&self.mac(id, data), mac)
    }

    /// The MAC key of backup `id`, derived in key memory.
    fn mac_key(&self, id: &BackupId) -> hmac::Key {
        let mut info = Info::new(BACKUP_MAC_LABEL);
        info.fixed(id.as_bytes());
        let mut key = KeyBytes::zeroed();
        hkdf_sha256(&[], self.expose_secret(), info.as_bytes(), key.expose_mut());
        hmac::Key::new(hmac::HMAC_SHA256, key.expose())
    }

    fn aead_key(&self) -> LessSafeKey {
        let key = UnboundKey::new(&AES_256_GCM, self.expose_secret())
            .expect("a backup key is 32 bytes, the AES-256 key length");
        LessSafeKey::new(key)
    }

    /// The raw key bytes; crate private, every use goes through here.
    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.key.expose()
    }
}

impl ZeroizeOnDrop for BackupKey {}

impl fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupKey").finish_non_exhaustive()
    }
}

impl TenantKek {
    /// Seals backup `id`'s key under this KEK with AES-256-GCM and a fresh random
    /// nonce: what the store keeps (layout in `docs/FORMAT.md`, "Backup keys").
    /// The associated data binds the format version, tenant, backup id and KEK
    /// version.
    pub fn wrap_backup_key(
        &self,
        id: &BackupId,
        key: &BackupKey,
    ) -> Result<[u8; WRAPPED_BACKUP_KEY_LEN], RandomError> {
        let aad = wrapped_backup_key_aad(self.tenant(), id, self.version());
        let (nonce, sealed) = seal_key(&self.aead_key(), &aad, key.expose_secret())?;
        let mut out = [0u8; WRAPPED_BACKUP_KEY_LEN];
        out[0] = WRAPPED_BACKUP_KEY_FORMAT;
        out[1..5].copy_from_slice(&self.version().0.to_be_bytes());
        out[5..5 + NONCE_LEN].copy_from_slice(&nonce);
        out[5 + NONCE_LEN..].copy_from_slice(&sealed);
        Ok(out)
    }

    /// Opens backup `id`'s key wrapped under this KEK. A blob wrapped under
    /// another KEK version fails like any wrong key; read its version first with
    /// [`wrapped_backup_key_kek_version`]. A pure function of its inputs that
    /// never panics.
    pub fn unwrap_backup_key(
        &self,
        id: &BackupId,
        bytes: &[u8],
    ) -> Result<BackupKey, BackupKeyError> {
        let Ok(bytes) = <&[u8; WRAPPED_BACKUP_KEY_LEN]>::try_from(bytes) else {
            return Err(BackupKeyError::WrongLength {
                what: "backup key",
                backup: *id,
                actual: bytes.len(),
                expected: WRAPPED_BACKUP_KEY_LEN,
            });
        };
        if bytes[0] != WRAPPED_BACKUP_KEY_FORMAT {
            return Err(BackupKeyError::UnknownFormat {
                backup: *id,
                version: bytes[0],
            });
        }
        let kek_version = KeyVersion(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
        let failed = || BackupKeyError::BackupKeyFailed {
            tenant: self.tenant().clone(),
            backup: *id,
            kek_version,
        };
        if kek_version != self.version() {
            return Err(failed());
        }
        let (nonce, sealed) = bytes[5..].split_at(NONCE_LEN);
        let aad = wrapped_backup_key_aad(self.tenant(), id, kek_version);
        let key = open_key(&self.aead_key(), &aad, nonce, sealed).ok_or_else(failed)?;
        Ok(BackupKey { key })
    }
}

/// The version of the KEK a wrapped backup key needs, read without any key: for
/// a store rewrapping its backup keys when the tenant KEK rotates. `None` when
/// `bytes` are not a wrapped backup key of a format this build reads.
pub fn wrapped_backup_key_kek_version(bytes: &[u8]) -> Option<KeyVersion> {
    match bytes {
        [WRAPPED_BACKUP_KEY_FORMAT, a, b, c, d, ..] if bytes.len() == WRAPPED_BACKUP_KEY_LEN => {
            Some(KeyVersion(u32::from_be_bytes([*a, *b, *c, *d])))
        }
        _ => None,
    }
}

/// Associated data of a data key wrapped under a backup key: label, backup id,
/// DEK version.
fn backup_dek_aad(id: &BackupId, version: KeyVersion) -> Info {
    let mut aad = Info::new(BACKUP_DEK_LABEL);
    aad.fixed(id.as_bytes()).u32(version.0);
    aad
}

/// Associated data of a backup key wrapped under a tenant KEK: label, format
/// version, tenant (length prefixed), backup id, KEK version.
fn wrapped_backup_key_aad(tenant: &TenantId, id: &BackupId, kek_version: KeyVersion) -> Info {
    let mut aad = Info::new(WRAPPED_BACKUP_KEY_LABEL);
    aad.u8(WRAPPED_BACKUP_KEY_FORMAT)
        .bytes(tenant.as_str().as_bytes())
        .fixed(id.as_bytes())
        .u32(kek_version.0);
    aad
}

/// Seals a 32-byte key with a fresh random nonce: the nonce, and the ciphertext
/// followed by the tag. The key is sealed in a wiped buffer, so that it never
/// sits in a plain array; only the ciphertext is copied out.
fn seal_key(
    aead: &LessSafeKey,
    aad: &Info,
    key: &[u8; KEY_LEN],
) -> Result<([u8; NONCE_LEN], [u8; KEY_LEN + TAG_LEN]), RandomError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let mut buf = Zeroizing::new([0u8; KEY_LEN]);
    buf.copy_from_slice(key);
    let tag = aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            buf.as_mut_slice(),
        )
        .expect("AES-GCM seals 32 bytes without error");
    let mut sealed = [0u8; KEY_LEN + TAG_LEN];
    sealed[..KEY_LEN].copy_from_slice(buf.as_slice());
    sealed[KEY_LEN..].copy_from_slice(tag.as_ref());
    Ok((nonce, sealed))
}

/// Opens what [`seal_key`] sealed (`nonce` is 12 bytes, `sealed` 48) straight
/// into key memory; `None` when it does not open.
fn open_key(aead: &LessSafeKey, aad: &Info, nonce: &[u8], sealed: &[u8]) -> Option<KeyBytes> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
    buf.copy_from_slice(sealed);
    let plain = aead
        .open_in_place(nonce, Aad::from(aad.as_bytes()), buf.as_mut_slice())
        .ok()?;
    let mut key = KeyBytes::zeroed();
    key.expose_mut().copy_from_slice(plain);
    Some(key)
}

/// A tenant's backup keys, for restoring its backups on another host.
///
/// `blockseal key export-tenant` seals one under a passphrase
/// ([`TenantBundle::seal_with_passphrase`]) or to the master key of the host
/// that will restore ([`TenantBundle::seal_to_recipient`]);
/// [`TenantBundle::open`] reads it back. `Debug` shows the tenant and the number
/// of keys only.
pub struct TenantBundle {
    /// The tenant the backups belong to.
    pub tenant: TenantId,
    /// When the bundle was made, in seconds since the Unix epoch.
    pub created: u64,
    /// The tenant's backup keys, each with its backup's id. Ids are unique; at
    /// most [`MAX_BUNDLE_KEYS`].
    pub backup_keys: Vec<(BackupId, BackupKey)>,
}

/// What opens a [`TenantBundle`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum BundleOpener<'a> {
    /// The passphrase a bundle was sealed under.
    Passphrase(&'a Passphrase),
    /// The master key a bundle was sealed to.
    MasterKey(&'a MasterKey),
}

/// How a tenant bundle is protected; readable without opening it
/// ([`TenantBundle::inspect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleProtection {
    /// Sealed under a key derived from a passphrase with Argon2id.
    Passphrase(Argon2Params),
    /// Sealed to the master key with this id.
    Recipient(KeyId),
}

impl fmt::Display for BundleProtection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleProtection::Passphrase(params) => {
                write!(f, "passphrase (Argon2id, {params})")
            }
            BundleProtection::Recipient(id) => write!(f, "master key {id}"),
        }
    }
}

/// Why a tenant bundle could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The bytes do not start with the bundle magic.
    #[error("not a blockseal tenant bundle (bad magic)")]
    BadMagic,
    /// The bundle has a format version this build does not read.
    #[error(
        "tenant bundle has format version {version}; this build reads version {BUNDLE_VERSION}"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The header holds a value this build does not accept.
    #[error("tenant bundle has a bad header: {reason}")]
    BadHeader {
        /// What is wrong with it.
        reason: String,
    },
    /// The bundle is shorter than its header says it must be.
    #[error("tenant bundle is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        /// Its length.
        actual: usize,
        /// The length its header calls for (at least).
        expected: usize,
    },
    /// The bundle is longer than its header says it must be.
    #[error("tenant bundle has trailing bytes: {actual} bytes, expected {expected}")]
    TrailingBytes {
        /// Its length.
        actual: usize,
        /// The length its header calls for.
        expected: usize,
    },
    /// Argon2id parameters outside the accepted ranges (see [`Argon2Params`]):
    /// asked for by a bundle being read, or offered to seal one. Nothing was
    /// derived.
    #[error("tenant bundle Argon2id parameters are refused")]
    Argon2Params {
        /// Which parameter, and its range.
        #[source]
        source: Argon2ParamsError,
    },
    /// The bundle is protected by a passphrase and a master key was offered.
    #[error("tenant bundle is protected by a passphrase, but a master key was given")]
    PassphraseRequired,
    /// The bundle is sealed to a master key and a passphrase was offered.
    #[error("tenant bundle is sealed to master key {key}, but a passphrase was given")]
    MasterKeyRequired {
        /// The id of the master key the bundle is sealed to.
        key: KeyId,
    },
    /// The bundle is sealed to another master key than the one offered.
    #[error("tenant bundle is for master key {expected}, not key {actual}")]
    OtherRecipient {
        /// The id of the master key the bundle is sealed to.
        expected: KeyId,
        /// The id of the master key that was offered.
        actual: KeyId,
    },
    /// The passphrase does not open the bundle, or the bundle was altered.
    #[error("wrong passphrase for tenant bundle, or the bundle is damaged")]
    WrongPassphrase,
    /// The master key has the id the bundle names but does not open it: the
    /// bundle was altered, or the key bytes are not the ones under that id.
    /// Which one is deliberately not said.
    #[error(
        "tenant bundle failed to open with master key {key}: the bundle is damaged or forged, \
         or the key is"
    )]
    WrongMasterKey {
        /// The id the key and the bundle share.
        key: KeyId,
    },
    /// The bundle opened, but what it holds is not a well-formed bundle content:
    /// whoever sealed it had the passphrase or key and wrote something else.
    #[error("tenant bundle opened but its content is malformed: {reason}")]
    BadContent {
        /// What is wrong with it.
        reason: String,
    },
    /// An empty passphrase was offered to seal a bundle.
    #[error("refusing an empty passphrase for a tenant bundle")]
    EmptyPassphrase,
    /// The bundle to seal holds more than [`MAX_BUNDLE_KEYS`] keys.
    #[error("a tenant bundle holds at most {MAX_BUNDLE_KEYS} backup keys; this one has {count}")]
    TooManyKeys {
        /// How many it holds.
        count: usize,
    },
    /// The bundle to seal lists a backup twice.
    #[error("backup {backup} is listed twice in the tenant bundle")]
    DuplicateBackup {
        /// The backup listed twice.
        backup: BackupId,
    },
    /// Argon2id failed to derive the passphrase key.
    #[error("Argon2id key derivation failed for the tenant bundle")]
    KeyDerivation,
    /// Random bytes for the bundle could not be drawn.
    #[error("could not seal the tenant bundle")]
    Random(#[from] RandomError),
}

impl From<KeyDerivationFailed> for BundleError {
    fn from(KeyDerivationFailed: KeyDerivationFailed) -> BundleError {
        BundleError::KeyDerivation
    }
}

/// A bundle header that has passed every check.
struct Header<'a> {
    protection: BundleProtection,
    /// The Argon2id or HKDF salt.
    salt: &'a [u8],
    nonce: &'a [u8],
    /// Every byte before the sealed content: the associated data.
    aad: &'a [u8],
    /// The sealed content and its tag.
    sealed: &'a [u8],
}

impl TenantBundle {
    /// Seals the bundle under `passphrase`: AES-256-GCM under
    /// `Argon2id(params, passphrase, fresh random salt)` (layout in
    /// `docs/FORMAT.md`, "Tenant recovery bundle").
    ///
    /// Refuses an empty passphrase, parameters `blockseal key init` would refuse
    /// ([`Argon2Params::new`]), more than [`MAX_BUNDLE_KEYS`] keys and a backup
    /// listed twice, before any derivation.
    pub fn seal_with_passphrase(
        &self,
        passphrase: &Passphrase,
        params: Argon2Params,
    ) -> Result<Vec<u8>, BundleError> {
        self.check_sealable()?;
        if passphrase.expose_secret().is_empty() {
            return Err(BundleError::EmptyPassphrase);
        }
        Argon2Params::new(
            params.memory_kib(),
            params.iterations(),
            params.parallelism(),
        )
        .map_err(|source| BundleError::Argon2Params { source })?;
        let mut salt = [0u8; PASSPHRASE_SALT_LEN];
        fill_random(&mut salt)?;
        let mut out = bundle_prefix(PROTECTION_PASSPHRASE);
        out.extend_from_slice(&params.memory_kib().to_be_bytes());
        out.extend_from_slice(&params.iterations().to_be_bytes());
        out.extend_from_slice(&params.parallelism().to_be_bytes());
        out.extend_from_slice(&salt);
        let aead = argon2id_sealing_key(passphrase, &salt, params)?;
        self.seal_content(out, &aead)
    }

    /// Seals the bundle to `recipient`, the master key of the host that will
    /// restore it: AES-256-GCM under `HKDF-SHA256(ikm = master key, salt = fresh
    /// random 32 bytes, info = lp("blockseal/v1/bundle-recipient"))`. The
    /// header records the recipient's key id, so that a reader offered another
    /// key can name both.
    ///
    /// Refuses more than [`MAX_BUNDLE_KEYS`] keys and a backup listed twice.
    pub fn seal_to_recipient(&self, recipient: &MasterKey) -> Result<Vec<u8>, BundleError> {
        self.check_sealable()?;
        let mut salt = [0u8; RECIPIENT_SALT_LEN];
        fill_random(&mut salt)?;
        let mut out = bundle_prefix(PROTECTION_RECIPIENT);
        out.extend_from_slice(recipient.id().as_bytes());
        out.extend_from_slice(&salt);
        let aead = recipient_sealing_key(recipient, &salt);
        self.seal_content(out, &aead)
    }

    /// Opens a bundle with the passphrase or master key it was sealed under.
    ///
    /// Checks magic, version, header and length before any derivation, and the
    /// Argon2id parameters against the ranges `blockseal key init` accepts, so a
    /// damaged or hostile bundle cannot make a reader work for long. A wrong
    /// passphrase or key bytes fail without saying which check did; a master key
    /// with another id than the bundle's recipient is named with it. Never
    /// panics.
    pub fn open(bytes: &[u8], opener: &BundleOpener<'_>) -> Result<TenantBundle, BundleError> {
        let header = parse_header(bytes)?;
        let (aead, failed) = match (header.protection, *opener) {
            (BundleProtection::Passphrase(params), BundleOpener::Passphrase(passphrase)) => (
                argon2id_sealing_key(passphrase, header.salt, params)?,
                BundleError::WrongPassphrase,
            ),
            (BundleProtection::Recipient(expected), BundleOpener::MasterKey(master)) => {
                if master.id() != expected {
                    return Err(BundleError::OtherRecipient {
                        expected,
                        actual: master.id(),
                    });
                }
                let salt = <&[u8; RECIPIENT_SALT_LEN]>::try_from(header.salt)
                    .expect("parse_header cuts a recipient salt of RECIPIENT_SALT_LEN bytes");
                (
                    recipient_sealing_key(master, salt),
                    BundleError::WrongMasterKey { key: expected },
                )
            }
            (BundleProtection::Passphrase(_), BundleOpener::MasterKey(_)) => {
                return Err(BundleError::PassphraseRequired);
            }
            (BundleProtection::Recipient(key), BundleOpener::Passphrase(_)) => {
                return Err(BundleError::MasterKeyRequired { key });
            }
        };
        let nonce = Nonce::try_assume_unique_for_key(header.nonce)
            .expect("parse_header cuts a nonce of NONCE_LEN bytes");
        // Reserved up front (the length is bounded by MAX_SEALED_LEN), so that
        // the buffer never reallocates and leaves key copies behind.
        let mut content = Zeroizing::new(Vec::with_capacity(header.sealed.len()));
        content.extend_from_slice(header.sealed);
        let plain = aead
            .open_in_place(nonce, Aad::from(header.aad), content.as_mut_slice())
            .map_err(|_| failed)?;
        decode_content(plain)
    }

    /// Reads how a bundle is protected, without opening it: for a reader to
    /// decide whether to ask for a passphrase, or to name the master key it
    /// needs. Makes the same header and length checks as [`TenantBundle::open`].
    pub fn inspect(bytes: &[u8]) -> Result<BundleProtection, BundleError> {
        parse_header(bytes).map(|header| header.protection)
    }

    /// The key of backup `id`, when the bundle holds it.
    pub fn backup_key(&self, id: &BackupId) -> Option<&BackupKey> {
        self.backup_keys
            .iter()
            .find_map(|(backup, key)| (backup == id).then_some(key))
    }

    /// Refuses what no reader would accept: too many keys, a backup twice.
    fn check_sealable(&self) -> Result<(), BundleError> {
        let count = self.backup_keys.len();
        if count > MAX_BUNDLE_KEYS as usize {
            return Err(BundleError::TooManyKeys { count });
        }
        let mut seen = HashSet::with_capacity(count);
        for (backup, _) in &self.backup_keys {
            if !seen.insert(*backup) {
                return Err(BundleError::DuplicateBackup { backup: *backup });
            }
        }
        Ok(())
    }

    /// Appends nonce, length, sealed content and tag to `out` (the header so far)
    /// and seals with all of it before the content as associated data.
    fn seal_content(&self, mut out: Vec<u8>, aead: &LessSafeKey) -> Result<Vec<u8>, BundleError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut content = self.encode_content();
        let sealed_len = content.len() + TAG_LEN;
        debug_assert!((MIN_SEALED_LEN..=MAX_SEALED_LEN).contains(&sealed_len));
        let sealed_len_field =
            u32::try_from(sealed_len).expect("a bundle's content is at most MAX_SEALED_LEN bytes");
        out.reserve_exact(NONCE_LEN + 4 + sealed_len);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed_len_field.to_be_bytes());
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(out.as_slice()),
                content.as_mut_slice(),
            )
            .expect("AES-GCM seals at most MAX_SEALED_LEN bytes without error");
        out.extend_from_slice(&content);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext content, in a buffer that is wiped when dropped and sized
    /// up front so that it never reallocates.
    fn encode_content(&self) -> Zeroizing<Vec<u8>> {
        let name = self.tenant.as_str().as_bytes();
        let len = 4 + name.len() + 8 + 4 + self.backup_keys.len() * BUNDLE_ENTRY_LEN;
        let mut content = Zeroizing::new(Vec::with_capacity(len));
        let name_len = u32::try_from(name.len()).expect("a tenant name is at most 63 bytes");
        let count = u32::try_from(self.backup_keys.len()).expect("checked by check_sealable");
        content.extend_from_slice(&name_len.to_be_bytes());
        content.extend_from_slice(name);
        content.extend_from_slice(&self.created.to_be_bytes());
        content.extend_from_slice(&count.to_be_bytes());
        for (backup, key) in &self.backup_keys {
            content.extend_from_slice(backup.as_bytes());
            content.extend_from_slice(key.expose_secret());
        }
        debug_assert_eq!(content.len(), len);
        content
    }
}

/// The backup keys wipe themselves; the tenant and time are not secret.
impl ZeroizeOnDrop for TenantBundle {}

impl fmt::Debug for TenantBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantBundle")
            .field("tenant", &self.tenant)
            .field("backup_keys", &self.backup_keys.len())
            .finish_non_exhaustive()
    }
}

/// Magic, format version, `protection` and the reserved byte.
fn bundle_prefix(protection: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(BUNDLE_PREFIX_LEN + RECIPIENT_PARAMS_LEN);
    out.extend_from_slice(&BUNDLE_MAGIC);
    out.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
    out.push(protection);
    out.push(0);
    out
}

/// The AES-256-GCM key a bundle sealed to `master` is sealed under.
fn recipient_sealing_key(master: &MasterKey, salt: &[u8; RECIPIENT_SALT_LEN]) -> LessSafeKey {
    let mut key = KeyBytes::zeroed();
    hkdf_sha256(
        salt,
        master.expose_secret(),
        Info::new(BUNDLE_RECIPIENT_LABEL).as_bytes(),
        key.expose_mut(),
    );
    let key = UnboundKey::new(&AES_256_GCM, key.expose())
        .expect("a derived key is 32 bytes, the AES-256 key length");
    LessSafeKey::new(key)
}

/// Checks magic, version, reserved byte, protection, lengths and Argon2id
/// parameters, in that order, and cuts the bundle into its parts.
fn parse_header(bytes: &[u8]) -> Result<Header<'_>, BundleError> {
    let actual = bytes.len();
    let truncated = |expected: usize| BundleError::Truncated { actual, expected };
    if actual < BUNDLE_MAGIC.len() {
        return Err(if !bytes.is_empty() && BUNDLE_MAGIC.starts_with(bytes) {
            truncated(BUNDLE_PREFIX_LEN)
        } else {
            BundleError::BadMagic
        });
    }
    if bytes[..8] != BUNDLE_MAGIC {
        return Err(BundleError::BadMagic);
    }
    if actual < BUNDLE_PREFIX_LEN {
        return Err(truncated(BUNDLE_PREFIX_LEN));
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if version != BUNDLE_VERSION {
        return Err(BundleError::UnsupportedVersion { version });
    }
    let bad = |reason: String| BundleError::BadHeader { reason };
    if bytes[11] != 0 {
        return Err(bad(format!("reserved byte is {:#04x}, not 0", bytes[11])));
    }
    let params_len = match bytes[10] {
        PROTECTION_PASSPHRASE => PASSPHRASE_PARAMS_LEN,
        PROTECTION_RECIPIENT => RECIPIENT_PARAMS_LEN,
        other => return Err(bad(format!("unknown protection {other}"))),
    };
    let params_end = BUNDLE_PREFIX_LEN + params_len;
    let nonce_end = params_end + NONCE_LEN;
    let header_len = nonce_end + 4;
    if actual < header_len {
        return Err(truncated(header_len));
    }
    let word =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let sealed_len = word(nonce_end) as usize;
    if !(MIN_SEALED_LEN..=MAX_SEALED_LEN).contains(&sealed_len) {
        return Err(bad(format!(
            "content length {sealed_len} is outside {MIN_SEALED_LEN}..={MAX_SEALED_LEN}"
        )));
    }
    let expected = header_len + sealed_len;
    if actual < expected {
        return Err(truncated(expected));
    }
    if actual > expected {
        return Err(BundleError::TrailingBytes { actual, expected });
    }
    let params = &bytes[BUNDLE_PREFIX_LEN..params_end];
    let (protection, salt) = if bytes[10] == PROTECTION_PASSPHRASE {
        let params_at = |i: usize| word(BUNDLE_PREFIX_LEN + 4 * i);
        // A bundle is only ever written with parameters `key init` accepts, so
        // a reader holds it to the same ranges.
        let argon = Argon2Params::new(params_at(0), params_at(1), params_at(2))
            .map_err(|source| BundleError::Argon2Params { source })?;
        (BundleProtection::Passphrase(argon), &params[12..])
    } else {
        let (id, salt) = params.split_at(KEY_ID_LEN);
        let id: [u8; KEY_ID_LEN] = id.try_into().expect("a key id is KEY_ID_LEN bytes");
        (BundleProtection::Recipient(KeyId::from_bytes(id)), salt)
    };
    Ok(Header {
        protection,
        salt,
        nonce: &bytes[params_end..nonce_end],
        aad: &bytes[..header_len],
        sealed: &bytes[header_len..],
    })
}

/// Decodes an opened bundle's content, copying each key straight into key memory.
fn decode_content(plain: &[u8]) -> Result<TenantBundle, BundleError> {
    let bad = |reason: String| BundleError::BadContent { reason };
    let short = || bad(format!("{} bytes end before its fields do", plain.len()));
    let (name_len, rest) = plain.split_first_chunk::<4>().ok_or_else(short)?;
    let name_len = u32::from_be_bytes(*name_len) as usize;
    if name_len > MAX_NAME_LEN {
        return Err(bad(format!(
            "tenant name length {name_len} is over {MAX_NAME_LEN}"
        )));
    }
    let (name, rest) = rest.split_at_checked(name_len).ok_or_else(short)?;
    let tenant = std::str::from_utf8(name)
        .map_err(|_| bad("the tenant name is not UTF-8".to_owned()))
        .and_then(|name| TenantId::new(name).map_err(|e| bad(e.to_string())))?;
    let (created, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (count, entries) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let count = u32::from_be_bytes(*count);
    if count > MAX_BUNDLE_KEYS {
        return Err(bad(format!(
            "{count} backup keys; at most {MAX_BUNDLE_KEYS} are allowed"
        )));
    }
    let count = count as usize;
    if entries.len() != count * BUNDLE_ENTRY_LEN {
        return Err(bad(format!(
            "{count} backup keys take {} bytes, not {}",
            count * BUNDLE_ENTRY_LEN,
            entries.len()
        )));
    }
    let mut backup_keys = Vec::with_capacity(count);
    let mut seen = HashSet::with_capacity(count);
    for entry in entries.chunks_exact(BUNDLE_ENTRY_LEN) {
        let (id, key_bytes) = entry.split_at(BACKUP_ID_LEN);
        let id = BackupId(id.try_into().expect("an entry starts with a backup id"));
        if !seen.insert(id) {
            return Err(bad(format!("backup {id} is listed twice")));
        }
        let mut key = KeyBytes::zeroed();
        key.expose_mut().copy_from_slice(key_bytes);
        backup_keys.push((id, BackupKey { key }));
    }
    Ok(TenantBundle {
        tenant,
        created: u64::from_be_bytes(*created),
        backup_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeploymentSalt, TenantSeed};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn id(byte: u8) -> BackupId {
        BackupId::from_bytes([byte; BACKUP_ID_LEN])
    }

    fn dek(version: u32, byte: u8) -> DataKey {
        DataKey::from_bytes(KeyVersion(version), Zeroizing::new([byte; KEY_LEN]))
    }

    fn master(id: u8, byte: u8) -> MasterKey {
        MasterKey::from_bytes(
            KeyId::from_bytes([id; KEY_ID_LEN]),
            0,
            Zeroizing::new([byte; KEY_LEN]),
        )
    }

    fn kek(tenant: &str, version: u32, seed: u8) -> TenantKek {
        master(1, 0x42).tenant_kek(
            &DeploymentSalt::from_bytes([3; 32]),
            &TenantId::new(tenant).unwrap(),
            &TenantSeed::from_bytes(Zeroizing::new([seed; 32])),
            KeyVersion(version),
        )
    }

    fn bundle(keys: usize) -> TenantBundle {
        TenantBundle {
            tenant: TenantId::new("acme").unwrap(),
            created: 1_700_000_000,
            backup_keys: (0..keys)
                .map(|i| (id(i as u8), BackupKey::generate().unwrap()))
                .collect(),
        }
    }

    fn same_keys(a: &TenantBundle, b: &TenantBundle) -> bool {
        a.tenant == b.tenant
            && a.created == b.created
            && a.backup_keys.len() == b.backup_keys.len()
            && a.backup_keys
                .iter()
                .zip(&b.backup_keys)
                .all(|((ia, ka), (ib, kb))| ia == ib && ka.expose_secret() == kb.expose_secret())
    }

    /// Seals arbitrary content the way `seal_to_recipient` seals a bundle's, to
    /// check what a reader does with content no writer of this build makes.
    fn seal_raw_to(recipient: &MasterKey, content: &[u8]) -> Vec<u8> {
        let mut out = bundle_prefix(PROTECTION_RECIPIENT);
        out.extend_from_slice(recipient.id().as_bytes());
        out.extend_from_slice(&[9; RECIPIENT_SALT_LEN]);
        let aead = recipient_sealing_key(recipient, &[9; RECIPIENT_SALT_LEN]);
        out.extend_from_slice(&[0; NONCE_LEN]);
        out.extend_from_slice(&((content.len() + TAG_LEN) as u32).to_be_bytes());
        let mut sealed = content.to_vec();
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; NONCE_LEN]),
                Aad::from(out.as_slice()),
                &mut sealed,
            )
            .unwrap();
        out.extend_from_slice(&sealed);
        out.extend_from_slice(tag.as_ref());
        out
    }

    #[test]
    fn backup_id_displays_and_parses_as_hex() {
        let backup = BackupId::from_bytes(
            *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\xff",
        );
        assert_eq!(backup.to_string(), "000102030405060708090a0b0c0d0eff");
        assert_eq!(
            format!("{backup:?}"),
            "BackupId(000102030405060708090a0b0c0d0eff)"
        );
        assert_eq!(backup.to_string().parse::<BackupId>().unwrap(), backup);
        assert_eq!(
            "000102030405060708090A0B0C0D0EFF"
                .parse::<BackupId>()
                .unwrap(),
            backup
        );
        for bad in [
            "",
            "00",
            "zz0102030405060708090a0b0c0d0eff",
            "000102030405060708090a0b0c0d0eff00",
        ] {
            assert_eq!(bad.parse::<BackupId>(), Err(BackupIdParseError), "{bad}");
        }
        assert_eq!(
            BackupIdParseError.to_string(),
            "a backup id is 32 hexadecimal digits"
        );
        assert_ne!(BackupId::generate().unwrap(), BackupId::generate().unwrap());
    }

    #[test]
    fn generated_backup_keys_differ() {
        let a = BackupKey::generate().unwrap();
        let b = BackupKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn dek_wrap_round_trips_with_fresh_nonces() {
        let key = BackupKey::generate().unwrap();
        let d = DataKey::generate(KeyVersion(3)).unwrap();
        let wrapped = key.wrap_dek(&id(1), &d).unwrap();
        assert_eq!(wrapped.len(), 60);
        assert_ne!(key.wrap_dek(&id(1), &d).unwrap(), wrapped);
        let back = key.unwrap_dek(&id(1), KeyVersion(3), &wrapped).unwrap();
        assert_eq!(back.expose_secret(), d.expose_secret());
        assert_eq!(back.version(), KeyVersion(3));
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == d.expose_secret()));
    }

    /// The layout and associated data spelled out from `docs/FORMAT.md` open
    /// with ring directly.
    #[test]
    fn dek_wrap_layout_matches_format_doc() {
        let key = BackupKey::from_bytes(&[0x07; KEY_LEN]);
        let wrapped = key.wrap_dek(&id(0xb1), &dek(0x0102_0304, 0x5a)).unwrap();
        let mut aad = Vec::new();
        aad.extend_from_slice(&23u32.to_be_bytes());
        aad.extend_from_slice(b"blockseal/v1/backup-dek");
        aad.extend_from_slice(&[0xb1; 16]);
        aad.extend_from_slice(&[1, 2, 3, 4]);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x07; 32]).unwrap());
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[..12]).unwrap();
        let mut sealed = wrapped[12..].to_vec();
        let plain = aead
            .open_in_place(nonce, Aad::from(&aad[..]), &mut sealed)
            .unwrap();
        assert_eq!(plain, &[0x5a; 32]);
    }

    #[test]
    fn dek_unwrap_with_the_wrong_key_id_or_version_fails_vaguely() {
        let key = BackupKey::generate().unwrap();
        let wrapped = key.wrap_dek(&id(1), &dek(2, 7)).unwrap();
        let backup = id(1).to_string();
        let e = BackupKey::generate()
            .unwrap()
            .unwrap_dek(&id(1), KeyVersion(2), &wrapped)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("data key failed to unwrap (backup {backup}, DEK v2)")
        );
        let e = key.unwrap_dek(&id(2), KeyVersion(2), &wrapped).unwrap_err();
        assert!(matches!(e, BackupKeyError::DataKeyFailed { backup, .. } if backup == id(2)));
        let e = key.unwrap_dek(&id(1), KeyVersion(3), &wrapped).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("data key failed to unwrap (backup {backup}, DEK v3)")
        );
        for i in 0..wrapped.len() {
            for bit in 0..8 {
                let mut bad = wrapped;
                bad[i] ^= 1 << bit;
                let e = key.unwrap_dek(&id(1), KeyVersion(2), &bad).unwrap_err();
                assert!(
                    matches!(e, BackupKeyError::DataKeyFailed { .. }),
                    "byte {i}"
                );
            }
        }
        for len in [0, 59, 61] {
            let mut bytes = wrapped.to_vec();
            bytes.resize(len, 0);
            let e = key.unwrap_dek(&id(1), KeyVersion(2), &bytes).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("wrapped data key of backup {backup} is {len} bytes long; expected 60")
            );
        }
    }

    /// Pinned values, computed independently with Python's hmac and hashlib:
    /// backup key 07 x 32, backup id 00 01 .. 0f.
    #[test]
    fn mac_key_known_answer() {
        let key = BackupKey::from_bytes(&[0x07; KEY_LEN]);
        let backup = BackupId::from_bytes(std::array::from_fn(|i| i as u8));
        // HKDF-SHA256(salt = empty, ikm = 07 x 32,
        //   info = u32 23 || "blockseal/v1/backup-mac" || 00 01 .. 0f), 32 bytes.
        let mut info = Vec::new();
        info.extend_from_slice(&23u32.to_be_bytes());
        info.extend_from_slice(b"blockseal/v1/backup-mac");
        info.extend_from_slice(backup.as_bytes());
        let mut mac_key = [0u8; 32];
        hkdf_sha256(&[], &[0x07; 32], &info, &mut mac_key);
        assert_eq!(hex(&mac_key), MAC_KEY_VECTOR);
        // HMAC-SHA256(that key, "blockseal backup trailer").
        let mac = key.mac(&backup, b"blockseal backup trailer");
        assert_eq!(hex(&mac), MAC_VECTOR);
    }

    const MAC_KEY_VECTOR: &str = "78bbd5411a6aea6ef29e4d48768c0ceae3c340613055869c4d3bd38cc367ac54";
    const MAC_VECTOR: &str = "f980425f6513241fd75aef9c2128f6f2a55c41a0eb0f40853a66abb4262a2f7b";

    #[test]
    fn mac_depends_on_key_id_and_data_and_verify_is_exact() {
        let key = BackupKey::generate().unwrap();
        let mac = key.mac(&id(1), b"trailer");
        assert_eq!(mac, key.mac(&id(1), b"trailer"));
        assert!(key.verify_mac(&id(1), b"trailer", &mac));
        assert!(!key.verify_mac(&id(2), b"trailer", &mac));
        assert!(!key.verify_mac(&id(1), b"trailes", &mac));
        assert!(!key.verify_mac(&id(1), b"trailer", &mac[..31]));
        assert!(
            !BackupKey::generate()
                .unwrap()
                .verify_mac(&id(1), b"trailer", &mac)
        );
        for i in 0..mac.len() {
            let mut bad = mac;
            bad[i] ^= 1;
            assert!(!key.verify_mac(&id(1), b"trailer", &bad));
        }
        // The MAC key is neither the backup key nor an HMAC under it.
        let plain = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret()),
            b"trailer",
        );
        assert_ne!(plain.as_ref(), &mac);
    }

    #[test]
    fn backup_key_wrap_round_trips_and_records_the_kek_version() {
        let k = kek("acme", 7, 0);
        let key = BackupKey::generate().unwrap();
        let wrapped = k.wrap_backup_key(&id(1), &key).unwrap();
        assert_eq!(wrapped.len(), 65);
        assert_eq!(wrapped[0], 1);
        assert_eq!(&wrapped[1..5], &[0, 0, 0, 7]);
        assert_eq!(
            wrapped_backup_key_kek_version(&wrapped),
            Some(KeyVersion(7))
        );
        assert_ne!(k.wrap_backup_key(&id(1), &key).unwrap(), wrapped);
        let back = k.unwrap_backup_key(&id(1), &wrapped).unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == key.expose_secret()));

        assert_eq!(wrapped_backup_key_kek_version(&wrapped[..64]), None);
        assert_eq!(wrapped_backup_key_kek_version(&[]), None);
        let mut future = wrapped;
        future[0] = 2;
        assert_eq!(wrapped_backup_key_kek_version(&future), None);
    }

    #[test]
    fn backup_key_wrap_layout_matches_format_doc() {
        let k = kek("acme", 0x0a0b_0c0d, 0);
        let key = BackupKey::from_bytes(&[0x6b; KEY_LEN]);
        let wrapped = k.wrap_backup_key(&id(0xc3), &key).unwrap();
        let mut aad = Vec::new();
        aad.extend_from_slice(&31u32.to_be_bytes());
        aad.extend_from_slice(b"blockseal/v1/wrapped-backup-key");
        aad.push(1);
        aad.extend_from_slice(&4u32.to_be_bytes());
        aad.extend_from_slice(b"acme");
        aad.extend_from_slice(&[0xc3; 16]);
        aad.extend_from_slice(&[0x0a, 0x0b, 0x0c, 0x0d]);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.expose_secret()).unwrap());
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[5..17]).unwrap();
        let mut sealed = wrapped[17..].to_vec();
        let plain = aead
            .open_in_place(nonce, Aad::from(&aad[..]), &mut sealed)
            .unwrap();
        assert_eq!(plain, &[0x6b; 32]);
    }

    #[test]
    fn backup_key_unwrap_with_any_wrong_binding_fails_vaguely() {
        let k = kek("acme", 1, 0);
        let wrapped = k
            .wrap_backup_key(&id(1), &BackupKey::generate().unwrap())
            .unwrap();
        let backup = id(1).to_string();
        let expected =
            format!("backup key failed to unwrap (tenant acme, backup {backup}, KEK v1)");
        // Another seed (same tenant and version), another KEK version, another backup.
        let e = kek("acme", 1, 1)
            .unwrap_backup_key(&id(1), &wrapped)
            .unwrap_err();
        assert_eq!(e.to_string(), expected);
        let e = kek("acme", 2, 0)
            .unwrap_backup_key(&id(1), &wrapped)
            .unwrap_err();
        assert_eq!(e.to_string(), expected);
        let e = k.unwrap_backup_key(&id(2), &wrapped).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "backup key failed to unwrap (tenant acme, backup {}, KEK v1)",
                id(2)
            )
        );
        // Another tenant whose KEK bytes happen to match cannot open it either:
        // the tenant is bound by the associated data.
        let other = TenantKek::new(
            TenantId::new("evil").unwrap(),
            KeyVersion(1),
            Zeroizing::new(*k.expose_secret()),
        );
        let e = other.unwrap_backup_key(&id(1), &wrapped).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("backup key failed to unwrap (tenant evil")
        );
        // Every flipped bit.
        for i in 0..wrapped.len() {
            for bit in 0..8 {
                let mut bad = wrapped;
                bad[i] ^= 1 << bit;
                let e = k.unwrap_backup_key(&id(1), &bad).unwrap_err();
                if i == 0 {
                    assert!(matches!(e, BackupKeyError::UnknownFormat { .. }), "{e}");
                } else {
                    assert!(matches!(e, BackupKeyError::BackupKeyFailed { .. }), "{e}");
                }
            }
        }
        let mut future = wrapped;
        future[0] = 2;
        assert_eq!(
            k.unwrap_backup_key(&id(1), &future)
                .unwrap_err()
                .to_string(),
            format!(
                "wrapped backup key of backup {backup} has format version 2; this build reads \
                 version 1"
            )
        );
        for len in [0, 64, 66] {
            let mut bytes = wrapped.to_vec();
            bytes.resize(len, 0);
            let e = k.unwrap_backup_key(&id(1), &bytes).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("wrapped backup key of backup {backup} is {len} bytes long; expected 65")
            );
        }
    }

    #[test]
    fn bundle_sealed_to_a_recipient_round_trips() {
        let b = bundle(3);
        let m = master(5, 0x11);
        let sealed = b.seal_to_recipient(&m).unwrap();
        assert_eq!(sealed.len(), 76 + 4 + 4 + 8 + 4 + 3 * 48 + 16);
        assert_eq!(&sealed[..8], b"BSBUNDLE");
        assert_eq!(&sealed[8..12], &[0, 1, 2, 0]);
        assert_eq!(&sealed[12..28], &[5; 16]);
        assert_ne!(
            b.seal_to_recipient(&m).unwrap(),
            sealed,
            "fresh salt and nonce"
        );
        assert_eq!(
            TenantBundle::inspect(&sealed).unwrap(),
            BundleProtection::Recipient(m.id())
        );
        let opened = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&m)).unwrap();
        assert!(same_keys(&b, &opened));
        assert_eq!(
            opened.backup_key(&id(2)).unwrap().expose_secret(),
            b.backup_keys[2].1.expose_secret()
        );
        assert!(opened.backup_key(&id(9)).is_none());
        for (_, key) in &b.backup_keys {
            assert!(!sealed.windows(KEY_LEN).any(|w| w == key.expose_secret()));
        }
        // An empty bundle too.
        let empty = bundle(0);
        let sealed = empty.seal_to_recipient(&m).unwrap();
        let opened = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&m)).unwrap();
        assert!(same_keys(&empty, &opened));
    }

    /// The recipient sealing key, spelled out from the documented encoding.
    #[test]
    fn recipient_sealing_key_known_answer() {
        let m = master(5, 0x11);
        let b = bundle(1);
        let sealed = b.seal_to_recipient(&m).unwrap();
        let mut info = Vec::new();
        info.extend_from_slice(&29u32.to_be_bytes());
        info.extend_from_slice(b"blockseal/v1/bundle-recipient");
        let mut key = [0u8; 32];
        hkdf_sha256(&sealed[28..60], &[0x11; 32], &info, &mut key);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
        let nonce = Nonce::try_assume_unique_for_key(&sealed[60..72]).unwrap();
        let len = u32::from_be_bytes(sealed[72..76].try_into().unwrap()) as usize;
        assert_eq!(len, sealed.len() - 76);
        let mut content = sealed[76..].to_vec();
        let plain = aead
            .open_in_place(nonce, Aad::from(&sealed[..76]), &mut content)
            .unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&4u32.to_be_bytes());
        expected.extend_from_slice(b"acme");
        expected.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(b.backup_keys[0].1.expose_secret());
        assert_eq!(plain, &expected[..]);
    }

    #[test]
    fn bundle_sealed_under_a_passphrase_round_trips() {
        let b = bundle(2);
        let p = Passphrase::new("correct horse".to_owned());
        let sealed = b.seal_with_passphrase(&p, Argon2Params::CHEAPEST).unwrap();
        assert_eq!(sealed.len(), 56 + 4 + 4 + 8 + 4 + 2 * 48 + 16);
        assert_eq!(&sealed[8..12], &[0, 1, 1, 0]);
        assert_eq!(&sealed[12..16], &47104u32.to_be_bytes());
        assert_eq!(&sealed[16..20], &1u32.to_be_bytes());
        assert_eq!(&sealed[20..24], &1u32.to_be_bytes());
        let protection = TenantBundle::inspect(&sealed).unwrap();
        assert_eq!(
            protection,
            BundleProtection::Passphrase(Argon2Params::CHEAPEST)
        );
        assert_eq!(
            protection.to_string(),
            "passphrase (Argon2id, m=47104 KiB, t=1, p=1)"
        );
        let opened = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&p)).unwrap();
        assert!(same_keys(&b, &opened));

        let wrong = Passphrase::new("correct horsf".to_owned());
        let e = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&wrong)).unwrap_err();
        assert!(matches!(e, BundleError::WrongPassphrase), "{e:?}");
        assert_eq!(
            e.to_string(),
            "wrong passphrase for tenant bundle, or the bundle is damaged"
        );
        let e = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&master(1, 1))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant bundle is protected by a passphrase, but a master key was given"
        );
        // Changing the Argon2 parameters or salt in the header fails too.
        let mut bad = sealed.clone();
        bad[27] ^= 1;
        let e = TenantBundle::open(&bad, &BundleOpener::Passphrase(&p)).unwrap_err();
        assert!(matches!(e, BundleError::WrongPassphrase), "{e:?}");
    }

    #[test]
    fn bundle_refuses_other_recipients_and_openers() {
        let b = bundle(1);
        let m = master(5, 0x11);
        let sealed = b.seal_to_recipient(&m).unwrap();
        let other = master(6, 0x11);
        let e = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&other)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant bundle is for master key 05050505050505050505050505050505, not key \
             06060606060606060606060606060606"
        );
        // The recipient's id with other key bytes: vague, names the id.
        let forged = master(5, 0x12);
        let e = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&forged)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant bundle failed to open with master key 05050505050505050505050505050505: the \
             bundle is damaged or forged, or the key is"
        );
        let p = Passphrase::new("x".to_owned());
        let e = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&p)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant bundle is sealed to master key 05050505050505050505050505050505, but a \
             passphrase was given"
        );
    }

    /// Every flipped bit of a bundle sealed to a recipient fails, with an error
    /// naming the header field when it is one the reader checks.
    #[test]
    fn every_flipped_bit_of_a_recipient_bundle_fails() {
        let b = bundle(2);
        let m = master(5, 0x11);
        let sealed = b.seal_to_recipient(&m).unwrap();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                let e = TenantBundle::open(&bad, &BundleOpener::MasterKey(&m)).unwrap_err();
                let ok = match i {
                    0..8 => matches!(e, BundleError::BadMagic),
                    8..10 => matches!(e, BundleError::UnsupportedVersion { .. }),
                    10 | 11 => matches!(e, BundleError::BadHeader { .. }),
                    12..28 => matches!(e, BundleError::OtherRecipient { .. }),
                    72..76 => matches!(
                        e,
                        BundleError::BadHeader { .. }
                            | BundleError::Truncated { .. }
                            | BundleError::TrailingBytes { .. }
                    ),
                    _ => matches!(e, BundleError::WrongMasterKey { .. }),
                };
                assert!(ok, "byte {i} bit {bit}: {e:?}");
                let text = format!("{e} {e:?}");
                for (_, key) in &b.backup_keys {
                    assert!(!text.contains(&hex(key.expose_secret())));
                }
            }
        }
    }

    /// Every byte of a passphrase bundle, flipped, fails (each try runs Argon2id
    /// at the cheapest parameters, so one bit per byte).
    #[test]
    fn every_flipped_byte_of_a_passphrase_bundle_fails() {
        let b = bundle(1);
        let p = Passphrase::new("hunter2".to_owned());
        let sealed = b.seal_with_passphrase(&p, Argon2Params::CHEAPEST).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x80;
            let e = TenantBundle::open(&bad, &BundleOpener::Passphrase(&p)).unwrap_err();
            let ok = match i {
                0..8 => matches!(e, BundleError::BadMagic),
                8..10 => matches!(e, BundleError::UnsupportedVersion { .. }),
                10 | 11 => matches!(e, BundleError::BadHeader { .. }),
                // Memory 47104 KiB (00 00 b8 00) with its last byte flipped is
                // 47232 KiB, still in range: a different key.
                15 => matches!(e, BundleError::WrongPassphrase),
                12..24 => matches!(e, BundleError::Argon2Params { .. }),
                52..56 => matches!(
                    e,
                    BundleError::BadHeader { .. } | BundleError::Truncated { .. }
                ),
                _ => matches!(e, BundleError::WrongPassphrase),
            };
            assert!(ok, "byte {i}: {e:?}");
        }
    }

    #[test]
    fn truncated_and_extended_bundles_are_refused() {
        let m = master(5, 0x11);
        let sealed = bundle(1).seal_to_recipient(&m).unwrap();
        let full = sealed.len();
        for len in 0..full {
            let e = TenantBundle::open(&sealed[..len], &BundleOpener::MasterKey(&m)).unwrap_err();
            let expected = match len {
                0 => {
                    assert!(matches!(e, BundleError::BadMagic), "{e:?}");
                    continue;
                }
                1..12 => 12,
                12..76 => 76,
                _ => full,
            };
            assert_eq!(
                e.to_string(),
                format!("tenant bundle is truncated: {len} bytes, expected {expected}")
            );
            assert!(TenantBundle::inspect(&sealed[..len]).is_err());
        }
        let mut long = sealed.clone();
        long.push(0);
        assert_eq!(
            TenantBundle::open(&long, &BundleOpener::MasterKey(&m))
                .unwrap_err()
                .to_string(),
            format!(
                "tenant bundle has trailing bytes: {} bytes, expected {full}",
                full + 1
            )
        );
    }

    #[test]
    fn header_errors_are_specific() {
        let m = master(5, 0x11);
        let sealed = bundle(0).seal_to_recipient(&m).unwrap();
        let open = |bytes: &[u8]| {
            TenantBundle::open(bytes, &BundleOpener::MasterKey(&m))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            open(b"BSEALKEY and then some"),
            "not a blockseal tenant bundle (bad magic)"
        );
        assert_eq!(
            open(b"BSB"),
            "tenant bundle is truncated: 3 bytes, expected 12"
        );
        let mut v = sealed.clone();
        v[9] = 2;
        assert_eq!(
            open(&v),
            "tenant bundle has format version 2; this build reads version 1"
        );
        let mut v = sealed.clone();
        v[10] = 3;
        assert_eq!(
            open(&v),
            "tenant bundle has a bad header: unknown protection 3"
        );
        let mut v = sealed.clone();
        v[11] = 1;
        assert_eq!(
            open(&v),
            "tenant bundle has a bad header: reserved byte is 0x01, not 0"
        );
        // A content length past the bound is refused before anything is read or
        // allocated.
        let mut v = sealed.clone();
        v[72..76].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            open(&v),
            "tenant bundle has a bad header: content length 4294967295 is outside \
             33..=48000095"
        );
        let mut v = sealed.clone();
        v[72..76].copy_from_slice(&32u32.to_be_bytes());
        assert!(open(&v).contains("content length 32 is outside"));
    }

    #[test]
    fn argon2_parameters_are_checked_before_any_work() {
        let b = bundle(0);
        let p = Passphrase::new("pw".to_owned());
        let sealed = b.seal_with_passphrase(&p, Argon2Params::CHEAPEST).unwrap();
        for (at, value, message) in [
            (12, 2 * 1024 * 1024 + 1, "Argon2id memory must be between"),
            (12, 1024, "Argon2id memory must be between"),
            (16, 5, "Argon2id iterations must be between 1 and 4; got 5"),
            (
                20,
                17,
                "Argon2id parallelism must be between 1 and 16; got 17",
            ),
        ] {
            let mut bad = sealed.clone();
            bad[at..at + 4].copy_from_slice(&u32::to_be_bytes(value));
            let e = TenantBundle::open(&bad, &BundleOpener::Passphrase(&p)).unwrap_err();
            let BundleError::Argon2Params { source } = &e else {
                panic!("{e:?}");
            };
            assert!(source.to_string().starts_with(message), "{source}");
            assert!(TenantBundle::inspect(&bad).is_err());
        }
        // Sealing holds the same ranges, and refuses an empty passphrase.
        let weak = Argon2Params::for_existing_file(1024, 1, 1).unwrap();
        assert!(matches!(
            b.seal_with_passphrase(&p, weak),
            Err(BundleError::Argon2Params { .. })
        ));
        assert!(matches!(
            b.seal_with_passphrase(&Passphrase::new(String::new()), Argon2Params::CHEAPEST),
            Err(BundleError::EmptyPassphrase)
        ));
    }

    #[test]
    fn duplicate_backups_are_refused_when_sealing() {
        let mut b = bundle(2);
        b.backup_keys.push((id(1), BackupKey::generate().unwrap()));
        let e = b.seal_to_recipient(&master(1, 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("backup {} is listed twice in the tenant bundle", id(1))
        );
    }

    /// Content that opens but that no writer of this build makes: every field
    /// is checked before anything is allocated for it.
    #[test]
    fn malformed_content_is_refused_after_opening() {
        let m = master(5, 0x11);
        let content = |name: &[u8], count: u32, entries: &[u8]| {
            let mut c = Vec::new();
            c.extend_from_slice(&(name.len() as u32).to_be_bytes());
            c.extend_from_slice(name);
            c.extend_from_slice(&7u64.to_be_bytes());
            c.extend_from_slice(&count.to_be_bytes());
            c.extend_from_slice(entries);
            c
        };
        let open = |c: &[u8]| {
            TenantBundle::open(&seal_raw_to(&m, c), &BundleOpener::MasterKey(&m))
                .map_err(|e| e.to_string())
        };
        let entry = |byte: u8| [[byte; 16].as_slice(), &[0xee; 32]].concat();
        // Well formed, as a check on the helper.
        let ok = open(&content(b"acme", 1, &entry(1))).unwrap();
        assert_eq!(ok.created, 7);
        assert_eq!(ok.backup_keys[0].1.expose_secret(), &[0xee; 32]);

        let prefix = "tenant bundle opened but its content is malformed: ";
        let cases: Vec<(Vec<u8>, String)> = vec![
            (
                content(b"acme", MAX_BUNDLE_KEYS + 1, &[]),
                "1000001 backup keys; at most 1000000 are allowed".to_owned(),
            ),
            (
                content(b"acme", 2, &entry(1)),
                "2 backup keys take 96 bytes, not 48".to_owned(),
            ),
            (
                content(b"acme", 1, &[entry(1), vec![0]].concat()),
                "1 backup keys take 48 bytes, not 49".to_owned(),
            ),
            (
                content(b"acme", 2, &[entry(1), entry(1)].concat()),
                format!("backup {} is listed twice", id(1)),
            ),
            (
                content(b"Acme", 0, &[]),
                "tenant name \"Acme\" is invalid: use lowercase letters, digits, '-', '_' and \
                 '.', starting with a letter or digit"
                    .to_owned(),
            ),
            (
                content(&[0xff], 0, &[]),
                "the tenant name is not UTF-8".to_owned(),
            ),
            (
                content(&[b'a'; 64], 0, &[]),
                "tenant name length 64 is over 63".to_owned(),
            ),
        ];
        for (c, reason) in cases {
            assert_eq!(open(&c).unwrap_err(), format!("{prefix}{reason}"));
        }
        // A name length past the content: every short read is caught. (17 bytes
        // is the least a header admits.)
        let mut c = content(b"acme", 0, &[]);
        c[..4].copy_from_slice(&60u32.to_be_bytes());
        c.resize(17, 0);
        assert_eq!(
            open(&c).unwrap_err(),
            format!("{prefix}17 bytes end before its fields do")
        );
    }

    #[test]
    fn debug_and_errors_never_show_key_bytes() {
        let key = BackupKey::generate().unwrap();
        let secret = hex(key.expose_secret());
        let decimal = format!("{:?}", key.expose_secret());
        let b = TenantBundle {
            tenant: TenantId::new("acme").unwrap(),
            created: 1,
            backup_keys: vec![(id(1), key)],
        };
        let p = Passphrase::new(secret.clone());
        let m = master(5, 0x11);
        let texts = [
            format!("{:?} {:#?}", b.backup_keys[0].1, b.backup_keys[0].1),
            format!("{b:?} {b:#?}"),
            format!("{:?}", BundleOpener::Passphrase(&p)),
            format!("{:?}", BundleOpener::MasterKey(&m)),
        ];
        for text in &texts {
            assert!(!text.contains(&secret), "{text}");
            assert!(!text.contains(&decimal), "{text}");
        }
        assert_eq!(
            format!("{b:?}"),
            "TenantBundle { tenant: TenantId(\"acme\"), backup_keys: 1, .. }"
        );
        assert_eq!(format!("{:?}", b.backup_keys[0].1), "BackupKey { .. }");
    }

    proptest::proptest! {
        /// Arbitrary bytes after a valid recipient header prefix (the reader's
        /// hardest path short of a forged tag) never panic and never open.
        #[test]
        fn arbitrary_bundles_never_open(
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            whole in proptest::prelude::any::<bool>(),
        ) {
            let m = master(5, 0x11);
            let mut bytes = if whole { Vec::new() } else {
                let mut prefix = bundle_prefix(PROTECTION_RECIPIENT);
                prefix.extend_from_slice(&[5; KEY_ID_LEN]);
                prefix
            };
            bytes.extend_from_slice(&rest);
            proptest::prop_assert!(TenantBundle::open(&bytes, &BundleOpener::MasterKey(&m)).is_err());
            let _ = TenantBundle::inspect(&bytes);
            let k = kek("acme", 1, 0);
            proptest::prop_assert!(k.unwrap_backup_key(&id(1), &rest).is_err());
            let key = BackupKey::from_bytes(&[1; KEY_LEN]);
            proptest::prop_assert!(key.unwrap_dek(&id(1), KeyVersion(1), &rest).is_err());
        }
    }

    #[test]
    fn labels_and_lengths_are_as_documented() {
        assert_eq!(WRAPPED_BACKUP_DEK_LEN, 60);
        assert_eq!(WRAPPED_BACKUP_KEY_LEN, 65);
        assert_eq!(
            BUNDLE_PREFIX_LEN + PASSPHRASE_PARAMS_LEN + NONCE_LEN + 4,
            56
        );
        assert_eq!(BUNDLE_PREFIX_LEN + RECIPIENT_PARAMS_LEN + NONCE_LEN + 4, 76);
        assert_eq!(MIN_SEALED_LEN, 33);
        assert_eq!(MAX_SEALED_LEN, 48_000_095);
    }
}
