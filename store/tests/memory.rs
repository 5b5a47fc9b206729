//! Memory does not grow with virtual size: a 1 TiB thin volume with 1 GiB
//! written (scattered over the whole TiB) and 10 snapshots is opened by a
//! fresh child process with a 16 MiB map cache, which reads back every
//! written byte of the head, samples every snapshot, walks the allocation
//! map of the whole TiB and writes some more; its peak RSS (VmHWM) must stay
//! under 64 MiB plus the cache.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::process::Command;
use store::{Pool, PoolOptions};

const CHILD_ENV: &str = "SNAPGATE_MEMORY_CHILD_DIR";
const SIZE: u64 = 1 << 40;
const CHUNK: u64 = 64 << 10;
const ROUNDS: u32 = 10;
/// 1600 writes of 64 KiB a round: 100 MiB; 1 GiB in all (with the head's).
const WRITES: usize = 1600;
const CACHE: u64 = 16 << 20;

/// Content of the chunk at `off` as written in round `r`.
fn pattern(r: u32, off: u64) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK as usize];
    for (i, w) in v.chunks_mut(16).enumerate() {
        w[..8].copy_from_slice(&(off + i as u64 * 16).to_le_bytes());
        w[8..12].copy_from_slice(&r.to_le_bytes());
        w[12..16].copy_from_slice(&0x5a5a_5a5au32.to_le_bytes());
    }
    v
}

/// Offsets written in round `r` (rounds 0..ROUNDS end with a snapshot;
/// round ROUNDS is the head's).
fn offsets(r: u32) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(7000 + r as u64);
    (0..WRITES)
        .map(|_| rng.gen_range(0..SIZE / CHUNK) * CHUNK)
        .collect()
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn opts() -> PoolOptions {
    PoolOptions {
        map_cache_bytes: CACHE,
        ..PoolOptions::default()
    }
}

#[test]
#[ignore = "run as a child by a_terabyte_volume_serves_in_bounded_memory"]
fn memory_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let pool = Pool::open(&dir, opts()).unwrap();
    let head = pool.open_head("big").unwrap();
    // Expected content: the last round that wrote each chunk, per view.
    let mut last: HashMap<u64, u32> = HashMap::new();
    let mut per_snap: Vec<HashMap<u64, u32>> = Vec::new();
    for r in 0..=ROUNDS {
        for off in offsets(r) {
            last.insert(off, r);
        }
        if r < ROUNDS {
            per_snap.push(last.clone());
        }
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for (&off, &r) in &last {
        head.read_at(&mut buf, off).unwrap();
        assert!(buf == pattern(r, off), "head at {off}");
    }
    for (s, want) in per_snap.iter().enumerate() {
        let snap = pool.open_snapshot("big", &format!("s{s}")).unwrap();
        for (&off, &r) in want.iter().take(200) {
            snap.read_at(&mut buf, off).unwrap();
            assert!(buf == pattern(r, off), "s{s} at {off}");
        }
        // A chunk written only later reads as zeros here.
        if let Some((&off, _)) = last.iter().find(|(o, _)| !want.contains_key(o)) {
            snap.read_at(&mut buf, off).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "s{s} at {off}");
        }
    }
    let mut data = 0;
    let mut pos = 0;
    while pos < SIZE {
        let len = (64u64 << 30).min(SIZE - pos);
        for e in head.extents(pos, len).unwrap() {
            if e.kind == store::ExtentKind::Data {
                data += e.length;
            }
        }
        pos += len;
    }
    assert_eq!(data, last.len() as u64 * CHUNK);
    // More writes, and a snapshot delete, in bounded memory too.
    for (i, off) in offsets(99).into_iter().enumerate() {
        head.write_at(&pattern(99, off), off, i % 64 == 63).unwrap();
    }
    pool.delete_snapshot("big", "s3").unwrap();
    head.flush().unwrap();
    let st = pool.stats();
    println!(
        "rss_kib {} hwm_kib {} map_pages {} cached_kib {} loads {}",
        status_kib("VmRSS:"),
        status_kib("VmHWM:"),
        st.map_pages,
        st.map_cached_bytes >> 10,
        st.map_page_loads
    );
}

#[test]
fn a_terabyte_volume_serves_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let pool = Pool::open(dir.path(), opts()).unwrap();
        pool.create_volume("big", SIZE).unwrap();
        let h = pool.open_head("big").unwrap();
        for r in 0..=ROUNDS {
            for off in offsets(r) {
                h.write_at(&pattern(r, off), off, false).unwrap();
            }
            if r < ROUNDS {
                pool.create_snapshot("big", &format!("s{r}")).unwrap();
            }
        }
        h.flush().unwrap();
        let st = pool.stats();
        // 1 GiB of 4 KiB entries in pages of at most 640 entries.
        assert!(st.map_pages >= 262_144 / 640, "{st:?}");
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "memory_child", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("rss_kib"))
        .expect("child reports its memory");
    eprintln!("{line}");
    let field = |i: usize| -> u64 { line.split_whitespace().nth(i).unwrap().parse().unwrap() };
    let (hwm, cached_kib, loads) = (field(3), field(7), field(9));
    // The map really was paged: pages came from disk, and the clean ones
    // kept in memory stayed within their half of the cache.
    assert!(loads > 0, "{line}");
    assert!(cached_kib <= CACHE / 2 / 1024 + 64, "{line}");
    let limit = (64 << 10) + (CACHE >> 10);
    assert!(
        hwm < limit,
        "peak RSS {hwm} KiB, limit {limit} KiB (64 MiB + cache): {line}"
    );
}
