//! Server-wide limits: the memory budget of request and reply buffers (and each
//! tenant's share of it), the spare reply buffers, the caps on connections in
//! the handshake and in transmission (in total and per tenant), and
//! rate-limited log lines for refusals.
//!
//! Every limit here applies backpressure or refuses a connection; none of them
//! ever fails a request that was accepted.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::server::ServerConfig;

/// At most one log line per this interval for each kind of refusal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Spare reply buffers larger than this go back to the allocator (a 1 MiB read
/// and its header fit).
pub(crate) const MAX_POOLED: usize = 2 * 1024 * 1024;

const LOCK: &str = "limit locks are never poisoned: nothing under them panics";
const CLOSED: &str = "budget semaphores are never closed";

/// The shared state behind the limits of one server.
pub(crate) struct Limits {
    /// Bytes of request payloads and reply data held by requests on blocking
    /// threads, from admission until their reply is written to the socket.
    pub(crate) budget: Arc<Semaphore>,
    /// Bytes in `budget`.
    budget_total: usize,
    /// The most of `budget` the connections of one tenant may hold together.
    tenant_budget: usize,
    /// Spare reply buffers, shared by every connection.
    pub(crate) buffers: BufferPool,
    handshakes: Mutex<BTreeMap<u64, Handshake>>,
    established: Mutex<Established>,
    max_handshakes: usize,
    eviction_age: Duration,
    max_connections: usize,
    max_per_tenant: usize,
    pub(crate) refused_handshakes: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) handshake_log: LogLimiter,
    pub(crate) connection_log: LogLimiter,
    pub(crate) accept_log: LogLimiter,
}

struct Handshake {
    started: Instant,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Established {
    total: usize,
    per_tenant: HashMap<String, Tenant>,
}

/// A tenant with connections in transmission.
struct Tenant {
    connections: usize,
    /// The tenant's share of the memory budget, in bytes.
    budget: Arc<Semaphore>,
}

impl Limits {
    pub(crate) fn new(config: &ServerConfig) -> Limits {
        Limits {
            budget: Arc::new(Semaphore::new(config.memory_budget)),
            budget_total: config.memory_budget,
            tenant_budget: config.tenant_budget(),
            buffers: BufferPool::new((config.memory_budget / 8).min(32 * 1024 * 1024)),
            handshakes: Mutex::new(BTreeMap::new()),
            established: Mutex::new(Established::default()),
            max_handshakes: config.max_handshakes,
            eviction_age: config.handshake_eviction_age,
            max_connections: config.max_connections,
            max_per_tenant: config.max_connections_per_tenant,
            refused_handshakes: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            handshake_log: LogLimiter::default(),
            connection_log: LogLimiter::default(),
            accept_log: LogLimiter::default(),
        }
    }

    /// Bytes of the memory budget not held by any request now.
    pub(crate) fn budget_available(&self) -> usize {
        self.budget.available_permits()
    }

    /// Reserves `bytes` of the memory budget (at most a tenant's share) for a
    /// request of the connection holding `slot`: first of its tenant's share,
    /// then of the server's budget, always in that order so that no two waits
    /// can each hold what the other needs. Both semaphores are first come,
    /// first served. `Err` is the wait when either is short.
    pub(crate) fn reserve(
        &self,
        slot: Option<&ConnectionSlot>,
        bytes: u64,
    ) -> Result<Reservation, Reserving> {
        // Every cost is at most 64 MiB (the largest payload, a piece of zeroes,
        // or a block status), and the budget and each share are at least the
        // largest payload; a block status costing more than a tiny share takes
        // all of it and runs alone.
        let share = self.tenant_budget.min(self.budget_total) as u64;
        let n = u32::try_from(bytes.min(share)).expect("a request costs less than 4 GiB");
        let server = self.budget.clone();
        let tenant = slot.map(|slot| slot.budget.clone());
        let held_by_tenant = match tenant {
            None => None,
            Some(tenant) => match tenant.clone().try_acquire_many_owned(n) {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return Err(Box::pin(async move {
                        let tenant = tenant.acquire_many_owned(n).await;
                        let server = server.acquire_many_owned(n).await;
                        Reservation {
                            _tenant: Some(tenant.expect(CLOSED)),
                            _server: server.expect(CLOSED),
                        }
                    }));
                }
            },
        };
        match server.clone().try_acquire_many_owned(n) {
            Ok(permit) => Ok(Reservation {
                _tenant: held_by_tenant,
                _server: permit,
            }),
            Err(_) => Err(Box::pin(async move {
                let server = server.acquire_many_owned(n).await;
                Reservation {
                    _tenant: held_by_tenant,
                    _server: server.expect(CLOSED),
                }
            })),
        }
    }

