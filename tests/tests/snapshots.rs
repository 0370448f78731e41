//! Snapshots end to end, against the real server and real clients: a snapshot
//! taken with `blockseal snapshot create` while the volume is served reads
//! the volume as it was (qemu-img compare, nbdcopy) whatever the volume does
//! afterwards; its export `tenant/volume@name` is read-only (libnbd and the
//! server both refuse writes with EPERM, qemu-io cannot write); a forced
//! rollback closes the volume's clients, leaves the snapshot's alone, and the
//! volume reads its old contents again; deleting a snapshot or its volume is
//! refused while the snapshot is read, unless forced; and a tenant's
//! certificate reaches its own volumes' snapshots only.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use blockseal_test_support::{
    Pki, nbdsh, path_str, python, require_all, require_python_nbd, run, run_ok, temp_dir,
};
use blockseal_tests::{
    ServerProcess, StoreArg, blockseal_ok, cli_on_fails, cli_on_ok, qemu_io, random_file,
    read_file, same_contents, text,
};

const MIB: u64 = 1 << 20;

#[track_caller]
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    cli_on_ok(StoreArg::DataDir(dir), args)
}

/// Fails with exit `code`; returns stderr.
#[track_caller]
fn cli_fails(dir: &Path, code: i32, args: &[&str]) -> String {
    cli_on_fails(StoreArg::DataDir(dir), code, args)
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli_ok(dir, &[args, &["--json"]].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Copies an export to a new file with nbdcopy and returns its bytes.
fn copy_out(uri: &str, to: &Path) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(uri).arg(to));
    read_file(to)
}

