//! The store: one directory holding a deployment's tenants, volumes and their data.
//!
//! Layout of a store directory (byte tables in `docs/FORMAT.md`):
//!
//! ```text
//! <dir>/blockseal.lock   exclusive lock while a Store is open (std File::try_lock)
//! <dir>/FORMAT           16-byte header: magic, format version, metadata backend
//! <dir>/COMMITS          the commit marker (module `marker`)
//! <dir>/meta/            the metadata store (sled or redb)
//! <dir>/segments/        segment data (through the SegmentStore trait only)
//! ```
//!
//! Directories are created 0700 and files 0600, whatever the umask. Opening
//! refuses metadata that is missing or older than the commit marker, and segment
//! data of volumes the metadata never allocated, before serving anything; then
//! checks the master key against the recorded key id and check value before
//! anything else is read. This module must never store a key unwrapped
//! other than the tenant seeds (which need the master key to be of any use) and
//! never log key material.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockseal_keys::{
    AuditKey, CheckValue, DataKey, DeploymentSalt, KeyId, KeyVersion, MasterKey, TenantId,
    TenantKek, TenantSeed, VolumeId, WrappedKey,
};
use zeroize::Zeroizing;

use crate::block::BlockSize;
use crate::compactor::{self, Compactor, CompactorConfig, OpenVolumes};
use crate::error::{CreateError, OpenError, QueryError, VolumeError};
use crate::flusher::Flusher;
use crate::marker::{self, MARKER_FILE, Marker, Sequenced};
use crate::meta::{self, BackendKind, Batch, MetaStore};
use crate::record::{self, Extent, HeaderRecord, TenantRecord, VolumeRecord, WriterRecord};
use crate::rekeyer::{Rekeyer, RekeyerConfig};
use crate::segment::{FileSegments, ObjectSegments, SegmentStore};
use crate::stats::{LatencyHistogram, LatencySnapshot};
use crate::volume::IndexBudget;
use crate::volume::{Closed, CompactionReport, RekeyParts, Volume, VolumeParts};

pub use crate::record::TenantState;
pub use admin::{MasterRotation, ShredReport, VolumeUsage};
pub use audit::{AuditEntry, AuditRecord, AuditVerification, MAX_AUDIT_ENTRY_BYTES};
pub use backup::{
    BackupCheck, BackupError, BackupKeyInfo, BackupKeys, BackupReport, DrillReport, DrillVolume,
};
pub use catalog::{
    CATALOG_HEADER_LEN, CatalogError, CatalogFramed, CatalogFraming, CatalogHeader, CatalogReport,
    rebuild_store,
};
pub use rotation::{DataKeyRotation, RotateError};
pub(crate) use rotation::{HeldForJobs, commit_rotation, lock_held};
pub use snapshot::{MAX_SNAPSHOT_NAME, SnapshotReader, check_snapshot_name};

mod admin;
mod audit;
mod backup;
mod catalog;
mod rotation;
mod snapshot;

/// The store format this build writes and the newest it reads. Version 2 added
/// writer keys (extent records of version 2, writer records, the commit marker);
/// version 3 keeps block mappings in pages of 40 LBAs instead of one record per
/// extent; version 4 adds the mapping journal (records a build before it would
/// not read, so it must refuse the store). An older store is upgraded in place when this build opens it (its
/// format file first, so that an older build refuses it from then on instead of
/// misreading its new records, then its extent records move into pages).
pub const FORMAT_VERSION: u32 = 4;

/// The largest volume: 2^63 - 1 bytes rounded down to 64 KiB, so that every
/// offset fits the signed 64-bit sizes of NBD clients and the kernel.
pub const MAX_VOLUME_BYTES: u64 = (i64::MAX as u64) & !0xffff;

const MAGIC: &[u8; 8] = b"BLKSEAL\n";
const LOCK_FILE: &str = "blockseal.lock";
const FORMAT_FILE: &str = "FORMAT";
const META_DIR: &str = "meta";
const SEGMENTS_DIR: &str = "segments";

/// How to create or open a [`Store`].
#[derive(Clone)]
pub struct StoreOptions {
    backend: BackendKind,
    segment_bytes: u64,
    overlay_blocks: usize,
    meta_store: Option<Arc<dyn MetaStore>>,
    segment_store: Option<Arc<dyn SegmentStore>>,
    object_storage: Option<(Arc<dyn object_store::ObjectStore>, String)>,
    compaction_threshold: f64,
    background_compaction: bool,
    compaction_rate: u64,
    compaction_interval: Duration,
    space_reserve: u64,
    writer_nonce_limit: Option<u64>,
    journal_min_runs: usize,
    index_memory: usize,
    reencrypt_rate: u64,
    background_reencryption: bool,
}

impl StoreOptions {
    /// Default segment size: 64 MiB.
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
    /// Default bound of a volume's mapping overlay: 65536 blocks (256 MiB of 4 KiB
    /// writes) before a write triggers a flush.
    pub const DEFAULT_OVERLAY_BLOCKS: usize = 1 << 16;
    /// Default compaction threshold: a sealed segment less than half live is
    /// compacted, which bounds segment space at about twice the live data.
    pub const DEFAULT_COMPACTION_THRESHOLD: f64 = 0.5;
    /// Default background compaction rate: 64 MiB of copied blocks per second.
    pub const DEFAULT_COMPACTION_RATE: u64 = 64 << 20;
    /// Default interval of the background thread's check of every open volume,
    /// besides the checks flushes trigger.
    pub const DEFAULT_COMPACTION_INTERVAL: Duration = Duration::from_secs(10);
    /// Default memory all open volumes' extent indexes may hold together:
    /// 512 MiB, the mappings of about 13 GiB written in scattered 4 KiB blocks
    /// or 120 GiB written sequentially.
    pub const DEFAULT_INDEX_MEMORY: usize = 512 << 20;
    /// Default background re-encryption rate after a data key rotation:
    /// 32 MiB of blocks per second.
    pub const DEFAULT_REENCRYPT_RATE: u64 = 32 << 20;

    /// Defaults: redb metadata, 64 MiB segments in files under the store directory.
    pub fn new() -> StoreOptions {
        StoreOptions {
            backend: BackendKind::Redb,
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            overlay_blocks: Self::DEFAULT_OVERLAY_BLOCKS,
            meta_store: None,
            segment_store: None,
            object_storage: None,
            compaction_threshold: Self::DEFAULT_COMPACTION_THRESHOLD,
            background_compaction: true,
            compaction_rate: Self::DEFAULT_COMPACTION_RATE,
            compaction_interval: Self::DEFAULT_COMPACTION_INTERVAL,
            space_reserve: FileSegments::DEFAULT_RESERVE,
            writer_nonce_limit: None,
            journal_min_runs: crate::volume::JOURNAL_MIN_RUNS,
            index_memory: Self::DEFAULT_INDEX_MEMORY,
            reencrypt_rate: Self::DEFAULT_REENCRYPT_RATE,
            background_reencryption: true,
        }
    }

    /// The most bytes per second background re-encryption seals after a data
    /// key rotation (`u64::MAX`: no limit). Paced like compaction: a quarter
    /// of it while the volume serves 1,000 requests a second or more.
    pub fn reencrypt_rate(mut self, bytes_per_second: u64) -> StoreOptions {
        self.reencrypt_rate = bytes_per_second.max(1);
        self
    }