    /// Takes a handshake slot for connection `id` (ids grow with accept order).
    /// When every slot is taken, the oldest handshake is closed to make room if
    /// it has lasted [`ServerConfig::handshake_eviction_age`]; otherwise `None`:
    /// the new connection is to be closed at once.
    pub(crate) fn enter_handshake(self: &Arc<Self>, id: u64) -> Option<HandshakeSlot> {
        let mut handshakes = self.handshakes.lock().expect(LOCK);
        if handshakes.len() >= self.max_handshakes {
            let (&oldest, handshake) = handshakes.iter().next()?;
            if handshake.started.elapsed() < self.eviction_age {
                return None;
            }
            // notify_one stores the wake-up if the task is not waiting yet.
            handshake.evict.notify_one();
            handshakes.remove(&oldest);
        }
        let evict = Arc::new(Notify::new());
        handshakes.insert(
            id,
            Handshake {
                started: Instant::now(),
                evict: evict.clone(),
            },
        );
        Some(HandshakeSlot {
            limits: self.clone(),
            id,
            evict,
        })
    }

    /// Takes a transmission slot for a connection to an export of `tenant`, or
    /// says which cap is full.
    pub(crate) fn enter_transmission(
        self: &Arc<Self>,
        tenant: &str,
    ) -> Result<ConnectionSlot, ConnectionCap> {
        let mut established = self.established.lock().expect(LOCK);
        if established.total >= self.max_connections {
            return Err(ConnectionCap::Total);
        }
        let count = established
            .per_tenant
            .get(tenant)
            .map_or(0, |t| t.connections);
        if count >= self.max_per_tenant {
            return Err(ConnectionCap::Tenant);
        }
        established.total += 1;
        let entry = established
            .per_tenant
            .entry(tenant.to_owned())
            .or_insert_with(|| Tenant {
                connections: 0,
                budget: Arc::new(Semaphore::new(self.tenant_budget)),
            });
        entry.connections += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            tenant: tenant.to_owned(),
            budget: entry.budget.clone(),
        })
    }
}

/// Which connection cap refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionCap {
    Total,
    Tenant,
}

/// A connection's place among those in the handshake; released on drop.
pub(crate) struct HandshakeSlot {
    limits: Arc<Limits>,
    id: u64,
    evict: Arc<Notify>,
}

impl HandshakeSlot {
    /// Completes when the slot was taken away to make room for a newer
    /// connection.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        // An evicted slot has left the map already; removing again is harmless.
        let mut handshakes = self.limits.handshakes.lock().expect(LOCK);
        if handshakes
            .get(&self.id)
            .is_some_and(|h| Arc::ptr_eq(&h.evict, &self.evict))
        {
            handshakes.remove(&self.id);
        }
    }
}

/// A connection's place among those in transmission, and its tenant's share of
/// the memory budget; released on drop.
pub(crate) struct ConnectionSlot {
    limits: Arc<Limits>,
    tenant: String,
    budget: Arc<Semaphore>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut established = self.limits.established.lock().expect(LOCK);
        established.total -= 1;
        if let Some(t) = established.per_tenant.get_mut(&self.tenant) {
            t.connections -= 1;
            // Requests still holding part of the share keep its semaphore alive
            // until they end; the server's budget bounds them meanwhile.
            if t.connections == 0 {
                established.per_tenant.remove(&self.tenant);
            }
        }
    }
}

/// A request's share of the memory budget: of its tenant's share (none for a
/// connection outside the connection caps) and of the server's budget.
pub(crate) struct Reservation {
    _tenant: Option<OwnedSemaphorePermit>,
    _server: OwnedSemaphorePermit,
}

/// A pending [`Reservation`], when the budget or the tenant's share was short.
pub(crate) type Reserving = Pin<Box<dyn Future<Output = Reservation> + Send>>;

/// Budget a request holds until its reply is written: bytes against its
/// connection's limit and, for requests on blocking threads, a reservation of
/// the memory budget.
pub(crate) struct Held {
    pub(crate) bytes: u64,
    pub(crate) _reservation: Option<Reservation>,
}

/// Spare reply buffers shared by every connection, at most `limit` bytes of
/// capacity in all: a worker fills one, the connection writes it and hands it
/// back, so large replies cost no allocation (and no page faults), while an
/// idle server keeps a bounded amount.
pub(crate) struct BufferPool {
    spare: Mutex<(Vec<Vec<u8>>, usize)>,
    limit: usize,
}

impl BufferPool {
    fn new(limit: usize) -> BufferPool {
        BufferPool {
            spare: Mutex::new((Vec::new(), 0)),
            limit,
        }
    }

