//! The backup file codec (`blockseal_volume::backup_format`), on arbitrary and
//! tampered files, and on arbitrary calls of its writer.
//!
//! The first byte picks a mode (`0x80` set: the incremental variant, else the
//! full one, where a mode uses a genuine file or header):
//! - 0: the rest is a whole file, read to the end;
//! - 1: a genuine header followed by the rest as frames and trailer;
//! - 2: the rest is a list of frames handed to a writer, 15 bytes each:
//!   `flags || lba (u16) || count (u16) || DEK version (u8) || writer (u8) ||
//!   nonce counter (u64)`; flag `0x01` makes it an unmapped range, `0x02` puts
//!   it at LBA `u64::MAX - lba`, `0x04` gives a block run one byte of
//!   ciphertext too many, `0x08` makes an unmapped range `u64::MAX - count`
//!   blocks long;
//! - 3: a genuine file (a few runs, and unmapped ranges when incremental),
//!   `op || position (u16) || xor || ...`: op 0 XORs one byte, op 1 cuts the
//!   file at the position, op 2 appends the rest of the input.
//!
//! What must hold (layout in `docs/FORMAT.md`, "Backup file"):
//! - nothing panics, and every error has a message;
//! - what the reader accepts, the writer writes again byte for byte: every
//!   frame the reader returns (even before a later error) is one the writer
//!   takes, and a file read to the end is exactly the file the writer makes
//!   from its header, frames and MAC (the format has no slack);
//! - the frames a reader returns ascend without overlapping inside the volume,
//!   name listed DEKs and writers, and the trailer's counts are theirs;
//! - the writer refuses a frame exactly when the rules restated here say so,
//!   and what it wrote reads back as the frames it took, with the MAC input it
//!   handed out;
//! - a genuine file with any byte changed is refused, unless the byte is in
//!   the MAC, which then no longer matches; a genuine file cut short is
//!   `Truncated` exactly where it ends; anything appended is `TrailingBytes`.
#![no_main]

use std::io;
use std::sync::LazyLock;

use blockseal_volume::backup_format::{
    BackupFormatError, BackupHeader, BackupKind, BackupReader, BackupTrailer, BackupWriter, Frame,
    MAC_LEN, MAX_RUN_BLOCKS, TAG_LEN, sample_header,
};
use libfuzzer_sys::fuzz_target;

const BS: u32 = 512;
const BLOCKS: u64 = 64;
const TRAILER_LEN: usize = 81;

fn header(kind: BackupKind) -> BackupHeader {
    sample_header(kind, BS, BLOCKS)
}

/// A stand-in for the caller's keyed MAC: any function of the input will do.
fn mac(input: &[u8]) -> [u8; MAC_LEN] {
    let mut out = [0u8; MAC_LEN];
    for (i, b) in input.iter().enumerate() {
        out[i % MAC_LEN] = out[i % MAC_LEN].rotate_left(3) ^ b;
    }
    out
}

fn run(lba: u64, n: usize, dek_version: u32, writer: u32, nonce: u64) -> Frame {
    Frame::Blocks {
        lba,
        dek_version,
        writer,
        nonce,
        tags: (0..n).map(|i| [i as u8 ^ lba as u8; TAG_LEN]).collect(),
        ciphertext: (0..n * BS as usize).map(|i| (i as u8) ^ 0x5a).collect(),
    }
}

