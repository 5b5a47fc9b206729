//! # snapgate store: thin volumes with redirect-on-write snapshots
//!
//! A pool is one directory holding every volume of a gateway. Volume data
//! lives in 4 KiB *slots* of one data file; which slot holds which block of
//! which volume state is the *map*. The map is paged: sorted pages of up to
//! 640 entries live in 16 KiB slots of a `meta` file and are read through a
//! bounded LRU cache; only a small directory of pages stays in memory (see
//! `pages.rs`). Every change goes to an append-only *journal* first; a
//! *checkpoint* now and then writes the changed pages and a new *root* (the
//! `checkpoint` file) pointing at them, and starts a new journal.
//!
//! ## Data flow
//! ```text
//!  write(vol, off, data)                       read(view, off, len)
//!    │ split into whole blocks                   │ map lookup under the volume's read lock
//!    │ (partial blocks: read-modify-write        │ → per block Hole / Zero / Data{slot, crc}
//!    │  under a stripe lock)                     │ take `reuse` shared, drop the volume lock
//!    ▼                                           ▼
//!  allocate slots (alloc lock) ──► pwrite data   pread runs of slots straight into the
//!    │ (no lock held)                           caller's buffer, check every block's CRC
//!    ▼
//!  volume write lock: plan the map change, append one Update record to the
//!  journal (journal lock), apply it to the map; old slots nobody sees any
//!  more wait in `pending` until the record is durable
//! ```
//!
//! ## Redirect-on-write map and snapshots
//! Each volume has an *epoch* counter. A map entry is keyed `(block, birth)`:
//! the block's content as written in epoch `birth`. The head sees, per block,
//! the entry with the largest birth; a snapshot taken at epoch `e` sees the
//! entry with the largest birth ≤ `e`. Taking a snapshot records the current
//! epoch under the snapshot's name and starts the next epoch: O(1), nothing
//! is copied, whatever the size of the volume or the data written.
//!
//! A head write of a block whose newest entry was born in the current epoch,
//! or is seen by no live snapshot, replaces that entry (its slot is freed);
//! otherwise it adds an entry and the old one stays for the snapshots.
//! Data that a flush has made durable, or that a snapshot sees, is never
//! overwritten in place, so no durable block is ever torn. The one exception
//! is safe by construction: a block rewritten again before any flush
//! captured its previous write reuses that write's slot (see "Durability"). Deleting a
//! snapshot journals its removal, then drops exactly the entries no
//! remaining view can see (an entry superseded by a newer one of the same
//! block with no live snapshot taken between the two births) — first,
//! middle or last snapshot alike. The drops go in batches of one map page's
//! blocks, each under the volume lock for that page only and journaled as
//! its own `Drops` record, with a checkpoint whenever changed pages pass
//! their memory budget; so the volume keeps serving I/O meanwhile, and
//! neither memory nor a journal frame grows with the volume. The deletion
//! runs the batches itself for up to `PoolOptions::gc_foreground` (5 s),
//! then leaves the rest to a background thread; the volume's `gc_from`
//! cursor says where collection stands, so the two share the work and a
//! second deletion restarts it from block 0. A crash between batches
//! leaves entries nothing sees: opening notices them while it reads every
//! page anyway, and collects them the same way.
//! Trim and write-zeroes are map-only: `Hole` (deallocated) and `Zero`
//! (allocated zeros, for NO_HOLE, which provisions never-written blocks too) entries take no data space; all-zero block
//! writes are stored as `Zero` too. Slots freed by trims and deletions are
//! punched out of the data file (`fallocate(PUNCH_HOLE)`) at once; slots
//! freed by overwrites stay allocated as a reuse reserve (24 MiB plus 4% of
//! the data stored, `PoolOptions::reuse_reserve_*`) for small writes, and
//! its excess is punched largest range first; so disk usage follows the live
//! data. Opening a pool does the same with every free slot (a stopped
//! process may have left freed slots unpunched): the reserve stays, the
//! excess is punched, so a restart does not split the page-cache folios
//! around each reserve slot. Writes of 16 blocks or more get one contiguous run (a punched range
//! that fits, or the end of the file), small ones the scattered slots.
//!
//! Once deleted snapshots are collected and writes pause for a few seconds
//! (or [`Pool::reclaim_space`] returns), what the pool holds beyond the data
//! its volumes and snapshots reference stays within 64 MiB + 10% of that
//! data: the reuse reserve (≤ 24 MiB + 4%); the map pages (a 16 KiB slot per
//! page of 320–640 entries: 0.6–1.25% of the range they map, up to 2.5% once
//! pages shrink below half full; emptied pages and the slots of replaced
//! ones leave at the next checkpoint, and slots no durable root uses are
//! punched); the journal (about `journal_limit`, 24 MiB, plus up to 4 MiB
//! of preallocated zeros; two journals exist during a checkpoint). A *fold*
//! (`Fold::Space`) checkpoints when the journal or the stale page slots
//! hold more than 1 MiB + 0.1% of the data: after a snapshot deletion's
//! collection, a volume deletion, and once writes have paused for 5 s. Not
//! covered by the bound: entries without data (NO_HOLE zeros, and trims
//! that hid data a snapshot kept) cost map pages at the same rate per
//! entry, and every volume with any entry takes at least one 16 KiB page.
//! Nor is the space reserve (`PoolOptions::space_reserve_bytes`, 16 MiB):
//! room held for an open on a full disk, which gives it back when its
//! checkpoint and new journal find no space and opens again (under the same
//! pool lock), and which is taken again once the filesystem has twice as
//! much free. Until then, writes that need new space on the filesystem
//! fail with `NoSpace` once it would leave less than the reserve's size
//! free (overwrites that reuse slots of the data file go on), so a second
//! crash still leaves the next open its room. The second open reads what the first left as any open reads
//! what a crash left: before its root is renamed into place, an open writes
//! only page slots the durable root does not use, a torn journal tail it
//! cut, a new journal (perhaps without its header yet) and
//! `checkpoint.tmp`.
//!
//! ## On-disk format (all integers little-endian)
//! | file | content |
//! |---|---|
//! | `pool.lock` | empty; `flock(LOCK_EX)` keeps a second process out |
//! | `data` | slot `n` at byte `n × 4096`; holes where slots are free |
//! | `journal.<id>` | frames, the first a `JournalHeader{id}` |
//! | `meta` | map page `n` at byte `n × 16384`: one `CheckpointEntries{vol, entries}` frame whose sequence number is the page's unique id, zero padded |
//! | `reserve` | the space reserve: incompressible filler, written whole as `reserve.tmp`, synced, then renamed |
//! | `checkpoint` (the root) | frames: `CheckpointBegin{journal id, next volume id, seq, next page id}`, per volume `CheckpointVolume` + `SnapshotCreate`… + `CheckpointDamage`… + `CheckpointPages{vol, [(lowest key, slot, id, first block, last block)]}`… (4096 pages a frame), `CheckpointEnd{journal id, frame count}` |
//!
//! A frame:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | payload length `n` (1 ..= 64 MiB) |
//! | 4..8 | CRC-32 of bytes 8..16+n |
//! | 8..16 | sequence number (increases across journals) |
//! | 16..16+n | payload: type byte, then the fields of [`format::Record`] |
//!
//! A map entry in a page is `block u64 | birth u32 | location` (25 bytes).
//! A location is `kind u8 (0 hole, 1 zero, 2 data) | slot u64 | crc32 u32`;
//! an update item is `block u64 | flags u8 (1 set, 2 drop) | location | drop
//! birth u32` (26 bytes, so a 4 KiB write costs about 55 bytes of journal).
//! Every data block's CRC-32 lives in its map entry and is checked on every
//! read and by [`Pool::verify`]; every metadata frame carries its own CRC.
//! A map page that fails its check (every page is read once at open) costs
//! only the blocks the root says it described: they read as errors (and
//! show as data in block status, so copy tools do not skip them) until
//! rewritten, and `verify` lists them; the volume's epoch is bumped so later
//! writes are known good. Damage in the root, or in a journal frame that a
//! completed flush covered, stops the pool from opening with an error naming
//! the file.
//!
//! ## Durability and recovery
//! * A completed write has its data `pwrite`n and its journal record
//!   appended: both are in the page cache, so a killed process loses nothing.
//! * `flush` notes the last sequence number `s`, `fdatasync`s the data file,
//!   appends `Sync{upto: s}` and `fdatasync`s the journal. Every record ≤ `s`
//!   had its data written before it was appended, hence before the data sync:
//!   record and data are durable together. FUA is a flush up to the write's
//!   own record; a FUA request with a part that changed nothing (a FUA
//!   trim of a block a plain trim emptied) flushes everything, as what it
//!   found may rest on records not yet flushed. Concurrent flushes share
//!   one sync (group commit).
//! * A freed slot is reused only once the record that freed it is durable
//!   (before that, a crash could bring the old reference back), and only after
//!   taking `reuse` exclusively, so no reader still holding the old location
//!   sees it rewritten.
//! * Opening reads the root, checks every page it points at, then replays
//!   (streaming, in two passes: first to find the newest `Sync`) the
//!   journals that follow it, up to the first torn frame. Pages changed by
//!   replay beyond the memory budget are written to free slots on the way
//!   (the open's checkpoint syncs them before its root points at them). Records after the newest `Sync` were never promised
//!   durable: an update among them is kept only if its data block is on the
//!   medium with the right CRC, so a power loss that kept a record but not its
//!   data loses that (unacknowledged) write instead of corrupting the block;
//!   and a garbage drop among them is applied only if the replayed map still
//!   makes that entry garbage, since it may rest on such a lost write.
//!   A torn tail is cut off the journal (and synced) before anything else:
//!   a journal followed by a later one with a header counts as synced whole
//!   (a checkpoint syncs it, then writes the next one's header and appends
//!   only there), so a tear there is damage, and this open is about to
//!   create the next journal.
//!   Then a new checkpoint is written and a fresh journal started.
//! * Overwrite in place: a whole-block head write whose blocks are all born in
//!   the current epoch and were written by records that no flush or
//!   checkpoint has captured yet reuses their slots. After a crash such a
//!   slot's records are all past the last `Sync`, so each is checked against
//!   the data: the one whose data is there wins, a torn slot fails them all,
//!   and the block falls back to its previous durable copy, which lived in
//!   another slot (still pending, not reusable before a flush). Flush and
//!   checkpoint capture their sequence number under `inplace` (exclusive),
//!   so no in-place write straddles a capture; taking a snapshot waits for
//!   in-place writes too, so no snapshot ever sees a slot change. A reader
//!   that meets a checksum mismatch reads again holding `inplace`
//!   exclusively (in-place writes meanwhile go elsewhere) before calling it
//!   damage (except the read of a partial-block write, whose stripe lock
//!   already keeps them off). An
//!   in-place write that fails part-way makes every later flush fail: its
//!   slot's unflushed record must never become durable. So it holds room
//!   for its record in the journal (allocated zeros, `Journal::reserve`)
//!   before it writes the data: a full disk fails it before anything
//!   changed, and other records appended meanwhile grow the journal past
//!   what is held. Without in-place
//!   overwrites, every overwrite between flushes would take a new slot.
//! * A background thread flushes every 5 s, and as soon as 128 MiB of freed
//!   slots wait for a flush, or the reuse reserve's fixed part (24 MiB) of
//!   slots freed by small overwrites (so they fit the reserve, see
//!   `Inner::piled_up`): a client that never flushes would otherwise grow
//!   the data file without bound.
//! * A checkpoint writes every changed page to a *free* page slot (never
//!   one the durable root points at), then the new root to
//!   `checkpoint.tmp`; it syncs the data and meta files and the root, renames
//!   it over `checkpoint`, and syncs the directory. The next journal is
//!   created and synced (with the directory) *before* the switch, and the
//!   old journal is synced at the switch. Until the rename, the old root
//!   (whose pages are untouched) plus both journals replay to the same
//!   state. A page slot the map stops using is reused only after a root
//!   that no longer points at it is durable.
//! * Opening syncs the directory before anything else: a root renamed into
//!   place by a process that died before its directory sync is made durable
//!   before the open writes pages into slots only the older root used.
//! * A failed sync is sticky: every later flush fails until the pool is
//!   reopened. A failed sync may have dropped written pages that the kernel
//!   will not report again, so a later "successful" sync proves nothing;
//!   the older root and the journals still hold everything. A failed write
//!   (a full disk) fails its flush or checkpoint only: until the new root's
//!   rename, the root in place and the journals from its own on hold
//!   everything, so the next flush, once there is room, tries again. A
//!   journal frame cut short by a full disk leaves bytes past the journal's
//!   end; the next checkpoint cuts them off before it switches journals,
//!   since a journal followed by another is read as whole. A patched page
//!   whose old slot is found damaged when a checkpoint puts it together
//!   fails every checkpoint until the pool is reopened: the open finds the
//!   damage if the durable root points at that slot (losing only that
//!   page's blocks: they read as errors until written, trimmed or zeroed,
//!   each of which gives a block an entry born after the loss), and
//!   otherwise rebuilds the page from the root and the journal, losing
//!   nothing. A
//!   checkpoint that wrote its pages but no root leaves them in slots the
//!   durable root does not use; the map in memory points at them and the
//!   next checkpoint syncs them before its root does.
//! * Applying a planned map change never reads the disk: `plan` makes the
//!   block's pages dirty first, a new entry is set before the old one is
//!   dropped, emptied pages stay in the directory until the next checkpoint,
//!   and small pages merge only with neighbours already in memory.
//! * Checkpoints start when the journal passes `journal_limit` (24 MiB), or
//!   when changed pages fill their share of `map_cache_bytes` (at the next
//!   flush, or by the background flusher, which checks both every 200 ms),
//!   and at a fold (see "Redirect-on-write map and snapshots").
//!   A checkpoint writes every changed page whole (16 KiB, for maybe one
//!   changed entry), so what matters is how many changes a page carries
//!   by then. Changed pages past their memory become *patches* (the page's
//!   old slot plus its few changes, see pages.rs), so scattered small
//!   writes can change far more pages between checkpoints: measured write
//!   amplification (300 000 random 4 KiB writes, a flush every 64, default
//!   options) 1.03 over 1 GiB written, 1.07 over 4 GiB, 1.12 over 8 GiB,
//!   1.20 over 16 GiB (whole dirty pages only: 1.74 over 2 GiB, 4.4 over
//!   4 GiB, 5.0 over 8 GiB). It grows again once the pages written hold
//!   many times the patches' memory (a larger map cache moves that point).
//!
//! ## Locks (taken in this order, never the reverse)
//! | lock | guards | held by |
//! |---|---|---|
//! | `flush` | durable sequence number, checkpointing | flush, FUA, checkpoint |
//! | `inplace` | — (a barrier) | in-place overwrites (shared, try-lock); capture at flush/checkpoint, snapshot create, verify, readers after a mismatch (exclusive) |
//! | stripe (256) | one block during a partial-block read-modify-write | unaligned write / trim / zero |
//! | `vols` | the set of volumes | create / delete volume (write); name lookup (read) |
//! | volume `st` | one volume's map, epoch, snapshots, size | writes, trims, snapshot ops (write); reads, extents (read) |
//! | `journal` | journal file, position, sequence numbers | record appends (short) |
//! | `alloc` | free ranges and pending frees | slot allocation (short) |
//! | `reuse` | — (a barrier) | readers during slot I/O (shared); releasing freed slots (exclusive) |
//! | page cache shard (16) | clean pages by id, LRU | page lookups and loads (short) |
//! | page `space` | meta file slots: free, retired, generation | page writes at checkpoint, retiring pages (short) |
//!
//! Map pages are reached through the volume lock: readers holding it shared
//! may load a page into the cache; changing a page needs it exclusive.
//!
//! `Volume::read_at_cached` (the NBD server's reads on its event loop) is
//! `read_at` with try-locks only: it declines (`Ok(false)`, and the caller
//! uses `read_at`) when the volume lock or `reuse` is contended, a map page
//! is not in memory, the blocks overlap a damaged map range, the data is
//! not all in the page cache (`preadv2(RWF_NOWAIT)`), or a checksum fails
//! (so the retry after in-place overwrites stays with `read_at`).
//!
//! ## Memory
//! Nothing grows with the virtual size. Per pool: the page cache and the
//! changed pages (together `map_cache_bytes`, 64 MiB by default), the page
//! directory (about 60 bytes per page, a page per 320–640 mapped block
//! versions: ~0.1 byte per 4 KiB written), the change bitmaps (512-byte
//! chunks per 256 MiB touched per epoch), free-space ranges, and at most
//! 65 536 remembered fresh slots. Opening reads every page to check it,
//! then again through the cache to rebuild the change bitmaps, and holds a bitmap
//! of the data slots in use (one bit per 4 KiB of data file) until the
//! allocator is built; the open-time punch of free space reuses the
//! allocator's free ranges instead of reading the pages again.
#![deny(unsafe_op_in_unsafe_fn)]

