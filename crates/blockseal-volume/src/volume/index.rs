//! The in-memory extent index: a volume's committed mappings, so reads and
//! commits never touch the metadata store for them.
//!
//! The metadata store stays the truth on disk; the index is a copy of the
//! volume's extent records, built from them (at open, or when reloaded) and
//! changed only by the commits that change them, right after the commit
//! returned and before the overlay forgets the entries it committed (a read
//! that misses the overlay must find the committed mapping in the index).
//! Every change happens under the volume's flush lock, like the commits.
//!
//! # Memory
//!
//! An entry costs [`ENTRY_BYTES`] plus 16 bytes per block beyond the first
//! (the tags): a volume written in scattered 4 KiB blocks holds about 38 MiB of
//! index per GiB written, one written sequentially about 4.2 MiB per GiB. A
//! store-wide [`IndexBudget`] bounds the sum over open volumes. A volume whose
//! index does not fit goes without one and reads its mappings from the store,
//! as every volume did before; the store's background thread gives hot
//! volumes back an index (see [`IndexBudget`]).
//!
//! This module must never hold a mapping the store does not hold after the
//! commit that made it returned, and never account bytes it did not charge.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{FlushState, Location, MappingChange, VolumeInner};
use crate::error::VolumeError;
use crate::record::Extent;
use crate::seal::TAG_LEN;

/// Bytes one entry costs: the map's key and value and the segment set's
/// element, with the B-trees' node overhead and the allocator's. Measured:
/// 50 volumes with 26,214 scattered extents each held 3.7 MiB of index each
/// (server RSS less the metadata store's cache), about 150 bytes per extent.
pub(crate) const ENTRY_BYTES: usize = 152;

/// The tags of an extent: one inline (scattered writes), or many on the heap.
#[derive(Debug, Clone)]
enum Tags {
    One([u8; TAG_LEN]),
    Many(Box<[[u8; TAG_LEN]]>),
}

impl Tags {
    pub(super) fn as_slice(&self) -> &[[u8; TAG_LEN]] {
        match self {
            Tags::One(tag) => std::slice::from_ref(tag),
            Tags::Many(tags) => tags,
        }
    }
}

/// One extent, keyed in the map by its last LBA.
#[derive(Debug, Clone)]
struct Entry {
    segment: u32,
    offset: u32,
    dek_version: u32,
    writer: u32,
    birth: u32,
    nonce: u64,
    tags: Tags,
}

/// A committed extent as the index holds it, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtentView<'a> {
    pub(crate) lba: u64,
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) dek_version: u32,
    pub(crate) writer: u32,
    pub(crate) nonce: u64,
    pub(crate) birth: u32,
    pub(crate) tags: &'a [[u8; TAG_LEN]],
}

impl ExtentView<'_> {
    /// Where block `k` of the extent lives and how it was sealed.
    pub(super) fn location(&self, k: usize) -> Location {
        Location {
            segment: self.segment,
            offset: self.offset + k as u32,
            dek_version: self.dek_version,
            writer: self.writer,
            nonce: self.nonce + k as u64,
            tag: self.tags[k],
        }
    }

    /// The LBA of the extent's last block.
    pub(crate) fn last(&self) -> u64 {
        self.lba + (self.tags.len() as u64 - 1)
    }

    /// An owned copy.
    pub(crate) fn to_extent(self) -> Extent {
        Extent {
            lba: self.lba,
            segment: self.segment,
            offset: self.offset,
            dek_version: self.dek_version,
            writer: self.writer,
            nonce: self.nonce,
            birth: self.birth,
            tags: self.tags.to_vec(),
        }
    }
}

impl<'a> From<&'a Extent> for ExtentView<'a> {
    fn from(e: &'a Extent) -> ExtentView<'a> {
        ExtentView {
            lba: e.lba,
            segment: e.segment,
            offset: e.offset,
            dek_version: e.dek_version,
            writer: e.writer,
            nonce: e.nonce,
            birth: e.birth,
            tags: &e.tags,
        }
    }
}

/// A volume's committed extents, by last LBA, and which lie in each segment
/// (so compaction finds a segment's blocks without walking every extent).
#[derive(Debug, Default)]
pub(crate) struct ExtentIndex {
    map: BTreeMap<u64, Entry>,
    /// `(segment, last LBA)` of every extent in `map`.
    by_segment: BTreeSet<(u32, u64)>,
    bytes: usize,
}

fn entry_bytes(blocks: usize) -> usize {
    if blocks <= 1 {
        ENTRY_BYTES
    } else {
        ENTRY_BYTES + blocks * TAG_LEN
    }
}

