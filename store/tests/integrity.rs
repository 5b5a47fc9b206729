//! Corruption is reported, never returned as data; space comes back after
//! snapshot deletion; bad input gets typed errors.

use std::os::unix::fs::MetadataExt;
use store::{ErrorKind, Pool, PoolOptions, BLOCK};

fn pat(b: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (b as usize * 7 + i / 64) as u8 | 0x80)
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.chunks(BLOCK)
        .position(|c| c == needle)
        .map(|i| i * BLOCK)
}

#[test]
fn flipped_data_bytes_are_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        let h = pool.open_head("v").unwrap();
        for b in 0..16 {
            h.write_at(&pat(b), b * BLOCK as u64, false).unwrap();
        }
        pool.create_snapshot("v", "s1").unwrap();
        h.write_at(&pat(100), 0, true).unwrap();
    }
    let data_path = dir.path().join("data");
    let mut bytes = std::fs::read(&data_path).unwrap();
    let at5 = find(&bytes, &pat(5)).unwrap();
    let at0 = find(&bytes, &pat(0)).unwrap(); // only the snapshot sees it
    bytes[at5 + 100] ^= 1;
    bytes[at0 + 4000] ^= 0x40;
    std::fs::write(&data_path, &bytes).unwrap();

    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; BLOCK];
    let e = h.read_at(&mut buf, 5 * BLOCK as u64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert!(e.to_string().contains("offset 20480"), "{e}");
    // A read spanning the damage fails as a whole; neighbours read fine.
    assert!(h
        .read_at(&mut vec![0u8; 3 * BLOCK], 4 * BLOCK as u64)
        .is_err());
    h.read_at(&mut buf, 4 * BLOCK as u64).unwrap();
    assert_eq!(buf, pat(4));
    h.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pat(100));
    let s = pool.open_snapshot("v", "s1").unwrap();
    assert_eq!(
        s.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corruption
    );
    s.read_at(&mut buf, 6 * BLOCK as u64).unwrap();
    assert_eq!(buf, pat(6));

    let report = pool.verify().unwrap();
    let mut found: Vec<(Option<String>, u64)> = report
        .damaged
        .iter()
        .map(|d| (d.snapshot.clone(), d.offset))
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![(None, 5 * BLOCK as u64), (Some("s1".into()), 0)]
    );
    assert!(report.blocks_checked >= 17);

    // Rewriting a damaged block heals the head.
    h.write_at(&pat(5), 5 * BLOCK as u64, true).unwrap();
    h.read_at(&mut buf, 5 * BLOCK as u64).unwrap();
    assert_eq!(buf, pat(5));
}

