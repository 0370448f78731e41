//! Segment storage: the append-only containers that hold sealed block data.
//!
//! A segment is a byte container named by a [`SegmentId`] (the owning volume's
//! internal id and a per-volume index). Volumes only ever write fresh ranges of a
//! segment (copy-on-write): no range is written twice, so a segment maps onto a local
//! file today and onto an object in S3-compatible storage later. No caller may assume
//! that a segment is a local path: everything goes through [`SegmentStore`].
//!
//! Two backends live here: [`FileSegments`] (one file per segment under
//! `segments/<volume>/<index>`) and, with the `testing` feature, `FaultySegments`
//! (in memory, tracks which bytes are durable, fails chosen operations and can
//! simulate a crash), which tests use to check that the volume never reports
//! durability it does not have.
//!
//! This module must never hold plaintext: it only sees sealed blocks.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

#[cfg(any(test, feature = "testing"))]
mod faulty;
mod object;
#[cfg(any(test, feature = "testing"))]
pub use faulty::{FaultOp, FaultySegments};
pub use object::ObjectSegments;

/// Names one segment: the owning volume's internal id and the segment's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    /// The owning volume's internal id (unique within a store, never reused).
    pub volume: u32,
    /// The segment's index within the volume; indexes only grow.
    pub index: u32,
}

/// A place that keeps segments.
///
/// Contracts, which every backend keeps and every caller may rely on (and nothing
/// else):
/// - [`create`](Self::create) makes an empty segment; when it returns `Ok` the
///   segment's existence is durable (it is listed after a crash).
/// - [`write_at`](Self::write_at) writes the whole buffer or fails. Written bytes are
///   visible to [`read_at`](Self::read_at) at once but durable only after a later
///   [`sync`](Self::sync) of that segment returns `Ok`. Callers never write a range
///   twice and never rely on the content of a range they did not write.
/// - [`sync`](Self::sync) makes every write that returned before it durable. After
///   a failed sync, nothing is known about unsynced data.
/// - [`read_at`](Self::read_at) fills the whole buffer or fails (reading past the
///   written end is an error, never silent zeros).
/// - [`delete`](Self::delete) removes a segment durably; deleting a missing segment
///   is not an error.
/// - [`list`](Self::list) names the segments of a volume in ascending index order.
/// - [`size`](Self::size) is the number of bytes written to a segment (its end);
///   a backend that cannot tell returns an error and callers assume the
///   configured segment size.
///
/// Implementations are shared between threads; concurrent writes to disjoint ranges
/// of one segment, and reads concurrent with them, must be supported.
pub trait SegmentStore: Send + Sync + 'static {
    /// Creates an empty segment (an error if it exists).
    fn create(&self, id: SegmentId) -> io::Result<()>;
    /// Writes `data` at byte `offset` of the segment.
    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at byte `offset` of the segment.
    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads like [`read_at`](Self::read_at) if the bytes can be had without
    /// waiting for a device (from a cache, or a backend that never waits);
    /// `Ok(false)` instead of waiting, with `buf` unspecified. For callers on
    /// an event loop, which hand a read that would wait to a thread. The
    /// default always says it would wait: never wrong, only slower, so a
    /// wrapper that forgets to pass this on never blocks an event loop.
    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let _ = (id, offset, buf);
        Ok(false)
    }
    /// Makes every completed write to the segment durable.
    fn sync(&self, id: SegmentId) -> io::Result<()>;
    /// Whether a failed [`sync`](Self::sync) loses nothing: what it did not
    /// make durable is still held, and the next sync tries it again (an
    /// object store's upload). Then a failed sync fails only the FLUSH that
    /// met it; otherwise (a file's fsync, whose failure may have dropped the
    /// dirty pages) the volume refuses writes until it is reopened.
    /// Default: `false`.
    fn sync_retriable(&self) -> bool {
        false
    }
    /// Removes the segment durably.
    fn delete(&self, id: SegmentId) -> io::Result<()>;
    /// The indexes of a volume's segments, ascending.
    fn list(&self, volume: u32) -> io::Result<Vec<u32>>;
    /// The segment's length in bytes (the end of its last write). Compaction
    /// uses it to judge a segment's live fraction; the default says it is unknown.
    fn size(&self, id: SegmentId) -> io::Result<u64> {
        let _ = id;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "segment sizes are unknown to this store",
        ))
    }
    /// Forgets a deleted volume once every one of its segments was deleted
    /// (the file backend removes the volume's directory, with anything left in
    /// it, durably). Missing is not an error; the default does nothing.
    fn delete_volume(&self, volume: u32) -> io::Result<()> {
        let _ = volume;
        Ok(())
    }
    /// Whether `bytes` more may be written while keeping the store's reserve
    /// free for metadata commits: an error of kind
    /// [`io::ErrorKind::StorageFull`] when not. Nothing is reserved; the default
    /// always says yes.
    fn check_space(&self, bytes: u64) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }
}

