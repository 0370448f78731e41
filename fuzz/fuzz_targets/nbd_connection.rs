//! A whole NBD connection, with the fuzz input as everything the client sends.
//!
//! The server's own handshake and transmission code run over an in-memory stream
//! against three RAM exports: `acme/disk` (writable), `acme/ro` (read-only) and
//! `other/secret-volume`, behind a catalog that deliberately ignores the client's
//! scope, so the server's own tenant checks are what is tested.
//!
//! The first byte picks the listener (Unix socket; TLS listener before the
//! upgrade; TLS listener after the upgrade for tenant `acme`) and whether the
//! rest is sent as is or is first framed into options and requests (see
//! [`frame`]), which lets the fuzzer reach the transmission phase quickly.
//!
//! What must hold:
//! - the server never panics, and finishes within a bounded time once the client
//!   has sent its bytes and closed its side;
//! - it writes the greeting, then only well-formed option replies until the
//!   handshake ends (plus the 10 or 134 bytes that answer `NBD_OPT_EXPORT_NAME`);
//! - every export call keeps the `Export` contract: in range, nonzero length, no
//!   writes to a read-only export, reads and writes at most the maximum payload;
//! - a client scoped to tenant `acme`, or one that has not upgraded to TLS yet,
//!   never reaches `other/secret-volume` and never sees its name; a client that
//!   has not upgraded never enters transmission.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockseal_nbd::fuzzing::{Ending, Listener, MAX_OPTION_LEN, converse};
use blockseal_nbd::{Catalog, ErrorClass, Export, ExportError, ExportInfo, Extent, Scope};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "other/secret-volume";
/// The server's default largest request payload (64 MiB).
const MAX_PAYLOAD: usize = 64 << 20;

// Protocol numbers, restated from the spec so the target checks the wire.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_WRITE: u16 = 1;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let listener = match mode % 3 {
        0 => Listener::Unix,
        1 => Listener::TlsBeforeUpgrade,
        _ => Listener::TlsTenant("acme".into()),
    };
    let framed = mode & 0x80 != 0;
    let client = if framed { frame(rest) } else { rest.to_vec() };

    let catalog = Arc::new(RamCatalog::new());
    let conversation = converse(catalog.clone(), listener.clone(), &client)
        .unwrap_or_else(|_| panic!("the server hung after the client closed its side"));
    let out = &conversation.output;

    // The greeting comes first, whatever the client sent.
    let mut greeting = Vec::new();
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    assert!(out.starts_with(&greeting), "no greeting");
    check_option_replies(
        &out[greeting.len()..conversation.handshake_len],
        conversation.ending,
    );

    if listener != Listener::Unix {
        let secret = &catalog.exports[2];
        assert_eq!(
            secret.calls.load(Ordering::Relaxed),
            0,
            "reached another tenant"
        );
        if !contains(&client, SECRET.as_bytes()) {
            assert!(
                !contains(out, SECRET.as_bytes()),
                "named another tenant's export"
            );
        }
    }
    if listener == Listener::TlsBeforeUpgrade {
        assert_ne!(
            conversation.ending,
            Ending::Transmission,
            "served without TLS"
        );
    }
});

/// Option replies ("Fixed newstyle negotiation") tile the handshake output.
fn check_option_replies(mut out: &[u8], ending: Ending) {
    while !out.is_empty() {
        if ending == Ending::Transmission && (out.len() == 10 || out.len() == 134) {
            // NBD_OPT_EXPORT_NAME's answer: size, flags, and zeroes unless
            // NBD_FLAG_C_NO_ZEROES.
            assert!(out[10..].iter().all(|&b| b == 0));
            return;
        }
        assert!(out.len() >= 20, "truncated option reply");
        let magic = u64::from_be_bytes(out[..8].try_into().unwrap());
        assert_eq!(magic, OPTION_REPLY_MAGIC, "bad option reply magic");
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "option reply longer than the output");
        out = &out[20 + len..];
    }
}

