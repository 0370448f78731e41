//! `TenantBundle::open` and `TenantBundle::inspect` on arbitrary bundles, with a
//! fixed recipient master key.
//!
//! The first byte picks a mode:
//! - even: the rest is the whole bundle;
//! - odd: a genuine bundle sealed to the fixed key, with one byte XORed:
//!   `position (u16 BE) || xor`.
//!
//! What must hold (layout in `docs/FORMAT.md`, "Tenant recovery bundle"):
//! - nothing panics, and no error message or `Debug` shows key bytes;
//! - the header is accepted exactly when magic, version, reserved byte,
//!   protection, content length, total length and Argon2id parameters are right,
//!   and inspect reports what the bytes say;
//! - a passphrase bundle is refused for a master key before any derivation, and
//!   a bundle for another key names both key ids;
//! - a bundle opens only when it is genuine and not one byte was changed, and
//!   then holds exactly the keys it was sealed with; sealing what opened opens
//!   again to the same keys.
#![no_main]

use std::sync::LazyLock;

use blockseal_keys::{
    Argon2Params, BUNDLE_MAGIC, BUNDLE_VERSION, BackupId, BackupKey, BundleError, BundleOpener,
    BundleProtection, KeyId, MasterKey, TenantBundle, TenantId, Zeroizing,
};
use libfuzzer_sys::fuzz_target;

const KEY_ID: [u8; 16] = [0x42; 16];
const KEY_BYTES: [u8; 32] = [0x5a; 32];
/// Shortest and longest sealed content (tag included), restated from
/// `docs/FORMAT.md`: a one-byte tenant and no keys; a 63-byte tenant and
/// 1,000,000 keys.
const MIN_SEALED: usize = 4 + 1 + 8 + 4 + 16;
const MAX_SEALED: usize = 4 + 63 + 8 + 4 + 1_000_000 * 48 + 16;

static RECIPIENT: LazyLock<MasterKey> = LazyLock::new(|| {
    MasterKey::from_bytes(KeyId::from_bytes(KEY_ID), 0, Zeroizing::new(KEY_BYTES))
});

/// Each backup id with the MAC its key gives over a fixed message: keys are
/// compared through what they compute, their bytes are not public.
type Fingerprint = Vec<(BackupId, [u8; 32])>;

/// The genuine bundle, and its keys' fingerprint.
static GENUINE: LazyLock<(Vec<u8>, Fingerprint)> = LazyLock::new(|| {
    let bundle = TenantBundle {
        tenant: TenantId::new("fuzz").expect("valid name"),
        created: 1_700_000_000,
        backup_keys: (1..=3u8)
            .map(|i| {
                let key = BackupKey::generate().expect("random backup key");
                (BackupId::from_bytes([i; 16]), key)
            })
            .collect(),
    };
    let sealed = bundle
        .seal_to_recipient(&RECIPIENT)
        .expect("seal the genuine bundle");
    (sealed, fingerprint(&bundle))
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        arbitrary_bundle(rest);
    } else {
        let (genuine, keys) = &*GENUINE;
        let mut bytes = genuine.clone();
        let position = rest
            .first_chunk::<2>()
            .map_or(0, |b| u16::from_be_bytes(*b));
        let xor = rest.get(2).copied().unwrap_or(0);
        bytes[usize::from(position) % genuine.len()] ^= xor;
        match open(&bytes) {
            Ok(bundle) => {
                assert_eq!(xor, 0, "a tampered bundle opened");
                assert_eq!(&fingerprint(&bundle), keys);
                let again = bundle
                    .seal_to_recipient(&RECIPIENT)
                    .expect("reseal an opened bundle");
                let reopened = open(&again).expect("a resealed bundle opens");
                assert_eq!(&fingerprint(&reopened), keys);
            }
            Err(e) => {
                assert_ne!(xor, 0, "the genuine bundle failed to open: {e}");
                check_message(&e);
            }
        }
    }
});

fn arbitrary_bundle(bytes: &[u8]) {
    let expected = expected_header(bytes);
    match (TenantBundle::inspect(bytes), expected) {
        (Ok(found), Some(expected)) => assert_eq!(found, expected),
        (Ok(found), None) => panic!("accepted a malformed header as {found:?}"),
        (Err(e), Some(_)) => panic!("refused a well-formed header: {e}"),
        (Err(e), None) => check_message(&e),
    }
    let opened = open(bytes);
    let e = match opened {
        // Forging the GCM tag is not something a fuzzer does.
        Ok(bundle) => panic!("an arbitrary bundle opened: {bundle:?}"),
        Err(e) => e,
    };
    check_message(&e);
    match expected {
        None => {}
        Some(BundleProtection::Passphrase(_)) => {
            assert!(matches!(e, BundleError::PassphraseRequired), "{e:?}");
        }
        Some(BundleProtection::Recipient(id)) if id == RECIPIENT.id() => {
            assert!(
                matches!(e, BundleError::WrongMasterKey { key } if key == id),
                "{e:?}"
            );
        }
        Some(BundleProtection::Recipient(id)) => assert!(
            matches!(e, BundleError::OtherRecipient { expected, actual }
                if expected == id && actual == RECIPIENT.id()),
            "{e:?}"
        ),
        Some(other) => panic!("unknown protection {other:?}"),
    }
}

fn open(bytes: &[u8]) -> Result<TenantBundle, BundleError> {
    TenantBundle::open(bytes, &BundleOpener::MasterKey(&RECIPIENT))
}

/// What the header must say, restated from `docs/FORMAT.md`, or `None` when the
/// bundle must be refused before anything is derived.
fn expected_header(b: &[u8]) -> Option<BundleProtection> {
    if b.len() < 12 || b[..8] != BUNDLE_MAGIC || b[8..10] != BUNDLE_VERSION.to_be_bytes() {
        return None;
    }
    if b[11] != 0 {
        return None;
    }
    let params_len = match b[10] {
        1 => 12 + 16,
        2 => 16 + 32,
        _ => return None,
    };
    let header_len = 12 + params_len + 12 + 4;
    if b.len() < header_len {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let sealed = word(header_len - 4) as usize;
    if !(MIN_SEALED..=MAX_SEALED).contains(&sealed) || b.len() != header_len + sealed {
        return None;
    }
    if b[10] == 1 {
        // What `key init` accepts: 46 MiB to 2 GiB, 1 to 4 passes, 1 to 16 lanes.
        let (m, t, p) = (word(12), word(16), word(20));
        let ok = (47_104..=2_097_152).contains(&m) && (1..=4).contains(&t) && (1..=16).contains(&p);
        if !ok {
            return None;
        }
        Some(BundleProtection::Passphrase(
            Argon2Params::new(m, t, p).expect("the restated ranges are the accepted ones"),
        ))
    } else {
        Some(BundleProtection::Recipient(KeyId::from_bytes(
            b[12..28].try_into().unwrap(),
        )))
    }
}

fn fingerprint(bundle: &TenantBundle) -> Fingerprint {
    bundle
        .backup_keys
        .iter()
        .map(|(id, key)| (*id, key.mac(id, b"blockseal fuzz")))
        .collect()
}

fn check_message(e: &BundleError) {
    let text = format!("{e} {e:?}");
    assert!(!text.is_empty());
    let key_hex: String = KEY_BYTES.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!text.contains(&key_hex), "an error shows the master key");
}
