//! Where key bytes live: 32-byte slots in pages of their own, locked in memory and
//! left out of core dumps where the platform allows.
//!
//! Every secret type of the crate ([`MasterKey`](crate::MasterKey),
//! [`TenantKek`](crate::TenantKek), [`TenantSeed`](crate::TenantSeed),
//! [`DataKey`](crate::DataKey)) keeps its bytes in a [`KeyBytes`]: a slot taken
//! from a process-wide pool, filled in place, wiped when the key is dropped and
//! then handed to the next key. A key holds only a reference to its slot, so
//! moving a key (returning it, putting it in a `Vec` or an `Arc`) never copies
//! its bytes; a key held inline, as a `Zeroizing<[u8; 32]>` field, left an
//! unwiped copy behind at every move.
//!
//! The pool's pages are anonymous mappings used for nothing else, each locked
//! with `mlock` (never written to swap) and, on Linux, marked `MADV_DONTDUMP`
//! (left out of core dumps). Locking each key's own heap allocation instead
//! would be unsound: `mlock` works on whole pages and locks do not nest, so the
//! page would be shared with unrelated data, and unlocking it when one key is
//! dropped would unlock it under another key on the same page. Pool pages are
//! never unmapped nor unlocked; their slots are reused, so the locked memory is
//! bounded by the most keys alive at once, one 4 KiB page per 128 keys.
//!
//! Locking is best effort. When it fails (a locked-memory limit too low, a
//! platform without it) the failure is logged once as a warning and the page is
//! used unlocked: keys work the same.
//!
//! Nothing here ever logs or formats key bytes.

use std::fmt;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use memmap2::MmapMut;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::KEY_LEN;

/// Bytes mapped per pool page: one page on every platform we build for (a system
/// with larger pages maps a whole one, of which this much is used).
const PAGE_LEN: usize = 4096;

/// Keys per pool page.
const SLOTS_PER_PAGE: usize = PAGE_LEN / KEY_LEN;

/// One key's place in a pool page.
type Slot = &'static mut [u8; KEY_LEN];

/// The pool every key of the process takes its slot from.
static POOL: Pool = Pool::new(lock_page);

/// The 32 bytes of one key, in a slot of a locked page.
///
/// Wiped when dropped; `Debug` shows nothing of them.
pub(crate) struct KeyBytes {
    /// `None` only while being dropped.
    slot: Option<Slot>,
    pool: &'static Pool,
}

const HOLDS_SLOT: &str = "a KeyBytes holds its slot until it is dropped";

impl KeyBytes {
    /// A slot of zeros, to be filled in place.
    pub(crate) fn zeroed() -> KeyBytes {
        POOL.key_bytes()
    }

    /// A slot holding a copy of `bytes`.
    pub(crate) fn copy_of(bytes: &[u8; KEY_LEN]) -> KeyBytes {
        let mut key = KeyBytes::zeroed();
        key.expose_mut().copy_from_slice(bytes);
        key
    }

    /// The bytes.
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        self.slot.as_deref().expect(HOLDS_SLOT)
    }

    /// The bytes, to fill in place.
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; KEY_LEN] {
        self.slot.as_deref_mut().expect(HOLDS_SLOT)
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.zeroize();
            self.pool.give_back(slot);
        }
    }
}

/// Dropping wipes the slot before it goes back to the pool.
impl ZeroizeOnDrop for KeyBytes {}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes(<redacted>)")
    }
}

/// What a pool has done, for tests.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PoolStats {
    /// Pages added to the pool.
    pub(crate) pages: usize,
    /// Pages locked in memory.
    pub(crate) locked: usize,
    /// Pages that could not be locked (and are used unlocked).
    pub(crate) lock_failures: usize,
    /// Warnings logged about it: at most one.
    pub(crate) warnings: usize,
}

/// Slots for keys, carved from pages that only keys use.
pub(crate) struct Pool {
    state: Mutex<PoolState>,
    /// Locks a new page in memory (`mlock`); a test pool can make it fail.
    lock: fn(&MmapMut) -> io::Result<()>,
}

struct PoolState {
    free: Vec<Slot>,
    stats: PoolStats,
}

impl Pool {
    const fn new(lock: fn(&MmapMut) -> io::Result<()>) -> Pool {
        Pool {
            state: Mutex::new(PoolState {
                free: Vec::new(),
                stats: PoolStats {
                    pages: 0,
                    locked: 0,
                    lock_failures: 0,
                    warnings: 0,
                },
            }),
            lock,
        }
    }

    /// Takes a free slot (all zeros), adding a page when none is left.
    fn key_bytes(&'static self) -> KeyBytes {
        let slot = {
            let mut state = self.state();
            if state.free.is_empty() {
                self.add_page(&mut state);
            }
            state
                .free
                .pop()
                .expect("add_page leaves SLOTS_PER_PAGE free slots")
        };
        KeyBytes {
            slot: Some(slot),
            pool: self,
        }
    }