/// Whether an I/O error is a shortage that may pass (no space, quota, file
/// descriptors, memory) rather than a failure of the medium: a write that meets
/// one changed nothing that is referenced, so the volume stays usable.
pub fn is_transient(error: &io::Error) -> bool {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        Some(ENOMEM | ENFILE | EMFILE | ENOSPC | EDQUOT)
    )
}

/// Whether an I/O error says the device or a quota is full.
pub fn is_storage_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Segments kept as files: `<root>/<volume>/<index>`, written with positional I/O.
///
/// Directories are created 0700 and files 0600, whatever the umask. Writes are
/// refused with [`io::ErrorKind::StorageFull`] once the file system's free space
/// would fall below the reserve ([`FileSegments::with_reserve`]), so metadata
/// commits, which need a little space of their own, still succeed on a full
/// disk and flushed data stays safe.
pub struct FileSegments {
    root: PathBuf,
    open: Arc<Mutex<OpenFiles>>,
    /// Hands written ranges to the kernel's writeback ahead of syncs.
    writeback: Option<Writeback>,
    /// Volumes whose directory is known to be durable in `root`.
    synced_volumes: Mutex<HashSet<u32>>,
    reserve: u64,
    /// Bytes that may still be written before free space is looked at again.
    budget: AtomicU64,
    /// Held while the budget is refilled, so two refills never both grant the
    /// same free space.
    refill: Mutex<()>,
}

/// Segment files kept open, with what each has written since its last sync.
///
/// At most `limit` are kept open (when more are needed, the least recently
/// used ones with nothing unsynced are closed, with an eighth of the limit to
/// spare): a host with thousands of volumes would otherwise hold a descriptor
/// per segment it ever touched. A file with writes not yet synced stays open
/// until they are, so a writeback error is always reported to the descriptor
/// that wrote (a descriptor opened after an error may not see it).
struct OpenFiles {
    files: HashMap<SegmentId, OpenFile>,
    limit: usize,
    /// Bumped by every use: the least recently used file has the lowest.
    clock: u64,
}

struct OpenFile {
    file: Arc<File>,
    /// Writes through this descriptor, and how many of them the last
    /// successful sync covered.
    writes: u64,
    synced: u64,
    used: u64,
    /// The byte range written since writeback was last started for this file.
    unstarted: Option<(u64, u64)>,
}

impl OpenFiles {
    fn new(limit: usize) -> OpenFiles {
        OpenFiles {
            files: HashMap::new(),
            limit: limit.max(1),
            clock: 0,
        }
    }

    /// The open file of `id`, counted as used (and as written, bytes
    /// `from..to`, when `written` says so).
    fn get(&mut self, id: SegmentId, written: Option<(u64, u64)>) -> Option<Arc<File>> {
        self.clock += 1;
        let clock = self.clock;
        let open = self.files.get_mut(&id)?;
        open.used = clock;
        if let Some(range) = written {
            open.writes += 1;
            open.unstarted = Some(widen(open.unstarted, range));
        }
        Some(open.file.clone())
    }

