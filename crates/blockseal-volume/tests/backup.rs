//! Backups: full and incremental backups of snapshots, verification with and
//! without keys, restore on the same store and on another one (with a tenant
//! recovery bundle), damaged, spliced and out-of-order files, expiry and
//! crypto-shredding reaching backup files, nonce uniqueness after restoring one
//! backup twice, and what a failed or interrupted restore leaves (nothing).

mod common {
    pub mod volume;
}

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use blockseal_keys::{Argon2Params, BundleOpener, Passphrase, TenantBundle};
use blockseal_volume::meta::{self, BackendKind};
use blockseal_volume::{
    AdminErrorKind, BackupError, BackupKeys, BackupReport, CATALOG_HEADER_LEN, CatalogError,
    CatalogFramed, CatalogFraming, CatalogHeader, Store, StoreOptions, Volume,
};
use common::volume::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 256;

fn options() -> StoreOptions {
    StoreOptions::new()
        .background_compaction(false)
        .segment_bytes(64 * BS)
        // Scattered commits of these small volumes go into the mapping
        // journal, so backups, snapshots and catalogues meet it.
        .danger_journal_min_runs(1)
}

fn block(lba: u64, v: u64) -> Vec<u8> {
    pattern(lba << 32 | v, BS as usize)
}

fn write_blocks(volume: &Volume, lbas: impl IntoIterator<Item = u64>, v: u64) {
    for lba in lbas {
        volume.write_at(lba * BS, &block(lba, v)).unwrap();
    }
}

fn read_all(read: impl Fn(u64, &mut [u8])) -> Vec<u8> {
    let mut buf = vec![0u8; (BLOCKS * BS) as usize];
    read(0, &mut buf);
    buf
}

fn snapshot_bytes(store: &Store, volume: &str, name: &str) -> Vec<u8> {
    let r = store
        .open_snapshot(&tenant("acme"), &volume_id(volume), name)
        .unwrap();
    read_all(|o, b| r.read_at(o, b).unwrap())
}

fn volume_bytes(store: &Store, tenant_name: &str, volume: &str) -> Vec<u8> {
    let v = store
        .open_volume(&tenant(tenant_name), &volume_id(volume))
        .unwrap();
    read_all(|o, b| v.read_at(o, b).unwrap())
}

fn backup(
    store: &Store,
    snapshot: &str,
    base: Option<&str>,
    expires: Option<u64>,
) -> (Vec<u8>, BackupReport) {
    let mut out = Vec::new();
    let mut calls = 0;
    let report = store
        .create_backup(
            &tenant("acme"),
            &volume_id("disk"),
            snapshot,
            base,
            expires,
            &mut out,
            &mut |done, total| {
                assert!(done <= total);
                calls += 1;
            },
        )
        .unwrap();
    assert!(calls >= 2, "progress is reported");
    assert_eq!(report.bytes, out.len() as u64);
    (out, report)
}

fn files(list: &[&Vec<u8>]) -> Vec<(String, Box<dyn Read + 'static>)> {
    list.iter()
        .enumerate()
        .map(|(i, bytes)| {
            let r: Box<dyn Read> = Box::new(std::io::Cursor::new((*bytes).clone()));
            (format!("file {}", i + 1), r)
        })
        .collect()
}

fn restore(
    store: &Store,
    list: &[&Vec<u8>],
    as_tenant: &str,
    as_volume: &str,
    keys: BackupKeys<'_>,
) -> Result<(), BackupError> {
    store
        .restore_backups(
            files(list),
            &tenant(as_tenant),
            &volume_id(as_volume),
            keys,
            &mut |_| {},
        )
        .map(|_| ())
}

