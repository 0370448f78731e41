//! The volume backup file: a streaming encoder and decoder, and nothing else.
//!
//! A backup file carries a volume's blocks exactly as the store keeps them
//! (ciphertext, tag, nonce counter, DEK version and writer), the volume's data
//! keys still wrapped, and its writers' salts. This module only turns those
//! into bytes and back: it never opens a store, never sees a key (wrapped DEKs
//! are opaque blobs), and never seals or opens a block. The trailer's MAC is
//! computed and checked by the caller, with its own key, over [`mac_input`].
//!
//! `docs/FORMAT.md` ("Backup file") has the byte tables; this module is their
//! only implementation. Integers are big-endian.
//!
//! Both directions stream: [`BackupWriter`] writes each frame as it is given,
//! and [`BackupReader`] holds at most one frame (at most [`MAX_RUN_BLOCKS`]
//! blocks of at most 64 KiB) besides the header. The reader never allocates
//! from a length it has not checked against the format's bounds, and grows
//! buffers only as bytes actually arrive, so a short hostile file cannot make
//! it reserve much.
//!
//! Like the metadata records, a backup is never half-understood: the reader
//! refuses an unknown magic, version, kind or frame type, a non-zero reserved
//! byte, truncation anywhere (a file that ends cleanly before its trailer
//! included), frames out of order, overlapping or past the volume's end,
//! references to DEKs or writers the header does not list (or to a writer of
//! another DEK), an unmapped range in a full backup, trailer counts that do
//! not match the frames, a digest that does not match the bytes, and any byte
//! after the trailer. The writer enforces the same rules on what it is given
//! (an `InvalidInput` error, with nothing written), so it never produces a
//! file the reader refuses.
//!
//! The trailer's SHA-256 digest is unkeyed: it catches damage, truncation and
//! splicing by accident, not by intent. Only the caller's MAC over
//! [`mac_input`] shows that nobody edited the file and recomputed the digest.

use std::io::{self, Read, Write};

use ring::digest;

use crate::{record, seal};

/// The file's first 8 bytes.
pub const BACKUP_MAGIC: [u8; 8] = *b"BSBACKUP";
/// The backup format version this build writes, and the only one it reads.
pub const BACKUP_FORMAT_VERSION: u16 = 1;
/// Longest tenant or volume name a header may carry, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest snapshot name a header may carry, in bytes.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 64;
/// Length of a wrapped DEK in the header; opaque to this module.
pub const WRAPPED_DEK_LEN: usize = 60;
/// Length of a writer salt.
pub const WRITER_SALT_LEN: usize = blockseal_keys::WRITER_SALT_LEN;
/// Most DEK entries a header may list.
pub const MAX_DEKS: usize = 1024;
/// Most writer entries a header may list.
pub const MAX_WRITERS: usize = 1_000_000;
/// Most blocks in one block run (as in one extent record).
pub const MAX_RUN_BLOCKS: usize = record::MAX_EXTENT_BLOCKS;
/// Length of a block's authentication tag.
pub const TAG_LEN: usize = seal::TAG_LEN;
/// Length of the trailer's digest (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// Length of the trailer's MAC.
pub const MAC_LEN: usize = 32;
/// Domain-separation label at the start of [`mac_input`]. Changing it is a
/// format change.
pub const MAC_LABEL: &[u8] = b"blockseal/v1/backup-trailer";
/// Length of [`mac_input`]: the length-prefixed label, the digest and two
/// counts.
pub const MAC_INPUT_LEN: usize = 4 + MAC_LABEL.len() + DIGEST_LEN + 8 + 8;

/// Frame type of a block run.
const FRAME_BLOCKS: u8 = b'B';
/// Bytes of a block run frame before its tags: type, LBA, count, DEK
/// version, writer, nonce counter, checksum.
const BLOCK_RUN_HEAD: usize = 31;
/// Frame type of an unmapped range.
const FRAME_UNMAPPED: u8 = b'Z';
/// Frame type of the trailer.
const FRAME_END: u8 = b'E';
/// Block runs' ciphertext is read in pieces of this size, so the buffer grows
/// only as the bytes arrive.
const READ_CHUNK: usize = 64 * 1024;

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackupKind {
    /// Every mapped block of the snapshot; blocks not in the file read as zeros.
    Full,
    /// The blocks that differ from a base snapshot: block runs for blocks
    /// written since, unmapped ranges for blocks that no longer hold data, and
    /// nothing for blocks unchanged since the base.
    Incremental,
}

impl BackupKind {
    /// The kind's byte in the header: 1 = full, 2 = incremental.
    pub fn code(self) -> u8 {
        match self {
            BackupKind::Full => 1,
            BackupKind::Incremental => 2,
        }
    }

    fn from_code(code: u8) -> Option<BackupKind> {
        match code {
            1 => Some(BackupKind::Full),
            2 => Some(BackupKind::Incremental),
            _ => None,
        }
    }
}

/// One data key of the volume, as the header lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekEntry {
    /// The DEK version block runs name.
    pub version: u32,
    /// The DEK wrapped under the tenant's KEK of the header's KEK version;
    /// opaque to this module.
    pub wrapped: [u8; WRAPPED_DEK_LEN],
}

/// One writer of the volume, as the header lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterEntry {
    /// The writer number block runs name (never 0: 0 stands for legacy blocks
    /// sealed under the DEK itself).
    pub number: u32,
    /// The DEK version the writer's key derives from.
    pub dek_version: u32,
    /// The writer's salt (public: useless without the DEK).
    pub salt: [u8; WRITER_SALT_LEN],
}

/// A backup file's header. [`BackupWriter::new`] checks every field and
/// [`BackupReader::new`] returns only headers that pass the same checks
/// (`docs/FORMAT.md`, "Backup file").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHeader {
    /// Full or incremental.
    pub kind: BackupKind,
    /// This backup's id.
    pub backup_id: [u8; 16],
    /// When the backup was made, seconds since the Unix epoch.
    pub created: u64,
    /// Tenant name: 1 to [`MAX_NAME_BYTES`] bytes of printable ASCII.
    pub tenant: String,
    /// Volume name: 1 to [`MAX_NAME_BYTES`] bytes of printable ASCII.
    pub volume: String,
    /// Block size in bytes: a power of two from 512 to 65536.
    pub block_size: u32,
    /// Volume size in bytes: a non-zero multiple of the block size.
    pub volume_size: u64,
    /// The snapshot the backup was taken from.
    pub snapshot_uid: [u8; 16],
    /// The snapshot's epoch.
    pub snapshot_epoch: u32,
    /// The snapshot's name: at most [`MAX_SNAPSHOT_NAME_BYTES`] bytes of
    /// printable ASCII, possibly empty.
    pub snapshot_name: String,
    /// The snapshot an incremental backup is relative to; all zeros in a full
    /// backup, never all zeros in an incremental one.
    pub base_snapshot_uid: [u8; 16],
    /// The backup an incremental backup applies on top of; all zeros in a full
    /// backup, never all zeros in an incremental one.
    pub base_backup_id: [u8; 16],
    /// Version of the tenant KEK that wrapped the DEKs (informational).
    pub kek_version: u32,
    /// The volume's DEKs: 1 to [`MAX_DEKS`], by strictly ascending version.
    pub deks: Vec<DekEntry>,
    /// The volume's writers: at most [`MAX_WRITERS`], by strictly ascending
    /// number, each deriving from a listed DEK.
    pub writers: Vec<WriterEntry>,
}

impl BackupHeader {
    /// The volume's size in blocks: frames cover LBAs below this.
    pub fn blocks(&self) -> u64 {
        self.volume_size / u64::from(self.block_size.max(1))
    }

    /// The header's bytes, checked by decoding them again: what the reader
    /// would refuse is refused here, with the same error.
    fn encode_checked(&self) -> Result<Vec<u8>, BackupFormatError> {
        let out = self.encode();
        let mut input = Input::new(out.as_slice(), false);
        let decoded = read_header(&mut input)?;
        if decoded != *self || !input.inner.is_empty() {
            return Err(BackupFormatError::InvalidHeader {
                offset: 0,
                field: "header",
                problem: "does not decode to itself".into(),
            });
        }
        Ok(out)
    }

    /// The header's bytes, unchecked.
    fn encode(&self) -> Vec<u8> {
        // A length that does not fit its field is written as the field's
        // maximum, which decoding refuses.
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(
            256 + self.deks.len() * (4 + WRAPPED_DEK_LEN)
                + self.writers.len() * (8 + WRITER_SALT_LEN),
        );
        out.extend_from_slice(&BACKUP_MAGIC);
        out.extend_from_slice(&BACKUP_FORMAT_VERSION.to_be_bytes());
        out.push(self.kind.code());
        out.push(0);
        out.extend_from_slice(&self.backup_id);
        out.extend_from_slice(&self.created.to_be_bytes());
        for name in [&self.tenant, &self.volume] {
            out.extend_from_slice(&len32(name.len()).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.volume_size.to_be_bytes());
        out.extend_from_slice(&self.snapshot_uid);
        out.extend_from_slice(&self.snapshot_epoch.to_be_bytes());
        out.extend_from_slice(&len32(self.snapshot_name.len()).to_be_bytes());
        out.extend_from_slice(self.snapshot_name.as_bytes());
        out.extend_from_slice(&self.base_snapshot_uid);
        out.extend_from_slice(&self.base_backup_id);
        out.extend_from_slice(&self.kek_version.to_be_bytes());
        let deks = u16::try_from(self.deks.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&deks.to_be_bytes());
        for dek in &self.deks {
            out.extend_from_slice(&dek.version.to_be_bytes());
            out.extend_from_slice(&dek.wrapped);
        }
        out.extend_from_slice(&len32(self.writers.len()).to_be_bytes());
        for writer in &self.writers {
            out.extend_from_slice(&writer.number.to_be_bytes());
            out.extend_from_slice(&writer.dek_version.to_be_bytes());
            out.extend_from_slice(&writer.salt);
        }
        out
    }
}

/// One frame of a backup file.
///
/// Deliberately exhaustive: a restore must handle every kind of frame, never
/// skip one it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Consecutive blocks sealed under one writer's key with consecutive nonce
    /// counters: block `lba + i` has nonce counter `nonce + i`, tag `tags[i]`
    /// and ciphertext `ciphertext[i * block size..][..block size]`.
    Blocks {
        /// LBA of the first block.
        lba: u64,
        /// DEK version, listed in the header.
        dek_version: u32,
        /// Writer number: 0 for legacy blocks, else listed in the header with
        /// `dek_version`.
        writer: u32,
        /// First block's nonce counter.
        nonce: u64,
        /// One tag per block: 1 to [`MAX_RUN_BLOCKS`].
        tags: Vec<[u8; TAG_LEN]>,
        /// The blocks' ciphertext, `tags.len()` times the block size.
        ciphertext: Vec<u8>,
    },
    /// Blocks `lba..lba + count` hold no data (read as zeros) in the snapshot;
    /// only in incremental backups.
    Unmapped {
        /// First LBA of the range.
        lba: u64,
        /// Number of blocks, at least 1.
        count: u64,
    },
}

