//! `blockseal serve`: the NBD server, from a configuration file or the embedded
//! default.
//!
//! Start-up order: open the store (asking for the passphrase if needed), bind
//! every listener, then print one readiness line on stdout
//! (`ready unix=PATH tcp=IP:PORT`, only the listeners configured), so that
//! scripts wait on it rather than sleep. SIGTERM or SIGINT starts a graceful
//! shutdown: stop accepting, drop connections still in the handshake, let
//! running requests finish and reply for at most `limits.shutdown_timeout_secs`
//! (then drop the connections still open: a client that does not read its
//! replies cannot hold the exit), flush every open volume on a thread of its
//! own, close the store, exit 0. A second signal exits at once.
//!
//! With `[retention]` configured, a thread runs a retention pass at start and
//! then every minute (`retention`); at shutdown it stops after the action
//! under way, before the final flush.
//!
//! With `[tracing]` (or `--otlp-endpoint`), spans go to an OpenTelemetry
//! collector (`otlp`). That is decided before logging starts, so `main`
//! calls [`tracing_settings`] first, which reads the configuration file and
//! keeps it in the arguments for [`run`].

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, Permissions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use blockseal_keys::{MasterKey, TenantId, VolumeId, create_key_file};
use blockseal_nbd::{Catalog, Server, ServerConfig, TlsConfig};
use blockseal_volume::meta::BackendKind;
use blockseal_volume::object::ObjectStore;
use blockseal_volume::{Store, VolumeOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin;
use crate::admin::service::Dispatch;
use crate::cli::{DEFAULT_DATA_DIR, ServeArgs};
use crate::cluster::{
    self,
    catalog::{ClusterAdmin, ClusterCatalog},
    host::Cluster,
};
use crate::config::{Config, FileMode};
use crate::exports::StoreCatalog;
use crate::iolimits::{Defaults as IoDefaults, IoLimits};
use crate::metrics::Metrics;
use crate::open::{IfMissing, StoreLocation};
use crate::otlp;
use crate::passphrase::Confirm;
use crate::retention::{PASS_PERIOD, Retention, RetentionConfig, Scheduler};
use crate::size::Size;

/// How long running admin operations get to finish at shutdown.
const ADMIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the runtime's threads get, at exit, to drop what their tasks held.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// The demo export of the embedded default.
const DEMO_TENANT: &str = "demo";
const DEMO_VOLUME: &str = "disk";

/// Reads the configuration file, if any, into `args` (for [`run`]) and says
/// where tracing spans go: the file's `[tracing]`, or `--otlp-endpoint`.
/// Called before logging starts, so its errors are only returned.
pub(crate) fn tracing_settings(args: &mut ServeArgs) -> anyhow::Result<Option<otlp::Settings>> {
    let Some(path) = &args.config else {
        return Ok(args
            .otlp_endpoint
            .clone()
            .map(otlp::Settings::with_defaults));
    };
    let config = Config::load(path)?;
    let settings = match &config.tracing {
        Some(tracing) => Some(tracing.settings()?),
        None => None,
    };
    args.loaded = Some(Box::new(config));
    Ok(settings)
}

/// Runs the server until a signal stops it.
pub(crate) fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    let plan = match &args.config {
        Some(path) => {
            let config = match args.loaded.take() {
                Some(config) => *config,
                None => Config::load(path)?,
            };
            from_config(path, config, &args)?
        }
        None => embedded_default(&args)?,
    };
    serve(plan)
}

/// What the server serves: one store, or the shards of a cluster.
enum Target {
    Store(Box<Store>),
    Cluster(Box<ClusterJoin>),
}

/// What joining a cluster takes, resolved from the configuration.
struct ClusterJoin {
    settings: cluster::host::Settings,
    record: cluster::records::ClusterRecord,
    lease_objects: Arc<dyn ObjectStore>,
    objects: Arc<dyn ObjectStore>,
    master: MasterKey,
}

