//! The mapping journal: a commit of a volume with an extent index writes its
//! change to the mapping pages as one journal record instead of rewriting
//! every page it touches; a fold later writes those pages from the index and
//! deletes the records, in one commit.
//!
//! Why: random 4 KiB writes touch a different page per block, so a FLUSH of
//! 100 such writes rewrote about 100 pages. When hundreds of volumes flush in
//! the same instant their group commit rewrote tens of thousands of pages, and
//! each landed in its own leaf of the metadata store's B-tree: a third of a
//! second of commit for every FLUSH of the group. A journal record is one
//! small value per commit; the pages are written in the background, a volume
//! at a time, and pages written by several commits meanwhile are written once.
//!
//! What holds:
//! - The store's pages with the volume's journal records applied in sequence
//!   order ([`crate::mapping::scan_extents`]) are the volume's committed
//!   mappings. A journal record goes into the same batch as the rest of its
//!   commit (live counts, preserved extents, writers), so a crash keeps both
//!   or neither.
//! - Only a volume with an extent index journals: the index is the committed
//!   state a fold writes the pages from. A volume gives its index up only
//!   after a fold, and opening a volume folds what a crash left, so a volume
//!   without an index has no journal and reads its pages alone.
//! - A fold is one commit of the pages and the deletion of the records it
//!   covers. A failed fold changes nothing the reads depend on (either
//!   outcome on disk is the same mapping), so it does not poison the volume;
//!   the next one writes the same pages again.
//! - A commit journals only a scattered change: at least [`MIN_RUNS`] runs
//!   of nearby pages (at most 7 apart), and at most [`SMALL_CHANGE_PAGES`] pages or a
//!   quarter of the volume's. Other commits rewrite their pages (and fold the
//!   journal with them) as before.
//! - The journal is bounded: a commit that would take it past
//!   [`MAX_RECORDS`] records or [`MAX_PAGES`] pages folds it in the same
//!   batch instead (the commit rewrites its pages, as before the journal).
//!   The flush thread folds journals older than [`FOLD_AGE`] or touching
//!   [`FOLD_PAGES`] pages, one volume at a time; a closing volume folds its
//!   own.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::commit::MappingChange;
use super::{FlushState, VolumeInner};
use crate::error::VolumeError;
use crate::meta::Batch;
use crate::record;

/// Records at which a commit folds the journal instead of adding to it.
pub(crate) const MAX_RECORDS: usize = 256;
/// Pages (counted with repeats) at which a commit folds the journal instead
/// of adding to it: a fold commits at most about this many pages.
pub(crate) const MAX_PAGES: usize = 4096;
/// Pages at which the flush thread folds a journal whatever its age.
pub(crate) const FOLD_PAGES: usize = 1024;
/// Age of its oldest record at which the flush thread folds a journal.
pub(crate) const FOLD_AGE: Duration = Duration::from_secs(30);
/// Runs of nearby pages a change must touch at least to be journaled: pages
/// near each other share the store's tree leaves, so a change of a few runs
/// (sequential writes) costs few leaves written directly, and a journal
/// record would only add its own bytes.
pub(crate) const MIN_RUNS: usize = 4;
/// Pages at most this far apart are in one run: an extent of up to 256
/// blocks spans 7 pages and is kept in the page of its last block only, so a
/// sequential change touches every 7th page, adjacent keys.
const RUN_GAP: u64 = (crate::record::MAX_EXTENT_BLOCKS as u64).div_ceil(record::PAGE_BLOCKS);
/// Pages a change may always touch and be journaled; past this it must
/// touch at most a quarter of the volume's pages. A change that rewrites
/// much of a small volume's pages gains nothing from the journal (its fold
/// rewrites about as many), and its records would only add to the store.
pub(crate) const SMALL_CHANGE_PAGES: usize = 256;

/// A volume's journal records not yet folded (under the flush lock).
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// The sequence number of the next record.
    next: u64,
    /// The records since the last fold, by sequence number.
    records: Vec<u64>,
    /// The pages they touch (with repeats; sorted and deduplicated by a fold).
    pages: Vec<u64>,
}

impl Journal {
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Milliseconds since the first call in this process (never 0), for the
/// lock-free "oldest record" stamp the flush thread reads.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The pages a change touches.
fn pages_of(change: &MappingChange) -> impl Iterator<Item = u64> + '_ {
    change
        .removed
        .iter()
        .copied()
        .chain(change.added.iter().map(|e| e.last()))
        .map(record::page_of)
}

