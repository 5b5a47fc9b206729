//! Byte-level encoding of the metadata records kept in the journal and in
//! checkpoints. Everything is little-endian.
//!
//! A frame is `len u32 | crc32 u32 | seq u64 | payload[len]`, the CRC covering
//! `seq` and the payload. The payload's first byte is the record type.

use crate::{Loc, BLOCK};

/// Bytes before a frame's payload.
pub const FRAME_HEADER: usize = 16;
/// No frame is larger than this; a bigger length field is damage.
pub const MAX_FRAME: usize = 64 << 20;

/// One item of an [`Record::Update`]: the new location of a block in the
/// record's epoch and, optionally, an older entry of the block to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateItem {
    pub block: u64,
    pub set: Option<Loc>,
    pub drop: Option<u32>,
}

/// Where a written map page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Slot number in the `meta` file (16 KiB each).
    pub slot: u64,
    /// Unique page id: the page frame's sequence number.
    pub id: u64,
    /// Lowest and highest block with an entry in the page, for damage
    /// reports when the page cannot be read.
    pub first: u64,
    pub last: u64,
}

/// A metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    JournalHeader {
        journal_id: u64,
    },
    VolumeCreate {
        id: u32,
        size: u64,
        created_ms: u64,
        /// log2 of the change-tracking granularity in bytes.
        cbt_shift: u8,
        name: String,
    },
    VolumeResize {
        id: u32,
        size: u64,
    },
    VolumeDelete {
        id: u32,
    },
    SnapshotCreate {
        vol: u32,
        epoch: u32,
        size: u64,
        created_ms: u64,
        name: String,
    },
    SnapshotDelete {
        vol: u32,
        epoch: u32,
    },
    Update {
        vol: u32,
        birth: u32,
        items: Vec<UpdateItem>,
    },
    Drops {
        vol: u32,
        items: Vec<(u64, u32)>,
    },
    /// Every record with `seq <= upto` has its data durable.
    Sync {
        upto: u64,
    },
    CheckpointBegin {
        journal_id: u64,
        next_vol_id: u32,
        seq: u64,
        /// The id the next written map page gets.
        next_page: u64,
    },
    CheckpointVolume {
        id: u32,
        size: u64,
        created_ms: u64,
        epoch: u32,
        cbt_shift: u8,
        name: String,
    },
    /// A map page (in the `meta` file, with the page id as sequence
    /// number): entries sorted by (block, birth).
    CheckpointEntries {
        vol: u32,
        entries: Vec<(u64, u32, Loc)>,
    },
    CheckpointEnd {
        journal_id: u64,
        frames: u64,
    },
    /// Part of a volume's page directory: each page's lowest key
    /// (block, birth) and where it lives.
    CheckpointPages {
        vol: u32,
        pages: Vec<(u64, u32, PageRef)>,
    },
    /// Blocks `first..=last` of `vol` whose map entries born up to epoch
    /// `upto` were lost to damage: views that would see such an entry fail.
    CheckpointDamage {
        vol: u32,
        first: u64,
        last: u64,
        upto: u32,
    },
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn loc(&mut self, l: Loc) {
        match l {
            Loc::Hole => {
                self.u8(0);
                self.u64(0);
                self.u32(0)
            }
            Loc::Zero => {
                self.u8(1);
                self.u64(0);
                self.u32(0)
            }
            Loc::Data { slot, crc } => {
                self.u8(2);
                self.u64(slot);
                self.u32(crc)
            }
        }
    }
}

struct R<'a>(&'a [u8]);
impl R<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn loc(&mut self) -> Option<Loc> {
        let k = self.u8()?;
        let slot = self.u64()?;
        let crc = self.u32()?;
        match k {
            0 => Some(Loc::Hole),
            1 => Some(Loc::Zero),
            2 => Some(Loc::Data { slot, crc }),
            _ => None,
        }
    }
    fn count(&mut self, item_size: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(item_size)? <= self.0.len()).then_some(n)
    }
}