    /// Keeps `file` open for `id`, closing idle files first when at the limit.
    fn insert(&mut self, id: SegmentId, file: Arc<File>, written: Option<(u64, u64)>) {
        if self.files.len() >= self.limit {
            let mut idle: Vec<(u64, SegmentId)> = self
                .files
                .iter()
                .filter(|(_, f)| f.writes == f.synced)
                .map(|(&id, f)| (f.used, id))
                .collect();
            idle.sort_unstable();
            // Back under the limit, with an eighth of it to spare so that the
            // next misses do not each walk the map.
            let excess = self.files.len() + 1 - self.limit;
            for (_, id) in idle.into_iter().take(excess + self.limit / 8) {
                self.files.remove(&id);
            }
        }
        self.clock += 1;
        self.files.insert(
            id,
            OpenFile {
                file,
                writes: u64::from(written.is_some()),
                synced: 0,
                used: self.clock,
                unstarted: written,
            },
        );
    }
}

/// Free space looked up once covers at most this many bytes of writes: other
/// writers on the same file system can eat at most this much into the reserve
/// unseen. A look is one `statvfs`, so this costs one call per 4 MiB written.
const SPACE_GRANT: u64 = 4 << 20;

impl FileSegments {
    /// The default free-space reserve: 64 MiB.
    pub const DEFAULT_RESERVE: u64 = 64 << 20;

    /// The default number of segment files kept open at once (more stay open
    /// while they have writes not yet synced).
    pub const DEFAULT_OPEN_FILES: usize = 1024;

    /// Keeps segments under `root` (created 0700 if missing, and made durable in
    /// its parent), with the default reserve.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<FileSegments> {
        FileSegments::with_reserve(root, Self::DEFAULT_RESERVE)
    }

    /// Keeps segments under `root`, refusing writes that would leave less than
    /// `reserve` bytes free on its file system.
    pub fn with_reserve(root: impl Into<PathBuf>, reserve: u64) -> io::Result<FileSegments> {
        let root = root.into();
        if !root.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)?;
        }
        // Every time, not only when it was made: an earlier attempt may have
        // failed between making the directory and syncing its entry.
        if let Some(parent) = root.parent() {
            sync_dir(parent)?;
        }
        let open = Arc::new(Mutex::new(OpenFiles::new(Self::DEFAULT_OPEN_FILES)));
        Ok(FileSegments {
            root,
            writeback: Some(Writeback::start(Arc::downgrade(&open))?),
            open,
            synced_volumes: Mutex::new(HashSet::new()),
            reserve,
            budget: AtomicU64::new(0),
            refill: Mutex::new(()),
        })
    }

    /// Grants up to `bytes` from the budget; false when the budget is short.
    fn take_budget(&self, bytes: u64) -> bool {
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_sub(bytes)
            })
            .is_ok()
    }

    fn volume_dir(&self, volume: u32) -> PathBuf {
        self.root.join(volume.to_string())
    }

    fn path(&self, id: SegmentId) -> PathBuf {
        self.volume_dir(id.volume).join(id.index.to_string())
    }

    /// Whether a background thread starts the writeback of written ranges
    /// ahead of syncs (the default), or syncs alone write them.
    pub fn background_writeback(mut self, on: bool) -> FileSegments {
        if !on {
            self.writeback = None;
        } else if self.writeback.is_none() {
            self.writeback = Writeback::start(Arc::downgrade(&self.open)).ok();
        }
        self
    }

    /// Keeps at most `limit` segment files open (besides those with writes
    /// not yet synced); the default is [`FileSegments::DEFAULT_OPEN_FILES`].
    pub fn open_files_limit(self, limit: usize) -> FileSegments {
        self.handles().limit = limit.max(1);
        self
    }

    fn handles(&self) -> MutexGuard<'_, OpenFiles> {
        // A panic while holding this map cannot leave it inconsistent (inserts and
        // removes are single calls), so a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, id: SegmentId, written: Option<(u64, u64)>) -> io::Result<Arc<File>> {
        let mut handles = self.handles();
        if let Some(file) = handles.get(id, written) {
            return Ok(file);
        }
        // Opened under the map's lock, so a concurrent delete cannot slip between
        // the open and the insert and leave a handle (and the space of the
        // unlinked file) cached. Misses are rare: once per segment and process,
        // or after the file was closed for being idle.
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(id))?,
        );
        handles.insert(id, file.clone(), written);
        Ok(file)
    }

    /// Open segment files now (for tests of the limit).
    #[cfg(test)]
    fn open_files(&self) -> usize {
        self.handles().files.len()
    }
}

