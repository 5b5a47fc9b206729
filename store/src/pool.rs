//! The pool: volumes, their redirect-on-write maps, the journal, checkpoints,
//! flush and recovery. See the crate doc for the format and the lock table.

use crate::alloc::{merge, Alloc, Freed, Run, SlotSet};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, decode_frame, Decoded, Record, UpdateItem};
use crate::medium::{DirMedium, Medium, MediumFile};
use crate::pages::{Key, PageStore, PagedMap, PAGE_BYTES};
use crate::{
    Damage, Diff, Extent, ExtentKind, Loc, PointId, PoolOptions, SnapshotInfo, VerifyReport,
    Version, VolumeInfo, VolumeOptions, BLOCK,
};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const B: u64 = BLOCK as u64;
const DATA_FILE: &str = "data";
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const META_FILE: &str = "meta";
/// The space reserve ([`PoolOptions::space_reserve_bytes`]), and the file
/// it is built in first, so that the reserve exists only whole.
const RESERVE: &str = "reserve";
const RESERVE_TMP: &str = "reserve.tmp";
/// How long after a failure to build it the reserve is tried again.
const RESERVE_RETRY: std::time::Duration = std::time::Duration::from_secs(60);
const STRIPES: usize = 256;
/// Largest volume: 1 PiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// Sizes are whole sectors.
pub const SIZE_ALIGN: u64 = 512;
/// Page directory entries per checkpoint frame.
const CKPT_CHUNK: usize = 4096;

fn journal_name(id: u64) -> String {
    format!("journal.{id:016}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks a volume or snapshot name.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidName,
            format!("invalid {what} name {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 200 {
        return bad("longer than 200 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || *c == '/' || *c == '@')
    {
        return bad(&format!(
            "{c:?} is not allowed (no '/', '@' or control characters)"
        ));
    }
    // Names show in tables, logs, export names and file names: ones that
    // look like another name there are refused.
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return bad("it starts or ends with a space");
    }
    if let Some(c) = name.chars().find(|&c| invisible(c)) {
        return bad(&format!(
            "{c:?} is an invisible character (zero-width or a text-direction mark)"
        ));
    }
    Ok(())
}

/// Characters that print as nothing, or reorder the text around them.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}')
}

fn validate_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SIZE_ALIGN) || size > MAX_VOLUME_SIZE {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "invalid volume size {size}: it must be a non-zero multiple of 512 bytes, at most 1 PiB"
            ),
        ));
    }
    Ok(())
}

pub(crate) struct Snap {
    pub name: String,
    pub size: u64,
    pub created_ms: u64,
}

/// The state of one volume; guarded by `VolCell::st`.
pub(crate) struct VolState {
    pub size: u64,
    pub created_ms: u64,
    /// The head's epoch: writes now are born in it.
    pub epoch: u32,
    /// Live snapshots by epoch: a snapshot sees, per block, the entry with
    /// the largest birth ≤ its epoch.
    pub snaps: BTreeMap<u32, Snap>,
    /// (block, birth) → location, paged (see pages.rs).
    pub map: PagedMap,
    pub data_entries: u64,
    pub deleted: bool,
    /// Changed blocks per epoch, fed by `apply_update`.
    pub cbt: cbt::Tracker,
    /// (first, last, upto): blocks whose map entries born up to epoch `upto`
    /// were lost with a damaged map page.
    pub damaged: Vec<(u64, u64, u32)>,
    /// Garbage collection still to do: from this block on, the map may
    /// hold entries no view sees (a snapshot was deleted, or open found
    /// such entries). Collectors advance it batch by batch; a deletion
    /// sets it back to 0.
    pub gc_from: Option<u64>,
}

impl VolState {
    fn snap_by_name(&self, name: &str) -> Option<u32> {
        self.snaps
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(e, _)| *e)
    }

    /// Applies a map record; returns the slots it stopped referencing.
    /// Cannot fail for blocks whose pages [`VolState::plan`] (or
    /// `prepare`) made dirty.
    fn apply_update(
        &mut self,
        birth: u32,
        items: &[UpdateItem],
        freed: &mut Vec<u64>,
    ) -> Result<()> {
        for it in items {
            self.cbt.mark(birth, it.block * B, B);
            if let Some(l) = it.set {
                if let Loc::Data { .. } = l {
                    self.data_entries = self.data_entries.wrapping_add(1);
                }
                match self.map.insert((it.block, birth), l)? {
                    // Overwritten in place: the slot stays in use.
                    Some(Loc::Data { slot, .. }) if matches!(l, Loc::Data { slot: s, .. } if s == slot) =>
                    {
                        self.data_entries = self.data_entries.wrapping_sub(1);
                    }
                    Some(old) => self.forget(old, freed),
                    None => {}
                }
            }
            // After the set (a different key): a page emptied here stays
            // in the directory until the next checkpoint, so no later item
            // lands in a page `plan` did not prepare.
            if let Some(t) = it.drop {
                if let Some(old) = self.map.remove((it.block, t))? {
                    self.forget(old, freed);
                }
            }
        }
        self.map.spill_if_due();
        Ok(())
    }

    fn apply_drops(&mut self, items: &[(u64, u32)], freed: &mut Vec<u64>) -> Result<()> {
        for &(b, t) in items {
            if let Some(old) = self.map.remove((b, t))? {
                self.forget(old, freed);
            }
        }
        self.map.spill_if_due();
        Ok(())
    }

    /// Entry counts are exact once the pool is open (see `open_scan`); during
    /// replay they may start from zero, hence wrapping.
    fn forget(&mut self, l: Loc, freed: &mut Vec<u64>) {
        if let Loc::Data { slot, .. } = l {
            self.data_entries = self.data_entries.wrapping_sub(1);
            freed.push(slot);
        }
    }

    /// The update that gives `block` the value `new` on the head, keeping
    /// whatever a live snapshot still sees; `None` when nothing changes.
    /// Makes the block's map pages dirty, so applying it cannot fail.
    fn plan(&mut self, block: u64, new: Loc) -> Result<Option<UpdateItem>> {
        self.map.prepare((block, 0), (block, u32::MAX))?;
        let cur = self.epoch;
        let (latest, entries) = self.map.births(block)?;
        // A block whose entries were lost with a damaged map page reads as
        // an error while it has no entry born since: a hole there is kept
        // as an entry, never made by removing the last one.
        let lost = self.touches_damaged(block, block);
        let Some(t) = latest else {
            return Ok((new != Loc::Hole || lost).then_some(UpdateItem {
                block,
                set: Some(new),
                drop: None,
            }));
        };
        let seen_by_snapshot = t != cur && self.snaps.range(t..cur).next().is_some();
        if seen_by_snapshot {
            return Ok(Some(UpdateItem {
                block,
                set: Some(new),
                drop: None,
            }));
        }
        let older = entries > 1;
        if new == Loc::Hole && !older && !lost {
            return Ok(Some(UpdateItem {
                block,
                set: None,
                drop: Some(t),
            }));
        }
        Ok(Some(UpdateItem {
            block,
            set: Some(new),
            drop: (t != cur).then_some(t),
        }))
    }

    /// The epoch whose change bitmap holds writes born in `birth`: the
    /// first live snapshot at or after it, else the head's.
    fn cbt_epoch(&self, birth: u32) -> u32 {
        self.snaps
            .range(birth..)
            .next()
            .map(|(e, _)| *e)
            .unwrap_or(self.epoch)
    }

    /// At open, one pass over the whole map: counts data entries, collects
    /// the data slots in use into `used`, and rebuilds the change bitmaps
    /// from the entries' births (see the cbt crate).
    fn open_scan(&mut self, used: &mut SlotSet) -> Result<()> {
        let tracking = self.cbt.enabled();
        let mut t = cbt::Tracker::new(self.cbt.granularity().max(4096));
        let mut data = 0u64;
        let snaps: Vec<u32> = self.snaps.keys().copied().collect();
        let head = self.epoch;
        let cbt_epoch = |birth: u32| {
            let i = snaps.partition_point(|&e| e < birth);
            snaps.get(i).copied().unwrap_or(head)
        };
        // Garbage left by a snapshot deletion that a crash cut short.
        let mut garbage = false;
        let mut prev: Option<Key> = None;
        self.map.for_each_page(|entries| {
            for &(b, birth, l) in entries {
                if let Some((pb, pt)) = prev {
                    let i = snaps.partition_point(|&e| e < pt);
                    garbage |= pb == b && snaps.get(i).is_none_or(|&e| e >= birth);
                }
                prev = Some((b, birth));
                if let Loc::Data { slot, .. } = l {
                    data += 1;
                    used.insert(slot);
                }
                if tracking {
                    t.mark(cbt_epoch(birth), b * B, B);
                }
            }
        })?;
        self.data_entries = data;
        self.gc_from = garbage.then_some(0);
        if !tracking {
            return Ok(());
        }
        // Lost metadata: whatever happened there, report it as changed.
        let epochs: Vec<u32> = self
            .snaps
            .keys()
            .copied()
            .chain(std::iter::once(self.epoch))
            .collect();
        for &(first, last, _) in &self.damaged {
            for &e in &epochs {
                t.mark(e, first * B, (last - first + 1) * B);
            }
        }
        self.cbt = t;
        Ok(())
    }

    /// Blocks `(first, last)` lost their map entries with a damaged map
    /// page: views that would see an entry born up to now fail there (and
    /// report it as changed), until the block is written again.
    fn note_lost(&mut self, volume: &str, lost: Vec<(u64, u64)>) {
        if lost.is_empty() {
            return;
        }
        let upto = self.epoch;
        let epochs: Vec<u32> = self
            .snaps
            .keys()
            .copied()
            .chain(std::iter::once(upto))
            .collect();
        for (first, last) in lost {
            tracing::error!(
                volume,
                first_offset = first * B,
                last_offset = last * B + B - 1,
                "metadata page damaged: these blocks read as errors until written or trimmed"
            );
            self.damaged.push((first, last, upto));
            for &e in &epochs {
                self.cbt.mark(e, first * B, (last - first + 1) * B);
            }
        }
        // Writes from now on are born in a later epoch, so they are known
        // good even in the damaged range.
        self.epoch = self.epoch.saturating_add(1);
    }

    /// The blocks of `[from, to)` in ranges of lost map entries, sorted.
    fn lost_in(&self, from: u64, to: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for &(lo, hi, _) in &self.damaged {
            let (a, z) = (lo.max(from), (hi + 1).min(to));
            out.extend(a..z);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether blocks `first..=last` overlap a range of lost map entries.
    fn touches_damaged(&self, first: u64, last: u64) -> bool {
        self.damaged
            .iter()
            .any(|&(lo, hi, _)| lo <= last && first <= hi)
    }

    /// The first block of `[first, first+n)` whose content the view `limit`
    /// cannot know because its metadata was lost.
    fn first_damaged(&self, first: u64, n: u64, limit: u32) -> Result<Option<u64>> {
        for &(lo, hi, upto) in &self.damaged {
            let a = lo.max(first);
            let z = hi.min(first + n - 1);
            if a > z {
                continue;
            }
            for b in a..=z {
                let seen = self.map.latest(b, limit)?.map(|(t, _)| t);
                if seen.is_none_or(|t| t <= upto) {
                    return Ok(Some(b));
                }
            }
        }
        Ok(None)
    }

    /// Entries of blocks `[from, to)` that no view sees: an entry with a
    /// newer one for the same block is seen only by snapshots taken at or
    /// after its birth and before the newer one's; with none left there, it
    /// is garbage. (The newest entry is the head's.) Writes never leave
    /// garbage (`plan` replaces what no snapshot sees); deleting a snapshot
    /// does.
    fn garbage(&self, from: u64, to: u64) -> Result<Vec<Key>> {
        let mut out = Vec::new();
        let mut prev: Option<Key> = None;
        self.map.scan((from, 0), (to, 0), |(b, t), _| {
            if let Some((pb, pt)) = prev {
                if pb == b && self.snaps.range(pt..t).next().is_none() {
                    out.push((pb, pt));
                }
            }
            prev = Some((b, t));
            true
        })?;
        Ok(out)
    }

    /// Whether the entry `(b, t)` exists and is garbage (see `garbage`).
    fn is_garbage(&self, b: u64, t: u32) -> Result<bool> {
        let mut found = false;
        let mut newer = None;
        self.map.scan((b, t), (b + 1, 0), |(_, tt), _| {
            if tt == t {
                found = true;
                true
            } else {
                newer = Some(tt);
                false
            }
        })?;
        Ok(found && newer.is_some_and(|t2| self.snaps.range(t..t2).next().is_none()))
    }

    /// Per block of [first, first+n), the location the view `limit` sees.
    /// With `load` false, only from map pages in memory: false when one
    /// is not (and `locs` is then incomplete).
    fn locate(&self, first: u64, locs: &mut [Loc], limit: u32, load: bool) -> Result<bool> {
        let n = locs.len();
        locs.fill(Loc::Hole);
        let (from, to) = ((first, 0), (first + n as u64, 0));
        let f = |(b, t): (u64, u32), l| {
            if t <= limit {
                locs[(b - first) as usize] = l;
            }
            true
        };
        if load {
            self.map.scan(from, to, f)?;
            Ok(true)
        } else {
            self.map.scan_cached(from, to, f)
        }
    }
}

pub(crate) struct VolCell {
    pub id: u32,
    pub name: String,
    pub st: RwLock<VolState>,
}

struct Vols {
    by_name: HashMap<String, Arc<VolCell>>,
    by_id: HashMap<u32, Arc<VolCell>>,
    next_id: u32,
    pages: Arc<PageStore>,
}

/// The journal is grown with written zeros this much at a time, so that
/// appends overwrite allocated blocks inside the file's size and
/// `fdatasync` has no file metadata to commit.
const JOURNAL_CHUNK: u64 = 4 << 20;
/// The journal's zeros are written this much at a time (see
/// [`Journal::grow`]).
const ZERO_PIECE: u64 = 64 << 10;

struct Journal {
    file: Arc<dyn MediumFile>,
    id: u64,
    pos: u64,
    /// Bytes of the file already allocated (written zeros or frames).
    prealloc: u64,
    /// Growth step: `JOURNAL_CHUNK`, or less for small journal limits.
    chunk: u64,
    seq: u64,
    buf: Vec<u8>,
    /// A frame write failed part way (no space): its bytes may lie past
    /// `pos`, under later shorter frames. Harmless at the tail of the
    /// newest journal (opening cuts a torn tail), but a journal followed by
    /// another is taken as whole, so a checkpoint cuts such bytes off
    /// before it switches.
    stale_tail: bool,
    /// Bytes past `pos` held for records already promised room (see
    /// [`Journal::reserve`]); `pos + reserved <= prealloc` always.
    reserved: u64,
}

impl Journal {
    fn append(&mut self, rec: &Record) -> Result<u64> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        rec.encode_frame(self.seq + 1, &mut buf);
        let r = self.append_frame(&buf);
        self.buf = buf;
        r
    }

    fn append_frame(&mut self, frame: &[u8]) -> Result<u64> {
        self.grow(frame.len() as u64)?;
        if let Err(e) = self.file.write_at(frame, self.pos) {
            self.stale_tail = true;
            return Err(Error::io("cannot append to the metadata journal", e));
        }
        self.pos += frame.len() as u64;
        self.seq += 1;
        Ok(self.seq)
    }

    /// Holds room for a record of up to `len` bytes: its append then only
    /// overwrites written zeros (no allocation on filesystems that
    /// overwrite in place), however many records others append first.
    fn reserve<'a>(this: &'a Mutex<Journal>, len: u64) -> Result<Reserved<'a>> {
        let mut j = this.lock();
        j.grow(len)?;
        j.reserved += len;
        Ok(Reserved { journal: this, len })
    }

    /// Allocates room for `len` more bytes past `pos` and the reserved.
    fn grow(&mut self, len: u64) -> Result<()> {
        let end = self.pos + self.reserved + len;
        if end > self.prealloc {
            let to = end.div_ceil(self.chunk) * self.chunk;
            // In pieces of ZERO_PIECE: the page cache keeps the pages of
            // one write together as a folio as large as the write (up to
            // 2 MiB), and every later small append into a folio walks all
            // of its blocks (measured on ext4: 5.4 µs per append into a
            // file grown 4 MiB at a time, 0.44 µs at 64 KiB).
            let zeros = vec![0u8; ZERO_PIECE.min(to - self.prealloc) as usize];
            let mut at = self.prealloc;
            while at < to {
                let n = (to - at).min(ZERO_PIECE) as usize;
                self.file
                    .write_at(&zeros[..n], at)
                    .map_err(|e| Error::io("cannot grow the metadata journal", e))?;
                at += n as u64;
                self.prealloc = at;
            }
        }
        Ok(())
    }
}

