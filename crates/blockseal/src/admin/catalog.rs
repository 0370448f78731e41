//! The store's catalogue through the admin API (`store.backup`): the
//! operation on the store, and the directory its segment files are linked
//! into.
//!
//! A catalogue holds every key of the store, sealed under the master key;
//! nothing here opens it (the CLI does not hold the master key when a server
//! runs): the CLI checks its framing as it arrives
//! ([`blockseal_volume::CatalogFraming`]), and the key-dependent checks run
//! when the catalogue is rebuilt.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blockseal_volume::{CATALOG_HEADER_LEN, CatalogError, CatalogHeader, Store};
use hyper::StatusCode;

use super::api::{ApiError, CatalogView, Op, Reply};
use super::backup::OpIo;
use super::service::{Service, bad_request};
use crate::time::rfc3339_utc;

/// Runs `op` if it is the store backup; `None` otherwise. Blocking: store
/// and file I/O.
pub(crate) fn run(
    service: &Service,
    op: &Op,
    io: &mut OpIo<'_>,
) -> Option<Result<Reply, ApiError>> {
    let Op::BackupStore { segments_to } = op else {
        return None;
    };
    Some(backup(service.store(), segments_to.as_deref(), io))
}

/// Writes the store's catalogue to `io.out`, linking its segment files into
/// `segments_to` if given.
fn backup(store: &Store, segments_to: Option<&str>, io: &mut OpIo<'_>) -> Result<Reply, ApiError> {
    let Some(out) = io.out.as_deref_mut() else {
        return Err(ApiError::internal("a catalogue needs a stream to write to"));
    };
    let target = segments_to
        .map(|dir| SegmentsDir::prepare(store, dir))
        .transpose()?;
    let mut tap = HeaderTap {
        out,
        header: Vec::with_capacity(CATALOG_HEADER_LEN),
    };
    let report = store
        .write_catalog(&mut tap, target.as_ref().map(|t| t.path.as_path()))
        .map_err(|e: CatalogError| {
            ApiError::internal(format!(
                "the catalogue could not be written: {}",
                crate::exports::error_chain(&e)
            ))
        })?;
    let header = CatalogHeader::parse(&tap.header).map_err(|e| {
        ApiError::internal(format!("the catalogue just written does not read: {e}"))
    })?;
    if let Some(mut target) = target {
        target.kept = true;
    }
    tracing::info!(
        records = report.records,
        bytes = report.bytes,
        segments = report.segments,
        linked = report.segments_linked,
        "store catalogue written"
    );
    Ok(Reply::StoreBackedUp(CatalogView {
        master_key_id: header.master_key.to_string(),
        created: rfc3339_utc(header.created),
        records: report.records,
        bytes: report.bytes,
        segments: report.segments,
        segment_bytes: report.segment_bytes,
        segments_linked: report.segments_linked,
        segments_to: segments_to.map(str::to_owned),
    }))
}

/// A writer that keeps the first [`CATALOG_HEADER_LEN`] bytes passing through it.
struct HeaderTap<'a> {
    out: &'a mut dyn Write,
    header: Vec<u8>,
}

impl Write for HeaderTap<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.out.write(data)?;
        let room = CATALOG_HEADER_LEN - self.header.len();
        self.header.extend_from_slice(&data[..n.min(room)]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The directory a catalogue's segment files are linked into. Unless kept,
/// what was linked into it is removed again when it is dropped (and the
/// directory too, if it was made for this catalogue): a failed store backup
/// leaves the directory as it found it.
struct SegmentsDir {
    path: PathBuf,
    made: bool,
    kept: bool,
}

impl SegmentsDir {
    /// Checks `name` (absolute, outside the store, absent or an empty
    /// directory) and makes it if it is absent.
    fn prepare(store: &Store, name: &str) -> Result<SegmentsDir, ApiError> {
        let path = Path::new(name);
        if !path.is_absolute() {
            return Err(bad_request(
                "relative_path",
                format!(
                    "{name} is not an absolute path (the server does not know the caller's \
                     working directory)"
                ),
            ));
        }
        // Segment directories inside the store's own would be taken for
        // volumes the metadata does not know.
        if let (Ok(store_dir), Some(resolved)) = (store.dir().canonicalize(), resolve(path))
            && resolved.starts_with(&store_dir)
        {
            return Err(bad_request(
                "inside_store",
                format!(
                    "{name} is inside the store directory {}; link the segments somewhere \
                     else on the same file system",
                    store_dir.display()
                ),
            ));
        }
        let made = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                let mut entries = std::fs::read_dir(path).map_err(|e| dir_error(name, &e))?;
                if entries.next().is_some() {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "directory_not_empty",
                        format!(
                            "{name} is not empty: the segment files go into an empty or new \
                             directory"
                        ),
                    ));
                }
                false
            }
            Ok(_) => {
                return Err(bad_request(
                    "not_a_directory",
                    format!("{name} is not a directory"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| dir_error(name, &e))?;
                true
            }
            Err(e) => return Err(dir_error(name, &e)),
        };
        Ok(SegmentsDir {
            path: path.to_owned(),
            made,
            kept: false,
        })
    }
}

