//! A metadata store whose next commit, once armed, waits until released.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use blockseal_volume::meta::{BackendKind, Batch, MetaError, MetaStore};

/// A metadata store whose next commit, once armed, waits until released.
pub struct GatedMeta {
    pub inner: Box<dyn MetaStore>,
    pub armed: AtomicBool,
    /// (a commit is waiting, it may go on)
    pub gate: Mutex<(bool, bool)>,
    pub signal: Condvar,
}

impl GatedMeta {
    pub fn arm(&self) {
        *self.gate.lock().unwrap() = (false, false);
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn wait_entered(&self) {
        let mut gate = self.gate.lock().unwrap();
        while !gate.0 {
            gate = self.signal.wait(gate).unwrap();
        }
    }

    pub fn release(&self) {
        self.gate.lock().unwrap().1 = true;
        self.signal.notify_all();
    }
}

impl MetaStore for GatedMeta {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.inner.get(key)
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), MetaError> {
        self.inner.scan(start, end, visit)
    }

    fn commit(&self, batch: &Batch) -> Result<(), MetaError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut gate = self.gate.lock().unwrap();
            gate.0 = true;
            self.signal.notify_all();
            while !gate.1 {
                gate = self.signal.wait(gate).unwrap();
            }
        }
        self.inner.commit(batch)
    }

    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }
}

impl GatedMeta {
    /// Wraps `inner`, disarmed.
    pub fn new(inner: Box<dyn MetaStore>) -> GatedMeta {
        GatedMeta {
            inner,
            armed: AtomicBool::new(false),
            gate: Mutex::new((false, false)),
            signal: Condvar::new(),
        }
    }
}
