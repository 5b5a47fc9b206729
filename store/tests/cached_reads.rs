//! `Volume::read_at_cached`: a read served only from memory returns exactly
//! what `read_at` returns, and declines (`Ok(false)`) whenever it would have
//! to wait: data not in the page cache, a map page not in memory, a block
//! that fails its checksum.

use std::os::unix::io::AsRawFd;
use store::{ErrorKind, Pool, PoolOptions, BLOCK};

const B: u64 = BLOCK as u64;

/// One xorshift64 step: the next pseudo-random number after `x`.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn pat(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len).map(|_| next(&mut x) as u8).collect()
}

/// Writes back and evicts the data file's pages from the page cache.
fn evict_data(dir: &std::path::Path) {
    let f = std::fs::File::open(dir.join("data")).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on an open descriptor; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise failed");
}

#[test]
fn a_read_from_memory_returns_what_read_at_returns() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    // Whole blocks, an unaligned write across three blocks, a hole, a trim
    // and zeroes; a snapshot, then overwrites only the head sees.
    h.write_at(&pat(1, 64 * BLOCK), 0, false).unwrap();
    h.write_at(&pat(2, 2 * BLOCK + 100), 70 * B + 1000, false)
        .unwrap();
    h.trim(10 * B, 4 * B, false).unwrap();
    h.write_zeroes(20 * B, 3 * B, true, false).unwrap();
    pool.create_snapshot("v", "s").unwrap();
    h.write_at(&pat(3, 8 * BLOCK), 4 * B, false).unwrap();
    h.write_at(&pat(4, 333), 71 * B + 7, false).unwrap();
    let s = pool.open_snapshot("v", "s").unwrap();

    let ranges: &[(u64, usize)] = &[
        (0, BLOCK),
        (5 * B, BLOCK),
        (3 * B + 17, 3 * BLOCK),
        (9 * B, 6 * BLOCK),
        (19 * B + 4095, 2),
        (0, 80 * BLOCK),
        (70 * B + 999, 2 * BLOCK + 300),
        (100 * B, 5 * BLOCK),
        ((8 << 20) - 10, 10),
    ];
    for (name, vol) in [("head", &h), ("snapshot", &s)] {
        for &(off, len) in ranges {
            let mut want = vec![0u8; len];
            vol.read_at(&mut want, off).unwrap();
            let mut got = vec![0xeeu8; len];
            assert!(
                vol.read_at_cached(&mut got, off).unwrap(),
                "{name}: {off}+{len} declined with everything in memory"
            );
            assert!(got == want, "{name}: {off}+{len} differs from read_at");
        }
    }
    // The same errors as read_at: past the end.
    let e = h.read_at_cached(&mut [0u8; 2], (8 << 20) - 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
}

#[test]
fn data_not_in_the_page_cache_is_left_to_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    let data = pat(5, 256 * BLOCK);
    h.write_at(&data, 0, false).unwrap();
    h.flush().unwrap();
    evict_data(dir.path());

    let mut buf = vec![0u8; 16 * BLOCK];
    assert!(!h.read_at_cached(&mut buf, 32 * B).unwrap());
    // A hole needs no data: served from memory.
    let mut hole = vec![1u8; BLOCK];
    assert!(h.read_at_cached(&mut hole, 1000 * B).unwrap());
    assert!(hole.iter().all(|&b| b == 0));
    // read_at brings the data in; then it is served from memory.
    h.read_at(&mut buf, 32 * B).unwrap();
    assert!(buf[..] == data[32 * BLOCK..48 * BLOCK]);
    let mut again = vec![0u8; 16 * BLOCK];
    assert!(h.read_at_cached(&mut again, 32 * B).unwrap());
    assert!(again == buf);
}

/// Options with map pages of 16 entries and room for very few of them.
fn small_map() -> PoolOptions {
    PoolOptions {
        map_page_entries: 16,
        map_cache_bytes: 8 << 10,
        ..PoolOptions::default()
    }
}

