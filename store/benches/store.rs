//! Store benchmarks, side by side with plain `pwrite`/`pread` on a file in
//! the same directory. Prints a markdown table (used by scripts/bench).
//!
//! `cargo bench -p snapgate-store --bench store -- [DIR]`

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use store::{DirMedium, Medium, MediumFile, Pool, PoolOptions, VolumeOptions};

/// A medium that counts the bytes written through it.
struct Counting {
    inner: DirMedium,
    written: Arc<AtomicU64>,
}
struct CountingFile {
    inner: Arc<dyn MediumFile>,
    written: Arc<AtomicU64>,
}
impl MediumFile for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}
impl Medium for Counting {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        Ok(Arc::new(CountingFile {
            inner: self.inner.open(name, create)?,
            written: self.written.clone(),
        }))
    }
    fn exists(&self, name: &str) -> bool {
        self.inner.exists(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        self.inner.lock()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

const GIB: u64 = 1 << 30;
const VOL: u64 = GIB;

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    name: String,
    store: f64,
    file: f64,
    unit: &'static str,
}

/// Runs per read measurement: reads change nothing, so the same reads run
/// again, the store and the file in turns, and each row reports the median.
const RUNS: usize = 3;
/// Writes are split into this many rounds, the store and the file in turns.
const WRITE_ROUNDS: usize = 4;

/// Median seconds of `runs` runs of `store` and of `file` (each given the
/// run's number), in turns.
fn alternate(runs: usize, mut store: impl FnMut(usize), mut file: impl FnMut(usize)) -> (f64, f64) {
    let (mut s, mut f) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let t = Instant::now();
        store(r);
        s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        file(r);
        f.push(t.elapsed().as_secs_f64());
    }
    (median(s), median(f))
}

/// Writes back and drops the page cache; false when not allowed (not root).
fn drop_page_cache() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn offsets(n: usize, blocks: u64, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..blocks) * 4096).collect()
}

/// 4 KiB reads at `offs` from the store and from the plain file in turn
/// (page cache): median seconds of each.
fn hot_reads(v: &store::Volume, f: &std::fs::File, offs: &[u64]) -> (f64, f64) {
    let (mut b4, mut c4) = (vec![0u8; 4096], vec![0u8; 4096]);
    alternate(
        RUNS,
        |_| {
            for &o in offs {
                v.read_at(&mut b4, o).unwrap();
            }
        },
        |_| {
            for &o in offs {
                f.read_exact_at(&mut c4, o).unwrap();
            }
        },
    )
}

/// What any checksummed, mapped store can reach at best on this machine
/// for 4 KiB page-cache reads, against the same plain `pread`s: the plain
/// file with a CRC check of each block read, and with the block's location
/// looked up first in a flat table of 32 bytes per block (the size of the
/// store's map entries; one random memory access, as a map lookup takes at
/// least), once on ordinary pages and once on 2 MiB transparent huge pages
/// (no TLB miss left, only the cache miss).
fn floor_rows(f: &std::fs::File, offs: &[u64], rows: &mut Vec<Row>) {
    let crc = crc32fast::hash(&[0u8; 4096]);
    let blocks = (VOL / 4096) as usize;
    // Entry i: the offset of block i, then 24 bytes of the rest.
    let table: Vec<[u64; 4]> = (0..blocks as u64).map(|b| [b * 4096, b, 0, 0]).collect();
    let huge = HugeTable::new(blocks);
    let mib = (VOL / 4096 * 32) >> 20;
    let rounds: [(String, Option<&[[u64; 4]]>); 3] = [
        (
            format!("floor: plain-file 4 KiB random read + CRC of the block (median of {RUNS})"),
            None,
        ),
        (
            format!(
                "floor: the same + the location looked up in a flat table of 32 bytes per block ({mib} MiB; median of {RUNS})"
            ),
            Some(&table),
        ),
        (
            format!(
                "floor: the same, the table on 2 MiB huge pages ({}; median of {RUNS})",
                if huge.on_huge_pages() { "granted" } else { "NOT granted by the kernel" }
            ),
            Some(huge.entries()),
        ),
    ];
    for (name, lookup) in rounds {
        let (mut b4, mut c4) = (vec![0u8; 4096], vec![0u8; 4096]);
        let (s, p) = alternate(
            RUNS,
            |_| {
                for &o in offs {
                    let at = match lookup {
                        Some(t) => std::hint::black_box(t)[(o / 4096) as usize][0],
                        None => o,
                    };
                    f.read_exact_at(&mut b4, at).unwrap();
                    std::hint::black_box(crc32fast::hash(&b4) == crc);
                }
            },
            |_| {
                for &o in offs {
                    f.read_exact_at(&mut c4, o).unwrap();
                }
            },
        );
        rows.push(Row {
            name,
            store: offs.len() as f64 / s,
            file: offs.len() as f64 / p,
            unit: "IOPS",
        });
    }
}

