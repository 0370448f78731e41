//! `blockseal store backup` and `blockseal store rebuild`: the store's
//! catalogue, for rebuilding a host.
//!
//! `store backup` runs through the running server's admin socket (the
//! catalogue is the reply's body, its summary the trailer), or on the store
//! opened directly when no server runs. Either way the bytes pass a framing
//! check on their way to the file, which is renamed into place only once a
//! complete catalogue (header, chunks, end chunk, nothing after) has
//! arrived and its length matches the summary: a server that fails
//! mid-stream, or a connection that drops, leaves no file. The CLI never
//! opens the catalogue: it would need the master key, which it does not hold
//! when a server runs; `store rebuild` opens every chunk before it writes
//! anything.
//!
//! `store rebuild` is offline only: the store it makes does not exist yet.
//! It refuses a target directory that holds anything but the master key
//! file, and leaves the target as it found it when it fails.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use blockseal_volume::{
    AuditEntry, CATALOG_HEADER_LEN, CatalogError, CatalogFramed, CatalogFraming, CatalogHeader,
    rebuild_store,
};
use hyper::StatusCode;

use super::admin::usage;
use crate::admin;
use crate::admin::api::{ApiError, CatalogView, Op, Reply};
use crate::admin::backup::OpIo;
use crate::admin::client::{self, CallError, Streamed};
use crate::admin::stream::CATALOG_TRAILER;
use crate::cli::{StoreArgs, StoreBackupArgs, StoreRebuildArgs};
use crate::open::{IfMissing, StoreLocation};
use crate::outfile::AtomicFile;
use crate::size::approx;
use crate::time::rfc3339_utc;

/// Bytes read from the server's stream at a time.
const READ_CHUNK: usize = 256 * 1024;

/// Runs `blockseal store backup`.
pub(crate) fn backup(args: StoreBackupArgs) -> anyhow::Result<()> {
    let target = match args.out.as_str() {
        "-" => {
            if std::io::stdout().is_terminal() {
                return Err(usage(
                    "--out - writes the catalogue to stdout, which is a terminal; redirect it"
                        .to_owned(),
                ));
            }
            None
        }
        path => Some(PathBuf::from(path)),
    };
    let segments_to = args
        .segments_to
        .as_deref()
        .map(|dir| {
            std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))
        })
        .transpose()?;
    let op = Op::BackupStore {
        segments_to: segments_to.map(|p| p.display().to_string()),
    };
    let location = StoreLocation::from_args(&args.store)?;
    // Refused now if FILE exists; removed again unless committed.
    let output = Output::open(target.as_deref())?;
    let socket = admin::socket_path(&location.dir);
    let view = match client::open_stream(&socket, &op) {
        Ok(streamed) => receive(streamed, output)?,
        Err(CallError::NoServer) => offline(&location, &op, output)?,
        Err(CallError::Api(e)) => return Err(e.into()),
        Err(CallError::Transport(e)) => {
            return Err(e.context(format!(
                "the server on {} did not complete the request",
                socket.display()
            )));
        }
    };
    // The summary goes to stdout, unless stdout carries the catalogue.
    let reply = Reply::StoreBackedUp(view);
    let file = target.as_deref().unwrap_or(Path::new("-"));
    let mut out: Box<dyn Write> = match target {
        Some(_) => Box::new(std::io::stdout().lock()),
        None => Box::new(std::io::stderr().lock()),
    };
    if args.output.json {
        out.write_all(&reply.to_json())?;
        writeln!(out)?;
    } else {
        write!(out, "{}", summary(&reply, file))?;
    }
    out.flush()?;
    Ok(())
}

