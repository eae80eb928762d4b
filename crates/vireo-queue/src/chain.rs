//! Descriptor chains as the device sees them: validated, and resolved into host segments.

use vireo_memory::{Batch, GuestPhysAddr, GuestSlice, IoPin, Perm};

use crate::error::QueueError;

/// A descriptor as it sits in a split descriptor table or an indirect table (virtio 1.x 2.7.5),
/// or in a packed ring (2.8.13, where `next` is the buffer id and the flags have more bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Descriptor {
    /// Guest physical address of the buffer (little endian).
    pub addr: u64,
    /// Length of the buffer (little endian).
    pub len: u32,
    /// Split: flags. Packed: the buffer id.
    pub flags_or_id: u16,
    /// Split: the next descriptor. Packed: the flags.
    pub next_or_flags: u16,
}

/// VIRTQ_DESC_F_NEXT.
pub const DESC_F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
pub const DESC_F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
pub const DESC_F_INDIRECT: u16 = 4;
/// Packed: VIRTQ_DESC_F_AVAIL.
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Packed: VIRTQ_DESC_F_USED.
pub const DESC_F_USED: u16 = 1 << 15;

/// The most entries an indirect table may have (the largest queue size virtio allows).
pub const MAX_INDIRECT: u32 = 32768;

/// One contiguous piece of a buffer in host memory.
///
/// `repr(C)`, with the length, slot and right in the third word, so that the cached walkers
/// write a segment with three stores ([`RawSeg::write`]).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct RawSeg {
    pub host: usize,
    /// Guest physical address (what the dirty log records; behind an IOTLB not the IOVA the
    /// descriptor named).
    pub gpa: u64,
    pub len: u32,
    /// The protocol slot of the region it is in (what an I/O pins).
    pub slot: u16,
    pub writable: bool,
}

const _: () = {
    assert!(std::mem::size_of::<RawSeg>() == 24);
    assert!(std::mem::offset_of!(RawSeg, len) == 16);
    assert!(std::mem::offset_of!(RawSeg, slot) == 20);
    assert!(std::mem::offset_of!(RawSeg, writable) == 22);
    // `RawSeg::write` stores the third word as one u64: its low bytes are `len`'s.
    assert!(cfg!(target_endian = "little"));
};

impl RawSeg {
    /// The third word of a segment of `len` bytes in `slot` (`slot_word`: the slot shifted to
    /// bits 32-47), `writable` (0 or 1) or not.
    #[inline(always)]
    pub fn meta(len: u32, slot_word: u64, writable: u64) -> u64 {
        u64::from(len) | slot_word | (writable << 48)
    }

    /// `slot` where [`RawSeg::meta`] wants it.
    #[inline(always)]
    pub fn slot_word(slot: u16) -> u64 {
        u64::from(slot) << 32
    }

    /// Writes the segment at `host`, `gpa` with the third word `meta` (from [`RawSeg::meta`])
    /// to `out`, as three words.
    ///
    /// # Safety
    /// `out` is valid for writing a `RawSeg` (aligned, in an allocation). `meta`'s bits 48-55
    /// are 0 or 1 (a `bool`) and its bits 56-63 zero (padding): `meta` guarantees both when
    /// `writable` is 0 or 1.
    #[inline(always)]
    pub unsafe fn write(out: *mut RawSeg, host: usize, gpa: u64, meta: u64) {
        let w = out.cast::<u64>();
        // SAFETY: the caller's contract; the layout is fixed by repr(C) and checked above
        // (host at 0, gpa at 8, len/slot/writable at 16-22 of a little-endian word), and every
        // byte written holds a valid value of its field.
        unsafe {
            w.write(host as u64);
            w.add(1).write(gpa);
            w.add(2).write(meta);
        }
    }
}

/// A chain's byte totals and whether a writable buffer was seen: read and written as one unit,
/// so that a walk's next step loads what the last one stored in one piece (two 32-bit stores
/// read back as one 64-bit load cannot be forwarded: a stall per descriptor).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub(crate) struct Totals {
    pub readable: u32,
    pub writable: u32,
    pub seen_writable: bool,
}

/// The segments of the chain being built, reused from chain to chain (no allocation once warm).
#[derive(Debug, Default)]
pub(crate) struct Segments {
    pub segs: Vec<RawSeg>,
    pub totals: Totals,
}

impl Segments {
    pub fn clear(&mut self) {
        self.segs.clear();
        self.totals = Totals::default();
    }

