//! Retention: scheduled snapshots, scheduled backups, and data retention for
//! opted-in tenants, as `[retention]` in the configuration says.
//!
//! - [`config`]: the settings;
//! - [`plan`]: what is due, a pure function of the settings, the time and
//!   what the store and the backup directory hold (no clock, no I/O);
//! - [`state`]: reads that input;
//! - [`exec`]: carries the actions out;
//! - [`scheduler`]: the server's thread that runs a pass every minute.
//!
//! Each pass runs under one lock, reads the state, plans, acts, and records
//! every action in the audit log (actor `retention`) and in one log line.
//! Nothing it needs to remember lives only in memory: a restart neither
//! redoes nor skips work. A failed action is logged and retried at a later
//! pass; it never stops the server.
//!
//! The time comes from a [`Clock`]. With `BLOCKSEAL_TEST_CLOCK=1` in the
//! server's environment the clock is set by the caller of
//! `POST /v1/retention/run` (`{"now": UNIX}`) and no pass runs on its own:
//! for tests only, and refused (`403`) otherwise.

mod config;
mod exec;
mod plan;
mod scheduler;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::admin::api::{ApiError, Reply};
use crate::admin::service::Service;
use crate::time::rfc3339_utc;
pub(crate) use config::RetentionConfig;
use exec::{ACTOR, Executor, Outcome};
pub(crate) use scheduler::Scheduler;

/// The environment variable that puts retention on a test clock (`1`).
pub(crate) const TEST_CLOCK_ENV: &str = "BLOCKSEAL_TEST_CLOCK";

/// How often the server's scheduler runs a pass.
pub(crate) const PASS_PERIOD: Duration = Duration::from_secs(60);

/// Where retention takes the time from.
pub(crate) trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that says what it was last set to (tests).
#[derive(Debug)]
pub(crate) struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `now`.
    pub(crate) fn new(now: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now))
    }

    /// Sets the time.
    pub(crate) fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Retention for one store: its settings, its clock, and the lock that keeps