/// A store with `acme/disk` written, snapshot `mon`, more writes and trims,
/// snapshot `tue`; with a full backup of `mon` and an incremental to `tue`.
struct Setup {
    _tmp: tempfile::TempDir,
    store: Store,
    volume: Volume,
    full: Vec<u8>,
    incr: Vec<u8>,
    incr_report: BackupReport,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (store, volume) = store_with_volume(&tmp.path().join("a"), BLOCKS * BS, options());
    write_blocks(&volume, 0..200, 1);
    store
        .create_snapshot(&tenant("acme"), &volume_id("disk"), "mon")
        .unwrap();
    let (full, full_report) = backup(&store, "mon", None, None);
    assert_eq!(full_report.mapped_blocks, 200);
    // Change 2 blocks in 200 (1%), trim 3, write 1 past the old data.
    write_blocks(&volume, [5, 150], 2);
    volume.trim(20 * BS, 3 * BS).unwrap();
    write_blocks(&volume, [230], 2);
    store
        .create_snapshot(&tenant("acme"), &volume_id("disk"), "tue")
        .unwrap();
    // Written after the snapshot: in no backup.
    write_blocks(&volume, [7], 3);
    let (incr, incr_report) = backup(&store, "tue", Some("mon"), None);
    assert_eq!(incr_report.mapped_blocks, 3);
    assert_eq!(incr_report.unmapped_blocks, 3);
    assert!(
        (incr.len() as f64) < 0.02 * full.len() as f64,
        "incremental {} bytes vs full {}",
        incr.len(),
        full.len()
    );
    Setup {
        _tmp: tmp,
        store,
        volume,
        full,
        incr,
        incr_report,
    }
}

#[test]
fn full_and_incremental_backups_restore_to_their_snapshots() {
    let s = setup();
    restore(&s.store, &[&s.full], "acme", "mon-copy", BackupKeys::Store).unwrap();
    assert!(volume_bytes(&s.store, "acme", "mon-copy") == snapshot_bytes(&s.store, "disk", "mon"));
    restore(
        &s.store,
        &[&s.full, &s.incr],
        "other",
        "tue-copy",
        BackupKeys::Store,
    )
    .unwrap();
    assert!(volume_bytes(&s.store, "other", "tue-copy") == snapshot_bytes(&s.store, "disk", "tue"));
    // Structure alone, and with keys.
    let check = s
        .store
        .verify_backups(files(&[&s.full, &s.incr]), BackupKeys::None)
        .unwrap();
    assert_eq!(check.blocks_authenticated, 0);
    assert_eq!(check.mapped_blocks, 203);
    let check = s
        .store
        .verify_backups(files(&[&s.full, &s.incr]), BackupKeys::Store)
        .unwrap();
    assert_eq!(check.blocks_authenticated, 203);
    assert_eq!(
        s.incr_report.kind,
        blockseal_volume::backup_format::BackupKind::Incremental
    );
    drop(s.volume);
}

#[test]
fn damaged_spliced_and_misordered_backups_are_refused_and_leave_nothing() {
    let s = setup();
    let kind = |r: Result<(), BackupError>| r.unwrap_err().kind();
    // Every tenth byte flipped in turn: refused, by structure or by keys.
    for at in (0..s.full.len()).step_by(s.full.len() / 97 + 1) {
        let mut bad = s.full.clone();
        bad[at] ^= 0x40;
        let e = s
            .store
            .verify_backups(files(&[&bad]), BackupKeys::Store)
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                AdminErrorKind::InvalidInput | AdminErrorKind::NotFound
            ),
            "byte {at}: {e}"
        );
        assert!(restore(&s.store, &[&bad], "acme", "bad", BackupKeys::Store).is_err());
    }
    // Truncated anywhere.
    for len in [0, 10, 200, s.full.len() / 2, s.full.len() - 1] {
        let e = kind(restore(
            &s.store,
            &[&s.full[..len].to_vec()],
            "acme",
            "bad",
            BackupKeys::Store,
        ));
        assert_eq!(e, AdminErrorKind::InvalidInput, "{len} bytes");
    }
    // Two backups spliced: the head of one, the tail of the other.
    let (other, _) = backup(&s.store, "mon", None, None);
    let mut spliced = s.full[..s.full.len() / 2].to_vec();
    spliced.extend_from_slice(&other[other.len() / 2..]);
    assert_eq!(
        kind(restore(
            &s.store,
            &[&spliced],
            "acme",
            "bad",
            BackupKeys::Store
        )),
        AdminErrorKind::InvalidInput
    );
    // Out of order, or an incremental alone.
    let e = restore(
        &s.store,
        &[&s.incr, &s.full],
        "acme",
        "bad",
        BackupKeys::Store,
    )
    .unwrap_err();
    assert!(e.to_string().contains("must be a full backup"), "{e}");
    let e = restore(
        &s.store,
        &[&s.full, &s.incr, &s.incr],
        "acme",
        "bad",
        BackupKeys::Store,
    )
    .unwrap_err();
    assert!(e.to_string().contains("out of order"), "{e}");
    // The restore target exists: refused before anything is written.
    let e = restore(&s.store, &[&s.full], "acme", "disk", BackupKeys::Store).unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::Conflict);
    // Nothing half-restored remains: no volume "bad", no tenant made for it.
    assert!(
        s.store
            .volumes(&tenant("acme"))
            .unwrap()
            .iter()
            .all(|v| v.id.as_str() == "disk")
    );
    let e = restore(&s.store, &[&s.incr], "newt", "bad", BackupKeys::Store).unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::InvalidInput);
    assert!(s.store.tenant(&tenant("newt")).unwrap().is_none());
    drop(s.volume);
}

