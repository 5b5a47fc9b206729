//! The paged redirect-on-write map.
//!
//! A volume's map — `(block, birth) → location`, sorted — is cut into
//! *pages* of at most `page_max` entries (640 by default). The *directory*,
//! one small entry per page keyed by the page's lowest key, always stays in
//! memory (about 60 bytes per page, so about 0.1 byte per mapped block); the
//! pages themselves live in fixed 16 KiB slots of the `meta` file and are
//! read on demand through a byte-bounded LRU cache shared by every volume of
//! the pool ([`crate::PoolOptions::map_cache_bytes`]).
//!
//! ```text
//!  directory (per volume, in memory)        meta file (16 KiB slots)
//!  lo key ──► Clean{slot, id, first, last} ──► frame: CheckpointEntries (seq = page id)
//!         ├─► Dirty(page in memory)           ▲
//!         └─► Patched{id, base, ops} ─────────┘ base: the retired slot it was
//!                                               (all three written back by a checkpoint)
//!  cache: page id ──► Arc<Page> (LRU; clean pages and patched ones)
//! ```
//!
//! A page changes only in memory: the first change of a clean page loads it
//! (cache or disk), turns its directory entry `Dirty` and *retires* its slot.
//! Dirty pages stay in memory until the next checkpoint writes them to free
//! slots, with fresh page ids, and the new root (the `checkpoint` file)
//! points at them. The journal holds every change since the last root, so a
//! dirty page is never the only copy of anything durable. A retired slot is
//! still referenced by the durable root until the next root replaces it:
//! it becomes free only when a checkpoint that began after its retirement has
//! completed (generation counter), so the durable root never points at a
//! rewritten slot. Page ids never repeat (the next id is kept in the root),
//! so a cached page can never be mistaken for a later occupant of its slot.
//!
//! Dirty pages past a quarter of the cache memory become *patches* once the
//! change at hand is applied ([`PagedMap::spill`]): the page as it was
//! (`base`, its retired slot, which no checkpoint frees before writing the
//! page back) and the few changes made since, a few dozen bytes instead of
//! 20 KiB. The patched page is cached under a fresh id and put together
//! again from its base when evicted. So scattered small writes can change
//! many more pages between checkpoints, and each page a checkpoint writes
//! carries more of them: 4 KiB random writes over 8 GiB of written data
//! write 1.12 bytes per byte with the default cache, not 5.0. A page that
//! split, merged or took more changes than an eighth of `page_max` stays
//! dirty. A checkpoint comes when dirty pages pass half again their
//! quarter, or patches their eighth of the cache.
//!
//! A page that outgrows `page_max` splits in two; one that drops below a
//! quarter of it merges with a neighbour already in memory; an emptied page
//! leaves the directory at the next checkpoint (until then it keeps its key
//! range, so a change prepared for that range never needs another page).
//!
//! Locking: the directory is part of `VolState`, so it is guarded by the
//! volume lock: readers (shared) may load pages into the cache, writers
//! (exclusive) change pages. A reader finishes reading a slot under the
//! volume lock, and a slot is retired only under the exclusive lock, so no
//! read races a reuse. The cache shards and the slot allocator have mutexes
//! of their own, taken innermost and briefly.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, decode_frame, Decoded, PageRef, Record};
use crate::medium::MediumFile;
use crate::Loc;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// A map key: block number and birth epoch.
pub(crate) type Key = (u64, u32);
/// A map entry.
pub(crate) type Entry = (u64, u32, Loc);

/// Bytes of a page slot in the meta file. A page of `PAGE_MAX` entries
/// encodes to 16 025 bytes.
pub(crate) const PAGE_BYTES: u64 = 16384;
/// Most entries in a page; a fuller page is split in two.
pub(crate) const PAGE_MAX: usize = 640;
/// Memory a page's entries take, for the cache bound.
const ENTRY_MEM: usize = std::mem::size_of::<Entry>();
const PAGE_OVERHEAD: usize = 96;
const CACHE_SHARDS: usize = 16;
/// Memory of a dirty page: it keeps room for `page_max + 1` entries, so
/// inserts never reallocate it.
fn dirty_page_mem(page_max: usize) -> usize {
    PAGE_OVERHEAD + (page_max + 1) * ENTRY_MEM
}

/// Largest key; no real block is that high.
#[cfg(test)]
pub(crate) const KEY_MAX: Key = (u64::MAX, u32::MAX);

/// A page's entries, sorted by key.
#[derive(Debug, Default, Clone)]
pub(crate) struct Page {
    pub entries: Vec<Entry>,
    /// First and last block, kept next to the vector's header so a lookup
    /// can aim without first touching the (possibly cold) entries.
    span: (u64, u64),
    /// For a dirty page: the written page it was, and the changes made to
    /// it since, while they are few and the page kept its key range (no
    /// split or merge), so the page can be *patched* (see [`Patch`]).
    hist: Option<Box<Patch>>,
}

/// A changed page kept as the written page it was (`base`) and the
/// changes made to it since (`ops`, in order; `None` removes the key),
/// instead of all its entries: a few dozen bytes in memory, not 20 KiB.
/// Changed pages become patches when they pass their memory budget
/// ([`PagedMap::spill`]), so scattered small writes can change many more
/// pages between checkpoints, and each page written back by a checkpoint
/// carries more of them.
///
/// `base` is a retired slot: no checkpoint can free it before writing the
/// page it bases (every checkpoint writes every changed page, patched or
/// not, before its root makes the slot free), so it reads back intact.
/// The patched page itself is cached under `id`, a fresh page id.
#[derive(Debug, Clone)]
pub(crate) struct Patch {
    id: u64,
    base: PageRef,
    ops: Vec<(Key, Option<Loc>)>,
}

impl Patch {
    /// Applies the patch's changes to `page` (its base).
    fn apply(&self, page: &mut Page) {
        for &(k, l) in &self.ops {
            let i = page.find(k);
            match (i, l) {
                (Ok(i), Some(l)) => page.entries[i].2 = l,
                (Err(i), Some(l)) => page.entries.insert(i, (k.0, k.1, l)),
                (Ok(i), None) => {
                    page.entries.remove(i);
                }
                (Err(_), None) => {}
            }
            page.fix_span();
        }
    }
}

