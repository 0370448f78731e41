//! An open volume: the copy-on-write write path, the mapping overlay and flush.
//!
//! A write seals its blocks into fresh space at the head of the volume's open
//! segment, then records `lba -> (segment, offset, nonce counter, tag, DEK version)`
//! in a memory overlay that reads consult before the metadata store. A flush syncs
//! the segments written since the last flush, then commits the overlay to the
//! metadata store as extent records in one atomic batch (group commit: concurrent
//! flushers share one sync and one commit). Nothing is ever overwritten in place,
//! so a crash can never tear a block against its tag.
//!
//! Locks, in the only order they are taken: the compaction lock (one compaction
//! of a volume at a time; see [`compact`]), then the edge-block stripes of a
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
//!
//! This module must never log plaintext or keys, never acknowledge a flush before
//! both the segment sync and the metadata commit returned `Ok`, and never accept a
//! write after a failed write or sync (the volume is poisoned until reopened).

mod compact;
mod index;

pub use compact::CompactionReport;
pub(crate) use index::IndexBudget;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use blockseal_keys::{DataKey, TenantId, VolumeId};

use crate::block::{BlockSize, Lba};
use crate::compactor::Wakeup;
use crate::error::VolumeError;
use crate::flusher::FlushQueue;
use crate::meta::{Batch, MetaStore};
use crate::nonce::nonce_for;
use crate::record::{self, Extent, MAX_EXTENT_BLOCKS, WriterRecord};
use crate::seal::{BlockCipher, TAG_LEN, Tag};
use crate::segment::{SegmentId, SegmentStore};
use index::{ExtentIndex, ExtentView};

/// Number of lock stripes per volume for the partial blocks at the edges of
/// writes (a power of two).
const STRIPES: usize = 64;

/// Trims and zeroes covering at least this many whole blocks drop the mappings
/// with one direct commit instead of one overlay entry per block.
const DIRECT_TRIM_BLOCKS: u64 = 4096;

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
    /// Metadata bytes (keys and values) written by compaction's mapping commits
    /// (not counted in `metadata_bytes`).
    pub compaction_metadata_bytes: u64,
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

/// Block `k` of `extent`.
fn location(extent: &ExtentView<'_>, k: usize) -> Location {
    Location {
        segment: extent.segment,
        offset: extent.offset + k as u32,
        dek_version: extent.dek_version,
        writer: extent.writer,
        nonce: extent.nonce + k as u64,
        tag: extent.tags[k],
    }
}

/// The key this volume seals new blocks with: a subkey of the active DEK with a
/// fresh random salt, made by the first write of each open (and again whenever
/// its nonce counter is spent). Its counter lives only in memory and starts at
/// zero: nonce uniqueness rests on the salt, never on metadata that could be
/// lost or rolled back. Its record (number and salt) is committed with, never
/// after, the first extent that names it.
struct Writer {
    number: u32,
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
    /// Live (mapped, committed) blocks per segment.
    live: HashMap<u32, u64>,
}

pub(crate) struct VolumeInner {
    tenant: TenantId,
    name: VolumeId,
    internal_id: u32,
    size: u64,
    block_size: BlockSize,
    segment_blocks: u32,
    overlay_limit: usize,
    meta: Arc<dyn MetaStore>,
    segments: Arc<dyn SegmentStore>,
    /// Every DEK version the volume holds, for deriving writer keys.
    deks: HashMap<u32, DataKey>,
    /// The DEK version new writers derive from.
    active_dek: u32,
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
    /// Held by a compaction of this volume (first in the lock order).
    compaction: Mutex<()>,
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
    index_lookups: AtomicU64,
    /// Reads and writes served since the volume opened (compaction's pacing
    /// watches its rate).
    requests: AtomicU64,
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
    /// The store-wide budget of extent index memory.
    pub(crate) index_budget: Arc<IndexBudget>,
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
            index_budget,
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
        let (named, index) = check_extents(
            meta.as_ref(),
            internal_id,
            &deks,
            &writers,
            &live,
            index_budget.limit(),
        )?;
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

