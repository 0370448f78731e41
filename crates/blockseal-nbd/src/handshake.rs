//! The handshake phase: greeting, client flags and option haggling (spec
//! "Handshake", "Fixed newstyle negotiation", "Option types").
//!
//! The negotiation runs over any byte stream, so the same code serves a Unix
//! socket, plain TCP and TLS after `NBD_OPT_STARTTLS`. It ends in one of three
//! ways: a [`Session`] for the transmission phase, a request to upgrade to TLS
//! (the caller wraps the stream and calls [`Negotiation::negotiate`] again), or a
//! close. It never reads past the final option, so the stream is positioned at
//! the first request when it returns a session.
//!
//! Every call into the [`Catalog`](crate::Catalog) (list, open, description)
//! runs on a blocking thread: a catalog may do store I/O (opening a volume
//! scans its metadata), and a slow one must never stall the runtime's threads
//! and with them every other connection.

use std::sync::Arc;

use bytes::{Buf, BufMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::export::{Export, Scope};
use crate::limits::{ConnectionCap, ConnectionSlot};
use crate::proto::*;
use crate::server::Shared;

/// Largest option payload read into memory. `NBD_OPT_SET_META_CONTEXT` with a
/// dozen 4096-byte queries fits; anything longer is treated as a denial of
/// service (spec "Termination of the session during option haggling") and the
/// connection is closed, as nbdkit does.
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Context id of `base:allocation` in `NBD_REP_META_CONTEXT` after `SET`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Everything the transmission phase needs, fixed when the client chose an export.
pub(crate) struct Session {
    pub(crate) export: Arc<dyn Export>,
    pub(crate) name: String,
    pub(crate) size: u64,
    /// Transmission flags as sent to the client.
    pub(crate) flags: u16,
    pub(crate) structured: bool,
    /// Context id when `base:allocation` was selected for this export.
    pub(crate) base_allocation: Option<u32>,
    /// Alignment the client agreed to (`NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`);
    /// 1 when it did not, and requests are then byte granular.
    pub(crate) alignment: u32,
    /// The connection's place under the connection caps and its tenant's share
    /// of the memory budget, held while it lasts.
    pub(crate) slot: Option<ConnectionSlot>,
}

/// How an option haggling round ended.
pub(crate) enum Outcome {
    Go(Session),
    StartTls,
    Close,
}

/// TLS mode of one connection (spec "Server-side requirements").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// NOTLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// FORCEDTLS: every option but `STARTTLS` and `ABORT` needs TLS first.
    Required { active: bool },
}

/// State of option haggling on one connection.
pub(crate) struct Negotiation {
    shared: Arc<Shared>,
    /// `None` until the scope is known (before TLS in FORCEDTLS mode).
    scope: Option<Scope>,
    tls: TlsMode,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: export name and whether
    /// `base:allocation` was selected.
    meta: Option<(String, bool)>,
}

impl Negotiation {
    pub(crate) fn new(shared: Arc<Shared>, scope: Option<Scope>, tls: TlsMode) -> Self {
        Negotiation {
            shared,
            scope,
            tls,
            fixed: false,
            no_zeroes: false,
            structured: false,
            meta: None,
        }
    }

    /// After a successful TLS handshake: the client's scope is now known, and
    /// "the server MUST NOT preserve any negotiation state (such as a request for
    /// `NBD_OPT_STRUCTURED_REPLY`, or metadata contexts from
    /// `NBD_OPT_SET_META_CONTEXT`) issued before this command" (`NBD_OPT_STARTTLS`).
    pub(crate) fn tls_started(&mut self, scope: Scope) {
        self.scope = Some(scope);
        self.tls = TlsMode::Required { active: true };
        self.structured = false;
        self.meta = None;
    }

