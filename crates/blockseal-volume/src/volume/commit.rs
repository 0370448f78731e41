//! Commits: flush (segment syncs, then one atomic batch of the overlay's
//! mappings with the live counts), direct trims, and the commit-and-poison step
//! they share with compaction, which also keeps the index in step.
//!
//! This module must never acknowledge a flush before both the segment sync and
//! the metadata commit returned `Ok`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use super::ExtentView;
use super::{Epochs, FlushState, Slot, VolumeInner};
use crate::error::VolumeError;
use crate::mapping;
use crate::meta::Batch;
use crate::record::{self, Extent, MAX_EXTENT_BLOCKS};

impl VolumeInner {
    /// Drops the mappings of blocks `from..to` with one durable commit.
    pub(super) fn trim_direct(&self, from: u64, to: u64) -> Result<(), VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let mut commit = MappingCommit::default();
        self.build_commit(&[(from, to)], &[], state.snap.epochs, &mut commit)?;
        self.commit_mappings(&mut state, commit, CommitKind::Foreground)?;
        // The overlay's entries for these blocks are superseded by the trim,
        // which is now durable.
        let mut overlay = self.lock_overlay();
        let doomed: Vec<u64> = overlay.map.range(from..to).map(|(&l, _)| l).collect();
        for lba in doomed {
            overlay.map.remove(&lba);
        }
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<(), VolumeError> {
        self.check_poisoned()?;
        let target = self.lock_overlay().generation;
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if state.durable >= target {
            // Another flusher committed everything we need while we waited.
            return self.check_poisoned();
        }
        self.check_poisoned()?;
        let (generation, entries): (u64, Vec<(u64, Slot)>) = {
            let overlay = self.lock_overlay();
            (
                overlay.generation,
                overlay.map.iter().map(|(&l, &(s, _))| (l, s)).collect(),
            )
        };
        // Every entry above was installed after its segment was marked dirty, so
        // the set taken now covers them all (or an earlier flush synced them).
        let dirty = std::mem::take(&mut *self.lock_dirty());
        let syncing = std::time::Instant::now();
        for &segment in &dirty {
            if let Err(e) = self.segments.sync(self.segment_id(segment)) {
                if self.segments.sync_retriable() {
                    // Nothing was lost: the next flush syncs them again.
                    self.lock_dirty().extend(dirty.iter().copied());
                    tracing::warn!(tenant = %self.tenant, volume = %self.name, error = %e, "segment upload failed; the flush fails and the next one retries it");
                } else {
                    self.poison();
                }
                return Err(VolumeError::Io(e));
            }
        }
        if !dirty.is_empty() {
            self.sync_latency.record(syncing.elapsed());
        }
        if !entries.is_empty() {
            let runs = runs_of(&entries);
            let mut commit = MappingCommit::default();
            if let Err(e) = self.build_commit(&runs, &entries, state.snap.epochs, &mut commit) {
                self.poison();
                return Err(e);
            }
            // Every writer the entries name was made before its blocks entered
            // the overlay, so its record is among these (or already committed).
            let writers = std::mem::take(&mut *self.lock_pending_writers());
            for (number, record) in &writers {
                commit.batch.put(
                    record::writer_key(self.internal_id, *number).to_vec(),
                    record.encode(),
                );
            }
            self.put_dek_usage(&mut commit.batch);
            if let Err(e) = self.commit_mappings(&mut state, commit, CommitKind::Foreground) {
                self.lock_pending_writers().extend(writers);
                return Err(e);
            }
            let mut overlay = self.lock_overlay();
            overlay.map.retain(|_, &mut (_, g)| g > generation);
        }
        state.durable = generation;
        Ok(())
    }

