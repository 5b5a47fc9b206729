//! `store::Volume` as an NBD [`Export`], and the one function that turns
//! store errors into NBD error values ([`nbd_errno`]).

use super::export::{Export, ExportError, ExportSource, OpenError, BASE_ALLOCATION};
use super::proto::{Errno, StatusExtent, STATE_HOLE, STATE_ZERO};

/// Prefix of the change-tracking contexts: `qemu:dirty-bitmap:A` reports
/// every block written after point `A` of the same volume (up to now on the
/// head, up to the exported point on `vol@B`), like `qemu-nbd -B`.
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// `NBD_STATE_DIRTY` in a `qemu:dirty-bitmap:*` context.
const STATE_DIRTY: u32 = 1;
use std::sync::Arc;
use store::{ErrorKind, ExtentKind};

/// Where the binary's exports come from: every name for NBD_OPT_LIST, and
/// `open` by name (`"vol"` → the head, read-write; `"vol@snap"` → a
/// read-only snapshot). Both may block.
pub trait ExportProvider: Send + Sync + 'static {
    fn list(&self) -> Vec<String>;
    fn open(&self, name: &str) -> Result<store::Volume, store::Error>;
}

/// The NBD error value for a store error kind. Every store error that
/// reaches a client goes through here.
pub fn nbd_errno(kind: ErrorKind) -> Errno {
    match kind {
        ErrorKind::Corruption | ErrorKind::Io => Errno::Io,
        ErrorKind::ReadOnly => Errno::Perm,
        ErrorKind::NoSpace => Errno::NoSpc,
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::InvalidName => Errno::Inval,
        // The device vanished under an open connection (deleted, or its pool
        // closed): nothing the client can fix by changing the request.
        ErrorKind::NotFound | ErrorKind::Deleted | ErrorKind::Locked | ErrorKind::AlreadyExists => {
            Errno::Io
        }
    }
}

fn export_error(e: store::Error) -> ExportError {
    ExportError::new(nbd_errno(e.kind()), e.to_string())
}

/// For WRITE and WRITE_ZEROES: past the end is ENOSPC there (the spec),
/// which the store reports when the volume shrank under the connection.
fn write_error(e: store::Error) -> ExportError {
    match e.kind() {
        ErrorKind::OutOfRange => ExportError::new(Errno::NoSpc, e.to_string()),
        _ => export_error(e),
    }
}

/// How a failed open is answered during negotiation.
fn open_error(e: &store::Error) -> OpenError {
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::InvalidName | ErrorKind::Deleted => {
            OpenError::Unknown(e.to_string())
        }
        ErrorKind::Locked => OpenError::Policy(e.to_string()),
        _ => OpenError::Failed(e.to_string()),
    }
}

/// Adapts an [`ExportProvider`] to the server's [`ExportSource`].
pub(super) struct ProviderSource(pub Arc<dyn ExportProvider>);

impl ExportSource for ProviderSource {
    fn list(&self) -> Vec<String> {
        self.0.list()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        match self.0.open(name) {
            Ok(vol) => Ok(Arc::new(VolumeExport {
                name: name.to_owned(),
                points: parking_lot::Mutex::new(vol.older_point_ids().into_iter().collect()),
                vol,
            })),
            Err(e) => Err(open_error(&e)),
        }
    }
}

/// One connection's handle on a volume head or snapshot.
struct VolumeExport {
    /// The export name the client used (`vol` or `vol@snap`).
    name: String,
    vol: store::Volume,
    /// The snapshot each `qemu:dirty-bitmap:NAME` stands for on this
    /// connection: those of its start, and others as first asked for. A
    /// snapshot deleted and taken again under its name is another one, so
    /// the context fails then instead of quietly comparing with it.
    points: parking_lot::Mutex<std::collections::HashMap<String, store::PointId>>,
}

/// CACHE reads the range in pieces this large.
const CACHE_CHUNK: u64 = 1 << 20;

