//! Store files are 0600 and directories 0700 whatever the process umask (one
//! test per binary: it sets the umask of the whole process).

mod common {
    pub mod volume;
}

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use blockseal_volume::StoreOptions;
use blockseal_volume::meta::BackendKind;
use common::volume::*;
use rustix::fs::Mode;

fn open_to_others(path: &Path, out: &mut Vec<String>) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        out.push(format!("{} is {mode:o}", path.display()));
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            open_to_others(&entry.unwrap().path(), out);
        }
    }
}

#[test]
fn store_files_are_private_under_umask_000() {
    let old = rustix::process::umask(Mode::empty());
    for backend in [BackendKind::Redb, BackendKind::Sled] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        {
            let options = StoreOptions::new().backend(backend);
            let (_store, volume) = store_with_volume(&dir, 1 << 20, options);
            volume.write_at(0, &pattern(1, 4096)).unwrap();
            volume.flush().unwrap();
        }
        // And once more after a reopen, which creates files of its own.
        {
            let (_store, volume) = reopen(&dir, StoreOptions::new());
            volume.write_at(4096, &pattern(2, 4096)).unwrap();
            volume.flush().unwrap();
        }
        let mut loose = Vec::new();
        open_to_others(&dir, &mut loose);
        assert!(loose.is_empty(), "{backend:?}: {loose:#?}");
    }
    rustix::process::umask(old);
}
