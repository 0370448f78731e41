//! Store catalogues: the whole metadata of a store (tenants, volumes, wrapped
//! keys, mappings, snapshots, backup keys, the audit log), sealed under a key
//! derived from the master key, for rebuilding a host together with its
//! segment files (`blockseal store backup`, `blockseal store rebuild`).
//!
//! # File
//!
//! A header (magic `BSCATLOG`, version, metadata backend, the master key's id,
//! a random salt, the time), then chunks: kind (1 records, 2 end), plaintext
//! length, nonce, and AES-256-GCM ciphertext with its tag. A records chunk
//! holds `(u32 key length, key, u32 value length, value)` entries; the end
//! chunk holds the record count and the segment files the records reference
//! (volume id, index, size). The associated data of each chunk is the header,
//! the chunk's index and its kind, so chunks cannot be dropped, reordered,
//! moved between catalogues, or the end cut off unnoticed. Only the master
//! key opens it: tenant seeds and wrapped keys are never in the clear.
//!
//! # Consistency
//!
//! The records are one scan of the metadata store, which never sees part of
//! a commit: the catalogue holds what was committed at one instant (what a
//! crash at that instant would have left). Segment data a committed mapping
//! names was synced before the mapping committed and segments are append-only,
//! so the segment files as they are after the scan hold every referenced
//! byte, as long as none is deleted: segment deletions (compaction, volume
//! deletion) are held off while the catalogue is written and its segment files
//! linked (`segments_to`).
//!
//! This module must never write a record outside a sealed chunk.

use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockWriteGuard};

use blockseal_keys::{
    CATALOG_NONCE_LEN, CATALOG_SALT_LEN, CATALOG_TAG_LEN, CatalogKey, KeyId, MasterKey,
};
use zeroize::Zeroizing;

use super::{Store, StoreOptions};
use crate::error::OpenError;
use crate::meta::{BackendKind, Batch};
use crate::record::VolumeRecord;
use crate::segment::{SegmentId, SegmentStore};

const MAGIC: [u8; 8] = *b"BSCATLOG";
/// The catalogue version this build writes: 2 since store format 4, whose
/// mapping journal records a build before it would copy without reading
/// (its volumes would miss the changes they hold). Version 1 is read too.
const VERSION: u16 = 2;
/// The oldest catalogue version this build reads.
const OLDEST_VERSION: u16 = 1;
/// Bytes of a catalogue's header.
pub const CATALOG_HEADER_LEN: usize = 8 + 2 + 1 + 1 + 16 + CATALOG_SALT_LEN + 8;
const HEADER_LEN: usize = CATALOG_HEADER_LEN;
const CHUNK_RECORDS: u8 = 1;
const CHUNK_END: u8 = 2;
/// Kind, plaintext length and nonce: what precedes a chunk's ciphertext.
const CHUNK_HEAD_LEN: usize = 1 + 4 + CATALOG_NONCE_LEN;
/// The end chunk's plaintext: record and segment counts (u64 each), then
/// this many bytes per segment file.
const END_FIXED: usize = 16;
const END_PER_SEGMENT: usize = 16;
/// Plaintext bytes per records chunk (a record larger than this gets a chunk
/// of its own).
const CHUNK_BYTES: usize = 1 << 20;
/// The largest chunk a reader accepts.
const MAX_CHUNK: usize = 16 << 20;
/// Records committed per batch when a store is rebuilt.
const REBUILD_BATCH: usize = 10_000;

/// A segment store whose deletions can be held off.
pub(crate) struct Holding {
    inner: std::sync::Arc<dyn SegmentStore>,
    deletions: RwLock<()>,
}

impl Holding {
    pub(crate) fn new(inner: std::sync::Arc<dyn SegmentStore>) -> Holding {
        Holding {
            inner,
            deletions: RwLock::new(()),
        }
    }

