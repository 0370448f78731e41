//! How a volume's committed extents sit in the metadata store: mapping pages.
//!
//! Extents are grouped by the last block they cover into pages of 40 LBAs
//! ([`record::PAGE_BLOCKS`]), one record per page (`docs/FORMAT.md`, "Mapping
//! page"). Random 4 KiB writes leave one single-block extent per block; one
//! record per page instead of one per block keeps the backends' per-entry
//! overhead (about 84 bytes on redb, 138 on sled) off every block. Forty
//! single-block extents make a value of about 1.3 KB, three of which fill a
//! 4 KiB redb leaf: measured against 32 and 64 LBAs per page, the store on
//! disk was smallest there.
//!
//! A volume with an extent index commits its changes as mapping journal
//! records instead (`volume/journal.rs`), applied on top of the pages until a
//! fold writes them in: [`scan_extents`] reads pages with the journal applied.
//!
//! Stores written before pages kept one record per extent (`m` keys); opening
//! such a store moves them into pages ([`migrate_extent_records`]).

use std::collections::BTreeMap;

use crate::meta::{Batch, MetaError, MetaStore, prefix_end};
use crate::record::{self, Corrupt, Extent, JournalChange};

/// Visits volume `volume`'s committed extents that end at or after block
/// `from`, in LBA order, until `visit` returns `false`: its mapping pages
/// with its journal applied. A record that does not decode ends the scan with
/// its error.
pub(crate) fn scan_extents(
    meta: &dyn MetaStore,
    volume: u32,
    from: u64,
    visit: &mut dyn FnMut(Extent) -> bool,
) -> Result<Result<(), Corrupt>, MetaError> {
    let journal = match load_journal(meta, volume)? {
        Ok(journal) => journal,
        Err(e) => return Ok(Err(e)),
    };
    if journal.is_empty() {
        return scan_pages(meta, volume, from, visit);
    }
    let journaled = match journaled_pages(meta, volume, &journal)? {
        Ok(pages) => pages,
        Err(e) => return Ok(Err(e)),
    };
    // Pages the journal touched replace the stored ones, in page order.
    let mut fixed = journaled.range(record::page_of(from)..).peekable();
    let emit = |extents: &[Extent], visit: &mut dyn FnMut(Extent) -> bool| {
        extents
            .iter()
            .filter(|e| e.last() >= from)
            .all(|e| visit(e.clone()))
    };
    let mut outcome = Ok(());
    let mut stopped = false;
    let start = record::page_key(volume, record::page_of(from));
    let end = prefix_end(&record::page_prefix(volume));
    meta.scan(&start, end.as_deref(), &mut |key, value| {
        let page = match record::page_key_number(key) {
            Ok(page) => page,
            Err(e) => {
                outcome = Err(e);
                return false;
            }
        };
        while let Some((_, extents)) = fixed.next_if(|(p, _)| **p < page) {
            if !emit(extents, visit) {
                stopped = true;
                return false;
            }
        }
        let extents = match fixed.next_if(|(p, _)| **p == page) {
            Some((_, extents)) => emit(extents, visit),
            None => match record::decode_page_at(page, value) {
                Ok(extents) => emit(&extents, visit),
                Err(e) => {
                    outcome = Err(e);
                    return false;
                }
            },
        };
        stopped = !extents;
        extents
    })?;
    if outcome.is_ok() && !stopped {
        for (_, extents) in fixed {
            if !emit(extents, visit) {
                break;
            }
        }
    }
    Ok(outcome)
}

/// [`scan_extents`] of the mapping pages alone: for an open volume without an
/// extent index, whose journal is empty (a volume journals only while it has
/// an index, and folds its journal before giving the index up).
pub(crate) fn scan_pages(
    meta: &dyn MetaStore,
    volume: u32,
    from: u64,
    visit: &mut dyn FnMut(Extent) -> bool,
) -> Result<Result<(), Corrupt>, MetaError> {
    let start = record::page_key(volume, record::page_of(from));
    let end = prefix_end(&record::page_prefix(volume));
    let mut outcome = Ok(());
    meta.scan(
        &start,
        end.as_deref(),
        &mut |key, value| match record::decode_page(key, value) {
            Ok(extents) => {
                for extent in extents {
                    if extent.last() >= from && !visit(extent) {
                        return false;
                    }
                }
                true
            }
            Err(e) => {
                outcome = Err(e);
                false
            }
        },
    )?;
    Ok(outcome)
}

