//! I/O rate limits: token buckets of requests and bytes per second, shared by
//! the connections they cover (a tenant's, a volume's), changeable while
//! connections run.
//!
//! A connection charges each request to every limiter of its export's
//! [`Throttle`] when it takes the request in, before the request holds any
//! memory, and runs it when all of them have the tokens: a bucket may go into
//! debt by one request (so a request larger than a bucket still runs, after
//! the debt it makes is paid back), and the requests after it wait their
//! turn. While a request waits, its connection stops reading the socket, so a
//! client over its limit is slowed by TCP backpressure and nothing else: no
//! request is ever refused or failed for a limit, and the connections of other
//! tenants never wait on it.
//!
//! Every request counts as one operation (flush and block status too: a
//! flood of them costs the disk as much as writes); read, write and cache
//! requests count their length in bytes, and write zeroes its length when it
//! must write real zero blocks (`NBD_CMD_FLAG_NO_HOLE`).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much unused rate a bucket saves up, as time at its rate: after a
/// quiet moment a client may send this much at once. Short, so that a
/// client at its limit is paced evenly rather than in bunches that would
/// crowd other tenants' requests.
pub const BURST: Duration = Duration::from_millis(10);

/// A rate limit: operations and bytes per second, each unlimited when `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second.
    pub iops: Option<NonZeroU64>,
    /// Bytes per second.
    pub bytes_per_sec: Option<NonZeroU64>,
}

impl RateLimit {
    /// No limit at all.
    pub const UNLIMITED: RateLimit = RateLimit {
        iops: None,
        bytes_per_sec: None,
    };

    /// Whether neither rate is limited.
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bytes_per_sec.is_none()
    }
}

/// One rate limit's buckets, shared by the connections it covers.
#[derive(Debug)]
pub struct RateLimiter {
    /// Whether either rate is limited: when not, a request is let through
    /// without taking the lock.
    limited: AtomicBool,
    state: Mutex<State>,
    /// Requests that had to wait for this limiter.
    throttled: AtomicU64,
    /// Nanoseconds this limiter made requests wait, in all.
    delayed_nanos: AtomicU64,
}

#[derive(Debug)]
struct State {
    limit: RateLimit,
    ops: Bucket,
    bytes: Bucket,
}

/// A token bucket: `tokens` at `last`, refilled at the limit's rate up to
/// [`BURST`] of it; negative while requests taken in are still being paid for.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: Option<NonZeroU64>, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.map_or(0.0, capacity),
            last: now,
        }
    }

    /// Takes `cost` tokens at `now` and returns how long the request must
    /// wait for the bucket to be out of debt again (zero if it is not in
    /// debt).
    fn charge(&mut self, rate: Option<NonZeroU64>, now: Instant, cost: u64) -> Duration {
        let Some(rate) = rate else {
            return Duration::ZERO;
        };
        let per_sec = rate.get() as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(capacity(rate));
        self.last = now.max(self.last);
        let wait = if self.tokens < 0.0 {
            Duration::from_secs_f64(-self.tokens / per_sec)
        } else {
            Duration::ZERO
        };
        self.tokens -= cost as f64;
        wait
    }
}

/// Tokens a bucket of `rate` holds when full: [`BURST`] of its rate, and at
/// least one (so that a single request is never made to wait by a full one).
fn capacity(rate: NonZeroU64) -> f64 {
    (rate.get() as f64 * BURST.as_secs_f64()).max(1.0)
}

impl RateLimiter {
    /// A limiter of `limit`, its buckets full.
    pub fn new(limit: RateLimit) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            limited: AtomicBool::new(!limit.is_unlimited()),
            state: Mutex::new(State {
                limit,
                ops: Bucket::full(limit.iops, now),
                bytes: Bucket::full(limit.bytes_per_sec, now),
            }),
            throttled: AtomicU64::new(0),
            delayed_nanos: AtomicU64::new(0),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> RateLimit {
        self.lock().limit
    }

