//! Per-tenant and per-volume I/O rate limits (requests and bytes per
//! second): defaults from the configuration's `[limits]`, overrides per
//! tenant or volume set through the admin API (`blockseal limits set`), which
//! take effect at once on the connections already open.
//!
//! Overrides are kept in the store directory, in [`FILE_NAME`] (JSON, written
//! to a temporary file, synced and renamed, so a crash leaves the old or the
//! new file). They belong to this host, like the configuration: a store
//! catalogue or a backup does not carry them. A file that cannot be read or
//! parsed stops the server from starting (it would otherwise run without the
//! limits the operator set) and fails `limits show` and `limits set`, naming
//! the file.
//!
//! Each export's requests are charged to its tenant's limiter and its
//! volume's (a snapshot export to its volume's); see [`blockseal_nbd::Throttle`]
//! for how a limited request waits.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockseal_nbd::{RateLimit, RateLimiter, Throttle};
use serde::{Deserialize, Serialize};

/// The overrides' file in the store directory.
pub(crate) const FILE_NAME: &str = "io-limits.json";

/// The version of the file's format.
const FORMAT_VERSION: u32 = 1;

/// The default limits, from the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Defaults {
    /// Every tenant's, over all its volumes together.
    pub(crate) tenant: RateLimit,
    /// Every volume's.
    pub(crate) volume: RateLimit,
    /// Whether these are the configuration's (false when a CLI without
    /// `--config` opened the store itself: the defaults are then unknown).
    pub(crate) known: bool,
}

/// An override of one target's limits: per rate, `None` keeps the default,
/// `Some(0)` means unlimited, `Some(n)` is n per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Setting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_per_sec: Option<u64>,
}

impl Setting {
    fn is_empty(&self) -> bool {
        self.iops.is_none() && self.bytes_per_sec.is_none()
    }

    /// The limit in force: this setting over `default`.
    fn over(&self, default: RateLimit) -> RateLimit {
        RateLimit {
            iops: self.iops.map_or(default.iops, NonZeroU64::new),
            bytes_per_sec: self
                .bytes_per_sec
                .map_or(default.bytes_per_sec, NonZeroU64::new),
        }
    }
}

/// A change to one target's override: per rate, `None` leaves it as it is,
/// `Some(None)` goes back to the default, `Some(Some(0))` lifts the limit,
/// `Some(Some(n))` sets n per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) iops: Option<Option<u64>>,
    pub(crate) bytes_per_sec: Option<Option<u64>>,
}

impl Change {
    fn apply(&self, setting: &mut Setting) {
        if let Some(iops) = self.iops {
            setting.iops = iops;
        }
        if let Some(bytes) = self.bytes_per_sec {
            setting.bytes_per_sec = bytes;
        }
    }
}

/// What limits apply to: a tenant (all its volumes together) or one volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Target {
    Tenant(String),
    Volume { tenant: String, volume: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tenant(t) => f.write_str(t),
            Target::Volume { tenant, volume } => write!(f, "{tenant}/{volume}"),
        }
    }
}

/// The file's content.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    version: u32,
    /// By tenant name.
    #[serde(default)]
    tenants: BTreeMap<String, Setting>,
    /// By `tenant/volume`.
    #[serde(default)]
    volumes: BTreeMap<String, Setting>,
}

/// One target's limits as `limits show` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetView {
    /// `tenant` or `tenant/volume`.
    pub(crate) target: String,
    /// The override as set (absent rates keep the default; 0 is unlimited).
    pub(crate) set: Setting,
    /// Requests per second in force; `None`: unlimited.
    pub(crate) iops: Option<u64>,
    /// Bytes per second in force; `None`: unlimited.
    pub(crate) bytes_per_sec: Option<u64>,
}

/// A limit as reported: `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateView {
    pub(crate) iops: Option<u64>,
    pub(crate) bytes_per_sec: Option<u64>,
}

impl From<RateLimit> for RateView {
    fn from(limit: RateLimit) -> RateView {
        RateView {
            iops: limit.iops.map(NonZeroU64::get),
            bytes_per_sec: limit.bytes_per_sec.map(NonZeroU64::get),
        }
    }
}

