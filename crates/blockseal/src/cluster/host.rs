//! A host's part in a cluster. One thread (the *lease loop*) renews the
//! leases this host holds, watches every other lease, takes over shards whose
//! holder went silent, hands shards over when asked, and has the shards'
//! stores opened and closed on threads of their own, so that a slow open
//! never delays a renewal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockseal_keys::MasterKey;
use blockseal_volume::object::{Expect, Listed, ObjectStore, PutError, Version};
use blockseal_volume::{OpenError, Store, StoreOptions};
use tracing::{error, info, warn};

use super::records::{Bucket, ClusterRecord, HOSTS, HostRecord, LEASES, LeaseRecord};
use super::{Authority, shard_index, shard_name};
use crate::admin::service::Service;
use crate::exports::StoreCatalog;
use crate::iolimits::IoLimits;

/// How long a closing shard's clients get to finish what they are running.
const CLOSE_CONNECTIONS: Duration = Duration::from_secs(30);
/// How long admin operations on a closing shard get to finish.
const ADMIN_DRAIN: Duration = Duration::from_secs(60);
/// A shard whose store failed to open is not claimed again for this long.
const OPEN_RETRY: Duration = Duration::from_secs(30);

/// What a host needs to take part.
pub(crate) struct Settings {
    /// Its name in the cluster.
    pub(crate) host: String,
    /// Where its clients connect.
    pub(crate) uri: String,
    /// Its data directory: the shards' local directories are under `shards/`.
    pub(crate) data_dir: PathBuf,
    /// The cluster's prefix in the bucket.
    pub(crate) prefix: String,
    /// Exports served read-only.
    pub(crate) read_only: BTreeSet<String>,
    /// At most this many shards (default: an even share of the live hosts).
    pub(crate) max_shards: Option<u32>,
    /// Options every shard's store opens with (besides its object storage).
    pub(crate) store_options: Box<dyn Fn() -> StoreOptions + Send + Sync>,
}

/// A shard this host serves.
pub(crate) struct Shard {
    pub(crate) name: String,
    pub(crate) authority: Arc<Authority>,
    pub(crate) catalog: Arc<StoreCatalog>,
    pub(crate) service: Arc<Service>,
}

impl Shard {
    /// Takes the shard out of service: closes its connections, lets admin
    /// operations finish, flushes its volumes unless the lease is lost
    /// already (another host may be writing), closes the store.
    fn close(self: Arc<Self>, flush: bool) {
        let stuck = self.catalog.close_connections(CLOSE_CONNECTIONS);
        if stuck > 0 {
            warn!(shard = %self.name, connections = stuck, "connections still open after the close deadline");
        }
        let unfinished = self.service.close(ADMIN_DRAIN);
        if unfinished > 0 {
            warn!(shard = %self.name, unfinished, "admin operations still running at close");
        }
        if flush && let Err(e) = self.catalog.flush_all() {
            error!(shard = %self.name, error = %e, "flushing the shard's volumes failed");
        }
        self.catalog.close_all();
        // The store goes with the last reference: the service's and the
        // catalog's, dropped here.
    }
}

enum Event {
    Opened(u32, anyhow::Result<Arc<Shard>>),
    Closed(u32),
    Stop,
}

/// A cluster member: what the NBD catalog and the admin API route through.
pub(crate) struct Cluster {
    settings: Settings,
    instance: String,
    record: ClusterRecord,
    bucket: Bucket,
    objects: Arc<dyn ObjectStore>,
    master: MasterKey,
    io_limits: Arc<IoLimits>,
    serving: RwLock<BTreeMap<u32, Arc<Shard>>>,
    events: Mutex<Sender<Event>>,
    loop_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("host", &self.settings.host)
            .field("shards", &self.record.shards)
            .finish_non_exhaustive()
    }
}

/// The loop's view of a shard it holds.
struct Held {
    version: Version,
    counter: u64,
    move_to: Option<String>,
    authority: Arc<Authority>,
    phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Opening,
    Serving,
    /// Closing; then the lease is released (`None`), handed to a host, or
    /// it was lost and is left alone.
    Closing(After),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    Release,
    HandTo(String),
    Lost,
}

/// A record as last seen, and since when (this host's clock).
struct Seen<T> {
    version: Version,
    since: Instant,
    value: Option<T>,
}

