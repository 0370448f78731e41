//! An open volume: the copy-on-write write path, the mapping overlay and flush.
//!
//! A write seals its blocks into fresh space at the head of the volume's open
//! segment, then records `lba -> (segment, offset, nonce counter, tag, DEK version)`
//! in a memory overlay that reads consult first. A flush syncs the segments
//! written since the last flush, then commits the overlay to the metadata store
//! as extent records in one atomic batch (concurrent flushers of a volume share
//! one sync and one commit; the store groups commits of many volumes). The
//! committed mappings are also kept in memory, in the extent index, so reads
//! never go to the metadata store for them while the index budget allows.
//! Nothing is ever overwritten in place, so a crash can never tear a block
//! against its tag.
//!
//! Modules: [`read`] (lookup and opening blocks), [`write`] (sealing, space and
//! writer keys), [`commit`] (flush, direct trims and the commit step shared with
//! compaction), [`index`] (the in-memory extent index and its budget),
//! [`compact`] (space reclamation) and [`check`] (what the metadata must satisfy
//! at open). This file holds the types they share and the public API.
//!
//! Locks, in the only order they are taken: the store's admin lock (held by
//! re-encryption's last step and automatic rotations, which change the volume
//! record; see [`reencrypt`]), then the compaction lock (one compaction or
//! re-encryption step of a volume at a time; see [`compact`]), then the edge-block stripes of a
//! write with partial blocks, then the install gate (shared by writes from
//! allocation to install, exclusive for an instant in compaction), then the
//! flush lock, then the head / overlay / dirty-set / index locks (each held
//! only for a few instructions, never across I/O except the head lock across a
//! segment create). Sealing and segment writes of whole blocks take no lock
//! but the install gate's shared side. Reads take the overlay's and the
//! index's briefly, and the segment-read gate's shared side.
//!
//! Space comes back by compaction (module [`compact`]): the live blocks of a
//! mostly dead sealed segment are copied to the head and their mappings switched
//! in one conditional commit, after which the old segment is deleted.
//! After a data key rotation, module [`reencrypt`] seals old blocks again
//! under the new key the same way, step by step, and then destroys the old
//! keys.
//!
//! This module must never log plaintext or keys, never acknowledge a flush before
//! both the segment sync and the metadata commit returned `Ok`, and never accept a
//! write after a failed write or sync (the volume is poisoned until reopened).

mod check;
mod commit;

mod compact;
mod index;
mod journal;
mod read;
mod reencrypt;
mod snapshot;
mod write;

pub use compact::CompactionReport;
pub(crate) use index::{ExtentView, IndexBudget};
pub(crate) use journal::MIN_RUNS as JOURNAL_MIN_RUNS;
pub use reencrypt::{DataKeyStatus, DataKeyUsage, ReencryptionProgress, ReencryptionReport};
pub(crate) use reencrypt::{RekeyParts, STEP_BYTES, dek_blocks_in_store, status_of};
pub use snapshot::SnapshotInfo;
pub(crate) use snapshot::{load_epoch, snapshot_infos};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use blockseal_keys::{DataKey, TenantId, VolumeId};

use crate::block::BlockSize;
use crate::compactor::Wakeup;
use crate::error::VolumeError;
use crate::flusher::FlushQueue;
use crate::meta::{Batch, MetaStore};
use crate::record::{self, WriterRecord};
use crate::seal::{BlockCipher, TAG_LEN};
use crate::segment::{SegmentId, SegmentStore};
use crate::stats::LatencyHistogram;
use check::{check_extents, load_writers};
use commit::{CommitKind, MappingChange, MappingCommit};
use index::ExtentIndex;

/// Number of lock stripes per volume for the partial blocks at the edges of
/// writes (a power of two).
const STRIPES: usize = 64;

/// Trims and zeroes covering at least this many whole blocks drop the mappings
/// with one direct commit instead of one overlay entry per block.
const DIRECT_TRIM_BLOCKS: u64 = 4096;

/// The largest write [`Volume::write_may_block`] answers for: callers that
/// run writes up to this size on their event loop (the NBD server's inline
/// requests are at most 64 KiB by default) learn when one would open a
/// segment file.
pub const SMALL_WRITE_BYTES: u64 = 64 * 1024;

/// A handle to an open volume. Cheap to clone; every clone (and every
/// [`Store::open_volume`](crate::Store::open_volume) of the same volume while one is
/// open) shares one instance, so a flush through any handle covers writes made
/// through all of them. The last handle to drop flushes.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<VolumeInner>,
}

/// One extent of [`Volume::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the extent, in bytes.
    pub len: u64,
    /// Whether the extent holds written data (`false`: a hole that reads as zeros).
    pub allocated: bool,
}

/// Counters of one volume, for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct VolumeStats {
    /// Blocks that failed authentication since the volume was opened.
    pub auth_failures: u64,
    /// Flushes that synced and committed something.
    pub commits: u64,
    /// Metadata bytes (keys and values) written by mapping commits.
    pub metadata_bytes: u64,
    /// Block mappings currently held in the memory overlay.
    pub overlay_blocks: u64,
    /// Blocks compaction moved since the volume was opened.
    pub compacted_blocks: u64,
    /// Segments compaction deleted since the volume was opened.
    pub deleted_segments: u64,
    /// Metadata bytes (keys and values) written by compaction's and
    /// re-encryption's mapping commits (not counted in `metadata_bytes`).
    pub compaction_metadata_bytes: u64,
    /// Blocks re-encrypted under a newer data key since the volume was opened.
    pub reencrypted_blocks: u64,
    /// Data key rotations the volume's nonce budget triggered since it was
    /// opened (see [`nonce::dek_limit`](crate::nonce::dek_limit)).
    pub automatic_rotations: u64,
    /// Nonces spent under the active data key (committed or reserved).
    pub nonces_used: u64,
    /// Nonces one data key may spend ([`nonce::dek_limit`](crate::nonce::dek_limit));
    /// it is rotated when half are spent.
    pub nonce_budget: u64,
}

