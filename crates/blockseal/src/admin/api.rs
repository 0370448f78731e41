//! The admin API's vocabulary: every operation ([`Op`]), its HTTP form (method,
//! versioned path, JSON body) in both directions, the replies, and the JSON error.
//!
//! The server parses a request into an [`Op`] with [`Op::parse`]; the CLI turns an
//! [`Op`] into a request with [`Op::to_request`]. A unit test checks that the two
//! agree for every operation, so the reference in `docs/ADMIN-API.md`, the server
//! and the client cannot drift apart silently.
//!
//! Bodies are decoded with unknown fields refused: a client cannot set what the
//! API does not name (no mass assignment). Nothing here ever holds key material
//! except passphrases: [`Op::RotateMaster`]'s for the new key file, and the
//! recovery bundle's of [`Op::VerifyBackups`], [`Op::Restore`] and
//! [`Op::ExportTenantKeys`]. They are zeroized on drop and never serialized in
//! a reply, a log line or the audit log. A sealed bundle in a reply is
//! ciphertext.

use std::fmt;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::iolimits::LimitsView;
use crate::retention::{RetentionView, RunView};

/// The API version every path starts with.
pub(crate) const VERSION_PREFIX: &str = "/v1";

/// Largest request body the server reads.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// One admin operation, with its arguments already validated as names and sizes.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// `GET /v1/status`
    Status,
    /// `GET /v1/tenants`
    ListTenants,
    /// `GET /v1/tenants/{tenant}`
    ShowTenant { tenant: String },
    /// `POST /v1/tenants` `{"name": ...}`
    CreateTenant { tenant: String },
    /// `DELETE /v1/tenants/{tenant}` (only a tenant without volumes)
    DeleteTenant { tenant: String },
    /// `POST /v1/tenants/{tenant}/shred` `{"confirm": "<tenant>"}`
    ShredTenant { tenant: String },
    /// `POST /v1/tenants/{tenant}/rotate-key`
    RotateTenantKey { tenant: String },
    /// `GET /v1/volumes` or `GET /v1/tenants/{tenant}/volumes`
    ListVolumes { tenant: Option<String> },
    /// `GET /v1/tenants/{tenant}/volumes/{volume}`
    ShowVolume { tenant: String, volume: String },
    /// `POST /v1/tenants/{tenant}/volumes` `{"name", "size", "block_size"?}`
    CreateVolume {
        tenant: String,
        volume: String,
        size: u64,
        block_size: u32,
    },
    /// `PATCH /v1/tenants/{tenant}/volumes/{volume}` `{"size", "discard_tail"?}`
    ResizeVolume {
        tenant: String,
        volume: String,
        size: u64,
        discard_tail: bool,
    },
    /// `DELETE /v1/tenants/{tenant}/volumes/{volume}[?force=true]`
    DeleteVolume {
        tenant: String,
        volume: String,
        force: bool,
    },
    /// `POST /v1/tenants/{tenant}/volumes/{volume}/rotate-key`
    RotateDataKey { tenant: String, volume: String },
    /// `GET /v1/tenants/{tenant}/volumes/{volume}/keys`
    DataKeyStatus { tenant: String, volume: String },
    /// `GET /v1/keys`: every volume's data keys
    DataKeyStatusAll,
    /// `POST /v1/tenants/{tenant}/volumes/{volume}/reencrypt`: finish the
    /// volume's re-encryption now, without the rate limit
    Reencrypt { tenant: String, volume: String },
    /// `POST /v1/master-key/rotate` `{"key_file", "passphrase"?}`
    RotateMaster {
        key_file: String,
        passphrase: Option<Zeroizing<String>>,
    },
    /// `GET /v1/audit[?since_seq=N][&since_time=UNIX][&limit=N]`
    Audit {
        since_seq: u64,
        since_time: Option<u64>,
        limit: Option<u64>,
    },
    /// `GET /v1/audit/verify`
    VerifyAudit,
    /// `GET /v1/tenants/{tenant}/volumes/{volume}/snapshots`
    ListSnapshots { tenant: String, volume: String },
    /// `POST /v1/tenants/{tenant}/volumes/{volume}/snapshots` `{"name": ...}`
    CreateSnapshot {
        tenant: String,
        volume: String,
        snapshot: String,
    },
    /// `GET /v1/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}`
    ShowSnapshot {
        tenant: String,
        volume: String,
        snapshot: String,
    },
    /// `DELETE /v1/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}[?force=true]`
    DeleteSnapshot {
        tenant: String,
        volume: String,
        snapshot: String,
        force: bool,
    },
    /// `POST /v1/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}/rollback[?force=true]`
    RollbackSnapshot {
        tenant: String,
        volume: String,
        snapshot: String,
        force: bool,
    },
    /// `GET /v1/retention`
    RetentionStatus,
    /// `POST /v1/retention/run` `{"now"?: UNIX}` (`now` only on a test clock)
    RetentionRun { now: Option<u64> },
    /// `POST /v1/tenants/{tenant}/volumes/{volume}/backups`
    /// `{"snapshot", "base"?, "expires"?}`: the backup file is the response
    /// body (see `admin::stream`).
    CreateBackup {
        tenant: String,
        volume: String,
        snapshot: String,
        /// The base snapshot of an incremental backup.
        base: Option<String>,
        /// When the backup's key is destroyed, Unix seconds.
        expires: Option<u64>,
    },
    /// `POST /v1/backups/verify`
    /// `{"files", "structure_only"?, "bundle"?, "passphrase"?}`
    VerifyBackups {
        /// Absolute paths, read by the server.
        files: Vec<String>,
        structure_only: bool,
        /// A recovery bundle's absolute path (keys from it, not the store).
        bundle: Option<String>,
        /// The bundle's passphrase, if it is sealed under one.
        passphrase: Option<Zeroizing<String>>,
    },
    /// `GET /v1/backups/keys` or `GET /v1/tenants/{tenant}/backups/keys`
    ListBackupKeys { tenant: Option<String> },
    /// `POST /v1/backups/drill` `{"dir"}`
    DrillBackups {
        /// An absolute path, searched by the server.
        dir: String,
    },
    /// `POST /v1/restore` `{"files", "tenant", "volume", "bundle"?, "passphrase"?}`
    Restore {
        /// Absolute paths, read by the server: a full backup, then
        /// incrementals in order.
        files: Vec<String>,
        tenant: String,
        volume: String,
        bundle: Option<String>,
        passphrase: Option<Zeroizing<String>>,
    },
    /// `POST /v1/tenants/{tenant}/export-keys` `{"passphrase"}` or
    /// `{"to_master_key": true}`
    ExportTenantKeys {
        tenant: String,
        /// Sealed under this passphrase; `None`: to the store's master key.
        passphrase: Option<Zeroizing<String>>,
    },
    /// `POST /v1/store/backup` `{"segments_to"?}`: the store's catalogue is
    /// the response body, its summary a trailer (see `admin::stream`).
    BackupStore {
        /// An absolute path on the server's host, absent or an empty
        /// directory: the segment files are hard-linked (or copied) there.
        segments_to: Option<String>,
    },
    /// `GET /v1/limits`: the default I/O rate limits and every override
    ShowLimits,
    /// `PATCH /v1/limits/tenants/{tenant}` or
    /// `PATCH /v1/limits/tenants/{tenant}/volumes/{volume}`
    /// `{"iops"?, "bytes_per_sec"?}`: per rate, absent leaves it, `null`
    /// goes back to the default, 0 lifts the limit, n sets n per second
    SetLimits {
        tenant: String,
        volume: Option<String>,
        iops: Option<Option<u64>>,
        bytes_per_sec: Option<Option<u64>>,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Everything but the passphrase, which shows only as present or not.
        match self {
            Op::RotateMaster {
                key_file,
                passphrase,
            } => f
                .debug_struct("RotateMaster")
                .field("key_file", key_file)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Op::VerifyBackups {
                files,
                structure_only,
                bundle,
                passphrase,
            } => f
                .debug_struct("VerifyBackups")
                .field("files", files)
                .field("structure_only", structure_only)
                .field("bundle", bundle)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Op::Restore {
                files,
                tenant,
                volume,
                bundle,
                passphrase,
            } => f
                .debug_struct("Restore")
                .field("files", files)
                .field("tenant", tenant)
                .field("volume", volume)
                .field("bundle", bundle)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Op::ExportTenantKeys { tenant, passphrase } => f
                .debug_struct("ExportTenantKeys")
                .field("tenant", tenant)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            other => write!(f, "{}({})", other.action(), other.target()),
        }
    }
}

/// The request an [`Op`] travels as.
#[derive(Debug)]
pub(crate) struct HttpRequest {
    pub(crate) method: Method,
    /// Path and query.
    pub(crate) path: String,
    /// The JSON body, if the operation has one. Holds the passphrase of
    /// [`Op::RotateMaster`], so it is zeroized on drop.
    pub(crate) body: Option<Zeroizing<Vec<u8>>>,
}

