//! The master key file: reading, writing and inspecting it.
//!
//! This is the only file I/O in the crate. A key file is written once, atomically,
//! with mode 0600, and never overwritten; it is refused on load when group or others
//! may read or write it, or when it belongs to a user other than the one loading
//! it or root. It holds the key in the clear or sealed under a passphrase
//! (Argon2id, then AES-256-GCM). The byte layout is in `docs/FORMAT.md` ("Master key
//! file"). No message ever contains key or passphrase bytes.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Block, Version};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::data_key::fill_random;
use crate::hkdf::constant_time_eq;
use crate::locked::KeyBytes;
use crate::master::{CHECK_VALUE_LEN, KEY_ID_LEN, KeyId, MasterKey};
use crate::{KEY_LEN, RandomError};

/// First 8 bytes of every key file.
pub const KEY_FILE_MAGIC: [u8; 8] = *b"BSEALKEY";
/// Key file format version written by this build.
pub const KEY_FILE_VERSION: u16 = 1;

const HEADER_LEN: usize = 8 + 2 + 1 + 1 + KEY_ID_LEN + 8;
const SALT_LEN: usize = 16;
const TAG_LEN: usize = 16;
const PLAIN_LEN: usize = HEADER_LEN + KEY_LEN + CHECK_VALUE_LEN;
const ARGON2_PARAMS_END: usize = HEADER_LEN + 12 + SALT_LEN;
const ARGON2_LEN: usize = ARGON2_PARAMS_END + NONCE_LEN + KEY_LEN + TAG_LEN;
/// No valid key file is longer; reading stops after this many bytes.
const MAX_FILE_LEN: u64 = 4096;

const PROTECTION_NONE: u8 = 0;
const PROTECTION_ARGON2ID: u8 = 1;

/// A passphrase that protects a key file. Zeroizes on drop; `Debug` is redacted.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase. The string is moved, not copied.
    pub fn new(passphrase: String) -> Passphrase {
        Passphrase(Zeroizing::new(passphrase))
    }

    /// The passphrase text. Every use goes through here.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl From<String> for Passphrase {
    fn from(passphrase: String) -> Passphrase {
        Passphrase::new(passphrase)
    }
}

impl From<Zeroizing<String>> for Passphrase {
    fn from(passphrase: Zeroizing<String>) -> Passphrase {
        Passphrase(passphrase)
    }
}

/// The text is a `Zeroizing<String>`.
impl ZeroizeOnDrop for Passphrase {}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Argon2id cost parameters, checked to lie within the ranges below.
///
/// The ranges are what `blockseal key init` accepts, and a key file holding
/// anything else is refused before any work is done, so that a damaged or hostile
/// file cannot make a load allocate or compute for long (the old bounds, 4 GiB
/// and 1024 passes, allowed about two hours of work before "wrong passphrase"):
/// - memory from 46 MiB (OWASP's Argon2id minimum for one pass) to 2 GiB (RFC 9106's
///   first recommended option, the largest memory any recommendation asks for);
/// - 1 to 4 passes: RFC 9106 recommends 1 pass with 2 GiB or 3 with 64 MiB, and
///   more memory is the better way to spend more time; at 2 GiB and 4 passes a
///   load still finishes in seconds, well inside a service manager's start timeout;
/// - 1 to 16 lanes: RFC 9106 recommends 4; this implementation computes the
///   lanes one after another, so more buy nothing.
///
/// The lower bounds make every accepted combination at least as costly to attack
/// as OWASP's minimum, so no key file can be protected by a trivially cheap
/// derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
}

