//! The packed virtqueue (virtio 1.x 2.8): the general walker (`walk_packed`, `pop_packed`),
//! the cached pop and `packed_each`, what `QueueBatch::pop_each` runs on a cached packed ring,
//! and the wrap-counter arithmetic. Slots are always below the queue size here: positions are
//! checked when set (`Queue::set_state`) and advanced with `advance`.

use std::sync::atomic::Ordering;

use vireo_memory::Batch;

use crate::batch::{Access, QueueBatch};
use crate::cached;
use crate::chain::{
    Chain, Descriptor, Segments, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE,
};
use crate::descriptors::{indirect_entries, read_desc, Table};
use crate::error::QueueError;
use crate::queue::{Kind, QueueState};
use crate::rings::{Area, Direct, RingAccess};

/// `slot + n` on a packed ring of `size` (`slot < size`, `n <= size`), and whether it wrapped.
pub(crate) fn advance(slot: u16, n: u16, size: u16) -> (u16, bool) {
    let next = u32::from(slot) + u32::from(n);
    let size = u32::from(size);
    let (next, wrapped) = if next >= size { (next - size, true) } else { (next, false) };
    debug_assert!(next < size);
    // next < size <= 32768.
    (u16::try_from(next).unwrap_or(0), wrapped)
}

/// How many descriptors from position `from` to position `to` (each a slot and a wrap counter)
/// going forward, in `0..2 * size`: at most `size` when `to` is not behind `from`.
pub(crate) fn packed_distance(size: u16, from: (u16, bool), to: (u16, bool)) -> u16 {
    let lin = |(slot, wrap): (u16, bool)| u32::from(slot) + if wrap { u32::from(size) } else { 0 };
    let span = 2 * u32::from(size);
    // Both positions are below 2 * size <= 65536, and so is the result: it fits a u16.
    u16::try_from((lin(to) + span - lin(from)) % span).unwrap_or(u16::MAX)
}

/// Whether moving the used position from `old` to `new` (slots, as QEMU keeps them) passed the
/// driver's event offset `off_wrap` (2.8.10): an offset from the other lap counts one ring size
/// back. Slots that wrapped in the batch make the distance look huge, which errs on the side of
/// notifying.
pub(crate) fn packed_need_event(off_wrap: u16, size: u16, old: u16, new: u16, used_wrap: bool) -> bool {
    let mut off = off_wrap & 0x7fff;
    if (off_wrap & 0x8000 != 0) != used_wrap {
        off = off.wrapping_sub(size);
    }
    crate::split::vring_need_event(off, new, old)
}

