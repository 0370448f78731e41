//! The store: one directory holding a deployment's tenants, volumes and their data.
//!
//! Layout of a store directory (byte tables in `docs/FORMAT.md`):
//!
//! ```text
//! <dir>/blockseal.lock   exclusive lock while a Store is open (std File::try_lock)
//! <dir>/FORMAT           16-byte header: magic, format version, metadata backend
//! <dir>/meta/            the metadata store (sled or redb)
//! <dir>/segments/        segment data (through the SegmentStore trait only)
//! ```
//!
//! Opening checks the master key against the recorded key id and check value
//! before anything else is read. This module must never store a key unwrapped
//! other than the tenant seeds (which need the master key to be of any use) and
//! never log key material.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockseal_keys::{
    CheckValue, DataKey, DeploymentSalt, KeyId, KeyVersion, MasterKey, TenantId, TenantKek,
    TenantSeed, VolumeId, WrappedKey,
};
use zeroize::Zeroizing;

use crate::block::BlockSize;
use crate::compactor::{self, Compactor, CompactorConfig, OpenVolumes};
use crate::error::{CreateError, OpenError, QueryError, VolumeError};
use crate::flusher::Flusher;
use crate::meta::{self, BackendKind, Batch, MetaStore};
use crate::record::{self, HeaderRecord, TenantRecord, VolumeRecord};
use crate::segment::{FileSegments, SegmentStore};
use crate::volume::{CompactionReport, Volume, VolumeParts};

pub use crate::record::TenantState;