impl Record {
    fn encode_payload(&self, w: &mut W) {
        match self {
            Record::JournalHeader { journal_id } => {
                w.u8(1);
                w.u64(*journal_id)
            }
            Record::VolumeCreate {
                id,
                size,
                created_ms,
                cbt_shift,
                name,
            } => {
                w.u8(2);
                w.u32(*id);
                w.u64(*size);
                w.u64(*created_ms);
                w.u8(*cbt_shift);
                w.str(name)
            }
            Record::VolumeResize { id, size } => {
                w.u8(3);
                w.u32(*id);
                w.u64(*size)
            }
            Record::VolumeDelete { id } => {
                w.u8(4);
                w.u32(*id)
            }
            Record::SnapshotCreate {
                vol,
                epoch,
                size,
                created_ms,
                name,
            } => {
                w.u8(5);
                w.u32(*vol);
                w.u32(*epoch);
                w.u64(*size);
                w.u64(*created_ms);
                w.str(name)
            }
            Record::SnapshotDelete { vol, epoch } => {
                w.u8(6);
                w.u32(*vol);
                w.u32(*epoch)
            }
            Record::Update { vol, birth, items } => {
                w.u8(7);
                w.u32(*vol);
                w.u32(*birth);
                w.u32(items.len() as u32);
                for it in items {
                    w.u64(it.block);
                    w.u8(it.set.is_some() as u8 | (it.drop.is_some() as u8) << 1);
                    w.loc(it.set.unwrap_or(Loc::Hole));
                    w.u32(it.drop.unwrap_or(0));
                }
            }
            Record::Drops { vol, items } => {
                w.u8(8);
                w.u32(*vol);
                w.u32(items.len() as u32);
                for (b, e) in items {
                    w.u64(*b);
                    w.u32(*e);
                }
            }
            Record::Sync { upto } => {
                w.u8(9);
                w.u64(*upto)
            }
            Record::CheckpointBegin {
                journal_id,
                next_vol_id,
                seq,
                next_page,
            } => {
                w.u8(10);
                w.u64(*journal_id);
                w.u32(*next_vol_id);
                w.u64(*seq);
                w.u64(*next_page)
            }
            Record::CheckpointVolume {
                id,
                size,
                created_ms,
                epoch,
                cbt_shift,
                name,
            } => {
                w.u8(11);
                w.u32(*id);
                w.u64(*size);
                w.u64(*created_ms);
                w.u32(*epoch);
                w.u8(*cbt_shift);
                w.str(name)
            }
            Record::CheckpointEntries { vol, entries } => entries_payload(w, *vol, entries),
            Record::CheckpointEnd { journal_id, frames } => {
                w.u8(13);
                w.u64(*journal_id);
                w.u64(*frames)
            }
            Record::CheckpointPages { vol, pages } => {
                w.u8(14);
                w.u32(*vol);
                w.u32(pages.len() as u32);
                for (b, t, r) in pages {
                    w.u64(*b);
                    w.u32(*t);
                    w.u64(r.slot);
                    w.u64(r.id);
                    w.u64(r.first);
                    w.u64(r.last);
                }
            }
            Record::CheckpointDamage {
                vol,
                first,
                last,
                upto,
            } => {
                w.u8(15);
                w.u32(*vol);
                w.u64(*first);
                w.u64(*last);
                w.u32(*upto)
            }
        }
    }

