//! The volume I/O path next to the raw seal/open cost of the same bytes.
//!
//! Each group holds, in the same run, the raw `BlockCipher` seal (or open) of
//! the bytes one request carries, then the same request through a [`Volume`] on
//! a file-backed store for both metadata backends: 4 KiB random writes and reads
//! and 1 MiB sequential writes and reads over a 256 MiB volume. Write groups
//! also have a variant that flushes every N requests, so the cost of group
//! commit shows. The store lives in `/dev/shm` when it exists (tmpfs: syncs
//! are nearly free, so the figures are CPU-bound), else in the system temporary
//! directory; the bench prints which. Background compaction is off, so that
//! only the request path is timed.
//!
//! Before the timed groups, the bench prints the metadata bytes per data byte of
//! a 256 MiB volume written fully, sequentially in 128 KiB writes and randomly
//! in 4 KiB writes (every block once, in random order), per backend: the record
//! bytes the volume committed (`VolumeStats::metadata_bytes`) and the metadata
//! store's size on disk. Set `BLOCKSEAL_BENCH_OVERHEAD=0` to skip it, or
//! `BLOCKSEAL_BENCH_OVERHEAD_MIB=2048` to measure a 2 GiB volume as well (a
//! commit of scattered blocks rewrites most of a small volume's metadata pages,
//! so a copy-on-write store's file holds up to two spare copies of them; a
//! larger volume shows the steady state).
//!
//! ```text
//! cargo bench -p blockseal-benches --bench volume -- --warm-up-time 1 --measurement-time 3
//! ```
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;
use std::path::{Path, PathBuf};

use blockseal_keys::{DataKey, KeyVersion, MasterKey, TenantId, VolumeId};
use blockseal_volume::meta::BackendKind;
use blockseal_volume::{BlockCipher, Lba, Store, StoreOptions, Volume, VolumeOptions};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};

const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;
/// The benchmarked volume: 256 MiB.
const VOLUME_BYTES: u64 = 256 << 20;
const BACKENDS: [BackendKind; 2] = [BackendKind::Redb, BackendKind::Sled];

/// Where stores are created: tmpfs when the host has one.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn backend_name(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Redb => "redb",
        BackendKind::Sled => "sled",
        _ => "other",
    }
}

/// A store in a temporary directory with one volume of [`VOLUME_BYTES`] (or
/// the size given to [`Fixture::sized`]).
struct Fixture {
    volume: Volume,
    _store: Store,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(backend: BackendKind) -> Fixture {
        Fixture::sized(backend, VOLUME_BYTES)
    }

    fn sized(backend: BackendKind, bytes: u64) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("blockseal-bench-")
            .tempdir_in(scratch_root())
            .expect("a scratch directory");
        let options = StoreOptions::new()
            .backend(backend)
            .background_compaction(false);
        let store = Store::create(
            dir.path(),
            MasterKey::generate().expect("system RNG"),
            options,
        )
        .expect("a new store");
        let tenant = TenantId::new("acme").expect("valid name");
        let name = VolumeId::new("bench").expect("valid name");
        store.create_tenant(&tenant).expect("a new tenant");
        store
            .create_volume(&tenant, &name, bytes, VolumeOptions::default())
            .expect("a new volume");
        let volume = store.open_volume(&tenant, &name).expect("the volume opens");
        Fixture {
            volume,
            _store: store,
            dir,
        }
    }

    /// Writes the whole volume sequentially in 1 MiB writes and flushes.
    fn populated(backend: BackendKind) -> Fixture {
        let f = Fixture::new(backend);
        let data = vec![0x5A; MIB];
        for n in 0..VOLUME_BYTES / MIB as u64 {
            f.volume
                .write_at(n * MIB as u64, &data)
                .expect("write succeeds");
        }
        f.volume.flush().expect("flush succeeds");
        f
    }
}

/// A cheap deterministic generator (xorshift64): the timed loop should not
/// measure a heavyweight RNG.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn cipher() -> BlockCipher {
    BlockCipher::new(
        &TenantId::new("acme").expect("valid name"),
        &VolumeId::new("bench").expect("valid name"),
        &DataKey::generate(KeyVersion::FIRST).expect("system RNG"),
    )
}