    /// No segment is deleted while the guard lives (deleters wait).
    fn hold(&self) -> RwLockWriteGuard<'_, ()> {
        self.deletions.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl SegmentStore for Holding {
    fn create(&self, id: SegmentId) -> io::Result<()> {
        self.inner.create(id)
    }
    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(id, offset, data)
    }
    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(id, offset, buf)
    }
    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.read_cached(id, offset, buf)
    }
    fn sync(&self, id: SegmentId) -> io::Result<()> {
        self.inner.sync(id)
    }
    fn sync_retriable(&self) -> bool {
        self.inner.sync_retriable()
    }
    fn delete(&self, id: SegmentId) -> io::Result<()> {
        let _held = self.deletions.read().unwrap_or_else(|e| e.into_inner());
        self.inner.delete(id)
    }
    fn list(&self, volume: u32) -> io::Result<Vec<u32>> {
        self.inner.list(volume)
    }
    fn size(&self, id: SegmentId) -> io::Result<u64> {
        self.inner.size(id)
    }
    fn delete_volume(&self, volume: u32) -> io::Result<()> {
        let _held = self.deletions.read().unwrap_or_else(|e| e.into_inner());
        self.inner.delete_volume(volume)
    }
    fn check_space(&self, bytes: u64) -> io::Result<()> {
        self.inner.check_space(bytes)
    }
}

/// What [`Store::write_catalog`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CatalogReport {
    /// Metadata records in the catalogue.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Segment files the catalogue's volumes have, and their bytes.
    pub segments: u64,
    /// Bytes of those segment files.
    pub segment_bytes: u64,
    /// Segment files linked (or copied) into `segments_to`.
    pub segments_linked: u64,
}

/// A catalogue could not be written or a store not rebuilt from one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Not a catalogue, a version this build does not read, or damaged.
    #[error("{0}")]
    Format(String),
    /// The catalogue belongs to another master key.
    #[error("the catalogue was written with master key {expected}, not {actual}")]
    OtherMasterKey {
        /// The key the catalogue names.
        expected: KeyId,
        /// The key given.
        actual: KeyId,
    },
    /// A chunk does not open: the file was damaged or edited.
    #[error("catalogue chunk {index} does not open: the file was damaged or edited")]
    Damaged {
        /// The chunk's position.
        index: u64,
    },
    /// Segment files the catalogue references are missing or too short.
    #[error(
        "{count} segment file(s) the catalogue references are missing or shorter than recorded in {dir} (first: {first}); copy the store's segments there"
    )]
    MissingSegments {
        /// The segments directory searched.
        dir: PathBuf,
        /// How many.
        count: usize,
        /// The first one, as `volume/index`.
        first: String,
    },
    /// The store failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading or writing failed.
    #[error("catalogue I/O failed")]
    Io(#[from] io::Error),
}

