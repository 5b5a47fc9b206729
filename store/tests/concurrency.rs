//! Snapshot deletion runs its garbage collection in batches, letting go of
//! the volume lock between them, and leaves what it has no time for to a
//! background thread (here: everything after the first batch). Here two writers (writes, FUA writes,
//! trims) run all the while snapshots are taken and deleted at random, with
//! map pages of 4 entries and no page cache so that every batch boundary,
//! page split and reload is crossed; every view is checked against a model
//! after each deletion, at the end, and after a kill and reopen.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{MemMedium, Pool, PoolOptions, BLOCK};

const BLOCKS: u64 = 300;

/// Head contents (the first 4 bytes of each block) and, per snapshot, its
/// contents when taken.
type Model = (Vec<u32>, BTreeMap<String, Vec<u32>>);

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Checks a view (`""`: the head) block by block.
fn check(pool: &Pool, view: &str, want: &[u32]) {
    let v = if view.is_empty() {
        pool.open_head("v").unwrap()
    } else {
        pool.open_snapshot("v", view).unwrap()
    };
    let mut buf = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
        v.read_at(&mut buf, b * BLOCK as u64).unwrap();
        let got = u32::from_le_bytes(buf[..4].try_into().unwrap());
        assert_eq!(got, want[b as usize], "view {view:?} block {b}");
    }
}

