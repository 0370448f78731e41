//! Opening the store: where it is, which master key file, which passphrase source,
//! from the command line or the configuration file; and the error messages an
//! operator needs when that fails (most of all: a running server holds it).

use std::path::{Path, PathBuf};

use anyhow::bail;
use blockseal_keys::{MasterKey, load_key_file};
use blockseal_volume::meta::BackendKind;
use blockseal_volume::{OpenError, RecoveryReport, Store, StoreOptions};

use crate::cli::StoreArgs;
use crate::config::{Config, ObjectStoreConfig};
use crate::passphrase::{Confirm, PassphraseArgs};

/// Where a store and its master key are.
#[derive(Debug)]
pub(crate) struct StoreLocation {
    /// The store directory.
    pub(crate) dir: PathBuf,
    /// The master key file.
    pub(crate) key_file: PathBuf,
    /// Where the key file's passphrase comes from.
    pub(crate) passphrase: PassphraseArgs,
    /// The metadata backend of a store created here.
    pub(crate) backend: BackendKind,
    /// Free space kept for metadata commits (`space_reserve`).
    pub(crate) space_reserve: Option<u64>,
    /// Memory of the extent indexes (`index_memory`).
    pub(crate) index_memory: Option<u64>,
    /// Re-encryption rate in bytes per second (`reencrypt_rate`).
    pub(crate) reencrypt_rate: Option<u64>,
    /// Metadata and segments in a bucket (`[object_store]`).
    pub(crate) object_store: Option<ObjectStoreConfig>,
    /// The configuration is a cluster host's (`[cluster]`): its stores are
    /// shards that only a running server opens.
    pub(crate) cluster: bool,
}

/// Whether opening may create a store in a directory that holds none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfMissing {
    /// Create it (with the located master key).
    Create,
    /// Fail with a readable message.
    Fail,
}

impl StoreLocation {
    /// From an admin command's arguments (and the configuration file they name).
    pub(crate) fn from_args(args: &StoreArgs) -> anyhow::Result<StoreLocation> {
        if let Some(path) = &args.config {
            let config = Config::load(path)?;
            return Ok(StoreLocation::from_config(&config, &args.passphrase));
        }
        Ok(StoreLocation {
            key_file: args
                .master_key
                .clone()
                .unwrap_or_else(|| args.data_dir.join("master.key")),
            dir: args.data_dir.clone(),
            passphrase: args.passphrase.clone(),
            backend: BackendKind::Redb,
            space_reserve: None,
            index_memory: None,
            reencrypt_rate: None,
            object_store: None,
            cluster: false,
        })
    }

    /// From a configuration file; a passphrase source given on the command line
    /// wins over the file's.
    pub(crate) fn from_config(config: &Config, passphrase: &PassphraseArgs) -> StoreLocation {
        let given = passphrase.passphrase_env.is_some()
            || passphrase.passphrase_fd.is_some()
            || passphrase.passphrase_prompt;
        StoreLocation {
            dir: config.data_dir.clone(),
            key_file: config.master_key.file.clone(),
            passphrase: if given {
                passphrase.clone()
            } else {
                config.master_key.passphrase()
            },
            backend: config.metadata_backend.into(),
            space_reserve: config.space_reserve.map(|s| s.0),
            index_memory: config.index_memory.map(|s| s.0),
            reencrypt_rate: config.reencrypt_rate.map(|s| s.0),
            object_store: config.object_store.clone(),
            cluster: config.cluster.is_some(),
        }
    }

    /// Loads the master key (asking for its passphrase if needed).
    pub(crate) fn load_key(&self) -> anyhow::Result<MasterKey> {
        let path = &self.key_file;
        if path.symlink_metadata().is_err() {
            bail!(
                "no master key file at {}; create one with `blockseal key init --out {}`",
                path.display(),
                path.display()
            );
        }
        let passphrase = self
            .passphrase
            .read(&path.display().to_string(), Confirm::Once)?;
        Ok(load_key_file(path, passphrase.as_ref())?)
    }

    /// Whether the directory holds a store.
    /// Opens the store accepting that its metadata lost commits
    /// (`Store::danger_accept_metadata_loss`).
    pub(crate) fn accept_metadata_loss(&self) -> anyhow::Result<(Store, RecoveryReport)> {
        if !self.has_store() {
            bail!("{} holds no blockseal store", self.dir.display());
        }
        let key = self.load_key()?;
        let options = self.options()?;
        Store::danger_accept_metadata_loss(&self.dir, key, options)
            .map_err(|e| explain_open_error(e, &self.dir))
    }

