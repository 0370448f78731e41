//! Reads what the planner needs from the store and the backup directory, and
//! changes nothing: the executor creates the backup directory and its owner
//! file when it first writes a backup.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use blockseal_keys::{TenantId, VolumeId};
use blockseal_volume::{AdminError, Store};

use super::plan::{BackupDirState, BackupFile, BackupName, KeyState, State, VolumeState};

/// The file naming the store a backup directory belongs to.
pub(crate) const OWNER_FILE: &str = ".blockseal-store";

/// Unfinished backups are written under this suffix, then renamed.
pub(crate) const UNFINISHED_SUFFIX: &str = ".tmp";

/// What [`gather`] found, and what it could not read.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// The planner's input.
    pub(crate) state: State,
    /// Volumes or directories that could not be read: they are left alone
    /// this pass.
    pub(crate) problems: Vec<String>,
}

/// Reads the store's volumes, snapshots and backup keys, and the backup
/// directory (`None`: not configured). Fails only when nothing could be
/// planned safely: without the backup keys every backup file would look
/// expired.
pub(crate) fn gather(store: &Store, backup_dir: Option<&Path>) -> Result<Gathered, String> {
    let mut gathered = Gathered::default();
    let tenants = store.tenants().map_err(|e| {
        format!(
            "cannot list the tenants: {}",
            crate::exports::error_chain(&e)
        )
    })?;
    for tenant in tenants {
        let volumes = match store.volumes(&tenant.id) {
            Ok(volumes) => volumes,
            Err(e) => {
                gathered.problems.push(format!(
                    "cannot list the volumes of {}: {}",
                    tenant.id,
                    crate::exports::error_chain(&e)
                ));
                continue;
            }
        };
        for info in volumes {
            match volume_state(store, &info.tenant, &info.id) {
                Ok(Some(state)) => gathered.state.volumes.push(state),
                // Deleted since it was listed.
                Ok(None) => {}
                Err(e) => gathered.problems.push(format!(
                    "cannot read {}/{}: {}",
                    info.tenant,
                    info.id,
                    crate::exports::error_chain(&e)
                )),
            }
        }
    }
    let keys = store.backup_keys(None).map_err(|e| {
        format!(
            "cannot list the backup keys: {}",
            crate::exports::error_chain(&e)
        )
    })?;
    gathered.state.keys = keys
        .into_iter()
        .map(|k| KeyState {
            tenant: k.tenant,
            volume: k.volume,
            snapshot: k.snapshot,
            expires: k.expires,
        })
        .collect();
    if let Some(dir) = backup_dir {
        let scanned = check_owner(dir, store.dir())
            .and_then(|claimed| scan(dir).map(|state| BackupDirState { claimed, ..state }));
        match scanned {
            Ok(state) => gathered.state.backup_dir = Some(state),
            Err(problem) => gathered.problems.push(problem),
        }
    }
    Ok(gathered)
}

fn volume_state(
    store: &Store,
    tenant: &TenantId,
    volume: &VolumeId,
) -> Result<Option<VolumeState>, AdminError> {
    let gone = |e: &AdminError| {
        matches!(
            e,
            AdminError::NoSuchTenant { .. } | AdminError::NoSuchVolume { .. }
        )
    };
    let snapshots = match store.snapshot_list(tenant, volume) {
        Ok(s) => s,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let epoch_started = match store.epoch_started(tenant, volume) {
        Ok(t) => t,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(VolumeState {
        tenant: tenant.clone(),
        volume: volume.clone(),
        snapshots: snapshots.into_iter().map(|s| s.name).collect(),
        epoch_started,
    }))
}

/// The store directory as the owner file names it.
pub(crate) fn owner_text(store_dir: &Path) -> String {
    let dir = fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    format!("{}\n", dir.display())
}

/// Whether the backup directory names this store as its owner (`false`:
/// it names none yet; it is claimed at the first backup). Refuses one that
/// names another store: two servers sharing a directory would delete each
/// other's backups (each holds only its own keys).
fn check_owner(backup_dir: &Path, store_dir: &Path) -> Result<bool, String> {
    let path = backup_dir.join(OWNER_FILE);
    match fs::read_to_string(&path) {
        Ok(text) if text == owner_text(store_dir) => Ok(true),
        Ok(text) => Err(format!(
            "the backup directory {} belongs to the store at {} ({}), not to this one at {}; \
             give each server a backup directory of its own (or, if this store moved, put its \
             directory in that file)",
            backup_dir.display(),
            text.trim_end(),
            path.display(),
            owner_text(store_dir).trim_end()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Lists `backup_dir/<tenant>/<volume>/` (a directory not made yet holds
/// nothing). Names that are not a tenant, a volume or a scheduled backup
/// are none of the scheduler's business, and symbolic links are never
/// followed.
fn scan(backup_dir: &Path) -> Result<BackupDirState, String> {
    let mut state = BackupDirState::default();
    let tenants = match subdirectories::<TenantId>(backup_dir) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(state),
        Err(e) => return Err(format!("cannot read {}: {e}", backup_dir.display())),
    };
    for (tenant, tenant_dir) in tenants {
        let volumes = subdirectories::<VolumeId>(&tenant_dir)
            .map_err(|e| format!("cannot read {}: {e}", tenant_dir.display()))?;
        for (volume, volume_dir) in volumes {
            let entries = fs::read_dir(&volume_dir)
                .map_err(|e| format!("cannot read {}: {e}", volume_dir.display()))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| format!("cannot read {}: {e}", volume_dir.display()))?;
                let is_file = entry
                    .file_type()
                    .map_err(|e| format!("cannot read {}: {e}", entry.path().display()))?
                    .is_file();
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !is_file {
                    continue;
                }
                if let Some(finished) = name
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(UNFINISHED_SUFFIX))
                    && BackupName::parse(finished).is_some()
                {
                    state.unfinished.push(format!("{tenant}/{volume}/{name}"));
                } else if let Some(parsed) = BackupName::parse(&name) {
                    state.files.push(BackupFile {
                        tenant: tenant.clone(),
                        volume: volume.clone(),
                        name: parsed,
                    });
                }
            }
        }
    }
    state.files.sort();
    state.unfinished.sort();
    Ok(state)
}

/// The subdirectories of `dir` whose names parse as `T`.
fn subdirectories<T: std::str::FromStr>(dir: &Path) -> std::io::Result<Vec<(T, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(parsed) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push((parsed, entry.path()));
        }
    }
    Ok(out)
}
