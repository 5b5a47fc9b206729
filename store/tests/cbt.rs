//! Changed-block tracking: diffs against a model, epochs under concurrent
//! writers, and survival across crashes.

use proptest::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use store::{MemMedium, Pool, PoolOptions, Version, VolumeOptions};

const SIZE: u64 = 1 << 20;
const G: u64 = 16 << 10;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Trim(u64, u64),
    Snap,
    Delete(usize),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let r = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(40000)));
    prop_oneof![
        6 => (r.clone(), any::<u8>()).prop_map(|((o, l), v)| Op::Write(o, l, v | 1)),
        1 => r.prop_map(|(o, l)| Op::Trim(o, l)),
        2 => Just(Op::Snap),
        1 => (0..6usize).prop_map(Op::Delete),
        1 => Just(Op::Crash),
    ]
}

fn granules(o: u64, l: u64) -> std::ops::RangeInclusive<u64> {
    o / G..=(o + l - 1) / G
}

fn run(ops: Vec<Op>) {
    let mut medium = MemMedium::new();
    let mut pool = Pool::open_medium(Arc::new(medium.clone()), PoolOptions::default()).unwrap();
    pool.create_volume_with("v", SIZE, &VolumeOptions { cbt_granularity: G })
        .unwrap();
    let mut head = vec![0u8; SIZE as usize];
    let ng = (SIZE / G) as usize;
    // Live points: name, image, and the granules touched since the point.
    let mut points: Vec<(String, Vec<u8>, Vec<bool>)> = Vec::new();
    let mut n = 0;
    for op in ops {
        let h = pool.open_head("v").unwrap();
        match op {
            Op::Write(o, l, v) => {
                h.write_at(&vec![v; l as usize], o, false).unwrap();
                head[o as usize..(o + l) as usize].fill(v);
                for p in points.iter_mut() {
                    for g in granules(o, l) {
                        p.2[g as usize] = true;
                    }
                }
            }
            Op::Trim(o, l) => {
                h.trim(o, l, false).unwrap();
                head[o as usize..(o + l) as usize].fill(0);
                for p in points.iter_mut() {
                    for g in granules(o, l) {
                        p.2[g as usize] = true;
                    }
                }
            }
            Op::Snap => {
                n += 1;
                let name = format!("p{n}");
                pool.create_snapshot("v", &name).unwrap();
                points.push((name, head.clone(), vec![false; ng]));
            }
            Op::Delete(i) => {
                if !points.is_empty() {
                    let (name, ..) = points.remove(i % points.len());
                    pool.delete_snapshot("v", &name).unwrap();
                }
            }
            Op::Crash => {
                // Power loss right after a flush: the bitmaps are rebuilt.
                pool.flush().unwrap();
                drop(h);
                drop(pool);
                medium = medium.crash(|_, _| false);
                pool = Pool::open_medium(Arc::new(medium.clone()), PoolOptions::default()).unwrap();
            }
        }
        // Every pair (older point A, newer point B or head).
        let views: Vec<(Option<&str>, &Vec<u8>)> = points
            .iter()
            .map(|p| (Some(p.0.as_str()), &p.1))
            .chain(std::iter::once((None, &head)))
            .collect();
        for (ai, a) in points.iter().enumerate() {
            for (bi, (bname, bimg)) in views.iter().enumerate().skip(ai + 1) {
                let d = pool.diff("v", &a.0, *bname).unwrap();
                let mut dirty = vec![false; ng];
                for &(o, l) in &d.extents {
                    assert_eq!(o % G, 0);
                    for g in granules(o, l) {
                        dirty[g as usize] = true;
                    }
                }
                // Touched since A and not since B = touched between them.
                let touched_b = if bi < points.len() {
                    Some(&points[bi].2)
                } else {
                    None
                };
                for g in 0..ng {
                    let r = g * G as usize..(g + 1) * G as usize;
                    if a.1[r.clone()] != bimg[r] {
                        assert!(
                            dirty[g],
                            "granule {g} changed between {} and {bname:?} but is not in the diff",
                            a.0
                        );
                    }
                    if dirty[g] {
                        assert!(
                            a.2[g],
                            "granule {g} reported dirty but never touched since {}",
                            a.0
                        );
                        if let Some(tb) = touched_b {
                            // Touched only after B cannot be dirty up to B;
                            // this needs B's own touched set to be a subset.
                            assert!(a.2[g] || !tb[g]);
                        }
                    }
                }
                assert_eq!(d.bytes, d.extents.iter().map(|e| e.1).sum::<u64>());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn diff_covers_every_change_and_only_touched_blocks(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn every_write_lands_in_exactly_one_epoch_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let blocks = 4096u64;
    pool.create_volume_with(
        "v",
        blocks * 4096,
        &VolumeOptions {
            cbt_granularity: 4096,
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    // The snapshotter starts first and keeps going until the writers end.
    let snapper = {
        let pool = pool.clone();
        let stop = stop.clone();
        let taken = taken.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                pool.create_snapshot("v", &format!("e{i:04}")).unwrap();
                i += 1;
                taken.store(i, Ordering::Release);
            }
            i
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let h = pool.open_head("v").unwrap();
            let taken = taken.clone();
            std::thread::spawn(move || {
                // Each writer owns every 4th block and writes each once;
                // every 64 writes it waits for one more snapshot, so the
                // writes really are spread over many epochs.
                let mut b = w;
                let mut n = 0usize;
                while b < blocks {
                    h.write_at(&[(w as u8) + 1; 4096], b * 4096, false).unwrap();
                    b += 4;
                    n += 1;
                    if n.is_multiple_of(64) {
                        let want = n / 64;
                        let t0 = std::time::Instant::now();
                        while taken.load(Ordering::Acquire) < want
                            && t0.elapsed() < std::time::Duration::from_secs(10)
                        {
                            std::thread::yield_now();
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let nsnaps = snapper.join().unwrap();
    assert!(nsnaps >= 8, "snapshots were taken while writing: {nsnaps}");
    pool.create_snapshot("v", "final").unwrap();
    let names: Vec<String> = pool
        .snapshots("v")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut owner = vec![None::<usize>; blocks as usize];
    // Epoch of each block: the one diff between consecutive points it is in.
    let first = pool.open_snapshot("v", &names[0]).unwrap();
    let mut buf = [0u8; 4096];
    for b in 0..blocks {
        first.read_at(&mut buf, b * 4096).unwrap();
        if buf[0] != 0 {
            owner[b as usize] = Some(0);
        }
    }
    for i in 1..names.len() {
        let d = pool.diff("v", &names[i - 1], Some(&names[i])).unwrap();
        let snap = pool.open_snapshot("v", &names[i]).unwrap();
        for (o, l) in d.extents {
            for b in o / 4096..(o + l) / 4096 {
                assert!(owner[b as usize].is_none(), "block {b} is in two epochs");
                owner[b as usize] = Some(i);
                snap.read_at(&mut buf, b * 4096).unwrap();
                assert_ne!(
                    buf[0], 0,
                    "block {b} dirty in epoch {i} but not in its point"
                );
            }
        }
    }
    for b in 0..blocks {
        let i = owner[b as usize].unwrap_or_else(|| panic!("block {b} is in no epoch"));
        if i > 0 {
            let before = pool.open_snapshot("v", &names[i - 1]).unwrap();
            before.read_at(&mut buf, b * 4096).unwrap();
            assert_eq!(
                buf[0], 0,
                "block {b} is in epoch {i} but already in the point before"
            );
        }
    }
}

#[test]
fn versions_name_the_point_holding_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let h = pool.open_head("v").unwrap();
    h.write_at(&[1; 8192], 0, false).unwrap();
    pool.create_snapshot("v", "full").unwrap();
    h.write_at(&[2; 4096], 4096, false).unwrap();
    pool.create_snapshot("v", "inc1").unwrap();
    h.write_at(&[3; 4096], 16384, false).unwrap();
    let v = h.versions(0, 20480).unwrap();
    assert_eq!(
        v,
        vec![
            (0, 4096, Version::Point("full".into())),
            (4096, 4096, Version::Point("inc1".into())),
            (8192, 8192, Version::Unwritten),
            (16384, 4096, Version::Head),
        ]
    );
    // Deleting the middle point: its data now belongs to the next one.
    pool.delete_snapshot("v", "inc1").unwrap();
    let v = pool
        .open_snapshot("v", "full")
        .unwrap()
        .versions(0, 8192)
        .unwrap();
    assert_eq!(v, vec![(0, 8192, Version::Point("full".into()))]);
    assert_eq!(
        h.versions(4096, 4096).unwrap(),
        vec![(4096, 4096, Version::Head)]
    );
    let d = pool.diff("v", "full", None).unwrap();
    assert_eq!(d.extents, vec![(0, 65536)]);
}
