//! The FUSE view (M22) against real tools: an ext4 image stored in a volume,
//! snapshotted, the head overwritten, then the point read back through the
//! mount with sha256sum, lseek(SEEK_DATA/SEEK_HOLE), cp --sparse=always,
//! qemu-img convert, debugfs, e2fsck, fuse2fs and a loop mount; the tree
//! following the pool; deleted-while-open and damaged blocks; the mount
//! directory checks.
//!
//! Needs root and /dev/fuse. Without /dev/fuse the tests are skipped, unless
//! CI=true; a missing tool is always a failure.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::fuse::{self, FuseView, MountError};
use rand::{Rng, SeedableRng};
use store::{Pool, PoolOptions};

const MIB: usize = 1 << 20;
const IMG_SIZE: usize = 64 * MIB;
const SITE: &str = "here";

// ---------------------------------------------------------------- helpers

/// False (skip) when /dev/fuse is missing outside CI; panics in CI.
fn fuse_available() -> bool {
    // Logs (the view's and fuser's) show with --nocapture; RUST_LOG overrides.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("/dev/fuse is missing, and CI=true: the FUSE view tests must run in CI");
    }
    eprintln!("skipping: /dev/fuse is missing");
    false
}

/// Runs a tool, failing the test with its output when it fails.
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is the tool installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn sha256sum(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .expect("sha256sum printed nothing")
        .to_string()
}

/// Polls `f` until it is true or `limit` passes; returns the time it took.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: differs at byte {at} (got {} bytes, want {})",
            got.len(),
            want.len()
        );
    }
}

/// Unmounts the view on drop, even when the test fails.
struct ViewGuard(Option<FuseView>);

impl ViewGuard {
    fn dir(&self) -> PathBuf {
        self.0.as_ref().unwrap().dir().to_path_buf()
    }
}

