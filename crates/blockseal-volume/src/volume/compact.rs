//! Compaction: live blocks of mostly dead sealed segments move to the head, and
//! segments nothing references any more are deleted.
//!
//! # What is compacted
//!
//! Only *sealed* segments: those below the open head's index when the
//! compaction starts (writes only ever go to the head). A sealed segment whose
//! live (committed, mapped) blocks are below the threshold fraction of its size
//! is compacted; one with no live blocks is deleted without copying. The segment
//! with the highest index ever created is never deleted (it is how a reopened
//! volume knows where to resume numbering, so indexes are never reused); it
//! goes once compaction or a write has created a higher one.
//!
//! # Steps and durability order
//!
//! 1. Under the volume's `compacting` lock (one pass at a time) and its
//!    `compaction` lock (held by each step, released while the pass sleeps to
//!    keep its pace, so that re-encryption steps run in between), note the
//!    head's index, then take and release the install gate: a write holds
//!    its shared side from allocation until its mapping is in the overlay, so
//!    afterwards no write into a sealed segment is in flight.
//! 2. Flush. Every mapping into a sealed segment is now committed, the overlay
//!    holds none (new writes go to the head), and the live counts are exact.
//! 3. The extent index's segment sets give the blocks still in each candidate
//!    segment (one walk of the volume's extent records when it has no index).
//! 4. Per step of at most 8 MiB of blocks: read the ciphertext from the old segment
//!    and write it as is into fresh space at the head (the associated data binds
//!    tenant, volume, LBA and DEK version, not the location, so nonce and tag
//!    stay valid), then sync the head segments written.
//! 5. Under the flush lock, the only lock under which committed mappings change,
//!    re-read the extent records of the moved blocks and switch, in ONE atomic
//!    batch with the live-count changes, only the blocks whose committed mapping
//!    is still the one copied. A block written or trimmed since keeps its newer
//!    mapping (or an overlay entry that the next flush commits over the moved
//!    one); its copy is dead space in the head.
//! 6. When the old segment's live count is zero after the last step's commit
//!    returned (durable), delete the segment.
//!
//! A crash before 5 leaves unreferenced bytes at the head (reopened volumes
//! write into a fresh segment anyway); a crash between 5 and 6 leaves a segment
//! with no live blocks, which the next compaction deletes. At no instant does a
//! committed mapping point at bytes that are not durable.
//!
//! # Reads racing a deletion
//!
//! A read looks a block up, then reads its segment. One that looked a block up
//! just before the mapping moved could otherwise find the old segment deleted.
//! Reads therefore hold the volume's `segment_reads` lock shared from lookup to
//! the end of their segment reads, and a deletion holds it exclusively for the
//! unlink only: it waits for reads in flight, and reads that start after it look
//! up the already committed new locations. (A bounded retry of failed reads was
//! tried first; under continuous compaction a large read could lose the race
//! every time and fail with an I/O error.) Segment indexes are never reused.

//! This module must never decrypt or log data, never change a mapping that is
//! not exactly the one it copied, and never delete a segment a committed
//! mapping may reference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::AddAssign;
use std::sync::atomic::Ordering;

use super::index::ExtentView;
use super::{CommitKind, Location, MappingCommit, VolumeInner};
use crate::error::VolumeError;
use crate::record::Extent;

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CompactionReport {
    /// Segments whose live blocks were moved and which were then deleted.
    pub segments_compacted: u64,
    /// Segments deleted (the compacted ones and those that held no live block).
    pub segments_deleted: u64,
    /// Blocks copied to the head whose mapping moved with them.
    pub blocks_moved: u64,
    /// Bytes of deleted segments minus the bytes written to move their live
    /// blocks.
    pub bytes_reclaimed: u64,
}

impl AddAssign for CompactionReport {
    fn add_assign(&mut self, other: CompactionReport) {
        self.segments_compacted += other.segments_compacted;
        self.segments_deleted += other.segments_deleted;
        self.blocks_moved += other.blocks_moved;
        self.bytes_reclaimed += other.bytes_reclaimed;
    }
}

/// Bytes of blocks copied, synced and committed per step: one sync and one
/// metadata commit per several MiB copied.
const STEP_BYTES: u64 = 8 << 20;

/// A sealed segment worth compacting or deleting.
struct Candidate {
    index: u32,
    live: u64,
    bytes: u64,
}

/// One block to move: where it was copied from and to.
#[derive(Clone, Copy)]
struct Move {
    lba: u64,
    from: Location,
    to_segment: u32,
    to_offset: u32,
}

/// Reading the old copy failed: the segment is left for a later pass.
struct SourceUnreadable(std::io::Error);

impl VolumeInner {
    pub(crate) fn compact_threshold(&self) -> f64 {
        self.compact_threshold
    }