impl Op {
    /// Whether the operation changes anything (and so goes to the audit log,
    /// see [`Op::audited`]).
    pub(crate) fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::Status
                | Op::ListTenants
                | Op::ShowTenant { .. }
                | Op::ListVolumes { .. }
                | Op::ShowVolume { .. }
                | Op::Audit { .. }
                | Op::VerifyAudit
                | Op::DataKeyStatus { .. }
                | Op::DataKeyStatusAll
                | Op::ListSnapshots { .. }
                | Op::ShowSnapshot { .. }
                | Op::RetentionStatus
                | Op::VerifyBackups { .. }
                | Op::ListBackupKeys { .. }
                | Op::BackupStore { .. }
                | Op::ShowLimits
        )
    }

    /// Whether the operation goes to the audit log: everything that changes
    /// something, and exporting a tenant's keys or the store's catalogue,
    /// which change nothing but hand out a copy of keys (sealed).
    pub(crate) fn audited(&self) -> bool {
        self.mutates() || self.hands_out_keys()
    }

    /// Whether the operation hands out a copy of keys, sealed: a tenant's
    /// recovery bundle, or the whole store's catalogue.
    pub(crate) fn hands_out_keys(&self) -> bool {
        matches!(self, Op::ExportTenantKeys { .. } | Op::BackupStore { .. })
    }

    /// A stable name of the operation, for the audit log.
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::ListTenants => "tenant.list",
            Op::ShowTenant { .. } => "tenant.show",
            Op::CreateTenant { .. } => "tenant.create",
            Op::DeleteTenant { .. } => "tenant.delete",
            Op::ShredTenant { .. } => "tenant.shred",
            Op::RotateTenantKey { .. } => "key.rotate-tenant",
            Op::ListVolumes { .. } => "volume.list",
            Op::ShowVolume { .. } => "volume.show",
            Op::CreateVolume { .. } => "volume.create",
            Op::ResizeVolume { .. } => "volume.resize",
            Op::DeleteVolume { .. } => "volume.delete",
            Op::RotateMaster { .. } => "key.rotate-master",
            Op::RotateDataKey { .. } => "key.rotate-data",
            Op::DataKeyStatus { .. } | Op::DataKeyStatusAll => "key.status",
            Op::Reencrypt { .. } => "key.reencrypt",
            Op::Audit { .. } => "audit.list",
            Op::VerifyAudit => "audit.verify",
            Op::ListSnapshots { .. } => "snapshot.list",
            Op::CreateSnapshot { .. } => "snapshot.create",
            Op::ShowSnapshot { .. } => "snapshot.show",
            Op::DeleteSnapshot { .. } => "snapshot.delete",
            Op::RollbackSnapshot { .. } => "snapshot.rollback",
            Op::RetentionStatus => "retention.status",
            Op::RetentionRun { .. } => "retention.run",
            Op::CreateBackup { .. } => "backup.create",
            Op::VerifyBackups { .. } => "backup.verify",
            Op::ListBackupKeys { .. } => "backup.keys",
            Op::DrillBackups { .. } => "backup.drill",
            Op::Restore { .. } => "backup.restore",
            Op::ExportTenantKeys { .. } => "key.export-tenant",
            Op::BackupStore { .. } => "store.backup",
            Op::ShowLimits => "limits.show",
            Op::SetLimits { .. } => "limits.set",
        }
    }

    /// What the operation acts on, for the audit log: a tenant, `tenant/volume`,
    /// `tenant/volume@snapshot`, the key file, or `-`.
    pub(crate) fn target(&self) -> String {
        match self {
            Op::ShowTenant { tenant }
            | Op::CreateTenant { tenant }
            | Op::DeleteTenant { tenant }
            | Op::ShredTenant { tenant }
            | Op::RotateTenantKey { tenant } => tenant.clone(),
            Op::ListVolumes {
                tenant: Some(tenant),
            } => tenant.clone(),
            Op::ShowVolume { tenant, volume }
            | Op::CreateVolume { tenant, volume, .. }
            | Op::ResizeVolume { tenant, volume, .. }
            | Op::DeleteVolume { tenant, volume, .. }
            | Op::RotateDataKey { tenant, volume }
            | Op::DataKeyStatus { tenant, volume }
            | Op::Reencrypt { tenant, volume }
            | Op::ListSnapshots { tenant, volume } => format!("{tenant}/{volume}"),
            Op::CreateSnapshot {
                tenant,
                volume,
                snapshot,
            }
            | Op::ShowSnapshot {
                tenant,
                volume,
                snapshot,
            }
            | Op::DeleteSnapshot {
                tenant,
                volume,
                snapshot,
                ..
            }
            | Op::RollbackSnapshot {
                tenant,
                volume,
                snapshot,
                ..
            } => format!("{tenant}/{volume}@{snapshot}"),
            Op::RotateMaster { key_file, .. } => key_file.clone(),
            Op::CreateBackup {
                tenant,
                volume,
                snapshot,
                ..
            } => format!("{tenant}/{volume}@{snapshot}"),
            Op::ListBackupKeys {
                tenant: Some(tenant),
            }
            | Op::ExportTenantKeys { tenant, .. } => tenant.clone(),
            Op::Restore { tenant, volume, .. } => format!("{tenant}/{volume}"),
            Op::DrillBackups { dir } => dir.clone(),
            Op::SetLimits {
                tenant,
                volume: Some(volume),
                ..
            } => format!("{tenant}/{volume}"),
            Op::SetLimits {
                tenant,
                volume: None,
                ..
            } => tenant.clone(),
            _ => "-".to_owned(),
        }
    }

    /// The tenant the operation acts on, if it names one: what a cluster
    /// routes it to a shard by.
    pub(crate) fn tenant(&self) -> Option<&str> {
        match self {
            Op::ShowTenant { tenant }
            | Op::CreateTenant { tenant }
            | Op::DeleteTenant { tenant }
            | Op::ShredTenant { tenant }
            | Op::RotateTenantKey { tenant }
            | Op::ShowVolume { tenant, .. }
            | Op::CreateVolume { tenant, .. }
            | Op::ResizeVolume { tenant, .. }
            | Op::DeleteVolume { tenant, .. }
            | Op::RotateDataKey { tenant, .. }
            | Op::DataKeyStatus { tenant, .. }
            | Op::Reencrypt { tenant, .. }
            | Op::ListSnapshots { tenant, .. }
            | Op::CreateSnapshot { tenant, .. }
            | Op::ShowSnapshot { tenant, .. }
            | Op::DeleteSnapshot { tenant, .. }
            | Op::RollbackSnapshot { tenant, .. }
            | Op::CreateBackup { tenant, .. }
            | Op::Restore { tenant, .. }
            | Op::ExportTenantKeys { tenant, .. }
            | Op::SetLimits { tenant, .. } => Some(tenant),
            Op::ListVolumes { tenant } | Op::ListBackupKeys { tenant } => tenant.as_deref(),
            _ => None,
        }
    }

    /// The operation's arguments beyond its target, for the audit log.
    pub(crate) fn detail(&self) -> String {
        match self {
            Op::CreateVolume {
                size, block_size, ..
            } => format!("size={size} block_size={block_size}"),
            Op::ResizeVolume {
                size, discard_tail, ..
            } => format!("size={size} discard_tail={discard_tail}"),
            Op::DeleteVolume { force, .. }
            | Op::DeleteSnapshot { force, .. }
            | Op::RollbackSnapshot { force, .. } => format!("force={force}"),
            Op::RetentionRun { now: Some(now) } => format!("now={now}"),
            Op::CreateBackup { base, expires, .. } => {
                let mut detail = match base {
                    Some(base) => format!("incremental from {base}"),
                    None => "full".to_owned(),
                };
                if let Some(t) = expires {
                    detail.push_str(&format!(" expires={}", crate::time::rfc3339_utc(*t)));
                }
                detail
            }
            Op::Restore { files, bundle, .. } => format!(
                "files={} keys={}",
                files.len(),
                if bundle.is_some() { "bundle" } else { "store" }
            ),
            Op::ExportTenantKeys { passphrase, .. } => format!(
                "sealed to {}",
                if passphrase.is_some() {
                    "a passphrase"
                } else {
                    "the master key"
                }
            ),
            Op::SetLimits {
                iops,
                bytes_per_sec,
                ..
            } => {
                let word = |rate: &Option<Option<u64>>| match rate {
                    None => "unchanged".to_owned(),
                    Some(None) => "default".to_owned(),
                    Some(Some(0)) => "unlimited".to_owned(),
                    Some(Some(n)) => n.to_string(),
                };
                format!("iops={} bytes_per_sec={}", word(iops), word(bytes_per_sec))
            }
            Op::BackupStore { segments_to } => match segments_to {
                Some(dir) => format!("segments_to={dir}"),
                None => "catalogue only".to_owned(),
            },
            _ => String::new(),
        }
    }

    /// The HTTP request that carries this operation.
    pub(crate) fn to_request(&self) -> HttpRequest {
        let json = |value: serde_json::Value| Some(Zeroizing::new(value.to_string().into_bytes()));
        let (method, path, body) = match self {
            Op::Status => (Method::GET, "/status".to_owned(), None),
            Op::ListTenants => (Method::GET, "/tenants".to_owned(), None),
            Op::ShowTenant { tenant } => (Method::GET, format!("/tenants/{tenant}"), None),
            Op::CreateTenant { tenant } => (
                Method::POST,
                "/tenants".to_owned(),
                json(serde_json::json!({ "name": tenant })),
            ),
            Op::DeleteTenant { tenant } => (Method::DELETE, format!("/tenants/{tenant}"), None),
            Op::ShredTenant { tenant } => (
                Method::POST,
                format!("/tenants/{tenant}/shred"),
                json(serde_json::json!({ "confirm": tenant })),
            ),
            Op::RotateTenantKey { tenant } => {
                (Method::POST, format!("/tenants/{tenant}/rotate-key"), None)
            }
            Op::ListVolumes { tenant: None } => (Method::GET, "/volumes".to_owned(), None),
            Op::ListVolumes {
                tenant: Some(tenant),
            } => (Method::GET, format!("/tenants/{tenant}/volumes"), None),
            Op::ShowVolume { tenant, volume } => (
                Method::GET,
                format!("/tenants/{tenant}/volumes/{volume}"),
                None,
            ),
            Op::CreateVolume {
                tenant,
                volume,
                size,
                block_size,
            } => (
                Method::POST,
                format!("/tenants/{tenant}/volumes"),
                json(serde_json::json!({
                    "name": volume, "size": size, "block_size": block_size
                })),
            ),
            Op::ResizeVolume {
                tenant,
                volume,
                size,
                discard_tail,
            } => (
                Method::PATCH,
                format!("/tenants/{tenant}/volumes/{volume}"),
                json(serde_json::json!({ "size": size, "discard_tail": discard_tail })),
            ),
            Op::DeleteVolume {
                tenant,
                volume,
                force,
            } => (
                Method::DELETE,
                with_force(format!("/tenants/{tenant}/volumes/{volume}"), *force),
                None,
            ),
            Op::RotateMaster {
                key_file,
                passphrase,
            } => {
                let mut body = serde_json::json!({ "key_file": key_file });
                if let Some(p) = passphrase {
                    body["passphrase"] = serde_json::Value::String(p.to_string());
                }
                let bytes = Zeroizing::new(body.to_string().into_bytes());
                zeroize_json(body);
                (Method::POST, "/master-key/rotate".to_owned(), Some(bytes))
            }
            Op::RotateDataKey { tenant, volume } => (
                Method::POST,
                format!("/tenants/{tenant}/volumes/{volume}/rotate-key"),
                None,
            ),
            Op::DataKeyStatus { tenant, volume } => (
                Method::GET,
                format!("/tenants/{tenant}/volumes/{volume}/keys"),
                None,
            ),
            Op::DataKeyStatusAll => (Method::GET, "/keys".to_owned(), None),
            Op::Reencrypt { tenant, volume } => (
                Method::POST,
                format!("/tenants/{tenant}/volumes/{volume}/reencrypt"),
                None,
            ),
            Op::Audit {
                since_seq,
                since_time,
                limit,
            } => {
                let mut path = format!("/audit?since_seq={since_seq}");
                if let Some(t) = since_time {
                    path.push_str(&format!("&since_time={t}"));
                }
                if let Some(n) = limit {
                    path.push_str(&format!("&limit={n}"));
                }
                (Method::GET, path, None)
            }
            Op::VerifyAudit => (Method::GET, "/audit/verify".to_owned(), None),
            Op::ListSnapshots { tenant, volume } => (
                Method::GET,
                format!("/tenants/{tenant}/volumes/{volume}/snapshots"),
                None,
            ),
            Op::CreateSnapshot {
                tenant,
                volume,
                snapshot,
            } => (
                Method::POST,
                format!("/tenants/{tenant}/volumes/{volume}/snapshots"),
                json(serde_json::json!({ "name": snapshot })),
            ),
            Op::ShowSnapshot {
                tenant,
                volume,
                snapshot,
            } => (
                Method::GET,
                format!("/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}"),
                None,
            ),
            Op::DeleteSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            } => (
                Method::DELETE,
                with_force(
                    format!("/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}"),
                    *force,
                ),
                None,
            ),
            Op::RollbackSnapshot {
                tenant,
                volume,
                snapshot,
                force,
            } => (
                Method::POST,
                with_force(
                    format!("/tenants/{tenant}/volumes/{volume}/snapshots/{snapshot}/rollback"),
                    *force,
                ),
                None,
            ),
            Op::RetentionStatus => (Method::GET, "/retention".to_owned(), None),
            Op::ShowLimits => (Method::GET, "/limits".to_owned(), None),
            Op::SetLimits {
                tenant,
                volume,
                iops,
                bytes_per_sec,
            } => {
                let mut body = serde_json::json!({});
                if let Some(rate) = iops {
                    body["iops"] = (*rate).into();
                }
                if let Some(rate) = bytes_per_sec {
                    body["bytes_per_sec"] = (*rate).into();
                }
                let path = match volume {
                    Some(volume) => format!("/limits/tenants/{tenant}/volumes/{volume}"),
                    None => format!("/limits/tenants/{tenant}"),
                };
                (Method::PATCH, path, json(body))
            }
            Op::RetentionRun { now } => (
                Method::POST,
                "/retention/run".to_owned(),
                now.and_then(|now| json(serde_json::json!({ "now": now }))),
            ),
            Op::CreateBackup {
                tenant,
                volume,
                snapshot,
                base,
                expires,
            } => {
                let mut body = serde_json::json!({ "snapshot": snapshot });
                if let Some(base) = base {
                    body["base"] = base.as_str().into();
                }
                if let Some(t) = expires {
                    body["expires"] = (*t).into();
                }
                (
                    Method::POST,
                    format!("/tenants/{tenant}/volumes/{volume}/backups"),
                    json(body),
                )
            }
            Op::VerifyBackups {
                files,
                structure_only,
                bundle,
                passphrase,
            } => {
                let mut body = serde_json::json!({ "files": files });
                if *structure_only {
                    body["structure_only"] = true.into();
                }
                with_bundle(&mut body, bundle, passphrase);
                (
                    Method::POST,
                    "/backups/verify".to_owned(),
                    secret_json(body),
                )
            }
            Op::ListBackupKeys { tenant: None } => (Method::GET, "/backups/keys".to_owned(), None),
            Op::ListBackupKeys {
                tenant: Some(tenant),
            } => (Method::GET, format!("/tenants/{tenant}/backups/keys"), None),
            Op::DrillBackups { dir } => (
                Method::POST,
                "/backups/drill".to_owned(),
                json(serde_json::json!({ "dir": dir })),
            ),
            Op::Restore {
                files,
                tenant,
                volume,
                bundle,
                passphrase,
            } => {
                let mut body =
                    serde_json::json!({ "files": files, "tenant": tenant, "volume": volume });
                with_bundle(&mut body, bundle, passphrase);
                (Method::POST, "/restore".to_owned(), secret_json(body))
            }
            Op::ExportTenantKeys { tenant, passphrase } => {
                let body = match passphrase {
                    Some(p) => serde_json::json!({ "passphrase": p.as_str() }),
                    None => serde_json::json!({ "to_master_key": true }),
                };
                (
                    Method::POST,
                    format!("/tenants/{tenant}/export-keys"),
                    secret_json(body),
                )
            }
            Op::BackupStore { segments_to } => {
                let body = match segments_to {
                    Some(dir) => serde_json::json!({ "segments_to": dir }),
                    None => serde_json::json!({}),
                };
                (Method::POST, "/store/backup".to_owned(), json(body))
            }
        };
        // Callers pass checked tenant and volume names (`a-z 0-9 . _ -`), so
        // nothing here can add a path segment or a query.
        debug_assert!(
            self.names().iter().all(|n| is_path_safe(n)),
            "unchecked name in {self:?}"
        );
        HttpRequest {
            method,
            path: format!("{VERSION_PREFIX}{path}"),
            body,
        }
    }

    /// The operation a request asks for. `path` holds no query; `query` is the
    /// part after `?`, if any.
    pub(crate) fn parse(
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Op, ApiError> {
        let Some(rest) = path.strip_prefix(VERSION_PREFIX) else {
            return Err(ApiError::not_found_path(path));
        };
        let segments: Vec<&str> = rest.split('/').skip(1).collect();
        if rest.is_empty() || segments.iter().any(|s| s.is_empty()) {
            return Err(ApiError::not_found_path(path));
        }
        let query = Query::parse(query)?;
        let name = |s: &str| s.to_owned();
        let op = match (method, segments.as_slice()) {
            (&Method::GET, ["status"]) => Op::Status,
            (&Method::GET, ["tenants"]) => Op::ListTenants,
            (&Method::POST, ["tenants"]) => {
                let body: CreateTenantBody = decode(body)?;
                Op::CreateTenant { tenant: body.name }
            }
            (&Method::GET, ["tenants", t]) => Op::ShowTenant { tenant: name(t) },
            (&Method::DELETE, ["tenants", t]) => Op::DeleteTenant { tenant: name(t) },
            (&Method::POST, ["tenants", t, "shred"]) => {
                let body: ShredBody = decode(body)?;
                if body.confirm != *t {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "confirmation_mismatch",
                        format!(
                            "shredding destroys tenant {t}'s keys for good: the body must be \
                             {{\"confirm\": \"{t}\"}}"
                        ),
                    ));
                }
                Op::ShredTenant { tenant: name(t) }
            }
            (&Method::POST, ["tenants", t, "rotate-key"]) => {
                no_body(body)?;
                Op::RotateTenantKey { tenant: name(t) }
            }
            (&Method::GET, ["volumes"]) => Op::ListVolumes { tenant: None },
            (&Method::GET, ["tenants", t, "volumes"]) => Op::ListVolumes {
                tenant: Some(name(t)),
            },
            (&Method::POST, ["tenants", t, "volumes"]) => {
                let body: CreateVolumeBody = decode(body)?;
                Op::CreateVolume {
                    tenant: name(t),
                    volume: body.name,
                    size: body.size,
                    block_size: body.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
                }
            }
            (&Method::GET, ["tenants", t, "volumes", v]) => Op::ShowVolume {
                tenant: name(t),
                volume: name(v),
            },
            (&Method::PATCH, ["tenants", t, "volumes", v]) => {
                let body: ResizeBody = decode(body)?;
                Op::ResizeVolume {
                    tenant: name(t),
                    volume: name(v),
                    size: body.size,
                    discard_tail: body.discard_tail,
                }
            }
            (&Method::DELETE, ["tenants", t, "volumes", v]) => Op::DeleteVolume {
                tenant: name(t),
                volume: name(v),
                force: query.flag("force")?,
            },
            (&Method::POST, ["tenants", t, "volumes", v, "rotate-key"]) => {
                no_body(body)?;
                Op::RotateDataKey {
                    tenant: name(t),
                    volume: name(v),
                }
            }
            (&Method::GET, ["tenants", t, "volumes", v, "keys"]) => Op::DataKeyStatus {
                tenant: name(t),
                volume: name(v),
            },
            (&Method::GET, ["keys"]) => Op::DataKeyStatusAll,
            (&Method::POST, ["tenants", t, "volumes", v, "reencrypt"]) => {
                no_body(body)?;
                Op::Reencrypt {
                    tenant: name(t),
                    volume: name(v),
                }
            }
            (&Method::POST, ["master-key", "rotate"]) => {
                let body: RotateMasterBody = decode(body)?;
                Op::RotateMaster {
                    key_file: body.key_file,
                    passphrase: body.passphrase.map(Zeroizing::new),
                }
            }
            (&Method::GET, ["audit"]) => Op::Audit {
                since_seq: query.number("since_seq")?.unwrap_or(0),
                since_time: query.number("since_time")?,
                limit: query.number("limit")?,
            },
            (&Method::GET, ["audit", "verify"]) => Op::VerifyAudit,
            (&Method::GET, ["tenants", t, "volumes", v, "snapshots"]) => Op::ListSnapshots {
                tenant: name(t),
                volume: name(v),
            },
            (&Method::POST, ["tenants", t, "volumes", v, "snapshots"]) => {
                let body: CreateSnapshotBody = decode(body)?;
                Op::CreateSnapshot {
                    tenant: name(t),
                    volume: name(v),
                    snapshot: body.name,
                }
            }
            (&Method::GET, ["tenants", t, "volumes", v, "snapshots", s]) => Op::ShowSnapshot {
                tenant: name(t),
                volume: name(v),
                snapshot: name(s),
            },
            (&Method::DELETE, ["tenants", t, "volumes", v, "snapshots", s]) => Op::DeleteSnapshot {
                tenant: name(t),
                volume: name(v),
                snapshot: name(s),
                force: query.flag("force")?,
            },
            (&Method::POST, ["tenants", t, "volumes", v, "snapshots", s, "rollback"]) => {
                no_body(body)?;
                Op::RollbackSnapshot {
                    tenant: name(t),
                    volume: name(v),
                    snapshot: name(s),
                    force: query.flag("force")?,
                }
            }
            (&Method::GET, ["retention"]) => Op::RetentionStatus,
            (&Method::GET, ["limits"]) => Op::ShowLimits,
            (&Method::PATCH, ["limits", "tenants", t]) => {
                let body: LimitsBody = decode(body)?;
                Op::SetLimits {
                    tenant: name(t),
                    volume: None,
                    iops: body.iops,
                    bytes_per_sec: body.bytes_per_sec,
                }
            }
            (&Method::PATCH, ["limits", "tenants", t, "volumes", v]) => {
                let body: LimitsBody = decode(body)?;
                Op::SetLimits {
                    tenant: name(t),
                    volume: Some(name(v)),
                    iops: body.iops,
                    bytes_per_sec: body.bytes_per_sec,
                }
            }
            (&Method::POST, ["retention", "run"]) => {
                let now = if body.iter().all(u8::is_ascii_whitespace) {
                    None
                } else {
                    decode::<RetentionRunBody>(body)?.now
                };
                Op::RetentionRun { now }
            }
            (&Method::POST, ["tenants", t, "volumes", v, "backups"]) => {
                let body: CreateBackupBody = decode(body)?;
                Op::CreateBackup {
                    tenant: name(t),
                    volume: name(v),
                    snapshot: body.snapshot,
                    base: body.base,
                    expires: body.expires,
                }
            }
            (&Method::POST, ["backups", "verify"]) => {
                let body: VerifyBackupsBody = decode(body)?;
                check_bundle(&body.bundle, &body.passphrase)?;
                Op::VerifyBackups {
                    files: body.files,
                    structure_only: body.structure_only,
                    bundle: body.bundle,
                    passphrase: body.passphrase.map(Zeroizing::new),
                }
            }
            (&Method::GET, ["backups", "keys"]) => Op::ListBackupKeys { tenant: None },
            (&Method::GET, ["tenants", t, "backups", "keys"]) => Op::ListBackupKeys {
                tenant: Some(name(t)),
            },
            (&Method::POST, ["backups", "drill"]) => {
                let body: DrillBody = decode(body)?;
                Op::DrillBackups { dir: body.dir }
            }
            (&Method::POST, ["restore"]) => {
                let body: RestoreBody = decode(body)?;
                check_bundle(&body.bundle, &body.passphrase)?;
                Op::Restore {
                    files: body.files,
                    tenant: body.tenant,
                    volume: body.volume,
                    bundle: body.bundle,
                    passphrase: body.passphrase.map(Zeroizing::new),
                }
            }
            (&Method::POST, ["tenants", t, "export-keys"]) => {
                let body: ExportKeysBody = decode(body)?;
                let passphrase = match (body.passphrase, body.to_master_key) {
                    (Some(p), false) => Some(Zeroizing::new(p)),
                    (None, true) => None,
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_field",
                            "give either \"passphrase\" or \"to_master_key\": true, not both",
                        ));
                    }
                };
                Op::ExportTenantKeys {
                    tenant: name(t),
                    passphrase,
                }
            }
            (&Method::POST, ["store", "backup"]) => {
                let segments_to = if body.iter().all(u8::is_ascii_whitespace) {
                    None
                } else {
                    decode::<StoreBackupBody>(body)?.segments_to
                };
                Op::BackupStore { segments_to }
            }
            (_, segments) if is_known_path(segments) => {
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                ));
            }
            _ => return Err(ApiError::not_found_path(path)),
        };
        query.check_all_used(path)?;
        Ok(op)
    }
}