impl Drop for ViewGuard {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            if let Err(e) = v.unmount() {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Unmounts an external mount (fuse2fs, loop) on drop.
struct ExtMount {
    dir: PathBuf,
    fuse: bool,
}

impl Drop for ExtMount {
    fn drop(&mut self) {
        if !is_mount_point(&self.dir) {
            return;
        }
        let ok = if self.fuse {
            Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status()
        } else {
            Command::new("umount").arg(&self.dir).status()
        };
        if !matches!(ok, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn is_mount_point(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn open_pool(dir: &Path) -> Arc<Pool> {
    Pool::open(dir, PoolOptions::default()).expect("open pool")
}

fn mount_view(pool: &Arc<Pool>, dir: &Path) -> ViewGuard {
    fs::create_dir_all(dir).unwrap();
    let v = fuse::mount(pool.clone(), SITE.to_string(), dir).expect("mount the FUSE view");
    assert!(v.is_alive());
    ViewGuard(Some(v))
}

/// Writes `data` into the head of `vol` in 1 MiB chunks, skipping all-zero
/// chunks so the volume stays sparse.
fn write_sparse(pool: &Pool, vol: &str, data: &[u8]) {
    let head = pool.open_head(vol).unwrap();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        head.write_at(chunk, (i * MIB) as u64, false).unwrap();
    }
    head.flush().unwrap();
}

/// The files put into the ext4 image.
fn image_files() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut random = vec![0u8; 5 * MIB + 12345];
    rng.fill(&mut random[..]);
    vec![
        ("hello.txt", b"hello from a snapgate point\n".to_vec()),
        ("random.bin", random),
        ("docs/notes.txt", "line of text\n".repeat(5000).into_bytes()),
    ]
}

/// Builds a 64 MiB ext4 image holding [`image_files`].
fn build_image(tmp: &Path) -> Vec<u8> {
    let src = tmp.join("src");
    for (name, data) in image_files() {
        let p = src.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    let img = tmp.join("orig.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M"));
    let data = fs::read(&img).unwrap();
    assert_eq!(data.len(), IMG_SIZE);
    data
}

/// Data ranges of a file as reported by lseek(SEEK_DATA / SEEK_HOLE).
fn seek_ranges(f: &File) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: libc::off_t = 0;
    loop {
        // SAFETY: plain syscall on an open descriptor.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA at {pos}: {e}"
            );
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        assert!(h > d, "SEEK_HOLE at {d} returned {h}");
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

/// Non-zero 4 KiB blocks of `data` as merged ranges.
fn nonzero_ranges(data: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, b) in data.chunks(4096).enumerate() {
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let (s, e) = ((i * 4096) as u64, (i * 4096 + b.len()) as u64);
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

fn lseek_err(f: &File, off: i64, whence: i32) -> Option<i32> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error()
    } else {
        None
    }
}

fn check_files_under(root: &Path, what: &str) {
    for (name, want) in image_files() {
        let got =
            fs::read(root.join(name)).unwrap_or_else(|e| panic!("{what}: reading {name}: {e}"));
        assert_same(&format!("{what}: {name}"), &got, &want);
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn point_image_works_with_real_tools() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image(tmp.path());
    let pool = open_pool(&tmp.path().join("pool"));
    pool.create_volume("vm1", IMG_SIZE as u64).unwrap();
    write_sparse(&pool, "vm1", &image);
    let snap = pool.create_snapshot("vm1", "base").unwrap();
    // Overwrite the head's first MiBs: the point must not see it.
    let mut garbage = vec![0u8; 4 * MIB];
    rand::rngs::StdRng::seed_from_u64(7).fill(&mut garbage[..]);
    pool.open_head("vm1")
        .unwrap()
        .write_at(&garbage, 0, false)
        .unwrap();

    let view = mount_view(&pool, &tmp.path().join("mnt"));
    let mnt = view.dir();

    // Reads of up to 1 MiB with 1 MiB readahead.
    let dev = fs::metadata(&mnt).unwrap().dev();
    let ra = fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
    .unwrap();
    assert_eq!(ra.trim(), "1024", "readahead of the view");

    // The tree, modes, sizes, times.
    assert_eq!(names(&mnt), BTreeSet::from([SITE.to_string()]));
    assert_eq!(names(&mnt.join(SITE)), BTreeSet::from(["vm1".to_string()]));
    let vdir = mnt.join(SITE).join("vm1");
    assert_eq!(names(&vdir), BTreeSet::from(["base.img".to_string()]));
    for d in [mnt.clone(), mnt.join(SITE), vdir.clone()] {
        let md = fs::metadata(&d).unwrap();
        assert!(md.is_dir());
        assert_eq!(md.mode() & 0o7777, 0o555, "{}", d.display());
    }
    let img = vdir.join("base.img");
    let md = fs::metadata(&img).unwrap();
    assert!(md.is_file());
    assert_eq!(md.mode() & 0o7777, 0o444);
    assert_eq!(md.len(), IMG_SIZE as u64);
    assert_eq!(md.mtime(), (snap.created_ms / 1000) as i64);
    assert_eq!(
        md.mtime_nsec(),
        ((snap.created_ms % 1000) * 1_000_000) as i64
    );
    assert_eq!(md.ctime(), md.mtime());
    let data_bytes: u64 = nonzero_ranges(&image).iter().map(|(s, e)| e - s).sum();
    assert_eq!(
        md.blocks() * 512,
        data_bytes,
        "st_blocks should count the data"
    );
    assert!(
        File::options().write(true).open(&img).is_err(),
        "a point must not open for writing"
    );
    assert!(fs::write(vdir.join("new.img"), b"x").is_err());

    // Whole-image content, by sha256sum and byte for byte.
    assert_eq!(sha256sum(&img), sha256sum(&tmp.path().join("orig.img")));
    assert_same("base.img", &fs::read(&img).unwrap(), &image);

    // Parallel reads at scattered offsets.
    std::thread::scope(|s| {
        for t in 0..8usize {
            let (img, image) = (&img, &image);
            s.spawn(move || {
                let f = File::open(img).unwrap();
                let mut buf = vec![0u8; 3 * MIB / 2];
                for k in 0..6usize {
                    let off = ((t * 7 + k * 13) % 60) * MIB + t * 4096 + 17;
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert_same("parallel read", &buf, &image[off..off + buf.len()]);
                }
            });
        }
    });

    // SEEK_DATA / SEEK_HOLE: exactly the non-zero blocks are data.
    let f = File::open(&img).unwrap();
    let want = nonzero_ranges(&image);
    assert!(want.len() > 2, "the image should have several data runs");
    assert_eq!(seek_ranges(&f), want);
    let size = IMG_SIZE as i64;
    assert_eq!(lseek_err(&f, size, libc::SEEK_DATA), Some(libc::ENXIO));
    assert_eq!(lseek_err(&f, size, libc::SEEK_HOLE), Some(libc::ENXIO));
    assert_eq!(
        lseek_err(&f, size + 4096, libc::SEEK_DATA),
        Some(libc::ENXIO)
    );
    let last_data_end = want.last().unwrap().1 as i64;
    if last_data_end < size {
        // Only holes after the last data: SEEK_DATA finds none.
        assert_eq!(
            lseek_err(&f, last_data_end, libc::SEEK_DATA),
            Some(libc::ENXIO)
        );
    }
    // SAFETY: plain syscall on an open descriptor.
    let h = unsafe { libc::lseek(f.as_raw_fd(), size - 1, libc::SEEK_HOLE) };
    assert!(h == size - 1 || h == size, "SEEK_HOLE near EOF gave {h}");
    drop(f);

    // cp --sparse=always: equal and sparse.
    let copy = tmp.path().join("copy.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&copy));
    assert_same("cp copy", &fs::read(&copy).unwrap(), &image);
    let used = fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        used <= data_bytes + MIB as u64,
        "cp --sparse=always copy uses {used} bytes for {data_bytes} bytes of data"
    );

    // qemu-img convert: equal and sparse.
    let conv = tmp.path().join("conv.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&img)
        .arg(&conv));
    assert_same("qemu-img convert", &fs::read(&conv).unwrap(), &image);
    let used = fs::metadata(&conv).unwrap().blocks() * 512;
    assert!(
        used <= data_bytes + MIB as u64,
        "qemu-img convert output uses {used} bytes for {data_bytes} bytes of data"
    );

    // e2fsprogs straight on the point file.
    run(Command::new("e2fsck").arg("-fn").arg(&img));
    for (name, want) in image_files() {
        let out = run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{name}"))
            .arg(&img));
        assert_same(&format!("debugfs cat /{name}"), &out, &want);
    }

    // fuse2fs on top of the point file.
    let m2 = tmp.path().join("fuse2fs");
    fs::create_dir(&m2).unwrap();
    run(Command::new("fuse2fs")
        .arg("-o")
        .arg("ro,fakeroot")
        .arg(&img)
        .arg(&m2));
    let g2 = ExtMount {
        dir: m2.canonicalize().unwrap(),
        fuse: true,
    };
    assert!(
        wait_until(Duration::from_secs(5), || is_mount_point(&g2.dir)).is_some(),
        "fuse2fs did not mount"
    );
    check_files_under(&g2.dir, "fuse2fs");
    run(Command::new("fusermount3").arg("-u").arg(&g2.dir));
    drop(g2);

    // A read-only loop mount of the point file.
    let m3 = tmp.path().join("loop");
    fs::create_dir(&m3).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&img)
        .arg(&m3));
    let g3 = ExtMount {
        dir: m3.canonicalize().unwrap(),
        fuse: false,
    };
    check_files_under(&g3.dir, "loop mount");
    run(Command::new("umount").arg(&g3.dir));
    drop(g3);

