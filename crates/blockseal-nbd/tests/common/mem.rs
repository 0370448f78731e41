//! An in-memory export and catalog for tests and the example server.
//!
//! The export keeps its bytes in a `Vec<u8>` and an allocation bit per block, so
//! block status is meaningful: written blocks are data, trimmed and zeroed
//! (without `no_hole`) blocks are holes that read as zeroes. A block can be
//! marked to fail authentication, and writes can be held at a gate so tests can
//! keep requests in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use blockseal_nbd::{Catalog, ErrorClass, Export, ExportError, ExportInfo, Extent, Scope};

pub const BLOCK: u64 = 4096;

struct State {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

pub struct MemExport {
    state: RwLock<State>,
    read_only: bool,
    /// Block index that fails authentication on read, or `u64::MAX`.
    tampered: AtomicU64,
    pub flushes: AtomicU64,
    pub fua_writes: AtomicU64,
    /// Writes that got past the gate.
    pub writes: AtomicU64,
    /// Reads, failed or not.
    pub reads: AtomicU64,
    /// The most writes one call of `write_batch` carried.
    pub most_batched: AtomicUsize,
    /// Writes wait while the gate is closed; `waiting` counts them, and
    /// `most_waiting` is the most that ever waited at once.
    gate: Mutex<bool>,
    gate_cv: Condvar,
    pub waiting: AtomicUsize,
    pub most_waiting: AtomicUsize,
    /// What `write_may_block` answers.
    pub may_block: AtomicBool,
    /// Reads would wait on a device: `read_cached` declines them, and
    /// `read` waits at the gate while it is closed.
    pub reads_wait: AtomicBool,
    /// The export's revocation switch.
    pub revoke: blockseal_nbd::Shutdown,
}

impl MemExport {
    pub fn new(size: u64, read_only: bool) -> Arc<MemExport> {
        assert_eq!(size % BLOCK, 0);
        Arc::new(MemExport {
            state: RwLock::new(State {
                data: vec![0; size as usize],
                allocated: vec![false; (size / BLOCK) as usize],
            }),
            read_only,
            tampered: AtomicU64::new(u64::MAX),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            most_batched: AtomicUsize::new(0),
            gate: Mutex::new(true),
            gate_cv: Condvar::new(),
            waiting: AtomicUsize::new(0),
            most_waiting: AtomicUsize::new(0),
            may_block: AtomicBool::new(false),
            reads_wait: AtomicBool::new(false),
            revoke: blockseal_nbd::Shutdown::new(),
        })
    }

    /// Fills `[offset, offset + len)` with `byte` directly (setup for read-only exports).
    pub fn fill(&self, offset: u64, len: u64, byte: u8) {
        let mut s = self.state.write().unwrap();
        s.data[offset as usize..(offset + len) as usize].fill(byte);
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            s.allocated[b as usize] = true;
        }
    }

    /// Reads bytes directly, bypassing the server.
    pub fn peek(&self, offset: u64, len: u64) -> Vec<u8> {
        self.state.read().unwrap().data[offset as usize..(offset + len) as usize].to_vec()
    }

    /// Makes reads touching the block at `offset` fail authentication.
    pub fn tamper(&self, offset: u64) {
        self.tampered.store(offset / BLOCK, Ordering::SeqCst);
    }

    pub fn close_gate(&self) {
        *self.gate.lock().unwrap() = false;
    }

    pub fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.gate_cv.notify_all();
    }

    fn wait_gate(&self) {
        let mut open = self.gate.lock().unwrap();
        if !*open {
            let waiting = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_waiting.fetch_max(waiting, Ordering::SeqCst);
            while !*open {
                open = self.gate_cv.wait(open).unwrap();
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ExportError::new(ErrorClass::OutOfRange, "past the end")),
        }
    }

    /// Zeroes a range; whole blocks become holes unless `keep_allocated`.
    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut s = self.state.write().unwrap();
        s.data[offset as usize..(offset + len) as usize].fill(0);
        let first_whole = offset.div_ceil(BLOCK);
        let end_whole = (offset + len) / BLOCK;
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            let whole = b >= first_whole && b < end_whole;
            if keep_allocated {
                s.allocated[b as usize] = true;
            } else if whole {
                s.allocated[b as usize] = false;
            }
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.state.read().unwrap().data.len() as u64
    }

    fn block_size(&self) -> u32 {
        BLOCK as u32
    }

    fn revoked(&self) -> Option<blockseal_nbd::Shutdown> {
        Some(self.revoke.clone())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn write_may_block(&self) -> bool {
        self.may_block.load(Ordering::SeqCst)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        if self.reads_wait.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.read(offset, buf).map(|()| true)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if self.reads_wait.load(Ordering::SeqCst) {
            self.wait_gate();
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.check(offset, buf.len() as u64)?;
        let t = self.tampered.load(Ordering::Relaxed);
        if t != u64::MAX && offset / BLOCK <= t && t < (offset + buf.len() as u64).div_ceil(BLOCK) {
            return Err(ExportError::new(
                ErrorClass::Authentication,
                format!("block {t} failed authentication"),
            ));
        }
        let s = self.state.read().unwrap();
        buf.copy_from_slice(&s.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        self.wait_gate();
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        let mut s = self.state.write().unwrap();
        s.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK) {
            s.allocated[b as usize] = true;
        }
        Ok(())
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        self.most_batched.fetch_max(writes.len(), Ordering::SeqCst);
        writes
            .iter()
            .map(|&(offset, data)| self.write(offset, data, false))
            .collect()
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        self.check(offset, len)?;
        self.zero_range(offset, len, false);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.check(offset, len)?;
        self.zero_range(offset, len, no_hole);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.check(offset, len)?;
        let s = self.state.read().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let block_end = ((b + 1) * BLOCK).min(end);
            let hole = !s.allocated[b as usize];
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += block_end - pos,
                _ => out.push(Extent {
                    length: block_end - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = block_end;
        }
        Ok(out)
    }
}

/// A read-only export of any size that was never written: it reads as zeroes
/// and block status reports one hole, with no memory behind it.
pub struct EmptyExport {
    pub size: u64,
    /// Block status calls so far.
    pub status_calls: AtomicU64,
}

impl EmptyExport {
    pub fn new(size: u64) -> Arc<EmptyExport> {
        assert_eq!(size % BLOCK, 0);
        Arc::new(EmptyExport {
            size,
            status_calls: AtomicU64::new(0),
        })
    }
}

impl Export for EmptyExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        BLOCK as u32
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        buf.fill(0);
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(ErrorClass::ReadOnly.into())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), ExportError> {
        Err(ErrorClass::ReadOnly.into())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> {
        Err(ErrorClass::ReadOnly.into())
    }

    fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.status_calls.fetch_add(1, Ordering::Relaxed);
        Ok(vec![Extent {
            length: len,
            hole: true,
            zero: true,
        }])
    }
}

