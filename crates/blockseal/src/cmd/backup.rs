//! `blockseal backup create|verify|keys|drill`, `blockseal restore` and
//! `blockseal key export-tenant`: through the running server's admin socket,
//! or on the store opened directly when no server runs, like every admin
//! command.
//!
//! A backup made through the server arrives as the reply's body and passes
//! through the backup codec on its way to the file: the file is renamed into
//! place (or stdout flushed) only once the codec has read a complete backup
//! (header, frames, trailer, nothing after), so a server that fails
//! mid-stream, or a connection that drops, leaves no file. Files given to
//! `verify`, `restore` and `drill` are sent as absolute paths: the server
//! reads them itself (as its own user).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use blockseal_keys::{BundleProtection, TenantBundle};
use blockseal_volume::backup_format::{BackupFormatError, BackupHeader, BackupReader, Frame};
use hyper::StatusCode;
use hyper::header::CONTENT_TYPE;
use zeroize::Zeroizing;

use super::admin::{Style, split, split_snapshot, tenant_name, usage};
use crate::admin;
use crate::admin::api::{
    ApiError, BackupCheckView, BackupKeyView, BackupView, DrillView, Op, Reply, RestoreView,
};
use crate::admin::backup::{OpIo, check_structure, from_hex, hex, kind_name, open_files};
use crate::admin::client::{self, CallError, Streamed};
use crate::admin::stream::{BLOCKS_HEADER, NDJSON};
use crate::cli::{BackupCommand, BundleArgs, KeyExportArgs, OutputArgs, RestoreArgs, StoreArgs};
use crate::open::{IfMissing, StoreLocation};
use crate::outfile::AtomicFile;
use crate::passphrase::{self, Confirm};
use crate::size::{Size, approx};
use crate::time::{Period, rfc3339_utc, utc_stamp};

/// Runs a `blockseal backup` subcommand.
pub(crate) fn run(command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Create {
            name,
            out,
            incremental_from,
            expires,
            store,
            output,
        } => create(&name, &out, incremental_from, expires, &store, &output),
        BackupCommand::Verify {
            files,
            structure_only,
            bundle,
            store,
            output,
        } => verify(&files, structure_only, &bundle, &store, &output),
        BackupCommand::Keys {
            tenant,
            store,
            output,
        } => {
            let tenant = tenant.as_deref().map(tenant_name).transpose()?;
            let location = StoreLocation::from_args(&store)?;
            let (reply, _) =
                admin::execute(&location, &Op::ListBackupKeys { tenant }, IfMissing::Fail)?;
            print(&reply, &output, &mut std::io::stdout().lock())
        }
        BackupCommand::Drill { dir, store, output } => drill(&dir, &store, &output),
    }
}

/// Runs `blockseal restore`.
pub(crate) fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    if args.target.contains('@') {
        return Err(usage(format!(
            "--as {:?} names a snapshot; a restore makes a new volume TENANT/VOLUME",
            args.target
        )));
    }
    let (tenant, volume) = split(&args.target)?;
    let files = absolute_all(&args.files)?;
    let (bundle, passphrase) = bundle_args(&args.bundle)?;
    let op = Op::Restore {
        files,
        tenant: tenant.clone(),
        volume: volume.clone(),
        bundle,
        passphrase,
    };
    let location = StoreLocation::from_args(&args.store)?;
    let bar = progress_bar(None, &format!("restoring {tenant}/{volume}"));
    let socket = admin::socket_path(&location.dir);
    let reply = match client::open_stream(&socket, &op) {
        Ok(streamed) => restore_reply(streamed, &op, &bar)?,
        Err(CallError::NoServer) => {
            // A restore may be the first thing a new host's store sees.
            let (service, caller) = admin::offline(&location, IfMissing::Create)?;
            let mut progress = |done, _total| bar.set_position(done);
            service.run_with(
                &caller,
                &op,
                &mut OpIo {
                    out: None,
                    progress: Some(&mut progress),
                },
            )?
        }
        Err(e) => return Err(call_error(e, &socket)),
    };
    bar.finish_and_clear();
    print(&reply, &args.output, &mut std::io::stdout().lock())
}