/// The records a request appended, for FUA: flushing up to its last one
/// flushes the earlier ones too. A part that changed nothing (record 0)
/// may rest on records not flushed yet, even ones appended after the
/// request's own (a FUA trim after a plain trim of the same block), so
/// then everything is flushed.
#[derive(Default, Clone, Copy)]
struct Records {
    last: u64,
    unchanged: bool,
}

impl Records {
    fn add(&mut self, seq: u64) {
        self.unchanged |= seq == 0;
        self.last = self.last.max(seq);
    }
}

/// Journal room held for one record; given back unless used.
struct Reserved<'a> {
    journal: &'a Mutex<Journal>,
    len: u64,
}

impl Reserved<'_> {
    /// Appends `rec` (at most the reserved length) in the room held.
    fn append(mut self, rec: &Record) -> Result<u64> {
        let mut j = self.journal.lock();
        j.reserved -= std::mem::take(&mut self.len);
        j.append(rec)
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            self.journal.lock().reserved -= self.len;
        }
    }
}

struct FlushState {
    durable_upto: u64,
    /// Set when a sync of a flush or checkpoint failed: it may have dropped
    /// written pages that a later sync would not report again (Linux marks
    /// them clean), so no later flush may promise durability. Reopening the
    /// pool recovers from what is really on the medium. A failed write
    /// (no space, say) leaves nothing behind that a later flush would
    /// wrongly call durable, so it fails that flush only: the next one,
    /// once there is room, makes everything durable.
    broken: Option<String>,
}

impl FlushState {
    /// Passes on the result of a sync, remembering a failure for good.
    fn synced<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!(error = %e, "a sync failed; later flushes fail too until the pool is reopened");
            self.broken = Some(e.to_string());
        }
        r
    }
}

pub(crate) struct Inner {
    medium: Arc<dyn Medium>,
    _lock: Arc<dyn Send + Sync>,
    data: Arc<dyn MediumFile>,
    vols: RwLock<Vols>,
    journal: Mutex<Journal>,
    alloc: Mutex<Alloc>,
    /// Readers hold it shared while they read slots; freed slots become
    /// reusable only after an exclusive acquisition, so no reader can see a
    /// slot it located being rewritten.
    reuse: RwLock<()>,
    /// Serialises read-modify-write of partial blocks.
    stripes: Vec<Mutex<()>>,
    flush: Mutex<FlushState>,
    data_dirty: AtomicBool,
    opts: PoolOptions,
    flusher: Arc<Bell>,
    /// Rung when a garbage collection is left for the background.
    collector: Arc<Bell>,
    /// In-place overwrites hold it shared (try-lock: they fall back to
    /// redirect-on-write when it is taken) from their check until their
    /// record is applied; flush and checkpoint take it exclusively to
    /// capture the sequence number they make durable, and readers that saw
    /// a checksum mismatch take it to wait out overwrites in progress.
    inplace: RwLock<()>,
    /// The highest sequence number a flush or checkpoint has captured.
    captured: AtomicU64,
    /// Slot → sequence number of the record that last wrote it, for slots
    /// written since the last capture (bounded; pruned at capture).
    fresh: Mutex<HashMap<u64, u64>>,
    /// Set (with the error) when an in-place overwrite failed part-way:
    /// every later flush fails (see `overwrite_in_place`).
    torn: Mutex<Option<String>>,
    /// Serialises volume resizes.
    resizing: Mutex<()>,
    /// The map pages' file and cache.
    pages: Arc<PageStore>,
    /// When building the space reserve may be tried again after a failure.
    reserve_retry: Mutex<Option<Instant>>,
    /// Whether the space reserve is in place at its size; while not, new
    /// data keeps its size free on the filesystem (see `room_for`).
    reserve_held: AtomicBool,
    /// New space allocated under that rule and not written yet.
    space_claimed: AtomicU64,
}

/// At most this many slots are remembered as fresh (in-place candidates):
/// 256 MiB of data written between two flushes, about 2 MiB of memory.
const FRESH_MAX: usize = 1 << 16;

/// A pool of thin volumes in one directory (or any [`Medium`]).
pub struct Pool {
    inner: Arc<Inner>,
    flusher: Option<std::thread::JoinHandle<()>>,
    collector: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.collector.stop(self.collector.take());
        self.inner.flusher.stop(self.flusher.take());
    }
}

/// Which state of a volume a handle reads.
#[derive(Clone)]
enum View {
    Head,
    Snapshot { epoch: u32, name: String },
}

/// An open volume: the read-write head or a read-only snapshot. Cheap to
/// clone; every method is thread-safe and blocking.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
    cell: Arc<VolCell>,
    view: View,
}

impl Pool {
    /// Opens the pool in `dir`, creating it when missing.
    pub fn open(dir: impl AsRef<Path>, opts: PoolOptions) -> Result<Arc<Pool>> {
        let dir = dir.as_ref();
        let m = DirMedium::new(dir)
            .map_err(|e| Error::io(format!("cannot create data directory {}", dir.display()), e))?;
        Self::open_medium(Arc::new(m), opts)
    }

    /// Whether `dir` holds a pool (its data, meta or checkpoint file), so
    /// that tools that only inspect one can refuse a wrong directory
    /// instead of creating a pool there.
    pub fn exists_in(dir: impl AsRef<Path>) -> bool {
        let dir = dir.as_ref();
        [DATA_FILE, META_FILE, CHECKPOINT]
            .iter()
            .any(|f| dir.join(f).exists())
    }