/// Argon2id parameters outside the accepted ranges.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Argon2ParamsError {
    /// Memory is outside [`Argon2Params::MIN_MEMORY_KIB`] to
    /// [`Argon2Params::MAX_MEMORY_KIB`].
    #[error(
        "Argon2id memory must be between {min} KiB (46 MiB) and {max} KiB (2 GiB); got {memory_kib} KiB",
        min = Argon2Params::MIN_MEMORY_KIB,
        max = Argon2Params::MAX_MEMORY_KIB
    )]
    Memory {
        /// The refused memory size, in KiB.
        memory_kib: u32,
    },
    /// Iterations are outside 1 to [`Argon2Params::MAX_ITERATIONS`].
    #[error(
        "Argon2id iterations must be between 1 and {max}; got {iterations}",
        max = Argon2Params::MAX_ITERATIONS
    )]
    Iterations {
        /// The refused iteration count.
        iterations: u32,
    },
    /// Parallelism is outside 1 to [`Argon2Params::MAX_PARALLELISM`].
    #[error(
        "Argon2id parallelism must be between 1 and {max}; got {parallelism}",
        max = Argon2Params::MAX_PARALLELISM
    )]
    Parallelism {
        /// The refused lane count.
        parallelism: u32,
    },
    /// Parameters read from a key file ask for more work than any key file may
    /// (see [`Argon2Params::for_existing_file`]).
    #[error(
        "Argon2id parameters m={memory_kib} KiB, t={iterations}, p={parallelism} are \
         outside what a key file may ask for: memory at most 2 GiB and at least 8 KiB \
         per lane, 1 to 64 lanes, memory x iterations at most 8 GiB"
    )]
    FileWork {
        /// Memory cost, in KiB.
        memory_kib: u32,
        /// Passes over memory.
        iterations: u32,
        /// Lanes.
        parallelism: u32,
    },
}

impl Argon2Params {
    /// The defaults for new key files: 64 MiB, 3 iterations, 1 lane (RFC 9106's
    /// second recommended option, on one lane).
    pub const DEFAULT: Argon2Params = Argon2Params {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };
    /// The cheapest parameters accepted: 46 MiB, 1 iteration, 1 lane. For tests
    /// and examples; weaker than [`Argon2Params::DEFAULT`].
    pub const CHEAPEST: Argon2Params = Argon2Params {
        memory_kib: Self::MIN_MEMORY_KIB,
        iterations: 1,
        parallelism: 1,
    };
    /// Smallest memory cost accepted: 46 MiB (47104 KiB).
    pub const MIN_MEMORY_KIB: u32 = 46 * 1024;
    /// Largest memory cost accepted: 2 GiB (2097152 KiB).
    pub const MAX_MEMORY_KIB: u32 = 2 * 1024 * 1024;
    /// Largest iteration count accepted.
    pub const MAX_ITERATIONS: u32 = 4;
    /// Largest lane count accepted.
    pub const MAX_PARALLELISM: u32 = 16;
    /// Most lanes a key file being read may name (Argon2's own practical bound,
    /// and what older builds wrote).
    pub const MAX_FILE_PARALLELISM: u32 = 64;
    /// Most work a key file being read may ask for, memory x iterations in KiB:
    /// 8 GiB, the cost of the largest parameters [`Argon2Params::new`] accepts.
    pub const MAX_FILE_WORK_KIB: u64 = Self::MAX_MEMORY_KIB as u64 * Self::MAX_ITERATIONS as u64;

    /// Checks and builds parameters.
    pub fn new(
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    ) -> Result<Self, Argon2ParamsError> {
        // Argon2 itself needs 8 KiB per lane; the memory floor is far above that.
        const _: () = assert!(Argon2Params::MIN_MEMORY_KIB >= 8 * Argon2Params::MAX_PARALLELISM);
        if !(Self::MIN_MEMORY_KIB..=Self::MAX_MEMORY_KIB).contains(&memory_kib) {
            return Err(Argon2ParamsError::Memory { memory_kib });
        }
        if !(1..=Self::MAX_ITERATIONS).contains(&iterations) {
            return Err(Argon2ParamsError::Iterations { iterations });
        }
        if !(1..=Self::MAX_PARALLELISM).contains(&parallelism) {
            return Err(Argon2ParamsError::Parallelism { parallelism });
        }
        Ok(Argon2Params {
            memory_kib,
            iterations,
            parallelism,
        })
    }