/// passes one at a time.
pub(crate) struct Retention {
    config: RetentionConfig,
    clock: Arc<dyn Clock>,
    /// Set when the clock is a test clock that `run` may set.
    manual: Option<Arc<ManualClock>>,
    pass: Mutex<()>,
    /// Set at shutdown; the scheduler's sleep waits on `wake`.
    stop: AtomicBool,
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Retention {
    /// Retention on the system clock, or on a test clock (at the system's
    /// time until a run sets it).
    pub(crate) fn new(config: RetentionConfig, test_clock: bool) -> Retention {
        if test_clock {
            let manual = Arc::new(ManualClock::new(SystemClock.now()));
            let mut retention = Retention::with_clock(config, manual.clone());
            retention.manual = Some(manual);
            retention
        } else {
            Retention::with_clock(config, Arc::new(SystemClock))
        }
    }

    /// Retention on `clock`.
    pub(crate) fn with_clock(config: RetentionConfig, clock: Arc<dyn Clock>) -> Retention {
        Retention {
            config,
            clock,
            manual: None,
            pass: Mutex::new(()),
            stop: AtomicBool::new(false),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Whether [`TEST_CLOCK_ENV`] asks for a test clock.
    pub(crate) fn test_clock_from_env() -> bool {
        std::env::var_os(TEST_CLOCK_ENV).is_some_and(|v| v == "1")
    }

    /// The settings.
    pub(crate) fn config(&self) -> &RetentionConfig {
        &self.config
    }

    /// Whether the clock is a test clock.
    pub(crate) fn has_test_clock(&self) -> bool {
        self.manual.is_some()
    }

    /// Stops passes: the one running ends after its current action (a backup
    /// being written fails at its next write), and none starts.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Sleeps for `period` or until [`request_stop`](Self::request_stop);
    /// returns whether it was stopped.
    fn sleep(&self, period: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, period, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    /// Runs one pass at `now`, leaving out the actions `skip` names (by
    /// [`plan::Action::key`]); audits and logs each action. Fails only when
    /// the state could not be read.
    pub(crate) fn pass(
        &self,
        service: &Service,
        now: u64,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Outcome>, String> {
        let _one = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        let store = service.store();
        let gathered = state::gather(store, self.config.backup_dir.as_deref())?;
        for problem in &gathered.problems {
            tracing::warn!(problem = %problem, "retention: left alone this pass");
        }
        let actions: Vec<plan::Action> = plan::plan(&self.config, now, &gathered.state)
            .into_iter()
            .filter(|a| !skip(&a.key()))
            .collect();
        let executor = Executor {
            service,
            backup_dir: self.config.backup_dir.as_deref(),
            now,
            stop: &self.stop,
        };
        let outcomes = executor.run(actions);
        for outcome in &outcomes {
            record(store, outcome);
        }
        Ok(outcomes)
    }

    /// What is due for every volume, and when, at the clock's time.
    fn status(&self, service: &Service) -> Result<RetentionView, ApiError> {
        let now = self.clock.now();
        let gathered = state::gather(service.store(), self.config.backup_dir.as_deref())
            .map_err(ApiError::internal)?;
        let c = &self.config;
        let time = |t: u64| rfc3339_utc(t);
        let volumes = plan::schedule(c, now, &gathered.state)
            .into_iter()
            .map(|v| VolumeRetentionView {
                tenant: v.tenant.to_string(),
                volume: v.volume.to_string(),
                next_snapshot: time(v.next_snapshot),
                snapshots: v
                    .snapshots
                    .into_iter()
                    .map(|(name, taken, expires)| ScheduledSnapshotView {
                        name,
                        taken: time(taken),
                        expires: time(expires),
                    })
                    .collect(),
                next_backup: v.backup.as_ref().map(|b| NextBackupView {
                    at: time(b.next),
                    kind: b.kind.word().to_owned(),
                    base: b.base.clone(),
                }),
                backups: v
                    .backup
                    .map(|b| {
                        b.files
                            .into_iter()
                            .map(|(name, expires)| BackupFileView {
                                file: format!("{}/{}/{}", v.tenant, v.volume, name.file_name()),
                                kind: name.kind.word().to_owned(),
                                snapshot: name.snapshot,
                                written: time(name.time),
                                expires: match expires {
                                    None => "expired".to_owned(),
                                    Some(None) => "never".to_owned(),
                                    Some(Some(t)) => time(t),
                                },
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                data: v.data.map(|d| DataRetentionView {
                    next_age_mark: time(d.next),
                    discards_written_before: time(d.written_before),
                }),
            })
            .collect();
        Ok(RetentionView {
            configured: true,
            enabled: c.enabled,
            clock: self.clock_name().to_owned(),
            now: time(now),
            settings: Some(SettingsView {
                snapshot_every: c.snapshot_every.to_string(),
                snapshot_keep: c.snapshot_keep.to_string(),
                backup_dir: c.backup_dir.as_ref().map(|d| d.display().to_string()),
                backup_every: c.backup_every.to_string(),
                backup_keep: c.backup_keep.to_string(),
                full_every: c.full_every.to_string(),
                data_max_age: c.data_max_age.to_string(),
                data_tenants: c.data_tenants.iter().cloned().collect(),
            }),
            problems: gathered.problems,
            volumes,
        })
    }

    fn clock_name(&self) -> &'static str {
        if self.has_test_clock() {
            "test"
        } else {
            "system"
        }
    }
}

/// `GET /v1/retention`.
pub(crate) fn status_reply(
    service: &Service,
    retention: Option<&Retention>,
) -> Result<Reply, ApiError> {
    let Some(retention) = retention else {
        return Ok(Reply::Retention(RetentionView {
            configured: false,
            enabled: false,
            clock: "system".to_owned(),
            now: rfc3339_utc(SystemClock.now()),
            settings: None,
            problems: Vec::new(),
            volumes: Vec::new(),
        }));
    };
    retention.status(service).map(Reply::Retention)
}

/// `POST /v1/retention/run`: one pass now, or at `now` on a test clock.
pub(crate) fn run_reply(
    service: &Service,
    retention: Option<&Retention>,
    now: Option<u64>,
) -> Result<Reply, ApiError> {
    let Some(retention) = retention else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "retention_not_configured",
            "retention is not configured: add a [retention] table to the server's \
             configuration file",
        ));
    };
    if !retention.config.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "retention_disabled",
            "retention is disabled (retention.enabled = false in the configuration file)",
        ));
    }
    let now = match (now, &retention.manual) {
        (None, _) => retention.clock.now(),
        (Some(now), Some(clock)) => {
            clock.set(now);
            now
        }
        (Some(_), None) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "test_clock_disabled",
                format!(
                    "a pass at a given time is for tests only: the server must run with \
                     {TEST_CLOCK_ENV}=1 (leave \"now\" out to run a pass at the present time)"
                ),
            ));
        }
    };
    let outcomes = retention
        .pass(service, now, &|_| false)
        .map_err(ApiError::internal)?;
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    Ok(Reply::RetentionRun(RunView {
        now: rfc3339_utc(now),
        actions: outcomes
            .into_iter()
            .map(|o| {
                let (result, detail) = match o.result {
                    Ok(detail) => ("ok".to_owned(), detail),
                    Err(e) => (format!("error: {e}"), String::new()),
                };
                ActionView {
                    action: o.action.to_owned(),
                    target: o.target,
                    result,
                    detail,
                }
            })
            .collect(),
        failed,
    }))
}

