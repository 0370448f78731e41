//! `blockseal tenant ...` and `blockseal volume ...`: administration on the store
//! opened directly (the store lock makes sure no server runs meanwhile).

use anyhow::{Context, bail};
use blockseal_keys::TenantId;
use blockseal_volume::{BlockSize, VolumeOptions};

use crate::cli::{StoreArgs, StoreCommand, TenantCommand, VolumeCommand};
use crate::config::parse_export_name;
use crate::open::{IfMissing, StoreLocation};
use crate::size::Size;
use crate::time::rfc3339_utc;

/// Runs a `blockseal tenant` subcommand.
pub(crate) fn tenant(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create { name, store } => {
            // The name error names the tenant already ("tenant name \"X\" is invalid").
            let tenant = TenantId::new(&name)?;
            let store = open(&store, IfMissing::Create)?;
            let info = store.create_tenant(&tenant)?;
            println!(
                "created tenant {} (KEK version {})",
                info.id, info.kek_version
            );
            Ok(())
        }
        TenantCommand::List { store } => {
            let store = open(&store, IfMissing::Fail)?;
            let tenants = store.tenants()?;
            println!("{:<24} {:>4}  CREATED", "TENANT", "KEK");
            for t in tenants {
                println!(
                    "{:<24} {:>4}  {}",
                    t.id.as_str(),
                    t.kek_version.to_string(),
                    rfc3339_utc(t.created)
                );
            }
            Ok(())
        }
    }
}

/// Runs a `blockseal volume` subcommand.
pub(crate) fn volume(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            block_size,
            store,
        } => {
            let (tenant, volume) = parse_export_name(&name)?;
            let block_size = u32::try_from(block_size.0)
                .ok()
                .and_then(|n| BlockSize::new(n).ok())
                .with_context(|| {
                    format!(
                        "block size {block_size} is not a power of two from {} to {}",
                        BlockSize::MIN_BYTES,
                        BlockSize::MAX_BYTES
                    )
                })?;
            let bs = u64::from(block_size.get());
            if size.0 == 0 || !size.0.is_multiple_of(bs) {
                bail!(
                    "volume size {} is not a positive multiple of the block size ({bs} bytes)",
                    size.0
                );
            }
            let store = open(&store, IfMissing::Fail)?;
            if store.tenant(&tenant)?.is_none() {
                bail!("no tenant {tenant}; create it with `blockseal tenant create {tenant}`");
            }
            let info =
                store.create_volume(&tenant, &volume, size.0, VolumeOptions { block_size })?;
            println!(
                "created volume {}/{}: {} ({} bytes), {}-byte blocks",
                info.tenant,
                info.id,
                Size(info.size),
                info.size,
                info.block_size.get()
            );
            Ok(())
        }
        VolumeCommand::List { tenant, store } => {
            let tenant = tenant.map(|t| TenantId::new(&t)).transpose()?;
            let store = open(&store, IfMissing::Fail)?;
            let tenants = match tenant {
                Some(t) => {
                    if store.tenant(&t)?.is_none() {
                        bail!("no tenant {t}");
                    }
                    vec![t]
                }
                None => store.tenants()?.into_iter().map(|t| t.id).collect(),
            };
            println!(
                "{:<40} {:>8} {:>14} {:>6}  CREATED",
                "VOLUME", "SIZE", "BYTES", "BLOCK"
            );
            for tenant in &tenants {
                for v in store.volumes(tenant)? {
                    let name = format!("{}/{}", v.tenant, v.id);
                    println!(
                        "{:<40} {:>8} {:>14} {:>6}  {}",
                        name,
                        Size(v.size).to_string(),
                        v.size,
                        v.block_size.get(),
                        rfc3339_utc(v.created)
                    );
                }
            }
            Ok(())
        }
    }
}

/// Runs a `blockseal store` subcommand.
pub(crate) fn store(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::AcceptMetadataLoss {
            yes_i_understand,
            store,
        } => {
            if !yes_i_understand {
                bail!("accepting metadata loss needs --yes-i-understand");
            }
            let location = StoreLocation::from_args(&store)?;
            let (_store, report) = location.accept_metadata_loss()?;
            println!(
                "store {} opened accepting metadata loss: {} commits lost, {} mapping \
                 records dropped, {} live counts recounted, {} unreadable volume records \
                 dropped, {} unknown volumes' segments moved to {}",
                location.dir.display(),
                report.commits_lost,
                report.extents_dropped,
                report.live_counts_fixed,
                report.volumes_dropped,
                report.orphan_volumes,
                location.dir.join("lost").display()
            );
            Ok(())
        }
    }
}

fn open(args: &StoreArgs, if_missing: IfMissing) -> anyhow::Result<blockseal_volume::Store> {
    StoreLocation::from_args(args)?.open(if_missing)
}
