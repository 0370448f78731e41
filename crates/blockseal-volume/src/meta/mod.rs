//! The metadata store: one narrow trait over an ordered, durable key-value store.
//!
//! Everything blockseal persists besides segment data (tenants, volumes, wrapped
//! keys, nonce reservations, block mappings) goes through [`MetaStore`]. The trait is
//! deliberately small, so that each backend (sled, redb, later an object-store LSM)
//! can be checked against one conformance suite and one crash suite.
//!
//! Architecture invariant: a [`MetaStore::commit`] that returns `Ok` is atomic and
//! durable. After a crash at any instant, every committed batch is whole and no
//! uncommitted batch is partly visible.
//!
//! # On-disk layout
//!
//! A store is a directory given to [`open`]. It holds:
//!
//! | path                | what                                                      |
//! |---------------------|-----------------------------------------------------------|
//! | `<dir>/meta.lock`   | empty file; an exclusive `flock` on it while a store is open |
//! | `<dir>/meta.sled/`  | the sled database directory ([`BackendKind::Sled`])       |
//! | `<dir>/meta.redb`   | the redb database file ([`BackendKind::Redb`])            |
//! | `<dir>/meta.slatedb/` | a local object store holding a SlateDB database ([`BackendKind::SlateDb`]) |
//!
//! The lock file is taken before either backend opens, for both backends, so one
//! process at a time opens a store directory whatever the backend, and a second
//! open in the same process fails too. Each backend's own file lock is a second
//! line and is reported as [`MetaError::Locked`] as well.
//!
//! Every backend keeps keys in one ordered keyspace: no sled trees or redb tables
//! beyond the default one, so a store can be copied from one backend to another
//! with a full [`MetaStore::scan`].

use std::fmt;
use std::fs::{File, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::error_chain;

mod redb;
mod slatedb;
mod sled;

/// Which backend implements a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// sled 0.34.7.
    Sled,
    /// redb 4.x.
    Redb,
    /// SlateDB 0.18, an LSM tree on an object store (a local directory here).
    SlateDb,
}

impl BackendKind {
    /// The byte that names the backend in `FORMAT` and in catalogue headers.
    pub(crate) fn code(self) -> u8 {
        match self {
            BackendKind::Sled => 1,
            BackendKind::Redb => 2,
            BackendKind::SlateDb => 3,
        }
    }

    /// The backend a [`code`](Self::code) names.
    pub(crate) fn from_code(code: u8) -> Option<BackendKind> {
        match code {
            1 => Some(BackendKind::Sled),
            2 => Some(BackendKind::Redb),
            3 => Some(BackendKind::SlateDb),
            _ => None,
        }
    }
}

