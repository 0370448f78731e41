//! The master key file reader, on arbitrary file contents.
//!
//! Each input is written to a file (mode 0600, under `/dev/shm` when it exists)
//! and read back with the public `inspect_key_file` and `load_key_file`.
//! The first byte picks a mode:
//! - even: the rest is the whole file. It is inspected, loaded without a
//!   passphrase and, when its header asks for cheap Argon2id parameters, loaded
//!   with one (expensive parameters are only inspected, so the derivation is
//!   never fuzzed at full cost).
//! - odd: a genuine file with one byte XORed, `position (u16 BE) || xor || ...`:
//!   with `0x02` set an unprotected one (checked like an arbitrary file), else a
//!   passphrase-protected one (Argon2id at 1 MiB, one pass) followed by
//!   `right passphrase? || wrong passphrase`.
//!
//! What must hold (layout in `docs/FORMAT.md`, "Master key file"):
//! - nothing panics, and no error message contains the passphrase;
//! - the header is accepted exactly when magic, version, reserved byte,
//!   protection, length and Argon2id parameters are right, and what inspect
//!   reports is what the bytes say;
//! - an unprotected file loads only without a passphrase and only when its key
//!   matches the check value, and then writing that key to a new file gives back
//!   exactly the input;
//! - a protected file needs a passphrase, and opens only when the passphrase is
//!   right and not one byte was changed; it then holds the original key.
#![no_main]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use blockseal_keys::{
    Argon2Params, KEY_FILE_MAGIC, KEY_FILE_VERSION, KeyFileError, KeyId, MasterKey, Passphrase,
    Protection, Zeroizing, create_key_file, create_key_file_with_params, inspect_key_file,
    load_key_file,
};
use libfuzzer_sys::fuzz_target;

const PASSPHRASE: &str = "fuzz passphrase 7d1c";
const PLAIN_LEN: usize = 84;
const PROTECTED_LEN: usize = 124;

static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("blockseal-fuzz-key-file-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
});

/// The genuine protected file and the key it holds.
static GENUINE: LazyLock<(Vec<u8>, MasterKey)> = LazyLock::new(|| {
    let key = MasterKey::from_bytes(
        KeyId::from_bytes([0x11; 16]),
        1_700_000_000,
        Zeroizing::new([0x5a; 32]),
    );
    let path = DIR.join("genuine");
    // 1 MiB, one pass: weaker than `key init` writes, but a key file may ask for
    // it, and it keeps an iteration fast.
    let params = Argon2Params::for_existing_file(1024, 1, 1).expect("1 MiB, one pass, one lane");
    let passphrase = Passphrase::new(PASSPHRASE.into());
    create_key_file_with_params(&path, &key, Some(&passphrase), params)
        .expect("write the genuine key file");
    let bytes = fs::read(&path).expect("read the genuine key file");
    assert_eq!(bytes.len(), PROTECTED_LEN);
    (bytes, key)
});

/// A genuine unprotected file.
static GENUINE_PLAIN: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let key = MasterKey::from_bytes(
        KeyId::from_bytes([0x22; 16]),
        1_700_000_001,
        Zeroizing::new([0x6b; 32]),
    );
    let path = DIR.join("genuine-plain");
    create_key_file(&path, &key, None).expect("write the genuine key file");
    let bytes = fs::read(&path).expect("read the genuine key file");
    assert_eq!(bytes.len(), PLAIN_LEN);
    bytes
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        arbitrary_file(rest);
    } else if mode & 2 != 0 {
        let mut bytes = GENUINE_PLAIN.clone();
        let position = rest
            .first_chunk::<2>()
            .map_or(0, |b| u16::from_be_bytes(*b));
        let at = usize::from(position) % bytes.len();
        bytes[at] ^= rest.get(2).copied().unwrap_or(0);
        arbitrary_file(&bytes);
    } else {
        tampered_file(rest);
    }
});

