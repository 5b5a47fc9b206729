//! The directory tree of the FUSE view: inode numbers and listings built
//! from the pool on demand.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use parking_lot::Mutex;
use store::{ErrorKind, ExtentKind, Pool, SnapshotInfo};

/// Suffix of a point file.
pub(super) const IMG_SUFFIX: &str = ".img";

/// Bytes per `st_blocks` unit.
const STAT_BLOCK: u64 = 512;

/// What an inode stands for.
#[derive(Debug)]
pub(super) enum Node {
    /// The mount point: one directory per site.
    Root,
    /// `DIR/<site>`: the volumes of one site.
    Site { site: String },
    /// `DIR/<site>/<volume>`: the points of one volume.
    Volume {
        /// The name in the pool (`S/V` for a mirror received from site S).
        pool_name: String,
    },
    /// `DIR/<site>/<volume>/<point>.img`: one immutable point.
    Point(Arc<PointNode>),
}

/// One snapshot / backup point, as first seen. A point never changes, so
/// everything here stays true for as long as the point exists.
#[derive(Debug)]
pub(super) struct PointNode {
    pub ino: u64,
    pub pool_name: String,
    pub point: String,
    pub size: u64,
    pub created_ms: u64,
    /// Data bytes of the point in 512-byte units, computed on first use.
    blocks: OnceLock<u64>,
}

impl PointNode {
    /// Whether `s` is this very point (not one deleted and re-created under
    /// the same name).
    pub fn is(&self, s: &SnapshotInfo) -> bool {
        s.name == self.point && s.created_ms == self.created_ms && s.size == self.size
    }

    /// `volume@point`, for logs.
    pub fn label(&self) -> String {
        format!("{}@{}", self.pool_name, self.point)
    }
}

/// Identity of a tree object; equal keys get the same inode number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Site(String),
    Volume {
        site: String,
        pool_name: String,
    },
    Point {
        pool_name: String,
        point: String,
        created_ms: u64,
        size: u64,
    },
}

/// A child as found in a listing, before it has an inode number.
enum Child {
    Site(String),
    Volume {
        site: String,
        name: String,
        pool_name: String,
    },
    Point {
        pool_name: String,
        info: SnapshotInfo,
    },
}

impl Child {
    fn name(&self) -> String {
        match self {
            Child::Site(s) => s.clone(),
            Child::Volume { name, .. } => name.clone(),
            Child::Point { info, .. } => format!("{}{IMG_SUFFIX}", info.name),
        }
    }

    fn key(&self) -> Key {
        match self {
            Child::Site(s) => Key::Site(s.clone()),
            Child::Volume {
                site, pool_name, ..
            } => Key::Volume {
                site: site.clone(),
                pool_name: pool_name.clone(),
            },
            Child::Point { pool_name, info } => Key::Point {
                pool_name: pool_name.clone(),
                point: info.name.clone(),
                created_ms: info.created_ms,
                size: info.size,
            },
        }
    }

    fn kind(&self) -> FileType {
        match self {
            Child::Point { .. } => FileType::RegularFile,
            _ => FileType::Directory,
        }
    }
}

/// One directory entry as listed.
pub(super) struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: String,
}

struct Inodes {
    next: u64,
    by_key: HashMap<Key, u64>,
    nodes: HashMap<u64, Arc<Node>>,
}

/// The tree: the pool plus the inode table.
pub(super) struct Tree {
    pub pool: Arc<Pool>,
    local_site: String,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
    inodes: Mutex<Inodes>,
}

/// Splits a pool volume name into (site, shown name): `S/V` is volume V
/// of site S (a received mirror), any other name a local volume. Names
/// with more than one '/' have no place in the tree.
pub(super) fn split_volume_name<'a>(
    local: &'a str,
    pool_name: &'a str,
) -> Option<(&'a str, &'a str)> {
    match pool_name.split_once('/') {
        None => Some((local, pool_name)),
        Some((s, v)) if is_component(s) && is_component(v) => Some((s, v)),
        Some(_) => None,
    }
}

/// Whether `s` can be one path component.
pub(super) fn is_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

