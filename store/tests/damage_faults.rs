//! A patched map page whose old slot is found damaged when a checkpoint
//! writes it, together with other faults: a later page write of that
//! checkpoint fails, or its root cannot be written and the process is
//! killed. The lost blocks read as errors, never as zeros; blocks written
//! after the loss read back, also after a reopen.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use store::{ErrorKind, Medium, MediumFile, MemMedium, Pool, PoolOptions, BLOCK};

const ROOM: u64 = u64::MAX;
const B: u64 = BLOCK as u64;
const SLOT: usize = 16384;

/// The in-memory medium, with writes to the file `failing` failing (EIO)
/// once `left` more have been made.
struct Failing {
    m: MemMedium,
    failing: &'static str,
    left: Arc<AtomicU64>,
}

struct FailingFile {
    f: Arc<dyn MediumFile>,
    left: Option<Arc<AtomicU64>>,
}

impl MediumFile for FailingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.f.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(left) = &self.left {
            left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                ROOM => Some(ROOM),
                0 => None,
                n => Some(n - 1),
            })
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        }
        self.f.write_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.f.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.f.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.f.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.f.punch_hole(offset, len)
    }
}

impl Medium for Failing {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn MediumFile>> {
        Ok(Arc::new(FailingFile {
            f: self.m.open(name, create)?,
            left: (name == self.failing).then(|| self.left.clone()),
        }))
    }
    fn exists(&self, name: &str) -> bool {
        self.m.exists(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.m.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.m.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.m.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.m.list()
    }
    fn lock(&self) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn describe(&self) -> String {
        format!("memory medium failing writes to {}", self.failing)
    }
}

fn opts() -> PoolOptions {
    PoolOptions {
        // Any flush checkpoints; pages of 16 entries; a tiny cache.
        journal_limit: 1,
        map_page_entries: 16,
        map_cache_bytes: 16 << 10,
        ..PoolOptions::default()
    }
}

fn pat(b: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (b as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

/// What block `i` holds after `start`: 0xee in the first block of each of
/// 14 pages, `pat(i)` elsewhere.
fn want(i: u64) -> Vec<u8> {
    if i.is_multiple_of(64) && i < 14 * 64 {
        vec![0xee; BLOCK]
    } else {
        pat(i)
    }
}

/// A pool on a [`Failing`] medium holding volume `a` with 2048 blocks
/// written and checkpointed (`snapshot`: one taken before that), then one
/// block changed in each of 14 pages far apart.
fn start(failing: &'static str, snapshot: bool) -> (MemMedium, Arc<AtomicU64>, Arc<Pool>) {
    let m = MemMedium::new();
    let left = Arc::new(AtomicU64::new(ROOM));
    let medium = Failing {
        m: m.clone(),
        failing,
        left: left.clone(),
    };
    let pool = Pool::open_medium(Arc::new(medium), opts()).unwrap();
    pool.create_volume("a", 64 << 20).unwrap();
    let h = pool.open_head("a").unwrap();
    for i in 0..2048u64 {
        h.write_at(&pat(i), i * B, false).unwrap();
    }
    if snapshot {
        pool.create_snapshot("a", "old").unwrap();
    }
    h.flush().unwrap();
    for k in 0..14u64 {
        h.write_at(&[0xee; BLOCK], k * 64 * B, false).unwrap();
    }
    (m, left, pool)
}

/// Reads of the other blocks evict the changed pages (patches) from the
/// cache, so a checkpoint puts them together from their old slots.
fn evict(h: &store::Volume) {
    let mut buf = vec![0u8; BLOCK];
    for i in (1024..2048).step_by(8) {
        h.read_at(&mut buf, i * B).unwrap();
    }
}

fn meta_bytes(m: &MemMedium) -> Vec<u8> {
    let f = m.open("meta", false).unwrap();
    let mut v = vec![0u8; f.len().unwrap() as usize];
    f.read_at(&mut v, 0).unwrap();
    v
}

/// Damages the meta file's slots that differ from `before`.
fn damage_changed_slots(m: &MemMedium, before: &[u8]) {
    let after = meta_bytes(m);
    let meta = m.open("meta", false).unwrap();
    let mut n = 0;
    for s in 0..after.len() / SLOT {
        let a = &after[s * SLOT..(s + 1) * SLOT];
        if before.get(s * SLOT..(s + 1) * SLOT) != Some(a) {
            meta.write_at(&[0x5a; SLOT], (s * SLOT) as u64).unwrap();
            n += 1;
        }
    }
    assert!(n > 0);
}

/// The checkpoint writes the page put together in place of a lost one,
/// then fails on a later page: the lost blocks must read as errors, not
/// zeros, and a block written and flushed after that reads back.
#[test]
fn a_checkpoint_failing_after_a_lost_page_still_records_the_loss() {
    let mut failed = 0;
    for n in 0..14u64 {
        let (m, left, pool) = start("meta", false);
        let h = pool.open_head("a").unwrap();
        assert!(pool.stats().map_patch_bytes > 0, "{:?}", pool.stats());
        evict(&h);
        let meta = m.open("meta", false).unwrap();
        let len = meta.len().unwrap();
        meta.write_at(&vec![0x5a; len as usize], 0).unwrap();
        // The checkpoint writes n pages, then fails.
        left.store(n, Ordering::SeqCst);
        let r = h.flush();
        left.store(ROOM, Ordering::SeqCst);
        if r.is_ok() {
            continue;
        }
        failed += 1;
        let mut buf = vec![0u8; BLOCK];
        for i in 0..1024u64 {
            if h.read_at(&mut buf, i * B).is_ok() {
                assert_eq!(buf, want(i), "n={n}: block {i} reads wrong data");
            }
        }
        // Written again (FUA) after the loss, the block is good. (Unless
        // its page is still a patch of a damaged slot: then the write
        // fails, and the next checkpoint records the loss.)
        let wrote = match h.write_at(&[0x22; BLOCK], 2 * B, true) {
            Ok(()) => true,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corruption, "n={n}: {e}");
                false
            }
        };
        // Something to flush (in a new volume, whose map is in memory), so
        // that the flush checkpoints again.
        if !wrote {
            let z = format!("z{n}");
            pool.create_volume(&z, 1 << 20).unwrap();
            pool.open_head(&z)
                .unwrap()
                .write_at(&pat(0), 0, false)
                .unwrap();
        }
        h.flush()
            .unwrap_or_else(|e| panic!("n={n}: flush after the loss: {e}"));
        if !wrote {
            h.write_at(&[0x22; BLOCK], 2 * B, true)
                .unwrap_or_else(|e| panic!("n={n}: {e}"));
        }
        h.read_at(&mut buf, 2 * B)
            .unwrap_or_else(|e| panic!("n={n}: block 2, written after the loss: {e}"));
        assert_eq!(buf, vec![0x22; BLOCK], "n={n}");
    }
    assert!(failed > 5, "{failed} checkpoints failed");
}

/// The loss bumps the volume's epoch in memory; when the root that holds
/// it cannot be written and the process is killed, the journal holds
/// writes born after the durable root's epoch. Reopened, the pool takes
/// them as the head's: they read back, a snapshot taken then sees them,
/// and the head can be written again (with an older snapshot too).
///
/// The background flusher may checkpoint between the steps (it folds every
/// 5 s and when changed pages pass their memory); a try it disturbed is
/// not counted, and each case needs one undisturbed try.
#[test]
fn writes_born_after_a_loss_whose_root_failed_survive_a_kill() {
    for snapshot in [false, true] {
        let mut tries = 0;
        while !lost_with_a_failed_root_then_killed(snapshot) {
            tries += 1;
            assert!(tries < 5, "snapshot={snapshot}: every try was disturbed");
        }
    }
}

/// One try of the test above; false when the flusher disturbed it.
fn lost_with_a_failed_root_then_killed(snapshot: bool) -> bool {
    let (m, left, pool) = start("checkpoint.tmp", snapshot);
    let h = pool.open_head("a").unwrap();
    // This checkpoint writes the 14 pages to new slots but no root.
    let before = meta_bytes(&m);
    left.store(0, Ordering::SeqCst);
    let failed = h.flush().is_err();
    left.store(ROOM, Ordering::SeqCst);
    if !failed {
        return false;
    }
    // The pages change again and become patches of those slots, which
    // then get damaged.
    for k in 0..14u64 {
        h.write_at(&[0xdd; BLOCK], k * 64 * B, false).unwrap();
    }
    assert!(pool.stats().map_patch_bytes > 0, "{:?}", pool.stats());
    damage_changed_slots(&m, &before);
    evict(&h);
    // The next checkpoint loses those pages, and fails its root too.
    left.store(0, Ordering::SeqCst);
    let failed = h.flush().is_err();
    left.store(ROOM, Ordering::SeqCst);
    let mut buf = vec![0u8; BLOCK];
    match h.read_at(&mut buf, B) {
        Err(e) if e.kind() == ErrorKind::Corruption && failed => {}
        Err(e) => panic!("snapshot={snapshot}: block 1: {e}"),
        Ok(()) => {
            assert_eq!(buf, want(1), "snapshot={snapshot}: block 1");
            return false;
        }
    }
    h.write_at(&[0x33; BLOCK], 3 * B, false).unwrap();
    drop(h);
    let killed = m.kill();
    drop(pool);
    let pool = Pool::open_medium(Arc::new(killed), opts()).unwrap();
    let h = pool.open_head("a").unwrap();
    h.read_at(&mut buf, 3 * B).unwrap();
    assert_eq!(buf, vec![0x33; BLOCK], "snapshot={snapshot}");
    pool.create_snapshot("a", "s").unwrap();
    let s = pool.open_snapshot("a", "s").unwrap();
    s.read_at(&mut buf, 3 * B)
        .unwrap_or_else(|e| panic!("snapshot={snapshot}: {e}"));
    assert_eq!(buf, vec![0x33; BLOCK], "snapshot={snapshot}");
    h.write_at(&[0x44; BLOCK], 3 * B, false).unwrap();
    h.read_at(&mut buf, 3 * B).unwrap();
    assert_eq!(buf, vec![0x44; BLOCK], "snapshot={snapshot}");
    true
}
