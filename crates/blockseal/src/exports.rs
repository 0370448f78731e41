//! The glue between the store and the NBD server: a [`Volume`] as an NBD
//! [`Export`], a snapshot as a read-only one, and a [`Store`] as the server's
//! [`Catalog`].
//!
//! Exports are named `tenant/volume`, and `tenant/volume@snapshot` for a
//! volume's snapshot. A snapshot export is read-only (the NBD server answers
//! writes, trims and write-zeroes with `EPERM` and never passes them on), and
//! a tenant's scope reaches its own volumes' snapshots only, like its volumes.
//! Snapshot exports are opened by name and not listed: listing them would open
//! every volume.
//!
//! This module owns the one mapping from a volume error's `kind()` to the NBD
//! crate's [`ErrorClass`] ([`class_of`]), which decides the NBD error value a
//! client receives; the volume error itself rides along as the source, for the
//! log only. Every connection to one export shares one [`VolumeExport`] (and so
//! one volume instance), which is what makes a flush on one connection cover
//! writes on all of them.
//!
//! The catalog's methods do store I/O (listing tenants and volumes, opening a
//! volume scans its metadata); the NBD server calls them on blocking threads
//! only, and a volume opens without the catalog's lock, so a slow open holds up
//! only the clients of that volume.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use blockseal_keys::{TenantId, VolumeId};
use blockseal_nbd::{
    Catalog, ErrorClass, Export, ExportError, ExportInfo, Extent, Scope, Shutdown, Throttle,
};
use blockseal_volume::{
    AdminError, ErrorKind, SnapshotReader, Store, Volume, VolumeError, VolumeStats,
    check_snapshot_name,
};

use crate::cluster::Authority;
use crate::iolimits::IoLimits;
use crate::metrics::{IoRegistry, IoStats, Measured};
use crate::size::Size;

/// Largest zero buffer written at once for write-zeroes that must stay allocated.
const ZERO_CHUNK: u64 = 1 << 20;

/// One open volume served over NBD: one handle per connection, all sharing the
/// volume instance of their [`Served`] entry.
pub(crate) struct VolumeExport {
    volume: Volume,
    read_only: bool,
    /// Closes the connections of this export (it is being deleted).
    revoked: Shutdown,
    /// Counts the handles of the export while they live.
    _handle: Arc<()>,
}

impl VolumeExport {
    fn flush_if(&self, fua: bool) -> Result<(), ExportError> {
        if fua { self.flush() } else { Ok(()) }
    }
}

/// The NBD class of a volume error: which NBD error value the client receives
/// for it (`blockseal_nbd::errno`). A block that failed authentication is an
/// `EIO` like any unreadable block; the server logs and counts it separately.
pub(crate) fn class_of(kind: ErrorKind) -> ErrorClass {
    match kind {
        ErrorKind::Io => ErrorClass::Io,
        ErrorKind::Authentication => ErrorClass::Authentication,
        ErrorKind::Poisoned => ErrorClass::Poisoned,
        ErrorKind::OutOfRange => ErrorClass::OutOfRange,
        ErrorKind::InvalidInput => ErrorClass::InvalidInput,
        ErrorKind::NoSpace => ErrorClass::NoSpace,
        ErrorKind::ReadOnly => ErrorClass::ReadOnly,
        ErrorKind::NotSupported => ErrorClass::NotSupported,
        ErrorKind::ShuttingDown => ErrorClass::ShuttingDown,
        // A kind added later is at worst an I/O error until it gets its own arm.
        _ => ErrorClass::Io,
    }
}

/// Turns the volume error of the operation `what` into an export error. The
/// server logs its message with the whole cause chain ("write failed: segment
/// I/O failed: No space left on device"), which the client never sees; volume
/// errors hold no data or key material.
fn failed(what: &'static str) -> impl FnOnce(VolumeError) -> ExportError {
    move |err| ExportError::new(class_of(err.kind()), format!("{what} failed")).with_source(err)
}

/// An error and its causes on one line, `a: b: c`, for log lines.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        message.push_str(": ");
        message.push_str(&e.to_string());
        cause = e.source();
    }
    message
}