impl Store {
    /// Writes the store's catalogue to `out`, and when `segments_to` is given
    /// hard-links (or copies, across file systems) every segment file into it
    /// (laid out as the store's `segments/` directory), with segment
    /// deletions held off until done, so the catalogue and the segments match.
    pub fn write_catalog(
        &self,
        out: &mut dyn Write,
        segments_to: Option<&Path>,
    ) -> Result<CatalogReport, CatalogError> {
        let _no_deletions = self.holding.hold();
        let master = self.read_master();
        let mut salt = [0u8; CATALOG_SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| io::Error::other("the system random number generator failed"))?;
        let key = master.catalog_key(&salt);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_be_bytes());
        header.push(self.backend().code());
        header.push(0);
        header.extend_from_slice(master.id().as_bytes());
        header.extend_from_slice(&salt);
        header.extend_from_slice(&super::now().to_be_bytes());
        drop(master);
        out.write_all(&header)?;
        let mut writer = ChunkWriter {
            out,
            key: &key,
            header: &header,
            index: 0,
            bytes: header.len() as u64,
        };
        let mut chunk = Zeroizing::new(Vec::with_capacity(CHUNK_BYTES + 4096));
        let mut records = 0u64;
        let mut volumes = Vec::new();
        let mut failed: Option<io::Error> = None;
        self.meta
            .scan_prefix(b"", &mut |k, v| {
                if k == b"C" {
                    // The commit sequence belongs to the store that made it.
                    return true;
                }
                if k.first() == Some(&b'V')
                    && let Ok(r) = VolumeRecord::decode(v)
                {
                    volumes.push(r.internal_id);
                }
                chunk.extend_from_slice(&(k.len() as u32).to_be_bytes());
                chunk.extend_from_slice(k);
                chunk.extend_from_slice(&(v.len() as u32).to_be_bytes());
                chunk.extend_from_slice(v);
                records += 1;
                if chunk.len() >= CHUNK_BYTES {
                    if let Err(e) = writer.chunk(CHUNK_RECORDS, &mut chunk) {
                        failed = Some(e);
                        return false;
                    }
                    chunk.clear();
                }
                true
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        if !chunk.is_empty() {
            writer.chunk(CHUNK_RECORDS, &mut chunk)?;
        }
        let mut end = Zeroizing::new(Vec::new());
        end.extend_from_slice(&records.to_be_bytes());
        let mut segments = Vec::new();
        for &volume in &volumes {
            for index in self.segments.list(volume)? {
                let size = self.segments.size(SegmentId { volume, index })?;
                segments.push((volume, index, size));
            }
        }
        end.extend_from_slice(&(segments.len() as u64).to_be_bytes());
        for &(volume, index, size) in &segments {
            end.extend_from_slice(&volume.to_be_bytes());
            end.extend_from_slice(&index.to_be_bytes());
            end.extend_from_slice(&size.to_be_bytes());
        }
        writer.chunk(CHUNK_END, &mut end)?;
        let bytes = writer.bytes;
        out.flush()?;
        let mut linked = 0u64;
        if let Some(to) = segments_to {
            let from = self.dir().join(super::SEGMENTS_DIR);
            let ids: Vec<(u32, u32)> = segments.iter().map(|&(v, i, _)| (v, i)).collect();
            linked = link_segments(&from, to, &ids)?;
        }
        Ok(CatalogReport {
            records,
            bytes,
            segments: segments.len() as u64,
            segment_bytes: segments.iter().map(|s| s.2).sum(),
            segments_linked: linked,
        })
    }
}

struct ChunkWriter<'a> {
    out: &'a mut dyn Write,
    key: &'a CatalogKey,
    header: &'a [u8],
    index: u64,
    bytes: u64,
}

impl ChunkWriter<'_> {
    fn chunk(&mut self, kind: u8, plain: &mut [u8]) -> io::Result<()> {
        let aad = chunk_aad(self.header, self.index, kind);
        let len = plain.len() as u32;
        let (nonce, tag) = self
            .key
            .seal(&aad, plain)
            .map_err(|_| io::Error::other("the system random number generator failed"))?;
        self.out.write_all(&[kind])?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(&nonce)?;
        self.out.write_all(plain)?;
        self.out.write_all(&tag)?;
        self.index += 1;
        self.bytes += (1 + 4 + CATALOG_NONCE_LEN + plain.len() + CATALOG_TAG_LEN) as u64;
        Ok(())
    }
}

fn chunk_aad(header: &[u8], index: u64, kind: u8) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 9);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(kind);
    aad
}

/// Rebuilds a store in `dir` (which must hold no store) from a catalogue and
/// the segment files in `segments_from` (laid out as a store's `segments/`),
/// with the master key the catalogue was written with; the segment files are
/// hard-linked (or copied) into place. Then opens it (which runs every check
/// an open runs).
///
/// The rebuild is a `store.rebuild` span (INFO): `dir`, `segments_from`,
/// and the `error` if it fails.
pub fn rebuild_store<C: Read + Seek>(
    catalog: &mut C,
    segments_from: &Path,
    dir: &Path,
    master: MasterKey,
    options: StoreOptions,
) -> Result<Store, CatalogError> {
    let span = tracing::info_span!(
        "store.rebuild",
        dir = %dir.display(),
        segments_from = %segments_from.display(),
        error = tracing::field::Empty,
    );
    let _entered = span.enter();
    let result = rebuild(catalog, segments_from, dir, master, options);
    if let Err(e) = &result {
        crate::error::record_failure(&span, e);
    }
    result
}

