//! The split virtqueue (virtio 1.x 2.7): the general walker (`pop_split`, `walk_split`, generic
//! over cached and translated ring access), and the loops of the cached path: `split_each`
//! (what `QueueBatch::pop_each` runs on a cached split ring) and `complete_singles`, which go
//! from the available ring to the used ring in one pass with the ring pointers in registers.
//! With `cached.rs` this is the second place that touches guest memory through raw pointers;
//! every offset is formed from an index reduced modulo the queue size.

use std::sync::atomic::Ordering;

use vireo_memory::{Batch, GuestPhysAddr, GuestSlice};

use crate::batch::{Access, QueueBatch};
use crate::cached;
use crate::chain::{access, Chain, Segments, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::descriptors::{desc_from_words, indirect_entries, read_desc, Table};
use crate::error::QueueError;
use crate::queue::{Kind, QueueState, UsedToken};
use crate::rings::{Area, Direct, RingAccess};

/// `vring_need_event` (virtio 1.x 2.7.10): whether moving the used index from `old` to `new`
/// crossed `event`.
#[inline]
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A chain of one descriptor, as [`QueueBatch::complete_singles`] hands them out (the shape
/// of receive buffers): its id, whether the device writes it, the buffer, and the guest physical
/// address the buffer starts at (what the dirty log records after a write).
#[derive(Clone, Copy, Debug)]
pub struct Single<'b> {
    /// The chain's head (split) index.
    pub id: u16,
    /// The device may write it (VIRTQ_DESC_F_WRITE); else it reads it.
    pub writable: bool,
    /// The buffer, valid for the batch.
    pub buf: GuestSlice<'b>,
    /// Guest physical address of `buf`'s first byte.
    pub phys: GuestPhysAddr,
    /// The protocol slot of `buf`'s region: what an I/O that outlives the batch pins
    /// ([`vireo_memory::Batch::io_pins`]).
    pub slot: u16,
}

impl Single<'_> {
    /// An unused entry, to fill arrays with.
    pub const EMPTY: Single<'static> =
        Single { id: 0, writable: false, buf: GuestSlice::empty(), phys: GuestPhysAddr::new(0), slot: 0 };

    /// What to pass to [`QueueBatch::add_used`] for it.
    pub fn token(&self) -> UsedToken {
        UsedToken { id: self.id, ring_descs: 1 }
    }
}

