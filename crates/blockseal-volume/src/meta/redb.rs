//! The redb 4.x backend.
//!
//! Layout: one redb file `<dir>/meta.redb` holding one table, `meta`, of byte keys
//! to byte values, next to the shared `<dir>/meta.lock` that [`super::open_with`]
//! holds.
//!
//! A commit is one write transaction with [`redb::Durability::Immediate`]: redb
//! writes the new tree, flips its commit slot and fsyncs before `commit` returns.
//! Reads go through a fresh read transaction each, so they see the last commit.
//!
//! After a crash redb repairs the file on open (it walks the trees, checks their
//! checksums and rebuilds the allocator state); that takes time in proportion to the
//! file, and is logged at info level with how long it took.
//!
//! This module must never commit with a weaker durability than `Immediate`.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use redb::{Database, Durability, ReadableDatabase, TableDefinition};

use super::{BackendKind, Batch, MetaError, MetaStore, OpenOptions};

/// The name of the redb file inside a store directory.
pub(super) const FILE_NAME: &str = "meta.redb";

/// The one table every key lives in.
const TABLE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("meta");

/// A store kept in a redb database file.
pub(super) struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (creating if needed) the redb file `<dir>/meta.redb`, repairing it if
    /// the last process using it stopped without closing it.
    pub(super) fn open(dir: &Path, options: &OpenOptions) -> Result<Self, MetaError> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            create_whole(dir, &path).map_err(|e| MetaError::Backend {
                backend: BackendKind::Redb,
                source: Box::new(e),
            })?;
        }
        let repaired = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_bytes);
        {
            let repaired = Arc::clone(&repaired);
            builder.set_repair_callback(move |_| repaired.store(true, Ordering::Relaxed));
        }
        let db = builder.create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => MetaError::Locked {
                path: path.display().to_string(),
            },
            e => backend_error(e),
        })?;
        if repaired.load(Ordering::Relaxed) {
            tracing::info!(
                path = %path.display(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "repaired redb metadata store after an unclean shutdown"
            );
        }
        // redb does not sync the directory that names a file it created.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| MetaError::Backend {
                backend: BackendKind::Redb,
                source: Box::new(e),
            })?;
        // Create the table once, so that reads never meet a missing table.
        let tx = db.begin_write().map_err(backend_error)?;
        tx.open_table(TABLE).map_err(backend_error)?;
        tx.commit().map_err(backend_error)?;
        Ok(Self { db })
    }
}

/// Makes a new, empty database (with its table) under a temporary name and
/// renames it into place: a process killed while redb writes a new file's
/// header would otherwise leave a `meta.redb` that never opens again.
fn create_whole(dir: &Path, path: &Path) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.new"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let db = Database::create(&tmp).map_err(std::io::Error::other)?;
        let tx = db.begin_write().map_err(std::io::Error::other)?;
        tx.open_table(TABLE).map_err(std::io::Error::other)?;
        tx.commit().map_err(std::io::Error::other)?;
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl MetaStore for RedbStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        let tx = self.db.begin_read().map_err(backend_error)?;
        let table = tx.open_table(TABLE).map_err(backend_error)?;
        let value = table.get(key).map_err(backend_error)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        let upper = match end {
            // An empty or inverted range holds nothing; redb is not asked.
            Some(end) if end <= start => return Ok(()),
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        let tx = self.db.begin_read().map_err(backend_error)?;
        let table = tx.open_table(TABLE).map_err(backend_error)?;
        let range = table
            .range::<&[u8]>((Bound::Included(start), upper))
            .map_err(backend_error)?;
        for pair in range {
            let (key, value) = pair.map_err(backend_error)?;
            if !visit(key.value(), value.value()) {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(backend_error)?;
        tx.set_durability(Durability::Immediate)
            .map_err(backend_error)?;
        {
            let mut table = tx.open_table(TABLE).map_err(backend_error)?;
            for (key, value) in batch.ops() {
                match value {
                    Some(value) => {
                        table
                            .insert(key.as_slice(), value.as_slice())
                            .map_err(backend_error)?;
                    }
                    None => {
                        table.remove(key.as_slice()).map_err(backend_error)?;
                    }
                }
            }
        }
        tx.commit().map_err(backend_error)?;
        Ok(())
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Redb
    }
}

fn backend_error(error: impl Into<redb::Error>) -> MetaError {
    match error.into() {
        error @ redb::Error::Corrupted(_) => MetaError::Corrupt {
            backend: BackendKind::Redb,
            source: Box::new(error),
        },
        error => MetaError::Backend {
            backend: BackendKind::Redb,
            source: Box::new(error),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process killed while making a new database leaves at most the
    /// temporary file, which the next open discards.
    #[test]
    fn a_killed_create_leaves_nothing_that_breaks_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(format!("{FILE_NAME}.new")),
            b"half a header",
        )
        .unwrap();
        let store = RedbStore::open(dir.path(), &OpenOptions::new()).unwrap();
        assert_eq!(store.get(b"k").unwrap(), None);
        let mut batch = Batch::new();
        batch.put(b"k".to_vec(), b"v".to_vec());
        store.commit(&batch).unwrap();
        drop(store);
        assert!(!dir.path().join(format!("{FILE_NAME}.new")).exists());
        let store = RedbStore::open(dir.path(), &OpenOptions::new()).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
    }
}
