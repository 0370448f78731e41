//! Metadata keys and the versioned binary encoding of every record the store keeps.
//!
//! `docs/FORMAT.md` has the byte tables; this module is their only implementation.
//! Every value starts with a one-byte record version, so a record can change shape
//! without a store-wide format change. Integers are big-endian, so keys sort in
//! numeric order.
//!
//! This module must never decode a record it does not fully understand: a short,
//! long or unknown-version value is an error, never a guess.

use blockseal_keys::{TenantId, VolumeId};

use crate::seal::TAG_LEN;
use crate::volume::ExtentView;

/// Version byte of the records this build writes, except extents.
pub(crate) const RECORD_V1: u8 = 1;
/// Version byte of extent records this build writes: version 1 plus the writer.
pub(crate) const EXTENT_V2: u8 = 2;
/// Version byte of extent records with a birth epoch other than 0 (written
/// only by volumes that have had a snapshot): version 2 plus the birth epoch.
pub(crate) const EXTENT_V3: u8 = 3;

/// The store header record: salt and master key recognition.
pub(crate) const HEADER_KEY: &[u8] = b"H";
/// The next internal volume id, a u32.
pub(crate) const NEXT_VOLUME_KEY: &[u8] = b"N";

/// Key of a tenant record: `T` then the tenant name.
pub(crate) fn tenant_key(tenant: &TenantId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + tenant.as_str().len());
    key.push(b'T');
    key.extend_from_slice(tenant.as_str().as_bytes());
    key
}

/// Prefix of every tenant record.
pub(crate) const TENANT_PREFIX: &[u8] = b"T";

/// Prefix of a tenant's volume records: `V`, tenant name, `0x00`. Names never
/// hold a zero byte, so one tenant's prefix is never another's.
pub(crate) fn volume_prefix(tenant: &TenantId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + tenant.as_str().len());
    key.push(b'V');
    key.extend_from_slice(tenant.as_str().as_bytes());
    key.push(0);
    key
}

/// Key of a volume record: [`volume_prefix`] then the volume name.
pub(crate) fn volume_key(tenant: &TenantId, volume: &VolumeId) -> Vec<u8> {
    let mut key = volume_prefix(tenant);
    key.extend_from_slice(volume.as_str().as_bytes());
    key
}

/// Key of an extent record: `m`, internal volume id, LBA of the extent's LAST
/// block. Keying by the last block lets a forward scan from `lba` find the extent
/// covering `lba` first (the store has no reverse seek). Store format 3 keeps
/// extents in mapping pages; these records are only read, to move them.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn extent_key(volume: u32, last_lba: u64) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = b'm';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..13].copy_from_slice(&last_lba.to_be_bytes());
    key
}

/// Prefix of a volume's extent records.
pub(crate) fn extent_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'm';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Blocks of LBA space one mapping page covers, by its extents' last blocks
/// (at most 255: positions and counts in a page are bytes).
pub(crate) const PAGE_BLOCKS: u64 = 40;
/// Version byte of mapping pages.
pub(crate) const PAGE_V1: u8 = 1;

/// The page holding the extent whose last block is `last`.
pub(crate) fn page_of(last: u64) -> u64 {
    last / PAGE_BLOCKS
}

/// Key of a mapping page: `M`, internal volume id, page number (the last LBAs
/// of its extents divided by [`PAGE_BLOCKS`]). A forward scan from the page of `lba`
/// meets the extent covering `lba` first, as with one record per extent.
pub(crate) fn page_key(volume: u32, page: u64) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = b'M';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..13].copy_from_slice(&page.to_be_bytes());
    key
}

/// Prefix of a volume's mapping pages.
pub(crate) fn page_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'M';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Version byte of mapping journal records.
pub(crate) const JOURNAL_V1: u8 = 1;

/// Key of a mapping journal record: `J`, internal volume id, sequence number
/// (increasing in commit order). A record holds one commit's change to the
/// volume's mapping pages, applied on top of them until a fold writes the
/// pages it touched and deletes it (`volume/journal.rs`).
pub(crate) fn journal_key(volume: u32, sequence: u64) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = b'J';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..13].copy_from_slice(&sequence.to_be_bytes());
    key
}

/// Prefix of a volume's mapping journal records.
pub(crate) fn journal_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'J';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// The sequence number in a journal record's key.
pub(crate) fn journal_key_sequence(key: &[u8]) -> Result<u64, Corrupt> {
    key.get(5..13)
        .filter(|_| key.len() == 13 && key[0] == b'J')
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Corrupt("mapping journal key".into()))
}

/// One commit's change to a volume's mapping pages: the extents removed (by
/// last block) and the extents added. Applied to a page, removals first and
/// an added extent replaces one ending at the same block.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct JournalChange {
    pub(crate) removed: Vec<u64>,
    pub(crate) added: Vec<Extent>,
}