    fn decode_payload(p: &[u8]) -> Option<Record> {
        let mut r = R(p);
        let rec = match r.u8()? {
            1 => Record::JournalHeader {
                journal_id: r.u64()?,
            },
            2 => Record::VolumeCreate {
                id: r.u32()?,
                size: r.u64()?,
                created_ms: r.u64()?,
                cbt_shift: r.u8()?,
                name: r.str()?,
            },
            3 => Record::VolumeResize {
                id: r.u32()?,
                size: r.u64()?,
            },
            4 => Record::VolumeDelete { id: r.u32()? },
            5 => Record::SnapshotCreate {
                vol: r.u32()?,
                epoch: r.u32()?,
                size: r.u64()?,
                created_ms: r.u64()?,
                name: r.str()?,
            },
            6 => Record::SnapshotDelete {
                vol: r.u32()?,
                epoch: r.u32()?,
            },
            7 => {
                let vol = r.u32()?;
                let birth = r.u32()?;
                let n = r.count(26)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let block = r.u64()?;
                    let flags = r.u8()?;
                    let loc = r.loc()?;
                    let drop = r.u32()?;
                    items.push(UpdateItem {
                        block,
                        set: (flags & 1 != 0).then_some(loc),
                        drop: (flags & 2 != 0).then_some(drop),
                    });
                }
                Record::Update { vol, birth, items }
            }
            8 => {
                let vol = r.u32()?;
                let n = r.count(12)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push((r.u64()?, r.u32()?));
                }
                Record::Drops { vol, items }
            }
            9 => Record::Sync { upto: r.u64()? },
            10 => Record::CheckpointBegin {
                journal_id: r.u64()?,
                next_vol_id: r.u32()?,
                seq: r.u64()?,
                next_page: r.u64()?,
            },
            11 => Record::CheckpointVolume {
                id: r.u32()?,
                size: r.u64()?,
                created_ms: r.u64()?,
                epoch: r.u32()?,
                cbt_shift: r.u8()?,
                name: r.str()?,
            },
            12 => {
                let vol = r.u32()?;
                let n = r.count(25)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push((r.u64()?, r.u32()?, r.loc()?));
                }
                Record::CheckpointEntries { vol, entries }
            }
            13 => Record::CheckpointEnd {
                journal_id: r.u64()?,
                frames: r.u64()?,
            },
            14 => {
                let vol = r.u32()?;
                let n = r.count(44)?;
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push((
                        r.u64()?,
                        r.u32()?,
                        PageRef {
                            slot: r.u64()?,
                            id: r.u64()?,
                            first: r.u64()?,
                            last: r.u64()?,
                        },
                    ));
                }
                Record::CheckpointPages { vol, pages }
            }
            15 => Record::CheckpointDamage {
                vol: r.u32()?,
                first: r.u64()?,
                last: r.u64()?,
                upto: r.u32()?,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(rec)
    }

    /// The length of the frame of an [`Record::Update`] of `items` items.
    pub fn update_frame_len(items: usize) -> u64 {
        (FRAME_HEADER + 13 + items * 26) as u64
    }

    /// Appends this record as one frame with sequence number `seq`.
    pub fn encode_frame(&self, seq: u64, out: &mut Vec<u8>) {
        write_frame(seq, out, |w| self.encode_payload(w));
    }
}

fn entries_payload(w: &mut W, vol: u32, entries: &[(u64, u32, Loc)]) {
    w.u8(12);
    w.u32(vol);
    w.u32(entries.len() as u32);
    for (b, e, l) in entries {
        w.u64(*b);
        w.u32(*e);
        w.loc(*l);
    }
}