impl<'b> QueueBatch<'b, '_> {
    /// Pops chains while each is one descriptor (no NEXT, no INDIRECT, non-zero length) whose
    /// buffer lies in one region, and completes each at once: `f` does the device's work on the buffer and returns how many bytes it wrote, which
    /// are logged (when logging is on) and become the used length. One loop from the available
    /// ring to the used ring, for devices that finish such chains synchronously (a null disk, a
    /// receive queue fed by a copy). Returns how many were completed. A write the dirty log
    /// cannot record breaks the queue (that chain is taken and not completed; the next call on
    /// the batch reports the queue broken), as on every other path.
    // Counts below the queue size (at most 32768) are taken as u16, lengths of one
    // descriptor (u32) as u32.
    #[allow(clippy::cast_possible_truncation)]
    #[inline]
    pub fn complete_singles(&mut self, max: usize, mut f: impl FnMut(Single<'b>) -> u32) -> usize {
        let max = self.allowance(max);
        let Some((next, n)) = self.singles_available(max) else { return 0 };
        if self.used_added == 0 {
            if self.ensure_used_known().is_err() {
                return 0;
            }
            self.batch_used_start = self.state.next_used;
        }
        let Access::Direct(d) = &self.access else { return 0 };
        let (mem, size) = (self.mem, self.cfg.size);
        let rings = SinglesRings { avail: d.base(Area::Driver), desc: d.base(Area::Desc), used: d.base(Area::Device) };
        let start = self.state.next_used;
        // Four copies of the loop: the one without logging has no logging test in it, the one
        // without prefetching no prefetch.
        // SAFETY: `rings` are the views of a cached split ring of `size` entries (Direct::new
        // checked their lengths and alignment); n <= size entries are available.
        let (i, log_error) = unsafe {
            match (self.logging, self.prefetch) {
                (true, true) => complete_singles_loop::<true, true, _>(rings, mem, size, next, start, n, &mut f),
                (true, false) => complete_singles_loop::<true, false, _>(rings, mem, size, next, start, n, &mut f),
                (false, true) => complete_singles_loop::<false, true, _>(rings, mem, size, next, start, n, &mut f),
                (false, false) => complete_singles_loop::<false, false, _>(rings, mem, size, next, start, n, &mut f),
            }
        };
        // i <= size fits u16.
        let k = i as u16;
        // A chain whose write could not be logged was taken and not completed.
        self.state.next_avail = next.wrapping_add(k + u16::from(log_error.is_some()));
        self.state.next_used = start.wrapping_add(k);
        self.used_added = self.used_added.wrapping_add(k);
        self.used_total = self.used_total.wrapping_add(u32::from(k));
        self.charge(i + usize::from(log_error.is_some()));
        if self.logging {
            for j in 0..k {
                if self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & (size - 1)), 8).is_err() {
                    // The queue is broken (`log_ring`); what was completed stays unpublished.
                    return i;
                }
            }
        }
        if let Some(e) = log_error {
            self.fail(e);
        }
        i
    }

    /// `pop_each`'s loop on a cached split ring. Stops at the first chain the cached walker
    /// doubts, leaving it available.
    // Counts below the queue size (at most 32768) are taken as u16.
    #[allow(clippy::cast_possible_truncation)]
    #[inline(always)]
    pub(crate) fn split_each(
        &mut self,
        max: usize,
        f: &mut impl FnMut(&Chain<'_>) -> Option<u32>,
    ) -> Result<usize, QueueError> {
        let Some((next, n)) = self.singles_available(max) else { return Ok(0) };
        if self.used_added == 0 {
            self.ensure_used_known().map_err(|e| self.fail(e))?;
            self.batch_used_start = self.state.next_used;
        }
        let Access::Direct(d) = &self.access else { return Ok(0) };
        let (mem, size) = (self.mem, self.cfg.size);
        let rings = SinglesRings { avail: d.base(Area::Driver), desc: d.base(Area::Desc), used: d.base(Area::Device) };
        let start = self.state.next_used;
        let segs = &mut *self.segs;
        // SAFETY: `rings` are the views of a cached split ring of `size` entries (Direct::new
        // checked their lengths and alignment); n <= size entries are available.
        let (popped, completed, log_error) = unsafe {
            match (self.logging, self.prefetch) {
                (true, true) => split_each_loop::<true, true, _>(rings, mem, size, next, start, n, segs, f),
                (true, false) => split_each_loop::<true, false, _>(rings, mem, size, next, start, n, segs, f),
                (false, true) => split_each_loop::<false, true, _>(rings, mem, size, next, start, n, segs, f),
                (false, false) => split_each_loop::<false, false, _>(rings, mem, size, next, start, n, segs, f),
            }
        };
        // Both counts are at most n <= size, which fits u16.
        self.state.next_avail = next.wrapping_add(popped as u16);
        self.state.next_used = start.wrapping_add(completed);
        self.used_added = self.used_added.wrapping_add(completed);
        self.used_total = self.used_total.wrapping_add(u32::from(completed));
        if self.logging {
            for j in 0..completed {
                self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & (size - 1)), 8)?;
            }
        }
        match log_error {
            Some(e) => Err(self.fail(e)),
            None => Ok(popped),
        }
    }

    /// For the batch loops: the next available index and how many entries (at most `max`) the
    /// driver has made available, when the queue is of the shape they serve (split, cached
    /// rings, not broken, no inflight record).
    #[inline(always)]
    pub(crate) fn singles_available(&mut self, max: usize) -> Option<(u16, usize)> {
        let (Kind::Split { avail_shadow, .. }, Access::Direct(d)) = (&mut *self.kind, &self.access) else {
            return None;
        };
        if self.broken.is_some() || self.inflight.is_some() {
            return None;
        }
        if max == 0 {
            return None;
        }
        let next = self.state.next_avail;
        if next == *avail_shadow {
            // Acquire: as in `pop_split`.
            let idx = u16::from_le(d.load_u16(Area::Driver, 2, Ordering::Acquire).ok()?);
            let pending = idx.wrapping_sub(next);
            if pending == 0 || pending > self.cfg.size {
                // Nothing, or a jump `pop` reports and breaks the queue for.
                return None;
            }
            *avail_shadow = idx;
        }
        Some((next, usize::from(avail_shadow.wrapping_sub(next)).min(max)))
    }
}