impl SegmentStore for FileSegments {
    fn create(&self, id: SegmentId) -> io::Result<()> {
        let dir = self.volume_dir(id.volume);
        // Until the root is synced after the directory appeared, a crash may
        // forget it: a failed attempt syncs again on the next.
        let known = self
            .synced_volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id.volume);
        if !known {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            sync_dir(&self.root)?;
            self.synced_volumes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.volume);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path(id))?;
        sync_dir(&dir)?;
        self.handles().insert(id, Arc::new(file), None);
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        // Noted before the write: a writeback started between the two finds
        // part of the range still clean, and the next sync writes the rest.
        let range = (offset, offset.saturating_add(data.len() as u64));
        self.file(id, Some(range))?.write_all_at(data, offset)
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(id, None)?.read_exact_at(buf, offset)
    }

    /// `preadv2` with `RWF_NOWAIT`: the page cache's bytes, or `Ok(false)`
    /// where a page would have to come from the disk, or the file is not
    /// open (opening it looks up the directory, which may wait too). A file
    /// system that does not take the flag gets a plain read (it may wait).
    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        use rustix::io::{Errno, ReadWriteFlags, preadv2};
        let Some(file) = self.handles().get(id, None) else {
            return Ok(false);
        };
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let mut slice = [io::IoSliceMut::new(&mut buf[done..])];
            match preadv2(&*file, &mut slice, at, ReadWriteFlags::NOWAIT) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past segment end",
                    ));
                }
                Ok(n) => done += n,
                Err(Errno::AGAIN) => return Ok(false),
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                    file.read_exact_at(&mut buf[done..], at)?;
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        // The writes this sync covers: those made before it starts.
        let (file, writes) = {
            let mut handles = self.handles();
            let file = match handles.get(id, None) {
                Some(file) => file,
                None => {
                    drop(handles);
                    return self.file(id, None)?.sync_data();
                }
            };
            (file, handles.files.get(&id).map_or(0, |f| f.writes))
        };
        // fdatasync: the file's length is metadata it needs, and sync_data includes
        // the size change of an append on Linux.
        file.sync_data()?;
        if let Some(open) = self.handles().files.get_mut(&id) {
            open.synced = open.synced.max(writes);
        }
        Ok(())
    }

    fn delete(&self, id: SegmentId) -> io::Result<()> {
        let removed = {
            let mut handles = self.handles();
            handles.files.remove(&id);
            fs::remove_file(self.path(id))
        };
        match removed {
            Ok(()) => sync_dir(&self.volume_dir(id.volume)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn delete_volume(&self, volume: u32) -> io::Result<()> {
        self.handles().files.retain(|id, _| id.volume != volume);
        match fs::remove_dir_all(self.volume_dir(volume)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        self.synced_volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&volume);
        sync_dir(&self.root)
    }

    fn list(&self, volume: u32) -> io::Result<Vec<u32>> {
        let entries = match fs::read_dir(self.volume_dir(volume)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut indexes = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            // Anything that is not a decimal index (an editor's backup, a stray
            // file) is not a segment.
            if let Some(index) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
                indexes.push(index);
            }
        }
        indexes.sort_unstable();
        Ok(indexes)
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        Ok(self.file(id, None)?.metadata()?.len())
    }

    fn check_space(&self, bytes: u64) -> io::Result<()> {
        if self.take_budget(bytes) {
            return Ok(());
        }
        let _refill = self.refill.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have refilled while this one waited.
        if self.take_budget(bytes) {
            return Ok(());
        }
        let stat = rustix::fs::statvfs(&self.root)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let spare = free.saturating_sub(self.reserve);
        if spare < bytes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{} bytes free on the segment file system, {} kept for metadata",
                    free, self.reserve
                ),
            ));
        }
        // Grant this write and a bounded amount more; others may be writing to
        // the same file system, so it is looked at again soon.
        self.budget
            .store((spare - bytes).min(SPACE_GRANT), Ordering::Release);
        Ok(())
    }
}

