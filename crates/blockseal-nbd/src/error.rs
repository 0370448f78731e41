//! The error an [`Export`](crate::Export) returns, and the one mapping from its
//! [`ErrorClass`] to an NBD error value ([`errno`]).
//!
//! The crate owns this type so that it depends on no storage engine: whoever
//! implements an export (the `blockseal` binary for volumes, a test for a RAM
//! disk) decides which class each of its failures belongs to. Nothing else in
//! the crate may invent error numbers for export failures.

use std::fmt;

use crate::proto::errno::{EINVAL, EIO, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};

/// What kind of failure an export met, in the terms of the NBD error values
/// (spec "Error values"). It decides the error value the client receives, the
/// generic text it sees next to it in a structured reply, and the level at
/// which the server logs the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// `NBD_EIO`: reading or writing the storage failed. Logged as an error.
    Io,
    /// `NBD_EIO`, for a block that failed authentication (tampered, moved or
    /// corrupted). The client learns no more than for any unreadable block; the
    /// server logs a warning and counts it in
    /// [`ServerStats::authentication_failures`](crate::ServerStats::authentication_failures).
    Authentication,
    /// `NBD_EIO`: an earlier write or sync failed, and the export refuses writes
    /// until it is reopened. Logged as an error.
    Poisoned,
    /// `NBD_EINVAL`: the request reaches past the end of the export.
    OutOfRange,
    /// `NBD_EINVAL`: the request is malformed.
    InvalidInput,
    /// `NBD_ENOSPC`: no space is left for the write. Logged as a warning.
    NoSpace,
    /// `NBD_EPERM`: the export is read-only.
    ReadOnly,
    /// `NBD_EOVERFLOW`: the request is too large to process at once. The spec
    /// allows it only for a trim or write zeroes longer than the maximum
    /// payload, and for a read with `NBD_CMD_FLAG_DF`.
    Overflow,
    /// `NBD_ENOTSUP`: the operation is not supported here.
    NotSupported,
    /// `NBD_ESHUTDOWN`: the server or the store is shutting down.
    ShuttingDown,
}

/// The NBD error value (spec "Error values") a client receives for an export
/// error of `class`.
///
/// This is the only place an export failure becomes a protocol error value.
pub fn errno(class: ErrorClass) -> u32 {
    match class {
        ErrorClass::Io | ErrorClass::Authentication | ErrorClass::Poisoned => EIO,
        ErrorClass::OutOfRange | ErrorClass::InvalidInput => EINVAL,
        ErrorClass::NoSpace => ENOSPC,
        ErrorClass::ReadOnly => EPERM,
        ErrorClass::Overflow => EOVERFLOW,
        ErrorClass::NotSupported => ENOTSUP,
        ErrorClass::ShuttingDown => ESHUTDOWN,
    }
}

/// The text a client sees next to an export error (structured replies only).
pub(crate) fn class_text(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Io | ErrorClass::Authentication => "input/output error",
        ErrorClass::Poisoned => "input/output error: volume refuses writes until reopened",
        ErrorClass::OutOfRange => "request reaches past the end of the export",
        ErrorClass::InvalidInput => "invalid request",
        ErrorClass::NoSpace => "no space left",
        ErrorClass::ReadOnly => "export is read-only",
        ErrorClass::Overflow => "request is too large",
        ErrorClass::NotSupported => "operation not supported",
        ErrorClass::ShuttingDown => "server is shutting down",
    }
}

/// A stable name of `class` for a request's tracing span (`error` field):
/// lower case, one token, never the export's message.
pub(crate) fn class_name(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Io => "io",
        ErrorClass::Authentication => "authentication",
        ErrorClass::Poisoned => "poisoned",
        ErrorClass::OutOfRange => "out_of_range",
        ErrorClass::InvalidInput => "invalid_input",
        ErrorClass::NoSpace => "no_space",
        ErrorClass::ReadOnly => "read_only",
        ErrorClass::Overflow => "overflow",
        ErrorClass::NotSupported => "not_supported",
        ErrorClass::ShuttingDown => "shutting_down",
    }
}

/// A failed export operation: an [`ErrorClass`], a short message and, when the
/// failure has a cause, that cause as [`source`](std::error::Error::source).
///
/// The message and the source go to the server log only, the message first and
/// then each cause in turn; the client sees the NBD error value and a generic
/// text for the class. So they may name a block or a file, but must never
/// contain data or key material. As with any error, the message should not
/// repeat its source.
#[derive(Debug)]
pub struct ExportError {
    class: ErrorClass,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ExportError {
    /// An error of `class` with a log message.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ExportError {
            class,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is; decides the NBD error value.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The message for the server log (without its source).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ErrorClass> for ExportError {
    fn from(class: ErrorClass) -> Self {
        ExportError::new(class, class_text(class))
    }
}

/// An error and its causes on one line, `a: b: c`, for log lines.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_error_value() {
        assert_eq!(errno(ErrorClass::Io), EIO);
        assert_eq!(errno(ErrorClass::Authentication), EIO);
        assert_eq!(errno(ErrorClass::Poisoned), EIO);
        assert_eq!(errno(ErrorClass::OutOfRange), EINVAL);
        assert_eq!(errno(ErrorClass::InvalidInput), EINVAL);
        assert_eq!(errno(ErrorClass::NoSpace), ENOSPC);
        assert_eq!(errno(ErrorClass::ReadOnly), EPERM);
        assert_eq!(errno(ErrorClass::Overflow), EOVERFLOW);
        assert_eq!(errno(ErrorClass::NotSupported), ENOTSUP);
        assert_eq!(errno(ErrorClass::ShuttingDown), ESHUTDOWN);
    }

    #[test]
    fn the_log_line_carries_the_causes_and_the_display_does_not() {
        let io = std::io::Error::other("disk on fire");
        let err = ExportError::new(ErrorClass::Io, "read failed").with_source(io);
        assert_eq!(err.to_string(), "read failed");
        assert_eq!(chain(&err), "read failed: disk on fire");
        let bare = ExportError::from(ErrorClass::ReadOnly);
        assert_eq!(bare.message(), "export is read-only");
        assert!(std::error::Error::source(&bare).is_none());
    }
}
