//! An `ObjectStore` that passes every request to another one, except those
//! a test tells it to fail, delay or hold (a request stuck in a connection
//! that never answers, until the test releases it).
#![allow(dead_code, unreachable_pub)]

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::Notify;

/// What happens to the requests the fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passed on.
    None,
    /// Fails at once (a 500 from the service).
    Fail,
    /// Waits this long, then is passed on.
    Delay(Duration),
    /// Waits until [`FaultyStore::release`], then is passed on.
    Stuck,
}

/// A wrapper around `inner` injecting [`Fault`]s into PUTs and GETs whose
/// key contains `filter`.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    filter: Mutex<String>,
    puts: Mutex<Fault>,
    gets: Mutex<Fault>,
    released: AtomicBool,
    release: Notify,
    /// Stuck requests that went through after their release.
    pub landed: AtomicU64,
    /// Requests the faults applied to.
    pub faulted: AtomicU64,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            filter: Mutex::new(String::new()),
            puts: Mutex::new(Fault::None),
            gets: Mutex::new(Fault::None),
            released: AtomicBool::new(false),
            release: Notify::new(),
            landed: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        })
    }

    /// Faults apply to keys containing `filter` from now on.
    pub fn only(&self, filter: &str) {
        *self.filter.lock().unwrap() = filter.to_owned();
    }

    pub fn puts(&self, fault: Fault) {
        if fault == Fault::Stuck {
            self.released.store(false, Ordering::SeqCst);
        }
        *self.puts.lock().unwrap() = fault;
    }

    pub fn gets(&self, fault: Fault) {
        if fault == Fault::Stuck {
            self.released.store(false, Ordering::SeqCst);
        }
        *self.gets.lock().unwrap() = fault;
    }

    /// Lets every stuck request go on.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    async fn apply(&self, fault: &Mutex<Fault>, path: &Path) -> Result<()> {
        let fault = *fault.lock().unwrap();
        if fault == Fault::None || !path.as_ref().contains(self.filter.lock().unwrap().as_str()) {
            return Ok(());
        }
        self.faulted.fetch_add(1, Ordering::SeqCst);
        match fault {
            Fault::None => Ok(()),
            Fault::Fail => Err(object_store::Error::Generic {
                store: "faulty",
                source: "injected failure".into(),
            }),
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Fault::Stuck => {
                loop {
                    let notified = self.release.notified();
                    if self.released.load(Ordering::SeqCst) {
                        break;
                    }
                    notified.await;
                }
                self.landed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.apply(&self.puts, location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.apply(&self.puts, location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.apply(&self.gets, location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.apply(&self.gets, location).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
