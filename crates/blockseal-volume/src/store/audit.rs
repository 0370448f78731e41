//! The store's audit log: tamper-evident records of admin actions, kept in the
//! metadata store.
//!
//! Record `seq` (from 1) lives under `A` + seq and carries
//! `MAC_seq = HMAC-SHA256(audit key, 0x01 || MAC_(seq-1) || seq || time || fields)`
//! (`MAC_0` is 32 zero bytes); the head record `a` holds the next sequence
//! number and the last MAC under a MAC of its own, so removing the log's tail
//! shows too. The audit key is random, made with the first append, and stored
//! only wrapped under a key derived from the master key (`k`): whoever edits the
//! metadata without the master key can neither forge a record nor re-chain the
//! log. What it cannot show: the whole log (records, head and key) rolled back
//! together to an older copy, or removed together.
//!
//! The caller supplies every field; entries must never hold key material or
//! plaintext, and this module never logs them.

use blockseal_keys::AuditKey;

use super::{Store, now};
use crate::error::AdminError;
use crate::meta::{Batch, prefix_end};
use crate::record::{
    self, AUDIT_MAC_LEN, AuditEntryRecord, AuditHeadRecord, AuditKeyRecord, audit_head_message,
};

/// The most bytes the fields of one audit entry may hold together.
pub const MAX_AUDIT_ENTRY_BYTES: usize = 64 << 10;

/// What a caller records about an admin action; the store adds the sequence
/// number and the time. Never put key material or plaintext in it: the log is
/// authenticated, not encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEntry {
    /// Who acted (a client certificate's name, a Unix user).
    pub actor: String,
    /// What was done (`volume.delete`, `tenant.shred`, ...).
    pub action: String,
    /// What it was done to (`acme/voicemail`).
    pub target: String,
    /// How it ended (`ok`, an error code).
    pub result: String,
    /// Anything else worth keeping (sizes, key ids).
    pub detail: String,
}

/// One record of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// When it was appended, seconds since the Unix epoch.
    pub time: u64,
    /// See [`AuditEntry::actor`].
    pub actor: String,
    /// See [`AuditEntry::action`].
    pub action: String,
    /// See [`AuditEntry::target`].
    pub target: String,
    /// See [`AuditEntry::result`].
    pub result: String,
    /// See [`AuditEntry::detail`].
    pub detail: String,
}

/// What [`Store::audit_verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditVerification {
    /// Records verified, from the first, before the first problem.
    pub entries: u64,
    /// The sequence number of the first record that is missing or fails
    /// authentication (edited, moved), if any.
    pub first_bad: Option<u64>,
    /// What is wrong, if anything.
    pub problem: Option<String>,
}