impl Op {
    /// The tenant and volume names the operation carries.
    fn names(&self) -> Vec<&str> {
        match self {
            Op::ShowTenant { tenant }
            | Op::CreateTenant { tenant }
            | Op::DeleteTenant { tenant }
            | Op::ShredTenant { tenant }
            | Op::RotateTenantKey { tenant }
            | Op::ListVolumes {
                tenant: Some(tenant),
            } => vec![tenant],
            Op::ShowVolume { tenant, volume }
            | Op::CreateVolume { tenant, volume, .. }
            | Op::ResizeVolume { tenant, volume, .. }
            | Op::DeleteVolume { tenant, volume, .. }
            | Op::RotateDataKey { tenant, volume }
            | Op::DataKeyStatus { tenant, volume }
            | Op::Reencrypt { tenant, volume }
            | Op::ListSnapshots { tenant, volume } => vec![tenant, volume],
            Op::CreateSnapshot {
                tenant,
                volume,
                snapshot,
            }
            | Op::ShowSnapshot {
                tenant,
                volume,
                snapshot,
            }
            | Op::DeleteSnapshot {
                tenant,
                volume,
                snapshot,
                ..
            }
            | Op::RollbackSnapshot {
                tenant,
                volume,
                snapshot,
                ..
            } => vec![tenant, volume, snapshot],
            Op::CreateBackup { tenant, volume, .. } => vec![tenant, volume],
            Op::ListBackupKeys {
                tenant: Some(tenant),
            }
            | Op::ExportTenantKeys { tenant, .. } => vec![tenant],
            _ => Vec::new(),
        }
    }
}

