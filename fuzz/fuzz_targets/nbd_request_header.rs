//! The transmission request header decoder, on arbitrary bytes.
//!
//! It must never panic, must decode exactly when at least 28 bytes start with
//! the request magic, and the decoded fields must encode back to those 28 bytes.
#![no_main]

use blockseal_nbd::fuzzing::{REQUEST_HEADER_LEN, request_header};
use libfuzzer_sys::fuzz_target;

/// `NBD_REQUEST_MAGIC`, restated from the spec.
const REQUEST_MAGIC: [u8; 4] = 0x2560_9513_u32.to_be_bytes();

fuzz_target!(|data: &[u8]| {
    let well_formed = data.len() >= REQUEST_HEADER_LEN && data[..4] == REQUEST_MAGIC;
    match request_header(data) {
        Some(h) => {
            assert!(well_formed, "decoded a header without the request magic");
            let mut encoded = Vec::with_capacity(REQUEST_HEADER_LEN);
            encoded.extend_from_slice(&REQUEST_MAGIC);
            encoded.extend_from_slice(&h.flags.to_be_bytes());
            encoded.extend_from_slice(&h.kind.to_be_bytes());
            encoded.extend_from_slice(&h.handle.to_be_bytes());
            encoded.extend_from_slice(&h.offset.to_be_bytes());
            encoded.extend_from_slice(&h.len.to_be_bytes());
            assert_eq!(
                encoded,
                data[..REQUEST_HEADER_LEN],
                "header did not round trip"
            );
        }
        None => assert!(!well_formed, "refused a well-formed header"),
    }
});