impl Drop for SegmentsDir {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if self.made {
            let _ = std::fs::remove_dir_all(&self.path);
        } else if let Ok(entries) = std::fs::read_dir(&self.path) {
            // It was empty: everything in it is ours.
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// `path` with its longest existing ancestor resolved (symbolic links,
/// `..`), for comparing with another resolved path.
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(resolved, |p, c| p.join(c)));
        }
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

fn dir_error(name: &str, e: &io::Error) -> ApiError {
    bad_request(
        "unwritable_directory",
        format!(
            "cannot use {name} for the segment files: {e} (it is written as uid {}, the user \
             that runs the operation: the server's, when one runs)",
            rustix::process::geteuid().as_raw()
        ),
    )
}

#[cfg(test)]
mod tests {

    use super::*;

    /// A store with a tenant, a volume with some data, and its catalogue.
    fn a_catalogue() -> (tempfile::TempDir, Store, Vec<u8>) {
        let (dir, store, _, _) = crate::testing::small_store();
        let mut out = Vec::new();
        store.write_catalog(&mut out, None).unwrap();
        (dir, store, out)
    }

    #[test]
    fn a_segments_directory_must_be_empty_absolute_and_outside_the_store() {
        let (dir, store, _) = a_catalogue();
        let inside = store.dir().join("copy");
        let e = SegmentsDir::prepare(&store, inside.to_str().unwrap())
            .err()
            .unwrap();
        assert_eq!(e.code, "inside_store");
        let e = SegmentsDir::prepare(&store, "segs").err().unwrap();
        assert_eq!(e.code, "relative_path");
        let full = dir.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"x").unwrap();
        let e = SegmentsDir::prepare(&store, full.to_str().unwrap())
            .err()
            .unwrap();
        assert_eq!(e.code, "directory_not_empty");

        // Made when missing, and removed again when not kept.
        let new = dir.path().join("a/b/segs");
        let made = SegmentsDir::prepare(&store, new.to_str().unwrap()).unwrap();
        assert!(new.is_dir());
        std::fs::write(new.join("1"), b"linked").unwrap();
        drop(made);
        assert!(!new.exists());
        // An empty directory given is emptied again, and stays.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let given = SegmentsDir::prepare(&store, empty.to_str().unwrap()).unwrap();
        std::fs::create_dir(empty.join("7")).unwrap();
        std::fs::write(empty.join("7/0"), b"linked").unwrap();
        drop(given);
        assert!(empty.is_dir());
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    }

    #[test]
    fn a_store_backup_writes_the_catalogue_and_links_its_segments() {
        let (dir, store, _) = a_catalogue();
        let segs = dir.path().join("segs");
        let mut out = Vec::new();
        let reply = backup(
            &store,
            Some(segs.to_str().unwrap()),
            &mut OpIo {
                out: Some(&mut out),
                progress: None,
            },
        )
        .unwrap();
        let Reply::StoreBackedUp(view) = reply else {
            panic!("{reply:?}");
        };
        let mut framing = blockseal_volume::CatalogFraming::new();
        framing.feed(&out).unwrap();
        let framed = framing.finish().unwrap();
        assert_eq!(view.bytes, out.len() as u64);
        assert_eq!(view.master_key_id, store.master_key_id().to_string());
        assert_eq!(view.segments, framed.segments);
        assert_eq!(view.segments_linked, view.segments);
        assert!(view.records > 0 && view.segment_bytes > 0, "{view:?}");
        assert!(segs.read_dir().unwrap().count() > 0);
    }
}
