//! What each admin operation does, on an open store: the one implementation
//! behind both the admin API of a running server and the CLI when no server runs,
//! so the two give the same answers and the same errors.
//!
//! Every operation that changes something (and exporting a tenant's keys,
//! which hands out a copy of them) is recorded in the store's audit log
//! twice: an entry saying it starts, appended durably before anything changes
//! (if that append fails the operation is refused, so nothing changes
//! unrecorded), and one with its outcome. Reads are not recorded.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blockseal_keys::{KeyVersion, TenantId, VolumeId, load_key_file};
use blockseal_volume::{
    AdminError, AdminErrorKind, AuditEntry, BlockSize, CreateError, QueryError, RotateError,
    SnapshotInfo, Store, TenantInfo, TenantState, VolumeError, VolumeInfo, VolumeOptions,
    check_snapshot_name,
};
use hyper::StatusCode;

use super::api::{
    AUDIT_PAGE, AUDIT_PAGE_MAX, ApiError, AuditVerifyView, AuditView, DataKeyVersionView,
    DataKeyView, DeletedView, MasterRotationView, Op, ReencryptionView, Reply, RollbackView,
    ShredView, SnapshotView, StatusView, TenantView, VolumeView,
};
use super::backup::{self, OpIo};
use super::catalog;
use crate::exports::{Reach, RetireError, StoreCatalog};
use crate::iolimits::{Change, Defaults as IoDefaults, IoLimits, Target};
use crate::retention::{self, Retention};
use crate::time::rfc3339_utc;

/// How long deleting a volume or a snapshot, rolling a volume back or
/// shredding a tenant waits for its connections to finish what they run and
/// close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);

/// Who asks: `uid:N` for a Unix socket peer, `local:uid:N` for the CLI on the
/// store directly, `cert:SUBJECT` over TLS.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) actor: String,
}

/// The admin operations on one open store.
pub(crate) struct Service {
    store: Arc<Store>,
    /// The running server's exports, when the store is served: connections are
    /// closed before their volume goes.
    catalog: Option<Arc<StoreCatalog>>,
    /// Retention's settings and clock, when `[retention]` is configured.
    retention: Option<Arc<Retention>>,
    /// The I/O rate limits (a running server's, or the configuration's
    /// defaults with the store's overrides); when `None`, the store's
    /// overrides are read when asked for, with the defaults unknown.
    io_limits: Option<Arc<IoLimits>>,
    /// Operations running, and whether new ones are refused (shutdown).
    running: Mutex<Running>,
    idle: Condvar,
}

#[derive(Default)]
struct Running {
    count: usize,
    closed: bool,
}

/// One running operation; the count drops with it.
struct OpGuard<'a>(&'a Service);

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let mut running = self.0.lock_running();
        running.count -= 1;
        if running.count == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// What the admin API's listeners hand operations to: one store's
/// [`Service`], or a cluster host routing each to its shard's.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// Runs `op` for `caller` (see [`Service::run_with`]).
    fn run_with(&self, caller: &Caller, op: &Op, io: &mut OpIo<'_>) -> Result<Reply, ApiError>;

    /// Runs `op` for `caller` with no stream.
    fn run(&self, caller: &Caller, op: &Op) -> Result<Reply, ApiError> {
        self.run_with(caller, op, &mut OpIo::none())
    }

    /// Records a refused operation (see [`Service::audit_denied`]).
    fn audit_denied(&self, caller: &Caller, action: &str, target: &str, why: &str);
}

impl Dispatch for Service {
    fn run_with(&self, caller: &Caller, op: &Op, io: &mut OpIo<'_>) -> Result<Reply, ApiError> {
        Service::run_with(self, caller, op, io)
    }

    fn audit_denied(&self, caller: &Caller, action: &str, target: &str, why: &str) {
        Service::audit_denied(self, caller, action, target, why)
    }
}

impl Service {
    /// Operations on a store no server serves (the CLI's offline mode).
    pub(crate) fn offline(store: Arc<Store>) -> Service {
        Service {
            store,
            catalog: None,
            retention: None,
            io_limits: None,
            running: Mutex::default(),
            idle: Condvar::new(),
        }
    }

    /// Operations on the store a server serves through `catalog`.
    pub(crate) fn online(store: Arc<Store>, catalog: Arc<StoreCatalog>) -> Service {
        Service {
            store,
            catalog: Some(catalog),
            retention: None,
            io_limits: None,
            running: Mutex::default(),
            idle: Condvar::new(),
        }
    }

