//! Power loss at an arbitrary medium operation (a write, sync, set_len,
//! punch, rename or directory sync; inside a resize too), with writes,
//! trims, flushes, snapshots, shrinks to unaligned sizes and grows in any
//! order (snapshots taken while shrunk too). After the reopen: the size is
//! one the volume had since the last flush, every snapshot is exact, and
//! once grown back every block holds a value it had since its last flush,
//! with nothing past a shrink coming back.

use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use store::{Medium, MediumFile, MemMedium, Pool, PoolOptions, BLOCK};

const BLOCKS: u64 = 24;
const SIZE: u64 = BLOCKS * BLOCK as u64;

struct Cut {
    m: MemMedium,
    left: AtomicUsize,
    keep_p: f64,
    rng: Mutex<StdRng>,
    after: Mutex<Option<MemMedium>>,
    fired: AtomicBool,
}

impl Cut {
    fn tick(&self) {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut rng = self.rng.lock();
            let p = self.keep_p;
            *self.after.lock() = Some(self.m.crash(|_, _| rng.gen_bool(p)));
            self.fired.store(true, Ordering::SeqCst);
        }
    }
}

struct CutFile {
    f: Arc<dyn MediumFile>,
    c: Arc<Cut>,
}

impl MediumFile for CutFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.f.read_at(buf, off)
    }
    fn write_at(&self, d: &[u8], off: u64) -> io::Result<()> {
        self.c.tick();
        self.f.write_at(d, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.c.tick();
        self.f.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.f.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.c.tick();
        self.f.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.c.tick();
        self.f.punch_hole(offset, len)
    }
}

struct CutMedium(Arc<Cut>);