    /// Adds to `batch` the record changes that make blocks in `runs` (sorted,
    /// disjoint `from..to` ranges) map as `entries` say (a block of a run without
    /// a mapped entry becomes a hole), and the per-segment live-block deltas.
    ///
    /// New extents are born in the volume's current epoch (`snap`). A block
    /// the newest snapshot still sees (born at or before its epoch) is not
    /// let go of when it is overwritten or trimmed: its extent moves to that
    /// snapshot's preserved records, and its segment keeps counting it.
    pub(super) fn build_commit(
        &self,
        runs: &[(u64, u64)],
        entries: &[(u64, Slot)],
        snap: Epochs,
        commit: &mut MappingCommit,
    ) -> Result<(), VolumeError> {
        let MappingCommit {
            batch,
            deltas,
            change,
            pinned,
        } = commit;
        let in_runs = |lba: u64| {
            let i = runs.partition_point(|&(_, to)| to <= lba);
            i < runs.len() && runs[i].0 <= lba
        };
        // Committed extents overlapping any run: deleted whole, their parts
        // outside the runs written back.
        let mut old: BTreeMap<u64, Extent> = BTreeMap::new();
        for &(from, to) in runs {
            self.visit_extents(from, to, &mut |extent| {
                old.insert(extent.lba, extent.to_extent());
            })?;
        }
        let mut puts: Vec<Extent> = Vec::new();
        for extent in old.values() {
            change.removed.push(extent.last());
            *deltas.entry(extent.segment).or_default() -= extent.tags.len() as i64;
            let keep_for = snap.newest.filter(|&newest| extent.birth <= newest);
            let mut lba = extent.lba;
            while lba <= extent.last() {
                if in_runs(lba) {
                    let start = lba;
                    while lba <= extent.last() && in_runs(lba) {
                        lba += 1;
                    }
                    if let Some(newest) = keep_for {
                        let piece = extent.slice(start, lba);
                        let n = piece.tags.len() as i64;
                        *deltas.entry(piece.segment).or_default() += n;
                        *pinned.entry(piece.segment).or_default() += n;
                        batch.put(
                            record::preserved_key(self.internal_id, newest, piece.last()).to_vec(),
                            piece.encode(),
                        );
                    }
                    continue;
                }
                let start = lba;
                while lba <= extent.last() && !in_runs(lba) {
                    lba += 1;
                }
                puts.push(extent.slice(start, lba));
            }
        }
        // New extents: runs of mapped entries contiguous in LBA, segment space and
        // nonce counter under one DEK.
        let mut current: Option<Extent> = None;
        for &(lba, slot) in entries {
            let Slot::Mapped(loc) = slot else {
                if let Some(e) = current.take() {
                    puts.push(e);
                }
                continue;
            };
            if let Some(e) = current.as_mut() {
                let n = e.tags.len();
                if e.lba + n as u64 == lba
                    && e.segment == loc.segment
                    && e.offset as u64 + n as u64 == u64::from(loc.offset)
                    && e.dek_version == loc.dek_version
                    && e.writer == loc.writer
                    && e.nonce + n as u64 == loc.nonce
                    && e.birth == snap.epoch
                    && n < MAX_EXTENT_BLOCKS
                {
                    e.tags.push(loc.tag);
                    continue;
                }
            }
            if let Some(e) = current.replace(Extent {
                lba,
                segment: loc.segment,
                offset: loc.offset,
                dek_version: loc.dek_version,
                writer: loc.writer,
                nonce: loc.nonce,
                birth: snap.epoch,
                tags: vec![loc.tag],
            }) {
                puts.push(e);
            }
        }
        if let Some(e) = current.take() {
            puts.push(e);
        }
        for extent in &puts {
            *deltas.entry(extent.segment).or_default() += extent.tags.len() as i64;
        }
        change.added.extend(puts);
        Ok(())
    }

