//! The admin API and CLI against the real server: every command online (server
//! running, with I/O in flight) and offline (store opened directly), with the
//! same output both ways, checked against snapshot files in
//! `tests/snapshots/admin/` (`BLESS=1` rewrites them); connection closing by
//! delete and shred; online resize; master key rotation and restart; and the
//! refusals: other users, bad bodies, unknown objects, each changing nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use blockseal_test_support::{path_str, python, require, run, run_ok};
use blockseal_tests::{
    ServerProcess, StoreArg, binary, blockseal_ok, cli_on, cli_on_fails, cli_on_ok, text,
};

fn cli(dir: &Path, args: &[&str]) -> Output {
    cli_on(StoreArg::DataDir(dir), args)
}

#[track_caller]
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    cli_on_ok(StoreArg::DataDir(dir), args)
}

/// Fails with exit `code`; returns stderr.
#[track_caller]
fn cli_fails(dir: &Path, code: i32, args: &[&str]) -> String {
    cli_on_fails(StoreArg::DataDir(dir), code, args)
}

/// Replaces what differs between runs: the store directory, timestamps, key
/// ids and durations.
fn normalize(text: &str, dir: &Path) -> String {
    let text = text.replace(path_str(dir), "<DIR>");
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if is_timestamp(&bytes[i..]) {
            out.push_str("<TIME>");
            i += 20;
        } else if let Some(n) = hex_run(&bytes[i..]).filter(|&n| n == 32)
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
        {
            out.push_str("<KEYID>");
            i += n;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    // Durations in milliseconds.
    let mut lines = Vec::new();
    for line in out.lines() {
        let line = match line.find(" ms") {
            Some(end) if line.contains("rewrapped in ") => {
                let start = line[..end].rfind(' ').map_or(0, |s| s + 1);
                format!("{}<N>{}", &line[..start], &line[end..])
            }
            _ => line.to_owned(),
        };
        let line = match line.find("\"elapsed_ms\": ") {
            Some(at) => format!("{}\"elapsed_ms\": <N>,", &line[..at]),
            None => line,
        };
        lines.push(line);
    }
    lines.join("\n") + "\n"
}

fn is_timestamp(b: &[u8]) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:ddZ";
    b.len() >= pattern.len()
        && pattern.iter().zip(b).all(|(p, c)| match p {
            b'd' => c.is_ascii_digit(),
            other => other == c,
        })
}

fn hex_run(b: &[u8]) -> Option<usize> {
    let n = b
        .iter()
        .take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        .count();
    (n > 0).then_some(n)
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/admin")
}