/// One atomic group of changes.
///
/// Values may hold secrets (a tenant record holds the tenant seed), so `Debug`
/// shows keys and value lengths only, never value bytes.
#[derive(Default, Clone)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Op<'a>(&'a [u8], Option<usize>);
        impl fmt::Debug for Op<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"{}\"", self.0.escape_ascii())?;
                match self.1 {
                    Some(len) => write!(f, " = <{len} bytes>"),
                    None => f.write_str(" deleted"),
                }
            }
        }
        f.debug_struct("Batch")
            .field(
                "ops",
                &self
                    .ops
                    .iter()
                    .map(|(key, value)| Op(key, value.as_ref().map(Vec::len)))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value` (last write to a key within a batch wins).
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Removes `key` (no error if absent).
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// The operations in order: `(key, Some(value))` puts, `(key, None)` deletes.
    pub fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of the keys and values it writes (a measure of metadata written).
    pub(crate) fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Overwrites every value with zeros, for a batch that carried secrets (a
    /// tenant seed) once it has been committed.
    pub(crate) fn wipe_values(&mut self) {
        for value in self.ops.iter_mut().filter_map(|(_, value)| value.as_mut()) {
            zeroize::Zeroize::zeroize(value);
        }
    }
}

/// A metadata store backend.
///
/// Keys and values are opaque bytes; keys sort bytewise. Implementations are safe
/// to share between threads. A store holds an exclusive lock on its files while open.
///
/// Keys may be empty; values may be empty and as large as 1 MiB at least (the
/// conformance suite checks 1 MiB). Reads see every batch whose `commit` returned,
/// from any thread, and never part of a batch.
pub trait MetaStore: Send + Sync + 'static {
    /// The value stored under `key`, if any, as of the last commit.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError>;

    /// Visits the pairs with `start <= key < end` (no upper bound when `end` is
    /// `None`) in ascending key order, until `visit` returns `false`.
    ///
    /// An empty or inverted range (`end <= start`) visits nothing. A scan never
    /// sees part of a batch: a batch committed while it runs is wholly visible to
    /// it or not at all (redb reads one snapshot; the sled backend applies batches
    /// under a gate that scans hold). The volume's reads rely on this when a
    /// commit replaces an extent record by its pieces.
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError>;

    /// Applies `batch` atomically and durably: on `Ok` every change is on stable
    /// storage; on `Err` none or all of it may be (the caller must treat the store
    /// as failed and reopen it).
    ///
    /// Operations apply in order, so the last one on a key wins. An empty batch is
    /// a no-op that returns `Ok` without touching the disk. Commits from several
    /// threads are serialized by the backend.
    fn commit(&self, batch: &Batch) -> Result<(), MetaError>;

    /// Which backend this is.
    fn backend(&self) -> BackendKind;

    /// Visits every pair whose key starts with `prefix`, in order.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        match prefix_end(prefix) {
            Some(end) => self.scan(prefix, Some(&end), visit),
            None => self.scan(prefix, None, visit),
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` when
/// there is none (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A metadata store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// Another process holds the store open.
    #[error("metadata store {path} is locked by another process")]
    Locked {
        /// The store's path.
        path: String,
    },
    /// The backend reported an I/O error (or another failure that is not known to
    /// be corruption).
    #[error("metadata store ({backend:?}) failed")]
    Backend {
        /// The backend that failed.
        backend: BackendKind,
        /// What it reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The backend found its files corrupt (a checksum or structure check failed).
    #[error("metadata store ({backend:?}) is corrupt")]
    Corrupt {
        /// The backend that found the corruption.
        backend: BackendKind,
        /// What it reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// How to open a store; see [`open_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    cache_bytes: usize,
}

impl OpenOptions {
    /// The default cache size: 128 MiB.
    pub const DEFAULT_CACHE_BYTES: usize = 128 << 20;

    /// Default options.
    pub fn new() -> Self {
        Self {
            cache_bytes: Self::DEFAULT_CACHE_BYTES,
        }
    }

    /// Sets the memory the backend may use to cache pages (sled's
    /// `cache_capacity`, redb's `set_cache_size`, SlateDB's block cache). sled counts it loosely and may
    /// use more.
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens (creating if needed) the store of the given kind in the directory
/// `path`, with default [`OpenOptions`].
///
/// Fails with [`MetaError::Locked`] while the store is open, in this process or
/// another. A store left by a process that was killed opens again; redb repairs its
/// file first, which takes time in proportion to its size.
pub fn open(kind: BackendKind, path: &Path) -> Result<Box<dyn MetaStore>, MetaError> {
    open_with(kind, path, &OpenOptions::new())
}

/// Opens (creating if needed) the store of the given kind in the directory `path`.
///
/// See [`open`] for the locking contract.
pub fn open_with(
    kind: BackendKind,
    path: &Path,
    options: &OpenOptions,
) -> Result<Box<dyn MetaStore>, MetaError> {
    let lock = lock_dir(path, kind)?;
    // A backend that meets a damaged file may panic instead of reporting it
    // (redb's b-tree code indexes with lengths read from disk): that is corrupt
    // metadata, never a crash of the process.
    let store = catch_panic(kind, || -> Result<Box<dyn MetaStore>, MetaError> {
        Ok(match kind {
            BackendKind::Sled => Box::new(sled::SledStore::open(path, options)?),
            BackendKind::Redb => Box::new(redb::RedbStore::open(path, options)?),
            BackendKind::SlateDb => Box::new(slatedb::SlateStore::open(path, options)?),
        })
    })??;
    Ok(Box::new(GuardedStore {
        store,
        kind,
        broken: AtomicBool::new(false),
        _lock: Some(lock),
    }))
}

/// Opens (creating if needed) a SlateDB store at `prefix` in an object store
/// (see [`crate::object`]).
///
/// There is no lock file: a second process that opens the same prefix fences
/// this one, whose next commit then fails (and every call after it), so at
/// most one writer's commits ever succeed. The bucket must support
/// conditional writes.
pub fn open_object_store(
    store: Arc<dyn object_store::ObjectStore>,
    prefix: &str,
    options: &OpenOptions,
) -> Result<Box<dyn MetaStore>, MetaError> {
    let kind = BackendKind::SlateDb;
    let store = catch_panic(kind, || -> Result<Box<dyn MetaStore>, MetaError> {
        Ok(Box::new(slatedb::SlateStore::open_on(
            store, prefix, options, true,
        )?))
    })??;
    Ok(Box::new(GuardedStore {
        store,
        kind,
        broken: AtomicBool::new(false),
        _lock: None,
    }))
}

/// Whether the metadata of the given kind exists in the directory `path`
/// (the file or directory the backend keeps), without creating anything.
pub fn exists(kind: BackendKind, path: &Path) -> bool {
    match kind {
        BackendKind::Sled => path.join(sled::DIR_NAME).is_dir(),
        BackendKind::Redb => path.join(redb::FILE_NAME).is_file(),
        BackendKind::SlateDb => path.join(slatedb::DIR_NAME).is_dir(),
    }
}

/// The file or directory, inside a metadata directory, that holds the data of
/// a backend.
pub fn data_path(kind: BackendKind, path: &Path) -> std::path::PathBuf {
    match kind {
        BackendKind::Sled => path.join(sled::DIR_NAME),
        BackendKind::Redb => path.join(redb::FILE_NAME),
        BackendKind::SlateDb => path.join(slatedb::DIR_NAME),
    }
}

/// A backend together with the directory lock it was opened under, with every
/// call guarded: a panic inside the backend becomes [`MetaError::Corrupt`], and
/// fences the store (every later call fails the same way), since a backend that
/// panicked half-way may hold inconsistent state in memory.
struct GuardedStore {
    // Fields drop in order: the backend closes its files before the lock goes.
    store: Box<dyn MetaStore>,
    kind: BackendKind,
    broken: AtomicBool,
    /// The directory lock of a store on a local directory.
    _lock: Option<File>,
}

impl GuardedStore {
    fn guard<T>(&self, call: impl FnOnce() -> Result<T, MetaError>) -> Result<T, MetaError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(MetaError::Corrupt {
                backend: self.kind,
                source: "an earlier call found the metadata corrupt; the store must be \
                         checked and reopened"
                    .into(),
            });
        }
        match catch_panic(self.kind, call) {
            Ok(result) => result,
            Err(error) => {
                if !self.broken.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        backend = ?self.kind,
                        error = %error_chain(&error),
                        "metadata store found corrupt; refusing every further call"
                    );
                }
                Err(error)
            }
        }
    }
}

