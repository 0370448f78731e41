//! The checks a volume's metadata passes at open, before anything is served.

use std::collections::{BTreeSet, HashMap, HashSet};

use blockseal_keys::DataKey;

use super::corrupt;
use super::index::ExtentIndex;
use crate::error::VolumeError;
use crate::mapping;
use crate::meta::MetaStore;
use crate::record::{self, WriterRecord};

/// The volume's writer records, by number.
pub(super) fn load_writers(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<HashMap<u32, WriterRecord>, VolumeError> {
    let mut writers = HashMap::new();
    let mut bad = None;
    meta.scan_prefix(&record::writer_prefix(volume), &mut |key, value| {
        match record::writer_key_number(key)
            .and_then(|n| WriterRecord::decode(value).map(|r| (n, r)))
        {
            Ok((0, _)) => {
                bad = Some(record::Corrupt("writer record numbered 0".into()));
                false
            }
            Ok((n, r)) => {
                writers.insert(n, r);
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        }
    })?;
    match bad {
        Some(e) => Err(corrupt(e)),
        None => Ok(writers),
    }
}

/// Checks at open that the committed mappings hang together: extents come in
/// order without overlap, every extent names a writer the volume has a record
/// of (or a DEK it holds, for format v1 blocks), and the blocks mapped into each
/// segment, with the blocks `preserved` for snapshots, add up to its live count. Mappings
/// and counts change only together, in one batch, so a difference means records
/// went missing (a damaged metadata file, a partial restore): serving on would
/// read lost blocks as zeros.
pub(super) fn check_extents(
    meta: &dyn MetaStore,
    volume: u32,
    deks: &HashMap<u32, DataKey>,
    writers: &HashMap<u32, WriterRecord>,
    live: &HashMap<u32, u64>,
    preserved: &HashMap<u32, u64>,
    index_limit: usize,
) -> Result<(HashSet<u32>, Option<ExtentIndex>), VolumeError> {
    // Blocks snapshots hold count in their segments' live counts too.
    let mut mapped: HashMap<u32, u64> = preserved.clone();
    let mut named: HashSet<u32> = HashSet::new();
    let mut bad: Option<String> = None;
    let mut next_lba = 0u64;
    // Built on the way; given up once it outgrows what the budget could hold.
    let mut index = Some(ExtentIndex::default());
    let scanned = mapping::scan_extents(meta, volume, 0, &mut |extent| {
        // Pages sort by last LBA and extents never overlap: an extent out of
        // that order is a damaged key, which a lookup would miss.
        if extent.lba < next_lba {
            bad = Some(format!(
                "mapping records overlap or are out of order at block {}",
                extent.lba
            ));
            return false;
        }
        next_lba = extent.last().saturating_add(1);
        let known = deks.contains_key(&extent.dek_version)
            && (extent.writer == 0
                || writers
                    .get(&extent.writer)
                    .is_some_and(|w| w.dek_version == extent.dek_version));
        if !known {
            bad = Some(format!(
                "blocks {}..={} were sealed by writer {} (DEK v{}), of which the \
                 metadata has no record: it was damaged or rolled back",
                extent.lba,
                extent.last(),
                extent.writer,
                extent.dek_version
            ));
            return false;
        }
        named.insert(extent.writer);
        *mapped.entry(extent.segment).or_default() += extent.tags.len() as u64;
        if let Some(built) = index.as_mut() {
            built.insert(&extent);
            if built.bytes() > index_limit {
                index = None;
            }
        }
        true
    })?;
    if let Err(e) = scanned {
        bad.get_or_insert(e.0);
    }
    if let Some(what) = bad {
        return Err(VolumeError::Corrupt { what });
    }
    let mut segments: BTreeSet<u32> = mapped.keys().copied().collect();
    segments.extend(live.keys().copied());
    for segment in segments {
        let (m, l) = (
            mapped.get(&segment).copied().unwrap_or(0),
            live.get(&segment).copied().unwrap_or(0),
        );
        if m != l {
            return Err(VolumeError::Corrupt {
                what: format!(
                    "segment {segment}: the block mappings name {m} blocks but its \
                     live count says {l}: mapping records went missing or the \
                     metadata was damaged"
                ),
            });
        }
    }
    Ok((named, index))
}
