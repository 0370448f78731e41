//! The sealed-block hot path next to raw ring, plus the per-key costs around it.
//!
//! `seal_4k` and `open_4k` each hold two functions over the same 4 KiB buffer in
//! the same run: `blockseal` (our `BlockCipher`, 28 bytes of associated data) and
//! `ring` (raw AES-256-GCM with empty associated data), the reference our path
//! is held to (target: at least 0.9x its throughput). `nonce` and `keys` time
//! the counter behind every seal and the per-tenant and per-volume key work.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;

use blockseal_keys::{
    DataKey, DeploymentSalt, KeyVersion, MasterKey, TenantId, TenantSeed, VolumeId,
};
use blockseal_volume::{BlockCipher, BlockSize, Lba, Nonce};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{self, AES_256_GCM, Aad, LessSafeKey, UnboundKey};

const BLOCK: usize = BlockSize::DEFAULT.len();

struct Fixture {
    ours: BlockCipher,
    raw: LessSafeKey,
}

fn fixture() -> Fixture {
    let dek = DataKey::generate(KeyVersion::FIRST).expect("system RNG");
    let raw =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, dek.expose_secret()).expect("32-byte key"));
    let ours = BlockCipher::new(
        &TenantId::new("acme").expect("valid name"),
        &VolumeId::new("voicemail").expect("valid name"),
        &dek,
    );
    Fixture { ours, raw }
}

fn nonce() -> Nonce {
    blockseal_volume::nonce::nonce_for(7)
}

fn seal(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("seal_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("blockseal", |b| {
        let mut buf = vec![0x5A; BLOCK];
        let n = nonce();
        b.iter(|| {
            black_box(
                f.ours
                    .seal_in_place(black_box(Lba(42)), &n, black_box(&mut buf)),
            )
        });
    });
    g.bench_function("ring", |b| {
        let mut buf = vec![0x5A; BLOCK];
        let n = nonce();
        b.iter(|| {
            black_box(
                f.raw
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(*n.as_bytes()),
                        Aad::empty(),
                        black_box(&mut buf),
                    )
                    .expect("a 4 KiB block seals"),
            )
        });
    });
    g.finish();
}

fn open(c: &mut Criterion) {
    let f = fixture();
    let n = nonce();
    let plaintext = vec![0x5A; BLOCK];

    let mut ours_sealed = plaintext.clone();
    let ours_tag = f.ours.seal_in_place(Lba(42), &n, &mut ours_sealed);
    let mut raw_sealed = plaintext.clone();
    let raw_tag = f
        .raw
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(*n.as_bytes()),
            Aad::empty(),
            &mut raw_sealed,
        )
        .expect("a 4 KiB block seals");
    let raw_tag: [u8; 16] = raw_tag.as_ref().try_into().expect("16-byte tag");

    // Each iteration opens a fresh copy of the ciphertext; the copy is not timed.
    let mut g = c.benchmark_group("open_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("blockseal", |b| {
        b.iter_batched_ref(
            || ours_sealed.clone(),
            |buf| {
                f.ours
                    .open_in_place(black_box(Lba(42)), &n, &ours_tag, buf)
                    .expect("genuine block opens")
            },
            BatchSize::SmallInput,
        );
    });
    g.bench_function("ring", |b| {
        b.iter_batched_ref(
            || raw_sealed.clone(),
            |buf| {
                f.raw
                    .open_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(*n.as_bytes()),
                        Aad::empty(),
                        aead::Tag::from(raw_tag),
                        buf,
                        0..,
                    )
                    .map(|_| ())
                    .expect("genuine block opens")
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

/// The per-key operations: they run per tenant or volume attach, not per block.
fn keys(c: &mut Criterion) {
    let master = MasterKey::generate().expect("system RNG");
    let salt = DeploymentSalt::generate().expect("system RNG");
    let seed = TenantSeed::generate().expect("system RNG");
    let tenant = TenantId::new("acme").expect("valid name");
    let volume = VolumeId::new("voicemail").expect("valid name");
    let kek = master.tenant_kek(&salt, &tenant, &seed, KeyVersion::FIRST);
    let dek = DataKey::generate(KeyVersion::FIRST).expect("system RNG");
    let wrapped = kek.wrap(&volume, &dek).expect("system RNG");

    let mut g = c.benchmark_group("keys");
    g.bench_function("tenant_kek", |b| {
        b.iter(|| {
            master.tenant_kek(
                black_box(&salt),
                black_box(&tenant),
                &seed,
                KeyVersion::FIRST,
            )
        })
    });
    g.bench_function("wrap_dek", |b| {
        b.iter(|| kek.wrap(black_box(&volume), &dek).expect("system RNG"))
    });
    g.bench_function("unwrap_dek", |b| {
        b.iter(|| {
            kek.unwrap(black_box(&volume), black_box(&wrapped))
                .expect("genuine wrapped key")
        })
    });
    g.bench_function("block_cipher_new", |b| {
        b.iter(|| BlockCipher::new(black_box(&tenant), black_box(&volume), &dek))
    });
    // Once per open of a volume that writes (and per 2^32 seals).
    let salt = DataKey::generate_writer_salt().expect("system RNG");
    g.bench_function("writer_key", |b| {
        b.iter(|| {
            let key = dek.derive_writer_key(black_box(7), &salt);
            BlockCipher::new(&tenant, &volume, &key)
        })
    });
    g.finish();
}

criterion_group!(benches, seal, open, keys);
criterion_main!(benches);