/// Runs `blockseal store rebuild`.
pub(crate) fn rebuild(args: StoreRebuildArgs) -> anyhow::Result<()> {
    let location = StoreLocation::from_args(&StoreArgs {
        config: args.config.clone(),
        data_dir: args.data_dir.clone().unwrap_or_default(),
        master_key: args.master_key.clone(),
        passphrase: args.passphrase.clone(),
    })?;
    if location.object_store.is_some() {
        bail!(
            "store rebuild writes the metadata and segments into the data directory; a \
             store in object storage ([object_store]) cannot be rebuilt from a catalogue yet"
        );
    }
    let dir = &location.dir;
    let catalog_name = args.catalog.display().to_string();
    let file = File::open(&args.catalog).map_err(|e| file_error(&catalog_name, &e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    // The header is in the clear: what it names is shown, and checked
    // before a key is asked for.
    let mut head = Vec::with_capacity(CATALOG_HEADER_LEN);
    (&mut reader)
        .take(CATALOG_HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| file_error(&catalog_name, &e))?;
    let header = CatalogHeader::parse(&head).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "catalog_damaged",
            format!("{catalog_name}: {e}; nothing was written"),
        )
    })?;
    match std::fs::metadata(&args.segments) {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_file",
                format!(
                    "no directory {} (the segment files taken with the catalogue: `store \
                     backup --segments-to`)",
                    args.segments.display()
                ),
            )
            .into());
        }
    }
    let mut target = NewStoreDir::check(dir, &location.key_file)?;
    if location.key_file.symlink_metadata().is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_file",
            format!(
                "no master key file at {}: the catalogue opens only with the master key it was \
                 written with, {} (give its file with --master-key)",
                location.key_file.display(),
                header.master_key
            ),
        )
        .into());
    }
    let key = location.load_key()?;
    let options = location
        .options()?
        .background_compaction(false)
        .background_reencryption(false);
    reader.rewind().map_err(|e| file_error(&catalog_name, &e))?;
    let store = rebuild_store(&mut reader, &args.segments, dir, key, options)
        .map_err(|e| rebuild_error(e, &catalog_name, &location.key_file, dir))?;
    target.done = true;

    let tenants = store.tenants()?;
    let (mut volumes, mut snapshots) = (0, 0);
    for t in &tenants {
        for v in store.volumes(&t.id)? {
            volumes += 1;
            snapshots += store.snapshots(&t.id, &v.id)?.len();
        }
    }
    let backup_keys = store.backup_keys(None)?.len();
    let segment_files = count_segment_files(&store.dir().join("segments"));
    let entry = AuditEntry {
        actor: format!("local:uid:{}", rustix::process::geteuid().as_raw()),
        action: "store.rebuild".to_owned(),
        target: dir.display().to_string(),
        result: "ok".to_owned(),
        detail: format!(
            "catalog={catalog_name} written={} segment_files={segment_files}",
            rfc3339_utc(header.created)
        ),
    };
    if let Err(e) = store.audit_append(&entry) {
        eprintln!("warning: the audit log could not record this rebuild: {e}");
    }
    drop(store);

    let mut out = std::io::stdout().lock();
    if args.output.json {
        let summary = serde_json::json!({
            "data_dir": dir.display().to_string(),
            "catalog": catalog_name,
            "master_key_id": header.master_key.to_string(),
            "created": rfc3339_utc(header.created),
            "tenants": tenants.len(),
            "volumes": volumes,
            "snapshots": snapshots,
            "backup_keys": backup_keys,
            "segment_files": segment_files,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "rebuilt the store in {} from {catalog_name}: the store as it was at {} (master key {})",
        dir.display(),
        rfc3339_utc(header.created),
        header.master_key
    )?;
    writeln!(out, "tenants       {}", tenants.len())?;
    writeln!(out, "volumes       {volumes}")?;
    writeln!(out, "snapshots     {snapshots}")?;
    writeln!(out, "backup keys   {backup_keys}")?;
    writeln!(out, "segment files {segment_files}")?;
    match &args.config {
        Some(config) => writeln!(
            out,
            "Serve it: blockseal serve --config {}",
            config.display()
        )?,
        None => writeln!(
            out,
            "Serve it with a configuration file that names it (data_dir = \"{}\", and \
             master_key.file = \"{}\"): blockseal serve --config FILE",
            dir.display(),
            location.key_file.display()
        )?,
    }
    out.flush()?;
    Ok(())
}

/// The text form of the reply (`cmd::admin::render` hands it here).
pub(super) fn render(reply: &Reply) -> String {
    match reply {
        Reply::StoreBackedUp(c) => format!(
            "catalogue of {} records, {} bytes, master key {}: {} segment file(s), {} linked\n",
            c.records, c.bytes, c.master_key_id, c.segments, c.segments_linked
        ),
        _ => String::new(),
    }
}

/// The summary `store backup` prints.
fn summary(reply: &Reply, file: &Path) -> String {
    let Reply::StoreBackedUp(c) = reply else {
        return String::new();
    };
    let mut out = String::new();
    let name = if file == Path::new("-") {
        "(stdout)".to_owned()
    } else {
        file.display().to_string()
    };
    out += &format!(
        "catalogue     {name} ({}, {} bytes)\n",
        approx(c.bytes),
        c.bytes
    );
    out += &format!("records       {}\n", c.records);
    out += &format!("written       {}\n", c.created);
    out += &format!(
        "master key    {} (the catalogue rebuilds only with it)\n",
        c.master_key_id
    );
    out += &format!(
        "segments      {} file(s), {} ({} bytes)\n",
        c.segments,
        approx(c.segment_bytes),
        c.segment_bytes
    );
    match &c.segments_to {
        Some(dir) => out += &format!("linked        {} into {dir}\n", c.segments_linked),
        None => {
            out += "linked        none: without --segments-to, the segment files must be \
                    copied from the store before compaction deletes any\n"
        }
    }
    out += "It holds every tenant's keys, sealed under the master key: keep it as safe as \
            the master key, and destroy it when a tenant it holds is shredded.\n";
    out
}

/// Writes the catalogue streamed in the server's reply to `output`,
/// checking its framing as it passes; returns its summary.
fn receive(streamed: Streamed, mut output: Output) -> anyhow::Result<CatalogView> {
    let mut body = streamed.body;
    let bar = bytes_spinner("receiving the catalogue");
    let mut check = CatalogFraming::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let incomplete = |why: &dyn std::fmt::Display, output: &Output| {
        anyhow::anyhow!(
            "the catalogue did not arrive whole: {why}; {}",
            output.left_behind()
        )
    };
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(incomplete(&e, &output)),
        };
        check.feed(&buf[..n]).map_err(|e| incomplete(&e, &output))?;
        output
            .write_all(&buf[..n])
            .with_context(|| format!("cannot write the catalogue to {}", output.name()))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let framed = check.finish().map_err(|e| incomplete(&e, &output))?;
    let view = body
        .trailers()
        .and_then(|t| t.get(CATALOG_TRAILER))
        .and_then(|v| serde_json::from_slice::<CatalogView>(v.as_bytes()).ok());
    let Some(view) = view else {
        return Err(incomplete(
            &"the server sent no summary after it (trailer blockseal-catalog)",
            &output,
        ));
    };
    matches_summary(&framed, &view).map_err(|e| incomplete(&e, &output))?;
    output.commit()?;
    Ok(view)
}