/// Encodes a journal record: version, the removed last blocks, then each
/// added extent as its last block, length and extent encoding.
pub(crate) fn encode_journal(removed: &[u64], added: &[Extent]) -> Vec<u8> {
    let tags: usize = added.iter().map(|e| e.tags.len()).sum();
    let mut out = Vec::with_capacity(9 + 8 * removed.len() + 43 * added.len() + TAG_LEN * tags);
    out.push(JOURNAL_V1);
    out.extend_from_slice(&(removed.len() as u32).to_be_bytes());
    for last in removed {
        out.extend_from_slice(&last.to_be_bytes());
    }
    out.extend_from_slice(&(added.len() as u32).to_be_bytes());
    for extent in added {
        let bytes = extent.encode();
        out.extend_from_slice(&extent.last().to_be_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Decodes a journal record.
pub(crate) fn decode_journal(bytes: &[u8]) -> Result<JournalChange, Corrupt> {
    let (mut r, _) = Reader::with_versions(bytes, "mapping journal", &[JOURNAL_V1])?;
    let removed_count = r.u32()? as usize;
    // Counts are checked against what is left, so a bad one cannot reserve
    // memory the record does not hold.
    if removed_count > r.remaining() / 8 {
        return Err(Corrupt("mapping journal: bad removal count".into()));
    }
    let mut removed = Vec::with_capacity(removed_count);
    for _ in 0..removed_count {
        removed.push(r.u64()?);
    }
    let added_count = r.u32()? as usize;
    if added_count > r.remaining() / 12 {
        return Err(Corrupt("mapping journal: bad extent count".into()));
    }
    let mut added = Vec::with_capacity(added_count);
    for _ in 0..added_count {
        let last = r.u64()?;
        let len = r.u32()? as usize;
        added.push(Extent::decode_last(last, r.bytes(len)?)?);
    }
    r.finish()?;
    Ok(JournalChange { removed, added })
}

/// Encodes the extents of one mapping page: non-empty, sorted by last block,
/// not overlapping, each ending in the same page. Blocks scattered by random
/// writes share one record per 40 LBAs, with their DEK version, writer, birth
/// epoch and the high half of their nonce counter (0 for every writer but the
/// legacy writer 0: a writer key seals at most 2^32 blocks) stated once per
/// page rather than once per block.
pub(crate) fn encode_page(extents: &[Extent]) -> Vec<u8> {
    let views: Vec<ExtentView<'_>> = extents.iter().map(ExtentView::from).collect();
    encode_page_views(&views)
}

/// [`encode_page`] of extents borrowed from the index or a commit.
pub(crate) fn encode_page_views(extents: &[ExtentView<'_>]) -> Vec<u8> {
    let mut contexts: Vec<(u32, u32, u32, u32)> = Vec::new();
    let mut refs = Vec::with_capacity(extents.len());
    for e in extents {
        let context = (e.dek_version, e.writer, e.birth, (e.nonce >> 32) as u32);
        let n = match contexts.iter().position(|&c| c == context) {
            Some(n) => n,
            None => {
                contexts.push(context);
                contexts.len() - 1
            }
        };
        refs.push(n as u8);
    }
    let tags: usize = extents.iter().map(|e| e.tags.len()).sum();
    let mut out = Vec::with_capacity(3 + 16 * contexts.len() + 15 * extents.len() + TAG_LEN * tags);
    out.push(PAGE_V1);
    // At most 32 extents end in a page, so at most 32 contexts.
    out.push(contexts.len() as u8);
    for (dek_version, writer, birth, nonce_high) in &contexts {
        out.extend_from_slice(&dek_version.to_be_bytes());
        out.extend_from_slice(&writer.to_be_bytes());
        out.extend_from_slice(&birth.to_be_bytes());
        out.extend_from_slice(&nonce_high.to_be_bytes());
    }
    out.push(extents.len() as u8);
    for (e, context) in extents.iter().zip(refs) {
        out.push((e.last() % PAGE_BLOCKS) as u8);
        // 1..=256 blocks, stored as count - 1.
        out.push((e.tags.len() - 1) as u8);
        out.push(context);
        out.extend_from_slice(&e.segment.to_be_bytes());
        out.extend_from_slice(&e.offset.to_be_bytes());
        out.extend_from_slice(&(e.nonce as u32).to_be_bytes());
        for tag in e.tags {
            out.extend_from_slice(tag);
        }
    }
    out
}

/// Decodes the mapping page stored under `key`.
pub(crate) fn decode_page(key: &[u8], bytes: &[u8]) -> Result<Vec<Extent>, Corrupt> {
    decode_page_at(page_key_number(key)?, bytes)
}

/// The page number in a mapping page's key.
pub(crate) fn page_key_number(key: &[u8]) -> Result<u64, Corrupt> {
    key.get(5..13)
        .filter(|_| key.len() == 13 && key[0] == b'M')
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .filter(|&page| page <= u64::MAX / PAGE_BLOCKS)
        .ok_or_else(|| Corrupt("mapping page key".into()))
}

/// Decodes mapping page number `page`.
pub(crate) fn decode_page_at(page: u64, bytes: &[u8]) -> Result<Vec<Extent>, Corrupt> {
    let (mut r, _) = Reader::with_versions(bytes, "mapping page", &[PAGE_V1])?;
    let context_count = r.u8()?;
    if context_count == 0 || u64::from(context_count) > PAGE_BLOCKS {
        return Err(Corrupt(format!(
            "mapping page: bad context count {context_count}"
        )));
    }
    let mut contexts = Vec::with_capacity(usize::from(context_count));
    for _ in 0..context_count {
        let (dek_version, writer, birth, nonce_high) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        contexts.push((dek_version, writer, birth, nonce_high));
    }
    let count = r.u8()?;
    if count == 0 || u64::from(count) > PAGE_BLOCKS {
        return Err(Corrupt(format!("mapping page: bad extent count {count}")));
    }
    for (n, c) in contexts.iter().enumerate() {
        if contexts[..n].contains(c) {
            return Err(Corrupt("mapping page: a context repeats".into()));
        }
    }
    let mut first_unused = 0usize;
    let mut extents: Vec<Extent> = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let position = r.u8()?;
        let blocks = u64::from(r.u8()?) + 1;
        let context = usize::from(r.u8()?);
        // Contexts are numbered in order of first use, as the encoder does.
        if context > first_unused || context >= contexts.len() {
            return Err(Corrupt(format!(
                "mapping page: context {context} out of order"
            )));
        }
        if context == first_unused {
            first_unused += 1;
        }
        let (dek_version, writer, birth, nonce_high) = contexts[context];
        if u64::from(position) >= PAGE_BLOCKS {
            return Err(Corrupt(format!("mapping page: bad position {position}")));
        }
        // At most u64::MAX: the page is at most u64::MAX / PAGE_BLOCKS and
        // the position below PAGE_BLOCKS, but the last page is partial.
        let last = (page * PAGE_BLOCKS)
            .checked_add(u64::from(position))
            .ok_or_else(|| Corrupt(format!("mapping page: bad position {position}")))?;
        // `blocks - 1 > last`, not `blocks > last + 1`: last may be u64::MAX.
        if blocks - 1 > last {
            return Err(Corrupt(format!(
                "mapping page: {blocks} blocks end at block {last}"
            )));
        }
        let lba = last - (blocks - 1);
        if extents.last().is_some_and(|prev| prev.last() >= lba) {
            return Err(Corrupt(format!(
                "mapping page: extents overlap or are out of order at block {lba}"
            )));
        }
        let segment = r.u32()?;
        let offset = r.u32()?;
        let nonce = u64::from(nonce_high) << 32 | u64::from(r.u32()?);
        // Readers add a block's index to the offset and the nonce counter: the
        // last block's must fit, or a read would overflow.
        if u64::from(offset) + (blocks - 1) > u64::from(u32::MAX)
            || nonce.checked_add(blocks - 1).is_none()
        {
            return Err(Corrupt(
                "mapping page: blocks run past the segment or nonce range".into(),
            ));
        }
        let mut tags = Vec::with_capacity(blocks as usize);
        for _ in 0..blocks {
            tags.push(r.array()?);
        }
        extents.push(Extent {
            lba,
            segment,
            offset,
            dek_version,
            writer,
            nonce,
            birth,
            tags,
        });
    }
    r.finish()?;
    // One encoding per page: every context is used (what the encoder writes).
    if first_unused != contexts.len() {
        return Err(Corrupt("mapping page: an unused context".into()));
    }
    Ok(extents)
}

/// Key of a segment's live-block count: `s`, internal volume id, segment index.
pub(crate) fn live_key(volume: u32, segment: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b's';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&segment.to_be_bytes());
    key
}

/// The segment index a [`live_key`] names. The key comes from disk: anything but
/// the 9 bytes `live_key` writes is corrupt.
pub(crate) fn live_key_segment(key: &[u8]) -> Result<u32, Corrupt> {
    match key {
        [b's', _, _, _, _, a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(Corrupt(format!(
            "live count key: expected 9 bytes, found {}",
            key.len()
        ))),
    }
}

/// Prefix of a volume's live-block counts.
pub(crate) fn live_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b's';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Key of a writer record: `w`, internal volume id, writer number.
pub(crate) fn writer_key(volume: u32, writer: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'w';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&writer.to_be_bytes());
    key
}

/// Prefix of a volume's writer records.
pub(crate) fn writer_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'w';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// The writer number a [`writer_key`] names; anything but 9 bytes is corrupt.
pub(crate) fn writer_key_number(key: &[u8]) -> Result<u32, Corrupt> {
    match key {
        [b'w', _, _, _, _, a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(Corrupt(format!(
            "writer key: expected 9 bytes, found {}",
            key.len()
        ))),
    }
}

/// One writer of a volume: the DEK version it derived its key from and its
/// random salt (see `DataKey::derive_writer_key`). Public data: the salt is
/// useless without the DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriterRecord {
    pub(crate) dek_version: u32,
    pub(crate) salt: [u8; 32],
}

impl WriterRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(37);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.dek_version.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<WriterRecord, Corrupt> {
        let mut r = Reader::new(bytes, "writer")?;
        let record = WriterRecord {
            dek_version: r.u32()?,
            salt: r.array()?,
        };
        r.finish()?;
        Ok(record)
    }
}

/// Key of a volume's re-encryption job: `r`, internal volume id. Present while
/// a DEK rotation has left blocks under older DEKs (see `volume/reencrypt.rs`).
pub(crate) fn job_key(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'r';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Key of the usage of one of a volume's DEKs: `u`, internal volume id, DEK
/// version. The value (a u64, see [`encode_u64`]) counts the nonces writer
/// keys derived from that DEK reserved, as of the volume's last commit.
pub(crate) fn dek_usage_key(volume: u32, dek_version: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'u';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&dek_version.to_be_bytes());
    key
}

/// A volume's re-encryption job: every block mapped under a DEK other than
/// `target` is to be sealed again under `target`. `cursor` (the LBA the next
/// step starts from) and `done` are progress only: what is left is decided by
/// the mappings' DEK versions, never by the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobRecord {
    pub(crate) target: u32,
    pub(crate) cursor: u64,
    pub(crate) done: u64,
}

