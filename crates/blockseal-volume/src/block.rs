//! Block geometry: the volume's block size and logical block addresses.
//!
//! Byte offsets from a client are parsed here, once, into an [`Lba`]; everything
//! below works on typed block addresses and never re-derives them from bytes.
//! This module does arithmetic only: it never touches data or keys.

use std::fmt;

/// The size of a volume's logical block: a power of two from 512 to 65536 bytes.
///
/// Every block is sealed on its own, so the block size is also the unit of
/// encryption; 4096 bytes (the [`Default`]) matches page and filesystem blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// The smallest block size, in bytes (a classic disk sector).
    pub const MIN_BYTES: u32 = 512;
    /// The largest block size, in bytes.
    pub const MAX_BYTES: u32 = 65536;
    /// The default block size: 4096 bytes.
    pub const DEFAULT: BlockSize = BlockSize(4096);

    /// Checks that `bytes` is a power of two from [`Self::MIN_BYTES`] to [`Self::MAX_BYTES`].
    pub const fn new(bytes: u32) -> Result<BlockSize, BlockSizeError> {
        if bytes.is_power_of_two() && bytes >= Self::MIN_BYTES && bytes <= Self::MAX_BYTES {
            Ok(BlockSize(bytes))
        } else {
            Err(BlockSizeError { bytes })
        }
    }

    /// The block size in bytes.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The block size in bytes, as a buffer length.
    pub const fn len(self) -> usize {
        // Lossless: at most 65536, and usize is at least 32 bits on every target we build.
        self.0 as usize
    }

    /// Always `false`: a block is never empty. Present so `len` reads naturally.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// log2 of the block size: `offset >> shift()` is the block index of a byte offset.
    pub const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// Whether `offset` falls on a block boundary.
    pub const fn is_aligned(self, offset: u64) -> bool {
        offset & self.mask() == 0
    }

    /// Splits a byte offset into the block holding it and the offset inside that block.
    pub const fn split(self, offset: u64) -> (Lba, u32) {
        // The remainder is below the block size, so it fits in u32.
        (Lba(offset >> self.shift()), (offset & self.mask()) as u32)
    }

    /// The number of blocks needed to hold `bytes` bytes (rounding up).
    pub const fn blocks_for(self, bytes: u64) -> u64 {
        (bytes >> self.shift()) + (!self.is_aligned(bytes)) as u64
    }

    /// Low bits of a byte offset that address bytes within one block.
    const fn mask(self) -> u64 {
        self.0 as u64 - 1
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = BlockSizeError;

    fn try_from(bytes: u32) -> Result<Self, Self::Error> {
        BlockSize::new(bytes)
    }
}

/// A block size that is not a power of two from 512 to 65536 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "block size {bytes} is not supported: use a power of two from {min} to {max} bytes",
    min = BlockSize::MIN_BYTES,
    max = BlockSize::MAX_BYTES
)]
pub struct BlockSizeError {
    /// The refused size, in bytes.
    pub bytes: u32,
}

/// A logical block address: the index of a block within a volume.
///
/// Displays as the bare number, so messages read "block 17 ...".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lba(pub u64);

impl Lba {
    /// The block that starts at byte `offset`; refuses an offset inside a block.
    pub const fn from_offset(offset: u64, block_size: BlockSize) -> Result<Lba, MisalignedOffset> {
        if block_size.is_aligned(offset) {
            Ok(Lba(offset >> block_size.shift()))
        } else {
            Err(MisalignedOffset { offset, block_size })
        }
    }

    /// The byte offset where this block starts, or `None` past `u64::MAX` bytes.
    pub const fn to_offset(self, block_size: BlockSize) -> Option<u64> {
        self.0.checked_mul(block_size.get() as u64)
    }

    /// The block `n` blocks further on, or `None` on overflow.
    pub const fn checked_add(self, n: u64) -> Option<Lba> {
        match self.0.checked_add(n) {
            Some(v) => Some(Lba(v)),
            None => None,
        }
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A byte offset that does not fall on a block boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} is not a multiple of the block size ({block_size})")]
pub struct MisalignedOffset {
    /// The refused offset, in bytes.
    pub offset: u64,
    /// The block size it was checked against.
    pub block_size: BlockSize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_every_power_of_two_in_range() {
        let mut n = 512;
        while n <= 65536 {
            let bs = BlockSize::new(n).unwrap();
            assert_eq!(bs.get(), n);
            assert_eq!(bs.len(), n as usize);
            assert_eq!(1u32 << bs.shift(), n);
            n *= 2;
        }
        assert_eq!(BlockSize::default().get(), 4096);
        assert_eq!(BlockSize::default().shift(), 12);
    }

    #[test]
    fn refuses_other_sizes_with_a_clear_message() {
        for bad in [0, 1, 256, 511, 513, 1000, 4095, 131072, u32::MAX] {
            let e = BlockSize::new(bad).unwrap_err();
            assert_eq!(e.bytes, bad);
        }
        assert_eq!(
            BlockSize::new(1000).unwrap_err().to_string(),
            "block size 1000 is not supported: use a power of two from 512 to 65536 bytes"
        );
    }

    #[test]
    fn offsets_map_to_blocks() {
        let bs = BlockSize::DEFAULT;
        assert_eq!(Lba::from_offset(0, bs), Ok(Lba(0)));
        assert_eq!(Lba::from_offset(8192, bs), Ok(Lba(2)));
        let e = Lba::from_offset(4097, bs).unwrap_err();
        assert_eq!(
            e.to_string(),
            "offset 4097 is not a multiple of the block size (4096 bytes)"
        );
        assert_eq!(bs.split(4097), (Lba(1), 1));
        assert_eq!(bs.blocks_for(0), 0);
        assert_eq!(bs.blocks_for(1), 1);
        assert_eq!(bs.blocks_for(4096), 1);
        assert_eq!(bs.blocks_for(4097), 2);
        assert_eq!(bs.blocks_for(u64::MAX), 1 << 52);
        assert_eq!(Lba(3).to_offset(bs), Some(12288));
        assert_eq!(Lba(u64::MAX).to_offset(bs), None);
        assert_eq!(Lba(u64::MAX).checked_add(1), None);
        assert_eq!(Lba(17).to_string(), "17");
    }

    proptest! {
        #[test]
        fn split_agrees_with_division(shift in 9u32..=16, offset: u64) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let (lba, within) = bs.split(offset);
            prop_assert_eq!(lba.0, offset / u64::from(bs.get()));
            prop_assert_eq!(u64::from(within), offset % u64::from(bs.get()));
            prop_assert_eq!(bs.is_aligned(offset), within == 0);
            prop_assert_eq!(Lba::from_offset(offset, bs).is_ok(), within == 0);
            if let Ok(lba) = Lba::from_offset(offset, bs) {
                prop_assert_eq!(lba.to_offset(bs), Some(offset));
            }
        }
    }
}
