//! Data key (DEK) rotation: a new DEK per volume on demand, the status of the
//! re-encryption that follows, and a way to wait for it.
//!
//! A rotation wraps a fresh random DEK (version: one past the highest the
//! volume record holds) under the tenant's KEK, exactly as
//! [`Store::create_volume`] wraps the first one, and commits in ONE batch the
//! volume record holding it as the active DEK and the volume's re-encryption
//! job record. An open instance switches at once ([`Volume`]'s `adopt_dek`);
//! a closed volume picks the DEK up when it next opens. The old DEKs stay in
//! the record until re-encryption (`volume/reencrypt.rs`) has moved every
//! block off them.
//!
//! This module must never store a DEK unwrapped, never reuse a DEK version,
//! and never change a volume record without the store's admin lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use blockseal_keys::{DataKey, KeyVersion, TenantId, TenantKek, VolumeId};

use super::{Claim, Store, now};
use crate::error::{ErrorKind, QueryError, VolumeError, error_chain};
use crate::meta::{Batch, MetaError, MetaStore};
use crate::record::{self, JobRecord, VolumeRecord};
use crate::volume::{DataKeyStatus, ReencryptionReport, Volume, dek_blocks_in_store, status_of};

/// Rotating a volume's data key failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    /// The tenant does not exist.
    #[error("no tenant {tenant}")]
    NoSuchTenant {
        /// The tenant.
        tenant: TenantId,
    },
    /// The volume does not exist.
    #[error("no volume {tenant}/{volume}")]
    NoSuchVolume {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The volume has used every DEK version there is (2^32 - 1 rotations).
    #[error("the data key versions of {tenant}/{volume} are spent")]
    VersionsExhausted {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The metadata store failed.
    #[error("metadata store failed")]
    Meta(#[from] MetaError),
    /// A metadata record could not be decoded.
    #[error("store metadata is corrupt: {what}")]
    Corrupt {
        /// Which record.
        what: String,
    },
    /// The system random number generator failed.
    #[error(transparent)]
    Random(#[from] blockseal_keys::RandomError),
    /// The open volume failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl RotateError {
    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RotateError::NoSuchTenant { .. } | RotateError::NoSuchVolume { .. } => {
                ErrorKind::InvalidInput
            }
            RotateError::VersionsExhausted { .. } => ErrorKind::NoSpace,
            RotateError::Volume(e) => e.kind(),
            _ => ErrorKind::Io,
        }
    }
}

/// What [`Store::rotate_data_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DataKeyRotation {
    /// The DEK version that was active before.
    pub previous: KeyVersion,
    /// The new active DEK version.
    pub active: KeyVersion,
    /// Every DEK version the volume record holds now, ascending (the old ones
    /// go when re-encryption has moved their blocks).
    pub versions: Vec<KeyVersion>,
    /// Whether the volume was open (and switched at once).
    pub open: bool,
}