impl MetaStore for GuardedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.guard(|| self.store.get(key))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        self.guard(|| self.store.scan(start, end, visit))
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        self.guard(|| self.store.commit(batch))
    }

    fn backend(&self) -> BackendKind {
        self.kind
    }
}

/// Runs `call`, turning a panic into [`MetaError::Corrupt`] with its message.
fn catch_panic<T>(kind: BackendKind, call: impl FnOnce() -> T) -> Result<T, MetaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        MetaError::Corrupt {
            backend: kind,
            source: format!("the backend failed on damaged data: {message}").into(),
        }
    })
}

/// The name of the lock file inside a store directory.
const LOCK_FILE_NAME: &str = "meta.lock";

/// Creates `dir` if needed and takes the exclusive lock on `<dir>/meta.lock`.
fn lock_dir(dir: &Path, backend: BackendKind) -> Result<File, MetaError> {
    let io_error = |source: std::io::Error| MetaError::Backend {
        backend,
        source: Box::new(source),
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let path = dir.join(LOCK_FILE_NAME);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(MetaError::Locked {
            path: dir.display().to_string(),
        }),
        Err(TryLockError::Error(e)) => Err(io_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_debug_shows_keys_and_lengths_never_values() {
        let mut batch = Batch::new();
        batch.put(b"Tacme".to_vec(), vec![0xA5; 32]);
        batch.delete(b"m\x00\x01".to_vec());
        let text = format!("{batch:?}{batch:#?}");
        assert!(
            text.contains("Tacme") && text.contains("<32 bytes>"),
            "{text}"
        );
        assert!(text.contains("deleted"), "{text}");
        for leak in ["165", "a5", "A5"] {
            assert!(!text.contains(leak), "Batch Debug leaks {leak:?}: {text}");
        }
    }

    #[test]
    fn wipe_values_zeroes_every_value() {
        let mut batch = Batch::new();
        batch.put(b"T".to_vec(), vec![7; 46]);
        batch.delete(b"x".to_vec());
        batch.wipe_values();
        assert!(
            batch
                .ops()
                .iter()
                .filter_map(|(_, v)| v.as_ref())
                .all(|v| v.iter().all(|&b| b == 0))
        );
    }
}
