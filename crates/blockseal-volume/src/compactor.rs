//! The store's background compaction thread.
//!
//! One `std` thread per [`Store`](crate::Store) (no async runtime in this crate)
//! walks the store's open volumes and compacts those with sealed segments below
//! the compaction threshold. It wakes when a flush leaves such a segment behind
//! (a volume calls [`Wakeup::notify`]), when a volume opens, and on a timer. It
//! copies at most [`StoreOptions::compaction_rate`] bytes per second (a quarter
//! of that while the volume serves 1,000 requests a second or more), sleeping
//! between steps of at most 8 MiB, and holds a volume's flush lock only for the
//! metadata commit of each step, so foreground I/O is never starved.
//!
//! Dropping the store stops the thread between two steps (each step's commit is
//! atomic, so stopping anywhere leaves a consistent volume) and joins it.
//!
//! This module must never hold a volume open past the pass that uses it: it keeps
//! only weak references between passes, so closing a volume still closes it.
//!
//! [`StoreOptions::compaction_rate`]: crate::StoreOptions::compaction_rate

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockseal_keys::{TenantId, VolumeId};

use crate::error::error_chain;
use crate::volume::{CompactionReport, Volume, VolumeInner};

/// The store's registry of open volumes, shared with the compaction thread.
pub(crate) type OpenVolumes = Arc<Mutex<HashMap<(TenantId, VolumeId), Weak<VolumeInner>>>>;

/// Wakes the compaction thread and tells it to stop.
#[derive(Default)]
pub(crate) struct Wakeup {
    state: Mutex<WakeState>,
    cv: Condvar,
}

#[derive(Default)]
struct WakeState {
    /// Work may be waiting.
    pending: bool,
    /// The store is closing.
    stop: bool,
}

impl Wakeup {
    fn lock(&self) -> MutexGuard<'_, WakeState> {
        // Two flags set in single assignments: a poisoned lock is still valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the thread for a pass over the open volumes.
    pub(crate) fn notify(&self) {
        let mut state = self.lock();
        if !state.pending {
            state.pending = true;
            self.cv.notify_all();
        }
    }

    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    pub(crate) fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Waits for a notification or `timeout`; `false` when the store is closing.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let state = self.lock();
        let (mut state, _) = self
            .cv
            .wait_timeout_while(state, timeout, |s| !s.pending && !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        state.pending = false;
        !state.stop
    }

    /// Sleeps for `duration` unless the store closes first; `false` when it does.
    pub(crate) fn sleep(&self, duration: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .cv
            .wait_timeout_while(state, duration, |s| !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        !state.stop
    }
}

/// How the background thread compacts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CompactorConfig {
    /// Bytes copied per second at most (`u64::MAX`: no limit).
    pub(crate) rate: u64,
    /// How often every open volume is checked even without a notification.
    pub(crate) interval: Duration,
}

/// The running thread; stopping and joining it on drop.
pub(crate) struct Compactor {
    wake: Arc<Wakeup>,
    thread: Option<JoinHandle<()>>,
}

impl Compactor {
    /// Starts the thread over the volumes registered in `open`.
    pub(crate) fn start(open: OpenVolumes, config: CompactorConfig) -> std::io::Result<Compactor> {
        let wake = Arc::new(Wakeup::default());
        let thread = std::thread::Builder::new()
            .name("blockseal-compact".into())
            .spawn({
                let wake = wake.clone();
                move || run(&open, &wake, config)
            })?;
        Ok(Compactor {
            wake,
            thread: Some(thread),
        })
    }

    /// The handle volumes use to wake the thread.
    pub(crate) fn wakeup(&self) -> &Arc<Wakeup> {
        &self.wake
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.wake.stop();
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has been reported already; the store closes anyway.
            let _ = thread.join();
        }
    }
}

/// Compacts every open volume once, without throttling.
pub(crate) fn compact_all(open: &OpenVolumes) -> Result<CompactionReport, crate::VolumeError> {
    let mut report = CompactionReport::default();
    for volume in open_volumes(open) {
        report += Volume::from_inner(volume).compact_now()?;
    }
    Ok(report)
}

pub(crate) fn open_volumes(open: &OpenVolumes) -> Vec<Arc<VolumeInner>> {
    open.lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter_map(Weak::upgrade)
        .collect()
}

fn run(open: &OpenVolumes, wake: &Wakeup, config: CompactorConfig) {
    while wake.wait(config.interval) {
        for volume in open_volumes(open) {
            if wake.stopping() {
                return;
            }
            if !volume.wants_compaction() {
                continue;
            }
            let mut pace = load_paced(&volume, Pacer::new(config.rate, wake));
            match volume.compact(volume.compact_threshold(), &mut pace) {
                Ok(report) if report != CompactionReport::default() => {
                    tracing::debug!(
                        tenant = %volume.tenant(),
                        volume = %volume.name(),
                        segments_compacted = report.segments_compacted,
                        segments_deleted = report.segments_deleted,
                        blocks_moved = report.blocks_moved,
                        bytes_reclaimed = report.bytes_reclaimed,
                        "compacted"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(
                    tenant = %volume.tenant(),
                    volume = %volume.name(),
                    error = %error_chain(&error),
                    "background compaction failed"
                ),
            }
        }
    }
}

/// A pacing function for background work on `volume` (compaction,
/// re-encryption): called after each step with the bytes it wrote, it sleeps
/// as `pacer` says, counting the step as busy when the volume served
/// [`BUSY_REQUESTS_PER_SECOND`] or more meanwhile. `false`: the store is closing.
pub(crate) fn load_paced<'a>(
    volume: &'a VolumeInner,
    mut pacer: Pacer<'a>,
) -> impl FnMut(u64) -> bool + 'a {
    let mut seen = (Instant::now(), volume.requests());
    move |bytes| {
        // The volume's request rate over the step just done.
        let now = (Instant::now(), volume.requests());
        let seconds = now.0.duration_since(seen.0).as_secs_f64().max(1e-3);
        let busy = (now.1 - seen.1) as f64 / seconds >= BUSY_REQUESTS_PER_SECOND;
        seen = now;
        pacer.pace(bytes, busy)
    }
}

