//! blockseal-volume: encrypted, copy-on-write per-tenant volumes.
#![forbid(unsafe_code)]

pub mod block;
mod error;
pub mod meta;
pub mod nonce;
pub mod seal;

pub use block::{BlockSize, Lba};
pub use error::ErrorKind;
pub use nonce::{NonceError, NonceReserver, NonceSource};
pub use seal::{AuthError, BlockCipher, Nonce, Tag};