    /// The store options the configuration asks for.
    pub(crate) fn options(&self) -> anyhow::Result<StoreOptions> {
        let mut options = StoreOptions::new().backend(self.backend);
        if let Some(config) = &self.object_store {
            options = options.object_storage(config.connect()?, config.prefix.trim_matches('/'));
        }
        if let Some(bytes) = self.space_reserve {
            options = options.space_reserve(bytes);
        }
        if let Some(bytes) = self.index_memory {
            options = options.index_memory(usize::try_from(bytes).unwrap_or(usize::MAX));
        }
        if let Some(rate) = self.reencrypt_rate {
            options = options.reencrypt_rate(rate);
        }
        Ok(options)
    }

    pub(crate) fn has_store(&self) -> bool {
        holds_store(&self.dir)
    }

    /// Opens the store for one admin command: as [`open`](Self::open), without
    /// the background work of a server (compaction, re-encryption jobs), which
    /// waits for the server.
    pub(crate) fn open_for_admin(&self, if_missing: IfMissing) -> anyhow::Result<Store> {
        self.open_with(
            if_missing,
            self.options()?
                .background_compaction(false)
                .background_reencryption(false),
        )
    }

    /// Opens the store, or creates it when it is missing and `if_missing` allows.
    pub(crate) fn open(&self, if_missing: IfMissing) -> anyhow::Result<Store> {
        self.open_with(if_missing, self.options()?)
    }

    fn open_with(&self, if_missing: IfMissing, options: StoreOptions) -> anyhow::Result<Store> {
        if self.cluster {
            bail!(
                "this is a cluster host's configuration ([cluster]): its stores are shards that \
                 only a running `blockseal serve` opens, under a lease; start the server and \
                 run the command again (it goes through the admin socket {})",
                crate::admin::socket_path(&self.dir).display()
            );
        }
        let exists = self.has_store();
        if !exists && if_missing == IfMissing::Fail {
            bail!(
                "{} holds no blockseal store; `blockseal tenant create` or `blockseal serve` creates one",
                self.dir.display()
            );
        }
        let key = self.load_key()?;
        let opened = if exists {
            Store::open(&self.dir, key, options)
        } else {
            Store::create(&self.dir, key, options)
        };
        let store = opened.map_err(|e| explain_open_error(e, &self.dir))?;
        if !exists {
            tracing::info!(dir = %self.dir.display(), backend = ?self.backend, "created a new store");
        } else if store.backend() != self.backend {
            tracing::debug!(
                configured = ?self.backend,
                actual = ?store.backend(),
                "the store keeps the metadata backend it was created with"
            );
        }
        Ok(store)
    }
}

/// Whether `dir` holds a store (its header file).
pub(crate) fn holds_store(dir: &Path) -> bool {
    dir.join("FORMAT").exists()
}

/// Adds what an operator should do to the store's own error.
fn explain_open_error(err: OpenError, dir: &Path) -> anyhow::Error {
    match err {
        OpenError::Locked { .. } => anyhow::anyhow!(
            "the store {} is in use: a running `blockseal serve` (or another blockseal \
             command) holds its lock, and nothing answers on its admin socket {}; admin \
             commands go through that socket when a server runs, so wait for the other \
             command to finish, or check the server's log",
            dir.display(),
            crate::admin::socket_path(dir).display()
        ),
        e @ OpenError::WrongMasterKey(_) => anyhow::anyhow!(
            "cannot open the store {}: {e}\n\nIf its master key was rotated \
             (`blockseal key rotate-master`), use the new key file: point \
             master_key.file (or --master-key) at it, or put it in place of the old one",
            dir.display()
        ),
        e @ (OpenError::MetadataRolledBack { .. }
        | OpenError::MarkerDamaged { .. }
        | OpenError::MarkerMissing { .. }
        | OpenError::UnknownSegments { .. }) => anyhow::anyhow!(
            "{e}\n\nRestore the store's metadata from a backup if you can. To serve what \
             the metadata still holds instead, and lose what it forgot, run\n  \
             blockseal store accept-metadata-loss --data-dir {} --yes-i-understand\n\
             (docs/OPERATIONS.md, \"Metadata loss\")",
            dir.display()
        ),
        other => {
            anyhow::Error::new(other).context(format!("cannot open the store {}", dir.display()))
        }
    }
}