/// Writes the catalogue of the store opened directly.
fn offline(location: &StoreLocation, op: &Op, output: Output) -> anyhow::Result<CatalogView> {
    let (service, caller) = admin::offline(location, IfMissing::Fail)?;
    let mut checked = Checked {
        bar: bytes_spinner("writing the catalogue"),
        check: CatalogFraming::new(),
        output,
        framing: None,
    };
    let result = service.run_with(
        &caller,
        op,
        &mut OpIo {
            out: Some(&mut checked),
            progress: None,
        },
    );
    checked.bar.finish_and_clear();
    if let Some(e) = checked.framing {
        bail!("the catalogue the store wrote does not frame: {e}; no file was written");
    }
    let Reply::StoreBackedUp(view) = result? else {
        bail!("unexpected reply to a store backup");
    };
    let framed = checked
        .check
        .finish()
        .map_err(|e| e.to_string())
        .and_then(|framed| matches_summary(&framed, &view));
    if let Err(e) = framed {
        bail!("the catalogue the store wrote does not frame: {e}; no file was written");
    }
    checked.output.commit()?;
    Ok(view)
}

/// Whether the catalogue received is the one the summary describes.
fn matches_summary(framed: &CatalogFramed, view: &CatalogView) -> Result<(), String> {
    if framed.bytes != view.bytes || framed.segments != view.segments {
        return Err(format!(
            "{} bytes and {} segment file(s) arrived, the server wrote {} and {}",
            framed.bytes, framed.segments, view.bytes, view.segments
        ));
    }
    if framed.header.master_key.to_string() != view.master_key_id {
        return Err(format!(
            "it names master key {}, the server's summary {}",
            framed.header.master_key, view.master_key_id
        ));
    }
    Ok(())
}

/// Where a catalogue goes: a file written whole or not at all, or stdout.
enum Output {
    File(AtomicFile),
    Stdout(std::io::StdoutLock<'static>),
}

impl Output {
    fn open(target: Option<&Path>) -> anyhow::Result<Output> {
        Ok(match target {
            Some(path) => Output::File(AtomicFile::create(path)?),
            None => Output::Stdout(std::io::stdout().lock()),
        })
    }

    fn name(&self) -> String {
        match self {
            Output::File(f) => f.path().display().to_string(),
            Output::Stdout(_) => "stdout".to_owned(),
        }
    }

    /// What a failure leaves behind.
    fn left_behind(&self) -> &'static str {
        match self {
            Output::File(_) => "no file was written",
            Output::Stdout(_) => "what reached stdout is not a usable catalogue",
        }
    }

