//! Command-line definitions (clap derive). Each subcommand group is one variant of
//! [`Command`] with its own arguments enum; `cmd` dispatches on them.

use std::net::SocketAddr;
use std::path::PathBuf;

use blockseal_keys::Argon2Params;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::otlp::Endpoint;
use crate::passphrase::PassphraseArgs;
use crate::size::Size;

/// Per-tenant encrypted block storage: NBD server and administration.
#[derive(Debug, Parser)]
#[command(
    name = "blockseal",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the NBD server (in the foreground until SIGTERM or SIGINT).
    Serve(ServeArgs),
    /// Show the store: its directory, backend, master key id and counts.
    Status(StatusArgs),
    /// Create, list, show, delete and shred tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Create, list, show, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take, list, show and delete snapshots of a volume, and roll it back to
    /// one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Master key files, and key rotation.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up snapshots to files, check backup files, list backup keys, run
    /// restore drills.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a chain of backup files (a full backup, then incrementals)
    /// into a new volume, on this store or another one.
    Restore(RestoreArgs),
    /// The audit log of admin actions: show it, or verify its chain.
    Audit(AuditArgs),
    /// The whole store: its catalogue for rebuilding a host (`backup`,
    /// through the server or not), rebuilding it (`rebuild`), and
    /// accepting metadata loss (both offline only).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Scheduled snapshots, backups and data retention (`[retention]` in the
    /// configuration): what is due when, and running a pass.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// I/O rate limits per tenant and per volume (requests and bytes per
    /// second): show them, or change one while the server runs.
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Hosts serving the shards of one bucket (`[cluster]`): who serves
    /// what, where a volume is served, and moving a shard to another host.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print a shell completion script (e.g. `blockseal completions bash >
    /// /etc/bash_completion.d/blockseal`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (blockseal.1 and one per subcommand, such as
    /// blockseal-volume-create.1) into DIR, for packaging (e.g.
    /// /usr/share/man/man1).
    Manpages {
        /// The directory (created if missing); existing pages of the same
        /// names are replaced.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

/// How an admin command prints its result.
#[derive(Debug, Args)]
pub(crate) struct OutputArgs {
    /// Print JSON (the admin API's reply) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `blockseal status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// Arguments of `blockseal audit`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AuditArgs {
    /// `verify`, or nothing to show the log.
    #[command(subcommand)]
    pub(crate) command: Option<AuditCommand>,
    /// Only entries with this sequence number or later.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub(crate) since_seq: u64,
    /// Only entries from this time on: Unix seconds, or a duration back from
    /// now such as 30m, 12h or 7d.
    #[arg(long, value_name = "WHEN")]
    pub(crate) since: Option<String>,
    /// At most N entries (the oldest first); all of them without it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) limit: Option<u64>,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// `blockseal audit ...`
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the audit log's chain: an edited, removed or reordered entry is
    /// reported with its sequence number (exit code 1).
    Verify {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `blockseal store ...`
#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Write the store's catalogue: every tenant, volume, wrapped key,
    /// mapping, snapshot, backup key and the audit log, sealed under the
    /// master key, as committed at one instant (what a crash then would
    /// have left). With --segments-to, the segment files it needs are
    /// hard-linked into DIR (copied across file systems). Together they
    /// rebuild the store on another host (`store rebuild`). Works while the
    /// server serves; audited.
    Backup(StoreBackupArgs),
    /// Rebuild a store from a catalogue and its segment files into a new
    /// directory (absent or empty), with the master key the catalogue was
    /// written with. Offline: serve the new store afterwards.
    Rebuild(StoreRebuildArgs),
    /// Open a store whose metadata lost commits it had acknowledged (damaged,
    /// or restored from an older copy), accepting the loss: mappings that no
    /// longer hang together are dropped, live counts recounted, segments of
    /// volumes the metadata does not know moved to DIR/lost/, and the commit
    /// marker reset. Blocks whose mappings were lost read as zeros afterwards.
    /// Restore the metadata from a backup first if you can.
    AcceptMetadataLoss {
        /// Confirms that lost writes stay lost.
        #[arg(long, required = true)]
        yes_i_understand: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Arguments of `blockseal store backup`.
#[derive(Debug, Args)]
pub(crate) struct StoreBackupArgs {
    /// The catalogue file to write (mode 0600; written under a temporary
    /// name and renamed when complete, never overwriting), or - for stdout.
    #[arg(long, value_name = "FILE|-")]
    pub(crate) out: String,
    /// Hard-link (or copy) the segment files the catalogue references into
    /// DIR, laid out as the store's `segments/`; DIR must be absent or empty
    /// and outside the store. A path on the server's host: the server makes
    /// the links. On the store's file system the links take no time and no
    /// space.
    #[arg(long, value_name = "DIR")]
    pub(crate) segments_to: Option<PathBuf>,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// Arguments of `blockseal store rebuild`.
#[derive(Debug, Args)]
pub(crate) struct StoreRebuildArgs {
    /// The catalogue (`store backup --out`).
    #[arg(long, value_name = "FILE")]
    pub(crate) catalog: PathBuf,
    /// The segment files taken with it (`store backup --segments-to`),
    /// laid out as a store's `segments/`. They are hard-linked into the new
    /// store (copied across file systems).
    #[arg(long, value_name = "DIR")]
    pub(crate) segments: PathBuf,
    /// Take the new store's directory, master key file and passphrase
    /// source from the configuration file the new store is to be served
    /// with.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data_dir", "master_key"])]
    pub(crate) config: Option<PathBuf>,
    /// The new store directory: absent, or empty but for the master key
    /// file.
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The master key file the catalogue was written with [default:
    /// DIR/master.key].
    #[arg(long, value_name = "PATH")]
    pub(crate) master_key: Option<PathBuf>,
    /// Where the master key's passphrase comes from, if its key file has one.
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// The cluster a `blockseal cluster` command acts on.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// A configuration file with the cluster's `[object_store]` table (a
    /// cluster host's own file will do).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: PathBuf,
}

/// `blockseal cluster ...`
#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Show the hosts (up or stopped, when each last announced itself) and
    /// every shard's holder and when its lease was last renewed.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print the NBD URI that serves TENANT/VOLUME now (NBD has no
    /// redirect: clients connect to the host serving the volume's shard).
    Locate {
        /// TENANT/VOLUME.
        export: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Ask the host serving SHARD to hand it to HOST: it closes the shard's
    /// connections (clients reconnect, to HOST), flushes its volumes and
    /// releases the lease to HOST, which takes it at its next renewal.
    Move {
        /// The shard, such as s003.
        shard: String,
        /// The host to take it.
        host: String,
        /// Wait until HOST serves the shard.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// `blockseal limits ...`
#[derive(Debug, Subcommand)]
pub(crate) enum LimitsCommand {
    /// Show the default limits (`[limits]` in the configuration) and every
    /// tenant's and volume's override, with the limits in force.
    Show {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Change the limits of a tenant (all its volumes together) or of one
    /// volume. The running server applies them at once to the connections it
    /// has; they are kept in the store directory and hold after a restart.
    Set {
        /// TENANT or TENANT/VOLUME.
        target: String,
        /// Requests per second: a number, `unlimited`, or `default` (the
        /// configuration's).
        #[arg(long, value_name = "N|unlimited|default")]
        iops: Option<RateArg>,
        /// Bytes per second read and written: a size such as 20M, `unlimited`
        /// or `default`.
        #[arg(long, value_name = "SIZE|unlimited|default")]
        bandwidth: Option<BandwidthArg>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// A rate on the command line: `Some(n)`, `Some(0)` for `unlimited`, `None`
/// for `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateArg(pub(crate) Option<u64>);

impl std::str::FromStr for RateArg {
    type Err = String;

    fn from_str(text: &str) -> Result<RateArg, String> {
        match text {
            "unlimited" => Ok(RateArg(Some(0))),
            "default" => Ok(RateArg(None)),
            _ => match text.parse::<u64>() {
                Ok(0) => Err("0 requests per second would stop all I/O; use `unlimited` \
                             for no limit"
                    .to_owned()),
                Ok(n) => Ok(RateArg(Some(n))),
                Err(_) => Err(format!(
                    "{text:?} is not a number of requests per second, `unlimited` or `default`"
                )),
            },
        }
    }
}

/// A bandwidth on the command line, as [`RateArg`] in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BandwidthArg(pub(crate) Option<u64>);

impl std::str::FromStr for BandwidthArg {
    type Err = String;

    fn from_str(text: &str) -> Result<BandwidthArg, String> {
        match text {
            "unlimited" => Ok(BandwidthArg(Some(0))),
            "default" => Ok(BandwidthArg(None)),
            _ => match text.parse::<Size>()? {
                Size(0) => Err(
                    "0 bytes per second would stop all I/O; use `unlimited` for \
                                no limit"
                        .to_owned(),
                ),
                Size(n) => Ok(BandwidthArg(Some(n))),
            },
        }
    }
}

/// `blockseal retention ...`
#[derive(Debug, Subcommand)]
pub(crate) enum RetentionCommand {
    /// Show, for every volume, what retention does next and when: the next
    /// snapshot and the ones to expire, the next backup and its kind, the
    /// next age mark and the data it discards. Offline, give --config (the
    /// settings are in the configuration file).
    Status {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Run one retention pass now, as the server does every minute; exits 1
    /// if an action failed.
    Run {
        /// Run the pass at this time (Unix seconds) instead of now: for tests
        /// only, refused unless the server (or, offline, this command) runs
        /// with BLOCKSEAL_TEST_CLOCK=1.
        #[arg(long, value_name = "UNIX")]
        now: Option<u64>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Arguments of `blockseal serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Serve as the configuration file says. Without it, serve the embedded
    /// default: a store in --data-dir with a generated master key beside it and a
    /// demo volume `demo/disk`, on a Unix socket. For trying blockseal out only.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["data_dir", "unix", "demo_size", "metrics_address", "otlp_endpoint"]
    )]
    pub(crate) config: Option<PathBuf>,

    /// Store directory of the embedded default (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// Unix socket of the embedded default [default: DIR/nbd.sock].
    #[arg(long, value_name = "PATH")]
    pub(crate) unix: Option<PathBuf>,

    /// Size of the demo volume when it is created (e.g. 1G, 512M, bytes).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub(crate) demo_size: Size,

    /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this
    /// address (e.g. 127.0.0.1:9100) with the embedded default; with a
    /// configuration file, `[metrics] address` says it.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) metrics_address: Option<SocketAddr>,

    /// Send tracing spans to this OpenTelemetry collector, OTLP over plain
    /// HTTP with JSON (e.g. http://127.0.0.1:4318), with the embedded
    /// default; with a configuration file, `[tracing] otlp_endpoint` says it.
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_endpoint: Option<Endpoint>,

    /// The configuration file once read: it is read before logging starts,
    /// because its `[tracing]` table decides where spans go.
    #[arg(skip)]
    pub(crate) loaded: Option<Box<Config>>,

    /// Where the master key's passphrase comes from, if its key file has one
    /// (overrides the configuration file).
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,
}

/// The exit codes, shown by `blockseal --help`.
const EXIT_CODES: &str = "\
Admin commands (status, tenant, volume, snapshot, backup, restore, key rotate-*|status|
export-tenant, audit, store backup) talk to the running server through DIR/admin.sock,
and open the store directly when no server runs.

Exit codes:
  0  success
  1  failure (I/O, a damaged store, a broken audit chain, the server failed)
  2  bad usage or a bad argument
  3  no such tenant, volume, snapshot, file or backup key
  4  conflict: exists already, in use, still holds volumes or data, newer snapshots
  5  refused: the caller may not use the admin API; or a backup file, recovery
     bundle or catalogue failed its checks (damaged, edited, spliced, truncated,
     wrong key)";

/// Which store an admin command opens, and with which master key.
#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// Take the store directory, master key file and passphrase source from the
    /// server's configuration file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data_dir", "master_key"])]
    pub(crate) config: Option<PathBuf>,

    /// The store directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub(crate) data_dir: PathBuf,

    /// The master key file [default: DIR/master.key].
    #[arg(long, value_name = "PATH")]
    pub(crate) master_key: Option<PathBuf>,

    /// Where the master key's passphrase comes from, if its key file has one.
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,
}

/// The store directory of the embedded default and of admin commands without one.
pub(crate) const DEFAULT_DATA_DIR: &str = "blockseal-data";

/// `blockseal tenant ...`
#[derive(Debug, Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant with a fresh key (creates the store if the directory
    /// holds none and no server runs).
    Create {
        /// Tenant name: 1 to 63 of a-z 0-9 . _ -, starting with a letter or digit.
        #[arg(value_name = "NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List tenants.
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one tenant.
    Show {
        /// The tenant.
        #[arg(value_name = "NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a tenant that has no volumes (delete them first, or shred it).
    Delete {
        /// The tenant.
        #[arg(value_name = "NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Crypto-shred a tenant: destroy its keys, close its connections, remove
    /// its volumes and their segment files. Irreversible: every byte the tenant
    /// ever stored becomes unreadable, in the store and in every copy of its
    /// segment files (see SECURITY.md for what it cannot reach).
    Shred {
        /// The tenant.
        #[arg(value_name = "NAME")]
        name: String,
        /// Confirms that the tenant's data is to be destroyed for good.
        #[arg(long, required = true)]
        yes_i_understand: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `blockseal volume ...`
#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCommand {
    /// Create a volume with a fresh data key.
    Create {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// Size: bytes, or a number with K, M, G or T (powers of 1024).
        #[arg(long, value_name = "SIZE")]
        size: Size,
        /// Block size (the unit of sealing): a power of two from 512 to 64K.
        #[arg(long, value_name = "N", default_value = "4096")]
        block_size: Size,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List volumes, of one tenant or of all.
    List {
        /// Only this tenant's volumes.
        #[arg(value_name = "TENANT")]
        tenant: Option<String>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one volume, with the space it uses.
    Show {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Change a volume's size, online. Growing always works (clients connected
    /// already see the new size when they reconnect); shrinking is refused
    /// while data lies past the new end, unless --discard-tail.
    Resize {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// The new size: bytes, or a number with K, M, G or T.
        #[arg(long, value_name = "SIZE")]
        size: Size,
        /// When shrinking, discard the data past the new end.
        #[arg(long)]
        discard_tail: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a volume and its data. Refused while clients are connected,
    /// unless --force, which closes their connections first.
    Delete {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// Close the volume's connections first.
        #[arg(long)]
        force: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `blockseal snapshot ...`
#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Take a snapshot of a volume, online: its writes so far are flushed,
    /// then the snapshot shares every block with the volume (no data is
    /// copied). NBD clients may read it as the read-only export
    /// TENANT/VOLUME@NAME.
    Create {
        /// TENANT/VOLUME@NAME; NAME is 1 to 64 of a-z 0-9 . _ -, starting
        /// with a letter or digit.
        #[arg(value_name = "TENANT/VOLUME@NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List a volume's snapshots, oldest first, with the space each holds.
    List {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one snapshot.
    Show {
        /// TENANT/VOLUME@NAME.
        #[arg(value_name = "TENANT/VOLUME@NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a snapshot; the space only it held is freed by compaction.
    /// Refused while clients read its export, unless --force, which closes
    /// their connections first.
    Delete {
        /// TENANT/VOLUME@NAME.
        #[arg(value_name = "TENANT/VOLUME@NAME")]
        name: String,
        /// Close the snapshot export's connections first.
        #[arg(long)]
        force: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Make a volume's contents those of its newest snapshot again (delete
    /// newer snapshots first); the snapshot stays. Refused while clients are
    /// connected to the volume, unless --force, which closes their
    /// connections first: what they cached no longer matches the volume.
    Rollback {
        /// TENANT/VOLUME@NAME.
        #[arg(value_name = "TENANT/VOLUME@NAME")]
        name: String,
        /// Close the volume's connections first.
        #[arg(long)]
        force: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `blockseal key ...`
#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Generate a new master key and write it to a new key file (never overwrites).
    Init(KeyInitArgs),
    /// Show a key file's key id, protection and creation time (never the key).
    Inspect(KeyInspectArgs),
    /// Open a key file as the server would: checks its mode and the passphrase.
    Check(KeyCheckArgs),
    /// Rewrap every tenant's data keys under a new master key, atomically and
    /// online (no data is rewritten, no volume detached). Create the new key
    /// with `blockseal key init` first; afterwards the old key opens nothing,
    /// and the server must be pointed at the new key file before it restarts.
    RotateMaster {
        /// The new master key's file.
        #[arg(long, value_name = "FILE")]
        new_key: PathBuf,
        /// Read the new key file's passphrase from the environment variable VAR.
        #[arg(long, value_name = "VAR")]
        new_key_passphrase_env: Option<String>,
        /// Ask for the new key file's passphrase on the terminal.
        #[arg(long)]
        new_key_passphrase_prompt: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Give a volume a new data key, online: new writes use it at once, and a
    /// background job re-encrypts the blocks older data keys sealed (at the
    /// configured `reencrypt_rate`, slower while the volume is busy), then
    /// destroys the old keys. Resumes after a restart.
    RotateData {
        /// TENANT/VOLUME.
        #[arg(value_name = "TENANT/VOLUME")]
        name: String,
        /// Wait until the re-encryption has finished (a progress bar on a
        /// terminal). With no server running, the re-encryption runs here, at
        /// full speed.
        #[arg(long)]
        wait: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show the data key versions of one volume, or of all, with the blocks
    /// under each and the progress of their re-encryption.
    Status {
        /// TENANT/VOLUME; all volumes without it.
        #[arg(value_name = "TENANT/VOLUME")]
        name: Option<String>,
        /// Wait until the volume's re-encryption has finished (needs
        /// TENANT/VOLUME).
        #[arg(long, requires = "name")]
        wait: bool,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Write a tenant's recovery bundle: its backup keys, sealed under a
    /// passphrase or to this store's master key, for restoring its backups
    /// on another store. Audited. The bundle is a copy of the keys: a
    /// tenant shredded later stays readable through it until it is
    /// destroyed too.
    ExportTenant(KeyExportArgs),
    /// Give a tenant a new key-encryption key (new version, new seed) and
    /// rewrap its data keys under it; no data is rewritten. The old KEK
    /// version unwraps nothing afterwards.
    RotateTenant {
        /// The tenant.
        #[arg(value_name = "TENANT")]
        tenant: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Arguments of `blockseal key export-tenant`.
#[derive(Debug, Args)]
pub(crate) struct KeyExportArgs {
    /// The tenant.
    #[arg(value_name = "TENANT")]
    pub(crate) tenant: String,
    /// Where to write the bundle (mode 0600); it must not exist yet.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
    /// Seal the bundle under the passphrase in FILE (one trailing newline
    /// is dropped). Without this or --to-master-key, the passphrase is asked
    /// for on the terminal.
    #[arg(long, value_name = "FILE", conflicts_with = "to_master_key")]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// Seal the bundle to this store's master key: it opens on any store
    /// that uses the same master key (another host's), and nowhere else.
    #[arg(long)]
    pub(crate) to_master_key: bool,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// Where the keys of backup files come from when they are not this store's
/// own: a tenant recovery bundle.
#[derive(Debug, Args)]
pub(crate) struct BundleArgs {
    /// A tenant recovery bundle (`blockseal key export-tenant`) holding the
    /// backups' keys. One sealed to a master key opens with this store's.
    #[arg(long, value_name = "FILE")]
    pub(crate) bundle: Option<PathBuf>,
    /// The bundle's passphrase, from FILE. Without it, a bundle sealed under
    /// a passphrase asks for it on the terminal.
    #[arg(long, value_name = "FILE", requires = "bundle")]
    pub(crate) passphrase_file: Option<PathBuf>,
}

/// `blockseal backup ...`
#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Write a backup of a snapshot to a file: full, or incremental from an
    /// older snapshot. Without @SNAPSHOT, a snapshot named
    /// backup-YYYYMMDDtHHMMSSz (UTC) is taken first and backed up; it stays,
    /// to be the base of the next incremental backup (delete it when no
    /// longer needed). The file holds ciphertext only; its key stays in the
    /// store (until --expires), so the store, or a recovery bundle of the
    /// tenant, is needed to read it.
    Create {
        /// TENANT/VOLUME@SNAPSHOT, or TENANT/VOLUME to snapshot it now.
        #[arg(value_name = "TENANT/VOLUME[@SNAPSHOT]")]
        name: String,
        /// The file to write (mode 0600; written under a temporary name and
        /// renamed when complete, never overwriting), or - for stdout.
        #[arg(long, value_name = "FILE|-")]
        out: String,
        /// Back up only what changed since this older snapshot (restored on
        /// top of a backup of it).
        #[arg(long, value_name = "SNAPSHOT")]
        incremental_from: Option<String>,
        /// Destroy the backup's key after this long (e.g. 14d, 2w, 36h):
        /// afterwards the file can never be read again, even with the master
        /// key.
        #[arg(long, value_name = "DURATION")]
        expires: Option<crate::time::Period>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Check backup files: their structure and digests, and, with keys (the
    /// store's own by default, or a recovery bundle's), their MACs and every
    /// block's authenticity. Several files must form a chain, oldest first.
    Verify {
        /// The files: a full or incremental backup, then incrementals in
        /// order.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Check structure and digests only, with no keys: needs no store
        /// (and does not prove the files were not edited).
        #[arg(long, conflicts_with_all = ["bundle", "passphrase_file"])]
        structure_only: bool,
        /// Keys from a recovery bundle.
        #[command(flatten)]
        bundle: BundleArgs,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the backup keys the store holds: one per backup file that it can
    /// still read.
    Keys {
        /// Only this tenant's.
        #[arg(value_name = "TENANT")]
        tenant: Option<String>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Restore drill: find the backup files under DIR, restore the newest
    /// chain of every volume into a scratch store (checking every block and
    /// MAC with this store's keys), then remove it. Exit code 5 when any
    /// volume fails.
    Drill {
        /// The directory of backup files (searched recursively).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Arguments of `blockseal restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The chain: a full backup, then incrementals in order.
    #[arg(value_name = "FILE", required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// The new volume (its tenant is created if missing); refused if it
    /// exists.
    #[arg(long = "as", value_name = "TENANT/VOLUME")]
    pub(crate) target: String,
    /// Keys from a recovery bundle (restoring on another store).
    #[command(flatten)]
    pub(crate) bundle: BundleArgs,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Output format.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// Arguments of `blockseal key init`.
#[derive(Debug, Args)]
pub(crate) struct KeyInitArgs {
    /// Where to write the key file; it must not exist yet.
    #[arg(long, value_name = "PATH")]
    pub(crate) out: PathBuf,

    /// Where the passphrase comes from; without one the key is stored in the clear
    /// and only the file mode (0600) protects it.
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,

    /// Argon2id memory cost in KiB (needs a passphrase).
    #[arg(long, value_name = "KIB", requires = "passphrase",
          default_value_t = Argon2Params::DEFAULT.memory_kib())]
    pub(crate) argon2_memory_kib: u32,

    /// Argon2id passes over memory (needs a passphrase).
    #[arg(long, value_name = "N", requires = "passphrase",
          default_value_t = Argon2Params::DEFAULT.iterations())]
    pub(crate) argon2_iterations: u32,

    /// Argon2id lanes (needs a passphrase).
    #[arg(long, value_name = "N", requires = "passphrase",
          default_value_t = Argon2Params::DEFAULT.parallelism())]
    pub(crate) argon2_parallelism: u32,
}

/// Arguments of `blockseal key inspect`.
#[derive(Debug, Args)]
pub(crate) struct KeyInspectArgs {
    /// The key file.
    #[arg(value_name = "PATH")]
    pub(crate) path: PathBuf,
}

/// Arguments of `blockseal key check`.
#[derive(Debug, Args)]
pub(crate) struct KeyCheckArgs {
    /// The key file.
    #[arg(value_name = "PATH")]
    pub(crate) path: PathBuf,

    /// Where the passphrase comes from, if the file is protected by one.
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