/// How often the writeback thread looks at the open segment files.
const WRITEBACK_TICK: Duration = Duration::from_millis(100);
/// A file with this much written since writeback last started for it is handed
/// over at the next tick; less is left to the next sync. (Measured with
/// `scripts/flush-load.sh`: handing every file over once a second as well
/// sent 600 volumes' writes to the disk in one burst each second, and both
/// FLUSH and write tails grew.)
const WRITEBACK_MIN_BYTES: u64 = 64 << 10;

/// The smallest range covering `range` and `held` (when there is one).
fn widen(held: Option<(u64, u64)>, range: (u64, u64)) -> (u64, u64) {
    match held {
        Some((from, to)) => (from.min(range.0), to.max(range.1)),
        None => range,
    }
}

/// A thread that starts the kernel's writeback of what was written to the open
/// segment files, in the background, so that a sync (an NBD FLUSH) finds
/// little left to write. Without it the kernel starts writing only once its
/// dirty thresholds or its 30-second expiry are reached, and many volumes
/// flushing at once each wait for all their data to go to disk together.
///
/// Writeback is started with `sync_file_range(SYNC_FILE_RANGE_WRITE)`: it
/// starts writing the range's dirty pages without waiting for them, and
/// leaves every page cached. (`posix_fadvise(POSIX_FADV_DONTNEED)`, used
/// before, also starts writeback but drops the pages that are clean by then,
/// on a fast disk many of those it just wrote: reads of recent writes then
/// went to the disk, and a 70/30 random mix ran a third slower.) It is a hint:
/// its errors are ignored, and a writeback error it meets stays recorded for
/// the next sync of the file, which reports it. Durability comes from syncs
/// alone.
struct Writeback {
    shared: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writeback {
    fn start(open: Weak<Mutex<OpenFiles>>) -> io::Result<Writeback> {
        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = std::thread::Builder::new()
            .name("blockseal-wback".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let (stop, cv) = &*shared;
                    loop {
                        let stopped = stop.lock().unwrap_or_else(|e| e.into_inner());
                        let (stopped, _) = cv
                            .wait_timeout_while(stopped, WRITEBACK_TICK, |s| !*s)
                            .unwrap_or_else(|e| e.into_inner());
                        if *stopped {
                            return;
                        }
                        drop(stopped);
                        let Some(open) = open.upgrade() else {
                            return;
                        };
                        start_writeback(&open);
                    }
                }
            })?;
        Ok(Writeback {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        let (stop, cv) = &*self.shared;
        *stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts writeback of the ranges of at least [`WRITEBACK_MIN_BYTES`] written
/// to open segment files since the last start. Returns how many it started.
fn start_writeback(open: &Mutex<OpenFiles>) -> usize {
    let due: Vec<(Arc<File>, u64, u64)> = {
        let mut files = open.lock().unwrap_or_else(|e| e.into_inner());
        files
            .files
            .values_mut()
            .filter_map(|f| {
                let (from, to) = f.unstarted?;
                if to - from < WRITEBACK_MIN_BYTES {
                    return None;
                }
                f.unstarted = None;
                Some((f.file.clone(), from, to))
            })
            .collect()
    };
    for (file, from, to) in &due {
        let _ = start_writeback_range(file, *from, *to);
    }
    due.len()
}

/// Starts the kernel's writeback of bytes `from..to` of `file`, without
/// waiting for it and without dropping cached pages.
///
/// The crate's one `unsafe` block: rustix has no `sync_file_range`. The
/// call reads and writes no memory of this process.
#[allow(unsafe_code)]
fn start_writeback_range(file: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from)))
    else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: the arguments are a descriptor that `file` keeps open for the
    // duration of the call and three integers; no pointer is passed.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    dir_sync_probe::check(dir)?;
    File::open(dir)?.sync_all()
}

