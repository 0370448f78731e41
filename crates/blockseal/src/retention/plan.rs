//! What retention does next: a pure function of the settings, the time and
//! what the store and the backup directory hold ([`State`]), so that every
//! schedule, boundary and restart is a unit test. Nothing here reads a clock,
//! the store or a file; `state` gathers, `exec` acts.
//!
//! All the state is on disk: the scheduled snapshots carry the time they were
//! taken in their names (`auto-20260301t120000z`), the backup files theirs in
//! theirs, the store knows when a volume's current epoch began (its last age
//! mark or snapshot) and which backup keys it still holds. A restart neither
//! redoes nor skips work.

use std::collections::BTreeMap;

use blockseal_keys::{TenantId, VolumeId};

use super::config::RetentionConfig;
use crate::time::{parse_utc_stamp, utc_stamp};

/// Names of scheduled snapshots start with this; nothing else is ever
/// deleted by the scheduler.
pub(crate) const AUTO_PREFIX: &str = "auto-";

/// Backup files end with this.
pub(crate) const BACKUP_SUFFIX: &str = ".bsbackup";

/// How long past its expiry a scheduled snapshot that clients still read is
/// kept; then their connections are closed and it goes.
pub(crate) const FORCE_AFTER: u64 = 86_400;

/// Age marks are this far apart (the precision of data retention).
pub(crate) const AGE_MARK_EVERY: u64 = 86_400;

/// The name of the scheduled snapshot taken at `now`. Snapshot names are
/// lowercase, so the stamp is too.
pub(crate) fn auto_snapshot_name(now: u64) -> String {
    format!("{AUTO_PREFIX}{}", utc_stamp(now).to_ascii_lowercase())
}

/// When a scheduled snapshot was taken, from its name; `None` for a name the
/// scheduler did not give.
pub(crate) fn auto_snapshot_time(name: &str) -> Option<u64> {
    let stamp = name.strip_prefix(AUTO_PREFIX)?;
    // Only the scheduler's own spelling: an operator's `auto-2026...T...Z`
    // cannot exist (snapshot names are lowercase), and neither can anything
    // longer.
    if stamp.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    parse_utc_stamp(stamp)
}

/// A full backup, or an incremental one from the previous backup's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum BackupKind {
    /// Every block the snapshot sees.
    Full,
    /// What changed since the base snapshot.
    Incremental,
}

impl BackupKind {
    /// The word in file names: `full` or `incr`.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incr",
        }
    }

    /// The word in replies and the audit log: `full` or `incremental`.
    pub(crate) fn word(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        }
    }
}

/// What a scheduled backup's file name says:
/// `<UTC time>-<full|incr>-<snapshot>.bsbackup`, in
/// `backup_dir/<tenant>/<volume>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BackupName {
    /// When it was written (seconds since the Unix epoch).
    pub(crate) time: u64,
    /// Full or incremental.
    pub(crate) kind: BackupKind,
    /// The snapshot backed up.
    pub(crate) snapshot: String,
}

impl BackupName {
    /// The file name.
    pub(crate) fn file_name(&self) -> String {
        format!(
            "{}-{}-{}{BACKUP_SUFFIX}",
            utc_stamp(self.time),
            self.kind.tag(),
            self.snapshot
        )
    }

    /// Parses a file name; `None` for files the scheduler did not write.
    pub(crate) fn parse(file_name: &str) -> Option<BackupName> {
        let rest = file_name.strip_suffix(BACKUP_SUFFIX)?;
        let stamp = rest.get(..16)?;
        if stamp.bytes().any(|b| b.is_ascii_lowercase()) {
            return None;
        }
        let time = parse_utc_stamp(stamp)?;
        let rest = rest.get(16..)?;
        let (kind, snapshot) = if let Some(s) = rest.strip_prefix("-full-") {
            (BackupKind::Full, s)
        } else if let Some(s) = rest.strip_prefix("-incr-") {
            (BackupKind::Incremental, s)
        } else {
            return None;
        };
        blockseal_volume::check_snapshot_name(snapshot).ok()?;
        Some(BackupName {
            time,
            kind,
            snapshot: snapshot.to_owned(),
        })
    }
}

/// One volume as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeState {
    /// The tenant.
    pub(crate) tenant: TenantId,
    /// The volume.
    pub(crate) volume: VolumeId,
    /// The names of all its snapshots (scheduled or not).
    pub(crate) snapshots: Vec<String>,
    /// When its current epoch began: its last age mark or snapshot (its
    /// creation before either).
    pub(crate) epoch_started: u64,
}

/// A backup key the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyState {
    /// The tenant.
    pub(crate) tenant: TenantId,
    /// The volume backed up.
    pub(crate) volume: String,
    /// The snapshot backed up.
    pub(crate) snapshot: String,
    /// When the key is destroyed (never: `None`).
    pub(crate) expires: Option<u64>,
}

/// A backup file in `backup_dir/<tenant>/<volume>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BackupFile {
    /// The tenant (its directory).
    pub(crate) tenant: TenantId,
    /// The volume (its directory).
    pub(crate) volume: VolumeId,
    /// What the file name says.
    pub(crate) name: BackupName,
}

/// The backup directory as the planner sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BackupDirState {
    /// The backup files, of volumes that exist or not.
    pub(crate) files: Vec<BackupFile>,
    /// Unfinished backups a crash or a failed write left (paths relative to
    /// `backup_dir`): the scheduler is their only writer, so between passes
    /// they are garbage.
    pub(crate) unfinished: Vec<String>,
    /// Whether the directory names this store as its owner: until the first
    /// backup says so, nothing in it is deleted.
    pub(crate) claimed: bool,
}

