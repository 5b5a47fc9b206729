//! Faults around syncs, through wrappers of the in-memory medium:
//! a root renamed into place whose directory sync never happened, and a
//! sync that fails once after the kernel dropped written pages (Linux
//! reports such an error once; a later sync succeeds without them).

use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use store::{Medium, MediumFile, MemMedium, Pool, PoolOptions, BLOCK};

fn opts() -> PoolOptions {
    PoolOptions {
        // Every flush writes a checkpoint; pages of 4 entries.
        journal_limit: 1,
        map_page_entries: 4,
        ..PoolOptions::default()
    }
}

fn fill(v: &store::Volume, base: u8) {
    for b in 0..40u64 {
        v.write_at(&vec![base + b as u8; BLOCK], b * BLOCK as u64, false)
            .unwrap();
    }
}

/// Blocks 0..40 of the head that hold none of the given generations.
fn lost(pool: &Pool, bases: &[u8]) -> Vec<String> {
    lost_in(&pool.open_head("v").unwrap(), bases)
}

/// Blocks 0..40 of a view that hold none of the given generations.
fn lost_in(h: &store::Volume, bases: &[u8]) -> Vec<String> {
    let mut buf = vec![0u8; BLOCK];
    (0..40u64)
        .filter_map(|b| match h.read_at(&mut buf, b * BLOCK as u64) {
            Ok(()) if bases.iter().any(|&g| buf[0] == g + b as u8) => None,
            Ok(()) => Some(format!("block {b} holds {}", buf[0])),
            Err(e) => Some(format!("block {b}: {e}")),
        })
        .collect()
}

/// A medium with faults to switch on. Directory syncs: while `failing`,
/// `ok_left` more succeed, then every one fails; `cut` turns the next one
/// (`cut_at`: the n-th next one) into a power cut (the medium as it is
/// durably is kept aside, and the call fails). The meta file drops writes
/// while `dropping` (see [`Fault::DropWrites`]). `cut_data_sync` turns the data
/// file's next sync into a power cut that keeps every journal write made so
/// far (the kernel wrote them back) but no unsynced data write.
/// `tear_data_write` makes the data file's next write store half and fail.
#[derive(Default)]
struct Faults {
    m: MemMedium,
    ok_left: AtomicUsize,
    failing: AtomicBool,
    cut: AtomicBool,
    /// When not 0: the power is cut at this many directory syncs from now.
    cut_at: AtomicUsize,
    after_cut: Arc<Mutex<Option<MemMedium>>>,
    dropping: Arc<AtomicBool>,
    cut_data_sync: Arc<AtomicBool>,
    tear_data_write: Arc<AtomicBool>,
}