    /// Whether open volumes are re-encrypted in the background after a data
    /// key rotation (default: yes). Without it only [`Store::reencrypt_now`]
    /// and [`Volume::reencrypt_now`] do; automatic rotations happen either way.
    pub fn background_reencryption(mut self, enabled: bool) -> StoreOptions {
        self.background_reencryption = enabled;
        self
    }

    /// The most memory the open volumes' in-memory extent indexes hold
    /// together. A volume whose index does not fit reads its mappings from the
    /// metadata store (slower reads, same results); the budget moves to the
    /// volumes being read. `0` keeps every mapping in the store only.
    pub fn index_memory(mut self, bytes: usize) -> StoreOptions {
        self.index_memory = bytes;
        self
    }

    /// The metadata backend of a new store. An existing store always opens with
    /// the backend recorded in its header.
    pub fn backend(mut self, backend: BackendKind) -> StoreOptions {
        self.backend = backend;
        self
    }

    /// The size of new segments, in bytes (rounded down to whole blocks).
    pub fn segment_bytes(mut self, bytes: u64) -> StoreOptions {
        self.segment_bytes = bytes;
        self
    }

    /// How many uncommitted block mappings a volume keeps in memory before a
    /// write flushes.
    pub fn overlay_blocks(mut self, blocks: usize) -> StoreOptions {
        self.overlay_blocks = blocks;
        self
    }

    /// Keeps metadata in `store` instead of the store directory (another backend,
    /// or a test store). The caller must pass the same store on every open.
    pub fn metadata_store(mut self, store: Arc<dyn MetaStore>) -> StoreOptions {
        self.meta_store = Some(store);
        self
    }

    /// Keeps the store's metadata (SlateDB, at `<prefix>/meta`) and segments
    /// (objects under `<prefix>/segments`) in an object store, such as an S3
    /// bucket ([`crate::object::s3`]); the store directory keeps its header,
    /// lock and commit marker. Recorded when the store is created: every open
    /// must name the same store and prefix. Overrides
    /// [`backend`](Self::backend).
    pub fn object_storage(
        mut self,
        store: Arc<dyn object_store::ObjectStore>,
        prefix: impl Into<String>,
    ) -> StoreOptions {
        let prefix = prefix.into().trim_end_matches('/').to_owned();
        self.object_storage = Some((store, prefix));
        self
    }

    /// Keeps segments in `store` instead of files under the store directory.
    pub fn segment_store(mut self, store: Arc<dyn SegmentStore>) -> StoreOptions {
        self.segment_store = Some(store);
        self
    }

    /// Compacts a sealed segment when fewer than this fraction of its blocks are
    /// live (clamped to `0.0..=1.0`; `0.0` only deletes segments with no live
    /// block). Segment space stays near `1 / threshold` times the live data.
    pub fn compaction_threshold(mut self, fraction: f64) -> StoreOptions {
        self.compaction_threshold = if fraction.is_nan() {
            Self::DEFAULT_COMPACTION_THRESHOLD
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Whether a background thread compacts open volumes (default: yes). Without
    /// it, only [`Store::compact_now`] and [`Volume::compact_now`] compact.
    pub fn background_compaction(mut self, enabled: bool) -> StoreOptions {
        self.background_compaction = enabled;
        self
    }

    /// The most bytes per second background compaction copies (`u64::MAX`: no
    /// limit). Foreground I/O keeps the rest of the device.
    pub fn compaction_rate(mut self, bytes_per_second: u64) -> StoreOptions {
        self.compaction_rate = bytes_per_second.max(1);
        self
    }

    /// Free space on the segment file system that writes leave for metadata
    /// commits (default 64 MiB): a write that would eat into it fails with
    /// [`ErrorKind::NoSpace`](crate::ErrorKind::NoSpace) while flushes go on
    /// committing. Only for segments kept as files under the store directory.
    pub fn space_reserve(mut self, bytes: u64) -> StoreOptions {
        self.space_reserve = bytes;
        self
    }

    /// Lowers the number of blocks one writer key seals before the volume makes
    /// a new one (default: [`nonce::default_limit`](crate::nonce::default_limit)).
    /// For tests of writer turnover only; a limit can only be lowered.
    #[doc(hidden)]
    pub fn danger_writer_nonce_limit(mut self, blocks: u64) -> StoreOptions {
        self.writer_nonce_limit = Some(blocks.max(1));
        self
    }

    /// Lowers the runs of nearby mapping pages a commit must touch to go into
    /// the mapping journal (default 4; see `volume/journal.rs`), so that the
    /// small volumes of tests journal. For tests only.
    #[doc(hidden)]
    pub fn danger_journal_min_runs(mut self, runs: usize) -> StoreOptions {
        self.journal_min_runs = runs.max(1);
        self
    }

    /// How often the background thread checks every open volume even when no
    /// flush reported dead space.
    pub fn compaction_interval(mut self, interval: Duration) -> StoreOptions {
        self.compaction_interval = interval;
        self
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("backend", &self.backend)
            .field("segment_bytes", &self.segment_bytes)
            .field("overlay_blocks", &self.overlay_blocks)
            .field("custom_metadata_store", &self.meta_store.is_some())
            .field("custom_segment_store", &self.segment_store.is_some())
            .field(
                "object_storage",
                &self
                    .object_storage
                    .as_ref()
                    .map(|(store, prefix)| format!("{store}/{prefix}")),
            )
            .field("compaction_threshold", &self.compaction_threshold)
            .field("background_compaction", &self.background_compaction)
            .field("compaction_rate", &self.compaction_rate)
            .field("compaction_interval", &self.compaction_interval)
            .field("space_reserve", &self.space_reserve)
            .field("index_memory", &self.index_memory)
            .field("reencrypt_rate", &self.reencrypt_rate)
            .field("background_reencryption", &self.background_reencryption)
            .finish()
    }
}

/// How to create a volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct VolumeOptions {
    /// The volume's block size (the unit of sealing).
    pub block_size: BlockSize,
}

/// What the store knows about a tenant (never its secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantInfo {
    /// The tenant.
    pub id: TenantId,
    /// Its current KEK version.
    pub kek_version: KeyVersion,
    /// Its lifecycle state.
    pub state: TenantState,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

/// What the store knows about a volume (never its keys).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VolumeInfo {
    /// The owning tenant.
    pub tenant: TenantId,
    /// The volume.
    pub id: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// Block size.
    pub block_size: BlockSize,
    /// The DEK version new writes seal with.
    pub active_dek: KeyVersion,
    /// Every DEK version the volume holds a wrapped key for.
    pub dek_versions: Vec<KeyVersion>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Last change of the volume record, seconds since the Unix epoch.
    pub updated: u64,
}

/// What [`Store::danger_accept_metadata_loss`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Commits the marker recorded that the metadata no longer holds.
    pub commits_lost: u64,
    /// Extent records dropped because no writer record opens their blocks.
    pub extents_dropped: u64,
    /// Segment live counts rewritten to match the remaining extents.
    pub live_counts_fixed: u64,
    /// Volumes the metadata does not know whose segments moved to `lost/`.
    pub orphan_volumes: u64,
    /// Volume records dropped because they did not decode (their keys, and so
    /// their data, were lost with them).
    pub volumes_dropped: u64,
}

