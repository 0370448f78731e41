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

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::stats::LatencyHistogram;

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
/// Commits are grouped: a committer queues its batch, and whichever committer
/// finds no commit running becomes the leader, takes every batch queued by then
/// and commits them as ONE backend commit with one sequence number, while the
/// others wait for its result (theirs too). Many volumes flushing at once so
/// share one metadata commit and its syncs instead of queueing for one each. A
/// batch is applied after the batches queued before it, as if committed alone
/// in queue order; a failed group commit fails every batch in it.
///
/// The marker is written under a lock of its own, after the group's commit, so
/// the next group commits meanwhile and one marker write covers every commit
/// durable by then.
pub(crate) struct Sequenced {
    inner: Arc<dyn MetaStore>,
    group: Mutex<Group>,
    /// Signalled when a group commit has finished.
    finished: Condvar,
    /// The last sequence whose commit returned `Ok` (durable).
    durable: AtomicU64,
    marker: Mutex<MarkerFile>,
    path: PathBuf,
    /// How long the backend's group commits take.
    latency: Arc<LatencyHistogram>,
}

/// The queue of batches waiting for the next group commit.
struct Group {
    /// Batches of tickets `decided..next_ticket`, in ticket order.
    queue: Vec<Batch>,
    next_ticket: u64,
    /// Every ticket below this has its result.
    decided: u64,
    /// A leader is committing.
    running: bool,
    /// The last sequence handed to a group commit.
    sequence: u64,
    /// Recent failed groups: `(first ticket, end ticket, error)`. Members read
    /// their error here; a few suffice (members wake as soon as it is decided).
    failures: VecDeque<(u64, u64, MetaError)>,
}

