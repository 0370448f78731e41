//! The write path: edge blocks read, modified and rewritten under their stripe,
//! whole blocks sealed into fresh space at the head (one allocation and one
//! segment write per run), and their mappings installed in the overlay.
//!
//! This module must never seal two blocks with one (writer, nonce) pair, and
//! never install a mapping before its block's bytes are written.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, OnceLock};

use blockseal_keys::DataKey;

use super::{DIRECT_TRIM_BLOCKS, Head, KnownWriter, Location, STRIPES, Slot, VolumeInner, Writer};
use crate::block::Lba;
use crate::error::VolumeError;
use crate::nonce::nonce_for;
use crate::record::WriterRecord;
use crate::seal::BlockCipher;

impl VolumeInner {
    /// Locks the stripes of the edge blocks a write reads, modifies and
    /// rewrites: block `first` when `head`, block `last` when `tail` (in
    /// ascending stripe order). Whole blocks need no lock: their install into
    /// the overlay is atomic, and concurrent writes to the same whole block may
    /// land in either order, as NBD allows for requests in flight together.
    pub(super) fn lock_edges(
        &self,
        first: u64,
        last: u64,
        head: bool,
        tail: bool,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut indexes = Vec::with_capacity(2);
        if head {
            indexes.push(first as usize % STRIPES);
        }
        if tail {
            indexes.push(last as usize % STRIPES);
        }
        indexes.sort_unstable();
        indexes.dedup();
        indexes
            .into_iter()
            // The stripes guard no data of their own.
            .map(|s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Writes `data` (or zeros, unmapping whole blocks, when `None`) over `len`
    /// bytes at `offset`.
    pub(super) fn write_range(
        &self,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<(), VolumeError> {
        self.check_poisoned()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::NoSpace { offset, len, size });
        }
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let first = offset / bs64;
        let last = (offset + len - 1) / bs64;
        let head_partial = !offset.is_multiple_of(bs64);
        let tail_partial = !(offset + len).is_multiple_of(bs64);

        let over_limit = {
            let _edges = self.lock_edges(first, last, head_partial, tail_partial);
            match data {
                Some(data) if !head_partial && !tail_partial => {
                    // Whole blocks: one copy to seal in place, no zero-fill (the
                    // fill and its allocation cost a fifth of a 4 KiB write).
                    let mut blocks = data.to_vec();
                    self.seal_and_install(first, &mut blocks)?
                }
                Some(data) => {
                    let count = (last - first + 1) as usize;
                    let mut blocks = vec![0u8; count * bs];
                    if head_partial || (tail_partial && count == 1) {
                        self.read_block_for_update(first, &mut blocks[..bs])?;
                    }
                    if tail_partial && count > 1 {
                        self.read_block_for_update(last, &mut blocks[(count - 1) * bs..])?;
                    }
                    let skip = (offset - first * bs64) as usize;
                    blocks[skip..skip + data.len()].copy_from_slice(data);
                    self.seal_and_install(first, &mut blocks)?
                }
                None => self.zero_range(offset, len, first, last)?,
            }
        };
        self.after_install(over_limit);
        Ok(())
    }

    /// Writes each buffer at its byte offset, in order. Each run of
    /// consecutive whole-block writes within the volume is sealed into one
    /// allocation of segment space and written with one segment write per run
    /// of that space (a client's 4 KiB writes in flight together land side by
    /// side at the head anyway, and the page cache appends 64 KiB at a
    /// quarter of the cost per byte of 4 KiB); any other write runs on its
    /// own, as [`write_range`](Self::write_range). One result per write, in
    /// order.
    ///
    /// When a group fails, nothing of it was installed, and each of its
    /// writes is tried on its own, so each gets its own result.
    pub(super) fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), VolumeError>> {
        let bs64 = self.block_size.len() as u64;
        let size = self.size();
        let whole = |&(offset, data): &(u64, &[u8])| {
            let len = data.len() as u64;
            len > 0
                && offset.is_multiple_of(bs64)
                && len.is_multiple_of(bs64)
                && offset.checked_add(len).is_some_and(|end| end <= size)
        };
        let mut results = Vec::with_capacity(writes.len());
        let mut from = 0;
        for i in 0..=writes.len() {
            if i < writes.len() && whole(&writes[i]) {
                continue;
            }
            self.write_group(&writes[from..i], &mut results);
            if let Some(&(offset, data)) = writes.get(i) {
                results.push(self.write_range(offset, Some(data), data.len() as u64));
            }
            from = i + 1;
        }
        results
    }

