//! The server configuration file: TOML, read with serde, every table closed to
//! unknown keys.
//!
//! Relative paths in the file are taken relative to the directory holding the
//! file, so a configuration and its certificates can move together. Every error
//! names the file and the field. The file never holds secrets: the master key
//! lives in its own key file, and its passphrase comes from the environment, a
//! file descriptor or a prompt (`passphrase.rs`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use blockseal_keys::{TenantId, VolumeId};
use blockseal_nbd::ServerConfig;
use blockseal_volume::meta::BackendKind;
use serde::Deserialize;

use crate::otlp::{self, Endpoint};
use crate::passphrase::PassphraseArgs;
use crate::size::Size;

/// A parsed and checked configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The store directory (created with the store when it holds none).
    pub(crate) data_dir: PathBuf,
    /// The metadata backend of a new store; an existing store keeps its own.
    #[serde(default)]
    pub(crate) metadata_backend: Backend,
    /// The master key file and where its passphrase comes from.
    pub(crate) master_key: MasterKeyConfig,
    /// The Unix socket listener.
    pub(crate) unix: Option<UnixConfig>,
    /// The TCP listener.
    pub(crate) tcp: Option<TcpConfig>,
    /// Per-connection and server-wide limits.
    #[serde(default)]
    pub(crate) limits: Limits,
    /// Exports (`tenant/volume`) served read-only.
    #[serde(default)]
    pub(crate) read_only: BTreeSet<String>,
    /// Free space on the store's file system that data writes leave for
    /// metadata commits (default 64M): writes past it fail with ENOSPC.
    #[serde(default)]
    pub(crate) space_reserve: Option<Size>,
    /// Memory the open volumes' extent indexes hold together (default 512M);
    /// volumes past it read their mappings from the metadata store.
    #[serde(default)]
    pub(crate) index_memory: Option<Size>,
    /// Bytes per second that re-encryption after a data key rotation moves
    /// (default 32M), slowed to a quarter while a volume is busy.
    #[serde(default)]
    pub(crate) reencrypt_rate: Option<Size>,
    /// The admin API on TCP, with TLS and admin client certificates (the admin
    /// Unix socket `DATA_DIR/admin.sock` is always served).
    pub(crate) admin_tcp: Option<AdminTcpConfig>,
    /// Scheduled snapshots, backups and data retention (none without the
    /// table).
    #[serde(default)]
    pub(crate) retention: Option<crate::retention::RetentionConfig>,
    /// Prometheus metrics, health and readiness over HTTP (none without the
    /// table).
    pub(crate) metrics: Option<MetricsConfig>,
    /// Tracing spans to an OpenTelemetry collector (none without the table).
    pub(crate) tracing: Option<TracingConfig>,
    /// Metadata and segments in an S3-compatible bucket instead of the data
    /// directory (none without the table).
    pub(crate) object_store: Option<ObjectStoreConfig>,
    /// This host serves shards of a cluster kept in `[object_store]` (none
    /// without the table).
    pub(crate) cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this host is one of several serving the shards of a cluster
/// kept under `[object_store]`'s prefix (docs/DISTRIBUTED.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterConfig {
    /// This host's name, unique in the cluster.
    pub(crate) host: String,
    /// Where clients reach this host's NBD listener, as `blockseal cluster
    /// locate` prints it (`nbds://storage-a.example:10809`).
    pub(crate) uri: String,
    /// Shards of a new cluster (default 16); a cluster keeps the count it
    /// was created with.
    #[serde(default = "default_shards")]
    pub(crate) shards: u32,
    /// Lease timings of a new cluster, in milliseconds (defaults 8000, 2000
    /// and 2000); a cluster keeps the timings it was created with.
    pub(crate) lease_ms: Option<u64>,
    pub(crate) renew_ms: Option<u64>,
    pub(crate) grace_ms: Option<u64>,
    /// Shards this host serves at most (default: an even share of the hosts
    /// up).
    pub(crate) max_shards: Option<u32>,
}

fn default_shards() -> u32 {
    16
}

