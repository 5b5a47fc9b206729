//! Slot allocator for the data file.
//!
//! Free slots are kept as ranges so that a large write gets one contiguous
//! run where it can (one `pwrite`, and later one `pread`). A slot the map stops
//! referencing is not free at once: it waits in `pending` with the sequence
//! number of the journal record that dropped it, and becomes reusable only
//! when that record is durable (a crash before would bring the old reference
//! back, pointing at overwritten data) and no reader that might still be
//! reading it is running (see `Inner::reuse` in pool.rs).

use std::collections::{BTreeMap, BTreeSet};

/// A set of slot ranges, merged on insert, indexed by start and by length.
#[derive(Default)]
struct Ranges {
    /// start → length.
    map: BTreeMap<u64, u64>,
    /// (length, start) of every range in `map`.
    by_len: BTreeSet<(u64, u64)>,
    total: u64,
}

impl Ranges {
    fn put(&mut self, start: u64, len: u64) {
        self.map.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn cut(&mut self, start: u64) -> Option<u64> {
        let len = self.map.remove(&start)?;
        self.by_len.remove(&(len, start));
        Some(len)
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.total += len;
        let (mut start, mut len) = (start, len);
        if let Some((&ps, &pl)) = self.map.range(..start).next_back() {
            if ps + pl == start {
                self.cut(ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(nl) = self.cut(start + len) {
            len += nl;
        }
        self.put(start, len);
    }

    /// Takes up to `n` slots, lowest first, appending runs to `out`;
    /// returns how many it took.
    fn take(&mut self, n: u64, out: &mut Vec<Run>) -> u64 {
        let mut got = 0;
        while got < n {
            let Some((&start, &len)) = self.map.iter().next() else {
                break;
            };
            self.cut(start);
            let take = len.min(n - got);
            if take < len {
                self.put(start + take, len - take);
            }
            out.push((start, take));
            got += take;
        }
        self.total -= got;
        got
    }

    /// Takes `n` slots from the largest ranges first (the tail of the last
    /// one it cuts), appending runs to `out`.
    fn take_largest(&mut self, n: u64, out: &mut Vec<Run>) {
        let mut got = 0;
        while got < n {
            let Some(&(len, start)) = self.by_len.iter().next_back() else {
                break;
            };
            self.cut(start);
            let take = len.min(n - got);
            if take < len {
                self.put(start, len - take);
            }
            out.push((start + len - take, take));
            got += take;
        }
        self.total -= got;
    }

    /// Takes `n` contiguous slots from the smallest range that holds them.
    fn take_run(&mut self, n: u64) -> Option<u64> {
        let &(len, start) = self.by_len.range((n, 0)..).next()?;
        self.cut(start);
        if len > n {
            self.put(start + n, len - n);
        }
        self.total -= n;
        Some(start)
    }
}

/// A set of slots as a bitmap: one bit per slot up to the highest, so
/// opening a pool holds 1/32768 of the data file's size while it gathers
/// the slots in use.
#[derive(Default)]
pub struct SlotSet {
    words: Vec<u64>,
}

impl SlotSet {
    /// An empty set with room for slots below `slots` (it grows past them).
    pub fn with_capacity(slots: u64) -> SlotSet {
        SlotSet {
            words: Vec::with_capacity(slots.div_ceil(64) as usize),
        }
    }

    pub fn insert(&mut self, slot: u64) {
        let w = (slot / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (slot % 64);
    }

    /// One past the highest slot in the set (0 when empty).
    pub fn end(&self) -> u64 {
        match self.words.iter().rposition(|&w| w != 0) {
            Some(i) => i as u64 * 64 + 64 - self.words[i].leading_zeros() as u64,
            None => 0,
        }
    }

    fn contains(&self, slot: u64) -> bool {
        self.words
            .get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// The runs of slots below `high` that are not in the set.
    fn gaps(&self, high: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        let mut s = 0;
        while s < high {
            let w = (s / 64) as usize;
            // Whole words at a time where they are empty or full.
            if s % 64 == 0 && s + 64 <= high {
                match self.words.get(w).copied().unwrap_or(0) {
                    0 => {
                        match out.last_mut() {
                            Some((st, l)) if *st + *l == s => *l += 64,
                            _ => out.push((s, 64)),
                        }
                        s += 64;
                        continue;
                    }
                    u64::MAX => {
                        s += 64;
                        continue;
                    }
                    _ => {}
                }
            }
            if !self.contains(s) {
                match out.last_mut() {
                    Some((st, l)) if *st + *l == s => *l += 1,
                    _ => out.push((s, 1)),
                }
            }
            s += 1;
        }
        out
    }
}

#[derive(Default)]
pub struct Alloc {
    /// Free slots whose blocks are still allocated in the data file, up to
    /// `warm_cap`: reusing them overwrites allocated blocks, which keeps
    /// `fdatasync` cheap; beyond it freed space is punched.
    warm: Ranges,
    pub warm_cap: u64,
    /// Percent of the slots in use added to `warm_cap`.
    pub warm_percent: u64,
    /// Free slots punched out of the data file (or never written).
    cold: Ranges,
    /// Slots at or above this have never been handed out.
    pub high: u64,
    /// (seq of the dropping record, slot, how it was freed).
    pending: Vec<(u64, u64, Freed)>,
    /// Slots in `pending` freed as [`Freed::Scattered`].
    pending_scattered: usize,
}

/// Why a slot stopped being referenced, which says where its space goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freed {
    /// Trimmed, or its snapshot or volume deleted: punched.
    Cold,
    /// Overwritten by a write of `CONTIGUOUS` blocks or more: may stay in
    /// the reuse reserve.
    Bulk,
    /// Overwritten by a smaller write: may stay in the reuse reserve.
    Scattered,
}

/// Writes of at least this many blocks get contiguous slots.
pub(crate) const CONTIGUOUS: u64 = 16;

/// A run of slots: (first, count).
pub type Run = (u64, u64);

/// Sorted, merged ranges of a set of slots.
pub(crate) fn merge(mut slots: Vec<u64>) -> Vec<Run> {
    slots.sort_unstable();
    slots.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for s in slots {
        match ranges.last_mut() {
            Some((st, l)) if *st + *l == s => *l += 1,
            _ => ranges.push((s, 1)),
        }
    }
    ranges
}

impl Alloc {
    /// An allocator where `used` are taken and everything else below
    /// `high` is free (and punched).
    pub fn rebuild(used: &SlotSet, high: u64, warm_cap: u64, warm_percent: u64) -> Alloc {
        let mut a = Alloc {
            high,
            warm_cap,
            warm_percent,
            ..Default::default()
        };
        for (s, l) in used.gaps(high) {
            a.cold.insert(s, l);
        }
        a
    }

    /// Called once at open, when no free slot is in use: every free slot
    /// becomes part of the reuse reserve, and the reserve's excess, largest
    /// ranges first, is returned for the caller to punch and hand to
    /// [`Alloc::release_punched`]. A process that stopped left its reserve
    /// allocated, and maybe slots it had not punched yet; punching the
    /// scattered reserve slots too would split the page-cache folios around
    /// each of them when the cache is still warm (a restart), and 4 KiB
    /// reads from single-page folios cost about a third more.
    pub fn settle(&mut self) -> Vec<Run> {
        let free: Vec<Run> = self.cold.map.iter().map(|(&s, &l)| (s, l)).collect();
        self.cold = Ranges::default();
        self.release(&free, &[])
    }

    /// Hands out `n` slots as runs (start, len). Small requests take warm
    /// slots first, then punched ones, then new ones at the end of the file;
    /// large ones one run (see below).
    pub fn alloc(&mut self, n: u64) -> Vec<(u64, u64)> {
        // A large write gets one run (one pwrite now, one pread later), from
        // the smallest punched range that holds it, else from the end of
        // the file. After random overwrites the warm slots are scattered
        // single blocks, each its own small page-cache folio: filling a
        // 1 MiB write from them would cut it into hundreds of 4 KiB writes
        // (measured through NBD after 10 s of 4 KiB random writes: 0.40-0.65
        // GiB/s from warm slots, 0.8-0.9 GiB/s this way). Warm slots go to
        // small writes; the reserve's excess is punched largest range first
        // (`release`), which is what large writes then reuse.
        if n >= CONTIGUOUS {
            if let Some(s) = self.cold.take_run(n) {
                return vec![(s, n)];
            }
            self.high += n;
            return vec![(self.high - n, n)];
        }
        let mut runs = Vec::new();
        let mut got = self.warm.take(n, &mut runs);
        got += self.cold.take(n - got, &mut runs);
        if got < n {
            runs.push((self.high, n - got));
            self.high += n - got;
        }
        runs
    }

    /// Gives back a slot that no journal record ever referenced.
    pub fn give_back(&mut self, slot: u64) {
        self.warm.insert(slot, 1);
    }

    /// Remembers a slot dropped by the record with sequence `seq`.
    pub fn defer(&mut self, seq: u64, slot: u64, how: Freed) {
        self.pending.push((seq, slot, how));
        if how == Freed::Scattered {
            self.pending_scattered += 1;
        }
    }

    /// Takes the pending slots whose dropping record is durable (seq ≤ upto),
    /// as merged ranges: (may stay warm, to punch).
    pub fn take_durable(&mut self, upto: u64) -> (Vec<Run>, Vec<Run>) {
        let mut warm: Vec<u64> = Vec::new();
        let mut cold: Vec<u64> = Vec::new();
        let mut scattered = 0;
        self.pending.retain(|&(seq, slot, how)| {
            if seq <= upto {
                match how {
                    Freed::Cold => cold.push(slot),
                    Freed::Bulk => warm.push(slot),
                    Freed::Scattered => {
                        warm.push(slot);
                        scattered += 1;
                    }
                }
                false
            } else {
                true
            }
        });
        self.pending_scattered -= scattered;
        (merge(warm), merge(cold))
    }

    /// Makes durable-freed ranges reusable. `warm` ranges join the warm
    /// reserve; when it holds more than its size (`warm_cap` plus
    /// `warm_percent` of the slots still in use), the excess is taken from
    /// its largest ranges: few hole punches, and the scattered single slots
    /// that small writes can use stay. The excess and all of `cold` are
    /// returned for the caller to punch and hand to
    /// [`Alloc::release_punched`].
    pub fn release(&mut self, warm: &[Run], cold: &[Run]) -> Vec<Run> {
        let freed: u64 = warm.iter().chain(cold).map(|r| r.1).sum();
        let cap = self.reserve_slots(freed);
        let mut punch = cold.to_vec();
        for &(s, l) in warm {
            self.warm.insert(s, l);
        }
        if self.warm.total > cap {
            self.warm.take_largest(self.warm.total - cap, &mut punch);
        }
        punch
    }

    /// The reuse reserve's size in slots: `warm_cap` plus `warm_percent` of
    /// the slots in use (`taken` of the slots not free are not in use).
    pub fn reserve_slots(&self, taken: u64) -> u64 {
        self.warm_cap + self.used_slots().saturating_sub(taken) * self.warm_percent / 100
    }

    /// Slots that hold data something references (neither free nor
    /// waiting in `pending`).
    pub fn used_slots(&self) -> u64 {
        self.high
            .saturating_sub(self.warm.total + self.cold.total + self.pending.len() as u64)
    }

    /// Makes punched ranges reusable.
    pub fn release_punched(&mut self, ranges: &[(u64, u64)]) {
        for &(s, l) in ranges {
            self.cold.insert(s, l);
        }
    }

    /// How many of the slots an `alloc(n)` now would hand out need new
    /// space on the filesystem (punched or past the end), at most: large
    /// writes never take warm slots, small ones take them first.
    pub fn fresh_for(&self, n: u64) -> u64 {
        if n >= CONTIGUOUS {
            n
        } else {
            n.saturating_sub(self.warm.total)
        }
    }

    /// Number of free slots below `high`.
    pub fn free_slots(&self) -> u64 {
        self.warm.total + self.cold.total
    }

    /// Number of slots waiting for a durable drop record.
    pub fn pending_slots(&self) -> usize {
        self.pending.len()
    }

    /// Number of those freed by small overwrites ([`Freed::Scattered`]).
    pub fn pending_scattered(&self) -> usize {
        self.pending_scattered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_writes_get_one_run() {
        // Free: every other slot below 100, and 40..60 whole.
        let mut used = SlotSet::default();
        for s in (0..100).step_by(2).filter(|s| !(40..60).contains(s)) {
            used.insert(s);
        }
        let mut a = Alloc::rebuild(&used, 100, 0, 0);
        // Best fit: the free range 39..60 (21 slots).
        assert_eq!(a.alloc(16), vec![(39, 16)]);
        // Nothing free holds 16 more: the file grows.
        assert_eq!(a.alloc(16), vec![(100, 16)]);
        assert_eq!(a.high, 116);
        // Small writes take scattered slots, lowest first.
        assert_eq!(a.alloc(3), vec![(1, 1), (3, 1), (5, 1)]);
        assert_eq!(a.free_slots(), 60 - 16 - 3);
        // Warm slots, even a long run of them, are left to small writes.
        let run = a.alloc(20);
        assert_eq!(run, vec![(116, 20)]);
        for s in 116..136 {
            a.defer(1, s, Freed::Scattered);
        }
        let (warm, _) = a.take_durable(1);
        a.warm_cap = 100;
        assert!(a.release(&warm, &[]).is_empty());
        assert_eq!(a.alloc(16), vec![(136, 16)]);
        assert_eq!(a.alloc(2), vec![(116, 2)]);
    }

    #[test]
    fn slot_set_gaps() {
        let mut u = SlotSet::default();
        assert_eq!(u.end(), 0);
        assert_eq!(u.gaps(130), vec![(0, 130)]);
        for s in (0..64).chain([64, 100, 127, 128, 200]) {
            u.insert(s);
        }
        assert_eq!(u.end(), 201);
        assert_eq!(u.gaps(129), vec![(65, 35), (101, 26)]);
        assert_eq!(u.gaps(260), vec![(65, 35), (101, 26), (129, 71), (201, 59)]);
    }

    #[test]
    fn reserve_grows_with_the_data_stored() {
        let mut a = Alloc::rebuild(&SlotSet::default(), 0, 10, 50);
        assert_eq!(a.alloc(300), vec![(0, 300)]);
        // 100 of 300 freed: 200 stay in use, so the reserve is 10 + 100.
        for s in 0..100 {
            a.defer(1, s, Freed::Scattered);
        }
        let (warm, cold) = a.take_durable(1);
        assert!(cold.is_empty());
        assert!(a.release(&warm, &[]).is_empty());
        // 150 more freed: 50 in use, the reserve shrinks to 10 + 25 = 35;
        // the freed slots join the 100 kept before (one range, 0..250) and
        // its tail goes.
        for s in 100..250 {
            a.defer(2, s, Freed::Scattered);
        }
        let (warm, _) = a.take_durable(2);
        let punch = a.release(&warm, &[]);
        assert_eq!(punch, vec![(35, 215)]);
        a.release_punched(&punch);
        // Trims and deletions always give space back: 40 of the last 50
        // go, 10 stay in use, and the reserve shrinks to 15.
        for s in 250..290 {
            a.defer(3, s, Freed::Cold);
        }
        let (warm, cold) = a.take_durable(3);
        assert!(warm.is_empty());
        assert_eq!(a.release(&warm, &cold), vec![(250, 40), (15, 20)]);
        assert_eq!(a.free_slots(), 15 + 215);
    }

    #[test]
    fn rebuild_alloc_release() {
        const WARM_SLOTS: u64 = 100;
        let mut used = SlotSet::default();
        for s in [1, 2, 5] {
            used.insert(s);
        }
        assert_eq!(used.end(), 6);
        let mut a = Alloc::rebuild(&used, 8, WARM_SLOTS, 0);
        assert_eq!(a.free_slots(), 5);
        assert_eq!(a.alloc(2), vec![(0, 1), (3, 1)]);
        assert_eq!(a.alloc(4), vec![(4, 1), (6, 2), (8, 1)]);
        assert_eq!(a.high, 9);
        a.defer(10, 3, Freed::Scattered);
        a.defer(12, 4, Freed::Bulk);
        assert_eq!(a.take_durable(11), (vec![(3, 1)], vec![]));
        assert!(a.release(&[(3, 1)], &[]).is_empty());
        assert_eq!(a.pending_slots(), 1);
        assert_eq!(a.take_durable(12), (vec![(4, 1)], vec![]));
        assert!(a.release(&[(4, 1)], &[]).is_empty());
        assert_eq!(a.alloc(3), vec![(3, 2), (9, 1)]);
        // Past the warm reserve, freed space is handed back for punching.
        let big = a.alloc(WARM_SLOTS + 10);
        for &(s, l) in &big {
            for x in s..s + l {
                a.defer(20, x, Freed::Bulk);
            }
        }
        let (ranges, cold) = a.take_durable(20);
        assert!(cold.is_empty());
        let punch = a.release(&ranges, &[]);
        assert_eq!(punch.iter().map(|r| r.1).sum::<u64>(), 10);
        a.release_punched(&punch);
        assert_eq!(a.free_slots(), WARM_SLOTS + 10);
    }
}
