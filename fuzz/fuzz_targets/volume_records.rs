//! The metadata record decoders of the volume crate, on arbitrary bytes.
//!
//! The first byte picks the record: store header, tenant, volume, extent (the
//! next 8 bytes are the last LBA its key carries, or with `0x80` set the key is
//! taken raw: a length byte, then that many bytes), mapping page (the next 8
//! bytes are the page number its key carries), mapping journal record or
//! counter. The rest is the stored value.
//!
//! What must hold (layouts in `docs/FORMAT.md`):
//! - no decoder panics;
//! - whatever decodes encodes back to exactly the stored bytes: the formats have
//!   no slack, so a record that decodes was fully understood;
//! - the fixed-size records (header, tenant, counter) decode exactly when the
//!   length, version and enumerated fields are right;
//! - an extent decodes exactly when its key is the 13 bytes `m`, volume, last
//!   LBA, and its value is version 1 of `23 + 16 * n` bytes, version 2 of
//!   `27 + 16 * n` bytes naming a writer other than 0, or version 3 of
//!   `31 + 16 * n` bytes naming a birth epoch other than 0, with a block count `n` in
//!   `1..=256` that fits below the key's last LBA, and when every block's segment
//!   offset and nonce counter fit their integers. A decoded extent has as many
//!   tags as its header says, ends at the key's LBA, and starts `n - 1` blocks
//!   before it;
//! - a mapping journal record that decodes encodes back to the same bytes;
//! - a mapping page that decodes holds 1 to 32 extents in LBA order, none
//!   overlapping the next, each ending inside the page its key names, each of
//!   1 to 256 blocks.
#![no_main]

use blockseal_volume::fuzzing::{
    MAX_EXTENT_BLOCKS, PAGE_BLOCKS, counter, extent_key, extent_record, header_record,
    journal_record, mapping_page, page_key, tenant_record, volume_record,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind & 0x7f {
        0 => check_fixed(header_record(rest), rest, 73, |_| true),
        1 => check_fixed(tenant_record(rest), rest, 46, |b| b[37] == 1),
        2 => check_volume(rest),
        3 => check_extent(kind & 0x80 != 0, rest),
        4 => check_page(rest),
        5 => {
            if let Ok(encoded) = journal_record(rest) {
                assert_eq!(encoded, rest, "a journal record re-encodes differently");
            }
        }
        _ => match counter(rest) {
            Ok(v) => assert_eq!(rest, v.to_be_bytes()),
            Err(_) => assert_ne!(rest.len(), 8, "refused an 8-byte counter"),
        },
    }
});

/// A fixed-size record with version byte 1 and `fields_ok` for its enumerations.
fn check_fixed(
    decoded: Result<Vec<u8>, String>,
    bytes: &[u8],
    len: usize,
    fields_ok: impl Fn(&[u8]) -> bool,
) {
    let well_formed = bytes.len() == len && bytes[0] == 1 && fields_ok(bytes);
    match decoded {
        Ok(encoded) => {
            assert!(well_formed, "decoded a malformed record");
            assert_eq!(encoded, bytes, "record did not round trip");
        }
        Err(message) => {
            assert!(!well_formed, "refused a well-formed record: {message}");
            assert!(!message.is_empty());
        }
    }
}

fn check_volume(bytes: &[u8]) {
    let Ok(v) = volume_record(bytes) else {
        return;
    };
    assert_eq!(v.encoded, bytes, "volume record did not round trip");
    let key_bytes: usize = v.keys.iter().map(|&(_, len)| 6 + len).sum();
    assert_eq!(bytes.len(), 39 + key_bytes);
}

fn check_extent(raw_key: bool, bytes: &[u8]) {
    let (key, value) = if raw_key {
        let Some((&n, rest)) = bytes.split_first() else {
            return;
        };
        let n = usize::from(n).min(rest.len());
        (rest[..n].to_vec(), &rest[n..])
    } else {
        let Some((last, value)) = bytes.split_first_chunk::<8>() else {
            return;
        };
        let volume = u32::from(last[0]);
        (
            extent_key(volume, u64::from_be_bytes(*last)).to_vec(),
            value,
        )
    };
    // The layout restated independently.
    let last = key
        .get(5..13)
        .filter(|_| key.len() == 13 && key[0] == b'm')
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()));
    let expected = (|| {
        let last = last?;
        // Version 2 adds the writer (u32, never 0) before the nonce counter;
        // version 3 adds the birth epoch (u32, never 0) after the writer.
        let version = *value.first()?;
        let header = match version {
            1 => 23,
            2 => 27,
            3 => 31,
            _ => return None,
        };
        if value.len() < header {
            return None;
        }
        let n = u64::from(u16::from_be_bytes([value[1], value[2]]));
        let offset = u64::from(u32::from_be_bytes(value[7..11].try_into().unwrap()));
        let writer_ok = match version {
            2 => value[15..19] != [0, 0, 0, 0],
            3 => value[19..23] != [0, 0, 0, 0],
            _ => true,
        };
        let nonce = u64::from_be_bytes(value[header - 8..header].try_into().unwrap());
        let fits = (1..=MAX_EXTENT_BLOCKS as u64).contains(&n)
            && writer_ok
            && n <= last.saturating_add(1)
            && value.len() as u64 == header as u64 + 16 * n
            && offset + (n - 1) <= u64::from(u32::MAX)
            && nonce.checked_add(n - 1).is_some();
        fits.then_some(n as usize)
    })();
    match extent_record(&key, value) {
        Ok(e) => {
            assert_eq!(
                Some(e.tags),
                expected,
                "decoded an extent outside its bounds"
            );
            assert_eq!(e.encoded, value, "extent did not round trip");
            assert_eq!(Some(e.last), last);
            assert_eq!(e.lba, e.last - (e.tags as u64 - 1));
        }
        Err(message) => {
            assert_eq!(expected, None, "refused a well-formed extent: {message}");
        }
    }
}

fn check_page(bytes: &[u8]) {
    let Some((page, value)) = bytes.split_first_chunk::<8>() else {
        return;
    };
    let page = u64::from_be_bytes(*page);
    let Ok((extents, encoded)) = mapping_page(&page_key(1, page), value) else {
        return;
    };
    assert_eq!(encoded, value, "mapping page did not round trip");
    assert!((1..=PAGE_BLOCKS as usize).contains(&extents.len()));
    let mut next = 0u64;
    for (n, e) in extents.iter().enumerate() {
        assert_eq!(e.last / PAGE_BLOCKS, page, "an extent ends outside its page");
        assert!((1..=MAX_EXTENT_BLOCKS).contains(&e.tags));
        assert_eq!(e.lba, e.last - (e.tags as u64 - 1));
        assert!(n == 0 || e.lba >= next, "extents overlap");
        next = e.last.saturating_add(1);
    }
}
