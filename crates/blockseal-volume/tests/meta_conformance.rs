//! One conformance suite for every metadata-store backend.
//!
//! Each check is written once, generic over [`BackendKind`], and instantiated for
//! every backend by the `conformance!` macro at the bottom.

mod common {
    pub mod moto;
}

use std::collections::BTreeMap;
use std::path::Path;

use blockseal_volume::meta::{self, BackendKind, Batch, MetaError, MetaStore, prefix_end};
use common::moto;
use proptest::prelude::*;

/// Where a check runs: a backend in a local directory, or SlateDB in a bucket
/// of the test binary's moto server.
#[derive(Debug, Clone, Copy)]
enum Target {
    Local(BackendKind),
    S3,
}

impl Target {
    fn kind(self) -> BackendKind {
        match self {
            Target::Local(kind) => kind,
            Target::S3 => BackendKind::SlateDb,
        }
    }
}

/// Opens the store of `dir`: on S3, at a prefix named after the (unique)
/// temporary directory, so a reopen finds the same store.
fn open(target: Target, dir: &Path) -> Box<dyn MetaStore> {
    match target {
        Target::Local(kind) => meta::open(kind, dir),
        Target::S3 => {
            meta::open_object_store(moto::bucket(), &s3_prefix(dir), &meta::OpenOptions::new())
        }
    }
    .unwrap_or_else(|e| panic!("open {target:?}: {e:?}"))
}

fn s3_prefix(dir: &Path) -> String {
    format!("conformance/{}", dir.file_name().unwrap().to_str().unwrap())
}

fn commit(store: &dyn MetaStore, ops: &[(&[u8], Option<&[u8]>)]) {
    let mut batch = Batch::new();
    for (key, value) in ops {
        match value {
            Some(value) => batch.put(*key, *value),
            None => batch.delete(*key),
        }
    }
    store.commit(&batch).unwrap();
}