/// Where a block's current version lives, or that it reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Mapped(Location),
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    segment: u32,
    offset: u32,
    dek_version: u32,
    /// The writer whose key sealed the block (see [`Writer`]).
    writer: u32,
    nonce: u64,
    tag: [u8; TAG_LEN],
}

/// The key this volume seals new blocks with: a subkey of the active DEK with a
/// fresh random salt, made by the first write of each open (and again whenever
/// its nonce counter is spent). Its counter lives only in memory and starts at
/// zero: nonce uniqueness rests on the salt, never on metadata that could be
/// lost or rolled back. Its record (number and salt) is committed with, never
/// after, the first extent that names it.
struct Writer {
    number: u32,
    /// The DEK version the writer key derives from (the AAD binds it).
    dek_version: u32,
    cipher: Arc<BlockCipher>,
}

struct Head {
    /// The open segment, once created in this session.
    segment: Option<u32>,
    /// The next segment index to create.
    next_index: u32,
    /// The next free block of the open segment.
    next_block: u32,
    /// The current writer, once the first write made it.
    writer: Option<Writer>,
    /// The current writer's next nonce counter.
    next_nonce: u64,
    /// The number the next writer takes.
    next_writer: u32,
}

/// A writer known to the volume: its record, and its cipher once derived.
struct KnownWriter {
    record: WriterRecord,
    cipher: OnceLock<Arc<BlockCipher>>,
}

#[derive(Default)]
struct Overlay {
    /// Uncommitted mapping changes, with the generation that made each.
    map: BTreeMap<u64, (Slot, u64)>,
    /// Bumped by every installed change.
    generation: u64,
}

struct FlushState {
    /// Every change of this generation or older is durable.
    durable: u64,
    /// Live (mapped, committed) blocks per segment: mapped by the volume or
    /// held by a snapshot.
    live: HashMap<u32, u64>,
    /// The volume's snapshot state (see [`snapshot`]).
    snap: SnapState,
    /// Mapping journal records not folded into the pages yet (see [`journal`]).
    journal: journal::Journal,
}

/// The epoch new writes are born in, and the newest snapshot's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Epochs {
    /// The epoch new writes are born in.
    pub(crate) epoch: u32,
    /// The newest snapshot's epoch, if the volume has a snapshot.
    pub(crate) newest: Option<u32>,
}

/// A volume's snapshot epochs, as committed; changed under the flush lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapState {
    epochs: Epochs,
    /// Blocks per segment that only preserved records (snapshots) reference:
    /// compaction leaves them where they are.
    pinned: HashMap<u32, u64>,
}

pub(crate) struct VolumeInner {
    tenant: TenantId,
    name: VolumeId,
    internal_id: u32,
    /// Size in bytes. Changed by [`Store::resize_volume`](crate::Store::resize_volume)
    /// while the volume is open: every bounds check loads it, and a write
    /// loads it again under the install gate (see [`VolumeInner::shrink`]).
    size: AtomicU64,
    block_size: BlockSize,
    segment_blocks: u32,
    overlay_limit: usize,
    meta: Arc<dyn MetaStore>,
    segments: Arc<dyn SegmentStore>,
    /// Every DEK version the volume holds, for deriving writer keys. A
    /// rotation adds one; re-encryption's last step removes the old ones.
    deks: RwLock<HashMap<u32, DataKey>>,
    /// The DEK version new writers derive from. Changed only under the head
    /// lock, together with dropping the current writer (see `reencrypt`).
    active_dek: AtomicU32,
    /// The most nonces one writer key seals with.
    nonce_limit: u64,
    /// Every writer whose blocks may be mapped (recorded or made this session);
    /// writer 0 stands for blocks format v1 sealed under a DEK itself.
    writers: RwLock<HashMap<u32, KnownWriter>>,
    /// Records of writers made this session and not yet committed.
    pending_writers: Mutex<Vec<(u32, WriterRecord)>>,
    head: Mutex<Head>,
    overlay: Mutex<Overlay>,
    dirty_segments: Mutex<BTreeSet<u32>>,
    flush: Mutex<FlushState>,
    /// Held by a write across the read-modify-write of a partial block at its
    /// edges (block `b` maps to stripe `b % STRIPES`): two writes to different
    /// bytes of one block never lose either.
    stripes: Box<[Mutex<()>]>,
    /// Held shared by every write from its allocation of segment space until
    /// its mappings are in the overlay; compaction takes it exclusively for an
    /// instant to wait for writes into segments it is about to judge.
    installing: RwLock<()>,
    poisoned: AtomicBool,
    auth_failures: AtomicU64,
    commits: AtomicU64,
    metadata_bytes: AtomicU64,
    /// Pages the mapping journal touches, and when its oldest record was
    /// committed (0: no journal), for the flush thread to read without the
    /// flush lock (see [`journal`]).
    journal_pages: AtomicUsize,
    journal_since: AtomicU64,
    /// Runs of nearby pages a commit must touch to be journaled.
    journal_min_runs: usize,
    /// The store-wide histogram of flushes' segment syncs.
    sync_latency: Arc<LatencyHistogram>,
    /// Held by each step of a compaction or re-encryption pass of this
    /// volume, and by the destruction of old data keys (first in the lock
    /// order after `compacting`). Never held across a pacing sleep.
    compaction: Mutex<()>,
    /// Held by a compaction pass for its whole length: passes never overlap
    /// (first in the lock order).
    compacting: Mutex<()>,
    /// Segments whose live fraction is below this are compacted.
    compact_threshold: f64,
    /// Wakes the store's compaction thread, when there is one.
    wake: Option<Arc<Wakeup>>,
    /// The store's background flush queue, when there is one.
    flusher: Option<Arc<FlushQueue>>,
    /// This volume, for queueing it on `flusher`.
    me: Weak<VolumeInner>,
    /// Opened when this instance has finished closing (its last flush done).
    closed: Arc<Closed>,
    /// Reads hold it shared from their lookup to the end of their segment reads;
    /// compaction holds it exclusively only to delete a segment, so no read can
    /// be holding a location in a segment that disappears (see [`compact`]).
    segment_reads: RwLock<()>,
    compacted_blocks: AtomicU64,
    deleted_segments: AtomicU64,
    compaction_metadata_bytes: AtomicU64,
    /// The committed mappings in memory, when the budget allows (see
    /// [`index`]); `None`: reads look mappings up in the metadata store.
    index: RwLock<Option<ExtentIndex>>,
    /// The store-wide budget `index` is charged to.
    budget: Arc<IndexBudget>,
    /// Lookups that went to the metadata store / to the index since the
    /// budget's last pass (which moves indexes to where reads are).
    store_lookups: AtomicU64,
    /// `requests` when the budget's last pass looked.
    requests_at_pass: AtomicU64,
    /// Reads and writes served since the volume opened (compaction's pacing
    /// watches its rate).
    requests: AtomicU64,
    /// DEK rotation and re-encryption state (see [`reencrypt`]).
    rekey: reencrypt::Rekey,
}