/// Audits an outcome (unless the admin service did) and logs it.
fn record(store: &blockseal_volume::Store, outcome: &Outcome) {
    let (result, detail) = match &outcome.result {
        Ok(detail) => ("ok".to_owned(), detail.as_str()),
        Err(e) => (format!("error: {e}"), ""),
    };
    if !outcome.audited {
        let entry = blockseal_volume::AuditEntry {
            actor: ACTOR.to_owned(),
            action: outcome.action.to_owned(),
            target: outcome.target.clone(),
            result: result.clone(),
            detail: detail.to_owned(),
        };
        if let Err(e) = store.audit_append(&entry) {
            tracing::error!(action = outcome.action, target = %outcome.target, error = %e, "retention: the audit log cannot record an action");
        }
    }
    match &outcome.result {
        Ok(detail) => {
            tracing::info!(action = outcome.action, target = %outcome.target, detail = %detail, "retention")
        }
        Err(e) => {
            tracing::error!(action = outcome.action, target = %outcome.target, error = %e, "retention: action failed; retried at a later pass")
        }
    }
}

/// `GET /v1/retention`: the settings and, per volume, what is due when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionView {
    /// Whether the configuration has a `[retention]` table (offline: whether
    /// the command was given the configuration file).
    pub(crate) configured: bool,
    pub(crate) enabled: bool,
    /// `system`, or `test` (`BLOCKSEAL_TEST_CLOCK=1`).
    pub(crate) clock: String,
    pub(crate) now: String,
    pub(crate) settings: Option<SettingsView>,
    /// What could not be read (those volumes or the backup directory are
    /// left alone).
    pub(crate) problems: Vec<String>,
    pub(crate) volumes: Vec<VolumeRetentionView>,
}

/// The settings in effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsView {
    pub(crate) snapshot_every: String,
    pub(crate) snapshot_keep: String,
    pub(crate) backup_dir: Option<String>,
    pub(crate) backup_every: String,
    pub(crate) backup_keep: String,
    pub(crate) full_every: String,
    pub(crate) data_max_age: String,
    pub(crate) data_tenants: Vec<String>,
}

/// One volume's schedules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeRetentionView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    /// When the next scheduled snapshot is taken (`now` when due).
    pub(crate) next_snapshot: String,
    /// Its scheduled snapshots, oldest first, and when each is deleted.
    pub(crate) snapshots: Vec<ScheduledSnapshotView>,
    /// The next backup (`null` without a backup directory).
    pub(crate) next_backup: Option<NextBackupView>,
    /// Its backup files, oldest first.
    pub(crate) backups: Vec<BackupFileView>,
    /// Data retention (`null` unless the tenant is opted in).
    pub(crate) data: Option<DataRetentionView>,
}

