//! `[retention]` in the server's configuration file: what the scheduler keeps,
//! for how long, and where backups go. Only parsing and checking live here;
//! `plan` says what the settings mean.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::bail;
use blockseal_keys::TenantId;
use serde::Deserialize;

use crate::time::Period;

/// `[retention]`; every field has a default, so an empty table turns on the
/// schedules with the product's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionConfig {
    /// Whether the server runs the schedules (default true). `false` keeps
    /// them off while `blockseal retention status` still shows what they
    /// would do.
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
    /// A snapshot of every volume is taken when its newest scheduled one is
    /// this old (default 7d).
    #[serde(default = "seven_days")]
    pub(crate) snapshot_every: Period,
    /// Scheduled snapshots are deleted at this age (default 14d).
    #[serde(default = "fourteen_days")]
    pub(crate) snapshot_keep: Period,
    /// Where scheduled backups are written; none without it.
    #[serde(default)]
    pub(crate) backup_dir: Option<PathBuf>,
    /// A backup of every volume is written when its last one is this old
    /// (default 7d).
    #[serde(default = "seven_days")]
    pub(crate) backup_every: Period,
    /// How long each backup stays restorable at least (default 28d).
    #[serde(default = "twenty_eight_days")]
    pub(crate) backup_keep: Period,
    /// A full backup starts a new chain at least this often (default 28d).
    #[serde(default = "twenty_eight_days")]
    pub(crate) full_every: Period,
    /// Data of the opted-in tenants older than this is discarded (default
    /// 60d).
    #[serde(default = "sixty_days")]
    pub(crate) data_max_age: Period,
    /// The tenants whose data is discarded past `data_max_age` (default
    /// none: data retention is opt-in per tenant).
    #[serde(default)]
    pub(crate) data_tenants: BTreeSet<String>,
}

fn yes() -> bool {
    true
}

fn seven_days() -> Period {
    Period::days(7)
}

fn fourteen_days() -> Period {
    Period::days(14)
}

fn twenty_eight_days() -> Period {
    Period::days(28)
}

fn sixty_days() -> Period {
    Period::days(60)
}

impl Default for RetentionConfig {
    /// The settings of an empty `[retention]` table.
    fn default() -> RetentionConfig {
        RetentionConfig {
            enabled: true,
            snapshot_every: seven_days(),
            snapshot_keep: fourteen_days(),
            backup_dir: None,
            backup_every: seven_days(),
            backup_keep: twenty_eight_days(),
            full_every: twenty_eight_days(),
            data_max_age: sixty_days(),
            data_tenants: BTreeSet::new(),
        }
    }
}

impl RetentionConfig {
    /// Makes a relative `backup_dir` relative to `base` (the configuration
    /// file's directory).
    pub(crate) fn resolve(&mut self, base: &Path) {
        if let Some(dir) = &mut self.backup_dir
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
    }

    /// Refuses settings that cannot work; each error names the field.
    pub(crate) fn check(&self, data_dir: &Path) -> anyhow::Result<()> {
        for (name, value) in [
            ("snapshot_every", self.snapshot_every),
            ("snapshot_keep", self.snapshot_keep),
            ("backup_every", self.backup_every),
            ("backup_keep", self.backup_keep),
            ("full_every", self.full_every),
        ] {
            if value.secs() == 0 {
                bail!("retention.{name}: must be longer than 0s");
            }
        }
        // Blocks are dated by daily age marks: a shorter limit cannot be kept,
        // and would discard nearly everything every day.
        if self.data_max_age < Period::DAY {
            bail!(
                "retention.data_max_age: {} is less than a day, the precision of data retention",
                self.data_max_age
            );
        }
        for name in &self.data_tenants {
            TenantId::new(name).map_err(|e| anyhow::anyhow!("retention.data_tenants: {e}"))?;
        }
        if let Some(dir) = &self.backup_dir
            && dir.starts_with(data_dir)
        {
            bail!(
                "retention.backup_dir: {} is inside data_dir {}; backups belong on other storage \
                 than the data they protect",
                dir.display(),
                data_dir.display()
            );
        }
        Ok(())
    }