/// The store format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

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
    compaction_threshold: f64,
    background_compaction: bool,
    compaction_rate: u64,
    compaction_interval: Duration,
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

    /// Defaults: redb metadata, 64 MiB segments in files under the store directory.
    pub fn new() -> StoreOptions {
        StoreOptions {
            backend: BackendKind::Redb,
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            overlay_blocks: Self::DEFAULT_OVERLAY_BLOCKS,
            meta_store: None,
            segment_store: None,
            compaction_threshold: Self::DEFAULT_COMPACTION_THRESHOLD,
            background_compaction: true,
            compaction_rate: Self::DEFAULT_COMPACTION_RATE,
            compaction_interval: Self::DEFAULT_COMPACTION_INTERVAL,
        }
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
            .field("compaction_threshold", &self.compaction_threshold)
            .field("background_compaction", &self.background_compaction)
            .field("compaction_rate", &self.compaction_rate)
            .field("compaction_interval", &self.compaction_interval)
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

/// An open store. One process (and one `Store`) may hold a store open at a time.
///
/// Unless disabled in [`StoreOptions::background_compaction`], the store owns a
/// thread that compacts its open volumes; dropping the store stops it.
pub struct Store {
    // Dropped first: the compaction and flush threads stop before anything else goes.
    compactor: Option<Compactor>,
    flusher: Flusher,
    dir: PathBuf,
    meta: Arc<dyn MetaStore>,
    segments: Arc<dyn SegmentStore>,
    master: MasterKey,
    salt: DeploymentSalt,
    options: StoreOptions,
    /// Open volumes, so a second open shares the first instance (and so the
    /// compaction thread finds them).
    open: OpenVolumes,
    /// Serializes tenant and volume creation (read-check-write of records).
    admin: Mutex<()>,
    // Dropped last: the lock outlives every other handle on the directory.
    _lock: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("backend", &self.meta.backend())
            .field("master_key", &self.master.id())
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
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let lock = lock_store(&dir)?;
        for name in [FORMAT_FILE, META_DIR, SEGMENTS_DIR] {
            if dir.join(name).exists() {
                return Err(OpenError::AlreadyExists { path: dir });
            }
        }
        let backend = options.backend;
        let meta = open_meta(&dir, backend, &options)?;
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
        write_format_file(&dir, backend)?;
        tracing::info!(dir = %dir.display(), ?backend, master_key = %master.id(), "store created");
        Store::start(dir, lock, meta, master, salt, options)
    }

    /// Opens the store in `dir` with its master key. Fails with
    /// [`OpenError::WrongMasterKey`] before reading anything but the header when
    /// `master` is not the key the store was created with.
    pub fn open(
        dir: impl AsRef<Path>,
        master: MasterKey,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(FORMAT_FILE).exists() {
            return Err(OpenError::NotAStore { path: dir });
        }
        let lock = lock_store(&dir)?;
        let backend = read_format_file(&dir)?;
        let meta = open_meta(&dir, backend, &options)?;
        let header = meta
            .get(record::HEADER_KEY)?
            .ok_or_else(|| OpenError::NotAStore { path: dir.clone() })?;
        let header = HeaderRecord::decode(&header).map_err(|e| OpenError::Corrupt { what: e.0 })?;
        master.verify(
            KeyId::from_bytes(header.master_key_id),
            &CheckValue::from_bytes(header.check_value),
        )?;
        tracing::info!(dir = %dir.display(), ?backend, master_key = %master.id(), "store opened");
        let salt = DeploymentSalt::from_bytes(header.salt);
        Store::start(dir, lock, meta, master, salt, options)
    }

    /// Opens the segment store and starts the background threads of a store
    /// whose header is written (create) or verified (open).
    fn start(
        dir: PathBuf,
        lock: File,
        meta: Arc<dyn MetaStore>,
        master: MasterKey,
        salt: DeploymentSalt,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let segments = open_segments(&dir, &options)?;
        let open: OpenVolumes = Arc::new(Mutex::new(HashMap::new()));
        Ok(Store {
            compactor: start_compactor(&dir, &open, &options)?,
            flusher: Flusher::start().map_err(io_error(&dir))?,
            dir,
            meta,
            segments,
            master,
            salt,
            options,
            open,
            admin: Mutex::new(()),
            _lock: lock,
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata backend in use.
    pub fn backend(&self) -> BackendKind {
        self.meta.backend()
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
            seed: Zeroizing::new(*seed.expose_secret()),
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
        let block_size = options.block_size;
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
        let kek = self.kek(tenant, &tenant_record);
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
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let handle = (tenant.clone(), volume.clone());
        if let Some(inner) = open.get(&handle).and_then(Weak::upgrade) {
            return Ok(Volume::from_inner(inner));
        }
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
        let block_size = BlockSize::new(record.block_size).map_err(|e| VolumeError::Corrupt {
            what: format!("volume record: {e}"),
        })?;
        let kek = self.kek(tenant, &tenant_record);
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
        })?;
        open.retain(|_, weak| weak.strong_count() > 0);
        open.insert(handle, opened.downgrade());
        drop(open);
        // Segments left dead by an earlier session are reclaimed soon after open.
        if let Some(compactor) = &self.compactor {
            compactor.wakeup().notify();
        }
        tracing::info!(tenant = %tenant, volume = %volume, "volume opened");
        Ok(opened)
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

    fn kek(&self, tenant: &TenantId, record: &TenantRecord) -> TenantKek {
        let seed = TenantSeed::from_bytes(Zeroizing::new(*record.seed));
        self.master
            .tenant_kek(&self.salt, tenant, &seed, KeyVersion(record.kek_version))
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

fn now() -> u64 {
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

fn backend_byte(backend: BackendKind) -> u8 {
    match backend {
        BackendKind::Sled => 1,
        BackendKind::Redb => 2,
    }
}

fn write_format_file(dir: &Path, backend: BackendKind) -> Result<(), OpenError> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    bytes[12] = backend_byte(backend);
    let tmp = dir.join("FORMAT.tmp");
    let path = dir.join(FORMAT_FILE);
    (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(io_error(&path))
}

fn read_format_file(dir: &Path) -> Result<BackendKind, OpenError> {
    let path = dir.join(FORMAT_FILE);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    let not_a_store = || OpenError::NotAStore {
        path: dir.to_path_buf(),
    };
    // Exactly 16 bytes: magic, format version, backend, three reserved zeros.
    if bytes.len() != 16 || &bytes[..8] != MAGIC || bytes[13..16] != [0, 0, 0] {
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
    match bytes[12] {
        1 => Ok(BackendKind::Sled),
        2 => Ok(BackendKind::Redb),
        _ => Err(not_a_store()),
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
    let path = dir.join(META_DIR);
    fs::create_dir_all(&path).map_err(io_error(&path))?;
    Ok(Arc::from(meta::open(backend, &path)?))
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
    let path = dir.join(SEGMENTS_DIR);
    Ok(Arc::new(FileSegments::new(&path).map_err(io_error(&path))?))
}