/// Memory a patch takes, for the budget.
fn patch_mem(ops: usize) -> usize {
    PAGE_OVERHEAD + ops * std::mem::size_of::<(Key, Option<Loc>)>()
}

impl Page {
    fn new(entries: Vec<Entry>) -> Page {
        let mut p = Page {
            entries,
            span: (0, 0),
            hist: None,
        };
        p.fix_span();
        p
    }

    /// Remembers a change for patching, while changes are few.
    fn note(&mut self, k: Key, l: Option<Loc>, most: usize) {
        if let Some(h) = &mut self.hist {
            if h.ops.len() < most {
                h.ops.push((k, l));
            } else {
                self.hist = None;
            }
        }
    }

    fn fix_span(&mut self) {
        self.span = match (self.entries.first(), self.entries.last()) {
            (Some(a), Some(z)) => (a.0, z.0),
            _ => (0, 0),
        };
    }

    fn mem(&self) -> usize {
        PAGE_OVERHEAD + self.entries.capacity() * ENTRY_MEM
    }

    /// Like `binary_search`, but starts where the block number says the key
    /// should be and widens from there: pages usually hold evenly spread
    /// blocks (often a dense run), so this touches two or three cache lines
    /// where a plain binary search of a cold page misses on every step.
    fn find(&self, k: Key) -> std::result::Result<usize, usize> {
        let e = &self.entries;
        let n = e.len();
        let key = |i: usize| (e[i].0, e[i].1);
        if n < 16 {
            return e.binary_search_by(|x| (x.0, x.1).cmp(&k));
        }
        let (lo_b, hi_b) = self.span;
        if k.0 <= lo_b || k.0 >= hi_b {
            return e.binary_search_by(|x| (x.0, x.1).cmp(&k));
        }
        let guess = ((k.0 - lo_b) as u128 * (n - 1) as u128 / (hi_b - lo_b) as u128) as usize;
        // The guess's neighbours are read next (here, or by the caller's
        // scan): start loading their cache lines together with its own.
        prefetch(&e[guess.saturating_sub(1)]);
        prefetch(&e[(guess + 1).min(n - 1)]);
        let at = key(guess);
        if at == k {
            return Ok(guess);
        }
        // Gallop from the guess to bracket the key, then search inside.
        let (mut a, mut b);
        if at < k {
            let mut step = 1;
            a = guess;
            b = guess + 1;
            while b < n && key(b) < k {
                a = b;
                b = (b + step).min(n);
                step *= 2;
            }
            // key(a) < k <= key(b) (or b == n): the answer is in a+1..=b.
            a += 1;
            b = (b + 1).min(n);
        } else {
            let mut step = 1;
            b = guess;
            a = guess;
            while a > 0 && key(a - 1) >= k {
                b = a - 1;
                a = a.saturating_sub(step);
                step *= 2;
            }
            // key(a-1) < k <= key(b): the answer is in a..=b.
            b += 1;
        }
        match e[a..b].binary_search_by(|x| (x.0, x.1).cmp(&k)) {
            Ok(i) => Ok(a + i),
            Err(i) => Err(a + i),
        }
    }
}

/// Hints the CPU to start loading `x`'s cache line.
#[inline(always)]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; the address is a valid reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast::<i8>(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

enum Slot {
    Clean(PageRef),
    Dirty(Page),
    Patched(Patch),
}

/// Slot bookkeeping of the meta file.
#[derive(Default)]
struct Space {
    /// Slots past the last one ever used are free too.
    high: u64,
    free: BTreeSet<u64>,
    /// (generation, slot): retired slots still referenced by the durable
    /// root.
    retired: Vec<(u64, u64)>,
    /// Retired slots that stay retired whatever checkpoints complete: the
    /// bases of patches in a map taken out of its volume (a deleted
    /// volume's, read after the volume lock is gone), which no checkpoint
    /// writes back. See [`PagedMap::take`].
    held: HashSet<u64>,
    /// Incremented by every checkpoint when it captures the map.
    gen: u64,
}

/// The meta file, the page cache and the counters shared by every volume's
/// map.
pub(crate) struct PageStore {
    file: Arc<dyn MediumFile>,
    shards: Vec<Mutex<Shard>>,
    shard_cap: usize,
    next_id: AtomicU64,
    space: Mutex<Space>,
    /// Dirty pages of all volumes (they cannot be evicted).
    dirty_pages: AtomicUsize,
    page_max: usize,
    /// Dirty pages beyond this many are patched where they can be; twice
    /// as many call for a checkpoint.
    dirty_limit: usize,
    /// Memory of the patches of all volumes.
    patch_bytes: AtomicUsize,
    /// Dirty pages left after the last spill (they could not be patched):
    /// the next spill waits for more, so writes do not walk the directory
    /// again and again for nothing.
    spill_left: AtomicUsize,
    /// Off while the journal is replayed at open.
    spilling: std::sync::atomic::AtomicBool,
    /// Patches beyond this much memory call for a checkpoint.
    patch_limit: usize,
    /// Cache misses that read a page from the meta file.
    pub loads: AtomicU64,
}

struct Shard {
    lru: lru::LruCache<u64, Arc<Page>>,
    bytes: usize,
}