/// Runs `blockseal key export-tenant`.
pub(crate) fn export_tenant(args: KeyExportArgs) -> anyhow::Result<()> {
    let tenant = tenant_name(&args.tenant)?;
    // Refused before anything is sealed; the rename refuses again.
    if args.out.symlink_metadata().is_ok() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "file_exists",
            format!(
                "{} exists already; choose another name (nothing is ever overwritten)",
                args.out.display()
            ),
        )
        .into());
    }
    let passphrase = if args.to_master_key {
        None
    } else if let Some(file) = &args.passphrase_file {
        Some(passphrase::from_file(file)?)
    } else if std::io::stdin().is_terminal() {
        Some(passphrase::prompt(
            &format!("the recovery bundle of tenant {tenant}"),
            Confirm::Twice,
        )?)
    } else {
        return Err(usage(
            "say how to seal the bundle: --passphrase-file FILE, or --to-master-key".to_owned(),
        ));
    };
    let op = Op::ExportTenantKeys {
        tenant,
        passphrase: passphrase.map(|p| Zeroizing::new(p.expose_secret().to_owned())),
    };
    let location = StoreLocation::from_args(&args.store)?;
    let (reply, _) = admin::execute(&location, &op, IfMissing::Fail)?;
    let Reply::TenantKeysExported(view) = reply else {
        bail!("unexpected reply to a key export");
    };
    let bytes = Zeroizing::new(
        from_hex(&view.bundle).context("the sealed bundle in the reply is not hex")?,
    );
    let mut file = AtomicFile::create(&args.out)?;
    file.write_all(&bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    file.commit()?;
    let mut out = std::io::stdout().lock();
    if args.output.json {
        let summary = serde_json::json!({
            "tenant": view.tenant,
            "keys": view.keys,
            "protection": view.protection,
            "file": args.out.display().to_string(),
            "bytes": bytes.len(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(
            out,
            "wrote the recovery bundle of tenant {} to {}: {} backup key(s), sealed to {}",
            view.tenant,
            args.out.display(),
            view.keys,
            view.protection
        )?;
        writeln!(
            out,
            "It is a copy of the tenant's backup keys: keep it apart from the backups, and \
             destroy it when the tenant is shredded or its backups expire."
        )?;
    }
    Ok(())
}

fn create(
    name: &str,
    out: &str,
    incremental_from: Option<String>,
    expires: Option<Period>,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let (tenant, volume, snapshot) = if name.contains('@') {
        let (t, v, s) = split_snapshot(name)?;
        (t, v, Some(s))
    } else {
        let (t, v) = split(name)?;
        (t, v, None)
    };
    if let Some(base) = &incremental_from {
        blockseal_volume::check_snapshot_name(base).map_err(|e| usage(e.to_string()))?;
    }
    if expires.is_some_and(|p| p.secs() == 0) {
        return Err(usage("--expires must be more than zero".to_owned()));
    }
    let expires = expires.map(|p| now().saturating_add(p.secs()));
    let target = match out {
        "-" => {
            if std::io::stdout().is_terminal() {
                return Err(usage(
                    "--out - writes the backup to stdout, which is a terminal; redirect it"
                        .to_owned(),
                ));
            }
            None
        }
        path => {
            let path = PathBuf::from(path);
            if path.symlink_metadata().is_ok() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "file_exists",
                    format!(
                        "{} exists already; choose another name (nothing is ever overwritten)",
                        path.display()
                    ),
                )
                .into());
            }
            Some(path)
        }
    };
    let location = StoreLocation::from_args(store)?;
    let snapshot = match snapshot {
        Some(s) => s,
        None => {
            // Snapshot names are lowercase.
            let snapshot = format!("backup-{}", utc_stamp(now()).to_ascii_lowercase());
            let op = Op::CreateSnapshot {
                tenant: tenant.clone(),
                volume: volume.clone(),
                snapshot: snapshot.clone(),
            };
            admin::execute(&location, &op, IfMissing::Fail)?;
            eprintln!("took snapshot {tenant}/{volume}@{snapshot}");
            snapshot
        }
    };
    let op = Op::CreateBackup {
        tenant,
        volume,
        snapshot,
        base: incremental_from,
        expires,
    };
    let socket = admin::socket_path(&location.dir);
    let view = match client::open_stream(&socket, &op) {
        Ok(streamed) => receive_backup(streamed, &op, target.as_deref())?,
        Err(CallError::NoServer) => {
            let (service, caller) = admin::offline(&location, IfMissing::Fail)?;
            let bar = progress_bar(Some(0), "backing up");
            // Opened at the first byte, as online: a refused backup makes
            // no file, not even a temporary one.
            let mut sink = LazySink {
                target: target.as_deref(),
                sink: None,
                error: None,
            };
            let mut progress = |done, total: Option<u64>| {
                if let Some(total) = total {
                    bar.set_length(total);
                }
                bar.set_position(done);
            };
            let result = service.run_with(
                &caller,
                &op,
                &mut OpIo {
                    out: Some(&mut sink),
                    progress: Some(&mut progress),
                },
            );
            if let Some(e) = sink.error {
                return Err(e);
            }
            let reply = result?;
            sink.sink.context("the backup wrote nothing")?.commit()?;
            bar.finish_and_clear();
            match reply {
                Reply::BackupCreated(view) => view,
                _ => bail!("unexpected reply to a backup"),
            }
        }
        Err(e) => return Err(call_error(e, &socket)),
    };
    // The summary goes to stdout, unless stdout carries the backup.
    let reply = Reply::BackupCreated(view);
    match &target {
        Some(path) => print_backup(&reply, path, output, &mut std::io::stdout().lock()),
        None => print_backup(
            &reply,
            Path::new("-"),
            output,
            &mut std::io::stderr().lock(),
        ),
    }
}

