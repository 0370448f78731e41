//! `blockseal retention status|run`: through the running server's admin
//! socket, or on the store opened directly, with the `[retention]` settings
//! of `--config` (a server uses its own).

use std::io::Write;
use std::sync::Arc;

use anyhow::bail;

use crate::admin::api::{Op, Reply};
use crate::admin::{self, Mode};
use crate::cli::{OutputArgs, RetentionCommand, StoreArgs};
use crate::config::Config;
use crate::open::{IfMissing, StoreLocation};
use crate::retention::{Retention, RetentionView, RunView};

/// Runs a `blockseal retention` subcommand.
pub(crate) fn run(command: RetentionCommand) -> anyhow::Result<()> {
    match command {
        RetentionCommand::Status { store, output } => {
            execute(&store, Op::RetentionStatus, &output).map(|_| ())
        }
        RetentionCommand::Run { now, store, output } => {
            let reply = execute(&store, Op::RetentionRun { now }, &output)?;
            if let Reply::RetentionRun(run) = reply
                && run.failed > 0
            {
                bail!(
                    "{} retention action(s) failed (the next pass tries them again)",
                    run.failed
                );
            }
            Ok(())
        }
    }
}

fn execute(store: &StoreArgs, op: Op, output: &OutputArgs) -> anyhow::Result<Reply> {
    let location = StoreLocation::from_args(store)?;
    let retention = match &store.config {
        Some(path) => Config::load(path)?
            .retention
            .map(|c| Arc::new(Retention::new(c, Retention::test_clock_from_env()))),
        None => None,
    };
    let settings = admin::Settings {
        retention,
        io_defaults: None,
    };
    let (reply, mode) = admin::execute_with(&location, &op, IfMissing::Fail, settings)?;
    let mut out = std::io::stdout().lock();
    if output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else {
        if let Reply::Retention(view) = &reply
            && !view.configured
            && mode == Mode::Offline
            && store.config.is_none()
        {
            writeln!(
                out,
                "no server runs and no --config was given: retention's settings are in the \
                 server's configuration file (give it with --config)"
            )?;
            return Ok(reply);
        }
        write!(out, "{}", render(&reply))?;
    }
    out.flush()?;
    Ok(reply)
}

/// The human-readable form of a retention reply.
pub(crate) fn render(reply: &Reply) -> String {
    match reply {
        Reply::Retention(view) => render_status(view),
        Reply::RetentionRun(run) => render_run(run),
        _ => String::new(),
    }
}

fn render_status(v: &RetentionView) -> String {
    let Some(s) = &v.settings else {
        return "retention is not configured (no [retention] table in the configuration file)\n"
            .to_owned();
    };
    let mut out = format!(
        "retention {} (clock: {}), now {}\n",
        if v.enabled {
            "enabled"
        } else {
            "DISABLED: nothing below happens"
        },
        v.clock,
        v.now
    );
    out += &format!(
        "snapshots every {}, kept {}; ",
        s.snapshot_every, s.snapshot_keep
    );
    out += &match &s.backup_dir {
        Some(dir) => format!(
            "backups every {} to {}, kept at least {} (a full one every {}); ",
            s.backup_every, dir, s.backup_keep, s.full_every
        ),
        None => "no backups (no backup_dir); ".to_owned(),
    };
    out += &if s.data_tenants.is_empty() {
        "no tenant's data is aged out\n".to_owned()
    } else {
        format!(
            "data kept {} for {}\n",
            s.data_max_age,
            s.data_tenants.join(", ")
        )
    };
    for problem in &v.problems {
        out += &format!("problem: {problem}\n");
    }
    for vol in &v.volumes {
        out += &format!("\n{}/{}\n", vol.tenant, vol.volume);
        out += &format!("  next snapshot   {}\n", vol.next_snapshot);
        for snap in &vol.snapshots {
            out += &format!(
                "  snapshot        {} (expires {})\n",
                snap.name, snap.expires
            );
        }
        if let Some(b) = &vol.next_backup {
            out += &format!("  next backup     {}, {}", b.at, b.kind);
            if let Some(base) = &b.base {
                out += &format!(" from {base}");
            }
            out += "\n";
        }
        for file in &vol.backups {
            out += &format!(
                "  backup          {} (expires {})\n",
                file.file, file.expires
            );
        }
        if let Some(d) = &vol.data {
            out += &format!(
                "  next age mark   {}: data written before {} is discarded then\n",
                d.next_age_mark, d.discards_written_before
            );
        }
    }
    out
}

fn render_run(run: &RunView) -> String {
    let mut out = format!(
        "retention pass at {}: {} action(s), {} failed\n",
        run.now,
        run.actions.len(),
        run.failed
    );
    for a in &run.actions {
        out += &format!("  {:<30} {:<50} {}", a.action, a.target, a.result);
        if !a.detail.is_empty() {
            out += &format!(" ({})", a.detail);
        }
        out += "\n";
    }
    out
}
