//! The end-to-end harness: runs the real `blockseal serve` binary on a temporary
//! data directory and socket, waits on its readiness line (never a sleep), and
//! stops it on drop; plus small helpers the suites share. Peer tools (which
//! fail a test when missing, never skip it), the test PKI and the raw protocol
//! client come from `blockseal-test-support`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use blockseal_test_support::run_ok;
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

/// Which store a CLI command works on.
#[derive(Clone, Copy, Debug)]
pub enum StoreArg<'a> {
    /// `--data-dir DIR`.
    DataDir(&'a Path),
    /// `--config FILE`, run in the file's directory (paths in it are relative).
    Config(&'a Path),
}

/// The lossy UTF-8 text of a command's output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `blockseal ARGS` on `store` (through the server's admin socket when one
/// runs there).
pub fn cli_on(store: StoreArg<'_>, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    match store {
        StoreArg::DataDir(dir) => {
            cmd.arg("--data-dir").arg(dir);
        }
        StoreArg::Config(file) => {
            cmd.arg("--config").arg(file);
            if let Some(dir) = file.parent() {
                cmd.current_dir(dir);
            }
        }
    }
    blockseal_test_support::run(&mut cmd)
}

/// [`cli_on`] that must succeed; returns stdout.
#[track_caller]
pub fn cli_on_ok(store: StoreArg<'_>, args: &[&str]) -> String {
    succeeded(cli_on(store, args), args)
}

/// [`cli_on`] that must fail with exit `code` and an `error: ` line; returns
/// stderr.
#[track_caller]
pub fn cli_on_fails(store: StoreArg<'_>, code: i32, args: &[&str]) -> String {
    failed(cli_on(store, args), code, args)
}

/// The stdout of a `blockseal ARGS` run that must have succeeded.
#[track_caller]
pub fn succeeded(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "{args:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The stderr of a `blockseal ARGS` run that must have failed with exit
/// `code` and an `error: ` line.
#[track_caller]
pub fn failed(out: Output, code: i32, args: &[&str]) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    stderr
}

/// A running `blockseal serve`. Dropping it stops the server with SIGTERM.
pub struct ServerProcess {
    child: Option<Child>,
    /// Kept open so that the server's stdout never turns into a broken pipe.
    _stdout: Option<BufReader<ChildStdout>>,
    args: Vec<OsString>,
    /// `BLOCKSEAL_LOG` for the server.
    log_filter: String,
    /// More environment variables for the server.
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    /// The server's Unix socket, from its readiness line.
    pub socket: Option<PathBuf>,
    /// The server's TCP address, from its readiness line.
    pub tcp: Option<SocketAddr>,
    /// The admin API's TCP address, from its readiness line.
    pub admin_tcp: Option<SocketAddr>,
    /// The metrics address from the readiness line, when configured.
    pub metrics: Option<SocketAddr>,
    /// The temporary directory holding data, socket and log (unless the caller
    /// gave its own).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// The embedded default on a fresh temporary directory: export `demo/disk`
    /// of `demo_size` (e.g. `"64M"`), on `<tmp>/nbd.sock`.
    pub fn demo(demo_size: &str) -> ServerProcess {
        ServerProcess::demo_with_log(demo_size, &default_log_filter())
    }

    /// [`ServerProcess::demo`] with `BLOCKSEAL_LOG` set to `filter`, for tests
    /// that wait on what the server logs.
    pub fn demo_with_log(demo_size: &str, filter: &str) -> ServerProcess {
        ServerProcess::demo_with_args(demo_size, &[], filter)
    }

    /// [`ServerProcess::demo_with_log`] with more arguments for `serve`
    /// (such as `--otlp-endpoint URL`).
    pub fn demo_with_args(demo_size: &str, extra: &[&str], filter: &str) -> ServerProcess {
        let tmp = tempfile::tempdir().expect("cannot create a temporary directory");
        let dir = tmp.path().to_path_buf();
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.join("data").into(),
            "--unix".into(),
            dir.join("nbd.sock").into(),
            "--demo-size".into(),
            demo_size.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        ServerProcess::start_in(dir, Some(tmp), args, filter.to_owned())
    }

    /// `blockseal serve --config CONFIG`; the log goes to `dir`.
    pub fn with_config(dir: &Path, config: &Path) -> ServerProcess {
        ServerProcess::with_config_and_log(dir, config, &default_log_filter())
    }

    /// [`ServerProcess::with_config`] with more environment variables for
    /// the server (such as `BLOCKSEAL_TEST_CLOCK=1`).
    pub fn with_config_and_env(dir: &Path, config: &Path, env: &[(&str, &str)]) -> ServerProcess {
        let args = vec!["serve".into(), "--config".into(), config.into()];
        let mut server = ServerProcess::new_in(dir.to_path_buf(), None, args, default_log_filter());
        server.env = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
        server.spawn();
        server
    }

    /// [`ServerProcess::with_config`] with `BLOCKSEAL_LOG` set to `filter`,
    /// for tests that wait on what the server logs.
    pub fn with_config_and_log(dir: &Path, config: &Path, filter: &str) -> ServerProcess {
        let args = vec!["serve".into(), "--config".into(), config.into()];
        ServerProcess::start_in(dir.to_path_buf(), None, args, filter.to_owned())
    }

    fn start_in(
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        args: Vec<OsString>,
        log_filter: String,
    ) -> Self {
        let mut server = ServerProcess::new_in(dir, tmp, args, log_filter);
        server.spawn();
        server
    }

