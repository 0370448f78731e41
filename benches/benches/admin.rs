//! Store administration at deployment scale: `Store::rotate_master` over 5000
//! tenants with one volume each (the sizing the product is built for), per
//! metadata backend. One rotation rewraps 5000 data keys and commits them with
//! the new header in one batch; the target is well under a second.
//!
//! The store lives in `/dev/shm` when it exists (tmpfs), else in the system
//! temporary directory. Building the 5000 tenants takes a few seconds per
//! backend before the timed loop.
//!
//! ```text
//! cargo bench -p blockseal-benches --bench admin -- --warm-up-time 1 --measurement-time 5
//! ```
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::path::{Path, PathBuf};

use blockseal_keys::{MasterKey, TenantId, VolumeId};
use blockseal_volume::meta::BackendKind;
use blockseal_volume::{Store, StoreOptions, VolumeOptions};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group};

const TENANTS: usize = 5000;
const BACKENDS: [BackendKind; 2] = [BackendKind::Redb, BackendKind::Sled];

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn rotate_master(c: &mut Criterion) {
    let mut group = c.benchmark_group("rotate_master");
    group.sample_size(10);
    for backend in BACKENDS {
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
        let volume = VolumeId::new("vm").expect("valid name");
        for n in 0..TENANTS {
            let tenant = TenantId::new(&format!("tenant{n}")).expect("valid name");
            store.create_tenant(&tenant).expect("a new tenant");
            store
                .create_volume(&tenant, &volume, 1 << 20, VolumeOptions::default())
                .expect("a new volume");
        }
        group.bench_function(
            BenchmarkId::new(format!("{backend:?}"), format!("{TENANTS} tenants")),
            |b| {
                b.iter_batched(
                    || MasterKey::generate().expect("system RNG"),
                    |key| store.rotate_master(key).expect("the rotation succeeds"),
                    BatchSize::PerIteration,
                );
            },
        );
    }
    group.finish();
}

criterion_group!(benches, rotate_master);

fn main() {
    eprintln!("admin benches: stores in {}", scratch_root().display());
    benches();
    Criterion::default().configure_from_args().final_summary();
}