#[test]
fn another_store_restores_with_a_bundle_and_only_with_one() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    // A store with another master key.
    let other = Store::create(tmp.path().join("b"), master(2), options()).unwrap();
    let e = restore(&other, &[&s.full], "acme", "disk", BackupKeys::Store).unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("recovery bundle"), "{e}");
    let bundle = s.store.export_tenant_keys(&tenant("acme")).unwrap();
    assert_eq!(bundle.backup_keys.len(), 2);
    // Sealed to the other host's master key, and under a passphrase.
    let sealed = bundle.seal_to_recipient(&master(2)).unwrap();
    let opened = TenantBundle::open(&sealed, &BundleOpener::MasterKey(&master(2))).unwrap();
    restore(
        &other,
        &[&s.full, &s.incr],
        "acme",
        "disk",
        BackupKeys::Bundle(&opened),
    )
    .unwrap();
    assert!(volume_bytes(&other, "acme", "disk") == snapshot_bytes(&s.store, "disk", "tue"));
    let pass = Passphrase::new("a long recovery passphrase".into());
    let sealed = bundle
        .seal_with_passphrase(&pass, Argon2Params::CHEAPEST)
        .unwrap();
    let opened = TenantBundle::open(&sealed, &BundleOpener::Passphrase(&pass)).unwrap();
    restore(
        &other,
        &[&s.full],
        "acme",
        "mon",
        BackupKeys::Bundle(&opened),
    )
    .unwrap();
    assert!(volume_bytes(&other, "acme", "mon") == snapshot_bytes(&s.store, "disk", "mon"));
    // Another tenant's bundle opens nothing of acme's.
    let foreign = TenantBundle {
        tenant: tenant("zeta"),
        created: 0,
        backup_keys: Vec::new(),
    };
    let e = restore(
        &other,
        &[&s.full],
        "acme",
        "x",
        BackupKeys::Bundle(&foreign),
    )
    .unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::NotFound);
    drop(s.volume);
}

#[test]
fn shredding_and_expiry_destroy_the_keys_of_backup_files() {
    let s = setup();
    let (expiring, _) = backup(&s.store, "mon", None, Some(1_000));
    s.store
        .verify_backups(files(&[&expiring]), BackupKeys::Store)
        .unwrap();
    let gone = s.store.expire_backup_keys(1_000).unwrap();
    assert_eq!(gone.len(), 1);
    let e = s
        .store
        .verify_backups(files(&[&expiring]), BackupKeys::Store)
        .unwrap_err();
    assert!(matches!(e, BackupError::NoKey { .. }), "{e}");
    // Not expiring: still readable; structure checks need no key.
    s.store
        .verify_backups(files(&[&s.full]), BackupKeys::Store)
        .unwrap();
    s.store
        .verify_backups(files(&[&expiring]), BackupKeys::None)
        .unwrap();

    let dir = s.store.dir().to_path_buf();
    drop(s.volume);
    s.store.shred_tenant(&tenant("acme")).unwrap();
    for file in [&s.full, &s.incr] {
        let e = s
            .store
            .verify_backups(files(&[file]), BackupKeys::Store)
            .unwrap_err();
        assert!(matches!(e, BackupError::NoKey { .. }), "{e}");
    }
    let e = restore(&s.store, &[&s.full], "acme", "disk", BackupKeys::Store).unwrap_err();
    assert!(matches!(e, BackupError::NoKey { .. }), "{e}");
    assert!(
        s.store.tenant(&tenant("acme")).unwrap().is_none(),
        "the failed restore made no tenant"
    );
    assert!(s.store.backup_keys(None).unwrap().is_empty());
    drop(s.store);
    // Not a byte of the keys is left in the metadata.
    let m = meta::open(BackendKind::Redb, &dir.join("meta")).unwrap();
    let mut left = 0;
    m.scan_prefix(b"b", &mut |_, _| {
        left += 1;
        true
    })
    .unwrap();
    assert_eq!(left, 0);
}