    /// Opens a pool on any medium (tests use [`crate::MemMedium`]). Out of
    /// space, it gives the space reserve back and tries once more.
    pub fn open_medium(medium: Arc<dyn Medium>, opts: PoolOptions) -> Result<Arc<Pool>> {
        // Held across both tries, so no other process opens the pool or
        // touches its reserve in between.
        let lock: Arc<dyn Send + Sync> = Arc::from(medium.lock().map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::new(
                    ErrorKind::Locked,
                    format!(
                        "the pool at {} is in use by another process (stop the other snapgate first)",
                        medium.describe()
                    ),
                )
            } else {
                Error::io(format!("cannot lock the pool at {}", medium.describe()), e)
            }
        })?);
        let full = |e: Error, how: &str| {
            e.prefixed(format!(
                "the disk is full{how} (free some space on it, then open the pool again)"
            ))
        };
        match Self::open_once(medium.clone(), opts.clone(), lock.clone()) {
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                if !medium.exists(RESERVE) && !medium.exists(RESERVE_TMP) {
                    return Err(full(e, ""));
                }
                tracing::warn!(pool = %medium.describe(), error = %e,
                    "the disk is full: giving back the space reserve to open the pool");
                for name in [RESERVE, RESERVE_TMP] {
                    medium
                        .remove(name)
                        .map_err(|e| Error::io("cannot give back the space reserve", e))?;
                }
                medium
                    .sync_dir()
                    .map_err(|e| Error::io("cannot sync the data directory", e))?;
                Self::open_once(medium.clone(), opts, lock).map_err(|e| {
                    if e.kind() == ErrorKind::NoSpace {
                        full(e, " even with the space reserve given back")
                    } else {
                        e
                    }
                })
            }
            r => r,
        }
    }

    fn open_once(
        medium: Arc<dyn Medium>,
        opts: PoolOptions,
        lock: Arc<dyn Send + Sync>,
    ) -> Result<Arc<Pool>> {
        let data = medium
            .open(DATA_FILE, true)
            .map_err(|e| Error::io("cannot open the data file", e))?;
        let meta = medium
            .open(META_FILE, true)
            .map_err(|e| Error::io("cannot open the metadata page file", e))?;
        let pages = Arc::new(PageStore::new(
            meta,
            opts.map_cache_bytes as usize,
            opts.map_page_entries,
        ));
        let mut vols = Vols {
            by_name: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 1,
            pages: pages.clone(),
        };
        // The root found may have been renamed into place by a process that
        // died before syncing the directory: make it durable before any
        // page slot it does not use (but the root before it might) is
        // written again.
        medium
            .sync_dir()
            .map_err(|e| Error::io("cannot sync the data directory", e))?;
        let mut journal_id = 1;
        let mut seq = 0;
        if medium.exists(CHECKPOINT) {
            let (jid, s) = load_checkpoint(&*medium, &mut vols)?;
            journal_id = jid;
            seq = s;
        }
        // Replay writes changed pages back itself when they pass their
        // memory, and the open's checkpoint writes the rest: patching them
        // meanwhile would only read their old slots again.
        pages.set_spilling(false);
        let last_jid = replay_journals(&*medium, &*data, journal_id, &mut vols, &mut seq)?;
        pages.set_spilling(true);
        let file_slots = data
            .len()
            .map_err(|e| Error::io("cannot stat the data file", e))?
            / B;
        let mut used = SlotSet::with_capacity(file_slots);
        for cell in vols.by_id.values() {
            cell.st.write().open_scan(&mut used)?;
        }
        let high = file_slots.max(used.end());
        let alloc = Alloc::rebuild(
            &used,
            high,
            opts.reuse_reserve_bytes / B,
            opts.reuse_reserve_percent,
        );

        // Start a new journal after a fresh checkpoint, so a torn tail of the
        // old journal is never appended to.
        let jfile = medium
            .open(&journal_name(last_jid), true)
            .map_err(|e| Error::io("cannot open the journal", e))?;
        let jpos = jfile
            .len()
            .map_err(|e| Error::io("cannot stat the journal", e))?;
        let inner = Arc::new(Inner {
            medium,
            _lock: lock,
            data,
            vols: RwLock::new(vols),
            journal: Mutex::new(Journal {
                file: jfile,
                id: last_jid,
                pos: jpos,
                prealloc: jpos,
                chunk: JOURNAL_CHUNK
                    .min(opts.journal_limit.next_power_of_two())
                    .max(4096),
                seq,
                buf: Vec::new(),
                stale_tail: false,
                reserved: 0,
            }),
            alloc: Mutex::new(alloc),
            reuse: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush: Mutex::new(FlushState {
                durable_upto: seq,
                broken: None,
            }),
            data_dirty: AtomicBool::new(false),
            opts,
            flusher: Arc::new(Bell::default()),
            collector: Arc::new(Bell::default()),
            inplace: RwLock::new(()),
            captured: AtomicU64::new(seq),
            fresh: Mutex::new(HashMap::new()),
            torn: Mutex::new(None),
            resizing: Mutex::new(()),
            pages,
            reserve_retry: Mutex::new(None),
            reserve_held: AtomicBool::new(false),
            space_claimed: AtomicU64::new(0),
        });
        {
            let mut fs = inner.flush.lock();
            inner.checkpoint(&mut fs)?;
        }
        // Finish snapshot deletions a crash cut short (in the background
        // past the foreground time), and make the drops durable before the
        // space they free is punched. Garbage costs space, not correctness:
        // a volume whose map cannot be read whole still opens (its reads
        // report the damage).
        let unfinished = inner.gc_pending();
        let until = Instant::now() + inner.opts.gc_foreground;
        let mut left = false;
        for cell in &unfinished {
            left |= !inner.reclaim(cell, Some(until)).is_ok_and(|r| r.1);
        }
        if !unfinished.is_empty() {
            // Best effort: drops that stay unflushed free nothing yet.
            if let Err(e) = inner.fold_all() {
                tracing::warn!(error = %e, "cannot flush the garbage collected at open");
            }
        }
        // Punch the space of free slots beyond the reuse reserve (slots
        // freed before a crash never got punched).
        inner.punch_free_space();
        // A reserve a crash cut short (nothing else builds one meanwhile:
        // the pool is locked and its flusher not started).
        let _ = inner.medium.remove(RESERVE_TMP);
        inner.keep_reserve();
        let flusher = start_flusher(&inner);
        let collector = start_collector(&inner);
        if left {
            inner.collector.ring();
        }
        Ok(Arc::new(Pool {
            inner,
            flusher,
            collector,
        }))
    }

    fn cell(&self, name: &str) -> Result<Arc<VolCell>> {
        self.inner.cell(name)
    }

    /// Creates a thin volume with default options.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size, &VolumeOptions::default())
    }

    /// Creates a thin volume.
    pub fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        opts: &VolumeOptions,
    ) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        validate_size(size)?;
        let g = opts.cbt_granularity;
        if g != 0 && (!g.is_power_of_two() || !(4096..=1 << 30).contains(&g)) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("invalid change-tracking granularity {g}: use a power of two from 4096 to 1 GiB (0 turns tracking off)"),
            ));
        }
        let mut vols = self.inner.vols.write();
        if vols.by_name.contains_key(name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("volume {name:?} already exists"),
            ));
        }
        let id = vols.next_id;
        let rec = Record::VolumeCreate {
            id,
            size,
            created_ms: now_ms(),
            cbt_shift: if g == 0 { 0 } else { g.trailing_zeros() as u8 },
            name: name.to_string(),
        };
        let seq = self.inner.journal.lock().append(&rec)?;
        apply_vol_record(&mut vols, &rec);
        drop(vols);
        self.inner
            .flush_applied(seq, || format!("volume {name:?} was created"))?;
        self.volume_info(name)
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let vols = self.inner.vols.read();
        let mut out: Vec<VolumeInfo> = vols.by_name.values().map(|c| info_of(c)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        Ok(info_of(&*self.cell(name)?))
    }

    /// Changes a volume's virtual size. Shrinking drops the data past the
    /// new end from the head (snapshots keep it) and needs `allow_shrink`.
    pub fn resize_volume(&self, name: &str, size: u64, allow_shrink: bool) -> Result<VolumeInfo> {
        validate_size(size)?;
        let cell = self.cell(name)?;
        // One resize at a time: the size read here holds until the end.
        let _one = self.inner.resizing.lock();
        let old = cell.st.read().size;
        if size < old && !allow_shrink {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "volume {name:?} is {old} bytes; shrinking to {size} discards data, ask for it explicitly"
                ),
            ));
        }
        // The head must hold nothing past its end: a shrink drops it after
        // the new size is in place (so no write lands there meanwhile: one
        // in flight checks the size again as it applies), and a grow drops,
        // before the new range becomes visible, whatever a shrink cut short
        // by a crash (or a write racing it into the last block) left there,
        // durably: replay checks the zeroed last block against its data,
        // and the size record must not outlive it.
        // The head of this very volume, not of one that took its name.
        let head = Volume {
            inner: self.inner.clone(),
            cell: cell.clone(),
            view: View::Head,
        };
        let mut seq = 0;
        if size > old {
            let dropped = head.drop_past(old, size)?;
            if dropped > 0 {
                self.inner.flush_upto(dropped)?;
            }
        }
        {
            let mut st = cell.st.write();
            if st.deleted {
                return Err(deleted(name));
            }
            let s = self
                .inner
                .journal
                .lock()
                .append(&Record::VolumeResize { id: cell.id, size })?;
            st.size = size;
            seq = seq.max(s);
        }
        let resized = || format!("volume {name:?} was resized");
        if size < old {
            // The new size holds already; the blocks past it that are not
            // dropped yet are dropped by a later grow before it shows them.
            let dropped = head.drop_past(size, old).map_err(|e| {
                e.prefixed(format!(
                    "{}, but not all of the blocks past its new size were dropped, and it is not durable yet (the next successful flush makes it so)",
                    resized()
                ))
            })?;
            seq = seq.max(dropped);
        }
        self.inner.flush_applied(seq, resized)?;
        self.volume_info(name)
    }

    /// Deletes a volume with all its snapshots.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut vols = self.inner.vols.write();
        let cell = vols
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| not_found_vol(name))?;
        let mut st = cell.st.write();
        let rec = Record::VolumeDelete { id: cell.id };
        let seq = self.inner.journal.lock().append(&rec)?;
        vols.by_name.remove(name);
        vols.by_id.remove(&cell.id);
        st.deleted = true;
        // The map is read after the locks are released: its page slots stay
        // untouched until it is cleared (retired) below, and so do its
        // patches' bases (held).
        let mut map = st.map.take();
        st.snaps.clear();
        st.data_entries = 0;
        drop(st);
        drop(vols);
        // Once the deletion is durable its slots are free for good: they
        // go back in batches as the map is read, not through `pending`,
        // which would hold every slot of the volume in memory at once.
        // Readers that located slots before the deletion finish first.
        self.inner
            .flush_applied(seq, || format!("volume {name:?} was deleted"))?;
        drop(self.inner.reuse.write());
        let mut slots = Vec::new();
        let cleared = map.clear(|l| {
            if let Loc::Data { slot, .. } = l {
                slots.push(slot);
                if slots.len() == GIVE_BACK_BATCH {
                    self.inner
                        .give_back(&[], &merge(std::mem::take(&mut slots)));
                }
            }
        });
        self.inner.give_back(&[], &merge(slots));
        drop(map);
        // A map page that cannot be read leaks its data slots until the
        // next open (which frees whatever no map references).
        if let Err(e) = cleared {
            tracing::error!(volume = name, error = %e, "deleted volume's map is damaged");
        }
        // Its map pages stay in the meta file until a root without them is
        // durable. The deletion itself is durable already: a failure here
        // (the pool then refuses flushes until reopened) is not its own.
        if let Err(e) = self.inner.fold_all() {
            tracing::error!(volume = name, error = %e, "checkpoint after deleting a volume failed");
        }
        Ok(())
    }

    /// Takes a snapshot of the head: O(1), no data is copied.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        let cell = self.cell(volume)?;
        let (seq, info) = {
            // Overwrites in place in progress finish first: the new snapshot
            // will see their slots, which must not change under it.
            let _no_inplace = self.inner.inplace.write();
            let mut st = cell.st.write();
            if st.deleted {
                return Err(deleted(volume));
            }
            if st.snap_by_name(name).is_some() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("snapshot {volume}@{name} already exists"),
                ));
            }
            if st.epoch == u32::MAX {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("volume {volume:?} has used up its snapshot numbers"),
                ));
            }
            let created_ms = now_ms();
            let rec = Record::SnapshotCreate {
                vol: cell.id,
                epoch: st.epoch,
                size: st.size,
                created_ms,
                name: name.to_string(),
            };
            let seq = self.inner.journal.lock().append(&rec)?;
            let (e, size) = (st.epoch, st.size);
            st.snaps.insert(
                e,
                Snap {
                    name: name.to_string(),
                    size,
                    created_ms,
                },
            );
            st.epoch += 1;
            (
                seq,
                SnapshotInfo {
                    name: name.to_string(),
                    volume: volume.to_string(),
                    size: st.size,
                    created_ms,
                },
            )
        };
        self.inner.flush_applied(seq, || {
            format!("snapshot {name:?} of volume {volume:?} was created")
        })?;
        Ok(info)
    }

    /// The snapshots of a volume, oldest first.
    pub fn snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let cell = self.cell(volume)?;
        let st = cell.st.read();
        Ok(st
            .snaps
            .values()
            .map(|s| SnapshotInfo {
                name: s.name.clone(),
                volume: volume.to_string(),
                size: s.size,
                created_ms: s.created_ms,
            })
            .collect())
    }

    /// Deletes a snapshot; blocks only it referenced become free.
    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<()> {
        let cell = self.cell(volume)?;
        let seq = self.unlist_snapshot(&cell, volume, name)?;
        // The snapshot is gone; now the entries only it saw, in batches,
        // here for up to `gc_foreground`, then in the background.
        // Failing that costs space, not data: out of space, the background
        // collector goes on once there is room; otherwise the next open
        // tries again.
        let inner = &self.inner;
        let until = inner
            .collector
            .alive
            .load(Ordering::Acquire)
            .then(|| Instant::now() + inner.opts.gc_foreground);
        let (last, done) = inner.reclaim(&cell, until).unwrap_or((0, false));
        let flushed = inner.flush_applied(seq.max(last), || {
            format!("snapshot {name:?} of volume {volume:?} was deleted")
        });
        if !done {
            inner.collector.ring();
        } else if flushed.is_ok() {
            if let Err(e) = inner.fold_all() {
                // The deletion is durable; the checkpoint was for space only.
                tracing::error!(volume, snapshot = name, error = %e, "checkpoint after deleting a snapshot failed");
            }
        }
        flushed
    }

    /// Journals a snapshot's removal and takes it off the volume's list
    /// (its entries stay until `collect_garbage`); returns the record's
    /// sequence number.
    fn unlist_snapshot(&self, cell: &VolCell, volume: &str, name: &str) -> Result<u64> {
        let mut st = cell.st.write();
        let epoch = st
            .snap_by_name(name)
            .ok_or_else(|| not_found_snap(volume, name))?;
        let seq = self.inner.journal.lock().append(&Record::SnapshotDelete {
            vol: cell.id,
            epoch,
        })?;
        st.snaps.remove(&epoch);
        let into = st.cbt_epoch(epoch);
        st.cbt.merge(epoch, into);
        st.gc_from = Some(0);
        Ok(seq)
    }

    /// Changed extents of `volume` between snapshot `a` and snapshot `b`
    /// (or the head), from the change bitmaps only: no data is read.
    pub fn diff(&self, volume: &str, a: &str, b: Option<&str>) -> Result<Diff> {
        let v = match b {
            Some(b) => self.open_snapshot(volume, b)?,
            None => self.open_head(volume)?,
        };
        let size = v.size();
        let extents = v.changed_since(a, 0, size)?;
        let bytes = extents.iter().map(|e| e.1).sum();
        Ok(Diff {
            volume: volume.to_string(),
            from: a.to_string(),
            to: b.map(str::to_string),
            granularity: v.cbt_granularity(),
            extents,
            bytes,
        })
    }

    /// Opens the read-write head of a volume.
    pub fn open_head(&self, volume: &str) -> Result<Volume> {
        Ok(Volume {
            inner: self.inner.clone(),
            cell: self.cell(volume)?,
            view: View::Head,
        })
    }

    /// Opens a snapshot read-only.
    pub fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let cell = self.cell(volume)?;
        let epoch = cell
            .st
            .read()
            .snap_by_name(snapshot)
            .ok_or_else(|| not_found_snap(volume, snapshot))?;
        Ok(Volume {
            inner: self.inner.clone(),
            cell,
            view: View::Snapshot {
                epoch,
                name: snapshot.to_string(),
            },
        })
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush_all()
    }

    /// Reads every stored block of every volume and snapshot and checks its
    /// checksum.
    pub fn verify(&self) -> Result<VerifyReport> {
        let cells: Vec<Arc<VolCell>> = {
            let v = self.inner.vols.read();
            let mut c: Vec<_> = v.by_id.values().cloned().collect();
            c.sort_by_key(|c| c.id);
            c
        };
        let mut report = VerifyReport {
            blocks_checked: 0,
            damaged: Vec::new(),
        };
        let mut buf = vec![0u8; BLOCK];
        // No overwrite in place while blocks are checked (writers fall back
        // to redirect-on-write meanwhile).
        let _no_inplace = self.inner.inplace.write();
        for cell in cells {
            let st = cell.st.read();
            for &(first, last, _) in &st.damaged {
                report.damaged.push(Damage {
                    volume: cell.name.clone(),
                    snapshot: None,
                    offset: first * B,
                    what: format!(
                        "map entries of {} blocks ({} bytes from here) were lost with a damaged map page; they read as errors until written or trimmed",
                        last - first + 1,
                        (last - first + 1) * B
                    ),
                });
            }
            let _g = self.inner.reuse.read();
            // An entry is reported once the next one (across pages) tells
            // whether it is the block's newest.
            let mut bad: Option<(u64, u32, u64)> = None;
            let report_bad = |report: &mut VerifyReport, (b, t, slot): (u64, u32, u64), newest| {
                let snapshot = st.snaps.range(t..).next().map(|(_, s)| s.name.clone());
                report.damaged.push(Damage {
                    volume: cell.name.clone(),
                    snapshot: if newest { None } else { snapshot.clone() },
                    offset: b * B,
                    what: format!(
                        "checksum mismatch in data slot {slot}{}",
                        match (&snapshot, newest) {
                            (Some(s), false) => format!(" (seen by snapshot {s})"),
                            (Some(s), true) => format!(" (head, and snapshot {s})"),
                            _ => String::new(),
                        }
                    ),
                });
            };
            let scanned = st.map.for_each_page(|entries| {
                for &(b, t, l) in entries {
                    if let Some(prev) = bad.take() {
                        report_bad(&mut report, prev, prev.0 != b);
                    }
                    let Loc::Data { slot, crc } = l else {
                        continue;
                    };
                    report.blocks_checked += 1;
                    let ok = match self.inner.data.read_at(&mut buf, slot * B) {
                        Ok(()) => format::block_crc(&buf) == crc,
                        Err(_) => false,
                    };
                    if !ok {
                        bad = Some((b, t, slot));
                    }
                }
            });
            if let Some(prev) = bad.take() {
                report_bad(&mut report, prev, true);
            }
            if let Err(e) = scanned {
                report.damaged.push(Damage {
                    volume: cell.name.clone(),
                    snapshot: None,
                    offset: 0,
                    what: format!("the map could not be read whole: {e}"),
                });
            }
        }
        Ok(report)
    }

    /// Finishes the garbage collection of every snapshot deletion so far
    /// in the calling thread (helping the background collector), then
    /// flushes and folds the journal and stale map pages into a checkpoint
    /// when they hold more than a little space, so the space freed is
    /// given back.
    pub fn reclaim_space(&self) -> Result<()> {
        self.inner.collect_all()?;
        self.inner.fold_all()
    }

    /// Counters for tests and metrics.
    pub fn stats(&self) -> PoolStats {
        let a = self.inner.alloc.lock();
        let j = self.inner.journal.lock();
        let journal_bytes = j.pos;
        let (data_slots_high, free_slots, pending_slots) =
            (a.high, a.free_slots(), a.pending_slots() as u64);
        drop(j);
        drop(a);
        let cells: Vec<_> = self.inner.vols.read().by_id.values().cloned().collect();
        let map_pages = cells.iter().map(|c| c.st.read().map.pages() as u64).sum();
        let gc_pending_volumes = self.inner.gc_pending().len() as u64;
        let p = &self.inner.pages;
        let (meta_slots_used, meta_slots_high) = p.slots();
        PoolStats {
            data_slots_high,
            free_slots,
            pending_slots,
            journal_bytes,
            map_pages,
            map_dirty_pages: p.dirty_pages() as u64,
            map_patch_bytes: p.patch_bytes() as u64,
            map_cached_bytes: p.cached_bytes() as u64,
            map_page_loads: p.loads.load(Ordering::Relaxed),
            meta_slots_used,
            meta_slots_high,
            gc_pending_volumes,
            space_reserve_bytes: self.inner.reserve_len().unwrap_or(0),
        }
    }
}

/// Allocation counters of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    /// Slots ever handed out (the data file's extent, in blocks).
    pub data_slots_high: u64,
    /// Free slots below the high-water mark.
    pub free_slots: u64,
    /// Slots waiting for a flush before reuse.
    pub pending_slots: u64,
    /// Bytes in the current journal.
    pub journal_bytes: u64,
    /// Map pages of all volumes.
    pub map_pages: u64,
    /// Map pages changed since the last checkpoint (held in memory).
    pub map_dirty_pages: u64,
    /// Memory of the changed map pages kept as patches (their old slot
    /// plus their few changes) until the next checkpoint.
    pub map_patch_bytes: u64,
    /// Memory of the clean map pages in the cache.
    pub map_cached_bytes: u64,
    /// Map pages read from the meta file (cache misses) since open.
    pub map_page_loads: u64,
    /// Page slots of the meta file in use (or waiting for a checkpoint),
    /// and its extent in slots.
    pub meta_slots_used: u64,
    pub meta_slots_high: u64,
    /// Volumes with garbage collection of deleted snapshots still to do.
    pub gc_pending_volumes: u64,
    /// Bytes of the space reserve held (0 while a full disk has it given
    /// back, see [`PoolOptions::space_reserve_bytes`]).
    pub space_reserve_bytes: u64,
}

fn info_of(c: &VolCell) -> VolumeInfo {
    let st = c.st.read();
    VolumeInfo {
        name: c.name.clone(),
        size: st.size,
        created_ms: st.created_ms,
        allocated_bytes: st.data_entries * B,
        snapshots: st.snaps.len(),
        cbt_granularity: st.cbt.granularity(),
    }
}

fn not_found_vol(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no volume named {name:?}"))
}

fn not_found_snap(vol: &str, name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("volume {vol:?} has no snapshot named {name:?}"),
    )
}

fn deleted(name: &str) -> Error {
    Error::new(ErrorKind::Deleted, format!("{name} was deleted"))
}

fn apply_vol_record(vols: &mut Vols, rec: &Record) {
    if let Record::VolumeCreate {
        id,
        size,
        created_ms,
        cbt_shift,
        name,
    } = rec
    {
        let cell = Arc::new(VolCell {
            id: *id,
            name: name.clone(),
            st: RwLock::new(VolState {
                size: *size,
                created_ms: *created_ms,
                epoch: 0,
                snaps: BTreeMap::new(),
                map: PagedMap::new(vols.pages.clone(), *id),
                data_entries: 0,
                deleted: false,
                damaged: Vec::new(),
                gc_from: None,
                cbt: match *cbt_shift {
                    0 => cbt::Tracker::disabled(),
                    s => cbt::Tracker::new(1u64 << s.clamp(9, 40)),
                },
            }),
        });
        vols.by_name.insert(name.clone(), cell.clone());
        vols.by_id.insert(*id, cell);
        vols.next_id = vols.next_id.max(id + 1);
    }
}

