//! Segments in an object store (S3-compatible storage, or a local directory
//! through the same interface).
//!
//! Objects are immutable and never overwritten. Under `<prefix>/<volume>/<index>/`
//! a segment is:
//! - `created`: empty, put (create-only) when the segment is created, so the
//!   segment is listed even before it holds data, and deleted last;
//! - `r<start>` (16 lowercase hex digits): one run of bytes written at
//!   `start`, its length being the object's size. Runs never overlap, since a
//!   range of a segment is written once.
//!
//! Writes stay in memory until [`sync`](SegmentStore::sync), which uploads
//! every contiguous run of them as one object (one PUT per run, the runs of
//! one sync in parallel) and returns once all are stored; that is what a
//! FLUSH waits for before the mapping batch that references the data is
//! committed. A run that failed to upload stays in memory for the next sync.
//!
//! Reads take bytes from memory when they are not uploaded yet, and otherwise
//! from the run's object: a whole object of up to [`WHOLE_OBJECT_BYTES`] is
//! fetched and kept in a bounded cache (ciphertext, as safe as the bucket), a
//! larger one is read by byte range. A segment's list of runs is fetched once
//! (one LIST) when it is first read after the store opened.
//!
//! Everything held here is sealed: this module never sees plaintext.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::{SegmentId, SegmentStore};
use crate::bridge::Bridge;

/// Objects up to this size are fetched whole on a read and cached.
const WHOLE_OBJECT_BYTES: u64 = 4 << 20;

/// Segments kept as immutable objects in an object store.
pub struct ObjectSegments {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    bridge: Bridge,
    segments: Mutex<HashMap<SegmentId, Arc<Segment>>>,
    cache: Mutex<Cache>,
    /// Each call's requests together fail with `TimedOut` past this.
    request_timeout: Duration,
}

#[derive(Default)]
struct Segment {
    state: Mutex<State>,
    /// Held through a sync, so two syncs of one segment never upload the same run.
    syncing: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Written and not uploaded: start → bytes.
    pending: BTreeMap<u64, Bytes>,
    /// Uploaded runs, start → length; `None` until listed (a segment created
    /// by this process starts listed and empty).
    uploaded: Option<BTreeMap<u64, u64>>,
}

impl ObjectSegments {
    /// The default bound on cached object bytes: 256 MiB.
    pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

    /// The default bound on one call's requests: past the S3 client's own
    /// timeout and retries ([`crate::object::S3Options`]).
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

