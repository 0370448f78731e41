//! The `blockseal` binary: the block storage server and its admin CLI.
//!
//! `main` forbids core dumps, parses the command line, installs the log
//! subscriber (for `serve`, with the OTLP exporter when configured: see
//! `otlp`), runs the command, flushes the exporter and reports errors; each
//! subcommand lives in its own module under `cmd`.
#![forbid(unsafe_code)]

mod admin;
mod cli;
mod cluster;
mod cmd;
mod config;
mod exports;
mod hardening;
mod iolimits;
mod metrics;
mod notify;
mod open;
mod otlp;
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
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable holding the log filter (`tracing_subscriber` syntax).
const LOG_ENV: &str = "BLOCKSEAL_LOG";

fn main() -> ExitCode {
    // First, before any key is read: secrets must never reach a core file.
    let hardened = hardening::forbid_core_dumps();
    hardening::private_umask();
    let mut cli = cli::Cli::parse();
    let default_level = match cli.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    // Read before anything is logged: it decides where spans go.
    let exporter = match cmd::tracing_settings(&mut cli)
        .and_then(|settings| init_logging(default_level, settings))
    {
        Ok(exporter) => exporter,
        Err(err) => return failed(err),
    };
    if let Err(e) = hardened {
        tracing::warn!("{e}; a crash could leave key material in a core file");
    }
    let result = cmd::run(cli);
    // Every span has ended: the server's connections, operations and jobs
    // are over. Send what is queued (bounded).
    if let Some(exporter) = exporter {
        exporter.shutdown(otlp::FLUSH_TIMEOUT);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => failed(err),
    }
}

/// Reports `err` on stderr; the exit code it calls for.
fn failed(err: anyhow::Error) -> ExitCode {
    // `{:#}` prints the whole cause chain on one line, without a backtrace.
    eprintln!("error: {err:#}");
    // An admin API error picks its documented exit code.
    match err.downcast_ref::<admin::api::ApiError>() {
        Some(api) => ExitCode::from(api.exit_code()),
        None => ExitCode::FAILURE,
    }
}

/// Logs to stderr, filtered by `BLOCKSEAL_LOG` (default `default_level`), and
/// with `otlp` sends spans to an OpenTelemetry collector, chosen by its own
/// filter; returns the exporter to flush at exit. Log lines and spans never
/// hold key material or data.
fn init_logging(
    default_level: &str,
    otlp: Option<otlp::Settings>,
) -> anyhow::Result<Option<otlp::Exporter>> {
    let spec = std::env::var(LOG_ENV).unwrap_or_else(|_| default_level.to_owned());
    let filter = EnvFilter::try_new(quiet_client_quirks(&spec))
        .unwrap_or_else(|_| EnvFilter::new(quiet_client_quirks(default_level)));
    let Some(settings) = otlp else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
        return Ok(None);
    };
    // Each layer with a filter of its own: the log's level does not decide
    // which spans the collector gets, nor the other way round.
    let endpoint = settings.endpoint.to_string();
    let (service_name, sample_ratio) = (settings.service_name.clone(), settings.sample_ratio);
    let (layer, spans, exporter) = otlp::start(settings)
        .map_err(|e| anyhow::anyhow!("cannot start the OTLP exporter: {e}"))?;
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(log)
        .with(layer.with_filter(spans))
        .init();
    tracing::info!(
        endpoint,
        service_name,
        sample_ratio,
        "sending tracing spans over OTLP/HTTP"
    );
    Ok(Some(exporter))
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