#[test]
fn flipped_metadata_bytes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 10_000u64;
    {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        pool.create_volume("a", nblocks * BLOCK as u64).unwrap();
        pool.create_volume("b", 1 << 20).unwrap();
        let a = pool.open_head("a").unwrap();
        for blk in 0..nblocks {
            a.write_at(&pat(blk), blk * BLOCK as u64, false).unwrap();
        }
        pool.open_head("b")
            .unwrap()
            .write_at(&pat(1), 0, true)
            .unwrap();
        pool.create_snapshot("a", "s").unwrap();
    }
    // Reopening writes a checkpoint: the map (10 000 entries of "a") in
    // pages of the meta file; damage one byte of a page in the middle.
    drop(Pool::open(dir.path(), PoolOptions::default()).unwrap());
    let ck = dir.path().join("checkpoint");
    let meta = dir.path().join("meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let pages = bytes.len() / 16384;
    assert!(pages >= 10, "{pages} pages");
    bytes[pages / 2 * 16384 + 100] ^= 0x01;
    std::fs::write(&meta, &bytes).unwrap();

    // The pool opens; the blocks the damaged page described read as errors,
    // everything else reads.
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let a = pool.open_head("a").unwrap();
    let s = pool.open_snapshot("a", "s").unwrap();
    let mut buf = vec![0u8; BLOCK];
    let mut bad = Vec::new();
    for blk in 0..nblocks {
        match a.read_at(&mut buf, blk * BLOCK as u64) {
            Ok(()) => assert_eq!(buf, pat(blk), "block {blk}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
                assert!(s.read_at(&mut buf, blk * BLOCK as u64).is_err());
                bad.push(blk);
            }
        }
    }
    assert!(
        (1..=640).contains(&bad.len()),
        "one page's blocks are lost: {}",
        bad.len()
    );
    assert_eq!(
        bad.last().unwrap() - bad[0] + 1,
        bad.len() as u64,
        "one contiguous run"
    );
    let b = pool.open_head("b").unwrap();
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pat(1));
    // Block status shows them as data, so copy tools read them (and fail)
    // instead of skipping them as holes.
    let ex = a.extents(bad[0] * BLOCK as u64, BLOCK as u64).unwrap();
    assert_eq!(ex[0].kind, store::ExtentKind::Data);
    // verify names the lost range.
    let report = pool.verify().unwrap();
    assert!(
        report
            .damaged
            .iter()
            .any(|d| d.volume == "a" && d.offset == bad[0] * BLOCK as u64),
        "{:?}",
        report.damaged
    );
    // Rewriting a block heals the head (the snapshot stays damaged), and
    // that survives a reopen.
    a.write_at(&pat(7), bad[0] * BLOCK as u64, true).unwrap();
    drop((a, s, b));
    drop(pool);
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let a = pool.open_head("a").unwrap();
    a.read_at(&mut buf, bad[0] * BLOCK as u64).unwrap();
    assert_eq!(buf, pat(7));
    assert!(a.read_at(&mut buf, (bad[0] + 1) * BLOCK as u64).is_err());
    let s = pool.open_snapshot("a", "s").unwrap();
    assert!(s.read_at(&mut buf, bad[0] * BLOCK as u64).is_err());
    drop((a, s));
    drop(pool);

    // Damage in the root (the volume records at the start) cannot be
    // skipped: the pool refuses to open and says why.
    let mut bytes = std::fs::read(&ck).unwrap();
    bytes[40] ^= 0x01;
    std::fs::write(&ck, &bytes).unwrap();
    let e = Pool::open(dir.path(), PoolOptions::default())
        .err()
        .expect("damaged metadata must not open silently");
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert!(e.to_string().contains("checkpoint"), "{e}");
}

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn space_comes_back_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    // Deletion collects one batch (at most 16 map entries) and leaves the
    // rest, about 500 batches, to the background collector.
    let opts = PoolOptions {
        reuse_reserve_bytes: 0,
        reuse_reserve_percent: 0,
        map_page_entries: 16,
        gc_foreground: std::time::Duration::ZERO,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir.path(), opts).unwrap();
    pool.create_volume("v", 16 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    let write_all = |tag: u8| {
        for m in 0..16u64 {
            h.write_at(&vec![tag; 1 << 20], m << 20, false).unwrap();
        }
    };
    write_all(1);
    pool.create_snapshot("v", "a").unwrap();
    write_all(2);
    pool.flush().unwrap();
    let data = dir.path().join("data");
    assert!(allocated(&data) >= 32 << 20);
    pool.delete_snapshot("v", "a").unwrap();
    // Nothing but the background thread collects and flushes from here.
    let t = std::time::Instant::now();
    loop {
        let (pending, now) = (pool.stats().gc_pending_volumes, allocated(&data));
        if pending == 0 && now <= (16 << 20) + (1 << 20) {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "space not back: {now} bytes, {pending} volumes to collect"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut buf = vec![0u8; 16 << 20];
    h.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

#[test]
fn space_comes_back_after_snapshot_deletion() {
    let dir = tempfile::tempdir().unwrap();
    // No reuse reserve: every freed block is given back at once.
    let opts = PoolOptions {
        reuse_reserve_bytes: 0,
        reuse_reserve_percent: 0,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir.path(), opts).unwrap();
    pool.create_volume("v", 64 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    let mb: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let write_all = |tag: u8| {
        for m in 0..32u64 {
            let mut d = mb.clone();
            d[0] = tag;
            h.write_at(&d, m << 20, false).unwrap();
        }
    };
    write_all(1);
    pool.create_snapshot("v", "a").unwrap();
    write_all(2);
    pool.create_snapshot("v", "b").unwrap();
    write_all(3);
    pool.flush().unwrap();
    let data = dir.path().join("data");
    let full = allocated(&data);
    assert!(full >= 96 << 20, "three generations stored: {full}");
    // Deleting the middle snapshot frees its generation only.
    pool.delete_snapshot("v", "b").unwrap();
    pool.flush().unwrap();
    let after_b = allocated(&data);
    assert!(
        after_b <= (64 << 20) + (4 << 20),
        "after deleting b: {after_b}"
    );
    let a = pool.open_snapshot("v", "a").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    a.read_at(&mut buf, 7 << 20).unwrap();
    assert_eq!(buf[0], 1);
    pool.delete_snapshot("v", "a").unwrap();
    pool.flush().unwrap();
    let live = 32u64 << 20;
    let end = allocated(&data);
    assert!(
        end <= live + live / 10 + (64 << 20),
        "after deleting all: {end}"
    );
    assert!(end <= live + (4 << 20), "reclaim is exact here: {end}");
    h.read_at(&mut buf, 31 << 20).unwrap();
    assert_eq!(buf[0], 3);
    // Trim gives space back too.
    h.trim(0, 16 << 20, false).unwrap();
    pool.flush().unwrap();
    assert!(allocated(&data) <= (16 << 20) + (4 << 20));
    // Freed space is reused before the file grows.
    let high = pool.stats().data_slots_high;
    write_all(4);
    pool.flush().unwrap();
    assert_eq!(pool.stats().data_slots_high, high);
    // Everything in the directory (data, map pages, journal, root) stays
    // within the bound too, also after a reopen rewrote the map.
    drop((h, a));
    drop(pool);
    drop(Pool::open(dir.path(), PoolOptions::default()).unwrap());
    let total: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| allocated(&e.unwrap().path()))
        .sum();
    let meta = allocated(&dir.path().join("meta"));
    assert!(meta <= live / 50, "map pages: {meta} bytes");
    assert!(
        total <= live + live / 10 + (64 << 20),
        "directory holds {total} bytes"
    );
}

/// Bytes allocated by the files of a pool directory: (all, journals).
fn pool_usage(dir: &std::path::Path) -> (u64, u64) {
    let (mut total, mut journals) = (0, 0);
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let n = allocated(&e.path());
        total += n;
        if e.file_name().to_string_lossy().starts_with("journal") {
            journals += n;
        }
    }
    (total, journals)
}

/// With the default options, the whole pool directory holds at most the
/// live data + 10% + 64 MiB: after heavy overwrites and snapshots that are
/// then deleted, and after heavy overwrites (which fill the reuse reserve
/// and the journal) once flushed.
#[test]
fn the_default_pool_stays_within_its_space_bound() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let live: u64 = 256 << 20;
    let bound = live + live / 10 + (64 << 20);
    pool.create_volume("v", live).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut mb = vec![0u8; 1 << 20];
    for m in 0..live >> 20 {
        rng.fill(&mut mb[..]);
        h.write_at(&mb, m << 20, false).unwrap();
    }
    let mut blk = vec![0u8; BLOCK];
    let mut random_writes = |n: usize| {
        for _ in 0..n {
            rng.fill(&mut blk[..]);
            h.write_at(&blk, rng.gen_range(0..live / 4096) * 4096, false)
                .unwrap();
        }
    };
    random_writes(300_000);
    pool.create_snapshot("v", "a").unwrap();
    random_writes(20_000);
    pool.create_snapshot("v", "b").unwrap();
    for m in 0..live >> 21 {
        h.write_at(&mb, m << 20, false).unwrap();
    }
    pool.delete_snapshot("v", "a").unwrap();
    pool.delete_snapshot("v", "b").unwrap();
    pool.reclaim_space().unwrap();
    let (total, journals) = pool_usage(dir.path());
    let meta = allocated(&dir.path().join("meta"));
    // One preallocated 4 MiB chunk of a fresh journal.
    assert!(
        journals <= 4 << 20,
        "the journal was not folded: {journals} bytes"
    );
    assert!(meta <= live / 40, "map pages: {meta} bytes");
    assert!(total <= bound, "after deletions: {total} bytes");
    random_writes(400_000);
    pool.flush().unwrap();
    let (total, journals) = pool_usage(dir.path());
    assert!(journals <= 32 << 20, "journal: {journals} bytes");
    assert!(total <= bound, "after overwrites: {total} bytes");
}

/// Live data of a pool: the data blocks its volumes' heads map.
fn live_bytes(pool: &Pool) -> u64 {
    pool.volumes().iter().map(|v| v.allocated_bytes).sum()
}

/// Trimming a large volume leaves its map pages stale in the meta file
/// (the durable root still uses them) and a journal of trims; once writes
/// pause, the background flusher folds both into a checkpoint, so the pool
/// comes back within live data + 10% + 64 MiB without anybody asking.
#[test]
fn stale_map_pages_and_journal_come_back_once_writes_pause() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut mb = vec![0u8; 1 << 20];
    {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        for (name, mib) in [("v", 64u64), ("z", 2400)] {
            pool.create_volume(name, mib << 20).unwrap();
            let h = pool.open_head(name).unwrap();
            for m in 0..mib {
                rng.fill(&mut mb[..]);
                h.write_at(&mb, m << 20, false).unwrap();
            }
        }
        pool.flush().unwrap();
    }
    // The reopen's checkpoint puts every map page in the meta file.
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let h = pool.open_head("v").unwrap();
    let mut blk = vec![0u8; BLOCK];
    for i in 0..60_000u64 {
        rng.fill(&mut blk[..]);
        h.write_at(&blk, rng.gen_range(0..(64 << 20) / 4096) * 4096, false)
            .unwrap();
        if i % 9000 == 0 {
            pool.flush().unwrap();
        }
    }
    pool.open_head("z")
        .unwrap()
        .trim(0, 2400 << 20, false)
        .unwrap();
    pool.flush().unwrap();
    let live = live_bytes(&pool);
    assert_eq!(live, 64 << 20);
    let bound = live + live / 10 + (64 << 20);
    let t = std::time::Instant::now();
    let mut total = pool_usage(dir.path()).0;
    while total > bound && t.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        total = pool_usage(dir.path()).0;
    }
    assert!(
        total <= bound,
        "{total} bytes for {live} bytes of live data"
    );
}