/// Frames read from a file: (seq, record) in file order, and the byte offset
/// of damaged or torn bytes that ended the read, if any.
type Frames = (Vec<(u64, Record)>, Option<u64>);

fn read_all(file: &dyn MediumFile) -> Result<Vec<u8>> {
    let len = file
        .len()
        .map_err(|e| Error::io("cannot stat metadata file", e))? as usize;
    let mut bytes = vec![0u8; len];
    file.read_at(&mut bytes, 0)
        .map_err(|e| Error::io("cannot read metadata file", e))?;
    Ok(bytes)
}

fn parse_frames(bytes: &[u8]) -> Frames {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        match decode_frame(&bytes[pos..]) {
            Decoded::Frame { seq, record, used } => {
                out.push((seq, record));
                pos += used;
            }
            Decoded::Short | Decoded::Invalid => {
                // Zeros after the last frame are a clean end (preallocation).
                if bytes[pos..].iter().all(|&b| b == 0) {
                    return (out, None);
                }
                return (out, Some(pos as u64));
            }
        }
    }
    (out, None)
}

/// Whether the bad bytes at `from` were durable once, so they are damage and
/// not a write torn by a crash: two valid `Sync` frames lie past them. Flushes
/// are serialised, so a `Sync` followed by another one had its journal sync
/// completed, which made everything before it durable. (The last `Sync` alone
/// proves nothing: its flush may have died before its sync.)
fn durable_sync_after(bytes: &[u8], from: usize, last_seq: u64) -> bool {
    let mut syncs = 0;
    const MAX_SCAN_FRAME: usize = 4 << 20;
    let end = bytes.len().saturating_sub(format::FRAME_HEADER);
    for pos in from + 1..end {
        let h = &bytes[pos..pos + format::FRAME_HEADER];
        let len = u32::from_le_bytes(h[0..4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        if len == 0 || len > MAX_SCAN_FRAME || seq <= last_seq || seq > last_seq + (1 << 40) {
            continue;
        }
        if let Decoded::Frame {
            record: Record::Sync { upto },
            ..
        } = decode_frame(&bytes[pos..])
        {
            if upto > last_seq {
                syncs += 1;
                if syncs == 2 {
                    return true;
                }
            }
        }
    }
    false
}

fn load_checkpoint(medium: &dyn Medium, vols: &mut Vols) -> Result<(u64, u64)> {
    let f = medium
        .open(CHECKPOINT, false)
        .map_err(|e| Error::io("cannot open the checkpoint", e))?;
    let bytes = read_all(&*f)?;
    let damaged = |what: String| {
        Error::corrupt(format!(
            "metadata checkpoint in {} is damaged: {what}",
            medium.describe()
        ))
    };
    let (frames, bad) = parse_frames(&bytes);
    if bad == Some(0) && bytes.len() > format::FRAME_HEADER && bytes[format::FRAME_HEADER] == 10 {
        // A begin record without the page id field: the unpaged format of
        // early development versions.
        if u32::from_le_bytes(bytes[0..4].try_into().unwrap()) == 21 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "the pool in {} was written by an earlier snapgate whose map format is not paged; copy its volumes out with that version (e.g. nbdcopy) into a new pool",
                    medium.describe()
                ),
            ));
        }
    }
    if let Some(pos) = bad {
        return Err(damaged(format!("invalid frame at byte {pos}")));
    }
    let Some((
        _,
        Record::CheckpointBegin {
            journal_id,
            next_vol_id,
            seq,
            next_page,
        },
    )) = frames.first().cloned()
    else {
        return Err(damaged("no begin record".into()));
    };
    match frames.last() {
        Some((
            _,
            Record::CheckpointEnd {
                journal_id: j,
                frames: n,
            },
        )) if *j == journal_id && *n == frames.len() as u64 => {}
        _ => return Err(damaged("truncated (no matching end record)".into())),
    }
    vols.next_id = next_vol_id;
    let mut used_pages = Vec::new();
    for (_, rec) in &frames[1..frames.len() - 1] {
        match rec {
            Record::CheckpointVolume {
                id,
                size,
                created_ms,
                epoch,
                cbt_shift,
                name,
            } => {
                apply_vol_record(
                    vols,
                    &Record::VolumeCreate {
                        id: *id,
                        size: *size,
                        created_ms: *created_ms,
                        cbt_shift: *cbt_shift,
                        name: name.clone(),
                    },
                );
                vols.by_id[id].st.write().epoch = *epoch;
            }
            Record::SnapshotCreate {
                vol,
                epoch,
                size,
                created_ms,
                name,
            } => {
                let cell = vols
                    .by_id
                    .get(vol)
                    .ok_or_else(|| damaged(format!("snapshot of unknown volume {vol}")))?;
                cell.st.write().snaps.insert(
                    *epoch,
                    Snap {
                        name: name.clone(),
                        size: *size,
                        created_ms: *created_ms,
                    },
                );
            }
            Record::CheckpointPages { vol, pages } => {
                let cell = vols
                    .by_id
                    .get(vol)
                    .ok_or_else(|| damaged(format!("map pages of unknown volume {vol}")))?;
                let mut st = cell.st.write();
                for &(b, t, r) in pages {
                    used_pages.push(r.slot);
                    st.map.add_ref((b, t), r);
                }
            }
            Record::CheckpointDamage {
                vol,
                first,
                last,
                upto,
            } => {
                if let Some(cell) = vols.by_id.get(vol) {
                    cell.st.write().damaged.push((*first, *last, *upto));
                }
            }
            other => return Err(damaged(format!("unexpected record {other:?}"))),
        }
    }
    vols.pages.init(&used_pages, next_page);
    // A map page that fails its check loses only the blocks it described.
    for cell in vols.by_id.values() {
        let mut st = cell.st.write();
        let lost = st.map.check_pages()?;
        st.note_lost(&cell.name, lost);
    }
    Ok((journal_id, seq))
}

/// Replays journal files from `first` on; returns the id of the journal to
/// continue with (a new one).
/// Whether journal `id` starts with its header.
fn has_header(medium: &dyn Medium, id: u64) -> Result<bool> {
    let f = medium
        .open(&journal_name(id), false)
        .map_err(|e| Error::io("cannot open a journal", e))?;
    Ok(matches!(
        FrameReader::new(&*f)?.next()?,
        Next::Frame(_, Record::JournalHeader { journal_id }) if journal_id == id
    ))
}

fn replay_journals(
    medium: &dyn Medium,
    data: &dyn MediumFile,
    first: u64,
    vols: &mut Vols,
    seq: &mut u64,
) -> Result<u64> {
    let mut ids: Vec<u64> = medium
        .list()
        .map_err(|e| Error::io("cannot list the data directory", e))?
        .iter()
        .filter_map(|n| n.strip_prefix("journal.")?.parse().ok())
        .filter(|&id| id >= first)
        .collect();
    ids.sort_unstable();
    // Pass 1: which journals replay, and the newest Sync among them.
    // Frames are streamed, never all held in memory.
    let mut replay = Vec::new();
    let mut synced = *seq;
    let mut expect = first;
    for id in &ids {
        if *id != expect {
            break;
        }
        expect += 1;
        let f = medium
            .open(&journal_name(*id), false)
            .map_err(|e| Error::io("cannot open a journal", e))?;
        let mut rd = FrameReader::new(&*f)?;
        match rd.next()? {
            Next::Frame(_, Record::JournalHeader { journal_id }) if journal_id == *id => {}
            // A journal whose header never became durable holds nothing durable.
            _ => break,
        }
        replay.push(*id);
        let mut last_seq = 0;
        let bad = loop {
            match rd.next()? {
                Next::Frame(s, rec) => {
                    last_seq = s;
                    if let Record::Sync { upto } = rec {
                        synced = synced.max(upto);
                    }
                }
                Next::End => break None,
                Next::Bad(off) => break Some(off),
            }
        };
        if let Some(off) = bad {
            // A crash can tear only what was never promised durable: bad
            // bytes followed by a later journal (this one was synced whole
            // before that one got its header) or by a Sync covering them
            // are damage. A later journal without a header is what a
            // checkpoint cut short before writing it leaves: records went
            // on to this one.
            let next = ids.contains(&(id + 1)) && has_header(medium, id + 1)?;
            if next || durable_sync_after(&rd.rest(off)?, 0, last_seq) {
                return Err(Error::corrupt(format!(
                    "metadata journal {} in {} is damaged at byte {off}: acknowledged writes after it cannot be recovered",
                    journal_name(*id),
                    medium.describe()
                )));
            }
            // Nothing after a torn frame was acknowledged as durable. Cut
            // it off for good before this open creates the next journal,
            // which would otherwise make the tear look like damage to an
            // open after this one is cut short.
            f.set_len(off)
                .and_then(|()| f.sync_data())
                .map_err(|e| Error::io("cannot cut the torn tail off a journal", e))?;
            break;
        }
    }
    // Pass 2: apply them.
    let mut buf = vec![0u8; BLOCK];
    let mut freed = Vec::new();
    let mut orphan_drops: HashMap<(u32, u64, u32, u64), u32> = HashMap::new();
    for id in replay {
        let f = medium
            .open(&journal_name(id), false)
            .map_err(|e| Error::io("cannot open a journal", e))?;
        let mut rd = FrameReader::new(&*f)?;
        rd.next()?;
        while let Next::Frame(s, rec) = rd.next()? {
            if s <= *seq {
                continue;
            }
            *seq = s;
            match rec {
                Record::VolumeCreate { .. } => apply_vol_record(vols, &rec),
                Record::VolumeResize { id, size } => {
                    if let Some(c) = vols.by_id.get(&id) {
                        c.st.write().size = size;
                    }
                }
                Record::VolumeDelete { id } => {
                    if let Some(c) = vols.by_id.remove(&id) {
                        vols.by_name.remove(&c.name);
                        c.st.write().map.retire_all();
                    }
                }
                Record::SnapshotCreate {
                    vol,
                    epoch,
                    size,
                    created_ms,
                    name,
                } => {
                    if let Some(c) = vols.by_id.get(&vol) {
                        let mut st = c.st.write();
                        st.snaps.insert(
                            epoch,
                            Snap {
                                name,
                                size,
                                created_ms,
                            },
                        );
                        st.epoch = epoch + 1;
                    }
                }
                Record::SnapshotDelete { vol, epoch } => {
                    if let Some(c) = vols.by_id.get(&vol) {
                        let mut st = c.st.write();
                        st.snaps.remove(&epoch);
                        let into = st.cbt_epoch(epoch);
                        st.cbt.merge(epoch, into);
                    }
                }
                Record::Update {
                    vol,
                    birth,
                    mut items,
                } => {
                    let Some(c) = vols.by_id.get(&vol) else {
                        continue;
                    };
                    if s > synced {
                        // Not covered by a flush: keep only items whose data made
                        // it to the medium.
                        items.retain(|it| match it.set {
                            Some(Loc::Data { slot, crc }) => {
                                let ok = data.read_at(&mut buf, slot * B).is_ok()
                                    && format::block_crc(&buf) == crc;
                                if !ok {
                                    if let Some(t) = it.drop {
                                        orphan_drops.insert((vol, it.block, birth, slot), t);
                                    }
                                }
                                ok
                            }
                            _ => true,
                        });
                    }
                    // A slot overwritten in place: the earlier record's data is
                    // gone (checked above), but its drop happened before the
                    // later record that is being applied now.
                    if !orphan_drops.is_empty() {
                        for it in items.iter_mut() {
                            if let (None, Some(Loc::Data { slot, .. })) = (it.drop, it.set) {
                                it.drop = orphan_drops.remove(&(vol, it.block, birth, slot));
                            }
                        }
                    }
                    c.st.write().apply_update(birth, &items, &mut freed)?;
                }
                // Drops were worked out from the map as it was, which may
                // have held a write this replay just discarded (its data
                // never reached the medium). Past the last flush, each drop
                // is applied only if the replayed map agrees it is garbage;
                // records that follow may rely on it (a trim of the newer
                // entry, say), so it is not skipped either.
                Record::Drops { vol, mut items } => {
                    if let Some(c) = vols.by_id.get(&vol) {
                        let mut st = c.st.write();
                        if s > synced {
                            let mut keep = Vec::with_capacity(items.len());
                            for (b, t) in items {
                                if st.is_garbage(b, t)? {
                                    keep.push((b, t));
                                }
                            }
                            items = keep;
                        }
                        st.apply_drops(&items, &mut freed)?;
                    }
                }
                _ => {}
            }
            // A long journal may change more pages than the cache budget
            // holds: write the changed ones out (to free slots; the open's
            // checkpoint makes them durable and points the root at them).
            if vols.pages.dirty_over() {
                let mut buf = Vec::new();
                for c in vols.by_id.values() {
                    c.st.write().map.write_dirty(&mut buf)?;
                }
            }
        }
    }
    Ok(expect)
}

/// What [`FrameReader::next`] found.
enum Next {
    Frame(u64, Record),
    /// The end of the frames (end of file, or only zeros left).
    End,
    /// Bytes at this offset are neither a frame nor zeros.
    Bad(u64),
}

/// Reads the frames of a metadata file a piece at a time.
struct FrameReader<'a> {
    file: &'a dyn MediumFile,
    len: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    /// Bytes of `buf` consumed.
    pos: usize,
}

const READ_PIECE: usize = 1 << 20;

impl<'a> FrameReader<'a> {
    fn new(file: &'a dyn MediumFile) -> Result<Self> {
        let len = file
            .len()
            .map_err(|e| Error::io("cannot stat a metadata file", e))?;
        Ok(FrameReader {
            file,
            len,
            buf: Vec::new(),
            start: 0,
            pos: 0,
        })
    }

    /// Reads up to `n` bytes from `off`.
    fn read(&self, off: u64, n: usize) -> Result<Vec<u8>> {
        let n = n.min(self.len.saturating_sub(off) as usize);
        let mut v = vec![0u8; n];
        self.file
            .read_at(&mut v, off)
            .map_err(|e| Error::io("cannot read a metadata file", e))?;
        Ok(v)
    }

    fn next(&mut self) -> Result<Next> {
        loop {
            match decode_frame(&self.buf[self.pos..]) {
                Decoded::Frame { seq, record, used } => {
                    self.pos += used;
                    return Ok(Next::Frame(seq, record));
                }
                Decoded::Short if self.start + (self.buf.len() as u64) < self.len => {
                    self.buf.drain(..self.pos);
                    self.start += self.pos as u64;
                    self.pos = 0;
                    let more = self.read(self.start + self.buf.len() as u64, READ_PIECE)?;
                    self.buf.extend_from_slice(&more);
                }
                _ => {
                    let off = self.start + self.pos as u64;
                    // Zeros after the last frame are a clean end
                    // (preallocation).
                    let mut at = off;
                    while at < self.len {
                        let piece = self.read(at, READ_PIECE)?;
                        if piece.iter().any(|&b| b != 0) {
                            return Ok(Next::Bad(off));
                        }
                        at += piece.len() as u64;
                    }
                    return Ok(Next::End);
                }
            }
        }
    }

    /// The file's bytes from `off` to its end.
    fn rest(&self, off: u64) -> Result<Vec<u8>> {
        self.read(off, (self.len - off) as usize)
    }
}

/// A deleted volume's slots go back to the allocator this many at a time.
const GIVE_BACK_BATCH: usize = 1 << 16;

