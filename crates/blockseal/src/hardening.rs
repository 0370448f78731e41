//! Keeping key material out of core dumps.
//!
//! The process holds the master key, tenant KEKs and data keys in memory; a core
//! dump would write them to disk in the clear. So before anything else the
//! binary sets its core size limit to zero (hard and soft) and marks itself not
//! dumpable, which also keeps other processes of the same user from attaching a
//! debugger (`ptrace`) or reading its memory through `/proc`. The key bytes
//! themselves are also locked in memory and marked `MADV_DONTDUMP` where they
//! live (`blockseal-keys`), in case dumps are turned back on.

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Sets the process umask to 077: every file and directory blockseal or its
/// metadata backend creates later (sled writes snapshot files while it runs) is
/// owner-only, whatever the umask it was started with. Files meant for others
/// (the Unix socket) get their mode set explicitly.
pub(crate) fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Forbids core dumps of this process. An error names the step that failed.
pub(crate) fn forbid_core_dumps() -> Result<(), String> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| format!("cannot set RLIMIT_CORE to 0: {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot clear the dumpable flag (PR_SET_DUMPABLE): {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_off_afterwards() {
        forbid_core_dumps().unwrap();
        let limit = rustix::process::getrlimit(Resource::Core);
        assert_eq!(limit.current, Some(0));
        assert_eq!(limit.maximum, Some(0));
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            DumpableBehavior::NotDumpable
        );
    }
}