/// Every (writer salt, nonce) pair a volume's committed blocks were sealed
/// with: the writer key is derived from the DEK and the salt, so a pair seen
/// twice is the only way a (key, nonce) pair could repeat.
fn sealed_with(dir: &Path) -> Vec<([u8; 32], u64)> {
    let m = meta::open(BackendKind::Redb, &dir.join("meta")).unwrap();
    let mut salts = std::collections::HashMap::new();
    m.scan_prefix(b"w", &mut |key, value| {
        let volume = u32::from_be_bytes(key[1..5].try_into().unwrap());
        let writer = u32::from_be_bytes(key[5..9].try_into().unwrap());
        salts.insert(
            (volume, writer),
            <[u8; 32]>::try_from(&value[5..37]).unwrap(),
        );
        true
    })
    .unwrap();
    let mut out = Vec::new();
    m.scan_prefix(b"M", &mut |key, value| {
        let volume = u32::from_be_bytes(key[1..5].try_into().unwrap());
        let (extents, _) = blockseal_volume::fuzzing::mapping_page(key, value).unwrap();
        for e in extents {
            assert_ne!(e.writer, 0, "restored blocks are never legacy");
            let salt = salts[&(volume, e.writer)];
            for k in 0..e.tags as u64 {
                out.push((salt, e.nonce + k));
            }
        }
        true
    })
    .unwrap();
    out
}

#[test]
fn one_backup_restored_twice_never_repeats_a_key_and_nonce() {
    let s = setup();
    let bundle = s.store.export_tenant_keys(&tenant("acme")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for (i, name) in ["x", "y"].iter().enumerate() {
        let dir = tmp.path().join(name);
        let store = Store::create(&dir, master(1), options()).unwrap();
        // The same backup into two stores, and twice into the first.
        restore(
            &store,
            &[&s.full],
            "acme",
            "disk",
            BackupKeys::Bundle(&bundle),
        )
        .unwrap();
        if i == 0 {
            restore(
                &store,
                &[&s.full],
                "acme",
                "again",
                BackupKeys::Bundle(&bundle),
            )
            .unwrap();
            let v = store
                .open_volume(&tenant("acme"), &volume_id("again"))
                .unwrap();
            write_blocks(&v, 0..50, 9);
            v.flush().unwrap();
        }
        let v = store
            .open_volume(&tenant("acme"), &volume_id("disk"))
            .unwrap();
        // New writes after the restore, the same in both stores.
        write_blocks(&v, 0..50, 8);
        v.flush().unwrap();
        drop(v);
        drop(store);
        dirs.push(dir);
    }
    let source = s.store.dir().to_path_buf();
    drop(s.volume);
    drop(s.store);
    let mut seen = HashSet::new();
    for dir in dirs.iter().chain(std::iter::once(&source)) {
        for pair in sealed_with(dir) {
            assert!(
                seen.insert(pair),
                "a (writer key, nonce) pair repeats in {}",
                dir.display()
            );
        }
    }
    assert!(seen.len() > 3 * 200);
}

/// A reader that fails after `left` bytes.
struct Failing {
    inner: std::io::Cursor<Vec<u8>>,
    left: usize,
    panic: bool,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            if self.panic {
                panic!("the process dies mid-restore");
            }
            return Err(std::io::Error::other("the disk holding the backup failed"));
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn an_interrupted_restore_leaves_nothing() {
    let s = setup();
    let half = s.full.len() / 2;
    let failing = |panic| -> Vec<(String, Box<dyn Read>)> {
        vec![(
            "file 1".into(),
            Box::new(Failing {
                inner: std::io::Cursor::new(s.full.clone()),
                left: half,
                panic,
            }),
        )]
    };
    let e = s
        .store
        .restore_backups(
            failing(false),
            &tenant("acme"),
            &volume_id("half"),
            BackupKeys::Store,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, BackupError::Format { .. }), "{e}");
    assert!(
        s.store
            .volumes(&tenant("acme"))
            .unwrap()
            .iter()
            .all(|v| v.id.as_str() != "half")
    );

    // The process dies mid-restore (here: a panic unwinds past the cleanup).
    let dir = s.store.dir().to_path_buf();
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.store.restore_backups(
            failing(true),
            &tenant("acme"),
            &volume_id("half"),
            BackupKeys::Store,
            &mut |_| {},
        )
    }));
    assert!(died.is_err());
    assert!(
        s.store
            .volumes(&tenant("acme"))
            .unwrap()
            .iter()
            .any(|v| v.id.as_str() == "half")
    );
    drop(s.volume);
    drop(s.store);
    let store = Store::open(&dir, master(1), options()).unwrap();
    let names: Vec<String> = store
        .volumes(&tenant("acme"))
        .unwrap()
        .into_iter()
        .map(|v| v.id.to_string())
        .collect();
    assert_eq!(
        names,
        ["disk"],
        "the half-restored volume is gone after reopening"
    );
}