fn put<W: io::Write>(w: &mut BackupWriter<W>, frame: &Frame) -> io::Result<()> {
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

/// The genuine full and incremental files.
static GENUINE: LazyLock<[Vec<u8>; 2]> = LazyLock::new(|| {
    let write = |kind, frames: &[Frame]| {
        let mut w = BackupWriter::new(Vec::new(), &header(kind)).expect("a valid header");
        for frame in frames {
            put(&mut w, frame).expect("a valid frame");
        }
        w.finish(mac).expect("writing to memory").0
    };
    [
        write(
            BackupKind::Full,
            &[run(0, 2, 1, 1, 0), run(2, 1, 2, 0, 9), run(40, 3, 2, 4, 5)],
        ),
        write(
            BackupKind::Incremental,
            &[
                run(1, 1, 1, 1, 0),
                Frame::Unmapped { lba: 2, count: 10 },
                run(12, 2, 2, 4, 1),
                Frame::Unmapped { lba: 63, count: 1 },
            ],
        ),
    ]
});

/// The genuine headers, without frames or trailer.
static HEADERS: LazyLock<[Vec<u8>; 2]> = LazyLock::new(|| {
    [BackupKind::Full, BackupKind::Incremental].map(|kind| {
        let w = BackupWriter::new(Vec::new(), &header(kind)).expect("a valid header");
        let mut bytes = w.finish(mac).expect("writing to memory").0;
        bytes.truncate(bytes.len() - TRAILER_LEN);
        bytes
    })
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let incremental = mode & 0x80 != 0;
    let which = usize::from(incremental);
    match mode & 0x7f {
        0 => {
            read_and_rewrite(rest);
        }
        1 => {
            let file = [HEADERS[which].as_slice(), rest].concat();
            read_and_rewrite(&file);
        }
        2 => write_and_read(incremental, rest),
        _ => tampered(&GENUINE[which], rest),
    }
});

/// Reads `bytes` to the end, replaying every frame into a writer, and checks
/// that the writer reproduces what was read.
fn read_and_rewrite(bytes: &[u8]) -> Option<BackupTrailer> {
    let mut reader = match BackupReader::new(bytes) {
        Ok(reader) => reader,
        Err(e) => {
            check_message(&e);
            return None;
        }
    };
    let header = reader.header().clone();
    let mut writer = BackupWriter::new(Vec::new(), &header)
        .expect("the writer refused a header the reader took");
    assert_eq!(writer.bytes_written(), reader.offset());
    let (mut next, mut frames, mut mapped) = (0u64, 0u64, 0u64);
    let outcome = loop {
        match reader.next_frame() {
            Ok(Some(frame)) => {
                check_frame(&header, &frame, next);
                next = frame.lba() + frame.blocks();
                frames += 1;
                if matches!(frame, Frame::Blocks { .. }) {
                    mapped += frame.blocks();
                }
                put(&mut writer, &frame).expect("the writer refused a frame the reader took");
                assert_eq!(writer.bytes_written(), reader.offset());
            }
            Ok(None) => break Ok(*reader.trailer().expect("a trailer at the end")),
            Err(e) => break Err(e),
        }
    };
    let written = writer.bytes_written() as usize;
    match outcome {
        Ok(trailer) => {
            assert_eq!((trailer.frames, trailer.mapped_blocks), (frames, mapped));
            assert_eq!(reader.mac_input(), Some(trailer.mac_input()));
            let (again, summary) = writer.finish(|_| trailer.mac).expect("writing to memory");
            assert_eq!(summary.trailer, trailer);
            assert_eq!(again, bytes, "the backup file did not round trip");
            Some(trailer)
        }
        Err(e) => {
            check_message(&e);
            assert!(reader.trailer().is_none());
            let (again, _) = writer.finish(|_| [0; MAC_LEN]).expect("writing to memory");
            assert_eq!(
                again[..written],
                bytes[..written],
                "frames did not round trip"
            );
            None
        }
    }
}

/// The frame rules, restated.
fn check_frame(header: &BackupHeader, frame: &Frame, next: u64) {
    assert!(frame.lba() >= next, "frames out of order");
    assert!(frame.blocks() >= 1);
    let end = frame
        .lba()
        .checked_add(frame.blocks())
        .expect("frame end overflows");
    assert!(end <= header.blocks(), "frame past the volume");
    match frame {
        Frame::Blocks {
            dek_version,
            writer,
            nonce,
            tags,
            ciphertext,
            ..
        } => {
            assert!(tags.len() <= MAX_RUN_BLOCKS);
            assert_eq!(ciphertext.len(), tags.len() * header.block_size as usize);
            assert!(header.deks.iter().any(|d| d.version == *dek_version));
            assert!(
                *writer == 0
                    || header
                        .writers
                        .iter()
                        .any(|w| w.number == *writer && w.dek_version == *dek_version)
            );
            assert!(nonce.checked_add(tags.len() as u64 - 1).is_some());
        }
        Frame::Unmapped { .. } => assert_eq!(header.kind, BackupKind::Incremental),
    }
}

fn write_and_read(incremental: bool, commands: &[u8]) {
    let kind = if incremental {
        BackupKind::Incremental
    } else {
        BackupKind::Full
    };
    let h = header(kind);
    let mut writer = BackupWriter::new(Vec::new(), &h).expect("a valid header");
    let mut taken = Vec::new();
    let mut next = 0u64;
    for c in commands.chunks_exact(15).take(64) {
        let flags = c[0];
        let lba = u64::from(u16::from_be_bytes([c[1], c[2]]));
        let lba = if flags & 0x02 != 0 {
            u64::MAX - lba
        } else {
            lba
        };
        let count = u16::from_be_bytes([c[3], c[4]]);
        let (dek, number) = (u32::from(c[5]), u32::from(c[6]));
        let nonce = u64::from_be_bytes(c[7..15].try_into().unwrap());
        let in_volume = |n: u64| lba >= next && lba.checked_add(n).is_some_and(|e| e <= BLOCKS);
        let before = writer.bytes_written();
        let (frame, result, valid) = if flags & 0x01 != 0 {
            let count = if flags & 0x08 != 0 {
                u64::MAX - u64::from(count)
            } else {
                u64::from(count)
            };
            let valid = incremental && count >= 1 && in_volume(count);
            let frame = Frame::Unmapped { lba, count };
            (frame, writer.unmapped(lba, count), valid)
        } else {
            // Up to 299 blocks: past the limit, but never a big buffer.
            let n = usize::from(count % 300);
            let Frame::Blocks {
                tags,
                mut ciphertext,
                ..
            } = run(lba, n, dek, number, nonce)
            else {
                unreachable!()
            };
            let bad_length = flags & 0x04 != 0;
            if bad_length {
                ciphertext.push(0);
            }
            let listed = (dek == 1 || dek == 2)
                && (number == 0 || (number, dek) == (1, 1) || (number, dek) == (4, 2));
            let valid = (1..=MAX_RUN_BLOCKS).contains(&n)
                && !bad_length
                && in_volume(n as u64)
                && listed
                && nonce.checked_add(n as u64 - 1).is_some();
            let result = writer.block_run(lba, dek, number, nonce, &tags, &ciphertext);
            let frame = Frame::Blocks {
                lba,
                dek_version: dek,
                writer: number,
                nonce,
                tags,
                ciphertext,
            };
            (frame, result, valid)
        };
        match result {
            Ok(()) => {
                assert!(valid, "the writer took an invalid frame: {frame:?}");
                next = frame.lba() + frame.blocks();
                taken.push(frame);
            }
            Err(e) => {
                assert!(!valid, "the writer refused a valid frame: {e}");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
                assert!(!e.to_string().is_empty());
                assert_eq!(
                    writer.bytes_written(),
                    before,
                    "a refused frame wrote bytes"
                );
            }
        }
    }
    let mut handed = Vec::new();
    let (bytes, summary) = writer
        .finish(|input| {
            handed = input.to_vec();
            mac(input)
        })
        .expect("writing to memory");
    assert_eq!(summary.bytes, bytes.len() as u64);

    let mut reader = BackupReader::new(bytes.as_slice()).expect("the reader refused a header");
    assert_eq!(reader.header(), &h);
    let mut read = Vec::new();
    while let Some(frame) = reader
        .next_frame()
        .expect("the reader refused what the writer wrote")
    {
        read.push(frame);
    }
    assert_eq!(read, taken);
    assert_eq!(reader.trailer(), Some(&summary.trailer));
    assert_eq!(reader.mac_input().map(|m| m.to_vec()), Some(handed));
}

fn tampered(genuine: &[u8], input: &[u8]) {
    let op = input.first().copied().unwrap_or(0) % 3;
    let position = input
        .get(1..3)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let position = usize::from(position) % genuine.len();
    let mac_at = genuine.len() - MAC_LEN;
    match op {
        0 => {
            let xor = input.get(3).copied().unwrap_or(0);
            let mut bytes = genuine.to_vec();
            bytes[position] ^= xor;
            match read_and_rewrite(&bytes) {
                Some(trailer) => {
                    assert!(
                        xor == 0 || position >= mac_at,
                        "byte {position} ^ {xor:#04x} was accepted"
                    );
                    assert_eq!(trailer.mac == mac(&trailer.mac_input()), xor == 0);
                }
                None => assert!(
                    xor != 0 && position < mac_at,
                    "the genuine file was refused"
                ),
            }
        }
        1 => match BackupReader::new(&genuine[..position]).and_then(|mut r| {
            while r.next_frame()?.is_some() {}
            Ok(())
        }) {
            Err(BackupFormatError::Truncated { offset, .. }) => {
                assert_eq!(offset, position as u64);
            }
            other => panic!("cut at {position}: {other:?}"),
        },
        _ => {
            let extra = &input[input.len().min(3)..];
            let bytes = [genuine, extra].concat();
            let mut reader = BackupReader::new(bytes.as_slice()).expect("the genuine header");
            let result = loop {
                match reader.next_frame() {
                    Ok(Some(_)) => {}
                    other => break other,
                }
            };
            match result {
                Ok(None) => assert!(extra.is_empty()),
                Err(BackupFormatError::TrailingBytes { offset }) => {
                    assert!(!extra.is_empty());
                    assert_eq!(offset, genuine.len() as u64);
                }
                other => panic!("{} bytes appended: {other:?}", extra.len()),
            }
        }
    }
}

fn check_message(e: &BackupFormatError) {
    let text = e.to_string();
    assert!(!text.is_empty());
    let _ = format!("{e:?}");
}
