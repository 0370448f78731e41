//! The server's retention thread: a pass at start, then one a minute, until
//! shutdown, which it never holds up for long (the sleep ends at once, a
//! backup being written fails at its next write).
//!
//! An action that failed is retried at a later pass, after a pause that
//! doubles with each failure (from one pass period to an hour), so that a
//! lasting problem (a full backup disk) fills neither the log nor the audit
//! log. The pauses are the only thing kept in memory: after a restart every
//! action due is tried at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Retention;
use super::exec::Outcome;
use crate::admin::service::Service;

/// The longest pause before an action that keeps failing is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A running retention thread.
pub(crate) struct Scheduler {
    retention: Arc<Retention>,
    thread: JoinHandle<()>,
}

impl Scheduler {
    /// Starts the thread, unless retention is disabled or on a test clock
    /// (then passes run only on request).
    pub(crate) fn start(
        service: Arc<Service>,
        retention: Arc<Retention>,
        period: Duration,
    ) -> anyhow::Result<Option<Scheduler>> {
        if !retention.config().enabled {
            tracing::info!("retention is disabled (retention.enabled = false)");
            return Ok(None);
        }
        if retention.has_test_clock() {
            tracing::warn!(
                "retention runs on a test clock ({}=1): no pass runs unless \
                 POST /v1/retention/run asks; never use this in production",
                super::TEST_CLOCK_ENV
            );
            return Ok(None);
        }
        let worker = retention.clone();
        let thread = std::thread::Builder::new()
            .name("blockseal-retention".into())
            .spawn(move || run(&service, &worker, period))
            .context("cannot start the retention thread")?;
        tracing::info!(
            period_secs = period.as_secs(),
            "retention scheduler started"
        );
        Ok(Some(Scheduler { retention, thread }))
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(self) {
        self.retention.request_stop();
        if self.thread.join().is_err() {
            tracing::error!("the retention thread panicked");
        }
    }
}

fn run(service: &Service, retention: &Retention, period: Duration) {
    let mut backoff = Backoff::new(period);
    loop {
        let now = retention.clock.now();
        let started = Instant::now();
        // The pass's actions (admin operations) are its span's children.
        tracing::info_span!("retention.pass", now).in_scope(|| {
            match retention.pass(service, now, &|key| backoff.waiting(key, Instant::now())) {
                Ok(outcomes) => backoff.update(&outcomes, Instant::now()),
                Err(e) => {
                    tracing::error!(error = %e, "retention pass failed; retried at the next")
                }
            }
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "retention pass done"
            );
        });
        if retention.sleep(period) {
            return;
        }
    }
}

/// Pauses before retrying actions that failed.
struct Backoff {
    first: Duration,
    /// Action key -> (failures in a row, not before).
    failing: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    fn new(first: Duration) -> Backoff {
        Backoff {
            first,
            failing: HashMap::new(),
        }
    }

    /// Whether `key` is still in its pause at `now`.
    fn waiting(&self, key: &str, now: Instant) -> bool {
        self.failing.get(key).is_some_and(|&(_, until)| now < until)
    }

    fn update(&mut self, outcomes: &[Outcome], now: Instant) {
        for outcome in outcomes {
            match &outcome.result {
                Ok(_) => {
                    self.failing.remove(&outcome.key);
                }
                Err(_) => {
                    let failures = self.failing.get(&outcome.key).map_or(0, |f| f.0) + 1;
                    let pause = self
                        .first
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(MAX_BACKOFF);
                    self.failing
                        .insert(outcome.key.clone(), (failures, now + pause));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(key: &str, ok: bool) -> Outcome {
        Outcome {
            key: key.to_owned(),
            action: "retention.backup",
            target: key.to_owned(),
            result: if ok {
                Ok(String::new())
            } else {
                Err("disk full".into())
            },
            audited: false,
        }
    }

    #[test]
    fn failures_pause_longer_each_time_up_to_an_hour_and_success_clears() {
        let minute = Duration::from_secs(60);
        let mut b = Backoff::new(minute);
        let t0 = Instant::now();
        assert!(!b.waiting("a", t0));
        b.update(&[outcome("a", false)], t0);
        assert!(b.waiting("a", t0 + minute - Duration::from_secs(1)));
        assert!(!b.waiting("a", t0 + minute));
        assert!(!b.waiting("b", t0));
        b.update(&[outcome("a", false)], t0);
        assert!(b.waiting("a", t0 + minute));
        assert!(!b.waiting("a", t0 + 2 * minute));
        for _ in 0..20 {
            b.update(&[outcome("a", false)], t0);
        }
        assert!(b.waiting("a", t0 + MAX_BACKOFF - Duration::from_secs(1)));
        assert!(!b.waiting("a", t0 + MAX_BACKOFF));
        b.update(&[outcome("a", true)], t0);
        assert!(!b.waiting("a", t0));
    }
}