/// The base pointers of a cached split ring, for `complete_singles_loop`.
#[derive(Clone, Copy)]
pub(crate) struct SinglesRings {
    pub avail: *mut u8,
    pub desc: *mut u8,
    pub used: *mut u8,
}

/// `QueueBatch::complete_singles`'s loop: from available entry `next` and used entry `start`,
/// at most `n` single-buffer chains; returns how many were completed, and the error of a write
/// that could not be logged (that chain was taken and is not completed). The ring is walked in
/// runs that do not wrap, so that within a run the available and used entries are two pointers
/// that advance (no index arithmetic per chain); `LOGGING` compiles the logging in or out.
///
/// # Safety
/// `rings` are the bases of a split ring of `size` entries (a power of two) mapped for the batch
/// `mem`: an available ring of 6 + 2 * size bytes (2-aligned), a descriptor table of 16 * size
/// (16-aligned), a used ring of 6 + 8 * size (4-aligned); `n <= size`.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // counts below size <= 32768
unsafe fn complete_singles_loop<'b, const LOGGING: bool, const PREFETCH: bool, F: FnMut(Single<'b>) -> u32>(
    rings: SinglesRings,
    mem: &'b Batch<'_>,
    size: u16,
    next: u16,
    start: u16,
    n: usize,
    f: &mut F,
) -> (usize, Option<QueueError>) {
    let mask = size - 1;
    let mut window = mem.window();
    let mut i = 0usize;
    'runs: while i < n {
        let a = usize::from(next.wrapping_add(i as u16) & mask);
        let u = usize::from(start.wrapping_add(i as u16) & mask);
        let run = (n - i).min(usize::from(size) - a).min(usize::from(size) - u);
        // SAFETY: a + run <= size and u + run <= size: every entry of the run lies inside the
        // available ring (from offset 4, 2 bytes each) and the used ring (from offset 4, 8 bytes
        // each), aligned as their bases are.
        let (mut pa, mut pu) =
            unsafe { (rings.avail.add(4 + 2 * a).cast::<u16>(), rings.used.add(4 + 8 * u).cast::<u32>()) };
        for _ in 0..run {
            if PREFETCH {
                // SAFETY: as `prefetch_split_ahead` requires (the function's own contract).
                unsafe { prefetch_split_ahead(rings, size, next.wrapping_add(i as u16), &window) };
            }
            // SAFETY: inside the run (above); any bytes the guest left are a u16.
            let head = u16::from_le(unsafe { pa.read_volatile() });
            if head >= size {
                break 'runs;
            }
            // SAFETY: head < size: both words of entry `head` are inside the 16-aligned table.
            let (lo, hi) = unsafe {
                let p = rings.desc.add(16 * usize::from(head)).cast::<u64>();
                (p.read_volatile(), p.add(1).read_volatile())
            };
            // Little endian to native here, once.
            let desc = desc_from_words(lo, hi);
            if desc.flags_or_id & (DESC_F_NEXT | DESC_F_INDIRECT) != 0 || desc.len == 0 {
                break 'runs;
            }
            let writable = desc.flags_or_id & DESC_F_WRITE != 0;
            let addr = GuestPhysAddr::new(desc.addr);
            let piece = match window.translate_for(addr, desc.len, writable) {
                Some(p) => p,
                None => match singles_miss(mem, addr, desc.len, writable) {
                    Some((p, w)) => {
                        window = w;
                        p
                    }
                    None => break 'runs,
                },
            };
            let written =
                f(Single { id: head, writable, buf: piece.slice, phys: piece.phys, slot: piece.slot }).min(desc.len);
            if LOGGING && writable && written > 0 {
                if let Err(e) = mem.log_write(piece.phys, u64::from(written)) {
                    // Not completed: a write the log lacks is never exposed.
                    return (i, Some(QueueError::mem(piece.phys, u64::from(written), e)));
                }
            }
            // SAFETY: inside the run (above): the element's two u32 are inside the used ring.
            unsafe {
                pu.write_volatile(u32::from(head).to_le());
                pu.add(1).write_volatile(written.to_le());
                pa = pa.add(1);
                pu = pu.add(2);
            }
            i += 1;
        }
    }
    (i, None)
}