/// Records directory syncs and fails chosen ones, for the unit tests of the
/// durability of directory entries.
#[cfg(test)]
mod dir_sync_probe {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// (directories synced, directories whose next sync fails)
    static PROBE: Mutex<(Vec<PathBuf>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

    pub(super) fn check(dir: &Path) -> std::io::Result<()> {
        let mut probe = PROBE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = probe.1.iter().position(|d| d == dir) {
            probe.1.remove(i);
            return Err(std::io::Error::other("injected directory sync failure"));
        }
        probe.0.push(dir.to_path_buf());
        Ok(())
    }

    pub(super) fn fail_next(dir: &Path) {
        PROBE.lock().unwrap().1.push(dir.to_path_buf());
    }

    pub(super) fn synced(dir: &Path) -> usize {
        PROBE.lock().unwrap().0.iter().filter(|d| *d == dir).count()
    }
}

/// A temporary directory on a file system whose page cache can be dropped
/// (not tmpfs, where file pages are the file): the system's temporary
/// directory, else `/var/tmp`. For the tests of reads that must not wait.
#[cfg(test)]
pub(crate) fn disk_tempdir() -> tempfile::TempDir {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    let on_tmpfs =
        |dir: &Path| rustix::fs::statfs(dir).is_ok_and(|stat| stat.f_type as u64 == TMPFS_MAGIC);
    let system = std::env::temp_dir();
    let dir = if on_tmpfs(&system) {
        PathBuf::from("/var/tmp")
    } else {
        system
    };
    assert!(
        !on_tmpfs(&dir),
        "{} is on tmpfs, where a page cannot leave the cache: set TMPDIR to a \
         directory on a disk-backed file system",
        dir.display()
    );
    tempfile::tempdir_in(dir).expect("a temporary directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u32) -> SegmentId {
        SegmentId { volume: 7, index }
    }

    /// Writeback starts for files with 64 KiB or more written since the last
    /// start, once per range; smaller ranges are left to the sync.
    #[test]
    fn writeback_starts_for_what_was_written_since_the_last_start() {
        let dir = tempfile::tempdir().unwrap();
        let segments = FileSegments::new(dir.path().join("segments"))
            .unwrap()
            .background_writeback(false);
        for index in 0..3 {
            segments.create(id(index)).unwrap();
        }
        let block = vec![7u8; 4096];
        // Segment 0: 16 blocks (64 KiB), in two runs with a gap; segment 1:
        // one block; segment 2: nothing.
        for n in (0..8).chain(40..48) {
            segments.write_at(id(0), n * 4096, &block).unwrap();
        }
        segments.write_at(id(1), 0, &block).unwrap();
        let ranges = |segments: &FileSegments| -> Vec<Option<(u64, u64)>> {
            let handles = segments.handles();
            (0..3).map(|i| handles.files[&id(i)].unstarted).collect()
        };
        assert_eq!(
            ranges(&segments),
            vec![Some((0, 48 * 4096)), Some((0, 4096)), None]
        );
        assert_eq!(start_writeback(&segments.open), 1);
        assert_eq!(ranges(&segments), vec![None, Some((0, 4096)), None]);
        assert_eq!(start_writeback(&segments.open), 0);
        for n in 1..16 {
            segments.write_at(id(1), n * 4096, &block).unwrap();
        }
        assert_eq!(start_writeback(&segments.open), 1);
        assert_eq!(ranges(&segments), vec![None, None, None]);
        // The data is all there, and syncs still succeed.
        segments.sync(id(0)).unwrap();
        segments.sync(id(1)).unwrap();
        let mut buf = vec![0u8; 4096];
        segments.read_at(id(0), 47 * 4096, &mut buf).unwrap();
        assert_eq!(buf, block);
    }

    /// Starting writeback leaves the pages cached: a read right after finds
    /// every page in memory (`RWF_NOWAIT` fails with `EAGAIN` on a page that
    /// would have to come from the disk). With `POSIX_FADV_DONTNEED`, used
    /// before, the clean pages of the range were dropped.
    #[test]
    fn starting_writeback_keeps_the_pages_cached() {
        let dir = disk_tempdir();
        let segments = FileSegments::new(dir.path().join("segments"))
            .unwrap()
            .background_writeback(false);
        segments.create(id(0)).unwrap();
        let data = vec![9u8; 1 << 20];
        segments.write_at(id(0), 0, &data).unwrap();
        // Clean pages: the case the old call dropped for sure.
        segments.sync(id(0)).unwrap();
        segments.write_at(id(0), 1 << 20, &data).unwrap();
        assert_eq!(start_writeback(&segments.open), 1);
        let file = segments.file(id(0), None).unwrap();
        let mut buf = vec![0u8; 2 << 20];
        let read = rustix::io::preadv2(
            &*file,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            0,
            rustix::io::ReadWriteFlags::NOWAIT,
        )
        .expect("every page of the range is still cached");
        assert_eq!(read, 2 << 20);
        assert!(buf.iter().all(|&b| b == 9));
    }

    /// A cached read gives the bytes when the page cache holds them, and
    /// says it would wait when it does not; a plain read then brings them in.
    #[test]
    fn cached_reads_never_wait_for_the_disk() {
        let dir = disk_tempdir();
        let segments = FileSegments::new(dir.path().join("segments"))
            .unwrap()
            .background_writeback(false);
        segments.create(id(0)).unwrap();
        let data: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
        segments.write_at(id(0), 0, &data).unwrap();
        let mut buf = vec![0u8; 8192];
        assert!(segments.read_cached(id(0), 4096, &mut buf).unwrap());
        assert_eq!(buf, data[4096..12288]);
        // Clean and then dropped from the cache.
        segments.sync(id(0)).unwrap();
        let file = segments.file(id(0), None).unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!segments.read_cached(id(0), 4096, &mut buf).unwrap());
        segments.read_at(id(0), 4096, &mut buf).unwrap();
        assert_eq!(buf, data[4096..12288]);
        buf.fill(0);
        assert!(segments.read_cached(id(0), 4096, &mut buf).unwrap());
        assert_eq!(buf, data[4096..12288]);
        // Past the end is an error, as for a plain read.
        let end = data.len() as u64;
        assert!(segments.read_cached(id(0), end, &mut buf).is_err());
        // A file not open is left to a plain read, which opens it.
        drop(file);
        segments.handles().files.clear();
        assert!(!segments.read_cached(id(0), 4096, &mut buf).unwrap());
        segments.read_at(id(0), 4096, &mut buf).unwrap();
        assert!(segments.read_cached(id(0), 4096, &mut buf).unwrap());
        assert_eq!(buf, data[4096..12288]);
    }