/// Holds catalog opens while closed, as a slow store would: opening a volume
/// scans its metadata.
#[derive(Default)]
pub struct OpenGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Opens waiting at the gate now.
    waiting: usize,
}

impl OpenGate {
    pub fn closed() -> Arc<OpenGate> {
        let gate = OpenGate::default();
        gate.state.lock().unwrap().closed = true;
        Arc::new(gate)
    }

    pub fn open(&self) {
        self.state.lock().unwrap().closed = false;
        self.changed.notify_all();
    }

    /// Waits until `n` opens wait at the gate; false if they did not within
    /// 10 s.
    pub fn wait_for_waiting(&self, n: usize) -> bool {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(10), |s| s.waiting < n)
            .unwrap();
        state.waiting >= n
    }

    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.waiting += 1;
        self.changed.notify_all();
        while state.closed {
            state = self.changed.wait(state).unwrap();
        }
        state.waiting -= 1;
    }
}

/// Exports by name, with descriptions; scope filtering as a real catalog does it.
#[derive(Default)]
pub struct MemCatalog {
    pub exports: BTreeMap<String, (Arc<MemExport>, String)>,
    /// Exports of other kinds, by name.
    pub others: BTreeMap<String, Arc<dyn Export>>,
    /// Opens of these exports wait at their gate first.
    pub open_gates: BTreeMap<String, Arc<OpenGate>>,
}

impl MemCatalog {
    /// Two tenants: `acme/disk` (64 MiB), `acme/ro` (16 MiB, read-only, filled with
    /// 0x5a), `acme/tampered` (8 MiB, the block at 1 MiB fails authentication),
    /// `globex/disk` (64 MiB).
    pub fn standard() -> MemCatalog {
        let mut c = MemCatalog::default();
        c.add(
            "acme/disk",
            MemExport::new(64 << 20, false),
            "acme main disk",
        );
        let ro = MemExport::new(16 << 20, true);
        ro.fill(0, 16 << 20, 0x5a);
        c.add("acme/ro", ro, "acme archive (read-only)");
        let tampered = MemExport::new(8 << 20, false);
        tampered.fill(0, 8 << 20, 0x11);
        tampered.tamper(1 << 20);
        c.add("acme/tampered", tampered, "acme disk with a bad block");
        c.add(
            "globex/disk",
            MemExport::new(64 << 20, false),
            "globex main disk",
        );
        c
    }

    pub fn add(&mut self, name: &str, export: Arc<MemExport>, description: &str) {
        self.exports
            .insert(name.to_owned(), (export, description.to_owned()));
    }

    /// Adds an export of another kind (with an empty description).
    pub fn add_other(&mut self, name: &str, export: Arc<dyn Export>) {
        self.others.insert(name.to_owned(), export);
    }

    pub fn get(&self, name: &str) -> Arc<MemExport> {
        self.exports[name].0.clone()
    }
}

impl Catalog for MemCatalog {
    fn list(&self, scope: &Scope) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .filter(|(name, _)| scope.permits(name))
            .map(|(name, (_, description))| ExportInfo {
                name: name.clone(),
                description: description.clone(),
            })
            .chain(
                self.others
                    .keys()
                    .filter(|name| scope.permits(name))
                    .map(|name| ExportInfo {
                        name: name.clone(),
                        description: String::new(),
                    }),
            )
            .collect()
    }

    fn open(&self, name: &str, scope: &Scope) -> Option<Arc<dyn Export>> {
        if !scope.permits(name) {
            return None;
        }
        if let Some(gate) = self.open_gates.get(name) {
            gate.pass();
        }
        self.exports
            .get(name)
            .map(|(e, _)| e.clone() as Arc<dyn Export>)
            .or_else(|| self.others.get(name).cloned())
    }
}
