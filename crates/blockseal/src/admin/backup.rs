//! Backups, restores, drills and tenant recovery bundles through the admin
//! API: what `backup.*` and `key.export-tenant` do on the store, their
//! replies, and how the store's backup errors become API errors. The
//! structure-only check of backup files lives here too, so that the CLI runs
//! the very same check when no store is at hand.
//!
//! Files are named by absolute paths and read by whoever runs the operation:
//! the server (as its own user) or the CLI on a stopped store. Nothing here
//! writes a key or plaintext anywhere: backup files carry ciphertext, and a
//! recovery bundle leaves only sealed.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use blockseal_keys::{Argon2Params, BundleProtection, Passphrase, TenantBundle};
use blockseal_volume::backup_format::{
    BackupFormatError, BackupHeader, BackupKind, BackupReader, Frame,
};
use blockseal_volume::{BackupCheck, BackupError, BackupKeys, Store, check_snapshot_name};
use hyper::StatusCode;
use zeroize::Zeroizing;

use super::api::{
    ApiError, BackupCheckView, BackupFileView, BackupKeyView, BackupView, BundleView,
    DrillSkipView, DrillView, DrillVolumeView, Op, Reply, RestoreView,
};
use super::service::{
    Service, admin_error, bad_request, no_such_tenant, query_error, tenant_id, volume_error,
    volume_id,
};
use crate::time::rfc3339_utc;

/// Read buffer of a backup file.
const READ_BUFFER: usize = 1 << 20;

/// Largest recovery bundle read (a bundle of the most keys a bundle may hold
/// is about 48 MB).
const MAX_BUNDLE_BYTES: u64 = 64 << 20;

/// Backup files to read, each with the name errors give it.
pub(crate) type BackupInputs<'a> = Vec<(String, Box<dyn Read + 'a>)>;

/// Where an operation's stream and progress go: a backup file is written to
/// `out`; backups and restores report `(blocks done, blocks in all when
/// known)` to `progress`.
#[derive(Default)]
pub(crate) struct OpIo<'a> {
    pub(crate) out: Option<&'a mut dyn Write>,
    pub(crate) progress: Option<&'a mut dyn FnMut(u64, Option<u64>)>,
}

impl OpIo<'_> {
    /// No stream, no progress.
    pub(crate) fn none() -> OpIo<'static> {
        OpIo::default()
    }
}

/// Runs `op` if it is one of the backup operations; `None` otherwise.
/// Blocking: store and file I/O.
pub(crate) fn run(
    service: &Service,
    op: &Op,
    io: &mut OpIo<'_>,
) -> Option<Result<Reply, ApiError>> {
    let store = service.store();
    Some(match op {
        Op::CreateBackup {
            tenant,
            volume,
            snapshot,
            base,
            expires,
        } => create(
            store,
            tenant,
            volume,
            snapshot,
            base.as_deref(),
            *expires,
            io,
        ),
        Op::VerifyBackups {
            files,
            structure_only,
            bundle,
            passphrase,
        } => verify(
            store,
            files,
            *structure_only,
            bundle.as_deref(),
            passphrase.as_ref(),
        ),
        Op::ListBackupKeys { tenant } => keys(store, tenant.as_deref()),
        Op::DrillBackups { dir } => drill(store, dir),
        Op::Restore {
            files,
            tenant,
            volume,
            bundle,
            passphrase,
        } => restore(
            store,
            files,
            tenant,
            volume,
            bundle.as_deref(),
            passphrase.as_ref(),
            io,
        ),
        Op::ExportTenantKeys { tenant, passphrase } => export(store, tenant, passphrase.as_ref()),
        _ => return None,
    })
}