impl ClusterConfig {
    fn check(&self) -> anyhow::Result<()> {
        if self.host.is_empty()
            || self.host.len() > 64
            || !self
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            || self.host.starts_with('.')
        {
            bail!(
                "cluster.host: {:?} is not a host name of 1 to 64 letters, digits, '-', '.' or '_'",
                self.host
            );
        }
        if !["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|scheme| self.uri.starts_with(scheme))
        {
            bail!(
                "cluster.uri: {:?} is not an NBD URI (nbd://HOST:PORT, nbds://…, nbd+unix:///?socket=PATH)",
                self.uri
            );
        }
        self.record().check().context("cluster")?;
        Ok(())
    }

    /// The cluster record a new cluster gets from this table.
    pub(crate) fn record(&self) -> crate::cluster::records::ClusterRecord {
        use crate::cluster::records::{DEFAULT_GRACE, DEFAULT_LEASE, DEFAULT_RENEW};
        crate::cluster::records::ClusterRecord {
            version: 1,
            shards: self.shards,
            lease_ms: self.lease_ms.unwrap_or(DEFAULT_LEASE.as_millis() as u64),
            renew_ms: self.renew_ms.unwrap_or(DEFAULT_RENEW.as_millis() as u64),
            grace_ms: self.grace_ms.unwrap_or(DEFAULT_GRACE.as_millis() as u64),
        }
    }
}

/// `[object_store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ObjectStoreConfig {
    /// The bucket.
    pub(crate) bucket: String,
    /// This store's key prefix in the bucket (`<prefix>/meta`,
    /// `<prefix>/segments`); one store per prefix.
    pub(crate) prefix: String,
    /// The bucket's region (default `us-east-1`).
    #[serde(default = "default_region")]
    pub(crate) region: String,
    /// The service's URL, for a service other than AWS S3
    /// (`https://minio.example:9000`); `http:` only on loopback.
    pub(crate) endpoint: Option<String>,
    /// The environment variable holding the access key id (default
    /// `AWS_ACCESS_KEY_ID`).
    #[serde(default = "default_key_id_env")]
    pub(crate) access_key_id_env: String,
    /// The environment variable holding the secret key (default
    /// `AWS_SECRET_ACCESS_KEY`); the key is never in this file.
    #[serde(default = "default_secret_env")]
    pub(crate) secret_access_key_env: String,
}

/// Whether `authority` (`host[:port]`, `[v6]:port`) names this host:
/// `localhost` or a loopback address, never a name that merely starts so.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_key_id_env() -> String {
    "AWS_ACCESS_KEY_ID".into()
}

fn default_secret_env() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

impl ObjectStoreConfig {
    fn check(&self) -> anyhow::Result<()> {
        if self.bucket.is_empty() {
            bail!("object_store.bucket: must not be empty");
        }
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty()
            || prefix
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            bail!(
                "object_store.prefix: {:?} is not a key prefix like \"blockseal/host-a\"",
                self.prefix
            );
        }
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"))
                .ok_or_else(|| {
                    anyhow::anyhow!("object_store.endpoint: {endpoint:?} is not an http(s) URL")
                })?;
            let authority = rest.split('/').next().unwrap_or_default();
            if endpoint.starts_with("http://") && !is_loopback_host(authority) {
                bail!(
                    "object_store.endpoint: {endpoint} sends the request signatures and \
                     the sealed data unencrypted; use https://, or http:// on loopback only"
                );
            }
        }
        Ok(())
    }

    /// A client of the bucket, with the credentials read from the environment.
    pub(crate) fn connect(
        &self,
    ) -> anyhow::Result<std::sync::Arc<dyn blockseal_volume::object::ObjectStore>> {
        self.connect_with_timeout(blockseal_volume::object::S3Options::DEFAULT_REQUEST_TIMEOUT)
    }

    /// [`connect`](Self::connect), with requests timing out after `timeout`.
    pub(crate) fn connect_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> anyhow::Result<std::sync::Arc<dyn blockseal_volume::object::ObjectStore>> {
        use blockseal_volume::object::{self, S3Options};
        let read = |name: &str| {
            std::env::var(name).map_err(|_| {
                anyhow::anyhow!(
                    "object_store: the environment variable {name} is not set; it must \
                     hold the bucket's credentials"
                )
            })
        };
        let key_id = read(&self.access_key_id_env)?;
        let secret = zeroize::Zeroizing::new(read(&self.secret_access_key_env)?);
        let mut options =
            S3Options::new(&self.bucket, &self.region, key_id, secret).request_timeout(timeout);
        if let Some(endpoint) = &self.endpoint {
            options = options.endpoint(endpoint);
        }
        object::s3(&options).map_err(|e| anyhow::anyhow!("object_store: {e}"))
    }
}

/// `[tracing]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TracingConfig {
    /// The collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`): spans
    /// are posted to `/v1/traces` under it, as JSON. Plain HTTP only.
    pub(crate) otlp_endpoint: Endpoint,
    /// The `service.name` resource attribute (default `blockseal`).
    pub(crate) service_name: Option<String>,
    /// The fraction of traces exported, 0 to 1 (default 1): a connection
    /// with all its requests, an admin operation, a job.
    pub(crate) sample_ratio: Option<f64>,
    /// Which spans, in `tracing_subscriber` target directives (default
    /// `info,blockseal_nbd=debug`: `info` leaves out the per-request spans).
    pub(crate) spans: Option<String>,
}

