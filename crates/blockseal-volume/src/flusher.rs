//! The store's background flush thread.
//!
//! When a volume's overlay of uncommitted mappings grows past its bound, the write
//! that noticed asks this thread to flush the volume and returns at once, so the
//! sync of the segment data and the metadata commit never stall the writer. Only
//! when the overlay reaches twice its bound does a writer flush itself, which
//! keeps the overlay's memory bounded when the disk cannot keep up.
//!
//! The thread keeps only weak references to volumes, holds a strong one only for
//! the flush it is running, and is stopped and joined when the store drops, so no
//! volume (and no metadata store handle) outlives its store because of it.
//!
//! Between requests it folds the volumes' mapping journals that are due,
//! one volume per turn (see `volume/journal.rs`).
//!
//! Once a second it also moves the store's extent index budget to where reads
//! are (see `volume/index.rs`): volumes without an index whose reads went to the
//! metadata store get one, loaded here, after the indexes of volumes that
//! served no request since the last pass were dropped to make room.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::compactor::{OpenVolumes, open_volumes};
use crate::volume::{IndexBudget, VolumeInner};

/// How often the index budget is moved to where reads are.
const REBALANCE_INTERVAL: Duration = Duration::from_secs(1);

/// The queue of volumes waiting for a background flush.
#[derive(Default)]
pub(crate) struct FlushQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
}

#[derive(Default)]
struct QueueState {
    volumes: Vec<Weak<VolumeInner>>,
    /// Volumes that started a mapping journal since the flush thread last
    /// looked (it keeps those whose journal it has not folded yet).
    journals: Vec<Weak<VolumeInner>>,
    stop: bool,
}

impl FlushQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Pushes, takes and a flag: a poisoned lock still holds a valid queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `volume` for a flush (once, however often it is asked). Returns
    /// `false` when the store is closing and the caller must flush itself.
    pub(crate) fn request(&self, volume: Weak<VolumeInner>) -> bool {
        let mut state = self.lock();
        if state.stop {
            return false;
        }
        if !state.volumes.iter().any(|v| v.ptr_eq(&volume)) {
            state.volumes.push(volume);
            self.cv.notify_all();
        }
        true
    }

    /// Notes that `volume` started a mapping journal, for the thread to fold
    /// when it is due.
    pub(crate) fn journaled(&self, volume: Weak<VolumeInner>) {
        self.lock().journals.push(volume);
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    /// Waits for requests or `timeout`; `None` when the store is closing.
    fn take(&self, timeout: Duration) -> Option<Vec<Weak<VolumeInner>>> {
        let state = self.lock();
        let (mut state, _) = self
            .cv
            .wait_timeout_while(state, timeout, |s| s.volumes.is_empty() && !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        if state.stop {
            return None;
        }
        Some(std::mem::take(&mut state.volumes))
    }
}

/// The running thread; stopped and joined on drop.
pub(crate) struct Flusher {
    queue: Arc<FlushQueue>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread.
    pub(crate) fn start(open: OpenVolumes, budget: Arc<IndexBudget>) -> std::io::Result<Flusher> {
        let queue = Arc::new(FlushQueue::default());
        let thread = std::thread::Builder::new()
            .name("blockseal-flush".into())
            .spawn({
                let queue = queue.clone();
                move || run(&queue, &open, &budget)
            })?;
        Ok(Flusher {
            queue,
            thread: Some(thread),
        })
    }

    /// The queue volumes post their requests to.
    pub(crate) fn queue(&self) -> &Arc<FlushQueue> {
        &self.queue
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.queue.stop();
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has been reported already; the store closes anyway.
            let _ = thread.join();
        }
    }
}

fn run(queue: &FlushQueue, open: &OpenVolumes, budget: &IndexBudget) {
    let mut last_pass = Instant::now();
    let mut pause = REBALANCE_INTERVAL;
    while let Some(volumes) = queue.take(pause) {
        for volume in volumes.iter().filter_map(Weak::upgrade) {
            volume.background_flush();
        }
        if last_pass.elapsed() >= REBALANCE_INTERVAL {
            rebalance(open, budget);
            last_pass = Instant::now();
        }
        // One fold per turn, then a pause as long as it took (requested
        // flushes end the pause): folds take at most about half of the
        // store's commits when many journals are due at once.
        pause = match fold_one(queue) {
            Some(took) => took.clamp(Duration::from_millis(1), REBALANCE_INTERVAL),
            None => REBALANCE_INTERVAL,
        };
    }
}

/// Folds the mapping journal of the open volume whose journal is due and
/// touches the most pages (see `volume/journal.rs`); returns how long that
/// took, or `None` when no journal is due.
fn fold_one(queue: &FlushQueue) -> Option<Duration> {
    // Looked at outside the queue's lock: a volume dropped here closes (and
    // may note a journal) on this thread.
    let listed = std::mem::take(&mut queue.lock().journals);
    let mut kept: Vec<Weak<VolumeInner>> = Vec::with_capacity(listed.len());
    let mut seen = std::collections::HashSet::with_capacity(listed.len());
    let mut due: Option<(usize, Arc<VolumeInner>)> = None;
    for weak in listed {
        if !seen.insert(weak.as_ptr()) {
            continue;
        }
        let Some(volume) = weak.upgrade() else {
            continue;
        };
        if !volume.has_journal() {
            continue;
        }
        kept.push(weak);
        if let Some(pages) = volume.journal_due()
            && due.as_ref().is_none_or(|(most, _)| pages > *most)
        {
            due = Some((pages, volume));
        }
    }
    queue.lock().journals.extend(kept);
    let (_, volume) = due?;
    let started = Instant::now();
    if let Err(error) = volume.fold_journal() {
        // Folded again at its next turn, or by a commit, or at the next open.
        tracing::debug!(%error, "folding a mapping journal failed");
    }
    Some(started.elapsed())
}

/// Gives an index to the volumes whose reads went to the metadata store since
/// the last pass, busiest first, dropping the indexes of volumes that served no request meanwhile
/// when that makes room.
fn rebalance(open: &OpenVolumes, budget: &IndexBudget) {
    if budget.limit() == 0 {
        return;
    }
    let mut idle = Vec::new();
    let mut hungry = Vec::new();
    for volume in open_volumes(open) {
        let (store, requests) = volume.take_pass_counts();
        if volume.has_index() {
            if requests == 0 {
                idle.push(volume);
            }
        } else if store > 0 {
            hungry.push((store, volume));
        }
    }
    hungry.sort_by_key(|(reads, _)| std::cmp::Reverse(*reads));
    for (_, volume) in hungry {
        loop {
            match volume.load_index() {
                Ok(true) => break,
                Ok(false) => match idle.pop() {
                    Some(cold) => {
                        cold.drop_index();
                    }
                    None => return,
                },
                Err(error) => {
                    // The read path reports the same error to its callers.
                    tracing::debug!(%error, "loading an extent index failed");
                    break;
                }
            }
        }
    }
}