    /// Writes whole-block buffers within the volume together (see
    /// [`write_batch`](Self::write_batch)), pushing one result each.
    fn write_group(&self, group: &[(u64, &[u8])], results: &mut Vec<Result<(), VolumeError>>) {
        if group.len() > 1 && self.check_poisoned().is_ok() {
            let bs = self.block_size.len();
            let total: usize = group.iter().map(|(_, data)| data.len()).sum();
            let mut blocks = Vec::with_capacity(total);
            let mut pieces = Vec::with_capacity(group.len());
            for &(offset, data) in group {
                blocks.extend_from_slice(data);
                pieces.push((offset / bs as u64, data.len() / bs));
            }
            if let Ok(over_limit) = self.seal_and_install_pieces(&pieces, &mut blocks) {
                self.requests
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                self.after_install(over_limit);
                results.extend(group.iter().map(|_| Ok(())));
                return;
            }
        }
        for &(offset, data) in group {
            results.push(self.write_range(offset, Some(data), data.len() as u64));
        }
    }

    /// After blocks were installed in the overlay: starts a commit when it
    /// grew past its bound.
    fn after_install(&self, over_limit: bool) {
        if over_limit {
            // The write is installed and readable whatever this flush does, so it
            // succeeded; a failed flush poisons the volume, and the next write or
            // flush reports it (durability was never promised before a flush).
            // Past the bound the store's flush thread commits the overlay while
            // writers go on; past twice the bound (the disk is not keeping up)
            // the writer flushes itself, which bounds the overlay's memory.
            let hard = self.lock_overlay().map.len() > self.overlay_limit.saturating_mul(2);
            let queued = !hard
                && self
                    .flusher
                    .as_ref()
                    .is_some_and(|queue| queue.request(self.me.clone()));
            if !queued {
                self.background_flush();
            }
        }
    }