impl JobRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(21);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.target.to_be_bytes());
        out.extend_from_slice(&self.cursor.to_be_bytes());
        out.extend_from_slice(&self.done.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<JobRecord, Corrupt> {
        let mut r = Reader::new(bytes, "re-encryption job")?;
        let record = JobRecord {
            target: r.u32()?,
            cursor: r.u64()?,
            done: r.u64()?,
        };
        r.finish()?;
        Ok(record)
    }
}

/// A record failed to decode; the string names the record.
#[derive(Debug)]
pub(crate) struct Corrupt(pub(crate) String);

/// The store header record.
pub(crate) struct HeaderRecord {
    pub(crate) salt: [u8; 32],
    pub(crate) master_key_id: [u8; 16],
    pub(crate) check_value: [u8; 16],
    pub(crate) created: u64,
}

impl HeaderRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(73);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.master_key_id);
        out.extend_from_slice(&self.check_value);
        out.extend_from_slice(&self.created.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<HeaderRecord, Corrupt> {
        let mut r = Reader::new(bytes, "store header")?;
        let record = HeaderRecord {
            salt: r.array()?,
            master_key_id: r.array()?,
            check_value: r.array()?,
            created: r.u64()?,
        };
        r.finish()?;
        Ok(record)
    }
}

/// A tenant's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantState {
    /// The tenant is in use.
    Active,
}

/// A tenant record.
pub(crate) struct TenantRecord {
    pub(crate) kek_version: u32,
    pub(crate) seed: zeroize::Zeroizing<[u8; 32]>,
    pub(crate) state: TenantState,
    pub(crate) created: u64,
}

impl TenantRecord {
    pub(crate) fn encode(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(46));
        out.push(RECORD_V1);
        out.extend_from_slice(&self.kek_version.to_be_bytes());
        out.extend_from_slice(self.seed.as_slice());
        out.push(match self.state {
            TenantState::Active => 1,
        });
        out.extend_from_slice(&self.created.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<TenantRecord, Corrupt> {
        let mut r = Reader::new(bytes, "tenant")?;
        let kek_version = r.u32()?;
        let seed = zeroize::Zeroizing::new(r.array::<32>()?);
        let state = match r.u8()? {
            1 => TenantState::Active,
            other => return Err(Corrupt(format!("tenant record: unknown state {other}"))),
        };
        let created = r.u64()?;
        r.finish()?;
        Ok(TenantRecord {
            kek_version,
            seed,
            state,
            created,
        })
    }
}

/// A volume record.
#[derive(Clone)]
pub(crate) struct VolumeRecord {
    pub(crate) internal_id: u32,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) created: u64,
    pub(crate) updated: u64,
    pub(crate) active_dek: u32,
    /// `(DEK version, wrapped key bytes)`, ascending by version.
    pub(crate) keys: Vec<(u32, Vec<u8>)>,
}

impl VolumeRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.keys.len() * 80);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.internal_id.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.updated.to_be_bytes());
        out.extend_from_slice(&self.active_dek.to_be_bytes());
        // At most a handful of live DEK versions exist at once.
        out.extend_from_slice(&(self.keys.len() as u16).to_be_bytes());
        for (version, wrapped) in &self.keys {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
            out.extend_from_slice(wrapped);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<VolumeRecord, Corrupt> {
        let mut r = Reader::new(bytes, "volume")?;
        let internal_id = r.u32()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        let created = r.u64()?;
        let updated = r.u64()?;
        let active_dek = r.u32()?;
        let count = r.u16()?;
        let mut keys = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let version = r.u32()?;
            let len = r.u16()?;
            keys.push((version, r.bytes(usize::from(len))?.to_vec()));
        }
        r.finish()?;
        Ok(VolumeRecord {
            internal_id,
            size,
            block_size,
            created,
            updated,
            active_dek,
            keys,
        })
    }
}

/// The longest extent a record covers, in blocks: bounds the value at 4 KiB of
/// tags so that splitting an extent on overwrite rewrites little.
pub(crate) const MAX_EXTENT_BLOCKS: usize = 256;

/// A run of blocks sealed into consecutive slots of one segment, with consecutive
/// nonce counters under one writer's key: `lba + i` lives at `segment` block
/// `offset + i`, sealed with nonce counter `nonce + i` and carries `tags[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) lba: u64,
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) dek_version: u32,
    /// The writer whose key sealed the blocks; 0 for blocks format v1 sealed
    /// under the DEK itself (extent record version 1).
    pub(crate) writer: u32,
    pub(crate) nonce: u64,
    /// The volume's snapshot epoch when the blocks' data was written (kept
    /// when compaction moves them or re-encryption seals them again): a
    /// snapshot taken at epoch `e` sees the blocks born at or before `e`.
    pub(crate) birth: u32,
    pub(crate) tags: Vec<[u8; TAG_LEN]>,
}