/// A volume serving at least this many requests a second is busy: its
/// compaction copies at `1 / BUSY_SHARE` of the configured rate meanwhile.
const BUSY_REQUESTS_PER_SECOND: f64 = 1000.0;

/// The share of the compaction rate a busy volume's compaction gets.
const BUSY_SHARE: u64 = 4;

/// The most a pacer lets work run ahead of its rate after falling behind it.
const MAX_BURST: Duration = Duration::from_secs(1);

/// Keeps the copy rate at or below `rate` bytes per second (a quarter of it
/// while the volume is busy), over any window longer than [`MAX_BURST`].
pub(crate) struct Pacer<'a> {
    rate: u64,
    wake: &'a Wakeup,
    started: Instant,
    bytes: u64,
}

impl<'a> Pacer<'a> {
    pub(crate) fn new(rate: u64, wake: &'a Wakeup) -> Pacer<'a> {
        Pacer {
            rate: rate.max(1),
            wake,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts `bytes` just copied and sleeps until the average rate is back
    /// under the limit. `false` when the store is closing (the pass stops).
    fn pace(&mut self, bytes: u64, busy: bool) -> bool {
        match self.delay(bytes, busy) {
            Some(wait) if !wait.is_zero() => self.wake.sleep(wait),
            _ => !self.wake.stopping(),
        }
    }

    /// Accounts `bytes` and returns how long to wait before the next step
    /// (`None`: no limit).
    fn delay(&mut self, bytes: u64, busy: bool) -> Option<Duration> {
        self.delay_at(bytes, busy, Instant::now())
    }

    /// [`Pacer::delay`] as seen at instant `now`.
    pub(crate) fn delay_at(&mut self, bytes: u64, busy: bool, now: Instant) -> Option<Duration> {
        if self.rate == u64::MAX {
            return None;
        }
        // Bytes copied while the volume is busy count several times over.
        let weight = if busy { BUSY_SHARE } else { 1 };
        self.bytes = self.bytes.saturating_add(bytes.saturating_mul(weight));
        let mut due = self.started + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        // Time the work did not use (it was slowed by something else, or had
        // nothing to do) is not saved up past MAX_BURST: otherwise a pass held
        // back under load would run at full speed afterwards until its
        // average caught up.
        if let Some(credit) = now.checked_duration_since(due)
            && credit > MAX_BURST
        {
            self.started += credit - MAX_BURST;
            due += credit - MAX_BURST;
        }
        Some(due.saturating_duration_since(now))
    }

    /// When the pacer started counting.
    #[cfg(test)]
    pub(crate) fn started(&self) -> Instant {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_volume_gets_a_quarter_of_the_rate() {
        let wake = Wakeup::default();
        let mut idle = Pacer::new(1 << 20, &wake);
        let mut busy = Pacer::new(1 << 20, &wake);
        let quiet = idle.delay(1 << 20, false).unwrap();
        let loaded = busy.delay(1 << 20, true).unwrap();
        assert!(quiet <= Duration::from_secs(1) && quiet > Duration::from_millis(900));
        assert!(loaded <= Duration::from_secs(4) && loaded > Duration::from_millis(3900));
        let mut unlimited = Pacer::new(u64::MAX, &wake);
        assert_eq!(unlimited.delay(1 << 30, true), None);
    }

    #[test]
    fn time_left_unused_is_not_saved_up() {
        let wake = Wakeup::default();
        let rate = 1u64 << 20;
        let mut pacer = Pacer::new(rate, &wake);
        let start = pacer.started();
        // Ten seconds with almost nothing done (held back by foreground load).
        let mut now = start + Duration::from_secs(10);
        assert_eq!(pacer.delay_at(rate / 16, false, now), Some(Duration::ZERO));
        // From here on, at most one second's worth runs without waiting, then
        // the rate holds again: 10 MiB take at least 9 s, not 0.
        let mut moved = 0u64;
        let from = now;
        for _ in 0..40 {
            moved += rate / 4;
            now += pacer.delay_at(rate / 4, false, now).unwrap();
        }
        let elapsed = now.duration_since(from).as_secs_f64();
        assert!(
            moved as f64 / rate as f64 <= elapsed + MAX_BURST.as_secs_f64() + 0.1,
            "{moved} bytes in {elapsed} s"
        );
    }
}