/// A python3-libnbd client holding one connection open; on each request it
/// reads the first block and says whether that worked.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// Connects to `uri`; returns once the connection is up.
    fn connect(uri: &str) -> Client {
        let script = format!(
            r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri({uri:?})
print("connected", flush=True)
for line in sys.stdin:
    try:
        h.pread(4096, 0)
        print("read ok", flush=True)
    except nbd.Error as e:
        print("read failed:", e.string, flush=True)
"#
        );
        let mut child = python(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the client");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut client = Client {
            child,
            stdin,
            stdout,
        };
        assert_eq!(client.line(), "connected", "the client did not connect");
        client
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// Whether a read on the connection works now.
    fn reads(&mut self) -> bool {
        writeln!(self.stdin, "read").unwrap();
        self.stdin.flush().unwrap();
        match self.line().as_str() {
            "read ok" => true,
            failed if failed.starts_with("read failed") => false,
            other => panic!("unexpected client output {other:?}"),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_snapshot_reads_the_past_refuses_writes_and_rolls_the_volume_back() {
    require_all(&["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]);
    require_python_nbd();
    let server = ServerProcess::demo("8M");
    let data = server.data_dir();
    let volume = server.uri("demo/disk");
    let snapshot = server.uri("demo/disk@before");
    let original = server.dir.join("original.raw");
    random_file(&original, 8 << 20);
    run_ok(Command::new("nbdcopy").arg(&original).arg(&volume));

    let out = cli_ok(&data, &["snapshot", "create", "demo/disk@before"]);
    assert_eq!(
        out,
        "created snapshot demo/disk@before of 8M (8388608 bytes)\n"
    );
    // The volume moves on: 2 MiB overwritten, 1 MiB trimmed.
    qemu_io(&volume, &["write -P 0xab 1M 2M", "discard 6M 1M", "flush"]);
    assert!(
        !same_contents(&original, &volume),
        "the volume did not change"
    );

    // The snapshot reads the volume as it was.
    assert!(same_contents(&original, &snapshot));
    assert!(copy_out(&snapshot, &server.dir.join("snap.raw")) == read_file(&original));
    let listed = json(&data, &["snapshot", "list", "demo/disk"]);
    let listed = listed["snapshots"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "before");
    assert_eq!(listed[0]["size"], 8 * MIB);
    assert_eq!(listed[0]["held_bytes"], 3 * MIB, "{listed:?}");
    let shown = json(&data, &["volume", "show", "demo/disk"]);
    assert_eq!(shown["snapshots"], 1, "{shown}");
    assert_eq!(shown["snapshot_bytes"], 3 * MIB, "{shown}");
    let table = cli_ok(&data, &["volume", "show", "demo/disk"]);
    assert!(
        table.contains("snapshots     1, holding 3M (3145728 bytes)"),
        "{table}"
    );

    // Read-only: in the export's flags and description, to libnbd (which
    // refuses on its own), and from the server (libnbd's checks off).
    let info = run_ok(Command::new("nbdinfo").args(["--json", &snapshot]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["is_read_only"], true, "{info}");
    assert_eq!(export["export-size"], 8 * MIB, "{info}");
    assert!(
        export["description"]
            .as_str()
            .unwrap()
            .contains("snapshot of demo/disk"),
        "{info}"
    );
    let refusals = run_ok(&mut python(&format!(
        r#"
import errno, nbd
def name(e):
    return errno.errorcode.get(e.errno, e.errno)
h = nbd.NBD()
h.connect_uri({snapshot:?})
assert h.is_read_only()
try:
    h.pwrite(b"x" * 4096, 0)
    print("client: written")
except nbd.Error as e:
    print("client:", name(e))
s = nbd.NBD()
s.set_strict_mode(0)
s.connect_uri({snapshot:?})
for what, call in [
    ("write", lambda: s.pwrite(b"x" * 4096, 0)),
    ("write fua", lambda: s.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)),
    ("trim", lambda: s.trim(4096, 0)),
    ("zero", lambda: s.zero(4096, 0)),
]:
    try:
        call()
        print(what + ": done")
    except nbd.Error as e:
        print(what + ":", name(e))
s.flush()
print("flush: done")
assert s.pread(4096, 1 << 20) != b"\xab" * 4096
s.shutdown()
"#
    )));
    assert_eq!(
        refusals,
        "client: EPERM\nwrite: EPERM\nwrite fua: EPERM\ntrim: EPERM\nzero: EPERM\nflush: done\n"
    );
    // qemu-io cannot open it for writing, nor write through a read-only open.
    for (args, refusal) in [
        (&["-f", "raw"][..], "Permission denied"),
        (&["-r", "-f", "raw"][..], "read-only"),
    ] {
        let write =
            run(Command::new("qemu-io")
                .args(args)
                .args([&snapshot, "-c", "write -P 0xcd 0 4k"]));
        let said = format!("{}{}", text(&write.stdout), text(&write.stderr));
        assert!(
            !write.status.success() && said.contains(refusal) && !said.contains("wrote "),
            "qemu-io {args:?} wrote to a snapshot: {said}"
        );
    }
    assert!(same_contents(&original, &snapshot), "the snapshot changed");

    // Rollback: refused while a client is connected to the volume; forced,
    // it closes that client, leaves the snapshot's client alone, and the
    // volume reads what it held when the snapshot was taken.
    let mut on_volume = Client::connect(&volume);
    let mut on_snapshot = Client::connect(&snapshot);
    assert!(on_volume.reads() && on_snapshot.reads());
    let err = cli_fails(&data, 4, &["snapshot", "rollback", "demo/disk@before"]);
    assert!(err.contains("client connection"), "{err}");
    assert!(on_volume.reads(), "a refused rollback closed a connection");
    assert!(
        !same_contents(&original, &volume),
        "a refused rollback rolled back"
    );
    let out = cli_ok(
        &data,
        &["snapshot", "rollback", "demo/disk@before", "--force"],
    );
    assert_eq!(
        out,
        "rolled demo/disk back to snapshot before (closed 1 connection(s))\n"
    );
    assert!(
        !on_volume.reads(),
        "the volume's client outlived the rollback"
    );
    assert!(
        on_snapshot.reads(),
        "the rollback closed the snapshot's client"
    );
    assert!(same_contents(&original, &volume));
    assert!(copy_out(&volume, &server.dir.join("back.raw")) == read_file(&original));
    assert!(same_contents(&original, &snapshot));
    // The snapshot stays, holding nothing the volume does not map again.
    let shown = json(&data, &["volume", "show", "demo/disk"]);
    assert_eq!(shown["snapshots"], 1, "{shown}");
    assert_eq!(shown["snapshot_bytes"], 0, "{shown}");

    // Deleting the snapshot: refused while its export has a client, then
    // forced; its export is gone, the volume keeps its contents.
    let err = cli_fails(&data, 4, &["snapshot", "delete", "demo/disk@before"]);
    assert!(
        err.contains("demo/disk@before has 1 client connection"),
        "{err}"
    );
    assert!(on_snapshot.reads());
    let out = cli_ok(
        &data,
        &["snapshot", "delete", "demo/disk@before", "--force"],
    );
    assert_eq!(out, "deleted demo/disk@before (closed 1 connection(s))\n");
    assert!(
        !on_snapshot.reads(),
        "the deleted snapshot's client kept reading"
    );
    let gone = run(Command::new("nbdinfo").args(["--size", &snapshot]));
    assert!(!gone.status.success(), "a deleted snapshot is still served");
    assert!(same_contents(&original, &volume));
    let listed = json(&data, &["snapshot", "list", "demo/disk"]);
    assert_eq!(listed["snapshots"], serde_json::json!([]));

    let audit = cli_ok(&data, &["audit"]);
    for line in [
        "snapshot.create    demo/disk@before",
        "snapshot.rollback  demo/disk@before",
        "snapshot.delete    demo/disk@before",
    ] {
        assert!(audit.contains(line), "{line:?} not in\n{audit}");
    }
    assert!(audit.contains("error volume_in_use"), "{audit}");
    cli_ok(&data, &["audit", "verify"]);
}

#[test]
fn deleting_a_volume_takes_its_snapshot_exports_with_it() {
    require_all(&["nbdcopy", "nbdinfo"]);
    require_python_nbd();
    let server = ServerProcess::demo("1M");
    let data = server.data_dir();
    cli_ok(&data, &["tenant", "create", "acme"]);
    cli_ok(&data, &["volume", "create", "acme/rec", "--size", "2M"]);
    let content = server.dir.join("content.raw");
    random_file(&content, 2 << 20);
    run_ok(
        Command::new("nbdcopy")
            .arg(&content)
            .arg(server.uri("acme/rec")),
    );
    cli_ok(&data, &["snapshot", "create", "acme/rec@one"]);
    cli_ok(&data, &["snapshot", "create", "acme/rec@two"]);
    let snapshot = server.uri("acme/rec@one");
    let mut reader = Client::connect(&snapshot);
    assert!(reader.reads());

    // The snapshot's client counts as the volume's.
    let err = cli_fails(&data, 4, &["volume", "delete", "acme/rec"]);
    assert!(
        err.contains("acme/rec@one has 1 client connection"),
        "{err}"
    );
    assert!(reader.reads());
    let out = cli_ok(&data, &["volume", "delete", "acme/rec", "--force"]);
    assert_eq!(out, "deleted acme/rec (closed 1 connection(s))\n");
    assert!(!reader.reads(), "a deleted volume's snapshot is still read");
    for export in ["acme/rec@one", "acme/rec@two", "acme/rec"] {
        let gone = run(Command::new("nbdinfo").args(["--size", &server.uri(export)]));
        assert!(!gone.status.success(), "{export} is still served");
    }
    cli_fails(&data, 3, &["snapshot", "list", "acme/rec"]);
    // A new volume of that name has no snapshots.
    cli_ok(&data, &["volume", "create", "acme/rec", "--size", "2M"]);
    let listed = json(&data, &["snapshot", "list", "acme/rec"]);
    assert_eq!(listed["snapshots"], serde_json::json!([]));
    cli_ok(&data, &["audit", "verify"]);
}

#[test]
fn a_tenant_reaches_its_own_volumes_snapshots_only() {
    require_all(&["nbdinfo", "openssl"]);
    require_python_nbd();
    let pki = Pki::new();
    let alpha = pki.tenant_client("alpha", "alpha");
    let (cert, key, ca) = pki.server_files();
    let dir = temp_dir();
    let d = dir.path();
    blockseal_ok(&["key", "init", "--out", path_str(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[master_key]\nfile = \"master.key\"\n[unix]\npath = \"nbd.sock\"\n\
             [tcp]\naddress = \"127.0.0.1:0\"\n[tcp.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            path_str(&cert),
            path_str(&key),
            path_str(&ca)
        ),
    )
    .unwrap();
    let c = path_str(&config);
    for tenant in ["alpha", "bravo"] {
        blockseal_ok(&["tenant", "create", tenant, "--config", c]);
        let volume = format!("{tenant}/disk");
        blockseal_ok(&["volume", "create", &volume, "--size", "1M", "--config", c]);
        blockseal_ok(&["snapshot", "create", &format!("{volume}@s"), "--config", c]);
    }
    let server = ServerProcess::with_config(d, &config);
    let port = server.tcp.expect("the readiness line names tcp").port();
    let uri = |export: &str| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            alpha.display()
        )
    };

    let size = run_ok(Command::new("nbdinfo").args(["--size", &uri("alpha/disk@s")]));
    assert_eq!(size.trim(), "1048576");
    let read = run_ok(nbdsh().args([
        "-c",
        &format!(
            "h.set_uri_allow_local_file(True)\nh.connect_uri({:?})\nassert h.is_read_only()\nassert h.pread(4096, 0) == bytes(4096)\nprint('ok')",
            uri("alpha/disk@s")
        ),
    ]));
    assert_eq!(read.trim(), "ok");
    for export in ["bravo/disk@s", "bravo/disk@missing", "alpha/disk@missing"] {
        let refused = run(Command::new("nbdinfo").args(["--size", &uri(export)]));
        assert!(!refused.status.success(), "alpha opened {export}");
    }
    // The Unix socket sees every tenant's snapshots.
    let socket = server.socket.as_ref().unwrap();
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbd+unix:///bravo/disk@s?socket={}",
        socket.display()
    )));
    assert_eq!(size.trim(), "1048576");
}