/// An open store. One process (and one `Store`) may hold a store open at a time.
///
/// Unless disabled in [`StoreOptions::background_compaction`], the store owns a
/// thread that compacts its open volumes; dropping the store stops it.
pub struct Store {
    // Dropped first: the re-encryption, compaction and flush threads stop
    // before anything else goes.
    rekeyer: Rekeyer,
    /// Volumes kept open for their unfinished re-encryption job.
    held: rotation::HeldForJobs,
    compactor: Option<Compactor>,
    flusher: Flusher,
    index_budget: Arc<IndexBudget>,
    dir: PathBuf,
    meta: Arc<dyn MetaStore>,
    /// How long the metadata store's group commits take.
    commit_latency: Arc<LatencyHistogram>,
    /// How long flushes take to sync their volume's segments.
    sync_latency: Arc<LatencyHistogram>,
    segments: Arc<dyn SegmentStore>,
    /// The same segment store, through which segment deletions can be held
    /// off (while a catalogue's segments are linked).
    holding: Arc<catalog::Holding>,
    /// The master key. Held shared by whoever reads a tenant record and a
    /// volume record to unwrap keys (so the two match), exclusively by a
    /// commit that rewraps keys and by the swap after a master key rotation:
    /// a reader never sees records of one key generation with the other.
    master: RwLock<MasterKey>,
    salt: DeploymentSalt,
    options: StoreOptions,
    /// Open volumes, so a second open shares the first instance (and so the
    /// compaction thread finds them).
    open: OpenVolumes,
    /// Per volume, the gate its latest instance opens when it has finished
    /// closing (see [`Closed`]).
    closing: Mutex<HashMap<(TenantId, VolumeId), Arc<Closed>>>,
    /// Per volume being opened, a gate opened when that open has finished (and
    /// registered the instance, or failed).
    opening: Mutex<HashMap<(TenantId, VolumeId), Arc<Closed>>>,
    /// Serializes tenant and volume creation and every change of a volume
    /// record (read-check-write of records), admin operations included.
    /// Shared with open volumes, whose re-encryption and automatic rotations
    /// change their records. Taken before `audit` and `master`.
    admin: Arc<Mutex<()>>,
    /// Serializes audit appends; holds the audit key once it was unwrapped.
    audit: Mutex<Option<AuditKey>>,
    // Dropped last: the lock outlives every other handle on the directory.
    _lock: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("backend", &self.meta.backend())
            .field("master_key", &self.read_master().id())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Creates a new store in `dir` (created if missing; it must hold no store),
    /// recognising `master` as its master key from now on.
    pub fn create(
        dir: impl AsRef<Path>,
        master: MasterKey,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let dir = dir.as_ref().to_path_buf();
        create_private_dir(&dir)?;
        let lock = lock_store(&dir)?;
        if dir.join(FORMAT_FILE).exists() {
            return Err(OpenError::AlreadyExists { path: dir });
        }
        if unfinished_create(&dir) {
            set_aside_unfinished_create(&dir)?;
        }
        check_no_store_data(&dir)?;
        let in_bucket = options.object_storage.is_some();
        let backend = if in_bucket {
            BackendKind::SlateDb
        } else {
            options.backend
        };
        let raw = open_meta(&dir, backend, &options)?;
        if in_bucket && raw.get(record::HEADER_KEY)?.is_some() {
            // Another store's metadata lives at this prefix.
            return Err(OpenError::AlreadyExists {
                path: PathBuf::from(object_prefix(&options)),
            });
        }
        let sequenced = Arc::new(Sequenced::new(&dir, raw, 0).map_err(io_error(&dir))?);
        let commit_latency = sequenced.latency();
        let meta: Arc<dyn MetaStore> = sequenced;
        let salt = DeploymentSalt::generate()?;
        let header = HeaderRecord {
            salt: *salt.as_bytes(),
            master_key_id: *master.id().as_bytes(),
            check_value: *master.check_value().as_bytes(),
            created: now(),
        };
        let mut batch = Batch::new();
        batch.put(record::HEADER_KEY, header.encode());
        batch.put(record::NEXT_VOLUME_KEY, record::encode_u64(1).to_vec());
        meta.commit(&batch)?;
        // The header file goes last: a directory without it is not a store yet.
        write_format_file(&dir, backend, in_bucket)?;
        tracing::info!(dir = %dir.display(), ?backend, master_key = %master.id(), "store created");
        Store::start(dir, lock, meta, commit_latency, master, salt, options)
    }

    /// Opens the store in `dir` with its master key. Fails with
    /// [`OpenError::WrongMasterKey`] before reading anything but the header when
    /// `master` is not the key the store was created with.
    pub fn open(
        dir: impl AsRef<Path>,
        master: MasterKey,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        Store::open_checked(dir.as_ref(), master, options, false).map(|(store, _)| store)
    }

    /// Opens a store kept in object storage ([`StoreOptions::object_storage`])
    /// on a host whose directory `dir` does not hold it yet: the directory is
    /// made (header file and commit marker, from what the bucket holds), then
    /// the store opens as with [`Store::open`], fencing any other host that
    /// still has it open. A directory that holds the store already just opens.
    /// This is how a host takes over a store another host served (a cluster's
    /// shard). Fails with [`OpenError::NotAStore`] when the bucket holds no
    /// store at that prefix.
    pub fn attach(
        dir: impl AsRef<Path>,
        master: MasterKey,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let dir = dir.as_ref();
        if options.object_storage.is_none() {
            return Err(OpenError::ObjectStorageMismatch {
                path: dir.to_path_buf(),
                where_: "in its directory",
            });
        }
        if !dir.join(FORMAT_FILE).exists() {
            create_private_dir(dir)?;
            let _lock = lock_store(dir)?;
            if !dir.join(FORMAT_FILE).exists() {
                let raw = open_meta(dir, BackendKind::SlateDb, &options)?;
                if raw.get(record::HEADER_KEY)?.is_none() {
                    return Err(OpenError::NotAStore {
                        path: PathBuf::from(object_prefix(&options)),
                    });
                }
                let sequence = marker::metadata_sequence(raw.as_ref())?.unwrap_or(0);
                // Only a marker missing is written here: one left by an
                // earlier hold of this store is checked by the open below.
                if matches!(
                    marker::read(dir).map_err(io_error(&dir.join(MARKER_FILE)))?,
                    Marker::Missing
                ) {
                    drop(Sequenced::new(dir, raw, sequence).map_err(io_error(dir))?);
                }
                write_format_file(dir, BackendKind::SlateDb, true)?;
            }
        }
        Store::open(dir, master, options)
    }

    /// Opens a store whose metadata lost commits it had acknowledged, accepting
    /// the loss: what [`Store::open`] refuses with
    /// [`OpenError::MetadataRolledBack`] or [`OpenError::MarkerDamaged`]. Every
    /// volume's mappings are made consistent again (extents of writers the
    /// metadata has no record of are dropped, live counts recounted), segment
    /// directories of volumes the metadata never allocated are moved to
    /// `<dir>/lost/`, and the commit marker is reset to the metadata.
    ///
    /// Blocks whose mappings were lost read as zeros afterwards: run this only
    /// after trying to restore the metadata from a backup (`docs/OPERATIONS.md`).
    pub fn danger_accept_metadata_loss(
        dir: impl AsRef<Path>,
        master: MasterKey,
        options: StoreOptions,
    ) -> Result<(Store, RecoveryReport), OpenError> {
        Store::open_checked(dir.as_ref(), master, options, true)
    }