/// Writes the backup streamed in the server's reply to `target` (stdout for
/// `None`), checking it as it passes; returns its summary.
fn receive_backup(
    streamed: Streamed,
    op: &Op,
    target: Option<&Path>,
) -> anyhow::Result<BackupView> {
    let Op::CreateBackup {
        tenant,
        volume,
        snapshot,
        base,
        expires,
    } = op
    else {
        bail!("not a backup");
    };
    let total = streamed
        .headers
        .get(BLOCKS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = progress_bar(total, "backing up");
    let mut sink = Sink::open(target)?;
    let mut tee = Tee {
        input: streamed.body,
        output: &mut sink,
        output_error: None,
    };
    let checked = read_backup(&mut tee, &bar);
    let output_error = tee.output_error.take();
    let (header, blocks, unmapped, bytes) = match (checked, output_error) {
        (Ok(done), None) => done,
        (_, Some(e)) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot write the backup to {}",
                target.map_or("stdout".into(), |p| p.display().to_string())
            )));
        }
        (Err(e), None) => {
            let left = match target {
                Some(_) => "no file was written".to_owned(),
                None => "what reached stdout is not a usable backup".to_owned(),
            };
            bail!(
                "the backup of {tenant}/{volume}@{snapshot} did not arrive whole: {}; {left}",
                crate::exports::error_chain(&e)
            );
        }
    };
    sink.commit()?;
    bar.finish_and_clear();
    Ok(BackupView {
        id: hex(&header.backup_id),
        kind: kind_name(header.kind).to_owned(),
        tenant: header.tenant,
        volume: header.volume,
        snapshot: header.snapshot_name,
        base: base.clone(),
        created: rfc3339_utc(header.created),
        bytes,
        blocks,
        unmapped_blocks: unmapped,
        expires: expires.map(rfc3339_utc),
    })
}

/// Reads a whole backup as it arrives from the server that wrote it: header,
/// frames and trailer, every rule and count checked and nothing after it, so
/// a stream cut short is never taken for a backup. The digest is the
/// server's (it hashed every byte it sent): hashing again here would halve
/// the throughput to protect against nothing a Unix socket does; `backup
/// verify` checks it. Returns the header, blocks held, blocks unmapped and
/// bytes.
fn read_backup(
    input: impl Read,
    bar: &indicatif::ProgressBar,
) -> Result<(BackupHeader, u64, u64, u64), BackupFormatError> {
    let mut reader = BackupReader::framing_only(input)?;
    let header = reader.header().clone();
    let (mut blocks, mut unmapped) = (0, 0);
    while let Some(frame) = reader.next_frame()? {
        match frame {
            Frame::Blocks { tags, .. } => {
                blocks += tags.len() as u64;
                bar.set_position(blocks);
            }
            Frame::Unmapped { count, .. } => unmapped += count,
        }
    }
    Ok((header, blocks, unmapped, reader.offset()))
}

