//! A full file system under `blockseal serve`, seen by a real NBD client
//! (python3-libnbd): writes fail with ENOSPC on the wire (what qemu's
//! `werror=enospc` acts on), FLUSH keeps working, nothing flushed is lost, and
//! once space is freed writing goes on with no restart.
//!
//! The store lives on a tmpfs mounted for the test, so it needs root (as CI
//! has); a missing python3-libnbd fails it.

use std::path::PathBuf;
use std::process::Command;

use blockseal_test_support::{path_str as p, python, temp_dir};
use blockseal_tests::{ServerProcess, blockseal_ok};

struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = temp_dir();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_is_enospc_on_the_wire_and_recovers_without_a_restart() {
    let fs = Tmpfs::mount(40);
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![0x5a; 16 << 20]).unwrap();
    let conf_dir = temp_dir();
    let d = conf_dir.path();
    blockseal_ok(&["key", "init", "--out", p(&d.join("master.key"))]);
    let config = d.join("blockseal.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nspace_reserve = \"4M\"\n\n[master_key]\nfile = \"master.key\"\n\n\
             [unix]\npath = \"nbd.sock\"\nmode = \"0600\"\n",
            fs.path.join("store").display()
        ),
    )
    .unwrap();
    let c = p(&config);
    blockseal_ok(&["tenant", "create", "acme", "--config", c]);
    blockseal_ok(&[
        "volume",
        "create",
        "acme/disk",
        "--size",
        "64M",
        "--config",
        c,
    ]);
    let server = ServerProcess::with_config(d, &config);
    let uri = server.uri("acme/disk");

    // Write 1 MiB chunks until the server says ENOSPC, flush, check what was
    // acknowledged; then wait for the test to free space (it deletes the filler
    // and says so on the client's standard input), write and flush again, and
    // check everything.
    let script = format!(
        r#"
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri({uri:?})
chunk = lambda k: bytes([k % 251 + 1]) * (1 << 20)
k = 0
while True:
    try:
        h.pwrite(chunk(k), k << 20)
        k += 1
    except nbd.Error as e:
        # libnbd gives the errno's name (older bindings: its number).
        assert errno.errorcode.get(e.errno, e.errno) == "ENOSPC", ("expected ENOSPC", e.errno, e.string)
        break
assert k > 4, k
h.flush()
for i in range(k):
    assert h.pread(1 << 20, i << 20) == chunk(i), i
print("FULL", k, flush=True)
assert sys.stdin.readline() == "space freed\n"
for i in range(k, k + 8):
    h.pwrite(chunk(i), i << 20)
h.flush()
for i in range(k + 8):
    assert h.pread(1 << 20, i << 20) == chunk(i), i
print("RECOVERED", k + 8)
"#
    );
    let mut child = python(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("FULL"), "client said {line:?}");
    std::fs::remove_file(&filler).unwrap();
    std::io::Write::write_all(&mut stdin, b"space freed\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success() && rest.contains("RECOVERED"),
        "client: {rest}"
    );
    assert!(
        server.log().contains("no space"),
        "the server log says nothing of the full disk"
    );
}