    fn open_checked(
        dir: &Path,
        master: MasterKey,
        options: StoreOptions,
        accept_loss: bool,
    ) -> Result<(Store, RecoveryReport), OpenError> {
        let dir = dir.to_path_buf();
        if !dir.join(FORMAT_FILE).exists() {
            // An unfinished create (it never got to write FORMAT) is no store
            // yet; creating one there starts over.
            if !unfinished_create(&dir) {
                check_no_store_data(&dir)?;
            }
            return Err(OpenError::NotAStore { path: dir });
        }
        let lock = lock_store(&dir)?;
        let (backend, version, in_bucket) = read_format_file(&dir)?;
        warn_if_open_to_others(&dir);
        if in_bucket != options.object_storage.is_some() {
            return Err(OpenError::ObjectStorageMismatch {
                path: dir,
                where_: if in_bucket {
                    "in object storage"
                } else {
                    "in its directory"
                },
            });
        }
        if options.meta_store.is_none() && !in_bucket && !meta::exists(backend, &dir.join(META_DIR))
        {
            return Err(OpenError::MetadataMissing {
                path: meta::data_path(backend, &dir.join(META_DIR)),
            });
        }
        let raw = open_meta(&dir, backend, &options)?;
        let sequence = marker::metadata_sequence(raw.as_ref())?;
        let mut report = RecoveryReport::default();
        match marker::read(&dir).map_err(io_error(&dir.join(MARKER_FILE)))? {
            Marker::At(recorded) if recorded > sequence.unwrap_or(0) => {
                if !accept_loss {
                    return Err(OpenError::MetadataRolledBack {
                        path: dir,
                        metadata: sequence.unwrap_or(0),
                        recorded,
                    });
                }
                report.commits_lost = recorded - sequence.unwrap_or(0);
            }
            Marker::Damaged if !accept_loss => {
                return Err(OpenError::MarkerDamaged {
                    path: dir.join(MARKER_FILE),
                });
            }
            // Metadata that counted its commits had a marker beside it: losing
            // it alone would switch the rollback check off. (A store made before
            // markers has neither, and gets its first marker now.)
            Marker::Missing if sequence.is_some() && !accept_loss => {
                return Err(OpenError::MarkerMissing {
                    path: dir.join(MARKER_FILE),
                });
            }
            _ => {}
        }
        let header = raw
            .get(record::HEADER_KEY)?
            .ok_or_else(|| OpenError::Corrupt {
                what: "the metadata holds no store header: it was lost or replaced".into(),
            })?;
        let header = HeaderRecord::decode(&header).map_err(|e| OpenError::Corrupt { what: e.0 })?;
        master.verify(
            KeyId::from_bytes(header.master_key_id),
            &CheckValue::from_bytes(header.check_value),
        )?;
        if options.segment_store.is_none() && !in_bucket {
            let orphans = orphan_segment_dirs(&dir, raw.as_ref())?;
            if !orphans.is_empty() && !accept_loss {
                return Err(OpenError::UnknownSegments {
                    path: dir.join(SEGMENTS_DIR),
                    volumes: orphans,
                });
            }
            report.orphan_volumes = move_aside(&dir, &orphans)?;
        }
        let sequenced =
            Arc::new(Sequenced::new(&dir, raw, sequence.unwrap_or(0)).map_err(io_error(&dir))?);
        let commit_latency = sequenced.latency();
        let meta: Arc<dyn MetaStore> = sequenced;
        if version < FORMAT_VERSION {
            write_format_file(&dir, backend, in_bucket)?;
            tracing::info!(dir = %dir.display(), from = version, to = FORMAT_VERSION, "store format upgraded");
        }
        // Run at every open, not only at the upgrade: an upgrade killed
        // half-way finishes here. A store with no per-extent record left
        // costs one empty scan.
        let moved = crate::mapping::migrate_extent_records(meta.as_ref())?;
        if moved > 0 {
            tracing::info!(dir = %dir.display(), records = moved, "extent records moved into mapping pages");
        }
        if accept_loss {
            repair_volumes(meta.as_ref(), &mut report)?;
            tracing::warn!(
                dir = %dir.display(),
                commits_lost = report.commits_lost,
                extents_dropped = report.extents_dropped,
                live_counts_fixed = report.live_counts_fixed,
                orphan_volumes = report.orphan_volumes,
                "accepted metadata loss"
            );
        }
        tracing::info!(dir = %dir.display(), ?backend, master_key = %master.id(), "store opened");
        let salt = DeploymentSalt::from_bytes(header.salt);
        let store = Store::start(dir, lock, meta, commit_latency, master, salt, options)?;
        store.resume_reencryption_jobs();
        Ok((store, report))
    }