fn time_of_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The errno for a store error met while serving the tree or a file.
pub(super) fn errno_of(e: &store::Error) -> Errno {
    match e.kind() {
        ErrorKind::NotFound => Errno::ENOENT,
        ErrorKind::Deleted => Errno::ESTALE,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => Errno::EINVAL,
        ErrorKind::NoSpace => Errno::ENOSPC,
        ErrorKind::Corruption | ErrorKind::Io => Errno::EIO,
        _ => Errno::EIO,
    }
}

impl Tree {
    pub fn new(pool: Arc<Pool>, local_site: String) -> Tree {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut nodes = HashMap::new();
        nodes.insert(INodeNo::ROOT.0, Arc::new(Node::Root));
        Tree {
            pool,
            local_site,
            mounted_at: SystemTime::now(),
            uid,
            gid,
            inodes: Mutex::new(Inodes {
                next: INodeNo::ROOT.0 + 1,
                by_key: HashMap::new(),
                nodes,
            }),
        }
    }

    /// The node behind an inode number the kernel holds.
    pub fn node(&self, ino: u64) -> Option<Arc<Node>> {
        self.inodes.lock().nodes.get(&ino).cloned()
    }

    /// The inode number of `child`, assigned on first sight.
    fn intern(&self, child: Child) -> (u64, Arc<Node>) {
        let key = child.key();
        let mut t = self.inodes.lock();
        if let Some(&ino) = t.by_key.get(&key) {
            let node = t.nodes[&ino].clone();
            return (ino, node);
        }
        let ino = t.next;
        t.next += 1;
        let node = Arc::new(match child {
            Child::Site(site) => Node::Site { site },
            Child::Volume { pool_name, .. } => Node::Volume { pool_name },
            Child::Point { pool_name, info } => Node::Point(Arc::new(PointNode {
                ino,
                pool_name,
                point: info.name,
                size: info.size,
                created_ms: info.created_ms,
                blocks: OnceLock::new(),
            })),
        });
        t.by_key.insert(key, ino);
        t.nodes.insert(ino, node.clone());
        (ino, node)
    }

    /// Volumes of the pool as (site, shown name, pool name); a local
    /// volume wins over a mirror of the same shown name under the local site.
    fn volumes(&self) -> BTreeMap<(String, String), String> {
        let mut out = BTreeMap::new();
        for v in self.pool.volumes() {
            let Some((site, name)) = split_volume_name(&self.local_site, &v.name) else {
                tracing::debug!(volume = %v.name, "volume name has no place in the FUSE view");
                continue;
            };
            let local = !v.name.contains('/');
            let key = (site.to_string(), name.to_string());
            if local || !out.contains_key(&key) {
                out.insert(key, v.name.clone());
            }
        }
        out
    }

