//! Request validation: pure checks of a request header against what the
//! client was told in the handshake (spec "Request types", "Size
//! constraints", "Error values"): the command and its flags, the range against
//! the export size, the read-only flag, the maximum payload and the block
//! size alignment the client agreed to.
//!
//! Nothing here calls the export or touches the connection; a refusal is an
//! error value and a message for the reply, never a disconnect (except that
//! `NBD_CMD_DISC` asks for one).

use bytes::Bytes;

use crate::handshake::Session;
use crate::proto::errno::{EINVAL, ENOSPC, ENOTSUP, EPERM};
use crate::proto::*;

/// Most blocks of the export one block status reply describes. The export's
/// answer costs time and memory per block (the volume looks up every block of
/// the range), so a 4 GiB query of 512-byte blocks would otherwise cost
/// hundreds of MiB and a quarter of a second. 65536 blocks are 32 MiB of
/// 512-byte blocks, 256 MiB of 4 KiB blocks.
pub(super) const MAX_STATUS_BLOCKS: u64 = 1 << 16;

/// What validation needs to know of a session, fixed when the client entered
/// transmission.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    /// Size of the export in bytes.
    pub(super) size: u64,
    /// Transmission flags as sent to the client.
    pub(super) flags: u16,
    /// Alignment the client agreed to; 1 when it did not.
    pub(super) alignment: u32,
    /// Context id when `base:allocation` was selected for this export.
    pub(super) base_allocation: Option<u32>,
    /// Largest read or write payload.
    pub(super) max_payload: u32,
}

impl Rules {
    /// The rules of `session` with a maximum payload of `max_payload`.
    pub(super) fn new(session: &Session, max_payload: u32) -> Rules {
        Rules {
            size: session.size,
            flags: session.flags,
            alignment: session.alignment,
            base_allocation: session.base_allocation,
            max_payload,
        }
    }
}

/// A validated request, ready for the export.
#[derive(Debug, PartialEq)]
pub(super) enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
        /// Send zero ranges as holes, which asks the export for block status:
        /// only for long structured reads on a blocking thread.
        sparse: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

impl Op {
    pub(super) fn fua(&self) -> bool {
        match self {
            Op::Write { fua, .. } | Op::Trim { fua, .. } | Op::WriteZeroes { fua, .. } => *fua,
            _ => false,
        }
    }

    /// Bytes this request moves: what it reads, writes (`payload`: its write
    /// payload, read or not yet), zeroes or caches. Larger requests leave the
    /// connection task.
    pub(super) fn weight(&self, payload: usize) -> u64 {
        match self {
            Op::Read { len, .. } => u64::from(*len),
            Op::Write { .. } => payload as u64,
            Op::Trim { len, .. } | Op::WriteZeroes { len, .. } | Op::Cache { len, .. } => *len,
            Op::Flush | Op::BlockStatus { .. } => 0,
        }
    }

    /// Bytes this request is charged under a bytes-per-second rate limit:
    /// the data it moves (a read's, a write's or a cache request's length, a
    /// write zeroes' that must write real zero blocks), nothing otherwise.
    pub(super) fn rate_bytes(&self, payload: usize) -> u64 {
        match self {
            Op::Read { len, .. } => u64::from(*len),
            Op::Write { .. } => payload as u64,
            Op::Cache { len, .. }
            | Op::WriteZeroes {
                len, no_hole: true, ..
            } => *len,
            _ => 0,
        }
    }

    /// Bytes this request holds while offloaded and until its reply is written:
    /// its write payload (`payload`, read or not yet), its read data, one piece
    /// of sealed zeroes, or its block status reply (`block`: the export's block
    /// size as block status counts it). Headers are not counted.
    pub(super) fn cost(&self, payload: usize, max_payload: u32, block: u64) -> u64 {
        match self {
            Op::Read { len, .. } => u64::from(*len),
            Op::Write { .. } => payload as u64,
            Op::WriteZeroes {
                len, no_hole: true, ..
            } => (*len).min(u64::from(max_payload)),
            // The reply (8 bytes a descriptor, at most one a block) and the
            // export's answer, which for the volume is about 50 bytes a block,
            // for the blocks the reply may describe.
            Op::BlockStatus { offset, len, .. } => {
                let blocks = (offset + u64::from(*len)).div_ceil(block) - offset / block;
                64 * blocks.min(MAX_STATUS_BLOCKS)
            }
            _ => 0,
        }
    }
}

/// The outcome of validating a request header.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    Run(Op),
    /// Succeeds without touching the export (zero-length requests).
    Done,
    Refuse(u32, &'static str),
    Disconnect,
}