/// A reader that copies what is read from `input` to `output`.
struct Tee<'a, R> {
    input: R,
    output: &'a mut dyn Write,
    /// Writing failed: the read that passed the bytes on fails too, and this
    /// says why.
    output_error: Option<std::io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        if let Err(e) = self.output.write_all(&buf[..n]) {
            let kind = e.kind();
            self.output_error = Some(e);
            return Err(std::io::Error::new(kind, "cannot write the backup"));
        }
        Ok(n)
    }
}

/// Bytes handed to the writer thread at a time.
const WRITE_CHUNK: usize = 1 << 20;
/// Chunks waiting for the writer thread.
const WRITE_DEPTH: usize = 4;

/// Where a backup goes: a file written whole or not at all, or stdout. The
/// writes happen on a thread of their own, a few MiB behind, so that
/// receiving and checking the stream overlap with writing it.
struct Sink {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Buffers the writer thread is done with, for reuse.
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<Output>>>,
}

/// What the writer thread writes to.
enum Output {
    File(AtomicFile),
    Stdout(std::io::Stdout),
}

impl Sink {
    fn open(target: Option<&Path>) -> anyhow::Result<Sink> {
        let mut output = match target {
            Some(path) => Output::File(AtomicFile::create(path)?),
            None => Output::Stdout(std::io::stdout()),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(WRITE_DEPTH);
        let (back, free) = std::sync::mpsc::sync_channel::<Vec<u8>>(WRITE_DEPTH + 1);
        let thread = std::thread::Builder::new()
            .name("blockseal-backup-writer".into())
            .spawn(move || {
                for chunk in rx {
                    match &mut output {
                        Output::File(f) => f.write_all(&chunk)?,
                        Output::Stdout(o) => o.write_all(&chunk)?,
                    }
                    // Full: the buffer is dropped instead.
                    let _ = back.try_send(chunk);
                }
                Ok(output)
            })
            .context("cannot start the writer thread")?;
        Ok(Sink {
            buf: Vec::with_capacity(WRITE_CHUNK),
            tx: Some(tx),
            free,
            thread: Some(thread),
        })
    }

    /// Hands the buffered bytes to the writer thread.
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.free.try_recv() {
            Ok(mut used) => {
                used.clear();
                used
            }
            Err(_) => Vec::with_capacity(WRITE_CHUNK),
        };
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
        if sent {
            return Ok(());
        }
        // The thread stopped: it failed, and says why.
        Err(match self.join() {
            Ok(Err(e)) => e,
            _ => std::io::Error::other("the writer thread stopped"),
        })
    }

    /// Waits for the writer thread to finish what it was given.
    fn join(&mut self) -> std::thread::Result<std::io::Result<Output>> {
        self.tx = None;
        match self.thread.take() {
            Some(thread) => thread.join(),
            None => Ok(Err(std::io::Error::other("the writer thread stopped"))),
        }
    }

    /// Writes the rest, then gives the file its name (or flushes stdout).
    fn commit(mut self) -> anyhow::Result<()> {
        self.send().context("cannot write the backup")?;
        let output = match self.join() {
            Ok(output) => output.context("cannot write the backup")?,
            Err(_) => bail!("the writer thread panicked"),
        };
        match output {
            Output::File(file) => {
                let path = file.path().to_owned();
                file.commit()
                    .with_context(|| format!("cannot finish {}", path.display()))
            }
            Output::Stdout(mut out) => out.flush().context("cannot write the backup to stdout"),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Not committed: the thread ends, and an unfinished file is removed
        // before this returns.
        let _ = self.join();
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() >= WRITE_CHUNK {
            self.send()?;
        }
        let n = data.len().min(WRITE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`Sink`] opened when the first byte arrives.
struct LazySink<'a> {
    target: Option<&'a Path>,
    sink: Option<Sink>,
    /// Opening failed: why.
    error: Option<anyhow::Error>,
}

impl Write for LazySink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.sink.is_none() {
            match Sink::open(self.target) {
                Ok(sink) => self.sink = Some(sink),
                Err(e) => {
                    let message = format!("{e:#}");
                    self.error = Some(e);
                    return Err(std::io::Error::other(message));
                }
            }
        }
        self.sink.as_mut().expect("opened just above").write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.sink {
            Some(sink) => sink.flush(),
            None => Ok(()),
        }
    }
}