    drop(view);
    assert!(
        !is_mount_point(&mnt),
        "the view is still mounted after drop"
    );
}

#[test]
fn tree_follows_the_pool() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = open_pool(&tmp.path().join("pool"));
    pool.create_volume("v", 4 * MIB as u64).unwrap();
    let head = pool.open_head("v").unwrap();
    head.write_at(&[0x11u8; 8192], 0, false).unwrap();
    pool.create_snapshot("v", "s1").unwrap();

    let view = mount_view(&pool, &tmp.path().join("mnt"));
    let vdir = view.dir().join(SITE).join("v");
    assert_eq!(names(&vdir), BTreeSet::from(["s1.img".to_string()]));
    let ino1 = fs::metadata(vdir.join("s1.img")).unwrap().ino();

    // A volume created after mounting shows up too.
    pool.create_volume("w", MIB as u64).unwrap();
    let site = view.dir().join(SITE);
    assert!(
        wait_until(Duration::from_secs(2), || names(&site).contains("w")).is_some(),
        "a new volume did not appear within 2 s"
    );

    // New point appears within 2 s (by name and in listings).
    pool.create_snapshot("v", "s2").unwrap();
    let t = wait_until(Duration::from_secs(2), || {
        vdir.join("s2.img").exists() && names(&vdir).contains("s2.img")
    });
    assert!(t.is_some(), "a new snapshot did not appear within 2 s");

    // Deleted point vanishes within 2 s, even after being looked up.
    assert!(vdir.join("s1.img").exists());
    pool.delete_snapshot("v", "s1").unwrap();
    let t = wait_until(Duration::from_secs(2), || {
        !vdir.join("s1.img").exists() && !names(&vdir).contains("s1.img")
    });
    assert!(t.is_some(), "a deleted snapshot was still there after 2 s");

    // Inode numbers are stable per point (past the entry TTL).
    let ino2 = fs::metadata(vdir.join("s2.img")).unwrap().ino();
    std::thread::sleep(fuse::DIR_TTL + Duration::from_millis(200));
    assert_eq!(fs::metadata(vdir.join("s2.img")).unwrap().ino(), ino2);
    assert_ne!(ino1, ino2);