/// The floor's location table in anonymous memory asked to be backed by
/// transparent huge pages (`MADV_HUGEPAGE`), 2 MiB aligned.
struct HugeTable {
    map: *mut libc::c_void,
    map_len: usize,
    entries: *mut [u64; 4],
    len: usize,
}

impl HugeTable {
    const HUGE: usize = 2 << 20;

    fn new(len: usize) -> HugeTable {
        let bytes = len * 32;
        let map_len = bytes + Self::HUGE;
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap of the huge-page table");
        let aligned = (map as usize).next_multiple_of(Self::HUGE);
        let entries = aligned as *mut [u64; 4];
        // SAFETY: [aligned, aligned + bytes) lies inside the mapping, which
        // is zeroed, writable and aligned for u64; the advice only asks for
        // huge pages (ignored where not granted).
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
            for b in 0..len {
                entries.add(b).write([b as u64 * 4096, b as u64, 0, 0]);
            }
        }
        HugeTable {
            map,
            map_len,
            entries,
            len,
        }
    }

    fn entries(&self) -> &[[u64; 4]] {
        // SAFETY: `len` entries were written in `new`; the mapping lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.entries, self.len) }
    }

    /// Whether the kernel backed this process's anonymous memory with huge
    /// pages at least as large as the table (`AnonHugePages`).
    fn on_huge_pages(&self) -> bool {
        let kib = std::fs::read_to_string("/proc/self/smaps_rollup")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("AnonHugePages:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
            })
            .unwrap_or(0);
        kib * 1024 >= self.len * 32 / Self::HUGE * Self::HUGE
    }
}

impl Drop for HugeTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