fn verify(
    files: &[PathBuf],
    structure_only: bool,
    bundle: &BundleArgs,
    store: &StoreArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let files = absolute_all(files)?;
    let reply = if structure_only {
        // No keys, so no store: checked here, by the same code as the server's.
        let inputs = open_files(&files)?;
        Reply::BackupVerified(check_structure(inputs)?)
    } else {
        let (bundle, passphrase) = bundle_args(bundle)?;
        let op = Op::VerifyBackups {
            files,
            structure_only: false,
            bundle,
            passphrase,
        };
        let location = StoreLocation::from_args(store)?;
        match admin::execute(&location, &op, IfMissing::Fail) {
            Ok((reply, _)) => reply,
            Err(e) if e.downcast_ref::<ApiError>().is_none() && !location.has_store() => {
                return Err(e.context(
                    "checking backups with their keys needs the store (running or not); \
                     --structure-only checks them without",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    print(&reply, output, &mut std::io::stdout().lock())
}

fn drill(dir: &Path, store: &StoreArgs, output: &OutputArgs) -> anyhow::Result<()> {
    let dir =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let op = Op::DrillBackups {
        dir: dir.display().to_string(),
    };
    let location = StoreLocation::from_args(store)?;
    let (reply, _) = admin::execute(&location, &op, IfMissing::Fail)?;
    print(&reply, output, &mut std::io::stdout().lock())?;
    if let Reply::Drilled(d) = &reply
        && !d.ok
    {
        let failed = d.volumes.iter().filter(|v| !v.ok).count();
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "drill_failed",
            format!(
                "the drill failed for {failed} of {} volume(s)",
                d.volumes.len()
            ),
        )
        .into());
    }
    Ok(())
}

/// The outcome of a restore through the server: its progress lines and
/// last line, or its whole reply when it ended before restoring a block.
fn restore_reply(
    streamed: Streamed,
    op: &Op,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Reply> {
    let ndjson = streamed
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(NDJSON));
    let mut body = streamed.body;
    if !ndjson {
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes)
            .context("cannot read the server's reply")?;
        return Reply::decode(op, &bytes).context("the server's reply does not decode");
    }
    let broke = |e: &dyn std::error::Error| {
        anyhow::anyhow!(
            "the server's report on the restore broke off ({e}); the server finishes the \
             restore, or removes what it made if it fails: `blockseal volume show` tells"
        )
    };
    for line in BufReader::new(body).lines() {
        let line = line.map_err(|e| broke(&e))?;
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| broke(&e))?;
        if let Some(blocks) = value.pointer("/progress/blocks").and_then(|b| b.as_u64()) {
            bar.set_position(blocks);
        } else if let Some(done) = value.get("done") {
            return Reply::decode(op, done.to_string().as_bytes())
                .context("the server's reply does not decode");
        } else if let Some(error) = value.get("error") {
            let status = value
                .get("status")
                .and_then(|s| s.as_u64())
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            return Err(ApiError::new(status, &text("code"), text("message")).into());
        }
    }
    bail!("the server's report on the restore ended without its outcome")
}

/// The bundle's absolute path and passphrase, if a bundle is given. A
/// bundle sealed under a passphrase without --passphrase-file asks for it
/// on the terminal.
fn bundle_args(args: &BundleArgs) -> anyhow::Result<(Option<String>, Option<Zeroizing<String>>)> {
    let Some(path) = &args.bundle else {
        return Ok((None, None));
    };
    let absolute =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let passphrase = match &args.passphrase_file {
        Some(file) => Some(passphrase::from_file(file)?),
        None => {
            // The server reads the bundle itself; here only its header is
            // looked at, to know whether to ask.
            let protection = std::fs::read(&absolute)
                .ok()
                .and_then(|bytes| TenantBundle::inspect(&bytes).ok());
            match protection {
                Some(BundleProtection::Passphrase(_)) if std::io::stdin().is_terminal() => {
                    Some(passphrase::prompt(
                        &format!("the recovery bundle {}", absolute.display()),
                        Confirm::Once,
                    )?)
                }
                Some(BundleProtection::Passphrase(_)) => {
                    return Err(usage(format!(
                        "the recovery bundle {} is sealed under a passphrase: give \
                         --passphrase-file FILE",
                        absolute.display()
                    )));
                }
                _ => None,
            }
        }
    };
    Ok((
        Some(absolute.display().to_string()),
        passphrase.map(|p| Zeroizing::new(p.expose_secret().to_owned())),
    ))
}

fn absolute_all(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    files
        .iter()
        .map(|f| {
            std::path::absolute(f)
                .map(|p| p.display().to_string())
                .with_context(|| format!("cannot resolve {}", f.display()))
        })
        .collect()
}

fn call_error(e: CallError, socket: &Path) -> anyhow::Error {
    match e {
        CallError::Api(e) => e.into(),
        CallError::Transport(e) => e.context(format!(
            "the server on {} did not complete the request",
            socket.display()
        )),
        CallError::NoServer => anyhow::anyhow!("no server answers on {}", socket.display()),
    }
}

/// A progress bar on stderr when it is a terminal (blocks out of `total`,
/// or a count when the total is not known), hidden otherwise.
fn progress_bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "{prefix} [{bar:40}] {pos}/{len} blocks ({eta})",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {prefix}: {pos} blocks ({elapsed})",
        ),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prints a reply: its JSON with `--json`, else as text.