/// `QueueBatch::pop_each`'s loop on a cached split ring: from available entry `next` and used
/// entry `start`, at most `n` chains through the cached walker; returns how many were popped,
/// how many completed, and the error of a write that could not be logged (which ends the loop;
/// that chain was taken and is not completed). The available and used entries are pointers that
/// advance and wrap.
///
/// # Safety
/// As for `complete_singles_loop`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn split_each_loop<const LOGGING: bool, const PREFETCH: bool, F: FnMut(&Chain<'_>) -> Option<u32>>(
    rings: SinglesRings,
    mem: &Batch<'_>,
    size: u16,
    next: u16,
    start: u16,
    n: usize,
    segs: &mut Segments,
    f: &mut F,
) -> (usize, u16, Option<QueueError>) {
    let mask = size - 1;
    // SAFETY: the entries at offset 4 of the available (2 bytes each) and used (8 bytes each)
    // rings: slots below size, inside the views, aligned as their bases are; the ends are one
    // past the last entry, where the pointers wrap back.
    let (avail0, avail_end, used0, used_end) = unsafe {
        let a = rings.avail.add(4).cast::<u16>();
        let u = rings.used.add(4).cast::<u32>();
        (a, a.add(usize::from(size)), u, u.add(2 * usize::from(size)))
    };
    // SAFETY: slots below size (masked), as above.
    let (mut pa, mut pu) = unsafe { (avail0.add(usize::from(next & mask)), used0.add(2 * usize::from(start & mask))) };
    let mut win = cached::Windowed::new(mem);
    let (mut popped, mut completed) = (0usize, 0u16);
    while popped < n {
        if PREFETCH {
            // Counts below the size, which fits u16.
            #[allow(clippy::cast_possible_truncation)]
            let at = next.wrapping_add(popped as u16);
            // SAFETY: as `prefetch_split_ahead` requires (the function's own contract).
            unsafe { prefetch_split_ahead(rings, size, at, win.window()) };
        }
        // SAFETY: pa points at an entry of the available ring (wrapped below); any bytes the guest
        // left are a u16.
        let head = u16::from_le(unsafe { pa.read_volatile() });
        // SAFETY: the table holds 16 * size bytes from a 16-aligned base, mapped for the batch.
        if unsafe { cached::split_chain(rings.desc, size, head, segs, &mut win) }.is_none() {
            break;
        }
        popped += 1;
        // SAFETY: pa stays within [avail0, avail_end): it wraps when it reaches the end.
        pa = unsafe { pa.add(1) };
        if pa == avail_end {
            pa = avail0;
        }
        let chain = Chain::new(head, 1, segs);
        let Some(written) = f(&chain) else { continue };
        if LOGGING {
            if let Err(e) = chain.log_written(mem, written) {
                // Not completed: a write the log lacks is never exposed.
                return (popped, completed, Some(e));
            }
        }
        // SAFETY: pu points at a used element (wrapped below): two u32 inside the used ring.
        unsafe {
            pu.write_volatile(u32::from(head).to_le());
            pu.add(1).write_volatile(written.to_le());
            pu = pu.add(2);
        }
        if pu == used_end {
            pu = used0;
        }
        completed += 1;
    }
    (popped, completed, None)
}

/// Prefetches the buffer of the chain `PREFETCH_AHEAD` available entries after entry `at`, if
/// its head descriptor's buffer lies in `window` (see `cached::prefetch_desc`: a hint, nothing
/// checked or read).
///
/// # Safety
/// `rings` are the bases of a split ring of `size` entries (a power of two), mapped for the
/// batch the window belongs to.
#[inline(always)]
unsafe fn prefetch_split_ahead(rings: SinglesRings, size: u16, at: u16, window: &vireo_memory::Window<'_>) {
    let slot = usize::from(at.wrapping_add(cached::PREFETCH_AHEAD) & (size - 1));
    // SAFETY: slot < size: the entry at 4 + 2 * slot is inside the available ring, aligned.
    let head = u16::from_le(unsafe { rings.avail.add(4 + 2 * slot).cast::<u16>().read_volatile() });
    if head < size {
        // SAFETY: head < size: both words of entry `head` are inside the 16-aligned table.
        let (lo, hi) = unsafe {
            let p = rings.desc.add(16 * usize::from(head)).cast::<u64>();
            (p.read_volatile(), p.add(1).read_volatile())
        };
        cached::prefetch_desc(window, lo, hi, 32);
    }
}