fn io_rows(dir: &Path, rows: &mut Vec<Row>) {
    let pool = Pool::open(dir.join("pool"), PoolOptions::default()).unwrap();
    pool.create_volume("bench", VOL).unwrap();
    let v = pool.open_head("bench").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("plain.raw"))
        .unwrap();
    f.set_len(VOL).unwrap();
    let mb: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8 | 1).collect();
    let blk: Vec<u8> = mb[..4096].to_vec();

    // 1 MiB sequential write, whole volume.
    let t = Instant::now();
    for m in 0..VOL >> 20 {
        v.write_at(&mb, m << 20, false).unwrap();
    }
    v.flush().unwrap();
    let s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for m in 0..VOL >> 20 {
        f.write_all_at(&mb, m << 20).unwrap();
    }
    f.sync_data().unwrap();
    let p = t.elapsed().as_secs_f64();
    rows.push(Row {
        name: "1 MiB sequential write (1 GiB + flush)".into(),
        store: mbps(VOL, s),
        file: mbps(VOL, p),
        unit: "MiB/s",
    });

    // 1 MiB sequential read (page cache), store and file in turn.
    let (mut b1, mut b2) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (s, p) = alternate(
        RUNS,
        |_| {
            for m in 0..VOL >> 20 {
                v.read_at(&mut b1, m << 20).unwrap();
            }
        },
        |_| {
            for m in 0..VOL >> 20 {
                f.read_exact_at(&mut b2, m << 20).unwrap();
            }
        },
    );
    rows.push(Row {
        name: format!("1 MiB sequential read (1 GiB, page cache; median of {RUNS})"),
        store: mbps(VOL, s),
        file: mbps(VOL, p),
        unit: "MiB/s",
    });

    // 4 KiB random writes, in rounds that alternate between the store and
    // the file, so that neither always runs behind the other's writeback.
    let n = 32768;
    let offs = offsets(n, VOL / 4096, 1);
    let part = n / WRITE_ROUNDS;
    let (s, p) = alternate(
        WRITE_ROUNDS,
        |r| {
            for (i, &o) in offs[r * part..(r + 1) * part].iter().enumerate() {
                v.write_at(&blk, o, false).unwrap();
                if i % 64 == 63 {
                    v.flush().unwrap();
                }
            }
        },
        |r| {
            for (i, &o) in offs[r * part..(r + 1) * part].iter().enumerate() {
                f.write_all_at(&blk, o).unwrap();
                if i % 64 == 63 {
                    f.sync_data().unwrap();
                }
            }
        },
    );
    rows.push(Row {
        name: format!("4 KiB random write, flush every 64 (median of {WRITE_ROUNDS} rounds)"),
        store: part as f64 / s,
        file: part as f64 / p,
        unit: "IOPS",
    });

    let n = 131072;
    let offs = offsets(n, VOL / 4096, 2);
    let part = n / WRITE_ROUNDS;
    let (s, p) = alternate(
        WRITE_ROUNDS,
        |r| {
            for &o in &offs[r * part..(r + 1) * part] {
                v.write_at(&blk, o, false).unwrap();
            }
        },
        |r| {
            for &o in &offs[r * part..(r + 1) * part] {
                f.write_all_at(&blk, o).unwrap();
            }
        },
    );
    rows.push(Row {
        name: format!("4 KiB random write, no flush (median of {WRITE_ROUNDS} rounds)"),
        store: part as f64 / s,
        file: part as f64 / p,
        unit: "IOPS",
    });

    let (mut b4, mut c4) = (vec![0u8; 4096], vec![0u8; 4096]);
    let offs = offsets(n, VOL / 4096, 3);
    let (s, p) = hot_reads(&v, &f, &offs);
    rows.push(Row {
        name: format!("4 KiB random read (page cache; median of {RUNS})"),
        store: n as f64 / s,
        file: n as f64 / p,
        unit: "IOPS",
    });
    let hot_file = p;
    floor_rows(&f, &offs, rows);

    // The same reads with the map paged out: reopened with a map cache of
    // 1 MiB (1/16 of this volume's pages), so most lookups read a page.
    drop(v);
    drop(pool);
    let small = PoolOptions {
        map_cache_bytes: 1 << 20,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir.join("pool"), small).unwrap();
    let v = pool.open_head("bench").unwrap();
    let t = Instant::now();
    for &o in &offs {
        v.read_at(&mut b4, o).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    let st = pool.stats();
    rows.push(Row {
        name: format!(
            "4 KiB random read, 1 MiB map cache ({} pages, {} read from the meta file)",
            st.map_pages, st.map_page_loads
        ),
        store: n as f64 / s,
        file: n as f64 / hot_file,
        unit: "IOPS",
    });

    // Reopened with the default map cache, as after a restart with the
    // page cache still warm: the map pages come back from the meta file
    // (a first pass), and opening must not punch the free slots around
    // the data, which would split its page-cache folios.
    drop(v);
    drop(pool);
    let pool = Pool::open(dir.join("pool"), PoolOptions::default()).unwrap();
    let v = pool.open_head("bench").unwrap();
    for &o in &offs {
        v.read_at(&mut b4, o).unwrap();
    }
    let (s, p) = hot_reads(&v, &f, &offs);
    rows.push(Row {
        name: format!("4 KiB random read after reopening (page cache; median of {RUNS})"),
        store: n as f64 / s,
        file: n as f64 / p,
        unit: "IOPS",
    });

    // The same reads from the disk: the page cache is dropped before each
    // run (needs root; the row is left out otherwise). The map cache stays
    // filled.
    let cold = &offs[..8192];
    let dropped = std::cell::Cell::new(true);
    let (s, p) = alternate(
        RUNS,
        |_| {
            dropped.set(dropped.get() & drop_page_cache());
            for &o in cold {
                v.read_at(&mut b4, o).unwrap();
            }
        },
        |_| {
            dropped.set(dropped.get() & drop_page_cache());
            for &o in cold {
                f.read_exact_at(&mut c4, o).unwrap();
            }
        },
    );
    if dropped.get() {
        rows.push(Row {
            name: format!(
                "4 KiB random read, page cache dropped ({} reads; median of {RUNS})",
                cold.len()
            ),
            store: cold.len() as f64 / s,
            file: cold.len() as f64 / p,
            unit: "IOPS",
        });
    }
}