/// `path`, with `?force=true` when `force`.
fn with_force(path: String, force: bool) -> String {
    if force {
        format!("{path}?force=true")
    } else {
        path
    }
}

/// Whether a name can stand in a path segment as it is.
fn is_path_safe(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

/// Audit entries one request returns without a `limit`, and at most.
pub(crate) const AUDIT_PAGE: u64 = 1000;
pub(crate) const AUDIT_PAGE_MAX: u64 = 10_000;

/// The block size of a volume created without one.
pub(crate) const DEFAULT_BLOCK_SIZE: u32 = 4096;

fn is_known_path(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["status"]
            | ["tenants"]
            | ["tenants", _]
            | ["tenants", _, "shred"]
            | ["tenants", _, "rotate-key"]
            | ["volumes"]
            | ["tenants", _, "volumes"]
            | ["tenants", _, "volumes", _]
            | ["tenants", _, "volumes", _, "rotate-key"]
            | ["tenants", _, "volumes", _, "keys"]
            | ["tenants", _, "volumes", _, "reencrypt"]
            | ["tenants", _, "volumes", _, "snapshots"]
            | ["tenants", _, "volumes", _, "snapshots", _]
            | ["tenants", _, "volumes", _, "snapshots", _, "rollback"]
            | ["keys"]
            | ["master-key", "rotate"]
            | ["audit"]
            | ["audit", "verify"]
            | ["retention"]
            | ["retention", "run"]
            | ["tenants", _, "volumes", _, "backups"]
            | ["backups", "verify"]
            | ["backups", "keys"]
            | ["tenants", _, "backups", "keys"]
            | ["backups", "drill"]
            | ["restore"]
            | ["tenants", _, "export-keys"]
            | ["store", "backup"]
    )
}