impl PageStore {
    /// A store on `file`; [`PageStore::init`] tells it what the root uses.
    pub fn new(file: Arc<dyn MediumFile>, cache_bytes: usize, page_max: usize) -> PageStore {
        PageStore {
            file,
            shards: (0..CACHE_SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: lru::LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            // Half the memory for clean pages (patched ones included), a
            // quarter for dirty ones (half as many again while they cannot
            // be patched), an eighth for patches.
            shard_cap: cache_bytes / 2 / CACHE_SHARDS,
            dirty_limit: (cache_bytes / 4 / dirty_page_mem(page_max.clamp(4, PAGE_MAX))).max(8),
            patch_bytes: AtomicUsize::new(0),
            spill_left: AtomicUsize::new(0),
            spilling: std::sync::atomic::AtomicBool::new(true),
            patch_limit: cache_bytes / 8,
            next_id: AtomicU64::new(1),
            space: Mutex::new(Space::default()),
            dirty_pages: AtomicUsize::new(0),
            page_max: page_max.clamp(4, PAGE_MAX),
            loads: AtomicU64::new(0),
        }
    }

    /// The durable root references `used` slots and gives the next page id.
    pub fn init(&self, used: &[u64], next_id: u64) {
        let high = used.iter().map(|s| s + 1).max().unwrap_or(0);
        let used: BTreeSet<u64> = used.iter().copied().collect();
        let free: Vec<u64> = (0..high).filter(|s| !used.contains(s)).collect();
        // Slots left free, or written past the root's last one, by a
        // process that stopped before it released them: nothing references
        // them (the open synced the directory, so no other root can become
        // the durable one), so their space goes back.
        self.punch_slots(&free);
        if self.file.len().is_ok_and(|l| l > high * PAGE_BYTES) {
            if let Err(e) = self.file.set_len(high * PAGE_BYTES) {
                tracing::warn!(error = %e, "cannot shorten the metadata page file");
            }
        }
        let mut s = self.space.lock();
        s.high = high;
        s.free = free.into_iter().collect();
        self.next_id.store(next_id.max(1), Ordering::Release);
    }

    /// The id the next written page gets (kept in the root).
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Acquire)
    }

    pub fn patch_bytes(&self) -> usize {
        self.patch_bytes.load(Ordering::Acquire)
    }

    pub fn dirty_pages(&self) -> usize {
        self.dirty_pages.load(Ordering::Acquire)
    }

    /// Whether changed pages take more than their memory: dirty pages
    /// half again their quarter of the cache (they could not all be
    /// patched), or patches their eighth. Time for a checkpoint.
    pub fn dirty_over(&self) -> bool {
        self.dirty_pages() > self.dirty_limit * 3 / 2
            || self.patch_bytes.load(Ordering::Acquire) > self.patch_limit
    }

    /// Whether dirty pages take more than their quarter of the cache:
    /// time to patch them ([`PagedMap::spill`]).
    pub fn spill_due(&self) -> bool {
        let dirty = self.dirty_pages();
        self.spilling.load(Ordering::Acquire)
            && dirty > self.dirty_limit
            && dirty > self.spill_left.load(Ordering::Acquire) + self.dirty_limit / 8
    }

    /// Turns patching on or off (off while the journal is replayed).
    pub fn set_spilling(&self, on: bool) {
        self.spilling.store(on, Ordering::Release);
    }

    /// Changes a dirty page may carry and still be patched.
    fn patch_ops(&self) -> usize {
        (self.page_max / 8).max(2)
    }

    /// Gives the space of page slots nothing references back to the
    /// filesystem.
    fn punch_slots(&self, slots: &[u64]) {
        for (start, n) in crate::alloc::merge(slots.to_vec()) {
            if let Err(e) = self.file.punch_hole(start * PAGE_BYTES, n * PAGE_BYTES) {
                tracing::warn!(error = %e, "cannot punch free metadata page slots");
            }
        }
    }

    /// Slots that only the durable root still references: freed by the
    /// next checkpoint.
    pub fn retired_slots(&self) -> usize {
        self.space.lock().retired.len()
    }

    /// Slots in use or retired, and the meta file's extent in slots.
    pub fn slots(&self) -> (u64, u64) {
        let s = self.space.lock();
        (s.high - s.free.len() as u64, s.high)
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        &self.shards[(id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % CACHE_SHARDS]
    }

    fn cached(&self, id: u64) -> Option<Arc<Page>> {
        self.shard(id).lock().lru.get(&id).cloned()
    }

    fn cache_put(&self, id: u64, page: Arc<Page>) {
        let mut sh = self.shard(id).lock();
        sh.bytes += page.mem();
        if let Some(old) = sh.lru.put(id, page) {
            sh.bytes -= old.mem();
        }
        while sh.bytes > self.shard_cap && sh.lru.len() > 1 {
            match sh.lru.pop_lru() {
                Some((_, p)) => sh.bytes -= p.mem(),
                None => break,
            }
        }
    }

    fn cache_drop(&self, id: u64) -> Option<Arc<Page>> {
        let mut sh = self.shard(id).lock();
        let p = sh.lru.pop(&id)?;
        sh.bytes -= p.mem();
        Some(p)
    }

    /// Bytes of pages in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// Reads a page: from the cache, else from its slot (checked).
    fn load(&self, vol: u32, r: &PageRef) -> Result<Arc<Page>> {
        if let Some(p) = self.cached(r.id) {
            return Ok(p);
        }
        let page = Arc::new(self.read_page(vol, r)?);
        self.cache_put(r.id, page.clone());
        Ok(page)
    }

    /// Reads a page from its slot (checked), bypassing the cache.
    fn read_page(&self, vol: u32, r: &PageRef) -> Result<Page> {
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        self.file
            .read_at(&mut buf, r.slot * PAGE_BYTES)
            .map_err(|e| Error::io("cannot read a metadata page", e))?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        let page = match decode_frame(&buf) {
            Decoded::Frame {
                seq,
                record: Record::CheckpointEntries { vol: v, entries },
                ..
            } if seq == r.id && v == vol => Page::new(entries),
            _ => {
                return Err(Error::corrupt(format!(
                    "metadata page {} (slot {}) of volume id {vol} is damaged: the map of blocks {}..={} is lost",
                    r.id, r.slot, r.first, r.last
                )))
            }
        };
        Ok(page)
    }

    /// The page a patch stands for: from the cache, else its base with its
    /// changes applied.
    fn patched(&self, vol: u32, p: &Patch) -> Result<Arc<Page>> {
        if let Some(pg) = self.cached(p.id) {
            return Ok(pg);
        }
        let mut page = self.read_page(vol, &p.base)?;
        p.apply(&mut page);
        let page = Arc::new(page);
        self.cache_put(p.id, page.clone());
        Ok(page)
    }

    /// A slot stops being referenced by the map; it is freed once a
    /// checkpoint that began after now has made a root without it durable.
    fn retire(&self, r: &PageRef) {
        self.cache_drop(r.id);
        let mut s = self.space.lock();
        let g = s.gen;
        s.retired.push((g, r.slot));
    }

    fn alloc_slot(&self) -> u64 {
        let mut s = self.space.lock();
        if let Some(slot) = s.free.pop_first() {
            return slot;
        }
        s.high += 1;
        s.high - 1
    }

    /// Called by a checkpoint, under every volume lock, before it writes
    /// pages: slots retired from now on stay referenced by the root it is
    /// making durable. Returns the generation to pass to
    /// [`PageStore::release`] once that root is durable.
    pub fn begin_checkpoint(&self) -> u64 {
        let mut s = self.space.lock();
        s.gen += 1;
        s.gen - 1
    }

    /// The root of checkpoint `gen` is durable: slots retired before it
    /// began are free, and their space goes back to the filesystem (the
    /// next checkpoint writes where it needs); free slots at the end of the
    /// file are cut off.
    pub fn release(&self, gen: u64) {
        let mut freed = Vec::new();
        {
            let mut s = self.space.lock();
            let Space { retired, held, .. } = &mut *s;
            retired.retain(|&(g, slot)| {
                let free = g <= gen && !held.contains(&slot);
                if free {
                    freed.push(slot);
                }
                !free
            });
        }
        // Nothing references these slots and nothing can take them before
        // they join `free` below: punch them without holding the lock.
        self.punch_slots(&freed);
        let mut s = self.space.lock();
        s.free.extend(freed);
        let old_high = s.high;
        while s.high > 0 && s.free.contains(&(s.high - 1)) {
            let h = s.high - 1;
            s.free.remove(&h);
            s.high = h;
        }
        if s.high < old_high {
            if let Err(e) = self.file.set_len(s.high * PAGE_BYTES) {
                tracing::warn!(error = %e, "cannot shorten the metadata page file");
            }
        }
    }

    /// Makes written pages durable (before a root points at them).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("cannot sync the metadata page file", e))
    }
}