/// What the listeners hand requests to.
enum Front {
    Store {
        store: Arc<Store>,
        catalog: Arc<StoreCatalog>,
        service: Arc<admin::service::Service>,
        metrics: Arc<Metrics>,
    },
    Cluster(Arc<Cluster>),
}

/// Everything the server needs, resolved before any listener is bound.
struct Plan {
    target: Target,
    /// The data directory (the admin socket, the I/O limits file).
    data_dir: PathBuf,
    read_only: BTreeSet<String>,
    server: ServerConfig,
    unix: Option<(PathBuf, FileMode)>,
    tcp: Option<(SocketAddr, Option<TlsConfig>)>,
    /// The admin API on TCP with TLS.
    admin_tcp: Option<(SocketAddr, TlsConfig)>,
    /// Connect lines printed before the readiness line (embedded default).
    hints: Vec<String>,
    /// `[retention]`, if configured.
    retention: Option<RetentionConfig>,
    /// Where metrics, health and readiness are served over HTTP.
    metrics: Option<SocketAddr>,
    /// The default I/O rate limits (`[limits]`).
    io_defaults: IoDefaults,
}

fn from_config(path: &Path, config: Config, args: &ServeArgs) -> anyhow::Result<Plan> {
    let tcp = match &config.tcp {
        None => None,
        Some(tcp) => {
            let tls = match &tcp.tls {
                None => None,
                Some(files) => Some(
                    TlsConfig::from_pem_files(&files.cert, &files.key, &files.client_ca)
                        .with_context(|| format!("config file {}: tcp.tls", path.display()))?,
                ),
            };
            Some((tcp.address, tls))
        }
    };
    let admin_tcp = match &config.admin_tcp {
        None => None,
        Some(admin) => {
            let files = &admin.tls;
            let tls = TlsConfig::from_pem_files(&files.cert, &files.key, &files.client_ca)
                .with_context(|| format!("config file {}: admin_tcp.tls", path.display()))?;
            Some((admin.address, tls))
        }
    };
    let location = StoreLocation::from_config(&config, &args.passphrase);
    let target = match &config.cluster {
        None => Target::Store(Box::new(location.open(IfMissing::Create)?)),
        Some(table) => Target::Cluster(Box::new(cluster_join(&config, table, location)?)),
    };
    Ok(Plan {
        target,
        data_dir: config.data_dir.clone(),
        read_only: config.read_only.clone(),
        server: config.server_config(),
        unix: config.unix.as_ref().map(|u| (u.path.clone(), u.mode)),
        tcp,
        admin_tcp,
        hints: Vec::new(),
        retention: config.retention.clone(),
        metrics: config.metrics.as_ref().map(|m| m.address),
        io_defaults: config.limits.io_defaults(),
    })
}

