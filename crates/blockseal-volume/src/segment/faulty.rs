//! An in-memory segment store for tests: it tracks which bytes are durable,
//! fails chosen operations and simulates crashes. Built for the crate's unit
//! tests and, with the `testing` feature, for other tests; never for a store.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{SegmentId, SegmentStore};

/// Which operation a [`FaultySegments`] fault targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// [`SegmentStore::write_at`].
    Write,
    /// [`SegmentStore::sync`].
    Sync,
    /// [`SegmentStore::read_at`].
    Read,
    /// [`SegmentStore::create`].
    Create,
    /// [`SegmentStore::delete`].
    Delete,
}

/// An in-memory segment store for tests that tracks which bytes are durable, fails
/// chosen operations, and can simulate a crash (everything not synced is lost).
///
/// Cloning shares the same segments, so a test keeps one handle while a store
/// owns another, and reopens a store on the same (crashed) state.
#[derive(Clone, Default)]
pub struct FaultySegments {
    inner: Arc<Mutex<FaultyState>>,
}

#[derive(Default)]
struct FaultyState {
    segments: BTreeMap<SegmentId, FaultySegment>,
    /// Per operation: how many more calls succeed before every call fails.
    fail_after: HashMap<FaultOp, u64>,
    /// After a simulated crash every operation fails until [`FaultySegments::revive`].
    crashed: bool,
    counts: HashMap<FaultOp, u64>,
}

#[derive(Default, Clone)]
struct FaultySegment {
    data: Vec<u8>,
    durable: Vec<u8>,
}

impl FaultySegments {
    /// An empty store with no faults armed.
    pub fn new() -> FaultySegments {
        FaultySegments::default()
    }

    fn state(&self) -> MutexGuard<'_, FaultyState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets `successes` more calls of `op` succeed, then fails every later one.
    pub fn fail_after(&self, op: FaultOp, successes: u64) {
        self.state().fail_after.insert(op, successes);
    }

    /// Disarms every fault (a crash stays until [`revive`](Self::revive)).
    pub fn clear_faults(&self) {
        self.state().fail_after.clear();
    }

    /// Simulates a power loss: every unsynced byte is lost, and every operation
    /// fails until [`revive`](Self::revive) (as the dead process could do nothing).
    pub fn crash(&self) {
        let mut state = self.state();
        for segment in state.segments.values_mut() {
            segment.data = segment.durable.clone();
        }
        state.crashed = true;
    }

    /// Ends a simulated crash and disarms every fault: the "machine" is back.
    pub fn revive(&self) {
        let mut state = self.state();
        state.crashed = false;
        state.fail_after.clear();
    }

    /// How many calls of `op` were made (failed ones included).
    pub fn count(&self, op: FaultOp) -> u64 {
        self.state().counts.get(&op).copied().unwrap_or(0)
    }

    /// Flips the bits of `mask` in the byte at `offset` of a segment, in both its
    /// visible and durable content (tampering with storage at rest).
    pub fn corrupt(&self, id: SegmentId, offset: u64, mask: u8) -> bool {
        let mut state = self.state();
        let Some(segment) = state.segments.get_mut(&id) else {
            return false;
        };
        let offset = offset as usize;
        let mut hit = false;
        for bytes in [&mut segment.data, &mut segment.durable] {
            if let Some(b) = bytes.get_mut(offset) {
                *b ^= mask;
                hit = true;
            }
        }
        hit
    }

    fn check(state: &mut FaultyState, op: FaultOp) -> io::Result<()> {
        *state.counts.entry(op).or_default() += 1;
        if state.crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        if let Some(left) = state.fail_after.get_mut(&op) {
            if *left == 0 {
                return Err(io::Error::other(format!("injected {op:?} fault")));
            }
            *left -= 1;
        }
        Ok(())
    }
}

impl SegmentStore for FaultySegments {
    fn create(&self, id: SegmentId) -> io::Result<()> {
        let mut state = self.state();
        Self::check(&mut state, FaultOp::Create)?;
        if state.segments.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "segment exists",
            ));
        }
        state.segments.insert(id, FaultySegment::default());
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        Self::check(&mut state, FaultOp::Write)?;
        let segment = state
            .segments
            .get_mut(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))?;
        let (start, end) = (offset as usize, offset as usize + data.len());
        if segment.data.len() < end {
            segment.data.resize(end, 0);
        }
        segment.data[start..end].copy_from_slice(data);
        Ok(())
    }

    /// In memory: never waits.
    fn read_cached(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read_at(id, offset, buf).map(|()| true)
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut state = self.state();
        Self::check(&mut state, FaultOp::Read)?;
        let segment = state
            .segments
            .get(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))?;
        let (start, end) = (offset as usize, offset as usize + buf.len());
        let bytes = segment
            .data
            .get(start..end)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past segment end"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        let mut state = self.state();
        Self::check(&mut state, FaultOp::Sync)?;
        let segment = state
            .segments
            .get_mut(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))?;
        segment.durable = segment.data.clone();
        Ok(())
    }

    fn delete(&self, id: SegmentId) -> io::Result<()> {
        let mut state = self.state();
        Self::check(&mut state, FaultOp::Delete)?;
        state.segments.remove(&id);
        Ok(())
    }

    fn list(&self, volume: u32) -> io::Result<Vec<u32>> {
        let state = self.state();
        Ok(state
            .segments
            .keys()
            .filter(|id| id.volume == volume)
            .map(|id| id.index)
            .collect())
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        let state = self.state();
        if state.crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        state
            .segments
            .get(&id)
            .map(|s| s.data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))
    }
}