impl Cluster {
    /// Joins the cluster at `settings.prefix` of `objects` (creating it with
    /// `new` when the bucket holds none) and starts the lease loop. Waits
    /// first, when this host's record says an earlier process of it was up,
    /// until that record has been silent for a lease.
    pub(crate) fn join(
        settings: Settings,
        new: ClusterRecord,
        lease_objects: Arc<dyn ObjectStore>,
        objects: Arc<dyn ObjectStore>,
        master: MasterKey,
        io_limits: Arc<IoLimits>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let bucket = Bucket::new(lease_objects, &settings.prefix)?;
        let record = bucket.cluster(Some(new))?;
        if record != new {
            info!(
                shards = record.shards,
                lease_ms = record.lease_ms,
                "joining an existing cluster; its shard count and timings apply"
            );
        }
        let instance = random_instance()?;
        let host_version = announce_start(&bucket, &settings, &instance, &record)?;
        let (tx, rx) = mpsc::channel();
        let cluster = Arc::new(Cluster {
            settings,
            instance,
            record,
            bucket,
            objects,
            master,
            io_limits,
            serving: RwLock::new(BTreeMap::new()),
            events: Mutex::new(tx),
            loop_thread: Mutex::new(None),
        });
        let state = LoopState {
            cluster: Arc::clone(&cluster),
            events: rx,
            held: BTreeMap::new(),
            leases: HashMap::new(),
            hosts: HashMap::new(),
            host_version,
            host_counter: 1,
            retry_after: HashMap::new(),
            stopping: false,
            last_error: None,
        };
        let handle = std::thread::Builder::new()
            .name("blockseal-lease".into())
            .spawn(move || state.run())
            .context("cannot start the lease loop")?;
        *cluster
            .loop_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handle);
        info!(
            host = %cluster.settings.host,
            shards = cluster.record.shards,
            lease_ms = cluster.record.lease_ms,
            renew_ms = cluster.record.renew_ms,
            "joined the cluster"
        );
        Ok(cluster)
    }

    pub(crate) fn record(&self) -> &ClusterRecord {
        &self.record
    }

    pub(crate) fn host(&self) -> &str {
        &self.settings.host
    }

    /// The shard serving `index`, if this host serves it now.
    pub(crate) fn shard(&self, index: u32) -> Option<Arc<Shard>> {
        self.serving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index)
            .cloned()
    }

    /// Every shard this host serves now.
    pub(crate) fn shards(&self) -> Vec<Arc<Shard>> {
        self.serving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Leaves the cluster: stops taking shards, closes every shard it serves
    /// (flushing its volumes) and releases its lease, then announces the
    /// host stopped. Returns how many shards were closed.
    pub(crate) fn leave(&self) -> usize {
        let closed = self.shards().len();
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::Stop);
        if let Some(handle) = self
            .loop_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = handle.join();
        }
        closed
    }

    fn send(&self, event: Event) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(event);
    }

    /// Opens shard `index`'s store (taking it over from whoever had it
    /// open, or creating it on the first claim).
    fn open_shard(&self, index: u32, authority: Arc<Authority>) -> anyhow::Result<Arc<Shard>> {
        let name = shard_name(index);
        let dir = self.settings.data_dir.join("shards").join(&name);
        let prefix = format!("{}/shards/{name}", self.settings.prefix);
        let options =
            || (self.settings.store_options)().object_storage(Arc::clone(&self.objects), &prefix);
        let store = match Store::attach(&dir, self.master.duplicate(), options()) {
            Ok(store) => store,
            Err(OpenError::NotAStore { .. }) => {
                Store::create(&dir, self.master.duplicate(), options()).with_context(|| {
                    format!(
                        "cannot create the store of shard {name} in {}",
                        dir.display()
                    )
                })?
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot open the store of shard {name}"))
                );
            }
        };
        let store = Arc::new(store);
        let catalog = Arc::new(
            StoreCatalog::new(Arc::clone(&store), self.settings.read_only.clone())
                .with_io_limits(Arc::clone(&self.io_limits))
                .with_authority(Arc::clone(&authority)),
        );
        let service = Arc::new(
            Service::online(store, Arc::clone(&catalog))
                .with_io_limits(Arc::clone(&self.io_limits)),
        );
        Ok(Arc::new(Shard {
            name,
            authority,
            catalog,
            service,
        }))
    }
}

