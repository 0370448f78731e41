//! `blockseal key ...`: create, inspect and check master key files.

use anyhow::Context;
use blockseal_keys::{
    Argon2Params, KeyFileError, MasterKey, create_key_file_with_params, inspect_key_file,
    load_key_file,
};

use crate::cli::{KeyCheckArgs, KeyCommand, KeyInitArgs, KeyInspectArgs};
use crate::passphrase::Confirm;
use crate::time::rfc3339_utc;

/// Runs a `blockseal key` subcommand.
pub(crate) fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Init(args) => init(&args),
        KeyCommand::Inspect(args) => inspect(&args),
        KeyCommand::Check(args) => check(&args),
        KeyCommand::RotateMaster {
            new_key,
            new_key_passphrase_env,
            new_key_passphrase_prompt,
            store,
            output,
        } => super::admin::rotate_master(
            &new_key,
            new_key_passphrase_env,
            new_key_passphrase_prompt,
            &store,
            &output,
        ),
        KeyCommand::RotateData {
            name,
            wait,
            store,
            output,
        } => super::admin::rotate_data(&name, wait, &store, &output),
        KeyCommand::Status {
            name,
            wait,
            store,
            output,
        } => super::admin::key_status(name.as_deref(), wait, &store, &output),
        KeyCommand::RotateTenant {
            tenant,
            store,
            output,
        } => super::admin::rotate_tenant(tenant, &store, &output),
        KeyCommand::ExportTenant(args) => super::backup::export_tenant(args),
    }
}

fn init(args: &KeyInitArgs) -> anyhow::Result<()> {
    let path = &args.out;
    // Refuse early, before asking for a passphrase; creation refuses again atomically.
    if path.symlink_metadata().is_ok() {
        return Err(KeyFileError::AlreadyExists { path: path.clone() }.into());
    }
    // The accepted ranges have a floor at OWASP's minimum, so no weak parameters
    // get this far; the same check refuses anything else in a file being loaded.
    let params = Argon2Params::new(
        args.argon2_memory_kib,
        args.argon2_iterations,
        args.argon2_parallelism,
    )?;
    let passphrase = args
        .passphrase
        .read(&path.display().to_string(), Confirm::Twice)?;
    let key = MasterKey::generate().context("could not generate a master key")?;
    create_key_file_with_params(path, &key, passphrase.as_ref(), params)?;
    let info = inspect_key_file(path)?;
    println!("created key file {}", path.display());
    println!("key id:     {}", key.id());
    println!("protection: {}", info.protection);
    Ok(())
}

fn inspect(args: &KeyInspectArgs) -> anyhow::Result<()> {
    let path = &args.path;
    let info = inspect_key_file(path)?;
    println!("file:       {}", path.display());
    println!("format:     {}", info.format_version);
    println!("key id:     {}", info.key_id);
    println!("protection: {}", info.protection);
    println!("created:    {}", rfc3339_utc(info.created));
    println!("mode:       {:04o}", info.mode);
    println!("owner:      uid {}", info.owner);
    if info.mode_is_too_open() {
        eprintln!(
            "warning: key file {} has mode {:04o}, open to group or others; it will be refused until you run `chmod 600 {}`",
            path.display(),
            info.mode,
            path.display()
        );
    }
    if info.owner_is_refused() {
        eprintln!(
            "warning: key file {} is owned by uid {}: only processes running as uid {} or root will load it",
            path.display(),
            info.owner,
            info.owner,
        );
    }
    if let blockseal_keys::Protection::Argon2id(params) = info.protection
        && params.outside_init_ranges()
    {
        eprintln!(
            "warning: key file {} uses Argon2id parameters ({params}) outside what `blockseal key init` writes today; it still loads, but consider a new key file",
            path.display(),
        );
    }
    Ok(())
}

fn check(args: &KeyCheckArgs) -> anyhow::Result<()> {
    let path = &args.path;
    let passphrase = args
        .passphrase
        .read(&path.display().to_string(), Confirm::Once)?;
    let key = load_key_file(path, passphrase.as_ref())?;
    println!("key file {} opens", path.display());
    println!("key id:     {}", key.id());
    Ok(())
}
