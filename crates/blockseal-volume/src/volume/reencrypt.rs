//! Data key (DEK) rotation in an open volume, and re-encryption of the blocks
//! older DEKs sealed, until those DEKs can be destroyed.
//!
//! # Switching to a new DEK
//!
//! The store commits the new wrapped DEK (made the volume record's active one)
//! together with the volume's re-encryption job record (`r`), then hands the
//! DEK to the open instance ([`Volume::adopt_dek`]): under the head lock the
//! active version changes and the current writer is dropped, so the next
//! allocation makes a writer derived from the new DEK, exactly as a first write
//! does (fresh salt, counter from zero, record committed with the first extents
//! naming it). Writes that had reserved space under the old writer before the
//! switch still install old-DEK mappings; that is what re-encryption is for.
//!
//! # Re-encryption, step by step
//!
//! A pass first waits for writes in flight (the install gate) and flushes, so
//! every old-DEK mapping is committed. Then, per step of at most a few MiB,
//! under the volume's compaction lock (so compaction neither moves nor deletes
//! what a step reads):
//!
//! 1. walk the committed mappings from the job's cursor and take the blocks
//!    whose DEK version is not the active one;
//! 2. read their ciphertext and open each block with its own writer key (a
//!    block that fails authentication is counted, logged and left alone: its
//!    DEK then stays);
//! 3. seal them under the volume's current writer, with nonces reserved from
//!    its counter like any write ([`VolumeInner::allocate`]), write them at the
//!    head and sync;
//! 4. under the flush lock, in ONE atomic batch with the live counts, the
//!    records of writers made since the last commit and the job's progress,
//!    switch only the blocks whose committed mapping is still exactly the one
//!    read (as compaction's step 5 does). A block written, trimmed or moved
//!    since keeps its newer mapping; its new copy is dead space at the head.
//!
//! The cursor only says where to look first: a pass sweeps from it to the end,
//! then from block 0, and ends after a whole sweep from block 0 found nothing
//! to switch. Whether a DEK is still needed is decided by the mappings alone.
//!
//! # Destroying old DEKs
//!
//! Under the store's admin lock (so no rotation, rewrap or other change of the
//! volume record interleaves) and the compaction lock, after the install gate (no write can still
//! install a mapping sealed before the switch) and under the flush lock, a DEK
//! other than the active one is destroyed only when neither the overlay nor
//! any committed mapping names it: one commit removes its wrapped key from the
//! volume record, its writer records and usage record, and the job record.
//! Only then do the key and its writer keys leave memory (after reads in flight
//! that may hold an old location are done).
//!
//! # Nonce budget
//!
//! Every nonce a writer reserves counts against its DEK's budget
//! ([`nonce::dek_limit`]); the count is committed (record `u`) with each flush
//! and re-encryption step. When half is spent the volume asks the store's
//! re-encryption thread for an automatic rotation. The thread wraps the new DEK
//! with the tenant KEK the volume was opened with, after checking under the
//! admin lock that this KEK still unwraps the volume's recorded active DEK (a
//! KEK or master key rotation since the open makes it wait for the next open).
//!
//! This module must never seal under a nonce that did not come from a writer's
//! counter, never switch a mapping that is not exactly the one it read, never
//! remove a DEK while a mapping, an overlay entry or a writer may still need
//! it, and never log plaintext or key material. Compaction (`compact.rs`) stays
//! the module that never decrypts; this one does, block by block, in wiped
//! buffers.
//!
//! [`nonce::dek_limit`]: crate::nonce::dek_limit

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockseal_keys::{DataKey, KeyVersion, TenantKek, WrappedKey};
use zeroize::Zeroizing;

use super::{CommitKind, Location, MappingCommit, Slot, Volume, VolumeInner, corrupt};
use crate::block::Lba;
use crate::compactor::Wakeup;
use crate::error::VolumeError;
use crate::mapping;
use crate::meta::{Batch, MetaStore};
use crate::nonce::nonce_for;
use crate::record::{self, Extent, JobRecord, MAX_EXTENT_BLOCKS, VolumeRecord, WriterRecord};
use crate::store::{RotateError, commit_rotation};

/// Bytes of blocks re-encrypted, synced and committed per step at most.
pub(crate) const STEP_BYTES: u64 = 8 << 20;

/// Blocks of the volume's address space one lookup of a step covers.
const WINDOW_BLOCKS: u64 = 1 << 16;

/// Whole sweeps one pass makes at most: one from the cursor, one from block 0,
/// and one more when a rotation during the pass left blocks behind.
const MAX_SWEEPS: u32 = 3;

/// The DEKs of a volume: how many blocks each one's mappings hold, which one
/// seals new writes, and how far re-encryption has come.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DataKeyStatus {
    /// The DEK version new writes are sealed under.
    pub active: KeyVersion,
    /// Every DEK version the volume record holds, ascending, with its blocks.
    pub keys: Vec<DataKeyUsage>,
    /// The re-encryption job, while one is unfinished.
    pub job: Option<ReencryptionProgress>,
}

/// One DEK version of [`DataKeyStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DataKeyUsage {
    /// The DEK version.
    pub version: KeyVersion,
    /// Blocks whose committed mapping names this version.
    pub blocks: u64,
}