/// The NBD extents of `(length, allocated)` runs.
fn extents(runs: impl IntoIterator<Item = (u64, bool)>) -> Vec<Extent> {
    runs.into_iter()
        .filter(|&(len, _)| len > 0)
        .map(|(length, allocated)| Extent {
            length,
            hole: !allocated,
            zero: !allocated,
        })
        .collect()
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.len()
    }

    fn block_size(&self) -> u32 {
        self.volume.block_size().get()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.volume.read_at(offset, buf).map_err(failed("read"))
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        self.volume
            .read_at_cached(offset, buf)
            .map_err(failed("read"))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        if fua {
            self.volume.write_at_fua(offset, data)
        } else {
            self.volume.write_at(offset, data)
        }
        .map_err(failed("write"))
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        self.volume
            .write_batch(writes)
            .into_iter()
            .map(|result| result.map_err(failed("write")))
            .collect()
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.volume.flush().map_err(failed("flush"))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.volume.trim(offset, len).map_err(failed("trim"))?;
        self.flush_if(fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        if no_hole {
            // The range must stay allocated: write sealed zero blocks.
            let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(ZERO_CHUNK);
                self.volume
                    .write_at(at, &zeroes[..n as usize])
                    .map_err(failed("write zeroes"))?;
                at += n;
            }
        } else {
            self.volume
                .write_zeroes(offset, len)
                .map_err(failed("write zeroes"))?;
        }
        self.flush_if(fua)
    }

    fn write_may_block(&self) -> bool {
        self.volume.write_may_block()
    }

    fn revoked(&self) -> Option<Shutdown> {
        Some(self.revoked.clone())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs = self
            .volume
            .block_status(offset, len)
            .map_err(failed("block status"))?;
        Ok(extents(
            runs.into_iter().map(|run| (run.len, run.allocated)),
        ))
    }
}

/// One snapshot served over NBD, read-only: one handle per connection, all
/// sharing the snapshot reader (and so the volume instance) of their
/// [`Served`] entry.
pub(crate) struct SnapshotExport {
    snapshot: SnapshotReader,
    /// Closes the connections of this export (it is being deleted).
    revoked: Shutdown,
    /// Counts the handles of the export while they live.
    _handle: Arc<()>,
}

/// What a snapshot export answers a change with, should one reach it (the
/// NBD server refuses them itself, as the export says it is read-only).
fn read_only(what: &'static str) -> ExportError {
    ExportError::new(
        ErrorClass::ReadOnly,
        format!("{what} refused: a snapshot is read-only"),
    )
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.snapshot.len()
    }

    fn block_size(&self) -> u32 {
        self.snapshot.block_size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.snapshot.read_at(offset, buf).map_err(failed("read"))
    }

    /// A snapshot's mappings come from the metadata store on every read, so
    /// a read may always wait: always on a blocking thread.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool, ExportError> {
        Ok(false)
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(read_only("write"))
    }

    fn flush(&self) -> Result<(), ExportError> {
        // Nothing written, nothing to make durable: a snapshot's blocks are
        // committed before it exists.
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), ExportError> {
        Err(read_only("trim"))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _fua: bool,
        _no_hole: bool,
    ) -> Result<(), ExportError> {
        Err(read_only("write zeroes"))
    }

    fn revoked(&self) -> Option<Shutdown> {
        Some(self.revoked.clone())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs = self
            .snapshot
            .block_status(offset, len)
            .map_err(failed("block status"))?;
        Ok(extents(runs))
    }
}

/// The volume export `tenant/volume` and the snapshot name of a snapshot
/// export `tenant/volume@snapshot`; `None` for a volume export.
pub(crate) fn snapshot_export(name: &str) -> Option<(&str, &str)> {
    name.split_once('@')
}

/// An export in service: what its connections share (a volume instance, or
/// a snapshot reader on one), the switch that closes them, and the count of
/// their handles.
struct Served {
    source: Source,
    revoked: Shutdown,
    handles: Arc<()>,
    /// The export's request counters (they outlive this entry).
    io: Arc<IoStats>,
    /// The rate limits its requests are charged to.
    throttle: Option<Throttle>,
}

/// What an export serves.
enum Source {
    Volume { volume: Volume, read_only: bool },
    Snapshot(SnapshotReader),
}

impl Served {
    fn new(source: Source, io: Arc<IoStats>, throttle: Option<Throttle>) -> Served {
        Served {
            source,
            revoked: Shutdown::new(),
            handles: Arc::new(()),
            io,
            throttle,
        }
    }

    /// A handle for one more connection.
    fn handle(&self) -> Arc<dyn Export> {
        match &self.source {
            Source::Volume { volume, read_only } => Arc::new(Measured {
                inner: VolumeExport {
                    volume: volume.clone(),
                    read_only: *read_only,
                    revoked: self.revoked.clone(),
                    _handle: self.handles.clone(),
                },
                io: self.io.clone(),
                throttle: self.throttle.clone(),
            }),
            Source::Snapshot(snapshot) => Arc::new(Measured {
                inner: SnapshotExport {
                    snapshot: snapshot.clone(),
                    revoked: self.revoked.clone(),
                    _handle: self.handles.clone(),
                },
                io: self.io.clone(),
                throttle: self.throttle.clone(),
            }),
        }
    }

    /// Handles alive (connections, and requests finishing on one that left).
    fn connections(&self) -> usize {
        Arc::strong_count(&self.handles) - 1
    }
}

/// The catalog's state: exports in service, and names taken out of service
/// while an admin operation deletes (or rolls back) them, each with how far
/// its retirement reaches.
#[derive(Default)]
struct Registry {
    open: HashMap<String, Served>,
    retired: BTreeMap<String, Reach>,
    /// Nothing opens any more ([`StoreCatalog::close_connections`]).
    closed: bool,
}