/// How many failed groups are remembered for their members.
const FAILURES_KEPT: usize = 64;

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
            group: Mutex::new(Group {
                queue: Vec::new(),
                next_ticket: 0,
                decided: 0,
                running: false,
                sequence,
                failures: VecDeque::new(),
            }),
            finished: Condvar::new(),
            durable: AtomicU64::new(sequence),
            marker: Mutex::new(MarkerFile {
                file,
                written: sequence,
                warned: false,
            }),
            path,
            latency: Arc::default(),
        })
    }

    /// The latency of its group commits (each serves every batch queued).
    pub(crate) fn latency(&self) -> Arc<LatencyHistogram> {
        self.latency.clone()
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
        let sequence = self.commit_grouped(batch)?;
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

impl Sequenced {
    fn lock_group(&self) -> MutexGuard<'_, Group> {
        // Every critical section leaves the queue whole: a poisoned lock is valid.
        self.group.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `batch` for the next group commit, leading it when no commit
    /// runs, and returns the sequence number of the durable commit that held it.
    fn commit_grouped(&self, batch: &Batch) -> Result<u64, MetaError> {
        let mut group = self.lock_group();
        let ticket = group.next_ticket;
        group.next_ticket += 1;
        group.queue.push(batch.clone());
        loop {
            if ticket < group.decided {
                return match group
                    .failures
                    .iter()
                    .find(|(first, end, _)| (*first..*end).contains(&ticket))
                {
                    Some((_, _, error)) => Err(echo(error)),
                    // Succeeded, so `durable` is at least its group's number.
                    None => Ok(self.durable.load(Ordering::Acquire)),
                };
            }
            if group.running {
                group = self.finished.wait(group).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead: commit everything queued, this batch included.
            group.running = true;
            let (first, end) = (group.decided, group.next_ticket);
            let sequence = group.sequence + 1;
            let mut batches = std::mem::take(&mut group.queue);
            drop(group);
            let mut merged = Batch::new();
            for queued in &mut batches {
                for (key, value) in queued.ops() {
                    match value {
                        Some(value) => merged.put(key.clone(), value.clone()),
                        None => merged.delete(key.clone()),
                    }
                }
                // The copies may hold a tenant seed, like the callers' batches.
                queued.wipe_values();
            }
            merged.put(SEQUENCE_KEY, sequence.to_be_bytes().to_vec());
            let started = std::time::Instant::now();
            let committed = self.inner.commit(&merged);
            self.latency.record(started.elapsed());
            merged.wipe_values();
            group = self.lock_group();
            // A failed commit may still have become durable: its number is
            // never handed out again.
            group.sequence = sequence;
            group.decided = end;
            group.running = false;
            let result = match committed {
                Ok(()) => {
                    self.durable.fetch_max(sequence, Ordering::AcqRel);
                    Ok(sequence)
                }
                Err(error) => {
                    let mine = echo(&error);
                    if group.failures.len() == FAILURES_KEPT {
                        group.failures.pop_front();
                    }
                    group.failures.push_back((first, end, error));
                    Err(mine)
                }
            };
            self.finished.notify_all();
            return result;
        }
    }
}

/// A copy of `error` for each member of a failed group commit (the backend's
/// error is not `Clone`): same kind, the original's message chain as source.
fn echo(error: &MetaError) -> MetaError {
    let source = Box::new(io::Error::other(crate::error::error_chain(error)));
    match error {
        MetaError::Corrupt { backend, .. } => MetaError::Corrupt {
            backend: *backend,
            source,
        },
        MetaError::Backend { backend, .. } => MetaError::Backend {
            backend: *backend,
            source,
        },
        MetaError::Locked { path } => MetaError::Locked { path: path.clone() },
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
    fn concurrent_commits_all_land_and_the_marker_ends_at_the_last() {
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
        // Commits that queued together share one backend commit and number.
        let sequence = metadata_sequence(inner.as_ref()).unwrap().unwrap();
        assert!((1..=200).contains(&sequence), "{sequence}");
        assert_eq!(read(dir.path()).unwrap(), Marker::At(sequence));
        for t in 0..8u8 {
            for k in 0..25u8 {
                assert_eq!(inner.get(&[b'x', t, k]).unwrap(), Some(vec![k]));
            }
        }
    }

    /// A backend that refuses every commit holding the key `bad`.
    struct Picky(Arc<dyn MetaStore>);

    impl MetaStore for Picky {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
            self.0.get(key)
        }

        fn scan(
            &self,
            start: &[u8],
            end: Option<&[u8]>,
            visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        ) -> Result<(), MetaError> {
            self.0.scan(start, end, visit)
        }

        fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
            if batch.ops().iter().any(|(k, _)| k == b"bad") {
                return Err(MetaError::Backend {
                    backend: BackendKind::Redb,
                    source: "refused".into(),
                });
            }
            self.0.commit(batch)
        }

        fn backend(&self) -> BackendKind {
            self.0.backend()
        }
    }

    /// Whatever group a batch lands in, `Ok` means its writes are durable and
    /// an error means none of them are.
    #[test]
    fn a_failed_group_fails_each_member_and_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn MetaStore> =
            Arc::from(crate::meta::open(BackendKind::Redb, &dir.path().join("meta")).unwrap());
        let store = Sequenced::new(dir.path(), Arc::new(Picky(inner.clone())), 0).unwrap();
        let results: Vec<(Vec<u8>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6u8)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for k in 0..40u8 {
                            let key = vec![b'y', t, k];
                            let mut batch = Batch::new();
                            batch.put(key.clone(), vec![1]);
                            if t == 0 && k % 4 == 0 {
                                batch.put(b"bad".to_vec(), vec![1]);
                            }
                            out.push((key, store.commit(&batch).is_ok()));
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut failed = 0;
        for (key, ok) in results {
            assert_eq!(inner.get(&key).unwrap().is_some(), ok, "{key:?}");
            failed += usize::from(!ok);
        }
        assert!(failed >= 10, "every batch holding `bad` fails");
        let sequence = metadata_sequence(inner.as_ref()).unwrap().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marker::At(sequence));
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
