//! What clients and admins reach on a cluster host: the NBD catalog and the
//! admin API, each routing by tenant to the shard that holds it, and the
//! guard that keeps every request inside the shard's lease.

use std::sync::Arc;

use blockseal_nbd::{Catalog, Export, ExportError, ExportInfo, Extent, Scope, Shutdown, Throttle};
use hyper::StatusCode;

use super::host::Cluster;
use super::{Authority, shard_name, shard_of};
use crate::admin::api::{ApiError, Op, Reply};
use crate::admin::backup::OpIo;
use crate::admin::service::{Caller, Dispatch};

/// The exports of every shard this host serves, by name.
pub(crate) struct ClusterCatalog {
    cluster: Arc<Cluster>,
}

impl ClusterCatalog {
    pub(crate) fn new(cluster: Arc<Cluster>) -> ClusterCatalog {
        ClusterCatalog { cluster }
    }
}

impl Catalog for ClusterCatalog {
    fn list(&self, scope: &Scope) -> Vec<ExportInfo> {
        let mut out: Vec<ExportInfo> = self
            .cluster
            .shards()
            .iter()
            .filter(|shard| shard.authority.holds())
            .flat_map(|shard| shard.catalog.list(scope))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn open(&self, name: &str, scope: &Scope) -> Option<Arc<dyn Export>> {
        let (tenant, _) = name.split_once('/')?;
        let index = shard_of(tenant, self.cluster.record().shards);
        let Some(shard) = self.cluster.shard(index) else {
            tracing::info!(
                export = %name,
                shard = %shard_name(index),
                "export refused: its shard is not served by this host (see `blockseal cluster locate`)"
            );
            return None;
        };
        if !shard.authority.holds() {
            return None;
        }
        shard.catalog.open(name, scope)
    }

    fn description(&self, name: &str, scope: &Scope) -> String {
        let Some((tenant, _)) = name.split_once('/') else {
            return String::new();
        };
        let index = shard_of(tenant, self.cluster.record().shards);
        self.cluster
            .shard(index)
            .map(|shard| shard.catalog.description(name, scope))
            .unwrap_or_default()
    }
}

/// An export of a shard, answering only while this host holds the shard:
/// the lease is checked before a request runs and again before its reply,
/// so nothing is acknowledged once the lease may have run out.
pub(crate) struct Leased {
    pub(crate) inner: Arc<dyn Export>,
    pub(crate) authority: Arc<Authority>,
}

impl Leased {
    fn guard<T>(&self, run: impl FnOnce() -> Result<T, ExportError>) -> Result<T, ExportError> {
        self.authority.check()?;
        let result = run()?;
        self.authority.check()?;
        Ok(result)
    }
}

impl Export for Leased {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.guard(|| self.inner.read(offset, buf))
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        self.guard(|| self.inner.read_cached(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.guard(|| self.inner.write(offset, data, fua))
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        if self.authority.check().is_err() {
            return writes.iter().map(|_| self.authority.check()).collect();
        }
        let results = self.inner.write_batch(writes);
        if self.authority.check().is_err() {
            return results
                .into_iter()
                .map(|_| self.authority.check())
                .collect();
        }
        results
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.guard(|| self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.guard(|| self.inner.trim(offset, len, fua))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.guard(|| self.inner.write_zeroes(offset, len, fua, no_hole))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.guard(|| self.inner.block_status(offset, len))
    }

    fn write_may_block(&self) -> bool {
        self.inner.write_may_block()
    }

    fn revoked(&self) -> Option<Shutdown> {
        self.inner.revoked()
    }

    fn throttle(&self) -> Option<Throttle> {
        self.inner.throttle()
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.guard(|| self.inner.cache(offset, len))
    }
}

/// The admin API of a cluster host: an operation on a tenant runs on the
/// shard that holds the tenant, if this host serves it; listings cover the
/// shards it serves.
pub(crate) struct ClusterAdmin {
    cluster: Arc<Cluster>,
}

impl ClusterAdmin {
    pub(crate) fn new(cluster: Arc<Cluster>) -> ClusterAdmin {
        ClusterAdmin { cluster }
    }

    fn not_here(&self, tenant: &str) -> ApiError {
        let index = shard_of(tenant, self.cluster.record().shards);
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "shard_not_here",
            format!(
                "tenant {tenant} is in shard {}, which host {} does not serve now; \
                 `blockseal cluster locate {tenant}/VOLUME` names the host that does",
                shard_name(index),
                self.cluster.host()
            ),
        )
    }
}

impl Dispatch for ClusterAdmin {
    fn run_with(&self, caller: &Caller, op: &Op, io: &mut OpIo<'_>) -> Result<Reply, ApiError> {
        if let Some(tenant) = op.tenant() {
            let index = shard_of(tenant, self.cluster.record().shards);
            return match self.cluster.shard(index) {
                Some(shard) if shard.authority.holds() => shard.service.run_with(caller, op, io),
                _ => Err(self.not_here(tenant)),
            };
        }
        match op {
            Op::ListTenants | Op::ListVolumes { tenant: None } | Op::DataKeyStatusAll => {
                let mut merged: Option<Reply> = None;
                for shard in self.cluster.shards() {
                    let reply = shard.service.run_with(caller, op, io)?;
                    merged = Some(match merged {
                        None => reply,
                        Some(so_far) => so_far.merge(reply),
                    });
                }
                Ok(merged.unwrap_or_else(|| Reply::empty_like(op)))
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_in_cluster",
                format!(
                    "`{}` acts on a whole store and is not available on a cluster host yet; \
                     operations on a tenant, a volume or a snapshot are",
                    op.action()
                ),
            )),
        }
    }

    fn audit_denied(&self, caller: &Caller, action: &str, target: &str, why: &str) {
        for shard in self.cluster.shards() {
            shard.service.audit_denied(caller, action, target, why);
        }
    }
}