/// Volume `volume`'s journal records in commit order.
pub(crate) fn load_journal(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<Result<Vec<(u64, JournalChange)>, Corrupt>, MetaError> {
    let mut journal = Vec::new();
    let mut outcome = Ok(());
    meta.scan_prefix(&record::journal_prefix(volume), &mut |key, value| {
        match record::journal_key_sequence(key)
            .and_then(|sequence| Ok((sequence, record::decode_journal(value)?)))
        {
            Ok(entry) => {
                journal.push(entry);
                true
            }
            Err(e) => {
                outcome = Err(e);
                false
            }
        }
    })?;
    Ok(outcome.map(|()| journal))
}

/// The pages `journal` touches, as the stored pages are with every journal
/// record applied in order (an empty page has no extents left).
pub(crate) fn journaled_pages(
    meta: &dyn MetaStore,
    volume: u32,
    journal: &[(u64, JournalChange)],
) -> Result<Result<BTreeMap<u64, Vec<Extent>>, Corrupt>, MetaError> {
    let mut pages: BTreeMap<u64, BTreeMap<u64, Extent>> = BTreeMap::new();
    for (_, change) in journal {
        let touched = change
            .removed
            .iter()
            .copied()
            .chain(change.added.iter().map(Extent::last));
        for last in touched {
            if let std::collections::btree_map::Entry::Vacant(entry) =
                pages.entry(record::page_of(last))
            {
                let stored = match load_page(meta, volume, *entry.key())? {
                    Ok(stored) => stored,
                    Err(e) => return Ok(Err(e)),
                };
                entry.insert(stored.into_iter().map(|e| (e.last(), e)).collect());
            }
        }
        for last in &change.removed {
            if let Some(page) = pages.get_mut(&record::page_of(*last)) {
                page.remove(last);
            }
        }
        for extent in &change.added {
            if let Some(page) = pages.get_mut(&record::page_of(extent.last())) {
                page.insert(extent.last(), extent.clone());
            }
        }
    }
    Ok(Ok(pages
        .into_iter()
        .map(|(page, extents)| (page, extents.into_values().collect()))
        .collect()))
}

/// Folds volume `volume`'s journal from the store alone (at open, before a
/// repair): the pages it touches are written as they are with it applied and
/// its records deleted, in one commit. Returns the records folded.
pub(crate) fn fold_stored_journal(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<Result<usize, Corrupt>, MetaError> {
    let journal = match load_journal(meta, volume)? {
        Ok(journal) if journal.is_empty() => return Ok(Ok(0)),
        Ok(journal) => journal,
        Err(e) => return Ok(Err(e)),
    };
    let pages = match journaled_pages(meta, volume, &journal)? {
        Ok(pages) => pages,
        Err(e) => return Ok(Err(e)),
    };
    let mut batch = Batch::new();
    for (page, extents) in pages {
        PageEdit::new(extents).write(volume, page, &mut batch);
    }
    for (sequence, _) in &journal {
        batch.delete(record::journal_key(volume, *sequence).to_vec());
    }
    meta.commit(&batch)?;
    Ok(Ok(journal.len()))
}

/// The extents of one page, by last block, as the move of per-extent records
/// builds it.
struct PageEdit {
    extents: BTreeMap<u64, Extent>,
}

impl PageEdit {
    /// A page holding `extents` (each ending in the page).
    fn new(extents: impl IntoIterator<Item = Extent>) -> PageEdit {
        PageEdit {
            extents: extents.into_iter().map(|e| (e.last(), e)).collect(),
        }
    }

    /// Adds `extent`, replacing one ending at the same block.
    fn put(&mut self, extent: Extent) {
        self.extents.insert(extent.last(), extent);
    }

    /// Adds the page's new value (or its removal, when empty) to `batch`.
    fn write(self, volume: u32, page: u64, batch: &mut Batch) {
        let key = record::page_key(volume, page).to_vec();
        if self.extents.is_empty() {
            batch.delete(key);
        } else {
            let extents: Vec<Extent> = self.extents.into_values().collect();
            batch.put(key, record::encode_page(&extents));
        }
    }
}

/// The page's extents as the store holds them (none when it holds no page).
pub(crate) fn load_page(
    meta: &dyn MetaStore,
    volume: u32,
    page: u64,
) -> Result<Result<Vec<Extent>, Corrupt>, MetaError> {
    Ok(match meta.get(&record::page_key(volume, page))? {
        Some(value) => record::decode_page_at(page, &value),
        None => Ok(Vec::new()),
    })
}

/// Records moved per batch when a store's per-extent records become pages.
const MIGRATE_BATCH: usize = 4096;

/// Moves every per-extent mapping record (`m` keys, stores before pages) into
/// mapping pages, a few thousand per atomic batch, each page whole in one
/// batch with the deletion of its records. Idempotent: a store interrupted
/// half-way is finished at its next open. A record that does not decode stays
/// where it is (its volume then fails its open check, or a repair drops it).
/// Returns the records moved.
pub(crate) fn migrate_extent_records(meta: &dyn MetaStore) -> Result<u64, MetaError> {
    let end = prefix_end(b"m");
    let mut start = b"m".to_vec();
    let mut moved = 0u64;
    loop {
        // Records of whole pages: a page is never split across batches.
        let mut records: Vec<(Vec<u8>, u32, Extent)> = Vec::new();
        let mut skipped: Vec<Vec<u8>> = Vec::new();
        let mut next: Option<Vec<u8>> = None;
        meta.scan(&start, end.as_deref(), &mut |key, value| {
            let volume = key
                .get(1..5)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes);
            match (volume, Extent::decode(key, value)) {
                (Some(volume), Ok(extent)) => {
                    if records.len() >= MIGRATE_BATCH
                        && records.last().is_some_and(|(_, v, e)| {
                            (*v, record::page_of(e.last()))
                                != (volume, record::page_of(extent.last()))
                        })
                    {
                        next = Some(key.to_vec());
                        return false;
                    }
                    records.push((key.to_vec(), volume, extent));
                }
                _ => skipped.push(key.to_vec()),
            }
            true
        })?;
        for key in &skipped {
            tracing::warn!(
                key = %key.escape_ascii(),
                "a mapping record that does not decode was left in place"
            );
        }
        if records.is_empty() {
            return Ok(moved);
        }
        // By (volume, page): the records' keys and extents.
        type Records = Vec<(Vec<u8>, Extent)>;
        let mut pages: BTreeMap<(u32, u64), Records> = BTreeMap::new();
        for (key, volume, extent) in records {
            let page = record::page_of(extent.last());
            pages.entry((volume, page)).or_default().push((key, extent));
        }
        let mut batch = Batch::new();
        for ((volume, page), extents) in pages {
            // A page the store already holds is merged, never replaced; one
            // that does not decode keeps its records beside it.
            let held = match load_page(meta, volume, page)? {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(
                        volume,
                        page,
                        error = %e.0,
                        "mapping records left in place: their page does not decode"
                    );
                    continue;
                }
            };
            let mut edit = PageEdit::new(held);
            for (key, extent) in extents {
                edit.put(extent);
                batch.delete(key);
                moved += 1;
            }
            edit.write(volume, page, &mut batch);
        }
        if !batch.is_empty() {
            meta.commit(&batch)?;
        }
        match next {
            Some(key) => start = key,
            None => return Ok(moved),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::meta::{self, BackendKind};
    use crate::seal::TAG_LEN;

    const VOLUME: u32 = 7;

    fn extent(lba: u64, blocks: u64, stamp: u8) -> Extent {
        Extent {
            lba,
            segment: 1,
            offset: (lba % 1000) as u32,
            dek_version: 1,
            writer: 1,
            nonce: lba,
            birth: 0,
            tags: vec![[stamp; TAG_LEN]; blocks as usize],
        }
    }

    /// Maps blocks `from..to` to a new extent (or trims them), the way a
    /// commit changes the pages: extents overlapping the run are removed
    /// whole and their parts outside it added back.
    fn change(
        state: &mut BTreeMap<u64, Extent>,
        from: u64,
        to: u64,
        write: Option<u8>,
    ) -> JournalChange {
        let mut out = JournalChange::default();
        let overlapping: Vec<Extent> = state
            .values()
            .filter(|e| e.lba < to && e.last() >= from)
            .cloned()
            .collect();
        for old in overlapping {
            state.remove(&old.last());
            out.removed.push(old.last());
            if old.lba < from {
                out.added.push(old.slice(old.lba, from));
            }
            if old.last() >= to {
                out.added.push(old.slice(to, old.last() + 1));
            }
        }
        if let Some(stamp) = write {
            out.added.push(extent(from, to - from, stamp));
        }
        for e in &out.added {
            state.insert(e.last(), e.clone());
        }
        out
    }

    /// [`scan_extents`] or [`scan_pages`].
    type Scan = fn(
        &dyn MetaStore,
        u32,
        u64,
        &mut dyn FnMut(Extent) -> bool,
    ) -> Result<Result<(), Corrupt>, MetaError>;

    fn collect(scan: Scan, meta: &dyn MetaStore, from: u64, limit: usize) -> Vec<Extent> {
        let mut out = Vec::new();
        scan(meta, VOLUME, from, &mut |e| {
            out.push(e);
            out.len() < limit
        })
        .unwrap()
        .unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Pages with a journal on top read as the mappings after every
        /// commit, from any block and stopped anywhere; a fold leaves pages
        /// alone that read the same, and no journal.
        #[test]
        fn pages_with_the_journal_read_as_every_commit_made(
            commits in prop::collection::vec(
                (0u64..400, 1u64..60, prop::option::weighted(0.8, any::<u8>())),
                1..40,
            ),
            folded in 0usize..40,
            from in 0u64..460,
            limit in 1usize..50,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let meta: Arc<dyn MetaStore> =
                Arc::from(meta::open(BackendKind::Redb, &dir.path().join("meta")).unwrap());
            let mut state = BTreeMap::new();
            let mut journal = Vec::new();
            for (n, &(lba, blocks, write)) in commits.iter().enumerate() {
                let c = change(&mut state, lba, lba + blocks, write);
                if n < folded {
                    // Straight into the pages, as a commit without a journal.
                    let mut pages: BTreeMap<u64, PageEdit> = BTreeMap::new();
                    for last in c.removed.iter().copied().chain(c.added.iter().map(Extent::last)) {
                        let page = record::page_of(last);
                        pages.entry(page).or_insert_with(|| {
                            PageEdit::new(load_page(meta.as_ref(), VOLUME, page).unwrap().unwrap())
                        });
                    }
                    for last in &c.removed {
                        pages.get_mut(&record::page_of(*last)).unwrap().extents.remove(last);
                    }
                    for e in &c.added {
                        pages.get_mut(&record::page_of(e.last())).unwrap().put(e.clone());
                    }
                    let mut batch = Batch::new();
                    for (page, edit) in pages {
                        edit.write(VOLUME, page, &mut batch);
                    }
                    meta.commit(&batch).unwrap();
                } else {
                    let mut batch = Batch::new();
                    batch.put(
                        record::journal_key(VOLUME, n as u64).to_vec(),
                        record::encode_journal(&c.removed, &c.added),
                    );
                    meta.commit(&batch).unwrap();
                    journal.push(n);
                }
            }
            let expected: Vec<Extent> = state
                .values()
                .filter(|e| e.last() >= from)
                .take(limit)
                .cloned()
                .collect();
            prop_assert_eq!(&collect(scan_extents, meta.as_ref(), from, limit), &expected);
            let records = fold_stored_journal(meta.as_ref(), VOLUME).unwrap().unwrap();
            prop_assert_eq!(records, journal.len());
            prop_assert!(load_journal(meta.as_ref(), VOLUME).unwrap().unwrap().is_empty());
            prop_assert_eq!(&collect(scan_pages, meta.as_ref(), from, limit), &expected);
            prop_assert_eq!(&collect(scan_extents, meta.as_ref(), from, limit), &expected);
        }
    }

    #[test]
    fn a_journal_record_that_does_not_decode_is_corrupt_for_readers() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetaStore> =
            Arc::from(meta::open(BackendKind::Redb, &dir.path().join("meta")).unwrap());
        let mut batch = Batch::new();
        batch.put(record::journal_key(VOLUME, 0).to_vec(), vec![1, 0, 0, 0, 9]);
        meta.commit(&batch).unwrap();
        let scanned = scan_extents(meta.as_ref(), VOLUME, 0, &mut |_| true).unwrap();
        assert!(scanned.is_err());
        assert!(fold_stored_journal(meta.as_ref(), VOLUME).unwrap().is_err());
    }
}
