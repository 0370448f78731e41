//! The one HKDF-SHA256 helper every derivation in this crate goes through, and the
//! injective encoding of its `info` input.
//!
//! Labels are versioned and domain separated (`blockseal/v1/...`); every variable
//! field is length prefixed and every integer fixed width, so two different inputs
//! can never encode to the same `info`.

use ring::hkdf;
use zeroize::Zeroizing;

/// Output length as a `ring::hkdf::KeyType`.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Longest output HKDF-SHA256 can produce (RFC 5869: 255 * HashLen).
#[cfg(test)]
const MAX_OUTPUT: usize = 255 * 32;

/// HKDF-SHA256 (RFC 5869): extract with `salt` and `ikm`, expand with `info` into `out`.
///
/// Panics when `out` is longer than 255 * 32 bytes; every caller asks for a fixed
/// length far below it.
pub(crate) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length is at most 255 * 32 bytes for every caller");
}

/// First capacity of an [`Info`]: room for every encoding the crate builds (the
/// largest, a wrapped key's associated data with two 63-byte names, is 171 bytes).
const INFO_CAPACITY: usize = 256;

/// Builds an HKDF `info` (or AEAD associated data) from typed fields.
///
/// The buffer zeroizes on drop because some fields (tenant seeds) are secret, and
/// it never lets `Vec` reallocate: that would free the old buffer, secret
/// included, without wiping it. It grows through [`Info::append`] instead.
pub(crate) struct Info(Zeroizing<Vec<u8>>);

impl Info {
    /// Starts an encoding with its label, itself length prefixed.
    pub(crate) fn new(label: &str) -> Info {
        let mut info = Info(Zeroizing::new(Vec::with_capacity(INFO_CAPACITY)));
        info.bytes(label.as_bytes());
        info
    }

    /// Appends a variable-length field: its length as a big-endian u32, then the bytes.
    pub(crate) fn bytes(&mut self, field: &[u8]) -> &mut Info {
        let len = u32::try_from(field.len()).expect("info fields are short names and keys");
        self.append(&len.to_be_bytes());
        self.append(field);
        self
    }

    /// Appends a fixed-width field (an id whose length the label's format fixes),
    /// without a length prefix.
    pub(crate) fn fixed(&mut self, field: &[u8]) -> &mut Info {
        self.append(field);
        self
    }

    /// Appends a fixed-width big-endian u32.
    pub(crate) fn u32(&mut self, value: u32) -> &mut Info {
        self.append(&value.to_be_bytes());
        self
    }

    /// Appends a fixed-width byte.
    pub(crate) fn u8(&mut self, value: u8) -> &mut Info {
        self.append(&[value]);
        self
    }

    /// Appends bytes; when they do not fit, moves the contents to a bigger buffer
    /// first and wipes the old one (dropping a `Zeroizing` vector wipes it).
    fn append(&mut self, bytes: &[u8]) {
        if self.0.capacity() - self.0.len() < bytes.len() {
            let needed = self.0.len() + bytes.len();
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.next_power_of_two()));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger;
        }
        self.0.extend_from_slice(bytes);
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn check(ikm: &str, salt: &str, info: &str, okm: &str) {
        let okm = hex(okm);
        let mut out = vec![0u8; okm.len()];
        hkdf_sha256(&hex(salt), &hex(ikm), &hex(info), &mut out);
        assert_eq!(out, okm);
    }

    #[test]
    fn rfc5869_case_1() {
        check(
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf
             34007208d5b887185865",
        );
    }

    #[test]
    fn rfc5869_case_2() {
        check(
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f
             202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f
             404142434445464748494a4b4c4d4e4f",
            "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f
             808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f
             a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf
             d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef
             f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        );
    }

    #[test]
    fn rfc5869_case_3() {
        check(
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "",
            "",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d
             9d201395faa4b61a96c8",
        );
    }

    #[test]
    fn longest_output_is_allowed() {
        let mut out = vec![0u8; MAX_OUTPUT];
        hkdf_sha256(b"salt", b"ikm", b"info", &mut out);
        assert!(out.iter().any(|&b| b != 0));
    }

    #[test]
    fn info_fields_are_length_prefixed() {
        let mut a = Info::new("l");
        a.bytes(b"ab").bytes(b"c");
        let mut b = Info::new("l");
        b.bytes(b"a").bytes(b"bc");
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.as_bytes(), b"\0\0\0\x01l\0\0\0\x02ab\0\0\0\x01c");
    }

    /// A tenant KEK's info with the longest tenant name, and a wrapped key's
    /// associated data with the longest names, fit the first buffer: the one
    /// holding the seed is never reallocated. (With 128 bytes it was, and `Vec`
    /// frees the old buffer without wiping it.)
    #[test]
    fn longest_encodings_fit_the_first_buffer() {
        let name = "n".repeat(crate::MAX_NAME_LEN);
        let mut info = Info::new("blockseal/v1/tenant-kek");
        let first = info.0.as_ptr();
        info.bytes(name.as_bytes()).bytes(&[0x5a; 32]).u32(7);
        assert_eq!(info.0.as_ptr(), first);
        assert_eq!(info.0.capacity(), INFO_CAPACITY);

        let mut aad = Info::new("blockseal/v1/wrapped-dek");
        let first = aad.0.as_ptr();
        aad.u8(1)
            .bytes(name.as_bytes())
            .bytes(name.as_bytes())
            .u32(1)
            .u32(2);
        assert_eq!(aad.as_bytes().len(), 171);
        assert_eq!(aad.0.as_ptr(), first);
    }

    /// Past its first buffer an Info grows into a new one and keeps every byte.
    #[test]
    fn info_grows_past_its_first_buffer() {
        let mut info = Info::new("l");
        let long = [0xa5u8; INFO_CAPACITY];
        info.bytes(&long).u8(9);
        assert!(info.0.capacity() >= info.0.len());
        let mut expected = b"\0\0\0\x01l".to_vec();
        expected.extend_from_slice(&(INFO_CAPACITY as u32).to_be_bytes());
        expected.extend_from_slice(&long);
        expected.push(9);
        assert_eq!(info.as_bytes(), expected);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
