//! Several hosts serving one bucket: shards, leases and failover
//! (docs/DISTRIBUTED.md has the protocol and the argument for it).
//!
//! A cluster lives under one prefix of a bucket:
//!
//! ```text
//! <prefix>/cluster            the cluster record: shard count and lease timings,
//!                             written once by the first host (create-only)
//! <prefix>/hosts/<host>       each host's announcement: its NBD URI, up or stopped
//! <prefix>/leases/<shard>     who serves the shard: holder, its process, a counter
//! <prefix>/shards/<shard>/…   the shard's store (SlateDB metadata, segments)
//! ```
//!
//! A shard is a whole store; a tenant belongs to the shard [`shard_of`] its
//! name. A host serves a shard only while it holds the shard's lease: it
//! renews the lease record by compare-and-swap every `renew` period, and
//! answers requests only until `lease - margin` after the start of its last
//! successful renewal ([`Authority`]). Another host takes a shard over only
//! after it has seen the lease record unchanged for `lease + grace`, and only
//! by a compare-and-swap on the version it saw, then opens the shard's
//! store, which fences the old writer's SlateDB.

pub(crate) mod catalog;
pub(crate) mod host;
pub(crate) mod records;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use blockseal_nbd::{ErrorClass, ExportError};

/// The shard a tenant belongs to, of `shards`: FNV-1a (64 bit) of the
/// tenant's name modulo the count. Fixed for the life of a cluster (the
/// count is in the cluster record), so any host and `cluster locate`
/// compute it alike.
pub(crate) fn shard_of(tenant: &str, shards: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as u32
}

/// A shard's name: `s` and its index, three digits at least (`s007`).
pub(crate) fn shard_name(index: u32) -> String {
    format!("s{index:03}")
}

/// The index a shard name stands for.
pub(crate) fn shard_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('s')?;
    if digits.len() < 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The URI that reaches `export` on a host announcing `base`: the export
/// name goes into the path, before a query (`nbd+unix:///?socket=…`).
pub(crate) fn export_uri(base: &str, export: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (base, None),
    };
    // `nbd://host:port` has no path yet; `nbd+unix:///` has an empty one.
    let head = head.trim_end_matches('/');
    let sep = if head.ends_with(':') { "///" } else { "/" };
    match query {
        Some(query) => format!("{head}{sep}{export}?{query}"),
        None => format!("{head}{sep}{export}"),
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether this host may serve a shard now: until a deadline its lease
/// renewals set, unless revoked. Every request on the shard's exports
/// checks it before it runs and again before its reply is sent.
#[derive(Debug)]
pub(crate) struct Authority {
    shard: String,
    /// Nanoseconds after [`epoch`]; 0 = none.
    deadline: AtomicU64,
    revoked: AtomicBool,
}

impl Authority {
    pub(crate) fn new(shard: &str) -> Authority {
        Authority {
            shard: shard.to_owned(),
            deadline: AtomicU64::new(0),
            revoked: AtomicBool::new(false),
        }
    }

    /// Whether the shard may be served now.
    pub(crate) fn holds(&self) -> bool {
        !self.revoked.load(Ordering::Acquire)
            && (epoch().elapsed().as_nanos() as u64) < self.deadline.load(Ordering::Acquire)
    }

    /// Extends the authority to `until` (never shortens it).
    pub(crate) fn extend_to(&self, until: Instant) {
        let at = until.saturating_duration_since(epoch()).as_nanos() as u64;
        self.deadline.fetch_max(at, Ordering::AcqRel);
    }

    /// Ends the authority for good.
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// `Ok` while the shard may be served; the error every request of a shard
    /// this host no longer holds gets (`ESHUTDOWN`: reconnect, see
    /// `blockseal cluster locate`).
    pub(crate) fn check(&self) -> Result<(), ExportError> {
        if self.holds() {
            Ok(())
        } else {
            Err(ExportError::new(
                ErrorClass::ShuttingDown,
                format!(
                    "this host no longer holds shard {}; its lease ran out or moved",
                    self.shard
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shard_of_is_stable_and_spread() {
        // Fixed values: the mapping must never change for a cluster.
        assert_eq!(shard_of("acme", 16), shard_of("acme", 16));
        assert_eq!(shard_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("tenant-{i}"), 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(shard_name(7), "s007");
        assert_eq!(shard_name(1234), "s1234");
        assert_eq!(shard_index("s007"), Some(7));
        assert_eq!(shard_index("s1234"), Some(1234));
        assert_eq!(shard_index("s7"), None);
        assert_eq!(shard_index("x007"), None);
        assert_eq!(shard_index("s0a7"), None);
    }

    #[test]
    fn export_uris() {
        assert_eq!(
            export_uri("nbd://10.0.0.5:10809", "acme/disk"),
            "nbd://10.0.0.5:10809/acme/disk"
        );
        assert_eq!(
            export_uri("nbds://h.example/", "acme/disk"),
            "nbds://h.example/acme/disk"
        );
        assert_eq!(
            export_uri("nbd+unix:///?socket=/run/b.sock", "acme/disk"),
            "nbd+unix:///acme/disk?socket=/run/b.sock"
        );
    }

    #[test]
    fn authority_runs_out_and_revokes() {
        let a = Authority::new("s000");
        assert!(!a.holds());
        assert!(a.check().is_err());
        a.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(a.holds());
        // Never shortened.
        a.extend_to(Instant::now());
        assert!(a.holds());
        a.revoke();
        assert!(!a.holds());
        let e = a.check().unwrap_err();
        assert_eq!(e.class(), ErrorClass::ShuttingDown);
        let b = Authority::new("s001");
        b.extend_to(Instant::now());
        assert!(!b.holds());
    }
}