    /// Returns a wiped slot.
    fn give_back(&self, slot: Slot) {
        self.state().free.push(slot);
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn stats(&self) -> PoolStats {
        self.state().stats
    }

    /// The state; a panic while it was held cannot have left it inconsistent
    /// (every change is one push, pop or counter update), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps, locks and splits a new page. The page lives as long as the process:
    /// its slots are handed out as `'static` references and reused.
    fn add_page(&self, state: &mut PoolState) {
        let page: &'static mut [u8] = match MmapMut::map_anon(PAGE_LEN) {
            Ok(map) => {
                exclude_from_core_dumps(&map);
                match (self.lock)(&map) {
                    Ok(()) => state.stats.locked += 1,
                    Err(e) => self.lock_failed(state, "could not lock key memory (mlock)", &e),
                }
                &mut Box::leak(Box::new(map))[..]
            }
            // Only when the system is out of memory; an unlocked heap page still
            // lets keys work, and fails like any allocation if memory is gone.
            Err(e) => {
                self.lock_failed(state, "could not map a page for key memory", &e);
                Box::leak(vec![0u8; PAGE_LEN].into_boxed_slice())
            }
        };
        state.stats.pages += 1;
        // Reversed, so that slots are handed out from the start of the page.
        state.free.extend(
            page.chunks_exact_mut(KEY_LEN)
                .rev()
                .map(|chunk| Slot::try_from(chunk).expect("chunks are KEY_LEN bytes")),
        );
        debug_assert!(state.free.len() >= SLOTS_PER_PAGE);
    }

    /// Counts a page that is not locked, and warns the first time.
    fn lock_failed(&self, state: &mut PoolState, what: &str, error: &io::Error) {
        state.stats.lock_failures += 1;
        if state.stats.warnings == 0 {
            state.stats.warnings += 1;
            tracing::warn!(
                "{what}: {error}; keys are kept in memory that may be written to swap \
                 (raise the locked-memory limit, e.g. LimitMEMLOCK= in a systemd unit, to lock it)"
            );
        } else {
            tracing::debug!("{what}: {error}");
        }
    }
}

fn lock_page(map: &MmapMut) -> io::Result<()> {
    map.lock()
}

