//! The FUSE view (M22, SPEC "FUSE tree"): `snapgate mount DIR` shows every
//! point as `DIR/<site>/<volume>/<point>.img`, readable by cp, qemu-img and
//! fuse2fs, with holes visible through SEEK_HOLE.
//!
//! Needs /dev/fuse (root): skipped without it, a failure under CI=true.

use snapgate_e2e::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Unmounts (lazily) on drop, so a failed test leaves no mount behind.
struct MountGuard {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What an exited child wrote to its (piped) stderr.
fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(!in_ci(), "/dev/fuse missing under CI=true");
    eprintln!("SKIP: no /dev/fuse");
    false
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Volume `v` (1 MiB) with snapshot `p` on `gw`, and an empty directory
/// for the view: (the directory, the point's image file in the view).
fn view_setup(gw: &Gateway) -> (PathBuf, PathBuf) {
    gw.create_volume("v", "1M");
    gw.snapshot("v", "p");
    let mnt = gw.tmp().join("view");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let img = mnt.join(SITE).join("v").join("p.img");
    (mnt, img)
}

/// `snapgate mount DIR` through `gw`, its stderr piped.
fn spawn_mount(gw: &Gateway, mnt: &Path) -> Child {
    gw.cli_cmd(&["mount", mnt.to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapgate mount")
}

/// A `snapgate mount` through `gw` whose view is up (`img` exists).
fn mounted(gw: &Gateway, mnt: &Path, img: &Path) -> MountGuard {
    let guard = MountGuard {
        dir: mnt.to_path_buf(),
        child: Some(spawn_mount(gw, mnt)),
    };
    assert!(
        wait_for(img, Duration::from_secs(30)),
        "view never appeared"
    );
    guard
}

#[test]
fn points_as_image_files() {
    if !require_tools(&[
        "fusermount3",
        "fuse2fs",
        "mkfs.ext4",
        "nbdcopy",
        "qemu-img",
        "qemu-io",
    ]) {
        return;
    }
    if !fuse_available() {
        return;
    }
    let gw = Gateway::start();
    let t = gw.tmp().to_path_buf();

    // An ext4 image with known files.
    let src = t.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("hello.txt"), "hello snapgate\n").expect("write");
    make_sparse_image(&src.join("blob.bin"), 3 << 20, 9);
    let fs_img = t.join("fs.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&fs_img)
        .arg("64M"));

    gw.create_volume("fsvol", "64M");
    run(Command::new("nbdcopy")
        .arg(&fs_img)
        .arg(gw.nbd_uri("fsvol")));
    gw.snapshot("fsvol", "p1");
    gw.qemu_io_ok("fsvol", &["write -P 0xee 0 64M"]); // the head moves on

    let mnt = t.join("view");
    std::fs::create_dir_all(&mnt).expect("mkdir view");
    let child = gw
        .cli_cmd(&["mount", mnt.to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapgate mount");
    let mut guard = MountGuard {
        dir: mnt.clone(),
        child: Some(child),
    };
    let p1 = mnt.join(SITE).join("fsvol").join("p1.img");
    assert!(
        wait_for(&p1, Duration::from_secs(30)),
        "{} never appeared",
        p1.display()
    );

    let md = std::fs::metadata(&p1).expect("stat p1.img");
    assert_eq!(md.len(), 64 << 20, "image size");
    assert_eq!(
        sha256(&p1),
        sha256(&fs_img),
        "p1.img differs from the image copied in"
    );

    // Holes are visible: SEEK_HOLE from 0 finds one before the end.
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&p1).expect("open");
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
        assert!(
            hole >= 0 && (hole as u64) < md.len(),
            "no hole reported (SEEK_HOLE = {hole})"
        );
        // SAFETY: as above.
        let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(data, 0, "ext4 superblock area should be data");
    }

    // cp --sparse=always keeps the content and the holes.
    let copy = t.join("copy.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&p1)
        .arg(&copy));
    assert_eq!(sha256(&copy), sha256(&fs_img));
    let used = std::fs::metadata(&copy).expect("stat").blocks() * 512;
    assert!(
        used < 32 << 20,
        "sparse copy uses {used} bytes of a mostly empty 64M image"
    );

    // qemu-img reads it as a raw image.
    let q = t.join("out.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&p1)
        .arg(&q));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&q)
        .arg(&fs_img));

