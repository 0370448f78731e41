//! blockseal-keys: the key hierarchy of blockseal.
//!
//! - A [`MasterKey`] (256 bits) per deployment, kept in a key file that is either
//!   mode 0600 or sealed under a [`Passphrase`] with Argon2id
//!   ([`create_key_file`], [`load_key_file`], [`inspect_key_file`]).
//! - A [`TenantKek`] per tenant and KEK version, derived from the master key with
//!   HKDF-SHA256 ([`MasterKey::tenant_kek`]). The derivation takes a secret
//!   [`TenantSeed`]: destroying it crypto-shreds the tenant.
//! - A random [`DataKey`] per volume and DEK version, stored only as a
//!   [`WrappedKey`] sealed with AES-256-GCM under the tenant KEK.
//! - An [`AuditKey`] per store that chains its audit log (HMAC-SHA256), stored
//!   only wrapped under an [`AuditKek`] derived from the master key
//!   ([`MasterKey::audit_kek`]).
//! - A random [`BackupKey`] per backup, named by a [`BackupId`], that seals the
//!   backed-up data keys and authenticates the backup file, stored only wrapped
//!   under the tenant KEK ([`TenantKek::wrap_backup_key`]) and carried to another
//!   host in a [`TenantBundle`] sealed under a passphrase or to a master key.
//!
//! Every secret type zeroizes on drop and has a `Debug` that shows ids and versions
//! only; key bytes are reached through `expose_secret` methods, so searching for that
//! name lists every use. No error message or log line holds key material. The crate
//! does no I/O other than reading and writing key files, and nothing async. Byte
//! layouts are documented in `docs/FORMAT.md`.
//!
//! ```
//! use blockseal_keys::{
//!     Argon2Params, DataKey, DeploymentSalt, KeyVersion, MasterKey, Passphrase, TenantId,
//!     TenantSeed, VolumeId, create_key_file_with_params, load_key_file,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("master.key");
//!
//! // Generate a master key and keep it in a passphrase-protected key file.
//! // (The cheapest Argon2id parameters for the example; real files use the defaults.)
//! let master = MasterKey::generate()?;
//! let passphrase = Passphrase::new("correct horse battery staple".to_owned());
//! let params = Argon2Params::CHEAPEST;
//! create_key_file_with_params(&path, &master, Some(&passphrase), params)?;
//! let master = load_key_file(&path, Some(&passphrase))?;
//!
//! // Derive a tenant's KEK, then wrap and unwrap a volume's data key.
//! let salt = DeploymentSalt::generate()?;
//! let tenant = TenantId::new("acme")?;
//! let seed = TenantSeed::generate()?;
//! let kek = master.tenant_kek(&salt, &tenant, &seed, KeyVersion::FIRST);
//!
//! let volume = VolumeId::new("voicemail")?;
//! let dek = DataKey::generate(KeyVersion::FIRST)?;
//! let stored = kek.wrap(&volume, &dek)?.to_bytes();
//! let unwrapped = kek.unwrap(&volume, &blockseal_keys::WrappedKey::from_bytes(&stored)?)?;
//! assert_eq!(unwrapped.expose_secret(), dek.expose_secret());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod audit;
mod backup;
mod catalog;
mod data_key;
mod envelope;
mod hkdf;
mod ids;
mod key_file;
mod locked;
mod master;
mod tenant;