/// Everything [`Volume::open`] needs, assembled by the store.
pub(crate) struct VolumeParts {
    pub(crate) tenant: TenantId,
    pub(crate) name: VolumeId,
    pub(crate) internal_id: u32,
    pub(crate) size: u64,
    pub(crate) block_size: BlockSize,
    pub(crate) segment_bytes: u64,
    pub(crate) overlay_limit: usize,
    pub(crate) meta: Arc<dyn MetaStore>,
    pub(crate) segments: Arc<dyn SegmentStore>,
    /// The active DEK first, then older ones still referenced.
    pub(crate) keys: Vec<DataKey>,
    /// Sealed segments whose live fraction is below this are compacted.
    pub(crate) compact_threshold: f64,
    /// The store's compaction thread, woken when flushes leave dead space.
    pub(crate) wake: Option<Arc<Wakeup>>,
    pub(crate) flusher: Option<Arc<FlushQueue>>,
    /// Signalled when the instance has finished closing.
    pub(crate) closed: Arc<Closed>,
    /// A lower limit of seals per writer key (tests of writer turnover).
    pub(crate) nonce_limit: Option<u64>,
    /// Runs of nearby pages a commit must touch to be journaled.
    pub(crate) journal_min_runs: usize,
    /// The store-wide budget of extent index memory.
    pub(crate) index_budget: Arc<IndexBudget>,
    /// The store-wide histogram of flushes' segment syncs.
    pub(crate) sync_latency: Arc<LatencyHistogram>,
    /// What DEK rotation and re-encryption need from the store.
    pub(crate) rekey: RekeyParts,
}

/// A one-way gate, shut until something finishes. Each volume instance has one
/// that opens once it has flushed on close: the store's registry waits on it
/// before opening a new instance of the same volume, so two instances never
/// hold mappings of one volume at a time (a new one would miss the old one's
/// unflushed writes, and the old one's late commit would overwrite the new
/// one's). The registry also uses one per open in progress.
#[derive(Default)]
pub(crate) struct Closed {
    done: Mutex<bool>,
    signal: std::sync::Condvar,
}

