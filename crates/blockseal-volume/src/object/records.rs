//! Small records in a bucket that change only by compare-and-swap: what a
//! cluster keeps its leases and host announcements in.
//!
//! A record is one object. [`Records::put`] writes it only if it is still
//! the version the caller read ([`Expect::Version`], S3's `If-Match`) or
//! does not exist yet ([`Expect::Absent`], `If-None-Match: *`); otherwise it
//! fails with [`PutError::Conflict`] and changes nothing. [`Records::list`]
//! returns every record under a prefix with its version in one LIST, so a
//! watcher sees which records changed without fetching them.
//!
//! The calls block the calling thread (they run on a small runtime of their
//! own), so a cluster's loop can be plain code on a thread of its own.

use std::io;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::bridge::Bridge;

/// The version of a record as the bucket names it (its ETag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

impl Version {
    /// The ETag the bucket gave this version.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a [`Records::put`] expects to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No record of that name exists.
    Absent,
    /// The record is still at this version.
    Version(Version),
}

/// Why a [`Records::put`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The record is not what the caller expected: someone else changed,
    /// created or deleted it. Nothing was written.
    #[error("the record changed meanwhile")]
    Conflict,
    /// The request failed; it may or may not have been applied.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A record as read: its bytes and version.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its bytes.
    pub body: Vec<u8>,
    /// Its version, for a later [`Expect::Version`].
    pub version: Version,
}

/// A record as a LIST shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its name below the listed directory.
    pub name: String,
    /// Its version.
    pub version: Version,
    /// When it was last written, by the bucket's clock (ms since 1970).
    pub modified_ms: i64,
}

/// Records under one prefix of a bucket.
pub struct Records {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    bridge: Bridge,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Records {
    /// Records under `prefix` (no leading or trailing `/`) of `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> io::Result<Records> {
        Ok(Records {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            bridge: Bridge::new("blockseal-records", 1)?,
        })
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Every record directly below `dir/`, in name order: one LIST request
    /// (per thousand records).
    pub fn list(&self, dir: &str) -> io::Result<Vec<Listed>> {
        let store = Arc::clone(&self.store);
        let base = self.path(dir);
        let listed = self
            .bridge
            .run(async move { store.list_with_delimiter(Some(&base)).await })?
            .map_err(object_error)?;
        let mut out = Vec::with_capacity(listed.objects.len());
        for object in listed.objects {
            let Some(name) = object.location.filename() else {
                continue;
            };
            let version = object.e_tag.ok_or_else(|| {
                io::Error::other("the object store lists objects without an ETag")
            })?;
            out.push(Listed {
                name: name.to_owned(),
                version: Version(version),
                modified_ms: object.last_modified.timestamp_millis(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The record `name`, or `None` when there is none.
    pub fn get(&self, name: &str) -> io::Result<Option<Record>> {
        let store = Arc::clone(&self.store);
        let path = self.path(name);
        let got = self.bridge.run(async move {
            let result = store.get(&path).await?;
            let version = result.meta.e_tag.clone();
            let bytes = result.bytes().await?;
            Ok::<_, object_store::Error>((bytes, version))
        })?;
        match got {
            Ok((bytes, Some(version))) => Ok(Some(Record {
                body: bytes.to_vec(),
                version: Version(version),
            })),
            Ok((_, None)) => Err(io::Error::other(
                "the object store returned an object without an ETag",
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Writes `body` as the record `name` if it is as `expect` says; returns
    /// the new version.
    pub fn put(&self, name: &str, body: Vec<u8>, expect: &Expect) -> Result<Version, PutError> {
        let store = Arc::clone(&self.store);
        let path = self.path(name);
        let mode = match expect {
            Expect::Absent => PutMode::Create,
            Expect::Version(version) => PutMode::Update(UpdateVersion {
                e_tag: Some(version.0.clone()),
                version: None,
            }),
        };
        let put = self.bridge.run(async move {
            let options = PutOptions {
                mode,
                ..PutOptions::default()
            };
            store.put_opts(&path, PutPayload::from(body), options).await
        })?;
        match put {
            Ok(result) => result
                .e_tag
                .map(Version)
                .ok_or_else(|| PutError::Io(io::Error::other("the object store gave no ETag"))),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotFound { .. },
            ) => Err(PutError::Conflict),
            Err(e) => Err(PutError::Io(object_error(e))),
        }
    }

    /// Deletes the record `name` whatever its version (absent is fine).
    pub fn delete(&self, name: &str) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let path = self.path(name);
        match self.bridge.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error(e)),
        }
    }
}

fn object_error(error: object_store::Error) -> io::Error {
    io::Error::other(error)
}