impl AuditVerification {
    /// Whether the whole log verified.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl Store {
    /// Appends an entry to the audit log; durable when it returns. Returns its
    /// sequence number. Appends are serialized.
    ///
    /// Refused with [`AdminError::Corrupt`] when the log's head is missing or
    /// fails authentication: a tampered log is never extended (see
    /// [`Store::audit_verify`]).
    pub fn audit_append(&self, entry: &AuditEntry) -> Result<u64, AdminError> {
        let fields = [
            entry.actor.clone(),
            entry.action.clone(),
            entry.target.clone(),
            entry.result.clone(),
            entry.detail.clone(),
        ];
        let bytes: usize = fields.iter().map(String::len).sum();
        if bytes > MAX_AUDIT_ENTRY_BYTES {
            return Err(AdminError::AuditEntryTooLarge {
                bytes,
                max: MAX_AUDIT_ENTRY_BYTES,
            });
        }
        let mut audit = self.lock_audit();
        let mut batch = Batch::new();
        let created;
        let key = match audit.take() {
            Some(key) => {
                created = false;
                key
            }
            None => match self.load_audit_key()? {
                Some(key) => {
                    created = false;
                    key
                }
                None => {
                    created = true;
                    let key = AuditKey::generate()?;
                    let wrapped = self.read_master().audit_kek(&self.salt).wrap(&key)?;
                    let record = AuditKeyRecord {
                        created: now(),
                        wrapped: wrapped.to_vec(),
                    };
                    batch.put(record::AUDIT_KEY_KEY, record.encode());
                    key
                }
            },
        };
        let result = (|| {
            let (seq, previous) = match self.meta.get(record::AUDIT_HEAD_KEY)? {
                Some(bytes) => {
                    let head = AuditHeadRecord::decode(&bytes)
                        .map_err(|e| AdminError::Corrupt { what: e.0 })?;
                    let message = audit_head_message(head.next_seq, &head.last_mac);
                    if !key.verify(&[&message], &head.mac) {
                        return Err(AdminError::Corrupt {
                            what: "the audit log's head fails authentication".into(),
                        });
                    }
                    (head.next_seq, head.last_mac)
                }
                None if created || self.audit_empty()? => (1, [0u8; AUDIT_MAC_LEN]),
                None => {
                    return Err(AdminError::Corrupt {
                        what: "the audit log's head is missing".into(),
                    });
                }
            };
            let mut record = AuditEntryRecord {
                time: now(),
                mac: [0; AUDIT_MAC_LEN],
                fields,
            };
            record.mac = key.mac(&[&record.message(seq, &previous)]);
            let next = seq.checked_add(1).ok_or_else(|| AdminError::Corrupt {
                what: "audit sequence numbers are spent".into(),
            })?;
            let head = AuditHeadRecord {
                next_seq: next,
                last_mac: record.mac,
                mac: key.mac(&[&audit_head_message(next, &record.mac)]),
            };
            batch.put(record::audit_key(seq).to_vec(), record.encode());
            batch.put(record::AUDIT_HEAD_KEY, head.encode());
            self.meta.commit(&batch)?;
            Ok(seq)
        })();
        // Kept only once its record is durable (or was there already).
        if result.is_ok() || !created {
            *audit = Some(key);
        }
        result
    }

    /// The audit records with a sequence number of at least `since_seq` and,
    /// when given, a time of at least `since_time`, in order. Nothing is
    /// verified here: see [`Store::audit_verify`].
    pub fn audit_entries(
        &self,
        since_seq: u64,
        since_time: Option<u64>,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        self.audit_page(since_seq, since_time, usize::MAX)
    }

    /// At most `limit` entries of [`Store::audit_entries`], the oldest first:
    /// to read on, ask again from the last one's `seq + 1`.
    pub fn audit_page(
        &self,
        since_seq: u64,
        since_time: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        let start = record::audit_key(since_seq);
        let end = prefix_end(record::AUDIT_PREFIX);
        let mut out = Vec::new();
        let mut bad = None;
        self.meta.scan(&start, end.as_deref(), &mut |key, value| {
            match record::audit_key_seq(key)
                .and_then(|seq| Ok((seq, AuditEntryRecord::decode(value)?)))
            {
                Ok((seq, r)) => {
                    if since_time.is_none_or(|t| r.time >= t) {
                        let [actor, action, target, result, detail] = r.fields;
                        out.push(AuditRecord {
                            seq,
                            time: r.time,
                            actor,
                            action,
                            target,
                            result,
                            detail,
                        });
                    }
                }
                Err(e) => bad = Some(e),
            }
            bad.is_none() && out.len() < limit
        })?;
        match bad {
            Some(e) => Err(AdminError::Corrupt { what: e.0 }),
            None => Ok(out),
        }
    }

