//! A filesystem on an encrypted volume: nbdfuse exposes the export as a file,
//! ext4 goes on it through a loop mount, files are written and synced; the
//! server stops (SIGTERM) and restarts on the same data directory; the files read
//! back the same and `e2fsck -fn` finds the filesystem clean.
//!
//! Needs root, /dev/fuse and loop devices (as in CI).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockseal_test_support::{require_all, run, run_ok, wait_until};
use blockseal_tests::{ServerProcess, random_file, sha256};

/// `nbdfuse MOUNTPOINT/disk URI`, unmounted on drop.
struct Fuse {
    dir: PathBuf,
    child: Child,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut fuse = Fuse {
            dir: dir.to_path_buf(),
            child,
        };
        // nbdfuse writes its pid file once the mount serves requests.
        wait_until("nbdfuse to mount", Duration::from_secs(30), || {
            if let Some(status) = fuse.child.try_wait().unwrap() {
                panic!("nbdfuse exited with {status} before mounting");
            }
            pidfile.exists()
        });
        fuse
    }

    fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = run(Command::new("fusermount3").arg("-u").arg(&self.dir));
        let _ = self.child.wait();
    }
}

/// An ext4 loop mount, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop"])
                .arg(image)
                .arg(dir),
        );
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let out = run(Command::new("umount").arg(&self.0));
        if !out.status.success() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

/// Fails the test unless it can mount: the tools, root and `/dev/fuse`.
fn require_mounting() {
    require_all(&[
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "sha256sum",
    ]);
    let root = run(Command::new("id").arg("-u")).stdout == b"0\n";
    assert!(
        root && Path::new("/dev/fuse").exists(),
        "this test mounts a file system: it needs root and /dev/fuse"
    );
}

#[test]
fn ext4_survives_a_restart() {
    require_mounting();
    let mut server = ServerProcess::demo("128M");
    let uri = server.uri("demo/disk");
    let fuse_dir = server.dir.join("fuse");
    let mnt = server.dir.join("mnt");
    let names = ["a.bin", "b.bin", "c.txt"];
    let sums: Vec<String>;
    {
        let fuse = Fuse::mount(&fuse_dir, &uri);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(fuse.file()),
        );
        let mount = Mount::new(&fuse.file(), &mnt);
        random_file(&mount.0.join("a.bin"), 5 << 20);
        random_file(&mount.0.join("b.bin"), 123_457);
        std::fs::create_dir_all(mount.0.join("sub")).unwrap();
        std::fs::write(
            mount.0.join("c.txt"),
            "voicemail for tenant demo\n".repeat(1000),
        )
        .unwrap();
        run_ok(&mut Command::new("sync"));
        sums = names.iter().map(|n| sha256(&mount.0.join(n))).collect();
        drop(mount);
        drop(fuse);
    }
    server.stop();
    server.restart();
    let fuse = Fuse::mount(&fuse_dir, &uri);
    {
        let mount = Mount::new(&fuse.file(), &mnt);
        let again: Vec<String> = names.iter().map(|n| sha256(&mount.0.join(n))).collect();
        assert_eq!(again, sums);
        assert!(mount.0.join("sub").is_dir());
    }
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(fuse.file()));
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
