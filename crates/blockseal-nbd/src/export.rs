//! The boundary between the protocol server and the volumes it serves.
//!
//! The server knows a volume only as an [`Export`] handed out by a [`Catalog`].
//! Both traits are synchronous: the volume layer has no tokio, and the server
//! decides on which threads it calls them. Their failures are
//! [`ExportError`]s, whose class the `error` module maps to NBD error values.

use std::fmt;
use std::sync::Arc;

use crate::error::ExportError;

/// One run of bytes with the same allocation status (`base:allocation` context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never zero.
    pub length: u64,
    /// The range is not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The range reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// A volume as the NBD server sees it.
///
/// # Contract, for every method
/// - The server has already validated the request: `offset + len <= size()`
///   (no overflow), `len > 0`, the export is writable for the writing methods, and
///   a request is at most the server's maximum payload (64 MiB by default) for
///   `read` and `write`. Methods need not re-check, but must not misbehave if a
///   caller outside this server passes something else: returning
///   [`ErrorClass::OutOfRange`](crate::ErrorClass::OutOfRange) or
///   [`ErrorClass::InvalidInput`](crate::ErrorClass::InvalidInput) is fine.
/// - Offsets and lengths are byte granular. Clients that negotiated block sizes
///   (`NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`) send multiples of
///   [`block_size`](Export::block_size); older clients may not, and the export must
///   then handle a partial block (read-modify-write) correctly.
/// - Methods may block (file I/O, fsync, a lock). The server calls them on
///   blocking threads, concurrently, from several requests and connections at once.
///   Requests in flight at the same time may overlap; the outcome of overlapping
///   concurrent writes is whichever lands last, as with any block device.
/// - All handles a [`Catalog`] returns for one export name share one cache: an
///   acknowledged `flush` or FUA write on one is durable for writes acknowledged on
///   all of them. This is what lets the server advertise `NBD_FLAG_CAN_MULTI_CONN`.
/// - `size`, `block_size` and `read_only` are read once when a client enters the
///   transmission phase and must not change while it stays connected.
/// - Error messages and their sources go to the log: never data or key material
///   in them.
pub trait Export: Send + Sync + 'static {
    /// Size of the export in bytes; a multiple of [`block_size`](Export::block_size).
    fn size(&self) -> u64;

    /// Preferred block size: a power of two from 512 to 65536. Writes of whole
    /// aligned blocks avoid read-modify-write. The server advertises it as the
    /// preferred size in `NBD_INFO_BLOCK_SIZE`, with a minimum of 1: the export
    /// handles partial blocks.
    fn block_size(&self) -> u32;

    /// Whether the export refuses writes. The server then answers every write,
    /// trim and write-zeroes with `EPERM` and never calls the writing methods.
    fn read_only(&self) -> bool;

    /// Fills `buf` with the bytes at `offset`. Unwritten and trimmed ranges read as
    /// zeroes. A block that fails authentication is
    /// [`ErrorClass::Authentication`](crate::ErrorClass::Authentication), never garbage.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;

    /// Reads like [`read`](Self::read) if that needs no wait on a device,
    /// else returns `Ok(false)` at once (with `buf` unspecified). The server
    /// runs small reads on the connection's task, which other connections
    /// share: it tries this first there, and runs a read that would wait
    /// with `read` on a blocking thread. The default reads, as an export
    /// whose reads never wait (memory) would; an export on a disk overrides
    /// it.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        self.read(offset, buf).map(|()| true)
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;

    /// Writes each buffer at its offset (no FUA), in order, as
    /// [`write`](Self::write) would one after another; one result per write,
    /// in order. The server hands over the aligned writes a connection finds
    /// queued back to back, in the order they arrived, so that an export can
    /// store them with one operation; the default writes them one by one.
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        writes
            .iter()
            .map(|&(offset, data)| self.write(offset, data, false))
            .collect()
    }

    /// Makes every write, trim and write-zeroes that returned before this call
    /// durable.
    fn flush(&self) -> Result<(), ExportError>;

    /// Hints that `len` bytes at `offset` are no longer needed. The range may read
    /// as anything afterwards (this export family reads it as zeroes). With `fua`,
    /// the effect is durable when this returns.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;

    /// Makes `len` bytes at `offset` read as zeroes. Without `no_hole` the export
    /// should drop the mappings (cheap, metadata only): the server relies on that
    /// to answer `NBD_CMD_FLAG_FAST_ZERO` requests. With `no_hole` the range must
    /// stay allocated. With `fua`, durable when this returns.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError>;

    /// Allocation status of the range starting at `offset`, as consecutive extents
    /// in order. The extents may cover less than `len` (at least one byte) or more
    /// (the server trims them). Extent boundaries should be multiples of
    /// [`block_size`](Export::block_size) except at the end of the export.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;

    /// Whether a write, trim or write-zeroes may block now on I/O beyond its
    /// own (the export has a backlog to commit first). The server then runs it
    /// on a blocking thread even when it is small. Default: `false`.
    fn write_may_block(&self) -> bool {
        false
    }

    /// A switch the export's owner triggers to close every connection to this
    /// export (it is being deleted, or its tenant shredded). Each connection
    /// then drains as at a server shutdown: requests not started yet are
    /// answered `ESHUTDOWN`, running ones finish and reply, and the server
    /// closes the connection. Read once when a client enters the transmission
    /// phase. Default: `None`, never revoked.
    fn revoked(&self) -> Option<crate::Shutdown> {
        None
    }

    /// The rate limits this export's requests are charged to (see
    /// [`Throttle`](crate::Throttle)). Read once when a client enters the
    /// transmission phase; the limits themselves may change later. Default:
    /// `None`, unlimited.
    fn throttle(&self) -> Option<crate::Throttle> {
        None
    }

    /// Hints that the client will soon read the range. Default: nothing.
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let _ = (offset, len);
        Ok(())
    }
}