    /// An empty buffer, reused when one is spare.
    pub(crate) fn take(&self, capacity: usize) -> Vec<u8> {
        let mut spare = self.spare.lock().expect(LOCK);
        match spare.0.pop() {
            Some(buf) => {
                spare.1 -= buf.capacity();
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// Keeps `buf` for reuse unless it is large or the pool is full.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        if capacity == 0 || capacity > MAX_POOLED {
            return;
        }
        buf.clear();
        let mut spare = self.spare.lock().expect(LOCK);
        if spare.1 + capacity <= self.limit {
            spare.1 += capacity;
            spare.0.push(buf);
        }
    }
}

/// Lets one log line through per [`LOG_INTERVAL`] and counts the ones held back.
#[derive(Default)]
pub(crate) struct LogLimiter {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl LogLimiter {
    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().expect(LOCK);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits whose handshakes are never old enough to be evicted unless a test
    /// ages them.
    fn limits(handshakes: usize, connections: usize, per_tenant: usize) -> Arc<Limits> {
        let config = ServerConfig {
            max_handshakes: handshakes,
            handshake_eviction_age: Duration::from_secs(60),
            max_connections: connections,
            max_connections_per_tenant: per_tenant,
            ..ServerConfig::default()
        };
        Arc::new(Limits::new(&config))
    }

    #[test]
    fn young_handshakes_are_kept_and_new_ones_refused() {
        let limits = limits(2, 10, 10);
        let a = limits.enter_handshake(1).unwrap();
        let _b = limits.enter_handshake(2).unwrap();
        assert!(limits.enter_handshake(3).is_none());
        drop(a);
        assert!(limits.enter_handshake(4).is_some());
    }

    #[test]
    fn the_oldest_handshake_makes_room_once_it_has_lasted_the_eviction_age() {
        let limits = limits(2, 10, 10);
        let oldest = limits.enter_handshake(1).unwrap();
        let _b = limits.enter_handshake(2).unwrap();
        assert!(limits.enter_handshake(3).is_none());
        {
            let mut handshakes = limits.handshakes.lock().unwrap();
            let started = &mut handshakes.get_mut(&1).unwrap().started;
            *started = started
                .checked_sub(limits.eviction_age)
                .expect("the clock has run longer than the eviction age");
        }
        let _c = limits.enter_handshake(4).unwrap();
        // The evicted connection is told (the wake-up waits for it), and its
        // slot's drop leaves the newer ones alone.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), oldest.evicted())
                .await
                .expect("the oldest handshake is told it was evicted");
        });
        drop(oldest);
        let ids: Vec<u64> = limits.handshakes.lock().unwrap().keys().copied().collect();
        assert_eq!(ids, [2, 4]);
        assert!(limits.enter_handshake(5).is_none());
    }

    #[test]
    fn connection_caps_total_and_per_tenant() {
        let limits = limits(2, 3, 2);
        let a1 = limits.enter_transmission("acme").unwrap();
        let _a2 = limits.enter_transmission("acme").unwrap();
        assert_eq!(
            limits.enter_transmission("acme").err(),
            Some(ConnectionCap::Tenant)
        );
        let _g1 = limits.enter_transmission("globex").unwrap();
        assert_eq!(
            limits.enter_transmission("initech").err(),
            Some(ConnectionCap::Total)
        );
        drop(a1);
        let _a3 = limits.enter_transmission("acme").unwrap();
    }

    #[test]
    fn a_tenant_past_its_share_waits_while_another_reserves() {
        let config = ServerConfig {
            memory_budget: 4 << 20,
            memory_budget_per_tenant: Some(2 << 20),
            max_request_payload: 1 << 20,
            ..ServerConfig::default()
        };
        let limits = Arc::new(Limits::new(&config));
        let acme = limits.enter_transmission("acme").unwrap();
        let globex = limits.enter_transmission("globex").unwrap();
        let held = limits.reserve(Some(&acme), 2 << 20).ok().unwrap();
        let waiting = limits.reserve(Some(&acme), 1).err().unwrap();
        let other = limits.reserve(Some(&globex), 2 << 20).ok().unwrap();
        assert_eq!(limits.budget_available(), 0);
        drop(other);
        // The server's budget is free again, but acme's share is not.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let reserved = runtime.block_on(async {
            let mut waiting = waiting;
            let now = tokio::time::timeout(Duration::ZERO, &mut waiting).await;
            assert!(now.is_err(), "acme reserved past its share");
            drop(held);
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("acme's share came back")
        });
        assert_eq!(limits.budget_available(), (4 << 20) - 1);
        drop(reserved);
        assert_eq!(limits.budget_available(), 4 << 20);
    }

    #[test]
    fn pool_keeps_a_bounded_amount() {
        let pool = BufferPool::new(3 << 20);
        pool.give(Vec::with_capacity(2 << 20));
        pool.give(Vec::with_capacity(2 << 20));
        pool.give(Vec::with_capacity(MAX_POOLED + 1));
        assert_eq!(pool.spare.lock().unwrap().0.len(), 1);
        assert_eq!(pool.take(10).capacity(), 2 << 20);
        assert_eq!(pool.spare.lock().unwrap().1, 0);
    }

    #[test]
    fn log_limiter_counts_what_it_holds_back() {
        let log = LogLimiter::default();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        *log.last.lock().unwrap() = Some(Instant::now() - LOG_INTERVAL);
        assert_eq!(log.allow(), Some(2));
    }
}