impl Extent {
    /// The LBA of the extent's last block.
    pub(crate) fn last(&self) -> u64 {
        // Grouped so that an extent ending at u64::MAX does not overflow.
        self.lba + (self.tags.len() as u64 - 1)
    }

    /// The blocks `from..to` (absolute LBAs, inside the extent) as an extent.
    pub(crate) fn slice(&self, from: u64, to: u64) -> Extent {
        let (a, b) = ((from - self.lba) as usize, (to - self.lba) as usize);
        Extent {
            lba: from,
            segment: self.segment,
            offset: self.offset + a as u32,
            dek_version: self.dek_version,
            writer: self.writer,
            nonce: self.nonce + a as u64,
            birth: self.birth,
            tags: self.tags[a..b].to_vec(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(31 + self.tags.len() * TAG_LEN);
        // A legacy writer-0 extent keeps its version-1 shape, so splitting one
        // never needs a writer record; the birth epoch costs bytes only in
        // volumes that have had a snapshot.
        let version = if self.birth != 0 {
            EXTENT_V3
        } else if self.writer == 0 {
            RECORD_V1
        } else {
            EXTENT_V2
        };
        out.push(version);
        // At most MAX_EXTENT_BLOCKS tags.
        out.extend_from_slice(&(self.tags.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.dek_version.to_be_bytes());
        if version != RECORD_V1 {
            out.extend_from_slice(&self.writer.to_be_bytes());
        }
        if version == EXTENT_V3 {
            out.extend_from_slice(&self.birth.to_be_bytes());
        }
        out.extend_from_slice(&self.nonce.to_be_bytes());
        for tag in &self.tags {
            out.extend_from_slice(tag);
        }
        out
    }

    /// Decodes the extent stored under key `key` (which carries the last LBA).
    pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Extent, Corrupt> {
        let last = key
            .get(5..13)
            .filter(|_| key.len() == 13 && key[0] == b'm')
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Corrupt("extent key".into()))?;
        Extent::decode_last(last, bytes)
    }

    /// Decodes an extent whose last LBA (from its key) is `last`.
    pub(crate) fn decode_last(last: u64, bytes: &[u8]) -> Result<Extent, Corrupt> {
        let (mut r, version) =
            Reader::with_versions(bytes, "extent", &[RECORD_V1, EXTENT_V2, EXTENT_V3])?;
        let count = r.u16()?;
        // `count - 1 > last`, not `count > last + 1`: the key may hold u64::MAX.
        if count == 0 || usize::from(count) > MAX_EXTENT_BLOCKS || u64::from(count) - 1 > last {
            return Err(Corrupt(format!("extent record: bad block count {count}")));
        }
        let segment = r.u32()?;
        let offset = r.u32()?;
        let dek_version = r.u32()?;
        let writer = if version == RECORD_V1 { 0 } else { r.u32()? };
        if version == EXTENT_V2 && writer == 0 {
            return Err(Corrupt(
                "extent record: writer 0 in a version 2 record".into(),
            ));
        }
        let birth = if version == EXTENT_V3 { r.u32()? } else { 0 };
        if version == EXTENT_V3 && birth == 0 {
            return Err(Corrupt(
                "extent record: birth epoch 0 in a version 3 record".into(),
            ));
        }
        let nonce = r.u64()?;
        // Readers add a block's index to the offset and the nonce counter: the
        // last block's must fit, or a read would overflow.
        if offset.checked_add(u32::from(count) - 1).is_none()
            || nonce.checked_add(u64::from(count) - 1).is_none()
        {
            return Err(Corrupt(
                "extent record: blocks run past the segment or nonce range".into(),
            ));
        }
        let mut tags = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            tags.push(r.array()?);
        }
        r.finish()?;
        Ok(Extent {
            lba: last - (u64::from(count) - 1),
            segment,
            offset,
            dek_version,
            writer,
            nonce,
            birth,
            tags,
        })
    }
}

/// Key of a volume's snapshot epoch: `E`, internal volume id. The value (a
/// u32) is the epoch new writes are born in; absent: 0. Each snapshot takes
/// the current epoch and moves the volume to the next.
pub(crate) fn epoch_key(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'E';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Key of an epoch's start: `e`, internal volume id, epoch (u32). The value
/// (a u64) is when the epoch began, in seconds since the Unix epoch; epoch 0
/// began when the volume was created and has no record. Data retention reads
/// them to tell how old a block's data is.
pub(crate) fn epoch_start_key(volume: u32, epoch: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'e';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&epoch.to_be_bytes());
    key
}

/// Prefix of a volume's epoch starts.
pub(crate) fn epoch_start_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'e';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Key of a snapshot record: `S`, internal volume id, the snapshot's epoch
/// (which identifies it within the volume and orders snapshots by age).
pub(crate) fn snapshot_key(volume: u32, epoch: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'S';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&epoch.to_be_bytes());
    key
}

/// Prefix of a volume's snapshot records.
pub(crate) fn snapshot_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'S';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// The epoch a [`snapshot_key`] names; anything but 9 bytes is corrupt.
pub(crate) fn snapshot_key_epoch(key: &[u8]) -> Result<u32, Corrupt> {
    match key {
        [b'S', _, _, _, _, a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(Corrupt(format!(
            "snapshot key: expected 9 bytes, found {}",
            key.len()
        ))),
    }
}

/// Key of a preserved extent: `P`, internal volume id, the epoch of the
/// snapshot that holds it, the extent's last LBA. Blocks a snapshot still
/// sees after the volume overwrote or trimmed them.
pub(crate) fn preserved_key(volume: u32, epoch: u32, last_lba: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = b'P';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key[5..9].copy_from_slice(&epoch.to_be_bytes());
    key[9..17].copy_from_slice(&last_lba.to_be_bytes());
    key
}

/// Prefix of a volume's preserved extents (all snapshots).
pub(crate) fn preserved_prefix(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'P';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// Prefix of the preserved extents one snapshot holds.
pub(crate) fn preserved_snapshot_prefix(volume: u32, epoch: u32) -> [u8; 9] {
    let mut key = [0u8; 9];
    key.copy_from_slice(&preserved_key(volume, epoch, 0)[..9]);
    key
}

/// The snapshot epoch and the extent a preserved record holds.
pub(crate) fn decode_preserved(key: &[u8], bytes: &[u8]) -> Result<(u32, Extent), Corrupt> {
    let [b'P', _, _, _, _, e0, e1, e2, e3, l @ ..] = key else {
        return Err(Corrupt("preserved extent key".into()));
    };
    let last: [u8; 8] = l
        .try_into()
        .map_err(|_| Corrupt("preserved extent key".into()))?;
    let epoch = u32::from_be_bytes([*e0, *e1, *e2, *e3]);
    let extent = Extent::decode_last(u64::from_be_bytes(last), bytes)?;
    if extent.birth > epoch {
        return Err(Corrupt(format!(
            "preserved extent at block {} was born after its snapshot",
            extent.lba
        )));
    }
    Ok((epoch, extent))
}

/// A snapshot of a volume: the volume's contents as of the instant its epoch
/// ended (see `volume/snapshot.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    /// Random, never reused: names this snapshot in backups (a name may be
    /// reused after a delete).
    pub(crate) uid: [u8; 16],
    pub(crate) created: u64,
    /// The volume's size when the snapshot was taken.
    pub(crate) size: u64,
    pub(crate) name: String,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.name.len());
        out.push(RECORD_V1);
        out.extend_from_slice(&self.uid);
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        // Names are at most 64 bytes (checked by the store).
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<SnapshotRecord, Corrupt> {
        let mut r = Reader::new(bytes, "snapshot")?;
        let uid = r.array()?;
        let created = r.u64()?;
        let size = r.u64()?;
        let len = r.u8()?;
        let name = String::from_utf8(r.bytes(usize::from(len))?.to_vec())
            .map_err(|_| Corrupt("snapshot record: name is not UTF-8".into()))?;
        r.finish()?;
        Ok(SnapshotRecord {
            uid,
            created,
            size,
            name,
        })
    }
}