    /// Gives the file its name (or flushes stdout).
    fn commit(self) -> anyhow::Result<()> {
        match self {
            Output::File(file) => {
                let path = file.path().to_owned();
                file.commit()
                    .with_context(|| format!("cannot finish {}", path.display()))
            }
            Output::Stdout(mut out) => out.flush().context("cannot write the catalogue to stdout"),
        }
    }
}

impl Write for Output {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(f) => f.write(data),
            Output::Stdout(o) => o.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Stdout(o) => o.flush(),
        }
    }
}

/// An [`Output`] behind a framing check: bytes that break the framing are
/// not passed on.
struct Checked {
    /// Bytes written, on a terminal.
    bar: indicatif::ProgressBar,
    check: CatalogFraming,
    output: Output,
    /// The framing broke: why.
    framing: Option<String>,
}

impl Write for Checked {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.check.feed(data) {
            let message = e.to_string();
            self.framing = Some(message.clone());
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                message,
            ));
        }
        self.output.write_all(data)?;
        self.bar.inc(data.len() as u64);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.output.flush()
    }
}

/// The directory a store is rebuilt in. Unless the rebuild is done, what
/// it made there is removed when this is dropped (and the directory, if it
/// made that too): a failed rebuild leaves the target as it found it.
struct NewStoreDir {
    path: PathBuf,
    existed: bool,
    /// The one entry it held before, if any: the master key file.
    key_file: Option<OsString>,
    done: bool,
}

impl NewStoreDir {
    /// Refuses a directory that holds anything but the master key file.
    fn check(dir: &Path, key_file: &Path) -> anyhow::Result<NewStoreDir> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NewStoreDir {
                    path: dir.to_owned(),
                    existed: false,
                    key_file: None,
                    done: false,
                });
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot use {} for the new store", dir.display())));
            }
        };
        let key_name = key_file.file_name().filter(|_| {
            matches!(
                (
                    key_file.parent().map(std::fs::canonicalize),
                    std::fs::canonicalize(dir)
                ),
                (Some(Ok(a)), Ok(b)) if a == b
            )
        });
        let mut others = Vec::new();
        let mut kept = None;
        for entry in entries {
            let name = entry
                .with_context(|| format!("cannot read {}", dir.display()))?
                .file_name();
            if Some(name.as_os_str()) == key_name {
                kept = Some(name);
            } else {
                others.push(name.to_string_lossy().into_owned());
            }
        }
        if !others.is_empty() {
            others.sort();
            let shown: Vec<&str> = others.iter().take(3).map(String::as_str).collect();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "directory_not_empty",
                format!(
                    "{} is not empty (it holds {}{}): a rebuild makes a new store, in an absent \
                     or empty directory (the master key file may be there); nothing was written",
                    dir.display(),
                    shown.join(", "),
                    if others.len() > 3 { ", ..." } else { "" }
                ),
            )
            .into());
        }
        Ok(NewStoreDir {
            path: dir.to_owned(),
            existed: true,
            key_file: kept,
            done: false,
        })
    }
}

impl Drop for NewStoreDir {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.existed {
            let _ = std::fs::remove_dir_all(&self.path);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if Some(entry.file_name()) == self.key_file {
                    continue;
                }
                let path = entry.path();
                let _ = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
            }
        }
    }
}

/// How a rebuild's failure reaches the operator: a catalogue refused is
/// exit code 5, missing segment files 3.
fn rebuild_error(e: CatalogError, catalog: &str, key_file: &Path, dir: &Path) -> anyhow::Error {
    let refused = |code: &str, message: String| -> anyhow::Error {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).into()
    };
    match e {
        CatalogError::OtherMasterKey { expected, actual } => refused(
            "catalog_refused",
            format!(
                "{catalog} was written with master key {expected}, and {} holds master key \
                 {actual}: give the key file of master key {expected} (`blockseal key \
                 inspect FILE` shows a file's key id); nothing was written",
                key_file.display()
            ),
        ),
        e @ (CatalogError::Damaged { .. } | CatalogError::Format(_)) => refused(
            "catalog_damaged",
            format!("{catalog}: {e}; nothing was written"),
        ),
        e @ CatalogError::MissingSegments { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            "segments_missing",
            format!("{e}; nothing was written"),
        )
        .into(),
        other => anyhow::Error::new(other).context(format!(
            "cannot rebuild the store in {} (what it made there is removed)",
            dir.display()
        )),
    }
}

fn file_error(name: &str, e: &std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_file",
            format!("no file {name}"),
        )
        .into(),
        _ => anyhow::anyhow!("cannot read {name}: {e}"),
    }
}

