//! Property test: the store against a plain `Vec<u8>` model of the head and
//! of every live snapshot, through writes, trims, zeroes, snapshot create and
//! delete, flushes and reopen.

use proptest::prelude::*;
use std::sync::Arc;
use store::{ExtentKind, MemMedium, Pool, PoolOptions};

const SIZE: u64 = 96 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Trim { off: u64, len: u64 },
    Zero { off: u64, len: u64, no_hole: bool },
    Snap,
    DeleteSnap(usize),
    Flush,
    Reopen,
    Checkpoint,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // block-aligned
        (0..SIZE / 4096, 1..6u64).prop_map(|(b, n)| (b * 4096, (n * 4096).min(SIZE - b * 4096))),
        // arbitrary
        (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(20000))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range().prop_map(|(off, len)| Op::Trim { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), no_hole)| Op::Zero { off, len, no_hole }),
        2 => Just(Op::Snap),
        2 => (0..8usize).prop_map(Op::DeleteSnap),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Checkpoint),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = seed as u64 * 131 + off + i;
            if seed.is_multiple_of(5) {
                0
            } else {
                (x ^ (x >> 7)) as u8 | 1
            }
        })
        .collect()
}

fn check(pool: &Pool, head: &[u8], snaps: &[(String, Vec<u8>)]) {
    let h = pool.open_head("v").unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    h.read_at(&mut buf, 0).unwrap();
    assert!(buf == head, "head differs from the model");
    check_cached(&h, head);
    check_extents(&h, head);
    for (name, model) in snaps {
        let s = pool.open_snapshot("v", name).unwrap();
        assert_eq!(s.size(), model.len() as u64);
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf == *model, "snapshot {name} differs from the model");
        check_cached(&s, model);
        check_extents(&s, model);
        assert!(s.write_at(b"x", 0, false).is_err());
    }
}

/// A read served from memory (every medium byte is in memory here; map
/// pages may not be) returns the model's bytes, whole and in odd pieces.
fn check_cached(v: &store::Volume, model: &[u8]) {
    let mut buf = vec![0xeeu8; model.len()];
    if v.read_at_cached(&mut buf, 0).unwrap() {
        assert!(buf == model, "a read from memory differs from the model");
    }
    let mut off = 0;
    let mut len = 1;
    while off < model.len() {
        let n = len.min(model.len() - off);
        let mut part = vec![0xeeu8; n];
        if v.read_at_cached(&mut part, off as u64).unwrap() {
            assert!(
                part[..] == model[off..off + n],
                "a read from memory of {off}+{n} differs"
            );
        }
        off += n;
        len = len * 3 + 4095;
    }
}

/// Data extents may cover zeros, but holes and zero extents must read zero.
fn check_extents(v: &store::Volume, model: &[u8]) {
    let ex = v.extents(0, SIZE).unwrap();
    let mut pos = 0;
    for e in &ex {
        assert_eq!(e.offset, pos, "extents are consecutive");
        assert!(e.length > 0);
        if e.kind != ExtentKind::Data {
            assert!(
                model[e.offset as usize..(e.offset + e.length) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{e:?} reported as zero but holds data"
            );
        }
        pos += e.length;
    }
    assert_eq!(pos, SIZE);
}

fn run(ops: Vec<Op>) {
    let mut medium = MemMedium::new();
    let opts = PoolOptions {
        journal_limit: 4096,
        reuse_reserve_bytes: 16 << 10,
        reuse_reserve_percent: 10,
        // Pages of 4 entries and almost no cache: every path through page
        // splits, evictions, reloads and write-back is exercised.
        map_page_entries: 4,
        map_cache_bytes: 4096,
        // Deletions collect one batch and leave the rest to the background
        // collector, which the next operations and reopens race.
        gc_foreground: std::time::Duration::ZERO,
        space_reserve_bytes: 64 << 10,
    };
    let mut pool = Pool::open_medium(Arc::new(medium.clone()), opts.clone()).unwrap();
    pool.create_volume("v", SIZE).unwrap();
    let mut head = vec![0u8; SIZE as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut n = 0;
    for op in ops {
        let h = pool.open_head("v").unwrap();
        match op {
            Op::Write { off, len, seed } => {
                let d = pattern(seed, off, len);
                h.write_at(&d, off, seed % 3 == 0).unwrap();
                head[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Trim { off, len } => {
                h.trim(off, len, false).unwrap();
                head[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zero { off, len, no_hole } => {
                h.write_zeroes(off, len, no_hole, false).unwrap();
                head[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snap => {
                n += 1;
                let name = format!("s{n}");
                pool.create_snapshot("v", &name).unwrap();
                snaps.push((name, head.clone()));
            }
            Op::DeleteSnap(i) => {
                if !snaps.is_empty() {
                    let (name, _) = snaps.remove(i % snaps.len());
                    pool.delete_snapshot("v", &name).unwrap();
                }
            }
            Op::Flush => pool.flush().unwrap(),
            Op::Checkpoint => {
                // Many flushes of a tiny journal limit force checkpoints.
                pool.flush().unwrap();
            }
            Op::Reopen => {
                drop(h);
                drop(pool);
                medium = medium.kill();
                pool = Pool::open_medium(Arc::new(medium.clone()), opts.clone()).unwrap();
            }
        }
        check(&pool, &head, &snaps);
    }
    // Deleting every snapshot leaves only what the head references.
    for (name, _) in snaps.drain(..) {
        pool.delete_snapshot("v", &name).unwrap();
    }
    check(&pool, &head, &snaps);
    pool.reclaim_space().unwrap();
    let info = pool.volume_info("v").unwrap();
    let head_blocks = head
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(
        info.allocated_bytes,
        head_blocks * 4096,
        "garbage left after deleting all snapshots"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

/// NO_HOLE zeroing provisions never-written blocks as known zeros (block
/// status "zero", not "hole"); trimming makes them holes again. Both survive
/// a reopen.
#[test]
fn no_hole_zeroes_provision_unwritten_blocks() {
    let medium = MemMedium::new();
    let pool = Pool::open_medium(Arc::new(medium.clone()), PoolOptions::default()).unwrap();
    pool.create_volume("v", 64 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    h.write_zeroes(1 << 20, 8 << 20, true, false).unwrap();
    h.write_zeroes(20 << 20, 1 << 20, false, false).unwrap();
    h.trim(5 << 20, 1 << 20, true).unwrap();
    let want = |h: &store::Volume| {
        let ex = h.extents(0, 64 << 20).unwrap();
        let kinds: Vec<(u64, u64, ExtentKind)> =
            ex.iter().map(|e| (e.offset, e.length, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, 1 << 20, ExtentKind::Hole),
                (1 << 20, 4 << 20, ExtentKind::Zero),
                (5 << 20, 1 << 20, ExtentKind::Hole),
                (6 << 20, 3 << 20, ExtentKind::Zero),
                (9 << 20, 55 << 20, ExtentKind::Hole),
            ]
        );
        let mut buf = vec![1u8; 10 << 20];
        h.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    };
    want(&h);
    drop(h);
    drop(pool);
    let pool = Pool::open_medium(Arc::new(medium.kill()), PoolOptions::default()).unwrap();
    want(&pool.open_head("v").unwrap());
}