/// A fold (see [`Fold::Space`]) checkpoints when the journal, or the map
/// page slots only the durable root still uses, take more than this plus
/// 0.1% of the data stored.
const FOLD_BYTES: u64 = 1 << 20;

/// When a flush also writes a checkpoint (which folds the journal in,
/// writes the changed map pages, and frees the page slots they replace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// When the journal passes `journal_limit` or changed pages pass their
    /// memory budget.
    Over,
    /// Also when there was nothing to flush (the background flusher and a
    /// collection, when changed pages or the journal pass their limit).
    OverIdle,
    /// Also when the journal or the stale page slots take more than
    /// `FOLD_BYTES` + 0.1% of the data: after deletions (whose collection
    /// writes a journal of drops and empties map pages) and once writes
    /// pause, so that the pool's space comes back to the bound in lib.rs.
    /// Scaled with the data because a checkpoint rewrites the whole root
    /// (about 44 bytes per map page), which must not happen at every
    /// snapshot deletion of a large pool.
    Space,
}

/// Completed writes are made durable in the background at least this often,
/// like a filesystem's periodic commit.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A background thread's doorbell.
#[derive(Default)]
struct Bell {
    wake: Mutex<bool>,
    cv: parking_lot::Condvar,
    stop: AtomicBool,
    /// The thread is running.
    alive: AtomicBool,
}

impl Bell {
    fn ring(&self) {
        *self.wake.lock() = true;
        self.cv.notify_one();
    }

    /// Waits until rung, stopped, or `timeout` passes.
    fn wait(&self, timeout: std::time::Duration) {
        let mut wake = self.wake.lock();
        if !*wake && !self.stop.load(Ordering::Acquire) {
            self.cv.wait_for(&mut wake, timeout);
        }
        *wake = false;
    }

    fn stop(&self, thread: Option<std::thread::JoinHandle<()>>) {
        self.stop.store(true, Ordering::Release);
        self.ring();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Starts a background thread named `name` that runs `tick` whenever
/// `bell` rings or `every` passes, until the bell is stopped (or the pool
/// is gone); sets `bell.alive` once it runs. `None` (logged with `failed`)
/// when no thread can be started.
fn start_bell_thread(
    inner: &Arc<Inner>,
    bell: &Arc<Bell>,
    name: &str,
    every: std::time::Duration,
    failed: &str,
    mut tick: impl FnMut(&Inner) + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    let weak = Arc::downgrade(inner);
    let b = Arc::clone(bell);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !b.stop.load(Ordering::Acquire) {
                b.wait(every);
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                tick(&inner);
            }
        });
    match spawned {
        Ok(t) => {
            bell.alive.store(true, Ordering::Release);
            Some(t)
        }
        Err(e) => {
            tracing::warn!(error = %e, "{failed}");
            None
        }
    }
}

/// Starts the thread that finishes the garbage collections snapshot
/// deletions leave when they run out of their foreground time; it ends
/// when the [`Pool`] is dropped.
fn start_collector(inner: &Arc<Inner>) -> Option<std::thread::JoinHandle<()>> {
    start_bell_thread(
        inner,
        &inner.collector,
        "snapgate-gc",
        std::time::Duration::from_secs(1),
        "cannot start the garbage collector thread; snapshot deletions collect in the foreground",
        {
            // After a failure (a full disk, say), wait a while before the
            // next try.
            let mut quiet_until = std::time::Instant::now();
            move |inner| {
                if std::time::Instant::now() < quiet_until {
                    return;
                }
                if let Err(e) = inner.collect_all() {
                    tracing::warn!(error = %e, "garbage collection failed; trying again in a few seconds");
                    quiet_until = std::time::Instant::now() + FLUSH_INTERVAL;
                }
            }
        },
    )
}

/// Starts the thread that flushes when freed space piles up and every
/// `FLUSH_INTERVAL`; it ends when the [`Pool`] is dropped.
fn start_flusher(inner: &Arc<Inner>) -> Option<std::thread::JoinHandle<()>> {
    let mut last = std::time::Instant::now();
    let mut failed = false;
    // The journal's sequence number last seen, since when, and whether the
    // quiet since then was used to fold.
    let mut seen = (0, std::time::Instant::now(), false);
    start_bell_thread(
        inner,
        &inner.flusher,
        "snapgate-flusher",
        std::time::Duration::from_millis(200),
        "cannot start the background flusher; space is reclaimed at client flushes only",
        move |inner| {
            if inner.flush.lock().broken.is_some() {
                // Flushes fail until the pool is reopened (said once).
                return;
            }
            let target = inner.journal.lock().seq;
            if target != seen.0 {
                seen = (target, std::time::Instant::now(), false);
            }
            let piled = inner.piled_up(&inner.alloc.lock());
            // A journal past its limit is folded into a checkpoint now, not
            // at the next flush: it holds disk space until then.
            // (A fresh journal's header alone is past a tiny test limit.)
            let due = inner.pages.dirty_over()
                || inner.journal.lock().pos > inner.opts.journal_limit.max(4096);
            let why = if due {
                Fold::OverIdle
            } else if !seen.2 && seen.1.elapsed() >= FLUSH_INTERVAL {
                // Writes paused: give back the space of the journal and of
                // stale map pages (if they hold more than a little).
                seen.2 = true;
                Fold::Space
            } else {
                Fold::Over
            };
            // After a failure (a full disk, say), the next try waits for the
            // interval.
            let retry = !failed || last.elapsed() >= FLUSH_INTERVAL;
            if retry && (piled || why != Fold::Over || last.elapsed() >= FLUSH_INTERVAL) {
                failed = match inner.flush_inner(target, why) {
                    Ok(()) => {
                        inner.keep_reserve();
                        false
                    }
                    Err(e) => {
                        if inner.flush.lock().broken.is_none() {
                            tracing::warn!(error = %e, "background flush failed; trying again in a few seconds");
                        }
                        true
                    }
                };
                last = std::time::Instant::now();
            }
        },
    )
}

impl Inner {
    /// Allocates the space reserve when it is missing or of another size
    /// (at open, then after background flushes) and the medium has twice
    /// its size free, so that taking it back never fills the disk under the
    /// clients' writes; removes it when none is wanted. Called at open and
    /// by the flusher thread only, never concurrently.
    fn keep_reserve(&self) {
        let want = self.opts.space_reserve_bytes;
        let m = &*self.medium;
        let have = self.reserve_len();
        if want == 0 {
            if have.is_some() {
                if let Err(e) = m.remove(RESERVE).and_then(|()| m.sync_dir()) {
                    tracing::warn!(error = %e, "cannot remove the space reserve");
                }
            }
            return;
        }
        // A larger reserve left from an earlier setting holds room too.
        self.reserve_held
            .store(have.is_some_and(|h| h >= want), Ordering::Release);
        let mut retry = self.reserve_retry.lock();
        if have == Some(want) || retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if m.available().map_or(true, |a| a < want.saturating_mul(2)) {
            return;
        }
        // The rename replaces a reserve of another size.
        match self.build_reserve(want) {
            Ok(()) => {
                self.reserve_held.store(true, Ordering::Release);
                tracing::info!(bytes = want, "space reserve allocated");
            }
            Err(e) => {
                let _ = m.remove(RESERVE_TMP);
                *retry = Some(Instant::now() + RESERVE_RETRY);
                tracing::warn!(error = %e, "cannot allocate the space reserve; trying again in a minute");
            }
        }
    }

