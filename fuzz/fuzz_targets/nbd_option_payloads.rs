//! The option payload decoders of NBD option haggling, on arbitrary bytes.
//!
//! The same bytes go to each decoder: the `NBD_OPT_INFO`/`NBD_OPT_GO` payload
//! splitter, the `*_META_CONTEXT` payload splitter and the protocol string check.
//! None may panic, and each must accept exactly the payloads the spec's layout
//! describes: whatever is accepted encodes back to exactly the input, so no byte
//! was skipped, guessed or read twice.
#![no_main]

use blockseal_nbd::fuzzing::{info_request, meta_request, protocol_string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_info(data);
    check_meta(data);
    check_string(data);
});

/// `u32 name length, name, u16 count, count x u16 information request`.
fn check_info(data: &[u8]) {
    // The layout restated independently: the length fields decide acceptance.
    let expected = (|| {
        let name_len = u32::from_be_bytes(*data.first_chunk::<4>()?) as usize;
        let rest = data.get(4..)?.get(name_len..)?;
        let count = u16::from_be_bytes(*rest.first_chunk::<2>()?) as usize;
        (rest.len() == 2 + 2 * count).then_some((name_len, count))
    })();
    match info_request(data) {
        Some((name, requests)) => {
            assert_eq!(expected, Some((name.len(), requests.len())));
            let mut encoded = Vec::with_capacity(data.len());
            encoded.extend_from_slice(&(name.len() as u32).to_be_bytes());
            encoded.extend_from_slice(name);
            encoded.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in &requests {
                encoded.extend_from_slice(&r.to_be_bytes());
            }
            assert_eq!(encoded, data, "INFO/GO payload did not round trip");
        }
        None => assert_eq!(expected, None, "a well-formed INFO/GO payload was refused"),
    }
}

/// `u32 name length, name, u32 count, count x (u32 length, query)`.
fn check_meta(data: &[u8]) {
    let Some((name, queries)) = meta_request(data) else {
        return;
    };
    assert!(queries.len() <= data.len() / 4);
    let mut encoded = Vec::with_capacity(data.len());
    encoded.extend_from_slice(&(name.len() as u32).to_be_bytes());
    encoded.extend_from_slice(name);
    encoded.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in &queries {
        encoded.extend_from_slice(&(q.len() as u32).to_be_bytes());
        encoded.extend_from_slice(q);
    }
    assert_eq!(encoded, data, "META_CONTEXT payload did not round trip");
}

/// "Strings": UTF-8, at most 4096 bytes, no NUL.
fn check_string(data: &[u8]) {
    let valid = data.len() <= 4096 && !data.contains(&0) && std::str::from_utf8(data).is_ok();
    match protocol_string(data) {
        Some(s) => {
            assert!(valid);
            assert_eq!(s.as_bytes(), data);
        }
        None => assert!(!valid, "a valid protocol string was refused"),
    }
}