    /// Segments under `prefix` in `store`.
    ///
    /// A segment is listed while its directory (its key prefix) holds an
    /// object: an `object_store::local::LocalFileSystem` must therefore
    /// remove emptied directories (`with_automatic_cleanup(true)`), and should
    /// sync what it writes (`with_fsync(true)`).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> io::Result<ObjectSegments> {
        Ok(ObjectSegments {
            store,
            prefix: prefix.trim_end_matches('/').to_owned(),
            bridge: Bridge::new("blockseal-segments", 2)?,
            segments: Mutex::new(HashMap::new()),
            cache: Mutex::new(Cache::new(Self::DEFAULT_CACHE_BYTES)),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Fails a call whose requests have not all answered within `timeout`
    /// with `TimedOut` (EIO for the NBD request), whatever the client's own
    /// timeouts and retries do: a request stuck in a connection that never
    /// answers cannot hold a FLUSH forever. What the call had not uploaded
    /// stays in memory for the next sync.
    pub fn request_timeout(mut self, timeout: Duration) -> ObjectSegments {
        self.request_timeout = timeout;
        self
    }

    /// Uploads each contiguous run of what is in memory for segment `id`
    /// (its `syncing` lock held). Returns whether another round is needed:
    /// a run's object existed already, written by an earlier upload of this
    /// segment whose answer was lost (a timeout), and was adopted.
    fn sync_round(&self, id: SegmentId, segment: &Segment) -> io::Result<bool> {
        // Contiguous runs of what is in memory now.
        let mut runs: Vec<(u64, Vec<Bytes>, u64)> = Vec::new();
        for (&start, bytes) in &lock(&segment.state).pending {
            match runs.last_mut() {
                Some((run_start, parts, run_len)) if *run_start + *run_len == start => {
                    parts.push(bytes.clone());
                    *run_len += bytes.len() as u64;
                }
                _ => runs.push((start, vec![bytes.clone()], bytes.len() as u64)),
            }
        }
        if runs.is_empty() {
            return Ok(false);
        }
        // Knowing the runs already uploaded keeps the map whole when the
        // new ones join it.
        self.ensure_listed(id, segment)?;
        let uploads: Vec<_> = runs
            .iter()
            .map(|(start, parts, _)| {
                let store = Arc::clone(&self.store);
                let path = self.run_path(id, *start);
                let payload: PutPayload = parts.iter().cloned().collect();
                async move {
                    let options = PutOptions {
                        mode: PutMode::Create,
                        ..PutOptions::default()
                    };
                    match store.put_opts(&path, payload, options).await {
                        Ok(_) => Ok(None),
                        // Segments are this writer's alone (their `created`
                        // object is create-only), and their bytes never
                        // change once written: an object at this start is
                        // an earlier upload of the same bytes, perhaps
                        // fewer of them. Its length says how many.
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            store.head(&path).await.map(|meta| Some(meta.size))
                        }
                        Err(e) => Err(e),
                    }
                }
            })
            .collect();
        let results = self.run("PUT", async move {
            let tasks: Vec<_> = uploads.into_iter().map(tokio::spawn).collect();
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(match task.await {
                    Ok(result) => result.map_err(object_error),
                    Err(panicked) => Err(io::Error::other(panicked)),
                });
            }
            results
        })?;
        let mut first_error = None;
        let mut again = false;
        let mut state = lock(&segment.state);
        for ((start, parts, len), result) in runs.into_iter().zip(results) {
            let landed = match result {
                Ok(None) => len,
                Ok(Some(existing)) => {
                    // Whole parts only: the earlier upload was a run of the
                    // parts pending then.
                    let mut covered = 0;
                    for part in &parts {
                        if covered + part.len() as u64 > existing {
                            break;
                        }
                        covered += part.len() as u64;
                    }
                    if covered != existing || existing == 0 {
                        first_error.get_or_insert(io::Error::other(format!(
                            "segment {id:?}: an object at byte {start} holds {existing} bytes, \
                             which match no earlier upload of this segment"
                        )));
                        continue;
                    }
                    again |= existing < len;
                    existing
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            state
                .uploaded
                .get_or_insert_with(BTreeMap::new)
                .insert(start, landed);
            let mut at = start;
            for part in parts {
                if at >= start + landed {
                    break;
                }
                state.pending.remove(&at);
                at += part.len() as u64;
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(again),
        }
    }

    /// Runs `task`'s requests, bounded by the request timeout.
    fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        let limit = self.request_timeout;
        self.bridge
            .run(async move { tokio::time::timeout(limit, task).await })?
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("object store {what} did not answer within {limit:?}"),
                )
            })
    }

    /// Bounds the bytes of fetched objects kept in memory.
    pub fn cache_bytes(self, bytes: u64) -> ObjectSegments {
        *lock(&self.cache) = Cache::new(bytes);
        self
    }

    fn segment_dir(&self, id: SegmentId) -> String {
        format!("{}/{}/{}", self.prefix, id.volume, id.index)
    }

    fn created_path(&self, id: SegmentId) -> ObjectPath {
        ObjectPath::from(format!("{}/created", self.segment_dir(id)))
    }

    fn run_path(&self, id: SegmentId, start: u64) -> ObjectPath {
        ObjectPath::from(format!("{}/r{start:016x}", self.segment_dir(id)))
    }

    fn segment(&self, id: SegmentId) -> Arc<Segment> {
        Arc::clone(lock(&self.segments).entry(id).or_default())
    }

    /// The segment's runs, listing them from the store the first time.
    fn ensure_listed(&self, id: SegmentId, segment: &Segment) -> io::Result<()> {
        if lock(&segment.state).uploaded.is_some() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let dir = ObjectPath::from(self.segment_dir(id));
        let listing = self
            .run("LIST", async move {
                store.list_with_delimiter(Some(&dir)).await
            })?
            .map_err(object_error)?;
        let mut runs = BTreeMap::new();
        for object in listing.objects {
            let Some(name) = object.location.filename() else {
                continue;
            };
            if let Some(start) = name
                .strip_prefix('r')
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            {
                runs.insert(start, object.size);
            }
        }
        let mut state = lock(&segment.state);
        if state.uploaded.is_none() {
            state.uploaded = Some(runs);
        }
        Ok(())
    }

    /// Where the bytes at `offset` are, if written: in memory, or in the run
    /// object `start` of `len` bytes.
    fn locate(state: &State, offset: u64) -> Option<Place> {
        if let Some((&start, bytes)) = state.pending.range(..=offset).next_back()
            && offset < start + bytes.len() as u64
        {
            return Some(Place::Memory(bytes.slice((offset - start) as usize..)));
        }
        let (&start, &len) = state.uploaded.as_ref()?.range(..=offset).next_back()?;
        (offset < start + len).then_some(Place::Object { start, len })
    }

    /// Fills `buf` with the bytes at `offset`, piece by piece, each piece
    /// taken by `take` from where [`locate`](Self::locate) finds it;
    /// `Ok(false)` as soon as `take` has none.
    fn fill(
        segment: &Segment,
        offset: u64,
        buf: &mut [u8],
        mut take: impl FnMut(u64, Option<Place>) -> io::Result<Option<Bytes>>,
    ) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let place = Self::locate(&lock(&segment.state), at);
            let Some(bytes) = take(at, place)? else {
                return Ok(false);
            };
            let n = bytes.len().min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[..n]);
            done += n;
        }
        Ok(true)
    }

    /// Reads what it can without a request: from memory or the cache.
    fn read_local(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let segment = self.segment(id);
        Self::fill(&segment, offset, buf, |at, place| {
            Ok(match place {
                Some(Place::Memory(bytes)) => Some(bytes),
                Some(Place::Object { start, .. }) => lock(&self.cache)
                    .get(id, start)
                    .map(|object| object.slice((at - start) as usize..)),
                None => None,
            })
        })
    }

    /// Fetches `range` of run object `start` (or the whole object, cached).
    fn fetch(&self, id: SegmentId, start: u64, len: u64, range: Range<u64>) -> io::Result<Bytes> {
        if let Some(object) = lock(&self.cache).get(id, start) {
            return Ok(object.slice(range.start as usize..range.end as usize));
        }
        let whole = len <= WHOLE_OBJECT_BYTES;
        let wanted = if whole { 0..len } else { range.clone() };
        let store = Arc::clone(&self.store);
        let path = self.run_path(id, start);
        let bytes = self
            .run("GET", async move {
                let options = GetOptions {
                    range: Some(GetRange::Bounded(wanted)),
                    ..GetOptions::default()
                };
                store.get_opts(&path, options).await?.bytes().await
            })?
            .map_err(object_error)?;
        if whole {
            if bytes.len() as u64 != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("segment object {id:?}@{start} is shorter than listed"),
                ));
            }
            lock(&self.cache).insert(id, start, bytes.clone());
            Ok(bytes.slice(range.start as usize..range.end as usize))
        } else {
            Ok(bytes)
        }
    }
}