impl Medium for CutMedium {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        let f = self.0.m.open(name, create)?;
        Ok(Arc::new(CutFile {
            f,
            c: self.0.clone(),
        }))
    }
    fn exists(&self, name: &str) -> bool {
        self.0.m.exists(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.0.tick();
        self.0.m.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.0.m.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.0.tick();
        self.0.m.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.0.m.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn describe(&self) -> String {
        "cut".into()
    }
}

fn block_of(img: &[u8], b: u64) -> Vec<u8> {
    img[(b as usize) * BLOCK..(b as usize + 1) * BLOCK].to_vec()
}

fn one_run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let opts = PoolOptions {
        journal_limit: if seed.is_multiple_of(2) {
            2048
        } else {
            1 << 20
        },
        map_page_entries: if seed % 4 == 1 { 4 } else { 640 },
        gc_foreground: std::time::Duration::from_secs(3600),
        ..PoolOptions::default()
    };
    let cut = Arc::new(Cut {
        m: MemMedium::new(),
        left: AtomicUsize::new(usize::MAX),
        keep_p: rng.gen_range(0.0..1.0),
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 77)),
        after: Mutex::new(None),
        fired: AtomicBool::new(false),
    });
    let pool = Pool::open_medium(Arc::new(CutMedium(cut.clone())), opts.clone()).unwrap();
    pool.create_volume("v", SIZE).unwrap();
    let h = pool.open_head("v").unwrap();
    pool.flush().unwrap();
    cut.left.store(rng.gen_range(1..400), Ordering::SeqCst);
    let mut size = SIZE;
    let mut sizes = vec![SIZE];
    let mut head = vec![0u8; SIZE as usize];
    let mut cands: Vec<Vec<Vec<u8>>> = (0..BLOCKS).map(|b| vec![block_of(&head, b)]).collect();
    let mut snaps: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut maybe_snap: Option<String> = None;
    let mut log = Vec::new();
    let reset = |cands: &mut Vec<Vec<Vec<u8>>>, head: &[u8]| {
        for b in 0..BLOCKS {
            cands[b as usize] = vec![block_of(head, b)];
        }
    };
    for step in 0..60 {
        if cut.fired.load(Ordering::SeqCst) {
            break;
        }
        let op = rng.gen_range(0..10);
        match op {
            0..=4 => {
                let off = rng.gen_range(0..size - 1);
                let len = rng.gen_range(1..=(size - off).min(3 * BLOCK as u64));
                let v: u8 = rng.gen_range(1..=255);
                let fua = rng.gen_bool(0.2);
                log.push(format!("write {off}+{len}={v} fua={fua}"));
                h.write_at(&vec![v; len as usize], off, fua).unwrap();
                head[off as usize..(off + len) as usize].fill(v);
                for b in off / BLOCK as u64..=(off + len - 1) / BLOCK as u64 {
                    cands[b as usize].push(block_of(&head, b));
                }
                if fua && !cut.fired.load(Ordering::SeqCst) {
                    for b in off / BLOCK as u64..=(off + len - 1) / BLOCK as u64 {
                        cands[b as usize] = vec![block_of(&head, b)];
                    }
                }
            }
            5 => {
                log.push("flush".into());
                pool.flush().unwrap();
                if !cut.fired.load(Ordering::SeqCst) {
                    reset(&mut cands, &head);
                }
            }
            6 => {
                let name = format!("s{step}");
                log.push(format!("snapshot {name} at size {size}"));
                pool.create_snapshot("v", &name).unwrap();
                let img = head[..size as usize].to_vec();
                if cut.fired.load(Ordering::SeqCst) {
                    maybe_snap = Some(name.clone());
                }
                snaps.insert(name, (size, img));
                if !cut.fired.load(Ordering::SeqCst) {
                    reset(&mut cands, &head);
                }
            }
            7 | 8 => {
                let new = if size == SIZE || rng.gen_bool(0.3) {
                    rng.gen_range(1..SIZE / 512) * 512
                } else {
                    rng.gen_range(size / 512 + 1..=SIZE / 512) * 512
                };
                log.push(format!("resize {size} -> {new}"));
                pool.resize_volume("v", new, true).unwrap();
                if new < size {
                    head[new as usize..].fill(0);
                }
                size = new;
                sizes.push(new);
                for b in 0..BLOCKS {
                    cands[b as usize].push(block_of(&head, b));
                }
                if !cut.fired.load(Ordering::SeqCst) {
                    reset(&mut cands, &head);
                    sizes = vec![size];
                }
            }
            _ => {
                let off = rng.gen_range(0..size / BLOCK as u64 + 1) * BLOCK as u64;
                if off >= size {
                    continue;
                }
                let len = (rng.gen_range(1..=3) * BLOCK as u64).min(size - off);
                log.push(format!("trim {off}+{len}"));
                h.trim(off, len, false).unwrap();
                head[off as usize..(off + len) as usize].fill(0);
                for b in off / BLOCK as u64..=(off + len - 1) / BLOCK as u64 {
                    cands[b as usize].push(block_of(&head, b));
                }
            }
        }
    }
    let fired = cut.fired.load(Ordering::SeqCst);
    let crashed = cut
        .after
        .lock()
        .take()
        .unwrap_or_else(|| cut.m.crash(|_, _| false));
    drop(h);
    drop(pool);
    let ctx = format!(
        "seed {seed} (cut fired: {fired}) ops:\n  {}",
        log.join("\n  ")
    );
    let pool = Pool::open_medium(Arc::new(crashed), opts)
        .unwrap_or_else(|e| panic!("{ctx}\nreopen failed: {e}"));
    let sr = pool.volume_info("v").unwrap().size;
    assert!(sizes.contains(&sr), "{ctx}\nsize {sr} not in {sizes:?}");
    for (name, (ssize, img)) in &snaps {
        match pool.open_snapshot("v", name) {
            Ok(s) => {
                assert_eq!(s.size(), *ssize, "{ctx}\nsnapshot {name} size");
                let mut got = vec![0u8; *ssize as usize];
                s.read_at(&mut got, 0).unwrap();
                if maybe_snap.as_deref() != Some(name.as_str()) {
                    assert!(got == *img, "{ctx}\nsnapshot {name} content changed");
                }
            }
            Err(_) => assert_eq!(
                maybe_snap.as_deref(),
                Some(name.as_str()),
                "{ctx}\nsnapshot {name} lost"
            ),
        }
    }
    if sr < SIZE {
        pool.resize_volume("v", SIZE, false).unwrap();
    }
    let h = pool.open_head("v").unwrap();
    let mut got = vec![0u8; SIZE as usize];
    h.read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{ctx}\nread after crash failed: {e}"));
    for b in 0..BLOCKS {
        let g = block_of(&got, b);
        let ok = cands[b as usize].iter().any(|c| {
            let mut c = c.clone();
            let lo = b * BLOCK as u64;
            for (i, x) in c.iter_mut().enumerate() {
                if lo + i as u64 >= sr {
                    *x = 0;
                }
            }
            c == g
        });
        assert!(
            ok,
            "{ctx}\nreopened at size {sr}: block {b} holds {:?}.. which no candidate explains ({} candidates, first bytes {:?})",
            &g.iter().enumerate().filter(|(_, &x)| x != 0).map(|(i, &x)| (i, x)).take(3).collect::<Vec<_>>(),
            cands[b as usize].len(),
            cands[b as usize].iter().map(|c| (c[0], c[BLOCK - 1])).collect::<Vec<_>>()
        );
    }
    assert!(pool.verify().unwrap().damaged.is_empty(), "{ctx}\nverify");
}

#[test]
fn power_loss_anywhere_around_resizes() {
    // SNAPGATE_RESIZE_CRASH_SEED=N reruns one seed, SNAPGATE_RESIZE_CRASH_RUNS=N runs N.
    let seeds = match std::env::var("SNAPGATE_RESIZE_CRASH_SEED") {
        Ok(n) => {
            let n: u64 = n.parse().unwrap();
            n..n + 1
        }
        Err(_) => {
            0..std::env::var("SNAPGATE_RESIZE_CRASH_RUNS")
                .map(|s| s.parse().unwrap())
                .unwrap_or(1000)
        }
    };
    for seed in seeds {
        one_run(seed);
    }
}