    /// Flushes because the overlay grew past its bound (from the store's flush
    /// thread or a writer): nobody waits on the result, so a failure is logged;
    /// it has poisoned the volume, and the next write or flush reports it.
    pub(crate) fn background_flush(&self) {
        if let Err(error) = self.flush() {
            tracing::warn!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "flushing a full overlay failed"
            );
        }
    }

    /// Zeroes bytes `offset..offset + len` (blocks `first..=last`, whose stripes
    /// the caller holds).
    pub(super) fn zero_range(
        &self,
        offset: u64,
        len: u64,
        first: u64,
        last: u64,
    ) -> Result<bool, VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let end = offset + len;
        // Partial blocks at the edges keep their other bytes. Both are read before
        // anything changes, so a failed read leaves the range untouched.
        let mut whole_from = first;
        let mut whole_to = last + 1;
        let mut head = None;
        let mut tail = None;
        if !offset.is_multiple_of(bs64) || (!end.is_multiple_of(bs64) && first == last) {
            let mut block = vec![0u8; bs];
            self.read_block_for_update(first, &mut block)?;
            let from = (offset - first * bs64) as usize;
            let to = ((end - first * bs64) as usize).min(bs);
            block[from..to].fill(0);
            head = Some(block);
            whole_from = first + 1;
        }
        if !end.is_multiple_of(bs64) && last >= whole_from {
            let mut block = vec![0u8; bs];
            self.read_block_for_update(last, &mut block)?;
            let to = (end - last * bs64) as usize;
            block[..to].fill(0);
            tail = Some(block);
            whole_to = last;
        }
        let mut over = false;
        if let Some(mut block) = head {
            over |= self.seal_and_install(first, &mut block)?;
        }
        if let Some(mut block) = tail {
            over |= self.seal_and_install(last, &mut block)?;
        }
        if whole_from >= whole_to {
            return Ok(over);
        }
        if whole_to - whole_from >= DIRECT_TRIM_BLOCKS {
            self.trim_direct(whole_from, whole_to)?;
            return Ok(over);
        }
        let mut overlay = self.lock_overlay();
        overlay.generation += 1;
        let generation = overlay.generation;
        for lba in whole_from..whole_to {
            overlay.map.insert(lba, (Slot::Zero, generation));
        }
        Ok(over || overlay.map.len() > self.overlay_limit)
    }

    /// Reads block `lba` for a read-modify-write (the caller holds its stripe).
    pub(super) fn read_block_for_update(
        &self,
        lba: u64,
        block: &mut [u8],
    ) -> Result<(), VolumeError> {
        let bs64 = self.block_size.len() as u64;
        self.read_range(lba * bs64, block)
    }

    /// Seals whole blocks starting at `first` into fresh segment space and installs
    /// their mappings. Returns whether the overlay grew past its bound.
    pub(super) fn seal_and_install(
        &self,
        first: u64,
        blocks: &mut [u8],
    ) -> Result<bool, VolumeError> {
        let count = blocks.len() / self.block_size.len();
        self.seal_and_install_pieces(&[(first, count)], blocks)
    }

    /// [`seal_and_install`](Self::seal_and_install) for blocks of several
    /// places: `pieces` names, in the order of `blocks`, each run's first
    /// block and its length in blocks. Nothing is installed unless every block
    /// was written.
    pub(super) fn seal_and_install_pieces(
        &self,
        pieces: &[(u64, usize)],
        blocks: &mut [u8],
    ) -> Result<bool, VolumeError> {
        // From the allocation to the install (see `installing`). It guards no
        // data: a panic elsewhere leaves it valid.
        let _installing = self.installing.read().unwrap_or_else(|e| e.into_inner());
        let bs = self.block_size.len();
        let count = blocks.len() / bs;
        debug_assert_eq!(pieces.iter().map(|&(_, n)| n).sum::<usize>(), count);
        // Again under the gate: a shrink may have lowered the size since the
        // caller's check (see `VolumeInner::shrink`).
        let size = self.size();
        for &(first, n) in pieces {
            let end = (first + n as u64).saturating_mul(bs as u64);
            if end > size {
                return Err(VolumeError::NoSpace {
                    offset: first * bs as u64,
                    len: (n * bs) as u64,
                    size,
                });
            }
        }
        let lbas: Vec<u64> = pieces
            .iter()
            .flat_map(|&(first, n)| first..first + n as u64)
            .collect();
        let mut locations = Vec::with_capacity(count);
        let mut done = 0usize;
        while done < count {
            let space = self.allocate(count - done)?;
            let run = space.run;
            let bytes = &mut blocks[done * bs..(done + run) * bs];
            for k in 0..run {
                let lba = Lba(lbas[done + k]);
                let nonce = space.nonce + k as u64;
                let tag = space.cipher.seal_in_place(
                    lba,
                    &nonce_for(nonce),
                    &mut bytes[k * bs..(k + 1) * bs],
                );
                locations.push(Location {
                    segment: space.segment,
                    offset: space.offset + k as u32,
                    dek_version: space.dek_version,
                    writer: space.writer,
                    nonce,
                    tag: tag.0,
                });
            }
            let segment = space.segment;
            let offset = space.offset;
            if let Err(e) = self.segments.write_at(
                self.segment_id(segment),
                u64::from(offset) * bs as u64,
                bytes,
            ) {
                // The space stays allocated and unreferenced (compaction takes
                // it back); the blocks' mappings are unchanged.
                return Err(self.write_failed(e));
            }
            self.lock_dirty().insert(segment);
            done += run;
        }
        let mut overlay = self.lock_overlay();
        overlay.generation += 1;
        let generation = overlay.generation;
        for (&lba, loc) in lbas.iter().zip(locations) {
            overlay.map.insert(lba, (Slot::Mapped(loc), generation));
        }
        Ok(overlay.map.len() > self.overlay_limit)
    }

    /// Reserves up to `want` consecutive blocks at the head of the open segment
    /// and as many consecutive nonces of the current writer (made first when
    /// there is none or its counter is spent, so a failure to make one leaves
    /// the head untouched).
    pub(super) fn allocate(&self, want: usize) -> Result<Space, VolumeError> {
        let bytes = (want as u64).saturating_mul(self.block_size.len() as u64);
        self.segments
            .check_space(bytes)
            .map_err(|e| self.write_failed(e))?;
        let mut head = self.lock_head();
        self.check_poisoned()?;
        let spent = head
            .writer
            .as_ref()
            .is_none_or(|_| head.next_nonce >= self.nonce_limit);
        if spent {
            self.start_writer(&mut head)?;
        }
        let left = usize::try_from(self.nonce_limit - head.next_nonce).unwrap_or(usize::MAX);
        let (segment, offset, run) = self.allocate_in(&mut head, want.min(left))?;
        let writer = head
            .writer
            .as_ref()
            .expect("a writer was made above when there was none");
        let space = Space {
            segment,
            offset,
            run,
            writer: writer.number,
            dek_version: writer.dek_version,
            cipher: writer.cipher.clone(),
            nonce: head.next_nonce,
        };
        head.next_nonce += run as u64;
        // Under the head lock, so a rotation's switch counts every seal on the
        // right side of it.
        self.count_seals(run as u64);
        Ok(space)
    }

    /// Makes a new writer: a fresh salt, its key derived from the active DEK,
    /// its record queued for the next commit (the caller holds the head lock).
    pub(super) fn start_writer(&self, head: &mut Head) -> Result<(), VolumeError> {
        let number = head.next_writer;
        let next = number.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
            what: "writer numbers are spent".into(),
        })?;
        let salt = DataKey::generate_writer_salt().map_err(|e| VolumeError::Nonce(Box::new(e)))?;
        // The active version changes only under the head lock, which the
        // caller holds.
        let dek_version = self.active_dek.load(Ordering::Acquire);
        let key = {
            let deks = self.deks.read().unwrap_or_else(|e| e.into_inner());
            let dek = deks
                .get(&dek_version)
                .expect("the active DEK is among the volume's keys by construction");
            dek.derive_writer_key(number, &salt)
        };
        let cipher = Arc::new(BlockCipher::new(&self.tenant, &self.name, &key));
        let record = WriterRecord { dek_version, salt };
        self.writers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                number,
                KnownWriter {
                    record: record.clone(),
                    cipher: OnceLock::from(cipher.clone()),
                },
            );
        self.lock_pending_writers().push((number, record));
        head.writer = Some(Writer {
            number,
            dek_version,
            cipher,
        });
        head.next_nonce = 0;
        head.next_writer = next;
        tracing::debug!(
            tenant = %self.tenant,
            volume = %self.name,
            writer = number,
            dek_version,
            "new writer key"
        );
        Ok(())
    }

    pub(super) fn lock_pending_writers(&self) -> MutexGuard<'_, Vec<(u32, WriterRecord)>> {
        self.pending_writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves up to `want` consecutive blocks at the head of the open segment
    /// (creating one when needed): `(segment, offset, blocks reserved)`.
    pub(super) fn allocate_in(
        &self,
        head: &mut Head,
        want: usize,
    ) -> Result<(u32, u32, usize), VolumeError> {
        self.check_poisoned()?;
        let segment = match head.segment {
            Some(s) if head.next_block < self.segment_blocks => s,
            _ => {
                let index = head.next_index;
                let next = index.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
                    what: "segment index space is spent".into(),
                })?;
                // A failed create may have left the file behind: the next try
                // takes the next index (an empty segment is compacted away).
                head.next_index = next;
                if let Err(e) = self.segments.create(self.segment_id(index)) {
                    head.segment = None;
                    return Err(self.write_failed(e));
                }
                head.segment = Some(index);
                head.next_block = 0;
                index
            }
        };
        let run = want.min((self.segment_blocks - head.next_block) as usize);
        let offset = head.next_block;
        head.next_block += run as u32;
        Ok((segment, offset, run))
    }
}

/// Fresh segment space and nonces from [`VolumeInner::allocate`]: `run` blocks
/// at `offset` of `segment`, sealed by `writer` with counters from `nonce` on.
pub(super) struct Space {
    pub(super) segment: u32,
    pub(super) offset: u32,
    pub(super) run: usize,
    pub(super) writer: u32,
    /// The DEK version `writer`'s key derives from.
    pub(super) dek_version: u32,
    pub(super) cipher: Arc<BlockCipher>,
    pub(super) nonce: u64,
}
