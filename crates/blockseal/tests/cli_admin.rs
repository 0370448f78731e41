//! `blockseal tenant ...` and `blockseal volume ...` run as real processes on a
//! store no server runs: output, exit codes and refusals, with `--data-dir` and
//! with `--config`. (`tests/tests/admin.rs` runs them against a server too.)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn blockseal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockseal"))
        .args(args)
        .env_remove("BLOCKSEAL_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = blockseal(args);
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Fails with exit code 1 (a refused request) and `message` on stderr.
#[track_caller]
fn fails(args: &[&str], message: &str) {
    fails_with(1, args, message);
}

/// Fails with `code` (2: the command line does not parse) and `message` on stderr.
#[track_caller]
fn fails_with(code: i32, args: &[&str], message: &str) {
    let out = blockseal(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: {}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(message),
        "{args:?}: stderr {stderr:?} lacks {message:?}"
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A store directory with a master key file in it, as `key init` makes one.
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(&["key", "init", "--out", p(&dir.path().join("master.key"))]);
    dir
}

#[test]
fn tenants_and_volumes_round_trip() {
    let dir = data_dir();
    let d = p(dir.path());
    let out = ok(&["tenant", "create", "acme", "--data-dir", d]);
    assert!(out.contains("created tenant acme"), "{out}");
    ok(&["tenant", "create", "globex", "--data-dir", d]);
    let out = ok(&["tenant", "list", "--data-dir", d]);
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["acme", "globex"], "{out}");

    let out = ok(&[
        "volume",
        "create",
        "acme/disk",
        "--size",
        "10M",
        "--data-dir",
        d,
    ]);
    assert!(
        out.contains("acme/disk: 10M (10485760 bytes), 4096-byte blocks"),
        "{out}"
    );
    ok(&[
        "volume",
        "create",
        "acme/small",
        "--size",
        "65536",
        "--block-size",
        "512",
        "--data-dir",
        d,
    ]);
    ok(&[
        "volume",
        "create",
        "globex/big",
        "--size",
        "2G",
        "--data-dir",
        d,
    ]);

    let out = ok(&["volume", "list", "--data-dir", d]);
    assert!(out.starts_with("VOLUME"), "{out}");
    for (name, size, bytes, block) in [
        ("acme/disk", "10M", "10485760", "4096"),
        ("acme/small", "64K", "65536", "512"),
        ("globex/big", "2G", "2147483648", "4096"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[..4], [name, size, bytes, block], "{line}");
    }
    let out = ok(&["volume", "list", "acme", "--data-dir", d]);
    assert!(
        out.contains("acme/disk") && !out.contains("globex"),
        "{out}"
    );
}

#[test]
fn refusals_are_readable() {
    let dir = data_dir();
    let d = p(dir.path());
    fails(
        &["tenant", "list", "--data-dir", d],
        "holds no blockseal store",
    );
    ok(&["tenant", "create", "acme", "--data-dir", d]);
    fails_with(
        4,
        &["tenant", "create", "acme", "--data-dir", d],
        "tenant acme already exists",
    );
    fails_with(
        2,
        &["tenant", "create", "Acme", "--data-dir", d],
        "tenant name \"Acme\"",
    );
    fails_with(
        3,
        &[
            "volume",
            "create",
            "nobody/disk",
            "--size",
            "1M",
            "--data-dir",
            d,
        ],
        "no tenant nobody",
    );
    fails_with(
        2,
        &["volume", "create", "acme", "--size", "1M", "--data-dir", d],
        "TENANT/VOLUME",
    );
    fails_with(
        2,
        &[
            "volume",
            "create",
            "acme/Disk",
            "--size",
            "1M",
            "--data-dir",
            d,
        ],
        "volume name \"Disk\"",
    );
    fails_with(
        2,
        &[
            "volume",
            "create",
            "acme/disk",
            "--size",
            "1.5G",
            "--data-dir",
            d,
        ],
        "1.5G",
    );
    fails_with(
        2,
        &[
            "volume",
            "create",
            "acme/disk",
            "--size",
            "5000",
            "--data-dir",
            d,
        ],
        "not a positive multiple of the block size",
    );
    fails_with(
        2,
        &[
            "volume",
            "create",
            "acme/disk",
            "--size",
            "1M",
            "--block-size",
            "1000",
            "--data-dir",
            d,
        ],
        "block size 1000 is not a power of two",
    );
    ok(&[
        "volume",
        "create",
        "acme/disk",
        "--size",
        "1M",
        "--data-dir",
        d,
    ]);
    fails_with(
        4,
        &[
            "volume",
            "create",
            "acme/disk",
            "--size",
            "1M",
            "--data-dir",
            d,
        ],
        "volume acme/disk already exists",
    );
    fails_with(
        3,
        &["volume", "list", "nobody", "--data-dir", d],
        "no tenant nobody",
    );
    // Snapshots: a bad TENANT/VOLUME@NAME is a usage error, saying why.
    for (args, message) in [
        (&["snapshot", "create", "acme@s"][..], "names no volume"),
        (&["snapshot", "show", "acme/disk"][..], "names no snapshot"),
        (
            &["snapshot", "delete", "acme/disk@"][..],
            "snapshot name \"\"",
        ),
        (
            &["snapshot", "rollback", "acme/disk@Nightly"][..],
            "snapshot name \"Nightly\"",
        ),
        (
            &["snapshot", "list", "acme/disk@s"][..],
            "takes TENANT/VOLUME",
        ),
        (&["snapshot", "list", "acme"][..], "TENANT/VOLUME"),
    ] {
        fails_with(2, &[args, &["--data-dir", d]].concat(), message);
    }
    fails_with(
        3,
        &["snapshot", "show", "acme/disk@nightly", "--data-dir", d],
        "no snapshot acme/disk@nightly",
    );
    ok(&["snapshot", "create", "acme/disk@nightly", "--data-dir", d]);
    fails_with(
        4,
        &["snapshot", "create", "acme/disk@nightly", "--data-dir", d],
        "snapshot acme/disk@nightly already exists",
    );
    ok(&["snapshot", "create", "acme/disk@later", "--data-dir", d]);
    fails_with(
        4,
        &["snapshot", "rollback", "acme/disk@nightly", "--data-dir", d],
        "newer snapshots exist (later)",
    );

    let empty = tempfile::tempdir().unwrap();
    fails(
        &["tenant", "create", "acme", "--data-dir", p(empty.path())],
        "no master key file",
    );
    let other = data_dir();
    fails(
        &[
            "tenant",
            "list",
            "--data-dir",
            d,
            "--master-key",
            p(&other.path().join("master.key")),
        ],
        "cannot open the store",
    );
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[master_key]\nfile = \"master.key\"\n[unix]\npath = \"nbd.sock\"\n{extra}"
        ),
    )
    .unwrap();
    config
}