fn embedded_default(args: &ServeArgs) -> anyhow::Result<Plan> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let location = StoreLocation {
        key_file: dir.join("master.key"),
        dir: dir.clone(),
        passphrase: args.passphrase.clone(),
        backend: BackendKind::Redb,
        space_reserve: None,
        index_memory: None,
        reencrypt_rate: None,
        object_store: None,
        cluster: false,
    };
    let key_file = &location.key_file;
    if key_file.symlink_metadata().is_err() {
        if location.has_store() {
            bail!(
                "{} holds a store but its master key {} is missing; without that key the \
                 data cannot be read",
                dir.display(),
                key_file.display()
            );
        }
        let key = MasterKey::generate().context("could not generate a master key")?;
        let passphrase = args
            .passphrase
            .read(&key_file.display().to_string(), Confirm::Twice)?;
        create_key_file(key_file, &key, passphrase.as_ref())?;
        info!(key_file = %key_file.display(), key_id = %key.id(), "generated a master key");
    }
    warn!(
        key_file = %key_file.display(),
        "the master key sits beside the data it protects, so whoever copies this directory \
         can read every volume; this embedded default is for trying blockseal out: in \
         production keep the key elsewhere (see docs/OPERATIONS.md)"
    );
    let store = location.open(IfMissing::Create)?;
    let size = ensure_demo_volume(&store, args.demo_size)?;
    let data_dir = store.dir().to_path_buf();

    let socket = args.unix.clone().unwrap_or_else(|| dir.join("nbd.sock"));
    let socket = std::path::absolute(&socket)
        .with_context(|| format!("cannot resolve {}", socket.display()))?;
    let export = format!("{DEMO_TENANT}/{DEMO_VOLUME}");
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let hints = vec![
        format!(
            "serving {export} ({size}) from {}; connect with:",
            dir.display()
        ),
        format!("  nbdinfo '{uri}'"),
        format!("  qemu-io -f raw '{uri}'"),
        format!(
            "  nbd-client -unix {} -N {export} /dev/nbd0",
            socket.display()
        ),
    ];
    Ok(Plan {
        target: Target::Store(Box::new(store)),
        data_dir,
        read_only: BTreeSet::new(),
        server: ServerConfig::default(),
        unix: Some((socket, FileMode::DEFAULT)),
        tcp: None,
        admin_tcp: None,
        hints,
        retention: None,
        metrics: args.metrics_address,
        io_defaults: IoDefaults {
            known: true,
            ..IoDefaults::default()
        },
    })
}

/// Resolves `[cluster]`: the master key (loaded now, passphrase and all),
/// the bucket clients, and what every shard's store opens with.
fn cluster_join(
    config: &Config,
    table: &crate::config::ClusterConfig,
    mut location: StoreLocation,
) -> anyhow::Result<ClusterJoin> {
    let object_store = location
        .object_store
        .take()
        .context("[cluster] needs an [object_store] table")?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| {
            format!(
                "cannot create the data directory {}",
                config.data_dir.display()
            )
        })?;
    let master = location.load_key()?;
    let record = table.record();
    // Lease requests must answer within a renewal: a slow one counts as
    // failed and the next renewal tries again.
    let lease_objects = object_store.connect_with_timeout(record.renew())?;
    let objects = object_store.connect()?;
    let settings = cluster::host::Settings {
        host: table.host.clone(),
        uri: table.uri.clone(),
        data_dir: config.data_dir.clone(),
        prefix: object_store.prefix.trim_matches('/').to_owned(),
        read_only: config.read_only.clone(),
        max_shards: table.max_shards,
        store_options: Box::new(move || {
            location
                .options()
                .unwrap_or_else(|_| blockseal_volume::StoreOptions::new())
        }),
    };
    Ok(ClusterJoin {
        settings,
        record,
        lease_objects,
        objects,
        master,
    })
}

/// Creates `demo/disk` of `size` unless it exists; returns its actual size.
fn ensure_demo_volume(store: &Store, size: Size) -> anyhow::Result<Size> {
    let tenant = TenantId::new(DEMO_TENANT).expect("the demo tenant name is valid");
    let volume = VolumeId::new(DEMO_VOLUME).expect("the demo volume name is valid");
    if store.tenant(&tenant)?.is_none() {
        store.create_tenant(&tenant)?;
    }
    if let Some(existing) = store.volumes(&tenant)?.into_iter().find(|v| v.id == volume) {
        if existing.size != size.0 {
            warn!(
                size = existing.size,
                requested = size.0,
                "the demo volume exists already and keeps its size"
            );
        }
        return Ok(Size(existing.size));
    }
    store
        .create_volume(&tenant, &volume, size.0, VolumeOptions::default())
        .with_context(|| format!("cannot create the demo volume of {size}"))?;
    info!(
        size = size.0,
        "created the demo volume {DEMO_TENANT}/{DEMO_VOLUME}"
    );
    Ok(size)
}

