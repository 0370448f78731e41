//! The small, stable classification of volume errors.
//!
//! Protocol layers map an [`ErrorKind`] to their own status codes in exactly one
//! place (for NBD: `blockseal_nbd`'s errno mapping), so a new error variant never
//! needs more than a `kind()` arm.

/// What kind of failure a volume operation met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing the backing storage failed (NBD: EIO).
    Io,
    /// A block failed authentication: tampered, moved or corrupted (NBD: EIO).
    Authentication,
    /// The request reaches past the end of the volume when reading (NBD: EINVAL).
    OutOfRange,
    /// A write reaches past the end of the volume, or the pool is full (NBD: ENOSPC).
    NoSpace,
    /// The volume is read-only (NBD: EPERM).
    ReadOnly,
    /// The request is malformed (NBD: EINVAL).
    InvalidInput,
    /// The operation is not supported here (NBD: ENOTSUP).
    NotSupported,
    /// An earlier write or sync failed; the volume refuses writes until reopened (NBD: EIO).
    Poisoned,
    /// The store is shutting down (NBD: ESHUTDOWN).
    ShuttingDown,
}