    /// Checks parameters read from an existing key file. Looser than
    /// [`Argon2Params::new`] (what `key init` writes), which older builds did not
    /// enforce: a file they wrote with less memory or more passes still opens. What
    /// is bounded is the work a damaged or hostile file can make a start do:
    /// memory up to [`Argon2Params::MAX_MEMORY_KIB`], memory x iterations up to
    /// [`Argon2Params::MAX_FILE_WORK_KIB`], up to
    /// [`Argon2Params::MAX_FILE_PARALLELISM`] lanes of at least 8 KiB (Argon2's
    /// own minimum). A weaker file costs an attacker less too, but its parameters
    /// are authenticated with the key, so no one can weaken a file without
    /// the passphrase: they could only replace it, which the store's check value
    /// catches.
    pub fn for_existing_file(
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    ) -> Result<Self, Argon2ParamsError> {
        let work = u64::from(memory_kib) * u64::from(iterations);
        let ok = (1..=Self::MAX_FILE_PARALLELISM).contains(&parallelism)
            && iterations >= 1
            && memory_kib >= 8 * parallelism
            && memory_kib <= Self::MAX_MEMORY_KIB
            && work <= Self::MAX_FILE_WORK_KIB;
        if !ok {
            return Err(Argon2ParamsError::FileWork {
                memory_kib,
                iterations,
                parallelism,
            });
        }
        Ok(Argon2Params {
            memory_kib,
            iterations,
            parallelism,
        })
    }

    /// Whether `key init` would refuse these parameters today (a key file made
    /// by an older build, weaker or slower than the current ranges allow).
    pub fn outside_init_ranges(&self) -> bool {
        Self::new(self.memory_kib, self.iterations, self.parallelism).is_err()
    }

    /// Memory cost, in KiB.
    pub fn memory_kib(&self) -> u32 {
        self.memory_kib
    }

    /// Number of passes over memory.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Number of lanes.
    pub fn parallelism(&self) -> u32 {
        self.parallelism
    }
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Argon2Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "m={} KiB, t={}, p={}",
            self.memory_kib, self.iterations, self.parallelism
        )
    }
}

/// How a key file protects the key it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protection {
    /// The key is stored in the clear; only the file mode protects it.
    None,
    /// The key is sealed under a key derived from a passphrase with Argon2id.
    Argon2id(Argon2Params),
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protection::None => f.write_str("none"),
            Protection::Argon2id(params) => write!(f, "passphrase (Argon2id, {params})"),
        }
    }
}

/// What can be learnt about a key file without its passphrase. Never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyFileInfo {
    /// Format version of the file.
    pub format_version: u16,
    /// Id of the key the file holds.
    pub key_id: KeyId,
    /// When the key was generated, in seconds since the Unix epoch.
    pub created: u64,
    /// How the key is protected.
    pub protection: Protection,
    /// The file's permission bits (e.g. `0o600`).
    pub mode: u32,
    /// The uid of the file's owner.
    pub owner: u32,
}

impl KeyFileInfo {
    /// Whether group or others may read or write the file (a load would refuse it).
    pub fn mode_is_too_open(&self) -> bool {
        self.mode & 0o077 != 0
    }

    /// Whether the file belongs to a user other than this process's effective
    /// user and root (a load would refuse it).
    pub fn owner_is_refused(&self) -> bool {
        !owner_may_hold_key(self.owner, effective_uid())
    }
}

