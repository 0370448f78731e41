//! Helpers shared by the integration tests: an in-process server on a temp
//! Unix socket (and optionally a TLS TCP port), tool checks, a raw protocol
//! client, and test certificates made with the `openssl` CLI.

#![allow(dead_code, unreachable_pub)] // shared by test binaries that each use a part

pub mod mem;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use blockseal_nbd::{Server, ServerConfig, TlsConfig};
use mem::MemCatalog;

pub const PYTHON: &str = "/usr/bin/python3";

/// A server running on its own runtime until dropped; the drop shuts it down and
/// checks that it stops.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub catalog: Arc<MemCatalog>,
    pub server: Server,
    runtime: Option<tokio::runtime::Runtime>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), blockseal_nbd::ServeError>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(MemCatalog::standard(), ServerConfig::default(), None)
    }

    /// Binds the Unix socket (and with `tls` a TCP port on 127.0.0.1) before
    /// returning, so clients can connect at once: no readiness sleeps.
    pub fn start_with(
        catalog: MemCatalog,
        config: ServerConfig,
        tls: Option<TlsConfig>,
    ) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let catalog = Arc::new(catalog);
        let server = Server::new(catalog.clone(), config);
        let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        unix.set_nonblocking(true).unwrap();
        let mut tasks = Vec::new();
        let mut tcp = None;
        {
            let _guard = runtime.enter();
            let listener = tokio::net::UnixListener::from_std(unix).unwrap();
            let s = server.clone();
            tasks.push(runtime.spawn(async move { s.serve_unix(listener).await }));
            if let Some(tls) = tls {
                let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                std_listener.set_nonblocking(true).unwrap();
                tcp = Some(std_listener.local_addr().unwrap());
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let s = server.clone();
                tasks.push(runtime.spawn(async move { s.serve_tcp(listener, Some(tls)).await }));
            }
        }
        TestServer {
            dir,
            socket,
            tcp,
            catalog,
            server,
            runtime: Some(runtime),
            tasks,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(&self.socket)
    }

    /// Triggers shutdown and waits (bounded) for every listener to return.
    pub fn stop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.server.shutdown_handle().trigger();
        let tasks = std::mem::take(&mut self.tasks);
        runtime.block_on(async {
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .expect("server did not stop within 20 s of shutdown")
                    .unwrap()
                    .unwrap();
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(rt) = self.runtime.take() {
                self.server.shutdown_handle().trigger();
                rt.shutdown_timeout(Duration::from_secs(1));
            }
            return;
        }
        self.stop();
    }
}

fn init_logging() {
    // RUST_LOG=blockseal_nbd=debug shows the server's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Whether `tool` is on PATH. Missing tools skip the test with a printed reason,
/// except in CI (`CI` set), where they fail it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(&format!("{tool} is not installed"));
    }
    found
}

/// Whether `/usr/bin/python3` can `import nbd` (python3-libnbd).
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

/// Panics unless `/usr/bin/python3` can `import nbd`: for tests that have no
/// meaning without a real client.
pub fn require_python_nbd() {
    let found = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "python3-libnbd (import nbd with /usr/bin/python3) is required by this test"
    );
}

fn skip(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("required test tool missing in CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Runs a command, returning its output; panics with stdout and stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

// Protocol numbers, restated here so the tests check the wire, not the crate.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const INFO_BLOCK_SIZE: u16 = 3;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking, byte-level NBD client for conformance tests.
pub struct Raw {
    pub s: Box<dyn Stream>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s: Box::new(s) }
    }

    pub fn connect_tcp(addr: SocketAddr) -> Raw {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s: Box::new(s) }
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// Reads the greeting and returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        self.u16()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Greeting plus client flags.
    pub fn handshake(&mut self, client_flags: u32) -> u16 {
        let flags = self.greeting();
        self.send(&client_flags.to_be_bytes());
        flags
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (option, kind, self.read_n(len))
    }

    /// Sends `NBD_OPT_GO` for `name` and returns (size, flags) from `NBD_INFO_EXPORT`.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &info_payload(name, &[]));
        let mut export = None;
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    export = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
    }

    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// A simple reply: (error, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_MAGIC);
        let error = self.u32();
        (error, self.u64())
    }

    /// A structured chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let handle = self.u64();
        let len = self.u32() as usize;
        (flags, kind, handle, self.read_n(len))
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        p.extend_from_slice(&r.to_be_bytes());
    }
    p
}

/// Test PKI made with the openssl CLI: a CA, a server certificate for
/// 127.0.0.1/localhost, and client certificate directories in libnbd's layout
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
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

    fn issue(&self, name: &str, subject: &str, extensions: &str) {
        let d = self.dir.path();
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{extensions}"),
        )
        .unwrap();
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}-cert.pem");
        let ext = format!("{name}.ext");
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

    /// A client certificate directory with `san` (e.g. `URI:blockseal:tenant:acme`).
    pub fn client(&self, name: &str, san: Option<&str>) -> PathBuf {
        let mut ext = String::from("extendedKeyUsage=clientAuth\n");
        if let Some(san) = san {
            ext.push_str(&format!("subjectAltName={san}\n"));
        }
        self.issue(name, &format!("/CN={name}"), &ext);
        let d = self.dir.path();
        let out = d.join(format!("client-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(d.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
        std::fs::copy(
            d.join(format!("{name}-cert.pem")),
            out.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(
            d.join(format!("{name}-key.pem")),
            out.join("client-key.pem"),
        )
        .unwrap();
        out
    }

    pub fn tls_config(&self) -> TlsConfig {
        let d = self.dir.path();
        TlsConfig::from_pem_files(
            d.join("server-cert.pem"),
            d.join("server-key.pem"),
            d.join("ca-cert.pem"),
        )
        .unwrap()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}