/// Checks a request against the session; no export call happens here.
pub(super) fn validate(req: &Request, s: &Rules) -> Verdict {
    let ro = s.flags & FLAG_READ_ONLY != 0;
    let fua = if s.flags & FLAG_SEND_FUA != 0 {
        CMD_FLAG_FUA
    } else {
        0
    };
    // "Command flags": the flags each command may carry, given what was advertised.
    let (allowed, writes) = match req.kind {
        CMD_READ => (
            fua | if s.flags & FLAG_SEND_DF != 0 {
                CMD_FLAG_DF
            } else {
                0
            },
            false,
        ),
        CMD_WRITE => (fua, true),
        // NBD_CMD_DISC takes no reply; flags or not, the client is leaving.
        CMD_DISC => return Verdict::Disconnect,
        CMD_FLUSH | CMD_CACHE => (fua, false),
        CMD_TRIM => (fua, true),
        CMD_WRITE_ZEROES => (fua | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, true),
        CMD_BLOCK_STATUS => (fua | CMD_FLAG_REQ_ONE, false),
        // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        _ => return Verdict::Refuse(EINVAL, "unknown command"),
    };
    // "SHOULD return NBD_EPERM if it receives a write or trim request on a
    // read-only export" (and write zeroes).
    if writes && ro {
        return Verdict::Refuse(EPERM, "export is read-only");
    }
    // "SHOULD return NBD_EINVAL if it receives an unknown command flag ... or a
    // flag not explicitly documented as applicable to the given request."
    if req.flags & !allowed != 0 {
        return Verdict::Refuse(EINVAL, "flag not valid for this command");
    }
    if req.kind == CMD_FLUSH {
        // "For a flush request, length and offset are reserved, and MUST be set to
        // all-zero."
        if req.offset != 0 || req.len != 0 {
            return Verdict::Refuse(EINVAL, "flush with nonzero offset or length");
        }
        return Verdict::Run(Op::Flush);
    }
    let len = u64::from(req.len);
    let end = req.offset.checked_add(len);
    if end.is_none_or(|end| end > s.size) {
        // "Error values": ENOSPC for writes (and write zeroes) past the end,
        // EINVAL for reads, trims and the rest.
        return if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Verdict::Refuse(ENOSPC, "request reaches past the end of the export")
        } else {
            Verdict::Refuse(EINVAL, "request reaches past the end of the export")
        };
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > s.max_payload {
        // "Block size constraints": larger than the advertised maximum.
        return Verdict::Refuse(EINVAL, "request is larger than the maximum block size");
    }
    let align = u64::from(s.alignment);
    if align > 1
        && (!req.offset.is_multiple_of(align)
            || (!len.is_multiple_of(align) && end != Some(s.size)))
    {
        // "The server SHOULD report an NBD_EINVAL error if the client's request is
        // not aligned to advertised minimum block size boundaries".
        return Verdict::Refuse(EINVAL, "request is not aligned to the minimum block size");
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_BLOCK_STATUS => {
            // "Servers SHOULD reply with NBD_EINVAL to clients sending
            // NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            let Some(context) = s.base_allocation else {
                return Verdict::Refuse(EINVAL, "no metadata context was selected");
            };
            // A zero-length status query has no meaningful answer (every descriptor
            // must be nonzero); the spec leaves the behaviour open.
            if req.len == 0 {
                return Verdict::Refuse(EINVAL, "zero-length block status");
            }
            Verdict::Run(Op::BlockStatus {
                offset: req.offset,
                len: req.len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
                context,
            })
        }
        // Zero-length reads, writes, trims, zeroes and caches: "the behavior of a
        // server on such a request is unspecified although the server SHOULD NOT
        // disconnect". They succeed and do nothing.
        _ if req.len == 0 => Verdict::Done,
        CMD_READ => Verdict::Run(Op::Read {
            offset: req.offset,
            len: req.len,
            df: req.flags & CMD_FLAG_DF != 0,
            sparse: false,
        }),
        CMD_WRITE => Verdict::Run(Op::Write {
            offset: req.offset,
            data: Bytes::new(),
            fua,
        }),
        CMD_TRIM => Verdict::Run(Op::Trim {
            offset: req.offset,
            len,
            fua,
        }),
        CMD_CACHE => Verdict::Run(Op::Cache {
            offset: req.offset,
            len,
        }),
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && no_hole {
                // NBD_CMD_FLAG_FAST_ZERO: "the server MUST fail quickly with an error
                // of NBD_ENOTSUP" unless faster than a write. Zeroes that must stay
                // allocated are sealed like data, so they are not faster.
                return Verdict::Refuse(ENOTSUP, "allocated zeroes are not faster than a write");
            }
            Verdict::Run(Op::WriteZeroes {
                offset: req.offset,
                len,
                fua,
                no_hole,
            })
        }
        _ => unreachable!("every known command was matched above"),
    }
}