impl Closed {
    pub(crate) fn is_open(&self) -> bool {
        *self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the instance has finished closing.
    pub(crate) fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = self.signal.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn open(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signal.notify_all();
    }

    /// Waits until the instance has finished closing, at most `limit`;
    /// returns whether it has.
    pub(crate) fn wait_timeout(&self, limit: std::time::Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .signal
            .wait_timeout_while(done, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }
}

impl Volume {
    pub(crate) fn open(parts: VolumeParts) -> Result<Volume, VolumeError> {
        let VolumeParts {
            tenant,
            name,
            internal_id,
            size,
            block_size,
            segment_bytes,
            overlay_limit,
            meta,
            segments,
            keys,
            compact_threshold,
            wake,
            flusher,
            closed,
            nonce_limit,
            journal_min_runs,
            index_budget,
            sync_latency,
            rekey,
        } = parts;
        let active_dek = keys
            .first()
            .ok_or_else(|| VolumeError::Corrupt {
                what: "volume record lists no data key".into(),
            })?
            .version()
            .0;
        let deks: HashMap<u32, DataKey> = keys.into_iter().map(|k| (k.version().0, k)).collect();
        let writers = load_writers(meta.as_ref(), internal_id)?;
        let next_writer = match writers.keys().max() {
            Some(&max) => max.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
                what: "writer numbers are spent".into(),
            })?,
            None => 1,
        };

        // What a crash left in the mapping journal goes into the pages now:
        // an open volume journals only on top of its index.
        let folded =
            crate::mapping::fold_stored_journal(meta.as_ref(), internal_id)?.map_err(corrupt)?;
        if folded > 0 {
            tracing::info!(%tenant, volume = %name, records = folded, "folded the mapping journal");
        }
        let mut live = HashMap::new();
        let mut bad = None;
        meta.scan_prefix(&record::live_prefix(internal_id), &mut |key, value| {
            // A short key would panic a slice and a long one alias segment 0:
            // both are corrupt metadata, reported as such.
            let decoded = record::live_key_segment(key).and_then(|segment| {
                record::decode_u64(value, "live count").map(|count| (segment, count))
            });
            match decoded {
                Ok((segment, count)) => {
                    live.insert(segment, count);
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
        let preserved = snapshot::load_preserved(meta.as_ref(), internal_id, &deks, &writers)?;
        let (mut named, index) = check_extents(
            meta.as_ref(),
            internal_id,
            &deks,
            &writers,
            &live,
            &preserved.per_segment,
            index_budget.limit(),
        )?;
        named.extend(preserved.writers.iter().copied());
        // The open scan read every record anyway: keep them when they fit.
        let index = index.filter(|index| index_budget.try_charge(index.bytes()));
        // Writers no extent names any more (their blocks were overwritten,
        // trimmed or never committed) are forgotten: nothing will ever need
        // their keys. No other instance of this volume runs now, so nothing
        // can start naming them meanwhile.
        let unnamed: Vec<u32> = writers
            .keys()
            .copied()
            .filter(|n| !named.contains(n))
            .collect();
        let mut writers = writers;
        if !unnamed.is_empty() {
            let mut batch = Batch::new();
            for n in &unnamed {
                batch.delete(record::writer_key(internal_id, *n).to_vec());
                writers.remove(n);
            }
            meta.commit(&batch)?;
        }

        // Writing resumes in a fresh segment: the tail of the last one may hold
        // unsynced bytes from before a crash, which nothing references.
        let existing = segments
            .list(internal_id)
            .map_err(VolumeError::Io)?
            .last()
            .copied();
        let next_index = match existing {
            Some(last) => last.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
                what: "segment index space is spent".into(),
            })?,
            None => 0,
        };
        let segment_blocks =
            (segment_bytes / u64::from(block_size.get())).clamp(1, u32::MAX.into());
        let nonce_limit = nonce_limit
            .unwrap_or(u64::MAX)
            .min(crate::nonce::default_limit(block_size));
        let rekey = reencrypt::Rekey::load(
            meta.as_ref(),
            internal_id,
            active_dek,
            deks.len(),
            nonce_limit,
            rekey,
        )?;

        Ok(Volume {
            inner: Arc::new_cyclic(|me| VolumeInner {
                tenant,
                name,
                internal_id,
                size: AtomicU64::new(size),
                block_size,
                segment_blocks: segment_blocks as u32,
                overlay_limit: overlay_limit.max(1),
                meta,
                segments,
                deks: RwLock::new(deks),
                active_dek: AtomicU32::new(active_dek),
                nonce_limit,
                writers: RwLock::new(
                    writers
                        .into_iter()
                        .map(|(n, record)| {
                            let known = KnownWriter {
                                record,
                                cipher: OnceLock::new(),
                            };
                            (n, known)
                        })
                        .collect(),
                ),
                pending_writers: Mutex::new(Vec::new()),
                head: Mutex::new(Head {
                    segment: None,
                    next_index,
                    next_block: 0,
                    writer: None,
                    next_nonce: 0,
                    next_writer,
                }),
                overlay: Mutex::new(Overlay::default()),
                dirty_segments: Mutex::new(BTreeSet::new()),
                flush: Mutex::new(FlushState {
                    durable: 0,
                    live,
                    snap: SnapState {
                        epochs: preserved.epochs,
                        pinned: preserved.per_segment,
                    },
                    journal: journal::Journal::default(),
                }),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                installing: RwLock::new(()),
                poisoned: AtomicBool::new(false),
                auth_failures: AtomicU64::new(0),
                commits: AtomicU64::new(0),
                metadata_bytes: AtomicU64::new(0),
                journal_pages: AtomicUsize::new(0),
                journal_since: AtomicU64::new(0),
                journal_min_runs,
                compaction: Mutex::new(()),
                compacting: Mutex::new(()),
                compact_threshold: compact_threshold.clamp(0.0, 1.0),
                wake,
                flusher,
                me: me.clone(),
                closed,
                segment_reads: RwLock::new(()),
                compacted_blocks: AtomicU64::new(0),
                deleted_segments: AtomicU64::new(0),
                compaction_metadata_bytes: AtomicU64::new(0),
                index: RwLock::new(index),
                budget: index_budget,
                sync_latency,
                store_lookups: AtomicU64::new(0),
                requests_at_pass: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                rekey,
            }),
        })
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<VolumeInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn from_inner(inner: Arc<VolumeInner>) -> Volume {
        Volume { inner }
    }

    pub(crate) fn inner(&self) -> &VolumeInner {
        &self.inner
    }

    /// The tenant owning the volume.
    pub fn tenant(&self) -> &TenantId {
        &self.inner.tenant
    }

    /// The volume's name.
    pub fn name(&self) -> &VolumeId {
        &self.inner.name
    }

    /// The volume's size, in bytes.
    pub fn len(&self) -> u64 {
        self.inner.size()
    }

    /// Always `false`: a volume holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The volume's block size.
    pub fn block_size(&self) -> BlockSize {
        self.inner.block_size
    }

    /// Whether an earlier write or flush failed (the volume then refuses writes
    /// and flushes until reopened).
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// The volume's counters.
    pub fn stats(&self) -> VolumeStats {
        let i = &self.inner;
        VolumeStats {
            auth_failures: i.auth_failures.load(Ordering::Relaxed),
            commits: i.commits.load(Ordering::Relaxed),
            metadata_bytes: i.metadata_bytes.load(Ordering::Relaxed),
            overlay_blocks: i.lock_overlay().map.len() as u64,
            compacted_blocks: i.compacted_blocks.load(Ordering::Relaxed),
            deleted_segments: i.deleted_segments.load(Ordering::Relaxed),
            compaction_metadata_bytes: i.compaction_metadata_bytes.load(Ordering::Relaxed),
            reencrypted_blocks: i.rekey.reencrypted_blocks(),
            automatic_rotations: i.rekey.automatic_rotations(),
            nonces_used: i.rekey.nonces_used(),
            nonce_budget: i.rekey.nonce_budget(),
        }
    }

    /// `OutOfRange` unless `len` bytes at `offset` lie within the volume.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.inner.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at byte `offset`. Unwritten and trimmed ranges read
    /// as zeros. A block that fails authentication fails the whole request with
    /// [`VolumeError::Authentication`] naming it; other requests are unaffected.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let i = &self.inner;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        i.requests.fetch_add(1, Ordering::Relaxed);
        i.read_range(offset, buf)
    }

    /// Reads like [`read_at`](Self::read_at) if that needs no wait on a
    /// device: the block mappings are in memory (the overlay or the extent
    /// index) and the ciphertext in the page cache. `Ok(false)` instead of
    /// waiting, with `buf` unspecified: for an event loop that runs small
    /// reads in place and hands the ones that would wait to a thread. A block
    /// that fails authentication is an error here as in `read_at`.
    pub fn read_at_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        let i = &self.inner;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let done = i.read_range_cached(offset, buf);
        if !matches!(done, Ok(false)) {
            i.requests.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// Whether a write may block on I/O beyond its own now: the overlay of
    /// uncommitted mappings is past twice its bound (the disk is not keeping
    /// up), so the next write flushes before it returns; or a write of up to
    /// [`SMALL_WRITE_BYTES`] would open a new segment file, which creates the
    /// file and syncs its directory (under a busy disk, tens of milliseconds).
    /// An async caller that runs small writes on its event loop should run
    /// writes on a blocking thread while this holds.
    pub fn write_may_block(&self) -> bool {
        let i = &self.inner;
        if i.lock_overlay().map.len() >= i.overlay_limit.saturating_mul(2) {
            return true;
        }
        let small = SMALL_WRITE_BYTES.div_ceil(u64::from(i.block_size.get()));
        let head = i.lock_head();
        head.segment.is_none() || u64::from(i.segment_blocks - head.next_block) < small
    }

    /// Writes `data` at byte `offset`. Durable after the next [`flush`](Self::flush).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.inner
            .write_range(offset, Some(data), data.len() as u64)
    }

    /// Writes each buffer at its byte offset, in order, as
    /// [`write_at`](Self::write_at) would one after another, but consecutive
    /// writes of whole blocks share one allocation of segment space and one
    /// segment write per run of it, where `write_at` makes one each. One
    /// result per write, in order; durable after the next
    /// [`flush`](Self::flush).
    pub fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), VolumeError>> {
        self.inner.write_batch(writes)
    }

    /// Writes `data` at byte `offset` and makes it (and every write acknowledged
    /// before) durable before returning.
    pub fn write_at_fua(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.write_at(offset, data)?;
        self.flush()
    }

    /// Makes every acknowledged write durable: syncs segment data, then commits
    /// the mappings. Concurrent callers share one sync and one commit.
    pub fn flush(&self) -> Result<(), VolumeError> {
        self.inner.flush()
    }

    /// Discards `len` bytes at `offset`: they read as zeros afterwards.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.inner.write_range(offset, None, len)
    }