/// Everything the planner needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Every volume of the store.
    pub(crate) volumes: Vec<VolumeState>,
    /// Every backup key the store holds.
    pub(crate) keys: Vec<KeyState>,
    /// The backup directory, when one is configured and usable.
    pub(crate) backup_dir: Option<BackupDirState>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Take a scheduled snapshot.
    CreateSnapshot {
        tenant: TenantId,
        volume: VolumeId,
        name: String,
    },
    /// Write a backup of a snapshot into the backup directory.
    WriteBackup {
        tenant: TenantId,
        volume: VolumeId,
        file: BackupName,
        /// The base snapshot of an incremental backup.
        base: Option<String>,
        /// When the backup's key is destroyed.
        expires: u64,
    },
    /// Delete an expired scheduled snapshot; `force` closes the connections
    /// of clients still reading it.
    DeleteSnapshot {
        tenant: TenantId,
        volume: VolumeId,
        name: String,
        force: bool,
    },
    /// End the volume's epoch here (an age mark), then discard the blocks
    /// written before `cutoff`.
    AgeData {
        tenant: TenantId,
        volume: VolumeId,
        cutoff: u64,
    },
    /// Destroy the backup keys whose time has come.
    ExpireBackupKeys,
    /// Delete a backup file whose key is gone.
    DeleteBackupFile { file: BackupFile },
    /// Delete an unfinished backup (path relative to `backup_dir`).
    DeleteUnfinished { path: String },
}

impl Action {
    /// The action's name in the audit log and in replies.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Action::CreateSnapshot { .. } => "snapshot.create",
            Action::WriteBackup { .. } => "retention.backup",
            Action::DeleteSnapshot { .. } => "snapshot.delete",
            Action::AgeData { .. } => "retention.data",
            Action::ExpireBackupKeys => "retention.backup-keys-expire",
            Action::DeleteBackupFile { .. } | Action::DeleteUnfinished { .. } => {
                "retention.backup-file-delete"
            }
        }
    }

    /// What it acts on: `tenant/volume`, `tenant/volume@snapshot`, a file.
    pub(crate) fn target(&self) -> String {
        match self {
            Action::CreateSnapshot {
                tenant,
                volume,
                name,
            }
            | Action::DeleteSnapshot {
                tenant,
                volume,
                name,
                ..
            } => format!("{tenant}/{volume}@{name}"),
            Action::WriteBackup {
                tenant,
                volume,
                file,
                ..
            } => format!("{tenant}/{volume}@{}", file.snapshot),
            Action::AgeData { tenant, volume, .. } => format!("{tenant}/{volume}"),
            Action::ExpireBackupKeys => "-".to_owned(),
            Action::DeleteBackupFile { file } => {
                format!("{}/{}/{}", file.tenant, file.volume, file.name.file_name())
            }
            Action::DeleteUnfinished { path } => path.clone(),
        }
    }

    /// A stable key for the action, to tell retries of it apart.
    pub(crate) fn key(&self) -> String {
        format!("{} {}", self.name(), self.target())
    }
}

/// What is due for one volume, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeSchedule {
    /// The tenant.
    pub(crate) tenant: TenantId,
    /// The volume.
    pub(crate) volume: VolumeId,
    /// When the next scheduled snapshot is taken (`now` when due).
    pub(crate) next_snapshot: u64,
    /// The scheduled snapshots: name, taken, deleted (oldest first).
    pub(crate) snapshots: Vec<(String, u64, u64)>,
    /// Backups, when a backup directory is configured.
    pub(crate) backup: Option<BackupSchedule>,
    /// Data retention, when the tenant is opted in.
    pub(crate) data: Option<DataSchedule>,
}

/// A volume's backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackupSchedule {
    /// When the next backup is written (`now` when due).
    pub(crate) next: u64,
    /// Its kind, as things stand.
    pub(crate) kind: BackupKind,
    /// The base snapshot of an incremental one.
    pub(crate) base: Option<String>,
    /// The volume's backup files with their keys' expiry (`None`: no key
    /// left, the file goes at the next pass; `Some(None)`: never expires).
    pub(crate) files: Vec<(BackupName, Option<Option<u64>>)>,
}

/// A volume's data retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataSchedule {
    /// When the next age mark and discard happen (`now` when due).
    pub(crate) next: u64,
    /// The discard then takes the blocks written before this time (to the
    /// precision of the age marks).
    pub(crate) written_before: u64,
}

/// The actions due at `now`, in the order they are to run: per volume its
/// snapshot, its backup (of that snapshot), its expired snapshots, its data;
/// then the backup keys due, and the files of backups whose keys are gone.
pub(crate) fn plan(config: &RetentionConfig, now: u64, state: &State) -> Vec<Action> {
    let live = LiveKeys::new(&state.keys, now);
    let mut actions = Vec::new();
    for volume in &state.volumes {
        plan_volume(config, now, volume, state, &live, &mut actions);
    }
    if state
        .keys
        .iter()
        .any(|k| k.expires.is_some_and(|e| e <= now))
    {
        actions.push(Action::ExpireBackupKeys);
    }
    if let Some(dir) = state.backup_dir.as_ref().filter(|d| d.claimed) {
        for file in &dir.files {
            if live.expiry(file).is_none() {
                actions.push(Action::DeleteBackupFile { file: file.clone() });
            }
        }
        for path in &dir.unfinished {
            actions.push(Action::DeleteUnfinished { path: path.clone() });
        }
    }
    actions
}

/// What is due for every volume, and when (for `retention status`).
pub(crate) fn schedule(config: &RetentionConfig, now: u64, state: &State) -> Vec<VolumeSchedule> {
    let live = LiveKeys::new(&state.keys, now);
    state
        .volumes
        .iter()
        .map(|v| volume_schedule(config, now, v, state, &live))
        .collect()
}