    /// Changes the limit; requests taken in from now on are charged under it
    /// (a request already waiting keeps its turn). A rate that was unlimited
    /// starts with a full bucket, and debt under an old rate is forgiven.
    pub fn set(&self, limit: RateLimit) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.limit.iops != limit.iops {
            state.ops = Bucket::full(limit.iops, now);
        }
        if state.limit.bytes_per_sec != limit.bytes_per_sec {
            state.bytes = Bucket::full(limit.bytes_per_sec, now);
        }
        state.limit = limit;
        self.limited.store(!limit.is_unlimited(), Ordering::Release);
    }

    /// Requests that waited for this limiter so far.
    pub fn throttled_requests(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// The time requests waited for this limiter so far, in all.
    pub fn delayed(&self) -> Duration {
        Duration::from_nanos(self.delayed_nanos.load(Ordering::Relaxed))
    }

    /// Charges one request of `bytes` at `now`; returns how long it waits.
    fn charge(&self, now: Instant, bytes: u64) -> Duration {
        if !self.limited.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let mut state = self.lock();
        let State {
            limit,
            ops,
            bytes: b,
        } = &mut *state;
        let wait = ops
            .charge(limit.iops, now, 1)
            .max(b.charge(limit.bytes_per_sec, now, bytes));
        drop(state);
        if !wait.is_zero() {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            self.delayed_nanos.fetch_add(
                u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        wait
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock panics; a poisoned one still holds a valid
        // state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The limiters an export's requests are charged to (for example its
/// tenant's and its volume's). A request runs when every one of them has let
/// it through.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    limiters: Vec<Arc<RateLimiter>>,
}

impl Throttle {
    /// A throttle charging each of `limiters`.
    pub fn new(limiters: Vec<Arc<RateLimiter>>) -> Throttle {
        Throttle { limiters }
    }

    /// Whether any of its limiters limits anything now: when none does, a
    /// request need not be charged (nor the clock read).
    pub fn is_limited(&self) -> bool {
        self.limiters
            .iter()
            .any(|l| l.limited.load(Ordering::Acquire))
    }

    /// Charges one request of `bytes` to every limiter at `now`; returns
    /// when it may run (`now` when none of them is in debt).
    pub fn admit(&self, now: Instant, bytes: u64) -> Instant {
        let wait = self
            .limiters
            .iter()
            .map(|l| l.charge(now, bytes))
            .max()
            .unwrap_or_default();
        now + wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(iops: u64, bytes: u64) -> RateLimit {
        RateLimit {
            iops: NonZeroU64::new(iops),
            bytes_per_sec: NonZeroU64::new(bytes),
        }
    }

    /// Runs `requests` requests of `bytes` back to back through `throttle`
    /// on a simulated clock (each starts when the throttle lets it) and
    /// returns when the last one was let through, from the first.
    fn simulate(throttle: &Throttle, start: Instant, requests: u64, bytes: u64) -> Duration {
        let mut now = start;
        for _ in 0..requests {
            now = throttle.admit(now, bytes);
        }
        now - start
    }

    #[test]
    fn unlimited_never_waits() {
        let limiter = Arc::new(RateLimiter::new(RateLimit::UNLIMITED));
        let throttle = Throttle::new(vec![limiter.clone()]);
        assert!(!throttle.is_limited());
        limiter.set(limit(5, 0));
        assert!(throttle.is_limited());
        limiter.set(RateLimit::UNLIMITED);
        let start = Instant::now();
        assert_eq!(simulate(&throttle, start, 100_000, 1 << 20), Duration::ZERO);
        assert_eq!(
            Throttle::default().admit(start, 1 << 30),
            start,
            "no limiters, no wait"
        );
    }

    /// Seconds `n` back-to-back requests of one unit take under a rate of
    /// `rate` units a second: the bucket's burst and one request into debt
    /// go at once, the rest at the rate.
    fn expected(n: u64, rate: u64) -> f64 {
        let free = capacity(NonZeroU64::new(rate).unwrap()).floor() as u64 + 1;
        n.saturating_sub(free) as f64 / rate as f64
    }

    fn close(took: Duration, want: f64) -> bool {
        (took.as_secs_f64() - want).abs() < 0.002
    }

    #[test]
    fn iops_are_held_to_the_rate_after_the_burst() {
        let limiter = Arc::new(RateLimiter::new(limit(1000, 0)));
        let throttle = Throttle::new(vec![limiter.clone()]);
        let start = Instant::now();
        let took = simulate(&throttle, start, 2100, 4096);
        assert!(
            close(took, expected(2100, 1000)),
            "2100 requests at 1000/s took {took:?}"
        );
        assert!(took > Duration::from_secs(2));
        assert!(limiter.throttled_requests() >= 2000);
        assert!(limiter.delayed() > Duration::from_secs(1));
    }

    #[test]
    fn bytes_are_held_to_the_rate_and_a_large_request_still_runs() {
        let throttle = Throttle::new(vec![Arc::new(RateLimiter::new(limit(0, 1 << 20)))]);
        let start = Instant::now();
        // One 8 MiB request at 1 MiB/s runs at once, and the next waits for
        // the debt it made: eight seconds less the burst.
        let first = throttle.admit(start, 8 << 20);
        assert_eq!(first, start);
        let second = throttle.admit(start, 4096);
        let waited = (second - start).as_secs_f64();
        let want = 8.0 - BURST.as_secs_f64();
        assert!((waited - want).abs() < 0.001, "waited {waited}");
    }

    #[test]
    fn the_slowest_limiter_decides() {
        let tenant = Arc::new(RateLimiter::new(limit(10_000, 0)));
        let volume = Arc::new(RateLimiter::new(limit(0, 4096 * 500)));
        let throttle = Throttle::new(vec![tenant.clone(), volume.clone()]);
        let start = Instant::now();
        // 4 KiB requests: the volume's 500 per second binds, not the
        // tenant's 10,000.
        let took = simulate(&throttle, start, 1050, 4096);
        assert!(close(took, expected(1050, 500)), "took {took:?}");
        assert!(took > Duration::from_secs(2));
        assert_eq!(tenant.throttled_requests(), 0);
    }

    #[test]
    fn a_tenant_limit_is_shared_by_its_volumes() {
        let tenant = Arc::new(RateLimiter::new(limit(100, 0)));
        let a = Throttle::new(vec![tenant.clone()]);
        let b = Throttle::new(vec![tenant.clone()]);
        let start = Instant::now();
        let mut now = start;
        for i in 0..410 {
            now = if i % 2 == 0 {
                a.admit(now, 0)
            } else {
                b.admit(now, 0)
            };
        }
        // 100 per second between the two.
        let took = now - start;
        assert!(close(took, expected(410, 100)), "took {took:?}");
        assert!(took > Duration::from_secs(4));
    }

    #[test]
    fn a_limit_changes_for_the_requests_after() {
        let limiter = Arc::new(RateLimiter::new(limit(10, 0)));
        let throttle = Throttle::new(vec![limiter.clone()]);
        let start = Instant::now();
        let slow = simulate(&throttle, start, 21, 0);
        assert!(close(slow, expected(21, 10)), "took {slow:?}");
        // Lifted: nothing waits any more, debt included.
        limiter.set(RateLimit::UNLIMITED);
        let at = start + slow;
        assert_eq!(throttle.admit(at, 0), at);
        // Set again: a full bucket, then the new rate.
        limiter.set(limit(1000, 0));
        assert_eq!(limiter.limit(), limit(1000, 0));
        let took = simulate(&throttle, at, 1100, 0);
        assert!(close(took, expected(1100, 1000)), "took {took:?}");
    }

    #[test]
    fn a_limiter_idle_for_long_saves_only_its_burst() {
        let throttle = Throttle::new(vec![Arc::new(RateLimiter::new(limit(100, 0)))]);
        let start = Instant::now() + Duration::from_secs(3600);
        // An hour idle still lets only the burst and one request into debt
        // through at once.
        let took = simulate(&throttle, start, 12, 0);
        assert!(took > Duration::ZERO);
        assert!(close(took, expected(12, 100)), "took {took:?}");
    }
}