/// One volume's map: the directory of its pages.
pub(crate) struct PagedMap {
    store: Arc<PageStore>,
    vol: u32,
    dir: BTreeMap<Key, Slot>,
    /// Patch bases this map holds retired (see [`PagedMap::take`]).
    held: Vec<u64>,
}

/// A page borrowed from the directory or shared with the cache.
enum PageView<'a> {
    Mem(&'a Page),
    Shared(Arc<Page>),
}

impl std::ops::Deref for PageView<'_> {
    type Target = Page;
    fn deref(&self) -> &Page {
        match self {
            PageView::Mem(p) => p,
            PageView::Shared(p) => p,
        }
    }
}

impl Drop for PagedMap {
    fn drop(&mut self) {
        for s in self.dir.values() {
            self.store.forget(s);
        }
        if !self.held.is_empty() {
            let mut s = self.store.space.lock();
            for slot in &self.held {
                s.held.remove(slot);
            }
        }
    }
}

impl PageStore {
    /// Takes a dirty or patched page leaving the directory off the memory
    /// counts (its slot, if any, is the caller's business).
    fn forget(&self, s: &Slot) {
        match s {
            Slot::Clean(_) => {}
            Slot::Dirty(_) => {
                self.dirty_pages.fetch_sub(1, Ordering::AcqRel);
            }
            Slot::Patched(p) => {
                self.patch_bytes
                    .fetch_sub(patch_mem(p.ops.len()), Ordering::AcqRel);
                self.cache_drop(p.id);
            }
        }
    }
}

impl PagedMap {
    pub fn new(store: Arc<PageStore>, vol: u32) -> PagedMap {
        PagedMap {
            store,
            vol,
            dir: BTreeMap::new(),
            held: Vec::new(),
        }
    }

    /// Takes the whole map out, leaving an empty one, to be read after the
    /// volume lock is released (a deleted volume's map, cleared once its
    /// deletion is durable). Checkpoints write back only the maps of their
    /// volumes, so the bases of the taken map's patches are held retired
    /// until it is dropped: a checkpoint meanwhile must not free (punch,
    /// reuse) what the patches are put together from.
    pub fn take(&mut self) -> PagedMap {
        let mut map = std::mem::replace(self, PagedMap::new(self.store.clone(), self.vol));
        map.held = map
            .dir
            .values()
            .filter_map(|s| match s {
                Slot::Patched(p) => Some(p.base.slot),
                _ => None,
            })
            .collect();
        if !map.held.is_empty() {
            let mut s = self.store.space.lock();
            s.held.extend(map.held.iter().copied());
        }
        map
    }

