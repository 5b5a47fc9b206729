//! A wrapper of the in-memory medium that runs out of room: after `left`
//! more writes (file creations and extensions count), every one fails
//! until `left` is raised; it reports the free space `free` says. Shared
//! by the test files that need it.
#![allow(dead_code)] // each test file uses its own part

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use store::{Medium, MediumFile, MemMedium};

/// `left` without a limit.
pub const ROOM: u64 = u64::MAX;

/// What runs out, and how. Clones share their state.
#[derive(Clone)]
pub struct Limits {
    /// Writes that still succeed (`ROOM`: no limit).
    pub left: Arc<AtomicU64>,
    /// Only files whose name starts with this count (and fail).
    only: Arc<Mutex<Option<&'static str>>>,
    /// A failing write first writes half its bytes, as a real `pwrite`
    /// writes what fits.
    short: Arc<AtomicBool>,
    /// The error of a failing write.
    errno: i32,
    /// Removing this file gives room for this many writes.
    freed_by: Arc<Mutex<Option<(&'static str, u64)>>>,
    /// The free space the medium reports (`Medium::available`).
    pub free: Arc<AtomicU64>,
}

impl Limits {
    pub fn new(errno: i32) -> Self {
        Limits {
            left: Arc::new(AtomicU64::new(ROOM)),
            only: Arc::new(Mutex::new(None)),
            short: Arc::new(AtomicBool::new(false)),
            errno,
            freed_by: Arc::new(Mutex::new(None)),
            free: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Removing file `name` (when it exists) gives room for `writes` more.
    pub fn freed_by(&self, name: &'static str, writes: u64) {
        *self.freed_by.lock().unwrap() = Some((name, writes));
    }

    /// Only files whose name starts with `prefix` run out (`None`: all).
    pub fn only(&self, prefix: Option<&'static str>) {
        *self.only.lock().unwrap() = prefix;
    }

    pub fn short(&self, on: bool) {
        self.short.store(on, Ordering::SeqCst);
    }

    /// One write to `file`: allowed, or the error.
    fn take(&self, file: &str) -> io::Result<()> {
        if let Some(p) = *self.only.lock().unwrap() {
            if !file.starts_with(p) {
                return Ok(());
            }
        }
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                ROOM => Some(ROOM),
                0 => None,
                n => Some(n - 1),
            })
            .map(|_| ())
            .map_err(|_| io::Error::from_raw_os_error(self.errno))
    }
}

/// The medium: `m` within `limits`.
pub struct Limited {
    pub m: MemMedium,
    pub limits: Limits,
}

struct LimitedFile {
    f: Arc<dyn MediumFile>,
    name: String,
    limits: Limits,
}

impl MediumFile for LimitedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.f.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Err(e) = self.limits.take(&self.name) {
            if self.limits.short.load(Ordering::SeqCst) {
                self.f.write_at(&data[..data.len() / 2], offset)?;
            }
            return Err(e);
        }
        self.f.write_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.f.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.f.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.f.len()? {
            self.limits.take(&self.name)?;
        }
        self.f.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.f.punch_hole(offset, len)
    }
}

impl Medium for Limited {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        if create && !self.m.exists(name) {
            self.limits.take(name)?;
        }
        Ok(Arc::new(LimitedFile {
            f: self.m.open(name, create)?,
            name: name.to_string(),
            limits: self.limits.clone(),
        }))
    }
    fn exists(&self, name: &str) -> bool {
        self.m.exists(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.m.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        if let Some((n, writes)) = *self.limits.freed_by.lock().unwrap() {
            if n == name && self.m.exists(name) {
                self.limits.left.store(writes, Ordering::SeqCst);
            }
        }
        self.m.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.m.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.m.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn describe(&self) -> String {
        "limited memory medium".into()
    }
    fn available(&self) -> io::Result<u64> {
        Ok(self.limits.free.load(Ordering::SeqCst))
    }
}
