//! Snapshots: a volume's contents pinned at one instant, sharing its blocks.
//!
//! # Epochs and births
//!
//! A volume counts *epochs* (record `E`, from 0). Every extent carries the
//! epoch its data was written in, its *birth* (compaction and re-encryption
//! keep it: they move or re-seal the same data). Taking a snapshot, after a
//! flush with writes held at the install gate, commits the snapshot record
//! under the current epoch `e` and moves the volume to epoch `e + 1`, in one
//! batch: constant time, no data copied, nothing written to segments.
//!
//! # What a snapshot sees
//!
//! Snapshot `s` (epoch `e_s`) sees, for each block, the version born at or
//! before `e_s` that was still mapped when `s` was taken. While the volume
//! keeps that version, it is the volume's own mapping. When a flush or a trim
//! replaces a mapping born at or before the *newest* snapshot's epoch, the
//! replaced extent is not let go of: it moves to that snapshot's *preserved*
//! records (`P`, keyed by the snapshot's epoch and the last LBA), in the same
//! batch, and its segment keeps counting it. So every block version is
//! referenced by exactly one record, the volume's mapping or one preserved
//! record, and the live counts stay reference counts.
//!
//! Reading `s` at block `b` looks at the volume's mapping and at the preserved
//! records of `s` and every newer snapshot, and takes the one version born at
//! or before `e_s`. There is at most one: versions of a block are born in
//! increasing epochs, a version replaced before `s` was taken sits in an
//! older snapshot's records (or was let go of), and every version written
//! after `s` was taken is born after `e_s`.
//!
//! # Deleting and rolling back
//!
//! Deleting `s` hands each of its preserved extents to the next older
//! snapshot when that one sees it too (born at or before its epoch), and lets
//! go of the rest, in one batch with the live counts. Rolling back to the
//! newest snapshot lets go of the mappings born after it and makes its
//! preserved extents the volume's mappings again; the store refuses a
//! rollback to an older one until the newer snapshots are deleted (they would
//! see blocks born after the snapshot rolled back to).
//!
//! Compaction leaves blocks that only preserved records reference where they
//! are (a segment holding any is not compacted): moving the others would not
//! free it. Re-encryption after a data key rotation seals preserved blocks
//! again too, and a DEK is destroyed only when no preserved record names it.
//!
//! This module must never let go of a block a snapshot still sees, and never
//! let a snapshot read a block born after it.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::index::ExtentView;
use super::{CommitKind, Epochs, Location, MappingCommit, Slot, VolumeInner, corrupt};
use crate::error::VolumeError;
use crate::meta::{Batch, MetaStore};
use crate::record::{self, Extent, SnapshotRecord, WriterRecord};

/// A snapshot of a volume, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// The snapshot's name, unique within its volume.
    pub name: String,
    /// The volume's epoch the snapshot ends; orders snapshots by age.
    pub epoch: u32,
    /// Random and never reused: identifies the snapshot in backups.
    pub uid: [u8; 16],
    /// When it was taken, seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size when it was taken, in bytes.
    pub size: u64,
    /// Bytes of data only snapshots hold: blocks the volume has overwritten
    /// or trimmed since, kept for this snapshot (and maybe older ones).
    pub held_bytes: u64,
}

