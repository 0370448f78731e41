//! `blockseal key ...` run as a real process: output, exit codes and refusals.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The cheapest Argon2id parameters accepted, so that tests do not spend 64 MiB
/// and three passes.
const CHEAP: [&str; 4] = ["--argon2-memory-kib", "47104", "--argon2-iterations", "1"];

fn blockseal(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockseal"));
    cmd.args(args).env_remove("BLOCKSEAL_TEST_PASS");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

#[track_caller]
fn assert_fails(out: &Output, code: i32, stderr_text: &str) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
    assert!(
        stderr(out).contains(stderr_text),
        "stderr {:?} lacks {stderr_text:?}",
        stderr(out)
    );
}

/// The value after `label` in `key:   value` output.
fn field(output: &str, label: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in {output}"))
        .trim()
        .to_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn help_and_version() {
    let out = run(&mut blockseal(&["--help"]));
    assert_ok(&out);
    assert!(stdout(&out).contains("key"), "{}", stdout(&out));
    let out = run(&mut blockseal(&["--version"]));
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!("blockseal {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&mut blockseal(&["key", "init", "--help"]));
    assert_ok(&out);
    assert!(stdout(&out).contains("--passphrase-fd"));
}

#[test]
fn init_then_inspect_a_plain_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let out = run(&mut blockseal(&["key", "init", "--out", p(&path)]));
    assert_ok(&out);
    let id = field(&stdout(&out), "key id:");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(field(&stdout(&out), "protection:"), "none");
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = run(&mut blockseal(&["key", "inspect", p(&path)]));
    assert_ok(&out);
    let text = stdout(&out);
    assert_eq!(field(&text, "key id:"), id);
    assert_eq!(field(&text, "protection:"), "none");
    assert_eq!(field(&text, "mode:"), "0600");
    let created = field(&text, "created:");
    // RFC 3339 UTC: 2026-01-02T03:04:05Z
    assert_eq!(created.len(), 20, "{created}");
    assert_eq!(&created[4..5], "-");
    assert_eq!(&created[10..11], "T");
    assert!(created.ends_with('Z'));

    let out = run(&mut blockseal(&["key", "check", p(&path)]));
    assert_ok(&out);
    assert_eq!(field(&stdout(&out), "key id:"), id);

    // The key itself is never printed: no 64-hex-digit run appears anywhere.
    let key_hex: String = fs::read(&path).unwrap()[36..68]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!text.contains(&key_hex));
}