/// Adds a recovery bundle's path and passphrase to a request body.
fn with_bundle(
    body: &mut serde_json::Value,
    bundle: &Option<String>,
    passphrase: &Option<Zeroizing<String>>,
) {
    if let Some(bundle) = bundle {
        body["bundle"] = bundle.as_str().into();
    }
    if let Some(p) = passphrase {
        body["passphrase"] = p.as_str().into();
    }
}

/// The bytes of a JSON body that may hold a passphrase: the value's strings
/// are overwritten once serialized.
fn secret_json(body: serde_json::Value) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = Zeroizing::new(body.to_string().into_bytes());
    zeroize_json(body);
    Some(bytes)
}

/// A passphrase only opens a bundle: one without a bundle is refused.
fn check_bundle(bundle: &Option<String>, passphrase: &Option<String>) -> Result<(), ApiError> {
    if bundle.is_none() && passphrase.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "\"passphrase\" opens a recovery bundle: it needs \"bundle\"",
        ));
    }
    Ok(())
}

/// Overwrites the strings of a JSON value before it is dropped.
fn zeroize_json(value: serde_json::Value) {
    use zeroize::Zeroize;
    if let serde_json::Value::Object(map) = value {
        for (_, v) in map {
            if let serde_json::Value::String(mut s) = v {
                s.zeroize();
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenantBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShredBody {
    confirm: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolumeBody {
    name: String,
    size: u64,
    #[serde(default)]
    block_size: Option<u32>,
}

/// A change of I/O limits: per rate, absent leaves it, `null` goes back to
/// the default, a number sets it (0: unlimited).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    #[serde(default, deserialize_with = "present")]
    iops: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    bytes_per_sec: Option<Option<u64>>,
}

/// A field that is present, `null` or not: `Some(None)` for `null`, while
/// `#[serde(default)]` leaves an absent one `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    size: u64,
    #[serde(default)]
    discard_tail: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshotBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionRunBody {
    #[serde(default)]
    now: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateMasterBody {
    key_file: String,
    #[serde(default)]
    passphrase: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBackupBody {
    snapshot: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    expires: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBackupsBody {
    files: Vec<String>,
    #[serde(default)]
    structure_only: bool,
    #[serde(default)]
    bundle: Option<String>,
    #[serde(default)]
    passphrase: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrillBody {
    dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    files: Vec<String>,
    tenant: String,
    volume: String,
    #[serde(default)]
    bundle: Option<String>,
    #[serde(default)]
    passphrase: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreBackupBody {
    #[serde(default)]
    segments_to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportKeysBody {
    #[serde(default)]
    passphrase: Option<String>,
    #[serde(default)]
    to_master_key: bool,
}

/// Decodes a JSON body; the error names what is wrong (serde's message says
/// which field is unknown, missing or of the wrong type, and where).
fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_body",
            "this request needs a JSON body",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_field"
        } else {
            "invalid_json"
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, format!("request body: {e}"))
    })
}

fn no_body(body: &[u8]) -> Result<(), ApiError> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    // `{}` is accepted as no arguments; anything else is a field we do not know.
    if blank || serde_json::from_slice::<EmptyBody>(body).is_ok() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "this request takes no body (or `{}`)",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// A parsed query string: `key=value` pairs, each key at most once, every key
/// used by the route (an unknown parameter is an error, not ignored).
struct Query {
    pairs: Vec<(String, String)>,
    used: std::cell::RefCell<Vec<String>>,
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            if pairs.iter().any(|(k, _)| k == key) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("query parameter {key:?} is given twice"),
                ));
            }
            pairs.push((key.to_owned(), value.to_owned()));
        }
        Ok(Query {
            pairs,
            used: Default::default(),
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.used.borrow_mut().push(key.to_owned());
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("query parameter {key} must be true or false, not {other:?}"),
            )),
        }
    }

    fn number(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("query parameter {key} must be a whole number, not {v:?}"),
                    )
                })
            })
            .transpose()
    }

    fn check_all_used(&self, path: &str) -> Result<(), ApiError> {
        let used = self.used.borrow();
        match self.pairs.iter().find(|(k, _)| !used.contains(k)) {
            Some((key, _)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("{path} takes no query parameter {key:?}"),
            )),
            None => Ok(()),
        }
    }
}

/// An API error: an HTTP status, a stable machine-readable code and a message
/// for people. Messages name what was wrong and never hold key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
}

/// The JSON form of an error: `{"error": {"code": ..., "message": ...}}`.
#[derive(Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorFields,
}

/// The fields of [`ErrorBody`].
#[derive(Serialize, Deserialize)]
pub(crate) struct ErrorFields {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    fn not_found_path(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_path",
            format!(
                "no API path {path} (paths start with {VERSION_PREFIX}/; see docs/ADMIN-API.md)"
            ),
        )
    }

    /// 500 for a failure that is not the caller's fault; the message says what
    /// failed, without secrets (store errors hold none).
    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The JSON body of this error.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: ErrorFields {
                code: self.code.clone(),
                message: self.message.clone(),
            },
        })
        .expect("an error body always serializes")
    }

    /// The CLI's exit code for this error (documented in `blockseal --help`).
    pub(crate) fn exit_code(&self) -> u8 {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => exit::USAGE,
            StatusCode::NOT_FOUND => exit::NOT_FOUND,
            StatusCode::CONFLICT => exit::CONFLICT,
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => exit::DENIED,
            StatusCode::UNPROCESSABLE_ENTITY => exit::REFUSED,
            _ => exit::FAILURE,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Exit codes of the CLI.
pub(crate) mod exit {
    /// Something failed (I/O, a damaged store, the server is unreachable).
    pub(crate) const FAILURE: u8 = 1;
    /// A bad argument or request (clap's own usage errors use 2 as well).
    pub(crate) const USAGE: u8 = 2;
    /// The tenant, volume or snapshot does not exist.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// It exists already, is in use, or still holds data.
    pub(crate) const CONFLICT: u8 = 4;
    /// The caller may not do this (admin socket peer or certificate refused).
    pub(crate) const DENIED: u8 = 5;
    /// A backup file or recovery bundle was refused: damaged, edited,
    /// spliced, truncated, out of order, or not opened by the keys given.
    pub(crate) const REFUSED: u8 = 5;
}

/// A tenant as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantView {
    pub(crate) name: String,
    pub(crate) kek_version: u32,
    pub(crate) state: String,
    pub(crate) created: String,
    pub(crate) volumes: usize,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeView {
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) active_dek: u32,
    pub(crate) dek_versions: Vec<u32>,
    pub(crate) created: String,
    pub(crate) updated: String,
    /// Bytes of the volume that hold data (mapped blocks).
    pub(crate) mapped_bytes: u64,
    /// Bytes its segment files take on disk.
    pub(crate) segment_bytes: u64,
    /// How many snapshots it has.
    pub(crate) snapshots: usize,
    /// Bytes only its snapshots hold (blocks the volume overwrote or trimmed
    /// since they were taken).
    pub(crate) snapshot_bytes: u64,
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) name: String,
    pub(crate) created: String,
    /// The volume's size when the snapshot was taken.
    pub(crate) size: u64,
    /// Bytes only snapshots hold for this one (the volume overwrote or
    /// trimmed them since); older snapshots may see them too.
    pub(crate) held_bytes: u64,
    /// Random and never reused: names the snapshot in backups (32 hex digits).
    pub(crate) uid: String,
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    pub(crate) connections_closed: usize,
}

