//! The commit marker: a count of metadata commits kept outside the metadata store,
//! so that metadata which went missing or back in time is noticed at open.
//!
//! Every commit through [`Sequenced`] also writes the commit's sequence number into
//! the metadata (key `C`), atomically with the batch, and, once the batch is
//! durable, into `<store>/COMMITS`. The file can only lag the metadata (by the one
//! commit in flight when a process died), never lead it. So at open, metadata
//! whose sequence is below the file's lost commits it had acknowledged: a damaged
//! file that the backend silently truncated (sled rewrites what it could read), a
//! replaced or restored older copy. The store then refuses to open, naming both
//! numbers, until an operator accepts the loss (`Store::danger_accept_metadata_loss`).
//!
//! This does not detect a rollback of the metadata together with the marker (a
//! restore of the whole directory); `SECURITY.md` says so.
//!
//! # `COMMITS` layout
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! | 0      | 8    | magic `BSCOMMIT`                                 |
//! | 8      | 8    | last durable commit sequence, u64 big-endian     |
//! | 16     | 8    | first 8 bytes of SHA-256 over bytes 0..16        |
//!
//! It is rewritten in place (24 bytes, within one sector) and fdatasynced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::meta::{BackendKind, Batch, MetaError, MetaStore};

/// The marker file's name inside the store directory.
pub(crate) const MARKER_FILE: &str = "COMMITS";
/// The metadata key holding the last commit's sequence number.
pub(crate) const SEQUENCE_KEY: &[u8] = b"C";

const MAGIC: &[u8; 8] = b"BSCOMMIT";
const MARKER_LEN: usize = 24;

/// What the marker file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marker {
    /// No marker file (a new store, or one made before markers existed).
    Missing,
    /// The file exists but is not a valid marker.
    Damaged,
    /// The last commit sequence the file recorded.
    At(u64),
}

/// Reads the marker of the store in `dir`.
pub(crate) fn read(dir: &Path) -> io::Result<Marker> {
    let bytes = match std::fs::read(dir.join(MARKER_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Marker::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() != MARKER_LEN || &bytes[..8] != MAGIC || bytes[16..] != checksum(&bytes[..16]) {
        return Ok(Marker::Damaged);
    }
    let mut sequence = [0u8; 8];
    sequence.copy_from_slice(&bytes[8..16]);
    Ok(Marker::At(u64::from_be_bytes(sequence)))
}

/// The sequence of the last commit the metadata holds (0 before the first).
pub(crate) fn metadata_sequence(meta: &dyn MetaStore) -> Result<Option<u64>, MetaError> {
    Ok(meta.get(SEQUENCE_KEY)?.and_then(|bytes| {
        let bytes: [u8; 8] = bytes.as_slice().try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    }))
}

/// A metadata store whose every commit carries the next sequence number and
/// advances the marker file once durable.
///
/// Commits take the commit lock (sequence numbers in commit order); the marker
/// is written under a lock of its own, after the commit lock is released, so the
/// next commit goes on while one marker write covers every commit durable by then.
pub(crate) struct Sequenced {
    inner: Arc<dyn MetaStore>,
    /// The last sequence handed to a commit.
    committing: Mutex<u64>,
    /// The last sequence whose commit returned `Ok` (durable).
    durable: AtomicU64,
    marker: Mutex<MarkerFile>,
    path: PathBuf,
}

struct MarkerFile {
    file: File,
    /// The sequence the file holds.
    written: u64,
    /// Whether a failed marker write was already logged.
    warned: bool,
}

impl Sequenced {
    /// Wraps `inner`, whose last commit is `sequence`, and writes the marker file
    /// in `dir` to match (creating it with mode 0600 when missing).
    pub(crate) fn new(
        dir: &Path,
        inner: Arc<dyn MetaStore>,
        sequence: u64,
    ) -> io::Result<Sequenced> {
        let path = dir.join(MARKER_FILE);
        if !path.exists() {
            // Made whole under a temporary name, then renamed: a crash never
            // leaves an empty or partial marker.
            let tmp = dir.join("COMMITS.tmp");
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            write_marker(&file, sequence)?;
            std::fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        write_marker(&file, sequence)?;
        // Every open: an earlier one may have failed before syncing the entry.
        File::open(dir)?.sync_all()?;
        Ok(Sequenced {
            inner,
            committing: Mutex::new(sequence),
            durable: AtomicU64::new(sequence),
            marker: Mutex::new(MarkerFile {
                file,
                written: sequence,
                warned: false,
            }),
            path,
        })
    }
}

impl MetaStore for Sequenced {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.inner.get(key)
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        self.inner.scan(start, end, visit)
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        if batch.is_empty() {
            return Ok(());
        }
        let sequence = {
            // Commits are serialized by every backend anyway; holding the lock
            // across one keeps sequence numbers in commit order.
            let mut last = self.committing.lock().unwrap_or_else(|e| e.into_inner());
            let sequence = *last + 1;
            let mut sequenced = batch.clone();
            sequenced.put(SEQUENCE_KEY, sequence.to_be_bytes().to_vec());
            let committed = self.inner.commit(&sequenced);
            // The copy may hold a tenant seed, like the caller's batch.
            sequenced.wipe_values();
            // A failed commit may still have become durable: its number is
            // never handed out again.
            *last = sequence;
            committed?;
            self.durable.fetch_max(sequence, Ordering::AcqRel);
            sequence
        };
        // The marker only ever records commits that returned Ok, and this one
        // returns only once the marker holds it (or a later one).
        let mut marker = self.marker.lock().unwrap_or_else(|e| e.into_inner());
        if marker.written >= sequence {
            return Ok(());
        }
        let target = self.durable.load(Ordering::Acquire);
        // The commit is durable whatever happens to the marker: a marker that
        // lags only weakens the check at the next open, so a failure is logged,
        // not returned.
        match write_marker(&marker.file, target) {
            Ok(()) => {
                marker.written = target;
                marker.warned = false;
            }
            Err(error) if !marker.warned => {
                marker.warned = true;
                tracing::warn!(path = %self.path.display(), %error, "could not advance the commit marker");
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }
}

fn write_marker(file: &File, sequence: u64) -> io::Result<()> {
    let mut bytes = [0u8; MARKER_LEN];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..16].copy_from_slice(&sequence.to_be_bytes());
    let sum = checksum(&bytes[..16]);
    bytes[16..].copy_from_slice(&sum);
    file.write_all_at(&bytes, 0)?;
    file.sync_data()
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest.as_ref()[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_commits_number_in_order_and_the_marker_ends_at_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn MetaStore> =
            Arc::from(crate::meta::open(BackendKind::Redb, &dir.path().join("meta")).unwrap());
        let store = Sequenced::new(dir.path(), inner.clone(), 0).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let store = &store;
                s.spawn(move || {
                    for k in 0..25u8 {
                        let mut batch = Batch::new();
                        batch.put(vec![b'x', t, k], vec![k]);
                        store.commit(&batch).unwrap();
                    }
                });
            }
        });
        assert_eq!(metadata_sequence(inner.as_ref()).unwrap(), Some(200));
        assert_eq!(read(dir.path()).unwrap(), Marker::At(200));
    }

    #[test]
    fn marker_round_trips_and_damage_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marker::Missing);
        let path = dir.path().join(MARKER_FILE);
        let file = File::create(&path).unwrap();
        write_marker(&file, 42).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marker::At(42));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marker::Damaged);
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marker::Damaged);
    }
}
