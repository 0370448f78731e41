//! The cluster's records in the bucket (JSON), and typed access to them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use blockseal_volume::object::{Expect, Listed, ObjectStore, PutError, Records, Version};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Lease timings of a new cluster, unless the configuration says otherwise.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(8);
pub(crate) const DEFAULT_RENEW: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// `<prefix>/cluster`: fixed when the first host creates the cluster. The
/// timings are the cluster's, not each host's: the safety argument needs
/// every host to count with the same lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterRecord {
    pub(crate) version: u32,
    pub(crate) shards: u32,
    pub(crate) lease_ms: u64,
    pub(crate) renew_ms: u64,
    pub(crate) grace_ms: u64,
}

impl ClusterRecord {
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub(crate) fn renew(&self) -> Duration {
        Duration::from_millis(self.renew_ms)
    }

    pub(crate) fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    /// How long before its lease would expire for others a holder stops
    /// serving: one renewal period, so that a renewal that is slow to
    /// answer still leaves the holder ahead of any taker.
    pub(crate) fn margin(&self) -> Duration {
        self.renew()
    }

    /// The timings must leave a holder time to renew and a taker no way to
    /// take early.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.version != 1 {
            bail!(
                "the cluster record has version {}; this build knows version 1",
                self.version
            );
        }
        if self.shards == 0 || self.shards > 4096 {
            bail!("a cluster has 1 to 4096 shards, not {}", self.shards);
        }
        if self.renew_ms < 100 || self.lease_ms < 3 * self.renew_ms || self.grace_ms < 100 {
            bail!(
                "lease timings: the lease ({} ms) must be at least three renewals ({} ms \
                 each) and the grace at least 100 ms ({} ms)",
                self.lease_ms,
                self.renew_ms,
                self.grace_ms
            );
        }
        Ok(())
    }
}

/// `<prefix>/hosts/<host>`: what a host announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostRecord {
    pub(crate) host: String,
    /// Random, per process: tells a restarted host from its earlier life.
    pub(crate) instance: String,
    /// Where its clients connect (`nbd://…`, `nbds://…`, `nbd+unix://…`).
    pub(crate) uri: String,
    /// `up` or `stopped` (a clean stop released every lease first).
    pub(crate) state: String,
    /// Bumped at every announcement.
    pub(crate) counter: u64,
}

/// `<prefix>/leases/<shard>`: who serves a shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    /// The host serving it; `None` when released.
    pub(crate) holder: Option<String>,
    /// The holder's process; `None` when the shard was handed to `holder`
    /// and it has not taken it yet.
    pub(crate) instance: Option<String>,
    /// Bumped at every renewal: each renewal is a new version.
    pub(crate) counter: u64,
    /// Set by `blockseal cluster move`: the holder hands the shard to
    /// this host.
    #[serde(default)]
    pub(crate) move_to: Option<String>,
    /// The holder has the shard's store open and serves it (set by the
    /// first renewal after the open).
    #[serde(default)]
    pub(crate) serving: bool,
}

/// The cluster's records under its prefix.
#[derive(Debug)]
pub(crate) struct Bucket {
    records: Records,
}

pub(crate) const CLUSTER: &str = "cluster";
pub(crate) const HOSTS: &str = "hosts";
pub(crate) const LEASES: &str = "leases";

impl Bucket {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> anyhow::Result<Bucket> {
        Ok(Bucket {
            records: Records::new(store, prefix).context("cannot start the bucket client")?,
        })
    }

    /// The record `name`, parsed, with its version.
    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<(T, Version)>> {
        let Some(record) = self
            .records
            .get(name)
            .with_context(|| format!("cannot read {name} from the bucket"))?
        else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&record.body)
            .with_context(|| format!("the bucket's {name} record is damaged"))?;
        Ok(Some((value, record.version)))
    }

    /// Writes `value` as `name` if it is as `expect` says.
    pub(crate) fn put<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        expect: &Expect,
    ) -> Result<Version, PutError> {
        let body = serde_json::to_vec(value).expect("records serialize");
        self.records.put(name, body, expect)
    }

    /// The records under `dir`, with their versions.
    pub(crate) fn list(&self, dir: &str) -> anyhow::Result<Vec<Listed>> {
        self.records
            .list(dir)
            .with_context(|| format!("cannot list {dir} in the bucket"))
    }

    /// The cluster record, written from `new` when there is none yet.
    pub(crate) fn cluster(&self, new: Option<ClusterRecord>) -> anyhow::Result<ClusterRecord> {
        loop {
            if let Some((record, _)) = self.get::<ClusterRecord>(CLUSTER)? {
                record.check()?;
                return Ok(record);
            }
            let Some(new) = new else {
                bail!("the bucket holds no cluster at this prefix (no cluster record)");
            };
            new.check()?;
            match self.put(CLUSTER, &new, &Expect::Absent) {
                Ok(_) => return Ok(new),
                // Another host created it first: read theirs.
                Err(PutError::Conflict) => continue,
                Err(PutError::Io(e)) => {
                    return Err(anyhow::Error::new(e).context("cannot create the cluster record"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_checked() {
        let good = ClusterRecord {
            version: 1,
            shards: 4,
            lease_ms: 8000,
            renew_ms: 2000,
            grace_ms: 2000,
        };
        good.check().unwrap();
        let short = ClusterRecord {
            lease_ms: 5000,
            ..good
        };
        assert!(format!("{:#}", short.check().unwrap_err()).contains("three renewals"));
        let none = ClusterRecord { shards: 0, ..good };
        assert!(none.check().is_err());
        let newer = ClusterRecord { version: 2, ..good };
        assert!(newer.check().is_err());
    }

    #[test]
    fn lease_records_read_without_move_to() {
        let lease: LeaseRecord =
            serde_json::from_str(r#"{"holder":"a","instance":"x","counter":3}"#).unwrap();
        assert_eq!(lease.move_to, None);
        assert_eq!(lease.counter, 3);
    }
}
