//! The `blockseal` binary: the block storage server and its admin CLI.
//!
//! `main` forbids core dumps, installs the log subscriber, parses the command line
//! and reports errors; each subcommand lives in its own module under `cmd`.
#![forbid(unsafe_code)]

mod admin;
mod cli;
mod cmd;
mod config;
mod exports;
mod hardening;
mod iolimits;
mod metrics;
mod notify;
mod open;
mod outfile;
mod passphrase;
mod retention;
mod size;
#[cfg(test)]
mod testing;
mod time;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The environment variable holding the log filter (`tracing_subscriber` syntax).
const LOG_ENV: &str = "BLOCKSEAL_LOG";

fn main() -> ExitCode {
    // First, before any key is read: secrets must never reach a core file.
    let hardened = hardening::forbid_core_dumps();
    hardening::private_umask();
    let cli = cli::Cli::parse();
    init_logging(match cli.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    });
    if let Err(e) = hardened {
        tracing::warn!("{e}; a crash could leave key material in a core file");
    }
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            // An admin API error picks its documented exit code.
            match err.downcast_ref::<admin::api::ApiError>() {
                Some(api) => ExitCode::from(api.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs to stderr, filtered by `BLOCKSEAL_LOG` (default `default_level`). Log
/// lines never hold key material or data.
fn init_logging(default_level: &str) {
    let spec = std::env::var(LOG_ENV).unwrap_or_else(|_| default_level.to_owned());
    let filter = EnvFilter::try_new(quiet_client_quirks(&spec))
        .unwrap_or_else(|_| EnvFilter::new(quiet_client_quirks(default_level)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `spec` with rustls's warnings about a client's SNI extension turned off
/// (unless `spec` says something about rustls itself): libnbd and other
/// clients connecting to an IP address send it as the server name, which
/// rustls ignores with a WARN on every connection, a line operators would
/// only learn to skip.
fn quiet_client_quirks(spec: &str) -> String {
    if spec.contains("rustls") {
        spec.to_owned()
    } else {
        format!("{spec},rustls::msgs::handshake=error")
    }
}
