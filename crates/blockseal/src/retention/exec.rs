//! Carries out the planner's actions, one at a time, and reports each.
//!
//! Snapshots are taken and deleted through the admin service, as an
//! administrator's would be (a snapshot that clients read is not deleted
//! under them unless forced, and the service audits both with the actor
//! `retention`); everything else goes to the store and the backup directory
//! here, and [`super::Retention::pass`] audits it. A failed action changes
//! nothing the next pass cannot redo: backups are written under a temporary
//! name, synced, then renamed.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use blockseal_keys::{TenantId, VolumeId};

use super::plan::{Action, BackupFile, BackupName};
use super::state::{OWNER_FILE, UNFINISHED_SUFFIX, owner_text};
use crate::admin::api::{Op, Reply};
use crate::admin::service::{Caller, Service};
use crate::time::rfc3339_utc;

/// The audit log's actor for everything the scheduler does.
pub(crate) const ACTOR: &str = "retention";

/// How one action (or, for key expiry, one key) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The action's [`Action::key`], for retries.
    pub(crate) key: String,
    /// The action's name in the audit log.
    pub(crate) action: &'static str,
    /// What it acted on.
    pub(crate) target: String,
    /// `Ok(detail)` or `Err(what failed)`.
    pub(crate) result: Result<String, String>,
    /// Whether the admin service has audited it already.
    pub(crate) audited: bool,
}

/// Where the actions run.
pub(crate) struct Executor<'a> {
    pub(crate) service: &'a Service,
    pub(crate) backup_dir: Option<&'a Path>,
    pub(crate) now: u64,
    /// Set at shutdown: no further action starts, and a backup being written
    /// fails at its next write.
    pub(crate) stop: &'a AtomicBool,
}

