//! Entry points for the fuzz targets in `fuzz/`; not part of the supported API.
//!
//! Each function hands bytes a client controls to the real decoder or to the real
//! connection code, unchanged: nothing here parses anything itself. This module
//! must never grow a second implementation of a parser, or the fuzzer would test
//! the copy.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

use crate::export::{Catalog, Scope};
use crate::handshake::{self, Negotiation, Outcome, TlsMode};
use crate::proto::{self, Request};
use crate::server::{Server, ServerConfig};
use crate::transmission;

/// Size of a request header (compact headers).
pub const REQUEST_HEADER_LEN: usize = proto::REQUEST_HEADER_LEN;

/// Largest option payload the server reads; a longer one closes the connection.
pub const MAX_OPTION_LEN: u32 = handshake::MAX_OPTION_LEN;

/// The fields of a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie.
    pub handle: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Decodes the request header at the start of `bytes`, as the transmission
/// phase does; `None` when fewer than [`REQUEST_HEADER_LEN`] bytes are given or
/// the magic is wrong.
pub fn request_header(bytes: &[u8]) -> Option<RequestHeader> {
    let header = bytes.first_chunk::<REQUEST_HEADER_LEN>()?;
    let r = Request::decode(header)?;
    Some(RequestHeader {
        flags: r.flags,
        kind: r.kind,
        handle: r.handle,
        offset: r.offset,
        len: r.len,
    })
}

/// Splits an `NBD_OPT_INFO`/`NBD_OPT_GO` payload into the export name and the
/// information requests, as option haggling does.
pub fn info_request(payload: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    handshake::parse_info_request(payload)
}

/// Splits an `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` payload into
/// the export name and the queries, as option haggling does.
pub fn meta_request(payload: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    handshake::parse_meta_request(payload)
}

/// Checks a protocol string (export name, query) as option haggling does.
pub fn protocol_string(bytes: &[u8]) -> Option<&str> {
    handshake::string(bytes)
}

/// The kind of listener a simulated client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    /// A Unix socket: no TLS, every tenant visible.
    Unix,
    /// TCP with mandatory TLS, before the upgrade: every option but
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused.
    TlsBeforeUpgrade,
    /// TCP with mandatory TLS, after the upgrade, for a client whose certificate
    /// names `tenant`.
    TlsTenant(String),
}

/// How a simulated connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Closed during option haggling (or the client flags were refused).
    Closed,
    /// The client asked for TLS and the server acknowledged it; the simulation
    /// stops there.
    StartTls,
    /// The client entered the transmission phase, which then ran to its end.
    Transmission,
}

/// What the server sent on one simulated connection.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// Every byte the server wrote, in order.
    pub output: Vec<u8>,
    /// How many of them the server had written when option haggling ended.
    pub handshake_len: usize,
    /// How the connection ended.
    pub ending: Ending,
}

/// The server did not finish a connection within [`HANG_LIMIT`] of the client
/// closing its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hung;

/// Longest time a simulated connection may take.
pub const HANG_LIMIT: Duration = Duration::from_secs(10);

/// Runs one server connection over an in-memory stream: `client` is everything
/// the client sends, after which it closes its sending side and reads until the
/// server closes. The handshake and transmission code are the server's own, with
/// a server built over `catalog` with default limits; only the socket and the
/// TLS handshake are left out.
///
/// A current-thread runtime drives it (flushes and FUA requests still run on
/// blocking threads, as in the server).
pub fn converse(
    catalog: Arc<dyn Catalog>,
    listener: Listener,
    client: &[u8],
) -> Result<Conversation, Hung> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds without I/O drivers");
    }
    RUNTIME.with(|rt| rt.block_on(converse_on(catalog, listener, client)))
}

async fn converse_on(
    catalog: Arc<dyn Catalog>,
    listener: Listener,
    client: &[u8],
) -> Result<Conversation, Hung> {
    let shared = Server::new(catalog, ServerConfig::default()).shared;
    let (scope, mode) = match listener {
        Listener::Unix => (Some(Scope::All), TlsMode::Off),
        Listener::TlsBeforeUpgrade => (None, TlsMode::Required { active: false }),
        Listener::TlsTenant(tenant) => (
            Some(Scope::Tenant(tenant)),
            TlsMode::Required { active: true },
        ),
    };
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let mut far = Counted {
        inner: far,
        written: 0,
    };
    let server = async move {
        let mut negotiation = Negotiation::new(shared.clone(), scope, mode);
        let outcome = match negotiation.greet(&mut far).await {
            Ok(true) => negotiation.negotiate(&mut far).await,
            Ok(false) => Ok(Outcome::Close),
            Err(e) => Err(e),
        };
        let handshake_len = far.written;
        let mut far = far.inner;
        let ending = match outcome {
            Ok(Outcome::Go(session)) => {
                let (r, w) = tokio::io::split(far);
                transmission::serve(r, w, session, shared).await;
                Ending::Transmission
            }
            Ok(Outcome::StartTls) => {
                let _ = far.shutdown().await;
                Ending::StartTls
            }
            Ok(Outcome::Close) | Err(_) => {
                let _ = far.shutdown().await;
                Ending::Closed
            }
        };
        (ending, handshake_len)
    };
    let (mut from_server, mut to_server) = tokio::io::split(&mut near);
    let send = async move {
        // The server may close before it has read everything: that is allowed.
        let _ = to_server.write_all(client).await;
        let _ = to_server.shutdown().await;
    };
    let receive = async move {
        let mut output = Vec::new();
        let _ = from_server.read_to_end(&mut output).await;
        output
    };
    let run = async { tokio::join!(server, send, receive) };
    let ((ending, handshake_len), (), output) = tokio::time::timeout(HANG_LIMIT, run)
        .await
        .map_err(|_| Hung)?;
    Ok(Conversation {
        output,
        handshake_len,
        ending,
    })
}

/// The server's end of the stream during the handshake, counting what it writes.
struct Counted {
    inner: DuplexStream,
    written: usize,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Export, ExportInfo};
    use crate::proto::{
        FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_ABORT, OPTION_REPLY_MAGIC,
        REP_ACK, REQUEST_MAGIC,
    };

    struct Empty;

    impl Catalog for Empty {
        fn list(&self, _scope: &Scope) -> Vec<ExportInfo> {
            Vec::new()
        }
        fn open(&self, _name: &str, _scope: &Scope) -> Option<Arc<dyn Export>> {
            None
        }
    }

    #[test]
    fn a_conversation_ends_when_the_client_aborts() {
        let mut client = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        client.extend_from_slice(&IHAVEOPT.to_be_bytes());
        client.extend_from_slice(&OPT_ABORT.to_be_bytes());
        client.extend_from_slice(&0u32.to_be_bytes());
        let c = converse(Arc::new(Empty), Listener::Unix, &client).unwrap();
        assert_eq!(c.ending, Ending::Closed);
        assert_eq!(c.handshake_len, c.output.len());
        assert_eq!(c.output.len(), 18 + 20);
        assert_eq!(&c.output[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&c.output[18..26], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c.output[30..34], &REP_ACK.to_be_bytes());
    }

    #[test]
    fn request_header_needs_28_bytes_and_the_magic() {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.resize(REQUEST_HEADER_LEN - 1, 0);
        assert_eq!(request_header(&b), None);
        b.extend_from_slice(&[5, 0xff]);
        let h = request_header(&b).unwrap();
        assert_eq!((h.kind, h.len), (0, 5), "the 29th byte is not part of it");
    }
}
