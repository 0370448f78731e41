//! Snapshots through the store: taking, listing, deleting and rolling back
//! to them, and reading one (see `volume/snapshot.rs` for how they share the
//! volume's blocks).
//!
//! Each operation holds the store's admin lock for its read-check-write of
//! snapshot records (names are unique per volume) and works through the
//! volume's open instance, opening it when nobody has: the instance's flush
//! lock orders every snapshot change against the volume's own commits.

use blockseal_keys::{TenantId, VolumeId};

use super::Store;
use crate::error::{AdminError, VolumeError};
use crate::record::SnapshotRecord;
use crate::volume::{SnapshotInfo, Volume};

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 64;

/// Checks a snapshot name: 1 to 64 of `[a-z0-9._-]`, starting with a letter
/// or digit (the rules of tenant and volume names, so `tenant/volume@name`
/// always parses back).
pub fn check_snapshot_name(name: &str) -> Result<(), AdminError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_SNAPSHOT_NAME
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidName {
            what: "snapshot",
            name: name.to_owned(),
        })
    }
}

/// A read-only view of one snapshot, from [`Store::open_snapshot`]: reads see
/// the volume as it was when the snapshot was taken, whatever the volume
/// does meanwhile. Holds the volume open.
#[derive(Clone)]
pub struct SnapshotReader {
    volume: Volume,
    info: SnapshotInfo,
}

impl SnapshotReader {
    /// The snapshot.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// The snapshot's size in bytes (the volume's when it was taken).
    pub fn len(&self) -> u64 {
        self.info.size
    }

    /// Whether the snapshot is empty (never: volumes have a size).
    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }

    /// The volume's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.volume.block_size().get()
    }

    /// Reads `buf.len()` bytes at `offset`. A block that fails authentication
    /// fails the read with [`VolumeError::Authentication`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let size = self.info.size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(VolumeError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        self.volume
            .inner()
            .read_snapshot(self.info.epoch, offset, buf)
    }

    /// Which blocks of `offset..offset + len` hold data: runs of
    /// `(length in bytes, allocated)`, covering the range exactly.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, VolumeError> {
        let size = self.info.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        let mut out: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = u64::from(self.block_size());
        let first = offset / bs;
        let end = (offset + len - 1) / bs + 1;
        let mut push = |from: u64, to: u64, allocated: bool| {
            let a = (from * bs).max(offset);
            let b = (to * bs).min(offset + len);
            match out.last_mut() {
                Some((n, alloc)) if *alloc == allocated => *n += b - a,
                _ => out.push((b - a, allocated)),
            }
        };
        let mut pos = first;
        for extent in self
            .volume
            .inner()
            .snapshot_extents(self.info.epoch, first, end)?
        {
            if extent.lba > pos {
                push(pos, extent.lba, false);
            }
            push(extent.lba, extent.last() + 1, true);
            pos = extent.last() + 1;
        }
        if pos < end {
            push(pos, end, false);
        }
        Ok(out)
    }
}