#[test]
fn a_drill_restores_the_newest_chain_of_every_volume_and_cleans_up() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backups");
    std::fs::create_dir_all(dir.join("acme/disk")).unwrap();
    std::fs::write(dir.join("acme/disk/1-full-mon.bsbackup"), &s.full).unwrap();
    std::fs::write(dir.join("acme/disk/2-incr-tue.bsbackup"), &s.incr).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a backup").unwrap();
    // A second volume whose only file is an incremental: its chain is broken.
    let v2 = volume_id("voicemail");
    s.store
        .create_volume(
            &tenant("acme"),
            &v2,
            BLOCKS * BS,
            blockseal_volume::VolumeOptions::default(),
        )
        .unwrap();
    let vm = s.store.open_volume(&tenant("acme"), &v2).unwrap();
    write_blocks(&vm, 0..10, 4);
    s.store.create_snapshot(&tenant("acme"), &v2, "a").unwrap();
    write_blocks(&vm, 0..2, 5);
    s.store.create_snapshot(&tenant("acme"), &v2, "b").unwrap();
    let mut incr = Vec::new();
    s.store
        .create_backup(
            &tenant("acme"),
            &v2,
            "b",
            Some("a"),
            None,
            &mut incr,
            &mut |_, _| {},
        )
        .unwrap();
    std::fs::write(dir.join("vm-incr.bsbackup"), &incr).unwrap();

    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let report = s.store.drill(&dir, &scratch).unwrap();
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.volumes.len(), 2, "{report:?}");
    let disk = &report.volumes[0];
    assert_eq!(
        (disk.volume.as_str(), disk.snapshot.as_str()),
        ("disk", "tue")
    );
    assert_eq!(disk.files.len(), 2);
    assert_eq!(disk.blocks, 203);
    assert!(disk.error.is_none(), "{disk:?}");
    let vm_report = &report.volumes[1];
    assert!(
        vm_report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no full backup"),
        "{vm_report:?}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the scratch store is removed"
    );

    // A damaged file fails the drill of its volume, not the drill.
    let mut bad = s.full.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(dir.join("acme/disk/1-full-mon.bsbackup"), &bad).unwrap();
    let report = s.store.drill(&dir, &scratch).unwrap();
    assert!(report.volumes[0].error.is_some());
    drop(vm);
    drop(s.volume);
}