/// The snapshot records of a volume, by epoch.
pub(crate) fn load_snapshots(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<BTreeMap<u32, SnapshotRecord>, VolumeError> {
    let mut out = BTreeMap::new();
    let mut bad = None;
    meta.scan_prefix(&record::snapshot_prefix(volume), &mut |key, value| {
        match record::snapshot_key_epoch(key)
            .and_then(|epoch| SnapshotRecord::decode(value).map(|r| (epoch, r)))
        {
            Ok((epoch, r)) => {
                out.insert(epoch, r);
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
        None => Ok(out),
    }
}

/// A volume's snapshots, oldest first, with the bytes each holds, from the
/// metadata alone (open or not: every change commits there).
/// Without `count_held`, `held_bytes` is 0 and only the snapshot records are
/// read (the preserved records may be millions).
pub(crate) fn snapshot_infos(
    meta: &dyn MetaStore,
    volume: u32,
    block_size: u64,
    count_held: bool,
) -> Result<Vec<SnapshotInfo>, VolumeError> {
    let records = load_snapshots(meta, volume)?;
    if records.is_empty() || !count_held {
        return Ok(records
            .into_iter()
            .map(|(epoch, r)| SnapshotInfo {
                name: r.name,
                epoch,
                uid: r.uid,
                created: r.created,
                size: r.size,
                held_bytes: 0,
            })
            .collect());
    }
    let mut held: HashMap<u32, u64> = HashMap::new();
    let mut bad = None;
    meta.scan_prefix(&record::preserved_prefix(volume), &mut |key, value| {
        match record::decode_preserved(key, value) {
            Ok((epoch, extent)) => {
                *held.entry(epoch).or_default() += extent.tags.len() as u64;
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = bad {
        return Err(corrupt(e));
    }
    Ok(records
        .into_iter()
        .map(|(epoch, r)| SnapshotInfo {
            name: r.name,
            epoch,
            uid: r.uid,
            created: r.created,
            size: r.size,
            held_bytes: held.get(&epoch).copied().unwrap_or(0) * block_size,
        })
        .collect())
}

/// The volume's current epoch (record `E`; absent: 0).
pub(crate) fn load_epoch(meta: &dyn MetaStore, volume: u32) -> Result<u32, VolumeError> {
    match meta.get(&record::epoch_key(volume))? {
        Some(bytes) => record::decode_u32(&bytes, "volume epoch").map_err(corrupt),
        None => Ok(0),
    }
}

/// What the preserved records of a volume add up to, checked at open.
pub(super) struct Preserved {
    pub(super) epochs: Epochs,
    /// Blocks per segment the preserved records reference.
    pub(super) per_segment: HashMap<u32, u64>,
    /// Writers the preserved records name.
    pub(super) writers: HashSet<u32>,
}

/// Loads the snapshot state at open and checks the preserved records: each
/// belongs to a snapshot, was born no later than it, names a DEK and writer
/// the volume holds, and a snapshot's records do not overlap.
pub(super) fn load_preserved(
    meta: &dyn MetaStore,
    volume: u32,
    deks: &HashMap<u32, blockseal_keys::DataKey>,
    writers: &HashMap<u32, WriterRecord>,
) -> Result<Preserved, VolumeError> {
    let snapshots = load_snapshots(meta, volume)?;
    let epoch = load_epoch(meta, volume)?;
    let newest = snapshots.keys().next_back().copied();
    if newest.is_some_and(|n| n >= epoch) {
        return Err(VolumeError::Corrupt {
            what: format!(
                "a snapshot of epoch {} is not older than the volume's epoch {epoch}",
                newest.unwrap_or(0)
            ),
        });
    }
    let mut per_segment: HashMap<u32, u64> = HashMap::new();
    let mut named = HashSet::new();
    let mut bad: Option<String> = None;
    let mut next: (u32, u64) = (0, 0);
    meta.scan_prefix(&record::preserved_prefix(volume), &mut |key, value| {
        let (snap, extent) = match record::decode_preserved(key, value) {
            Ok(x) => x,
            Err(e) => {
                bad = Some(e.0);
                return false;
            }
        };
        if !snapshots.contains_key(&snap) {
            bad = Some(format!(
                "preserved blocks {}..={} belong to snapshot epoch {snap}, which does not exist",
                extent.lba,
                extent.last()
            ));
            return false;
        }
        if (snap, extent.lba) < next {
            bad = Some(format!(
                "preserved records of snapshot epoch {snap} overlap at block {}",
                extent.lba
            ));
            return false;
        }
        next = (snap, extent.last().saturating_add(1));
        let known = deks.contains_key(&extent.dek_version)
            && (extent.writer == 0
                || writers
                    .get(&extent.writer)
                    .is_some_and(|w| w.dek_version == extent.dek_version));
        if !known {
            bad = Some(format!(
                "preserved blocks {}..={} were sealed by writer {} (DEK v{}), of which \
                 the metadata has no record",
                extent.lba,
                extent.last(),
                extent.writer,
                extent.dek_version
            ));
            return false;
        }
        named.insert(extent.writer);
        *per_segment.entry(extent.segment).or_default() += extent.tags.len() as u64;
        true
    })?;
    if let Some(what) = bad {
        return Err(VolumeError::Corrupt { what });
    }
    Ok(Preserved {
        epochs: Epochs { epoch, newest },
        per_segment,
        writers: named,
    })
}

impl VolumeInner {
    /// Takes a snapshot: with writes held at the install gate, flushes, then
    /// commits `snapshot` under the current epoch and moves the volume to the
    /// next. Returns the snapshot's epoch. The caller (the store's admin lock)
    /// checked the name.
    pub(crate) fn take_snapshot(&self, snapshot: &SnapshotRecord) -> Result<u32, VolumeError> {
        self.end_epoch(Some(snapshot), snapshot.created)
    }

    /// Ends the current epoch without a snapshot (an *age mark*: data
    /// retention tells the age of blocks by the epoch they were born in).
    /// Returns the epoch that ended.
    pub(crate) fn mark_age(&self, now: u64) -> Result<u32, VolumeError> {
        self.end_epoch(None, now)
    }

    /// With writes held at the install gate, flushes, then commits the next
    /// epoch's start (and `snapshot` under the current epoch). Returns the
    /// epoch that ended.
    fn end_epoch(&self, snapshot: Option<&SnapshotRecord>, now: u64) -> Result<u32, VolumeError> {
        let _no_installs = self.installing.write().unwrap_or_else(|e| e.into_inner());
        self.flush()?;
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let epoch = state.snap.epochs.epoch;
        let next = epoch.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
            what: "the volume's snapshot epochs are spent".into(),
        })?;
        let mut batch = Batch::new();
        if let Some(snapshot) = snapshot {
            batch.put(
                record::snapshot_key(self.internal_id, epoch).to_vec(),
                snapshot.encode(),
            );
        }
        batch.put(
            record::epoch_key(self.internal_id).to_vec(),
            next.to_be_bytes().to_vec(),
        );
        batch.put(
            record::epoch_start_key(self.internal_id, next).to_vec(),
            record::encode_u64(now).to_vec(),
        );
        if let Err(e) = self.meta.commit(&batch) {
            self.poison();
            return Err(e.into());
        }
        state.snap.epochs.epoch = next;
        if snapshot.is_some() {
            state.snap.epochs.newest = Some(epoch);
        }
        Ok(epoch)
    }

    /// When each epoch after the first began (seconds since the Unix epoch).
    pub(crate) fn epoch_starts(&self) -> Result<BTreeMap<u32, u64>, VolumeError> {
        let mut out = BTreeMap::new();
        let mut bad = None;
        self.meta.scan_prefix(
            &record::epoch_start_prefix(self.internal_id),
            &mut |key, value| {
                let epoch = key
                    .get(5..9)
                    .filter(|_| key.len() == 9)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match (epoch, record::decode_u64(value, "epoch start")) {
                    (Some(epoch), Ok(t)) => {
                        out.insert(epoch, t);
                        true
                    }
                    (_, Err(e)) => {
                        bad = Some(e);
                        false
                    }
                    (None, _) => {
                        bad = Some(record::Corrupt("epoch start key".into()));
                        false
                    }
                }
            },
        )?;
        match bad {
            Some(e) => Err(corrupt(e)),
            None => Ok(out),
        }
    }

    /// Discards (as a trim would) every block of the volume whose data was
    /// written in an epoch that ended at or before `cutoff` (seconds since the
    /// Unix epoch). Snapshots keep what they see. Returns the blocks
    /// discarded.
    pub(crate) fn discard_older_than(&self, cutoff: u64) -> Result<u64, VolumeError> {
        let starts = self.epoch_starts()?;
        // The newest epoch wholly before the cutoff: the one before the
        // newest epoch that began at or before it.
        let Some(last_old) = starts
            .iter()
            .filter(|&(_, &t)| t <= cutoff)
            .map(|(&e, _)| e)
            .max()
            .and_then(|e| e.checked_sub(1))
        else {
            return Ok(0);
        };
        let _no_installs = self.installing.write().unwrap_or_else(|e| e.into_inner());
        self.flush()?;
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        // With the gate held and the overlay flushed, the committed extents
        // are the volume's whole mapping, and each lies within one epoch.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        self.visit_extents(0, u64::MAX, &mut |extent| {
            if extent.birth <= last_old {
                let (from, to) = (extent.lba, extent.last() + 1);
                match runs.last_mut() {
                    Some((_, end)) if *end == from => *end = to,
                    _ => runs.push((from, to)),
                }
            }
        })?;
        if runs.is_empty() {
            return Ok(0);
        }
        let blocks = runs.iter().map(|(a, b)| b - a).sum();
        let mut commit = MappingCommit::default();
        self.build_commit(&runs, &[], state.snap.epochs, &mut commit)?;
        self.commit_mappings(&mut state, commit, CommitKind::Foreground)?;
        Ok(blocks)
    }

    /// The volume's snapshots, oldest first, with the bytes each holds.
    pub(crate) fn snapshots(&self) -> Result<Vec<SnapshotInfo>, VolumeError> {
        snapshot_infos(
            self.meta.as_ref(),
            self.internal_id,
            self.block_size.len() as u64,
            true,
        )
    }

    /// Deletes the snapshot of epoch `epoch`: its preserved extents go to the
    /// next older snapshot where that one sees them, the rest are let go of.
    pub(crate) fn drop_snapshot(&self, epoch: u32) -> Result<(), VolumeError> {
        // No compaction or re-encryption step is between reading a preserved
        // record and switching it.
        let _steps = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let snapshots = load_snapshots(self.meta.as_ref(), self.internal_id)?;
        if !snapshots.contains_key(&epoch) {
            return Ok(());
        }
        let older = snapshots.range(..epoch).next_back().map(|(&e, _)| e);
        let newest = snapshots.keys().copied().filter(|&e| e != epoch).max();
        let mut commit = MappingCommit::default();
        commit
            .batch
            .delete(record::snapshot_key(self.internal_id, epoch).to_vec());
        let mut preserved = Vec::new();
        self.scan_preserved(Some(epoch), 0, u64::MAX, &mut |_, extent| {
            preserved.push(extent)
        })?;
        for extent in preserved {
            commit
                .batch
                .delete(record::preserved_key(self.internal_id, epoch, extent.last()).to_vec());
            match older {
                Some(older) if extent.birth <= older => commit.batch.put(
                    record::preserved_key(self.internal_id, older, extent.last()).to_vec(),
                    extent.encode(),
                ),
                _ => {
                    let n = extent.tags.len() as i64;
                    *commit.deltas.entry(extent.segment).or_default() -= n;
                    *commit.pinned.entry(extent.segment).or_default() -= n;
                }
            }
        }
        self.commit_mappings(&mut state, commit, CommitKind::Foreground)?;
        state.snap.epochs.newest = newest;
        Ok(())
    }

    /// Makes the volume's contents those of the newest snapshot, of epoch
    /// `epoch` (the caller checked it is the newest): mappings born after it
    /// are let go of and its preserved extents become mappings again. The
    /// snapshot stays.
    pub(crate) fn roll_back(&self, epoch: u32) -> Result<(), VolumeError> {
        let _steps = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        let _no_installs = self.installing.write().unwrap_or_else(|e| e.into_inner());
        self.flush()?;
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        if state.snap.epochs.newest != Some(epoch) {
            return Err(VolumeError::Corrupt {
                what: format!("snapshot epoch {epoch} is not the volume's newest"),
            });
        }
        let mut commit = MappingCommit::default();
        let mut later: Vec<Extent> = Vec::new();
        self.visit_extents(0, u64::MAX, &mut |extent| {
            if extent.birth > epoch {
                later.push(extent.to_extent());
            }
        })?;
        for extent in later {
            commit.change.removed.push(extent.last());
            *commit.deltas.entry(extent.segment).or_default() -= extent.tags.len() as i64;
        }
        let mut preserved = Vec::new();
        self.scan_preserved(Some(epoch), 0, u64::MAX, &mut |_, extent| {
            preserved.push(extent)
        })?;
        for extent in preserved {
            commit
                .batch
                .delete(record::preserved_key(self.internal_id, epoch, extent.last()).to_vec());
            *commit.pinned.entry(extent.segment).or_default() -= extent.tags.len() as i64;
            commit.change.added.push(extent);
        }
        self.commit_mappings(&mut state, commit, CommitKind::Foreground)
    }

    /// Visits the preserved extents of snapshot `only` (or of every snapshot)
    /// overlapping blocks `from..to`, by snapshot and then LBA.
    pub(super) fn scan_preserved(
        &self,
        only: Option<u32>,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u32, Extent),
    ) -> Result<(), VolumeError> {
        let epochs: Vec<u32> = match only {
            Some(epoch) => vec![epoch],
            None => load_snapshots(self.meta.as_ref(), self.internal_id)?
                .into_keys()
                .collect(),
        };
        for epoch in epochs {
            let start = record::preserved_key(self.internal_id, epoch, from);
            let end = crate::meta::prefix_end(&record::preserved_snapshot_prefix(
                self.internal_id,
                epoch,
            ));
            let mut bad = None;
            self.meta.scan(
                &start,
                end.as_deref(),
                &mut |key, value| match record::decode_preserved(key, value) {
                    Ok((_, extent)) if extent.lba >= to => false,
                    Ok((e, extent)) => {
                        visit(e, extent);
                        true
                    }
                    Err(e) => {
                        bad = Some(e);
                        false
                    }
                },
            )?;
            if let Some(e) = bad {
                return Err(corrupt(e));
            }
        }
        Ok(())
    }

    /// The extents snapshot `epoch` sees among blocks `from..to`, in LBA
    /// order (clipped to the range), consistent with one instant: taken under
    /// the flush lock, under which every mapping change commits.
    pub(crate) fn snapshot_extents(
        &self,
        epoch: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<Extent>, VolumeError> {
        let state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let mut out: Vec<Extent> = Vec::new();
        let clip = |extent: &Extent| -> Option<Extent> {
            let a = extent.lba.max(from);
            let b = (extent.last() + 1).min(to);
            (a < b).then(|| extent.slice(a, b))
        };
        self.visit_extents(from, to, &mut |view: ExtentView<'_>| {
            if view.birth <= epoch
                && let Some(e) = clip(&view.to_extent())
            {
                out.push(e);
            }
        })?;
        let newer: Vec<u32> = load_snapshots(self.meta.as_ref(), self.internal_id)?
            .into_keys()
            .filter(|&e| e >= epoch)
            .collect();
        for snap in newer {
            self.scan_preserved(Some(snap), from, to, &mut |_, extent| {
                if extent.birth <= epoch
                    && let Some(e) = clip(&extent)
                {
                    out.push(e);
                }
            })?;
        }
        drop(state);
        out.sort_by_key(|e| e.lba);
        if out.windows(2).any(|w| w[0].last() >= w[1].lba) {
            return Err(VolumeError::Corrupt {
                what: format!("snapshot epoch {epoch} sees two versions of one block"),
            });
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes at `offset` of snapshot `epoch` (the caller
    /// checked the range against the snapshot's size).
    pub(crate) fn read_snapshot(
        &self,
        epoch: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VolumeError> {
        if buf.is_empty() {
            return Ok(());
        }
        // As a volume read: no segment these locations name is deleted
        // before the reads below are done.
        let _no_deletion = self.segment_reads.read().unwrap_or_else(|e| e.into_inner());
        let bs = self.block_size.len() as u64;
        let first = offset / bs;
        let end = (offset + buf.len() as u64 - 1) / bs + 1;
        let mut slots: Vec<Option<Slot>> = vec![None; (end - first) as usize];
        for extent in self.snapshot_extents(epoch, first, end)? {
            let view = ExtentView::from(&extent);
            for k in 0..extent.tags.len() {
                let loc: Location = view.location(k);
                slots[(extent.lba + k as u64 - first) as usize] = Some(Slot::Mapped(loc));
            }
        }
        if offset.is_multiple_of(bs) && (buf.len() as u64).is_multiple_of(bs) {
            return self.open_blocks(first, &slots, buf);
        }
        let mut scratch = zeroize::Zeroizing::new(vec![0u8; slots.len() * bs as usize]);
        self.open_blocks(first, &slots, &mut scratch)?;
        let skip = (offset - first * bs) as usize;
        let len = buf.len();
        buf.copy_from_slice(&scratch[skip..skip + len]);
        Ok(())
    }
}

/// What a backup reads of a volume while it holds the volume's step lock (no
/// compaction or re-encryption step moves or deletes anything meanwhile).
pub(crate) struct Frozen<'a> {
    inner: &'a VolumeInner,
    _steps: std::sync::MutexGuard<'a, ()>,
}

impl VolumeInner {
    /// Holds the volume's step lock until the returned value drops.
    pub(crate) fn freeze(&self) -> Frozen<'_> {
        Frozen {
            _steps: self.compaction.lock().unwrap_or_else(|e| e.into_inner()),
            inner: self,
        }
    }
}

impl Frozen<'_> {
    /// The extents snapshot `epoch` sees among blocks `from..to`.
    pub(crate) fn extents(
        &self,
        epoch: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<Extent>, VolumeError> {
        self.inner.snapshot_extents(epoch, from, to)
    }

    /// Reads the ciphertext of `extent`'s blocks into `buf` (its length).
    pub(crate) fn read_ciphertext(
        &self,
        extent: &Extent,
        buf: &mut [u8],
    ) -> Result<(), VolumeError> {
        let _no_deletion = self
            .inner
            .segment_reads
            .read()
            .unwrap_or_else(|e| e.into_inner());
        self.inner
            .segments
            .read_at(
                self.inner.segment_id(extent.segment),
                u64::from(extent.offset) * self.inner.block_size.len() as u64,
                buf,
            )
            .map_err(VolumeError::Io)
    }

    /// The DEK version new writes seal under.
    pub(crate) fn active_dek(&self) -> u32 {
        self.inner
            .active_dek
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The record of writer `number`, if the volume knows it.
    pub(crate) fn writer(&self, number: u32) -> Option<WriterRecord> {
        self.inner
            .writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&number)
            .map(|w| w.record.clone())
    }

    /// Runs `f` with DEK `version`, if the volume holds it.
    pub(crate) fn with_dek<R>(
        &self,
        version: u32,
        f: impl FnOnce(&blockseal_keys::DataKey) -> R,
    ) -> Option<R> {
        self.inner
            .deks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
            .map(f)
    }
}