    /// Checks that `fresh` blocks of new data space may be taken. While
    /// the space reserve is missing (given back to open on a full disk, or
    /// not built yet for want of room), new data keeps the reserve's size
    /// free on the filesystem: a crash must still leave the next open room
    /// for its checkpoint, and deleting snapshots and volumes must stay
    /// possible. Overwrites that reuse free slots of the data file take no
    /// new space and are not refused.
    ///
    /// Returns the bytes it claimed, which the caller hands back (to
    /// `space_claimed`) once they are written: concurrent writers must not
    /// all count the same free space.
    fn room_for(&self, fresh: u64) -> Result<u64> {
        let want = self.opts.space_reserve_bytes;
        if want == 0 || fresh == 0 || self.reserve_held.load(Ordering::Acquire) {
            return Ok(0);
        }
        let Ok(free) = self.medium.available() else {
            return Ok(0);
        };
        let bytes = fresh.saturating_mul(B);
        let claimed = self.space_claimed.load(Ordering::Acquire);
        if free.saturating_sub(claimed) >= want.saturating_add(bytes) {
            self.space_claimed.fetch_add(bytes, Ordering::AcqRel);
            return Ok(bytes);
        }
        Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "the disk is nearly full and the {} MiB space reserve is given back: new data must leave that much free, so that the gateway can always start again (delete snapshots or volumes, or free space on the disk)",
                want >> 20
            ),
        ))
    }

    /// Bytes of the space reserve in place (`None` when missing).
    fn reserve_len(&self) -> Option<u64> {
        let m = &*self.medium;
        if !m.exists(RESERVE) {
            return None;
        }
        Some(m.open(RESERVE, false).and_then(|f| f.len()).unwrap_or(0))
    }

    /// Writes the reserve whole (bytes that no filesystem compresses away),
    /// then puts it in place.
    fn build_reserve(&self, want: u64) -> std::io::Result<()> {
        let m = &*self.medium;
        m.remove(RESERVE_TMP)?;
        let f = m.open(RESERVE_TMP, true)?;
        // xorshift64: no chunk repeats another, so deduplication cannot
        // shrink the reserve either.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < want {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            let n = (want - at).min(chunk.len() as u64);
            f.write_at(&chunk[..n as usize], at)?;
            at += n;
        }
        f.sync_data()?;
        m.rename(RESERVE_TMP, RESERVE)?;
        m.sync_dir()
    }

    /// Whether freed space waiting for a flush calls for one now. Without
    /// this, a client that never flushes would make the data file grow
    /// without bound (freed slots are reusable only once durable): 128 MiB
    /// of it in all, or the reuse reserve's fixed part (within 16 ..= 128
    /// MiB) freed by small overwrites. Those then fit the reserve instead
    /// of being punched: a punch of a scattered slot splits the page-cache
    /// folio around it, and a 4 KiB read from a split file costs more
    /// (measured: 0.58-0.62× a plain file's pread with 128 MiB here, against
    /// 0.63-0.69×). Bulk overwrites free whole runs, whose punches cut few
    /// folios; they keep the larger step, so large writes are not flushed
    /// out to the disk every 24 MiB.
    fn piled_up(&self, a: &Alloc) -> bool {
        let all = (128 << 20) / B;
        a.pending_slots() as u64 >= all
            || a.pending_scattered() as u64
                >= self.opts.reuse_reserve_bytes.clamp(16 << 20, 128 << 20) / B
    }

    /// Wakes the background flusher when freed space piles up.
    fn note_pending(&self, piled: bool) {
        if piled {
            self.ring();
        }
    }

    /// Wakes the background flusher when changed map pages fill their
    /// half of the cache memory: a checkpoint writes them out.
    fn note_dirty_pages(&self) {
        if self.pages.dirty_over() {
            self.ring();
        }
    }

    fn ring(&self) {
        self.flusher.ring();
    }

    fn cell(&self, name: &str) -> Result<Arc<VolCell>> {
        self.vols
            .read()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| not_found_vol(name))
    }

    fn flush_all(&self) -> Result<()> {
        let target = self.journal.lock().seq;
        self.flush_upto(target)
    }

    /// Makes a FUA request durable (see [`Records`]).
    fn flush_request(&self, r: Records) -> Result<()> {
        if r.unchanged {
            self.flush_all()
        } else {
            self.flush_upto(r.last)
        }
    }

    /// Makes every record up to `target` and the data it points to durable.
    fn flush_upto(&self, target: u64) -> Result<()> {
        self.flush_inner(target, Fold::Over)
    }

    /// Flushes an administrative change (volume or snapshot created,
    /// resized, deleted) that already took effect in memory. A flush that
    /// fails only in the checkpoint after its journal sync made the change
    /// durable all the same: done, with a warning. Any other failure says
    /// the change took effect, since it stays, and the next flush that
    /// succeeds makes it durable.
    fn flush_applied(&self, target: u64, what: impl FnOnce() -> String) -> Result<()> {
        let Err(e) = self.flush_upto(target) else {
            return Ok(());
        };
        let what = what();
        let fs = self.flush.lock();
        if fs.durable_upto >= target {
            tracing::error!(error = %e, "{what} (durably), but a flush failed");
            return Ok(());
        }
        // A failed sync or in-place overwrite fails every flush until the
        // pool is reopened, which recovers whatever the medium kept.
        let stuck = fs.broken.is_some() || self.torn.lock().is_some();
        Err(e.prefixed(if stuck {
            format!("{what}, but is not durable, and a restart may undo it (this pool can make nothing durable until restarted)")
        } else {
            format!("{what}, but is not durable yet (the next successful flush makes it so)")
        }))
    }

    /// Flushes up to `target`, then writes a checkpoint when `why` says one
    /// is due (see [`Fold`]).
    fn flush_inner(&self, target: u64, why: Fold) -> Result<()> {
        let mut fs = self.flush.lock();
        if let Some(why) = &fs.broken {
            return Err(Error::new(
                ErrorKind::Io,
                format!("an earlier sync failed ({why}); durability can no longer be promised: restart to recover from the medium"),
            ));
        }
        self.flush_locked(&mut fs, target, why)
    }

    fn flush_locked(&self, fs: &mut FlushState, target: u64, why: Fold) -> Result<()> {
        if fs.durable_upto >= target {
            if why != Fold::Over && self.checkpoint_due(why) {
                return self.checkpoint(fs);
            }
            return Ok(());
        }
        // Capture before syncing data: every record ≤ upto had its data
        // written before it was appended, so before this point.
        let upto = self.capture();
        self.check_torn()?;
        if self.data_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.data.sync_data() {
                self.data_dirty.store(true, Ordering::Release);
                return fs.synced(Err(Error::io("cannot sync the data file", e)));
            }
        }
        let (file, sync_seq) = {
            let mut j = self.journal.lock();
            let seq = j.append(&Record::Sync { upto })?;
            (j.file.clone(), seq)
        };
        fs.synced(
            file.sync_data()
                .map_err(|e| Error::io("cannot sync the metadata journal", e)),
        )?;
        // The Sync record is durable too; when nothing came between it and
        // the capture, everything up to it is, and a pool with no new
        // writes has nothing left to flush (the background flusher would
        // otherwise sync a new Sync record every few seconds for good).
        fs.durable_upto = if sync_seq == upto + 1 { sync_seq } else { upto };
        // Space first: a checkpoint needs some (a full disk may have room
        // for it only once this is given back).
        self.release_durable(upto);
        if self.checkpoint_due(why) {
            self.checkpoint(fs)?;
        }
        Ok(())
    }

    /// Whether a flush for `why` ends with a checkpoint.
    fn checkpoint_due(&self, why: Fold) -> bool {
        let pos = self.journal.lock().pos;
        if pos > self.opts.journal_limit || self.pages.dirty_over() {
            return true;
        }
        if why != Fold::Space {
            return false;
        }
        let slack = FOLD_BYTES + self.alloc.lock().used_slots() * B / 1000;
        pos > slack || self.pages.retired_slots() as u64 * PAGE_BYTES > slack
    }

    /// Flushes everything, then checkpoints if the journal or stale map
    /// pages hold more than a little space ([`Fold::Space`]).
    fn fold_all(&self) -> Result<()> {
        let target = self.journal.lock().seq;
        self.flush_inner(target, Fold::Space)
    }

    /// Fails once an in-place overwrite has failed: called after a capture,
    /// whose exclusive `inplace` every in-place writer has left by then.
    fn check_torn(&self) -> Result<()> {
        match &*self.torn.lock() {
            Some(why) => Err(Error::new(
                ErrorKind::Io,
                format!("an in-place overwrite failed ({why}), so the data of writes not yet flushed may be damaged"),
            )),
            None => Ok(()),
        }
    }

    /// Takes the sequence number a flush or checkpoint will make durable.
    /// From here on, no slot written by a record ≤ it is overwritten in
    /// place: the sync that follows may write such a slot's data, and a
    /// durable record must find exactly its data after a crash.
    fn capture(&self) -> u64 {
        let _w = self.inplace.write();
        let upto = self.journal.lock().seq;
        self.captured.fetch_max(upto, Ordering::AcqRel);
        self.fresh.lock().retain(|_, s| *s > upto);
        upto
    }

    /// Drops the entries no view sees, from the volume's `gc_from` on, one
    /// map page's worth of blocks per batch: each batch holds the volume
    /// lock for that page only, is journaled as one `Drops` record and
    /// advances `gc_from`, so collectors running at once share the work and
    /// a deletion meanwhile restarts it. Returns the last record's sequence
    /// number and whether the collection got to the end; it stops early,
    /// after at least one batch, once `until` has passed or the pool is
    /// closing.
    fn collect_garbage(&self, cell: &Arc<VolCell>, until: Option<Instant>) -> Result<(u64, bool)> {
        let mut last = 0;
        loop {
            let mut st = cell.st.write();
            let cursor = match st.gc_from {
                Some(c) if !st.deleted => c,
                _ => return Ok((last, true)),
            };
            let end = st.map.batch_end(cursor);
            let drops = st.garbage(cursor, end.unwrap_or(u64::MAX))?;
            if drops.is_empty() {
                st.gc_from = end;
                drop(st);
            } else {
                for &k in &drops {
                    st.map.prepare(k, k)?;
                }
                last = self.journal.lock().append(&Record::Drops {
                    vol: cell.id,
                    items: drops.clone(),
                })?;
                let mut freed = Vec::new();
                st.apply_drops(&drops, &mut freed)?;
                st.gc_from = end;
                drop(st);
                let piled = {
                    let mut a = self.alloc.lock();
                    for s in freed {
                        a.defer(last, s, Freed::Cold);
                    }
                    self.piled_up(&a)
                };
                self.note_pending(piled);
                if self.pages.dirty_over() {
                    self.flush_inner(last, Fold::OverIdle)?;
                }
            }
            if end.is_none() {
                return Ok((last, true));
            }
            if self.collector.stop.load(Ordering::Acquire)
                || until.is_some_and(|u| Instant::now() >= u)
            {
                return Ok((last, false));
            }
        }
    }

    /// [`Inner::collect_garbage`], its failures handled: garbage costs
    /// space, not data. Out of space (no room for a journal record), the
    /// collection stays where it is, for the background collector to go
    /// on with once there is room, and the error is returned. Any other
    /// failure gives the volume's collection up until the next deletion or
    /// open (logged).
    fn reclaim(&self, cell: &Arc<VolCell>, until: Option<Instant>) -> Result<(u64, bool)> {
        match self.collect_garbage(cell, until) {
            Ok(r) => Ok(r),
            Err(e) if e.kind() == ErrorKind::NoSpace => Err(e),
            Err(e) => {
                tracing::warn!(volume = %cell.name, error = %e, "cannot collect the garbage of deleted snapshots; their space stays in use until the next open");
                cell.st.write().gc_from = None;
                Ok((0, true))
            }
        }
    }

    /// The volumes with garbage collection still to do.
    fn gc_pending(&self) -> Vec<Arc<VolCell>> {
        self.vols
            .read()
            .by_id
            .values()
            .filter(|c| c.st.read().gc_from.is_some())
            .cloned()
            .collect()
    }

    /// Runs every pending collection to its end (or until the pool
    /// closes), then flushes so the space freed is given back.
    fn collect_all(&self) -> Result<()> {
        let cells = self.gc_pending();
        if cells.is_empty() {
            return Ok(());
        }
        let mut res = Ok(());
        for cell in &cells {
            if let Err(e) = self.reclaim(cell, None) {
                res = Err(e);
            }
        }
        self.fold_all()?;
        res
    }

    /// Frees slots whose dropping records are durable.
    fn release_durable(&self, upto: u64) {
        let (warm, cold) = self.alloc.lock().take_durable(upto);
        if warm.is_empty() && cold.is_empty() {
            return;
        }
        // Wait out readers that may have located these slots before the drop.
        drop(self.reuse.write());
        self.give_back(&warm, &cold);
    }

    /// Makes freed ranges whose dropping record is durable, and that no
    /// reader can still be reading, reusable: `warm` ones may stay in the
    /// reuse reserve, `cold` ones and the reserve's excess are punched.
    fn give_back(&self, warm: &[Run], cold: &[Run]) {
        let punch = self.alloc.lock().release(warm, cold);
        if punch.is_empty() {
            return;
        }
        for &(s, l) in &punch {
            if let Err(e) = self.data.punch_hole(s * B, l * B) {
                tracing::warn!(error = %e, "cannot punch freed space in the data file");
            }
        }
        self.alloc.lock().release_punched(&punch);
    }

    /// Called once at open, before anything is allocated, when every free
    /// slot is one nothing references: the free slots beyond the reuse
    /// reserve are punched (slots freed before a crash never got punched).
    fn punch_free_space(&self) {
        let ranges = self.alloc.lock().settle();
        for &(s, l) in &ranges {
            if let Err(e) = self.data.punch_hole(s * B, l * B) {
                tracing::warn!(error = %e, "cannot punch free space in the data file");
            }
        }
        self.alloc.lock().release_punched(&ranges);
    }

    /// Writes the whole metadata state as a new checkpoint and switches to a
    /// new journal. Called with the flush lock held.
    fn checkpoint(&self, fs: &mut FlushState) -> Result<()> {
        let inplace = self.inplace.write();
        self.check_torn()?;
        let vols = self.vols.write();
        let mut cells: Vec<Arc<VolCell>> = vols.by_id.values().cloned().collect();
        cells.sort_by_key(|c| c.id);
        let mut guards: Vec<_> = cells.iter().map(|c| c.st.write()).collect();
        let mut j = self.journal.lock();
        let seq = j.seq;
        self.captured.fetch_max(seq, Ordering::AcqRel);
        self.fresh.lock().clear();
        let new_id = j.id + 1;
        // Changed map pages go to free slots of the meta file; the root
        // written below points at them.
        let gen = self.pages.begin_checkpoint();
        let mut dirs = Vec::with_capacity(cells.len());
        let mut page_buf = Vec::new();
        for st in guards.iter_mut() {
            dirs.push(st.map.write_dirty(&mut page_buf)?);
        }
        let mut recs = vec![Record::CheckpointBegin {
            journal_id: new_id,
            next_vol_id: vols.next_id,
            seq,
            next_page: self.pages.next_id(),
        }];
        for ((c, st), dir) in cells.iter().zip(&guards).zip(dirs) {
            recs.push(Record::CheckpointVolume {
                id: c.id,
                size: st.size,
                created_ms: st.created_ms,
                epoch: st.epoch,
                cbt_shift: match st.cbt.granularity() {
                    0 => 0,
                    g => g.trailing_zeros() as u8,
                },
                name: c.name.clone(),
            });
            for (e, s) in &st.snaps {
                recs.push(Record::SnapshotCreate {
                    vol: c.id,
                    epoch: *e,
                    size: s.size,
                    created_ms: s.created_ms,
                    name: s.name.clone(),
                });
            }
            for &(first, last, upto) in &st.damaged {
                recs.push(Record::CheckpointDamage {
                    vol: c.id,
                    first,
                    last,
                    upto,
                });
            }
            for part in dir.chunks(CKPT_CHUNK) {
                recs.push(Record::CheckpointPages {
                    vol: c.id,
                    pages: part.iter().map(|&((b, t), r)| (b, t, r)).collect(),
                });
            }
        }
        let n = recs.len() as u64 + 1;
        recs.push(Record::CheckpointEnd {
            journal_id: new_id,
            frames: n,
        });
        let mut bytes = Vec::new();
        for r in &recs {
            r.encode_frame(seq, &mut bytes);
        }
        drop(recs);
        if j.stale_tail {
            j.file
                .set_len(j.pos)
                .map_err(|e| Error::io("cannot cut the metadata journal", e))?;
            j.prealloc = j.pos;
            j.stale_tail = false;
        }
        // Records appended since the last flush must not be lost behind
        // durable records of the new journal: once the next journal exists,
        // this one is whole.
        fs.synced(
            j.file
                .sync_data()
                .map_err(|e| Error::io("cannot sync the metadata journal", e)),
        )?;
        // The new journal must exist durably before anything relies on it.
        // Once its header is written, records go to it, never again to this
        // one: opening takes a journal followed by one with a header as
        // synced whole. Without a header (a failed write), it is removed
        // again and this journal stays.
        let name = journal_name(new_id);
        self.medium
            .remove(&name)
            .map_err(|e| Error::io("cannot reset a journal", e))?;
        let nf = self
            .medium
            .open(&name, true)
            .map_err(|e| Error::io("cannot create a journal", e))?;
        let mut head = Vec::new();
        Record::JournalHeader { journal_id: new_id }.encode_frame(seq, &mut head);
        if let Err(e) = nf.write_at(&head, 0) {
            let _ = self.medium.remove(&name);
            return Err(Error::io("cannot create a journal", e));
        }
        // Reservations are made under `inplace`, which this holds.
        debug_assert_eq!(j.reserved, 0);
        let old_id = j.id;
        j.file = nf.clone();
        j.id = new_id;
        j.pos = head.len() as u64;
        j.prealloc = j.pos;
        drop(j);
        fs.synced(
            nf.sync_data()
                .and_then(|_| self.medium.sync_dir())
                .map_err(|e| Error::io("cannot create a journal", e)),
        )?;
        drop(guards);
        drop(vols);
        drop(inplace);

        // Entries in the checkpoint may point at data not yet synced, and
        // the root at pages not yet synced.
        self.data_dirty.store(false, Ordering::Release);
        fs.synced(
            self.data
                .sync_data()
                .map_err(|e| Error::io("cannot sync the data file", e)),
        )?;
        fs.synced(self.pages.sync())?;
        // Until the rename, the root in place and the journals from its
        // own on hold everything, so a failed write changes nothing.
        let tmp = self
            .medium
            .open(CHECKPOINT_TMP, true)
            .map_err(|e| Error::io("cannot write a checkpoint", e))?;
        tmp.set_len(0)
            .and_then(|_| tmp.write_at(&bytes, 0))
            .map_err(|e| Error::io("cannot write a checkpoint", e))?;
        fs.synced(
            tmp.sync_data()
                .map_err(|e| Error::io("cannot sync a checkpoint", e)),
        )?;
        self.medium
            .rename(CHECKPOINT_TMP, CHECKPOINT)
            .map_err(|e| Error::io("cannot put a checkpoint in place", e))?;
        fs.synced(
            self.medium
                .sync_dir()
                .map_err(|e| Error::io("cannot sync the data directory", e)),
        )?;
        for name in self.medium.list().unwrap_or_default() {
            if let Some(id) = name
                .strip_prefix("journal.")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if id <= old_id {
                    let _ = self.medium.remove(&name);
                }
            }
        }
        fs.durable_upto = fs.durable_upto.max(seq);
        // Page slots the new root no longer references can be reused.
        self.pages.release(gen);
        // So can data slots whose dropping records the root now holds
        // (records after the flush's capture included).
        self.release_durable(fs.durable_upto);
        Ok(())
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle part of the slice.
        b.align_to::<u64>()
    };
    // Data rarely starts with zeros: look at the first words before
    // scanning the whole block.
    pre.iter().all(|&x| x == 0)
        && mid.iter().take(4).all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid.iter().fold(0u64, |a, &x| a | x) == 0
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.cell.name
    }

    /// The snapshot this handle reads, or `None` for the head.
    pub fn snapshot(&self) -> Option<&str> {
        match &self.view {
            View::Head => None,
            View::Snapshot { name, .. } => Some(name),
        }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        matches!(self.view, View::Snapshot { .. })
    }

    fn label(&self) -> String {
        match &self.view {
            View::Head => self.cell.name.clone(),
            View::Snapshot { name, .. } => format!("{}@{}", self.cell.name, name),
        }
    }

    /// The volume's change-tracking granularity in bytes.
    pub fn cbt_granularity(&self) -> u64 {
        self.cell.st.read().cbt.granularity()
    }

    /// Names of the snapshots older than this view, oldest first: the points
    /// a change bitmap can be asked against.
    pub fn older_points(&self) -> Vec<String> {
        self.older_point_ids().into_iter().map(|(n, _)| n).collect()
    }

    /// `older_points`, each with the identity of the snapshot the name
    /// stands for now (see [`PointId`]).
    pub fn older_point_ids(&self) -> Vec<(String, PointId)> {
        let st = self.cell.st.read();
        if !st.cbt.enabled() {
            return Vec::new();
        }
        let limit = match &self.view {
            View::Head => u32::MAX,
            View::Snapshot { epoch, .. } => *epoch,
        };
        st.snaps
            .range(..limit)
            .map(|(&e, s)| (s.name.clone(), PointId(e)))
            .collect()
    }

    /// The snapshot `point` names now.
    pub fn point_id(&self, point: &str) -> Result<PointId> {
        let st = self.cell.st.read();
        st.snap_by_name(point)
            .map(PointId)
            .ok_or_else(|| not_found_snap(&self.cell.name, point))
    }

    /// Byte ranges of `[offset, offset+len)` (clipped to the size) written,
    /// trimmed or zeroed after snapshot `point` and up to this view, at the
    /// volume's tracking granularity.
    pub fn changed_since(&self, point: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let id = self.point_id(point)?;
        self.changed_since_id(point, id, offset, len)
    }

    /// `changed_since` the snapshot `id` (named `point`, for messages):
    /// fails once that snapshot is deleted, even if another one has taken
    /// its name since.
    pub fn changed_since_id(
        &self,
        point: &str,
        id: PointId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let st = self.cell.st.read();
        let (limit, size) = self.view_of(&st)?;
        let a = id.0;
        if !st.snaps.contains_key(&a) {
            return Err(Error::new(
                ErrorKind::Deleted,
                format!(
                    "snapshot {point:?} of volume {:?} was deleted (a snapshot taken under that name since is another one)",
                    self.cell.name
                ),
            ));
        }
        if a >= limit {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{point} is not older than {}: the first point must be the older one",
                    self.label()
                ),
            ));
        }
        if !st.cbt.enabled() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("change tracking is off for volume {}", self.cell.name),
            ));
        }
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = len.min(size - offset);
        let upto = if limit == u32::MAX { st.epoch } else { limit };
        Ok(st.cbt.changed(a, upto, offset, len))
    }

    /// The eBackup-style version view: for each run of `[offset,
    /// offset+len)`, which point first holds the data this view sees there
    /// (`Version::Point`), whether it was written after the newest point
    /// (`Version::Head`), or never written (`Version::Unwritten`).
    pub fn versions(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Version)>> {
        let st = self.cell.st.read();
        let (limit, size) = self.view_of(&st)?;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(len).min(size);
        let first = offset / B;
        let n = ((end - 1) / B - first + 1) as usize;
        let mut births: Vec<Option<u32>> = vec![None; n];
        st.map
            .scan((first, 0), (first + n as u64, 0), |(b, t), _| {
                if t <= limit {
                    births[(b - first) as usize] = Some(t);
                }
                true
            })?;
        let mut out: Vec<(u64, u64, Version)> = Vec::new();
        for (i, birth) in births.into_iter().enumerate() {
            let v = match birth {
                None => Version::Unwritten,
                Some(t) => match st.snaps.range(t..).next() {
                    Some((_, s)) => Version::Point(s.name.clone()),
                    None => Version::Head,
                },
            };
            let s0 = ((first + i as u64) * B).max(offset);
            let e0 = ((first + i as u64 + 1) * B).min(end);
            match out.last_mut() {
                Some((o, l, pv)) if *pv == v && *o + *l == s0 => *l += e0 - s0,
                _ => out.push((s0, e0 - s0, v)),
            }
        }
        Ok(out)
    }

    /// Virtual size in bytes (0 once deleted).
    pub fn size(&self) -> u64 {
        let st = self.cell.st.read();
        match &self.view {
            View::Head => st.size,
            View::Snapshot { epoch, .. } => st.snaps.get(epoch).map(|s| s.size).unwrap_or(0),
        }
    }

    /// The view's epoch limit and size; errors when deleted.
    fn view_of(&self, st: &VolState) -> Result<(u32, u64)> {
        if st.deleted {
            return Err(deleted(&self.label()));
        }
        match &self.view {
            View::Head => Ok((u32::MAX, st.size)),
            View::Snapshot { epoch, .. } => st
                .snaps
                .get(epoch)
                .map(|s| (*epoch, s.size))
                .ok_or_else(|| deleted(&self.label())),
        }
    }

    /// For a write whose range was checked before the volume lock was let
    /// go: whether blocks `first..first+n` still start within `size`.
    fn blocks_within(&self, first: u64, n: u64, size: u64) -> Result<()> {
        if first + n > size.div_ceil(B) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: the volume shrank to {size} bytes during the write",
                    self.label()
                ),
            ));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: range {offset}+{len} is past the end ({size} bytes)",
                    self.label()
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Every stored block is checked
    /// against its checksum; a mismatch is an error, never data.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_retrying(buf, offset, true)
    }

    /// `read_at` if it can be done without waiting: for the disk (data or
    /// map pages not in memory), for a lock another thread holds, or to
    /// read again after a checksum mismatch. `Ok(false)`: nothing was read
    /// (`buf` holds nothing meaningful); call `read_at`. Lets an event loop
    /// serve reads from memory itself and hand only the rest to threads
    /// that may block. Errors are those `read_at` would give.
    pub fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        match self.read_once(buf, offset, false) {
            Err(e) if e.kind() == ErrorKind::Corruption => Ok(false),
            r => r,
        }
    }

    /// `read_at`; with `retry`, reads once more after a checksum mismatch,
    /// with in-place overwrites held off.
    fn read_retrying(&self, buf: &mut [u8], offset: u64, retry: bool) -> Result<()> {
        let res = match self.read_once(buf, offset, true) {
            Err(e) if e.kind() == ErrorKind::Corruption && retry => {
                // Maybe a block overwritten in place while we read it (new
                // bytes under the checksum we located first): read again
                // with in-place overwrites held off (they write elsewhere
                // meanwhile), so that a mismatch now is damage. Waiting
                // only for the overwrites under way is not enough: under
                // steady overwrites, a large read meets a new one each try.
                let _no_inplace = self.inner.inplace.write();
                self.read_once(buf, offset, true)
            }
            r => r,
        };
        match res {
            Err(e) => {
                if e.kind() == ErrorKind::Corruption {
                    tracing::error!(volume = %self.label(), offset, len = buf.len(), "{e}");
                }
                Err(e)
            }
            Ok(_) => Ok(()),
        }
    }

    /// One read; with `wait` false, `Ok(false)` where it would wait (see
    /// [`Volume::read_at_cached`]). With `wait`, never `Ok(false)`.
    fn read_once(&self, buf: &mut [u8], offset: u64, wait: bool) -> Result<bool> {
        if buf.is_empty() {
            return Ok(true);
        }
        let first = offset / B;
        let st = if wait {
            self.cell.st.read()
        } else {
            match self.cell.st.try_read() {
                Some(st) => st,
                None => return Ok(false),
            }
        };
        let (limit, size) = self.view_of(&st)?;
        self.check_range(offset, buf.len() as u64, size)?;
        let last = (offset + buf.len() as u64 - 1) / B;
        if !st.damaged.is_empty() {
            // Telling which blocks of a damaged range were written since
            // may read map pages: not without waiting.
            if !wait && st.touches_damaged(first, last) {
                return Ok(false);
            }
            if let Some(b) = st.first_damaged(first, last - first + 1, limit)? {
                return Err(Error::corrupt(format!(
                    "{}: block at offset {} is damaged (its map entry was lost with a damaged map page)",
                    self.label(),
                    b * B
                )));
            }
        }
        // Short reads (the common case) locate into the stack.
        let n = (last - first + 1) as usize;
        let mut small = [Loc::Hole; 32];
        let mut big = Vec::new();
        let locs: &mut [Loc] = if n <= small.len() {
            &mut small[..n]
        } else {
            big.resize(n, Loc::Hole);
            &mut big
        };
        if !st.locate(first, locs, limit, wait)? {
            return Ok(false);
        }
        let _reading = if wait {
            self.inner.reuse.read()
        } else {
            match self.inner.reuse.try_read() {
                Some(g) => g,
                None => return Ok(false),
            }
        };
        drop(st);
        let data = &self.inner.data;
        let read = |dst: &mut [u8], at: u64| -> Result<bool> {
            let r = if wait {
                data.read_at(dst, at).map(|()| true)
            } else {
                data.read_at_nowait(dst, at)
            };
            r.map_err(|e| Error::io(format!("{}: read failed", self.label()), e))
        };
        let mut tmp: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < locs.len() {
            let b = first + i as u64;
            let bstart = b * B;
            // Portion of buf this block covers.
            let lo = bstart.max(offset);
            let hi = (bstart + B).min(offset + buf.len() as u64);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match locs[i] {
                Loc::Hole | Loc::Zero => {
                    out.fill(0);
                    i += 1;
                }
                Loc::Data { slot, .. } if lo == bstart && hi == bstart + B => {
                    // A run of whole blocks in consecutive slots: one read
                    // straight into the caller's buffer.
                    let mut n = 1;
                    while i + n < locs.len() {
                        let nb = bstart + n as u64 * B;
                        match locs[i + n] {
                            Loc::Data { slot: s2, .. }
                                if s2 == slot + n as u64 && nb + B <= offset + buf.len() as u64 =>
                            {
                                n += 1
                            }
                            _ => break,
                        }
                    }
                    let start = (bstart - offset) as usize;
                    let dst = &mut buf[start..start + n * BLOCK];
                    if !read(dst, slot * B)? {
                        return Ok(false);
                    }
                    for k in 0..n {
                        if let Loc::Data { crc, .. } = locs[i + k] {
                            self.check_crc(
                                &dst[k * BLOCK..(k + 1) * BLOCK],
                                crc,
                                bstart + k as u64 * B,
                            )?;
                        }
                    }
                    i += n;
                }
                Loc::Data { slot, crc } => {
                    tmp.resize(BLOCK, 0);
                    if !read(&mut tmp, slot * B)? {
                        return Ok(false);
                    }
                    self.check_crc(&tmp, crc, bstart)?;
                    out.copy_from_slice(&tmp[(lo - bstart) as usize..(hi - bstart) as usize]);
                    i += 1;
                }
            }
        }
        Ok(true)
    }

    fn check_crc(&self, data: &[u8], crc: u32, offset: u64) -> Result<()> {
        if format::block_crc(data) == crc {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "{}: block at offset {offset} is damaged (checksum mismatch)",
            self.label()
        )))
    }

    fn writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is a read-only snapshot", self.label()),
            ));
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` it is durable on return.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable()?;
        if data.is_empty() {
            return Ok(());
        }
        {
            let st = self.cell.st.read();
            let (_, size) = self.view_of(&st)?;
            self.check_range(offset, data.len() as u64, size)?;
        }
        let end = offset + data.len() as u64;
        let mut pos = offset;
        let mut recs = Records::default();
        while pos < end {
            let b = pos / B;
            let bstart = b * B;
            if pos == bstart && end >= bstart + B {
                // The whole-block middle part.
                let nblocks = (end - pos) / B;
                let from = (pos - offset) as usize;
                recs.add(self.write_blocks(
                    b,
                    &data[from..from + nblocks as usize * BLOCK],
                    false,
                    false,
                )?);
                pos += nblocks * B;
            } else {
                let hi = (bstart + B).min(end);
                let from = (pos - offset) as usize;
                recs.add(self.patch_block(
                    b,
                    (pos - bstart) as usize,
                    Some(&data[from..from + (hi - pos) as usize]),
                    hi - pos,
                    false,
                )?);
                pos = hi;
            }
        }
        if fua {
            self.inner.flush_request(recs)?;
        }
        Ok(())
    }

    /// Read-modify-write of part of one block (`data` None: zeros).
    fn patch_block(
        &self,
        b: u64,
        at: usize,
        data: Option<&[u8]>,
        len: u64,
        trim: bool,
    ) -> Result<u64> {
        let _g = self.inner.stripes[self.stripe(b)].lock();
        let mut blk = vec![0u8; BLOCK];
        {
            let st = self.cell.st.read();
            let (_, size) = self.view_of(&st)?;
            drop(st);
            // Shrunk since the caller checked the range?
            self.blocks_within(b, 1, size)?;
            // The block may reach past a size that is not block-aligned.
            let valid = (size - b * B).min(B) as usize;
            // No in-place overwrite of this block can be under way: they
            // take its stripe, which is held here. So a mismatch is damage,
            // with nothing to wait for (waiting for `inplace` here would
            // deadlock with an overwrite holding it and wanting this stripe).
            self.read_retrying(&mut blk[..valid], b * B, false)?;
        }
        match data {
            Some(d) => blk[at..at + d.len()].copy_from_slice(d),
            None => blk[at..at + len as usize].fill(0),
        }
        self.write_blocks(b, &blk, trim, true)
    }

    fn stripe(&self, b: u64) -> usize {
        (b as usize ^ (self.cell.id as usize).wrapping_mul(0x9e37_79b9)) % STRIPES
    }

    /// Overwrites whole blocks in place when every one of them is the head's
    /// own fresh copy: born in the current epoch (no snapshot sees it) and
    /// written by a record that no flush has captured yet (so after a crash
    /// its record is either durable together with this one or checked
    /// against the data and dropped, falling back to the older durable
    /// copy, which redirect-on-write left untouched). Repeated overwrites
    /// between flushes then reuse the same slots, like a plain file, instead
    /// of piling up freed space. `None`: not possible, use redirect-on-write.
    /// `new` holds the blocks' new locations (all `Data`, slots unset).
    fn overwrite_in_place(
        &self,
        first: u64,
        data: &[u8],
        new: &[Loc],
        stripe_held: bool,
    ) -> Result<Option<u64>> {
        let n = new.len();
        if n == 0 || n > 1024 {
            return Ok(None);
        }
        let Some(_inplace) = self.inner.inplace.try_read() else {
            return Ok(None);
        };
        // Writers of the same blocks in place must not interleave.
        let _stripes: Vec<_> = if stripe_held {
            Vec::new()
        } else {
            let mut idx: Vec<usize> = (0..n as u64).map(|i| self.stripe(first + i)).collect();
            idx.sort_unstable();
            idx.dedup();
            idx.into_iter()
                .map(|i| self.inner.stripes[i].lock())
                .collect()
        };
        let (cur, targets) = {
            let st = self.cell.st.read();
            if self.view_of(&st).is_err() {
                return Ok(None);
            }
            let cur = st.epoch;
            let captured = self.inner.captured.load(Ordering::Acquire);
            let fresh = self.inner.fresh.lock();
            let mut targets = Vec::with_capacity(n);
            for i in 0..n as u64 {
                match st.map.latest(first + i, u32::MAX)? {
                    Some((t, Loc::Data { slot, crc }))
                        if t == cur && fresh.get(&slot).is_some_and(|&s| s > captured) =>
                    {
                        targets.push((slot, crc))
                    }
                    _ => return Ok(None),
                }
            }
            (cur, targets)
        };
        let locs: Vec<Loc> = targets
            .iter()
            .zip(new)
            .map(|(&(slot, _), l)| match *l {
                Loc::Data { crc, .. } => Loc::Data { slot, crc },
                other => other,
            })
            .collect();
        // Room in the journal first: once the data is written in place, a
        // record that does not fit would leave the pool torn (below), so a
        // full disk fails here instead, with nothing changed.
        let room = Journal::reserve(&self.inner.journal, Record::update_frame_len(n))?;
        if let Err(e) = self.write_slots(data, &locs) {
            // The slots may now hold neither the old data nor the new, and
            // the old data's record is not durable yet: no flush may make
            // it so (after a reopen, replay checks it and falls back).
            *self.inner.torn.lock() = Some(e.to_string());
            return Err(e);
        }
        self.inner.data_dirty.store(true, Ordering::Release);
        // From here the slots hold the new data: a failure before the map
        // and the journal say so must keep any flush from making the old
        // record durable, as above.
        let torn = |e: Error| {
            *self.inner.torn.lock() = Some(e.to_string());
            e
        };
        let mut st = self.cell.st.write();
        self.view_of(&st)?;
        // A redirect-on-write of the same block may have won meanwhile: then
        // the slot is freed (not reusable before a flush, which cannot
        // capture while we hold `inplace`), and we write again elsewhere.
        let mut unchanged = st.epoch == cur;
        for (i, &(slot, crc)) in targets.iter().enumerate() {
            if !unchanged {
                break;
            }
            unchanged =
                st.map.get((first + i as u64, cur)).map_err(torn)? == Some(Loc::Data { slot, crc });
        }
        if !unchanged {
            return Ok(None);
        }
        st.map
            .prepare((first, cur), (first + n as u64 - 1, cur))
            .map_err(torn)?;
        let items: Vec<UpdateItem> = locs
            .iter()
            .enumerate()
            .map(|(i, &l)| UpdateItem {
                block: first + i as u64,
                set: Some(l),
                drop: None,
            })
            .collect();
        st.cbt.mark(cur, first * B, n as u64 * B);
        let rec = Record::Update {
            vol: self.cell.id,
            birth: cur,
            items,
        };
        let seq = room.append(&rec).map_err(torn)?;
        let Record::Update { items, .. } = rec else {
            unreachable!()
        };
        let mut freed = Vec::new();
        st.apply_update(cur, &items, &mut freed).map_err(torn)?;
        debug_assert!(freed.is_empty());
        drop(st);
        let mut fresh = self.inner.fresh.lock();
        for &(slot, _) in &targets {
            fresh.insert(slot, seq);
        }
        Ok(Some(seq))
    }

    /// Writes whole blocks; returns the journal sequence number of the record.
    fn write_blocks(
        &self,
        first: u64,
        data: &[u8],
        zero_is_hole: bool,
        stripe_held: bool,
    ) -> Result<u64> {
        let n = data.len() / BLOCK;
        let mut locs: Vec<Loc> = Vec::with_capacity(n);
        let mut need = 0u64;
        for c in data.chunks_exact(BLOCK) {
            if is_zero(c) {
                locs.push(if zero_is_hole { Loc::Hole } else { Loc::Zero });
            } else {
                need += 1;
                locs.push(Loc::Data {
                    slot: 0,
                    crc: format::block_crc(c),
                });
            }
        }
        if need == n as u64 {
            if let Some(seq) = self.overwrite_in_place(first, data, &locs, stripe_held)? {
                return Ok(seq);
            }
        }
        let mut claimed = 0;
        let runs = if need > 0 {
            let mut a = self.inner.alloc.lock();
            claimed = self.inner.room_for(a.fresh_for(need))?;
            a.alloc(need)
        } else {
            Vec::new()
        };
        // Assign slots and write the data, one pwrite per run of slots that
        // maps consecutive data blocks.
        let mut slots = runs.iter().flat_map(|&(s, l)| s..s + l);
        for l in locs.iter_mut() {
            if let Loc::Data { slot, .. } = l {
                *slot = slots.next().expect("allocator returned enough slots");
            }
        }
        let res = self.write_slots(data, &locs);
        if claimed > 0 {
            // Only while the reserve is missing: no shared write otherwise.
            self.inner
                .space_claimed
                .fetch_sub(claimed, Ordering::AcqRel);
        }
        if let Err(e) = res {
            self.give_back(&locs);
            return Err(e);
        }
        if need > 0 {
            self.inner.data_dirty.store(true, Ordering::Release);
        }
        let mut st = self.cell.st.write();
        // The size is checked again: the volume may have shrunk meanwhile.
        if let Err(e) = self
            .view_of(&st)
            .and_then(|(_, size)| self.blocks_within(first, n as u64, size))
        {
            drop(st);
            self.give_back(&locs);
            return Err(e);
        }
        let mut items: Vec<UpdateItem> = Vec::with_capacity(n);
        for (i, &l) in locs.iter().enumerate() {
            match st.plan(first + i as u64, l) {
                Ok(Some(it)) => items.push(it),
                Ok(None) => {}
                Err(e) => {
                    drop(st);
                    self.give_back(&locs);
                    return Err(e);
                }
            }
        }
        // Every block the request touched counts as changed, even where the
        // map did not change (zeros over a hole).
        let epoch = st.epoch;
        st.cbt.mark(epoch, first * B, n as u64 * B);
        if items.is_empty() {
            return Ok(0);
        }
        let rec = Record::Update {
            vol: self.cell.id,
            birth: st.epoch,
            items,
        };
        let seq = match self.inner.journal.lock().append(&rec) {
            Ok(s) => s,
            Err(e) => {
                drop(st);
                self.give_back(&locs);
                return Err(e);
            }
        };
        let Record::Update { birth, items, .. } = rec else {
            unreachable!()
        };
        let mut freed = Vec::new();
        let applied = st.apply_update(birth, &items, &mut freed);
        drop(st);
        applied?;
        self.inner.note_dirty_pages();
        {
            let mut fresh = self.inner.fresh.lock();
            if fresh.len() < FRESH_MAX {
                for l in &locs {
                    if let Loc::Data { slot, .. } = l {
                        fresh.insert(*slot, seq);
                    }
                }
            }
        }
        if !freed.is_empty() {
            // As the allocator sees it: a run of data blocks or not.
            let how = if need >= crate::alloc::CONTIGUOUS {
                Freed::Bulk
            } else {
                Freed::Scattered
            };
            let piled = {
                let mut a = self.inner.alloc.lock();
                for s in freed {
                    a.defer(seq, s, how);
                }
                self.inner.piled_up(&a)
            };
            self.inner.note_pending(piled);
        }
        Ok(seq)
    }

    fn write_slots(&self, data: &[u8], locs: &[Loc]) -> Result<()> {
        let mut i = 0;
        while i < locs.len() {
            let Loc::Data { slot, .. } = locs[i] else {
                i += 1;
                continue;
            };
            let mut n = 1;
            while i + n < locs.len() {
                match locs[i + n] {
                    Loc::Data { slot: s2, .. } if s2 == slot + n as u64 => n += 1,
                    _ => break,
                }
            }
            self.inner
                .data
                .write_at(&data[i * BLOCK..(i + n) * BLOCK], slot * B)
                .map_err(|e| Error::io(format!("{}: write failed", self.label()), e))?;
            i += n;
        }
        Ok(())
    }

    fn give_back(&self, locs: &[Loc]) {
        let mut a = self.inner.alloc.lock();
        for l in locs {
            if let Loc::Data { slot, .. } = l {
                a.give_back(*slot);
            }
        }
    }

    /// Marks whole blocks of a range with `loc` (Hole or Zero), zeroing the
    /// partial blocks at its ends.
    fn unmap(&self, offset: u64, len: u64, loc: Loc, fua: bool) -> Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        {
            let st = self.cell.st.read();
            let (_, size) = self.view_of(&st)?;
            self.check_range(offset, len, size)?;
        }
        let end = offset + len;
        let mut pos = offset;
        let mut recs = Records::default();
        let trim = loc == Loc::Hole;
        while pos < end {
            let b = pos / B;
            let bstart = b * B;
            if pos == bstart && end >= bstart + B {
                let n = (end - pos) / B;
                self.set_blocks(b, n, loc, &mut recs)?;
                pos += n * B;
            } else {
                let hi = (bstart + B).min(end);
                recs.add(self.patch_block(b, (pos - bstart) as usize, None, hi - pos, trim)?);
                pos = hi;
            }
        }
        if fua {
            self.inner.flush_request(recs)?;
        }
        Ok(())
    }

    /// Deallocates the head's bytes in `[from, to)`, which may lie past its
    /// size (see `Pool::resize_volume`); returns the last record's sequence
    /// number.
    fn drop_past(&self, from: u64, to: u64) -> Result<u64> {
        let mut seq = 0;
        let mut first = from.div_ceil(B);
        if !from.is_multiple_of(B) && from < to {
            let b = from / B;
            let hi = (b * B + B).min(to);
            seq = self.patch_block(b, (from - b * B) as usize, None, hi - from, true)?;
            first = b + 1;
        }
        // Only where the map has entries: the range may be terabytes of
        // nothing, which would cost time and change-tracking bits.
        let end = to.div_ceil(B);
        let mut b = first;
        while b < end {
            let next = {
                let st = self.cell.st.read();
                self.view_of(&st)?;
                let mut found = None;
                st.map.scan((b, 0), (end, 0), |(blk, _), _| {
                    found = Some(blk);
                    false
                })?;
                found
            };
            let Some(nb) = next else {
                break;
            };
            let upto = end.min(nb + 65536);
            let mut recs = Records::default();
            self.set_blocks(nb, upto - nb, Loc::Hole, &mut recs)?;
            seq = seq.max(recs.last);
            b = upto;
        }
        Ok(seq)
    }

    /// Sets `n` blocks from `first` to Hole or Zero, in bounded batches;
    /// adds each batch's record (0: none) to `recs`.
    fn set_blocks(&self, first: u64, n: u64, loc: Loc, recs: &mut Records) -> Result<()> {
        let mut b = first;
        let end = first + n;
        while b < end {
            let mut st = self.cell.st.write();
            self.view_of(&st)?;
            // Trim changes only blocks with entries (a never-written block
            // is a hole already). NO_HOLE zeroing provisions every block as
            // known zeros: a map entry each (about 50 bytes of metadata per
            // 4 KiB), no data space. Batches bound the time the volume lock
            // is held and the size of a record.
            let batch_end = end.min(b + 65536);
            let epoch = st.epoch;
            st.cbt.mark(epoch, b * B, (batch_end - b) * B);
            let mut blocks: Vec<u64> = Vec::new();
            if loc == Loc::Zero {
                blocks.extend(b..batch_end);
            } else {
                st.map.scan((b, 0), (batch_end, 0), |(blk, _), _| {
                    if blocks.last() != Some(&blk) {
                        blocks.push(blk);
                    }
                    true
                })?;
            }
            // Blocks whose entries were lost with a damaged map page are
            // unknown, not holes: a trim makes them known holes (an entry
            // born now, see `plan`), as a write makes them known data.
            let lost = st.lost_in(b, batch_end);
            if !lost.is_empty() {
                blocks.extend(lost);
                blocks.sort_unstable();
                blocks.dedup();
            }
            let mut items: Vec<UpdateItem> = Vec::with_capacity(blocks.len());
            for &blk in &blocks {
                if let Some(it) = st.plan(blk, loc)? {
                    items.push(it);
                }
            }
            if items.is_empty() {
                recs.add(0);
            } else {
                let rec = Record::Update {
                    vol: self.cell.id,
                    birth: st.epoch,
                    items,
                };
                let s = self.inner.journal.lock().append(&rec)?;
                let Record::Update { birth, items, .. } = rec else {
                    unreachable!()
                };
                let mut freed = Vec::new();
                let applied = st.apply_update(birth, &items, &mut freed);
                drop(st);
                applied?;
                self.inner.note_dirty_pages();
                let mut a = self.inner.alloc.lock();
                for sl in freed {
                    a.defer(s, sl, Freed::Cold);
                }
                recs.add(s);
            }
            b = batch_end;
        }
        Ok(())
    }

    /// Deallocates a range: it reads as zeros and takes no space.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.unmap(offset, len, Loc::Hole, fua)
    }

    /// Zeroes a range; deallocates it unless `no_hole`, in which case it
    /// stays allocated as known zeros (still without using data space).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> Result<()> {
        self.unmap(
            offset,
            len,
            if no_hole { Loc::Zero } else { Loc::Hole },
            fua,
        )
    }

    /// Makes every completed write (of any handle) durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush_all()
    }

    /// Allocation of `[offset, offset+len)` clipped to the size, as
    /// consecutive extents of data, known zeros and holes.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let st = self.cell.st.read();
        let (limit, size) = self.view_of(&st)?;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(len).min(size);
        let first = offset / B;
        let last = (end - 1) / B;
        // Walk only the entries present; gaps are holes. Bounded by entries.
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, s: u64, e: u64, kind: ExtentKind| {
            let s = s.max(offset);
            let e = e.min(end);
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(x) if x.kind == kind && x.offset + x.length == s => x.length += e - s,
                _ => out.push(Extent {
                    offset: s,
                    length: e - s,
                    kind,
                }),
            }
        };
        let mut cursor = first;
        let mut cur_block: Option<(u64, Loc)> = None;
        let emit = |out: &mut Vec<Extent>, cursor: &mut u64, blk: u64, l: Loc| {
            if blk > *cursor {
                push(out, *cursor * B, blk * B, ExtentKind::Hole);
            }
            let kind = match l {
                Loc::Hole => ExtentKind::Hole,
                Loc::Zero => ExtentKind::Zero,
                Loc::Data { .. } => ExtentKind::Data,
            };
            push(out, blk * B, (blk + 1) * B, kind);
            *cursor = blk + 1;
        };
        st.map.scan((first, 0), (last + 1, 0), |(b, t), l| {
            if t > limit {
                return true;
            }
            match cur_block {
                Some((cb, _)) if cb == b => cur_block = Some((b, l)),
                Some((cb, cl)) => {
                    emit(&mut out, &mut cursor, cb, cl);
                    cur_block = Some((b, l));
                }
                None => cur_block = Some((b, l)),
            }
            true
        })?;
        if let Some((cb, cl)) = cur_block {
            emit(&mut out, &mut cursor, cb, cl);
        }
        if cursor <= last {
            push(&mut out, cursor * B, (last + 1) * B, ExtentKind::Hole);
        }
        // Blocks with lost metadata are reported as data, so that readers
        // read them (and get the error) instead of skipping them as holes.
        let cuts: Vec<(u64, u64)> = st
            .damaged
            .iter()
            .filter_map(|&(lo, hi, _)| {
                let a = (lo * B).max(offset);
                let z = ((hi + 1) * B).min(end);
                (a < z).then_some((a, z))
            })
            .collect();
        if !cuts.is_empty() {
            let mut res = Vec::with_capacity(out.len() + 2 * cuts.len());
            for e in out {
                let mut pos = e.offset;
                let e_end = e.offset + e.length;
                while pos < e_end {
                    if let Some(&(_, z)) = cuts.iter().find(|&&(a, z)| a <= pos && pos < z) {
                        let to = z.min(e_end);
                        push(&mut res, pos, to, ExtentKind::Data);
                        pos = to;
                    } else {
                        let to = cuts
                            .iter()
                            .map(|&(a, _)| a)
                            .filter(|&a| a > pos)
                            .min()
                            .unwrap_or(e_end)
                            .min(e_end);
                        push(&mut res, pos, to, e.kind);
                        pos = to;
                    }
                }
            }
            out = res;
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("export", &self.label())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemMedium;

    /// A snapshot deletion's drops, then a trim of the newer entry that
    /// made them garbage, then a kill before any flush. Replay must apply
    /// both (or neither): applying only the trim would bring back the
    /// deleted snapshot's data as the head's.
    #[test]
    fn unflushed_drops_then_a_trim_survive_a_kill_together() {
        let m = MemMedium::new();
        let pool = Pool::open_medium(Arc::new(m.clone()), PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        let h = pool.open_head("v").unwrap();
        h.write_at(&[0xaa; BLOCK], 0, false).unwrap();
        pool.create_snapshot("v", "s1").unwrap();
        h.write_at(&[0xbb; BLOCK], 0, false).unwrap();
        pool.flush().unwrap();
        // `delete_snapshot` up to, not including, its final flush.
        let cell = pool.cell("v").unwrap();
        pool.unlist_snapshot(&cell, "v", "s1").unwrap();
        assert!(
            pool.inner.collect_garbage(&cell, None).unwrap().0 > 0,
            "a Drops record was journaled"
        );
        h.trim(0, BLOCK as u64, false).unwrap();
        let after = m.kill();
        drop((h, cell, pool));
        let pool = Pool::open_medium(Arc::new(after), PoolOptions::default()).unwrap();
        let mut buf = vec![0u8; BLOCK];
        pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0) || buf.iter().all(|&b| b == 0xbb),
            "block 0 after the kill reads {:#x}: neither the trim nor the last write",
            buf[0]
        );
    }

    /// A resize waiting for another one must act on the volume it looked
    /// up: if that volume is deleted and another takes its name meanwhile,
    /// the resize fails and leaves the newcomer alone.
    #[test]
    fn a_waiting_resize_leaves_a_recreated_namesake_alone() {
        let pool = Pool::open_medium(Arc::new(MemMedium::new()), PoolOptions::default()).unwrap();
        pool.create_volume("v", 16 * B).unwrap();
        let busy = pool.inner.resizing.lock();
        let waiting = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.resize_volume("v", 64 * B, false))
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        pool.delete_volume("v").unwrap();
        pool.create_volume("v", 64 * B).unwrap();
        let h = pool.open_head("v").unwrap();
        h.write_at(&[0x5a; BLOCK], 32 * B, true).unwrap();
        drop(busy);
        assert_eq!(
            waiting.join().unwrap().unwrap_err().kind(),
            ErrorKind::Deleted
        );
        let mut buf = vec![0u8; BLOCK];
        h.read_at(&mut buf, 32 * B).unwrap();
        assert!(buf == [0x5a; BLOCK], "the newcomer's data was dropped");
    }
}