    /// Adds a written page from the root.
    pub fn add_ref(&mut self, lo: Key, r: PageRef) {
        if let Some(old) = self.dir.insert(lo, Slot::Clean(r)) {
            self.store.forget(&old);
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.dir.len()
    }

    fn view<'a>(&self, s: &'a Slot) -> Result<PageView<'a>> {
        match s {
            Slot::Dirty(p) => Ok(PageView::Mem(p)),
            Slot::Clean(r) => Ok(PageView::Shared(self.store.load(self.vol, r)?)),
            Slot::Patched(p) => Ok(PageView::Shared(self.store.patched(self.vol, p)?)),
        }
    }

    /// `view`, but only from memory: `None` when the page would have to be
    /// read from the meta file.
    fn view_cached<'a>(&self, s: &'a Slot) -> Option<PageView<'a>> {
        match s {
            Slot::Dirty(p) => Some(PageView::Mem(p)),
            Slot::Clean(r) => self.store.cached(r.id).map(PageView::Shared),
            Slot::Patched(p) => self.store.cached(p.id).map(PageView::Shared),
        }
    }

    /// The lowest key of the page that holds `k` (the first page starts at
    /// the lowest key).
    fn page_of(&self, k: Key) -> Option<Key> {
        self.dir
            .range(..=k)
            .next_back()
            .or_else(|| self.dir.iter().next())
            .map(|(lo, _)| *lo)
    }

    /// Where a batch of blocks that starts at `block` ends: at the first
    /// block of the page after the one holding `(block, 0)` (at least
    /// `block + 1`); `None` when that is the last page.
    pub fn batch_end(&self, block: u64) -> Option<u64> {
        let lo = self.page_of((block, 0))?;
        let (&(b, _), _) = self.dir.range((Excluded(lo), Unbounded)).next()?;
        Some(b.max(block + 1))
    }

    /// Calls `f` on each entry with `from <= key < to`, in order, until it
    /// returns false.
    pub fn scan(&self, from: Key, to: Key, f: impl FnMut(Key, Loc) -> bool) -> Result<()> {
        self.scan_in(from, to, true, f).map(|_| ())
    }

    /// `scan`, but only while the pages it needs are in memory: false (after
    /// calling `f` on some entries, or none) when one would have to be read
    /// from the meta file.
    pub fn scan_cached(&self, from: Key, to: Key, f: impl FnMut(Key, Loc) -> bool) -> Result<bool> {
        self.scan_in(from, to, false, f)
    }

    fn scan_in(
        &self,
        from: Key,
        to: Key,
        load: bool,
        mut f: impl FnMut(Key, Loc) -> bool,
    ) -> Result<bool> {
        // The page that holds `from` (the first page starts at the lowest
        // key); most scans end inside it, so the directory is walked again
        // only when they run past its end.
        let Some((&start, slot)) = self
            .dir
            .range(..=from)
            .next_back()
            .or_else(|| self.dir.iter().next())
        else {
            return Ok(true);
        };
        // Ok(None): a page is not in memory (and `load` is false).
        let mut visit = |slot: &Slot| -> Result<Option<bool>> {
            let p = if load {
                self.view(slot)?
            } else {
                match self.view_cached(slot) {
                    Some(p) => p,
                    None => return Ok(None),
                }
            };
            let i = p.find(from).unwrap_or_else(|i| i);
            for &(b, t, l) in &p.entries[i..] {
                if (b, t) >= to || !f((b, t), l) {
                    return Ok(Some(false));
                }
            }
            Ok(Some(true))
        };
        match visit(slot)? {
            None => return Ok(false),
            Some(false) => return Ok(true),
            Some(true) => {}
        }
        for (lo, slot) in self.dir.range((Excluded(start), Unbounded)) {
            if *lo >= to {
                break;
            }
            match visit(slot)? {
                None => return Ok(false),
                Some(false) => break,
                Some(true) => {}
            }
        }
        Ok(true)
    }

    pub fn get(&self, k: Key) -> Result<Option<Loc>> {
        let mut out = None;
        self.scan(k, (k.0 + 1, 0), |kk, l| {
            if kk == k {
                out = Some(l);
            }
            false
        })?;
        Ok(out)
    }

    /// The newest entry of `block` born at or before `limit`.
    pub fn latest(&self, block: u64, limit: u32) -> Result<Option<(u32, Loc)>> {
        let mut out = None;
        self.scan((block, 0), (block + 1, 0), |(_, t), l| {
            if t <= limit {
                out = Some((t, l));
                true
            } else {
                false
            }
        })?;
        Ok(out)
    }

    /// The newest birth of `block` and how many entries it has, in one scan.
    pub fn births(&self, block: u64) -> Result<(Option<u32>, usize)> {
        let (mut newest, mut n) = (None, 0);
        self.scan((block, 0), (block + 1, 0), |(_, t), _| {
            newest = Some(t);
            n += 1;
            true
        })?;
        Ok((newest, n))
    }

    /// Entries with `from <= key < to`, collected.
    #[cfg(test)]
    pub fn range(&self, from: Key, to: Key) -> Result<Vec<Entry>> {
        let mut v = Vec::new();
        self.scan(from, to, |(b, t), l| {
            v.push((b, t, l));
            true
        })?;
        Ok(v)
    }

    /// Calls `f` on every page's entries, in key order. A page that cannot
    /// be read is skipped; the first such error is returned at the end.
    pub fn for_each_page(&self, mut f: impl FnMut(&[Entry])) -> Result<()> {
        let mut first_err = None;
        for slot in self.dir.values() {
            match self.view(slot) {
                Ok(p) => f(&p.entries),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Loads every written page; a page that fails its check is replaced by
    /// an empty dirty one and its block range returned. I/O errors are
    /// returned as errors.
    pub fn check_pages(&mut self) -> Result<Vec<(u64, u64)>> {
        let mut lost = Vec::new();
        let los: Vec<Key> = self.dir.keys().copied().collect();
        for lo in los {
            let Some(Slot::Clean(r)) = self.dir.get(&lo) else {
                continue;
            };
            let r = *r;
            match self.store.load(self.vol, &r) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Corruption => {
                    tracing::error!(error = %e, "metadata page damaged");
                    lost.push((r.first, r.last));
                    self.store.retire(&r);
                    self.dir.insert(lo, Slot::Dirty(Page::default()));
                    self.store.dirty_pages.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(lost)
    }

    /// Loads the pages that hold keys `from..=to` and makes them dirty, so
    /// that changes there cannot fail.
    pub fn prepare(&mut self, from: Key, to: Key) -> Result<()> {
        let Some(start) = self.page_of(from) else {
            return Ok(());
        };
        let los: Vec<Key> = self
            .dir
            .range(start..=to)
            .filter(|(_, s)| !matches!(s, Slot::Dirty(_)))
            .map(|(lo, _)| *lo)
            .collect();
        for lo in los {
            self.dirty(lo)?;
        }
        Ok(())
    }

    /// Makes the page at `lo` dirty if that needs no disk read; says
    /// whether it is dirty now.
    fn dirty_if_cached(&mut self, lo: Key) -> bool {
        match self.dir.get(&lo) {
            Some(Slot::Dirty(_)) => true,
            Some(Slot::Clean(r)) if self.store.cached(r.id).is_some() => self.dirty(lo).is_ok(),
            Some(Slot::Patched(p)) if self.store.cached(p.id).is_some() => self.dirty(lo).is_ok(),
            _ => false,
        }
    }

    /// The page at `lo`, made dirty.
    fn dirty(&mut self, lo: Key) -> Result<&mut Page> {
        let hist = match self.dir.get(&lo) {
            Some(Slot::Clean(r)) => {
                let r = *r;
                let page = self.store.load(self.vol, &r)?;
                self.store.retire(&r);
                Some((
                    page,
                    Patch {
                        id: 0,
                        base: r,
                        ops: Vec::new(),
                    },
                ))
            }
            Some(Slot::Patched(p)) => {
                let page = self.store.patched(self.vol, p)?;
                Some((page, p.clone()))
            }
            _ => None,
        };
        if let Some((page, hist)) = hist {
            let mut page = Arc::try_unwrap(page).unwrap_or_else(|p| (*p).clone());
            self.roomy(&mut page);
            page.hist = Some(Box::new(Patch { id: 0, ..hist }));
            if let Some(old) = self.dir.insert(lo, Slot::Dirty(page)) {
                self.store.forget(&old);
            }
            self.store.dirty_pages.fetch_add(1, Ordering::AcqRel);
        }
        match self.dir.get_mut(&lo) {
            Some(Slot::Dirty(p)) => Ok(p),
            _ => unreachable!("page {lo:?} is dirty"),
        }
    }

    fn roomy(&self, p: &mut Page) {
        let want = self.store.page_max + 1;
        p.entries
            .reserve_exact(want.saturating_sub(p.entries.len()));
    }

    /// Sets the entry `k`; returns the one it replaced.
    pub fn insert(&mut self, k: Key, l: Loc) -> Result<Option<Loc>> {
        let lo = match self.page_of(k) {
            Some(lo) => lo,
            None => {
                let mut p = Page::default();
                self.roomy(&mut p);
                self.dir.insert((0, 0), Slot::Dirty(p));
                self.store.dirty_pages.fetch_add(1, Ordering::AcqRel);
                (0, 0)
            }
        };
        let max = self.store.page_max;
        let most = self.store.patch_ops();
        let p = self.dirty(lo)?;
        p.note(k, Some(l), most);
        let old = match p.find(k) {
            Ok(i) => Some(std::mem::replace(&mut p.entries[i].2, l)),
            Err(i) => {
                p.entries.insert(i, (k.0, k.1, l));
                if i == 0 || i + 1 == p.entries.len() {
                    p.fix_span();
                }
                None
            }
        };
        if p.entries.len() > max {
            let upper = p.entries.split_off(p.entries.len() / 2);
            p.hist = None;
            p.fix_span();
            let split = (upper[0].0, upper[0].1);
            let mut up = Page::new(upper);
            self.roomy(&mut up);
            self.dir.insert(split, Slot::Dirty(up));
            self.store.dirty_pages.fetch_add(1, Ordering::AcqRel);
        }
        Ok(old)
    }

    /// Removes the entry `k`; returns it.
    pub fn remove(&mut self, k: Key) -> Result<Option<Loc>> {
        let Some(lo) = self.page_of(k) else {
            return Ok(None);
        };
        // Not there: leave the page clean.
        if self.get(k)?.is_none() {
            return Ok(None);
        }
        let most = self.store.patch_ops();
        let p = self.dirty(lo)?;
        let Ok(i) = p.find(k) else {
            return Ok(None);
        };
        let (_, _, old) = p.entries.remove(i);
        p.note(k, None, most);
        p.fix_span();
        // An emptied page stays (dirty) until the next checkpoint drops it:
        // taking it out now would hand its key range to a neighbour that
        // the caller may not have prepared.
        let left = p.entries.len();
        if left > 0 && left < self.store.page_max / 4 {
            self.merge_small(lo);
        }
        Ok(Some(old))
    }

    /// Merges the small dirty page at `lo` with a neighbour when both fit
    /// in three quarters of a page, so that dropping entries (snapshot
    /// deletion, trims) does not leave the meta file full of nearly empty
    /// pages. Only neighbours already in memory (dirty, or in the cache)
    /// are considered: changing the map never reads the disk.
    fn merge_small(&mut self, lo: Key) {
        use std::ops::Bound::{Excluded, Unbounded};
        let fits = |a: usize, b: usize| a + b <= self.store.page_max * 3 / 4;
        let len_at = |m: &Self, k: Key| match m.dir.get(&k) {
            Some(Slot::Dirty(p)) => Some(p.entries.len()),
            Some(Slot::Clean(r)) => m.store.cached(r.id).map(|p| p.entries.len()),
            Some(Slot::Patched(p)) => m.store.cached(p.id).map(|p| p.entries.len()),
            None => None,
        };
        let cur = match self.dir.get(&lo) {
            Some(Slot::Dirty(p)) => p.entries.len(),
            _ => return,
        };
        let next = self
            .dir
            .range((Excluded(lo), Unbounded))
            .next()
            .map(|(k, _)| *k);
        let prev = self.dir.range(..lo).next_back().map(|(k, _)| *k);
        // Fold `hi` (the later page) into `into`.
        let (into, hi) = match (next, prev) {
            (Some(n), _) if len_at(self, n).is_some_and(|l| fits(cur, l)) => (lo, n),
            (_, Some(p)) if len_at(self, p).is_some_and(|l| fits(cur, l)) => (p, lo),
            _ => return,
        };
        if !self.dirty_if_cached(into) || !self.dirty_if_cached(hi) {
            return;
        }
        let Some(Slot::Dirty(upper)) = self.dir.remove(&hi) else {
            unreachable!("made dirty above")
        };
        self.store.dirty_pages.fetch_sub(1, Ordering::AcqRel);
        if let Some(Slot::Dirty(p)) = self.dir.get_mut(&into) {
            p.entries.extend_from_slice(&upper.entries);
            p.hist = None;
            p.fix_span();
        }
    }

    /// Takes the empty pages out of the directory (each one's key range
    /// goes to the page before it; the first page always starts at the
    /// lowest key).
    fn drop_empty_pages(&mut self) {
        let empty = |s: &Slot| matches!(s, Slot::Dirty(p) if p.entries.is_empty());
        if !self.dir.values().any(empty) {
            return;
        }
        for (lo, slot) in std::mem::take(&mut self.dir) {
            if empty(&slot) {
                self.store.dirty_pages.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let lo = if self.dir.is_empty() { (0, 0) } else { lo };
            self.dir.insert(lo, slot);
        }
    }

    /// Forgets every page without reading them (a volume deleted during
    /// replay): their slots are retired.
    pub fn retire_all(&mut self) {
        for (_, s) in std::mem::take(&mut self.dir) {
            match s {
                Slot::Clean(r) => self.store.retire(&r),
                s => self.store.forget(&s),
            }
        }
    }

    /// Empties the map (the volume is deleted): every page is retired.
    /// Calls `f` on every entry first.
    pub fn clear(&mut self, mut f: impl FnMut(Loc)) -> Result<()> {
        let scanned = self.for_each_page(|es| es.iter().for_each(|e| f(e.2)));
        self.retire_all();
        scanned
    }

    /// Writes every dirty page to a free slot, under the volume lock; they
    /// become clean and cached. Returns the directory as the root records
    /// it. A checkpoint calls it after [`PageStore::begin_checkpoint`];
    /// replay calls it to stay within the memory budget (the slots are free
    /// as far as the durable root goes, and the open's checkpoint syncs them
    /// before its root points at them).
    pub fn write_dirty(&mut self, buf: &mut Vec<u8>) -> Result<Vec<(Key, PageRef)>> {
        self.drop_empty_pages();
        let mut out = Vec::with_capacity(self.dir.len());
        for (lo, slot) in self.dir.iter_mut() {
            // A patch is put together (one at a time, so memory stays
            // bounded) and written like a dirty page.
            let patched = match slot {
                Slot::Clean(r) => {
                    out.push((*lo, *r));
                    continue;
                }
                Slot::Dirty(_) => None,
                // A base found damaged fails the checkpoint, and so the
                // flushes that need one, until the pool is reopened: if the
                // durable root points at it, opening finds the damage and
                // loses only its blocks; if not (a checkpoint that wrote it
                // failed to write its root), opening recovers the page from
                // the root's and the journal. Losing it here would lose the
                // latter for good, and could not tell the page's changes
                // since from what was lost.
                Slot::Patched(p) => Some(self.store.patched(self.vol, p)?),
            };
            let entries = match (&*slot, &patched) {
                (_, Some(pg)) => &pg.entries,
                (Slot::Dirty(p), None) => &p.entries,
                _ => unreachable!("a dirty page or a patch"),
            };
            let id = self.store.next_id.fetch_add(1, Ordering::AcqRel);
            let s = self.store.alloc_slot();
            buf.clear();
            format::encode_entries_frame(self.vol, entries, id, buf);
            debug_assert!(buf.len() as u64 <= PAGE_BYTES);
            buf.resize(PAGE_BYTES as usize, 0);
            if let Err(e) = self.store.file.write_at(buf, s * PAGE_BYTES) {
                // Not referenced by anything: free again at once.
                self.store.space.lock().free.insert(s);
                return Err(Error::io("cannot write a metadata page", e));
            }
            let mut page = match (slot as &mut Slot, patched) {
                (Slot::Dirty(p), _) => std::mem::take(p),
                (_, Some(pg)) => Arc::try_unwrap(pg).unwrap_or_else(|p| (*p).clone()),
                _ => unreachable!("a dirty page or a patch"),
            };
            page.hist = None;
            page.entries.shrink_to_fit();
            let r = PageRef {
                slot: s,
                id,
                first: page.entries.first().map(|e| e.0).unwrap_or(0),
                last: page.entries.last().map(|e| e.0).unwrap_or(0),
            };
            let old = std::mem::replace(slot, Slot::Clean(r));
            self.store.forget(&old);
            self.store.cache_put(id, Arc::new(page));
            out.push((*lo, r));
        }
        self.store.spill_left.store(0, Ordering::Release);
        Ok(out)
    }

    /// [`PagedMap::spill`] when dirty pages pass their memory (called
    /// once a change is applied: never between `prepare` and the change).
    pub fn spill_if_due(&mut self) {
        if self.store.spill_due() {
            self.spill();
        }
    }

    /// Turns the dirty pages that can be patched into patches (see
    /// [`Patch`]): their entries leave the changed-page memory; the page
    /// itself stays in the clean cache while it fits there. Returns how
    /// many pages it patched.
    pub fn spill(&mut self) -> usize {
        let mut n = 0;
        for slot in self.dir.values_mut() {
            let Slot::Dirty(p) = slot else {
                continue;
            };
            // (An emptied page leaves the directory at the next checkpoint.)
            if p.entries.is_empty() {
                continue;
            }
            let Some(mut h) = p.hist.take() else {
                continue;
            };
            h.id = self.store.next_id.fetch_add(1, Ordering::AcqRel);
            let mut page = std::mem::take(p);
            page.entries.shrink_to_fit();
            self.store.cache_put(h.id, Arc::new(page));
            self.store
                .patch_bytes
                .fetch_add(patch_mem(h.ops.len()), Ordering::AcqRel);
            self.store.dirty_pages.fetch_sub(1, Ordering::AcqRel);
            *slot = Slot::Patched(*h);
            n += 1;
        }
        self.store
            .spill_left
            .store(self.store.dirty_pages(), Ordering::Release);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::medium::{Medium, MemMedium};
    use proptest::prelude::*;

    fn store(cache: usize, max: usize) -> Arc<PageStore> {
        let m = MemMedium::new();
        let f = m.open("meta", true).unwrap();
        Arc::new(PageStore::new(f, cache, max))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32, u64),
        Remove(u64, u32),
        Checkpoint,
        Spill,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..300, 0u32..4, 0u64..1000).prop_map(|(b, t, s)| Op::Insert(b, t, s)),
            3 => (0u64..300, 0u32..4).prop_map(|(b, t)| Op::Remove(b, t)),
            1 => Just(Op::Checkpoint),
            1 => Just(Op::Spill),
        ]
    }

    proptest! {
        /// Small pages and a tiny cache: splits, empty pages, patches,
        /// evictions and write-backs, against a BTreeMap.
        #[test]
        fn paged_map_matches_a_btreemap(
            ops in proptest::collection::vec(op(), 1..400),
            max in prop_oneof![Just(4usize), Just(16)],
        ) {
            let st = store(PAGE_BYTES as usize * 2, max);
            let mut m = PagedMap::new(st.clone(), 1);
            let mut model: BTreeMap<Key, Loc> = BTreeMap::new();
            let mut buf = Vec::new();
            for o in ops {
                match o {
                    Op::Insert(b, t, s) => {
                        let l = Loc::Data { slot: s, crc: s as u32 };
                        prop_assert_eq!(m.insert((b, t), l).unwrap(), model.insert((b, t), l));
                    }
                    Op::Remove(b, t) => {
                        prop_assert_eq!(m.remove((b, t)).unwrap(), model.remove(&(b, t)));
                    }
                    Op::Checkpoint => {
                        let g = st.begin_checkpoint();
                        m.write_dirty(&mut buf).unwrap();
                        st.release(g);
                        prop_assert_eq!(st.dirty_pages(), 0);
                        prop_assert_eq!(st.patch_bytes.load(Ordering::Acquire), 0);
                    }
                    Op::Spill => {
                        m.spill();
                    }
                }
                let all = m.range((0, 0), KEY_MAX).unwrap();
                let want: Vec<Entry> = model.iter().map(|(k, l)| (k.0, k.1, *l)).collect();
                prop_assert_eq!(all, want);
            }
            for b in 0..300u64 {
                let want = model.range((b, 0)..=(b, 2)).next_back().map(|(k, l)| (k.1, *l));
                prop_assert_eq!(m.latest(b, 2).unwrap(), want);
            }
        }
    }

    proptest! {
        /// The interpolating search agrees with a binary search, on dense,
        /// sparse and clustered pages, for present and absent keys.
        #[test]
        fn find_matches_binary_search(
            blocks in proptest::collection::btree_set(
                prop_oneof![0u64..700, 0u64..1_000_000, 500_000u64..500_050], 1..640),
            births in 1u32..4,
            probes in proptest::collection::vec((0u64..1_000_100, 0u32..5), 50),
        ) {
            let mut entries = Vec::new();
            for &b in &blocks {
                for t in 0..births {
                    entries.push((b, t * 2, Loc::Zero));
                }
            }
            let p = Page::new(entries);
            let mut keys: Vec<Key> = probes;
            keys.extend(p.entries.iter().map(|e| (e.0, e.1)).step_by(7));
            for k in keys {
                prop_assert_eq!(
                    p.find(k),
                    p.entries.binary_search_by(|x| (x.0, x.1).cmp(&k)),
                    "{:?}", k
                );
            }
        }
    }

    #[test]
    fn nearly_empty_pages_are_merged() {
        let st = store(1 << 20, 16);
        let mut m = PagedMap::new(st.clone(), 1);
        for b in 0..160u64 {
            m.insert((b, 0), Loc::Zero).unwrap();
        }
        let mut buf = Vec::new();
        m.write_dirty(&mut buf).unwrap();
        let before = m.pages();
        assert!(before >= 10, "{before}");
        // Keep one entry in ten, as a snapshot deletion might.
        for b in (0..160u64).filter(|b| b % 10 != 0) {
            m.remove((b, 0)).unwrap();
        }
        m.write_dirty(&mut buf).unwrap();
        assert!(m.pages() * 3 <= before, "{} pages of {before}", m.pages());
        let left: Vec<u64> = m
            .range((0, 0), KEY_MAX)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(left, (0..160).step_by(10).collect::<Vec<u64>>());
    }

    /// A head write of a block that is alone in its page (set the new
    /// entry, drop the old one) needs no page but the ones `prepare` made
    /// dirty, whether the page is the first one or not: an emptied page
    /// stays until the next checkpoint.
    #[test]
    fn a_lone_entry_is_rewritten_within_prepared_pages() {
        for layout in [
            &[(0u64, 0..15u64), (90, 100..101), (200, 200..215)][..],
            &[(0, 5..6), (100, 100..115)],
        ] {
            let st = store(1 << 20, 16);
            let mut m = PagedMap::new(st.clone(), 1);
            for (lo, blocks) in layout {
                let p = Page::new(blocks.clone().map(|b| (b, 0u32, Loc::Zero)).collect());
                m.dir.insert((*lo, 0), Slot::Dirty(p));
                st.dirty_pages.fetch_add(1, Ordering::AcqRel);
            }
            let lone = layout
                .iter()
                .find(|(_, r)| r.end - r.start == 1)
                .unwrap()
                .1
                .start;
            let mut buf = Vec::new();
            let g = st.begin_checkpoint();
            m.write_dirty(&mut buf).unwrap();
            st.release(g);
            m.prepare((lone, 0), (lone, u32::MAX)).unwrap();
            for sh in &st.shards {
                let mut s = sh.lock();
                s.lru.clear();
                s.bytes = 0;
            }
            let loads = st.loads.load(Ordering::Relaxed);
            m.insert((lone, 1), Loc::Zero).unwrap();
            m.remove((lone, 0)).unwrap();
            assert_eq!(st.loads.load(Ordering::Relaxed), loads, "{layout:?}");
            let all = m.range((0, 0), KEY_MAX).unwrap();
            assert!(
                all.contains(&(lone, 1, Loc::Zero)) && !all.iter().any(|e| e.0 == lone && e.1 == 0)
            );
            // The emptied page goes at the next checkpoint.
            let before = m.pages();
            m.write_dirty(&mut buf).unwrap();
            assert!(m.pages() <= before);
            assert_eq!(m.range((0, 0), KEY_MAX).unwrap(), all);
        }
    }

    #[test]
    fn a_full_page_fits_its_slot() {
        assert!(format::entries_frame_len(PAGE_MAX) as u64 <= PAGE_BYTES);
    }

    #[test]
    fn a_damaged_page_is_reported_and_replaced() {
        let m = MemMedium::new();
        let f = m.open("meta", true).unwrap();
        let st = Arc::new(PageStore::new(f, 1 << 20, 4));
        let mut map = PagedMap::new(st.clone(), 7);
        for b in 0..20u64 {
            map.insert((b, 0), Loc::Zero).unwrap();
        }
        let mut buf = Vec::new();
        let refs = map.write_dirty(&mut buf).unwrap();
        assert!(refs.len() >= 4);
        drop(map);
        m.corrupt("meta", refs[1].1.slot * PAGE_BYTES + 40);
        // A fresh store: nothing cached.
        let st2 = Arc::new(PageStore::new(m.open("meta", false).unwrap(), 1 << 20, 4));
        st2.init(
            &refs.iter().map(|r| r.1.slot).collect::<Vec<_>>(),
            st.next_id(),
        );
        let mut map = PagedMap::new(st2, 7);
        for (lo, r) in &refs {
            map.add_ref(*lo, *r);
        }
        let e = map.range((0, 0), KEY_MAX).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption);
        let lost = map.check_pages().unwrap();
        assert_eq!(lost, vec![(refs[1].1.first, refs[1].1.last)]);
        let left = map.range((0, 0), KEY_MAX).unwrap();
        assert_eq!(
            left.len(),
            20 - (refs[1].1.last - refs[1].1.first + 1) as usize
        );
    }
}