impl Export for VolumeExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> Option<String> {
        Some(match self.vol.snapshot() {
            Some(s) => format!("snapshot {s} of volume {} (read-only)", self.vol.name()),
            None => format!("volume {}", self.vol.name()),
        })
    }

    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn read_only(&self) -> bool {
        self.vol.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        self.vol.read_at(buf, offset).map_err(export_error)
    }

    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool, ExportError> {
        self.vol.read_at_cached(buf, offset).map_err(export_error)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        self.vol.write_at(data, offset, fua).map_err(write_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.vol.trim(offset, len, fua).map_err(export_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.vol
            .write_zeroes(offset, len, no_hole, fua)
            .map_err(write_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.vol.flush().map_err(export_error)
    }

    /// Reads the range and throws the data away: the blocks land in the page
    /// cache, and damage shows up now rather than on the real read.
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let mut buf = vec![0u8; len.min(CACHE_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CACHE_CHUNK) as usize;
            self.vol
                .read_at(&mut buf[..n], offset + done)
                .map_err(export_error)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zeroing is metadata-only in the store, with or without NO_HOLE.
    fn fast_zero(&self, _no_hole: bool) -> bool {
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut v = vec![BASE_ALLOCATION.to_owned()];
        v.extend(
            self.vol
                .older_points()
                .into_iter()
                .map(|p| format!("{DIRTY_BITMAP}{p}")),
        );
        v
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, ExportError> {
        if let Some(point) = context.strip_prefix(DIRTY_BITMAP) {
            return self.dirty_status(point, offset, u64::from(len));
        }
        if context != BASE_ALLOCATION {
            return Err(ExportError::new(
                Errno::Inval,
                format!("unknown metadata context {context}"),
            ));
        }
        let extents = self
            .vol
            .extents(offset, u64::from(len))
            .map_err(export_error)?;
        Ok(extents
            .into_iter()
            .filter(|e| e.length > 0)
            .map(|e| StatusExtent {
                // Extents are clipped to the request, itself < 4 GiB.
                length: u32::try_from(e.length).unwrap_or(u32::MAX),
                flags: allocation_flags(e.kind),
            })
            .collect())
    }
}

impl VolumeExport {
    /// `qemu:dirty-bitmap:POINT` descriptors for `[offset, offset+len)`:
    /// alternating clean (0) and dirty runs, consecutive from `offset`.
    fn dirty_status(
        &self,
        point: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, ExportError> {
        let end = offset.saturating_add(len).min(self.vol.size());
        if end <= offset {
            return Ok(Vec::new());
        }
        let known = self.points.lock().get(point).copied();
        let id = match known {
            Some(id) => id,
            None => {
                let id = self.vol.point_id(point).map_err(export_error)?;
                *self.points.lock().entry(point.to_owned()).or_insert(id)
            }
        };
        let dirty = self
            .vol
            .changed_since_id(point, id, offset, end - offset)
            .map_err(export_error)?;
        let mut out = Vec::with_capacity(dirty.len() * 2 + 1);
        let mut pos = offset;
        let mut push = |from: u64, to: u64, flags: u32| {
            if to > from {
                out.push(StatusExtent {
                    length: u32::try_from(to - from).unwrap_or(u32::MAX),
                    flags,
                });
            }
        };
        for (o, l) in dirty {
            push(pos, o, 0);
            push(o, o + l, STATE_DIRTY);
            pos = o + l;
        }
        push(pos, end, 0);
        Ok(out)
    }
}

/// `base:allocation` flags of a store extent.
fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero => STATE_ZERO,
        ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_nbd_errors() {
        assert_eq!(nbd_errno(ErrorKind::Io), Errno::Io);
        assert_eq!(nbd_errno(ErrorKind::Corruption), Errno::Io);
        assert_eq!(nbd_errno(ErrorKind::ReadOnly), Errno::Perm);
        assert_eq!(nbd_errno(ErrorKind::NoSpace), Errno::NoSpc);
        assert_eq!(nbd_errno(ErrorKind::InvalidArgument), Errno::Inval);
        assert_eq!(nbd_errno(ErrorKind::OutOfRange), Errno::Inval);
        assert_eq!(nbd_errno(ErrorKind::Deleted), Errno::Io);
    }

    #[test]
    fn allocation_flags_follow_the_spec() {
        assert_eq!(allocation_flags(ExtentKind::Data), 0);
        assert_eq!(allocation_flags(ExtentKind::Zero), 2);
        assert_eq!(allocation_flags(ExtentKind::Hole), 3);
    }
}