impl Store {
    /// Takes a snapshot of a volume (open or not) named `name`: after a
    /// flush, in constant time, sharing every block with the volume.
    pub fn create_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<SnapshotInfo, AdminError> {
        check_snapshot_name(name)?;
        let _admin = self.lock_admin();
        let handle = self.snapshot_volume(tenant, volume)?;
        if handle
            .inner()
            .snapshots()
            .map_err(AdminError::Volume)?
            .iter()
            .any(|s| s.name == name)
        {
            return Err(AdminError::SnapshotExists {
                tenant: tenant.clone(),
                volume: volume.clone(),
                snapshot: name.to_owned(),
            });
        }
        let mut uid = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uid)
            .map_err(|_| blockseal_keys::RandomError)?;
        let record = SnapshotRecord {
            uid,
            created: super::now(),
            size: handle.len(),
            name: name.to_owned(),
        };
        let epoch = handle
            .inner()
            .take_snapshot(&record)
            .map_err(AdminError::Volume)?;
        tracing::info!(tenant = %tenant, volume = %volume, snapshot = name, epoch, "snapshot taken");
        Ok(SnapshotInfo {
            name: record.name,
            epoch,
            uid,
            created: record.created,
            size: record.size,
            held_bytes: 0,
        })
    }

    /// A volume's snapshots, oldest first, with the bytes each holds. Reads
    /// the metadata only (the volume is not opened), but every preserved
    /// record: see [`snapshot_list`](Self::snapshot_list) for a cheap list.
    pub fn snapshots(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<Vec<SnapshotInfo>, AdminError> {
        self.snapshot_infos(tenant, volume, true)
    }

    /// A volume's snapshots, oldest first, without the bytes each holds
    /// (`held_bytes` is 0): reads the snapshot records only, for schedulers
    /// that look at many volumes often.
    pub fn snapshot_list(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<Vec<SnapshotInfo>, AdminError> {
        self.snapshot_infos(tenant, volume, false)
    }

    fn snapshot_infos(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        count_held: bool,
    ) -> Result<Vec<SnapshotInfo>, AdminError> {
        let record = self.admin_volume_record(tenant, volume)?;
        crate::volume::snapshot_infos(
            self.meta.as_ref(),
            record.internal_id,
            u64::from(record.block_size),
            count_held,
        )
        .map_err(AdminError::Volume)
    }

    /// One snapshot by name.
    pub fn snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<SnapshotInfo, AdminError> {
        self.find_snapshot(tenant, volume, name, true)
    }

    pub(super) fn find_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
        count_held: bool,
    ) -> Result<SnapshotInfo, AdminError> {
        self.snapshot_infos(tenant, volume, count_held)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| AdminError::NoSuchSnapshot {
                tenant: tenant.clone(),
                volume: volume.clone(),
                snapshot: name.to_owned(),
            })
    }

    /// Deletes a snapshot: the blocks only it held are let go of (compaction
    /// reclaims their space).
    pub fn delete_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<SnapshotInfo, AdminError> {
        let _admin = self.lock_admin();
        let handle = self.snapshot_volume(tenant, volume)?;
        let info = find(&handle, tenant, volume, name)?;
        handle
            .inner()
            .drop_snapshot(info.epoch)
            .map_err(AdminError::Volume)?;
        tracing::info!(tenant = %tenant, volume = %volume, snapshot = name, "snapshot deleted");
        Ok(info)
    }

    /// Makes a volume's contents those of its snapshot `name`, which must be
    /// its newest (delete newer ones first: they would see data the rollback
    /// removes). The caller decides about connected clients: their caches no
    /// longer match the volume afterwards. The snapshot stays.
    pub fn rollback_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<SnapshotInfo, AdminError> {
        let _admin = self.lock_admin();
        let handle = self.snapshot_volume(tenant, volume)?;
        let all = handle.inner().snapshots().map_err(AdminError::Volume)?;
        let info = find(&handle, tenant, volume, name)?;
        let newer: Vec<String> = all
            .iter()
            .filter(|s| s.epoch > info.epoch)
            .map(|s| s.name.clone())
            .collect();
        if !newer.is_empty() {
            return Err(AdminError::NewerSnapshots {
                tenant: tenant.clone(),
                volume: volume.clone(),
                snapshot: name.to_owned(),
                newer,
            });
        }
        if info.size != handle.len() {
            return Err(AdminError::SnapshotSizeDiffers {
                tenant: tenant.clone(),
                volume: volume.clone(),
                snapshot: name.to_owned(),
                snapshot_size: info.size,
                volume_size: handle.len(),
            });
        }
        handle
            .inner()
            .roll_back(info.epoch)
            .map_err(AdminError::Volume)?;
        tracing::warn!(tenant = %tenant, volume = %volume, snapshot = name, "volume rolled back to a snapshot");
        Ok(info)
    }

    /// Ends the volume's current epoch without a snapshot, at `now` (seconds
    /// since the Unix epoch): an *age mark*. Data retention
    /// ([`discard_older_than`](Self::discard_older_than)) dates blocks by the
    /// epoch they were written in, so the marks' spacing is its precision.
    pub fn mark_age(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        now: u64,
    ) -> Result<(), AdminError> {
        let _admin = self.lock_admin();
        let handle = self.snapshot_volume(tenant, volume)?;
        handle.inner().mark_age(now).map_err(AdminError::Volume)?;
        Ok(())
    }

    /// When the volume's current epoch began (its last age mark or snapshot;
    /// the volume's creation before either).
    pub fn epoch_started(&self, tenant: &TenantId, volume: &VolumeId) -> Result<u64, AdminError> {
        let record = self.admin_volume_record(tenant, volume)?;
        let epoch = crate::volume::load_epoch(self.meta.as_ref(), record.internal_id)
            .map_err(AdminError::Volume)?;
        if epoch == 0 {
            return Ok(record.created);
        }
        let key = crate::record::epoch_start_key(record.internal_id, epoch);
        match self.meta.get(&key)? {
            Some(bytes) => crate::record::decode_u64(&bytes, "epoch start")
                .map_err(|e| AdminError::Corrupt { what: e.0 }),
            None => Ok(record.created),
        }
    }

    /// Discards every block of the volume whose data was written before
    /// `cutoff` as far as the age marks tell (blocks of an epoch that ended
    /// at or before it), as a trim of those blocks would: they read as zeros
    /// afterwards and their space is reclaimed once no snapshot holds them.
    /// Returns the blocks discarded.
    pub fn discard_older_than(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        cutoff: u64,
    ) -> Result<u64, AdminError> {
        let _admin = self.lock_admin();
        let handle = self.snapshot_volume(tenant, volume)?;
        let blocks = handle
            .inner()
            .discard_older_than(cutoff)
            .map_err(AdminError::Volume)?;
        if blocks > 0 {
            tracing::info!(tenant = %tenant, volume = %volume, blocks, cutoff, "discarded data past its retention");
        }
        Ok(blocks)
    }

    /// A read-only view of snapshot `name` (holds the volume open).
    pub fn open_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<SnapshotReader, AdminError> {
        let handle = self.snapshot_volume(tenant, volume)?;
        let info = find(&handle, tenant, volume, name)?;
        Ok(SnapshotReader {
            volume: handle,
            info,
        })
    }

    /// The volume's instance (opened if need be), its absence as an admin
    /// error.
    pub(super) fn snapshot_volume(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<Volume, AdminError> {
        self.admin_volume_record(tenant, volume)?;
        self.open_volume(tenant, volume).map_err(|e| match e {
            VolumeError::NoSuchTenant { tenant } => AdminError::NoSuchTenant { tenant },
            VolumeError::NoSuchVolume { tenant, volume } => {
                AdminError::NoSuchVolume { tenant, volume }
            }
            e => AdminError::Volume(e),
        })
    }
}

fn find(
    handle: &Volume,
    tenant: &TenantId,
    volume: &VolumeId,
    name: &str,
) -> Result<SnapshotInfo, AdminError> {
    handle
        .inner()
        .snapshots()
        .map_err(AdminError::Volume)?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| AdminError::NoSuchSnapshot {
            tenant: tenant.clone(),
            volume: volume.clone(),
            snapshot: name.to_owned(),
        })
}
