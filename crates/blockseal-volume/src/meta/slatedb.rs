//! The SlateDB 0.18 backend: an LSM tree kept in an object store.
//!
//! Layout: `<dir>/meta.slatedb/` is a local object store (one file per object,
//! each written whole and fsynced with its directory before the put returns)
//! holding one SlateDB database under the prefix `meta/`: its manifest, its
//! write-ahead log objects and its sorted tables. The same database can live on
//! S3-compatible storage instead ([`SlateStore::open_on`]); that is what lets a
//! store move between hosts.
//!
//! A commit is one SlateDB write batch followed by a flush of the write-ahead
//! log, so it returns once the log object that holds the batch is durable in the
//! object store. Reads only see data that is durable there
//! ([`DurabilityLevel::Remote`]): a batch whose log upload fails is never seen by
//! a reader, even for the moment between the write and the flush. A scan reads
//! one consistent view (a sequence number taken when it starts).
//!
//! SlateDB is asynchronous; the store runs it on a small runtime of its own
//! ([`crate::bridge`]) and waits for each call on the caller's thread, so the [`MetaStore`] trait stays
//! synchronous and callers on another runtime's threads are not disturbed (a
//! call there blocks that thread, as a redb commit would).
//!
//! SlateDB fences writers: a second process that opens the same database makes
//! the first one's next durable write fail with a closed error, which becomes
//! [`MetaError::Backend`] and poisons the store. On a local directory the lock
//! file of [`super::open_with`] already keeps a second process out.
//!
//! This module must never report a commit as done before its flush returned.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use slatedb::config::{DurabilityLevel, ReadOptions, ScanOptions, Settings};
use slatedb::db_cache::moka::{MokaCache, MokaCacheOptions};
use slatedb::object_store::ObjectStore;
use slatedb::object_store::local::LocalFileSystem;
use slatedb::object_store::path::Path as ObjectPath;
use slatedb::{Db, ErrorKind, WriteBatch};

use super::{BackendKind, Batch, MetaError, MetaStore, OpenOptions};
use crate::bridge::{Bridge, wait};

/// The name of the object-store directory inside a store directory.
pub(super) const DIR_NAME: &str = "meta.slatedb";

/// The prefix of the database inside its object store.
const DB_PREFIX: &str = "meta";

/// Every key is stored behind this byte: SlateDB refuses empty keys, which the
/// trait allows, and the rest of the keyspace stays free for records that are
/// not the store's (a host's lease, later).
const KEY_PREFIX: u8 = b'm';

/// Pairs a scan hands from the runtime to the caller at a time.
const SCAN_CHUNK: usize = 256;

/// How often a failed object-store call is retried before the error reaches
/// the caller (SlateDB's default retries for ever, which would hang a commit
/// on a full disk or a dead bucket).
const MAX_RETRIES: u32 = 3;

/// The memtable size at which SlateDB writes a sorted table: the memory the
/// newest metadata may take before it moves to the object store.
const MEMTABLE_BYTES: usize = 16 << 20;

/// A store kept in a SlateDB database.
pub(super) struct SlateStore {
    db: Arc<Db>,
    bridge: Bridge,
}

impl SlateStore {
    /// Opens (creating if needed) the database in `<dir>/meta.slatedb/`.
    pub(super) fn open(dir: &Path, options: &OpenOptions) -> Result<Self, MetaError> {
        let root = dir.join(DIR_NAME);
        create_private_dir(&root).map_err(backend_error)?;
        let store = LocalFileSystem::new_with_prefix(&root)
            .map_err(backend_error)?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        // The local store cannot compare-and-swap an existing object, which
        // SlateDB's boundary files need; the lock file keeps stale writers out.
        Self::open_on(Arc::new(store), DB_PREFIX, options, false)
    }