/// Checks backup files without keys: each file's structure, digest and
/// trailer, and that they form a chain. Needs no store.
pub(crate) fn check_structure(inputs: BackupInputs<'_>) -> Result<BackupCheckView, ApiError> {
    if inputs.is_empty() {
        return Err(bad_request("missing_field", "no backup file given"));
    }
    let mut files: Vec<(String, BackupHeader)> = Vec::new();
    let mut blocks = 0;
    let mut bytes = 0;
    for (name, input) in inputs {
        let mut reader = BackupReader::new(input).map_err(|e| format_error(&name, e))?;
        let header = reader.header().clone();
        if let Some((_, prev)) = files.last() {
            chain_fits(&name, prev, &header)?;
        }
        while let Some(frame) = reader.next_frame().map_err(|e| format_error(&name, e))? {
            if let Frame::Blocks { tags, .. } = frame {
                blocks += tags.len() as u64;
            }
        }
        bytes += reader.offset();
        files.push((name, header));
    }
    Ok(BackupCheckView {
        keys: "none".to_owned(),
        files: files.iter().map(|(n, h)| file_view(n, h)).collect(),
        blocks,
        blocks_authenticated: 0,
        bytes,
    })
}

/// `full` or `incremental`.
pub(crate) fn kind_name(kind: BackupKind) -> &'static str {
    match kind {
        BackupKind::Full => "full",
        BackupKind::Incremental => "incremental",
    }
}

/// A backup file that breaks the format, as an API error.
pub(crate) fn format_error(file: &str, e: BackupFormatError) -> ApiError {
    unprocessable("backup_damaged", format!("{file}: {}", message(&e)))
}

/// 32 lowercase hex digits of an id.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lowercase or uppercase hex; `None` if it is not hex.
pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The view of one file's header.
pub(crate) fn file_view(file: &str, h: &BackupHeader) -> BackupFileView {
    BackupFileView {
        file: file.to_owned(),
        id: hex(&h.backup_id),
        kind: kind_name(h.kind).to_owned(),
        tenant: h.tenant.clone(),
        volume: h.volume.clone(),
        snapshot: h.snapshot_name.clone(),
        created: rfc3339_utc(h.created),
        volume_size: h.volume_size,
        block_size: h.block_size,
    }
}

#[allow(clippy::too_many_arguments)]
fn create(
    store: &Store,
    tenant: &str,
    volume: &str,
    snapshot: &str,
    base: Option<&str>,
    expires: Option<u64>,
    io: &mut OpIo<'_>,
) -> Result<Reply, ApiError> {
    let (tenant_id, volume_id) = (tenant_id(tenant)?, volume_id(volume)?);
    check_snapshot_name(snapshot).map_err(admin_error)?;
    if let Some(base) = base {
        check_snapshot_name(base).map_err(admin_error)?;
    }
    let now = now();
    if let Some(t) = expires
        && t <= now
    {
        return Err(bad_request(
            "invalid_expiry",
            format!("the expiry {} is not in the future", rfc3339_utc(t)),
        ));
    }
    let Some(out) = io.out.as_deref_mut() else {
        return Err(ApiError::internal("a backup needs a stream to write to"));
    };
    let mut progress = |done, total| {
        if let Some(p) = io.progress.as_deref_mut() {
            p(done, Some(total));
        }
    };
    let report = store
        .create_backup(
            &tenant_id,
            &volume_id,
            snapshot,
            base,
            expires,
            out,
            &mut progress,
        )
        .map_err(backup_error)?;
    Ok(Reply::BackupCreated(BackupView {
        id: report.id.to_string(),
        kind: kind_name(report.kind).to_owned(),
        tenant: tenant.to_owned(),
        volume: volume.to_owned(),
        snapshot: report.snapshot,
        base: report.base,
        created: rfc3339_utc(now),
        bytes: report.bytes,
        blocks: report.mapped_blocks,
        unmapped_blocks: report.unmapped_blocks,
        expires: report.expires.map(rfc3339_utc),
    }))
}

fn verify(
    store: &Store,
    files: &[String],
    structure_only: bool,
    bundle: Option<&str>,
    passphrase: Option<&Zeroizing<String>>,
) -> Result<Reply, ApiError> {
    if structure_only && bundle.is_some() {
        return Err(bad_request(
            "invalid_field",
            "a structure-only check uses no keys: give no bundle",
        ));
    }
    let inputs = open_files(files)?;
    if structure_only {
        return check_structure(inputs).map(Reply::BackupVerified);
    }
    let bundle = bundle
        .map(|path| open_bundle(store, path, passphrase))
        .transpose()?;
    let (keys, source) = match &bundle {
        Some(b) => (BackupKeys::Bundle(b), "bundle"),
        None => (BackupKeys::Store, "store"),
    };
    let check = store.verify_backups(inputs, keys).map_err(backup_error)?;
    Ok(Reply::BackupVerified(check_view(source, files, &check)))
}