impl Executor<'_> {
    /// Runs `actions` in order. A backup of a snapshot this pass failed to
    /// take is not attempted.
    pub(crate) fn run(&self, actions: Vec<Action>) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let mut not_taken: Vec<String> = Vec::new();
        for action in actions {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let key = action.key();
            let audited = matches!(
                action,
                Action::CreateSnapshot { .. } | Action::DeleteSnapshot { .. }
            );
            let result = match &action {
                Action::CreateSnapshot {
                    tenant,
                    volume,
                    name,
                } => {
                    let result = self.create_snapshot(tenant, volume, name);
                    if result.is_err() {
                        not_taken.push(action.target());
                    }
                    result
                }
                Action::WriteBackup {
                    tenant,
                    volume,
                    file,
                    base,
                    expires,
                } => {
                    if not_taken.contains(&action.target()) {
                        Err("its snapshot could not be taken".to_owned())
                    } else {
                        self.write_backup(tenant, volume, file, base.as_deref(), *expires)
                    }
                }
                Action::DeleteSnapshot {
                    tenant,
                    volume,
                    name,
                    force,
                } => self.delete_snapshot(tenant, volume, name, *force),
                Action::AgeData {
                    tenant,
                    volume,
                    cutoff,
                } => self.age_data(tenant, volume, *cutoff),
                Action::ExpireBackupKeys => {
                    outcomes.extend(self.expire_keys(&key));
                    continue;
                }
                Action::DeleteBackupFile { file } => self.delete_file(file),
                Action::DeleteUnfinished { path } => self.delete_unfinished(path),
            };
            outcomes.push(Outcome {
                key,
                action: action.name(),
                target: action.target(),
                result,
                audited,
            });
        }
        outcomes
    }

    fn caller() -> Caller {
        Caller {
            actor: ACTOR.to_owned(),
        }
    }

    fn create_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
    ) -> Result<String, String> {
        let op = Op::CreateSnapshot {
            tenant: tenant.to_string(),
            volume: volume.to_string(),
            snapshot: name.to_owned(),
        };
        self.service
            .run(&Self::caller(), &op)
            .map(|_| format!("taken={}", rfc3339_utc(self.now)))
            .map_err(|e| format!("{}: {}", e.code, e.message))
    }

    fn delete_snapshot(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        name: &str,
        force: bool,
    ) -> Result<String, String> {
        let op = Op::DeleteSnapshot {
            tenant: tenant.to_string(),
            volume: volume.to_string(),
            snapshot: name.to_owned(),
            force,
        };
        match self.service.run(&Self::caller(), &op) {
            Ok(Reply::Deleted(d)) => Ok(format!(
                "force={force} connections_closed={}",
                d.connections_closed
            )),
            Ok(_) => Ok(format!("force={force}")),
            Err(e) => Err(format!("{}: {}", e.code, e.message)),
        }
    }

    fn age_data(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        cutoff: u64,
    ) -> Result<String, String> {
        let store = self.service.store();
        store
            .mark_age(tenant, volume, self.now)
            .map_err(|e| format!("age mark: {}", crate::exports::error_chain(&e)))?;
        let blocks = store
            .discard_older_than(tenant, volume, cutoff)
            .map_err(|e| format!("discard: {}", crate::exports::error_chain(&e)))?;
        Ok(format!(
            "age_mark={} cutoff={} blocks_discarded={blocks}",
            rfc3339_utc(self.now),
            rfc3339_utc(cutoff)
        ))
    }

    /// One outcome per key destroyed (or one failure).
    fn expire_keys(&self, key: &str) -> Vec<Outcome> {
        match self.service.store().expire_backup_keys(self.now) {
            Ok(expired) => expired
                .into_iter()
                .map(|k| Outcome {
                    key: key.to_owned(),
                    action: "retention.backup-key-expire",
                    target: format!("{}/{}@{}", k.tenant, k.volume, k.snapshot),
                    result: Ok(format!(
                        "backup={} expires={}",
                        k.id,
                        k.expires.map_or_else(|| "-".to_owned(), rfc3339_utc)
                    )),
                    audited: false,
                })
                .collect(),
            Err(e) => vec![Outcome {
                key: key.to_owned(),
                action: "retention.backup-key-expire",
                target: "-".to_owned(),
                result: Err(crate::exports::error_chain(&e)),
                audited: false,
            }],
        }
    }

    fn write_backup(
        &self,
        tenant: &TenantId,
        volume: &VolumeId,
        file: &BackupName,
        base: Option<&str>,
        expires: u64,
    ) -> Result<String, String> {
        let root = self.backup_dir.ok_or("no backup_dir is configured")?;
        claim(root, self.service.store().dir())?;
        let dir = root.join(tenant.as_str()).join(volume.as_str());
        make_dirs(root, &[tenant.as_str(), volume.as_str()])?;
        let name = file.file_name();
        let path = dir.join(&name);
        let temp = dir.join(format!(".{name}{UNFINISHED_SUFFIX}"));
        if path.exists() {
            return Err(format!("{} exists already", path.display()));
        }
        let written = (|| -> Result<_, String> {
            let out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
            let mut writer = Stoppable {
                inner: BufWriter::with_capacity(1 << 20, &out),
                stop: self.stop,
            };
            let report = self
                .service
                .store()
                .create_backup(
                    tenant,
                    volume,
                    &file.snapshot,
                    base,
                    Some(expires),
                    &mut writer,
                    &mut |_, _| {},
                )
                .map_err(|e| crate::exports::error_chain(&e))?;
            writer
                .inner
                .flush()
                .and_then(|()| out.sync_all())
                .map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
            Ok(report)
        })();
        let report = match written {
            Ok(report) => report,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&temp, &path).and_then(|()| sync_dir(&dir)) {
            let _ = fs::remove_file(&temp);
            return Err(format!("cannot put {} in place: {e}", path.display()));
        }
        Ok(format!(
            "kind={} base={} file={tenant}/{volume}/{name} bytes={} backup={} expires={}",
            file.kind.word(),
            base.unwrap_or("-"),
            report.bytes,
            report.id,
            rfc3339_utc(expires)
        ))
    }

    fn delete_file(&self, file: &BackupFile) -> Result<String, String> {
        let root = self.backup_dir.ok_or("no backup_dir is configured")?;
        let dir = root.join(file.tenant.as_str()).join(file.volume.as_str());
        let path = dir.join(file.name.file_name());
        remove(&path)?;
        // Empty directories of volumes and tenants go too (a non-empty one
        // stays: removing it fails).
        if fs::remove_dir(&dir).is_ok() {
            let _ = fs::remove_dir(root.join(file.tenant.as_str()));
        }
        Ok(format!(
            "snapshot={} reason=no key left",
            file.name.snapshot
        ))
    }

    fn delete_unfinished(&self, relative: &str) -> Result<String, String> {
        let root = self.backup_dir.ok_or("no backup_dir is configured")?;
        remove(&root.join(relative))?;
        Ok("reason=unfinished".to_owned())
    }
}

/// Fails every write once `stop` is set, so that a long backup ends at
/// shutdown.
struct Stoppable<'a, W> {
    inner: W,
    stop: &'a AtomicBool,
}

impl<W: Write> Write for Stoppable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            // Not `Interrupted`: `write_all` would retry that.
            return Err(io::Error::other("the server is shutting down"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the owner file of a backup directory that has none (creating the
/// directory, owner only): from now on it is this store's.
fn claim(root: &Path, store_dir: &Path) -> Result<(), String> {
    let path = root.join(OWNER_FILE);
    if path.exists() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if let Some(parent) = root.parent() {
        let _ = sync_dir(parent);
    }
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(owner_text(store_dir).as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| sync_dir(root));
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot write {}: {e}", path.display())),
    }
}

/// Creates `root/a/b/...` (mode 0700) as needed, syncing each parent of a
/// directory created so that the new entry survives a crash.
fn make_dirs(root: &Path, parts: &[&str]) -> Result<(), String> {
    let mut dir = root.to_path_buf();
    for part in parts {
        let parent = dir.clone();
        dir.push(part);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                sync_dir(&parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))?
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
    Ok(())
}

fn remove(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Ok(()) => {}
        // Gone already: what the action wanted.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot delete {}: {e}", path.display())),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