enum Place {
    Memory(Bytes),
    Object { start: u64, len: u64 },
}

impl SegmentStore for ObjectSegments {
    fn create(&self, id: SegmentId) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let path = self.created_path(id);
        self.run("PUT", async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            store.put_opts(&path, PutPayload::new(), options).await
        })?
        .map_err(object_error)?;
        let segment = self.segment(id);
        let mut state = lock(&segment.state);
        state.uploaded.get_or_insert_with(BTreeMap::new);
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let segment = self.segment(id);
        lock(&segment.state)
            .pending
            .insert(offset, Bytes::copy_from_slice(data));
        Ok(())
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.read_local(id, offset, buf)? {
            return Ok(());
        }
        let segment = self.segment(id);
        self.ensure_listed(id, &segment)?;
        let end = offset + buf.len() as u64;
        Self::fill(&segment, offset, buf, |at, place| match place {
            Some(Place::Memory(bytes)) => Ok(Some(bytes)),
            Some(Place::Object { start, len }) => {
                let to = end.min(start + len);
                self.fetch(id, start, len, at - start..to - start).map(Some)
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("segment {id:?} holds no data at byte {at}"),
            )),
        })?;
        Ok(())
    }

    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read_local(id, offset, buf)
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        let segment = self.segment(id);
        let _syncing = lock(&segment.syncing);
        // A round that found an earlier upload of its own landed (after its
        // call failed) adopts it and uploads the rest in another round.
        while self.sync_round(id, &segment)? {}
        Ok(())
    }

    fn sync_retriable(&self) -> bool {
        // A run that failed to upload stays in memory; create-only uploads
        // (and adopting one that landed late) make a retry safe.
        true
    }

    fn delete(&self, id: SegmentId) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let dir = ObjectPath::from(self.segment_dir(id));
        let created = self.created_path(id);
        self.run("DELETE", async move {
            let listing = store.list_with_delimiter(Some(&dir)).await?;
            // The runs first and `created` last: a delete cut short leaves
            // the segment listed, so it is deleted again.
            for object in &listing.objects {
                if object.location != created {
                    delete_object(&*store, &object.location).await?;
                }
            }
            delete_object(&*store, &created).await
        })?
        .map_err(object_error)?;
        lock(&self.segments).remove(&id);
        lock(&self.cache).forget(id);
        Ok(())
    }

    fn list(&self, volume: u32) -> io::Result<Vec<u32>> {
        let store = Arc::clone(&self.store);
        let dir = ObjectPath::from(format!("{}/{volume}", self.prefix));
        let listing = self
            .run("LIST", async move {
                store.list_with_delimiter(Some(&dir)).await
            })?
            .map_err(object_error)?;
        let mut indexes: Vec<u32> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect();
        indexes.sort_unstable();
        Ok(indexes)
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        let segment = self.segment(id);
        self.ensure_listed(id, &segment)?;
        let state = lock(&segment.state);
        let pending = state
            .pending
            .iter()
            .next_back()
            .map_or(0, |(start, bytes)| start + bytes.len() as u64);
        let uploaded = state
            .uploaded
            .as_ref()
            .and_then(|runs| runs.iter().next_back())
            .map_or(0, |(start, len)| start + len);
        Ok(pending.max(uploaded))
    }
}

