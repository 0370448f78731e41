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

use std::path::Path;

/// Which backend implements a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// sled 0.34.7.
    Sled,
    /// redb 4.x.
    Redb,
}

/// One atomic group of changes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
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
}

/// A metadata store backend.
///
/// Keys and values are opaque bytes; keys sort bytewise. Implementations are safe
/// to share between threads. A store holds an exclusive lock on its files while open.
pub trait MetaStore: Send + Sync + 'static {
    /// The value stored under `key`, if any, as of the last commit.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError>;

    /// Visits the pairs with `start <= key < end` (no upper bound when `end` is
    /// `None`) in ascending key order, until `visit` returns `false`.
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError>;

    /// Applies `batch` atomically and durably: on `Ok` every change is on stable
    /// storage; on `Err` none or all of it may be (the caller must treat the store
    /// as failed and reopen it).
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
    /// The backend reported an I/O or corruption error.
    #[error("metadata store ({backend:?}) failed")]
    Backend {
        /// The backend that failed.
        backend: BackendKind,
        /// What it reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Opens (creating if needed) the store of the given kind at `path`.
pub fn open(kind: BackendKind, path: &Path) -> Result<Box<dyn MetaStore>, MetaError> {
    let _ = (kind, path);
    unimplemented!("backends land with the metadata store work")
}
