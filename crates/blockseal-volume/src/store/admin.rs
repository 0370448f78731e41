//! Store administration while the store serves other volumes: deleting and
//! resizing volumes, deleting and crypto-shredding tenants, rotating the master
//! key and tenant keys, and space usage.
//!
//! Every operation takes the store's `admin` mutex for its read-check-write of
//! records, and the registry claim of each volume it changes (see
//! [`Store::claim`]), so no instance of a volume opens half-way through.
//!
//! Crash safety of deletion: the volume record goes in the same atomic commit
//! as a tombstone (`D` + internal id) is put; then the volume's segments are
//! deleted; then its mapping records (`m`, `s`, `w`, retired `n`) in batches,
//! the tombstone with the last. A crash anywhere leaves a tombstone that
//! [`Store::open`] finishes before serving anything, or nothing at all.
//!
//! Key rotations rewrap wrapped keys in one commit together with what names the
//! new key (the header for the master key, the tenant record for a tenant key),
//! so a store always opens with exactly one generation of keys. Open volumes
//! hold their data keys unwrapped and are not touched. Nothing here logs or
//! returns key material.

use std::collections::BTreeSet;

use blockseal_keys::{DataKey, KeyId, KeyVersion, MasterKey, TenantId, TenantSeed, VolumeId};
use blockseal_keys::{TenantKek, WrappedKey};

use super::{
    Claim, MAX_VOLUME_BYTES, Store, TenantInfo, VolumeInfo, now, seed_copy, tenant_info,
    volume_info,
};
use crate::error::{AdminError, OpenError};
use crate::mapping;
use crate::meta::{Batch, MetaStore};
use crate::record::{
    self, AuditKeyRecord, HeaderRecord, TenantRecord, TombstoneRecord, VolumeRecord,
};
use crate::segment::{SegmentId, SegmentStore};

/// Keys deleted per commit when a deleted volume's mapping records go: a large
/// volume has millions, and one batch of them all would hold them all in memory.
const DELETE_BATCH: usize = 10_000;

/// What [`Store::shred_tenant`] destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShredReport {
    /// Volumes of the tenant removed.
    pub volumes: usize,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Bytes those segments held (as far as the segment store can tell).
    pub bytes_freed: u64,
}

/// What [`Store::rotate_master`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MasterRotation {
    /// The master key the store recognised before.
    pub old_key: KeyId,
    /// The master key it recognises now.
    pub new_key: KeyId,
    /// Tenants whose keys were rewrapped.
    pub tenants: usize,
    /// Volumes whose data keys were rewrapped.
    pub volumes: usize,
    /// Wrapped keys rewritten: every data key of every volume, and the audit
    /// key when the store has one.
    pub wrapped_keys: usize,
}

/// Space a volume uses, from its committed metadata and the segment store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct VolumeUsage {
    /// Blocks with a committed mapping (writes of an open volume count once
    /// flushed).
    pub mapped_blocks: u64,
    /// Segments the volume holds.
    pub segments: u64,
    /// Bytes those segments hold (live and dead blocks; 0 for segments whose
    /// size the segment store cannot tell).
    pub segment_bytes: u64,
}