impl Frame {
    /// LBA of the frame's first block.
    pub fn lba(&self) -> u64 {
        match self {
            Frame::Blocks { lba, .. } | Frame::Unmapped { lba, .. } => *lba,
        }
    }

    /// Number of blocks the frame covers.
    pub fn blocks(&self) -> u64 {
        match self {
            Frame::Blocks { tags, .. } => tags.len() as u64,
            Frame::Unmapped { count, .. } => *count,
        }
    }
}

/// A backup file's trailer, as read and checked by [`BackupReader`] or written
/// by [`BackupWriter::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupTrailer {
    /// Number of frames (block runs and unmapped ranges) in the file.
    pub frames: u64,
    /// Number of blocks in the block runs.
    pub mapped_blocks: u64,
    /// SHA-256 of every byte of the file before the trailer.
    pub digest: [u8; DIGEST_LEN],
    /// The MAC the writer's caller computed over [`Self::mac_input`]; this
    /// module never checks it.
    pub mac: [u8; MAC_LEN],
}

impl BackupTrailer {
    /// The bytes the MAC covers (see [`mac_input`]).
    pub fn mac_input(&self) -> [u8; MAC_INPUT_LEN] {
        mac_input(&self.digest, self.frames, self.mapped_blocks)
    }
}

/// What the trailer's MAC covers:
/// `u32(len(MAC_LABEL)) || MAC_LABEL || digest || u64(frames) || u64(mapped blocks)`,
/// [`MAC_INPUT_LEN`] bytes. The digest covers every byte before the trailer,
/// so the MAC covers the whole file but the MAC itself and the trailer's type
/// byte.
pub fn mac_input(
    digest: &[u8; DIGEST_LEN],
    frames: u64,
    mapped_blocks: u64,
) -> [u8; MAC_INPUT_LEN] {
    let mut out = [0u8; MAC_INPUT_LEN];
    let label = MAC_LABEL.len();
    // The label is 27 bytes.
    out[..4].copy_from_slice(&(label as u32).to_be_bytes());
    out[4..4 + label].copy_from_slice(MAC_LABEL);
    let rest = &mut out[4 + label..];
    rest[..DIGEST_LEN].copy_from_slice(digest);
    rest[DIGEST_LEN..DIGEST_LEN + 8].copy_from_slice(&frames.to_be_bytes());
    rest[DIGEST_LEN + 8..].copy_from_slice(&mapped_blocks.to_be_bytes());
    out
}

/// What [`BackupWriter::finish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// Length of the whole file, trailer included, in bytes.
    pub bytes: u64,
    /// The trailer as written.
    pub trailer: BackupTrailer,
}

/// A backup file could not be read, or breaks the format. Offsets count bytes
/// from the start of the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupFormatError {
    /// Reading the file failed (other than by ending early).
    #[error("cannot read the backup file at byte {offset}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// What the reader reported.
        #[source]
        source: io::Error,
    },
    /// The file ends before its trailer, or inside a field.
    #[error("backup file is truncated: it ends at byte {offset}, in the {what}")]
    Truncated {
        /// Where the file ends.
        offset: u64,
        /// The field the file ends in.
        what: &'static str,
    },
    /// The file does not start with [`BACKUP_MAGIC`].
    #[error("not a blockseal backup file: bytes 0..8 are not the magic \"BSBACKUP\"")]
    BadMagic,
    /// The format version is not [`BACKUP_FORMAT_VERSION`].
    #[error(
        "backup format version {version} is not supported (this build reads version {BACKUP_FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version the file states.
        version: u16,
    },
    /// The kind byte (byte 10) is neither 1 (full) nor 2 (incremental).
    #[error("unknown backup kind {kind} at byte 10 (1 = full, 2 = incremental)")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A reserved byte is not zero.
    #[error("reserved byte at byte {offset} is {value:#04x}, not zero")]
    Reserved {
        /// Where the byte is.
        offset: u64,
        /// Its value.
        value: u8,
    },
    /// A header field is out of its bounds or inconsistent with another.
    #[error("backup header: {field} at byte {offset} {problem}")]
    InvalidHeader {
        /// Where the field starts.
        offset: u64,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A frame starts with a type byte other than `B`, `Z` or `E`.
    #[error("unknown frame type {tag:#04x} at byte {offset}")]
    UnknownFrame {
        /// Where the frame starts.
        offset: u64,
        /// Its type byte.
        tag: u8,
    },
    /// A frame's block count or nonce counters are out of bounds.
    #[error("frame at byte {offset}: {problem}")]
    InvalidFrame {
        /// Where the frame starts.
        offset: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// A frame starts before the end of the previous one.
    #[error(
        "frame at byte {offset} starts at LBA {lba}, before the end of the previous frame \
         (LBA {next}): frames must be in ascending LBA order and must not overlap"
    )]
    OutOfOrder {
        /// Where the frame starts.
        offset: u64,
        /// Its first LBA.
        lba: u64,
        /// The first LBA after the previous frame.
        next: u64,
    },
    /// A frame reaches past the volume's last block.
    #[error(
        "frame at byte {offset} covers {count} blocks from LBA {lba}, past the end of the \
         volume ({blocks} blocks)"
    )]
    OutOfRange {
        /// Where the frame starts.
        offset: u64,
        /// Its first LBA.
        lba: u64,
        /// Its number of blocks.
        count: u64,
        /// The volume's size in blocks.
        blocks: u64,
    },
    /// A block run names a DEK version the header does not list.
    #[error(
        "block run at byte {offset} names DEK version {dek_version}, which the header does not list"
    )]
    UnknownDek {
        /// Where the frame starts.
        offset: u64,
        /// The DEK version it names.
        dek_version: u32,
    },
    /// A block run names a writer (other than 0) the header does not list.
    #[error("block run at byte {offset} names writer {writer}, which the header does not list")]
    UnknownWriter {
        /// Where the frame starts.
        offset: u64,
        /// The writer it names.
        writer: u32,
    },
    /// A block run names a writer whose key derives from another DEK.
    #[error(
        "block run at byte {offset} names DEK version {dek_version} and writer {writer}, \
         whose key derives from DEK version {writer_dek}"
    )]
    WriterDekMismatch {
        /// Where the frame starts.
        offset: u64,
        /// The DEK version the frame names.
        dek_version: u32,
        /// The writer it names.
        writer: u32,
        /// The DEK version the header lists for that writer.
        writer_dek: u32,
    },
    /// A full backup holds an unmapped range.
    #[error(
        "unmapped range at byte {offset} in a full backup (only incremental backups have them)"
    )]
    UnmappedInFull {
        /// Where the frame starts.
        offset: u64,
    },
    /// A trailer count differs from what the frames add up to.
    #[error("trailer at byte {offset} records {recorded} {what}, but the file holds {actual}")]
    CountMismatch {
        /// Where the trailer starts.
        offset: u64,
        /// "frames" or "mapped blocks".
        what: &'static str,
        /// The count in the trailer.
        recorded: u64,
        /// The count of what was read.
        actual: u64,
    },
    /// A block run's ciphertext does not match its checksum.
    #[error(
        "backup file damaged: the ciphertext of the block run at block {lba} (byte {offset}) does not match its checksum"
    )]
    ChecksumMismatch {
        /// Where the ciphertext starts.
        offset: u64,
        /// The run's first block.
        lba: u64,
    },
    /// The trailer's digest is not the SHA-256 of the bytes before it.
    #[error(
        "backup file digest mismatch: the bytes before the trailer at byte {offset} are not \
         the bytes it was written with"
    )]
    DigestMismatch {
        /// Where the trailer starts.
        offset: u64,
    },
    /// Bytes follow the trailer.
    #[error("backup file continues past its trailer, at byte {offset}")]
    TrailingBytes {
        /// Where the first extra byte is.
        offset: u64,
    },
    /// [`BackupReader::next_frame`] was called again after it failed.
    #[error("reading the backup file already failed at byte {offset}")]
    Failed {
        /// Where reading stopped.
        offset: u64,
    },
}

/// The ordering, bounds and reference rules every frame obeys, shared by the
/// reader and the writer so that they cannot disagree.
#[derive(Debug)]
struct Rules {
    kind: BackupKind,
    block_size: u32,
    blocks: u64,
    /// DEK versions, ascending.
    deks: Vec<u32>,
    /// `(writer number, DEK version)`, ascending by number.
    writers: Vec<(u32, u32)>,
    /// The lowest LBA the next frame may start at.
    next_lba: u64,
    frames: u64,
    mapped: u64,
}

