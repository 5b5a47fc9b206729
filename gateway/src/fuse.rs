//! # FUSE view (M22): every point as a read-only image file
//!
//! ```text
//!  DIR/                              0555, one directory per site
//!  └── <site>/                       0555, the local site (the `site` argument)
//!      └── <volume>/                 0555, one per volume of that site
//!          └── <point>.img           0444, one per snapshot / backup point,
//!                                    size = the point's size, mtime = ctime = its creation
//! ```
//! A pool volume named `S/V` (a mirror received from site S) shows as
//! `DIR/S/V/`; any other volume `V` as `DIR/<site>/V/`. Names with more than
//! one '/' are left out.
//!
//! ## Inode scheme
//! Inode 1 is the root. Every other object gets a number on first sight from
//! a counter, keyed by its identity: `Site(site)`, `Volume(site, pool name)`,
//! `Point(pool name, point, created_ms, size)`. Numbers are never reused
//! while mounted (the kernel's `forget` is ignored; the table grows by one
//! small entry per name ever seen), so a number always means the same
//! object, and a point deleted and re-created under the same name is a new
//! inode — the kernel can never serve the old point's cached pages for it.
//! Adding sites later only means more `Site` keys; nothing is positional.
//!
//! ## Following the pool
//! Nothing is cached here: `lookup` and `readdir` list the pool afresh. The
//! kernel may trust a name (any entry) and a directory's attributes for
//! [`DIR_TTL`] (1 s), so a new point appears at once in listings and a
//! deleted one vanishes within about a second. A point's attributes never
//! change, so they are trusted for an hour, and files are opened with
//! `FOPEN_KEEP_CACHE`: page-cache contents survive close/open. Opening binds
//! a `store::Volume` to the point; if the point is deleted while open, reads
//! fail with `ESTALE` (never another state's data).
//!
//! ## Threading and I/O
//! fuser runs [`READ_THREADS`] dispatch threads, each on its own cloned
//! `/dev/fuse` descriptor, and the kernel is told to send asynchronous reads
//! of up to 1 MiB with up to 64 requests in flight; the bdi readahead of the
//! mount is raised to 1 MiB. A read goes straight from `Volume::read_at`
//! (checksums checked; holes filled with zeros without touching the data
//! file) into one per-thread buffer handed to the reply. A damaged block
//! fails that read with `EIO`, logged with volume, point and offset.
//! `SEEK_DATA`/`SEEK_HOLE` come from `Volume::extents`; holes and known
//! zeros both count as holes (`cp --sparse`, `qemu-img convert` skip them).
//!
//! ## Lifetime
//! [`mount`] checks the directory ([`check_mount_dir`], which also clears a
//! stale mount left by a crashed gateway), mounts, and returns a
//! [`FuseView`]; dropping it (or [`FuseView::unmount`]) unmounts.
//! [`FuseView::is_alive`] turns false when someone else unmounts
//! (`fusermount3 -u DIR`).

mod ops;
mod tree;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

pub use ops::{DIR_TTL, POINT_ATTR_TTL};

/// Dispatch threads serving one mount.
pub const READ_THREADS: usize = 8;

/// Source name of our mounts in `/proc/self/mountinfo`.
const FSNAME: &str = "snapgate";

/// How long [`check_mount_dir`] waits for a mounted directory to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long unmounting waits for the session threads to finish.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the view could not be mounted or unmounted. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount directory {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("mount directory {} is not empty", .0.display())]
    NotEmpty(PathBuf),
    #[error("/dev/fuse is missing: load the fuse module (modprobe fuse) or pass the device into the container")]
    NoFuseDevice,
    /// `why`: whose view it is and what to do, starting with a comma or
    /// colon.
    #[error("{} already shows a snapgate view{why}", dir.display())]
    AlreadyMounted { dir: PathBuf, why: String },
    #[error("cannot mount on {}: {why}", dir.display())]
    Occupied { dir: PathBuf, why: String },
    #[error("invalid site name {0:?}: it must be one non-empty path component")]
    InvalidSite(String),
    #[error("cannot clear the stale FUSE mount on {}: {reason}", dir.display())]
    Stale { dir: PathBuf, reason: String },
    #[error("cannot use {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount the FUSE view on {}: {reason}", dir.display())]
    Mount { dir: PathBuf, reason: String },
    #[error("cannot unmount the FUSE view on {}: {reason}", dir.display())]
    Unmount { dir: PathBuf, reason: String },
}