impl Registry {
    /// Whether `name` is out of service: retired itself, or a snapshot of a
    /// volume retired with its snapshots.
    fn is_retired(&self, name: &str) -> bool {
        self.retired.contains_key(name)
            || snapshot_export(name)
                .is_some_and(|(volume, _)| self.retired.get(volume) == Some(&Reach::WithSnapshots))
    }
}

/// Which exports retiring a name takes out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// The export of that name only (a rollback leaves the volume's snapshots
    /// served; deleting a snapshot leaves the volume).
    Export,
    /// The volume's export and its snapshots' (`tenant/volume@...`): they
    /// read through the volume's instance, which must close before the
    /// volume goes.
    WithSnapshots,
}

impl Reach {
    /// Whether retiring `retired` this far takes the export `name`.
    fn covers(self, retired: &str, name: &str) -> bool {
        name == retired
            || (self == Reach::WithSnapshots
                && snapshot_export(name).is_some_and(|(volume, _)| volume == retired))
    }
}

/// Every volume of a store, as exports named `tenant/volume`.
pub(crate) struct StoreCatalog {
    store: Arc<Store>,
    read_only: BTreeSet<String>,
    /// Exports opened so far, kept open until shutdown so that all connections
    /// share one instance and shutdown can flush them all.
    registry: Mutex<Registry>,
    /// Request counters by export, for the metrics.
    io: IoRegistry,
    /// The I/O rate limits, when the server has them.
    io_limits: Option<Arc<IoLimits>>,
    /// The lease of a cluster shard: its exports answer only while held.
    authority: Option<Arc<Authority>>,
}

/// An export in service, as the metrics see it.
pub(crate) struct ServedSample {
    /// `tenant/volume` or `tenant/volume@snapshot`.
    pub(crate) name: String,
    pub(crate) connections: usize,
    /// The engine's counters, for a volume export.
    pub(crate) volume: Option<VolumeStats>,
}

/// Why exports could not be taken out of service.
#[derive(Debug)]
pub(crate) enum RetireError {
    /// Clients are connected and `force` was not given.
    InUse { export: String, connections: usize },
    /// Another admin operation is closing the export already.
    Busy { export: String },
    /// Connections did not close within the deadline.
    Stuck { export: String, connections: usize },
}

/// Names out of service until this drops (see [`StoreCatalog::retire`]).
pub(crate) struct Retired<'a> {
    catalog: &'a StoreCatalog,
    names: Vec<String>,
    /// Connections that were closed.
    pub(crate) connections_closed: usize,
}

impl Drop for Retired<'_> {
    fn drop(&mut self) {
        let mut registry = self.catalog.lock_registry();
        for name in &self.names {
            registry.retired.remove(name);
        }
    }
}

impl StoreCatalog {
    /// A catalog over `store`; exports named in `read_only` refuse writes.
    pub(crate) fn new(store: Arc<Store>, read_only: BTreeSet<String>) -> StoreCatalog {
        StoreCatalog {
            store,
            read_only,
            registry: Mutex::new(Registry::default()),
            io: IoRegistry::default(),
            io_limits: None,
            authority: None,
        }
    }

    /// The same catalog for a cluster shard: every request checks that the
    /// host still holds `authority` before it runs and before it replies.
    pub(crate) fn with_authority(mut self, authority: Arc<Authority>) -> StoreCatalog {
        self.authority = Some(authority);
        self
    }

    /// Closes every connection for good (a cluster host letting a shard go):
    /// nothing opens any more, the connections drain as at a shutdown, and
    /// this waits for them at most `deadline`; returns how many are left.
    pub(crate) fn close_connections(&self, deadline: Duration) -> usize {
        let waiting: Vec<Weak<()>> = {
            let mut registry = self.lock_registry();
            registry.closed = true;
            registry
                .open
                .values()
                .map(|served| {
                    served.revoked.trigger();
                    Arc::downgrade(&served.handles)
                })
                .collect()
        };
        // Each export's own entry holds one handle; its connections the rest.
        let connections = || -> usize {
            waiting
                .iter()
                .map(|h| h.strong_count().saturating_sub(1))
                .sum()
        };
        let until = Instant::now() + deadline;
        // Polled, as in `retire`: the handles notify no one when they go.
        while connections() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        connections()
    }

    /// `handle`, behind the shard's lease when the catalog has one.
    fn leased(&self, handle: Arc<dyn Export>) -> Arc<dyn Export> {
        match &self.authority {
            Some(authority) => Arc::new(crate::cluster::catalog::Leased {
                inner: handle,
                authority: Arc::clone(authority),
            }),
            None => handle,
        }
    }

    /// The same catalog, charging its exports' requests to `limits`.
    pub(crate) fn with_io_limits(mut self, limits: Arc<IoLimits>) -> StoreCatalog {
        self.io_limits = Some(limits);
        self
    }

