//! blockseal-nbd: the NBD protocol server of blockseal (the data plane).
//!
//! The server speaks the fixed-newstyle NBD protocol (`doc/proto.md` of
//! NetworkBlockDevice/nbd; code comments cite its sections) over Unix sockets,
//! plain TCP on loopback, and TCP with mandatory TLS. It knows volumes only
//! through two synchronous traits: a [`Catalog`] lists and opens exports named
//! `tenant/volume`, filtered by the client's [`Scope`], and an [`Export`] reads
//! and writes one of them. Their failures are [`ExportError`]s of an
//! [`ErrorClass`], which [`errno`] maps to NBD error values in one place; the
//! crate depends on no storage engine.
//!
//! # Example
//! A RAM disk served on a Unix socket in a temporary directory:
//! ```
//! use std::sync::{Arc, Mutex};
//! use blockseal_nbd::{
//!     Catalog, Export, ExportError, ExportInfo, Extent, Scope, Server, ServerConfig,
//! };
//!
//! struct Ram(Mutex<Vec<u8>>);
//!
//! impl Export for Ram {
//!     fn size(&self) -> u64 { self.0.lock().unwrap().len() as u64 }
//!     fn block_size(&self) -> u32 { 4096 }
//!     fn read_only(&self) -> bool { false }
//!     fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
//!         let at = offset as usize;
//!         buf.copy_from_slice(&self.0.lock().unwrap()[at..at + buf.len()]);
//!         Ok(())
//!     }
//!     fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
//!         let at = offset as usize;
//!         self.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//!     fn flush(&self) -> Result<(), ExportError> { Ok(()) }
//!     fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
//!         self.write_zeroes(offset, len, fua, false)
//!     }
//!     fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _no_hole: bool)
//!         -> Result<(), ExportError> {
//!         let (at, n) = (offset as usize, len as usize);
//!         self.0.lock().unwrap()[at..at + n].fill(0);
//!         Ok(())
//!     }
//!     fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
//!         Ok(vec![Extent { length: len, hole: false, zero: false }])
//!     }
//! }
//!
//! struct OneDisk(Arc<Ram>);
//!
//! impl Catalog for OneDisk {
//!     fn list(&self, scope: &Scope) -> Vec<ExportInfo> {
//!         let disk = ExportInfo { name: "acme/disk".into(), description: "RAM".into() };
//!         if scope.permits(&disk.name) { vec![disk] } else { vec![] }
//!     }
//!     fn open(&self, name: &str, scope: &Scope) -> Option<Arc<dyn Export>> {
//!         (name == "acme/disk" && scope.permits(name)).then(|| self.0.clone() as Arc<dyn Export>)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let socket = dir.path().join("nbd.sock");
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     let listener = tokio::net::UnixListener::bind(&socket)?;
//!     let disk = Arc::new(Ram(Mutex::new(vec![0; 1 << 20])));
//!     let server = Server::new(Arc::new(OneDisk(disk)), ServerConfig::default());
//!     let shutdown = server.shutdown_handle();
//!     let serving = tokio::spawn({
//!         let server = server.clone();
//!         async move { server.serve_unix(listener).await }
//!     });
//!     // Clients now reach nbd+unix:///acme/disk?socket=<socket>.
//!     shutdown.trigger();
//!     serving.await??;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Protocol coverage
//! Handshake: fixed newstyle (a client without `NBD_FLAG_C_FIXED_NEWSTYLE` may
//! only send `NBD_OPT_EXPORT_NAME`), `NBD_FLAG_NO_ZEROES`, `NBD_OPT_EXPORT_NAME`,
//! `INFO`/`GO` (`NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `LIST`,
//! `ABORT`, `STARTTLS`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` for `base:allocation`. Options longer than 64 KiB close the
//! connection; unknown options are answered `NBD_REP_ERR_UNSUP`.
//!
//! Transmission: `READ` (simple or structured replies, `OFFSET_HOLE` chunks for
//! holes in reads of 64 KiB and more, `DF`), `WRITE`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`), `CACHE`, `BLOCK_STATUS`
//! (`base:allocation`, `REQ_ONE`), `DISC`, and `FUA`. A read or write carries at
//! most [`ServerConfig::max_request_payload`] (64 MiB by default, as nbdkit;
//! advertised as the maximum payload in `NBD_INFO_BLOCK_SIZE`). A longer one
//! gets `NBD_EINVAL`, a write's payload read and discarded first, so the
//! connection goes on; a refused write of more than 256 MiB closes it.
//!
//! Not offered: extended headers (`NBD_OPT_EXTENDED_HEADERS` gets
//! `NBD_REP_ERR_UNSUP`; requests and replies use the compact 28- and 16-byte
//! headers), the oldstyle handshake, the default (empty) export name,
//! `NBD_CMD_RESIZE`, and metadata contexts other than `base:allocation`.
//!
//! # Requests and threads
//! Each connection is one task. It reads whatever the client has sent, runs the
//! small requests (read, write, trim, write zeroes and cache of at most
//! [`ServerConfig::inline_max_bytes`]) directly, and writes the replies of a
//! batch with one write; larger requests and block status go to a few blocking
//! workers of the connection, flushes and FUA requests to as many more of their
//! own, concurrently with later requests, and reply out of order. Work a
//! connection queued is dropped when the connection ends.
//! Thread hand-offs cost more CPU than a 4 KiB request, so this keeps a 4 KiB
//! request at a few microseconds of server CPU beyond the export call. For
//! exports whose reads may wait on slow media, [`ServerConfig::inline_requests`]
//! = false runs every request on blocking threads instead. The handshake calls
//! the [`Catalog`] (list, open, description) on blocking threads too, so a
//! catalog may do store I/O and a slow open stalls only the client waiting
//! for it.
//!
//! # Limits
//! [`ServerConfig`] bounds what clients can make the server hold, whatever they
//! do: the requests and bytes one connection has on blocking threads, and the
//! bytes all of them hold ([`ServerConfig::memory_budget`]), counted until each
//! reply has been written to the socket, so a client that does not read its
//! replies gets no more, and one tenant's connections hold at most its share;
//! connections in transmission, in total and per tenant; connections still in
//! the handshake; the time a client has to take a batch of replies or to send a
//! write's payload; and the time a shutdown waits for connections. At a byte or request
//! limit the server stops reading, it never fails a request for it. Block status
//! describes at most 65536 blocks per request, and write zeroes with `NO_HOLE`
//! runs in pieces of the maximum request size.
//!
//! # TLS and tenants
//! On TCP with a [`TlsConfig`], TLS is mandatory and the client certificate names
//! the tenant in a URI subject alternative name `blockseal:tenant:<name>` (see
//! [`client_tenant`]). The client then sees only `<name>/...` exports; another
//! tenant's export is answered exactly like one that does not exist.
//!
//! # Logging
//! `tracing`, with a span per connection (`conn`, `peer`, `export`). Requests are
//! logged at debug level with offsets and lengths; data, keys and plaintext are
//! never logged. A block that fails authentication is a warning (export and
//! offset) and counts in [`ServerStats::authentication_failures`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod limits;
mod proto;
mod rate;
mod server;
mod tls;
mod transmission;

pub use error::{ErrorClass, ExportError, errno};
pub use export::{Catalog, Export, ExportInfo, Extent, Scope};
pub use proto::errno as nbd_errno;
pub use rate::{BURST, RateLimit, RateLimiter, Throttle};
pub use server::{ServeError, Server, ServerConfig, ServerStats, Shutdown};
pub use tls::{
    ADMIN_URI_PREFIX, ClientIdentityError, TENANT_URI_PREFIX, TlsConfig, TlsConfigError,
    client_admin, client_tenant,
};
