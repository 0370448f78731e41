//! Subcommand implementations, one module per top-level subcommand.
//!
//! To add a subcommand: a variant in `cli::Command`, a sibling module here with a
//! `run` function, and one arm in [`run`].

mod admin;
mod backup;
mod cluster;
mod key;
mod limits;
mod retention;
mod serve;
mod store;

use crate::cli::{Cli, Command};
use crate::otlp;

/// Where `serve` sends tracing spans, if anywhere; read before logging
/// starts (it reads the configuration file, see [`serve::tracing_settings`]).
/// `None` for every other command.
pub(crate) fn tracing_settings(cli: &mut Cli) -> anyhow::Result<Option<otlp::Settings>> {
    match &mut cli.command {
        Command::Serve(args) => serve::tracing_settings(args),
        _ => Ok(None),
    }
}

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
        Command::Limits(command) => limits::run(command),
        Command::Cluster(command) => cluster::run(command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "blockseal", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { out } => manpages(&out),
    }
}

/// Writes `blockseal.1` and a page per subcommand (`blockseal-tenant-create.1`
/// and so on) into `dir`; prints how many.
fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut command = Cli::command();
    command.build();
    let mut written = 0usize;
    write_pages(&command, "blockseal", dir, &mut written)?;
    println!("wrote {written} manual pages to {}", dir.display());
    Ok(())
}

/// The page of `command` (named `name`), then its subcommands' pages.
fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    written: &mut usize,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let page = command.clone().display_name(name.to_owned());
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut bytes)
        .with_context(|| format!("cannot render the manual page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    *written += 1;
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" || sub.is_hide_set() {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