mod alloc;
mod error;
pub mod format;
pub mod medium;
mod pages;
mod pool;

pub use error::{Error, ErrorKind, Result};
pub use medium::{DirMedium, Medium, MediumFile, MemMedium};
pub use pool::{validate_name, Pool, PoolStats, Volume, MAX_VOLUME_SIZE};

/// Size of a stored block: the unit of allocation, checksumming and
/// redirect-on-write.
pub const BLOCK: usize = 4096;

/// Where the content of one block of one volume state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Deallocated: reads as zeros, takes no space.
    Hole,
    /// Allocated known zeros (a zero write): reads as zeros, takes no space.
    Zero,
    /// Stored in data slot `slot` with checksum `crc`.
    Data { slot: u64, crc: u32 },
}

/// Tunables of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The journal is folded into a new checkpoint once it grows past this
    /// many bytes (checked at flush and by the background flusher).
    pub journal_limit: u64,
    /// Data space freed by overwrites, up to this many bytes plus
    /// `reuse_reserve_percent` of the data stored, stays allocated in the
    /// data file for the next writes; beyond it, freed space is given back
    /// to the filesystem at once. Reusing allocated space spares the
    /// filesystem an allocation per write and a hole punch per free, and
    /// keeps the page cache's large folios whole (a punch splits the folio
    /// around it). Space freed by trims and by deleting snapshots and
    /// volumes is always given back at once.
    pub reuse_reserve_bytes: u64,
    /// See `reuse_reserve_bytes`.
    pub reuse_reserve_percent: u64,
    /// Memory for map pages: half for pages read from disk (an LRU cache
    /// shared by every volume), the rest for changed pages waiting for the
    /// next checkpoint (which starts when they fill it): a quarter whole,
    /// then (as patches) an eighth as their changes only, and an eighth for
    /// pages that cannot be patched.
    pub map_cache_bytes: u64,
    /// Most entries in a map page (4 ..= 640; smaller only in tests).
    pub map_page_entries: usize,
    /// How long deleting a snapshot may spend collecting the garbage it
    /// leaves before it returns and a background thread finishes the job
    /// ([`crate::Pool::reclaim_space`] waits for it). Small volumes finish
    /// well within it; a deletion on a volume with terabytes of map does
    /// not hold its caller for minutes.
    pub gc_foreground: std::time::Duration,
    /// Disk space held in the data directory (the file `reserve`) for the
    /// day its filesystem fills up. Opening a pool writes a checkpoint and
    /// starts a new journal, which needs free space: an open that runs out
    /// gives the reserve back to the filesystem and tries again, so a pool
    /// a full disk stopped still opens (and its snapshots and volumes can
    /// be deleted to make room). The reserve is allocated anew once the
    /// filesystem has twice its size free. 0 keeps none.
    pub space_reserve_bytes: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            journal_limit: 24 << 20,
            reuse_reserve_bytes: 24 << 20,
            reuse_reserve_percent: 4,
            map_cache_bytes: 64 << 20,
            map_page_entries: pages::PAGE_MAX,
            gc_foreground: std::time::Duration::from_secs(5),
            space_reserve_bytes: 16 << 20,
        }
    }
}

