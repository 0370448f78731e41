//! Model-based test: random operations on a volume against a byte-vector model,
//! with injected I/O faults and simulated crashes from [`FaultySegments`].
//!
//! The crash check, per block: after a simulated crash and reopen, a block reads
//! as its content at the last completed flush, or as one of the versions written
//! to it after that flush began (the state after each later write touching it).
//! Every version of a block the model has seen since the last flush is a
//! candidate; a block never reads as anything else. After an injected fault the
//! volume is poisoned: every later write and flush fails with `Poisoned`.
//!
//! Compaction runs as an operation of its own (`compact_now`, with the
//! background thread off so faults land deterministically): with tiny segments
//! and a threshold of 0.9, most compactions move blocks and delete segments,
//! under the same faults and crashes.

mod common {
    pub mod volume;
}

use std::sync::Arc;

use blockseal_volume::{ErrorKind, FaultOp, FaultySegments, StoreOptions, Volume};
use common::volume::*;
use proptest::prelude::*;

const BS: usize = 512 * 8;
const SIZE: usize = 64 * BS;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: usize,
        len: usize,
        seed: u64,
    },
    /// Writes in one `write_batch`: aligned whole blocks mostly, so that
    /// they make groups, with an unaligned one now and then.
    Batch {
        writes: Vec<(usize, usize, u64)>,
    },
    Trim {
        offset: usize,
        len: usize,
    },
    Zero {
        offset: usize,
        len: usize,
    },
    Read {
        offset: usize,
        len: usize,
    },
    Flush,
    Reopen,
    Fault {
        op: u8,
        after: u64,
    },
    Crash,
    Compact,
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..SIZE, 1..3 * BS).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn batch_write() -> impl Strategy<Value = (usize, usize, u64)> {
    prop_oneof![
        4 => (0..SIZE / BS, 1..3usize, any::<u64>()).prop_map(|(block, blocks, seed)| {
            (block * BS, (blocks * BS).min(SIZE - block * BS), seed)
        }),
        1 => (range(), any::<u64>()).prop_map(|((offset, len), seed)| (offset, len, seed)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => prop::collection::vec(batch_write(), 1..6).prop_map(|writes| Op::Batch { writes }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Zero { offset, len }),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => (0..3u8, 0..4u64).prop_map(|(op, after)| Op::Fault { op, after }),
        1 => Just(Op::Crash),
        2 => Just(Op::Compact),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    segments: FaultySegments,
    store: Option<(blockseal_volume::Store, Volume)>,
    /// The bytes every acknowledged operation produced.
    model: Vec<u8>,
    /// Per block: the candidate contents since the last completed flush (the
    /// first is the flushed content).
    candidates: Vec<Vec<Vec<u8>>>,
    poisoned: bool,
    /// The store's extent index budget: ample, none, or so small that the
    /// index is given up part way.
    index_memory: usize,
}

impl Harness {
    fn options(&self) -> StoreOptions {
        StoreOptions::new()
            .segment_bytes(8 * BS as u64)
            .overlay_blocks(16)
            .compaction_threshold(0.9)
            .background_compaction(false)
            .segment_store(Arc::new(self.segments.clone()))
            .index_memory(self.index_memory)
            // A volume this small journals only this way; without an index
            // (budget 0) its commits rewrite their pages.
            .danger_journal_min_runs(1)
    }

    fn new(index_memory: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let segments = FaultySegments::new();
        let mut h = Harness {
            dir,
            segments,
            store: None,
            model: vec![0; SIZE],
            candidates: (0..SIZE / BS).map(|_| vec![vec![0; BS]]).collect(),
            poisoned: false,
            index_memory,
        };
        h.store = Some(store_with_volume(h.dir.path(), SIZE as u64, h.options()));
        h
    }

    fn volume(&self) -> &Volume {
        &self.store.as_ref().unwrap().1
    }

    /// Records the model's new content of the blocks touched by `offset..+len`
    /// as candidates (the write may or may not survive a crash).
    fn touched(&mut self, offset: usize, len: usize) {
        for b in offset / BS..(offset + len).div_ceil(BS) {
            let now = self.model[b * BS..(b + 1) * BS].to_vec();
            self.candidates[b].push(now);
        }
    }

    /// A failed write's blocks may read either way after a crash: its new
    /// content is a candidate too.
    fn failed_write_candidates(&mut self, offset: usize, data: &[u8]) {
        let mut m = self.model.clone();
        m[offset..offset + data.len()].copy_from_slice(data);
        for b in offset / BS..(offset + data.len()).div_ceil(BS) {
            self.candidates[b].push(m[b * BS..(b + 1) * BS].to_vec());
        }
    }

    fn flushed(&mut self) {
        for (b, c) in self.candidates.iter_mut().enumerate() {
            *c = vec![self.model[b * BS..(b + 1) * BS].to_vec()];
        }
    }

    fn write_result(
        &mut self,
        r: Result<(), blockseal_volume::VolumeError>,
        offset: usize,
        len: usize,
    ) {
        match r {
            Ok(()) => {
                assert!(!self.poisoned, "a poisoned volume accepted a write");
                // The write is in, but the flush a full overlay triggered may have
                // failed and poisoned the volume (the next write or flush says so).
                self.poisoned = self.volume().is_poisoned();
            }
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Poisoned | ErrorKind::Io),
                    "unexpected {e}"
                );
                if self.poisoned {
                    assert_eq!(e.kind(), ErrorKind::Poisoned);
                }
                // A failed write or sync poisons; a failed read-modify-write read
                // does not.
                self.poisoned = self.volume().is_poisoned();
                // The failed write may have reached storage in part: its blocks
                // may read either way after a crash (the caller added candidates).
                let _ = (offset, len);
            }
        }
    }

    fn reopen_after_crash(&mut self) {
        self.store = None;
        self.segments.revive();
        self.store = Some(reopen(self.dir.path(), self.options()));
        self.poisoned = false;
        let mut all = vec![0u8; SIZE];
        self.volume().read_at(0, &mut all).unwrap();
        for b in 0..SIZE / BS {
            let got = &all[b * BS..(b + 1) * BS];
            assert!(
                self.candidates[b].iter().any(|c| c == got),
                "block {b} reads as no version it had since the last flush"
            );
        }
        self.model = all;
        self.flushed();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, len);
                let r = self.volume().write_at(offset as u64, &data);
                if r.is_ok() && !self.poisoned {
                    self.model[offset..offset + len].copy_from_slice(&data);
                    self.touched(offset, len);
                } else if !self.poisoned {
                    self.failed_write_candidates(offset, &data);
                }
                self.write_result(r, offset, len);
            }
            Op::Batch { writes } => {
                let datas: Vec<Vec<u8>> = writes
                    .iter()
                    .map(|&(_, len, seed)| pattern(seed, len))
                    .collect();
                let batch: Vec<(u64, &[u8])> = writes
                    .iter()
                    .zip(&datas)
                    .map(|(&(offset, _, _), data)| (offset as u64, &data[..]))
                    .collect();
                let results = self.volume().write_batch(&batch);
                assert_eq!(results.len(), writes.len(), "one result per write");
                // The volume's state before the batch decides: writes grouped
                // together are installed together, before the commit a full
                // overlay starts may fail and poison the volume.
                let poisoned = self.poisoned;
                for ((&(offset, _, _), data), r) in writes.iter().zip(&datas).zip(results) {
                    match r {
                        Ok(()) => {
                            assert!(!poisoned, "a poisoned volume accepted a write");
                            self.model[offset..offset + data.len()].copy_from_slice(data);
                            self.touched(offset, data.len());
                        }
                        Err(e) => {
                            assert!(
                                matches!(e.kind(), ErrorKind::Poisoned | ErrorKind::Io),
                                "unexpected {e}"
                            );
                            if poisoned {
                                assert_eq!(e.kind(), ErrorKind::Poisoned);
                            } else {
                                self.failed_write_candidates(offset, data);
                            }
                        }
                    }
                }
                self.poisoned = self.volume().is_poisoned();
            }
            Op::Trim { offset, len } | Op::Zero { offset, len } => {
                let r = if matches!(op, Op::Trim { .. }) {
                    self.volume().trim(offset as u64, len as u64)
                } else {
                    self.volume().write_zeroes(offset as u64, len as u64)
                };
                if r.is_ok() {
                    self.model[offset..offset + len].fill(0);
                    self.touched(offset, len);
                } else if !self.poisoned {
                    let mut m = self.model.clone();
                    m[offset..offset + len].fill(0);
                    for b in offset / BS..(offset + len).div_ceil(BS) {
                        self.candidates[b].push(m[b * BS..(b + 1) * BS].to_vec());
                    }
                }
                self.write_result(r, offset, len);
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                match self.volume().read_at(offset as u64, &mut buf) {
                    Ok(()) => assert!(buf == self.model[offset..offset + len], "read mismatch"),
                    // Reads keep working after a poisoned write, but the injected
                    // read fault itself is an I/O error.
                    Err(e) => assert_eq!(e.kind(), ErrorKind::Io, "{e}"),
                }
            }
            Op::Flush => match self.volume().flush() {
                Ok(()) => {
                    assert!(!self.poisoned, "a poisoned volume flushed");
                    self.flushed();
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Poisoned | ErrorKind::Io),
                        "{e}"
                    );
                    assert!(self.volume().is_poisoned(), "a failed flush poisons");
                    self.poisoned = true;
                }
            },
            Op::Reopen => {
                if self.poisoned {
                    // The drop-time flush is skipped; unsynced data may be lost.
                    self.segments.crash();
                    self.reopen_after_crash();
                } else {
                    self.segments.clear_faults();
                    self.store = None;
                    self.flushed();
                    self.store = Some(reopen(self.dir.path(), self.options()));
                    let mut all = vec![0u8; SIZE];
                    self.volume().read_at(0, &mut all).unwrap();
                    assert!(all == self.model, "clean reopen keeps every byte");
                }
            }
            Op::Fault { op, after } => {
                let op = [FaultOp::Write, FaultOp::Sync, FaultOp::Read][op as usize];
                self.segments.fail_after(op, after);
            }
            Op::Crash => {
                self.segments.crash();
                self.reopen_after_crash();
            }
            Op::Compact => match self.volume().compact_now() {
                Ok(_) => {
                    // Compaction flushes first.
                    assert!(!self.poisoned, "a poisoned volume compacted");
                    self.flushed();
                    let mut all = vec![0u8; SIZE];
                    if self.volume().read_at(0, &mut all).is_ok() {
                        assert!(all == self.model, "compaction keeps every byte");
                    }
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Poisoned | ErrorKind::Io),
                        "{e}"
                    );
                    self.poisoned = self.volume().is_poisoned();
                }
            },
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn volume_matches_model_through_faults_and_crashes(
        ops in proptest::collection::vec(op(), 1..60),
        index_memory in prop_oneof![Just(64usize << 20), Just(0usize), Just(1500usize)],
    ) {
        let mut h = Harness::new(index_memory);
        for op in ops {
            h.apply(op);
        }
        h.segments.clear_faults();
    }
}