    /// Walks the audit log's chain and checks its head: finds an edited,
    /// removed or moved record, and a removed tail. Problems are reported in
    /// the result (the first one found), not as errors; an error means the log
    /// could not be read, or its key could not be unwrapped.
    pub fn audit_verify(&self) -> Result<AuditVerification, AdminError> {
        let mut audit = self.lock_audit();
        if audit.is_none() {
            *audit = self.load_audit_key()?;
        }
        let mut result = AuditVerification {
            entries: 0,
            first_bad: None,
            problem: None,
        };
        let Some(key) = audit.as_ref() else {
            // No key: no entry was ever appended, unless it was removed.
            if !self.audit_empty()? || self.meta.get(record::AUDIT_HEAD_KEY)?.is_some() {
                result.first_bad = Some(1);
                result.problem = Some("the audit key record is missing".into());
            }
            return Ok(result);
        };
        let mut expected = 1u64;
        let mut previous = [0u8; AUDIT_MAC_LEN];
        let fail = |result: &mut AuditVerification, seq: u64, problem: String| {
            result.first_bad = Some(seq);
            result.problem = Some(problem);
        };
        let mut problem: Option<(u64, String)> = None;
        let end = prefix_end(record::AUDIT_PREFIX);
        self.meta
            .scan(record::AUDIT_PREFIX, end.as_deref(), &mut |k, value| {
                let seq = match record::audit_key_seq(k) {
                    Ok(seq) => seq,
                    Err(_) => {
                        problem = Some((
                            expected,
                            format!("an audit key is malformed ({} bytes)", k.len()),
                        ));
                        return false;
                    }
                };
                if seq != expected {
                    problem = Some((expected, format!("audit record {expected} is missing")));
                    return false;
                }
                let record = match AuditEntryRecord::decode(value) {
                    Ok(record) => record,
                    Err(_) => {
                        problem = Some((seq, format!("audit record {seq} does not decode")));
                        return false;
                    }
                };
                if !key.verify(&[&record.message(seq, &previous)], &record.mac) {
                    problem = Some((
                        seq,
                        format!(
                            "audit record {seq} fails authentication: it was edited or \
                             moved, or a record before it was"
                        ),
                    ));
                    return false;
                }
                previous = record.mac;
                expected += 1;
                result.entries += 1;
                true
            })?;
        if let Some((seq, text)) = problem {
            fail(&mut result, seq, text);
            return Ok(result);
        }
        let head = match self.meta.get(record::AUDIT_HEAD_KEY)? {
            Some(bytes) => match AuditHeadRecord::decode(&bytes) {
                Ok(head) => head,
                Err(_) => {
                    fail(
                        &mut result,
                        expected,
                        "the audit log's head does not decode".into(),
                    );
                    return Ok(result);
                }
            },
            None => {
                fail(
                    &mut result,
                    expected,
                    "the audit log's head is missing".into(),
                );
                return Ok(result);
            }
        };
        if !key.verify(
            &[&audit_head_message(head.next_seq, &head.last_mac)],
            &head.mac,
        ) {
            fail(
                &mut result,
                expected,
                "the audit log's head fails authentication".into(),
            );
        } else if head.next_seq > expected {
            let last = head.next_seq - 1;
            fail(
                &mut result,
                expected,
                format!(
                    "audit records {expected} to {last} are missing: the log's tail was removed"
                ),
            );
        } else if head.next_seq < expected || head.last_mac != previous {
            // A valid head that names an older record: records were appended
            // past it without the key, or the head was rolled back.
            fail(
                &mut result,
                head.next_seq,
                format!(
                    "the audit log's head ends at record {}, but the records go on to {}",
                    head.next_seq.saturating_sub(1),
                    expected - 1
                ),
            );
        }
        Ok(result)
    }

    pub(super) fn lock_audit(&self) -> std::sync::MutexGuard<'_, Option<AuditKey>> {
        self.audit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The audit key from its record, if the store has one.
    fn load_audit_key(&self) -> Result<Option<AuditKey>, AdminError> {
        let Some(bytes) = self.meta.get(record::AUDIT_KEY_KEY)? else {
            return Ok(None);
        };
        let record =
            AuditKeyRecord::decode(&bytes).map_err(|e| AdminError::Corrupt { what: e.0 })?;
        self.read_master()
            .audit_kek(&self.salt)
            .unwrap(&record.wrapped)
            .map(Some)
            .map_err(|_| AdminError::AuditKeyUnwrap)
    }

    /// Whether no audit record exists.
    fn audit_empty(&self) -> Result<bool, AdminError> {
        let mut empty = true;
        self.meta.scan_prefix(record::AUDIT_PREFIX, &mut |_, _| {
            empty = false;
            false
        })?;
        Ok(empty)
    }
}
