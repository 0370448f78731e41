//! A local S3 server for tests: moto (`moto[server]` from PyPI, which
//! `scripts/install-deps.sh` installs), started once per test binary on
//! loopback and stopped when the binary exits.
//!
//! moto runs behind a small Python wrapper that exits as soon as its stdin
//! closes; the test binary holds the other end of that pipe for its whole life,
//! so the server goes with it however the binary ends (even `kill -9`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The bucket every test of a binary shares (each under a prefix of its own).
pub const BUCKET: &str = "blockseal-test";
/// The access key id and secret key moto accepts (any will do).
pub const CREDENTIAL: &str = "testing";
/// The region the clients name.
pub const REGION: &str = "us-east-1";

const WRAPPER: &str = r#"
import os, sys, threading
def watch():
    sys.stdin.buffer.read()
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"#;

/// A running moto server.
pub struct Moto {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    // Held until the binary exits: closing it stops the server.
    _child: Mutex<(Child, ChildStdin)>,
}

/// The binary's moto server, started on first use with [`BUCKET`] created.
///
/// Fails the calling test, saying what to install, when moto is missing: a
/// test that needs it never passes without it.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(start)
}

fn start() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let python = std::env::var("BLOCKSEAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(&python)
        .args(["-c", "import moto.server, flask"])
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; install Python 3"));
    assert!(
        check.status.success(),
        "moto's S3 server is missing ({}); install it with scripts/install-deps.sh \
         (pip install 'moto[server]')",
        String::from_utf8_lossy(&check.stderr).trim()
    );
    let mut child = Command::new(&python)
        .args(["-c", WRAPPER, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start moto: {e}"));
    let stdin = child.stdin.take().expect("stdin is piped");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().expect("cannot wait for moto") {
            panic!("moto exited before it listened: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "moto did not listen on port {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let moto = Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        port,
        _child: Mutex::new((child, stdin)),
    };
    moto.create_bucket(BUCKET);
    moto
}

impl Moto {
    /// Creates a bucket (moto checks no signature on this call).
    pub fn create_bucket(&self, bucket: &str) {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).expect("cannot connect to moto");
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )
        .expect("cannot send to moto");
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .expect("cannot read moto's reply");
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "creating bucket {bucket} failed: {reply}"
        );
    }
}

/// A key prefix no other test of this process uses.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