/// Deleting a volume gives back its map pages too, at once.
#[test]
fn a_deleted_volume_leaves_no_map_pages() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 16 << 20).unwrap();
    pool.open_head("v")
        .unwrap()
        .write_at(&vec![0x5a; 16 << 20], 0, false)
        .unwrap();
    pool.create_volume("z", 8 << 30).unwrap();
    // Provisioned zeros: map entries, no data.
    pool.open_head("z")
        .unwrap()
        .write_zeroes(0, 8 << 30, true, false)
        .unwrap();
    pool.flush().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let before = allocated(&dir.path().join("meta"));
    assert!(before > 64 << 20, "the map pages are on disk: {before}");
    pool.delete_volume("z").unwrap();
    let (total, _) = pool_usage(dir.path());
    let live = live_bytes(&pool);
    assert!(
        total <= live + live / 10 + (64 << 20),
        "{total} bytes for {live} bytes of live data"
    );
}

/// A volume deleted while some of its map pages are patches (their old
/// slot plus a few changes): the checkpoint run by the deletion's flush
/// does not write them back, since the volume has left the pool, so it
/// must not free their old slots either; the map is read after it, and a
/// page it cannot put together would leak its data slots until reopening.
#[test]
fn deleting_a_volume_with_patched_map_pages_gives_back_all_its_space() {
    let opts = PoolOptions {
        // Any flush checkpoints.
        journal_limit: 1,
        map_page_entries: 16,
        map_cache_bytes: 16 << 10,
        ..PoolOptions::default()
    };
    let pool = Pool::open_medium(std::sync::Arc::new(store::MemMedium::new()), opts).unwrap();
    pool.create_volume("a", 64 << 20).unwrap();
    let h = pool.open_head("a").unwrap();
    let n = 2048u64;
    for i in 0..n {
        h.write_at(&pat(i)[..BLOCK], i * BLOCK as u64, false)
            .unwrap();
    }
    h.flush().unwrap();
    // One overwrite in each of 14 pages far apart: past the dirty-page
    // budget they become patches.
    for k in 0..14u64 {
        h.write_at(&[0xee; BLOCK], k * 64 * BLOCK as u64, false)
            .unwrap();
    }
    assert!(pool.stats().map_patch_bytes > 0, "{:?}", pool.stats());
    // Other reads evict the patched pages from the cache.
    let mut buf = vec![0u8; BLOCK];
    for i in (1024..n).step_by(8) {
        h.read_at(&mut buf, i * BLOCK as u64).unwrap();
    }
    drop(h);
    pool.delete_volume("a").unwrap();
    pool.flush().unwrap();
    pool.reclaim_space().unwrap();
    let st = pool.stats();
    assert_eq!(
        st.data_slots_high - st.free_slots - st.pending_slots,
        0,
        "data slots of the deleted volume leaked: {st:?}"
    );
}