impl TracingConfig {
    /// The exporter's settings (checked by [`Config::check`]).
    pub(crate) fn settings(&self) -> anyhow::Result<otlp::Settings> {
        let mut settings = otlp::Settings::with_defaults(self.otlp_endpoint.clone());
        if let Some(name) = &self.service_name {
            settings.service_name = name.clone();
        }
        if let Some(ratio) = self.sample_ratio {
            settings.sample_ratio = ratio;
        }
        if let Some(spans) = &self.spans {
            settings.spans = spans
                .parse()
                .map_err(|e| anyhow::anyhow!("tracing.spans: {spans:?}: {e}"))?;
        }
        Ok(settings)
    }
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, plain HTTP
    /// (e.g. `127.0.0.1:9100`; a private address: the metrics name tenants
    /// and volumes).
    pub(crate) address: SocketAddr,
}

/// `[admin_tcp]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminTcpConfig {
    /// `IP:PORT`; port 0 picks a free port (reported on the readiness line).
    pub(crate) address: SocketAddr,
    /// TLS: mandatory, and clients must present a certificate naming an
    /// administrator (URI SAN `blockseal:admin:<name>`).
    pub(crate) tls: TlsFiles,
}

/// `metadata_backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Backend {
    /// redb (the default; see docs/ARCHITECTURE.md for why).
    #[default]
    Redb,
    /// sled 0.34.7.
    Sled,
    /// SlateDB on a local object-store directory.
    Slatedb,
}

impl From<Backend> for BackendKind {
    fn from(backend: Backend) -> BackendKind {
        match backend {
            Backend::Redb => BackendKind::Redb,
            Backend::Sled => BackendKind::Sled,
            Backend::Slatedb => BackendKind::SlateDb,
        }
    }
}

/// `[master_key]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MasterKeyConfig {
    /// The key file.
    pub(crate) file: PathBuf,
    /// Read the passphrase from this environment variable.
    pub(crate) passphrase_env: Option<String>,
    /// Read the passphrase from this file descriptor.
    pub(crate) passphrase_fd: Option<u32>,
    /// Ask for the passphrase on the terminal.
    #[serde(default)]
    pub(crate) passphrase_prompt: bool,
}

impl MasterKeyConfig {
    /// The passphrase source as the command-line arguments would give it.
    pub(crate) fn passphrase(&self) -> PassphraseArgs {
        PassphraseArgs {
            passphrase_env: self.passphrase_env.clone(),
            passphrase_fd: self.passphrase_fd,
            passphrase_prompt: self.passphrase_prompt,
        }
    }
}

/// `[unix]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnixConfig {
    /// The socket path.
    pub(crate) path: PathBuf,
    /// The socket file's permission bits.
    #[serde(default)]
    pub(crate) mode: FileMode,
}

/// `[tcp]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TcpConfig {
    /// `IP:PORT`; port 0 picks a free port (reported on the readiness line).
    pub(crate) address: SocketAddr,
    /// Serve plain TCP on a non-loopback address (every tenant visible).
    #[serde(default)]
    pub(crate) insecure_plain_tcp: bool,
    /// TLS with client certificates naming the tenant.
    pub(crate) tls: Option<TlsFiles>,
}

/// `[tcp.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFiles {
    /// Server certificate chain (PEM, leaf first).
    pub(crate) cert: PathBuf,
    /// Server private key (PEM).
    pub(crate) key: PathBuf,
    /// CA certificates that sign client certificates (PEM).
    pub(crate) client_ca: PathBuf,
}

/// `[limits]`; a missing field keeps the server default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limits {
    /// Requests one connection may have in flight.
    pub(crate) max_in_flight_requests: Option<usize>,
    /// Payload bytes one connection may have in flight (replies not yet
    /// written included).
    pub(crate) max_in_flight_bytes: Option<Size>,
    /// Largest single read or write (64K to 64M).
    pub(crate) max_request_bytes: Option<Size>,
    /// Payload bytes all connections together may have in flight (replies not
    /// yet written included); at least `max_request_bytes`.
    pub(crate) memory_budget: Option<Size>,
    /// The most of `memory_budget` one tenant's connections may hold together;
    /// from `max_request_bytes` to `memory_budget`, default half of it.
    pub(crate) memory_budget_per_tenant: Option<Size>,
    /// Connections in transmission, in total.
    pub(crate) max_connections: Option<usize>,
    /// Connections in transmission to one tenant's exports.
    pub(crate) max_connections_per_tenant: Option<usize>,
    /// Connections still in the handshake.
    pub(crate) max_handshakes: Option<usize>,
    /// Seconds a client has to finish the handshake.
    pub(crate) handshake_timeout_secs: Option<u64>,
    /// Seconds connections get to finish after SIGTERM before they are dropped.
    pub(crate) shutdown_timeout_secs: Option<u64>,
    /// Seconds a client has to accept each batch of replies in full.
    pub(crate) reply_timeout_secs: Option<u64>,
    /// Seconds a client has to send a write's whole payload after its header.
    pub(crate) payload_timeout_secs: Option<u64>,
    /// Requests per second each tenant's volumes may make together (default:
    /// unlimited; `blockseal limits set` overrides it per tenant).
    pub(crate) tenant_iops: Option<u64>,
    /// Bytes per second each tenant's volumes may read and write together.
    pub(crate) tenant_bytes_per_sec: Option<Size>,
    /// Requests per second each volume may make.
    pub(crate) volume_iops: Option<u64>,
    /// Bytes per second each volume may read and write.
    pub(crate) volume_bytes_per_sec: Option<Size>,
}

