//! `Volume::read_at_cached`: a read served only from memory returns exactly
//! what `read_at` returns, and declines (`Ok(false)`) whenever it would have
//! to wait: data not in the page cache, a map page not in memory, a block
//! that fails its checksum.

use std::os::unix::io::AsRawFd;
use store::{ErrorKind, Pool, PoolOptions, BLOCK};

const B: u64 = BLOCK as u64;

fn pat(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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

#[test]
fn a_map_page_not_in_memory_is_left_to_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        map_page_entries: 16,
        // Room for very few pages of 16 entries.
        map_cache_bytes: 8 << 10,
        ..PoolOptions::default()
    };
    let blocks = 2048u64;
    {
        let pool = Pool::open(dir.path(), opts.clone()).unwrap();
        pool.create_volume("v", blocks * B).unwrap();
        let h = pool.open_head("v").unwrap();
        for b in 0..blocks {
            h.write_at(&pat(b, BLOCK), b * B, false).unwrap();
        }
        h.flush().unwrap();
    }
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
