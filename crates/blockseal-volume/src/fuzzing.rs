//! Entry points for the fuzz targets in `fuzz/`; not part of the supported API.
//!
//! Each function hands stored bytes to the real record decoder and, when it
//! decodes, re-encodes it with the real encoder. Nothing here parses anything
//! itself: a second implementation would only let the fuzzer test the copy.

use crate::record::{self, Extent, HeaderRecord, TenantRecord, VolumeRecord};

/// Longest extent a record may describe, in blocks (`docs/FORMAT.md`).
pub const MAX_EXTENT_BLOCKS: usize = record::MAX_EXTENT_BLOCKS;

/// Decodes a store header record and encodes it again; the error is the
/// decoder's message.
pub fn header_record(bytes: &[u8]) -> Result<Vec<u8>, String> {
    HeaderRecord::decode(bytes)
        .map(|r| r.encode())
        .map_err(|e| e.0)
}

/// Decodes a tenant record and encodes it again.
pub fn tenant_record(bytes: &[u8]) -> Result<Vec<u8>, String> {
    TenantRecord::decode(bytes)
        .map(|r| r.encode().to_vec())
        .map_err(|e| e.0)
}

/// A decoded volume record: the DEK versions it lists, and its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecordView {
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes, unchecked.
    pub block_size: u32,
    /// The DEK version used for new writes.
    pub active_dek: u32,
    /// `(DEK version, wrapped key length)` in record order.
    pub keys: Vec<(u32, usize)>,
    /// The record encoded again.
    pub encoded: Vec<u8>,
}

/// Decodes a volume record and encodes it again.
pub fn volume_record(bytes: &[u8]) -> Result<VolumeRecordView, String> {
    let r = VolumeRecord::decode(bytes).map_err(|e| e.0)?;
    Ok(VolumeRecordView {
        size: r.size,
        block_size: r.block_size,
        active_dek: r.active_dek,
        keys: r.keys.iter().map(|(v, w)| (*v, w.len())).collect(),
        encoded: r.encode(),
    })
}

/// A decoded extent record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentView {
    /// LBA of its first block.
    pub lba: u64,
    /// LBA of its last block, as the volume computes it.
    pub last: u64,
    /// Segment index.
    pub segment: u32,
    /// First block's offset in the segment, in blocks.
    pub offset: u32,
    /// DEK version.
    pub dek_version: u32,
    /// The writer whose key sealed the blocks (0: format v1, the DEK itself).
    pub writer: u32,
    /// First block's nonce counter.
    pub nonce: u64,
    /// Number of tags, one per block.
    pub tags: usize,
    /// The record encoded again.
    pub encoded: Vec<u8>,
}

/// Decodes the extent record `value` stored under `key`, as a volume's scan
/// does, and encodes it again.
pub fn extent_record(key: &[u8], value: &[u8]) -> Result<ExtentView, String> {
    let e = Extent::decode(key, value).map_err(|e| e.0)?;
    Ok(ExtentView {
        lba: e.lba,
        last: e.last(),
        segment: e.segment,
        offset: e.offset,
        dek_version: e.dek_version,
        writer: e.writer,
        nonce: e.nonce,
        tags: e.tags.len(),
        encoded: e.encode(),
    })
}

/// The key an extent ending at `last_lba` is stored under.
pub fn extent_key(volume: u32, last_lba: u64) -> [u8; 13] {
    record::extent_key(volume, last_lba)
}

/// One extent of a decoded mapping page.
#[derive(Debug)]
pub struct PageExtent {
    /// First LBA.
    pub lba: u64,
    /// Last LBA.
    pub last: u64,
    /// Segment index.
    pub segment: u32,
    /// First block's offset in the segment, in blocks.
    pub offset: u32,
    /// DEK version.
    pub dek_version: u32,
    /// The writer whose key sealed the blocks.
    pub writer: u32,
    /// First block's nonce counter.
    pub nonce: u64,
    /// Snapshot epoch the blocks were born in.
    pub birth: u32,
    /// Number of tags, one per block.
    pub tags: usize,
}

/// Decodes the mapping page `value` stored under `key`, as a volume's scan
/// does; returns its extents and the page encoded again.
pub fn mapping_page(key: &[u8], value: &[u8]) -> Result<(Vec<PageExtent>, Vec<u8>), String> {
    let extents = record::decode_page(key, value).map_err(|e| e.0)?;
    let encoded = record::encode_page(&extents);
    Ok((
        extents
            .iter()
            .map(|e| PageExtent {
                lba: e.lba,
                last: e.last(),
                segment: e.segment,
                offset: e.offset,
                dek_version: e.dek_version,
                writer: e.writer,
                nonce: e.nonce,
                birth: e.birth,
                tags: e.tags.len(),
            })
            .collect(),
        encoded,
    ))
}

/// Decodes a mapping journal record, as a volume's scan does; returns it
/// encoded again.
pub fn journal_record(value: &[u8]) -> Result<Vec<u8>, String> {
    let change = record::decode_journal(value).map_err(|e| e.0)?;
    Ok(record::encode_journal(&change.removed, &change.added))
}

/// A metadata record: key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The records a store of format 2 (one per extent, `m` keys) held for the
/// mapping page `value` stored under `key`: what tests of the upgrade plant.
pub fn format2_records(key: &[u8], value: &[u8]) -> Result<Vec<KeyValue>, String> {
    let volume = key
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or("mapping page key")?;
    let extents = record::decode_page(key, value).map_err(|e| e.0)?;
    Ok(extents
        .iter()
        .map(|e| (record::extent_key(volume, e.last()).to_vec(), e.encode()))
        .collect())
}

/// The key of mapping page `page` of a volume.
pub fn page_key(volume: u32, page: u64) -> [u8; 13] {
    record::page_key(volume, page)
}

/// LBAs per mapping page.
pub const PAGE_BLOCKS: u64 = record::PAGE_BLOCKS;

/// Decodes a counter value (live-block count, nonce mark, next volume id).
pub fn counter(bytes: &[u8]) -> Result<u64, String> {
    record::decode_u64(bytes, "counter").map_err(|e| e.0)
}