    /// Zeroes `len` bytes at `offset`. Whole blocks are unmapped (no data is
    /// written); partial blocks at the edges are rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.inner.write_range(offset, None, len)
    }

    /// Describes `len` bytes at `offset` as runs of allocated data and holes,
    /// in order, covering the range exactly. Block granular: a run's edges
    /// fall on block boundaries except at the ends of the range.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>, VolumeError> {
        let i = &self.inner;
        let size = i.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        let mut out: Vec<BlockStatus> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = u64::from(i.block_size.get());
        let first = offset / bs;
        let end_block = (offset + len - 1) / bs + 1;
        // Runs of blocks, walked extent by extent and overlay entry by entry:
        // memory and time follow the number of runs, not of blocks.
        let mut push = |from: u64, to: u64, allocated: bool| {
            let start = (from * bs).max(offset);
            let end = (to * bs).min(offset + len);
            match out.last_mut() {
                Some(e) if e.allocated == allocated => e.len += end - start,
                _ => out.push(BlockStatus {
                    len: end - start,
                    allocated,
                }),
            }
        };
        let overlay: Vec<(u64, bool)> = i
            .lock_overlay()
            .map
            .range(first..end_block)
            .map(|(&lba, &(slot, _))| (lba, matches!(slot, Slot::Mapped(_))))
            .collect();
        let mut committed: Vec<(u64, u64)> = Vec::new();
        i.visit_extents(first, end_block, &mut |extent| {
            let from = extent.lba.max(first);
            let to = (extent.last() + 1).min(end_block);
            match committed.last_mut() {
                Some((_, end)) if *end == from => *end = to,
                _ => committed.push((from, to)),
            }
        })?;
        let (mut pos, mut e, mut o) = (first, 0usize, 0usize);
        while pos < end_block {
            while e < committed.len() && committed[e].1 <= pos {
                e += 1;
            }
            if o < overlay.len() && overlay[o].0 == pos {
                // An uncommitted change decides this block.
                push(pos, pos + 1, overlay[o].1);
                pos += 1;
                o += 1;
                continue;
            }
            let next_overlay = overlay.get(o).map_or(end_block, |&(lba, _)| lba);
            let (allocated, to) = match committed.get(e) {
                Some(&(from, to)) if from <= pos => (true, to),
                Some(&(from, _)) => (false, from),
                None => (false, end_block),
            };
            let to = to.min(next_overlay).min(end_block);
            push(pos, to, allocated);
            pos = to;
        }
        Ok(out)
    }

    /// Compacts the volume now, without the background throttle: flushes, then
    /// moves the live blocks of every sealed segment whose live fraction is below
    /// the store's threshold ([`StoreOptions::compaction_threshold`]) to the head
    /// and deletes the segments nothing references any more. Returns what it did.
    ///
    /// [`StoreOptions::compaction_threshold`]: crate::StoreOptions::compaction_threshold
    pub fn compact_now(&self) -> Result<CompactionReport, VolumeError> {
        self.inner
            .compact(self.inner.compact_threshold, &mut |_| true)
    }

    /// Flushes; the handle stays usable (other handles may share the volume).
    pub fn close(self) -> Result<(), VolumeError> {
        self.flush()
    }
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("tenant", &self.inner.tenant)
            .field("volume", &self.inner.name)
            .field("size", &self.inner.size())
            .field("block_size", &self.inner.block_size.get())
            .finish_non_exhaustive()
    }
}

impl Drop for VolumeInner {
    fn drop(&mut self) {
        // Opened however the flush below ends, a panic included: a gate left
        // shut would block every later open of this volume.
        struct OpenOnDrop(Arc<Closed>);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        let _open = OpenOnDrop(self.closed.clone());
        if !self.poisoned.load(Ordering::Acquire)
            && let Err(error) = self.flush()
        {
            tracing::error!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "flushing a closing volume failed"
            );
        }
        // A journal left here is folded at the next open.
        if !self.poisoned.load(Ordering::Acquire)
            && let Err(error) = self.fold_journal()
        {
            tracing::warn!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "folding a closing volume's mapping journal failed"
            );
        }
        // Before the gate opens: the next instance charges its own.
        self.release_index();
    }
}