fn serve(plan: Plan) -> anyhow::Result<()> {
    let Plan {
        target,
        data_dir,
        read_only,
        server: server_config,
        unix,
        tcp,
        admin_tcp,
        hints,
        retention,
        metrics: metrics_address,
        io_defaults,
    } = plan;
    check_descriptor_limit(&server_config);
    let io_limits = Arc::new(IoLimits::load(&data_dir, io_defaults)?);
    let retention =
        retention.map(|config| Arc::new(Retention::new(config, Retention::test_clock_from_env())));
    let front = match target {
        Target::Store(store) => {
            let store = Arc::new(*store);
            let catalog = Arc::new(
                StoreCatalog::new(store.clone(), read_only).with_io_limits(io_limits.clone()),
            );
            let service = Arc::new(
                admin::service::Service::online(store.clone(), catalog.clone())
                    .with_retention(retention.clone())
                    .with_io_limits(io_limits),
            );
            let metrics = Arc::new(Metrics::new(catalog.clone(), store.clone()));
            Front::Store {
                store,
                catalog,
                service,
                metrics,
            }
        }
        Target::Cluster(join) => {
            let ClusterJoin {
                settings,
                record,
                lease_objects,
                objects,
                master,
            } = *join;
            Front::Cluster(Cluster::join(
                settings,
                record,
                lease_objects,
                objects,
                master,
                io_limits,
            )?)
        }
    };
    let (nbd_catalog, dispatch): (Arc<dyn Catalog>, Arc<dyn Dispatch>) = match &front {
        Front::Store {
            catalog, service, ..
        } => (catalog.clone(), service.clone()),
        Front::Cluster(cluster) => (
            Arc::new(ClusterCatalog::new(cluster.clone())),
            Arc::new(ClusterAdmin::new(cluster.clone())),
        ),
    };
    let metrics = match &front {
        Front::Store { metrics, .. } => Some(metrics.clone()),
        Front::Cluster(_) => None,
    };
    let server = Server::new(nbd_catalog, server_config);
    let admin_path = admin::socket_path(&data_dir);
    // Owner only: the peer check in the admin server comes on top of this.
    let admin_listener = bind_unix(&admin_path, FileMode(0o600))?;
    let admin_tcp = admin_tcp
        .map(|(address, tls)| -> anyhow::Result<_> {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen on TCP {address} (admin_tcp)"))?;
            listener.set_nonblocking(true)?;
            Ok((listener.local_addr()?, listener, tls))
        })
        .transpose()?;

    let metrics_listener = metrics_address
        .map(|address| -> anyhow::Result<_> {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen on TCP {address} (metrics)"))?;
            listener.set_nonblocking(true)?;
            Ok((listener.local_addr()?, listener))
        })
        .transpose()?;

    // Bound before the runtime starts, so every bind error is reported first.
    let unix = unix
        .map(|(path, mode)| bind_unix(&path, mode).map(|l| (path, l)))
        .transpose()?;
    let tcp = tcp
        .map(|(address, tls)| -> anyhow::Result<_> {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen on TCP {address}"))?;
            listener.set_nonblocking(true)?;
            let bound = listener.local_addr()?;
            Ok((bound, listener, tls))
        })
        .transpose()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockseal")
        .build()
        .context("cannot start the async runtime")?;
    let socket_path = unix.as_ref().map(|(path, _)| path.clone());
    // Its first pass runs while the listeners start; it stops before the
    // final flush (or on any early exit, below).
    let mut scheduler = match (&retention, &front) {
        (Some(r), Front::Store { service, .. }) => {
            Scheduler::start(service.clone(), r.clone(), PASS_PERIOD)?
        }
        _ => None,
    };
    let served = runtime.block_on(async {
        // Signal handlers first: a signal right after the readiness line counts.
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut ready = String::from("ready");
        let mut listeners = JoinSet::new();
        if let Some((path, listener)) = unix {
            let listener = tokio::net::UnixListener::from_std(listener)?;
            let server = server.clone();
            listeners.spawn(async move {
                server
                    .serve_unix(listener)
                    .await
                    .map_err(anyhow::Error::new)
            });
            ready.push_str(&format!(" unix={}", path.display()));
            info!(socket = %path.display(), "listening on a Unix socket");
        }
        if let Some((bound, listener, tls)) = tcp {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let server = server.clone();
            let with_tls = tls.is_some();
            listeners.spawn(async move {
                server
                    .serve_tcp(listener, tls)
                    .await
                    .map_err(anyhow::Error::new)
            });
            ready.push_str(&format!(" tcp={bound}"));
            info!(address = %bound, tls = with_tls, "listening on TCP");
        }
        {
            let listener = tokio::net::UnixListener::from_std(admin_listener)?;
            let service = dispatch.clone();
            let shutdown = server.shutdown_handle();
            let policy = admin::server::Policy::owner_and_root();
            listeners.spawn(async move {
                admin::server::serve_unix(listener, service, policy, shutdown)
                    .await
                    .context("the admin API's listener failed")
            });
            ready.push_str(&format!(" admin={}", admin_path.display()));
            info!(socket = %admin_path.display(), "admin API listening on a Unix socket");
        }
        if let Some((bound, listener, tls)) = admin_tcp {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let service = dispatch.clone();
            let shutdown = server.shutdown_handle();
            listeners.spawn(async move {
                admin::server::serve_tls(listener, tls, service, shutdown)
                    .await
                    .context("the admin API's TCP listener failed")
            });
            ready.push_str(&format!(" admin_tcp={bound}"));
            info!(address = %bound, "admin API listening on TCP with TLS");
        }
        if let (Some((bound, listener)), Some(metrics)) = (metrics_listener, &metrics) {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let metrics = metrics.clone();
            let shutdown = server.shutdown_handle();
            listeners.spawn(async move {
                crate::metrics::serve(listener, metrics, shutdown)
                    .await
                    .context("the metrics listener failed")
            });
            ready.push_str(&format!(" metrics={bound}"));
            info!(address = %bound, "metrics, /healthz and /readyz on HTTP");
        }
        if let Some(metrics) = &metrics {
            metrics.set_ready(true);
        }
        {
            let mut out = std::io::stdout().lock();
            for line in &hints {
                writeln!(out, "{line}")?;
            }
            writeln!(out, "{ready}")?;
            out.flush()?;
        }
        crate::notify::notify("READY=1\nSTATUS=serving");

        let first = tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
            Some(done) = listeners.join_next() => Err(match done {
                Ok(Ok(())) => anyhow::anyhow!("a listener stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::new(e).context("a listener failed"),
            }),
        };
        if let Some(metrics) = &metrics {
            metrics.set_ready(false);
        }
        crate::notify::notify("STOPPING=1\nSTATUS=stopping: finishing requests, flushing volumes");
        server.shutdown_handle().trigger();
        let signal_name = first?;
        info!("{signal_name}: shutting down; finishing in-flight requests");
        tokio::spawn(async move {
            let code = tokio::select! {
                _ = term.recv() => 128 + 15,
                _ = int.recv() => 128 + 2,
            };
            eprintln!("blockseal: second signal, exiting at once without flushing");
            std::process::exit(code);
        });
        while let Some(done) = listeners.join_next().await {
            done.context("a listener failed")??;
        }
        // A thread of its own: the blocking pool may still be busy with
        // requests of connections dropped at the deadline, and the flush must
        // not queue behind them.
        let retention = retention.clone();
        let scheduler = scheduler.take();
        let (flushed_tx, flushed_rx) = tokio::sync::oneshot::channel();
        let (catalog, service) = match &front {
            Front::Store {
                catalog, service, ..
            } => (catalog.clone(), service.clone()),
            Front::Cluster(cluster) => {
                // Every shard closes (its volumes flushed) and its lease is
                // released, so that other hosts take it at once.
                let cluster = cluster.clone();
                std::thread::Builder::new()
                    .name("blockseal-final-flush".into())
                    .spawn(move || {
                        let _ = flushed_tx.send(Ok(cluster.leave()));
                    })
                    .context("cannot start the final flush")?;
                let shards = flushed_rx
                    .await
                    .context("leaving the cluster did not finish")?
                    .map_err(|e: blockseal_volume::VolumeError| anyhow::Error::new(e))?;
                info!(shards, "connections closed, shards flushed and released");
                return anyhow::Ok(());
            }
        };
        std::thread::Builder::new()
            .name("blockseal-final-flush".into())
            .spawn(move || {
                // Retention first: its pass ends after the action under way,
                // and a pass run on request stops likewise.
                if let Some(scheduler) = scheduler {
                    scheduler.stop();
                }
                if let Some(retention) = &retention {
                    retention.request_stop();
                }
                // Admin operations already running finish first (a shred or a
                // deletion half done would otherwise wait for the next start).
                let unfinished = service.close(ADMIN_DRAIN);
                if unfinished > 0 {
                    warn!(unfinished, "admin operations still running at shutdown");
                }
                drop(service);
                let flushed = catalog.flush_all();
                // Let go of the store before saying so: the caller closes it next.
                drop(catalog);
                let _ = flushed_tx.send(flushed);
            })
            .context("cannot start the final flush")?;
        let flushed = flushed_rx
            .await
            .context("the final flush did not finish")?
            .context("the final flush failed")?;
        info!(volumes = flushed, "connections closed and volumes flushed");
        anyhow::Ok(())
    });
    // Nothing may still hold a volume or the store when the store is closed:
    // the runtime's threads drop what their tasks held before this returns
    // (bounded: a blocking call stuck in the kernel cannot hold the exit).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    if let Some(scheduler) = scheduler.take() {
        scheduler.stop();
    }
    drop(retention);
    // The metrics read the catalog and the store: let go of both.
    drop(metrics);
    drop(dispatch);
    drop(server);
    if let Some(path) = &socket_path {
        let _ = fs::remove_file(path);
    }
    let _ = fs::remove_file(&admin_path);
    if let Front::Store {
        store,
        catalog,
        service,
        metrics,
    } = front
    {
        catalog.close_all();
        drop(metrics);
        drop(service);
        drop(catalog);
        served?;
        match Arc::try_unwrap(store) {
            Ok(store) => drop(store),
            Err(_) => {
                warn!("the store is still referenced at exit; its lock goes with the process")
            }
        }
    } else {
        served?;
    }
    info!("stopped");
    Ok(())
}