    /// Opens (creating if needed) the database at `prefix` in `store`.
    ///
    /// `boundary_files` is whether the store supports conditional overwrites
    /// (`PutMode::Update`), which SlateDB's garbage collector uses to keep a
    /// paused writer from resurrecting deleted metadata.
    pub(super) fn open_on(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        options: &OpenOptions,
        boundary_files: bool,
    ) -> Result<Self, MetaError> {
        let bridge = Bridge::new("blockseal-slatedb", 2).map_err(backend_error)?;
        let mut settings = Settings {
            object_store_max_retries: Some(MAX_RETRIES),
            l0_sst_size_bytes: MEMTABLE_BYTES,
            ..Settings::default()
        };
        if let Some(gc) = settings.garbage_collector_options.as_mut() {
            gc.boundary_files_enabled = boundary_files;
            gc.object_store_max_retries = Some(MAX_RETRIES);
        }
        let cache = Arc::new(MokaCache::new_with_opts(MokaCacheOptions {
            max_capacity: options.cache_bytes as u64,
            time_to_live: None,
            time_to_idle: None,
        }));
        let prefix = ObjectPath::from(prefix);
        let build = async move {
            Db::builder(prefix, store)
                .with_settings(settings)
                .with_db_cache(cache, 0)
                .build()
                .await
        };
        let db = bridge
            .run(build)
            .map_err(backend_error)?
            .map_err(slate_error)?;
        Ok(Self {
            db: Arc::new(db),
            bridge,
        })
    }

    /// Runs `call` on the store's runtime and waits for it on this thread.
    fn run<T, F>(&self, call: impl FnOnce(Arc<Db>) -> F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, slatedb::Error>> + Send + 'static,
    {
        self.bridge
            .run(call(Arc::clone(&self.db)))
            .map_err(backend_error)?
            .map_err(slate_error)
    }
}

impl MetaStore for SlateStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        let key = stored_key(key);
        let value = self.run(move |db| async move {
            let options = ReadOptions::default().with_durability_filter(DurabilityLevel::Remote);
            db.get_with_options(key, &options).await
        })?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        let start = stored_key(start);
        let end = match end {
            Some(end) => stored_key(end),
            None => vec![KEY_PREFIX + 1],
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let db = Arc::clone(&self.db);
        // The scan runs on the runtime and hands chunks over; when the caller
        // stops early it drops the receiver, and the next send ends the task.
        self.bridge.spawn(async move {
            let options = ScanOptions::default().with_durability_filter(DurabilityLevel::Remote);
            let mut iter = match db.scan_with_options(start..end, &options).await {
                Ok(iter) => iter,
                Err(error) => {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
            };
            let mut chunk = Vec::with_capacity(SCAN_CHUNK);
            loop {
                match iter.next().await {
                    Ok(Some(pair)) => {
                        chunk.push((pair.key, pair.value));
                        if chunk.len() == SCAN_CHUNK
                            && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => {
                        if !chunk.is_empty() {
                            let _ = tx.send(Ok(chunk)).await;
                        }
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
        });
        while let Some(chunk) = wait(rx.recv()) {
            for (key, value) in chunk.map_err(slate_error)? {
                if !visit(&key[1..], &value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut write = WriteBatch::new();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => write.put(stored_key(key), value),
                None => write.delete(stored_key(key)),
            }
        }
        self.run(move |db| async move {
            db.write(write).await?;
            db.flush().await
        })
    }

    fn backend(&self) -> BackendKind {
        BackendKind::SlateDb
    }
}

impl Drop for SlateStore {
    fn drop(&mut self) {
        let db = Arc::clone(&self.db);
        // Closing flushes nothing a commit has not flushed already; it stops
        // the background tasks and releases the writer cleanly. The bridge's
        // runtime goes after this, with the store's other fields.
        match self.bridge.run(async move { db.close().await }) {
            Ok(Ok(())) => {}
            Ok(Err(error)) if matches!(error.kind(), ErrorKind::Closed(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "closing the SlateDB metadata store failed");
            }
            Err(error) => {
                tracing::warn!(error = %error, "closing the SlateDB metadata store failed");
            }
        }
    }
}

/// The key SlateDB keeps for `key`: behind [`KEY_PREFIX`], so never empty and
/// in the same order.
fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.len() + 1);
    stored.push(KEY_PREFIX);
    stored.extend_from_slice(key);
    stored
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn slate_error(error: slatedb::Error) -> MetaError {
    match error.kind() {
        ErrorKind::Data => MetaError::Corrupt {
            backend: BackendKind::SlateDb,
            source: Box::new(error),
        },
        _ => backend_error(error),
    }
}

fn backend_error(error: impl std::error::Error + Send + Sync + 'static) -> MetaError {
    MetaError::Backend {
        backend: BackendKind::SlateDb,
        source: Box::new(error),
    }
}
