//! `blockseal cluster status|locate|move`: a cluster as its bucket shows it.
//! These read (and, for `move`, change) the cluster's records directly; no
//! server needs to run where they are called.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use blockseal_volume::object::{Expect, PutError};
use serde::Serialize;

use crate::cli::{ClusterArgs, ClusterCommand};
use crate::cluster::records::{Bucket, ClusterRecord, HOSTS, HostRecord, LEASES, LeaseRecord};
use crate::cluster::{export_uri, shard_index, shard_name, shard_of};
use crate::config::Config;

/// Runs a `blockseal cluster` subcommand.
pub(crate) fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status { cluster, json } => status(&cluster, json),
        ClusterCommand::Locate { export, cluster } => locate(&cluster, &export),
        ClusterCommand::Move {
            shard,
            host,
            wait,
            cluster,
        } => move_shard(&cluster, &shard, &host, wait),
    }
}

fn connect(args: &ClusterArgs) -> anyhow::Result<(Bucket, ClusterRecord)> {
    let config = Config::load(&args.config)?;
    let Some(object_store) = &config.object_store else {
        bail!(
            "{} has no [object_store] table: a cluster lives in a bucket",
            args.config.display()
        );
    };
    let bucket = Bucket::new(
        object_store.connect()?,
        object_store.prefix.trim_matches('/'),
    )?;
    let record = bucket.cluster(None).with_context(|| {
        format!(
            "no cluster at prefix {:?} of bucket {}",
            object_store.prefix, object_store.bucket
        )
    })?;
    Ok((bucket, record))
}

#[derive(Serialize)]
struct StatusView {
    shards: u32,
    lease_ms: u64,
    renew_ms: u64,
    grace_ms: u64,
    hosts: Vec<HostView>,
    leases: Vec<LeaseView>,
}

#[derive(Serialize)]
struct HostView {
    host: String,
    state: String,
    uri: String,
    /// Milliseconds since its record was written, by the bucket's clock
    /// against this host's.
    announced_ms_ago: i64,
}

#[derive(Serialize)]
struct LeaseView {
    shard: String,
    holder: Option<String>,
    /// `false` while a shard handed to `holder` waits for it to take it.
    taken: bool,
    /// The holder has the shard open and serves it.
    serving: bool,
    renewed_ms_ago: i64,
    move_to: Option<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn status(args: &ClusterArgs, json: bool) -> anyhow::Result<()> {
    let (bucket, record) = connect(args)?;
    let now = now_ms();
    let mut hosts = Vec::new();
    for listed in bucket.list(HOSTS)? {
        let Some((host, _)) = bucket.get::<HostRecord>(&format!("{HOSTS}/{}", listed.name))? else {
            continue;
        };
        hosts.push(HostView {
            host: host.host,
            state: host.state,
            uri: host.uri,
            announced_ms_ago: (now - listed.modified_ms).max(0),
        });
    }
    let mut leases = Vec::new();
    let listed = bucket.list(LEASES)?;
    for index in 0..record.shards {
        let name = shard_name(index);
        let found = listed.iter().find(|l| l.name == name);
        let lease = match found {
            Some(_) => bucket
                .get::<LeaseRecord>(&format!("{LEASES}/{name}"))?
                .map(|(l, _)| l),
            None => None,
        }
        .unwrap_or_default();
        leases.push(LeaseView {
            shard: name,
            taken: lease.instance.is_some(),
            serving: lease.serving && lease.instance.is_some(),
            holder: lease.holder,
            renewed_ms_ago: found.map_or(-1, |l| (now - l.modified_ms).max(0)),
            move_to: lease.move_to,
        });
    }
    let view = StatusView {
        shards: record.shards,
        lease_ms: record.lease_ms,
        renew_ms: record.renew_ms,
        grace_ms: record.grace_ms,
        hosts,
        leases,
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &view)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} shards; lease {} ms, renewed every {} ms, taken over {} ms after it lapses",
        view.shards, view.lease_ms, view.renew_ms, view.grace_ms
    )?;
    writeln!(
        out,
        "\n{:<20} {:<8} {:<12} URI",
        "HOST", "STATE", "ANNOUNCED"
    )?;
    for host in &view.hosts {
        writeln!(
            out,
            "{:<20} {:<8} {:<12} {}",
            host.host,
            host.state,
            ago(host.announced_ms_ago),
            host.uri
        )?;
    }
    writeln!(
        out,
        "\n{:<8} {:<20} {:<12} NOTE",
        "SHARD", "HOLDER", "RENEWED"
    )?;
    for lease in &view.leases {
        let note = match (&lease.move_to, lease.taken, &lease.holder) {
            (Some(to), _, _) => format!("moving to {to}"),
            (None, false, Some(_)) => "handed over, not taken yet".to_owned(),
            (None, true, Some(_)) if !lease.serving => "opening".to_owned(),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<8} {:<20} {:<12} {}",
            lease.shard,
            lease.holder.as_deref().unwrap_or("-"),
            if lease.renewed_ms_ago < 0 {
                "-".to_owned()
            } else {
                ago(lease.renewed_ms_ago)
            },
            note
        )?;
    }
    Ok(())
}