/// The store as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusView {
    pub(crate) version: String,
    pub(crate) store: String,
    pub(crate) backend: String,
    pub(crate) master_key_id: String,
    pub(crate) tenants: usize,
    pub(crate) volumes: usize,
    /// `online` (a running server answered) or `offline` (store opened directly).
    pub(crate) mode: String,
}

/// A volume's data keys: the version new writes use, the blocks under each
/// version, and the re-encryption job moving blocks to the active one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataKeyView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) active: u32,
    pub(crate) keys: Vec<DataKeyVersionView>,
    pub(crate) job: Option<ReencryptionView>,
}

/// One data key version of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataKeyVersionView {
    pub(crate) version: u32,
    pub(crate) blocks: u64,
}

/// A re-encryption job's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReencryptionView {
    pub(crate) target: u32,
    pub(crate) blocks_done: u64,
    pub(crate) blocks_remaining: u64,
    pub(crate) running: bool,
}

/// What a master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MasterRotationView {
    pub(crate) old_key_id: String,
    pub(crate) new_key_id: String,
    pub(crate) tenants: usize,
    pub(crate) volumes: usize,
    pub(crate) wrapped_keys: usize,
    pub(crate) elapsed_ms: u64,
}

/// What shredding a tenant did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShredView {
    pub(crate) tenant: String,
    pub(crate) volumes: usize,
    pub(crate) connections_closed: usize,
    pub(crate) segments_deleted: u64,
    pub(crate) bytes_freed: u64,
}

/// What was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeletedView {
    pub(crate) deleted: String,
    pub(crate) connections_closed: usize,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditView {
    pub(crate) seq: u64,
    pub(crate) time: String,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) target: String,
    pub(crate) result: String,
    pub(crate) detail: String,
}

/// The outcome of checking the audit log's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditVerifyView {
    pub(crate) entries: u64,
    pub(crate) intact: bool,
    pub(crate) first_bad: Option<u64>,
    pub(crate) problem: Option<String>,
}

/// A backup as `backup create` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupView {
    /// The backup's id, 32 hex digits (its key in the store).
    pub(crate) id: String,
    /// `full` or `incremental`.
    pub(crate) kind: String,
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    /// The base snapshot of an incremental backup.
    pub(crate) base: Option<String>,
    pub(crate) created: String,
    /// Length of the backup file.
    pub(crate) bytes: u64,
    /// Blocks of data the file holds.
    pub(crate) blocks: u64,
    /// Blocks an incremental backup unmaps.
    pub(crate) unmapped_blocks: u64,
    /// When the backup's key is destroyed, if ever.
    pub(crate) expires: Option<String>,
}

/// One file of a verified chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupFileView {
    pub(crate) file: String,
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    pub(crate) created: String,
    pub(crate) volume_size: u64,
    pub(crate) block_size: u32,
}

/// What `backup verify` checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupCheckView {
    /// Where the keys came from: `store`, `bundle`, or `none` (structure and
    /// digests only).
    pub(crate) keys: String,
    pub(crate) files: Vec<BackupFileView>,
    /// Blocks the files hold.
    pub(crate) blocks: u64,
    /// Blocks opened and authenticated (0 without keys).
    pub(crate) blocks_authenticated: u64,
    pub(crate) bytes: u64,
}

/// A backup key the store holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupKeyView {
    pub(crate) id: String,
    pub(crate) tenant: String,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
    pub(crate) created: String,
    pub(crate) expires: Option<String>,
}

/// What a restore drill found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DrillView {
    /// Whether every volume's newest chain restored.
    pub(crate) ok: bool,
    pub(crate) volumes: Vec<DrillVolumeView>,
    /// Files that are not readable backups.
    pub(crate) skipped: Vec<DrillSkipView>,
}

/// One volume of a drill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DrillVolumeView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    /// The snapshot the newest chain restores to.
    pub(crate) snapshot: String,
    /// The chain, full backup first.
    pub(crate) files: Vec<String>,
    /// Blocks restored and authenticated.
    pub(crate) blocks: u64,
    pub(crate) ok: bool,
    pub(crate) error: Option<String>,
}

/// A file a drill skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DrillSkipView {
    pub(crate) file: String,
    pub(crate) reason: String,
}

/// What a restore made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreView {
    pub(crate) tenant: String,
    pub(crate) volume: String,
    /// The snapshot the volume now holds (the last file's).
    pub(crate) snapshot: String,
    pub(crate) size: u64,
    pub(crate) files: usize,
    /// Blocks restored.
    pub(crate) blocks: u64,
    /// Bytes of backup files read.
    pub(crate) bytes: u64,
}

/// A sealed tenant recovery bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BundleView {
    pub(crate) tenant: String,
    /// Backup keys it holds.
    pub(crate) keys: usize,
    /// How it is sealed, e.g. `master key 5f0c...`.
    pub(crate) protection: String,
    /// The sealed bundle, hex (ciphertext: no key is readable without the
    /// passphrase or master key it is sealed under).
    pub(crate) bundle: String,
}

/// What `store backup` wrote: sent as the catalogue stream's trailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CatalogView {
    /// The master key the catalogue is sealed under (it rebuilds only with
    /// that key), 32 hex digits.
    pub(crate) master_key_id: String,
    /// When it was written: the store it rebuilds is the store as it was
    /// then.
    pub(crate) created: String,
    /// Metadata records it holds.
    pub(crate) records: u64,
    /// Its length.
    pub(crate) bytes: u64,
    /// Segment files its volumes reference, and their bytes.
    pub(crate) segments: u64,
    pub(crate) segment_bytes: u64,
    /// Segment files hard-linked (or copied) into `segments_to`.
    pub(crate) segments_linked: u64,
    pub(crate) segments_to: Option<String>,
}

/// The reply of one operation; its JSON is the variant's content alone (the
/// operation says which variant to expect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Status(StatusView),
    Tenants(Vec<TenantView>),
    Tenant(TenantView),
    Volumes(Vec<VolumeView>),
    Volume(VolumeView),
    Deleted(DeletedView),
    Shredded(ShredView),
    MasterRotated(MasterRotationView),
    Audit(Vec<AuditView>),
    AuditVerified(AuditVerifyView),
    DataKeys(DataKeyView),
    AllDataKeys(Vec<DataKeyView>),
    Snapshots(Vec<SnapshotView>),
    Snapshot(SnapshotView),
    RolledBack(RollbackView),
    Retention(RetentionView),
    RetentionRun(RunView),
    BackupCreated(BackupView),
    BackupVerified(BackupCheckView),
    BackupKeys(Vec<BackupKeyView>),
    Drilled(DrillView),
    Restored(RestoreView),
    TenantKeysExported(BundleView),
    StoreBackedUp(CatalogView),
    Limits(LimitsView),
}

impl Reply {
    /// Two listings as one (a cluster host answering for several shards):
    /// the items of both, in name order. Other replies keep the first.
    pub(crate) fn merge(self, other: Reply) -> Reply {
        match (self, other) {
            (Reply::Tenants(mut a), Reply::Tenants(b)) => {
                a.extend(b);
                a.sort_by(|x, y| x.name.cmp(&y.name));
                Reply::Tenants(a)
            }
            (Reply::Volumes(mut a), Reply::Volumes(b)) => {
                a.extend(b);
                a.sort_by(|x, y| (&x.tenant, &x.name).cmp(&(&y.tenant, &y.name)));
                Reply::Volumes(a)
            }
            (Reply::AllDataKeys(mut a), Reply::AllDataKeys(b)) => {
                a.extend(b);
                Reply::AllDataKeys(a)
            }
            (first, _) => first,
        }
    }

