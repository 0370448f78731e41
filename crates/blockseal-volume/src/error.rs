//! The small, stable classification of volume errors.
//!
//! Protocol layers map an [`ErrorKind`] to their own status codes in exactly one
//! place (for NBD: `class_of` in the `blockseal` binary's `exports.rs`), so a new error variant never
//! needs more than a `kind()` arm.

/// What kind of failure a volume operation met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing the backing storage failed (NBD: EIO).
    Io,
    /// A block failed authentication: tampered, moved or corrupted (NBD: EIO).
    Authentication,
    /// The request reaches past the end of the volume when reading (NBD: EINVAL).
    OutOfRange,
    /// A write reaches past the end of the volume, or the pool is full (NBD: ENOSPC).
    NoSpace,
    /// The volume is read-only (NBD: EPERM).
    ReadOnly,
    /// The request is malformed (NBD: EINVAL).
    InvalidInput,
    /// The operation is not supported here (NBD: ENOTSUP).
    NotSupported,
    /// An earlier write or sync failed; the volume refuses writes until reopened (NBD: EIO).
    Poisoned,
    /// The store is shutting down (NBD: ESHUTDOWN).
    ShuttingDown,
}

use std::io;
use std::path::PathBuf;

use blockseal_keys::{TenantId, VolumeId};

use crate::block::Lba;
use crate::meta::MetaError;

/// Opening or creating a [`Store`](crate::Store) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A file or directory of the store could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Store` in this one) holds the store open.
    #[error("store {path} is in use by another process")]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// `Store::create` found a store (or other files) already in the directory.
    #[error("{path} already holds a store")]
    AlreadyExists {
        /// The store directory.
        path: PathBuf,
    },
    /// The store keeps its metadata and segments in object storage and the
    /// options name none, or the other way round.
    #[error(
        "the store {path} keeps its metadata and segments {where_}; open it with \
         the same object storage it was created with"
    )]
    ObjectStorageMismatch {
        /// The store directory.
        path: PathBuf,
        /// Where the store's `FORMAT` file says they are.
        where_: &'static str,
    },
    /// The directory holds store data (metadata, segments, a commit marker) but
    /// no `FORMAT` file: a damaged store, never an empty place for a new one.
    #[error(
        "{path} holds store data ({}) but no FORMAT file: the store is damaged; \
         restore FORMAT from a backup of the store",
        found.join(", ")
    )]
    FormatMissing {
        /// The store directory.
        path: PathBuf,
        /// What was found there.
        found: Vec<String>,
    },
    /// The metadata file (or directory) of an existing store is gone. Nothing is
    /// created in its place: without it no key can be derived and no block found.
    #[error(
        "the store's metadata {path} is missing: without it no tenant key can be \
         derived and no block found; restore it from a backup of the store"
    )]
    MetadataMissing {
        /// The missing file or directory.
        path: PathBuf,
    },
    /// The metadata holds fewer commits than the store's commit marker recorded:
    /// it lost acknowledged changes (a damaged file the backend truncated, a
    /// replaced or older copy). See [`Store::danger_accept_metadata_loss`].
    ///
    /// [`Store::danger_accept_metadata_loss`]: crate::Store::danger_accept_metadata_loss
    #[error(
        "the metadata of store {path} went back in time: it holds {metadata} commits \
         but the store recorded {recorded}; it was damaged, lost or restored from an \
         older copy, and serving it would read lost blocks as zeros"
    )]
    MetadataRolledBack {
        /// The store directory.
        path: PathBuf,
        /// The last commit the metadata holds.
        metadata: u64,
        /// The last commit the marker recorded.
        recorded: u64,
    },
    /// The commit marker file is gone although the metadata counts its commits
    /// (it had a marker): without it, a rollback could not be seen.
    #[error(
        "the store's commit marker {path} is missing although its metadata was \
         written with one: it was deleted, or the metadata comes from another store"
    )]
    MarkerMissing {
        /// The marker file.
        path: PathBuf,
    },
    /// The commit marker file is not a valid marker.
    #[error("the store's commit marker {path} is damaged")]
    MarkerDamaged {
        /// The marker file.
        path: PathBuf,
    },
    /// Segment data of volumes the metadata never allocated: the metadata is
    /// older than the segments.
    #[error(
        "{path} holds segments of volumes the metadata never heard of (internal ids \
         {volumes:?}): the metadata lost volumes or was restored from an older copy"
    )]
    UnknownSegments {
        /// The segments directory.
        path: PathBuf,
        /// The unknown internal volume ids.
        volumes: Vec<u32>,
    },
    /// The directory holds no store header, or one this build cannot read.
    #[error("{path} is not a blockseal store")]
    NotAStore {
        /// The store directory.
        path: PathBuf,
    },
    /// The store was written by a newer build.
    #[error("store format v{found} is newer than this build supports (v{supported})")]
    NewerFormat {
        /// The store's format version.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// The master key is not the one the store was created with. Nothing was read
    /// but the store header.
    #[error(transparent)]
    WrongMasterKey(#[from] blockseal_keys::WrongMasterKey),
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
}

impl OpenError {
    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpenError::Locked { .. }
            | OpenError::AlreadyExists { .. }
            | OpenError::ObjectStorageMismatch { .. }
            | OpenError::NotAStore { .. }
            | OpenError::NewerFormat { .. }
            | OpenError::WrongMasterKey(_) => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        }
    }
}