    // Deleted while open: reads fail with EIO or ESTALE, never data.
    pool.create_snapshot("v", "doomed").unwrap();
    let doomed = vdir.join("doomed.img");
    assert!(wait_until(Duration::from_secs(2), || doomed.exists()).is_some());
    let mut f = File::open(&doomed).unwrap();
    pool.delete_snapshot("v", "doomed").unwrap();
    let mut buf = vec![0u8; 4096];
    let err = f
        .read_exact(&mut buf)
        .expect_err("reading a deleted point must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ESTALE)),
        "unexpected error: {err}"
    );
    assert!(
        f.seek(SeekFrom::Start(MIB as u64)).is_ok(),
        "seek must still work"
    );
    assert!(f.read_exact(&mut buf).is_err());
    drop(f);

    // A point re-created under an old name is a new file: new content, no
    // stale page cache.
    pool.create_snapshot("v", "again").unwrap();
    let again = vdir.join("again.img");
    assert!(wait_until(Duration::from_secs(2), || again.exists()).is_some());
    let old = fs::read(&again).unwrap();
    assert_eq!(&old[..8192], &[0x11u8; 8192][..]);
    pool.delete_snapshot("v", "again").unwrap();
    head.write_at(&[0x22u8; 8192], 0, false).unwrap();
    pool.create_snapshot("v", "again").unwrap();
    let fresh = wait_until(
        Duration::from_secs(3),
        || matches!(fs::read(&again), Ok(d) if d[..8192] == [0x22u8; 8192][..]),
    );
    assert!(
        fresh.is_some(),
        "a re-created point still read as the old one"
    );

    // The whole volume deleted: its directory goes away.
    pool.delete_volume("w").unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !site.join("w").exists()
            && !names(&site).contains("w"))
        .is_some(),
        "a deleted volume was still there after 2 s"
    );
}

#[test]
fn damaged_block_reads_as_eio_others_fine() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool_dir = tmp.path().join("pool");
    let mut pattern = vec![0u8; 4096];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(0x5a);
    }
    pattern[..24].copy_from_slice(b"SNAPGATE-FUSE-PATTERN-22");
    let mut other = vec![0u8; MIB];
    rand::rngs::StdRng::seed_from_u64(99).fill(&mut other[..]);
    let pat_off = 4 * MIB as u64;
    {
        let pool = open_pool(&pool_dir);
        pool.create_volume("data", 16 * MIB as u64).unwrap();
        pool.create_volume("pat", 16 * MIB as u64).unwrap();
        let h = pool.open_head("pat").unwrap();
        h.write_at(&other, 0, false).unwrap();
        h.write_at(&pattern, pat_off, false).unwrap();
        h.write_at(&other[..8192], pat_off + 4096, false).unwrap();
        pool.create_snapshot("pat", "p1").unwrap();
        pool.flush().unwrap();
        assert_eq!(Arc::strong_count(&pool), 1);
    } // the pool is closed here

    // Flip one byte of the slot holding the pattern.
    let data_path = pool_dir.join("data");
    let data = fs::read(&data_path).unwrap();
    let slot = data
        .chunks(4096)
        .position(|b| b == &pattern[..])
        .expect("pattern block not found in the data file");
    let f = File::options().write(true).open(&data_path).unwrap();
    f.write_all_at(&[pattern[100] ^ 0xff], (slot * 4096 + 100) as u64)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);

    let pool = open_pool(&pool_dir);
    let view = mount_view(&pool, &tmp.path().join("mnt"));
    let img = view.dir().join(SITE).join("pat").join("p1.img");
    let f = File::open(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = f
        .read_exact_at(&mut buf, pat_off)
        .expect_err("a damaged block must not read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let mut big = vec![0u8; MIB];
    let err = f
        .read_exact_at(&mut big, pat_off - 8192)
        .expect_err("a read spanning a damaged block must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other offsets read fine, also right next to the damage.
    f.read_exact_at(&mut big, 0).unwrap();
    assert_same("undamaged data", &big, &other);
    f.read_exact_at(&mut buf, pat_off + 4096).unwrap();
    assert_same("neighbour block", &buf, &other[..4096]);
    f.read_exact_at(&mut buf, 10 * MIB as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // And the file can still be read up to the damage.
    let mut upto = vec![0u8; pat_off as usize];
    f.read_exact_at(&mut upto, 0).unwrap();
    assert_same("before the damage", &upto[..MIB], &other);
}

#[test]
fn mount_dir_checks_and_lifecycle() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let one_line = |e: MountError| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s:?}");
        s
    };

    // Missing, not a directory, not empty.
    let missing = tmp.path().join("nope");
    let e = fuse::check_mount_dir(&missing).unwrap_err();
    assert!(matches!(e, MountError::Missing(_)), "{e}");
    assert!(one_line(e).contains("does not exist"));
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = fuse::check_mount_dir(&file).unwrap_err();
    assert!(matches!(e, MountError::NotADirectory(_)), "{e}");
    one_line(e);
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("f"), b"x").unwrap();
    let e = fuse::check_mount_dir(&full).unwrap_err();
    assert!(matches!(e, MountError::NotEmpty(_)), "{e}");
    one_line(e);
    let pool = open_pool(&tmp.path().join("pool"));
    let e = fuse::mount(pool.clone(), "a/b".into(), &full).unwrap_err();
    assert!(matches!(e, MountError::InvalidSite(_)), "{e}");

    // A stale FUSE mount (its server gone: ENOTCONN) is cleared first.
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    make_stale_fuse_mount(&mnt);
    let err = fs::metadata(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    fuse::check_mount_dir(&mnt).expect("a stale mount should be cleared");
    assert!(!is_mount_point(&mnt));

    // Mount; a second mount on the same directory is refused.
    pool.create_volume("v", MIB as u64).unwrap();
    pool.create_snapshot("v", "p").unwrap();
    let view = mount_view(&pool, &mnt);
    assert_eq!(view.dir(), mnt);
    assert!(mnt.join(SITE).join("v").join("p.img").exists());
    let e = fuse::mount(pool.clone(), SITE.into(), &mnt).unwrap_err();
    assert!(matches!(e, MountError::AlreadyMounted { .. }), "{e}");
    one_line(e);
    assert!(view.0.as_ref().unwrap().is_alive());

    // An external unmount is noticed; unmount() afterwards is fine.
    run(Command::new("fusermount3").arg("-u").arg(&mnt));
    let mut view = view;
    let v = view.0.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !v.is_alive()).is_some(),
        "is_alive stayed true after fusermount3 -u"
    );
    v.unmount().expect("unmount after an external unmount");

    // Mount again, then unmount explicitly.
    let v = fuse::mount(pool.clone(), SITE.into(), &mnt).expect("mount again");
    assert!(mnt.join(SITE).join("v").join("p.img").exists());
    v.unmount().expect("unmount");
    assert!(!is_mount_point(&mnt));
    assert!(names(&mnt).is_empty());

    // Unmounting while a file is open detaches the view at once.
    let v = fuse::mount(pool.clone(), SITE.into(), &mnt).expect("mount a third time");
    let f = File::open(mnt.join(SITE).join("v").join("p.img")).unwrap();
    v.unmount().expect("unmount with a file open");
    assert!(!is_mount_point(&mnt));
    drop(f);
}

