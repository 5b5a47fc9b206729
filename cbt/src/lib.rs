//! # snapgate CBT: changed-block tracking by epoch
//!
//! Every volume's life is cut into *epochs* by its snapshots: epoch `e` is
//! the time between the snapshot before it and the snapshot taken at `e`
//! (the head's epoch is the one still open). A [`Tracker`] keeps, per epoch,
//! a sparse [`Bitmap`] with one bit per tracking block (default 64 KiB):
//! the blocks written, trimmed or zeroed during that epoch.
//!
//! ## How it is fed, and why no write is missed
//! The store marks the blocks of every write, trim and write-zeroes in the
//! bitmap of the write's epoch while it holds the volume's write lock, right
//! after applying the map change and before the request returns. Taking a
//! snapshot needs the same lock and ends the epoch, so every write lands in
//! exactly one epoch: the one its map entry was born in. A consumer that
//! reads a bitmap after a snapshot can never miss a write that completed
//! before it.
//!
//! ## Persistence
//! The bitmaps are an index over the store's redirect-on-write map, whose
//! entries are keyed by (block, birth epoch) and are made durable by the
//! store's checksummed journal and checkpoints together with the data they
//! point to (same `flush`, same FUA). When a volume is opened, its tracker is
//! rebuilt from those entries: each entry marks its block in the bitmap of
//! the epoch it was born in (or of the next live snapshot's epoch when the
//! epoch's snapshot was deleted). A durable write therefore always has a
//! durable entry, so after a crash the rebuilt bitmaps still cover every
//! durable change: no false negatives, no "everything dirty" fallback, no
//! data read. (A block written and trimmed back to a hole within one epoch
//! may lose its bit across a restart; its content did not change.)
//!
//! ## Diffs and deletion
//! `diff(A, B)` is the union of the bitmaps of the epochs after `A` up to and
//! including `B` (or the head's): bitmap-only, no data or map reads. Deleting
//! the snapshot of epoch `e` merges `e`'s bitmap into the next live epoch's,
//! so diffs across a deleted snapshot stay correct.

use bitvec::prelude::*;
use std::collections::BTreeMap;

/// Bits per bitmap chunk: 4096 bits, 512 bytes, covering 256 MiB at 64 KiB
/// (small, so scattered writes over a huge volume cost little memory).
const CHUNK_BITS: u64 = 1 << 12;

/// A sparse bitmap: only chunks with set bits take memory.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Bitmap {
    chunks: BTreeMap<u64, BitBox<u64, Lsb0>>,
}

impl Bitmap {
    /// An empty bitmap.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets bits `[lo, hi)`.
    pub fn set_range(&mut self, lo: u64, hi: u64) {
        let mut b = lo;
        while b < hi {
            let c = b / CHUNK_BITS;
            let end = hi.min((c + 1) * CHUNK_BITS);
            let chunk = self
                .chunks
                .entry(c)
                .or_insert_with(|| bitbox![u64, Lsb0; 0; CHUNK_BITS as usize]);
            chunk[(b - c * CHUNK_BITS) as usize..(end - c * CHUNK_BITS) as usize].fill(true);
            b = end;
        }
    }

    /// Whether bit `b` is set.
    pub fn get(&self, b: u64) -> bool {
        self.chunks
            .get(&(b / CHUNK_BITS))
            .is_some_and(|c| c[(b % CHUNK_BITS) as usize])
    }

    /// ORs `self` into `other`.
    pub fn or_into(&self, other: &mut Bitmap) {
        for (k, c) in &self.chunks {
            match other.chunks.get_mut(k) {
                Some(o) => *o |= c.as_bitslice(),
                None => {
                    other.chunks.insert(*k, c.clone());
                }
            }
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.chunks.values().map(|c| c.count_ones() as u64).sum()
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Runs of set bits within `[lo, hi)` as `(start, len)`, ascending.
    pub fn runs(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        if lo >= hi {
            return out;
        }
        for (&k, c) in self.chunks.range(lo / CHUNK_BITS..=(hi - 1) / CHUNK_BITS) {
            let base = k * CHUNK_BITS;
            let from = lo.saturating_sub(base).min(CHUNK_BITS) as usize;
            let to = (hi - base).min(CHUNK_BITS) as usize;
            for i in c[from..to].iter_ones() {
                let bit = base + (from + i) as u64;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == bit => *l += 1,
                    _ => out.push((bit, 1)),
                }
            }
        }
        out
    }

    /// Bytes of memory the bitmap's chunks take.
    pub fn memory_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_BITS / 8
    }
}

/// Default tracking block: 64 KiB.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// The change tracker of one volume: one bitmap per epoch.
#[derive(Clone, Debug)]
pub struct Tracker {
    /// log2 of the granularity; 0 when tracking is off.
    shift: u32,
    epochs: BTreeMap<u32, Bitmap>,
}

impl Tracker {
    /// A tracker with `granularity` bytes per bit (a power of two ≥ 512).
    pub fn new(granularity: u64) -> Self {
        assert!(granularity.is_power_of_two() && granularity >= 512);
        Tracker {
            shift: granularity.trailing_zeros(),
            epochs: BTreeMap::new(),
        }
    }

    /// A tracker that records nothing (tracking switched off).
    pub fn disabled() -> Self {
        Tracker {
            shift: 0,
            epochs: BTreeMap::new(),
        }
    }

    /// Whether changes are recorded.
    pub fn enabled(&self) -> bool {
        self.shift != 0
    }

    /// Bytes per bit; 0 when tracking is off.
    pub fn granularity(&self) -> u64 {
        if self.enabled() {
            1 << self.shift
        } else {
            0
        }
    }

