//! A full disk, through a wrapper of the in-memory medium that starts
//! failing writes with ENOSPC after a chosen number of them: at every point
//! of a flush and of the checkpoint it writes, the failed flush reports
//! `NoSpace`, a power cut right then leaves a pool that opens with every
//! flushed write, and once there is room again the next flush succeeds
//! without a restart and makes every acknowledged write durable.

mod common;

use common::{Limited, Limits, ROOM};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use store::{ErrorKind, Medium, MemMedium, Pool, PoolOptions, BLOCK};

fn opts() -> PoolOptions {
    PoolOptions {
        // Every flush writes a checkpoint, of about 20 pages.
        journal_limit: 1,
        map_page_entries: 4,
        ..PoolOptions::default()
    }
}

const BLOCKS: u64 = 40;

fn val(generation: u8, b: u64) -> u8 {
    generation.wrapping_mul(50).wrapping_add(b as u8)
}

fn write(h: &store::Volume, generation: u8, b: u64) -> store::Result<()> {
    h.write_at(&vec![val(generation, b); BLOCK], b * BLOCK as u64, false)
}

/// Opens what a power cut left and checks every block holds one of the
/// generations `allowed(b)` says it may.
fn check(m: MemMedium, what: &str, allowed: impl Fn(u64) -> Vec<u8>) {
    let pool = Pool::open_medium(Arc::new(m), opts())
        .unwrap_or_else(|e| panic!("{what}: the pool does not open: {e}"));
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
        h.read_at(&mut buf, b * BLOCK as u64)
            .unwrap_or_else(|e| panic!("{what}: block {b}: {e}"));
        let ok = allowed(b);
        assert!(
            ok.iter().any(|&g| buf.iter().all(|&x| x == val(g, b))),
            "{what}: block {b} holds {}, not one of generations {ok:?}",
            buf[0]
        );
    }
}

/// A pool on a [`Limited`] medium with room, and volume `v` holding
/// generation 1 in its first blocks.
fn start() -> (MemMedium, Arc<AtomicU64>, Arc<Pool>, store::Volume) {
    start_with(opts(), Limits::new(libc::ENOSPC))
}

fn start_with(
    opts: PoolOptions,
    limits: Limits,
) -> (MemMedium, Arc<AtomicU64>, Arc<Pool>, store::Volume) {
    let left = limits.left.clone();
    let m = MemMedium::new();
    let medium = Arc::new(Limited {
        m: m.clone(),
        limits,
    });
    let pool = Pool::open_medium(medium, opts).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    for b in 0..BLOCKS {
        write(&h, 1, b).unwrap();
    }
    (m, left, pool, h)
}

#[test]
fn a_full_disk_fails_the_flush_loses_nothing_and_the_next_flush_succeeds() {
    let mut failed_flushes = 0;
    for n in 0..60u64 {
        let (m, left, _pool, h) = start();
        h.flush().unwrap();
        for b in 0..BLOCKS {
            write(&h, 2, b).unwrap();
        }
        // The disk fills up after n more writes.
        left.store(n, Ordering::SeqCst);
        let flushed = match h.flush() {
            Ok(()) => true,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "n={n}: {e}");
                failed_flushes += 1;
                false
            }
        };
        // Writes on the full disk fail with NoSpace, or succeed.
        let mut third = [false; BLOCKS as usize];
        for b in 0..BLOCKS {
            match write(&h, 3, b) {
                Ok(()) => third[b as usize] = true,
                Err(e) => assert_eq!(e.kind(), ErrorKind::NoSpace, "n={n}: {e}"),
            }
        }
        // A power cut now, keeping some of the writes not synced (a torn
        // journal among them): everything flushed is there.
        let durable = if flushed { 2 } else { 1 };
        let allowed = |b: u64| {
            let mut g = vec![durable, 2];
            if third[b as usize] {
                g.push(3);
            }
            g
        };
        check(
            m.crash(|_, i| i % 2 == 0),
            &format!("n={n}, cut while full"),
            allowed,
        );
        // Room again: the next flush succeeds, no restart needed, and makes
        // every acknowledged write durable.
        left.store(ROOM, Ordering::SeqCst);
        h.flush()
            .unwrap_or_else(|e| panic!("n={n}: flush once there is room: {e}"));
        for b in 0..BLOCKS {
            write(&h, 4, b).unwrap();
        }
        h.flush().unwrap();
        check(m.crash(|_, _| false), &format!("n={n}, cut after"), |_| {
            vec![4]
        });
    }
    // The disk filled up inside the flush for many of the n, not only
    // after it.
    assert!(failed_flushes >= 20, "{failed_flushes} flushes failed");
}