#[test]
fn snapshot_deletions_run_alongside_writes() {
    let opts = PoolOptions {
        journal_limit: 1 << 16,
        map_page_entries: 4,
        map_cache_bytes: 0,
        reuse_reserve_bytes: 16 << 10,
        reuse_reserve_percent: 10,
        // One batch in the foreground, the rest in the background, racing
        // the writers, the checks and the next deletions.
        gc_foreground: Duration::ZERO,
        ..PoolOptions::default()
    };
    let medium = MemMedium::new();
    let pool = Pool::open_medium(Arc::new(medium.clone()), opts.clone()).unwrap();
    pool.create_volume("v", BLOCKS * BLOCK as u64).unwrap();
    let model: Arc<Mutex<Model>> =
        Arc::new(Mutex::new((vec![0; BLOCKS as usize], BTreeMap::new())));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (pool, model, stop) = (pool.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let h = pool.open_head("v").unwrap();
                let mut x = 12345 + w;
                let mut gen = 1 + w as u32 * 1_000_000;
                let mut buf = vec![0u8; BLOCK];
                while !stop.load(Ordering::Relaxed) {
                    let r = xorshift(&mut x);
                    let b = r % BLOCKS;
                    gen += 1;
                    // The model lock orders each write against snapshots.
                    let mut m = model.lock();
                    if r.is_multiple_of(11) {
                        h.trim(b * BLOCK as u64, BLOCK as u64, false).unwrap();
                        m.0[b as usize] = 0;
                    } else {
                        let val = if r.is_multiple_of(7) { 0 } else { gen };
                        buf[..4].copy_from_slice(&val.to_le_bytes());
                        h.write_at(&buf, b * BLOCK as u64, r.is_multiple_of(5))
                            .unwrap();
                        m.0[b as usize] = val;
                    }
                }
            })
        })
        .collect();
    let mut x = 99;
    for i in 0..300 {
        let r = xorshift(&mut x);
        let live: Vec<String> = model.lock().1.keys().cloned().collect();
        if live.len() < 2 || (!r.is_multiple_of(3) && live.len() < 6) {
            let name = format!("s{i}");
            let mut m = model.lock();
            pool.create_snapshot("v", &name).unwrap();
            let now = m.0.clone();
            m.1.insert(name, now);
        } else {
            // Deleted while the writers go on.
            let name = &live[(r as usize / 3) % live.len()];
            pool.delete_snapshot("v", name).unwrap();
            let survivors: Vec<(String, Vec<u32>)> = {
                let mut m = model.lock();
                m.1.remove(name);
                m.1.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            };
            for (view, want) in &survivors {
                check(&pool, view, want);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let m = model.lock();
    let check_all = |pool: &Pool| {
        for (view, want) in &m.1 {
            check(pool, view, want);
        }
        check(pool, "", &m.0);
    };
    check_all(&pool);
    // The background collector gets to the end on its own.
    let t = Instant::now();
    while pool.stats().gc_pending_volumes > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "background collection never finished"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    check_all(&pool);
    pool.flush().unwrap();
    drop(pool);
    let pool = Pool::open_medium(Arc::new(medium.kill()), opts).unwrap();
    check_all(&pool);
    assert!(pool.verify().unwrap().damaged.is_empty());
}

/// A partial-block write reads its block under the block's stripe lock; an
/// overwrite in place holds `inplace` shared and takes the stripes of its
/// blocks. When the partial write meets a damaged block it must report the
/// damage, not wait for in-place writers (which would be waiting for its
/// stripe): both threads must keep making progress.
#[test]
fn a_partial_write_to_a_damaged_block_does_not_stall_in_place_writes() {
    let m = MemMedium::new();
    let pool = Pool::open_medium(Arc::new(m.clone()), PoolOptions::default()).unwrap();
    pool.create_volume("v", 4096 * BLOCK as u64).unwrap();
    let h = pool.open_head("v").unwrap();
    // Block 0 lands in data slot 0, which is then damaged.
    h.write_at(&[9; BLOCK], 0, true).unwrap();
    m.corrupt("data", 100);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::new(Default::default());
    let partial = {
        let (h, stop, counts) = (h.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let e = h.write_at(&[1; 100], 10, false).unwrap_err();
                assert_eq!(e.kind(), store::ErrorKind::Corruption);
                counts[0].fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let whole = {
        let (h, stop, counts) = (h.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || {
            let mut v = 0u8;
            while !stop.load(Ordering::Relaxed) {
                v = v.wrapping_add(1).max(1);
                // 512 blocks take every stripe; in place from the second
                // round on (nothing flushes in between).
                h.write_at(&vec![v; 512 * BLOCK], 1024 * BLOCK as u64, false)
                    .unwrap();
                counts[1].fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Both threads must keep going: after 2 s of running, each must still
    // finish operations (a deadlock stops them for good; the generous bound
    // only absorbs a loaded machine).
    std::thread::sleep(Duration::from_secs(2));
    let then = [0, 1].map(|i| counts[i].load(Ordering::Relaxed));
    let start = Instant::now();
    loop {
        let now = [0, 1].map(|i| counts[i].load(Ordering::Relaxed));
        if now[0] > then[0] && now[1] > then[1] {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            // Dropping the pool would wait for its flusher, stuck too.
            std::mem::forget(pool);
            panic!("no progress for 20 s ({now:?} operations done): deadlock");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    partial.join().unwrap();
    whole.join().unwrap();
}

/// Shrinking drops the head's data past the new end while a writer keeps
/// writing there (its writes fail once the size is down); growing back must
/// show zeros past the old end, never a write that raced the shrink.
#[test]
fn data_past_a_shrink_never_comes_back() {
    const SMALL: u64 = 64;
    const BIG: u64 = 128;
    let pool = Pool::open_medium(Arc::new(MemMedium::new()), PoolOptions::default()).unwrap();
    pool.create_volume("v", BIG * BLOCK as u64).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let writer = {
        let (h, stop, pause, paused) = (
            pool.open_head("v").unwrap(),
            stop.clone(),
            pause.clone(),
            paused.clone(),
        );
        std::thread::spawn(move || {
            let mut x = 7u64;
            while !stop.load(Ordering::SeqCst) {
                if pause.load(Ordering::SeqCst) {
                    paused.store(true, Ordering::SeqCst);
                    while pause.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    paused.store(false, Ordering::SeqCst);
                }
                let b = SMALL + xorshift(&mut x) % (BIG - SMALL);
                let _ = h.write_at(&[0xdd; BLOCK], b * BLOCK as u64, false);
            }
        })
    };
    let h = pool.open_head("v").unwrap();
    let mut tail = vec![0u8; ((BIG - SMALL) * BLOCK as u64) as usize];
    for round in 0..200 {
        pool.resize_volume("v", SMALL * BLOCK as u64, true).unwrap();
        pause.store(true, Ordering::SeqCst);
        while !paused.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        pool.resize_volume("v", BIG * BLOCK as u64, false).unwrap();
        h.read_at(&mut tail, SMALL * BLOCK as u64).unwrap();
        let bad = tail.iter().position(|&b| b != 0);
        assert_eq!(bad, None, "round {round}: data past the shrink came back");
        pause.store(false, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
}
