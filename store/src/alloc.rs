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

#[derive(Default)]
pub struct Alloc {
    /// start → length of free ranges below `high`.
    free: BTreeMap<u64, u64>,
    /// Slots at or above this have never been handed out.
    pub high: u64,
    /// (seq of the dropping record, slot).
    pending: Vec<(u64, u64)>,
}

impl Alloc {
    /// An allocator where `used` (sorted, deduplicated) are taken and
    /// everything else below `high` is free.
    pub fn rebuild(used: &[u64], high: u64) -> Alloc {
        let mut a = Alloc {
            high,
            ..Default::default()
        };
        let mut next = 0;
        for &s in used {
            if s > next {
                a.free.insert(next, s - next);
            }
            next = s + 1;
        }
        if high > next {
            a.free.insert(next, high - next);
        }
        a
    }

    /// Hands out `n` slots as runs (start, len), lowest free first.
    pub fn alloc(&mut self, mut n: u64) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        while n > 0 {
            let Some((&start, &len)) = self.free.iter().next() else {
                break;
            };
            self.free.remove(&start);
            let take = len.min(n);
            if take < len {
                self.free.insert(start + take, len - take);
            }
            runs.push((start, take));
            n -= take;
        }
        if n > 0 {
            runs.push((self.high, n));
            self.high += n;
        }
        runs
    }

    /// Gives back slots that were never referenced by a journal record.
    pub fn give_back(&mut self, slot: u64) {
        self.insert_free(slot, 1);
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        let mut start = start;
        let mut len = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// Remembers a slot dropped by the record with sequence `seq`.
    pub fn defer(&mut self, seq: u64, slot: u64) {
        self.pending.push((seq, slot));
    }

    /// Takes the pending slots whose dropping record is durable (seq ≤ upto),
    /// as merged ranges; the caller punches them and calls [`Alloc::release`].
    pub fn take_durable(&mut self, upto: u64) -> Vec<(u64, u64)> {
        let mut slots: Vec<u64> = Vec::new();
        self.pending.retain(|&(seq, slot)| {
            if seq <= upto {
                slots.push(slot);
                false
            } else {
                true
            }
        });
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

    /// Makes ranges from [`Alloc::take_durable`] free for reuse.
    pub fn release(&mut self, ranges: &[(u64, u64)]) {
        for &(s, l) in ranges {
            self.insert_free(s, l);
        }
    }

    /// Number of free slots below `high` (for statistics).
    pub fn free_slots(&self) -> u64 {
        self.free.values().sum()
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
    fn rebuild_alloc_release() {
        let mut a = Alloc::rebuild(&[1, 2, 5], 8);
        assert_eq!(a.free_slots(), 5);
        assert_eq!(a.alloc(2), vec![(0, 1), (3, 1)]);
        assert_eq!(a.alloc(4), vec![(4, 1), (6, 2), (8, 1)]);
        assert_eq!(a.high, 9);
        a.defer(10, 3);
        a.defer(12, 4);
        assert_eq!(a.take_durable(11), vec![(3, 1)]);
        a.release(&[(3, 1)]);
        assert_eq!(a.pending_slots(), 1);
        assert_eq!(a.take_durable(12), vec![(4, 1)]);
        a.release(&[(4, 1)]);
        assert_eq!(a.alloc(3), vec![(3, 2), (9, 1)]);
    }
}