        Ok(Volume {
            inner: Arc::new_cyclic(|me| VolumeInner {
                tenant,
                name,
                internal_id,
                size,
                block_size,
                segment_blocks: segment_blocks as u32,
                overlay_limit: overlay_limit.max(1),
                meta,
                segments,
                deks,
                active_dek,
                nonce_limit: nonce_limit
                    .unwrap_or(u64::MAX)
                    .min(crate::nonce::default_limit(block_size)),
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
                flush: Mutex::new(FlushState { durable: 0, live }),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                installing: RwLock::new(()),
                poisoned: AtomicBool::new(false),
                auth_failures: AtomicU64::new(0),
                commits: AtomicU64::new(0),
                metadata_bytes: AtomicU64::new(0),
                compaction: Mutex::new(()),
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
                store_lookups: AtomicU64::new(0),
                index_lookups: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            }),
        })
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<VolumeInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn from_inner(inner: Arc<VolumeInner>) -> Volume {
        Volume { inner }
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
        self.inner.size
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
        }
    }

    /// Reads `buf.len()` bytes at byte `offset`. Unwritten and trimmed ranges read
    /// as zeros. A block that fails authentication fails the whole request with
    /// [`VolumeError::Authentication`] naming it; other requests are unaffected.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let i = &self.inner;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > i.size) {
            return Err(VolumeError::OutOfRange {
                offset,
                len,
                size: i.size,
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        i.requests.fetch_add(1, Ordering::Relaxed);
        i.read_range(offset, buf)
    }

    /// Writes `data` at byte `offset`. Durable after the next [`flush`](Self::flush).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.inner
            .write_range(offset, Some(data), data.len() as u64)
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
        if offset.checked_add(len).is_none_or(|end| end > i.size) {
            return Err(VolumeError::OutOfRange {
                offset,
                len,
                size: i.size,
            });
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
            .field("size", &self.inner.size)
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
        // Before the gate opens: the next instance charges its own.
        self.drop_index();
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

    /// Locks the stripes of the edge blocks a write reads, modifies and
    /// rewrites: block `first` when `head`, block `last` when `tail` (in
    /// ascending stripe order). Whole blocks need no lock: their install into
    /// the overlay is atomic, and concurrent writes to the same whole block may
    /// land in either order, as NBD allows for requests in flight together.
    fn lock_edges(&self, first: u64, last: u64, head: bool, tail: bool) -> Vec<MutexGuard<'_, ()>> {
        let mut indexes = Vec::with_capacity(2);
        if head {
            indexes.push(first as usize % STRIPES);
        }
        if tail {
            indexes.push(last as usize % STRIPES);
        }
        indexes.sort_unstable();
        indexes.dedup();
        indexes
            .into_iter()
            // The stripes guard no data of their own.
            .map(|s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// The current slot of each block `first..first + count` (`None`: never
    /// written since the last trim, reads as zeros).
    fn lookup(&self, first: u64, count: u64) -> Result<Vec<Option<Slot>>, VolumeError> {
        let mut slots = vec![None; count as usize];
        let mut missing = false;
        {
            let overlay = self.lock_overlay();
            let mut covered = 0u64;
            for (&lba, &(slot, _)) in overlay.map.range(first..first + count) {
                slots[(lba - first) as usize] = Some(slot);
                covered += 1;
            }
            if covered < count {
                missing = true;
            }
        }
        if missing {
            self.visit_extents(first, first + count, &mut |extent| {
                let from = extent.lba.max(first);
                let to = (extent.last() + 1).min(first + count);
                for lba in from..to {
                    let slot = &mut slots[(lba - first) as usize];
                    if slot.is_none() {
                        let k = (lba - extent.lba) as usize;
                        *slot = Some(Slot::Mapped(location(&extent, k)));
                    }
                }
            })?;
        }
        // A Zero slot and a hole read alike.
        Ok(slots
            .into_iter()
            .map(|s| match s {
                Some(Slot::Zero) => None,
                s => s,
            })
            .collect())
    }

    /// Visits the committed extents overlapping blocks `from..to`, in order:
    /// from the index when the volume has one, else from the metadata store.
    fn visit_extents(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(ExtentView<'_>),
    ) -> Result<(), VolumeError> {
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            if let Some(index) = index.as_ref() {
                self.index_lookups.fetch_add(1, Ordering::Relaxed);
                index.visit(from, to, visit);
                return Ok(());
            }
        }
        self.store_lookups.fetch_add(1, Ordering::Relaxed);
        self.scan_store(from, to, &mut |extent| visit(ExtentView::from(&extent)))
    }

    /// Visits the extent records overlapping blocks `from..to` in the metadata
    /// store, in order.
    fn scan_store(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(Extent),
    ) -> Result<(), VolumeError> {
        let start = record::extent_key(self.internal_id, from);
        let end = crate::meta::prefix_end(&record::extent_prefix(self.internal_id));
        let mut bad = None;
        self.meta.scan(
            &start,
            end.as_deref(),
            &mut |key, value| match Extent::decode(key, value) {
                Ok(extent) if extent.lba >= to => false,
                Ok(extent) => {
                    visit(extent);
                    true
                }
                Err(e) => {
                    bad = Some(e);
                    false
                }
            },
        )?;
        match bad {
            Some(e) => Err(corrupt(e)),
            None => Ok(()),
        }
    }

    /// Applies a durable mapping commit to the index (the caller holds the flush
    /// lock, and the overlay still holds the entries committed). An index that
    /// outgrows the store's budget is given up: reads then use the store.
    fn apply_to_index(&self, change: &MappingChange) {
        let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
        let Some(index) = guard.as_mut() else {
            return;
        };
        let before = index.bytes();
        for &last in &change.removed {
            index.remove(last);
        }
        for extent in &change.added {
            index.insert(extent);
        }
        let after = index.bytes();
        if after <= before {
            self.budget.release(before - after);
        } else if !self.budget.charge(after - before) {
            self.budget.release(after);
            *guard = None;
            tracing::debug!(
                tenant = %self.tenant,
                volume = %self.name,
                "extent index given up: the store's index budget is spent"
            );
        }
    }

    /// Whether the volume holds its mappings in memory.
    pub(crate) fn has_index(&self) -> bool {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Drops the index (its memory goes back to the budget). Returns the bytes
    /// released.
    pub(crate) fn drop_index(&self) -> usize {
        let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
        let bytes = guard.take().map_or(0, |index| index.bytes());
        self.budget.release(bytes);
        bytes
    }

    /// Builds the index from the metadata store if it fits in the budget (under
    /// the flush lock, so no commit changes the records meanwhile). Returns
    /// whether the volume has an index afterwards.
    pub(crate) fn load_index(&self) -> Result<bool, VolumeError> {
        let _state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if self.has_index() {
            return Ok(true);
        }
        let limit = self.budget.limit().saturating_sub(self.budget.used());
        let mut built = Some(ExtentIndex::default());
        self.scan_store(0, u64::MAX, &mut |extent| {
            if let Some(index) = built.as_mut() {
                index.insert(&extent);
                if index.bytes() > limit {
                    built = None;
                }
            }
        })?;
        match built {
            Some(index) if self.budget.try_charge(index.bytes()) => {
                *self.index.write().unwrap_or_else(|e| e.into_inner()) = Some(index);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reads and writes served since the volume opened.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Lookups that went to the store and to the index since the last call.
    pub(crate) fn take_lookup_counts(&self) -> (u64, u64) {
        (
            self.store_lookups.swap(0, Ordering::Relaxed),
            self.index_lookups.swap(0, Ordering::Relaxed),
        )
    }

    /// The cipher that opens a block at `loc`, derived on first use; `None` when
    /// the volume knows no such writer or the writer belongs to another DEK.
    fn cipher(&self, loc: &Location) -> Option<Arc<BlockCipher>> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        let known = writers.get(&loc.writer);
        if let Some(known) = known
            && known.record.dek_version != loc.dek_version
        {
            return None;
        }
        if let Some(cipher) = known.and_then(|k| k.cipher.get()) {
            return Some(cipher.clone());
        }
        let dek = self.deks.get(&loc.dek_version)?;
        let cipher = match known {
            Some(known) => known
                .cipher
                .get_or_init(|| {
                    let key = dek.derive_writer_key(loc.writer, &known.record.salt);
                    Arc::new(BlockCipher::new(&self.tenant, &self.name, &key))
                })
                .clone(),
            // Blocks format v1 sealed under the DEK itself. Rare (legacy data
            // only), so not cached.
            None if loc.writer == 0 => Arc::new(BlockCipher::new(&self.tenant, &self.name, dek)),
            None => return None,
        };
        Some(cipher)
    }

    fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        // The lookup and the segment reads happen under the shared side, so a
        // segment compaction deletes is never one this read still uses. It guards
        // no data: a panic elsewhere leaves it valid.
        let _no_deletion = self.segment_reads.read().unwrap_or_else(|e| e.into_inner());
        self.read_range_once(offset, buf)
    }

    fn read_range_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let first = offset / bs64;
        let last = (offset + buf.len() as u64 - 1) / bs64;
        let count = last - first + 1;
        let slots = self.lookup(first, count)?;
        if offset.is_multiple_of(bs64) && buf.len().is_multiple_of(bs) {
            return self.open_blocks(first, &slots, buf);
        }
        let mut scratch = vec![0u8; count as usize * bs];
        self.open_blocks(first, &slots, &mut scratch)?;
        let skip = (offset - first * bs64) as usize;
        let len = buf.len();
        buf.copy_from_slice(&scratch[skip..skip + len]);
        Ok(())
    }

    /// Fills `blocks` with the plaintext of the blocks from `first` on, as `slots`
    /// map them.
    fn open_blocks(
        &self,
        first: u64,
        slots: &[Option<Slot>],
        blocks: &mut [u8],
    ) -> Result<(), VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let mut n = 0usize;
        while n < slots.len() {
            let Some(Slot::Mapped(loc)) = slots[n] else {
                blocks[n * bs..(n + 1) * bs].fill(0);
                n += 1;
                continue;
            };
            // Read a run of blocks that sit next to each other in one segment.
            let mut run = 1;
            while n + run < slots.len() {
                match slots[n + run] {
                    Some(Slot::Mapped(next))
                        if next.segment == loc.segment
                            && next.offset == loc.offset + run as u32 =>
                    {
                        run += 1
                    }
                    _ => break,
                }
            }
            let bytes = &mut blocks[n * bs..(n + run) * bs];
            self.segments
                .read_at(
                    self.segment_id(loc.segment),
                    u64::from(loc.offset) * bs64,
                    bytes,
                )
                .map_err(VolumeError::Io)?;
            for k in 0..run {
                let Some(Slot::Mapped(l)) = slots[n + k] else {
                    unreachable!("the run holds mapped slots only")
                };
                let lba = Lba(first + (n + k) as u64);
                self.open_block(lba, &l, &mut bytes[k * bs..(k + 1) * bs])?;
            }
            n += run;
        }
        Ok(())
    }

    fn open_block(&self, lba: Lba, loc: &Location, block: &mut [u8]) -> Result<(), VolumeError> {
        let opened = match self.cipher(loc) {
            Some(cipher) => cipher
                .open_in_place(lba, &nonce_for(loc.nonce), &Tag(loc.tag), block)
                .is_ok(),
            None => {
                block.fill(0);
                false
            }
        };
        if opened {
            return Ok(());
        }
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            tenant = %self.tenant,
            volume = %self.name,
            lba = lba.0,
            "block failed authentication"
        );
        Err(VolumeError::Authentication { lba })
    }

    /// Writes `data` (or zeros, unmapping whole blocks, when `None`) over `len`
    /// bytes at `offset`.
    fn write_range(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), VolumeError> {
        self.check_poisoned()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(VolumeError::NoSpace {
                offset,
                len,
                size: self.size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let first = offset / bs64;
        let last = (offset + len - 1) / bs64;
        let head_partial = !offset.is_multiple_of(bs64);
        let tail_partial = !(offset + len).is_multiple_of(bs64);

        let over_limit = {
            let _edges = self.lock_edges(first, last, head_partial, tail_partial);
            match data {
                Some(data) if !head_partial && !tail_partial => {
                    // Whole blocks: one copy to seal in place, no zero-fill (the
                    // fill and its allocation cost a fifth of a 4 KiB write).
                    let mut blocks = data.to_vec();
                    self.seal_and_install(first, &mut blocks)?
                }
                Some(data) => {
                    let count = (last - first + 1) as usize;
                    let mut blocks = vec![0u8; count * bs];
                    if head_partial || (tail_partial && count == 1) {
                        self.read_block_for_update(first, &mut blocks[..bs])?;
                    }
                    if tail_partial && count > 1 {
                        self.read_block_for_update(last, &mut blocks[(count - 1) * bs..])?;
                    }
                    let skip = (offset - first * bs64) as usize;
                    blocks[skip..skip + data.len()].copy_from_slice(data);
                    self.seal_and_install(first, &mut blocks)?
                }
                None => self.zero_range(offset, len, first, last)?,
            }
        };
        if over_limit {
            // The write is installed and readable whatever this flush does, so it
            // succeeded; a failed flush poisons the volume, and the next write or
            // flush reports it (durability was never promised before a flush).
            // Past the bound the store's flush thread commits the overlay while
            // writers go on; past twice the bound (the disk is not keeping up)
            // the writer flushes itself, which bounds the overlay's memory.
            let hard = self.lock_overlay().map.len() > self.overlay_limit.saturating_mul(2);
            let queued = !hard
                && self
                    .flusher
                    .as_ref()
                    .is_some_and(|queue| queue.request(self.me.clone()));
            if !queued {
                self.background_flush();
            }
        }
        Ok(())
    }

    /// Flushes because the overlay grew past its bound (from the store's flush
    /// thread or a writer): nobody waits on the result, so a failure is logged;
    /// it has poisoned the volume, and the next write or flush reports it.
    pub(crate) fn background_flush(&self) {
        if let Err(error) = self.flush() {
            tracing::warn!(
                tenant = %self.tenant,
                volume = %self.name,
                %error,
                "flushing a full overlay failed"
            );
        }
    }

    /// Zeroes bytes `offset..offset + len` (blocks `first..=last`, whose stripes
    /// the caller holds).
    fn zero_range(
        &self,
        offset: u64,
        len: u64,
        first: u64,
        last: u64,
    ) -> Result<bool, VolumeError> {
        let bs = self.block_size.len();
        let bs64 = bs as u64;
        let end = offset + len;
        // Partial blocks at the edges keep their other bytes. Both are read before
        // anything changes, so a failed read leaves the range untouched.
        let mut whole_from = first;
        let mut whole_to = last + 1;
        let mut head = None;
        let mut tail = None;
        if !offset.is_multiple_of(bs64) || (!end.is_multiple_of(bs64) && first == last) {
            let mut block = vec![0u8; bs];
            self.read_block_for_update(first, &mut block)?;
            let from = (offset - first * bs64) as usize;
            let to = ((end - first * bs64) as usize).min(bs);
            block[from..to].fill(0);
            head = Some(block);
            whole_from = first + 1;
        }
        if !end.is_multiple_of(bs64) && last >= whole_from {
            let mut block = vec![0u8; bs];
            self.read_block_for_update(last, &mut block)?;
            let to = (end - last * bs64) as usize;
            block[..to].fill(0);
            tail = Some(block);
            whole_to = last;
        }
        let mut over = false;
        if let Some(mut block) = head {
            over |= self.seal_and_install(first, &mut block)?;
        }
        if let Some(mut block) = tail {
            over |= self.seal_and_install(last, &mut block)?;
        }
        if whole_from >= whole_to {
            return Ok(over);
        }
        if whole_to - whole_from >= DIRECT_TRIM_BLOCKS {
            self.trim_direct(whole_from, whole_to)?;
            return Ok(over);
        }
        let mut overlay = self.lock_overlay();
        overlay.generation += 1;
        let generation = overlay.generation;
        for lba in whole_from..whole_to {
            overlay.map.insert(lba, (Slot::Zero, generation));
        }
        Ok(over || overlay.map.len() > self.overlay_limit)
    }

    /// Drops the mappings of blocks `from..to` with one durable commit.
    fn trim_direct(&self, from: u64, to: u64) -> Result<(), VolumeError> {
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let mut commit = MappingCommit::default();
        self.build_commit(&[(from, to)], &[], &mut commit)?;
        self.commit_mappings(&mut state, commit, CommitKind::Foreground)?;
        // The overlay's entries for these blocks are superseded by the trim,
        // which is now durable.
        let mut overlay = self.lock_overlay();
        let doomed: Vec<u64> = overlay.map.range(from..to).map(|(&l, _)| l).collect();
        for lba in doomed {
            overlay.map.remove(&lba);
        }
        Ok(())
    }

    /// Reads block `lba` for a read-modify-write (the caller holds its stripe).
    fn read_block_for_update(&self, lba: u64, block: &mut [u8]) -> Result<(), VolumeError> {
        let bs64 = self.block_size.len() as u64;
        self.read_range(lba * bs64, block)
    }

    /// Seals whole blocks starting at `first` into fresh segment space and installs
    /// their mappings. Returns whether the overlay grew past its bound.
    fn seal_and_install(&self, first: u64, blocks: &mut [u8]) -> Result<bool, VolumeError> {
        // From the allocation to the install (see `installing`). It guards no
        // data: a panic elsewhere leaves it valid.
        let _installing = self.installing.read().unwrap_or_else(|e| e.into_inner());
        let bs = self.block_size.len();
        let count = blocks.len() / bs;
        let mut locations = Vec::with_capacity(count);
        let mut done = 0usize;
        while done < count {
            let space = self.allocate(count - done)?;
            let run = space.run;
            let bytes = &mut blocks[done * bs..(done + run) * bs];
            for k in 0..run {
                let lba = Lba(first + (done + k) as u64);
                let nonce = space.nonce + k as u64;
                let tag = space.cipher.seal_in_place(
                    lba,
                    &nonce_for(nonce),
                    &mut bytes[k * bs..(k + 1) * bs],
                );
                locations.push(Location {
                    segment: space.segment,
                    offset: space.offset + k as u32,
                    dek_version: self.active_dek,
                    writer: space.writer,
                    nonce,
                    tag: tag.0,
                });
            }
            let segment = space.segment;
            let offset = space.offset;
            if let Err(e) = self.segments.write_at(
                self.segment_id(segment),
                u64::from(offset) * bs as u64,
                bytes,
            ) {
                // The space stays allocated and unreferenced (compaction takes
                // it back); the blocks' mappings are unchanged.
                return Err(self.write_failed(e));
            }
            self.lock_dirty().insert(segment);
            done += run;
        }
        let mut overlay = self.lock_overlay();
        overlay.generation += 1;
        let generation = overlay.generation;
        for (k, loc) in locations.into_iter().enumerate() {
            overlay
                .map
                .insert(first + k as u64, (Slot::Mapped(loc), generation));
        }
        Ok(overlay.map.len() > self.overlay_limit)
    }

    /// Reserves up to `want` consecutive blocks at the head of the open segment
    /// and as many consecutive nonces of the current writer (made first when
    /// there is none or its counter is spent, so a failure to make one leaves
    /// the head untouched).
    fn allocate(&self, want: usize) -> Result<Space, VolumeError> {
        let bytes = (want as u64).saturating_mul(self.block_size.len() as u64);
        self.segments
            .check_space(bytes)
            .map_err(|e| self.write_failed(e))?;
        let mut head = self.lock_head();
        self.check_poisoned()?;
        let spent = head
            .writer
            .as_ref()
            .is_none_or(|_| head.next_nonce >= self.nonce_limit);
        if spent {
            self.start_writer(&mut head)?;
        }
        let left = usize::try_from(self.nonce_limit - head.next_nonce).unwrap_or(usize::MAX);
        let (segment, offset, run) = self.allocate_in(&mut head, want.min(left))?;
        let writer = head
            .writer
            .as_ref()
            .expect("a writer was made above when there was none");
        let space = Space {
            segment,
            offset,
            run,
            writer: writer.number,
            cipher: writer.cipher.clone(),
            nonce: head.next_nonce,
        };
        head.next_nonce += run as u64;
        Ok(space)
    }

    /// Makes a new writer: a fresh salt, its key derived from the active DEK,
    /// its record queued for the next commit (the caller holds the head lock).
    fn start_writer(&self, head: &mut Head) -> Result<(), VolumeError> {
        let number = head.next_writer;
        let next = number.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
            what: "writer numbers are spent".into(),
        })?;
        let salt = DataKey::generate_writer_salt().map_err(|e| VolumeError::Nonce(Box::new(e)))?;
        let dek = self
            .deks
            .get(&self.active_dek)
            .expect("the active DEK is among the volume's keys by construction");
        let key = dek.derive_writer_key(number, &salt);
        let cipher = Arc::new(BlockCipher::new(&self.tenant, &self.name, &key));
        let record = WriterRecord {
            dek_version: self.active_dek,
            salt,
        };
        self.writers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                number,
                KnownWriter {
                    record: record.clone(),
                    cipher: OnceLock::from(cipher.clone()),
                },
            );
        self.lock_pending_writers().push((number, record));
        head.writer = Some(Writer { number, cipher });
        head.next_nonce = 0;
        head.next_writer = next;
        tracing::debug!(
            tenant = %self.tenant,
            volume = %self.name,
            writer = number,
            dek_version = self.active_dek,
            "new writer key"
        );
        Ok(())
    }

    fn lock_pending_writers(&self) -> MutexGuard<'_, Vec<(u32, WriterRecord)>> {
        self.pending_writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves up to `want` consecutive blocks at the head of the open segment
    /// (creating one when needed): `(segment, offset, blocks reserved)`.
    fn allocate_in(&self, head: &mut Head, want: usize) -> Result<(u32, u32, usize), VolumeError> {
        self.check_poisoned()?;
        let segment = match head.segment {
            Some(s) if head.next_block < self.segment_blocks => s,
            _ => {
                let index = head.next_index;
                let next = index.checked_add(1).ok_or_else(|| VolumeError::Corrupt {
                    what: "segment index space is spent".into(),
                })?;
                // A failed create may have left the file behind: the next try
                // takes the next index (an empty segment is compacted away).
                head.next_index = next;
                if let Err(e) = self.segments.create(self.segment_id(index)) {
                    head.segment = None;
                    return Err(self.write_failed(e));
                }
                head.segment = Some(index);
                head.next_block = 0;
                index
            }
        };
        let run = want.min((self.segment_blocks - head.next_block) as usize);
        let offset = head.next_block;
        head.next_block += run as u32;
        Ok((segment, offset, run))
    }

    fn flush(&self) -> Result<(), VolumeError> {
        self.check_poisoned()?;
        let target = self.lock_overlay().generation;
        let mut state = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if state.durable >= target {
            // Another flusher committed everything we need while we waited.
            return self.check_poisoned();
        }
        self.check_poisoned()?;
        let (generation, entries): (u64, Vec<(u64, Slot)>) = {
            let overlay = self.lock_overlay();
            (
                overlay.generation,
                overlay.map.iter().map(|(&l, &(s, _))| (l, s)).collect(),
            )
        };
        // Every entry above was installed after its segment was marked dirty, so
        // the set taken now covers them all (or an earlier flush synced them).
        let dirty = std::mem::take(&mut *self.lock_dirty());
        for &segment in &dirty {
            if let Err(e) = self.segments.sync(self.segment_id(segment)) {
                self.poison();
                return Err(VolumeError::Io(e));
            }
        }
        if !entries.is_empty() {
            let runs = runs_of(&entries);
            let mut commit = MappingCommit::default();
            if let Err(e) = self.build_commit(&runs, &entries, &mut commit) {
                self.poison();
                return Err(e);
            }
            // Every writer the entries name was made before its blocks entered
            // the overlay, so its record is among these (or already committed).
            let writers = std::mem::take(&mut *self.lock_pending_writers());
            for (number, record) in &writers {
                commit.batch.put(
                    record::writer_key(self.internal_id, *number).to_vec(),
                    record.encode(),
                );
            }
            if let Err(e) = self.commit_mappings(&mut state, commit, CommitKind::Foreground) {
                self.lock_pending_writers().extend(writers);
                return Err(e);
            }
            let mut overlay = self.lock_overlay();
            overlay.map.retain(|_, &mut (_, g)| g > generation);
        }
        state.durable = generation;
        Ok(())
    }

    /// Adds to `batch` the record changes that make blocks in `runs` (sorted,
    /// disjoint `from..to` ranges) map as `entries` say (a block of a run without
    /// a mapped entry becomes a hole), and the per-segment live-block deltas.
    fn build_commit(
        &self,
        runs: &[(u64, u64)],
        entries: &[(u64, Slot)],
        commit: &mut MappingCommit,
    ) -> Result<(), VolumeError> {
        let MappingCommit {
            batch,
            deltas,
            change,
        } = commit;
        let in_runs = |lba: u64| {
            let i = runs.partition_point(|&(_, to)| to <= lba);
            i < runs.len() && runs[i].0 <= lba
        };
        // Committed extents overlapping any run: deleted whole, their parts
        // outside the runs written back.
        let mut old: BTreeMap<u64, Extent> = BTreeMap::new();
        for &(from, to) in runs {
            self.visit_extents(from, to, &mut |extent| {
                old.insert(extent.lba, extent.to_extent());
            })?;
        }
        let mut puts: Vec<Extent> = Vec::new();
        for extent in old.values() {
            batch.delete(record::extent_key(self.internal_id, extent.last()).to_vec());
            change.removed.push(extent.last());
            *deltas.entry(extent.segment).or_default() -= extent.tags.len() as i64;
            let mut lba = extent.lba;
            while lba <= extent.last() {
                if in_runs(lba) {
                    lba += 1;
                    continue;
                }
                let start = lba;
                while lba <= extent.last() && !in_runs(lba) {
                    lba += 1;
                }
                puts.push(extent.slice(start, lba));
            }
        }
        // New extents: runs of mapped entries contiguous in LBA, segment space and
        // nonce counter under one DEK.
        let mut current: Option<Extent> = None;
        for &(lba, slot) in entries {
            let Slot::Mapped(loc) = slot else {
                if let Some(e) = current.take() {
                    puts.push(e);
                }
                continue;
            };
            if let Some(e) = current.as_mut() {
                let n = e.tags.len();
                if e.lba + n as u64 == lba
                    && e.segment == loc.segment
                    && e.offset as u64 + n as u64 == u64::from(loc.offset)
                    && e.dek_version == loc.dek_version
                    && e.writer == loc.writer
                    && e.nonce + n as u64 == loc.nonce
                    && n < MAX_EXTENT_BLOCKS
                {
                    e.tags.push(loc.tag);
                    continue;
                }
            }
            if let Some(e) = current.replace(Extent {
                lba,
                segment: loc.segment,
                offset: loc.offset,
                dek_version: loc.dek_version,
                writer: loc.writer,
                nonce: loc.nonce,
                tags: vec![loc.tag],
            }) {
                puts.push(e);
            }
        }
        if let Some(e) = current.take() {
            puts.push(e);
        }
        // Deletes went first: a put of the same key later in the batch wins.
        for extent in &puts {
            *deltas.entry(extent.segment).or_default() += extent.tags.len() as i64;
            batch.put(
                record::extent_key(self.internal_id, extent.last()).to_vec(),
                extent.encode(),
            );
        }
        change.added.extend(puts);
        Ok(())
    }

    /// Commits `commit` (the caller holds the flush lock, and holds the overlay
    /// entries it covers until this returns): the live counts go into the same
    /// batch, and once it is durable the in-memory counts and the index follow.
    /// A failed commit poisons the volume: what the store holds is unknown.
    fn commit_mappings(
        &self,
        state: &mut FlushState,
        commit: MappingCommit,
        kind: CommitKind,
    ) -> Result<(), VolumeError> {
        let MappingCommit {
            mut batch,
            deltas,
            change,
        } = commit;
        if batch.is_empty() {
            return Ok(());
        }
        self.apply_live(&mut batch, &state.live, &deltas);
        if let Err(e) = self.meta.commit(&batch) {
            self.poison();
            return Err(e.into());
        }
        apply_deltas(&mut state.live, &deltas);
        self.apply_to_index(&change);
        let bytes: usize = batch
            .ops()
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        match kind {
            CommitKind::Foreground => {
                self.note_dead_space(&state.live, &deltas);
                self.metadata_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                self.commits.fetch_add(1, Ordering::Relaxed);
            }
            CommitKind::Compaction => {
                self.compaction_metadata_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Wakes the compaction thread when a commit left a sealed segment below the
    /// compaction threshold (the caller holds the flush lock; `live` is updated).
    fn note_dead_space(&self, live: &HashMap<u32, u64>, deltas: &HashMap<u32, i64>) {
        let Some(wake) = &self.wake else {
            return;
        };
        let sealed_below = self.sealed_below();
        let limit = self.compact_threshold * f64::from(self.segment_blocks);
        let dead = deltas.iter().any(|(&segment, &delta)| {
            delta < 0
                && segment < sealed_below
                && (live.get(&segment).copied().unwrap_or(0) as f64) < limit
        });
        if dead {
            wake.notify();
        }
    }

    /// Every segment below this index is sealed: no write will go to it again.
    fn sealed_below(&self) -> u32 {
        let head = self.lock_head();
        head.segment.unwrap_or(head.next_index)
    }

    /// Adds the updated live-block counts of the segments in `deltas` to `batch`.
    fn apply_live(&self, batch: &mut Batch, live: &HashMap<u32, u64>, deltas: &HashMap<u32, i64>) {
        for (&segment, &delta) in deltas {
            if delta == 0 {
                continue;
            }
            let now = live.get(&segment).copied().unwrap_or(0) as i64 + delta;
            let key = record::live_key(self.internal_id, segment).to_vec();
            if now <= 0 {
                batch.delete(key);
            } else {
                batch.put(key, record::encode_u64(now as u64).to_vec());
            }
        }
    }
}

fn apply_deltas(live: &mut HashMap<u32, u64>, deltas: &HashMap<u32, i64>) {
    for (&segment, &delta) in deltas {
        let now = live.get(&segment).copied().unwrap_or(0) as i64 + delta;
        if now <= 0 {
            live.remove(&segment);
        } else {
            live.insert(segment, now as u64);
        }
    }
}

/// A mapping commit being built: the batch, the live-count changes per
/// segment it makes, and the index changes to apply once it is durable.
#[derive(Default)]
struct MappingCommit {
    batch: Batch,
    deltas: HashMap<u32, i64>,
    change: MappingChange,
}

/// Extent records a commit removes (by last LBA) and adds, removals first.
#[derive(Default)]
struct MappingChange {
    removed: Vec<u64>,
    added: Vec<Extent>,
}

/// Who commits: foreground commits count as the volume's commits and may
/// leave dead space to compact; compaction's own are counted apart.
#[derive(Clone, Copy)]
enum CommitKind {
    Foreground,
    Compaction,
}

/// The maximal runs of consecutive LBAs among sorted `entries`, as `from..to`.
fn runs_of(entries: &[(u64, Slot)]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(lba, _) in entries {
        match runs.last_mut() {
            Some((_, to)) if *to == lba => *to += 1,
            _ => runs.push((lba, lba + 1)),
        }
    }
    runs
}

/// Fresh segment space and nonces from [`VolumeInner::allocate`]: `run` blocks
/// at `offset` of `segment`, sealed by `writer` with counters from `nonce` on.
struct Space {
    segment: u32,
    offset: u32,
    run: usize,
    writer: u32,
    cipher: Arc<BlockCipher>,
    nonce: u64,
}

/// The volume's writer records, by number.
fn load_writers(
    meta: &dyn MetaStore,
    volume: u32,
) -> Result<HashMap<u32, WriterRecord>, VolumeError> {
    let mut writers = HashMap::new();
    let mut bad = None;
    meta.scan_prefix(&record::writer_prefix(volume), &mut |key, value| {
        match record::writer_key_number(key)
            .and_then(|n| WriterRecord::decode(value).map(|r| (n, r)))
        {
            Ok((0, _)) => {
                bad = Some(record::Corrupt("writer record numbered 0".into()));
                false
            }
            Ok((n, r)) => {
                writers.insert(n, r);
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
        None => Ok(writers),
    }
}

/// Checks at open that the committed mappings hang together: extents come in
/// order without overlap, every extent names a writer the volume has a record
/// of (or a DEK it holds, for format v1 blocks), and the blocks mapped into each
/// segment add up to its live count. Mappings
/// and counts change only together, in one batch, so a difference means records
/// went missing (a damaged metadata file, a partial restore): serving on would
/// read lost blocks as zeros.
fn check_extents(
    meta: &dyn MetaStore,
    volume: u32,
    deks: &HashMap<u32, DataKey>,
    writers: &HashMap<u32, WriterRecord>,
    live: &HashMap<u32, u64>,
    index_limit: usize,
) -> Result<(HashSet<u32>, Option<ExtentIndex>), VolumeError> {
    let mut mapped: HashMap<u32, u64> = HashMap::new();
    let mut named: HashSet<u32> = HashSet::new();
    let mut bad: Option<String> = None;
    let mut next_lba = 0u64;
    // Built on the way; given up once it outgrows what the budget could hold.
    let mut index = Some(ExtentIndex::default());
    meta.scan_prefix(&record::extent_prefix(volume), &mut |key, value| {
        let extent = match Extent::decode(key, value) {
            Ok(extent) => extent,
            Err(e) => {
                bad = Some(e.0);
                return false;
            }
        };
        // Keys sort by last LBA and extents never overlap: a record out of
        // that order is a damaged key, which a lookup would miss.
        if extent.lba < next_lba {
            bad = Some(format!(
                "mapping records overlap or are out of order at block {}",
                extent.lba
            ));
            return false;
        }
        next_lba = extent.last().saturating_add(1);
        let known = deks.contains_key(&extent.dek_version)
            && (extent.writer == 0
                || writers
                    .get(&extent.writer)
                    .is_some_and(|w| w.dek_version == extent.dek_version));
        if !known {
            bad = Some(format!(
                "blocks {}..={} were sealed by writer {} (DEK v{}), of which the \
                 metadata has no record: it was damaged or rolled back",
                extent.lba,
                extent.last(),
                extent.writer,
                extent.dek_version
            ));
            return false;
        }
        named.insert(extent.writer);
        *mapped.entry(extent.segment).or_default() += extent.tags.len() as u64;
        if let Some(built) = index.as_mut() {
            built.insert(&extent);
            if built.bytes() > index_limit {
                index = None;
            }
        }
        true
    })?;
    if let Some(what) = bad {
        return Err(VolumeError::Corrupt { what });
    }
    let mut segments: BTreeSet<u32> = mapped.keys().copied().collect();
    segments.extend(live.keys().copied());
    for segment in segments {
        let (m, l) = (
            mapped.get(&segment).copied().unwrap_or(0),
            live.get(&segment).copied().unwrap_or(0),
        );
        if m != l {
            return Err(VolumeError::Corrupt {
                what: format!(
                    "segment {segment}: the block mappings name {m} blocks but its \
                     live count says {l}: mapping records went missing or the \
                     metadata was damaged"
                ),
            });
        }
    }
    Ok((named, index))
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

    /// Block status walked run by run agrees with a block-by-block lookup,
    /// over committed extents, uncommitted writes and trims, and both together.
    #[test]
    fn block_status_runs_match_a_per_block_lookup() {
        use super::{BlockStatus, Slot};
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::new().background_compaction(false);
        let store = Store::create(dir.path(), MasterKey::generate().unwrap(), options).unwrap();
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        store.create_tenant(&tenant).unwrap();
        let options = VolumeOptions {
            block_size: crate::BlockSize::new(512).unwrap(),
        };
        store
            .create_volume(&tenant, &name, 512 * 512, options)
            .unwrap();
        let volume = store.open_volume(&tenant, &name).unwrap();
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
                let slots = volume.inner.lookup(first, last - first + 1).unwrap();
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
        const BLOCKS: u64 = 256;
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::new()
            .background_compaction(false)
            .segment_bytes(32 * 512)
            .overlay_blocks(64);
        let store = Store::create(dir.path(), MasterKey::generate().unwrap(), options).unwrap();
        let (tenant, name) = (TenantId::new("acme").unwrap(), VolumeId::new("v").unwrap());
        store.create_tenant(&tenant).unwrap();
        let options = VolumeOptions {
            block_size: crate::BlockSize::new(512).unwrap(),
        };
        store
            .create_volume(&tenant, &name, BLOCKS * 512, options)
            .unwrap();
        let volume = store.open_volume(&tenant, &name).unwrap();
        assert!(volume.inner.has_index());
        let mut model = vec![0u8; (BLOCKS * 512) as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..400u32 {
            let lba = rng.random_range(0..BLOCKS);
            let count = rng.random_range(1..=8u64).min(BLOCKS - lba);
            let (at, len) = ((lba * 512) as usize, (count * 512) as usize);
            match rng.random_range(0..10) {
                0..=5 => {
                    let fill = (round % 251) as u8 + 1;
                    volume.write_at(at as u64, &vec![fill; len]).unwrap();
                    model[at..at + len].fill(fill);
                }
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
            let mut got = vec![0u8; model.len()];
            volume.read_at(0, &mut got).unwrap();
            assert!(got == model, "round {round}");
        }
        // A reloaded index holds exactly what the store holds.
        volume.flush().unwrap();
        volume.inner.drop_index();
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