/// A single buffer outside the window: translated through the batch, and the window moved.
#[cold]
#[inline(never)]
fn singles_miss<'b>(
    mem: &'b Batch<'_>,
    addr: GuestPhysAddr,
    len: u32,
    writable: bool,
) -> Option<(vireo_memory::Piece<'b>, vireo_memory::Window<'b>)> {
    let p = mem.translate_piece(addr, u64::from(len), access(writable), false).ok()?;
    Some((p, mem.window()))
}

/// See `QueueBatch::pop`: the chain at the next available entry through the cached walker, in
/// the regions the batch translated into (or now translates into, without splitting a buffer).
/// `None` sends the caller to the general walker; nothing but `segs` is changed unless this
/// succeeds.
#[inline(always)]
pub(crate) fn split_cached_pop(
    d: &Direct<'_>,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Option<u16> {
    let slot = usize::from(state.next_avail & (size - 1));
    let head = u16::from_le(d.read::<u16>(Area::Driver, 4 + 2 * slot).ok()?);
    // SAFETY: the descriptor table's view holds 16 * size bytes from a 16-aligned base
    // (Direct::new), mapped for the batch.
    unsafe { cached::split_chain_once(d.base(Area::Desc), size, head, segs, mem) }?;
    state.next_avail = state.next_avail.wrapping_add(1);
    Some(head)
}

#[inline(always)]
pub(crate) fn pop_split<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    kind: &mut Kind,
    segs: &mut Segments,
) -> Result<Option<(u16, u16)>, QueueError> {
    let Kind::Split { avail_shadow, .. } = kind else { return Ok(None) };
    if state.next_avail == *avail_shadow {
        // Acquire: pairs with the driver's write barrier before it updates the available index
        // (virtio 1.x 2.7.13): the ring entries and descriptors it made available are visible.
        let idx = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
        let pending = idx.wrapping_sub(state.next_avail);
        if pending > size {
            return Err(QueueError::AvailIdxJump { last: state.next_avail, now: idx, size });
        }
        if pending == 0 {
            return Ok(None);
        }
        *avail_shadow = idx;
    }
    let slot = usize::from(state.next_avail & (size - 1));
    let head = u16::from_le(r.read::<u16>(Area::Driver, 4 + 2 * slot)?);
    walk_split(r, mem, size, head, segs)?;
    state.next_avail = state.next_avail.wrapping_add(1);
    Ok(Some((head, 1)))
}

/// Validates the split chain that starts at descriptor `head` and resolves it into `segs`.
#[inline(always)]
pub(crate) fn walk_split<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    head: u16,
    segs: &mut Segments,
) -> Result<(), QueueError> {
    if head >= size {
        return Err(QueueError::DescIndex { index: u32::from(head), size: u32::from(size) });
    }
    segs.clear();
    let mut index = head;
    let mut count = 0u32;
    loop {
        count += 1;
        if count > u32::from(size) {
            return Err(QueueError::ChainTooLong { head, limit: u32::from(size) });
        }
        let d = read_desc(r, index)?;
        let flags = d.flags_or_id;
        if flags & DESC_F_INDIRECT != 0 {
            if flags & DESC_F_NEXT != 0 {
                return Err(QueueError::Indirect { head, what: "indirect descriptor with NEXT" });
            }
            let n = indirect_entries(head, &d)?;
            let table = Table::new(mem, d.addr, d.len);
            let mut j = 0u32;
            let mut steps = 0u32;
            loop {
                steps += 1;
                if steps > n {
                    return Err(QueueError::ChainTooLong { head, limit: n });
                }
                let t = table.entry(j)?;
                if t.flags_or_id & DESC_F_INDIRECT != 0 {
                    return Err(QueueError::Indirect { head, what: "nested indirect table" });
                }
                segs.push(mem, head, t.addr, t.len, t.flags_or_id & DESC_F_WRITE != 0)?;
                if t.flags_or_id & DESC_F_NEXT == 0 {
                    break;
                }
                j = u32::from(t.next_or_flags);
                if j >= n {
                    return Err(QueueError::DescIndex { index: j, size: n });
                }
            }
            break;
        }
        segs.push(mem, head, d.addr, d.len, flags & DESC_F_WRITE != 0)?;
        if flags & DESC_F_NEXT == 0 {
            break;
        }
        index = d.next_or_flags;
        if index >= size {
            return Err(QueueError::DescIndex { index: u32::from(index), size: u32::from(size) });
        }
    }
    Ok(())
}