impl VolumeInner {
    fn lock_overlay(&self) -> MutexGuard<'_, Overlay> {
        // Every critical section on the overlay is a handful of map operations
        // that cannot panic half-way; a poisoned lock still holds a valid map.
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_head(&self) -> MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_dirty(&self) -> MutexGuard<'_, BTreeSet<u32>> {
        self.dirty_segments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn poison(&self) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(
                tenant = %self.tenant,
                volume = %self.name,
                "volume poisoned after a failed write or sync; reopen it"
            );
        }
    }

    /// The error for a failed segment create or write: a shortage that may pass
    /// (no space, descriptors, memory) leaves the volume usable, since nothing
    /// referenced changed; anything else poisons it.
    fn write_failed(&self, error: std::io::Error) -> VolumeError {
        if crate::segment::is_storage_full(&error) {
            tracing::warn!(tenant = %self.tenant, volume = %self.name, %error, "write refused: no space");
            VolumeError::StorageFull(error)
        } else if crate::segment::is_transient(&error) {
            tracing::warn!(tenant = %self.tenant, volume = %self.name, %error, "write failed for lack of a resource");
            if error.raw_os_error() == Some(28) {
                VolumeError::StorageFull(error)
            } else {
                VolumeError::Resource(error)
            }
        } else {
            self.poison();
            VolumeError::Io(error)
        }
    }

    fn check_poisoned(&self) -> Result<(), VolumeError> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(VolumeError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn segment_id(&self, index: u32) -> SegmentId {
        SegmentId {
            volume: self.internal_id,
            index,
        }
    }

    /// Reads and writes served since the volume opened.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The volume's current size, in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Raises the size to `new_size` (the caller committed it first; blocks
    /// past the old end hold no mapping, so they read as zeros).
    pub(crate) fn grow(&self, new_size: u64) {
        self.size.fetch_max(new_size, Ordering::AcqRel);
    }

    /// Lowers the size to `new_size` (a multiple of the block size), for a
    /// shrink the caller commits afterwards. Writes past the new end are
    /// refused from now on; then the mappings past it are looked at, after a
    /// flush so that the metadata holds them all. When one exists it is trimmed
    /// durably if `discard_tail`, else the old size comes back and the result is
    /// `Ok(Err(first mapped byte))`.
    ///
    /// Why no write can slip past: a write loads the size again under the
    /// install gate's shared side before it installs a mapping, and this takes
    /// the gate's exclusive side (after lowering the size) for an instant, so
    /// every install that could have seen the old size has finished before
    /// the check below.
    pub(crate) fn shrink(
        &self,
        new_size: u64,
        discard_tail: bool,
    ) -> Result<Result<(), u64>, VolumeError> {
        let old = self.size.swap(new_size, Ordering::AcqRel);
        let restore = |inner: &VolumeInner| {
            inner.size.store(old, Ordering::Release);
        };
        drop(self.installing.write().unwrap_or_else(|e| e.into_inner()));
        let bs = self.block_size.len() as u64;
        let (new_blocks, old_blocks) = (new_size / bs, old.div_ceil(bs));
        let first = match self
            .flush()
            .and_then(|()| self.first_mapped(new_blocks, old_blocks))
        {
            Ok(first) => first,
            Err(e) => {
                restore(self);
                return Err(e);
            }
        };
        let Some(first) = first else {
            return Ok(Ok(()));
        };
        if !discard_tail {
            restore(self);
            return Ok(Err(first * bs));
        }
        if let Err(e) = self.trim_direct(new_blocks, old_blocks) {
            restore(self);
            return Err(e);
        }
        Ok(Ok(()))
    }

    /// Puts back the size `shrink` lowered, when committing the new size failed
    /// (a trimmed tail stays trimmed).
    pub(crate) fn undo_shrink(&self, old_size: u64) {
        self.size.store(old_size, Ordering::Release);
    }

    /// The first committed mapped block in `from..to`, if any.
    fn first_mapped(&self, from: u64, to: u64) -> Result<Option<u64>, VolumeError> {
        let mut first: Option<u64> = None;
        self.visit_extents(from, to, &mut |extent| {
            let lba = extent.lba.max(from);
            first = Some(first.map_or(lba, |f| f.min(lba)));
        })?;
        Ok(first)
    }
}