fn keys(store: &Store, tenant: Option<&str>) -> Result<Reply, ApiError> {
    let tenant = tenant.map(tenant_id).transpose()?;
    if let Some(t) = &tenant
        && store.tenant(t).map_err(query_error)?.is_none()
    {
        return Err(no_such_tenant(t));
    }
    let mut keys = store.backup_keys(tenant.as_ref()).map_err(admin_error)?;
    keys.sort_by(|a, b| {
        (a.tenant.as_str(), a.created, a.id).cmp(&(b.tenant.as_str(), b.created, b.id))
    });
    Ok(Reply::BackupKeys(
        keys.into_iter()
            .map(|k| BackupKeyView {
                id: k.id.to_string(),
                tenant: k.tenant.to_string(),
                volume: k.volume,
                snapshot: k.snapshot,
                created: rfc3339_utc(k.created),
                expires: k.expires.map(rfc3339_utc),
            })
            .collect(),
    ))
}

fn drill(store: &Store, dir: &str) -> Result<Reply, ApiError> {
    let path = absolute(dir)?;
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(bad_request(
                "not_a_directory",
                format!("{dir} is not a directory"),
            ));
        }
        Err(e) => return Err(file_error(dir, &e)),
    }
    // The scratch store goes into the store's own directory: same file
    // system, same permissions, and removed when the drill ends.
    let report = store.drill(path, store.dir()).map_err(backup_error)?;
    let volumes: Vec<DrillVolumeView> = report
        .volumes
        .iter()
        .map(|v| DrillVolumeView {
            tenant: v.tenant.clone(),
            volume: v.volume.clone(),
            snapshot: v.snapshot.clone(),
            files: v.files.iter().map(|p| p.display().to_string()).collect(),
            blocks: v.blocks,
            ok: v.error.is_none(),
            error: v.error.clone(),
        })
        .collect();
    Ok(Reply::Drilled(DrillView {
        ok: volumes.iter().all(|v| v.ok),
        volumes,
        skipped: report
            .skipped
            .iter()
            .map(|(p, why)| DrillSkipView {
                file: p.display().to_string(),
                reason: why.clone(),
            })
            .collect(),
    }))
}

fn restore(
    store: &Store,
    files: &[String],
    tenant: &str,
    volume: &str,
    bundle: Option<&str>,
    passphrase: Option<&Zeroizing<String>>,
    io: &mut OpIo<'_>,
) -> Result<Reply, ApiError> {
    let (tenant_id, volume_id) = (tenant_id(tenant)?, volume_id(volume)?);
    // Refused before any file is read (the store checks again).
    if store.tenant(&tenant_id).map_err(query_error)?.is_some()
        && store
            .volumes(&tenant_id)
            .map_err(query_error)?
            .iter()
            .any(|v| v.id == volume_id)
    {
        return Err(backup_error(BackupError::TargetExists {
            tenant: tenant_id,
            volume: volume_id,
        }));
    }
    let inputs = open_files(files)?;
    let bundle = bundle
        .map(|path| open_bundle(store, path, passphrase))
        .transpose()?;
    let keys = match &bundle {
        Some(b) => BackupKeys::Bundle(b),
        None => BackupKeys::Store,
    };
    let mut progress = |done| {
        if let Some(p) = io.progress.as_deref_mut() {
            p(done, None);
        }
    };
    let check = store
        .restore_backups(inputs, &tenant_id, &volume_id, keys, &mut progress)
        .map_err(backup_error)?;
    let last = check
        .headers
        .last()
        .ok_or_else(|| ApiError::internal("a restore read no file"))?;
    Ok(Reply::Restored(RestoreView {
        tenant: tenant.to_owned(),
        volume: volume.to_owned(),
        snapshot: last.snapshot_name.clone(),
        size: last.volume_size,
        files: check.headers.len(),
        blocks: check.mapped_blocks,
        bytes: check.bytes,
    }))
}

