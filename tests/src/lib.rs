//! The end-to-end harness: runs the real `blockseal serve` binary on a temporary
//! data directory and socket, waits on its readiness line (never a sleep), and
//! stops it on drop; plus checks for the client tools and small helpers the
//! suites share.
//!
//! A missing tool skips a test with a printed reason, except when the `CI`
//! environment variable is set: there it fails the test, so that CI never passes
//! by skipping.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rand::RngCore;

/// The `blockseal` binary built beside the test executable
/// (`target/<profile>/blockseal`). `cargo test --workspace` builds it.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = profile_dir.join("blockseal");
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p blockseal` (same profile \
         and target directory as the tests), or run `cargo test --workspace`",
        path.display()
    );
    path
}

/// Runs `blockseal ARGS` to completion (admin commands).
pub fn blockseal(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run blockseal")
}

/// Runs `blockseal ARGS` and returns its stdout; panics with its output if it fails.
#[track_caller]
pub fn blockseal_ok(args: &[&str]) -> String {
    run_ok(Command::new(binary()).args(args))
}

/// A running `blockseal serve`. Dropping it stops the server with SIGTERM.
pub struct ServerProcess {
    child: Option<Child>,
    /// Kept open so that the server's stdout never turns into a broken pipe.
    _stdout: Option<BufReader<ChildStdout>>,
    args: Vec<OsString>,
    log: PathBuf,
    /// The server's Unix socket, from its readiness line.
    pub socket: Option<PathBuf>,
    /// The server's TCP address, from its readiness line.
    pub tcp: Option<SocketAddr>,
    /// The temporary directory holding data, socket and log (unless the caller
    /// gave its own).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// The embedded default on a fresh temporary directory: export `demo/disk`
    /// of `demo_size` (e.g. `"64M"`), on `<tmp>/nbd.sock`.
    pub fn demo(demo_size: &str) -> ServerProcess {
        let tmp = tempfile::tempdir().expect("cannot create a temporary directory");
        let dir = tmp.path().to_path_buf();
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.join("data").into(),
            "--unix".into(),
            dir.join("nbd.sock").into(),
            "--demo-size".into(),
            demo_size.into(),
        ];
        ServerProcess::start_in(dir, Some(tmp), args)
    }

    /// `blockseal serve --config CONFIG`; the log goes to `dir`.
    pub fn with_config(dir: &Path, config: &Path) -> ServerProcess {
        let args = vec!["serve".into(), "--config".into(), config.into()];
        ServerProcess::start_in(dir.to_path_buf(), None, args)
    }

    fn start_in(dir: PathBuf, tmp: Option<tempfile::TempDir>, args: Vec<OsString>) -> Self {
        let mut server = ServerProcess {
            child: None,
            _stdout: None,
            args,
            log: dir.join("server.log"),
            socket: None,
            tcp: None,
            dir,
            _tmp: tmp,
        };
        server.spawn();
        server
    }

    /// The NBD URI of `export` on the Unix socket.
    pub fn uri(&self, export: &str) -> String {
        let socket = self
            .socket
            .as_ref()
            .expect("the server listens on a Unix socket");
        format!("nbd+unix:///{export}?socket={}", socket.display())
    }

    /// The data directory of the embedded default.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// The server's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server with SIGTERM and waits; it must exit 0.
    pub fn stop(&mut self) {
        let status = self.signal_and_wait("TERM");
        assert!(
            status.success(),
            "blockseal serve exited with {status} after SIGTERM; log:\n{}",
            self.log()
        );
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed) and waits.
    pub fn kill(&mut self) {
        self.signal_and_wait("KILL");
    }

    /// Starts the server again with the same arguments (same data directory).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("cannot open the server log");
        let mut child = Command::new(binary())
            .args(&self.args)
            .env(
                "BLOCKSEAL_LOG",
                std::env::var("BLOCKSEAL_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cannot start blockseal serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = stdout
                .read_line(&mut line)
                .expect("cannot read the server's stdout");
            if n == 0 {
                let status = child.wait().expect("cannot wait for the server");
                panic!(
                    "blockseal serve exited ({status}) before its readiness line; log:\n{}",
                    self.log()
                );
            }
            if let Some(rest) = line.trim_end().strip_prefix("ready") {
                for field in rest.split_whitespace() {
                    if let Some(path) = field.strip_prefix("unix=") {
                        self.socket = Some(PathBuf::from(path));
                    } else if let Some(addr) = field.strip_prefix("tcp=") {
                        self.tcp = Some(addr.parse().expect("tcp= holds IP:PORT"));
                    }
                }
                break;
            }
        }
        self.child = Some(child);
        self._stdout = Some(stdout);
    }

    fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        send_signal(&child, signal);
        self._stdout = None;
        // A stuck shutdown must fail the test, not hang it.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("cannot wait for the server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "blockseal serve did not exit within 60 s of SIG{signal}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- blockseal serve log ---\n{}", self.log());
        }
        if let Some(child) = &mut self.child {
            send_signal(child, "TERM");
            let _ = child.wait();
        }
    }
}

fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status();
}

/// Whether `tool` is on PATH; if not, skips (prints why) or, under CI, panics.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(&format!(
            "{tool} is not installed (scripts/install-deps.sh installs it)"
        ));
    }
    found
}

/// Whether every tool in `tools` is on PATH (see [`have`]).
pub fn have_all(tools: &[&str]) -> bool {
    tools.iter().all(|tool| have(tool))
}

/// Skips the calling test with `reason`, or fails it under CI.
pub fn skip(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("required for this test, missing in CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// The Python that has libnbd's bindings (python3-libnbd installs them for the
/// system interpreter, which a `python3` earlier on PATH may not be).
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether `/usr/bin/python3` can `import nbd` (see [`have`]).
pub fn have_python_nbd() -> bool {
    let found = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip("python3-libnbd (import nbd with /usr/bin/python3) is not available");
    }
    found
}

/// `nbdsh`, run as `/usr/bin/python3 -m nbd` so that it finds the bindings.
pub fn nbdsh() -> Command {
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-m", "nbd"]);
    cmd
}

/// Runs a command, returning its output; panics with stdout and stderr when it fails.
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

/// Runs a command to completion.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Writes `len` random bytes to a new file at `path`.
pub fn random_file(path: &Path, len: usize) {
    let mut file = std::fs::File::create(path).expect("cannot create the file");
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    let mut rng = rand::rng();
    while left > 0 {
        let n = left.min(chunk.len());
        rng.fill_bytes(&mut chunk[..n]);
        file.write_all(&chunk[..n]).expect("cannot write the file");
        left -= n;
    }
    file.sync_all().expect("cannot sync the file");
}

/// SHA-256 of a file, as `sha256sum` prints it (hex).
pub fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    bytes
}

/// Test PKI made with the `openssl` CLI: a CA, a server certificate for
/// 127.0.0.1 and localhost, and client certificate directories in libnbd's
/// layout (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
pub struct Pki {
    /// Where every file lives.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA and server certificate.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=blockseal test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        let pki = Pki { dir };
        pki.issue(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        pki
    }

    /// The server certificate, its key and the CA, as the config file names them.
    pub fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let d = self.dir.path();
        (
            d.join("server-cert.pem"),
            d.join("server-key.pem"),
            d.join("ca-cert.pem"),
        )
    }

    /// A directory for libnbd's `tls-certificates=` with a client certificate
    /// naming `tenant` (URI SAN `blockseal:tenant:<tenant>`), or with no client
    /// certificate at all when `tenant` is `None`.
    pub fn client_dir(&self, name: &str, tenant: Option<&str>) -> PathBuf {
        let d = self.dir.path();
        let out = d.join(format!("client-{name}"));
        std::fs::create_dir_all(&out).expect("cannot create the client directory");
        std::fs::copy(d.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy CA");
        if let Some(tenant) = tenant {
            self.issue(
                name,
                &format!("/CN={name}"),
                &format!(
                    "extendedKeyUsage=clientAuth\nsubjectAltName=URI:blockseal:tenant:{tenant}\n"
                ),
            );
            std::fs::copy(
                d.join(format!("{name}-cert.pem")),
                out.join("client-cert.pem"),
            )
            .expect("copy client certificate");
            std::fs::copy(
                d.join(format!("{name}-key.pem")),
                out.join("client-key.pem"),
            )
            .expect("copy client key");
        }
        out
    }

    fn issue(&self, name: &str, subject: &str, extensions: &str) {
        let d = self.dir.path();
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{extensions}"),
        )
        .expect("cannot write the extensions file");
        let (key, csr, cert, ext) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
            format!("{name}.ext"),
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}