impl Store {
    /// Rotates a volume's data key: a new DEK, wrapped under the tenant's KEK,
    /// becomes the active one in one metadata commit with the volume's
    /// re-encryption job. New writes seal under it at once if the volume is
    /// open, or from its next open. The blocks older DEKs sealed are
    /// re-encrypted in the background while the volume is open
    /// ([`StoreOptions::reencrypt_rate`](crate::StoreOptions::reencrypt_rate)),
    /// or by [`Store::reencrypt_now`]; then the old DEKs are destroyed.
    pub fn rotate_data_key(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<DataKeyRotation, RotateError> {
        let _admin = self.lock_admin();
        // No instance opens (or closes) while the record changes under us.
        let claim = self.claim(tenant, volume);
        let tenant_record = self
            .tenant_record(tenant)
            .map_err(query_to_rotate)?
            .ok_or_else(|| RotateError::NoSuchTenant {
                tenant: tenant.clone(),
            })?;
        let mut record = self
            .meta
            .get(&record::volume_key(tenant, volume))?
            .ok_or_else(|| RotateError::NoSuchVolume {
                tenant: tenant.clone(),
                volume: volume.clone(),
            })
            .and_then(|bytes| {
                VolumeRecord::decode(&bytes).map_err(|e| RotateError::Corrupt { what: e.0 })
            })?;
        let previous = KeyVersion(record.active_dek);
        // Held across the commit: a master key rotation cannot slip in between
        // and leave the new DEK wrapped under a KEK of the old master key.
        let master = self.read_master();
        let kek = self.kek(&master, tenant, &tenant_record);
        let (dek, job) = commit_rotation(self.meta.as_ref(), tenant, volume, &kek, &mut record)?;
        drop(kek);
        drop(master);
        let active = dek.version();
        let open = match claim {
            Claim::Open(instance) => {
                instance.adopt_dek(dek, job);
                true
            }
            Claim::Closed(opening) => {
                drop(opening);
                false
            }
        };
        drop(_admin);
        if !open {
            // Re-encrypted in the background even if no client opens it.
            self.hold_for_reencryption(tenant, volume);
        }
        tracing::info!(
            tenant = %tenant,
            volume = %volume,
            previous_dek_version = previous.0,
            dek_version = active.0,
            open,
            "data key rotated"
        );
        Ok(DataKeyRotation {
            previous,
            active,
            versions: record.keys.iter().map(|&(v, _)| KeyVersion(v)).collect(),
            open,
        })
    }

    /// A volume's DEK versions with the blocks each one's committed mappings
    /// hold (from the open instance's extent index when it has one, else from
    /// the metadata store), the active version, and the progress of its
    /// re-encryption job.
    pub fn data_key_status(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<DataKeyStatus, VolumeError> {
        if let Some(instance) = self.open_instance(tenant, volume) {
            return instance.data_key_status();
        }
        let (_, record) = self.tenant_and_volume_records(tenant, volume)?;
        let blocks = dek_blocks_in_store(self.meta.as_ref(), record.internal_id)?;
        let job = match self.meta.get(&record::job_key(record.internal_id))? {
            Some(bytes) => {
                Some(JobRecord::decode(&bytes).map_err(|e| VolumeError::Corrupt { what: e.0 })?)
            }
            // An open would make one (see `Rekey::load`).
            None if record.keys.len() > 1 => Some(JobRecord {
                target: record.active_dek,
                cursor: 0,
                done: 0,
            }),
            None => None,
        };
        Ok(status_of(&record, &blocks, job, false))
    }

    /// Opens the volume (or shares its open instance) and re-encrypts now,
    /// without the background rate limit, every block an older DEK sealed, then
    /// destroys the old DEKs (see [`Volume::reencrypt_now`]).
    pub fn reencrypt_now(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<ReencryptionReport, VolumeError> {
        self.open_volume(tenant, volume)?.reencrypt_now()
    }

    fn open_instance(&self, tenant: &TenantId, volume: &VolumeId) -> Option<Volume> {
        let handle = (tenant.clone(), volume.clone());
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&handle)
            .and_then(Weak::upgrade)
            .map(Volume::from_inner)
    }
}

/// Makes a new DEK the active one of `record` (the caller holds the store's
/// admin lock and read `record` under it): wrapped under `kek`, committed in
/// one batch with the volume's job record (whose count of blocks done carries
/// over). Returns the DEK and the job.
pub(crate) fn commit_rotation(
    meta: &dyn MetaStore,
    tenant: &TenantId,
    volume: &VolumeId,
    kek: &TenantKek,
    record: &mut VolumeRecord,
) -> Result<(DataKey, JobRecord), RotateError> {
    let newest = record
        .keys
        .iter()
        .map(|&(v, _)| v)
        .chain([record.active_dek])
        .max()
        .unwrap_or(0);
    let version = newest
        .checked_add(1)
        .ok_or_else(|| RotateError::VersionsExhausted {
            tenant: tenant.clone(),
            volume: volume.clone(),
        })?;
    let dek = DataKey::generate(KeyVersion(version))?;
    let wrapped = kek.wrap(volume, &dek)?;
    let done = match meta.get(&record::job_key(record.internal_id))? {
        Some(bytes) => {
            JobRecord::decode(&bytes)
                .map_err(|e| RotateError::Corrupt { what: e.0 })?
                .done
        }
        None => 0,
    };
    let job = JobRecord {
        target: version,
        cursor: 0,
        done,
    };
    let mut next = record.clone();
    next.keys.push((version, wrapped.to_bytes()));
    next.active_dek = version;
    next.updated = now();
    let mut batch = Batch::new();
    batch.put(record::volume_key(tenant, volume), next.encode());
    batch.put(record::job_key(record.internal_id).to_vec(), job.encode());
    meta.commit(&batch)?;
    *record = next;
    Ok((dek, job))
}

fn query_to_rotate(e: QueryError) -> RotateError {
    match e {
        QueryError::Meta(e) => RotateError::Meta(e),
        QueryError::Corrupt { what } => RotateError::Corrupt { what },
    }
}

/// Volumes the store keeps open for their unfinished re-encryption job, so
/// that the background thread works on them with no client connected. The
/// thread lets go of a volume once its job is done.
/// How long letting go of a held volume waits for its background pass to end.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) type HeldForJobs = Arc<Mutex<HashMap<(TenantId, VolumeId), Volume>>>;

impl Store {
    /// Keeps `volume` open until its re-encryption job is done (with
    /// background re-encryption on; otherwise the job waits for
    /// [`Store::reencrypt_now`] or for the volume's next open).
    pub(crate) fn hold_for_reencryption(&self, tenant: &TenantId, volume: &VolumeId) {
        if !self.options.background_reencryption {
            return;
        }
        match self.open_volume(tenant, volume) {
            Ok(handle) => {
                let previous =
                    lock_held(&self.held).insert((tenant.clone(), volume.clone()), handle);
                drop(previous);
                self.rekeyer.wakeup().notify();
            }
            Err(error) => tracing::warn!(
                tenant = %tenant,
                volume = %volume,
                error = %error_chain(&error),
                "cannot open a volume to re-encrypt it; its job waits for its next open"
            ),
        }
    }

    /// Lets go of a volume held for its job, because it is being deleted: its
    /// background pass ends at the next step, and this waits (at most
    /// [`RELEASE_WAIT`]) for the instance to close unless a client still
    /// holds it (the deletion then reports it in use).
    pub(crate) fn release_held(&self, tenant: &TenantId, volume: &VolumeId) {
        let key = (tenant.clone(), volume.clone());
        let Some(handle) = lock_held(&self.held).remove(&key) else {
            return;
        };
        handle.inner().release_background();
        let gate = self.closing_gate(tenant, volume);
        // Dropped outside the lock: the last handle flushes and closes.
        drop(handle);
        if let Some(gate) = gate {
            gate.wait_timeout(RELEASE_WAIT);
        }
    }

    /// At open: holds every volume whose re-encryption job a previous run
    /// left unfinished, so the job resumes at once.
    pub(crate) fn resume_reencryption_jobs(&self) {
        if !self.options.background_reencryption {
            return;
        }
        let mut ids = HashSet::new();
        let scanned = self.meta.scan_prefix(b"r", &mut |key, _| {
            if let [b'r', a, b, c, d] = key {
                ids.insert(u32::from_be_bytes([*a, *b, *c, *d]));
            }
            true
        });
        if let Err(error) = scanned {
            tracing::warn!(error = %error_chain(&error), "cannot look for unfinished re-encryption jobs");
            return;
        }
        if ids.is_empty() {
            return;
        }
        let mut pending = Vec::new();
        let scanned = self.meta.scan_prefix(b"V", &mut |key, value| {
            if let Ok(record) = VolumeRecord::decode(value)
                && ids.contains(&record.internal_id)
                && let Some((tenant, volume)) = split_volume_key(key)
            {
                pending.push((tenant, volume));
            }
            true
        });
        if let Err(error) = scanned {
            tracing::warn!(error = %error_chain(&error), "cannot look for unfinished re-encryption jobs");
            return;
        }
        for (tenant, volume) in pending {
            tracing::info!(tenant = %tenant, volume = %volume, "resuming an unfinished re-encryption");
            self.hold_for_reencryption(&tenant, &volume);
        }
    }
}

/// The tenant and volume a volume record's key names (`V`, tenant, `0x00`,
/// volume), if it is well-formed.
fn split_volume_key(key: &[u8]) -> Option<(TenantId, VolumeId)> {
    let rest = key.strip_prefix(b"V")?;
    let zero = rest.iter().position(|&b| b == 0)?;
    let tenant = TenantId::new(std::str::from_utf8(&rest[..zero]).ok()?).ok()?;
    let volume = VolumeId::new(std::str::from_utf8(&rest[zero + 1..]).ok()?).ok()?;
    Some((tenant, volume))
}

pub(crate) fn lock_held(
    held: &HeldForJobs,
) -> std::sync::MutexGuard<'_, HashMap<(TenantId, VolumeId), Volume>> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}