/// Options of a new volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Bytes per change-tracking bit (a power of two, 4 KiB ..= 1 GiB), or
    /// 0 to turn change tracking off.
    pub cbt_granularity: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            cbt_granularity: cbt::DEFAULT_GRANULARITY,
        }
    }
}

/// Changed extents between two points of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub volume: String,
    pub from: String,
    /// `None`: the head.
    pub to: Option<String>,
    pub granularity: u64,
    /// (offset, length) runs, ascending.
    pub extents: Vec<(u64, u64)>,
    /// Sum of the lengths.
    pub bytes: u64,
}

/// Which point holds a block's data, seen from one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// Never written (or trimmed before any point kept it).
    Unwritten,
    /// First held by this point.
    Point(String),
    /// Written after the newest point.
    Head,
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Data space referenced by the head and all snapshots.
    pub allocated_bytes: u64,
    pub snapshots: usize,
    /// Bytes per change-tracking bit (0: tracking off).
    pub cbt_granularity: u64,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub volume: String,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// One snapshot of a volume, as it was chosen: a name may later stand for
/// another snapshot (deleted, then taken again under the same name), this
/// never does. From [`Volume::older_point_ids`] or [`Volume::point_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PointId(pub(crate) u32);

/// Kind of an allocation extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data.
    Data,
    /// Allocated, reads as zeros.
    Zero,
    /// Not allocated, reads as zeros.
    Hole,
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

/// Result of [`Pool::verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub damaged: Vec<Damage>,
}

/// One damaged block found by [`Pool::verify`].
#[derive(Debug, Clone)]
pub struct Damage {
    pub volume: String,
    /// `None` when the head sees the damaged block.
    pub snapshot: Option<String>,
    pub offset: u64,
    pub what: String,
}