/// One line from any (possibly multi-line) error text.
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A live mount of the view. Dropping it unmounts.
pub struct FuseView {
    dir: PathBuf,
    unmounter: Option<SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
    alive: Arc<AtomicBool>,
}

impl std::fmt::Debug for FuseView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseView")
            .field("dir", &self.dir)
            .field("alive", &self.is_alive())
            .finish()
    }
}

/// Mount points served by this process, with their liveness.
static LIVE: Mutex<Vec<(PathBuf, Arc<AtomicBool>)>> = Mutex::new(Vec::new());

fn live_lock() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Arc<AtomicBool>)>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn served_here(dir: &Path) -> bool {
    live_lock()
        .iter()
        .any(|(d, alive)| d == dir && alive.load(Ordering::SeqCst))
}

/// Mounts the view of `pool` on `dir`, with the local volumes under `site`.
pub fn mount(pool: Arc<store::Pool>, site: String, dir: &Path) -> Result<FuseView, MountError> {
    if !tree::is_component(&site) {
        return Err(MountError::InvalidSite(site));
    }
    check_mount_dir(dir)?;
    let dir = dir.canonicalize().map_err(|source| MountError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let alive = Arc::new(AtomicBool::new(true));
    {
        // Reserve the directory so two mounts in this process cannot race.
        let mut live = live_lock();
        if live
            .iter()
            .any(|(d, a)| *d == dir && a.load(Ordering::SeqCst))
        {
            return Err(MountError::AlreadyMounted {
                why: format!(
                    " of this gateway: unmount it first (`fusermount3 -u {}`)",
                    dir.display()
                ),
                dir,
            });
        }
        live.retain(|(d, _)| *d != dir);
        live.push((dir.clone(), alive.clone()));
    }
    let release = |dir: &Path| live_lock().retain(|(d, _)| d != dir);

    let fs = ops::ViewFs::new(tree::Tree::new(pool, site));
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(FSNAME.into()),
        MountOption::Subtype(FSNAME.into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::CUSTOM(format!("max_read={}", ops::MAX_IO)),
    ];
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    cfg.acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(READ_THREADS);
    cfg.clone_fd = true;

    let mut session = match Session::new(fs, &dir, &cfg) {
        Ok(s) => s,
        Err(e) => {
            release(&dir);
            return Err(MountError::Mount {
                dir,
                reason: one_line(e),
            });
        }
    };
    let unmounter = session.unmount_callable();
    let flag = alive.clone();
    let thread = std::thread::Builder::new()
        .name("fuse-view".into())
        .spawn(move || {
            let r = session.run();
            flag.store(false, Ordering::SeqCst);
            if let Err(e) = &r {
                tracing::warn!("FUSE view session ended with an error: {e}");
            }
            r
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            // The session was moved into the closure and dropped with it,
            // which unmounted it.
            release(&dir);
            return Err(MountError::Mount {
                dir,
                reason: one_line(e),
            });
        }
    };
    raise_readahead(&dir);
    Ok(FuseView {
        dir,
        unmounter: Some(unmounter),
        thread: Some(thread),
        alive,
    })
}

/// Sets the mount's readahead to 1 MiB (the kernel starts FUSE mounts at
/// 128 KiB). Best effort: needs root and sysfs.
fn raise_readahead(dir: &Path) {
    let Ok(md) = std::fs::metadata(dir) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", ops::MAX_IO / 1024)) {
        tracing::debug!("cannot raise the FUSE view's readahead via {path}: {e}");
    }
}

