//! The storage-medium seam under the whole store.
//!
//! Everything the store keeps lives in a handful of named files of one
//! directory. [`Medium`] is that directory, [`MediumFile`] one file. The real
//! medium ([`DirMedium`]) maps them to POSIX files; [`MemMedium`] keeps them in
//! memory and remembers which bytes and names were made durable by `sync_data`
//! / `sync_dir`, so a test can simulate a crash that keeps only those (plus any
//! chosen subset of unsynced writes) and reopen the store on what is left.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One file of the medium. Positional I/O only, safe to share across threads.
pub trait MediumFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`, extending the file if needed.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write of this file durable.
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file has no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length (truncates or extends with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Gives the space of a range back to the medium; it reads as zeros after.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Like `read_at`, but only if that needs no wait for the device (the
    /// bytes are all in memory): `Ok(false)` when it would wait, and then
    /// `buf` holds nothing meaningful. A medium that cannot tell says
    /// `false`, always.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
}

/// A directory of named files.
pub trait Medium: Send + Sync {
    /// Opens (creating when `create`) the named file.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>>;
    /// Whether the named file exists.
    fn exists(&self, name: &str) -> bool;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file (missing is fine).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Names of all files.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Takes the exclusive lock that keeps a second process out; held until
    /// the returned guard is dropped.
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>>;
    /// Where the medium lives, for messages.
    fn describe(&self) -> String;
    /// Bytes the medium can still take (`u64::MAX`: no limit known).
    fn available(&self) -> io::Result<u64> {
        Ok(u64::MAX)
    }
}

/// The real medium: files in a directory.
pub struct DirMedium {
    dir: PathBuf,
}

impl DirMedium {
    /// Uses (and creates when missing) the directory.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(DirMedium {
            dir: dir.as_ref().to_path_buf(),
        })
    }
}

struct OsFile {
    file: File,
    /// `preadv2(RWF_NOWAIT)` answered that it cannot (old kernel, or a
    /// filesystem without it, like tmpfs): `read_at_nowait` stops trying.
    no_nowait: AtomicBool,
}

impl MediumFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    /// `preadv2` with `RWF_NOWAIT`: the kernel answers `EAGAIN` instead of
    /// waiting for the disk (or for a page locked by I/O in progress).
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.no_nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
                return Ok(false);
            };
            // SAFETY: one iovec over `rest`, which stays borrowed mutably
            // for the call; the descriptor is owned by `self.file`.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            match n {
                0 => {
                    rest.fill(0);
                    return Ok(true);
                }
                n if n > 0 => done += n as usize,
                _ => {
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                            self.no_nowait.store(true, Ordering::Relaxed);
                            return Ok(false);
                        }
                        // Not all in memory (EAGAIN), or any other failure:
                        // the caller reads the usual way, and an error that
                        // counts comes from there.
                        _ => return Ok(false),
                    }
                }
            }
        }
        Ok(true)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a valid open descriptor with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A filesystem without hole punching keeps the space; data stays correct.
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(e),
        }
    }
}

struct LockFile(#[allow(dead_code)] File);

impl Medium for DirMedium {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.dir.join(name))?;
        Ok(Arc::new(OsFile {
            file: f,
            no_nowait: AtomicBool::new(false),
        }))
    }
    fn exists(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        Ok(out)
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join("pool.lock"))?;
        // SAFETY: flock on a valid open descriptor.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(LockFile(f)))
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn available(&self) -> io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated path and a zeroed struct for the result.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// One unsynced write remembered by [`MemMedium`].
#[derive(Clone)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct MemFileState {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    /// Set when the length changed without a sync.
    len_dirty: bool,
}

struct MemFile {
    state: Mutex<MemFileState>,
    faults: Arc<Mutex<Faults>>,
}

#[derive(Default)]
struct Faults {
    /// Fail every write and sync from now on (a dead disk).
    fail_io: bool,
}

fn write_into(v: &mut Vec<u8>, data: &[u8], offset: u64) {
    let end = offset as usize + data.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[offset as usize..end].copy_from_slice(data);
}

impl MediumFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock();
        let off = offset as usize;
        buf.fill(0);
        if off < s.current.len() {
            let n = buf.len().min(s.current.len() - off);
            buf[..n].copy_from_slice(&s.current[off..off + n]);
        }
        Ok(())
    }
    /// Everything of a memory medium is in memory.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.faults.lock().fail_io {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut s = self.state.lock();
        write_into(&mut s.current, data, offset);
        s.pending.push(Pending {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.faults.lock().fail_io {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut s = self.state.lock();
        s.durable = s.current.clone();
        s.pending.clear();
        s.len_dirty = false;
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.current.resize(len as usize, 0);
        s.len_dirty = true;
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        let end = ((offset + len) as usize).min(s.current.len());
        if (offset as usize) < end {
            s.current[offset as usize..end].fill(0);
        }
        // The harshest case: the filesystem commits the punch at once (a
        // journaling filesystem may commit it at any time, before any
        // sync), and unsynced writes into the range before it are gone with
        // it. A punch of anything a durable state still references is then
        // lost data after a crash, which the crash tests see.
        let dend = ((offset + len) as usize).min(s.durable.len());
        if (offset as usize) < dend {
            s.durable[offset as usize..dend].fill(0);
        }
        for p in s.pending.iter_mut() {
            let a = offset.max(p.offset);
            let b = (offset + len).min(p.offset + p.data.len() as u64);
            if a < b {
                let o = p.offset;
                p.data[(a - o) as usize..(b - o) as usize].fill(0);
            }
        }
        Ok(())
    }
}

/// Locks the state of every file, in id order.
fn lock_all(dir: &MemDir) -> HashMap<u64, parking_lot::MutexGuard<'_, MemFileState>> {
    let mut ids: Vec<u64> = dir.files.keys().copied().collect();
    ids.sort_unstable();
    ids.into_iter()
        .map(|id| (id, dir.files[&id].state.lock()))
        .collect()
}

#[derive(Default)]
struct MemDir {
    files: HashMap<u64, Arc<MemFile>>,
    current: HashMap<String, u64>,
    durable: HashMap<String, u64>,
    next_id: u64,
}

/// An in-memory medium that can simulate a crash or power loss.
#[derive(Clone, Default)]
pub struct MemMedium {
    dir: Arc<Mutex<MemDir>>,
    faults: Arc<Mutex<Faults>>,
}

impl MemMedium {
    /// An empty medium.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: every file falls back to its durable bytes
    /// plus those unsynced writes `keep(file, index)` chooses (the kernel may
    /// have written any of them back, in any order); names fall back to the
    /// last `sync_dir`. Returns a fresh medium with what survived.
    pub fn crash(&self, mut keep: impl FnMut(&str, usize) -> bool) -> MemMedium {
        let dir = self.dir.lock();
        let mut out = MemDir {
            next_id: dir.next_id,
            ..Default::default()
        };
        let faults = Arc::new(Mutex::new(Faults::default()));
        // Every file at one instant, as a power loss would (a background
        // thread may be syncing one file while another is copied).
        let states = lock_all(&dir);
        let mut names: Vec<_> = dir.durable.iter().collect();
        names.sort();
        for (name, id) in names {
            let s = &states[id];
            let mut bytes = s.durable.clone();
            for (i, p) in s.pending.iter().enumerate() {
                if keep(name, i) {
                    write_into(&mut bytes, &p.data, p.offset);
                }
            }
            let nf = MemFile {
                state: Mutex::new(MemFileState {
                    current: bytes.clone(),
                    durable: bytes,
                    ..Default::default()
                }),
                faults: faults.clone(),
            };
            out.files.insert(*id, Arc::new(nf));
            out.current.insert(name.clone(), *id);
            out.durable.insert(name.clone(), *id);
        }
        MemMedium {
            dir: Arc::new(Mutex::new(out)),
            faults,
        }
    }

    /// Simulates a process kill (not a power loss): every completed write
    /// survives, as it would in the page cache.
    pub fn kill(&self) -> MemMedium {
        let dir = self.dir.lock();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let mut out = MemDir {
            next_id: dir.next_id,
            ..Default::default()
        };
        let states = lock_all(&dir);
        for (name, id) in &dir.current {
            let bytes = states[id].current.clone();
            let nf = MemFile {
                state: Mutex::new(MemFileState {
                    current: bytes.clone(),
                    durable: bytes,
                    ..Default::default()
                }),
                faults: faults.clone(),
            };
            out.files.insert(*id, Arc::new(nf));
            out.current.insert(name.clone(), *id);
            out.durable.insert(name.clone(), *id);
        }
        MemMedium {
            dir: Arc::new(Mutex::new(out)),
            faults,
        }
    }

    /// From now on every write and sync fails with EIO.
    pub fn fail_all_io(&self) {
        self.faults.lock().fail_io = true;
    }

    /// Flips one byte of a file (as seen now), for corruption tests.
    pub fn corrupt(&self, name: &str, offset: u64) {
        let dir = self.dir.lock();
        if let Some(id) = dir.current.get(name) {
            let mut s = dir.files[id].state.lock();
            if let Some(b) = s.current.get_mut(offset as usize) {
                *b ^= 0x5a;
            }
        }
    }
}

impl Medium for MemMedium {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        let mut dir = self.dir.lock();
        if let Some(id) = dir.current.get(name) {
            return Ok(dir.files[id].clone());
        }
        if !create {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let id = dir.next_id;
        dir.next_id += 1;
        let f = Arc::new(MemFile {
            state: Mutex::new(MemFileState::default()),
            faults: self.faults.clone(),
        });
        dir.files.insert(id, f.clone());
        dir.current.insert(name.to_string(), id);
        Ok(f)
    }
    fn exists(&self, name: &str) -> bool {
        self.dir.lock().current.contains_key(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut dir = self.dir.lock();
        let id = dir
            .current
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        dir.current.insert(to.to_string(), id);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.dir.lock().current.remove(name);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        if self.faults.lock().fail_io {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut dir = self.dir.lock();
        dir.durable = dir.current.clone();
        Ok(())
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.dir.lock().current.keys().cloned().collect())
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn describe(&self) -> String {
        "memory medium".into()
    }
}
