//! Backup keys and tenant recovery bundles through the public API: a backup made
//! on one host and restored on another, KEK rotation of the stored backup keys,
//! and the refusals a restore meets, each with its exact message.

use blockseal_keys::{
    Argon2Params, BackupId, BackupKey, BundleError, BundleOpener, BundleProtection, DataKey,
    DeploymentSalt, KeyVersion, MasterKey, Passphrase, TenantBundle, TenantId, TenantKek,
    TenantSeed, WRAPPED_BACKUP_DEK_LEN, WRAPPED_BACKUP_KEY_LEN, create_key_file, load_key_file,
    wrapped_backup_key_kek_version,
};

struct Tenant {
    master: MasterKey,
    salt: DeploymentSalt,
    name: TenantId,
    seed: TenantSeed,
}

impl Tenant {
    fn new(name: &str) -> Tenant {
        Tenant {
            master: MasterKey::generate().unwrap(),
            salt: DeploymentSalt::generate().unwrap(),
            name: TenantId::new(name).unwrap(),
            seed: TenantSeed::generate().unwrap(),
        }
    }

    fn kek(&self, version: u32) -> TenantKek {
        self.master
            .tenant_kek(&self.salt, &self.name, &self.seed, KeyVersion(version))
    }
}

/// What a backup file carries about its keys: never the backup key itself.
struct BackupFile {
    id: BackupId,
    deks: Vec<(KeyVersion, [u8; WRAPPED_BACKUP_DEK_LEN])>,
    body: Vec<u8>,
    trailer: [u8; 32],
}

fn make_backup(key: &BackupKey, id: BackupId, deks: &[DataKey]) -> BackupFile {
    let body = b"sealed extents of the volume".to_vec();
    BackupFile {
        id,
        deks: deks
            .iter()
            .map(|d| (d.version(), key.wrap_dek(&id, d).unwrap()))
            .collect(),
        trailer: key.mac(&id, &body),
        body,
    }
}

#[test]
fn a_backup_restores_on_another_host_from_a_bundle_sealed_to_its_master_key() {
    let source = Tenant::new("acme");
    let deks = [
        DataKey::generate(KeyVersion(1)).unwrap(),
        DataKey::generate(KeyVersion(2)).unwrap(),
    ];

    // Source host: a backup with its own key, kept by the store only wrapped.
    let id = BackupId::generate().unwrap();
    let key = BackupKey::generate().unwrap();
    let file = make_backup(&key, id, &deks);
    let stored = source.kek(1).wrap_backup_key(&id, &key).unwrap();
    assert_eq!(stored.len(), WRAPPED_BACKUP_KEY_LEN);
    drop(key);

    // The restoring host's master key, in its key file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let target = MasterKey::generate().unwrap();
    create_key_file(&path, &target, None).unwrap();

    // Export: the store unwraps the key and seals a bundle to the target key.
    let bundle = TenantBundle {
        tenant: source.name.clone(),
        created: 1_700_000_000,
        backup_keys: vec![(id, source.kek(1).unwrap_backup_key(&id, &stored).unwrap())],
    };
    let sealed = bundle.seal_to_recipient(&target).unwrap();
    drop(bundle);

    // Restore on the other host.
    let target = load_key_file(&path, None).unwrap();
    assert_eq!(
        TenantBundle::inspect(&sealed).unwrap(),
        BundleProtection::Recipient(target.id())
    );
    let opened = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&target)).unwrap();
    assert_eq!(opened.tenant, source.name);
    assert_eq!(opened.created, 1_700_000_000);
    assert_eq!(
        format!("{opened:?}"),
        "TenantBundle { tenant: TenantId(\"acme\"), backup_keys: 1, .. }"
    );
    let key = opened.backup_key(&file.id).unwrap();
    assert!(key.verify_mac(&file.id, &file.body, &file.trailer));
    for ((version, wrapped), dek) in file.deks.iter().zip(&deks) {
        let back = key.unwrap_dek(&file.id, *version, wrapped).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert_eq!(back.version(), dek.version());
    }

    // An edited body or trailer fails the trailer check.
    let mut body = file.body.clone();
    body[0] ^= 1;
    assert!(!key.verify_mac(&file.id, &body, &file.trailer));
    let mut trailer = file.trailer;
    trailer[31] ^= 1;
    assert!(!key.verify_mac(&file.id, &file.body, &trailer));

    // The source host's master key is another key: named, with the bundle's.
    let e = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&source.master)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "tenant bundle is for master key {}, not key {}",
            target.id(),
            source.master.id()
        )
    );
}

