//! The real Linux kernel NBD client. `scripts/kernel-client-test.sh` boots
//! Debian's own kernel under QEMU software emulation, with an initramfs of
//! Debian's nbd module, nbd-client, e2fsprogs, socat and busybox; the guest
//! has no network, and its nbd-client reaches the server's Unix socket
//! through virtio-serial ports, one per connection.
//!
//! A configured host with a tenant and two volumes: `acme/disk` over one
//! connection and `acme/multi` over four (`nbd-client -C 4`, four ports). In
//! the guest, each is formatted with mkfs.ext4, mounted, written, synced,
//! unmounted, remounted after the caches are dropped, verified, trimmed,
//! checked with `e2fsck -fn` and disconnected.
//! From the host, each is then copied with nbdcopy, checked with the host's
//! e2fsck, and the files read with debugfs must have the checksums the guest
//! printed. The server saw qemu's one connection to `acme/disk` and four to
//! `acme/multi`, and stops cleanly.
//!
//! The first run downloads the packages (about 75 MB) and builds the kernel
//! and initramfs into `<target dir>/kernel-client-cache`; later runs reuse
//! them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blockseal_test_support::{path_str, require_all, temp_dir};
use blockseal_tests::{ServerProcess, StoreArg, binary, cli_on_ok, configure_host};

/// The cold run downloads and builds; a warm one boots in well under this.
const DEADLINE: Duration = Duration::from_secs(1200);

/// The script, in its own process group so that qemu goes with it.
struct Script {
    child: Option<Child>,
}

impl Script {
    fn spawn(cmd: &mut Command) -> Script {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Script { child: Some(child) }
    }

    /// Waits for the script to exit; kills its process group past `limit`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("the script runs");
        loop {
            if let Some(status) = child.try_wait().expect("cannot wait for the script") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The target directory this test was built in (`<target>/<profile>/blockseal`).
fn target_dir() -> PathBuf {
    binary()
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in <target>/<profile>")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn kernel_nbd_client_formats_mounts_and_verifies_exports_over_one_and_four_connections() {
    require_all(&[
        "qemu-system-x86_64",
        "apt-get",
        "apt-cache",
        "dpkg-deb",
        "ldd",
        "nbdinfo",
        "nbdcopy",
        "e2fsck",
        "debugfs",
    ]);
    assert!(
        Path::new("/usr/share/qemu/qboot.rom").is_file(),
        "qboot is required by this test (qemu-system-x86 from bookworm-backports; \
         scripts/install-deps.sh installs it)"
    );
    let tmp = temp_dir();
    let host = tmp.path().join("host");
    let config = configure_host(&host, None);
    // qemu opens every connection when it starts; those of acme/multi wait
    // in the handshake while the guest boots and works on acme/disk.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[limits]\nhandshake_timeout_secs = 600\n");
    std::fs::write(&config, text).unwrap();
    let store = StoreArg::Config(&config);
    cli_on_ok(store, &["tenant", "create", "acme"]);
    cli_on_ok(store, &["volume", "create", "acme/disk", "--size", "128M"]);
    cli_on_ok(store, &["volume", "create", "acme/multi", "--size", "128M"]);
    let mut server =
        ServerProcess::with_config_and_log(&host, &config, "info,blockseal_nbd::server=debug");
    let socket = server.socket.clone().expect("the server has a Unix socket");

    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let stdout_path = work.join("script.out");
    let stderr_path = work.join("script.err");
    let script_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kernel-client-test.sh");
    let started = Instant::now();
    let mut script = Script::spawn(
        Command::new("bash")
            .arg(&script_path)
            .args(["--socket", path_str(&socket)])
            .args(["--export", "acme/disk", "--export", "acme/multi:4"])
            .args([
                "--cache",
                path_str(&target_dir().join("kernel-client-cache")),
            ])
            .args(["--work", path_str(&work)])
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap()),
    );
    let status = script.wait(DEADLINE);
    let stdout = read(&stdout_path);
    let stderr = read(&stderr_path);
    let console = read(&work.join("console.log"));
    let report = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nconsole (tail):\n{}",
        tail(&stderr, 40),
        tail(&console, 60)
    );
    let status = status.unwrap_or_else(|| {
        panic!("the script did not finish within {DEADLINE:?}; killed\n{report}")
    });
    assert!(status.success(), "the script failed: {status}\n{report}");
    eprintln!(
        "kernel client run took {:.1} s\n{stdout}",
        started.elapsed().as_secs_f64()
    );

    // The guest's verdicts, on its console. One guest CPU: the kernel gives
    // acme/multi one hardware queue, so its first connection carries the
    // requests and the other three their handshakes (see the script's
    // header for why the guest has one CPU).
    for (index, export, connections) in [(0, "acme/disk", 1), (1, "acme/multi", 4)] {
        let pass = format!("kernel-client: PASS export={export} connections={connections} ");
        assert!(console.contains(&pass), "no {pass:?}\n{report}");
        let connected = format!(
            "kernel-client: connected export={export} device=/dev/nbd{index} \
             bytes=134217728 connections={connections} queues=1 "
        );
        assert!(console.contains(&connected), "no {connected:?}\n{report}");
        let host_pass = format!("kernel-client: host PASS export={export} bytes=134217728 ");
        assert!(stdout.contains(&host_pass), "no {host_pass:?}\n{report}");
        let carried: Vec<u64> = console
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "kernel-client: carried export={export} bytes-per-connection="
                ))
            })
            .unwrap_or_else(|| panic!("no byte counts for {export}\n{report}"))
            .split(',')
            .map(|b| b.parse().expect("a byte count"))
            .collect();
        assert_eq!(carried.len(), connections, "{export}: {carried:?}");
        assert!(carried[0] >= 16 << 20, "{export}: {carried:?}");
        assert!(carried.iter().all(|&b| b > 0), "{export}: {carried:?}");
    }
    assert!(
        console.contains("kernel-client: ALL PASS\n"),
        "no ALL PASS\n{report}"
    );

    // The server side: qemu opened the first five connections the server
    // accepted (before the host's checks opened theirs): one to acme/disk,
    // four to acme/multi.
    let log = server.log();
    let conn_id = |line: &str| {
        line.split("conn=")
            .nth(1)
            .and_then(|rest| rest.split([' ', '}']).next())
            .map(str::to_owned)
    };
    let qemu: Vec<String> = log
        .lines()
        .filter(|l| l.contains("connection accepted"))
        .filter_map(conn_id)
        .take(5)
        .collect();
    assert_eq!(qemu.len(), 5, "{}", tail(&log, 40));
    let attached = |export: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("export attached export={export} ")))
            .filter_map(conn_id)
            .filter(|id| qemu.contains(id))
            .count()
    };
    assert_eq!(attached("acme/disk"), 1, "{}", tail(&log, 40));
    assert_eq!(attached("acme/multi"), 4, "{}", tail(&log, 40));
    server.stop();
}