/// Why a key file could not be created, loaded or inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file does not exist.
    #[error("key file {} does not exist", .path.display())]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// `create_key_file` found a file already at the path; nothing was written.
    #[error("key file {} already exists; refusing to overwrite it", .path.display())]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// The path is not (or, on create, does not name) a regular file.
    #[error("key file {} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Group or others may read or write the file.
    #[error(
        "key file {} has mode {mode:04o}, open to group or others; run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    InsecureMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file belongs to a user other than the effective user and root, who could
    /// replace or read the key.
    #[error(
        "key file {} is owned by uid {owner}; it must be owned by the user running blockseal \
         (uid {euid}) or root: run `chown {euid} {}`",
        .path.display(), .path.display()
    )]
    UntrustedOwner {
        /// The file.
        path: PathBuf,
        /// The uid that owns it.
        owner: u32,
        /// The effective uid of this process.
        euid: u32,
    },
    /// The file does not start with the key file magic.
    #[error("{} is not a blockseal key file (bad magic)", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file has a format version this build does not read.
    #[error(
        "key file {} has format version {version}; this build reads version {KEY_FILE_VERSION}",
        .path.display()
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u16,
    },
    /// The header holds a value this build does not accept.
    #[error("key file {} has a bad header: {reason}", .path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file asks for Argon2id parameters outside the accepted ranges (see
    /// [`Argon2Params`]); nothing was derived.
    #[error("key file {} asks for Argon2id parameters this build refuses", .path.display())]
    Argon2Params {
        /// The file.
        path: PathBuf,
        /// Which parameter, and its range.
        #[source]
        source: Argon2ParamsError,
    },
    /// The file is shorter than its header says it must be.
    #[error("key file {} is truncated: {actual} bytes, expected {expected}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// The length its header calls for.
        expected: u64,
    },
    /// The file is longer than its header says it must be.
    #[error("key file {} has trailing bytes: {actual} bytes, expected {expected}", .path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// The length its header calls for.
        expected: u64,
    },
    /// An unprotected key does not match the check value stored beside it.
    #[error("key file {} is damaged: the key does not match its check value", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
    },
    /// The file is passphrase protected and no passphrase was given.
    #[error("key file {} is protected by a passphrase, but none was given", .path.display())]
    PassphraseRequired {
        /// The file.
        path: PathBuf,
    },
    /// A passphrase was given for a file that is not passphrase protected.
    #[error("key file {} is not protected by a passphrase, but one was given", .path.display())]
    PassphraseNotUsed {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase does not open the file (or the file was altered).
    #[error("wrong passphrase for key file {}", .path.display())]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// An empty passphrase was offered to protect a new key file.
    #[error("refusing an empty passphrase for key file {}", .path.display())]
    EmptyPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// Argon2id failed to derive the passphrase key.
    #[error("Argon2id key derivation failed for key file {}", .path.display())]
    KeyDerivation {
        /// The file.
        path: PathBuf,
    },
    /// Random bytes for the key file could not be drawn.
    #[error("could not write key file {}", .path.display())]
    Random {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: RandomError,
    },
    /// Reading, writing or syncing failed.
    #[error("could not {action} key file {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// Writes `key` to a new key file at `path`, sealed under `passphrase` with the
/// default Argon2id parameters when one is given.
///
/// See [`create_key_file_with_params`].
pub fn create_key_file(
    path: &Path,
    key: &MasterKey,
    passphrase: Option<&Passphrase>,
) -> Result<(), KeyFileError> {
    create_key_file_with_params(path, key, passphrase, Argon2Params::DEFAULT)
}

/// Writes `key` to a new key file at `path`; `params` are used when `passphrase`
/// is given.
///
/// The file is written to a temporary file (mode 0600) in the same directory,
/// synced, then hard-linked to `path`, which fails rather than replace an existing
/// file; the directory is synced afterwards. An existing file is never touched.
pub fn create_key_file_with_params(
    path: &Path,
    key: &MasterKey,
    passphrase: Option<&Passphrase>,
    params: Argon2Params,
) -> Result<(), KeyFileError> {
    let path_buf = || path.to_path_buf();
    // Checked first so that a slow Argon2id run is not wasted; the hard link
    // below is what actually guarantees no overwrite.
    if fs::symlink_metadata(path).is_ok() {
        return Err(KeyFileError::AlreadyExists { path: path_buf() });
    }
    let bytes = encode(path, key, passphrase, params)?;

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| KeyFileError::NotAFile { path: path_buf() })?;
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix).map_err(|source| KeyFileError::Random {
        path: path_buf(),
        source,
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp-{}", u64::from_be_bytes(suffix)));
    let temp = dir.join(temp_name);

    let io = |action: &'static str| {
        move |source: io::Error| KeyFileError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io("create"))?;
    let written = file
        .write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(io("write"))
        .and_then(|()| {
            fs::hard_link(&temp, path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KeyFileError::AlreadyExists { path: path_buf() }
                } else {
                    io("link")(source)
                }
            })
        });
    drop(file);
    // The temporary name goes whether or not the link succeeded.
    let removed = fs::remove_file(&temp);
    written?;
    removed.map_err(io("remove the temporary file of"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the directory of"))?;
    Ok(())
}

/// Loads the master key from the key file at `path`.
///
/// Refuses a file that group or others may read or write, a file owned by a user
/// other than the effective user and root, a file of the wrong length or with a
/// bad header, a protected file without a passphrase, a passphrase for an
/// unprotected file, and a wrong passphrase.
pub fn load_key_file(
    path: &Path,
    passphrase: Option<&Passphrase>,
) -> Result<MasterKey, KeyFileError> {
    let (bytes, mode, owner) = read(path)?;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::InsecureMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let euid = effective_uid();
    if !owner_may_hold_key(owner, euid) {
        return Err(KeyFileError::UntrustedOwner {
            path: path.to_path_buf(),
            owner,
            euid,
        });
    }
    let header = parse(path, &bytes)?;
    let path_buf = || path.to_path_buf();
    // Copied straight into the key's own memory, never into a plain array.
    let mut key = KeyBytes::zeroed();
    match (header.protection, passphrase) {
        (Protection::None, None) => {
            key.expose_mut()
                .copy_from_slice(&bytes[HEADER_LEN..HEADER_LEN + KEY_LEN]);
            let master = MasterKey::from_key_bytes(header.key_id, header.created, key);
            let stored = &bytes[HEADER_LEN + KEY_LEN..PLAIN_LEN];
            if !constant_time_eq(master.check_value().as_bytes(), stored) {
                return Err(KeyFileError::Damaged { path: path_buf() });
            }
            Ok(master.with_protection(header.protection))
        }
        (Protection::None, Some(_)) => Err(KeyFileError::PassphraseNotUsed { path: path_buf() }),
        (Protection::Argon2id(_), None) => {
            Err(KeyFileError::PassphraseRequired { path: path_buf() })
        }
        (Protection::Argon2id(params), Some(passphrase)) => {
            if params.outside_init_ranges() {
                tracing::warn!(
                    path = %path.display(),
                    %params,
                    "key file's Argon2id parameters are outside what `blockseal key init` writes today; consider a new key file"
                );
            }
            let salt = &bytes[ARGON2_PARAMS_END - SALT_LEN..ARGON2_PARAMS_END];
            let aead = passphrase_key(path, passphrase, salt, params)?;
            let nonce_end = ARGON2_PARAMS_END + NONCE_LEN;
            let nonce = Nonce::try_assume_unique_for_key(&bytes[ARGON2_PARAMS_END..nonce_end])
                .expect("the nonce slice is NONCE_LEN bytes");
            let mut sealed = Zeroizing::new(bytes[nonce_end..ARGON2_LEN].to_vec());
            let plain = aead
                .open_in_place(nonce, Aad::from(&bytes[..ARGON2_PARAMS_END]), &mut sealed)
                .map_err(|_| KeyFileError::WrongPassphrase { path: path_buf() })?;
            key.expose_mut().copy_from_slice(plain);
            Ok(
                MasterKey::from_key_bytes(header.key_id, header.created, key)
                    .with_protection(header.protection),
            )
        }
    }
}

/// Reads what a key file says about itself: key id, creation time, protection,
/// file mode and owner. Needs no passphrase, never returns the key, and does not
/// refuse a file whose mode or owner a load would refuse (see
/// [`KeyFileInfo::mode_is_too_open`] and [`KeyFileInfo::owner_is_refused`]).
pub fn inspect_key_file(path: &Path) -> Result<KeyFileInfo, KeyFileError> {
    let (bytes, mode, owner) = read(path)?;
    let header = parse(path, &bytes)?;
    Ok(KeyFileInfo {
        format_version: KEY_FILE_VERSION,
        key_id: header.key_id,
        created: header.created,
        protection: header.protection,
        mode,
        owner,
    })
}

/// Whether a key file owned by `owner` may be loaded by a process whose effective
/// uid is `euid`: its own files, and root's.
///
/// As ssh does for its configuration and keys: any other owner could replace the
/// key with one of their choosing, or widen the mode and read it. Root's files are
/// accepted because root is trusted anyway (an attacker with root is outside the
/// threat model) and a provisioning system may install the file as root; a
/// process running as root refuses other users' files like any other process.
fn owner_may_hold_key(owner: u32, euid: u32) -> bool {
    owner == euid || owner == 0
}

fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The fields of a key file header that has passed every check.
struct Header {
    key_id: KeyId,
    created: u64,
    protection: Protection,
}

/// Reads at most `MAX_FILE_LEN + 1` bytes of a regular file, its mode and its owner.
fn read(path: &Path) -> Result<(Zeroizing<Vec<u8>>, u32, u32), KeyFileError> {
    let io = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            KeyFileError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            KeyFileError::Io {
                path: path.to_path_buf(),
                action: "read",
                source,
            }
        }
    };
    // Opening a FIFO for reading waits for a writer, so a key path that names
    // one would hang the load; refuse anything but a regular file before opening.
    if !fs::metadata(path).map_err(io)?.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(io)?;
    // The mode, owner and type come from the open file, so they describe what is read.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    // Reserved up front so the buffer never reallocates and leaves key copies behind.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_FILE_LEN as usize + 1));
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok((bytes, mode, meta.uid()))
}

