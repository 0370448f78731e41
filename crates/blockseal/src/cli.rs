//! Command-line definitions (clap derive). Each subcommand group is one variant of
//! [`Command`] with its own arguments enum; `cmd` dispatches on them.

use std::path::PathBuf;

use blockseal_keys::Argon2Params;
use clap::{Args, Parser, Subcommand};

use crate::passphrase::PassphraseArgs;
use crate::size::Size;

/// Per-tenant encrypted block storage: NBD server and administration.
#[derive(Debug, Parser)]
#[command(name = "blockseal", version, about, propagate_version = true)]
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
    /// Create and list tenants (opens the store directly; no server may run).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Create and list volumes (opens the store directly; no server may run).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create and inspect master key files.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Store maintenance (opens the store directly; no server may run).
    #[command(subcommand)]
    Store(StoreCommand),
}

/// `blockseal store ...`
#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
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

/// Arguments of `blockseal serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Serve as the configuration file says. Without it, serve the embedded
    /// default: a store in --data-dir with a generated master key beside it and a
    /// demo volume `demo/disk`, on a Unix socket. For trying blockseal out only.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data_dir", "unix", "demo_size"])]
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

    /// Where the master key's passphrase comes from, if its key file has one
    /// (overrides the configuration file).
    #[command(flatten)]
    pub(crate) passphrase: PassphraseArgs,
}

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
    /// Create a tenant with a fresh key (creates the store if the directory holds none).
    Create {
        /// Tenant name: 1 to 63 of a-z 0-9 . _ -, starting with a letter or digit.
        #[arg(value_name = "NAME")]
        name: String,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tenants.
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
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
    },
    /// List volumes, of one tenant or of all.
    List {
        /// Only this tenant's volumes.
        #[arg(value_name = "TENANT")]
        tenant: Option<String>,
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
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