/// Creating a tenant or a volume failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The tenant exists already.
    #[error("tenant {tenant} already exists")]
    TenantExists {
        /// The tenant.
        tenant: TenantId,
    },
    /// The tenant does not exist.
    #[error("no tenant {tenant}")]
    NoSuchTenant {
        /// The tenant.
        tenant: TenantId,
    },
    /// The volume exists already.
    #[error("volume {tenant}/{volume} already exists")]
    VolumeExists {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The size is zero or not a multiple of the block size.
    #[error("volume size {size} is not a positive multiple of the block size ({block_size} bytes)")]
    InvalidSize {
        /// The refused size, in bytes.
        size: u64,
        /// The volume's block size, in bytes.
        block_size: u32,
    },
    /// The volume size is larger than NBD clients and the kernel can address
    /// (2^63 - 1 bytes, rounded down to 64 KiB).
    #[error("volume size {size} is larger than the largest volume ({max} bytes)")]
    TooLarge {
        /// The requested size.
        size: u64,
        /// [`MAX_VOLUME_BYTES`](crate::MAX_VOLUME_BYTES).
        max: u64,
    },
    /// The store has no internal volume ids left.
    #[error("the store has no volume ids left")]
    Exhausted,
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
}

impl CreateError {
    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CreateError::TenantExists { .. }
            | CreateError::NoSuchTenant { .. }
            | CreateError::VolumeExists { .. }
            | CreateError::InvalidSize { .. }
            | CreateError::TooLarge { .. } => ErrorKind::InvalidInput,
            CreateError::Exhausted => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        }
    }
}

/// Listing or looking up tenants and volumes failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The metadata store failed.
    #[error("metadata store failed")]
    Meta(#[from] MetaError),
    /// A metadata record could not be decoded.
    #[error("store metadata is corrupt: {what}")]
    Corrupt {
        /// Which record.
        what: String,
    },
}

impl QueryError {
    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Io
    }
}