impl Limits {
    /// The default I/O rate limits of tenants and volumes.
    pub(crate) fn io_defaults(&self) -> crate::iolimits::Defaults {
        use std::num::NonZeroU64;
        let rate = |iops: Option<u64>, bytes: Option<Size>| blockseal_nbd::RateLimit {
            iops: iops.and_then(NonZeroU64::new),
            bytes_per_sec: bytes.and_then(|Size(n)| NonZeroU64::new(n)),
        };
        crate::iolimits::Defaults {
            tenant: rate(self.tenant_iops, self.tenant_bytes_per_sec),
            volume: rate(self.volume_iops, self.volume_bytes_per_sec),
            known: true,
        }
    }
}

/// Unix permission bits: a TOML integer (`0o660`) or an octal string (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileMode(pub(crate) u32);

impl FileMode {
    /// Owner and group may connect.
    pub(crate) const DEFAULT: FileMode = FileMode(0o660);
}

impl Default for FileMode {
    fn default() -> Self {
        FileMode::DEFAULT
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<FileMode, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        let bits = match Raw::deserialize(deserializer) {
            Ok(Raw::Number(n)) => n,
            Ok(Raw::Text(text)) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an octal mode")))?,
            Err(_) => {
                return Err(serde::de::Error::custom(
                    "expected permission bits such as 0o660 or \"0660\"",
                ));
            }
        };
        if bits > 0o777 {
            return Err(serde::de::Error::custom(format!(
                "mode {bits:o} has bits beyond 0777"
            )));
        }
        Ok(FileMode(bits))
    }
}