/// A pool in `dir` whose volume "v" has `blocks` blocks, each written
/// (`pat(b)`) and flushed, then closed: many map pages.
fn many_pages(dir: &std::path::Path, blocks: u64) {
    let pool = Pool::open(dir, small_map()).unwrap();
    pool.create_volume("v", blocks * B).unwrap();
    let h = pool.open_head("v").unwrap();
    for b in 0..blocks {
        h.write_at(&pat(b, BLOCK), b * B, false).unwrap();
    }
    h.flush().unwrap();
}

#[test]
fn a_map_page_not_in_memory_is_left_to_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, blocks) = (small_map(), 2048);
    many_pages(dir.path(), blocks);
    let pool = Pool::open(dir.path(), opts).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; BLOCK];
    // Read the whole volume: the early pages are evicted by the later ones.
    for b in 0..blocks {
        h.read_at(&mut buf, b * B).unwrap();
    }
    assert!(!h.read_at_cached(&mut buf, 3 * B).unwrap());
    h.read_at(&mut buf, 3 * B).unwrap();
    assert!(buf == pat(3, BLOCK));
    let mut again = vec![0u8; BLOCK];
    assert!(h.read_at_cached(&mut again, 3 * B).unwrap());
    assert!(again == buf);
}

#[test]
fn a_damaged_block_is_left_to_read_at_which_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = pat(9, 4 * BLOCK);
    {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        pool.open_head("v")
            .unwrap()
            .write_at(&data, 0, true)
            .unwrap();
    }
    let path = dir.path().join("data");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .chunks(BLOCK)
        .position(|c| c == &data[2 * BLOCK..3 * BLOCK])
        .unwrap()
        * BLOCK;
    bytes[at + 9] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; 4 * BLOCK];
    // Bytes written just now are in the page cache: only the checksum
    // makes it decline.
    assert!(!h.read_at_cached(&mut buf, 0).unwrap());
    let e = h.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert!(e.to_string().contains("offset 8192"), "{e}");
    let mut one = vec![0u8; BLOCK];
    assert!(h.read_at_cached(&mut one, B).unwrap());
    assert!(one[..] == data[BLOCK..2 * BLOCK]);
}

#[test]
fn a_read_over_blocks_lost_with_a_damaged_map_page_is_left_to_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, blocks) = (small_map(), 2048);
    many_pages(dir.path(), blocks);
    // Damage one map page slot in the middle of the meta file.
    let meta = dir.path().join("meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let s = bytes.len() / 16384 / 2;
    bytes[s * 16384..(s + 1) * 16384].fill(0x5a);
    std::fs::write(&meta, &bytes).unwrap();

    let pool = Pool::open(dir.path(), opts).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; BLOCK];
    let lost: Vec<u64> = (0..blocks)
        .filter(|&b| h.read_at(&mut buf, b * B).is_err())
        .collect();
    assert!(!lost.is_empty());
    // One lost block written again reads back through read_at; a read from
    // memory there would have to look up the map (maybe from the disk) to
    // tell it from the lost ones, so it declines, without reading a page.
    let b0 = lost[0];
    h.write_at(&pat(b0 + 7, BLOCK), b0 * B, false).unwrap();
    for b in [b0, lost[1], *lost.last().unwrap()] {
        let loads = pool.stats().map_page_loads;
        assert!(!h.read_at_cached(&mut buf, b * B).unwrap());
        assert_eq!(pool.stats().map_page_loads, loads, "block {b}");
    }
    h.read_at(&mut buf, b0 * B).unwrap();
    assert!(buf == pat(b0 + 7, BLOCK));
    assert_eq!(
        h.read_at(&mut buf, lost[1] * B).unwrap_err().kind(),
        ErrorKind::Corruption
    );
    // Away from the damage, reads from memory go on.
    let far = if b0 > 100 { 0 } else { blocks - 1 };
    h.read_at(&mut buf, far * B).unwrap();
    assert!(h.read_at_cached(&mut buf, far * B).unwrap());
    assert!(buf == pat(far, BLOCK));
}