#[test]
fn sealed_bundles_open_with_the_passphrase_or_a_store_sharing_the_master_key() {
    let s = setup();
    let pass = Passphrase::new("correct horse battery staple".into());
    let sealed = s
        .store
        .seal_tenant_bundle(&tenant("acme"), Some((&pass, Argon2Params::CHEAPEST)))
        .unwrap();
    assert!(s.store.open_tenant_bundle(&sealed, None).is_err());
    let wrong = Passphrase::new("wrong".into());
    assert!(s.store.open_tenant_bundle(&sealed, Some(&wrong)).is_err());
    let bundle = s.store.open_tenant_bundle(&sealed, Some(&pass)).unwrap();
    assert_eq!(bundle.backup_keys.len(), 2);
    // Sealed to the master key: another store with the same key opens it,
    // one with another key does not.
    let sealed = s.store.seal_tenant_bundle(&tenant("acme"), None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let same = Store::create(tmp.path().join("same"), master(1), options()).unwrap();
    let bundle = same.open_tenant_bundle(&sealed, None).unwrap();
    restore(
        &same,
        &[&s.full, &s.incr],
        "acme",
        "disk",
        BackupKeys::Bundle(&bundle),
    )
    .unwrap();
    assert!(volume_bytes(&same, "acme", "disk") == snapshot_bytes(&s.store, "disk", "tue"));
    let other = Store::create(tmp.path().join("other"), master(3), options()).unwrap();
    assert!(other.open_tenant_bundle(&sealed, None).is_err());
    drop(s.volume);
}

#[test]
fn a_store_rebuilds_from_its_catalogue_and_segments() {
    let s = setup();
    let tmp = tempfile::tempdir().unwrap();
    let segs = tmp.path().join("segments-copy");
    // Scattered blocks whose commit stays in the mapping journal while the
    // catalogue is written. The catalogue holds what is committed: flush
    // what the volume holds.
    write_blocks(&s.volume, [3, 90, 170, 250], 5);
    s.volume.flush().unwrap();
    let mut catalog = Vec::new();
    let report = s.store.write_catalog(&mut catalog, Some(&segs)).unwrap();
    assert!(report.records > 10 && report.segments > 0, "{report:?}");
    assert_eq!(report.segments_linked, report.segments);
    assert_eq!(report.bytes, catalog.len() as u64);
    // Nothing readable in the clear: no tenant name, no record key prefix run.
    assert!(!catalog.windows(4).any(|w| w == b"acme"));
    let want_tue = snapshot_bytes(&s.store, "disk", "tue");
    let want_live = volume_bytes(&s.store, "acme", "disk");
    // The live store goes on changing: compaction may delete segments now.
    write_blocks(&s.volume, 0..200, 7);
    s.volume.flush().unwrap();
    s.store.compact_now().unwrap();

    let opts = || options();
    let rebuilt = blockseal_volume::rebuild_store(
        &mut std::io::Cursor::new(&catalog[..]),
        &segs,
        &tmp.path().join("new"),
        master(1),
        opts(),
    )
    .unwrap();
    let v = rebuilt
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    let got = read_all(|o, b| v.read_at(o, b).unwrap());
    assert!(
        got == want_live,
        "the volume as it was when the catalogue was written"
    );
    let r = rebuilt
        .open_snapshot(&tenant("acme"), &volume_id("disk"), "tue")
        .unwrap();
    assert!(read_all(|o, b| r.read_at(o, b).unwrap()) == want_tue);
    // Backup keys travel with the catalogue: the rebuilt store verifies the
    // backups with its own records.
    rebuilt
        .verify_backups(files(&[&s.full, &s.incr]), BackupKeys::Store)
        .unwrap();
    drop((r, v, rebuilt));

    let rebuild = |bytes: &[u8], m, dir: &str| {
        blockseal_volume::rebuild_store(
            &mut std::io::Cursor::new(bytes),
            &segs,
            &tmp.path().join(dir),
            m,
            opts(),
        )
    };
    // Another master key, a damaged chunk, a cut-off end: refused, nothing made.
    let e = rebuild(&catalog, master(2), "x1").unwrap_err();
    assert!(e.to_string().contains("master key"), "{e}");
    let mut bad = catalog.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    let e = rebuild(&bad, master(1), "x2").unwrap_err();
    assert!(
        matches!(e, blockseal_volume::CatalogError::Damaged { .. }),
        "{e}"
    );
    let e = rebuild(&catalog[..catalog.len() - 10], master(1), "x3").unwrap_err();
    assert!(
        matches!(e, blockseal_volume::CatalogError::Format(_)),
        "{e}"
    );
    // A catalogue version this build does not know: refused by name.
    let mut newer = catalog.clone();
    newer[8..10].copy_from_slice(&3u16.to_be_bytes());
    let e = rebuild(&newer, master(1), "x5").unwrap_err();
    assert!(
        e.to_string()
            .contains("catalogue version 3; this build reads versions 1 to 2"),
        "{e}"
    );
    for d in ["x1", "x2", "x3", "x5"] {
        assert!(!tmp.path().join(d).join("FORMAT").exists());
    }
    // A segment file missing: named, refused.
    let first = std::fs::read_dir(&segs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let seg = std::fs::read_dir(&first)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&seg).unwrap();
    let e = rebuild(&catalog, master(1), "x4").unwrap_err();
    assert!(
        matches!(e, blockseal_volume::CatalogError::MissingSegments { .. }),
        "{e}"
    );
}

/// Feeds a catalogue to the keyless framing check in pieces of `piece`
/// bytes.
fn framing(bytes: &[u8], piece: usize) -> Result<CatalogFramed, CatalogError> {
    let mut check = CatalogFraming::new();
    for p in bytes.chunks(piece) {
        check.feed(p)?;
    }
    check.finish()
}

#[test]
fn the_framing_of_a_whole_catalogue_holds_and_a_cut_one_does_not() {
    let s = setup();
    s.volume.flush().unwrap();
    let mut catalogue = Vec::new();
    s.store.write_catalog(&mut catalogue, None).unwrap();
    for piece in [1, 7, CATALOG_HEADER_LEN, 4096, catalogue.len()] {
        let framed = framing(&catalogue, piece).unwrap();
        assert_eq!(framed.bytes, catalogue.len() as u64);
        assert_eq!(framed.header.master_key, s.store.master_key_id());
        assert_eq!(framed.header.backend, s.store.backend());
        assert!(framed.chunks >= 2 && framed.segments >= 1, "{framed:?}");
    }
    let header = CatalogHeader::parse(&catalogue).unwrap();
    assert_eq!(header.master_key, s.store.master_key_id());
    // Cut anywhere: in the header, in a chunk head, in a ciphertext, just
    // before the end chunk's last byte.
    let len = CATALOG_HEADER_LEN;
    for cut in [0, 10, len, len + 3, catalogue.len() / 2] {
        let e = framing(&catalogue[..cut], 1000).unwrap_err();
        assert!(e.to_string().contains("ends "), "{cut}: {e}");
    }
    let e = framing(&catalogue[..catalogue.len() - 1], 1000).unwrap_err();
    assert!(e.to_string().contains("without its end chunk"), "{e}");
    // A byte too many.
    let mut long = catalogue.clone();
    long.push(0);
    let e = framing(&long, 1000).unwrap_err();
    assert!(e.to_string().contains("bytes follow"), "{e}");
    // A chunk kind or length that is no catalogue's, a header that is not one.
    let mut bad = catalogue.clone();
    bad[len] = 9;
    let e = framing(&bad, 1000).unwrap_err();
    assert!(e.to_string().contains("chunk 0 is damaged (kind 9"), "{e}");
    let mut bad = catalogue.clone();
    bad[len + 1] = 0xff;
    let e = framing(&bad, 1000).unwrap_err();
    assert!(e.to_string().contains("chunk 0 is damaged (length"), "{e}");
    let mut bad = catalogue.clone();
    bad[0] = b'X';
    let e = framing(&bad, 1000).unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
    let mut bad = catalogue.clone();
    bad[10] = 7;
    let e = CatalogHeader::parse(&bad).unwrap_err();
    assert!(e.to_string().contains("unknown metadata backend 7"), "{e}");
}

/// Reads `first` until the first seek to a position from the start, then
/// `second`: a catalogue that changes between a rebuild's two passes.
struct ChangesOnRewind {
    first: std::io::Cursor<Vec<u8>>,
    second: std::io::Cursor<Vec<u8>>,
    rewound: bool,
}

impl Read for ChangesOnRewind {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.rewound {
            false => self.first.read(buf),
            true => self.second.read(buf),
        }
    }
}

impl std::io::Seek for ChangesOnRewind {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        if matches!(pos, std::io::SeekFrom::Start(_)) {
            self.rewound = true;
        }
        match self.rewound {
            false => self.first.seek(pos),
            true => self.second.seek(pos),
        }
    }
}

#[test]
fn a_catalogue_that_changes_during_a_rebuild_leaves_no_store() {
    let s = setup();
    s.volume.flush().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let segs = tmp.path().join("segs");
    let mut catalogue = Vec::new();
    s.store.write_catalog(&mut catalogue, Some(&segs)).unwrap();
    let mut changed = catalogue.clone();
    let at = changed.len() / 2;
    changed[at] ^= 1;
    let target = tmp.path().join("new");
    let e = blockseal_volume::rebuild_store(
        &mut ChangesOnRewind {
            first: std::io::Cursor::new(catalogue.clone()),
            second: std::io::Cursor::new(changed),
            rewound: false,
        },
        &segs,
        &target,
        master(1),
        options(),
    )
    .unwrap_err();
    assert!(matches!(e, CatalogError::Damaged { .. }), "{e}");
    assert!(
        !target.join("FORMAT").exists(),
        "a half-rebuilt directory is no store"
    );
    assert!(Store::open(&target, master(1), options()).is_err());
}