#[test]
fn init_with_a_passphrase_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let mut init = blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    init.args(CHEAP).env("BLOCKSEAL_TEST_PASS", "open sesame");
    let out = run(&mut init);
    assert_ok(&out);
    let id = field(&stdout(&out), "key id:");
    assert_eq!(
        field(&stdout(&out), "protection:"),
        "passphrase (Argon2id, m=47104 KiB, t=1, p=1)"
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    let out = run(&mut blockseal(&["key", "inspect", p(&path)]));
    assert_ok(&out);
    assert_eq!(field(&stdout(&out), "key id:"), id);
    assert_eq!(
        field(&stdout(&out), "protection:"),
        "passphrase (Argon2id, m=47104 KiB, t=1, p=1)"
    );

    let mut check = blockseal(&[
        "key",
        "check",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    check.env("BLOCKSEAL_TEST_PASS", "open sesame");
    let out = run(&mut check);
    assert_ok(&out);
    assert_eq!(field(&stdout(&out), "key id:"), id);

    let mut wrong = blockseal(&[
        "key",
        "check",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    wrong.env("BLOCKSEAL_TEST_PASS", "open sesame!");
    assert_fails(
        &run(&mut wrong),
        1,
        &format!("error: wrong passphrase for key file {}\n", p(&path)),
    );

    assert_fails(
        &run(&mut blockseal(&["key", "check", p(&path)])),
        1,
        &format!(
            "error: key file {} is protected by a passphrase, but none was given",
            p(&path)
        ),
    );
}

#[test]
fn passphrase_from_a_file_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let mut init = blockseal(&["key", "init", "--out", p(&path), "--passphrase-fd", "0"]);
    init.args(CHEAP);
    let out = run_with_stdin(&mut init, b"from a pipe\n");
    assert_ok(&out);

    // The trailing newline was dropped: the same text from the environment opens it.
    let mut check = blockseal(&[
        "key",
        "check",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    check.env("BLOCKSEAL_TEST_PASS", "from a pipe");
    assert_ok(&run(&mut check));

    let mut check = blockseal(&["key", "check", p(&path), "--passphrase-fd", "0"]);
    assert_ok(&run_with_stdin(&mut check, b"from a pipe"));
    let mut check = blockseal(&["key", "check", p(&path), "--passphrase-fd", "0"]);
    assert_fails(
        &run_with_stdin(&mut check, b"from a pip\n"),
        1,
        "wrong passphrase",
    );
    assert_fails(
        &run(&mut blockseal(&[
            "key",
            "check",
            p(&path),
            "--passphrase-fd",
            "9",
        ])),
        1,
        "error: could not open file descriptor 9 for the passphrase",
    );
}

#[test]
fn init_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    fs::write(&path, b"precious").unwrap();
    let out = run(&mut blockseal(&["key", "init", "--out", p(&path)]));
    assert_fails(
        &out,
        1,
        &format!(
            "error: key file {} already exists; refusing to overwrite it",
            p(&path)
        ),
    );
    assert!(stdout(&out).is_empty());
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[test]
fn init_refuses_missing_or_empty_passphrases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let out = run(&mut blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]));
    assert_fails(
        &out,
        1,
        "error: environment variable BLOCKSEAL_TEST_PASS is not set",
    );
    assert!(!path.exists());

    let mut empty = blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    empty.env("BLOCKSEAL_TEST_PASS", "");
    assert_fails(&run(&mut empty), 1, "error: the passphrase is empty");
    assert!(!path.exists());
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    // Argon2 parameters without a passphrase.
    let out = run(&mut blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--argon2-iterations",
        "2",
    ]));
    assert_fails(&out, 2, "required arguments were not provided");
    // Two passphrase sources.
    let out = run(&mut blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "X",
        "--passphrase-fd",
        "0",
    ]));
    assert_fails(&out, 2, "cannot be used with");
    assert!(!path.exists());
    // Out-of-range Argon2 parameters are a plain error.
    let mut bad = blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
        "--argon2-iterations",
        "0",
    ]);
    bad.env("BLOCKSEAL_TEST_PASS", "x");
    assert_fails(
        &run(&mut bad),
        1,
        "error: Argon2id iterations must be between 1 and 4; got 0",
    );
    assert!(!path.exists());
}

/// `key init` writes only what a load accepts: weak and excessive Argon2id
/// parameters are refused with the parameter and its range, before any prompt.
#[test]
fn init_refuses_argon2_params_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    for (option, value, message) in [
        (
            "--argon2-memory-kib",
            "64",
            "error: Argon2id memory must be between 47104 KiB (46 MiB) and 2097152 KiB (2 GiB); \
             got 64 KiB\n",
        ),
        (
            "--argon2-memory-kib",
            "4194304",
            "error: Argon2id memory must be between 47104 KiB (46 MiB) and 2097152 KiB (2 GiB); \
             got 4194304 KiB\n",
        ),
        (
            "--argon2-iterations",
            "1024",
            "error: Argon2id iterations must be between 1 and 4; got 1024\n",
        ),
        (
            "--argon2-parallelism",
            "64",
            "error: Argon2id parallelism must be between 1 and 16; got 64\n",
        ),
    ] {
        let mut init = blockseal(&[
            "key",
            "init",
            "--out",
            p(&path),
            "--passphrase-env",
            "BLOCKSEAL_TEST_PASS",
            option,
            value,
        ]);
        init.env("BLOCKSEAL_TEST_PASS", "x");
        let out = run(&mut init);
        assert_fails(&out, 1, message);
        assert!(!path.exists());
    }
}