#[test]
fn config_file_names_store_and_key() {
    let dir = tempfile::tempdir().unwrap();
    ok(&["key", "init", "--out", p(&dir.path().join("master.key"))]);
    let config = write_config(dir.path(), "");
    let c = p(&config);
    ok(&["tenant", "create", "acme", "--config", c]);
    ok(&[
        "volume",
        "create",
        "acme/disk",
        "--size",
        "4M",
        "--config",
        c,
    ]);
    assert!(dir.path().join("data/FORMAT").exists());
    assert!(ok(&["volume", "list", "--config", c]).contains("acme/disk"));

    let bad = write_config(dir.path(), "colour = \"blue\"\n");
    fails(&["tenant", "list", "--config", p(&bad)], "colour");
    fails(&["tenant", "list", "--config", p(&bad)], "blockseal.toml");
    fails(
        &[
            "tenant",
            "list",
            "--config",
            p(&dir.path().join("missing.toml")),
        ],
        "cannot read config file",
    );
    // --config and --data-dir contradict each other.
    let out = blockseal(&["tenant", "list", "--config", c, "--data-dir", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// A running `blockseal serve`, stopped with SIGTERM on drop.
struct Server(Child);

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockseal"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        for line in stdout.lines() {
            if line.unwrap().starts_with("ready ") {
                return Server(child);
            }
        }
        panic!("the server exited before it was ready: {:?}", child.wait());
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.0.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().unwrap().is_none() {
            self.stop();
        }
    }
}