fn arbitrary_file(bytes: &[u8]) {
    let path = write(bytes);
    let info = inspect_key_file(&path);
    let expected = expected_header(bytes);
    match &info {
        Ok(info) => {
            let (protection, key_id, created) = expected.expect("accepted a malformed header");
            assert_eq!(info.format_version, KEY_FILE_VERSION);
            assert_eq!(info.protection, protection);
            assert_eq!(info.key_id.as_bytes(), &key_id);
            assert_eq!(info.created, created);
            assert!(!info.mode_is_too_open());
        }
        Err(e) => {
            assert!(expected.is_none(), "refused a well-formed header: {e}");
            check_message(e);
        }
    }

    let loaded = load_key_file(&path, None);
    if let Err(e) = &loaded {
        check_message(e);
    }
    match info.as_ref().map(|i| i.protection) {
        Ok(Protection::None) => match loaded {
            Ok(master) => {
                let info = info.as_ref().unwrap();
                assert_eq!(master.id(), info.key_id);
                assert_eq!(master.created(), info.created);
                // Writing the same key again reproduces the file byte for byte.
                let again = DIR.join("again");
                let _ = fs::remove_file(&again);
                create_key_file(&again, &master, None).expect("write the loaded key");
                assert_eq!(
                    fs::read(&again).unwrap(),
                    bytes,
                    "key file did not round trip"
                );
            }
            Err(e) => assert!(matches!(e, KeyFileError::Damaged { .. }), "{e:?}"),
        },
        Ok(Protection::Argon2id(params)) => {
            assert!(matches!(
                loaded,
                Err(KeyFileError::PassphraseRequired { .. })
            ));
            if cheap(&params) {
                let passphrase = Passphrase::new(PASSPHRASE.into());
                match load_key_file(&path, Some(&passphrase)) {
                    // Forging the GCM tag is not something a fuzzer does.
                    Ok(_) => panic!("a forged protected key file opened"),
                    Err(e) => {
                        assert!(matches!(e, KeyFileError::WrongPassphrase { .. }), "{e:?}");
                        check_message(&e);
                    }
                }
            }
        }
        Ok(other) => panic!("unknown protection {other:?}"),
        Err(_) => assert!(loaded.is_err()),
    }
}

fn tampered_file(input: &[u8]) {
    let (genuine, key) = &*GENUINE;
    let position = input
        .first_chunk::<2>()
        .map_or(0, |b| u16::from_be_bytes(*b));
    let xor = input.get(2).copied().unwrap_or(0);
    let right = input.get(3).is_none_or(|&b| b & 1 == 0);
    let mut bytes = genuine.clone();
    let position = usize::from(position) % bytes.len();
    bytes[position] ^= xor;
    let tampered = xor != 0;
    let passphrase = if right {
        PASSPHRASE.to_owned()
    } else {
        String::from_utf8_lossy(&input[4..]).into_owned()
    };
    let right = passphrase == PASSPHRASE;

    let path = write(&bytes);
    let cheap_enough = match inspect_key_file(&path) {
        Ok(info) => match info.protection {
            Protection::Argon2id(params) => cheap(&params),
            other => panic!("a protected file inspected as {other:?}"),
        },
        Err(e) => {
            assert!(tampered, "refused the genuine file: {e}");
            check_message(&e);
            return;
        }
    };
    if !cheap_enough {
        return;
    }
    match load_key_file(&path, Some(&Passphrase::new(passphrase.clone()))) {
        Ok(master) => {
            assert!(
                !tampered && right,
                "opened a tampered file or a wrong passphrase"
            );
            assert_eq!(master.id(), key.id());
            assert_eq!(master.expose_secret(), key.expose_secret());
        }
        Err(e) => {
            assert!(tampered || !right, "the genuine file failed to open: {e}");
            check_message(&e);
        }
    }
}

/// What the header must say, restated from `docs/FORMAT.md`: protection, key id
/// and creation time, or `None` when the file must be refused.
fn expected_header(b: &[u8]) -> Option<(Protection, [u8; 16], u64)> {
    if b.len() < 36 || b[..8] != KEY_FILE_MAGIC || b[8..10] != KEY_FILE_VERSION.to_be_bytes() {
        return None;
    }
    if b[11] != 0 {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let protection = match (b[10], b.len()) {
        (0, PLAIN_LEN) => Protection::None,
        (1, PROTECTED_LEN) => {
            // The bounds on what a key file may ask for, restated: 1 to 64 lanes
            // of at least 8 KiB, at most 2 GiB, memory x passes at most 8 GiB.
            let (m, t, p) = (word(36), word(40), word(44));
            let ok = (1..=64).contains(&p)
                && t >= 1
                && m >= 8 * p
                && m <= 2 * 1024 * 1024
                && u64::from(m) * u64::from(t) <= 8 * 1024 * 1024;
            if !ok {
                return None;
            }
            Protection::Argon2id(
                Argon2Params::for_existing_file(m, t, p)
                    .expect("the key file bounds accept what the restated bounds accept"),
            )
        }
        _ => return None,
    };
    let created = u64::from_be_bytes(b[28..36].try_into().unwrap());
    Some((protection, b[12..28].try_into().unwrap(), created))
}

/// Parameters a fuzzing iteration can afford: at most 46 MiB and one pass, on up
/// to 4 lanes.
fn cheap(params: &Argon2Params) -> bool {
    params.memory_kib() <= Argon2Params::CHEAPEST.memory_kib()
        && params.iterations() <= Argon2Params::CHEAPEST.iterations()
        && params.parallelism() <= 4
}

fn check_message(e: &KeyFileError) {
    let text = format!("{e} {e:?}");
    assert!(!text.is_empty());
    assert!(!text.contains(PASSPHRASE), "an error shows the passphrase");
}

fn write(bytes: &[u8]) -> PathBuf {
    let path = DIR.join("key");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("open the scratch key file");
    file.write_all(bytes).expect("write the scratch key file");
    path
}