/// Decodes a u32 value (`what` names it in the error).
pub(crate) fn decode_u32(bytes: &[u8], what: &str) -> Result<u32, Corrupt> {
    bytes
        .try_into()
        .map(u32::from_be_bytes)
        .map_err(|_| Corrupt(format!("{what}: expected 4 bytes, found {}", bytes.len())))
}

/// Prefix of a tenant's backup key records: `b`, tenant name, `0x00`.
pub(crate) fn backup_key_prefix(tenant: &TenantId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + tenant.as_str().len());
    key.push(b'b');
    key.extend_from_slice(tenant.as_str().as_bytes());
    key.push(0);
    key
}

/// Key of a backup key record: [`backup_key_prefix`] then the backup id.
pub(crate) fn backup_key_key(tenant: &TenantId, backup: &[u8; 16]) -> Vec<u8> {
    let mut key = backup_key_prefix(tenant);
    key.extend_from_slice(backup);
    key
}

/// A backup's key, wrapped under its tenant's KEK: without it the backup
/// file cannot be read. Destroyed when the backup expires or the tenant is
/// shredded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackupKeyRecord {
    pub(crate) created: u64,
    /// When the key is destroyed, seconds since the Unix epoch (0: never).
    pub(crate) expires: u64,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    pub(crate) wrapped: Vec<u8>,
}

impl BackupKeyRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.volume.len() + self.snapshot.len());
        out.push(RECORD_V1);
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        // Names are at most 64 bytes, the wrapped key 65.
        for field in [
            self.volume.as_bytes(),
            self.snapshot.as_bytes(),
            &self.wrapped,
        ] {
            out.push(field.len() as u8);
            out.extend_from_slice(field);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<BackupKeyRecord, Corrupt> {
        let mut r = Reader::new(bytes, "backup key")?;
        let created = r.u64()?;
        let expires = r.u64()?;
        let text = |r: &mut Reader<'_>| -> Result<String, Corrupt> {
            let len = r.u8()?;
            String::from_utf8(r.bytes(usize::from(len))?.to_vec())
                .map_err(|_| Corrupt("backup key record: a name is not UTF-8".into()))
        };
        let volume = text(&mut r)?;
        let snapshot = text(&mut r)?;
        let len = r.u8()?;
        let wrapped = r.bytes(usize::from(len))?.to_vec();
        r.finish()?;
        Ok(BackupKeyRecord {
            created,
            expires,
            volume,
            snapshot,
            wrapped,
        })
    }
}

/// Key of a restore marker: `R`, tenant name, `0x00`, volume name. Put with
/// the volume a restore creates, removed once the restore is complete; a store
/// that opens with one deletes the half-restored volume.
pub(crate) fn restore_marker_key(tenant: &TenantId, volume: &VolumeId) -> Vec<u8> {
    let mut key = volume_key(tenant, volume);
    key[0] = b'R';
    key
}

/// Prefix of every restore marker.
pub(crate) const RESTORE_MARKER_PREFIX: &[u8] = b"R";

/// Prefix of tombstones: a deleted volume whose segments and mapping records
/// are still being removed.
pub(crate) const TOMBSTONE_PREFIX: &[u8] = b"D";

/// Key of a tombstone: `D`, internal volume id.
pub(crate) fn tombstone_key(volume: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = b'D';
    key[1..5].copy_from_slice(&volume.to_be_bytes());
    key
}

/// The internal volume id a [`tombstone_key`] names; anything but 5 bytes is
/// corrupt.
pub(crate) fn tombstone_key_volume(key: &[u8]) -> Result<u32, Corrupt> {
    match key {
        [b'D', a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(Corrupt(format!(
            "tombstone key: expected 5 bytes, found {}",
            key.len()
        ))),
    }
}

/// A tombstone: the volume record is gone; what it owned is being removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TombstoneRecord {
    /// When the volume was deleted, seconds since the Unix epoch.
    pub(crate) deleted: u64,
}

impl TombstoneRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.deleted.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<TombstoneRecord, Corrupt> {
        let mut r = Reader::new(bytes, "tombstone")?;
        let record = TombstoneRecord { deleted: r.u64()? };
        r.finish()?;
        Ok(record)
    }
}

/// The audit log's head: the next sequence number and the last record's MAC.
pub(crate) const AUDIT_HEAD_KEY: &[u8] = b"a";
/// The audit key, wrapped under the audit KEK.
pub(crate) const AUDIT_KEY_KEY: &[u8] = b"k";
/// Prefix of audit records.
pub(crate) const AUDIT_PREFIX: &[u8] = b"A";

/// Key of an audit record: `A`, sequence number (u64).
pub(crate) fn audit_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'A';
    key[1..9].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number an [`audit_key`] names; anything but 9 bytes is corrupt.
pub(crate) fn audit_key_seq(key: &[u8]) -> Result<u64, Corrupt> {
    match key {
        [b'A', rest @ ..] if rest.len() == 8 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(rest);
            Ok(u64::from_be_bytes(seq))
        }
        _ => Err(Corrupt(format!(
            "audit key: expected 9 bytes, found {}",
            key.len()
        ))),
    }
}

/// Length of an audit MAC.
pub(crate) const AUDIT_MAC_LEN: usize = 32;