/// What a checkpoint cut short between creating the next journal and
/// writing its header leaves: records went on to the journal before it, so
/// a torn tail there is a crash's, not damage; the pool opens with
/// everything flushed.
#[test]
fn a_torn_journal_before_one_without_a_header_is_cut_not_damage() {
    let m = MemMedium::new();
    let pool = Pool::open_medium(Arc::new(m.clone()), PoolOptions::default()).unwrap();
    pool.create_volume("v", 64 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    for b in 0..BLOCKS {
        write(&h, 1, b).unwrap();
    }
    h.flush().unwrap();
    for b in 0..BLOCKS {
        write(&h, 2, b).unwrap();
    }
    let last = m
        .list()
        .unwrap()
        .iter()
        .filter_map(|n| n.strip_prefix("journal.")?.parse::<u64>().ok())
        .max()
        .unwrap();
    m.open(&format!("journal.{:016}", last + 1), true).unwrap();
    m.sync_dir().unwrap();
    // Keep every other unsynced write: the journal's first record after the
    // flush is lost, the next one kept, so its tail is torn.
    check(
        m.crash(|_, i| i % 2 == 1),
        "torn before a headerless journal",
        |_| vec![1, 2],
    );
}

/// A snapshot deleted on a full disk: its collection cannot journal its
/// drops, so it waits, and the background collector finishes it once
/// there is room (before, it was given up until the pool was reopened).
#[test]
fn a_collection_out_of_space_goes_on_once_there_is_room() {
    for n in 0..8u64 {
        let (m, left, pool, h) = start();
        pool.create_snapshot("v", "a").unwrap();
        for b in 0..BLOCKS {
            write(&h, 2, b).unwrap();
        }
        h.flush().unwrap();
        let free_before = pool.stats().free_slots;
        left.store(n, Ordering::SeqCst);
        if let Err(e) = pool.delete_snapshot("v", "a") {
            assert_eq!(e.kind(), ErrorKind::NoSpace, "n={n}: {e}");
        }
        left.store(ROOM, Ordering::SeqCst);
        if !pool.snapshots("v").unwrap().is_empty() {
            // Not even the deletion's record fitted.
            pool.delete_snapshot("v", "a").unwrap();
        }
        let t = std::time::Instant::now();
        while pool.stats().gc_pending_volumes > 0 || pool.stats().free_slots < free_before + BLOCKS
        {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "n={n}: the collection did not go on: {:?}",
                pool.stats()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        h.flush().unwrap();
        check(m.crash(|_, _| false), &format!("n={n}"), |_| vec![2]);
    }
}

/// The newest journal's length (what is allocated to it) and how much of
/// it holds records.
fn journal_room(m: &MemMedium, pool: &Pool) -> u64 {
    let name = m
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("journal."))
        .max()
        .unwrap();
    m.open(&name, false).unwrap().len().unwrap() - pool.stats().journal_bytes
}

/// A block written since the last flush is overwritten in place; when the
/// record of that overwrite does not fit in the journal and the disk is
/// full, the write fails with nothing changed. (It used to write the data
/// in place first and then, failing to journal it, refuse every later
/// flush until the pool was reopened.)
#[test]
fn a_full_disk_fails_an_overwrite_in_place_before_it_writes() {
    let limits = Limits::new(libc::ENOSPC);
    let opts = PoolOptions {
        map_page_entries: 4,
        ..PoolOptions::default()
    };
    let (m, left, pool, h) = start_with(opts.clone(), limits.clone());
    h.flush().unwrap();
    // Records of one block each, until the journal has room for exactly
    // one more.
    let one = 16 + 13 + 26;
    let mut b = 1;
    while journal_room(&m, &pool) >= 2 * one {
        write(&h, 2, b).unwrap();
        b = b % (BLOCKS - 1) + 1;
    }
    assert!(journal_room(&m, &pool) >= one);
    write(&h, 2, 0).unwrap();
    // Only the journal is out of space (block 0's slot is written already,
    // as on a filesystem that overwrites in place).
    limits.only(Some("journal."));
    left.store(0, Ordering::SeqCst);
    let e = write(&h, 3, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    left.store(ROOM, Ordering::SeqCst);
    write(&h, 4, 1).unwrap();
    h.flush()
        .unwrap_or_else(|e| panic!("flush once there is room: {e}"));
    check(
        m.crash(|_, _| false),
        "after the failed overwrite",
        |b| match b {
            0 => vec![2],
            1 => vec![4],
            _ => vec![1, 2],
        },
    );
    drop((h, pool));
}

/// A frame write cut short by a full disk leaves its bytes past the end of
/// the journal, under the shorter frames appended next. A checkpoint that
/// then moves on to the next journal cuts them off first: a journal
/// followed by another is taken as whole, so they used to be reported as
/// damage and the pool would not open.
#[test]
fn a_frame_cut_short_by_a_full_disk_is_cut_off_before_the_next_journal() {
    let limits = Limits::new(libc::ENOSPC);
    let opts = PoolOptions {
        journal_limit: 1,
        map_page_entries: 4,
        ..PoolOptions::default()
    };
    let (m, left, pool, h) = start_with(opts.clone(), limits.clone());
    h.flush().unwrap();
    // A long record (2048 blocks of another volume) cut short, where the
    // journal's zeros were allocated already.
    pool.create_volume("w", 2048 * BLOCK as u64).unwrap();
    let w = pool.open_head("w").unwrap();
    limits.only(Some("journal."));
    limits.short(true);
    let d = vec![9u8; 2048 * BLOCK];
    let mut cut = false;
    for n in 0..4 {
        left.store(n, Ordering::SeqCst);
        match w.write_at(&d, 0, false) {
            Err(e) if e.to_string().contains("cannot append") => {
                cut = true;
                break;
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}"),
            Ok(()) => {}
        }
    }
    assert!(cut, "no frame was cut short");
    limits.only(None);
    limits.short(false);
    left.store(ROOM, Ordering::SeqCst);
    // A shorter record over the start of the cut one, then a flush whose
    // checkpoint moves on to the next journal but fails to write its root:
    // the cut journal is still the one the root names, and the next one
    // has a header.
    write(&h, 3, 5).unwrap();
    let journals = || {
        m.list()
            .unwrap()
            .iter()
            .filter(|n| n.starts_with("journal."))
            .count()
    };
    let mut switched = false;
    for n in 0..60 {
        // The same pages changed before every try (a failed checkpoint
        // keeps the pages it wrote), so the tries fail one write later
        // each; short records, so the cut one's tail outlasts them.
        for b in (0..BLOCKS).step_by(4) {
            write(&h, 2, b).unwrap();
        }
        left.store(n, Ordering::SeqCst);
        let r = h.flush();
        left.store(ROOM, Ordering::SeqCst);
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
            if journals() > 1 {
                switched = true;
                break;
            }
        }
    }
    assert!(switched, "no checkpoint failed after its switch");
    check(m.kill(), "after the switch", |b| match b {
        5 => vec![3],
        b if b % 4 == 0 => vec![2],
        _ => vec![1],
    });
    drop((h, w, pool));
}

/// A pool stopped on a full disk opens again: the open's checkpoint and
/// new journal find no room, so it gives the space reserve back (here that
/// frees room for any number of writes) and tries again, with everything
/// flushed and the unflushed writes it replays. Without a reserve the open
/// fails with `NoSpace` and says what to do.
#[test]
fn an_open_on_a_full_disk_gives_back_the_space_reserve() {
    for reserve in [64 << 10, 0] {
        let limits = Limits::new(libc::ENOSPC);
        let o = PoolOptions {
            space_reserve_bytes: reserve,
            ..opts()
        };
        let (m, left, pool, h) = start_with(o.clone(), limits.clone());
        assert_eq!(m.exists("reserve"), reserve > 0);
        assert_eq!(pool.stats().space_reserve_bytes, reserve);
        pool.flush().unwrap();
        for b in 0..BLOCKS / 2 {
            write(&h, 2, b).unwrap();
        }
        // Journaled, not flushed: a kill keeps them, and the open's
        // checkpoint must write their map pages.
        let killed = m.kill();
        drop(h);
        drop(pool);
        left.store(0, Ordering::SeqCst);
        limits.freed_by("reserve", ROOM);
        let reopened = Pool::open_medium(
            Arc::new(Limited {
                m: killed.clone(),
                limits: limits.clone(),
            }),
            o,
        );
        if reserve == 0 {
            let e = reopened.err().expect("a full disk without a reserve");
            assert_eq!(e.kind(), ErrorKind::NoSpace);
            assert!(
                e.to_string().contains("the disk is full (free some space"),
                "{e}"
            );
            continue;
        }
        let pool = reopened.unwrap_or_else(|e| panic!("the open did not use the reserve: {e}"));
        // With room again, the open takes the reserve back at once.
        assert!(killed.exists("reserve"));
        let h = pool.open_head("v").unwrap();
        let mut buf = vec![0u8; BLOCK];
        for b in 0..BLOCKS {
            h.read_at(&mut buf, b * BLOCK as u64).unwrap();
            let g = if b < BLOCKS / 2 { 2 } else { 1 };
            assert!(buf.iter().all(|&x| x == val(g, b)), "block {b}");
        }
    }
}

/// A snapshot deletion whose flush finds the disk full has still taken
/// effect: the error says so (not just "no space"), the snapshot is gone
/// from the list, and the next flush with room makes the deletion durable.
/// The journal gets room for 1, 2, … writes until the deletion's record
/// fits but the `Sync` record its flush appends does not.
#[test]
fn a_deletion_whose_flush_fails_says_it_took_effect() {
    for room in 1..8 {
        let limits = Limits::new(libc::ENOSPC);
        let (m, left, pool, h) = start_with(opts(), limits.clone());
        pool.create_snapshot("v", "s").unwrap();
        write(&h, 2, 0).unwrap();
        pool.flush().unwrap();
        limits.only(Some("journal"));
        left.store(room, Ordering::SeqCst);
        let e = pool.delete_snapshot("v", "s").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        if !pool.snapshots("v").unwrap().is_empty() {
            // The record did not fit: nothing happened, and the error is
            // the plain one.
            assert!(e.to_string().starts_with("cannot append"), "{e}");
            continue;
        }
        assert!(
            e.to_string()
                .starts_with("snapshot \"s\" of volume \"v\" was deleted, but is not durable yet"),
            "{e}"
        );
        // A power cut now would bring the snapshot back; a flush with room
        // makes the deletion durable.
        let before = m.crash(|_, _| false);
        left.store(ROOM, Ordering::SeqCst);
        pool.flush().unwrap();
        drop(h);
        let after = m.crash(|_, _| false);
        let pool = Pool::open_medium(Arc::new(before), opts()).unwrap();
        assert_eq!(pool.snapshots("v").unwrap().len(), 1);
        let pool = Pool::open_medium(Arc::new(after), opts()).unwrap();
        assert!(pool.snapshots("v").unwrap().is_empty());
        return;
    }
    panic!("no room made the deletion's record fit but not its flush");
}

/// A snapshot deletion whose flush made it durable but whose checkpoint
/// after it found the disk full succeeds: the deletion is done for good.
#[test]
fn a_deletion_whose_checkpoint_fails_after_its_sync_is_done() {
    let limits = Limits::new(libc::ENOSPC);
    let (m, left, pool, h) = start_with(opts(), limits.clone());
    pool.create_snapshot("v", "s").unwrap();
    write(&h, 2, 0).unwrap();
    pool.flush().unwrap();
    // The journal has room; the checkpoint every flush writes here has not.
    limits.only(Some("checkpoint"));
    left.store(0, Ordering::SeqCst);
    pool.delete_snapshot("v", "s").unwrap();
    let crashed = m.crash(|_, _| false);
    let pool = Pool::open_medium(Arc::new(crashed), opts()).unwrap();
    assert!(pool.snapshots("v").unwrap().is_empty());
    drop(h);
}

/// A shrink whose drops find the journal full has still taken effect: the
/// error says so; a later grow shows zeros past the old size, never the
/// blocks the drops missed, and a flush with room makes it durable.
#[test]
fn a_shrink_whose_drops_fail_says_it_took_effect() {
    let b = BLOCK as u64;
    for room in 1..8 {
        let limits = Limits::new(libc::ENOSPC);
        let (m, left, pool, h) = start_with(opts(), limits.clone());
        pool.flush().unwrap();
        limits.only(Some("journal"));
        left.store(room, Ordering::SeqCst);
        let Err(e) = pool.resize_volume("v", 8 * b, true) else {
            panic!("the shrink found room for everything with {room} writes");
        };
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        if h.size() != 8 * b {
            // The size record did not fit: nothing happened.
            assert!(e.to_string().starts_with("cannot append"), "{e}");
            continue;
        }
        assert!(
            e.to_string().starts_with(
                "volume \"v\" was resized, but not all of the blocks past its new size were dropped"
            ),
            "{e}"
        );
        left.store(ROOM, Ordering::SeqCst);
        pool.resize_volume("v", 64 * b, false).unwrap();
        let mut buf = vec![0u8; BLOCK];
        for blk in 8..BLOCKS {
            h.read_at(&mut buf, blk * b).unwrap();
            assert!(buf.iter().all(|&x| x == 0), "block {blk} came back");
        }
        drop(h);
        let pool = Pool::open_medium(Arc::new(m.crash(|_, _| false)), opts()).unwrap();
        let h = pool.open_head("v").unwrap();
        assert_eq!(h.size(), 64 * b);
        for blk in 0..BLOCKS {
            h.read_at(&mut buf, blk * b).unwrap();
            let want = if blk < 8 { val(1, blk) } else { 0 };
            assert!(
                buf.iter().all(|&x| x == want),
                "block {blk} after a power cut"
            );
        }
        return;
    }
    panic!("no room made the size record fit but not the drops");
}
