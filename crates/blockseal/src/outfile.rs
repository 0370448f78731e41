//! Files the CLI writes for an operator (backup files, recovery bundles):
//! whole or not at all. The bytes go to a temporary file beside the target
//! (mode 0600), which is synced and renamed to the target's name only when
//! complete, without replacing anything there, then the directory is synced.
//! A file that is not committed is removed: nothing partial is ever left
//! under the final name. A large file is synced as it grows, every
//! [`SYNC_EVERY`] bytes, on a thread of its own so that writing goes on
//! meanwhile (at most [`SYNCS_AHEAD`] syncs are asked for ahead of the one
//! running, which bounds the dirty pages), and the synced part is dropped
//! from the page cache: the final sync has little left to do, and a backup
//! does not push the store's own data out of the cache.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;

use crate::admin::api::ApiError;

/// Write buffer.
const BUFFER: usize = 1 << 20;
/// Bytes written between two syncs.
pub(crate) const SYNC_EVERY: u64 = 64 << 20;
/// Syncs asked for and not yet started; a writer further ahead waits.
const SYNCS_AHEAD: usize = 1;

/// A file being written under a temporary name.
pub(crate) struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    file: Option<BufWriter<File>>,
    /// Bytes written so far, and up to where a sync was asked for.
    written: u64,
    synced: u64,
    /// The thread that syncs what was written, started with the first sync.
    syncer: Option<Syncer>,
}

/// A thread syncing a file up to the offsets it is sent, dropping each
/// synced range from the page cache.
struct Syncer {
    to: Option<SyncSender<u64>>,
    thread: Option<JoinHandle<()>>,
    /// The first sync that failed.
    failed: Arc<Mutex<Option<io::Error>>>,
}

impl Syncer {
    fn start(file: File) -> Syncer {
        let (to, from) = sync_channel(SYNCS_AHEAD);
        let failed = Arc::new(Mutex::new(None));
        let report = Arc::clone(&failed);
        let thread = std::thread::Builder::new()
            .name("file-sync".to_owned())
            .spawn(move || sync_loop(&file, &from, &report))
            .ok();
        Syncer {
            to: thread.is_some().then_some(to),
            thread,
            failed,
        }
    }

    /// Asks for everything before `offset` to be synced; waits while
    /// [`SYNCS_AHEAD`] syncs are pending. The error of an earlier sync, if
    /// one failed.
    fn sync_to(&mut self, offset: u64) -> io::Result<()> {
        self.take_error()?;
        if let Some(to) = &self.to {
            // A thread that stopped has left its error for `finish`.
            let _ = to.send(offset);
        }
        Ok(())
    }

    /// Waits for the syncs asked for; the first error among them.
    fn finish(&mut self) -> io::Result<()> {
        self.to = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.take_error()
    }

    fn take_error(&self) -> io::Result<()> {
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn sync_loop(file: &File, offsets: &Receiver<u64>, failed: &Mutex<Option<io::Error>>) {
    let mut synced = 0;
    while let Ok(offset) = offsets.recv() {
        if let Err(e) = rustix::fs::fdatasync(file) {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.into());
            return;
        }
        // Advice only: its failure changes nothing.
        let _ = rustix::fs::fadvise(
            file,
            synced,
            std::num::NonZeroU64::new(offset - synced),
            rustix::fs::Advice::DontNeed,
        );
        synced = offset;
    }
}

impl AtomicFile {
    /// Starts writing `path`, which must not exist (a conflict, exit code 4,
    /// if it does).
    pub(crate) fn create(path: &Path) -> anyhow::Result<AtomicFile> {
        if path.symlink_metadata().is_ok() {
            return Err(exists(path));
        }
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let dir = parent(path);
        let temp = dir.join(format!(
            ".{}.{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            temp,
            file: Some(BufWriter::with_capacity(BUFFER, file)),
            written: 0,
            synced: 0,
            syncer: None,
        })
    }