impl QueueBatch<'_, '_> {
    /// `pop_each`'s loop on a cached packed ring (not while logging, nor with inflight
    /// tracking: those take `pop` and `add_used`). Stops at the first chain the cached walker
    /// doubts, leaving it available.
    #[inline(always)]
    pub(crate) fn packed_each(
        &mut self,
        max: usize,
        f: &mut impl FnMut(&Chain<'_>) -> Option<u32>,
    ) -> Result<usize, QueueError> {
        if self.broken.is_some() || self.packed_inflight.is_some() || self.logging {
            return Ok(0);
        }
        let (Kind::Packed { first_used_flags, rewound_end }, Access::Direct(d)) = (&mut *self.kind, &self.access)
        else {
            return Ok(0);
        };
        let (mem, size) = (self.mem, self.cfg.size);
        let ring = d.base(Area::Desc);
        let segs = &mut *self.segs;
        let mut win = cached::Windowed::new(mem);
        if self.used_added == 0 {
            self.batch_used_start = self.state.next_used;
        }
        // The positions in locals for the loop, written back after it; with the wrap counters,
        // the flag bits they stand for: a head is available when its AVAIL/USED bits are
        // `avail_bits` (AVAIL = wrap, USED = !wrap), a used descriptor gets `used_bits`.
        let QueueState { mut next_avail, mut next_used, mut avail_wrap, mut used_wrap } = *self.state;
        const BOTH: u16 = DESC_F_AVAIL | DESC_F_USED;
        let mut avail_bits = if avail_wrap { DESC_F_AVAIL } else { DESC_F_USED };
        let mut used_bits = if used_wrap { BOTH } else { 0 };
        let mut first = *first_used_flags;
        let mut popped = 0usize;
        let mut completed = 0u16;
        // Both positions are below the size (`set_state`, `advance`); checked again here, where
        // the used descriptor is written through a raw pointer.
        let prefetch = self.prefetch;
        while popped < max && next_avail < size && next_used < size {
            if prefetch {
                let ahead = next_avail + cached::PREFETCH_AHEAD;
                let slot = if ahead >= size { ahead % size } else { ahead };
                // SAFETY: slot < size, and the ring's view holds 16 * size bytes from a 16-aligned
                // base, mapped for the batch: both words of the descriptor are inside it.
                let (lo, hi) = unsafe {
                    let p = ring.add(16 * usize::from(slot)).cast::<u64>();
                    (p.read_volatile(), p.add(1).read_volatile())
                };
                cached::prefetch_desc(win.window(), lo, hi, 48);
            }
            // SAFETY: next_avail < size and the ring's view holds 16 * size bytes from a 16-aligned
            // base, mapped for the batch: the head's flags (offset 14) are inside it, aligned; an
            // atomic reference for one load, as in `Direct::load_u16`.
            let flags = u16::from_le(
                unsafe { std::sync::atomic::AtomicU16::from_ptr(ring.add(16 * usize::from(next_avail) + 14).cast()) }
                    // Acquire: as in `packed_available`.
                    .load(Ordering::Acquire),
            );
            if flags & BOTH != avail_bits {
                break;
            }
            // SAFETY: as above; the head (next_avail) is below the size.
            let Some((id, count)) = (unsafe { cached::packed_chain(ring, size, next_avail, segs, &mut win) }) else {
                break;
            };
            // count <= size (the walker's limit), so the sums stay below 2 * size <= 65536.
            next_avail += count;
            if next_avail >= size {
                next_avail -= size;
                avail_wrap = !avail_wrap;
                avail_bits ^= BOTH;
            }
            popped += 1;
            if *rewound_end == Some((next_avail, avail_wrap)) {
                // Back where the device had taken chains to before it gave some back.
                *rewound_end = None;
            }
            let chain = Chain::new(id, count, segs);
            let Some(written) = f(&chain) else { continue };
            // SAFETY: next_used < size (the loop's condition; kept so below) and the ring's view
            // holds 16 * size bytes from a 16-aligned base: the descriptor's length (offset 8),
            // id (12) and flags (14) are inside it, aligned.
            unsafe {
                let p = ring.add(16 * usize::from(next_used));
                p.add(8).cast::<u32>().write_volatile(written.to_le());
                p.add(12).cast::<u16>().write_volatile(id.to_le());
                if first.is_none() {
                    // The first used descriptor of a batch is made visible last (2.8.21.2).
                    first = Some((next_used, used_bits));
                } else {
                    p.add(14).cast::<u16>().write_volatile(used_bits.to_le());
                }
            }
            next_used += count;
            if next_used >= size {
                next_used -= size;
                used_wrap = !used_wrap;
                used_bits ^= BOTH;
            }
            completed += 1;
        }
        *self.state = QueueState { next_avail, next_used, avail_wrap, used_wrap };
        *first_used_flags = first;
        if completed > 0 {
            // Elements of their own follow the first: it no longer stands for what comes next.
            self.collapsing = false;
        }
        self.used_added = self.used_added.wrapping_add(completed);
        self.used_total = self.used_total.wrapping_add(u32::from(completed));
        Ok(popped)
    }
}

/// The packed counterpart of `split_cached_pop`: the buffer id and the ring descriptors used.
#[inline(always)]
pub(crate) fn packed_cached_pop(
    d: &Direct<'_>,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Option<(u16, u16)> {
    let head = state.next_avail;
    if head >= size || packed_available(d, size, state).ok()?.is_none() {
        return None;
    }
    // SAFETY: the ring's view holds 16 * size bytes from a 16-aligned base (Direct::new), mapped
    // for the batch; head < size.
    let (id, count) = unsafe { cached::packed_chain_once(d.base(Area::Desc), size, head, segs, mem) }?;
    let (next, wrapped) = advance(head, count, size);
    state.next_avail = next;
    state.avail_wrap ^= wrapped;
    Some((id, count))
}
/// Validates a packed chain whose descriptors `desc(i)` yields in order (from the ring, or from
/// the copies an inflight region keeps) and resolves it into `segs`; at most `limit` ring
/// descriptors. Returns the buffer id and how many ring descriptors the chain used.
#[inline(always)]
pub(crate) fn walk_packed(
    mem: &Batch<'_>,
    limit: u16,
    segs: &mut Segments,
    mut desc: impl FnMut(u16) -> Result<Descriptor, QueueError>,
) -> Result<(u16, u16), QueueError> {
    segs.clear();
    let mut count = 0u16;
    loop {
        let d = desc(count)?;
        let (buf_id, flags) = (d.flags_or_id, d.next_or_flags);
        count += 1;
        if flags & DESC_F_INDIRECT != 0 {
            if count != 1 || flags & DESC_F_NEXT != 0 {
                return Err(QueueError::Indirect { head: buf_id, what: "indirect descriptor inside a chain" });
            }
            let n = indirect_entries(buf_id, &d)?;
            let table = Table::new(mem, d.addr, d.len);
            for j in 0..n {
                let t = table.entry(j)?;
                // In a packed indirect table the second u16 holds the flags.
                let tflags = t.next_or_flags;
                if tflags & DESC_F_INDIRECT != 0 {
                    return Err(QueueError::Indirect { head: buf_id, what: "nested indirect table" });
                }
                segs.push(mem, buf_id, t.addr, t.len, tflags & DESC_F_WRITE != 0)?;
            }
            return Ok((buf_id, count));
        }
        segs.push(mem, buf_id, d.addr, d.len, flags & DESC_F_WRITE != 0)?;
        if flags & DESC_F_NEXT == 0 {
            return Ok((buf_id, count));
        }
        if count >= limit {
            return Err(QueueError::ChainTooLong { head: buf_id, limit: u32::from(limit) });
        }
    }
}

/// The descriptor at the device's next available slot, if the driver has made it available.
#[inline]
pub(crate) fn packed_available<R: RingAccess>(r: &R, size: u16, state: &QueueState) -> Result<Option<u16>, QueueError> {
    let _ = size;
    // Acquire: pairs with the driver's write barrier before it sets the head's flags
    // (2.8.21.1): the descriptor's other fields, and the rest of the chain, are visible.
    let flags = u16::from_le(r.load_u16(Area::Desc, 16 * usize::from(state.next_avail) + 14, Ordering::Acquire)?);
    let avail = flags & DESC_F_AVAIL != 0;
    let used = flags & DESC_F_USED != 0;
    Ok((avail == state.avail_wrap && used != state.avail_wrap).then_some(flags))
}

#[inline]
pub(crate) fn pop_packed<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Result<Option<(u16, u16)>, QueueError> {
    if state.next_avail >= size {
        return Err(QueueError::DescIndex { index: u32::from(state.next_avail), size: u32::from(size) });
    }
    if packed_available(r, size, state)?.is_none() {
        return Ok(None);
    }
    let head_slot = state.next_avail;
    let (id, count) = walk_packed(mem, size, segs, |i| {
        // head_slot < size <= 32768 and i < size: the sum fits u16 and is below 2 * size.
        let slot = head_slot + i;
        read_desc(r, if slot >= size { slot - size } else { slot })
    })?;
    let (next, wrapped) = advance(head_slot, count, size);
    state.next_avail = next;
    state.avail_wrap ^= wrapped;
    Ok(Some((id, count)))
}
