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
//! Stores written before pages kept one record per extent (`m` keys); opening
//! such a store moves them into pages ([`migrate_extent_records`]).

use std::collections::BTreeMap;

use crate::meta::{Batch, MetaError, MetaStore, prefix_end};
use crate::record::{self, Corrupt, Extent};

/// Visits volume `volume`'s committed extents that end at or after block
/// `from`, in LBA order, until `visit` returns `false`. A page that does not
/// decode ends the scan with its error.
pub(crate) fn scan_extents(
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