/// Marks a page `MADV_DONTDUMP`. Best effort: the binary also turns core dumps
/// off altogether, so a failure is only worth a debug line.
#[cfg(target_os = "linux")]
fn exclude_from_core_dumps(map: &MmapMut) {
    if let Err(e) = map.advise(memmap2::Advice::DontDump) {
        tracing::debug!("could not exclude key memory from core dumps (madvise): {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn exclude_from_core_dumps(_map: &MmapMut) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataKey, KeyId, KeyVersion, MasterKey, Passphrase, TenantId, TenantSeed};
    use zeroize::Zeroizing;

    fn pool(lock: fn(&MmapMut) -> io::Result<()>) -> &'static Pool {
        Box::leak(Box::new(Pool::new(lock)))
    }

    fn address(key: &[u8; KEY_LEN]) -> usize {
        key.as_ptr() as usize
    }

    #[test]
    fn a_dropped_key_is_wiped_before_its_slot_is_reused() {
        let pool = pool(lock_page);
        let mut key = pool.key_bytes();
        key.expose_mut().fill(0xa5);
        let at = address(key.expose());
        drop(key);
        let next = pool.key_bytes();
        assert_eq!(address(next.expose()), at, "the freed slot is reused");
        assert_eq!(next.expose(), &[0; KEY_LEN]);
    }

    #[test]
    fn a_page_holds_128_keys_and_slots_are_reused() {
        let pool = pool(lock_page);
        let keys: Vec<KeyBytes> = (0..SLOTS_PER_PAGE).map(|_| pool.key_bytes()).collect();
        assert_eq!(pool.stats().pages, 1);
        let one_more = pool.key_bytes();
        assert_eq!(pool.stats().pages, 2);
        drop(keys);
        drop(one_more);
        let again: Vec<KeyBytes> = (0..2 * SLOTS_PER_PAGE).map(|_| pool.key_bytes()).collect();
        assert_eq!(pool.stats().pages, 2, "no page added while slots are free");
        let mut addresses: Vec<usize> = again.iter().map(|k| address(k.expose())).collect();
        addresses.sort_unstable();
        addresses.dedup();
        assert_eq!(
            addresses.len(),
            2 * SLOTS_PER_PAGE,
            "every key has its own slot"
        );
    }

    /// Locking is attempted for every page; a failure (here, as with a
    /// locked-memory limit of zero) is counted, warned about once, and harmless.
    #[test]
    fn a_lock_failure_is_warned_about_once_and_keys_still_work() {
        let pool = pool(|_| Err(io::Error::from_raw_os_error(12)));
        let mut keys = Vec::new();
        for i in 0..3 * SLOTS_PER_PAGE {
            let mut key = pool.key_bytes();
            key.expose_mut().fill(i as u8);
            keys.push(key);
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(key.expose(), &[i as u8; KEY_LEN]);
        }
        assert_eq!(
            pool.stats(),
            PoolStats {
                pages: 3,
                locked: 0,
                lock_failures: 3,
                warnings: 1
            }
        );
    }

    #[test]
    fn locking_is_attempted_for_every_page() {
        let pool = pool(lock_page);
        let _keys: Vec<KeyBytes> = (0..SLOTS_PER_PAGE + 1).map(|_| pool.key_bytes()).collect();
        let stats = pool.stats();
        assert_eq!(stats.pages, 2);
        assert_eq!(stats.locked + stats.lock_failures, 2);
        assert!(stats.warnings <= 1);
    }

    /// The kernel's own view: the page holding a key is left out of core dumps
    /// and, when the lock succeeded, locked.
    #[cfg(target_os = "linux")]
    #[test]
    fn key_pages_are_locked_and_left_out_of_core_dumps() {
        let pool = pool(lock_page);
        let key = pool.key_bytes();
        let flags = vm_flags(address(key.expose()));
        assert!(flags.contains(&"dd".to_owned()), "VmFlags: {flags:?}");
        let stats = pool.stats();
        if stats.locked == 1 {
            assert!(flags.contains(&"lo".to_owned()), "VmFlags: {flags:?}");
        } else {
            assert_eq!(stats.lock_failures, 1);
            eprintln!("mlock is not allowed here; checked that keys work unlocked");
        }
        // A key of the crate's own types lands in such a page too.
        let dek = DataKey::generate(KeyVersion::FIRST).unwrap();
        assert!(vm_flags(address(dek.expose_secret())).contains(&"dd".to_owned()));
    }

    /// The `VmFlags` of the mapping that holds `address`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn vm_flags(address: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                });
            if let Some((start, end)) = range {
                inside = (start..end).contains(&address);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(str::to_owned).collect();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    /// Moving a key (returning it, into a `Vec`, a `Box`) leaves its bytes where
    /// they are, so no stale copy is left behind. Held inline, they moved.
    #[test]
    fn moving_a_key_never_moves_its_bytes() {
        fn make() -> DataKey {
            DataKey::generate(KeyVersion::FIRST).unwrap()
        }
        let dek = make();
        let at = address(dek.expose_secret());
        let boxed = Box::new(dek);
        assert_eq!(address(boxed.expose_secret()), at);
        let mut keys = vec![*boxed];
        keys.reserve(1000);
        assert_eq!(address(keys[0].expose_secret()), at);

        let master = MasterKey::from_bytes(KeyId::from_bytes([1; 16]), 0, Zeroizing::new([7; 32]));
        let at = address(master.expose_secret());
        let mut moved = Vec::new();
        moved.push(master);
        moved.reserve(1000);
        assert_eq!(address(moved[0].expose_secret()), at);

        let seed = TenantSeed::generate().unwrap();
        let at = address(seed.expose_secret());
        let moved = Box::new(seed);
        assert_eq!(address(moved.expose_secret()), at);

        let kek = moved_kek();
        assert_eq!(kek.0, address(kek.1.expose_secret()));
    }

    fn moved_kek() -> (usize, crate::TenantKek) {
        let master = MasterKey::from_bytes(KeyId::from_bytes([1; 16]), 0, Zeroizing::new([7; 32]));
        let kek = master.tenant_kek(
            &crate::DeploymentSalt::from_bytes([0; 32]),
            &TenantId::new("t").unwrap(),
            &TenantSeed::from_bytes(Zeroizing::new([0; 32])),
            KeyVersion::FIRST,
        );
        (address(kek.expose_secret()), kek)
    }

    /// Every secret type declares that it wipes itself when dropped.
    #[test]
    fn secret_types_zeroize_on_drop() {
        fn wipes_on_drop<T: ZeroizeOnDrop>() {}
        wipes_on_drop::<KeyBytes>();
        wipes_on_drop::<MasterKey>();
        wipes_on_drop::<DataKey>();
        wipes_on_drop::<crate::TenantKek>();
        wipes_on_drop::<TenantSeed>();
        wipes_on_drop::<Passphrase>();
        wipes_on_drop::<crate::BackupKey>();
        wipes_on_drop::<crate::TenantBundle>();
    }

    #[test]
    fn debug_shows_no_bytes() {
        let key = KeyBytes::copy_of(&[0xa5; KEY_LEN]);
        assert_eq!(format!("{key:?}"), "KeyBytes(<redacted>)");
    }
}
