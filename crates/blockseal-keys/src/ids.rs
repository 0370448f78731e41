//! Typed identifiers shared by every blockseal crate.
//!
//! Names are parsed once at the edge (CLI, NBD export name, metadata record) and
//! passed around typed. A valid name is 1 to 63 bytes of lowercase ASCII letters,
//! digits, `-`, `_` and `.`, starting with a letter or digit, so that
//! `tenant/volume` is always an unambiguous export name and a safe path component.

use std::fmt;

/// Longest tenant or volume name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Why a tenant or volume name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// "tenant" or "volume".
        what: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("{what} name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// "tenant" or "volume".
        what: &'static str,
        /// Length of the refused name.
        len: usize,
    },
    /// The name holds a character outside `[a-z0-9._-]` or does not start with a letter or digit.
    #[error(
        "{what} name {name:?} is invalid: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    BadCharacter {
        /// "tenant" or "volume".
        what: &'static str,
        /// The refused name (names are not secret).
        name: String,
    },
}

fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
        });
    }
    let bytes = name.as_bytes();
    let ok_first = bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit();
    let ok_rest = bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !(ok_first && ok_rest) {
        return Err(NameError::BadCharacter {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Parses and validates a name.
            pub fn new(name: &str) -> Result<Self, NameError> {
                validate($what, name)?;
                Ok(Self(name.to_owned()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($ty), "({:?})"), self.0)
            }
        }
    };
}

name_type!(
    /// A tenant's name: the unit of key separation.
    TenantId,
    "tenant"
);
name_type!(
    /// A volume's name, unique within its tenant.
    VolumeId,
    "volume"
);

/// Version of a tenant KEK or a volume DEK. Versions start at 1 and only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion(pub u32);

impl KeyVersion {
    /// The first version of any key.
    pub const FIRST: KeyVersion = KeyVersion(1);

    /// The version after this one, or `None` when the space is spent.
    pub fn next(self) -> Option<KeyVersion> {
        self.0.checked_add(1).map(KeyVersion)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["acme", "tenant-1", "a", "voicemail_2026.q4", "0x"] {
            TenantId::new(n).unwrap();
            VolumeId::new(n).unwrap();
        }
        TenantId::new(&"a".repeat(MAX_NAME_LEN)).unwrap();
    }

    #[test]
    fn refuses_bad_names_with_specific_errors() {
        assert_eq!(
            TenantId::new("").unwrap_err().to_string(),
            "tenant name is empty"
        );
        assert_eq!(
            VolumeId::new(&"a".repeat(64)).unwrap_err().to_string(),
            "volume name is 64 bytes long; at most 63 are allowed"
        );
        for bad in ["Acme", "a/b", "-x", ".x", "a b", "é", "a\0"] {
            let e = TenantId::new(bad).unwrap_err();
            assert!(matches!(e, NameError::BadCharacter { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("tenant name"), "{e}");
        }
    }
}