/// Appends one frame whose payload `body` writes.
fn write_frame(seq: u64, out: &mut Vec<u8>, body: impl FnOnce(&mut W)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    let mut w = W(std::mem::take(out));
    body(&mut w);
    *out = w.0;
    let len = (out.len() - start - FRAME_HEADER) as u32;
    out[start + 8..start + 16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a `CheckpointEntries` frame (a map page) without building the
/// record.
pub fn encode_entries_frame(vol: u32, entries: &[(u64, u32, Loc)], seq: u64, out: &mut Vec<u8>) {
    write_frame(seq, out, |w| entries_payload(w, vol, entries));
}

/// Encoded length of a `CheckpointEntries` frame of `n` entries: header,
/// type byte, volume, count, and 25 bytes an entry.
pub fn entries_frame_len(n: usize) -> usize {
    FRAME_HEADER + 1 + 4 + 4 + 25 * n
}

/// What [`decode_frame`] found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole valid frame of `used` bytes.
    Frame {
        seq: u64,
        record: Record,
        used: usize,
    },
    /// Not enough bytes for the frame the header announces.
    Short,
    /// The bytes are not a valid frame (damage, or a torn write).
    Invalid,
}

/// Decodes the frame at the front of `buf`.
pub fn decode_frame(buf: &[u8]) -> Decoded {
    if buf.len() < FRAME_HEADER {
        return Decoded::Short;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if len == 0 || len > MAX_FRAME {
        return Decoded::Invalid;
    }
    if buf.len() < FRAME_HEADER + len {
        return Decoded::Short;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    if crc32fast::hash(&buf[8..FRAME_HEADER + len]) != crc {
        return Decoded::Invalid;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    match Record::decode_payload(&buf[FRAME_HEADER..FRAME_HEADER + len]) {
        Some(record) => Decoded::Frame {
            seq,
            record,
            used: FRAME_HEADER + len,
        },
        None => Decoded::Invalid,
    }
}

/// CRC of one stored block.
pub fn block_crc(data: &[u8]) -> u32 {
    debug_assert_eq!(data.len(), BLOCK);
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_frame_len_is_the_encoded_length() {
        for n in [0usize, 1, 7, 1024] {
            let items = (0..n as u64)
                .map(|b| UpdateItem {
                    block: b,
                    set: (b % 2 == 0).then_some(Loc::Data { slot: b, crc: 3 }),
                    drop: (b % 3 == 0).then_some(2),
                })
                .collect();
            let mut out = Vec::new();
            Record::Update {
                vol: 1,
                birth: 2,
                items,
            }
            .encode_frame(9, &mut out);
            assert_eq!(out.len() as u64, Record::update_frame_len(n));
        }
    }

    fn all_records() -> Vec<Record> {
        vec![
            Record::JournalHeader { journal_id: 7 },
            Record::VolumeCreate {
                id: 1,
                size: 1 << 40,
                created_ms: 5,
                cbt_shift: 16,
                name: "vm1".into(),
            },
            Record::VolumeResize { id: 1, size: 4096 },
            Record::VolumeDelete { id: 3 },
            Record::SnapshotCreate {
                vol: 1,
                epoch: 4,
                size: 8192,
                created_ms: 9,
                name: "s".into(),
            },
            Record::SnapshotDelete { vol: 1, epoch: 4 },
            Record::Update {
                vol: 1,
                birth: 2,
                items: vec![
                    UpdateItem {
                        block: 5,
                        set: Some(Loc::Data { slot: 9, crc: 77 }),
                        drop: Some(1),
                    },
                    UpdateItem {
                        block: 6,
                        set: None,
                        drop: Some(0),
                    },
                    UpdateItem {
                        block: 7,
                        set: Some(Loc::Zero),
                        drop: None,
                    },
                ],
            },
            Record::Drops {
                vol: 2,
                items: vec![(1, 2), (3, 4)],
            },
            Record::Sync { upto: 99 },
            Record::CheckpointBegin {
                journal_id: 3,
                next_vol_id: 4,
                seq: 10,
                next_page: 11,
            },
            Record::CheckpointVolume {
                id: 1,
                size: 1,
                created_ms: 2,
                epoch: 3,
                cbt_shift: 12,
                name: "v".into(),
            },
            Record::CheckpointEntries {
                vol: 1,
                entries: vec![(1, 2, Loc::Hole), (3, 4, Loc::Data { slot: 5, crc: 6 })],
            },
            Record::CheckpointEnd {
                journal_id: 3,
                frames: 4,
            },
            Record::CheckpointPages {
                vol: 2,
                pages: vec![(
                    10,
                    3,
                    PageRef {
                        slot: 1,
                        id: 2,
                        first: 10,
                        last: 20,
                    },
                )],
            },
            Record::CheckpointDamage {
                vol: 2,
                first: 10,
                last: 20,
                upto: 7,
            },
        ]
    }

    #[test]
    fn entries_frame_len_matches_the_encoding() {
        for n in [0usize, 1, 7, 4096] {
            let rec = Record::CheckpointEntries {
                vol: 3,
                entries: vec![(9, 2, Loc::Data { slot: 1, crc: 2 }); n],
            };
            let mut buf = Vec::new();
            rec.encode_frame(1, &mut buf);
            assert_eq!(buf.len(), entries_frame_len(n));
            let Record::CheckpointEntries { entries, .. } = &rec else {
                unreachable!()
            };
            let mut direct = Vec::new();
            encode_entries_frame(3, entries, 1, &mut direct);
            assert_eq!(direct, buf);
        }
    }

    #[test]
    fn every_record_round_trips() {
        for (i, r) in all_records().into_iter().enumerate() {
            let mut buf = Vec::new();
            r.encode_frame(i as u64, &mut buf);
            assert_eq!(
                decode_frame(&buf),
                Decoded::Frame {
                    seq: i as u64,
                    record: r.clone(),
                    used: buf.len()
                }
            );
            assert_eq!(decode_frame(&buf[..buf.len() - 1]), Decoded::Short);
            for pos in 0..buf.len() {
                let mut bad = buf.clone();
                bad[pos] ^= 0x10;
                assert!(
                    !matches!(decode_frame(&bad), Decoded::Frame { record, .. } if record == r),
                    "flip at {pos} of {r:?} went unnoticed"
                );
            }
        }
    }
}