    // Mounted as a filesystem with fuse2fs.
    let fsmnt = t.join("fs");
    std::fs::create_dir_all(&fsmnt).expect("mkdir fs");
    run(Command::new("fuse2fs")
        .arg(&p1)
        .arg(&fsmnt)
        .args(["-o", "ro,fakeroot"]));
    let fs_guard = MountGuard {
        dir: fsmnt.clone(),
        child: None,
    };
    assert!(wait_for(&fsmnt.join("hello.txt"), Duration::from_secs(10)));
    assert_eq!(
        std::fs::read_to_string(fsmnt.join("hello.txt")).expect("read hello"),
        "hello snapgate\n"
    );
    assert_eq!(
        sha256(&fsmnt.join("blob.bin")),
        sha256(&src.join("blob.bin"))
    );
    run(Command::new("fusermount3").arg("-u").arg(&fsmnt));
    drop(fs_guard);

    // A new point shows up, a deleted one goes away.
    gw.snapshot("fsvol", "p2");
    let p2 = mnt.join(SITE).join("fsvol").join("p2.img");
    assert!(
        wait_for(&p2, Duration::from_secs(5)),
        "new point not listed"
    );
    let mut c = std::fs::read(&p2).expect("read p2");
    c.truncate(4096);
    assert!(
        c.iter().all(|&b| b == 0xee),
        "p2 does not show the head at p2"
    );
    gw.cli_ok(&["snapshot", "delete", "fsvol", "p2"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p2.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!p2.exists(), "deleted point still listed");

    // Unmount: the mount command ends with status 0.
    run(Command::new("fusermount3").arg("-u").arg(&mnt));
    let mut child = guard.child.take().expect("child");
    let st = wait_timeout(&mut child, Duration::from_secs(10)).expect("mount did not exit");
    assert!(st.success(), "snapgate mount exited with {st}");
}

/// Ctrl-C (SIGINT) or SIGTERM on `snapgate mount` unmounts and exits 0.
#[test]
fn mount_ends_on_signals() {
    if !require_tool("fusermount3") || !fuse_available() {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "1M");
    gw.snapshot("v", "p");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mnt = gw.tmp().join(format!("view-{sig}"));
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let child = gw
            .cli_cmd(&["mount", mnt.to_str().expect("utf-8")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn snapgate mount");
        let mut guard = MountGuard {
            dir: mnt.clone(),
            child: Some(child),
        };
        let img = mnt.join(SITE).join("v").join("p.img");
        assert!(
            wait_for(&img, Duration::from_secs(30)),
            "view never appeared"
        );
        let pid = guard.child.as_ref().expect("child").id();
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
        let mut child = guard.child.take().expect("child");
        let st = wait_timeout(&mut child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("snapgate mount still running after signal {sig}"));
        assert!(
            st.success(),
            "snapgate mount exited with {st} on signal {sig}"
        );
        assert!(!img.exists(), "view still mounted after signal {sig}");
    }
}

/// A gateway killed under a running `snapgate mount` leaves a dead mount
/// ("Transport endpoint is not connected"): the mount command clears it and
/// fails with a line saying why. With the mount command killed too (stopped
/// while the gateway dies, so that neither can clear it), the dead mount
/// stays; after a restart, `snapgate mount` on the same directory clears it
/// and serves the view again.
#[test]
fn mount_again_after_a_gateway_crash() {
    if !require_tool("fusermount3") || !fuse_available() {
        return;
    }
    let mut gw = Gateway::start();
    let (mnt, img) = view_setup(&gw);
    let mut first = mounted(&gw, &mnt, &img);
    gw.kill9();
    let mut child = first.child.take().expect("child");
    let st = wait_timeout(&mut child, Duration::from_secs(20))
        .expect("snapgate mount still running 20 s after its gateway died");
    let err = stderr_of(&mut child);
    assert!(!st.success(), "snapgate mount exited with {st}: {err}");
    assert!(
        err.contains("the gateway stopped answering") && err.contains("dead mount was cleared"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let m = std::fs::metadata(&mnt).expect("the mount point is a directory again");
    assert!(m.is_dir());
    assert!(!img.exists());

    // The same with the mount command gone first: the dead mount stays.
    gw.restart();
    let mut second = mounted(&gw, &mnt, &img);
    let mut c = second.child.take().expect("child");
    // SAFETY: kill(2) with a pid of our own child; no memory involved.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGSTOP) };
    gw.kill9();
    let _ = c.kill();
    let _ = c.wait();
    // Once the cached attributes of the mount point expire (1 s), the dead
    // mount answers ENOTCONN.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        match std::fs::metadata(&mnt) {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) => panic!("the view's mount point still answers after the gateway died"),
        }
    };
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    gw.restart();
    let mut child = spawn_mount(&gw, &mnt);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !img.exists() && Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("snapgate mount exited with {st}: {}", stderr_of(&mut child));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _second = MountGuard {
        dir: mnt.clone(),
        child: Some(child),
    };
    assert!(img.exists(), "view did not come back after the restart");
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), 1 << 20);
}