    /// The empty listing `op` answers with when nothing is there to list.
    pub(crate) fn empty_like(op: &Op) -> Reply {
        match op {
            Op::ListVolumes { .. } => Reply::Volumes(Vec::new()),
            Op::DataKeyStatusAll => Reply::AllDataKeys(Vec::new()),
            _ => Reply::Tenants(Vec::new()),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupKeyList {
    keys: Vec<BackupKeyView>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantList {
    tenants: Vec<TenantView>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeList {
    volumes: Vec<VolumeView>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataKeyList {
    volumes: Vec<DataKeyView>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotList {
    snapshots: Vec<SnapshotView>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditList {
    entries: Vec<AuditView>,
}

impl Reply {
    /// The JSON body of this reply.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let value = match self {
            Reply::Status(v) => serde_json::to_vec_pretty(v),
            Reply::Tenants(v) => serde_json::to_vec_pretty(&TenantList { tenants: v.clone() }),
            Reply::Tenant(v) => serde_json::to_vec_pretty(v),
            Reply::Volumes(v) => serde_json::to_vec_pretty(&VolumeList { volumes: v.clone() }),
            Reply::Volume(v) => serde_json::to_vec_pretty(v),
            Reply::Deleted(v) => serde_json::to_vec_pretty(v),
            Reply::Shredded(v) => serde_json::to_vec_pretty(v),
            Reply::MasterRotated(v) => serde_json::to_vec_pretty(v),
            Reply::Audit(v) => serde_json::to_vec_pretty(&AuditList { entries: v.clone() }),
            Reply::AuditVerified(v) => serde_json::to_vec_pretty(v),
            Reply::DataKeys(v) => serde_json::to_vec_pretty(v),
            Reply::AllDataKeys(v) => serde_json::to_vec_pretty(&DataKeyList { volumes: v.clone() }),
            Reply::Snapshots(v) => serde_json::to_vec_pretty(&SnapshotList {
                snapshots: v.clone(),
            }),
            Reply::Snapshot(v) => serde_json::to_vec_pretty(v),
            Reply::RolledBack(v) => serde_json::to_vec_pretty(v),
            Reply::Retention(v) => serde_json::to_vec_pretty(v),
            Reply::RetentionRun(v) => serde_json::to_vec_pretty(v),
            Reply::BackupCreated(v) => serde_json::to_vec_pretty(v),
            Reply::BackupVerified(v) => serde_json::to_vec_pretty(v),
            Reply::BackupKeys(v) => serde_json::to_vec_pretty(&BackupKeyList { keys: v.clone() }),
            Reply::Drilled(v) => serde_json::to_vec_pretty(v),
            Reply::Restored(v) => serde_json::to_vec_pretty(v),
            Reply::TenantKeysExported(v) => serde_json::to_vec_pretty(v),
            Reply::StoreBackedUp(v) => serde_json::to_vec_pretty(v),
            Reply::Limits(v) => serde_json::to_vec_pretty(v),
        };
        value.expect("replies always serialize")
    }

    /// Decodes the reply `op` answers with.
    pub(crate) fn decode(op: &Op, body: &[u8]) -> Result<Reply, serde_json::Error> {
        Ok(match op {
            Op::Status => Reply::Status(serde_json::from_slice(body)?),
            Op::ListTenants => Reply::Tenants(serde_json::from_slice::<TenantList>(body)?.tenants),
            Op::ShowTenant { .. } | Op::CreateTenant { .. } | Op::RotateTenantKey { .. } => {
                Reply::Tenant(serde_json::from_slice(body)?)
            }
            Op::DeleteTenant { .. } | Op::DeleteVolume { .. } | Op::DeleteSnapshot { .. } => {
                Reply::Deleted(serde_json::from_slice(body)?)
            }
            Op::ShredTenant { .. } => Reply::Shredded(serde_json::from_slice(body)?),
            Op::ListVolumes { .. } => {
                Reply::Volumes(serde_json::from_slice::<VolumeList>(body)?.volumes)
            }
            Op::ShowVolume { .. } | Op::CreateVolume { .. } | Op::ResizeVolume { .. } => {
                Reply::Volume(serde_json::from_slice(body)?)
            }
            Op::RotateMaster { .. } => Reply::MasterRotated(serde_json::from_slice(body)?),
            Op::Audit { .. } => Reply::Audit(serde_json::from_slice::<AuditList>(body)?.entries),
            Op::VerifyAudit => Reply::AuditVerified(serde_json::from_slice(body)?),
            Op::RotateDataKey { .. } | Op::DataKeyStatus { .. } | Op::Reencrypt { .. } => {
                Reply::DataKeys(serde_json::from_slice(body)?)
            }
            Op::DataKeyStatusAll => {
                Reply::AllDataKeys(serde_json::from_slice::<DataKeyList>(body)?.volumes)
            }
            Op::ListSnapshots { .. } => {
                Reply::Snapshots(serde_json::from_slice::<SnapshotList>(body)?.snapshots)
            }
            Op::CreateSnapshot { .. } | Op::ShowSnapshot { .. } => {
                Reply::Snapshot(serde_json::from_slice(body)?)
            }
            Op::RollbackSnapshot { .. } => Reply::RolledBack(serde_json::from_slice(body)?),
            Op::RetentionStatus => Reply::Retention(serde_json::from_slice(body)?),
            Op::RetentionRun { .. } => Reply::RetentionRun(serde_json::from_slice(body)?),
            Op::CreateBackup { .. } => Reply::BackupCreated(serde_json::from_slice(body)?),
            Op::VerifyBackups { .. } => Reply::BackupVerified(serde_json::from_slice(body)?),
            Op::ListBackupKeys { .. } => {
                Reply::BackupKeys(serde_json::from_slice::<BackupKeyList>(body)?.keys)
            }
            Op::DrillBackups { .. } => Reply::Drilled(serde_json::from_slice(body)?),
            Op::Restore { .. } => Reply::Restored(serde_json::from_slice(body)?),
            Op::ExportTenantKeys { .. } => Reply::TenantKeysExported(serde_json::from_slice(body)?),
            Op::BackupStore { .. } => Reply::StoreBackedUp(serde_json::from_slice(body)?),
            Op::ShowLimits | Op::SetLimits { .. } => Reply::Limits(serde_json::from_slice(body)?),
        })
    }

    /// The HTTP status of a successful reply to `op`.
    pub(crate) fn status(op: &Op) -> StatusCode {
        match op {
            Op::CreateTenant { .. }
            | Op::CreateVolume { .. }
            | Op::CreateSnapshot { .. }
            | Op::Restore { .. } => StatusCode::CREATED,
            _ => StatusCode::OK,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_op() -> Vec<Op> {
        let t = || "acme".to_owned();
        let v = || "voicemail".to_owned();
        let s = || "before-upgrade.1".to_owned();
        vec![
            Op::Status,
            Op::ListTenants,
            Op::ShowTenant { tenant: t() },
            Op::CreateTenant { tenant: t() },
            Op::DeleteTenant { tenant: t() },
            Op::ShredTenant { tenant: t() },
            Op::RotateTenantKey { tenant: t() },
            Op::ListVolumes { tenant: None },
            Op::ListVolumes { tenant: Some(t()) },
            Op::ShowVolume {
                tenant: t(),
                volume: v(),
            },
            Op::CreateVolume {
                tenant: t(),
                volume: v(),
                size: 1 << 30,
                block_size: 512,
            },
            Op::ResizeVolume {
                tenant: t(),
                volume: v(),
                size: 2 << 30,
                discard_tail: true,
            },
            Op::DeleteVolume {
                tenant: t(),
                volume: v(),
                force: false,
            },
            Op::DeleteVolume {
                tenant: t(),
                volume: v(),
                force: true,
            },
            Op::RotateMaster {
                key_file: "/etc/blockseal/new.key".to_owned(),
                passphrase: Some(Zeroizing::new("hunter2".to_owned())),
            },
            Op::RotateMaster {
                key_file: "/etc/blockseal/new.key".to_owned(),
                passphrase: None,
            },
            Op::Audit {
                since_seq: 0,
                since_time: None,
                limit: None,
            },
            Op::Audit {
                since_seq: 7,
                since_time: Some(1_700_000_000),
                limit: Some(50),
            },
            Op::VerifyAudit,
            Op::RotateDataKey {
                tenant: t(),
                volume: v(),
            },
            Op::DataKeyStatus {
                tenant: t(),
                volume: v(),
            },
            Op::DataKeyStatusAll,
            Op::Reencrypt {
                tenant: t(),
                volume: v(),
            },
            Op::ListSnapshots {
                tenant: t(),
                volume: v(),
            },
            Op::CreateSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
            },
            Op::ShowSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
            },
            Op::DeleteSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                force: false,
            },
            Op::DeleteSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                force: true,
            },
            Op::RollbackSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                force: false,
            },
            Op::RollbackSnapshot {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                force: true,
            },
            Op::RetentionStatus,
            Op::ShowLimits,
            Op::SetLimits {
                tenant: t(),
                volume: None,
                iops: Some(Some(500)),
                bytes_per_sec: None,
            },
            Op::SetLimits {
                tenant: t(),
                volume: Some(v()),
                iops: Some(None),
                bytes_per_sec: Some(Some(0)),
            },
            Op::RetentionRun { now: None },
            Op::RetentionRun {
                now: Some(1_700_000_000),
            },
            Op::CreateBackup {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                base: None,
                expires: None,
            },
            Op::CreateBackup {
                tenant: t(),
                volume: v(),
                snapshot: s(),
                base: Some("nightly".to_owned()),
                expires: Some(1_800_000_000),
            },
            Op::VerifyBackups {
                files: vec!["/b/full.bsb".to_owned(), "/b/incr.bsb".to_owned()],
                structure_only: false,
                bundle: None,
                passphrase: None,
            },
            Op::VerifyBackups {
                files: vec!["/b/full.bsb".to_owned()],
                structure_only: true,
                bundle: Some("/b/acme.bundle".to_owned()),
                passphrase: Some(Zeroizing::new("hunter2".to_owned())),
            },
            Op::ListBackupKeys { tenant: None },
            Op::ListBackupKeys { tenant: Some(t()) },
            Op::DrillBackups {
                dir: "/srv/backups".to_owned(),
            },
            Op::Restore {
                files: vec!["/b/full.bsb".to_owned(), "/b/incr.bsb".to_owned()],
                tenant: t(),
                volume: v(),
                bundle: None,
                passphrase: None,
            },
            Op::Restore {
                files: vec!["/b/full.bsb".to_owned()],
                tenant: t(),
                volume: v(),
                bundle: Some("/b/acme.bundle".to_owned()),
                passphrase: Some(Zeroizing::new("hunter2".to_owned())),
            },
            Op::ExportTenantKeys {
                tenant: t(),
                passphrase: None,
            },
            Op::ExportTenantKeys {
                tenant: t(),
                passphrase: Some(Zeroizing::new("hunter2".to_owned())),
            },
            Op::BackupStore { segments_to: None },
            Op::BackupStore {
                segments_to: Some("/srv/rebuild/segments".to_owned()),
            },
        ]
    }

    fn parse(request: &HttpRequest) -> Result<Op, ApiError> {
        let (path, query) = match request.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (request.path.as_str(), None),
        };
        let body = request.body.as_ref().map_or(&[][..], |b| b.as_slice());
        Op::parse(&request.method, path, query, body)
    }

    #[test]
    fn every_operation_survives_the_trip_through_http() {
        for op in every_op() {
            let request = op.to_request();
            assert!(request.path.starts_with("/v1/"), "{request:?}");
            assert_eq!(parse(&request).unwrap(), op, "{request:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_passphrase() {
        let with_passphrase = every_op().into_iter().filter(|op| {
            matches!(
                op,
                Op::RotateMaster {
                    passphrase: Some(_),
                    ..
                } | Op::VerifyBackups {
                    passphrase: Some(_),
                    ..
                } | Op::Restore {
                    passphrase: Some(_),
                    ..
                } | Op::ExportTenantKeys {
                    passphrase: Some(_),
                    ..
                }
            )
        });
        // As text, and as the bytes a `Vec<u8>` Debug would print.
        let bytes: Vec<String> = b"hunter2".iter().map(u8::to_string).collect();
        let mut checked = 0;
        for op in with_passphrase {
            for shown in [format!("{op:?}"), format!("{:?}", op.to_request())] {
                assert!(!shown.contains("hunter2"), "{shown}");
                assert!(!shown.contains(&bytes.join(", ")), "{shown}");
            }
            assert!(!op.target().contains("hunter2") && !op.detail().contains("hunter2"));
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    #[test]
    fn exporting_keys_is_audited_though_it_changes_nothing() {
        for op in every_op() {
            assert_eq!(
                op.audited(),
                op.mutates() || matches!(op, Op::ExportTenantKeys { .. } | Op::BackupStore { .. }),
                "{op:?}"
            );
        }
        let catalogue = Op::BackupStore { segments_to: None };
        assert!(catalogue.audited() && !catalogue.mutates());
        let export = Op::ExportTenantKeys {
            tenant: "acme".to_owned(),
            passphrase: None,
        };
        assert!(export.audited());
        let verify = Op::VerifyBackups {
            files: vec!["/f".to_owned()],
            structure_only: false,
            bundle: None,
            passphrase: None,
        };
        assert!(!verify.audited());
    }

    #[test]
    fn bundle_arguments_are_checked() {
        let e = error(
            Method::POST,
            "/v1/tenants/acme/export-keys",
            None,
            "{\"passphrase\": \"x\", \"to_master_key\": true}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(Method::POST, "/v1/tenants/acme/export-keys", None, "{}");
        assert_eq!(e.code, "invalid_field");
        let e = error(
            Method::POST,
            "/v1/restore",
            None,
            "{\"files\": [\"/f\"], \"tenant\": \"a\", \"volume\": \"v\", \"passphrase\": \"x\"}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/volumes/disk/backups",
            None,
            "{\"snapshot\": \"s\", \"kind\": \"full\"}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(Method::GET, "/v1/backups/drill", None, "");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn a_store_backup_takes_an_optional_segments_directory() {
        for body in ["", "{}"] {
            let op = Op::parse(&Method::POST, "/v1/store/backup", None, body.as_bytes()).unwrap();
            assert_eq!(op, Op::BackupStore { segments_to: None });
        }
        let e = error(
            Method::POST,
            "/v1/store/backup",
            None,
            "{\"segments_to\": \"/s\", \"overwrite\": true}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(Method::GET, "/v1/store/backup", None, "");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let op = Op::BackupStore {
            segments_to: Some("/s".to_owned()),
        };
        assert_eq!(
            (op.action(), op.detail().as_str()),
            ("store.backup", "segments_to=/s")
        );
    }

    fn error(method: Method, path: &str, query: Option<&str>, body: &str) -> ApiError {
        Op::parse(&method, path, query, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn bad_requests_get_specific_errors() {
        let e = error(
            Method::POST,
            "/v1/tenants",
            None,
            "{\"name\": \"a\", \"admin\": true}",
        );
        assert_eq!(
            (e.status, e.code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_field")
        );
        assert!(e.message.contains("unknown field `admin`"), "{}", e.message);

        let e = error(Method::POST, "/v1/tenants", None, "{\"name\": ");
        assert_eq!(e.code, "invalid_json");
        let e = error(Method::POST, "/v1/tenants", None, "");
        assert_eq!(e.code, "missing_body");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/volumes",
            None,
            "{\"name\": \"v\", \"size\": -1}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(Method::PUT, "/v1/tenants", None, "");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = error(Method::GET, "/v2/tenants", None, "");
        assert_eq!(
            (e.status, e.code.as_str()),
            (StatusCode::NOT_FOUND, "no_such_path")
        );
        let e = error(Method::GET, "/v1/tenants//volumes", None, "");
        assert_eq!(e.code, "no_such_path");
        let e = error(Method::GET, "/v1/tenants", Some("limit=5"), "");
        assert_eq!(e.code, "invalid_query");
        let e = error(
            Method::DELETE,
            "/v1/tenants/a/volumes/b",
            Some("force=yes"),
            "",
        );
        assert_eq!(e.code, "invalid_query");
        let e = error(
            Method::GET,
            "/v1/audit",
            Some("since_seq=1&since_seq=2"),
            "",
        );
        assert_eq!(e.code, "invalid_query");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/shred",
            None,
            "{\"confirm\": \"other\"}",
        );
        assert_eq!(e.code, "confirmation_mismatch");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/rotate-key",
            None,
            "{\"version\": 9}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/volumes/disk/snapshots",
            None,
            "{\"name\": \"s\", \"epoch\": 3}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/volumes/disk/snapshots/s/rollback",
            Some("force=1"),
            "",
        );
        assert_eq!(e.code, "invalid_query");
        let e = error(
            Method::POST,
            "/v1/tenants/acme/volumes/disk/snapshots/s/rollback",
            None,
            "{\"to\": \"s\"}",
        );
        assert_eq!(e.code, "invalid_field");
        let e = error(
            Method::PATCH,
            "/v1/tenants/acme/volumes/disk/snapshots/s",
            None,
            "",
        );
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = error(
            Method::GET,
            "/v1/tenants/acme/volumes/disk/snapshots/s/files",
            None,
            "",
        );
        assert_eq!(e.code, "no_such_path");
    }

    #[test]
    fn replies_decode_as_their_operation_expects() {
        let tenant = TenantView {
            name: "acme".into(),
            kek_version: 2,
            state: "active".into(),
            created: "2026-01-01T00:00:00Z".into(),
            volumes: 1,
        };
        let reply = Reply::Tenants(vec![tenant.clone()]);
        assert_eq!(
            Reply::decode(&Op::ListTenants, &reply.to_json()).unwrap(),
            reply
        );
        let reply = Reply::Tenant(tenant);
        let op = Op::ShowTenant {
            tenant: "acme".into(),
        };
        assert_eq!(Reply::decode(&op, &reply.to_json()).unwrap(), reply);
        assert!(Reply::decode(&Op::ListTenants, b"{\"tenants\": [], \"x\": 1}").is_err());

        let snapshot = SnapshotView {
            tenant: "acme".into(),
            volume: "disk".into(),
            name: "nightly".into(),
            created: "2026-01-01T00:00:00Z".into(),
            size: 1 << 20,
            held_bytes: 4096,
            uid: "00112233445566778899aabbccddeeff".into(),
        };
        let op = Op::ListSnapshots {
            tenant: "acme".into(),
            volume: "disk".into(),
        };
        let reply = Reply::Snapshots(vec![snapshot.clone()]);
        assert_eq!(Reply::decode(&op, &reply.to_json()).unwrap(), reply);
        let op = Op::ShowSnapshot {
            tenant: "acme".into(),
            volume: "disk".into(),
            snapshot: "nightly".into(),
        };
        let reply = Reply::Snapshot(snapshot);
        assert_eq!(Reply::decode(&op, &reply.to_json()).unwrap(), reply);
    }
}
