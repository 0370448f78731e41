//! `blockseal status|tenant|volume|snapshot|audit` and `blockseal key rotate-*`: admin
//! operations through the running server's admin socket, or on the store opened
//! directly when no server runs (`admin::execute`), printed as tables or, with
//! `--json`, as the API's JSON reply.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use crate::admin::api::{
    AUDIT_PAGE, ApiError, AuditVerifyView, AuditView, DataKeyView, Op, Reply, SnapshotView,
    TenantView, VolumeView,
};
use crate::admin::{self, Mode};
use crate::cli::{
    AuditArgs, AuditCommand, OutputArgs, SnapshotCommand, StatusArgs, StoreArgs, StoreCommand,
    TenantCommand, VolumeCommand,
};
use crate::config::parse_export_name;
use crate::open::{IfMissing, StoreLocation};
use crate::passphrase::{Confirm, PassphraseArgs};
use crate::size::Size;

/// Runs `blockseal status`.
pub(crate) fn status(args: StatusArgs) -> anyhow::Result<()> {
    run(&args.store, Op::Status, IfMissing::Fail, &args.output)
}

/// Runs a `blockseal tenant` subcommand.
pub(crate) fn tenant(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create {
            name,
            store,
            output,
        } => run(
            &store,
            Op::CreateTenant {
                tenant: tenant_name(&name)?,
            },
            IfMissing::Create,
            &output,
        ),
        TenantCommand::List { store, output } => {
            run(&store, Op::ListTenants, IfMissing::Fail, &output)
        }
        TenantCommand::Show {
            name,
            store,
            output,
        } => run(
            &store,
            Op::ShowTenant { tenant: name },
            IfMissing::Fail,
            &output,
        ),
        TenantCommand::Delete {
            name,
            store,
            output,
        } => run(
            &store,
            Op::DeleteTenant {
                tenant: tenant_name(&name)?,
            },
            IfMissing::Fail,
            &output,
        ),
        TenantCommand::Shred {
            name,
            yes_i_understand,
            store,
            output,
        } => {
            if !yes_i_understand {
                bail!("shredding needs --yes-i-understand");
            }
            run(
                &store,
                Op::ShredTenant { tenant: name },
                IfMissing::Fail,
                &output,
            )
        }
    }
}