/// The command's name, for log lines.
pub(super) fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;
    const MAX: u32 = 64 << 10;
    const PAST_END: &str = "request reaches past the end of the export";

    /// A writable export with structured replies, as the handshake advertises it.
    fn writable() -> Rules {
        Rules {
            size: SIZE,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_DF,
            alignment: 1,
            base_allocation: Some(1),
            max_payload: MAX,
        }
    }

    fn read_only() -> Rules {
        Rules {
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN
                | FLAG_READ_ONLY,
            ..writable()
        }
    }

    fn check(rules: &Rules, kind: u16, flags: u16, offset: u64, len: u32) -> Verdict {
        let req = Request {
            flags,
            kind,
            handle: 7,
            offset,
            len,
        };
        validate(&req, rules)
    }

    fn refused(verdict: Verdict) -> u32 {
        match verdict {
            Verdict::Refuse(error, _) => error,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn well_formed_requests_run() {
        let r = writable();
        assert_eq!(
            check(&r, CMD_READ, CMD_FLAG_DF, 4096, 512),
            Verdict::Run(Op::Read {
                offset: 4096,
                len: 512,
                df: true,
                sparse: false
            })
        );
        assert_eq!(
            check(&r, CMD_WRITE, CMD_FLAG_FUA, 0, MAX),
            Verdict::Run(Op::Write {
                offset: 0,
                data: Bytes::new(),
                fua: true
            })
        );
        assert_eq!(check(&r, CMD_FLUSH, 0, 0, 0), Verdict::Run(Op::Flush));
        assert_eq!(
            check(&r, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 8192),
            Verdict::Run(Op::WriteZeroes {
                offset: 0,
                len: 8192,
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(
            check(&r, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096),
            Verdict::Run(Op::BlockStatus {
                offset: 0,
                len: 4096,
                req_one: true,
                context: 1
            })
        );
        // A request that ends exactly at the end of the export.
        assert!(matches!(
            check(&r, CMD_READ, 0, SIZE - 512, 512),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn disconnect_and_zero_lengths() {
        let r = writable();
        assert_eq!(check(&r, CMD_DISC, 0, 0, 0), Verdict::Disconnect);
        // Flags or not, the client is leaving.
        assert_eq!(check(&r, CMD_DISC, 0xffff, 5, 5), Verdict::Disconnect);
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES] {
            assert_eq!(check(&r, kind, 0, 4096, 0), Verdict::Done, "{kind}");
        }
        assert_eq!(refused(check(&r, CMD_BLOCK_STATUS, 0, 0, 0)), EINVAL);
    }

    #[test]
    fn unknown_command_is_einval() {
        let r = writable();
        assert_eq!(refused(check(&r, 42, 0, 0, 512)), EINVAL);
        // NBD_CMD_RESIZE is not offered.
        assert_eq!(refused(check(&r, 8, 0, 0, 512)), EINVAL);
    }

    #[test]
    fn flags_not_valid_for_the_command_are_einval() {
        let r = writable();
        // DF only on reads, REQ_ONE only on block status, NO_HOLE and
        // FAST_ZERO only on write zeroes; unknown bits never.
        assert_eq!(refused(check(&r, CMD_WRITE, CMD_FLAG_DF, 0, 512)), EINVAL);
        assert_eq!(
            refused(check(&r, CMD_READ, CMD_FLAG_REQ_ONE, 0, 512)),
            EINVAL
        );
        assert_eq!(
            refused(check(&r, CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 512)),
            EINVAL
        );
        assert_eq!(refused(check(&r, CMD_READ, 1 << 9, 0, 512)), EINVAL);
        // FUA and DF are valid only when advertised.
        let plain = Rules {
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            ..writable()
        };
        assert_eq!(
            refused(check(&plain, CMD_WRITE, CMD_FLAG_FUA, 0, 512)),
            EINVAL
        );
        assert_eq!(
            refused(check(&plain, CMD_READ, CMD_FLAG_DF, 0, 512)),
            EINVAL
        );
    }

    #[test]
    fn flush_offset_and_length_are_reserved() {
        let r = writable();
        assert_eq!(refused(check(&r, CMD_FLUSH, 0, 4096, 0)), EINVAL);
        assert_eq!(refused(check(&r, CMD_FLUSH, 0, 0, 4096)), EINVAL);
    }

    #[test]
    fn writes_to_a_read_only_export_are_eperm() {
        let r = read_only();
        assert_eq!(refused(check(&r, CMD_WRITE, 0, 0, 512)), EPERM);
        assert_eq!(refused(check(&r, CMD_TRIM, 0, 0, 512)), EPERM);
        assert_eq!(refused(check(&r, CMD_WRITE_ZEROES, 0, 0, 512)), EPERM);
        // Read-only comes first: also past the end, or with a flag the export
        // does not advertise.
        assert_eq!(refused(check(&r, CMD_WRITE, 0, SIZE, 512)), EPERM);
        assert_eq!(refused(check(&r, CMD_WRITE, CMD_FLAG_FUA, 0, 512)), EPERM);
        assert!(matches!(check(&r, CMD_READ, 0, 0, 512), Verdict::Run(_)));
        assert!(matches!(check(&r, CMD_FLUSH, 0, 0, 0), Verdict::Run(_)));
        // No FUA advertised on a read-only export.
        assert_eq!(refused(check(&r, CMD_READ, CMD_FLAG_FUA, 0, 512)), EINVAL);
    }

    #[test]
    fn past_the_end_is_enospc_for_writes_and_einval_otherwise() {
        let r = writable();
        for (kind, error) in [
            (CMD_WRITE, ENOSPC),
            (CMD_WRITE_ZEROES, ENOSPC),
            (CMD_READ, EINVAL),
            (CMD_TRIM, EINVAL),
            (CMD_CACHE, EINVAL),
            (CMD_BLOCK_STATUS, EINVAL),
        ] {
            assert_eq!(
                check(&r, kind, 0, SIZE - 512, 1024),
                Verdict::Refuse(error, PAST_END),
                "{kind}"
            );
            assert_eq!(
                check(&r, kind, 0, SIZE, 1),
                Verdict::Refuse(error, PAST_END),
                "{kind}"
            );
            // An offset whose end overflows 64 bits is past the end too.
            assert_eq!(
                check(&r, kind, 0, u64::MAX - 10, 512),
                Verdict::Refuse(error, PAST_END),
                "{kind}"
            );
        }
    }

    #[test]
    fn payloads_over_the_maximum_are_einval_but_effect_lengths_are_not() {
        let r = Rules {
            size: 4 * u64::from(MAX),
            ..writable()
        };
        assert_eq!(refused(check(&r, CMD_READ, 0, 0, MAX + 1)), EINVAL);
        assert_eq!(refused(check(&r, CMD_WRITE, 0, 0, MAX + 1)), EINVAL);
        assert!(matches!(check(&r, CMD_READ, 0, 0, MAX), Verdict::Run(_)));
        // Trim, zeroes, cache and block status carry no payload: "the client
        // MAY request an effect length larger than the maximum payload size".
        for kind in [CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS] {
            assert!(
                matches!(check(&r, kind, 0, 0, 2 * MAX), Verdict::Run(_)),
                "{kind}"
            );
        }
    }

    #[test]
    fn unaligned_requests_are_einval_once_block_sizes_were_agreed() {
        let r = Rules {
            alignment: 4096,
            size: SIZE - 512,
            ..writable()
        };
        assert_eq!(refused(check(&r, CMD_READ, 0, 512, 4096)), EINVAL);
        assert_eq!(refused(check(&r, CMD_WRITE, 0, 0, 512)), EINVAL);
        assert_eq!(refused(check(&r, CMD_TRIM, 0, 4096, 1000)), EINVAL);
        assert!(matches!(
            check(&r, CMD_READ, 0, 4096, 8192),
            Verdict::Run(_)
        ));
        // The last, partial block of the export may be reached with a length
        // that is not a multiple of the alignment.
        assert!(matches!(
            check(&r, CMD_READ, 0, SIZE - 4096, 3584),
            Verdict::Run(_)
        ));
        // Without agreed block sizes, requests are byte granular.
        let bytes = writable();
        assert!(matches!(check(&bytes, CMD_WRITE, 0, 3, 5), Verdict::Run(_)));
    }

    #[test]
    fn block_status_needs_a_metadata_context() {
        let r = Rules {
            base_allocation: None,
            ..writable()
        };
        assert_eq!(
            check(&r, CMD_BLOCK_STATUS, 0, 0, 4096),
            Verdict::Refuse(EINVAL, "no metadata context was selected")
        );
    }

    #[test]
    fn fast_zero_that_must_stay_allocated_is_enotsup() {
        let r = writable();
        assert_eq!(
            refused(check(
                &r,
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                4096
            )),
            ENOTSUP
        );
        assert!(matches!(
            check(&r, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096),
            Verdict::Run(_)
        ));
    }
}