/// Every limit: the defaults and each override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsView {
    /// Whether `default_tenant` and `default_volume` are the server's
    /// configuration (false when no server runs and no `--config` was given).
    pub(crate) defaults_known: bool,
    pub(crate) default_tenant: RateView,
    pub(crate) default_volume: RateView,
    pub(crate) tenants: Vec<TargetView>,
    pub(crate) volumes: Vec<TargetView>,
}

/// The limits of one store's exports, and their live limiters.
pub(crate) struct IoLimits {
    defaults: Defaults,
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    overrides: Overrides,
    /// The limiters handed out, by tenant and by `tenant/volume`: changing a
    /// limit changes them in place.
    tenants: HashMap<String, Arc<RateLimiter>>,
    volumes: HashMap<String, Arc<RateLimiter>>,
}

impl IoLimits {
    /// The limits of the store in `dir`: `defaults`, and the overrides in its
    /// [`FILE_NAME`] (none if there is no such file).
    pub(crate) fn load(dir: &Path, defaults: Defaults) -> anyhow::Result<IoLimits> {
        let path = dir.join(FILE_NAME);
        let overrides = match fs::read(&path) {
            Ok(bytes) => parse(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the I/O limits file {} is damaged ({e}); fix it or move it away \
                     (the limits it set are then the defaults)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Overrides {
                version: FORMAT_VERSION,
                ..Overrides::default()
            },
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the I/O limits file {}",
                    path.display()
                )));
            }
        };
        Ok(IoLimits {
            defaults,
            path,
            state: Mutex::new(State {
                overrides,
                tenants: HashMap::new(),
                volumes: HashMap::new(),
            }),
        })
    }

    /// The throttle of the export of `tenant`'s `volume` (or of a snapshot
    /// of it): its tenant's limiter and its volume's, shared with every
    /// other connection to them.
    pub(crate) fn throttle(&self, tenant: &str, volume: &str) -> Throttle {
        let mut state = self.lock();
        let tenant_limit = self.tenant_limit(&state.overrides, tenant);
        let volume_name = format!("{tenant}/{volume}");
        let volume_limit = self.volume_limit(&state.overrides, &volume_name);
        let tenant_limiter = state
            .tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(RateLimiter::new(tenant_limit)))
            .clone();
        let volume_limiter = state
            .volumes
            .entry(volume_name)
            .or_insert_with(|| Arc::new(RateLimiter::new(volume_limit)))
            .clone();
        Throttle::new(vec![tenant_limiter, volume_limiter])
    }

    /// Changes `target`'s override, writes the file, then applies the new
    /// limit to the connections open. Nothing changes if the file cannot be
    /// written.
    pub(crate) fn set(&self, target: &Target, change: Change) -> anyhow::Result<LimitsView> {
        let mut state = self.lock();
        let mut overrides = state.overrides.clone();
        let (map, key) = match target {
            Target::Tenant(t) => (&mut overrides.tenants, t.clone()),
            Target::Volume { .. } => (&mut overrides.volumes, target.to_string()),
        };
        let mut setting = map.get(&key).copied().unwrap_or_default();
        change.apply(&mut setting);
        if setting.is_empty() {
            map.remove(&key);
        } else {
            map.insert(key, setting);
        }
        self.save(&overrides)?;
        state.overrides = overrides;
        self.apply(&mut state);
        Ok(self.view_of(&state))
    }

    /// Drops the overrides of `tenant` and its volumes (the tenant is gone),
    /// or of its one `volume`.
    pub(crate) fn forget(&self, tenant: &str, volume: Option<&str>) -> anyhow::Result<()> {
        let mut state = self.lock();
        let mut overrides = state.overrides.clone();
        match volume {
            Some(v) => {
                overrides.volumes.remove(&format!("{tenant}/{v}"));
            }
            None => {
                overrides.tenants.remove(tenant);
                let prefix = format!("{tenant}/");
                overrides
                    .volumes
                    .retain(|name, _| !name.starts_with(&prefix));
            }
        }
        if overrides.tenants.len() == state.overrides.tenants.len()
            && overrides.volumes.len() == state.overrides.volumes.len()
        {
            return Ok(());
        }
        self.save(&overrides)?;
        state.overrides = overrides;
        self.apply(&mut state);
        Ok(())
    }

    /// Every limit, as `limits show` reports them.
    pub(crate) fn view(&self) -> LimitsView {
        self.view_of(&self.lock())
    }

    /// Each live limiter's name (`tenant` or `tenant/volume`), whether it is
    /// a tenant's, and the limiter, for the metrics.
    pub(crate) fn limiters(&self) -> Vec<(String, bool, Arc<RateLimiter>)> {
        let state = self.lock();
        let tenants = state
            .tenants
            .iter()
            .map(|(name, l)| (name.clone(), true, l.clone()));
        let volumes = state
            .volumes
            .iter()
            .map(|(name, l)| (name.clone(), false, l.clone()));
        let mut all: Vec<_> = tenants.chain(volumes).collect();
        all.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        all
    }

    fn tenant_limit(&self, overrides: &Overrides, tenant: &str) -> RateLimit {
        overrides
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or_default()
            .over(self.defaults.tenant)
    }

    fn volume_limit(&self, overrides: &Overrides, volume: &str) -> RateLimit {
        overrides
            .volumes
            .get(volume)
            .copied()
            .unwrap_or_default()
            .over(self.defaults.volume)
    }

    /// Sets every live limiter to the limit in force now.
    fn apply(&self, state: &mut State) {
        for (tenant, limiter) in &state.tenants {
            let limit = self.tenant_limit(&state.overrides, tenant);
            if limiter.limit() != limit {
                limiter.set(limit);
            }
        }
        for (volume, limiter) in &state.volumes {
            let limit = self.volume_limit(&state.overrides, volume);
            if limiter.limit() != limit {
                limiter.set(limit);
            }
        }
    }

    fn view_of(&self, state: &State) -> LimitsView {
        let target = |name: &String, set: &Setting, limit: RateLimit| {
            let rate = RateView::from(limit);
            TargetView {
                target: name.clone(),
                set: *set,
                iops: rate.iops,
                bytes_per_sec: rate.bytes_per_sec,
            }
        };
        LimitsView {
            defaults_known: self.defaults.known,
            default_tenant: self.defaults.tenant.into(),
            default_volume: self.defaults.volume.into(),
            tenants: state
                .overrides
                .tenants
                .iter()
                .map(|(name, set)| target(name, set, set.over(self.defaults.tenant)))
                .collect(),
            volumes: state
                .overrides
                .volumes
                .iter()
                .map(|(name, set)| target(name, set, set.over(self.defaults.volume)))
                .collect(),
        }
    }

    /// Writes `overrides` in place of the file: a temporary file, synced,
    /// renamed, and the directory synced.
    fn save(&self, overrides: &Overrides) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let temp = self.path.with_extension("json.tmp");
        let mut text = serde_json::to_vec_pretty(overrides).expect("overrides serialize");
        text.push(b'\n');
        let written = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, &self.path)?;
            fs::File::open(dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&temp);
            anyhow::Error::new(e).context(format!(
                "cannot write the I/O limits file {}; the limits are unchanged",
                self.path.display()
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock panics but file I/O errors, which are
        // returned; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn parse(bytes: &[u8]) -> Result<Overrides, String> {
    let overrides: Overrides = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if overrides.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            overrides.version
        ));
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn rate(iops: u64, bytes: u64) -> RateLimit {
        RateLimit {
            iops: NonZeroU64::new(iops),
            bytes_per_sec: NonZeroU64::new(bytes),
        }
    }

    fn defaults() -> Defaults {
        Defaults {
            tenant: rate(1000, 0),
            volume: rate(0, 10 << 20),
            known: true,
        }
    }

    fn set(iops: Option<Option<u64>>, bytes_per_sec: Option<Option<u64>>) -> Change {
        Change {
            iops,
            bytes_per_sec,
        }
    }

    fn volume(t: &str, v: &str) -> Target {
        Target::Volume {
            tenant: t.to_owned(),
            volume: v.to_owned(),
        }
    }

    #[test]
    fn overrides_layer_over_the_defaults_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IoLimits::load(dir.path(), defaults()).unwrap();
        let view = limits.view();
        assert!(view.tenants.is_empty() && view.volumes.is_empty());
        assert_eq!(view.default_tenant.iops, Some(1000));

        limits
            .set(&Target::Tenant("acme".into()), set(Some(Some(50)), None))
            .unwrap();
        let view = limits
            .set(
                &volume("acme", "disk"),
                set(Some(Some(0)), Some(Some(1 << 20))),
            )
            .unwrap();
        assert_eq!(view.tenants[0].iops, Some(50));
        assert_eq!(view.tenants[0].bytes_per_sec, None, "the tenant default");
        assert_eq!(view.volumes[0].iops, None, "0 lifts the default");
        assert_eq!(view.volumes[0].bytes_per_sec, Some(1 << 20));

        let again = IoLimits::load(dir.path(), defaults()).unwrap();
        assert_eq!(again.view(), view);

        // Back to the defaults: the override goes.
        let view = again
            .set(&volume("acme", "disk"), set(Some(None), Some(None)))
            .unwrap();
        assert!(view.volumes.is_empty());
    }

    #[test]
    fn a_change_reaches_the_limiters_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IoLimits::load(dir.path(), Defaults::default()).unwrap();
        let throttle = limits.throttle("acme", "disk");
        let start = Instant::now();
        assert_eq!(
            throttle.admit(start, 1 << 30),
            start,
            "unlimited by default"
        );

        limits
            .set(&Target::Tenant("acme".into()), set(Some(Some(10)), None))
            .unwrap();
        let mut at = start;
        for _ in 0..12 {
            at = throttle.admit(at, 0);
        }
        assert!(at > start, "the tenant's new limit holds the old throttle");
        // Another tenant is not limited.
        let other = limits.throttle("other", "disk");
        assert_eq!(other.admit(start, 0), start);
        assert_eq!(limits.limiters().len(), 4);
    }

    #[test]
    fn forgetting_a_tenant_drops_its_volumes_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IoLimits::load(dir.path(), defaults()).unwrap();
        limits
            .set(&Target::Tenant("acme".into()), set(Some(Some(5)), None))
            .unwrap();
        limits
            .set(&volume("acme", "disk"), set(Some(Some(5)), None))
            .unwrap();
        limits
            .set(&volume("acmecorp", "disk"), set(Some(Some(5)), None))
            .unwrap();
        limits.forget("acme", None).unwrap();
        let view = IoLimits::load(dir.path(), defaults()).unwrap().view();
        assert!(view.tenants.is_empty());
        assert_eq!(view.volumes.len(), 1);
        assert_eq!(view.volumes[0].target, "acmecorp/disk");
    }

    #[test]
    fn a_damaged_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(FILE_NAME),
            b"{\"version\": 1, \"tenants\": {",
        )
        .unwrap();
        let err = IoLimits::load(dir.path(), defaults()).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains(FILE_NAME) && text.contains("damaged"),
            "{text}"
        );
        fs::write(dir.path().join(FILE_NAME), b"{\"version\": 9}").unwrap();
        let text = format!(
            "{:#}",
            IoLimits::load(dir.path(), defaults()).err().unwrap()
        );
        assert!(text.contains("format version 9"), "{text}");
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IoLimits::load(dir.path(), defaults()).unwrap();
        let throttle = limits.throttle("acme", "disk");
        // The temporary file's place is taken by a directory: the write fails.
        fs::create_dir(dir.path().join("io-limits.json.tmp")).unwrap();
        let err = limits
            .set(&Target::Tenant("acme".into()), set(Some(Some(1)), None))
            .unwrap_err();
        assert!(format!("{err:#}").contains("unchanged"), "{err:#}");
        assert!(limits.view().tenants.is_empty());
        // 50 requests at 1000 a second take 39 ms (11 at once); at 1 a
        // second they would take 49 s.
        let start = Instant::now();
        let mut at = start;
        for _ in 0..50 {
            at = throttle.admit(at, 0);
        }
        assert!(
            at - start < Duration::from_millis(100),
            "1000 requests per second still"
        );
    }
}