    /// Opens the segment store and starts the background threads of a store
    /// whose header is written (create) or verified (open).
    fn start(
        dir: PathBuf,
        lock: File,
        meta: Arc<dyn MetaStore>,
        commit_latency: Arc<LatencyHistogram>,
        master: MasterKey,
        salt: DeploymentSalt,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let holding = Arc::new(catalog::Holding::new(open_segments(&dir, &options)?));
        let segments: Arc<dyn SegmentStore> = holding.clone();
        // Volumes deleted before a crash or a failure: their records are gone,
        // what they owned goes now, before anything is served.
        admin::abandon_restores(meta.as_ref())?;
        admin::finish_tombstones(meta.as_ref(), segments.as_ref())?;
        let open: OpenVolumes = Arc::new(Mutex::new(HashMap::new()));
        let index_budget = Arc::new(IndexBudget::new(options.index_memory));
        let held: rotation::HeldForJobs = Arc::default();
        let rekeyer = Rekeyer::start(
            open.clone(),
            held.clone(),
            RekeyerConfig {
                rate: options.reencrypt_rate,
                interval: options.compaction_interval,
                background: options.background_reencryption,
            },
        )
        .map_err(io_error(&dir))?;
        Ok(Store {
            rekeyer,
            held,
            compactor: start_compactor(&dir, &open, &options)?,
            flusher: Flusher::start(open.clone(), index_budget.clone()).map_err(io_error(&dir))?,
            index_budget,
            dir,
            meta,
            commit_latency,
            sync_latency: Arc::default(),
            segments,
            holding,
            master: RwLock::new(master),
            salt,
            options,
            open,
            closing: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            admin: Arc::new(Mutex::new(())),
            audit: Mutex::new(None),
            _lock: lock,
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id of the master key the store opens with now (it changes with
    /// [`Store::rotate_master`]).
    pub fn master_key_id(&self) -> KeyId {
        self.read_master().id()
    }

    /// The metadata backend in use.
    pub fn backend(&self) -> BackendKind {
        self.meta.backend()
    }

    /// How long the metadata store's commits have taken since the store was
    /// opened (a group commit serves every flush queued behind it).
    pub fn metadata_commit_latency(&self) -> LatencySnapshot {
        self.commit_latency.snapshot()
    }

    /// How long flushes have taken to sync their volume's segments since the
    /// store was opened (one sample per flush that had data to sync).
    pub fn segment_sync_latency(&self) -> LatencySnapshot {
        self.sync_latency.snapshot()
    }

    /// Compacts every open volume now, without the background throttle (see
    /// [`Volume::compact_now`]), and returns the sum of what it did.
    pub fn compact_now(&self) -> Result<CompactionReport, VolumeError> {
        compactor::compact_all(&self.open)
    }

    /// Creates a tenant with a fresh seed and KEK version 1.
    pub fn create_tenant(&self, tenant: &TenantId) -> Result<TenantInfo, CreateError> {
        let _admin = self.lock_admin();
        let key = record::tenant_key(tenant);
        if self.meta.get(&key)?.is_some() {
            return Err(CreateError::TenantExists {
                tenant: tenant.clone(),
            });
        }
        let seed = TenantSeed::generate()?;
        let record = TenantRecord {
            kek_version: KeyVersion::FIRST.0,
            seed: seed_copy(seed.expose_secret()),
            state: TenantState::Active,
            created: now(),
        };
        let mut batch = Batch::new();
        batch.put(key, record.encode().to_vec());
        let committed = self.meta.commit(&batch);
        // The batch holds the seed in the clear; leave no copy in freed memory.
        batch.wipe_values();
        committed?;
        tracing::info!(tenant = %tenant, "tenant created");
        Ok(tenant_info(tenant.clone(), &record))
    }

    /// Every tenant, in name order.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, QueryError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.meta
            .scan_prefix(record::TENANT_PREFIX, &mut |key, value| {
                let name = std::str::from_utf8(&key[1..]).ok();
                match (
                    name.and_then(|n| TenantId::new(n).ok()),
                    TenantRecord::decode(value),
                ) {
                    (Some(id), Ok(record)) => {
                        out.push(tenant_info(id, &record));
                        true
                    }
                    _ => {
                        bad = Some(format!("tenant record {:?}", String::from_utf8_lossy(key)));
                        false
                    }
                }
            })?;
        match bad {
            Some(what) => Err(QueryError::Corrupt { what }),
            None => Ok(out),
        }
    }

    /// One tenant, if it exists.
    pub fn tenant(&self, tenant: &TenantId) -> Result<Option<TenantInfo>, QueryError> {
        Ok(self
            .tenant_record(tenant)?
            .map(|record| tenant_info(tenant.clone(), &record)))
    }

    /// Creates a volume of `size` bytes (a positive multiple of the block size)
    /// with a fresh data key, stored wrapped under the tenant's KEK.
    pub fn create_volume(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        size: u64,
        options: VolumeOptions,
    ) -> Result<VolumeInfo, CreateError> {
        self.create_volume_marked(tenant, volume, size, options, None)
    }

    /// [`create_volume`](Self::create_volume), with `marker` (a restore
    /// marker) put in the same commit.
    fn create_volume_marked(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        size: u64,
        options: VolumeOptions,
        marker: Option<Vec<u8>>,
    ) -> Result<VolumeInfo, CreateError> {
        let block_size = options.block_size;
        if size > MAX_VOLUME_BYTES {
            return Err(CreateError::TooLarge {
                size,
                max: MAX_VOLUME_BYTES,
            });
        }
        if size == 0 || !size.is_multiple_of(u64::from(block_size.get())) {
            return Err(CreateError::InvalidSize {
                size,
                block_size: block_size.get(),
            });
        }
        let _admin = self.lock_admin();
        let tenant_record = self
            .tenant_record(tenant)
            .map_err(query_to_create)?
            .ok_or_else(|| CreateError::NoSuchTenant {
                tenant: tenant.clone(),
            })?;
        let key = record::volume_key(tenant, volume);
        if self.meta.get(&key)?.is_some() {
            return Err(CreateError::VolumeExists {
                tenant: tenant.clone(),
                volume: volume.clone(),
            });
        }
        let internal_id = match self.meta.get(record::NEXT_VOLUME_KEY)? {
            Some(bytes) => record::decode_u64(&bytes, "next volume id")
                .map_err(|e| CreateError::Corrupt { what: e.0 })?,
            None => 1,
        };
        let next_id = internal_id + 1;
        let internal_id = u32::try_from(internal_id).map_err(|_| CreateError::Exhausted)?;
        let kek = self.kek(&self.read_master(), tenant, &tenant_record);
        let dek = DataKey::generate(KeyVersion::FIRST)?;
        let wrapped = kek.wrap(volume, &dek)?;
        let created = now();
        let record = VolumeRecord {
            internal_id,
            size,
            block_size: block_size.get(),
            created,
            updated: created,
            active_dek: KeyVersion::FIRST.0,
            keys: vec![(KeyVersion::FIRST.0, wrapped.to_bytes())],
        };
        let mut batch = Batch::new();
        batch.put(
            record::NEXT_VOLUME_KEY,
            record::encode_u64(next_id).to_vec(),
        );
        batch.put(key, record.encode());
        if let Some(marker) = marker {
            batch.put(marker, record::encode_u64(now()).to_vec());
        }
        self.meta.commit(&batch)?;
        tracing::info!(tenant = %tenant, volume = %volume, size, "volume created");
        volume_info(tenant.clone(), volume.clone(), &record)
            .map_err(|what| CreateError::Corrupt { what })
    }

    /// A tenant's volumes, in name order.
    pub fn volumes(&self, tenant: &TenantId) -> Result<Vec<VolumeInfo>, QueryError> {
        let prefix = record::volume_prefix(tenant);
        let mut out = Vec::new();
        let mut bad = None;
        self.meta.scan_prefix(&prefix, &mut |key, value| {
            let name = std::str::from_utf8(&key[prefix.len()..]).ok();
            let info = match (
                name.and_then(|n| VolumeId::new(n).ok()),
                VolumeRecord::decode(value),
            ) {
                (Some(id), Ok(record)) => volume_info(tenant.clone(), id, &record).ok(),
                _ => None,
            };
            match info {
                Some(info) => {
                    out.push(info);
                    true
                }
                None => {
                    bad = Some(format!("volume record {:?}", String::from_utf8_lossy(key)));
                    false
                }
            }
        })?;
        match bad {
            Some(what) => Err(QueryError::Corrupt { what }),
            None => Ok(out),
        }
    }

    /// Opens a volume. While a handle is open, opening it again returns the same
    /// shared instance.
    pub fn open_volume(&self, tenant: &TenantId, volume: &VolumeId) -> Result<Volume, VolumeError> {
        match self.claim(tenant, volume) {
            Claim::Open(volume) => Ok(volume),
            Claim::Closed(opening) => self.open_claimed(tenant, volume, opening),
        }
    }

    /// The open instance of a volume, or else the right to open it: while the
    /// returned [`Opening`] lives, every other open of the volume waits. Waits
    /// first for an open in progress or a closing instance of it.
    fn claim(&self, tenant: &TenantId, volume: &VolumeId) -> Claim<'_> {
        let handle = (tenant.clone(), volume.clone());
        loop {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(inner) = open.get(&handle).and_then(Weak::upgrade) {
                return Claim::Open(Volume::from_inner(inner));
            }
            // Another thread may be opening it (reading every mapping record
            // takes a while, so that happens outside the registry lock), or
            // the last instance may still be closing (its final flush runs on
            // whichever thread dropped it): wait for either, then look again.
            let busy = self
                .lock_opening()
                .get(&handle)
                .filter(|gate| !gate.is_open())
                .cloned()
                .or_else(|| {
                    self.lock_closing()
                        .get(&handle)
                        .filter(|gate| !gate.is_open())
                        .cloned()
                });
            match busy {
                Some(gate) => {
                    drop(open);
                    gate.wait();
                }
                None => {
                    let gate = Arc::new(Closed::default());
                    self.lock_opening().insert(handle.clone(), gate.clone());
                    return Claim::Closed(Opening {
                        store: self,
                        handle,
                        gate,
                    });
                }
            }
        }
    }

    /// A volume's tenant record and volume record, or which of them is missing.
    pub(crate) fn tenant_and_volume_records(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
    ) -> Result<(TenantRecord, VolumeRecord), VolumeError> {
        let tenant_record = self
            .tenant_record(tenant)
            .map_err(query_to_volume)?
            .ok_or_else(|| VolumeError::NoSuchTenant {
                tenant: tenant.clone(),
            })?;
        let record = self
            .meta
            .get(&record::volume_key(tenant, volume))?
            .ok_or_else(|| VolumeError::NoSuchVolume {
                tenant: tenant.clone(),
                volume: volume.clone(),
            })?;
        let record =
            VolumeRecord::decode(&record).map_err(|e| VolumeError::Corrupt { what: e.0 })?;
        Ok((tenant_record, record))
    }

    /// Opens a volume this thread holds the claim to (see [`Store::claim`]).
    fn open_claimed(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        opening: Opening<'_>,
    ) -> Result<Volume, VolumeError> {
        let handle = opening.handle.clone();
        // Records and key of one generation (see `master`).
        let master = self.read_master();
        let (tenant_record, record) = self.tenant_and_volume_records(tenant, volume)?;
        let block_size = BlockSize::new(record.block_size).map_err(|e| VolumeError::Corrupt {
            what: format!("volume record: {e}"),
        })?;
        let kek = self.kek(&master, tenant, &tenant_record);
        drop(master);
        let unwrap_failed = || VolumeError::KeyUnwrap {
            tenant: tenant.clone(),
            volume: volume.clone(),
        };
        // The active key first, then older ones still needed to read old blocks.
        let mut keys = record.keys.clone();
        keys.sort_by_key(|&(version, _)| (version != record.active_dek, version));
        let mut deks = Vec::with_capacity(keys.len());
        for (_, wrapped) in &keys {
            let wrapped = WrappedKey::from_bytes(wrapped).map_err(|_| unwrap_failed())?;
            deks.push(kek.unwrap(volume, &wrapped).map_err(|_| unwrap_failed())?);
        }
        let closed = Arc::new(Closed::default());
        let opened = Volume::open(VolumeParts {
            tenant: tenant.clone(),
            name: volume.clone(),
            internal_id: record.internal_id,
            size: record.size,
            block_size,
            segment_bytes: self.options.segment_bytes,
            overlay_limit: self.options.overlay_blocks,
            meta: self.meta.clone(),
            segments: self.segments.clone(),
            keys: deks,
            compact_threshold: self.options.compaction_threshold,
            wake: self.compactor.as_ref().map(|c| c.wakeup().clone()),
            flusher: Some(self.flusher.queue().clone()),
            closed: closed.clone(),
            nonce_limit: self.options.writer_nonce_limit,
            journal_min_runs: self.options.journal_min_runs,
            index_budget: self.index_budget.clone(),
            sync_latency: self.sync_latency.clone(),
            rekey: RekeyParts {
                admin: self.admin.clone(),
                kek: Some(kek),
                wake: Some(self.rekeyer.wakeup().clone()),
            },
        })?;
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|_, weak| weak.strong_count() > 0);
            let mut gates = self.lock_closing();
            gates.retain(|_, gate| !gate.is_open());
            gates.insert(handle.clone(), closed);
            open.insert(handle, opened.downgrade());
        }
        // Segments left dead by an earlier session are reclaimed soon after open.
        if let Some(compactor) = &self.compactor {
            compactor.wakeup().notify();
        }
        // So does an unfinished re-encryption job.
        self.rekeyer.wakeup().notify();
        drop(opening);
        tracing::info!(tenant = %tenant, volume = %volume, "volume opened");
        Ok(opened)
    }