/// A view lives exactly as long as its `snapgate mount`: a second one on the
/// same directory is refused (from the same gateway or another one) while
/// the first keeps serving, and `kill -9` of the first command unmounts its
/// view, after which the directory takes a new one.
#[test]
fn a_view_lives_as_long_as_its_mount_command() {
    if !require_tool("fusermount3") || !fuse_available() {
        return;
    }
    let gw = Gateway::start();
    let other = Gateway::start();
    let (mnt, img) = view_setup(&gw);
    let dir = mnt.to_str().expect("utf-8");
    let mut first = mounted(&gw, &mnt, &img);
    let pid = first.child.as_ref().expect("child").id();

    for (who, g, expect) in [
        ("the same gateway", &gw, format!("pid {pid}")),
        (
            "another gateway",
            &other,
            "served by another process".to_owned(),
        ),
    ] {
        let out = g.cli(&["mount", dir]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a second mount through {who} succeeded: {err}"
        );
        assert!(
            err.contains("already shows a snapgate view") && err.contains(&expect),
            "through {who}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(
            std::fs::metadata(&img)
                .expect("the first view still serves")
                .len(),
            1 << 20
        );
        let c = first.child.as_mut().expect("child");
        assert!(
            c.try_wait().expect("try_wait").is_none(),
            "the first mount command ended"
        );
    }

    let mut c = first.child.take().expect("child");
    let _ = c.kill();
    let _ = c.wait();
    let parent = std::fs::metadata(gw.tmp()).expect("stat").dev();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&mnt).expect("stat").dev() != parent {
        assert!(
            Instant::now() < deadline,
            "the view outlived its mount command by 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        gw.log().contains("the process holding the FUSE view ended"),
        "{}",
        gw.log()
    );

    let mut again = mounted(&gw, &mnt, &img);
    let c = again.child.as_mut().expect("child");
    assert!(c.try_wait().expect("try_wait").is_none());
}

/// Ctrl-C works even while the gateway does not answer (stopped with
/// SIGSTOP): `snapgate mount` gives up on the unmount request within
/// seconds and says so in one line, and the gateway, once it runs again,
/// unmounts the view of the ended command by itself.
#[test]
fn ctrl_c_with_a_stopped_gateway() {
    if !require_tool("fusermount3") || !fuse_available() {
        return;
    }
    let gw = Gateway::start();
    let (mnt, img) = view_setup(&gw);
    let mut guard = mounted(&gw, &mnt, &img);
    let gw_pid = gw.pid().expect("gateway pid") as libc::pid_t;
    let mut child = guard.child.take().expect("child");
    // SAFETY: kill(2) on the gateway and our own child; no memory involved.
    unsafe {
        libc::kill(gw_pid, libc::SIGSTOP);
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let st = wait_timeout(&mut child, Duration::from_secs(20));
    // SAFETY: as above.
    unsafe { libc::kill(gw_pid, libc::SIGCONT) };
    let st = st.expect("snapgate mount still running 20 s after Ctrl-C");
    let err = stderr_of(&mut child);
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("it unmounts the view once this command has ended"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let parent = std::fs::metadata(gw.tmp()).expect("stat").dev();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&mnt).map(|m| m.dev()).ok() != Some(parent) {
        assert!(
            Instant::now() < deadline,
            "the view outlived its mount command"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