/// Segment files under a store's `segments/` (one directory per volume).
fn count_segment_files(dir: &Path) -> usize {
    let Ok(volumes) = std::fs::read_dir(dir) else {
        return 0;
    };
    volumes
        .flatten()
        .filter_map(|v| std::fs::read_dir(v.path()).ok())
        .map(|files| files.count())
        .sum()
}

/// A spinner with the bytes done, on stderr when it is a terminal (hidden
/// otherwise).
fn bytes_spinner(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix}: {bytes} ({elapsed})")
            .expect("the template is valid"),
    );
    bar.set_prefix(what.to_owned());
    bar
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::admin::client::BodyReader;

    /// A catalogue of a small store, and its summary.
    fn a_catalogue() -> (Vec<u8>, CatalogView) {
        let (_dir, store, _, _) = crate::testing::small_store();
        let mut out = Vec::new();
        let report = store.write_catalog(&mut out, None).unwrap();
        let header = CatalogHeader::parse(&out).unwrap();
        let view = CatalogView {
            master_key_id: header.master_key.to_string(),
            created: rfc3339_utc(header.created),
            records: report.records,
            bytes: report.bytes,
            segments: report.segments,
            segment_bytes: report.segment_bytes,
            segments_linked: 0,
            segments_to: None,
        };
        (out, view)
    }

    fn streamed(bytes: &[u8], complete: bool, view: Option<&CatalogView>) -> Streamed {
        let chunks = bytes.chunks(1000).map(Bytes::copy_from_slice).collect();
        let trailers = view.map(|v| {
            let mut fields = hyper::HeaderMap::new();
            fields.insert(
                CATALOG_TRAILER,
                hyper::header::HeaderValue::from_str(&serde_json::to_string(v).unwrap()).unwrap(),
            );
            fields
        });
        Streamed {
            headers: hyper::HeaderMap::new(),
            body: BodyReader::with_trailers(chunks, complete, trailers),
        }
    }

    #[test]
    fn a_catalogue_stream_becomes_a_file_only_when_it_arrived_whole() {
        let (catalogue, view) = a_catalogue();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.bsc");
        let entries = || std::fs::read_dir(dir.path()).unwrap().count();
        let receive_into = |s: Streamed| receive(s, Output::open(Some(&path)).unwrap());

        // Broken off; cut short but ending cleanly; a byte too many; no
        // summary; a summary of another length: no file, no temporary file.
        let half = &catalogue[..catalogue.len() / 2];
        let short = &catalogue[..catalogue.len() - 1];
        let mut long = catalogue.clone();
        long.push(0);
        let mut other = view.clone();
        other.bytes += 1;
        for (bytes, complete, summary) in [
            (&catalogue[..], false, Some(&view)),
            (half, false, None),
            (short, true, Some(&view)),
            (&long[..], true, Some(&view)),
            (&catalogue[..], true, None),
            (&catalogue[..], true, Some(&other)),
        ] {
            let e = receive_into(streamed(bytes, complete, summary)).unwrap_err();
            assert!(format!("{e:#}").contains("did not arrive whole"), "{e:#}");
            assert!(format!("{e:#}").contains("no file was written"), "{e:#}");
            assert_eq!(entries(), 0, "{e:#}");
        }

        let got = receive_into(streamed(&catalogue, true, Some(&view))).unwrap();
        assert_eq!(got, view);
        assert_eq!(std::fs::read(&path).unwrap(), catalogue);
        assert_eq!(entries(), 1);
    }

    #[test]
    fn a_new_store_directory_holds_nothing_but_the_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new");
        let key = dir.join("master.key");
        // Absent: removed again after a failure.
        let target = NewStoreDir::check(&dir, &key).unwrap();
        std::fs::create_dir_all(dir.join("meta")).unwrap();
        drop(target);
        assert!(!dir.exists());
        // The key file alone: kept, the rest removed after a failure.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&key, b"key").unwrap();
        let target = NewStoreDir::check(&dir, &key).unwrap();
        std::fs::create_dir_all(dir.join("segments/1")).unwrap();
        std::fs::write(dir.join("FORMAT"), b"x").unwrap();
        drop(target);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![OsString::from("master.key")]);
        // Anything else: refused, untouched.
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let e = NewStoreDir::check(&dir, &tmp.path().join("elsewhere.key"))
            .err()
            .unwrap();
        let api = e.downcast_ref::<ApiError>().unwrap();
        assert_eq!(
            (api.code.as_str(), api.exit_code()),
            ("directory_not_empty", 4)
        );
        assert!(api.message.contains("master.key, notes.txt"), "{api}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }
}