/// What a connection may see: decided by how it authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every tenant: a local Unix socket (guarded by file permissions) or plain
    /// TCP allowed by configuration.
    All,
    /// One tenant, named by the client's TLS certificate.
    Tenant(String),
}

impl Scope {
    /// Whether an export named `tenant/volume` is visible in this scope.
    ///
    /// The server checks this itself before it asks the catalog, so a catalog that
    /// forgot to check cannot leak another tenant's export.
    pub fn permits(&self, export_name: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(tenant) => export_name
                .split_once('/')
                .is_some_and(|(t, volume)| t == tenant && !volume.is_empty()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("all tenants"),
            Scope::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// An entry of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name, `tenant/volume`.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
}

/// The exports a server offers, filtered by [`Scope`].
///
/// The server calls every method on a blocking thread, never on the runtime's
/// threads, so they may block (store I/O: listing volumes, opening one and
/// scanning its metadata), and run concurrently for several connections. A
/// slow call holds up only the client that asked.
pub trait Catalog: Send + Sync + 'static {
    /// The exports visible in `scope`.
    fn list(&self, scope: &Scope) -> Vec<ExportInfo>;

    /// Opens the export `name` (`tenant/volume`) if it exists and `scope` may see it.
    /// An export the scope may not see must be `None`, exactly like one that does
    /// not exist: the client cannot tell the two apart.
    fn open(&self, name: &str, scope: &Scope) -> Option<Arc<dyn Export>>;

    /// The description of `name`, for `NBD_INFO_DESCRIPTION`. Default: looked up in
    /// [`list`](Catalog::list).
    fn description(&self, name: &str, scope: &Scope) -> String {
        self.list(scope)
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_filters_by_tenant_prefix() {
        let acme = Scope::Tenant("acme".into());
        assert!(acme.permits("acme/disk"));
        assert!(!acme.permits("acme"));
        assert!(!acme.permits("acme/"));
        assert!(!acme.permits("acmex/disk"));
        assert!(!acme.permits("globex/disk"));
        assert!(!acme.permits(""));
        assert!(Scope::All.permits("globex/disk"));
    }
}