/// Seals `len` bytes block by block, as a write of that size does.
fn bench_raw_seal(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    len: usize,
) {
    let cipher = cipher();
    let nonce = blockseal_volume::nonce::nonce_for(7);
    let mut buf = vec![0x5A; len];
    c.bench_function("raw_seal", |b| {
        b.iter(|| {
            for (k, block) in buf.chunks_mut(BLOCK).enumerate() {
                black_box(cipher.seal_in_place(Lba(k as u64), &nonce, block));
            }
        })
    });
}

/// Opens `len` bytes block by block, as a read of that size does.
fn bench_raw_open(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    len: usize,
) {
    let cipher = cipher();
    let nonce = blockseal_volume::nonce::nonce_for(7);
    let plaintext = vec![0x5A; len];
    let mut sealed = plaintext.clone();
    let tags: Vec<_> = sealed
        .chunks_mut(BLOCK)
        .enumerate()
        .map(|(k, block)| cipher.seal_in_place(Lba(k as u64), &nonce, block))
        .collect();
    let mut buf = sealed.clone();
    c.bench_function("raw_open", |b| {
        b.iter(|| {
            // Opening in place leaves plaintext: restore the ciphertext first
            // (a memcpy, small next to AES-GCM, and a read copies too).
            buf.copy_from_slice(&sealed);
            for (k, block) in buf.chunks_mut(BLOCK).enumerate() {
                cipher
                    .open_in_place(Lba(k as u64), &nonce, &tags[k], block)
                    .expect("genuine block opens");
            }
        })
    });
}

fn random_write_4k(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_4k_random");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    bench_raw_seal(&mut g, BLOCK);
    let blocks = VOLUME_BYTES / BLOCK as u64;
    for backend in BACKENDS {
        for flush_every in [0u64, 32] {
            let f = Fixture::new(backend);
            let data = vec![0x5A; BLOCK];
            let variant = if flush_every == 0 {
                "no_flush".to_string()
            } else {
                format!("flush_per_{flush_every}")
            };
            g.bench_function(BenchmarkId::new(backend_name(backend), variant), |b| {
                let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
                let mut n = 0u64;
                b.iter(|| {
                    let lba = rng.below(blocks);
                    f.volume
                        .write_at(lba * BLOCK as u64, &data)
                        .expect("write succeeds");
                    n += 1;
                    if flush_every != 0 && n.is_multiple_of(flush_every) {
                        f.volume.flush().expect("flush succeeds");
                    }
                })
            });
            drop(f);
        }
    }
    g.finish();
}

fn random_read_4k(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_4k_random");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    bench_raw_open(&mut g, BLOCK);
    let blocks = VOLUME_BYTES / BLOCK as u64;
    for backend in BACKENDS {
        let f = Fixture::populated(backend);
        let mut buf = vec![0u8; BLOCK];
        g.bench_function(backend_name(backend), |b| {
            let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
            b.iter(|| {
                let lba = rng.below(blocks);
                f.volume
                    .read_at(lba * BLOCK as u64, &mut buf)
                    .expect("read succeeds");
            })
        });
    }
    g.finish();
}

fn sequential_write_1m(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_1m_sequential");
    g.throughput(Throughput::Bytes(MIB as u64));
    bench_raw_seal(&mut g, MIB);
    let chunks = VOLUME_BYTES / MIB as u64;
    for backend in BACKENDS {
        for flush_every in [0u64, 1] {
            let f = Fixture::new(backend);
            let data = vec![0x5A; MIB];
            let variant = if flush_every == 0 {
                "no_flush".to_string()
            } else {
                format!("flush_per_{flush_every}")
            };
            g.bench_function(BenchmarkId::new(backend_name(backend), variant), |b| {
                let mut n = 0u64;
                b.iter(|| {
                    f.volume
                        .write_at((n % chunks) * MIB as u64, &data)
                        .expect("write succeeds");
                    n += 1;
                    if flush_every != 0 && n.is_multiple_of(flush_every) {
                        f.volume.flush().expect("flush succeeds");
                    }
                })
            });
            drop(f);
        }
    }
    g.finish();
}