impl FuseView {
    /// The mount point (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// False once the mount is gone, e.g. after `fusermount3 -u DIR`.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), MountError> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        let result = self.unmount_now(&mut unmounter);
        match result {
            Ok(true) => self.wait_for_session(),
            Ok(false) => tracing::warn!(
                dir = %self.dir.display(),
                "FUSE view busy: detached lazily; its session ends when the last open file is closed"
            ),
            Err(_) => {}
        }
        live_lock().retain(|(d, a)| !(*d == self.dir && Arc::ptr_eq(a, &self.alive)));
        result.map(|_| ())
    }

    /// Unmounts; `Ok(false)` when it could only be detached lazily.
    fn unmount_now(&self, unmounter: &mut SessionUnmounter) -> Result<bool, MountError> {
        if !self.is_alive() {
            return Ok(true); // unmounted from outside already
        }
        match unmounter.unmount() {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Files are still open: detach it from the namespace now; the
                // session ends when the last of them is closed.
                detach(&self.dir)
                    .map(|()| false)
                    .map_err(|reason| MountError::Unmount {
                        dir: self.dir.clone(),
                        reason,
                    })
            }
            Err(_) if !self.is_alive() => Ok(true),
            Err(e) => Err(MountError::Unmount {
                dir: self.dir.clone(),
                reason: one_line(e),
            }),
        }
    }

    /// Joins the session thread if it ends within [`JOIN_TIMEOUT`].
    fn wait_for_session(&mut self) {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while self.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
                tracing::info!(dir = %self.dir.display(), "FUSE view unmounted");
            } else {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "FUSE view unmounted, but its session has not ended yet"
                );
            }
        }
    }
}

impl Drop for FuseView {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("{e}");
        }
    }
}

/// Lazily unmounts whatever is mounted on `dir`: `umount2(MNT_DETACH)`,
/// else `fusermount3 -uz` (for a non-root owner).
fn detach(dir: &Path) -> Result<(), String> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg("--")
        .arg(dir)
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "umount2: {err}; fusermount3 -uz: {}",
            one_line(String::from_utf8_lossy(&out.stderr))
        )),
        Err(e) => Err(format!("umount2: {err}; fusermount3: {e}")),
    }
}

/// The absolute, symlink-free form of `dir`, computed without touching
/// `dir` itself (it may be a dead mount).
fn absolute(dir: &Path) -> Result<PathBuf, MountError> {
    if let Ok(p) = dir.canonicalize() {
        return Ok(p);
    }
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| MountError::Dir {
                dir: dir.to_path_buf(),
                source,
            })?
            .join(dir)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    match (out.parent(), out.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => Ok(p.join(name)),
            Err(_) => Ok(out),
        },
        _ => Ok(out),
    }
}

/// A mount on a directory, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    source: String,
}

/// Undoes the octal escapes of mountinfo (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u16, |a, c| a * 8 + u16::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The topmost mount on exactly `dir`, if any.
fn mount_on(mountinfo: &str, dir: &Path) -> Option<MountEntry> {
    let want = dir.as_os_str().as_bytes();
    let mut found = None;
    for line in mountinfo.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(mp) = a.split(' ').nth(4) else {
            continue;
        };
        if unescape(mp) != want {
            continue;
        }
        let mut f = b.split(' ');
        let fstype = f.next().unwrap_or_default().to_string();
        let source = String::from_utf8_lossy(&unescape(f.next().unwrap_or_default())).into_owned();
        // Later lines are mounted on top of earlier ones.
        found = Some(MountEntry { fstype, source });
    }
    found
}

/// Whether `dir` answers a stat within [`PROBE_TIMEOUT`]: `Ok(true)` if it
/// does, `Ok(false)` for a dead FUSE mount (ENOTCONN, or no answer).
/// What a FUSE mount answers to `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Alive,
    /// ENOTCONN: its server is gone.
    Dead,
    /// No answer within [`PROBE_TIMEOUT`]: stopped, hung or busy.
    Silent,
}

fn probe(dir: &Path) -> Result<Probe, io::Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.to_path_buf();
    // Detached on purpose: a hung mount would hang the caller too.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&d).map(|_| ()));
    });
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(Ok(())) => Ok(Probe::Alive),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(Probe::Dead),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(Probe::Silent),
    }
}