fn ago(ms: i64) -> String {
    format!("{:.1} s ago", ms as f64 / 1000.0)
}

fn locate(args: &ClusterArgs, export: &str) -> anyhow::Result<()> {
    let Some((tenant, volume)) = export.split_once('/') else {
        bail!("{export:?} is not an export name TENANT/VOLUME");
    };
    if tenant.is_empty() || volume.is_empty() {
        bail!("{export:?} is not an export name TENANT/VOLUME");
    }
    let (bucket, record) = connect(args)?;
    let index = shard_of(tenant, record.shards);
    let shard = shard_name(index);
    let lease = bucket
        .get::<LeaseRecord>(&format!("{LEASES}/{shard}"))?
        .map(|(l, _)| l)
        .unwrap_or_default();
    let (Some(holder), Some(_), true) = (&lease.holder, &lease.instance, lease.serving) else {
        bail!(
            "shard {shard} (tenant {tenant}) has no host serving it now (it is moving, or \
             its store is opening); try again in a few seconds, or see `blockseal cluster status`"
        );
    };
    let Some((host, _)) = bucket.get::<HostRecord>(&format!("{HOSTS}/{holder}"))? else {
        bail!("shard {shard} is held by {holder}, which has no host record");
    };
    println!("{}", export_uri(&host.uri, export));
    Ok(())
}

fn move_shard(args: &ClusterArgs, shard: &str, to: &str, wait: bool) -> anyhow::Result<()> {
    let Some(index) = shard_index(shard) else {
        bail!("{shard:?} is not a shard name like s003");
    };
    let (bucket, record) = connect(args)?;
    if index >= record.shards {
        bail!(
            "the cluster has shards s000 to {}",
            shard_name(record.shards - 1)
        );
    }
    match bucket.get::<HostRecord>(&format!("{HOSTS}/{to}"))? {
        Some((host, _)) if host.state == "up" => {}
        Some(_) => bail!("host {to} is stopped: it could not take the shard"),
        None => bail!("no host {to} in this cluster (see `blockseal cluster status`)"),
    }
    let name = format!("{LEASES}/{shard}");
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some((mut lease, version)) = bucket.get::<LeaseRecord>(&name)? else {
            bail!("shard {shard} has never been served: the first host to claim it takes it");
        };
        if lease.holder.as_deref() == Some(to) {
            println!("{shard} is held by {to} already");
            return Ok(());
        }
        if lease.holder.is_none() || lease.instance.is_none() {
            bail!("shard {shard} is between hosts now; try again in a few seconds");
        }
        lease.move_to = Some(to.to_owned());
        match bucket.put(&name, &lease, &Expect::Version(version)) {
            Ok(_) => break,
            // The holder renewed meanwhile: read it again.
            Err(PutError::Conflict) if attempts < 10 => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("cannot ask for the move")),
        }
    }
    if !wait {
        println!(
            "asked the holder of {shard} to hand it to {to}; it drains and hands over at its \
             next renewal (`blockseal cluster status` shows when {to} holds it)"
        );
        return Ok(());
    }
    let limit = Duration::from_secs(120);
    let started = Instant::now();
    loop {
        if let Some((lease, _)) = bucket.get::<LeaseRecord>(&name)?
            && lease.holder.as_deref() == Some(to)
            && lease.instance.is_some()
            && lease.serving
        {
            println!(
                "{shard} moved to {to} in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("{shard} did not reach {to} within {} s", limit.as_secs());
        }
        std::thread::sleep(record.renew() / 4);
    }
}