    /// Adds one descriptor's buffer: checks it and translates it (pinning its regions), split
    /// where it crosses regions.
    #[inline(always)]
    pub fn push(&mut self, mem: &Batch<'_>, head: u16, addr: u64, len: u32, writable: bool) -> Result<(), QueueError> {
        if len == 0 {
            return Err(QueueError::ZeroLength { head });
        }
        let mut t = self.totals;
        if writable {
            t.seen_writable = true;
            t.writable = t.writable.checked_add(len).ok_or_else(|| QueueError::LengthOverflow { head })?;
        } else {
            if t.seen_writable {
                return Err(QueueError::ReadableAfterWritable { head });
            }
            t.readable = t.readable.checked_add(len).ok_or_else(|| QueueError::LengthOverflow { head })?;
        }
        t.readable.checked_add(t.writable).ok_or_else(|| QueueError::LengthOverflow { head })?;
        self.totals = t;
        // The common case: the whole buffer in one region.
        if let Some(p) = mem.translate_fast(GuestPhysAddr::new(addr), len, writable) {
            self.segs.push(RawSeg { host: p.slice.as_ptr() as usize, len, gpa: p.phys.raw(), slot: p.slot, writable });
            return Ok(());
        }
        if let Ok(p) = mem.translate_piece(GuestPhysAddr::new(addr), u64::from(len), access(writable), false) {
            self.segs.push(RawSeg { host: p.slice.as_ptr() as usize, len, gpa: p.phys.raw(), slot: p.slot, writable });
            return Ok(());
        }
        self.push_split(mem, addr, len, writable)
    }

    /// A buffer that crosses regions (or is not backed at all).
    #[cold]
    fn push_split(&mut self, mem: &Batch<'_>, addr: u64, len: u32, writable: bool) -> Result<(), QueueError> {
        let mut done = 0u32;
        while done < len {
            let gpa = addr.checked_add(u64::from(done)).ok_or_else(|| {
                QueueError::mem(
                    GuestPhysAddr::new(addr),
                    u64::from(len),
                    vireo_memory::MemoryError::Unmapped { gpa: GuestPhysAddr::new(addr), len: u64::from(len) },
                )
            })?;
            let p = mem
                .translate_piece(GuestPhysAddr::new(gpa), u64::from(len - done), access(writable), true)
                .map_err(|e| QueueError::mem(GuestPhysAddr::new(gpa), u64::from(len - done), e))?;
            // A piece is at most `len - done`, which fits u32.
            let piece = u32::try_from(p.slice.len()).unwrap_or(u32::MAX);
            self.segs.push(RawSeg {
                host: p.slice.as_ptr() as usize,
                len: piece,
                gpa: p.phys.raw(),
                slot: p.slot,
                writable,
            });
            done += piece;
        }
        Ok(())
    }
}

/// The access a buffer needs: the device writes device-writable buffers and reads the others.
#[inline(always)]
pub(crate) fn access(writable: bool) -> Perm {
    if writable {
        Perm::WRITE
    } else {
        Perm::READ
    }
}

/// A popped descriptor chain: the device-readable part followed by the device-writable part,
/// in host memory. Valid until the next `pop` or the end of the batch.
#[derive(Debug)]
pub struct Chain<'c> {
    /// The id to complete the chain with (a split head index or a packed buffer id).
    pub id: u16,
    /// How many ring descriptors the chain used (what a packed queue advances by).
    pub(crate) ring_descs: u16,
    /// The segments as the walk left them, read when asked for, not copied here: a copy made
    /// right after the walk loads fields its last stores just wrote, in wider loads than those
    /// stores, which the CPU cannot forward (measured: a quarter of a pop's time).
    seg_list: &'c Segments,
}

impl<'c> Chain<'c> {
    pub(crate) fn new(id: u16, ring_descs: u16, s: &'c Segments) -> Self {
        Self { id, ring_descs, seg_list: s }
    }