/// Progress of a volume's re-encryption job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReencryptionProgress {
    /// The DEK version every block is being moved to.
    pub target: KeyVersion,
    /// Blocks re-encrypted since the job began (across restarts).
    pub blocks_done: u64,
    /// Blocks whose committed mapping still names an older DEK.
    pub blocks_remaining: u64,
    /// Whether a pass is working on the job right now.
    pub running: bool,
}

/// What [`Volume::reencrypt_now`] (or a background pass) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReencryptionReport {
    /// Blocks sealed again under the active DEK whose mapping switched.
    pub blocks_reencrypted: u64,
    /// Blocks that failed authentication and stay under their old DEK (which
    /// is therefore kept).
    pub blocks_unreadable: u64,
    /// DEK versions destroyed at the end of the job.
    pub destroyed: Vec<KeyVersion>,
    /// Whether no block is left under an older DEK (and no job remains).
    pub finished: bool,
}

/// What the store lends an open volume for rotation and re-encryption.
pub(crate) struct RekeyParts {
    /// The store's admin lock: held by every change of a volume record.
    pub(crate) admin: Arc<Mutex<()>>,
    /// The tenant KEK the volume was opened with, for automatic rotations.
    pub(crate) kek: Option<TenantKek>,
    /// Wakes the store's re-encryption thread.
    pub(crate) wake: Option<Arc<Wakeup>>,
}

/// A volume's rotation and re-encryption state.
pub(crate) struct Rekey {
    /// The job (as committed, or about to be by the next step).
    job: Mutex<Option<JobRecord>>,
    /// Nonces reserved by writers of the active DEK (counted under the head lock).
    usage: AtomicU64,
    /// Half of the active DEK's budget: an automatic rotation is due past it.
    threshold: u64,
    /// The whole budget, for the log line.
    limit: u64,
    /// An automatic rotation is due.
    due: AtomicBool,
    /// A pass is running.
    running: AtomicU64,
    /// The last pass left blocks it cannot open: background passes wait for
    /// the next rotation (or an explicit `reencrypt_now`).
    stalled: AtomicBool,
    /// The KEK no longer unwraps the volume's keys (rotated since the open).
    kek_stale: AtomicBool,
    /// The store let go of the volume for a deletion: background passes end
    /// at their next step and start no more.
    released: AtomicBool,
    reencrypted: AtomicU64,
    automatic: AtomicU64,
    admin: Arc<Mutex<()>>,
    kek: Option<TenantKek>,
    wake: Option<Arc<Wakeup>>,
}

impl Rekey {
    /// The state of a volume being opened: its job (a volume holding more than
    /// one DEK has one, whether or not its record survived) and the usage of
    /// its active DEK.
    pub(crate) fn load(
        meta: &dyn MetaStore,
        volume: u32,
        active: u32,
        keys: usize,
        writer_limit: u64,
        parts: RekeyParts,
    ) -> Result<Rekey, VolumeError> {
        let mut job = match meta.get(&record::job_key(volume))? {
            Some(bytes) => Some(JobRecord::decode(&bytes).map_err(corrupt)?),
            None => None,
        };
        if job.is_none() && keys > 1 {
            job = Some(JobRecord {
                target: active,
                cursor: 0,
                done: 0,
            });
        }
        if let Some(job) = job.as_mut()
            && job.target != active
        {
            job.target = active;
            job.cursor = 0;
        }
        let usage = match meta.get(&record::dek_usage_key(volume, active))? {
            Some(bytes) => record::decode_u64(&bytes, "DEK usage").map_err(corrupt)?,
            None => 0,
        };
        let limit = crate::nonce::dek_limit(writer_limit);
        let threshold = (limit / 2).max(1);
        Ok(Rekey {
            job: Mutex::new(job),
            usage: AtomicU64::new(usage),
            threshold,
            limit,
            due: AtomicBool::new(usage >= threshold),
            running: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            released: AtomicBool::new(false),
            kek_stale: AtomicBool::new(false),
            reencrypted: AtomicU64::new(0),
            automatic: AtomicU64::new(0),
            admin: parts.admin,
            kek: parts.kek,
            wake: parts.wake,
        })
    }

    pub(crate) fn reencrypted_blocks(&self) -> u64 {
        self.reencrypted.load(Ordering::Relaxed)
    }

    pub(crate) fn automatic_rotations(&self) -> u64 {
        self.automatic.load(Ordering::Relaxed)
    }

    pub(crate) fn nonces_used(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    pub(crate) fn nonce_budget(&self) -> u64 {
        self.limit
    }

    fn lock_job(&self) -> MutexGuard<'_, Option<JobRecord>> {
        // A value replaced in one assignment: a poisoned lock still holds one.
        self.job.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            wake.notify();
        }
    }
}