/// Opening a volume, or an operation on an open volume, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
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
    /// A read reaches past the end of the volume.
    #[error("read of {len} bytes at {offset} reaches past the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Request offset, in bytes.
        offset: u64,
        /// Request length, in bytes.
        len: u64,
        /// Volume size, in bytes.
        size: u64,
    },
    /// A write reaches past the end of the volume.
    #[error("write of {len} bytes at {offset} reaches past the end of the volume ({size} bytes)")]
    NoSpace {
        /// Request offset, in bytes.
        offset: u64,
        /// Request length, in bytes.
        len: u64,
        /// Volume size, in bytes.
        size: u64,
    },
    /// A block failed authentication: it was tampered with, moved or corrupted.
    #[error("block {lba} failed authentication")]
    Authentication {
        /// The block.
        lba: Lba,
    },
    /// Reading or writing segment data failed.
    #[error("segment I/O failed")]
    Io(#[source] io::Error),
    /// The write was refused because the file system under the store is full
    /// (or its free space reached the reserve kept for metadata). Nothing was
    /// changed; the same write succeeds once space is freed.
    #[error("no space left for segment data")]
    StorageFull(#[source] io::Error),
    /// A shortage that may pass (file descriptors, memory) failed the request.
    /// Nothing referenced was changed; the volume stays usable.
    #[error("out of a system resource")]
    Resource(#[source] io::Error),
    /// An earlier write or flush failed; the volume refuses writes and flushes
    /// until it is reopened.
    #[error("an earlier write or flush failed; reopen the volume")]
    Poisoned,
    /// The metadata store failed.
    #[error("metadata store failed")]
    Meta(#[from] MetaError),
    /// A metadata record could not be decoded.
    #[error("volume metadata is corrupt: {what}")]
    Corrupt {
        /// Which record.
        what: String,
    },
    /// The volume's data key could not be unwrapped (wrong key material or a
    /// tampered record).
    #[error("the data key of {tenant}/{volume} could not be unwrapped")]
    KeyUnwrap {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The volume's nonce space is spent or its reservation failed.
    #[error("no nonce available")]
    Nonce(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl VolumeError {
    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VolumeError::NoSuchTenant { .. } | VolumeError::NoSuchVolume { .. } => {
                ErrorKind::InvalidInput
            }
            VolumeError::OutOfRange { .. } => ErrorKind::OutOfRange,
            VolumeError::NoSpace { .. } | VolumeError::StorageFull(_) => ErrorKind::NoSpace,
            VolumeError::Authentication { .. } => ErrorKind::Authentication,
            VolumeError::Poisoned => ErrorKind::Poisoned,
            _ => ErrorKind::Io,
        }
    }
}

/// How an admin layer should report an [`AdminError`]: the HTTP API maps these
/// to status codes in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AdminErrorKind {
    /// The tenant or volume does not exist (HTTP 404).
    NotFound,
    /// The operation conflicts with the store's state: a volume is open, a
    /// tenant still has volumes, data is mapped past a new end, the key is
    /// already the current one (HTTP 409).
    Conflict,
    /// The request itself is invalid: a size, an audit entry (HTTP 400).
    InvalidInput,
    /// The store failed: metadata, segment I/O, corrupt records, the random
    /// number generator, a key that does not unwrap (HTTP 500).
    Internal,
}

/// A store administration operation ([`Store::delete_volume`],
/// [`Store::resize_volume`], [`Store::shred_tenant`], [`Store::rotate_master`],
/// the audit log, ...) failed. Messages name tenants, volumes, sizes and key
/// ids, never key material.
///
/// [`Store::delete_volume`]: crate::Store::delete_volume
/// [`Store::resize_volume`]: crate::Store::resize_volume
/// [`Store::shred_tenant`]: crate::Store::shred_tenant
/// [`Store::rotate_master`]: crate::Store::rotate_master
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
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
    /// The volume is open (served or used by an embedder): close it and retry.
    #[error("volume {tenant}/{volume} is open; close its connections and retry")]
    VolumeInUse {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The tenant still has volumes.
    #[error("tenant {tenant} still has {volumes} volume(s); delete them or shred the tenant")]
    TenantHasVolumes {
        /// The tenant.
        tenant: TenantId,
        /// How many volumes it has.
        volumes: usize,
    },
    /// A shrink would cut off mapped data, and discarding the tail was not asked for.
    #[error(
        "volume {tenant}/{volume} holds data at byte {first_mapped_byte}, past the new \
         size {new_size}; trim it first or ask for the tail to be discarded"
    )]
    MappedPastEnd {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
        /// The refused size, in bytes.
        new_size: u64,
        /// The first byte of the first mapped block at or past `new_size`.
        first_mapped_byte: u64,
    },
    /// The size is zero or not a multiple of the block size.
    #[error("volume size {size} is not a positive multiple of the block size ({block_size} bytes)")]
    InvalidSize {
        /// The refused size, in bytes.
        size: u64,
        /// The volume's block size, in bytes.
        block_size: u32,
    },
    /// The size is larger than the largest volume.
    #[error("volume size {size} is larger than the largest volume ({max} bytes)")]
    TooLarge {
        /// The requested size.
        size: u64,
        /// [`MAX_VOLUME_BYTES`](crate::MAX_VOLUME_BYTES).
        max: u64,
    },
    /// The new master key is the current one (same key id).
    #[error("the new master key {key} is the store's current master key")]
    SameMasterKey {
        /// The key id both share.
        key: blockseal_keys::KeyId,
    },
    /// A name (of a snapshot, say) breaks the naming rules.
    #[error(
        "{what} name {name:?} is invalid: use 1 to 64 lowercase letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    InvalidName {
        /// What the name names.
        what: &'static str,
        /// The refused name (names are not secret).
        name: String,
    },
    /// The volume has no snapshot of that name.
    #[error("no snapshot {tenant}/{volume}@{snapshot}")]
    NoSuchSnapshot {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
        /// The snapshot's name.
        snapshot: String,
    },
    /// The volume has a snapshot of that name already.
    #[error("snapshot {tenant}/{volume}@{snapshot} already exists")]
    SnapshotExists {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
        /// The snapshot's name.
        snapshot: String,
    },
    /// A rollback to a snapshot that is not the newest: the newer ones would
    /// see data the rollback removes.
    #[error(
        "cannot roll {tenant}/{volume} back to {snapshot}: newer snapshots exist ({}); delete them first",
        newer.join(", ")
    )]
    NewerSnapshots {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
        /// The snapshot asked for.
        snapshot: String,
        /// The newer snapshots, oldest first.
        newer: Vec<String>,
    },
    /// A rollback to a snapshot taken at another volume size.
    #[error(
        "cannot roll {tenant}/{volume} back to {snapshot}: it was taken at {snapshot_size} bytes and the volume now has {volume_size}; resize the volume to {snapshot_size} bytes first"
    )]
    SnapshotSizeDiffers {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
        /// The snapshot.
        snapshot: String,
        /// The volume's size when the snapshot was taken.
        snapshot_size: u64,
        /// The volume's size now.
        volume_size: u64,
    },
    /// An audit entry is larger than an audit record may be.
    #[error("audit entry of {bytes} bytes is larger than the limit ({max} bytes)")]
    AuditEntryTooLarge {
        /// The entry's fields, in bytes.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A metadata record could not be decoded or is inconsistent.
    #[error("store metadata is corrupt: {what}")]
    Corrupt {
        /// Which record, and what is wrong with it.
        what: String,
    },
    /// A data key of the volume could not be unwrapped: wrong key material or
    /// a tampered record. Nothing was changed.
    #[error("the data key of {tenant}/{volume} could not be unwrapped")]
    KeyUnwrap {
        /// The tenant.
        tenant: TenantId,
        /// The volume.
        volume: VolumeId,
    },
    /// The audit key could not be unwrapped with the master key: the record
    /// was tampered with or replaced.
    #[error("the audit key could not be unwrapped")]
    AuditKeyUnwrap,
    /// The metadata store failed.
    #[error("metadata store failed")]
    Meta(#[from] MetaError),
    /// Removing segment data failed.
    #[error("segment storage failed")]
    Io(#[source] io::Error),
    /// The open volume failed while being resized (a flush or a trim).
    #[error("the open volume failed")]
    Volume(#[source] VolumeError),
    /// The system random number generator failed.
    #[error(transparent)]
    Random(#[from] blockseal_keys::RandomError),
}

impl AdminError {
    /// The error's classification, for a protocol layer.
    pub fn kind(&self) -> AdminErrorKind {
        match self {
            AdminError::NoSuchTenant { .. }
            | AdminError::NoSuchVolume { .. }
            | AdminError::NoSuchSnapshot { .. } => AdminErrorKind::NotFound,
            AdminError::VolumeInUse { .. }
            | AdminError::TenantHasVolumes { .. }
            | AdminError::MappedPastEnd { .. }
            | AdminError::SnapshotExists { .. }
            | AdminError::NewerSnapshots { .. }
            | AdminError::SnapshotSizeDiffers { .. }
            | AdminError::SameMasterKey { .. } => AdminErrorKind::Conflict,
            AdminError::InvalidSize { .. }
            | AdminError::InvalidName { .. }
            | AdminError::TooLarge { .. }
            | AdminError::AuditEntryTooLarge { .. } => AdminErrorKind::InvalidInput,
            _ => AdminErrorKind::Internal,
        }
    }
}

impl From<QueryError> for AdminError {
    fn from(e: QueryError) -> AdminError {
        match e {
            QueryError::Meta(e) => AdminError::Meta(e),
            QueryError::Corrupt { what } => AdminError::Corrupt { what },
        }
    }
}

/// Records a failed job in its span's `error` field: the error and its
/// causes, as in log lines (names and numbers, never key material or data).
pub(crate) fn record_failure(span: &tracing::Span, error: &dyn std::error::Error) {
    if !span.is_disabled() {
        span.record("error", tracing::field::display(error_chain(error)));
    }
}

/// An error and its causes on one line (`segment I/O failed: No space left on
/// device`), for log lines: `Display` of most errors is their own message only.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