impl VolumeInner {
    /// Adds `change` to `batch` the way the journal says (the caller holds
    /// the flush lock and commits `batch` next): as a journal record when the
    /// volume has an index and the journal has room, otherwise as its pages
    /// rewritten, with the journal folded into the same batch. Returns what
    /// to note in the journal once the batch is durable.
    pub(super) fn journal_or_pages(
        &self,
        state: &FlushState,
        change: &MappingChange,
        batch: &mut Batch,
    ) -> Result<JournalStep, VolumeError> {
        if change.removed.is_empty() && change.added.is_empty() {
            return Ok(JournalStep::Nothing);
        }
        let journal = &state.journal;
        let mut pages: Vec<u64> = pages_of(change).collect();
        pages.sort_unstable();
        pages.dedup();
        let runs = 1 + pages.windows(2).filter(|w| w[1] - w[0] > RUN_GAP).count();
        let blocks = self.size.load(Ordering::Acquire) / u64::from(self.block_size.get());
        let volume_pages = usize::try_from(blocks / record::PAGE_BLOCKS).unwrap_or(usize::MAX);
        let indexed = self.has_index();
        debug_assert!(
            indexed || journal.is_empty(),
            "a volume without an index journals"
        );
        if indexed
            && runs >= self.journal_min_runs
            && (pages.len() <= SMALL_CHANGE_PAGES || pages.len() <= volume_pages / 4)
            && journal.records.len() < MAX_RECORDS
            && journal.pages.len() + pages.len() <= MAX_PAGES
        {
            let sequence = journal.next;
            batch.put(
                record::journal_key(self.internal_id, sequence).to_vec(),
                record::encode_journal(&change.removed, &change.added),
            );
            return Ok(JournalStep::Recorded { sequence, pages });
        }
        self.write_pages(change, &journal.pages, batch)?;
        for &sequence in &journal.records {
            batch.delete(record::journal_key(self.internal_id, sequence).to_vec());
        }
        Ok(JournalStep::Folded)
    }

    /// Notes in the journal what [`Self::journal_or_pages`] put in a batch
    /// that is now durable.
    pub(super) fn note_journal(&self, state: &mut FlushState, step: JournalStep) {
        let journal = &mut state.journal;
        match step {
            JournalStep::Nothing => return,
            JournalStep::Recorded { sequence, pages } => {
                if journal.records.is_empty() {
                    self.journal_since.store(now_ms(), Ordering::Relaxed);
                    if let Some(flusher) = &self.flusher {
                        flusher.journaled(self.me.clone());
                    }
                }
                journal.records.push(sequence);
                journal.pages.extend(pages);
                journal.next = sequence + 1;
            }
            JournalStep::Folded => {
                journal.records.clear();
                journal.pages = Vec::new();
                self.journal_since.store(0, Ordering::Relaxed);
            }
        }
        self.journal_pages
            .store(journal.pages.len(), Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(super) fn state_journal_is_empty(&self) -> bool {
        self.flush
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journal
            .is_empty()
    }

    /// Whether the volume has journal records not folded yet.
    pub(crate) fn has_journal(&self) -> bool {
        self.journal_since.load(Ordering::Relaxed) != 0
    }

    /// Whether the flush thread should fold this volume's journal now, and
    /// the pages it touches (the flush thread folds the biggest first).
    pub(crate) fn journal_due(&self) -> Option<usize> {
        let since = self.journal_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let pages = self.journal_pages.load(Ordering::Relaxed);
        let age = Duration::from_millis(now_ms().saturating_sub(since));
        (age >= FOLD_AGE || pages >= FOLD_PAGES).then_some(pages)
    }

    /// Folds the journal: writes the pages it touches from the index and
    /// deletes its records, in one commit. A poisoned volume folds nothing.
    pub(crate) fn fold_journal(&self) -> Result<(), VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.fold_journal_locked(&mut state)
    }

    /// [`Self::fold_journal`] for a caller that holds the flush lock.
    pub(super) fn fold_journal_locked(&self, state: &mut FlushState) -> Result<(), VolumeError> {
        if state.journal.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        if !self.has_index() {
            // Not reached (an index is dropped only after a fold), but the
            // store alone folds correctly too.
            crate::mapping::fold_stored_journal(self.meta.as_ref(), self.internal_id)?
                .map_err(super::corrupt)?;
            self.note_journal(state, JournalStep::Folded);
            return Ok(());
        }
        let mut batch = Batch::new();
        self.write_pages(&MappingChange::default(), &state.journal.pages, &mut batch)?;
        for &sequence in &state.journal.records {
            batch.delete(record::journal_key(self.internal_id, sequence).to_vec());
        }
        let bytes = batch.bytes();
        // Not poisoned on failure: the store holds either the journal or its
        // pages, the same mappings, and the next fold writes them again.
        self.meta.commit(&batch)?;
        self.metadata_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.note_journal(state, JournalStep::Folded);
        Ok(())
    }
}

/// What a commit did with the journal, noted once it is durable.
#[derive(Debug)]
pub(super) enum JournalStep {
    /// The change touched no page.
    Nothing,
    /// The change went into journal record `sequence`, touching `pages`.
    Recorded { sequence: u64, pages: Vec<u64> },
    /// The journal was folded (with the change, if any).
    Folded,
}