    /// Records that `[offset, offset+len)` changed in `epoch`.
    pub fn mark(&mut self, epoch: u32, offset: u64, len: u64) {
        if len == 0 || !self.enabled() {
            return;
        }
        let lo = offset >> self.shift;
        let hi = (offset + len - 1) >> self.shift;
        self.epochs.entry(epoch).or_default().set_range(lo, hi + 1);
    }

    /// Folds epoch `from` (a deleted snapshot's) into epoch `into` (the next
    /// live snapshot's, or the head's).
    pub fn merge(&mut self, from: u32, into: u32) {
        if let Some(b) = self.epochs.remove(&from) {
            b.or_into(self.epochs.entry(into).or_default());
        }
    }

    /// The bitmap of one epoch, if anything changed in it.
    pub fn epoch(&self, epoch: u32) -> Option<&Bitmap> {
        self.epochs.get(&epoch)
    }

    /// Byte ranges within `[offset, offset+len)` changed in epochs
    /// `after < e ≤ upto`, at tracking granularity (clipped to the range).
    pub fn changed(&self, after: u32, upto: u32, offset: u64, len: u64) -> Vec<(u64, u64)> {
        if len == 0 || after >= upto || !self.enabled() {
            return Vec::new();
        }
        let end = offset.saturating_add(len);
        let lo = offset >> self.shift;
        let hi = ((end - 1) >> self.shift) + 1;
        let mut sel: Vec<&Bitmap> = self
            .epochs
            .range(after + 1..=upto)
            .map(|(_, b)| b)
            .collect();
        let merged;
        let map: &Bitmap = match sel.len() {
            0 => return Vec::new(),
            1 => sel.pop().unwrap(),
            _ => {
                let mut m = Bitmap::new();
                for b in sel {
                    // Only the chunks of the asked range matter.
                    for (k, c) in b.chunks.range(lo / CHUNK_BITS..=(hi - 1) / CHUNK_BITS) {
                        match m.chunks.get_mut(k) {
                            Some(o) => *o |= c.as_bitslice(),
                            None => {
                                m.chunks.insert(*k, c.clone());
                            }
                        }
                    }
                }
                merged = m;
                &merged
            }
        };
        map.runs(lo, hi)
            .into_iter()
            .map(|(s, l)| {
                let a = (s << self.shift).max(offset);
                let b = ((s + l) << self.shift).min(end);
                (a, b - a)
            })
            .collect()
    }

    /// Memory taken by all bitmaps.
    pub fn memory_bytes(&self) -> u64 {
        self.epochs.values().map(|b| b.memory_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_runs_or() {
        let mut b = Bitmap::new();
        b.set_range(3, 5);
        b.set_range(CHUNK_BITS - 1, CHUNK_BITS + 2);
        assert_eq!(b.runs(0, u64::MAX), vec![(3, 2), (CHUNK_BITS - 1, 3)]);
        assert_eq!(b.runs(4, CHUNK_BITS), vec![(4, 1), (CHUNK_BITS - 1, 1)]);
        assert_eq!(b.count(), 5);
        let mut c = Bitmap::new();
        c.set_range(5, 6);
        b.or_into(&mut c);
        assert_eq!(c.runs(0, 10), vec![(3, 3)]);
        assert!(c.get(5) && !c.get(6));
    }

    #[test]
    fn tracker_epochs_merge() {
        let mut t = Tracker::new(65536);
        t.mark(0, 0, 1); // before snapshot A (epoch 0)
        t.mark(1, 65536 * 3 + 5, 10); // after A, before B (epoch 1)
        t.mark(2, 65536 * 7, 65537); // after B (head, epoch 2)
        assert_eq!(
            t.changed(0, u32::MAX, 0, 1 << 30),
            vec![(65536 * 3, 65536), (65536 * 7, 65536 * 2)]
        );
        assert_eq!(t.changed(0, 1, 0, 1 << 30), vec![(65536 * 3, 65536)]);
        assert_eq!(t.changed(1, 2, 0, 65536 * 8), vec![(65536 * 7, 65536)]);
        // Deleting B (epoch 1) folds it into the head's epoch.
        t.merge(1, 2);
        assert_eq!(
            t.changed(0, 2, 0, 1 << 30),
            vec![(65536 * 3, 65536), (65536 * 7, 65536 * 2)]
        );
        assert!(t.changed(2, 2, 0, 1 << 30).is_empty());
    }

    proptest! {
        #[test]
        fn changed_matches_a_plain_model(marks in proptest::collection::vec((0u32..5, 0u64..1 << 24, 1u64..1 << 20), 0..40),
                                         after in 0u32..5, upto in 0u32..6, off in 0u64..1 << 24, len in 1u64..1 << 24) {
            let g = 1u64 << 16;
            let mut t = Tracker::new(g);
            let nblocks = ((1u64 << 25) / g) as usize;
            let mut model = vec![vec![false; nblocks]; 6];
            for &(e, o, l) in &marks {
                t.mark(e, o, l);
                for b in o / g..=(o + l - 1) / g {
                    model[e as usize][b as usize] = true;
                }
            }
            let got = t.changed(after, upto, off, len);
            let mut want: Vec<(u64, u64)> = Vec::new();
            for b in off / g..=(off + len - 1) / g {
                let dirty = (after + 1..=upto).any(|e| model[e as usize][b as usize]);
                if dirty {
                    let a = (b * g).max(off);
                    let z = ((b + 1) * g).min(off + len);
                    match want.last_mut() {
                        Some((s, l)) if *s + *l == a => *l += z - a,
                        _ => want.push((a, z - a)),
                    }
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