    /// The gate the volume's latest instance opens when it has closed.
    pub(crate) fn closing_gate(&self, tenant: &TenantId, volume: &VolumeId) -> Option<Arc<Closed>> {
        self.lock_closing()
            .get(&(tenant.clone(), volume.clone()))
            .cloned()
    }

    fn lock_closing(&self) -> MutexGuard<'_, HashMap<(TenantId, VolumeId), Arc<Closed>>> {
        self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_opening(&self) -> MutexGuard<'_, HashMap<(TenantId, VolumeId), Arc<Closed>>> {
        self.opening.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tenant_record(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, QueryError> {
        // The record holds the tenant seed: the raw bytes are wiped when dropped.
        match self
            .meta
            .get(&record::tenant_key(tenant))?
            .map(Zeroizing::new)
        {
            None => Ok(None),
            Some(bytes) => TenantRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| QueryError::Corrupt { what: e.0 }),
        }
    }

    fn read_master(&self) -> RwLockReadGuard<'_, MasterKey> {
        // Nothing panics while holding it for write but a failed commit's
        // caller, which leaves the old key in place: still a valid key.
        self.master.read().unwrap_or_else(|e| e.into_inner())
    }

    fn kek(&self, master: &MasterKey, tenant: &TenantId, record: &TenantRecord) -> TenantKek {
        let seed = TenantSeed::from_bytes(seed_copy(&record.seed));
        master.tenant_kek(&self.salt, tenant, &seed, KeyVersion(record.kek_version))
    }
}

/// A wiped-on-drop copy of a tenant seed, made in place (a `Zeroizing::new(*x)`
/// would leave an unwiped temporary on the stack).
fn seed_copy(seed: &[u8; blockseal_keys::SEED_LEN]) -> Zeroizing<[u8; blockseal_keys::SEED_LEN]> {
    let mut copy = Zeroizing::new([0u8; blockseal_keys::SEED_LEN]);
    copy.copy_from_slice(seed);
    copy
}

/// What [`Store::claim`] found.
enum Claim<'a> {
    /// The volume is open: a handle to its instance.
    Open(Volume),
    /// The volume is closed, and stays so while this lives.
    Closed(Opening<'a>),
}

/// One thread's claim to open a volume: whatever the open's outcome, dropping it
/// opens the gate other openers of the same volume wait on.
struct Opening<'a> {
    store: &'a Store,
    handle: (TenantId, VolumeId),
    gate: Arc<Closed>,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut opening = self.store.lock_opening();
        if opening
            .get(&self.handle)
            .is_some_and(|gate| Arc::ptr_eq(gate, &self.gate))
        {
            opening.remove(&self.handle);
        }
        drop(opening);
        self.gate.open();
    }
}

fn tenant_info(id: TenantId, record: &TenantRecord) -> TenantInfo {
    TenantInfo {
        id,
        kek_version: KeyVersion(record.kek_version),
        state: record.state,
        created: record.created,
    }
}