    /// Sends the newstyle greeting and reads the client flags ("Newstyle
    /// negotiation"). `false` means the client sent flags we must refuse: "the
    /// server MUST drop the TCP connection if the client sets an unknown flag"
    /// ("Client flags").
    pub(crate) async fn greet<S>(&mut self, s: &mut S) -> std::io::Result<bool>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = Vec::with_capacity(18);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&out).await?;
        s.flush().await?;
        let flags = s.read_u32().await?;
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            warn!(flags, "client sent unknown handshake flags; closing");
            return Ok(false);
        }
        // A client without FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME.
        self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(true)
    }

    /// Haggles options until the client enters transmission, asks for TLS, or leaves.
    pub(crate) async fn negotiate<S>(&mut self, s: &mut S) -> std::io::Result<Outcome>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A shutdown needs no handling here: the server drops the handshake
        // as soon as one starts (`server::bounded_handshake`).
        loop {
            let mut header = [0u8; 16];
            s.read_exact(&mut header).await?;
            let mut h = &header[..];
            let (magic, option, len) = (h.get_u64(), h.get_u32(), h.get_u32());
            if magic != IHAVEOPT {
                warn!(magic, "bad option magic; closing");
                return Ok(Outcome::Close);
            }
            if len > MAX_OPTION_LEN {
                warn!(option, len, "option payload too large; closing");
                return Ok(Outcome::Close);
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await?;
            debug!(option, len, "option");

            if !self.fixed && option != OPT_EXPORT_NAME {
                // Non-fixed newstyle knows only NBD_OPT_EXPORT_NAME ("Fixed newstyle
                // negotiation"): there is no way to send an error back.
                warn!(
                    option,
                    "option from a client without fixed newstyle; closing"
                );
                return Ok(Outcome::Close);
            }
            if self.tls == (TlsMode::Required { active: false })
                && option != OPT_STARTTLS
                && option != OPT_ABORT
            {
                // FORCEDTLS mode: NBD_OPT_EXPORT_NAME cannot error, so it closes;
                // everything else, unknown options included, gets TLS_REQD.
                if option == OPT_EXPORT_NAME {
                    warn!("NBD_OPT_EXPORT_NAME before TLS; closing");
                    return Ok(Outcome::Close);
                }
                reply(
                    s,
                    option,
                    REP_ERR_TLS_REQD,
                    b"TLS is required; send NBD_OPT_STARTTLS",
                )
                .await?;
                continue;
            }

            match option {
                OPT_EXPORT_NAME => return self.export_name(s, &payload).await,
                OPT_ABORT => {
                    // NBD_OPT_ABORT: "The server MUST reply with NBD_REP_ACK", and
                    // "SHOULD ignore any data sent by the client".
                    // The peer may already be gone; that is fine.
                    let _ = reply(s, option, REP_ACK, b"").await;
                    return Ok(Outcome::Close);
                }
                OPT_LIST => self.list(s, &payload).await?,
                OPT_STARTTLS => {
                    if let Some(outcome) = self.starttls(s, &payload).await? {
                        return Ok(outcome);
                    }
                }
                OPT_INFO | OPT_GO => {
                    if let Some(session) = self.info_or_go(s, option, &payload).await? {
                        return Ok(Outcome::Go(session));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    // NBD_OPT_STRUCTURED_REPLY: no data allowed.
                    if !payload.is_empty() {
                        reply(s, option, REP_ERR_INVALID, b"option takes no data").await?;
                    } else {
                        self.structured = true;
                        reply(s, option, REP_ACK, b"").await?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(s, option, &payload).await?
                }
                _ => {
                    // "Baseline": options the server does not implement get
                    // NBD_REP_ERR_UNSUP, and the next message still parses (the
                    // payload was read above). This includes
                    // NBD_OPT_EXTENDED_HEADERS: compact headers only.
                    reply(s, option, REP_ERR_UNSUP, b"option not supported").await?;
                }
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists, so a refusal closes.
    async fn export_name<S>(&mut self, s: &mut S, payload: &[u8]) -> std::io::Result<Outcome>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(name) = string(payload) else {
            warn!("export name is not a valid string; closing");
            return Ok(Outcome::Close);
        };
        let Some(export) = self.open(name).await else {
            debug!(export = name, "unknown export; closing");
            return Ok(Outcome::Close);
        };
        // "If the server is unwilling to allow the export, it MUST terminate the
        // session".
        let Some(slot) = self.enter_transmission(name) else {
            return Ok(Outcome::Close);
        };
        let mut session = self.session(name, export, false);
        session.slot = Some(slot);
        // "If the value of the option field is NBD_OPT_EXPORT_NAME and the server is
        // willing to allow the export": size, flags, then 124 zero bytes unless the
        // client set NBD_FLAG_C_NO_ZEROES.
        let mut out = Vec::with_capacity(10 + 124);
        out.put_u64(session.size);
        out.put_u16(session.flags);
        if !self.no_zeroes {
            out.put_bytes(0, 124);
        }
        s.write_all(&out).await?;
        s.flush().await?;
        Ok(Outcome::Go(session))
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per visible export, then `NBD_REP_ACK`.
    async fn list<S>(&mut self, s: &mut S, payload: &[u8]) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !payload.is_empty() {
            // "the server SHOULD reject a request that includes data with
            // NBD_REP_ERR_INVALID".
            return reply(s, OPT_LIST, REP_ERR_INVALID, b"option takes no data").await;
        }
        let mut out = Vec::new();
        if let Some(scope) = self.scope.clone() {
            let catalog = self.shared.catalog.clone();
            let exports = blocking(move || catalog.list(&scope))
                .await
                .unwrap_or_default();
            let scope = self.scope.as_ref().expect("the scope was known above");
            for e in exports {
                if !scope.permits(&e.name) || e.name.len() > MAX_STRING_LEN {
                    continue;
                }
                let description = truncate(&e.description, MAX_STRING_LEN);
                let mut data = Vec::with_capacity(4 + e.name.len() + description.len());
                data.put_u32(e.name.len() as u32);
                data.put_slice(e.name.as_bytes());
                data.put_slice(description.as_bytes());
                put_option_reply(&mut out, OPT_LIST, REP_SERVER, &data);
            }
        }
        put_option_reply(&mut out, OPT_LIST, REP_ACK, b"");
        s.write_all(&out).await?;
        s.flush().await
    }

    /// `NBD_OPT_STARTTLS`: `Some(StartTls)` after the ACK, `None` after an error reply.
    async fn starttls<S>(&mut self, s: &mut S, payload: &[u8]) -> std::io::Result<Option<Outcome>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // "The client MUST NOT send any additional data with the option ...
        // NBD_REP_ERR_INVALID if the client included data".
        if !payload.is_empty() {
            reply(s, OPT_STARTTLS, REP_ERR_INVALID, b"option takes no data").await?;
            return Ok(None);
        }
        match self.tls {
            // NOTLS mode: NBD_REP_ERR_POLICY "if it does not support TLS for policy
            // reasons": this listener is a local socket or explicitly plain TCP.
            TlsMode::Off => {
                reply(
                    s,
                    OPT_STARTTLS,
                    REP_ERR_POLICY,
                    b"TLS is not offered on this listener",
                )
                .await?;
                Ok(None)
            }
            // FORCEDTLS: a second STARTTLS "MUST reply with NBD_REP_ERR_INVALID".
            TlsMode::Required { active: true } => {
                reply(s, OPT_STARTTLS, REP_ERR_INVALID, b"TLS is already active").await?;
                Ok(None)
            }
            TlsMode::Required { active: false } => {
                reply(s, OPT_STARTTLS, REP_ACK, b"").await?;
                Ok(Some(Outcome::StartTls))
            }
        }
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO` (they share one format).
    async fn info_or_go<S>(
        &mut self,
        s: &mut S,
        option: u32,
        payload: &[u8],
    ) -> std::io::Result<Option<Session>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Data: 32-bit name length ("MUST be no larger than the option data length
        // - 6"), the name, a 16-bit count and that many 16-bit information requests.
        let Some((name, requests)) = parse_info_request(payload) else {
            reply(s, option, REP_ERR_INVALID, b"malformed request").await?;
            return Ok(None);
        };
        let Some(name) = string(name) else {
            reply(
                s,
                option,
                REP_ERR_INVALID,
                b"export name is not a valid string",
            )
            .await?;
            return Ok(None);
        };
        let Some(export) = self.open(name).await else {
            // NBD_REP_ERR_UNKNOWN, whether the export does not exist or belongs to a
            // tenant this client may not see: the two are indistinguishable.
            reply(s, option, REP_ERR_UNKNOWN, b"export not found").await?;
            return Ok(None);
        };
        let wants = |info: u16| requests.contains(&info);
        let mut session = self.session(
            name,
            export.clone(),
            option == OPT_GO && wants(INFO_BLOCK_SIZE),
        );
        if option == OPT_GO {
            // Checked before anything is sent, so a refusal is one error reply and
            // the client may try again or give up.
            let Some(slot) = self.enter_transmission(name) else {
                reply(
                    s,
                    option,
                    REP_ERR_POLICY,
                    b"too many connections; try again later",
                )
                .await?;
                return Ok(None);
            };
            session.slot = Some(slot);
        }

        let mut out = Vec::new();
        // NBD_INFO_EXPORT is mandatory before NBD_REP_ACK.
        let mut info = Vec::with_capacity(12);
        info.put_u16(INFO_EXPORT);
        info.put_u64(session.size);
        info.put_u16(session.flags);
        put_option_reply(&mut out, option, REP_INFO, &info);
        // NBD_INFO_BLOCK_SIZE is always sent (clients ignore unrequested
        // information): minimum 1 (an export handles partial blocks), preferred =
        // the export's block size, maximum = the largest request payload ("Block
        // size constraints").
        let (minimum, preferred, maximum) = self.block_sizes(export.as_ref());
        let mut info = Vec::with_capacity(14);
        info.put_u16(INFO_BLOCK_SIZE);
        info.put_u32(minimum);
        info.put_u32(preferred);
        info.put_u32(maximum);
        put_option_reply(&mut out, option, REP_INFO, &info);
        if wants(INFO_NAME) {
            let mut info = Vec::with_capacity(2 + name.len());
            info.put_u16(INFO_NAME);
            info.put_slice(name.as_bytes());
            put_option_reply(&mut out, option, REP_INFO, &info);
        }
        if wants(INFO_DESCRIPTION) {
            let scope = self
                .scope
                .clone()
                .expect("open() succeeded, so the scope is known");
            let catalog = self.shared.catalog.clone();
            let export_name = name.to_owned();
            let description = blocking(move || catalog.description(&export_name, &scope))
                .await
                .unwrap_or_default();
            let description = truncate(&description, MAX_STRING_LEN);
            let mut info = Vec::with_capacity(2 + description.len());
            info.put_u16(INFO_DESCRIPTION);
            info.put_slice(description.as_bytes());
            put_option_reply(&mut out, option, REP_INFO, &info);
        }
        put_option_reply(&mut out, option, REP_ACK, b"");
        s.write_all(&out).await?;
        s.flush().await?;
        // "after a successful reply to NBD_OPT_GO ... transmission mode is entered
        // immediately", with no zero padding.
        Ok((option == OPT_GO).then_some(session))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` for the `base:`
    /// namespace (spec "The `base:` metadata namespace").
    async fn meta_context<S>(
        &mut self,
        s: &mut S,
        option: u32,
        payload: &[u8],
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts
            // (including when this command fails)".
            self.meta = None;
        }
        if !self.structured {
            // "This option MUST NOT be requested unless structured replies have been
            // negotiated first ... a server SHOULD send NBD_REP_ERR_INVALID" (SET;
            // LIST: MAY).
            return reply(
                s,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            )
            .await;
        }
        let Some((name, queries)) = parse_meta_request(payload) else {
            // "If the option request is syntactically invalid ... the server MUST
            // fail the request with NBD_REP_ERR_INVALID".
            return reply(s, option, REP_ERR_INVALID, b"malformed request").await;
        };
        let Some(name) = string(name) else {
            return reply(
                s,
                option,
                REP_ERR_INVALID,
                b"export name is not a valid string",
            )
            .await;
        };
        if self.open(name).await.is_none() {
            return reply(s, option, REP_ERR_UNKNOWN, b"export not found").await;
        }
        let mut base_allocation = false;
        if queries.is_empty() {
            // LIST with no queries: "MUST return all the metadata contexts";
            // SET with no queries: "MUST select no metadata contexts".
            base_allocation = !set;
        }
        for query in queries {
            let Some(query) = string(query) else {
                return reply(s, option, REP_ERR_INVALID, b"query is not a valid string").await;
            };
            let Some((namespace, leaf)) = query.split_once(':') else {
                return reply(s, option, REP_ERR_INVALID, b"query lacks a namespace").await;
            };
            // "base:" is a wildcard for LIST and ignored by SET; unknown leaf names
            // and unknown namespaces are ignored.
            if namespace == "base" && (leaf == "allocation" || (leaf.is_empty() && !set)) {
                base_allocation = true;
            }
        }
        let mut out = Vec::new();
        if base_allocation {
            // "The metadata context ID in these replies is reserved and SHOULD be
            // set to zero" for LIST; a unique id for SET.
            let mut data = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            data.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            data.put_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(&mut out, option, REP_META_CONTEXT, &data);
        }
        put_option_reply(&mut out, option, REP_ACK, b"");
        if set {
            self.meta = Some((name.to_owned(), base_allocation));
        }
        s.write_all(&out).await?;
        s.flush().await
    }

    /// Opens `name` if the scope may see it; the catalog filters too, but this
    /// check keeps a catalog bug from leaking another tenant's export.
    async fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let scope = self.scope.clone()?;
        if !scope.permits(name) {
            return None;
        }
        let catalog = self.shared.catalog.clone();
        let name = name.to_owned();
        blocking(move || catalog.open(&name, &scope)).await?
    }

    /// A slot under the connection caps for a client entering transmission with
    /// export `name`; `None` (counted and logged, rate-limited) when a cap is full.
    fn enter_transmission(&self, name: &str) -> Option<ConnectionSlot> {
        let tenant = name.split_once('/').map_or(name, |(tenant, _)| tenant);
        let limits = &self.shared.limits;
        match limits.enter_transmission(tenant) {
            Ok(slot) => Some(slot),
            Err(cap) => {
                limits
                    .refused_connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(held_back) = limits.connection_log.allow() {
                    let config = &self.shared.config;
                    match cap {
                        ConnectionCap::Total => warn!(
                            max_connections = config.max_connections,
                            similar_not_logged = held_back,
                            "connection refused: the server is at its connection limit"
                        ),
                        ConnectionCap::Tenant => warn!(
                            tenant,
                            max_connections_per_tenant = config.max_connections_per_tenant,
                            similar_not_logged = held_back,
                            "connection refused: the tenant is at its connection limit"
                        ),
                    }
                }
                None
            }
        }
    }

    fn session(&self, name: &str, export: Arc<dyn Export>, agreed_block_size: bool) -> Session {
        // "Transmission flags": advertise what this server implements for this export.
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
        if export.read_only() {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.structured {
            // NBD_FLAG_SEND_DF "MUST leave this flag clear if structured replies
            // have not been negotiated".
            flags |= FLAG_SEND_DF;
        }
        let base_allocation = match &self.meta {
            Some((meta_name, true)) if meta_name == name => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        let (minimum, _, _) = self.block_sizes(export.as_ref());
        Session {
            size: export.size(),
            export,
            name: name.to_owned(),
            flags,
            structured: self.structured,
            base_allocation,
            alignment: if agreed_block_size { minimum } else { 1 },
            slot: None,
        }
    }

    /// Minimum, preferred and maximum block size ("Block size constraints"). An
    /// export reporting an impossible block size gets the spec defaults.
    ///
    /// The minimum is 1: every export handles partial blocks (read-modify-write,
    /// see the [`Export`] contract). Advertising the block size as the minimum
    /// makes libnbd refuse unaligned requests on the client side, which breaks
    /// clients that pass unaligned I/O through (nbdfuse under `mkfs.ext4`).
    fn block_sizes(&self, export: &dyn Export) -> (u32, u32, u32) {
        let bs = export.block_size();
        let (minimum, preferred) = if bs.is_power_of_two() && (512..=65536).contains(&bs) {
            (1, bs)
        } else {
            (1, 4096)
        };
        // The maximum "MUST be ... an integer multiple of the minimum block size".
        let maximum = self.shared.config.max_request_payload / minimum * minimum;
        (minimum, preferred, maximum)
    }
}

/// Runs `call` (a catalog call) on a blocking thread and waits for it without
/// holding a runtime thread. A panic in it goes on in the connection's task, as
/// if it had run there; `None` when the runtime shut down before it started.
async fn blocking<T, F>(call: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(call).await {
        Ok(value) => Some(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// Writes one option reply and flushes it.
async fn reply<S>(s: &mut S, option: u32, rep: u32, payload: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    if rep & (1 << 31) != 0 {
        debug!(option, rep, "option refused");
    }
    let mut out = Vec::with_capacity(20 + payload.len());
    put_option_reply(&mut out, option, rep, payload);
    s.write_all(&out).await?;
    s.flush().await
}

/// A protocol string: UTF-8, at most 4096 bytes, no NUL ("Conventions").
pub(crate) fn string(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Splits an `NBD_OPT_INFO`/`NBD_OPT_GO` payload into the name and the requests.
pub(crate) fn parse_info_request(mut p: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    if p.len() < 6 {
        return None;
    }
    let name_len = p.get_u32() as usize;
    if name_len > p.len() - 2 {
        return None;
    }
    let (name, mut rest) = p.split_at(name_len);
    let count = usize::from(rest.get_u16());
    if rest.len() != 2 * count {
        return None;
    }
    let requests = (0..count).map(|_| rest.get_u16()).collect();
    Some((name, requests))
}

/// Splits a `*_META_CONTEXT` payload into the export name and the queries.
pub(crate) fn parse_meta_request(mut p: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name = take_counted(&mut p)?;
    if p.len() < 4 {
        return None;
    }
    let count = p.get_u32() as usize;
    // Each query needs at least its 4-byte length.
    if count > p.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_counted(&mut p)?);
    }
    p.is_empty().then_some((name, queries))
}

/// Takes a 32-bit length and that many bytes.
fn take_counted<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
    if p.len() < 4 {
        return None;
    }
    let len = p.get_u32() as usize;
    if len > p.len() {
        return None;
    }
    let (value, rest) = p.split_at(len);
    *p = rest;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_payload(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u32(name.len() as u32);
        p.put_slice(name);
        p.put_u16(requests.len() as u16);
        for r in requests {
            p.put_u16(*r);
        }
        p
    }

    #[test]
    fn info_request_parsing() {
        let p = info_payload(b"acme/disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let (name, reqs) = parse_info_request(&p).unwrap();
        assert_eq!(name, b"acme/disk");
        assert_eq!(reqs, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        // Name length pointing past the data.
        let mut bad = p.clone();
        bad[3] = 200;
        assert!(parse_info_request(&bad).is_none());
        // Count disagreeing with the remaining bytes.
        let mut bad = p.clone();
        bad.push(0);
        assert!(parse_info_request(&bad).is_none());
        assert!(parse_info_request(&p[..5]).is_none());
        assert!(parse_info_request(&info_payload(b"", &[])).is_some());
    }

    #[test]
    fn meta_request_parsing() {
        let mut p = Vec::new();
        p.put_u32(4);
        p.put_slice(b"a/b1");
        p.put_u32(2);
        p.put_u32(5);
        p.put_slice(b"base:");
        p.put_u32(15);
        p.put_slice(b"base:allocation");
        let (name, queries) = parse_meta_request(&p).unwrap();
        assert_eq!(name, b"a/b1");
        assert_eq!(queries, vec![&b"base:"[..], &b"base:allocation"[..]]);
        assert!(parse_meta_request(&p[..p.len() - 1]).is_none());
        let mut long = p.clone();
        long.push(0);
        assert!(parse_meta_request(&long).is_none());
        // A query count no payload could hold.
        let mut huge = Vec::new();
        huge.put_u32(0);
        huge.put_u32(u32::MAX);
        assert!(parse_meta_request(&huge).is_none());
    }

    #[test]
    fn strings_are_utf8_without_nul() {
        assert_eq!(string(b"acme/disk"), Some("acme/disk"));
        assert_eq!(string(b"a\0b"), None);
        assert_eq!(string(&[0xff]), None);
        assert_eq!(string(&vec![b'a'; 4097]), None);
    }
}
