//! The FUSE operations of the view: `fuser::Filesystem` on top of [`Tree`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request,
};
use parking_lot::Mutex;
use store::{ErrorKind, ExtentKind, Volume};

use super::tree::{errno_of, Node, PointNode, Tree};

/// How long the kernel may trust a directory's attributes and any name
/// lookup (directories and point names alike): the tree follows the pool
/// within about this long.
pub const DIR_TTL: Duration = Duration::from_secs(1);
/// How long the kernel may trust a point file's attributes: points never
/// change, only vanish, and the short entry TTL takes care of that.
pub const POINT_ATTR_TTL: Duration = Duration::from_secs(3600);
/// Largest read and readahead we ask the kernel for.
pub(super) const MAX_IO: u32 = 1 << 20;

/// An open point file: the store handle, bound to the point's epoch, so a
/// deleted point reads as an error and never as another state's data.
struct OpenFile {
    vol: Volume,
    node: Arc<PointNode>,
}

pub(super) struct ViewFs {
    tree: Tree,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
}

thread_local! {
    /// Each dispatch thread reads into its own reusable buffer.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl ViewFs {
    pub fn new(tree: Tree) -> ViewFs {
        ViewFs {
            tree,
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<OpenFile>> {
        self.files.lock().get(&fh.0).cloned()
    }

    fn reply_entry(&self, ino: u64, node: &Node, reply: ReplyEntry) {
        match node {
            Node::Point(p) => {
                let attr = self.tree.point_attr(p);
                reply.entry_with_ttls(&POINT_ATTR_TTL, &DIR_TTL, &attr, Generation(0));
            }
            _ => match self.tree.attr(ino, node) {
                Ok(attr) => reply.entry(&DIR_TTL, &attr, Generation(0)),
                Err(e) => reply.error(e),
            },
        }
    }

    /// Serves one read: one buffer, filled by the store's read path (which
    /// answers holes with zeros without touching the data file).
    fn read_point(&self, f: &OpenFile, offset: u64, size: u32, reply: ReplyData) {
        let end = f.node.size;
        if offset >= end || size == 0 {
            reply.data(&[]);
            return;
        }
        let len = (size as u64).min(end - offset) as usize;
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match f.vol.read_at(&mut buf[..len], offset) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => {
                    let errno = errno_of(&e);
                    match e.kind() {
                        ErrorKind::Deleted | ErrorKind::NotFound => tracing::warn!(
                            volume = %f.node.pool_name,
                            point = %f.node.point,
                            offset,
                            len,
                            "FUSE read of a point deleted while open: {e}"
                        ),
                        _ => tracing::error!(
                            volume = %f.node.pool_name,
                            point = %f.node.point,
                            offset,
                            len,
                            "FUSE read failed: {e}"
                        ),
                    }
                    reply.error(errno);
                }
            }
        });
    }

    /// SEEK_DATA / SEEK_HOLE from the point's extents. Holes and known
    /// zeros both count as holes: they read as zeros and take no space.
    fn seek(&self, f: &OpenFile, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = f.node.size;
        if offset < 0 || offset as u64 >= size {
            return Err(Errno::ENXIO);
        }
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno::EINVAL),
        };
        // Scan in growing windows: the cost follows the map entries looked
        // at, not the virtual size.
        let mut pos = offset as u64;
        let mut window: u64 = 64 << 20;
        while pos < size {
            let len = window.min(size - pos);
            let ext = f.vol.extents(pos, len).map_err(|e| {
                tracing::warn!(volume = %f.node.pool_name, point = %f.node.point, "FUSE lseek failed: {e}");
                errno_of(&e)
            })?;
            for e in &ext {
                let is_data = e.kind == ExtentKind::Data;
                if is_data == want_data {
                    return Ok(e.offset.max(pos) as i64);
                }
            }
            pos += len;
            window = (window * 2).min(64 << 30);
        }
        if want_data {
            Err(Errno::ENXIO)
        } else {
            // The implicit hole at the end of the file.
            Ok(size as i64)
        }
    }
}

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Requests of up to 1 MiB (max_pages follows max(max_write, readahead)).
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        // Let readahead keep several requests in flight for the worker threads.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent.0, name) {
            Ok((ino, node)) => self.reply_entry(ino, &node, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file answers from its handle: fstat works until close.
        if let Some(f) = fh.and_then(|fh| self.file(fh)) {
            reply.attr(&POINT_ATTR_TTL, &self.tree.point_attr(&f.node));
            return;
        }
        let Some(node) = self.tree.node(ino.0) else {
            reply.error(Errno::ESTALE);
            return;
        };
        let ttl = match *node {
            Node::Point(_) => POINT_ATTR_TTL,
            _ => DIR_TTL,
        };
        match self.tree.attr(ino.0, &node) {
            Ok(attr) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(node) = self.tree.node(ino.0) else {
            reply.error(Errno::ESTALE);
            return;
        };
        let Node::Point(p) = &*node else {
            reply.error(Errno::EISDIR);
            return;
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let vol = match self.tree.pool.open_snapshot(&p.pool_name, &p.point) {
            Ok(v) => v,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                reply.error(Errno::ENOENT);
                return;
            }
            Err(e) => {
                tracing::warn!(point = %p.label(), "FUSE open failed: {e}");
                reply.error(errno_of(&e));
                return;
            }
        };
        // The handle binds whatever carries the name now; make sure that is
        // this inode's point and not a namesake created after a delete.
        match self.tree.point_exists(p) {
            Ok(true) => {}
            Ok(false) => {
                reply.error(Errno::ESTALE);
                return;
            }
            Err(e) => {
                reply.error(e);
                return;
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(
            fh,
            Arc::new(OpenFile {
                vol,
                node: p.clone(),
            }),
        );
        // Points are immutable: keep the page cache across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.file(fh) {
            Some(f) => self.read_point(&f, offset, size, reply),
            None => reply.error(Errno::EBADF),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(f) = self.file(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        match self.seek(&f, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // nothing is ever written
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.lock().remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.node(ino.0).as_deref() {
            Some(Node::Point(_)) => reply.error(Errno::ENOTDIR),
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ESTALE),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Listed fresh from the pool on every call, so new points show and
        // deleted ones vanish at once (no FOPEN_CACHE_DIR).
        let (parent, entries) = match self.tree.list(ino.0) {
            Ok(x) => x,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let dots = [
            (ino.0, fuser::FileType::Directory, "."),
            (parent, fuser::FileType::Directory, ".."),
        ];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|e| (e.ino, e.kind, e.name.as_str())));
        for (i, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // Operations the view does not have. Answered here with ENOSYS so the
    // kernel stops asking (and fuser logs no "not implemented" warnings).

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // Copies out of the view go through read (the target is elsewhere).
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, used) = self.tree.space();
        reply.statfs(
            blocks,
            blocks - used,
            blocks - used,
            0,
            0,
            store::BLOCK as u32,
            255,
            store::BLOCK as u32,
        );
    }
}