fn export(
    store: &Store,
    tenant: &str,
    passphrase: Option<&Zeroizing<String>>,
) -> Result<Reply, ApiError> {
    let tenant_id = tenant_id(tenant)?;
    if store.tenant(&tenant_id).map_err(query_error)?.is_none() {
        return Err(no_such_tenant(&tenant_id));
    }
    let passphrase = passphrase.map(|p| Passphrase::new(p.to_string()));
    if passphrase
        .as_ref()
        .is_some_and(|p| p.expose_secret().is_empty())
    {
        return Err(bad_request("invalid_field", "the passphrase is empty"));
    }
    let keys = store
        .backup_keys(Some(&tenant_id))
        .map_err(admin_error)?
        .len();
    let sealed = store
        .seal_tenant_bundle(
            &tenant_id,
            passphrase.as_ref().map(|p| (p, Argon2Params::DEFAULT)),
        )
        .map_err(backup_error)?;
    let protection = TenantBundle::inspect(&sealed)
        .map_err(|e| ApiError::internal(format!("the bundle just sealed does not read: {e}")))?;
    tracing::info!(tenant = %tenant_id, keys, protection = %protection, "tenant recovery bundle exported");
    Ok(Reply::TenantKeysExported(BundleView {
        tenant: tenant.to_owned(),
        keys,
        protection: protection.to_string(),
        bundle: hex(&sealed),
    }))
}

fn check_view(source: &str, files: &[String], check: &BackupCheck) -> BackupCheckView {
    BackupCheckView {
        keys: source.to_owned(),
        files: files
            .iter()
            .zip(&check.headers)
            .map(|(f, h)| file_view(f, h))
            .collect(),
        blocks: check.mapped_blocks,
        blocks_authenticated: check.blocks_authenticated,
        bytes: check.bytes,
    }
}

/// Opens backup files named by absolute paths.
pub(crate) fn open_files(files: &[String]) -> Result<BackupInputs<'static>, ApiError> {
    if files.is_empty() {
        return Err(bad_request("missing_field", "no backup file given"));
    }
    let mut inputs: BackupInputs<'static> = Vec::with_capacity(files.len());
    for name in files {
        let path = absolute(name)?;
        let file = File::open(path).map_err(|e| file_error(name, &e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(bad_request(
                "not_a_file",
                format!("{name} is a directory, not a backup file"),
            ));
        }
        inputs.push((
            name.clone(),
            Box::new(BufReader::with_capacity(READ_BUFFER, file)),
        ));
    }
    Ok(inputs)
}

/// Reads and opens a recovery bundle: with its passphrase, or with the
/// store's master key when it is sealed to one.
fn open_bundle(
    store: &Store,
    path: &str,
    passphrase: Option<&Zeroizing<String>>,
) -> Result<TenantBundle, ApiError> {
    let file = File::open(absolute(path)?).map_err(|e| file_error(path, &e))?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(path, &e))?;
    let refused = |e: &dyn std::error::Error| {
        unprocessable(
            "bundle_refused",
            format!("recovery bundle {path}: {}", message(e)),
        )
    };
    match TenantBundle::inspect(&bytes).map_err(|e| refused(&e))? {
        BundleProtection::Passphrase(_) if passphrase.is_none() => {
            return Err(bad_request(
                "passphrase_required",
                format!(
                    "the recovery bundle {path} is sealed under a passphrase: give it \
                     (--passphrase-file)"
                ),
            ));
        }
        BundleProtection::Recipient(key) if passphrase.is_some() => {
            return Err(bad_request(
                "invalid_field",
                format!(
                    "the recovery bundle {path} is sealed to master key {key}, not a \
                     passphrase: give none, it opens with the store's master key"
                ),
            ));
        }
        _ => {}
    }
    let passphrase = passphrase.map(|p| Passphrase::new(p.to_string()));
    store
        .open_tenant_bundle(&bytes, passphrase.as_ref())
        .map_err(|e| refused(&e))
}