impl Config {
    /// Reads, parses and checks the file at `path`; relative paths in it become
    /// relative to its directory.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config
            .check()
            .with_context(|| format!("config file {}", path.display()))?;
        Ok(config)
    }

    /// The server limits and policy.
    pub(crate) fn server_config(&self) -> ServerConfig {
        let mut server = ServerConfig::default();
        let l = &self.limits;
        if let Some(n) = l.max_in_flight_requests {
            server.max_in_flight_requests = n;
        }
        if let Some(Size(n)) = l.max_in_flight_bytes {
            server.max_in_flight_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(Size(n)) = l.max_request_bytes {
            server.max_request_payload = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(Size(n)) = l.memory_budget {
            server.memory_budget = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(Size(n)) = l.memory_budget_per_tenant {
            server.memory_budget_per_tenant = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(n) = l.max_connections {
            server.max_connections = n;
        }
        if let Some(n) = l.max_connections_per_tenant {
            server.max_connections_per_tenant = n;
        }
        if let Some(n) = l.max_handshakes {
            server.max_handshakes = n;
        }
        if let Some(secs) = l.handshake_timeout_secs {
            server.handshake_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = l.shutdown_timeout_secs {
            server.shutdown_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = l.reply_timeout_secs {
            server.reply_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = l.payload_timeout_secs {
            server.payload_timeout = Duration::from_secs(secs);
        }
        server.insecure_plain_tcp = self.tcp.as_ref().is_some_and(|t| t.insecure_plain_tcp);
        server
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.master_key.file);
        if let Some(unix) = &mut self.unix {
            fix(&mut unix.path);
        }
        let tcp_tls = self.tcp.as_mut().and_then(|t| t.tls.as_mut());
        let admin_tls = self.admin_tcp.as_mut().map(|a| &mut a.tls);
        for tls in tcp_tls.into_iter().chain(admin_tls) {
            fix(&mut tls.cert);
            fix(&mut tls.key);
            fix(&mut tls.client_ca);
        }
        if let Some(retention) = &mut self.retention {
            retention.resolve(base);
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let key = &self.master_key;
        let sources = usize::from(key.passphrase_env.is_some())
            + usize::from(key.passphrase_fd.is_some())
            + usize::from(key.passphrase_prompt);
        if sources > 1 {
            bail!(
                "master_key: give at most one of passphrase_env, passphrase_fd and passphrase_prompt"
            );
        }
        if self.unix.is_none() && self.tcp.is_none() {
            bail!("no listener: add a [unix] table, a [tcp] table, or both");
        }
        if let Some(tcp) = &self.tcp
            && tcp.tls.is_none()
            && !tcp.address.ip().is_loopback()
            && !tcp.insecure_plain_tcp
        {
            bail!(
                "tcp.address: {} is not a loopback address, and plain TCP there shows every \
                 tenant's exports to anyone who connects; add a [tcp.tls] table, or set \
                 tcp.insecure_plain_tcp = true on a trusted network",
                tcp.address
            );
        }
        if let Some(n) = self.limits.max_in_flight_requests
            && n == 0
        {
            bail!("limits.max_in_flight_requests: must be at least 1");
        }
        if let Some(Size(n)) = self.limits.max_in_flight_bytes
            && n == 0
        {
            bail!("limits.max_in_flight_bytes: must be at least 1");
        }
        if let Some(Size(n)) = self.limits.max_request_bytes
            && !(64 << 10..=64 << 20).contains(&n)
        {
            bail!("limits.max_request_bytes: {n} is outside 64K..=64M");
        }
        self.check_server_limits()?;
        for name in &self.read_only {
            parse_export_name(name).with_context(|| format!("read_only: {name:?}"))?;
        }
        if let Some(retention) = &self.retention {
            retention.check(&self.data_dir)?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.check()?;
            if self.object_store.is_none() {
                bail!("[cluster] needs an [object_store] table: the cluster lives in a bucket");
            }
            if self.retention.is_some() || self.metrics.is_some() {
                bail!(
                    "[cluster]: a cluster host has no [retention] or [metrics] yet; remove \
                     those tables"
                );
            }
        }
        if let Some(object_store) = &self.object_store {
            object_store.check()?;
        }
        if let Some(tracing) = &self.tracing {
            if let Some(ratio) = tracing.sample_ratio
                && !(0.0..=1.0).contains(&ratio)
            {
                bail!("tracing.sample_ratio: {ratio} is outside 0..=1");
            }
            if tracing.service_name.as_ref().is_some_and(|n| n.is_empty()) {
                bail!("tracing.service_name: must not be empty");
            }
            tracing.settings()?;
        }
        Ok(())
    }
}

impl Config {
    /// The limits that bound memory, descriptors and shutdown time.
    fn check_server_limits(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        let defaults = ServerConfig::default();
        let max_request = l
            .max_request_bytes
            .map_or(u64::from(defaults.max_request_payload), |Size(n)| n);
        if let Some(Size(n)) = l.memory_budget
            && n < max_request
        {
            // Every request must fit in the budget on its own, or it would wait
            // forever.
            bail!(
                "limits.memory_budget: {} is less than the largest request ({}, \
                 limits.max_request_bytes)",
                Size(n),
                Size(max_request)
            );
        }
        if let Some(Size(n)) = l.memory_budget_per_tenant {
            let budget = l
                .memory_budget
                .map_or(defaults.memory_budget as u64, |Size(n)| n);
            if !(max_request..=budget).contains(&n) {
                bail!(
                    "limits.memory_budget_per_tenant: {} is outside {}..={} \
                     (limits.max_request_bytes ..= limits.memory_budget)",
                    Size(n),
                    Size(max_request),
                    Size(budget)
                );
            }
        }
        for (name, value) in [
            ("max_connections", l.max_connections),
            ("max_connections_per_tenant", l.max_connections_per_tenant),
            ("max_handshakes", l.max_handshakes),
        ] {
            if value == Some(0) {
                bail!("limits.{name}: must be at least 1");
            }
        }
        for (name, value) in [
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("reply_timeout_secs", l.reply_timeout_secs),
            ("payload_timeout_secs", l.payload_timeout_secs),
        ] {
            if value == Some(0) {
                bail!("limits.{name}: must be at least 1");
            }
        }
        for (name, value) in [
            ("tenant_iops", l.tenant_iops),
            ("volume_iops", l.volume_iops),
            (
                "tenant_bytes_per_sec",
                l.tenant_bytes_per_sec.map(|Size(n)| n),
            ),
            (
                "volume_bytes_per_sec",
                l.volume_bytes_per_sec.map(|Size(n)| n),
            ),
        ] {
            if value == Some(0) {
                bail!("limits.{name}: must be at least 1 (leave it out for no limit)");
            }
        }
        Ok(())
    }
}

/// Splits and checks an export name `tenant/volume`.
pub(crate) fn parse_export_name(name: &str) -> anyhow::Result<(TenantId, VolumeId)> {
    let Some((tenant, volume)) = name.split_once('/') else {
        bail!("an export name is TENANT/VOLUME");
    };
    // Name errors say which name and what is wrong; no context to add.
    let tenant = TenantId::new(tenant)?;
    let volume = VolumeId::new(volume)?;
    Ok((tenant, volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockseal.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    fn error(text: &str) -> String {
        format!("{:#}", load(text).unwrap_err())
    }

    #[test]
    fn the_packaged_configuration_loads() {
        let config = load(include_str!("../../../packaging/blockseal.toml")).unwrap();
        assert_eq!(config.data_dir, Path::new("/var/lib/blockseal"));
        assert_eq!(
            config.unix.as_ref().map(|u| u.path.clone()),
            Some(PathBuf::from("/run/blockseal/nbd.sock"))
        );
        assert_eq!(
            config.metrics.as_ref().map(|m| m.address.to_string()),
            Some("127.0.0.1:9100".to_owned())
        );
    }

    const MINIMAL: &str = r#"
        data_dir = "data"
        [master_key]
        file = "master.key"
        [unix]
        path = "nbd.sock"
    "#;

    #[test]
    fn cluster_table_defaults_and_checks() {
        let bucket = "\n[object_store]\nbucket = \"b\"\nprefix = \"pbx\"\n";
        let table = "\n[cluster]\nhost = \"host-a\"\nuri = \"nbd://10.0.0.5:10809\"\n";
        let config = load(&format!("{MINIMAL}{bucket}{table}")).unwrap();
        let record = config.cluster.unwrap().record();
        assert_eq!(
            (
                record.shards,
                record.lease_ms,
                record.renew_ms,
                record.grace_ms
            ),
            (16, 8000, 2000, 2000)
        );
        assert!(error(&format!("{MINIMAL}{table}")).contains("needs an [object_store]"));
        let bad_host = table.replace("host-a", "host a");
        assert!(error(&format!("{MINIMAL}{bucket}{bad_host}")).contains("cluster.host"));
        let bad_uri = table.replace("nbd://", "http://");
        assert!(error(&format!("{MINIMAL}{bucket}{bad_uri}")).contains("cluster.uri"));
        let short = format!("{table}lease_ms = 1000\n");
        assert!(error(&format!("{MINIMAL}{bucket}{short}")).contains("three renewals"));
        let metrics = "\n[metrics]\naddress = \"127.0.0.1:9000\"\n";
        assert!(error(&format!("{MINIMAL}{bucket}{table}{metrics}")).contains("[metrics]"));
    }

    #[test]
    fn object_store_defaults_and_checks() {
        let table = "\n[object_store]\nbucket = \"b\"\nprefix = \"pbx/host-a\"\n";
        let config = load(&format!("{MINIMAL}{table}")).unwrap();
        let object = config.object_store.unwrap();
        assert_eq!(object.region, "us-east-1");
        assert_eq!(object.access_key_id_env, "AWS_ACCESS_KEY_ID");
        assert_eq!(object.secret_access_key_env, "AWS_SECRET_ACCESS_KEY");
        for endpoint in [
            "http://127.0.0.1:9000",
            "http://localhost:9000/",
            "http://[::1]:9000",
            "https://minio.example:9000",
        ] {
            let text = format!("{MINIMAL}{table}endpoint = \"{endpoint}\"\n");
            assert!(load(&text).is_ok(), "{endpoint} refused: {}", error(&text));
        }
        for (endpoint, says) in [
            ("http://minio.example:9000", "unencrypted"),
            ("http://localhost.example.com", "unencrypted"),
            ("http://127.example.com", "unencrypted"),
            ("ftp://127.0.0.1", "not an http(s) URL"),
        ] {
            let text = format!("{MINIMAL}{table}endpoint = \"{endpoint}\"\n");
            let message = error(&text);
            assert!(message.contains(says), "{endpoint}: {message}");
        }
        for prefix in ["", "/", "a//b", "a/../b"] {
            let text =
                format!("{MINIMAL}\n[object_store]\nbucket = \"b\"\nprefix = \"{prefix}\"\n");
            let message = error(&text);
            assert!(
                message.contains("object_store.prefix"),
                "{prefix:?}: {message}"
            );
        }
        let text =
            format!("{MINIMAL}\n[object_store]\nbucket = \"b\"\nprefix = \"p\"\nsecret = \"x\"\n");
        assert!(error(&text).contains("unknown field"), "{}", error(&text));
    }

    #[test]
    fn minimal_file_and_defaults() {
        let config = load(MINIMAL).unwrap();
        assert!(config.data_dir.is_absolute());
        assert!(config.data_dir.ends_with("data"));
        assert_eq!(config.metadata_backend, Backend::Redb);
        assert_eq!(config.unix.as_ref().unwrap().mode, FileMode(0o660));
        assert!(config.read_only.is_empty());
        let server = config.server_config();
        assert!(!server.insecure_plain_tcp);
        assert_eq!(server.max_in_flight_requests, 64);
        let defaults = ServerConfig::default();
        assert_eq!(server.memory_budget, defaults.memory_budget);
        assert_eq!(server.max_handshakes, defaults.max_handshakes);
        assert_eq!(server.shutdown_timeout, defaults.shutdown_timeout);
        // One largest request, as nbdkit takes, fits every budget with room
        // for other requests.
        assert_eq!(server.max_request_payload, 64 << 20);
        assert_eq!(server.max_in_flight_bytes, 128 << 20);
        assert_eq!(server.memory_budget, 512 << 20);
        assert_eq!(server.memory_budget_per_tenant, None);
    }

    #[test]
    fn full_file() {
        let config = load(
            r#"
            data_dir = "/var/lib/blockseal"
            metadata_backend = "sled"
            read_only = ["acme/archive"]
            space_reserve = "16M"
            index_memory = "1G"
            [master_key]
            file = "/etc/blockseal/master.key"
            passphrase_env = "BLOCKSEAL_PASSPHRASE"
            [unix]
            path = "/run/blockseal/nbd.sock"
            mode = "0600"
            [tcp]
            address = "0.0.0.0:10809"
            [tcp.tls]
            cert = "server-cert.pem"
            key = "server-key.pem"
            client_ca = "ca.pem"
            [limits]
            max_in_flight_requests = 16
            max_in_flight_bytes = "16M"
            max_request_bytes = 1048576
            memory_budget = "128M"
            memory_budget_per_tenant = "32M"
            max_connections = 100
            max_connections_per_tenant = 10
            max_handshakes = 20
            handshake_timeout_secs = 5
            shutdown_timeout_secs = 3
            reply_timeout_secs = 30
            payload_timeout_secs = 20
            tenant_iops = 2000
            volume_bytes_per_sec = "20M"
            "#,
        )
        .unwrap();
        assert_eq!(config.metadata_backend, Backend::Sled);
        assert_eq!(config.space_reserve, Some(Size(16 << 20)));
        assert_eq!(config.index_memory, Some(Size(1 << 30)));
        assert_eq!(config.unix.as_ref().unwrap().mode, FileMode(0o600));
        assert!(
            config
                .tcp
                .as_ref()
                .unwrap()
                .tls
                .as_ref()
                .unwrap()
                .cert
                .is_absolute()
        );
        let server = config.server_config();
        assert_eq!(server.max_in_flight_requests, 16);
        assert_eq!(server.max_in_flight_bytes, 16 << 20);
        assert_eq!(server.max_request_payload, 1 << 20);
        assert_eq!(server.handshake_timeout, Duration::from_secs(5));
        assert_eq!(server.memory_budget, 128 << 20);
        assert_eq!(server.memory_budget_per_tenant, Some(32 << 20));
        assert_eq!(server.max_connections, 100);
        assert_eq!(server.max_connections_per_tenant, 10);
        assert_eq!(server.max_handshakes, 20);
        assert_eq!(server.shutdown_timeout, Duration::from_secs(3));
        assert_eq!(server.reply_timeout, Duration::from_secs(30));
        assert_eq!(server.payload_timeout, Duration::from_secs(20));
        let io = config.limits.io_defaults();
        assert_eq!(io.tenant.iops.map(|n| n.get()), Some(2000));
        assert_eq!(io.tenant.bytes_per_sec, None);
        assert_eq!(io.volume.iops, None);
        assert_eq!(io.volume.bytes_per_sec.map(|n| n.get()), Some(20 << 20));
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = format!("{MINIMAL}\nlisten = \"x\"\n");
        assert!(error(&text).contains("listen"), "{}", error(&text));
        let text = MINIMAL.replace("[unix]", "[unix]\nowner = \"root\"");
        assert!(error(&text).contains("owner"), "{}", error(&text));
    }

    #[test]
    fn refusals_name_the_field() {
        for (text, field) in [
            (MINIMAL.replace("path = \"nbd.sock\"", ""), "path"),
            (
                MINIMAL.replace("[unix]\n        path = \"nbd.sock\"", ""),
                "no listener",
            ),
            (format!("{MINIMAL}mode = \"0999\""), "mode"),
            (format!("{MINIMAL}mode = 0o7777"), "mode"),
            (
                format!("{MINIMAL}[tcp]\naddress = \"0.0.0.0:10809\""),
                "tcp.address",
            ),
            (
                format!("{MINIMAL}[tcp]\naddress = \"not an address\""),
                "address",
            ),
            (
                MINIMAL.replace("data_dir", "read_only = [\"nope\"]\ndata_dir"),
                "read_only",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_in_flight_bytes = \"lots\""),
                "lots",
            ),
            (
                format!("{MINIMAL}[limits]\nmemory_budget = \"16M\""),
                "limits.memory_budget",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_request_bytes = \"65M\""),
                "limits.max_request_bytes",
            ),
            (
                format!("{MINIMAL}[limits]\nmemory_budget = \"1M\"\nmax_request_bytes = \"2M\""),
                "limits.memory_budget",
            ),
            (
                format!("{MINIMAL}[limits]\nmemory_budget_per_tenant = \"1G\""),
                "limits.memory_budget_per_tenant",
            ),
            (
                format!("{MINIMAL}[limits]\nmemory_budget_per_tenant = \"16M\""),
                "limits.memory_budget_per_tenant",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_handshakes = 0"),
                "limits.max_handshakes",
            ),
            (
                format!("{MINIMAL}[limits]\nmax_connections_per_tenant = 0"),
                "limits.max_connections_per_tenant",
            ),
            (
                format!("{MINIMAL}[limits]\nreply_timeout_secs = 0"),
                "limits.reply_timeout_secs",
            ),
            (
                format!("{MINIMAL}[limits]\npayload_timeout_secs = 0"),
                "limits.payload_timeout_secs",
            ),
            (
                format!("{MINIMAL}[limits]\ntenant_iops = 0"),
                "limits.tenant_iops: must be at least 1 (leave it out for no limit)",
            ),
            (
                format!("{MINIMAL}[limits]\nvolume_bytes_per_sec = \"0M\""),
                "limits.volume_bytes_per_sec",
            ),
            (
                MINIMAL.replace(
                    "data_dir = \"data\"",
                    "data_dir = \"data\"\nmetadata_backend = \"rocks\"",
                ),
                "rocks",
            ),
            (
                MINIMAL.replace(
                    "file = \"master.key\"",
                    "file = \"k\"\npassphrase_env = \"A\"\npassphrase_prompt = true",
                ),
                "master_key",
            ),
        ] {
            let message = error(&text);
            assert!(message.contains("blockseal.toml"), "{message}");
            assert!(message.contains(field), "{field}: {message}");
        }
    }

    #[test]
    fn tracing_table() {
        let config = load(&format!(
            "{MINIMAL}[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n"
        ))
        .unwrap();
        let settings = config.tracing.as_ref().unwrap().settings().unwrap();
        assert_eq!(settings.endpoint.to_string(), "http://127.0.0.1:4318");
        assert_eq!(settings.service_name, otlp::DEFAULT_SERVICE_NAME);
        assert_eq!(settings.sample_ratio, 1.0);
        let config = load(&format!(
            "{MINIMAL}[tracing]\notlp_endpoint = \"http://collector:4318/otlp\"\n\
             service_name = \"storage-7\"\nsample_ratio = 0.25\nspans = \"info\"\n"
        ))
        .unwrap();
        let settings = config.tracing.as_ref().unwrap().settings().unwrap();
        assert_eq!(settings.endpoint.to_string(), "http://collector:4318/otlp");
        assert_eq!(settings.service_name, "storage-7");
        assert_eq!(settings.sample_ratio, 0.25);
        assert!(
            !settings
                .spans
                .would_enable("blockseal_nbd", &tracing::Level::DEBUG)
        );
        assert!(load(MINIMAL).unwrap().tracing.is_none());

        let table = |body: &str| format!("{MINIMAL}[tracing]\n{body}\n");
        for (text, says) in [
            (
                table("otlp_endpoint = \"https://c:4318\""),
                "https is not supported",
            ),
            (table("otlp_endpoint = \"c:4318\""), "http://"),
            (table("service_name = \"x\""), "otlp_endpoint"),
            (
                table("otlp_endpoint = \"http://c:4318\"\nsample_ratio = 1.5"),
                "tracing.sample_ratio",
            ),
            (
                table("otlp_endpoint = \"http://c:4318\"\nservice_name = \"\""),
                "tracing.service_name",
            ),
            (
                table("otlp_endpoint = \"http://c:4318\"\nspans = \"blockseal=loud\""),
                "tracing.spans",
            ),
            (
                table("otlp_endpoint = \"http://c:4318\"\nheaders = \"x\""),
                "headers",
            ),
        ] {
            let message = error(&text);
            assert!(message.contains("blockseal.toml"), "{message}");
            assert!(message.contains(says), "{says}: {message}");
        }
    }

    #[test]
    fn plain_tcp_on_loopback_or_with_the_flag() {
        load(&format!("{MINIMAL}[tcp]\naddress = \"127.0.0.1:0\"")).unwrap();
        let config = load(&format!(
            "{MINIMAL}[tcp]\naddress = \"0.0.0.0:0\"\ninsecure_plain_tcp = true"
        ))
        .unwrap();
        assert!(config.server_config().insecure_plain_tcp);
    }
}
