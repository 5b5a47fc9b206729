//! Slot allocator for the data file.
//!
//! Free slots are kept as ranges so that a large write gets one contiguous
//! run where it can (one `pwrite`, and later one `pread`). A slot the map stops
//! referencing is not free at once: it waits in `pending` with the sequence
//! number of the journal record that dropped it, and becomes reusable only
//! when that record is durable (a crash before would bring the old reference
//! back, pointing at overwritten data) and no reader that might still be
//! reading it is running (see `Inner::reuse` in pool.rs).

use std::collections::BTreeMap;

/// A set of slot ranges, merged on insert.
#[derive(Default)]
struct Ranges {
    /// start → length.
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl Ranges {
    fn insert(&mut self, start: u64, len: u64) {
        self.total += len;
        let (mut start, mut len) = (start, len);
        if let Some((&ps, &pl)) = self.map.range(..start).next_back() {
            if ps + pl == start {
                self.map.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(nl) = self.map.remove(&(start + len)) {
            len += nl;
        }
        self.map.insert(start, len);
    }

    /// Takes up to `n` slots, lowest first, appending runs to `out`;
    /// returns how many it took.
    fn take(&mut self, n: u64, out: &mut Vec<(u64, u64)>) -> u64 {
        let mut got = 0;
        while got < n {
            let Some((&start, &len)) = self.map.iter().next() else {
                break;
            };
            self.map.remove(&start);
            let take = len.min(n - got);
            if take < len {
                self.map.insert(start + take, len - take);
            }
            out.push((start, take));
            got += take;
        }
        self.total -= got;
        got
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
    /// (seq of the dropping record, slot, may stay warm).
    pending: Vec<(u64, u64, bool)>,
}

/// A run of slots: (first, count).
pub type Run = (u64, u64);

/// Sorted, merged ranges of a set of slots.
fn merge(mut slots: Vec<u64>) -> Vec<Run> {
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

    /// Every free slot, as runs.
    pub fn free_ranges(&self) -> Vec<Run> {
        let mut v: Vec<Run> = self
            .warm
            .map
            .iter()
            .chain(&self.cold.map)
            .map(|(&s, &l)| (s, l))
            .collect();
        v.sort_unstable();
        v
    }

    /// Hands out `n` slots as runs (start, len): warm ones first, then
    /// punched ones, then new ones at the end of the file.
    pub fn alloc(&mut self, n: u64) -> Vec<(u64, u64)> {
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

    /// Remembers a slot dropped by the record with sequence `seq`. `warm`:
    /// the slot was overwritten (its space may be kept for reuse); otherwise
    /// it was trimmed or its snapshot or volume deleted, and its space goes
    /// back to the filesystem.
    pub fn defer(&mut self, seq: u64, slot: u64, warm: bool) {
        self.pending.push((seq, slot, warm));
    }

    /// Takes the pending slots whose dropping record is durable (seq ≤ upto),
    /// as merged ranges: (may stay warm, to punch).
    pub fn take_durable(&mut self, upto: u64) -> (Vec<Run>, Vec<Run>) {
        let mut warm: Vec<u64> = Vec::new();
        let mut cold: Vec<u64> = Vec::new();
        self.pending.retain(|&(seq, slot, w)| {
            if seq <= upto {
                if w { &mut warm } else { &mut cold }.push(slot);
                false
            } else {
                true
            }
        });
        (merge(warm), merge(cold))
    }

    /// Makes durable-freed ranges reusable. `warm` ranges stay allocated as
    /// far as the warm reserve (`warm_cap` plus `warm_percent` of the slots
    /// still in use) has room; the rest, all of `cold`, and whatever the
    /// reserve holds beyond its (possibly shrunken) size are returned for
    /// the caller to punch and hand to [`Alloc::release_punched`].
    pub fn release(&mut self, warm: &[Run], cold: &[Run]) -> Vec<Run> {
        let freed: u64 = warm.iter().chain(cold).map(|r| r.1).sum();
        let used = self
            .high
            .saturating_sub(self.warm.total + self.cold.total + self.pending.len() as u64 + freed);
        let cap = self.warm_cap + used * self.warm_percent / 100;
        let mut punch = cold.to_vec();
        for &(s, l) in warm {
            let room = cap.saturating_sub(self.warm.total).min(l);
            if room > 0 {
                self.warm.insert(s, room);
            }
            if room < l {
                punch.push((s + room, l - room));
            }
        }
        // Data deleted since the reserve filled up shrinks it.
        if self.warm.total > cap {
            self.warm.take(self.warm.total - cap, &mut punch);
        }
        punch
    }

    /// Makes punched ranges reusable.
    pub fn release_punched(&mut self, ranges: &[(u64, u64)]) {
        for &(s, l) in ranges {
            self.cold.insert(s, l);
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
            a.defer(1, s, true);
        }
        let (warm, cold) = a.take_durable(1);
        assert!(cold.is_empty());
        assert!(a.release(&warm, &[]).is_empty());
        // 150 more freed: 50 in use, the reserve shrinks to 10 + 25 = 35, so
        // all 150 are punched and so are 65 of the 100 kept before.
        for s in 100..250 {
            a.defer(2, s, true);
        }
        let (warm, _) = a.take_durable(2);
        let punch = a.release(&warm, &[]);
        assert_eq!(punch, vec![(100, 150), (0, 65)]);
        a.release_punched(&punch);
        // Trims and deletions always give space back: 40 of the last 50
        // go, 10 stay in use, and the reserve shrinks to 15.
        for s in 250..290 {
            a.defer(3, s, false);
        }
        let (warm, cold) = a.take_durable(3);
        assert!(warm.is_empty());
        assert_eq!(a.release(&warm, &cold), vec![(250, 40), (65, 20)]);
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
        a.defer(10, 3, true);
        a.defer(12, 4, true);
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
                a.defer(20, x, true);
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
