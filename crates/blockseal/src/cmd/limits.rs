//! `blockseal limits show|set`: I/O rate limits, through the running server's
//! admin socket (a change applies at once to its connections) or on the store
//! directly, with the `[limits]` defaults of `--config`.

use std::io::Write;

use anyhow::bail;

use crate::admin::api::{Op, Reply};
use crate::admin::{self, Settings};
use crate::cli::{LimitsCommand, OutputArgs, StoreArgs};
use crate::config::Config;
use crate::iolimits::{LimitsView, Setting, TargetView};
use crate::open::{IfMissing, StoreLocation};
use crate::size::Size;

/// Runs a `blockseal limits` subcommand.
pub(crate) fn run(command: LimitsCommand) -> anyhow::Result<()> {
    match command {
        LimitsCommand::Show { store, output } => execute(&store, Op::ShowLimits, &output),
        LimitsCommand::Set {
            target,
            iops,
            bandwidth,
            store,
            output,
        } => {
            if iops.is_none() && bandwidth.is_none() {
                bail!("nothing to change: give --iops, --bandwidth or both");
            }
            let (tenant, volume) = match target.split_once('/') {
                Some((t, v)) => (t.to_owned(), Some(v.to_owned())),
                None => (target.clone(), None),
            };
            let op = Op::SetLimits {
                tenant,
                volume,
                iops: iops.map(|r| r.0),
                bytes_per_sec: bandwidth.map(|b| b.0),
            };
            execute(&store, op, &output)
        }
    }
}

fn execute(store: &StoreArgs, op: Op, output: &OutputArgs) -> anyhow::Result<()> {
    let location = StoreLocation::from_args(store)?;
    let io_defaults = match &store.config {
        Some(path) => Some(Config::load(path)?.limits.io_defaults()),
        None => None,
    };
    let settings = Settings {
        retention: None,
        io_defaults,
    };
    let (reply, _mode) = admin::execute_with(&location, &op, IfMissing::Fail, settings)?;
    let mut out = std::io::stdout().lock();
    if output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else if let Reply::Limits(view) = &reply {
        write!(out, "{}", render(view))?;
    }
    out.flush()?;
    Ok(())
}

/// The human-readable form of the limits.
pub(crate) fn render(view: &LimitsView) -> String {
    let mut out = String::new();
    if view.defaults_known {
        out += &format!("{:<24} {:>12} {:>14}\n", "DEFAULT", "IOPS", "BYTES/S");
        for (name, rate) in [
            ("each tenant", view.default_tenant),
            ("each volume", view.default_volume),
        ] {
            out += &format!(
                "{name:<24} {:>12} {:>14}\n",
                iops(rate.iops),
                bytes(rate.bytes_per_sec)
            );
        }
    } else {
        out += "defaults: unknown (no server runs and no --config was given; they are \
                [limits] in the server's configuration)\n";
    }
    if view.tenants.is_empty() && view.volumes.is_empty() {
        out += "no tenant or volume has limits of its own\n";
        return out;
    }
    out += &format!("\n{:<24} {:>22} {:>22}\n", "OVERRIDE", "IOPS", "BYTES/S");
    for target in view.tenants.iter().chain(&view.volumes) {
        out += &row(target);
    }
    out
}

fn row(target: &TargetView) -> String {
    let Setting {
        iops: set_iops,
        bytes_per_sec: set_bytes,
    } = target.set;
    let how = |set: Option<u64>| if set.is_some() { "set" } else { "default" };
    format!(
        "{:<24} {:>22} {:>22}\n",
        target.target,
        format!("{} ({})", iops(target.iops), how(set_iops)),
        format!("{} ({})", bytes(target.bytes_per_sec), how(set_bytes)),
    )
}

fn iops(rate: Option<u64>) -> String {
    rate.map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
}

fn bytes(rate: Option<u64>) -> String {
    rate.map_or_else(|| "unlimited".to_owned(), |n| Size(n).to_string())
}