/// Runs a `blockseal volume` subcommand.
pub(crate) fn volume(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            block_size,
            store,
            output,
        } => {
            let (tenant, volume) = split(&name)?;
            let block_size = u32::try_from(block_size.0).unwrap_or(u32::MAX);
            let op = Op::CreateVolume {
                tenant,
                volume,
                size: size.0,
                block_size,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
        VolumeCommand::List {
            tenant,
            store,
            output,
        } => {
            let tenant = tenant.as_deref().map(tenant_name).transpose()?;
            run(&store, Op::ListVolumes { tenant }, IfMissing::Fail, &output)
        }
        VolumeCommand::Show {
            name,
            store,
            output,
        } => {
            let (tenant, volume) = split(&name)?;
            run(
                &store,
                Op::ShowVolume { tenant, volume },
                IfMissing::Fail,
                &output,
            )
        }
        VolumeCommand::Resize {
            name,
            size,
            discard_tail,
            store,
            output,
        } => {
            let (tenant, volume) = split(&name)?;
            let op = Op::ResizeVolume {
                tenant,
                volume,
                size: size.0,
                discard_tail,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
        VolumeCommand::Delete {
            name,
            force,
            store,
            output,
        } => {
            let (tenant, volume) = split(&name)?;
            let op = Op::DeleteVolume {
                tenant,
                volume,
                force,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
    }
}

/// Runs a `blockseal snapshot` subcommand.
pub(crate) fn snapshot(command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create {
            name,
            store,
            output,
        } => {
            let (tenant, volume, snapshot) = split_snapshot(&name)?;
            let op = Op::CreateSnapshot {
                tenant,
                volume,
                snapshot,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
        SnapshotCommand::List {
            name,
            store,
            output,
        } => {
            if name.contains('@') {
                return Err(usage(format!(
                    "{name:?} names a snapshot; `snapshot list` takes TENANT/VOLUME"
                )));
            }
            let (tenant, volume) = split(&name)?;
            run(
                &store,
                Op::ListSnapshots { tenant, volume },
                IfMissing::Fail,
                &output,
            )
        }
        SnapshotCommand::Show {
            name,
            store,
            output,
        } => {
            let (tenant, volume, snapshot) = split_snapshot(&name)?;
            let op = Op::ShowSnapshot {
                tenant,
                volume,
                snapshot,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
        SnapshotCommand::Delete {
            name,
            force,
            store,
            output,
        } => {
            let (tenant, volume, snapshot) = split_snapshot(&name)?;
            let op = Op::DeleteSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
        SnapshotCommand::Rollback {
            name,
            force,
            store,
            output,
        } => {
            let (tenant, volume, snapshot) = split_snapshot(&name)?;
            let op = Op::RollbackSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            };
            run(&store, op, IfMissing::Fail, &output)
        }
    }
}

/// Runs `blockseal audit [verify]`.
pub(crate) fn audit(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        Some(AuditCommand::Verify { store, output }) => {
            let reply = run_quiet(&store, Op::VerifyAudit, IfMissing::Fail, &output)?;
            if let Reply::AuditVerified(v) = reply
                && v.first_bad.is_some()
            {
                // The report is printed; the exit code says it failed.
                bail!(
                    "the audit log's chain is broken at entry {}",
                    v.first_bad.unwrap_or_default()
                );
            }
            Ok(())
        }
        None => {
            let since_time = args.since.as_deref().map(parse_since).transpose()?;
            let location = StoreLocation::from_args(&args.store)?;
            // Page by page (the API returns at most a page per request), up
            // to --limit entries or to the end of the log.
            let mut entries = Vec::new();
            let mut since_seq = args.since_seq;
            let (mut mode, mut op);
            loop {
                let wanted = args.limit.map(|l| l - entries.len() as u64);
                let page = wanted.unwrap_or(AUDIT_PAGE).min(AUDIT_PAGE);
                op = Op::Audit {
                    since_seq,
                    since_time,
                    limit: Some(page),
                };
                let (reply, how) = admin::execute(&location, &op, IfMissing::Fail)?;
                mode = how;
                let Reply::Audit(got) = reply else {
                    bail!("unexpected reply to an audit request");
                };
                let full = got.len() as u64 == page;
                since_seq = got.last().map_or(since_seq, |e| e.seq + 1);
                entries.extend(got);
                if !full || args.limit.is_some_and(|l| entries.len() as u64 >= l) {
                    break;
                }
            }
            let reply = Reply::Audit(entries);
            let mut out = std::io::stdout().lock();
            if args.output.json {
                out.write_all(&reply.to_json())?;
                writeln!(out)?;
            } else {
                let text = render(&op, &reply, mode, &location, Style::for_stdout());
                write!(out, "{text}")?;
            }
            Ok(())
        }
    }
}

/// Runs `blockseal key rotate-master`.
pub(crate) fn rotate_master(
    new_key: &std::path::Path,
    passphrase_env: Option<String>,
    passphrase_prompt: bool,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    // The server resolves the path from its own directory: send it absolute.
    let key_file = std::path::absolute(new_key)
        .with_context(|| format!("cannot resolve {}", new_key.display()))?;
    if key_file.symlink_metadata().is_err() {
        bail!(
            "no key file at {}; create the new master key with `blockseal key init --out {}`",
            key_file.display(),
            key_file.display()
        );
    }
    let source = PassphraseArgs {
        passphrase_env,
        passphrase_fd: None,
        passphrase_prompt,
    };
    let passphrase = source
        .read(&key_file.display().to_string(), Confirm::Once)?
        .map(|p| Zeroizing::new(p.expose_secret().to_owned()));
    let op = Op::RotateMaster {
        key_file: key_file.display().to_string(),
        passphrase,
    };
    run(store, op, IfMissing::Fail, output)
}

/// Runs `blockseal key rotate-tenant`.
pub(crate) fn rotate_tenant(
    tenant: String,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    run(
        store,
        Op::RotateTenantKey {
            tenant: tenant_name(&tenant)?,
        },
        IfMissing::Fail,
        output,
    )
}

/// Runs `blockseal key rotate-data`.
pub(crate) fn rotate_data(
    name: &str,
    wait: bool,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let (tenant, volume) = split(name)?;
    let op = Op::RotateDataKey {
        tenant: tenant.clone(),
        volume: volume.clone(),
    };
    if !wait {
        return run(store, op, IfMissing::Fail, output);
    }
    let location = StoreLocation::from_args(store)?;
    let (reply, mode) = admin::execute(&location, &op, IfMissing::Fail)?;
    if !output.json {
        print!(
            "{}",
            render(&op, &reply, mode, &location, Style::for_stdout())
        );
    }
    wait_for_reencryption(&location, tenant, volume, output)
}

/// Runs `blockseal key status`.
pub(crate) fn key_status(
    name: Option<&str>,
    wait: bool,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let Some(name) = name else {
        return run(store, Op::DataKeyStatusAll, IfMissing::Fail, output);
    };
    let (tenant, volume) = split(name)?;
    if wait {
        let location = StoreLocation::from_args(store)?;
        return wait_for_reencryption(&location, tenant, volume, output);
    }
    run(
        store,
        Op::DataKeyStatus { tenant, volume },
        IfMissing::Fail,
        output,
    )
}

/// Waits until a volume's re-encryption job is gone, drawing a progress bar
/// on a terminal, then prints the volume's data keys. Through a server the
/// job runs there and is polled; with no server it runs here.
fn wait_for_reencryption(
    location: &StoreLocation,
    tenant: String,
    volume: String,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let status_op = Op::DataKeyStatus {
        tenant: tenant.clone(),
        volume: volume.clone(),
    };
    let bar = progress_bar(&format!("{tenant}/{volume}"));
    let (mut reply, mode) = admin::execute(location, &status_op, IfMissing::Fail)?;
    if mode == Mode::Offline {
        // No server: nothing works on the job unless this command does.
        let op = Op::Reencrypt { tenant, volume };
        bar.set_message("re-encrypting (no server running: at full speed)");
        reply = admin::execute(location, &op, IfMissing::Fail)?.0;
    } else {
        // The job runs in the server: ask it, and only it, until it is done.
        // (Opening the store here if the server went away would take its lock
        // from a server restarting, and nothing would run the job.)
        let socket = admin::socket_path(&location.dir);
        loop {
            let Reply::DataKeys(keys) = &reply else {
                bail!("unexpected reply to a key status request");
            };
            let Some(job) = &keys.job else { break };
            let total = job.blocks_done + job.blocks_remaining;
            bar.set_length(total.max(1));
            bar.set_position(job.blocks_done);
            std::thread::sleep(std::time::Duration::from_millis(250));
            reply = match admin::client::call(&socket, &status_op) {
                Ok(reply) => reply,
                Err(admin::client::CallError::Api(e)) => return Err(e.into()),
                Err(admin::client::CallError::NoServer) => bail!(
                    "the server stopped while re-encryption was under way; the job resumes \
                     when it starts again (`blockseal key status --wait` follows it)"
                ),
                Err(admin::client::CallError::Transport(e)) => return Err(e),
            };
        }
    }
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else {
        write!(
            out,
            "{}",
            render(&status_op, &reply, mode, location, Style::for_stdout())
        )?;
    }
    Ok(())
}

/// A progress bar on a terminal (stderr), hidden otherwise.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} blocks re-encrypted ({eta}) {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// Runs `op` and prints its reply.
fn run(
    store: &StoreArgs,
    op: Op,
    if_missing: IfMissing,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    run_quiet(store, op, if_missing, output).map(|_| ())
}

/// Runs `op`, prints its reply and returns it.
fn run_quiet(
    store: &StoreArgs,
    op: Op,
    if_missing: IfMissing,
    output: &OutputArgs,
) -> anyhow::Result<Reply> {
    let location = StoreLocation::from_args(store)?;
    let (reply, mode) = admin::execute(&location, &op, if_missing)?;
    let mut out = std::io::stdout().lock();
    if output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else {
        let style = Style::for_stdout();
        write!(out, "{}", render(&op, &reply, mode, &location, style))?;
    }
    out.flush()?;
    Ok(reply)
}

/// A tenant name, checked here so that only a valid name ever reaches a
/// request path; a bad one is a usage error (exit code 2), as it is offline.
pub(super) fn tenant_name(name: &str) -> anyhow::Result<String> {
    let tenant = blockseal_keys::TenantId::new(name).map_err(|e| {
        ApiError::new(
            hyper::StatusCode::BAD_REQUEST,
            "invalid_name",
            e.to_string(),
        )
    })?;
    Ok(tenant.to_string())
}

/// `TENANT/VOLUME`; a malformed name is a usage error (exit code 2).
pub(super) fn split(name: &str) -> anyhow::Result<(String, String)> {
    let (tenant, volume) = parse_export_name(name).map_err(|e| usage(format!("{e:#}")))?;
    Ok((tenant.to_string(), volume.to_string()))
}

/// `TENANT/VOLUME@NAME`; a malformed one is a usage error (exit code 2).
pub(super) fn split_snapshot(name: &str) -> anyhow::Result<(String, String, String)> {
    let Some((volume_name, snapshot)) = name.split_once('@') else {
        return Err(usage(format!(
            "{name:?} names no snapshot: a snapshot is TENANT/VOLUME@NAME"
        )));
    };
    if !volume_name.contains('/') {
        return Err(usage(format!(
            "{name:?} names no volume: a snapshot is TENANT/VOLUME@NAME"
        )));
    }
    let (tenant, volume) = split(volume_name)?;
    blockseal_volume::check_snapshot_name(snapshot).map_err(|e| usage(e.to_string()))?;
    Ok((tenant, volume, snapshot.to_owned()))
}

/// A usage error (exit code 2), as the API's `400 invalid_name` would be.
pub(super) fn usage(message: String) -> anyhow::Error {
    ApiError::new(hyper::StatusCode::BAD_REQUEST, "invalid_name", message).into()
}

/// `--since`: Unix seconds, or a duration back from now (`30m`, `12h`, `7d`).
fn parse_since(text: &str) -> anyhow::Result<u64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let amount: u64 = digits.parse().ok().with_context(|| {
        format!("--since {text:?}: expected Unix seconds or a duration such as 30m, 12h, 7d")
    })?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--since {text:?}: the unit must be s, m, h or d"),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(now.saturating_sub(amount.saturating_mul(scale)))
}

/// Whether to colour: only on a terminal, and never with `NO_COLOR` set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    colour: bool,
}

impl Style {
    pub(super) fn for_stdout() -> Style {
        Style {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    pub(super) fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    pub(super) fn good(self, text: &str) -> String {
        self.paint("32", text)
    }

    pub(super) fn bad(self, text: &str) -> String {
        self.paint("31;1", text)
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The human-readable form of a reply.
pub(crate) fn render(
    op: &Op,
    reply: &Reply,
    mode: Mode,
    location: &StoreLocation,
    style: Style,
) -> String {
    let mut out = String::new();
    match reply {
        Reply::Status(s) => {
            out += &format!("{} {}\n", style.bold("store"), s.store);
            out += &format!("mode          {}\n", s.mode);
            out += &format!("version       {}\n", s.version);
            out += &format!("backend       {}\n", s.backend);
            out += &format!("master key    {}\n", s.master_key_id);
            out += &format!("tenants       {}\n", s.tenants);
            out += &format!("volumes       {}\n", s.volumes);
        }
        Reply::Tenants(tenants) => out += &tenant_table(tenants, style),
        Reply::Tenant(t) => match op {
            Op::CreateTenant { .. } => {
                out += &format!(
                    "created tenant {} (KEK version {})\n",
                    t.name, t.kek_version
                );
            }
            Op::RotateTenantKey { .. } => {
                out += &format!(
                    "tenant {} now uses KEK version {}; its data keys are rewrapped, no data \
                         was rewritten\n",
                    t.name, t.kek_version
                );
            }
            _ => out += &tenant_table(std::slice::from_ref(t), style),
        },
        Reply::Volumes(volumes) => out += &volume_table(volumes, style),
        Reply::Volume(v) => match op {
            Op::CreateVolume { .. } => {
                out += &format!(
                    "created volume {}/{}: {} ({} bytes), {}-byte blocks\n",
                    v.tenant,
                    v.name,
                    Size(v.size),
                    v.size,
                    v.block_size
                );
            }
            Op::ResizeVolume { .. } => {
                out += &format!(
                    "volume {}/{} is now {} ({} bytes)\n",
                    v.tenant,
                    v.name,
                    Size(v.size),
                    v.size
                );
            }
            _ => out += &volume_details(v, style),
        },
        Reply::Deleted(d) => {
            out += &format!("deleted {}", d.deleted);
            if d.connections_closed > 0 {
                out += &format!(" (closed {} connection(s))", d.connections_closed);
            }
            out += "\n";
        }
        Reply::Shredded(s) => {
            out += &format!(
                "shredded tenant {}: keys destroyed, {} volume(s) and {} segment file(s) \
                 removed ({} freed), {} connection(s) closed\n",
                s.tenant,
                s.volumes,
                s.segments_deleted,
                Size(s.bytes_freed),
                s.connections_closed
            );
        }
        Reply::MasterRotated(r) => {
            out += &format!(
                "master key rotated from {} to {}: {} wrapped key(s) of {} volume(s) and {} \
                 tenant(s) rewrapped in {} ms\n",
                r.old_key_id, r.new_key_id, r.wrapped_keys, r.volumes, r.tenants, r.elapsed_ms
            );
            out += &format!(
                "the store now opens only with key {}; the old key opens nothing.\n",
                r.new_key_id
            );
            if mode == Mode::Online {
                out += "Point the server's master_key.file at the new key file before it \
                        restarts.\n";
            } else {
                out += &format!(
                    "Use the new key file from now on (e.g. replace {} with it).\n",
                    location.key_file.display()
                );
            }
        }
        Reply::DataKeys(keys) => match op {
            Op::RotateDataKey { .. } => {
                out += &format!(
                    "volume {}/{} now writes under data key version {}; ",
                    keys.tenant, keys.volume, keys.active
                );
                out += match &keys.job {
                    Some(_) => {
                        "older blocks are being re-encrypted in the background \
                                (`blockseal key status` shows the progress)\n"
                    }
                    None => "no block needs re-encryption\n",
                };
            }
            _ => out += &data_key_table(std::slice::from_ref(keys), style),
        },
        Reply::AllDataKeys(all) => out += &data_key_table(all, style),
        Reply::Audit(entries) => out += &audit_table(entries, style),
        Reply::AuditVerified(v) => out += &audit_verdict(v, style),
        Reply::Snapshots(snapshots) => out += &snapshot_table(snapshots, style),
        Reply::Snapshot(s) => match op {
            Op::CreateSnapshot { .. } => {
                out += &format!(
                    "created snapshot {}/{}@{} of {} ({} bytes)\n",
                    s.tenant,
                    s.volume,
                    s.name,
                    Size(s.size),
                    s.size
                );
            }
            _ => out += &snapshot_details(s, style),
        },
        Reply::RolledBack(r) => {
            out += &format!(
                "rolled {}/{} back to snapshot {}",
                r.tenant, r.volume, r.snapshot
            );
            if r.connections_closed > 0 {
                out += &format!(" (closed {} connection(s))", r.connections_closed);
            }
            out += "\n";
        }
        Reply::Retention(_) | Reply::RetentionRun(_) => out += &super::retention::render(reply),
        Reply::BackupCreated(_)
        | Reply::BackupVerified(_)
        | Reply::BackupKeys(_)
        | Reply::Drilled(_)
        | Reply::Restored(_)
        | Reply::TenantKeysExported(_) => out += &super::backup::render(reply, style),
        Reply::StoreBackedUp(_) => out += &super::store::render(reply),
        Reply::Limits(view) => out += &super::limits::render(view),
    }
    out
}

fn tenant_table(tenants: &[TenantView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<24} {:>4} {:>8}  {:<7} CREATED",
        "TENANT", "KEK", "VOLUMES", "STATE"
    ));
    out.push('\n');
    for t in tenants {
        out += &format!(
            "{:<24} {:>4} {:>8}  {:<7} {}\n",
            t.name, t.kek_version, t.volumes, t.state, t.created
        );
    }
    out
}

fn volume_table(volumes: &[VolumeView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<40} {:>8} {:>14} {:>6} {:>9}  CREATED",
        "VOLUME", "SIZE", "BYTES", "BLOCK", "USED"
    ));
    out.push('\n');
    for v in volumes {
        out += &format!(
            "{:<40} {:>8} {:>14} {:>6} {:>9}  {}\n",
            format!("{}/{}", v.tenant, v.name),
            Size(v.size).to_string(),
            v.size,
            v.block_size,
            Size(v.mapped_bytes).to_string(),
            v.created
        );
    }
    out
}

fn volume_details(v: &VolumeView, style: Style) -> String {
    let versions: Vec<String> = v.dek_versions.iter().map(u32::to_string).collect();
    let mut out = format!("{} {}/{}\n", style.bold("volume"), v.tenant, v.name);
    out += &format!("size          {} ({} bytes)\n", Size(v.size), v.size);
    out += &format!("block size    {}\n", v.block_size);
    out += &format!(
        "data in use   {} ({} bytes)\n",
        Size(v.mapped_bytes),
        v.mapped_bytes
    );
    out += &format!(
        "on disk       {} ({} bytes)\n",
        Size(v.segment_bytes),
        v.segment_bytes
    );
    out += &format!(
        "snapshots     {}, holding {} ({} bytes)\n",
        v.snapshots,
        Size(v.snapshot_bytes),
        v.snapshot_bytes
    );
    out += &format!(
        "data key      version {} (held: {})\n",
        v.active_dek,
        versions.join(", ")
    );
    out += &format!("created       {}\n", v.created);
    out += &format!("updated       {}\n", v.updated);
    out
}

fn snapshot_table(snapshots: &[SnapshotView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<48} {:>8} {:>14} {:>9}  CREATED",
        "SNAPSHOT", "SIZE", "BYTES", "HELD"
    ));
    out.push('\n');
    for s in snapshots {
        out += &format!(
            "{:<48} {:>8} {:>14} {:>9}  {}\n",
            format!("{}/{}@{}", s.tenant, s.volume, s.name),
            Size(s.size).to_string(),
            s.size,
            Size(s.held_bytes).to_string(),
            s.created
        );
    }
    out
}

fn snapshot_details(s: &SnapshotView, style: Style) -> String {
    let mut out = format!(
        "{} {}/{}@{}\n",
        style.bold("snapshot"),
        s.tenant,
        s.volume,
        s.name
    );
    out += &format!("size          {} ({} bytes)\n", Size(s.size), s.size);
    out += &format!(
        "held          {} ({} bytes)\n",
        Size(s.held_bytes),
        s.held_bytes
    );
    out += &format!("created       {}\n", s.created);
    out += &format!("uid           {}\n", s.uid);
    out
}

fn data_key_table(volumes: &[DataKeyView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<40} {:>6}  {:<28} RE-ENCRYPTION",
        "VOLUME", "ACTIVE", "BLOCKS PER KEY VERSION"
    ));
    out.push('\n');
    for v in volumes {
        let keys: Vec<String> = v
            .keys
            .iter()
            .map(|k| format!("v{}: {}", k.version, k.blocks))
            .collect();
        let job = match &v.job {
            None => style.good("done"),
            Some(j) => {
                let total = j.blocks_done + j.blocks_remaining;
                format!(
                    "{} {}/{} blocks ({}%)",
                    if j.running { "running" } else { "waiting" },
                    j.blocks_done,
                    total,
                    (j.blocks_done * 100).checked_div(total).unwrap_or(100)
                )
            }
        };
        out += &format!(
            "{:<40} {:>6}  {:<28} {}\n",
            format!("{}/{}", v.tenant, v.volume),
            v.active,
            keys.join(", "),
            job
        );
    }
    out
}