    /// Whether `tenant`'s data is discarded past `data_max_age`.
    pub(crate) fn ages_data_of(&self, tenant: &TenantId) -> bool {
        self.data_tenants.contains(tenant.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str =
        "data_dir = \"data\"\n[master_key]\nfile = \"master.key\"\n[unix]\npath = \"nbd.sock\"\n";

    fn load(retention: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockseal.toml");
        std::fs::write(&path, format!("{BASE}{retention}")).unwrap();
        Config::load(&path)
    }

    fn error(retention: &str) -> String {
        format!("{:#}", load(retention).unwrap_err())
    }

    #[test]
    fn no_table_no_retention_and_an_empty_table_the_defaults() {
        assert_eq!(load("").unwrap().retention, None);
        let r = load("[retention]\n").unwrap().retention.unwrap();
        assert_eq!(r, RetentionConfig::default());
        assert!(r.enabled);
        assert_eq!(r.snapshot_every, Period::days(7));
        assert_eq!(r.snapshot_keep, Period::days(14));
        assert_eq!(r.backup_dir, None);
        assert_eq!(r.backup_every, Period::days(7));
        assert_eq!(r.backup_keep, Period::days(28));
        assert_eq!(r.full_every, Period::days(28));
        assert_eq!(r.data_max_age, Period::days(60));
        assert!(r.data_tenants.is_empty());
    }

    #[test]
    fn every_setting() {
        let config = load(
            "[retention]\nenabled = false\nsnapshot_every = \"1d\"\nsnapshot_keep = \"3d\"\n\
             backup_dir = \"backups\"\nbackup_every = \"12h\"\nbackup_keep = \"2w\"\n\
             full_every = \"7d\"\ndata_max_age = \"30d\"\ndata_tenants = [\"acme\", \"globex\"]\n",
        )
        .unwrap();
        let r = config.retention.unwrap();
        assert!(!r.enabled);
        assert_eq!(r.snapshot_every, Period::DAY);
        assert_eq!(r.snapshot_keep, Period::days(3));
        assert_eq!(r.backup_every, Period(12 * 3600));
        assert_eq!(r.backup_keep, Period::days(14));
        assert_eq!(r.full_every, Period::days(7));
        assert_eq!(r.data_max_age, Period::days(30));
        assert!(r.ages_data_of(&TenantId::new("globex").unwrap()));
        assert!(!r.ages_data_of(&TenantId::new("initech").unwrap()));
        // Relative to the configuration file, as every path.
        let dir = r.backup_dir.unwrap();
        assert!(dir.is_absolute() && dir.ends_with("backups"), "{dir:?}");
    }

    #[test]
    fn refusals_name_the_field() {
        for (retention, field) in [
            ("[retention]\nsnapshot_evry = \"7d\"\n", "snapshot_evry"),
            ("[retention]\nsnapshot_every = \"7\"\n", "snapshot_every"),
            ("[retention]\nsnapshot_every = 7\n", "snapshot_every"),
            ("[retention]\nbackup_keep = \"7 days\"\n", "backup_keep"),
            ("[retention]\nfull_every = \"0d\"\n", "retention.full_every"),
            (
                "[retention]\nsnapshot_keep = \"0s\"\n",
                "retention.snapshot_keep",
            ),
            (
                "[retention]\ndata_max_age = \"23h\"\n",
                "retention.data_max_age",
            ),
            (
                "[retention]\ndata_tenants = [\"Acme\"]\n",
                "retention.data_tenants",
            ),
            ("[retention]\ndata_tenants = \"acme\"\n", "data_tenants"),
            ("[retention]\nenabled = \"yes\"\n", "enabled"),
            (
                "[retention]\nbackup_dir = \"data/backups\"\n",
                "retention.backup_dir",
            ),
            (
                "[retention]\nbackup_dir = \"data\"\n",
                "retention.backup_dir",
            ),
        ] {
            let message = error(retention);
            assert!(message.contains("blockseal.toml"), "{message}");
            assert!(message.contains(field), "{field}: {message}");
        }
    }
}