impl ExtentIndex {
    /// The memory the index holds, as accounted.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `extent` (replacing one with the same last LBA).
    pub(crate) fn insert(&mut self, extent: &Extent) {
        let tags = match extent.tags.as_slice() {
            [one] => Tags::One(*one),
            many => Tags::Many(many.into()),
        };
        let entry = Entry {
            segment: extent.segment,
            offset: extent.offset,
            dek_version: extent.dek_version,
            writer: extent.writer,
            birth: extent.birth,
            nonce: extent.nonce,
            tags,
        };
        self.bytes += entry_bytes(extent.tags.len());
        self.by_segment.insert((extent.segment, extent.last()));
        if let Some(old) = self.map.insert(extent.last(), entry) {
            self.bytes -= entry_bytes(old.tags.as_slice().len());
            if old.segment != extent.segment {
                self.by_segment.remove(&(old.segment, extent.last()));
            }
        }
    }

    /// Removes the extent whose last LBA is `last`, if any.
    pub(crate) fn remove(&mut self, last: u64) {
        if let Some(old) = self.map.remove(&last) {
            self.by_segment.remove(&(old.segment, last));
            self.bytes -= entry_bytes(old.tags.as_slice().len());
        }
    }

    /// Visits the extents lying in `segment`, in LBA order.
    pub(crate) fn visit_segment(&self, segment: u32, visit: &mut dyn FnMut(ExtentView<'_>)) {
        for &(_, last) in self.by_segment.range((segment, 0)..=(segment, u64::MAX)) {
            if let Some(entry) = self.map.get(&last) {
                visit(view(last, entry));
            }
        }
    }

    /// Visits the extents overlapping blocks `from..to`, in order.
    pub(crate) fn visit<'a>(&'a self, from: u64, to: u64, visit: &mut dyn FnMut(ExtentView<'a>)) {
        for (&last, entry) in self.map.range(from..) {
            let view = view(last, entry);
            if view.lba >= to {
                break;
            }
            visit(view);
        }
    }

    /// The number of extents.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

fn view(last: u64, entry: &Entry) -> ExtentView<'_> {
    let tags = entry.tags.as_slice();
    ExtentView {
        lba: last - (tags.len() as u64 - 1),
        segment: entry.segment,
        offset: entry.offset,
        dek_version: entry.dek_version,
        writer: entry.writer,
        nonce: entry.nonce,
        birth: entry.birth,
        tags,
    }
}

/// The memory all open volumes' indexes may hold together.
///
/// Volumes charge what their index grows by and release what it shrinks by.
/// A volume opening takes an index only when it fits; one whose index grows
/// past the budget drops it. The store's background thread moves the budget to
/// where reads are: a volume without an index whose reads went to the store
/// since the last pass gets one (loaded under its flush lock) when it fits,
/// after the indexes of volumes that served no request since the last pass were dropped
/// to make room.
#[derive(Debug)]
pub(crate) struct IndexBudget {
    limit: usize,
    used: AtomicUsize,
}

impl IndexBudget {
    pub(crate) fn new(limit: usize) -> IndexBudget {
        IndexBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` if they fit; `false` (nothing taken) when they do not.
    pub(crate) fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    /// Takes `bytes` whether or not they fit; `false` when the budget is now
    /// exceeded (the caller should give its index up).
    pub(crate) fn charge(&self, bytes: usize) -> bool {
        self.used.fetch_add(bytes, Ordering::AcqRel) + bytes <= self.limit
    }

    /// Gives back `bytes` charged earlier.
    pub(crate) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes charged now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl VolumeInner {
    /// Applies a durable mapping commit to the index (the caller holds the flush
    /// lock, and the overlay still holds the entries committed). An index that
    /// outgrows the store's budget is given up, after the mapping journal it
    /// stands for is folded: reads then use the store.
    pub(super) fn apply_to_index(&self, state: &mut FlushState, change: &MappingChange) {
        if self.apply_to_index_charged(change) {
            return;
        }
        if let Err(error) = self.fold_journal_locked(state) {
            // Kept over the budget until a fold succeeds: without it, reads
            // of the pages alone would miss the journal.
            tracing::warn!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "folding the mapping journal failed: the extent index stays over the budget"
            );
            return;
        }
        self.release_index();
        tracing::debug!(
            tenant = %self.tenant,
            volume = %self.name,
            "extent index given up: the store's index budget is spent"
        );
    }

    /// Applies `change` to the index and charges the budget for its growth;
    /// `false` when the budget is now exceeded.
    fn apply_to_index_charged(&self, change: &MappingChange) -> bool {
        let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
        let Some(index) = guard.as_mut() else {
            return true;
        };
        let before = index.bytes();
        for &last in &change.removed {
            index.remove(last);
        }
        for extent in &change.added {
            index.insert(extent);
        }
        let after = index.bytes();
        if after <= before {
            self.budget.release(before - after);
            true
        } else {
            self.budget.charge(after - before)
        }
    }

    /// Whether the volume holds its mappings in memory.
    pub(crate) fn has_index(&self) -> bool {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Drops the index (its memory goes back to the budget) after folding the
    /// mapping journal, which the index stands for; keeps it when the fold
    /// fails. Returns the bytes released.
    pub(crate) fn drop_index(&self) -> usize {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if !state.journal.is_empty()
            && let Err(error) = self.fold_journal_locked(&mut state)
        {
            tracing::warn!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "folding the mapping journal failed: the extent index stays"
            );
            return 0;
        }
        self.release_index()
    }

    /// Drops the index without folding the journal: for a closing volume
    /// only (the next open folds what is left). Returns the bytes released.
    pub(super) fn release_index(&self) -> usize {
        let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
        let bytes = guard.take().map_or(0, |index| index.bytes());
        self.budget.release(bytes);
        bytes
    }

    /// Builds the index from the metadata store if it fits in the budget (under
    /// the flush lock, so no commit changes the records meanwhile). Returns
    /// whether the volume has an index afterwards.
    pub(crate) fn load_index(&self) -> Result<bool, VolumeError> {
        let _state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if self.has_index() {
            return Ok(true);
        }
        let limit = self.budget.limit().saturating_sub(self.budget.used());
        let mut built = Some(ExtentIndex::default());
        self.scan_store(0, u64::MAX, &mut |extent| {
            if let Some(index) = built.as_mut() {
                index.insert(&extent);
                if index.bytes() > limit {
                    built = None;
                }
            }
        })?;
        match built {
            Some(index) if self.budget.try_charge(index.bytes()) => {
                *self.index.write().unwrap_or_else(|e| e.into_inner()) = Some(index);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Since the budget's last pass: the lookups that went to the metadata
    /// store, and the requests the volume served.
    pub(crate) fn take_pass_counts(&self) -> (u64, u64) {
        let requests = self.requests.load(Ordering::Relaxed);
        (
            self.store_lookups.swap(0, Ordering::Relaxed),
            requests - self.requests_at_pass.swap(requests, Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(lba: u64, blocks: usize) -> Extent {
        Extent {
            lba,
            segment: 1,
            offset: lba as u32,
            dek_version: 1,
            writer: 1,
            nonce: lba,
            birth: 0,
            tags: (0..blocks).map(|k| [k as u8; TAG_LEN]).collect(),
        }
    }

    #[test]
    fn visit_finds_overlapping_extents_in_order() {
        let mut index = ExtentIndex::default();
        index.insert(&extent(0, 4));
        index.insert(&extent(10, 1));
        index.insert(&extent(11, 3));
        let mut seen = Vec::new();
        index.visit(3, 12, &mut |e| seen.push((e.lba, e.tags.len())));
        assert_eq!(seen, vec![(0, 4), (10, 1), (11, 3)]);
        seen.clear();
        index.visit(4, 10, &mut |e| seen.push((e.lba, e.tags.len())));
        assert!(seen.is_empty());
        seen.clear();
        index.visit(13, 14, &mut |e| seen.push((e.lba, e.tags.len())));
        assert_eq!(seen, vec![(11, 3)]);
        let got = {
            let mut one = None;
            index.visit(11, 12, &mut |e| one = Some(e.to_extent()));
            one.unwrap()
        };
        assert_eq!(got, extent(11, 3));
    }

    #[test]
    fn segments_know_their_extents() {
        let mut index = ExtentIndex::default();
        let mut a = extent(0, 2);
        a.segment = 7;
        let mut b = extent(5, 1);
        b.segment = 3;
        let mut c = extent(9, 2);
        c.segment = 7;
        for e in [&a, &b, &c] {
            index.insert(e);
        }
        let in_segment = |index: &ExtentIndex, s: u32| {
            let mut seen = Vec::new();
            index.visit_segment(s, &mut |e| seen.push(e.lba));
            seen
        };
        assert_eq!(in_segment(&index, 7), vec![0, 9]);
        assert_eq!(in_segment(&index, 3), vec![5]);
        // Replacing an extent moves it between segments.
        let mut b2 = b.clone();
        b2.segment = 7;
        index.insert(&b2);
        assert_eq!(in_segment(&index, 3), Vec::<u64>::new());
        assert_eq!(in_segment(&index, 7), vec![0, 5, 9]);
        index.remove(10);
        assert_eq!(in_segment(&index, 7), vec![0, 5]);
    }

    #[test]
    fn bytes_follow_inserts_and_removes() {
        let mut index = ExtentIndex::default();
        index.insert(&extent(0, 1));
        assert_eq!(index.bytes(), ENTRY_BYTES);
        index.insert(&extent(5, 4));
        assert_eq!(index.bytes(), 2 * ENTRY_BYTES + 4 * TAG_LEN);
        // Same last LBA: replaced, not added.
        index.insert(&extent(8, 1));
        assert_eq!(index.bytes(), 2 * ENTRY_BYTES);
        index.remove(8);
        index.remove(0);
        index.remove(99);
        assert_eq!((index.bytes(), index.len()), (0, 0));
    }

    #[test]
    fn budget_refuses_what_does_not_fit() {
        let budget = IndexBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(41));
        assert!(budget.try_charge(40));
        assert!(!budget.charge(1));
        budget.release(41);
        assert_eq!(budget.used(), 60);
        assert!(budget.charge(40));
    }
}
