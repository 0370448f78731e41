//! What blockseal's test suites share: the NBD server's integration tests
//! (`crates/blockseal-nbd/tests`, an in-process server) and the end-to-end
//! suite (`tests/`, the real `blockseal` binary).
//!
//! - peer tools: [`require`] fails the calling test, with what to install, when
//!   a tool is missing; a test never passes by skipping its peer;
//! - running commands ([`run`], [`run_ok`]) and python3-libnbd ([`python`],
//!   [`nbdsh`]);
//! - waiting for something to happen ([`wait_until`]), never for a fixed time;
//! - a test PKI made with the `openssl` CLI ([`Pki`]);
//! - a moto S3 server on loopback, one per test binary ([`moto`]);
//! - a blocking, byte-level NBD client that can misbehave on purpose
//!   ([`Raw`]), with the protocol's numbers restated in [`wire`] so that the
//!   tests check the wire, not the server crate's own constants.

pub mod moto;
mod pki;
mod raw;
pub mod wire;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use pki::Pki;
pub use raw::{Raw, Stream};

/// The Python that has libnbd's bindings: python3-libnbd installs them for the
/// system interpreter, which a `python3` earlier on `PATH` may not be.
pub const PYTHON: &str = "/usr/bin/python3";

/// Fails the calling test unless `tool` is on `PATH`.
#[track_caller]
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is required by this test and is not on PATH \
         (scripts/install-deps.sh installs every test peer)"
    );
}

/// Fails the calling test unless every tool in `tools` is on `PATH`.
#[track_caller]
pub fn require_all(tools: &[&str]) {
    for tool in tools {
        require(tool);
    }
}

/// Fails the calling test unless [`PYTHON`] can `import nbd` (python3-libnbd).
#[track_caller]
pub fn require_python_nbd() {
    let found = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "python3-libnbd is required by this test: `{PYTHON} -c 'import nbd'` failed \
         (scripts/install-deps.sh installs it)"
    );
}

/// `/usr/bin/python3 -c SCRIPT`, after [`require_python_nbd`].
#[track_caller]
pub fn python(script: &str) -> Command {
    require_python_nbd();
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", script]);
    cmd
}

/// `nbdsh`, run as `/usr/bin/python3 -m nbd` so that it finds the bindings,
/// after [`require_python_nbd`].
#[track_caller]
pub fn nbdsh() -> Command {
    require_python_nbd();
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-m", "nbd"]);
    cmd
}

/// Runs a command to completion with no standard input.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and returns its standard output; fails the test with its
/// status, standard output and standard error when it does not succeed.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `condition` holds, checking every few milliseconds; fails the
/// test, naming `what`, when it still does not hold after `limit`.
///
/// Only for something that must happen: a test that needs to know something did
/// *not* happen waits instead for an event that proves the system is past the
/// point where it would have done it.
#[track_caller]
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A new temporary directory, removed when the value is dropped.
#[track_caller]
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// A path as `&str`, for command lines and configuration files.
#[track_caller]
pub fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}