pub use audit::{
    AUDIT_MAC_LEN, AuditKek, AuditKey, AuditKeyUnwrapError, WRAPPED_AUDIT_KEY_FORMAT,
    WRAPPED_AUDIT_KEY_LEN,
};
pub use backup::{
    BACKUP_ID_LEN, BACKUP_MAC_LEN, BUNDLE_MAGIC, BUNDLE_VERSION, BackupId, BackupIdParseError,
    BackupKey, BackupKeyError, BundleError, BundleOpener, BundleProtection, MAX_BUNDLE_KEYS,
    TenantBundle, WRAPPED_BACKUP_DEK_LEN, WRAPPED_BACKUP_KEY_FORMAT, WRAPPED_BACKUP_KEY_LEN,
    wrapped_backup_key_kek_version,
};
pub use catalog::{
    CATALOG_NONCE_LEN, CATALOG_SALT_LEN, CATALOG_TAG_LEN, CatalogKey, CatalogOpenError,
};
pub use data_key::{DataKey, KEY_LEN, RandomError, WRITER_SALT_LEN};
pub use envelope::{
    UnwrapError, WRAPPED_KEY_FORMAT, WRAPPED_KEY_LEN, WrappedKey, WrappedKeyDecodeError,
};
pub use ids::{KeyVersion, MAX_NAME_LEN, NameError, TenantId, VolumeId};
pub use key_file::{
    Argon2Params, Argon2ParamsError, KEY_FILE_MAGIC, KEY_FILE_VERSION, KeyFileError, KeyFileInfo,
    Passphrase, Protection, create_key_file, create_key_file_with_params, inspect_key_file,
    load_key_file,
};
pub use master::{
    CHECK_VALUE_LEN, CheckValue, KEY_ID_LEN, KeyId, KeyIdParseError, MasterKey, WrongMasterKey,
};
pub use tenant::{DeploymentSalt, SEED_LEN, TenantKek, TenantSeed};
/// Re-exported because key constructors take key bytes as `Zeroizing` arrays, and
/// so that callers can hold secrets without depending on `zeroize` themselves.
pub use zeroize::Zeroizing;

#[cfg(test)]
mod secret_debug_tests {
    use super::*;
    use zeroize::Zeroizing;

    /// Every way the bytes 0xA5 x 32 could show up in formatted output.
    fn assert_no_key_bytes(what: &str, text: &str) {
        let forbidden = [
            "a5a5".to_owned(),
            "A5A5".to_owned(),
            "165, 165".to_owned(),
            "165,\n".to_owned(),
            "0xa5".to_owned(),
            "\\xa5".to_owned(),
        ];
        for f in &forbidden {
            assert!(
                !text.contains(f.as_str()),
                "{what} Debug leaks {f:?}: {text}"
            );
        }
    }

    fn check<T: std::fmt::Debug>(what: &str, value: &T) {
        assert_no_key_bytes(what, &format!("{value:?}"));
        assert_no_key_bytes(what, &format!("{value:#?}"));
    }

    #[test]
    fn no_secret_type_debug_shows_its_bytes() {
        let bytes = || Zeroizing::new([0xA5u8; 32]);
        let master = MasterKey::from_bytes(KeyId::from_bytes([1; 16]), 7, bytes());
        check("MasterKey", &master);
        check("DataKey", &DataKey::from_bytes(KeyVersion(3), bytes()));
        check("TenantSeed", &TenantSeed::from_bytes(bytes()));
        let kek = TenantKek::new(TenantId::new("acme").unwrap(), KeyVersion(2), bytes());
        check("TenantKek", &kek);
        check(
            "AuditKek",
            &master.audit_kek(&DeploymentSalt::from_bytes([0xA5; 32])),
        );
        check("AuditKey", &AuditKey::generate().unwrap());
        let backup_key = || BackupKey::from_bytes(&[0xA5; 32]);
        check("BackupKey", &backup_key());
        check(
            "TenantBundle",
            &TenantBundle {
                tenant: TenantId::new("acme").unwrap(),
                created: 0,
                backup_keys: vec![(BackupId::from_bytes([0xA5; 16]), backup_key())],
            },
        );
        let passphrase = "\u{a5}".repeat(32);
        let p = Passphrase::new(passphrase.clone());
        assert!(!format!("{p:?}{p:#?}").contains(&passphrase));
        check("Passphrase", &p);

        // The ids and versions are what Debug is for.
        let text = format!("{master:?}");
        assert!(text.contains("01010101010101010101010101010101"), "{text}");
        assert!(format!("{kek:?}").contains("acme"));
    }
}