/// Mounts a FUSE filesystem on `dir` whose server is gone at once, like a
/// crashed gateway leaves behind.
fn make_stale_fuse_mount(dir: &Path) {
    drop(raw_fuse_mount(dir, "snapgate")); // the server goes away
}

/// Mounts a FUSE filesystem named `source` on `dir` and returns its device:
/// nothing answers it while the device stays open.
fn raw_fuse_mount(dir: &Path, source: &str) -> File {
    let dev = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        dev.as_raw_fd()
    ))
    .unwrap();
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let src = CString::new(source).unwrap();
    let fstype = CString::new("fuse").unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount fuse: {}", std::io::Error::last_os_error());
    dev
}

/// A FUSE filesystem that does not answer is never cleared from under
/// whoever serves it: a snapgate view (a stopped gateway's) and someone
/// else's are both refused, within the probe's time.
#[test]
fn silent_fuse_mounts_are_refused_not_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    for source in ["snapgate", "otherfs"] {
        let mnt = tmp.path().join(source);
        fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let dev = raw_fuse_mount(&mnt, source);
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = mnt.clone();
        std::thread::spawn(move || {
            let _ = tx.send(fuse::check_mount_dir(&dir));
        });
        let answer = rx.recv_timeout(Duration::from_secs(20));
        let still_mounted = is_mount_point(&mnt);
        // Closing the device fails what waits on it; then detach.
        drop(dev);
        let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path for the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let e = answer
            .unwrap_or_else(|_| panic!("{source}: no answer within 20 s"))
            .unwrap_err();
        match source {
            "snapgate" => assert!(matches!(e, MountError::AlreadyMounted { .. }), "{e}"),
            _ => assert!(matches!(e, MountError::Occupied { .. }), "{e}"),
        }
        assert!(e.to_string().contains("does not answer"), "{e}");
        assert!(still_mounted, "{source}: the silent mount was cleared");
    }
}