fn plan_volume(
    config: &RetentionConfig,
    now: u64,
    volume: &VolumeState,
    state: &State,
    live: &LiveKeys,
    actions: &mut Vec<Action>,
) {
    let tenant = &volume.tenant;
    let id = &volume.volume;
    let autos = auto_snapshots(volume);
    let snapshot_due = next_snapshot(config, now, &autos) <= now;
    let new_name = auto_snapshot_name(now);
    // A snapshot of that name already (taken this second) is the one due.
    let create = snapshot_due && !volume.snapshots.contains(&new_name);
    if create {
        actions.push(Action::CreateSnapshot {
            tenant: tenant.clone(),
            volume: id.clone(),
            name: new_name.clone(),
        });
    }
    // The snapshot a backup now would take: the one just planned, else the
    // newest scheduled one.
    let target = if create {
        Some(new_name)
    } else {
        autos.last().map(|(name, _)| name.clone())
    };
    if let Some(dir) = &state.backup_dir {
        let backups = Backups::of(volume, dir, live);
        if let Some(target) = target
            && backups.next(config, now) <= now
            && !backups.covers(&target)
        {
            let (kind, base) = backups.kind(config, now, volume, now);
            let expires = match kind {
                BackupKind::Full => full_expiry(config, now),
                BackupKind::Incremental => backups.chain_expiry(config),
            };
            actions.push(Action::WriteBackup {
                tenant: tenant.clone(),
                volume: id.clone(),
                file: BackupName {
                    time: now,
                    kind,
                    snapshot: target,
                },
                base,
                expires,
            });
        }
    }
    // After the backup: a base whose time is up still serves this pass's
    // incremental.
    for (name, taken) in &autos {
        let expiry = taken.saturating_add(config.snapshot_keep.secs());
        if expiry <= now {
            actions.push(Action::DeleteSnapshot {
                tenant: tenant.clone(),
                volume: id.clone(),
                name: name.clone(),
                force: expiry.saturating_add(FORCE_AFTER) <= now,
            });
        }
    }
    // A snapshot ends the epoch as a mark would, but the store dates it by
    // its own clock: a mark after it dates the new epoch by retention's.
    if config.ages_data_of(tenant) && (create || next_age_mark(now, volume) <= now) {
        actions.push(Action::AgeData {
            tenant: tenant.clone(),
            volume: id.clone(),
            cutoff: now.saturating_sub(config.data_max_age.secs()),
        });
    }
}

fn volume_schedule(
    config: &RetentionConfig,
    now: u64,
    volume: &VolumeState,
    state: &State,
    live: &LiveKeys,
) -> VolumeSchedule {
    let autos = auto_snapshots(volume);
    let next_snapshot = next_snapshot(config, now, &autos);
    let backup = state.backup_dir.as_ref().map(|dir| {
        let backups = Backups::of(volume, dir, live);
        // A backup needs a snapshot it has not backed up yet.
        let newest_covered = autos.last().is_none_or(|(name, _)| backups.covers(name));
        let next = backups.next(config, now);
        let next = if newest_covered {
            next.max(next_snapshot)
        } else {
            next
        };
        let (kind, base) = backups.kind(config, now, volume, next);
        let mut files: Vec<(BackupName, Option<Option<u64>>)> = dir
            .files
            .iter()
            .filter(|f| f.tenant == volume.tenant && f.volume == volume.volume)
            .map(|f| (f.name.clone(), live.expiry(f)))
            .collect();
        files.sort();
        BackupSchedule {
            next,
            kind,
            base,
            files,
        }
    });
    let data = config.ages_data_of(&volume.tenant).then(|| {
        let next = next_age_mark(now, volume).max(now);
        DataSchedule {
            next,
            written_before: next.saturating_sub(config.data_max_age.secs()),
        }
    });
    VolumeSchedule {
        tenant: volume.tenant.clone(),
        volume: volume.volume.clone(),
        next_snapshot: next_snapshot.max(now),
        snapshots: autos
            .iter()
            .map(|(name, taken)| {
                (
                    name.clone(),
                    *taken,
                    taken.saturating_add(config.snapshot_keep.secs()),
                )
            })
            .collect(),
        backup,
        data,
    }
}

/// The volume's scheduled snapshots with the time each was taken, oldest
/// first.
fn auto_snapshots(volume: &VolumeState) -> Vec<(String, u64)> {
    let mut autos: Vec<(String, u64)> = volume
        .snapshots
        .iter()
        .filter_map(|name| auto_snapshot_time(name).map(|t| (name.clone(), t)))
        .collect();
    autos.sort_by_key(|&(_, t)| t);
    autos
}

/// When the next scheduled snapshot is due: `snapshot_every` after the
/// newest (at once without one).
fn next_snapshot(config: &RetentionConfig, now: u64, autos: &[(String, u64)]) -> u64 {
    autos.last().map_or(now, |&(_, newest)| {
        newest.saturating_add(config.snapshot_every.secs())
    })
}

/// When the volume's next age mark is due: a day after its epoch began, or
/// now if it began in the future (the clock was set back, and marks must
/// not stop until it catches up).
fn next_age_mark(now: u64, volume: &VolumeState) -> u64 {
    if volume.epoch_started > now {
        now
    } else {
        volume.epoch_started.saturating_add(AGE_MARK_EVERY)
    }
}

/// The key expiry of a full backup written at `now`: its chain (it and the
/// incrementals based on it) expires as a unit, once its last member, written
/// before `full_every` has passed, has been kept `backup_keep`.
fn full_expiry(config: &RetentionConfig, now: u64) -> u64 {
    now.saturating_add(config.full_every.secs())
        .saturating_add(config.backup_keep.secs())
}

/// The backup keys that outlive `now`, by what they back up.
struct LiveKeys {
    /// (tenant, volume, snapshot) -> the earliest expiry among its live keys
    /// (`None`: one never expires).
    by_snapshot: BTreeMap<(String, String, String), Option<u64>>,
}

impl LiveKeys {
    fn new(keys: &[KeyState], now: u64) -> LiveKeys {
        let mut by_snapshot: BTreeMap<(String, String, String), Option<u64>> = BTreeMap::new();
        for key in keys {
            if key.expires.is_some_and(|e| e <= now) {
                continue;
            }
            let id = (
                key.tenant.to_string(),
                key.volume.clone(),
                key.snapshot.clone(),
            );
            let earliest = match (by_snapshot.get(&id), key.expires) {
                (None, e) => e,
                (Some(&Some(a)), Some(b)) => Some(a.min(b)),
                (Some(&a), None) => a,
                (Some(&None), b) => b,
            };
            by_snapshot.insert(id, earliest);
        }
        LiveKeys { by_snapshot }
    }