/// Checks magic, version, header fields and length, in that order.
fn parse(path: &Path, bytes: &[u8]) -> Result<Header, KeyFileError> {
    let path_buf = || path.to_path_buf();
    let actual = bytes.len() as u64;
    let truncated = |expected: usize| KeyFileError::Truncated {
        path: path_buf(),
        actual,
        expected: expected as u64,
    };
    if bytes.len() < KEY_FILE_MAGIC.len() {
        return Err(if KEY_FILE_MAGIC.starts_with(bytes) && !bytes.is_empty() {
            truncated(HEADER_LEN)
        } else {
            KeyFileError::BadMagic { path: path_buf() }
        });
    }
    if bytes[..8] != KEY_FILE_MAGIC {
        return Err(KeyFileError::BadMagic { path: path_buf() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN));
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if version != KEY_FILE_VERSION {
        return Err(KeyFileError::UnsupportedVersion {
            path: path_buf(),
            version,
        });
    }
    let bad = |reason: String| KeyFileError::BadHeader {
        path: path_buf(),
        reason,
    };
    if bytes[11] != 0 {
        return Err(bad(format!("reserved byte is {:#04x}, not 0", bytes[11])));
    }
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&bytes[12..12 + KEY_ID_LEN]);
    let created = u64::from_be_bytes(bytes[28..36].try_into().expect("8-byte slice"));
    let expected = match bytes[10] {
        PROTECTION_NONE => PLAIN_LEN,
        PROTECTION_ARGON2ID => ARGON2_LEN,
        other => return Err(bad(format!("unknown protection {other}"))),
    };
    if bytes.len() < expected {
        return Err(truncated(expected));
    }
    if bytes.len() > expected {
        return Err(KeyFileError::TrailingBytes {
            path: path_buf(),
            actual,
            expected: expected as u64,
        });
    }
    let protection = if bytes[10] == PROTECTION_ARGON2ID {
        let word =
            |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4-byte slice"));
        let params =
            Argon2Params::for_existing_file(word(36), word(40), word(44)).map_err(|source| {
                KeyFileError::Argon2Params {
                    path: path_buf(),
                    source,
                }
            })?;
        Protection::Argon2id(params)
    } else {
        Protection::None
    };
    Ok(Header {
        key_id: KeyId::from_bytes(key_id),
        created,
        protection,
    })
}