    /// The I/O rate limits its exports are charged to, if any.
    pub(crate) fn io_limits(&self) -> Option<&Arc<IoLimits>> {
        self.io_limits.as_ref()
    }

    /// Flushes every volume export opened so far (snapshots have nothing to
    /// flush); returns how many, or the first error after trying them all.
    pub(crate) fn flush_all(&self) -> Result<usize, VolumeError> {
        let open: Vec<(String, Volume)> = self
            .lock_registry()
            .open
            .iter()
            .filter_map(|(name, served)| match &served.source {
                Source::Volume { volume, .. } => Some((name.clone(), volume.clone())),
                Source::Snapshot(_) => None,
            })
            .collect();
        let mut first_error = None;
        for (name, volume) in &open {
            if let Err(e) = volume.flush() {
                tracing::error!(export = %name, error = %error_chain(&e), "flush at shutdown failed");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(open.len()),
        }
    }

    /// Drops the open exports (after [`flush_all`](Self::flush_all)).
    pub(crate) fn close_all(&self) {
        let open = std::mem::take(&mut self.lock_registry().open);
        drop(open);
    }

    /// Takes the exports `names` (and, with [`Reach::WithSnapshots`], their
    /// snapshots' exports) out of service so that an admin operation can
    /// delete or roll them back: no new connection opens them until the
    /// returned guard drops, and the connections they have are closed (they
    /// drain as at a shutdown) and waited for, at most `deadline`. Without
    /// `force`, an export with connections is refused and nothing changes.
    pub(crate) fn retire(
        &self,
        names: Vec<String>,
        reach: Reach,
        force: bool,
        deadline: Duration,
    ) -> Result<Retired<'_>, RetireError> {
        let mut waiting: Vec<(String, Weak<()>)> = Vec::new();
        let mut closed = 0;
        // Dropped after the lock: the last handle of a volume flushes it, and
        // every other export's opens wait on this lock.
        let mut removed: Vec<Served> = Vec::new();
        {
            let mut registry = self.lock_registry();
            // Busy when any name is out of service already, or (reaching
            // snapshots) one of its snapshots is.
            let busy = names.iter().find_map(|n| {
                if registry.is_retired(n) {
                    return Some(n.clone());
                }
                registry
                    .retired
                    .keys()
                    .find(|r| reach.covers(n, r))
                    .cloned()
            });
            if let Some(export) = busy {
                return Err(RetireError::Busy { export });
            }
            let mut covered: Vec<String> = registry
                .open
                .keys()
                .filter(|open| names.iter().any(|n| reach.covers(n, open)))
                .cloned()
                .collect();
            covered.sort();
            if !force {
                for name in &covered {
                    let connections = registry.open[name].connections();
                    if connections > 0 {
                        return Err(RetireError::InUse {
                            export: name.clone(),
                            connections,
                        });
                    }
                }
            }
            for name in &names {
                registry.retired.insert(name.clone(), reach);
                if reach == Reach::WithSnapshots {
                    // Deleted (a volume, or a tenant's): its counters go too.
                    self.io.forget(name, true);
                }
            }
            for name in covered {
                if let Some(served) = registry.open.remove(&name) {
                    closed += served.connections();
                    served.revoked.trigger();
                    waiting.push((name, Arc::downgrade(&served.handles)));
                    removed.push(served);
                }
            }
        }
        drop(removed);
        let retired = Retired {
            catalog: self,
            names,
            connections_closed: closed,
        };
        // Connections notice the switch at once; what they still run finishes
        // first. Polled: the handles have no owner to notify anyone when they
        // go, and the wait is short.
        let until = Instant::now() + deadline;
        for (name, handles) in waiting {
            while handles.strong_count() > 0 {
                if Instant::now() >= until {
                    return Err(RetireError::Stuck {
                        export: name,
                        connections: handles.strong_count(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(retired)
    }

    /// The exports in service, in name order, with their connections and,
    /// for volumes, the engine's counters.
    pub(crate) fn served(&self) -> Vec<ServedSample> {
        let registry = self.lock_registry();
        let mut out: Vec<ServedSample> = registry
            .open
            .iter()
            .map(|(name, served)| ServedSample {
                name: name.clone(),
                connections: served.connections(),
                volume: match &served.source {
                    Source::Volume { volume, .. } => Some(volume.stats()),
                    Source::Snapshot(_) => None,
                },
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Request counters by export.
    pub(crate) fn io(&self) -> &IoRegistry {
        &self.io
    }

    /// Connections (live handles) of the export `name`.
    pub(crate) fn connections(&self, name: &str) -> usize {
        self.lock_registry()
            .open
            .get(name)
            .map_or(0, Served::connections)
    }

    fn lock_registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tenants(&self, scope: &Scope) -> Vec<TenantId> {
        match scope {
            Scope::All => match self.store.tenants() {
                Ok(tenants) => tenants.into_iter().map(|t| t.id).collect(),
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "cannot list tenants");
                    Vec::new()
                }
            },
            Scope::Tenant(name) => TenantId::new(name).into_iter().collect(),
        }
    }
}

impl Catalog for StoreCatalog {
    fn list(&self, scope: &Scope) -> Vec<ExportInfo> {
        let mut out = Vec::new();
        for tenant in self.tenants(scope) {
            let volumes = match self.store.volumes(&tenant) {
                Ok(volumes) => volumes,
                Err(e) => {
                    tracing::error!(tenant = %tenant, error = %error_chain(&e), "cannot list volumes");
                    continue;
                }
            };
            for info in volumes {
                let name = format!("{}/{}", info.tenant, info.id);
                if !scope.permits(&name) {
                    continue;
                }
                let mut description = format!(
                    "{} ({} bytes), {}-byte blocks",
                    Size(info.size),
                    info.size,
                    info.block_size.get()
                );
                if self.read_only.contains(&name) {
                    description.push_str(", read-only");
                }
                out.push(ExportInfo { name, description });
            }
        }
        out
    }

    fn open(&self, name: &str, scope: &Scope) -> Option<Arc<dyn Export>> {
        if !scope.permits(name) {
            return None;
        }
        {
            let registry = self.lock_registry();
            if registry.closed || registry.is_retired(name) {
                return None;
            }
            if let Some(served) = registry.open.get(name) {
                return Some(self.leased(served.handle()));
            }
        }
        // Not under the lock: opening scans the volume's metadata, which must
        // hold up only the clients of this volume. The store hands concurrent
        // openers of one volume its one shared instance, and the first of them
        // to get here registers it; the others use that export and drop their
        // handle (not the last, so nothing closes).
        let source = match snapshot_export(name) {
            None => Source::Volume {
                volume: self.open_volume(name)?,
                read_only: self.read_only.contains(name),
            },
            Some((volume, snapshot)) => Source::Snapshot(self.open_snapshot(volume, snapshot)?),
        };
        let mut registry = self.lock_registry();
        // Taken out of service while it was opening: the admin operation that
        // retired it waits for this handle to go.
        if registry.closed || registry.is_retired(name) {
            return None;
        }
        let handle = registry
            .open
            .entry(name.to_owned())
            .or_insert_with(|| Served::new(source, self.io.of(name), self.throttle_of(name)))
            .handle();
        Some(self.leased(handle))
    }

    fn description(&self, name: &str, scope: &Scope) -> String {
        let Some((volume, _)) = snapshot_export(name) else {
            return self
                .list(scope)
                .into_iter()
                .find(|e| e.name == name)
                .map(|e| e.description)
                .unwrap_or_default();
        };
        // Asked once the export is open, so its entry is there (unless it was
        // retired meanwhile).
        match self.lock_registry().open.get(name).map(|s| &s.source) {
            Some(Source::Snapshot(snapshot)) => format!(
                "snapshot of {volume}: {} ({} bytes), {}-byte blocks, read-only",
                Size(snapshot.len()),
                snapshot.len(),
                snapshot.block_size()
            ),
            _ => String::new(),
        }
    }
}

impl StoreCatalog {
    /// The throttle of the export `name` (`tenant/volume` or
    /// `tenant/volume@snapshot`): its tenant's and its volume's limits.
    fn throttle_of(&self, name: &str) -> Option<Throttle> {
        let limits = self.io_limits.as_ref()?;
        let volume = snapshot_export(name).map_or(name, |(volume, _)| volume);
        let (tenant, volume) = volume.split_once('/')?;
        Some(limits.throttle(tenant, volume))
    }

    /// The volume of the export `tenant/volume`, opened; `None` when there
    /// is none (or the name is not one).
    fn open_volume(&self, name: &str) -> Option<Volume> {
        let (tenant, volume) = name.split_once('/')?;
        let tenant = TenantId::new(tenant).ok()?;
        let volume = VolumeId::new(volume).ok()?;
        match self.store.open_volume(&tenant, &volume) {
            Ok(opened) => Some(opened),
            Err(VolumeError::NoSuchTenant { .. } | VolumeError::NoSuchVolume { .. }) => None,
            Err(e) => {
                tracing::error!(export = %name, error = %error_chain(&e), "cannot open volume");
                None
            }
        }
    }

    /// Snapshot `snapshot` of the volume export `volume` (`tenant/volume`),
    /// opened; `None` when there is none.
    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Option<SnapshotReader> {
        let (tenant, volume_name) = volume.split_once('/')?;
        let tenant = TenantId::new(tenant).ok()?;
        let volume_id = VolumeId::new(volume_name).ok()?;
        check_snapshot_name(snapshot).ok()?;
        match self.store.open_snapshot(&tenant, &volume_id, snapshot) {
            Ok(opened) => Some(opened),
            Err(
                AdminError::NoSuchTenant { .. }
                | AdminError::NoSuchVolume { .. }
                | AdminError::NoSuchSnapshot { .. },
            ) => None,
            Err(e) => {
                tracing::error!(export = %format!("{volume}@{snapshot}"), error = %error_chain(&e), "cannot open snapshot");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockseal_keys::MasterKey;
    use blockseal_volume::{StoreOptions, VolumeOptions};

    fn catalog() -> (tempfile::TempDir, StoreCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(
            dir.path(),
            MasterKey::generate().unwrap(),
            StoreOptions::new(),
        )
        .unwrap();
        for (t, v) in [("acme", "disk"), ("acme", "archive"), ("globex", "disk")] {
            let tenant = TenantId::new(t).unwrap();
            if store.tenant(&tenant).unwrap().is_none() {
                store.create_tenant(&tenant).unwrap();
            }
            store
                .create_volume(
                    &tenant,
                    &VolumeId::new(v).unwrap(),
                    1 << 20,
                    VolumeOptions::default(),
                )
                .unwrap();
        }
        let read_only = ["acme/archive".to_owned()].into();
        (dir, StoreCatalog::new(Arc::new(store), read_only))
    }

    fn names(list: Vec<ExportInfo>) -> Vec<String> {
        list.into_iter().map(|e| e.name).collect()
    }

    #[test]
    fn lists_by_scope() {
        let (_dir, catalog) = catalog();
        assert_eq!(
            names(catalog.list(&Scope::All)),
            ["acme/archive", "acme/disk", "globex/disk"]
        );
        assert_eq!(
            names(catalog.list(&Scope::Tenant("acme".into()))),
            ["acme/archive", "acme/disk"]
        );
        assert!(catalog.list(&Scope::Tenant("nobody".into())).is_empty());
        let list = catalog.list(&Scope::All);
        assert_eq!(
            list[0].description,
            "1M (1048576 bytes), 4096-byte blocks, read-only"
        );
    }

    #[test]
    fn opens_shared_instances_within_scope() {
        let (_dir, catalog) = catalog();
        let acme = Scope::Tenant("acme".into());
        assert!(catalog.open("globex/disk", &acme).is_none());
        assert!(catalog.open("acme/missing", &acme).is_none());
        assert!(catalog.open("acme", &acme).is_none());
        assert!(catalog.open("acme/Bad Name", &Scope::All).is_none());
        let a = catalog.open("acme/disk", &acme).unwrap();
        let b = catalog.open("acme/disk", &Scope::All).unwrap();
        a.write(4096, b"shared", false).unwrap();
        let mut buf = [0u8; 6];
        b.read(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"shared");
        assert!(!a.read_only());
        assert!(catalog.open("acme/archive", &acme).unwrap().read_only());
        assert_eq!(catalog.flush_all().unwrap(), 2);
    }

    #[test]
    fn concurrent_opens_of_one_export_share_one_instance() {
        let (_dir, catalog) = catalog();
        let start = std::sync::Barrier::new(4);
        let exports: Vec<Arc<dyn Export>> = std::thread::scope(|s| {
            let opening: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        catalog.open("acme/disk", &Scope::All).unwrap()
                    })
                })
                .collect();
            opening.into_iter().map(|t| t.join().unwrap()).collect()
        });
        // One served entry, one handle per opener, all on one volume instance.
        {
            let registry = catalog.lock_registry();
            assert_eq!(registry.open.len(), 1);
            assert_eq!(registry.open["acme/disk"].connections(), 4);
        }
        exports[0].write(0, b"one", false).unwrap();
        let mut seen = [0u8; 3];
        exports[3].read(0, &mut seen).unwrap();
        assert_eq!(&seen, b"one");
        let mut buf = [0u8; 3];
        catalog
            .open("acme/disk", &Scope::All)
            .unwrap()
            .read(0, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"one");
        assert_eq!(catalog.flush_all().unwrap(), 1);
    }

    #[test]
    fn retiring_an_export_refuses_or_revokes_its_connections() {
        let (_dir, catalog) = catalog();
        let handle = catalog.open("acme/disk", &Scope::All).unwrap();
        let revoked = handle.revoked().unwrap();
        let deadline = Duration::from_secs(5);
        // Without force, a connected export is refused and nothing changes.
        match catalog.retire(
            vec!["acme/disk".into()],
            Reach::WithSnapshots,
            false,
            deadline,
        ) {
            Err(RetireError::InUse { connections, .. }) => assert_eq!(connections, 1),
            other => panic!("expected InUse, got {:?}", other.map(|_| ())),
        }
        assert!(!revoked.is_triggered());
        assert!(catalog.open("acme/disk", &Scope::All).is_some());
        // With force, the connection is revoked and waited for: it goes once
        // the handle drops (as a connection task ends after the revocation).
        let dropper = std::thread::spawn({
            let revoked = revoked.clone();
            move || {
                while !revoked.is_triggered() {
                    std::thread::yield_now();
                }
                drop(handle);
            }
        });
        let retired = catalog
            .retire(
                vec!["acme/disk".into()],
                Reach::WithSnapshots,
                true,
                deadline,
            )
            .unwrap();
        dropper.join().unwrap();
        assert_eq!(retired.connections_closed, 1);
        // While retired, nobody opens it; a second retirement is refused.
        assert!(catalog.open("acme/disk", &Scope::All).is_none());
        assert!(matches!(
            catalog.retire(vec!["acme/disk".into()], Reach::Export, true, deadline),
            Err(RetireError::Busy { .. })
        ));
        assert!(catalog.open("globex/disk", &Scope::All).is_some());
        drop(retired);
        assert!(catalog.open("acme/disk", &Scope::All).is_some());
    }

    /// Takes snapshot `name` of acme/disk.
    fn snapshot(catalog: &StoreCatalog, name: &str) {
        catalog
            .store
            .create_snapshot(
                &TenantId::new("acme").unwrap(),
                &VolumeId::new("disk").unwrap(),
                name,
            )
            .unwrap();
    }

    #[test]
    fn snapshots_are_read_only_exports_within_their_tenant() {
        let (_dir, catalog) = catalog();
        let disk = catalog.open("acme/disk", &Scope::All).unwrap();
        disk.write(0, &[1u8; 4096], false).unwrap();
        snapshot(&catalog, "before");
        disk.write(0, &[2u8; 4096], false).unwrap();
        disk.trim(4096, 4096, false).unwrap();

        let acme = Scope::Tenant("acme".into());
        let globex = Scope::Tenant("globex".into());
        assert!(catalog.open("acme/disk@before", &globex).is_none());
        assert!(catalog.open("acme/disk@missing", &acme).is_none());
        assert!(catalog.open("acme/disk@Bad", &acme).is_none());
        assert!(catalog.open("acme/nothing@before", &acme).is_none());
        assert!(catalog.open("acme@before", &Scope::All).is_none());
        let snap = catalog.open("acme/disk@before", &acme).unwrap();
        assert!(snap.read_only());
        assert_eq!((snap.size(), snap.block_size()), (1 << 20, 4096));
        let mut buf = [0u8; 4096];
        snap.read(0, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 4096]);
        disk.read(0, &mut buf).unwrap();
        assert_eq!(buf, [2u8; 4096]);
        let summary: Vec<(u64, bool)> = snap
            .block_status(0, 1 << 20)
            .unwrap()
            .iter()
            .map(|e| (e.length, e.hole))
            .collect();
        assert_eq!(summary, [(4096, false), ((1 << 20) - 4096, true)]);
        for err in [
            snap.write(0, b"x", false).unwrap_err(),
            snap.trim(0, 4096, false).unwrap_err(),
            snap.write_zeroes(0, 4096, false, false).unwrap_err(),
        ] {
            assert_eq!(err.class(), ErrorClass::ReadOnly);
        }
        snap.flush().unwrap();
        snap.read(0, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 4096]);
        assert_eq!(
            catalog.description("acme/disk@before", &acme),
            "snapshot of acme/disk: 1M (1048576 bytes), 4096-byte blocks, read-only"
        );
        // Not listed (that would open every volume), and not flushed.
        assert_eq!(names(catalog.list(&acme)), ["acme/archive", "acme/disk"]);
        assert_eq!(catalog.flush_all().unwrap(), 1);
    }

    #[test]
    fn retiring_a_volume_reaches_its_snapshots_only_when_asked() {
        let (_dir, catalog) = catalog();
        snapshot(&catalog, "one");
        let deadline = Duration::from_secs(5);
        let snap = catalog.open("acme/disk@one", &Scope::All).unwrap();
        let revoked = snap.revoked().unwrap();
        // A rollback's reach: the volume only; its snapshots stay served.
        let retired = catalog
            .retire(vec!["acme/disk".into()], Reach::Export, false, deadline)
            .unwrap();
        assert!(catalog.open("acme/disk", &Scope::All).is_none());
        assert!(catalog.open("acme/disk@one", &Scope::All).is_some());
        assert!(!revoked.is_triggered());
        drop(retired);
        // A volume deletion's reach: its snapshots' connections count, and
        // go with it when forced.
        match catalog.retire(
            vec!["acme/disk".into()],
            Reach::WithSnapshots,
            false,
            deadline,
        ) {
            Err(RetireError::InUse {
                export,
                connections,
            }) => assert_eq!((export.as_str(), connections), ("acme/disk@one", 1)),
            other => panic!("expected InUse, got {:?}", other.map(|_| ())),
        }
        // Deleting the snapshot (forced) closes its connection; meanwhile the
        // volume cannot be deleted, but it can be rolled back.
        let dropper = drop_when_revoked(snap, revoked);
        let snapshot_retired = catalog
            .retire(vec!["acme/disk@one".into()], Reach::Export, true, deadline)
            .unwrap();
        dropper.join().unwrap();
        assert_eq!(snapshot_retired.connections_closed, 1);
        assert!(matches!(
            catalog.retire(
                vec!["acme/disk".into()],
                Reach::WithSnapshots,
                true,
                deadline
            ),
            Err(RetireError::Busy { .. })
        ));
        drop(
            catalog
                .retire(vec!["acme/disk".into()], Reach::Export, false, deadline)
                .unwrap(),
        );
        drop(snapshot_retired);
        // Deleting the volume (forced) closes its snapshots' connections too,
        // and keeps them from opening until it is done.
        let snap = catalog.open("acme/disk@one", &Scope::All).unwrap();
        let dropper = drop_when_revoked(snap.clone(), snap.revoked().unwrap());
        drop(snap);
        let retired = catalog
            .retire(
                vec!["acme/disk".into()],
                Reach::WithSnapshots,
                true,
                deadline,
            )
            .unwrap();
        dropper.join().unwrap();
        assert_eq!(retired.connections_closed, 1);
        assert!(catalog.open("acme/disk@one", &Scope::All).is_none());
        assert!(matches!(
            catalog.retire(vec!["acme/disk@one".into()], Reach::Export, true, deadline),
            Err(RetireError::Busy { .. })
        ));
        drop(retired);
        assert!(catalog.open("acme/disk@one", &Scope::All).is_some());
    }

    /// Drops `handle` once `revoked` triggers, as a connection task ends
    /// after its export is revoked.
    fn drop_when_revoked(
        handle: Arc<dyn Export>,
        revoked: Shutdown,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !revoked.is_triggered() {
                std::thread::yield_now();
            }
            drop(handle);
        })
    }

    #[test]
    fn block_status_and_zeroes() {
        let (_dir, catalog) = catalog();
        let disk = catalog.open("acme/disk", &Scope::All).unwrap();
        assert_eq!(
            disk.block_status(0, 1 << 20).unwrap(),
            [Extent {
                length: 1 << 20,
                hole: true,
                zero: true
            }]
        );
        disk.write(0, &[7u8; 8192], true).unwrap();
        disk.write_zeroes(8192, 4096, false, true).unwrap();
        disk.write_zeroes(4096, 4096, true, false).unwrap();
        let status = disk.block_status(0, 16384).unwrap();
        let summary: Vec<(u64, bool)> = status.iter().map(|e| (e.length, e.hole)).collect();
        assert_eq!(
            summary,
            [(4096, false), (4096, true), (4096, false), (4096, true)]
        );
        let mut buf = vec![1u8; 12288];
        disk.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        disk.trim(0, 4096, true).unwrap();
        assert!(disk.block_status(0, 4096).unwrap()[0].hole);
    }

    /// The NBD error value each volume error kind reaches a client as.
    #[test]
    fn volume_error_kinds_map_to_their_nbd_error_values() {
        use blockseal_nbd::errno;
        use blockseal_nbd::nbd_errno::{EINVAL, EIO, ENOSPC, ENOTSUP, EPERM, ESHUTDOWN};
        for (kind, class, value) in [
            (ErrorKind::Io, ErrorClass::Io, EIO),
            (ErrorKind::Authentication, ErrorClass::Authentication, EIO),
            (ErrorKind::Poisoned, ErrorClass::Poisoned, EIO),
            (ErrorKind::OutOfRange, ErrorClass::OutOfRange, EINVAL),
            (ErrorKind::InvalidInput, ErrorClass::InvalidInput, EINVAL),
            (ErrorKind::NoSpace, ErrorClass::NoSpace, ENOSPC),
            (ErrorKind::ReadOnly, ErrorClass::ReadOnly, EPERM),
            (ErrorKind::NotSupported, ErrorClass::NotSupported, ENOTSUP),
            (ErrorKind::ShuttingDown, ErrorClass::ShuttingDown, ESHUTDOWN),
        ] {
            assert_eq!(class_of(kind), class, "{kind:?}");
            assert_eq!(errno(class_of(kind)), value, "{kind:?}");
        }
    }

    #[test]
    fn volume_errors_keep_their_class() {
        let (_dir, catalog) = catalog();
        let disk = catalog.open("acme/disk", &Scope::All).unwrap();
        let mut buf = [0u8; 4096];
        let err = disk.read(1 << 20, &mut buf).unwrap_err();
        assert_eq!(err.class(), ErrorClass::OutOfRange);
        let source = std::error::Error::source(&err).expect("the volume error is the source");
        assert!(source.to_string().contains("past the end"), "{source}");
    }

    #[test]
    fn export_errors_carry_the_whole_cause_chain() {
        let io = std::io::Error::other("disk on fire");
        let err = failed("write")(VolumeError::Io(io));
        assert_eq!(err.class(), ErrorClass::Io);
        assert_eq!(err.message(), "write failed");
        assert_eq!(
            error_chain(&err),
            "write failed: segment I/O failed: disk on fire"
        );
    }
}