fn rebuild<C: Read + Seek>(
    catalog: &mut C,
    segments_from: &Path,
    dir: &Path,
    master: MasterKey,
    options: StoreOptions,
) -> Result<Store, CatalogError> {
    let start = catalog.stream_position()?;
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match catalog.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let parsed = CatalogHeader::parse(&header[..got])?;
    if parsed.master_key != master.id() {
        return Err(CatalogError::OtherMasterKey {
            expected: parsed.master_key,
            actual: master.id(),
        });
    }
    let backend = parsed.backend;
    let salt: [u8; CATALOG_SALT_LEN] = header[28..60].try_into().expect("32 bytes");
    let key = master.catalog_key(&salt);

    // First pass: every chunk is read and opened, and the records counted,
    // before anything is written; only the segment list is kept.
    let mut records = 0u64;
    let segments = read_chunks(catalog, &key, &header, &mut |entries| {
        records += entries.len() as u64;
        Ok(())
    })?;
    let missing: Vec<String> = segments
        .iter()
        .filter(|&&(v, i, size)| {
            std::fs::metadata(segments_from.join(v.to_string()).join(i.to_string()))
                .map_or(true, |m| m.len() < size)
        })
        .map(|(v, i, _)| format!("{v}/{i}"))
        .collect();
    if let Some(first) = missing.first() {
        return Err(CatalogError::MissingSegments {
            dir: segments_from.to_path_buf(),
            count: missing.len(),
            first: first.clone(),
        });
    }

    {
        super::create_private_dir(dir)?;
        let _lock = super::lock_store(dir)?;
        super::check_no_store_data(dir)?;
        let options = options.clone().backend(backend);
        let raw = super::open_meta(dir, backend, &options)?;
        let meta = crate::marker::Sequenced::new(dir, raw, 0)
            .map_err(|e| CatalogError::Io(io::Error::other(e.to_string())))?;
        // Second pass: the records are committed a batch at a time, so a
        // catalogue of any size rebuilds in bounded memory. A catalogue that
        // changed since the first pass fails here; the store is not complete
        // until its FORMAT file is written below.
        catalog.seek(io::SeekFrom::Start(start + HEADER_LEN as u64))?;
        let mut committed = 0u64;
        let again = read_chunks(catalog, &key, &header, &mut |entries| {
            for batch_records in entries.chunks(REBUILD_BATCH) {
                let mut batch = Batch::new();
                for (k, v) in batch_records {
                    batch.put(k.to_vec(), v.to_vec());
                }
                crate::meta::MetaStore::commit(&meta, &batch)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                batch.wipe_values();
            }
            committed += entries.len() as u64;
            Ok(())
        })?;
        if committed != records || again != segments {
            return Err(CatalogError::Format(
                "the catalogue changed while the store was rebuilt from it".into(),
            ));
        }
        // The segment files are durable before the FORMAT file says a store
        // is here: a crash in between leaves a directory that is no store.
        let ids: Vec<(u32, u32)> = segments.iter().map(|&(v, i, _)| (v, i)).collect();
        link_segments(segments_from, &dir.join(super::SEGMENTS_DIR), &ids)?;
        super::write_format_file(dir, backend, false)?;
    }
    Ok(Store::open(dir, master, options)?)
}