fn scan_all(store: &dyn MetaStore, start: &[u8], end: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .scan(start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
    out
}

fn prefix_all(store: &dyn MetaStore, prefix: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    store
        .scan_prefix(prefix, &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .unwrap();
    out
}

fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[u8]> {
    pairs.iter().map(|(k, _)| k.as_slice()).collect()
}

fn get_put_delete(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    assert_eq!(store.backend(), kind.kind());
    assert_eq!(store.get(b"a").unwrap(), None);
    commit(&*store, &[(b"a", Some(b"1")), (b"b", Some(b"2"))]);
    assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(store.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
    commit(&*store, &[(b"a", None), (b"b", Some(b"3"))]);
    assert_eq!(store.get(b"a").unwrap(), None);
    assert_eq!(store.get(b"b").unwrap().as_deref(), Some(&b"3"[..]));
    // Empty keys and empty values are ordinary.
    commit(&*store, &[(b"", Some(b"")), (b"c", Some(b""))]);
    assert_eq!(store.get(b"").unwrap().as_deref(), Some(&b""[..]));
    assert_eq!(store.get(b"c").unwrap().as_deref(), Some(&b""[..]));
}

fn last_write_in_batch_wins(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    commit(
        &*store,
        &[
            (b"k", Some(b"1")),
            (b"k", Some(b"2")),
            (b"d", Some(b"x")),
            (b"d", None),
            (b"r", None),
            (b"r", Some(b"back")),
        ],
    );
    assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(store.get(b"d").unwrap(), None);
    assert_eq!(store.get(b"r").unwrap().as_deref(), Some(&b"back"[..]));
}

fn delete_absent_key(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    commit(&*store, &[(b"never", None)]);
    assert_eq!(store.get(b"never").unwrap(), None);
    commit(&*store, &[(b"a", Some(b"1")), (b"never", None)]);
    assert_eq!(
        scan_all(&*store, b"", None),
        vec![(b"a".to_vec(), b"1".to_vec())]
    );
}

fn scan_bounds(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    let all: [&[u8]; 7] = [b"", b"a", b"ab", b"b", b"ba", b"c", b"\xff"];
    let mut batch = Batch::new();
    for k in all {
        batch.put(k, k.to_vec());
    }
    store.commit(&batch).unwrap();

    let everything = scan_all(&*store, b"", None);
    assert_eq!(keys(&everything), all.to_vec());
    for (k, v) in &everything {
        assert_eq!(k, v);
    }
    // Start inclusive, end exclusive.
    assert_eq!(
        keys(&scan_all(&*store, b"a", Some(b"b"))),
        vec![&b"a"[..], b"ab"]
    );
    assert_eq!(
        keys(&scan_all(&*store, b"aa", Some(b"ba"))),
        vec![&b"ab"[..], b"b"]
    );
    // No upper bound.
    assert_eq!(
        keys(&scan_all(&*store, b"ba", None)),
        vec![&b"ba"[..], b"c", b"\xff"]
    );
    // Start past every key, empty and inverted ranges.
    assert!(scan_all(&*store, b"\xff\x00", None).is_empty());
    assert!(scan_all(&*store, b"b", Some(b"b")).is_empty());
    assert!(scan_all(&*store, b"c", Some(b"a")).is_empty());
    // Early stop: the visitor sees exactly as many pairs as it accepts.
    let mut seen = Vec::new();
    store
        .scan(b"", None, &mut |k, _| {
            seen.push(k.to_vec());
            seen.len() < 3
        })
        .unwrap();
    assert_eq!(seen, vec![b"".to_vec(), b"a".to_vec(), b"ab".to_vec()]);
}

fn scan_prefix_edges(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    let all: [&[u8]; 10] = [
        b"\x00",
        b"a",
        b"a\x00",
        b"a\xff",
        b"a\xff\xff",
        b"b",
        b"\xfe\xff",
        b"\xff",
        b"\xff\x00",
        b"\xff\xff",
    ];
    let mut batch = Batch::new();
    for k in all {
        batch.put(k, b"v".to_vec());
    }
    store.commit(&batch).unwrap();

    assert_eq!(prefix_all(&*store, b"").len(), all.len());
    assert_eq!(
        prefix_all(&*store, b"a"),
        vec![
            b"a".to_vec(),
            b"a\x00".to_vec(),
            b"a\xff".to_vec(),
            b"a\xff\xff".to_vec()
        ]
    );
    assert_eq!(
        prefix_all(&*store, b"a\xff"),
        vec![b"a\xff".to_vec(), b"a\xff\xff".to_vec()]
    );
    assert_eq!(prefix_all(&*store, b"\xfe"), vec![b"\xfe\xff".to_vec()]);
    assert_eq!(
        prefix_all(&*store, b"\xff"),
        vec![b"\xff".to_vec(), b"\xff\x00".to_vec(), b"\xff\xff".to_vec()]
    );
    assert_eq!(prefix_all(&*store, b"\xff\xff"), vec![b"\xff\xff".to_vec()]);
    assert!(prefix_all(&*store, b"\xff\xff\xff").is_empty());
    assert!(prefix_all(&*store, b"c").is_empty());

    assert_eq!(prefix_end(b""), None);
    assert_eq!(prefix_end(b"\xff\xff"), None);
    assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
    assert_eq!(prefix_end(b"a\x00"), Some(b"a\x01".to_vec()));
}

fn empty_batch(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    store.commit(&Batch::new()).unwrap();
    commit(&*store, &[(b"a", Some(b"1"))]);
    store.commit(&Batch::new()).unwrap();
    assert_eq!(scan_all(&*store, b"", None).len(), 1);
}

fn large_batch(kind: Target) {
    const KEYS: u32 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    let value = |i: u32| {
        let mut v = vec![(i % 251) as u8; 64];
        v[..4].copy_from_slice(&i.to_be_bytes());
        v
    };
    let mut batch = Batch::new();
    for i in 0..KEYS {
        batch.put(format!("blk/{i:08}"), value(i));
    }
    store.commit(&batch).unwrap();
    drop(store);

    let store = open(kind, dir.path());
    let mut count = 0u32;
    store
        .scan_prefix(b"blk/", &mut |k, v| {
            assert_eq!(k, format!("blk/{count:08}").as_bytes());
            assert_eq!(v, value(count).as_slice());
            count += 1;
            true
        })
        .unwrap();
    assert_eq!(count, KEYS);

    // Delete every other key in one batch.
    let mut batch = Batch::new();
    for i in (0..KEYS).step_by(2) {
        batch.delete(format!("blk/{i:08}"));
    }
    store.commit(&batch).unwrap();
    let mut count = 0u32;
    store
        .scan_prefix(b"blk/", &mut |k, _| {
            assert_eq!(k, format!("blk/{:08}", 2 * count + 1).as_bytes());
            count += 1;
            true
        })
        .unwrap();
    assert_eq!(count, KEYS / 2);
}

fn large_values(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 31 % 256) as u8).collect();
    let mut other = big.clone();
    other.reverse();
    let mut batch = Batch::new();
    batch.put(b"big/1", big.clone());
    batch.put(b"big/2", other.clone());
    batch.put(b"small", b"s".to_vec());
    store.commit(&batch).unwrap();
    drop(store);

    let store = open(kind, dir.path());
    assert_eq!(
        store.get(b"big/1").unwrap().as_deref(),
        Some(big.as_slice())
    );
    assert_eq!(
        store.get(b"big/2").unwrap().as_deref(),
        Some(other.as_slice())
    );
    // Overwrite a large value with a small one and back.
    commit(&*store, &[(b"big/1", Some(b"tiny"))]);
    assert_eq!(store.get(b"big/1").unwrap().as_deref(), Some(&b"tiny"[..]));
    let mut batch = Batch::new();
    batch.put(b"big/1", big.clone());
    store.commit(&batch).unwrap();
    assert_eq!(
        store.get(b"big/1").unwrap().as_deref(),
        Some(big.as_slice())
    );
}

fn persists_across_reopen(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(kind, dir.path());
        commit(&*store, &[(b"a", Some(b"1")), (b"b", Some(b"2"))]);
        commit(&*store, &[(b"a", None), (b"c", Some(b"3"))]);
    }
    let store = open(kind, dir.path());
    assert_eq!(
        scan_all(&*store, b"", None),
        vec![
            (b"b".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), b"3".to_vec())
        ]
    );
    commit(&*store, &[(b"d", Some(b"4"))]);
    drop(store);
    let store = open(kind, dir.path());
    assert_eq!(store.get(b"d").unwrap().as_deref(), Some(&b"4"[..]));
}