    pub(crate) fn tenant(&self) -> &blockseal_keys::TenantId {
        &self.tenant
    }

    pub(crate) fn name(&self) -> &blockseal_keys::VolumeId {
        &self.name
    }

    /// Whether a compaction pass would find work, judged from the committed live
    /// counts without flushing (cheap; the background thread asks before a pass).
    pub(crate) fn wants_compaction(&self) -> bool {
        if self.poisoned.load(Ordering::Acquire) {
            return false;
        }
        match self.candidates(self.sealed_below(), self.compact_threshold) {
            Ok(candidates) => !candidates.is_empty(),
            Err(_) => false,
        }
    }

    /// Compacts sealed segments below `threshold`. `pace` is called after each
    /// step with the bytes it copied; it may sleep, and returning `false` ends
    /// the pass early (every step is whole on its own).
    ///
    /// The pass is a `compaction` span (INFO): `tenant`, `volume`, and when
    /// it ends the report's counts or the `error`.
    pub(crate) fn compact(
        &self,
        threshold: f64,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<CompactionReport, VolumeError> {
        let span = tracing::info_span!(
            "compaction",
            tenant = %self.tenant,
            volume = %self.name,
            segments_compacted = tracing::field::Empty,
            segments_deleted = tracing::field::Empty,
            blocks_moved = tracing::field::Empty,
            bytes_reclaimed = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let _entered = span.enter();
        let result = self.compact_pass(threshold, pace);
        match &result {
            Ok(report) => {
                span.record("segments_compacted", report.segments_compacted);
                span.record("segments_deleted", report.segments_deleted);
                span.record("blocks_moved", report.blocks_moved);
                span.record("bytes_reclaimed", report.bytes_reclaimed);
            }
            Err(e) => crate::error::record_failure(&span, e),
        }
        result
    }

    fn compact_pass(
        &self,
        threshold: f64,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<CompactionReport, VolumeError> {
        let _pass = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let lock_steps = || self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        let mut steps = Some(lock_steps());
        self.check_poisoned()?;
        // Read before the barrier: a write that allocated in a segment below this
        // index did so before the sweep began, so the sweep waits for it.
        let sealed_below = self.sealed_below();
        self.write_barrier();
        self.flush()?;
        let candidates = self.candidates(sealed_below, threshold)?;
        let mut report = CompactionReport::default();
        if candidates.is_empty() {
            return Ok(report);
        }

        // The blocks still in each candidate, in LBA order.
        let wanted: HashSet<u32> = candidates.iter().map(|c| c.index).collect();
        let mut inside = self.blocks_in(&wanted)?;

        let bs = self.block_size.len() as u64;
        let mut reclaimed = 0u64;
        let mut moved = 0u64;
        'segments: for candidate in candidates {
            let blocks = inside.remove(&candidate.index).unwrap_or_default();
            let step_blocks = (STEP_BYTES / bs).max(1) as usize;
            for step in blocks.chunks(step_blocks) {
                match self.move_step(step) {
                    Ok(n) => {
                        moved += n;
                        // Counted per step: the stats show a long pass's progress.
                        self.compacted_blocks.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(Ok(SourceUnreadable(error))) => {
                        tracing::warn!(
                            tenant = %self.tenant,
                            volume = %self.name,
                            segment = candidate.index,
                            %error,
                            "compaction cannot read a segment; leaving it in place"
                        );
                        continue 'segments;
                    }
                    Err(Err(e)) => return Err(e),
                }
                // Not held while pacing sleeps: a re-encryption pass of this
                // volume takes its steps meanwhile (every step of either
                // switches only mappings that are still what it copied).
                drop(steps.take());
                let go_on = pace(step.len() as u64 * bs);
                steps = Some(lock_steps());
                if !go_on {
                    break 'segments;
                }
            }
            if self.try_delete(candidate.index, candidate.live)? {
                reclaimed += candidate.bytes;
                report.segments_deleted += 1;
                if !blocks.is_empty() {
                    report.segments_compacted += 1;
                }
            }
        }
        report.blocks_moved = moved;
        report.bytes_reclaimed = reclaimed.saturating_sub(moved * bs);
        self.deleted_segments
            .fetch_add(report.segments_deleted, Ordering::Relaxed);
        Ok(report)
    }

    /// The committed blocks lying in each of `segments`, in LBA order: from the
    /// index's segment sets when the volume has an index, else by one walk of
    /// the volume's extent records.
    fn blocks_in(
        &self,
        segments: &HashSet<u32>,
    ) -> Result<HashMap<u32, Vec<(u64, Location)>>, VolumeError> {
        let mut inside: HashMap<u32, Vec<(u64, Location)>> = HashMap::new();
        let mut add = |extent: ExtentView<'_>| {
            let blocks = inside.entry(extent.segment).or_default();
            for k in 0..extent.tags.len() {
                blocks.push((extent.lba + k as u64, extent.location(k)));
            }
        };
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            if let Some(index) = index.as_ref() {
                for &segment in segments {
                    index.visit_segment(segment, &mut add);
                }
                return Ok(inside);
            }
        }
        self.visit_extents(0, u64::MAX, &mut |extent| {
            if segments.contains(&extent.segment) {
                add(extent);
            }
        })?;
        Ok(inside)
    }

    /// Takes and releases the install gate: afterwards every write that had
    /// allocated space before the call has installed its mapping.
    pub(super) fn write_barrier(&self) {
        drop(self.installing.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The sealed segments whose live fraction is below `threshold` (or that hold
    /// no live block and may be deleted), emptiest first.
    fn candidates(&self, sealed_below: u32, threshold: f64) -> Result<Vec<Candidate>, VolumeError> {
        let existing = self
            .segments
            .list(self.internal_id)
            .map_err(VolumeError::Io)?;
        // The highest index present is what a reopened volume numbers from (a
        // failed create may have skipped an index without making its file).
        let last_created = existing.last().copied();
        let (live, pinned) = {
            let state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
            (state.live.clone(), state.snap.pinned.clone())
        };
        let bs = self.block_size.len() as u64;
        let mut out = Vec::new();
        for index in existing {
            if index >= sealed_below {
                continue;
            }
            if pinned.get(&index).is_some_and(|&n| n > 0) {
                // A snapshot holds blocks in it: moving the rest would not
                // free it. It goes once the snapshots that hold it do.
                continue;
            }
            let live = live.get(&index).copied().unwrap_or(0);
            if live == 0 && Some(index) == last_created {
                // The index watermark stays until a higher segment exists.
                continue;
            }
            // A segment cut short (the head when a volume was closed) is judged by
            // its real size, so a full small segment is not compacted forever.
            let bytes = self
                .segments
                .size(self.segment_id(index))
                .unwrap_or(u64::from(self.segment_blocks) * bs);
            let blocks = (bytes / bs).max(live);
            if live == 0 || (live as f64) < threshold * blocks as f64 {
                out.push(Candidate { index, live, bytes });
            }
        }
        out.sort_by(|a, b| {
            let fa = a.live as f64 / a.bytes.max(1) as f64;
            let fb = b.live as f64 / b.bytes.max(1) as f64;
            fa.total_cmp(&fb).then(a.index.cmp(&b.index))
        });
        Ok(out)
    }

    /// Copies `blocks` (LBA order, all in one old segment) to the head, syncs
    /// them and switches the mappings that still point at the old copies.
    /// Returns how many moved.
    fn move_step(
        &self,
        blocks: &[(u64, Location)],
    ) -> Result<u64, Result<SourceUnreadable, VolumeError>> {
        let bs = self.block_size.len();
        let mut data = vec![0u8; blocks.len() * bs];
        // Read runs that sit next to each other in the old segment.
        let mut n = 0;
        while n < blocks.len() {
            let first = blocks[n].1;
            let mut run = 1;
            while n + run < blocks.len() && blocks[n + run].1.offset == first.offset + run as u32 {
                run += 1;
            }
            self.segments
                .read_at(
                    self.segment_id(first.segment),
                    u64::from(first.offset) * bs as u64,
                    &mut data[n * bs..(n + run) * bs],
                )
                .map_err(|e| Ok(SourceUnreadable(e)))?;
            n += run;
        }
        // Write them to the head, as is.
        let mut moves = Vec::with_capacity(blocks.len());
        let mut written = std::collections::BTreeSet::new();
        let mut n = 0;
        while n < blocks.len() {
            // Copies take space like writes do: on a full disk the pass stops
            // (nothing copied so far is referenced) and the reserve stays for
            // the metadata commits of flushes.
            let want = ((blocks.len() - n) * bs) as u64;
            self.segments
                .check_space(want)
                .map_err(|e| Err(self.write_failed(e)))?;
            let (segment, offset, run) = {
                let mut head = self.lock_head();
                self.allocate_in(&mut head, blocks.len() - n).map_err(Err)?
            };
            if let Err(e) = self.segments.write_at(
                self.segment_id(segment),
                u64::from(offset) * bs as u64,
                &data[n * bs..(n + run) * bs],
            ) {
                return Err(Err(self.write_failed(e)));
            }
            written.insert(segment);
            for k in 0..run {
                let (lba, from) = blocks[n + k];
                moves.push(Move {
                    lba,
                    from,
                    to_segment: segment,
                    to_offset: offset + k as u32,
                });
            }
            n += run;
        }
        // The copies are durable before any mapping points at them.
        for segment in written {
            if let Err(e) = self.segments.sync(self.segment_id(segment)) {
                self.poison();
                return Err(Err(VolumeError::Io(e)));
            }
        }
        self.commit_moves(&moves).map_err(Err)
    }

    /// The committed extents covering the blocks `lbas` (ascending), by first
    /// LBA: what a step re-reads under the flush lock to switch only the
    /// mappings that are still the ones it copied.
    pub(super) fn committed_extents_at(
        &self,
        lbas: impl Iterator<Item = u64>,
    ) -> Result<BTreeMap<u64, Extent>, VolumeError> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for lba in lbas {
            match runs.last_mut() {
                Some((_, to)) if *to == lba => *to += 1,
                _ => runs.push((lba, lba + 1)),
            }
        }
        let mut old: BTreeMap<u64, Extent> = BTreeMap::new();
        for &(from, to) in &runs {
            self.visit_extents(from, to, &mut |extent| {
                old.insert(extent.lba, extent.to_extent());
            })?;
        }
        Ok(old)
    }

    /// Switches, in one atomic commit, the committed mapping of every block of
    /// `moves` (ascending LBAs) that still points at its old copy.
    fn commit_moves(&self, moves: &[Move]) -> Result<u64, VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let by_lba: HashMap<u64, &Move> = moves.iter().map(|m| (m.lba, m)).collect();
        let old = self.committed_extents_at(moves.iter().map(|m| m.lba))?;
        let mut commit = MappingCommit::default();
        let MappingCommit { deltas, change, .. } = &mut commit;
        let mut moved = 0u64;
        for extent in old.values() {
            // The extent's blocks, each at its old place or its new one.
            let mut places: Vec<(u32, u32)> = Vec::with_capacity(extent.tags.len());
            let mut changed = false;
            for k in 0..extent.tags.len() {
                let now = ExtentView::from(extent).location(k);
                match by_lba.get(&(extent.lba + k as u64)) {
                    Some(m) if m.from == now => {
                        places.push((m.to_segment, m.to_offset));
                        *deltas.entry(now.segment).or_default() -= 1;
                        *deltas.entry(m.to_segment).or_default() += 1;
                        moved += 1;
                        changed = true;
                    }
                    _ => places.push((now.segment, now.offset)),
                }
            }
            if !changed {
                continue;
            }
            // The old extent goes first: a piece ending at the same block,
            // added later, replaces it.
            change.removed.push(extent.last());
            let mut start = 0;
            while start < places.len() {
                let mut end = start + 1;
                while end < places.len()
                    && places[end].0 == places[start].0
                    && places[end].1 == places[start].1 + (end - start) as u32
                {
                    end += 1;
                }
                let piece = Extent {
                    lba: extent.lba + start as u64,
                    segment: places[start].0,
                    offset: places[start].1,
                    dek_version: extent.dek_version,
                    writer: extent.writer,
                    nonce: extent.nonce + start as u64,
                    birth: extent.birth,
                    tags: extent.tags[start..end].to_vec(),
                };
                change.added.push(piece);
                start = end;
            }
        }
        self.commit_mappings(&mut state, commit, CommitKind::Compaction)?;
        Ok(moved)
    }

    /// Deletes sealed segment `index` if no committed mapping references it any
    /// more (its live count is zero after a durable commit) and a higher segment
    /// exists. Returns whether it was deleted.
    fn try_delete(&self, index: u32, live_before: u64) -> Result<bool, VolumeError> {
        let live = self
            .flush
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .get(&index)
            .copied()
            .unwrap_or(0);
        if live != 0 {
            // Blocks written into it after the scan cannot exist (it is sealed);
            // a step left out (unreadable, or the pass stopped) can.
            tracing::debug!(
                tenant = %self.tenant,
                volume = %self.name,
                segment = index,
                live_before,
                live,
                "segment still holds live blocks; kept"
            );
            return Ok(false);
        }
        if self.lock_head().next_index.checked_sub(1) == Some(index) {
            return Ok(false);
        }
        // Reads in flight may hold locations in this segment from before the
        // mapping moved: wait for them, and keep new ones out for the unlink only
        // (they then look up the committed new locations).
        let deleted = {
            let _no_reads = self
                .segment_reads
                .write()
                .unwrap_or_else(|e| e.into_inner());
            self.segments.delete(self.segment_id(index))
        };
        match deleted {
            Ok(()) => Ok(true),
            Err(error) => {
                tracing::warn!(
                    tenant = %self.tenant,
                    volume = %self.name,
                    segment = index,
                    %error,
                    "deleting a compacted segment failed; a later pass retries"
                );
                Ok(false)
            }
        }
    }
}