/// The audit log's head record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditHeadRecord {
    /// The sequence number the next record takes (the first is 1).
    pub(crate) next_seq: u64,
    /// The MAC of record `next_seq - 1` (zeros before the first).
    pub(crate) last_mac: [u8; AUDIT_MAC_LEN],
    /// MAC of the head itself (see [`audit_head_message`]).
    pub(crate) mac: [u8; AUDIT_MAC_LEN],
}

impl AuditHeadRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(73);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&self.last_mac);
        out.extend_from_slice(&self.mac);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<AuditHeadRecord, Corrupt> {
        let mut r = Reader::new(bytes, "audit head")?;
        let record = AuditHeadRecord {
            next_seq: r.u64()?,
            last_mac: r.array()?,
            mac: r.array()?,
        };
        r.finish()?;
        Ok(record)
    }
}

/// What the head's MAC covers: `0x02`, next sequence number, last MAC.
pub(crate) fn audit_head_message(next_seq: u64, last_mac: &[u8; AUDIT_MAC_LEN]) -> [u8; 41] {
    let mut out = [0u8; 41];
    out[0] = 2;
    out[1..9].copy_from_slice(&next_seq.to_be_bytes());
    out[9..41].copy_from_slice(last_mac);
    out
}

/// The wrapped audit key record.
pub(crate) struct AuditKeyRecord {
    pub(crate) created: u64,
    pub(crate) wrapped: Vec<u8>,
}

impl AuditKeyRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.wrapped.len());
        out.push(RECORD_V1);
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<AuditKeyRecord, Corrupt> {
        let mut r = Reader::new(bytes, "audit key")?;
        let created = r.u64()?;
        let wrapped = r.bytes(blockseal_keys::WRAPPED_AUDIT_KEY_LEN)?.to_vec();
        r.finish()?;
        Ok(AuditKeyRecord { created, wrapped })
    }
}

/// One audit record as stored (the sequence number is in its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditEntryRecord {
    pub(crate) time: u64,
    pub(crate) mac: [u8; AUDIT_MAC_LEN],
    /// actor, action, target, result, detail.
    pub(crate) fields: [String; 5],
}

impl AuditEntryRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let fields: usize = self.fields.iter().map(|f| 4 + f.len()).sum();
        let mut out = Vec::with_capacity(41 + fields);
        out.push(RECORD_V1);
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(&self.mac);
        encode_fields(&self.fields, &mut out);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<AuditEntryRecord, Corrupt> {
        let mut r = Reader::new(bytes, "audit")?;
        let time = r.u64()?;
        let mac = r.array()?;
        let mut field = || -> Result<String, Corrupt> {
            let len = r.u32()? as usize;
            let bytes = r.bytes(len)?;
            String::from_utf8(bytes.to_vec())
                .map_err(|_| Corrupt("audit record: a field is not UTF-8".into()))
        };
        let fields = [field()?, field()?, field()?, field()?, field()?];
        r.finish()?;
        Ok(AuditEntryRecord { time, mac, fields })
    }

    /// What this record's MAC covers: `0x01`, the previous record's MAC (zeros
    /// for the first), sequence number, time, the fields (each length
    /// prefixed).
    pub(crate) fn message(&self, seq: u64, previous: &[u8; AUDIT_MAC_LEN]) -> Vec<u8> {
        let fields: usize = self.fields.iter().map(|f| 4 + f.len()).sum();
        let mut out = Vec::with_capacity(49 + fields);
        out.push(1);
        out.extend_from_slice(previous);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        encode_fields(&self.fields, &mut out);
        out
    }
}

fn encode_fields(fields: &[String; 5], out: &mut Vec<u8>) {
    for field in fields {
        // Callers bound the fields' total length far below 4 GiB.
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
}

/// Encodes a u64 counter value (live-block counts, nonce marks, next ids).
pub(crate) fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes a u64 counter value.
pub(crate) fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, Corrupt> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Corrupt(format!("{what}: expected 8 bytes, found {}", bytes.len())))
}

struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Result<Reader<'a>, Corrupt> {
        Reader::with_versions(bytes, what, &[RECORD_V1]).map(|(r, _)| r)
    }

    /// A reader of a record that may have any of `versions`, and the one it has.
    fn with_versions(
        bytes: &'a [u8],
        what: &'static str,
        versions: &[u8],
    ) -> Result<(Reader<'a>, u8), Corrupt> {
        let mut r = Reader { bytes, what };
        match r.u8()? {
            v if versions.contains(&v) => Ok((r, v)),
            v => Err(Corrupt(format!("{what} record: unknown version {v}"))),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.bytes.len() < n {
            return Err(Corrupt(format!("{} record: truncated", self.what)));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Bytes not read yet.
    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn finish(self) -> Result<(), Corrupt> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Corrupt(format!("{} record: trailing bytes", self.what)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_records_round_trip_and_damage_is_corrupt() {
        let added = vec![
            Extent {
                lba: 80,
                segment: 3,
                offset: 9,
                dek_version: 2,
                writer: 4,
                nonce: 77,
                birth: 0,
                tags: vec![[5; TAG_LEN]; 3],
            },
            Extent {
                lba: 400,
                segment: 1,
                offset: 0,
                dek_version: 2,
                writer: 4,
                nonce: 1,
                birth: 6,
                tags: vec![[6; TAG_LEN]],
            },
        ];
        let bytes = encode_journal(&[82, 119], &added);
        let decoded = decode_journal(&bytes).unwrap();
        assert_eq!(decoded.removed, vec![82, 119]);
        assert_eq!(decoded.added, added);
        assert_eq!(
            decode_journal(&encode_journal(&[], &[])).unwrap(),
            JournalChange::default()
        );
        // Every truncation, a trailing byte, another version, a count past the
        // record's end: corrupt, never a panic or a huge allocation.
        for len in 0..bytes.len() {
            assert!(decode_journal(&bytes[..len]).is_err(), "{len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_journal(&long).is_err());
        let mut version = bytes.clone();
        version[0] = 2;
        assert!(decode_journal(&version).is_err());
        let mut count = bytes.clone();
        count[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_journal(&count).is_err());
        assert_eq!(journal_key_sequence(&journal_key(3, 41)).unwrap(), 41);
        assert!(journal_key_sequence(&page_key(3, 41)).is_err());
        assert!(journal_key_sequence(&journal_key(3, 41)[..12]).is_err());
    }

    #[test]
    fn live_keys_round_trip_and_odd_lengths_are_corrupt() {
        assert_eq!(
            live_key_segment(&live_key(7, 0x0102_0304)).unwrap(),
            0x0102_0304
        );
        let key = live_key(7, 9);
        for len in 0..key.len() {
            assert!(live_key_segment(&key[..len]).is_err(), "{len} bytes");
        }
        let mut long = key.to_vec();
        long.push(0);
        assert!(live_key_segment(&long).is_err());
    }

    #[test]
    fn extent_round_trips_and_keys_sort_by_last_block() {
        let e = Extent {
            lba: 10,
            segment: 3,
            offset: 7,
            dek_version: 1,
            writer: 4,
            nonce: 99,
            birth: 0,
            tags: vec![[1; 16], [2; 16], [3; 16]],
        };
        let key = extent_key(5, e.last());
        let bytes = e.encode();
        assert_eq!(bytes[0], EXTENT_V2);
        assert_eq!(bytes.len(), 27 + 48);
        assert_eq!(Extent::decode(&key, &bytes).unwrap(), e);
        assert!(Extent::decode(&key, &bytes[..bytes.len() - 1]).is_err());
        // A format v1 extent (no writer field) reads as writer 0 and keeps its
        // shape when written back.
        let legacy = Extent {
            writer: 0,
            ..e.clone()
        };
        let bytes = legacy.encode();
        assert_eq!((bytes[0], bytes.len()), (RECORD_V1, 23 + 48));
        assert_eq!(Extent::decode(&key, &bytes).unwrap(), legacy);
        // A version 2 record never names writer 0.
        let mut forged = e.encode();
        forged[15..19].copy_from_slice(&[0; 4]);
        assert!(Extent::decode(&key, &forged).is_err());
        assert!(extent_key(5, 12) < extent_key(5, 13));
        assert!(extent_key(5, u64::MAX) < extent_key(6, 0));
        let s = e.slice(11, 13);
        assert_eq!((s.lba, s.offset, s.nonce, s.tags.len()), (11, 8, 100, 2));
        // A birth epoch makes a version 3 record, 4 bytes longer.
        let born = Extent {
            birth: 7,
            ..e.clone()
        };
        let bytes = born.encode();
        assert_eq!((bytes[0], bytes.len()), (EXTENT_V3, 31 + 48));
        assert_eq!(Extent::decode(&key, &bytes).unwrap(), born);
        assert_eq!(born.slice(11, 13).birth, 7);
        let mut forged = bytes.clone();
        forged[19..23].copy_from_slice(&[0; 4]);
        assert!(Extent::decode(&key, &forged).is_err());
        // Preserved extents: the snapshot epoch is in the key, and a record
        // born after its snapshot is refused.
        let pkey = preserved_key(5, 7, born.last());
        assert_eq!(decode_preserved(&pkey, &bytes).unwrap(), (7, born.clone()));
        assert!(decode_preserved(&preserved_key(5, 6, born.last()), &bytes).is_err());
        assert!(decode_preserved(&pkey[..16], &bytes).is_err());
        assert!(preserved_key(5, 7, u64::MAX) < preserved_key(5, 8, 0));
    }

    #[test]
    fn mapping_pages_round_trip_and_refuse_what_no_writer_produces() {
        let extent = |last: u64, blocks: usize, writer: u32, birth: u32| Extent {
            lba: last - (blocks as u64 - 1),
            segment: 9,
            offset: 100 + (last % 1000) as u32,
            dek_version: 2,
            writer,
            nonce: 1000 + last % 1000,
            birth,
            tags: vec![[last as u8; TAG_LEN]; blocks],
        };
        // Page 3 holds the extents ending at blocks 120..=159; the first may
        // start in an earlier page.
        let extents = vec![
            extent(121, 40, 1, 0),
            extent(124, 1, 2, 0),
            extent(125, 1, 1, 0),
            extent(159, 3, 1, 4),
        ];
        let key = page_key(5, 3);
        let bytes = encode_page(&extents);
        // Three contexts of 16 bytes, four extents of 15 bytes plus tags.
        assert_eq!(bytes.len(), 3 + 48 + 4 * 15 + 45 * TAG_LEN);
        assert_eq!(decode_page(&key, &bytes).unwrap(), extents);
        // A single scattered block costs 31 bytes beside its page's header.
        let one = encode_page(&[extent(120, 1, 1, 0)]);
        assert_eq!(one.len(), 3 + 16 + 31);
        // Nonce counters past 2^32 (legacy writer 0) keep their high half in
        // the context.
        let mut high = extent(122, 2, 0, 0);
        high.nonce = (7 << 32) | 0xffff_ffff;
        let mixed = vec![extent(120, 1, 0, 0), high];
        assert_eq!(decode_page(&key, &encode_page(&mixed)).unwrap(), mixed);
        assert!(page_key(5, 3) < page_key(5, 4) && page_key(5, u64::MAX) < page_key(6, 0));
        assert_eq!(page_of(120), 3);
        assert_eq!(page_of(119), 2);
        // Truncated, trailing bytes, another version, a key of another kind.
        assert!(decode_page(&key, &bytes[..bytes.len() - 1]).is_err());
        assert!(decode_page(&key, &[bytes.as_slice(), &[0]].concat()).is_err());
        let mut forged = bytes.clone();
        forged[0] = 2;
        assert!(decode_page(&key, &forged).is_err());
        assert!(decode_page(&extent_key(5, 3), &bytes).is_err());
        // Out of order or overlapping extents.
        let swapped = encode_page(&[extent(125, 1, 1, 0), extent(124, 1, 1, 0)]);
        assert!(decode_page(&key, &swapped).is_err());
        let overlapping = encode_page(&[extent(124, 1, 1, 0), extent(125, 2, 1, 0)]);
        assert!(decode_page(&key, &overlapping).is_err());
        // Contexts: used in order of first use, none repeated, none unused.
        // Layout: version, context count, contexts (16 bytes) from byte 2,
        // extent count,
        // then the extents (position, count - 1, context, ...).
        let mut forged = one.clone();
        forged[1] = 2;
        forged.splice(18..18, [7u8; 16]);
        assert!(decode_page(&key, &forged).is_err(), "an unused context");
        let two = encode_page(&[extent(120, 1, 1, 0), extent(121, 1, 2, 0)]);
        assert_eq!(decode_page(&key, &two).unwrap().len(), 2);
        let mut forged = two.clone();
        forged[2..18].copy_from_slice(&two[18..34]);
        forged[18..34].copy_from_slice(&two[2..18]);
        forged[35 + 2] = 1;
        forged[35 + 31 + 2] = 0;
        assert!(decode_page(&key, &forged).is_err(), "contexts out of order");
        let mut forged = two.clone();
        forged[18..34].copy_from_slice(&two[2..18]);
        assert!(decode_page(&key, &forged).is_err(), "a repeated context");
        // The last block's segment offset and nonce counter must fit, and an
        // extent cannot start before block 0.
        let mut e = extent(121, 2, 1, 0);
        e.offset = u32::MAX;
        assert!(decode_page(&key, &encode_page(&[e])).is_err());
        let mut e = extent(121, 2, 0, 0);
        e.nonce = u64::MAX;
        assert!(decode_page(&key, &encode_page(&[e])).is_err());
        let mut forged = encode_page(&[extent(3, 1, 1, 0)]);
        assert_eq!((forged[19], forged[20]), (3, 0));
        forged[20] = 4;
        forged.extend_from_slice(&[0; 4 * TAG_LEN]);
        assert!(decode_page(&page_key(5, 0), &forged).is_err());
        // The last page there is.
        let last = extent(u64::MAX, 2, 1, 0);
        let key = page_key(5, page_of(u64::MAX));
        assert_eq!(
            decode_page(&key, &encode_page(std::slice::from_ref(&last))).unwrap(),
            vec![last]
        );
    }

    #[test]
    fn snapshot_records_round_trip() {
        let r = SnapshotRecord {
            uid: [9; 16],
            created: 1_700_000_000,
            size: 1 << 30,
            name: "weekly-2026-11-30".into(),
        };
        assert_eq!(SnapshotRecord::decode(&r.encode()).unwrap(), r);
        let bytes = r.encode();
        assert!(SnapshotRecord::decode(&bytes[..bytes.len() - 1]).is_err());
        assert_eq!(snapshot_key_epoch(&snapshot_key(3, 44)).unwrap(), 44);
        assert!(snapshot_key_epoch(&snapshot_key(3, 44)[..8]).is_err());
    }

    #[test]
    fn extent_decode_refuses_what_no_writer_produces() {
        let extent = |lba, offset, nonce, blocks| Extent {
            lba,
            segment: 0,
            offset,
            dek_version: 1,
            writer: 0,
            nonce,
            birth: 0,
            tags: vec![[7; TAG_LEN]; blocks],
        };
        let decode = |e: &Extent| Extent::decode(&extent_key(1, e.last()), &e.encode());
        // At most MAX_EXTENT_BLOCKS blocks.
        assert!(decode(&extent(0, 0, 0, MAX_EXTENT_BLOCKS)).is_ok());
        assert!(decode(&extent(0, 0, 0, MAX_EXTENT_BLOCKS + 1)).is_err());
        // The last block's segment offset and nonce counter must fit.
        assert!(decode(&extent(0, u32::MAX - 1, u64::MAX - 1, 2)).is_ok());
        assert!(decode(&extent(0, u32::MAX, 0, 2)).is_err());
        assert!(decode(&extent(0, 0, u64::MAX, 2)).is_err());
        // An extent may end at the last LBA there is.
        let e = extent(u64::MAX - 1, 0, 0, 2);
        assert_eq!(decode(&e).unwrap(), e);
        // Found by fuzzing (volume_records): two blocks at segment offset
        // u32::MAX decoded, and reading the second overflowed.
        let key = extent_key(0x82, 0x8201_ffff_00c4_0202);
        let mut value = vec![1, 0, 2, 0xf0, 0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        value.extend_from_slice(&[0x10, 0xff, 0x83, 0x7a, 0, 0x83, 0, 0, 0x83, 0xf0, 0, 0x7a]);
        value.extend_from_slice(&[0, 0, 0, 0x83, 0x7a, 0x83, 0xf0]);
        value.extend_from_slice(&[0x2f; 13]);
        value.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x7a, 0xff, 0x83, 0xff, 0]);
        assert!(Extent::decode(&key, &value).is_err());
    }

    #[test]
    fn writer_records_round_trip_and_odd_keys_are_corrupt() {
        let w = WriterRecord {
            dek_version: 2,
            salt: [9; 32],
        };
        assert_eq!(WriterRecord::decode(&w.encode()).unwrap(), w);
        assert!(WriterRecord::decode(&w.encode()[..36]).is_err());
        assert_eq!(writer_key_number(&writer_key(3, 77)).unwrap(), 77);
        assert!(writer_key_number(&writer_key(3, 77)[..8]).is_err());
        assert!(writer_key(3, u32::MAX) < writer_key(4, 0));
        assert!(writer_key(3, 0).starts_with(&writer_prefix(3)));
    }

    #[test]
    fn admin_records_round_trip_and_odd_keys_are_corrupt() {
        let t = TombstoneRecord { deleted: 77 };
        assert_eq!(TombstoneRecord::decode(&t.encode()).unwrap(), t);
        assert!(TombstoneRecord::decode(&t.encode()[..8]).is_err());
        assert_eq!(
            tombstone_key_volume(&tombstone_key(0x0102_0304)).unwrap(),
            0x0102_0304
        );
        assert!(tombstone_key_volume(&tombstone_key(1)[..4]).is_err());
        let head = AuditHeadRecord {
            next_seq: 5,
            last_mac: [1; 32],
            mac: [2; 32],
        };
        assert_eq!(head.encode().len(), 73);
        assert_eq!(AuditHeadRecord::decode(&head.encode()).unwrap(), head);
        let entry = AuditEntryRecord {
            time: 9,
            mac: [3; 32],
            fields: [
                "a".into(),
                "bb".into(),
                String::new(),
                "r".into(),
                "é".into(),
            ],
        };
        assert_eq!(AuditEntryRecord::decode(&entry.encode()).unwrap(), entry);
        assert!(AuditEntryRecord::decode(&entry.encode()[1..]).is_err());
        assert_eq!(
            audit_key_seq(&audit_key(u64::MAX - 1)).unwrap(),
            u64::MAX - 1
        );
        assert!(audit_key_seq(&audit_key(1)[..8]).is_err());
        assert!(audit_key(1) < audit_key(2) && audit_key(255) < audit_key(256));
        // Moving a field boundary changes the message.
        let moved = AuditEntryRecord {
            fields: [
                "ab".into(),
                "b".into(),
                String::new(),
                "r".into(),
                "é".into(),
            ],
            ..entry.clone()
        };
        assert_ne!(entry.message(1, &[0; 32]), moved.message(1, &[0; 32]));
        assert_ne!(entry.message(1, &[0; 32]), entry.message(2, &[0; 32]));
    }

    #[test]
    fn job_records_round_trip_and_odd_lengths_are_corrupt() {
        let job = JobRecord {
            target: 3,
            cursor: 1 << 40,
            done: 77,
        };
        let bytes = job.encode();
        assert_eq!(bytes.len(), 21);
        assert_eq!(JobRecord::decode(&bytes).unwrap(), job);
        assert!(JobRecord::decode(&bytes[..20]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(JobRecord::decode(&long).is_err());
        assert!(job_key(3) < job_key(4));
        assert!(dek_usage_key(3, u32::MAX) < dek_usage_key(4, 0));
    }

    #[test]
    fn volume_record_round_trips() {
        let v = VolumeRecord {
            internal_id: 4,
            size: 1 << 30,
            block_size: 4096,
            created: 1,
            updated: 2,
            active_dek: 1,
            keys: vec![(1, vec![9; 65])],
        };
        let d = VolumeRecord::decode(&v.encode()).unwrap();
        assert_eq!(d.keys, v.keys);
        assert_eq!(d.size, v.size);
        let mut bad = v.encode();
        bad[0] = 2;
        assert!(VolumeRecord::decode(&bad).is_err());
    }
}