    fn new_in(
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        args: Vec<OsString>,
        log_filter: String,
    ) -> Self {
        ServerProcess {
            child: None,
            _stdout: None,
            args,
            log_filter,
            env: Vec::new(),
            log: dir.join("server.log"),
            socket: None,
            tcp: None,
            admin_tcp: None,
            metrics: None,
            dir,
            _tmp: tmp,
        }
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

    /// Waits until the server has logged `message` `times` times in all.
    #[track_caller]
    pub fn wait_for_log(&self, message: &str, times: usize, limit: Duration) {
        blockseal_test_support::wait_until(
            &format!("the server to log {message:?} {times} time(s)"),
            limit,
            || self.log().matches(message).count() >= times,
        );
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
            .env("BLOCKSEAL_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
                    } else if let Some(addr) = field.strip_prefix("admin_tcp=") {
                        self.admin_tcp = Some(addr.parse().expect("admin_tcp= holds IP:PORT"));
                    } else if let Some(addr) = field.strip_prefix("metrics=") {
                        self.metrics = Some(addr.parse().expect("metrics= holds IP:PORT"));
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

/// The server's log filter: the test's own `BLOCKSEAL_LOG`, or `info`.
fn default_log_filter() -> String {
    std::env::var("BLOCKSEAL_LOG").unwrap_or_else(|_| "info".into())
}

fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status();
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

/// A host directory (created) with a configuration file: Unix socket
/// `nbd.sock`, store `data/`, key `master.key`. The key is generated, or
/// copied from `key` (a second host with the same master key).
pub fn configure_host(dir: &Path, key: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("cannot create the host directory");
    let key_file = dir.join("master.key");
    match key {
        Some(from) => {
            std::fs::copy(from, &key_file).expect("cannot copy the master key");
        }
        None => {
            blockseal_ok(&["key", "init", "--out", &key_file.to_string_lossy()]);
        }
    }
    let config = dir.join("blockseal.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n\n[master_key]\nfile = \"master.key\"\n\n[unix]\npath = \"nbd.sock\"\n",
    )
    .expect("cannot write the configuration");
    config
}

/// Creates each of `tenants` on `store` with one volume, `TENANT/disk`, of
/// `size` (such as `"64M"`).
pub fn tenants_with_disks(store: StoreArg<'_>, tenants: &[&str], size: &str) {
    for tenant in tenants {
        cli_on_ok(store, &["tenant", "create", tenant]);
        cli_on_ok(
            store,
            &[
                "volume",
                "create",
                &format!("{tenant}/disk"),
                "--size",
                size,
            ],
        );
    }
}

/// The key id `blockseal key inspect` shows for a key file.
pub fn key_id(file: &Path) -> String {
    let out = blockseal_ok(&["key", "inspect", &file.to_string_lossy()]);
    out.lines()
        .find_map(|l| l.strip_prefix("key id:"))
        .expect("key inspect shows the key id")
        .trim()
        .to_owned()
}

/// Runs qemu-io with `options` (`-r` for a read-only snapshot export) and
/// `commands` on `uri`; fails unless every command worked (qemu-io exits 0
/// on a failed command or a pattern mismatch). Returns its output.
#[track_caller]
pub fn qemu_io_with(options: &[&str], uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(options).args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io {commands:?} on {uri}:\n{out}"
    );
    out
}

/// [`qemu_io_with`] without options.
#[track_caller]
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    qemu_io_with(&[], uri, commands)
}

/// `qemu-img compare` of two raw images (files or NBD URIs): whether they
/// hold the same bytes (exit 0) or not (exit 1; anything else fails).
#[track_caller]
pub fn same_contents(a: impl AsRef<std::ffi::OsStr>, b: impl AsRef<std::ffi::OsStr>) -> bool {
    let (a, b) = (a.as_ref(), b.as_ref());
    let out = blockseal_test_support::run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
    );
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {} failed: {}\n{}",
            a.to_string_lossy(),
            b.to_string_lossy(),
            text(&out.stdout),
            text(&out.stderr)
        ),
    }
}

/// fio (nbd engine) on `uri` with `args` (each `--name=value`), run in
/// `dir` (fio leaves state files in its working directory); its JSON report.
pub fn fio_json(dir: &Path, uri: &str, args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new("fio")
            .current_dir(dir)
            .args([
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--output-format=json",
            ])
            .args(args),
    );
    // fio may print notes before the JSON document.
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("fio printed no JSON: {out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("fio's JSON: {e}\n{out}"))
}

/// Completed I/Os per second of `direction` (`read` or `write`) of the first
/// job of a [`fio_json`] report: its total over its run time.
pub fn fio_iops(report: &serde_json::Value, direction: &str) -> f64 {
    let d = &report["jobs"][0][direction];
    let ios = d["total_ios"].as_f64().expect("fio reports total_ios");
    let ms = d["runtime"].as_f64().expect("fio reports runtime");
    assert!(ms > 0.0, "fio ran no {direction}s: {report}");
    ios / (ms / 1000.0)
}

/// A completion-latency percentile of `direction` of the first job of a
/// [`fio_json`] report (such as `"99.000000"`), in microseconds.
pub fn fio_clat_us(report: &serde_json::Value, direction: &str, percentile: &str) -> f64 {
    report["jobs"][0][direction]["clat_ns"]["percentile"][percentile]
        .as_f64()
        .unwrap_or_else(|| panic!("fio reports no {direction} clat percentile {percentile}"))
        / 1000.0
}