/// Turns fuzz bytes into a client's byte stream of options and requests, so
/// that most inputs get through the handshake. Each step starts with one byte:
/// - `0x00..=0x7f`: an option `op & 0x0f`, then a length byte and that many
///   payload bytes (the length is sent as is: it may not match what follows);
/// - `0x80..=0xbf`: a canned option: structured replies, `SET_META_CONTEXT` of
///   `base:allocation` on `acme/disk`, `GO` to `acme/disk` asking for block
///   sizes, or `GO` to `acme/ro`;
/// - `0xc0..=0xff`: a request of type `op & 7`, then flags (1 byte), offset and
///   length (2 bytes each, or 8 and 4 when `op & 0x08`); a write carries a
///   payload of its length, up to 64 KiB.
///
/// The stream starts with client flags `FIXED_NEWSTYLE | NO_ZEROES`.
fn frame(mut input: &[u8]) -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    let mut handle = 0u64;
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        match op {
            0x00..=0x7f => {
                let len = take(&mut input, 1).first().copied().unwrap_or(0);
                let payload = take(&mut input, usize::from(len));
                option(&mut out, u32::from(op & 0x0f), u32::from(len), payload);
            }
            0x80..=0xbf => match op & 3 {
                0 => option(&mut out, OPT_STRUCTURED_REPLY, 0, &[]),
                1 => {
                    let mut p = counted(b"acme/disk");
                    p.extend_from_slice(&1u32.to_be_bytes());
                    p.extend_from_slice(&counted(b"base:allocation"));
                    option(&mut out, OPT_SET_META_CONTEXT, p.len() as u32, &p);
                }
                2 => {
                    let mut p = counted(b"acme/disk");
                    p.extend_from_slice(&1u16.to_be_bytes());
                    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    option(&mut out, OPT_GO, p.len() as u32, &p);
                }
                _ => {
                    let mut p = counted(b"acme/ro");
                    p.extend_from_slice(&0u16.to_be_bytes());
                    option(&mut out, OPT_GO, p.len() as u32, &p);
                }
            },
            0xc0..=0xff => {
                let kind = u16::from(op & 7);
                let flags = u16::from(take(&mut input, 1).first().copied().unwrap_or(0));
                let (offset, len) = if op & 0x08 != 0 {
                    (be(take(&mut input, 8)), be(take(&mut input, 4)) as u32)
                } else {
                    (be(take(&mut input, 2)), be(take(&mut input, 2)) as u32)
                };
                out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&handle.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                handle += 1;
                if kind == CMD_WRITE {
                    let n = (len as usize).min(64 << 10);
                    out.extend((0..n).map(|i| (i as u8) ^ op));
                }
            }
        }
    }
    out
}

fn option(out: &mut Vec<u8>, option: u32, len: u32, payload: &[u8]) {
    debug_assert!(len <= MAX_OPTION_LEN);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

fn counted(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head
}

/// Big-endian value of up to 8 bytes (missing bytes are zero).
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |v, &b| (v << 8) | u64::from(b))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A RAM export that checks the `Export` contract on every call.
struct Ram {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    read_only: bool,
    calls: AtomicU64,
}

impl Ram {
    fn new(size: usize, block_size: u32, read_only: bool) -> Arc<Ram> {
        Arc::new(Ram {
            data: Mutex::new(vec![0; size]),
            block_size,
            read_only,
            calls: AtomicU64::new(0),
        })
    }

    /// The contract every method may rely on: the server validated the range.
    fn check(&self, offset: u64, len: u64, writes: bool) -> std::ops::Range<usize> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        assert!(len > 0, "export called with length 0");
        let end = offset.checked_add(len).expect("offset + length overflows");
        assert!(end <= self.size(), "export called past its end");
        assert!(!(writes && self.read_only), "read-only export written");
        offset as usize..end as usize
    }
}

impl Export for Ram {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        assert!(buf.len() <= MAX_PAYLOAD);
        let range = self.check(offset, buf.len() as u64, false);
        buf.copy_from_slice(&self.data.lock().unwrap()[range]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        assert!(data.len() <= MAX_PAYLOAD);
        let range = self.check(offset, data.len() as u64, true);
        self.data.lock().unwrap()[range].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        let range = self.check(offset, len, true);
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _fua: bool,
        _no_hole: bool,
    ) -> Result<(), ExportError> {
        let range = self.check(offset, len, true);
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let range = self.check(offset, len, false);
        if range.start % 8192 == 4096 {
            // Some exports fail; the server must answer with an error, not panic.
            return Err(ExportError::new(ErrorClass::Io, "block status failed"));
        }
        // One extent per 4 KiB block: a hole when it is all zeroes.
        let data = self.data.lock().unwrap();
        let mut extents = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let next = ((at / 4096 + 1) * 4096).min(data.len());
            let zero = data[at..next].iter().all(|&b| b == 0);
            extents.push(Extent {
                length: (next - at) as u64,
                hole: zero,
                zero,
            });
            at = next;
        }
        Ok(extents)
    }
}

/// Three exports, listed and opened whatever the scope: the server must filter.
struct RamCatalog {
    exports: [Arc<Ram>; 3],
}

impl RamCatalog {
    const NAMES: [&str; 3] = ["acme/disk", "acme/ro", SECRET];

    fn new() -> RamCatalog {
        RamCatalog {
            exports: [
                Ram::new(64 << 10, 4096, false),
                Ram::new(16 << 10, 512, true),
                Ram::new(8 << 10, 4096, false),
            ],
        }
    }
}

impl Catalog for RamCatalog {
    fn list(&self, _scope: &Scope) -> Vec<ExportInfo> {
        Self::NAMES
            .iter()
            .map(|&name| ExportInfo {
                name: name.into(),
                description: format!("RAM disk {name}"),
            })
            .collect()
    }

    fn open(&self, name: &str, _scope: &Scope) -> Option<Arc<dyn Export>> {
        let i = Self::NAMES.iter().position(|&n| n == name)?;
        Some(self.exports[i].clone() as Arc<dyn Export>)
    }
}