    /// The file's key expiry: `None` when no key is left for it (the file can
    /// never be read again), `Some(None)` when it never expires. Keys are
    /// matched by what they back up: the scheduler backs each snapshot up
    /// once, and with several keys (an operator's own backup of the same
    /// snapshot) the file is kept while any lives.
    fn expiry(&self, file: &BackupFile) -> Option<Option<u64>> {
        self.by_snapshot
            .get(&(
                file.tenant.to_string(),
                file.volume.to_string(),
                file.name.snapshot.clone(),
            ))
            .copied()
    }
}

/// A volume's backups that can still be restored, oldest first.
struct Backups {
    live: Vec<(BackupName, Option<u64>)>,
}

impl Backups {
    fn of(volume: &VolumeState, dir: &BackupDirState, keys: &LiveKeys) -> Backups {
        let mut live: Vec<(BackupName, Option<u64>)> = dir
            .files
            .iter()
            .filter(|f| f.tenant == volume.tenant && f.volume == volume.volume)
            .filter_map(|f| keys.expiry(f).map(|e| (f.name.clone(), e)))
            .collect();
        live.sort();
        Backups { live }
    }

    /// Whether a backup of `snapshot` exists.
    fn covers(&self, snapshot: &str) -> bool {
        self.live.iter().any(|(n, _)| n.snapshot == snapshot)
    }

    /// When the next backup is due by time alone: `backup_every` after the
    /// last (now without one); the caller checks there is a snapshot to back
    /// up.
    fn next(&self, config: &RetentionConfig, now: u64) -> u64 {
        self.live.last().map_or(now, |(last, _)| {
            last.time.saturating_add(config.backup_every.secs())
        })
    }

    /// The current chain: the newest full backup and the incrementals after
    /// it, if the newest backup belongs to one.
    fn chain(&self) -> Option<&[(BackupName, Option<u64>)]> {
        let start = self
            .live
            .iter()
            .rposition(|(n, _)| n.kind == BackupKind::Full)?;
        Some(&self.live[start..])
    }

    /// The earliest key expiry of the current chain: an incremental added to
    /// it expires with it.
    fn chain_expiry(&self, config: &RetentionConfig) -> u64 {
        let chain = self.chain().unwrap_or_default();
        chain
            .iter()
            .filter_map(|(_, e)| *e)
            .min()
            .or_else(|| chain.first().map(|(n, _)| full_expiry(config, n.time)))
            .unwrap_or(u64::MAX)
    }