fn snapshot_rows(dir: &Path, out: &mut Vec<String>) {
    let pool = Pool::open(dir.join("snaps"), PoolOptions::default()).unwrap();
    let blk = vec![0x5au8; 4096];
    for (name, size, written) in [
        ("1 GiB", GIB, 256u64 << 20),
        ("1 TiB", GIB << 10, 256 << 20),
    ] {
        let vname = format!("v{}", size >> 30);
        pool.create_volume(&vname, size).unwrap();
        let v = pool.open_head(&vname).unwrap();
        // Scatter the written data over the whole volume.
        let offs = offsets((written / 4096) as usize, size / 4096, 4);
        for &o in &offs {
            v.write_at(&blk, o, false).unwrap();
        }
        pool.flush().unwrap();
        let mut times = Vec::new();
        for (i, &o) in offs.iter().take(50).enumerate() {
            // A little new data between snapshots, as in real use.
            v.write_at(&blk, o, false).unwrap();
            let t = Instant::now();
            pool.create_snapshot(&vname, &format!("s{i}")).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out.push(format!(
            "| snapshot create, {name} volume, {} MiB written | {:.3} ms median, {:.3} ms max (includes the flush that makes it durable) |",
            written >> 20,
            median(times.clone()),
            times.iter().cloned().fold(0.0, f64::max)
        ));
    }
}

fn wa_rows(dir: &Path, out: &mut Vec<String>) {
    for snaps in [0u32, 10] {
        let written = Arc::new(AtomicU64::new(0));
        let path = dir.join(format!("wa{snaps}"));
        let m = Counting {
            inner: DirMedium::new(&path).unwrap(),
            written: written.clone(),
        };
        let pool = Pool::open_medium(Arc::new(m), PoolOptions::default()).unwrap();
        pool.create_volume("v", VOL).unwrap();
        let v = pool.open_head("v").unwrap();
        let blk: Vec<u8> = (0..4096).map(|i| (i % 253) as u8 | 1).collect();
        // Pre-fill a quarter of the volume, then snapshots in between more writes.
        for (i, &o) in offsets(65536, VOL / 4096, 5).iter().enumerate() {
            v.write_at(&blk, o, false).unwrap();
            if snaps > 0 && i % (65536 / snaps as usize) == 0 {
                pool.create_snapshot("v", &format!("s{i}")).unwrap();
            }
        }
        pool.flush().unwrap();
        let before = written.load(Ordering::Relaxed);
        let n = 65536;
        for (i, &o) in offsets(n, VOL / 4096, 6).iter().enumerate() {
            v.write_at(&blk, o, false).unwrap();
            if i % 64 == 63 {
                v.flush().unwrap();
            }
        }
        let medium = written.load(Ordering::Relaxed) - before;
        let user = n as u64 * 4096;
        out.push(format!(
            "| write amplification, 4 KiB random writes, flush every 64, {snaps} snapshots | {:.3} (medium bytes {} / user bytes {}) |",
            medium as f64 / user as f64,
            medium,
            user
        ));
    }

    // The same writes over 4 GiB of written data: its map (about 3300
    // pages) outgrows the changed-page half of the default map cache
    // (about 1600 pages), so checkpoints write map pages back between
    // the writes.
    let big = 4 * GIB;
    let written = Arc::new(AtomicU64::new(0));
    let path = dir.join("wa-big");
    let m = Counting {
        inner: DirMedium::new(&path).unwrap(),
        written: written.clone(),
    };
    let pool = Pool::open_medium(Arc::new(m), PoolOptions::default()).unwrap();
    pool.create_volume("v", big).unwrap();
    let v = pool.open_head("v").unwrap();
    let mb: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for m in 0..big >> 20 {
        v.write_at(&mb, m << 20, false).unwrap();
    }
    pool.flush().unwrap();
    let pages = pool.stats().map_pages;
    let before = written.load(Ordering::Relaxed);
    let n = 65536;
    for (i, &o) in offsets(n, big / 4096, 7).iter().enumerate() {
        v.write_at(&mb[..4096], o, false).unwrap();
        if i % 64 == 63 {
            v.flush().unwrap();
        }
    }
    let medium = written.load(Ordering::Relaxed) - before;
    let user = n as u64 * 4096;
    out.push(format!(
        "| write amplification, 4 KiB random writes, flush every 64, 4 GiB written ({pages} map pages), 0 snapshots | {:.3} (medium bytes {} / user bytes {}) |",
        medium as f64 / user as f64,
        medium,
        user
    ));
    drop(v);
    drop(pool);
    let _ = std::fs::remove_dir_all(&path);
}

fn cbt_rows(dir: &Path, rows: &mut Vec<Row>, out: &mut Vec<String>) {
    let pool = Pool::open(dir.join("cbt"), PoolOptions::default()).unwrap();
    // Same writes into a tracked and an untracked volume, alternating rounds.
    pool.create_volume("on", VOL).unwrap();
    pool.create_volume_with("off", VOL, &VolumeOptions { cbt_granularity: 0 })
        .unwrap();
    let blk = vec![0x33u8; 4096];
    let mb = vec![0x44u8; 1 << 20];
    let mut r4 = [Vec::new(), Vec::new()];
    let mut r1m = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for (k, name) in ["on", "off"].iter().enumerate() {
            let v = pool.open_head(name).unwrap();
            let offs = offsets(65536, VOL / 4096, 10 + round);
            let t = Instant::now();
            for &o in &offs {
                v.write_at(&blk, o, false).unwrap();
            }
            r4[k].push(offs.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for m in 0..512u64 {
                v.write_at(&mb, m << 20, false).unwrap();
            }
            r1m[k].push(mbps(512 << 20, t.elapsed().as_secs_f64()));
        }
        pool.flush().unwrap();
    }
    rows.push(Row {
        name: "4 KiB random write, CBT on vs off".into(),
        store: median(r4[0].clone()),
        file: median(r4[1].clone()),
        unit: "IOPS",
    });
    rows.push(Row {
        name: "1 MiB sequential write, CBT on vs off".into(),
        store: median(r1m[0].clone()),
        file: median(r1m[1].clone()),
        unit: "MiB/s",
    });

    // Diff of two points of a 1 TiB volume with 1% of its 64 KiB blocks changed.
    let tib = GIB << 10;
    pool.create_volume("big", tib).unwrap();
    let v = pool.open_head("big").unwrap();
    pool.create_snapshot("big", "a").unwrap();
    let nblocks = tib / (64 << 10);
    let changed = nblocks / 100;
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..changed {
        let b = rng.gen_range(0..nblocks);
        v.write_at(&blk, b * (64 << 10), false).unwrap();
    }
    pool.create_snapshot("big", "b").unwrap();
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let d = pool.diff("big", "a", Some("b")).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = d.bytes;
    }
    out.push(format!(
        "| snapshot diff, 1 TiB volume, 1% of 64 KiB blocks changed ({} changed, {} MiB) | {:.1} ms median |",
        changed,
        bytes >> 20,
        median(times)
    ));
    out.push(format!(
        "| change-bitmap memory per TiB at 64 KiB granularity | {} KiB when every block is dirty (one bit per 64 KiB; sparse chunks of 512 bytes, each covering 256 MiB, so untouched regions take nothing) |",
        (tib / (64 << 10)) / 8 / 1024
    ));
}

fn main() {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let tmp;
    let dir = match arg {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    io_rows(&dir, &mut rows);
    let mut other = Vec::new();
    cbt_rows(&dir, &mut rows, &mut other);
    println!("| workload | store | plain file (CBT rows: CBT off) | ratio |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} {} | {:.0} {} | {:.2}× |",
            r.name,
            r.store,
            r.unit,
            r.file,
            r.unit,
            r.store / r.file
        );
    }
    snapshot_rows(&dir, &mut other);
    wa_rows(&dir, &mut other);
    println!();
    println!("| measurement | result |");
    println!("|---|---|");
    for o in other {
        println!("{o}");
    }
}