impl Store {
    /// Whether an instance of the volume is open (a handle to it exists).
    pub fn is_open(&self, tenant: &TenantId, volume: &VolumeId) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&(tenant.clone(), volume.clone()))
            .is_some_and(|weak| weak.strong_count() > 0)
    }

    /// The tenant's volumes that are open now, in name order: what an admin
    /// layer closes before deleting or shredding.
    pub fn tenant_volumes_open(&self, tenant: &TenantId) -> Vec<VolumeId> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let names: BTreeSet<VolumeId> = open
            .iter()
            .filter(|((t, _), weak)| t == tenant && weak.strong_count() > 0)
            .map(|((_, v), _)| v.clone())
            .collect();
        names.into_iter().collect()
    }

    /// Deletes a volume: its record, its segments and its mapping records.
    ///
    /// Refused with [`AdminError::VolumeInUse`] while an instance of it is open
    /// (close it and retry); waits for an instance that is closing. Crash safe:
    /// once the volume record is gone, a tombstone finishes the removal, here
    /// or at the next [`Store::open`]. An error after the record went (segment
    /// I/O) leaves that tombstone; the volume is gone either way.
    pub fn delete_volume(&self, tenant: &TenantId, volume: &VolumeId) -> Result<(), AdminError> {
        // A volume the store keeps open for its re-encryption job is not in use.
        self.release_held(tenant, volume);
        let admin = self.lock_admin();
        let record = self.admin_volume_record(tenant, volume)?;
        let claim = match self.claim(tenant, volume) {
            Claim::Open(_) => {
                return Err(AdminError::VolumeInUse {
                    tenant: tenant.clone(),
                    volume: volume.clone(),
                });
            }
            Claim::Closed(claim) => claim,
        };
        let mut batch = Batch::new();
        batch.delete(record::volume_key(tenant, volume));
        put_tombstone(&mut batch, record.internal_id);
        self.meta.commit(&batch)?;
        // The record is gone: nobody can open the volume or reach its data.
        drop(claim);
        drop(admin);
        let (segments, bytes) = remove_volume_data(
            self.meta.as_ref(),
            self.segments.as_ref(),
            record.internal_id,
        )?;
        tracing::info!(tenant = %tenant, volume = %volume, segments, bytes, "volume deleted");
        Ok(())
    }

    /// Changes a volume's size, open or not.
    ///
    /// Growing always works (up to [`MAX_VOLUME_BYTES`]); the new blocks read
    /// as zeros. Shrinking is refused with [`AdminError::MappedPastEnd`] while
    /// any block at or past the new end holds data (committed, or written to
    /// the open instance and not yet flushed), unless `discard_tail`: then the
    /// tail is trimmed durably first, and the size shrinks after. An open
    /// instance sees the new size at once ([`Volume::len`](crate::Volume::len));
    /// an NBD client learns it only when it reconnects.
    pub fn resize_volume(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        new_size: u64,
        discard_tail: bool,
    ) -> Result<VolumeInfo, AdminError> {
        if new_size > MAX_VOLUME_BYTES {
            return Err(AdminError::TooLarge {
                size: new_size,
                max: MAX_VOLUME_BYTES,
            });
        }
        let _admin = self.lock_admin();
        let mut record = self.admin_volume_record(tenant, volume)?;
        let block_size = record.block_size;
        if new_size == 0 || !new_size.is_multiple_of(u64::from(block_size)) {
            return Err(AdminError::InvalidSize {
                size: new_size,
                block_size,
            });
        }
        let old_size = record.size;
        let mapped_past_end = |first_mapped_byte| AdminError::MappedPastEnd {
            tenant: tenant.clone(),
            volume: volume.clone(),
            new_size,
            first_mapped_byte,
        };
        record.size = new_size;
        record.updated = now();
        let instance = match self.claim(tenant, volume) {
            Claim::Open(instance) => Some(instance),
            Claim::Closed(claim) => {
                let first = if new_size < old_size {
                    first_mapped_block(
                        self.meta.as_ref(),
                        record.internal_id,
                        new_size / u64::from(block_size),
                    )?
                } else {
                    None
                };
                match first {
                    None => {
                        // Nothing to trim; no instance can open meanwhile.
                        self.put_volume_record(tenant, volume, &record)?;
                        None
                    }
                    Some(_) if discard_tail => Some(
                        self.open_claimed(tenant, volume, claim)
                            .map_err(AdminError::Volume)?,
                    ),
                    Some(lba) => return Err(mapped_past_end(lba * u64::from(block_size))),
                }
            }
        };
        if let Some(instance) = instance {
            let inner = instance.inner();
            if new_size < old_size {
                if let Err(first) = inner
                    .shrink(new_size, discard_tail)
                    .map_err(AdminError::Volume)?
                {
                    return Err(mapped_past_end(first));
                }
                if let Err(e) = self.put_volume_record(tenant, volume, &record) {
                    inner.undo_shrink(old_size);
                    return Err(e);
                }
            } else {
                self.put_volume_record(tenant, volume, &record)?;
                inner.grow(new_size);
            }
        }
        tracing::info!(tenant = %tenant, volume = %volume, old_size, new_size, discard_tail, "volume resized");
        volume_info(tenant.clone(), volume.clone(), &record)
            .map_err(|what| AdminError::Corrupt { what })
    }

    /// Deletes a tenant that has no volumes (its record, seed included).
    /// Refused with [`AdminError::TenantHasVolumes`] otherwise.
    pub fn delete_tenant(&self, tenant: &TenantId) -> Result<(), AdminError> {
        let _admin = self.lock_admin();
        self.require_tenant(tenant)?;
        let mut volumes = 0usize;
        self.meta
            .scan_prefix(&record::volume_prefix(tenant), &mut |_, _| {
                volumes += 1;
                true
            })?;
        if volumes > 0 {
            return Err(AdminError::TenantHasVolumes {
                tenant: tenant.clone(),
                volumes,
            });
        }
        let mut batch = Batch::new();
        batch.delete(record::tenant_key(tenant));
        self.meta.commit(&batch)?;
        tracing::info!(tenant = %tenant, "tenant deleted");
        Ok(())
    }

    /// Crypto-shreds a tenant: in one commit its record (with the seed its KEK
    /// derivation needs, so none of its wrapped data keys can ever be unwrapped
    /// again from this store's metadata, even with the master key) and every
    /// volume record go, each volume leaving a tombstone; then the volumes'
    /// segments and mapping records are removed as [`Store::delete_volume`]
    /// does.
    ///
    /// Refused with [`AdminError::VolumeInUse`] (changing nothing) while any of
    /// its volumes is open. What this cannot reach: a copy of the metadata
    /// taken before (a backup) still holds the seed and wrapped keys, and with
    /// the master key and a copy of the segments still decrypts; destroy such
    /// copies, or rotate the master key and destroy the old one.
    pub fn shred_tenant(&self, tenant: &TenantId) -> Result<ShredReport, AdminError> {
        for held in self.tenant_volumes_open(tenant) {
            self.release_held(tenant, &held);
        }
        let admin = self.lock_admin();
        self.require_tenant(tenant)?;
        let volumes = self.volume_records(tenant)?;
        let mut claims = Vec::with_capacity(volumes.len());
        for (name, _, _) in &volumes {
            match self.claim(tenant, name) {
                Claim::Open(_) => {
                    return Err(AdminError::VolumeInUse {
                        tenant: tenant.clone(),
                        volume: name.clone(),
                    });
                }
                Claim::Closed(claim) => claims.push(claim),
            }
        }
        let mut batch = Batch::new();
        batch.delete(record::tenant_key(tenant));
        // The tenant's backup keys go with its seed: every backup file of
        // the tenant becomes unreadable, even with the master key.
        let backups = self.backup_keys(Some(tenant))?;
        for b in &backups {
            batch.delete(record::backup_key_key(tenant, b.id.as_bytes()));
        }
        for (_, key, volume) in &volumes {
            batch.delete(key.clone());
            put_tombstone(&mut batch, volume.internal_id);
        }
        self.meta.commit(&batch)?;
        drop(claims);
        drop(admin);
        let mut report = ShredReport {
            volumes: volumes.len(),
            segments_deleted: 0,
            bytes_freed: 0,
        };
        for (_, _, volume) in &volumes {
            let (segments, bytes) = remove_volume_data(
                self.meta.as_ref(),
                self.segments.as_ref(),
                volume.internal_id,
            )?;
            report.segments_deleted += segments;
            report.bytes_freed += bytes;
        }
        tracing::info!(
            tenant = %tenant,
            volumes = report.volumes,
            segments_deleted = report.segments_deleted,
            bytes_freed = report.bytes_freed,
            "tenant shredded"
        );
        Ok(report)
    }

    /// Moves the store to a new master key: every data key of every volume is
    /// rewrapped under the KEK `new` derives (same tenant seed, same KEK
    /// version), the audit key is rewrapped, and the header names `new`, all in
    /// one commit; then the store uses `new`. Afterwards the store opens with
    /// `new` only. Open volumes go on untouched (their data keys are already
    /// unwrapped); no data is rewritten.
    ///
    /// Refused with [`AdminError::SameMasterKey`] when `new` has the current
    /// key's id. A key that fails to unwrap fails the whole rotation, changing
    /// nothing.
    pub fn rotate_master(&self, new: MasterKey) -> Result<MasterRotation, AdminError> {
        let _admin = self.lock_admin();
        let _audit = self.lock_audit();
        let mut master = self.master.write().unwrap_or_else(|e| e.into_inner());
        let old_key = master.id();
        if new.id() == old_key {
            return Err(AdminError::SameMasterKey { key: old_key });
        }
        let header = self
            .meta
            .get(record::HEADER_KEY)?
            .ok_or_else(|| AdminError::Corrupt {
                what: "the metadata holds no store header".into(),
            })?;
        let mut header = HeaderRecord::decode(&header).map_err(corrupt)?;
        header.master_key_id = *new.id().as_bytes();
        header.check_value = *new.check_value().as_bytes();
        let mut batch = Batch::new();
        batch.put(record::HEADER_KEY, header.encode());
        let mut rotation = MasterRotation {
            old_key,
            new_key: new.id(),
            tenants: 0,
            volumes: 0,
            wrapped_keys: 0,
        };
        for (tenant, tenant_record) in self.tenant_records()? {
            let old_kek = self.kek(&master, &tenant, &tenant_record);
            let new_kek = self.kek(&new, &tenant, &tenant_record);
            for (name, key, mut volume) in self.volume_records(&tenant)? {
                rotation.wrapped_keys += rewrap(&tenant, &name, &mut volume, &old_kek, &new_kek)?;
                batch.put(key, volume.encode());
                rotation.volumes += 1;
            }
            rotation.wrapped_keys +=
                self.rewrap_backup_keys(&tenant, &old_kek, &new_kek, &mut batch)?;
            rotation.tenants += 1;
        }
        if let Some(bytes) = self.meta.get(record::AUDIT_KEY_KEY)? {
            let mut audit = AuditKeyRecord::decode(&bytes).map_err(corrupt)?;
            let key = master
                .audit_kek(&self.salt)
                .unwrap(&audit.wrapped)
                .map_err(|_| AdminError::AuditKeyUnwrap)?;
            audit.wrapped = new.audit_kek(&self.salt).wrap(&key)?.to_vec();
            batch.put(record::AUDIT_KEY_KEY, audit.encode());
            rotation.wrapped_keys += 1;
        }
        self.meta.commit(&batch)?;
        // The old key is wiped when dropped here.
        *master = new;
        tracing::info!(
            old_key = %rotation.old_key,
            new_key = %rotation.new_key,
            tenants = rotation.tenants,
            volumes = rotation.volumes,
            "master key rotated"
        );
        Ok(rotation)
    }

    /// Gives a tenant a new KEK: a fresh seed and the next KEK version, with
    /// every data key of its volumes rewrapped under it, in one commit. The old
    /// KEK unwraps nothing of the tenant afterwards, and the old seed is gone
    /// from the live metadata. Open volumes go on untouched.
    pub fn rotate_tenant_key(&self, tenant: &TenantId) -> Result<TenantInfo, AdminError> {
        let _admin = self.lock_admin();
        // Exclusive: an open never reads the old tenant record with new volume
        // records (see `master`).
        let master = self.master.write().unwrap_or_else(|e| e.into_inner());
        let old = self
            .tenant_record(tenant)?
            .ok_or_else(|| AdminError::NoSuchTenant {
                tenant: tenant.clone(),
            })?;
        let version = old
            .kek_version
            .checked_add(1)
            .ok_or_else(|| AdminError::Corrupt {
                what: format!("tenant {tenant}: KEK versions are spent"),
            })?;
        let seed = TenantSeed::generate()?;
        let new = TenantRecord {
            kek_version: version,
            seed: seed_copy(seed.expose_secret()),
            state: old.state,
            created: old.created,
        };
        let old_kek = self.kek(&master, tenant, &old);
        let new_kek = master.tenant_kek(&self.salt, tenant, &seed, KeyVersion(version));
        let mut batch = Batch::new();
        let mut volumes = 0usize;
        for (name, key, mut volume) in self.volume_records(tenant)? {
            rewrap(tenant, &name, &mut volume, &old_kek, &new_kek)?;
            batch.put(key, volume.encode());
            volumes += 1;
        }
        self.rewrap_backup_keys(tenant, &old_kek, &new_kek, &mut batch)?;
        batch.put(record::tenant_key(tenant), new.encode().to_vec());
        let committed = self.meta.commit(&batch);
        // The batch holds the new seed in the clear.
        batch.wipe_values();
        committed?;
        tracing::info!(tenant = %tenant, kek_version = version, volumes, "tenant key rotated");
        Ok(tenant_info(tenant.clone(), &new))
    }

    /// The space a volume uses (open or not): committed mapped blocks from its
    /// live counts, and its segments.
    pub fn volume_usage(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<VolumeUsage, AdminError> {
        let record = self.admin_volume_record(tenant, volume)?;
        let id = record.internal_id;
        let mut usage = VolumeUsage::default();
        let mut bad = None;
        self.meta
            .scan_prefix(&record::live_prefix(id), &mut |_, value| {
                match record::decode_u64(value, "live count") {
                    Ok(count) => usage.mapped_blocks += count,
                    Err(e) => bad = Some(e),
                }
                bad.is_none()
            })?;
        if let Some(e) = bad {
            return Err(corrupt(e));
        }
        for index in self.segments.list(id).map_err(AdminError::Io)? {
            usage.segments += 1;
            usage.segment_bytes += self
                .segments
                .size(SegmentId { volume: id, index })
                .unwrap_or(0);
        }
        Ok(usage)
    }

    /// Fails with [`AdminError::NoSuchTenant`] unless the tenant exists.
    fn require_tenant(&self, tenant: &TenantId) -> Result<(), AdminError> {
        // Only its existence: the seed is not decoded, and the bytes are wiped.
        match self
            .meta
            .get(&record::tenant_key(tenant))?
            .map(zeroize::Zeroizing::new)
        {
            Some(_) => Ok(()),
            None => Err(AdminError::NoSuchTenant {
                tenant: tenant.clone(),
            }),
        }
    }

    /// A volume's record; the tenant's absence is reported first.
    pub(super) fn admin_volume_record(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<VolumeRecord, AdminError> {
        self.require_tenant(tenant)?;
        let bytes = self
            .meta
            .get(&record::volume_key(tenant, volume))?
            .ok_or_else(|| AdminError::NoSuchVolume {
                tenant: tenant.clone(),
                volume: volume.clone(),
            })?;
        VolumeRecord::decode(&bytes).map_err(corrupt)
    }

    fn put_volume_record(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        record: &VolumeRecord,
    ) -> Result<(), AdminError> {
        let mut batch = Batch::new();
        batch.put(record::volume_key(tenant, volume), record.encode());
        self.meta.commit(&batch)?;
        Ok(())
    }

    /// Every tenant with its record, in name order.
    fn tenant_records(&self) -> Result<Vec<(TenantId, TenantRecord)>, AdminError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.meta
            .scan_prefix(record::TENANT_PREFIX, &mut |key, value| {
                let id = std::str::from_utf8(&key[1..])
                    .ok()
                    .and_then(|n| TenantId::new(n).ok());
                match (id, TenantRecord::decode(value)) {
                    (Some(id), Ok(record)) => out.push((id, record)),
                    _ => bad = Some(format!("tenant record {:?}", String::from_utf8_lossy(key))),
                }
                bad.is_none()
            })?;
        match bad {
            Some(what) => Err(AdminError::Corrupt { what }),
            None => Ok(out),
        }
    }

    /// A tenant's volumes: name, record key and record, in name order.
    fn volume_records(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(VolumeId, Vec<u8>, VolumeRecord)>, AdminError> {
        let prefix = record::volume_prefix(tenant);
        let mut out = Vec::new();
        let mut bad = None;
        self.meta.scan_prefix(&prefix, &mut |key, value| {
            let id = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(|n| VolumeId::new(n).ok());
            match (id, VolumeRecord::decode(value)) {
                (Some(id), Ok(record)) => out.push((id, key.to_vec(), record)),
                _ => bad = Some(format!("volume record {:?}", String::from_utf8_lossy(key))),
            }
            bad.is_none()
        })?;
        match bad {
            Some(what) => Err(AdminError::Corrupt { what }),
            None => Ok(out),
        }
    }
}

/// Finishes the removal of every volume a tombstone names (at open, before
/// anything is served). A removal that fails is logged and left for the next
/// open: the volume's records are gone already, so nothing of it is served.
pub(super) fn finish_tombstones(
    meta: &dyn MetaStore,
    segments: &dyn SegmentStore,
) -> Result<(), OpenError> {
    let mut volumes = Vec::new();
    let mut bad = None;
    meta.scan_prefix(record::TOMBSTONE_PREFIX, &mut |key, value| {
        match record::tombstone_key_volume(key).and_then(|id| {
            TombstoneRecord::decode(value)?;
            Ok(id)
        }) {
            Ok(id) => volumes.push(id),
            Err(e) => bad = Some(e),
        }
        bad.is_none()
    })?;
    if let Some(e) = bad {
        return Err(OpenError::Corrupt { what: e.0 });
    }
    for id in volumes {
        match remove_volume_data(meta, segments, id) {
            Ok((segments, bytes)) => {
                tracing::info!(
                    volume_id = id,
                    segments,
                    bytes,
                    "finished deleting a volume"
                );
            }
            Err(AdminError::Meta(e)) => return Err(OpenError::Meta(e)),
            Err(error) => tracing::warn!(
                volume_id = id,
                error = %crate::error::error_chain(&error),
                "could not finish deleting a volume; the next open retries"
            ),
        }
    }
    Ok(())
}

/// Deletes every volume a restore marker names (a restore that did not
/// finish), at open before the tombstones are finished: the volume record
/// goes with a tombstone and the marker in one commit.
pub(super) fn abandon_restores(meta: &dyn MetaStore) -> Result<(), OpenError> {
    let mut markers = Vec::new();
    meta.scan_prefix(record::RESTORE_MARKER_PREFIX, &mut |key, _| {
        markers.push(key.to_vec());
        true
    })?;
    for marker in markers {
        let mut volume_key = marker.clone();
        volume_key[0] = b'V';
        let mut batch = Batch::new();
        batch.delete(marker.clone());
        if let Some(bytes) = meta.get(&volume_key)? {
            let record =
                VolumeRecord::decode(&bytes).map_err(|e| OpenError::Corrupt { what: e.0 })?;
            batch.delete(volume_key);
            put_tombstone(&mut batch, record.internal_id);
            tracing::warn!(
                volume = %String::from_utf8_lossy(&marker[1..]).replace('\0', "/"),
                "deleting a volume whose restore did not finish"
            );
        }
        meta.commit(&batch)?;
    }
    Ok(())
}

fn put_tombstone(batch: &mut Batch, volume: u32) {
    batch.put(
        record::tombstone_key(volume).to_vec(),
        TombstoneRecord { deleted: now() }.encode(),
    );
}

/// Deletes a tombstoned volume's segments, then its mapping records in batches,
/// then the tombstone. Returns the segments deleted and the bytes they held.
fn remove_volume_data(
    meta: &dyn MetaStore,
    segments: &dyn SegmentStore,
    volume: u32,
) -> Result<(u64, u64), AdminError> {
    let (mut count, mut bytes) = (0u64, 0u64);
    for index in segments.list(volume).map_err(AdminError::Io)? {
        let id = SegmentId { volume, index };
        bytes += segments.size(id).unwrap_or(0);
        segments.delete(id).map_err(AdminError::Io)?;
        count += 1;
    }
    segments.delete_volume(volume).map_err(AdminError::Io)?;
    let id = volume.to_be_bytes();
    // Mappings, live counts, writers, nonce windows, the re-encryption job,
    // the DEK usage counts, preserved extents, snapshots, the epoch, the
    // epochs' starts and the mapping journal.
    for kind in [
        b'J', b'M', b'm', b's', b'w', b'n', b'r', b'u', b'P', b'S', b'E', b'e',
    ] {
        let prefix = [kind, id[0], id[1], id[2], id[3]];
        loop {
            let mut batch = Batch::new();
            meta.scan_prefix(&prefix, &mut |key, _| {
                batch.delete(key.to_vec());
                batch.len() < DELETE_BATCH
            })?;
            if batch.is_empty() {
                break;
            }
            meta.commit(&batch)?;
        }
    }
    let mut batch = Batch::new();
    batch.delete(record::tombstone_key(volume).to_vec());
    meta.commit(&batch)?;
    Ok((count, bytes))
}

/// The first block at or past `from` with a committed mapping, if any.
fn first_mapped_block(
    meta: &dyn MetaStore,
    volume: u32,
    from: u64,
) -> Result<Option<u64>, AdminError> {
    let mut found = None;
    mapping::scan_extents(meta, volume, from, &mut |extent| {
        found = Some(extent.lba.max(from));
        false
    })?
    .map_err(corrupt)?;
    Ok(found)
}

/// Rewraps every data key of a volume record from `old` to `new`; returns how
/// many.
fn rewrap(
    tenant: &TenantId,
    volume: &VolumeId,
    record: &mut VolumeRecord,
    old: &TenantKek,
    new: &TenantKek,
) -> Result<usize, AdminError> {
    let failed = || AdminError::KeyUnwrap {
        tenant: tenant.clone(),
        volume: volume.clone(),
    };
    for (_, wrapped) in &mut record.keys {
        let key = WrappedKey::from_bytes(wrapped).map_err(|_| failed())?;
        let dek: DataKey = old.unwrap(volume, &key).map_err(|_| failed())?;
        *wrapped = new.wrap(volume, &dek)?.to_bytes();
    }
    Ok(record.keys.len())
}

fn corrupt(e: record::Corrupt) -> AdminError {
    AdminError::Corrupt { what: e.0 }
}