fn exclusive_lock(kind: Target) {
    if let Target::S3 = kind {
        return second_writer_fences_the_first();
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, dir.path());
    commit(&*store, &[(b"a", Some(b"1"))]);
    for other in [BackendKind::Sled, BackendKind::Redb, BackendKind::SlateDb] {
        match meta::open(other, dir.path()) {
            Err(MetaError::Locked { path }) => {
                assert!(path.contains(dir.path().file_name().unwrap().to_str().unwrap()))
            }
            Err(e) => panic!("second open ({other:?}) failed with {e:?}, not Locked"),
            Ok(_) => panic!("second open ({other:?}) succeeded while the store is open"),
        }
    }
    // The first handle still works after the refused opens.
    assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    drop(store);
    // Open and close a few times in a row: nothing lingers after a drop.
    for _ in 0..5 {
        let store = open(kind, dir.path());
        assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    }
}

/// In a bucket there is no lock to refuse a second process: the second
/// writer fences the first, whose commits fail from then on, and it sees
/// everything the first committed.
fn second_writer_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(Target::S3, dir.path());
    commit(&*first, &[(b"a", Some(b"1"))]);
    let second = open(Target::S3, dir.path());
    assert_eq!(second.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    let mut batch = Batch::new();
    batch.put(b"b".to_vec(), b"from the fenced writer".to_vec());
    match first.commit(&batch) {
        Err(MetaError::Backend { .. }) => {}
        other => panic!("a fenced writer's commit returned {other:?}"),
    }
    // The fenced store refuses every later call.
    assert!(first.commit(&batch).is_err());
    assert!(first.get(b"a").is_err());
    commit(&*second, &[(b"c", Some(b"3"))]);
    assert_eq!(second.get(b"b").unwrap(), None);
    drop((first, second));
    let again = open(Target::S3, dir.path());
    assert_eq!(again.get(b"b").unwrap(), None);
    assert_eq!(again.get(b"c").unwrap().as_deref(), Some(&b"3"[..]));
}

fn concurrent_readers_and_writer(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn MetaStore> = open(kind, dir.path()).into();
    std::thread::scope(|s| {
        let writer = store.clone();
        s.spawn(move || {
            for i in 0u32..200 {
                let mut batch = Batch::new();
                batch.put(b"x", i.to_be_bytes().to_vec());
                batch.put(b"y", i.to_be_bytes().to_vec());
                writer.commit(&batch).unwrap();
            }
        });
        for _ in 0..2 {
            let reader = store.clone();
            s.spawn(move || {
                for _ in 0..500 {
                    let pairs = scan_all(&*reader, b"x", Some(b"z"));
                    if pairs.len() == 2 {
                        // A scan never sees part of a batch: both keys agree.
                        assert_eq!(pairs[0].1, pairs[1].1);
                    }
                }
            });
        }
    });
    assert_eq!(
        store.get(b"x").unwrap(),
        Some(199u32.to_be_bytes().to_vec())
    );
}

