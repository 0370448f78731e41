//! The sled 0.34.7 backend.
//!
//! Layout: a sled directory `<dir>/meta.sled/` (sled's own `conf`, `db`, `snap.*`
//! files), next to the shared `<dir>/meta.lock` that [`super::open_with`] holds.
//!
//! What sled promises, read from its source:
//! - `Tree::apply_batch` pins the log for the whole batch and seals it with one
//!   batch marker, so recovery replays a batch whole or not at all.
//! - `Tree::flush` writes every dirty log buffer and, its docs say, fsyncs. On
//!   Linux it does not: it makes each write stable with `sync_file_range(WAIT_BEFORE
//!   | WRITE | WAIT_AFTER)` (`pagecache/iobuf.rs`, `write_to_log`), which neither
//!   flushes the drive's write cache nor persists the file size when the log grew.
//!   That survives a killed process (the page cache outlives it) but not a power
//!   loss or kernel crash.
//!
//! So a commit is `apply_batch`, then `flush`, then an `fdatasync` of sled's log
//! file `db` through a handle of our own (fsync acts on the inode, whichever handle
//! asks). The periodic background flush is switched off: every commit flushes
//! itself, and nothing else writes.
//!
//! This module must never report a commit as done before `flush` returned `Ok`.

use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::{BackendKind, Batch, MetaError, MetaStore, OpenOptions};

/// The name of the sled directory inside a store directory.
pub(super) const DIR_NAME: &str = "meta.sled";

/// How long an open waits for a closing sled handle to let go of sled's lock.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(5);

/// A store kept in a sled database.
pub(super) struct SledStore {
    db: sled::Db,
    /// sled's log file, opened again only to fsync it after each flush.
    log: File,
    /// sled applies a batch atomically for `get`, but its range iterators are not
    /// snapshots: a scan racing a batch that deletes a key and puts its
    /// replacement could see neither. Batches are applied under the write side
    /// and scans run under the read side, so a scan never sees part of a batch.
    /// The flush and fsync of a commit run outside it, so reads never wait on
    /// the disk.
    gate: RwLock<()>,
}

impl SledStore {
    /// Opens (creating if needed) the sled database `<dir>/meta.sled`.
    ///
    /// The caller holds the store lock; sled's own lock on its `db` file is a
    /// second line, and is reported as [`MetaError::Locked`] too.
    ///
    /// Dropping a `sled::Db` does not close its file at once: sled's I/O pool
    /// threads finish queued writes and truncations with their own handle on it,
    /// and the lock goes with the last handle. Since the caller holds the store
    /// lock, a held sled lock most likely belongs to such a closing instance in
    /// this process, so the open retries for up to [`SLED_LOCK_WAIT`] before it
    /// reports [`MetaError::Locked`].
    pub(super) fn open(dir: &Path, options: &OpenOptions) -> Result<Self, MetaError> {
        let deadline = Instant::now() + SLED_LOCK_WAIT;
        let mut pause = Duration::from_millis(1);
        loop {
            match Self::open_once(dir, options) {
                Err(MetaError::Locked { .. }) if Instant::now() < deadline => {
                    tracing::debug!(?pause, "sled lock still held by a closing handle");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                result => return result,
            }
        }
    }

    fn open_once(dir: &Path, options: &OpenOptions) -> Result<Self, MetaError> {
        let path = dir.join(DIR_NAME);
        // LowSpace is sled's default and its most exercised mode. Measured with
        // 100k small keys in 32-key commits, HighThroughput took the same space
        // (about 23 MB, sled's segments dominate) and no clearly better latency,
        // which fsync dominates, so there is nothing to trade for.
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes as u64)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(None);
        let db = config.open().map_err(|e| open_error(&path, e))?;
        if db.was_recovered() {
            tracing::debug!(path = %path.display(), "opened existing sled metadata store");
        }
        let io_error = |e: std::io::Error| MetaError::Backend {
            backend: BackendKind::Sled,
            source: Box::new(e),
        };
        let log = File::open(path.join("db")).map_err(io_error)?;
        // sled creates its files without syncing the directories that name them.
        log.sync_all().map_err(io_error)?;
        for dir in [path.as_path(), dir] {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error)?;
        }
        Ok(Self {
            db,
            log,
            gate: RwLock::new(()),
        })
    }
}

impl MetaStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.db.get(key).map_err(backend_error)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        let upper = match end {
            // An empty or inverted range holds nothing; sled is not asked.
            Some(end) if end <= start => return Ok(()),
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        // The gate guards no data; a panic elsewhere cannot leave it inconsistent.
        let _batch_boundary = self.gate.read().unwrap_or_else(|e| e.into_inner());
        for pair in self.db.range::<&[u8], _>((Bound::Included(start), upper)) {
            let (key, value) = pair.map_err(backend_error)?;
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => sled_batch.insert(key.as_slice(), value.as_slice()),
                None => sled_batch.remove(key.as_slice()),
            }
        }
        {
            let _batch_boundary = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.db.apply_batch(sled_batch).map_err(backend_error)?;
        }
        self.db.flush().map_err(backend_error)?;
        self.log.sync_data().map_err(|e| MetaError::Backend {
            backend: BackendKind::Sled,
            source: Box::new(e),
        })?;
        Ok(())
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Sled
    }
}

fn open_error(path: &Path, error: sled::Error) -> MetaError {
    // sled reports a held lock only as an `Other` I/O error carrying this text.
    if let sled::Error::Io(io) = &error
        && io.to_string().contains("could not acquire lock")
    {
        return MetaError::Locked {
            path: path.display().to_string(),
        };
    }
    backend_error(error)
}

fn backend_error(error: sled::Error) -> MetaError {
    match error {
        error @ sled::Error::Corruption { .. } => MetaError::Corrupt {
            backend: BackendKind::Sled,
            source: Box::new(error),
        },
        error => MetaError::Backend {
            backend: BackendKind::Sled,
            source: Box::new(error),
        },
    }
}