    /// Idle files are closed past the limit and reopened when used again;
    /// files with writes not yet synced stay open whatever the limit.
    #[test]
    fn open_files_stay_under_the_limit_except_unsynced_ones() {
        let dir = tempfile::tempdir().unwrap();
        let segs = FileSegments::new(dir.path()).unwrap().open_files_limit(4);
        for i in 0..12 {
            segs.create(id(i)).unwrap();
            segs.write_at(id(i), 0, &[i as u8; 512]).unwrap();
            segs.sync(id(i)).unwrap();
        }
        assert!(segs.open_files() <= 4, "{} open", segs.open_files());
        for i in 0..12 {
            let mut buf = [0u8; 512];
            segs.read_at(id(i), 0, &mut buf).unwrap();
            assert_eq!(buf, [i as u8; 512]);
        }
        assert!(segs.open_files() <= 4, "{} open", segs.open_files());
        // Unsynced writes pin their files, past the limit.
        for i in 0..8 {
            segs.write_at(id(i), 512, &[0xEE; 512]).unwrap();
        }
        assert_eq!(segs.open_files(), 8);
        for i in 0..8 {
            segs.sync(id(i)).unwrap();
        }
        segs.create(id(100)).unwrap();
        assert!(segs.open_files() < 8, "{} open", segs.open_files());
        let mut buf = [0u8; 512];
        segs.read_at(id(7), 512, &mut buf).unwrap();
        assert_eq!(buf, [0xEE; 512]);
    }

