//! Descriptors as the walkers read them: decoding, and indirect tables (translated once when
//! they lie in one region, entry by entry otherwise). Tables live in buffer memory, not in the
//! cached rings.

use vireo_memory::{Batch, GuestPhysAddr, Perm};

use crate::chain::{Descriptor, MAX_INDIRECT};
use crate::error::QueueError;
use crate::rings::{Area, RingAccess};

/// A descriptor from its two little-endian 64-bit words (two single loads: a volatile read of
/// the 16-byte struct itself compiles to byte-sized pieces).
#[inline(always)]
pub(crate) fn desc_from_words(lo: u64, hi: u64) -> Descriptor {
    let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
    // `hi` holds len (bits 0-31), then two 16-bit fields; the truncations take those fields.
    #[allow(clippy::cast_possible_truncation)]
    Descriptor { addr: lo, len: hi as u32, flags_or_id: (hi >> 32) as u16, next_or_flags: (hi >> 48) as u16 }
}

#[inline(always)]
pub(crate) fn read_desc<R: RingAccess>(r: &R, index: u16) -> Result<Descriptor, QueueError> {
    let off = 16 * usize::from(index);
    Ok(desc_from_words(r.read::<u64>(Area::Desc, off)?, r.read::<u64>(Area::Desc, off + 8)?))
}

/// An indirect table: translated once when it lies in one region (the usual case), entry by
/// entry otherwise. Tables live in buffer memory, not in the cached rings.
pub(crate) struct Table<'m, 'q> {
    mem: &'m Batch<'q>,
    addr: u64,
    whole: Option<vireo_memory::GuestSlice<'m>>,
}

impl<'m, 'q> Table<'m, 'q> {
    pub(crate) fn new(mem: &'m Batch<'q>, addr: u64, len: u32) -> Self {
        Self { mem, addr, whole: mem.translate(GuestPhysAddr::new(addr), u64::from(len), Perm::READ).ok() }
    }

    #[inline(always)]
    pub(crate) fn entry(&self, i: u32) -> Result<Descriptor, QueueError> {
        // i < 32768 (indirect_entries), so the offset cannot overflow.
        let off = 16 * i as usize;
        if let Some(t) = &self.whole {
            if let (Some(lo), Some(hi)) = (t.get::<u64>(off), t.get::<u64>(off + 8)) {
                return Ok(desc_from_words(lo, hi));
            }
        }
        self.entry_slow(i)
    }

    /// A table that spans regions: each entry translated on its own.
    #[cold]
    fn entry_slow(&self, i: u32) -> Result<Descriptor, QueueError> {
        let gpa = GuestPhysAddr::new(self.addr.wrapping_add(16 * u64::from(i)));
        let s = self.mem.translate(gpa, 16, Perm::READ).map_err(|e| QueueError::mem(gpa, 16, e))?;
        let lo = s.read::<u64>(0).map_err(|e| QueueError::mem(gpa, 16, e))?;
        let hi = s.read::<u64>(8).map_err(|e| QueueError::mem(gpa, 16, e))?;
        Ok(desc_from_words(lo, hi))
    }
}

pub(crate) fn indirect_entries(head: u16, d: &Descriptor) -> Result<u32, QueueError> {
    if d.len == 0 || !d.len.is_multiple_of(16) {
        return Err(QueueError::Indirect { head, what: "table length is not a non-zero multiple of 16" });
    }
    let n = d.len / 16;
    if n > MAX_INDIRECT {
        return Err(QueueError::Indirect { head, what: "table longer than 32768 entries" });
    }
    if d.addr.checked_add(u64::from(d.len)).is_none() {
        return Err(QueueError::Indirect { head, what: "table wraps around" });
    }
    Ok(n)
}
