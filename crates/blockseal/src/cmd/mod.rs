//! Subcommand implementations, one module per top-level subcommand.
//!
//! To add a subcommand: a variant in `cli::Command`, a sibling module here with a
//! `run` function, and one arm in [`run`].

mod admin;
mod backup;
mod key;
mod retention;
mod serve;
mod store;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Status(args) => admin::status(args),
        Command::Tenant(command) => admin::tenant(command),
        Command::Volume(command) => admin::volume(command),
        Command::Snapshot(command) => admin::snapshot(command),
        Command::Key(command) => key::run(command),
        Command::Backup(command) => backup::run(command),
        Command::Restore(args) => backup::restore(args),
        Command::Audit(args) => admin::audit(args),
        Command::Store(command) => admin::store(command),
        Command::Retention(command) => retention::run(command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "blockseal", &mut std::io::stdout());
            Ok(())
        }
    }
}