    /// The segments as the walk left them (for the batch's own copies into [`crate::Buffer`]s).
    #[inline(always)]
    pub(crate) fn raw_segments(&self) -> &'c [RawSeg] {
        self.segs()
    }

    #[inline(always)]
    fn segs(&self) -> &'c [RawSeg] {
        &self.seg_list.segs
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.seg_list.totals.readable
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.seg_list.totals.writable
    }

    /// The number of host segments.
    pub fn segments(&self) -> usize {
        self.segs().len()
    }

    /// Segment `i`: its guest physical address (behind an IOTLB, what the IOVA stands for),
    /// whether the device may write it, and a view of it.
    pub fn segment(&self, i: usize) -> Option<(GuestPhysAddr, bool, GuestSlice<'c>)> {
        let s = self.segs().get(i)?;
        Some((GuestPhysAddr::new(s.gpa), s.writable, self.view(s)?))
    }

    /// The readable segments, in order.
    pub fn readable(&self) -> impl Iterator<Item = GuestSlice<'c>> + '_ {
        (0..self.segs().len()).filter_map(|i| self.segment(i)).filter(|s| !s.1).map(|s| s.2)
    }

    /// The writable segments, in order, with their guest addresses (for the dirty log).
    pub fn writable(&self) -> impl Iterator<Item = (GuestPhysAddr, GuestSlice<'c>)> + '_ {
        (0..self.segs().len()).filter_map(|i| self.segment(i)).filter(|s| s.1).map(|s| (s.0, s.2))
    }

    /// The segments as `iovec`s (base, len) for `readv`/`writev` or io_uring; the readable ones
    /// first. Using the pointers is the caller's `unsafe`, valid while the chain's batch lives
    /// or an `IoPin` holds each region.
    pub fn iovecs(&self, out: &mut Vec<(usize, usize)>) {
        out.extend(self.segs().iter().map(|s| (s.host, s.len as usize)));
    }

    /// I/O pins that keep every region the chain's buffers are in (and, behind an IOTLB, the
    /// translation) from being retired until they are dropped: for a request that goes on after
    /// the batch. `mem` is the batch the chain was popped in.
    pub fn io_pins(&self, mem: &Batch<'_>, out: &mut Vec<IoPin>) {
        mem.io_pins(self.segs().iter().map(|s| s.slot), out);
    }

    /// Logs that the device wrote the first `written` bytes of the writable part (a no-op unless
    /// dirty logging is on). `mem` is the batch's memory (`QueueBatch::memory`, taken before
    /// popping). Call after writing and before the batch ends.
    pub fn log_written(&self, mem: &Batch<'_>, written: u32) -> Result<(), QueueError> {
        if !mem.logging() {
            return Ok(());
        }
        let mut left = written;
        for (gpa, s) in self.writable() {
            if left == 0 {
                break;
            }
            let n = left.min(u32::try_from(s.len()).unwrap_or(u32::MAX));
            mem.log_write(gpa, u64::from(n)).map_err(|e| QueueError::mem(gpa, u64::from(n), e))?;
            left -= n;
        }
        Ok(())
    }

    /// A view of segment `s` of this chain.
    #[inline(always)]
    fn view(&self, s: &RawSeg) -> Option<GuestSlice<'c>> {
        let ptr = std::ptr::NonNull::new(s.host as *mut u8)?;
        // SAFETY: the segment was translated in the batch this chain borrows from, which holds
        // its region (a pin, or the cached translation of the rings' region) until it ends;
        // `'c` cannot outlive it.
        Some(unsafe { GuestSlice::new(ptr, s.len as usize) })
    }

    /// Copies the readable part, from byte `offset`, into `dst`; returns how much was copied.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        self.copy_at(false, offset, dst.len(), |view, at, done, n| view.copy_to(at, &mut dst[done..done + n]))
    }

    /// Copies `src` into the writable part from byte `offset`; returns how much was copied.
    /// The caller logs the write (`Chain::log_written`).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        self.copy_at(true, offset, src.len(), |view, at, done, n| view.copy_from(at, &src[done..done + n]))
    }

    /// The walk of [`Chain::read_at`] and [`Chain::write_at`]: `len` bytes from byte `offset`
    /// of the readable (`writable` false) or writable part, `copy(view, offset in the segment,
    /// bytes done, bytes to copy)` for each segment they touch. Over the segments as the walk
    /// left them, a view made only for a segment that is copied (a block request reads its
    /// header and writes its status byte: one view each).
    #[inline(always)]
    fn copy_at(
        &self,
        writable: bool,
        mut offset: usize,
        len: usize,
        mut copy: impl FnMut(GuestSlice<'c>, usize, usize, usize) -> Result<(), vireo_memory::MemoryError>,
    ) -> usize {
        let mut done = 0;
        for s in self.segs() {
            if done == len {
                break;
            }
            if s.writable != writable {
                continue;
            }
            let seg_len = s.len as usize;
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = (seg_len - offset).min(len - done);
            let Some(view) = self.view(s) else { break };
            if copy(view, offset, done, n).is_err() {
                break;
            }
            done += n;
            offset = 0;
        }
        done
    }
}