    #[test]
    fn file_segments_round_trip_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileSegments::new(dir.path().join("segments")).unwrap();
        store.create(id(2)).unwrap();
        store.create(id(0)).unwrap();
        assert!(store.create(id(0)).is_err());
        store.write_at(id(2), 4096, b"sealed").unwrap();
        store.sync(id(2)).unwrap();
        let mut buf = [0u8; 6];
        store.read_at(id(2), 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"sealed");
        assert!(store.read_at(id(2), 8192, &mut buf).is_err());
        assert_eq!(store.list(7).unwrap(), vec![0, 2]);
        assert!(store.list(8).unwrap().is_empty());
        store.delete(id(2)).unwrap();
        store.delete(id(2)).unwrap();
        assert_eq!(store.list(7).unwrap(), vec![0]);
    }

    #[test]
    fn faulty_segments_lose_unsynced_bytes_on_crash() {
        let store = FaultySegments::new();
        store.create(id(0)).unwrap();
        store.write_at(id(0), 0, b"aaaa").unwrap();
        store.sync(id(0)).unwrap();
        store.write_at(id(0), 4, b"bbbb").unwrap();
        store.crash();
        let mut buf = [0u8; 4];
        assert!(store.read_at(id(0), 0, &mut buf).is_err());
        store.revive();
        store.read_at(id(0), 0, &mut buf).unwrap();
        assert_eq!(&buf, b"aaaa");
        assert!(store.read_at(id(0), 4, &mut buf).is_err());
    }

    #[test]
    fn faulty_segments_fail_the_chosen_call() {
        let store = FaultySegments::new();
        store.create(id(0)).unwrap();
        store.fail_after(FaultOp::Write, 1);
        store.write_at(id(0), 0, b"a").unwrap();
        assert!(store.write_at(id(0), 1, b"b").is_err());
        assert!(store.write_at(id(0), 1, b"b").is_err());
        store.sync(id(0)).unwrap();
        store.clear_faults();
        store.write_at(id(0), 1, b"b").unwrap();
        assert_eq!(store.count(FaultOp::Write), 4);
    }

    #[test]
    fn new_directories_are_synced_into_their_parent_even_after_a_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("segments");
        let segments = FileSegments::new(&root).unwrap();
        // The segments directory itself is made durable in the store directory.
        assert_eq!(dir_sync_probe::synced(tmp.path()), 1);
        // A volume's first segment: its directory must reach the root durably.
        // The first attempt's sync fails; the second must sync again rather
        // than trust the directory it finds.
        dir_sync_probe::fail_next(&root);
        let id = SegmentId {
            volume: 7,
            index: 0,
        };
        assert!(segments.create(id).is_err());
        assert_eq!(dir_sync_probe::synced(&root), 0);
        segments
            .create(SegmentId {
                volume: 7,
                index: 1,
            })
            .unwrap();
        assert_eq!(dir_sync_probe::synced(&root), 1);
        // Later segments of the same volume sync only its own directory.
        segments
            .create(SegmentId {
                volume: 7,
                index: 2,
            })
            .unwrap();
        assert_eq!(dir_sync_probe::synced(&root), 1);
    }

    #[test]
    fn files_and_directories_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("segments");
        let segments = FileSegments::new(&root).unwrap();
        segments
            .create(SegmentId {
                volume: 1,
                index: 0,
            })
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("1")), 0o700);
        assert_eq!(mode(&root.join("1/0")), 0o600);
    }
}