/// A batch that replaces keys by others (as a volume commit replaces extent
/// records by their pieces) is never seen half done by a concurrent scan: every
/// scan finds all the keys of exactly one generation.
fn scan_never_sees_part_of_a_batch(kind: Target) {
    const KEYS: u32 = 64;
    let key = |slot: u32, generation: u32| format!("m/{slot:03}/{generation:05}").into_bytes();
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn MetaStore> = open(kind, dir.path()).into();
    let mut first = Batch::new();
    for slot in 0..KEYS {
        first.put(key(slot, 0), b"v".to_vec());
    }
    store.commit(&first).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = store.clone();
        let done = &done;
        s.spawn(move || {
            for generation in 0u32..150 {
                let mut batch = Batch::new();
                for slot in 0..KEYS {
                    batch.delete(key(slot, generation));
                    batch.put(key(slot, generation + 1), b"v".to_vec());
                }
                writer.commit(&batch).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        for _ in 0..2 {
            let reader = store.clone();
            s.spawn(move || {
                let mut scans = 0u64;
                while !done.load(std::sync::atomic::Ordering::SeqCst) || scans < 100 {
                    let found = prefix_all(&*reader, b"m/");
                    let generations: std::collections::BTreeSet<&[u8]> =
                        found.iter().map(|k| &k[6..]).collect();
                    assert!(
                        found.len() == KEYS as usize && generations.len() == 1,
                        "a scan saw {} keys of {} generations",
                        found.len(),
                        generations.len()
                    );
                    scans += 1;
                }
            });
        }
    });
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Step {
    Commit(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    Reopen,
}

fn small_key() -> impl Strategy<Value = Vec<u8>> {
    // A small alphabet with edge bytes, so keys collide and prefixes nest.
    prop::collection::vec(
        prop::sample::select(vec![0u8, 1, b'a', b'b', 0xfe, 0xff]),
        0..4,
    )
}

fn step() -> impl Strategy<Value = Step> {
    let op = (
        small_key(),
        prop::option::weighted(0.7, prop::collection::vec(any::<u8>(), 0..24)),
    );
    prop_oneof![
        8 => prop::collection::vec(op, 0..12).prop_map(Step::Commit),
        1 => Just(Step::Reopen),
    ]
}

fn check_against_model(store: &dyn MetaStore, model: &BTreeMap<Vec<u8>, Vec<u8>>, probe: &[u8]) {
    let expected: Vec<(Vec<u8>, Vec<u8>)> =
        model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(scan_all(store, b"", None), expected);
    // A prefix scan and a point read at a key drawn from the steps.
    let expected: Vec<Vec<u8>> = model
        .keys()
        .filter(|k| k.starts_with(probe))
        .cloned()
        .collect();
    assert_eq!(prefix_all(store, probe), expected);
    assert_eq!(store.get(probe).unwrap().as_ref(), model.get(probe));
}

fn model(kind: Target, steps: Vec<Step>, probe: Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(kind, dir.path());
    let mut model = BTreeMap::new();
    for step in steps {
        match step {
            Step::Commit(ops) => {
                let mut batch = Batch::new();
                for (key, value) in ops {
                    match value {
                        Some(value) => {
                            model.insert(key.clone(), value.clone());
                            batch.put(key, value);
                        }
                        None => {
                            model.remove(&key);
                            batch.delete(key);
                        }
                    }
                }
                store.commit(&batch).unwrap();
            }
            Step::Reopen => {
                drop(store);
                store = open(kind, dir.path());
            }
        }
        check_against_model(&*store, &model, &probe);
    }
    drop(store);
    let store = open(kind, dir.path());
    check_against_model(&*store, &model, &probe);
}

macro_rules! conformance {
    ($($backend:ident => $kind:expr),* $(,)?) => {$(
        mod $backend {
            use super::*;

            #[test]
            fn get_put_delete() { super::get_put_delete($kind) }
            #[test]
            fn last_write_in_batch_wins() { super::last_write_in_batch_wins($kind) }
            #[test]
            fn delete_absent_key() { super::delete_absent_key($kind) }
            #[test]
            fn scan_bounds() { super::scan_bounds($kind) }
            #[test]
            fn scan_prefix_edges() { super::scan_prefix_edges($kind) }
            #[test]
            fn empty_batch() { super::empty_batch($kind) }
            #[test]
            fn large_batch() { super::large_batch($kind) }
            #[test]
            fn large_values() { super::large_values($kind) }
            #[test]
            fn persists_across_reopen() { super::persists_across_reopen($kind) }
            #[test]
            fn exclusive_lock() { super::exclusive_lock($kind) }
            #[test]
            fn concurrent_readers_and_writer() { super::concurrent_readers_and_writer($kind) }
            #[test]
            fn scan_never_sees_part_of_a_batch() { super::scan_never_sees_part_of_a_batch($kind) }

            proptest! {
                // Each case opens real files and fsyncs every batch: keep it modest.
                #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
                #[test]
                fn model(steps in prop::collection::vec(step(), 1..40), probe in small_key()) {
                    super::model($kind, steps, probe);
                }
            }
        }
    )*};
}

conformance! {
    sled => Target::Local(BackendKind::Sled),
    redb => Target::Local(BackendKind::Redb),
    slatedb => Target::Local(BackendKind::SlateDb),
    slatedb_s3 => Target::S3,
}