/// Version `v` of block `b`: names both in its first 16 bytes.
fn version(b: u64, v: u64) -> Vec<u8> {
    let mut x = pat(b * 1_000_003 + v, BLOCK);
    x[..8].copy_from_slice(&b.to_le_bytes());
    x[8..16].copy_from_slice(&v.to_le_bytes());
    x
}

#[test]
fn reads_from_memory_beside_writers_see_whole_versions_only() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let pool = Arc::new(Pool::open(dir.path(), PoolOptions::default()).unwrap());
    let nb = 64u64;
    pool.create_volume("v", nb * B).unwrap();
    let h = Arc::new(pool.open_head("v").unwrap());
    for b in 0..nb {
        h.write_at(&version(b, 0), b * B, false).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    // Overwrites (in place and redirect-on-write), flushes that make freed
    // slots reusable, trims, snapshots made and deleted.
    let writer = {
        let (h, stop, pool) = (h.clone(), stop.clone(), pool.clone());
        std::thread::spawn(move || {
            let (mut v, mut x) = (1u64, 12345u64);
            while !stop.load(Ordering::Relaxed) {
                next(&mut x);
                let b = x % nb;
                let n = (1 + (x >> 20) % 4).min(nb - b);
                match (x >> 40) % 16 {
                    0 => h.flush().unwrap(),
                    1 => h.trim(b * B, n * B, false).unwrap(),
                    2 => {
                        pool.create_snapshot("v", &format!("s{v}")).unwrap();
                    }
                    3 => {
                        let _ = pool.delete_snapshot("v", &format!("s{}", v.saturating_sub(30)));
                    }
                    _ => {
                        let data: Vec<u8> = (0..n).flat_map(|k| version(b + k, v)).collect();
                        h.write_at(&data, b * B, false).unwrap();
                    }
                }
                v += 1;
            }
        })
    };
    let reader = {
        let (h, stop, served) = (h.clone(), stop.clone(), served.clone());
        std::thread::spawn(move || {
            let mut x = 999u64;
            let mut buf = vec![0u8; 8 * BLOCK];
            while !stop.load(Ordering::Relaxed) {
                next(&mut x);
                let b = x % nb;
                let n = (1 + (x >> 20) % 8).min(nb - b) as usize;
                if !h.read_at_cached(&mut buf[..n * BLOCK], b * B).unwrap() {
                    continue;
                }
                served.fetch_add(1, Ordering::Relaxed);
                for (k, got) in buf[..n * BLOCK].chunks(BLOCK).enumerate() {
                    let b = b + k as u64;
                    let v = u64::from_le_bytes(got[8..16].try_into().unwrap());
                    assert!(
                        got.iter().all(|&x| x == 0) || got == version(b, v),
                        "block {b}: not one whole version"
                    );
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    reader.join().unwrap();
    assert!(served.load(Ordering::Relaxed) > 1000);
}

#[test]
fn large_reads_beside_in_place_overwrites_never_fail() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let nb = 256u64;
    pool.create_volume("v", 16 << 20).unwrap();
    let h = Arc::new(pool.open_head("v").unwrap());
    for b in 0..nb {
        h.write_at(&version(b, 0), b * B, false).unwrap();
    }
    // No flush from here on: every overwrite is in place, so a read that
    // located a block just before it may find its new bytes under the old
    // checksum and must read again rather than fail.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (h, stop) = (h.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut v, mut x) = (1u64, 7u64);
            while !stop.load(Ordering::Relaxed) {
                next(&mut x);
                let b = x % nb;
                h.write_at(&version(b, v), b * B, false).unwrap();
                v += 1;
            }
        })
    };
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (h, stop, reads) = (h.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; nb as usize * BLOCK];
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = h.read_at(&mut buf, 0) {
                        stop.store(true, Ordering::Relaxed);
                        panic!("a read beside overwrites failed: {e}");
                    }
                    for (b, got) in buf.chunks(BLOCK).enumerate() {
                        let v = u64::from_le_bytes(got[8..16].try_into().unwrap());
                        assert!(
                            got == version(b as u64, v),
                            "block {b}: not one whole version"
                        );
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 100);
}