/// A record in a catalogue: key and value.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// Reads a catalogue's chunks from just after its header to the end: opens
/// each, hands each records chunk's entries to `records`, checks the end
/// chunk's record count and that nothing follows it, and returns the segment
/// files it lists (volume, index, size).
fn read_chunks(
    catalog: &mut dyn Read,
    key: &CatalogKey,
    header: &[u8],
    records: &mut dyn FnMut(&[Entry<'_>]) -> io::Result<()>,
) -> Result<Vec<(u32, u32, u64)>, CatalogError> {
    let mut count = 0u64;
    let mut index = 0u64;
    loop {
        let mut head = [0u8; CHUNK_HEAD_LEN];
        catalog.read_exact(&mut head).map_err(|_| {
            CatalogError::Format(format!(
                "the catalogue ends before its end chunk (chunk {index})"
            ))
        })?;
        let kind = head[0];
        let len = u32::from_be_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        if !matches!(kind, CHUNK_RECORDS | CHUNK_END) || len > MAX_CHUNK {
            return Err(CatalogError::Damaged { index });
        }
        let nonce: [u8; CATALOG_NONCE_LEN] = head[5..].try_into().expect("12 bytes");
        let mut data = Zeroizing::new(vec![0u8; len + CATALOG_TAG_LEN]);
        catalog.read_exact(&mut data).map_err(|_| {
            CatalogError::Format(format!("the catalogue ends inside chunk {index}"))
        })?;
        let n = key
            .open(&chunk_aad(header, index, kind), &nonce, &mut data)
            .map_err(|_| CatalogError::Damaged { index })?;
        data.truncate(n);
        let damaged = || CatalogError::Damaged { index };
        if kind == CHUNK_END {
            let recorded = data.get(..8).ok_or_else(damaged)?;
            if u64::from_be_bytes(recorded.try_into().expect("8 bytes")) != count {
                return Err(damaged());
            }
            let n = u64::from_be_bytes(data.get(8..16).ok_or_else(damaged)?.try_into().expect("8"));
            let list = &data[END_FIXED..];
            if list.len() as u64 != n * END_PER_SEGMENT as u64 {
                return Err(damaged());
            }
            let segments = list
                .chunks_exact(END_PER_SEGMENT)
                .map(|s| {
                    (
                        u32::from_be_bytes(s[..4].try_into().expect("4")),
                        u32::from_be_bytes(s[4..8].try_into().expect("4")),
                        u64::from_be_bytes(s[8..].try_into().expect("8")),
                    )
                })
                .collect();
            let mut extra = [0u8; 1];
            if catalog.read(&mut extra)? != 0 {
                return Err(CatalogError::Format(
                    "bytes follow the catalogue's end chunk".into(),
                ));
            }
            return Ok(segments);
        }
        let mut entries: Vec<Entry<'_>> = Vec::new();
        let mut p = &data[..];
        while !p.is_empty() {
            let (k, rest) = take_field(p).ok_or_else(damaged)?;
            let (v, rest) = take_field(rest).ok_or_else(damaged)?;
            entries.push((k, v));
            p = rest;
        }
        count += entries.len() as u64;
        records(&entries)?;
        index += 1;
    }
}

/// What a catalogue's header says in the clear: enough to tell which master
/// key rebuilds it before any key is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CatalogHeader {
    /// The master key it is sealed under.
    pub master_key: KeyId,
    /// When it was written, Unix seconds.
    pub created: u64,
    /// The metadata backend of the store it was written from.
    pub backend: BackendKind,
}

impl CatalogHeader {
    /// Reads a header from a catalogue's first [`CATALOG_HEADER_LEN`] bytes
    /// (more are ignored).
    pub fn parse(bytes: &[u8]) -> Result<CatalogHeader, CatalogError> {
        let format = |m: String| CatalogError::Format(m);
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(format(format!(
                "the catalogue ends inside its header ({} of {HEADER_LEN} bytes)",
                bytes.len()
            )));
        };
        if header[..8] != MAGIC {
            return Err(format("not a blockseal catalogue (bad magic)".into()));
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(format(format!(
                "catalogue version {version}; this build reads versions {OLDEST_VERSION} to {VERSION}"
            )));
        }
        let Some(backend) = BackendKind::from_code(header[10]) else {
            return Err(format(format!(
                "unknown metadata backend {} in the header",
                header[10]
            )));
        };
        if header[11] != 0 {
            return Err(format("reserved header byte is not zero".into()));
        }
        Ok(CatalogHeader {
            master_key: KeyId::from_bytes(header[12..28].try_into().expect("16 bytes")),
            created: u64::from_be_bytes(header[60..68].try_into().expect("8 bytes")),
            backend,
        })
    }
}

/// A catalogue whose framing held from its header to its end chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CatalogFramed {
    /// Its header.
    pub header: CatalogHeader,
    /// Chunks, the end chunk included.
    pub chunks: u64,
    /// Segment files the end chunk lists.
    pub segments: u64,
    /// Its length.
    pub bytes: u64,
}

/// Checks a catalogue's framing, without a key, as its bytes pass in pieces
/// of any size: the header, each chunk's kind and length, an end chunk of a
/// possible length, and nothing after it. This tells a catalogue that
/// arrived whole from one cut short; what needs the key (every chunk opens,
/// the counts match) is checked when the store is rebuilt.
#[derive(Debug, Default)]
pub struct CatalogFraming {
    /// The header or chunk head being gathered.
    pending: Vec<u8>,
    header: Option<CatalogHeader>,
    /// The chunk whose ciphertext is passing: its kind and the bytes left.
    body: Option<(u8, u64)>,
    chunks: u64,
    segments: u64,
    bytes: u64,
    /// Where the header or chunk head being gathered starts.
    start: u64,
    done: bool,
}