fn print(reply: &Reply, output: &OutputArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render(reply, Style::for_stdout()))?;
    }
    out.flush()?;
    Ok(())
}

fn print_backup(
    reply: &Reply,
    file: &Path,
    output: &OutputArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if output.json {
        return print(reply, output, out);
    }
    let Reply::BackupCreated(b) = reply else {
        bail!("not a backup");
    };
    writeln!(out, "backup        {}", b.id)?;
    match &b.base {
        Some(base) => writeln!(out, "kind          incremental from {base}")?,
        None => writeln!(out, "kind          {}", b.kind)?,
    }
    writeln!(
        out,
        "snapshot      {}/{}@{}",
        b.tenant, b.volume, b.snapshot
    )?;
    write!(out, "blocks        {}", b.blocks)?;
    if b.unmapped_blocks > 0 {
        write!(out, " (and {} unmapped)", b.unmapped_blocks)?;
    }
    writeln!(out)?;
    writeln!(out, "bytes         {} ({} bytes)", approx(b.bytes), b.bytes)?;
    if file == Path::new("-") {
        writeln!(out, "file          (stdout)")?;
    } else {
        writeln!(out, "file          {}", file.display())?;
    }
    writeln!(
        out,
        "expires       {}",
        b.expires.as_deref().unwrap_or("never")
    )?;
    out.flush()?;
    Ok(())
}

/// The text form of the backup replies (`cmd::admin::render` hands them
/// here).
pub(super) fn render(reply: &Reply, style: Style) -> String {
    match reply {
        Reply::BackupCreated(b) => format!(
            "backup {} ({}) of {}/{}@{}: {} blocks, {} bytes\n",
            b.id, b.kind, b.tenant, b.volume, b.snapshot, b.blocks, b.bytes
        ),
        Reply::BackupVerified(v) => check_text(v, style),
        Reply::BackupKeys(keys) => key_table(keys, style),
        Reply::Drilled(d) => drill_text(d, style),
        Reply::Restored(r) => restore_text(r),
        Reply::TenantKeysExported(b) => format!(
            "recovery bundle of tenant {}: {} backup key(s), sealed to {}\n",
            b.tenant, b.keys, b.protection
        ),
        _ => String::new(),
    }
}

fn check_text(v: &BackupCheckView, style: Style) -> String {
    let mut out = match v.keys.as_str() {
        "none" => format!(
            "{}: {} file(s), {} blocks, {} ({} bytes); structure and digests only, no keys: \
             MACs and blocks not checked\n",
            style.good("structure verified"),
            v.files.len(),
            v.blocks,
            approx(v.bytes),
            v.bytes
        ),
        keys => format!(
            "{}: {} file(s), {} blocks authenticated with the {}'s keys, {} ({} bytes)\n",
            style.good("verified"),
            v.files.len(),
            v.blocks_authenticated,
            keys,
            approx(v.bytes),
            v.bytes
        ),
    };
    out += &style.bold(&format!(
        "{:<12} {:<36} {:<20}  {:<32}  FILE",
        "KIND", "SNAPSHOT", "CREATED", "BACKUP"
    ));
    out.push('\n');
    for f in &v.files {
        out += &format!(
            "{:<12} {:<36} {:<20}  {:<32}  {}\n",
            f.kind,
            format!("{}/{}@{}", f.tenant, f.volume, f.snapshot),
            f.created,
            f.id,
            f.file
        );
    }
    out
}