/// Encodes a key file (layout in `docs/FORMAT.md`).
fn encode(
    path: &Path,
    key: &MasterKey,
    passphrase: Option<&Passphrase>,
    params: Argon2Params,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let mut out = Zeroizing::new(Vec::with_capacity(ARGON2_LEN));
    out.extend_from_slice(&KEY_FILE_MAGIC);
    out.extend_from_slice(&KEY_FILE_VERSION.to_be_bytes());
    out.push(if passphrase.is_some() {
        PROTECTION_ARGON2ID
    } else {
        PROTECTION_NONE
    });
    out.push(0);
    out.extend_from_slice(key.id().as_bytes());
    out.extend_from_slice(&key.created().to_be_bytes());
    let Some(passphrase) = passphrase else {
        out.extend_from_slice(key.expose_secret());
        out.extend_from_slice(key.check_value().as_bytes());
        return Ok(out);
    };
    if passphrase.expose_secret().is_empty() {
        return Err(KeyFileError::EmptyPassphrase {
            path: path.to_path_buf(),
        });
    }
    let random = |source| KeyFileError::Random {
        path: path.to_path_buf(),
        source,
    };
    out.extend_from_slice(&params.memory_kib.to_be_bytes());
    out.extend_from_slice(&params.iterations.to_be_bytes());
    out.extend_from_slice(&params.parallelism.to_be_bytes());
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt).map_err(random)?;
    out.extend_from_slice(&salt);
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce).map_err(random)?;
    let aead = passphrase_key(path, passphrase, &salt, params)?;
    // Copied straight into a wiped buffer: `*key.expose_secret()` would make an
    // unwiped temporary on the stack.
    let mut sealed = Zeroizing::new([0u8; KEY_LEN]);
    sealed.copy_from_slice(key.expose_secret());
    let tag = aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&out[..]),
            sealed.as_mut_slice(),
        )
        .expect("AES-GCM seals 32 bytes without error");
    out.extend_from_slice(&nonce);
    out.extend_from_slice(sealed.as_slice());
    out.extend_from_slice(tag.as_ref());
    debug_assert_eq!(out.len(), ARGON2_LEN);
    Ok(out)
}