/// A scheduled snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduledSnapshotView {
    pub(crate) name: String,
    pub(crate) taken: String,
    pub(crate) expires: String,
}

/// The next backup of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NextBackupView {
    pub(crate) at: String,
    /// `full` or `incremental`, as things stand.
    pub(crate) kind: String,
    pub(crate) base: Option<String>,
}

/// A backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupFileView {
    /// Relative to the backup directory.
    pub(crate) file: String,
    pub(crate) kind: String,
    pub(crate) snapshot: String,
    pub(crate) written: String,
    /// When its key is destroyed; `expired` (no key left: the file goes at
    /// the next pass) or `never`.
    pub(crate) expires: String,
}

/// A volume's data retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataRetentionView {
    /// When the next age mark (and discard) happens.
    pub(crate) next_age_mark: String,
    /// That discard takes the blocks written before this time.
    pub(crate) discards_written_before: String,
}

/// `POST /v1/retention/run`: what the pass did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunView {
    pub(crate) now: String,
    pub(crate) actions: Vec<ActionView>,
    pub(crate) failed: usize,
}

/// One action of a pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActionView {
    pub(crate) action: String,
    pub(crate) target: String,
    /// `ok` or `error: ...`.
    pub(crate) result: String,
    pub(crate) detail: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use blockseal_keys::{MasterKey, TenantId, VolumeId};
    use blockseal_volume::{Store, StoreOptions, VolumeOptions};
    use hyper::Method;

    use super::*;
    use crate::admin::api::Op;
    use crate::admin::service::Caller;
    use crate::time::Period;

    const DAY: u64 = 86_400;
    /// 2020-09-13: in the past, so the store's own (real) times of snapshots
    /// never pass for the test clock's.
    const T0: u64 = 1_600_000_000;
    const BLOCK: usize = 4096;

    struct Fixture {
        _tmp: tempfile::TempDir,
        backups: PathBuf,
        service: Service,
        retention: Arc<Retention>,
    }

    fn fixture(config: impl FnOnce(&mut RetentionConfig)) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::create(
            tmp.path().join("data"),
            MasterKey::generate().unwrap(),
            StoreOptions::new(),
        )
        .unwrap();
        for tenant in ["acme", "globex"] {
            let tenant = TenantId::new(tenant).unwrap();
            store.create_tenant(&tenant).unwrap();
            store
                .create_volume(&tenant, &disk(), 1 << 20, VolumeOptions::default())
                .unwrap();
        }
        let backups = tmp.path().join("backups");
        let mut c = RetentionConfig {
            backup_dir: Some(backups.clone()),
            backup_keep: Period::days(14),
            full_every: Period::days(14),
            data_max_age: Period::days(10),
            data_tenants: BTreeSet::from(["acme".to_owned()]),
            ..RetentionConfig::default()
        };
        config(&mut c);
        let retention = Arc::new(Retention::new(c, true));
        let service = Service::offline(Arc::new(store)).with_retention(Some(retention.clone()));
        Fixture {
            _tmp: tmp,
            backups,
            service,
            retention,
        }
    }

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn disk() -> VolumeId {
        VolumeId::new("disk").unwrap()
    }

    impl Fixture {
        fn store(&self) -> &Store {
            self.service.store()
        }

        fn run(&self, now: u64) -> RunView {
            let op = Op::RetentionRun { now: Some(now) };
            let caller = Caller {
                actor: "uid:0".into(),
            };
            match self.service.run(&caller, &op).unwrap() {
                Reply::RetentionRun(run) => {
                    assert_eq!(run.failed, 0, "{run:#?}");
                    run
                }
                other => panic!("{other:?}"),
            }
        }

        fn status(&self) -> RetentionView {
            let caller = Caller {
                actor: "uid:0".into(),
            };
            match self.service.run(&caller, &Op::RetentionStatus).unwrap() {
                Reply::Retention(view) => view,
                other => panic!("{other:?}"),
            }
        }

        fn snapshots(&self, t: &str) -> Vec<String> {
            self.store()
                .snapshots(&tenant(t), &disk())
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect()
        }

        fn files(&self, t: &str) -> Vec<String> {
            let dir = self.backups.join(t).join("disk");
            let mut names: Vec<String> = match std::fs::read_dir(&dir) {
                Ok(entries) => entries
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect(),
                Err(_) => Vec::new(),
            };
            names.sort();
            names
        }

        fn write(&self, t: &str, block: u64, byte: u8) {
            let volume = self.store().open_volume(&tenant(t), &disk()).unwrap();
            volume
                .write_at(block * BLOCK as u64, &[byte; BLOCK])
                .unwrap();
            volume.flush().unwrap();
        }

        fn read(&self, t: &str, block: u64) -> u8 {
            let volume = self.store().open_volume(&tenant(t), &disk()).unwrap();
            let mut buf = [0u8; BLOCK];
            volume.read_at(block * BLOCK as u64, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == buf[0]));
            buf[0]
        }

        fn audit(&self, action: &str) -> Vec<(String, String, String)> {
            self.store()
                .audit_entries(0, None)
                .unwrap()
                .into_iter()
                .filter(|e| e.action == action && e.actor == "retention")
                .map(|e| (e.target, e.result, e.detail))
                .collect()
        }
    }

    fn actions(run: &RunView) -> Vec<(String, String)> {
        run.actions
            .iter()
            .map(|a| (a.action.clone(), a.target.clone()))
            .collect()
    }

    fn auto(now: u64) -> String {
        plan::auto_snapshot_name(now)
    }

    fn full(now: u64) -> String {
        format!(
            "{}-full-{}.bsbackup",
            crate::time::utc_stamp(now),
            auto(now)
        )
    }

    fn incr(now: u64) -> String {
        format!(
            "{}-incr-{}.bsbackup",
            crate::time::utc_stamp(now),
            auto(now)
        )
    }

    #[test]
    fn weeks_of_passes_on_a_store() {
        let f = fixture(|_| {});
        f.write("acme", 0, 0xa1);
        f.write("globex", 0, 0xb1);
        f.store()
            .create_snapshot(&tenant("acme"), &disk(), "before-upgrade")
            .unwrap();

        // t0: a snapshot and a full backup of each volume.
        let run = f.run(T0);
        assert_eq!(run.now, rfc3339_utc(T0));
        assert_eq!(
            actions(&run),
            vec![
                ("snapshot.create".into(), format!("acme/disk@{}", auto(T0))),
                ("retention.backup".into(), format!("acme/disk@{}", auto(T0))),
                ("retention.data".into(), "acme/disk".into()),
                (
                    "snapshot.create".into(),
                    format!("globex/disk@{}", auto(T0))
                ),
                (
                    "retention.backup".into(),
                    format!("globex/disk@{}", auto(T0))
                ),
            ]
        );
        assert_eq!(
            f.snapshots("acme"),
            vec!["before-upgrade".to_owned(), auto(T0)]
        );
        assert_eq!(f.files("acme"), vec![full(T0)]);
        assert_eq!(f.files("globex"), vec![full(T0)]);
        let path = f.backups.join("acme/disk").join(full(T0));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(f.backups.join(state::OWNER_FILE).is_file());
        // The same pass again, as after a restart: nothing to do.
        assert_eq!(actions(&f.run(T0)), vec![]);
        assert_eq!(actions(&f.run(T0 + 3600)), vec![]);

        // Data written after the first snapshot, dated by the marks.
        f.write("acme", 1, 0xa2);
        f.write("globex", 1, 0xb2);
        let run = f.run(T0 + DAY);
        assert_eq!(
            actions(&run),
            vec![("retention.data".into(), "acme/disk".into())]
        );
        assert!(
            run.actions[0].detail.contains("blocks_discarded=0"),
            "{run:?}"
        );

        // A week on: a new snapshot, an incremental backup.
        f.write("acme", 2, 0xa3);
        let week = T0 + 7 * DAY;
        f.run(week);
        assert_eq!(f.files("acme"), vec![full(T0), incr(week)]);
        let backup = f.audit("retention.backup");
        assert!(
            backup[2]
                .2
                .contains(&format!("kind=incremental base={}", auto(T0))),
            "{backup:?}"
        );
        f.run(week + DAY);
        f.write("acme", 3, 0xa4);

        // Ten days after the first marks: what was written before them is
        // gone from the opted-in tenant only.
        let run = f.run(T0 + 12 * DAY);
        let data = &run.actions[0];
        assert_eq!(data.action, "retention.data");
        assert!(data.detail.contains("blocks_discarded=2"), "{data:?}");
        assert_eq!(f.read("acme", 0), 0);
        assert_eq!(f.read("acme", 1), 0);
        assert_eq!(f.read("acme", 2), 0xa3);
        assert_eq!(f.read("acme", 3), 0xa4);
        assert_eq!(f.read("globex", 0), 0xb1);
        assert_eq!(f.read("globex", 1), 0xb2);
        // The snapshots keep what they saw until they go.
        let old = f
            .store()
            .open_snapshot(&tenant("acme"), &disk(), &auto(T0))
            .unwrap();
        let mut buf = [0u8; BLOCK];
        old.read_at(0, &mut buf).unwrap();
        assert_eq!(buf[0], 0xa1);
        drop(old);

        // Two weeks: the first scheduled snapshot goes (not the operator's),
        // and the chain is full_every old: a new full backup.
        let two = T0 + 14 * DAY;
        f.run(two);
        assert_eq!(
            f.snapshots("acme"),
            vec!["before-upgrade".to_owned(), auto(week), auto(two)]
        );
        assert_eq!(f.files("acme"), vec![full(T0), incr(week), full(two)]);
        let three = T0 + 21 * DAY;
        f.run(three);
        assert_eq!(
            f.files("globex"),
            vec![full(T0), incr(week), full(two), incr(three)]
        );

        // Four weeks: the first chain's keys expire, and its files go.
        let four = T0 + 28 * DAY;
        let run = f.run(four);
        let expired = f.audit("retention.backup-key-expire");
        assert_eq!(expired.len(), 4, "{expired:?}");
        assert!(
            expired
                .iter()
                .any(|e| e.0 == format!("acme/disk@{}", auto(T0)))
        );
        assert_eq!(f.audit("retention.backup-file-delete").len(), 4, "{run:#?}");
        assert_eq!(f.files("acme"), vec![full(two), incr(three), full(four)]);
        assert_eq!(f.store().backup_keys(None).unwrap().len(), 6);
        assert!(f.snapshots("acme").contains(&"before-upgrade".to_owned()));
        // Snapshot actions are audited by the admin service, as an
        // administrator's are, with the actor `retention`.
        let created = f.audit("snapshot.create");
        assert_eq!(created.len(), 2 * 2 * 5, "{created:?}");
        assert!(
            f.audit("snapshot.delete")
                .iter()
                .all(|e| e.2 == "force=false")
        );
    }

    #[test]
    fn status_before_and_after_a_pass() {
        let f = fixture(|_| {});
        let view = f.status();
        assert!(view.configured && view.enabled);
        assert_eq!(view.clock, "test");
        assert_eq!(view.volumes.len(), 2);
        f.run(T0);
        let view = f.status();
        assert_eq!(view.now, rfc3339_utc(T0));
        let acme = &view.volumes[0];
        assert_eq!(acme.tenant, "acme");
        assert_eq!(acme.next_snapshot, rfc3339_utc(T0 + 7 * DAY));
        assert_eq!(acme.snapshots[0].name, auto(T0));
        assert_eq!(acme.snapshots[0].expires, rfc3339_utc(T0 + 14 * DAY));
        let next = acme.next_backup.as_ref().unwrap();
        assert_eq!(
            (next.at.as_str(), next.kind.as_str(), next.base.as_deref()),
            (&*rfc3339_utc(T0 + 7 * DAY), "incremental", Some(&*auto(T0)))
        );
        assert_eq!(acme.backups[0].file, format!("acme/disk/{}", full(T0)));
        assert_eq!(acme.backups[0].expires, rfc3339_utc(T0 + 28 * DAY));
        // The pass marked the age after its snapshot: the next mark is a day on.
        let data = acme.data.as_ref().unwrap();
        assert_eq!(data.next_age_mark, rfc3339_utc(T0 + DAY));
        assert_eq!(
            data.discards_written_before,
            rfc3339_utc(T0 + DAY - 10 * DAY)
        );
        assert!(view.volumes[1].data.is_none());
        // The reply survives its trip through JSON.
        let reply = Reply::Retention(view);
        assert_eq!(
            Reply::decode(&Op::RetentionStatus, &reply.to_json()).unwrap(),
            reply
        );
    }

    #[test]
    fn a_pass_at_a_given_time_needs_the_test_clock() {
        let f = fixture(|_| {});
        let system = Service::offline(f.service.store().clone()).with_retention(Some(Arc::new(
            Retention::new(f.retention.config().clone(), false),
        )));
        let caller = Caller {
            actor: "uid:0".into(),
        };
        let e = system
            .run(&caller, &Op::RetentionRun { now: Some(T0) })
            .unwrap_err();
        assert_eq!(
            (e.status, e.code.as_str()),
            (StatusCode::FORBIDDEN, "test_clock_disabled")
        );
        assert!(f.snapshots("acme").is_empty());
        // Now, on the system clock, is always allowed.
        let Reply::RetentionRun(run) = system
            .run(&caller, &Op::RetentionRun { now: None })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(run.failed, 0);
        assert_eq!(f.snapshots("acme").len(), 1);
        // The request itself is audited under its caller.
        let entries = f.store().audit_entries(0, None).unwrap();
        assert!(entries.iter().any(|e| e.action == "retention.run"
            && e.actor == "uid:0"
            && e.result.contains("test_clock_disabled")));
    }

    #[test]
    fn not_configured_or_disabled() {
        let f = fixture(|c| c.enabled = false);
        let caller = Caller {
            actor: "uid:0".into(),
        };
        let e = f
            .service
            .run(&caller, &Op::RetentionRun { now: Some(T0) })
            .unwrap_err();
        assert_eq!(
            (e.status, e.code.as_str()),
            (StatusCode::CONFLICT, "retention_disabled")
        );
        assert!(!f.status().enabled);
        let bare = Service::offline(f.service.store().clone());
        let e = bare
            .run(&caller, &Op::RetentionRun { now: None })
            .unwrap_err();
        assert_eq!(e.code, "retention_not_configured");
        let Reply::Retention(view) = bare.run(&caller, &Op::RetentionStatus).unwrap() else {
            panic!()
        };
        assert!(!view.configured && view.volumes.is_empty());
    }

    #[test]
    fn unfinished_and_foreign_files_and_another_stores_directory() {
        let f = fixture(|_| {});
        f.run(T0);
        let dir = f.backups.join("acme/disk");
        // A crash left an unfinished backup; a shredded tenant left files; an
        // operator left notes: the first two go, the notes stay.
        let unfinished = dir.join(format!(".{}.tmp", full(T0 + 1)));
        std::fs::write(&unfinished, b"partial").unwrap();
        let orphan = f.backups.join("initech/disk");
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join(full(T0)), b"no key").unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let run = f.run(T0 + 60);
        assert_eq!(
            actions(&run),
            vec![
                (
                    "retention.backup-file-delete".into(),
                    format!("initech/disk/{}", full(T0))
                ),
                (
                    "retention.backup-file-delete".into(),
                    format!("acme/disk/.{}.tmp", full(T0 + 1))
                ),
            ]
        );
        assert!(!unfinished.exists() && !orphan.exists());
        assert!(!f.backups.join("initech").exists());
        assert!(dir.join("notes.txt").exists());
        // The directory belongs to another store now: nothing is written or
        // deleted there, and status says why.
        std::fs::write(f.backups.join(state::OWNER_FILE), "/elsewhere\n").unwrap();
        let run = f.run(T0 + 7 * DAY);
        assert!(
            run.actions.iter().all(|a| a.action != "retention.backup"),
            "{run:#?}"
        );
        assert_eq!(f.files("acme").len(), 2);
        let view = f.status();
        assert!(
            view.problems[0].contains("/elsewhere"),
            "{:?}",
            view.problems
        );
        assert!(view.volumes[0].next_backup.is_none());
    }

    #[test]
    fn a_failed_backup_leaves_nothing_and_is_retried() {
        let f = fixture(|_| {});
        // The backup directory cannot be read (a file is in its place): the
        // pass leaves backups alone and says so.
        std::fs::write(&f.backups, b"in the way").unwrap();
        let run = f.run(T0);
        assert!(run.actions.iter().all(|a| a.action != "retention.backup"));
        assert!(f.status().problems[0].contains("backups"));
        // acme's directory cannot be made (a file is in its place): its
        // backup fails, globex's is written.
        std::fs::remove_file(&f.backups).unwrap();
        std::fs::create_dir(&f.backups).unwrap();
        std::fs::write(f.backups.join("acme"), b"in the way").unwrap();
        let caller = Caller {
            actor: "uid:0".into(),
        };
        let op = Op::RetentionRun { now: Some(T0 + 60) };
        let Reply::RetentionRun(run) = f.service.run(&caller, &op).unwrap() else {
            panic!()
        };
        assert_eq!(run.failed, 1, "{run:#?}");
        let failed = &f.audit("retention.backup")[0];
        assert_eq!(failed.0, format!("acme/disk@{}", auto(T0)));
        assert!(failed.1.starts_with("error: "), "{failed:?}");
        assert_eq!(f.files("globex").len(), 1);
        // Fixed: the next pass writes it, from the same snapshot.
        std::fs::remove_file(f.backups.join("acme")).unwrap();
        f.run(T0 + 120);
        let name = format!(
            "{}-full-{}.bsbackup",
            crate::time::utc_stamp(T0 + 120),
            auto(T0)
        );
        assert_eq!(f.files("acme"), vec![name]);
    }

    #[test]
    fn shutdown_stops_a_pass() {
        let f = fixture(|_| {});
        f.retention.request_stop();
        assert!(f.retention.sleep(Duration::from_secs(3600)));
        let run = f.run(T0);
        assert_eq!(actions(&run), vec![]);
    }

    #[test]
    fn requests_in_http_form() {
        let parse = |method: Method, path: &str, body: &str| {
            Op::parse(&method, path, None, body.as_bytes())
        };
        assert_eq!(
            parse(Method::GET, "/v1/retention", "").unwrap(),
            Op::RetentionStatus
        );
        for body in ["", "{}", " "] {
            assert_eq!(
                parse(Method::POST, "/v1/retention/run", body).unwrap(),
                Op::RetentionRun { now: None }
            );
        }
        assert_eq!(
            parse(Method::POST, "/v1/retention/run", "{\"now\": 5}").unwrap(),
            Op::RetentionRun { now: Some(5) }
        );
        for body in ["{\"now\": -1}", "{\"now\": \"5\"}", "{\"when\": 5}"] {
            let e = parse(Method::POST, "/v1/retention/run", body).unwrap_err();
            assert_eq!(e.code, "invalid_field", "{body}");
        }
        let e = parse(Method::GET, "/v1/retention/run", "").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = parse(Method::DELETE, "/v1/retention", "").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!Op::RetentionStatus.mutates());
        assert!(Op::RetentionRun { now: None }.mutates());
        assert_eq!(Op::RetentionRun { now: Some(5) }.detail(), "now=5");
    }
}