/// A random per-process id (hex).
fn random_instance() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    getrandom(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn getrandom(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("cannot read /dev/urandom")
}

/// Writes this host's record as up. When an earlier process of this host
/// left it up (a crash), waits until it has been silent for a lease and
/// its grace: if it changes meanwhile, another live process uses the name.
fn announce_start(
    bucket: &Bucket,
    settings: &Settings,
    instance: &str,
    record: &ClusterRecord,
) -> anyhow::Result<Version> {
    let name = format!("{HOSTS}/{}", settings.host);
    let mut expect = Expect::Absent;
    if let Some((previous, version)) = bucket.get::<HostRecord>(&name)? {
        if previous.state == "up" {
            let wait = record.lease() + record.grace();
            info!(
                host = %settings.host,
                wait_ms = wait.as_millis() as u64,
                "this host's record says it is up: waiting for the earlier process to stay silent"
            );
            let until = Instant::now() + wait;
            while Instant::now() < until {
                std::thread::sleep(record.renew().min(until - Instant::now()));
                let now = bucket.get::<HostRecord>(&name)?.map(|(_, v)| v);
                if now.as_ref() != Some(&version) {
                    bail!(
                        "another process announces itself as host {} (its record in the bucket \
                         keeps changing): each host needs a name of its own (cluster.host)",
                        settings.host
                    );
                }
            }
        }
        expect = Expect::Version(version);
    }
    let mine = HostRecord {
        host: settings.host.clone(),
        instance: instance.to_owned(),
        uri: settings.uri.clone(),
        state: "up".into(),
        counter: 0,
    };
    match bucket.put(&name, &mine, &expect) {
        Ok(version) => Ok(version),
        Err(PutError::Conflict) => bail!(
            "another process changed host {}'s record while this one started: each host \
             needs a name of its own (cluster.host)",
            settings.host
        ),
        Err(PutError::Io(e)) => Err(anyhow::Error::new(e).context("cannot announce this host")),
    }
}

struct LoopState {
    cluster: Arc<Cluster>,
    events: Receiver<Event>,
    held: BTreeMap<u32, Held>,
    leases: HashMap<u32, Seen<LeaseRecord>>,
    hosts: HashMap<String, Seen<HostRecord>>,
    host_version: Version,
    host_counter: u64,
    retry_after: HashMap<u32, Instant>,
    stopping: bool,
    /// The last bucket error logged, so that a dead bucket logs once.
    last_error: Option<String>,
}

impl LoopState {
    fn run(mut self) {
        let period = self.cluster.record.renew();
        let mut next_tick = Instant::now();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(wait) {
                Ok(Event::Opened(index, result)) => self.opened(index, result),
                Ok(Event::Closed(index)) => self.closed(index),
                Ok(Event::Stop) => {
                    self.stopping = true;
                    next_tick = Instant::now();
                }
                Err(RecvTimeoutError::Timeout) => {
                    next_tick = Instant::now() + period;
                    self.tick();
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stopping && self.held.is_empty() {
                self.announce_stopped();
                return;
            }
        }
    }

    fn c(&self) -> &Cluster {
        &self.cluster
    }

    fn me(&self) -> &str {
        &self.cluster.settings.host
    }

    fn lease_name(index: u32) -> String {
        format!("{LEASES}/{}", shard_name(index))
    }

    fn bucket_error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let text = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(&text) {
            warn!(error = %text, "cluster bucket request failed");
            self.last_error = Some(text);
        }
    }

    fn tick(&mut self) {
        self.renew();
        self.expire();
        self.observe();
        self.announce();
        if self.stopping {
            let serving: Vec<u32> = self
                .held
                .iter()
                .filter(|(_, h)| h.phase == Phase::Serving)
                .map(|(i, _)| *i)
                .collect();
            for index in serving {
                self.close(index, After::Release);
            }
            return;
        }
        self.hand_over();
        self.claim();
    }

    /// Renews every lease held (compare-and-swap on the version last written).
    fn renew(&mut self) {
        let lease = self.c().record.lease();
        let margin = self.c().record.margin();
        let me = self.me().to_owned();
        let instance = self.c().instance.clone();
        let indexes: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.phase != Phase::Closing(After::Lost))
            .map(|(i, _)| *i)
            .collect();
        for index in indexes {
            let name = Self::lease_name(index);
            let held = &self.held[&index];
            let next = LeaseRecord {
                holder: Some(me.clone()),
                instance: Some(instance.clone()),
                counter: held.counter + 1,
                move_to: held.move_to.clone(),
                serving: held.phase == Phase::Serving,
            };
            let start = Instant::now();
            let result = self
                .c()
                .bucket
                .put(&name, &next, &Expect::Version(held.version.clone()));
            match result {
                Ok(version) => {
                    let held = self.held.get_mut(&index).expect("held");
                    held.version = version;
                    held.counter = next.counter;
                    held.authority.extend_to(start + lease - margin);
                    self.last_error = None;
                }
                Err(PutError::Conflict) => match self.c().bucket.get::<LeaseRecord>(&name) {
                    Ok(Some((record, version)))
                        if record.holder.as_deref() == Some(me.as_str())
                            && record.instance.as_deref() == Some(instance.as_str()) =>
                    {
                        // Still ours: an earlier renewal landed after its
                        // answer was lost, or `cluster move` set move_to.
                        let held = self.held.get_mut(&index).expect("held");
                        held.version = version;
                        held.counter = record.counter;
                        held.move_to = record.move_to;
                    }
                    Ok(other) => {
                        let by = other.and_then(|(r, _)| r.holder);
                        warn!(shard = %shard_name(index), taken_by = ?by, "lease lost: another host changed it");
                        self.lose(index);
                    }
                    Err(e) => self.bucket_error("reading a lease after a conflict", &e),
                },
                Err(PutError::Io(e)) => self.bucket_error("renewing a lease", &e),
            }
        }
    }

    /// Shards whose authority ran out (renewals failed for a lease's
    /// length): stop serving them, for good.
    fn expire(&mut self) {
        let expired: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| {
                !matches!(h.phase, Phase::Closing(After::Lost)) && !h.authority.holds()
            })
            .map(|(i, _)| *i)
            .collect();
        for index in expired {
            warn!(
                shard = %shard_name(index),
                "lease not renewed in time: this host stops serving the shard"
            );
            self.lose(index);
        }
    }

    /// Stops serving `index` at once; another host may have it already.
    fn lose(&mut self, index: u32) {
        let Some(held) = self.held.get_mut(&index) else {
            return;
        };
        held.authority.revoke();
        match &held.phase {
            Phase::Serving => self.close(index, After::Lost),
            // Its open finishes, then closes (see `opened`).
            Phase::Opening => held.phase = Phase::Closing(After::Lost),
            Phase::Closing(_) => held.phase = Phase::Closing(After::Lost),
        }
    }

    /// Takes `index` out of service on a thread of its own; then `after`.
    fn close(&mut self, index: u32, after: After) {
        let Some(held) = self.held.get_mut(&index) else {
            return;
        };
        let flush = after != After::Lost;
        held.phase = Phase::Closing(after);
        let shard = self
            .cluster
            .serving
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
        let cluster = Arc::clone(&self.cluster);
        let spawned = std::thread::Builder::new()
            .name(format!("blockseal-close-{}", shard_name(index)))
            .spawn(move || {
                if let Some(shard) = shard {
                    shard.close(flush);
                }
                cluster.send(Event::Closed(index));
            });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start a thread to close a shard");
        }
    }

    fn closed(&mut self, index: u32) {
        let Some(held) = self.held.remove(&index) else {
            return;
        };
        let name = Self::lease_name(index);
        let next = match held.phase {
            Phase::Closing(After::Release) => LeaseRecord {
                counter: held.counter + 1,
                ..LeaseRecord::default()
            },
            Phase::Closing(After::HandTo(to)) => LeaseRecord {
                holder: Some(to),
                counter: held.counter + 1,
                ..LeaseRecord::default()
            },
            _ => {
                info!(shard = %shard_name(index), "shard closed");
                return;
            }
        };
        match self
            .c()
            .bucket
            .put(&name, &next, &Expect::Version(held.version))
        {
            Ok(_) => {
                info!(shard = %shard_name(index), to = ?next.holder, "shard closed and its lease handed on")
            }
            Err(e) => warn!(
                shard = %shard_name(index),
                error = %e,
                "shard closed, but releasing its lease failed: it moves when the lease runs out"
            ),
        }
    }

    fn opened(&mut self, index: u32, result: anyhow::Result<Arc<Shard>>) {
        let Some(held) = self.held.get_mut(&index) else {
            return;
        };
        match result {
            Ok(shard) if held.phase == Phase::Opening && shard.authority.holds() => {
                held.phase = Phase::Serving;
                self.cluster
                    .serving
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(index, shard);
                info!(shard = %shard_name(index), "serving the shard");
            }
            Ok(shard) => {
                // Lost or asked to stop while it opened.
                let after = match &held.phase {
                    Phase::Closing(after) => after.clone(),
                    _ => After::Release,
                };
                self.cluster
                    .serving
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(index, shard);
                self.close(index, after);
            }
            Err(e) => {
                error!(shard = %shard_name(index), error = %format!("{e:#}"), "cannot open the shard; releasing its lease");
                self.retry_after.insert(index, Instant::now() + OPEN_RETRY);
                held.phase = Phase::Closing(After::Release);
                self.closed(index);
            }
        }
    }

    /// Lists the leases and hosts, reading the records whose version changed.
    fn observe(&mut self) {
        match self.c().bucket.list(LEASES) {
            Ok(listed) => {
                let mut present = BTreeSet::new();
                for Listed { name, version, .. } in listed {
                    let Some(index) = shard_index(&name) else {
                        continue;
                    };
                    present.insert(index);
                    if self.leases.get(&index).map(|s| &s.version) == Some(&version) {
                        continue;
                    }
                    let value = match self
                        .c()
                        .bucket
                        .get::<LeaseRecord>(&format!("{LEASES}/{name}"))
                    {
                        Ok(Some((value, v))) if v == version => Some(value),
                        // Changed again since the LIST: the next tick reads it.
                        Ok(_) => continue,
                        Err(e) => {
                            warn!(shard = %name, error = %format!("{e:#}"), "unreadable lease record");
                            None
                        }
                    };
                    self.leases.insert(
                        index,
                        Seen {
                            version,
                            since: Instant::now(),
                            value,
                        },
                    );
                }
                self.leases.retain(|i, _| present.contains(i));
            }
            Err(e) => self.bucket_error("listing leases", &e),
        }
        match self.c().bucket.list(HOSTS) {
            Ok(listed) => {
                for Listed { name, version, .. } in listed {
                    if self.hosts.get(&name).map(|s| &s.version) == Some(&version) {
                        continue;
                    }
                    let value = match self
                        .c()
                        .bucket
                        .get::<HostRecord>(&format!("{HOSTS}/{name}"))
                    {
                        Ok(Some((value, v))) if v == version => Some(value),
                        Ok(_) => continue,
                        Err(_) => None,
                    };
                    self.hosts.insert(
                        name,
                        Seen {
                            version,
                            since: Instant::now(),
                            value,
                        },
                    );
                }
            }
            Err(e) => self.bucket_error("listing hosts", &e),
        }
    }

    /// Rewrites this host's record: what `cluster status` shows as alive.
    fn announce(&mut self) {
        let record = HostRecord {
            host: self.me().to_owned(),
            instance: self.c().instance.clone(),
            uri: self.c().settings.uri.clone(),
            state: "up".into(),
            counter: self.host_counter,
        };
        self.put_host(&record);
    }

    fn announce_stopped(&mut self) {
        let record = HostRecord {
            host: self.me().to_owned(),
            instance: self.c().instance.clone(),
            uri: self.c().settings.uri.clone(),
            state: "stopped".into(),
            counter: self.host_counter,
        };
        self.put_host(&record);
        info!(host = %self.me(), "left the cluster");
    }

    fn put_host(&mut self, record: &HostRecord) {
        let name = format!("{HOSTS}/{}", self.me());
        let expect = Expect::Version(self.host_version.clone());
        match self.c().bucket.put(&name, record, &expect) {
            Ok(version) => {
                self.host_version = version;
                self.host_counter += 1;
            }
            Err(PutError::Conflict) => match self.c().bucket.get::<HostRecord>(&name) {
                Ok(Some((found, version))) if found.instance == self.c().instance => {
                    self.host_version = version;
                }
                Ok(_) => {
                    error!(
                        host = %self.me(),
                        "another process wrote this host's record: two hosts share the name \
                         cluster.host; this one takes no more shards"
                    );
                    self.stopping = true;
                }
                Err(e) => self.bucket_error("reading this host's record", &e),
            },
            Err(PutError::Io(e)) => self.bucket_error("announcing this host", &e),
        }
    }

    /// Hands over the shards `cluster move` asked to move.
    fn hand_over(&mut self) {
        let moving: Vec<(u32, String)> = self
            .held
            .iter()
            .filter(|(_, h)| h.phase == Phase::Serving)
            .filter_map(|(i, h)| {
                h.move_to
                    .clone()
                    .filter(|to| to != self.me())
                    .map(|to| (*i, to))
            })
            .collect();
        for (index, to) in moving {
            info!(shard = %shard_name(index), to = %to, "handing the shard over: draining it");
            self.close(index, After::HandTo(to));
        }
    }

    /// Hosts up and heard from within a lease (this one included).
    fn live_hosts(&self) -> usize {
        let window = self.c().record.lease() + self.c().record.grace();
        let others = self
            .hosts
            .iter()
            .filter(|(name, _)| name.as_str() != self.me())
            .filter(|(_, seen)| {
                seen.since.elapsed() < window
                    && seen.value.as_ref().is_some_and(|h| h.state == "up")
            })
            .count();
        others + 1
    }

    /// Takes shards: those handed to this host, then free or silent ones up
    /// to its share.
    fn claim(&mut self) {
        let shards = self.c().record.shards;
        let share = self
            .c()
            .settings
            .max_shards
            .unwrap_or_else(|| shards.div_ceil(self.live_hosts() as u32));
        let stale_after = self.c().record.lease() + self.c().record.grace();
        let me = self.me().to_owned();
        // Start at an offset of this host's own, so that hosts starting
        // together reach for different shards first.
        let start = super::shard_of(&me, shards);
        let mut count = self.held.len() as u32;
        for step in 0..shards {
            let index = (start + step) % shards;
            if self.held.contains_key(&index)
                || self
                    .retry_after
                    .get(&index)
                    .is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            let (expect, handed, previous) = match self.leases.get(&index) {
                None => (Expect::Absent, false, None),
                Some(seen) => {
                    let Some(lease) = &seen.value else { continue };
                    let handed =
                        lease.holder.as_deref() == Some(me.as_str()) && lease.instance.is_none();
                    let free = lease.holder.is_none();
                    if !handed && !free && seen.since.elapsed() < stale_after {
                        continue;
                    }
                    (
                        Expect::Version(seen.version.clone()),
                        handed,
                        lease.holder.clone().filter(|_| !free && !handed),
                    )
                }
            };
            if !handed && count >= share {
                continue;
            }
            let counter = self
                .leases
                .get(&index)
                .and_then(|s| s.value.as_ref())
                .map_or(0, |l| l.counter + 1);
            let record = LeaseRecord {
                holder: Some(me.clone()),
                instance: Some(self.c().instance.clone()),
                counter,
                ..LeaseRecord::default()
            };
            let start = Instant::now();
            match self
                .c()
                .bucket
                .put(&Self::lease_name(index), &record, &expect)
            {
                Ok(version) => {
                    let authority = Arc::new(Authority::new(&shard_name(index)));
                    authority.extend_to(start + self.c().record.lease() - self.c().record.margin());
                    match &previous {
                        Some(from) => warn!(
                            shard = %shard_name(index),
                            from = %from,
                            silent_ms = self.leases.get(&index).map_or(0, |s| s.since.elapsed().as_millis() as u64),
                            "taking the shard over: its holder stopped renewing"
                        ),
                        None => info!(shard = %shard_name(index), handed, "claimed the shard"),
                    }
                    self.held.insert(
                        index,
                        Held {
                            version,
                            counter,
                            move_to: None,
                            authority: Arc::clone(&authority),
                            phase: Phase::Opening,
                        },
                    );
                    count += 1;
                    let cluster = Arc::clone(&self.cluster);
                    let spawned = std::thread::Builder::new()
                        .name(format!("blockseal-open-{}", shard_name(index)))
                        .spawn(move || {
                            let result = cluster.open_shard(index, authority);
                            cluster.send(Event::Opened(index, result));
                        });
                    if let Err(e) = spawned {
                        error!(error = %e, "cannot start a thread to open a shard");
                    }
                }
                // Someone else was faster: read it again next tick.
                Err(PutError::Conflict) => {
                    self.leases.remove(&index);
                }
                Err(PutError::Io(e)) => self.bucket_error("claiming a lease", &e),
            }
        }
    }
}
