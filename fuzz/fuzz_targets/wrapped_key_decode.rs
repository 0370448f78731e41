//! `WrappedKey::from_bytes` on arbitrary bytes.
//!
//! Decoding must never panic; whatever decodes must encode back to exactly the
//! input (the format has no slack: fixed length, every byte meaningful), and
//! unwrapping it under an unrelated KEK must fail cleanly.
#![no_main]

use std::sync::LazyLock;

use blockseal_keys::{
    DeploymentSalt, KEY_ID_LEN, KeyId, KeyVersion, MasterKey, SEED_LEN, TenantId, TenantKek,
    TenantSeed, VolumeId, WRAPPED_KEY_FORMAT, WRAPPED_KEY_LEN, WrappedKey, Zeroizing,
};
use libfuzzer_sys::fuzz_target;

static KEK: LazyLock<TenantKek> = LazyLock::new(|| {
    let master = MasterKey::from_bytes(
        KeyId::from_bytes([1; KEY_ID_LEN]),
        0,
        Zeroizing::new([7; 32]),
    );
    master.tenant_kek(
        &DeploymentSalt::from_bytes([3; SEED_LEN]),
        &TenantId::new("fuzz").expect("valid name"),
        &TenantSeed::from_bytes(Zeroizing::new([5; SEED_LEN])),
        KeyVersion(1),
    )
});

fuzz_target!(|data: &[u8]| {
    match WrappedKey::from_bytes(data) {
        Ok(wrapped) => {
            assert_eq!(data.len(), WRAPPED_KEY_LEN);
            assert_eq!(
                wrapped.to_bytes(),
                data,
                "decode then encode changed the bytes"
            );
            let volume = VolumeId::new("keys").expect("valid name");
            // A genuine blob for this KEK would need a forged GCM tag.
            assert!(KEK.unwrap(&volume, &wrapped).is_err());
            let _ = format!("{wrapped:?}");
        }
        Err(e) => {
            assert!(data.len() != WRAPPED_KEY_LEN || data[0] != WRAPPED_KEY_FORMAT);
            assert!(!e.to_string().is_empty());
        }
    }
});