fn sequential_read_1m(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_1m_sequential");
    g.throughput(Throughput::Bytes(MIB as u64));
    bench_raw_open(&mut g, MIB);
    let chunks = VOLUME_BYTES / MIB as u64;
    for backend in BACKENDS {
        let f = Fixture::populated(backend);
        let mut buf = vec![0u8; MIB];
        g.bench_function(backend_name(backend), |b| {
            let mut n = 0u64;
            b.iter(|| {
                f.volume
                    .read_at((n % chunks) * MIB as u64, &mut buf)
                    .expect("read succeeds");
                n += 1;
            })
        });
    }
    g.finish();
}

/// Bytes a directory tree takes: apparent length and allocated blocks.
fn tree_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for entry in std::fs::read_dir(path).expect("a readable directory") {
        let entry = entry.expect("a readable entry");
        let meta = entry.metadata().expect("metadata");
        let (len, blocks) = if meta.is_dir() {
            tree_size(&entry.path())
        } else {
            (meta.len(), meta.blocks() * 512)
        };
        total.0 += len;
        total.1 += blocks;
    }
    total
}

/// Prints metadata bytes per data byte for a fully written volume.
fn metadata_overhead() {
    if std::env::var("BLOCKSEAL_BENCH_OVERHEAD").as_deref() == Ok("0") {
        return;
    }
    let mut sizes = vec![VOLUME_BYTES];
    if let Some(mib) = std::env::var("BLOCKSEAL_BENCH_OVERHEAD_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        sizes.push(mib << 20);
    }
    for volume_bytes in sizes {
        eprintln!(
            "metadata overhead, {} MiB volume written fully, store in {}:",
            volume_bytes >> 20,
            scratch_root().display()
        );
        for backend in BACKENDS {
            for random in [false, true] {
                overhead_of(backend, random, volume_bytes);
            }
        }
    }
}

fn overhead_of(backend: BackendKind, random: bool, volume_bytes: u64) {
    let blocks = volume_bytes / BLOCK as u64;
    let f = Fixture::sized(backend, volume_bytes);
    let started = std::time::Instant::now();
    if random {
        // Every block once, in random order (Fisher-Yates).
        let mut order: Vec<u64> = (0..blocks).collect();
        let mut rng = Xorshift(0x1234_5678_9abc_def1);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let data = vec![0x5A; BLOCK];
        for (n, lba) in order.into_iter().enumerate() {
            f.volume
                .write_at(lba * BLOCK as u64, &data)
                .expect("write succeeds");
            if n % 1024 == 1023 {
                f.volume.flush().expect("flush succeeds");
            }
        }
    } else {
        let data = vec![0x5A; 32 * BLOCK];
        for n in 0..blocks / 32 {
            f.volume
                .write_at(n * 32 * BLOCK as u64, &data)
                .expect("write succeeds");
            if n % 32 == 31 {
                f.volume.flush().expect("flush succeeds");
            }
        }
    }
    f.volume.flush().expect("flush succeeds");
    let elapsed = started.elapsed();
    let records = f.volume.stats().metadata_bytes;
    let Fixture {
        volume,
        _store: store,
        dir,
    } = f;
    drop((volume, store));
    let mut held = 0u64;
    blockseal_volume::meta::open(backend, &dir.path().join("meta"))
        .expect("the metadata store opens")
        .scan_prefix(b"", &mut |key, value| {
            held += (key.len() + value.len()) as u64;
            true
        })
        .expect("a scan");
    let (len, allocated) = tree_size(&dir.path().join("meta"));
    let pct = |bytes: u64| bytes as f64 / volume_bytes as f64 * 100.0;
    eprintln!(
        "  {:<4} {:<18} held {:>10} B ({:.3}%), written {:>11} B ({:.3}%), store on disk {:>10} B ({:.3}%), allocated {:>10} B ({:.3}%), {:.1?}",
        backend_name(backend),
        if random {
            "random 4 KiB"
        } else {
            "sequential 128 KiB"
        },
        held,
        pct(held),
        records,
        pct(records),
        len,
        pct(len),
        allocated,
        pct(allocated),
        elapsed
    );
}

criterion_group!(
    benches,
    random_write_4k,
    random_read_4k,
    sequential_write_1m,
    sequential_read_1m
);

fn main() {
    eprintln!("volume benches: stores in {}", scratch_root().display());
    metadata_overhead();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
