//! Block nonces, and why they never repeat under one key.
//!
//! A volume never seals under its data key (DEK) directly. Each open of a volume
//! that writes makes a *writer*: a random 256-bit salt, and a writer key derived
//! from the DEK with it (`DataKey::derive_writer_key`, HKDF-SHA256). The writer's
//! nonce counter starts at zero and lives only in memory; when it reaches the
//! limit (see [`default_limit`]), the volume makes another writer. The writer's
//! number and salt are committed with the first block mappings that name it.
//!
//! So a (key, nonce) pair repeats only if two writers drew the same 256-bit salt,
//! whatever happens to the metadata: a lost or rolled-back metadata store, a
//! crash before the writer's record was committed, a restored copy of the store
//! written to on two hosts. Nothing about uniqueness is persisted, and no commit
//! sits on the write path for it.
//!
//! This module must never hand out a nonce layout that could collide with one
//! already written: the four leading bytes stay [`NONCE_PREFIX`]. Nor is it a
//! way for a caller to make a nonce: `nonce_for` is crate-private, public only
//! with the `testing` feature; what stays public is the layout and the limits.
//!
//! # Nonce layout (format v1 and v2)
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 4    | [`NONCE_PREFIX`]: zero                  |
//! | 4      | 8    | counter, u64 big-endian                 |

use crate::block::BlockSize;
use crate::seal::{NONCE_LEN, Nonce};

/// The four fixed leading bytes of every nonce: zero.
pub const NONCE_PREFIX: [u8; 4] = [0; 4];

/// Seals allowed under one writer key at the default 4 KiB block size: 2^32.
///
/// With a counter nonce, nonces cannot repeat before 2^64 seals, so the bound that
/// binds is how much data one AES-GCM key may protect. NIST SP 800-38D caps a key
/// at 2^32 invocations when the nonce is not fully deterministic; we take that same
/// conservative figure as our seal count, and also cap the bytes sealed per key at
/// [`DATA_LIMIT_BYTES`] (16 TiB, which is 2^32 blocks of 4 KiB): then the total
/// number of AES blocks processed under a key stays near 2^40, and the generic
/// distinguishing bound for GCM, about (total AES blocks)^2 / 2^129, is below 2^-48.
/// A writer that reaches it is replaced by a new one with a fresh key; the DEK
/// itself has no such limit.
pub const DEFAULT_LIMIT: u64 = 1 << 32;

/// The most plaintext bytes sealed under one writer key: 2^44 (16 TiB). See
/// [`DEFAULT_LIMIT`].
pub const DATA_LIMIT_BYTES: u64 = 1 << 44;

/// The default limit for a block size: [`DATA_LIMIT_BYTES`] worth of blocks, and
/// never more than [`DEFAULT_LIMIT`] seals. 2^32 at 4 KiB, 2^28 at 64 KiB.
pub fn default_limit(block_size: BlockSize) -> u64 {
    (DATA_LIMIT_BYTES >> block_size.shift()).min(DEFAULT_LIMIT)
}

/// How many writer keys' worth of seals one DEK backs: 1024. See [`dek_limit`].
pub const DEK_WRITER_KEYS: u64 = 1 << 10;

/// The seal budget of one DEK: [`DEK_WRITER_KEYS`] times the writer limit
/// (`writer_limit`: [`default_limit`], or what
/// `StoreOptions::danger_writer_nonce_limit` lowered it to). 2^42 blocks
/// (16 PiB) at 4 KiB.
///
/// No AES-GCM bound is near here: the DEK never seals a block itself, it only
/// keys HKDF for writer keys with fresh 256-bit salts, and each writer key is
/// bounded by the writer limit. What is counted is every nonce reserved by a
/// writer key derived from the DEK (sealed blocks, including re-encrypted
/// ones and reservations a failed write left unused), persisted with each
/// commit. The budget is a key-lifetime policy: a volume's DEK is replaced
/// (and its blocks re-encrypted) when half of it is spent, so no single DEK
/// ever stands behind an unbounded amount of data.
pub fn dek_limit(writer_limit: u64) -> u64 {
    writer_limit.saturating_mul(DEK_WRITER_KEYS)
}

/// The nonce for a counter: [`NONCE_PREFIX`] then the counter, big-endian.
///
/// Only with the `testing` feature: a caller that picks counters can repeat a
/// nonce.
#[cfg(feature = "testing")]
pub fn nonce_for(counter: u64) -> Nonce {
    counter_nonce(counter)
}

/// The nonce for a counter: [`NONCE_PREFIX`] then the counter, big-endian.
#[cfg(not(feature = "testing"))]
pub(crate) fn nonce_for(counter: u64) -> Nonce {
    counter_nonce(counter)
}

fn counter_nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&NONCE_PREFIX);
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_prefix_then_big_endian_counter() {
        assert_eq!(
            nonce_for(0x0102_0304_0506_0708).0,
            [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn default_limits_bound_data_per_key() {
        assert_eq!(default_limit(BlockSize::DEFAULT), DEFAULT_LIMIT);
        assert_eq!(default_limit(BlockSize::new(65536).unwrap()), 1 << 28);
        assert_eq!(default_limit(BlockSize::new(512).unwrap()), DEFAULT_LIMIT);
        assert_eq!(dek_limit(default_limit(BlockSize::DEFAULT)), 1 << 42);
        assert_eq!(dek_limit(u64::MAX), u64::MAX);
    }
}
