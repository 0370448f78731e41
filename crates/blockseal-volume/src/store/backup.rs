//! Backups of snapshots to a stream, their verification, and restoring them
//! into a new volume (on this store or another), with the per-backup keys
//! that make shredding and expiry reach the backup files.
//!
//! # Keys
//!
//! Each backup has its own random key (a `BackupKey`): the file holds the
//! volume's data keys wrapped under it, and a MAC under it over the whole
//! stream. The backup key itself is never in the file: the store keeps it
//! wrapped under the tenant's KEK (record `b`), so it goes with the tenant
//! (crypto-shredding destroys it with the tenant's seed and records) and with
//! its own expiry (the record is deleted). A file whose key record is gone
//! cannot be read, even with the master key. Restoring on another store takes
//! the keys from a tenant recovery bundle (`TenantBundle`, made by
//! [`Store::export_tenant_keys`] and sealed under a passphrase or the other
//! host's master key).
//!
//! # What a backup holds
//!
//! The ciphertext of the blocks a snapshot sees, as the volume stored them
//! (nonces and tags, never plaintext), in LBA order; unmapped ranges take no
//! space. An incremental backup holds the blocks born after its base snapshot
//! (every block written since, whatever re-encryption or compaction did since)
//! and the ranges mapped in the base and unmapped in the snapshot. The format
//! is in `backup_format` and `docs/FORMAT.md`.
//!
//! # Restore
//!
//! A restore opens every block with the backup's data keys and writes the
//! plaintext into a new volume through the volume's own write path: it is
//! sealed under that volume's fresh data key and writers, so no (key, nonce)
//! pair of the source is ever reused, however often one backup is restored.
//! The new volume carries a restore marker (`R`) from its creation until the
//! last file's trailer is verified: a failed restore deletes it, and a store
//! opened after a crash mid-restore deletes what the marker names.
//!
//! This module must never write plaintext or an unwrapped key anywhere but
//! into the target volume's write path.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use blockseal_keys::{
    Argon2Params, BackupId, BackupKey, BackupKeyError, BundleError, BundleOpener, DataKey,
    KeyVersion, Passphrase, TenantBundle, TenantId, TenantKek, VolumeId,
};
use zeroize::Zeroizing;

use super::Store;
use crate::VolumeOptions;
use crate::backup_format::{
    BackupFormatError, BackupHeader, BackupKind, BackupReader, BackupWriter, DekEntry, Frame,
    WriterEntry,
};
use crate::block::{BlockSize, Lba};
use crate::error::{AdminError, AdminErrorKind, CreateError, VolumeError};
use crate::meta::Batch;
use crate::nonce::nonce_for;
use crate::record::{self, BackupKeyRecord, Extent};
use crate::seal::{BlockCipher, Tag};

/// Blocks read from segments per batch while a backup runs (progress is
/// reported per batch).
const PROGRESS_BLOCKS: u64 = 4096;

/// Extents a backup reads ahead of the one it is writing.
const READ_AHEAD: usize = 8;

/// What [`Store::create_backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupReport {
    /// The backup's id (its key record in the store).
    pub id: BackupId,
    /// Full or incremental.
    pub kind: BackupKind,
    /// The snapshot backed up.
    pub snapshot: String,
    /// The base snapshot of an incremental backup.
    pub base: Option<String>,
    /// Bytes written.
    pub bytes: u64,
    /// Blocks of data the file holds.
    pub mapped_blocks: u64,
    /// Blocks an incremental backup unmaps.
    pub unmapped_blocks: u64,
    /// When its key is destroyed (seconds since the Unix epoch), if ever.
    pub expires: Option<u64>,
}

/// What [`Store::verify_backups`] and [`Store::restore_backups`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupCheck {
    /// Each file's header, in order.
    pub headers: Vec<BackupHeader>,
    /// Blocks whose authenticity was checked (0 without keys).
    pub blocks_authenticated: u64,
    /// Blocks the files hold.
    pub mapped_blocks: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// A backup key the store holds, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupKeyInfo {
    /// The backup's id.
    pub id: BackupId,
    /// The tenant.
    pub tenant: TenantId,
    /// The volume backed up.
    pub volume: String,
    /// The snapshot backed up.
    pub snapshot: String,
    /// When the backup was made.
    pub created: u64,
    /// When its key is destroyed, if ever.
    pub expires: Option<u64>,
}

/// Where the keys of backup files come from.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum BackupKeys<'a> {
    /// The store's own backup key records (the store that made the backups).
    Store,
    /// A tenant recovery bundle (restoring on another store).
    Bundle(&'a TenantBundle),
    /// No keys: only the structure and digest of the files are checked.
    None,
}

