//! Files the CLI writes for an operator (backup files, recovery bundles):
//! whole or not at all. The bytes go to a temporary file beside the target
//! (mode 0600), which is synced and renamed to the target's name only when
//! complete, without replacing anything there, then the directory is synced.
//! A file that is not committed is removed: nothing partial is ever left
//! under the final name. A large file is synced as it grows, every
//! [`SYNC_EVERY`] bytes, and the synced part dropped from the page cache: the
//! final sync has little left to do, and a backup does not push the store's
//! own data out of the cache.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::admin::api::ApiError;

/// Write buffer.
const BUFFER: usize = 1 << 20;
/// Bytes written between two syncs.
pub(crate) const SYNC_EVERY: u64 = 64 << 20;

/// A file being written under a temporary name.
pub(crate) struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    file: Option<BufWriter<File>>,
    /// Bytes written so far, and how many of them are synced.
    written: u64,
    synced: u64,
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
    /// Syncs what was written so far and drops it from the page cache.
    fn sync_written(&mut self) -> io::Result<()> {
        let (from, len) = (self.synced, self.written - self.synced);
        let writer = self.writer()?;
        writer.flush()?;
        let file = writer.get_ref();
        rustix::fs::fdatasync(file)?;
        // Advice only: its failure changes nothing.
        let _ = rustix::fs::fadvise(
            file,
            from,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
        self.synced += len;
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
}