impl CatalogFraming {
    /// A check at the start of a catalogue.
    pub fn new() -> CatalogFraming {
        CatalogFraming::default()
    }

    /// Takes the next bytes.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), CatalogError> {
        while !data.is_empty() {
            if self.done {
                return Err(CatalogError::Format(format!(
                    "bytes follow the catalogue's end chunk (at byte {})",
                    self.bytes
                )));
            }
            let taken = if let Some((kind, left)) = &mut self.body {
                let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    self.done = *kind == CHUNK_END;
                    self.body = None;
                    self.chunks += 1;
                }
                n
            } else {
                let want = if self.header.is_none() {
                    HEADER_LEN
                } else {
                    CHUNK_HEAD_LEN
                };
                if self.pending.is_empty() {
                    self.start = self.bytes;
                }
                let n = data.len().min(want - self.pending.len());
                self.pending.extend_from_slice(&data[..n]);
                if self.pending.len() == want {
                    if self.header.is_none() {
                        self.header = Some(CatalogHeader::parse(&self.pending)?);
                    } else {
                        self.chunk_head()?;
                    }
                    self.pending.clear();
                }
                n
            };
            self.bytes += taken as u64;
            data = &data[taken..];
        }
        Ok(())
    }

    /// The catalogue ends here: its framing, if it is complete.
    pub fn finish(&self) -> Result<CatalogFramed, CatalogError> {
        match &self.header {
            Some(header) if self.done => Ok(CatalogFramed {
                header: header.clone(),
                chunks: self.chunks,
                segments: self.segments,
                bytes: self.bytes,
            }),
            None => Err(CatalogError::Format(format!(
                "the catalogue ends inside its header ({} of {HEADER_LEN} bytes)",
                self.bytes
            ))),
            Some(_) => Err(CatalogError::Format(format!(
                "the catalogue ends {} chunk {} without its end chunk (after {} bytes)",
                if self.body.is_some() || !self.pending.is_empty() {
                    "inside"
                } else {
                    "before"
                },
                self.chunks,
                self.bytes
            ))),
        }
    }

    fn chunk_head(&mut self) -> Result<(), CatalogError> {
        let kind = self.pending[0];
        let len = u32::from_be_bytes(self.pending[1..5].try_into().expect("4 bytes")) as usize;
        let damaged = |why: String| {
            CatalogError::Format(format!(
                "catalogue chunk {} is damaged ({why}, at byte {})",
                self.chunks, self.start
            ))
        };
        match kind {
            CHUNK_RECORDS if len <= MAX_CHUNK => {}
            CHUNK_END if len >= END_FIXED && (len - END_FIXED).is_multiple_of(END_PER_SEGMENT) => {
                self.segments = ((len - END_FIXED) / END_PER_SEGMENT) as u64;
            }
            CHUNK_RECORDS | CHUNK_END => return Err(damaged(format!("length {len}"))),
            other => return Err(damaged(format!("kind {other}"))),
        }
        self.body = Some((kind, (len + CATALOG_TAG_LEN) as u64));
        Ok(())
    }
}

/// Hard-links (or, across file systems, copies) the segment files `ids`
/// (volume, index) from the segments directory `from` into `to`, laid out
/// the same way; returns how many. Copies are synced, and so is every
/// directory an entry was made in: the files are there after a crash.
fn link_segments(from: &Path, to: &Path, ids: &[(u32, u32)]) -> io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut dirs = std::collections::BTreeSet::new();
    for &(volume, index) in ids {
        let rel = Path::new(&volume.to_string()).join(index.to_string());
        let target = to.join(&rel);
        let parent = to.join(volume.to_string());
        if dirs.insert(parent.clone()) {
            std::fs::create_dir_all(&parent)?;
        }
        if std::fs::hard_link(from.join(&rel), &target).is_err() {
            std::fs::copy(from.join(&rel), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    for dir in dirs.iter().map(PathBuf::as_path).chain([to]) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(ids.len() as u64)
}

fn take_field(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(p.get(..4)?.try_into().ok()?) as usize;
    let rest = &p[4..];
    (rest.len() >= len).then(|| rest.split_at(len))
}