fn volume_info(
    tenant: TenantId,
    id: VolumeId,
    record: &VolumeRecord,
) -> Result<VolumeInfo, String> {
    Ok(VolumeInfo {
        tenant,
        id,
        size: record.size,
        block_size: BlockSize::new(record.block_size).map_err(|e| format!("volume record: {e}"))?,
        active_dek: KeyVersion(record.active_dek),
        dek_versions: record.keys.iter().map(|&(v, _)| KeyVersion(v)).collect(),
        created: record.created,
        updated: record.updated,
    })
}

fn query_to_create(e: QueryError) -> CreateError {
    match e {
        QueryError::Meta(e) => CreateError::Meta(e),
        QueryError::Corrupt { what } => CreateError::Corrupt { what },
    }
}

fn query_to_volume(e: QueryError) -> VolumeError {
    match e {
        QueryError::Meta(e) => VolumeError::Meta(e),
        QueryError::Corrupt { what } => VolumeError::Corrupt { what },
    }
}

pub(crate) fn now() -> u64 {
    // A clock before 1970 is a misconfigured host; 0 is still a valid timestamp.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lock_store(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(OpenError::Io { path, source }),
    }
}

fn write_format_file(dir: &Path, backend: BackendKind, in_bucket: bool) -> Result<(), OpenError> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    bytes[12] = backend.code();
    bytes[13] = u8::from(in_bucket);
    let tmp = dir.join("FORMAT.tmp");
    let path = dir.join(FORMAT_FILE);
    (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(io_error(&path))
}

/// The backend and format version a `FORMAT` file names, and whether the
/// metadata and segments are in object storage.
fn read_format_file(dir: &Path) -> Result<(BackendKind, u32, bool), OpenError> {
    let path = dir.join(FORMAT_FILE);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    let not_a_store = || OpenError::NotAStore {
        path: dir.to_path_buf(),
    };
    // Exactly 16 bytes: magic, format version, backend, where (0 or 1), two
    // reserved zeros.
    if bytes.len() != 16 || &bytes[..8] != MAGIC || bytes[13] > 1 || bytes[14..16] != [0, 0] {
        return Err(not_a_store());
    }
    let version = u32::from_be_bytes(bytes[8..12].try_into().map_err(|_| not_a_store())?);
    if version == 0 {
        return Err(not_a_store());
    }
    if version > FORMAT_VERSION {
        return Err(OpenError::NewerFormat {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    match BackendKind::from_code(bytes[12]) {
        Some(backend) => Ok((backend, version, bytes[13] == 1)),
        None => Err(not_a_store()),
    }
}

fn open_meta(
    dir: &Path,
    backend: BackendKind,
    options: &StoreOptions,
) -> Result<Arc<dyn MetaStore>, OpenError> {
    if let Some(store) = &options.meta_store {
        return Ok(store.clone());
    }
    if let Some((store, prefix)) = &options.object_storage {
        let meta = meta::open_object_store(
            Arc::clone(store),
            &format!("{prefix}/meta"),
            &meta::OpenOptions::new(),
        )?;
        return Ok(Arc::from(meta));
    }
    let path = dir.join(META_DIR);
    if !path.is_dir() {
        create_private_dir(&path)?;
    }
    // Every open, not only the one that made it: an earlier attempt may have
    // failed between creating the directory and syncing its entry.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    let meta = meta::open(backend, &path)?;
    restrict_modes(&path).map_err(io_error(&path))?;
    Ok(Arc::from(meta))
}

/// Takes group and other permissions off every file and directory under `path`
/// that the backend created with the process umask.
///
/// The backend is open and may be working in the background while this runs
/// (SlateDB's compactor and garbage collector delete objects and emptied
/// directories): an entry that is gone by the time it is looked at needs no
/// change and is skipped.
fn restrict_modes(path: &Path) -> io::Result<()> {
    match restrict_modes_of(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

fn restrict_modes_of(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & want))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            match entry {
                Ok(entry) => restrict_modes(&entry.path())?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn start_compactor(
    dir: &Path,
    open: &OpenVolumes,
    options: &StoreOptions,
) -> Result<Option<Compactor>, OpenError> {
    if !options.background_compaction {
        return Ok(None);
    }
    let config = CompactorConfig {
        rate: options.compaction_rate,
        interval: options.compaction_interval,
    };
    Compactor::start(open.clone(), config)
        .map(Some)
        .map_err(io_error(dir))
}

fn open_segments(dir: &Path, options: &StoreOptions) -> Result<Arc<dyn SegmentStore>, OpenError> {
    if let Some(store) = &options.segment_store {
        return Ok(store.clone());
    }
    if let Some((store, prefix)) = &options.object_storage {
        let path = PathBuf::from(object_prefix(options));
        return Ok(Arc::new(
            ObjectSegments::new(Arc::clone(store), &format!("{prefix}/segments"))
                .map_err(io_error(&path))?,
        ));
    }
    let path = dir.join(SEGMENTS_DIR);
    Ok(Arc::new(
        FileSegments::with_reserve(&path, options.space_reserve).map_err(io_error(&path))?,
    ))
}

/// Names the object storage of `options` for messages: `<store>/<prefix>`.
fn object_prefix(options: &StoreOptions) -> String {
    options
        .object_storage
        .as_ref()
        .map_or_else(String::new, |(store, prefix)| format!("{store}/{prefix}"))
}

/// Creates `dir` (and missing parents) with mode 0700 for the directories it makes.
fn create_private_dir(dir: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// Whether `dir` holds what an interrupted [`Store::create`] leaves: metadata
/// and perhaps a commit marker, but neither `FORMAT` (written last) nor
/// `segments/` (made when a store first starts, after `FORMAT`): no store was
/// ever opened there, so no data was ever written.
fn unfinished_create(dir: &Path) -> bool {
    !dir.join(FORMAT_FILE).exists()
        && !dir.join(SEGMENTS_DIR).exists()
        && (dir.join(META_DIR).exists() || dir.join(MARKER_FILE).exists())
}

/// Moves what an interrupted create left to `<dir>/lost/unfinished-create[.N]/`
/// (nothing is deleted: it holds no data, but it is not ours to destroy).
fn set_aside_unfinished_create(dir: &Path) -> Result<(), OpenError> {
    let lost = dir.join("lost");
    create_private_dir(&lost)?;
    let mut target = lost.join("unfinished-create");
    let mut n = 1;
    while target.exists() {
        target = lost.join(format!("unfinished-create.{n}"));
        n += 1;
    }
    create_private_dir(&target)?;
    for name in [META_DIR, MARKER_FILE] {
        let from = dir.join(name);
        if from.exists() {
            fs::rename(&from, target.join(name)).map_err(io_error(&from))?;
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    tracing::warn!(dir = %dir.display(), moved_to = %target.display(), "set aside what an interrupted store creation left");
    Ok(())
}

/// Refuses a directory without a `FORMAT` file that holds store data anyway: it
/// is a damaged store, not an empty place for a new one.
fn check_no_store_data(dir: &Path) -> Result<(), OpenError> {
    let found: Vec<String> = [META_DIR, SEGMENTS_DIR, MARKER_FILE]
        .into_iter()
        .filter(|name| dir.join(name).exists())
        .map(str::to_owned)
        .collect();
    if found.is_empty() {
        Ok(())
    } else {
        Err(OpenError::FormatMissing {
            path: dir.to_path_buf(),
            found,
        })
    }
}

/// Logs a warning when the store directory, or its `meta` or `segments`
/// directory, is open to group or others: ciphertext and wrapped keys are safe
/// to read, but nobody else needs them, and a writable directory lets others
/// delete or swap them.
fn warn_if_open_to_others(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for path in [
        dir.to_path_buf(),
        dir.join(META_DIR),
        dir.join(SEGMENTS_DIR),
    ] {
        if let Ok(m) = fs::metadata(&path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o7777),
                "store directory is open to group or others; chmod 0700 it"
            );
        }
    }
}

/// Internal ids of volumes with segment directories under `<dir>/segments` that
/// the metadata never allocated (at or past its next volume id).
fn orphan_segment_dirs(dir: &Path, meta: &dyn MetaStore) -> Result<Vec<u32>, OpenError> {
    let next = match meta.get(record::NEXT_VOLUME_KEY)? {
        Some(bytes) => record::decode_u64(&bytes, "next volume id")
            .map_err(|e| OpenError::Corrupt { what: e.0 })?,
        None => 1,
    };
    let root = dir.join(SEGMENTS_DIR);
    let entries = match fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&root)(e)),
    };
    let mut orphans = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(&root))?;
        let id = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(id) = id
            && u64::from(id) >= next
        {
            orphans.push(id);
        }
    }
    orphans.sort_unstable();
    Ok(orphans)
}

/// Moves the segment directories of `volumes` to `<dir>/lost/`.
fn move_aside(dir: &Path, volumes: &[u32]) -> Result<u64, OpenError> {
    if volumes.is_empty() {
        return Ok(0);
    }
    let lost = dir.join("lost");
    create_private_dir(&lost)?;
    for id in volumes {
        let from = dir.join(SEGMENTS_DIR).join(id.to_string());
        let mut to = lost.join(id.to_string());
        let mut n = 1;
        while to.exists() {
            to = lost.join(format!("{id}.{n}"));
            n += 1;
        }
        fs::rename(&from, &to).map_err(io_error(&from))?;
        tracing::warn!(from = %from.display(), to = %to.display(), "moved segments of a volume the metadata does not know");
    }
    for synced in [dir.join(SEGMENTS_DIR), lost] {
        File::open(&synced)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&synced))?;
    }
    Ok(volumes.len() as u64)
}