    /// Commits `commit` (the caller holds the flush lock, and holds the overlay
    /// entries it covers until this returns): the live counts go into the same
    /// batch, and once it is durable the in-memory counts and the index follow.
    /// A failed commit poisons the volume: what the store holds is unknown.
    pub(super) fn commit_mappings(
        &self,
        state: &mut FlushState,
        commit: MappingCommit,
        kind: CommitKind,
    ) -> Result<(), VolumeError> {
        let MappingCommit {
            mut batch,
            deltas,
            change,
            pinned,
        } = commit;
        let step = match self.journal_or_pages(state, &change, &mut batch) {
            Ok(step) => step,
            Err(e) => {
                self.poison();
                return Err(e);
            }
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.apply_live(&mut batch, &state.live, &deltas);
        if let Err(e) = self.meta.commit(&batch) {
            self.poison();
            return Err(e.into());
        }
        self.note_journal(state, step);
        apply_deltas(&mut state.live, &deltas);
        apply_deltas(&mut state.snap.pinned, &pinned);
        self.apply_to_index(state, &change);
        let bytes = batch.bytes();
        match kind {
            CommitKind::Foreground => {
                self.note_dead_space(&state.live, &deltas);
                self.metadata_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                self.commits.fetch_add(1, Ordering::Relaxed);
            }
            CommitKind::Compaction => {
                self.compaction_metadata_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Adds to `batch` the mapping pages `change` touches and pages `also`,
    /// rewritten whole (the caller holds the flush lock, so the index, when
    /// the volume has one, is the committed state; otherwise the pages are
    /// read, and the volume has no journal). Within a page, removals come
    /// first and an added extent replaces one ending at the same block.
    pub(super) fn write_pages(
        &self,
        change: &MappingChange,
        also: &[u64],
        batch: &mut Batch,
    ) -> Result<(), VolumeError> {
        let mut pages: BTreeMap<u64, (Vec<u64>, Vec<&Extent>)> = BTreeMap::new();
        for &page in also {
            pages.entry(page).or_default();
        }
        for &last in &change.removed {
            pages.entry(record::page_of(last)).or_default().0.push(last);
        }
        for extent in &change.added {
            pages
                .entry(record::page_of(extent.last()))
                .or_default()
                .1
                .push(extent);
        }
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        for (page, (removed, added)) in pages {
            let key = record::page_key(self.internal_id, page).to_vec();
            // The page's extents after the change, by last block, borrowed
            // from the index (or the page as stored) and from the commit.
            let stored: Vec<Extent>;
            let mut extents: BTreeMap<u64, ExtentView<'_>> = BTreeMap::new();
            match index.as_ref() {
                Some(index) => {
                    let from = page * record::PAGE_BLOCKS;
                    let to = from.saturating_add(record::PAGE_BLOCKS);
                    index.visit(from, to, &mut |view| {
                        if record::page_of(view.last()) == page {
                            extents.insert(view.last(), view);
                        }
                    });
                }
                None => {
                    stored = mapping::load_page(self.meta.as_ref(), self.internal_id, page)?
                        .map_err(super::corrupt)?;
                    extents.extend(stored.iter().map(|e| (e.last(), ExtentView::from(e))));
                }
            }
            for last in removed {
                extents.remove(&last);
            }
            for extent in added {
                extents.insert(extent.last(), ExtentView::from(extent));
            }
            if extents.is_empty() {
                batch.delete(key);
            } else {
                let views: Vec<ExtentView<'_>> = extents.into_values().collect();
                batch.put(key, record::encode_page_views(&views));
            }
        }
        Ok(())
    }

    /// Wakes the compaction thread when a commit left a sealed segment below the
    /// compaction threshold (the caller holds the flush lock; `live` is updated).
    pub(super) fn note_dead_space(&self, live: &HashMap<u32, u64>, deltas: &HashMap<u32, i64>) {
        let Some(wake) = &self.wake else {
            return;
        };
        let sealed_below = self.sealed_below();
        let limit = self.compact_threshold * f64::from(self.segment_blocks);
        let dead = deltas.iter().any(|(&segment, &delta)| {
            delta < 0
                && segment < sealed_below
                && (live.get(&segment).copied().unwrap_or(0) as f64) < limit
        });
        if dead {
            wake.notify();
        }
    }

    /// Every segment below this index is sealed: no write will go to it again.
    pub(super) fn sealed_below(&self) -> u32 {
        let head = self.lock_head();
        head.segment.unwrap_or(head.next_index)
    }

    /// Adds the updated live-block counts of the segments in `deltas` to `batch`.
    pub(super) fn apply_live(
        &self,
        batch: &mut Batch,
        live: &HashMap<u32, u64>,
        deltas: &HashMap<u32, i64>,
    ) {
        for (&segment, &delta) in deltas {
            if delta == 0 {
                continue;
            }
            let now = live.get(&segment).copied().unwrap_or(0) as i64 + delta;
            let key = record::live_key(self.internal_id, segment).to_vec();
            if now <= 0 {
                batch.delete(key);
            } else {
                batch.put(key, record::encode_u64(now as u64).to_vec());
            }
        }
    }
}

pub(super) fn apply_deltas(live: &mut HashMap<u32, u64>, deltas: &HashMap<u32, i64>) {
    for (&segment, &delta) in deltas {
        let now = live.get(&segment).copied().unwrap_or(0) as i64 + delta;
        if now <= 0 {
            live.remove(&segment);
        } else {
            live.insert(segment, now as u64);
        }
    }
}

/// A mapping commit being built: the batch, the live-count changes per
/// segment it makes, and the index changes to apply once it is durable.
#[derive(Default)]
pub(super) struct MappingCommit {
    pub(super) batch: Batch,
    pub(super) deltas: HashMap<u32, i64>,
    pub(super) change: MappingChange,
    /// Changes of the blocks per segment that only snapshots reference.
    pub(super) pinned: HashMap<u32, i64>,
}

/// Extent records a commit removes (by last LBA) and adds, removals first.
#[derive(Default)]
pub(super) struct MappingChange {
    pub(super) removed: Vec<u64>,
    pub(super) added: Vec<Extent>,
}

/// Who commits: foreground commits count as the volume's commits and may
/// leave dead space to compact; compaction's own are counted apart.
#[derive(Clone, Copy)]
pub(super) enum CommitKind {
    Foreground,
    Compaction,
}

/// The maximal runs of consecutive LBAs among sorted `entries`, as `from..to`.
pub(super) fn runs_of(entries: &[(u64, Slot)]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(lba, _) in entries {
        match runs.last_mut() {
            Some((_, to)) if *to == lba => *to += 1,
            _ => runs.push((lba, lba + 1)),
        }
    }
    runs
}