#[test]
fn a_passphrase_bundle_round_trips_and_a_wrong_passphrase_is_refused() {
    let ids = [BackupId::generate().unwrap(), BackupId::generate().unwrap()];
    let bundle = TenantBundle {
        tenant: TenantId::new("acme").unwrap(),
        created: 42,
        backup_keys: ids
            .iter()
            .map(|id| (*id, BackupKey::generate().unwrap()))
            .collect(),
    };
    let dek = DataKey::generate(KeyVersion(4)).unwrap();
    let wrapped = bundle.backup_keys[1].1.wrap_dek(&ids[1], &dek).unwrap();

    let passphrase = Passphrase::new("tenant export 2026".to_owned());
    let sealed = bundle
        .seal_with_passphrase(&passphrase, Argon2Params::CHEAPEST)
        .unwrap();
    assert_eq!(
        TenantBundle::inspect(&sealed).unwrap().to_string(),
        "passphrase (Argon2id, m=47104 KiB, t=1, p=1)"
    );
    let opened = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&passphrase)).unwrap();
    assert_eq!(opened.backup_keys.len(), 2);
    let back = opened
        .backup_key(&ids[1])
        .unwrap()
        .unwrap_dek(&ids[1], KeyVersion(4), &wrapped)
        .unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
    // The keys are in order, each under its id.
    for ((a, _), (b, _)) in opened.backup_keys.iter().zip(&bundle.backup_keys) {
        assert_eq!(a, b);
    }

    let wrong = Passphrase::new("tenant export 2025".to_owned());
    let e = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&wrong)).unwrap_err();
    assert!(matches!(e, BundleError::WrongPassphrase));
    let text = format!("{e} {e:?}");
    assert!(!text.contains("tenant export"), "{text}");
}

#[test]
fn stored_backup_keys_are_rewrapped_when_the_tenant_kek_rotates() {
    let t = Tenant::new("acme");
    let id = BackupId::generate().unwrap();
    let key = BackupKey::generate().unwrap();
    let v1 = t.kek(1).wrap_backup_key(&id, &key).unwrap();

    // The store reads which KEK a blob needs, opens it with that one and
    // rewraps it under the new version.
    let needed = wrapped_backup_key_kek_version(&v1).unwrap();
    assert_eq!(needed, KeyVersion(1));
    let old = t.kek(needed.0);
    let new = t.kek(2);
    let v2 = new
        .wrap_backup_key(&id, &old.unwrap_backup_key(&id, &v1).unwrap())
        .unwrap();
    assert_eq!(wrapped_backup_key_kek_version(&v2), Some(KeyVersion(2)));
    let back = new.unwrap_backup_key(&id, &v2).unwrap();
    assert_eq!(back.mac(&id, b"x"), key.mac(&id, b"x"));

    // Each blob opens only under its own KEK version.
    assert_eq!(
        new.unwrap_backup_key(&id, &v1).unwrap_err().to_string(),
        format!("backup key failed to unwrap (tenant acme, backup {id}, KEK v1)")
    );
    assert!(old.unwrap_backup_key(&id, &v2).is_err());
    // Another tenant's KEK opens nothing.
    let other = Tenant::new("other");
    assert!(other.kek(1).unwrap_backup_key(&id, &v1).is_err());
}

#[test]
fn a_bundle_reader_refuses_what_is_not_a_bundle() {
    let master = MasterKey::generate().unwrap();
    let opener = BundleOpener::MasterKey(&master);
    let open = |bytes: &[u8]| TenantBundle::open(bytes, &opener).unwrap_err().to_string();
    assert_eq!(open(b""), "not a blockseal tenant bundle (bad magic)");
    assert_eq!(
        open(&[0u8; 200]),
        "not a blockseal tenant bundle (bad magic)"
    );
    assert_eq!(
        open(b"BSBUNDLE\x00\x01\x02\x00"),
        "tenant bundle is truncated: 12 bytes, expected 76"
    );
    assert_eq!(
        open(b"BSBUNDLE\x00\x07\x02\x00"),
        "tenant bundle has format version 7; this build reads version 1"
    );
}