fn key_table(keys: &[BackupKeyView], style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<32}  {:<40} {:<20}  EXPIRES",
        "BACKUP", "SNAPSHOT", "CREATED"
    ));
    out.push('\n');
    for k in keys {
        out += &format!(
            "{:<32}  {:<40} {:<20}  {}\n",
            k.id,
            format!("{}/{}@{}", k.tenant, k.volume, k.snapshot),
            k.created,
            k.expires.as_deref().unwrap_or("never")
        );
    }
    out
}

fn drill_text(d: &DrillView, style: Style) -> String {
    let mut out = style.bold(&format!(
        "{:<36} {:<24} {:>5} {:>10}  RESULT",
        "VOLUME", "SNAPSHOT", "FILES", "BLOCKS"
    ));
    out.push('\n');
    for v in &d.volumes {
        let result = match &v.error {
            None => style.good("OK"),
            Some(why) => format!("{}: {why}", style.bad("FAILED")),
        };
        out += &format!(
            "{:<36} {:<24} {:>5} {:>10}  {}\n",
            format!("{}/{}", v.tenant, v.volume),
            v.snapshot,
            v.files.len(),
            v.blocks,
            result
        );
        for f in &v.files {
            out += &format!("    {f}\n");
        }
    }
    for s in &d.skipped {
        out += &format!("skipped {}: {}\n", s.file, s.reason);
    }
    if d.volumes.is_empty() {
        out += "no backup files found\n";
    }
    out
}

fn restore_text(r: &RestoreView) -> String {
    format!(
        "restored {}/{} from {} file(s) to snapshot {}: {} ({} bytes), {} blocks written, {} \
         of backups read\n",
        r.tenant,
        r.volume,
        r.files,
        r.snapshot,
        Size(r.size),
        r.size,
        r.blocks,
        approx(r.bytes)
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::admin::client::BodyReader;

    /// A full backup of a small volume with some data, as bytes.
    fn a_backup() -> Vec<u8> {
        let (_dir, store, t, v) = crate::testing::small_store();
        store.create_snapshot(&t, &v, "s1").unwrap();
        let mut out = Vec::new();
        store
            .create_backup(&t, &v, "s1", None, None, &mut out, &mut |_, _| {})
            .unwrap();
        out
    }

    fn backup_op() -> Op {
        Op::CreateBackup {
            tenant: "acme".into(),
            volume: "disk".into(),
            snapshot: "s1".into(),
            base: None,
            expires: None,
        }
    }

    fn streamed(bytes: &[u8], complete: bool) -> Streamed {
        let chunks = bytes.chunks(10_000).map(Bytes::copy_from_slice).collect();
        Streamed {
            headers: hyper::HeaderMap::new(),
            body: BodyReader::of(chunks, complete),
        }
    }

    #[test]
    fn a_backup_stream_becomes_a_file_only_when_it_arrived_whole() {
        let backup = a_backup();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.bsb");
        let entries = || std::fs::read_dir(dir.path()).unwrap().count();

        // Broken off halfway; cut short but ending cleanly; with a byte too
        // many; with a byte changed: no file, no temporary file.
        let half = &backup[..backup.len() / 2];
        let short = &backup[..backup.len() - 1];
        let mut long = backup.clone();
        long.push(0);
        let mut changed = backup.clone();
        changed[backup.len() / 3] ^= 1;
        for (bytes, complete) in [
            (half, false),
            (short, true),
            (&long[..], true),
            (&changed[..], true),
        ] {
            let e =
                receive_backup(streamed(bytes, complete), &backup_op(), Some(&path)).unwrap_err();
            assert!(format!("{e:#}").contains("did not arrive whole"), "{e:#}");
            assert_eq!(entries(), 0, "{e:#}");
        }

        let view = receive_backup(streamed(&backup, true), &backup_op(), Some(&path)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), backup);
        assert_eq!((view.kind.as_str(), view.blocks), ("full", 64));
        assert_eq!(view.bytes, backup.len() as u64);
        assert_eq!(entries(), 1);
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(approx(0), "0 B");
        assert_eq!(approx(1023), "1023 B");
        assert_eq!(approx(8 << 20), "8.0 MiB");
        assert_eq!(approx(1536 << 20), "1.5 GiB");
    }
}
