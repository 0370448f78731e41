//! Reopening a volume while its last instance is still closing (its final flush
//! runs on whichever thread dropped it) must not give a second instance that
//! misses the first one's writes, nor let the first one's late commit overwrite
//! the second one's.

mod common {
    pub mod gated_meta;
    pub mod volume;
}

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockseal_volume::meta::{self, BackendKind};
use blockseal_volume::{Store, StoreOptions, VolumeOptions};
use common::gated_meta::GatedMeta;
use common::volume::*;

const BS: usize = 4096;

#[test]
fn a_volume_reopened_while_closing_sees_every_write_and_keeps_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let gated = Arc::new(GatedMeta {
        inner: meta::open(BackendKind::Redb, &tmp.path().join("meta")).unwrap(),
        armed: AtomicBool::new(false),
        gate: Mutex::new((false, false)),
        signal: Condvar::new(),
    });
    let options = || {
        StoreOptions::new()
            .metadata_store(gated.clone())
            .background_compaction(false)
    };
    let dir = tmp.path().join("store");
    let store = Store::create(&dir, master(1), options()).unwrap();
    store.create_tenant(&tenant("acme")).unwrap();
    store
        .create_volume(
            &tenant("acme"),
            &volume_id("disk"),
            1 << 20,
            VolumeOptions::default(),
        )
        .unwrap();
    let (a, b) = (pattern(1, BS), pattern(2, BS));
    let first = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    first.write_at(0, &a).unwrap();

    std::thread::scope(|s| {
        gated.arm();
        // The last handle goes; its closing flush stalls in the commit.
        s.spawn(move || drop(first));
        gated.wait_entered();
        let (tx, rx) = mpsc::channel();
        let store = &store;
        let (b2, tx2) = (b.clone(), tx.clone());
        let reopened = s.spawn(move || {
            let second = store
                .open_volume(&tenant("acme"), &volume_id("disk"))
                .unwrap();
            let mut buf = vec![0u8; BS];
            second.read_at(0, &mut buf).unwrap();
            tx2.send(buf).unwrap();
            second.write_at(BS as u64, &b2).unwrap();
            second.flush().unwrap();
        });
        // Without the wait for the closing instance the reopen answers at once,
        // before the first instance's commit: it must still read `a`. With it,
        // the reopen waits for the commit, which is released here.
        let early = rx.recv_timeout(Duration::from_millis(500));
        gated.release();
        let seen = match early {
            Ok(buf) => buf,
            Err(_) => rx.recv().unwrap(),
        };
        assert!(
            seen == a,
            "the reopened volume missed an acknowledged write"
        );
        reopened.join().unwrap();
    });
    drop(store);

    // Both writes are durable, and the mappings and live counts agree (the
    // volume's open checks them).
    let store = Store::open(&dir, master(1), options()).unwrap();
    let volume = store
        .open_volume(&tenant("acme"), &volume_id("disk"))
        .unwrap();
    let mut buf = vec![0u8; BS];
    volume.read_at(0, &mut buf).unwrap();
    assert!(buf == a);
    volume.read_at(BS as u64, &mut buf).unwrap();
    assert!(buf == b);
}

#[test]
fn concurrent_opens_of_one_volume_share_one_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let options = StoreOptions::new().background_compaction(false);
    let (store, first) = store_with_volume(tmp.path(), 1 << 20, options);
    drop(first);
    store
        .create_volume(
            &tenant("acme"),
            &volume_id("other"),
            1 << 20,
            VolumeOptions::default(),
        )
        .unwrap();
    let handles: Vec<_> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..8)
            .map(|k| {
                let store = &store;
                s.spawn(move || {
                    let name = if k % 4 == 3 { "other" } else { "disk" };
                    (
                        name,
                        store
                            .open_volume(&tenant("acme"), &volume_id(name))
                            .unwrap(),
                    )
                })
            })
            .collect();
        opens.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A write through one handle is seen, unflushed, through every other
    // handle of the same volume: one instance.
    let disks: Vec<_> = handles.iter().filter(|(n, _)| *n == "disk").collect();
    disks[0].1.write_at(0, &pattern(3, BS)).unwrap();
    for (_, v) in &disks {
        let mut buf = vec![0u8; BS];
        v.read_at(0, &mut buf).unwrap();
        assert!(buf == pattern(3, BS));
    }
}
