//! The `blockseal` binary: the block storage server and its admin CLI.
//!
//! `main` only parses the command line and reports errors; each subcommand lives
//! in its own module under `cmd`.
#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod passphrase;
mod time;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
