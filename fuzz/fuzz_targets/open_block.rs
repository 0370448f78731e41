//! Opening sealed blocks built from arbitrary bytes, under one fixed key.
//!
//! The first byte picks a mode:
//! - even: the rest is `lba (u64 BE) || nonce (12) || tag (16) || block`, opened
//!   as is. It must never panic, must leave only zeros on failure, and may succeed
//!   only for a genuine sealed block: sealing the opened plaintext again must give
//!   back exactly the input ciphertext and tag.
//! - odd: the rest is `lba (u64 BE) || nonce (12) || selector (u32 BE) || plaintext`.
//!   The plaintext is sealed, then the selector flips one bit of the ciphertext,
//!   tag, nonce or LBA (or none): the block must open only when nothing changed.
#![no_main]

use std::sync::LazyLock;

use blockseal_keys::{DataKey, KeyVersion, TenantId, VolumeId, Zeroizing};
use blockseal_volume::{BlockCipher, Lba, Nonce, Tag};
use libfuzzer_sys::fuzz_target;

static CIPHER: LazyLock<BlockCipher> = LazyLock::new(|| {
    BlockCipher::new(
        &TenantId::new("fuzz").expect("valid name"),
        &VolumeId::new("blocks").expect("valid name"),
        &DataKey::from_bytes(KeyVersion(1), Zeroizing::new([0x42; 32])),
    )
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // `None` only means the input was too short to hold the fields.
    let _ = if mode & 1 == 0 {
        open_as_given(rest)
    } else {
        seal_then_tamper(rest)
    };
});

fn open_as_given(bytes: &[u8]) -> Option<()> {
    let (lba, rest) = take::<8>(bytes)?;
    let (nonce, rest) = take::<12>(rest)?;
    let (tag, ciphertext) = take::<16>(rest)?;
    let (lba, nonce, tag) = (
        Lba(u64::from_be_bytes(lba)),
        Nonce::from_bytes(nonce),
        Tag(tag),
    );
    let mut block = ciphertext.to_vec();
    match CIPHER.open_in_place(lba, &nonce, &tag, &mut block) {
        Ok(()) => {
            let resealed_tag = CIPHER.seal_in_place(lba, &nonce, &mut block);
            assert_eq!(resealed_tag, tag, "opened a block that is not genuine");
            assert_eq!(block, ciphertext, "opened a block that is not genuine");
        }
        Err(e) => {
            assert_eq!(e.lba, lba);
            assert!(block.iter().all(|&b| b == 0), "unauthenticated bytes left");
        }
    }
    Some(())
}

fn seal_then_tamper(bytes: &[u8]) -> Option<()> {
    let (lba, rest) = take::<8>(bytes)?;
    let (mut nonce, rest) = take::<12>(rest)?;
    let (selector, plaintext) = take::<4>(rest)?;
    let mut lba = Lba(u64::from_be_bytes(lba));
    let selector = u32::from_be_bytes(selector) as usize;

    let mut block = plaintext.to_vec();
    let mut tag = CIPHER.seal_in_place(lba, &Nonce::from_bytes(nonce), &mut block);

    // Bytes that may be flipped: ciphertext, tag, nonce, LBA; one more slot means "none".
    let fields = block.len() + 16 + 12 + 8;
    let at = (selector >> 3) % (fields + 1);
    let bit = 1u8 << (selector & 7);
    let tampered = at < fields;
    if at < block.len() {
        block[at] ^= bit;
    } else if at < block.len() + 16 {
        tag.0[at - block.len()] ^= bit;
    } else if at < block.len() + 28 {
        nonce[at - block.len() - 16] ^= bit;
    } else if tampered {
        let mut b = lba.0.to_be_bytes();
        b[at - block.len() - 28] ^= bit;
        lba = Lba(u64::from_be_bytes(b));
    }

    let opened = CIPHER.open_in_place(lba, &Nonce::from_bytes(nonce), &tag, &mut block);
    if tampered {
        assert!(opened.is_err(), "a tampered block opened");
        assert!(block.iter().all(|&b| b == 0), "unauthenticated bytes left");
    } else {
        assert!(opened.is_ok(), "a genuine block failed to open");
        assert_eq!(block, plaintext);
    }
    Some(())
}

fn take<const N: usize>(bytes: &[u8]) -> Option<([u8; N], &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<N>()?;
    Some((*head, rest))
}