/// A path the server can use: absolute, since it does not share the
/// caller's working directory.
fn absolute(name: &str) -> Result<&Path, ApiError> {
    let path = Path::new(name);
    if !path.is_absolute() {
        return Err(bad_request(
            "relative_path",
            format!(
                "{name} is not an absolute path (the server does not know the caller's working directory)"
            ),
        ));
    }
    Ok(path)
}

fn file_error(name: &str, e: &std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_file",
            format!("no file {name}"),
        ),
        std::io::ErrorKind::PermissionDenied => bad_request(
            "unreadable_file",
            format!(
                "cannot read {name}: permission denied (files are read as uid {}, the user \
                 that runs the operation: the server's, when one runs)",
                rustix::process::geteuid().as_raw()
            ),
        ),
        _ => bad_request("unreadable_file", format!("cannot read {name}: {e}")),
    }
}

/// How a backup error reaches the API: files that fail a check are `422`
/// (exit code 5), a missing key `404`, an existing target `409`.
pub(crate) fn backup_error(e: BackupError) -> ApiError {
    let code = match &e {
        BackupError::Format { .. } => "backup_damaged",
        BackupError::Authentication { .. }
        | BackupError::Block { .. }
        | BackupError::Key { .. } => "backup_unauthentic",
        BackupError::Chain { .. } => "backup_chain",
        BackupError::Bundle { .. } => "bundle_refused",
        BackupError::NoKey { .. } => {
            return ApiError::new(StatusCode::NOT_FOUND, "no_backup_key", message(&e));
        }
        BackupError::BaseNotOlder { .. } => {
            return ApiError::new(StatusCode::CONFLICT, "base_not_older", message(&e));
        }
        BackupError::TargetExists { .. } => {
            return ApiError::new(StatusCode::CONFLICT, "volume_exists", message(&e));
        }
        _ => {
            return match e {
                BackupError::Admin(e) => admin_error(e),
                BackupError::Volume(e) => volume_error(e),
                other => ApiError::internal(message(&other)),
            };
        }
    };
    unprocessable(code, message(&e))
}

fn unprocessable(code: &str, message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// An error and its causes on one line, each cause once (some messages
/// repeat their source's).
fn message(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Checks that `next` continues the chain `prev` ends (as the store does
/// when it has keys).
fn chain_fits(file: &str, prev: &BackupHeader, next: &BackupHeader) -> Result<(), ApiError> {
    let problem = if next.kind != BackupKind::Incremental {
        "only incremental backups may follow the first file of a chain".to_owned()
    } else if (next.tenant.as_str(), next.volume.as_str())
        != (prev.tenant.as_str(), prev.volume.as_str())
    {
        format!(
            "it is a backup of {}/{}, the chain's files are of {}/{}",
            next.tenant, next.volume, prev.tenant, prev.volume
        )
    } else if next.base_snapshot_uid != prev.snapshot_uid {
        format!(
            "its base is not snapshot {} the previous file holds: files are out of order or one \
             is missing",
            prev.snapshot_name
        )
    } else if next.block_size != prev.block_size {
        "its block size differs from the previous file's".to_owned()
    } else {
        return Ok(());
    };
    Err(unprocessable("backup_chain", format!("{file}: {problem}")))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(hex(&bytes), "00017f80ff");
        assert_eq!(from_hex("00017F80ff").unwrap(), bytes);
        assert!(from_hex("0").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn a_file_that_is_no_backup_is_refused_as_damaged() {
        let input: Box<dyn Read> = Box::new(std::io::Cursor::new(b"not a backup".to_vec()));
        let e = check_structure(vec![("x.bsb".to_owned(), input)]).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code.as_str()),
            (422, "backup_damaged")
        );
        assert!(e.message.starts_with("x.bsb: "), "{}", e.message);
        assert_eq!(e.exit_code(), super::super::api::exit::REFUSED);
    }
}
