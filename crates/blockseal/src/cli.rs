//! Command-line definitions (clap derive). Each subcommand group is one variant of
//! [`Command`] with its own arguments enum; `cmd` dispatches on them.

use std::path::PathBuf;

use blockseal_keys::Argon2Params;
use clap::{Args, Parser, Subcommand};

use crate::passphrase::PassphraseArgs;

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
    /// Create and inspect master key files.
    #[command(subcommand)]
    Key(KeyCommand),
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