    /// The kind of a backup written at `at`, and its base: incremental from
    /// the last backup's snapshot when that snapshot still exists then, the
    /// chain started less than `full_every` before, and the chain's keys
    /// leave the new backup `backup_keep`; full otherwise.
    fn kind(
        &self,
        config: &RetentionConfig,
        now: u64,
        volume: &VolumeState,
        at: u64,
    ) -> (BackupKind, Option<String>) {
        let full = (BackupKind::Full, None);
        let (Some(chain), Some((last, _))) = (self.chain(), self.live.last()) else {
            return full;
        };
        let base = &last.snapshot;
        // A scheduled base is deleted at its expiry; at `now` it is there
        // if the store has it (this pass deletes it after the backup).
        let base_there = volume.snapshots.contains(base)
            && (at <= now
                || auto_snapshot_time(base)
                    .is_none_or(|t| t.saturating_add(config.snapshot_keep.secs()) >= at));
        let chain_start = chain[0].0.time;
        let young = chain_start.saturating_add(config.full_every.secs()) > at;
        let lasts = self.chain_expiry(config) >= at.saturating_add(config.backup_keep.secs());
        if base_there && young && lasts {
            (BackupKind::Incremental, Some(base.clone()))
        } else {
            full
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;
    use crate::time::Period;

    const DAY: u64 = 86_400;
    /// 2023-11-14T22:13:20Z.
    const T0: u64 = 1_700_000_000;

    fn t(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn v(name: &str) -> VolumeId {
        VolumeId::new(name).unwrap()
    }

    /// Defaults, a backup directory, and `acme` opted in to data retention.
    fn config() -> RetentionConfig {
        RetentionConfig {
            backup_dir: Some(PathBuf::from("/backups")),
            data_tenants: BTreeSet::from(["acme".to_owned()]),
            ..RetentionConfig::default()
        }
    }

    fn volume(tenant: &str, snapshots: &[&str], epoch_started: u64) -> VolumeState {
        VolumeState {
            tenant: t(tenant),
            volume: v("disk"),
            snapshots: snapshots.iter().map(|s| s.to_string()).collect(),
            epoch_started,
        }
    }

    fn auto(time: u64) -> String {
        auto_snapshot_name(time)
    }

    fn file(tenant: &str, time: u64, kind: BackupKind, snapshot: &str) -> BackupFile {
        BackupFile {
            tenant: t(tenant),
            volume: v("disk"),
            name: BackupName {
                time,
                kind,
                snapshot: snapshot.to_owned(),
            },
        }
    }

    fn key(tenant: &str, snapshot: &str, expires: Option<u64>) -> KeyState {
        KeyState {
            tenant: t(tenant),
            volume: "disk".to_owned(),
            snapshot: snapshot.to_owned(),
            expires,
        }
    }

    fn state(volumes: Vec<VolumeState>, files: Vec<BackupFile>, keys: Vec<KeyState>) -> State {
        State {
            volumes,
            keys,
            backup_dir: Some(BackupDirState {
                files,
                unfinished: Vec::new(),
                claimed: true,
            }),
        }
    }

    fn creates(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::CreateSnapshot { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    fn deletes(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::DeleteSnapshot { name, force, .. } => Some((name.clone(), *force)),
                _ => None,
            })
            .collect()
    }

    fn backups(actions: &[Action]) -> Vec<(BackupName, Option<String>, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::WriteBackup {
                    file,
                    base,
                    expires,
                    ..
                } => Some((file.clone(), base.clone(), *expires)),
                _ => None,
            })
            .collect()
    }

    fn ages(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::AgeData { cutoff, .. } => Some(*cutoff),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_of_scheduled_snapshots_and_backups() {
        assert_eq!(auto(T0), "auto-20231114t221320z");
        assert_eq!(auto_snapshot_time(&auto(T0)), Some(T0));
        blockseal_volume::check_snapshot_name(&auto(T0)).unwrap();
        for name in [
            "auto-",
            "auto-weekly",
            "auto-20231114t221320",
            "auto-20231114T221320Z",
            "auto-20231114t221320z.1",
            "nightly-20231114t221320z",
            "20231114t221320z",
        ] {
            assert_eq!(auto_snapshot_time(name), None, "{name}");
        }
        let name = BackupName {
            time: T0,
            kind: BackupKind::Incremental,
            snapshot: auto(T0),
        };
        assert_eq!(
            name.file_name(),
            "20231114T221320Z-incr-auto-20231114t221320z.bsbackup"
        );
        assert_eq!(BackupName::parse(&name.file_name()), Some(name));
        let full = "20231114T221320Z-full-before-upgrade.bsbackup";
        assert_eq!(BackupName::parse(full).unwrap().kind, BackupKind::Full);
        for name in [
            "20231114T221320Z-full-auto-20231114t221320z",
            "20231114T221320Z-diff-auto-20231114t221320z.bsbackup",
            "20231114t221320z-full-auto-20231114t221320z.bsbackup",
            "20231114T221320Z-full-.bsbackup",
            "20231114T221320Z-full-Auto.bsbackup",
            "20231114T221320Z-full-a/b.bsbackup",
            "2023-full-x.bsbackup",
            ".20231114T221320Z-full-x.bsbackup.tmp",
            "notes.txt",
        ] {
            assert_eq!(BackupName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn first_pass_snapshots_backs_up_in_full_and_ages_opted_in_tenants_only() {
        let s = state(
            vec![
                volume("acme", &[], T0 - 2 * DAY),
                volume("globex", &[], T0 - 2 * DAY),
            ],
            vec![],
            vec![],
        );
        let actions = plan(&config(), T0, &s);
        let target = |tenant: &str| format!("{tenant}/disk@{}", auto(T0));
        assert_eq!(
            actions,
            vec![
                Action::CreateSnapshot {
                    tenant: t("acme"),
                    volume: v("disk"),
                    name: auto(T0)
                },
                Action::WriteBackup {
                    tenant: t("acme"),
                    volume: v("disk"),
                    file: BackupName {
                        time: T0,
                        kind: BackupKind::Full,
                        snapshot: auto(T0)
                    },
                    base: None,
                    expires: T0 + 56 * DAY,
                },
                Action::AgeData {
                    tenant: t("acme"),
                    volume: v("disk"),
                    cutoff: T0 - 60 * DAY
                },
                Action::CreateSnapshot {
                    tenant: t("globex"),
                    volume: v("disk"),
                    name: auto(T0)
                },
                Action::WriteBackup {
                    tenant: t("globex"),
                    volume: v("disk"),
                    file: BackupName {
                        time: T0,
                        kind: BackupKind::Full,
                        snapshot: auto(T0)
                    },
                    base: None,
                    expires: T0 + 56 * DAY,
                },
            ]
        );
        assert_eq!(actions[0].target(), target("acme"));
        assert_eq!(actions[1].target(), target("acme"));
        assert_eq!(actions[2].target(), "acme/disk");
        // Without a backup directory: no backups, and the directory's files
        // are nobody's business.
        let mut no_dir = s.clone();
        no_dir.backup_dir = None;
        let c = RetentionConfig {
            backup_dir: None,
            ..config()
        };
        assert!(backups(&plan(&c, T0, &no_dir)).is_empty());
        assert_eq!(creates(&plan(&c, T0, &no_dir)).len(), 2);
    }

    #[test]
    fn a_snapshot_every_snapshot_every_exactly() {
        let c = config();
        let s = |now_snapshots: &[&str]| {
            state(vec![volume("globex", now_snapshots, T0)], vec![], vec![])
        };
        let one = auto(T0);
        assert!(creates(&plan(&c, T0 + 7 * DAY - 1, &s(&[&one]))).is_empty());
        assert_eq!(
            creates(&plan(&c, T0 + 7 * DAY, &s(&[&one]))),
            vec![auto(T0 + 7 * DAY)]
        );
        // Late (the server was down): one snapshot now, not one per week missed.
        assert_eq!(
            creates(&plan(&c, T0 + 30 * DAY, &s(&[&one]))),
            vec![auto(T0 + 30 * DAY)]
        );
        // Operators' snapshots do not count, whatever their names.
        let named = s(&["nightly", "auto-weekly", "before-upgrade"]);
        assert_eq!(creates(&plan(&c, T0, &named)), vec![auto(T0)]);
        // A scheduled snapshot from the future (the clock went back) is the
        // newest: the next one waits for it.
        let ahead = s(&[&auto(T0 + DAY)]);
        assert!(creates(&plan(&c, T0, &ahead)).is_empty());
        assert!(creates(&plan(&c, T0 + 8 * DAY - 1, &ahead)).is_empty());
        assert_eq!(creates(&plan(&c, T0 + 8 * DAY, &ahead)).len(), 1);
        // Other settings.
        let hourly = RetentionConfig {
            snapshot_every: Period(3600),
            ..config()
        };
        assert_eq!(creates(&plan(&hourly, T0 + 3600, &s(&[&one]))).len(), 1);
        assert!(creates(&plan(&hourly, T0 + 3599, &s(&[&one]))).is_empty());
    }

    #[test]
    fn scheduled_snapshots_expire_at_snapshot_keep_and_no_other_snapshot_ever_does() {
        let c = config();
        let names = [auto(T0), auto(T0 + 7 * DAY)];
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.extend(["nightly", "auto-weekly", "keep-forever"]);
        let s = state(vec![volume("globex", &all, T0)], vec![], vec![]);
        assert!(deletes(&plan(&c, T0 + 14 * DAY - 1, &s)).is_empty());
        assert_eq!(
            deletes(&plan(&c, T0 + 14 * DAY, &s)),
            vec![(auto(T0), false)]
        );
        // Still there a day later (clients read it): now their connections
        // are closed.
        assert_eq!(
            deletes(&plan(&c, T0 + 15 * DAY - 1, &s)),
            vec![(auto(T0), false)]
        );
        assert_eq!(
            deletes(&plan(&c, T0 + 15 * DAY, &s)),
            vec![(auto(T0), true)]
        );
        assert_eq!(
            deletes(&plan(&c, T0 + 21 * DAY, &s)),
            vec![(auto(T0), true), (auto(T0 + 7 * DAY), false)]
        );
        // Whatever the time, operators' snapshots stay.
        let far = plan(&c, T0 + 10_000 * DAY, &s);
        assert_eq!(deletes(&far).len(), 2);
        assert!(
            deletes(&far)
                .iter()
                .all(|(n, _)| n.starts_with("auto-2023"))
        );
    }

    #[test]
    fn a_snapshot_already_taken_this_second_is_not_taken_again() {
        let s = state(vec![volume("globex", &[&auto(T0)], T0)], vec![], vec![]);
        assert!(creates(&plan(&config(), T0, &s)).is_empty());
        // An operator's snapshot named as a scheduled one would be: it is one.
        let c = RetentionConfig {
            snapshot_every: Period(1),
            ..config()
        };
        assert!(creates(&plan(&c, T0, &s)).is_empty());
        assert_eq!(creates(&plan(&c, T0 + 1, &s)), vec![auto(T0 + 1)]);
    }

    /// A volume with a full backup of its snapshot of `T0` (chain of
    /// `T0`, keys as scheduled).
    fn one_full() -> (Vec<BackupFile>, Vec<KeyState>) {
        (
            vec![file("globex", T0, BackupKind::Full, &auto(T0))],
            vec![key("globex", &auto(T0), Some(T0 + 56 * DAY))],
        )
    }

    #[test]
    fn incremental_from_the_last_backed_up_snapshot_expiring_with_its_chain() {
        let (files, keys) = one_full();
        let s = state(vec![volume("globex", &[&auto(T0)], T0)], files, keys);
        let c = config();
        assert!(backups(&plan(&c, T0 + 7 * DAY - 1, &s)).is_empty());
        let now = T0 + 7 * DAY;
        assert_eq!(
            backups(&plan(&c, now, &s)),
            vec![(
                BackupName {
                    time: now,
                    kind: BackupKind::Incremental,
                    snapshot: auto(now)
                },
                Some(auto(T0)),
                T0 + 56 * DAY
            )]
        );
    }

    #[test]
    fn full_when_the_base_snapshot_is_gone_or_the_chain_is_old_or_would_expire_first() {
        let (files, keys) = one_full();
        let c = config();
        let kind_at = |now: u64, snapshots: &[&str], c: &RetentionConfig, keys: &[KeyState]| {
            let s = state(
                vec![volume("globex", snapshots, T0)],
                files.clone(),
                keys.to_vec(),
            );
            let planned = backups(&plan(c, now, &s));
            assert_eq!(planned.len(), 1, "at {now}");
            (planned[0].0.kind, planned[0].1.clone(), planned[0].2)
        };
        // Base gone (an operator deleted it, or snapshot_keep < backup_every).
        assert_eq!(
            kind_at(T0 + 7 * DAY, &[], &c, &keys),
            (BackupKind::Full, None, T0 + 63 * DAY)
        );
        // The chain is full_every old: a new full, though the base is there.
        let base = auto(T0);
        assert_eq!(
            kind_at(T0 + 28 * DAY, &[&base], &c, &keys).0,
            BackupKind::Full
        );
        assert_eq!(
            kind_at(T0 + 28 * DAY - 1, &[&base], &c, &keys).0,
            BackupKind::Incremental
        );
        // backup_keep grew since the chain began: an incremental would expire
        // with the chain before it is kept that long.
        let longer = RetentionConfig {
            backup_keep: Period::days(60),
            ..config()
        };
        assert_eq!(
            kind_at(T0 + 7 * DAY, &[&base], &longer, &keys).0,
            BackupKind::Full
        );
        // A chain whose key never expires (an operator's backup of the same
        // snapshot) takes incrementals that expire as a scheduled chain of
        // that start would.
        let forever = vec![key("globex", &auto(T0), None)];
        let (kind, _, expires) = kind_at(T0 + 7 * DAY, &[&base], &c, &forever);
        assert_eq!(kind, BackupKind::Incremental);
        assert_eq!(expires, T0 + 56 * DAY);
        // The chain's full backup lost its key: a new chain.
        let s = state(
            vec![volume("globex", &[&base], T0)],
            vec![
                file("globex", T0, BackupKind::Full, &base),
                file("globex", T0 + DAY, BackupKind::Incremental, "other"),
            ],
            vec![key("globex", "other", Some(T0 + 56 * DAY))],
        );
        let planned = backups(&plan(&c, T0 + 8 * DAY, &s));
        assert_eq!(planned[0].0.kind, BackupKind::Full);
    }

    #[test]
    fn each_snapshot_is_backed_up_once_and_backup_every_is_kept() {
        let (files, keys) = one_full();
        // Backups every day, snapshots every week: one backup per snapshot.
        let daily = RetentionConfig {
            backup_every: Period::DAY,
            ..config()
        };
        let s = state(
            vec![volume("globex", &[&auto(T0)], T0)],
            files.clone(),
            keys.clone(),
        );
        assert!(backups(&plan(&daily, T0 + 2 * DAY, &s)).is_empty());
        assert_eq!(backups(&plan(&daily, T0 + 7 * DAY, &s)).len(), 1);
        // Backups every two weeks, snapshots every week: the snapshot of the
        // day the backup is due.
        let fortnightly = RetentionConfig {
            backup_every: Period::days(14),
            ..config()
        };
        let s = state(
            vec![volume("globex", &[&auto(T0), &auto(T0 + 7 * DAY)], T0)],
            files,
            keys,
        );
        assert!(backups(&plan(&fortnightly, T0 + 7 * DAY, &s)).is_empty());
        let planned = backups(&plan(&fortnightly, T0 + 14 * DAY, &s));
        assert_eq!(planned[0].0.snapshot, auto(T0 + 14 * DAY));
        assert_eq!(planned[0].1, Some(auto(T0)));
        // Due, but the snapshot failed to be taken last time: the newest one
        // that has no backup yet.
        let s = state(
            vec![volume("globex", &[&auto(T0 + 7 * DAY)], T0)],
            vec![],
            vec![],
        );
        let planned = backups(&plan(&config(), T0 + 8 * DAY, &s));
        assert_eq!(planned[0].0.snapshot, auto(T0 + 7 * DAY));
        assert_eq!(planned[0].0.time, T0 + 8 * DAY);
    }

    #[test]
    fn keys_expire_then_their_files_go_and_nothing_else_does() {
        let c = config();
        let base = auto(T0);
        let files = vec![
            file("globex", T0, BackupKind::Full, &base),
            file(
                "globex",
                T0 + 7 * DAY,
                BackupKind::Incremental,
                &auto(T0 + 7 * DAY),
            ),
            // No key ever (a shredded tenant, a volume deleted): useless.
            file("initech", T0, BackupKind::Full, &base),
            // An operator's backup of the same snapshot keeps it alive.
            file("acme", T0, BackupKind::Full, &base),
        ];
        let keys = vec![
            key("globex", &base, Some(T0 + 56 * DAY)),
            key("globex", &auto(T0 + 7 * DAY), Some(T0 + 56 * DAY)),
            key("acme", &base, Some(T0 + 56 * DAY)),
            key("acme", &base, None),
        ];
        let mut s = state(vec![], files, keys);
        s.backup_dir.as_mut().unwrap().unfinished = vec!["globex/disk/.x.tmp".to_owned()];
        let before = plan(&c, T0 + 56 * DAY - 1, &s);
        assert_eq!(
            before,
            vec![
                Action::DeleteBackupFile {
                    file: file("initech", T0, BackupKind::Full, &base)
                },
                Action::DeleteUnfinished {
                    path: "globex/disk/.x.tmp".to_owned()
                },
            ]
        );
        let at = plan(&c, T0 + 56 * DAY, &s);
        assert_eq!(at[0], Action::ExpireBackupKeys);
        let gone: Vec<&BackupFile> = at
            .iter()
            .filter_map(|a| match a {
                Action::DeleteBackupFile { file } => Some(file),
                _ => None,
            })
            .collect();
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|f| f.tenant != t("acme")), "{gone:?}");
        assert_eq!(
            at[1].target(),
            format!("globex/disk/20231114T221320Z-full-{base}.bsbackup")
        );
        // A directory that does not name this store yet: nothing in it is
        // deleted (the first backup claims it).
        s.backup_dir.as_mut().unwrap().claimed = false;
        assert_eq!(plan(&c, T0 + 56 * DAY, &s), vec![Action::ExpireBackupKeys]);
    }

    #[test]
    fn age_marks_once_a_day_from_the_last_epoch_and_at_once_after_the_clock_went_back() {
        let c = config();
        let s = |started: u64, snapshots: &[&str]| {
            state(vec![volume("acme", snapshots, started)], vec![], vec![])
        };
        let recent = auto(T0);
        assert!(ages(&plan(&c, T0 + DAY - 1, &s(T0, &[&recent]))).is_empty());
        assert_eq!(
            ages(&plan(&c, T0 + DAY, &s(T0, &[&recent]))),
            vec![T0 + DAY - 60 * DAY]
        );
        // The epoch began in the future (the clock went back): mark now.
        assert_eq!(
            ages(&plan(&c, T0, &s(T0 + 3600, &[&recent]))),
            vec![T0 - 60 * DAY]
        );
        // A snapshot due now is followed by a mark, however recent the last.
        let week_old = auto(T0 - 7 * DAY);
        assert_eq!(
            ages(&plan(&c, T0, &s(T0 - 3600, &[&week_old]))),
            vec![T0 - 60 * DAY]
        );
        // Not before the cutoff exists.
        assert_eq!(
            ages(&plan(&c, 30 * DAY, &s(0, &[&auto(30 * DAY)]))),
            vec![0]
        );
        // Other tenants: never.
        let globex = state(vec![volume("globex", &[&recent], 0)], vec![], vec![]);
        assert!(ages(&plan(&c, T0, &globex)).is_empty());
        let short = RetentionConfig {
            data_max_age: Period::days(10),
            ..config()
        };
        assert_eq!(
            ages(&plan(&short, T0 + DAY, &s(T0, &[&recent]))),
            vec![T0 + DAY - 10 * DAY]
        );
    }

    #[test]
    fn status_says_what_is_due_when() {
        let c = config();
        let (files, keys) = one_full();
        let base = auto(T0);
        let s = state(vec![volume("acme", &[&base], T0 + 3600)], vec![], vec![]);
        let now = T0 + 2 * DAY;
        let v = &schedule(&c, now, &s)[0];
        assert_eq!(v.next_snapshot, T0 + 7 * DAY);
        assert_eq!(v.snapshots, vec![(base.clone(), T0, T0 + 14 * DAY)]);
        // Never backed up: due now, of the existing snapshot.
        let b = v.backup.as_ref().unwrap();
        assert_eq!((b.next, b.kind), (now, BackupKind::Full));
        assert_eq!(
            v.data,
            Some(DataSchedule {
                next: now,
                written_before: now - 60 * DAY
            })
        );
        let s = state(
            vec![volume("globex", &[&base], T0 + 3600)],
            files.clone(),
            keys.clone(),
        );
        let v = &schedule(&c, T0 + DAY, &s)[0];
        let b = v.backup.as_ref().unwrap();
        // Waits for the next snapshot, and builds on the last one.
        assert_eq!(b.next, T0 + 7 * DAY);
        assert_eq!(
            (b.kind, b.base.as_deref()),
            (BackupKind::Incremental, Some(&*base))
        );
        assert_eq!(
            b.files,
            vec![(files[0].name.clone(), Some(Some(T0 + 56 * DAY)))]
        );
        assert_eq!(v.data, None);
        // A base that expires before the next backup: that one is full.
        let c2 = RetentionConfig {
            snapshot_keep: Period::days(5),
            ..config()
        };
        let b = schedule(&c2, T0 + DAY, &s)[0].backup.clone().unwrap();
        assert_eq!(
            (b.next, b.kind, b.base),
            (T0 + 7 * DAY, BackupKind::Full, None)
        );
        // No key left: the file shows as going.
        let s = state(vec![volume("globex", &[&base], T0)], files, vec![]);
        let b = schedule(&c, T0 + DAY, &s)[0].backup.clone().unwrap();
        assert_eq!(b.files[0].1, None);
        assert_eq!(b.next, T0 + DAY);
    }

    /// Applies actions to the state as the executor would (the store's
    /// epochs end at a snapshot or a mark).
    fn apply(state: &mut State, actions: &[Action], now: u64) {
        for action in actions {
            let find = |state: &mut State, tenant: &TenantId| -> usize {
                state
                    .volumes
                    .iter()
                    .position(|v| &v.tenant == tenant)
                    .unwrap()
            };
            match action {
                Action::CreateSnapshot { tenant, name, .. } => {
                    let i = find(state, tenant);
                    state.volumes[i].snapshots.push(name.clone());
                    state.volumes[i].epoch_started = now;
                }
                Action::WriteBackup {
                    tenant,
                    volume,
                    file,
                    base,
                    expires,
                } => {
                    let i = find(state, tenant);
                    if let Some(base) = base {
                        assert!(state.volumes[i].snapshots.contains(base), "{action:?}");
                    }
                    assert!(state.volumes[i].snapshots.contains(&file.snapshot));
                    state.backup_dir.as_mut().unwrap().files.push(BackupFile {
                        tenant: tenant.clone(),
                        volume: volume.clone(),
                        name: file.clone(),
                    });
                    state.keys.push(KeyState {
                        tenant: tenant.clone(),
                        volume: volume.to_string(),
                        snapshot: file.snapshot.clone(),
                        expires: Some(*expires),
                    });
                }
                Action::DeleteSnapshot { tenant, name, .. } => {
                    let i = find(state, tenant);
                    state.volumes[i].snapshots.retain(|s| s != name);
                }
                Action::AgeData { tenant, .. } => {
                    let i = find(state, tenant);
                    state.volumes[i].epoch_started = now;
                }
                Action::ExpireBackupKeys => {
                    state.keys.retain(|k| k.expires.is_none_or(|e| e > now));
                }
                Action::DeleteBackupFile { file } => {
                    state
                        .backup_dir
                        .as_mut()
                        .unwrap()
                        .files
                        .retain(|f| f != file);
                }
                Action::DeleteUnfinished { path } => {
                    state
                        .backup_dir
                        .as_mut()
                        .unwrap()
                        .unfinished
                        .retain(|p| p != path);
                }
            }
        }
    }

    /// A year of passes every 10 minutes (and a restart's pass right after
    /// each one): every promise holds at every moment, and a second pass at
    /// the same time has nothing to do.
    #[test]
    fn a_year_of_passes_keeps_every_promise() {
        for c in [
            config(),
            RetentionConfig {
                backup_keep: Period::days(14),
                full_every: Period::days(14),
                data_max_age: Period::days(10),
                ..config()
            },
            RetentionConfig {
                snapshot_every: Period::DAY,
                snapshot_keep: Period::days(3),
                backup_every: Period(36 * 3600),
                ..config()
            },
        ] {
            let mut s = state(
                vec![
                    volume("acme", &[], T0 - 100 * DAY),
                    volume("globex", &["mine"], T0),
                ],
                vec![],
                vec![],
            );
            let every = c.snapshot_every.secs();
            let keep = c.snapshot_keep.secs();
            let mut last_mark = [0u64; 2];
            let mut now = T0;
            while now < T0 + 365 * DAY {
                let actions = plan(&c, now, &s);
                apply(&mut s, &actions, now);
                assert_eq!(plan(&c, now, &s), vec![], "again at {now}: {c:?}");
                for (i, vol) in s.volumes.iter().enumerate() {
                    assert!(vol.snapshots.contains(&"mine".to_owned()) || i == 0);
                    let times: Vec<u64> = vol
                        .snapshots
                        .iter()
                        .filter_map(|n| auto_snapshot_time(n))
                        .collect();
                    // Kept no longer than snapshot_keep; never older than
                    // snapshot_every for the newest.
                    assert!(times.iter().all(|&t| t + keep > now), "{times:?} at {now}");
                    assert!(times.iter().any(|&t| t + every > now));
                    if vol.epoch_started == now {
                        last_mark[i] = now;
                    }
                    if i == 0 {
                        // Epochs end at least daily (the precision of data
                        // retention), up to the pass interval.
                        assert!(now - last_mark[i] < DAY + 600, "{now} {}", last_mark[i]);
                    }
                }
                let dir = s.backup_dir.as_ref().unwrap();
                for vol in &s.volumes {
                    let mine: Vec<&BackupFile> = dir
                        .files
                        .iter()
                        .filter(|f| f.tenant == vol.tenant)
                        .collect();
                    // A backup at least every backup_every (and snapshot).
                    let newest = mine.iter().map(|f| f.name.time).max().unwrap();
                    assert!(
                        now - newest < c.backup_every.secs().max(every) + 600,
                        "{now} {newest}"
                    );
                    // Every file left can be restored: its chain begins with
                    // a full backup whose key lives, and every member's key
                    // lives.
                    let mut sorted = mine.clone();
                    sorted.sort();
                    for (i, f) in sorted.iter().enumerate() {
                        let start = sorted[..=i]
                            .iter()
                            .rposition(|g| g.name.kind == BackupKind::Full)
                            .expect("a chain starts with a full backup");
                        for member in &sorted[start..=i] {
                            assert!(
                                s.keys.iter().any(|k| k.snapshot == member.name.snapshot
                                    && k.tenant == vol.tenant),
                                "{f:?} needs {member:?}"
                            );
                        }
                        // And stays restorable backup_keep after it was
                        // written.
                        let key = s
                            .keys
                            .iter()
                            .find(|k| k.snapshot == f.name.snapshot && k.tenant == vol.tenant)
                            .unwrap();
                        assert!(key.expires.unwrap() >= f.name.time + c.backup_keep.secs());
                    }
                    // And nothing is kept past backup_keep + full_every.
                    assert!(mine.iter().all(|f| f.name.time
                        + c.backup_keep.secs()
                        + c.full_every.secs()
                        > now));
                }
                now += 600;
            }
        }
    }
}