#[test]
fn a_running_server_answers_admin_commands_and_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = p(&data);
    let mut server = Server::start(&["--data-dir", d, "--demo-size", "1M"]);
    // Admin commands go through the server's admin socket.
    let out = ok(&["volume", "list", "--data-dir", d]);
    assert!(out.contains("demo/disk"), "{out}");
    // Maintenance that needs the store itself is refused while it serves.
    fails(
        &[
            "store",
            "accept-metadata-loss",
            "--yes-i-understand",
            "--data-dir",
            d,
        ],
        "a running `blockseal serve`",
    );
    assert!(server.stop().success());
    // After a graceful stop the store opens again and holds the demo volume.
    let out = ok(&["volume", "list", "--data-dir", d]);
    assert!(out.contains("demo/disk"), "{out}");
    assert!(!data.join("nbd.sock").exists());
    assert!(!data.join("admin.sock").exists());
}

#[test]
fn serve_refuses_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    ok(&["key", "init", "--out", p(&dir.path().join("master.key"))]);
    let bad = write_config(dir.path(), "[tcp]\naddress = \"0.0.0.0:0\"\n");
    fails(&["serve", "--config", p(&bad)], "tcp.insecure_plain_tcp");
    let bad = write_config(
        dir.path(),
        "[tcp]\naddress = \"127.0.0.1:0\"\n[tcp.tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n",
    );
    fails(&["serve", "--config", p(&bad)], "tcp.tls");
    let bad = write_config(dir.path(), "[unix]\nmode = 1\n");
    fails(&["serve", "--config", p(&bad)], "unix");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "meta.lock" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn metadata_that_went_back_in_time_is_refused_with_the_recovery_command() {
    let dir = data_dir();
    let d = p(dir.path());
    ok(&["tenant", "create", "acme", "--data-dir", d]);
    let old = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("meta"), old.path());
    ok(&["tenant", "create", "globex", "--data-dir", d]);
    std::fs::remove_dir_all(dir.path().join("meta")).unwrap();
    copy_dir(old.path(), &dir.path().join("meta"));

    fails(&["tenant", "list", "--data-dir", d], "went back in time");
    fails(
        &["tenant", "list", "--data-dir", d],
        "blockseal store accept-metadata-loss --data-dir",
    );
    // The flag is required.
    fails_with(
        2,
        &["store", "accept-metadata-loss", "--data-dir", d],
        "--yes-i-understand",
    );
    let out = ok(&[
        "store",
        "accept-metadata-loss",
        "--data-dir",
        d,
        "--yes-i-understand",
    ]);
    // The tenant's creation and the two audit entries around it.
    assert!(out.contains("3 commits lost"), "{out}");
    let out = ok(&["tenant", "list", "--data-dir", d]);
    assert!(out.contains("acme") && !out.contains("globex"), "{out}");
    // The recovery is in the audit log, whose chain still holds.
    let audit = ok(&["audit", "--data-dir", d]);
    assert!(audit.contains("store.accept-metadata-loss"), "{audit}");
    ok(&["audit", "verify", "--data-dir", d]);
}

#[test]
fn a_store_open_to_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = data_dir();
    let d = p(dir.path());
    ok(&["tenant", "create", "acme", "--data-dir", d]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = blockseal(&["tenant", "list", "--data-dir", d]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("open to group or others"), "{stderr}");
    assert!(stderr.contains("chmod 0700"), "{stderr}");
}