/// Makes every volume's mappings consistent after accepted metadata loss: drops
/// extents no writer record (or DEK, for format v1 blocks) opens, and rewrites
/// the live counts from the extents that remain.
fn repair_volumes(meta: &dyn MetaStore, report: &mut RecoveryReport) -> Result<(), OpenError> {
    // A volume record that does not decode holds wrapped keys nobody can use:
    // its data is lost with it, and the record goes.
    let mut volumes: Vec<VolumeRecord> = Vec::new();
    let mut unreadable = Batch::new();
    meta.scan_prefix(b"V", &mut |key, value| {
        match VolumeRecord::decode(value) {
            Ok(v) => volumes.push(v),
            Err(_) => unreadable.delete(key.to_vec()),
        }
        true
    })?;
    report.volumes_dropped += unreadable.len() as u64;
    meta.commit(&unreadable)?;
    for volume in volumes {
        let id = volume.internal_id;
        let deks: Vec<u32> = volume.keys.iter().map(|&(v, _)| v).collect();
        // The mapping journal goes into the pages first; a journal that does
        // not decode is dropped (its changes are lost, the pages stand).
        let mut journal_dropped = 0u64;
        if crate::mapping::fold_stored_journal(meta, id)?.is_err() {
            let mut doomed = Batch::new();
            meta.scan_prefix(&record::journal_prefix(id), &mut |key, _| {
                doomed.delete(key.to_vec());
                true
            })?;
            journal_dropped = doomed.len() as u64;
            meta.commit(&doomed)?;
        }
        let mut batch = Batch::new();
        // Writer records that do not decode are dropped (and the extents that
        // name them with them, below).
        let mut writers: HashMap<u32, u32> = HashMap::new();
        meta.scan_prefix(&record::writer_prefix(id), &mut |key, value| {
            match (record::writer_key_number(key), WriterRecord::decode(value)) {
                (Ok(n), Ok(w)) if n != 0 => {
                    writers.insert(n, w.dek_version);
                }
                _ => batch.delete(key.to_vec()),
            }
            true
        })?;
        let mut mapped: HashMap<u32, u64> = HashMap::new();
        let mut dropped = journal_dropped;
        let mut next_lba = 0u64;
        // Per-extent records left by the move into pages do not decode: gone.
        meta.scan_prefix(&record::extent_prefix(id), &mut |key, _| {
            batch.delete(key.to_vec());
            dropped += 1;
            true
        })?;
        meta.scan_prefix(&record::page_prefix(id), &mut |key, value| {
            let Ok(extents) = record::decode_page(key, value) else {
                batch.delete(key.to_vec());
                dropped += 1;
                return true;
            };
            // Kept: it follows the previous extent without overlap, and names
            // a DEK the volume holds and a writer it has a record of.
            let held = extents.len();
            let kept: Vec<Extent> = extents
                .into_iter()
                .filter(|e| {
                    let keep = e.lba >= next_lba
                        && deks.contains(&e.dek_version)
                        && (e.writer == 0 || writers.get(&e.writer) == Some(&e.dek_version));
                    if keep {
                        next_lba = e.last().saturating_add(1);
                        *mapped.entry(e.segment).or_default() += e.tags.len() as u64;
                    }
                    keep
                })
                .collect();
            dropped += (held - kept.len()) as u64;
            if kept.is_empty() {
                batch.delete(key.to_vec());
            } else if kept.len() < held {
                batch.put(key.to_vec(), record::encode_page(&kept));
            }
            true
        })?;
        let mut live: HashMap<u32, u64> = HashMap::new();
        meta.scan_prefix(&record::live_prefix(id), &mut |key, value| {
            match (
                record::live_key_segment(key),
                record::decode_u64(value, "live count"),
            ) {
                (Ok(segment), Ok(count)) => {
                    live.insert(segment, count);
                }
                _ => batch.delete(key.to_vec()),
            }
            true
        })?;
        let mut fixed = 0u64;
        let segments: std::collections::BTreeSet<u32> =
            mapped.keys().chain(live.keys()).copied().collect();
        for segment in segments {
            let want = mapped.get(&segment).copied().unwrap_or(0);
            if live.get(&segment).copied().unwrap_or(0) == want {
                continue;
            }
            fixed += 1;
            let key = record::live_key(id, segment).to_vec();
            if want == 0 {
                batch.delete(key);
            } else {
                batch.put(key, record::encode_u64(want).to_vec());
            }
        }
        meta.commit(&batch)?;
        report.extents_dropped += dropped;
        report.live_counts_fixed += fixed;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The backend may delete files while their modes are restricted
    /// (SlateDB's garbage collector did, and a reopen in the crash suite
    /// failed with NotFound): what is gone is skipped.
    #[test]
    fn restricting_modes_skips_what_is_gone_and_restricts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        restrict_modes(&dir.path().join("deleted meanwhile")).unwrap();
        let tree = dir.path().join("meta");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("object"), b"x").unwrap();
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(tree.join("object"), fs::Permissions::from_mode(0o644)).unwrap();
        restrict_modes(&tree).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tree), 0o700);
        assert_eq!(mode(&tree.join("object")), 0o600);
    }
}