    /// The same service with retention (`retention status` and `run`).
    pub(crate) fn with_retention(mut self, retention: Option<Arc<Retention>>) -> Service {
        self.retention = retention;
        self
    }

    /// The same service with the I/O rate limits `limits`.
    pub(crate) fn with_io_limits(mut self, limits: Arc<IoLimits>) -> Service {
        self.io_limits = Some(limits);
        self
    }

    /// The store.
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Refuses new operations from now on and waits, at most `limit`, for the
    /// running ones to finish (at shutdown, before the final flush). Returns
    /// how many are still running.
    pub(crate) fn close(&self, limit: Duration) -> usize {
        let mut running = self.lock_running();
        running.closed = true;
        let (running, _) = self
            .idle
            .wait_timeout_while(running, limit, |r| r.count > 0)
            .unwrap_or_else(|e| e.into_inner());
        running.count
    }

    fn begin(&self) -> Result<OpGuard<'_>, ApiError> {
        let mut running = self.lock_running();
        if running.closed {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; nothing was changed",
            ));
        }
        running.count += 1;
        Ok(OpGuard(self))
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` for `caller`, recording it in the audit log if it changes
    /// anything. Blocking: store I/O.
    pub(crate) fn run(&self, caller: &Caller, op: &Op) -> Result<Reply, ApiError> {
        self.run_with(caller, op, &mut OpIo::none())
    }

    /// [`Service::run`] for an operation that writes a stream (a backup
    /// file) or reports progress (a backup, a restore) through `io`.
    ///
    /// The operation is an `admin` span (INFO), a child of whatever span is
    /// current (the API request's, a retention pass's, or none from the
    /// CLI): `action` and `target` as the audit log names them, `actor`,
    /// and when it ends `outcome` (`ok` or `error`) and the error's stable
    /// `error` code. Never a passphrase or a key.
    pub(crate) fn run_with(
        &self,
        caller: &Caller,
        op: &Op,
        io: &mut OpIo<'_>,
    ) -> Result<Reply, ApiError> {
        let span = tracing::info_span!(
            "admin",
            action = op.action(),
            target = %op.target(),
            actor = %caller.actor,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let _entered = span.enter();
        let result = self.run_audited(caller, op, io);
        match &result {
            Ok(_) => span.record("outcome", "ok"),
            Err(e) => {
                span.record("outcome", "error");
                span.record("error", e.code.as_str())
            }
        };
        result
    }

    fn run_audited(&self, caller: &Caller, op: &Op, io: &mut OpIo<'_>) -> Result<Reply, ApiError> {
        let _running = self.begin()?;
        if !op.audited() {
            return self.dispatch(op, io);
        }
        self.audit(caller, op, "started").map_err(|e| {
            ApiError::internal(format!(
                "the audit log cannot record this operation, so it was not run: {e}"
            ))
        })?;
        let result = self.dispatch(op, io);
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error {}: {}", e.code, e.message),
        };
        if let Err(e) = self.audit(caller, op, &outcome) {
            tracing::error!(action = op.action(), target = %op.target(), error = %e, "could not record the outcome of an admin operation in the audit log");
        }
        result
    }

    /// Records that `caller` was refused `op` before it ran (authorization).
    pub(crate) fn audit_denied(&self, caller: &Caller, op_action: &str, target: &str, why: &str) {
        let entry = AuditEntry {
            actor: caller.actor.clone(),
            action: op_action.to_owned(),
            target: target.to_owned(),
            result: format!("denied: {why}"),
            detail: String::new(),
        };
        if let Err(e) = self.store.audit_append(&entry) {
            tracing::error!(error = %e, "could not record a refused admin request in the audit log");
        }
    }

    fn audit(&self, caller: &Caller, op: &Op, result: &str) -> Result<u64, AdminError> {
        self.store.audit_append(&AuditEntry {
            actor: caller.actor.clone(),
            action: op.action().to_owned(),
            target: op.target(),
            result: result.to_owned(),
            detail: op.detail(),
        })
    }

    /// Runs an operation: the backup operations in `admin::backup`, the
    /// store's catalogue in `admin::catalog`, the rest here.
    fn dispatch(&self, op: &Op, io: &mut OpIo<'_>) -> Result<Reply, ApiError> {
        if let Some(result) = backup::run(self, op, io) {
            return result;
        }
        if let Some(result) = catalog::run(self, op, io) {
            return result;
        }
        self.execute(op)
    }

    fn execute(&self, op: &Op) -> Result<Reply, ApiError> {
        match op {
            Op::Status => self.status(),
            Op::ListTenants => {
                let tenants = self.store.tenants().map_err(query_error)?;
                let mut out = Vec::with_capacity(tenants.len());
                for t in tenants {
                    out.push(self.tenant_view(&t)?);
                }
                Ok(Reply::Tenants(out))
            }
            Op::ShowTenant { tenant } => {
                let tenant = tenant_id(tenant)?;
                let info = self.tenant_info(&tenant)?;
                Ok(Reply::Tenant(self.tenant_view(&info)?))
            }
            Op::CreateTenant { tenant } => {
                let tenant = tenant_id(tenant)?;
                let info = self.store.create_tenant(&tenant).map_err(create_error)?;
                Ok(Reply::Tenant(self.tenant_view(&info)?))
            }
            Op::DeleteTenant { tenant } => {
                let tenant = tenant_id(tenant)?;
                self.store.delete_tenant(&tenant).map_err(admin_error)?;
                self.forget_limits(&tenant, None);
                Ok(Reply::Deleted(DeletedView {
                    deleted: tenant.to_string(),
                    connections_closed: 0,
                }))
            }
            Op::ShredTenant { tenant } => self.shred(tenant),
            Op::RotateTenantKey { tenant } => {
                let tenant = tenant_id(tenant)?;
                let info = self.store.rotate_tenant_key(&tenant).map_err(admin_error)?;
                Ok(Reply::Tenant(self.tenant_view(&info)?))
            }
            Op::ListVolumes { tenant } => {
                let tenants = match tenant {
                    Some(t) => vec![self.tenant_info(&tenant_id(t)?)?.id],
                    None => self
                        .store
                        .tenants()
                        .map_err(query_error)?
                        .into_iter()
                        .map(|t| t.id)
                        .collect(),
                };
                let mut out = Vec::new();
                for tenant in &tenants {
                    for info in self.store.volumes(tenant).map_err(query_error)? {
                        out.push(self.volume_view(&info)?);
                    }
                }
                Ok(Reply::Volumes(out))
            }
            Op::ShowVolume { tenant, volume } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                let info = self.volume_info(&tenant, &volume)?;
                Ok(Reply::Volume(self.volume_view(&info)?))
            }
            Op::CreateVolume {
                tenant,
                volume,
                size,
                block_size,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                let block_size = BlockSize::new(*block_size).map_err(|_| {
                    bad_request(
                        "invalid_block_size",
                        format!(
                            "block size {block_size} is not a power of two from {} to {}",
                            BlockSize::MIN_BYTES,
                            BlockSize::MAX_BYTES
                        ),
                    )
                })?;
                let info = self
                    .store
                    .create_volume(&tenant, &volume, *size, VolumeOptions { block_size })
                    .map_err(create_error)?;
                Ok(Reply::Volume(self.volume_view(&info)?))
            }
            Op::ResizeVolume {
                tenant,
                volume,
                size,
                discard_tail,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                let current = self.volume_info(&tenant, &volume)?;
                let name = format!("{tenant}/{volume}");
                let connections = self.catalog.as_ref().map_or(0, |c| c.connections(&name));
                if *size < current.size && connections > 0 {
                    // Its clients negotiated the old size and would meet
                    // errors past the new end.
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "volume_in_use",
                        format!(
                            "{name} has {connections} client connection(s) that know its old \
                             size; disconnect them before shrinking it (growing works online)"
                        ),
                    ));
                }
                let info = self
                    .store
                    .resize_volume(&tenant, &volume, *size, *discard_tail)
                    .map_err(admin_error)?;
                Ok(Reply::Volume(self.volume_view(&info)?))
            }
            Op::DeleteVolume {
                tenant,
                volume,
                force,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                // Refused early for a volume that does not exist, before any
                // connection is touched.
                self.volume_info(&tenant, &volume)?;
                let name = format!("{tenant}/{volume}");
                let until = Instant::now() + CLOSE_DEADLINE;
                // Its snapshots' exports read through its instance: they go too.
                let retired =
                    self.retire(vec![name.clone()], Reach::WithSnapshots, *force, until)?;
                self.until_closed(until, || self.store.delete_volume(&tenant, &volume))?;
                self.forget_limits(&tenant, Some(&volume));
                Ok(Reply::Deleted(DeletedView {
                    deleted: name,
                    connections_closed: retired.map_or(0, |r| r.connections_closed),
                }))
            }
            Op::RotateMaster {
                key_file,
                passphrase,
            } => {
                let passphrase = passphrase
                    .as_ref()
                    .map(|p| blockseal_keys::Passphrase::new(p.to_string()));
                let key = load_key_file(std::path::Path::new(key_file), passphrase.as_ref())
                    .map_err(|e| {
                        bad_request(
                            "invalid_key_file",
                            format!("cannot use {key_file} as the new master key: {e}"),
                        )
                    })?;
                let started = Instant::now();
                let done = self.store.rotate_master(key).map_err(admin_error)?;
                Ok(Reply::MasterRotated(MasterRotationView {
                    old_key_id: done.old_key.to_string(),
                    new_key_id: done.new_key.to_string(),
                    tenants: done.tenants,
                    volumes: done.volumes,
                    wrapped_keys: done.wrapped_keys,
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                }))
            }
            Op::RotateDataKey { tenant, volume } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                self.store
                    .rotate_data_key(&tenant, &volume)
                    .map_err(rotate_error)?;
                Ok(Reply::DataKeys(self.data_key_view(&tenant, &volume)?))
            }
            Op::DataKeyStatus { tenant, volume } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                self.volume_info(&tenant, &volume)?;
                Ok(Reply::DataKeys(self.data_key_view(&tenant, &volume)?))
            }
            Op::DataKeyStatusAll => {
                let mut out = Vec::new();
                for t in self.store.tenants().map_err(query_error)? {
                    for v in self.store.volumes(&t.id).map_err(query_error)? {
                        out.push(self.data_key_view(&v.tenant, &v.id)?);
                    }
                }
                Ok(Reply::AllDataKeys(out))
            }
            Op::Reencrypt { tenant, volume } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                self.volume_info(&tenant, &volume)?;
                let report = self
                    .store
                    .reencrypt_now(&tenant, &volume)
                    .map_err(volume_error)?;
                if report.blocks_unreadable > 0 {
                    tracing::warn!(
                        tenant = %tenant,
                        volume = %volume,
                        blocks = report.blocks_unreadable,
                        "re-encryption left blocks that fail authentication under their old data key"
                    );
                }
                Ok(Reply::DataKeys(self.data_key_view(&tenant, &volume)?))
            }
            Op::Audit {
                since_seq,
                since_time,
                limit,
            } => {
                let limit = limit.unwrap_or(AUDIT_PAGE);
                if limit == 0 || limit > AUDIT_PAGE_MAX {
                    return Err(bad_request(
                        "invalid_query",
                        format!("limit must be from 1 to {AUDIT_PAGE_MAX}, not {limit}"),
                    ));
                }
                let records = self
                    .store
                    .audit_page(*since_seq, *since_time, limit as usize)
                    .map_err(admin_error)?;
                Ok(Reply::Audit(
                    records
                        .into_iter()
                        .map(|r| AuditView {
                            seq: r.seq,
                            time: rfc3339_utc(r.time),
                            actor: r.actor,
                            action: r.action,
                            target: r.target,
                            result: r.result,
                            detail: r.detail,
                        })
                        .collect(),
                ))
            }
            Op::VerifyAudit => {
                let v = self.store.audit_verify().map_err(admin_error)?;
                Ok(Reply::AuditVerified(AuditVerifyView {
                    entries: v.entries,
                    intact: v.first_bad.is_none(),
                    first_bad: v.first_bad,
                    problem: v.problem,
                }))
            }
            Op::ListSnapshots { tenant, volume } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                let snapshots = self
                    .store
                    .snapshots(&tenant, &volume)
                    .map_err(admin_error)?;
                Ok(Reply::Snapshots(
                    snapshots
                        .iter()
                        .map(|s| snapshot_view(&tenant, &volume, s))
                        .collect(),
                ))
            }
            Op::CreateSnapshot {
                tenant,
                volume,
                snapshot,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                // The store flushes the volume first, open or not.
                let info = self
                    .store
                    .create_snapshot(&tenant, &volume, snapshot)
                    .map_err(admin_error)?;
                Ok(Reply::Snapshot(snapshot_view(&tenant, &volume, &info)))
            }
            Op::ShowSnapshot {
                tenant,
                volume,
                snapshot,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                check_snapshot_name(snapshot).map_err(admin_error)?;
                let info = self
                    .store
                    .snapshot(&tenant, &volume, snapshot)
                    .map_err(admin_error)?;
                Ok(Reply::Snapshot(snapshot_view(&tenant, &volume, &info)))
            }
            Op::DeleteSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            } => {
                let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
                check_snapshot_name(snapshot).map_err(admin_error)?;
                // Refused early for a snapshot that does not exist, before any
                // connection is touched.
                self.store
                    .snapshot(&tenant, &volume, snapshot)
                    .map_err(admin_error)?;
                // Its export's clients are refused, or closed with `force`,
                // as a volume's are when it is deleted.
                let name = format!("{tenant}/{volume}@{snapshot}");
                let until = Instant::now() + CLOSE_DEADLINE;
                let retired = self.retire(vec![name.clone()], Reach::Export, *force, until)?;
                self.store
                    .delete_snapshot(&tenant, &volume, snapshot)
                    .map_err(admin_error)?;
                Ok(Reply::Deleted(DeletedView {
                    deleted: name,
                    connections_closed: retired.map_or(0, |r| r.connections_closed),
                }))
            }
            Op::RollbackSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            } => self.rollback(tenant, volume, snapshot, *force),
            Op::RetentionStatus => retention::status_reply(self, self.retention.as_deref()),
            Op::ShowLimits => Ok(Reply::Limits(self.io_limits()?.view())),
            Op::SetLimits {
                tenant,
                volume,
                iops,
                bytes_per_sec,
            } => {
                let tenant = tenant_id(tenant)?;
                let target = match volume {
                    Some(volume) => {
                        let volume = volume_id(volume)?;
                        self.volume_info(&tenant, &volume)?;
                        Target::Volume {
                            tenant: tenant.to_string(),
                            volume: volume.to_string(),
                        }
                    }
                    None => {
                        self.tenant_info(&tenant)?;
                        Target::Tenant(tenant.to_string())
                    }
                };
                let change = Change {
                    iops: *iops,
                    bytes_per_sec: *bytes_per_sec,
                };
                let view = self
                    .io_limits()?
                    .set(&target, change)
                    .map_err(|e| ApiError::internal(format!("{e:#}")))?;
                Ok(Reply::Limits(view))
            }
            Op::RetentionRun { now } => retention::run_reply(self, self.retention.as_deref(), *now),
            Op::CreateBackup { .. }
            | Op::VerifyBackups { .. }
            | Op::ListBackupKeys { .. }
            | Op::DrillBackups { .. }
            | Op::Restore { .. }
            | Op::ExportTenantKeys { .. } => Err(ApiError::internal(format!(
                "{} is run by admin::backup",
                op.action()
            ))),
            Op::BackupStore { .. } => {
                Err(ApiError::internal("store.backup is run by admin::catalog"))
            }
        }
    }

    /// Rolls a volume back to its newest snapshot. Its clients would keep
    /// caches that no longer match it: refused while any are connected, or
    /// (with `force`) they are closed first, as for a deletion. Clients of
    /// its snapshots' exports stay: what they read does not change.
    fn rollback(
        &self,
        tenant: &str,
        volume: &str,
        snapshot: &str,
        force: bool,
    ) -> Result<Reply, ApiError> {
        let (tenant, volume) = (tenant_id(tenant)?, volume_id(volume)?);
        check_snapshot_name(snapshot).map_err(admin_error)?;
        // What the store would refuse is refused before any connection is
        // touched (a refused request changes nothing): no such snapshot,
        // newer ones, another size.
        let current = self.volume_info(&tenant, &volume)?;
        let snapshots = self
            .store
            .snapshots(&tenant, &volume)
            .map_err(admin_error)?;
        let Some(target) = snapshots.iter().find(|s| s.name == snapshot) else {
            return Err(admin_error(AdminError::NoSuchSnapshot {
                tenant,
                volume,
                snapshot: snapshot.to_owned(),
            }));
        };
        let newer: Vec<String> = snapshots
            .iter()
            .filter(|s| s.epoch > target.epoch)
            .map(|s| s.name.clone())
            .collect();
        if !newer.is_empty() {
            return Err(admin_error(AdminError::NewerSnapshots {
                tenant,
                volume,
                snapshot: snapshot.to_owned(),
                newer,
            }));
        }
        if target.size != current.size {
            return Err(admin_error(AdminError::SnapshotSizeDiffers {
                tenant,
                volume,
                snapshot: snapshot.to_owned(),
                snapshot_size: target.size,
                volume_size: current.size,
            }));
        }
        let name = format!("{tenant}/{volume}");
        let until = Instant::now() + CLOSE_DEADLINE;
        let retired = self.retire(vec![name], Reach::Export, force, until)?;
        // The store checks again, under its admin lock.
        let info = self
            .store
            .rollback_snapshot(&tenant, &volume, snapshot)
            .map_err(admin_error)?;
        Ok(Reply::RolledBack(RollbackView {
            tenant: tenant.to_string(),
            volume: volume.to_string(),
            snapshot: info.name,
            connections_closed: retired.map_or(0, |r| r.connections_closed),
        }))
    }

    fn status(&self) -> Result<Reply, ApiError> {
        let tenants = self.store.tenants().map_err(query_error)?;
        let mut volumes = 0;
        for t in &tenants {
            volumes += self.store.volumes(&t.id).map_err(query_error)?.len();
        }
        Ok(Reply::Status(StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: self.store.dir().display().to_string(),
            backend: format!("{:?}", self.store.backend()).to_lowercase(),
            master_key_id: self.store.master_key_id().to_string(),
            tenants: tenants.len(),
            volumes,
            mode: if self.catalog.is_some() {
                "online"
            } else {
                "offline"
            }
            .to_owned(),
        }))
    }

    fn shred(&self, tenant: &str) -> Result<Reply, ApiError> {
        let tenant = tenant_id(tenant)?;
        let volumes = self
            .store
            .volumes(&self.tenant_info(&tenant)?.id)
            .map_err(query_error)?;
        let names = volumes
            .iter()
            .map(|v| format!("{}/{}", v.tenant, v.id))
            .collect();
        // Shredding always closes the tenant's connections: that is its point.
        let until = Instant::now() + CLOSE_DEADLINE;
        let retired = self.retire(names, Reach::WithSnapshots, true, until)?;
        let report = self.until_closed(until, || self.store.shred_tenant(&tenant))?;
        self.forget_limits(&tenant, None);
        Ok(Reply::Shredded(ShredView {
            tenant: tenant.to_string(),
            volumes: report.volumes,
            connections_closed: retired.map_or(0, |r| r.connections_closed),
            segments_deleted: report.segments_deleted,
            bytes_freed: report.bytes_freed,
        }))
    }

    /// Takes exports out of service (online only).
    fn retire(
        &self,
        names: Vec<String>,
        reach: Reach,
        force: bool,
        until: Instant,
    ) -> Result<Option<crate::exports::Retired<'_>>, ApiError> {
        let Some(catalog) = &self.catalog else {
            return Ok(None);
        };
        catalog
            .retire(
                names,
                reach,
                force,
                until.saturating_duration_since(Instant::now()),
            )
            .map(Some)
            .map_err(|e| match e {
                RetireError::InUse {
                    export,
                    connections,
                } => ApiError::new(
                    StatusCode::CONFLICT,
                    "volume_in_use",
                    format!(
                        "{export} has {connections} client connection(s); disconnect them \
                         first, or force it (`--force`), which closes them"
                    ),
                ),
                RetireError::Busy { export } => ApiError::new(
                    StatusCode::CONFLICT,
                    "busy",
                    format!("another admin operation is deleting or rolling back {export}"),
                ),
                RetireError::Stuck {
                    export,
                    connections,
                } => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connections_stuck",
                    format!(
                        "{connections} connection(s) to {export} did not close within {}s; \
                         nothing was deleted or rolled back, try again",
                        CLOSE_DEADLINE.as_secs()
                    ),
                ),
            })
    }

    /// Runs a store operation that needs the volume closed: once its last
    /// connection is gone, the instance still finishes closing (a last flush)
    /// on the thread that dropped it, so "in use" is retried for a while.
    fn until_closed<T>(
        &self,
        until: Instant,
        mut call: impl FnMut() -> Result<T, AdminError>,
    ) -> Result<T, ApiError> {
        loop {
            match call() {
                Err(AdminError::VolumeInUse { .. })
                    if self.catalog.is_some() && Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other.map_err(admin_error),
            }
        }
    }

    fn data_key_view(&self, tenant: &TenantId, volume: &VolumeId) -> Result<DataKeyView, ApiError> {
        let status = self
            .store
            .data_key_status(tenant, volume)
            .map_err(volume_error)?;
        Ok(DataKeyView {
            tenant: tenant.to_string(),
            volume: volume.to_string(),
            active: status.active.0,
            keys: status
                .keys
                .iter()
                .map(|k| DataKeyVersionView {
                    version: k.version.0,
                    blocks: k.blocks,
                })
                .collect(),
            job: status.job.map(|j| ReencryptionView {
                target: j.target.0,
                blocks_done: j.blocks_done,
                blocks_remaining: j.blocks_remaining,
                running: j.running,
            }),
        })
    }

    /// The I/O rate limits: the service's, or the store's overrides read now
    /// (defaults unknown).
    fn io_limits(&self) -> Result<Arc<IoLimits>, ApiError> {
        match &self.io_limits {
            Some(limits) => Ok(limits.clone()),
            None => IoLimits::load(self.store.dir(), IoDefaults::default())
                .map(Arc::new)
                .map_err(|e| ApiError::internal(format!("{e:#}"))),
        }
    }

    /// Drops the I/O limit overrides of a tenant (and its volumes) or a
    /// volume that is gone. The deletion stands if this fails: a stale
    /// override only limits a later namesake, and the warning says so.
    fn forget_limits(&self, tenant: &TenantId, volume: Option<&VolumeId>) {
        let volume = volume.map(VolumeId::as_str);
        if let Err(e) = self
            .io_limits()
            .map_err(|e| anyhow::anyhow!(e.message))
            .and_then(|limits| limits.forget(tenant.as_str(), volume))
        {
            tracing::warn!(
                tenant = %tenant,
                volume = volume.unwrap_or("-"),
                error = %format!("{e:#}"),
                "the I/O limits of a deleted tenant or volume stay in the limits file; \
                 a tenant or volume created later under the name would inherit them"
            );
        }
    }

    fn tenant_info(&self, tenant: &TenantId) -> Result<TenantInfo, ApiError> {
        self.store
            .tenant(tenant)
            .map_err(query_error)?
            .ok_or_else(|| no_such_tenant(tenant))
    }

    fn volume_info(&self, tenant: &TenantId, volume: &VolumeId) -> Result<VolumeInfo, ApiError> {
        self.tenant_info(tenant)?;
        self.store
            .volumes(tenant)
            .map_err(query_error)?
            .into_iter()
            .find(|v| &v.id == volume)
            .ok_or_else(|| no_such_volume(tenant, volume))
    }

    fn tenant_view(&self, info: &TenantInfo) -> Result<TenantView, ApiError> {
        let volumes = self.store.volumes(&info.id).map_err(query_error)?.len();
        Ok(TenantView {
            name: info.id.to_string(),
            kek_version: info.kek_version.0,
            state: match info.state {
                TenantState::Active => "active",
                _ => "unknown",
            }
            .to_owned(),
            created: rfc3339_utc(info.created),
            volumes,
        })
    }

    fn volume_view(&self, info: &VolumeInfo) -> Result<VolumeView, ApiError> {
        let usage = self
            .store
            .volume_usage(&info.tenant, &info.id)
            .map_err(admin_error)?;
        let snapshots = self
            .store
            .snapshots(&info.tenant, &info.id)
            .map_err(admin_error)?;
        Ok(VolumeView {
            tenant: info.tenant.to_string(),
            name: info.id.to_string(),
            size: info.size,
            block_size: info.block_size.get(),
            active_dek: info.active_dek.0,
            dek_versions: info.dek_versions.iter().map(|v: &KeyVersion| v.0).collect(),
            created: rfc3339_utc(info.created),
            updated: rfc3339_utc(info.updated),
            mapped_bytes: usage.mapped_blocks * u64::from(info.block_size.get()),
            segment_bytes: usage.segment_bytes,
            snapshots: snapshots.len(),
            snapshot_bytes: snapshots.iter().map(|s| s.held_bytes).sum(),
        })
    }
}

fn snapshot_view(tenant: &TenantId, volume: &VolumeId, info: &SnapshotInfo) -> SnapshotView {
    SnapshotView {
        tenant: tenant.to_string(),
        volume: volume.to_string(),
        name: info.name.clone(),
        created: rfc3339_utc(info.created),
        size: info.size,
        held_bytes: info.held_bytes,
        uid: info.uid.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

pub(crate) fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

pub(crate) fn tenant_id(name: &str) -> Result<TenantId, ApiError> {
    TenantId::new(name).map_err(|e| bad_request("invalid_name", e.to_string()))
}

pub(crate) fn volume_id(name: &str) -> Result<VolumeId, ApiError> {
    VolumeId::new(name).map_err(|e| bad_request("invalid_name", e.to_string()))
}

pub(crate) fn no_such_tenant(tenant: &TenantId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_tenant",
        format!("no tenant {tenant}"),
    )
}

fn no_such_volume(tenant: &TenantId, volume: &VolumeId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_volume",
        format!("no volume {tenant}/{volume}"),
    )
}

pub(crate) fn query_error(e: QueryError) -> ApiError {
    ApiError::internal(crate::exports::error_chain(&e))
}

fn create_error(e: CreateError) -> ApiError {
    let conflict = |code, e: &CreateError| ApiError::new(StatusCode::CONFLICT, code, e.to_string());
    match &e {
        CreateError::TenantExists { .. } => conflict("tenant_exists", &e),
        CreateError::VolumeExists { .. } => conflict("volume_exists", &e),
        CreateError::NoSuchTenant { tenant } => no_such_tenant(tenant),
        CreateError::InvalidSize { .. } => bad_request("invalid_size", e.to_string()),
        CreateError::TooLarge { .. } => bad_request("too_large", e.to_string()),
        _ => ApiError::internal(crate::exports::error_chain(&e)),
    }
}

pub(crate) fn volume_error(e: VolumeError) -> ApiError {
    match &e {
        VolumeError::NoSuchTenant { tenant } => no_such_tenant(tenant),
        VolumeError::NoSuchVolume { tenant, volume } => no_such_volume(tenant, volume),
        _ => ApiError::internal(crate::exports::error_chain(&e)),
    }
}

fn rotate_error(e: RotateError) -> ApiError {
    match &e {
        RotateError::NoSuchTenant { tenant } => no_such_tenant(tenant),
        RotateError::NoSuchVolume { tenant, volume } => no_such_volume(tenant, volume),
        RotateError::VersionsExhausted { .. } => {
            ApiError::new(StatusCode::CONFLICT, "versions_exhausted", e.to_string())
        }
        _ => ApiError::internal(crate::exports::error_chain(&e)),
    }
}

pub(crate) fn admin_error(e: AdminError) -> ApiError {
    // The status comes from the store's own classification; the code names
    // the case.
    let status = match e.kind() {
        AdminErrorKind::NotFound => StatusCode::NOT_FOUND,
        AdminErrorKind::Conflict => StatusCode::CONFLICT,
        AdminErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = match &e {
        AdminError::NoSuchTenant { tenant } => return no_such_tenant(tenant),
        AdminError::NoSuchVolume { tenant, volume } => return no_such_volume(tenant, volume),
        AdminError::VolumeInUse { .. } => "volume_in_use",
        AdminError::TenantHasVolumes { .. } => "tenant_has_volumes",
        AdminError::MappedPastEnd { .. } => "mapped_past_end",
        AdminError::InvalidSize { .. } => "invalid_size",
        AdminError::TooLarge { .. } => "too_large",
        AdminError::SameMasterKey { .. } => "same_master_key",
        AdminError::AuditEntryTooLarge { .. } => "audit_entry_too_large",
        AdminError::InvalidName { .. } => "invalid_name",
        AdminError::NoSuchSnapshot { .. } => "no_such_snapshot",
        AdminError::SnapshotExists { .. } => "snapshot_exists",
        AdminError::NewerSnapshots { .. } => "newer_snapshots",
        AdminError::SnapshotSizeDiffers { .. } => "snapshot_size_differs",
        _ if status == StatusCode::INTERNAL_SERVER_ERROR => {
            return ApiError::internal(crate::exports::error_chain(&e));
        }
        _ => "invalid_request",
    };
    ApiError::new(status, code, e.to_string())
}