/// A backup could not be made, verified or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The file is not a well-formed backup (truncated, reordered, edited,
    /// spliced, or not a backup at all).
    #[error("{file}: {source}")]
    Format {
        /// Which file (its position among the files given, or a name).
        file: String,
        /// What is wrong with it.
        #[source]
        source: BackupFormatError,
    },
    /// The file's MAC does not verify with its key: edited, spliced from two
    /// backups, or not the backup the key belongs to.
    #[error("{file}: the backup failed authentication (edited, spliced, or another backup's key)")]
    Authentication {
        /// Which file.
        file: String,
    },
    /// A block failed authentication under the backup's keys.
    #[error("{file}: block {lba} failed authentication")]
    Block {
        /// Which file.
        file: String,
        /// The block.
        lba: u64,
    },
    /// No key is known for the backup: it expired, its tenant was shredded,
    /// or it was made on another store (give a tenant recovery bundle).
    #[error(
        "{file}: no key for backup {id} of tenant {tenant}: it expired, the tenant was shredded, \
         or the backup comes from another store (restore with the tenant's recovery bundle)"
    )]
    NoKey {
        /// Which file.
        file: String,
        /// The backup.
        id: BackupId,
        /// Its tenant.
        tenant: String,
    },
    /// A key of the backup failed to unwrap.
    #[error("{file}: {source}")]
    Key {
        /// Which file.
        file: String,
        /// What failed.
        #[source]
        source: BackupKeyError,
    },
    /// The files do not form a chain: the first must be a full backup and
    /// each next one an incremental backup of the same volume whose base is
    /// the previous one's snapshot.
    #[error("{file}: {problem}")]
    Chain {
        /// Which file.
        file: String,
        /// What does not fit.
        problem: String,
    },
    /// The incremental base is not older than the snapshot backed up.
    #[error("base snapshot {base} is not older than {snapshot}")]
    BaseNotOlder {
        /// The base snapshot.
        base: String,
        /// The snapshot backed up.
        snapshot: String,
    },
    /// The restore target exists already.
    #[error("volume {tenant}/{volume} already exists; restore into a new name")]
    TargetExists {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// A recovery bundle could not be sealed or opened.
    #[error("recovery bundle: {source}")]
    Bundle {
        /// Why.
        #[source]
        source: BundleError,
    },
    /// Writing or reading the stream failed.
    #[error("backup stream I/O failed")]
    Io(#[source] std::io::Error),
    /// A store operation failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The volume failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl BackupError {
    /// The error's classification, for a protocol layer.
    pub fn kind(&self) -> AdminErrorKind {
        match self {
            BackupError::Admin(e) => e.kind(),
            BackupError::TargetExists { .. } | BackupError::BaseNotOlder { .. } => {
                AdminErrorKind::Conflict
            }
            BackupError::NoKey { .. } => AdminErrorKind::NotFound,
            BackupError::Format { .. }
            | BackupError::Authentication { .. }
            | BackupError::Block { .. }
            | BackupError::Key { .. }
            | BackupError::Bundle { .. }
            | BackupError::Chain { .. } => AdminErrorKind::InvalidInput,
            _ => AdminErrorKind::Internal,
        }
    }
}

impl Store {
    /// Writes a backup of snapshot `snapshot` of a volume to `out`: full, or
    /// incremental from the older snapshot `base`. The backup's key is kept
    /// (wrapped under the tenant's KEK) until `expires` (seconds since the
    /// Unix epoch; `None`: until deleted with the tenant). `progress` is called
    /// with (blocks done, blocks in all).
    ///
    /// Compaction and re-encryption of the volume wait while the backup runs;
    /// writes and reads do not.
    ///
    /// The backup is a `backup` span (INFO): `tenant`, `volume`, `snapshot`,
    /// `base`, and when it ends the backup's id, blocks and bytes, or the
    /// `error`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_backup(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        snapshot: &str,
        base: Option<&str>,
        expires: Option<u64>,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupReport, BackupError> {
        let span = tracing::info_span!(
            "backup",
            tenant = %tenant,
            volume = %volume,
            snapshot,
            base = base.unwrap_or(""),
            backup = tracing::field::Empty,
            blocks = tracing::field::Empty,
            bytes = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let _entered = span.enter();
        let result = self.write_backup(tenant, volume, snapshot, base, expires, out, progress);
        match &result {
            Ok(report) => {
                span.record("backup", tracing::field::display(&report.id));
                span.record("blocks", report.mapped_blocks);
                span.record("bytes", report.bytes);
            }
            Err(e) => crate::error::record_failure(&span, e),
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn write_backup(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        snapshot: &str,
        base: Option<&str>,
        expires: Option<u64>,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupReport, BackupError> {
        let info = self.find_snapshot(tenant, volume, snapshot, false)?;
        let base_info = match base {
            Some(name) => {
                let b = self.find_snapshot(tenant, volume, name, false)?;
                if b.epoch >= info.epoch {
                    return Err(BackupError::BaseNotOlder {
                        base: name.to_owned(),
                        snapshot: snapshot.to_owned(),
                    });
                }
                Some(b)
            }
            None => None,
        };
        let handle = self.snapshot_volume(tenant, volume)?;
        let block_size = handle.block_size();
        let bs = u64::from(block_size.get());
        let id = BackupId::generate().map_err(AdminError::from)?;
        let key = BackupKey::generate().map_err(AdminError::from)?;
        let kek_version = {
            let _admin = self.lock_admin();
            let kek = self.admin_kek(tenant)?;
            let wrapped = kek.wrap_backup_key(&id, &key).map_err(AdminError::from)?;
            let record = BackupKeyRecord {
                created: super::now(),
                expires: expires.unwrap_or(0),
                volume: volume.to_string(),
                snapshot: snapshot.to_owned(),
                wrapped: wrapped.to_vec(),
            };
            let mut batch = Batch::new();
            batch.put(
                record::backup_key_key(tenant, id.as_bytes()),
                record.encode(),
            );
            self.meta.commit(&batch).map_err(AdminError::from)?;
            kek.version().0
        };

        let frozen = handle.inner().freeze();
        let blocks = info.size / bs;
        let extents = frozen.extents(info.epoch, 0, blocks)?;
        let (extents, unmapped) = match &base_info {
            None => (extents, Vec::new()),
            Some(b) => {
                let before = frozen.extents(b.epoch, 0, (b.size / bs).min(blocks))?;
                let gone = unmapped_since(&before, &extents);
                let changed = extents.into_iter().filter(|e| e.birth > b.epoch).collect();
                (changed, gone)
            }
        };
        let mut dek_versions = BTreeSet::new();
        let mut writers = BTreeSet::new();
        for e in &extents {
            dek_versions.insert(e.dek_version);
            if e.writer != 0 {
                writers.insert(e.writer);
            }
        }
        dek_versions.insert(frozen.active_dek());
        let mut deks = Vec::with_capacity(dek_versions.len());
        for v in dek_versions {
            let wrapped = frozen
                .with_dek(v, |dek| key.wrap_dek(&id, dek))
                .ok_or_else(|| missing(format!("data key v{v}")))?
                .map_err(AdminError::from)?;
            deks.push(DekEntry {
                version: v,
                wrapped,
            });
        }
        let mut writer_entries = Vec::with_capacity(writers.len());
        for n in writers {
            let w = frozen
                .writer(n)
                .ok_or_else(|| missing(format!("writer {n}")))?;
            writer_entries.push(WriterEntry {
                number: n,
                dek_version: w.dek_version,
                salt: w.salt,
            });
        }
        let header = BackupHeader {
            kind: if base_info.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            backup_id: *id.as_bytes(),
            created: super::now(),
            tenant: tenant.to_string(),
            volume: volume.to_string(),
            block_size: block_size.get(),
            volume_size: info.size,
            snapshot_uid: info.uid,
            snapshot_epoch: info.epoch,
            snapshot_name: info.name.clone(),
            base_snapshot_uid: base_info.as_ref().map_or([0; 16], |b| b.uid),
            base_backup_id: if base_info.is_some() {
                // Names the chain link; the base's own backup id is not known
                // here (several backups may share a snapshot).
                base_info.as_ref().map_or([0; 16], |b| b.uid)
            } else {
                [0; 16]
            },
            kek_version,
            deks,
            writers: writer_entries,
        };
        let mut writer = BackupWriter::new(out, &header).map_err(BackupError::Io)?;
        let total: u64 = extents.iter().map(|e| e.tags.len() as u64).sum();
        let unmapped_blocks: u64 = unmapped.iter().map(|&(_, n)| n).sum();
        let mut done = 0u64;
        let mut reported = 0u64;
        progress(0, total);
        // One thread reads the ciphertext from the segments while this one
        // hashes and writes what was read before: the two overlap.
        let mut gaps = unmapped.iter().peekable();
        let streamed: Result<(), BackupError> = std::thread::scope(|scope| {
            let (full_tx, full_rx) =
                std::sync::mpsc::sync_channel::<Result<Vec<u8>, VolumeError>>(READ_AHEAD);
            let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let frozen = &frozen;
            let extents = &extents;
            scope.spawn(move || {
                for e in extents {
                    let mut buf = empty_rx.try_recv().unwrap_or_default();
                    buf.resize(e.tags.len() * bs as usize, 0);
                    let read = frozen.read_ciphertext(e, &mut buf).map(|()| buf);
                    let failed = read.is_err();
                    if full_tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
            for e in extents {
                while let Some(&&(lba, n)) = gaps.peek().filter(|g| g.0 < e.lba) {
                    writer.unmapped(lba, n).map_err(BackupError::Io)?;
                    gaps.next();
                }
                let buf = full_rx.recv().map_err(|_| {
                    BackupError::Io(std::io::Error::other("the segment reader stopped"))
                })??;
                writer
                    .block_run(e.lba, e.dek_version, e.writer, e.nonce, &e.tags, &buf)
                    .map_err(BackupError::Io)?;
                let _ = empty_tx.send(buf);
                done += e.tags.len() as u64;
                if done - reported >= PROGRESS_BLOCKS {
                    progress(done, total);
                    reported = done;
                }
            }
            Ok(())
        });
        streamed?;
        for &(lba, n) in gaps {
            writer.unmapped(lba, n).map_err(BackupError::Io)?;
        }
        drop(frozen);
        let (_, summary) = writer
            .finish(|input| key.mac(&id, input))
            .map_err(BackupError::Io)?;
        progress(total, total);
        tracing::info!(
            tenant = %tenant,
            volume = %volume,
            snapshot,
            base = base.unwrap_or(""),
            backup = %id,
            bytes = summary.bytes,
            "backup written"
        );
        Ok(BackupReport {
            id,
            kind: header.kind,
            snapshot: snapshot.to_owned(),
            base: base.map(str::to_owned),
            bytes: summary.bytes,
            mapped_blocks: total,
            unmapped_blocks,
            expires,
        })
    }

    /// The backup keys the store holds for `tenant` (every tenant: `None`).
    pub fn backup_keys(&self, tenant: Option<&TenantId>) -> Result<Vec<BackupKeyInfo>, AdminError> {
        let prefix = match tenant {
            Some(t) => record::backup_key_prefix(t),
            None => vec![b'b'],
        };
        let mut out = Vec::new();
        let mut bad = None;
        self.meta.scan_prefix(&prefix, &mut |key, value| {
            match decode_backup_key(key, value) {
                Ok((tenant, id, r)) => out.push(BackupKeyInfo {
                    id,
                    tenant,
                    volume: r.volume,
                    snapshot: r.snapshot,
                    created: r.created,
                    expires: (r.expires != 0).then_some(r.expires),
                }),
                Err(what) => bad = Some(what),
            }
            bad.is_none()
        })?;
        match bad {
            Some(what) => Err(AdminError::Corrupt { what }),
            None => Ok(out),
        }
    }

    /// Destroys the keys of backups whose expiry is at or before `now`: those
    /// files can never be read again. Returns the keys destroyed.
    pub fn expire_backup_keys(&self, now: u64) -> Result<Vec<BackupKeyInfo>, AdminError> {
        let _admin = self.lock_admin();
        let doomed: Vec<BackupKeyInfo> = self
            .backup_keys(None)?
            .into_iter()
            .filter(|k| k.expires.is_some_and(|e| e <= now))
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        let mut batch = Batch::new();
        for k in &doomed {
            batch.delete(record::backup_key_key(&k.tenant, k.id.as_bytes()));
        }
        self.meta.commit(&batch)?;
        Ok(doomed)
    }

    /// A tenant's backup keys, unwrapped, for a recovery bundle that lets
    /// another store restore the tenant's backups. The caller seals the
    /// bundle (under a passphrase or the other host's master key) at once.
    pub fn export_tenant_keys(&self, tenant: &TenantId) -> Result<TenantBundle, AdminError> {
        let _admin = self.lock_admin();
        let kek = self.admin_kek(tenant)?;
        let mut keys = Vec::new();
        for info in self.backup_keys(Some(tenant))? {
            keys.push((info.id, self.unwrap_backup_key(&kek, tenant, &info.id)?));
        }
        Ok(TenantBundle {
            tenant: tenant.clone(),
            created: super::now(),
            backup_keys: keys,
        })
    }

    /// A tenant's recovery bundle, sealed: under `passphrase` (Argon2id with
    /// `params`), or, without one, to this store's own master key (for a
    /// store on another host that shares it). The bytes are safe to store
    /// anywhere the backups go.
    pub fn seal_tenant_bundle(
        &self,
        tenant: &TenantId,
        passphrase: Option<(&Passphrase, Argon2Params)>,
    ) -> Result<Vec<u8>, BackupError> {
        let bundle = self.export_tenant_keys(tenant)?;
        let sealed = match passphrase {
            Some((p, params)) => bundle.seal_with_passphrase(p, params),
            None => bundle.seal_to_recipient(&self.read_master()),
        };
        sealed.map_err(|source| BackupError::Bundle { source })
    }

    /// Opens a sealed recovery bundle: with `passphrase` when it was sealed
    /// under one, else with this store's master key.
    pub fn open_tenant_bundle(
        &self,
        bytes: &[u8],
        passphrase: Option<&Passphrase>,
    ) -> Result<TenantBundle, BackupError> {
        let opened = match passphrase {
            Some(p) => TenantBundle::open(bytes, &BundleOpener::Passphrase(p)),
            None => TenantBundle::open(bytes, &BundleOpener::MasterKey(&self.read_master())),
        };
        opened.map_err(|source| BackupError::Bundle { source })
    }

    /// A restore drill: restores the newest backup chain of every volume
    /// found under `dir` (searched recursively; other files are listed as
    /// skipped) into a scratch store made under `scratch_parent`, which
    /// checks every block's authenticity and every file's MAC, then removes
    /// the scratch store. The keys come from this store (exported in memory,
    /// never written). One volume's failure is reported and the drill goes on.
    pub fn drill(&self, dir: &Path, scratch_parent: &Path) -> Result<DrillReport, BackupError> {
        let mut files = Vec::new();
        collect_files(dir, &mut files).map_err(BackupError::Io)?;
        files.sort();
        let mut report = DrillReport::default();
        // (tenant, volume) -> headers and paths.
        let mut found: BTreeMap<(String, String), Vec<(BackupHeader, PathBuf)>> = BTreeMap::new();
        for path in files {
            let header = match std::fs::File::open(&path) {
                Ok(f) => BackupReader::new(std::io::BufReader::new(f))
                    .map(|r| r.header().clone())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match header {
                Ok(h) => found
                    .entry((h.tenant.clone(), h.volume.clone()))
                    .or_default()
                    .push((h, path)),
                Err(e) => report.skipped.push((path, e)),
            }
        }
        let scratch = scratch_parent.join(format!(
            ".drill-{}",
            BackupId::generate().map_err(AdminError::from)?
        ));
        let master = blockseal_keys::MasterKey::generate().map_err(AdminError::from)?;
        let store = Store::create(
            &scratch,
            master,
            super::StoreOptions::new().background_compaction(false),
        )
        .map_err(|e| BackupError::Io(std::io::Error::other(e.to_string())))?;
        for ((tenant, volume), mut backups) in found {
            backups.sort_by_key(|(h, _)| h.snapshot_epoch);
            let chain = newest_chain(&backups);
            let mut outcome = DrillVolume {
                tenant: tenant.clone(),
                volume: volume.clone(),
                files: chain.iter().map(|(_, p)| p.clone()).collect(),
                snapshot: chain
                    .last()
                    .map(|(h, _)| h.snapshot_name.clone())
                    .unwrap_or_default(),
                blocks: 0,
                error: None,
            };
            let result = (|| -> Result<u64, BackupError> {
                if chain
                    .first()
                    .is_none_or(|(h, _)| h.kind != BackupKind::Full)
                {
                    return Err(BackupError::Chain {
                        file: backups
                            .last()
                            .map(|(_, p)| p.display().to_string())
                            .unwrap_or_default(),
                        problem: "no full backup starts the newest backup's chain".into(),
                    });
                }
                let t = TenantId::new(&tenant).map_err(|_| missing(format!("tenant {tenant}")))?;
                let bundle = self.export_tenant_keys(&t)?;
                let mut inputs: Vec<(String, Box<dyn Read>)> = Vec::new();
                for (_, path) in &chain {
                    let f = std::fs::File::open(path).map_err(BackupError::Io)?;
                    inputs.push((
                        path.display().to_string(),
                        Box::new(std::io::BufReader::new(f)),
                    ));
                }
                let v = VolumeId::new(&volume).map_err(|_| missing(format!("volume {volume}")))?;
                let check = store.restore_backups(
                    inputs,
                    &t,
                    &v,
                    BackupKeys::Bundle(&bundle),
                    &mut |_| {},
                )?;
                Ok(check.blocks_authenticated)
            })();
            match result {
                Ok(blocks) => outcome.blocks = blocks,
                Err(e) => outcome.error = Some(crate::error::error_chain(&e)),
            }
            report.volumes.push(outcome);
        }
        drop(store);
        std::fs::remove_dir_all(&scratch).map_err(BackupError::Io)?;
        Ok(report)
    }

    /// Checks backup files: their structure and digests always; with keys,
    /// their MACs and every block's authenticity. Several files must form a
    /// chain (each next one an incremental based on the previous one's
    /// snapshot).
    pub fn verify_backups(
        &self,
        inputs: Vec<(String, Box<dyn Read + '_>)>,
        keys: BackupKeys<'_>,
    ) -> Result<BackupCheck, BackupError> {
        self.read_chain(inputs, keys, false, &mut |_, _| Ok(()))
    }

    /// Restores a chain of backup files (a full backup, then incrementals in
    /// order) into the new volume `tenant/volume`, creating the tenant when
    /// missing. On any failure nothing of the restore remains.
    ///
    /// The restore is a `restore` span (INFO): `tenant`, `volume`, `files`,
    /// and when it ends the blocks authenticated and bytes read, or the
    /// `error`.
    pub fn restore_backups(
        &self,
        inputs: Vec<(String, Box<dyn Read + '_>)>,
        tenant: &TenantId,
        volume: &VolumeId,
        keys: BackupKeys<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BackupCheck, BackupError> {
        let span = tracing::info_span!(
            "restore",
            tenant = %tenant,
            volume = %volume,
            files = inputs.len(),
            blocks = tracing::field::Empty,
            bytes = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let _entered = span.enter();
        let result = self.restore_chain(inputs, tenant, volume, keys, progress);
        match &result {
            Ok(check) => {
                span.record("blocks", check.blocks_authenticated);
                span.record("bytes", check.bytes);
            }
            Err(e) => crate::error::record_failure(&span, e),
        }
        result
    }

    fn restore_chain(
        &self,
        inputs: Vec<(String, Box<dyn Read + '_>)>,
        tenant: &TenantId,
        volume: &VolumeId,
        keys: BackupKeys<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BackupCheck, BackupError> {
        if matches!(keys, BackupKeys::None) {
            return Err(BackupError::Chain {
                file: "restore".into(),
                problem: "a restore needs the backups' keys".into(),
            });
        }
        if self
            .meta
            .get(&record::volume_key(tenant, volume))
            .map_err(AdminError::from)?
            .is_some()
        {
            return Err(BackupError::TargetExists {
                tenant: tenant.clone(),
                volume: volume.clone(),
            });
        }
        let created_tenant = match self.create_tenant(tenant) {
            Ok(_) => true,
            Err(CreateError::TenantExists { .. }) => false,
            Err(e) => return Err(create_failed(e)),
        };
        let mut target: Option<crate::Volume> = None;
        let mut restored = 0u64;
        let result = self.read_chain(inputs, keys, true, &mut |header, item| {
            let v = match &target {
                Some(v) => v.clone(),
                None => {
                    let block_size =
                        BlockSize::new(header.block_size).map_err(|_| BackupError::Chain {
                            file: "restore".into(),
                            problem: format!("block size {} is not supported", header.block_size),
                        })?;
                    self.create_restoring_volume(tenant, volume, header.volume_size, block_size)?;
                    let v = self.open_volume(tenant, volume)?;
                    target = Some(v.clone());
                    v
                }
            };
            match item {
                ChainItem::Header => {
                    if v.len() != header.volume_size {
                        drop(v);
                        self.resize_volume(tenant, volume, header.volume_size, true)?;
                    }
                }
                ChainItem::Blocks { lba, plaintext } => {
                    v.write_at(lba * u64::from(header.block_size), plaintext)?;
                    restored += plaintext.len() as u64 / u64::from(header.block_size);
                    progress(restored);
                }
                ChainItem::Unmapped { lba, count } => {
                    let bs = u64::from(header.block_size);
                    v.trim(lba * bs, count * bs)?;
                }
            }
            Ok(())
        });
        let finished = result.and_then(|check| {
            if let Some(v) = target.take() {
                v.flush()?;
            }
            self.finish_restore(tenant, volume)?;
            Ok(check)
        });
        match finished {
            Ok(check) => {
                tracing::info!(tenant = %tenant, volume = %volume, files = check.headers.len(), "backup restored");
                Ok(check)
            }
            Err(e) => {
                drop(target);
                self.abandon_restore(tenant, volume, created_tenant);
                Err(e)
            }
        }
    }

    /// Reads a chain of backup files, checking everything the keys allow,
    /// and hands each header, block run (as plaintext, with keys) and
    /// unmapped range to `apply`. With `from_full`, the chain must start with
    /// a full backup (a restore); else it may start anywhere (a check).
    fn read_chain(
        &self,
        inputs: Vec<(String, Box<dyn Read + '_>)>,
        keys: BackupKeys<'_>,
        from_full: bool,
        apply: &mut dyn FnMut(&BackupHeader, ChainItem<'_>) -> Result<(), BackupError>,
    ) -> Result<BackupCheck, BackupError> {
        let mut check = BackupCheck {
            headers: Vec::new(),
            blocks_authenticated: 0,
            mapped_blocks: 0,
            bytes: 0,
        };
        if inputs.is_empty() {
            return Err(BackupError::Chain {
                file: "restore".into(),
                problem: "no backup file given".into(),
            });
        }
        for (name, input) in inputs {
            let format = |source| BackupError::Format {
                file: name.clone(),
                source,
            };
            let mut reader = BackupReader::new(input).map_err(format)?;
            let header = reader.header().clone();
            if let Some(prev) = check.headers.last() {
                chain_fits(&name, prev, &header)?;
            } else if from_full && header.kind != BackupKind::Full {
                return Err(BackupError::Chain {
                    file: name,
                    problem:
                        "the first file of a chain must be a full backup, not an incremental one"
                            .into(),
                });
            }
            let opener = match keys {
                BackupKeys::None => None,
                _ => Some(self.opener(&name, &header, keys)?),
            };
            apply(&header, ChainItem::Header)?;
            let mut plain = Zeroizing::new(Vec::new());
            while let Some(frame) = reader.next_frame().map_err(format)? {
                match frame {
                    Frame::Blocks {
                        lba,
                        dek_version,
                        writer,
                        nonce,
                        tags,
                        ciphertext,
                    } => {
                        check.mapped_blocks += tags.len() as u64;
                        let Some(opener) = &opener else {
                            continue;
                        };
                        plain.clear();
                        plain.extend_from_slice(&ciphertext);
                        let bs = header.block_size as usize;
                        let cipher = opener.cipher(&name, dek_version, writer)?;
                        for (k, tag) in tags.iter().enumerate() {
                            let block = &mut plain[k * bs..(k + 1) * bs];
                            let at = lba + k as u64;
                            cipher
                                .open_in_place(
                                    Lba(at),
                                    &nonce_for(nonce + k as u64),
                                    &Tag(*tag),
                                    block,
                                )
                                .map_err(|_| BackupError::Block {
                                    file: name.clone(),
                                    lba: at,
                                })?;
                        }
                        check.blocks_authenticated += tags.len() as u64;
                        apply(
                            &header,
                            ChainItem::Blocks {
                                lba,
                                plaintext: &plain,
                            },
                        )?;
                    }
                    Frame::Unmapped { lba, count } => {
                        apply(&header, ChainItem::Unmapped { lba, count })?;
                    }
                }
            }
            check.bytes += reader.offset();
            if let Some(opener) = &opener {
                let trailer = reader.trailer().copied().ok_or_else(|| {
                    format(BackupFormatError::Truncated {
                        offset: reader.offset(),
                        what: "trailer",
                    })
                })?;
                if !opener
                    .key
                    .get()
                    .verify_mac(&opener.id, &trailer.mac_input(), &trailer.mac)
                {
                    return Err(BackupError::Authentication { file: name });
                }
            }
            check.headers.push(header);
        }
        Ok(check)
    }

    /// The keys that open the blocks of the backup `header` describes.
    fn opener<'k>(
        &self,
        file: &str,
        header: &BackupHeader,
        keys: BackupKeys<'k>,
    ) -> Result<Opener<'k>, BackupError> {
        let id = BackupId::from_bytes(header.backup_id);
        let no_key = || BackupError::NoKey {
            file: file.to_owned(),
            id,
            tenant: header.tenant.clone(),
        };
        let tenant = TenantId::new(&header.tenant).map_err(|_| no_key())?;
        let key = match keys {
            BackupKeys::Bundle(bundle) => {
                if bundle.tenant != tenant {
                    return Err(no_key());
                }
                KeyHold::Borrowed(bundle.backup_key(&id).ok_or_else(no_key)?)
            }
            _ => {
                if self
                    .meta
                    .get(&record::backup_key_key(&tenant, id.as_bytes()))
                    .map_err(AdminError::from)?
                    .is_none()
                {
                    return Err(no_key());
                }
                let kek = match self.admin_kek(&tenant) {
                    Ok(kek) => kek,
                    Err(AdminError::NoSuchTenant { .. }) => return Err(no_key()),
                    Err(e) => return Err(e.into()),
                };
                KeyHold::Owned(self.unwrap_backup_key(&kek, &tenant, &id)?)
            }
        };
        let volume = VolumeId::new(&header.volume).map_err(|_| BackupError::Chain {
            file: file.to_owned(),
            problem: format!("volume name {:?} is not valid", header.volume),
        })?;
        let mut deks = BTreeMap::new();
        for d in &header.deks {
            let dek = key
                .get()
                .unwrap_dek(&id, KeyVersion(d.version), &d.wrapped)
                .map_err(|source| BackupError::Key {
                    file: file.to_owned(),
                    source,
                })?;
            deks.insert(d.version, dek);
        }
        let writers = header
            .writers
            .iter()
            .map(|w| (w.number, (w.dek_version, w.salt)))
            .collect();
        Ok(Opener {
            id,
            key,
            tenant,
            volume,
            deks,
            writers,
            ciphers: std::cell::RefCell::new(BTreeMap::new()),
        })
    }

    /// The KEK of `tenant` under the current master key.
    fn admin_kek(&self, tenant: &TenantId) -> Result<TenantKek, AdminError> {
        let master = self.read_master();
        let record = self
            .tenant_record(tenant)?
            .ok_or_else(|| AdminError::NoSuchTenant {
                tenant: tenant.clone(),
            })?;
        Ok(self.kek(&master, tenant, &record))
    }

    fn unwrap_backup_key(
        &self,
        kek: &TenantKek,
        tenant: &TenantId,
        id: &BackupId,
    ) -> Result<BackupKey, AdminError> {
        let bytes = self
            .meta
            .get(&record::backup_key_key(tenant, id.as_bytes()))?
            .ok_or_else(|| AdminError::Corrupt {
                what: format!("backup key {id} of tenant {tenant} vanished"),
            })?;
        let r = BackupKeyRecord::decode(&bytes).map_err(|e| AdminError::Corrupt { what: e.0 })?;
        kek.unwrap_backup_key(id, &r.wrapped)
            .map_err(|_| AdminError::KeyUnwrap {
                tenant: tenant.clone(),
                volume: VolumeId::new(&r.volume)
                    .unwrap_or_else(|_| VolumeId::new("unknown").expect("a valid volume name")),
            })
    }

    /// Adds to `batch` every backup key of `tenant` rewrapped from `old` to
    /// `new` (key rotations); returns how many.
    pub(super) fn rewrap_backup_keys(
        &self,
        tenant: &TenantId,
        old: &TenantKek,
        new: &TenantKek,
        batch: &mut Batch,
    ) -> Result<usize, AdminError> {
        let mut n = 0;
        for info in self.backup_keys(Some(tenant))? {
            let key = self.unwrap_backup_key(old, tenant, &info.id)?;
            let k = record::backup_key_key(tenant, info.id.as_bytes());
            let bytes = self.meta.get(&k)?.unwrap_or_default();
            let mut r =
                BackupKeyRecord::decode(&bytes).map_err(|e| AdminError::Corrupt { what: e.0 })?;
            r.wrapped = new.wrap_backup_key(&info.id, &key)?.to_vec();
            batch.put(k, r.encode());
            n += 1;
        }
        Ok(n)
    }

    /// Creates the restore target with its restore marker, in one commit.
    fn create_restoring_volume(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        size: u64,
        block_size: BlockSize,
    ) -> Result<(), BackupError> {
        self.create_volume_marked(
            tenant,
            volume,
            size,
            VolumeOptions { block_size },
            Some(record::restore_marker_key(tenant, volume)),
        )
        .map_err(create_failed)?;
        Ok(())
    }

    fn finish_restore(&self, tenant: &TenantId, volume: &VolumeId) -> Result<(), BackupError> {
        let mut batch = Batch::new();
        batch.delete(record::restore_marker_key(tenant, volume));
        self.meta.commit(&batch).map_err(AdminError::from)?;
        Ok(())
    }

    /// Removes what a failed restore made (best effort: a store opened later
    /// finishes it from the marker).
    fn abandon_restore(&self, tenant: &TenantId, volume: &VolumeId, created_tenant: bool) {
        let removed = self
            .delete_volume(tenant, volume)
            .or_else(|e| match e {
                AdminError::NoSuchVolume { .. } => Ok(()),
                e => Err(e),
            })
            .and_then(|()| {
                let mut batch = Batch::new();
                batch.delete(record::restore_marker_key(tenant, volume));
                self.meta.commit(&batch).map_err(AdminError::from)
            })
            .and_then(|()| {
                if created_tenant {
                    self.delete_tenant(tenant)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = removed {
            tracing::warn!(tenant = %tenant, volume = %volume, error = %crate::error::error_chain(&e), "could not remove a failed restore; the next open of the store does");
        }
    }
}

/// What [`Store::drill`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrillReport {
    /// Each volume found, with its newest chain's outcome.
    pub volumes: Vec<DrillVolume>,
    /// Files that are not readable backups, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// One volume of a [`DrillReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrillVolume {
    /// The tenant backed up.
    pub tenant: String,
    /// The volume backed up.
    pub volume: String,
    /// The newest chain: a full backup, then incrementals.
    pub files: Vec<PathBuf>,
    /// The snapshot the chain restores to.
    pub snapshot: String,
    /// Blocks restored and authenticated.
    pub blocks: u64,
    /// Why the drill failed for this volume.
    pub error: Option<String>,
}

/// The newest backup of `backups` (sorted by snapshot epoch) and the files
/// back to its full backup, oldest first.
fn newest_chain(backups: &[(BackupHeader, PathBuf)]) -> Vec<(BackupHeader, PathBuf)> {
    let mut chain = Vec::new();
    let Some(newest) = backups.last() else {
        return chain;
    };
    chain.push(newest.clone());
    while let Some((h, _)) = chain.last() {
        if h.kind == BackupKind::Full {
            break;
        }
        let base = h.base_snapshot_uid;
        // A full backup of the base first, else the newest incremental to it.
        let prev = backups
            .iter()
            .filter(|(b, _)| b.snapshot_uid == base)
            .max_by_key(|(b, _)| (b.kind == BackupKind::Full, b.created));
        match prev {
            Some(p) => chain.push(p.clone()),
            None => break,
        }
    }
    chain.reverse();
    chain
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// One thing a chain of backup files holds, handed to a reader's `apply`.
enum ChainItem<'a> {
    /// A file begins (its header is the one passed).
    Header,
    /// Opened blocks from `lba` on.
    Blocks { lba: u64, plaintext: &'a [u8] },
    /// Blocks that read as zeros from here on.
    Unmapped { lba: u64, count: u64 },
}

/// A backup key, unwrapped here or lent by a bundle.
enum KeyHold<'a> {
    Owned(BackupKey),
    Borrowed(&'a BackupKey),
}

impl KeyHold<'_> {
    fn get(&self) -> &BackupKey {
        match self {
            KeyHold::Owned(k) => k,
            KeyHold::Borrowed(k) => k,
        }
    }
}

/// The keys of one backup file.
struct Opener<'a> {
    id: BackupId,
    key: KeyHold<'a>,
    tenant: TenantId,
    volume: VolumeId,
    deks: BTreeMap<u32, DataKey>,
    writers: BTreeMap<u32, (u32, [u8; 32])>,
    ciphers: std::cell::RefCell<BTreeMap<(u32, u32), std::rc::Rc<BlockCipher>>>,
}

impl Opener<'_> {
    fn cipher(
        &self,
        file: &str,
        dek_version: u32,
        writer: u32,
    ) -> Result<std::rc::Rc<BlockCipher>, BackupError> {
        if let Some(c) = self.ciphers.borrow().get(&(dek_version, writer)) {
            return Ok(c.clone());
        }
        let unknown = || BackupError::Chain {
            file: file.to_owned(),
            problem: format!(
                "blocks name writer {writer} of data key v{dek_version}, which the file does not carry"
            ),
        };
        let dek = self.deks.get(&dek_version).ok_or_else(unknown)?;
        let cipher = if writer == 0 {
            BlockCipher::new(&self.tenant, &self.volume, dek)
        } else {
            let &(v, salt) = self.writers.get(&writer).ok_or_else(unknown)?;
            if v != dek_version {
                return Err(unknown());
            }
            BlockCipher::new(
                &self.tenant,
                &self.volume,
                &dek.derive_writer_key(writer, &salt),
            )
        };
        let cipher = std::rc::Rc::new(cipher);
        self.ciphers
            .borrow_mut()
            .insert((dek_version, writer), cipher.clone());
        Ok(cipher)
    }
}

/// Checks that `next` continues the chain `prev` ends.
fn chain_fits(file: &str, prev: &BackupHeader, next: &BackupHeader) -> Result<(), BackupError> {
    let problem = if next.kind != BackupKind::Incremental {
        Some("only incremental backups may follow the first file of a chain".to_owned())
    } else if (next.tenant.as_str(), next.volume.as_str())
        != (prev.tenant.as_str(), prev.volume.as_str())
    {
        Some(format!(
            "it is a backup of {}/{}, the chain's files are of {}/{}",
            next.tenant, next.volume, prev.tenant, prev.volume
        ))
    } else if next.base_snapshot_uid != prev.snapshot_uid {
        Some(format!(
            "its base is not snapshot {} the previous file holds: files are out of order or one is missing",
            prev.snapshot_name
        ))
    } else if next.block_size != prev.block_size {
        Some("its block size differs from the previous file's".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(BackupError::Chain {
            file: file.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// The runs of blocks mapped in `before` and not in `after` (both sorted and
/// non-overlapping), as `(first block, count)`.
fn unmapped_since(before: &[Extent], after: &[Extent]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut j = 0usize;
    for e in before {
        let mut pos = e.lba;
        let end = e.last() + 1;
        while pos < end {
            while j < after.len() && after[j].last() < pos {
                j += 1;
            }
            let next_mapped = after.get(j).map_or(end, |a| a.lba.max(pos)).min(end);
            if next_mapped > pos {
                match out.last_mut() {
                    Some((start, n)) if *start + *n == pos => *n += next_mapped - pos,
                    _ => out.push((pos, next_mapped - pos)),
                }
            }
            pos = match after.get(j) {
                Some(a) if a.lba <= next_mapped && next_mapped < end => a.last() + 1,
                _ => end,
            };
        }
    }
    out
}

fn decode_backup_key(
    key: &[u8],
    value: &[u8],
) -> Result<(TenantId, BackupId, BackupKeyRecord), String> {
    let bad = || format!("backup key record {:?}", String::from_utf8_lossy(key));
    let rest = key.get(1..).ok_or_else(bad)?;
    let zero = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
    let tenant = std::str::from_utf8(&rest[..zero])
        .ok()
        .and_then(|n| TenantId::new(n).ok())
        .ok_or_else(bad)?;
    let id: [u8; 16] = rest[zero + 1..].try_into().map_err(|_| bad())?;
    let record = BackupKeyRecord::decode(value).map_err(|_| bad())?;
    Ok((tenant, BackupId::from_bytes(id), record))
}

fn missing(what: String) -> BackupError {
    BackupError::Volume(VolumeError::Corrupt {
        what: format!("the volume holds no {what}, which its snapshot names"),
    })
}

fn create_failed(e: CreateError) -> BackupError {
    BackupError::Admin(AdminError::Corrupt {
        what: format!("creating the restore target failed: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(lba: u64, n: usize) -> Extent {
        Extent {
            lba,
            segment: 0,
            offset: 0,
            dek_version: 1,
            writer: 1,
            nonce: 0,
            birth: 0,
            tags: vec![[0; 16]; n],
        }
    }

    #[test]
    fn unmapped_since_finds_the_holes_the_newer_view_made() {
        let before = [ext(0, 10), ext(20, 5)];
        let after = [ext(2, 3), ext(8, 4), ext(21, 1)];
        assert_eq!(
            unmapped_since(&before, &after),
            vec![(0, 2), (5, 3), (20, 1), (22, 3)]
        );
        assert_eq!(unmapped_since(&before, &before), vec![]);
        assert_eq!(unmapped_since(&before, &[]), vec![(0, 10), (20, 5)]);
        assert_eq!(unmapped_since(&[], &after), vec![]);
    }
}