#[test]
fn bad_input_gets_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    for bad in [
        "",
        "a/b",
        "a@b",
        "x\ny",
        ".",
        "..",
        " v",
        "v ",
        "v\u{200B}",
        "\u{202E}v",
        "a\u{FEFF}b",
    ] {
        assert_eq!(
            pool.create_volume(bad, 1 << 20).unwrap_err().kind(),
            ErrorKind::InvalidName,
            "{bad:?}"
        );
    }
    assert_eq!(
        pool.create_volume("v", 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        pool.create_volume("v", 1000).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        pool.create_volume("v", 1 << 60).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    pool.create_volume("v", 64 << 40).unwrap();
    assert_eq!(
        pool.create_volume("v", 1 << 20).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let h = pool.open_head("v").unwrap();
    let mut b = [0u8; 10];
    assert_eq!(
        h.read_at(&mut b, (64 << 40) - 5).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        h.write_at(&b, u64::MAX - 3, false).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        h.trim(u64::MAX, 2, false).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    h.write_at(b"end", (64 << 40) - 3, true).unwrap();
    assert_eq!(
        pool.open_snapshot("v", "nope").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pool.open_head("nope").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    pool.create_snapshot("v", "s").unwrap();
    let s = pool.open_snapshot("v", "s").unwrap();
    assert_eq!(
        s.write_at(b"x", 0, false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        s.trim(0, 4096, false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    // Shrinking needs consent.
    assert_eq!(
        pool.resize_volume("v", 1 << 20, false).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    pool.resize_volume("v", 1 << 20, true).unwrap();
    pool.resize_volume("v", 2 << 20, false).unwrap();
    // The shrunk-away tail reads as zeros after growing again.
    let mut t = [1u8; 3];
    h.read_at(&mut t, (1 << 20) + 5).unwrap();
    assert_eq!(t, [0; 3]);
    // The snapshot keeps its own size and data.
    assert_eq!(s.size(), 64 << 40);
    s.read_at(&mut t, (64 << 40) - 3).unwrap();
    assert_eq!(&t, b"end");
    // A second opener of the same directory is refused.
    assert_eq!(
        Pool::open(dir.path(), PoolOptions::default())
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Locked
    );
    // A deleted snapshot's handle errors instead of reading stale data.
    pool.delete_snapshot("v", "s").unwrap();
    assert_eq!(s.read_at(&mut t, 0).unwrap_err().kind(), ErrorKind::Deleted);
    pool.delete_volume("v").unwrap();
    assert_eq!(h.read_at(&mut t, 0).unwrap_err().kind(), ErrorKind::Deleted);
}

#[test]
fn reuse_reserve_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        reuse_reserve_bytes: 4 << 20,
        reuse_reserve_percent: 0,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir.path(), opts).unwrap();
    pool.create_volume("v", 64 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    let mb = vec![0x11u8; 1 << 20];
    for m in 0..32u64 {
        h.write_at(&mb, m << 20, false).unwrap();
    }
    pool.create_snapshot("v", "a").unwrap();
    for m in 0..32u64 {
        h.write_at(&mb[..1 << 19], m << 20, false).unwrap();
    }
    pool.delete_snapshot("v", "a").unwrap();
    pool.flush().unwrap();
    let end = allocated(&dir.path().join("data"));
    assert!(
        end <= (32 << 20) + (4 << 20) + (1 << 20),
        "reserve exceeded: {end}"
    );
}

#[test]
fn reopening_keeps_the_reuse_reserve_and_punches_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = |reserve: u64| PoolOptions {
        reuse_reserve_bytes: reserve,
        reuse_reserve_percent: 0,
        ..PoolOptions::default()
    };
    {
        let pool = Pool::open(dir.path(), opts(4 << 20)).unwrap();
        pool.create_volume("v", 32 << 20).unwrap();
        let h = pool.open_head("v").unwrap();
        for m in 0..32u64 {
            h.write_at(&vec![1u8; 1 << 20], m << 20, false).unwrap();
        }
        pool.flush().unwrap();
        // 2 MiB of scattered 4 KiB overwrites: the slots they free fit the
        // 4 MiB reserve and stay allocated.
        for b in (0..32u64 << 8).step_by(16) {
            h.write_at(&[2u8; 4096], b * 4096, false).unwrap();
        }
        pool.flush().unwrap();
        assert_eq!(pool.stats().free_slots, 512);
        assert_eq!(allocated(&data), 34 << 20);
    }
    // The same reserve: nothing is punched (a punch of each scattered slot
    // would split the page-cache folios around it).
    let pool = Pool::open(dir.path(), opts(4 << 20)).unwrap();
    assert_eq!(pool.stats().free_slots, 512);
    assert_eq!(allocated(&data), 34 << 20);
    drop(pool);
    // Smaller reserves: the excess goes back to the filesystem.
    for (reserve, left) in [(1u64 << 20, 33u64 << 20), (0, 32 << 20)] {
        let pool = Pool::open(dir.path(), opts(reserve)).unwrap();
        // (Plus the filesystem's extent blocks for the new holes.)
        let now = allocated(&data);
        assert!(
            (left..left + (64 << 10)).contains(&now),
            "reserve {reserve}: {now} bytes allocated, want {left}"
        );
        let h = pool.open_head("v").unwrap();
        let mut buf = vec![0u8; 32 << 20];
        h.read_at(&mut buf, 0).unwrap();
        for (b, blk) in buf.chunks(4096).enumerate() {
            let want = if b % 16 == 0 { 2 } else { 1 };
            assert!(blk.iter().all(|&x| x == want), "block {b}");
        }
    }
}

#[test]
fn damaged_journal_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        let h = pool.open_head("v").unwrap();
        for b in 0..8 {
            h.write_at(&pat(b), b * BLOCK as u64, false).unwrap();
            pool.flush().unwrap();
        }
    }
    let journal = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal.")
        })
        .unwrap();
    let mut bytes = std::fs::read(&journal).unwrap();
    // Inside the first update record, well before the later flush markers.
    bytes[60] ^= 0x08;
    std::fs::write(&journal, &bytes).unwrap();
    let e = Pool::open(dir.path(), PoolOptions::default())
        .err()
        .expect("a damaged journal must not silently drop acknowledged writes");
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert!(e.to_string().contains("journal"), "{e}");
}

/// A pool of the earlier, unpaged format is refused with a message that
/// says so, not reported as damage.
#[test]
fn an_unpaged_pool_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    // The earlier begin record: type 10, journal id, next volume id, seq.
    let mut payload = vec![10u8];
    payload.extend_from_slice(&2u64.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&5u64.to_le_bytes());
    let seq = 5u64.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq);
    crc.update(&payload);
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    frame.extend_from_slice(&seq);
    frame.extend_from_slice(&payload);
    std::fs::write(dir.path().join("checkpoint"), &frame).unwrap();
    let e = Pool::open(dir.path(), PoolOptions::default())
        .err()
        .expect("an unpaged pool must not open");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("not paged"), "{e}");
}