/// Counts the committed mapped blocks per DEK version of volume `volume` in the
/// metadata store (for a volume that is not open).
pub(crate) fn dek_blocks_in_store(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<BTreeMap<u32, u64>, VolumeError> {
    let mut blocks: BTreeMap<u32, u64> = BTreeMap::new();
    mapping::scan_extents(meta, volume, 0, &mut |extent| {
        *blocks.entry(extent.dek_version).or_default() += extent.tags.len() as u64;
        true
    })?
    .map_err(corrupt)?;
    Ok(blocks)
}

/// Builds a [`DataKeyStatus`] from the volume record's versions, the blocks
/// per version and the job.
pub(crate) fn status_of(
    record: &VolumeRecord,
    blocks: &BTreeMap<u32, u64>,
    job: Option<JobRecord>,
    running: bool,
) -> DataKeyStatus {
    let mut versions: Vec<u32> = record.keys.iter().map(|&(v, _)| v).collect();
    versions.sort_unstable();
    let keys = versions
        .iter()
        .map(|&v| DataKeyUsage {
            version: KeyVersion(v),
            blocks: blocks.get(&v).copied().unwrap_or(0),
        })
        .collect();
    let remaining = blocks
        .iter()
        .filter(|&(&v, _)| v != record.active_dek)
        .map(|(_, &n)| n)
        .sum();
    DataKeyStatus {
        active: KeyVersion(record.active_dek),
        keys,
        job: job.map(|job| ReencryptionProgress {
            target: KeyVersion(job.target),
            blocks_done: job.done,
            blocks_remaining: remaining,
            running,
        }),
    }
}

impl Volume {
    /// The volume's DEKs, the blocks each one's committed mappings hold, and the
    /// progress of its re-encryption job (see
    /// [`Store::data_key_status`](crate::Store::data_key_status)).
    pub fn data_key_status(&self) -> Result<DataKeyStatus, VolumeError> {
        let i = &self.inner;
        let record = i
            .volume_record()?
            .ok_or_else(|| VolumeError::NoSuchVolume {
                tenant: i.tenant.clone(),
                volume: i.name.clone(),
            })?;
        let blocks = i.dek_blocks()?;
        let job = *i.rekey.lock_job();
        Ok(status_of(
            &record,
            &blocks,
            job,
            i.rekey.running.load(Ordering::Acquire) > 0,
        ))
    }

    /// Re-encrypts now, without the background rate limit, every block an
    /// older DEK sealed, then destroys the DEKs no mapping needs any more.
    /// Returns when the job is finished, or when only blocks that fail
    /// authentication are left (their DEK stays; see the report).
    pub fn reencrypt_now(&self) -> Result<ReencryptionReport, VolumeError> {
        let mut report = self.inner.reencrypt(STEP_BYTES, &mut |_| true)?;
        if !report.finished && report.blocks_unreadable == 0 {
            // A rotation during the pass left blocks behind: one more.
            let more = self.inner.reencrypt(STEP_BYTES, &mut |_| true)?;
            report.blocks_reencrypted += more.blocks_reencrypted;
            report.blocks_unreadable = more.blocks_unreadable;
            report.destroyed.extend(more.destroyed);
            report.finished = more.finished;
        }
        Ok(report)
    }

    /// Switches the open instance to `dek`, the volume record's new active DEK
    /// (committed by the caller together with `job`).
    pub(crate) fn adopt_dek(&self, dek: DataKey, job: JobRecord) {
        self.inner.adopt_dek(dek, job);
    }
}

impl VolumeInner {
    /// Counts `seals` nonces just reserved by the current writer (the caller
    /// holds the head lock) and asks for an automatic rotation once half of
    /// the active DEK's budget is spent.
    pub(super) fn count_seals(&self, seals: u64) {
        let used = self.rekey.usage.fetch_add(seals, Ordering::Relaxed) + seals;
        if used >= self.rekey.threshold && !self.rekey.due.swap(true, Ordering::AcqRel) {
            self.rekey.wake();
        }
    }

    /// Puts the active DEK's usage into a commit's batch (the caller holds the
    /// flush lock).
    pub(super) fn put_dek_usage(&self, batch: &mut Batch) {
        // Read together under the head lock, where a rotation changes both.
        let (active, used) = {
            let _head = self.lock_head();
            (
                self.active_dek.load(Ordering::Acquire),
                self.rekey.usage.load(Ordering::Relaxed),
            )
        };
        batch.put(
            record::dek_usage_key(self.internal_id, active).to_vec(),
            record::encode_u64(used).to_vec(),
        );
    }

    fn adopt_dek(&self, dek: DataKey, job: JobRecord) {
        let version = dek.version().0;
        self.deks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version, dek);
        {
            let mut head = self.lock_head();
            self.active_dek.store(version, Ordering::Release);
            // The next allocation makes a writer of the new DEK.
            head.writer = None;
            self.rekey.usage.store(0, Ordering::Relaxed);
            self.rekey.due.store(false, Ordering::Release);
        }
        *self.rekey.lock_job() = Some(job);
        self.rekey.stalled.store(false, Ordering::Release);
        self.rekey.wake();
    }

    /// Whether an automatic rotation is due.
    pub(crate) fn rotation_due(&self) -> bool {
        self.rekey.due.load(Ordering::Acquire)
            && !self.rekey.kek_stale.load(Ordering::Acquire)
            && !self.poisoned.load(Ordering::Acquire)
    }

    /// Whether the background thread has re-encryption to do here.
    pub(crate) fn wants_reencryption(&self) -> bool {
        !self.poisoned.load(Ordering::Acquire)
            && !self.rekey.stalled.load(Ordering::Acquire)
            && self.rekey.lock_job().is_some()
    }

    /// Rotates the DEK because half of its nonce budget is spent: a new DEK,
    /// wrapped with the KEK the volume was opened with, committed and adopted.
    /// Returns the old and new versions, or `None` when nothing was done.
    pub(crate) fn rotate_automatically(&self) -> Result<Option<(u32, u32)>, RotateError> {
        let Some(kek) = &self.rekey.kek else {
            return Ok(None);
        };
        let _admin = self.rekey.lock_admin();
        let Some(mut record) = self.volume_record()? else {
            return Ok(None);
        };
        let active = self.active_dek.load(Ordering::Acquire);
        if record.active_dek != active || !self.rekey.due.load(Ordering::Acquire) {
            // Rotated meanwhile (the instance adopted it).
            return Ok(None);
        }
        // The KEK must be the one the record's keys are wrapped under now.
        let fresh = record
            .keys
            .iter()
            .find(|&&(v, _)| v == active)
            .and_then(|(_, bytes)| WrappedKey::from_bytes(bytes).ok())
            .is_some_and(|wrapped| kek.unwrap(&self.name, &wrapped).is_ok());
        if !fresh {
            if !self.rekey.kek_stale.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    tenant = %self.tenant,
                    volume = %self.name,
                    dek_version = active,
                    "data key nonce budget half spent, but the tenant key changed since the \
                     volume was opened: rotate the data key, or reopen the volume"
                );
            }
            return Ok(None);
        }
        let (dek, job) = commit_rotation(
            self.meta.as_ref(),
            &self.tenant,
            &self.name,
            kek,
            &mut record,
        )?;
        let new = dek.version().0;
        self.adopt_dek(dek, job);
        self.rekey.automatic.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            tenant = %self.tenant,
            volume = %self.name,
            old_dek_version = active,
            new_dek_version = new,
            dek_nonce_limit = self.rekey.limit,
            "half of the data key's nonce budget is spent: rotated the data key; \
             its blocks are re-encrypted in the background"
        );
        Ok(Some((active, new)))
    }

    /// The volume record, as committed.
    fn volume_record(&self) -> Result<Option<VolumeRecord>, VolumeError> {
        match self
            .meta
            .get(&record::volume_key(&self.tenant, &self.name))?
        {
            Some(bytes) => Ok(Some(VolumeRecord::decode(&bytes).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Committed mapped blocks per DEK version.
    fn dek_blocks(&self) -> Result<BTreeMap<u32, u64>, VolumeError> {
        let mut blocks: BTreeMap<u32, u64> = BTreeMap::new();
        self.visit_extents(0, u64::MAX, &mut |extent| {
            *blocks.entry(extent.dek_version).or_default() += extent.tags.len() as u64;
        })?;
        self.scan_preserved(None, 0, u64::MAX, &mut |_, extent| {
            *blocks.entry(extent.dek_version).or_default() += extent.tags.len() as u64;
        })?;
        Ok(blocks)
    }

    /// Ends background passes on this instance (the store is letting go of
    /// it so that it can be deleted).
    pub(crate) fn release_background(&self) {
        self.rekey.released.store(true, Ordering::Release);
    }

    /// Whether [`release_background`](Self::release_background) was called.
    pub(crate) fn background_released(&self) -> bool {
        self.rekey.released.load(Ordering::Acquire)
    }

    /// One re-encryption pass: steps of at most `step_bytes` (at least one
    /// block), `pace` called after each step with the bytes it sealed (it may
    /// sleep; `false` ends the pass, every step being whole on its own), then
    /// the old DEKs are destroyed if nothing needs them any more.
    ///
    /// The pass is a `reencryption` span (INFO): `tenant`, `volume`, and when
    /// it ends the blocks re-encrypted and left unreadable, whether the job
    /// finished, or the `error`. Key versions, never keys.
    pub(crate) fn reencrypt(
        &self,
        step_bytes: u64,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<ReencryptionReport, VolumeError> {
        let span = tracing::info_span!(
            "reencryption",
            tenant = %self.tenant,
            volume = %self.name,
            blocks_reencrypted = tracing::field::Empty,
            blocks_unreadable = tracing::field::Empty,
            finished = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let _entered = span.enter();
        let result = self.reencrypt_pass(step_bytes, pace);
        match &result {
            Ok(report) => {
                span.record("blocks_reencrypted", report.blocks_reencrypted);
                span.record("blocks_unreadable", report.blocks_unreadable);
                span.record("finished", report.finished);
            }
            Err(e) => crate::error::record_failure(&span, e),
        }
        result
    }

    fn reencrypt_pass(
        &self,
        step_bytes: u64,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<ReencryptionReport, VolumeError> {
        let mut report = ReencryptionReport::default();
        if self.rekey.lock_job().is_none() {
            report.finished = true;
            return Ok(report);
        }
        self.check_poisoned()?;
        self.rekey.running.fetch_add(1, Ordering::AcqRel);
        struct Running<'a>(&'a AtomicU64);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _running = Running(&self.rekey.running);
        // Every old-DEK mapping a write made before the switch is committed
        // from here on.
        self.write_barrier();
        self.flush()?;

        let bs = self.block_size.len() as u64;
        let step_blocks = (step_bytes / bs).clamp(1, u64::from(u32::MAX)) as usize;
        let mut cursor = match *self.rekey.lock_job() {
            Some(job) => job.cursor,
            None => 0,
        };
        let mut from_zero = cursor == 0;
        let mut found = 0u64;
        let mut sweeps = 1u32;
        loop {
            let step = self.reencrypt_step(cursor, step_blocks)?;
            report.blocks_reencrypted += step.moved;
            report.blocks_unreadable += step.unreadable;
            // Blocks that will not be switched on a second look are not work
            // left: unreadable ones stay so.
            found += step.collected - step.unreadable;
            cursor = step.next;
            if step.collected > 0 && !pace(step.sealed_bytes) {
                return Ok(report);
            }
            if !step.at_end {
                continue;
            }
            if from_zero && found == 0 {
                break;
            }
            if sweeps == MAX_SWEEPS {
                return Ok(report);
            }
            sweeps += 1;
            cursor = 0;
            from_zero = true;
            found = 0;
            report.blocks_unreadable = 0;
            if let Some(job) = self.rekey.lock_job().as_mut() {
                job.cursor = 0;
            }
        }
        // Then the blocks snapshots hold, snapshot by snapshot.
        loop {
            let step = self.reencrypt_preserved_step(step_blocks)?;
            report.blocks_reencrypted += step.moved;
            report.blocks_unreadable += step.unreadable;
            if step.collected == 0 || step.moved == 0 {
                break;
            }
            if !pace(step.sealed_bytes) {
                return Ok(report);
            }
        }
        if report.blocks_unreadable > 0 {
            self.rekey.stalled.store(true, Ordering::Release);
            return Ok(report);
        }
        if let Some(destroyed) = self.destroy_old_keys()? {
            report.destroyed = destroyed.into_iter().map(KeyVersion).collect();
            report.finished = true;
        }
        // The old copies are dead space now.
        if let Some(wake) = &self.wake {
            wake.notify();
        }
        Ok(report)
    }

    /// One step from block `cursor`: at most `max` blocks re-encrypted.
    fn reencrypt_step(&self, cursor: u64, max: usize) -> Result<Step, VolumeError> {
        let _one = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let target = self.active_dek.load(Ordering::Acquire);
        let (blocks, next, at_end) = self.old_blocks_from(cursor, max, target)?;
        let mut step = Step {
            collected: blocks.len() as u64,
            moved: 0,
            unreadable: 0,
            sealed_bytes: 0,
            next,
            at_end,
        };
        if blocks.is_empty() {
            if let Some(job) = self.rekey.lock_job().as_mut() {
                job.cursor = next;
            }
            return Ok(step);
        }
        let moves = self.reseal(&blocks, &mut step)?;
        step.moved = self.commit_reencrypted(&moves, next)?;
        self.rekey
            .reencrypted
            .fetch_add(step.moved, Ordering::Relaxed);
        Ok(step)
    }

    /// One step over the blocks snapshots hold: at most `max` blocks of the
    /// oldest snapshot that still holds blocks under an old DEK.
    fn reencrypt_preserved_step(&self, max: usize) -> Result<Step, VolumeError> {
        let _one = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let target = self.active_dek.load(Ordering::Acquire);
        let mut epoch = None;
        let mut blocks: Vec<(u64, Location)> = Vec::new();
        self.scan_preserved(None, 0, u64::MAX, &mut |e, extent| {
            if extent.dek_version == target || epoch.is_some_and(|x| x != e) {
                return;
            }
            epoch = Some(e);
            let view = super::index::ExtentView::from(&extent);
            for k in 0..extent.tags.len() {
                if blocks.len() < max {
                    blocks.push((extent.lba + k as u64, view.location(k)));
                }
            }
        })?;
        let mut step = Step {
            collected: blocks.len() as u64,
            moved: 0,
            unreadable: 0,
            sealed_bytes: 0,
            next: 0,
            at_end: true,
        };
        let Some(epoch) = epoch else {
            return Ok(step);
        };
        let moves = self.reseal(&blocks, &mut step)?;
        step.moved = self.commit_preserved(epoch, &moves)?;
        self.rekey
            .reencrypted
            .fetch_add(step.moved, Ordering::Relaxed);
        Ok(step)
    }

    /// Switches, in one atomic commit, the preserved records of snapshot
    /// `epoch` whose blocks `moves` sealed again, where they are still the
    /// ones read. Returns how many switched.
    fn commit_preserved(&self, epoch: u32, moves: &[Moved]) -> Result<u64, VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let by_lba: HashMap<u64, &Moved> = moves.iter().map(|m| (m.lba, m)).collect();
        let mut old: BTreeMap<u64, Extent> = BTreeMap::new();
        for m in moves {
            if old
                .range(..=m.lba)
                .next_back()
                .is_some_and(|(_, e)| e.last() >= m.lba)
            {
                continue;
            }
            self.scan_preserved(Some(epoch), m.lba, m.lba + 1, &mut |_, extent| {
                old.insert(extent.lba, extent);
            })?;
        }
        let mut commit = MappingCommit::default();
        let mut moved = 0u64;
        for extent in old.values() {
            let mut locations = Vec::with_capacity(extent.tags.len());
            let mut changed = false;
            for k in 0..extent.tags.len() {
                let now = super::index::ExtentView::from(extent).location(k);
                match by_lba.get(&(extent.lba + k as u64)) {
                    Some(m) if m.from == now => {
                        locations.push(m.to);
                        for (map, d) in [(&mut commit.deltas, 1), (&mut commit.pinned, 1)] {
                            *map.entry(now.segment).or_default() -= d;
                            *map.entry(m.to.segment).or_default() += d;
                        }
                        moved += 1;
                        changed = true;
                    }
                    _ => locations.push(now),
                }
            }
            if !changed {
                continue;
            }
            commit
                .batch
                .delete(record::preserved_key(self.internal_id, epoch, extent.last()).to_vec());
            for piece in pieces(extent.lba, extent.birth, &locations) {
                commit.batch.put(
                    record::preserved_key(self.internal_id, epoch, piece.last()).to_vec(),
                    piece.encode(),
                );
            }
        }
        let writers = std::mem::take(&mut *self.lock_pending_writers());
        for (number, record) in &writers {
            commit.batch.put(
                record::writer_key(self.internal_id, *number).to_vec(),
                record.encode(),
            );
        }
        self.put_dek_usage(&mut commit.batch);
        if let Err(e) = self.commit_mappings(&mut state, commit, CommitKind::Compaction) {
            self.lock_pending_writers().extend(writers);
            return Err(e);
        }
        Ok(moved)
    }

    /// Reads `blocks`, opens each with its own key and seals the ones that
    /// open again under the current writer at the head, synced. Blocks that
    /// fail authentication are counted in `step` and left alone.
    fn reseal(
        &self,
        blocks: &[(u64, Location)],
        step: &mut Step,
    ) -> Result<Vec<Moved>, VolumeError> {
        let bs = self.block_size.len();
        // Ciphertext in, plaintext for a moment, ciphertext out: wiped after.
        let mut data = Zeroizing::new(vec![0u8; blocks.len() * bs]);
        let mut n = 0;
        while n < blocks.len() {
            let first = blocks[n].1;
            let mut run = 1;
            while n + run < blocks.len()
                && blocks[n + run].1.segment == first.segment
                && blocks[n + run].1.offset == first.offset + run as u32
            {
                run += 1;
            }
            self.segments
                .read_at(
                    self.segment_id(first.segment),
                    u64::from(first.offset) * bs as u64,
                    &mut data[n * bs..(n + run) * bs],
                )
                .map_err(VolumeError::Io)?;
            n += run;
        }
        // Open each block with its own key; keep the ones that open, packed.
        let mut kept: Vec<(u64, Location)> = Vec::with_capacity(blocks.len());
        let mut packed = 0usize;
        for (k, &(lba, loc)) in blocks.iter().enumerate() {
            let block = k * bs..(k + 1) * bs;
            match self.open_block(Lba(lba), &loc, &mut data[block.clone()]) {
                Ok(()) => {
                    if packed != k {
                        data.copy_within(block, packed * bs);
                    }
                    packed += 1;
                    kept.push((lba, loc));
                }
                Err(VolumeError::Authentication { .. }) => step.unreadable += 1,
                Err(e) => return Err(e),
            }
        }
        // Seal under the current writer into fresh space at the head.
        let mut moves: Vec<Moved> = Vec::with_capacity(kept.len());
        let mut written = std::collections::BTreeSet::new();
        let mut done = 0usize;
        while done < kept.len() {
            let space = self.allocate(kept.len() - done)?;
            let bytes = &mut data[done * bs..(done + space.run) * bs];
            for k in 0..space.run {
                let (lba, from) = kept[done + k];
                let nonce = space.nonce + k as u64;
                let tag = space.cipher.seal_in_place(
                    Lba(lba),
                    &nonce_for(nonce),
                    &mut bytes[k * bs..(k + 1) * bs],
                );
                moves.push(Moved {
                    lba,
                    from,
                    to: Location {
                        segment: space.segment,
                        offset: space.offset + k as u32,
                        dek_version: space.dek_version,
                        writer: space.writer,
                        nonce,
                        tag: tag.0,
                    },
                });
            }
            if let Err(e) = self.segments.write_at(
                self.segment_id(space.segment),
                u64::from(space.offset) * bs as u64,
                bytes,
            ) {
                return Err(self.write_failed(e));
            }
            written.insert(space.segment);
            done += space.run;
        }
        step.sealed_bytes = (kept.len() * bs) as u64;
        // The copies are durable before any mapping points at them.
        for segment in written {
            if let Err(e) = self.segments.sync(self.segment_id(segment)) {
                self.poison();
                return Err(VolumeError::Io(e));
            }
        }
        Ok(moves)
    }

    /// Up to `max` committed blocks from `from` on whose DEK is not `target`,
    /// in LBA order; the LBA to go on from; whether the walk reached the end.
    #[allow(clippy::type_complexity)]
    fn old_blocks_from(
        &self,
        from: u64,
        max: usize,
        target: u32,
    ) -> Result<(Vec<(u64, Location)>, u64, bool), VolumeError> {
        let end = self.size() / self.block_size.len() as u64;
        let mut out: Vec<(u64, Location)> = Vec::new();
        let mut pos = from;
        while pos < end {
            let to = pos.saturating_add(WINDOW_BLOCKS).min(end);
            let mut full_at: Option<u64> = None;
            self.visit_extents(pos, to, &mut |extent| {
                if full_at.is_some() || extent.dek_version == target {
                    return;
                }
                for k in 0..extent.tags.len() {
                    let lba = extent.lba + k as u64;
                    if lba < pos || lba >= to {
                        continue;
                    }
                    if out.len() == max {
                        full_at = Some(lba);
                        return;
                    }
                    out.push((lba, extent.location(k)));
                }
            })?;
            if let Some(lba) = full_at {
                return Ok((out, lba, false));
            }
            pos = to;
        }
        Ok((out, end, true))
    }

    /// Switches, in one atomic commit with the job's progress, the committed
    /// mapping of every block of `moves` (ascending LBAs) that still is the
    /// one read. Returns how many switched.
    fn commit_reencrypted(&self, moves: &[Moved], next: u64) -> Result<u64, VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let by_lba: HashMap<u64, &Moved> = moves.iter().map(|m| (m.lba, m)).collect();
        let old = self.committed_extents_at(moves.iter().map(|m| m.lba))?;
        let mut commit = MappingCommit::default();
        let mut moved = 0u64;
        for extent in old.values() {
            let mut locations = Vec::with_capacity(extent.tags.len());
            let mut changed = false;
            for k in 0..extent.tags.len() {
                let now = super::index::ExtentView::from(extent).location(k);
                match by_lba.get(&(extent.lba + k as u64)) {
                    Some(m) if m.from == now => {
                        locations.push(m.to);
                        *commit.deltas.entry(now.segment).or_default() -= 1;
                        *commit.deltas.entry(m.to.segment).or_default() += 1;
                        moved += 1;
                        changed = true;
                    }
                    _ => locations.push(now),
                }
            }
            if !changed {
                continue;
            }
            // The old extent goes first: a piece ending at the same block,
            // added later, replaces it.
            commit.change.removed.push(extent.last());
            commit
                .change
                .added
                .extend(pieces(extent.lba, extent.birth, &locations));
        }
        // Writers made since the last commit (the one that sealed these
        // blocks among them) go in with the extents naming them.
        let writers = std::mem::take(&mut *self.lock_pending_writers());
        for (number, record) in &writers {
            commit.batch.put(
                record::writer_key(self.internal_id, *number).to_vec(),
                record.encode(),
            );
        }
        let job = self.rekey.lock_job().map(|job| JobRecord {
            target: job.target,
            cursor: next,
            done: job.done + moved,
        });
        if let Some(job) = job {
            commit
                .batch
                .put(record::job_key(self.internal_id).to_vec(), job.encode());
        }
        self.put_dek_usage(&mut commit.batch);
        if let Err(e) = self.commit_mappings(&mut state, commit, CommitKind::Compaction) {
            self.lock_pending_writers().extend(writers);
            return Err(e);
        }
        if let Some(job) = job {
            let mut current = self.rekey.lock_job();
            // A rotation meanwhile replaced the job: keep its target and cursor.
            match current.as_mut() {
                Some(c) if c.target == job.target => *c = job,
                Some(c) => c.done += moved,
                None => {}
            }
        }
        Ok(moved)
    }

    /// Destroys every DEK but the active one if no mapping, overlay entry or
    /// writer needs it any more, and ends the job. Returns the versions
    /// destroyed, or `None` when some are still needed.
    fn destroy_old_keys(&self) -> Result<Option<Vec<u32>>, VolumeError> {
        let _admin = self.rekey.lock_admin();
        // No step of another pass is between reading an old block and
        // switching it.
        let _one = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        // No rotation can happen while the admin lock is held.
        let active = self.active_dek.load(Ordering::Acquire);
        let old: Vec<u32> = self
            .deks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .filter(|&v| v != active)
            .collect();
        // Writes that reserved space under an old writer before the switch
        // have installed their mappings after this.
        self.write_barrier();
        let state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let in_overlay = self
            .lock_overlay()
            .map
            .values()
            .any(|(slot, _)| matches!(slot, Slot::Mapped(loc) if loc.dek_version != active));
        if in_overlay {
            return Ok(None);
        }
        let mut in_use = 0u64;
        self.visit_extents(0, u64::MAX, &mut |extent| {
            if extent.dek_version != active {
                in_use += extent.tags.len() as u64;
            }
        })?;
        // Blocks snapshots hold need their keys as much.
        self.scan_preserved(None, 0, u64::MAX, &mut |_, extent| {
            if extent.dek_version != active {
                in_use += extent.tags.len() as u64;
            }
        })?;
        if in_use > 0 {
            return Ok(None);
        }
        let Some(mut record) = self.volume_record()? else {
            return Ok(None);
        };
        if record.active_dek != active {
            return Ok(None);
        }
        let gone: Vec<u32> = record
            .keys
            .iter()
            .map(|&(v, _)| v)
            .chain(old.iter().copied())
            .filter(|&v| v != active)
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect();
        record.keys.retain(|&(v, _)| v == active);
        record.updated = crate::store::now();
        let mut batch = Batch::new();
        batch.put(
            record::volume_key(&self.tenant, &self.name),
            record.encode(),
        );
        let mut doomed_writers = Vec::new();
        let mut bad = None;
        self.meta.scan_prefix(
            &record::writer_prefix(self.internal_id),
            &mut |key, value| {
                match WriterRecord::decode(value) {
                    Ok(w) if w.dek_version != active => doomed_writers.push(key.to_vec()),
                    Ok(_) => {}
                    Err(e) => {
                        bad = Some(e);
                        return false;
                    }
                }
                true
            },
        )?;
        if let Some(e) = bad {
            return Err(corrupt(e));
        }
        for key in doomed_writers {
            batch.delete(key);
        }
        for &v in &gone {
            batch.delete(record::dek_usage_key(self.internal_id, v).to_vec());
        }
        batch.delete(record::job_key(self.internal_id).to_vec());
        if let Err(e) = self.meta.commit(&batch) {
            self.poison();
            return Err(e.into());
        }
        self.lock_pending_writers()
            .retain(|(_, w)| w.dek_version == active);
        *self.rekey.lock_job() = None;
        drop(state);
        {
            // Reads in flight may hold a location under an old key from before
            // the last switch: wait for them; later ones find the new mappings.
            let _no_reads = self
                .segment_reads
                .write()
                .unwrap_or_else(|e| e.into_inner());
            self.writers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, w| w.record.dek_version == active);
            self.deks
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|&v, _| v == active);
        }
        if !gone.is_empty() {
            tracing::info!(
                tenant = %self.tenant,
                volume = %self.name,
                destroyed = ?gone,
                active_dek_version = active,
                "re-encryption finished: old data keys destroyed"
            );
        }
        Ok(Some(gone))
    }
}

/// What one step did.
struct Step {
    /// Blocks found under an older DEK.
    collected: u64,
    /// Blocks whose mapping switched to their new copy.
    moved: u64,
    /// Blocks that failed authentication (left as they are).
    unreadable: u64,
    /// Bytes sealed and written at the head.
    sealed_bytes: u64,
    /// The LBA the next step starts from.
    next: u64,
    /// Whether the walk reached the end of the volume.
    at_end: bool,
}

/// One block sealed again: where its committed mapping was, and its new copy.
struct Moved {
    lba: u64,
    from: Location,
    to: Location,
}

/// Extents for consecutive blocks from `first` at `locations`: a new extent
/// starts wherever a block does not follow the previous one in segment space,
/// nonce counter, writer and DEK, and after [`MAX_EXTENT_BLOCKS`].
fn pieces(first: u64, birth: u32, locations: &[Location]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (k, loc) in locations.iter().enumerate() {
        let lba = first + k as u64;
        if let Some(e) = out.last_mut() {
            let n = e.tags.len();
            if e.lba + n as u64 == lba
                && e.segment == loc.segment
                && u64::from(e.offset) + n as u64 == u64::from(loc.offset)
                && e.dek_version == loc.dek_version
                && e.writer == loc.writer
                && e.nonce + n as u64 == loc.nonce
                && n < MAX_EXTENT_BLOCKS
            {
                e.tags.push(loc.tag);
                continue;
            }
        }
        out.push(Extent {
            lba,
            segment: loc.segment,
            offset: loc.offset,
            dek_version: loc.dek_version,
            writer: loc.writer,
            nonce: loc.nonce,
            birth,
            tags: vec![loc.tag],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u32, offset: u32, writer: u32, nonce: u64) -> Location {
        Location {
            segment,
            offset,
            dek_version: 1,
            writer,
            nonce,
            tag: [offset as u8; 16],
        }
    }

    /// The background pass moves at most one paced step per pacer tick (never
    /// more than a second's worth of the rate), and the pacer, fed those
    /// ticks on a simulated clock, keeps the bytes moved within the rate.
    #[test]
    fn each_pacer_tick_moves_at_most_one_step() {
        use blockseal_keys::{MasterKey, TenantId, VolumeId};

        use crate::compactor::Pacer;
        use crate::rekeyer::step_bytes;
        use crate::{Store, StoreOptions, VolumeOptions};

        const SIZE: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::new()
            .background_compaction(false)
            .background_reencryption(false);
        let store = Store::create(dir.path(), MasterKey::generate().unwrap(), options).unwrap();
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        store.create_tenant(&tenant).unwrap();
        store
            .create_volume(&tenant, &name, SIZE, VolumeOptions::default())
            .unwrap();
        let volume = store.open_volume(&tenant, &name).unwrap();
        volume.write_at(0, &vec![7u8; SIZE as usize]).unwrap();
        volume.flush().unwrap();
        store.rotate_data_key(&tenant, &name).unwrap();

        let rate = 256 << 10;
        let step = step_bytes(rate);
        let mut ticks = Vec::new();
        let report = volume
            .inner
            .reencrypt(step, &mut |bytes| {
                ticks.push(bytes);
                true
            })
            .unwrap();
        assert!(report.finished);
        assert_eq!(ticks.len() as u64, SIZE / step);
        assert!(ticks.iter().all(|&bytes| bytes <= step), "{ticks:?}");
        assert_eq!(ticks.iter().sum::<u64>(), SIZE);

        let wake = Wakeup::default();
        let mut pacer = Pacer::new(rate, &wake);
        let start = pacer.started();
        let (mut now, mut moved) = (start, 0u64);
        for &bytes in &ticks {
            moved += bytes;
            now += pacer.delay_at(bytes, false, now).unwrap();
            let allowed = rate as f64 * now.duration_since(start).as_secs_f64();
            assert!(moved as f64 <= allowed + step as f64 + 1.0);
        }
        // The data reads back as written, under the new key.
        let mut buf = vec![0u8; SIZE as usize];
        volume.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn pieces_split_where_blocks_stop_following_each_other() {
        let locations = [
            loc(1, 10, 1, 5),
            loc(1, 11, 1, 6),
            // Another writer.
            loc(1, 12, 2, 7),
            // A gap in the segment.
            loc(1, 14, 2, 8),
            loc(1, 15, 2, 9),
        ];
        let got = pieces(100, 0, &locations);
        let shape: Vec<(u64, u32, usize)> = got
            .iter()
            .map(|e| (e.lba, e.offset, e.tags.len()))
            .collect();
        assert_eq!(shape, [(100, 10, 2), (102, 12, 1), (103, 14, 2)]);
        let long: Vec<Location> = (0..MAX_EXTENT_BLOCKS as u32 + 3)
            .map(|k| loc(0, k, 1, u64::from(k)))
            .collect();
        let got = pieces(0, 0, &long);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].lba, MAX_EXTENT_BLOCKS as u64);
    }
}