impl Rules {
    fn new(header: &BackupHeader) -> Rules {
        Rules {
            kind: header.kind,
            block_size: header.block_size,
            blocks: header.blocks(),
            deks: header.deks.iter().map(|d| d.version).collect(),
            writers: header
                .writers
                .iter()
                .map(|w| (w.number, w.dek_version))
                .collect(),
            next_lba: 0,
            frames: 0,
            mapped: 0,
        }
    }

    /// Bytes of ciphertext in a run of `count` blocks (at most 16 MiB).
    fn run_bytes(&self, count: u16) -> usize {
        usize::from(count) * self.block_size as usize
    }

    fn range(&self, offset: u64, lba: u64, count: u64) -> Result<(), BackupFormatError> {
        if lba < self.next_lba {
            return Err(BackupFormatError::OutOfOrder {
                offset,
                lba,
                next: self.next_lba,
            });
        }
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(BackupFormatError::OutOfRange {
                offset,
                lba,
                count,
                blocks: self.blocks,
            }),
        }
    }

    /// Checks the fixed fields of a block run at byte `offset` and counts it.
    fn block_run(
        &mut self,
        offset: u64,
        lba: u64,
        blocks: u64,
        dek_version: u32,
        writer: u32,
        nonce: u64,
    ) -> Result<(), BackupFormatError> {
        if blocks == 0 || blocks > MAX_RUN_BLOCKS as u64 {
            return Err(BackupFormatError::InvalidFrame {
                offset,
                problem: format!("block run of {blocks} blocks; expected 1 to {MAX_RUN_BLOCKS}"),
            });
        }
        self.range(offset, lba, blocks)?;
        if self.deks.binary_search(&dek_version).is_err() {
            return Err(BackupFormatError::UnknownDek {
                offset,
                dek_version,
            });
        }
        if writer != 0 {
            match self.writers.binary_search_by_key(&writer, |&(n, _)| n) {
                Ok(i) if self.writers[i].1 == dek_version => {}
                Ok(i) => {
                    return Err(BackupFormatError::WriterDekMismatch {
                        offset,
                        dek_version,
                        writer,
                        writer_dek: self.writers[i].1,
                    });
                }
                Err(_) => return Err(BackupFormatError::UnknownWriter { offset, writer }),
            }
        }
        if nonce.checked_add(blocks - 1).is_none() {
            return Err(BackupFormatError::InvalidFrame {
                offset,
                problem: format!("nonce counters from {nonce} for {blocks} blocks overflow"),
            });
        }
        // In range, so neither sum overflows.
        self.next_lba = lba + blocks;
        self.frames += 1;
        self.mapped += blocks;
        Ok(())
    }

    /// Checks an unmapped range at byte `offset` and counts it.
    fn unmapped(&mut self, offset: u64, lba: u64, count: u64) -> Result<(), BackupFormatError> {
        if self.kind == BackupKind::Full {
            return Err(BackupFormatError::UnmappedInFull { offset });
        }
        if count == 0 {
            return Err(BackupFormatError::InvalidFrame {
                offset,
                problem: "unmapped range of 0 blocks".into(),
            });
        }
        self.range(offset, lba, count)?;
        self.next_lba = lba + count;
        self.frames += 1;
        Ok(())
    }
}

/// The reading side: counts and hashes every byte it hands out (unless the
/// reader checks framing only).
struct Input<R> {
    inner: R,
    digest: Hasher,
    offset: u64,
}

/// The running digest, or nothing for a reader that checks framing only.
struct Hasher(Option<digest::Context>);

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(d) = self.0.as_mut() {
            d.update(bytes);
        }
    }

    /// The digest so far, or `None` when not hashing.
    fn finish(&self) -> Option<digest::Digest> {
        self.0.as_ref().map(|d| d.clone().finish())
    }
}

impl<R: Read> Input<R> {
    fn new(inner: R, hashed: bool) -> Input<R> {
        Input {
            inner,
            digest: Hasher(hashed.then(|| digest::Context::new(&digest::SHA256))),
            offset: 0,
        }
    }