/// Deletes an object; one that is gone already is not an error.
async fn delete_object(store: &dyn ObjectStore, path: &ObjectPath) -> object_store::Result<()> {
    match store.delete(path).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        result => result,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn object_error(error: object_store::Error) -> io::Error {
    let kind = match &error {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, error)
}

/// Fetched run objects, bounded in bytes; the least recently used go first.
struct Cache {
    limit: u64,
    bytes: u64,
    clock: u64,
    objects: HashMap<(SegmentId, u64), (Bytes, u64)>,
}

impl Cache {
    fn new(limit: u64) -> Cache {
        Cache {
            limit,
            bytes: 0,
            clock: 0,
            objects: HashMap::new(),
        }
    }

    fn get(&mut self, id: SegmentId, start: u64) -> Option<Bytes> {
        self.clock += 1;
        let clock = self.clock;
        let (bytes, used) = self.objects.get_mut(&(id, start))?;
        *used = clock;
        Some(bytes.clone())
    }

    fn insert(&mut self, id: SegmentId, start: u64, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.limit {
            return;
        }
        while self.bytes + len > self.limit {
            let Some(oldest) = self
                .objects
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| *key)
            else {
                break;
            };
            if let Some((evicted, _)) = self.objects.remove(&oldest) {
                self.bytes -= evicted.len() as u64;
            }
        }
        self.clock += 1;
        if let Some((old, _)) = self.objects.insert((id, start), (bytes, self.clock)) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += len;
    }

    fn forget(&mut self, id: SegmentId) {
        let mut freed = 0;
        self.objects.retain(|(segment, _), (bytes, _)| {
            let keep = *segment != id;
            if !keep {
                freed += bytes.len() as u64;
            }
            keep
        });
        self.bytes -= freed;
    }
}
