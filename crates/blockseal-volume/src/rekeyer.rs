//! The store's background re-encryption thread, a sibling of the compaction
//! thread.
//!
//! One `std` thread per [`Store`](crate::Store) walks the open volumes. For a
//! volume whose data key's nonce budget is half spent it performs the
//! automatic rotation; for one with an unfinished re-encryption job it runs a
//! pass (`volume/reencrypt.rs`), at most [`StoreOptions::reencrypt_rate`]
//! bytes per second, paced by foreground load exactly like compaction (a
//! quarter of the rate while the volume serves 1,000 requests a second or
//! more), in steps of at most 8 MiB and never more than one second's worth of
//! the rate. It wakes when a rotation happens, when a budget crosses its
//! threshold, and on the compaction interval.
//!
//! The store keeps a volume with an unfinished job open (rotated while closed,
//! or found at open with a job a previous run left), so that the job runs with
//! no client connected; this thread lets go of it once the job is done. Dropping the store stops the thread between two steps and
//! joins it.
//!
//! This module must never hold a volume open past the pass that uses it,
//! other than through the store's held set, which it only shrinks.
//!
//! [`StoreOptions::reencrypt_rate`]: crate::StoreOptions::reencrypt_rate

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compactor::{OpenVolumes, Pacer, Wakeup, load_paced, open_volumes};
use crate::error::error_chain;
use crate::store::{HeldForJobs, lock_held};
use crate::volume::{STEP_BYTES, VolumeInner};

/// How the thread works.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RekeyerConfig {
    /// Bytes re-encrypted per second at most (`u64::MAX`: no limit).
    pub(crate) rate: u64,
    /// How often every open volume is looked at without a notification.
    pub(crate) interval: Duration,
    /// Whether jobs run in the background (rotations always do).
    pub(crate) background: bool,
}

/// The running thread, stopped and joined on drop.
pub(crate) struct Rekeyer {
    wake: Arc<Wakeup>,
    thread: Option<JoinHandle<()>>,
}

impl Rekeyer {
    pub(crate) fn start(
        open: OpenVolumes,
        held: HeldForJobs,
        config: RekeyerConfig,
    ) -> std::io::Result<Rekeyer> {
        let wake = Arc::new(Wakeup::default());
        let thread = std::thread::Builder::new()
            .name("blockseal-rekey".into())
            .spawn({
                let wake = wake.clone();
                move || run(&open, &held, &wake, config)
            })?;
        Ok(Rekeyer {
            wake,
            thread: Some(thread),
        })
    }

    /// The handle volumes use to wake the thread.
    pub(crate) fn wakeup(&self) -> &Arc<Wakeup> {
        &self.wake
    }
}

impl Drop for Rekeyer {
    fn drop(&mut self) {
        self.wake.stop();
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has been reported already; the store closes anyway.
            let _ = thread.join();
        }
    }
}

/// The bytes one paced step re-encrypts at most: 8 MiB, and never more than
/// one second's worth of `rate`.
pub(crate) fn step_bytes(rate: u64) -> u64 {
    STEP_BYTES.min(rate).max(1)
}

fn run(open: &OpenVolumes, held: &HeldForJobs, wake: &Wakeup, config: RekeyerConfig) {
    while wake.wait(config.interval) {
        for volume in open_volumes(open) {
            if wake.stopping() {
                return;
            }
            rotate_if_due(&volume);
            if !volume.wants_reencryption() {
                // Its job is done (or there is none): the store holds it open
                // no longer.
                let key = (volume.tenant().clone(), volume.name().clone());
                let released = lock_held(held).remove(&key);
                drop(released);
                continue;
            }
            if config.background && volume.wants_reencryption() && !volume.background_released() {
                let mut paced = load_paced(&volume, Pacer::new(config.rate, wake));
                // A volume let go of for a deletion ends its pass at once.
                let mut pace = |bytes| !volume.background_released() && paced(bytes);
                match volume.reencrypt(step_bytes(config.rate), &mut pace) {
                    Ok(report) => tracing::debug!(
                        tenant = %volume.tenant(),
                        volume = %volume.name(),
                        blocks = report.blocks_reencrypted,
                        unreadable = report.blocks_unreadable,
                        finished = report.finished,
                        "re-encryption pass"
                    ),
                    Err(error) => tracing::warn!(
                        tenant = %volume.tenant(),
                        volume = %volume.name(),
                        error = %error_chain(&error),
                        "background re-encryption failed"
                    ),
                }
            }
        }
    }
}

fn rotate_if_due(volume: &VolumeInner) {
    if !volume.rotation_due() {
        return;
    }
    if let Err(error) = volume.rotate_automatically() {
        tracing::error!(
            tenant = %volume.tenant(),
            volume = %volume.name(),
            error = %error_chain(&error),
            "automatic data key rotation failed; retried on the next pass"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a simulated clock: every tick moves at most one step, and the
    /// bytes moved by any tick never run ahead of the rate by more than one
    /// step, idle or busy (a quarter of the rate).
    #[test]
    fn paced_steps_never_run_ahead_of_the_rate() {
        let wake = Wakeup::default();
        for (rate, busy) in [(1u64 << 20, false), (1 << 20, true), (32 << 20, false)] {
            let step = step_bytes(rate);
            let mut pacer = Pacer::new(rate, &wake);
            let start = pacer.started();
            let share = if busy { rate / 4 } else { rate };
            let mut now = start;
            let mut moved = 0u64;
            for _ in 0..200 {
                assert!(step <= rate && step <= STEP_BYTES);
                moved += step;
                let wait = pacer.delay_at(step, busy, now).unwrap();
                now += wait;
                let allowed = share as f64 * now.duration_since(start).as_secs_f64();
                assert!(
                    moved as f64 <= allowed + step as f64 + 1.0,
                    "rate {rate} busy {busy}: {moved} bytes by {:?}",
                    now.duration_since(start)
                );
                // And not much slower either: the pacer waits no longer than due.
                assert!(moved as f64 >= allowed - 1.0);
            }
        }
        assert_eq!(step_bytes(u64::MAX), STEP_BYTES);
        assert_eq!(step_bytes(4096), 4096);
    }
}
