//! blockseal-volume: encrypted, copy-on-write per-tenant volumes.
#![forbid(unsafe_code)]

mod error;
pub mod meta;

pub use error::ErrorKind;