/// Checks that `dir` can take the view: an existing, empty directory, and
/// `/dev/fuse` present. A dead FUSE mount on `dir` ("Transport endpoint is
/// not connected", left by a crashed server) is unmounted first; a snapgate
/// view, answering or not, is refused, whoever serves it, and so is another
/// FUSE filesystem that does not answer.
pub fn check_mount_dir(dir: &Path) -> Result<(), MountError> {
    let abs = absolute(dir)?;
    for _ in 0..8 {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(m) = mount_on(&info, &abs) else {
            break;
        };
        if !m.fstype.starts_with("fuse") {
            break;
        }
        let ours = m.source == FSNAME;
        if ours && served_here(&abs) {
            return Err(MountError::AlreadyMounted {
                why: format!(
                    " of this gateway: unmount it first (`fusermount3 -u {}`)",
                    abs.display()
                ),
                dir: abs,
            });
        }
        let state = probe(&abs).map_err(|source| MountError::Dir {
            dir: abs.clone(),
            source,
        })?;
        if ours && state != Probe::Dead {
            // Another gateway's view, answering or busy: it ends with its
            // `snapgate mount` or its gateway; never taken from under it.
            let why = match state {
                Probe::Alive => "served by another process",
                _ => "that does not answer (its gateway is stopped or busy)",
            };
            return Err(MountError::AlreadyMounted {
                why: format!(
                    " {why}: stop its `snapgate mount` or gateway, or unmount it (`fusermount3 -u {}`)",
                    abs.display()
                ),
                dir: abs,
            });
        }
        if state == Probe::Alive {
            break; // someone else's working FUSE mount: judged below
        }
        if state == Probe::Silent {
            // Someone else's, hung or busy: not ours to clear.
            return Err(MountError::Occupied {
                why: format!(
                    "a {} filesystem mounted there does not answer; unmount it first (`fusermount3 -u {}`)",
                    m.fstype,
                    abs.display()
                ),
                dir: abs,
            });
        }
        tracing::warn!(
            dir = %abs.display(),
            fstype = %m.fstype,
            source = %m.source,
            "clearing a stale FUSE mount"
        );
        detach(&abs).map_err(|reason| MountError::Stale {
            dir: abs.clone(),
            reason,
        })?;
    }
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Missing(dir.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::Stale {
                dir: dir.to_path_buf(),
                reason: one_line(e),
            })
        }
        Err(source) => {
            return Err(MountError::Dir {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    if !md.is_dir() {
        return Err(MountError::NotADirectory(dir.to_path_buf()));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|source| MountError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty(dir.to_path_buf()));
    }
    match std::fs::metadata("/dev/fuse") {
        Ok(md) if md.file_type().is_char_device() => Ok(()),
        _ => Err(MountError::NoFuseDevice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_the_topmost_mount() {
        let info = "\
22 1 0:21 / /proc rw - proc proc rw
40 22 0:50 / /tmp/a\\040b rw,nosuid - tmpfs tmpfs rw
41 40 0:51 / /tmp/a\\040b rw,nosuid,nodev - fuse snapgate rw,user_id=0
42 1 0:52 / /tmp/other rw - fuse.sshfs host:/ rw
";
        assert_eq!(
            mount_on(info, Path::new("/tmp/a b")),
            Some(MountEntry {
                fstype: "fuse".into(),
                source: "snapgate".into()
            })
        );
        assert_eq!(mount_on(info, Path::new("/tmp/a")), None);
        assert_eq!(
            mount_on(info, Path::new("/tmp/other")).map(|m| m.fstype),
            Some("fuse.sshfs".into())
        );
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\134c"), b"a b\\c".to_vec());
        assert_eq!(unescape("x\\"), b"x\\".to_vec());
        assert_eq!(unescape("x\\04"), b"x\\04".to_vec());
    }

    #[test]
    fn errors_are_one_line() {
        let e = MountError::Mount {
            dir: "/m".into(),
            reason: one_line("fusermount3: failed\n  badly\n"),
        };
        assert_eq!(
            e.to_string(),
            "cannot mount the FUSE view on /m: fusermount3: failed badly"
        );
    }
}