    /// Fills `buf` from the stream and hashes it.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), BackupFormatError> {
        self.fill_unhashed(buf, what)?;
        self.digest.update(buf);
        Ok(())
    }

    /// Fills `buf` from the stream (counted, not hashed).
    fn fill_unhashed(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), BackupFormatError> {
        let mut filled = 0;
        while filled < buf.len() {
            let at = self.offset + filled as u64;
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => return Err(BackupFormatError::Truncated { offset: at, what }),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(BackupFormatError::Truncated { offset: at, what });
                }
                Err(source) => return Err(BackupFormatError::Io { offset: at, source }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next byte, or `None` at the end of the stream; counted, not hashed.
    fn next_byte(&mut self) -> Result<Option<u8>, BackupFormatError> {
        let mut byte = [0u8; 1];
        loop {
            match self.inner.read(&mut byte) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.offset += 1;
                    return Ok(Some(byte[0]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(source) => {
                    return Err(BackupFormatError::Io {
                        offset: self.offset,
                        source,
                    });
                }
            }
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BackupFormatError> {
        let mut out = [0u8; N];
        self.fill(&mut out, what)?;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, BackupFormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, BackupFormatError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, BackupFormatError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, BackupFormatError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// `len` bytes (already checked against the format's bounds), hashed.
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>, BackupFormatError> {
        let out = self.unhashed_bytes(len, what)?;
        self.digest.update(&out);
        Ok(out)
    }

    /// `len` bytes (already checked against the format's bounds), the buffer
    /// growing only as they arrive; not hashed (a block run's ciphertext,
    /// which its checksum covers).
    fn unhashed_bytes(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<Vec<u8>, BackupFormatError> {
        let mut out = Vec::with_capacity(len.min(READ_CHUNK));
        while out.len() < len {
            let start = out.len();
            out.resize(start + (len - start).min(READ_CHUNK), 0);
            self.fill_unhashed(&mut out[start..], what)?;
        }
        Ok(out)
    }
}

/// A length-prefixed name of `min..=max` bytes of printable ASCII.
fn read_name<R: Read>(
    input: &mut Input<R>,
    field: &'static str,
    min: usize,
    max: usize,
) -> Result<String, BackupFormatError> {
    let offset = input.offset;
    let len = input.u32(field)?;
    let invalid = |problem: String| BackupFormatError::InvalidHeader {
        offset,
        field,
        problem,
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| invalid(format!("is {len} bytes long; expected {min} to {max}")))?;
    let bytes = input.bytes(len, field)?;
    if !bytes.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err(invalid("is not printable ASCII".into()));
    }
    String::from_utf8(bytes).map_err(|_| invalid("is not printable ASCII".into()))
}

/// Reads and checks the header, leaving `input` at the first frame.
fn read_header<R: Read>(input: &mut Input<R>) -> Result<BackupHeader, BackupFormatError> {
    let invalid =
        |offset: u64, field: &'static str, problem: String| BackupFormatError::InvalidHeader {
            offset,
            field,
            problem,
        };
    if input.array::<8>("magic")? != BACKUP_MAGIC {
        return Err(BackupFormatError::BadMagic);
    }
    let version = input.u16("format version")?;
    if version != BACKUP_FORMAT_VERSION {
        return Err(BackupFormatError::UnsupportedVersion { version });
    }
    let kind = input.u8("kind")?;
    let kind = BackupKind::from_code(kind).ok_or(BackupFormatError::UnknownKind { kind })?;
    let offset = input.offset;
    let reserved = input.u8("reserved byte")?;
    if reserved != 0 {
        return Err(BackupFormatError::Reserved {
            offset,
            value: reserved,
        });
    }
    let backup_id = input.array("backup id")?;
    let created = input.u64("creation time")?;
    let tenant = read_name(input, "tenant name", 1, MAX_NAME_BYTES)?;
    let volume = read_name(input, "volume name", 1, MAX_NAME_BYTES)?;

    let offset = input.offset;
    let block_size = input.u32("block size")?;
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(invalid(
            offset,
            "block size",
            format!("is {block_size}; expected a power of two from 512 to 65536"),
        ));
    }
    let offset = input.offset;
    let volume_size = input.u64("volume size")?;
    if volume_size == 0 || volume_size % u64::from(block_size) != 0 {
        return Err(invalid(
            offset,
            "volume size",
            format!(
                "is {volume_size}; expected a non-zero multiple of the block size {block_size}"
            ),
        ));
    }

    let snapshot_uid = input.array("snapshot uid")?;
    let snapshot_epoch = input.u32("snapshot epoch")?;
    let snapshot_name = read_name(input, "snapshot name", 0, MAX_SNAPSHOT_NAME_BYTES)?;
    let base_offset = input.offset;
    let base_snapshot_uid: [u8; 16] = input.array("base snapshot uid")?;
    let base_backup_id: [u8; 16] = input.array("base backup id")?;
    for (at, field, value) in [
        (base_offset, "base snapshot uid", &base_snapshot_uid),
        (base_offset + 16, "base backup id", &base_backup_id),
    ] {
        let zero = value.iter().all(|&b| b == 0);
        match kind {
            BackupKind::Full if !zero => {
                return Err(invalid(at, field, "is not zero in a full backup".into()));
            }
            BackupKind::Incremental if zero => {
                return Err(invalid(
                    at,
                    field,
                    "is zero in an incremental backup".into(),
                ));
            }
            _ => {}
        }
    }
    let kek_version = input.u32("KEK version")?;

    let offset = input.offset;
    let dek_count = input.u16("DEK count")?;
    if dek_count == 0 || usize::from(dek_count) > MAX_DEKS {
        return Err(invalid(
            offset,
            "DEK count",
            format!("is {dek_count}; expected 1 to {MAX_DEKS}"),
        ));
    }
    let mut deks: Vec<DekEntry> = Vec::with_capacity(usize::from(dek_count));
    for _ in 0..dek_count {
        let offset = input.offset;
        let version = input.u32("DEK version")?;
        if let Some(last) = deks.last()
            && version <= last.version
        {
            return Err(invalid(
                offset,
                "DEK version",
                format!(
                    "{version} follows {}: versions must be strictly ascending",
                    last.version
                ),
            ));
        }
        let wrapped = input.array("wrapped DEK")?;
        deks.push(DekEntry { version, wrapped });
    }

    let offset = input.offset;
    let writer_count = input.u32("writer count")?;
    let writer_count = usize::try_from(writer_count)
        .ok()
        .filter(|&n| n <= MAX_WRITERS)
        .ok_or_else(|| {
            invalid(
                offset,
                "writer count",
                format!("is {writer_count}; at most {MAX_WRITERS} are allowed"),
            )
        })?;
    // Grown as entries arrive: a short file claiming a million writers gets
    // no million-entry buffer.
    let mut writers: Vec<WriterEntry> = Vec::with_capacity(writer_count.min(1024));
    for _ in 0..writer_count {
        let offset = input.offset;
        let number = input.u32("writer number")?;
        if number == 0 {
            return Err(invalid(
                offset,
                "writer number",
                "is 0, which stands for legacy blocks and is never listed".into(),
            ));
        }
        if let Some(last) = writers.last()
            && number <= last.number
        {
            return Err(invalid(
                offset,
                "writer number",
                format!(
                    "{number} follows {}: numbers must be strictly ascending",
                    last.number
                ),
            ));
        }
        let offset = input.offset;
        let dek_version = input.u32("writer's DEK version")?;
        if deks
            .binary_search_by_key(&dek_version, |d| d.version)
            .is_err()
        {
            return Err(invalid(
                offset,
                "writer's DEK version",
                format!("of writer {number} is {dek_version}, which the header does not list"),
            ));
        }
        let salt = input.array("writer salt")?;
        writers.push(WriterEntry {
            number,
            dek_version,
            salt,
        });
    }

    Ok(BackupHeader {
        kind,
        backup_id,
        created,
        tenant,
        volume,
        block_size,
        volume_size,
        snapshot_uid,
        snapshot_epoch,
        snapshot_name,
        base_snapshot_uid,
        base_backup_id,
        kek_version,
        deks,
        writers,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Frames,
    Done,
    Failed(u64),
}

/// Reads a backup file front to back, one frame at a time, checking
/// everything the format lets it check without keys.
///
/// ```no_run
/// # use blockseal_volume::backup_format::{BackupReader, Frame};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let file = std::io::BufReader::new(std::fs::File::open("volume.bsbackup")?);
/// let mut reader = BackupReader::new(file)?;
/// while let Some(frame) = reader.next_frame()? {
///     // Stage the frame; apply nothing before the trailer is checked.
/// #   let _ = frame;
/// }
/// let mac_input = reader.mac_input().expect("the trailer was read");
/// // Check reader.trailer().unwrap().mac over mac_input with the backup's key.
/// # let _ = mac_input;
/// # Ok(())
/// # }
/// ```
///
/// Nothing a frame says can be trusted before [`Self::next_frame`] has
/// returned `Ok(None)` and the caller has checked the MAC.
pub struct BackupReader<R> {
    input: Input<R>,
    header: BackupHeader,
    rules: Rules,
    state: ReadState,
    trailer: Option<BackupTrailer>,
    /// A framing-only reader's buffer for block runs' ciphertext, reused
    /// from run to run; `None` for a reader that returns the ciphertext.
    scratch: Option<Vec<u8>>,
}

impl<R: Read> BackupReader<R> {
    /// Reads and checks the header.
    pub fn new(input: R) -> Result<BackupReader<R>, BackupFormatError> {
        Self::with_digest(input, true)
    }

    /// A reader that checks everything but the trailer's digest: the
    /// framing, every rule of the header and frames, the counts, that the
    /// trailer is there and nothing follows it. For a stream whose producer
    /// is trusted (a backup on its way from the server that wrote it to a
    /// file), where only completeness is in question: it does not hash the
    /// bytes. Anything that must detect damage uses [`Self::new`]. A block
    /// run's ciphertext is checked against its CRC-32C as it passes and not
    /// kept: its frames' `ciphertext` is empty.
    pub fn framing_only(input: R) -> Result<BackupReader<R>, BackupFormatError> {
        Self::with_digest(input, false)
    }

    fn with_digest(input: R, hashed: bool) -> Result<BackupReader<R>, BackupFormatError> {
        let mut input = Input::new(input, hashed);
        let header = read_header(&mut input)?;
        let rules = Rules::new(&header);
        Ok(BackupReader {
            input,
            header,
            rules,
            state: ReadState::Frames,
            trailer: None,
            scratch: (!hashed).then(Vec::new),
        })
    }

    /// The header.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.input.offset
    }

    /// The next frame; `None` once the trailer has been read, its digest and
    /// counts checked and the end of the stream reached (and on every call
    /// after that). After an error, every further call fails with
    /// [`BackupFormatError::Failed`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, BackupFormatError> {
        match self.state {
            ReadState::Frames => {}
            ReadState::Done => return Ok(None),
            ReadState::Failed(offset) => return Err(BackupFormatError::Failed { offset }),
        }
        let result = self.read_frame();
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = ReadState::Done,
            Err(_) => self.state = ReadState::Failed(self.input.offset),
        }
        result
    }

    /// The trailer, once [`Self::next_frame`] has returned `None`: its digest
    /// and counts are checked, its MAC is the caller's to check.
    pub fn trailer(&self) -> Option<&BackupTrailer> {
        self.trailer.as_ref()
    }

    /// The bytes the trailer's MAC covers, once [`Self::next_frame`] has
    /// returned `None` (see [`mac_input`]).
    pub fn mac_input(&self) -> Option<[u8; MAC_INPUT_LEN]> {
        self.trailer.as_ref().map(BackupTrailer::mac_input)
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.input.inner
    }

    fn read_frame(&mut self) -> Result<Option<Frame>, BackupFormatError> {
        let offset = self.input.offset;
        let Some(tag) = self.input.next_byte()? else {
            return Err(BackupFormatError::Truncated {
                offset,
                what: "frames (no trailer)",
            });
        };
        match tag {
            FRAME_BLOCKS => {
                self.input.digest.update(&[tag]);
                let lba = self.input.u64("block run's LBA")?;
                let count = self.input.u16("block run's count")?;
                let dek_version = self.input.u32("block run's DEK version")?;
                let writer = self.input.u32("block run's writer")?;
                let nonce = self.input.u64("block run's nonce counter")?;
                let checksum = self.input.u32("block run's checksum")?;
                self.rules
                    .block_run(offset, lba, u64::from(count), dek_version, writer, nonce)?;
                let mut tags = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    tags.push(self.input.array("block run's tags")?);
                }
                let at = self.input.offset;
                let len = self.rules.run_bytes(count);
                let what = "block run's ciphertext";
                let (crc, ciphertext) = match self.scratch.as_mut() {
                    Some(scratch) => {
                        // Grows to the largest run once; never zeroed again.
                        if scratch.len() < len {
                            scratch.resize(len, 0);
                        }
                        self.input.fill_unhashed(&mut scratch[..len], what)?;
                        (crc32c::crc32c(&scratch[..len]), Vec::new())
                    }
                    None => {
                        let ciphertext = self.input.unhashed_bytes(len, what)?;
                        (crc32c::crc32c(&ciphertext), ciphertext)
                    }
                };
                if crc != checksum {
                    return Err(BackupFormatError::ChecksumMismatch { offset: at, lba });
                }
                Ok(Some(Frame::Blocks {
                    lba,
                    dek_version,
                    writer,
                    nonce,
                    tags,
                    ciphertext,
                }))
            }
            FRAME_UNMAPPED => {
                self.input.digest.update(&[tag]);
                let lba = self.input.u64("unmapped range's LBA")?;
                let count = self.input.u64("unmapped range's count")?;
                self.rules.unmapped(offset, lba, count)?;
                Ok(Some(Frame::Unmapped { lba, count }))
            }
            FRAME_END => {
                // The digest covers every byte before the trailer's type byte.
                let computed = self.input.digest.finish();
                let frames = self.input.u64("trailer's frame count")?;
                let mapped_blocks = self.input.u64("trailer's mapped block count")?;
                let digest: [u8; DIGEST_LEN] = self.input.array("trailer's digest")?;
                let mac = self.input.array("trailer's MAC")?;
                if computed.is_some_and(|c| c.as_ref() != digest) {
                    return Err(BackupFormatError::DigestMismatch { offset });
                }
                for (what, recorded, actual) in [
                    ("frames", frames, self.rules.frames),
                    ("mapped blocks", mapped_blocks, self.rules.mapped),
                ] {
                    if recorded != actual {
                        return Err(BackupFormatError::CountMismatch {
                            offset,
                            what,
                            recorded,
                            actual,
                        });
                    }
                }
                let end = self.input.offset;
                if self.input.next_byte()?.is_some() {
                    return Err(BackupFormatError::TrailingBytes { offset: end });
                }
                self.trailer = Some(BackupTrailer {
                    frames,
                    mapped_blocks,
                    digest,
                    mac,
                });
                Ok(None)
            }
            tag => Err(BackupFormatError::UnknownFrame { offset, tag }),
        }
    }
}

impl<R> std::fmt::Debug for BackupReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupReader")
            .field("offset", &self.input.offset)
            .field("tenant", &self.header.tenant)
            .field("volume", &self.header.volume)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Writes a backup file front to back: the header at [`Self::new`], then one
/// frame per call, in ascending LBA order, then the trailer at
/// [`Self::finish`].
///
/// A call that breaks a rule of the format fails with
/// [`io::ErrorKind::InvalidInput`] (the message is the reader's) and writes
/// nothing; the writer stays usable. A failed write of the underlying stream
/// leaves the file unfinished, and every later call fails.
pub struct BackupWriter<W: Write> {
    out: W,
    digest: digest::Context,
    written: u64,
    rules: Rules,
    failed: bool,
}

impl<W: Write> BackupWriter<W> {
    /// Checks `header` and writes it.
    pub fn new(out: W, header: &BackupHeader) -> io::Result<BackupWriter<W>> {
        let bytes = header.encode_checked().map_err(invalid_input)?;
        let mut writer = BackupWriter {
            out,
            digest: digest::Context::new(&digest::SHA256),
            written: 0,
            rules: Rules::new(header),
            failed: false,
        };
        writer.put(&bytes)?;
        Ok(writer)
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.rules.frames
    }

    /// Blocks written so far in block runs.
    pub fn mapped_blocks(&self) -> u64 {
        self.rules.mapped
    }

    /// Writes a block run: `tags.len()` blocks (1 to [`MAX_RUN_BLOCKS`]) from
    /// `lba`, sealed by `writer` (0: legacy, under the DEK itself) under DEK
    /// `dek_version` with nonce counters from `nonce`; `ciphertext` holds
    /// `tags.len()` blocks.
    pub fn block_run(
        &mut self,
        lba: u64,
        dek_version: u32,
        writer: u32,
        nonce: u64,
        tags: &[[u8; TAG_LEN]],
        ciphertext: &[u8],
    ) -> io::Result<()> {
        let offset = self.written;
        self.check_usable()?;
        let expected = tags.len().saturating_mul(self.rules.block_size as usize);
        if ciphertext.len() != expected {
            return Err(invalid_input(BackupFormatError::InvalidFrame {
                offset,
                problem: format!(
                    "{} bytes of ciphertext for {} blocks of {} bytes",
                    ciphertext.len(),
                    tags.len(),
                    self.rules.block_size
                ),
            }));
        }
        self.rules
            .block_run(offset, lba, tags.len() as u64, dek_version, writer, nonce)
            .map_err(invalid_input)?;
        // At most MAX_RUN_BLOCKS, checked above.
        let count = tags.len() as u16;
        let mut head = [0u8; BLOCK_RUN_HEAD];
        head[0] = FRAME_BLOCKS;
        head[1..9].copy_from_slice(&lba.to_be_bytes());
        head[9..11].copy_from_slice(&count.to_be_bytes());
        head[11..15].copy_from_slice(&dek_version.to_be_bytes());
        head[15..19].copy_from_slice(&writer.to_be_bytes());
        head[19..27].copy_from_slice(&nonce.to_be_bytes());
        head[27..31].copy_from_slice(&crc32c::crc32c(ciphertext).to_be_bytes());
        self.put(&head)?;
        self.put(tags.as_flattened())?;
        self.put_unhashed(ciphertext)
    }

    /// Writes an unmapped range: blocks `lba..lba + count` hold no data
    /// (incremental backups only).
    pub fn unmapped(&mut self, lba: u64, count: u64) -> io::Result<()> {
        self.check_usable()?;
        self.rules
            .unmapped(self.written, lba, count)
            .map_err(invalid_input)?;
        let mut frame = [0u8; 17];
        frame[0] = FRAME_UNMAPPED;
        frame[1..9].copy_from_slice(&lba.to_be_bytes());
        frame[9..17].copy_from_slice(&count.to_be_bytes());
        self.put(&frame)
    }

    /// Writes the trailer and flushes the stream. `mac` gets the bytes the MAC
    /// covers ([`mac_input`]) and returns the MAC.
    pub fn finish(
        mut self,
        mac: impl FnOnce(&[u8]) -> [u8; MAC_LEN],
    ) -> io::Result<(W, BackupSummary)> {
        self.check_usable()?;
        let mut digest = [0u8; DIGEST_LEN];
        digest.copy_from_slice(self.digest.clone().finish().as_ref());
        let trailer = BackupTrailer {
            frames: self.rules.frames,
            mapped_blocks: self.rules.mapped,
            digest,
            mac: mac(&mac_input(&digest, self.rules.frames, self.rules.mapped)),
        };
        let mut bytes = [0u8; 1 + 8 + 8 + DIGEST_LEN + MAC_LEN];
        bytes[0] = FRAME_END;
        bytes[1..9].copy_from_slice(&trailer.frames.to_be_bytes());
        bytes[9..17].copy_from_slice(&trailer.mapped_blocks.to_be_bytes());
        bytes[17..17 + DIGEST_LEN].copy_from_slice(&trailer.digest);
        bytes[17 + DIGEST_LEN..].copy_from_slice(&trailer.mac);
        self.put(&bytes)?;
        self.out.flush()?;
        let summary = BackupSummary {
            bytes: self.written,
            trailer,
        };
        Ok((self.out, summary))
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write of this backup file failed; the file is unfinished",
            ));
        }
        Ok(())
    }

    /// Writes and hashes `bytes`.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.digest.update(bytes);
        self.put_unhashed(bytes)
    }

    /// Writes `bytes` without hashing them (a block run's ciphertext, which
    /// its checksum covers).
    fn put_unhashed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.check_usable()?;
        if let Err(e) = self.out.write_all(bytes) {
            self.failed = true;
            return Err(e);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl<W: Write> std::fmt::Debug for BackupWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter")
            .field("written", &self.written)
            .field("frames", &self.rules.frames)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn invalid_input(e: BackupFormatError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// A header with made-up contents (two DEKs, two writers), for the codec's
/// own tests and its fuzz target; not part of the supported API.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub fn sample_header(kind: BackupKind, block_size: u32, blocks: u64) -> BackupHeader {
    let incremental = kind == BackupKind::Incremental;
    BackupHeader {
        kind,
        backup_id: [0xb1; 16],
        created: 1_700_000_000,
        tenant: "acme".into(),
        volume: "voicemail".into(),
        block_size,
        volume_size: blocks * u64::from(block_size),
        snapshot_uid: [0x51; 16],
        snapshot_epoch: 7,
        snapshot_name: "nightly 2024-01-01".into(),
        base_snapshot_uid: if incremental { [0x50; 16] } else { [0; 16] },
        base_backup_id: if incremental { [0xb0; 16] } else { [0; 16] },
        kek_version: 3,
        deks: vec![
            DekEntry {
                version: 1,
                wrapped: [0xd1; WRAPPED_DEK_LEN],
            },
            DekEntry {
                version: 2,
                wrapped: [0xd2; WRAPPED_DEK_LEN],
            },
        ],
        writers: vec![
            WriterEntry {
                number: 1,
                dek_version: 1,
                salt: [1; 32],
            },
            WriterEntry {
                number: 4,
                dek_version: 2,
                salt: [4; 32],
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::hmac;

    const MAC_KEY: &[u8] = b"backup_format test MAC key";
    const BS: u32 = 512;
    const BLOCKS: u64 = 64;

    fn mac_key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, MAC_KEY)
    }

    fn mac(input: &[u8]) -> [u8; MAC_LEN] {
        hmac::sign(&mac_key(), input).as_ref().try_into().unwrap()
    }

    fn mac_ok(trailer: &BackupTrailer) -> bool {
        hmac::verify(&mac_key(), &trailer.mac_input(), &trailer.mac).is_ok()
    }

    fn header(kind: BackupKind) -> BackupHeader {
        sample_header(kind, BS, BLOCKS)
    }

    /// A block run with tags and ciphertext that differ per block.
    fn run(lba: u64, n: usize, dek_version: u32, writer: u32, nonce: u64) -> Frame {
        let seed = lba as u8;
        Frame::Blocks {
            lba,
            dek_version,
            writer,
            nonce,
            tags: (0..n).map(|i| [seed ^ (i as u8) ^ 0x5a; TAG_LEN]).collect(),
            ciphertext: (0..n * BS as usize)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect(),
        }
    }

    fn full_frames() -> Vec<Frame> {
        vec![
            run(0, 3, 1, 1, 0),
            // Legacy blocks: writer 0, any listed DEK.
            run(3, 1, 2, 0, 100),
            run(10, 5, 2, 4, 7),
            run(63, 1, 1, 1, 3),
        ]
    }

    fn incremental_frames() -> Vec<Frame> {
        vec![
            run(0, 2, 1, 1, 9),
            Frame::Unmapped { lba: 2, count: 3 },
            run(5, 1, 2, 4, 0),
            Frame::Unmapped { lba: 6, count: 1 },
            Frame::Unmapped { lba: 20, count: 44 },
        ]
    }

    fn put(w: &mut BackupWriter<Vec<u8>>, frame: &Frame) -> io::Result<()> {
        match frame {
            Frame::Blocks {
                lba,
                dek_version,
                writer,
                nonce,
                tags,
                ciphertext,
            } => w.block_run(*lba, *dek_version, *writer, *nonce, tags, ciphertext),
            Frame::Unmapped { lba, count } => w.unmapped(*lba, *count),
        }
    }

    /// The file, its summary and where each frame (then the trailer) starts.
    fn write(header: &BackupHeader, frames: &[Frame]) -> (Vec<u8>, BackupSummary, Vec<usize>) {
        let mut w = BackupWriter::new(Vec::new(), header).unwrap();
        let mut starts = Vec::new();
        for frame in frames {
            starts.push(w.bytes_written() as usize);
            put(&mut w, frame).unwrap();
        }
        starts.push(w.bytes_written() as usize);
        let (bytes, summary) = w.finish(mac).unwrap();
        assert_eq!(summary.bytes, bytes.len() as u64);
        (bytes, summary, starts)
    }

    type Read = (BackupHeader, Vec<Frame>, BackupTrailer);

    fn read_all(bytes: &[u8]) -> Result<Read, BackupFormatError> {
        read_from(bytes)
    }

    fn read_from(input: impl io::Read) -> Result<Read, BackupFormatError> {
        let mut reader = BackupReader::new(input)?;
        let mut frames = Vec::new();
        while let Some(frame) = reader.next_frame()? {
            frames.push(frame);
        }
        let trailer = *reader.trailer().expect("a trailer after the last frame");
        assert_eq!(reader.mac_input(), Some(trailer.mac_input()));
        Ok((reader.header().clone(), frames, trailer))
    }

    /// `body` (header and frames) followed by a trailer with a correct digest,
    /// as anyone can make without the MAC key.
    fn reseal(body: &[u8], frames: u64, mapped: u64) -> Vec<u8> {
        let digest = digest_of(body);
        let mut out = body.to_vec();
        out.push(FRAME_END);
        out.extend_from_slice(&frames.to_be_bytes());
        out.extend_from_slice(&mapped.to_be_bytes());
        out.extend_from_slice(&digest);
        out.extend_from_slice(&[0x77; MAC_LEN]);
        out
    }

    /// A block run's bytes, unchecked.
    fn raw_run(lba: u64, count: u16, dek: u32, writer: u32, nonce: u64) -> Vec<u8> {
        let mut out = vec![FRAME_BLOCKS];
        out.extend_from_slice(&lba.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&dek.to_be_bytes());
        out.extend_from_slice(&writer.to_be_bytes());
        out.extend_from_slice(&nonce.to_be_bytes());
        let ciphertext = vec![0x3c; usize::from(count) * BS as usize];
        out.extend_from_slice(&crc32c::crc32c(&ciphertext).to_be_bytes());
        out.resize(out.len() + usize::from(count) * TAG_LEN, 0x3c);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The digest of `body` (a header and frames of block size `BS`, or the
    /// header's): SHA-256 of every byte but the block runs' ciphertext.
    fn digest_of(body: &[u8]) -> [u8; 32] {
        let mut reader = BackupReader::framing_only(body).unwrap();
        let bs = reader.header().block_size as usize;
        let mut at = reader.offset() as usize;
        let _ = reader.next_frame();
        let mut d = digest::Context::new(&digest::SHA256);
        d.update(&body[..at]);
        while at < body.len() {
            match body[at] {
                FRAME_BLOCKS if at + 11 <= body.len() => {
                    let n = usize::from(u16::from_be_bytes([body[at + 9], body[at + 10]]));
                    let hashed = (at + BLOCK_RUN_HEAD + n * TAG_LEN).min(body.len());
                    d.update(&body[at..hashed]);
                    at = (hashed + n * bs).min(body.len());
                }
                _ => {
                    let end = (at + 17).min(body.len());
                    d.update(&body[at..end]);
                    at = end;
                }
            }
        }
        d.finish().as_ref().try_into().unwrap()
    }

    fn raw_unmapped(lba: u64, count: u64) -> Vec<u8> {
        let mut out = vec![FRAME_UNMAPPED];
        out.extend_from_slice(&lba.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out
    }

    /// Hands out at most one byte per read.
    struct Trickle<'a>(&'a [u8]);

    impl io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn full_and_incremental_backups_round_trip() {
        for (kind, frames) in [
            (BackupKind::Full, full_frames()),
            (BackupKind::Incremental, incremental_frames()),
        ] {
            let h = header(kind);
            let (bytes, summary, starts) = write(&h, &frames);
            // The lengths docs/FORMAT.md gives.
            assert_eq!(starts[0], 122 + 4 + 9 + 18 + 64 * 2 + 40 * 2);
            for (frame, pair) in frames.iter().zip(starts.windows(2)) {
                let len = match frame {
                    Frame::Blocks { tags, .. } => BLOCK_RUN_HEAD + tags.len() * (16 + BS as usize),
                    Frame::Unmapped { .. } => 17,
                };
                assert_eq!(pair[1] - pair[0], len);
            }
            assert_eq!(bytes.len() - starts[frames.len()], 81);
            let mapped: u64 = frames
                .iter()
                .filter(|f| matches!(f, Frame::Blocks { .. }))
                .map(Frame::blocks)
                .sum();
            assert_eq!(summary.trailer.frames, frames.len() as u64);
            assert_eq!(summary.trailer.mapped_blocks, mapped);
            for read in [
                read_all(&bytes).unwrap(),
                read_from(Trickle(&bytes)).unwrap(),
            ] {
                let (header, read_frames, trailer) = read;
                assert_eq!(header, h);
                assert_eq!(read_frames, frames);
                assert_eq!(trailer, summary.trailer);
                assert!(mac_ok(&trailer));
            }
            assert_eq!(&bytes[..8], b"BSBACKUP");
            assert_eq!(bytes[10], kind.code());
            assert_eq!(
                summary.trailer.digest,
                digest_of(&bytes[..bytes.len() - 81])
            );
        }
        // No frames at all is a valid (empty) backup.
        let (bytes, summary, _) = write(&header(BackupKind::Full), &[]);
        let (_, frames, trailer) = read_all(&bytes).unwrap();
        assert!(frames.is_empty());
        assert_eq!((trailer.frames, trailer.mapped_blocks), (0, 0));
        assert_eq!(trailer, summary.trailer);
    }

    #[test]
    fn the_largest_block_run_round_trips() {
        let h = BackupHeader {
            block_size: 65536,
            volume_size: 1024 * 65536,
            writers: Vec::new(),
            ..header(BackupKind::Full)
        };
        let frame = Frame::Blocks {
            lba: 1024 - MAX_RUN_BLOCKS as u64,
            dek_version: 2,
            writer: 0,
            nonce: u64::MAX - (MAX_RUN_BLOCKS as u64 - 1),
            tags: vec![[9; TAG_LEN]; MAX_RUN_BLOCKS],
            ciphertext: (0..MAX_RUN_BLOCKS * 65536).map(|i| i as u8).collect(),
        };
        let (bytes, _, _) = write(&h, std::slice::from_ref(&frame));
        let (_, frames, _) = read_all(&bytes).unwrap();
        assert_eq!(frames, [frame]);
    }

    #[test]
    fn every_truncation_is_reported_where_the_file_ends() {
        let (bytes, _, _) = write(&header(BackupKind::Incremental), &incremental_frames());
        for len in 0..bytes.len() {
            match read_all(&bytes[..len]) {
                Err(BackupFormatError::Truncated { offset, what }) => {
                    assert_eq!(offset, len as u64, "{what}");
                }
                other => panic!("{len} of {} bytes: {other:?}", bytes.len()),
            }
        }
        // A clean end between frames is a truncation too: no trailer.
        let trailer = bytes.len() - 81;
        let e = read_all(&bytes[..trailer]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "backup file is truncated: it ends at byte {trailer}, in the frames (no trailer)"
            )
        );
    }

    #[test]
    fn a_framing_only_reader_finds_cuts_and_extra_bytes_but_not_damage() {
        let (bytes, _, _) = write(&header(BackupKind::Incremental), &incremental_frames());
        let framing = |b: &[u8]| -> Result<u64, BackupFormatError> {
            let mut r = BackupReader::framing_only(b)?;
            let mut n = 0;
            while r.next_frame()?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(framing(&bytes).unwrap(), incremental_frames().len() as u64);
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    framing(&bytes[..len]),
                    Err(BackupFormatError::Truncated { .. })
                ),
                "{len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            framing(&longer),
            Err(BackupFormatError::TrailingBytes { .. })
        ));
        // A changed ciphertext byte fails its run's checksum either way.
        let mut damaged = bytes.clone();
        damaged[bytes.len() - 200] ^= 1;
        assert!(matches!(
            framing(&damaged),
            Err(BackupFormatError::ChecksumMismatch { .. })
        ));
        // A changed digest passes framing (the full reader finds it).
        let mut damaged = bytes.clone();
        damaged[bytes.len() - 40] ^= 1;
        assert!(framing(&damaged).is_ok());
        assert!(matches!(
            read_all(&damaged),
            Err(BackupFormatError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn every_changed_byte_is_refused_or_fails_the_mac() {
        let frames = full_frames();
        let (bytes, _, starts) = write(&header(BackupKind::Full), &frames);
        let trailer = *starts.last().unwrap();
        let mac_at = bytes.len() - MAC_LEN;
        for position in 0..bytes.len() {
            for xor in [0x01, 0x80] {
                let mut changed = bytes.clone();
                changed[position] ^= xor;
                match read_all(&changed) {
                    Ok((_, _, t)) => {
                        assert!(
                            position >= mac_at,
                            "byte {position} ^ {xor:#x} was accepted"
                        );
                        assert!(!mac_ok(&t), "byte {position} ^ {xor:#x} kept the MAC valid");
                    }
                    Err(e) => {
                        assert!(position < mac_at, "{position}: {e}");
                        // Bytes nothing checks but the digest: a block's tags
                        // and ciphertext, and the trailer's digest.
                        // A run's checksum and ciphertext: the checksum.
                        let (run, tail) = (starts[2] + 27, starts[3]);
                        let tags = starts[2] + BLOCK_RUN_HEAD;
                        let ciphertext = tags + TAG_LEN * (tail - tags) / (TAG_LEN + BS as usize);
                        if (run..tags).contains(&position) || (ciphertext..tail).contains(&position)
                        {
                            assert!(
                                matches!(e, BackupFormatError::ChecksumMismatch { .. }),
                                "{position}: {e}"
                            );
                        }
                        if (tags..ciphertext).contains(&position) || position >= trailer + 17 {
                            match &e {
                                BackupFormatError::DigestMismatch { offset } => {
                                    assert_eq!(*offset, trailer as u64);
                                }
                                other => panic!("{position}: {other}"),
                            }
                        }
                        if (trailer + 1..trailer + 17).contains(&position) {
                            assert!(
                                matches!(e, BackupFormatError::CountMismatch { .. }),
                                "{position}: {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_spliced_backup_is_refused() {
        let a = header(BackupKind::Full);
        let b = BackupHeader {
            backup_id: [0xb2; 16],
            snapshot_uid: [0x52; 16],
            ..a.clone()
        };
        let (bytes_a, _, starts_a) = write(&a, &full_frames());
        let other_frames = [run(5, 2, 1, 1, 40), run(7, 1, 2, 4, 1)];
        let (bytes_b, _, starts_b) = write(&b, &other_frames);
        let header_len = starts_a[0];
        assert_eq!(header_len, starts_b[0]);

        // Header of one, frames and trailer of the other.
        let mut spliced = bytes_a[..header_len].to_vec();
        spliced.extend_from_slice(&bytes_b[header_len..]);
        assert!(matches!(
            read_all(&spliced),
            Err(BackupFormatError::DigestMismatch { .. })
        ));
        // Frames of both.
        let mut spliced = bytes_a[..starts_a[1]].to_vec();
        spliced.extend_from_slice(&bytes_b[starts_b[0]..]);
        assert!(read_all(&spliced).is_err());

        // With the digest made again, as anyone can, only the MAC tells.
        let body = [&bytes_a[..header_len], &bytes_b[header_len..starts_b[2]]].concat();
        let resealed = reseal(&body, 2, 3);
        let (header, frames, trailer) = read_all(&resealed).unwrap();
        assert_eq!((header, frames.as_slice()), (a, &other_frames[..]));
        assert!(!mac_ok(&trailer));
        // Even with the MAC of the genuine file B moved over.
        let mut moved = resealed.clone();
        let n = moved.len();
        moved[n - MAC_LEN..].copy_from_slice(&bytes_b[bytes_b.len() - MAC_LEN..]);
        let (_, _, trailer) = read_all(&moved).unwrap();
        assert!(!mac_ok(&trailer));
    }

    #[test]
    fn reordered_and_overlapping_frames_are_refused() {
        let (bytes, _, s) = write(&header(BackupKind::Full), &full_frames());
        let frame = |i: usize| &bytes[s[i]..s[i + 1]];
        let trailer = &bytes[s[4]..];
        // Frames 1 and 2 swapped: refused at the first frame out of order,
        // before the digest is reached.
        let swapped = [
            &bytes[..s[0]],
            frame(0),
            frame(2),
            frame(1),
            frame(3),
            trailer,
        ]
        .concat();
        match read_all(&swapped) {
            Err(BackupFormatError::OutOfOrder { offset, lba, next }) => {
                assert_eq!((offset, lba, next), ((s[1] + s[3] - s[2]) as u64, 3, 15));
            }
            other => panic!("{other:?}"),
        }
        // A frame twice.
        let twice = [&bytes[..s[0]], frame(0), frame(0), frame(1), trailer].concat();
        assert!(matches!(
            read_all(&twice),
            Err(BackupFormatError::OutOfOrder {
                lba: 0,
                next: 3,
                ..
            })
        ));
        // Overlapping by one block, with a good digest.
        let body = [
            &bytes[..s[0]],
            &raw_run(0, 3, 1, 1, 0),
            &raw_run(2, 1, 1, 1, 3),
        ]
        .concat();
        assert!(matches!(
            read_all(&reseal(&body, 2, 4)),
            Err(BackupFormatError::OutOfOrder {
                lba: 2,
                next: 3,
                ..
            })
        ));
        // Adjacent is fine.
        let body = [
            &bytes[..s[0]],
            &raw_run(0, 3, 1, 1, 0),
            &raw_run(3, 1, 1, 1, 3),
        ]
        .concat();
        assert!(read_all(&reseal(&body, 2, 4)).is_ok());
    }

    #[test]
    fn frames_that_break_the_rules_are_refused_even_with_a_good_digest() {
        let (head, _, _) = write(&header(BackupKind::Incremental), &[]);
        let head = &head[..head.len() - 81];
        let at = head.len() as u64;
        let check = |frame: Vec<u8>, expected: &dyn Fn(&BackupFormatError) -> bool| {
            let body = [head, &frame].concat();
            let e = read_all(&reseal(&body, 1, 1)).unwrap_err();
            assert!(expected(&e), "{e:?}");
            assert!(e.to_string().contains(&format!("at byte {at}")), "{e}");
        };
        use BackupFormatError as E;
        check(raw_run(63, 2, 1, 1, 0), &|e| {
            matches!(
                e,
                E::OutOfRange {
                    lba: 63,
                    count: 2,
                    blocks: 64,
                    ..
                }
            )
        });
        check(raw_run(u64::MAX, 1, 1, 1, 0), &|e| {
            matches!(e, E::OutOfRange { .. })
        });
        check(raw_run(0, 0, 1, 1, 0), &|e| {
            matches!(e, E::InvalidFrame { .. })
        });
        check(raw_run(0, 257, 1, 1, 0), &|e| {
            matches!(e, E::InvalidFrame { .. })
        });
        check(raw_run(0, 1, 3, 1, 0), &|e| {
            matches!(e, E::UnknownDek { dek_version: 3, .. })
        });
        check(raw_run(0, 1, 1, 2, 0), &|e| {
            matches!(e, E::UnknownWriter { writer: 2, .. })
        });
        check(raw_run(0, 1, 2, 1, 0), &|e| {
            matches!(
                e,
                E::WriterDekMismatch {
                    writer: 1,
                    writer_dek: 1,
                    dek_version: 2,
                    ..
                }
            )
        });
        check(raw_run(0, 2, 1, 1, u64::MAX), &|e| {
            matches!(e, E::InvalidFrame { .. })
        });
        check(raw_unmapped(0, 0), &|e| matches!(e, E::InvalidFrame { .. }));
        check(raw_unmapped(1, 64), &|e| matches!(e, E::OutOfRange { .. }));
        check(raw_unmapped(u64::MAX, 2), &|e| {
            matches!(e, E::OutOfRange { .. })
        });
        check(vec![b'X'], &|e| {
            matches!(e, E::UnknownFrame { tag: b'X', .. })
        });
        // The last nonce counter may be u64::MAX, the last block the volume's.
        let body = [head, &raw_run(62, 2, 1, 1, u64::MAX - 1)].concat();
        assert!(read_all(&reseal(&body, 1, 2)).is_ok());
    }

    #[test]
    fn an_unmapped_range_in_a_full_backup_is_refused() {
        let h = header(BackupKind::Full);
        let (head, _, _) = write(&h, &[]);
        let head = &head[..head.len() - 81];
        let body = [head, &raw_unmapped(0, 1)].concat();
        assert!(matches!(
            read_all(&reseal(&body, 1, 0)),
            Err(BackupFormatError::UnmappedInFull { offset }) if offset == head.len() as u64
        ));
        let mut w = BackupWriter::new(Vec::new(), &h).unwrap();
        let e = w.unmapped(0, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("full backup"), "{e}");
    }

    #[test]
    fn wrong_trailer_counts_are_refused() {
        let (bytes, _, s) = write(&header(BackupKind::Full), &full_frames());
        let body = &bytes[..s[4]];
        for (frames, mapped, what) in [
            (5, 10, "frames"),
            (3, 10, "frames"),
            (4, 9, "mapped blocks"),
        ] {
            match read_all(&reseal(body, frames, mapped)) {
                Err(BackupFormatError::CountMismatch {
                    what: w, offset, ..
                }) => {
                    assert_eq!((w, offset), (what, s[4] as u64));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(read_all(&reseal(body, 4, 10)).is_ok());
    }

    #[test]
    fn bytes_after_the_trailer_are_refused() {
        let (bytes, _, s) = write(&header(BackupKind::Full), &full_frames());
        for extra in [&[0u8][..], b"garbage", &bytes[s[4]..]] {
            let long = [&bytes[..], extra].concat();
            assert!(matches!(
                read_all(&long),
                Err(BackupFormatError::TrailingBytes { offset }) if offset == bytes.len() as u64
            ));
        }
        // Two whole backups back to back.
        let twice = [&bytes[..], &bytes[..]].concat();
        assert!(matches!(
            read_all(&twice),
            Err(BackupFormatError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn next_frame_after_the_end_or_after_an_error() {
        let (bytes, _, s) = write(&header(BackupKind::Full), &full_frames());
        let mut reader = BackupReader::new(bytes.as_slice()).unwrap();
        while reader.next_frame().unwrap().is_some() {}
        assert!(reader.next_frame().unwrap().is_none());
        assert_eq!(reader.offset(), bytes.len() as u64);
        assert!(reader.trailer().is_some());

        let mut short = BackupReader::new(&bytes[..s[2] + 5]).unwrap();
        assert!(short.next_frame().unwrap().is_some());
        assert!(short.next_frame().unwrap().is_some());
        assert!(matches!(
            short.next_frame(),
            Err(BackupFormatError::Truncated { .. })
        ));
        assert!(matches!(
            short.next_frame(),
            Err(BackupFormatError::Failed { .. })
        ));
        assert!(short.trailer().is_none() && short.mac_input().is_none());
    }

    #[test]
    fn headers_that_break_the_rules_are_refused() {
        use BackupFormatError as E;
        let good = header(BackupKind::Incremental);
        // Byte edits the header struct cannot express.
        let bytes = good.encode();
        let edited = |at: usize, value: u8| {
            let mut b = bytes.clone();
            b[at] = value;
            BackupReader::new(b.as_slice()).unwrap_err()
        };
        assert!(matches!(edited(0, b'X'), E::BadMagic));
        assert!(matches!(edited(9, 2), E::UnsupportedVersion { version: 2 }));
        assert!(matches!(edited(10, 0), E::UnknownKind { kind: 0 }));
        assert!(matches!(edited(10, 3), E::UnknownKind { kind: 3 }));
        assert!(matches!(
            edited(11, 1),
            E::Reserved {
                offset: 11,
                value: 1
            }
        ));
        // The tenant name's length, first byte: 2^24 + 4 bytes.
        assert!(matches!(
            edited(36, 1),
            E::InvalidHeader {
                offset: 36,
                field: "tenant name",
                ..
            }
        ));

        // Field values: the writer refuses them up front, the reader where
        // they are.
        let cases: Vec<(&str, BackupHeader)> = vec![
            (
                "tenant name",
                BackupHeader {
                    tenant: String::new(),
                    ..good.clone()
                },
            ),
            (
                "tenant name",
                BackupHeader {
                    tenant: "a".repeat(65),
                    ..good.clone()
                },
            ),
            (
                "volume name",
                BackupHeader {
                    volume: "tab\there".into(),
                    ..good.clone()
                },
            ),
            (
                "volume name",
                BackupHeader {
                    volume: "é".into(),
                    ..good.clone()
                },
            ),
            (
                "snapshot name",
                BackupHeader {
                    snapshot_name: "s".repeat(65),
                    ..good.clone()
                },
            ),
            (
                "block size",
                BackupHeader {
                    block_size: 1000,
                    ..good.clone()
                },
            ),
            (
                "block size",
                BackupHeader {
                    block_size: 256,
                    volume_size: 256,
                    ..good.clone()
                },
            ),
            (
                "block size",
                BackupHeader {
                    block_size: 1 << 17,
                    volume_size: 1 << 17,
                    ..good.clone()
                },
            ),
            (
                "volume size",
                BackupHeader {
                    volume_size: 0,
                    ..good.clone()
                },
            ),
            (
                "volume size",
                BackupHeader {
                    volume_size: 4096 + 1,
                    ..good.clone()
                },
            ),
            (
                "base snapshot uid",
                BackupHeader {
                    base_snapshot_uid: [0; 16],
                    ..good.clone()
                },
            ),
            (
                "base backup id",
                BackupHeader {
                    base_backup_id: [0; 16],
                    ..good.clone()
                },
            ),
            (
                "base snapshot uid",
                BackupHeader {
                    kind: BackupKind::Full,
                    ..good.clone()
                },
            ),
            (
                "base backup id",
                BackupHeader {
                    kind: BackupKind::Full,
                    base_snapshot_uid: [0; 16],
                    ..good.clone()
                },
            ),
            (
                "DEK count",
                BackupHeader {
                    deks: Vec::new(),
                    writers: Vec::new(),
                    ..good.clone()
                },
            ),
            (
                "DEK count",
                BackupHeader {
                    deks: vec![good.deks[0].clone(); MAX_DEKS + 1],
                    ..good.clone()
                },
            ),
            (
                "DEK version",
                BackupHeader {
                    deks: vec![good.deks[1].clone(), good.deks[0].clone()],
                    ..good.clone()
                },
            ),
            (
                "DEK version",
                BackupHeader {
                    deks: vec![good.deks[0].clone(), good.deks[0].clone()],
                    ..good.clone()
                },
            ),
            (
                "writer number",
                BackupHeader {
                    writers: vec![WriterEntry {
                        number: 0,
                        ..good.writers[0].clone()
                    }],
                    ..good.clone()
                },
            ),
            (
                "writer number",
                BackupHeader {
                    writers: vec![good.writers[1].clone(), good.writers[0].clone()],
                    ..good.clone()
                },
            ),
            (
                "writer's DEK version",
                BackupHeader {
                    writers: vec![WriterEntry {
                        dek_version: 9,
                        ..good.writers[0].clone()
                    }],
                    ..good.clone()
                },
            ),
        ];
        for (field, h) in cases {
            let e = BackupReader::new(h.encode().as_slice()).unwrap_err();
            assert!(
                matches!(&e, E::InvalidHeader { field: f, .. } if *f == field),
                "{field}: {e}"
            );
            let w = BackupWriter::new(Vec::new(), &h).unwrap_err();
            assert_eq!(w.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(w.to_string(), e.to_string());
        }

        // Counts are checked before anything is read or reserved for them.
        let mut b = good.encode();
        let writers_at = b.len() - 4 - 2 * 40;
        b.truncate(writers_at);
        b.extend_from_slice(&(MAX_WRITERS as u32 + 1).to_be_bytes());
        assert!(matches!(
            BackupReader::new(b.as_slice()).unwrap_err(),
            E::InvalidHeader { field: "writer count", offset, .. } if offset == writers_at as u64
        ));
        b.truncate(writers_at);
        b.extend_from_slice(&(MAX_WRITERS as u32).to_be_bytes());
        assert!(matches!(
            BackupReader::new(b.as_slice()).unwrap_err(),
            E::Truncated {
                what: "writer number",
                ..
            }
        ));
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would_and_stays_usable() {
        let h = header(BackupKind::Incremental);
        let (expected, _, _) = write(&h, &incremental_frames());
        let mut w = BackupWriter::new(Vec::new(), &h).unwrap();
        let refused = |r: io::Result<()>| {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        };
        let ct = vec![0u8; 2 * BS as usize];
        let tags = [[0u8; TAG_LEN]; 2];
        let frames = incremental_frames();
        put(&mut w, &frames[0]).unwrap();
        let written = w.bytes_written();
        // Before, or overlapping, what was written.
        refused(w.block_run(0, 1, 1, 0, &tags[..1], &ct[..512]));
        refused(w.block_run(1, 1, 1, 0, &tags[..1], &ct[..512]));
        refused(w.unmapped(1, 5));
        // Past the end.
        refused(w.block_run(63, 1, 1, 0, &tags, &ct));
        refused(w.unmapped(10, 55));
        refused(w.unmapped(10, u64::MAX));
        // Bad runs.
        refused(w.block_run(10, 1, 1, 0, &[], &[]));
        refused(w.block_run(10, 1, 1, 0, &tags, &ct[..512]));
        refused(w.block_run(10, 1, 1, 0, &vec![[0; TAG_LEN]; 257], &vec![0; 257 * 512]));
        refused(w.block_run(10, 3, 0, 0, &tags, &ct));
        refused(w.block_run(10, 1, 7, 0, &tags, &ct));
        refused(w.block_run(10, 2, 1, 0, &tags, &ct));
        refused(w.block_run(10, 1, 1, u64::MAX, &tags, &ct));
        refused(w.unmapped(10, 0));
        assert_eq!(w.bytes_written(), written, "a refused frame wrote bytes");
        for frame in &frames[1..] {
            put(&mut w, frame).unwrap();
        }
        let (bytes, _) = w.finish(mac).unwrap();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn io_errors_are_reported_with_their_offset() {
        struct Failing<'a>(&'a [u8], io::ErrorKind);
        impl io::Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::new(self.1, "device gone"));
                }
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (bytes, _, s) = write(&header(BackupKind::Full), &full_frames());
        let cut = s[1] + 40;
        let e = read_from(Failing(&bytes[..cut], io::ErrorKind::Other)).unwrap_err();
        assert!(
            matches!(e, BackupFormatError::Io { offset, .. } if offset == cut as u64),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("cannot read the backup file at byte {cut}")
        );
        let e = read_from(Failing(&bytes[..cut], io::ErrorKind::UnexpectedEof)).unwrap_err();
        assert!(matches!(e, BackupFormatError::Truncated { offset, .. } if offset == cut as u64));
        let e = read_from(Failing(&bytes[..10], io::ErrorKind::Other)).unwrap_err();
        assert!(matches!(e, BackupFormatError::Io { offset: 10, .. }));
    }

    #[test]
    fn a_failed_write_leaves_the_writer_unusable() {
        struct Full(usize);
        impl io::Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let h = header(BackupKind::Full);
        let header_len = h.encode().len();
        assert!(BackupWriter::new(Full(header_len - 1), &h).is_err());
        let mut w = BackupWriter::new(Full(header_len + 100), &h).unwrap();
        let Frame::Blocks {
            tags, ciphertext, ..
        } = run(0, 1, 1, 1, 0)
        else {
            unreachable!()
        };
        assert!(w.block_run(0, 1, 1, 0, &tags, &ciphertext).is_err());
        let e = w.block_run(5, 1, 1, 1, &tags, &ciphertext).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert!(w.finish(mac).is_err());
    }

    #[test]
    fn mac_input_is_the_label_digest_and_counts() {
        let input = mac_input(&[0xaa; 32], 0x0102, 0x0304);
        assert_eq!(input.len(), 79);
        assert_eq!(&input[..4], &[0, 0, 0, 27]);
        assert_eq!(&input[4..31], b"blockseal/v1/backup-trailer");
        assert_eq!(&input[31..63], &[0xaa; 32]);
        assert_eq!(&input[63..71], &0x0102u64.to_be_bytes());
        assert_eq!(&input[71..79], &0x0304u64.to_be_bytes());
        // What finish hands the MAC is what the reader reports.
        let mut seen = Vec::new();
        let w = BackupWriter::new(Vec::new(), &header(BackupKind::Full)).unwrap();
        let (bytes, summary) = w
            .finish(|input| {
                seen = input.to_vec();
                [1; MAC_LEN]
            })
            .unwrap();
        let (_, _, trailer) = read_all(&bytes).unwrap();
        assert_eq!(seen, trailer.mac_input());
        assert_eq!(trailer.mac, [1; MAC_LEN]);
        assert_eq!(summary.trailer, trailer);
    }
}
