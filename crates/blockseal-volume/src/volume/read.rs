//! The read path: a block's mapping from the overlay, else the index (or the
//! metadata store), then its ciphertext from the segment, opened in place.
//!
//! This module must never return bytes of a block that failed authentication.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::index::ExtentView;
use super::{Location, Slot, VolumeInner, corrupt};
use crate::block::Lba;
use crate::error::VolumeError;
use crate::mapping;
use crate::nonce::nonce_for;
use crate::record::Extent;
use crate::seal::{BlockCipher, Tag};

impl VolumeInner {
    /// The current slot of each block `first..first + count` (`None`: never
    /// written since the last trim, reads as zeros). With `wait` false,
    /// `None` in all where it would have to read the metadata store (the
    /// volume has no extent index).
    pub(super) fn lookup_with(
        &self,
        first: u64,
        count: u64,
        wait: bool,
    ) -> Result<Option<Vec<Option<Slot>>>, VolumeError> {
        let mut slots = vec![None; count as usize];
        let mut missing = false;
        {
            let overlay = self.lock_overlay();
            let mut covered = 0u64;
            for (&lba, &(slot, _)) in overlay.map.range(first..first + count) {
                slots[(lba - first) as usize] = Some(slot);
                covered += 1;
            }
            if covered < count {
                missing = true;
            }
        }
        if missing {
            let mut fill = |extent: ExtentView<'_>| {
                let from = extent.lba.max(first);
                let to = (extent.last() + 1).min(first + count);
                for lba in from..to {
                    let slot = &mut slots[(lba - first) as usize];
                    if slot.is_none() {
                        let k = (lba - extent.lba) as usize;
                        *slot = Some(Slot::Mapped(extent.location(k)));
                    }
                }
            };
            if wait {
                self.visit_extents(first, first + count, &mut fill)?;
            } else if !self.visit_index(first, first + count, &mut fill) {
                return Ok(None);
            }
        }
        // A Zero slot and a hole read alike.
        Ok(Some(
            slots
                .into_iter()
                .map(|s| match s {
                    Some(Slot::Zero) => None,
                    s => s,
                })
                .collect(),
        ))
    }

    /// Visits the committed extents overlapping blocks `from..to` in the
    /// extent index; `false` (nothing visited) when the volume has none.
    fn visit_index(&self, from: u64, to: u64, visit: &mut dyn FnMut(ExtentView<'_>)) -> bool {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        match index.as_ref() {
            Some(index) => {
                index.visit(from, to, visit);
                true
            }
            None => false,
        }
    }

    /// Visits the committed extents overlapping blocks `from..to`, in order:
    /// from the index when the volume has one, else from the metadata store.
    pub(super) fn visit_extents(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(ExtentView<'_>),
    ) -> Result<(), VolumeError> {
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            if let Some(index) = index.as_ref() {
                index.visit(from, to, visit);
                return Ok(());
            }
        }
        self.store_lookups.fetch_add(1, Ordering::Relaxed);
        self.scan_store(from, to, &mut |extent| visit(ExtentView::from(&extent)))
    }

    /// Visits the extent records overlapping blocks `from..to` in the metadata
    /// store, in order.
    pub(super) fn scan_store(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(Extent),
    ) -> Result<(), VolumeError> {
        let outcome =
            mapping::scan_pages(self.meta.as_ref(), self.internal_id, from, &mut |extent| {
                if extent.lba >= to {
                    return false;
                }
                visit(extent);
                true
            })?;
        outcome.map_err(corrupt)
    }

    /// The cipher that opens a block at `loc`, derived on first use; `None` when
    /// the volume knows no such writer or the writer belongs to another DEK.
    pub(super) fn cipher(&self, loc: &Location) -> Option<Arc<BlockCipher>> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        let known = writers.get(&loc.writer);
        if let Some(known) = known
            && known.record.dek_version != loc.dek_version
        {
            return None;
        }
        if let Some(cipher) = known.and_then(|k| k.cipher.get()) {
            return Some(cipher.clone());
        }
        let deks = self.deks.read().unwrap_or_else(|e| e.into_inner());
        let dek = deks.get(&loc.dek_version)?;
        let cipher = match known {
            Some(known) => known
                .cipher
                .get_or_init(|| {
                    let key = dek.derive_writer_key(loc.writer, &known.record.salt);
                    Arc::new(BlockCipher::new(&self.tenant, &self.name, &key))
                })
                .clone(),
            // Blocks format v1 sealed under the DEK itself. Rare (legacy data
            // only), so not cached.
            None if loc.writer == 0 => Arc::new(BlockCipher::new(&self.tenant, &self.name, dek)),
            None => return None,
        };
        Some(cipher)
    }

    pub(super) fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        // The lookup and the segment reads happen under the shared side, so a
        // segment compaction deletes is never one this read still uses. It guards
        // no data: a panic elsewhere leaves it valid.
        let _no_deletion = self.segment_reads.read().unwrap_or_else(|e| e.into_inner());
        let done = self.read_range_once(offset, buf, true)?;
        debug_assert!(done, "a read that may wait always completes");
        Ok(())
    }

    /// [`read_range`](Self::read_range) if it needs no wait on a device: the
    /// mappings from the overlay or the extent index, the ciphertext from
    /// memory. `Ok(false)` instead of waiting, with `buf` unspecified.
    pub(super) fn read_range_cached(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, VolumeError> {
        let _no_deletion = self.segment_reads.read().unwrap_or_else(|e| e.into_inner());
        self.read_range_once(offset, buf, false)
    }

    /// Reads `buf` at `offset`; with `wait` false, gives up (`Ok(false)`)
    /// where it would wait on the metadata store or a segment's device.
    fn read_range_once(
        &self,
        offset: u64,
        buf: &mut [u8],
        wait: bool,
    ) -> Result<bool, VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let first = offset / bs64;
        let last = (offset + buf.len() as u64 - 1) / bs64;
        let count = last - first + 1;
        let Some(slots) = self.lookup_with(first, count, wait)? else {
            return Ok(false);
        };
        if offset.is_multiple_of(bs64) && buf.len().is_multiple_of(bs) {
            return self.open_blocks_with(first, &slots, buf, wait);
        }
        let mut scratch = vec![0u8; count as usize * bs];
        if !self.open_blocks_with(first, &slots, &mut scratch, wait)? {
            return Ok(false);
        }
        let skip = (offset - first * bs64) as usize;
        let len = buf.len();
        buf.copy_from_slice(&scratch[skip..skip + len]);
        Ok(true)
    }

    /// Fills `blocks` with the plaintext of the blocks from `first` on, as `slots`
    /// map them.
    pub(super) fn open_blocks(
        &self,
        first: u64,
        slots: &[Option<Slot>],
        blocks: &mut [u8],
    ) -> Result<(), VolumeError> {
        let done = self.open_blocks_with(first, slots, blocks, true)?;
        debug_assert!(done, "reads that may wait always complete");
        Ok(())
    }

    /// [`open_blocks`](Self::open_blocks); with `wait` false, `Ok(false)`
    /// (and `blocks` unspecified) where a segment read would wait for its
    /// device. No block is opened before all its ciphertext is in.
    fn open_blocks_with(
        &self,
        first: u64,
        slots: &[Option<Slot>],
        blocks: &mut [u8],
        wait: bool,
    ) -> Result<bool, VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let mut n = 0usize;
        while n < slots.len() {
            let Some(Slot::Mapped(loc)) = slots[n] else {
                blocks[n * bs..(n + 1) * bs].fill(0);
                n += 1;
                continue;
            };
            // Read a run of blocks that sit next to each other in one segment.
            let mut run = 1;
            while n + run < slots.len() {
                match slots[n + run] {
                    Some(Slot::Mapped(next))
                        if next.segment == loc.segment
                            && next.offset == loc.offset + run as u32 =>
                    {
                        run += 1
                    }
                    _ => break,
                }
            }
            let bytes = &mut blocks[n * bs..(n + run) * bs];
            let (id, at) = (self.segment_id(loc.segment), u64::from(loc.offset) * bs64);
            if wait {
                self.segments
                    .read_at(id, at, bytes)
                    .map_err(VolumeError::Io)?;
            } else if !self
                .segments
                .read_cached(id, at, bytes)
                .map_err(VolumeError::Io)?
            {
                return Ok(false);
            }
            for k in 0..run {
                let Some(Slot::Mapped(l)) = slots[n + k] else {
                    unreachable!("the run holds mapped slots only")
                };
                let lba = Lba(first + (n + k) as u64);
                self.open_block(lba, &l, &mut bytes[k * bs..(k + 1) * bs])?;
            }
            n += run;
        }
        Ok(true)
    }

    pub(super) fn open_block(
        &self,
        lba: Lba,
        loc: &Location,
        block: &mut [u8],
    ) -> Result<(), VolumeError> {
        let opened = match self.cipher(loc) {
            Some(cipher) => cipher
                .open_in_place(lba, &nonce_for(loc.nonce), &Tag(loc.tag), block)
                .is_ok(),
            None => {
                block.fill(0);
                false
            }
        };
        if opened {
            return Ok(());
        }
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            tenant = %self.tenant,
            volume = %self.name,
            lba = lba.0,
            "block failed authentication"
        );
        Err(VolumeError::Authentication { lba })
    }
}