/// A key file asking for Argon2id work beyond the accepted ranges is refused at
/// once by `key inspect` and `key check` (and so by `serve`), not worked on.
#[test]
fn check_refuses_a_key_file_asking_for_too_much_argon2_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let mut init = blockseal(&[
        "key",
        "init",
        "--out",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    init.args(CHEAP).env("BLOCKSEAL_TEST_PASS", "open sesame");
    assert_ok(&run(&mut init));
    // 4 GiB and 1024 passes: about two hours of work, as the old bounds allowed.
    let mut bytes = fs::read(&path).unwrap();
    bytes[36..40].copy_from_slice(&(4u32 * 1024 * 1024).to_be_bytes());
    bytes[40..44].copy_from_slice(&1024u32.to_be_bytes());
    fs::write(&path, bytes).unwrap();

    let expected = format!(
        "error: key file {} asks for Argon2id parameters this build refuses: Argon2id \
         parameters m=4194304 KiB, t=1024, p=1 are outside what a key file may ask for: \
         memory at most 2 GiB and at least 8 KiB per lane, 1 to 64 lanes, memory x \
         iterations at most 8 GiB\n",
        p(&path)
    );
    assert_fails(
        &run(&mut blockseal(&["key", "inspect", p(&path)])),
        1,
        &expected,
    );
    let mut check = blockseal(&[
        "key",
        "check",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    check.env("BLOCKSEAL_TEST_PASS", "open sesame");
    let start = std::time::Instant::now();
    assert_fails(&run(&mut check), 1, &expected);
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn inspect_and_check_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    assert_fails(
        &run(&mut blockseal(&["key", "inspect", p(&missing)])),
        1,
        &format!("error: key file {} does not exist", p(&missing)),
    );

    let junk = dir.path().join("junk.key");
    fs::write(&junk, vec![0u8; 84]).unwrap();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
    assert_fails(
        &run(&mut blockseal(&["key", "inspect", p(&junk)])),
        1,
        &format!(
            "error: {} is not a blockseal key file (bad magic)",
            p(&junk)
        ),
    );

    let path = dir.path().join("master.key");
    assert_ok(&run(&mut blockseal(&["key", "init", "--out", p(&path)])));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    // inspect still reads it, with a warning; check (a real load) refuses it.
    let out = run(&mut blockseal(&["key", "inspect", p(&path)]));
    assert_ok(&out);
    assert!(
        stderr(&out).contains("warning: key file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(field(&stdout(&out), "mode:"), "0644");
    assert_fails(
        &run(&mut blockseal(&["key", "check", p(&path)])),
        1,
        &format!(
            "error: key file {0} has mode 0644, open to group or others; run `chmod 600 {0}`",
            p(&path)
        ),
    );

    // A passphrase offered for a plain file is refused, not ignored.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let mut check = blockseal(&[
        "key",
        "check",
        p(&path),
        "--passphrase-env",
        "BLOCKSEAL_TEST_PASS",
    ]);
    check.env("BLOCKSEAL_TEST_PASS", "x");
    assert_fails(
        &run(&mut check),
        1,
        "is not protected by a passphrase, but one was given",
    );
}

/// A key file owned by another user is refused by `key check` (a real load) with
/// what to do about it; `key inspect` shows the owner and warns.
#[test]
fn check_refuses_a_key_file_owned_by_another_user() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    assert_ok(&run(&mut blockseal(&["key", "init", "--out", p(&path)])));
    let me = fs::metadata(&path).unwrap().uid();
    let other = if me == 4242 { 4243 } else { 4242 };
    if let Err(e) = std::os::unix::fs::chown(&path, Some(other), None) {
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        eprintln!("cannot chown as this user; skipped");
        return;
    }
    assert_fails(
        &run(&mut blockseal(&["key", "check", p(&path)])),
        1,
        &format!(
            "error: key file {0} is owned by uid {other}; it must be owned by the user running \
             blockseal (uid {me}) or root: run `chown {me} {0}`\n",
            p(&path)
        ),
    );
    let out = run(&mut blockseal(&["key", "inspect", p(&path)]));
    assert_ok(&out);
    assert_eq!(field(&stdout(&out), "owner:"), format!("uid {other}"));
    assert!(
        stderr(&out).contains(&format!(
            "warning: key file {} is owned by uid {other}: only processes running as uid {other} or root will load it",
            p(&path)
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn errors_carry_no_backtrace() {
    let out = run(blockseal(&["key", "inspect", "/nonexistent/k"]).env("RUST_BACKTRACE", "1"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: key file /nonexistent/k does not exist\n"
    );
}