/// Derives the AES-256-GCM key that seals a key file from its passphrase.
fn passphrase_key(
    path: &Path,
    passphrase: &Passphrase,
    salt: &[u8],
    params: Argon2Params,
) -> Result<LessSafeKey, KeyFileError> {
    argon2id_sealing_key(passphrase, salt, params).map_err(|KeyDerivationFailed| {
        KeyFileError::KeyDerivation {
            path: path.to_path_buf(),
        }
    })
}

/// Argon2id could not derive a sealing key (parameters it refuses, or memory it
/// could not have).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyDerivationFailed;

/// Derives an AES-256-GCM key from a passphrase: `Argon2id(v=0x13, params,
/// password = passphrase as UTF-8, salt, output = 32 bytes)`. What key files and
/// tenant bundles protected by a passphrase are sealed under.
pub(crate) fn argon2id_sealing_key(
    passphrase: &Passphrase,
    salt: &[u8],
    params: Argon2Params,
) -> Result<LessSafeKey, KeyDerivationFailed> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(KEY_LEN),
    )
    .map_err(|_| KeyDerivationFailed)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params.clone());
    // Our own work memory, so that it is wiped on every path: it holds values
    // derived from the passphrase. (The crate's `zeroize` feature wipes its
    // internal hash of the passphrase and its last block.)
    let mut memory = Zeroizing::new(vec![Block::new(); argon_params.block_count()]);
    let mut derived = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into_with_memory(
            passphrase.expose_secret().as_bytes(),
            salt,
            derived.as_mut_slice(),
            memory.as_mut_slice(),
        )
        .map_err(|_| KeyDerivationFailed)?;
    drop(memory);
    let key = UnboundKey::new(&AES_256_GCM, derived.as_slice()).map_err(|_| KeyDerivationFailed)?;
    Ok(LessSafeKey::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_must_be_the_effective_user_or_root() {
        assert!(owner_may_hold_key(1000, 1000));
        assert!(owner_may_hold_key(0, 1000));
        assert!(owner_may_hold_key(0, 0));
        assert!(!owner_may_hold_key(1001, 1000));
        assert!(!owner_may_hold_key(1000, 0));
    }
}