/// Warns when the open file limit is below what the connection caps allow: the
/// server would then meet EMFILE (and refuse connections, or fail to create a
/// segment) before its own limits apply.
fn check_descriptor_limit(config: &ServerConfig) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // The soft limit is raised to the hard one, as daemons do: Debian's
    // default soft limit (1024) is below what the default caps need.
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(%error, "could not raise the open file limit to its maximum");
        }
    }
    let Some(soft) = getrlimit(Resource::Nofile).current else {
        return;
    };
    // A socket per connection the caps admit, the segment files the store
    // keeps open, plus its other files (metadata, lock) and the runtime's own.
    let segments = blockseal_volume::FileSegments::DEFAULT_OPEN_FILES as u64;
    let needed = (config.max_connections + config.max_handshakes) as u64 + segments + 128;
    if soft < needed {
        warn!(
            open_file_limit = soft,
            needed,
            "the open file limit is below limits.max_connections + limits.max_handshakes \
             + {segments} open segment files + 128: raise it (LimitNOFILE= in the systemd \
             unit) or lower those limits"
        );
    }
}

/// Binds a Unix socket with permission bits `mode`. A stale socket file (nobody
/// listening) is replaced; a live one or any other file is refused.
fn bind_unix(path: &Path, mode: FileMode) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another server listens on it", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    // The socket is created owner-only and then opened up to `mode`, so it is
    // never reachable with wider permissions than configured.
    let saved = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(saved);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(path, Permissions::from_mode(mode.0))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
