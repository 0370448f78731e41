//! Running under systemd: the server tells the service manager when it is
//! ready and when it stops (`sd_notify` over `NOTIFY_SOCKET`, as `Type=notify`
//! expects), and the packaged unit passes `systemd-analyze verify` and keeps
//! the hardening its comments promise (`systemd-analyze security --offline`).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use blockseal_test_support::{require, run, temp_dir};
use blockseal_tests::{ServerProcess, StoreArg, binary, cli_on_ok, configure_host, text};

/// The next datagram on `socket`, as text (waits at most 30 s).
fn next_state(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("the server sent no state to NOTIFY_SOCKET");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_server_tells_the_service_manager_it_is_ready_and_stopping() {
    let tmp = temp_dir();
    let host = tmp.path().join("host");
    let config = configure_host(&host, None);
    cli_on_ok(StoreArg::Config(&config), &["tenant", "create", "acme"]);
    let notify = tmp.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    let mut server = ServerProcess::with_config_and_env(
        &host,
        &config,
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    // The readiness line has been read: the datagram was sent before it.
    let ready = next_state(&manager);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    server.stop();
    let stopping = next_state(&manager);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}

/// The packaged unit with `ExecStart` pointing at the binary under test (the
/// packaged path, /usr/bin/blockseal, is not there on a build machine).
fn unit_under_test(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = include_str!("../../packaging/blockseal.service");
    assert!(
        unit.contains("ExecStart=/usr/bin/blockseal serve --config /etc/blockseal/blockseal.toml")
    );
    let unit = unit.replace("/usr/bin/blockseal", &binary().to_string_lossy());
    let path = dir.join("blockseal.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn the_packaged_unit_verifies_and_is_hardened() {
    require("systemd-analyze");
    let tmp = temp_dir();
    let unit = unit_under_test(tmp.path());
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit));
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "systemd-analyze verify: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let report = text(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for blockseal.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}\n{}", text(&out.stderr)));
    // 0 is fully locked down, 10 not at all; 2 is systemd's "OK" band's top.
    assert!(exposure <= 2.0, "exposure {exposure}:\n{report}");
    for directive in [
        "Type=notify",
        "User=blockseal",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitCORE=0",
        "LimitNOFILE=",
        "KillSignal=SIGTERM",
    ] {
        assert!(
            std::fs::read_to_string(&unit).unwrap().contains(directive),
            "{directive} missing"
        );
    }
}

#[test]
fn manual_pages_cover_every_command_and_render() {
    require("man");
    let tmp = temp_dir();
    let dir = tmp.path().join("man1");
    let out = run(Command::new(binary()).args(["manpages", "--out"]).arg(&dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "blockseal.1",
        "blockseal-serve.1",
        "blockseal-volume-create.1",
        "blockseal-snapshot-rollback.1",
        "blockseal-backup-create.1",
        "blockseal-restore.1",
        "blockseal-store-rebuild.1",
        "blockseal-key-rotate-master.1",
        "blockseal-retention-status.1",
    ] {
        assert!(dir.join(page).is_file(), "{page} missing");
    }
    let rendered = run(Command::new("man")
        .env("MANWIDTH", "100")
        .args(["-P", "cat", "-l"])
        .arg(dir.join("blockseal-serve.1")));
    assert!(rendered.status.success(), "{}", text(&rendered.stderr));
    // Bold and underline come as overstrikes (`X\bX`, `_\bX`): keep the
    // last character of each.
    let mut page = String::new();
    for c in text(&rendered.stdout).chars() {
        if c == '\u{8}' {
            page.pop();
        } else {
            page.push(c);
        }
    }
    for section in ["NAME", "SYNOPSIS", "--metrics-address", "--config"] {
        assert!(page.contains(section), "{section} not in:\n{page}");
    }
}