    /// The children of a directory node, fresh from the pool.
    fn children(&self, node: &Node) -> Result<Vec<Child>, Errno> {
        match node {
            Node::Root => {
                let mut sites: Vec<String> = self.volumes().into_keys().map(|(s, _)| s).collect();
                sites.push(self.local_site.clone());
                sites.sort();
                sites.dedup();
                Ok(sites.into_iter().map(Child::Site).collect())
            }
            Node::Site { site } => Ok(self
                .volumes()
                .into_iter()
                .filter(|((s, _), _)| s == site)
                .map(|((s, name), pool_name)| Child::Volume {
                    site: s,
                    name,
                    pool_name,
                })
                .collect()),
            Node::Volume { pool_name, .. } => {
                let snaps = self.pool.snapshots(pool_name).map_err(|e| errno_of(&e))?;
                Ok(snaps
                    .into_iter()
                    .filter(|s| is_component(&s.name))
                    .map(|info| Child::Point {
                        pool_name: pool_name.clone(),
                        info,
                    })
                    .collect())
            }
            Node::Point(_) => Err(Errno::ENOTDIR),
        }
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<(u64, Arc<Node>), Errno> {
        let pnode = self.node(parent).ok_or(Errno::ESTALE)?;
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        // Cheap pre-filter: a volume directory holds only `*.img` files.
        if matches!(*pnode, Node::Volume { .. }) && !name.ends_with(IMG_SUFFIX) {
            return Err(Errno::ENOENT);
        }
        let child = self
            .children(&pnode)?
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or(Errno::ENOENT)?;
        Ok(self.intern(child))
    }

    /// The entries of directory `ino` (without "." and "..") and the inode
    /// number of its parent.
    pub fn list(&self, ino: u64) -> Result<(u64, Vec<DirEntry>), Errno> {
        let node = self.node(ino).ok_or(Errno::ESTALE)?;
        let children = self.children(&node)?;
        let parent = match &*node {
            Node::Root => ino,
            Node::Site { .. } => INodeNo::ROOT.0,
            Node::Volume { pool_name, .. } => {
                let (site, _) =
                    split_volume_name(&self.local_site, pool_name).ok_or(Errno::ENOENT)?;
                self.intern(Child::Site(site.to_string())).0
            }
            Node::Point(_) => return Err(Errno::ENOTDIR),
        };
        let entries = children
            .into_iter()
            .map(|c| {
                let (name, kind) = (c.name(), c.kind());
                let (ino, _) = self.intern(c);
                DirEntry { ino, kind, name }
            })
            .collect();
        Ok((parent, entries))
    }

    /// Whether the point still exists (the very point, not a namesake).
    pub fn point_exists(&self, p: &PointNode) -> Result<bool, Errno> {
        match self.pool.snapshots(&p.pool_name) {
            Ok(snaps) => Ok(snaps.iter().any(|s| p.is(s))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// Current attributes of a node; `ENOENT` once it is gone from the pool.
    pub fn attr(&self, ino: u64, node: &Node) -> Result<FileAttr, Errno> {
        match node {
            Node::Root => Ok(self.dir_attr(ino, self.mounted_at)),
            Node::Site { site } => {
                let present =
                    *site == self.local_site || self.volumes().keys().any(|(s, _)| s == site);
                if present {
                    Ok(self.dir_attr(ino, self.mounted_at))
                } else {
                    Err(Errno::ENOENT)
                }
            }
            Node::Volume { pool_name, .. } => {
                let v = self.pool.volume_info(pool_name).map_err(|e| errno_of(&e))?;
                Ok(self.dir_attr(ino, time_of_ms(v.created_ms)))
            }
            Node::Point(p) => {
                if !self.point_exists(p)? {
                    return Err(Errno::ENOENT);
                }
                Ok(self.point_attr(p))
            }
        }
    }

    fn dir_attr(&self, ino: u64, t: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: store::BLOCK as u32,
            flags: 0,
        }
    }

    /// Attributes of a point file (mode 0444, times = creation of the point).
    pub fn point_attr(&self, p: &PointNode) -> FileAttr {
        let t = time_of_ms(p.created_ms);
        FileAttr {
            ino: INodeNo(p.ino),
            size: p.size,
            blocks: self.point_blocks(p),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: store::BLOCK as u32,
            flags: 0,
        }
    }

    /// `st_blocks` of a point: its data extents (holes and known zeros take
    /// no space). Tools such as `cp` look at it to decide whether to look
    /// for holes. Computed once per point: points never change.
    fn point_blocks(&self, p: &PointNode) -> u64 {
        *p.blocks.get_or_init(|| {
            let vol = match self.pool.open_snapshot(&p.pool_name, &p.point) {
                Ok(v) => v,
                Err(_) => return p.size.div_ceil(STAT_BLOCK),
            };
            match vol.extents(0, p.size) {
                Ok(ext) => ext
                    .iter()
                    .filter(|e| e.kind == ExtentKind::Data)
                    .map(|e| e.length)
                    .sum::<u64>()
                    .div_ceil(STAT_BLOCK),
                Err(_) => p.size.div_ceil(STAT_BLOCK),
            }
        })
    }

    /// Space figures for `statfs`: (total 4 KiB blocks, data blocks in use).
    pub fn space(&self) -> (u64, u64) {
        let vols = self.pool.volumes();
        let used: u64 = vols.iter().map(|v| v.allocated_bytes).sum();
        let blk = store::BLOCK as u64;
        (used.div_ceil(blk), used.div_ceil(blk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_map_to_sites() {
        assert_eq!(split_volume_name("here", "vm1"), Some(("here", "vm1")));
        assert_eq!(split_volume_name("here", "far/vm1"), Some(("far", "vm1")));
        assert_eq!(split_volume_name("here", "a/b/c"), None);
        assert_eq!(split_volume_name("here", "/x"), None);
        assert_eq!(split_volume_name("here", "x/"), None);
        assert_eq!(split_volume_name("here", "../x"), None);
    }
}
