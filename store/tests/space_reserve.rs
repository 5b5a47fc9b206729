//! The space reserve's guard: while the reserve file is not in place at
//! its size, writes that need new filesystem space keep that size free.
//! A medium whose free space the test sets stands for the filesystem.

mod common;

use common::{Limited, Limits};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use store::{ErrorKind, Medium, MemMedium, Pool, PoolOptions, BLOCK};

const B: u64 = BLOCK as u64;
const MIB: u64 = 1 << 20;

/// A pool on `m` whose filesystem has `free` bytes free.
fn open(m: &MemMedium, free: &Arc<AtomicU64>, opts: PoolOptions) -> Arc<Pool> {
    let mut limits = Limits::new(libc::ENOSPC);
    limits.free = free.clone();
    let medium = Limited {
        m: m.clone(),
        limits,
    };
    Pool::open_medium(Arc::new(medium), opts).unwrap()
}

fn data_len(m: &MemMedium) -> u64 {
    m.open("data", false).unwrap().len().unwrap()
}

/// With the reserve missing (too little room to build it), small writes
/// reuse free slots of the data file while new data is refused; a large
/// write is refused too, though free slots exist (large writes never take
/// scattered ones, so they need new space).
#[test]
fn new_data_keeps_the_reserve_free_while_it_is_missing() {
    let m = MemMedium::new();
    let free = Arc::new(AtomicU64::new(20 * MIB)); // < 2 × 16 MiB: not built
    let pool = open(&m, &free, PoolOptions::default());
    assert_eq!(pool.stats().space_reserve_bytes, 0);
    pool.create_volume("a", 64 * MIB).unwrap();
    let h = pool.open_head("a").unwrap();
    // 2 MiB written and flushed, then overwritten block by block and
    // flushed: its first slots become free slots of the data file.
    h.write_at(&vec![0x11; 2 * MIB as usize], 0, false).unwrap();
    h.flush().unwrap();
    for i in 0..512u64 {
        h.write_at(&[0x22; BLOCK], i * B, false).unwrap();
    }
    h.flush().unwrap();
    h.flush().unwrap();
    free.store(16 * MIB + 64 * 1024, Ordering::SeqCst);
    // Overwrites reuse the freed slots: no new space, not refused.
    for i in 0..8u64 {
        h.write_at(&[0x33; BLOCK], i * B, false).unwrap();
    }
    let before = data_len(&m);
    let e = h
        .write_at(&vec![0x44; MIB as usize], 20 * MIB, false)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(e.to_string().contains("space reserve"), "{e}");
    assert_eq!(data_len(&m), before, "the refused write took space");
    // Room again: written.
    free.store(40 * MIB, Ordering::SeqCst);
    h.write_at(&vec![0x44; MIB as usize], 20 * MIB, false)
        .unwrap();
    let mut buf = vec![0u8; MIB as usize];
    h.read_at(&mut buf, 20 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x44));
}

/// A reserve larger than the setting (left from an earlier, larger one)
/// holds the room as well: writes are not refused.
#[test]
fn a_larger_reserve_in_place_counts_as_held() {
    let m = MemMedium::new();
    let free = Arc::new(AtomicU64::new(1 << 40));
    let pool = open(&m, &free, PoolOptions::default());
    assert_eq!(pool.stats().space_reserve_bytes, 16 * MIB);
    pool.create_volume("a", 64 * MIB).unwrap();
    drop(pool);
    free.store(8 * MIB + 2048, Ordering::SeqCst);
    let opts = PoolOptions {
        space_reserve_bytes: 8 * MIB,
        ..PoolOptions::default()
    };
    let pool = open(&m, &free, opts);
    assert_eq!(pool.stats().space_reserve_bytes, 16 * MIB);
    let h = pool.open_head("a").unwrap();
    h.write_at(&[0x33; BLOCK], 0, false).unwrap();
}