fn corrupt(e: record::Corrupt) -> VolumeError {
    VolumeError::Corrupt { what: e.0 }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockseal_keys::{MasterKey, TenantId, VolumeId};

    use crate::meta::{self, Batch, MetaStore};
    use crate::{Store, StoreOptions, VolumeError, VolumeOptions, record};

    /// A new store (in a temporary directory) with one volume `acme/v` of
    /// `blocks` blocks of 512 bytes, open.
    fn volume_of_512_byte_blocks(
        options: StoreOptions,
        blocks: u64,
    ) -> (tempfile::TempDir, Store, super::Volume) {
        volume_of_512_byte_blocks_in(tempfile::tempdir().unwrap(), options, blocks)
    }

    fn volume_of_512_byte_blocks_in(
        dir: tempfile::TempDir,
        options: StoreOptions,
        blocks: u64,
    ) -> (tempfile::TempDir, Store, super::Volume) {
        let store = Store::create(dir.path(), MasterKey::generate().unwrap(), options).unwrap();
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        store.create_tenant(&tenant).unwrap();
        let options = VolumeOptions {
            block_size: crate::BlockSize::new(512).unwrap(),
        };
        store
            .create_volume(&tenant, &name, blocks * 512, options)
            .unwrap();
        let volume = store.open_volume(&tenant, &name).unwrap();
        (dir, store, volume)
    }

    /// Block status walked run by run agrees with a block-by-block lookup,
    /// over committed extents, uncommitted writes and trims, and both together.
    #[test]
    fn block_status_runs_match_a_per_block_lookup() {
        use super::{BlockStatus, Slot};
        use rand::{Rng, SeedableRng};
        let (_dir, _store, volume) =
            volume_of_512_byte_blocks(StoreOptions::new().background_compaction(false), 512);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..300 {
            let lba = rng.random_range(0..512u64);
            let count = rng.random_range(1..=20u64).min(512 - lba);
            if rng.random_bool(0.7) {
                volume
                    .write_at(lba * 512, &vec![1u8; count as usize * 512])
                    .unwrap();
            } else {
                volume.trim(lba * 512, count * 512).unwrap();
            }
            if round % 7 == 0 {
                volume.flush().unwrap();
            }
            let offset = rng.random_range(0..512 * 512u64);
            let len = rng.random_range(0..=512 * 512 - offset);
            let got = volume.block_status(offset, len).unwrap();
            // The reference: one slot per block.
            let mut want: Vec<BlockStatus> = Vec::new();
            if len > 0 {
                let (first, last) = (offset / 512, (offset + len - 1) / 512);
                let slots = volume
                    .inner
                    .lookup_with(first, last - first + 1, true)
                    .unwrap()
                    .expect("a lookup that may wait answers");
                for (n, slot) in slots.iter().enumerate() {
                    let lba = first + n as u64;
                    let (start, end) =
                        ((lba * 512).max(offset), ((lba + 1) * 512).min(offset + len));
                    let allocated = matches!(slot, Some(Slot::Mapped(_)));
                    match want.last_mut() {
                        Some(e) if e.allocated == allocated => e.len += end - start,
                        _ => want.push(BlockStatus {
                            len: end - start,
                            allocated,
                        }),
                    }
                }
            }
            assert_eq!(got, want, "round {round}: {offset}+{len}");
        }
    }

    /// Reads agree with a model whether mappings come from the index or the
    /// store, through index drops and reloads between writes, trims, flushes
    /// and compactions.
    #[test]
    fn reads_agree_with_and_without_the_index() {
        use rand::{Rng, SeedableRng};
        // 25 mapping pages: a flush of a few scattered writes journals.
        const BLOCKS: u64 = 1024;
        let options = StoreOptions::new()
            .background_compaction(false)
            .segment_bytes(32 * 512)
            .overlay_blocks(64)
            .danger_journal_min_runs(1);
        let (_dir, _store, volume) = volume_of_512_byte_blocks(options, BLOCKS);
        assert!(volume.inner.has_index());
        let mut model = vec![0u8; (BLOCKS * 512) as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut journaled = false;
        for round in 0..400u32 {
            let lba = rng.random_range(0..BLOCKS);
            let count = rng.random_range(1..=8u64).min(BLOCKS - lba);
            let (at, len) = ((lba * 512) as usize, (count * 512) as usize);
            match rng.random_range(0..11) {
                0..=5 => {
                    let fill = (round % 251) as u8 + 1;
                    volume.write_at(at as u64, &vec![fill; len]).unwrap();
                    model[at..at + len].fill(fill);
                }
                10 => volume.inner.fold_journal().unwrap(),
                6 => {
                    volume.trim(at as u64, len as u64).unwrap();
                    model[at..at + len].fill(0);
                }
                7 => volume.flush().unwrap(),
                8 => {
                    volume.compact_now().unwrap();
                }
                _ => {
                    if volume.inner.has_index() {
                        volume.inner.drop_index();
                    } else {
                        assert!(volume.inner.load_index().unwrap());
                    }
                }
            }
            journaled |= volume.inner.has_journal();
            let mut got = vec![0u8; model.len()];
            volume.read_at(0, &mut got).unwrap();
            assert!(got == model, "round {round}");
        }
        assert!(journaled, "no commit went into the mapping journal");
        // The store's pages with its journal hold what the index holds.
        volume.flush().unwrap();
        let (mut from_index, mut from_journal) = (Vec::new(), Vec::new());
        volume
            .inner
            .visit_extents(0, BLOCKS, &mut |e| from_index.push(e.to_extent()))
            .unwrap();
        let meta = volume.inner.meta.as_ref();
        crate::mapping::scan_extents(meta, volume.inner.internal_id, 0, &mut |e| {
            from_journal.push(e);
            true
        })
        .unwrap()
        .unwrap();
        assert_eq!(from_index, from_journal);
        // A reloaded index holds exactly what the store holds.
        volume.inner.drop_index();
        assert!(volume.inner.state_journal_is_empty());
        assert!(volume.inner.load_index().unwrap());
        let mut from_index = Vec::new();
        volume
            .inner
            .visit_extents(0, BLOCKS, &mut |e| from_index.push(e.to_extent()))
            .unwrap();
        let mut from_store = Vec::new();
        volume
            .inner
            .scan_store(0, BLOCKS, &mut |e| from_store.push(e))
            .unwrap();
        assert_eq!(from_index, from_store);
        assert_eq!(
            volume.inner.budget.used(),
            volume.inner.index.read().unwrap().as_ref().unwrap().bytes()
        );
    }

    /// A cached read answers from memory alone, and gives way (`false`)
    /// where it would read the metadata store (no extent index) or wait for
    /// a segment's device (pages not cached); a plain read answers then.
    #[test]
    fn cached_reads_give_way_where_a_read_would_wait() {
        const BLOCKS: u64 = 64;
        let (dir, _store, volume) = volume_of_512_byte_blocks_in(
            crate::segment::disk_tempdir(),
            StoreOptions::new().background_compaction(false),
            BLOCKS,
        );
        let model: Vec<u8> = (0..BLOCKS * 512).map(|i| (i / 512) as u8 + 1).collect();
        volume.write_at(0, &model).unwrap();
        volume.flush().unwrap();
        let mut got = vec![0u8; model.len()];
        assert!(volume.read_at_cached(0, &mut got).unwrap());
        assert_eq!(got, model);
        // Unaligned, inside one block.
        let mut small = [0u8; 100];
        assert!(volume.read_at_cached(512 * 3 + 7, &mut small).unwrap());
        assert_eq!(small[..], model[512 * 3 + 7..512 * 3 + 107]);

        // Without the index, committed mappings are in the store only.
        volume.inner.drop_index();
        assert!(!volume.read_at_cached(0, &mut got).unwrap());
        got.fill(0);
        volume.read_at(0, &mut got).unwrap();
        assert_eq!(got, model);
        assert!(volume.inner.load_index().unwrap());

        // With the segments' pages dropped from the cache.
        let drop_cache = || {
            for volume_dir in std::fs::read_dir(dir.path().join("segments")).unwrap() {
                for file in std::fs::read_dir(volume_dir.unwrap().path()).unwrap() {
                    let file = std::fs::File::open(file.unwrap().path()).unwrap();
                    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                }
            }
        };
        drop_cache();
        assert!(!volume.read_at_cached(0, &mut got).unwrap());
        got.fill(0);
        volume.read_at(0, &mut got).unwrap();
        assert_eq!(got, model);
        got.fill(0);
        assert!(volume.read_at_cached(0, &mut got).unwrap());
        assert_eq!(got, model);
        // Out of range is an error, as for a plain read.
        assert!(volume.read_at_cached(BLOCKS * 512, &mut small).is_err());
    }

    /// A flush of scattered blocks writes one journal record, not a page per
    /// block; the flush thread's fold, an index given up and a close each
    /// leave the pages alone holding the mappings.
    #[test]
    fn flushes_journal_and_folds_leave_the_pages_whole() {
        let (_dir, store, volume) =
            volume_of_512_byte_blocks(StoreOptions::new().background_compaction(false), 1 << 16);
        let id = volume.inner.internal_id;
        let meta = volume.inner.meta.clone();
        let count = |prefix: &[u8]| {
            let mut n = 0;
            meta.scan_prefix(prefix, &mut |_, _| {
                n += 1;
                true
            })
            .unwrap();
            n
        };
        for round in 0..3u64 {
            for k in 0..50u64 {
                volume
                    .write_at((k * 400 + round) * 512, &[(k + round) as u8 + 1; 512])
                    .unwrap();
            }
            volume.flush().unwrap();
        }
        assert_eq!(
            count(&record::journal_prefix(id)),
            3,
            "one record per flush"
        );
        assert_eq!(count(&record::page_prefix(id)), 0, "no page written yet");
        assert!(
            volume.inner.journal_due().is_none(),
            "young and small: not due"
        );
        volume.inner.fold_journal().unwrap();
        assert_eq!(count(&record::journal_prefix(id)), 0);
        assert_eq!(count(&record::page_prefix(id)), 50);
        // A change of one run of pages rewrites its page at once.
        volume.write_at(3 * 512, &[9; 512]).unwrap();
        volume.flush().unwrap();
        assert_eq!(count(&record::journal_prefix(id)), 0);
        // Given up index: folded first, so the pages alone serve reads.
        for k in 0..10u64 {
            volume.write_at((k * 1000 + 7) * 512, &[11; 512]).unwrap();
        }
        volume.flush().unwrap();
        assert_eq!(count(&record::journal_prefix(id)), 1);
        volume.inner.drop_index();
        assert_eq!(count(&record::journal_prefix(id)), 0);
        let mut block = [0u8; 512];
        volume.read_at(3 * 512, &mut block).unwrap();
        assert_eq!(block, [9; 512]);
        volume.read_at((49 * 400 + 2) * 512, &mut block).unwrap();
        assert_eq!(block, [52; 512]);
        // A close folds what the volume journaled.
        assert!(volume.inner.load_index().unwrap());
        for k in 0..10u64 {
            volume.write_at((k * 1000 + 5) * 512, &[7; 512]).unwrap();
        }
        volume.flush().unwrap();
        assert_eq!(count(&record::journal_prefix(id)), 1);
        drop(volume);
        assert_eq!(count(&record::journal_prefix(id)), 0);
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        let volume = store.open_volume(&tenant, &name).unwrap();
        volume.read_at(5 * 512, &mut block).unwrap();
        assert_eq!(block, [7; 512]);
    }

    /// With room for one index, the volume being read gets it and the idle one
    /// gives it up.
    #[test]
    fn the_index_budget_moves_to_the_volume_being_read() {
        let dir = tempfile::tempdir().unwrap();
        // 100 scattered blocks make 100 single-block extents per volume.
        let one = 100 * super::index::ENTRY_BYTES;
        let options = StoreOptions::new()
            .background_compaction(false)
            .index_memory(one + one / 2);
        let store = Store::create(dir.path(), MasterKey::generate().unwrap(), options).unwrap();
        let tenant = TenantId::new("acme").unwrap();
        store.create_tenant(&tenant).unwrap();
        let mut volumes = Vec::new();
        for name in ["a", "b"] {
            let name = VolumeId::new(name).unwrap();
            store
                .create_volume(&tenant, &name, 4 << 20, VolumeOptions::default())
                .unwrap();
            let volume = store.open_volume(&tenant, &name).unwrap();
            for k in 0..100u64 {
                volume.write_at(k * 2 * 4096, &[k as u8 + 1; 4096]).unwrap();
            }
            volume.flush().unwrap();
            volumes.push(volume);
        }
        let (a, b) = (&volumes[0], &volumes[1]);
        assert!(a.inner.has_index(), "the first volume's index fits");
        assert!(!b.inner.has_index(), "the second one's does not");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut block = [0u8; 4096];
        while !b.inner.has_index() {
            assert!(std::time::Instant::now() < deadline, "b never got an index");
            b.read_at(2 * 4096, &mut block).unwrap();
            assert_eq!(block, [2u8; 4096]);
        }
        assert!(!a.inner.has_index(), "the idle volume gave its index up");
        a.read_at(0, &mut block).unwrap();
        assert_eq!(block, [1u8; 4096]);
    }

    #[test]
    fn malformed_live_count_keys_are_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetaStore> =
            Arc::from(meta::open(meta::BackendKind::Redb, &dir.path().join("meta")).unwrap());
        let options = StoreOptions::new()
            .metadata_store(meta.clone())
            .background_compaction(false);
        let master = MasterKey::generate().unwrap();
        let store = Store::create(dir.path().join("store"), master, options).unwrap();
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        store.create_tenant(&tenant).unwrap();
        store
            .create_volume(&tenant, &name, 1 << 20, VolumeOptions::default())
            .unwrap();
        // The first volume has internal id 1; its live-count keys are 9 bytes.
        for len in [5, 6, 8, 10] {
            let mut key = record::live_key(1, 0).to_vec();
            key.resize(len, 0);
            let mut batch = Batch::new();
            batch.put(key.clone(), record::encode_u64(1).to_vec());
            meta.commit(&batch).unwrap();
            let err = store.open_volume(&tenant, &name).unwrap_err();
            assert!(
                matches!(err, VolumeError::Corrupt { .. }),
                "{len}-byte key: {err}"
            );
            let mut batch = Batch::new();
            batch.delete(key);
            meta.commit(&batch).unwrap();
        }
        store.open_volume(&tenant, &name).unwrap();
    }
}
