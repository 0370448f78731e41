//! The test-support moto server, with object-store clients of its bucket.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::sync::Arc;

pub use blockseal_test_support::moto::{BUCKET, moto, unique_prefix};
use blockseal_test_support::moto::{CREDENTIAL, REGION};
use blockseal_volume::object::{self, S3Options};
use zeroize::Zeroizing;

/// A client of [`BUCKET`] on the moto server at `endpoint` (this process's,
/// or another's, for a child the test started).
pub fn store_at(endpoint: &str) -> Arc<dyn object_store::ObjectStore> {
    let options = S3Options::new(
        BUCKET,
        REGION,
        CREDENTIAL,
        Zeroizing::new(CREDENTIAL.into()),
    )
    .endpoint(endpoint);
    object::s3(&options).expect("an S3 client")
}

/// A client of [`BUCKET`] on this process's moto server.
pub fn bucket() -> Arc<dyn object_store::ObjectStore> {
    store_at(&moto().endpoint)
}

/// Every object under `prefix` in `store`.
pub fn list_paths(
    store: &Arc<dyn object_store::ObjectStore>,
    prefix: &str,
) -> Vec<object_store::path::Path> {
    let store = Arc::clone(store);
    let prefix = object_store::path::Path::from(prefix);
    runtime().block_on(async move {
        let mut paths = Vec::new();
        let mut pending = vec![prefix];
        while let Some(dir) = pending.pop() {
            let listing = store.list_with_delimiter(Some(&dir)).await.unwrap();
            paths.extend(listing.objects.into_iter().map(|o| o.location));
            pending.extend(listing.common_prefixes);
        }
        paths
    })
}

/// Deletes the objects at `paths`.
pub fn delete_paths(
    store: &Arc<dyn object_store::ObjectStore>,
    paths: &[object_store::path::Path],
) {
    use object_store::ObjectStoreExt;
    let store = Arc::clone(store);
    let paths = paths.to_vec();
    runtime().block_on(async move {
        for path in &paths {
            store.delete(path).await.unwrap();
        }
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
