//! blockseal-volume: encrypted, copy-on-write per-tenant volumes.
#![forbid(unsafe_code)]

pub mod meta;