fn audit_table(entries: &[AuditView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:>6}  {:<20}  {:<14} {:<18} {:<28} RESULT",
        "SEQ", "TIME", "ACTOR", "ACTION", "TARGET"
    ));
    out.push('\n');
    for e in entries {
        let result = if e.result == "ok" {
            style.good(&e.result)
        } else if e.result.starts_with("error") || e.result.starts_with("denied") {
            style.bad(&e.result)
        } else {
            e.result.clone()
        };
        out += &format!(
            "{:>6}  {:<20}  {:<14} {:<18} {:<28} {}",
            e.seq, e.time, e.actor, e.action, e.target, result
        );
        if !e.detail.is_empty() {
            out += &format!(" ({})", e.detail);
        }
        out.push('\n');
    }
    out
}

fn audit_verdict(v: &AuditVerifyView, style: Style) -> String {
    match (v.first_bad, &v.problem) {
        (None, _) => format!(
            "{}: {} entries, chain intact\n",
            style.good("audit log verified"),
            v.entries
        ),
        (Some(seq), problem) => format!(
            "{}: {} entries checked; entry {seq}: {}\n",
            style.bad("audit log TAMPERED"),
            v.entries,
            problem.as_deref().unwrap_or("does not match its chain")
        ),
    }
}

/// Runs a `blockseal store` subcommand.
pub(crate) fn store(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::Backup(args) => super::store::backup(args),
        StoreCommand::Rebuild(args) => super::store::rebuild(args),
        StoreCommand::AcceptMetadataLoss {
            yes_i_understand,
            store,
        } => {
            if !yes_i_understand {
                bail!("accepting metadata loss needs --yes-i-understand");
            }
            let location = StoreLocation::from_args(&store)?;
            let (opened, report) = location.accept_metadata_loss()?;
            // An admin action like any other (the audit log itself may be
            // among what the metadata lost; then this says so).
            let entry = blockseal_volume::AuditEntry {
                actor: format!("local:uid:{}", rustix::process::geteuid().as_raw()),
                action: "store.accept-metadata-loss".to_owned(),
                target: location.dir.display().to_string(),
                result: "ok".to_owned(),
                detail: format!(
                    "commits_lost={} extents_dropped={} live_counts_fixed={} volumes_dropped={} \
                     orphan_volumes={}",
                    report.commits_lost,
                    report.extents_dropped,
                    report.live_counts_fixed,
                    report.volumes_dropped,
                    report.orphan_volumes
                ),
            };
            if let Err(e) = opened.audit_append(&entry) {
                eprintln!("warning: the audit log could not record this recovery: {e}");
            }
            drop(opened);
            println!(
                "store {} opened accepting metadata loss: {} commits lost, {} mapping \
                 records dropped, {} live counts recounted, {} unreadable volume records \
                 dropped, {} unknown volumes' segments moved to {}",
                location.dir.display(),
                report.commits_lost,
                report.extents_dropped,
                report.live_counts_fixed,
                report.volumes_dropped,
                report.orphan_volumes,
                location.dir.join("lost").display()
            );
            Ok(())
        }
    }
}