/// Compares `actual` with the snapshot `name`; `BLESS=1` writes it instead.
#[track_caller]
fn assert_snapshot(name: &str, actual: &str) {
    let path = snapshot_dir().join(format!("{name}.txt"));
    if std::env::var_os("BLESS").is_some() {
        std::fs::create_dir_all(snapshot_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "snapshot {} is missing ({e}); run with BLESS=1 to write it. Output:\n{actual}",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "output differs from snapshot {} (BLESS=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// A python3-libnbd client writing and reading back an export in a loop.
struct IoClient {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl IoClient {
    /// Waits for the client to end; returns whether it succeeded, its output
    /// and its error output.
    fn wait(mut self) -> (bool, String, String) {
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (self.child.wait().unwrap().success(), out, err)
    }
}

/// Starts a python3-libnbd client that writes and reads back `uri` in a loop
/// until `stop` exists, failing on any error or mismatch; returns once it is
/// connected.
fn start_io(uri: &str, stop: &Path) -> IoClient {
    let script = format!(
        r#"
import nbd, os, random, sys
h = nbd.NBD()
h.connect_uri({uri:?})
print("connected", flush=True)
size = h.get_size()
blocks = size // 4096
rounds = 0
while not os.path.exists({stop:?}):
    lba = random.randrange(blocks)
    data = os.urandom(4096)
    h.pwrite(data, lba * 4096)
    if h.pread(4096, lba * 4096) != data:
        sys.exit("read back differs at block %d" % lba)
    if rounds % 64 == 0:
        h.flush()
    rounds += 1
h.flush()
h.shutdown()
print(rounds)
"#,
        stop = path_str(stop)
    );
    let mut child = python(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the I/O client");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let client = IoClient { child, stdout };
    if line.trim() != "connected" {
        let (_, _, err) = client.wait();
        panic!("the I/O client did not connect: {err}");
    }
    client
}

/// Stops an I/O client and checks it did some I/O without an error.
#[track_caller]
fn finish_io(client: IoClient, stop: &Path) {
    std::fs::write(stop, b"").unwrap();
    let (ok, out, err) = client.wait();
    assert!(ok, "the I/O client failed: {err}");
    let rounds: u64 = out.trim().parse().unwrap();
    assert!(rounds > 0, "the I/O client did no I/O");
}

/// The commands both modes run, with the snapshot each output is checked
/// against; `Err(code)` for a command that must fail with that exit code
/// (then stderr is the snapshot).
const SCRIPT: &[(&str, &[&str], Option<i32>)] = &[
    ("tenant-create", &["tenant", "create", "acme"], None),
    (
        "tenant-create-again",
        &["tenant", "create", "acme"],
        Some(4),
    ),
    (
        "volume-create",
        &["volume", "create", "acme/voicemail", "--size", "8M"],
        None,
    ),
    (
        "volume-create-small",
        &[
            "volume",
            "create",
            "acme/chat",
            "--size",
            "64K",
            "--block-size",
            "512",
        ],
        None,
    ),
    (
        "volume-create-bad-block",
        &[
            "volume",
            "create",
            "acme/bad",
            "--size",
            "64K",
            "--block-size",
            "1000",
        ],
        Some(2),
    ),
    ("tenant-list", &["tenant", "list"], None),
    ("tenant-show", &["tenant", "show", "acme"], None),
    (
        "tenant-show-missing",
        &["tenant", "show", "nobody"],
        Some(3),
    ),
    ("volume-list-acme", &["volume", "list", "acme"], None),
    ("volume-show", &["volume", "show", "acme/voicemail"], None),
    (
        "volume-show-missing",
        &["volume", "show", "acme/nothing"],
        Some(3),
    ),
    (
        "snapshot-create",
        &["snapshot", "create", "acme/voicemail@before"],
        None,
    ),
    (
        "snapshot-create-again",
        &["snapshot", "create", "acme/voicemail@before"],
        Some(4),
    ),
    (
        "snapshot-create-second",
        &["snapshot", "create", "acme/voicemail@after.1"],
        None,
    ),
    (
        "snapshot-create-bad-name",
        &["snapshot", "create", "acme/voicemail@Before"],
        Some(2),
    ),
    (
        "snapshot-create-no-name",
        &["snapshot", "create", "acme/voicemail"],
        Some(2),
    ),
    (
        "snapshot-list",
        &["snapshot", "list", "acme/voicemail"],
        None,
    ),
    (
        "snapshot-list-not-a-volume",
        &["snapshot", "list", "acme/voicemail@before"],
        Some(2),
    ),
    (
        "snapshot-show",
        &["snapshot", "show", "acme/voicemail@before"],
        None,
    ),
    (
        "snapshot-show-missing",
        &["snapshot", "show", "acme/voicemail@nothing"],
        Some(3),
    ),
    (
        "snapshot-list-missing-volume",
        &["snapshot", "list", "acme/nothing"],
        Some(3),
    ),
    (
        "volume-show-snapshots",
        &["volume", "show", "acme/voicemail"],
        None,
    ),
    ("backup-keys", &["backup", "keys", "acme"], None),
    (
        "backup-keys-missing-tenant",
        &["backup", "keys", "nobody"],
        Some(3),
    ),
    (
        "backup-create-missing-snapshot",
        &[
            "backup",
            "create",
            "acme/voicemail@nothing",
            "--out",
            "/nonexistent/full.bsb",
        ],
        Some(3),
    ),
    (
        "backup-verify-missing-file",
        &["backup", "verify", "/nonexistent/full.bsb"],
        Some(3),
    ),
    (
        "restore-missing-file",
        &["restore", "/nonexistent/full.bsb", "--as", "acme/restored"],
        Some(3),
    ),
    (
        "restore-into-existing",
        &["restore", "/nonexistent/full.bsb", "--as", "acme/voicemail"],
        Some(4),
    ),
    (
        "key-export-tenant-missing",
        &[
            "key",
            "export-tenant",
            "nobody",
            "--out",
            "/nonexistent/nobody.bundle",
            "--to-master-key",
        ],
        Some(3),
    ),
    (
        "snapshot-rollback-not-newest",
        &["snapshot", "rollback", "acme/voicemail@before"],
        Some(4),
    ),
    (
        "snapshot-delete",
        &["snapshot", "delete", "acme/voicemail@after.1"],
        None,
    ),
    (
        "snapshot-delete-missing",
        &["snapshot", "delete", "acme/voicemail@after.1"],
        Some(3),
    ),
    (
        "snapshot-rollback",
        &["snapshot", "rollback", "acme/voicemail@before"],
        None,
    ),
    (
        "volume-resize-grow",
        &["volume", "resize", "acme/voicemail", "--size", "16M"],
        None,
    ),
    (
        "snapshot-rollback-other-size",
        &["snapshot", "rollback", "acme/voicemail@before"],
        Some(4),
    ),
    (
        "snapshot-list-json",
        &["snapshot", "list", "acme/voicemail", "--json"],
        None,
    ),
    (
        "volume-resize-shrink",
        &["volume", "resize", "acme/voicemail", "--size", "4M"],
        None,
    ),
    ("key-rotate-tenant", &["key", "rotate-tenant", "acme"], None),
    (
        "volume-show-json",
        &["volume", "show", "acme/voicemail", "--json"],
        None,
    ),
    ("tenant-delete-busy", &["tenant", "delete", "acme"], Some(4)),
    ("volume-delete", &["volume", "delete", "acme/chat"], None),
    (
        "volume-delete-voicemail",
        &["volume", "delete", "acme/voicemail"],
        None,
    ),
    ("tenant-delete", &["tenant", "delete", "acme"], None),
    ("tenant-list-json", &["tenant", "list", "--json"], None),
    ("audit-verify", &["audit", "verify"], None),
];

/// Runs [`SCRIPT`] against `dir` and checks every output against its snapshot.
fn run_script(dir: &Path) {
    for (name, args, fails) in SCRIPT {
        let output = match fails {
            None => cli_ok(dir, args),
            Some(code) => cli_fails(dir, *code, args),
        };
        // Not a terminal: no colour codes.
        assert!(!output.contains('\x1b'), "{name}: {output:?}");
        assert_snapshot(name, &normalize(&output, dir));
    }
}

/// The audit log with the actor's mode prefix dropped (`local:uid:0` offline,
/// `uid:0` online): otherwise the same entries in both modes.
fn audit_without_mode(dir: &Path) -> String {
    let audit = normalize(&cli_ok(dir, &["audit"]), dir).replace("local:uid:", "uid:");
    // Column widths differ with the actor's length.
    audit
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn every_command_gives_the_same_output_online_and_offline() {
    // Offline: no server runs. The store is the embedded default's, made by
    // a server that then stopped, so that both modes start from the same state.
    let mut first = ServerProcess::demo("4M");
    first.stop();
    let offline = first.data_dir();
    run_script(&offline);
    assert_snapshot("audit", &audit_without_mode(&offline));
    let status = normalize(&cli_ok(&offline, &["status"]), &offline);
    assert!(status.contains("mode          offline"), "{status}");

    // Online, while a client writes and reads the demo volume.
    let server = ServerProcess::demo("4M");
    let online = server.data_dir();
    let stop = server.dir.join("stop-io");
    let io = start_io(&server.uri("demo/disk"), &stop);
    run_script(&online);
    assert_snapshot("audit", &audit_without_mode(&online));
    let status = normalize(&cli_ok(&online, &["status"]), &online);
    assert!(status.contains("mode          online"), "{status}");
    finish_io(io, &stop);
}

/// Sends one raw HTTP request to the admin socket as `uid` (via python), and
/// returns the status code and body; `None` when the connection is refused.
fn raw_request(socket: &Path, uid: u32, request: &[u8]) -> Option<(u16, String)> {
    let script = format!(
        r#"
import os, socket, sys
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({socket:?})
except PermissionError:
    print("refused"); sys.exit(0)
try:
    # A server refusing an oversized body answers and closes before reading it all.
    s.sendall(sys.stdin.buffer.read())
except (BrokenPipeError, ConnectionResetError):
    pass
reply = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk: break
    reply += chunk
sys.stdout.write(reply.decode("utf-8", "replace"))
"#,
        socket = path_str(socket)
    );
    let mut child = Command::new(blockseal_test_support::PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply = text(&out.stdout);
    if reply.trim() == "refused" {
        return None;
    }
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

fn http(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[track_caller]
fn expect_error(socket: &Path, request: &[u8], status: u16, code: &str) {
    let (got, body) = raw_request(socket, 0, request).expect("root may connect");
    assert_eq!(got, status, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], code, "{body}");
    assert!(
        !json["error"]["message"].as_str().unwrap().is_empty(),
        "{body}"
    );
}

#[test]
fn the_admin_socket_refuses_other_users_and_bad_requests() {
    let server = ServerProcess::demo("1M");
    let data = server.data_dir();
    let socket = data.join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket must be owner-only");

    let before_tenants = cli_ok(&data, &["tenant", "list", "--json"]);
    let before_audit = cli_ok(&data, &["audit", "--json"]);

    // Another user cannot even connect: the socket is 0600.
    assert_eq!(
        raw_request(&socket, 65534, &http("GET", "/v1/tenants", "")),
        None
    );
    // Opened up by a careless chmod, the peer check still refuses them.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for request in [
        http("GET", "/v1/tenants", ""),
        http("POST", "/v1/tenants", r#"{"name": "intruder"}"#),
    ] {
        let (status, body) = raw_request(&socket, 65534, &request).expect("socket opened up");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"forbidden\""), "{body}");
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Bad requests from an admin: a specific 4xx each.
    let s = &socket;
    expect_error(
        s,
        &http("POST", "/v1/tenants", r#"{"name": "a""#),
        400,
        "invalid_json",
    );
    expect_error(
        s,
        &http("POST", "/v1/tenants", r#"{"name": "a", "kek_version": 9}"#),
        400,
        "invalid_field",
    );
    expect_error(
        s,
        &http("POST", "/v1/tenants", r#"{"name": "Bad Name"}"#),
        400,
        "invalid_name",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants",
            &format!(r#"{{"name": "{}"}}"#, "x".repeat(70_000)),
        ),
        413,
        "body_too_large",
    );
    let mut plain = http("POST", "/v1/tenants", r#"{"name": "a"}"#);
    let text_type = String::from_utf8(plain.clone())
        .unwrap()
        .replace("application/json", "text/plain");
    plain = text_type.into_bytes();
    expect_error(s, &plain, 415, "unsupported_media_type");
    expect_error(
        s,
        &http("GET", "/v1/tenants/nobody", ""),
        404,
        "no_such_tenant",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants/nobody/volumes",
            r#"{"name": "v", "size": 4096}"#,
        ),
        404,
        "no_such_tenant",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants/demo/volumes",
            r#"{"name": "v", "size": 1000}"#,
        ),
        400,
        "invalid_size",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants/demo/volumes/disk/snapshots",
            r#"{"name": "Bad Name"}"#,
        ),
        400,
        "invalid_name",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants/demo/volumes/disk/snapshots",
            r#"{"name": "s", "epoch": 1}"#,
        ),
        400,
        "invalid_field",
    );
    expect_error(
        s,
        &http("GET", "/v1/tenants/demo/volumes/nothing/snapshots", ""),
        404,
        "no_such_volume",
    );
    expect_error(
        s,
        &http("GET", "/v1/tenants/demo/volumes/disk/snapshots/nothing", ""),
        404,
        "no_such_snapshot",
    );
    expect_error(
        s,
        &http(
            "POST",
            "/v1/tenants/demo/volumes/disk/snapshots/nothing/rollback",
            "",
        ),
        404,
        "no_such_snapshot",
    );
    expect_error(s, &http("GET", "/v2/tenants", ""), 404, "no_such_path");
    expect_error(
        s,
        &http("PUT", "/v1/tenants", ""),
        405,
        "method_not_allowed",
    );
    expect_error(
        s,
        &http("POST", "/v1/tenants/demo/shred", r#"{"confirm": "other"}"#),
        400,
        "confirmation_mismatch",
    );
    expect_error(
        s,
        &http("GET", "/v1/tenants?admin=true", ""),
        400,
        "invalid_query",
    );
    expect_error(
        s,
        &http("GET", "/v1/audit?limit=0", ""),
        400,
        "invalid_query",
    );
    expect_error(
        s,
        &http("GET", "/v1/audit?limit=100000", ""),
        400,
        "invalid_query",
    );
    let (status, body) = raw_request(s, 0, &http("GET", "/v1/audit?since_seq=2&limit=2", ""))
        .expect("root may connect");
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let seqs: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3], "{body}");

    // A tenant name that would add path segments is refused before any
    // request is made (and the volume it aims at stays).
    let err = cli_fails(
        &data,
        2,
        &["tenant", "delete", "demo/volumes/disk?force=true"],
    );
    assert!(err.contains("is invalid"), "{err}");
    cli_ok(&data, &["volume", "show", "demo/disk"]);

    // Nothing changed: the same tenants, and the audit log only gained the
    // refusals of the other user (and the outcome of the failed creates).
    assert_eq!(cli_ok(&data, &["tenant", "list", "--json"]), before_tenants);
    let audit = cli_ok(&data, &["audit", "--since-seq", "0"]);
    assert!(audit.contains("denied"), "{audit}");
    assert!(!audit.contains("intruder"), "{audit}");
    for line in audit.lines().filter(|l| l.contains("tenant.create")) {
        assert!(
            !line.ends_with(" ok"),
            "a refused request succeeded: {line}"
        );
    }
    assert_ne!(cli_ok(&data, &["audit", "--json"]), before_audit);
    cli_ok(&data, &["audit", "verify"]);
    // The CLI pages: --limit, and --since-seq to read on.
    let seqs = |args: &[&str]| -> Vec<u64> {
        let out = cli_ok(&data, &[&["audit", "--json"], args].concat());
        let all: serde_json::Value = serde_json::from_str(&out).unwrap();
        all["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&["--limit", "3"]), [1, 2, 3]);
    assert_eq!(seqs(&["--since-seq", "3", "--limit", "2"]), [3, 4]);
    let all = seqs(&[]);
    assert!(
        all.len() > 4 && all.windows(2).all(|w| w[1] == w[0] + 1),
        "{all:?}"
    );
}

#[test]
fn delete_and_shred_close_connections_and_leave_other_tenants_alone() {
    let server = ServerProcess::demo("1M");
    let data = server.data_dir();
    cli_ok(&data, &["tenant", "create", "acme"]);
    cli_ok(&data, &["volume", "create", "acme/rec", "--size", "4M"]);
    cli_ok(&data, &["volume", "create", "acme/tmp", "--size", "1M"]);
    let other = server.dir.join("other.raw");
    blockseal_tests::random_file(&other, 1 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg(&other)
            .arg(server.uri("demo/disk")),
    );

    // A connected volume is not deleted without --force.
    let stop = server.dir.join("stop");
    let io = start_io(&server.uri("acme/tmp"), &stop);
    let err = cli_fails(&data, 4, &["volume", "delete", "acme/tmp"]);
    assert!(err.contains("client connection"), "{err}");
    let out = cli_ok(&data, &["volume", "delete", "acme/tmp", "--force"]);
    assert!(
        out.contains("deleted acme/tmp (closed 1 connection(s))"),
        "{out}"
    );
    let (ok, _, _) = io.wait();
    assert!(!ok, "the client of a deleted volume kept going");

    // Shred: a connected client is cut off, the export and its files go.
    let rec = server.dir.join("rec.raw");
    blockseal_tests::random_file(&rec, 4 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg(&rec)
            .arg(server.uri("acme/rec")),
    );
    let io = start_io(&server.uri("acme/rec"), &stop);
    let segments_before = count_files(&data.join("segments"));
    let missing = cli(&data, &["tenant", "shred", "acme"]);
    assert_eq!(
        missing.status.code(),
        Some(2),
        "shred needs --yes-i-understand"
    );
    let out = cli_ok(
        &data,
        &["tenant", "shred", "acme", "--yes-i-understand", "--json"],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["volumes"], 1, "{out}");
    assert_eq!(report["connections_closed"], 1, "{out}");
    assert!(report["segments_deleted"].as_u64().unwrap() > 0, "{out}");
    assert!(count_files(&data.join("segments")) < segments_before);
    let (ok, _, _) = io.wait();
    assert!(!ok, "the shredded tenant's client kept going");
    cli_fails(&data, 3, &["tenant", "show", "acme"]);
    let list = run_ok(Command::new("nbdinfo").arg("--list").arg(format!(
        "nbd+unix://?socket={}",
        server.socket.as_ref().unwrap().display()
    )));
    assert!(!list.contains("acme/"), "{list}");
    // The other tenant's data is untouched.
    let back = server.dir.join("back.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(server.uri("demo/disk"))
            .arg(&back),
    );
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&other).unwrap()
    );
    cli_ok(&data, &["audit", "verify"]);
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().unwrap().is_dir() {
            n += count_files(&entry.path());
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn resize_works_online_and_refuses_to_drop_data_silently() {
    require("nbdinfo");
    let server = ServerProcess::demo("4M");
    let data = server.data_dir();
    let uri = server.uri("demo/disk");
    // Data in the last MiB.
    run_ok(&mut python(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\nh.pwrite(b'x' * 4096, 3 << 20)\nh.flush()\nh.shutdown()"
    )));
    let err = cli_fails(&data, 4, &["volume", "resize", "demo/disk", "--size", "2M"]);
    assert!(err.contains("past"), "{err}");
    // A connected client knows the old size: no shrink under it, even with
    // --discard-tail.
    let stop = server.dir.join("stop");
    let io = start_io(&uri, &stop);
    let err = cli_fails(
        &data,
        4,
        &[
            "volume",
            "resize",
            "demo/disk",
            "--size",
            "2M",
            "--discard-tail",
        ],
    );
    assert!(err.contains("client connection"), "{err}");
    finish_io(io, &stop);
    assert_eq!(nbd_size(&uri), 4 << 20, "a refused shrink changed the size");
    cli_ok(
        &data,
        &[
            "volume",
            "resize",
            "demo/disk",
            "--size",
            "2M",
            "--discard-tail",
        ],
    );
    assert_eq!(nbd_size(&uri), 2 << 20);
    cli_ok(&data, &["volume", "resize", "demo/disk", "--size", "8M"]);
    assert_eq!(nbd_size(&uri), 8 << 20);
    // The discarded tail reads as zeros once grown back.
    let tail = run_ok(&mut python(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\nprint(h.pread(4096, 3 << 20) == bytes(4096))"
    )));
    assert_eq!(tail.trim(), "True");
}

fn nbd_size(uri: &str) -> u64 {
    run_ok(Command::new("nbdinfo").args(["--size", uri]))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn master_key_rotation_online_then_restart_with_the_new_key() {
    let mut server = ServerProcess::demo("4M");
    let data = server.data_dir();
    let stop = server.dir.join("stop");
    let io = start_io(&server.uri("demo/disk"), &stop);
    let content = server.dir.join("content.raw");
    cli_ok(&data, &["tenant", "create", "acme"]);
    cli_ok(&data, &["volume", "create", "acme/rec", "--size", "1M"]);
    blockseal_tests::random_file(&content, 1 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg(&content)
            .arg(server.uri("acme/rec")),
    );

    let new_key = server.dir.join("new.key");
    blockseal_ok(&["key", "init", "--out", path_str(&new_key)]);
    let out = cli_ok(
        &data,
        &["key", "rotate-master", "--new-key", path_str(&new_key)],
    );
    assert!(out.contains("the old key opens nothing"), "{out}");
    assert!(out.contains("master_key.file"), "{out}");
    // Rotating to the key in use is refused.
    let err = cli_fails(
        &data,
        4,
        &["key", "rotate-master", "--new-key", path_str(&new_key)],
    );
    assert!(err.contains("is the store's current master key"), "{err}");
    finish_io(io, &stop);
    server.stop();

    // The old key (still at DIR/master.key) opens nothing.
    let out = cli(&data, &["tenant", "list"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("master key"),
        "{}",
        text(&out.stderr)
    );
    // With the new key in place, everything is there.
    std::fs::rename(&new_key, data.join("master.key")).unwrap();
    server.restart();
    let back = server.dir.join("back.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(server.uri("acme/rec"))
            .arg(&back),
    );
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&content).unwrap()
    );
    let audit = cli_ok(&data, &["audit"]);
    assert!(audit.contains("key.rotate-master"), "{audit}");
    cli_ok(&data, &["audit", "verify"]);
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = blockseal_ok(&["completions", shell]);
        assert!(out.contains("rotate-master"), "{shell}: {out}");
        assert!(out.contains("rollback"), "{shell}: {out}");
    }
    let out = run(Command::new(binary()).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_documents_the_exit_codes() {
    let out = blockseal_ok(&["--help"]);
    for line in [
        "3  no such tenant, volume, snapshot, file or backup key",
        "4  conflict",
        "5  refused",
    ] {
        assert!(out.contains(line), "{out}");
    }
}

/// One HTTPS request to the admin API on TCP with the client certificate in
/// `client` (libnbd's layout: `client-cert.pem`, `client-key.pem`; none if
/// absent); returns the status code and body, or the handshake error.
fn tls_request(
    addr: std::net::SocketAddr,
    ca: &Path,
    client: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let script = format!(
        r#"
import http.client, os, ssl, sys
ctx = ssl.create_default_context(cafile={ca:?})
cert = os.path.join({client:?}, "client-cert.pem")
if os.path.exists(cert):
    ctx.load_cert_chain(cert, os.path.join({client:?}, "client-key.pem"))
try:
    c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ctx, timeout=30)
    c.request({method:?}, {path:?}, body={body:?} or None, headers={{"Content-Type": "application/json"}})
    r = c.getresponse()
    print(r.status)
    sys.stdout.write(r.read().decode())
except (ssl.SSLError, ConnectionError, OSError) as e:
    print("handshake failed:", e)
"#,
        ca = path_str(ca),
        client = path_str(client),
        port = addr.port(),
    );
    let out = run(Command::new(blockseal_test_support::PYTHON).args(["-c", &script]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply = text(&out.stdout);
    let (first, rest) = reply.split_once('\n').unwrap_or((&reply, ""));
    match first.parse() {
        Ok(status) => Ok((status, rest.to_owned())),
        Err(_) => Err(reply),
    }
}

#[test]
fn admin_api_over_tls_takes_admin_certificates_only() {
    let pki = blockseal_test_support::Pki::new();
    let admin = pki.client("alice", Some("URI:blockseal:admin:alice"));
    let tenant = pki.tenant_client("acme", "acme");
    let both = pki.client(
        "mallory",
        Some("URI:blockseal:admin:mallory,URI:blockseal:tenant:acme"),
    );
    let anonymous = pki.ca_only("anonymous");
    let (cert, key, ca) = pki.server_files();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    blockseal_ok(&["key", "init", "--out", path_str(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[master_key]\nfile = \"master.key\"\n[unix]\npath = \"nbd.sock\"\n\
             [admin_tcp]\naddress = \"127.0.0.1:0\"\n[admin_tcp.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            path_str(&cert),
            path_str(&key),
            path_str(&ca)
        ),
    )
    .unwrap();
    let server = ServerProcess::with_config(d, &config);
    let addr = server
        .admin_tcp
        .expect("the readiness line names admin_tcp");

    let (status, body) = tls_request(
        addr,
        &ca,
        &admin,
        "POST",
        "/v1/tenants",
        r#"{"name": "acme"}"#,
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = tls_request(addr, &ca, &admin, "GET", "/v1/tenants", "").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"acme\""), "{body}");
    // Tenant certificates, even one that also names an administrator, are refused.
    for client in [&tenant, &both] {
        let (status, body) = tls_request(
            addr,
            &ca,
            client,
            "POST",
            "/v1/tenants",
            r#"{"name": "evil"}"#,
        )
        .unwrap();
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"forbidden\""), "{body}");
    }
    // No certificate: no TLS session at all.
    assert!(tls_request(addr, &ca, &anonymous, "GET", "/v1/tenants", "").is_err());
    let data = d.join("data");
    let tenants = cli_ok(&data, &["tenant", "list"]);
    assert!(
        tenants.contains("acme") && !tenants.contains("evil"),
        "{tenants}"
    );
    let audit = cli_ok(&data, &["audit"]);
    assert!(audit.contains("cert:alice"), "{audit}");
    assert!(audit.contains("denied"), "{audit}");
}

#[test]
fn shred_and_master_key_rotation_work_offline_too() {
    // Data written through a server, which then stops.
    let mut server = ServerProcess::demo("1M");
    let data = server.data_dir();
    cli_ok(&data, &["tenant", "create", "acme"]);
    cli_ok(&data, &["volume", "create", "acme/rec", "--size", "1M"]);
    let content = server.dir.join("content.raw");
    blockseal_tests::random_file(&content, 1 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg(&content)
            .arg(server.uri("acme/rec")),
    );
    run_ok(
        Command::new("nbdcopy")
            .arg(&content)
            .arg(server.uri("demo/disk")),
    );
    server.stop();

    // A data key rotation with no server: the job waits for one, or runs
    // here with --wait.
    let out = cli_ok(&data, &["key", "rotate-data", "demo/disk"]);
    assert!(out.contains("now writes under data key version 2"), "{out}");
    let pending = key_status(&data, "demo/disk");
    assert_eq!(pending["job"]["blocks_done"], 0, "{pending}");
    let all = cli_ok(&data, &["key", "status"]);
    assert!(
        all.contains("demo/disk") && all.contains("waiting"),
        "{all}"
    );
    let done = cli_ok(&data, &["key", "status", "demo/disk", "--wait", "--json"]);
    let done: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert!(done["job"].is_null(), "{done}");
    assert_eq!(done["keys"][0]["version"], 2, "{done}");
    assert_eq!(done["keys"].as_array().unwrap().len(), 1, "{done}");

    let out = cli_ok(&data, &["tenant", "shred", "acme", "--yes-i-understand"]);
    assert!(
        out.contains("shredded tenant acme: keys destroyed, 1 volume(s)"),
        "{out}"
    );
    assert!(out.contains("0 connection(s) closed"), "{out}");
    cli_fails(&data, 3, &["tenant", "show", "acme"]);

    let new_key = server.dir.join("new.key");
    blockseal_ok(&["key", "init", "--out", path_str(&new_key)]);
    let out = cli_ok(
        &data,
        &["key", "rotate-master", "--new-key", path_str(&new_key)],
    );
    assert!(out.contains("Use the new key file from now on"), "{out}");
    // The old key opens nothing; the new one opens everything.
    let err = cli_fails(&data, 1, &["status"]);
    assert!(err.contains("rotate-master"), "{err}");
    let status = cli_ok(
        &data,
        &["status", "--master-key", path_str(&new_key), "--json"],
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["mode"], "offline");
    assert_eq!(status["tenants"], 1);
    std::fs::rename(&new_key, data.join("master.key")).unwrap();
    server.restart();
    let back = server.dir.join("back.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(server.uri("demo/disk"))
            .arg(&back),
    );
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&content).unwrap()
    );
    let audit = cli_ok(&data, &["audit"]);
    for action in [
        "tenant.shred",
        "key.rotate-master",
        "key.rotate-data",
        "key.reencrypt",
    ] {
        assert!(audit.contains(action), "{audit}");
    }
    assert!(audit.contains("local:uid:"), "{audit}");
    cli_ok(&data, &["audit", "verify"]);
}

/// fio with crc32c verification on `uri`, in `dir` (fio keeps state files in
/// its working directory); panics unless it ran without an error.
fn fio(dir: &Path, uri: &str, args: &[&str]) -> String {
    let out = run_ok(
        Command::new("fio")
            .current_dir(dir)
            .args([
                "--name=blockseal",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--group_reporting",
            ])
            .args(args),
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
    out
}

fn key_status(data: &Path, export: &str) -> serde_json::Value {
    serde_json::from_str(&cli_ok(data, &["key", "status", export, "--json"])).unwrap()
}

#[test]
fn data_key_rotation_under_fio_resumes_after_kill_9_and_finishes() {
    require("fio");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    blockseal_ok(&["key", "init", "--out", path_str(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    let write_config = |rate: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\nreencrypt_rate = \"{rate}\"\n[master_key]\nfile = \"master.key\"\n\
                 [unix]\npath = \"nbd.sock\"\n"
            ),
        )
        .unwrap();
    };
    // Slow enough to kill the server half-way through.
    write_config("2M");
    let data = d.join("data");
    let c = path_str(&config);
    blockseal_ok(&["tenant", "create", "acme", "--config", c]);
    blockseal_ok(&[
        "volume", "create", "acme/rec", "--size", "32M", "--config", c,
    ]);
    let mut server = ServerProcess::with_config(d, &config);
    let uri = server.uri("acme/rec");

    // The first 24 MiB written under the first data key, checked at the end.
    let region_a = ["--rw=write", "--bs=64k", "--size=24M"];
    fio(d, &uri, &[&region_a[..], &["--do_verify=0"]].concat());
    // Rotate while fio writes and verifies the last 8 MiB.
    let busy = Command::new("fio")
        .current_dir(d)
        .args([
            "--name=busy",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=8",
            "--offset=24M",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_backlog=256",
            "--verify_state_save=0",
            "--time_based",
            "--runtime=3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = cli_ok(&data, &["key", "rotate-data", "acme/rec"]);
    assert!(out.contains("now writes under data key version 2"), "{out}");
    let busy_out = busy.wait_with_output().unwrap();
    assert!(busy_out.status.success(), "{}", text(&busy_out.stderr));
    let busy_text = text(&busy_out.stdout);
    assert!(
        busy_text.contains("err= 0") && !busy_text.contains("verify:"),
        "{busy_text}"
    );

    // Half-way: some blocks moved, some not. Then kill -9.
    blockseal_test_support::wait_until(
        "re-encryption under way",
        std::time::Duration::from_secs(60),
        || key_status(&data, "acme/rec")["job"]["blocks_done"].as_u64() > Some(0),
    );
    let before = key_status(&data, "acme/rec");
    assert!(
        before["job"]["blocks_remaining"].as_u64() > Some(0),
        "the job finished before the kill: {before}"
    );
    server.kill();
    // The job survived the kill (read with no server running, so nothing
    // works on it meanwhile).
    let after: serde_json::Value = serde_json::from_str(&blockseal_ok(&[
        "key", "status", "acme/rec", "--json", "--config", c,
    ]))
    .unwrap();
    assert!(after["job"].is_object(), "the job was lost: {after}");
    assert!(
        after["job"]["blocks_done"].as_u64() >= before["job"]["blocks_done"].as_u64(),
        "progress went back: {before} then {after}"
    );

    // After the restart (at a higher rate) the job resumes and finishes.
    write_config("64M");
    server.restart();
    let done = cli_ok(&data, &["key", "status", "acme/rec", "--wait", "--json"]);
    let done: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert_eq!(done["active"], 2, "{done}");
    assert!(done["job"].is_null(), "{done}");
    let versions: Vec<u64> = done["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2], "only the newest data key remains: {done}");
    // Every block fio wrote reads back and verifies.
    fio(d, &uri, &[&region_a[..], &["--verify_only"]].concat());
    let audit = cli_ok(&data, &["audit"]);
    assert!(audit.contains("key.rotate-data"), "{audit}");
}