impl Medium for Faults {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        let f = self.m.open(name, create)?;
        let fault = match name {
            "meta" => Fault::DropWrites {
                dropping: self.dropping.clone(),
                owe_error: AtomicBool::new(false),
            },
            "data" => Fault::CutAtSync {
                m: self.m.clone(),
                armed: self.cut_data_sync.clone(),
                after_cut: self.after_cut.clone(),
                tear: self.tear_data_write.clone(),
            },
            _ => return Ok(f),
        };
        Ok(Arc::new(FaultFile { f, fault }))
    }
    fn exists(&self, name: &str) -> bool {
        self.m.exists(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.m.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.m.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        let countdown = self
            .cut_at
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if self.cut.swap(false, Ordering::SeqCst) || countdown == 1 {
            *self.after_cut.lock() = Some(self.m.crash(|_, _| true));
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.failing.load(Ordering::SeqCst) {
            if self.ok_left.load(Ordering::SeqCst) == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.ok_left.fetch_sub(1, Ordering::SeqCst);
        }
        self.m.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.m.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn describe(&self) -> String {
        "faults".into()
    }
}

/// A checkpoint renames its root into place but the directory sync after
/// it fails (the process then dies). The next open reads that root, which
/// the directory may still lose: before the open writes pages into slots
/// only the older root used, the root must be made durable, or a power cut
/// during the open leaves the older root pointing at overwritten pages.
#[test]
fn a_root_renamed_but_not_dir_synced_is_made_durable_at_open() {
    let w = Arc::new(Faults::default());
    let pool = Pool::open_medium(w.clone(), opts()).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    fill(&h, 1);
    h.flush().unwrap();
    fill(&h, 101);
    // The new journal's directory sync succeeds, the one after the rename
    // does not.
    w.ok_left.store(1, Ordering::SeqCst);
    w.failing.store(true, Ordering::SeqCst);
    assert!(h.flush().is_err());
    // More writes after it: the next open replays them and writes pages.
    fill(&h, 151);
    drop(h);
    drop(pool);
    w.failing.store(false, Ordering::SeqCst);
    // A new process opens the pool; the power fails at its first
    // directory sync.
    w.cut.store(true, Ordering::SeqCst);
    drop(Pool::open_medium(w.clone(), opts()));
    let after = w.after_cut.lock().take().expect("the power cut happened");
    let pool = Pool::open_medium(Arc::new(after), opts()).unwrap();
    let bad = lost(&pool, &[1, 101, 151]);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(pool.verify().unwrap().damaged.is_empty());
}

/// What a [`FaultFile`] does wrong.
enum Fault {
    /// The meta file: while `dropping`, writes are lost (writeback failed)
    /// and the next sync reports EIO, once.
    DropWrites {
        dropping: Arc<AtomicBool>,
        owe_error: AtomicBool,
    },
    /// The data file: a power cut at its sync when `armed` (see
    /// [`Faults`]); when `tear` is set, its next write stores only its
    /// first half and fails with EIO.
    CutAtSync {
        m: MemMedium,
        armed: Arc<AtomicBool>,
        after_cut: Arc<Mutex<Option<MemMedium>>>,
        tear: Arc<AtomicBool>,
    },
}

struct FaultFile {
    f: Arc<dyn MediumFile>,
    fault: Fault,
}

impl MediumFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.f.read_at(buf, off)
    }
    fn write_at(&self, d: &[u8], off: u64) -> io::Result<()> {
        if let Fault::DropWrites {
            dropping,
            owe_error,
        } = &self.fault
        {
            if dropping.load(Ordering::SeqCst) {
                owe_error.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
        if let Fault::CutAtSync { tear, .. } = &self.fault {
            if tear.swap(false, Ordering::SeqCst) {
                self.f.write_at(&d[..d.len() / 2], off)?;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.f.write_at(d, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        let fail = match &self.fault {
            Fault::DropWrites {
                dropping,
                owe_error,
            } => {
                let owed = owe_error.swap(false, Ordering::SeqCst);
                if owed {
                    dropping.store(false, Ordering::SeqCst);
                }
                owed
            }
            Fault::CutAtSync {
                m,
                armed,
                after_cut,
                ..
            } => {
                let cut = armed.swap(false, Ordering::SeqCst);
                if cut {
                    *after_cut.lock() = Some(m.crash(|name, _| name.starts_with("journal")));
                }
                cut
            }
        };
        if fail {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.f.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.f.len()
    }
    fn set_len(&self, l: u64) -> io::Result<()> {
        self.f.set_len(l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> io::Result<()> {
        self.f.punch_hole(o, l)
    }
}

/// A checkpoint whose page sync fails must not be followed by one that
/// "succeeds" without those pages: after a failed flush every flush fails
/// until the pool is reopened, and reopening finds every block that was
/// written before (from the older root and the journals).
#[test]
fn a_failed_page_sync_is_not_forgotten() {
    let w = Arc::new(Faults::default());
    let dropping = w.dropping.clone();
    let pool = Pool::open_medium(w.clone(), opts()).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    fill(&h, 1);
    dropping.store(true, Ordering::SeqCst);
    let first = h.flush().unwrap_err();
    assert_eq!(first.kind(), store::ErrorKind::Io, "{first}");
    h.write_at(&[7; BLOCK], 60 * BLOCK as u64, false).unwrap();
    let second = h.flush().unwrap_err();
    assert!(second.to_string().contains("restart"), "{second}");
    // An administrative change takes effect but says a restart may undo it.
    let e = pool.create_volume("z", 1 << 20).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("volume \"z\" was created, but is not durable, and a restart may undo it"),
        "{e}"
    );
    drop(h);
    drop(pool);
    let pool = Pool::open_medium(Arc::new(w.m.crash(|_, _| true)), opts()).unwrap();
    let bad = lost(&pool, &[1]);
    assert!(bad.is_empty(), "{bad:?}");
}

/// Deleting a snapshot drops what only it saw in batches, writing changed
/// pages out (a checkpoint) whenever they pass their memory budget. A power
/// cut between two batches leaves the rest to the next open, which must
/// finish it: the snapshot stays gone, every other view is exact, and no
/// slot stays held by an entry nothing sees.
#[test]
fn a_snapshot_deletion_cut_short_is_finished_at_open() {
    let o = PoolOptions {
        // The least memory for changed pages: a checkpoint every 16 batches.
        map_cache_bytes: 0,
        ..opts()
    };
    // The deletion makes about 6 directory syncs (two per checkpoint).
    for cut_at in 1..=5 {
        let w = Arc::new(Faults::default());
        let pool = Pool::open_medium(w.clone(), o.clone()).unwrap();
        pool.create_volume("v", 64 * BLOCK as u64).unwrap();
        let h = pool.open_head("v").unwrap();
        for (gen, snap) in [(1, "a"), (101, "b"), (151, "c")] {
            fill(&h, gen);
            pool.create_snapshot("v", snap).unwrap();
        }
        fill(&h, 201);
        pool.flush().unwrap();
        w.cut_at.store(cut_at, Ordering::SeqCst);
        // It fails, or succeeds when its journal sync came before the cut
        // (in a checkpoint after it): either way the cut is inside it.
        let r = pool.delete_snapshot("v", "b");
        let after = w.after_cut.lock().take().unwrap_or_else(|| {
            panic!("the power cut at directory sync {cut_at} came after the deletion ({r:?})")
        });
        drop(h);
        drop(pool);
        let pool = Pool::open_medium(Arc::new(after), o.clone()).unwrap();
        let names: Vec<String> = pool
            .snapshots("v")
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "c"], "cut at {cut_at}");
        for (view, gen) in [("a", 1), ("c", 151)] {
            let bad = lost_in(&pool.open_snapshot("v", view).unwrap(), &[gen]);
            assert!(bad.is_empty(), "cut at {cut_at}, snapshot {view}: {bad:?}");
        }
        let bad = lost(&pool, &[201]);
        assert!(bad.is_empty(), "cut at {cut_at}, head: {bad:?}");
        // Three generations of 40 blocks are seen; the fourth is gone.
        let st = pool.stats();
        assert_eq!(
            st.data_slots_high - st.free_slots - st.pending_slots,
            120,
            "cut at {cut_at}: {st:?}"
        );
        assert!(pool.verify().unwrap().damaged.is_empty());
    }
}

/// A snapshot deletion's drops are worked out from the map as it is, which
/// may hold a write that no flush has made durable yet. If the power fails
/// before the data sync, that write is lost, and the drops it justified
/// must go with it: here, block 0's durable content (seen by the deleted
/// snapshot until the newer write superseded it) must survive.
#[test]
fn drops_made_for_an_unflushed_write_die_with_it() {
    let w = Arc::new(Faults::default());
    let pool = Pool::open_medium(w.clone(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    h.write_at(&[0xaa; BLOCK], 0, false).unwrap();
    // Taking the snapshot flushes: 0xaa is durable.
    pool.create_snapshot("v", "s").unwrap();
    h.write_at(&[0xbb; BLOCK], 0, false).unwrap();
    w.cut_data_sync.store(true, Ordering::SeqCst);
    assert!(pool.delete_snapshot("v", "s").is_err());
    drop(h);
    drop(pool);
    let after = w.after_cut.lock().take().expect("the power cut happened");
    let pool = Pool::open_medium(Arc::new(after), PoolOptions::default()).unwrap();
    let mut buf = vec![0u8; BLOCK];
    pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
    assert!(
        buf[0] == 0xaa || buf[0] == 0xbb,
        "durable block 0 lost: reads {:#x}",
        buf[0]
    );
    assert!(pool.verify().unwrap().damaged.is_empty());
}

/// A power cut tears the journal's tail (a later unsynced frame reached the
/// disk, an earlier one did not); the next open accepts that, since nothing
/// after the tear was ever acknowledged. If that open is cut short in turn,
/// after it created the next journals but before its new root is durable,
/// the torn journal is replayed again, now followed by a journal the open
/// created: that must not be taken for damage (the pool would never open
/// again without manual repair).
#[test]
fn an_open_cut_short_after_a_torn_journal_is_not_taken_for_damage() {
    let mut cuts = 0;
    for cut_at in 1..=6 {
        let m = MemMedium::new();
        let pool = Pool::open_medium(Arc::new(m.clone()), PoolOptions::default()).unwrap();
        pool.create_volume("v", 64 * BLOCK as u64).unwrap();
        let h = pool.open_head("v").unwrap();
        h.write_at(&[1; BLOCK], 0, false).unwrap();
        pool.flush().unwrap();
        for b in 1..4u64 {
            h.write_at(&[b as u8 + 1; BLOCK], b * BLOCK as u64, false)
                .unwrap();
        }
        drop(h);
        drop(pool);
        // Of the journal's unsynced writes the first is lost, the later
        // ones reached the disk.
        let torn = m.crash(|name, i| !name.starts_with("journal") || i != 0);
        let w = Arc::new(Faults {
            m: torn,
            ..Faults::default()
        });
        w.cut_at.store(cut_at, Ordering::SeqCst);
        let first = Pool::open_medium(w.clone(), PoolOptions::default());
        let Some(after) = w.after_cut.lock().take() else {
            // This open makes fewer directory syncs: it finished.
            assert!(first.is_ok());
            continue;
        };
        drop(first);
        cuts += 1;
        let pool = Pool::open_medium(Arc::new(after), PoolOptions::default())
            .unwrap_or_else(|e| panic!("cut at {cut_at}: the pool no longer opens: {e}"));
        let mut buf = vec![0u8; BLOCK];
        pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
        assert!(buf == [1; BLOCK], "cut at {cut_at}: the flushed block");
        assert!(pool.verify().unwrap().damaged.is_empty());
    }
    assert!(cuts >= 2, "the open made only {cuts} directory syncs");
}

/// An overwrite in place (of a block written since the last flush) fails
/// half-way: the slot now holds neither the acknowledged but unflushed
/// write nor the new one. No later flush may then make that write's record
/// durable (it would point at torn data for good); after a reopen, replay
/// finds the record's data damaged and the block falls back to its flushed
/// content.
#[test]
fn a_failed_overwrite_in_place_is_never_made_durable() {
    let w = Arc::new(Faults::default());
    let pool = Pool::open_medium(w.clone(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    h.write_at(&[0xaa; BLOCK], 0, false).unwrap();
    pool.flush().unwrap();
    h.write_at(&[0xbb; BLOCK], 0, false).unwrap();
    // Rewritten before any flush: in place, into the slot of 0xbb.
    w.tear_data_write.store(true, Ordering::SeqCst);
    assert!(h.write_at(&[0xcc; BLOCK], 0, false).is_err());
    assert!(
        !w.tear_data_write.load(Ordering::SeqCst),
        "the write was not attempted"
    );
    let mut buf = vec![0u8; BLOCK];
    assert_eq!(
        h.read_at(&mut buf, 0).unwrap_err().kind(),
        store::ErrorKind::Corruption
    );
    assert!(
        pool.flush().is_err(),
        "a flush promised the torn write durable"
    );
    drop(h);
    drop(pool);
    let pool = Pool::open_medium(Arc::new(w.m.kill()), PoolOptions::default()).unwrap();
    pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf == [0xaa; BLOCK], "block 0 is not its flushed content");
    assert!(pool.verify().unwrap().damaged.is_empty());
}

/// A shrink to an unaligned size cut short by a power loss can leave the
/// old data in the tail of the last block (past the size, unseen). A grow
/// zeroes it before the new size shows it; that zeroing is a data write,
/// and a power loss that keeps the grow's size record must keep it too.
#[test]
fn a_grow_never_shows_what_a_cut_shrink_left() {
    const B: u64 = BLOCK as u64;
    let w = Arc::new(Faults::default());
    let pool = Pool::open_medium(w.clone(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 2 * B).unwrap();
    let h = pool.open_head("v").unwrap();
    h.write_at(&[0xab; BLOCK], B, false).unwrap();
    pool.flush().unwrap();
    // The shrink's flush loses power at its data sync: the journal made
    // it, the zeroed block did not.
    w.cut_data_sync.store(true, Ordering::SeqCst);
    assert!(pool.resize_volume("v", B + B / 2, true).is_err());
    drop(h);
    drop(pool);
    let w = Arc::new(Faults {
        m: w.after_cut.lock().take().expect("the power cut happened"),
        ..Faults::default()
    });
    let pool = Pool::open_medium(w.clone(), PoolOptions::default()).unwrap();
    assert_eq!(pool.volume_info("v").unwrap().size, B + B / 2);
    // The grow loses power the same way.
    w.cut_data_sync.store(true, Ordering::SeqCst);
    let _ = pool.resize_volume("v", 2 * B, false);
    drop(pool);
    let after = w
        .after_cut
        .lock()
        .take()
        .unwrap_or_else(|| w.m.crash(|_, _| true));
    let pool = Pool::open_medium(Arc::new(after), PoolOptions::default()).unwrap();
    let size = pool.volume_info("v").unwrap().size;
    let mut buf = vec![0u8; size as usize];
    pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
    assert!(
        buf[B as usize..(B + B / 2) as usize] == [0xab; BLOCK / 2],
        "the flushed data before the cut changed"
    );
    assert!(
        buf[(B + B / 2) as usize..].iter().all(|&x| x == 0),
        "size {size}: bytes past the old end hold what the shrink cut off"
    );
}

/// A FUA trim of a block that a plain trim emptied already changes
/// nothing, so it appends no record; it must still make the plain trim
/// durable before it is acknowledged (the block's data came back after a
/// power cut). The same for FUA zeroes.
#[test]
fn a_fua_request_that_changes_nothing_makes_what_it_rests_on_durable() {
    for zeroes in [false, true] {
        let m = MemMedium::new();
        let pool = Pool::open_medium(Arc::new(m.clone()), PoolOptions::default()).unwrap();
        pool.create_volume("v", 64 * BLOCK as u64).unwrap();
        let h = pool.open_head("v").unwrap();
        h.write_at(&[7; BLOCK], 0, false).unwrap();
        h.flush().unwrap();
        let unmap = |fua| {
            if zeroes {
                h.write_zeroes(0, BLOCK as u64, false, fua)
            } else {
                h.trim(0, BLOCK as u64, fua)
            }
        };
        unmap(false).unwrap();
        unmap(true).unwrap();
        let pool =
            Pool::open_medium(Arc::new(m.crash(|_, _| false)), PoolOptions::default()).unwrap();
        let mut buf = vec![1u8; BLOCK];
        pool.open_head("v").unwrap().read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "zeroes={zeroes}: the acknowledged FUA request was lost"
        );
    }
}
