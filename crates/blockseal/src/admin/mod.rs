//! The admin API: tenants, volumes, keys and the audit log of a store, on a
//! running server (JSON over HTTP/1.1 on the admin Unix socket) or, when no
//! server runs, on the store opened directly. `docs/ADMIN-API.md` is the
//! reference.
//!
//! - [`api`]: the operations, their HTTP form, replies and errors;
//! - [`service`]: what each operation does (the one implementation);
//! - [`server`]: the socket, peer credentials, limits;
//! - [`client`]: the CLI's request;
//! - [`backup`]: backups, restores, drills and recovery bundles;
//! - [`catalog`]: the store's catalogue (`store backup`);
//! - [`stream`]: replies streamed as they are produced (a backup file, a
//!   catalogue, a restore's progress).

pub(crate) mod api;
pub(crate) mod backup;
pub(crate) mod catalog;
pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::open::{IfMissing, StoreLocation};
use api::{Op, Reply};
use client::CallError;
use service::{Caller, Service};

/// The admin socket's file name in the store directory.
pub(crate) const SOCKET_NAME: &str = "admin.sock";

/// The admin socket of the store in `dir`.
pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_NAME)
}

/// Where an operation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A running server answered on the admin socket.
    Online,
    /// No server runs: the store was opened directly.
    Offline,
}

/// Runs `op` on the store at `location`: through its server when one answers
/// on the admin socket, else on the store opened directly (creating it first
/// only if `if_missing` says so). Either way the reply and the errors are the
/// same; an [`api::ApiError`] comes back inside the `anyhow::Error` so that the
/// caller can pick the exit code.
pub(crate) fn execute(
    location: &StoreLocation,
    op: &Op,
    if_missing: IfMissing,
) -> anyhow::Result<(Reply, Mode)> {
    execute_with(location, op, if_missing, Settings::default())
}

/// What the configuration (`--config`) gives the admin operations on a store
/// opened directly; a running server has its own.
#[derive(Default)]
pub(crate) struct Settings {
    /// `[retention]`.
    pub(crate) retention: Option<Arc<crate::retention::Retention>>,
    /// `[limits]`' default I/O rate limits.
    pub(crate) io_defaults: Option<crate::iolimits::Defaults>,
}

/// As [`execute`], with `settings` from the configuration for the store
/// opened directly.
pub(crate) fn execute_with(
    location: &StoreLocation,
    op: &Op,
    if_missing: IfMissing,
    settings: Settings,
) -> anyhow::Result<(Reply, Mode)> {
    let socket = socket_path(&location.dir);
    match client::call(&socket, op) {
        Ok(reply) => return Ok((reply, Mode::Online)),
        Err(CallError::Api(e)) => return Err(e.into()),
        Err(CallError::Transport(e)) => {
            return Err(e.context(format!(
                "the server on {} did not complete the request",
                socket.display()
            )));
        }
        Err(CallError::NoServer) => {}
    }
    let store = location
        .open_for_admin(if_missing)
        .context("no server answers on the admin socket, so the store was opened directly")?;
    let mut service = Service::offline(Arc::new(store)).with_retention(settings.retention);
    if let Some(defaults) = settings.io_defaults {
        let limits = crate::iolimits::IoLimits::load(service.store().dir(), defaults)?;
        service = service.with_io_limits(Arc::new(limits));
    }
    let caller = Caller {
        actor: format!("local:uid:{}", rustix::process::geteuid().as_raw()),
    };
    Ok((service.run(&caller, op)?, Mode::Offline))
}

/// The store at `location` opened directly, with the admin operations on it
/// and the local caller: what [`execute`] falls back to when no server runs,
/// for commands that stream (a backup into a file).
pub(crate) fn offline(
    location: &StoreLocation,
    if_missing: IfMissing,
) -> anyhow::Result<(Service, Caller)> {
    let store = location
        .open_for_admin(if_missing)
        .context("no server answers on the admin socket, so the store was opened directly")?;
    let caller = Caller {
        actor: format!("local:uid:{}", rustix::process::geteuid().as_raw()),
    };
    Ok((Service::offline(Arc::new(store)), caller))
}