    /// The final name.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file, gives it its final name (refused if something took
    /// that name meanwhile) and syncs the directory.
    pub(crate) fn commit(mut self) -> anyhow::Result<()> {
        let writer = self.file.take().expect("an uncommitted file is open");
        if let Some(mut syncer) = self.syncer.take() {
            syncer
                .finish()
                .with_context(|| format!("cannot write {}", self.temp.display()))?;
        }
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all().map(|()| f))
            .with_context(|| format!("cannot write {}", self.temp.display()))?;
        drop(file);
        rename_no_replace(&self.temp, &self.path)?;
        // Renamed: nothing to remove any more.
        self.temp = PathBuf::new();
        File::open(parent(&self.path))
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync the directory of {}", self.path.display()))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.writer()?.write(data)?;
        self.written += n as u64;
        if self.written - self.synced >= SYNC_EVERY {
            self.sync_written()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer()?.flush()
    }
}

impl AtomicFile {
    /// Has what was written so far synced and dropped from the page cache,
    /// on the syncer's thread.
    fn sync_written(&mut self) -> io::Result<()> {
        let written = self.written;
        let writer = self.writer()?;
        writer.flush()?;
        if self.syncer.is_none() {
            let clone = self.writer()?.get_ref().try_clone()?;
            self.syncer = Some(Syncer::start(clone));
        }
        let syncer = self.syncer.as_mut().expect("started above");
        if syncer.thread.is_none() {
            // No thread could be started: sync here.
            let file = self.file.as_ref().expect("open").get_ref();
            rustix::fs::fdatasync(file)?;
        } else {
            syncer.sync_to(written)?;
        }
        self.synced = written;
        Ok(())
    }

    fn writer(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("the file is committed"))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            self.syncer = None;
            self.file = None;
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn exists(path: &Path) -> anyhow::Error {
    ApiError::new(
        hyper::StatusCode::CONFLICT,
        "file_exists",
        format!(
            "{} exists already; choose another name (nothing is ever overwritten)",
            path.display()
        ),
    )
    .into()
}

/// Renames `from` to `to` unless `to` exists, atomically (`RENAME_NOREPLACE`,
/// or a hard link where the file system lacks it).
fn rename_no_replace(from: &Path, to: &Path) -> anyhow::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(exists(to)),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match std::fs::hard_link(from, to) {
                Ok(()) => {
                    let _ = std::fs::remove_file(from);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists(to)),
                Err(e) => Err(anyhow::Error::new(e).context(format!(
                    "cannot rename {} to {}",
                    from.display(),
                    to.display()
                ))),
            }
        }
        Err(e) => Err(anyhow::Error::new(io::Error::from(e)).context(format!(
            "cannot rename {} to {}",
            from.display(),
            to.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_file_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"hello").unwrap();
        assert!(!path.exists(), "nothing under the final name before commit");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // An existing file is never replaced.
        let e = AtomicFile::create(&path).err().unwrap();
        assert_eq!(e.downcast_ref::<ApiError>().unwrap().exit_code(), 4);

        // Dropped before commit: nothing is left behind.
        let other = dir.path().join("other.bin");
        let mut f = AtomicFile::create(&other).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // Someone took the name meanwhile: the commit is refused, nothing lost.
        let mut f = AtomicFile::create(&other).unwrap();
        f.write_all(b"mine").unwrap();
        std::fs::write(&other, b"theirs").unwrap();
        assert!(f.commit().is_err());
        assert_eq!(std::fs::read(&other).unwrap(), b"theirs");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_file_larger_than_the_sync_interval_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let mut f = AtomicFile::create(&path).unwrap();
        // Pieces of a size that does not divide the interval, so that syncs
        // are asked for mid-buffer; each piece's bytes say where it is.
        let piece = 1_000_003usize;
        let pieces = (2 * SYNC_EVERY as usize) / piece + 2;
        for i in 0..pieces {
            f.write_all(&vec![(i % 251) as u8; piece]).unwrap();
        }
        assert!(f.syncer.is_some(), "the syncer thread took the syncs");
        f.commit().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), pieces * piece);
        for (i, chunk) in bytes.chunks(piece).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 251) as u8), "piece {i}");
        }
        // Dropped before commit after syncs began: nothing is left behind.
        let other = dir.path().join("other.bin");
        let mut f = AtomicFile::create(&other).unwrap();
        for _ in 0..pieces {
            f.write_all(&vec![1; piece]).unwrap();
        }
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
